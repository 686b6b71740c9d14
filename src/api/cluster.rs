//! `GET /api/cluster` (publisher auth): the live nodes of this node's
//! cluster, from their heartbeats (SPEC §8).
//!
//! Only live nodes are listed: a node silent for its `cluster.node_ttl` is
//! dead, and its heartbeat is deleted within one more `cluster.heartbeat`
//! anyway. A single node (no cluster configured) answers with itself, so
//! the endpoint works the same with one node or many.

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;

use super::{ApiError, Publisher};
use crate::gateway::{Gateway, NodeRow};

#[derive(serde::Serialize)]
pub struct Nodes {
    nodes: Vec<NodeRow>,
}

pub async fn cluster(
    _: Publisher,
    State(gw): State<Arc<Gateway>>,
) -> Result<Json<Nodes>, ApiError> {
    match gw.presence.nodes().await {
        Ok(nodes) => Ok(Json(Nodes { nodes })),
        Err(e) => Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            e.to_string(),
        )),
    }
}
