//! The Redis backplane: one connection that publishes (pipelined, each
//! batch in one MULTI/EXEC so that the copies of a broadcast reach every
//! subscriber together) and one pub/sub connection that follows this
//! node's interest.
//!
//! The subscriber is the node's view of the cluster: while it holds a
//! connection the node is `up` and its publishes go through Redis; when it
//! loses it (Redis stopped, the connection cut, or silent past a ping, as
//! after a failover or when Redis drops a subscriber over its pub/sub
//! output-buffer limit) the node delivers its publishes locally, reconnects
//! with capped backoff and subscribes again to what its clients want then.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures_util::StreamExt;
use serde_json::value::RawValue;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::channel::{redis_channel, redis_subscriptions};
use super::{LINGER, OUT_QUEUE, Outgoing, Seen, Shared};
use crate::hub::{Backplane, Filter, Interest};

/// Publishes sent in one pipeline, at most.
const BATCH: usize = 256;
/// How long one engine command (a connection, a batch, a ping) may take.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(3);
/// A pub/sub connection is pinged this often; one that does not answer is
/// half dead and replaced.
const PING_EVERY: Duration = Duration::from_secs(5);
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// The hub's handle: publishes go to the writer task.
pub struct Redis {
    shared: Arc<Shared>,
    out: mpsc::Sender<Outgoing>,
    /// The hub's interest changes acted on so far (see [`Settle`]).
    settled: tokio::sync::watch::Receiver<u64>,
}

/// How far the subscriber has got: the count of the hub's interest changes
/// whose subscriptions are active on the current connection.
struct Settle {
    tx: tokio::sync::watch::Sender<u64>,
    /// The hub's count when the watch began.
    base: u64,
    /// Changes received since.
    received: u64,
}

impl Settle {
    /// Every change received so far is in effect on the engine.
    fn caught_up(&self) {
        self.tx.send_replace(self.base + self.received);
    }
}

/// Longest wait of an answer for the backplane's subscription.
const SUBSCRIBE_WAIT: Duration = Duration::from_secs(3);

/// What [`Redis::run`] needs to start its tasks.
pub struct Tasks {
    client: redis::Client,
    shared: Arc<Shared>,
    out: mpsc::Receiver<Outgoing>,
    interest: mpsc::UnboundedReceiver<Interest>,
    settle: Settle,
}

impl Redis {
    /// Checks `url` and prepares the backplane; nothing connects before
    /// [`Tasks::run`]. Interest is followed from now on.
    pub fn new(url: &str, shared: Arc<Shared>) -> Result<(Arc<Redis>, Tasks), String> {
        let client = redis::Client::open(url).map_err(|e| e.to_string())?;
        let (tx, rx) = mpsc::channel(OUT_QUEUE);
        let (interest, base) = shared.hub.watch_interest_counted();
        let (settled_tx, settled) = tokio::sync::watch::channel(base);
        let redis = Arc::new(Redis {
            shared: shared.clone(),
            out: tx,
            settled,
        });
        Ok((
            redis,
            Tasks {
                client,
                shared,
                out: rx,
                interest,
                settle: Settle {
                    tx: settled_tx,
                    base,
                    received: 0,
                },
            },
        ))
    }
}

impl Backplane for Redis {
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
}

impl Tasks {
    /// Runs the writer and the subscriber until `stop`.
    pub async fn run(self, stop: CancellationToken) {
        let writer = tokio::spawn(writer(
            self.client.clone(),
            self.shared.clone(),
            self.out,
            stop.clone(),
        ));
        subscriber(self.client, self.shared, self.interest, self.settle, stop).await;
        let _ = writer.await;
    }
}

async fn writer(
    client: redis::Client,
    shared: Arc<Shared>,
    mut rx: mpsc::Receiver<Outgoing>,
    stop: CancellationToken,
) {
    let mut conn: Option<redis::aio::MultiplexedConnection> = None;
    let mut batch = Vec::with_capacity(BATCH);
    loop {
        let n = tokio::select! {
            _ = stop.cancelled() => 0,
            n = rx.recv_many(&mut batch, BATCH) => n,
        };
        if n == 0 {
            // Stopping: what is still queued is delivered here.
            for out in batch.drain(..) {
                shared.deliver_here(out);
            }
            return;
        }
        if conn.is_none() {
            conn = match tokio::time::timeout(
                COMMAND_TIMEOUT,
                client.get_multiplexed_async_connection(),
            )
            .await
            {
                Ok(Ok(c)) => Some(c),
                _ => None,
            };
        }
        let Some(c) = conn.as_mut() else {
            for out in batch.drain(..) {
                shared.deliver_here(out);
            }
            continue;
        };
        // One MULTI/EXEC per batch: a broadcast's copies (one per named
        // room) reach every subscriber one after the other, so its copies
        // are recognised by a short window.
        let mut pipe = redis::pipe();
        pipe.atomic();
        for out in &batch {
            for room in &out.rooms {
                pipe.publish(redis_channel(&shared.prefix, room), &out.body[..])
                    .ignore();
            }
        }
        match tokio::time::timeout(COMMAND_TIMEOUT, pipe.query_async::<()>(c)).await {
            Ok(Ok(())) => {
                for _ in 0..batch.len() {
                    shared.count("sent");
                }
                batch.clear();
            }
            failed => {
                let why = match failed {
                    Ok(Err(e)) => e.to_string(),
                    _ => "timed out".into(),
                };
                tracing::warn!(error = %why, publishes = batch.len(), "backplane publish failed; delivered on this node only");
                conn = None;
                for out in batch.drain(..) {
                    shared.deliver_here(out);
                }
            }
        }
    }
}

