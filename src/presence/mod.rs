//! The presence store: which socket each (role, sub) holds right now
//! (SPEC §7), in SQLite or PostgreSQL through sqlx.
//!
//! Front ends never block on the database. [`Presence::set`] and
//! [`Presence::clear`] update what this node holds in memory (`live`) and
//! mark the row (role, sub) as waiting in a bounded queue; one background
//! writer task takes the waiting rows, oldest change first, and writes each
//! one's state *as it is now* in memory, everything waiting (up to
//! [`MAX_BATCH`] rows) in one transaction (group commit). Changes to a row
//! that is still waiting are folded into its one write: a socket that
//! connects and leaves before the writer gets to it costs at most one
//! write, and under load the batches grow with the queue. A slow or
//! stopped database therefore costs queued writes (counted and logged when
//! they are dropped or fail), never message delivery.
//!
//! Clients read their writes: `set` hands back a [`Committed`] that the
//! front end waits on (at most `presence.write_timeout`) before it answers
//! the client, so a backend the client tells "I am connected" finds the
//! row. A failed or dropped write ends the wait at once: authentication
//! never fails, nor waits long, because the store is down.
//!
//! When writes were lost (the queue full, an outage) the writer reconciles
//! this node's rows with `live` ([`resync`]): it reads the rows this node
//! holds and writes only the difference. A row that was right is never
//! touched, so a reader never sees a live socket's row vanish and come
//! back; each corrected row goes from its old state straight to its new one.
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

use std::collections::{HashMap, HashSet, VecDeque};
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

/// Attempts per batch before it is given up (and counted as failed).
const ATTEMPTS: u32 = 3;
/// Most rows written in one transaction: the writer takes everything
/// waiting, up to this many, so batches grow with the queue.
pub const MAX_BATCH: usize = 2048;
/// How long one connection attempt or query may take.
const DB_TIMEOUT: Duration = Duration::from_secs(3);
/// Least time between two reconciliations: under a sustained overflow the
/// writer keeps writing batches instead of reading the table again and
/// again.
const RESYNC_EVERY: Duration = Duration::from_secs(1);
/// Most clients waiting on one row's write (one (role, sub) connecting
/// again and again); the oldest is answered at once beyond that.
const WAITERS: usize = 64;

/// A presence row: (role, sub).
type Key = (String, String);

/// The rows waiting for the writer, each once, oldest change first.
#[derive(Default)]
struct Queue {
    order: VecDeque<Key>,
    /// The clients waiting on each queued row; dropping a sender answers
    /// its client (committed, given up, or dropped).
    waiters: HashMap<Key, Vec<oneshot::Sender<()>>>,
    /// Clear every row this node holds, then stop (graceful shutdown).
    stop: Option<oneshot::Sender<()>>,
}

struct Shared {
    node: String,
    entities: HashMap<String, EntityTable>,
    /// Rows waiting for the writer (at most `capacity`).
    queue: Mutex<Queue>,
    capacity: usize,
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

    fn queue(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes up to `max` waiting rows with their waiters, and the stop
    /// request if there is one.
    fn take(&self, max: usize) -> (Batch, Option<oneshot::Sender<()>>) {
        let mut q = self.queue();
        let n = q.order.len().min(max);
        let mut batch = Vec::with_capacity(n);
        for _ in 0..n {
            let Some(key) = q.order.pop_front() else {
                break;
            };
            let waiters = q.waiters.remove(&key).unwrap_or_default();
            batch.push((key, waiters));
        }
        let stop = q.stop.take();
        self.metrics
            .presence_queue
            .set(i64::try_from(q.order.len()).unwrap_or(i64::MAX));
        (batch, stop)
    }
}

/// Rows taken from the queue, with the clients waiting on them.
type Batch = Vec<(Key, Vec<oneshot::Sender<()>>)>;

/// Handle on the presence store; cheap to share.
#[derive(Clone)]
pub struct Presence {
    /// Wakes the writer (one pending wake is enough); closed once the
    /// writer has ended. Dropping every handle ends the writer.
    wake: mpsc::Sender<()>,
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
        let (wake, rx) = mpsc::channel(1);
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
            queue: Mutex::new(Queue::default()),
            capacity: config.queue.max(1),
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
        // Dropping `wake` on an error below ends the writer.
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
            wake,
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
        let key = (holder.role.clone(), holder.sub.clone());
        self.shared.live().insert(key.clone(), (holder, at));
        let (done, wait) = oneshot::channel();
        self.enqueue(key, Some(done));
        Committed::new(wait, self.write_timeout)
    }

