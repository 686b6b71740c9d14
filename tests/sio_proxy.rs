//! Socket.IO virtual requests forwarded to the application's HTTP backend
//! (`socketio.proxy_url`, SPEC §4): a real pulso in front of a real HTTP
//! backend (a small axum app started by each test), driven by the raw
//! Socket.IO client over WebSocket, Engine.IO 4 and 3.

mod common;
#[path = "support/services.rs"]
mod services;
#[path = "support/sio_client.rs"]
mod sio_client;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use common::{TestServer, token_claims};
use serde_json::{Map, Value, json};
use sio_client::SioClient;
use tokio::sync::{Semaphore, mpsc};

const NS: &str = "/notifications";

/// The application's backend: echoes what it receives, and a few routes
/// that answer badly on purpose.
#[derive(Clone)]
struct Backend {
    /// Requests that reached it.
    seen: Arc<AtomicUsize>,
    /// `/hold` tells it arrived here, then waits for a permit.
    arrived: mpsc::UnboundedSender<()>,
    release: Arc<Semaphore>,
}

struct BackendHandle {
    addr: SocketAddr,
    seen: Arc<AtomicUsize>,
    arrived: mpsc::UnboundedReceiver<()>,
    release: Arc<Semaphore>,
}

impl BackendHandle {
    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

async fn echo(
    State(b): State<Backend>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    b.seen.fetch_add(1, Ordering::SeqCst);
    let headers: Map<String, Value> = headers
        .iter()
        .map(|(k, v)| {
            (
                k.to_string(),
                Value::String(String::from_utf8_lossy(v.as_bytes()).into_owned()),
            )
        })
        .collect();
    let body = if body.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&body)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&body).into_owned()))
    };
    (
        [("x-backend", "yes"), ("set-cookie", "sid=secret")],
        axum::Json(json!({
            "method": method.as_str(),
            "path": uri.path(),
            "query": uri.query(),
            "headers": headers,
            "body": body,
        })),
    )
        .into_response()
}

async fn status(Path(code): Path<u16>) -> Response {
    let code = StatusCode::from_u16(code).unwrap_or(StatusCode::IM_A_TEAPOT);
    (code, axum::Json(json!({"error": "as asked"}))).into_response()
}

async fn hold(State(b): State<Backend>) -> Response {
    b.seen.fetch_add(1, Ordering::SeqCst);
    let _ = b.arrived.send(());
    if let Ok(p) = b.release.acquire().await {
        p.forget();
    }
    axum::Json(json!({"held": true})).into_response()
}

async fn rooms(Path(verb): Path<String>, Query(q): Query<HashMap<String, String>>) -> Response {
    let header = if verb == "join" {
        "x-pulso-join"
    } else {
        "x-pulso-leave"
    };
    let rooms = q.get("rooms").cloned().unwrap_or_default();
    ([(header, rooms)], axum::Json(json!({"ok": verb}))).into_response()
}

async fn start_backend() -> BackendHandle {
    let (tx, rx) = mpsc::unbounded_channel();
    let release = Arc::new(Semaphore::new(0));
    let seen = Arc::new(AtomicUsize::new(0));
    let state = Backend {
        seen: seen.clone(),
        arrived: tx,
        release: release.clone(),
    };
    let app = Router::new()
        .route("/status/{code}", get(status))
        .route("/text", get(|| async { "plain words" }))
        .route(
            "/slow",
            get(|| async {
                // A backend that hangs: pulso's timeout is what ends it.
                tokio::time::sleep(Duration::from_secs(60)).await;
                "too late"
            }),
        )
        .route("/big", get(|| async { "x".repeat(4096) }))
        .route(
            "/big-chunked",
            get(|| async {
                let chunks = (0..8).map(|_| Ok::<_, std::io::Error>(Bytes::from(vec![b'y'; 1024])));
                Body::from_stream(futures_util::stream::iter(chunks))
            }),
        )
        .route(
            "/quiet",
            any(|State(b): State<Backend>, body: Bytes| async move {
                b.seen.fetch_add(1, Ordering::SeqCst);
                axum::Json(json!({"received": body.len()}))
            }),
        )
        .route("/hold", any(hold))
        .route("/rooms/{verb}", any(rooms))
        .fallback(echo)
        .with_state(state);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    BackendHandle {
        addr,
        seen,
        arrived: rx,
        release,
    }
}

