//! pulso as a library: the application of `examples/embed.rs` (this test
//! includes that very file, so what runs here is the example's code) served
//! by axum with real `/ws`, Socket.IO and HTTP clients; publishing from Rust
//! code through `Handle`; pulso's router nested under a prefix; the builder's
//! errors; a standalone server started through the builder.

mod common;
#[path = "support/sio_client.rs"]
mod sio_client;

// The example's `main` is not called here.
#[allow(dead_code)]
#[path = "../examples/embed.rs"]
mod embed;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use common::{SECRET, WAIT, WsClient, get_json, post_json, token};
use pulso::{Builder, Handle, PublishError, StartError};
use serde_json::json;
use sio_client::SioClient;
use tokio::task::JoinHandle;

/// The settings every test starts from: a fixed secret, presence in memory,
/// no demo feed.
fn settings() -> Builder {
    pulso::Server::builder()
        .jwt_secret(SECRET)
        .database_url("sqlite::memory:")
        .demo(false)
}

/// An application serving `app` on a free loopback port with axum (with
/// the peers' addresses), and pulso running behind it.
struct App {
    addr: SocketAddr,
    pulso: Handle,
    serving: JoinHandle<std::io::Result<()>>,
    running: JoinHandle<std::io::Result<()>>,
}

impl App {
    async fn serve(app: Router, server: pulso::Server) -> App {
        let pulso = server.handle();
        let running = tokio::spawn(server.run());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stopping = pulso.stopping();
        let serving = tokio::spawn(async move {
            axum::serve(
                listener,
                app.into_make_service_with_connect_info::<SocketAddr>(),
            )
            .with_graceful_shutdown(stopping)
            .await
        });
        App {
            addr,
            pulso,
            serving,
            running,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    async fn ws(&self, path: &str, role: &str, sub: &str) -> WsClient {
        let token = token(role, sub, Some(Duration::from_secs(3600)));
        WsClient::connect(&format!("ws://{}{path}?token={token}", self.addr)).await
    }

    /// Stops pulso; the application's server stops with it.
    async fn stop(self) {
        self.pulso.shutdown();
        let both = async {
            self.serving.await.unwrap().unwrap();
            self.running.await.unwrap().unwrap();
        };
        tokio::time::timeout(WAIT, both)
            .await
            .expect("both servers stop in time");
    }
}

#[tokio::test]
async fn the_example_app_serves_its_own_routes_and_pulsos_and_publishes_from_rust() {
    let (app, server) = embed::app(settings()).await.unwrap();
    let app = App::serve(app, server).await;
    tokio::spawn(embed::ticker(app.pulso.clone(), Duration::from_millis(20)));

    // The application's own route.
    let hello = reqwest::get(app.url("/hello")).await.unwrap();
    assert_eq!(hello.status(), 200);
    assert_eq!(hello.text().await.unwrap(), "hello from the application\n");

    // A /ws client gets what the application's ticker publishes from Rust.
    let mut ws = app.ws("/ws", "assistant", "a").await;
    ws.sub("clock").await;
    let tick = ws.recv().await;
    assert_eq!(tick["topic"], "clock", "{tick}");
    assert!(tick["payload"]["tick"].is_u64(), "{tick}");

    // The application's own POST publishes too, and says whom it reached.
    let mut orders = app.ws("/ws", "assistant", "b").await;
    orders.sub("orders").await;
    let (status, body) = post_json(&app.url("/orders"), None, r#"{"item":"tea"}"#).await;
    assert_eq!(
        (status, body),
        (200, json!({"accepted": true, "reached": 1}))
    );
    let got = orders.recv().await;
    assert_eq!(
        (&got["topic"], &got["event"], &got["payload"]),
        (&json!("orders"), &json!("order"), &json!({"item": "tea"}))
    );

    // pulso's HTTP API is mounted too, with its JSON errors under /api/.
    let admin = token("admin", "ops", Some(Duration::from_secs(60)));
    let (status, body) = post_json(
        &app.url("/api/publish"),
        Some(&admin),
        r#"{"topic":"orders","payload":{"item":"coffee"}}"#,
    )
    .await;
    assert_eq!((status, body), (200, json!({"recipients": 1})));
    assert_eq!(orders.recv().await["payload"], json!({"item": "coffee"}));
    let (status, body) = get_json(&app.url("/api/nope"), None).await;
    assert_eq!(status, 404);
    assert_eq!(body["error"]["code"], "not_found", "{body}");
    // Every other path is the application's (axum's empty 404 here), and
    // the console and operations endpoints are not mounted by `router()`.
    for path in ["/nope", "/", "/metrics"] {
        let response = reqwest::get(app.url(path)).await.unwrap();
        assert_eq!(response.status(), 404, "{path}");
        assert_eq!(response.text().await.unwrap(), "", "{path}");
    }

    // Socket.IO on the same port: a socket authenticates, joins its rooms
    // and gets a broadcast from Rust code with its event name.
    let mut sio = SioClient::connect(app.addr, 4, "/notifications").await;
    let ack = sio
        .auth(
            &token("assistant", "s", Some(Duration::from_secs(60))),
            json!({}),
        )
        .await;
    assert_eq!(ack["statusCode"], 200, "{ack}");
    let reached = app
        .pulso
        .broadcast(&["assistant"], Some("check_in"), &json!({"id": 4}))
        .unwrap();
    assert_eq!(reached, 1);
    assert_eq!(
        sio.event().await,
        ("check_in".to_string(), vec![json!({"id": 4})])
    );

    // The graceful stop closes pulso's connections with 1001 and stops
    // the application's server too.
    app.pulso.shutdown();
    assert_eq!(orders.close_code().await, 1001);
    // Clients that do not answer the close would hold the stop for the
    // closing handshake's timeout.
    drop((ws, orders, sio));
    app.stop().await;
}

#[tokio::test]
async fn publishing_from_rust_is_held_to_the_http_apis_limits() {
    let server = settings()
        .set("api.max_body", "64")
        .without_listener()
        .build()
        .await
        .unwrap();
    let router = server.router().merge(server.ops_router());
    let app = App::serve(router, server).await;
    let pulso = app.pulso.clone();
    assert!(!pulso.clustered());
    assert!(!pulso.is_stopping());

    // Nobody listening: accepted, nobody reached.
    assert_eq!(pulso.publish("alerts", &json!({"level": 1})).unwrap(), 0);
    let mut ws = app.ws("/ws", "assistant", "a").await;
    ws.sub("alerts/#").await;
    assert_eq!(pulso.publish("alerts/high", "fire").unwrap(), 1);
    let got = ws.recv().await;
    assert_eq!(
        (&got["topic"], &got["payload"]),
        (&json!("alerts/high"), &json!("fire"))
    );
    // A connection in several of the rooms is reached once.
    assert_eq!(
        pulso
            .broadcast(&["alerts/a", "alerts/b"], None, &[1, 2])
            .unwrap(),
        1
    );
    assert_eq!(ws.recv().await["payload"], json!([1, 2]));

    let refused = |result: Result<usize, PublishError>| match result {
        Err(e) => e,
        Ok(n) => panic!("published to {n} connections"),
    };
    let e = refused(pulso.publish("", &1));
    assert!(matches!(e, PublishError::InvalidName { .. }), "{e}");
    let e = refused(pulso.publish("bad\ntopic", &1));
    assert!(e.to_string().contains("control character"), "{e}");
    let long = "x".repeat(257);
    assert!(matches!(
        refused(pulso.publish(&long, &1)),
        PublishError::InvalidName { .. }
    ));
    let e = refused(pulso.broadcast(&["alerts"], Some(""), &1));
    assert!(matches!(e, PublishError::InvalidName { .. }), "{e}");
    let none: [&str; 0] = [];
    assert!(matches!(
        refused(pulso.broadcast(&none, None, &1)),
        PublishError::RoomCount(0)
    ));
    let many: Vec<String> = (0..=pulso::MAX_ROOMS).map(|i| format!("r{i}")).collect();
    assert!(matches!(
        refused(pulso.broadcast(&many[..], None, &1)),
        PublishError::RoomCount(1025)
    ));
    let e = refused(pulso.publish("alerts", &"x".repeat(100)));
    assert!(
        matches!(e, PublishError::TooLarge { size: 102, max: 64 }),
        "{e}"
    );
    // JSON object keys are strings: this map cannot be a payload.
    let pairs = BTreeMap::from([((1, 2), 3)]);
    assert!(matches!(
        refused(pulso.publish("alerts", &pairs)),
        PublishError::Payload(_)
    ));
    // Nothing refused reached the client.
    assert_eq!(pulso.publish("alerts/last", &true).unwrap(), 1);
    assert_eq!(ws.recv().await["topic"], "alerts/last");

    // The operations router: metrics count the accepted publishes only.
    let metrics = reqwest::get(app.url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("pulso_messages_published_total{source=\"library\"} 4"),
        "{metrics}"
    );
    let (status, _) = get_json(&app.url("/readyz"), None).await;
    assert_eq!(status, 200);
    drop(ws);
    app.stop().await;
    // Publishing after the stop is harmless: nobody is left to reach.
    assert!(pulso.is_stopping());
    assert_eq!(pulso.publish("alerts/late", &1).unwrap(), 0);
}

#[tokio::test]
async fn nested_under_a_prefix_every_endpoint_moves_with_it() {
    let server = settings().without_listener().build().await.unwrap();
    let router = Router::new()
        .route("/", axum::routing::get(|| async { "the application" }))
        .nest("/rt", server.router());
    let app = App::serve(router, server).await;

    let mut ws = app.ws("/rt/ws", "assistant", "a").await;
    ws.sub("news").await;
    let admin = token("admin", "ops", Some(Duration::from_secs(60)));
    let (status, body) = post_json(
        &app.url("/rt/api/publish"),
        Some(&admin),
        r#"{"topic":"news","payload":1}"#,
    )
    .await;
    assert_eq!((status, body), (200, json!({"recipients": 1})));
    assert_eq!(ws.recv().await["payload"], 1);

    // An Engine.IO handshake over long-polling at the prefixed path.
    let open = reqwest::get(app.url("/rt/socket.io/?EIO=4&transport=polling"))
        .await
        .unwrap();
    assert_eq!(open.status(), 200);
    let body = open.text().await.unwrap();
    assert!(body.starts_with("0{\"sid\":"), "{body}");
    // Not at the unprefixed one; the application keeps its `/`.
    let stray = reqwest::get(app.url("/socket.io/?EIO=4&transport=polling"))
        .await
        .unwrap();
    assert_eq!(stray.status(), 404);
    let root = reqwest::get(app.url("/")).await.unwrap();
    assert_eq!(root.text().await.unwrap(), "the application");
    drop(ws);
    app.stop().await;
}

#[tokio::test]
async fn the_limit_per_address_applies_under_the_applications_server() {
    let server = settings()
        .set("max_connections_per_ip", "1")
        .without_listener()
        .build()
        .await
        .unwrap();
    let router = server.router();
    let app = App::serve(router, server).await;
    let first = app.ws("/ws", "assistant", "a").await;
    let token = token("assistant", "b", Some(Duration::from_secs(60)));
    let second = tokio::time::timeout(
        WAIT,
        tokio_tungstenite::connect_async(format!("ws://{}/ws?token={token}", app.addr)),
    )
    .await
    .expect("an answer in time");
    match second {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), 503)
        }
        other => panic!("expected a 503, got {other:?}"),
    }
    drop(first);
    app.stop().await;
}

