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
use super::{Envelope, Feeds, HistorySource, Link, Outgoing, Seen, Settle, Shared, Wanted};
use crate::gateway::{SessionFetch, SharedSessions};
use crate::hub::history::{Position, Seq};
use crate::hub::{Fetch, Fetched, Filter, Interest};

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
    /// Socket.IO recovery sessions, when the history is kept here.
    sessions: Option<(Arc<Sessions>, mpsc::Receiver<SessionOp>)>,
}

/// Checks `url` and prepares the backplane; nothing connects before
/// [`Tasks::run`]. Interest is followed from now on.
pub fn prepare(url: &str, shared: Arc<Shared>) -> Result<(Arc<Link>, Tasks), String> {
    let client = redis::Client::open(url).map_err(|e| e.to_string())?;
    let history = shared.history.as_ref().map(|rules| {
        Arc::new(History {
            client: client.clone(),
            prefix: shared.prefix.clone(),
            ttl: rules.ttl,
            conn: Arc::default(),
        }) as Arc<dyn HistorySource>
    });
    let (link, feeds) = Link::new(shared.clone(), history);
    let sessions = shared.history.as_ref().map(|rules| {
        let (tx, rx) = mpsc::channel(SESSION_OPS);
        let sessions = Arc::new(Sessions {
            client: client.clone(),
            prefix: shared.prefix.clone(),
            ttl: rules.ttl,
            ops: tx,
            conn: Arc::default(),
            metrics: shared.metrics.clone(),
        });
        (sessions, rx)
    });
    Ok((
        link,
        Tasks {
            client,
            shared,
            feeds,
            sessions,
        },
    ))
}

impl Tasks {
    /// Where Socket.IO recovery sessions are shared (with the history on).
    pub fn sessions(&self) -> Option<Arc<dyn SharedSessions>> {
        self.sessions
            .as_ref()
            .map(|(s, _)| s.clone() as Arc<dyn SharedSessions>)
    }

