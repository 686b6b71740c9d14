//! `churn`: clients connect, subscribe, read for a while and leave, over and
//! over, while messages flow; then check the server's tables (from
//! `/metrics`) and memory return to where they started.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::clients::{self, Target};
use crate::fanout::{body, publish_path, round as round_to};
use crate::net::{self, Http, OP_CLOSE, Result, err};

#[derive(clap::Args, Clone, Debug)]
pub struct ChurnArgs {
    /// Concurrent clients, each connecting and leaving in a loop.
    #[arg(long, default_value_t = 200)]
    pub workers: usize,
    /// Seconds of churn per round.
    #[arg(long, default_value_t = 10)]
    pub duration: u64,
    /// Rounds; tables and RSS are read after each (RSS growth is reported
    /// from the first round to the last).
    #[arg(long, default_value_t = 2)]
    pub rounds: u32,
    /// Longest a client stays connected, in ms (each stays a varying part of it).
    #[arg(long, default_value_t = 500)]
    pub hold_ms: u64,
    /// Topics the clients spread over.
    #[arg(long, default_value_t = 10)]
    pub topics: u32,
    /// Messages per second published meanwhile (round-robin over the topics).
    #[arg(long, default_value_t = 50.0)]
    pub rate: f64,
    /// The server's pid, for RSS before and after.
    #[arg(long)]
    pub pid: Option<u32>,
    /// Seconds to wait for the tables to return to their start.
    #[arg(long, default_value_t = 15)]
    pub settle: u64,
}

const GAUGES: [&str; 3] = ["pulso_connections", "pulso_subscriptions", "pulso_topics"];

#[derive(Default)]
struct Counts {
    cycles: AtomicU64,
    errors: AtomicU64,
    received: AtomicU64,
}

