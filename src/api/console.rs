//! `GET /api/console` (publisher auth): what the console (`GET /`) shows an
//! operator about this node: connections by protocol, the busiest topics
//! and rooms, message counts, and the state of the MQTT bridge, the
//! presence store, the cluster and history.
//!
//! Everything but the cluster's node list is read from memory (the
//! metrics, one pass over the hub's table for the top topics), so the
//! answer is cheap; the node list is the presence store's heartbeat query,
//! bounded by [`NODES_TIMEOUT`].

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::{Query, State};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use serde::{Deserialize, Serialize};

use super::{ApiError, Publisher};
use crate::gateway::{Gateway, NodeRow};
use crate::hub::{MAX_TOP_TOPICS, TopicCount};
use crate::metrics::Label;

/// How many topics `?top=` lists when not given.
pub const DEFAULT_TOP: usize = 10;

/// How long the answer waits for the cluster's node list.
pub const NODES_TIMEOUT: Duration = Duration::from_secs(2);

/// The connection protocols, as the `pulso_connections` metric labels them.
const PROTOCOLS: [&str; 2] = ["ws", "socketio"];
/// Sources of published messages (`pulso_messages_published`).
const SOURCES: [&str; 4] = ["api", "ws", "mqtt", "demo"];
/// Outcomes of recovery attempts (`pulso_recoveries`).
const OUTCOMES: [&str; 4] = ["recovered", "reload", "unknown_session", "token_expired"];
/// Results of presence writes (`pulso_presence_writes`).
const WRITES: [&str; 3] = ["ok", "failed", "dropped"];

#[derive(Deserialize)]
pub struct Params {
    top: Option<String>,
}

#[derive(Serialize)]
pub struct Console {
    node: String,
    version: &'static str,
    uptime_seconds: u64,
    /// As `/readyz` reports it.
    ready: bool,
    checks: serde_json::Map<String, serde_json::Value>,
    connections: Connections,
    /// Subscriptions of every connection on this node.
    subscriptions: i64,
    /// Topics, rooms and wildcard filters with a subscriber on this node.
    topics: usize,
    top: Vec<TopicCount>,
    messages: Messages,
    mqtt: Mqtt,
    presence: Presence,
    cluster: Cluster,
    history: History,
}

#[derive(Serialize)]
struct Connections {
    ws: i64,
    socketio: i64,
    total: i64,
    /// Socket.IO sessions on long-polling (counted in `socketio` too).
    polling_sessions: i64,
}

#[derive(Serialize)]
struct Messages {
    /// By source: `api`, `ws`, `mqtt`, `demo`.
    published: BTreeMap<&'static str, u64>,
    delivered: u64,
    dropped: u64,
    slow_consumer_closes: u64,
}

#[derive(Serialize)]
struct Mqtt {
    enabled: bool,
    /// `host:port`, never the credentials.
    #[serde(skip_serializing_if = "Option::is_none")]
    broker: Option<String>,
    tls: bool,
    connected: bool,
    topics: Vec<String>,
    broker_subscriptions: i64,
    messages_in: u64,
    messages_out: u64,
    reconnects: u64,
    last_value_topics: i64,
}

#[derive(Serialize)]
struct Presence {
    /// `sqlite` or `postgres`.
    store: &'static str,
    /// `ok`, or why the store is not usable now.
    status: String,
    writes: BTreeMap<&'static str, u64>,
}

