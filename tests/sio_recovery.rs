//! Socket.IO connection state recovery (SPEC §11), on one node, with the
//! raw client: the pid on CONNECT, offsets on tracked events, and a client
//! whose TCP connection was cut coming back with `{pid, offset}`, as
//! socket.io-client ≥ 4.6 does. The real client is exercised in
//! `tests/interop/recovery.test.mjs`.

mod common;
#[path = "support/sio_client.rs"]
mod sio_client;

use std::time::Duration;

use common::{TestServer, token};
use serde_json::{Value, json};
use sio_client::SioClient;

const NS: &str = "/notifications";

/// History for the assistants' rooms (not `timer`, not socket ids).
const HISTORY: &str = "[history]\ntopics = [\"assistant\", \"assistant_2\", \"assistant_3\"]\n";

/// A server with presence in its own temporary SQLite file and `extra`.
async fn server(extra: &str) -> TestServer {
    TestServer::start_sqlite_file(extra).await
}

/// Waits until the server keeps `n` sessions for recovery (a cut
/// connection is noticed by the server a moment after the client drops it).
async fn kept(srv: &TestServer, n: i64) {
    srv.until(&format!("{n} kept sessions"), |gw| {
        gw.metrics.sio_recovery_sessions.get() == n
    })
    .await;
}

