//! The plain WebSocket endpoint, `GET /ws`.
//!
//! `handshake` checks the upgrade, `frame` is the RFC 6455 wire format,
//! `protocol` the JSON messages inside it and `session` what answers them,
//! `connection` the one task that serves a connection, and `outbox` the
//! queue through which the hub (and the connection's own replies) reach it.
//! `connection`, `frame` and `outbox` also carry Socket.IO clients that
//! open a WebSocket directly (`crate::sio::websocket`).

pub mod connection;
pub mod frame;
pub mod handshake;
pub mod outbox;
pub mod protocol;
pub mod rate;
pub mod session;

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use hyper_util::rt::TokioIo;

use crate::api::error::ApiError;
use crate::gateway::Gateway;

/// Close codes used by `/ws`.
pub mod close {
    pub const NORMAL: u16 = 1000;
    pub const GOING_AWAY: u16 = 1001;
    pub const PROTOCOL_ERROR: u16 = 1002;
    pub const INVALID_DATA: u16 = 1007;
    pub const POLICY: u16 = 1008;
    pub const TOO_BIG: u16 = 1009;
    pub const TRY_AGAIN_LATER: u16 = 1013;
    pub const TOKEN_EXPIRED: u16 = 4003;
}

/// The token of an HTTP request: `Authorization: Bearer …`, else `?token=…`.
pub fn request_token(headers: &HeaderMap, query: Option<&str>) -> Option<String> {
    let bearer = crate::api::bearer_token(headers).map(str::to_string);
    bearer.or_else(|| {
        serde_urlencoded::from_str::<Vec<(String, String)>>(query?)
            .ok()?
            .into_iter()
            .find(|(k, _)| k == "token")
            .map(|(_, v)| v)
    })
}

/// `GET /ws`: checks the token (a `401` JSON error before any upgrade),
/// then the WebSocket handshake, and hands the raw connection to
/// [`session::run`].
pub async fn upgrade(State(gw): State<Arc<Gateway>>, request: Request) -> Response {
    let (parts, _body) = request.into_parts();
    let token = request_token(&parts.headers, parts.uri.query()).unwrap_or_default();
    let identity = match gw.verifier.verify(&token) {
        Ok(identity) => identity,
        Err(e) => {
            gw.metrics.auth_failure(e.reason());
            return ApiError::from(e).into_response();
        }
    };
    let (response, on_upgrade) = match handshake::accept(parts) {
        Ok(accepted) => accepted,
        Err(e) => return e.into_response(),
    };
    let tracker = gw.connections.clone();
    tokio::spawn(tracker.track_future(async move {
        let upgraded = match on_upgrade.await {
            Ok(upgraded) => upgraded,
            Err(e) => {
                tracing::debug!(error = %e, "ws upgrade failed");
                return;
            }
        };
        // hyper hands back bytes the client sent right behind the request
        // before anything newer, so nothing is lost here.
        session::run(gw, TokioIo::new(upgraded), identity).await;
    }));
    response
}
