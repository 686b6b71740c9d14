//! The NATS backplane: one client connection that publishes and
//! subscribes, with one subscription per subject this node's clients want
//! ([`channel::nats_subjects`]).
//!
//! - **Publishing.** A writer task takes queued publishes in batches and
//!   hands each one to the connection once per named room, in order, then
//!   flushes. There is no transaction as Redis's MULTI/EXEC: the copies of
//!   one broadcast leave one after the other and may arrive interleaved with
//!   other publishers' messages; [`Seen`]'s window still catches them, as
//!   long as fewer than its 4 096 messages reach the node between two copies.
//! - **Order.** Core NATS keeps only each publisher's order: two nodes
//!   publishing on one topic at the same instant could reach two
//!   subscribers in different orders (the server fans each publisher's
//!   messages out on its own). So nodes do not publish on the subjects
//!   they subscribe to: they publish on `<prefix>.in.…`, a JetStream
//!   stream of the cluster's own ([`stream_config`], in memory, keeping
//!   only a little) takes every such message in, one after the other, and
//!   republishes it on `<prefix>.t.…` from its one internal connection.
//!   Every subscriber receives what one connection sent, in the order it
//!   sent it: one order for the whole cluster, as Redis gives. A node
//!   delivers its own publishes when they come back, as with Redis, and
//!   every connection on one node sees the order the node received
//!   (see `Routes`). The server must run JetStream (`nats-server -js`);
//!   the node creates the stream, or updates it, each time it connects.
//! - **Up and down.** async-nats reconnects by itself (with the backoff
//!   below) and subscribes its subscriptions again; the node follows the
//!   connection's state: while it is not connected publishes are delivered
//!   locally and counted `unsent`, and once it is connected again the node
//!   subscribes what its clients came to want meanwhile and makes a round
//!   trip before it says `up` again.
//! - **Acks after the subscription.** A client's `sub` ack waits until the
//!   subscriptions made for it are active on the server: after subscribing,
//!   the node sends a request nobody answers, and the server's "no
//!   responders" comes back only once it has processed everything sent
//!   before it on the connection. (A flush only says the bytes left.) With
//!   a cluster of NATS servers, a subscription reaches the other servers a
//!   moment later: a publish through another server in that moment can
//!   miss it.
//!
//! [`channel::nats_subjects`]: super::channel::nats_subjects

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::future::poll_fn;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

use async_nats::connection::State;
use async_nats::{Client, ConnectOptions, Event, Message, RequestErrorKind};
use bytes::Bytes;
use futures_util::StreamExt;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::channel::{nats_ingest_subject, nats_subjects};
use super::nats_history::{NatsHistory, Writes};
use super::nats_sessions::{NatsSessions, SessionOp};
use super::{Feeds, HistorySource, Link, Outgoing, Seen, Settle, Shared, Wanted};
use crate::hub::Interest;

/// Publishes handed to the connection per batch, at most.
const BATCH: usize = 256;
/// How long one engine command (a connection, a publish, a flush, a
/// subscription, a round trip) may take.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(3);
/// The connection is pinged this often; async-nats drops one that leaves
/// two pings unanswered (half dead) and reconnects.
const PING_EVERY: Duration = Duration::from_secs(5);
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Messages one subscription holds for the subscriber task; past this
/// NATS drops the subscription's messages (a slow consumer).
const SUB_QUEUE: usize = 4096;
/// Messages read from one subscription before the others get their turn.
const TURN: usize = 64;
/// Copies set aside until their first copy is seen (see [`Routes`]).
const PARKED: usize = 1024;
/// Connection events waiting for the subscriber task; the state is read
/// again on every tick, so a dropped event only delays it.
const EVENTS: usize = 64;
const TICK: Duration = Duration::from_millis(250);
/// What the ordering stream keeps, at most: it exists to number and
/// republish, not to store, so one message per subject for a minute, and
/// a bound on the whole.
const STREAM_MSGS: u64 = 10_000;
const STREAM_BYTES: u64 = 64 * 1024 * 1024;
const STREAM_AGE: Duration = Duration::from_secs(60);

