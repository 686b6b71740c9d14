//! Real services for the tests that need them: a private `redis-server` or
//! `nats-server` on a free port (for tests that stop or restart it), and
//! the machine's PostgreSQL. Each is skipped with a printed reason when absent, except
//! under `PULSO_REQUIRE_SERVICES=1` (`.ci/run`), where that fails.
#![allow(dead_code)]

use std::process::{Child, Command, Stdio};
use std::str::FromStr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::common;

/// A free loopback port (bound, then released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// A server process of the test's own on a free port: what the Redis and
/// NATS servers below share (start, wait until it answers, kill).
struct Daemon {
    name: &'static str,
    port: u16,
    child: Option<Child>,
}

impl Daemon {
    fn new(name: &'static str) -> Daemon {
        Daemon {
            name,
            port: free_port(),
            child: None,
        }
    }

    /// Runs `cmd` with its output discarded; false when it cannot start.
    fn spawn(&mut self, mut cmd: Command) -> bool {
        match cmd.stdout(Stdio::null()).stderr(Stdio::null()).spawn() {
            Ok(c) => {
                self.child = Some(c);
                true
            }
            Err(_) => false,
        }
    }

    /// Waits until a fresh connection to it sends `greeting` after `hello`
    /// (if any): the server is up and speaking its protocol.
    async fn until_up(&self, hello: &[u8], greeting: &[u8]) {
        let deadline = std::time::Instant::now() + common::WAIT;
        while !self.answers(hello, greeting).await {
            assert!(
                std::time::Instant::now() < deadline,
                "{} did not start",
                self.name
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn answers(&self, hello: &[u8], greeting: &[u8]) -> bool {
        let Ok(mut s) = tokio::net::TcpStream::connect(("127.0.0.1", self.port)).await else {
            return false;
        };
        if !hello.is_empty() && s.write_all(hello).await.is_err() {
            return false;
        }
        let mut buf = vec![0u8; greeting.len()];
        matches!(
            tokio::time::timeout(Duration::from_secs(1), s.read_exact(&mut buf)).await,
            Ok(Ok(_)) if buf == greeting
        )
    }

    /// Kills it (as a crash would).
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn signal(&self, which: &str) {
        let pid = self.child.as_ref().map(|c| c.id()).expect("running");
        let status = Command::new("kill")
            .args([which, &pid.to_string()])
            .status();
        assert!(status.is_ok_and(|s| s.success()), "kill {which} {pid}");
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A `redis-server` of the test's own, killed when dropped.
pub struct RedisServer {
    daemon: Daemon,
}

impl RedisServer {
    /// Starts one on a free port, or `None` (with a printed reason).
    pub async fn start() -> Option<RedisServer> {
        let mut server = RedisServer {
            daemon: Daemon::new("redis-server"),
        };
        if !server.spawn() {
            common::skip("redis-server is not installed (apt-get install redis-server)");
            return None;
        }
        server.until_up().await;
        Some(server)
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.daemon.port)
    }

    fn spawn(&mut self) -> bool {
        let mut cmd = Command::new("redis-server");
        cmd.args([
            "--port",
            &self.daemon.port.to_string(),
            "--bind",
            "127.0.0.1",
        ])
        .args(["--save", "", "--appendonly", "no", "--protected-mode", "no"]);
        self.daemon.spawn(cmd)
    }

    /// Waits until it answers PING.
    async fn until_up(&self) {
        self.daemon.until_up(b"PING\r\n", b"+PONG\r\n").await;
    }

    /// Kills it (as a crash would).
    pub fn kill(&mut self) {
        self.daemon.kill();
    }

    /// Stops it answering without closing a connection (SIGSTOP), as a
    /// server that hangs or a link that goes silent would.
    pub fn freeze(&self) {
        self.daemon.signal("-STOP");
    }

    /// Lets a frozen server go on (SIGCONT).
    pub fn thaw(&self) {
        self.daemon.signal("-CONT");
    }

    /// Starts it again on the same port.
    pub async fn restart(&mut self) {
        self.kill();
        assert!(self.spawn(), "redis-server restarts");
        self.until_up().await;
    }
}

/// A `nats-server` of the test's own, with JetStream (the backplane's
/// ordering stream needs it) storing under a directory of its own, killed
/// when dropped.
pub struct NatsServer {
    bin: String,
    daemon: Daemon,
}

impl NatsServer {
    /// Starts one on a free port, or `None` (with a printed reason).
    pub async fn start() -> Option<NatsServer> {
        // Debian installs it in /usr/sbin, which is not on every PATH.
        let bin = ["nats-server", "/usr/sbin/nats-server"]
            .into_iter()
            .find(|b| {
                Command::new(b)
                    .arg("--version")
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()
                    .is_ok_and(|s| s.success())
            });
        let Some(bin) = bin else {
            common::skip("nats-server is not installed (apt-get install nats-server)");
            return None;
        };
        let mut server = NatsServer {
            bin: bin.to_string(),
            daemon: Daemon::new("nats-server"),
        };
        assert!(server.spawn(), "nats-server starts");
        server.until_up().await;
        Some(server)
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.daemon.port)
    }

    fn spawn(&mut self) -> bool {
        let store = std::env::temp_dir().join(format!("pulso-test-nats-{}", self.daemon.port));
        let mut cmd = Command::new(&self.bin);
        cmd.args([
            "-a",
            "127.0.0.1",
            "-p",
            &self.daemon.port.to_string(),
            "-js",
            "-sd",
        ])
        .arg(&store);
        self.daemon.spawn(cmd)
    }

    /// Waits until it greets a connection with its `INFO`.
    async fn until_up(&self) {
        self.daemon.until_up(b"", b"INFO ").await;
    }

    /// Kills it (as a crash would).
    pub fn kill(&mut self) {
        self.daemon.kill();
    }

    /// Starts it again on the same port.
    pub async fn restart(&mut self) {
        self.kill();
        assert!(self.spawn(), "nats-server restarts");
        self.until_up().await;
    }
}

/// The PostgreSQL URL, or `None` (with a printed reason) when unreachable.
pub async fn postgres_url() -> Option<String> {
    let url = std::env::var("PULSO_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
    let Ok(opts) = sqlx::postgres::PgConnectOptions::from_str(&url) else {
        common::skip(&format!("PULSO_TEST_POSTGRES_URL `{url}` is invalid"));
        return None;
    };
    let connect = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(Duration::from_secs(2))
        .connect_with(opts);
    match tokio::time::timeout(Duration::from_secs(3), connect).await {
        Ok(Ok(pool)) => {
            pool.close().await;
            Some(url)
        }
        _ => {
            common::skip(&format!("PostgreSQL at {url} is unreachable"));
            None
        }
    }
}
