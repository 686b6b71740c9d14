//! Prometheus metrics. One registry per server instance (no global recorder),
//! so several servers in one test process keep separate counts.

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// One label, e.g. `[("protocol", "ws")]`.
pub type Label = [(&'static str, &'static str); 1];

/// Stages whose latency is recorded.
#[derive(Debug, Clone, Copy)]
pub enum Stage {
    /// Hub fan-out of one publish to every local recipient (queueing only).
    Fanout,
    /// An HTTP publish or broadcast request, body parsing to answer.
    ApiPublish,
}

impl Stage {
    fn label(self) -> Label {
        [(
            "stage",
            match self {
                Stage::Fanout => "fanout",
                Stage::ApiPublish => "api_publish",
            },
        )]
    }
}

type HistogramFamily = Family<Label, Histogram, fn() -> Histogram>;

pub struct Metrics {
    registry: Registry,
    pub connections: Family<Label, Gauge>,
    pub connections_total: Family<Label, Counter>,
    pub subscriptions: Gauge,
    pub topics: Gauge,
    pub published: Family<Label, Counter>,
    pub delivered: Counter,
    pub dropped: Counter,
    pub auth_failures: Family<Label, Counter>,
    pub slow_consumer_closes: Counter,
    pub client_errors: Family<Label, Counter>,
    /// Socket.IO authentication requests by result (`ok`, `refreshed`, or the error code).
    pub sio_auth: Family<Label, Counter>,
    /// Presence store writes by result (`ok`, `failed`, `dropped`).
    pub presence_writes: Family<Label, Counter>,
    latency: HistogramFamily,
    /// The family's members, created once: observing is then one lock-free
    /// lookup-free call on the publish path.
    fanout_latency: Histogram,
    api_publish_latency: Histogram,
    /// 1 while the MQTT bridge holds a broker connection.
    pub mqtt_connected: Gauge,
    /// Broker connections re-established after one was lost or failed.
    pub mqtt_reconnects: Counter,
    /// Failed connection attempts and dropped connections.
    pub mqtt_connection_errors: Counter,
    /// Broker messages published into the hub.
    pub mqtt_messages_in: Counter,
    /// Client messages forwarded to the broker.
    pub mqtt_messages_out: Counter,
    /// Broker messages dropped because their topic cannot be a hub topic.
    pub mqtt_decode_failures: Counter,
    /// Broker messages dropped for exceeding `mqtt.max_payload`.
    pub mqtt_oversized: Counter,
    /// Filters currently subscribed on the broker.
    pub mqtt_broker_subscriptions: Gauge,
    /// Topics holding a last value.
    pub last_value_topics: Gauge,
    /// Messages and bytes (topic and payload text) held in topic history.
    pub history_messages: Gauge,
    pub history_bytes: Gauge,
    /// Recovery attempts by `outcome`: `/ws` `sub` requests with `since`
    /// (`recovered` or `reload`) and Socket.IO reconnects that send a pid
    /// (`recovered`, `reload`, `unknown_session`, `token_expired`).
    pub recoveries: Family<Label, Counter>,
    /// Socket.IO sessions kept for connection state recovery.
    pub sio_recovery_sessions: Gauge,
    /// 1 while this cluster node's backplane subscriber is connected.
    pub cluster_up: Gauge,
    /// Backplane messages by `kind`: `sent`, `received`, `duplicate`
    /// (the same publish again, through another of the node's channels),
    /// `unsent` (the backplane could not take it: delivered here only),
    /// `invalid`.
    pub cluster_messages: Family<Label, Counter>,
    /// Channels and patterns this node is subscribed to on the backplane.
    pub cluster_subscriptions: Gauge,
    /// Backplane connections re-established after one was lost.
    pub cluster_reconnects: Counter,
    /// Live nodes of this node's cluster in the last heartbeat round.
    pub cluster_nodes: Gauge,
    /// Dead nodes whose heartbeat and presence rows this node cleared.
    pub cluster_dead_nodes: Counter,
    /// Socket.IO virtual requests forwarded to the application's backend
    /// (`socketio.proxy_url`), by the `status` the client was answered:
    /// the backend's, or pulso's own when it refused or the backend failed
    /// (413, 429, 502, 503, 504).
    pub proxy_requests: Family<[(&'static str, u16); 1], Counter>,
    /// How long the backend took to answer a forwarded request, answer
    /// body included (timeouts and failures too).
    pub proxy_latency: Histogram,
}

fn proxy_histogram() -> Histogram {
    // 1 ms … ~16 s: a backend's answer, up to past the default timeout.
    Histogram::new(exponential_buckets(0.001, 2.0, 15))
}

fn latency_histogram() -> Histogram {
    // 10 µs … ~2.6 s
    Histogram::new(exponential_buckets(0.000_01, 4.0, 10))
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("pulso");
        let m = Metrics {
            connections: Family::default(),
            connections_total: Family::default(),
            subscriptions: Gauge::default(),
            topics: Gauge::default(),
            published: Family::default(),
            delivered: Counter::default(),
            dropped: Counter::default(),
            auth_failures: Family::default(),
            slow_consumer_closes: Counter::default(),
            client_errors: Family::default(),
            sio_auth: Family::default(),
            presence_writes: Family::default(),
            latency: Family::new_with_constructor(latency_histogram),
            fanout_latency: Histogram::new([]),
            api_publish_latency: Histogram::new([]),
            mqtt_connected: Gauge::default(),
            mqtt_reconnects: Counter::default(),
            mqtt_connection_errors: Counter::default(),
            mqtt_messages_in: Counter::default(),
            mqtt_messages_out: Counter::default(),
            mqtt_decode_failures: Counter::default(),
            mqtt_oversized: Counter::default(),
            mqtt_broker_subscriptions: Gauge::default(),
            last_value_topics: Gauge::default(),
            history_messages: Gauge::default(),
            history_bytes: Gauge::default(),
            recoveries: Family::default(),
            sio_recovery_sessions: Gauge::default(),
            cluster_up: Gauge::default(),
            cluster_messages: Family::default(),
            cluster_subscriptions: Gauge::default(),
            cluster_reconnects: Counter::default(),
            cluster_nodes: Gauge::default(),
            cluster_dead_nodes: Counter::default(),
            proxy_requests: Family::default(),
            proxy_latency: proxy_histogram(),
            registry: Registry::default(),
        };
        registry.register(
            "connections",
            "Open connections by protocol",
            m.connections.clone(),
        );
        registry.register(
            "connections_opened",
            "Connections accepted by protocol",
            m.connections_total.clone(),
        );
        registry.register(
            "subscriptions",
            "Subscriptions held by connections on this node",
            m.subscriptions.clone(),
        );
        registry.register(
            "topics",
            "Distinct topics and filters with at least one subscriber",
            m.topics.clone(),
        );
        registry.register(
            "messages_published",
            "Messages published, by source",
            m.published.clone(),
        );
        registry.register(
            "messages_delivered",
            "Messages queued to a connection",
            m.delivered.clone(),
        );
        registry.register(
            "messages_dropped",
            "Messages a connection could not take (slow consumer)",
            m.dropped.clone(),
        );
        registry.register(
            "auth_failures",
            "Failed authentications by reason",
            m.auth_failures.clone(),
        );
        registry.register(
            "slow_consumer_closes",
            "Connections closed because they could not keep up",
            m.slow_consumer_closes.clone(),
        );
        registry.register(
            "client_errors",
            "Error replies sent to clients, by code",
            m.client_errors.clone(),
        );
        registry.register(
            "socketio_auth",
            "Socket.IO authentication requests by result (ok, refreshed, or the error code)",
            m.sio_auth.clone(),
        );
        registry.register(
            "presence_writes",
            "Presence store writes by result (ok, failed after retries, dropped on a full queue)",
            m.presence_writes.clone(),
        );
        registry.register(
            "stage_latency_seconds",
            "Latency per processing stage",
            m.latency.clone(),
        );
        registry.register(
            "mqtt_connected",
            "1 while the MQTT bridge is connected to the broker",
            m.mqtt_connected.clone(),
        );
        registry.register(
            "history_messages",
            "Messages held in topic history",
            m.history_messages.clone(),
        );
        registry.register(
            "history_bytes",
            "Bytes of topic and payload text held in topic history",
            m.history_bytes.clone(),
        );
        registry.register(
            "recoveries",
            "Recovery attempts (/ws subscriptions with `since`, Socket.IO reconnects with a pid) by outcome (recovered, reload, unknown_session, token_expired)",
            m.recoveries.clone(),
        );
        registry.register(
            "socketio_recovery_sessions",
            "Socket.IO sessions kept for connection state recovery",
            m.sio_recovery_sessions.clone(),
        );
        registry.register(
            "cluster_up",
            "1 while the cluster backplane is connected",
            m.cluster_up.clone(),
        );
        registry.register(
            "cluster_messages",
            "Backplane messages by kind (sent, received, duplicate, unsent, invalid)",
            m.cluster_messages.clone(),
        );
        registry.register(
            "cluster_subscriptions",
            "Channels and patterns subscribed on the backplane",
            m.cluster_subscriptions.clone(),
        );
        registry.register(
            "cluster_reconnects",
            "Backplane connections re-established",
            m.cluster_reconnects.clone(),
        );
        registry.register(
            "cluster_nodes",
            "Live nodes of this cluster, from the heartbeats",
            m.cluster_nodes.clone(),
        );
        registry.register(
            "cluster_dead_nodes",
            "Dead cluster nodes whose presence rows this node cleared",
            m.cluster_dead_nodes.clone(),
        );
        registry.register(
            "mqtt_reconnects",
            "MQTT broker connections re-established after a loss or failure",
            m.mqtt_reconnects.clone(),
        );
        registry.register(
            "mqtt_connection_errors",
            "MQTT connection attempts that failed and connections that dropped",
            m.mqtt_connection_errors.clone(),
        );
        registry.register(
            "mqtt_messages_in",
            "MQTT messages received from the broker and published to the hub",
            m.mqtt_messages_in.clone(),
        );
        registry.register(
            "mqtt_messages_out",
            "Client messages forwarded to the MQTT broker",
            m.mqtt_messages_out.clone(),
        );
        registry.register(
            "mqtt_decode_failures",
            "MQTT messages dropped because their topic is not a valid hub topic",
            m.mqtt_decode_failures.clone(),
        );
        registry.register(
            "mqtt_oversized",
            "MQTT messages dropped for exceeding mqtt.max_payload",
            m.mqtt_oversized.clone(),
        );
        registry.register(
            "mqtt_broker_subscriptions",
            "Filters the bridge currently subscribes to on the broker",
            m.mqtt_broker_subscriptions.clone(),
        );
        registry.register(
            "last_value_topics",
            "Topics whose last message is kept for new subscribers",
            m.last_value_topics.clone(),
        );
        registry.register(
            "socketio_proxy_requests",
            "Socket.IO virtual requests forwarded to the application's backend, by the status answered",
            m.proxy_requests.clone(),
        );
        registry.register(
            "socketio_proxy_latency_seconds",
            "Time for the application's backend to answer a forwarded Socket.IO request",
            m.proxy_latency.clone(),
        );
        Metrics {
            registry,
            fanout_latency: m.latency.get_or_create_owned(&Stage::Fanout.label()),
            api_publish_latency: m.latency.get_or_create_owned(&Stage::ApiPublish.label()),
            ..m
        }
    }

    pub fn stage_latency(&self, stage: Stage) -> &Histogram {
        match stage {
            Stage::Fanout => &self.fanout_latency,
            Stage::ApiPublish => &self.api_publish_latency,
        }
    }

    pub fn auth_failure(&self, reason: &'static str) {
        self.auth_failures
            .get_or_create(&[("reason", reason)])
            .inc();
    }

    pub fn client_error(&self, code: &'static str) {
        self.client_errors.get_or_create(&[("code", code)]).inc();
    }

    pub fn sio_auth_result(&self, result: &'static str) {
        self.sio_auth.get_or_create(&[("result", result)]).inc();
    }

    pub fn presence_write(&self, result: &'static str) {
        self.presence_writes
            .get_or_create(&[("result", result)])
            .inc();
    }

    /// Open connections of both protocols: what a cluster heartbeat
    /// reports as this node's `connections`.
    pub fn open_connections(&self) -> i64 {
        ["ws", "socketio"]
            .iter()
            .filter_map(|p| self.connections.get(&[("protocol", p)]).map(|g| g.get()))
            .sum()
    }

    pub fn published_from(&self, source: &'static str) {
        self.published.get_or_create(&[("source", source)]).inc();
    }

    /// The Prometheus/OpenMetrics text exposition.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(4096);
        // Writing to a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}