/// The cluster's ordering stream: it takes in what nodes publish on
/// `<prefix>.in.>` and republishes each message, in the stream's order,
/// on the same subject under `<prefix>.t`. Kept in memory: losing it loses
/// nothing but a minute of last messages, which only the stream reads.
pub fn stream_config(prefix: &str) -> serde_json::Value {
    serde_json::json!({
        "name": format!("{prefix}-backplane"),
        "subjects": [format!("{prefix}.in.>")],
        "storage": "memory",
        "retention": "limits",
        "discard": "old",
        "num_replicas": 1,
        "max_msgs_per_subject": 1,
        "max_msgs": STREAM_MSGS,
        "max_bytes": STREAM_BYTES,
        "max_age": u64::try_from(STREAM_AGE.as_nanos()).unwrap_or(u64::MAX),
        "republish": {
            "src": format!("{prefix}.in.>"),
            "dest": format!("{prefix}.t.>"),
        },
    })
}

/// What [`Tasks::run`] needs to connect and start the writer and the
/// subscriber.
pub struct Tasks {
    url: String,
    name: String,
    shared: Arc<Shared>,
    feeds: Feeds,
    /// The history in JetStream, when `history.topics` is set.
    history: Option<Arc<NatsHistory>>,
    /// Socket.IO recovery sessions in JetStream, with the history.
    sessions: Option<(Arc<NatsSessions>, mpsc::Receiver<SessionOp>)>,
}

/// Checks `url` and prepares the backplane; nothing connects before
/// [`Tasks::run`]. Interest is followed from now on.
pub fn prepare(
    url: &str,
    node_id: &str,
    shared: Arc<Shared>,
) -> Result<(Arc<Link>, Tasks), String> {
    url.parse::<async_nats::ServerAddr>()
        .map_err(|e| e.to_string())?;
    let history = shared
        .history
        .clone()
        .map(|rules| Arc::new(NatsHistory::new(&shared.prefix, rules)));
    let source = history.clone().map(|h| h as Arc<dyn HistorySource>);
    let (link, feeds) = Link::new(shared.clone(), source);
    let sessions = NatsSessions::prepare(&shared);
    Ok((
        link,
        Tasks {
            url: url.to_string(),
            name: format!("pulso {node_id}"),
            shared,
            feeds,
            history,
            sessions,
        },
    ))
}

/// The delay before the `attempt`-th connection attempt in a row: none for
/// the first, then doubling up to [`BACKOFF_MAX`].
fn backoff(attempt: usize) -> Duration {
    match attempt {
        0 | 1 => Duration::ZERO,
        n => {
            let doublings = u32::try_from(n - 2).unwrap_or(u32::MAX).min(16);
            (BACKOFF_MIN * 2u32.pow(doublings)).min(BACKOFF_MAX)
        }
    }
}

impl Tasks {
    /// Where Socket.IO recovery sessions are shared (with the history on).
    pub fn sessions(&self) -> Option<Arc<dyn crate::gateway::SharedSessions>> {
        self.sessions
            .as_ref()
            .map(|(s, _)| s.clone() as Arc<dyn crate::gateway::SharedSessions>)
    }

    /// Connects (retrying in the background until NATS answers) and runs
    /// the writer and the subscriber until `stop`.
    pub async fn run(self, stop: CancellationToken) {
        let (events_tx, events) = mpsc::channel(EVENTS);
        let options = ConnectOptions::new()
            .name(&self.name)
            // Start even while NATS is unreachable: the node serves its own
            // clients meanwhile (SPEC §8).
            .retry_on_initial_connect()
            .max_reconnects(None)
            .reconnect_delay_callback(backoff)
            .connection_timeout(COMMAND_TIMEOUT)
            .request_timeout(Some(COMMAND_TIMEOUT))
            .ping_interval(PING_EVERY)
            .subscription_capacity(SUB_QUEUE)
            .event_callback(move |event| {
                let tx = events_tx.clone();
                async move {
                    let _ = tx.try_send(event);
                }
            });
        let client = match async_nats::connect_with_options(self.url.as_str(), options).await {
            Ok(client) => client,
            Err(e) => {
                // Only a malformed address fails here, and `prepare`
                // checked it: the node stays a single node.
                tracing::error!(error = %e, "NATS backplane not started");
                return;
            }
        };
        let Feeds {
            out,
            interest,
            settle,
        } = self.feeds;
        if let Some(history) = &self.history {
            history.set_client(client.clone());
        }
        if let Some((sessions, ops)) = self.sessions {
            tokio::spawn(sessions.run(client.clone(), ops, stop.clone()));
        }
        let writer = tokio::spawn(writer(
            client.clone(),
            self.shared.clone(),
            self.history.clone(),
            out,
            stop.clone(),
        ));
        let wanted = Wanted::seeded(&self.shared, |f| nats_subjects(&self.shared.prefix, f));
        let subscriber = Subscriber {
            sync_subject: format!("{}.sync", self.shared.prefix),
            client,
            shared: self.shared,
            wanted,
            seen: Seen::default(),
            settle,
            interest,
            events,
            registry: Registry::default(),
            up: false,
            connects: 0,
            retry_at: Instant::now(),
            backoff: BACKOFF_MIN,
            warned_slow: None,
            history: self.history,
        };
        subscriber.run(stop).await;
        let _ = writer.await;
    }
}

