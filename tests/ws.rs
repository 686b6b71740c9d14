//! `/ws` end to end: a real server, real WebSocket and HTTP clients.

mod common;

use std::time::Duration;

use common::*;
use futures_util::SinkExt;
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

#[tokio::test]
async fn subscribe_publish_receive_and_ack() {
    let srv = TestServer::start().await;
    let mut c = srv.ws("assistant", "1").await;
    assert_eq!(c.sub("news").await, json!({"type":"ack","id":900001}));
    let (status, body) = srv
        .post(
            "/api/publish",
            json!({"topic":"news","payload":{"n":1},"event":"created"}),
        )
        .await;
    assert_eq!((status, body), (200, json!({"recipients": 1})));
    let msg = c.recv().await;
    assert_eq!(msg["topic"], "news");
    assert_eq!(msg["event"], "created");
    assert_eq!(msg["payload"], json!({"n":1}));
    assert!(msg["ts"].as_u64().unwrap() > 1_700_000_000_000);
    srv.stop().await;
}

#[tokio::test]
async fn auto_subscribes_to_temperature() {
    let srv = TestServer::start().await;
    let mut c = srv.ws("timer", "t1").await;
    srv.until("auto-subscription", |gw| gw.hub.stats().subscriptions == 1)
        .await;
    let (_, body) = srv.publish("temperature", json!(21.5)).await;
    assert_eq!(body["recipients"], 1);
    let msg = c.recv().await;
    assert_eq!(
        (msg["topic"].clone(), msg["payload"].clone()),
        (json!("temperature"), json!(21.5))
    );
    srv.stop().await;
}

#[tokio::test]
async fn ping_pong_with_and_without_id() {
    let srv = TestServer::start().await;
    let mut c = srv.ws("assistant", "1").await;
    let pong = c.request(json!({"type":"ping"}), 7).await;
    assert_eq!(pong["type"], "pong");
    assert!(pong["ts"].as_u64().is_some());
    c.send(json!({"type":"ping"})).await;
    let pong = c.recv().await;
    assert_eq!(pong["type"], "pong");
    assert!(pong.get("id").is_none());
    srv.stop().await;
}

#[tokio::test]
async fn string_ids_are_echoed() {
    let srv = TestServer::start().await;
    let mut c = srv.ws("assistant", "1").await;
    c.send(json!({"type":"sub","topic":"a","id":"req-1"})).await;
    assert_eq!(c.recv().await, json!({"type":"ack","id":"req-1"}));
    srv.stop().await;
}

#[tokio::test]
async fn wildcards_deliver_once_with_the_published_name() {
    let srv = TestServer::start().await;
    let mut c = srv.ws("assistant", "1").await;
    for (i, f) in ["sensors/+/temp", "sensors/#", "sensors/a/temp"]
        .iter()
        .enumerate()
    {
        let ack = c.request(json!({"type":"sub","topic":f}), i as u64).await;
        assert_eq!(ack["type"], "ack");
    }
    let (_, body) = srv.publish("sensors/a/temp", json!(1)).await;
    assert_eq!(body["recipients"], 1);
    let (_, body) = srv.publish("sensors", json!(2)).await;
    assert_eq!(body["recipients"], 1, "a/# matches a");
    let first = c.recv().await;
    assert_eq!(
        (first["topic"].clone(), first["payload"].clone()),
        (json!("sensors/a/temp"), json!(1))
    );
    let second = c.recv().await;
    assert_eq!(
        (second["topic"].clone(), second["payload"].clone()),
        (json!("sensors"), json!(2))
    );
    srv.stop().await;
}

#[tokio::test]
async fn unsubscribe_stops_delivery_and_is_idempotent() {
    let srv = TestServer::start().await;
    let mut c = srv.ws("assistant", "1").await;
    c.sub("x").await;
    assert_eq!(
        c.request(json!({"type":"unsub","topic":"x"}), 1).await["type"],
        "ack"
    );
    assert_eq!(
        c.request(json!({"type":"unsub","topic":"x"}), 2).await["type"],
        "ack"
    );
    let (_, body) = srv.publish("x", json!(1)).await;
    assert_eq!(body["recipients"], 0);
    srv.stop().await;
}

