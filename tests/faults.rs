//! Faults across a real network: pulso runs on the host, clients in other
//! network namespaces joined to it by veth links (`support/netlab.rs`):
//!
//! - a link with 200 ms delay each way and 5 % loss each way: clients
//!   connect, subscribe and receive every message, in order;
//! - a cut link: the server frees the clients' connections, subscriptions
//!   and presence rows within its keepalive, the clients notice, and they
//!   reconnect when the link comes back; meanwhile a client on the loopback
//!   keeps its latency;
//! - a reader behind 64 kbit/s (`tc tbf`) is closed as a slow consumer
//!   (`pulso_slow_consumer_closes_total`) and gets its close frame (1013),
//!   while the loopback clients keep their latency.
//!
//! Root and `ip netns` are needed; without them each test prints why it is
//! skipped (and fails under `PULSO_REQUIRE_SERVICES=1`). The tests run one
//! at a time: two of them measure latency.

mod common;
#[path = "support/netlab.rs"]
mod netlab;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use common::*;
use futures_util::{SinkExt, StreamExt};
use netlab::{Lab, Ns};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tokio_util::sync::CancellationToken;

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Microseconds since the first call (the clock in every payload).
fn now_us() -> u64 {
    static BASE: OnceLock<Instant> = OnceLock::new();
    BASE.get_or_init(Instant::now).elapsed().as_micros() as u64
}

/// A server listening on every address of the host (so that the
/// namespaces reach it over their links), with `extra` settings.
async fn server(extra: &str) -> TestServer {
    TestServer::start_toml(&format!(
        "listen = \"0.0.0.0:0\"\nauto_subscribe = []\n{extra}"
    ))
    .await
}

fn loopback(srv: &TestServer) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], srv.addr.port()))
}

/// Opens `/ws` to `server` from namespace `ns` (or this one) as user
/// `sub` (each its own presence row) and subscribes to `topic`, all within
/// `wait`.
async fn connect(
    srv: &TestServer,
    ns: Option<&Ns>,
    server: SocketAddr,
    sub: &str,
    topic: &str,
    wait: Duration,
) -> Result<Ws, String> {
    let token = srv.token("assistant", sub);
    let attempt = async {
        let socket = match ns {
            Some(ns) => ns.tcp_socket(),
            None => tokio::net::TcpSocket::new_v4(),
        }
        .map_err(|e| format!("socket: {e}"))?;
        let tcp = socket
            .connect(server)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        tcp.set_nodelay(true).map_err(|e| e.to_string())?;
        let url = format!("ws://{server}/ws?token={token}");
        let (mut ws, _) = tokio_tungstenite::client_async(url, MaybeTlsStream::Plain(tcp))
            .await
            .map_err(|e| format!("handshake: {e}"))?;
        let sub = json!({"type": "sub", "topic": topic, "id": 1});
        ws.send(Message::text(sub.to_string()))
            .await
            .map_err(|e| format!("sub: {e}"))?;
        loop {
            match ws.next().await {
                Some(Ok(Message::Text(t))) => {
                    let v: Value = serde_json::from_str(&t).map_err(|e| e.to_string())?;
                    if v["type"] == "ack" && v["id"] == 1 {
                        return Ok(ws);
                    }
                }
                Some(Ok(_)) => {}
                other => return Err(format!("before the ack: {other:?}")),
            }
        }
    };
    tokio::time::timeout(wait, attempt)
        .await
        .map_err(|_| format!("not subscribed within {wait:?}"))?
}

/// A published message's `n` and `at` (µs, [`now_us`]), if it is one.
fn published(msg: &Message) -> Option<(u64, u64)> {
    let Message::Text(t) = msg else { return None };
    let v: Value = serde_json::from_str(t).ok()?;
    Some((v["payload"]["n"].as_u64()?, v["payload"]["at"].as_u64()?))
}

