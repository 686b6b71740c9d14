//! `/ws` client messages (`ws::protocol::parse`) and the replies built from
//! them.
//!
//! Any text parses without a panic. The replies echo the client's `id` as
//! raw JSON, so each one (ack, pong, error) must still be valid JSON; a
//! `pub` names a valid topic and a `sub` a filter that parses again.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pulso::topic::{Filter, validate_name};
use pulso::transport::frame::server_payload;
use pulso::ws::protocol::{Request, ack, ack_recovered, error, parse, pong};

fn json(frame: &[u8]) {
    let body = server_payload(frame);
    if let Err(e) = serde_json::from_slice::<serde_json::Value>(body) {
        panic!(
            "reply is not JSON ({e}): {:?}",
            String::from_utf8_lossy(body)
        );
    }
}

fuzz_target!(|text: &str| {
    let parsed = parse(text);
    let id = parsed.id;
    json(&pong(id, 7));
    json(&ack_recovered(id, true));
    if let Some(id) = id {
        json(&ack(id));
    }
    match &parsed.request {
        Err(e) => json(&error(id, e)),
        Ok(Request::Sub(filter, _)) | Ok(Request::Unsub(filter)) => {
            assert!(Filter::parse(filter.as_str()).is_ok());
        }
        Ok(Request::Pub { topic, payload, .. }) => {
            assert!(validate_name(topic).is_ok(), "pub to an invalid topic");
            // Relayed byte for byte: JSON text, whatever the magnitude of
            // its numbers (serde_json's `Value` refuses `1e400`; the
            // grammar does not).
            assert!(serde_json::from_str::<Box<serde_json::value::RawValue>>(payload.get()).is_ok());
        }
        Ok(Request::Ping) | Ok(Request::Auth(_)) => {}
    }
});
