//! Subscribed clients of either protocol, and the reader groups that drive
//! them: a few tasks, each polling many sockets (`FuturesUnordered`), each
//! with its own histogram and counters, merged at the end.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Buf;
use futures_util::stream::{FuturesUnordered, StreamExt};
use hdrhistogram::Histogram;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::net::{self, OP_CLOSE, OP_PING, OP_PONG, OP_TEXT, Result, WsConn, err};

/// Which wire protocol the clients speak.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Proto {
    /// pulso's `/ws` JSON protocol (also spoken by the Node and limit servers).
    Ws,
    /// Socket.IO v5 / Engine.IO 4 over WebSocket, namespace `/notifications`,
    /// authenticated by the `get` virtual request.
    Sio,
}

/// The name clients with topic index `k` listen on.
pub fn topic_name(proto: Proto, k: u32) -> String {
    match proto {
        Proto::Ws => format!("bench/t{k}"),
        // Joined through the `{role}_{tournamentId}` room template.
        Proto::Sio => format!("assistant_{k}"),
    }
}

pub struct Client {
    pub ws: WsConn,
    /// Topic index this client listens on.
    pub k: u32,
    /// Which of the target's client addresses it is connected to.
    pub server: usize,
    /// Bit per message sequence number: seen already.
    seen: Vec<u64>,
}

/// What a client needs to connect.
#[derive(Clone)]
pub struct Target {
    /// Where publishes (and `/metrics` reads) go.
    pub addr: SocketAddr,
    /// Where clients connect, round-robin: client `i` to
    /// `client_addrs[i % len]`. Never empty (`[addr]` by default).
    pub client_addrs: Vec<SocketAddr>,
    pub proto: Proto,
    pub token: String,
    pub per_ip: usize,
    /// Socket.IO clients poll first, then upgrade (see [`sio_upgrade`]).
    pub sio_upgrade: bool,
}

impl Target {
    /// The index in `client_addrs` of the server client `idx` connects to.
    pub fn server_of(&self, idx: usize) -> usize {
        idx % self.client_addrs.len().max(1)
    }

    /// The server client `idx` connects to.
    pub fn client_addr(&self, idx: usize) -> SocketAddr {
        self.client_addrs
            .get(self.server_of(idx))
            .copied()
            .unwrap_or(self.addr)
    }

    /// How Socket.IO clients reach the WebSocket, for the output.
    pub fn transport(&self) -> &'static str {
        match (self.proto, self.sio_upgrade) {
            (Proto::Sio, true) => "polling+upgrade",
            _ => "websocket",
        }
    }
}

const SETUP_WAIT: Duration = Duration::from_secs(20);

/// Connects client `idx`, subscribes it to topic `k` and waits for the
/// server to confirm, so that publishing may start right after.
pub async fn connect(t: &Target, idx: usize, k: u32) -> Result<Client> {
    let addr = t.client_addr(idx);
    let src = net::source_for(addr, idx, t.per_ip);
    let mut ws = match t.proto {
        Proto::Ws => {
            let mut ws = WsConn::connect(addr, src, &format!("/ws?token={}", t.token)).await?;
            let sub = format!(
                r#"{{"type":"sub","topic":"{}","id":1}}"#,
                topic_name(t.proto, k)
            );
            ws.send(OP_TEXT, sub.as_bytes()).await?;
            loop {
                let text = ws.next_text(SETUP_WAIT).await?;
                if net::find(&text, b"\"error\"").is_some() {
                    return Err(err(format!(
                        "subscribe refused: {}",
                        String::from_utf8_lossy(&text)
                    )));
                }
                if net::find(&text, b"\"ack\"").is_some() {
                    break ws;
                }
            }
        }
        Proto::Sio => {
            let mut ws = if t.sio_upgrade {
                sio_upgrade(addr, src).await?
            } else {
                let mut ws =
                    WsConn::connect(addr, src, "/socket.io/?EIO=4&transport=websocket").await?;
                let open = ws.next_text(SETUP_WAIT).await?;
                if !open.starts_with(b"0") {
                    return Err(err("no Engine.IO open packet"));
                }
                ws.send(OP_TEXT, b"40/notifications,").await?;
                ws
            };
            sio_wait(&mut ws, b"40/notifications", "namespace connect").await?;
            let get = format!(
                r#"42/notifications,1["get",{{"url":"/notifications","params":{{"jwt-api-key":"{}","tournamentId":{k}}}}}]"#,
                t.token
            );
            ws.send(OP_TEXT, get.as_bytes()).await?;
            let ack = sio_wait(&mut ws, b"43/notifications,1", "authentication").await?;
            if net::find(&ack, b"\"statusCode\":200").is_none() {
                return Err(err(format!(
                    "authentication refused: {}",
                    String::from_utf8_lossy(&ack)
                )));
            }
            ws
        }
    };
    ws.buf.reserve(2048);
    Ok(Client {
        ws,
        k,
        server: t.server_of(idx),
        seen: Vec::new(),
    })
}

