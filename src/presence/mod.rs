//! The presence store: which socket each (role, sub) holds right now
//! (SPEC §7), in SQLite or PostgreSQL through sqlx.
//!
//! Front ends never block on the database. [`Presence::set`] and
//! [`Presence::clear`] only push onto a bounded queue; one background
//! writer task applies the operations in order, everything queued meanwhile
//! in one transaction (group commit), retrying a failed one a few times. A
//! slow or stopped database therefore costs queued writes (counted and
//! logged when they are dropped or fail), never message delivery.
//!
//! Clients read their writes: `set` hands back a [`Committed`] that the
//! front end waits on (at most `presence.write_timeout`) before it answers
//! the client, so a backend the client tells "I am connected" finds the
//! row. A failed or dropped write ends the wait at once: authentication
//! never fails, nor waits long, because the store is down.
//!
//! The writer also owns the connection: it (re)connects, creates or migrates
//! the schema, and clears the rows this node left behind after a crash
//! before it applies anything else. `/readyz` reads the state it keeps.
//!
//! In a cluster the store also keeps the nodes' heartbeats ([`nodes`]): the
//! writer claims this node's id before it touches any row, and a heartbeat
//! task clears the rows of nodes that died without stopping.

mod db;
pub mod nodes;
pub mod time;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use crate::config::cluster::ClusterConfig;
use crate::config::{EntityTable, PresenceConfig};
pub use crate::gateway::{Committed, Holder, ReadError};
use crate::metrics::Metrics;
pub use db::{Claim, Db, Member, NodeRow, Row, Write};
pub use nodes::NodeInUse;

/// Operations queued before the writer starts dropping (and counting) them.
pub const QUEUE: usize = 4096;
/// Attempts per batch before it is given up (and counted as failed).
const ATTEMPTS: u32 = 3;
/// Most writes applied in one transaction.
const BATCH: usize = 256;
/// How long one connection attempt or query may take.
const DB_TIMEOUT: Duration = Duration::from_secs(3);

enum Op {
    /// The sender is dropped once the write is committed or given up.
    Set(Holder, u64, Option<oneshot::Sender<()>>),
    /// Clear the row only if it still holds this socket id.
    Clear(Holder),
    /// Clear every row this node holds, then stop (graceful shutdown).
    Stop(oneshot::Sender<()>),
    /// Nothing to write: wakes the writer to act on a flag (`reclaim`).
    Wake,
}

struct Shared {
    node: String,
    entities: HashMap<String, EntityTable>,
    /// Set once the writer has connected and migrated; reads use it too.
    db: RwLock<Option<Db>>,
    /// `Ok` while the last connection attempt and write succeeded.
    state: Mutex<Result<(), String>>,
    metrics: Arc<Metrics>,
    /// Writes dropped on a full queue so far (for log throttling).
    dropped: AtomicU64,
    /// What this node holds right now, by (role, sub): the truth the rows
    /// are brought back to after writes were lost (see [`resync`]).
    live: Mutex<HashMap<(String, String), (Holder, u64)>>,
    /// Set when a write was dropped or failed, or the store reconnected:
    /// the writer then rewrites this node's rows from `live`.
    stale: AtomicBool,
    /// In a cluster: this node's heartbeat row, and how often to write it.
    member: Option<(Member, Duration)>,
    /// This instance holds its heartbeat row (claimed, not lost since).
    claimed: AtomicBool,
    /// The heartbeat row was lost: the writer claims the node id again and
    /// rewrites this node's rows.
    reclaim: AtomicBool,
    /// The node is stopping: no more heartbeats.
    stopping: AtomicBool,
}

impl Shared {
    fn set_state(&self, state: Result<(), String>) {
        *self.state.lock().unwrap_or_else(|e| e.into_inner()) = state;
    }

