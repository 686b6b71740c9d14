//! The Socket.IO notifications endpoint (SPEC §4, §5) against a real
//! server, driven by a raw Engine.IO client over WebSocket (EIO4 and EIO3).
//! The JS clients themselves are tested in `tests/interop/`.

mod common;
#[path = "support/sio_client.rs"]
mod sio_client;

use std::time::Duration;

use common::{TestServer, token, token_claims};
use serde_json::{Value, json};
use sio_client::{Packet, SioClient};

const NS: &str = "/notifications";

/// A server with presence in its own temporary SQLite file and `extra`
/// (`[socketio]` blocks and such).
async fn server(extra: &str) -> TestServer {
    TestServer::start_sqlite_file(extra).await
}

fn code_of(ack: &Value) -> &str {
    ack["body"]["error"]["code"].as_str().unwrap_or("")
}

#[tokio::test]
async fn assistant_timer_and_tournament_rooms_and_broadcast_reach_exactly_the_right_sockets() {
    let srv = server("").await;
    let mut onsite = SioClient::connect(srv.addr, 4, NS).await;
    let mut handler = SioClient::connect(srv.addr, 4, NS).await;
    let mut timer = SioClient::connect(srv.addr, 3, NS).await;

    let ack = onsite.auth(&srv.token("assistant", "1"), json!({})).await;
    assert_eq!(
        ack,
        json!({"body":{"socketId": onsite.socket_id(), "rooms":["assistant"]},"statusCode":200})
    );
    let ack = handler
        .auth(&srv.token("assistant", "2"), json!({"tournamentId": 2}))
        .await;
    assert_eq!(ack["body"]["rooms"], json!(["assistant", "assistant_2"]));
    assert_eq!(ack["body"]["socketId"], json!(handler.socket_id()));
    let ack = timer.auth(&srv.token("timer", "3"), json!({})).await;
    assert_eq!(ack["body"]["rooms"], json!(["timer"]));
    // Engine.IO 3 clients see `<nsp>#<engine id>` as socket.id.
    assert_eq!(
        ack["body"]["socketId"],
        json!(format!("{NS}#{}", timer.engine_id))
    );

    // A /ws subscriber of a topic named like a room is in the same namespace.
    let mut ws = srv.ws("service", "w").await;
    ws.sub("assistant_2").await;

    let (status, body) = srv
        .post(
            "/api/broadcast",
            json!({"rooms": ["assistant_2", "timer"], "event": "check_in", "data": {"check_in_id": {"id": 4, "nick": "aguila_calva"}}}),
        )
        .await;
    assert_eq!((status, body), (200, json!({"recipients": 3})));
    let want = json!({"check_in_id": {"id": 4, "nick": "aguila_calva"}});
    assert_eq!(
        handler.event().await,
        ("check_in".into(), vec![want.clone()])
    );
    assert_eq!(timer.event().await, ("check_in".into(), vec![want.clone()]));
    let got = ws.recv().await;
    assert_eq!(got["topic"], "assistant_2");
    assert_eq!(got["event"], "check_in");
    assert_eq!(got["payload"], want);

    // A socket in both named rooms gets the message once; default event name.
    let (status, body) = srv
        .post(
            "/api/broadcast",
            json!({"rooms": ["assistant", "assistant_2"], "data": [1, 2]}),
        )
        .await;
    // The two assistants and the /ws subscriber of `assistant_2`.
    assert_eq!((status, body), (200, json!({"recipients": 3})));
    assert_eq!(
        onsite.event().await,
        ("message".into(), vec![json!([1, 2])])
    );
    assert_eq!(
        handler.event().await,
        ("message".into(), vec![json!([1, 2])])
    );
    assert_eq!(ws.recv().await["payload"], json!([1, 2]));
    handler.silent_for(Duration::from_millis(200)).await;
    timer.silent_for(Duration::from_millis(50)).await;

    // Own-id rooms, for both protocol versions.
    for c in [&mut onsite, &mut timer] {
        let (status, body) = srv
            .post(
                "/api/broadcast",
                json!({"rooms": c.socket_id(), "event": "direct", "data": "hi"}),
            )
            .await;
        assert_eq!((status, body), (200, json!({"recipients": 1})));
        assert_eq!(c.event().await, ("direct".into(), vec![json!("hi")]));
    }
    let metrics = srv.metrics().await;
    assert!(
        metrics.contains("pulso_connections{protocol=\"socketio\"} 3"),
        "{metrics}"
    );
    assert!(metrics.contains("pulso_socketio_auth_total{result=\"ok\"} 3"));
}

