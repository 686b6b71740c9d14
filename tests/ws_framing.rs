//! RFC 6455 against a real server, on `/ws` and on Socket.IO's WebSocket
//! transport, with a hand-written client that can send what library
//! clients never do: frames split byte by byte, a frame in the same packet
//! as the upgrade request, fragments with a ping in between, pings of both
//! kinds in one write, frames a server must refuse, and handshakes it must
//! refuse.

mod common;

use common::*;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const TEXT: u8 = 0x1;
const BINARY: u8 = 0x2;
const CLOSE: u8 = 0x8;
const PING: u8 = 0x9;
const PONG: u8 = 0xA;

/// A masked client frame.
fn frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    pulso::transport::frame::encode_client(
        &mut out,
        fin,
        opcode,
        payload,
        [0x37, 0xFA, 0x21, 0x3D],
    );
    out
}

fn text(v: &Value) -> Vec<u8> {
    frame(true, TEXT, v.to_string().as_bytes())
}

/// A key RFC 6455 accepts (its own example), and its `Sec-WebSocket-Accept`.
const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";
const ACCEPT: &str = "s3pplmbitxaq9kygzzhzrbk+xoo=";

/// An upgrade request for `target` (path and query) with these
/// `Sec-WebSocket-Version` and `Sec-WebSocket-Key` values.
fn upgrade_request(srv: &TestServer, target: &str, version: &str, key: &str) -> Vec<u8> {
    format!(
        "GET {target} HTTP/1.1\r\nHost: {}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: {version}\r\nSec-WebSocket-Key: {key}\r\n\r\n",
        srv.addr
    )
    .into_bytes()
}

/// Socket.IO's WebSocket transport, without a session.
fn sio_target(eio: u8) -> String {
    format!("/socket.io/?EIO={eio}&transport=websocket")
}

struct Raw {
    tcp: TcpStream,
    buf: Vec<u8>,
}

impl Raw {
    /// Connects and upgrades; `early` is sent in the same write as the request.
    async fn connect(srv: &TestServer, early: &[u8]) -> Raw {
        Self::connect_as(srv, "assistant", early).await
    }

    async fn connect_as(srv: &TestServer, role: &str, early: &[u8]) -> Raw {
        let target = format!("/ws?token={}", srv.token(role, "raw"));
        Self::upgrade(srv, &target, early).await
    }

    /// Upgrades to `target` with a valid handshake, `early` in the same write.
    async fn upgrade(srv: &TestServer, target: &str, early: &[u8]) -> Raw {
        let mut request = upgrade_request(srv, target, "13", KEY);
        request.extend_from_slice(early);
        let (raw, head) = Self::request(srv, &request).await;
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        assert!(
            head.to_ascii_lowercase()
                .contains(&format!("sec-websocket-accept: {ACCEPT}")),
            "{head}"
        );
        raw
    }

    /// Sends `request` on a new connection; the response head (status line
    /// and headers) and the connection, positioned after it.
    async fn request(srv: &TestServer, request: &[u8]) -> (Raw, String) {
        let tcp = TcpStream::connect(srv.addr).await.unwrap();
        tcp.set_nodelay(true).unwrap();
        let mut raw = Raw {
            tcp,
            buf: Vec::new(),
        };
        raw.tcp.write_all(request).await.unwrap();
        let head = raw.until_headers().await;
        (raw, head)
    }

    async fn fill(&mut self) -> bool {
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout(WAIT, self.tcp.read(&mut chunk))
            .await
            .expect("data in time")
            .unwrap_or(0);
        self.buf.extend_from_slice(&chunk[..n]);
        n > 0
    }

