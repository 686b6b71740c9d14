//! HTTP API end to end: publish, broadcast, publisher auth, limits, health.

mod common;

use common::*;
use serde_json::json;

#[tokio::test]
async fn publish_counts_recipients_and_reaches_wildcards() {
    let srv = TestServer::start().await;
    let mut exact = srv.ws("assistant", "1").await;
    exact.sub("a/b").await;
    let mut wild = srv.ws("assistant", "2").await;
    wild.sub("a/+").await;
    wild.sub("a/b").await;
    let (status, body) = srv.publish("a/b", json!({"x": true})).await;
    assert_eq!((status, body), (200, json!({"recipients": 2})));
    assert_eq!(exact.recv().await["payload"], json!({"x": true}));
    assert_eq!(wild.recv().await["topic"], "a/b");
    srv.stop().await;
}

#[tokio::test]
async fn broadcast_to_several_rooms_reaches_each_connection_once() {
    let srv = TestServer::start().await;
    let mut both = srv.ws("assistant", "1").await;
    both.sub("assistant").await;
    both.sub("assistant_2").await;
    let mut timer = srv.ws("timer", "2").await;
    timer.sub("timer").await;
    let mut other = srv.ws("assistant", "3").await;
    other.sub("unrelated").await;
    let (status, body) = srv
        .post(
            "/api/broadcast",
            json!({"rooms":["assistant_2","assistant","timer"],"event":"checkin","data":{"check_in_id":{"id":4}}}),
        )
        .await;
    assert_eq!((status, body), (200, json!({"recipients": 2})));
    let m = both.recv().await;
    assert_eq!(
        (m["topic"].clone(), m["event"].clone()),
        (json!("assistant_2"), json!("checkin"))
    );
    assert_eq!(m["payload"], json!({"check_in_id":{"id":4}}));
    assert_eq!(timer.recv().await["topic"], "timer");
    // `both` got exactly one copy: the next thing it sees is a reply.
    assert_eq!(
        both.request(json!({"type":"ping"}), 1).await["type"],
        "pong"
    );
    // A single room as a string.
    let (_, body) = srv
        .post("/api/broadcast", json!({"rooms":"unrelated","data":1}))
        .await;
    assert_eq!(body["recipients"], 1);
    assert_eq!(other.recv().await["payload"], 1);
    srv.stop().await;
}

#[tokio::test]
async fn publisher_auth() {
    let srv = TestServer::start_toml("api_key = \"k3y\"\n").await;
    let url = srv.url("/api/publish");
    let body = json!({"topic":"t","payload":1}).to_string();
    let (s, b) = post_json(&url, None, &body).await;
    assert_eq!(
        (s, b["error"]["code"].clone()),
        (401, json!("unauthorized"))
    );
    let (s, b) = post_json(&url, Some("nonsense"), &body).await;
    assert_eq!(
        (s, b["error"]["code"].clone()),
        (401, json!("invalid_token"))
    );
    let expired = token_claims(json!({"sub":"x","role":"admin","exp":1000}));
    let (s, b) = post_json(&url, Some(&expired), &body).await;
    assert_eq!(
        (s, b["error"]["code"].clone()),
        (401, json!("token_expired"))
    );
    let (s, b) = post_json(&url, Some(&srv.token("assistant", "1")), &body).await;
    assert_eq!((s, b["error"]["code"].clone()), (403, json!("forbidden")));
    for ok in [
        srv.token("admin", "a"),
        srv.token("service", "s"),
        "k3y".to_string(),
    ] {
        let (s, b) = post_json(&url, Some(&ok), &body).await;
        assert_eq!((s, b), (200, json!({"recipients": 0})));
    }
    srv.stop().await;
}

