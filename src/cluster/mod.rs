//! Clustering (SPEC §8): several pulso nodes behind a load balancer act as
//! one server, over Redis or NATS.
//!
//! The cluster is a [`Backplane`] attached to the hub. Every publish made
//! on a node (HTTP API, a `/ws` `pub`, an MQTT message) goes to the engine
//! once per named topic or room, on that name's own channel, and comes back
//! to every node subscribed to it, the publishing node included; each node
//! then delivers it to its own connections. So:
//!
//! - **Routed by interest.** A node subscribes only to the channels (and,
//!   for wildcard filters, the patterns) of what its own clients want right
//!   now ([`channel`]), following the hub's interest changes, and leaves a
//!   channel a little after its last subscriber did ([`LINGER`]), so a
//!   client that resubscribes at once costs no churn. A node with no
//!   subscriber for a topic receives nothing of it.
//! - **Same order everywhere.** A node delivers its own publishes when they
//!   come back, not before, so every connection of the cluster sees a
//!   topic's messages in the engine's order. Redis has one order for all;
//!   over NATS a small JetStream stream makes one (see [`nats`]).
//! - **Exactly once.** A publish can reach a node several times: through an
//!   exact channel and a pattern that both match, or once per named room of
//!   a broadcast. Every publish carries its origin node and sequence number;
//!   a node drops a copy it has just seen ([`Seen`]), and the hub delivers
//!   one publish to each connection once.
//! - **Down is local.** While the engine is unreachable, publishes are
//!   delivered on the node where they were made and counted as `unsent`;
//!   the subscriber reconnects with backoff and subscribes again to what
//!   its clients want then. Queues are bounded.

pub mod channel;
pub mod jetstream;
pub mod nats;
pub mod nats_history;
pub mod nats_sessions;
pub mod redis;

use std::borrow::Cow;
use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::Hash;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::hub::history::{Position, Seq};
use crate::hub::{Backplane, Fetch, Filter, Hub, Interest, Message, Placed};
use crate::metrics::Metrics;

/// How long a node stays subscribed to a channel nobody here wants any
/// more: a client that leaves and comes back at once (a reconnect, a page
/// reload) costs no unsubscribe and subscribe on the engine.
pub const LINGER: Duration = Duration::from_secs(2);

/// Publishes waiting for the engine; beyond this a publish is delivered on
/// this node only and counted as `unsent`.
pub const OUT_QUEUE: usize = 8192;

/// Publishes remembered per node to drop their second copies.
const SEEN: usize = 4096;

/// Longest wait of a client's ack for the backplane's subscription.
const SUBSCRIBE_WAIT: Duration = Duration::from_secs(3);

/// The engine's tasks, started by the server once it runs.
pub enum Tasks {
    Redis(Box<redis::Tasks>),
    Nats(nats::Tasks),
}

impl Tasks {
    /// Where Socket.IO recovery sessions are shared with the other nodes
    /// (with the history on).
    pub fn sessions(&self) -> Option<Arc<dyn crate::gateway::SharedSessions>> {
        match self {
            Tasks::Redis(t) => t.sessions(),
            Tasks::Nats(t) => t.sessions(),
        }
    }

    /// Runs the engine's writer and subscriber until `stop`.
    pub async fn run(self, stop: CancellationToken) {
        match self {
            Tasks::Redis(t) => (*t).run(stop).await,
            Tasks::Nats(t) => t.run(stop).await,
        }
    }
}

/// The hub's handle on the backplane, the same whatever the engine: a
/// publish is queued for the engine's writer task (the hub never waits on
/// the network), and an ack that must follow a subscription waits for the
/// subscriber task's [`Settle`] count.
pub struct Link {
    shared: Arc<Shared>,
    out: mpsc::Sender<Outgoing>,
    /// The hub's interest changes acted on so far (see [`Settle`]).
    settled: watch::Receiver<u64>,
    /// Where the engine keeps the history, when it keeps it.
    history: Option<Arc<dyn HistorySource>>,
}

