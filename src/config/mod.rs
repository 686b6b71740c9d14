//! Configuration: a fixed list of settings (see [`settings`]) read from
//! command-line flags, `PULSO_*` environment variables, a TOML file and the
//! built-in defaults, highest first.
//!
//! Loading happens in two steps so errors can always name the setting: first
//! every source is flattened into `dotted name → raw value`, then each value is
//! given its type.

pub mod cluster;
pub mod mqtt;
pub mod rooms;
pub mod settings;
pub mod value;

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use mqtt::MqttConfig;
pub use rooms::RoomTemplate;
pub use settings::{Kind, SETTINGS, Setting};
use value::Raw;

use crate::topic::Filter;

/// Where a setting's effective value came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Default,
    File,
    Env,
    Flag,
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Source::Default => "default",
            Source::File => "file",
            Source::Env => "env",
            Source::Flag => "flag",
        })
    }
}

/// A configuration error: always one line, naming the setting when there is one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError(pub String);

impl ConfigError {
    pub fn setting(name: &str, msg: impl fmt::Display) -> Self {
        ConfigError(format!("invalid setting `{name}`: {msg}"))
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConfigError {}

/// Every setting's raw value and its source, after precedence was applied.
#[derive(Debug, Clone, Default)]
pub struct Layered {
    values: BTreeMap<&'static str, (Raw, Source)>,
}

impl Layered {
    /// Starts from the defaults and applies the TOML file, if any.
    ///
    /// `file` is the `--config` path; without one, `pulso.toml` in the working
    /// directory is read when it exists.
    pub fn new(file: Option<&Path>) -> Result<Self, ConfigError> {
        let mut layered = Layered::defaults();
        let path = match file {
            Some(p) => Some(p.to_path_buf()),
            None => Some(PathBuf::from("pulso.toml")).filter(|p| p.is_file()),
        };
        if let Some(path) = path {
            let text = std::fs::read_to_string(&path).map_err(|e| {
                ConfigError(format!("cannot read config file {}: {e}", path.display()))
            })?;
            layered
                .apply_toml(&text)
                .map_err(|e| ConfigError(format!("config file {}: {}", path.display(), e.0)))?;
        }
        Ok(layered)
    }

    /// The built-in defaults only.
    pub fn defaults() -> Self {
        let mut layered = Layered::default();
        for s in SETTINGS {
            if let Some(d) = s.default {
                layered
                    .values
                    .insert(s.name, (Raw::Text(d.into()), Source::Default));
            }
        }
        layered
    }

    /// Applies a TOML document; unknown keys are errors so typos are caught.
    pub fn apply_toml(&mut self, text: &str) -> Result<(), ConfigError> {
        let doc: toml::Table = toml::from_str(text)
            .map_err(|e| ConfigError(format!("not valid TOML: {}", e.message().trim())))?;
        self.apply_table("", doc)
    }

    fn apply_table(&mut self, prefix: &str, table: toml::Table) -> Result<(), ConfigError> {
        for (key, value) in table {
            let name = if prefix.is_empty() {
                key
            } else {
                format!("{prefix}.{key}")
            };
            if let Some(s) = settings::find(&name) {
                self.values.insert(s.name, (Raw::Toml(value), Source::File));
            } else if let toml::Value::Table(inner) = value {
                let is_section = SETTINGS
                    .iter()
                    .any(|s| s.name.starts_with(&format!("{name}.")));
                if !is_section {
                    return Err(ConfigError(format!("unknown setting `{name}`")));
                }
                self.apply_table(&name, inner)?;
            } else {
                return Err(ConfigError(format!("unknown setting `{name}`")));
            }
        }
        Ok(())
    }

    /// Sets a value given as text (a flag or environment variable).
    pub fn set_text(
        &mut self,
        name: &str,
        text: String,
        source: Source,
    ) -> Result<(), ConfigError> {
        let s =
            settings::find(name).ok_or_else(|| ConfigError(format!("unknown setting `{name}`")))?;
        self.values.insert(s.name, (Raw::Text(text), source));
        Ok(())
    }

    fn raw(&self, name: &str) -> Option<&Raw> {
        self.values.get(name).map(|(raw, _)| raw)
    }

    fn get<T>(
        &self,
        name: &str,
        parse: fn(&Raw) -> Result<T, String>,
    ) -> Result<Option<T>, ConfigError> {
        self.raw(name)
            .map(|raw| parse(raw).map_err(|e| ConfigError::setting(name, e)))
            .transpose()
    }

    fn req<T>(&self, name: &str, parse: fn(&Raw) -> Result<T, String>) -> Result<T, ConfigError> {
        self.get(name, parse)?
            .ok_or_else(|| ConfigError::setting(name, "a value is required"))
    }

    /// Optional text; an empty string counts as unset.
    fn opt_text(&self, name: &str) -> Result<Option<String>, ConfigError> {
        Ok(self
            .get(name, value::parse_string)?
            .filter(|s| !s.is_empty()))
    }

    fn number<T: TryFrom<u64>>(&self, name: &str, min: u64) -> Result<T, ConfigError> {
        let n = self.req(name, value::parse_u64)?;
        if n < min {
            return Err(ConfigError::setting(
                name,
                format!("must be at least {min}"),
            ));
        }
        T::try_from(n).map_err(|_| ConfigError::setting(name, "too large"))
    }

    /// A duration that must be more than zero (a zero timeout would close
    /// every connection at once; a setting cannot turn a clock off).
    fn positive_duration(&self, name: &str) -> Result<Duration, ConfigError> {
        let d = self.req(name, value::parse_duration)?;
        if d.is_zero() {
            return Err(ConfigError::setting(name, "must be more than 0"));
        }
        Ok(d)
    }

    /// The effective configuration as `name = value  # source` lines, secrets masked.
    pub fn describe(&self) -> String {
        let mut out = String::new();
        for s in SETTINGS {
            let line = match self.values.get(s.name) {
                None => format!("# {} is not set", s.name),
                Some((raw, source)) => {
                    let shown = match raw {
                        _ if s.kind == Kind::Secret => "\"********\"".to_string(),
                        Raw::Toml(v) => v.to_string(),
                        Raw::Text(t) => text_as_toml(s.kind, t),
                    };
                    // A URL's password (mqtt://user:pass@host) is a secret too.
                    let shown = mask_url_password(&shown);
                    format!("{} = {shown}  # {source}", s.name)
                }
            };
            out.push_str(&line);
            out.push('\n');
        }
        out
    }
}

/// `scheme://user:pass@host` → `scheme://user:********@host`; anything else unchanged.
fn mask_url_password(text: &str) -> String {
    let Some(scheme_end) = text.find("://") else {
        return text.to_string();
    };
    let rest = &text[scheme_end + 3..];
    let authority_end = rest.find(['/', '?', '"']).unwrap_or(rest.len());
    let Some(at) = rest[..authority_end].rfind('@') else {
        return text.to_string();
    };
    let Some(colon) = rest[..at].find(':') else {
        return text.to_string();
    };
    let start = scheme_end + 3 + colon + 1;
    let end = scheme_end + 3 + at;
    format!("{}********{}", &text[..start], &text[end..])
}

fn text_as_toml(kind: Kind, text: &str) -> String {
    let raw = Raw::Text(text.to_string());
    match kind {
        Kind::Bool => value::parse_bool(&raw).map(|b| b.to_string()).ok(),
        Kind::Number => value::parse_u64(&raw).map(|n| n.to_string()).ok(),
        Kind::List => value::parse_list(&raw)
            .map(|l| {
                toml::Value::Array(l.into_iter().map(toml::Value::String).collect()).to_string()
            })
            .ok(),
        Kind::Table => value::parse_table(&raw)
            .map(|t| toml::Value::Table(t).to_string())
            .ok(),
        _ => None,
    }
    .unwrap_or_else(|| toml::Value::String(text.to_string()).to_string())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// Per-role topic permissions.
#[derive(Debug, Clone, Default)]
pub struct RoleAcl {
    /// `None`: any topic may be subscribed to.
    pub subscribe: Option<Vec<Filter>>,
    /// Filters a client `pub` must match; empty means no publishing.
    pub publish: Vec<Filter>,
}

#[derive(Debug, Clone)]
pub struct JwtConfig {
    pub secret: Option<String>,
    pub public_key_file: Option<PathBuf>,
    pub issuer: Option<String>,
    pub audience: Option<String>,
    pub leeway: Duration,
    pub require_exp: bool,
}

/// Clocks on HTTP/1.1 connections (served by the `http` module): without
/// them a client that connects and sends nothing, or a header byte now and
/// then, holds a file descriptor and a connection's buffers forever.
#[derive(Debug, Clone, Copy)]
pub struct HttpConfig {
    /// From accept (or the first byte of a later request) to the end of
    /// the request's head.
    pub header_timeout: Duration,
    /// Between two requests on a kept-alive connection.
    pub idle_timeout: Duration,
    /// Between two reads of a request body.
    pub body_timeout: Duration,
    /// Most bytes the kernel may hold unsent for an accepted socket
    /// (`ws.socket_unsent`, TCP_NOTSENT_LOWAT); 0 leaves the kernel's own.
    pub socket_unsent: u32,
}

/// The certificate and key pulso serves TLS with (`tls.*`). Only the
/// paths: the files are read when the server starts and on every reload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsConfig {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

#[derive(Debug, Clone)]
pub struct WsConfig {
    pub max_message_size: usize,
    pub max_subscriptions: usize,
    pub rate_limit: u32,
    pub outbound_queue: usize,
}

/// The Socket.IO notifications endpoint.
#[derive(Debug, Clone)]
pub struct SocketIoConfig {
    /// Namespace path, always starting with `/` (e.g. `/notifications`).
    pub namespace: String,
    pub auth_timeout: Duration,
    /// Room templates such as `{role}_{tournamentId}`.
    pub rooms: Vec<RoomTemplate>,
    /// Empty: any role may authenticate.
    pub allowed_roles: Vec<String>,
    /// Most open long-polling sessions.
    pub max_polling_sessions: usize,
    /// Where virtual requests for other urls go (`None`: they are 404-1).
    pub proxy: Option<ProxyConfig>,
}

/// The application's HTTP backend behind Socket.IO virtual requests.
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    /// `http://host:port` plus an optional path prefix, without a trailing
    /// `/`; a request's url is appended to it.
    pub url: String,
    /// Client header names passed on, lower-case.
    pub headers: Vec<String>,
    pub timeout: Duration,
    pub max_body: usize,
    /// In flight on this node.
    pub concurrency: usize,
    /// In flight per connection.
    pub socket_concurrency: usize,
    /// Whether `X-Pulso-Join`/`X-Pulso-Leave` in an answer are obeyed.
    pub rooms: bool,
}

/// Headers a client may never have passed on, whatever
/// `socketio.proxy_headers` says: pulso sets them itself, or they describe
/// the connection rather than the request.
pub const PROXY_RESERVED_HEADERS: &[&str] = &[
    "host",
    "content-length",
    "content-type",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "upgrade",
    "te",
    "trailer",
    "proxy-connection",
];

/// Application-table mode for one role: the socket id is written straight
/// into `table.socket_column` of the row whose `id_column` is the `sub`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntityTable {
    pub table: String,
    pub id_column: String,
    pub socket_column: String,
}

#[derive(Debug, Clone)]
pub struct PresenceConfig {
    pub database_url: String,
    /// Role → application table.
    pub entities: HashMap<String, EntityTable>,
    /// How long a client's answer waits for its row (read your writes).
    pub write_timeout: Duration,
    /// Rows (role, sub) waiting for the writer before changes to further
    /// rows are dropped (and the rows reconciled later).
    pub queue: usize,
}

#[derive(Debug, Clone)]
pub struct DemoConfig {
    pub enabled: bool,
    pub interval: Duration,
    pub topic: String,
}

/// The typed, validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub node_id: String,
    pub log_format: LogFormat,
    pub log_level: String,
    pub shutdown_timeout: Duration,
    pub keepalive_interval: Duration,
    pub auto_subscribe: Vec<String>,
    pub publisher_roles: Vec<String>,
    pub api_key: Option<String>,
    pub api_max_body: usize,
    pub http: HttpConfig,
    /// HTTPS and WSS on `listen`, when set.
    pub tls: Option<TlsConfig>,
    pub limits: LimitsConfig,
    pub jwt: JwtConfig,
    pub ws: WsConfig,
    pub acl: HashMap<String, RoleAcl>,
    pub demo: DemoConfig,
    pub mqtt: MqttConfig,
    pub socketio: SocketIoConfig,
    pub presence: PresenceConfig,
    pub cluster: cluster::ClusterConfig,
    pub history: HistoryConfig,
}