    fn live(&self) -> std::sync::MutexGuard<'_, HashMap<(String, String), (Holder, u64)>> {
        self.live.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn db(&self) -> Option<Db> {
        self.db.read().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// Handle on the presence store; cheap to share.
#[derive(Clone)]
pub struct Presence {
    tx: mpsc::Sender<Op>,
    shared: Arc<Shared>,
    write_timeout: Duration,
}

impl Presence {
    /// Starts the writer task and waits (boundedly) for its first connection
    /// attempt, so `/readyz` tells the truth from the start. A database that
    /// is down does not stop the gateway: the writer keeps retrying.
    ///
    /// With `cluster` (a cluster engine is configured) the first connection
    /// also claims the node id, waiting at most `cluster.node_ttl` to tell
    /// a live holder from a dead one ([`nodes`]); a live holder is the one
    /// error: this node must not start. A database that cannot be reached
    /// in time does not stop the start either: the claim is made once it
    /// connects, and until then this node writes no row at all.
    pub async fn start(
        config: &PresenceConfig,
        node: &str,
        metrics: Arc<Metrics>,
        cluster: Option<&ClusterConfig>,
    ) -> Result<Presence, NodeInUse> {
        let (tx, rx) = mpsc::channel(QUEUE);
        let member = cluster.map(|c| {
            let ttl_ms = i64::try_from(c.node_ttl.as_millis()).unwrap_or(i64::MAX);
            let member = Member {
                node: node.to_string(),
                instance: format!("{:016x}", rand::random::<u64>()),
                cluster: c.prefix.clone(),
                ttl_ms,
            };
            (member, c.heartbeat)
        });
        let claim_wait = cluster.map_or(Duration::ZERO, |c| c.node_ttl + DB_TIMEOUT);
        let shared = Arc::new(Shared {
            node: node.to_string(),
            entities: config.entities.clone(),
            db: RwLock::new(None),
            state: Mutex::new(Err("connecting".into())),
            metrics,
            dropped: AtomicU64::new(0),
            live: Mutex::new(HashMap::new()),
            stale: AtomicBool::new(false),
            member,
            claimed: AtomicBool::new(false),
            reclaim: AtomicBool::new(false),
            stopping: AtomicBool::new(false),
        });
        let (first, first_rx) = oneshot::channel();
        tokio::spawn(writer(
            config.database_url.clone(),
            shared.clone(),
            rx,
            first,
        ));
        // Dropping `tx` on an error below ends the writer.
        if let Ok(Ok(Some(in_use))) =
            tokio::time::timeout(DB_TIMEOUT * 2 + claim_wait, first_rx).await
        {
            return Err(in_use);
        }
        if shared.member.is_some() && !shared.claimed.load(Ordering::Acquire) {
            tracing::warn!(
                state = ?shared.state.lock().unwrap_or_else(|e| e.into_inner()).clone().err(),
                "node_id not checked against the cluster's heartbeats: the database \
                 could not be reached in time; serving anyway, without presence rows \
                 until the node id is claimed"
            );
        }
        Ok(Presence {
            tx,
            shared,
            write_timeout: config.write_timeout,
        })
    }

    /// `Ok` when the store is connected and the last write succeeded.
    pub fn status(&self) -> Result<(), String> {
        self.shared
            .state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Records that `holder` authenticated now. Never waits; the client
    /// is answered once the returned [`Committed`] is.
    pub fn set(&self, holder: Holder) -> Committed {
        let at = crate::hub::now_ms();
        self.shared.live().insert(
            (holder.role.clone(), holder.sub.clone()),
            (holder.clone(), at),
        );
        let (done, wait) = oneshot::channel();
        self.push(Op::Set(holder, at, Some(done)));
        Committed::new(wait, self.write_timeout)
    }

    /// Records that `holder` disconnected. Never waits.
    pub fn clear(&self, holder: Holder) {
        {
            let mut live = self.shared.live();
            let key = (holder.role.clone(), holder.sub.clone());
            if live
                .get(&key)
                .is_some_and(|(h, _)| h.socket_id == holder.socket_id)
            {
                live.remove(&key);
            }
        }
        self.push(Op::Clear(holder));
    }

    fn push(&self, op: Op) {
        if let Err(e) = self.tx.try_send(op) {
            // The rows no longer match `live`; the writer rewrites them.
            self.shared.stale.store(true, Ordering::Relaxed);
            let full = matches!(e, mpsc::error::TrySendError::Full(_));
            self.shared.metrics.presence_write("dropped");
            // Log the 1st, 2nd, 4th, 8th… drop: a flood must not flood the log.
            let n = self.shared.dropped.fetch_add(1, Ordering::Relaxed) + 1;
            if full && n.is_power_of_two() {
                tracing::warn!(dropped = n, "presence queue full; presence writes dropped");
            }
        }
    }

    /// Clears this node's rows (and, in a cluster, removes its heartbeat)
    /// and stops the writer, waiting at most `limit`.
    pub async fn stop(&self, limit: Duration) {
        self.shared.stopping.store(true, Ordering::Release);
        let (done, wait) = oneshot::channel();
        let stop = async {
            if self.tx.send(Op::Stop(done)).await.is_ok() {
                let _ = wait.await;
            }
        };
        if tokio::time::timeout(limit, stop).await.is_err() {
            tracing::warn!("presence rows could not be cleared before the shutdown deadline");
        }
    }

    /// Rows that hold a socket, optionally filtered by role and/or sub.
    pub async fn list(&self, role: Option<&str>, sub: Option<&str>) -> Result<Vec<Row>, ReadError> {
        let db = self.read_db()?;
        match tokio::time::timeout(DB_TIMEOUT, db.list(role, sub)).await {
            Ok(Ok(rows)) => Ok(rows),
            Ok(Err(e)) => Err(ReadError::Query(e.to_string())),
            Err(_) => Err(ReadError::Query("timed out".into())),
        }
    }

    /// The live nodes of this node's cluster, from their heartbeats; `None`
    /// when no cluster is configured.
    pub async fn nodes(&self) -> Option<Result<Vec<NodeRow>, ReadError>> {
        let (member, _) = self.shared.member.as_ref()?;
        let db = match self.read_db() {
            Ok(db) => db,
            Err(e) => return Some(Err(e)),
        };
        Some(
            match tokio::time::timeout(DB_TIMEOUT, db.nodes(member)).await {
                Ok(Ok(rows)) => Ok(rows),
                Ok(Err(e)) => Err(ReadError::Query(e.to_string())),
                Err(_) => Err(ReadError::Query("timed out".into())),
            },
        )
    }

    fn read_db(&self) -> Result<Db, ReadError> {
        self.shared.db().ok_or_else(|| {
            ReadError::Unavailable(
                self.status()
                    .err()
                    .unwrap_or_else(|| "not connected".into()),
            )
        })
    }
}

impl crate::gateway::PresenceStore for Presence {
    fn set(&self, holder: Holder) -> Committed {
        Presence::set(self, holder)
    }

    fn clear(&self, holder: Holder) {
        Presence::clear(self, holder)
    }

    fn list<'a>(
        &'a self,
        role: Option<&'a str>,
        sub: Option<&'a str>,
    ) -> crate::gateway::BoxFuture<'a, Result<Vec<Row>, ReadError>> {
        Box::pin(Presence::list(self, role, sub))
    }

    fn status(&self) -> Result<(), String> {
        Presence::status(self)
    }

    fn nodes(&self) -> crate::gateway::BoxFuture<'_, Result<Vec<NodeRow>, ReadError>> {
        Box::pin(async move {
            match Presence::nodes(self).await {
                Some(listed) => listed,
                // A single node: itself.
                None => {
                    let now = i64::try_from(crate::hub::now_ms()).unwrap_or(i64::MAX);
                    Ok(vec![NodeRow {
                        node: self.shared.node.clone(),
                        connections: self.shared.metrics.open_connections(),
                        seen_at: time::rfc3339_ms(now),
                        this: true,
                    }])
                }
            }
        })
    }
}