/// An engine that keeps the history of the topics `history.topics`
/// matches (SPEC §11): it gives their messages their positions as it
/// carries them, and hands out what it holds of a topic.
pub trait HistorySource: Send + Sync + 'static {
    fn fetch(&self, topic: Arc<str>) -> Fetch;
}

/// The history rules of the cluster, as `history.*` sets them.
#[derive(Debug, Clone)]
pub struct HistoryRules {
    pub filters: Vec<Filter>,
    pub size: usize,
    pub ttl: Duration,
}

impl HistoryRules {
    pub fn tracks(&self, topic: &str) -> bool {
        self.filters.iter().any(|f| f.matches(topic))
    }
}

/// The engine's side of a [`Link`]: what its writer and subscriber consume.
pub struct Feeds {
    pub out: mpsc::Receiver<Outgoing>,
    pub interest: mpsc::UnboundedReceiver<Interest>,
    pub settle: Settle,
}

impl Link {
    /// A link for `shared`'s hub; its interest is followed from now on.
    /// `history`: where the engine keeps the history, if it does.
    pub fn new(shared: Arc<Shared>, history: Option<Arc<dyn HistorySource>>) -> (Arc<Link>, Feeds) {
        let (tx, rx) = mpsc::channel(OUT_QUEUE);
        let (interest, base) = shared.hub.watch_interest_counted();
        let (settled_tx, settled) = watch::channel(base);
        let history = history.filter(|_| shared.history.is_some());
        let link = Arc::new(Link {
            shared,
            out: tx,
            settled,
            history,
        });
        let feeds = Feeds {
            out: rx,
            interest,
            settle: Settle {
                tx: settled_tx,
                base,
                received: 0,
            },
        };
        (link, feeds)
    }
}

impl Backplane for Link {
    fn subscribed(&self, changes: u64) -> Option<crate::hub::Settled> {
        if !self.shared.up.load(Ordering::Acquire) || *self.settled.borrow() >= changes {
            return None;
        }
        let mut settled = self.settled.clone();
        Some(Box::pin(async move {
            let _ = tokio::time::timeout(SUBSCRIBE_WAIT, settled.wait_for(|n| *n >= changes)).await;
        }))
    }

    fn send(
        &self,
        rooms: &[Arc<str>],
        event: Option<&Arc<str>>,
        payload: &Arc<RawValue>,
        ts: u64,
    ) -> bool {
        // Down: the engine would only queue it (NATS) or fail (Redis);
        // this node's clients get it now instead.
        if !self.shared.up.load(Ordering::Acquire) {
            self.shared.count("unsent");
            return false;
        }
        let Some(out) = self.shared.outgoing(rooms, event, payload, ts) else {
            return false;
        };
        match self.out.try_send(out) {
            Ok(()) => true,
            Err(_) => {
                self.shared.count("unsent");
                false
            }
        }
    }

    fn keeps_history(&self) -> bool {
        self.history.is_some()
    }

    fn fetch_history(&self, topic: &Arc<str>) -> Option<Fetch> {
        Some(self.history.as_ref()?.fetch(topic.clone()))
    }
}

/// How far the subscriber has got: the count of the hub's interest changes
/// whose subscriptions are active on the engine.
pub struct Settle {
    tx: watch::Sender<u64>,
    /// The hub's count when the watch began.
    base: u64,
    /// Changes received since.
    received: u64,
}

impl Settle {
    /// One more interest change received from the hub.
    fn received(&mut self) {
        self.received += 1;
    }

    /// Every change received so far is in effect on the engine.
    fn caught_up(&self) {
        self.tx.send_replace(self.base + self.received);
    }
}

#[derive(Debug)]
struct Entry {
    /// Filters of this node that need it.
    filters: usize,
    /// When the last of them went.
    idle_since: Option<Instant>,
    /// Subscribed on the engine.
    subscribed: bool,
}

