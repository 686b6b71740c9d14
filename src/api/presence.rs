//! `GET /api/presence?role=…&sub=…` (publisher auth): the rows that hold a
//! socket right now.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use serde::Deserialize;

use super::{ApiError, Publisher};
use crate::gateway::{Gateway, PresenceRow as Row, ReadError};

#[derive(Deserialize)]
pub struct Filters {
    role: Option<String>,
    sub: Option<String>,
}

#[derive(serde::Serialize)]
pub struct Sockets {
    sockets: Vec<Row>,
}

pub async fn presence(
    _: Publisher,
    State(gw): State<Arc<Gateway>>,
    filters: Result<Query<Filters>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Sockets>, ApiError> {
    let Query(f) = filters.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let too_long = |v: &Option<String>| v.as_ref().is_some_and(|s| s.len() > 1024);
    if too_long(&f.role) || too_long(&f.sub) {
        return Err(ApiError::bad_request(
            "`role` and `sub` are at most 1024 bytes",
        ));
    }
    // `?role=` (empty) means no filter, like leaving it out.
    let role = f.role.as_deref().filter(|s| !s.is_empty());
    let sub = f.sub.as_deref().filter(|s| !s.is_empty());
    match gw.presence.list(role, sub).await {
        Ok(sockets) => Ok(Json(Sockets { sockets })),
        Err(e @ ReadError::Unavailable(_)) | Err(e @ ReadError::Query(_)) => Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            e.to_string(),
        )),
    }
}