#[tokio::test]
async fn every_failure_code_is_acked_then_the_socket_is_disconnected() {
    let srv = server("[socketio]\nallowed_roles = [\"assistant\", \"timer\"]\n").await;
    let good = srv.token("assistant", "1");
    let expired = token_claims(json!({"sub": "1", "role": "assistant", "exp": 1_000_000}));
    let future = token_claims(json!({"sub": "1", "role": "assistant", "nbf": 4_000_000_000u64}));
    let other_key = {
        let signer = pulso::auth::Signer::hmac("another-secret");
        signer
            .token(
                "assistant",
                "1",
                Some(Duration::from_secs(60)),
                &Default::default(),
            )
            .unwrap()
    };
    let cases: Vec<(Value, &str, u64)> = vec![
        (json!("get me in"), "400-1", 400),
        (json!(42), "400-1", 400),
        (json!([{"url": NS}]), "400-1", 400),
        (json!({"params": {"jwt-api-key": good}}), "400-1", 400),
        (
            json!({"url": 7, "params": {"jwt-api-key": good}}),
            "400-1",
            400,
        ),
        (json!({"url": NS, "params": "jwt-api-key"}), "400-1", 400),
        (
            json!({"url": "/elsewhere", "params": {"jwt-api-key": good}}),
            "404-1",
            404,
        ),
        (json!({"url": NS}), "401-1", 401),
        (
            json!({"url": NS, "params": {"jwt-api-key": ""}}),
            "401-1",
            401,
        ),
        (
            json!({"url": NS, "params": {"jwt-api-key": "not.a.jwt"}}),
            "401-2",
            401,
        ),
        (
            json!({"url": NS, "params": {"jwt-api-key": 12345}}),
            "401-2",
            401,
        ),
        (
            json!({"url": NS, "params": {"jwt-api-key": {"token": good}}}),
            "401-2",
            401,
        ),
        (
            json!({"url": NS, "params": {"jwt-api-key": other_key}}),
            "401-2",
            401,
        ),
        (
            json!({"url": NS, "params": {"jwt-api-key": future}}),
            "401-2",
            401,
        ),
        (
            json!({"url": NS, "params": {"jwt-api-key": expired}}),
            "401-3",
            401,
        ),
        (
            json!({"url": NS, "params": {"jwt-api-key": srv.token("admin", "9")}}),
            "403-1",
            403,
        ),
    ];
    for (eio, event) in [(4, "get"), (3, "post")] {
        for (req, code, status) in &cases {
            let mut c = SioClient::connect(srv.addr, eio, NS).await;
            let ack = c.request(event, std::slice::from_ref(req)).await;
            assert_eq!(code_of(&ack), *code, "{req} → {ack}");
            assert_eq!(ack["statusCode"], json!(status), "{ack}");
            assert!(ack["body"]["error"]["message"].is_string());
            c.disconnected().await;
        }
    }
    // No argument at all is malformed; with several, the first is the
    // request and the rest are ignored.
    for (args, code) in [
        (vec![], "400-1"),
        (
            vec![json!({"url": NS}), json!({"params": {"jwt-api-key": good}})],
            "401-1",
        ),
    ] {
        let mut c = SioClient::connect(srv.addr, 4, NS).await;
        let ack = c.request("get", &args).await;
        assert_eq!(code_of(&ack), code, "{args:?} → {ack}");
        c.disconnected().await;
    }
    // Without an ack the failure still disconnects.
    let mut c = SioClient::connect(srv.addr, 4, NS).await;
    c.emit("get", &[json!({"url": NS})]).await;
    c.disconnected().await;
    // The server keeps serving.
    let mut c = SioClient::connect(srv.addr, 4, NS).await;
    let ack = c.auth(&good, json!({})).await;
    assert_eq!(ack["statusCode"], 200);
    let metrics = srv.metrics().await;
    assert!(
        metrics.contains("pulso_socketio_auth_total{result=\"401-3\"} 2"),
        "{metrics}"
    );
}

#[tokio::test]
async fn every_request_shape_authenticates() {
    let srv = server("").await;
    let t = srv.token("assistant", "5");
    let shapes = [
        json!({"url": NS, "params": {"jwt-api-key": t, "tournamentId": 2}}),
        // What sails.io.js sends.
        json!({"method": "get", "headers": {}, "data": {"jwt-api-key": t, "tournamentId": 2}, "url": NS}),
        json!({"url": NS, "headers": {"jwt-api-key": t}, "params": {"tournamentId": "2"}}),
        json!({"url": NS, "header": {"jwt-api-key": t}, "data": {"tournamentId": 2}}),
        json!({"header": {"url": NS, "jwt-api-key": t}, "body": {"tournamentId": 2}}),
        json!({"url": format!("{NS}/?tournamentId=2"), "header": {"jwt-api-key": t}}),
    ];
    for shape in shapes {
        let mut c = SioClient::connect(srv.addr, 4, NS).await;
        let ack = c.request("post", std::slice::from_ref(&shape)).await;
        assert_eq!(ack["statusCode"], 200, "{shape} → {ack}");
        assert_eq!(
            ack["body"]["rooms"],
            json!(["assistant", "assistant_2"]),
            "{shape}"
        );
        c.close().await;
    }
}