/// What this node wants from the engine, by name (a Redis channel or
/// pattern, a NATS subject): how many of its filters need each name, so
/// that overlapping filters share one subscription and a name is left only
/// [`LINGER`] after the last filter needing it went.
struct Wanted<N> {
    names: HashMap<N, Entry>,
}

impl<N: Clone + Eq + Hash> Wanted<N> {
    fn new() -> Self {
        Wanted {
            names: HashMap::new(),
        }
    }

    /// The interest that existed before the watch began (none at start-up).
    /// What a node wants when its subscriber starts: the interest that
    /// existed before the watch began (none at start-up), and what it
    /// follows for its last values whether or not a client wants it.
    fn seeded(shared: &Shared, names_of: impl Fn(&Filter) -> Vec<N>) -> Self {
        let mut wanted = Wanted::new();
        for filter in shared
            .hub
            .active_filters()
            .into_iter()
            .chain(shared.always.iter().cloned())
        {
            wanted.apply(names_of(&filter), true, Instant::now());
        }
        wanted
    }

    /// Follows one interest change (the `names` of its filter); returns
    /// the names to subscribe now.
    fn apply(&mut self, names: Vec<N>, active: bool, now: Instant) -> Vec<N> {
        let mut new = Vec::new();
        for name in names {
            let entry = self.names.entry(name.clone()).or_insert(Entry {
                filters: 0,
                idle_since: None,
                subscribed: false,
            });
            if active {
                entry.filters += 1;
                entry.idle_since = None;
                if !entry.subscribed {
                    new.push(name);
                }
            } else {
                entry.filters = entry.filters.saturating_sub(1);
                if entry.filters == 0 {
                    entry.idle_since = Some(now);
                }
            }
        }
        new
    }

    /// Names nobody here has wanted for [`LINGER`]: forgotten, and
    /// returned if subscribed (to unsubscribe).
    fn expired(&mut self, now: Instant) -> Vec<N> {
        let mut gone = Vec::new();
        self.names.retain(|name, e| {
            let expired = e.filters == 0 && e.idle_since.is_some_and(|t| now >= t + LINGER);
            if expired && e.subscribed {
                gone.push(name.clone());
            }
            !expired
        });
        gone
    }

    /// A new connection with nothing subscribed on it: lingering names are
    /// forgotten; returns every name still wanted.
    fn reset(&mut self) -> Vec<N> {
        self.names.retain(|_, e| e.filters > 0);
        self.names
            .iter_mut()
            .map(|(name, e)| {
                e.subscribed = false;
                name.clone()
            })
            .collect()
    }

    /// Wanted names that are not subscribed (changes made while down).
    fn missing(&self) -> Vec<N> {
        self.names
            .iter()
            .filter(|(_, e)| e.filters > 0 && !e.subscribed)
            .map(|(name, _)| name.clone())
            .collect()
    }

    fn mark(&mut self, names: &[N]) {
        for name in names {
            if let Some(e) = self.names.get_mut(name) {
                e.subscribed = true;
            }
        }
    }

    /// A subscription the engine ended by itself.
    fn unmark(&mut self, name: &N) {
        if let Some(e) = self.names.get_mut(name) {
            e.subscribed = false;
        }
    }

    fn subscribed(&self) -> usize {
        self.names.values().filter(|e| e.subscribed).count()
    }
}