    /// Runs the writer and the subscriber until `stop`.
    pub async fn run(self, stop: CancellationToken) {
        let Feeds {
            out,
            interest,
            settle,
        } = self.feeds;
        if let Some((sessions, ops)) = self.sessions {
            tokio::spawn(sessions_task(sessions, ops, stop.clone()));
        }
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
    // The SHA of the publish script on the current connection's server.
    let mut script: Option<String> = None;
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
            script = None;
        }
        if let Some(c) = conn.as_mut()
            && script.is_none()
            && shared.history.is_some()
        {
            let mut load = redis::cmd("SCRIPT");
            load.arg("LOAD").arg(PUBLISH_SCRIPT);
            match timed(load.query_async::<String>(c)).await {
                Ok(sha) => script = Some(sha),
                Err(e) => {
                    tracing::warn!(error = %e, "history script not loaded");
                    conn = None;
                }
            }
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
            match (&script, &shared.history) {
                (Some(sha), Some(rules)) if !out.tracked.is_empty() => {
                    history_publish(&mut pipe, sha, &shared.prefix, rules, out);
                }
                _ => {
                    for room in &out.rooms {
                        pipe.publish(redis_channel(&shared.prefix, room), &out.body[..])
                            .ignore();
                    }
                }
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

/// Publishes a message of a topic that keeps a history, atomically: the
/// script numbers it (per topic, and in the cluster-wide sequence), adds
/// the numbers to the envelope, appends it to each topic's capped stream,
/// and publishes it. So every node hands out the same offsets, and a
/// message is in the history before any node can deliver it.
///
/// Keys: `<prefix>:h:seq` (the sequence and its epoch), then for each
/// tracked room `<prefix>:h:{room}:m` (its last offset `n`, epoch `e`,
/// and `dg`, the highest sequence it dropped) and `<prefix>:h:{room}` (the
/// stream: entry `<offset>-1` with fields `g` and `m`, the envelope). A
/// stream lives `history.ttl` after its topic's last message, the rest
/// [`META_KEEP`]; a topic whose numbers were lost starts a new epoch.
///
/// A stream holds consecutive offsets (each is added here, and it loses
/// them only from the front, by `MAXLEN`, or whole, by expiring), so the
/// entries that adding offset `n` trims are those at `n - size` and below,
/// and `dg` becomes the sequence of the newest of them. Usually that is
/// the oldest entry alone, read without counting the stream first; when
/// nodes keep different `history.size` (a change rolling out), one add
/// can trim several, and an `XREVRANGE` finds the newest. An epoch is
/// written once, when a key has none, and only read after that.
const PUBLISH_SCRIPT: &str = r#"
local function epoch_of(key)
  local e = redis.call('HGET', key, 'e')
  if not e then
    e = ARGV[5]
    redis.call('HSET', key, 'e', e)
  end
  return e
end
local g = redis.call('HINCRBY', KEYS[1], 'n', 1)
local ge = epoch_of(KEYS[1])
local size = tonumber(ARGV[2])
local r = tonumber(ARGV[6])
local offsets, epochs, streams = {}, {}, {}
local k = 2
for i = 1, r do
  if ARGV[6 + r + i] == '1' then
    local meta = KEYS[k]
    local n = redis.call('HINCRBY', meta, 'n', 1)
    offsets[i] = n
    epochs[i] = '"' .. epoch_of(meta) .. '"'
    streams[#streams + 1] = {meta, KEYS[k + 1], n}
    k = k + 2
  else
    offsets[i] = 0
    epochs[i] = '""'
  end
end
local body = string.sub(ARGV[1], 1, -2) .. ',"o":[' .. table.concat(offsets, ',') ..
  '],"h":[' .. table.concat(epochs, ',') .. '],"g":' .. g .. ',"ge":"' .. ge .. '"}'
for _, s in ipairs(streams) do
  local last_gone = s[3] - size
  if last_gone > 0 then
    local oldest = redis.call('XRANGE', s[2], '-', '+', 'COUNT', 1)
    local first = oldest[1] and tonumber(string.match(oldest[1][1], '^%d+'))
    if first == last_gone then
      redis.call('HSET', s[1], 'dg', oldest[1][2][2])
    elseif first and first < last_gone then
      local gone = redis.call('XREVRANGE', s[2], last_gone .. '-1', '-', 'COUNT', 1)
      redis.call('HSET', s[1], 'dg', gone[1][2][2])
    end
  end
  redis.call('XADD', s[2], 'MAXLEN', size, s[3] .. '-1', 'g', g, 'm', body)
  redis.call('PEXPIRE', s[2], ARGV[3])
  redis.call('PEXPIRE', s[1], ARGV[4])
end
for i = 1, r do
  redis.call('PUBLISH', ARGV[6 + i], body)
end
return g
"#;

/// How long a topic's numbers (last offset, epoch) outlive its last
/// message, at least: a client that comes back after a quiet spell finds
/// the same epoch, and is told it missed nothing.
const META_KEEP: Duration = Duration::from_secs(24 * 3600);

fn history_key(prefix: &str, topic: &str) -> String {
    format!("{prefix}:h:{{{topic}}}")
}

fn history_publish(
    pipe: &mut redis::Pipeline,
    sha: &str,
    prefix: &str,
    rules: &super::HistoryRules,
    out: &Outgoing,
) {
    let tracked = out.tracked.iter().filter(|t| **t).count();
    let cmd = pipe.cmd("EVALSHA").arg(sha).arg(1 + 2 * tracked);
    cmd.arg(format!("{prefix}:h:seq"));
    for (room, _) in out.rooms.iter().zip(&out.tracked).filter(|(_, t)| **t) {
        let key = history_key(prefix, room);
        cmd.arg(format!("{key}:m")).arg(key);
    }
    let ttl = rules.ttl.as_millis().max(1);
    let keep = rules.ttl.max(META_KEEP).as_millis();
    cmd.arg(&out.body[..])
        .arg(rules.size)
        .arg(u64::try_from(ttl).unwrap_or(u64::MAX))
        .arg(u64::try_from(keep).unwrap_or(u64::MAX))
        .arg(crate::hub::random_id())
        .arg(out.rooms.len());
    for room in &out.rooms {
        cmd.arg(redis_channel(prefix, room));
    }
    for t in &out.tracked {
        cmd.arg(if *t { "1" } else { "0" });
    }
    cmd.ignore();
}

/// Reads topics' histories for recoveries, on a connection of its own
/// (made at the first recovery, made again after an error).
struct History {
    client: redis::Client,
    prefix: String,
    ttl: Duration,
    conn: Arc<std::sync::Mutex<Option<redis::aio::MultiplexedConnection>>>,
}

impl HistorySource for History {
    fn fetch(&self, topic: Arc<str>) -> Fetch {
        let client = self.client.clone();
        let cached = self.conn.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let key = history_key(&self.prefix, &topic);
        let seq_key = format!("{}:h:seq", self.prefix);
        let ttl = self.ttl;
        let slot = self.conn.clone();
        Box::pin(async move {
            let mut conn = match cached {
                Some(c) => c,
                None => {
                    let c = timed(client.get_multiplexed_async_connection()).await?;
                    *slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(c.clone());
                    c
                }
            };
            let mut pipe = redis::pipe();
            pipe.atomic()
                .cmd("HMGET")
                .arg(format!("{key}:m"))
                .arg("n")
                .arg("e")
                .arg("dg")
                .cmd("XRANGE")
                .arg(&key)
                .arg("-")
                .arg("+")
                .cmd("HGET")
                .arg(&seq_key)
                .arg("e");
            type Meta = (Option<u64>, Option<String>, Option<u64>);
            type Entries = Vec<(String, Vec<Vec<u8>>)>;
            let answer: Result<(Meta, Entries, Option<String>), String> =
                timed(pipe.query_async(&mut conn)).await;
            let ((last, epoch, dropped), entries, global_epoch) = match answer {
                Ok(a) => a,
                Err(e) => {
                    // Connected again at the next recovery.
                    *slot.lock().unwrap_or_else(|e| e.into_inner()) = None;
                    return Err(e);
                }
            };
            let mut f = fetched(&topic, ttl, last, epoch, dropped, entries);
            f.global_epoch = global_epoch.map(Arc::from);
            Ok(f)
        })
    }
}

/// The messages of a topic's stream, as delivered live.
fn fetched(
    topic: &Arc<str>,
    ttl: Duration,
    last: Option<u64>,
    epoch: Option<String>,
    dropped: Option<u64>,
    entries: Vec<(String, Vec<Vec<u8>>)>,
) -> Fetched {
    let Some(epoch) = epoch else {
        return Fetched::default();
    };
    let epoch: Arc<str> = Arc::from(epoch);
    let oldest =
        crate::hub::now_ms().saturating_sub(u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX));
    let mut messages = Vec::with_capacity(entries.len());
    let mut dropped = dropped.unwrap_or(0);
    for (_, fields) in &entries {
        let Some(body) = fields
            .chunks(2)
            .find(|f| f[0] == b"m")
            .and_then(|f| f.get(1))
        else {
            continue;
        };
        let Ok(env) = serde_json::from_slice::<Envelope<'_>>(body) else {
            continue;
        };
        let Some(i) = env.rooms.iter().position(|r| **r == **topic) else {
            continue;
        };
        let Some(&offset) = env.offsets.get(i) else {
            continue;
        };
        if env.ts < oldest {
            // Past `history.ttl`: as good as dropped.
            dropped = dropped.max(env.global.unwrap_or(0));
            continue;
        }
        let position = Position {
            offset,
            epoch: epoch.clone(),
        };
        let seq = match (env.global, &env.global_epoch) {
            (Some(n), Some(e)) => Some(Seq {
                epoch: Arc::from(&**e),
                n,
            }),
            _ => None,
        };
        messages.push(Arc::new(env.message_for(topic, position, seq)));
    }
    Fetched {
        epoch,
        last: last.unwrap_or(0),
        messages,
        dropped_seq: dropped,
        global_epoch: None,
    }
}

/// Session writes waiting for the sessions task; beyond this a write is
/// dropped (counted) and that session recovers on its own node only.
const SESSION_OPS: usize = 4096;
/// Session writes sent in one pipeline, at most.
const SESSION_BATCH: usize = 256;

/// A write to the shared Socket.IO sessions.
pub enum SessionOp {
    Save {
        pid: String,
        session: Vec<u8>,
        live: bool,
    },
    Forget(String),
}

/// Socket.IO recovery sessions in Redis, one key per session:
/// `<prefix>:s:<pid>`, expiring `history.ttl` after it was written. The
/// sessions of sockets connected here are written again (their expiry
/// pushed back) every third of that, so a session outlives its node by
/// `history.ttl` at most; a client whose node died recovers on another
/// within that. `GETDEL` takes one once, whichever node asks.
pub struct Sessions {
    client: redis::Client,
    prefix: String,
    ttl: Duration,
    ops: mpsc::Sender<SessionOp>,
    conn: Arc<std::sync::Mutex<Option<redis::aio::MultiplexedConnection>>>,
    metrics: Arc<crate::metrics::Metrics>,
}

impl Sessions {
    fn key(prefix: &str, pid: &str) -> String {
        format!("{prefix}:s:{pid}")
    }

    fn send(&self, op: SessionOp) {
        if self.ops.try_send(op).is_err() {
            self.metrics
                .cluster_messages
                .get_or_create(&[("kind", "session_unsent")])
                .inc();
        }
    }
}

impl SharedSessions for Sessions {
    fn save(&self, pid: &str, session: Vec<u8>, live: bool) {
        self.send(SessionOp::Save {
            pid: pid.to_string(),
            session,
            live,
        });
    }

    fn forget(&self, pid: &str) {
        self.send(SessionOp::Forget(pid.to_string()));
    }

    fn take(&self, pid: &str) -> SessionFetch {
        let client = self.client.clone();
        let slot = self.conn.clone();
        let key = Self::key(&self.prefix, pid);
        Box::pin(async move {
            let cached = slot.lock().unwrap_or_else(|e| e.into_inner()).clone();
            let mut conn = match cached {
                Some(c) => c,
                None => {
                    let c = timed(client.get_multiplexed_async_connection()).await?;
                    *slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(c.clone());
                    c
                }
            };
            let mut cmd = redis::cmd("GETDEL");
            cmd.arg(&key);
            let taken: Result<Option<Vec<u8>>, String> = timed(cmd.query_async(&mut conn)).await;
            if taken.is_err() {
                *slot.lock().unwrap_or_else(|e| e.into_inner()) = None;
            }
            taken
        })
    }
}

/// Writes the sessions, and pushes back the expiry of those still live.
async fn sessions_task(
    sessions: Arc<Sessions>,
    mut ops: mpsc::Receiver<SessionOp>,
    stop: CancellationToken,
) {
    let ttl_ms = u64::try_from(sessions.ttl.as_millis().max(1)).unwrap_or(u64::MAX);
    let refresh_every = (sessions.ttl / 3).max(Duration::from_millis(100));
    let mut refresh = tokio::time::interval(refresh_every);
    refresh.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut live: std::collections::HashSet<String> = std::collections::HashSet::new();
    let mut conn: Option<redis::aio::MultiplexedConnection> = None;
    let mut batch = Vec::with_capacity(SESSION_BATCH);
    loop {
        let mut pipe = redis::pipe();
        tokio::select! {
            _ = stop.cancelled() => return,
            n = ops.recv_many(&mut batch, SESSION_BATCH) => {
                if n == 0 {
                    return;
                }
                for op in batch.drain(..) {
                    match op {
                        SessionOp::Save { pid, session, live: is_live } => {
                            let key = Sessions::key(&sessions.prefix, &pid);
                            pipe.cmd("SET").arg(key).arg(session).arg("PX").arg(ttl_ms).ignore();
                            if is_live {
                                live.insert(pid);
                            } else {
                                live.remove(&pid);
                            }
                        }
                        SessionOp::Forget(pid) => {
                            pipe.cmd("DEL").arg(Sessions::key(&sessions.prefix, &pid)).ignore();
                            live.remove(&pid);
                        }
                    }
                }
            }
            _ = refresh.tick() => {
                if live.is_empty() {
                    continue;
                }
                for pid in &live {
                    pipe.cmd("PEXPIRE")
                        .arg(Sessions::key(&sessions.prefix, pid))
                        .arg(ttl_ms)
                        .ignore();
                }
            }
        }
        if conn.is_none() {
            conn = timed(sessions.client.get_multiplexed_async_connection())
                .await
                .ok();
        }
        let Some(c) = conn.as_mut() else {
            tracing::warn!("recovery sessions not written: Redis unavailable");
            continue;
        };
        if let Err(e) = timed(pipe.query_async::<()>(c)).await {
            tracing::warn!(error = %e, "recovery sessions not written");
            conn = None;
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
