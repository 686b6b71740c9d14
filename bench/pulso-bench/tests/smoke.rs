//! `pulso-bench fanout` against an in-process pulso, with tiny sizes:
//! correctness only (every message delivered once, to the right clients).
//! No timing is asserted.
//!
//! The test lives in the tool's own crate so that Cargo builds the
//! `pulso-bench` binary for it and names it in `CARGO_BIN_EXE_pulso-bench`.

use std::net::SocketAddr;
use std::time::Duration;

use pulso::config::{Config, Layered};
use pulso::server::Server;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

const SECRET: &str = "test-secret";

/// A real pulso on a free loopback port: fixed secret, no demo feed,
/// presence in a private in-memory SQLite.
struct TestServer {
    addr: SocketAddr,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl TestServer {
    async fn start() -> Self {
        Self::start_toml("").await
    }

    /// Starts with `extra` TOML applied over the base settings.
    async fn start_toml(extra: &str) -> Self {
        let mut layered = Layered::defaults();
        layered
            .apply_toml(&format!(
                "listen = \"127.0.0.1:0\"\ndatabase_url = \"sqlite::memory:\"\n\
                 [jwt]\nsecret = \"{SECRET}\"\n[demo]\nenabled = false\n"
            ))
            .expect("test settings");
        layered.apply_toml(extra).expect("extra test settings");
        let config = Config::from_layered(&layered).expect("valid test config");
        let server = Server::bind(config).await.expect("bind");
        TestServer {
            addr: server.local_addr(),
            stop: server.shutdown_token(),
            task: tokio::spawn(server.run()),
        }
    }

    async fn stop(self) {
        self.stop.cancel();
        tokio::time::timeout(Duration::from_secs(15), self.task)
            .await
            .expect("server stops in time")
            .expect("server task")
            .expect("server result");
    }
}

async fn bench(server: &TestServer, extra: &[&str]) -> Value {
    run(server, "fanout", extra).await
}

async fn run(server: &TestServer, scenario: &str, extra: &[&str]) -> Value {
    let url = server.addr.to_string();
    let mut args = vec![
        scenario,
        "--url",
        &url,
        "--secret",
        SECRET,
        "--clients",
        "20",
        "--topics",
        "3",
        "--messages",
        "30",
        "--drain",
        "10",
    ];
    args.extend_from_slice(extra);
    let out = tokio::time::timeout(
        std::time::Duration::from_secs(60),
        tokio::process::Command::new(env!("CARGO_BIN_EXE_pulso-bench"))
            .args(&args)
            .output(),
    )
    .await
    .expect("pulso-bench finishes in time")
    .expect("pulso-bench runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "pulso-bench failed: {stderr}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(stdout.lines().next().expect("a JSON line"))
        .unwrap_or_else(|e| panic!("not JSON ({e}): {stdout}"))
}

fn check(v: &Value) {
    // 30 messages over 3 topics, 20 clients over 3 topics (7, 7, 6).
    assert_eq!(v["clients"], 20, "{v}");
    assert_eq!(v["expected"], 200, "{v}");
    assert_eq!(v["deliveries"], 200, "{v}");
    for field in [
        "lost",
        "duplicates",
        "misrouted",
        "unparsable",
        "publish_errors",
    ] {
        assert_eq!(v[field], 0, "{field} in {v}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fanout_at_a_rate_delivers_every_message_once() {
    let server = TestServer::start().await;
    let v = bench(&server, &["--rate", "200"]).await;
    check(&v);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fanout_max_delivers_every_message_once() {
    let server = TestServer::start().await;
    let v = bench(&server, &["--max", "--window", "4"]).await;
    check(&v);
    server.stop().await;
}

/// Socket.IO clients that poll first and upgrade, as socket.io-client does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sio_fanout_over_upgraded_sessions_delivers_every_message_once() {
    let server = TestServer::start().await;
    let v = run(&server, "sio-fanout", &["--sio-upgrade", "--rate", "200"]).await;
    check(&v);
    assert_eq!(v["transport"], "polling+upgrade", "{v}");
    server.stop().await;
}

/// `--client-url` spreads clients round-robin (here over two names of one
/// server); `--pids` and `--metrics-url` add the server's CPU and backplane
/// counters (none on a single node).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_spread_over_client_urls_with_cpu_and_counters() {
    let server = TestServer::start().await;
    let (a, b) = (server.addr.to_string(), format!("http://{}", server.addr));
    let clients = format!("{a},{b}");
    let pid = std::process::id().to_string();
    let v = bench(
        &server,
        &[
            "--rate",
            "200",
            "--client-url",
            &clients,
            "--pids",
            &pid,
            "--metrics-url",
            &a,
        ],
    )
    .await;
    check(&v);
    assert_eq!(v["clients_per_server"], serde_json::json!([10, 10]), "{v}");
    assert!(v["cpu_us_per_delivery"].is_number(), "{v}");
    assert_eq!(v["server_pids"], serde_json::json!([std::process::id()]));
    assert_eq!(v["cluster_messages"][0]["received"], 0, "{v}");
    assert_eq!(v["cluster_messages"][0]["url"], a.as_str(), "{v}");
    server.stop().await;
}

/// `churn --mixed --mqtt`, as `bench/soak.sh` runs it, in small: `/ws` and
/// Socket.IO clients come and go while messages arrive over HTTP and
/// through pulso's MQTT bridge from the machine's broker; afterwards the
/// server's tables are back to empty and nothing failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn churn_over_both_protocols_with_mqtt_leaves_nothing_behind() {
    const BROKER: &str = "127.0.0.1:1883";
    if tokio::net::TcpStream::connect(BROKER).await.is_err() {
        let reason = format!("no MQTT broker on {BROKER}");
        if std::env::var("PULSO_REQUIRE_SERVICES").is_ok_and(|v| v == "1") {
            panic!("required service missing (PULSO_REQUIRE_SERVICES=1): {reason}");
        }
        eprintln!("SKIPPED: {reason}");
        return;
    }
    let server = TestServer::start_toml(&format!(
        "[mqtt]\nurl = \"mqtt://{BROKER}\"\ntopics = [\"bench/+\"]\n"
    ))
    .await;
    let url = server.addr.to_string();
    let args = [
        "churn",
        "--url",
        &url,
        "--secret",
        SECRET,
        "--mixed",
        "--distinct-subs",
        "--workers",
        "20",
        "--duration",
        "3",
        "--rounds",
        "1",
        "--hold-ms",
        "400",
        "--topics",
        "3",
        "--rate",
        "20",
        "--mqtt",
        BROKER,
        "--mqtt-rate",
        "20",
        "--ramp",
        "1",
    ];
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new(env!("CARGO_BIN_EXE_pulso-bench"))
            .args(args)
            .output(),
    )
    .await
    .expect("pulso-bench finishes in time")
    .expect("pulso-bench runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "pulso-bench failed: {stderr}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let v: Value = serde_json::from_str(stdout.lines().next().expect("a JSON line"))
        .unwrap_or_else(|e| panic!("not JSON ({e}): {stdout}"));
    assert_eq!(v["protocols"], "ws+sio", "{v}");
    for field in ["errors", "publish_errors", "mqtt_errors"] {
        assert_eq!(v[field], 0, "{field} in {v}");
    }
    for field in [
        "cycles_ws",
        "cycles_sio",
        "messages_received",
        "mqtt_published",
    ] {
        assert!(v[field].as_u64().is_some_and(|n| n > 0), "{field} in {v}");
    }
    assert!(
        v["server_mqtt_in"].as_f64().is_some_and(|n| n > 0.0),
        "bridged: {v}"
    );
    assert_eq!(v["tables_returned"], true, "{v}");
    assert_eq!(
        v["tables_after"],
        serde_json::json!({"connections": 0.0, "subscriptions": 0.0, "topics": 0.0}),
        "{v}"
    );
    server.stop().await;
}
