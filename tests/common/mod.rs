//! Test harness: a real pulso server on a free loopback port, and real
//! WebSocket and HTTP clients. Every wait has a timeout; nothing sleeps to
//! synchronise.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use pulso::auth::Signer;
use pulso::config::{Config, Layered};
use pulso::gateway::Gateway;
use pulso::server::Server;
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tokio_util::sync::CancellationToken;

pub const SECRET: &str = "test-secret";

/// A name no other test, run or process has used: `{tag}_{pid}_{n}_{random}`
/// (letters, digits, `_` and `-`: fit for a node id, a prefix or a table).
pub fn unique(tag: &str) -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    format!(
        "{tag}_{}_{}_{:08x}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed),
        rand::random::<u32>()
    )
}

/// For tests that need an external service (a broker, a database) that is
/// missing: prints why the test is skipped and returns. Under `.ci/run`
/// (`PULSO_REQUIRE_SERVICES=1`) the service must be there, so it fails instead.
pub fn skip(reason: &str) {
    if std::env::var("PULSO_REQUIRE_SERVICES").is_ok_and(|v| v == "1") {
        panic!("required service missing (PULSO_REQUIRE_SERVICES=1): {reason}");
    }
    eprintln!("SKIPPED: {reason}");
}
pub const WAIT: Duration = Duration::from_secs(5);

pub struct TestServer {
    pub addr: SocketAddr,
    pub gw: Arc<Gateway>,
    /// The MQTT bridge, when configured.
    pub mqtt: Option<Arc<pulso::mqtt::Bridge>>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

/// Base settings for tests: loopback, free port, fixed secret, no demo feed.
pub fn base_toml() -> String {
    // Presence in a private in-memory SQLite: no `pulso.db` in the working
    // directory, nothing shared between tests.
    format!(
        "listen = \"127.0.0.1:0\"\ndatabase_url = \"sqlite::memory:\"\n[jwt]\nsecret = \"{SECRET}\"\n[demo]\nenabled = false\n"
    )
}

impl TestServer {
    pub async fn start() -> Self {
        Self::start_toml("").await
    }

    /// Starts with the base settings, then `extra` (a TOML document of its
    /// own, applied over them: top-level keys and `[section]` blocks alike).
    pub async fn start_toml(extra: &str) -> Self {
        Self::start_with(|l| {
            l.apply_toml(&base_toml()).unwrap();
            if !extra.is_empty() {
                l.apply_toml(extra).unwrap();
            }
        })
        .await
    }

    /// [`TestServer::start_toml`] with presence in a SQLite file of its own
    /// (for what the in-memory database does not show: sessions, restarts).
    pub async fn start_sqlite_file(extra: &str) -> Self {
        let dir = std::env::temp_dir().join(unique("pulso-test-db"));
        std::fs::create_dir_all(&dir).unwrap();
        let db = format!("database_url = \"sqlite://{}/p.db\"\n", dir.display());
        Self::start_with(|l| {
            l.apply_toml(&base_toml()).unwrap();
            l.apply_toml(&db).unwrap();
            if !extra.is_empty() {
                l.apply_toml(extra).unwrap();
            }
        })
        .await
    }

    /// [`TestServer::start_toml`], then waits until it is ready: a cluster
    /// node has its backplane up.
    pub async fn start_ready(extra: &str) -> Self {
        let node = Self::start_toml(extra).await;
        node.until("ready (backplane up)", |gw| gw.readiness.report().0)
            .await;
        node
    }

    pub async fn start_with(edit: impl FnOnce(&mut Layered)) -> Self {
        let mut layered = Layered::defaults();
        edit(&mut layered);
        let config = Config::from_layered(&layered).expect("valid test config");
        let server = Server::bind(config).await.expect("bind");
        let addr = server.local_addr();
        let gw = server.gateway().clone();
        let mqtt = server.mqtt_bridge().cloned();
        let stop = server.shutdown_token();
        let task = tokio::spawn(server.run());
        TestServer {
            addr,
            gw,
            mqtt,
            stop,
            task,
        }
    }

    pub fn token(&self, role: &str, sub: &str) -> String {
        token(role, sub, Some(Duration::from_secs(3600)))
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn ws_url(&self, token: &str) -> String {
        format!("ws://{}/ws?token={token}", self.addr)
    }

    /// Connects to /ws as `role`/`sub`.
    pub async fn ws(&self, role: &str, sub: &str) -> WsClient {
        WsClient::connect(&self.ws_url(&self.token(role, sub))).await
    }

    /// POSTs JSON with a publisher token; returns status and body.
    pub async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        let admin = self.token("admin", "test-admin");
        post_json(&self.url(path), Some(&admin), &body.to_string()).await
    }

    pub async fn publish(&self, topic: &str, payload: Value) -> (u16, Value) {
        self.post("/api/publish", json!({"topic": topic, "payload": payload}))
            .await
    }

