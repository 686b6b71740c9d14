//! The WebSocket upgrade request (`transport::handshake`).
//!
//! An arbitrary method, version and header list (including repeated and
//! non-UTF-8 values) must be checked without a panic. An upgrade is only
//! accepted with a valid key, and its `Sec-WebSocket-Accept` is then the
//! RFC 6455 answer to that key; `accept_key` takes any bytes.
#![no_main]

use arbitrary::Arbitrary;
use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Version};
use libfuzzer_sys::fuzz_target;
use pulso::transport::handshake::{accept_key, check};

#[derive(Arbitrary, Debug)]
struct Input {
    method: Vec<u8>,
    version: u8,
    /// Headers by name: an index into `NAMES` or, past it, the bytes.
    headers: Vec<(u8, Vec<u8>, Vec<u8>)>,
}

const NAMES: [&str; 6] = [
    "connection",
    "upgrade",
    "sec-websocket-version",
    "sec-websocket-key",
    "sec-websocket-protocol",
    "origin",
];

fuzz_target!(|input: Input| {
    let method = Method::from_bytes(&input.method).unwrap_or(Method::GET);
    let version = match input.version % 4 {
        0 => Version::HTTP_10,
        1 => Version::HTTP_2,
        _ => Version::HTTP_11,
    };
    let mut headers = HeaderMap::new();
    for (pick, name, value) in &input.headers {
        let name = match NAMES.get(usize::from(*pick)) {
            Some(n) => HeaderName::from_static(n),
            None => match HeaderName::from_bytes(name) {
                Ok(n) => n,
                Err(_) => continue,
            },
        };
        if let Ok(value) = HeaderValue::from_bytes(value) {
            headers.append(name, value);
        }
    }
    let _ = accept_key(&input.method);
    // A pending upgrade that never completes: `check` only needs it present.
    let on_upgrade = hyper::upgrade::on(&mut http::Request::new(()));
    match check(&method, version, &headers, Some(&on_upgrade)) {
        Ok(response) => {
            assert_eq!(response.status(), StatusCode::SWITCHING_PROTOCOLS);
            assert_eq!(method, Method::GET);
            assert_eq!(version, Version::HTTP_11);
            let key = headers
                .get("sec-websocket-key")
                .expect("accepted without a key");
            assert_eq!(key.len(), 24, "accepted a key that is not 16 bytes");
            let answer = response
                .headers()
                .get("sec-websocket-accept")
                .expect("101 without Sec-WebSocket-Accept");
            assert_eq!(answer.as_bytes(), accept_key(key.as_bytes()).as_bytes());
        }
        Err(refused) => {
            let status = refused.error.status;
            assert!(
                status == StatusCode::BAD_REQUEST
                    || status == StatusCode::METHOD_NOT_ALLOWED
                    || status == StatusCode::UPGRADE_REQUIRED,
                "unexpected status {status}"
            );
        }
    }
});
