//! The gateway core shared by every front end: configuration, hub, token
//! verifier, metrics, the process-wide shutdown signal, and the
//! capabilities the front ends use through interfaces rather than concrete
//! types: the presence store ([`PresenceStore`]) and the upstream broker a
//! client's publish may be forwarded to ([`Upstream`]). `server` plugs the
//! implementations in (`presence::Presence`, `mqtt::Bridge`), so no front
//! end depends on a store or a bridge, and this module on neither.

pub mod admission;

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::value::RawValue;
use tokio::sync::oneshot;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::{Identity, Verifier};
use crate::config::{Config, RoleAcl};
use crate::hub::Hub;
use crate::hub::topic::Filter;
use crate::metrics::Metrics;

pub struct Gateway {
    pub config: Arc<Config>,
    pub hub: Arc<Hub>,
    pub verifier: Verifier,
    pub metrics: Arc<Metrics>,
    /// Cancelled when the process starts to stop.
    pub shutdown: CancellationToken,
    /// Every connection task, so a stop can wait for them to close.
    pub connections: TaskTracker,
    pub readiness: Readiness,
    /// Where client publishes under `mqtt.publish_prefixes` go (the MQTT
    /// bridge, when `mqtt.url` is set).
    pub upstream: Option<Arc<dyn Upstream>>,
    /// Who holds which socket (SPEC §7); writes never block.
    pub presence: Arc<dyn PresenceStore>,
    /// Which browser origins may connect, and how many connections may be
    /// open.
    pub admission: Arc<admission::Admission>,
    /// Where Socket.IO recovery sessions are shared with the other nodes
    /// of a cluster (`None`: kept on this node only).
    pub sessions: Option<Arc<dyn SharedSessions>>,
    /// When the server was built: the console's uptime.
    pub started: std::time::Instant,
}

/// Socket.IO recovery sessions shared by the nodes of a cluster (SPEC
/// §11), so that a client recovers on any node, also after the node it
/// was on died: a session is written when its socket authenticates (and
/// kept alive while it is connected), again when its transport is lost,
/// and taken once, by whichever node the client comes back to. Sessions
/// are opaque bytes here; the front end that made one reads it.
pub trait SharedSessions: Send + Sync + 'static {
    /// Writes `session` under `pid`. `live`: its socket is connected, and
    /// the session is kept as long as this node lives, then `history.ttl`;
    /// otherwise `history.ttl` from now. Never waits.
    fn save(&self, pid: &str, session: Vec<u8>, live: bool);
    /// The socket ended for good: its session goes. Never waits.
    fn forget(&self, pid: &str);
    /// Takes the session under `pid` (it is gone for every node after).
    fn take(&self, pid: &str) -> SessionFetch;
}

/// A [`SharedSessions::take`] under way.
pub type SessionFetch = std::pin::Pin<
    Box<dyn std::future::Future<Output = Result<Option<Vec<u8>>, String>> + Send + 'static>,
>;

/// A socket that authenticated: the row (role, sub) now points at it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    pub role: String,
    pub sub: String,
    pub socket_id: String,
    /// `ws` or `socketio`.
    pub protocol: &'static str,
}

/// One row that holds a socket, as `GET /api/presence` shows it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct PresenceRow {
    pub role: String,
    pub sub: String,
    pub socket_id: String,
    pub protocol: String,
    pub node: String,
    /// RFC 3339, UTC.
    pub connected_at: String,
}

/// One live node of the cluster, as `GET /api/cluster` shows it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct NodeRow {
    pub node: String,
    pub connections: i64,
    /// Its last heartbeat, RFC 3339, UTC.
    pub seen_at: String,
    /// The node that answers.
    #[serde(rename = "self")]
    pub this: bool,
}

/// Why a presence read failed.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("the presence store is not connected: {0}")]
    Unavailable(String),
    #[error("presence query failed: {0}")]
    Query(String),
}

/// The end of one presence write: committed, given up, or its timeout
/// passed, whichever comes first. Clients are answered once it is.
#[must_use = "the client is answered once the row is committed"]
pub struct Committed {
    done: Option<oneshot::Receiver<()>>,
    timeout: Duration,
}

impl Committed {
    /// Ends when `done` is sent to or dropped, or after `timeout`.
    pub fn new(done: oneshot::Receiver<()>, timeout: Duration) -> Committed {
        Committed {
            done: Some(done),
            timeout,
        }
    }

