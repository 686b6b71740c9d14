//! `churn`: clients connect, subscribe, read for a while and leave, over and
//! over, while messages flow; then check the server's tables (from
//! `/metrics`) and memory return to where they started. With `--mixed` half
//! the clients speak the other protocol, and with `--mqtt` messages also
//! arrive through pulso's MQTT bridge (`bench/soak.sh` runs it for hours).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::clients::{self, Proto, Target};
use crate::fanout::{body, publish_path, round as round_to};
use crate::net::{self, Http, OP_CLOSE, OP_TEXT, Result, err};

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
    /// Odd-numbered workers speak the other protocol (`/ws` and Socket.IO
    /// together); each publish tick then publishes to both.
    #[arg(long)]
    pub mixed: bool,
    /// Seconds over which the workers' first connections are spread.
    #[arg(long, default_value_t = 0)]
    pub ramp: u64,
    /// An MQTT broker (loopback `host:port`) to publish to as well, on
    /// `bench/t<k>`; pulso's bridge must subscribe to them
    /// (`--mqtt-topics bench/+`) to reach the `/ws` clients.
    #[arg(long)]
    pub mqtt: Option<String>,
    /// Each worker authenticates as its own user (`sub` `bench-<w>`), so
    /// that each holds its own presence row (one row per role and sub).
    #[arg(long)]
    pub distinct_subs: bool,
    /// MQTT messages per second (round-robin over the topics).
    #[arg(long, default_value_t = 10.0)]
    pub mqtt_rate: f64,
}

const GAUGES: [&str; 3] = ["pulso_connections", "pulso_subscriptions", "pulso_topics"];

#[derive(Default)]
struct Counts {
    cycles: AtomicU64,
    /// Completed cycles per protocol: `/ws`, Socket.IO.
    cycles_by_proto: [AtomicU64; 2],
    errors: AtomicU64,
    received: AtomicU64,
    mqtt_published: AtomicU64,
    mqtt_errors: AtomicU64,
}

/// The protocol of worker `w`.
fn proto_of(t: &Target, a: &ChurnArgs, w: usize) -> Proto {
    match (a.mixed && w % 2 == 1, t.proto) {
        (false, p) => p,
        (true, Proto::Ws) => Proto::Sio,
        (true, Proto::Sio) => Proto::Ws,
    }
}

fn proto_index(p: Proto) -> usize {
    match p {
        Proto::Ws => 0,
        Proto::Sio => 1,
    }
}

pub async fn run(t: &Target, a: &ChurnArgs, common: &crate::Common) -> Result<Value> {
    if a.topics == 0 || a.rate <= 0.0 || a.rounds == 0 || a.mqtt_rate <= 0.0 {
        return Err(err(
            "--topics, --rate, --rounds and --mqtt-rate must be positive",
        ));
    }
    let mqtt = match &a.mqtt {
        Some(m) => Some(crate::resolve(m)?),
        None => None,
    };
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
        let (p, e) = round(t, a, mqtt, common, &counts, &first_errors).await?;
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
    let protocols = match (a.mixed, t.proto) {
        (true, _) => "ws+sio",
        (false, Proto::Ws) => "ws",
        (false, Proto::Sio) => "sio",
    };
    let mut out = json!({
        "scenario": "churn",
        "server": common.label,
        "protocols": protocols,
        "workers": a.workers,
        "rounds": a.rounds,
        "duration_s": round_to(elapsed, 1),
        "cycles": cycles,
        "cycles_ws": counts.cycles_by_proto[0].load(Ordering::Relaxed),
        "cycles_sio": counts.cycles_by_proto[1].load(Ordering::Relaxed),
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
    });
    if mqtt.is_some() {
        out["mqtt_published"] = json!(counts.mqtt_published.load(Ordering::Relaxed));
        out["mqtt_errors"] = json!(counts.mqtt_errors.load(Ordering::Relaxed));
        // What pulso's bridge took in from the broker (any publisher's).
        out["server_mqtt_in"] = net::scrape(t.addr, &["pulso_mqtt_messages_in_total"])
            .await
            .ok()
            .and_then(|v| v.first().copied())
            .map_or(Value::Null, |n| json!(n));
    }
    Ok(out)
}

