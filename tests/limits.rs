//! Limits against resource exhaustion and browser origin checks, against a
//! real server over real sockets: open connections in all and per address
//! (`/ws` and Socket.IO, every transport), open long-polling sessions,
//! frame buffers that grow only with bytes received (measured as the
//! server process's RSS), replays to a client that stops reading, and
//! `allowed_origins` on `/ws`, Socket.IO and CORS.

mod common;

use std::net::{IpAddr, SocketAddr};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;

/// Opens a WebSocket to `url` from `from` (a loopback address), with an
/// `Origin` header if given: `Ok` with the socket, or the refusal's status
/// and JSON body.
async fn ws_from(
    url: &str,
    from: Option<IpAddr>,
    origin: Option<&str>,
) -> Result<WsClient, (u16, Value)> {
    let mut request = url.into_client_request().unwrap();
    if let Some(origin) = origin {
        request
            .headers_mut()
            .insert("origin", HeaderValue::from_str(origin).unwrap());
    }
    let host = request.uri().authority().unwrap().as_str().to_string();
    let addr: SocketAddr = host.parse().unwrap();
    let socket = TcpSocket::new_v4().unwrap();
    if let Some(ip) = from {
        socket.bind(SocketAddr::new(ip, 0)).unwrap();
    }
    let tcp = socket.connect(addr).await.unwrap();
    let tcp = tokio_tungstenite::MaybeTlsStream::Plain(tcp);
    let result = tokio::time::timeout(WAIT, tokio_tungstenite::client_async(request, tcp))
        .await
        .expect("an answer in time");
    match result {
        Ok((stream, _)) => Ok(WsClient { stream }),
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            let body = response.body().clone().unwrap_or_default();
            Err((
                response.status().as_u16(),
                serde_json::from_slice(&body).unwrap_or(Value::Null),
            ))
        }
        Err(e) => panic!("unexpected error: {e}"),
    }
}

async fn ws(
    srv: &TestServer,
    from: Option<IpAddr>,
    origin: Option<&str>,
) -> Result<WsClient, (u16, Value)> {
    ws_from(&srv.ws_url(&srv.token("assistant", "limits")), from, origin).await
}

fn sio_ws_url(srv: &TestServer) -> String {
    format!("ws://{}/socket.io/?EIO=4&transport=websocket", srv.addr)
}

/// Opens a Socket.IO long-polling session from `from`: the status and body.
async fn polling_open(
    srv: &TestServer,
    from: Option<IpAddr>,
    origin: Option<&str>,
) -> (u16, String, reqwest::header::HeaderMap) {
    let mut client = reqwest::Client::builder();
    if let Some(ip) = from {
        client = client.local_address(ip);
    }
    let mut req = client
        .build()
        .unwrap()
        .get(srv.url("/socket.io/?EIO=4&transport=polling"));
    if let Some(origin) = origin {
        req = req.header("origin", origin);
    }
    let resp = tokio::time::timeout(WAIT, req.send())
        .await
        .expect("an answer in time")
        .unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    (status, resp.text().await.unwrap(), headers)
}

/// The engine id in a polling OPEN payload (`0{"sid":…}`).
fn engine_id(open: &str) -> String {
    let v: Value = serde_json::from_str(&open[1..open.find('\u{1e}').unwrap_or(open.len())])
        .unwrap_or_else(|_| panic!("an OPEN packet: {open}"));
    v["sid"].as_str().unwrap().to_string()
}

fn metric(text: &str, line_start: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(line_start))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

fn is_refusal(answer: &(u16, Value), status: u16, code: &str) -> bool {
    answer.0 == status && answer.1["error"]["code"] == code
}