/// The writer's connection, reconnecting with capped exponential backoff.
/// While the store is down, attempts are spaced out and writes fail fast
/// (counted), so a dead database never turns the queue into a long stall.
struct Link {
    url: String,
    shared: Arc<Shared>,
    db: Option<Db>,
    next_attempt: tokio::time::Instant,
    backoff: Duration,
    /// The first connection may wait for a heartbeat to prove live or
    /// expire (start-up); later ones find the node id free or not at once.
    first: bool,
    /// Set when the last attempt found the node id held by a live node.
    in_use: Option<NodeInUse>,
}

impl Link {
    async fn ensure(&mut self) -> Option<Db> {
        if self.shared.reclaim.swap(false, Ordering::AcqRel) {
            // The heartbeat row is gone: connect again, which claims the
            // node id (or finds it taken) before any row is written.
            self.db = None;
            self.next_attempt = tokio::time::Instant::now();
        }
        if self.db.is_none() && tokio::time::Instant::now() >= self.next_attempt {
            let wait = std::mem::take(&mut self.first);
            match connect(&self.url, &self.shared, wait).await {
                Ok(db) => {
                    self.in_use = None;
                    // Connecting cleared this node's rows: write back the
                    // sockets it holds (none on the first connection).
                    self.shared.stale.store(true, Ordering::Relaxed);
                    *self.shared.db.write().unwrap_or_else(|e| e.into_inner()) = Some(db.clone());
                    self.shared.set_state(Ok(()));
                    self.db = Some(db);
                    self.backoff = Duration::from_millis(200);
                }
                Err(ConnectError::Failed(e)) => {
                    tracing::warn!(error = %e, retry_in = ?self.backoff, "presence store unavailable");
                    self.shared.set_state(Err(e));
                    self.next_attempt = tokio::time::Instant::now() + self.backoff;
                    self.backoff = (self.backoff * 2).min(Duration::from_secs(10));
                }
                Err(ConnectError::InUse(e)) => {
                    // At start-up the node refuses to start with this error;
                    // later it keeps serving, without presence rows.
                    if !wait {
                        tracing::error!(error = %e, retry_in = ?self.backoff, "this node writes no presence row while its node_id is held by another live node");
                    }
                    self.shared.set_state(Err(e.to_string()));
                    self.in_use = Some(e);
                    self.next_attempt = tokio::time::Instant::now() + self.backoff;
                    self.backoff = (self.backoff * 2).min(Duration::from_secs(10));
                }
            }
        }
        self.db.clone()
    }
}