/// pulso in front of `proxy_url`, with extra `[socketio]` settings.
async fn pulso(proxy_url: &str, socketio: &str) -> TestServer {
    let toml = format!("[socketio]\nproxy_url = \"{proxy_url}\"\n{socketio}\n");
    TestServer::start_with(move |l| {
        l.apply_toml(&common::base_toml()).unwrap();
        l.apply_toml(&toml).unwrap();
    })
    .await
}

fn code_of(ack: &Value) -> &str {
    ack["body"]["error"]["code"].as_str().unwrap_or("")
}

/// A sails.io.js request: `{method, headers, data, url}`.
fn sails(method: &str, url: &str, data: Value, headers: Value) -> Value {
    json!({"method": method, "headers": headers, "data": data, "url": url})
}

#[tokio::test]
async fn answers_come_back_as_sails_acks_for_every_method_on_both_namespaces() {
    let backend = start_backend().await;
    let srv = pulso(&backend.url(), "").await;

    // sails.io.js: Engine.IO 3 on the root namespace.
    let mut root = SioClient::open(srv.addr, 3).await;
    let ack = root
        .request(
            "get",
            &[sails(
                "get",
                "/tournament/2?full=1",
                json!({"n": 2, "s": "a b", "flag": true}),
                json!({}),
            )],
        )
        .await;
    assert_eq!(ack["statusCode"], 200, "{ack}");
    assert_eq!(ack["headers"]["x-backend"], "yes", "{ack}");
    assert!(ack["headers"].get("set-cookie").is_none(), "{ack}");
    let seen = &ack["body"];
    assert_eq!(seen["method"], "GET");
    assert_eq!(seen["path"], "/tournament/2");
    let query: HashMap<String, String> =
        serde_urlencoded::from_str(seen["query"].as_str().unwrap()).unwrap();
    assert_eq!(query["full"], "1");
    assert_eq!(query["n"], "2");
    assert_eq!(query["s"], "a b");
    assert_eq!(query["flag"], "true");
    assert_eq!(seen["body"], Value::Null, "a get sends no body");

    // Every other method sends `data` (over `params`) as a JSON body.
    for method in ["post", "put", "patch", "delete"] {
        let ack = root
            .request(
                method,
                &[json!({"url": "/checkin", "params": {"a": 1, "b": 1}, "data": {"b": 2, "nick": "aguila_calva"}})],
            )
            .await;
        assert_eq!(ack["statusCode"], 200, "{method}: {ack}");
        assert_eq!(ack["body"]["method"], method.to_uppercase());
        assert_eq!(ack["body"]["path"], "/checkin");
        assert_eq!(
            ack["body"]["body"],
            json!({"a": 1, "b": 2, "nick": "aguila_calva"})
        );
        assert_eq!(ack["body"]["headers"]["content-type"], "application/json");
    }
    let ack = root
        .request(
            "post",
            &[sails("post", "/list", json!([1, 2, 3]), json!({}))],
        )
        .await;
    assert_eq!(ack["body"]["body"], json!([1, 2, 3]));

    // Statuses, and bodies that are not JSON, come back as they are; the
    // socket (not authenticated) is not disconnected by any of them.
    let ack = root.request("get", &[json!({"url": "/status/409"})]).await;
    assert_eq!(ack["statusCode"], 409);
    assert_eq!(ack["body"], json!({"error": "as asked"}));
    let ack = root.request("get", &[json!({"url": "/text"})]).await;
    assert_eq!(ack["statusCode"], 200);
    assert_eq!(ack["body"], "plain words");
    assert!(
        ack["headers"]["content-type"]
            .as_str()
            .unwrap()
            .starts_with("text/plain")
    );
    let ack = root.request("get", &[json!({"url": "/status/404"})]).await;
    assert_eq!(ack["statusCode"], 404);

    // Its own url is still pulso's, on the root too.
    let ack = root
        .auth(&srv.token("assistant", "7"), json!({"tournamentId": 2}))
        .await;
    assert_eq!(ack["body"]["rooms"], json!(["assistant", "assistant_2"]));

    // Engine.IO 4 on the notifications namespace: the same.
    let mut nsp = SioClient::connect(srv.addr, 4, NS).await;
    let ack = nsp
        .request("put", &[json!({"url": "/checkin/4", "data": {"x": 1}})])
        .await;
    assert_eq!(ack["statusCode"], 200, "{ack}");
    assert_eq!(ack["body"]["method"], "PUT");
    assert_eq!(ack["body"]["body"], json!({"x": 1}));
    // A method other than get/post on pulso's own url is not served.
    let ack = nsp.request("put", &[json!({"url": NS})]).await;
    assert_eq!(code_of(&ack), "401-1", "{ack}");

    // Malformed requests are answered here and never reach the backend.
    let before = backend.seen.load(Ordering::SeqCst);
    for bad in [
        json!({"url": "/x", "data": "text"}),
        json!({"url": "/x", "params": [1]}),
    ] {
        let ack = nsp.request("post", &[bad]).await;
        assert_eq!(code_of(&ack), "400-1", "{ack}");
    }
    let ack = nsp
        .request("get", &[json!({"url": "/x", "data": [1]})])
        .await;
    assert_eq!(code_of(&ack), "400-1", "{ack}");
    assert_eq!(backend.seen.load(Ordering::SeqCst), before);

    let metrics = srv.metrics().await;
    assert!(
        metrics.contains("pulso_socketio_proxy_requests_total{status=\"200\"} 8"),
        "{metrics}"
    );
    assert!(metrics.contains("pulso_socketio_proxy_requests_total{status=\"409\"} 1"));
    assert!(metrics.contains("pulso_socketio_proxy_requests_total{status=\"400\"} 3"));
    assert!(
        metrics.contains("pulso_socketio_proxy_latency_seconds_count 10"),
        "{metrics}"
    );
}