#[tokio::test]
async fn bad_messages_get_errors_and_the_connection_survives() {
    let srv = TestServer::start().await;
    let mut c = srv.ws("assistant", "1").await;
    c.send_text("not json").await;
    let e = c.recv().await;
    assert_eq!(
        (e["type"].clone(), e["code"].clone()),
        (json!("error"), json!("bad_request"))
    );
    assert!(e.get("id").is_none());
    c.send_text("[1,2]").await;
    assert_eq!(c.recv().await["code"], "bad_request");

    let cases = [
        (json!({"topic":"a"}), "bad_request"),
        (json!({"type":"dance"}), "unknown_type"),
        (json!({"type":"sub"}), "bad_request"),
        (json!({"type":"sub","topic":42}), "bad_request"),
        (json!({"type":"sub","topic":""}), "invalid_topic"),
        (json!({"type":"sub","topic":"a/#/b"}), "invalid_topic"),
        (json!({"type":"sub","topic":"a\u{0001}"}), "invalid_topic"),
        (
            json!({"type":"sub","topic":"x".repeat(257)}),
            "invalid_topic",
        ),
        (json!({"type":"pub","topic":"a","payload":1}), "forbidden"),
        (json!({"type":"auth","token":"garbage"}), "invalid_token"),
    ];
    for (i, (msg, code)) in cases.into_iter().enumerate() {
        let reply = c.request(msg.clone(), i as u64).await;
        assert_eq!(reply["type"], "error", "{msg}");
        assert_eq!(reply["code"], code, "{msg}: {reply}");
        assert!(reply["message"].as_str().is_some_and(|m| !m.is_empty()));
    }

    c.stream.send(Message::binary(vec![1, 2, 3])).await.unwrap();
    assert_eq!(c.recv().await["code"], "unsupported_binary");

    // Still subscribed and served after all of that.
    c.sub("still").await;
    srv.publish("still", json!("here")).await;
    assert_eq!(c.recv().await["payload"], "here");
    srv.stop().await;
}

#[tokio::test]
async fn handshake_rejects_bad_tokens_with_401_json() {
    let srv = TestServer::start().await;
    let expired = token_claims(json!({"sub":"1","role":"assistant","exp": 1_000}));
    let future = token_claims(json!({"sub":"1","role":"assistant","nbf": 4_000_000_000u64}));
    let other_key = pulso::auth::Signer::hmac("other")
        .token("assistant", "1", None, &Default::default())
        .unwrap();
    let cases = [
        (None, "unauthorized"),
        (Some("garbage".to_string()), "invalid_token"),
        (Some(other_key), "invalid_token"),
        (Some(expired), "token_expired"),
        (Some(future), "invalid_token"),
    ];
    for (token, code) in cases {
        let url = match &token {
            Some(t) => srv.ws_url(t),
            None => format!("ws://{}/ws", srv.addr),
        };
        let err = tokio_tungstenite::connect_async(url).await.unwrap_err();
        match err {
            tokio_tungstenite::tungstenite::Error::Http(resp) => {
                assert_eq!(resp.status(), 401);
                let body: serde_json::Value =
                    serde_json::from_slice(resp.body().as_deref().unwrap()).unwrap();
                assert_eq!(body["error"]["code"], code, "{token:?}");
            }
            other => panic!("expected HTTP 401, got {other}"),
        }
    }
    let m = srv.metrics().await;
    assert!(
        m.contains("pulso_auth_failures_total{reason=\"expired\"} 1"),
        "{m}"
    );
    srv.stop().await;
}