/// A 503 `too_many_connections` whose message names the `setting` reached.
fn assert_too_many(answer: &(u16, Value), setting: &str) {
    assert!(
        is_refusal(answer, 503, "too_many_connections"),
        "{answer:?}"
    );
    let message = answer.1["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains(setting), "{answer:?}");
}

fn loopback(n: u8) -> Option<IpAddr> {
    Some(IpAddr::from([127, 0, 0, n]))
}

#[tokio::test]
async fn max_connections_counts_ws_and_socketio_of_every_transport() {
    let srv = TestServer::start_toml("max_connections = 3").await;
    let mut plain = ws(&srv, None, None).await.expect("first /ws");
    let ws_url = sio_ws_url(&srv);
    let sio = ws_from(&ws_url, None, None)
        .await
        .expect("a Socket.IO WebSocket");
    let (status, open, _) = polling_open(&srv, None, None).await;
    assert_eq!(status, 200, "a polling session: {open}");
    assert_eq!(srv.gw.admission.open(), 3);

    // Full: each refused before any upgrade or session, with a JSON body.
    let refused = ws(&srv, None, None)
        .await
        .err()
        .expect("a fourth /ws is refused");
    assert_too_many(&refused, "max_connections");
    let refused = ws_from(&ws_url, None, None)
        .await
        .err()
        .expect("Socket.IO refused");
    assert_eq!(refused.0, 503);
    assert_eq!(
        refused.1["code"], 4,
        "the Engine.IO error body: {refused:?}"
    );
    let (status, body, _) = polling_open(&srv, None, None).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(serde_json::from_str::<Value>(&body).unwrap()["code"], 4);
    let text = srv.metrics().await;
    assert_eq!(
        metric(
            &text,
            "pulso_connections_refused_total{reason=\"max_connections\"}"
        ),
        3.0,
        "{text}"
    );

    // A connection that ends frees its place.
    plain.stream.close(None).await.unwrap();
    srv.until("the /ws connection to end", |gw| gw.admission.open() == 2)
        .await;
    let _again = ws(&srv, None, None).await.expect("room again");
    drop(sio);
    srv.stop().await;
}

#[tokio::test]
async fn max_connections_per_ip_counts_each_tcp_peer_address() {
    let srv = TestServer::start_toml("max_connections_per_ip = 2").await;
    let _a = ws(&srv, loopback(1), None)
        .await
        .expect("first from 127.0.0.1");
    let (status, _, _) = polling_open(&srv, loopback(1), None).await;
    assert_eq!(status, 200, "a polling session counts too");
    let refused = ws(&srv, loopback(1), None)
        .await
        .err()
        .expect("a third is refused");
    assert_too_many(&refused, "max_connections_per_ip");
    let (status, _, _) = polling_open(&srv, loopback(1), None).await;
    assert_eq!(status, 503);
    let refused = ws_from(&sio_ws_url(&srv), loopback(1), None).await.err();
    assert_eq!(refused.map(|r| r.0), Some(503));
    // Another address has its own count.
    let _b = ws(&srv, loopback(2), None)
        .await
        .expect("127.0.0.2 may connect");
    let _c = ws_from(&sio_ws_url(&srv), loopback(2), None)
        .await
        .expect("and open a Socket.IO WebSocket");
    let text = srv.metrics().await;
    assert_eq!(
        metric(
            &text,
            "pulso_connections_refused_total{reason=\"max_connections_per_ip\"}"
        ),
        3.0,
        "{text}"
    );
    srv.stop().await;
}

#[tokio::test]
async fn open_polling_sessions_are_capped() {
    let srv = TestServer::start_toml("[socketio]\nmax_polling_sessions = 3").await;
    let mut ids = Vec::new();
    for _ in 0..3 {
        let (status, open, _) = polling_open(&srv, None, None).await;
        assert_eq!(status, 200, "{open}");
        ids.push(engine_id(&open));
    }
    let (status, body, _) = polling_open(&srv, None, None).await;
    assert_eq!(status, 503, "{body}");
    let body: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["code"], 4);
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("max_polling_sessions"),
        "{body}"
    );
    // A WebSocket is no polling session.
    let _ws = ws_from(&sio_ws_url(&srv), None, None)
        .await
        .expect("a Socket.IO WebSocket is accepted");
    let text = srv.metrics().await;
    assert_eq!(
        metric(
            &text,
            "pulso_connections_refused_total{reason=\"max_polling_sessions\"}"
        ),
        1.0,
        "{text}"
    );
    assert_eq!(
        metric(&text, "pulso_socketio_polling_sessions "),
        3.0,
        "{text}"
    );

    // A session that ends (the client's CLOSE, then its last GET) frees
    // its place.
    let session = srv.url(&format!(
        "/socket.io/?EIO=4&transport=polling&sid={}",
        ids[0]
    ));
    let http = reqwest::Client::new();
    let posted = http.post(&session).body("1").send().await.unwrap();
    assert_eq!(posted.status(), 200);
    let _ = http.get(&session).send().await.unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (status, _, _) = polling_open(&srv, None, None).await;
        if status == 200 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no room after a session ended"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    srv.stop().await;
}

// ---- origins ------------------------------------------------------------

