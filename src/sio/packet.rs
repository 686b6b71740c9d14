//! Engine.IO and Socket.IO packets as text, for pulso's own WebSocket
//! transport (`websocket`): parsed in place, and encoded straight into a
//! WebSocket frame. Engine.IO 3 and 4 frame packets alike over WebSocket;
//! they differ only in the heartbeat direction and in the CONNECT and error
//! packets (Socket.IO protocol 4 vs 5), which the encoders take as `eio3`.

use bytes::Bytes;
use serde_json::value::RawValue;

use crate::hub::{FrameSlot, Message};
use crate::transport::encoding::{self, Encoding};
use crate::transport::frame::encode_text_with;

/// Engine.IO packet types (the first character of a text frame).
pub mod engine {
    pub const OPEN: u8 = b'0';
    pub const CLOSE: u8 = b'1';
    pub const PING: u8 = b'2';
    pub const PONG: u8 = b'3';
    pub const MESSAGE: u8 = b'4';
    pub const UPGRADE: u8 = b'5';
    pub const NOOP: u8 = b'6';
}

/// Socket.IO packet types (the character after Engine.IO's `4`).
pub mod kind {
    pub const CONNECT: u8 = b'0';
    pub const DISCONNECT: u8 = b'1';
    pub const EVENT: u8 = b'2';
    pub const ACK: u8 = b'3';
    pub const BINARY_EVENT: u8 = b'5';
    pub const BINARY_ACK: u8 = b'6';
}

/// The server's Engine.IO 4 ping, as a whole WebSocket frame (`2`).
pub const PING_FRAME: &[u8] = &[0x81, 1, b'2'];

/// A Socket.IO packet, borrowing from the text it was parsed from.
#[derive(Debug, PartialEq)]
pub struct Packet<'a> {
    pub kind: u8,
    /// `/` or `/name`, without a CONNECT packet's `?query`.
    pub nsp: &'a str,
    pub ack: Option<u64>,
    /// The JSON that follows (may be empty).
    pub data: &'a str,
}

/// Parses a Socket.IO packet (what follows Engine.IO's `4`).
pub fn parse(text: &str) -> Result<Packet<'_>, &'static str> {
    let bytes = text.as_bytes();
    let kind = *bytes.first().ok_or("empty packet")?;
    if !(b'0'..=b'6').contains(&kind) {
        return Err("unknown packet type");
    }
    let mut rest = &text[1..];
    if kind == kind::BINARY_EVENT || kind == kind::BINARY_ACK {
        // `<attachments>-`: only skipped; binary payloads are refused.
        let dash = rest
            .find('-')
            .ok_or("binary packet without attachment count")?;
        rest = &rest[dash + 1..];
    }
    let mut nsp = "/";
    if rest.starts_with('/') {
        let end = rest.find(',').unwrap_or(rest.len());
        let name = &rest[..end];
        nsp = name.split_once('?').map_or(name, |(n, _)| n);
        rest = rest.get(end + 1..).unwrap_or("");
    }
    let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
    let ack = if digits > 0 {
        Some(rest[..digits].parse().map_err(|_| "ack id too large")?)
    } else {
        None
    };
    Ok(Packet {
        kind,
        nsp,
        ack,
        data: &rest[digits..],
    })
}

/// Event arguments as JSON values: `["name", arg, ...]`.
pub fn event_args(data: &str) -> Option<(String, Vec<Box<RawValue>>)> {
    let mut items: Vec<Box<RawValue>> = serde_json::from_str(data).ok()?;
    if items.is_empty() {
        return None;
    }
    let name: String = serde_json::from_str(items.remove(0).get()).ok()?;
    Some((name, items))
}

/// Appends `4<type>[/nsp,]` (the root namespace is implicit).
fn head(out: &mut Vec<u8>, kind: u8, nsp: &str) {
    out.push(engine::MESSAGE);
    out.push(kind);
    if nsp != "/" {
        out.extend_from_slice(nsp.as_bytes());
        out.push(b',');
    }
}

/// Engine.IO's OPEN packet; `upgrades` offers WebSocket to a polling client.
pub fn open(
    sid: &str,
    upgrades: bool,
    ping_interval_ms: u128,
    ping_timeout_ms: u128,
    max_payload: usize,
) -> Bytes {
    let upgrades = if upgrades { "[\"websocket\"]" } else { "[]" };
    let text = format!(
        "0{{\"sid\":\"{sid}\",\"upgrades\":{upgrades},\"pingInterval\":{ping_interval_ms},\"pingTimeout\":{ping_timeout_ms},\"maxPayload\":{max_payload}}}"
    );
    encode_text_with(text.len(), |out| out.extend_from_slice(text.as_bytes()))
}

