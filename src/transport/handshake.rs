//! The HTTP/1.1 upgrade to WebSocket (RFC 6455 §4.2), checked by hand so
//! that pulso gets the raw connection back (see `frame` for why).

use axum::http::header::{
    CONNECTION, SEC_WEBSOCKET_ACCEPT, SEC_WEBSOCKET_KEY, SEC_WEBSOCKET_VERSION, UPGRADE,
};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Version};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use hyper::upgrade::OnUpgrade;
use sha1::{Digest, Sha1};

use crate::http::error::ApiError;

/// `Sec-WebSocket-Accept` for a client's `Sec-WebSocket-Key`.
pub fn accept_key(key: &[u8]) -> String {
    let mut sha = Sha1::new();
    sha.update(key);
    sha.update(b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11");
    base64::engine::general_purpose::STANDARD.encode(sha.finalize())
}

fn has_token(headers: &HeaderMap, name: axum::http::HeaderName, token: &str) -> bool {
    headers.get_all(name).iter().any(|v| {
        v.to_str()
            .is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
    })
}

/// The one WebSocket version this server speaks (RFC 6455).
const VERSION: &str = "13";

/// Why an upgrade is refused: the JSON error every HTTP answer carries, and
/// for an unsupported version the `Sec-WebSocket-Version` header naming
/// the one this server speaks, so that a client can retry with it (RFC
/// 6455 §4.4).
#[derive(Debug)]
pub struct Refused {
    pub error: ApiError,
    offer_version: bool,
}

impl From<ApiError> for Refused {
    fn from(error: ApiError) -> Self {
        Refused {
            error,
            offer_version: false,
        }
    }
}

impl IntoResponse for Refused {
    fn into_response(self) -> Response {
        let mut response = self.error.into_response();
        if self.offer_version {
            response
                .headers_mut()
                .insert(SEC_WEBSOCKET_VERSION, HeaderValue::from_static(VERSION));
        }
        response
    }
}

/// Whether `key` is a valid `Sec-WebSocket-Key`: base64 of exactly 16
/// bytes (RFC 6455 §4.1), which is always 24 characters with `==`. Checked
/// without allocating; a longer header is refused by its length alone.
fn valid_key(key: &[u8]) -> bool {
    let mut decoded = [0u8; 18];
    key.len() == 24
        && base64::engine::general_purpose::STANDARD
            .decode_slice(key, &mut decoded)
            .is_ok_and(|n| n == 16)
}

/// Checks a WebSocket upgrade request; on success returns the `101` response
/// to send. The connection itself comes from the request's [`OnUpgrade`].
/// `/ws` and Socket.IO's WebSocket transport both upgrade through here.
pub fn check(
    method: &Method,
    version: Version,
    headers: &HeaderMap,
    on_upgrade: Option<&OnUpgrade>,
) -> Result<Response, Refused> {
    let bad = |message: &'static str| ApiError::bad_request(message);
    if method != Method::GET {
        return Err(ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "a WebSocket upgrade must be a GET",
        )
        .into());
    }
    if version != Version::HTTP_11 {
        return Err(bad("WebSocket upgrades need HTTP/1.1").into());
    }
    if !has_token(headers, CONNECTION, "upgrade") {
        return Err(ApiError::new(
            StatusCode::UPGRADE_REQUIRED,
            "upgrade_required",
            "this endpoint speaks WebSocket: send `Connection: upgrade` and `Upgrade: websocket`",
        )
        .into());
    }
    if !has_token(headers, UPGRADE, "websocket") {
        return Err(bad("the `Upgrade` header must be `websocket`").into());
    }
    match headers
        .get(SEC_WEBSOCKET_VERSION)
        .map(HeaderValue::as_bytes)
    {
        None => return Err(bad("missing `Sec-WebSocket-Version`").into()),
        Some(v) if v == VERSION.as_bytes() => {}
        // A version this server does not speak (RFC 6455 §4.4).
        Some(_) => {
            return Err(Refused {
                error: ApiError::new(
                    StatusCode::UPGRADE_REQUIRED,
                    "upgrade_required",
                    "unsupported `Sec-WebSocket-Version`; this server speaks 13",
                ),
                offer_version: true,
            });
        }
    }
    let key = headers
        .get(SEC_WEBSOCKET_KEY)
        .ok_or_else(|| bad("missing `Sec-WebSocket-Key`"))?;
    if !valid_key(key.as_bytes()) {
        return Err(bad("`Sec-WebSocket-Key` must be base64 of 16 bytes").into());
    }
    if on_upgrade.is_none() {
        return Err(bad("this connection cannot be upgraded").into());
    }
    let accept = HeaderValue::from_str(&accept_key(key.as_bytes()))
        .map_err(|_| bad("invalid `Sec-WebSocket-Key`"))?;
    let mut response = Response::new(axum::body::Body::empty());
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = response.headers_mut();
    h.insert(CONNECTION, HeaderValue::from_static("upgrade"));
    h.insert(UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(SEC_WEBSOCKET_ACCEPT, accept);
    Ok(response)
}

/// Checks an upgrade request and takes its pending connection: the `101`
/// response to send and the connection to await.
/// The request's parts are dropped here: their header values share hyper's
/// read buffer, which is freed once nothing refers to it.
pub fn accept(mut parts: Parts) -> Result<(Response, OnUpgrade), Refused> {
    let on_upgrade = parts.extensions.remove::<OnUpgrade>();
    let response = check(
        &parts.method,
        parts.version,
        &parts.headers,
        on_upgrade.as_ref(),
    )?;
    // `check` refuses a request without one.
    let on_upgrade = on_upgrade.ok_or_else(|| ApiError::bad_request("no upgrade"))?;
    Ok((response, on_upgrade))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_is_base64_of_exactly_16_bytes() {
        let b64 = |n: usize| base64::engine::general_purpose::STANDARD.encode(vec![7u8; n]);
        assert!(valid_key(b"dGhlIHNhbXBsZSBub25jZQ=="));
        assert!(valid_key(b64(16).as_bytes()));
        for bad in [
            String::new(),
            "abc".into(),
            b64(15),
            b64(17),
            b64(32),
            // 16 bytes without padding, or with a character outside base64.
            "dGhlIHNhbXBsZSBub25jZQ".into(),
            "dGhlIHNhbXBsZSBub25jZ*==".into(),
            "dGhlIHNhbXBsZSBub25jZQ=x".into(),
        ] {
            assert!(!valid_key(bad.as_bytes()), "{bad:?}");
        }
    }

    fn headers(version: &str, key: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(CONNECTION, HeaderValue::from_static("Upgrade"));
        h.insert(UPGRADE, HeaderValue::from_static("websocket"));
        h.insert(
            SEC_WEBSOCKET_VERSION,
            HeaderValue::from_str(version).unwrap(),
        );
        h.insert(SEC_WEBSOCKET_KEY, HeaderValue::from_str(key).unwrap());
        h
    }

    fn refused(version: &str, key: &str) -> Response {
        check(&Method::GET, Version::HTTP_11, &headers(version, key), None)
            .unwrap_err()
            .into_response()
    }

    #[test]
    fn an_unsupported_version_is_426_naming_13() {
        let key = "dGhlIHNhbXBsZSBub25jZQ==";
        for version in ["8", "12", "14", "13, 8", ""] {
            let r = refused(version, key);
            assert_eq!(r.status(), StatusCode::UPGRADE_REQUIRED, "{version:?}");
            assert_eq!(r.headers()[SEC_WEBSOCKET_VERSION], "13", "{version:?}");
        }
        // Checked before the key: a client learns the version it needs.
        assert_eq!(refused("8", "abc").status(), StatusCode::UPGRADE_REQUIRED);
        let r = refused("13", "abc");
        assert_eq!(r.status(), StatusCode::BAD_REQUEST);
        assert!(r.headers().get(SEC_WEBSOCKET_VERSION).is_none());
    }

    #[test]
    fn accept_key_matches_rfc_6455_example() {
        assert_eq!(
            accept_key(b"dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }
}
