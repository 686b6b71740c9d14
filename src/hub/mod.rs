//! The hub: who is subscribed to what, and fan-out of published messages.
//!
//! It knows nothing of wire formats. Front ends (`/ws`, Socket.IO) register a
//! connection as a [`Recipient`] and subscribe it to [`Filter`]s; anyone (the
//! HTTP API, the demo feed, the MQTT bridge, a cluster backplane) calls
//! [`Hub::publish`] or [`Hub::publish_rooms`].
//!
//! Delivery never blocks. Every connection has a [`Reader`] and reads each
//! subscribed filter's [`ring`] itself, so a publish is one append of the
//! shared `Arc<Message>` per filter; a reader that falls too far behind
//! finds it has lagged and closes itself as a slow consumer. The table lock
//! is a plain `RwLock` held only for lookups and non-blocking appends,
//! never across an `.await`.

pub mod history;
pub mod last_value;
pub mod ring;
pub use crate::topic;
mod wild;

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::task::Waker;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use serde_json::value::RawValue;
use tokio::sync::mpsc;

use crate::metrics::Metrics;
pub use last_value::LastValues;
use ring::Ring;
pub use ring::{Lagged, Reader};
pub use topic::Filter;

/// Identifies one connection (of any protocol) on this node.
pub type ConnId = u64;

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A published message. Shared by every recipient; each wire encoding is
/// produced at most once per message, on first use, and kept in `frames`.
pub struct Message {
    pub topic: Arc<str>,
    pub event: Option<Arc<str>>,
    pub ts: u64,
    /// The payload as JSON text.
    pub payload: Arc<RawValue>,
    /// Its place in its topic's history, when `history.topics` keeps one.
    pub position: Option<history::Position>,
    /// Its publish's place in the order of every tracked publish on this
    /// node, when `history.topics` keeps one of its rooms. Every copy of
    /// that publish carries it, those of untracked rooms too: a recipient
    /// reached through an untracked room still learns how far it has
    /// read, and is not sent the publish again when it recovers.
    pub seq: Option<history::Seq>,
    /// The message's encoded copies, for the transports.
    pub frames: Frames,
}

impl Message {
    pub fn new(topic: Arc<str>, event: Option<Arc<str>>, payload: Arc<RawValue>) -> Self {
        Self::with_ts(topic, event, payload, now_ms())
    }

    pub fn with_ts(
        topic: Arc<str>,
        event: Option<Arc<str>>,
        payload: Arc<RawValue>,
        ts: u64,
    ) -> Self {
        Message {
            topic,
            event,
            ts,
            payload,
            position: None,
            seq: None,
            frames: Frames::default(),
        }
    }
}

/// Which of a message's [`Frames`] an encoding is kept in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameSlot(usize);

impl FrameSlot {
    /// Slot `n`; a slot past [`Frames::SLOTS`] does not compile where it
    /// is a constant, and panics at once otherwise.
    pub const fn nth(n: usize) -> FrameSlot {
        assert!(n < Frames::SLOTS, "no such frame slot");
        FrameSlot(n)
    }
}

/// Encoded copies of a message, each written once by the transport that
/// needs it and then shared by every recipient of that encoding, so a
/// message is encoded once per wire format however many sockets it
/// reaches. The hub only keeps them with the message: it never fills or
/// reads one and knows nothing of what they hold (see
/// `transport::encoding`, which assigns the slots).
#[derive(Default)]
pub struct Frames([OnceLock<Bytes>; Frames::SLOTS]);

impl Frames {
    pub const SLOTS: usize = 3;

    /// The bytes in `slot`, made by `encode` on first use.
    pub fn get_or_init(&self, slot: FrameSlot, encode: impl FnOnce() -> Bytes) -> &[u8] {
        self.0[slot.0].get_or_init(encode)
    }
}

/// A random id of 16 URL-safe characters (epochs, socket ids).
pub fn random_id() -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut bits: u128 = rand::random();
    (0..16)
        .map(|_| {
            let c = ALPHABET[(bits & 63) as usize] as char;
            bits >>= 6;
            c
        })
        .collect()
}

/// Turns any serializable value into a shared JSON payload.
pub fn payload_of<T: serde::Serialize + ?Sized>(value: &T) -> Arc<RawValue> {
    let text = serde_json::to_string(value).unwrap_or_else(|_| "null".into());
    match RawValue::from_string(text) {
        Ok(raw) => Arc::from(raw),
        Err(_) => Arc::from(RawValue::NULL.to_owned()),
    }
}

/// A connection as the hub sees it: its cursors into the rings of its
/// subscriptions, which its writer reads itself, so that a publish is one
/// append per subscribed filter whatever the number of subscribers.
pub trait Recipient: Send + Sync + 'static {
    /// The connection's cursors. Published messages reach it only through
    /// them.
    fn reader(&self) -> &Mutex<Reader>;

    /// Queues the kept last values replayed to a new subscription, in
    /// order, as one unit, behind what its rings already hold for it.
    /// Returns false when it could not (a full queue: the recipient then
    /// closes itself as a slow consumer).
    fn deliver_batch(&self, msgs: Vec<Arc<Message>>) -> bool;

    /// Moves what its rings hold for it to its own queue, in order (it is
    /// about to leave a ring, and what it has not read there may have
    /// reached it only that way).
    fn flush(&self);

    /// The server is stopping: end the connection (without waiting).
    /// Front ends that follow the shutdown signal themselves keep the
    /// default, which does nothing.
    fn shutdown(&self) {}
}

fn lock_reader(reader: &Mutex<Reader>) -> std::sync::MutexGuard<'_, Reader> {
    reader.lock().unwrap_or_else(|e| e.into_inner())
}

/// A change in which filters have at least one subscriber on this node.
/// Consumers (on-demand MQTT subscriptions, a cluster backplane) use it to
/// follow interest without polling the table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interest {
    pub filter: Filter,
    pub active: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SubscribeError {
    #[error("too many subscriptions")]
    TooMany,
    #[error("connection is closed")]
    Closed,
}

struct ConnEntry {
    recipient: Arc<dyn Recipient>,
    filters: HashSet<Filter>,
}

/// A filter's subscribers, and the ring they read.
#[derive(Default)]
struct Subscribers {
    readers: HashSet<ConnId>,
    /// Present while there are readers.
    ring: Option<Arc<Ring>>,
}

impl Subscribers {
    fn len(&self) -> usize {
        self.readers.len()
    }

    /// Adds a subscriber; true when it is the first.
    fn add(&mut self, conn: ConnId, recipient: &Arc<dyn Recipient>, capacity: usize) -> bool {
        let ring = self
            .ring
            .get_or_insert_with(|| Arc::new(Ring::new(capacity)));
        lock_reader(recipient.reader()).follow(ring);
        self.readers.insert(conn);
        self.len() == 1
    }

    /// Removes a subscriber; true when none is left. A reader that stays
    /// connected (`flush`) keeps what was published before: a message it
    /// has not read may have reached it through this subscription only.
    fn remove(&mut self, conn: ConnId, recipient: &Arc<dyn Recipient>, flush: bool) -> bool {
        if self.readers.remove(&conn) {
            if flush {
                recipient.flush();
            }
            if let Some(ring) = &self.ring {
                lock_reader(recipient.reader()).unfollow(ring);
            }
            if self.readers.is_empty() {
                self.ring = None;
            }
        }
        self.len() == 0
    }
}