#[tokio::test]
async fn origins_not_allowed_are_refused_on_ws_and_socketio_and_get_no_cors() {
    let srv = TestServer::start_toml("allowed_origins = [\"http://good.test\"]").await;
    let (good, evil) = (Some("http://good.test"), Some("http://evil.test"));

    // /ws: 403 with a JSON body for a foreign origin, before the token.
    let refused = ws(&srv, None, evil).await.err().expect("refused");
    assert!(
        is_refusal(&refused, 403, "origin_not_allowed"),
        "{refused:?}"
    );
    let refused = ws_from(&format!("ws://{}/ws", srv.addr), None, evil)
        .await
        .err();
    assert_eq!(refused.map(|r| r.0), Some(403));
    ws(&srv, None, good).await.expect("an allowed origin");
    ws(&srv, None, None)
        .await
        .expect("no Origin: not a browser");
    let own = format!("http://{}", srv.addr);
    ws(&srv, None, Some(&own))
        .await
        .expect("a page pulso serves itself");

    // Socket.IO: a new session on either transport, and a request for an
    // existing session, from a foreign origin.
    let refused = ws_from(&sio_ws_url(&srv), None, evil)
        .await
        .err()
        .expect("refused");
    assert_eq!(refused.0, 403);
    assert_eq!(refused.1["code"], 4, "{refused:?}");
    let (status, body, headers) = polling_open(&srv, None, evil).await;
    assert_eq!(status, 403, "{body}");
    assert!(headers.get("access-control-allow-origin").is_none());
    let (status, open, headers) = polling_open(&srv, None, good).await;
    assert_eq!(status, 200, "{open}");
    assert_eq!(headers["access-control-allow-origin"], "http://good.test");
    assert_eq!(headers["access-control-allow-credentials"], "true");
    let session = srv.url(&format!(
        "/socket.io/?EIO=4&transport=polling&sid={}",
        engine_id(&open)
    ));
    let stolen = reqwest::Client::new()
        .post(&session)
        .header("origin", "http://evil.test")
        .body("40")
        .send()
        .await
        .unwrap();
    assert_eq!(
        stolen.status(),
        403,
        "a session id does not let another page in"
    );

    // CORS for the HTTP API follows the same list.
    let preflight = |origin: &'static str| {
        reqwest::Client::new()
            .request(reqwest::Method::OPTIONS, srv.url("/api/publish"))
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .header(
                "access-control-request-headers",
                "authorization,content-type",
            )
            .send()
    };
    let allowed = preflight("http://good.test").await.unwrap();
    assert_eq!(allowed.status(), 204);
    assert_eq!(
        allowed.headers()["access-control-allow-origin"],
        "http://good.test"
    );
    let foreign = preflight("http://evil.test").await.unwrap();
    assert!(
        foreign
            .headers()
            .get("access-control-allow-origin")
            .is_none()
    );

    let text = srv.metrics().await;
    assert_eq!(
        metric(&text, "pulso_origin_refused_total{endpoint=\"ws\"}"),
        2.0,
        "{text}"
    );
    assert_eq!(
        metric(&text, "pulso_origin_refused_total{endpoint=\"socketio\"}"),
        3.0,
        "{text}"
    );
    srv.stop().await;
}

#[tokio::test]
async fn any_origin_is_allowed_by_default() {
    let srv = TestServer::start().await;
    ws(&srv, None, Some("http://anywhere.test"))
        .await
        .expect("/ws");
    let (status, _, headers) = polling_open(&srv, None, Some("http://anywhere.test")).await;
    assert_eq!(status, 200);
    assert_eq!(
        headers["access-control-allow-origin"],
        "http://anywhere.test"
    );
    srv.stop().await;
}

// ---- replays -------------------------------------------------------------