    async fn until_headers(&mut self) -> String {
        loop {
            if let Some(end) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&self.buf[..end]).into_owned();
                self.buf.drain(..end + 4);
                return head;
            }
            assert!(self.fill().await, "connection closed during the handshake");
        }
    }

    /// The next server frame: (opcode, payload); None at end of stream.
    async fn next(&mut self) -> Option<(u8, Vec<u8>)> {
        loop {
            if self.buf.len() >= 2 {
                let b = &self.buf;
                assert_eq!(b[1] & 0x80, 0, "server frames are not masked");
                assert_ne!(b[0] & 0x80, 0, "server frames are whole");
                let (len, start) = match b[1] & 0x7F {
                    126 if b.len() >= 4 => (usize::from(u16::from_be_bytes([b[2], b[3]])), 4),
                    127 if b.len() >= 10 => (
                        u64::from_be_bytes(b[2..10].try_into().unwrap()) as usize,
                        10,
                    ),
                    126 | 127 => (usize::MAX, 0),
                    n => (usize::from(n), 2),
                };
                if len != usize::MAX && b.len() >= start + len {
                    let opcode = b[0] & 0x0F;
                    let payload = b[start..start + len].to_vec();
                    self.buf.drain(..start + len);
                    return Some((opcode, payload));
                }
            }
            if !self.fill().await {
                return None;
            }
        }
    }

    /// The next frame that is not a server ping (a keepalive, or an
    /// Engine.IO 4 heartbeat `2`): an answer, a message or the close.
    async fn answer(&mut self) -> (u8, Vec<u8>) {
        loop {
            match self.next().await.expect("a frame") {
                (PING, _) => continue,
                (TEXT, p) if p == b"2" => continue,
                other => return other,
            }
        }
    }

    /// A Socket.IO WebSocket (no session) after its opening packets: OPEN,
    /// and for Engine.IO 3 the root namespace's CONNECT.
    async fn sio(srv: &TestServer, eio: u8) -> Raw {
        let mut c = Raw::upgrade(srv, &sio_target(eio), b"").await;
        let (opcode, open) = c.answer().await;
        assert_eq!((opcode, open.first()), (TEXT, Some(&b'0')), "OPEN");
        if eio == 3 {
            assert_eq!(c.answer().await, (TEXT, b"40".to_vec()));
        }
        c
    }

    /// The next JSON text message, skipping pings.
    async fn json(&mut self) -> Value {
        loop {
            match self.next().await.expect("a frame") {
                (PING, _) => continue,
                (TEXT, payload) => return serde_json::from_slice(&payload).unwrap(),
                other => panic!("expected text, got {other:?}"),
            }
        }
    }

    /// The close frame's code, skipping anything before it.
    async fn close_code(&mut self) -> u16 {
        loop {
            match self.next().await.expect("a close frame") {
                (CLOSE, payload) => return u16::from_be_bytes([payload[0], payload[1]]),
                _ => continue,
            }
        }
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.tcp.write_all(bytes).await.unwrap();
    }
}

#[tokio::test]
async fn a_frame_behind_the_handshake_and_one_sent_byte_by_byte() {
    let srv = TestServer::start().await;
    let sub = text(&json!({"type":"sub","topic":"a/b","id":1}));
    let mut c = Raw::connect(&srv, &sub).await;
    assert_eq!(c.json().await, json!({"type":"ack","id":1}));
    for byte in text(&json!({"type":"ping","id":2})) {
        c.send(&[byte]).await;
    }
    let pong = c.json().await;
    assert_eq!(
        (pong["type"].as_str(), pong["id"].as_i64()),
        (Some("pong"), Some(2))
    );
    srv.publish("a/b", json!({"v":1})).await;
    assert_eq!(c.json().await["payload"], json!({"v":1}));
    srv.stop().await;
}

