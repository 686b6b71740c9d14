//! The plain WebSocket endpoint, `GET /ws`: `protocol` is its JSON wire
//! format (client requests in, replies and messages out) and `session`
//! what answers them. The connection it runs on, the framing and the
//! handshake are the shared [`transport`](crate::transport).

pub mod protocol;
pub mod session;

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use hyper_util::rt::TokioIo;

use axum::http::StatusCode;

use crate::gateway::Gateway;
use crate::gateway::admission::Refused;
use crate::http::error::ApiError;
use crate::http::{peer_ip, request_token};
use crate::transport::handshake;

/// `GET /ws`: checks the browser origin (`403`), the connection limits
/// (`503`) and the token (`401`), each a JSON error before any upgrade,
/// then the WebSocket handshake, and hands the raw connection to
/// [`session::run`].
pub async fn upgrade(State(gw): State<Arc<Gateway>>, request: Request) -> Response {
    let (parts, _body) = request.into_parts();
    if let Err(refused) = gw.admission.check_origin(&parts.headers, "ws") {
        return refusal(refused).into_response();
    }
    // Counted from here; the place is freed when the connection ends.
    let permit = match gw.admission.admit(peer_ip(&parts.extensions)) {
        Ok(permit) => permit,
        Err(refused) => return refusal(refused).into_response(),
    };
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
        drop(permit);
    }));
    response
}

/// The HTTP answer to a refused connection: 403 for an origin, 503 when
/// full.
fn refusal(refused: Refused) -> ApiError {
    let status = match refused {
        Refused::Origin => StatusCode::FORBIDDEN,
        Refused::Full | Refused::FullForAddress => StatusCode::SERVICE_UNAVAILABLE,
    };
    ApiError::new(status, refused.code(), refused.message())
}