#[tokio::test]
async fn bearer_header_is_accepted() {
    let srv = TestServer::start().await;
    let mut req = format!("ws://{}/ws", srv.addr)
        .into_client_request()
        .unwrap();
    req.headers_mut().insert(
        "authorization",
        format!("Bearer {}", srv.token("assistant", "1"))
            .parse()
            .unwrap(),
    );
    let (mut ws, _) = tokio_tungstenite::connect_async(req).await.unwrap();
    ws.send(Message::text(r#"{"type":"ping","id":1}"#))
        .await
        .unwrap();
    let mut c = WsClient { stream: ws };
    assert_eq!(c.recv().await["type"], "pong");
    srv.stop().await;
}

#[tokio::test]
async fn publish_acl_allows_configured_roles_only() {
    let srv = TestServer::start_toml(
        "[acl.sensor]\npublish = [\"readings/#\"]\n[acl.viewer]\nsubscribe = [\"public/#\"]\n",
    )
    .await;
    let mut listener = srv.ws("assistant", "l").await;
    listener.sub("readings/a").await;
    let mut sensor = srv.ws("sensor", "s").await;
    let ok = sensor
        .request(
            json!({"type":"pub","topic":"readings/a","payload":{"v":3}}),
            1,
        )
        .await;
    assert_eq!(ok, json!({"type":"ack","id":1}));
    assert_eq!(listener.recv().await["payload"], json!({"v":3}));
    let denied = sensor
        .request(json!({"type":"pub","topic":"other","payload":1}), 2)
        .await;
    assert_eq!(denied["code"], "forbidden");

    let mut viewer = srv.ws("viewer", "v").await;
    assert_eq!(
        viewer
            .request(json!({"type":"sub","topic":"public/+"}), 1)
            .await["type"],
        "ack"
    );
    assert_eq!(
        viewer
            .request(json!({"type":"sub","topic":"private"}), 2)
            .await["code"],
        "forbidden"
    );
    assert_eq!(
        viewer.request(json!({"type":"sub","topic":"#"}), 3).await["code"],
        "forbidden"
    );
    srv.stop().await;
}

#[tokio::test]
async fn subscription_limit_counts_automatic_ones() {
    let srv = TestServer::start_toml("[ws]\nmax_subscriptions = 3\n").await;
    let mut c = srv.ws("assistant", "1").await;
    assert_eq!(
        c.request(json!({"type":"sub","topic":"a"}), 1).await["type"],
        "ack"
    );
    assert_eq!(
        c.request(json!({"type":"sub","topic":"b"}), 2).await["type"],
        "ack"
    );
    let e = c.request(json!({"type":"sub","topic":"c"}), 3).await;
    assert_eq!(e["code"], "too_many_subscriptions");
    // Re-subscribing to a held topic is still fine.
    assert_eq!(
        c.request(json!({"type":"sub","topic":"a"}), 4).await["type"],
        "ack"
    );
    srv.stop().await;
}

#[tokio::test]
async fn oversized_message_closes_with_1009() {
    let srv = TestServer::start_toml("[ws]\nmax_message_size = 1024\n").await;
    let mut c = srv.ws("assistant", "1").await;
    let mut other = srv.ws("assistant", "2").await;
    other.sub("t").await;
    // Exactly at the limit is allowed.
    let frame = r#"{"type":"ping","id":1,"pad":""}"#;
    let at_limit = frame.replace(
        "\"\"}",
        &format!("\"{}\"}}", "x".repeat(1024 - frame.len())),
    );
    assert_eq!(at_limit.len(), 1024);
    c.send_text(&at_limit).await;
    assert_eq!(c.recv().await["type"], "pong");
    c.send_text(&"y".repeat(1025)).await;
    assert_eq!(c.close_code().await, 1009);
    // Everyone else is still served.
    srv.publish("t", json!(1)).await;
    assert_eq!(other.recv().await["payload"], 1);
    srv.stop().await;
}

#[tokio::test]
async fn flood_is_rate_limited_then_closed_with_1008() {
    let srv = TestServer::start_toml("[ws]\nrate_limit = 5\n").await;
    let mut c = srv.ws("assistant", "1").await;
    let mut other = srv.ws("assistant", "2").await;
    other.sub("t").await;
    for i in 0..6 {
        c.send(json!({"type":"ping","id":i})).await;
    }
    for _ in 0..5 {
        assert_eq!(c.recv().await["type"], "pong");
    }
    let limited = c.recv().await;
    assert_eq!(
        (limited["code"].clone(), limited["id"].clone()),
        (json!("rate_limited"), json!(5))
    );
    // Keep flooding: refused in three consecutive seconds closes with 1008.
    let code = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if c.stream
                .send(Message::text(r#"{"type":"ping"}"#))
                .await
                .is_err()
            {
                return c.close_code().await;
            }
            match tokio::time::timeout(
                Duration::from_millis(20),
                futures_util::StreamExt::next(&mut c.stream),
            )
            .await
            {
                Ok(Some(Ok(Message::Close(f)))) => {
                    return f.map(|f| u16::from(f.code)).unwrap_or(0);
                }
                Ok(None) | Ok(Some(Err(_))) => return 0,
                _ => {}
            }
        }
    })
    .await
    .expect("closed within 10 s");
    assert_eq!(code, 1008);
    srv.publish("t", json!("ok")).await;
    assert_eq!(other.recv().await["payload"], "ok");
    srv.stop().await;
}

#[tokio::test]
async fn token_expiry_closes_with_4003_unless_refreshed() {
    let srv = TestServer::start().await;
    let short = token("assistant", "1", Some(Duration::from_secs(2)));
    let mut c = WsClient::connect(&srv.ws_url(&short)).await;
    assert_eq!(c.close_code().await, 4003);

    let mut r =
        WsClient::connect(&srv.ws_url(&token("assistant", "9", Some(Duration::from_secs(2)))))
            .await;
    // A refresh for another identity is refused and changes nothing.
    let other = token("assistant", "10", Some(Duration::from_secs(3600)));
    assert_eq!(
        r.request(json!({"type":"auth","token":other}), 1).await["code"],
        "invalid_token"
    );
    let fresh = token("assistant", "9", Some(Duration::from_secs(3600)));
    assert_eq!(
        r.request(json!({"type":"auth","token":fresh}), 2).await["type"],
        "ack"
    );
    r.sub("after").await;
    // Past the first token's expiry the connection still works.
    let marker = tokio::time::Instant::now() + Duration::from_secs(3);
    while tokio::time::Instant::now() < marker {
        assert_eq!(r.request(json!({"type":"ping"}), 3).await["type"], "pong");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    srv.publish("after", json!(1)).await;
    assert_eq!(r.recv().await["payload"], 1);
    srv.stop().await;
}

#[tokio::test]
async fn keepalive_pings_and_terminates_silent_clients() {
    let srv = TestServer::start_toml("keepalive_interval = \"300ms\"\n").await;
    let mut alive = srv.ws("assistant", "1").await;
    // A client that never reads never answers pings: it is terminated.
    let silent = srv.ws("assistant", "2").await;
    srv.until("both connected", |gw| gw.hub.stats().connections == 2)
        .await;
    // tungstenite answers pings while it reads, so keep `alive` reading.
    let gw = srv.gw.clone();
    let pings = tokio::time::timeout(WAIT, async {
        let mut pings = 0;
        loop {
            tokio::select! {
                m = futures_util::StreamExt::next(&mut alive.stream) => {
                    if let Some(Ok(Message::Ping(_))) = m { pings += 1; }
                }
                _ = tokio::time::sleep(Duration::from_millis(20)) => {}
            }
            if gw.hub.stats().connections == 1 {
                return pings;
            }
        }
    })
    .await
    .expect("the silent client is dropped");
    assert!(pings >= 1, "server sends ping frames");
    drop(silent);
    assert_eq!(
        alive.request(json!({"type":"ping"}), 1).await["type"],
        "pong"
    );
    srv.stop().await;
}

#[tokio::test]
async fn slow_consumer_is_closed_and_others_lose_nothing() {
    let srv = TestServer::start_toml("[ws]\noutbound_queue = 16\n").await;
    let mut fast = srv.ws("assistant", "fast").await;
    fast.sub("flood").await;
    // Never reads: its socket buffers fill, then its queue.
    let mut slow = srv.ws("assistant", "slow").await;
    slow.sub("flood").await;
    let payload = json!("x".repeat(16 * 1024));
    let n = 400;
    let reader = tokio::spawn(async move {
        let mut got = 0;
        while got < n {
            let m = fast.recv().await;
            assert_eq!(m["payload"]["i"], got);
            got += 1;
        }
        got
    });
    for i in 0..n {
        let (status, _) = srv.publish("flood", json!({"i": i, "pad": payload})).await;
        assert_eq!(status, 200);
    }
    assert_eq!(
        reader.await.unwrap(),
        n,
        "the fast client got every message in order"
    );
    srv.until("slow consumer closed", |gw| gw.hub.stats().connections == 1)
        .await;
    // Reading now drains what the kernel buffered; the server is still
    // offering the close frame (for up to 2 s), so it arrives at the end.
    assert_eq!(slow.close_code().await, 1013);
    let m = srv.metrics().await;
    assert!(m.contains("pulso_slow_consumer_closes_total 1"), "{m}");
    assert!(!m.contains("pulso_messages_dropped_total 0\n"), "{m}");
    srv.stop().await;
}

#[tokio::test]
async fn disconnect_leaves_the_tables_empty() {
    let srv = TestServer::start().await;
    let mut clients = Vec::new();
    for i in 0..20 {
        let mut c = srv.ws("assistant", &i.to_string()).await;
        c.sub("shared").await;
        c.sub(&format!("own/{i}")).await;
        c.sub("wild/#").await;
        clients.push(c);
    }
    srv.until("all subscribed", |gw| gw.hub.stats().subscriptions == 80)
        .await;
    for mut c in clients {
        c.stream.close(None).await.unwrap();
    }
    srv.until("tables empty", |gw| gw.hub.stats() == Default::default())
        .await;
    srv.stop().await;
}

#[tokio::test]
async fn shutdown_closes_with_1001_and_returns_quickly() {
    let srv = TestServer::start().await;
    let mut a = srv.ws("assistant", "1").await;
    let mut b = srv.ws("assistant", "2").await;
    let stopping = tokio::spawn(srv.stop());
    assert_eq!(a.close_code().await, 1001);
    assert_eq!(b.close_code().await, 1001);
    let took = stopping.await.unwrap();
    assert!(took < Duration::from_secs(10), "{took:?}");
}

#[tokio::test]
async fn an_absurd_exp_neither_panics_nor_leaks() {
    let srv = TestServer::start().await;
    let t = token_claims(json!({"sub":"1","role":"assistant","exp": u64::MAX}));
    let mut c = WsClient::connect(&srv.ws_url(&t)).await;
    assert_eq!(c.request(json!({"type":"ping"}), 1).await["type"], "pong");
    c.stream.close(None).await.unwrap();
    srv.until("tables empty", |gw| gw.hub.stats() == Default::default())
        .await;
    assert!(
        srv.metrics()
            .await
            .contains("pulso_connections{protocol=\"ws\"} 0")
    );
    srv.stop().await;
}