#[tokio::test]
async fn a_claim_wins_over_a_parameter_and_unsafe_values_are_skipped() {
    let srv = server("[socketio]\nrooms = [\"{role}\", \"{role}_{tournamentId}\", \"user_{sub}\", \"org_{org}\"]\n").await;
    let t = token_claims(
        json!({"sub": "u1", "role": "assistant", "tournamentId": 9, "exp": 4_000_000_000u64}),
    );
    let mut c = SioClient::connect(srv.addr, 4, NS).await;
    let ack = c
        .auth(
            &t,
            json!({"tournamentId": 3, "role": "admin", "sub": "x", "org": "a/b"}),
        )
        .await;
    assert_eq!(
        ack["body"]["rooms"],
        json!(["assistant", "assistant_9", "user_u1"])
    );
    let mut c = SioClient::connect(srv.addr, 4, NS).await;
    let ack = c
        .auth(
            &srv.token("timer", "t"),
            json!({"tournamentId": {"x": 1}, "org": "acme.mx"}),
        )
        .await;
    assert_eq!(
        ack["body"]["rooms"],
        json!(["timer", "user_t", "org_acme.mx"])
    );
}

#[tokio::test]
async fn nothing_is_served_before_auth_and_only_get_post_after() {
    let srv = server("").await;
    let mut c = SioClient::connect(srv.addr, 4, NS).await;
    let ack = c.request("publish", &[json!({"x": 1})]).await;
    assert_eq!(code_of(&ack), "401-1");
    assert_eq!(ack["statusCode"], 401);
    c.emit("publish", &[json!("no ack")]).await;
    // Not disconnected: authentication still works.
    let t = srv.token("assistant", "7");
    let ack = c.auth(&t, json!({})).await;
    assert_eq!(ack["statusCode"], 200);
    let rooms = ack["body"]["rooms"].clone();

    let ack = c.request("subscribe", &[json!({"room": "admin"})]).await;
    assert_eq!(code_of(&ack), "404-1");
    assert_eq!(ack["statusCode"], 404);
    let ack = c.request("get", &[json!({"url": "/other"})]).await;
    assert_eq!(code_of(&ack), "404-1");
    let ack = c.request("get", &[json!("junk")]).await;
    assert_eq!(code_of(&ack), "400-1");
    // A bad refresh keeps the session.
    let ack = c
        .request(
            "get",
            &[json!({"url": NS, "params": {"jwt-api-key": "junk"}})],
        )
        .await;
    assert_eq!(code_of(&ack), "401-2");
    let ack = c.auth(&srv.token("assistant", "8"), json!({})).await;
    assert_eq!(code_of(&ack), "401-2", "another identity");
    let ack = c.auth(&srv.token("timer", "7"), json!({})).await;
    assert_eq!(code_of(&ack), "401-2", "another role");
    // A good refresh answers with the unchanged rooms, even with new params.
    let ack = c.auth(&t, json!({"tournamentId": 5})).await;
    assert_eq!(ack["statusCode"], 200);
    assert_eq!(ack["body"]["rooms"], rooms);
    // Still connected and reachable.
    let (_, body) = srv
        .post("/api/broadcast", json!({"rooms": "assistant", "data": 1}))
        .await;
    assert_eq!(body, json!({"recipients": 1}));
    assert_eq!(c.event().await, ("message".into(), vec![json!(1)]));
}

#[tokio::test]
async fn a_socket_that_never_authenticates_is_closed_after_auth_timeout() {
    let srv = server("[socketio]\nauth_timeout = \"300ms\"\n").await;
    let mut idle4 = SioClient::connect(srv.addr, 4, NS).await;
    let mut idle3 = SioClient::connect(srv.addr, 3, NS).await;
    let mut root_only = SioClient::open(srv.addr, 3).await;
    let mut authed = SioClient::connect(srv.addr, 4, NS).await;
    authed.auth(&srv.token("timer", "1"), json!({})).await;
    let started = std::time::Instant::now();
    idle4.disconnected().await;
    idle3.disconnected().await;
    root_only.disconnected().await;
    assert!(started.elapsed() < Duration::from_secs(3));
    // The authenticated socket stays.
    let (_, body) = srv
        .post("/api/broadcast", json!({"rooms": "timer", "data": 1}))
        .await;
    assert_eq!(body, json!({"recipients": 1}));
    assert_eq!(authed.event().await.0, "message");
    assert!(
        srv.metrics()
            .await
            .contains("pulso_socketio_auth_total{result=\"timeout\"} 2")
    );
}

