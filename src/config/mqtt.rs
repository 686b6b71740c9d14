//! The typed `mqtt.*` settings (see `docs/mqtt.md`). Parsed here, next to the
//! other settings, so every error names the setting it is about.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use super::{ConfigError, Layered, value};
use crate::topic::{Filter, validate_name};

/// Where the broker is and how to log in. Present only when `mqtt.url` is set.
#[derive(Clone, PartialEq, Eq)]
pub struct Broker {
    pub host: String,
    pub port: u16,
    /// `mqtts://`: TLS with the system roots or `ca_file`.
    pub tls: bool,
    pub ca_file: Option<PathBuf>,
    pub username: Option<String>,
    pub password: Option<String>,
}

// Written by hand so the password never reaches a log line.
impl fmt::Debug for Broker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Broker")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("tls", &self.tls)
            .field("ca_file", &self.ca_file)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "********"))
            .finish()
    }
}

#[derive(Debug, Clone)]
pub struct MqttConfig {
    /// `None`: the bridge is off (`mqtt.url` unset).
    pub broker: Option<Broker>,
    /// Set explicitly; otherwise see [`MqttConfig::client_id`].
    pub client_id: Option<String>,
    /// Broker-side filters subscribed to for as long as the bridge runs.
    pub topics: Vec<Filter>,
    /// Prepended to an MQTT topic name to make the hub topic.
    pub prefix: String,
    /// 0 or 1.
    pub qos: u8,
    pub keep_alive: Duration,
    pub clean_session: bool,
    pub max_payload: usize,
    pub last_value: bool,
    pub last_value_max_topics: usize,
    pub last_value_max_bytes: usize,
    /// Hub-topic prefixes (each starts with `prefix`).
    pub on_demand: Vec<String>,
    /// Hub-topic prefixes (each starts with `prefix`).
    pub publish_prefixes: Vec<String>,
    pub reconnect_min: Duration,
    pub reconnect_max: Duration,
}

impl MqttConfig {
    pub fn enabled(&self) -> bool {
        self.broker.is_some()
    }

    /// `mqtt.client_id`, else `pulso-<node_id>`: two nodes sharing an id
    /// would keep kicking each other off the broker. Computed late because
    /// the node id can change at bind time (port 0).
    pub fn client_id(&self, node_id: &str) -> String {
        self.client_id
            .clone()
            .unwrap_or_else(|| client_id_of(node_id))
    }

    /// The hub-side filters whose topics keep a last value: `mqtt.topics`
    /// with the prefix prepended. Empty when the bridge or the feature is off.
    pub fn last_value_filters(&self) -> Vec<Filter> {
        if !self.enabled() || !self.last_value {
            return Vec::new();
        }
        self.topics
            .iter()
            .filter_map(|f| {
                Filter::parse(&format!("{}{}", self.prefix, topics_of(f.as_str()))).ok()
            })
            .collect()
    }
}

/// The topics a broker filter delivers: a shared subscription
/// `$share/<group>/<filter>` delivers (some of) `<filter>`'s topics.
pub fn topics_of(broker_filter: &str) -> &str {
    broker_filter
        .strip_prefix("$share/")
        .and_then(|rest| rest.split_once('/'))
        .map(|(_, filter)| filter)
        .unwrap_or(broker_filter)
}

/// Is `topic` (a name or a filter) at or below the level prefix `prefix`?
/// `sensors` and `sensors/` both cover `sensors` and `sensors/a/b`, not `sensorsX`.
pub fn is_under(topic: &str, prefix: &str) -> bool {
    let p = prefix.strip_suffix('/').unwrap_or(prefix);
    if p.is_empty() {
        return false;
    }
    topic == p
        || topic
            .strip_prefix(p)
            .is_some_and(|rest| rest.starts_with('/'))
}

/// A valid MQTT subscription filter: `+` and `#` only as whole levels
/// (`#` last), no NUL. Anything else makes a broker drop the connection, so
/// such filters never leave pulso.
pub fn is_mqtt_filter(filter: &str) -> bool {
    if filter.is_empty() || filter.contains('\0') {
        return false;
    }
    let mut levels = filter.split('/').peekable();
    while let Some(level) = levels.next() {
        let wild = level.contains(['+', '#']);
        if wild && level != "+" && level != "#" {
            return false;
        }
        if level == "#" && levels.peek().is_some() {
            return false;
        }
    }
    true
}