#[derive(Default)]
struct Table {
    conns: HashMap<ConnId, ConnEntry>,
    /// Exact names → subscribers.
    exact: HashMap<Arc<str>, Subscribers>,
    /// Wildcard filters → subscribers, indexed by first level.
    wild: wild::WildTable,
    /// Topic names followed with no subscriber here (see [`Hub::pin`]):
    /// how many times each.
    pins: HashMap<Arc<str>, usize>,
}

/// Something to wait for before answering a client (see
/// [`Hub::backplane_subscribed`]).
pub type Settled = std::pin::Pin<Box<dyn Future<Output = ()> + Send>>;

/// What a new subscription is sent besides live messages.
enum Replay<'a> {
    Nothing,
    /// The kept last values, after `on_new`.
    LastValues(Box<dyn FnOnce() + 'a>),
    /// What was missed since a position, after `on_new(recovered)`.
    Since(&'a history::Since, Box<dyn FnOnce(bool) + 'a>),
}

/// Carries publishes to every node of a cluster (the cluster backplane).
pub trait Backplane: Send + Sync + 'static {
    /// Completes once the backplane has acted on the first `changes`
    /// interest changes of this hub (subscribed what they added), or after
    /// a bounded wait; `None` when there is nothing to wait for (the
    /// backplane is down, say).
    fn subscribed(&self, changes: u64) -> Option<Settled>;

    /// Hands a publish to the backplane without waiting; it comes back to
    /// every interested node, this one included, through
    /// [`Hub::deliver_rooms`]. False when the backplane cannot take it now
    /// (down, or its queue full): the hub then delivers it locally.
    fn send(
        &self,
        rooms: &[Arc<str>],
        event: Option<&Arc<str>>,
        payload: &Arc<RawValue>,
        ts: u64,
    ) -> bool;

    /// Whether the backplane keeps the history of the topics
    /// `history.topics` matches (SPEC §11): it then gives every message of
    /// them its position ([`Hub::deliver_placed`]), and this node's history
    /// is a copy of what it received, completed from the backplane's when
    /// a client recovers ([`Hub::prepare_recovery`]).
    fn keeps_history(&self) -> bool {
        false
    }

    /// What the backplane holds of `topic`'s history; `None` when it keeps
    /// none.
    fn fetch_history(&self, _topic: &Arc<str>) -> Option<Fetch> {
        None
    }
}

/// What a backplane holds of one topic's history.
#[derive(Default)]
pub struct Fetched {
    /// The topic's epoch there (empty: it has no history).
    pub epoch: Arc<str>,
    /// The last offset given.
    pub last: u64,
    /// Its messages, in offset order, with their positions and sequences.
    pub messages: Vec<Arc<Message>>,
    /// The highest global sequence of a message it dropped (0: none).
    pub dropped_seq: u64,
    /// The epoch of the cluster-wide sequence, if it has one.
    pub global_epoch: Option<Arc<str>>,
}

/// A recovery made ready by [`Hub::prepare_recovery`]: the topics are
/// followed until it is dropped.
pub struct Prepared {
    _pins: Pins,
    /// `None`: a fetch failed, nothing can be promised.
    fetched: Option<FetchedAll>,
}

/// What the fetches of a recovery found, across its topics.
struct FetchedAll {
    /// The highest sequence any of them dropped.
    dropped: u64,
    /// The cluster-wide sequence's epoch (`None`: no topic was fetched).
    global_epoch: Option<Arc<str>>,
}

/// A fetch of [`Fetched`] under way.
pub type Fetch = std::pin::Pin<Box<dyn Future<Output = Result<Fetched, String>> + Send + 'static>>;

/// Where a backplane placed one publish: a position for each of its rooms
/// that keeps a history (`None` for the others), and its global sequence.
#[derive(Clone, Default)]
pub struct Placed {
    pub positions: Vec<Option<history::Position>>,
    pub seq: Option<history::Seq>,
}

pub struct Hub {
    table: RwLock<Table>,
    /// Set when the node is part of a cluster.
    backplane: OnceLock<Arc<dyn Backplane>>,
    /// Interest changes announced so far (under the watchers' lock).
    announced: AtomicU64,
    next_id: AtomicU64,
    metrics: Arc<Metrics>,
    watchers: Mutex<Vec<mpsc::UnboundedSender<Interest>>>,
    /// Kept last messages (`None`: the feature is off). Locked after the
    /// table, never the other way round.
    last_values: Option<Mutex<LastValues>>,
    /// The topics the store tracks, readable without its lock, so a publish
    /// on an untracked topic takes no lock for it.
    last_value_filters: Vec<Filter>,
    /// Messages a ring holds for its slowest reader (`ws.outbound_queue`).
    ring_capacity: usize,
    /// Per-topic history (`None`: `history.topics` is empty). Locked after
    /// the table, and held from a message's offset to its ring append, so
    /// offsets and delivery order agree.
    history: Option<Mutex<history::History>>,
}

/// Most entries [`Hub::top_topics`] returns.
pub const MAX_TOP_TOPICS: usize = 100;

/// A topic, room or wildcard filter and how many of this node's
/// connections are subscribed to it (see [`Hub::top_topics`]).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct TopicCount {
    pub name: Arc<str>,
    pub subscribers: usize,
    /// A filter with `+` or `#` levels rather than one topic or room.
    pub wildcard: bool,
}

/// Sizes of the tables, for tests and the churn benchmark.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub struct HubStats {
    pub connections: usize,
    pub topics: usize,
    pub subscriptions: usize,
}

