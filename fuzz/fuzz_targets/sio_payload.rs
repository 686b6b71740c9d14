//! Engine.IO 3 and 4 long-polling payloads (`sio::payload`).
//!
//! Any body splits into packets without a panic, each packet a piece of
//! the body (an Engine.IO 4 packet never holds the separator). Packets
//! built with `push` split back into exactly the same packets, in both
//! versions, whatever characters (astral ones count twice in Engine.IO 3).
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use pulso::sio::payload::{packets, push};

#[derive(Arbitrary, Debug)]
struct Input<'a> {
    body: &'a str,
    eio3: bool,
    packets: Vec<&'a str>,
}

fuzz_target!(|input: Input<'_>| {
    let range = input.body.as_bytes().as_ptr_range();
    for packet in packets(input.body, input.eio3) {
        let Ok(packet) = packet else {
            continue;
        };
        let p = packet.as_bytes().as_ptr_range();
        assert!(range.start <= p.start && p.end <= range.end);
        if !input.eio3 {
            assert!(!packet.contains('\u{1e}'));
        }
    }

    // Round trip: packets a server could send (never empty; Engine.IO 4
    // ones without the separator).
    let sent: Vec<&str> = input
        .packets
        .iter()
        .copied()
        .filter(|p| !p.is_empty() && (input.eio3 || !p.contains('\u{1e}')))
        .collect();
    if sent.is_empty() {
        return;
    }
    let mut body = Vec::new();
    for p in &sent {
        push(&mut body, p.as_bytes(), input.eio3);
    }
    let body = String::from_utf8(body).expect("pushed text stays UTF-8");
    let got: Result<Vec<&str>, _> = packets(&body, input.eio3).collect();
    assert_eq!(got.as_deref(), Ok(&sent[..]), "body {body:?}");
});