/// One publish on the backplane. Short keys: every byte is sent once per
/// named room and received once per interested node.
#[derive(Serialize, Deserialize)]
pub struct Envelope<'a> {
    /// The origin node's tag (a hash of its `node_id`).
    #[serde(rename = "n")]
    pub node: u64,
    /// The origin node's publish counter.
    #[serde(rename = "s")]
    pub seq: u64,
    #[serde(rename = "r", borrow)]
    pub rooms: Vec<Cow<'a, str>>,
    #[serde(rename = "e", borrow, default, skip_serializing_if = "Option::is_none")]
    pub event: Option<Cow<'a, str>>,
    #[serde(rename = "t")]
    pub ts: u64,
    #[serde(rename = "p", borrow)]
    pub payload: &'a RawValue,
    /// With a history in the engine (added by the engine as it takes the
    /// publish in): each room's offset (0: the room keeps no history)…
    #[serde(rename = "o", default, skip_serializing_if = "Vec::is_empty")]
    pub offsets: Vec<u64>,
    /// …and its epoch,
    #[serde(rename = "h", borrow, default, skip_serializing_if = "Vec::is_empty")]
    pub epochs: Vec<Cow<'a, str>>,
    /// and the publish's place in the cluster-wide sequence, with that
    /// sequence's epoch.
    #[serde(rename = "g", default, skip_serializing_if = "Option::is_none")]
    pub global: Option<u64>,
    #[serde(
        rename = "ge",
        borrow,
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub global_epoch: Option<Cow<'a, str>>,
}

impl Envelope<'_> {
    /// The message this publish is for `topic`, at `position` in its
    /// history, as a history read hands it out.
    pub fn message_for(&self, topic: &Arc<str>, position: Position, seq: Option<Seq>) -> Message {
        let mut msg = Message::with_ts(
            topic.clone(),
            self.event.as_deref().map(Arc::from),
            Arc::from(self.payload.to_owned()),
            self.ts,
        );
        msg.position = Some(position);
        msg.seq = seq;
        msg
    }

    /// Where the engine placed this publish, if it did.
    pub fn placed(&self) -> Option<Placed> {
        if self.offsets.is_empty() {
            return None;
        }
        let positions = self
            .rooms
            .iter()
            .enumerate()
            .map(|(i, _)| match (self.offsets.get(i), self.epochs.get(i)) {
                (Some(&offset), Some(epoch)) if offset > 0 => Some(Position {
                    offset,
                    epoch: Arc::from(&**epoch),
                }),
                _ => None,
            })
            .collect();
        let seq = match (self.global, &self.global_epoch) {
            (Some(n), Some(epoch)) => Some(Seq {
                epoch: Arc::from(&**epoch),
                n,
            }),
            _ => None,
        };
        Some(Placed { positions, seq })
    }
}

/// A publish handed to the engine's writer.
pub struct Outgoing {
    pub rooms: Vec<Arc<str>>,
    pub event: Option<Arc<str>>,
    pub payload: Arc<RawValue>,
    pub ts: u64,
    /// The encoded [`Envelope`].
    pub body: Bytes,
    /// Which of `rooms` keep a history in the engine (empty: none).
    pub tracked: Vec<bool>,
    /// Its number among this node's publishes (the envelope's `s`).
    pub seq: u64,
}

/// What the engine tasks and the hub share.
pub struct Shared {
    pub hub: Arc<Hub>,
    pub metrics: Arc<Metrics>,
    pub prefix: String,
    /// The subscriber holds a connection (publishes go to the engine).
    pub up: AtomicBool,
    /// Filters this node follows whether or not its clients want them: the
    /// MQTT topics that keep a last value, so that a client subscribing
    /// on any node gets the current reading at once.
    pub always: Vec<crate::hub::Filter>,
    /// The history the engine keeps, if `history.topics` is set.
    pub history: Option<HistoryRules>,
    node_tag: u64,
    seq: AtomicU64,
    /// This node's publishes it delivered itself because the engine did
    /// not confirm them in time: the engine may still have carried them,
    /// and a copy that comes back is then dropped (the last 4 096).
    local_only: std::sync::Mutex<Seen>,
    /// Whether `local_only` holds anything (read on every receive, so the
    /// lock is taken only after a failure).
    any_local_only: AtomicBool,
}

