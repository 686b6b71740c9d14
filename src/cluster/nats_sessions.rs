//! Socket.IO recovery sessions kept in NATS JetStream for the whole
//! cluster (SPEC §11), as Redis keeps them: a client recovers on any node,
//! also after the node it was on died.
//!
//! - **One stream, one subject per session.** `<prefix>-sessions` holds
//!   `<prefix>.s.<pid>`, one message per subject (JetStream's per-subject
//!   limit: a new write replaces the last), none older than `history.ttl`,
//!   on file storage. A pid is pulso's own (22 characters of
//!   `A-Za-z0-9-_`, each valid in a subject token); anything else a client
//!   names is no session and is never looked up (a `*` or `>` would be a
//!   wildcard).
//! - **Kept alive while connected.** A message's age counts from its
//!   store: the sessions of the sockets connected here are stored again
//!   every third of `history.ttl` from this node's copy, so a session
//!   outlives its node by `history.ttl` at most. Each of these stores is
//!   conditional on the subject's last message being this node's last
//!   store of it (`Nats-Expected-Last-Subject-Sequence`): a session that
//!   another node took, or wrote since, is not brought back, and this node
//!   stops keeping it.
//! - **Taken once.** A node reads the subject's last message (a direct
//!   get), then purges the subject up to that message's sequence: of two
//!   nodes doing so, only one purge removes a message, and only that node
//!   has the session. nats-server 2.9 has no atomic get-and-delete, and a
//!   purge answers how many messages it removed; a conditional tombstone
//!   would do as well but leave a message behind that every read must
//!   skip. A purge that found nothing (the session was written again
//!   between the read and the purge) reads again.
//! - **Never waits.** Writes go through a bounded queue to one task; a
//!   write that finds the queue full is dropped and counted
//!   (`pulso_cluster_messages_total{kind="session_unsent"}`): that session
//!   recovers on its own node only.
//! - **Made on each connection.** The task creates the stream, or brings
//!   it to this configuration, on each connection (within a second of it,
//!   or at its first write). When the stream is a new one (the NATS
//!   server lost its data), the sessions of the sockets connected here are
//!   stored again then.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use async_nats::Client;
use async_nats::connection::State;
use bytes::Bytes;
use futures_util::StreamExt;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::Shared;
use super::jetstream::{self, Refused};
use crate::gateway::{SessionFetch, SharedSessions};
use crate::metrics::Metrics;

/// Session writes waiting for the sessions task; beyond this a write is
/// dropped (counted) and that session recovers on its own node only.
const OPS: usize = 4096;
/// Writes taken from the queue at once.
const BATCH: usize = 256;
/// Stores and purges in flight at once.
const CONCURRENT: usize = 64;
/// Sessions of sockets connected here kept alive, at most (as many as a
/// node keeps for recovery); past this a new one is stored once and
/// expires `history.ttl` later.
const LIVE: usize = 100_000;
/// The whole stream's bound; past it the oldest sessions go.
const STREAM_BYTES: u64 = 256 * 1024 * 1024;
/// Reads of a session that is written again between the read and the
/// purge, before the take gives up (the client connects as new).
const TAKE_TRIES: usize = 4;
/// The longest pid looked up.
const MAX_PID: usize = 64;
/// How often the task looks for a new connection, to make the stream on
/// it and store again what a lost stream held.
const RECONNECT_CHECK: Duration = Duration::from_secs(1);

/// The sessions stream's configuration.
pub fn stream_config(prefix: &str, ttl: Duration) -> serde_json::Value {
    serde_json::json!({
        "name": stream_name(prefix),
        "subjects": [format!("{prefix}.s.>")],
        "storage": "file",
        "retention": "limits",
        "discard": "old",
        "num_replicas": 1,
        "max_msgs_per_subject": 1,
        "max_bytes": STREAM_BYTES,
        "max_age": u64::try_from(ttl.as_nanos()).unwrap_or(u64::MAX),
        "allow_direct": true,
    })
}

pub fn stream_name(prefix: &str) -> String {
    format!("{prefix}-sessions")
}