#[tokio::test]
async fn fragments_with_a_ping_in_between_make_one_message() {
    let srv = TestServer::start().await;
    let mut c = Raw::connect(&srv, b"").await;
    let request = json!({"type":"sub","topic":"x/y","id":"frag"}).to_string();
    let (a, rest) = request.as_bytes().split_at(5);
    let (b, d) = rest.split_at(7);
    let mut wire = frame(false, TEXT, a);
    wire.extend(frame(false, 0x0, b));
    wire.extend(frame(true, PING, b"hello"));
    wire.extend(frame(true, 0x0, d));
    c.send(&wire).await;
    // The ping came before the message ended: its pong comes first.
    assert_eq!(c.answer().await, (PONG, b"hello".to_vec()));
    assert_eq!(
        c.answer().await,
        (TEXT, br#"{"type":"ack","id":"frag"}"#.to_vec())
    );
    srv.stop().await;
}

#[tokio::test]
async fn messages_larger_than_the_read_buffer_arrive_whole() {
    let srv =
        TestServer::start_toml("[acl.sensor]\npublish = [\"big\"]\nsubscribe = [\"big\"]\n").await;
    let mut c = Raw::connect_as(&srv, "sensor", b"").await;
    c.send(&text(&json!({"type":"sub","topic":"big","id":1})))
        .await;
    assert_eq!(c.json().await["type"], "ack");
    // 60 000 bytes: several reads of the server's 16 KiB buffer, under
    // the 64 KiB message limit; sent in two writes.
    let pad = "x".repeat(60_000);
    let wire = text(&json!({"type":"pub","topic":"big","payload":{"pad":pad},"id":2}));
    let (head, tail) = wire.split_at(wire.len() / 3);
    c.send(head).await;
    c.send(tail).await;
    let mut got = [c.json().await, c.json().await];
    got.sort_by_key(|v| v["type"].is_string());
    assert_eq!(
        got[0]["payload"]["pad"].as_str().map(str::len),
        Some(60_000)
    );
    assert_eq!(got[1], json!({"type":"ack","id":2}));
    srv.stop().await;
}

#[tokio::test]
async fn frames_a_server_must_refuse_close_with_1002() {
    let srv = TestServer::start().await;
    let unmasked = vec![0x81, 0x02, b'{', b'}'];
    let mut reserved = text(&json!({"type":"ping"}));
    reserved[0] |= 0x40;
    let orphan_continuation = frame(true, 0x0, b"{}");
    let mut interleaved = frame(false, TEXT, b"{");
    interleaved.extend(frame(true, TEXT, b"{}"));
    let fragmented_ping = frame(false, PING, b"");
    for bad in [
        unmasked,
        reserved,
        orphan_continuation,
        interleaved,
        fragmented_ping,
    ] {
        let mut c = Raw::connect(&srv, b"").await;
        c.send(&bad).await;
        assert_eq!(c.close_code().await, 1002, "{bad:?}");
        assert_eq!(c.next().await, None, "closed after the close frame");
    }
    srv.until("tables empty", |gw| gw.hub.stats() == Default::default())
        .await;
    srv.stop().await;
}

#[tokio::test]
async fn invalid_utf8_closes_with_1007_and_binary_is_answered() {
    let srv = TestServer::start().await;
    let mut c = Raw::connect(&srv, b"").await;
    c.send(&frame(true, BINARY, &[1, 2, 3])).await;
    assert_eq!(c.json().await["code"], "unsupported_binary");
    c.send(&frame(true, TEXT, &[b'"', 0xC3, 0x28, b'"'])).await;
    assert_eq!(c.close_code().await, 1007);
    srv.stop().await;
}

/// A close frame whose reason is not UTF-8 is answered with 1007, as a
/// text message would be (RFC 6455 §8.1), on `/ws` and on Socket.IO.
#[tokio::test]
async fn a_close_reason_that_is_not_utf8_is_answered_with_1007() {
    let srv = TestServer::start().await;
    let mut payload = 1000u16.to_be_bytes().to_vec();
    payload.extend_from_slice(&[0xFF, 0xFE]);
    let bad_close = frame(true, CLOSE, &payload);
    let mut ws = Raw::connect(&srv, &bad_close).await;
    assert_eq!(ws.close_code().await, 1007);
    assert_eq!(ws.next().await, None, "closed after the close frame");
    for eio in [3, 4] {
        let mut sio = Raw::upgrade(&srv, &sio_target(eio), b"").await;
        sio.send(&bad_close).await;
        assert_eq!(sio.close_code().await, 1007, "EIO={eio}");
        assert_eq!(
            sio.next().await,
            None,
            "EIO={eio}: closed after the close frame"
        );
    }
    srv.stop().await;
}

#[tokio::test]
async fn a_client_close_is_answered_with_its_code() {
    let srv = TestServer::start().await;
    let mut c = Raw::connect(&srv, b"").await;
    let mut payload = 4000u16.to_be_bytes().to_vec();
    payload.extend_from_slice(b"bye");
    c.send(&frame(true, CLOSE, &payload)).await;
    assert_eq!(c.close_code().await, 4000);
    assert_eq!(c.next().await, None);
    // A ping right before the close is still owed its pong (RFC 6455
    // §5.5.2), ahead of the close frame.
    let mut wire = frame(true, PING, b"last");
    wire.extend(frame(true, CLOSE, &1000u16.to_be_bytes()));
    let mut c = Raw::connect(&srv, &wire).await;
    assert_eq!(c.answer().await, (PONG, b"last".to_vec()));
    assert_eq!(c.close_code().await, 1000);
    srv.until("tables empty", |gw| gw.hub.stats() == Default::default())
        .await;
    srv.stop().await;
}

#[tokio::test]
async fn a_plain_get_is_told_to_upgrade() {
    let srv = TestServer::start().await;
    let url = format!("{}?token={}", srv.url("/ws"), srv.token("assistant", "1"));
    let (status, body) = get_json(&url, None).await;
    assert_eq!(status, 426);
    assert_eq!(body["error"]["code"], "upgrade_required");
    srv.stop().await;
}

#[tokio::test]
async fn a_client_that_stops_reading_is_closed_even_while_a_write_is_blocked() {
    let srv = TestServer::start_toml("[ws]\noutbound_queue = 4\n").await;
    let mut c = Raw::connect(&srv, b"").await;
    c.send(&text(&json!({"type":"sub","topic":"flood","id":1})))
        .await;
    assert_eq!(c.json().await["type"], "ack");
    // From here the client reads nothing: the kernel's buffers fill, the
    // server's write blocks with frames in hand, then its outbox fills.
    let pad = "x".repeat(60_000);
    for i in 0..400 {
        let (status, _) = srv.publish("flood", json!({"i": i, "pad": pad})).await;
        assert_eq!(status, 200);
        if srv.gw.hub.stats().connections == 0 {
            break;
        }
    }
    srv.until("slow client closed", |gw| gw.hub.stats().connections == 0)
        .await;
    srv.stop().await;
}

/// The handshake's own checks (RFC 6455 §4.2.1, §4.4), the same on `/ws`
/// and on Socket.IO's WebSocket transport: a key that is not base64 of
/// exactly 16 bytes is 400; a version other than 13 is 426 naming 13.
#[tokio::test]
async fn a_bad_key_is_400_and_another_version_is_426_naming_13() {
    use base64::Engine;
    let srv = TestServer::start().await;
    let b64 = |n: usize| base64::engine::general_purpose::STANDARD.encode(vec![0xA5u8; n]);
    let targets = [
        format!("/ws?token={}", srv.token("assistant", "raw")),
        sio_target(4),
        sio_target(3),
    ];
    for target in &targets {
        for key in ["abc".to_string(), String::new(), b64(15), b64(17)] {
            let (_, head) = Raw::request(&srv, &upgrade_request(&srv, target, "13", &key)).await;
            assert!(
                head.starts_with("HTTP/1.1 400"),
                "{target} key {key:?}: {head}"
            );
        }
        let (_, head) = Raw::request(&srv, &upgrade_request(&srv, target, "8", KEY)).await;
        assert!(head.starts_with("HTTP/1.1 426"), "{target}: {head}");
        assert!(
            head.to_ascii_lowercase()
                .contains("\r\nsec-websocket-version: 13"),
            "{target}: {head}"
        );
        // The same request with version 13 and a 16-byte key is accepted.
        Raw::upgrade(&srv, target, b"").await;
        let mut good = Raw::request(&srv, &upgrade_request(&srv, target, "13", &b64(16))).await;
        assert!(good.1.starts_with("HTTP/1.1 101"), "{target}: {}", good.1);
        good.0
            .send(&frame(true, CLOSE, &1000u16.to_be_bytes()))
            .await;
        assert_eq!(good.0.close_code().await, 1000);
    }
    srv.stop().await;
}

/// A ping frame and a JSON `ping` in one write: both answered, in the order
/// they came (the RFC pong carries the ping's payload), either way round.
#[tokio::test]
async fn a_ping_frame_and_a_json_ping_together_are_both_answered_in_order() {
    let srv = TestServer::start().await;
    let mut c = Raw::connect(&srv, b"").await;
    let mut wire = frame(true, PING, b"rfc");
    wire.extend(text(&json!({"type":"ping","id":1})));
    c.send(&wire).await;
    assert_eq!(c.answer().await, (PONG, b"rfc".to_vec()));
    let pong = c.json().await;
    assert_eq!(
        (pong["type"].as_str(), pong["id"].as_i64()),
        (Some("pong"), Some(1))
    );

    let mut wire = text(&json!({"type":"ping","id":2}));
    wire.extend(frame(true, PING, b"rfc2"));
    c.send(&wire).await;
    let pong = c.json().await;
    assert_eq!(
        (pong["type"].as_str(), pong["id"].as_i64()),
        (Some("pong"), Some(2))
    );
    assert_eq!(c.answer().await, (PONG, b"rfc2".to_vec()));
    srv.stop().await;
}

/// The same on Socket.IO's WebSocket with Engine.IO's own ping `2` (sent by
/// Engine.IO 3 clients; answered on Engine.IO 4 too): the RFC pong and the
/// `3` never displace each other.
#[tokio::test]
async fn a_ping_frame_and_an_engine_io_ping_together_are_both_answered_in_order() {
    let srv = TestServer::start().await;
    for eio in [3, 4] {
        let mut c = Raw::sio(&srv, eio).await;
        let mut wire = frame(true, PING, b"rfc");
        wire.extend(frame(true, TEXT, b"2"));
        c.send(&wire).await;
        assert_eq!(c.answer().await, (PONG, b"rfc".to_vec()), "EIO={eio}");
        assert_eq!(c.answer().await, (TEXT, b"3".to_vec()), "EIO={eio}");

        let mut wire = frame(true, TEXT, b"2x");
        wire.extend(frame(true, PING, b"rfc2"));
        c.send(&wire).await;
        assert_eq!(c.answer().await, (TEXT, b"3x".to_vec()), "EIO={eio}");
        assert_eq!(c.answer().await, (PONG, b"rfc2".to_vec()), "EIO={eio}");
    }
    srv.stop().await;
}

/// While a polling session is being upgraded, the probe's `3probe` and the
/// RFC pong do not displace each other either; after the upgrade, a ping
/// frame and a `2` are both answered as on a direct WebSocket.
#[tokio::test]
async fn a_ping_frame_and_a_probe_together_are_both_answered() {
    let srv = TestServer::start().await;
    let open = reqwest::get(srv.url("/socket.io/?EIO=4&transport=polling"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let open: Value = serde_json::from_str(open.strip_prefix('0').expect("OPEN")).unwrap();
    let sid = open["sid"].as_str().unwrap();
    let target = format!("{}&sid={sid}", sio_target(4));
    let mut wire = frame(true, PING, b"rfc");
    wire.extend(frame(true, TEXT, b"2probe"));
    let mut c = Raw::upgrade(&srv, &target, &wire).await;
    assert_eq!(c.answer().await, (PONG, b"rfc".to_vec()));
    assert_eq!(c.answer().await, (TEXT, b"3probe".to_vec()));
    let mut wire = frame(true, TEXT, b"5");
    wire.extend(frame(true, PING, b"rfc2"));
    wire.extend(frame(true, TEXT, b"2"));
    c.send(&wire).await;
    assert_eq!(c.answer().await, (PONG, b"rfc2".to_vec()));
    assert_eq!(c.answer().await, (TEXT, b"3".to_vec()));
    srv.stop().await;
}

/// Many pings in one write. Ping frames with nothing between them share one
/// pong (the latest, as RFC 6455 allows), so thousands cost one; each
/// Engine.IO `2` gets its `3`, and a ping frame before each keeps its own
/// pong ahead of it.
#[tokio::test]
async fn many_pings_in_one_write_are_answered_sensibly() {
    let srv = TestServer::start().await;
    let mut c = Raw::connect(&srv, b"").await;
    let n = 5000;
    let mut wire = Vec::new();
    for i in 0..n {
        wire.extend(frame(true, PING, i.to_string().as_bytes()));
    }
    wire.extend(text(&json!({"type":"ping","id":"after"})));
    c.send(&wire).await;
    let mut pongs = Vec::new();
    let json = loop {
        match c.answer().await {
            (PONG, p) => pongs.push(String::from_utf8(p).unwrap().parse::<u32>().unwrap()),
            (TEXT, p) => break serde_json::from_slice::<Value>(&p).unwrap(),
            other => panic!("{other:?}"),
        }
    };
    assert_eq!(json["id"], "after");
    assert_eq!(pongs.last(), Some(&(n - 1)), "the latest ping is answered");
    assert!(pongs.is_sorted(), "{pongs:?}");
    // One per read of the server's at most; far fewer than the pings.
    assert!(pongs.len() < 100, "{} pongs for {n} pings", pongs.len());

    for eio in [3, 4] {
        let mut c = Raw::sio(&srv, eio).await;
        let n = 300;
        let mut wire = Vec::new();
        for i in 0..n {
            wire.extend(frame(true, PING, format!("p{i}").as_bytes()));
            wire.extend(frame(true, TEXT, format!("2{i}").as_bytes()));
        }
        c.send(&wire).await;
        for i in 0..n {
            let ping = format!("p{i}").into_bytes();
            assert_eq!(c.answer().await, (PONG, ping), "EIO={eio}");
            let heartbeat = format!("3{i}").into_bytes();
            assert_eq!(c.answer().await, (TEXT, heartbeat), "EIO={eio}");
        }
    }
    srv.stop().await;
}

/// Engine.IO pings are replies like any other: a flood from a client that
/// does not read them fills its outbound queue, and the connection is closed
/// as a slow consumer (1013) rather than buffered without bound.
#[tokio::test]
async fn an_engine_io_ping_flood_is_bounded_by_the_outbound_queue() {
    let srv = TestServer::start_toml("[ws]\noutbound_queue = 8\n").await;
    let mut c = Raw::sio(&srv, 3).await;
    let mut wire = Vec::new();
    for _ in 0..2000 {
        wire.extend(frame(true, TEXT, b"2"));
    }
    c.send(&wire).await;
    let mut answered = 0;
    loop {
        match c.answer().await {
            (TEXT, p) if p == b"3" => answered += 1,
            (CLOSE, p) => {
                assert_eq!(u16::from_be_bytes([p[0], p[1]]), 1013);
                break;
            }
            other => panic!("{other:?}"),
        }
    }
    assert!(answered <= 8, "{answered} answers queued past the limit");
    srv.stop().await;
}