/// Publishes `{"n", "at", "pad"}` to `topic` at `rate` per second until
/// `stop` (or `count` messages); returns how many were accepted.
fn publisher(
    srv: &TestServer,
    topic: &str,
    rate: f64,
    count: Option<u64>,
    pad: usize,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<u64> {
    let url = format!("http://{}/api/publish", loopback(srv));
    let token = srv.token("admin", "faults-publisher");
    let (topic, pad) = (topic.to_string(), "x".repeat(pad));
    tokio::spawn(async move {
        let http = reqwest::Client::new();
        let started = tokio::time::Instant::now();
        let mut n = 0u64;
        while !stop.is_cancelled() && count.is_none_or(|c| n < c) {
            let due = started + Duration::from_secs_f64(n as f64 / rate);
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tokio::time::sleep_until(due) => {}
            }
            let body = json!({"topic": topic, "payload": {"n": n, "at": now_us(), "pad": pad}});
            let sent = http.post(&url).bearer_auth(&token).json(&body).send().await;
            assert!(sent.is_ok_and(|r| r.status() == 200), "publish {n} refused");
            n += 1;
        }
        n
    })
}

/// Latencies (µs) with their arrival times, recorded by a loopback client.
#[derive(Default)]
struct Probe {
    samples: Mutex<Vec<(u64, u64)>>,
}

impl Probe {
    /// Reads `ws` until `stop`, recording each message's latency.
    fn run(self: &Arc<Self>, mut ws: Ws, stop: CancellationToken) -> tokio::task::JoinHandle<()> {
        let me = self.clone();
        tokio::spawn(async move {
            loop {
                let msg = tokio::select! {
                    _ = stop.cancelled() => break,
                    msg = ws.next() => msg,
                };
                match msg {
                    Some(Ok(m)) => {
                        if let Some((_, at)) = published(&m) {
                            let now = now_us();
                            me.samples
                                .lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .push((now, now.saturating_sub(at)));
                        }
                    }
                    other => panic!("the loopback client lost its connection: {other:?}"),
                }
            }
        })
    }

    /// (count, p50 ms, p99 ms, max ms) of the messages that arrived in `[from, to)`.
    fn window(&self, from: u64, to: u64) -> (usize, f64, f64, f64) {
        let mut v: Vec<u64> = self
            .samples
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|(t, _)| *t >= from && *t < to)
            .map(|(_, l)| *l)
            .collect();
        v.sort_unstable();
        if v.is_empty() {
            return (0, f64::NAN, f64::NAN, f64::NAN);
        }
        let pct = |p: f64| {
            v[((v.len() as f64 * p).ceil() as usize).clamp(1, v.len()) - 1] as f64 / 1000.0
        };
        (
            v.len(),
            pct(0.50),
            pct(0.99),
            *v.last().unwrap_or(&0) as f64 / 1000.0,
        )
    }
}