#[tokio::test]
async fn token_expiry_disconnects_unless_refreshed() {
    let srv = server("").await;
    let short = token("assistant", "e1", Some(Duration::from_secs(2)));
    let mut lapses = SioClient::connect(srv.addr, 4, NS).await;
    assert_eq!(lapses.auth(&short, json!({})).await["statusCode"], 200);
    let mut refreshes = SioClient::connect(srv.addr, 3, NS).await;
    let short2 = token("timer", "e2", Some(Duration::from_secs(2)));
    assert_eq!(refreshes.auth(&short2, json!({})).await["statusCode"], 200);
    let long = token("timer", "e2", Some(Duration::from_secs(3600)));
    assert_eq!(refreshes.auth(&long, json!({})).await["statusCode"], 200);

    // `disconnected` waits up to 5 s; the short token ends within ~3 s.
    lapses.disconnected().await;
    // The refreshed one outlives the first token's expiry.
    refreshes.silent_for(Duration::from_millis(1500)).await;
    let (_, body) = srv
        .post(
            "/api/broadcast",
            json!({"rooms": ["timer", "assistant"], "data": 2}),
        )
        .await;
    assert_eq!(body, json!({"recipients": 1}));
    assert_eq!(refreshes.event().await.1, vec![json!(2)]);
}

#[tokio::test]
async fn huge_payloads_close_only_their_connection() {
    let srv = server("").await;
    let mut ok = SioClient::connect(srv.addr, 4, NS).await;
    ok.auth(&srv.token("timer", "ok"), json!({})).await;
    let mut big = SioClient::connect(srv.addr, 4, NS).await;
    let blob = "x".repeat(200 * 1024);
    big.emit(
        "get",
        &[json!({"url": NS, "params": {"jwt-api-key": blob}})],
    )
    .await;
    assert_eq!(big.next().await, Packet::Closed);
    let (_, body) = srv
        .post(
            "/api/broadcast",
            json!({"rooms": "timer", "data": "still here"}),
        )
        .await;
    assert_eq!(body, json!({"recipients": 1}));
    assert_eq!(ok.event().await.1, vec![json!("still here")]);
}

