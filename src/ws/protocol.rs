//! The `/ws` wire format: client requests in, replies and messages out.
//!
//! Parsing is lenient field by field so that a request with one bad field is
//! still answered with its `id`; only text that is not a JSON object at all
//! loses it.

use std::borrow::Cow;
use std::sync::Arc;

use bytes::Bytes;
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::hub::history::Since;
use crate::hub::topic::{self, Filter};
use crate::hub::{FrameSlot, Message};
use crate::transport::encoding::{self, Encoding};
use crate::transport::frame;

/// An error answered to the client with a stable code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientError {
    pub code: &'static str,
    pub message: Cow<'static, str>,
}

impl ClientError {
    pub fn new(code: &'static str, message: impl Into<Cow<'static, str>>) -> Self {
        ClientError {
            code,
            message: message.into(),
        }
    }

    fn bad_request(message: impl Into<Cow<'static, str>>) -> Self {
        Self::new("bad_request", message)
    }
}

#[derive(Debug)]
pub enum Request {
    /// With `since`, the client asks for what it missed (SPEC §11).
    Sub(Filter, Option<Since>),
    Unsub(Filter),
    Ping,
    Pub {
        topic: Arc<str>,
        event: Option<Arc<str>>,
        payload: Arc<RawValue>,
    },
    Auth(String),
}

/// A parsed client message: its `id` (raw JSON, echoed as is) and what it asks.
#[derive(Debug)]
pub struct Parsed<'a> {
    pub id: Option<&'a RawValue>,
    pub request: Result<Request, ClientError>,
}

#[derive(Deserialize)]
struct Envelope<'a> {
    #[serde(rename = "type", borrow)]
    kind: Option<&'a RawValue>,
    #[serde(borrow)]
    id: Option<&'a RawValue>,
    #[serde(borrow)]
    topic: Option<&'a RawValue>,
    #[serde(borrow)]
    payload: Option<&'a RawValue>,
    #[serde(borrow)]
    token: Option<&'a RawValue>,
    #[serde(borrow)]
    event: Option<&'a RawValue>,
    #[serde(borrow)]
    since: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct SinceField {
    offset: u64,
    epoch: String,
}

pub fn parse(text: &str) -> Parsed<'_> {
    let env: Envelope<'_> = match serde_json::from_str(text) {
        Ok(env) => env,
        Err(e) => {
            let msg = if e.is_data() {
                format!("message must be a JSON object: {e}")
            } else {
                format!("message is not valid JSON: {e}")
            };
            return Parsed {
                id: None,
                request: Err(ClientError::bad_request(msg)),
            };
        }
    };
    // An id is echoed as the client wrote it: a number beyond a double's
    // range, or a string with a lone surrogate escape (`"\uDAAA"`), is
    // valid JSON text that many clients (and serde_json) cannot read back,
    // so it is refused like any other kind of id.
    let id = env.id.filter(|raw| {
        let text = raw.get();
        let first = text.as_bytes().first().copied().unwrap_or(b' ');
        match first {
            b'"' => serde_json::from_str::<String>(text).is_ok(),
            b'-' | b'0'..=b'9' => text.parse::<f64>().is_ok_and(f64::is_finite),
            _ => false,
        }
    });
    let request = if env.id.is_some() && id.is_none() {
        Err(ClientError::bad_request(
            "`id` must be a string of Unicode characters or a number within a double's range",
        ))
    } else {
        request(&env)
    };
    Parsed { id, request }
}

fn string_field<'a>(
    raw: Option<&'a RawValue>,
    name: &'static str,
) -> Result<Option<Cow<'a, str>>, ClientError> {
    match raw {
        None => Ok(None),
        Some(raw) => serde_json::from_str::<Cow<'a, str>>(raw.get())
            .map(Some)
            .map_err(|_| ClientError::bad_request(format!("`{name}` must be a string"))),
    }
}

fn required<'a>(
    raw: Option<&'a RawValue>,
    name: &'static str,
) -> Result<Cow<'a, str>, ClientError> {
    string_field(raw, name)?
        .ok_or_else(|| ClientError::bad_request(format!("missing field `{name}`")))
}