/// Sum of every sample of `family` in `/metrics`.
async fn metric(srv: &TestServer, family: &str) -> f64 {
    let text = reqwest::get(format!("http://{}/metrics", loopback(srv)))
        .await
        .expect("/metrics")
        .text()
        .await
        .expect("/metrics body");
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.strip_prefix(family)
                .is_some_and(|r| r.starts_with(' ') || r.starts_with('{'))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

async fn presence_rows(srv: &TestServer) -> usize {
    let admin = srv.token("admin", "faults-admin");
    let (status, body) = get_json(
        &format!("http://{}/api/presence", loopback(srv)),
        Some(&admin),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    body["sockets"].as_array().map_or(0, |a| a.len())
}

/// Waits until the connections gauge and the presence rows are both `n`;
/// returns how long that took.
async fn until_held(srv: &TestServer, n: usize, wait: Duration, what: &str) -> Duration {
    let started = Instant::now();
    loop {
        let conns = metric(srv, "pulso_connections").await as usize;
        let rows = presence_rows(srv).await;
        if conns == n && rows == n {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < wait,
            "{what}: after {wait:?}, {conns} connections and {rows} presence rows, expected {n}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// (a) 200 ms each way and 5 % loss each way: every client connects,
/// subscribes and receives every message once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_behind_a_slow_lossy_link_connect_and_receive_everything() {
    let _one = ONE_AT_A_TIME.lock().await;
    let Some(mut lab) = Lab::new() else { return };
    let link = lab.emulated().expect("emulated link");
    let srv = server("keepalive_interval = \"10s\"\n").await;
    let addr = link.ns.server(srv.addr.port());
    link.set(Duration::from_millis(200), 0.05);

    const CLIENTS: usize = 20;
    const MESSAGES: u64 = 20;
    let started = Instant::now();
    let connects = futures_util::future::join_all((0..CLIENTS).map(|i| {
        let srv = &srv;
        let ns = &link.ns;
        async move {
            let t = Instant::now();
            let ws = connect(
                srv,
                Some(ns),
                addr,
                &format!("lossy-{i}"),
                "faults/a",
                Duration::from_secs(30),
            )
            .await;
            (ws, t.elapsed())
        }
    }))
    .await;
    let mut clients = Vec::new();
    let mut connect_ms = Vec::new();
    for (ws, took) in connects {
        clients.push(ws.expect("a client behind the lossy link connects"));
        connect_ms.push(took.as_millis() as u64);
    }
    connect_ms.sort_unstable();
    until_held(&srv, CLIENTS, Duration::from_secs(10), "connected").await;

    let stop = CancellationToken::new();
    let publishing = publisher(&srv, "faults/a", 10.0, Some(MESSAGES), 64, stop.clone());
    let readers = clients.into_iter().map(|mut ws| async move {
        let mut latencies = Vec::new();
        while (latencies.len() as u64) < MESSAGES {
            let msg = tokio::time::timeout(Duration::from_secs(30), ws.next())
                .await
                .expect("every message within 30 s")
                .expect("open")
                .expect("no error");
            if let Some((n, at)) = published(&msg) {
                assert_eq!(n, latencies.len() as u64, "in order, once each");
                latencies.push(now_us().saturating_sub(at));
            }
        }
        latencies
    });
    let mut all: Vec<u64> = futures_util::future::join_all(readers)
        .await
        .into_iter()
        .flatten()
        .collect();
    assert_eq!(publishing.await.expect("publisher"), MESSAGES);
    all.sort_unstable();
    let ms = |us: u64| us as f64 / 1000.0;
    let (forwarded, dropped, send_errors) = link.counters();
    eprintln!(
        "lossy link: {CLIENTS} clients subscribed, median {} ms, slowest {} ms; \
         {} deliveries: min {:.0} ms, p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms; \
         frames forwarded {forwarded}, dropped {dropped}, send errors {send_errors}; total {:?}",
        connect_ms[CLIENTS / 2],
        connect_ms[CLIENTS - 1],
        all.len(),
        ms(all[0]),
        ms(all[all.len() / 2]),
        ms(all[all.len() * 99 / 100]),
        ms(all[all.len() - 1]),
        started.elapsed()
    );
    assert_eq!(all.len() as u64, CLIENTS as u64 * MESSAGES);
    // The link really was slow and lossy.
    assert!(all[0] >= 200_000, "no delivery can beat the 200 ms delay");
    assert!(dropped > 0, "5 % of the frames were dropped");
    assert_eq!(send_errors, 0, "every frame fitted the link");
    stop.cancel();
    drop(lab);
    srv.stop().await;
}

/// (b) and (c): the link to 40 clients is cut. Within its keepalive (1 s
/// here) the server frees their connections, subscriptions and presence
/// rows; a client on the loopback keeps its latency meanwhile; when the link
/// comes back, every client reconnects on its own and receives again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_link_frees_state_within_the_keepalive_and_clients_come_back() {
    let _one = ONE_AT_A_TIME.lock().await;
    let Some(mut lab) = Lab::new() else { return };
    let link = Arc::new(lab.emulated().expect("emulated link"));
    let srv = Arc::new(server("keepalive_interval = \"1s\"\n").await);
    let addr = link.ns.server(srv.addr.port());

    let stop = CancellationToken::new();
    let probe = Arc::new(Probe::default());
    let local = connect(&srv, None, loopback(&srv), "local", "faults/b", WAIT)
        .await
        .expect("loopback client");
    let probing = probe.run(local, stop.clone());

    // Clients behind the link: each holds a connection and, when nothing
    // (not even the server's ping) has come for 3 s, drops it and
    // reconnects, as a browser client with a heartbeat does.
    const CLIENTS: usize = 40;
    let reconnects = Arc::new(AtomicU64::new(0));
    let silent_now = Arc::new(AtomicUsize::new(0));
    let received_since = Arc::new(Mutex::new(vec![0u64; CLIENTS]));
    let mut tasks = Vec::new();
    for i in 0..CLIENTS {
        let (srv, link, stop) = (srv.clone(), link.clone(), stop.clone());
        let (reconnects, silent_now, received_since) = (
            reconnects.clone(),
            silent_now.clone(),
            received_since.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut first = true;
            while !stop.is_cancelled() {
                let Ok(mut ws) = connect(
                    &srv,
                    Some(&link.ns),
                    addr,
                    &format!("behind-{i}"),
                    "faults/b",
                    Duration::from_secs(2),
                )
                .await
                else {
                    // Retry after a pause, as a client library backs off.
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                };
                if !first {
                    reconnects.fetch_add(1, Ordering::Relaxed);
                }
                first = false;
                loop {
                    let next = tokio::select! {
                        _ = stop.cancelled() => return,
                        next = tokio::time::timeout(Duration::from_secs(3), ws.next()) => next,
                    };
                    match next {
                        Ok(Some(Ok(m))) => {
                            if published(&m).is_some() {
                                received_since.lock().unwrap_or_else(|e| e.into_inner())[i] += 1;
                            }
                        }
                        Err(_) => {
                            silent_now.fetch_add(1, Ordering::Relaxed);
                            received_since.lock().unwrap_or_else(|e| e.into_inner())[i] = 0;
                            break;
                        }
                        Ok(_) => break,
                    }
                }
            }
        }));
    }
    let held = until_held(&srv, CLIENTS + 1, Duration::from_secs(20), "all connected").await;
    let publishing = publisher(&srv, "faults/b", 50.0, None, 64, stop.clone());

    let before_from = now_us();
    tokio::time::sleep(Duration::from_secs(3)).await; // a window to measure, not a wait for an event
    let cut_at = now_us();
    let cut = Instant::now();
    link.cut();
    let freed = until_held(&srv, 1, Duration::from_secs(6), "state freed after the cut").await;
    assert_eq!(
        metric(&srv, "pulso_subscriptions").await,
        1.0,
        "only the loopback client's"
    );
    assert_eq!(metric(&srv, "pulso_topics").await, 1.0);
    // Every client behind the link notices (3 s of silence) before it comes back.
    let noticed = Instant::now();
    while silent_now.load(Ordering::Relaxed) < CLIENTS {
        assert!(
            noticed.elapsed() < Duration::from_secs(10),
            "clients notice the cut"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let restore_at = now_us();
    let cut_for = cut.elapsed();
    link.restore();
    let restored = Instant::now();
    let back = until_held(&srv, CLIENTS + 1, Duration::from_secs(20), "reconnected").await;
    loop {
        let receiving = received_since
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|n| **n > 0)
            .count();
        if receiving == CLIENTS {
            break;
        }
        assert!(
            restored.elapsed() < Duration::from_secs(20),
            "{receiving}/{CLIENTS} reconnected clients receive"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let receiving_after = restored.elapsed();

    let before = probe.window(before_from, cut_at);
    let during = probe.window(cut_at, restore_at);
    eprintln!(
        "cut link: {CLIENTS} clients held in {held:?}; cut for {cut_for:?}; connections and \
         presence rows freed {freed:?} after the cut (keepalive 1 s); back {back:?} after the \
         restore, all receiving after {receiving_after:?}; {} reconnects; loopback client \
         before: {} msgs p50 {:.2} ms p99 {:.2} ms max {:.2} ms; during the cut: {} msgs p50 \
         {:.2} ms p99 {:.2} ms max {:.2} ms",
        reconnects.load(Ordering::Relaxed),
        before.0,
        before.1,
        before.2,
        before.3,
        during.0,
        during.1,
        during.2,
        during.3
    );
    assert!(
        freed <= Duration::from_secs(3),
        "freed within two keepalive periods and a commit"
    );
    assert!(reconnects.load(Ordering::Relaxed) >= CLIENTS as u64);
    assert!(
        before.0 >= 100 && during.0 >= 100,
        "the loopback client kept receiving"
    );
    assert!(
        during.2 <= before.2 * 2.0 + 50.0,
        "the loopback client keeps its latency: p99 {:.2} ms before, {:.2} ms during the cut",
        before.2,
        during.2
    );
    stop.cancel();
    publishing.await.expect("publisher");
    probing.await.expect("probe");
    for t in tasks {
        t.await.expect("client task");
    }
    drop(lab);
    Arc::try_unwrap(srv)
        .ok()
        .expect("the only server handle")
        .stop()
        .await;
}

/// (d) A reader behind 64 kbit/s cannot keep up with 1 KiB messages at 50
/// per second: it is closed as a slow consumer (counted in
/// `pulso_slow_consumer_closes_total`, its connection and presence row
/// freed) once it is `ws.outbound_queue` messages behind, it receives the
/// close frame (1013), and two clients on the loopback keep their latency.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_behind_64_kbit_is_closed_as_a_slow_consumer() {
    let _one = ONE_AT_A_TIME.lock().await;
    let Some(mut lab) = Lab::new() else { return };
    let ns = lab.direct(Some(64)).expect("rate-limited link");
    let srv = server("[ws]\noutbound_queue = 64\n").await;

    let stop = CancellationToken::new();
    let probe = Arc::new(Probe::default());
    let mut probing = Vec::new();
    for i in 0..2 {
        let ws = connect(
            &srv,
            None,
            loopback(&srv),
            &format!("local-{i}"),
            "faults/d",
            WAIT,
        )
        .await
        .expect("loopback client");
        probing.push(probe.run(ws, stop.clone()));
    }
    let publishing = publisher(&srv, "faults/d", 50.0, None, 1024, stop.clone());
    tokio::time::sleep(Duration::from_secs(3)).await; // a window to measure, not a wait for an event
    let slow_from = now_us();
    let closes_before = metric(&srv, "pulso_slow_consumer_closes_total").await;

    let mut slow = connect(
        &srv,
        Some(&ns),
        ns.server(srv.addr.port()),
        "slow",
        "faults/d",
        Duration::from_secs(10),
    )
    .await
    .expect("the slow reader connects");
    let joined = Instant::now();
    // It reads everything the link lets through, until the server closes.
    let reading = tokio::spawn(async move {
        let (mut msgs, mut bytes) = (0u64, 0usize);
        loop {
            match tokio::time::timeout(Duration::from_secs(60), slow.next()).await {
                Ok(Some(Ok(Message::Close(frame)))) => {
                    return (frame.map(|f| u16::from(f.code)), msgs, bytes);
                }
                Ok(Some(Ok(m))) => {
                    msgs += 1;
                    bytes += m.len();
                }
                Ok(_) => return (None, msgs, bytes),
                Err(_) => panic!("the slow reader is never closed"),
            }
        }
    });
    let mut closed_after = None;
    while closed_after.is_none() {
        if metric(&srv, "pulso_slow_consumer_closes_total").await > closes_before {
            closed_after = Some(joined.elapsed());
        }
        assert!(
            joined.elapsed() < Duration::from_secs(30),
            "closed as a slow consumer"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let closed_at = now_us();
    until_held(&srv, 2, Duration::from_secs(5), "the slow reader gone").await;
    let (code, msgs, bytes) = reading.await.expect("slow reader");
    let seen_close = joined.elapsed();
    tokio::time::sleep(Duration::from_secs(2)).await; // a window to measure, not a wait for an event
    let before = probe.window(0, slow_from);
    let during = probe.window(slow_from, closed_at);
    let after = probe.window(closed_at, now_us());
    eprintln!(
        "slow reader behind 64 kbit/s: closed by the server {closed_after:?} after joining, its \
         close frame {code:?} seen after {seen_close:?} ({msgs} frames, {bytes} bytes read); \
         loopback clients p99 before {:.2} ms ({} msgs), while it lagged {:.2} ms ({} msgs), \
         after {:.2} ms ({} msgs)",
        before.2, before.0, during.2, during.0, after.2, after.0
    );
    // The server frees the connection at once; its close frame waits
    // behind what the kernel already holds for this socket, which
    // `ws.socket_unsent` keeps to tens of KB, and pulso gives a slow
    // consumer's close 10 s, enough for that at 64 kbit/s.
    assert_eq!(
        code,
        Some(1013),
        "the slow reader gets its close frame ({msgs} frames, {bytes} bytes read)"
    );
    assert!(
        closed_after.is_some_and(|d| d < Duration::from_secs(10)),
        "closed within seconds of falling behind"
    );
    assert!(
        during.2 <= before.2 * 2.0 + 50.0,
        "the loopback clients keep their latency: p99 {:.2} ms before, {:.2} ms meanwhile",
        before.2,
        during.2
    );
    stop.cancel();
    publishing.await.expect("publisher");
    for p in probing {
        p.await.expect("probe");
    }
    drop(lab);
    srv.stop().await;
}