/// A raw `/ws` client whose receive buffer is small and that reads only
/// when told to.
async fn raw_ws(srv: &TestServer, recv_buffer: u32) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(recv_buffer).unwrap();
    let mut tcp = socket.connect(srv.addr).await.unwrap();
    let request = format!(
        "GET /ws?token={} HTTP/1.1\r\nHost: {}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
        srv.token("assistant", "replays"),
        srv.addr
    );
    tcp.write_all(request.as_bytes()).await.unwrap();
    // The 101 head, byte by byte so that nothing after it is consumed.
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut b = [0u8; 1];
        let n = tokio::time::timeout(WAIT, tcp.read(&mut b))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(n, 1, "the handshake ended early");
        head.push(b[0]);
    }
    assert!(
        head.starts_with(b"HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    tcp
}

fn client_text(v: &Value) -> Vec<u8> {
    let mut out = Vec::new();
    pulso::transport::frame::encode_client(
        &mut out,
        true,
        0x1,
        v.to_string().as_bytes(),
        [1, 2, 3, 4],
    );
    out
}

/// The close code among server frames, after everything before it.
fn close_code_in(mut bytes: &[u8]) -> Option<u16> {
    while bytes.len() >= 2 {
        let (len, start) = match bytes[1] & 0x7F {
            126 => (usize::from(u16::from_be_bytes([bytes[2], bytes[3]])), 4),
            127 => (
                u64::from_be_bytes(bytes[2..10].try_into().ok()?) as usize,
                10,
            ),
            n => (usize::from(n), 2),
        };
        if bytes[0] & 0x0F == 0x8 {
            return Some(u16::from_be_bytes([bytes[start], bytes[start + 1]]));
        }
        bytes = bytes.get(start + len..)?;
    }
    None
}

/// Last values replayed to a client that stops reading and asks for them
/// again and again (`sub`, `unsub`, `sub`…) are counted item by item
/// against `ws.outbound_queue`: it is closed as a slow consumer (1013)
/// long before it has asked for as many replays as the queue holds items.
/// A client that reads still gets a replay larger than its queue.
#[tokio::test]
async fn repeated_replays_to_a_client_that_does_not_read_close_it_as_a_slow_consumer() {
    if TcpStream::connect("127.0.0.1:1883").await.is_err() {
        return skip("no MQTT broker on 127.0.0.1:1883 (mosquitto)");
    }
    let prefix = format!("lv{}", rand_suffix());
    let srv = TestServer::start_toml(&format!(
            "[ws]\noutbound_queue = 64\nrate_limit = 100000\n[mqtt]\nurl = \"mqtt://127.0.0.1:1883\"\ntopics = [\"{prefix}/#\"]\n"
        )).await;
    // 100 kept values of 8 KiB: a replay is 100 items, larger than the queue.
    let payload = "x".repeat(8 * 1024);
    for i in 0..100 {
        let (status, body) = srv.publish(&format!("{prefix}/{i}"), json!(payload)).await;
        assert_eq!(status, 200, "{body}");
    }
    srv.until("100 last values", |gw| {
        gw.metrics.last_value_topics.get() == 100
    })
    .await;
    let filter = format!("{prefix}/#");

    // A client that reads gets all 100, and stays.
    let mut reader = srv.ws("assistant", "reader").await;
    let ack = reader.sub(&filter).await;
    assert_eq!(ack["type"], "ack", "{ack}");
    for _ in 0..100 {
        let msg = reader.recv().await;
        assert!(msg["topic"].as_str().unwrap().starts_with(&prefix), "{msg}");
    }
    assert_eq!(
        reader.request(json!({"type":"ping"}), 7).await["type"],
        "pong"
    );

    // A client that does not read asks for the replay 40 times: fewer
    // times than its queue holds items, so counting each replay as one
    // item would never close it.
    let mut tcp = raw_ws(&srv, 4096).await;
    let mut wire = Vec::new();
    for _ in 0..40 {
        wire.extend(client_text(&json!({"type":"sub","topic":filter})));
        wire.extend(client_text(&json!({"type":"unsub","topic":filter})));
    }
    tcp.write_all(&wire).await.unwrap();
    srv.until("a slow-consumer close", |gw| {
        gw.metrics.slow_consumer_closes.get() == 1
    })
    .await;
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut got))
        .await
        .expect("the server closes the connection")
        .unwrap();
    assert_eq!(close_code_in(&got), Some(1013), "{} bytes read", got.len());
    assert_eq!(
        reader.request(json!({"type":"ping"}), 8).await["type"],
        "pong"
    );
    srv.stop().await;
}

