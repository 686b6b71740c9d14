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

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::channel::{redis_channel, redis_subscriptions};
use super::{Feeds, Link, Outgoing, Seen, Settle, Shared, Wanted};
use crate::hub::{Filter, Interest};

/// Publishes sent in one pipeline, at most.
const BATCH: usize = 256;
/// How long one engine command (a connection, a batch, a ping) may take.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(3);
/// A pub/sub connection is pinged this often; one that does not answer is
/// half dead and replaced.
const PING_EVERY: Duration = Duration::from_secs(5);
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// What [`Tasks::run`] needs to start the writer and the subscriber.
pub struct Tasks {
    client: redis::Client,
    shared: Arc<Shared>,
    feeds: Feeds,
}

/// Checks `url` and prepares the backplane; nothing connects before
/// [`Tasks::run`]. Interest is followed from now on.
pub fn prepare(url: &str, shared: Arc<Shared>) -> Result<(Arc<Link>, Tasks), String> {
    let client = redis::Client::open(url).map_err(|e| e.to_string())?;
    let (link, feeds) = Link::new(shared.clone());
    Ok((
        link,
        Tasks {
            client,
            shared,
            feeds,
        },
    ))
}

impl Tasks {
    /// Runs the writer and the subscriber until `stop`.
    pub async fn run(self, stop: CancellationToken) {
        let Feeds {
            out,
            interest,
            settle,
        } = self.feeds;
        let writer = tokio::spawn(writer(
            self.client.clone(),
            self.shared.clone(),
            out,
            stop.clone(),
        ));
        subscriber(self.client, self.shared, interest, settle, stop).await;
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
    while shared.next_batch(&mut rx, &mut batch, BATCH, &stop).await {
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
            shared.deliver_all_here(&mut batch);
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
                shared.deliver_all_here(&mut batch);
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

/// The names of `filter` on Redis.
fn names_of(prefix: &str, filter: &Filter) -> Vec<Name> {
    let (channels, patterns) = redis_subscriptions(prefix, filter);
    channels
        .into_iter()
        .map(Name::Channel)
        .chain(patterns.into_iter().map(Name::Pattern))
        .collect()
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
    wanted: Wanted<Name>,
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
    let wanted = Wanted::seeded(&shared, |f| names_of(&shared.prefix, f));
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
                            self.settle.received();
                            self.wanted.apply(names_of(&self.shared.prefix, &c.filter), c.active, Instant::now());
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
                    self.settle.received();
                    let names = names_of(&self.shared.prefix, &change.filter);
                    let new = self.wanted.apply(names, change.active, Instant::now());
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
    use crate::cluster::LINGER;

    fn apply(w: &mut Wanted<Name>, f: &str, active: bool, now: Instant) -> Vec<Name> {
        let filter = Filter::parse(f).unwrap();
        w.apply(names_of("p", &filter), active, now)
    }

    #[test]
    fn overlapping_filters_share_names_and_unsubscribe_after_lingering() {
        let mut w = Wanted::new();
        let t0 = Instant::now();
        let new = apply(&mut w, "a/#", true, t0);
        assert_eq!(
            new,
            [
                Name::Channel("p:{a}".into()),
                Name::Pattern("p:{a/*}".into())
            ]
        );
        w.mark(&new);
        // `a/+` needs the same pattern: nothing new to subscribe.
        assert!(apply(&mut w, "a/+", true, t0).is_empty());
        apply(&mut w, "a/#", false, t0);
        // The pattern is still wanted by `a/+`; the channel lingers.
        assert!(w.expired(t0 + LINGER / 2).is_empty());
        assert_eq!(w.expired(t0 + LINGER), [Name::Channel("p:{a}".into())]);
        // Wanted again before it expired: kept, no new subscribe.
        apply(&mut w, "a/+", false, t0);
        assert!(apply(&mut w, "a/+", true, t0).is_empty());
        assert!(w.expired(t0 + LINGER * 2).is_empty());
        assert_eq!(w.subscribed(), 1);
        // A new connection subscribes everything still wanted.
        assert_eq!(w.reset(), [Name::Pattern("p:{a/*}".into())]);
    }
}