/// The subject of the session `pid`, if `pid` can be one of pulso's.
fn subject(prefix: &str, pid: &str) -> Option<String> {
    let valid = !pid.is_empty()
        && pid.len() <= MAX_PID
        && pid
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    valid.then(|| format!("{prefix}.s.{pid}"))
}

/// A write to the shared sessions.
pub enum SessionOp {
    Save {
        pid: String,
        session: Bytes,
        live: bool,
    },
    Forget(String),
}

impl SessionOp {
    fn pid(&self) -> &str {
        match self {
            SessionOp::Save { pid, .. } | SessionOp::Forget(pid) => pid,
        }
    }
}

/// The recovery sessions in JetStream, as the front ends use them.
pub struct NatsSessions {
    prefix: String,
    stream: String,
    ttl: Duration,
    ops: mpsc::Sender<SessionOp>,
    client: OnceLock<Client>,
    metrics: Arc<Metrics>,
}

/// A session of a socket connected here.
struct Live {
    session: Bytes,
    /// The sequence of this node's last store of it; `None`: stored
    /// whatever the subject holds at the next refresh (its last store
    /// failed, or the stream is a new one).
    seq: Option<u64>,
}

impl NatsSessions {
    /// The sessions and their queue, when the cluster keeps a history.
    pub fn prepare(shared: &Shared) -> Option<(Arc<NatsSessions>, mpsc::Receiver<SessionOp>)> {
        let rules = shared.history.as_ref()?;
        let (tx, rx) = mpsc::channel(OPS);
        let sessions = Arc::new(NatsSessions {
            prefix: shared.prefix.clone(),
            stream: stream_name(&shared.prefix),
            ttl: rules.ttl,
            ops: tx,
            client: OnceLock::new(),
            metrics: shared.metrics.clone(),
        });
        Some((sessions, rx))
    }

    fn send(&self, op: SessionOp) {
        if subject(&self.prefix, op.pid()).is_none() {
            // Never one of ours: nothing to write.
            return;
        }
        if self.ops.try_send(op).is_err() {
            self.metrics
                .cluster_messages
                .get_or_create(&[("kind", "session_unsent")])
                .inc();
        }
    }

    /// Writes the sessions on `client`, and keeps those of the sockets
    /// connected here alive, until `stop`.
    pub async fn run(
        self: Arc<Self>,
        client: Client,
        mut ops: mpsc::Receiver<SessionOp>,
        stop: CancellationToken,
    ) {
        let _ = self.client.set(client.clone());
        let mut task = Task {
            sessions: self.clone(),
            client,
            live: HashMap::new(),
            made_on: None,
            created: None,
            warned_full: false,
            warned_stream: false,
        };
        let every = (self.ttl / 3).max(Duration::from_millis(100));
        let mut refresh = tokio::time::interval(every);
        refresh.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut watch = tokio::time::interval(RECONNECT_CHECK);
        watch.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut batch = Vec::with_capacity(BATCH);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                n = ops.recv_many(&mut batch, BATCH) => {
                    if n == 0 {
                        return;
                    }
                    task.write(&mut batch).await;
                }
                _ = refresh.tick() => task.refresh().await,
                _ = watch.tick() => task.reconnected().await,
            }
        }
    }
}

impl SharedSessions for NatsSessions {
    fn save(&self, pid: &str, session: Vec<u8>, live: bool) {
        self.send(SessionOp::Save {
            pid: pid.to_string(),
            session: Bytes::from(session),
            live,
        });
    }

    fn forget(&self, pid: &str) {
        self.send(SessionOp::Forget(pid.to_string()));
    }