impl Hub {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Hub {
            table: RwLock::new(Table::default()),
            backplane: OnceLock::new(),
            announced: AtomicU64::new(0),
            next_id: AtomicU64::new(1),
            metrics,
            watchers: Mutex::new(Vec::new()),
            last_values: None,
            last_value_filters: Vec::new(),
            ring_capacity: 1024,
            history: None,
        }
    }

    /// Keeps a history of the topics `filters` match (SPEC §11).
    pub fn with_history(
        mut self,
        filters: Vec<Filter>,
        size: usize,
        ttl: std::time::Duration,
    ) -> Self {
        if !filters.is_empty() {
            self.history = Some(Mutex::new(history::History::new(filters, size, ttl)));
        }
        self
    }

    fn history_lock(&self) -> Option<std::sync::MutexGuard<'_, history::History>> {
        self.history
            .as_ref()
            .map(|m| m.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// How many messages a reader may fall behind before it has lost some
    /// (and is closed as a slow consumer).
    pub fn with_ring_capacity(mut self, capacity: usize) -> Self {
        self.ring_capacity = capacity.max(1);
        self
    }

    /// Keeps the last message of every topic matched by `filters` (at most
    /// `max_topics` topics and `max_bytes` of topic and payload text, least
    /// recently updated evicted first) for new subscribers; see
    /// [`Hub::subscribe_with_last_values`].
    pub fn with_last_values(
        mut self,
        filters: Vec<Filter>,
        max_topics: usize,
        max_bytes: usize,
    ) -> Self {
        if !filters.is_empty() {
            self.last_value_filters = filters.clone();
            self.last_values = Some(Mutex::new(LastValues::new(filters, max_topics, max_bytes)));
        }
        self
    }

    fn last_value_store(&self) -> Option<std::sync::MutexGuard<'_, LastValues>> {
        self.last_values
            .as_ref()
            .map(|m| m.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// The kept last messages of every topic `filter` matches, oldest first.
    pub fn last_values(&self, filter: &Filter) -> Vec<Arc<Message>> {
        self.last_value_store()
            .map(|lv| lv.matching(filter))
            .unwrap_or_default()
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    // A poisoned lock means a panic elsewhere already; the table itself is
    // still consistent (no operation panics half-way), so keep serving.
    fn read(&self) -> RwLockReadGuard<'_, Table> {
        self.table.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, Table> {
        self.table.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Follows interest changes from now on.
    pub fn watch_interest(&self) -> mpsc::UnboundedReceiver<Interest> {
        self.watch_interest_counted().0
    }

    /// Follows interest changes from now on, and says how many were
    /// announced before: the watcher's n-th change is the hub's
    /// `before + n`-th (see [`Backplane::subscribed`]).
    pub fn watch_interest_counted(&self) -> (mpsc::UnboundedReceiver<Interest>, u64) {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut watchers = self.watchers.lock().unwrap_or_else(|e| e.into_inner());
        watchers.push(tx);
        (rx, self.announced.load(Ordering::Acquire))
    }

    fn announce(&self, changes: Vec<Interest>) {
        if changes.is_empty() {
            return;
        }
        let mut watchers = self.watchers.lock().unwrap_or_else(|e| e.into_inner());
        self.announced
            .fetch_add(changes.len() as u64, Ordering::AcqRel);
        watchers.retain(|w| changes.iter().all(|c| w.send(c.clone()).is_ok()));
    }

    /// In a cluster: completes once the backplane carries every
    /// subscription made on this node so far (bounded), so a client told
    /// "subscribed" gets whatever any node publishes next. `None` on a
    /// single node, or when there is nothing to wait for.
    pub fn backplane_subscribed(&self) -> Option<Settled> {
        let backplane = self.backplane.get()?;
        backplane.subscribed(self.announced.load(Ordering::Acquire))
    }

    /// Whether publishes go through a backplane.
    pub fn clustered(&self) -> bool {
        self.backplane.get().is_some()
    }

    /// Filters with at least one subscriber right now.
    pub fn active_filters(&self) -> Vec<Filter> {
        let t = self.read();
        t.exact
            .keys()
            .chain(t.pins.keys().filter(|k| !t.exact.contains_key(*k)))
            .map(|k| Filter::parse(k))
            .filter_map(Result::ok)
            .chain(t.wild.filters().cloned())
            .collect()
    }

    pub fn register(&self, recipient: Arc<dyn Recipient>) -> ConnId {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.write().conns.insert(
            id,
            ConnEntry {
                recipient,
                filters: HashSet::new(),
            },
        );
        id
    }

    /// Subscribes; returns whether the subscription is new (false: it existed).
    pub fn subscribe(
        &self,
        conn: ConnId,
        filter: &Filter,
        limit: usize,
    ) -> Result<bool, SubscribeError> {
        self.subscribe_inner(conn, filter, limit, Replay::Nothing)
    }

    /// Like [`Hub::subscribe`], and a new subscription also gets the kept
    /// last value of every topic the filter matches, at once.
    ///
    /// `on_new` runs first, for a new subscription only, so a front end can
    /// queue its acknowledgement ahead of the last values. Both happen under
    /// the table lock, so no live message can slip in between: the client
    /// sees the ack, then the last values, then newer messages.
    pub fn subscribe_with_last_values(
        &self,
        conn: ConnId,
        filter: &Filter,
        limit: usize,
        on_new: impl FnOnce(),
    ) -> Result<bool, SubscribeError> {
        self.subscribe_inner(conn, filter, limit, Replay::LastValues(Box::new(on_new)))
    }

    /// Subscribes to a topic name (no wildcard) and, for a new
    /// subscription, recovers what was published on it after `since`
    /// (SPEC §11): `on_new(recovered)` runs first, so a front end can
    /// queue its acknowledgement, then the missed messages are queued, all
    /// under the table lock, so the live messages that follow join them
    /// with no gap and no duplicate. `recovered` is true only when the
    /// topic's history still holds every missed message in the same epoch;
    /// otherwise nothing is replayed. A subscription that existed already
    /// replays nothing (its messages were being delivered).
    pub fn subscribe_since(
        &self,
        conn: ConnId,
        filter: &Filter,
        limit: usize,
        since: &history::Since,
        on_new: impl FnOnce(bool),
    ) -> Result<bool, SubscribeError> {
        self.subscribe_inner(conn, filter, limit, Replay::Since(since, Box::new(on_new)))
    }

    fn subscribe_inner(
        &self,
        conn: ConnId,
        filter: &Filter,
        limit: usize,
        replay: Replay<'_>,
    ) -> Result<bool, SubscribeError> {
        let mut announce = Vec::new();
        let mut t = self.write();
        let t = &mut *t;
        let new = self.add_subscription(t, conn, filter, limit, &mut announce)?;
        if new {
            match replay {
                Replay::Nothing => {}
                Replay::LastValues(on_new) => {
                    on_new();
                    self.replay_last_values(t, conn, filter);
                }
                Replay::Since(since, on_new) => self.recover(t, conn, filter, since, on_new),
            }
            // Announced under the lock, so watchers see interest changes in
            // the order the table made them.
            self.announce(announce);
        }
        Ok(new)
    }

    /// Adds `filter` to `conn`'s subscriptions; `Ok(false)` when it had it.
    fn add_subscription(
        &self,
        t: &mut Table,
        conn: ConnId,
        filter: &Filter,
        limit: usize,
        announce: &mut Vec<Interest>,
    ) -> Result<bool, SubscribeError> {
        let entry = t.conns.get_mut(&conn).ok_or(SubscribeError::Closed)?;
        if entry.filters.contains(filter) {
            return Ok(false);
        }
        if entry.filters.len() >= limit {
            return Err(SubscribeError::TooMany);
        }
        entry.filters.insert(filter.clone());
        let recipient = &entry.recipient;
        let capacity = self.ring_capacity;
        let first = if filter.is_wildcard() {
            t.wild.subscribers(filter).add(conn, recipient, capacity)
        } else {
            let slot = t.exact.entry(filter.text().clone()).or_default();
            slot.add(conn, recipient, capacity)
        };
        if first && !t.pins.contains_key(filter.as_str()) {
            announce.push(Interest {
                filter: filter.clone(),
                active: true,
            });
        }
        self.metrics.subscriptions.inc();
        self.metrics
            .topics
            .set((t.exact.len() + t.wild.len()) as i64);
        Ok(true)
    }

    /// Puts a connection back in the rooms `names` a client left when its
    /// connection was cut (a Socket.IO session recovered, SPEC §11), if the
    /// history still holds every message of the tracked ones published
    /// after global sequence `after` of `epoch` (see
    /// [`history::History::missed`]); `Ok(false)`, and no subscription, if
    /// it does not (or history is off).
    ///
    /// On success `on_resumed` runs first, so the front end can queue its
    /// answer, then the missed messages are queued in global order, each
    /// publish once: all under the table lock, like
    /// [`Hub::subscribe_since`], so the live messages that follow join them
    /// with no gap and no duplicate.
    ///
    /// With the history in a backplane, `prepared` is what
    /// [`Hub::prepare_recovery`] made ready for `names`.
    pub fn resume(
        &self,
        conn: ConnId,
        names: &[Filter],
        epoch: &str,
        after: u64,
        prepared: Option<&Prepared>,
        on_resumed: impl FnOnce(),
    ) -> Result<bool, SubscribeError> {
        let mut announce = Vec::new();
        let mut t = self.write();
        let t = &mut *t;
        if !t.conns.contains_key(&conn) {
            return Err(SubscribeError::Closed);
        }
        let topics = names.iter().map(Filter::as_str);
        let missed = match prepared {
            None => self
                .history_lock()
                .and_then(|mut h| h.missed(topics, epoch, after)),
            Some(Prepared { fetched: None, .. }) => None,
            Some(Prepared {
                fetched: Some(f), ..
            }) => {
                let epoch_ok = f.global_epoch.as_deref().is_none_or(|e| e == epoch);
                match self.history_lock() {
                    Some(mut h) if epoch_ok && f.dropped <= after => {
                        Some(h.missed_placed(topics, epoch, after))
                    }
                    _ => None,
                }
            }
        };
        let Some(missed) = missed else {
            return Ok(false);
        };
        for name in names {
            self.add_subscription(t, conn, name, usize::MAX, &mut announce)?;
        }
        on_resumed();
        if !missed.is_empty()
            && let Some(entry) = t.conns.get(&conn)
        {
            let n = missed.len() as u64;
            // One replay, as last values are: what a client missed is
            // bounded by the history, and may exceed its queue once.
            if entry.recipient.deliver_batch(missed) {
                self.metrics.delivered.inc_by(n);
            } else {
                self.metrics.dropped.inc_by(n);
            }
        }
        self.announce(announce);
        Ok(true)
    }

    /// Queues to `conn` what was published on `filter` after `since`, if
    /// the history still holds all of it (see [`Hub::subscribe_since`]).
    fn recover(
        &self,
        t: &Table,
        conn: ConnId,
        filter: &Filter,
        since: &history::Since,
        on_new: Box<dyn FnOnce(bool) + '_>,
    ) {
        let missed = self
            .history_lock()
            .and_then(|mut h| h.since(filter.as_str(), since));
        let outcome = if missed.is_some() {
            "recovered"
        } else {
            "reload"
        };
        self.metrics
            .recoveries
            .get_or_create(&[("outcome", outcome)])
            .inc();
        on_new(missed.is_some());
        if let (Some(batch), Some(entry)) = (missed, t.conns.get(&conn)) {
            self.replay(entry, batch);
        }
    }

    /// Queues a replay (last values, missed messages) to a connection as
    /// one batch: a replay longer than the queue still reaches a client
    /// that reads, and a client that does not is closed as a slow consumer
    /// (see `transport::outbox`).
    fn replay(&self, entry: &ConnEntry, batch: Vec<Arc<Message>>) {
        if batch.is_empty() {
            return;
        }
        let n = batch.len() as u64;
        if entry.recipient.deliver_batch(batch) {
            self.metrics.delivered.inc_by(n);
        } else {
            self.metrics.dropped.inc_by(n);
        }
    }

    /// Queues the kept last values matching `filter` to `conn`, except
    /// those another of its subscriptions already matches: the connection
    /// got that value (or a newer one) then, and receives each message once.
    fn replay_last_values(&self, t: &Table, conn: ConnId, filter: &Filter) {
        let kept = self.last_values(filter);
        let Some(entry) = t.conns.get(&conn) else {
            return;
        };
        let batch: Vec<Arc<Message>> = kept
            .into_iter()
            .filter(|msg| {
                !entry
                    .filters
                    .iter()
                    .any(|f| f != filter && f.matches(&msg.topic))
            })
            .collect();
        self.replay(entry, batch);
    }

    /// Follows the topic `name` on the backplane although no connection
    /// here subscribes it (yet): its interest is announced as a
    /// subscription's would be, and what the backplane brings of it is
    /// kept in this node's history copy. Undone by [`Hub::unpin`].
    pub fn pin(&self, name: &Filter) {
        let mut announce = Vec::new();
        {
            let mut t = self.write();
            let count = t.pins.entry(name.text().clone()).or_insert(0);
            *count += 1;
            if *count == 1 && !t.exact.contains_key(name.as_str()) {
                announce.push(Interest {
                    filter: name.clone(),
                    active: true,
                });
            }
            self.announce(announce);
        }
    }

    pub fn unpin(&self, name: &Filter) {
        let mut announce = Vec::new();
        {
            let mut t = self.write();
            let Some(count) = t.pins.get_mut(name.as_str()) else {
                return;
            };
            *count -= 1;
            if *count == 0 {
                t.pins.remove(name.as_str());
                if !t.exact.contains_key(name.as_str()) {
                    announce.push(Interest {
                        filter: name.clone(),
                        active: false,
                    });
                }
            }
            self.announce(announce);
        }
    }

    /// Before a recovery from a backplane that keeps the history: follows
    /// each of `names` ([`Hub::pin`]), waits until the backplane carries
    /// them, then fetches what it holds of each and joins it to this node's
    /// copy, so that [`Hub::subscribe_since`] or [`Hub::resume`] finds
    /// every message there: those fetched, and those that arrived since
    /// the pin, merged by offset. Returns the pins (dropped once the
    /// subscription is made) and the highest sequence a fetched topic
    /// dropped; `None` when a fetch failed (nothing can be promised).
    pub async fn prepare_recovery(self: &Arc<Self>, names: &[Filter]) -> Prepared {
        let pins = Pins {
            hub: self.clone(),
            names: names.to_vec(),
        };
        for name in names {
            self.pin(name);
        }
        let fetched = self.fetch_for_recovery(names).await;
        Prepared {
            _pins: pins,
            fetched,
        }
    }

    async fn fetch_for_recovery(&self, names: &[Filter]) -> Option<FetchedAll> {
        let backplane = self.backplane.get().cloned()?;
        if let Some(subscribed) = self.backplane_subscribed() {
            subscribed.await;
        }
        let mut all = FetchedAll {
            dropped: 0,
            global_epoch: None,
        };
        for name in names {
            let topic = name.text().clone();
            if !self.history_lock().is_some_and(|h| h.tracks(&topic)) {
                continue;
            }
            let f = match backplane.fetch_history(&topic)?.await {
                Ok(f) => f,
                Err(e) => {
                    tracing::warn!(error = %e, topic = %topic, "history not fetched from the backplane; the client reloads");
                    return None;
                }
            };
            all.dropped = all.dropped.max(f.dropped_seq);
            all.global_epoch = f.global_epoch.or(all.global_epoch);
            if f.epoch.is_empty() {
                // Nothing kept there: nothing to join.
                continue;
            }
            if let Some(mut h) = self.history_lock() {
                h.seed(&topic, &f.epoch, f.last, f.messages);
            }
        }
        Some(all)
    }

    /// Unsubscribes; returns whether there was such a subscription.
    pub fn unsubscribe(&self, conn: ConnId, filter: &Filter) -> bool {
        let mut announce = Vec::new();
        let mut t = self.write();
        let t = &mut *t;
        let removed = t
            .conns
            .get_mut(&conn)
            .and_then(|e| e.filters.remove(filter).then(|| e.recipient.clone()));
        if let Some(recipient) = &removed {
            remove_sub(t, conn, recipient, filter, true, &mut announce);
            self.metrics.subscriptions.dec();
            self.metrics
                .topics
                .set((t.exact.len() + t.wild.len()) as i64);
        }
        self.announce(announce);
        removed.is_some()
    }

    /// Removes a connection and all its subscriptions.
    pub fn unregister(&self, conn: ConnId) {
        let mut announce = Vec::new();
        {
            let mut t = self.write();
            let t = &mut *t;
            let Some(entry) = t.conns.remove(&conn) else {
                return;
            };
            for filter in &entry.filters {
                remove_sub(t, conn, &entry.recipient, filter, false, &mut announce);
            }
            self.metrics
                .subscriptions
                .dec_by(entry.filters.len() as i64);
            self.metrics
                .topics
                .set((t.exact.len() + t.wild.len()) as i64);
            self.announce(announce);
        }
    }

    /// Tells every registered connection that the server is stopping. One
    /// sweep, rather than every connection waiting on the shutdown signal,
    /// which would put all of them on one shared wait list.
    pub fn shutdown_all(&self) {
        for entry in self.read().conns.values() {
            entry.recipient.shutdown();
        }
    }

    pub fn stats(&self) -> HubStats {
        let t = self.read();
        HubStats {
            connections: t.conns.len(),
            topics: t.exact.len() + t.wild.len(),
            subscriptions: t.conns.values().map(|c| c.filters.len()).sum(),
        }
    }

    /// How many topics, rooms and wildcard filters have a subscriber on
    /// this node (O(1), unlike [`Hub::stats`]).
    pub fn topic_count(&self) -> usize {
        let t = self.read();
        t.exact.len() + t.wild.len()
    }

    /// The `n` (at most [`MAX_TOP_TOPICS`]) names with the most subscribers
    /// on this node, most first, ties in name order. Socket.IO rooms and
    /// `/ws` topics are one namespace, so a room's count includes both
    /// protocols; a wildcard filter is its own entry, not added to the
    /// topics it matches.
    ///
    /// One pass over the table under its read lock, keeping the best `n`
    /// in a heap: O(filters × log n) and no allocation per filter; only the
    /// `n` results are copied out.
    pub fn top_topics(&self, n: usize) -> Vec<TopicCount> {
        let n = n.min(MAX_TOP_TOPICS);
        if n == 0 {
            return Vec::new();
        }
        let t = self.read();
        // Ordered by count, then by name reversed (`a` before `b`): the
        // heap's top (it holds `Reverse`d keys) is the weakest kept.
        type Ranked<'a> = Reverse<(usize, Reverse<&'a Arc<str>>, bool)>;
        let mut best: BinaryHeap<Ranked> = BinaryHeap::with_capacity(n + 1);
        let exact = t.exact.iter().map(|(name, subs)| (name, subs.len(), false));
        let wild = t.wild.counts().map(|(name, count)| (name, count, true));
        for (name, count, wildcard) in exact.chain(wild) {
            if count == 0 {
                continue;
            }
            best.push(Reverse((count, Reverse(name), wildcard)));
            if best.len() > n {
                best.pop();
            }
        }
        best.into_sorted_vec()
            .into_iter()
            .map(
                |Reverse((subscribers, Reverse(name), wildcard))| TopicCount {
                    name: name.clone(),
                    subscribers,
                    wildcard,
                },
            )
            .collect()
    }

    /// Publishes a message: every connection with a matching subscription
    /// gets it once. Returns how many connections of this node it reaches.
    pub fn publish(&self, msg: Message) -> usize {
        let topic = msg.topic.clone();
        self.publish_rooms(std::slice::from_ref(&topic), msg.event, msg.payload, msg.ts)
    }

    /// Publishes one payload to several names at once: each connection gets
    /// it once, with `topic` set to the first listed name it matches.
    ///
    /// With a [`Backplane`] attached the message goes to every node through
    /// it, this one included: it is delivered here when it comes back, so
    /// every node delivers a topic's messages in the backplane's order.
    /// While the backplane cannot take it (down), it is delivered here at
    /// once. Returns how many connections of this node it reaches.
    pub fn publish_rooms(
        &self,
        rooms: &[Arc<str>],
        event: Option<Arc<str>>,
        payload: Arc<RawValue>,
        ts: u64,
    ) -> usize {
        if let Some(backplane) = self.backplane.get()
            && backplane.send(rooms, event.as_ref(), &payload, ts)
        {
            return self.reach(rooms);
        }
        self.deliver_rooms(rooms, event, payload, ts)
    }

    /// Delivers a message to this node's connections only, never through a
    /// backplane (the demo feed, and what a backplane brings in).
    pub fn publish_local(&self, msg: Message) -> usize {
        let topic = msg.topic.clone();
        self.deliver_rooms(std::slice::from_ref(&topic), msg.event, msg.payload, msg.ts)
    }

    /// Sends every later publish through `backplane` (once per hub).
    pub fn attach_backplane(&self, backplane: Arc<dyn Backplane>) {
        let _ = self.backplane.set(backplane);
    }

    /// How many of this node's connections a publish to `rooms` reaches.
    pub fn reach(&self, rooms: &[Arc<str>]) -> usize {
        let t = self.read();
        let mut seen: HashSet<ConnId> = HashSet::new();
        for room in rooms {
            for subs in t.exact.get(room).into_iter().chain(t.wild.matching(room)) {
                seen.extend(subs.readers.iter().copied());
            }
        }
        seen.len()
    }

    /// Delivers one payload to several names on this node: each connection
    /// gets it once, with `topic` set to the first listed name it matches.
    pub fn deliver_rooms(
        &self,
        rooms: &[Arc<str>],
        event: Option<Arc<str>>,
        payload: Arc<RawValue>,
        ts: u64,
    ) -> usize {
        self.deliver_inner(rooms, event, payload, ts, None)
    }

    /// [`Hub::deliver_rooms`] for a publish whose history positions a
    /// backplane gave (see [`Backplane::keeps_history`]).
    pub fn deliver_placed(
        &self,
        rooms: &[Arc<str>],
        event: Option<Arc<str>>,
        payload: Arc<RawValue>,
        ts: u64,
        placed: &Placed,
    ) -> usize {
        self.deliver_inner(rooms, event, payload, ts, Some(placed))
    }

    /// Whether a backplane keeps the history (and this node only a copy).
    pub fn history_in_backplane(&self) -> bool {
        self.history.is_some() && self.backplane.get().is_some_and(|b| b.keeps_history())
    }

    fn deliver_inner(
        &self,
        rooms: &[Arc<str>],
        event: Option<Arc<str>>,
        payload: Arc<RawValue>,
        ts: u64,
        placed: Option<&Placed>,
    ) -> usize {
        let started = Instant::now();
        // With the history in a backplane, positions are the backplane's
        // only: a publish it did not place (delivered here while it was
        // down) has none.
        let external = placed.is_some() || self.history_in_backplane();
        let (reached, appended, wake) = {
            let t = self.read();
            // Held until the rings have the messages: offsets follow the
            // order in which readers see them.
            let (mut history, first_tracked) = match self
                .history_lock()
                .and_then(|h| rooms.iter().position(|r| h.tracks(r)).map(|i| (h, i)))
            {
                Some((h, i)) => (Some(h), i),
                None => (None, usize::MAX),
            };
            let seq = match placed {
                Some(p) => p.seq.clone(),
                None if external => None,
                None => history.as_mut().map(|h| h.next_seq()),
            };
            // A room's copy that this node replayed already (fetched from
            // the backplane before it arrived) is not delivered again: the
            // rooms left are listed then (only then: no allocation else).
            let mut kept_rooms: Option<Vec<Arc<str>>> = None;
            let messages: Vec<Arc<Message>> = rooms
                .iter()
                .enumerate()
                .filter_map(|(i, room)| {
                    let mut msg =
                        Message::with_ts(room.clone(), event.clone(), payload.clone(), ts);
                    msg.seq = seq.clone();
                    let msg = match (placed, history.as_mut()) {
                        (Some(p), _) => {
                            msg.position = p.positions.get(i).cloned().flatten();
                            Arc::new(msg)
                        }
                        (None, Some(h))
                            if !external
                                && (i == first_tracked
                                    || (i > first_tracked && h.tracks(room))) =>
                        {
                            // Numbered and kept in one step.
                            h.keep_new(msg)
                        }
                        _ => Arc::new(msg),
                    };
                    if external
                        && let Some(h) = history.as_mut()
                        && !h.place(&msg)
                    {
                        kept_rooms.get_or_insert_with(|| rooms[..i].to_vec());
                        return None;
                    }
                    // Under the table lock, so a concurrent new subscriber gets
                    // this message either as its last value or live, not both.
                    let tracked = self.last_value_filters.iter().any(|f| f.matches(room));
                    if tracked && let Some(mut kept) = self.last_value_store() {
                        let held = kept.record(&msg);
                        self.metrics.last_value_topics.set(held as i64);
                    }
                    if let Some(kept) = kept_rooms.as_mut() {
                        kept.push(room.clone());
                    }
                    Some(msg)
                })
                .collect();
            let rooms = kept_rooms.as_deref().unwrap_or(rooms);
            let single_exact = match (rooms, messages.as_slice()) {
                ([room], [msg]) if t.wild.matching(room).next().is_none() => Some(msg),
                _ => None,
            };
            let delivered = if let Some(msg) = single_exact {
                // The common case: one name, no wildcard involved. Every
                // subscriber is distinct, so no de-duplication is needed.
                match t.exact.get(&rooms[0]) {
                    None => (0, ring::Appended::default(), Vec::new()),
                    Some(subs) => {
                        let (appended, wake) = match &subs.ring {
                            Some(ring) => ring::append_one(ring, msg.clone()),
                            None => Default::default(),
                        };
                        (subs.len(), appended, wake)
                    }
                }
            } else {
                // Each connection once, under the first name it matches: a
                // reader merges the copies of one publish in its rings by
                // their shared id; here they are only counted once.
                let mut seen: HashSet<ConnId> = HashSet::new();
                let mut rings: Vec<(&Arc<Ring>, Arc<Message>, usize)> = Vec::new();
                for (rank, (room, msg)) in rooms.iter().zip(&messages).enumerate() {
                    for subs in t.exact.get(room).into_iter().chain(t.wild.matching(room)) {
                        seen.extend(subs.readers.iter().copied());
                        if let Some(ring) = &subs.ring
                            && !rings.iter().any(|(r, ..)| Arc::ptr_eq(r, ring))
                        {
                            rings.push((ring, msg.clone(), rank));
                        }
                    }
                }
                let (mut appended, wake) = ring::append(&mut rings);
                // Counted per connection, not per copy.
                appended.queued = seen.len() as u64;
                (seen.len(), appended, wake)
            };
            if let Some(h) = &history {
                let held = h.held();
                self.metrics.history_messages.set(held.messages as i64);
                self.metrics.history_bytes.set(held.bytes as i64);
            }
            delivered
        };
        // Woken outside every lock: a woken writer may run at once on
        // another core and take the ring's lock.
        wake.into_iter().for_each(Waker::wake);
        self.metrics.delivered.inc_by(appended.queued);
        self.metrics.dropped.inc_by(appended.dropped);
        self.metrics
            .stage_latency(crate::metrics::Stage::Fanout)
            .observe(started.elapsed().as_secs_f64());
        reached
    }
}

/// Topics followed for a recovery under way ([`Hub::prepare_recovery`]),
/// no longer once dropped.
pub struct Pins {
    hub: Arc<Hub>,
    names: Vec<Filter>,
}

impl Drop for Pins {
    fn drop(&mut self) {
        for name in &self.names {
            self.hub.unpin(name);
        }
    }
}

fn remove_sub(
    t: &mut Table,
    conn: ConnId,
    recipient: &Arc<dyn Recipient>,
    filter: &Filter,
    flush: bool,
    announce: &mut Vec<Interest>,
) {
    let emptied = if filter.is_wildcard() {
        t.wild.remove(filter, conn, recipient, flush)
    } else {
        match t.exact.get_mut(filter.as_str()) {
            Some(subs) => subs.remove(conn, recipient, flush),
            None => false,
        }
    };
    if emptied {
        if !filter.is_wildcard() {
            t.exact.remove(filter.as_str());
            if t.pins.contains_key(filter.as_str()) {
                return;
            }
        }
        announce.push(Interest {
            filter: filter.clone(),
            active: false,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A recipient that reads its rings, like the WebSocket front ends,
    /// and keeps everything it got (replays included) until taken.
    #[derive(Default)]
    struct Pull(Mutex<Reader>, Mutex<Vec<Arc<Message>>>);

    impl Recipient for Pull {
        fn reader(&self) -> &Mutex<Reader> {
            &self.0
        }
        fn deliver_batch(&self, msgs: Vec<Arc<Message>>) -> bool {
            self.drain();
            self.1.lock().unwrap().extend(msgs);
            true
        }
        fn flush(&self) {
            self.drain();
        }
    }

    impl Pull {
        /// Moves what the rings hold into the kept list.
        fn drain(&self) {
            let mut got = Vec::new();
            self.0
                .lock()
                .unwrap()
                .collect(None, |m| got.push(m))
                .unwrap();
            self.1.lock().unwrap().extend(got);
        }

        /// Everything received so far (kept).
        fn all(&self) -> Vec<Arc<Message>> {
            self.drain();
            self.1.lock().unwrap().clone()
        }

        /// Takes everything received: `topic=payload` each; parks on the
        /// rings with `waker` when nothing is new.
        fn take(&self, waker: &Waker) -> Vec<String> {
            let mut got: Vec<Arc<Message>> = std::mem::take(&mut *self.1.lock().unwrap());
            self.0
                .lock()
                .unwrap()
                .collect(Some(waker), |m| got.push(m))
                .unwrap();
            got.iter()
                .map(|m| format!("{}={}", m.topic, m.payload.get()))
                .collect()
        }
    }

    fn hub() -> Hub {
        Hub::new(Arc::new(Metrics::new()))
    }

    fn f(s: &str) -> Filter {
        Filter::parse(s).unwrap()
    }

    fn msg(topic: &str) -> Message {
        Message::new(topic.into(), None, payload_of(&1))
    }

    #[test]
    fn delivers_once_with_published_name() {
        let hub = hub();
        let c = Arc::new(Pull::default());
        let id = hub.register(c.clone());
        hub.subscribe(id, &f("a/b"), 10).unwrap();
        hub.subscribe(id, &f("a/+"), 10).unwrap();
        hub.subscribe(id, &f("a/#"), 10).unwrap();
        assert_eq!(hub.publish(msg("a/b")), 1);
        assert_eq!(hub.publish(msg("a")), 1);
        assert_eq!(hub.publish(msg("b")), 0);
        let got = c.all();
        assert_eq!(got.len(), 2);
        assert_eq!(&*got[0].topic, "a/b");
        assert_eq!(&*got[1].topic, "a");
    }

    #[test]
    fn rooms_use_first_matching_name() {
        let hub = hub();
        let c = Arc::new(Pull::default());
        let id = hub.register(c.clone());
        hub.subscribe(id, &f("r2"), 10).unwrap();
        hub.subscribe(id, &f("r3"), 10).unwrap();
        let n = hub.publish_rooms(
            &["r1".into(), "r3".into(), "r2".into()],
            None,
            payload_of(&0),
            1,
        );
        assert_eq!(n, 1);
        assert_eq!(&*c.all()[0].topic, "r3");
    }

    #[test]
    fn top_topics_are_the_busiest_names_most_first() {
        let hub = hub();
        let ids: Vec<_> = (0..4)
            .map(|_| hub.register(Arc::new(Pull::default())))
            .collect();
        // b: 3, a/#: 2, c: 2, d: 1, e: 0 (left again).
        for id in &ids[..3] {
            hub.subscribe(*id, &f("b"), 10).unwrap();
        }
        for id in &ids[..2] {
            hub.subscribe(*id, &f("c"), 10).unwrap();
            hub.subscribe(*id, &f("a/#"), 10).unwrap();
        }
        hub.subscribe(ids[3], &f("d"), 10).unwrap();
        hub.subscribe(ids[3], &f("e"), 10).unwrap();
        hub.unsubscribe(ids[3], &f("e"));
        let top = |n| {
            hub.top_topics(n)
                .into_iter()
                .map(|t| {
                    format!(
                        "{}={}{}",
                        t.name,
                        t.subscribers,
                        if t.wildcard { "*" } else { "" }
                    )
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(top(10), ["b=3", "a/#=2*", "c=2", "d=1"]);
        assert_eq!(top(2), ["b=3", "a/#=2*"]);
        assert!(top(0).is_empty());
        hub.unregister(ids[0]);
        assert_eq!(top(10), ["b=2", "a/#=1*", "c=1", "d=1"]);
        // Never more than the cap, however many are asked for.
        for i in 0..MAX_TOP_TOPICS + 5 {
            hub.subscribe(ids[3], &f(&format!("many/{i}")), 1000)
                .unwrap();
        }
        assert_eq!(hub.top_topics(usize::MAX).len(), MAX_TOP_TOPICS);
    }

    #[test]
    fn tables_return_to_empty() {
        let hub = hub();
        let mut watch = hub.watch_interest();
        let ids: Vec<_> = (0..3)
            .map(|_| hub.register(Arc::new(Pull::default())))
            .collect();
        for id in &ids {
            hub.subscribe(*id, &f("t"), 10).unwrap();
            hub.subscribe(*id, &f("w/#"), 10).unwrap();
        }
        assert!(!hub.subscribe(ids[0], &f("t"), 10).unwrap(), "idempotent");
        assert_eq!(
            hub.subscribe(ids[0], &f("x"), 2),
            Err(SubscribeError::TooMany)
        );
        assert!(hub.unsubscribe(ids[0], &f("t")));
        assert!(!hub.unsubscribe(ids[0], &f("t")));
        for id in &ids {
            hub.unregister(*id);
        }
        assert_eq!(hub.stats(), HubStats::default());
        let mut events = vec![];
        while let Ok(e) = watch.try_recv() {
            events.push((e.filter.to_string(), e.active));
        }
        // Activations follow subscription order; the last connection's
        // filters are released in set order.
        assert_eq!(
            events[..2],
            [("t".to_string(), true), ("w/#".to_string(), true)]
        );
        let mut released = events[2..].to_vec();
        released.sort();
        assert_eq!(
            released,
            [("t".to_string(), false), ("w/#".to_string(), false)]
        );
    }

    #[test]
    fn new_subscriptions_get_last_values_after_on_new() {
        let hub =
            Hub::new(Arc::new(Metrics::new())).with_last_values(vec![f("temp/#")], 100, 1 << 20);
        hub.publish(Message::with_ts("temp/a".into(), None, payload_of(&1), 11));
        hub.publish(Message::with_ts("temp/b".into(), None, payload_of(&2), 12));
        hub.publish(Message::with_ts("temp/a".into(), None, payload_of(&3), 13));
        hub.publish(msg("other"));
        assert_eq!(hub.last_values(&f("temp/#")).len(), 2);
        assert_eq!(hub.metrics().last_value_topics.get(), 2);

        let c = Arc::new(Pull::default());
        let id = hub.register(c.clone());
        let mut calls = 0;
        let new = hub
            .subscribe_with_last_values(id, &f("temp/+"), 10, || {
                // Runs before the last values are queued.
                assert!(c.all().is_empty());
                calls += 1;
            })
            .unwrap();
        assert!(new);
        assert_eq!(calls, 1);
        let got: Vec<(String, u64)> = c
            .all()
            .iter()
            .map(|m| (m.topic.to_string(), m.ts))
            .collect();
        assert_eq!(got, vec![("temp/b".into(), 12), ("temp/a".into(), 13)]);

        // A repeated subscribe sends nothing again; an exact one gets its topic.
        assert!(
            !hub.subscribe_with_last_values(id, &f("temp/+"), 10, || calls += 1)
                .unwrap()
        );
        assert_eq!(calls, 1);
        assert_eq!(c.all().len(), 2);
        // A filter whose topics another subscription already covers: nothing again.
        hub.subscribe_with_last_values(id, &f("temp/a"), 10, || {})
            .unwrap();
        assert_eq!(c.all().len(), 2);
        // Plain subscribe never replays.
        hub.unsubscribe(id, &f("temp/+"));
        hub.subscribe(id, &f("temp/#"), 10).unwrap();
        assert_eq!(c.all().len(), 2);
        // Only what no other subscription covers.
        let other = Arc::new(Pull::default());
        let id2 = hub.register(other.clone());
        hub.subscribe_with_last_values(id2, &f("temp/a"), 10, || {})
            .unwrap();
        hub.subscribe_with_last_values(id2, &f("temp/+"), 10, || {})
            .unwrap();
        let got: Vec<String> = other.all().iter().map(|m| m.topic.to_string()).collect();
        assert_eq!(got, vec!["temp/a", "temp/b"]);
    }

    #[test]
    fn last_value_then_live_never_repeats_or_goes_back_under_races() {
        let hub = Arc::new(
            Hub::new(Arc::new(Metrics::new()))
                .with_ring_capacity(4096)
                .with_last_values(vec![f("t")], 10, 1 << 20),
        );
        hub.publish(Message::new("t".into(), None, payload_of(&0)));
        let publisher = {
            let hub = hub.clone();
            std::thread::spawn(move || {
                for n in 1..=2000 {
                    hub.publish(Message::new("t".into(), None, payload_of(&n)));
                }
            })
        };
        // Readers subscribing while it publishes.
        let mut readers = vec![];
        for _ in 0..50 {
            let p = Arc::new(Pull::default());
            readers.push(p.clone());
            let id = hub.register(p);
            hub.subscribe_with_last_values(id, &f("t"), 10, || {})
                .unwrap();
        }
        publisher.join().unwrap();
        for p in &readers {
            let got: Vec<i64> = p
                .take(Waker::noop())
                .iter()
                .map(|s| s.trim_start_matches("t=").parse().unwrap())
                .collect();
            assert!(
                got.windows(2).all(|w| w[1] == w[0] + 1),
                "a gap, a repeat or a step back: {got:?}"
            );
            assert_eq!(got.last(), Some(&2000));
        }
    }

    struct CountWakes(std::sync::atomic::AtomicUsize);
    impl std::task::Wake for CountWakes {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    #[test]
    fn readers_get_each_publish_once_under_the_first_name_it_matches() {
        let hub = hub();
        let p = Arc::new(Pull::default());
        let id = hub.register(p.clone());
        for filter in ["a/b", "a/+", "a/#", "r2", "r3"] {
            hub.subscribe(id, &f(filter), 10).unwrap();
        }
        let push = Arc::new(Pull::default());
        let other = hub.register(push.clone());
        hub.subscribe(other, &f("a/#"), 10).unwrap();
        assert_eq!(hub.publish(msg("a/b")), 2);
        assert_eq!(hub.publish(msg("a")), 2);
        assert_eq!(hub.publish(msg("b")), 0);
        let rooms = ["r1".into(), "r3".into(), "r2".into()];
        assert_eq!(hub.publish_rooms(&rooms, None, payload_of(&7), 1), 1);
        assert_eq!(p.take(Waker::noop()), ["a/b=1", "a=1", "r3=7"]);
        assert_eq!(push.all().len(), 2);
        assert_eq!(hub.metrics().delivered.get(), 5);
    }

    #[test]
    fn an_idle_reader_is_woken_once_per_batch_and_unread_messages_survive_an_unsubscribe() {
        let hub = hub();
        let p = Arc::new(Pull::default());
        let id = hub.register(p.clone());
        hub.subscribe(id, &f("s/1"), 10).unwrap();
        hub.subscribe(id, &f("s/+"), 10).unwrap();
        let wakes = Arc::new(CountWakes(0.into()));
        let waker = Waker::from(wakes.clone());
        assert!(p.take(&waker).is_empty(), "parks");
        hub.publish(msg("s/1"));
        hub.publish(msg("s/1"));
        // Once per ring it parked on, by the first publish only.
        assert_eq!(wakes.0.load(Ordering::Relaxed), 2);
        // Leaving the exact filter does not lose what the wildcard also got.
        hub.unsubscribe(id, &f("s/1"));
        hub.publish(msg("s/1"));
        assert_eq!(p.take(&waker), ["s/1=1", "s/1=1", "s/1=1"]);
        hub.unregister(id);
        assert_eq!(hub.stats(), HubStats::default());
        hub.publish(msg("s/1"));
        assert_eq!(
            wakes.0.load(Ordering::Relaxed),
            2,
            "left the rings' waiters"
        );
        assert!(p.take(&waker).is_empty());
    }

    #[test]
    fn no_last_values_unless_enabled() {
        let hub = hub();
        hub.publish(msg("temperature"));
        assert!(hub.last_values(&f("#")).is_empty());
    }

    #[test]
    fn a_reader_that_falls_behind_lags_alone_and_is_counted() {
        let hub = Hub::new(Arc::new(Metrics::new())).with_ring_capacity(2);
        let slow = Arc::new(Pull::default());
        let fast = Arc::new(Pull::default());
        let a = hub.register(slow.clone());
        let b = hub.register(fast.clone());
        hub.subscribe(a, &f("t"), 10).unwrap();
        hub.subscribe(b, &f("t"), 10).unwrap();
        for _ in 0..5 {
            hub.publish(msg("t"));
            fast.drain();
        }
        assert!(slow.0.lock().unwrap().lagged());
        assert_eq!(fast.all().len(), 5);
        // The slow reader's unread copies made room for newer ones.
        assert_eq!(hub.metrics().dropped.get(), 3);
    }

    #[test]
    fn resume_replays_every_room_in_order_once_then_live_or_subscribes_nothing() {
        let hub = Hub::new(Arc::new(Metrics::new())).with_history(
            vec![f("h/#")],
            10,
            std::time::Duration::from_secs(60),
        );
        let rooms = |names: &[&str]| names.iter().map(|n| Arc::from(*n)).collect::<Vec<_>>();
        let seen = Arc::new(Pull::default());
        let a = hub.register(seen.clone());
        hub.subscribe(a, &f("h/1"), 10).unwrap();
        hub.publish_rooms(&rooms(&["h/1"]), None, payload_of(&0), 1);
        let last = seen.all()[0].seq.clone().unwrap();
        hub.unregister(a);
        // Missed: to one room, to both, to an untracked room and a tracked one.
        hub.publish_rooms(&rooms(&["h/2"]), None, payload_of(&1), 1);
        hub.publish_rooms(&rooms(&["h/1", "h/2"]), None, payload_of(&2), 1);
        hub.publish_rooms(&rooms(&["u", "h/1"]), None, payload_of(&3), 1);
        hub.publish_rooms(&rooms(&["h/3"]), None, payload_of(&99), 1);

        let back = Arc::new(Pull::default());
        let b = hub.register(back.clone());
        let names = [f("h/1"), f("h/2"), f("u")];
        let mut before = None;
        let resumed = hub
            .resume(b, &names, &last.epoch, last.n, None, || {
                before = Some(back.all().len());
            })
            .unwrap();
        assert!(resumed);
        assert_eq!(before, Some(0), "on_resumed runs before the replay");
        hub.publish_rooms(&rooms(&["u"]), None, payload_of(&4), 1);
        let got: Vec<String> = back
            .take(Waker::noop())
            .iter()
            .map(|m| m.rsplit('=').next().unwrap_or("").to_string())
            .collect();
        assert_eq!(got, ["1", "2", "3", "4"]);
        assert_eq!(hub.stats().subscriptions, 3);

        // Another epoch: nothing subscribed, nothing sent, on_resumed not run.
        let other = Arc::new(Pull::default());
        let c = hub.register(other.clone());
        assert!(
            !hub.resume(c, &names, "nope", last.n, None, || panic!("not resumed"))
                .unwrap()
        );
        assert_eq!(hub.stats().subscriptions, 3);
        assert!(other.all().is_empty());
        // History off: never.
        let plain = Hub::new(Arc::new(Metrics::new()));
        let d = plain.register(Arc::new(Pull::default()));
        assert!(
            !plain
                .resume(d, &names, &last.epoch, 0, None, || {})
                .unwrap()
        );
    }
}