#[tokio::test]
async fn identity_headers_only_once_authenticated_and_client_headers_only_when_listed() {
    let backend = start_backend().await;
    let srv = pulso(
        &backend.url(),
        "proxy_headers = [\"X-Trace\", \"accept-language\"]",
    )
    .await;
    let mut c = SioClient::connect(srv.addr, 4, NS).await;
    let sent = json!({
        "authorization": "Bearer client-token",
        "X-Trace": "t-1",
        "accept-language": "es",
        "cookie": "a=b",
        "x-pulso-sub": "forged",
        "x-pulso-role": "admin",
        "X-Pulso-Claims": "{\"role\":\"admin\"}",
        "x-pulso-socket-id": "someone-else",
    });

    let ack = c
        .request("get", &[sails("get", "/me", json!({}), sent.clone())])
        .await;
    let h = &ack["body"]["headers"];
    assert_eq!(h["x-trace"], "t-1", "{ack}");
    assert_eq!(h["accept-language"], "es");
    for absent in [
        "authorization",
        "cookie",
        "x-pulso-sub",
        "x-pulso-role",
        "x-pulso-claims",
        "x-pulso-socket-id",
    ] {
        assert!(h.get(absent).is_none(), "{absent} reached the backend: {h}");
    }

    let token = token_claims(json!({
        "sub": "42", "role": "assistant", "name": "Ana Peña", "tournamentId": 2,
        "exp": (std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() + 3600),
    }));
    let ack = c.auth(&token, json!({})).await;
    assert_eq!(ack["statusCode"], 200, "{ack}");
    let ack = c
        .request("get", &[sails("get", "/me", json!({}), sent.clone())])
        .await;
    let h = &ack["body"]["headers"];
    assert_eq!(h["x-pulso-sub"], "42", "{h}");
    assert_eq!(h["x-pulso-role"], "assistant");
    assert_eq!(h["x-pulso-socket-id"], c.socket_id().as_str());
    let claims: Value = serde_json::from_str(h["x-pulso-claims"].as_str().unwrap()).unwrap();
    assert_eq!(claims["name"], "Ana Peña");
    assert_eq!(claims["tournamentId"], 2);
    assert!(h.get("authorization").is_none());

    // Listed, the client's Authorization does pass.
    let srv2 = pulso(&backend.url(), "proxy_headers = [\"authorization\"]").await;
    let mut c = SioClient::connect(srv2.addr, 4, NS).await;
    let ack = c
        .request("get", &[sails("get", "/me", json!({}), sent)])
        .await;
    assert_eq!(
        ack["body"]["headers"]["authorization"],
        "Bearer client-token"
    );
}