/// A channel (exact name) or a pattern on the engine.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Name {
    Channel(String),
    Pattern(String),
}

#[derive(Default)]
struct Entry {
    /// Filters of this node that need it.
    filters: usize,
    /// When the last of them went.
    idle_since: Option<Instant>,
    /// Subscribed on the current connection.
    subscribed: bool,
}

/// What this node wants from the engine, by name.
#[derive(Default)]
struct Wanted {
    names: HashMap<Name, Entry>,
}

impl Wanted {
    fn names_of(prefix: &str, filter: &Filter) -> Vec<Name> {
        let (channels, patterns) = redis_subscriptions(prefix, filter);
        channels
            .into_iter()
            .map(Name::Channel)
            .chain(patterns.into_iter().map(Name::Pattern))
            .collect()
    }

    /// Follows one interest change; returns the names to subscribe now.
    fn apply(&mut self, prefix: &str, change: &Interest, now: Instant) -> Vec<Name> {
        let mut new = Vec::new();
        for name in Self::names_of(prefix, &change.filter) {
            let entry = self.names.entry(name.clone()).or_default();
            if change.active {
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
    fn expired(&mut self, now: Instant) -> Vec<Name> {
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

    /// A new connection: nothing is subscribed on it yet.
    fn reset(&mut self) -> Vec<Name> {
        self.names.retain(|_, e| e.filters > 0);
        self.names
            .iter_mut()
            .map(|(name, e)| {
                e.subscribed = false;
                name.clone()
            })
            .collect()
    }

    fn mark(&mut self, names: &[Name]) {
        for name in names {
            if let Some(e) = self.names.get_mut(name) {
                e.subscribed = true;
            }
        }
    }

    fn subscribed(&self) -> usize {
        self.names.values().filter(|e| e.subscribed).count()
    }
}

async fn subscribe(sink: &mut redis::aio::PubSubSink, names: &[Name]) -> redis::RedisResult<()> {
    let channels: Vec<&str> = names
        .iter()
        .filter_map(|n| match n {
            Name::Channel(c) => Some(c.as_str()),
            Name::Pattern(_) => None,
        })
        .collect();
    let patterns: Vec<&str> = names
        .iter()
        .filter_map(|n| match n {
            Name::Pattern(p) => Some(p.as_str()),
            Name::Channel(_) => None,
        })
        .collect();
    if !channels.is_empty() {
        sink.subscribe(&channels).await?;
    }
    if !patterns.is_empty() {
        sink.psubscribe(&patterns).await?;
    }
    Ok(())
}

async fn unsubscribe(sink: &mut redis::aio::PubSubSink, names: &[Name]) -> redis::RedisResult<()> {
    for name in names {
        match name {
            Name::Channel(c) => sink.unsubscribe(c).await?,
            Name::Pattern(p) => sink.punsubscribe(p).await?,
        }
    }
    Ok(())
}

/// Bounded by [`COMMAND_TIMEOUT`]: a command that hangs means a dead
/// connection.
async fn timed<T>(f: impl Future<Output = redis::RedisResult<T>>) -> Result<T, String> {
    match tokio::time::timeout(COMMAND_TIMEOUT, f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("timed out".into()),
    }
}

/// The pub/sub side: what this node wants, and what it has seen.
struct Subscriber {
    shared: Arc<Shared>,
    wanted: Wanted,
    seen: Seen,
    settle: Settle,
    interest: mpsc::UnboundedReceiver<Interest>,
    stop: CancellationToken,
}

async fn subscriber(
    client: redis::Client,
    shared: Arc<Shared>,
    interest: mpsc::UnboundedReceiver<Interest>,
    settle: Settle,
    stop: CancellationToken,
) {
    let mut wanted = Wanted::default();
    // Interest that existed before the watch began (none at start-up), and
    // what is followed for its last values.
    for filter in shared
        .hub
        .active_filters()
        .into_iter()
        .chain(shared.always.clone())
    {
        wanted.apply(
            &shared.prefix,
            &Interest {
                filter,
                active: true,
            },
            Instant::now(),
        );
    }
    let mut s = Subscriber {
        shared,
        wanted,
        seen: Seen::default(),
        settle,
        interest,
        stop,
    };
    s.run(client).await;
}

impl Subscriber {
    /// Connects, serves, and reconnects with backoff until stopped.
    async fn run(&mut self, client: redis::Client) {
        let mut backoff = BACKOFF_MIN;
        let mut connected_before = false;
        loop {
            let pubsub = tokio::select! {
                _ = self.stop.cancelled() => return,
                r = timed(client.get_async_pubsub()) => r,
            };
            let err = match pubsub {
                Err(e) => e,
                Ok(pubsub) => {
                    let (mut sink, mut stream) = pubsub.split();
                    let all = self.wanted.reset();
                    match timed(subscribe(&mut sink, &all)).await {
                        Err(e) => e,
                        Ok(()) => {
                            self.wanted.mark(&all);
                            self.count_subscriptions();
                            if connected_before {
                                self.shared.metrics.cluster_reconnects.inc();
                                tracing::info!("backplane reconnected");
                            }
                            connected_before = true;
                            backoff = BACKOFF_MIN;
                            self.settle.caught_up();
                            self.shared.set_up(true);
                            let ended = self.serve(&mut sink, &mut stream).await;
                            self.shared.set_up(false);
                            match ended {
                                None => return,
                                Some(e) => e,
                            }
                        }
                    }
                }
            };
            tracing::warn!(error = %err, retry_in = ?backoff, "backplane unavailable; publishes are delivered on this node only");
            // Interest changes keep the wanted set current meanwhile.
            let until = Instant::now() + backoff;
            loop {
                tokio::select! {
                    _ = self.stop.cancelled() => return,
                    _ = tokio::time::sleep_until(until) => break,
                    change = self.interest.recv() => match change {
                        Some(c) => {
                            self.settle.received += 1;
                            self.wanted.apply(&self.shared.prefix, &c, Instant::now());
                        }
                        None => return,
                    },
                }
            }
            self.wanted.expired(Instant::now());
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    fn count_subscriptions(&self) {
        self.shared
            .metrics
            .cluster_subscriptions
            .set(self.wanted.subscribed() as i64);
    }

    /// Serves one pub/sub connection: incoming publishes, interest changes,
    /// lingering unsubscribes and pings. Returns why it ended (`None`: the
    /// node is stopping).
    async fn serve(
        &mut self,
        sink: &mut redis::aio::PubSubSink,
        stream: &mut redis::aio::PubSubStream,
    ) -> Option<String> {
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        let mut next_ping = Instant::now() + PING_EVERY;
        loop {
            tokio::select! {
                _ = self.stop.cancelled() => return None,
                msg = stream.next() => match msg {
                    Some(msg) => self.shared.receive(msg.get_payload_bytes(), &mut self.seen),
                    None => return Some("connection closed".into()),
                },
                change = self.interest.recv() => {
                    let change = change?;
                    self.settle.received += 1;
                    let new = self.wanted.apply(&self.shared.prefix, &change, Instant::now());
                    if !new.is_empty() {
                        if let Err(e) = timed(subscribe(sink, &new)).await {
                            return Some(e);
                        }
                        self.wanted.mark(&new);
                        self.count_subscriptions();
                    }
                    self.settle.caught_up();
                }
                _ = tick.tick() => {
                    let now = Instant::now();
                    let gone = self.wanted.expired(now);
                    if !gone.is_empty() {
                        if let Err(e) = timed(unsubscribe(sink, &gone)).await {
                            return Some(e);
                        }
                        self.count_subscriptions();
                    }
                    if now >= next_ping {
                        next_ping = now + PING_EVERY;
                        // On a subscribed RESP2 connection Redis answers
                        // `["pong", ""]`, not `PONG`: any answer will do.
                        if let Err(e) = timed(sink.ping::<redis::Value>()).await {
                            return Some(format!("ping: {e}"));
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn change(f: &str, active: bool) -> Interest {
        Interest {
            filter: Filter::parse(f).unwrap(),
            active,
        }
    }

    #[test]
    fn overlapping_filters_share_names_and_unsubscribe_after_lingering() {
        let mut w = Wanted::default();
        let t0 = Instant::now();
        let new = w.apply("p", &change("a/#", true), t0);
        assert_eq!(
            new,
            [
                Name::Channel("p:{a}".into()),
                Name::Pattern("p:{a/*}".into())
            ]
        );
        w.mark(&new);
        // `a/+` needs the same pattern: nothing new to subscribe.
        assert!(w.apply("p", &change("a/+", true), t0).is_empty());
        w.apply("p", &change("a/#", false), t0);
        // The pattern is still wanted by `a/+`; the channel lingers.
        assert!(w.expired(t0 + LINGER / 2).is_empty());
        assert_eq!(w.expired(t0 + LINGER), [Name::Channel("p:{a}".into())]);
        // Wanted again before it expired: kept, no new subscribe.
        w.apply("p", &change("a/+", false), t0);
        assert!(w.apply("p", &change("a/+", true), t0).is_empty());
        assert!(w.expired(t0 + LINGER * 2).is_empty());
        assert_eq!(w.subscribed(), 1);
        // A new connection subscribes everything still wanted.
        assert_eq!(w.reset(), [Name::Pattern("p:{a/*}".into())]);
    }
}