    fn take(&self, pid: &str) -> SessionFetch {
        let client = self.client.get().cloned();
        let stream = self.stream.clone();
        let subject = subject(&self.prefix, pid);
        Box::pin(async move {
            let Some(subject) = subject else {
                return Ok(None);
            };
            let Some(client) = client.filter(|c| c.connection_state() == State::Connected) else {
                return Err("not connected to NATS".into());
            };
            for _ in 0..TAKE_TRIES {
                let Some(stored) = jetstream::last_on(&client, &stream, &subject).await? else {
                    return Ok(None);
                };
                let before = stored.seq.saturating_add(1);
                if jetstream::purge(&client, &stream, &subject, Some(before)).await? > 0 {
                    return Ok(Some(stored.payload.to_vec()));
                }
            }
            Ok(None)
        })
    }
}

/// The sessions task's state.
struct Task {
    sessions: Arc<NatsSessions>,
    client: Client,
    live: HashMap<String, Live>,
    /// The connection (the client's count of connections) the stream was
    /// last made on.
    made_on: Option<u64>,
    /// The stream's creation time, as last made.
    created: Option<String>,
    warned_full: bool,
    warned_stream: bool,
}

/// The outcome of one store or purge.
enum Done {
    Stored(u64),
    /// The subject holds another node's write, or nothing: not ours to
    /// keep alive any more.
    NotOurs,
    Failed(String),
}

impl Task {
    /// Whether the stream can be written now: connected, and the stream
    /// made on this connection.
    async fn ready(&mut self) -> bool {
        if self.client.connection_state() != State::Connected {
            return false;
        }
        let connects = self.client.statistics().connects.load(Ordering::Relaxed);
        if self.made_on == Some(connects) {
            return true;
        }
        let config = stream_config(&self.sessions.prefix, self.sessions.ttl);
        match jetstream::ensure_stream(&self.client, &config).await {
            Ok(info) => {
                let created = info["created"].as_str().map(str::to_string);
                if self.created.is_some() && created != self.created {
                    // A new stream: what this node stored is gone.
                    for live in self.live.values_mut() {
                        live.seq = None;
                    }
                }
                self.created = created;
                self.made_on = Some(connects);
                self.warned_stream = false;
                self.store_live(true).await;
                true
            }
            Err(e) => {
                // Tried again every second: said once until it works.
                if !std::mem::replace(&mut self.warned_stream, true) {
                    tracing::warn!(error = %e, "recovery sessions stream not made");
                }
                false
            }
        }
    }

    /// Applies a batch of writes: the last of each session's writes is
    /// what counts, and distinct sessions are written side by side.
    async fn write(&mut self, batch: &mut Vec<SessionOp>) {
        let mut last: HashMap<String, SessionOp> = HashMap::with_capacity(batch.len());
        for op in batch.drain(..) {
            last.insert(op.pid().to_string(), op);
        }
        // Made (and what an earlier failure left unstored written) before
        // this batch's copies are kept.
        let ready = self.ready().await;
        // This node's copy follows every write, sent or not: a live one
        // is stored at the next refresh if it cannot be now.
        for op in last.values() {
            match op {
                SessionOp::Save {
                    pid,
                    session,
                    live: true,
                } => self.keep(pid, session.clone()),
                _ => {
                    self.live.remove(op.pid());
                }
            }
        }
        if !ready {
            tracing::warn!(
                writes = last.len(),
                "recovery sessions not written: NATS unavailable"
            );
            return;
        }
        let done: Vec<(String, bool, Done)> = futures_util::stream::iter(last.into_values())
            .map(|op| {
                let (client, sessions) = (self.client.clone(), self.sessions.clone());
                async move {
                    match op {
                        SessionOp::Save { pid, session, live } => {
                            let done = store(&client, &sessions, &pid, None, session).await;
                            (pid, live, done)
                        }
                        SessionOp::Forget(pid) => {
                            let done = forget(&client, &sessions, &pid).await;
                            (pid, false, done)
                        }
                    }
                }
            })
            .buffer_unordered(CONCURRENT)
            .collect()
            .await;
        for (pid, live, done) in done {
            match done {
                Done::Stored(seq) if live => {
                    if let Some(l) = self.live.get_mut(&pid) {
                        l.seq = Some(seq);
                    }
                }
                Done::Failed(e) => {
                    tracing::warn!(error = %e, "recovery session not written");
                    // The stream may be gone: made again before the next.
                    self.made_on = None;
                }
                _ => {}
            }
        }
    }