impl Shared {
    pub fn new(
        hub: Arc<Hub>,
        metrics: Arc<Metrics>,
        prefix: &str,
        node_id: &str,
        always: Vec<crate::hub::Filter>,
    ) -> Shared {
        Shared {
            hub,
            metrics,
            prefix: prefix.to_string(),
            up: AtomicBool::new(false),
            always,
            history: None,
            node_tag: tag_of(node_id),
            seq: AtomicU64::new(0),
            local_only: std::sync::Mutex::default(),
            any_local_only: AtomicBool::new(false),
        }
    }

    /// Keeps the history of the topics `rules` match in the engine.
    pub fn with_history(mut self, rules: HistoryRules) -> Shared {
        self.history = (!rules.filters.is_empty()).then_some(rules);
        self
    }

    pub fn count(&self, kind: &'static str) {
        self.metrics
            .cluster_messages
            .get_or_create(&[("kind", kind)])
            .inc();
    }

    pub fn set_up(&self, up: bool) {
        self.up.store(up, Ordering::Release);
        self.metrics.cluster_up.set(i64::from(up));
    }

    /// Encodes a publish for the engine.
    fn outgoing(
        &self,
        rooms: &[Arc<str>],
        event: Option<&Arc<str>>,
        payload: &Arc<RawValue>,
        ts: u64,
    ) -> Option<Outgoing> {
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        let envelope = Envelope {
            node: self.node_tag,
            seq,
            rooms: rooms.iter().map(|r| Cow::Borrowed(&**r)).collect(),
            event: event.map(|e| Cow::Borrowed(&**e)),
            ts,
            payload,
            offsets: Vec::new(),
            epochs: Vec::new(),
            global: None,
            global_epoch: None,
        };
        let body = serde_json::to_vec(&envelope).ok()?;
        let tracked = match &self.history {
            Some(rules) if rooms.iter().any(|r| rules.tracks(r)) => {
                rooms.iter().map(|r| rules.tracks(r)).collect()
            }
            _ => Vec::new(),
        };
        Some(Outgoing {
            rooms: rooms.to_vec(),
            event: event.cloned(),
            payload: payload.clone(),
            ts,
            body: Bytes::from(body),
            tracked,
            seq,
        })
    }

    /// A publish that came back from the engine: delivered to this node's
    /// connections unless it is a copy already delivered.
    pub fn receive(&self, body: &[u8], seen: &mut Seen) {
        let Ok(envelope) = serde_json::from_slice::<Envelope<'_>>(body) else {
            self.count("invalid");
            return;
        };
        if !seen.first(envelope.node, envelope.seq) || self.delivered_here(&envelope) {
            self.count("duplicate");
            return;
        }
        self.count("received");
        let rooms: Vec<Arc<str>> = envelope.rooms.iter().map(|r| Arc::from(&**r)).collect();
        let placed = envelope.placed();
        let event = envelope.event.map(|e| Arc::from(&*e));
        let payload: Arc<RawValue> = Arc::from(envelope.payload.to_owned());
        match placed {
            Some(placed) => self
                .hub
                .deliver_placed(&rooms, event, payload, envelope.ts, &placed),
            None => self.hub.deliver_rooms(&rooms, event, payload, envelope.ts),
        };
    }

    /// Whether this node delivered a publish of its own itself (see
    /// `local_only`).
    fn delivered_here(&self, envelope: &Envelope<'_>) -> bool {
        envelope.node == self.node_tag
            && self.any_local_only.load(Ordering::Acquire)
            && self
                .local_only
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .has(envelope.node, envelope.seq)
    }

    /// A publish the engine could not take, or did not confirm in time
    /// (it may have carried it all the same): this node's connections get
    /// it now, and a copy that comes back later is dropped.
    pub fn deliver_here(&self, out: Outgoing) {
        self.local_only
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .first(self.node_tag, out.seq);
        self.any_local_only.store(true, Ordering::Release);
        self.count("unsent");
        self.hub
            .deliver_rooms(&out.rooms, out.event, out.payload, out.ts);
    }

    /// Every publish of `batch`, delivered here (emptied).
    pub fn deliver_all_here(&self, batch: &mut Vec<Outgoing>) {
        for out in batch.drain(..) {
            self.deliver_here(out);
        }
    }

    /// An engine writer's next batch of publishes into `batch`; false when
    /// the node is stopping (what was still queued is then delivered here).
    pub async fn next_batch(
        &self,
        rx: &mut tokio::sync::mpsc::Receiver<Outgoing>,
        batch: &mut Vec<Outgoing>,
        max: usize,
        stop: &tokio_util::sync::CancellationToken,
    ) -> bool {
        let n = tokio::select! {
            _ = stop.cancelled() => 0,
            n = rx.recv_many(batch, max) => n,
        };
        if n == 0 {
            self.deliver_all_here(batch);
        }
        n > 0
    }
}

