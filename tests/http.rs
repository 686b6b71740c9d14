//! HTTP connection edges over raw TCP, so that every byte (and every close)
//! is the server's: the clocks `http.header_timeout`, `http.idle_timeout`
//! and `http.body_timeout`, the connections they must leave alone (an
//! upgraded WebSocket, a Socket.IO long-poll GET), and the lingering close
//! that lets a client which writes its whole body before reading get the
//! 413. Clocks are short here (1 s, 3 s, 1.5 s, all different so each test
//! shows which clock closed the connection); waits are for the event (the
//! server closing the socket), with a bound.

mod common;

use std::time::Duration;

use common::TestServer;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::Instant;

const HEADER: Duration = Duration::from_secs(1);
const IDLE: Duration = Duration::from_secs(3);
const BODY: Duration = Duration::from_millis(1500);
/// How much earlier than its clock a close may be seen: the server starts
/// the idle clock when it hands over the response, a little before the
/// client has read it.
const EARLY: Duration = Duration::from_millis(200);
/// How much later than its clock a close may be seen on a busy machine.
const LATE: Duration = Duration::from_millis(2500);

async fn start() -> TestServer {
    TestServer::start_toml(&format!(
        "[http]\nheader_timeout = \"{}ms\"\nidle_timeout = \"{}ms\"\nbody_timeout = \"{}ms\"\n",
        HEADER.as_millis(),
        IDLE.as_millis(),
        BODY.as_millis()
    ))
    .await
}

async fn connect(srv: &TestServer) -> TcpStream {
    TcpStream::connect(srv.addr).await.unwrap()
}

/// Reads (and keeps) whatever arrives until the server closes the
/// connection (end of stream, or a reset after it closed), within `limit`.
async fn until_closed(tcp: &mut TcpStream, limit: Duration) -> Vec<u8> {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let read = async {
        loop {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    };
    tokio::time::timeout(limit, read)
        .await
        .expect("the server closes the connection in time");
    got
}

/// Asserts that `elapsed` is `clock`, give or take [`EARLY`] and [`LATE`].
fn assert_about(elapsed: Duration, clock: Duration, what: &str) {
    assert!(
        elapsed + EARLY >= clock && elapsed <= clock + LATE,
        "{what}: closed after {elapsed:?}, expected about {clock:?}"
    );
}

/// One HTTP/1.1 response read off a keep-alive connection (bodies with a
/// content-length only, which is all pulso sends here).
struct Reader {
    buf: Vec<u8>,
}

struct Parsed {
    status: u16,
    head: String,
    body: Vec<u8>,
}

impl Reader {
    fn new() -> Self {
        Reader { buf: Vec::new() }
    }

    async fn response(&mut self, tcp: &mut TcpStream) -> Parsed {
        let end = loop {
            if let Some(at) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break at + 4;
            }
            self.more(tcp).await;
        };
        let head = String::from_utf8(self.buf[..end].to_vec()).unwrap();
        let status = head[9..12].parse().unwrap();
        let length: usize = head
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case("content-length")
                    .then(|| v.trim().parse().unwrap())
            })
            .expect("a content-length");
        while self.buf.len() < end + length {
            self.more(tcp).await;
        }
        let body = self.buf[end..end + length].to_vec();
        self.buf.drain(..end + length);
        Parsed { status, head, body }
    }

    async fn more(&mut self, tcp: &mut TcpStream) {
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(10), tcp.read(&mut chunk))
            .await
            .expect("the response in time")
            .unwrap();
        assert!(n > 0, "connection closed mid-response");
        self.buf.extend_from_slice(&chunk[..n]);
    }
}

fn error_code(body: &[u8]) -> String {
    let v: Value = serde_json::from_slice(body).unwrap();
    v["error"]["code"].as_str().unwrap().to_string()
}

/// Splits a whole HTTP response read to the end of the stream.
fn split(response: &[u8]) -> (String, Vec<u8>) {
    let at = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a complete head");
    (
        String::from_utf8_lossy(&response[..at]).into_owned(),
        response[at + 4..].to_vec(),
    )
}

/// A client whose kernel cannot hold a 1 MiB body in its send buffer
/// (loopback's grow to 4 MiB): the body is written only as fast as the
/// server reads it, as over a real network.
async fn small_sndbuf_client(srv: &TestServer) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_send_buffer_size(64 * 1024).unwrap();
    socket.connect(srv.addr).await.unwrap()
}

