//! TLS on pulso's own listener (`tls.cert_file`, `tls.key_file`), with a
//! throw-away CA and two server certificates made by the `openssl` command
//! at test time, and real clients that trust that CA only: a rustls client
//! with tokio-tungstenite over `wss://`, raw HTTP/1.1 over rustls, `curl
//! --cacert`. Certificate reload is tested on the real binary, sent SIGHUP.
//! Waits are for the event, with a bound.

mod common;
#[path = "support/services.rs"]
mod services;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use common::{TestServer, WAIT};
use futures_util::{SinkExt, StreamExt};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;

/// A CA and two server certificates it signed, `a` and `b`, for
/// 127.0.0.1 and localhost, in a directory of their own.
struct Certs {
    dir: PathBuf,
}

impl Certs {
    /// Makes them with `openssl`; `None` (the test skipped, or failed
    /// under `PULSO_REQUIRE_SERVICES=1`) when that cannot be done.
    fn make() -> Option<Certs> {
        let dir = std::env::temp_dir().join(common::unique("pulso-tls"));
        std::fs::create_dir_all(&dir).ok()?;
        let certs = Certs { dir };
        if certs.openssl_all().is_none() {
            common::skip("could not make test certificates with openssl");
            return None;
        }
        Some(certs)
    }

    fn openssl_all(&self) -> Option<()> {
        let run = |args: &[&str]| {
            Command::new("openssl")
                .args(args)
                .current_dir(&self.dir)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .ok()
                .filter(|s| s.success())
        };
        std::fs::write(
            self.dir.join("san.ext"),
            "subjectAltName=IP:127.0.0.1,DNS:localhost\n",
        )
        .ok()?;
        let ec = "-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes";
        let args = |s: String| -> Vec<String> { s.split(' ').map(str::to_string).collect() };
        let run_s = |s: String| {
            let a = args(s);
            run(&a.iter().map(String::as_str).collect::<Vec<_>>())
        };
        run_s(format!(
            "req -x509 {ec} -keyout ca.key -out ca.crt -days 1 -subj /CN=pulso-test-CA"
        ))?;
        for (name, serial) in [("a", "1001"), ("b", "1002")] {
            run_s(format!(
                "req {ec} -keyout {name}.key -out {name}.csr -subj /CN=pulso-test-{name}"
            ))?;
            run_s(format!(
                "x509 -req -in {name}.csr -CA ca.crt -CAkey ca.key -set_serial {serial} \
                 -out {name}.crt -days 1 -extfile san.ext"
            ))?;
        }
        Some(())
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// The DER of certificate `name` (`a` or `b`), as a client sees it.
    fn der(&self, name: &str) -> CertificateDer<'static> {
        CertificateDer::from_pem_file(self.path(&format!("{name}.crt"))).unwrap()
    }

    /// A client configuration that trusts this CA only, offering ALPN
    /// `alpn`. Without session resumption: a resumed session presents no
    /// certificate (the client reports the one of the session it resumes),
    /// and these tests look at the certificate each handshake gets.
    fn client(&self, alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.der("ca")).unwrap();
        let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        config.resumption = rustls::client::Resumption::disabled();
        Arc::new(config)
    }

    /// The TOML that serves certificate `name`.
    fn toml(&self, name: &str) -> String {
        format!(
            "[tls]\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
            self.path(&format!("{name}.crt")).display(),
            self.path(&format!("{name}.key")).display()
        )
    }
}

impl Drop for Certs {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A TLS connection to `addr`, verified against the test CA for 127.0.0.1.
async fn tls_connect(addr: SocketAddr, config: Arc<rustls::ClientConfig>) -> TlsStream<TcpStream> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = ServerName::IpAddress(addr.ip().into());
    tokio::time::timeout(WAIT, TlsConnector::from(config).connect(name, tcp))
        .await
        .expect("a handshake in time")
        .expect("a handshake with a certificate the client trusts")
}

/// The certificate the server presented on `stream`.
fn presented(stream: &TlsStream<TcpStream>) -> CertificateDer<'static> {
    stream.get_ref().1.peer_certificates().unwrap()[0]
        .clone()
        .into_owned()
}