/// `tls.cert_file` and `tls.key_file`: both or neither.
fn parse_tls(l: &Layered) -> Result<Option<TlsConfig>, ConfigError> {
    match (l.opt_text("tls.cert_file")?, l.opt_text("tls.key_file")?) {
        (None, None) => Ok(None),
        (Some(cert), Some(key)) => Ok(Some(TlsConfig {
            cert_file: PathBuf::from(cert),
            key_file: PathBuf::from(key),
        })),
        (Some(_), None) => Err(ConfigError::setting(
            "tls.key_file",
            "is needed with tls.cert_file (set both or neither)",
        )),
        (None, Some(_)) => Err(ConfigError::setting(
            "tls.cert_file",
            "is needed with tls.key_file (set both or neither)",
        )),
    }
}

/// Who may open a client connection, and how many may be open.
#[derive(Debug, Clone)]
pub struct LimitsConfig {
    /// Open `/ws` connections and Socket.IO sessions, all transports.
    pub max_connections: usize,
    /// The same, from one IP address; 0: no per-address limit.
    pub max_connections_per_ip: usize,
    pub allowed_origins: AllowedOrigins,
}

/// Browser origins allowed to connect (`allowed_origins`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AllowedOrigins {
    /// `*`: any origin.
    Any,
    /// These origins, lower-case, as a browser writes them
    /// (`scheme://host[:port]`).
    Only(Vec<String>),
}