fn rand_suffix() -> String {
    format!(
        "{:x}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    )
}

// ---- frame buffers ---------------------------------------------------------

/// The real binary, so that its RSS is the server's alone.
struct Process {
    child: Child,
    addr: SocketAddr,
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Process {
    async fn start(env: &[(&str, &str)]) -> Process {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .unwrap()
            .port();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let mut c = Command::new(env!("CARGO_BIN_EXE_pulso"));
        for (k, _) in std::env::vars() {
            if k.starts_with("PULSO_") {
                c.env_remove(k);
            }
        }
        c.current_dir(std::env::temp_dir())
            .env("PULSO_LISTEN", addr.to_string())
            .env("PULSO_JWT_SECRET", SECRET)
            .env("PULSO_DEMO_ENABLED", "false")
            .env("PULSO_DATABASE_URL", "sqlite::memory:")
            .env("PULSO_LOG_LEVEL", "warn")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let process = Process {
            child: c.spawn().expect("the pulso binary starts"),
            addr,
        };
        let url = format!("http://{addr}/healthz");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        loop {
            if reqwest::get(&url).await.is_ok_and(|r| r.status() == 200) {
                return process;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "pulso did not come up"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Resident memory, in bytes.
    fn rss(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        let kb: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS");
        kb * 1024
    }
}

/// Bytes the kernel holds unread on the server's side of each connection
/// from one of `clients` (its `/proc/net/tcp` rows).
fn unread_by_server(server_port: u16, clients: &[u16]) -> u64 {
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
    let mut unread = 0;
    for line in table.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        let port =
            |field: &str| u16::from_str_radix(field.rsplit(':').next().unwrap_or(""), 16).ok();
        if port(f[1]) == Some(server_port) && port(f[2]).is_some_and(|p| clients.contains(&p)) {
            let rx = f[4].split(':').nth(1).unwrap_or("0");
            unread += u64::from_str_radix(rx, 16).unwrap_or(0);
        }
    }
    unread
}

/// Clients that each send the header of a 1 MiB frame, and nothing more,
/// make the server hold memory for what arrived, not for what the headers
/// announce. Each header arrives in two pieces (as a header trickled over
/// a slow link would): the first after a ping, whose pong shows the server
/// has read it.
#[tokio::test]
async fn frame_headers_announcing_large_frames_cost_only_what_arrived() {
    const CLIENTS: usize = 200;
    const ANNOUNCED: u64 = 1 << 20;
    let server = Process::start(&[("PULSO_WS_MAX_MESSAGE_SIZE", "1MiB")]).await;
    let token = token("assistant", "headers", Some(Duration::from_secs(600)));
    let request = format!(
        "GET /ws?token={token} HTTP/1.1\r\nHost: {}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
        server.addr
    );
    let mut header = vec![0x82, 0x80 | 127];
    header.extend_from_slice(&ANNOUNCED.to_be_bytes());
    header.extend_from_slice(&[1, 2, 3, 4]);
    let mut ping = Vec::new();
    pulso::transport::frame::encode_client(&mut ping, true, 0x9, b"p", [9, 9, 9, 9]);

    // One connection first, so the baseline has the runtime warmed up.
    let connect = || async {
        let mut tcp = TcpStream::connect(server.addr).await.unwrap();
        tcp.set_nodelay(true).unwrap();
        let mut first = request.clone().into_bytes();
        first.extend_from_slice(&ping);
        first.extend_from_slice(&header[..2]);
        tcp.write_all(&first).await.unwrap();
        // Up to the pong: the 101 head, then [0x8A, 1, b'p'].
        let mut seen = Vec::new();
        while !seen.ends_with(&[0x8A, 1, b'p']) {
            let mut chunk = [0u8; 512];
            let n = tokio::time::timeout(WAIT, tcp.read(&mut chunk))
                .await
                .unwrap()
                .unwrap();
            assert!(n > 0, "closed: {}", String::from_utf8_lossy(&seen));
            seen.extend_from_slice(&chunk[..n]);
        }
        assert!(seen.starts_with(b"HTTP/1.1 101"));
        tcp.write_all(&header[2..]).await.unwrap();
        tcp
    };
    let warm = connect().await;
    let ports = [warm.local_addr().unwrap().port()];
    wait_read(&server, &ports).await;
    let before = server.rss();

    let mut clients = Vec::with_capacity(CLIENTS);
    for _ in 0..CLIENTS {
        clients.push(connect().await);
    }
    let ports: Vec<u16> = clients
        .iter()
        .map(|c| c.local_addr().unwrap().port())
        .collect();
    wait_read(&server, &ports).await;
    let after = server.rss();
    let grown = after.saturating_sub(before);
    eprintln!(
        "RSS before {} KiB, after {CLIENTS} headers of {ANNOUNCED} bytes {} KiB: +{} KiB",
        before / 1024,
        after / 1024,
        grown / 1024
    );
    assert!(
        grown < 50 << 20,
        "{CLIENTS} headers announcing {ANNOUNCED} bytes each grew the server by {} MiB",
        grown >> 20
    );
    drop((warm, clients));
}

/// Waits until the server has read everything the clients on `ports` sent.
async fn wait_read(server: &Process, ports: &[u16]) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while unread_by_server(server.addr.port(), ports) > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the server did not read"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
