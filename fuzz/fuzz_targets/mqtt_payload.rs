//! MQTT payloads (`mqtt::payload`): broker bytes to a hub payload and back.
//!
//! Any bytes decode, without a panic, to valid JSON text: the JSON itself, else
//! the UTF-8 text as a string, else `{"base64": …}`. Encoding the result
//! for the broker gives back the original bytes, except valid JSON that
//! is a string (sent as its plain text) or an object holding only valid
//! base64 (sent decoded), which is the documented mirror image.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pulso::mqtt::payload::{decode, encode};
use serde_json::Value;
use serde_json::value::RawValue;

const JSON_SPACE: [char; 4] = [' ', '\t', '\n', '\r'];

fuzz_target!(|bytes: &[u8]| {
    let payload = decode(bytes);
    // Valid JSON text. (Not necessarily a `Value`: a number out of f64's
    // range, such as `2e622`, is valid JSON and passes through as sent.)
    serde_json::from_str::<Box<RawValue>>(payload.get()).expect("a decoded payload is JSON");
    let back = encode(&payload);
    match std::str::from_utf8(bytes) {
        Ok(text) => match serde_json::from_str::<Box<RawValue>>(text) {
            Ok(_) => {
                // JSON goes through as it came (without the whitespace
                // around it), but for a string (its text) and a lone
                // `{"base64": …}` object (its bytes).
                let trimmed = text.trim_matches(JSON_SPACE).as_bytes();
                match serde_json::from_str::<Value>(text) {
                    Ok(Value::String(s)) => assert_eq!(back, s.into_bytes()),
                    Ok(Value::Object(obj)) if back != trimmed => {
                        assert!(obj.len() == 1 && obj.contains_key("base64"), "{text:?}");
                    }
                    _ => assert_eq!(back, trimmed),
                }
            }
            // Text that is not JSON comes back as the same text.
            Err(_) => assert_eq!(back, bytes),
        },
        // Binary comes back byte for byte through base64.
        Err(_) => assert_eq!(back, bytes),
    }
});
