//! `fanout` and `sio-fanout`: N subscribed clients, M messages published
//! through the HTTP API (at a fixed rate, or as fast as the deliveries come
//! back with a bounded window), each carrying its send time.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::clients::{self, GroupStats, Proto, Shared, Target};
use crate::measure::{MeasureArgs, Probe};
use crate::net::{Http, Result, err};
use crate::report;

#[derive(clap::Args, Clone, Debug)]
pub struct FanoutArgs {
    /// Subscribed clients.
    #[arg(long, default_value_t = 2000)]
    pub clients: usize,
    /// Topics (rooms); client i listens on topic i % topics, message j goes to topic j % topics.
    #[arg(long, default_value_t = 1)]
    pub topics: u32,
    /// Messages to publish.
    #[arg(long, default_value_t = 1000)]
    pub messages: usize,
    /// Messages per second offered (ignored with --max).
    #[arg(long, default_value_t = 50.0)]
    pub rate: f64,
    /// Publish as fast as deliveries come back: at most --window messages
    /// not yet received by all their subscribers.
    #[arg(long)]
    pub max: bool,
    /// Messages in flight in --max mode (keep it below the server's
    /// per-connection queue: pulso's `ws.outbound_queue` is 1024).
    #[arg(long, default_value_t = 32)]
    pub window: usize,
    /// Concurrent HTTP publishers (keep-alive connections). At a rate,
    /// message j goes through publisher j % publishers at its scheduled time.
    #[arg(long, default_value_t = 4)]
    pub publishers: usize,
    /// Padding bytes added to each payload.
    #[arg(long, default_value_t = 64)]
    pub payload: usize,
    /// Seconds to wait for the last deliveries after the last publish
    /// (what has not arrived by then counts as lost).
    #[arg(long, default_value_t = 30)]
    pub drain: u64,
    #[command(flatten)]
    pub measure: MeasureArgs,
}

pub async fn run(t: &Target, a: &FanoutArgs, common: &crate::Common) -> Result<Value> {
    if a.topics == 0 || a.messages == 0 || a.clients == 0 {
        return Err(err("--clients, --topics and --messages must be at least 1"));
    }
    if a.clients < a.topics as usize {
        return Err(err("--clients must be at least --topics"));
    }
    let probe = Probe::new(&a.measure)?;
    let (clients, failures, failure_msgs, connect_time) =
        clients::connect_many(t, a.clients, a.topics, common.connect_concurrency).await;
    for m in &failure_msgs {
        eprintln!("connect failure: {m}");
    }
    if clients.is_empty() {
        return Err(err("no client could connect"));
    }
    let connected = clients.len();
    let per_server = clients::per_server(t, &clients);
    let expected = clients::expected_per_topic(&clients, a.topics);
    let expected_total: u64 = (0..a.messages)
        .map(|j| expected[j % a.topics as usize] as u64)
        .sum();
    let shared = Arc::new(Shared::new(t.proto, a.topics, a.messages, expected));
    let stop = CancellationToken::new();
    let groups = clients::spawn_groups(clients, common.groups, &shared, &stop);

    // Server CPU, Redis and backplane counters: from the first publish to
    // the last delivery (or the end of the drain).
    let before = probe.snapshot().await?;
    let (pub_stats, pub_start, pub_end) = publish_all(t, a, common, &shared).await?;

    // Drain: wait for every expected delivery, or the deadline.
    let deadline = Instant::now() + Duration::from_secs(a.drain);
    while shared.unique_total.load(Ordering::Relaxed) < expected_total && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let after = probe.snapshot().await?;
    stop.cancel();
    let mut stats = GroupStats::new();
    for g in groups {
        stats.merge(
            g.await
                .map_err(|e| err(format!("reader task failed: {e}")))?,
        );
    }

    let last_ns = shared.last_recv_ns.load(Ordering::Relaxed);
    let delivery_secs = (last_ns.saturating_sub(pub_start) as f64 / 1e9).max(1e-9);
    let publish_secs = (pub_end.saturating_sub(pub_start) as f64 / 1e9).max(1e-9);
    let mut out = json!({
        "scenario": if t.proto == Proto::Sio { "sio-fanout" } else { "fanout" },
        "server": common.label,
        "transport": t.transport(),
        "mode": if a.max { "max".to_string() } else { format!("rate {}/s", a.rate) },
        "clients": connected,
        "connect_failures": failures,
        "connect_s": round(connect_time.as_secs_f64(), 2),
        "topics": a.topics,
        "messages": a.messages,
        "publish_errors": pub_stats.errors,
        "published_msgs_per_s": round(pub_stats.ok as f64 / publish_secs, 1),
        "offered_deliveries_per_s": if a.max { Value::Null } else { json!(round(a.rate * connected as f64 / a.topics as f64, 0)) },
        "deliveries": stats.unique,
        "deliveries_per_s": round(stats.unique as f64 / delivery_secs, 0),
        "expected": expected_total,
        "lost": expected_total.saturating_sub(stats.unique),
        "duplicates": stats.duplicates,
        "misrouted": stats.misrouted,
        "unparsable": stats.unparsable,
        "closed_by_server": stats.closed,
        "read_errors": stats.errors,
    });
    if t.client_addrs.len() > 1 {
        out["clients_per_server"] = json!(per_server);
    }
    report::add_latency(&mut out, &stats.hist);
    probe.report(&before, &after, stats.unique, pub_stats.ok, &mut out);
    if !stats.close_codes.is_empty() {
        out["close_codes"] = json!(report::count_codes(&stats.close_codes));
    }
    Ok(out)
}