impl AllowedOrigins {
    /// From the setting's entries: `*`, or origins such as
    /// `https://app.example.com` or `http://localhost:3000`.
    pub fn parse(entries: &[String]) -> Result<Self, String> {
        if entries.iter().any(|e| e.trim() == "*") {
            return Ok(AllowedOrigins::Any);
        }
        let mut only = Vec::with_capacity(entries.len());
        for entry in entries {
            let origin = entry.trim();
            // A trailing slash is forgiven: browsers never send one.
            let origin = origin.strip_suffix('/').unwrap_or(origin);
            let valid = origin.split_once("://").is_some_and(|(scheme, authority)| {
                scheme.starts_with(|c: char| c.is_ascii_alphabetic())
                    && scheme
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
                    && !authority.is_empty()
                    && !authority
                        .chars()
                        .any(|c| matches!(c, '/' | '?' | '#' | '*') || c.is_whitespace())
            });
            if !valid {
                return Err(format!(
                    "`{entry}` is not an origin like https://app.example.com (scheme, host and optional port, no path), nor `*`"
                ));
            }
            only.push(origin.to_ascii_lowercase());
        }
        Ok(AllowedOrigins::Only(only))
    }

    /// Whether a request that carries `Origin: origin` may go on. A page
    /// served by this server itself (its origin names the request's `Host`)
    /// always may: the console, or any page behind the same address.
    pub fn allows(&self, origin: &[u8], host: Option<&[u8]>) -> bool {
        let AllowedOrigins::Only(list) = self else {
            return true;
        };
        if list
            .iter()
            .any(|o| o.as_bytes().eq_ignore_ascii_case(origin))
        {
            return true;
        }
        let authority = origin
            .windows(3)
            .position(|w| w == b"://")
            .map(|at| &origin[at + 3..]);
        matches!((authority, host), (Some(a), Some(h)) if a.eq_ignore_ascii_case(h))
    }
}