/// A valid MQTT topic name for PUBLISH: no wildcard characters, no NUL.
pub fn is_mqtt_topic_name(topic: &str) -> bool {
    !topic.is_empty() && !topic.contains(['+', '#', '\0'])
}

/// Splits `scheme://[user[:pass]@]host[:port][/]`.
fn parse_url(url: &str) -> Result<Broker, String> {
    let (scheme, rest) = url
        .split_once("://")
        .ok_or_else(|| format!("`{url}` is not a URL like mqtt://host:1883"))?;
    let tls = match scheme.to_ascii_lowercase().as_str() {
        "mqtt" | "tcp" => false,
        "mqtts" | "ssl" | "tls" => true,
        other => return Err(format!("unsupported scheme `{other}` (use mqtt or mqtts)")),
    };
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    if rest.contains(['/', '?', '#']) {
        return Err("a path or query is not supported; use mqtt://host:port".into());
    }
    let (userinfo, hostport) = match rest.rsplit_once('@') {
        Some((u, h)) => (Some(u), h),
        None => (None, rest),
    };
    let (username, password) = match userinfo {
        None => (None, None),
        Some(u) => match u.split_once(':') {
            Some((user, pass)) => (Some(percent_decode(user)?), Some(percent_decode(pass)?)),
            None => (Some(percent_decode(u)?), None),
        },
    };
    let default_port = if tls { 8883 } else { 1883 };
    let (host, port) = if let Some(v6) = hostport.strip_prefix('[') {
        let (host, after) = v6
            .split_once(']')
            .ok_or("unclosed `[` in the host".to_string())?;
        let port = match after.strip_prefix(':') {
            Some(p) => parse_port(p)?,
            None if after.is_empty() => default_port,
            None => return Err(format!("unexpected `{after}` after the host")),
        };
        (host.to_string(), port)
    } else {
        match hostport.rsplit_once(':') {
            Some((h, p)) => (h.to_string(), parse_port(p)?),
            None => (hostport.to_string(), default_port),
        }
    };
    if host.is_empty() {
        return Err("the host is missing".into());
    }
    Ok(Broker {
        host,
        port,
        tls,
        ca_file: None,
        username,
        password,
    })
}

fn parse_port(p: &str) -> Result<u16, String> {
    p.parse::<u16>()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| format!("`{p}` is not a port"))
}

/// Decodes the `%XX` escapes of the user or password in `mqtt.url`. A `%`
/// that does not start an escape is refused rather than kept as is (which
/// is what a lenient decoder does), so a mistyped credential is a
/// configuration error at start, not a refusal by the broker later.
fn percent_decode(s: &str) -> Result<String, String> {
    let escapes_ok = s.split('%').skip(1).all(|after| {
        after
            .as_bytes()
            .get(..2)
            .is_some_and(|hex| hex.iter().all(u8::is_ascii_hexdigit))
    });
    if !escapes_ok {
        return Err("bad %-escape in the user or password".into());
    }
    percent_encoding::percent_decode_str(s)
        .decode_utf8()
        .map(|text| text.into_owned())
        .map_err(|_| "the user or password is not UTF-8".to_string())
}

/// Characters kept from the node id in the default client id; the rest
/// become `-` so any broker accepts it.
fn client_id_of(node_id: &str) -> String {
    let clean: String = node_id
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '-'
            }
        })
        .collect();
    format!("pulso-{clean}")
}

fn prefixes(l: &Layered, name: &str, hub_prefix: &str) -> Result<Vec<String>, ConfigError> {
    let list = l.req(name, value::parse_list)?;
    for p in &list {
        if !p.starts_with(hub_prefix) {
            return Err(ConfigError::setting(
                name,
                format!("`{p}` does not start with mqtt.prefix `{hub_prefix}`"),
            ));
        }
        let mqtt_part = &p[hub_prefix.len()..];
        if mqtt_part.is_empty() || mqtt_part.contains(['+', '#']) {
            return Err(ConfigError::setting(
                name,
                format!("`{p}` must be a literal prefix below mqtt.prefix"),
            ));
        }
    }
    Ok(list)
}

