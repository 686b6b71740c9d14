//! `idle`: open N connections, measure the connect rate and the server's
//! memory per connection, hold them, then check every one still answers a
//! publish.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::clients::{self, GroupStats, Shared, Target};
use crate::fanout::{body, publish_path, round};
use crate::net::{self, Http, Result, err};

#[derive(clap::Args, Clone, Debug)]
pub struct IdleArgs {
    /// Connections to open.
    #[arg(long, default_value_t = 10_000)]
    pub clients: usize,
    /// The server's pid, to read its RSS from /proc/<pid>/status.
    #[arg(long)]
    pub pid: Option<u32>,
    /// Seconds to hold the connections before the final publish.
    #[arg(long, default_value_t = 5)]
    pub hold: u64,
}

pub async fn run(t: &Target, a: &IdleArgs, common: &crate::Common) -> Result<Value> {
    let rss = |pid: Option<u32>| pid.and_then(net::rss_kib);
    let rss_before = rss(a.pid);
    let (clients, failures, failure_msgs, took) =
        clients::connect_many(t, a.clients, 1, common.connect_concurrency).await;
    for m in &failure_msgs {
        eprintln!("connect failure: {m}");
    }
    let connected = clients.len();
    if connected == 0 {
        return Err(err("no client could connect"));
    }
    // Let the server settle (allocator, lazily grown buffers).
    tokio::time::sleep(Duration::from_secs(a.hold.max(1))).await;
    let rss_after = rss(a.pid);

    // Every connection must still answer: publish one message, count.
    let expected = clients::expected_per_topic(&clients, 1);
    let shared = Arc::new(Shared::new(t.proto, 1, 1, expected));
    let stop = CancellationToken::new();
    let groups = clients::spawn_groups(clients, common.groups, &shared, &stop);
    let mut http = Http::connect(t.addr).await?;
    let b = body(t.proto, 0, 0, shared.now_ns(), "idle");
    let (status, answer) = http
        .request(
            "POST",
            publish_path(t.proto),
            Some(&common.publish_token),
            &b,
        )
        .await?;
    if status != 200 {
        eprintln!(
            "publish answered {status}: {}",
            String::from_utf8_lossy(&answer)
        );
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while shared.unique_total.load(Ordering::Relaxed) < connected as u64
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    stop.cancel();
    let mut stats = GroupStats::new();
    for g in groups {
        stats.merge(
            g.await
                .map_err(|e| err(format!("reader task failed: {e}")))?,
        );
    }

    let per_conn = match (rss_before, rss_after) {
        (Some(b), Some(a)) => json!(round(
            (a.saturating_sub(b) as f64 * 1024.0) / connected as f64,
            0
        )),
        _ => Value::Null,
    };
    let mut out = json!({
        "scenario": "idle",
        "server": common.label,
        "proto": format!("{:?}", t.proto).to_lowercase(),
        "transport": t.transport(),
        "requested": a.clients,
        "connected": connected,
        "connect_failures": failures,
        "connect_s": round(took.as_secs_f64(), 2),
        "connects_per_s": round(connected as f64 / took.as_secs_f64().max(1e-9), 0),
        "rss_before_kib": rss_before,
        "rss_after_kib": rss_after,
        "rss_per_conn_bytes": per_conn,
        "answered_publish": stats.unique,
        "closed_by_server": stats.closed,
    });
    crate::report::add_latency(&mut out, &stats.hist);
    Ok(out)
}