#[tokio::test]
async fn bad_bodies_get_clear_errors() {
    let srv = TestServer::start().await;
    let admin = srv.token("admin", "a");
    let publish = srv.url("/api/publish");
    let broadcast = srv.url("/api/broadcast");
    let cases = [
        (&publish, "not json", 400, "bad_request"),
        (&publish, "[1]", 400, "bad_request"),
        (&publish, r#"{"payload":1}"#, 400, "bad_request"),
        (&publish, r#"{"topic":5,"payload":1}"#, 400, "bad_request"),
        (&publish, r#"{"topic":"t"}"#, 400, "bad_request"),
        (
            &publish,
            r#"{"topic":"","payload":1}"#,
            400,
            "invalid_topic",
        ),
        (
            &publish,
            r#"{"topic":"a\u0000b","payload":1}"#,
            400,
            "invalid_topic",
        ),
        (
            &publish,
            r#"{"topic":"t","payload":1,"event":7}"#,
            400,
            "bad_request",
        ),
        (&broadcast, r#"{"rooms":[],"data":1}"#, 400, "bad_request"),
        (
            &broadcast,
            r#"{"rooms":["ok",""],"data":1}"#,
            400,
            "invalid_topic",
        ),
        (&broadcast, r#"{"rooms":[1],"data":1}"#, 400, "bad_request"),
        (&broadcast, r#"{"rooms":"r"}"#, 400, "bad_request"),
    ];
    for (url, body, status, code) in cases {
        let (s, b) = post_json(url, Some(&admin), body).await;
        assert_eq!(
            (s, b["error"]["code"].clone()),
            (status, json!(code)),
            "{body}: {b}"
        );
        assert!(
            b["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty())
        );
    }
    // Still serving.
    assert_eq!(srv.publish("t", json!(1)).await.0, 200);
    srv.stop().await;
}

#[tokio::test]
async fn oversized_body_is_413() {
    let srv = TestServer::start_toml("[api]\nmax_body = \"1KiB\"\n").await;
    let admin = srv.token("admin", "a");
    let big = json!({"topic":"t","payload":"x".repeat(2000)}).to_string();
    let (s, b) = post_json(&srv.url("/api/publish"), Some(&admin), &big).await;
    assert_eq!(
        (s, b["error"]["code"].clone()),
        (413, json!("payload_too_large"))
    );
    // Chunked, without a content-length: still refused.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(srv.addr).await.unwrap();
    let head = format!(
        "POST /api/publish HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {admin}\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n{:x}\r\n{big}\r\n0\r\n\r\n",
        big.len()
    );
    tcp.write_all(head.as_bytes()).await.unwrap();
    let mut resp = String::new();
    tokio::time::timeout(WAIT, tcp.read_to_string(&mut resp))
        .await
        .unwrap()
        .unwrap();
    assert!(resp.starts_with("HTTP/1.1 413"), "{resp}");
    assert!(resp.contains("payload_too_large"), "{resp}");
    let small = json!({"topic":"t","payload":"x"}).to_string();
    assert_eq!(
        post_json(&srv.url("/api/publish"), Some(&admin), &small)
            .await
            .0,
        200
    );
    srv.stop().await;
}

#[tokio::test]
async fn health_ready_metrics() {
    let srv = TestServer::start().await;
    let health = reqwest::get(srv.url("/healthz")).await.unwrap();
    assert_eq!(health.status(), 200);
    let ready = reqwest::get(srv.url("/readyz")).await.unwrap();
    assert_eq!(ready.status(), 200);
    assert_eq!(
        ready.json::<serde_json::Value>().await.unwrap()["status"],
        "ready"
    );

    let mut c = srv.ws("assistant", "1").await;
    c.sub("m").await;
    srv.publish("m", json!(1)).await;
    c.recv().await;
    c.send_text("oops").await;
    c.recv().await;
    let m = srv.metrics().await;
    for needle in [
        "pulso_connections{protocol=\"ws\"} 1",
        "pulso_subscriptions 2",
        "pulso_topics 2",
        "pulso_messages_published_total{source=\"api\"} 1",
        "pulso_messages_delivered_total 1",
        "pulso_messages_dropped_total 0",
        "pulso_slow_consumer_closes_total 0",
        "pulso_client_errors_total{code=\"bad_request\"} 1",
        "pulso_stage_latency_seconds_count{stage=\"api_publish\"} 1",
        "pulso_stage_latency_seconds_count{stage=\"fanout\"} 1",
    ] {
        assert!(m.contains(needle), "missing {needle} in\n{m}");
    }
    srv.stop().await;
}

#[tokio::test]
async fn unknown_routes_and_methods_get_json_errors() {
    let srv = TestServer::start().await;
    let r = reqwest::get(srv.url("/api/nope")).await.unwrap();
    assert_eq!(r.status(), 404);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "not_found");
    let r = reqwest::get(srv.url("/api/publish")).await.unwrap();
    assert_eq!(r.status(), 405);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "method_not_allowed");
    srv.stop().await;
}

#[tokio::test]
async fn demo_feed_publishes_sine_values() {
    let srv = TestServer::start_toml("[demo]\nenabled = true\ninterval = \"50ms\"\n").await;
    let mut c = srv.ws("assistant", "1").await;
    c.sub("metricas/demo").await;
    for _ in 0..3 {
        let m = c.recv().await;
        assert_eq!(m["topic"], "metricas/demo");
        let v = m["payload"]["value"].as_f64().unwrap();
        assert!((-1.2..=1.2).contains(&v), "{v}");
    }
    srv.stop().await;
}

#[tokio::test]
async fn console_page_and_its_assets_are_served_from_the_binary() {
    let srv = TestServer::start().await;
    let get = |path: &str| reqwest::get(srv.url(path));
    let r = get("/").await.unwrap();
    assert_eq!(r.status(), 200);
    let kind = |r: &reqwest::Response| r.headers()["content-type"].to_str().unwrap().to_string();
    assert!(kind(&r).starts_with("text/html"));
    // Nothing inline, nothing from another origin.
    let csp = r.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(
        csp.contains("script-src 'self'") && csp.contains("connect-src 'self'"),
        "{csp}"
    );
    let page = r.text().await.unwrap();
    for asset in [
        "/console/uPlot.iife.min.js",
        "/console/uPlot.min.css",
        "/console/console.js",
        "/console/console.css",
    ] {
        assert!(page.contains(asset), "the page loads {asset}");
        let r = get(asset).await.unwrap();
        assert_eq!(r.status(), 200, "{asset}");
        let want = if asset.ends_with(".js") {
            "text/javascript"
        } else {
            "text/css"
        };
        assert!(kind(&r).starts_with(want), "{asset}: {}", kind(&r));
        assert!(!r.text().await.unwrap().is_empty());
    }
    assert!(
        !page.contains("<script>") && !page.contains("://"),
        "no inline script, no CDN"
    );
    let script = get("/console/console.js")
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for needle in [
        "/ws?token=",
        "/api/console",
        "/api/publish",
        "sessionStorage",
    ] {
        assert!(script.contains(needle), "console.js uses {needle}");
    }
    let license = get("/console/uPlot.LICENSE")
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(license.contains("MIT"), "{license}");
    let r = get("/console/../Cargo.toml").await.unwrap();
    assert_eq!(r.status(), 404);
    let r = get("/console/nope.js").await.unwrap();
    assert_eq!(r.status(), 404);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "not_found");
    srv.stop().await;
}

/// `GET /api/console` with `admin`'s token.
async fn console_state(srv: &TestServer, query: &str) -> (u16, serde_json::Value) {
    get_json(
        &srv.url(&format!("/api/console{query}")),
        Some(&srv.token("admin", "console")),
    )
    .await
}

#[tokio::test]
async fn console_endpoint_needs_a_publisher() {
    let srv = TestServer::start_toml("api_key = \"k3y\"\n").await;
    let url = srv.url("/api/console");
    let (s, b) = get_json(&url, None).await;
    assert_eq!(
        (s, b["error"]["code"].clone()),
        (401, json!("unauthorized"))
    );
    let (s, b) = get_json(&url, Some("nonsense")).await;
    assert_eq!(
        (s, b["error"]["code"].clone()),
        (401, json!("invalid_token"))
    );
    let (s, b) = get_json(&url, Some(&srv.token("assistant", "1"))).await;
    assert_eq!((s, b["error"]["code"].clone()), (403, json!("forbidden")));
    for ok in [
        srv.token("admin", "a"),
        srv.token("service", "s"),
        "k3y".into(),
    ] {
        let (s, b) = get_json(&url, Some(&ok)).await;
        assert_eq!(s, 200, "{b}");
    }
    for bad in ["0", "101", "ten", "-1", "99999999999999999999999"] {
        let (s, b) = console_state(&srv, &format!("?top={bad}")).await;
        assert_eq!(
            (s, b["error"]["code"].clone()),
            (400, json!("bad_request")),
            "top={bad}"
        );
    }
    srv.stop().await;
}

#[tokio::test]
async fn console_endpoint_counts_connections_and_subscribers() {
    let srv = TestServer::start().await;
    // Every client is also subscribed to `temperature` (auto_subscribe).
    let mut busy = Vec::new();
    for i in 0..3 {
        let mut c = srv.ws("assistant", &format!("busy-{i}")).await;
        c.sub("console/busy").await;
        busy.push(c);
    }
    let mut quiet = srv.ws("assistant", "quiet").await;
    quiet.sub("console/quiet").await;
    quiet.sub("console/+").await;

    let (s, d) = console_state(&srv, "").await;
    assert_eq!(s, 200, "{d}");
    assert_eq!(d["node"], srv.gw.config.node_id.as_str());
    assert_eq!(d["version"], env!("CARGO_PKG_VERSION"));
    assert!(d["uptime_seconds"].is_u64());
    assert_eq!(d["ready"], true);
    assert_eq!(
        d["connections"],
        json!({"ws": 4, "socketio": 0, "total": 4, "polling_sessions": 0})
    );
    assert_eq!(d["subscriptions"], 4 + 3 + 2);
    assert_eq!(d["topics"], 4);
    assert_eq!(
        d["top"],
        json!([
            {"name": "temperature", "subscribers": 4, "wildcard": false},
            {"name": "console/busy", "subscribers": 3, "wildcard": false},
            {"name": "console/+", "subscribers": 1, "wildcard": true},
            {"name": "console/quiet", "subscribers": 1, "wildcard": false},
        ])
    );
    let (_, two) = console_state(&srv, "?top=2").await;
    assert_eq!(two["top"].as_array().unwrap().len(), 2);
    assert_eq!(two["top"][1]["name"], "console/busy");

    // Messages by source; `console/+` matches too.
    assert_eq!(
        srv.publish("console/busy", json!({"value": 1})).await.1["recipients"],
        4
    );
    for c in busy.iter_mut().chain([&mut quiet]) {
        assert_eq!(c.recv().await["payload"]["value"], 1);
    }
    let (_, d) = console_state(&srv, "").await;
    assert_eq!(d["messages"]["published"]["api"], 1);
    assert_eq!(d["messages"]["published"]["demo"], 0);
    assert_eq!(d["messages"]["delivered"], 4);
    assert_eq!(d["messages"]["dropped"], 0);

    // The state of what is (not) configured here.
    assert_eq!(d["mqtt"]["enabled"], false);
    assert_eq!(d["mqtt"]["connected"], false);
    assert_eq!(d["presence"]["store"], "sqlite");
    assert_eq!(d["presence"]["status"], "ok");
    assert_eq!(d["cluster"]["engine"], serde_json::Value::Null);
    assert_eq!(d["cluster"]["up"], serde_json::Value::Null);
    let nodes = d["cluster"]["nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), 1, "{d}");
    assert_eq!(nodes[0]["node"], srv.gw.config.node_id.as_str());
    assert_eq!(nodes[0]["self"], true);
    assert_eq!(d["history"]["enabled"], false);
    assert_eq!(d["history"]["recoveries"]["recovered"], 0);

    // A client that leaves is gone from the counts.
    drop(busy.pop());
    let deadline = tokio::time::Instant::now() + WAIT;
    let d = loop {
        let (_, d) = console_state(&srv, "").await;
        if d["connections"]["ws"] == 3 {
            break d;
        }
        assert!(tokio::time::Instant::now() < deadline, "still {d}");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    };
    assert_eq!(
        d["top"][1],
        json!({"name": "console/busy", "subscribers": 2, "wildcard": false})
    );
    srv.stop().await;
}

#[tokio::test]
async fn console_endpoint_shows_history_and_a_broker_that_is_down() {
    // A broker port nothing listens on: the bridge is configured and down.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let srv = TestServer::start_toml(&format!(
        "[mqtt]\nurl = \"mqtt://127.0.0.1:{port}\"\ntopics = [\"sensors/#\"]\n[history]\ntopics = [\"orders/#\"]\n"
    ))
    .await;
    let mut c = srv.ws("assistant", "h").await;
    c.sub("orders/1").await;
    srv.publish("orders/1", json!(1)).await;
    c.recv().await;
    let (s, d) = console_state(&srv, "").await;
    assert_eq!(s, 200, "{d}");
    assert_eq!(d["mqtt"]["enabled"], true);
    assert_eq!(d["mqtt"]["broker"], format!("127.0.0.1:{port}"));
    assert_eq!(d["mqtt"]["connected"], false);
    assert_eq!(d["mqtt"]["topics"], json!(["sensors/#"]));
    assert_eq!(d["ready"], false);
    assert!(
        d["checks"]["mqtt"].as_str().is_some_and(|s| s != "ok"),
        "{d}"
    );
    assert_eq!(d["history"]["enabled"], true);
    assert_eq!(d["history"]["topics"], json!(["orders/#"]));
    assert_eq!(d["history"]["messages"], 1);
    srv.stop().await;
}