/// A successful CONNECT answer; protocol 5 names the socket's id and, when
/// connection state recovery is on, its private session id
/// (`{"sid":…,"pid":…}`, as socket.io v4 sends it). Both are ours (URL-safe
/// characters), so they need no escaping.
pub fn connected(nsp: &str, sid: &str, pid: Option<&str>, eio3: bool) -> Bytes {
    encode_text_with(48 + nsp.len(), |out| {
        head(out, kind::CONNECT, nsp);
        if !eio3 {
            out.extend_from_slice(b"{\"sid\":\"");
            out.extend_from_slice(sid.as_bytes());
            if let Some(pid) = pid {
                out.extend_from_slice(b"\",\"pid\":\"");
                out.extend_from_slice(pid.as_bytes());
            }
            out.extend_from_slice(b"\"}");
        }
    })
}

/// The longest `pid` and `offset` a CONNECT's auth may carry to recover a
/// session (ours are far shorter); anything longer is not looked at.
pub const MAX_RECOVERY_FIELD: usize = 64;

/// What socket.io-client (≥ 4.6) sends in its CONNECT packet's auth when it
/// reconnects after it was told a `pid`: `{"pid":"…","offset":"…"}`, merged
/// with the application's own auth fields (ignored here). The offset is
/// the last argument of the last event it received, if it was a string;
/// without one (it has seen no event yet) there is nothing to recover from.
#[derive(Debug, PartialEq)]
pub struct Recovery<'a> {
    pub pid: &'a str,
    pub offset: &'a str,
}

/// The recovery fields of a CONNECT packet's data, if both are present,
/// strings, and not too long. A client never gets more than a refusal from
/// this: any other shape connects it as new.
pub fn recovery(data: &str) -> Option<Recovery<'_>> {
    // Borrowed from the packet: a pid or offset with an escape (never one
    // of ours) fails to parse, and the client connects as new. The
    // application's other fields are skipped without being built.
    #[derive(serde::Deserialize)]
    struct Auth<'a> {
        #[serde(borrow, default)]
        pid: Option<&'a str>,
        #[serde(borrow, default)]
        offset: Option<&'a str>,
    }
    // A derived struct would also take a JSON array; auth is an object.
    if !data.trim_start().starts_with('{') {
        return None;
    }
    let auth: Auth<'_> = serde_json::from_str(data).ok()?;
    let (pid, offset) = (auth.pid?, auth.offset?);
    (pid.len() <= MAX_RECOVERY_FIELD && offset.len() <= MAX_RECOVERY_FIELD)
        .then_some(Recovery { pid, offset })
}

/// An event's offset as pulso writes it: `<epoch>:<sequence>` (see
/// [`Events`]); `None` for any other text.
pub fn parse_offset(offset: &str) -> Option<(&str, u64)> {
    let (epoch, n) = offset.rsplit_once(':')?;
    if epoch.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((epoch, n.parse().ok()?))
}

/// A refused CONNECT.
pub fn connect_error(nsp: &str, message: &str, eio3: bool) -> Bytes {
    let message = serde_json::to_string(message).unwrap_or_else(|_| "\"\"".into());
    encode_text_with(32 + nsp.len() + message.len(), |out| {
        head(out, b'4', nsp);
        if eio3 {
            out.extend_from_slice(message.as_bytes());
        } else {
            out.extend_from_slice(b"{\"message\":");
            out.extend_from_slice(message.as_bytes());
            out.push(b'}');
        }
    })
}

pub fn disconnect(nsp: &str) -> Bytes {
    encode_text_with(8 + nsp.len(), |out| head(out, kind::DISCONNECT, nsp))
}

/// An ACK with one argument.
pub fn ack(nsp: &str, id: u64, arg: &serde_json::Value) -> Bytes {
    let arg = serde_json::to_string(arg).unwrap_or_else(|_| "null".into());
    encode_text_with(32 + nsp.len() + arg.len(), |out| {
        head(out, kind::ACK, nsp);
        out.extend_from_slice(id.to_string().as_bytes());
        out.push(b'[');
        out.extend_from_slice(arg.as_bytes());
        out.push(b']');
    })
}

/// An Engine.IO PONG echoing a client PING's data (Engine.IO 3).
pub fn pong(data: &str) -> Bytes {
    encode_text_with(1 + data.len(), |out| {
        out.push(engine::PONG);
        out.extend_from_slice(data.as_bytes());
    })
}