#[tokio::test]
async fn a_slow_backend_is_504_without_holding_up_the_socket_and_a_down_one_is_502() {
    let backend = start_backend().await;
    let srv = pulso(&backend.url(), "proxy_timeout = \"300ms\"").await;
    let mut c = SioClient::connect(srv.addr, 4, NS).await;
    let slow = c.send_request("get", &[json!({"url": "/slow"})]).await;
    let fast = c.send_request("get", &[json!({"url": "/fast"})]).await;
    // The fast request sent after the slow one is answered first.
    let (id, ack) = c.next_ack().await;
    assert_eq!(id, fast, "{ack}");
    assert_eq!(ack["statusCode"], 200);
    let (id, ack) = c.next_ack().await;
    assert_eq!(id, slow);
    assert_eq!(ack["statusCode"], 504, "{ack}");
    assert_eq!(code_of(&ack), "504-1");
    // And pulso's own url answers while a request waits on the backend.
    let slow = c.send_request("get", &[json!({"url": "/slow"})]).await;
    let ack = c.auth(&srv.token("timer", "1"), json!({})).await;
    assert_eq!(ack["statusCode"], 200);
    let (id, ack) = c.next_ack().await;
    assert_eq!((id, code_of(&ack)), (slow, "504-1"));

    // Nothing listens on the backend's port.
    let port = services::free_port();
    let down = pulso(&format!("http://127.0.0.1:{port}"), "").await;
    let mut c = SioClient::connect(down.addr, 3, NS).await;
    let ack = c
        .request("post", &[json!({"url": "/checkin", "data": {}})])
        .await;
    assert_eq!(ack["statusCode"], 502, "{ack}");
    assert_eq!(code_of(&ack), "502-1");
    // Still connected and served.
    let ack = c.auth(&down.token("timer", "1"), json!({})).await;
    assert_eq!(ack["statusCode"], 200);
    let metrics = down.metrics().await;
    assert!(metrics.contains("pulso_socketio_proxy_requests_total{status=\"502\"} 1"));
}

