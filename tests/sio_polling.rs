//! Socket.IO over Engine.IO long-polling, and the upgrade from polling to
//! WebSocket, against a real server with a raw HTTP client: payload
//! framing (Engine.IO 3 lengths in UTF-16 units, Engine.IO 4 separators),
//! heartbeats, errors, slow consumers, and an upgrade that loses, repeats
//! and reorders nothing. The JS clients are tested in `tests/interop/`.

mod common;

use common::{TestServer, WAIT};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

const NS: &str = "/notifications";

/// A test-side payload decoder, written from the Engine.IO spec rather
/// than shared with the server: Engine.IO 3 counts lengths the way
/// JavaScript does (UTF-16 code units).
fn decode(body: &str, eio3: bool) -> Vec<String> {
    if !eio3 {
        return body.split('\u{1e}').map(String::from).collect();
    }
    let units: Vec<u16> = body.encode_utf16().collect();
    let mut packets = Vec::new();
    let mut at = 0;
    while at < units.len() {
        let colon = at + units[at..].iter().position(|&u| u == b':' as u16).unwrap();
        let len: usize = String::from_utf16(&units[at..colon])
            .unwrap()
            .parse()
            .unwrap();
        packets.push(String::from_utf16(&units[colon + 1..colon + 1 + len]).unwrap());
        at = colon + 1 + len;
    }
    packets
}

fn encode(packets: &[&str], eio3: bool) -> String {
    if !eio3 {
        return packets.join("\u{1e}");
    }
    packets
        .iter()
        .map(|p| format!("{}:{p}", p.encode_utf16().count()))
        .collect()
}

/// One polling session.
struct Poller {
    http: reqwest::Client,
    url: String,
    eio3: bool,
    sid: String,
    /// The socket id the notifications namespace gave (EIO4), once joined.
    socket_id: String,
}

impl Poller {
    async fn open(srv: &TestServer, eio: u8) -> (Poller, Vec<String>) {
        let http = reqwest::Client::new();
        let base = srv.url(&format!("/socket.io/?EIO={eio}&transport=polling"));
        let eio3 = eio == 3;
        let body = http.get(&base).send().await.unwrap().text().await.unwrap();
        let packets = decode(&body, eio3);
        let open: Value = serde_json::from_str(&packets[0][1..]).unwrap();
        let sid = open["sid"].as_str().unwrap().to_string();
        let url = format!("{base}&sid={sid}");
        let p = Poller {
            http,
            url,
            eio3,
            sid,
            socket_id: String::new(),
        };
        (p, packets)
    }

    async fn get_raw(&self) -> reqwest::Response {
        tokio::time::timeout(WAIT, self.http.get(&self.url).send())
            .await
            .expect("the GET is answered in time")
            .unwrap()
    }

    async fn get(&self) -> Vec<String> {
        let response = self.get_raw().await;
        assert_eq!(response.status(), 200);
        assert_eq!(
            response.headers()["content-type"],
            "text/plain; charset=UTF-8"
        );
        decode(&response.text().await.unwrap(), self.eio3)
    }

    async fn post(&self, packets: &[&str]) -> u16 {
        let response = self
            .http
            .post(&self.url)
            .body(encode(packets, self.eio3))
            .send()
            .await
            .unwrap();
        response.status().as_u16()
    }

    /// Joins the notifications namespace and authenticates as `role`/`sub`.
    async fn authenticate(&mut self, srv: &TestServer, role: &str, sub: &str) {
        assert_eq!(self.post(&[&format!("40{NS},")]).await, 200);
        let joined = self.get().await;
        if !self.eio3 {
            let connect: Value = serde_json::from_str(&joined[0][NS.len() + 3..]).unwrap();
            self.socket_id = connect["sid"].as_str().unwrap().to_string();
        }
        let request = json!(["get", {"url": NS, "params": {"jwt-api-key": srv.token(role, sub)}}]);
        assert_eq!(self.post(&[&format!("42{NS},7{request}")]).await, 200);
        let ack = self.get().await;
        assert!(
            ack[0].starts_with(&format!("43{NS},7[")) && ack[0].contains("\"statusCode\":200"),
            "{ack:?}"
        );
    }
}