#[derive(Serialize)]
struct Cluster {
    /// `redis`, `nats`, or null on a single node.
    engine: Option<&'static str>,
    /// Whether the backplane is connected (null on a single node).
    up: Option<bool>,
    /// The live nodes from their heartbeats; a single node lists itself.
    nodes: Vec<NodeRow>,
    /// Why the node list could not be read.
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

#[derive(Serialize)]
struct History {
    enabled: bool,
    topics: Vec<String>,
    messages: i64,
    bytes: i64,
    recoveries: BTreeMap<&'static str, u64>,
    socketio_recovery_sessions: i64,
}

fn parse_top(raw: Option<&str>) -> Result<usize, ApiError> {
    let Some(raw) = raw.filter(|s| !s.is_empty()) else {
        return Ok(DEFAULT_TOP);
    };
    match raw.parse::<usize>() {
        Ok(n) if (1..=MAX_TOP_TOPICS).contains(&n) => Ok(n),
        _ => Err(ApiError::bad_request(format!(
            "`top` must be a number from 1 to {MAX_TOP_TOPICS}"
        ))),
    }
}

/// A labelled gauge's value (0 before it was first set).
fn gauge(family: &Family<Label, Gauge>, key: &'static str, value: &'static str) -> i64 {
    family.get(&[(key, value)]).map(|g| g.get()).unwrap_or(0)
}

/// A labelled counter's value (0 before it was first counted).
fn counter(family: &Family<Label, Counter>, key: &'static str, value: &'static str) -> u64 {
    family.get(&[(key, value)]).map(|c| c.get()).unwrap_or(0)
}

fn counters(
    family: &Family<Label, Counter>,
    key: &'static str,
    values: &[&'static str],
) -> BTreeMap<&'static str, u64> {
    values
        .iter()
        .map(|v| (*v, counter(family, key, v)))
        .collect()
}

pub async fn console(
    _: Publisher,
    State(gw): State<Arc<Gateway>>,
    params: Result<Query<Params>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Console>, ApiError> {
    let Query(params) = params.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let top = parse_top(params.top.as_deref())?;
    let m = &gw.metrics;
    let cfg = &gw.config;

    let (ws, socketio) = (
        gauge(&m.connections, "protocol", PROTOCOLS[0]),
        gauge(&m.connections, "protocol", PROTOCOLS[1]),
    );
    let (ready, checks) = gw.readiness.report();
    let broker = cfg.mqtt.broker.as_ref();
    let engine = cfg.cluster.engine_name();
    let (nodes, error) = match tokio::time::timeout(NODES_TIMEOUT, gw.presence.nodes()).await {
        Ok(Ok(nodes)) => (nodes, None),
        Ok(Err(e)) => (Vec::new(), Some(e.to_string())),
        Err(_) => (
            Vec::new(),
            Some(format!(
                "the node list took more than {} s",
                NODES_TIMEOUT.as_secs()
            )),
        ),
    };
    Ok(Json(Console {
        node: cfg.node_id.clone(),
        version: env!("CARGO_PKG_VERSION"),
        uptime_seconds: gw.started.elapsed().as_secs(),
        ready: ready && !gw.shutdown.is_cancelled(),
        checks,
        connections: Connections {
            ws,
            socketio,
            total: ws + socketio,
            polling_sessions: m.sio_polling_sessions.get(),
        },
        subscriptions: m.subscriptions.get(),
        topics: gw.hub.topic_count(),
        top: gw.hub.top_topics(top),
        messages: Messages {
            published: counters(&m.published, "source", &SOURCES),
            delivered: m.delivered.get(),
            dropped: m.dropped.get(),
            slow_consumer_closes: m.slow_consumer_closes.get(),
        },
        mqtt: Mqtt {
            enabled: broker.is_some(),
            broker: broker.map(|b| format!("{}:{}", b.host, b.port)),
            tls: broker.is_some_and(|b| b.tls),
            connected: m.mqtt_connected.get() == 1,
            topics: cfg.mqtt.topics.iter().map(|f| f.to_string()).collect(),
            broker_subscriptions: m.mqtt_broker_subscriptions.get(),
            messages_in: m.mqtt_messages_in.get(),
            messages_out: m.mqtt_messages_out.get(),
            reconnects: m.mqtt_reconnects.get(),
            last_value_topics: m.last_value_topics.get(),
        },
        presence: Presence {
            store: if cfg.presence.database_url.starts_with("postgres") {
                "postgres"
            } else {
                "sqlite"
            },
            status: match gw.presence.status() {
                Ok(()) => "ok".into(),
                Err(reason) => reason,
            },
            writes: counters(&m.presence_writes, "result", &WRITES),
        },
        cluster: Cluster {
            engine,
            up: engine.map(|_| m.cluster_up.get() == 1),
            nodes,
            error,
        },
        history: History {
            enabled: !cfg.history.topics.is_empty(),
            topics: cfg.history.topics.iter().map(|f| f.to_string()).collect(),
            messages: m.history_messages.get(),
            bytes: m.history_bytes.get(),
            recoveries: counters(&m.recoveries, "outcome", &OUTCOMES),
            socketio_recovery_sessions: m.sio_recovery_sessions.get(),
        },
    }))
}
