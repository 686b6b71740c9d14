//! `/healthz`, `/readyz` and `/metrics`.

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;

use crate::gateway::Gateway;

/// The process is alive and serving HTTP.
pub async fn healthz() -> impl IntoResponse {
    Json(serde_json::json!({"status": "ok"}))
}

/// Ready when every registered dependency is; 503 otherwise, and while stopping.
pub async fn readyz(State(gw): State<Arc<Gateway>>) -> impl IntoResponse {
    let (ready, checks) = gw.readiness.report();
    let stopping = gw.shutdown.is_cancelled();
    let status = if stopping {
        "stopping"
    } else if ready {
        "ready"
    } else {
        "not_ready"
    };
    let code = if ready && !stopping {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        code,
        Json(serde_json::json!({"status": status, "checks": checks})),
    )
}

pub async fn metrics(State(gw): State<Arc<Gateway>>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        gw.metrics.render(),
    )
}