/// The background writer: connect, then apply queued operations in order.
async fn writer(
    url: String,
    shared: Arc<Shared>,
    mut rx: mpsc::Receiver<Op>,
    first: oneshot::Sender<Option<NodeInUse>>,
) {
    let mut first = Some(first);
    let mut link = Link {
        url,
        shared: shared.clone(),
        db: None,
        next_attempt: tokio::time::Instant::now(),
        backoff: Duration::from_millis(200),
        first: true,
        in_use: None,
    };
    loop {
        // Connect before waiting for work, so readiness reflects the store
        // even while nobody connects; while disconnected, wake to retry.
        let mut connected = link.ensure().await.is_some();
        if connected && shared.stale.swap(false, Ordering::Relaxed) {
            resync(&mut link).await;
            connected = link.db.is_some();
        }
        if let Some(first) = first.take() {
            let _ = first.send(link.in_use.clone());
        }
        let op = if connected {
            rx.recv().await
        } else {
            match tokio::time::timeout_at(link.next_attempt, rx.recv()).await {
                Ok(op) => op,
                Err(_) => continue,
            }
        };
        let Some(op) = op else { return };
        // Take what else is queued (up to BATCH) into the same transaction.
        let mut batch = vec![op];
        while batch.len() < BATCH && !matches!(batch.last(), Some(Op::Stop(_))) {
            match rx.try_recv() {
                Ok(op) => batch.push(op),
                Err(_) => break,
            }
        }
        let stop = match batch.last() {
            Some(Op::Stop(_)) => batch.pop(),
            _ => None,
        };
        if !batch.is_empty() {
            apply(&mut link, &batch).await;
        }
        // Committed or given up: the clients waiting on these rows are
        // answered now.
        for op in batch {
            if let Op::Set(_, _, Some(done)) = op {
                let _ = done.send(());
            }
        }

        if let Some(Op::Stop(done)) = stop {
            if let Some(db) = &link.db {
                let leave = async {
                    match &shared.member {
                        None => db.clear_node(&shared.node, &shared.entities).await,
                        // The heartbeat goes with the rows: a node that
                        // stopped is gone from `GET /api/cluster` at once.
                        Some((m, _)) if shared.claimed.swap(false, Ordering::AcqRel) => {
                            db.leave(m, &shared.entities).await
                        }
                        // In a cluster, rows under this node id are this
                        // node's only while it holds the heartbeat.
                        Some(_) => Ok(0),
                    }
                };
                match tokio::time::timeout(DB_TIMEOUT, leave).await {
                    Ok(Ok(n)) => tracing::info!(rows = n, "presence rows of this node cleared"),
                    Ok(Err(e)) => tracing::warn!(error = %e, "could not clear presence rows"),
                    Err(_) => tracing::warn!("clearing presence rows timed out"),
                }
            }
            let _ = done.send(());
            return;
        }
    }
}