async fn timed<T, E: std::fmt::Display>(
    what: &str,
    f: impl Future<Output = Result<T, E>>,
) -> Result<T, String> {
    match tokio::time::timeout(COMMAND_TIMEOUT, f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(format!("{what}: {e}")),
        Err(_) => Err(format!("{what}: timed out")),
    }
}

async fn writer(
    client: Client,
    shared: Arc<Shared>,
    history: Option<Arc<NatsHistory>>,
    mut rx: mpsc::Receiver<Outgoing>,
    stop: CancellationToken,
) {
    let mut batch = Vec::with_capacity(BATCH);
    let mut writes = Writes::default();
    let mut connects = 0;
    while shared.next_batch(&mut rx, &mut batch, BATCH, &stop).await {
        // Handed to a client that is not connected, a publish would wait in
        // its queue for the next connection: deliver it here now instead.
        if client.connection_state() != State::Connected {
            shared.deliver_all_here(&mut batch);
            continue;
        }
        // Another connection may reach another incarnation of the history
        // stream: its topics' last messages are read again.
        let now = client.statistics().connects.load(Ordering::Relaxed);
        if now != connects {
            connects = now;
            writes = Writes::default();
        }
        let max = client.max_payload();
        let mut failed: Option<String> = None;
        for out in batch.drain(..) {
            if failed.is_some() {
                shared.deliver_here(out);
                continue;
            }
            if out.body.len() > max {
                tracing::warn!(
                    bytes = out.body.len(),
                    max_payload = max,
                    "publish larger than the NATS server's max_payload; delivered on this node only"
                );
                shared.deliver_here(out);
                continue;
            }
            // One copy per named room, in order, on the one connection; a
            // room that keeps a history stores its copy in the history
            // stream instead, which republishes it. A store waits for
            // NATS's answer, and the next publish waits for it: a socket in
            // several rooms gets a node's publishes in the order they were
            // made.
            let mut handed = 0;
            for (i, room) in out.rooms.iter().enumerate() {
                let sent = match &history {
                    Some(h) if out.tracked.get(i).copied().unwrap_or(false) => {
                        match h.store(&client, writes.take(room), &out, i).await {
                            Ok(last) => {
                                writes.put(room.clone(), Some(last));
                                Ok(())
                            }
                            Err(e) => Err(format!("history: {e}")),
                        }
                    }
                    _ => {
                        let subject = nats_ingest_subject(&shared.prefix, room);
                        timed("publish", client.publish(subject, out.body.clone())).await
                    }
                };
                match sent {
                    Ok(()) => handed += 1,
                    Err(e) => {
                        failed = Some(e);
                        break;
                    }
                }
            }
            // A copy the client took is sent once it can be, and comes
            // back here: only a publish none of whose copies it took is
            // delivered here.
            if handed == 0 {
                shared.deliver_here(out);
            } else {
                shared.count("sent");
            }
        }
        if failed.is_none()
            && let Err(e) = timed("flush", client.flush()).await
        {
            failed = Some(e);
        }
        if let Some(why) = failed {
            tracing::warn!(error = %why, "backplane publish failed; delivered on this node only");
        }
    }
}

/// Which subscriptions have something to read, in the order they woke.
#[derive(Default)]
struct Ready {
    state: Mutex<ReadyState>,
}

#[derive(Default)]
struct ReadyState {
    ids: Vec<u64>,
    /// The subscriber task, to wake when an id is added.
    task: Option<Waker>,
}

impl Ready {
    fn lock(&self) -> std::sync::MutexGuard<'_, ReadyState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn push(&self, id: u64) {
        let task = {
            let mut state = self.lock();
            state.ids.push(id);
            state.task.take()
        };
        if let Some(task) = task {
            task.wake();
        }
    }
}

/// The waker given to one subscription's queue: it names the
/// subscription, so the task reads only those that have something.
struct SubWaker {
    id: u64,
    ready: Arc<Ready>,
}

impl Wake for SubWaker {
    fn wake(self: Arc<Self>) {
        self.ready.push(self.id);
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.ready.push(self.id);
    }
}