#[tokio::test]
async fn bodies_over_proxy_max_body_are_refused_both_ways() {
    let backend = start_backend().await;
    let srv = pulso(&backend.url(), "proxy_max_body = \"2KiB\"").await;
    let mut c = SioClient::connect(srv.addr, 4, NS).await;

    let ack = c
        .request(
            "post",
            &[json!({"url": "/quiet", "data": {"text": "z".repeat(2000)}})],
        )
        .await;
    assert_eq!(ack["statusCode"], 200, "under the limit: {ack}");
    assert_eq!(ack["body"]["received"], 2011);
    let before = backend.seen.load(Ordering::SeqCst);
    let ack = c
        .request(
            "post",
            &[json!({"url": "/quiet", "data": {"text": "z".repeat(3000)}})],
        )
        .await;
    assert_eq!(code_of(&ack), "413-1", "{ack}");
    assert_eq!(ack["statusCode"], 413);
    // A get's data goes in the query string, bounded the same.
    let ack = c
        .request(
            "get",
            &[json!({"url": "/quiet", "data": {"q": "z".repeat(3000)}})],
        )
        .await;
    assert_eq!(code_of(&ack), "413-1", "{ack}");
    assert_eq!(backend.seen.load(Ordering::SeqCst), before, "never sent");

    // An answer announced too large, and one that only turns out so.
    for url in ["/big", "/big-chunked"] {
        let ack = c.request("get", &[json!({ "url": url })]).await;
        assert_eq!(code_of(&ack), "502-2", "{url}: {ack}");
    }
    let ack = c.request("get", &[json!({"url": "/text"})]).await;
    assert_eq!(ack["body"], "plain words");
}

#[tokio::test]
async fn requests_in_flight_are_limited_per_connection_and_per_node() {
    let mut backend = start_backend().await;
    let srv = pulso(
        &backend.url(),
        "proxy_socket_concurrency = 2\nproxy_concurrency = 3",
    )
    .await;
    let mut a = SioClient::connect(srv.addr, 4, NS).await;
    let mut b = SioClient::connect(srv.addr, 3, NS).await;
    let hold = || [json!({"url": "/hold"})];

    let a1 = a.send_request("get", &hold()).await;
    let a2 = a.send_request("get", &hold()).await;
    for _ in 0..2 {
        tokio::time::timeout(common::WAIT, backend.arrived.recv())
            .await
            .unwrap();
    }
    // A third from the same connection is refused at once.
    let ack = a.request("get", &hold()).await;
    assert_eq!(
        (ack["statusCode"].clone(), code_of(&ack)),
        (json!(429), "429-2"),
        "{ack}"
    );
    // Another connection has room, until the node is full.
    let b1 = b.send_request("get", &hold()).await;
    tokio::time::timeout(common::WAIT, backend.arrived.recv())
        .await
        .unwrap();
    let ack = b.request("get", &hold()).await;
    assert_eq!(
        (ack["statusCode"].clone(), code_of(&ack)),
        (json!(503), "503-1"),
        "{ack}"
    );
    // Other traffic goes on meanwhile.
    let ack = b.auth(&srv.token("timer", "1"), json!({})).await;
    assert_eq!(ack["statusCode"], 200);

    backend.release.add_permits(3);
    let mut done = [a.next_ack().await, a.next_ack().await];
    done.sort_by_key(|(id, _)| *id);
    assert_eq!(done.iter().map(|(id, _)| *id).collect::<Vec<_>>(), [a1, a2]);
    assert!(done.iter().all(|(_, ack)| ack["statusCode"] == 200));
    let (id, ack) = b.next_ack().await;
    assert_eq!((id, ack["statusCode"].clone()), (b1, json!(200)));

    // The places are given back.
    backend.release.add_permits(2);
    let x = a.send_request("get", &hold()).await;
    let y = a.send_request("get", &hold()).await;
    let mut ids = [a.next_ack().await, a.next_ack().await];
    ids.sort_by_key(|(id, _)| *id);
    assert_eq!(ids[0].0, x);
    assert_eq!(ids[1].0, y);
    assert!(
        ids.iter().all(|(_, ack)| ack["statusCode"] == 200),
        "{ids:?}"
    );
}