/// What socket.io-client does by default: the Engine.IO handshake and the
/// namespace CONNECT over long-polling, then the upgrade to WebSocket
/// (`2probe`, `3probe`, `5`). The CONNECT's answer arrives on the WebSocket.
async fn sio_upgrade(addr: SocketAddr, src: Option<std::net::IpAddr>) -> Result<WsConn> {
    let mut http = net::Http::connect(addr).await?;
    let (status, open) = http
        .request("GET", "/socket.io/?EIO=4&transport=polling", None, b"")
        .await?;
    let sid = net::find(&open, b"\"sid\":\"")
        .map(|at| &open[at + 7..])
        .and_then(|rest| Some(&rest[..net::find(rest, b"\"")?]))
        .filter(|_| status == 200 && open.starts_with(b"0"))
        .ok_or_else(|| err("no Engine.IO open packet over polling"))?;
    let sid = String::from_utf8_lossy(sid).into_owned();
    let polling = format!("/socket.io/?EIO=4&transport=polling&sid={sid}");
    let (status, _) = http
        .request("POST", &polling, None, b"40/notifications,")
        .await?;
    if status != 200 {
        return Err(err(format!(
            "namespace CONNECT over polling: HTTP {status}"
        )));
    }
    let upgrade = format!("/socket.io/?EIO=4&transport=websocket&sid={sid}");
    let mut ws = WsConn::connect(addr, src, &upgrade).await?;
    ws.send(OP_TEXT, b"2probe").await?;
    if ws.next_text(SETUP_WAIT).await? != b"3probe" {
        return Err(err("no answer to the upgrade probe"));
    }
    ws.send(OP_TEXT, b"5").await?;
    Ok(ws)
}

async fn sio_wait(ws: &mut WsConn, prefix: &[u8], what: &str) -> Result<Vec<u8>> {
    loop {
        let text = ws.next_text(SETUP_WAIT).await?;
        if text == b"2" {
            ws.send(OP_TEXT, b"3").await?;
        } else if text.starts_with(prefix) {
            return Ok(text);
        } else if text.starts_with(b"44") {
            return Err(err(format!(
                "{what} refused: {}",
                String::from_utf8_lossy(&text)
            )));
        }
    }
}

/// State shared by the publisher and the reader groups.
pub struct Shared {
    pub start: Instant,
    pub proto: Proto,
    pub topics: u32,
    /// Per sequence number: distinct clients that received it.
    pub delivered: Vec<AtomicU32>,
    /// How many clients should receive each topic index.
    pub expected: Vec<u32>,
    /// Signalled when some message reached all its recipients.
    pub complete: Notify,
    pub unique_total: AtomicU64,
    /// Latest receive time, ns since `start`.
    pub last_recv_ns: AtomicU64,
}

impl Shared {
    pub fn new(proto: Proto, topics: u32, messages: usize, expected: Vec<u32>) -> Self {
        Shared {
            start: Instant::now(),
            proto,
            topics,
            delivered: (0..messages).map(|_| AtomicU32::new(0)).collect(),
            expected,
            complete: Notify::new(),
            unique_total: AtomicU64::new(0),
            last_recv_ns: AtomicU64::new(0),
        }
    }