    /// Keeps this node's copy of a live session (bounded).
    fn keep(&mut self, pid: &str, session: Bytes) {
        if let Some(l) = self.live.get_mut(pid) {
            *l = Live { session, seq: None };
            return;
        }
        if self.live.len() >= LIVE {
            if !std::mem::replace(&mut self.warned_full, true) {
                tracing::warn!(
                    max = LIVE,
                    "too many connected sockets' sessions to keep alive: new ones expire after history.ttl"
                );
            }
            return;
        }
        self.warned_full = false;
        self.live
            .insert(pid.to_string(), Live { session, seq: None });
    }

    /// Stores the live sessions again, so they do not expire.
    async fn refresh(&mut self) {
        if self.live.is_empty() || !self.ready().await {
            return;
        }
        self.store_live(false).await;
    }

    /// A new connection, or a write that failed (the stream may be gone):
    /// the stream is made again, and what it lost stored again.
    async fn reconnected(&mut self) {
        let connects = self.client.statistics().connects.load(Ordering::Relaxed);
        if !self.live.is_empty() && self.made_on != Some(connects) {
            self.ready().await;
        }
    }

    /// Stores this node's copies of the live sessions (`unstored`: only
    /// those not stored yet).
    async fn store_live(&mut self, unstored: bool) {
        let all: Vec<(String, Option<u64>, Bytes)> = self
            .live
            .iter()
            .filter(|(_, l)| !unstored || l.seq.is_none())
            .map(|(pid, l)| (pid.clone(), l.seq, l.session.clone()))
            .collect();
        if all.is_empty() {
            return;
        }
        let done: Vec<(String, Done)> = futures_util::stream::iter(all)
            .map(|(pid, seq, session)| {
                let (client, sessions) = (self.client.clone(), self.sessions.clone());
                async move {
                    let done = store(&client, &sessions, &pid, seq, session).await;
                    (pid, done)
                }
            })
            .buffer_unordered(CONCURRENT)
            .collect()
            .await;
        let mut failed = None;
        for (pid, done) in done {
            match done {
                Done::Stored(seq) => {
                    if let Some(l) = self.live.get_mut(&pid) {
                        l.seq = Some(seq);
                    }
                }
                Done::NotOurs => {
                    self.live.remove(&pid);
                }
                Done::Failed(e) => failed = Some(e),
            }
        }
        if let Some(e) = failed {
            tracing::warn!(error = %e, "recovery sessions not kept alive");
            self.made_on = None;
        }
    }
}

/// Stores `session` under `pid`: with `expect`, only over this node's
/// last store of it.
async fn store(
    client: &Client,
    sessions: &NatsSessions,
    pid: &str,
    expect: Option<u64>,
    session: Bytes,
) -> Done {
    let Some(subject) = subject(&sessions.prefix, pid) else {
        return Done::NotOurs;
    };
    match jetstream::publish(client, subject, expect, session).await {
        Ok(seq) => Done::Stored(seq),
        Err(Refused::NotLast) => Done::NotOurs,
        Err(Refused::Failed(e)) => Done::Failed(e),
    }
}

/// Removes the session `pid`.
async fn forget(client: &Client, sessions: &NatsSessions, pid: &str) -> Done {
    let Some(subject) = subject(&sessions.prefix, pid) else {
        return Done::NotOurs;
    };
    match jetstream::purge(client, &sessions.stream, &subject, None).await {
        Ok(_) => Done::NotOurs,
        Err(e) => Done::Failed(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_pulsos_pids_name_a_subject() {
        assert_eq!(
            subject("p", "Ab9-_xYz0123456789abcd").as_deref(),
            Some("p.s.Ab9-_xYz0123456789abcd")
        );
        for bad in ["", ">", "*", "a.b", "a b", "é", &"a".repeat(MAX_PID + 1)] {
            assert_eq!(subject("p", bad), None, "{bad:?}");
        }
    }
}
