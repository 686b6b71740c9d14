//! MQTT payload bytes ⇄ hub JSON payloads.
//!
//! Inbound (SPEC §6): the parsed JSON when the bytes are valid JSON, else the
//! UTF-8 string, else `{"base64": "..."}` (standard alphabet, padded). So a
//! sensor sending `21.5` gives the number, `ON` gives the string `"ON"`, and
//! raw binary still arrives intact.
//!
//! Outbound (a client `pub` forwarded to the broker) is the mirror image, so
//! devices receive what they would send: a JSON string goes out as its plain
//! UTF-8 text, an object that is exactly `{"base64": "<valid base64>"}` as
//! the decoded bytes, anything else as its JSON text.

use std::sync::Arc;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde_json::value::RawValue;

use crate::hub::payload_of;

/// Turns broker bytes into a hub payload; never fails.
pub fn decode(bytes: &[u8]) -> Arc<RawValue> {
    match std::str::from_utf8(bytes) {
        Ok(text) => match serde_json::from_str::<Box<RawValue>>(text) {
            Ok(raw) => Arc::from(raw),
            Err(_) => payload_of(text),
        },
        Err(_) => payload_of(&serde_json::json!({ "base64": STANDARD.encode(bytes) })),
    }
}

/// Turns a client's JSON payload into the bytes sent to the broker.
pub fn encode(payload: &RawValue) -> Vec<u8> {
    let text = payload.get();
    if text.starts_with('"')
        && let Ok(s) = serde_json::from_str::<String>(text)
    {
        return s.into_bytes();
    }
    if text.starts_with('{')
        && let Ok(map) = serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(text)
        && map.len() == 1
        && let Some(serde_json::Value::String(b64)) = map.get("base64")
        && let Ok(bytes) = STANDARD.decode(b64)
    {
        return bytes;
    }
    text.as_bytes().to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dec(b: &[u8]) -> String {
        decode(b).get().to_string()
    }

    #[test]
    fn json_is_kept_as_json() {
        assert_eq!(dec(b"21.5"), "21.5");
        assert_eq!(dec(br#"{"t":21.5,"u":"C"}"#), r#"{"t":21.5,"u":"C"}"#);
        assert_eq!(dec(b"[1,2]"), "[1,2]");
        assert_eq!(dec(b"true"), "true");
        assert_eq!(dec(b"null"), "null");
        assert_eq!(dec(br#""quoted""#), r#""quoted""#);
        // Big numbers keep their exact text.
        assert_eq!(
            dec(b"123456789012345678901234567890"),
            "123456789012345678901234567890"
        );
        // Surrounding whitespace is still JSON.
        let v: serde_json::Value = serde_json::from_str(&dec(b" 7 \n")).unwrap();
        assert_eq!(v, serde_json::json!(7));
    }

    #[test]
    fn other_utf8_becomes_a_string() {
        assert_eq!(dec(b"ON"), r#""ON""#);
        assert_eq!(dec(b""), r#""""#);
        assert_eq!(dec("21,5 °C".as_bytes()), r#""21,5 °C""#);
        assert_eq!(dec(b"{not json"), r#""{not json""#);
        assert_eq!(dec(b"NaN"), r#""NaN""#);
        assert_eq!(dec(b"a\"b\n"), r#""a\"b\n""#);
    }

    #[test]
    fn binary_becomes_padded_standard_base64() {
        assert_eq!(dec(&[0xff, 0xfe, 0x00]), r#"{"base64":"//4A"}"#);
        assert_eq!(dec(&[0xc3]), r#"{"base64":"ww=="}"#);
        assert_eq!(dec(&[0xfb, 0xff]), r#"{"base64":"+/8="}"#);
    }

    #[test]
    fn encode_mirrors_decode() {
        let raw = |s: &str| RawValue::from_string(s.to_string()).unwrap();
        assert_eq!(encode(&raw(r#""ON""#)), b"ON");
        assert_eq!(encode(&raw(r#"{"base64":"//4A"}"#)), vec![0xff, 0xfe, 0x00]);
        assert_eq!(encode(&raw(r#"{"t":1}"#)), br#"{"t":1}"#);
        assert_eq!(encode(&raw("21.5")), b"21.5");
        // Not valid base64, or more keys: sent as JSON.
        assert_eq!(encode(&raw(r#"{"base64":"%%"}"#)), br#"{"base64":"%%"}"#);
        assert_eq!(
            encode(&raw(r#"{"base64":"AA==","x":1}"#)),
            br#"{"base64":"AA==","x":1}"#
        );
        for bytes in [&b"ON"[..], b"{\"a\":[1,2]}", b"12", &[0, 159, 146, 150]] {
            assert_eq!(encode(&decode(bytes)), bytes);
        }
    }
}
