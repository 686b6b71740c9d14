//! The HTTP API: publishing, presence and cluster listings, health,
//! readiness and metrics, and the operator console (`GET /` and what it
//! reads, `GET /api/console`).
//!
//! Handlers take typed extractors: [`Publisher`] proves the caller may
//! publish, [`JsonBody`] reads a bounded body and turns every failure into an
//! [`ApiError`].

pub mod cluster;
pub mod console;
pub mod health;
pub mod presence;
pub mod publish;

use std::sync::Arc;

use axum::Router;
use axum::extract::{FromRequest, FromRequestParts, Path, Request};
use axum::http::header::{self, CONTENT_LENGTH};
use axum::http::request::Parts;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use serde::de::DeserializeOwned;
use subtle::ConstantTimeEq;

use crate::auth::AuthError;
use crate::gateway::Gateway;
pub use crate::http::bearer_token;
pub use crate::http::error::ApiError;

pub fn router() -> Router<Arc<Gateway>> {
    Router::new()
        .route("/api/publish", post(publish::publish))
        .route("/api/broadcast", post(publish::broadcast))
        .route("/api/presence", get(presence::presence))
        .route("/api/cluster", get(cluster::cluster))
        .route("/api/console", get(console::console))
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .route("/metrics", get(health::metrics))
        .route("/", get(console_page))
        .route("/console/{asset}", get(console_asset))
}

/// Any other path: the API's JSON error, not an empty 404.
pub async fn not_found(uri: axum::http::Uri) -> ApiError {
    ApiError::not_found(format!("no route for {}", uri.path()))
}

/// A known path with the wrong method.
pub async fn method_not_allowed(method: axum::http::Method, uri: axum::http::Uri) -> ApiError {
    ApiError::new(
        axum::http::StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!("{method} is not allowed on {}", uri.path()),
    )
}

/// What the console page may load and connect to: its own files and this
/// server, nothing inline and nothing from elsewhere.
const CONSOLE_CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'none'; \
     frame-ancestors 'none'";

/// The console: a static page, its script and style, and the vendored
/// uPlot (`assets/uPlot.LICENSE`), all in the binary. It reads
/// `/api/console` and `/ws` with the token the operator pastes.
async fn console_page() -> impl IntoResponse {
    console_file(
        "text/html; charset=utf-8",
        include_str!("assets/console.html"),
    )
}

async fn console_asset(Path(asset): Path<String>) -> axum::response::Response {
    let (kind, body) = match asset.as_str() {
        "console.js" => (
            "text/javascript; charset=utf-8",
            include_str!("assets/console.js"),
        ),
        "console.css" => (
            "text/css; charset=utf-8",
            include_str!("assets/console.css"),
        ),
        "uPlot.iife.min.js" => (
            "text/javascript; charset=utf-8",
            include_str!("assets/uPlot.iife.min.js"),
        ),
        "uPlot.min.css" => (
            "text/css; charset=utf-8",
            include_str!("assets/uPlot.min.css"),
        ),
        "uPlot.LICENSE" => (
            "text/plain; charset=utf-8",
            include_str!("assets/uPlot.LICENSE"),
        ),
        _ => return ApiError::not_found(format!("no route for /console/{asset}")).into_response(),
    };
    console_file(kind, body).into_response()
}

fn console_file(kind: &'static str, body: &'static str) -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, kind),
            (header::CONTENT_SECURITY_POLICY, CONSOLE_CSP),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
}

/// A caller allowed to publish: a JWT whose role is in `publisher_roles`, or
/// the configured `api_key`.
pub struct Publisher;

impl FromRequestParts<Arc<Gateway>> for Publisher {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, gw: &Arc<Gateway>) -> Result<Self, ApiError> {
        let token = bearer_token(&parts.headers).unwrap_or("");
        if let Some(key) = &gw.config.api_key
            && !token.is_empty()
            // Constant time, so response timing does not reveal how much of
            // a guessed key was right.
            && bool::from(token.as_bytes().ct_eq(key.as_bytes()))
        {
            return Ok(Publisher);
        }
        let identity = gw.verifier.verify(token).map_err(|e: AuthError| {
            gw.metrics.auth_failure(e.reason());
            ApiError::from(e)
        })?;
        if !gw.is_publisher(&identity) {
            return Err(ApiError::forbidden(format!(
                "role `{}` may not use the publish API",
                identity.role
            )));
        }
        Ok(Publisher)
    }
}

/// A JSON body of at most `api.max_body` bytes.
pub struct JsonBody<T>(pub T);

impl<T: DeserializeOwned> FromRequest<Arc<Gateway>> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, gw: &Arc<Gateway>) -> Result<Self, ApiError> {
        let limit = gw.config.api_max_body;
        let declared = req
            .headers()
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        // A refused body is not read to its end (not at all when its
        // declared length is over): the connection's lingering close
        // (`crate::http`) discards the rest, so a client that writes its
        // whole body before reading still gets the 413.
        if declared.is_some_and(|n| n > limit as u64) {
            return Err(ApiError::too_large(limit));
        }
        let bytes = axum::body::to_bytes(req.into_body(), limit)
            .await
            .map_err(|e| {
                if crate::http::is_body_timeout(&e) {
                    ApiError::request_timeout()
                } else if e.to_string().contains("length limit") {
                    ApiError::too_large(limit)
                } else {
                    ApiError::bad_request(format!("could not read the request body: {e}"))
                }
            })?;
        serde_json::from_slice(&bytes)
            .map(JsonBody)
            .map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))
    }
}