/// The origin tag of a node: a stable hash of its `node_id`, so copies of
/// one publish are recognised whichever channel brought them.
fn tag_of(node_id: &str) -> u64 {
    // FNV-1a: stable across builds and processes (unlike `DefaultHasher`),
    // and the tag only has to tell a handful of nodes apart.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in node_id.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    // A restarted node starts its counter again: mix in the start time so
    // its new publishes are not taken for copies of its old ones.
    h ^ crate::hub::now_ms().rotate_left(32)
}

/// The last [`SEEN`] publishes a node received, to drop their copies.
/// Copies of one publish arrive close together, so a short window is
/// enough: with Redis they come from one command, or one atomic batch for
/// a broadcast; with NATS a broadcast's copies are published one after the
/// other on the origin's connection, and only what other publishers send
/// meanwhile, or this node's backlog, separates them on arrival (see
/// `nats`).
#[derive(Default)]
pub struct Seen {
    order: VecDeque<(u64, u64)>,
    set: HashSet<(u64, u64)>,
}

impl Seen {
    /// Whether `(node, seq)` is within the window, without recording it.
    pub fn has(&self, node: u64, seq: u64) -> bool {
        self.set.contains(&(node, seq))
    }

    /// True the first time `(node, seq)` is seen within the window.
    pub fn first(&mut self, node: u64, seq: u64) -> bool {
        if !self.set.insert((node, seq)) {
            return false;
        }
        self.order.push_back((node, seq));
        if self.order.len() > SEEN
            && let Some(old) = self.order.pop_front()
        {
            self.set.remove(&old);
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seen_drops_copies_and_stays_bounded() {
        let mut seen = Seen::default();
        assert!(seen.first(1, 1));
        assert!(!seen.first(1, 1));
        assert!(seen.first(2, 1));
        for n in 0..10_000 {
            seen.first(3, n);
        }
        assert!(seen.set.len() <= SEEN && seen.order.len() <= SEEN);
        assert!(seen.first(1, 1), "forgotten after the window");
    }

    #[test]
    fn envelopes_round_trip() {
        let payload = RawValue::from_string(r#"{"a":[1,2]}"#.into()).unwrap();
        let shared = Shared::new(
            Arc::new(Hub::new(Arc::new(Metrics::new()))),
            Arc::new(Metrics::new()),
            "p",
            "n1",
            Vec::new(),
        );
        let out = shared
            .outgoing(
                &["r1".into(), "r/2".into()],
                Some(&"ev".into()),
                &Arc::from(payload),
                7,
            )
            .unwrap();
        let e: Envelope<'_> = serde_json::from_slice(&out.body).unwrap();
        assert_eq!(e.rooms, ["r1", "r/2"]);
        assert_eq!(e.event.as_deref(), Some("ev"));
        assert_eq!((e.ts, e.payload.get()), (7, r#"{"a":[1,2]}"#));
    }
}