/// One HTTP/1.1 request over a new TLS connection (`connection: close`);
/// returns the status and the body.
async fn https(
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> (u16, String) {
    let mut tls = tls_connect(addr, config).await;
    let admin = common::token("admin", "tls-admin", Some(Duration::from_secs(60)));
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nhost: 127.0.0.1\r\nauthorization: Bearer {admin}\r\n\
         content-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    tls.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    tokio::time::timeout(WAIT, tls.read_to_end(&mut response))
        .await
        .expect("the answer in time")
        .expect("the answer, then close_notify");
    let text = String::from_utf8_lossy(&response).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").expect("a complete head");
    (head[9..12].parse().unwrap(), body.to_string())
}

/// A counter from `/metrics` over TLS (0 when absent).
async fn metric(addr: SocketAddr, config: Arc<rustls::ClientConfig>, series: &str) -> u64 {
    let (status, text) = https(addr, config, "GET", "/metrics", None).await;
    assert_eq!(status, 200);
    text.lines()
        .find(|l| l.rsplit_once(' ').is_some_and(|(name, _)| name == series))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Waits until `series` is `want` on the node at `addr`.
async fn until_metric(
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
    series: &str,
    want: u64,
) {
    let deadline = Instant::now() + WAIT;
    loop {
        let got = metric(addr, config.clone(), series).await;
        if got == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{series} is {got}, expected {want}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A `/ws` client over `wss://`, and the certificate its handshake saw.
struct Wss {
    ws: WebSocketStream<TlsStream<TcpStream>>,
    cert: CertificateDer<'static>,
}

impl Wss {
    async fn connect(addr: SocketAddr, config: Arc<rustls::ClientConfig>, sub: &str) -> Wss {
        let tls = tls_connect(addr, config).await;
        let cert = presented(&tls);
        let token = common::token("assistant", sub, Some(Duration::from_secs(3600)));
        let url = format!("wss://{addr}/ws?token={token}");
        let (ws, response) = tokio::time::timeout(WAIT, tokio_tungstenite::client_async(url, tls))
            .await
            .expect("an upgrade in time")
            .expect("the upgrade");
        assert_eq!(response.status(), 101);
        Wss { ws, cert }
    }

    async fn recv(&mut self) -> Value {
        loop {
            let msg = tokio::time::timeout(WAIT, self.ws.next())
                .await
                .expect("a message in time")
                .expect("stream open")
                .expect("no error");
            match msg {
                Message::Text(t) => return serde_json::from_str(&t).unwrap(),
                Message::Ping(_) | Message::Pong(_) => continue,
                other => panic!("unexpected {other:?}"),
            }
        }
    }

    /// Sends a request and returns its reply (skipping anything between).
    async fn request(&mut self, mut v: Value, id: u64) -> Value {
        v["id"] = json!(id);
        self.ws.send(Message::text(v.to_string())).await.unwrap();
        loop {
            let reply = self.recv().await;
            if reply.get("id") == Some(&json!(id)) {
                return reply;
            }
        }
    }

    async fn sub(&mut self, topic: &str, id: u64) {
        let reply = self
            .request(json!({"type": "sub", "topic": topic}), id)
            .await;
        assert_eq!(reply["type"], "ack", "{reply}");
    }

    /// The next publish on `topic`.
    async fn message(&mut self, topic: &str) -> Value {
        loop {
            let m = self.recv().await;
            if m["topic"] == topic {
                return m;
            }
        }
    }

    /// The close code the server sends.
    async fn close_code(&mut self) -> u16 {
        loop {
            match tokio::time::timeout(WAIT, self.ws.next())
                .await
                .expect("a close in time")
            {
                Some(Ok(Message::Close(frame))) => {
                    return frame.map(|f| u16::from(f.code)).unwrap_or(0);
                }
                Some(Ok(_)) => continue,
                other => panic!("no close frame: {other:?}"),
            }
        }
    }
}

fn curl_available() -> bool {
    Command::new("curl")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// `curl` with `args`; returns its exit code and stdout. (Not waited for
/// on the test's thread: the server under test runs there.)
async fn curl(args: &[&str]) -> (i32, String) {
    let out = tokio::process::Command::new("curl")
        .args(["--silent", "--show-error", "--max-time", "5"])
        .args(args)
        .output()
        .await
        .expect("curl runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[tokio::test]
async fn wss_and_https_with_a_certificate_the_client_trusts() {
    let Some(certs) = Certs::make() else { return };
    let srv = TestServer::start_toml(&certs.toml("a")).await;
    let config = certs.client(&[b"http/1.1"]);

    // wss:// with tokio-tungstenite: the certificate is `a`, and /ws works.
    let mut ws = Wss::connect(srv.addr, config.clone(), "tls-1").await;
    assert_eq!(ws.cert, certs.der("a"));
    ws.sub("tls/alerts", 1).await;

    // curl trusting the test CA: /healthz, then a publish the client gets.
    assert!(curl_available(), "curl is needed for this test");
    let ca = certs.path("ca.crt");
    let ca = ca.to_str().unwrap();
    let base = format!("https://127.0.0.1:{}", srv.addr.port());
    let (code, body) = curl(&["--cacert", ca, &format!("{base}/healthz")]).await;
    assert_eq!(code, 0, "curl /healthz");
    assert!(body.contains("ok"), "{body}");
    let admin = srv.token("admin", "tls-admin");
    let (code, body) = curl(&[
        "--cacert",
        ca,
        "-H",
        &format!("authorization: Bearer {admin}"),
        "-H",
        "content-type: application/json",
        "-d",
        r#"{"topic":"tls/alerts","payload":{"n":1}}"#,
        "-w",
        " %{http_code} %{http_version}",
        &format!("{base}/api/publish"),
    ])
    .await;
    assert_eq!(code, 0, "curl /api/publish");
    assert!(body.ends_with(" 200 1.1"), "{body}");
    let answer: Value = serde_json::from_str(body.trim_end_matches(" 200 1.1")).unwrap();
    assert_eq!(answer["recipients"], 1, "{answer}");
    assert_eq!(ws.message("tls/alerts").await["payload"], json!({"n": 1}));
    // Without the CA, curl refuses the certificate (60: peer certificate
    // cannot be authenticated with known CA certificates).
    let (code, _) = curl(&[&format!("{base}/healthz")]).await;
    assert_eq!(code, 60, "curl without --cacert");

    // ALPN: http/1.1 is chosen when offered with h2; h2 alone is refused.
    let tls = tls_connect(srv.addr, certs.client(&[b"h2", b"http/1.1"])).await;
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    drop(tls);
    let tcp = TcpStream::connect(srv.addr).await.unwrap();
    let refused = TlsConnector::from(certs.client(&[b"h2"]))
        .connect(ServerName::IpAddress(srv.addr.ip().into()), tcp)
        .await;
    assert!(refused.is_err(), "a client offering only h2 is refused");

    // Plain HTTP on the TLS port gets no HTTP answer, just a close.
    let mut tcp = TcpStream::connect(srv.addr).await.unwrap();
    tcp.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let mut got = Vec::new();
    let _ = tokio::time::timeout(WAIT, tcp.read_to_end(&mut got))
        .await
        .expect("closed in time");
    assert!(
        !got.starts_with(b"HTTP/"),
        "{:?}",
        String::from_utf8_lossy(&got)
    );
    // curl without the CA, the h2-only client, plain HTTP.
    srv.until("three failed handshakes counted", |gw| {
        gw.metrics
            .tls_handshake_failures
            .get(&[("reason", "error")])
            .is_some_and(|c| c.get() == 3)
    })
    .await;

    // Stopping closes the WebSocket with 1001, over TLS too.
    let stop = tokio::spawn(srv.stop());
    assert_eq!(ws.close_code().await, 1001);
    stop.await.unwrap();
}

#[tokio::test]
async fn a_client_that_never_completes_the_handshake_is_dropped_after_the_header_timeout() {
    let Some(certs) = Certs::make() else { return };
    let header = Duration::from_secs(1);
    let srv = TestServer::start_toml(&format!(
        "[http]\nheader_timeout = \"{}ms\"\n{}",
        header.as_millis(),
        certs.toml("a")
    ))
    .await;
    // One sends nothing; one sends the first bytes of a ClientHello's
    // record header and stops.
    let mut silent = TcpStream::connect(srv.addr).await.unwrap();
    let mut partial = TcpStream::connect(srv.addr).await.unwrap();
    let started = Instant::now();
    partial.write_all(&[0x16, 0x03, 0x01]).await.unwrap();
    for tcp in [&mut silent, &mut partial] {
        let mut got = Vec::new();
        let _ = tokio::time::timeout(header * 4, tcp.read_to_end(&mut got))
            .await
            .expect("the server drops the connection in time");
        assert!(got.is_empty(), "nothing is sent before a ClientHello");
    }
    let elapsed = started.elapsed();
    assert!(
        elapsed + Duration::from_millis(200) >= header && elapsed < header * 3,
        "dropped after {elapsed:?}, expected about {header:?}"
    );
    srv.until("two handshake timeouts counted", |gw| {
        gw.metrics
            .tls_handshake_failures
            .get(&[("reason", "timeout")])
            .is_some_and(|c| c.get() == 2)
    })
    .await;
    // A client that does handshake is served as usual.
    let (status, _) = https(srv.addr, certs.client(&[]), "GET", "/healthz", None).await;
    assert_eq!(status, 200);
    srv.stop().await;
}

#[tokio::test]
async fn over_limit_body_written_whole_before_reading_gets_the_413_over_tls() {
    // The lingering close works over TLS: the client writes all of an
    // 8 MiB body (more than the kernels' buffers hold) before it reads.
    let Some(certs) = Certs::make() else { return };
    let srv = TestServer::start_toml(&certs.toml("a")).await;
    let mut tls = tls_connect(srv.addr, certs.client(&[])).await;
    let admin = srv.token("admin", "a");
    let size = 8 * 1024 * 1024;
    let request = common::oversized_post(&admin, &format!("content-length: {size}\r\n"), size);
    // Read to close_notify: a reset instead fails here.
    let response = common::write_whole_then_read(&mut tls, &request).await;
    let text = String::from_utf8_lossy(&response);
    assert!(text.starts_with("HTTP/1.1 413"), "{text}");
    assert!(text.contains("payload_too_large"), "{text}");
    drop(tls);
    srv.stop().await;
}

/// The real binary, with `env` on top of a loopback port, a private
/// SQLite and the test secret; killed when dropped.
struct Process {
    child: std::process::Child,
    addr: SocketAddr,
    log: PathBuf,
}

impl Process {
    fn command(env: &[(&str, &str)]) -> (Command, SocketAddr) {
        let addr: SocketAddr = ([127, 0, 0, 1], services::free_port()).into();
        let mut c = Command::new(env!("CARGO_BIN_EXE_pulso"));
        for (k, _) in std::env::vars() {
            if k.starts_with("PULSO_") {
                c.env_remove(k);
            }
        }
        c.current_dir(std::env::temp_dir())
            .env("PULSO_LISTEN", addr.to_string())
            .env("PULSO_NODE_ID", format!("tls-{}", addr.port()))
            .env("PULSO_DATABASE_URL", "sqlite::memory:")
            .env("PULSO_JWT_SECRET", common::SECRET)
            .env("PULSO_DEMO_ENABLED", "false")
            .env("PULSO_LOG_FORMAT", "text")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        (c, addr)
    }

    /// Starts it and waits until `/healthz` answers (over TLS with
    /// `config`, else plain HTTP).
    async fn start(env: &[(&str, &str)], config: Option<Arc<rustls::ClientConfig>>) -> Process {
        let (mut c, addr) = Self::command(env);
        let log = std::env::temp_dir().join(format!("{}.log", common::unique("pulso-tls")));
        c.stderr(std::fs::File::create(&log).unwrap());
        let mut p = Process {
            child: c.spawn().expect("the pulso binary starts"),
            addr,
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Ok(Some(status)) = p.child.try_wait() {
                panic!("pulso exited with {status}: {}", p.stderr());
            }
            if TcpStream::connect(addr).await.is_ok() {
                break;
            }
            assert!(Instant::now() < deadline, "not up in time: {}", p.stderr());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let status = match config {
            Some(config) => https(addr, config, "GET", "/healthz", None).await.0,
            None => reqwest::get(format!("http://{addr}/healthz"))
                .await
                .unwrap()
                .status()
                .as_u16(),
        };
        assert_eq!(status, 200);
        p
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args([&format!("-{name}"), &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "kill -{name}");
    }

    /// Waits for `text` in the log.
    async fn until_logged(&self, text: &str) {
        let deadline = Instant::now() + WAIT;
        while !self.stderr().contains(text) {
            assert!(
                Instant::now() < deadline,
                "no {text:?} in: {}",
                self.stderr()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits for the exit; returns its code.
    async fn exited(&mut self) -> Option<i32> {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            assert!(Instant::now() < deadline, "no exit in time");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.log);
    }
}

/// Replaces `to` with a copy of `from` in one rename, as a deployment tool
/// (or certbot's symlink swap) does.
fn replace(from: &Path, to: &Path) {
    let tmp = to.with_extension("tmp");
    std::fs::copy(from, &tmp).unwrap();
    std::fs::rename(&tmp, to).unwrap();
}

#[tokio::test]
async fn sighup_reloads_the_certificate_for_new_connections_and_open_ones_keep_working() {
    let Some(certs) = Certs::make() else { return };
    let (cert, key) = (certs.path("live.crt"), certs.path("live.key"));
    replace(&certs.path("a.crt"), &cert);
    replace(&certs.path("a.key"), &key);
    let config = certs.client(&[b"http/1.1"]);
    let mut p = Process::start(
        &[
            ("PULSO_TLS_CERT_FILE", cert.to_str().unwrap()),
            ("PULSO_TLS_KEY_FILE", key.to_str().unwrap()),
        ],
        Some(config.clone()),
    )
    .await;
    let reloads_ok = "pulso_tls_reloads_total{result=\"ok\"}";
    let reloads_error = "pulso_tls_reloads_total{result=\"error\"}";

    let mut one = Wss::connect(p.addr, config.clone(), "tls-one").await;
    assert_eq!(one.cert, certs.der("a"));
    one.sub("tls/reload", 1).await;

    // Certificate b in place of a, then SIGHUP.
    replace(&certs.path("b.key"), &key);
    replace(&certs.path("b.crt"), &cert);
    p.signal("HUP");
    until_metric(p.addr, config.clone(), reloads_ok, 1).await;
    let mut two = Wss::connect(p.addr, config.clone(), "tls-two").await;
    assert_eq!(
        two.cert,
        certs.der("b"),
        "a new connection gets certificate b"
    );
    two.sub("tls/reload", 1).await;

    // The connection made with certificate a still works both ways.
    let (status, body) = https(
        p.addr,
        config.clone(),
        "POST",
        "/api/publish",
        Some(json!({"topic": "tls/reload", "payload": {"n": 1}})),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap()["recipients"],
        2
    );
    assert_eq!(one.message("tls/reload").await["payload"], json!({"n": 1}));
    assert_eq!(two.message("tls/reload").await["payload"], json!({"n": 1}));
    one.sub("tls/other", 2).await;

    // A certificate file that does not load: the reload fails, is counted
    // and logged, and certificate b stays in use.
    std::fs::write(&cert, "not a certificate\n").unwrap();
    p.signal("HUP");
    until_metric(p.addr, config.clone(), reloads_error, 1).await;
    p.until_logged("TLS certificate reload failed").await;
    assert!(
        p.child.try_wait().unwrap().is_none(),
        "pulso is still running"
    );
    let three = tls_connect(p.addr, config.clone()).await;
    assert_eq!(presented(&three), certs.der("b"));
    drop(three);
    // A key that does not fit the certificate: the same.
    replace(&certs.path("b.crt"), &cert);
    replace(&certs.path("a.key"), &key);
    p.signal("HUP");
    until_metric(p.addr, config.clone(), reloads_error, 2).await;
    let four = tls_connect(p.addr, config.clone()).await;
    assert_eq!(presented(&four), certs.der("b"));
    drop(four);
    assert_eq!(metric(p.addr, config.clone(), reloads_ok).await, 1);
    let log = p.stderr();
    assert!(log.contains("tls.cert_file"), "{log}");
    assert!(log.contains("tls.key_file"), "{log}");

    // SIGTERM still stops it gracefully: both WebSockets get 1001.
    p.signal("TERM");
    assert_eq!(one.close_code().await, 1001);
    assert_eq!(two.close_code().await, 1001);
    assert_eq!(p.exited().await, Some(0));
}

#[tokio::test]
async fn sighup_without_tls_is_logged_and_the_server_keeps_running() {
    let p = Process::start(&[], None).await;
    p.signal("HUP");
    p.until_logged("nothing to reload").await;
    let status = reqwest::get(format!("http://{}/healthz", p.addr))
        .await
        .unwrap()
        .status();
    assert_eq!(status, 200);
}

/// Runs the binary with `env` and `verb` (`run` or `check-config`), which
/// must fail at once; returns its exit code and stderr.
fn refused(verb: &str, env: &[(&str, &str)]) -> (Option<i32>, String) {
    let (mut c, _) = Process::command(env);
    let out = c
        .arg(verb)
        .stderr(Stdio::piped())
        .output()
        .expect("the pulso binary runs");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn tls_settings_that_cannot_be_used_are_a_configuration_error() {
    let Some(certs) = Certs::make() else { return };
    let junk = certs.path("junk.pem");
    std::fs::write(&junk, "-----BEGIN CERTIFICATE-----\nnot base64!\n").unwrap();
    let empty = certs.path("empty.pem");
    std::fs::write(&empty, "").unwrap();
    let missing = certs.path("missing.pem");
    let (a_crt, a_key, b_key) = (
        certs.path("a.crt"),
        certs.path("a.key"),
        certs.path("b.key"),
    );
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let cases: Vec<(Vec<(&str, String)>, &str)> = vec![
        (
            vec![("PULSO_TLS_CERT_FILE", s(&a_crt))],
            "`tls.key_file`: is needed with tls.cert_file",
        ),
        (
            vec![("PULSO_TLS_KEY_FILE", s(&a_key))],
            "`tls.cert_file`: is needed with tls.key_file",
        ),
        (
            vec![
                ("PULSO_TLS_CERT_FILE", s(&missing)),
                ("PULSO_TLS_KEY_FILE", s(&a_key)),
            ],
            "`tls.cert_file`",
        ),
        (
            vec![
                ("PULSO_TLS_CERT_FILE", s(&junk)),
                ("PULSO_TLS_KEY_FILE", s(&a_key)),
            ],
            "`tls.cert_file`",
        ),
        (
            vec![
                ("PULSO_TLS_CERT_FILE", s(&empty)),
                ("PULSO_TLS_KEY_FILE", s(&a_key)),
            ],
            "no CERTIFICATE block",
        ),
        (
            vec![
                ("PULSO_TLS_CERT_FILE", s(&a_crt)),
                ("PULSO_TLS_KEY_FILE", s(&a_crt)),
            ],
            "`tls.key_file`",
        ),
        (
            vec![
                ("PULSO_TLS_CERT_FILE", s(&a_crt)),
                ("PULSO_TLS_KEY_FILE", s(&b_key)),
            ],
            "cannot be used with the certificate",
        ),
    ];
    for (env, want) in &cases {
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        for verb in ["run", "check-config"] {
            let (code, stderr) = refused(verb, &env);
            assert_eq!(code, Some(2), "{verb} {env:?}: {stderr}");
            assert!(stderr.contains(want), "{verb} {env:?}: {stderr}");
            assert_eq!(
                stderr.trim_end().lines().count(),
                1,
                "{verb} {env:?}: one line: {stderr}"
            );
        }
    }
    // And the pair that fits is accepted by check-config.
    let (mut c, _) = Process::command(&[
        ("PULSO_TLS_CERT_FILE", a_crt.to_str().unwrap()),
        ("PULSO_TLS_KEY_FILE", a_key.to_str().unwrap()),
    ]);
    let out = c.arg("check-config").output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