/// Applies a batch of writes in one transaction. If the database refuses it
/// (a query error, say a missing application table), the writes are retried
/// one by one, so a single bad write cannot sink the rest of the batch.
async fn apply(link: &mut Link, batch: &[Op]) {
    let writes: Vec<Write<'_>> = batch
        .iter()
        .filter_map(|op| match op {
            Op::Set(h, at, _) => Some(Write::Set(h, *at)),
            Op::Clear(h) => Some(Write::Clear(h)),
            Op::Stop(_) | Op::Wake => None,
        })
        .collect();
    match attempt(link, &writes, ATTEMPTS).await {
        Outcome::Refused if writes.len() > 1 => {
            for w in writes.chunks(1) {
                attempt(link, w, ATTEMPTS).await;
            }
        }
        _ => {}
    }
}

enum Outcome {
    Done,
    /// The database answered with an error (the writes themselves are bad).
    Refused,
    /// Not connected, timed out, or the connection failed.
    Unavailable,
}

/// Tries one transaction up to `attempts` times; counts and logs the result
/// (a refused multi-write batch is left to the caller to split).
async fn attempt(link: &mut Link, writes: &[Write<'_>], attempts: u32) -> Outcome {
    let shared = link.shared.clone();
    let mut last = String::new();
    let mut outcome = Outcome::Unavailable;
    for n in 0..attempts {
        if n > 0 {
            tokio::time::sleep(Duration::from_millis(100 * 4u64.pow(n - 1))).await;
        }
        let Some(conn) = link.ensure().await else {
            // Not connected (and not due for another attempt): fail fast.
            last = shared
                .state
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone()
                .err()
                .unwrap_or_default();
            outcome = Outcome::Unavailable;
            break;
        };
        let started = std::time::Instant::now();
        let result = tokio::time::timeout(
            DB_TIMEOUT,
            conn.write_batch(&shared.node, &shared.entities, writes),
        )
        .await;
        match result {
            Ok(Ok(())) => {
                shared
                    .metrics
                    .stage_latency(crate::metrics::Stage::PresenceCommit)
                    .observe(started.elapsed().as_secs_f64());
                shared
                    .metrics
                    .presence_writes
                    .get_or_create(&[("result", "ok")])
                    .inc_by(writes.len() as u64);
                shared.set_state(Ok(()));
                return Outcome::Done;
            }
            Ok(Err(e)) => {
                outcome = if matches!(e, sqlx::Error::Database(_)) {
                    Outcome::Refused
                } else {
                    Outcome::Unavailable
                };
                last = e.to_string();
                if writes.len() > 1 && matches!(outcome, Outcome::Refused) {
                    // The caller splits the batch; retrying it whole is futile.
                    return outcome;
                }
            }
            Err(_) => {
                outcome = Outcome::Unavailable;
                last = "timed out".into();
            }
        }
    }
    shared
        .metrics
        .presence_writes
        .get_or_create(&[("result", "failed")])
        .inc_by(writes.len() as u64);
    tracing::warn!(error = %last, writes = writes.len(), "presence writes failed");
    if matches!(outcome, Outcome::Unavailable) {
        // Lost to an outage, not refused: rewrite from `live` once back.
        shared.stale.store(true, Ordering::Relaxed);
        link.db = None;
    }
    shared.set_state(Err(format!("last write failed: {last}")));
    outcome
}

/// Brings this node's rows back to what it holds: clears them, then sets
/// every live holder again. Runs after writes were lost (queue full, an
/// outage) and after every (re)connection, which clears the rows first.
async fn resync(link: &mut Link) {
    let shared = link.shared.clone();
    let Some(db) = link.ensure().await else {
        shared.stale.store(true, Ordering::Relaxed);
        return;
    };
    let live: Vec<(Holder, u64)> = shared.live().values().cloned().collect();
    let writes: Vec<Write<'_>> = live.iter().map(|(h, at)| Write::Set(h, *at)).collect();
    let result = tokio::time::timeout(DB_TIMEOUT * 2, async {
        db.clear_node(&shared.node, &shared.entities).await?;
        for chunk in writes.chunks(BATCH) {
            db.write_batch(&shared.node, &shared.entities, chunk)
                .await?;
        }
        Ok::<_, sqlx::Error>(())
    })
    .await;
    match result {
        Ok(Ok(())) => {
            if !writes.is_empty() {
                tracing::info!(rows = writes.len(), "presence rows of this node rewritten");
            }
        }
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "presence resync failed; retrying later");
            shared.stale.store(true, Ordering::Relaxed);
        }
        Err(_) => {
            tracing::warn!("presence resync timed out; retrying later");
            shared.stale.store(true, Ordering::Relaxed);
            link.db = None;
        }
    }
}