pub(super) fn parse(l: &Layered) -> Result<MqttConfig, ConfigError> {
    let mut broker = match l.opt_text("mqtt.url")? {
        None => None,
        Some(url) => Some(parse_url(&url).map_err(|e| ConfigError::setting("mqtt.url", e))?),
    };
    if let Some(b) = broker.as_mut() {
        if let Some(user) = l.opt_text("mqtt.username")? {
            b.username = Some(user);
        }
        if let Some(pass) = l.opt_text("mqtt.password")? {
            b.password = Some(pass);
        }
        b.ca_file = l.opt_text("mqtt.ca_file")?.map(PathBuf::from);
        if b.password.is_some() && b.username.is_none() {
            return Err(ConfigError::setting(
                "mqtt.password",
                "needs a user name (mqtt.username or user@ in mqtt.url)",
            ));
        }
        if let Some(ca) = &b.ca_file
            && !ca.is_file()
        {
            return Err(ConfigError::setting(
                "mqtt.ca_file",
                format!("{} is not a readable file", ca.display()),
            ));
        }
    }

    let prefix = l.opt_text("mqtt.prefix")?.unwrap_or_default();
    if prefix.contains(['+', '#']) {
        return Err(ConfigError::setting(
            "mqtt.prefix",
            "must not contain `+` or `#`",
        ));
    }
    let mut topics = Vec::new();
    for t in l.req("mqtt.topics", value::parse_list)? {
        if !is_mqtt_filter(&t) {
            return Err(ConfigError::setting(
                "mqtt.topics",
                format!(
                    "`{t}` is not a valid MQTT filter (`+`/`#` must be whole levels, `#` last)"
                ),
            ));
        }
        let filter = Filter::parse(&t)
            .map_err(|e| ConfigError::setting("mqtt.topics", format!("`{t}`: {e}")))?;
        validate_name(&format!("{prefix}{t}"))
            .map_err(|e| ConfigError::setting("mqtt.topics", format!("`{prefix}{t}`: {e}")))?;
        topics.push(filter);
    }

    let qos = l.number::<u8>("mqtt.qos", 0)?;
    if qos > 1 {
        return Err(ConfigError::setting("mqtt.qos", "must be 0 or 1"));
    }
    let keep_alive = l.req("mqtt.keep_alive", value::parse_duration)?;
    if !keep_alive.is_zero() && keep_alive < Duration::from_secs(1) {
        return Err(ConfigError::setting(
            "mqtt.keep_alive",
            "must be 0 (off) or at least 1s",
        ));
    }
    let client_id = l.opt_text("mqtt.client_id")?;
    let clean_session = l.req("mqtt.clean_session", value::parse_bool)?;
    let max_payload = super::to_usize(
        "mqtt.max_payload",
        l.req("mqtt.max_payload", value::parse_size)?,
        1,
    )?;
    if max_payload > 256 * 1024 * 1024 {
        return Err(ConfigError::setting(
            "mqtt.max_payload",
            "must be at most 256MiB (the MQTT limit)",
        ));
    }
    let reconnect_min = l.req("mqtt.reconnect_min", value::parse_duration)?;
    let reconnect_max = l.req("mqtt.reconnect_max", value::parse_duration)?;
    if reconnect_min.is_zero() {
        return Err(ConfigError::setting(
            "mqtt.reconnect_min",
            "must be more than 0",
        ));
    }
    if reconnect_max < reconnect_min {
        return Err(ConfigError::setting(
            "mqtt.reconnect_max",
            "must be at least mqtt.reconnect_min",
        ));
    }
    Ok(MqttConfig {
        broker,
        client_id,
        topics,
        on_demand: prefixes(l, "mqtt.on_demand", &prefix)?,
        publish_prefixes: prefixes(l, "mqtt.publish_prefixes", &prefix)?,
        prefix,
        qos,
        keep_alive,
        clean_session,
        max_payload,
        last_value: l.req("mqtt.last_value", value::parse_bool)?,
        last_value_max_topics: l.number("mqtt.last_value_max_topics", 1)?,
        last_value_max_bytes: super::to_usize(
            "mqtt.last_value_max_bytes",
            l.req("mqtt.last_value_max_bytes", value::parse_size)?,
            1,
        )?,
        reconnect_min,
        reconnect_max,
    })
}