async fn broadcast(srv: &TestServer, rooms: &[&str], data: Value) -> Value {
    let (status, body) = srv
        .post(
            "/api/broadcast",
            json!({"rooms": rooms, "event": "check_in", "data": data}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    body
}

/// The next event's payload and offset (its last argument).
async fn event(c: &mut SioClient) -> (Value, Option<String>) {
    let (name, args) = c.event().await;
    assert_eq!(name, "check_in");
    let offset = match args.as_slice() {
        [_, Value::String(o)] => Some(o.clone()),
        [_] => None,
        other => panic!("unexpected arguments {other:?}"),
    };
    (args[0].clone(), offset)
}

fn recoveries(metrics: &str, outcome: &str) -> u64 {
    let key = format!("pulso_recoveries_total{{outcome=\"{outcome}\"}} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&key))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// An authenticated assistant of tournament 2 (rooms `assistant`,
/// `assistant_2`) that has seen one event, so it has an offset.
async fn assistant(srv: &TestServer, sub: &str) -> SioClient {
    let mut c = SioClient::connect(srv.addr, 4, NS).await;
    let ack = c
        .auth(&srv.token("assistant", sub), json!({"tournamentId": 2}))
        .await;
    assert_eq!(ack["body"]["rooms"], json!(["assistant", "assistant_2"]));
    broadcast(srv, &[&c.socket_id()], json!("untracked")).await;
    broadcast(srv, &["assistant_2"], json!("first")).await;
    assert_eq!(event(&mut c).await, (json!("untracked"), None));
    let (payload, offset) = event(&mut c).await;
    assert_eq!(payload, json!("first"));
    assert_eq!(c.last_offset, offset);
    c
}

#[tokio::test]
async fn a_cut_connection_gets_its_socket_rooms_and_missed_events_back_then_live_ones() {
    let srv = server(HISTORY).await;
    let c = assistant(&srv, "cut").await;
    let (sid, pid) = (c.socket_id(), c.pid.clone().expect("a pid"));
    let offset = c.last_offset.clone().expect("an offset");
    assert_ne!(pid, sid);
    assert!(pid.len() >= 16, "unguessable: {pid}");
    // The TCP connection is cut: no DISCONNECT, no close frame.
    drop(c);
    kept(&srv, 1).await;

    // 50 missed events, over both rooms, some to both at once (each
    // arrives once), and some the socket would not get.
    for n in 1..=50 {
        let rooms: &[&str] = match n % 3 {
            0 => &["assistant"],
            1 => &["assistant_2"],
            _ => &["assistant_2", "assistant"],
        };
        broadcast(&srv, rooms, json!(n)).await;
        broadcast(&srv, &["timer", "assistant_3"], json!("not yours")).await;
    }

    let mut back = SioClient::reconnect(srv.addr, NS, &pid, &offset).await;
    assert!(back.recovered(&pid), "same pid: socket.recovered === true");
    assert_eq!(back.socket_id(), sid, "same socket id");
    let mut last = offset.clone();
    for n in 1..=50 {
        let (payload, offset) = event(&mut back).await;
        assert_eq!(payload, json!(n));
        let offset = offset.expect("tracked events carry an offset");
        assert!(seq(&offset) > seq(&last), "{offset} after {last}");
        last = offset;
    }
    // Live events follow, with no gap: the own-id room (untracked, no
    // offset) and the tracked rooms.
    broadcast(&srv, &[&sid], json!("own")).await;
    broadcast(&srv, &["assistant"], json!("live")).await;
    assert_eq!(event(&mut back).await, (json!("own"), None));
    let (payload, offset) = event(&mut back).await;
    assert_eq!(payload, json!("live"));
    assert!(seq(&offset.unwrap()) > seq(&last));

    // Still authenticated as before: a refresh with the same identity is
    // answered with its socket id and rooms, no new authentication needed.
    let ack = back.auth(&srv.token("assistant", "cut"), json!({})).await;
    assert_eq!(
        ack,
        json!({"body":{"socketId": sid, "rooms":["assistant","assistant_2"]},"statusCode":200})
    );
    // Its presence row holds the socket again.
    let deadline = tokio::time::Instant::now() + common::WAIT;
    loop {
        let rows = srv.gw.presence.list(Some("assistant"), Some("cut")).await;
        if rows
            .as_ref()
            .is_ok_and(|r| r.len() == 1 && r[0].socket_id == sid)
        {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{rows:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let m = srv.metrics().await;
    assert_eq!(recoveries(&m, "recovered"), 1, "{m}");
    assert!(m.contains("pulso_socketio_recovery_sessions 0"), "{m}");

    // Cut again: kept again, under the same pid, and recovered again.
    let offset = back.last_offset.clone().unwrap();
    drop(back);
    kept(&srv, 1).await;
    broadcast(&srv, &["assistant_2"], json!("again")).await;
    let mut again = SioClient::reconnect(srv.addr, NS, &pid, &offset).await;
    assert!(again.recovered(&pid));
    assert_eq!(again.socket_id(), sid);
    assert_eq!(event(&mut again).await.0, json!("again"));
}

/// The global sequence of an offset `<epoch>:<n>`.
fn seq(offset: &str) -> u64 {
    offset
        .rsplit_once(':')
        .and_then(|(_, n)| n.parse().ok())
        .expect("an offset")
}

#[tokio::test]
async fn missed_then_live_has_no_gap_and_no_duplicate_while_publishing() {
    let srv = server(HISTORY).await;
    let c = assistant(&srv, "race").await;
    let (pid, offset) = (c.pid.clone().unwrap(), c.last_offset.clone().unwrap());
    drop(c);
    kept(&srv, 1).await;
    for n in 1..=20 {
        broadcast(&srv, &["assistant"], json!(n)).await;
    }
    // A publisher runs while the client reconnects.
    let addr = srv.addr;
    let publisher = tokio::spawn({
        let url = srv.url("/api/broadcast");
        let admin = srv.token("admin", "p");
        async move {
            for n in 21..=300 {
                let body = json!({"rooms": ["assistant_2"], "event": "check_in", "data": n});
                let (status, _) = common::post_json(&url, Some(&admin), &body.to_string()).await;
                assert_eq!(status, 200);
            }
        }
    });
    let mut back = SioClient::reconnect(addr, NS, &pid, &offset).await;
    assert!(back.recovered(&pid));
    publisher.await.unwrap();
    let mut got = Vec::new();
    while got.last() != Some(&300) {
        got.push(event(&mut back).await.0.as_i64().unwrap());
    }
    assert_eq!(got, (1..=300).collect::<Vec<_>>());
}

#[tokio::test]
async fn otherwise_the_client_connects_as_new() {
    let srv = server(&format!("{HISTORY}size = 5\n")).await;
    let m = srv.metrics().await;
    let (unknown, reload) = (recoveries(&m, "unknown_session"), recoveries(&m, "reload"));

    // A garbage pid; a pid of the wrong shape; an offset that is no offset.
    for auth in [
        json!({"pid": "garbage", "offset": "x:1"}),
        json!({"pid": 7, "offset": "x:1"}),
        json!({"pid": "p".repeat(500), "offset": "x:1"}),
        json!({"token": "app's own auth"}),
    ] {
        let mut c = SioClient::open(srv.addr, 4).await;
        c.join_with_auth(NS, &auth).await;
        assert!(c.pid.is_some() && c.sid.is_some());
        assert_ne!(c.pid.as_deref(), auth["pid"].as_str());
        // Not authenticated: a broadcast to every room reaches it only
        // through its own id.
        let body = broadcast(&srv, &["assistant", "assistant_2"], json!(0)).await;
        assert_eq!(body, json!({"recipients": 0}));
    }

    // A session is used once: whoever comes second connects as new.
    let c = assistant(&srv, "once").await;
    let (sid, pid, offset) = (
        c.socket_id(),
        c.pid.clone().unwrap(),
        c.last_offset.clone().unwrap(),
    );
    drop(c);
    kept(&srv, 1).await;
    let first = SioClient::reconnect(srv.addr, NS, &pid, &offset).await;
    assert!(first.recovered(&pid));
    let second = SioClient::reconnect(srv.addr, NS, &pid, &offset).await;
    assert!(!second.recovered(&pid));
    assert_ne!(second.socket_id(), sid);
    drop(first);
    kept(&srv, 1).await;

    // An offset of another epoch (another process), or never given.
    let mut bad = SioClient::reconnect(srv.addr, NS, &pid, "another:1").await;
    assert!(!bad.recovered(&pid));
    kept(&srv, 0).await;
    // Its rooms are gone with it: only the new socket's own room is left.
    let body = broadcast(&srv, &["assistant", "assistant_2"], json!(1)).await;
    assert_eq!(body, json!({"recipients": 0}));
    bad.silent_for(Duration::from_millis(100)).await;

    // History no longer holds everything after the offset (size 5).
    let c = assistant(&srv, "gap").await;
    let (pid, offset) = (c.pid.clone().unwrap(), c.last_offset.clone().unwrap());
    drop(c);
    kept(&srv, 1).await;
    for n in 0..6 {
        broadcast(&srv, &["assistant"], json!(n)).await;
    }
    let c = SioClient::reconnect(srv.addr, NS, &pid, &offset).await;
    assert!(!c.recovered(&pid));

    // A session of the other namespace is not recovered in this one.
    let mut root = SioClient::connect(srv.addr, 4, "/").await;
    root.auth(&srv.token("assistant", "root"), json!({"tournamentId": 2}))
        .await;
    let root_pid = root.pid.clone().expect("the root socket has a pid too");
    broadcast(&srv, &["assistant_2"], json!("r")).await;
    let (_, args) = root.event().await;
    let root_offset = args[1].as_str().unwrap().to_string();
    drop(root);
    kept(&srv, 1).await;
    let c = SioClient::reconnect(srv.addr, NS, &root_pid, &root_offset).await;
    assert!(!c.recovered(&root_pid));

    let m = srv.metrics().await;
    assert_eq!(recoveries(&m, "unknown_session"), unknown + 3, "{m}");
    assert_eq!(recoveries(&m, "reload"), reload + 2, "{m}");
}

#[tokio::test]
async fn the_root_namespace_recovers_too() {
    let srv = server(HISTORY).await;
    let mut root = SioClient::connect(srv.addr, 4, "/").await;
    root.auth(&srv.token("assistant", "r"), json!({"tournamentId": 2}))
        .await;
    let (sid, pid) = (root.socket_id(), root.pid.clone().unwrap());
    broadcast(&srv, &["assistant"], json!(0)).await;
    root.event().await;
    let offset = root.last_offset.clone().unwrap();
    drop(root);
    kept(&srv, 1).await;
    broadcast(&srv, &["assistant_2"], json!(1)).await;
    let mut back = SioClient::open(srv.addr, 4).await;
    back.join_as("/", &format!("40{}", json!({"pid": pid, "offset": offset})))
        .await;
    assert!(back.recovered(&pid));
    assert_eq!(back.socket_id(), sid);
    let (_, args) = back.event().await;
    assert_eq!(args[0], json!(1));
}

#[tokio::test]
async fn only_a_lost_transport_keeps_a_session() {
    let srv = server(&format!("{HISTORY}[socketio]\nauth_timeout = \"300ms\"\n")).await;
    // A client DISCONNECT of the namespace.
    let mut c = assistant(&srv, "leaves").await;
    c.send_raw(&format!("41{NS},")).await;
    c.disconnected().await;
    // A failed authentication.
    let mut c = SioClient::connect(srv.addr, 4, NS).await;
    let ack = c.auth("not a token", json!({})).await;
    assert_eq!(ack["statusCode"], 401);
    c.disconnected().await;
    // Never authenticated: nothing to keep.
    let c = SioClient::connect(srv.addr, 4, NS).await;
    drop(c);
    // An expired token, and the authentication timeout.
    let short = token("assistant", "short", Some(Duration::from_secs(1)));
    let mut c = SioClient::connect(srv.addr, 4, NS).await;
    assert_eq!(c.auth(&short, json!({})).await["statusCode"], 200);
    c.disconnected().await;
    let mut c = SioClient::connect(srv.addr, 4, NS).await;
    c.disconnected().await;
    srv.until("every socket gone", |gw| gw.hub.stats().connections == 0)
        .await;
    assert_eq!(srv.gw.metrics.sio_recovery_sessions.get(), 0);

    // Engine.IO 3 clients have no recovery: no pid, nothing kept.
    let mut old = SioClient::connect(srv.addr, 3, NS).await;
    assert_eq!(old.pid, None);
    old.auth(&srv.token("assistant", "old"), json!({})).await;
    drop(old);
    srv.until("the EIO3 connection gone", |gw| {
        gw.hub.stats().connections == 0
    })
    .await;
    assert_eq!(srv.gw.metrics.sio_recovery_sessions.get(), 0);
}

#[tokio::test]
async fn a_token_that_expired_while_away_is_not_recovered() {
    let srv = server(HISTORY).await;
    let short = token("assistant", "away", Some(Duration::from_secs(2)));
    let mut c = SioClient::connect(srv.addr, 4, NS).await;
    assert_eq!(c.auth(&short, json!({})).await["statusCode"], 200);
    broadcast(&srv, &["assistant"], json!(0)).await;
    c.event().await;
    let (pid, offset) = (c.pid.clone().unwrap(), c.last_offset.clone().unwrap());
    drop(c);
    kept(&srv, 1).await;
    // Waits out the token (exp has a one-second resolution).
    let exp = std::time::SystemTime::now() + Duration::from_secs(3);
    while std::time::SystemTime::now() < exp {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let c = SioClient::reconnect(srv.addr, NS, &pid, &offset).await;
    assert!(!c.recovered(&pid));
    assert_eq!(recoveries(&srv.metrics().await, "token_expired"), 1);
}

#[tokio::test]
async fn sessions_last_history_ttl() {
    let srv = server(&format!("{HISTORY}ttl = \"300ms\"\n")).await;
    let c = assistant(&srv, "late").await;
    let (pid, offset) = (c.pid.clone().unwrap(), c.last_offset.clone().unwrap());
    drop(c);
    kept(&srv, 1).await;
    // Swept within a ttl or so, without anyone reconnecting.
    srv.until("the session swept", |gw| {
        gw.metrics.sio_recovery_sessions.get() == 0
    })
    .await;
    let c = SioClient::reconnect(srv.addr, NS, &pid, &offset).await;
    assert!(!c.recovered(&pid));
}

#[tokio::test]
async fn without_history_there_is_no_pid_and_no_offset() {
    let srv = server("").await;
    let mut c = SioClient::connect(srv.addr, 4, NS).await;
    assert_eq!(c.pid, None);
    c.auth(&srv.token("assistant", "plain"), json!({})).await;
    broadcast(&srv, &["assistant"], json!(1)).await;
    assert_eq!(event(&mut c).await, (json!(1), None));
    let mut again = SioClient::open(srv.addr, 4).await;
    again
        .join_with_auth(NS, &json!({"pid": "x", "offset": "y:1"}))
        .await;
    assert_eq!(again.pid, None);
}

#[tokio::test]
async fn a_polling_session_that_stops_polling_is_recovered_over_websocket() {
    // The server drops a client silent for a heartbeat.
    let srv = server(&format!("keepalive_interval = \"200ms\"\n{HISTORY}")).await;
    let http = reqwest::Client::new();
    let base = srv.url("/socket.io/?EIO=4&transport=polling");
    let get = |url: String| {
        let http = http.clone();
        async move {
            let body = tokio::time::timeout(common::WAIT, http.get(&url).send())
                .await
                .expect("answered in time")
                .unwrap()
                .text()
                .await
                .unwrap();
            body.split('\u{1e}').map(String::from).collect::<Vec<_>>()
        }
    };
    let post = |url: String, body: String| {
        let http = http.clone();
        async move {
            let status = http.post(&url).body(body).send().await.unwrap().status();
            assert_eq!(status, 200);
        }
    };
    let open: Value = serde_json::from_str(&get(base.clone()).await[0][1..]).unwrap();
    let url = format!("{base}&sid={}", open["sid"].as_str().unwrap());
    post(url.clone(), format!("40{NS},")).await;
    let connect = get(url.clone()).await;
    let connect: Value = serde_json::from_str(&connect[0][NS.len() + 3..]).unwrap();
    let (sid, pid) = (connect["sid"].clone(), connect["pid"].clone());
    let pid = pid.as_str().expect("a pid over polling too").to_string();
    let request =
        json!(["get", {"url": NS, "params": {"jwt-api-key": srv.token("assistant", "poll")}}]);
    post(url.clone(), format!("42{NS},1{request}")).await;
    assert!(get(url.clone()).await[0].contains("\"statusCode\":200"));
    broadcast(&srv, &["assistant"], json!(0)).await;
    let packets = get(url.clone()).await;
    let args: Vec<Value> = serde_json::from_str(&packets[0][NS.len() + 3..]).unwrap();
    let offset = args[2].as_str().expect("an offset").to_string();
    // It stops polling: the heartbeat ends the session, which is kept.
    kept(&srv, 1).await;
    broadcast(&srv, &["assistant"], json!(1)).await;
    let mut back = SioClient::reconnect(srv.addr, NS, &pid, &offset).await;
    assert!(back.recovered(&pid));
    assert_eq!(json!(back.socket_id()), sid);
    assert_eq!(event(&mut back).await.0, json!(1));
}