struct Sub {
    subject: String,
    inner: async_nats::Subscriber,
    waker: Waker,
}

/// A copy that came through a younger subscription before its first copy
/// was seen.
struct Parked {
    /// The subscription its subject is taken from.
    first: u64,
    node: u64,
    seq: u64,
    payload: Bytes,
}

/// What to do with a message read from a subscription.
#[derive(Debug, PartialEq)]
enum Take {
    /// Hand it to the hub (which drops it if [`Seen`]).
    Deliver(Bytes),
    /// A copy whose first copy was delivered.
    Duplicate,
    /// Not an envelope.
    Invalid,
    /// Set aside until its first subscription delivers it or goes.
    Parked,
}

/// Which subscription each subject is taken from.
///
/// async-nats gives every subscription its own queue, so the order in
/// which the connection received messages is lost across subscriptions;
/// within one it is kept. So every message of a subject is taken from one
/// subscription only, the oldest that matches it (the subject's *first*
/// subscription): a younger subscription matching the same subject (`#`
/// besides `news`, say) was subscribed later on the same connection, so it
/// receives a part of what the first one receives, and taking a message
/// from it could overtake an older one still queued in the first. Its
/// copies are dropped once their first copy was seen, and set aside until
/// then; when the first subscription goes, what it still holds is taken,
/// then the copies set aside for it that nobody delivered.
#[derive(Default)]
struct Routes {
    by_subject: HashMap<String, u64>,
    /// Subscriptions with a `*` or `>`, oldest first.
    wild: BTreeMap<u64, String>,
    parked: VecDeque<Parked>,
}

impl Routes {
    /// Subscription `id` (younger than every other) takes `subject`.
    fn add(&mut self, id: u64, subject: &str) {
        if is_pattern(subject) {
            self.wild.insert(id, subject.to_string());
        }
        self.by_subject.insert(subject.to_string(), id);
    }

    fn remove(&mut self, id: u64, subject: &str) {
        self.wild.remove(&id);
        if self.by_subject.get(subject) == Some(&id) {
            self.by_subject.remove(subject);
        }
    }

    /// The first subscription of a published subject: the oldest matching.
    fn first(&self, subject: &str) -> Option<u64> {
        let exact = self.by_subject.get(subject).copied();
        let wild = self
            .wild
            .iter()
            .take_while(|(id, _)| exact.is_none_or(|e| **id < e))
            .find(|(_, pattern)| subject_matches(pattern, subject))
            .map(|(id, _)| *id);
        wild.or(exact)
    }

    /// A message read from subscription `via`.
    fn take(&mut self, via: u64, msg: Message, seen: &Seen) -> Take {
        let first = self.first(msg.subject.as_str()).unwrap_or(via);
        if first == via {
            return Take::Deliver(msg.payload);
        }
        let Some((node, seq)) = origin(&msg.payload) else {
            return Take::Invalid;
        };
        if seen.has(node, seq) {
            return Take::Duplicate;
        }
        // The oldest copies go first when full: their first copy has long
        // arrived.
        while self.parked.front().is_some_and(|p| seen.has(p.node, p.seq)) {
            self.parked.pop_front();
        }
        if self.parked.len() >= PARKED {
            self.parked.pop_front();
        }
        self.parked.push_back(Parked {
            first,
            node,
            seq,
            payload: msg.payload,
        });
        Take::Parked
    }

    /// Subscription `id` is gone (`subject`): the copies set aside for it
    /// that were not seen since, in arrival order.
    fn end(&mut self, id: u64, subject: &str, seen: &Seen) -> Vec<Bytes> {
        self.remove(id, subject);
        let (mine, rest): (VecDeque<Parked>, _) = std::mem::take(&mut self.parked)
            .into_iter()
            .partition(|p| p.first == id);
        self.parked = rest;
        mine.into_iter()
            .filter(|p| !seen.has(p.node, p.seq))
            .map(|p| p.payload)
            .collect()
    }
}

/// This node's subscriptions on the connection, read as one stream (see
/// [`Routes`] for the order).
#[derive(Default)]
struct Registry {
    next_id: u64,
    subs: HashMap<u64, Sub>,
    routes: Routes,
    ready: Arc<Ready>,
}

impl Registry {
    fn len(&self) -> usize {
        self.subs.len()
    }

    fn id_of(&self, subject: &str) -> Option<u64> {
        self.routes.by_subject.get(subject).copied()
    }