#[cfg(test)]
mod tests {
    use super::super::{Config, Source};
    use super::*;

    fn with(pairs: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let mut l = Layered::defaults();
        for (k, v) in pairs {
            l.set_text(k, v.to_string(), Source::Flag).unwrap();
        }
        Config::from_layered(&l)
    }

    #[test]
    fn off_by_default() {
        let c = with(&[]).unwrap();
        assert!(!c.mqtt.enabled());
        assert_eq!(c.mqtt.topics[0].as_str(), "temperature/#");
        assert!(c.mqtt.last_value_filters().is_empty());
        assert_eq!(c.mqtt.client_id("h:1"), "pulso-h-1");
    }

    #[test]
    fn urls() {
        let b = parse_url("mqtt://u:p%40ss@broker.local").unwrap();
        assert_eq!(
            (b.host.as_str(), b.port, b.tls),
            ("broker.local", 1883, false)
        );
        assert_eq!(b.password.as_deref(), Some("p@ss"));
        let b = parse_url("mqtt://%C3%A9l%C3%A8ve:%e2%82%AC%25@h").unwrap();
        assert_eq!(
            (b.username.as_deref(), b.password.as_deref()),
            (Some("élève"), Some("€%"))
        );
        for bad in ["p%", "p%4", "p%zz", "p%+f", "p%ff"] {
            assert!(parse_url(&format!("mqtt://u:{bad}@h")).is_err(), "{bad}");
        }
        let b = parse_url("mqtts://[::1]:1").unwrap();
        assert_eq!((b.host.as_str(), b.port, b.tls), ("::1", 1, true));
        assert_eq!(parse_url("mqtts://h").unwrap().port, 8883);
        assert!(parse_url("http://h").is_err());
        assert!(parse_url("mqtt://h:x").is_err());
        assert!(parse_url("h:1883").is_err());
        assert!(!format!("{:?}", parse_url("mqtt://u:secret@h").unwrap()).contains("secret"));
    }

    #[test]
    fn errors_name_the_mqtt_setting() {
        for (name, value) in [
            ("mqtt.url", "ftp://x"),
            ("mqtt.qos", "2"),
            ("mqtt.topics", "a/b+"),
            ("mqtt.keep_alive", "500ms"),
            ("mqtt.max_payload", "lots"),
            ("mqtt.on_demand", "a/#"),
        ] {
            let e = with(&[("mqtt.url", "mqtt://localhost"), (name, value)]).unwrap_err();
            assert!(e.0.contains(&format!("`{name}`")), "{name}: {e}");
        }
        let e = with(&[
            ("mqtt.url", "mqtt://localhost"),
            ("mqtt.prefix", "m/"),
            ("mqtt.publish_prefixes", "cmd"),
        ])
        .unwrap_err();
        assert!(e.0.contains("`mqtt.publish_prefixes`"), "{e}");
    }

    #[test]
    fn prefixed_last_value_filters() {
        let c = with(&[
            ("mqtt.url", "mqtt://localhost"),
            ("mqtt.prefix", "plant1/"),
            ("mqtt.topics", "temperature/#,humidity"),
        ])
        .unwrap();
        let f: Vec<String> = c
            .mqtt
            .last_value_filters()
            .iter()
            .map(|f| f.to_string())
            .collect();
        assert_eq!(f, vec!["plant1/temperature/#", "plant1/humidity"]);
    }

    #[test]
    fn levels_and_filters() {
        assert!(is_under("sensors/a", "sensors"));
        assert!(is_under("sensors/a", "sensors/"));
        assert!(is_under("sensors", "sensors/"));
        assert!(!is_under("sensorsX", "sensors"));
        assert!(is_mqtt_filter("a/+/b/#"));
        assert!(!is_mqtt_filter("a/b+"));
        assert!(!is_mqtt_filter("a/#/b"));
        assert_eq!(topics_of("$share/pulso/temperature/#"), "temperature/#");
        assert_eq!(topics_of("temperature/#"), "temperature/#");
        assert!(is_mqtt_topic_name("a/b"));
        assert!(!is_mqtt_topic_name("a/+"));
    }
}