/// One round of churn: workers connect and leave while a publisher runs.
async fn round(
    t: &Target,
    a: &ChurnArgs,
    mqtt: Option<std::net::SocketAddr>,
    common: &crate::Common,
    counts: &Arc<Counts>,
    first_errors: &Arc<std::sync::Mutex<Vec<String>>>,
) -> Result<(u64, u64)> {
    let stop = CancellationToken::new();
    let mut workers = Vec::new();
    for w in 0..a.workers {
        let (mut t, a, counts, stop) = (t.clone(), a.clone(), counts.clone(), stop.clone());
        t.proto = proto_of(&t, &a, w);
        if a.distinct_subs {
            t.token = pulso::auth::Signer::hmac(&common.secret)
                .token(
                    "assistant",
                    &format!("bench-{w}"),
                    Some(Duration::from_secs(24 * 3600)),
                    &Default::default(),
                )
                .map_err(net::err)?;
        }
        let first_errors = first_errors.clone();
        let ramp = Duration::from_secs(a.ramp).mul_f64(w as f64 / a.workers.max(1) as f64);
        workers.push(tokio::spawn(async move {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(ramp) => {}
            }
            let mut round_no = 0usize;
            while !stop.is_cancelled() {
                let idx = w + round_no * a.workers;
                round_no += 1;
                let k = (idx % a.topics as usize) as u32;
                // A varying stay: 10 %…100 % of hold_ms.
                let stay = Duration::from_millis(a.hold_ms * (10 + (idx * 37) % 91) as u64 / 100);
                match cycle(&t, idx % 20_000, k, stay, &stop).await {
                    Ok(n) => {
                        counts.cycles.fetch_add(1, Ordering::Relaxed);
                        counts.cycles_by_proto[proto_index(t.proto)]
                            .fetch_add(1, Ordering::Relaxed);
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

    let mqtt_task = mqtt.map(|addr| {
        let (a, counts, stop) = (a.clone(), counts.clone(), stop.clone());
        let first_errors = first_errors.clone();
        tokio::spawn(async move {
            if let Err(e) = mqtt_publisher(addr, &a, &counts, &stop).await {
                counts.mqtt_errors.fetch_add(1, Ordering::Relaxed);
                let mut v = first_errors.lock().unwrap_or_else(|e| e.into_inner());
                if v.len() < 5 {
                    v.push(format!("MQTT publisher: {e}"));
                }
            }
        })
    });

    // The publisher: at each tick, one message to each protocol's topic k.
    let protos: &[Proto] = if a.mixed {
        &[Proto::Ws, Proto::Sio]
    } else {
        std::slice::from_ref(&t.proto)
    };
    let started = Instant::now();
    let mut http = Http::connect(t.addr).await?;
    let (mut published, mut publish_errors, mut seq) = (0u64, 0u64, 0usize);
    let end = started + Duration::from_secs(a.duration);
    while Instant::now() < end {
        let at = started + Duration::from_secs_f64(seq as f64 / a.rate);
        tokio::time::sleep_until(at.into()).await;
        let k = (seq % a.topics as usize) as u32;
        for &proto in protos {
            let b = body(proto, seq, k, 0, "churn");
            match http
                .request("POST", publish_path(proto), Some(&common.publish_token), &b)
                .await
            {
                Ok((200, _)) => published += 1,
                Ok(_) => publish_errors += 1,
                Err(_) => {
                    // The keep-alive connection was lost: count it, open another.
                    publish_errors += 1;
                    http = Http::connect(t.addr).await?;
                }
            }
        }
        seq += 1;
    }
    stop.cancel();
    if let Some(task) = mqtt_task {
        let _ = task.await;
    }
    for wk in workers {
        let _ = wk.await;
    }
    Ok((published, publish_errors))
}

/// One client's life: connect, subscribe, read for `stay` (or until the
/// end), close cleanly. Returns how many published messages it received.
async fn cycle(
    t: &Target,
    idx: usize,
    k: u32,
    stay: Duration,
    stop: &CancellationToken,
) -> Result<u64> {
    let mut c = clients::connect(t, idx, k).await?;
    let mut received = 0u64;
    let until = tokio::time::Instant::now() + stay;
    loop {
        let next = tokio::select! {
            _ = stop.cancelled() => break,
            next = tokio::time::timeout_at(until, c.ws.next_text(Duration::from_secs(3600))) => next,
        };
        match next {
            Err(_) => break,
            Ok(Ok(text)) => {
                if t.proto == Proto::Sio && text == b"2" {
                    // Engine.IO ping.
                    c.ws.send(OP_TEXT, b"3").await?;
                } else if net::find(&text, b"\"seq\":").is_some() {
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

/// Publishes `{"seq":…,"k":…,"sent":0,"pad":"mqtt"}` to `bench/t<k>` at
/// `--mqtt-rate` until `stop`: a minimal MQTT 3.1.1 client (CONNECT, then
/// QoS 0 PUBLISH packets; those keep the session alive too).
async fn mqtt_publisher(
    addr: std::net::SocketAddr,
    a: &ChurnArgs,
    counts: &Counts,
    stop: &CancellationToken,
) -> Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.set_nodelay(true)?;
    let id = format!("pulso-bench-{}", std::process::id());
    let mut connect = vec![0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 60];
    mqtt_string(&mut connect, id.as_bytes());
    s.write_all(&mqtt_packet(0x10, &connect)).await?;
    let mut connack = [0u8; 4];
    tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut connack))
        .await
        .map_err(|_| err("no CONNACK from the MQTT broker"))??;
    if connack[0] != 0x20 || connack[3] != 0 {
        return Err(err(format!("MQTT broker refused: {connack:?}")));
    }
    let started = Instant::now();
    let mut seq = 0usize;
    loop {
        let at = started + Duration::from_secs_f64(seq as f64 / a.mqtt_rate);
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tokio::time::sleep_until(at.into()) => {}
        }
        let k = (seq % a.topics as usize) as u32;
        let mut publish = Vec::with_capacity(96);
        mqtt_string(&mut publish, clients::topic_name(Proto::Ws, k).as_bytes());
        publish.extend_from_slice(
            format!(r#"{{"seq":{seq},"k":{k},"sent":0,"pad":"mqtt"}}"#).as_bytes(),
        );
        s.write_all(&mqtt_packet(0x30, &publish)).await?;
        counts.mqtt_published.fetch_add(1, Ordering::Relaxed);
        seq += 1;
    }
    // DISCONNECT.
    s.write_all(&[0xe0, 0]).await?;
    Ok(())
}

/// A fixed header (`kind`, remaining length) followed by `body`.
fn mqtt_packet(kind: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![kind];
    let mut n = body.len();
    loop {
        let byte = (n % 128) as u8;
        n /= 128;
        out.push(if n > 0 { byte | 0x80 } else { byte });
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(body);
    out
}

fn mqtt_string(out: &mut Vec<u8>, s: &[u8]) {
    out.extend_from_slice(&(s.len() as u16).to_be_bytes());
    out.extend_from_slice(s);
}