async fn broadcast(srv: &TestServer, room: &str, data: Value) {
    let (status, body) = srv
        .post(
            "/api/broadcast",
            json!({"rooms": room, "event": "n", "data": data}),
        )
        .await;
    assert_eq!((status, &body["recipients"]), (200, &json!(1)), "{body}");
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn next_text(ws: &mut Ws) -> String {
    match tokio::time::timeout(WAIT, ws.next()).await {
        Ok(Some(Ok(Message::Text(t)))) => t.to_string(),
        other => panic!("no text on the WebSocket: {other:?}"),
    }
}

fn event(data: Value) -> String {
    format!("42{NS},[\"n\",{data}]")
}

#[tokio::test]
async fn engine_io_4_polling_authenticates_and_batches_what_was_published() {
    let srv = TestServer::start().await;
    let (mut p, first) = Poller::open(&srv, 4).await;
    assert_eq!(first.len(), 1);
    let open: Value = serde_json::from_str(&first[0][1..]).unwrap();
    assert_eq!(open["upgrades"], json!(["websocket"]));
    p.authenticate(&srv, "assistant", "poll-4").await;

    // Published while no GET waits: all of it in the next answer, in order.
    for n in 0..5 {
        broadcast(&srv, &p.socket_id, json!(n)).await;
    }
    let got = p.get().await;
    let want: Vec<String> = (0..5).map(|n| event(json!(n))).collect();
    assert_eq!(got, want);
    // A waiting GET is answered by the next publish.
    let waiting = tokio::spawn(async move {
        let got = p.get().await;
        (p, got)
    });
    broadcast(&srv, "assistant", json!({"later": true})).await;
    let (p, got) = waiting.await.unwrap();
    assert_eq!(got, vec![event(json!({"later": true}))]);

    // The client closes: the session and its hub entry are gone.
    assert_eq!(p.post(&["1"]).await, 200);
    srv.until("the session left the hub", |gw| {
        gw.hub.stats().connections == 0
    })
    .await;
    let after = p.get_raw().await;
    if after.status() == 200 {
        // Collected within the close grace: the CLOSE packet.
        assert_eq!(decode(&after.text().await.unwrap(), false), vec!["1"]);
    } else {
        assert_eq!(after.status(), 400);
    }
}

/// Engine.IO 3: lengths in UTF-16 units (an emoji counts two), the root
/// namespace joined at once, client pings answered on the next GET.
#[tokio::test]
async fn engine_io_3_polling_counts_lengths_as_javascript_does() {
    let srv = TestServer::start().await;
    let (mut p, first) = Poller::open(&srv, 3).await;
    assert_eq!(first.len(), 2, "{first:?}");
    assert!(first[0].starts_with("0{"));
    assert_eq!(first[1], "40");
    assert_eq!(p.post(&["2"]).await, 200);
    assert_eq!(p.get().await, vec!["3"]);
    p.authenticate(&srv, "timer", "poll-3").await;
    let own = format!("{NS}#{}", p.sid);
    let data = json!({"t": "😀 é €", "n": 1});
    broadcast(&srv, &own, data.clone()).await;
    broadcast(&srv, &own, json!("2")).await;
    assert_eq!(p.get().await, vec![event(data), event(json!("2"))]);
    // Packets of one POST are handled in order: two pings, each answered.
    assert_eq!(p.post(&["2a", "6", "2b"]).await, 200);
    assert_eq!(p.get().await, vec!["3a", "3b"]);
    // A packet that is not Socket.IO ends the session.
    assert_eq!(p.post(&["4ignored"]).await, 200);
    assert_eq!(p.get().await, vec!["1"]);
}

#[tokio::test]
async fn engine_io_errors_name_the_problem() {
    let srv = TestServer::start().await;
    let http = reqwest::Client::new();
    let check = async |method: reqwest::Method, query: &str, code: u64| {
        let response = http
            .request(method, srv.url(&format!("/socket.io/?{query}")))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 400, "{query}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["code"], code, "{query}: {body}");
    };
    use reqwest::Method;
    check(Method::GET, "EIO=4&transport=carrier-pigeon", 0).await;
    check(Method::GET, "EIO=3&transport=polling&j=0", 0).await;
    check(Method::GET, "EIO=4&transport=polling&sid=nope", 1).await;
    check(Method::POST, "EIO=4&transport=polling", 2).await;
    check(Method::GET, "EIO=5&transport=polling", 5).await;

    // A payload that does not parse ends the session.
    let (p, _) = Poller::open(&srv, 3).await;
    let response = p.http.post(&p.url).body("5:40").send().await.unwrap();
    assert_eq!(response.status(), 400);
    assert_eq!(p.get().await, vec!["1"]);

    // Two GETs at once: one is refused and the session ends, so the other
    // gets CLOSE (which one is refused depends on which arrives first).
    let (p, _) = Poller::open(&srv, 4).await;
    let (a, b) = tokio::join!(p.get_raw(), p.get_raw());
    let mut answers = Vec::new();
    for response in [a, b] {
        let status = response.status().as_u16();
        answers.push((status, response.text().await.unwrap()));
    }
    answers.sort();
    assert_eq!(answers[0], (200, "1".to_string()), "{answers:?}");
    assert_eq!(answers[1].0, 400, "{answers:?}");
    srv.until("both sessions left the hub", |gw| {
        gw.hub.stats().connections == 0
    })
    .await;
}

/// The server pings over polling; a client that does not answer is
/// dropped after one more interval.
#[tokio::test]
async fn a_polling_client_that_does_not_answer_pings_is_dropped() {
    let srv = TestServer::start_toml("keepalive_interval = \"300ms\"\n").await;
    let (p, _) = Poller::open(&srv, 4).await;
    let (q, _) = Poller::open(&srv, 4).await;
    assert_eq!(p.get().await, vec!["2"]);
    assert_eq!(q.get().await, vec!["2"]);
    assert_eq!(q.post(&["3"]).await, 200);
    // p stays silent: its next GET ends with CLOSE; q gets its next ping.
    assert_eq!(p.get().await, vec!["1"]);
    assert_eq!(q.get().await, vec!["2"]);
    srv.until("p left the hub", |gw| gw.hub.stats().connections == 1)
        .await;
}

/// A client that stops polling while messages keep coming is closed as a
/// slow consumer once `ws.outbound_queue` messages wait, without a GET to
/// notice it.
#[tokio::test]
async fn a_client_that_stops_polling_is_a_slow_consumer() {
    let srv = TestServer::start_toml("[ws]\noutbound_queue = 8\n").await;
    let (mut p, _) = Poller::open(&srv, 4).await;
    p.authenticate(&srv, "assistant", "stalled").await;
    let before = srv.gw.metrics.slow_consumer_closes.get();
    for n in 0..20 {
        let (status, _) = srv
            .post("/api/broadcast", json!({"rooms": "assistant", "data": n}))
            .await;
        assert_eq!(status, 200);
    }
    srv.until("the stalled session is closed", |gw| {
        gw.hub.stats().connections == 0
    })
    .await;
    assert_eq!(srv.gw.metrics.slow_consumer_closes.get(), before + 1);
    // Its last GET gets the CLOSE packet, not the backlog (or, after the
    // close grace, finds the session gone).
    let last = p.get_raw().await;
    if last.status() == 200 {
        assert_eq!(decode(&last.text().await.unwrap(), false), vec!["1"]);
    } else {
        assert_eq!(last.status(), 400);
    }
}

/// Messages published before the probe, during it and after the upgrade
/// arrive once each and in order: the first ones by polling, the rest on
/// the WebSocket.
#[tokio::test]
async fn an_upgrade_loses_repeats_and_reorders_nothing() {
    for eio in [4, 3] {
        let srv = TestServer::start().await;
        let (mut p, _) = Poller::open(&srv, eio).await;
        p.authenticate(&srv, "assistant", "upgrader").await;
        let mut n = 0;
        let mut publish = async |count: usize| {
            for _ in 0..count {
                broadcast(&srv, "assistant", json!(n)).await;
                n += 1;
            }
        };
        publish(10).await;
        let ws_url = format!(
            "ws://{}/socket.io/?EIO={eio}&transport=websocket&sid={}",
            srv.addr, p.sid
        );
        let (mut ws, _) = tokio_tungstenite::connect_async(ws_url).await.unwrap();
        // Not yet probed: still polling.
        publish(5).await;
        ws.send(Message::text("2probe")).await.unwrap();
        assert_eq!(next_text(&mut ws).await, "3probe", "EIO{eio}");
        publish(5).await;
        // The client drains its poll; once nothing is left it gets NOOP.
        let mut polled = Vec::new();
        loop {
            let got = p.get().await;
            if got == ["6"] {
                break;
            }
            polled.extend(got);
        }
        let want: Vec<String> = (0..20).map(|n| event(json!(n))).collect();
        assert_eq!(polled, want, "EIO{eio}: before the upgrade, by polling");
        publish(5).await;
        ws.send(Message::text("5")).await.unwrap();
        publish(5).await;
        let mut upgraded = Vec::new();
        while upgraded.len() < 10 {
            upgraded.push(next_text(&mut ws).await);
        }
        let want: Vec<String> = (20..30).map(|n| event(json!(n))).collect();
        assert_eq!(
            upgraded, want,
            "EIO{eio}: after the upgrade, on the WebSocket"
        );
        // The session no longer polls; the socket is still one connection.
        assert_eq!(p.get_raw().await.status(), 400);
        assert_eq!(srv.gw.hub.stats().connections, 1);
        ws.send(Message::text(format!("42{NS},[\"x\"]")))
            .await
            .unwrap();
        ws.close(None).await.unwrap();
        srv.until("the upgraded socket left the hub", |gw| {
            gw.hub.stats().connections == 0
        })
        .await;
        srv.stop().await;
    }
}

/// A WebSocket that probes and goes away leaves the session polling.
#[tokio::test]
async fn an_abandoned_probe_leaves_the_session_polling() {
    let srv = TestServer::start().await;
    let (mut p, _) = Poller::open(&srv, 4).await;
    p.authenticate(&srv, "assistant", "prober").await;
    let ws_url = format!(
        "ws://{}/socket.io/?EIO=4&transport=websocket&sid={}",
        srv.addr, p.sid
    );
    let (mut ws, _) = tokio_tungstenite::connect_async(ws_url).await.unwrap();
    ws.send(Message::text("2probe")).await.unwrap();
    let pong = tokio::time::timeout(WAIT, ws.next()).await;
    assert!(
        matches!(&pong, Ok(Some(Ok(Message::Text(t)))) if t.as_str() == "3probe"),
        "{pong:?}"
    );
    // The server answers the close after it gave the session back to polling.
    ws.close(None).await.unwrap();
    while let Ok(Some(Ok(_))) = tokio::time::timeout(WAIT, ws.next()).await {}
    let waiting = tokio::spawn(async move { p.get().await });
    broadcast(&srv, "assistant", json!("hello")).await;
    assert_eq!(waiting.await.unwrap(), vec![event(json!("hello"))]);
}

async fn probe(srv: &TestServer, p: &Poller) -> Ws {
    let ws_url = format!(
        "ws://{}/socket.io/?EIO=4&transport=websocket&sid={}",
        srv.addr, p.sid
    );
    let (mut ws, _) = tokio_tungstenite::connect_async(ws_url).await.unwrap();
    ws.send(Message::text("2probe")).await.unwrap();
    assert_eq!(next_text(&mut ws).await, "3probe");
    ws
}

/// The close frame's code, once the server closes the WebSocket.
async fn close_code(ws: &mut Ws) -> u16 {
    loop {
        match tokio::time::timeout(WAIT, ws.next()).await {
            Ok(Some(Ok(Message::Close(frame)))) => {
                return frame.map_or(1005, |f| u16::from(f.code));
            }
            Ok(Some(Ok(_))) => {}
            other => panic!("no close frame: {other:?}"),
        }
    }
}

/// A server shutdown closes a WebSocket that is probing a session (1001,
/// within a second) instead of waiting for its 10 s upgrade deadline.
#[tokio::test]
async fn a_shutdown_closes_a_probing_websocket_promptly() {
    let srv = TestServer::start().await;
    let (p, _) = Poller::open(&srv, 4).await;
    let mut ws = probe(&srv, &p).await;
    let stopping = tokio::spawn(srv.stop());
    assert_eq!(close_code(&mut ws).await, 1001);
    stopping.await.unwrap();
}

/// A session that ends while it is probed (here: no authentication in
/// time) still says goodbye: its waiting GET gets DISCONNECT and CLOSE, or,
/// for a client that already paused polling, its WebSocket does once the
/// client sends `5`; a probe that never sends `5` is then closed.
#[tokio::test]
async fn a_session_that_ends_during_a_probe_still_says_goodbye() {
    let srv = TestServer::start_toml("[socketio]\nauth_timeout = \"300ms\"\n").await;
    let joined = async || {
        let (p, _) = Poller::open(&srv, 4).await;
        assert_eq!(p.post(&[&format!("40{NS},")]).await, 200);
        assert!(p.get().await[0].starts_with(&format!("40{NS},")));
        p
    };
    let goodbye = vec![format!("41{NS},"), "1".to_string()];

    // The probe never sends `5`: closed soon after the session ended, the
    // session's last GET says goodbye.
    let p = joined().await;
    let mut ws = probe(&srv, &p).await;
    assert_eq!(p.get().await, vec!["6"], "NOOP while upgrading");
    assert_eq!(close_code(&mut ws).await, 1000);
    assert_eq!(p.get().await, goodbye);

    // The client paused polling and sends `5` after the session ended.
    let p = joined().await;
    let mut ws = probe(&srv, &p).await;
    assert_eq!(p.get().await, vec!["6"], "NOOP while upgrading");
    srv.until("the session ended", |gw| gw.hub.stats().connections == 0)
        .await;
    ws.send(Message::text("5")).await.unwrap();
    assert_eq!(next_text(&mut ws).await, goodbye[0]);
    assert_eq!(close_code(&mut ws).await, 1000);
}

/// A POST may batch many packets and more than one message's worth of
/// bytes (socket.io-client 2.x does not split batches); one packet over
/// `ws.max_message_size` ends the session.
#[tokio::test]
async fn posts_batch_freely_but_each_packet_is_bounded() {
    let srv = TestServer::start_toml("[ws]\nmax_message_size = 1024\n").await;
    let (p, _) = Poller::open(&srv, 3).await;
    let pings: Vec<String> = (0..2000).map(|i| format!("2{i:0>900}")).collect();
    let pings: Vec<&str> = pings.iter().map(String::as_str).take(10).collect();
    assert_eq!(p.post(&pings).await, 200, "10 packets of 900 bytes");
    let pongs: Vec<String> = (0..10).map(|i| format!("3{i:0>900}")).collect();
    assert_eq!(p.get().await, pongs, "each ping answered, in order");
    let noops = vec!["6"; 1000];
    assert_eq!(p.post(&noops).await, 200, "1000 packets");
    let big = format!("2{}", "x".repeat(1100));
    assert_eq!(p.post(&[&big]).await, 413);
    assert_eq!(p.get().await, vec!["1"]);
}

/// Engine.IO 3 pings over polling are replies like any other: each gets
/// its `3`, and a POST of more than `ws.outbound_queue` of them ends the
/// session as a slow consumer instead of queueing without bound.
#[tokio::test]
async fn a_polling_ping_flood_is_bounded_by_the_outbound_queue() {
    let srv = TestServer::start_toml("[ws]\noutbound_queue = 8\n").await;
    let (p, _) = Poller::open(&srv, 3).await;
    assert_eq!(p.post(&["2"; 100]).await, 200);
    let mut expected = vec!["3"; 8];
    expected.push("1");
    assert_eq!(p.get().await, expected);
}

/// Authenticating without an ack while a GET waits moves the token expiry
/// the session's task sleeps to: the expiry is enforced on time.
#[tokio::test]
async fn a_token_expiry_set_by_a_post_is_enforced_on_time() {
    let srv = TestServer::start().await;
    let (p, _) = Poller::open(&srv, 4).await;
    assert_eq!(p.post(&[&format!("40{NS},")]).await, 200);
    assert!(p.get().await[0].starts_with(&format!("40{NS},")));
    let http = p.http.clone();
    let url = p.url.clone();
    let waiting = tokio::spawn(async move {
        let body = http.get(&url).send().await.unwrap().text().await.unwrap();
        decode(&body, false)
    });
    // No ack id: nothing answers the waiting GET until the token expires.
    let short = common::token(
        "assistant",
        "short",
        Some(std::time::Duration::from_secs(1)),
    );
    let request = json!(["get", {"url": NS, "params": {"jwt-api-key": short}}]);
    assert_eq!(p.post(&[&format!("42{NS},{request}")]).await, 200);
    let got = tokio::time::timeout(WAIT, waiting)
        .await
        .expect("the expiry ends the session within a few seconds")
        .unwrap();
    assert_eq!(got, vec![format!("41{NS},"), "1".to_string()]);
}

/// One WebSocket at a time may upgrade a session: a second one is closed
/// without touching the session, which the first then takes over intact;
/// once it has, the session id no longer opens anything.
#[tokio::test]
async fn a_second_upgrade_attempt_is_closed_and_harms_nothing() {
    let srv = TestServer::start().await;
    let (mut p, _) = Poller::open(&srv, 4).await;
    p.authenticate(&srv, "assistant", "two-probes").await;
    let mut first = probe(&srv, &p).await;
    let url = format!(
        "ws://{}/socket.io/?EIO=4&transport=websocket&sid={}",
        srv.addr, p.sid
    );
    let (mut second, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
    let _ = second.send(Message::text("2probe")).await;
    let _ = second.send(Message::text("5")).await;
    match tokio::time::timeout(WAIT, second.next()).await {
        Ok(None | Some(Err(_)) | Some(Ok(Message::Close(_)))) => {}
        other => panic!("the second attempt was served: {other:?}"),
    }
    assert_eq!(p.get().await, vec!["6"]);
    first.send(Message::text("5")).await.unwrap();
    broadcast(&srv, "assistant", json!("after")).await;
    assert_eq!(next_text(&mut first).await, event(json!("after")));
    assert!(tokio_tungstenite::connect_async(&url).await.is_err());
}