pub async fn run(t: &Target, a: &ChurnArgs, common: &crate::Common) -> Result<Value> {
    if a.topics == 0 || a.rate <= 0.0 || a.rounds == 0 {
        return Err(err("--topics, --rate and --rounds must be positive"));
    }
    let before = net::scrape(t.addr, &GAUGES).await.ok();
    let rss_before = a.pid.and_then(net::rss_kib);
    let counts = Arc::new(Counts::default());
    let first_errors = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let (mut published, mut publish_errors) = (0u64, 0u64);
    let mut after = None;
    let mut rss_rounds = Vec::new();
    let mut returned_rounds = Vec::new();
    let started = Instant::now();
    for _ in 0..a.rounds {
        let (p, e) = round(t, a, common, &counts, &first_errors).await?;
        published += p;
        publish_errors += e;
        // Wait for the tables to come back.
        let settle_end = Instant::now() + Duration::from_secs(a.settle);
        while let Ok(now) = net::scrape(t.addr, &GAUGES).await {
            let done = before.as_ref().is_some_and(|b| *b == now);
            after = Some(now);
            if done || Instant::now() >= settle_end {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        returned_rounds.push(match (&before, &after) {
            (Some(b), Some(a)) => json!(b == a),
            _ => Value::Null,
        });
        rss_rounds.push(a.pid.and_then(net::rss_kib));
    }
    let elapsed = started.elapsed().as_secs_f64();
    for e in first_errors
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
    {
        eprintln!("churn error: {e}");
    }
    let cycles = counts.cycles.load(Ordering::Relaxed);
    let tables = |v: &Option<Vec<f64>>| match v {
        Some(v) => json!({"connections": v[0], "subscriptions": v[1], "topics": v[2]}),
        None => Value::Null,
    };
    let growth = |from: Option<u64>, to: Option<u64>| match (from, to) {
        (Some(b), Some(a)) if b > 0 => json!(round_to((a as f64 - b as f64) * 100.0 / b as f64, 1)),
        _ => Value::Null,
    };
    let first = rss_rounds.first().copied().flatten();
    let last = rss_rounds.last().copied().flatten();
    Ok(json!({
        "scenario": "churn",
        "server": common.label,
        "workers": a.workers,
        "rounds": a.rounds,
        "duration_s": round_to(elapsed, 1),
        "cycles": cycles,
        "cycles_per_s": round_to(cycles as f64 / (a.duration * a.rounds as u64).max(1) as f64, 0),
        "errors": counts.errors.load(Ordering::Relaxed),
        "messages_published": published,
        "publish_errors": publish_errors,
        "messages_received": counts.received.load(Ordering::Relaxed),
        "tables_before": tables(&before),
        "tables_after": tables(&after),
        "tables_returned": returned_rounds.iter().all(|r| r == &json!(true)),
        "rss_before_kib": rss_before,
        "rss_after_rounds_kib": rss_rounds,
        // From a fresh process the first round's growth is the allocator
        // warming up; a leak shows as growth from round to round.
        "rss_growth_first_round_pct": growth(rss_before, first),
        "rss_growth_pct": growth(first, last),
    }))
}

/// One round of churn: workers connect and leave while a publisher runs.
async fn round(
    t: &Target,
    a: &ChurnArgs,
    common: &crate::Common,
    counts: &Arc<Counts>,
    first_errors: &Arc<std::sync::Mutex<Vec<String>>>,
) -> Result<(u64, u64)> {
    let stop = CancellationToken::new();
    let mut workers = Vec::new();
    for w in 0..a.workers {
        let (t, a, counts, stop) = (t.clone(), a.clone(), counts.clone(), stop.clone());
        let first_errors = first_errors.clone();
        workers.push(tokio::spawn(async move {
            let mut round_no = 0usize;
            while !stop.is_cancelled() {
                let idx = w + round_no * a.workers;
                round_no += 1;
                let k = (idx % a.topics as usize) as u32;
                // A varying stay: 10 %…100 % of hold_ms.
                let stay = Duration::from_millis(a.hold_ms * (10 + (idx * 37) % 91) as u64 / 100);
                match cycle(&t, idx % 20_000, k, stay).await {
                    Ok(n) => {
                        counts.cycles.fetch_add(1, Ordering::Relaxed);
                        counts.received.fetch_add(n, Ordering::Relaxed);
                    }
                    Err(e) => {
                        counts.errors.fetch_add(1, Ordering::Relaxed);
                        let mut v = first_errors.lock().unwrap_or_else(|e| e.into_inner());
                        if v.len() < 5 {
                            v.push(e.to_string());
                        }
                    }
                }
            }
        }));
    }

    // The publisher.
    let started = Instant::now();
    let mut http = Http::connect(t.addr).await?;
    let (mut published, mut publish_errors, mut seq) = (0u64, 0u64, 0usize);
    let end = started + Duration::from_secs(a.duration);
    while Instant::now() < end {
        let at = started + Duration::from_secs_f64(seq as f64 / a.rate);
        tokio::time::sleep_until(at.into()).await;
        let k = (seq % a.topics as usize) as u32;
        let b = body(t.proto, seq, k, 0, "churn");
        match http
            .request(
                "POST",
                publish_path(t.proto),
                Some(&common.publish_token),
                &b,
            )
            .await
        {
            Ok((200, _)) => published += 1,
            _ => publish_errors += 1,
        }
        seq += 1;
    }
    stop.cancel();
    for wk in workers {
        let _ = wk.await;
    }
    Ok((published, publish_errors))
}

/// One client's life: connect, subscribe, read for `stay`, close cleanly.
/// Returns how many published messages it received.
async fn cycle(t: &Target, idx: usize, k: u32, stay: Duration) -> Result<u64> {
    let mut c = clients::connect(t, idx, k).await?;
    let mut received = 0u64;
    let until = tokio::time::Instant::now() + stay;
    loop {
        match tokio::time::timeout_at(until, c.ws.next_text(Duration::from_secs(3600))).await {
            Err(_) => break,
            Ok(Ok(text)) => {
                if net::find(&text, b"\"seq\":").is_some() {
                    received += 1;
                }
            }
            Ok(Err(e)) => return Err(e),
        }
    }
    // Close handshake: 1000, then wait briefly for the server's close.
    c.ws.send(OP_CLOSE, &1000u16.to_be_bytes()).await?;
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        while c.ws.next_text(Duration::from_secs(2)).await.is_ok() {}
    })
    .await;
    Ok(received)
}