pub fn round(x: f64, digits: i32) -> f64 {
    let f = 10f64.powi(digits);
    (x * f).round() / f
}

pub struct PubStats {
    pub ok: u64,
    pub errors: u64,
}

/// The payload of message `seq` (its topic index and send time included).
pub fn body(proto: Proto, seq: usize, k: u32, sent_ns: u64, pad: &str) -> Vec<u8> {
    let payload = format!(r#"{{"seq":{seq},"k":{k},"sent":{sent_ns},"pad":"{pad}"}}"#);
    let name = clients::topic_name(proto, k);
    match proto {
        Proto::Ws => format!(r#"{{"topic":"{name}","payload":{payload}}}"#),
        Proto::Sio => format!(r#"{{"rooms":"{name}","data":{payload}}}"#),
    }
    .into_bytes()
}

pub fn publish_path(proto: Proto) -> &'static str {
    match proto {
        Proto::Ws => "/api/publish",
        Proto::Sio => "/api/broadcast",
    }
}

/// Publishes every message; returns counts and the first and last publish
/// times (ns on the shared clock).
async fn publish_all(
    t: &Target,
    a: &FanoutArgs,
    common: &crate::Common,
    shared: &Arc<Shared>,
) -> Result<(PubStats, u64, u64)> {
    let next = Arc::new(AtomicUsize::new(0));
    let pad: Arc<str> = "x".repeat(a.payload).into();
    let start_ns = shared.now_ns();
    let start = Instant::now();
    let publishers = a.publishers.max(1);
    let mut tasks = Vec::new();
    for p in 0..publishers {
        let mut http = Http::connect(t.addr).await?;
        let (next, shared, pad) = (next.clone(), shared.clone(), pad.clone());
        let (a, token, proto) = (a.clone(), common.publish_token.clone(), t.proto);
        tasks.push(tokio::spawn(async move {
            let mut st = PubStats { ok: 0, errors: 0 };
            let mut first_error = None;
            // At a rate, publisher p sends messages p, p + P, … each at its
            // scheduled time, and the message carries that time: a server
            // that answers slowly cannot slow the offered load down
            // (no coordinated omission), its latency shows instead.
            let mut mine = (p..a.messages).step_by(publishers);
            loop {
                let seq = if a.max {
                    next.fetch_add(1, Ordering::Relaxed)
                } else {
                    mine.next().unwrap_or(usize::MAX)
                };
                if seq >= a.messages {
                    break;
                }
                let sent = if a.max {
                    if seq >= a.window {
                        wait_complete(&shared, seq - a.window).await;
                    }
                    shared.now_ns()
                } else {
                    let offset = Duration::from_secs_f64(seq as f64 / a.rate);
                    tokio::time::sleep_until((start + offset).into()).await;
                    start_ns + offset.as_nanos() as u64
                };
                let k = (seq % a.topics as usize) as u32;
                let b = body(proto, seq, k, sent, &pad);
                match http
                    .request("POST", publish_path(proto), Some(&token), &b)
                    .await
                {
                    Ok((200, _)) => st.ok += 1,
                    Ok((status, body)) => {
                        st.errors += 1;
                        first_error.get_or_insert_with(|| {
                            format!(
                                "publish answered {status}: {}",
                                String::from_utf8_lossy(&body)
                            )
                        });
                    }
                    Err(e) => {
                        st.errors += 1;
                        first_error.get_or_insert_with(|| format!("publish failed: {e}"));
                        // The connection is unusable; open another.
                        match Http::connect(shared_addr(&http)).await {
                            Ok(h) => http = h,
                            Err(_) => break,
                        }
                    }
                }
            }
            if let Some(e) = first_error {
                eprintln!("{e}");
            }
            st
        }));
    }
    let mut total = PubStats { ok: 0, errors: 0 };
    for task in tasks {
        let st = task
            .await
            .map_err(|e| err(format!("publisher failed: {e}")))?;
        total.ok += st.ok;
        total.errors += st.errors;
    }
    Ok((total, start_ns, shared.now_ns()))
}

fn shared_addr(http: &Http) -> std::net::SocketAddr {
    http.target()
}

/// Waits until message `seq` reached all its subscribers (at most 5 s: a
/// lost message must not stop the run).
pub async fn wait_complete(shared: &Shared, seq: usize) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let notified = shared.complete.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if shared.is_complete(seq) {
            return;
        }
        if tokio::time::timeout_at(deadline, notified).await.is_err() {
            return;
        }
    }
}