async fn broadcast(srv: &TestServer, room: &str, data: Value) -> u64 {
    let (status, body) = srv
        .post(
            "/api/broadcast",
            json!({"rooms": room, "event": "checkin", "data": data}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    body["recipients"].as_u64().unwrap()
}

#[tokio::test]
async fn the_backend_joins_and_leaves_rooms_that_then_get_broadcasts() {
    let backend = start_backend().await;
    let srv = pulso(&backend.url(), "proxy_rooms = true").await;
    // In the root namespace too, so that the connection outlives its
    // notifications socket (below).
    let mut c = SioClient::connect(srv.addr, 4, "/").await;
    c.join(NS).await;

    // Not authenticated: the answer's rooms are not joined.
    let ack = c
        .request("get", &[json!({"url": "/rooms/join?rooms=tournament_2"})])
        .await;
    assert_eq!(ack["statusCode"], 200);
    assert!(ack["headers"].get("x-pulso-join").is_none(), "{ack}");
    assert_eq!(broadcast(&srv, "tournament_2", json!({})).await, 0);

    let ack = c.auth(&srv.token("assistant", "9"), json!({})).await;
    assert_eq!(ack["body"]["rooms"], json!(["assistant"]));
    let ack = c
        .request(
            "get",
            &[json!({"url": "/rooms/join?rooms=tournament_2,%20stage.1%20,bad%2Fname%2F%23,a%20b"})],
        )
        .await;
    assert_eq!(ack["statusCode"], 200, "{ack}");
    assert!(ack["headers"].get("x-pulso-join").is_none(), "{ack}");
    // Once the ack is in, broadcasts reach the socket.
    assert_eq!(broadcast(&srv, "tournament_2", json!({"id": 4})).await, 1);
    let (event, args) = c.event().await;
    assert_eq!((event.as_str(), &args[0]), ("checkin", &json!({"id": 4})));
    assert_eq!(broadcast(&srv, "stage.1", json!({})).await, 1);
    c.event().await;
    // Wildcards are not rooms.
    assert_eq!(broadcast(&srv, "bad/name/x", json!({})).await, 0);

    // Leaving: its own rooms stay; pulso's (template, own id) cannot be left.
    let ack = c
        .request(
            "post",
            &[json!({"url": "/rooms/leave?rooms=tournament_2,assistant"})],
        )
        .await;
    assert_eq!(ack["statusCode"], 200);
    assert_eq!(broadcast(&srv, "tournament_2", json!({})).await, 0);
    assert_eq!(broadcast(&srv, "stage.1", json!({"still": true})).await, 1);
    assert_eq!(c.event().await.1[0], json!({"still": true}));
    assert_eq!(broadcast(&srv, "assistant", json!({"role": true})).await, 1);
    assert_eq!(c.event().await.1[0], json!({"role": true}));

    // A socket that leaves its namespace leaves the backend's rooms too
    // (its connection stays, in the root namespace).
    c.send_raw(&format!("41{NS},")).await;
    srv.until("the socket left its rooms", |gw| {
        gw.hub.reach(&["stage.1".into()]) == 0
    })
    .await;
}

#[tokio::test]
async fn without_proxy_rooms_the_join_header_is_ignored() {
    let backend = start_backend().await;
    let srv = pulso(&backend.url(), "").await;
    let mut c = SioClient::connect(srv.addr, 4, NS).await;
    c.auth(&srv.token("assistant", "9"), json!({})).await;
    let ack = c
        .request("get", &[json!({"url": "/rooms/join?rooms=tournament_2"})])
        .await;
    assert_eq!(ack["statusCode"], 200);
    assert_eq!(ack["body"], json!({"ok": "join"}));
    assert_eq!(broadcast(&srv, "tournament_2", json!({})).await, 0);
}

#[tokio::test]
async fn without_proxy_url_other_urls_stay_404() {
    let srv = TestServer::start().await;
    let mut c = SioClient::connect(srv.addr, 4, NS).await;
    c.auth(&srv.token("assistant", "9"), json!({})).await;
    let ack = c.request("get", &[json!({"url": "/tournament/2"})]).await;
    assert_eq!(code_of(&ack), "404-1", "{ack}");
    let ack = c
        .request("delete", &[json!({"url": "/tournament/2"})])
        .await;
    assert_eq!(code_of(&ack), "404-1", "{ack}");
}

#[tokio::test]
async fn proxy_settings_are_checked() {
    use pulso::config::{Config, Layered};
    let check = |toml: &str| {
        let mut l = Layered::defaults();
        l.apply_toml(&common::base_toml()).unwrap();
        l.apply_toml(toml).unwrap();
        Config::from_layered(&l).map(|_| ()).map_err(|e| e.0)
    };
    assert!(check("[socketio]\nproxy_url = \"http://127.0.0.1:3000/api/\"").is_ok());
    for (toml, says) in [
        (
            "[socketio]\nproxy_url = \"https://app:443\"",
            "only http://",
        ),
        ("[socketio]\nproxy_url = \"app:3000\"", "socketio.proxy_url"),
        (
            "[socketio]\nproxy_url = \"http://u:p@app\"",
            "socketio.proxy_url",
        ),
        (
            "[socketio]\nproxy_url = \"http://app\"\nproxy_headers = [\"x-pulso-sub\"]",
            "set by pulso",
        ),
        (
            "[socketio]\nproxy_url = \"http://app\"\nproxy_headers = [\"host\"]",
            "set by pulso",
        ),
        (
            "[socketio]\nproxy_url = \"http://app\"\nproxy_headers = [\"a b\"]",
            "not a header name",
        ),
        (
            "[socketio]\nproxy_url = \"http://app\"\nproxy_timeout = \"0s\"",
            "socketio.proxy_timeout",
        ),
        (
            "[socketio]\nproxy_url = \"http://app\"\nproxy_concurrency = 0",
            "socketio.proxy_concurrency",
        ),
    ] {
        let err = check(toml).expect_err(toml);
        assert!(err.contains(says), "{toml}: {err}");
    }
}

/// A cluster node over `redis` and `pg` in front of `backend`.
async fn cluster_node(redis: &str, pg: &str, prefix: &str, backend: &str, n: u32) -> TestServer {
    let toml = format!(
        "node_id = \"proxy-{prefix}-{n}\"\ndatabase_url = \"{pg}\"\n[cluster]\nredis_url = \"{redis}\"\nprefix = \"{prefix}\"\n[socketio]\nproxy_url = \"{backend}\"\nproxy_rooms = true\n"
    );
    TestServer::start_ready(&toml).await
}

#[tokio::test]
async fn in_a_cluster_a_room_the_backend_joined_gets_broadcasts_made_on_another_node() {
    let Some(pg) = services::postgres_url().await else {
        return;
    };
    let Some(redis) = services::RedisServer::start().await else {
        return;
    };
    let backend = start_backend().await;
    let prefix = format!("proxy{}", std::process::id());
    let a = cluster_node(&redis.url(), &pg, &prefix, &backend.url(), 1).await;
    let b = cluster_node(&redis.url(), &pg, &prefix, &backend.url(), 2).await;

    let mut c = SioClient::connect(a.addr, 4, NS).await;
    c.auth(&a.token("assistant", "cluster-1"), json!({})).await;
    let ack = c
        .request("get", &[json!({"url": "/rooms/join?rooms=tournament_77"})])
        .await;
    assert_eq!(ack["statusCode"], 200, "{ack}");
    // The ack waited for node A's backplane subscription: a broadcast made
    // on node B right after it reaches the socket.
    let (status, body) = b
        .post(
            "/api/broadcast",
            json!({"rooms": "tournament_77", "event": "checkin", "data": {"from": "b"}}),
        )
        .await;
    assert_eq!(
        (status, body["cluster"].clone()),
        (200, json!(true)),
        "{body}"
    );
    let (event, args) = c.event().await;
    assert_eq!(
        (event.as_str(), &args[0]),
        ("checkin", &json!({"from": "b"}))
    );
}