/// Per-topic history for recovery (SPEC §11).
#[derive(Debug, Clone)]
pub struct HistoryConfig {
    /// Empty: no history.
    pub topics: Vec<Filter>,
    pub size: usize,
    pub ttl: Duration,
}

impl Config {
    /// Defaults only (plus nothing from the working directory): handy for tests.
    pub fn defaults() -> Self {
        match Config::from_layered(&Layered::defaults()) {
            Ok(c) => c,
            Err(e) => panic!("built-in defaults are invalid: {e}"),
        }
    }

    pub fn from_layered(l: &Layered) -> Result<Self, ConfigError> {
        let listen_text = l.req("listen", value::parse_string)?;
        let listen: SocketAddr = listen_text.parse().map_err(|_| {
            ConfigError::setting(
                "listen",
                format!("`{listen_text}` is not an address like 0.0.0.0:1337"),
            )
        })?;
        let node_id = match l.opt_text("node_id")? {
            Some(id) => id,
            None => format!(
                "{}:{}",
                gethostname::gethostname().to_string_lossy(),
                listen.port()
            ),
        };
        let log_format = match l.req("log_format", value::parse_string)?.as_str() {
            "text" => LogFormat::Text,
            "json" => LogFormat::Json,
            other => {
                return Err(ConfigError::setting(
                    "log_format",
                    format!("`{other}` is not text or json"),
                ));
            }
        };
        let log_level = l.req("log_level", value::parse_string)?;
        if tracing_subscriber::EnvFilter::try_new(&log_level).is_err() {
            return Err(ConfigError::setting(
                "log_level",
                format!("`{log_level}` is not a valid filter"),
            ));
        }

        let auto_subscribe = l.req("auto_subscribe", value::parse_list)?;
        for t in &auto_subscribe {
            Filter::parse(t)
                .map_err(|e| ConfigError::setting("auto_subscribe", format!("`{t}`: {e}")))?;
        }

        let jwt = JwtConfig {
            secret: l.opt_text("jwt.secret")?,
            public_key_file: l.opt_text("jwt.public_key_file")?.map(PathBuf::from),
            issuer: l.opt_text("jwt.issuer")?,
            audience: l.opt_text("jwt.audience")?,
            leeway: l.req("jwt.leeway", value::parse_duration)?,
            require_exp: l.req("jwt.require_exp", value::parse_bool)?,
        };

        let ws = WsConfig {
            max_message_size: to_usize(
                "ws.max_message_size",
                l.req("ws.max_message_size", value::parse_size)?,
                16,
            )?,
            max_subscriptions: l.number("ws.max_subscriptions", 1)?,
            rate_limit: l.number("ws.rate_limit", 1)?,
            outbound_queue: l.number("ws.outbound_queue", 1)?,
        };
        if auto_subscribe.len() > ws.max_subscriptions {
            return Err(ConfigError::setting(
                "auto_subscribe",
                "has more topics than ws.max_subscriptions",
            ));
        }

        let keepalive_interval = l.req("keepalive_interval", value::parse_duration)?;
        if keepalive_interval.is_zero() {
            return Err(ConfigError::setting(
                "keepalive_interval",
                "must be more than 0",
            ));
        }
        let demo = DemoConfig {
            enabled: l.req("demo.enabled", value::parse_bool)?,
            interval: l.req("demo.interval", value::parse_duration)?,
            topic: l.req("demo.topic", value::parse_string)?,
        };
        if demo.interval.is_zero() {
            return Err(ConfigError::setting("demo.interval", "must be more than 0"));
        }
        crate::topic::validate_name(&demo.topic)
            .map_err(|e| ConfigError::setting("demo.topic", e))?;

        let mqtt = mqtt::parse(l)?;
        let socketio = parse_socketio(l)?;
        let presence = PresenceConfig {
            database_url: parse_database_url(&l.req("database_url", value::parse_string)?)?,
            entities: parse_entities(&l.req("presence.entities", value::parse_table)?)?,
            write_timeout: l.req("presence.write_timeout", value::parse_duration)?,
            queue: l.number("presence.queue", 1)?,
        };
        let cluster = cluster::parse(l, &presence.database_url)?;
        let mut history_topics = Vec::new();
        for t in l.req("history.topics", value::parse_list)? {
            history_topics.push(
                Filter::parse(&t)
                    .map_err(|e| ConfigError::setting("history.topics", format!("`{t}`: {e}")))?,
            );
        }
        let history = HistoryConfig {
            topics: history_topics,
            size: l.number("history.size", 1)?,
            ttl: l.req("history.ttl", value::parse_duration)?,
        };
        if history.ttl.is_zero() {
            return Err(ConfigError::setting("history.ttl", "must be more than 0"));
        }

        Ok(Config {
            listen,
            node_id,
            log_format,
            log_level,
            shutdown_timeout: l.req("shutdown_timeout", value::parse_duration)?,
            keepalive_interval,
            auto_subscribe,
            publisher_roles: l.req("publisher_roles", value::parse_list)?,
            api_key: l.opt_text("api_key")?,
            api_max_body: to_usize("api.max_body", l.req("api.max_body", value::parse_size)?, 1)?,
            http: HttpConfig {
                header_timeout: l.positive_duration("http.header_timeout")?,
                idle_timeout: l.positive_duration("http.idle_timeout")?,
                body_timeout: l.positive_duration("http.body_timeout")?,
                socket_unsent: u32::try_from(l.req("ws.socket_unsent", value::parse_size)?)
                    .ok()
                    .filter(|n| *n <= MAX_SOCKET_UNSENT)
                    .ok_or_else(|| ConfigError::setting("ws.socket_unsent", "at most 1GiB"))?,
            },
            tls: parse_tls(l)?,
            limits: LimitsConfig {
                max_connections: l.number("max_connections", 1)?,
                max_connections_per_ip: l.number("max_connections_per_ip", 0)?,
                allowed_origins: AllowedOrigins::parse(
                    &l.req("allowed_origins", value::parse_list)?,
                )
                .map_err(|e| ConfigError::setting("allowed_origins", e))?,
            },
            jwt,
            ws,
            acl: parse_acl(&l.req("acl", value::parse_table)?)?,
            demo,
            mqtt,
            socketio,
            presence,
            cluster,
            history,
        })
    }
}