    /// Records that `holder` disconnected. Never waits. The row changes
    /// only if it still holds this socket: an old connection closing never
    /// erases a newer one.
    pub fn clear(&self, holder: Holder) {
        let key = (holder.role, holder.sub);
        let removed = {
            let mut live = self.shared.live();
            let holds = live
                .get(&key)
                .is_some_and(|(h, _)| h.socket_id == holder.socket_id);
            holds && live.remove(&key).is_some()
        };
        if removed {
            self.enqueue(key, None);
        }
    }

    /// Marks the row `key` as waiting for the writer, which writes its
    /// state in `live` as it is when the writer takes it.
    fn enqueue(&self, key: Key, waiter: Option<oneshot::Sender<()>>) {
        if self.wake.is_closed() {
            // The writer has stopped (shutdown): nothing will be written,
            // and `waiter`, dropped here, answers its client at once.
            return;
        }
        let shared = &self.shared;
        let mut q = shared.queue();
        if let Some(waiting) = q.waiters.get_mut(&key) {
            // Already queued: this change rides on that write.
            shared.metrics.presence_coalesced.inc();
            if let Some(done) = waiter {
                if waiting.len() >= WAITERS {
                    // Answered now, without its row.
                    waiting.remove(0);
                }
                waiting.push(done);
            }
        } else if q.order.len() >= shared.capacity {
            drop(q);
            // The rows no longer match `live`: the writer reconciles them.
            // `waiter` is dropped here: its client is answered at once.
            shared.stale.store(true, Ordering::Relaxed);
            shared.metrics.presence_write("dropped");
            // Log the 1st, 2nd, 4th, 8th… drop: a flood must not flood the log.
            let n = shared.dropped.fetch_add(1, Ordering::Relaxed) + 1;
            if n.is_power_of_two() {
                tracing::warn!(
                    dropped = n,
                    queue = shared.capacity,
                    "presence queue full; presence writes dropped (the rows are reconciled later)"
                );
            }
            return;
        } else {
            q.order.push_back(key.clone());
            q.waiters.insert(key, waiter.into_iter().collect());
            shared
                .metrics
                .presence_queue
                .set(i64::try_from(q.order.len()).unwrap_or(i64::MAX));
        }
        drop(q);
        // Full means a wake is pending already.
        let _ = self.wake.try_send(());
    }