    fn insert(&mut self, subject: String, inner: async_nats::Subscriber) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        let waker = Waker::from(Arc::new(SubWaker {
            id,
            ready: self.ready.clone(),
        }));
        self.routes.add(id, &subject);
        self.subs.insert(
            id,
            Sub {
                subject,
                inner,
                waker,
            },
        );
        // Read once, which registers its waker.
        self.ready.push(id);
        id
    }

    /// Takes subscription `id` out; returns its subject and the copies set
    /// aside for it.
    fn remove(&mut self, id: u64, seen: &Seen) -> Option<(String, Vec<Bytes>)> {
        let sub = self.subs.remove(&id)?;
        let parked = self.routes.end(id, &sub.subject, seen);
        Some((sub.subject, parked))
    }

    /// Reads what the subscriptions that woke have, [`TURN`] at most each;
    /// `None` marks a subscription's end. Pending while none has anything.
    fn poll_read(
        &mut self,
        cx: &mut Context<'_>,
        out: &mut Vec<(u64, Option<Message>)>,
    ) -> Poll<()> {
        let ids = {
            let mut state = self.ready.lock();
            if !state.task.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                state.task = Some(cx.waker().clone());
            }
            std::mem::take(&mut state.ids)
        };
        let mut again = Vec::new();
        for id in ids {
            let Some(sub) = self.subs.get_mut(&id) else {
                continue;
            };
            let mut sub_cx = Context::from_waker(&sub.waker);
            let mut taken = 0;
            loop {
                if taken == TURN {
                    again.push(id);
                    break;
                }
                match sub.inner.poll_next_unpin(&mut sub_cx) {
                    Poll::Ready(Some(msg)) => {
                        out.push((id, Some(msg)));
                        taken += 1;
                    }
                    Poll::Ready(None) => {
                        out.push((id, None));
                        break;
                    }
                    Poll::Pending => break,
                }
            }
        }
        if !again.is_empty() {
            self.ready.lock().ids.extend(again);
            cx.waker().wake_by_ref();
        }
        if out.is_empty() {
            Poll::Pending
        } else {
            Poll::Ready(())
        }
    }
}

fn is_pattern(subject: &str) -> bool {
    subject.split('.').any(|t| t == "*" || t == ">")
}

/// NATS's matching: `*` is one token, a final `>` one or more.
fn subject_matches(pattern: &str, subject: &str) -> bool {
    let mut tokens = subject.split('.');
    for p in pattern.split('.') {
        match (p, tokens.next()) {
            (">", Some(_)) => return true,
            ("*", Some(_)) => {}
            (p, Some(t)) if p == t => {}
            _ => return false,
        }
    }
    tokens.next().is_none()
}

/// The origin of an encoded envelope, without decoding the rest.
fn origin(body: &[u8]) -> Option<(u64, u64)> {
    #[derive(serde::Deserialize)]
    struct Origin {
        n: u64,
        s: u64,
    }
    let o: Origin = serde_json::from_slice(body).ok()?;
    Some((o.n, o.s))
}

/// The subscribing side: what this node wants, the subscriptions that
/// carry it, and what it has seen.
struct Subscriber {
    client: Client,
    shared: Arc<Shared>,
    wanted: Wanted<String>,
    seen: Seen,
    settle: Settle,
    interest: mpsc::UnboundedReceiver<Interest>,
    events: mpsc::Receiver<Event>,
    registry: Registry,
    /// A subject nobody subscribes: a request to it is the round trip.
    sync_subject: String,
    /// Mirrors `shared.up`: the connection is up and every wanted subject
    /// subscribed on it.
    up: bool,
    /// The client's connection count when it last went up.
    connects: u64,
    /// No new attempt to go up before this.
    retry_at: Instant,
    backoff: Duration,
    warned_slow: Option<Instant>,
    history: Option<Arc<NatsHistory>>,
}