fn parse_socketio(l: &Layered) -> Result<SocketIoConfig, ConfigError> {
    let namespace = l.req("socketio.namespace", value::parse_string)?;
    let ns_ok = namespace.len() > 1
        && namespace.len() <= 128
        && namespace.starts_with('/')
        && namespace[1..]
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_-./".contains(c));
    if !ns_ok {
        return Err(ConfigError::setting(
            "socketio.namespace",
            format!("`{namespace}` is not a namespace like /notifications (not `/` itself)"),
        ));
    }
    let auth_timeout = l.req("socketio.auth_timeout", value::parse_duration)?;
    if auth_timeout.is_zero() {
        return Err(ConfigError::setting(
            "socketio.auth_timeout",
            "must be more than 0",
        ));
    }
    let mut rooms = Vec::new();
    for t in l.req("socketio.rooms", value::parse_list)? {
        rooms.push(
            RoomTemplate::parse(&t)
                .map_err(|e| ConfigError::setting("socketio.rooms", format!("`{t}`: {e}")))?,
        );
    }
    Ok(SocketIoConfig {
        namespace,
        auth_timeout,
        rooms,
        allowed_roles: l.req("socketio.allowed_roles", value::parse_list)?,
        max_polling_sessions: l.number("socketio.max_polling_sessions", 1)?,
        proxy: parse_proxy(l)?,
    })
}