#[tokio::test]
async fn builder_errors_name_the_setting_and_nothing_starts() {
    let config_error = |result: Result<pulso::Server, StartError>| match result {
        Err(StartError::Config(e)) => e.to_string(),
        Err(e) => panic!("not a configuration error: {e}"),
        Ok(_) => panic!("started"),
    };
    let e = config_error(settings().set("ws.rate_limit", "0").build().await);
    assert!(e.contains("`ws.rate_limit`"), "{e}");
    let e = config_error(settings().set("no.such", "1").build().await);
    assert!(e.contains("unknown setting `no.such`"), "{e}");
    let e = config_error(settings().toml("[mqtt]\nurll = \"x\"").build().await);
    assert!(e.contains("unknown setting `mqtt.urll`"), "{e}");
    let e = config_error(
        settings()
            .config_file("/nonexistent/pulso.toml")
            .build()
            .await,
    );
    assert!(e.contains("/nonexistent/pulso.toml"), "{e}");
    // The first error is the one reported, even when later calls are fine.
    let e = config_error(
        settings()
            .set("ws.outbound_queue", "lots")
            .jwt_secret("fine")
            .build()
            .await,
    );
    assert!(e.contains("`ws.outbound_queue`"), "{e}");
}

#[tokio::test]
async fn a_standalone_server_from_the_builder_listens_and_stops() {
    let server = settings()
        .listen("127.0.0.1:0".parse().unwrap())
        .toml("keepalive_interval = \"5s\"")
        .build()
        .await
        .unwrap();
    let addr = server.local_addr();
    assert_ne!(addr.port(), 0);
    assert!(server.sample_tokens().is_none());
    let pulso = server.handle();
    assert!(pulso.node_id().ends_with(&format!(":{}", addr.port())));
    let running = tokio::spawn(server.run());
    // The standalone server has the console and operations endpoints.
    for path in ["/healthz", "/"] {
        let response = reqwest::get(format!("http://{addr}{path}")).await.unwrap();
        assert_eq!(response.status(), 200, "{path}");
    }
    let mut ws = WsClient::connect(&format!(
        "ws://{addr}/ws?token={}",
        token("assistant", "a", Some(Duration::from_secs(60)))
    ))
    .await;
    ws.sub("t").await;
    assert_eq!(pulso.publish("t", &"hi").unwrap(), 1);
    assert_eq!(ws.recv().await["payload"], "hi");
    pulso.shutdown();
    assert_eq!(ws.close_code().await, 1001);
    drop(ws);
    tokio::time::timeout(WAIT, running)
        .await
        .expect("stops in time")
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn without_a_secret_the_builder_makes_one_and_signs_sample_tokens() {
    let server = pulso::Server::builder()
        .database_url("sqlite::memory:")
        .demo(false)
        .without_listener()
        .build()
        .await
        .unwrap();
    let tokens = server.sample_tokens().cloned().expect("sample tokens");
    let router = server.router();
    let app = App::serve(router, server).await;
    let mut ws = WsClient::connect(&format!("ws://{}/ws?token={}", app.addr, tokens.client)).await;
    ws.sub("t").await;
    let (status, body) = post_json(
        &app.url("/api/publish"),
        Some(&tokens.publisher),
        r#"{"topic":"t","payload":1}"#,
    )
    .await;
    assert_eq!((status, body), (200, json!({"recipients": 1})));
    drop(ws);
    app.stop().await;
}