/// Socket.IO's encoding of published messages in one namespace: the whole
/// frame of the event `42/nsp,["event",payload]` (event `message` when it
/// has none).
///
/// A message of a publish that `history.topics` tracks ends with its
/// offset, `42/nsp,["event",payload,"<epoch>:<sequence>"]`, as socket.io v4
/// appends one when connection state recovery is on: socket.io-client keeps
/// the last argument of every event that is a string and sends it back
/// when it reconnects. The offset is the publish's node-global sequence
/// (see `hub::history::Seq`), since the client keeps one offset for all
/// its rooms; it depends on the message only, so the frame is still built
/// once per message and namespace.
pub struct Events {
    nsp: &'static str,
    slot: FrameSlot,
}

/// Events in the root namespace.
pub static ROOT_EVENTS: Events = Events {
    nsp: "/",
    slot: encoding::slot::SIO_ROOT,
};

impl Events {
    /// Events in the notifications namespace `nsp` (never the root).
    pub fn namespace(nsp: &'static str) -> Events {
        Events {
            nsp,
            slot: encoding::slot::SIO_NAMESPACE,
        }
    }
}

impl Encoding for Events {
    fn slot(&self) -> FrameSlot {
        self.slot
    }

    fn encode(&self, msg: &Message) -> Bytes {
        let payload = msg.payload.get();
        let event = msg.event.as_deref().unwrap_or("message");
        encode_text_with(payload.len() + event.len() + self.nsp.len() + 16, |out| {
            head(out, kind::EVENT, self.nsp);
            out.push(b'[');
            if serde_json::to_writer(&mut *out, event).is_err() {
                out.extend_from_slice(b"\"message\"");
            }
            out.push(b',');
            out.extend_from_slice(payload.as_bytes());
            if let Some(seq) = &msg.seq {
                // The epoch is ours, of URL-safe characters: no escaping.
                out.extend_from_slice(b",\"");
                out.extend_from_slice(seq.epoch.as_bytes());
                out.push(b':');
                out.extend_from_slice(seq.n.to_string().as_bytes());
                out.push(b'"');
            }
            out.push(b']');
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::payload_of;
    use rand::Rng;
    use std::sync::Arc;

    fn text(frame: &[u8]) -> &str {
        std::str::from_utf8(&frame[2..]).unwrap()
    }

    #[test]
    fn parses_the_packets_clients_send() {
        let p = parse("0/notifications?__sails_io_sdk_version=1.2.1,").unwrap();
        assert_eq!(
            (p.kind, p.nsp, p.ack, p.data),
            (b'0', "/notifications", None, "")
        );
        let p = parse("2/notifications,17[\"get\",{\"url\":\"/n\"}]").unwrap();
        assert_eq!((p.kind, p.nsp, p.ack), (b'2', "/notifications", Some(17)));
        assert_eq!(p.data, "[\"get\",{\"url\":\"/n\"}]");
        let p = parse("2[\"x\"]").unwrap();
        assert_eq!((p.nsp, p.ack, p.data), ("/", None, "[\"x\"]"));
        let p = parse("0{\"token\":1}").unwrap();
        assert_eq!((p.nsp, p.data), ("/", "{\"token\":1}"));
        let p = parse("51-/notifications,3[\"get\",{\"_placeholder\":true,\"num\":0}]").unwrap();
        assert_eq!((p.kind, p.nsp, p.ack), (b'5', "/notifications", Some(3)));
        let p = parse("1/notifications,").unwrap();
        assert_eq!((p.kind, p.nsp, p.data), (b'1', "/notifications", ""));
        assert!(parse("").is_err());
        assert!(parse("9").is_err());
        assert!(parse("2/n,99999999999999999999999[]").is_err());
        assert!(parse("5/n,[]").is_err());
    }

    /// Client input: random text built from the characters that matter to
    /// the parser (and multi-byte ones) never panics, and what parses
    /// borrows from the input.
    #[test]
    fn random_packets_never_panic() {
        let mut rng = crate::test_seed::rng("random_packets_never_panic");
        const PIECES: [&str; 14] = [
            "0",
            "2",
            "5",
            "9",
            "-",
            "/",
            ",",
            "?",
            "[",
            "]",
            "\"",
            "é",
            "€",
            "notifications",
        ];
        for _ in 0..20_000 {
            let len = rng.random_range(0..12);
            let text: String = (0..len)
                .map(|_| PIECES[rng.random_range(0..PIECES.len())])
                .collect();
            if let Ok(p) = parse(&text) {
                assert!(p.nsp.starts_with('/'), "{text:?} -> {p:?}");
                let _ = event_args(p.data);
            }
        }
    }

    #[test]
    fn event_args_split_the_name() {
        let (name, args) = event_args(r#"["get",{"a":1},2]"#).unwrap();
        assert_eq!(name, "get");
        assert_eq!(args.len(), 2);
        assert_eq!(args[0].get(), r#"{"a":1}"#);
        assert!(event_args("[]").is_none());
        assert!(event_args("[1]").is_none());
        assert!(event_args("{}").is_none());
    }

    #[test]
    fn encodes_what_clients_expect() {
        assert_eq!(
            text(&connected("/notifications", "abc", None, false)),
            r#"40/notifications,{"sid":"abc"}"#
        );
        assert_eq!(
            text(&connected("/notifications", "abc", Some("p1"), false)),
            r#"40/notifications,{"sid":"abc","pid":"p1"}"#
        );
        assert_eq!(
            text(&connected("/notifications", "abc", None, true)),
            "40/notifications,"
        );
        assert_eq!(text(&connected("/", "abc", None, true)), "40");
        assert_eq!(
            text(&connected("/", "abc", None, false)),
            r#"40{"sid":"abc"}"#
        );
        assert_eq!(
            text(&connect_error("/x", "Invalid namespace", false)),
            r#"44/x,{"message":"Invalid namespace"}"#
        );
        assert_eq!(
            text(&connect_error("/x", "Invalid namespace", true)),
            r#"44/x,"Invalid namespace""#
        );
        assert_eq!(text(&disconnect("/n")), "41/n,");
        assert_eq!(
            text(&ack("/n", 7, &serde_json::json!({"a":1}))),
            r#"43/n,7[{"a":1}]"#
        );
        assert_eq!(text(&pong("probe")), "3probe");
        assert_eq!(text(PING_FRAME), "2");
        let msg = Arc::new(Message::new(
            "t".into(),
            Some("ev\"".into()),
            payload_of(&[1, 2]),
        ));
        let ns = Events::namespace("/n");
        assert_eq!(text(encoding::frame(&msg, &ns)), r#"42/n,["ev\"",[1,2]]"#);
        let msg = Message::new("t".into(), None, payload_of(&"x"));
        assert_eq!(
            text(encoding::frame(&msg, &ROOT_EVENTS)),
            r#"42["message","x"]"#
        );
        // One message, two namespaces: each gets its own frame.
        assert_eq!(text(encoding::frame(&msg, &ns)), r#"42/n,["message","x"]"#);
        assert_eq!(
            text(encoding::frame(&msg, &ROOT_EVENTS)),
            r#"42["message","x"]"#
        );
    }

    #[test]
    fn tracked_events_end_with_their_offset_and_reconnects_carry_it_back() {
        let mut msg = Message::new("t".into(), Some("ev".into()), payload_of(&"x"));
        msg.seq = Some(crate::hub::history::Seq {
            epoch: "E-1_a".into(),
            n: 42,
        });
        let ns = Events::namespace("/n");
        assert_eq!(
            text(encoding::frame(&msg, &ns)),
            r#"42/n,["ev","x","E-1_a:42"]"#
        );
        assert_eq!(
            text(encoding::frame(&msg, &ROOT_EVENTS)),
            r#"42["ev","x","E-1_a:42"]"#
        );
        assert_eq!(parse_offset("E-1_a:42"), Some(("E-1_a", 42)));
        for bad in [
            "",
            "E",
            ":1",
            "E:",
            "E:-1",
            "E:1x",
            "E:99999999999999999999999",
        ] {
            assert_eq!(parse_offset(bad), None, "{bad}");
        }

        let p = parse(r#"0/n,{"token":"t","pid":"P","offset":"E:3"}"#).unwrap();
        assert_eq!(
            recovery(p.data),
            Some(Recovery {
                pid: "P",
                offset: "E:3"
            })
        );
        let long = "p".repeat(MAX_RECOVERY_FIELD + 1);
        for data in [
            "".to_string(),
            "{}".into(),
            r#"{"pid":"P"}"#.into(),
            r#"{"pid":"P","offset":3}"#.into(),
            r#"{"pid":null,"offset":"E:3"}"#.into(),
            r#"{"pid":"P\u0041","offset":"E:3"}"#.into(),
            r#"["P","E:3"]"#.into(),
            format!(r#"{{"pid":"{long}","offset":"E:3"}}"#),
            "{\"pid\":".into(),
        ] {
            assert_eq!(recovery(&data), None, "{data}");
        }
    }
}