fn parse_proxy(l: &Layered) -> Result<Option<ProxyConfig>, ConfigError> {
    let Some(url) = l.opt_text("socketio.proxy_url")? else {
        return Ok(None);
    };
    let url = url.trim().trim_end_matches('/').to_string();
    let bad = |why: &str| ConfigError::setting("socketio.proxy_url", format!("`{url}`: {why}"));
    let Some(rest) = url.strip_prefix("http://") else {
        return Err(if url.starts_with("https://") {
            bad(
                "only http:// backends are served (put the backend on a private network or a local port)",
            )
        } else {
            bad("must look like http://127.0.0.1:3000")
        });
    };
    let authority = rest.split('/').next().unwrap_or_default();
    let authority_ok = !authority.is_empty()
        && !authority.contains('@')
        && authority
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-.:[]_".contains(c));
    let path_ok = !rest.contains(['?', '#', ' ']) && rest.is_ascii();
    if !authority_ok || !path_ok {
        return Err(bad(
            "must look like http://127.0.0.1:3000 or http://app:3000/prefix",
        ));
    }
    let mut headers = Vec::new();
    for h in l.req("socketio.proxy_headers", value::parse_list)? {
        let name = h.trim().to_ascii_lowercase();
        let token_ok = !name.is_empty()
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
        if !token_ok {
            return Err(ConfigError::setting(
                "socketio.proxy_headers",
                format!("`{h}` is not a header name"),
            ));
        }
        if name.starts_with("x-pulso-") || PROXY_RESERVED_HEADERS.contains(&name.as_str()) {
            return Err(ConfigError::setting(
                "socketio.proxy_headers",
                format!("`{h}` is set by pulso itself and cannot be passed on"),
            ));
        }
        if !headers.contains(&name) {
            headers.push(name);
        }
    }
    Ok(Some(ProxyConfig {
        url,
        headers,
        timeout: l.positive_duration("socketio.proxy_timeout")?,
        max_body: to_usize(
            "socketio.proxy_max_body",
            l.req("socketio.proxy_max_body", value::parse_size)?,
            1,
        )?,
        concurrency: l.number("socketio.proxy_concurrency", 1)?,
        socket_concurrency: l.number("socketio.proxy_socket_concurrency", 1)?,
        rooms: l.req("socketio.proxy_rooms", value::parse_bool)?,
    }))
}

/// Accepts `sqlite:` and `postgres(ql):` URLs; the drivers check the rest.
fn parse_database_url(url: &str) -> Result<String, ConfigError> {
    let url = url.trim();
    if url.starts_with("sqlite:")
        || url.starts_with("postgres://")
        || url.starts_with("postgresql://")
    {
        Ok(url.to_string())
    } else {
        Err(ConfigError::setting(
            "database_url",
            "expected sqlite://file.db, sqlite:///abs/path.db or postgres://…",
        ))
    }
}

/// An SQL identifier pulso will quote: letters, digits and `_`, optionally
/// one `schema.` prefix. Anything else is refused so no configuration value
/// can inject SQL.
fn sql_identifier(name: &str, text: &str) -> Result<String, ConfigError> {
    let part_ok = |p: &str| {
        !p.is_empty()
            && p.len() <= 63
            && !p.starts_with(|c: char| c.is_ascii_digit())
            && p.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
    };
    let parts: Vec<&str> = text.split('.').collect();
    if parts.len() <= 2 && parts.iter().all(|p| part_ok(p)) {
        Ok(text.to_string())
    } else {
        Err(ConfigError::setting(
            name,
            format!("`{text}` is not an SQL identifier (letters, digits, _; optional schema.)"),
        ))
    }
}