/// Why the writer could not connect.
enum ConnectError {
    /// The database is unreachable or refused (retried with backoff).
    Failed(String),
    /// Another live node holds this node's id (see [`nodes`]).
    InUse(NodeInUse),
}

impl From<String> for ConnectError {
    fn from(e: String) -> Self {
        ConnectError::Failed(e)
    }
}

/// Connects and migrates; in a cluster claims the node id (`wait`: see
/// [`nodes::claim`]); then clears what an earlier run of this node left.
async fn connect(url: &str, shared: &Shared, wait: bool) -> Result<Db, ConnectError> {
    let db = tokio::time::timeout(DB_TIMEOUT * 2, Db::connect(url))
        .await
        .map_err(|_| "connecting timed out".to_string())?
        .map_err(|e| e.to_string())?;
    tokio::time::timeout(DB_TIMEOUT * 4, db.migrate())
        .await
        .map_err(|_| "schema migration timed out".to_string())?
        .map_err(|e| format!("schema migration failed: {e}"))?;
    // Before any row is touched: clearing "this node's" rows while another
    // live node holds the id would clear that node's clients.
    nodes::claim(&db, shared, wait).await?;
    // Rows this node left (a crash, a kill -9) are stale: nobody holds them.
    let cleared = tokio::time::timeout(DB_TIMEOUT, db.clear_node(&shared.node, &shared.entities))
        .await
        .map_err(|_| "clearing stale rows timed out".to_string())?
        .map_err(|e| format!("clearing stale rows failed: {e}"))?;
    if cleared > 0 {
        tracing::info!(
            rows = cleared,
            "cleared presence rows left by a previous run of this node"
        );
    }
    Ok(db)
}
