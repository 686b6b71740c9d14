//! The fixed list of settings. Everything else (flags, environment variable
//! names, `--help`, `check-config`, the TOML key check) is derived from it, so
//! a setting added here has all three spellings at once.

/// How a setting's value is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Text,
    /// Text that `check-config` masks.
    Secret,
    Duration,
    Size,
    Bool,
    Number,
    List,
    /// A TOML table (an inline table as a flag or environment variable).
    Table,
}

impl Kind {
    pub fn placeholder(self) -> &'static str {
        match self {
            Kind::Text => "TEXT",
            Kind::Secret => "SECRET",
            Kind::Duration => "DURATION",
            Kind::Size => "SIZE",
            Kind::Bool => "BOOL",
            Kind::Number => "N",
            Kind::List => "LIST",
            Kind::Table => "TABLE",
        }
    }
}

pub struct Setting {
    /// Dotted TOML name; the flag and environment variable derive from it.
    pub name: &'static str,
    pub kind: Kind,
    /// Default in text form, parsed like a flag; `None` means unset.
    pub default: Option<&'static str>,
    pub help: &'static str,
}

impl Setting {
    /// `mqtt.url` → `mqtt-url`.
    pub fn flag(&self) -> String {
        self.name.replace(['.', '_'], "-")
    }

    /// `mqtt.url` → `PULSO_MQTT_URL`.
    pub fn env(&self) -> String {
        format!("PULSO_{}", self.name.replace('.', "_").to_ascii_uppercase())
    }
}

macro_rules! setting {
    ($name:literal, $kind:ident, $default:expr, $help:literal) => {
        Setting {
            name: $name,
            kind: Kind::$kind,
            default: $default,
            help: $help,
        }
    };
}