fn parse_entities(table: &toml::Table) -> Result<HashMap<String, EntityTable>, ConfigError> {
    let mut out = HashMap::new();
    for (role, spec) in table {
        let base = format!("presence.entities.{role}");
        let toml::Value::Table(spec) = spec else {
            return Err(ConfigError::setting(
                &base,
                "expected a table with table, id_column and socket_column",
            ));
        };
        for key in spec.keys() {
            if !["table", "id_column", "socket_column"].contains(&key.as_str()) {
                return Err(ConfigError(format!(
                    "unknown setting `{base}.{key}` (use table, id_column or socket_column)"
                )));
            }
        }
        let field = |key: &str, default: Option<&str>| -> Result<String, ConfigError> {
            let name = format!("{base}.{key}");
            let text = match spec.get(key) {
                Some(toml::Value::String(s)) => s.clone(),
                Some(_) => return Err(ConfigError::setting(&name, "expected a string")),
                None => match default {
                    Some(d) => d.to_string(),
                    None => return Err(ConfigError::setting(&name, "a value is required")),
                },
            };
            sql_identifier(&name, &text)
        };
        out.insert(
            role.clone(),
            EntityTable {
                table: field("table", None)?,
                id_column: field("id_column", Some("id"))?,
                socket_column: field("socket_column", Some("socket_id"))?,
            },
        );
    }
    Ok(out)
}

/// The largest `ws.socket_unsent` (the kernel takes an `int`).
const MAX_SOCKET_UNSENT: u32 = 1 << 30;

fn to_usize(name: &str, n: u64, min: u64) -> Result<usize, ConfigError> {
    if n < min {
        return Err(ConfigError::setting(
            name,
            format!("must be at least {min}"),
        ));
    }
    usize::try_from(n).map_err(|_| ConfigError::setting(name, "too large"))
}