#[tokio::test]
async fn many_sockets_connecting_and_dropping_at_once_leave_nothing_behind() {
    let srv = server("").await;
    let addr = srv.addr;
    let mut tasks = Vec::new();
    for i in 0..1000 {
        let t = token(
            "assistant",
            &format!("m{i}"),
            Some(Duration::from_secs(600)),
        );
        tasks.push(tokio::spawn(async move {
            let mut c = SioClient::connect(addr, if i % 2 == 0 { 4 } else { 3 }, NS).await;
            if i % 7 == 0 {
                // Authenticate and vanish without waiting for the answer.
                c.emit("get", &[json!({"url": NS, "params": {"jwt-api-key": t}})])
                    .await;
                c.close().await;
                return;
            }
            if i % 3 != 0 {
                let ack = c.auth(&t, json!({"tournamentId": i % 5})).await;
                assert_eq!(ack["statusCode"], 200);
            }
            // Drop without a goodbye half the time.
            if i % 2 == 0 {
                c.close().await;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    srv.until("every socket gone", |gw| gw.hub.stats().connections == 0)
        .await;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let m = srv.metrics().await;
        if m.contains("pulso_connections{protocol=\"socketio\"} 0") {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{m}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Presence rows were all cleared, once the writer caught up.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let rows = srv.gw.presence.list(Some("assistant"), None).await;
        if rows.as_ref().is_ok_and(|r| r.is_empty()) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{rows:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(srv.gw.hub.stats(), Default::default());
}

#[tokio::test]
async fn shutdown_disconnects_socketio_clients() {
    let srv = server("").await;
    let mut a = SioClient::connect(srv.addr, 4, NS).await;
    a.auth(&srv.token("timer", "s1"), json!({})).await;
    let mut b = SioClient::connect(srv.addr, 3, NS).await;
    let took = srv.stop().await;
    a.disconnected().await;
    b.disconnected().await;
    assert!(took < Duration::from_secs(5), "{took:?}");
}

#[tokio::test]
async fn sails_io_js_connect_packet_with_a_query_and_its_request_shape() {
    // socket.io-client 2.x puts its `query` option after the namespace in
    // CONNECT; sails.io.js always sets one.
    let srv = server("").await;
    let mut c = SioClient::open(srv.addr, 3).await;
    c.join_as(
        NS,
        "40/notifications?__sails_io_sdk_version=1.2.1&__sails_io_sdk_platform=node&__sails_io_sdk_language=javascript,",
    )
    .await;
    let ack = c
        .request(
            "get",
            &[json!({"method": "get", "headers": {}, "data": {"jwt-api-key": srv.token("timer", "sails"), "tournamentId": 2}, "url": NS})],
        )
        .await;
    assert_eq!(
        ack,
        json!({"body": {"socketId": format!("{NS}#{}", c.engine_id), "rooms": ["timer", "timer_2"]}, "statusCode": 200})
    );
}

#[tokio::test]
async fn a_slow_socket_is_disconnected_and_others_lose_nothing() {
    let srv = server("[ws]\noutbound_queue = 16\n").await;
    let mut fast = SioClient::connect(srv.addr, 4, NS).await;
    fast.auth(&srv.token("timer", "fast"), json!({})).await;
    // Never reads while the flood lasts: its socket buffers fill, then its queue.
    let mut slow = SioClient::connect(srv.addr, 3, NS).await;
    slow.auth(&srv.token("timer", "slow"), json!({})).await;
    let pad = "x".repeat(16 * 1024);
    let n = 400;
    let reader = tokio::spawn(async move {
        let mut got = 0;
        while got < n {
            let (_, args) = fast.event().await;
            assert_eq!(args[0]["i"], got);
            got += 1;
        }
        (got, fast)
    });
    for i in 0..n {
        let (status, _) = srv
            .post(
                "/api/broadcast",
                json!({"rooms": "timer", "data": {"i": i, "pad": pad}}),
            )
            .await;
        assert_eq!(status, 200);
    }
    let (got, _fast) = reader.await.unwrap();
    assert_eq!(got, n, "the fast socket got every message in order");
    let m = srv.metrics().await;
    assert!(m.contains("pulso_slow_consumer_closes_total 1"), "{m}");
    assert!(!m.contains("pulso_messages_dropped_total 0\n"), "{m}");
    // Once it reads again, what was queued drains and the disconnect follows.
    slow.disconnected().await;
    srv.until("slow socket gone", |gw| gw.hub.stats().connections == 1)
        .await;
}

#[test]
fn socketio_settings_are_checked_and_errors_name_the_setting() {
    use pulso::config::{Config, Layered, Source};
    let check = |name: &str, value: &str| {
        let mut l = Layered::defaults();
        l.set_text(name, value.into(), Source::Flag).unwrap();
        Config::from_layered(&l)
    };
    for (name, bad) in [
        ("socketio.namespace", "notifications"),
        ("socketio.namespace", "/"),
        ("socketio.namespace", "/a b"),
        ("socketio.auth_timeout", "0"),
        ("socketio.auth_timeout", "soon"),
        ("socketio.rooms", "{role"),
        ("socketio.rooms", "{}"),
        (
            "presence.entities",
            "{ assistant = { id_column = \"id\" } }",
        ),
        (
            "presence.entities",
            "{ assistant = { table = \"t\", colour = \"x\" } }",
        ),
    ] {
        let e = check(name, bad).unwrap_err();
        assert!(e.0.contains(&format!("`{name}")), "{name}={bad}: {e}");
    }
    let c = check("socketio.allowed_roles", "assistant,timer").unwrap();
    assert_eq!(c.socketio.allowed_roles, ["assistant", "timer"]);
    assert_eq!(c.socketio.namespace, "/notifications");
    assert_eq!(c.socketio.rooms, ["{role}", "{role}_{tournamentId}"]);
    assert_eq!(c.socketio.auth_timeout, Duration::from_secs(10));
    assert_eq!(c.presence.database_url, "sqlite://pulso.db");
    let c = check(
        "presence.entities",
        "{ assistant = { table = \"onsite.assistants\" } }",
    )
    .unwrap();
    let t = &c.presence.entities["assistant"];
    assert_eq!(
        (
            t.table.as_str(),
            t.id_column.as_str(),
            t.socket_column.as_str()
        ),
        ("onsite.assistants", "id", "socket_id")
    );
}

#[tokio::test]
async fn cross_origin_polling_gets_cors_headers() {
    let srv = server("").await;
    let client = reqwest::Client::new();
    let url = srv.url("/socket.io/?EIO=4&transport=polling");
    let pre = client
        .request(reqwest::Method::OPTIONS, &url)
        .header("origin", "http://onsite.local:8080")
        .header("access-control-request-method", "POST")
        .header("access-control-request-headers", "content-type")
        .send()
        .await
        .unwrap();
    assert_eq!(pre.status(), 204);
    let h = pre.headers();
    assert_eq!(h["access-control-allow-origin"], "http://onsite.local:8080");
    assert_eq!(h["access-control-allow-credentials"], "true");
    assert_eq!(h["access-control-allow-headers"], "content-type");
    let open = client
        .get(&url)
        .header("origin", "http://onsite.local:8080")
        .send()
        .await
        .unwrap();
    assert_eq!(open.status(), 200);
    assert_eq!(
        open.headers()["access-control-allow-origin"],
        "http://onsite.local:8080"
    );
    assert!(open.text().await.unwrap().starts_with("0{"));
    // Other routes are untouched.
    let other = client
        .get(srv.url("/healthz"))
        .header("origin", "http://onsite.local:8080")
        .send()
        .await
        .unwrap();
    assert!(other.headers().get("access-control-allow-origin").is_none());
}

// ---- Engine.IO over WebSocket (clients that open a WebSocket directly;
// polling and upgrades: tests/sio_polling.rs) ------------------------------

#[tokio::test]
async fn unknown_namespaces_are_refused_in_each_protocol_version() {
    let srv = server("").await;
    let mut v4 = SioClient::open(srv.addr, 4).await;
    v4.send_raw("40/nope,").await;
    assert_eq!(
        v4.engine_packet().await.as_deref(),
        Some(r#"44/nope,{"message":"Invalid namespace"}"#)
    );
    let mut v3 = SioClient::open(srv.addr, 3).await;
    v3.send_raw("40/nope?x=1,").await;
    assert_eq!(
        v3.engine_packet().await.as_deref(),
        Some(r#"44/nope,"Invalid namespace""#)
    );
    // The connection stays usable for the real namespace.
    v4.join(NS).await;
    assert_eq!(
        v4.auth(&srv.token("timer", "a"), json!({})).await["statusCode"],
        200
    );
}

#[tokio::test]
async fn engine_io_3_pings_are_answered_and_the_open_packet_matches_the_settings() {
    let srv = server("[ws]\nmax_message_size = 4096\n").await;
    let url = format!("ws://{}/socket.io/?EIO=3&transport=websocket", srv.addr);
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let mut next = async || match tokio::time::timeout(sio_client::WAIT, ws.next()).await {
        Ok(Some(Ok(Message::Text(t)))) => t.to_string(),
        other => panic!("{other:?}"),
    };
    let open: Value = serde_json::from_str(next().await.strip_prefix('0').unwrap()).unwrap();
    assert_eq!(open["upgrades"], json!([]));
    assert_eq!(open["pingInterval"], 30000);
    assert_eq!(open["pingTimeout"], 30000);
    assert_eq!(open["maxPayload"], 4096);
    assert_eq!(next().await, "40");
    ws.send(Message::text("2probe")).await.unwrap();
    let pong = tokio::time::timeout(sio_client::WAIT, ws.next()).await;
    assert!(
        matches!(pong, Ok(Some(Ok(Message::Text(ref t)))) if t.as_str() == "3probe"),
        "{pong:?}"
    );
    // Pings sent together, before the server writes: each gets its own
    // answer, in order (they are bounded by `ws.outbound_queue`, as every
    // reply is).
    let burst: Vec<Result<Message, _>> = (0..50)
        .map(|i| Ok(Message::text(format!("2n{i}"))))
        .collect();
    ws.send_all(&mut futures_util::stream::iter(burst))
        .await
        .unwrap();
    for i in 0..50 {
        match tokio::time::timeout(sio_client::WAIT, ws.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => assert_eq!(t.as_str(), format!("3n{i}")),
            other => panic!("{other:?}"),
        }
    }
}

#[tokio::test]
async fn binary_events_are_refused_with_an_ack() {
    let srv = server("").await;
    let mut c = SioClient::connect(srv.addr, 4, NS).await;
    let good = srv.token("timer", "bin");
    // A `get` whose token is a binary attachment: never processed.
    c.send_raw(&format!(
        r#"451-{NS},7["get",{{"url":"{NS}","params":{{"jwt-api-key":{{"_placeholder":true,"num":0}}}}}}]"#
    ))
    .await;
    let Packet::Ack(7, args) = c.next().await else {
        panic!("an ack");
    };
    assert_eq!(code_of(&args[0]), "400-1", "{args:?}");
    assert_eq!(c.next().await, Packet::Disconnect);
    // Text events on another connection still authenticate.
    let mut c = SioClient::connect(srv.addr, 4, NS).await;
    assert_eq!(c.auth(&good, json!({})).await["statusCode"], 200);
}

#[tokio::test]
async fn a_client_disconnect_leaves_the_hub_and_presence() {
    let srv = server("").await;
    let mut c = SioClient::connect(srv.addr, 3, NS).await;
    c.auth(&srv.token("timer", "leaver"), json!({})).await;
    assert!(
        srv.metrics()
            .await
            .contains("pulso_connections{protocol=\"socketio\"} 1")
    );
    c.send_raw(&format!("41{NS},")).await;
    assert_eq!(c.next().await, Packet::Closed);
    srv.until("hub empty", |gw| gw.hub.stats() == Default::default())
        .await;
    assert!(
        srv.metrics()
            .await
            .contains("pulso_connections{protocol=\"socketio\"} 0")
    );
    let (_, body) = srv
        .post("/api/broadcast", json!({"rooms": "timer", "data": 1}))
        .await;
    assert_eq!(body, json!({"recipients": 0}));
}

#[tokio::test]
async fn packets_over_the_rate_limit_are_refused_with_429() {
    let srv = server("[ws]\nrate_limit = 5\n").await;
    let mut c = SioClient::connect(srv.addr, 4, NS).await;
    for i in 1..=10 {
        c.send_raw(&format!(r#"42{NS},{i}["other",{{}}]"#)).await;
    }
    let mut codes = Vec::new();
    for _ in 1..=10 {
        let Packet::Ack(_, args) = c.next().await else {
            panic!("an ack");
        };
        codes.push(code_of(&args[0]).to_string());
    }
    // The burst is one second's worth; a token may refill meanwhile.
    let refused = codes.iter().filter(|c| *c == "429-1").count();
    assert!((4..=5).contains(&refused), "{codes:?}");
    assert!(codes[..5].iter().all(|c| c == "401-1"), "{codes:?}");
    // CONNECT is not limited: a join right after is answered.
    c.join(NS).await;
    assert!(srv.metrics().await.contains("429-1"));
}

#[tokio::test]
async fn engine_io_4_heartbeat_drops_a_silent_client_and_keeps_one_that_answers() {
    let srv = server("keepalive_interval = \"200ms\"\n").await;
    // Answers pings (the client does it while it reads).
    let mut alive = SioClient::connect(srv.addr, 4, NS).await;
    alive.auth(&srv.token("timer", "hb"), json!({})).await;
    // Never answers.
    let url = format!("ws://{}/socket.io/?EIO=4&transport=websocket", srv.addr);
    let (mut silent, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    use futures_util::StreamExt;
    use tokio_tungstenite::tungstenite::Message;
    let mut pings = 0;
    let silent_dropped = tokio::time::timeout(sio_client::WAIT, async {
        loop {
            match silent.next().await {
                Some(Ok(Message::Text(t))) if t.as_str() == "2" => pings += 1,
                Some(Ok(Message::Text(_))) => {}
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return,
                Some(Ok(_)) => {}
            }
        }
    });
    // Meanwhile, and for several intervals, the other client reads (and so
    // answers pings).
    let (closed, ()) = tokio::join!(
        silent_dropped,
        alive.silent_for(Duration::from_millis(1000))
    );
    assert!(closed.is_ok(), "the silent client is dropped");
    assert_eq!(pings, 1, "dropped at the ping after the unanswered one");
    let (_, body) = srv
        .post("/api/broadcast", json!({"rooms": "timer", "data": "hb"}))
        .await;
    assert_eq!(body, json!({"recipients": 1}));
    assert_eq!(alive.event().await.1, vec![json!("hb")]);
}

// The root namespace serves the same virtual requests, rooms and events as
// the notifications namespace (SPEC §4): the seed's own client connects to
// the server's root and sends `get` with `url: '/notifications'`.

#[tokio::test]
async fn the_root_namespace_authenticates_joins_rooms_and_gets_broadcasts() {
    let srv = server("").await;
    // Engine.IO 4: the client connects to `/` and is told its id.
    let mut v4 = SioClient::connect(srv.addr, 4, "/").await;
    // Engine.IO 3: the server puts the client in `/` itself; its socket id
    // is the engine id.
    let mut v3 = SioClient::open(srv.addr, 3).await;
    // A notifications-namespace socket on another connection, in the same
    // room: the frame of one message is right for each namespace.
    let mut ns = SioClient::connect(srv.addr, 4, NS).await;

    let ack = v4
        .auth(&srv.token("assistant", "r4"), json!({"tournamentId": 2}))
        .await;
    assert_eq!(
        ack,
        json!({"body":{"socketId": v4.socket_id(), "rooms":["assistant","assistant_2"]},"statusCode":200})
    );
    assert!(v4.sid.as_deref().is_some_and(|s| !s.is_empty()));
    let ack = v3.auth(&srv.token("timer", "r3"), json!({})).await;
    assert_eq!(ack["statusCode"], 200, "{ack}");
    assert_eq!(ack["body"]["socketId"], json!(v3.engine_id));
    assert_eq!(
        ns.auth(&srv.token("assistant", "n4"), json!({})).await["statusCode"],
        200
    );

    let (status, body) = srv
        .post(
            "/api/broadcast",
            json!({"rooms": ["assistant", "timer"], "event": "check_in", "data": {"id": 4}}),
        )
        .await;
    assert_eq!((status, body), (200, json!({"recipients": 3})));
    assert_eq!(
        v4.event().await,
        ("check_in".into(), vec![json!({"id": 4})])
    );
    assert_eq!(
        v3.event().await,
        ("check_in".into(), vec![json!({"id": 4})])
    );
    assert_eq!(
        ns.event().await,
        ("check_in".into(), vec![json!({"id": 4})])
    );

    // Rooms named by a root socket's id reach it.
    let (id4, id3) = (v4.socket_id(), v3.engine_id.clone());
    for (c, id) in [(&mut v4, id4), (&mut v3, id3)] {
        let (_, body) = srv
            .post(
                "/api/broadcast",
                json!({"rooms": id, "event": "own", "data": 1}),
            )
            .await;
        assert_eq!(body, json!({"recipients": 1}));
        assert_eq!(c.event().await, ("own".into(), vec![json!(1)]));
    }

    // Presence holds the root sockets' ids.
    let (_, rows) = common::get_json(
        &format!("http://{}/api/presence?sub=r3", srv.addr),
        Some(&srv.token("admin", "ops")),
    )
    .await;
    assert_eq!(rows["sockets"][0]["socket_id"], json!(v3.engine_id));
}

#[tokio::test]
async fn a_connection_with_a_socket_in_both_namespaces_gets_each_event_on_each() {
    let srv = server("").await;
    let mut c = SioClient::connect(srv.addr, 4, "/").await;
    let root_id = c.socket_id();
    c.join(NS).await;
    let ns_id = c.socket_id();
    assert_ne!(root_id, ns_id);
    let token = srv.token("assistant", "both");
    assert_eq!(
        c.auth(&token, json!({})).await["body"]["socketId"],
        json!(ns_id)
    );
    c.use_ns("/");
    assert_eq!(
        c.auth(&token, json!({})).await["body"]["socketId"],
        json!(root_id)
    );

    let (_, body) = srv
        .post(
            "/api/broadcast",
            json!({"rooms": "assistant", "event": "e", "data": 1}),
        )
        .await;
    assert_eq!(body, json!({"recipients": 2}));
    // One event per namespace socket, each framed for its namespace.
    let mut seen = Vec::new();
    for _ in 0..2 {
        let t = c.raw_message().await;
        seen.push(t);
    }
    seen.sort();
    assert_eq!(seen, [r#"2/notifications,["e",1]"#, r#"2["e",1]"#]);

    // A room named by one socket's id reaches that socket only.
    let (_, body) = srv
        .post(
            "/api/broadcast",
            json!({"rooms": [&ns_id], "event": "own", "data": 2}),
        )
        .await;
    assert_eq!(body, json!({"recipients": 1}));
    assert_eq!(c.raw_message().await, r#"2/notifications,["own",2]"#);

    // Leaving one namespace keeps the other (and the connection).
    c.send_raw(&format!("41{NS},")).await;
    let (_, body) = srv
        .post(
            "/api/broadcast",
            json!({"rooms": "assistant", "event": "e", "data": 3}),
        )
        .await;
    assert_eq!(body, json!({"recipients": 1}));
    assert_eq!(c.raw_message().await, r#"2["e",3]"#);
}

#[tokio::test]
async fn an_authenticated_root_socket_outlives_the_auth_timeout_and_a_failed_one_is_disconnected() {
    let srv = server("[socketio]\nauth_timeout = \"300ms\"\n").await;
    let mut authed = SioClient::connect(srv.addr, 4, "/").await;
    authed.auth(&srv.token("timer", "t1"), json!({})).await;
    let mut v3 = SioClient::open(srv.addr, 3).await;
    v3.auth(&srv.token("timer", "t2"), json!({})).await;
    let mut idle = SioClient::connect(srv.addr, 4, "/").await;
    idle.disconnected().await;
    // Past the timeout, both authenticated root sockets still get events.
    let (_, body) = srv
        .post("/api/broadcast", json!({"rooms": "timer", "data": 1}))
        .await;
    assert_eq!(body, json!({"recipients": 2}));
    assert_eq!(authed.event().await.0, "message");
    assert_eq!(v3.event().await.0, "message");

    // A failed request on the root: the error ack, then DISCONNECT.
    for eio in [3, 4] {
        let mut bad = if eio == 3 {
            SioClient::open(srv.addr, 3).await
        } else {
            SioClient::connect(srv.addr, 4, "/").await
        };
        let ack = bad
            .request(
                "get",
                &[json!({"url": NS, "params": {"jwt-api-key": "nope"}})],
            )
            .await;
        assert_eq!(code_of(&ack), "401-2");
        assert_eq!(bad.next().await, Packet::Disconnect);
    }
}
