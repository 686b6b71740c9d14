//! Socket.IO packets (`sio::packet`): parsing, event arguments, the
//! recovery fields of a CONNECT and the offsets in them.
//!
//! Any text parses without a panic; a parsed packet has a known type, a
//! namespace starting with `/` and no `,` or `?`, and data that is the end
//! of the text. The packets pulso writes for a namespace and ack id parse
//! back to the same namespace and id; recovery fields stay within their
//! bound.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pulso::sio::packet::{
    MAX_RECOVERY_FIELD, ack, connect_error, disconnect, event_args, parse, parse_offset, recovery,
};
use pulso::transport::frame::server_payload;

/// The Socket.IO packet in a frame pulso wrote (after Engine.IO's `4`).
fn reparse(frame: &[u8]) -> String {
    let text = std::str::from_utf8(server_payload(frame)).expect("frames are UTF-8");
    assert!(text.starts_with('4'));
    text[1..].to_string()
}

fuzz_target!(|text: &str| {
    let Ok(p) = parse(text) else {
        return;
    };
    assert!((b'0'..=b'6').contains(&p.kind));
    assert!(p.nsp.starts_with('/'), "namespace {:?}", p.nsp);
    assert!(!p.nsp.contains(',') && !p.nsp.contains('?'));
    assert!(text.ends_with(p.data));
    let _ = event_args(p.data);
    if let Some(r) = recovery(p.data) {
        assert!(r.pid.len() <= MAX_RECOVERY_FIELD && r.offset.len() <= MAX_RECOVERY_FIELD);
        if let Some((epoch, _)) = parse_offset(r.offset) {
            assert!(!epoch.is_empty());
        }
    }

    let id = p.ack.unwrap_or(0);
    let written = reparse(&ack(p.nsp, id, &serde_json::json!({"ok": true})));
    let back = parse(&written).expect("our ack parses");
    assert_eq!((back.nsp, back.ack), (p.nsp, Some(id)), "{written:?}");
    let written = reparse(&disconnect(p.nsp));
    assert_eq!(parse(&written).map(|b| b.nsp), Ok(p.nsp), "{written:?}");
    for eio3 in [false, true] {
        let written = reparse(&connect_error(p.nsp, p.data, eio3));
        let back = parse(&written).expect("our connect_error parses");
        assert_eq!(back.nsp, p.nsp);
        serde_json::from_str::<serde_json::Value>(back.data).expect("its data is JSON");
    }
});
