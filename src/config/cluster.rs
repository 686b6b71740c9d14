//! `cluster.*`: which engine carries the backplane, and the node liveness
//! clocks (SPEC §8).

use std::time::Duration;

use super::{ConfigError, Layered, value};

/// The engine a cluster's nodes talk through.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Engine {
    /// `redis://…` or `rediss://…`.
    Redis(String),
    /// `nats://…`.
    Nats(String),
}

#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// `None`: a single node (the default).
    pub engine: Option<Engine>,
    /// Prefixes every channel, subject and key, so several clusters can
    /// share one Redis or NATS.
    pub prefix: String,
    pub heartbeat: Duration,
    pub node_ttl: Duration,
}

impl ClusterConfig {
    /// `redis`, `nats`, or `None` for a single node.
    pub fn engine_name(&self) -> Option<&'static str> {
        match self.engine {
            Some(Engine::Redis(_)) => Some("redis"),
            Some(Engine::Nats(_)) => Some("nats"),
            None => None,
        }
    }
}

pub fn parse(l: &Layered, database_url: &str) -> Result<ClusterConfig, ConfigError> {
    let redis = l.opt_text("cluster.redis_url")?;
    let nats = l.opt_text("cluster.nats_url")?;
    let engine = match (redis, nats) {
        (Some(_), Some(_)) => {
            return Err(ConfigError::setting(
                "cluster.redis_url",
                "set either cluster.redis_url or cluster.nats_url, not both",
            ));
        }
        (Some(url), None) => {
            if !(url.starts_with("redis://") || url.starts_with("rediss://")) {
                return Err(ConfigError::setting(
                    "cluster.redis_url",
                    format!("`{url}` is not a redis:// or rediss:// url"),
                ));
            }
            Some(Engine::Redis(url))
        }
        (None, Some(url)) => {
            if !url.starts_with("nats://") {
                return Err(ConfigError::setting(
                    "cluster.nats_url",
                    format!("`{url}` is not a nats:// url"),
                ));
            }
            Some(Engine::Nats(url))
        }
        (None, None) => None,
    };
    let prefix = l.req("cluster.prefix", value::parse_string)?;
    if prefix.is_empty()
        || prefix.len() > 64
        || !prefix
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        return Err(ConfigError::setting(
            "cluster.prefix",
            "must be 1-64 ASCII letters, digits, `_` or `-`",
        ));
    }
    let heartbeat = l.req("cluster.heartbeat", value::parse_duration)?;
    let node_ttl = l.req("cluster.node_ttl", value::parse_duration)?;
    if heartbeat.is_zero() {
        return Err(ConfigError::setting(
            "cluster.heartbeat",
            "must be more than 0",
        ));
    }
    if node_ttl <= heartbeat {
        return Err(ConfigError::setting(
            "cluster.node_ttl",
            "must be longer than cluster.heartbeat",
        ));
    }
    // Every node must see every other node's presence rows and heartbeats.
    if engine.is_some() && database_url.starts_with("sqlite:") {
        return Err(ConfigError::setting(
            "database_url",
            "a cluster needs a shared PostgreSQL (postgres://…), not SQLite",
        ));
    }
    Ok(ClusterConfig {
        engine,
        prefix,
        heartbeat,
        node_ttl,
    })
}