fn parse_acl(table: &toml::Table) -> Result<HashMap<String, RoleAcl>, ConfigError> {
    let mut acl = HashMap::new();
    for (role, rules) in table {
        let toml::Value::Table(rules) = rules else {
            return Err(ConfigError::setting(
                &format!("acl.{role}"),
                "expected a table with subscribe/publish lists",
            ));
        };
        let mut entry = RoleAcl::default();
        for (key, list) in rules {
            let name = format!("acl.{role}.{key}");
            let filters = value::parse_list(&Raw::Toml(list.clone()))
                .map_err(|e| ConfigError::setting(&name, e))?
                .iter()
                .map(|f| {
                    Filter::parse(f).map_err(|e| ConfigError::setting(&name, format!("`{f}`: {e}")))
                })
                .collect::<Result<Vec<_>, _>>()?;
            match key.as_str() {
                "subscribe" => entry.subscribe = Some(filters),
                "publish" => entry.publish = filters,
                _ => {
                    return Err(ConfigError(format!(
                        "unknown setting `{name}` (use subscribe or publish)"
                    )));
                }
            }
        }
        acl.insert(role.clone(), entry);
    }
    Ok(acl)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        let c = Config::defaults();
        assert_eq!(c.listen.port(), 1337);
        assert_eq!(c.auto_subscribe, vec!["temperature"]);
        assert_eq!(c.ws.max_message_size, 64 * 1024);
        assert!(c.demo.enabled);
        assert_eq!(c.http.header_timeout, Duration::from_secs(10));
        assert_eq!(c.http.idle_timeout, Duration::from_secs(75));
        assert_eq!(c.http.body_timeout, Duration::from_secs(30));
        assert_eq!(c.http.socket_unsent, 16 * 1024);
    }

    #[test]
    fn socket_unsent_may_be_off_and_is_bounded() {
        let mut l = Layered::defaults();
        l.apply_toml("[ws]\nsocket_unsent = 0\n").unwrap();
        assert_eq!(Config::from_layered(&l).unwrap().http.socket_unsent, 0);
        l.set_text("ws.socket_unsent", "2GiB".into(), Source::Env)
            .unwrap();
        let e = Config::from_layered(&l).unwrap_err();
        assert!(e.0.contains("`ws.socket_unsent`"), "{e}");
    }

    #[test]
    fn http_timeouts_must_be_positive() {
        let mut l = Layered::defaults();
        l.apply_toml("[http]\nidle_timeout = \"500ms\"\n").unwrap();
        assert_eq!(
            Config::from_layered(&l).unwrap().http.idle_timeout,
            Duration::from_millis(500)
        );
        l.set_text("http.body_timeout", "0".into(), Source::Env)
            .unwrap();
        let e = Config::from_layered(&l).unwrap_err();
        assert!(e.0.contains("`http.body_timeout`"), "{e}");
    }

    #[test]
    fn precedence_file_then_text() {
        let mut l = Layered::defaults();
        l.apply_toml(
            "listen = \"127.0.0.1:9\"\n[ws]\nrate_limit = 5\n[acl.admin]\npublish = [\"#\"]\n",
        )
        .unwrap();
        let c = Config::from_layered(&l).unwrap();
        assert_eq!(c.listen.port(), 9);
        assert_eq!(c.ws.rate_limit, 5);
        assert_eq!(c.acl["admin"].publish.len(), 1);
        l.set_text("ws.rate_limit", "7".into(), Source::Flag)
            .unwrap();
        assert_eq!(Config::from_layered(&l).unwrap().ws.rate_limit, 7);
    }

    #[test]
    fn errors_name_the_setting() {
        let mut l = Layered::defaults();
        l.set_text("ws.max_message_size", "lots".into(), Source::Env)
            .unwrap();
        let e = Config::from_layered(&l).unwrap_err();
        assert!(e.0.contains("`ws.max_message_size`"), "{e}");

        let mut l = Layered::defaults();
        let e = l.apply_toml("[ws]\nmax_mesage_size = 1\n").unwrap_err();
        assert!(e.0.contains("`ws.max_mesage_size`"), "{e}");

        let mut l = Layered::defaults();
        l.set_text(
            "acl",
            r#"{ admin = { publish = ["a/#/b"] } }"#.into(),
            Source::Flag,
        )
        .unwrap();
        let e = Config::from_layered(&l).unwrap_err();
        assert!(e.0.contains("`acl.admin.publish`"), "{e}");
    }

    #[test]
    fn secrets_are_masked() {
        let mut l = Layered::defaults();
        l.set_text("jwt.secret", "hunter2".into(), Source::Env)
            .unwrap();
        let d = l.describe();
        assert!(!d.contains("hunter2"));
        assert!(d.contains("jwt.secret = \"********\"  # env"));

        let mut l = Layered::defaults();
        l.set_text("mqtt.url", "mqtt://u:hunter2@h:1883".into(), Source::Env)
            .unwrap();
        let d = l.describe();
        assert!(!d.contains("hunter2"), "{d}");
        assert!(d.contains("mqtt.url = \"mqtt://u:********@h:1883\""), "{d}");
        assert_eq!(mask_url_password("\"mqtt://h:1883\""), "\"mqtt://h:1883\"");
        assert_eq!(mask_url_password("\"mqtt://u@h\""), "\"mqtt://u@h\"");
    }

    #[test]
    fn allowed_origins_are_exact_origins_or_any() {
        let parse = |v: &[&str]| {
            AllowedOrigins::parse(&v.iter().map(|s| s.to_string()).collect::<Vec<_>>())
        };
        assert_eq!(parse(&["*"]), Ok(AllowedOrigins::Any));
        assert_eq!(parse(&["https://a.example", "*"]), Ok(AllowedOrigins::Any));
        let only = parse(&["https://App.example.com/", "http://localhost:3000"]).unwrap();
        assert_eq!(
            only,
            AllowedOrigins::Only(vec![
                "https://app.example.com".into(),
                "http://localhost:3000".into()
            ])
        );
        assert!(only.allows(b"https://app.example.com", None));
        assert!(only.allows(b"HTTPS://APP.EXAMPLE.COM", Some(b"other")));
        assert!(only.allows(b"http://localhost:3000", None));
        assert!(!only.allows(b"http://localhost:3001", None));
        assert!(!only.allows(b"https://app.example.com.evil.test", None));
        assert!(!only.allows(b"null", None));
        // A page pulso serves itself: its origin names the request's Host.
        assert!(only.allows(b"https://pulso.example.com", Some(b"pulso.example.com")));
        assert!(!only.allows(
            b"https://pulso.example.com",
            Some(b"pulso.example.com:8443")
        ));
        for bad in [
            "app.example.com",
            "https://",
            "https://a.example/path",
            "https://*.example.com",
            "://x",
        ] {
            assert!(parse(&[bad]).is_err(), "{bad}");
        }
    }
}