    pub async fn metrics(&self) -> String {
        reqwest::get(self.url("/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// Waits until `check` holds on the hub (polling the in-process state,
    /// bounded by [`WAIT`]).
    pub async fn until(&self, what: &str, check: impl Fn(&Gateway) -> bool) {
        self.until_within(what, WAIT, check).await
    }

    /// [`TestServer::until`] with a longer wait, for what takes longer by
    /// design (a silent connection detected by its ping, say).
    pub async fn until_within(&self, what: &str, wait: Duration, check: impl Fn(&Gateway) -> bool) {
        let deadline = tokio::time::Instant::now() + wait;
        while !check(&self.gw) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting for {what}"
            );
            tokio::task::yield_now().await;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Graceful stop; returns how long it took.
    pub async fn stop(self) -> Duration {
        let started = std::time::Instant::now();
        self.stop.cancel();
        tokio::time::timeout(Duration::from_secs(15), self.task)
            .await
            .expect("server stops in time")
            .expect("server task")
            .expect("server result");
        started.elapsed()
    }
}

/// A `POST /api/broadcast` (admin `bearer`) with `extra_headers` and a
/// body of `size` bytes of `x`: an oversized request for the body limits.
pub fn oversized_post(bearer: &str, extra_headers: &str, size: usize) -> Vec<u8> {
    let mut request = format!(
        "POST /api/broadcast HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {bearer}\r\n\
         content-type: application/json\r\n{extra_headers}\r\n"
    )
    .into_bytes();
    request.resize(request.len() + size, b'x');
    request
}

/// Writes all of `request` before reading anything (as Node's `http`
/// does), then reads the answer to the end of the stream; each within 10 s.
pub async fn write_whole_then_read<S>(stream: &mut S, request: &[u8]) -> Vec<u8>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    tokio::time::timeout(Duration::from_secs(10), stream.write_all(request))
        .await
        .expect("the body is taken in time")
        .expect("the whole body is written");
    let mut response = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut response))
        .await
        .expect("the answer in time")
        .expect("the answer, then the end of the stream (no reset)");
    response
}

pub fn token(role: &str, sub: &str, ttl: Option<Duration>) -> String {
    Signer::hmac(SECRET)
        .token(role, sub, ttl, &Default::default())
        .unwrap()
}

pub fn token_claims(claims: Value) -> String {
    Signer::hmac(SECRET)
        .sign(claims.as_object().unwrap())
        .unwrap()
}

pub async fn post_json(url: &str, bearer: Option<&str>, body: &str) -> (u16, Value) {
    let req = reqwest::Client::new()
        .post(url)
        .header("content-type", "application/json")
        .body(body.to_string());
    send(req, bearer).await
}

pub async fn get_json(url: &str, bearer: Option<&str>) -> (u16, Value) {
    send(reqwest::Client::new().get(url), bearer).await
}

/// Sends; returns the status and the body as JSON (or as a JSON string).
async fn send(mut req: reqwest::RequestBuilder, bearer: Option<&str>) -> (u16, Value) {
    if let Some(b) = bearer {
        req = req.bearer_auth(b);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

pub struct WsClient {
    pub stream: WebSocketStream<MaybeTlsStream<TcpStream>>,
}

impl WsClient {
    pub async fn connect(url: &str) -> Self {
        let (stream, _) = tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(url))
            .await
            .expect("connect in time")
            .expect("connect");
        WsClient { stream }
    }

    pub async fn send(&mut self, v: Value) {
        self.stream
            .send(Message::text(v.to_string()))
            .await
            .unwrap();
    }

    pub async fn send_text(&mut self, s: &str) {
        self.stream
            .send(Message::text(s.to_string()))
            .await
            .unwrap();
    }

    /// The next message, with a timeout. Panics on close.
    pub async fn recv_raw(&mut self) -> Message {
        loop {
            let msg = tokio::time::timeout(WAIT, self.stream.next())
                .await
                .expect("a message in time")
                .expect("stream open")
                .expect("no error");
            match msg {
                Message::Ping(_) | Message::Pong(_) => continue,
                other => return other,
            }
        }
    }

    /// The next JSON text message.
    pub async fn recv(&mut self) -> Value {
        match self.recv_raw().await {
            Message::Text(t) => serde_json::from_str(&t).expect("JSON text"),
            other => panic!("expected a text message, got {other:?}"),
        }
    }

    /// Sends a request and returns the reply carrying its `id` (skipping
    /// published messages that arrive in between).
    pub async fn request(&mut self, mut v: Value, id: u64) -> Value {
        v["id"] = json!(id);
        self.send(v).await;
        loop {
            let reply = self.recv().await;
            if reply.get("id") == Some(&json!(id)) {
                return reply;
            }
        }
    }

    pub async fn sub(&mut self, topic: &str) -> Value {
        self.request(json!({"type":"sub","topic":topic}), 900_001)
            .await
    }

    /// Waits for the close frame (skipping anything else) and returns it.
    pub async fn closed(&mut self) -> Option<CloseFrame> {
        loop {
            match tokio::time::timeout(WAIT, self.stream.next())
                .await
                .expect("close in time")
            {
                Some(Ok(Message::Close(frame))) => return frame,
                Some(Ok(_)) => continue,
                Some(Err(e)) => panic!("error before a close frame: {e}"),
                None => return None,
            }
        }
    }

    pub async fn close_code(&mut self) -> u16 {
        self.closed().await.map(|f| u16::from(f.code)).unwrap_or(0)
    }
}