#[tokio::test]
async fn over_limit_body_written_whole_before_reading_gets_the_413() {
    // The default `api.max_body` (1 MiB).
    let srv = TestServer::start().await;
    let admin = srv.token("admin", "a");
    for size in [1024 * 1024 + 1, 8 * 1024 * 1024] {
        // 8 MiB is more than both kernels hold, even with default buffers.
        let mut tcp = if size < 2 * 1024 * 1024 {
            small_sndbuf_client(&srv).await
        } else {
            connect(&srv).await
        };
        let request = common::oversized_post(&admin, &format!("content-length: {size}\r\n"), size);
        // Like Node's `http`: all of it, then read. Without the lingering
        // close this write fails with EPIPE (or the read with a reset).
        let response = common::write_whole_then_read(&mut tcp, &request).await;
        let (head, body) = split(&response);
        assert!(head.starts_with("HTTP/1.1 413"), "{size}: {head}");
        assert_eq!(error_code(&body), "payload_too_large", "{size}");
        // Closing our side ends the server's lingering close.
        drop(tcp);
    }

    // Chunked, with no declared length: refused once 1 MiB has been read.
    let mut tcp = small_sndbuf_client(&srv).await;
    let size = 1024 * 1024 + 1;
    // One chunk of `size` bytes: its size line ends the head.
    let chunked = format!("transfer-encoding: chunked\r\nconnection: close\r\n\r\n{size:x}");
    let mut request = common::oversized_post(&admin, &chunked, size);
    request.extend_from_slice(b"\r\n0\r\n\r\n");
    let response = common::write_whole_then_read(&mut tcp, &request).await;
    let (head, body) = split(&response);
    assert!(head.starts_with("HTTP/1.1 413"), "{head}");
    assert_eq!(error_code(&body), "payload_too_large");
    // The server still lingers on this connection (we have not closed it),
    // but stopping does not wait for that.
    let stopped = srv.stop().await;
    assert!(stopped < Duration::from_secs(2), "stop took {stopped:?}");
    drop(tcp);
}

#[tokio::test]
async fn silent_connections_are_closed_after_the_header_timeout() {
    let srv = start().await;
    let mut conns = Vec::new();
    for _ in 0..50 {
        conns.push(connect(&srv).await);
    }
    let started = Instant::now();
    for tcp in &mut conns {
        let got = until_closed(tcp, HEADER + LATE * 2).await;
        assert!(got.is_empty(), "nothing is sent to a silent client");
    }
    // The first was opened before `started`; the others soon after.
    assert_about(started.elapsed(), HEADER, "silent connections");
    srv.stop().await;
}

#[tokio::test]
async fn trickled_request_head_is_closed_after_the_header_timeout() {
    let srv = start().await;
    let mut tcp = connect(&srv).await;
    let started = Instant::now();
    // A header line that never ends, one byte every 200 ms: each byte is
    // progress, but the head must be complete within the header timeout.
    let head = b"GET /healthz HTTP/1.1\r\nhost: x\r\nx-slow: ";
    tcp.write_all(head).await.unwrap();
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    let mut buf = [0u8; 1024];
    let deadline = tokio::time::sleep(HEADER + LATE);
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            read = tcp.read(&mut buf) => match read {
                Ok(0) | Err(_) => break,
                Ok(n) => panic!("unexpected answer: {:?}", String::from_utf8_lossy(&buf[..n])),
            },
            _ = tick.tick() => {
                // A write after the close may fail; the read then ends.
                let _ = tcp.write_all(b"a").await;
            }
            () = &mut deadline => panic!("the trickling client was not cut"),
        }
    }
    assert_about(started.elapsed(), HEADER, "trickled head");
    srv.stop().await;
}

#[tokio::test]
async fn idle_keep_alive_connection_is_closed_after_the_idle_timeout() {
    let srv = start().await;
    let mut tcp = connect(&srv).await;
    let mut reader = Reader::new();
    // Two requests on one connection: it is kept alive between them.
    for _ in 0..2 {
        tcp.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        assert_eq!(reader.response(&mut tcp).await.status, 200);
    }
    let idle = Instant::now();
    let got = until_closed(&mut tcp, IDLE + LATE * 2).await;
    assert!(got.is_empty());
    // Longer than the header timeout: between requests the idle clock runs.
    assert_about(idle.elapsed(), IDLE, "idle keep-alive");
    srv.stop().await;
}