    pub fn now_ns(&self) -> u64 {
        self.start.elapsed().as_nanos() as u64
    }

    pub fn is_complete(&self, seq: usize) -> bool {
        let k = seq % self.topics as usize;
        self.delivered[seq].load(Ordering::Acquire) >= self.expected[k]
    }
}

/// Counters of one reader group (merged into the run's result).
pub struct GroupStats {
    /// Latency in microseconds.
    pub hist: Histogram<u64>,
    pub unique: u64,
    pub duplicates: u64,
    pub misrouted: u64,
    pub unparsable: u64,
    pub closed: u64,
    pub close_codes: Vec<u16>,
    pub errors: u64,
}

impl GroupStats {
    pub fn new() -> Self {
        GroupStats {
            hist: Histogram::new_with_bounds(1, 120_000_000, 3).expect("valid histogram bounds"),
            unique: 0,
            duplicates: 0,
            misrouted: 0,
            unparsable: 0,
            closed: 0,
            close_codes: Vec::new(),
            errors: 0,
        }
    }

    pub fn merge(&mut self, o: GroupStats) {
        let _ = self.hist.add(&o.hist);
        self.unique += o.unique;
        self.duplicates += o.duplicates;
        self.misrouted += o.misrouted;
        self.unparsable += o.unparsable;
        self.closed += o.closed;
        self.close_codes.extend(o.close_codes);
        self.errors += o.errors;
    }
}

async fn read_once(mut c: Client) -> (Client, std::io::Result<usize>) {
    if c.ws.buf.capacity() - c.ws.buf.len() < 1024 {
        c.ws.buf.reserve(4096);
    }
    let r = c.ws.stream.read_buf(&mut c.ws.buf).await;
    (c, r)
}

/// Drives `clients` until `stop` (then drops them); returns its counters.
pub async fn run_group(
    clients: Vec<Client>,
    shared: Arc<Shared>,
    stop: CancellationToken,
) -> GroupStats {
    let mut stats = GroupStats::new();
    let mut futs = FuturesUnordered::new();
    for c in clients {
        futs.push(read_once(c));
    }
    let mut replies = Vec::new();
    loop {
        let next = tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            next = futs.next() => next,
        };
        let Some((mut c, res)) = next else {
            // Every client is gone; wait for the end.
            stop.cancelled().await;
            break;
        };
        match res {
            Ok(0) => {
                stats.closed += 1;
                continue;
            }
            Err(_) => {
                stats.errors += 1;
                continue;
            }
            Ok(_) => {}
        }
        let now = shared.now_ns();
        replies.clear();
        let open = process(&mut c, &shared, &mut stats, now, &mut replies);
        if !replies.is_empty() && c.ws.stream.write_all(&replies).await.is_err() {
            stats.errors += 1;
            continue;
        }
        if open {
            futs.push(read_once(c));
        } else {
            stats.closed += 1;
        }
    }
    stats
}

/// Parses every complete frame in the client's buffer. False: the server closed.
fn process(
    c: &mut Client,
    shared: &Shared,
    stats: &mut GroupStats,
    now: u64,
    replies: &mut Vec<u8>,
) -> bool {
    let mut open = true;
    while let Some((op, hdr, len)) = net::frame_at(&c.ws.buf) {
        let payload = &c.ws.buf[hdr..hdr + len];
        match op {
            OP_TEXT => match shared.proto {
                Proto::Sio if payload == b"2" => net::client_frame(replies, OP_TEXT, b"3"),
                Proto::Sio if !payload.starts_with(b"42") => {}
                _ => {
                    if let Some(at) = net::SEQ_KEY.find(payload) {
                        on_message(c.k, &mut c.seen, payload, at, shared, stats, now);
                    } else if shared.proto == Proto::Sio {
                        stats.unparsable += 1;
                    }
                }
            },
            OP_PING => net::client_frame(replies, OP_PONG, payload),
            OP_CLOSE => {
                let code = payload
                    .get(..2)
                    .map(|b| u16::from_be_bytes([b[0], b[1]]))
                    .unwrap_or(1005);
                stats.close_codes.push(code);
                open = false;
            }
            _ => {}
        }
        c.ws.buf.advance(hdr + len);
        if !open {
            break;
        }
    }
    open
}