pub const SETTINGS: &[Setting] = &[
    setting!(
        "listen",
        Text,
        Some("0.0.0.0:1337"),
        "Address and port to serve HTTP, /ws and Socket.IO on"
    ),
    setting!(
        "node_id",
        Text,
        None,
        "Name of this process in presence rows, metrics and the cluster; one per node: a cluster node refuses to start with the node_id of a live one [default: <hostname>:<port>]"
    ),
    setting!("log_format", Text, Some("text"), "Log format: text or json"),
    setting!(
        "log_level",
        Text,
        Some("info"),
        "Log filter, in RUST_LOG syntax (e.g. info,pulso=debug)"
    ),
    setting!(
        "shutdown_timeout",
        Duration,
        Some("10s"),
        "How long a graceful stop may take before exiting anyway"
    ),
    setting!(
        "keepalive_interval",
        Duration,
        Some("30s"),
        "WebSocket ping interval (also Engine.IO's pingInterval and pingTimeout on direct Socket.IO WebSockets); a connection that missed the previous ping is closed"
    ),
    setting!(
        "auto_subscribe",
        List,
        Some("temperature"),
        "Topics every /ws connection is subscribed to on connect"
    ),
    setting!(
        "publisher_roles",
        List,
        Some("admin,service"),
        "JWT roles allowed to use the HTTP publish API"
    ),
    setting!(
        "api_key",
        Secret,
        None,
        "Static key accepted as `Authorization: Bearer <key>` by the HTTP API"
    ),
    setting!(
        "api.max_body",
        Size,
        Some("1MiB"),
        "Largest HTTP API request body (413 above)"
    ),
    setting!(
        "http.header_timeout",
        Duration,
        Some("10s"),
        "Time a client has to send a request's headers: from connecting, or on a kept-alive connection from the next request's first byte; then the connection is closed"
    ),
    setting!(
        "http.idle_timeout",
        Duration,
        Some("75s"),
        "How long a kept-alive HTTP connection may wait for its next request before it is closed (keep it above a load balancer's idle timeout, 60 s on AWS ALB)"
    ),
    setting!(
        "http.body_timeout",
        Duration,
        Some("30s"),
        "Longest pause while a request body arrives; a stalled body is answered 408 and the connection closed. No http.* timeout applies while a request is answered (a held Socket.IO long-poll GET) or to an upgraded WebSocket"
    ),
    setting!(
        "tls.cert_file",
        Text,
        None,
        "PEM certificate chain (leaf first) to serve HTTPS and WSS on `listen` with (HTTP/1.1); set with tls.key_file. Read again on SIGHUP: new handshakes get the new certificate, open connections keep theirs, and a file that does not load leaves the old one in use"
    ),
    setting!(
        "tls.key_file",
        Text,
        None,
        "PEM private key (PKCS#8, PKCS#1 RSA or SEC1 EC) of tls.cert_file; set with it"
    ),
    setting!(
        "max_connections",
        Number,
        Some("100000"),
        "Most open client connections: /ws WebSockets and Socket.IO sessions of every transport (polling included); more are answered 503 before any upgrade"
    ),
    setting!(
        "max_connections_per_ip",
        Number,
        Some("0"),
        "Most open client connections from one IP address, the TCP peer's (behind a proxy or load balancer that is the proxy's, so keep it 0 there); more are answered 503. 0: no per-address limit"
    ),
    setting!(
        "allowed_origins",
        List,
        Some("*"),
        "Browser origins (`https://app.example.com`) allowed on /ws and Socket.IO, and in CORS answers for /socket.io/ and /api/; other origins are refused 403. Requests without `Origin` (non-browser clients) and pages served by pulso itself always pass. `*`: any origin"
    ),
    setting!(
        "jwt.secret",
        Secret,
        None,
        "HMAC secret for HS256/384/512 tokens [default: random, with a warning]"
    ),
    setting!(
        "jwt.public_key_file",
        Text,
        None,
        "PEM public key for RS256/ES256/EdDSA tokens"
    ),
    setting!("jwt.issuer", Text, None, "Required `iss` claim"),
    setting!("jwt.audience", Text, None, "Required `aud` claim"),
    setting!(
        "jwt.leeway",
        Duration,
        Some("0s"),
        "Clock skew allowed on exp and nbf"
    ),
    setting!(
        "jwt.require_exp",
        Bool,
        Some("false"),
        "Reject tokens without an exp claim"
    ),
    setting!(
        "ws.max_message_size",
        Size,
        Some("64KiB"),
        "Largest inbound /ws message (larger: close 1009)"
    ),
    setting!(
        "ws.max_subscriptions",
        Number,
        Some("256"),
        "Subscriptions per /ws connection, automatic ones included"
    ),
    setting!(
        "ws.rate_limit",
        Number,
        Some("100"),
        "Inbound /ws messages per second per connection (one-second burst)"
    ),
    setting!(
        "ws.outbound_queue",
        Number,
        Some("1024"),
        "Messages a connection may fall behind (and replies it may leave unread) before it is closed as a slow consumer (1013)"
    ),
    setting!(
        "ws.socket_unsent",
        Size,
        Some("16KiB"),
        "Bytes written to a client connection that the kernel may hold unsent (TCP_NOTSENT_LOWAT on every accepted socket; Linux). What does not fit waits in pulso's queue, where it counts toward ws.outbound_queue, and a slow consumer's close frame (1013) waits behind about this much plus what is in flight. 0: the kernel's own limit (its whole send buffer, up to net.ipv4.tcp_wmem)"
    ),
    setting!(
        "acl",
        Table,
        Some(""),
        "Per-role topic filters: acl.<role>.subscribe (default all) and acl.<role>.publish (default none)"
    ),
    setting!("demo.enabled", Bool, Some("true"), "Publish the demo feed"),
    setting!("demo.interval", Duration, Some("1s"), "Demo feed period"),
    setting!("demo.topic", Text, Some("metricas/demo"), "Demo feed topic"),
    setting!(
        "mqtt.url",
        Text,
        None,
        "MQTT broker: mqtt://[user:pass@]host[:1883] or mqtts://host[:8883]; unset = bridge off"
    ),
    setting!(
        "mqtt.username",
        Text,
        None,
        "MQTT user name (overrides one given in mqtt.url)"
    ),
    setting!(
        "mqtt.password",
        Secret,
        None,
        "MQTT password (overrides one given in mqtt.url)"
    ),
    setting!(
        "mqtt.client_id",
        Text,
        None,
        "MQTT client id [default: pulso-<node_id>, unique per node]"
    ),
    setting!(
        "mqtt.topics",
        List,
        Some("temperature/#"),
        "MQTT topic filters the bridge always subscribes to"
    ),
    setting!(
        "mqtt.prefix",
        Text,
        Some(""),
        "Prepended to an MQTT topic to make the hub topic (e.g. `plant1/`)"
    ),
    setting!(
        "mqtt.qos",
        Number,
        Some("0"),
        "QoS for broker subscriptions and forwarded publishes: 0 or 1"
    ),
    setting!(
        "mqtt.keep_alive",
        Duration,
        Some("30s"),
        "MQTT keep-alive interval"
    ),
    setting!(
        "mqtt.clean_session",
        Bool,
        Some("true"),
        "Start a clean MQTT session (false: the broker keeps subscriptions and QoS 1 messages across reconnects)"
    ),
    setting!(
        "mqtt.ca_file",
        Text,
        None,
        "PEM CA bundle for mqtts:// [default: the system roots]"
    ),
    setting!(
        "mqtt.max_payload",
        Size,
        Some("256KiB"),
        "Largest MQTT payload bridged; larger ones are counted and dropped"
    ),
    setting!(
        "mqtt.last_value",
        Bool,
        Some("true"),
        "Keep the latest message of each topic matched by mqtt.topics and send it to new subscribers"
    ),
    setting!(
        "mqtt.last_value_max_topics",
        Number,
        Some("10000"),
        "Most topics kept by mqtt.last_value (least recently updated are evicted)"
    ),
    setting!(
        "mqtt.last_value_max_bytes",
        Size,
        Some("16MiB"),
        "Most payload bytes kept by mqtt.last_value (least recently updated are evicted)"
    ),
    setting!(
        "mqtt.on_demand",
        List,
        Some(""),
        "Hub topic prefixes subscribed on the broker only while a /ws client wants them"
    ),
    setting!(
        "mqtt.publish_prefixes",
        List,
        Some(""),
        "Hub topic prefixes under which an ACL-allowed client `pub` is forwarded to the broker"
    ),
    setting!(
        "mqtt.reconnect_min",
        Duration,
        Some("500ms"),
        "First delay before reconnecting to the broker (doubles up to mqtt.reconnect_max, with jitter)"
    ),
    setting!(
        "mqtt.reconnect_max",
        Duration,
        Some("30s"),
        "Longest delay between reconnection attempts"
    ),
    setting!(
        "database_url",
        Secret,
        Some("sqlite://pulso.db"),
        "Presence store: sqlite://relative.db, sqlite:///abs/path.db or postgres://user@host/db"
    ),
    setting!(
        "socketio.namespace",
        Text,
        Some("/notifications"),
        "Socket.IO namespace clients authenticate on (also the url of the auth request)"
    ),
    setting!(
        "socketio.auth_timeout",
        Duration,
        Some("10s"),
        "Socket.IO connections not authenticated within this time are closed"
    ),
    setting!(
        "socketio.max_polling_sessions",
        Number,
        Some("10000"),
        "Most open Engine.IO long-polling sessions (authenticated or not; a session that upgrades to WebSocket leaves them); more are answered 503"
    ),
    setting!(
        "socketio.rooms",
        List,
        Some("{role},{role}_{tournamentId}"),
        "Room templates joined after authentication; {role}/{sub} from the token, others from a claim or else a request parameter"
    ),
    setting!(
        "socketio.allowed_roles",
        List,
        Some(""),
        "Roles allowed to authenticate on Socket.IO (empty: any)"
    ),
    setting!(
        "socketio.proxy_url",
        Text,
        None,
        "The application's HTTP backend (http://host:port, optionally with a path prefix): Socket.IO virtual requests for any other url than socketio.namespace are forwarded to it; off when unset"
    ),
    setting!(
        "socketio.proxy_headers",
        List,
        Some(""),
        "Headers of a virtual request (its `headers` field) passed on to socketio.proxy_url; any other, Authorization included, is dropped"
    ),
    setting!(
        "socketio.proxy_timeout",
        Duration,
        Some("10s"),
        "How long a forwarded request may take, answer body included; then the client is answered 504"
    ),
    setting!(
        "socketio.proxy_max_body",
        Size,
        Some("1MiB"),
        "Largest body of a forwarded request (else 413) and of the backend's answer (else 502)"
    ),
    setting!(
        "socketio.proxy_concurrency",
        Number,
        Some("256"),
        "Forwarded requests in flight on this node at once; more are answered 503"
    ),
    setting!(
        "socketio.proxy_socket_concurrency",
        Number,
        Some("8"),
        "Forwarded requests in flight per Socket.IO connection at once; more are answered 429"
    ),
    setting!(
        "socketio.proxy_rooms",
        Bool,
        Some("false"),
        "Let the backend's answer join an authenticated socket to rooms or make it leave them (X-Pulso-Join, X-Pulso-Leave headers)"
    ),
    setting!(
        "history.topics",
        List,
        Some(""),
        "Topic filters (rooms) whose messages keep a history (offset and epoch) for recovery after a reconnect, on /ws and Socket.IO; empty: off"
    ),
    setting!(
        "history.size",
        Number,
        Some("100"),
        "Messages kept per topic in history"
    ),
    setting!(
        "history.ttl",
        Duration,
        Some("5m"),
        "How long a message stays in history, and a lost Socket.IO session is kept for recovery"
    ),
    setting!(
        "cluster.redis_url",
        Secret,
        None,
        "Redis backplane for a cluster of nodes: redis://host:6379 or rediss://… (not with cluster.nats_url)"
    ),
    setting!(
        "cluster.nats_url",
        Secret,
        None,
        "NATS backplane for a cluster of nodes: nats://host:4222 (not with cluster.redis_url)"
    ),
    setting!(
        "cluster.prefix",
        Text,
        Some("pulso"),
        "Prefix of every backplane channel, subject and key, so clusters can share one Redis or NATS"
    ),
    setting!(
        "cluster.heartbeat",
        Duration,
        Some("2s"),
        "How often a cluster node records that it is alive"
    ),
    setting!(
        "cluster.node_ttl",
        Duration,
        Some("10s"),
        "A node silent this long is dead; a live node then clears its presence rows"
    ),
    setting!(
        "presence.write_timeout",
        Duration,
        Some("1s"),
        "How long an authentication waits for its presence row to be committed before the client is answered anyway"
    ),
    setting!(
        "presence.queue",
        Number,
        Some("4096"),
        "Presence rows (role, sub) waiting to be written; changes to further rows are dropped, counted, and the rows reconciled from memory later"
    ),
    setting!(
        "presence.entities",
        Table,
        Some(""),
        "Per-role application-table mode: presence.entities.<role>.table, id_column, socket_column"
    ),
];