    /// A write that is already over.
    pub fn done() -> Committed {
        Committed {
            done: None,
            timeout: Duration::ZERO,
        }
    }

    /// Waits for the write (bounded).
    pub async fn wait(self) {
        if let Some(done) = self.done {
            // A closed channel (committed or given up) and the timeout
            // both end the wait; the write itself goes on either way.
            let _ = tokio::time::timeout(self.timeout, done).await;
        }
    }
}

/// A boxed future, for the async methods of the capability traits.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The presence store as the front ends use it (SPEC §7).
pub trait PresenceStore: Send + Sync + 'static {
    /// Records that `holder` authenticated now; never waits. The client is
    /// answered once the returned [`Committed`] is.
    fn set(&self, holder: Holder) -> Committed;
    /// Records that `holder` disconnected (clears the row only if it still
    /// holds that socket); never waits.
    fn clear(&self, holder: Holder);
    /// Rows that hold a socket, optionally filtered by role and/or sub.
    fn list<'a>(
        &'a self,
        role: Option<&'a str>,
        sub: Option<&'a str>,
    ) -> BoxFuture<'a, Result<Vec<PresenceRow>, ReadError>>;
    /// `Ok` while the store is connected and its last write succeeded.
    fn status(&self) -> Result<(), String>;
    /// The live nodes of this node's cluster, from their heartbeats; a
    /// single node lists itself.
    fn nodes(&self) -> BoxFuture<'_, Result<Vec<NodeRow>, ReadError>>;
}

/// Why a client publish could not be forwarded upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    /// The `/ws` error code.
    pub code: &'static str,
    pub message: String,
}

/// Where client publishes on some topics go instead of the hub: the MQTT
/// broker (SPEC §6, `mqtt.publish_prefixes`).
pub trait Upstream: Send + Sync + 'static {
    /// Whether a client publish on `topic` goes upstream.
    fn forwards(&self, topic: &str) -> bool;
    /// Queues it upstream without waiting.
    fn forward(&self, topic: &str, payload: &RawValue) -> Result<(), Refused>;
}

type Check = Box<dyn Fn() -> Result<(), String> + Send + Sync>;

/// Named readiness checks that components (MQTT bridge, presence store,
/// cluster) register. A check reads state its component keeps up to date; it
/// never does I/O, so `/readyz` answers at once.
#[derive(Default)]
pub struct Readiness {
    checks: Mutex<Vec<(&'static str, Check)>>,
}

impl Readiness {
    pub fn register(
        &self,
        name: &'static str,
        check: impl Fn() -> Result<(), String> + Send + Sync + 'static,
    ) {
        self.checks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((name, Box::new(check)));
    }

    /// Whether all checks pass, and each check's state ("ok" or the reason).
    pub fn report(&self) -> (bool, serde_json::Map<String, serde_json::Value>) {
        let checks = self.checks.lock().unwrap_or_else(|e| e.into_inner());
        let mut all = true;
        let mut out = serde_json::Map::new();
        for (name, check) in checks.iter() {
            let state = match check() {
                Ok(()) => "ok".to_string(),
                Err(reason) => {
                    all = false;
                    reason
                }
            };
            out.insert((*name).to_string(), state.into());
        }
        (all, out)
    }
}

impl Gateway {
    fn acl(&self, role: &str) -> Option<&RoleAcl> {
        self.config.acl.get(role)
    }

    /// May this identity subscribe to `filter`? A wildcard must be entirely
    /// inside one of the role's subscribe filters.
    pub fn may_subscribe(&self, who: &Identity, filter: &Filter) -> bool {
        match self.acl(&who.role).and_then(|a| a.subscribe.as_ref()) {
            None => true,
            Some(rules) => rules.iter().any(|rule| rule.covers(filter)),
        }
    }

    /// May this identity publish on `topic`? Off unless the role has rules.
    pub fn may_publish(&self, who: &Identity, topic: &str) -> bool {
        self.acl(&who.role)
            .is_some_and(|a| a.publish.iter().any(|rule| rule.matches(topic)))
    }

    /// Is this identity allowed to use the HTTP publish API?
    pub fn is_publisher(&self, who: &Identity) -> bool {
        self.config.publisher_roles.contains(&who.role)
    }
}
