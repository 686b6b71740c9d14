//! The HTTP/1.1 upgrade to WebSocket (RFC 6455 §4.2), checked by hand so
//! that pulso gets the raw connection back (see `frame` for why).

use axum::http::header::{
    CONNECTION, SEC_WEBSOCKET_ACCEPT, SEC_WEBSOCKET_KEY, SEC_WEBSOCKET_VERSION, UPGRADE,
};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Version};
use axum::response::Response;
use base64::Engine;
use hyper::upgrade::OnUpgrade;
use sha1::{Digest, Sha1};

use crate::api::error::ApiError;

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

/// Checks a WebSocket upgrade request; on success returns the `101` response
/// to send. The connection itself comes from the request's [`OnUpgrade`].
pub fn check(
    method: &Method,
    version: Version,
    headers: &HeaderMap,
    on_upgrade: Option<&OnUpgrade>,
) -> Result<Response, ApiError> {
    let bad = |message: &'static str| ApiError::bad_request(message);
    if method != Method::GET {
        return Err(ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "a WebSocket upgrade must be a GET",
        ));
    }
    if version != Version::HTTP_11 {
        return Err(bad("WebSocket upgrades need HTTP/1.1"));
    }
    if !has_token(headers, CONNECTION, "upgrade") {
        return Err(ApiError::new(
            StatusCode::UPGRADE_REQUIRED,
            "upgrade_required",
            "this endpoint speaks WebSocket: send `Connection: upgrade` and `Upgrade: websocket`",
        ));
    }
    if !has_token(headers, UPGRADE, "websocket") {
        return Err(bad("the `Upgrade` header must be `websocket`"));
    }
    if headers
        .get(SEC_WEBSOCKET_VERSION)
        .map(HeaderValue::as_bytes)
        != Some(b"13")
    {
        return Err(bad("`Sec-WebSocket-Version` must be 13"));
    }
    let key = headers
        .get(SEC_WEBSOCKET_KEY)
        .ok_or_else(|| bad("missing `Sec-WebSocket-Key`"))?;
    if on_upgrade.is_none() {
        return Err(bad("this connection cannot be upgraded"));
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
pub fn accept(mut parts: Parts) -> Result<(Response, OnUpgrade), ApiError> {
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
    fn accept_key_matches_rfc_6455_example() {
        assert_eq!(
            accept_key(b"dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }
}