fn on_message(
    ck: u32,
    seen: &mut Vec<u64>,
    payload: &[u8],
    seq_at: usize,
    shared: &Shared,
    stats: &mut GroupStats,
    now: u64,
) {
    let Some((seq, k, sent)) = net::bench_fields(payload, seq_at) else {
        stats.unparsable += 1;
        return;
    };
    let seq = seq as usize;
    if seq >= shared.delivered.len() {
        stats.unparsable += 1;
        return;
    }
    if k as u32 != ck || seq % shared.topics as usize != ck as usize {
        stats.misrouted += 1;
        return;
    }
    let (word, bit) = (seq / 64, 1u64 << (seq % 64));
    if seen.len() <= word {
        seen.resize(word + 1, 0);
    }
    if seen[word] & bit != 0 {
        stats.duplicates += 1;
        return;
    }
    seen[word] |= bit;
    stats.unique += 1;
    let _ = stats.hist.record((now.saturating_sub(sent) / 1000).max(1));
    shared.unique_total.fetch_add(1, Ordering::Relaxed);
    shared.last_recv_ns.fetch_max(now, Ordering::Relaxed);
    let got = shared.delivered[seq].fetch_add(1, Ordering::AcqRel) + 1;
    if got == shared.expected[ck as usize] {
        shared.complete.notify_waiters();
    }
}

/// Connects `n` clients, `concurrency` at a time; client `i` listens on
/// topic `i % topics`. Returns the clients, the failures (first few
/// messages kept) and the elapsed time.
pub async fn connect_many(
    t: &Target,
    n: usize,
    topics: u32,
    concurrency: usize,
) -> (Vec<Client>, usize, Vec<String>, Duration) {
    let started = Instant::now();
    let mut results = futures_util::stream::iter(0..n)
        .map(|i| {
            let t = t.clone();
            async move { connect(&t, i, (i % topics as usize) as u32).await }
        })
        .buffer_unordered(concurrency.max(1));
    let mut clients = Vec::with_capacity(n);
    let (mut failures, mut messages) = (0, Vec::new());
    while let Some(r) = results.next().await {
        match r {
            Ok(c) => clients.push(c),
            Err(e) => {
                failures += 1;
                if messages.len() < 5 {
                    messages.push(e.to_string());
                }
            }
        }
    }
    (clients, failures, messages, started.elapsed())
}

/// Splits clients into `groups` reader tasks.
pub fn spawn_groups(
    clients: Vec<Client>,
    groups: usize,
    shared: &Arc<Shared>,
    stop: &CancellationToken,
) -> Vec<tokio::task::JoinHandle<GroupStats>> {
    let groups = groups.max(1);
    let mut parts: Vec<Vec<Client>> = (0..groups).map(|_| Vec::new()).collect();
    for (i, c) in clients.into_iter().enumerate() {
        parts[i % groups].push(c);
    }
    parts
        .into_iter()
        .map(|p| tokio::spawn(run_group(p, shared.clone(), stop.clone())))
        .collect()
}

/// Per client address of `t`: how many of `clients` are connected to it.
pub fn per_server(t: &Target, clients: &[Client]) -> Vec<usize> {
    let mut v = vec![0usize; t.client_addrs.len().max(1)];
    for c in clients {
        v[c.server] += 1;
    }
    v
}

/// Per topic index: how many of `clients` listen on it.
pub fn expected_per_topic(clients: &[Client], topics: u32) -> Vec<u32> {
    let mut v = vec![0u32; topics as usize];
    for c in clients {
        v[c.k as usize] += 1;
    }
    v
}
