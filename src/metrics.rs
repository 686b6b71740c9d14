//! Prometheus metrics. One registry per server instance (no global recorder),
//! so several servers in one test process keep separate counts.
//!
//! Every metric is described once, in [`METRICS`]: its help text (what
//! `/metrics` says), its area and its label. [`reference_markdown`] renders
//! the registry of a fresh [`Metrics`] with those descriptions
//! (`pulso metrics-reference`, which `docs/metrics.md` is).

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Metric, Registry};

/// One label, e.g. `[("protocol", "ws")]`.
pub type Label = [(&'static str, &'static str); 1];

/// Stages whose latency is recorded.
#[derive(Debug, Clone, Copy)]
pub enum Stage {
    /// Hub fan-out of one publish to every local recipient (queueing only).
    Fanout,
    /// An HTTP publish or broadcast request, body parsing to answer.
    ApiPublish,
    /// One presence transaction (a group commit of queued writes).
    PresenceCommit,
}

impl Stage {
    fn label(self) -> Label {
        [(
            "stage",
            match self {
                Stage::Fanout => "fanout",
                Stage::ApiPublish => "api_publish",
                Stage::PresenceCommit => "presence_commit",
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
    /// Connections refused before they opened, by `reason`:
    /// `max_connections`, `max_connections_per_ip`, `max_polling_sessions`.
    pub connections_refused: Family<Label, Counter>,
    /// Requests refused for their `Origin`, by `endpoint` (`ws`, `socketio`).
    pub origin_refusals: Family<Label, Counter>,
    /// Open Engine.IO long-polling sessions.
    pub sio_polling_sessions: Gauge,
    pub client_errors: Family<Label, Counter>,
    /// Socket.IO authentication requests by result (`ok`, `refreshed`, or the error code).
    pub sio_auth: Family<Label, Counter>,
    /// Presence store writes by result (`ok`, `failed`, `dropped`).
    pub presence_writes: Family<Label, Counter>,
    /// Presence rows waiting for the writer (one per (role, sub)).
    pub presence_queue: Gauge,
    /// Presence writes folded into one still queued for the same row.
    pub presence_coalesced: Counter,
    /// Reconciliations of this node's rows with what it holds, by `result`.
    pub presence_resyncs: Family<Label, Counter>,
    latency: HistogramFamily,
    /// The family's members, created once: observing is then one lock-free
    /// lookup-free call on the publish path.
    fanout_latency: Histogram,
    api_publish_latency: Histogram,
    presence_commit_latency: Histogram,
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
    /// `invalid`, `dropped` (lost by a node too slow for its NATS
    /// subscriptions).
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
    /// Certificate reloads (SIGHUP) by `result`: `ok`, or `error` (the
    /// files did not load and the previous certificate stays in use).
    pub tls_reloads: Family<Label, Counter>,
    /// TLS connections dropped before their handshake completed, by
    /// `reason`: `timeout` (`http.header_timeout`) or `error`.
    pub tls_handshake_failures: Family<Label, Counter>,
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
            connections_refused: Family::default(),
            origin_refusals: Family::default(),
            sio_polling_sessions: Gauge::default(),
            client_errors: Family::default(),
            sio_auth: Family::default(),
            presence_writes: Family::default(),
            presence_queue: Gauge::default(),
            presence_coalesced: Counter::default(),
            presence_resyncs: Family::default(),
            latency: Family::new_with_constructor(latency_histogram),
            fanout_latency: Histogram::new([]),
            api_publish_latency: Histogram::new([]),
            presence_commit_latency: Histogram::new([]),
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
            tls_reloads: Family::default(),
            tls_handshake_failures: Family::default(),
            registry: Registry::default(),
        };
        reg(&mut registry, "connections", m.connections.clone());
        reg(
            &mut registry,
            "connections_opened",
            m.connections_total.clone(),
        );
        reg(&mut registry, "subscriptions", m.subscriptions.clone());
        reg(&mut registry, "topics", m.topics.clone());
        reg(&mut registry, "messages_published", m.published.clone());
        reg(&mut registry, "messages_delivered", m.delivered.clone());
        reg(&mut registry, "messages_dropped", m.dropped.clone());
        reg(&mut registry, "auth_failures", m.auth_failures.clone());
        reg(
            &mut registry,
            "slow_consumer_closes",
            m.slow_consumer_closes.clone(),
        );
        reg(
            &mut registry,
            "connections_refused",
            m.connections_refused.clone(),
        );
        reg(&mut registry, "origin_refused", m.origin_refusals.clone());
        reg(
            &mut registry,
            "socketio_polling_sessions",
            m.sio_polling_sessions.clone(),
        );
        reg(&mut registry, "client_errors", m.client_errors.clone());
        reg(&mut registry, "socketio_auth", m.sio_auth.clone());
        reg(&mut registry, "presence_writes", m.presence_writes.clone());
        reg(&mut registry, "presence_queue", m.presence_queue.clone());
        reg(
            &mut registry,
            "presence_coalesced",
            m.presence_coalesced.clone(),
        );
        reg(
            &mut registry,
            "presence_resyncs",
            m.presence_resyncs.clone(),
        );
        reg(&mut registry, "stage_latency_seconds", m.latency.clone());
        reg(&mut registry, "mqtt_connected", m.mqtt_connected.clone());
        reg(
            &mut registry,
            "history_messages",
            m.history_messages.clone(),
        );
        reg(&mut registry, "history_bytes", m.history_bytes.clone());
        reg(&mut registry, "recoveries", m.recoveries.clone());
        reg(
            &mut registry,
            "socketio_recovery_sessions",
            m.sio_recovery_sessions.clone(),
        );
        reg(&mut registry, "cluster_up", m.cluster_up.clone());
        reg(
            &mut registry,
            "cluster_messages",
            m.cluster_messages.clone(),
        );
        reg(
            &mut registry,
            "cluster_subscriptions",
            m.cluster_subscriptions.clone(),
        );
        reg(
            &mut registry,
            "cluster_reconnects",
            m.cluster_reconnects.clone(),
        );
        reg(&mut registry, "cluster_nodes", m.cluster_nodes.clone());
        reg(
            &mut registry,
            "cluster_dead_nodes",
            m.cluster_dead_nodes.clone(),
        );
        reg(&mut registry, "mqtt_reconnects", m.mqtt_reconnects.clone());
        reg(
            &mut registry,
            "mqtt_connection_errors",
            m.mqtt_connection_errors.clone(),
        );
        reg(
            &mut registry,
            "mqtt_messages_in",
            m.mqtt_messages_in.clone(),
        );
        reg(
            &mut registry,
            "mqtt_messages_out",
            m.mqtt_messages_out.clone(),
        );
        reg(
            &mut registry,
            "mqtt_decode_failures",
            m.mqtt_decode_failures.clone(),
        );
        reg(&mut registry, "mqtt_oversized", m.mqtt_oversized.clone());
        reg(
            &mut registry,
            "mqtt_broker_subscriptions",
            m.mqtt_broker_subscriptions.clone(),
        );
        reg(
            &mut registry,
            "last_value_topics",
            m.last_value_topics.clone(),
        );
        reg(
            &mut registry,
            "socketio_proxy_requests",
            m.proxy_requests.clone(),
        );
        reg(
            &mut registry,
            "socketio_proxy_latency_seconds",
            m.proxy_latency.clone(),
        );
        reg(&mut registry, "tls_reloads", m.tls_reloads.clone());
        reg(
            &mut registry,
            "tls_handshake_failures",
            m.tls_handshake_failures.clone(),
        );
        Metrics {
            registry,
            fanout_latency: m.latency.get_or_create_owned(&Stage::Fanout.label()),
            api_publish_latency: m.latency.get_or_create_owned(&Stage::ApiPublish.label()),
            presence_commit_latency: m
                .latency
                .get_or_create_owned(&Stage::PresenceCommit.label()),
            ..m
        }
    }

    pub fn stage_latency(&self, stage: Stage) -> &Histogram {
        match stage {
            Stage::Fanout => &self.fanout_latency,
            Stage::ApiPublish => &self.api_publish_latency,
            Stage::PresenceCommit => &self.presence_commit_latency,
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

    pub fn connection_refused(&self, reason: &'static str) {
        self.connections_refused
            .get_or_create(&[("reason", reason)])
            .inc();
    }

    pub fn origin_refused(&self, endpoint: &'static str) {
        self.origin_refusals
            .get_or_create(&[("endpoint", endpoint)])
            .inc();
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

    pub fn tls_reload(&self, result: &'static str) {
        self.tls_reloads.get_or_create(&[("result", result)]).inc();
    }

    pub fn tls_handshake_failed(&self, reason: &'static str) {
        self.tls_handshake_failures
            .get_or_create(&[("reason", reason)])
            .inc();
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

/// One metric family as `/metrics` and the reference describe it.
pub struct MetricDoc {
    /// The registered name: the exposition's is `pulso_<name>`, with
    /// `_total` on a counter's series and `_bucket`, `_sum` and `_count`
    /// on a histogram's.
    pub name: &'static str,
    /// The reference's section.
    pub area: &'static str,
    /// The label of a family and what its values are; `None` for a single
    /// series.
    pub label: Option<(&'static str, &'static str)>,
    /// The `# HELP` text: one line, no final period (the encoder adds it).
    pub help: &'static str,
}

/// The reference's sections, in order.
pub const AREAS: [&str; 10] = [
    "Connections",
    "Messages",
    "Authentication and client errors",
    "Presence",
    "Latency",
    "History and recovery",
    "MQTT bridge",
    "Cluster",
    "Socket.IO proxy",
    "TLS",
];

/// Every metric pulso exports; a unit test checks that this list and the
/// registry name the same metrics.
pub const METRICS: &[MetricDoc] = &[
    MetricDoc {
        name: "connections",
        area: "Connections",
        label: Some(("protocol", "`ws`, `socketio`")),
        help: "Client connections open now, by protocol: ws (/ws WebSockets) and socketio (Engine.IO sessions, over WebSocket or long-polling)",
    },
    MetricDoc {
        name: "connections_opened",
        area: "Connections",
        label: Some(("protocol", "`ws`, `socketio`")),
        help: "Client connections accepted since the process started, by protocol (ws, socketio)",
    },
    MetricDoc {
        name: "subscriptions",
        area: "Connections",
        label: None,
        help: "Subscriptions held by this node's connections: /ws topics and filters, Socket.IO rooms",
    },
    MetricDoc {
        name: "topics",
        area: "Connections",
        label: None,
        help: "Distinct topics, filters and rooms with at least one subscriber on this node",
    },
    MetricDoc {
        name: "slow_consumer_closes",
        area: "Connections",
        label: None,
        help: "Connections closed (1013) because they fell more than ws.outbound_queue messages behind",
    },
    MetricDoc {
        name: "connections_refused",
        area: "Connections",
        label: Some((
            "reason",
            "`max_connections`, `max_connections_per_ip`, `max_polling_sessions`",
        )),
        help: "Connections refused before they opened (HTTP 503), by the limit they hit",
    },
    MetricDoc {
        name: "origin_refused",
        area: "Connections",
        label: Some(("endpoint", "`ws`, `socketio`")),
        help: "Requests refused (HTTP 403) because their Origin is not in allowed_origins, by endpoint",
    },
    MetricDoc {
        name: "socketio_polling_sessions",
        area: "Connections",
        label: None,
        help: "Open Engine.IO long-polling sessions (capped by socketio.max_polling_sessions)",
    },
    MetricDoc {
        name: "socketio_proxy_requests",
        area: "Socket.IO proxy",
        label: Some((
            "status",
            "the HTTP status answered: the backend's, or pulso's own (413, 429, 502, 503, 504)",
        )),
        help: "Socket.IO virtual requests forwarded to the application's backend (socketio.proxy_url), by the status answered",
    },
    MetricDoc {
        name: "socketio_proxy_latency_seconds",
        area: "Socket.IO proxy",
        label: None,
        help: "Time for the application's backend to answer a forwarded Socket.IO request, body included (timeouts and failures too)",
    },
    MetricDoc {
        name: "messages_published",
        area: "Messages",
        label: Some(("source", "`api`, `ws`, `mqtt`, `demo`, `library`")),
        help: "Messages published into the hub on this node, by source: api (POST /api/publish and /api/broadcast), ws (/ws clients), mqtt (the broker), demo (the demo feed), library (the Rust code of an application that embeds pulso)",
    },
    MetricDoc {
        name: "messages_delivered",
        area: "Messages",
        label: None,
        help: "Messages queued to connections on this node, one per recipient connection (replayed last values and history included)",
    },
    MetricDoc {
        name: "messages_dropped",
        area: "Messages",
        label: None,
        help: "Messages a connection lost because it was too far behind or already closing (see slow_consumer_closes)",
    },
    MetricDoc {
        name: "auth_failures",
        area: "Authentication and client errors",
        label: Some((
            "reason",
            "`missing`, `invalid`, `expired`, `not_yet_valid`; Socket.IO also `forbidden_role`, `unknown_url`, `malformed`",
        )),
        help: "Authentications refused, by reason (missing, invalid, expired, not_yet_valid; Socket.IO also forbidden_role, unknown_url, malformed)",
    },
    MetricDoc {
        name: "socketio_auth",
        area: "Authentication and client errors",
        label: Some((
            "result",
            "`ok`, `refreshed`, `timeout`, or the error code (`401-1`, `401-2`, `401-3`, `403-1`, …)",
        )),
        help: "Socket.IO authentication requests (get /notifications), by result: ok, refreshed (a new token on an authenticated socket), timeout (none within socketio.auth_timeout), or the error code",
    },
    MetricDoc {
        name: "client_errors",
        area: "Authentication and client errors",
        label: Some((
            "code",
            "the error code sent: `/ws` codes ([protocol.md](protocol.md)), Socket.IO codes ([socketio.md](socketio.md))",
        )),
        help: "Error replies sent to clients, by the error code sent (/ws codes such as forbidden, Socket.IO codes such as 401-2)",
    },
    MetricDoc {
        name: "presence_writes",
        area: "Presence",
        label: Some(("result", "`ok`, `failed`, `dropped`")),
        help: "Presence row writes, by result: ok (committed), failed (given up after retries), dropped (the queue, presence.queue rows, was full; the rows are reconciled later)",
    },
    MetricDoc {
        name: "presence_queue",
        area: "Presence",
        label: None,
        help: "Presence rows waiting to be written (one per role and sub however many changes it had; at most presence.queue)",
    },
    MetricDoc {
        name: "presence_coalesced",
        area: "Presence",
        label: None,
        help: "Presence changes folded into a write still queued for the same row (a connect and a disconnect of one socket, say): one database write instead of several",
    },
    MetricDoc {
        name: "presence_resyncs",
        area: "Presence",
        label: Some(("result", "`ok`, `failed`")),
        help: "Reconciliations of this node's presence rows with the sockets it holds, after writes were dropped or lost or the store reconnected, by result: ok, failed (retried later)",
    },
    MetricDoc {
        name: "stage_latency_seconds",
        area: "Latency",
        label: Some(("stage", "`fanout`, `api_publish`, `presence_commit`")),
        help: "Seconds spent per processing stage: fanout (one publish appended for every local recipient, not the socket writes), api_publish (an HTTP publish or broadcast, body read to answer), presence_commit (one presence transaction, a group commit)",
    },
    MetricDoc {
        name: "history_messages",
        area: "History and recovery",
        label: None,
        help: "Messages held in topic history (history.topics)",
    },
    MetricDoc {
        name: "history_bytes",
        area: "History and recovery",
        label: None,
        help: "Bytes of topic and payload text held in topic history",
    },
    MetricDoc {
        name: "last_value_topics",
        area: "History and recovery",
        label: None,
        help: "Topics whose last message is kept and replayed to new subscribers (mqtt.topics)",
    },
    MetricDoc {
        name: "recoveries",
        area: "History and recovery",
        label: Some((
            "outcome",
            "`recovered`, `reload`; Socket.IO also `unknown_session`, `token_expired`",
        )),
        help: "Recovery attempts, by outcome: /ws sub requests with since (recovered, reload) and Socket.IO reconnects that send a pid (recovered, reload, unknown_session, token_expired)",
    },
    MetricDoc {
        name: "socketio_recovery_sessions",
        area: "History and recovery",
        label: None,
        help: "Socket.IO sessions kept after a disconnect for connection state recovery",
    },
    MetricDoc {
        name: "mqtt_connected",
        area: "MQTT bridge",
        label: None,
        help: "1 while the MQTT bridge holds a connection to the broker, else 0 (also 0 with the bridge off)",
    },
    MetricDoc {
        name: "mqtt_reconnects",
        area: "MQTT bridge",
        label: None,
        help: "MQTT broker connections re-established after one was lost or an attempt failed",
    },
    MetricDoc {
        name: "mqtt_connection_errors",
        area: "MQTT bridge",
        label: None,
        help: "MQTT connection attempts that failed and connections that dropped",
    },
    MetricDoc {
        name: "mqtt_messages_in",
        area: "MQTT bridge",
        label: None,
        help: "MQTT messages received from the broker and published into the hub",
    },
    MetricDoc {
        name: "mqtt_messages_out",
        area: "MQTT bridge",
        label: None,
        help: "Client messages forwarded to the MQTT broker",
    },
    MetricDoc {
        name: "mqtt_decode_failures",
        area: "MQTT bridge",
        label: None,
        help: "MQTT messages dropped because their topic cannot be a hub topic",
    },
    MetricDoc {
        name: "mqtt_oversized",
        area: "MQTT bridge",
        label: None,
        help: "MQTT messages dropped for exceeding mqtt.max_payload",
    },
    MetricDoc {
        name: "mqtt_broker_subscriptions",
        area: "MQTT bridge",
        label: None,
        help: "Filters the bridge is subscribed to on the broker now",
    },
    MetricDoc {
        name: "cluster_up",
        area: "Cluster",
        label: None,
        help: "1 while this node's cluster backplane (Redis or NATS) is connected, else 0 (also 0 without clustering)",
    },
    MetricDoc {
        name: "cluster_messages",
        area: "Cluster",
        label: Some((
            "kind",
            "`sent`, `received`, `duplicate`, `unsent`, `invalid`, `dropped`, `session_unsent`",
        )),
        help: "Backplane messages, by kind: sent, received, duplicate (a copy already seen, dropped), unsent (the backplane could not take it: delivered on this node only), invalid (could not be decoded), dropped (NATS only: lost because this node fell behind its subscriptions), session_unsent (a Socket.IO recovery session write dropped because its queue was full: that session recovers on its own node only)",
    },
    MetricDoc {
        name: "cluster_subscriptions",
        area: "Cluster",
        label: None,
        help: "Channels and patterns (Redis) or subjects (NATS) this node is subscribed to on the backplane",
    },
    MetricDoc {
        name: "cluster_reconnects",
        area: "Cluster",
        label: None,
        help: "Backplane connections re-established after one was lost",
    },
    MetricDoc {
        name: "cluster_nodes",
        area: "Cluster",
        label: None,
        help: "Live nodes of this cluster in this node's last heartbeat round",
    },
    MetricDoc {
        name: "cluster_dead_nodes",
        area: "Cluster",
        label: None,
        help: "Dead cluster nodes whose heartbeat and presence rows this node cleared",
    },
    MetricDoc {
        name: "tls_reloads",
        area: "TLS",
        label: Some(("result", "`ok`, `error`")),
        help: "Reloads of tls.cert_file and tls.key_file on SIGHUP, by result; after an error the previous certificate stays in use and the log says why",
    },
    MetricDoc {
        name: "tls_handshake_failures",
        area: "TLS",
        label: Some(("reason", "`timeout`, `error`")),
        help: "Connections to the TLS listener dropped before their handshake completed: timeout (no complete handshake within http.header_timeout) or error (not TLS, no shared protocol version, cipher or ALPN, a client that does not trust the certificate)",
    },
];

/// The help text of `name` in [`METRICS`] (empty for a name not there,
/// which a unit test rules out).
fn help(name: &str) -> &'static str {
    METRICS
        .iter()
        .find(|d| d.name == name)
        .map_or("", |d| d.help)
}

fn reg(registry: &mut Registry, name: &'static str, metric: impl Metric) {
    registry.register(name, help(name), metric);
}

/// A family as the registry encodes it: name (with the prefix), type, help.
struct Encoded {
    name: String,
    kind: String,
    help: String,
    /// The label of its series (`le` aside), if any.
    label: Option<String>,
}

/// A fresh registry with a series in every labelled family: the text
/// exposition leaves a family without series out. A family added to
/// [`Metrics`] must be added here too (a unit test finds it missing).
fn specimen() -> Metrics {
    let m = Metrics::new();
    let label = |name: &str| -> Label {
        let key = METRICS
            .iter()
            .find(|d| d.name == name)
            .and_then(|d| d.label)
            .map_or("label", |(key, _)| key);
        [(key, "specimen")]
    };
    let _ = m.connections.get_or_create(&label("connections"));
    let _ = m
        .connections_total
        .get_or_create(&label("connections_opened"));
    let _ = m.published.get_or_create(&label("messages_published"));
    let _ = m.auth_failures.get_or_create(&label("auth_failures"));
    let _ = m.client_errors.get_or_create(&label("client_errors"));
    let _ = m.sio_auth.get_or_create(&label("socketio_auth"));
    let _ = m.presence_writes.get_or_create(&label("presence_writes"));
    let _ = m.presence_resyncs.get_or_create(&label("presence_resyncs"));
    let _ = m.recoveries.get_or_create(&label("recoveries"));
    let _ = m.cluster_messages.get_or_create(&label("cluster_messages"));
    let _ = m
        .connections_refused
        .get_or_create(&label("connections_refused"));
    let _ = m.origin_refusals.get_or_create(&label("origin_refused"));
    let _ = m.proxy_requests.get_or_create(&[("status", 200)]);
    let _ = m.tls_reloads.get_or_create(&label("tls_reloads"));
    let _ = m
        .tls_handshake_failures
        .get_or_create(&label("tls_handshake_failures"));
    m
}

/// The `# HELP` and `# TYPE` lines of the registry, in order, with the
/// label its first series carries.
fn encoded_families() -> Vec<Encoded> {
    let text = specimen().render();
    let mut out: Vec<Encoded> = Vec::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').unwrap_or((rest, ""));
            out.push(Encoded {
                name: name.to_string(),
                kind: String::new(),
                help: help.to_string(),
                label: None,
            });
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, ""));
            if let Some(e) = out.iter_mut().rev().find(|e| e.name == name) {
                e.kind = kind.to_string();
            }
        } else if let (Some(e), Some((_, labels))) = (out.last_mut(), line.split_once('{'))
            && e.label.is_none()
        {
            e.label = labels
                .split(['=', ','])
                .step_by(2)
                .find(|k| *k != "le")
                .map(str::to_string);
        }
    }
    out
}

/// The metrics reference in Markdown (`docs/metrics.md` is this output,
/// checked by a test): every family the registry holds, by area, with the
/// series names a query uses, type, label and help.
pub fn reference_markdown() -> String {
    let families = encoded_families();
    let mut out = String::from(
        "# Metrics reference\n\n\
         <!-- Generated by `pulso metrics-reference`; do not edit. -->\n\n\
         `GET /metrics` answers in the Prometheus text format (OpenMetrics \
         flavour). Every metric is per node: in a cluster, sum over the \
         nodes (or group by `instance`). Counters count from the process's \
         start; query them with `rate()` or `increase()`. A family with a \
         label has no series until its first event, so a query over it \
         returns nothing (not 0) before then. The series column gives the \
         names a query uses: a counter's series end in `_total`, a \
         histogram has `_bucket` (with `le`), `_sum` and `_count` series. \
         Latency histogram buckets: 10 µs × 4ⁿ, n = 0…9 (10 µs to 2.6 s).\n\n\
         A Grafana dashboard built on these names is in \
         [grafana/pulso.json](grafana/pulso.json).\n",
    );
    let cell = |s: &str| s.replace('|', "\\|");
    let mut areas: Vec<&str> = AREAS.to_vec();
    let undocumented = families.iter().any(|f| {
        !METRICS
            .iter()
            .any(|d| format!("pulso_{}", d.name) == f.name)
    });
    if undocumented {
        areas.push("Other");
    }
    for area in areas {
        out.push_str(&format!(
            "\n## {area}\n\n| series | type | label | description |\n|---|---|---|---|\n"
        ));
        for f in &families {
            let doc = METRICS
                .iter()
                .find(|d| format!("pulso_{}", d.name) == f.name);
            if doc.map_or("Other", |d| d.area) != area {
                continue;
            }
            let series = match f.kind.as_str() {
                "counter" => format!("`{}_total`", f.name),
                "histogram" => format!("`{n}_bucket`, `{n}_sum`, `{n}_count`", n = f.name),
                _ => format!("`{}`", f.name),
            };
            let label = match (&f.label, doc.and_then(|d| d.label)) {
                (Some(name), Some((_, values))) => format!("`{name}`: {values}"),
                (Some(name), None) => format!("`{name}`"),
                (None, _) => "—".to_string(),
            };
            out.push_str(&format!(
                "| {series} | {} | {} | {} |\n",
                f.kind,
                cell(&label),
                cell(&f.help)
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_registered_metric_is_described_and_every_description_registered() {
        let families = encoded_families();
        for f in &families {
            assert!(
                METRICS
                    .iter()
                    .any(|d| format!("pulso_{}", d.name) == f.name),
                "{} is registered but not in METRICS",
                f.name
            );
            assert!(!f.kind.is_empty(), "{} has a type", f.name);
            let doc = METRICS
                .iter()
                .find(|d| format!("pulso_{}", d.name) == f.name);
            assert_eq!(
                f.label.as_deref(),
                doc.and_then(|d| d.label).map(|(l, _)| l),
                "{}: the label of its series is the documented one",
                f.name
            );
            assert!(f.help.len() > 20, "{} has a help text", f.name);
        }
        for d in METRICS {
            assert!(
                families
                    .iter()
                    .any(|f| f.name == format!("pulso_{}", d.name)),
                "{} is described but not registered (or not in `specimen`)",
                d.name
            );
            assert!(
                AREAS.contains(&d.area),
                "{}: unknown area {}",
                d.name,
                d.area
            );
            assert!(
                !d.help.ends_with('.') && !d.help.contains('\n'),
                "{}: one line, no final period",
                d.name
            );
        }
        assert_eq!(families.len(), METRICS.len());
        let reference = reference_markdown();
        assert!(!reference.contains("## Other"));
        assert!(reference.contains("| `pulso_connections_opened_total` | counter | `protocol`"));
    }
}