impl Subscriber {
    async fn run(mut self, stop: CancellationToken) {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut read = Vec::new();
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                Some(event) = self.events.recv() => {
                    self.on_event(&event);
                    self.follow().await;
                }
                change = self.interest.recv() => match change {
                    Some(change) => self.on_interest(change).await,
                    None => break,
                },
                () = poll_fn(|cx| self.registry.poll_read(cx, &mut read)) => {
                    for (id, msg) in read.drain(..) {
                        match msg {
                            Some(msg) => self.on_message(id, msg),
                            None => self.lost(id),
                        }
                    }
                }
                _ = tick.tick() => {
                    self.follow().await;
                    self.expire().await;
                }
            }
        }
        self.shared.set_up(false);
    }

    fn on_event(&mut self, event: &Event) {
        if let Event::SlowConsumer(_) = event {
            self.shared.count("dropped");
            // One event per message dropped: say it once a minute at most.
            let now = Instant::now();
            if self
                .warned_slow
                .is_none_or(|t| now >= t + Duration::from_secs(60))
            {
                self.warned_slow = Some(now);
                tracing::warn!(
                    queue = SUB_QUEUE,
                    "backplane messages dropped: this node does not keep up with what it subscribed"
                );
            }
        }
    }

    /// Follows the connection's state: down while it is not connected; up
    /// once connected with every wanted subject subscribed, again after
    /// each new connection.
    async fn follow(&mut self) {
        if self.client.connection_state() != State::Connected {
            if self.up {
                self.down("connection lost".into());
            }
            return;
        }
        let connects = self.client.statistics().connects.load(Ordering::Relaxed);
        if (self.up && connects == self.connects) || Instant::now() < self.retry_at {
            return;
        }
        // async-nats subscribed again what it holds; what was wanted
        // meanwhile is subscribed now, and the round trip makes sure the
        // server has all of it.
        let missing = self.wanted.missing();
        let synced = match self.subscribe(&missing).await {
            Ok(()) => match self.ensure_stream().await {
                Ok(()) => self.round_trip().await,
                Err(e) => Err(e),
            },
            Err(e) => Err(e),
        };
        if let Err(e) = synced {
            self.down(e);
            return;
        }
        let reconnects = connects.saturating_sub(self.connects.max(1));
        if reconnects > 0 {
            self.shared.metrics.cluster_reconnects.inc_by(reconnects);
            tracing::info!("backplane reconnected");
        }
        self.connects = connects;
        self.backoff = BACKOFF_MIN;
        self.up = true;
        self.shared.set_up(true);
        self.settle.caught_up();
    }

    /// Publishes go local until the next successful [`Subscriber::follow`].
    fn down(&mut self, why: String) {
        let now = Instant::now();
        self.retry_at = now + self.backoff;
        tracing::warn!(error = %why, retry_in = ?self.backoff, "backplane unavailable; publishes are delivered on this node only");
        self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
        self.up = false;
        self.shared.set_up(false);
        if let Some(history) = &self.history {
            history.forget();
        }
    }

    fn apply(&mut self, change: &Interest) -> Vec<String> {
        self.settle.received();
        let subjects = nats_subjects(&self.shared.prefix, &change.filter);
        self.wanted.apply(subjects, change.active, Instant::now())
    }

    /// Follows an interest change, and those queued behind it: one round
    /// trip for all of them.
    async fn on_interest(&mut self, change: Interest) {
        let mut new = self.apply(&change);
        for _ in 0..BATCH {
            let Ok(change) = self.interest.try_recv() else {
                break;
            };
            new.extend(self.apply(&change));
        }
        if !self.up {
            // Subscribed when it is up again.
            return;
        }
        if !new.is_empty() {
            let synced = match self.subscribe(&new).await {
                Ok(()) => self.round_trip().await,
                Err(e) => Err(e),
            };
            if let Err(e) = synced {
                self.down(e);
                return;
            }
        }
        self.settle.caught_up();
    }

    async fn subscribe(&mut self, subjects: &[String]) -> Result<(), String> {
        let mut result = Ok(());
        for subject in subjects {
            if self.registry.id_of(subject).is_none() {
                match timed("subscribe", self.client.subscribe(subject.clone())).await {
                    Ok(sub) => {
                        self.registry.insert(subject.clone(), sub);
                    }
                    Err(e) => {
                        result = Err(e);
                        break;
                    }
                }
            }
            self.wanted.mark(std::slice::from_ref(subject));
        }
        self.count_subscriptions();
        result
    }

    /// Creates the ordering stream ([`stream_config`]), or brings an
    /// existing one to this configuration. Every connection does it: a
    /// restarted NATS server has lost the stream, and a publish on
    /// `<prefix>.in` with no stream would reach nobody.
    async fn ensure_stream(&self) -> Result<(), String> {
        super::jetstream::ensure_stream(&self.client, &stream_config(&self.shared.prefix))
            .await
            .map_err(|e| {
                if e.contains("without JetStream") {
                    "the NATS server runs without JetStream (start it with -js): the backplane needs its stream to give every connection one order".to_string()
                } else {
                    e
                }
            })?;
        if let Some(history) = &self.history {
            history.ensure(&self.client).await?;
        }
        Ok(())
    }

    /// A request nobody answers: the server says "no responders" once it
    /// has processed what this connection sent before (the subscriptions).
    async fn round_trip(&self) -> Result<(), String> {
        let request = self.client.request(self.sync_subject.clone(), Bytes::new());
        match tokio::time::timeout(COMMAND_TIMEOUT, request).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) if e.kind() == RequestErrorKind::NoResponders => Ok(()),
            Ok(Err(e)) => Err(format!("round trip: {e}")),
            Err(_) => Err("round trip: timed out".into()),
        }
    }

    /// Leaves the subjects nobody here has wanted for [`super::LINGER`].
    async fn expire(&mut self) {
        let gone = self.wanted.expired(Instant::now());
        for subject in &gone {
            self.unsubscribe(subject).await;
        }
        if !gone.is_empty() {
            self.count_subscriptions();
        }
    }

    async fn unsubscribe(&mut self, subject: &str) {
        let Some(id) = self.registry.id_of(subject) else {
            return;
        };
        let mut rest = Vec::new();
        // While down the client takes no command: dropping the subscription
        // below closes its queue, and async-nats forgets it.
        if self.up
            && let Some(sub) = self.registry.subs.get_mut(&id)
        {
            // Once the server is told, the queue is closed: what it holds
            // is read out, then it ends.
            match timed("unsubscribe", sub.inner.unsubscribe()).await {
                Ok(()) => {
                    let _ = tokio::time::timeout(COMMAND_TIMEOUT, async {
                        while let Some(msg) = sub.inner.next().await {
                            rest.push(msg);
                        }
                    })
                    .await;
                }
                // Dropping it below unsubscribes as best it can.
                Err(e) => tracing::debug!(error = %e, subject, "unsubscribe"),
            }
        }
        // Still the first subscription of its subjects while read out.
        for msg in rest {
            self.on_message(id, msg);
        }
        self.ended(id);
    }

    /// A subscription ended by the client (it is closing): subscribed
    /// again, if still wanted, when the node goes up again.
    fn lost(&mut self, id: u64) {
        self.ended(id);
        if self.up && !self.wanted.missing().is_empty() {
            self.down("a subscription ended".into());
        }
    }

    /// A subscription is gone: taken out, then the copies set aside for it.
    fn ended(&mut self, id: u64) {
        let Some((subject, parked)) = self.registry.remove(id, &self.seen) else {
            return;
        };
        self.wanted.unmark(&subject);
        for payload in parked {
            self.shared.receive(&payload, &mut self.seen);
        }
        self.count_subscriptions();
    }

    fn on_message(&mut self, via: u64, mut msg: Message) {
        // From the history stream: its sequence is the cluster-wide one.
        if let (Some(history), Some(headers)) = (&self.history, &msg.headers)
            && headers
                .get("Nats-Stream")
                .is_some_and(|s| history.is_stream(s.as_str()))
            && let Some(seq) = headers
                .get("Nats-Sequence")
                .and_then(|v| v.as_str().parse::<u64>().ok())
            && let Some(body) = super::nats_history::with_sequence(&msg.payload, seq)
        {
            msg.payload = body;
        }
        match self.registry.routes.take(via, msg, &self.seen) {
            Take::Deliver(payload) => self.shared.receive(&payload, &mut self.seen),
            Take::Duplicate => self.shared.count("duplicate"),
            Take::Invalid => self.shared.count("invalid"),
            Take::Parked => {}
        }
    }

    fn count_subscriptions(&self) {
        self.shared
            .metrics
            .cluster_subscriptions
            .set(self.registry.len() as i64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_match_like_nats() {
        assert!(subject_matches("p.t.a", "p.t.a"));
        assert!(!subject_matches("p.t.a", "p.t.a.b"));
        assert!(subject_matches("p.t.*", "p.t.a"));
        assert!(!subject_matches("p.t.*", "p.t.a.b"));
        assert!(!subject_matches("p.t.*", "p.t"));
        assert!(subject_matches("p.t.>", "p.t.a"));
        assert!(subject_matches("p.t.>", "p.t.a.b"));
        assert!(!subject_matches("p.t.>", "p.t"));
        assert!(subject_matches("p.t.*.b", "p.t.~.b"));
        assert!(!subject_matches("p.t.*.b", "p.t.a.c"));
        assert!(is_pattern("p.t.*.b") && is_pattern("p.t.>") && !is_pattern("p.t.a~2A"));
    }

    fn msg(subject: &str, seq: u64) -> Message {
        let payload = format!(r#"{{"n":1,"s":{seq},"r":["x"],"t":0,"p":{seq}}}"#);
        Message {
            subject: subject.into(),
            reply: None,
            payload: Bytes::from(payload),
            headers: None,
            status: None,
            description: None,
            length: 0,
        }
    }

    /// What the hub gets, emulating `Shared::receive`'s [`Seen`] check.
    fn deliver(take: Take, seen: &mut Seen, got: &mut Vec<u64>) {
        if let Take::Deliver(payload) = take {
            let (node, seq) = origin(&payload).unwrap();
            if seen.first(node, seq) {
                got.push(seq);
            }
        }
    }

    #[test]
    fn a_subject_is_taken_from_its_oldest_subscription() {
        let mut r = Routes::default();
        r.add(0, "p.t.a.*");
        r.add(1, "p.t.a.b");
        r.add(2, "p.t.>");
        r.add(3, "p.t.c");
        assert_eq!(r.first("p.t.a.b"), Some(0));
        assert_eq!(r.first("p.t.a.x"), Some(0));
        assert_eq!(r.first("p.t.c"), Some(2));
        assert_eq!(r.first("p.t.a"), Some(2));
        assert_eq!(r.first("q.t.a"), None);
        r.remove(0, "p.t.a.*");
        assert_eq!(r.first("p.t.a.b"), Some(1));
    }

    #[test]
    fn a_younger_subscription_never_overtakes_the_first() {
        // `news` (0) is subscribed; `#` (1) comes while 1..=3 flow: it
        // misses 1, and its copies are read before the first's.
        let (mut r, mut seen, mut got) = (Routes::default(), Seen::default(), Vec::new());
        r.add(0, "p.t.news");
        r.add(1, "p.t.>");
        for seq in [2, 3] {
            assert_eq!(r.take(1, msg("p.t.news", seq), &seen), Take::Parked);
        }
        for seq in [1, 2, 3] {
            let take = r.take(0, msg("p.t.news", seq), &seen);
            deliver(take, &mut seen, &mut got);
        }
        assert_eq!(got, [1, 2, 3]);
        // Copies whose first copy was seen are dropped at once.
        assert_eq!(r.take(1, msg("p.t.news", 3), &seen), Take::Duplicate);
        // The parked copies were all delivered: nothing comes back.
        assert!(r.end(0, "p.t.news", &seen).is_empty());
    }

    #[test]
    fn when_the_first_subscription_goes_its_parked_copies_are_delivered() {
        let (mut r, mut seen, mut got) = (Routes::default(), Seen::default(), Vec::new());
        r.add(0, "p.t.news");
        r.add(1, "p.t.>");
        // 4 reached the younger subscription only: the first had been
        // closed before the server's copy for it came.
        for seq in [3, 4] {
            assert_eq!(r.take(1, msg("p.t.news", seq), &seen), Take::Parked);
        }
        // `news` is read out to its end, then taken out.
        for seq in [2, 3] {
            let take = r.take(0, msg("p.t.news", seq), &seen);
            deliver(take, &mut seen, &mut got);
        }
        for payload in r.end(0, "p.t.news", &seen) {
            deliver(Take::Deliver(payload), &mut seen, &mut got);
        }
        // Then `#` is the first subscription of `news`.
        for seq in [4, 5] {
            let take = r.take(1, msg("p.t.news", seq), &seen);
            deliver(take, &mut seen, &mut got);
        }
        assert_eq!(got, [2, 3, 4, 5]);
        assert!(r.parked.is_empty());
    }

    #[test]
    fn parked_copies_are_bounded() {
        let (mut r, seen) = (Routes::default(), Seen::default());
        r.add(0, "p.t.news");
        r.add(1, "p.t.>");
        for seq in 0..(PARKED as u64 * 2) {
            r.take(1, msg("p.t.news", seq), &seen);
        }
        assert_eq!(r.parked.len(), PARKED);
        assert_eq!(
            r.take(1, msg("q", 0), &seen),
            Take::Deliver(msg("q", 0).payload)
        );
    }

    #[test]
    fn backoff_starts_at_once_and_is_capped() {
        assert_eq!(backoff(1), Duration::ZERO);
        assert_eq!(backoff(2), BACKOFF_MIN);
        assert_eq!(backoff(3), BACKOFF_MIN * 2);
        assert_eq!(backoff(1000), BACKOFF_MAX);
    }

    #[test]
    fn origins_are_read_from_envelopes() {
        assert_eq!(
            origin(br#"{"n":7,"s":9,"r":["a"],"t":1,"p":{}}"#),
            Some((7, 9))
        );
        assert_eq!(origin(b"nope"), None);
    }
}