#[tokio::test]
async fn next_request_head_on_a_kept_alive_connection_has_the_header_timeout() {
    let srv = start().await;
    let mut tcp = connect(&srv).await;
    let mut reader = Reader::new();
    tcp.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    assert_eq!(reader.response(&mut tcp).await.status, 200);
    // The next request starts, and stops before its head ends.
    tcp.write_all(b"GET /heal").await.unwrap();
    let started = Instant::now();
    let got = until_closed(&mut tcp, IDLE + LATE).await;
    assert!(got.is_empty());
    let elapsed = started.elapsed();
    assert_about(elapsed, HEADER, "second head");
    assert!(
        elapsed < IDLE,
        "the header clock, not the idle one: {elapsed:?}"
    );
    srv.stop().await;
}

#[tokio::test]
async fn stalled_body_is_answered_408_after_the_body_timeout() {
    let srv = start().await;
    let admin = srv.token("admin", "a");
    let mut tcp = connect(&srv).await;
    let head = format!(
        "POST /api/publish HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {admin}\r\n\
         content-type: application/json\r\ncontent-length: 100\r\n\r\n{{\"topic\":"
    );
    tcp.write_all(head.as_bytes()).await.unwrap();
    let started = Instant::now();
    let response = until_closed(&mut tcp, BODY + LATE).await;
    // Longer than the header timeout: once the head is in, only the body
    // clock runs.
    assert_about(started.elapsed(), BODY, "stalled body");
    let (head, body) = split(&response);
    assert!(head.starts_with("HTTP/1.1 408"), "{head}");
    assert_eq!(error_code(&body), "request_timeout");

    // A body that keeps coming, slower than the header timeout but faster
    // than the body timeout, is read to its end.
    let mut tcp = connect(&srv).await;
    let payload = br#"{"topic":"t","payload":1}"#;
    let head = format!(
        "POST /api/publish HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {admin}\r\n\
         content-type: application/json\r\ncontent-length: {}\r\n\r\n",
        payload.len()
    );
    tcp.write_all(head.as_bytes()).await.unwrap();
    let mut tick = tokio::time::interval(BODY / 2);
    tick.tick().await;
    for chunk in payload.chunks(payload.len() / 3 + 1) {
        tick.tick().await;
        tcp.write_all(chunk).await.unwrap();
    }
    let response = Reader::new().response(&mut tcp).await;
    assert_eq!(response.status, 200, "{}", response.head);
    srv.stop().await;
}

#[tokio::test]
async fn websocket_outlives_the_http_timeouts() {
    use futures_util::StreamExt;
    let srv = start().await;
    let mut ws = srv.ws("assistant", "w").await;
    // Nothing may arrive, the close least of all, for longer than every
    // HTTP clock (keepalive_interval is 30 s, so no ping either).
    let quiet = tokio::time::timeout(IDLE + HEADER, ws.stream.next()).await;
    assert!(quiet.is_err(), "the WebSocket got {quiet:?}");
    let pong = ws.request(serde_json::json!({"type":"ping"}), 1).await;
    assert_eq!(pong["type"], "pong");
    srv.stop().await;
}

#[tokio::test]
async fn socketio_long_poll_outlives_the_http_timeouts() {
    // The GET is held until the next heartbeat: 4 s, beyond every clock.
    let heartbeat = Duration::from_secs(4);
    let srv = TestServer::start_toml(&format!(
            "keepalive_interval = \"{}s\"\n[http]\nheader_timeout = \"{}ms\"\nidle_timeout = \"{}ms\"\nbody_timeout = \"{}ms\"\n",
            heartbeat.as_secs(),
            HEADER.as_millis(),
            IDLE.as_millis(),
            BODY.as_millis()
        )).await;
    let mut tcp = connect(&srv).await;
    let mut reader = Reader::new();
    tcp.write_all(b"GET /socket.io/?EIO=4&transport=polling HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let open = reader.response(&mut tcp).await;
    assert_eq!(open.status, 200);
    let open: Value = serde_json::from_slice(&open.body[1..]).unwrap();
    let sid = open["sid"].as_str().unwrap();
    let started = Instant::now();
    tcp.write_all(
        format!("GET /socket.io/?EIO=4&transport=polling&sid={sid} HTTP/1.1\r\nhost: x\r\n\r\n")
            .as_bytes(),
    )
    .await
    .unwrap();
    let ping = reader.response(&mut tcp).await;
    assert_eq!((ping.status, ping.body.as_slice()), (200, &b"2"[..]));
    let held = started.elapsed();
    assert!(held + EARLY >= heartbeat, "the GET was held only {held:?}");
    srv.stop().await;
}