pub fn find(name: &str) -> Option<&'static Setting> {
    SETTINGS.iter().find(|s| s.name == name)
}

/// The configuration reference as a Markdown table (`pulso config-reference`;
/// `docs/configuration.md` is this output, checked by a test).
pub fn reference_markdown() -> String {
    let mut out = String::from(
        "# Configuration reference\n\n\
         Generated by `pulso config-reference`; do not edit by hand.\n\n\
         Every setting has three spellings: the dotted TOML name, a flag and an environment \
         variable. Precedence, highest first: flags, `PULSO_*` variables, the TOML file \
         (`--config FILE`, else `./pulso.toml` when present), defaults. Durations: `2`, `500ms`, \
         `2s`, `5m`, `1h`. Sizes: bytes or `64KiB`, `1MiB`. Lists: TOML arrays, comma-separated \
         in flags and variables. Tables: TOML tables, inline-table text in flags and variables.\n\n\
         | TOML | flag | environment | kind | default | meaning |\n\
         |---|---|---|---|---|---|\n",
    );
    for s in SETTINGS {
        let default = match s.default {
            Some("") | None => "—".to_string(),
            Some(d) => format!("`{d}`"),
        };
        out.push_str(&format!(
            "| `{}` | `--{}` | `{}` | {} | {} | {} |\n",
            s.name,
            s.flag(),
            s.env(),
            s.kind.placeholder().to_ascii_lowercase(),
            default,
            s.help.replace('|', "\\|"),
        ));
    }
    out
}
