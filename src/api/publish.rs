//! `POST /api/publish` and `POST /api/broadcast`.

use std::sync::Arc;
use std::time::Instant;

use axum::Json;
use axum::extract::State;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use super::{ApiError, JsonBody, Publisher};
use crate::gateway::Gateway;
use crate::hub::{now_ms, topic};
use crate::metrics::Stage;

/// Most rooms one broadcast may name.
pub const MAX_ROOMS: usize = 1024;

#[derive(Deserialize)]
pub struct PublishBody {
    topic: serde_json::Value,
    payload: Option<Box<RawValue>>,
    event: Option<serde_json::Value>,
}

#[derive(Deserialize)]
pub struct BroadcastBody {
    rooms: serde_json::Value,
    data: Option<Box<RawValue>>,
    event: Option<serde_json::Value>,
}

#[derive(Serialize)]
pub struct Recipients {
    /// Connections reached on this node.
    recipients: usize,
    /// Present (true) when the node is part of a cluster: other nodes'
    /// connections are reached too, and not counted here.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    cluster: bool,
}

fn topic_name(value: &serde_json::Value, field: &str) -> Result<Arc<str>, ApiError> {
    let name = value
        .as_str()
        .ok_or_else(|| ApiError::bad_request(format!("`{field}` must be a string")))?;
    topic::validate_name(name).map_err(|e| ApiError::invalid_topic(format!("`{name}`: {e}")))?;
    Ok(Arc::from(name))
}

fn event_name(value: Option<&serde_json::Value>) -> Result<Option<Arc<str>>, ApiError> {
    match value {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::String(s)) if topic::validate_name(s).is_ok() => {
            Ok(Some(Arc::from(s.as_str())))
        }
        Some(_) => Err(ApiError::bad_request(
            "`event` must be a string of 1-256 bytes without control characters",
        )),
    }
}

/// Payloads may be any JSON; a missing one is an error, not `null`.
fn body_payload(raw: Option<Box<RawValue>>, field: &str) -> Result<Arc<RawValue>, ApiError> {
    raw.map(Arc::from)
        .ok_or_else(|| ApiError::bad_request(format!("missing field `{field}`")))
}

pub async fn publish(
    State(gw): State<Arc<Gateway>>,
    _: Publisher,
    JsonBody(body): JsonBody<PublishBody>,
) -> Result<Json<Recipients>, ApiError> {
    let started = Instant::now();
    let topic = topic_name(&body.topic, "topic")?;
    let event = event_name(body.event.as_ref())?;
    let payload = body_payload(body.payload, "payload")?;
    Ok(fan_out(&gw, &[topic], event, payload, started))
}

pub async fn broadcast(
    State(gw): State<Arc<Gateway>>,
    _: Publisher,
    JsonBody(body): JsonBody<BroadcastBody>,
) -> Result<Json<Recipients>, ApiError> {
    let started = Instant::now();
    let rooms = match &body.rooms {
        serde_json::Value::Array(list) if list.is_empty() => {
            return Err(ApiError::bad_request("`rooms` must name at least one room"));
        }
        serde_json::Value::Array(list) if list.len() > MAX_ROOMS => {
            return Err(ApiError::bad_request(format!(
                "`rooms` may name at most {MAX_ROOMS} rooms"
            )));
        }
        serde_json::Value::Array(list) => list
            .iter()
            .map(|r| topic_name(r, "rooms"))
            .collect::<Result<Vec<_>, _>>()?,
        single => vec![topic_name(single, "rooms")?],
    };
    let event = event_name(body.event.as_ref())?;
    let data = body_payload(body.data, "data")?;
    Ok(fan_out(&gw, &rooms, event, data, started))
}

/// Both endpoints end the same way: publish, count, time the request.
fn fan_out(
    gw: &Gateway,
    rooms: &[Arc<str>],
    event: Option<Arc<str>>,
    payload: Arc<RawValue>,
    started: Instant,
) -> Json<Recipients> {
    gw.metrics.published_from("api");
    let recipients = gw.hub.publish_rooms(rooms, event, payload, now_ms());
    gw.metrics
        .stage_latency(Stage::ApiPublish)
        .observe(started.elapsed().as_secs_f64());
    Json(Recipients {
        recipients,
        cluster: gw.hub.clustered(),
    })
}