fn request(env: &Envelope<'_>) -> Result<Request, ClientError> {
    let kind = required(env.kind, "type")?;
    let filter = || {
        let topic = required(env.topic, "topic")?;
        Filter::parse(&topic).map_err(|e| ClientError::new("invalid_topic", e))
    };
    match &*kind {
        "sub" => {
            let filter = filter()?;
            let since = match env.since {
                None => None,
                Some(raw) => {
                    let s: SinceField = serde_json::from_str(raw.get()).map_err(|_| {
                        ClientError::bad_request(
                            "`since` must be {\"offset\": <number>, \"epoch\": <string>}",
                        )
                    })?;
                    if filter.is_wildcard() {
                        return Err(ClientError::bad_request(
                            "`since` needs a topic name, not a wildcard filter",
                        ));
                    }
                    if s.epoch.len() > 256 {
                        return Err(ClientError::bad_request("`since.epoch` is too long"));
                    }
                    Some(Since {
                        offset: s.offset,
                        epoch: s.epoch,
                    })
                }
            };
            Ok(Request::Sub(filter, since))
        }
        "unsub" => Ok(Request::Unsub(filter()?)),
        "ping" => Ok(Request::Ping),
        "pub" => {
            let topic = required(env.topic, "topic")?;
            topic::validate_name(&topic).map_err(|e| ClientError::new("invalid_topic", e))?;
            let payload = env
                .payload
                .ok_or_else(|| ClientError::bad_request("missing field `payload`"))?;
            let event = string_field(env.event, "event")?;
            if let Some(e) = &event {
                topic::validate_name(e).map_err(|_| {
                    ClientError::bad_request(
                        "`event` must be 1-256 bytes without control characters",
                    )
                })?;
            }
            Ok(Request::Pub {
                topic: Arc::from(&*topic),
                event: event.map(|e| Arc::from(&*e)),
                payload: Arc::from(payload.to_owned()),
            })
        }
        "auth" => Ok(Request::Auth(required(env.token, "token")?.into_owned())),
        other => Err(ClientError::new(
            "unknown_type",
            format!(
                "unknown message type `{}`",
                other.chars().take(64).collect::<String>()
            ),
        )),
    }
}

fn push_id(out: &mut Vec<u8>, id: Option<&RawValue>) {
    if let Some(id) = id {
        out.extend_from_slice(b",\"id\":");
        out.extend_from_slice(id.get().as_bytes());
    }
}

pub fn ack(id: &RawValue) -> Bytes {
    text_frame(32, |out| {
        out.extend_from_slice(b"{\"type\":\"ack\",\"id\":");
        out.extend_from_slice(id.get().as_bytes());
        out.push(b'}');
    })
}

/// The ack of a `sub` with `since`: whether every missed message follows.
pub fn ack_recovered(id: Option<&RawValue>, recovered: bool) -> Bytes {
    text_frame(48, |out| {
        out.extend_from_slice(b"{\"type\":\"ack\"");
        push_id(out, id);
        out.extend_from_slice(if recovered {
            b",\"recovered\":true}"
        } else {
            b",\"recovered\":false}"
        });
    })
}

pub fn pong(id: Option<&RawValue>, ts: u64) -> Bytes {
    text_frame(48, |out| {
        out.extend_from_slice(b"{\"type\":\"pong\",\"ts\":");
        push_u64(out, ts);
        push_id(out, id);
        out.push(b'}');
    })
}

pub fn error(id: Option<&RawValue>, err: &ClientError) -> Bytes {
    text_frame(64 + err.message.len(), |out| {
        out.extend_from_slice(b"{\"type\":\"error\"");
        push_id(out, id);
        out.extend_from_slice(b",\"code\":\"");
        out.extend_from_slice(err.code.as_bytes());
        out.extend_from_slice(b"\",\"message\":");
        push_json_string(out, &err.message);
        out.push(b'}');
    })
}

/// A text frame of JSON written by `write`, header included.
fn text_frame(hint: usize, write: impl FnOnce(&mut Vec<u8>)) -> Bytes {
    frame::encode_text_with(hint, write)
}

/// `/ws`'s encoding of published messages: the whole frame, header
/// included, of `{"topic":…,"ts":…,"event"?:…,"payload":…}`.
pub struct Json;

/// The one `/ws` encoding, shared by every `/ws` outbox.
pub static JSON: Json = Json;

impl Encoding for Json {
    fn slot(&self) -> FrameSlot {
        encoding::slot::WS_JSON
    }

    fn encode(&self, msg: &Message) -> Bytes {
        let payload = msg.payload.get();
        // `,"offset":<up to 20 digits>,"epoch":"…"`: room for it at once.
        let position = msg.position.as_ref().map_or(0, |p| p.epoch.len() + 44);
        text_frame(payload.len() + msg.topic.len() + 48 + position, |out| {
            out.extend_from_slice(b"{\"topic\":");
            push_json_string(out, &msg.topic);
            out.extend_from_slice(b",\"ts\":");
            push_u64(out, msg.ts);
            if let Some(event) = &msg.event {
                out.extend_from_slice(b",\"event\":");
                push_json_string(out, event);
            }
            if let Some(p) = &msg.position {
                out.extend_from_slice(b",\"offset\":");
                push_u64(out, p.offset);
                out.extend_from_slice(b",\"epoch\":");
                push_json_string(out, &p.epoch);
            }
            out.extend_from_slice(b",\"payload\":");
            out.extend_from_slice(payload.as_bytes());
            out.push(b'}');
        })
    }
}