    /// Clears this node's rows (and, in a cluster, removes its heartbeat)
    /// and stops the writer, waiting at most `limit`.
    pub async fn stop(&self, limit: Duration) {
        self.shared.stopping.store(true, Ordering::Release);
        let (done, wait) = oneshot::channel();
        self.shared.queue().stop = Some(done);
        let stop = async {
            // Closed: the writer has ended already.
            if !matches!(
                self.wake.try_send(()),
                Err(mpsc::error::TrySendError::Closed(_))
            ) {
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
    /// A connection succeeded once (and cleared an earlier run's rows).
    connected_once: bool,
    /// A connection succeeded since the writer last looked: reconcile at
    /// once, whenever the last reconciliation was.
    reconnected: bool,
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
            match connect(&self.url, &self.shared, wait, !self.connected_once).await {
                Ok(db) => {
                    self.in_use = None;
                    self.connected_once = true;
                    self.reconnected = true;
                    // Bring this node's rows to what it holds: rows lost
                    // while disconnected, or cleared by the cluster while
                    // this node was silent.
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

/// The background writer: connect, then write the queued rows, oldest
/// change first; reconcile the rows when writes were lost.
async fn writer(
    url: String,
    shared: Arc<Shared>,
    mut wake: mpsc::Receiver<()>,
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
        connected_once: false,
        reconnected: false,
    };
    let mut last_resync: Option<tokio::time::Instant> = None;
    loop {
        // Connect before waiting for work, so readiness reflects the store
        // even while nobody connects; while disconnected, wake to retry.
        let connected = link.ensure().await.is_some();
        let resync_due = last_resync.map(|t| t + RESYNC_EVERY);
        let due = std::mem::take(&mut link.reconnected)
            || resync_due.is_none_or(|t| tokio::time::Instant::now() >= t);
        if connected && due && shared.stale.swap(false, Ordering::Relaxed) {
            last_resync = Some(tokio::time::Instant::now());
            resync(&mut link).await;
        }
        if let Some(first) = first.take() {
            let _ = first.send(link.in_use.clone());
        }
        let (batch, stop) = shared.take(MAX_BATCH);
        if let Some(done) = stop {
            // Leaving clears every row of this node: what is still queued
            // is moot (its clients are answered as `batch` drops).
            leave(&link, &shared).await;
            drop(batch);
            let _ = done.send(());
            return;
        }
        if batch.is_empty() {
            // Nothing queued: wait for work, the next connection attempt,
            // or a reconciliation that was put off.
            let mut until = (!connected).then_some(link.next_attempt);
            if let Some(due) = resync_due.filter(|_| shared.stale.load(Ordering::Relaxed)) {
                until = Some(until.map_or(due, |u| u.min(due)));
            }
            let woke = match until {
                Some(until) => match tokio::time::timeout_at(until, wake.recv()).await {
                    Ok(woke) => woke,
                    Err(_) => continue,
                },
                None => wake.recv().await,
            };
            // `None`: every handle is gone.
            if woke.is_none() {
                return;
            }
            continue;
        }
        apply(&mut link, &batch).await;
        // Committed or given up: the clients waiting on these rows are
        // answered now (their senders drop with `batch`).
    }
}

/// Clears this node's rows (and, in a cluster, its heartbeat): a graceful
/// stop.
async fn leave(link: &Link, shared: &Shared) {
    let Some(db) = &link.db else { return };
    let leave = async {
        match &shared.member {
            None => db.clear_node(&shared.node, &shared.entities).await,
            // The heartbeat goes with the rows: a node that stopped is gone
            // from `GET /api/cluster` at once.
            Some((m, _)) if shared.claimed.swap(false, Ordering::AcqRel) => {
                db.leave(m, &shared.entities).await
            }
            // In a cluster, rows under this node id are this node's only
            // while it holds the heartbeat.
            Some(_) => Ok(0),
        }
    };
    match tokio::time::timeout(DB_TIMEOUT, leave).await {
        Ok(Ok(n)) => tracing::info!(rows = n, "presence rows of this node cleared"),
        Ok(Err(e)) => tracing::warn!(error = %e, "could not clear presence rows"),
        Err(_) => tracing::warn!("clearing presence rows timed out"),
    }
}

/// Writes the rows of `batch` as `live` holds them now, in one transaction.
/// If the database refuses it (a query error, say a missing application
/// table), the writes are retried one by one, so a single bad write cannot
/// sink the rest of the batch.
async fn apply(link: &mut Link, batch: &Batch) {
    let rows: Vec<(&Key, Option<(Holder, u64)>)> = {
        let live = link.shared.live();
        batch
            .iter()
            .map(|(key, _)| (key, live.get(key).cloned()))
            .collect()
    };
    let writes: Vec<Write<'_>> = rows
        .iter()
        .map(|(key, held)| match held {
            Some((h, at)) => Write::Set(h, *at),
            // Nothing of this node's holds the row any more.
            None => Write::Vacate(&key.0, &key.1),
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

/// Brings this node's rows back to what it holds, after writes were lost
/// (the queue full, an outage) and after every (re)connection (writes
/// lost while disconnected, rows cleared by the cluster while this node
/// was silent). It reads the rows this node holds and writes only the
/// difference with `live`: rows that hold a socket this node no longer
/// has are cleared, live sockets missing or wrong are written. A row that
/// is right is never touched, so readers never see a live socket's row
/// disappear; the difference is written [`MAX_BATCH`] rows per
/// transaction (usually one), each row going from its old state straight
/// to its new one.
async fn resync(link: &mut Link) {
    let shared = link.shared.clone();
    let failed = |shared: &Shared, why: &dyn std::fmt::Display| {
        tracing::warn!(error = %why, "presence resync failed; retrying later");
        shared
            .metrics
            .presence_resyncs
            .get_or_create(&[("result", "failed")])
            .inc();
        shared.stale.store(true, Ordering::Relaxed);
    };
    let Some(db) = link.ensure().await else {
        shared.stale.store(true, Ordering::Relaxed);
        return;
    };
    let held = match tokio::time::timeout(DB_TIMEOUT, db.held(&shared.node)).await {
        Ok(Ok(held)) => held,
        Ok(Err(e)) => return failed(&shared, &e),
        Err(_) => {
            link.db = None;
            return failed(&shared, &"timed out");
        }
    };
    // Read after the rows: a change made meanwhile is queued as well, and
    // written after this.
    let live: Vec<(Holder, u64)> = shared.live().values().cloned().collect();
    let live_keys: HashSet<(&str, &str)> = live
        .iter()
        .map(|(h, _)| (h.role.as_str(), h.sub.as_str()))
        .collect();
    let held_sockets: HashMap<(&str, &str), &str> = held
        .iter()
        .map(|(role, sub, socket)| ((role.as_str(), sub.as_str()), socket.as_str()))
        .collect();
    let mut writes: Vec<Write<'_>> = Vec::new();
    for (role, sub, _) in &held {
        if !live_keys.contains(&(role.as_str(), sub.as_str())) {
            writes.push(Write::Vacate(role, sub));
        }
    }
    let cleared = writes.len();
    for (h, at) in &live {
        // A row of another node is taken back too, as a lost write would
        // have done.
        if held_sockets.get(&(h.role.as_str(), h.sub.as_str())) != Some(&h.socket_id.as_str()) {
            writes.push(Write::Set(h, *at));
        }
    }
    for chunk in writes.chunks(MAX_BATCH) {
        let write = db.write_batch(&shared.node, &shared.entities, chunk);
        match tokio::time::timeout(DB_TIMEOUT, write).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return failed(&shared, &e),
            Err(_) => {
                link.db = None;
                return failed(&shared, &"timed out");
            }
        }
    }
    shared
        .metrics
        .presence_resyncs
        .get_or_create(&[("result", "ok")])
        .inc();
    if !writes.is_empty() {
        tracing::info!(
            cleared,
            written = writes.len() - cleared,
            unchanged = held.len() - cleared,
            "presence rows of this node reconciled with its sockets"
        );
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
/// [`nodes::claim`]); then, with `clear` (the first connection), clears
/// what an earlier run of this node left.
async fn connect(url: &str, shared: &Shared, wait: bool, clear: bool) -> Result<Db, ConnectError> {
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
    if clear {
        // Rows this node left (a crash, a kill -9) are stale: nobody holds
        // them. Only on the first connection: on a later one the rows are
        // this run's, and the reconciliation that follows corrects just
        // the ones that are wrong instead of hiding them all for a while.
        let cleared =
            tokio::time::timeout(DB_TIMEOUT, db.clear_node(&shared.node, &shared.entities))
                .await
                .map_err(|_| "clearing stale rows timed out".to_string())?
                .map_err(|e| format!("clearing stale rows failed: {e}"))?;
        if cleared > 0 {
            tracing::info!(
                rows = cleared,
                "cleared presence rows left by a previous run of this node"
            );
        }
    }
    Ok(db)
}
