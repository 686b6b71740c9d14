//! A connection's outbound queue: replies and control frames it has handed
//! over and the socket has not taken yet, and its [`Reader`] into the
//! rings of its subscriptions, where published messages wait.
//!
//! The queue is a `VecDeque` behind a mutex plus one waker, not a channel,
//! because a channel allocates its first block of slots for every
//! connection up front; an empty `VecDeque` allocates nothing, and an idle
//! connection is the common case. A push wakes the connection's task at
//! most once until the task next polls. [`Outbox::take`] hands the writer
//! the replies first, then every message published since, for one
//! vectored write.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::task::Waker;

use bytes::Bytes;
use futures_util::task::AtomicWaker;

use super::close;
use super::encoding::{self, Encoding};
use crate::hub::{Message, Reader, Recipient};
use crate::metrics::Metrics;

/// One item to write.
pub enum Outbound {
    /// A published message in a wire format, framed once for every
    /// recipient of that format (see [`encoding`]).
    Message(Arc<Message>, &'static dyn Encoding),
    /// A reply or control frame, already framed.
    Frame(Bytes),
    /// A constant frame (a keepalive ping).
    Static(&'static [u8]),
}

impl Outbound {
    /// The bytes to write; `Message` frames on first use.
    pub fn bytes(&self) -> &[u8] {
        match self {
            Outbound::Message(msg, how) => encoding::frame(msg, *how),
            Outbound::Frame(bytes) => bytes,
            Outbound::Static(bytes) => bytes,
        }
    }

    /// A published message (dropped when the connection closes), as
    /// opposed to a reply.
    pub fn is_message(&self) -> bool {
        matches!(self, Outbound::Message(..))
    }
}

/// Why a connection ends: a close frame to send, or `None` to just drop it.
pub type CloseReason = Option<(u16, &'static str)>;

struct Queue {
    items: VecDeque<Outbound>,
    /// The largest replay (last values, missed messages) queued since the
    /// writer last took the queue: the queue may hold that many items
    /// beyond its limit, so that a replay larger than the limit still
    /// reaches a client that reads. Every item counts, replayed or not: a
    /// client that stops reading and asks for replay after replay (`sub #`,
    /// `unsub #`, again) is closed as a slow consumer within two replays,
    /// so what it makes the server hold is bounded by the limit and the
    /// largest replay, not by their product.
    excess: usize,
    /// Set once; the first reason wins.
    closing: Option<CloseReason>,
}

pub struct Outbox {
    queue: Mutex<Queue>,
    waker: AtomicWaker,
    /// The connection's cursors into its subscriptions' rings (the hub
    /// adds and removes them). Never locked together with `queue`.
    reader: Mutex<Reader>,
    /// More queued items than this closes the connection as a slow consumer.
    limit: usize,
    /// How published messages are written.
    encoding: &'static dyn Encoding,
    /// A second reader, for an Engine.IO connection that has a socket in a
    /// second namespace (see [`Lane`]).
    lane: OnceLock<Arc<Lane>>,
    metrics: Arc<Metrics>,
}

/// The cursors of a second socket on the same connection: a Socket.IO
/// client may have a socket in the root namespace and one in the
/// notifications namespace over one Engine.IO connection. Each is its own
/// hub connection (its own rooms, each publish once per socket), but both
/// are written by the connection's one task, in their own namespace, so
/// the lane shares the outbox's queue, waker and limit.
struct Lane {
    reader: Mutex<Reader>,
    encoding: &'static dyn Encoding,
}

/// The hub's handle on an outbox's [`Lane`].
struct LaneRecipient {
    outbox: Arc<Outbox>,
    lane: Arc<Lane>,
}

impl Outbox {
    /// An outbox of at most `limit` unread items whose published messages
    /// are written in `encoding`.
    pub fn new(limit: usize, metrics: Arc<Metrics>, encoding: &'static dyn Encoding) -> Self {
        Outbox {
            queue: Mutex::new(Queue {
                items: VecDeque::new(),
                excess: 0,
                closing: None,
            }),
            waker: AtomicWaker::new(),
            reader: Mutex::new(Reader::new(limit)),
            limit,
            encoding,
            lane: OnceLock::new(),
            metrics,
        }
    }

    /// Registers this outbox's second lane in the hub, its published
    /// messages written in `encoding`; returns its hub id.
    /// An outbox has at most one lane: a second call registers nothing and
    /// returns `None`.
    pub fn add_lane(
        self: &Arc<Self>,
        hub: &crate::hub::Hub,
        encoding: &'static dyn Encoding,
    ) -> Option<crate::hub::ConnId> {
        let lane = Arc::new(Lane {
            reader: Mutex::new(Reader::new(self.limit)),
            encoding,
        });
        self.lane.set(lane.clone()).ok()?;
        Some(hub.register(Arc::new(LaneRecipient {
            outbox: self.clone(),
            lane,
        })))
    }

    fn lane_reader(&self) -> Option<(MutexGuard<'_, Reader>, &'static dyn Encoding)> {
        let lane = self.lane.get()?;
        Some((
            lane.reader.lock().unwrap_or_else(|e| e.into_inner()),
            lane.encoding,
        ))
    }

    // Nothing panics while holding the lock, so a poisoned queue is intact.
    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues a reply or control frame; false once the connection is closing.
    /// Messages published before it are moved to the queue first, so the
    /// reply does not overtake them (a `pub` echo comes before its ack).
    pub fn push(&self, item: Outbound) -> bool {
        let Some(mut items) = self.pending() else {
            return false;
        };
        if items.is_empty() {
            return self.push_all(std::iter::once(item), 0);
        }
        items.push(item);
        self.push_all(items.into_iter(), 0)
    }

    /// What the rings hold for this connection, taken out of them, so that
    /// it goes into the queue ahead of what is queued next: a reply, a
    /// last-value replay, or nothing when a subscription it came through
    /// is dropped (see `hub::Subscribers::remove`). `None` if the
    /// connection fell too far behind (it is then closing).
    fn pending(&self) -> Option<Vec<Outbound>> {
        let mut items = Vec::new();
        let mut collected = self
            .reader()
            .collect(None, |msg| items.push(self.outbound(msg)));
        if let (Ok(_), Some((mut lane, nsp))) = (&collected, self.lane_reader()) {
            collected = lane.collect(None, |msg| items.push(Outbound::Message(msg, nsp)));
        }
        match collected {
            Ok(_) => Some(items),
            Err(_) => {
                self.lagged();
                None
            }
        }
    }

    /// Queues items in order, the last `replay` of them a replay (see
    /// [`Queue::excess`]); false, and the connection closes as a slow
    /// consumer, when the queue is at its limit already.
    fn push_all(&self, items: impl ExactSizeIterator<Item = Outbound>, replay: usize) -> bool {
        {
            let mut q = self.lock();
            if q.closing.is_some() {
                return false;
            }
            if q.items.len() >= self.limit.saturating_add(q.excess) {
                q.closing = Some(Some((close::TRY_AGAIN_LATER, "slow consumer")));
                drop(q);
                self.metrics.slow_consumer_closes.inc();
                self.waker.wake();
                return false;
            }
            q.excess = q.excess.max(replay);
            q.items.extend(items);
        }
        self.waker.wake();
        true
    }

    /// Asks the connection to end; the first reason given wins.
    pub fn close(&self, reason: CloseReason) {
        let mut q = self.lock();
        if q.closing.is_none() {
            q.closing = Some(reason);
            drop(q);
            self.waker.wake();
        }
    }

    /// Registers the connection task to be woken by the next push or close.
    pub fn register(&self, waker: &std::task::Waker) {
        self.waker.register(waker);
    }

    fn reader(&self) -> MutexGuard<'_, Reader> {
        self.reader.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Moves to the back of `into` everything queued, then every message
    /// published since the last call; returns the close request, if any.
    /// With nothing new, `waker` is woken by the next publish. Swapping
    /// into an empty `into` keeps both deques' capacity, so a busy
    /// connection does not allocate per batch.
    pub fn take(&self, into: &mut VecDeque<Outbound>, waker: &Waker) -> Option<CloseReason> {
        {
            let mut q = self.lock();
            if into.is_empty() {
                std::mem::swap(&mut q.items, into);
            } else {
                into.append(&mut q.items);
            }
            q.excess = 0;
            if q.closing.is_some() {
                return q.closing;
            }
        }
        let mut collected = self
            .reader()
            .collect(Some(waker), |msg| into.push_back(self.outbound(msg)));
        if let (Ok(_), Some((mut lane, nsp))) = (&collected, self.lane_reader()) {
            collected = lane.collect(Some(waker), |msg| {
                into.push_back(Outbound::Message(msg, nsp))
            });
        }
        collected.err().map(|_| self.lagged())
    }

    /// The close request, if any, without taking anything; a connection
    /// whose rings dropped messages it had not read is closed as a slow
    /// consumer.
    pub fn close_requested(&self) -> Option<CloseReason> {
        let closing = self.lock().closing;
        if closing.is_none()
            && (self.reader().lagged() || self.lane_reader().is_some_and(|(r, _)| r.lagged()))
        {
            return Some(self.lagged());
        }
        closing
    }

    /// For a writer whose socket is full: the next publish wakes `waker`,
    /// so the connection learns if it falls too far behind. Returns the
    /// close request, if it already has.
    pub fn park(&self, waker: &Waker) -> Option<CloseReason> {
        let mut parked = self.reader().park(waker);
        if let (Ok(()), Some((lane, _))) = (&parked, self.lane_reader()) {
            parked = lane.park(waker);
        }
        parked.err().map(|_| self.lagged())
    }

    fn lagged(&self) -> CloseReason {
        let reason = Some((close::TRY_AGAIN_LATER, "slow consumer"));
        let mut q = self.lock();
        if q.closing.is_none() {
            q.closing = Some(reason);
            self.metrics.slow_consumer_closes.inc();
        }
        q.closing.unwrap_or(reason)
    }
}

impl Outbox {
    fn outbound(&self, msg: Arc<Message>) -> Outbound {
        Outbound::Message(msg, self.encoding)
    }
}

impl Recipient for Outbox {
    /// A replay: behind what the rings already hold for this connection,
    /// each item counted (see [`Queue::excess`]).
    fn deliver_batch(&self, msgs: Vec<Arc<Message>>) -> bool {
        let Some(mut items) = self.pending() else {
            return false;
        };
        let replay = msgs.len();
        items.extend(msgs.into_iter().map(|m| self.outbound(m)));
        self.push_all(items.into_iter(), replay)
    }

    fn shutdown(&self) {
        self.close(Some((close::GOING_AWAY, "server shutting down")));
    }

    fn reader(&self) -> &Mutex<Reader> {
        &self.reader
    }

    fn flush(&self) {
        if let Some(items) = self.pending()
            && !items.is_empty()
        {
            self.push_all(items.into_iter(), 0);
        }
    }
}

impl Recipient for LaneRecipient {
    fn deliver_batch(&self, msgs: Vec<Arc<Message>>) -> bool {
        let Some(mut items) = self.outbox.pending() else {
            return false;
        };
        let replay = msgs.len();
        let encoding = self.lane.encoding;
        items.extend(msgs.into_iter().map(|m| Outbound::Message(m, encoding)));
        self.outbox.push_all(items.into_iter(), replay)
    }

    fn reader(&self) -> &Mutex<Reader> {
        &self.lane.reader
    }

    fn flush(&self) {
        self.outbox.flush();
    }

    // The outbox's own registration carries the shutdown.
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::payload_of;
    use crate::transport::encoding::TEST_ENCODING;

    fn msg() -> Arc<Message> {
        Arc::new(Message::new("t".into(), None, payload_of(&1)))
    }

    #[test]
    fn a_replay_larger_than_the_limit_is_taken_and_counted_item_by_item() {
        let outbox = Outbox::new(3, Arc::new(Metrics::new()), &TEST_ENCODING);
        // Ten replayed items in a queue of three: the queue may now hold
        // three more than the replay.
        assert!(outbox.deliver_batch((0..10).map(|_| msg()).collect()));
        assert!(outbox.push(Outbound::Frame(Bytes::from_static(b"ack"))));
        assert!(outbox.push(Outbound::Message(msg(), &TEST_ENCODING)));
        assert!(outbox.push(Outbound::Message(msg(), &TEST_ENCODING)));
        assert!(!outbox.push(Outbound::Message(msg(), &TEST_ENCODING)));
        assert_eq!(
            outbox.close_requested(),
            Some(Some((close::TRY_AGAIN_LATER, "slow consumer")))
        );
        let mut taken = VecDeque::new();
        assert!(outbox.take(&mut taken, Waker::noop()).is_some());
        assert_eq!(taken.len(), 13);
    }

    /// A client that does not read and asks for the same replay again and
    /// again is closed at the second one that finds the queue full: what it
    /// holds is bounded by the limit and the replay, not by their product.
    #[test]
    fn repeated_replays_to_a_client_that_does_not_read_close_it() {
        let metrics = Arc::new(Metrics::new());
        let outbox = Outbox::new(4, metrics.clone(), &TEST_ENCODING);
        let replay = || (0..100).map(|_| msg()).collect::<Vec<_>>();
        assert!(outbox.deliver_batch(replay()));
        assert!(outbox.deliver_batch(replay()), "100 queued < 4 + 100");
        assert!(!outbox.deliver_batch(replay()), "200 queued: full");
        assert_eq!(metrics.slow_consumer_closes.get(), 1);
        let mut taken = VecDeque::new();
        assert!(outbox.take(&mut taken, Waker::noop()).is_some());
        assert_eq!(taken.len(), 200);
    }

    #[test]
    fn taking_resets_the_count() {
        let outbox = Outbox::new(2, Arc::new(Metrics::new()), &TEST_ENCODING);
        let mut taken = VecDeque::new();
        for _ in 0..5 {
            assert!(outbox.deliver_batch(vec![msg(), msg(), msg()]));
            assert!(outbox.push(Outbound::Message(msg(), &TEST_ENCODING)));
            assert_eq!(outbox.take(&mut taken, Waker::noop()), None);
            taken.clear();
        }
    }

    use crate::hub::{ConnId, Filter, Hub};

    fn hub(metrics: &Arc<Metrics>) -> Hub {
        Hub::new(metrics.clone())
            .with_ring_capacity(100)
            .with_last_values(vec![Filter::parse("a/#").unwrap()], 10, 1 << 20)
    }

    fn publish(hub: &Hub, topic: &str, n: i64) {
        hub.publish(Message::new(topic.into(), None, payload_of(&n)));
    }

    /// A hub and one registered outbox of `limit`, subscribed to `filters`.
    fn connected(limit: usize, filters: &[&str]) -> (Hub, Arc<Outbox>, ConnId, Arc<Metrics>) {
        let metrics = Arc::new(Metrics::new());
        let hub = hub(&metrics);
        let outbox = Arc::new(Outbox::new(limit, metrics.clone(), &TEST_ENCODING));
        let id = hub.register(outbox.clone());
        for f in filters {
            hub.subscribe(id, &Filter::parse(f).unwrap(), 10).unwrap();
        }
        (hub, outbox, id, metrics)
    }

    /// `topic=payload` of each published message taken, `reply` for others.
    fn taken(outbox: &Outbox) -> (Vec<String>, Option<CloseReason>) {
        let mut items = VecDeque::new();
        let closing = outbox.take(&mut items, Waker::noop());
        let names = items
            .iter()
            .map(|item| match item {
                Outbound::Message(m, _) => format!("{}={}", m.topic, m.payload.get()),
                _ => "reply".to_string(),
            })
            .collect();
        (names, closing)
    }

    #[test]
    fn the_limit_bounds_what_a_connection_is_behind_over_all_its_subscriptions() {
        let (hub, outbox, _, metrics) = connected(4, &["x", "y", "z"]);
        for t in ["x", "y"] {
            publish(&hub, t, 1);
            publish(&hub, t, 2);
        }
        assert_eq!(outbox.close_requested(), None, "4 behind: at the limit");
        publish(&hub, "z", 1);
        // No ring is anywhere near its capacity of 100.
        let slow = Some(Some((close::TRY_AGAIN_LATER, "slow consumer")));
        assert_eq!(outbox.close_requested(), slow);
        assert_eq!(taken(&outbox).1, slow);
        assert_eq!(metrics.slow_consumer_closes.get(), 1);
    }

    #[test]
    fn replies_do_not_overtake_messages_published_before_them() {
        let (hub, outbox, _, _) = connected(16, &["t"]);
        publish(&hub, "t", 1);
        outbox.push(Outbound::Frame(Bytes::from_static(b"ack")));
        publish(&hub, "t", 2);
        assert_eq!(taken(&outbox).0, ["t=1", "reply", "t=2"]);
    }

    #[test]
    fn leaving_a_wildcard_keeps_a_kept_value_it_alone_had_delivered() {
        let (hub, outbox, id, _) = connected(16, &[]);
        let (wild, exact) = (Filter::parse("a/+").unwrap(), Filter::parse("a/x").unwrap());
        hub.subscribe(id, &wild, 10).unwrap();
        publish(&hub, "a/x", 7);
        // Not replayed: the wildcard already got it (still unread).
        hub.subscribe_with_last_values(id, &exact, 10, || {})
            .unwrap();
        hub.unsubscribe(id, &wild);
        publish(&hub, "a/x", 8);
        assert_eq!(taken(&outbox).0, ["a/x=7", "a/x=8"]);
    }

    #[test]
    fn messages_moved_ahead_of_replies_count_against_the_limit() {
        let (hub, outbox, _, _) = connected(4, &["t"]);
        let reply = || Outbound::Frame(Bytes::from_static(b"ack"));
        for n in 0..3 {
            publish(&hub, "t", n);
        }
        // A client that does not read but keeps asking: three messages and
        // a reply are four items, the limit.
        assert!(outbox.push(reply()));
        publish(&hub, "t", 3);
        assert!(!outbox.push(reply()));
        assert_eq!(
            outbox.close_requested(),
            Some(Some((close::TRY_AGAIN_LATER, "slow consumer")))
        );
    }

    #[test]
    fn one_publish_through_several_subscriptions_counts_once_against_the_limit() {
        let (hub, outbox, _, _) = connected(4, &["a/x", "a/+", "a/#"]);
        for n in 0..4 {
            publish(&hub, "a/x", n);
        }
        // Twelve copies in three rings, four publishes: at the limit.
        assert_eq!(outbox.close_requested(), None);
        assert_eq!(taken(&outbox).0, ["a/x=0", "a/x=1", "a/x=2", "a/x=3"]);
        for n in 0..5 {
            publish(&hub, "a/x", n);
        }
        assert!(outbox.close_requested().is_some(), "five publishes behind");
    }

    #[test]
    fn a_last_value_replay_comes_after_messages_published_before_it() {
        let (hub, outbox, id, _) = connected(16, &["b"]);
        publish(&hub, "b", 1);
        publish(&hub, "a/x", 2);
        hub.subscribe_with_last_values(id, &Filter::parse("a/x").unwrap(), 10, || {})
            .unwrap();
        assert_eq!(taken(&outbox).0, ["b=1", "a/x=2"]);
    }
}