/// Appends `s` as a JSON string (writing to a `Vec` cannot fail). A
/// string with nothing to escape (topics, epochs) is copied as it is, as
/// serde_json would write it.
fn push_json_string(out: &mut Vec<u8>, s: &str) {
    if s.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\') {
        out.push(b'"');
        out.extend_from_slice(s.as_bytes());
        out.push(b'"');
    } else if serde_json::to_writer(&mut *out, s).is_err() {
        out.extend_from_slice(b"\"\"");
    }
}

/// Appends `n` in decimal, without allocating.
fn push_u64(out: &mut Vec<u8>, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[at..]);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::payload_of;
    use rand::Rng;
    use serde_json::{Value, json};

    fn code(text: &str) -> (Option<String>, &'static str) {
        let p = parse(text);
        (
            p.id.map(|i| i.get().to_string()),
            p.request.unwrap_err().code,
        )
    }

    #[test]
    fn good_requests() {
        let p = parse(r#"{"type":"sub","topic":"a/#","id":1}"#);
        assert_eq!(p.id.unwrap().get(), "1");
        assert!(matches!(p.request, Ok(Request::Sub(f, None)) if f.as_str() == "a/#"));
        let p = parse(r#"{"type":"pub","topic":"a","payload":{"x":[1,2]},"event":"e"}"#);
        match p.request.unwrap() {
            Request::Pub {
                topic,
                event,
                payload,
            } => {
                assert_eq!(&*topic, "a");
                assert_eq!(event.as_deref(), Some("e"));
                assert_eq!(payload.get(), r#"{"x":[1,2]}"#);
            }
            other => panic!("{other:?}"),
        }
        assert!(
            matches!(parse(r#"{"type":"auth","token":"t"}"#).request, Ok(Request::Auth(t)) if t == "t")
        );
        assert!(matches!(
            parse(r#"{"type":"ping","id":"x"}"#).request,
            Ok(Request::Ping)
        ));
    }

    #[test]
    fn an_id_beyond_a_doubles_range_is_refused_and_not_echoed() {
        // Found by the `ws_protocol` fuzz target: echoed, it made a reply
        // serde_json could not read.
        let p = parse(r#"{"type":"ping","id":-11.5E444444444422}"#);
        assert!(p.id.is_none());
        assert_eq!(p.request.unwrap_err().code, "bad_request");
        let reply = error(p.id, &ClientError::bad_request("x"));
        let body = crate::transport::frame::server_payload(&reply);
        assert!(serde_json::from_slice::<serde_json::Value>(body).is_ok());
        assert_eq!(
            parse(r#"{"type":"ping","id":1e300}"#).id.unwrap().get(),
            "1e300"
        );
        // Also found by it: a lone surrogate escape in a string id.
        let p = parse(r#"{"type":"ping","id":"a\uDAAAb"}"#);
        assert!(p.id.is_none());
        assert_eq!(p.request.unwrap_err().code, "bad_request");
        let paired = parse(r#"{"type":"ping","id":"\uD83D\uDE00"}"#);
        assert_eq!(paired.id.unwrap().get(), r#""\uD83D\uDE00""#);
    }

    #[test]
    fn bad_requests_keep_the_id() {
        assert_eq!(code("nope"), (None, "bad_request"));
        assert_eq!(code("[1]"), (None, "bad_request"));
        assert_eq!(code(r#"{"id":5}"#), (Some("5".into()), "bad_request"));
        assert_eq!(
            code(r#"{"type":"dance","id":"a"}"#),
            (Some("\"a\"".into()), "unknown_type")
        );
        assert_eq!(
            code(r#"{"type":"sub","id":1}"#),
            (Some("1".into()), "bad_request")
        );
        assert_eq!(
            code(r#"{"type":"sub","topic":7,"id":1}"#),
            (Some("1".into()), "bad_request")
        );
        assert_eq!(
            code(r#"{"type":"sub","topic":"a/#/b","id":1}"#),
            (Some("1".into()), "invalid_topic")
        );
        assert_eq!(
            code(r#"{"type":"sub","topic":"","id":1}"#),
            (Some("1".into()), "invalid_topic")
        );
        assert_eq!(
            code(r#"{"type":"pub","topic":"a","id":1}"#),
            (Some("1".into()), "bad_request")
        );
        assert_eq!(
            code(r#"{"type":"ping","id":{"x":1}}"#),
            (None, "bad_request")
        );
        assert_eq!(code(r#"{"type":5}"#), (None, "bad_request"));
        assert_eq!(
            code(r#"{"type":"pub","topic":"a","payload":1,"event":""}"#),
            (None, "bad_request")
        );
    }

    /// The JSON of a server text frame (header stripped, checked).
    fn json_of(frame: &[u8]) -> Value {
        assert_eq!(frame[0], 0x81, "a final text frame");
        let (len, start) = match frame[1] {
            126 => (usize::from(u16::from_be_bytes([frame[2], frame[3]])), 4),
            127 => (
                usize::try_from(u64::from_be_bytes(frame[2..10].try_into().unwrap())).unwrap(),
                10,
            ),
            n => (usize::from(n), 2),
        };
        assert_eq!(frame.len(), start + len);
        serde_json::from_slice(&frame[start..]).unwrap()
    }

    #[test]
    fn replies_are_json() {
        let id: &RawValue = serde_json::from_str("\"q\"").unwrap();
        let v = json_of(&ack(id));
        assert_eq!(v, json!({"type":"ack","id":"q"}));
        let v = json_of(&pong(None, 5));
        assert_eq!(v, json!({"type":"pong","ts":5}));
        let e = ClientError::new("forbidden", "no \"way\"".repeat(20));
        let v = json_of(&error(Some(id), &e));
        let long = "no \"way\"".repeat(20);
        assert_eq!(
            v,
            json!({"type":"error","id":"q","code":"forbidden","message":long})
        );
    }

    #[test]
    fn frame_is_built_once_and_escaped() {
        let m = Message::with_ts(
            "a\"b".into(),
            Some("ev".into()),
            payload_of(&json!({"v":1})),
            7,
        );
        let first = encoding::frame(&m, &JSON);
        let second = encoding::frame(&m, &JSON);
        assert!(std::ptr::eq(first.as_ptr(), second.as_ptr()));
        let v = json_of(first);
        assert_eq!(
            v,
            json!({"topic":"a\"b","ts":7,"event":"ev","payload":{"v":1}})
        );
    }

    #[test]
    fn frames_hold_what_serde_json_writes() {
        let texts = ["a/b", "a\"b", "x\\y", "tab\t", "é/ñ", "\u{7f}", "", "Xc2-1"];
        let numbers = [0, 7, 10, 1_795_322_940_123, u64::MAX];
        for (i, text) in texts.iter().enumerate() {
            let n = numbers[i % numbers.len()];
            let mut m = Message::with_ts((*text).into(), None, payload_of(&1), n);
            let plain = encoding::frame(&m, &JSON).to_vec();
            let expected = format!(
                r#"{{"topic":{},"ts":{n},"payload":1}}"#,
                serde_json::to_string(text).unwrap()
            );
            assert_eq!(
                frame::server_payload(&plain),
                expected.as_bytes(),
                "{text:?}"
            );
            m = Message::with_ts("t".into(), None, payload_of(&1), n);
            m.position = Some(crate::hub::history::Position {
                offset: numbers[(i + 1) % numbers.len()],
                epoch: (*text).into(),
            });
            let tracked = encoding::frame(&m, &JSON).to_vec();
            let expected = format!(
                r#"{{"topic":"t","ts":{n},"offset":{},"epoch":{},"payload":1}}"#,
                numbers[(i + 1) % numbers.len()],
                serde_json::to_string(text).unwrap()
            );
            assert_eq!(
                frame::server_payload(&tracked),
                expected.as_bytes(),
                "{text:?}"
            );
        }
    }

    /// Random text, and random mutations of valid requests, never panic
    /// and always yield either a request or a coded error.
    #[test]
    fn arbitrary_input_never_panics() {
        let mut rng = crate::test_seed::rng("arbitrary_input_never_panics");
        let seeds = [
            r#"{"type":"sub","topic":"a/+/#","id":1}"#,
            r#"{"type":"pub","topic":"x","payload":{"a":[1,2,{"b":null}]},"event":"e","id":"z"}"#,
            r#"{"type":"auth","token":"abc"}"#,
        ];
        let alphabet: Vec<char> = "{}[]\":,#+/\\ \u{0}\u{7f}aé0-1etypsubd".chars().collect();
        for i in 0..20_000u32 {
            let mut text: Vec<char> = seeds[(i % 3) as usize].chars().collect();
            for _ in 0..(1 + i % 5) {
                let pos = rng.random_range(0..=text.len());
                match rng.random_range(0..3) {
                    0 if pos < text.len() => {
                        text.remove(pos);
                    }
                    1 if pos < text.len() => {
                        text[pos] = alphabet[rng.random_range(0..alphabet.len())]
                    }
                    _ => text.insert(pos, alphabet[rng.random_range(0..alphabet.len())]),
                }
            }
            let text: String = text.into_iter().collect();
            let parsed = parse(&text);
            if let Err(e) = &parsed.request {
                assert!(!e.code.is_empty() && !e.message.is_empty(), "{text}");
                json_of(&error(parsed.id, e));
            }
        }
    }
}
