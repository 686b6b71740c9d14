//! Clustering (SPEC §8): three pulso nodes against a `redis-server` or a
//! `nats-server` of the test's own and the machine's PostgreSQL, driven
//! with real `/ws` and Socket.IO clients. Each scenario runs once per
//! engine (`<scenario>::redis`, `<scenario>::nats`), with its own server
//! and its own `cluster.prefix`.

mod common;
#[path = "support/services.rs"]
mod services;
#[path = "support/sio_client.rs"]
mod sio_client;

use common::{TestServer, WsClient};
use serde_json::{Value, json};
use services::{NatsServer, RedisServer, postgres_url};
use sio_client::SioClient;

const NS: &str = "/notifications";

fn unique(tag: &str) -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    format!(
        "{tag}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// The engine a scenario runs on.
#[derive(Clone, Copy, Debug)]
enum Engine {
    Redis,
    Nats,
}

/// Runs each scenario once per engine, as the tests `<scenario>::redis`
/// and `<scenario>::nats`.
macro_rules! on_each_engine {
    ($($scenario:ident),* $(,)?) => {$(
        mod $scenario {
            #[tokio::test]
            async fn redis() {
                super::$scenario(super::Engine::Redis).await
            }
            #[tokio::test]
            async fn nats() {
                super::$scenario(super::Engine::Nats).await
            }
        }
    )*};
}

on_each_engine!(
    publishes_and_broadcasts_reach_every_node_once_on_both_protocols,
    a_topics_messages_arrive_in_the_same_order_on_every_connection,
    a_node_receives_only_what_its_clients_want,
    subscriptions_coming_and_going_lose_and_repeat_nothing,
    while_the_backplane_is_down_nodes_serve_locally_then_resubscribe,
);

/// A private engine server.
enum Server {
    Redis(RedisServer),
    Nats(NatsServer),
}

impl Server {
    /// Starts one, or `None` when its binary is missing.
    async fn start(engine: Engine) -> Option<Server> {
        match engine {
            Engine::Redis => RedisServer::start().await.map(Server::Redis),
            Engine::Nats => NatsServer::start().await.map(Server::Nats),
        }
    }

    /// The `[cluster]` setting that names it.
    fn setting(&self) -> String {
        match self {
            Server::Redis(r) => format!("redis_url = \"{}\"", r.url()),
            Server::Nats(n) => format!("nats_url = \"{}\"", n.url()),
        }
    }

    fn kill(&mut self) {
        match self {
            Server::Redis(r) => r.kill(),
            Server::Nats(n) => n.kill(),
        }
    }

    async fn restart(&mut self) {
        match self {
            Server::Redis(r) => r.restart().await,
            Server::Nats(n) => n.restart().await,
        }
    }
}

/// A node of a cluster on `server` with `prefix`.
async fn node(server: &Server, pg: &str, prefix: &str) -> TestServer {
    let toml = format!(
        "node_id = \"{}\"\ndatabase_url = \"{pg}\"\n[cluster]\n{}\nprefix = \"{prefix}\"\n[acl.admin]\npublish = [\"#\"]\n",
        unique("node"),
        server.setting(),
    );
    let node = TestServer::start_with(move |l| {
        l.apply_toml(&common::base_toml()).unwrap();
        l.apply_toml(&toml).unwrap();
    })
    .await;
    node.until("backplane up", |gw| gw.readiness.report().0)
        .await;
    node
}

/// Three nodes, or `None` when the engine or PostgreSQL is missing.
async fn cluster(engine: Engine) -> Option<(Server, [TestServer; 3])> {
    let pg = postgres_url().await?;
    let server = Server::start(engine).await?;
    let prefix = unique("c");
    let a = node(&server, &pg, &prefix).await;
    let b = node(&server, &pg, &prefix).await;
    let c = node(&server, &pg, &prefix).await;
    Some((server, [a, b, c]))
}

/// A `/ws` client on `node` subscribed to `filters` (each ack waits for
/// the backplane).
async fn subscriber(node: &TestServer, filters: &[&str]) -> WsClient {
    let mut ws = node.ws("assistant", &unique("ws")).await;
    for f in filters {
        let ack = ws.sub(f).await;
        assert_eq!(ack["type"], "ack", "{ack}");
    }
    ws
}

/// The `topic` and `payload` of the next published message.
async fn next(ws: &mut WsClient) -> (String, Value) {
    let m = ws.recv().await;
    (
        m["topic"].as_str().unwrap_or_default().to_string(),
        m["payload"].clone(),
    )
}

async fn publishes_and_broadcasts_reach_every_node_once_on_both_protocols(engine: Engine) {
    let Some((_server, [a, b, c])) = cluster(engine).await else {
        return;
    };
    // Overlapping filters on one connection, one filter on another node.
    let mut on_a = subscriber(&a, &["x/1", "x/+", "x/#"]).await;
    let mut on_b = subscriber(&b, &["x/#"]).await;
    let mut ws_c = subscriber(&c, &["timer"]).await;
    let mut sio_c = SioClient::connect(c.addr, 4, NS).await;
    let ack = sio_c.auth(&c.token("timer", &unique("t")), json!({})).await;
    assert_eq!(ack["statusCode"], 200, "{ack}");

    // Published on A: A's subscriber gets it once, B's too, C nothing.
    let (status, body) = a.publish("x/1", json!(1)).await;
    assert_eq!(
        (status, body),
        (200, json!({"recipients": 1, "cluster": true}))
    );
    assert_eq!(next(&mut on_a).await, ("x/1".into(), json!(1)));
    assert_eq!(next(&mut on_b).await, ("x/1".into(), json!(1)));

    // A broadcast on B naming a room of C and a topic of A and B.
    let (status, body) = b
        .post(
            "/api/broadcast",
            json!({"rooms": ["timer", "x/2"], "event": "ring", "data": {"n": 2}}),
        )
        .await;
    assert_eq!(
        (status, body),
        (200, json!({"recipients": 1, "cluster": true}))
    );
    assert_eq!(next(&mut on_a).await, ("x/2".into(), json!({"n": 2})));
    assert_eq!(next(&mut on_b).await, ("x/2".into(), json!({"n": 2})));
    assert_eq!(next(&mut ws_c).await, ("timer".into(), json!({"n": 2})));
    assert_eq!(sio_c.event().await, ("ring".into(), vec![json!({"n": 2})]));

    // A socket-id room reaches that socket on its node from any node.
    let (_, body) = a
        .post(
            "/api/broadcast",
            json!({"rooms": sio_c.socket_id(), "event": "own", "data": 3}),
        )
        .await;
    assert_eq!(body, json!({"recipients": 0, "cluster": true}));
    assert_eq!(sio_c.event().await, ("own".into(), vec![json!(3)]));

    // A `/ws` `pub` on C reaches A and B.
    let mut publisher = c.ws("admin", &unique("pub")).await;
    let ack = publisher
        .request(json!({"type":"pub","topic":"x/3","payload":4}), 1)
        .await;
    assert_eq!(ack["type"], "ack", "{ack}");
    assert_eq!(next(&mut on_a).await, ("x/3".into(), json!(4)));
    assert_eq!(next(&mut on_b).await, ("x/3".into(), json!(4)));

    // No second copy of anything: the next message is a fresh one.
    a.publish("x/end", json!("end")).await;
    c.post(
        "/api/broadcast",
        json!({"rooms": "timer", "event": "end", "data": 0}),
    )
    .await;
    assert_eq!(next(&mut on_a).await, ("x/end".into(), json!("end")));
    assert_eq!(next(&mut on_b).await, ("x/end".into(), json!("end")));
    assert_eq!(next(&mut ws_c).await, ("timer".into(), json!(0)));
    assert_eq!(sio_c.event().await, ("end".into(), vec![json!(0)]));
}

async fn a_topics_messages_arrive_in_the_same_order_on_every_connection(engine: Engine) {
    let Some((_server, nodes)) = cluster(engine).await else {
        return;
    };
    let mut subs = Vec::new();
    for n in &nodes {
        subs.push(subscriber(n, &["ord"]).await);
        subs.push(subscriber(n, &["ord", "#"]).await);
    }
    // Every node publishes at once, interleaved.
    let per_node = 60;
    let publishers = nodes.iter().enumerate().map(|(i, n)| async move {
        for k in 0..per_node {
            let (status, _) = n.publish("ord", json!(format!("{i}-{k}"))).await;
            assert_eq!(status, 200);
        }
    });
    futures_util::future::join_all(publishers).await;
    let mut orders = Vec::new();
    for ws in &mut subs {
        let mut got = Vec::new();
        for _ in 0..per_node * nodes.len() {
            got.push(next(ws).await.1);
        }
        orders.push(got);
    }
    // The two connections of a node see one order.
    for (n, pair) in orders.chunks(2).enumerate() {
        assert_eq!(pair[0], pair[1], "one order on node {n}");
    }
    match engine {
        // Redis hands every subscriber one order.
        Engine::Redis => {
            for o in &orders[1..] {
                assert_eq!(o, &orders[0], "one order on every connection");
            }
        }
        // NATS orders the messages of each publisher only: nodes that
        // publish at the same instant may be received in either order.
        Engine::Nats => {}
    }
    // Every connection gets each node's messages in the order it published
    // them.
    for order in &orders {
        for i in 0..nodes.len() {
            let own: Vec<&Value> = order
                .iter()
                .filter(|v| v.as_str().is_some_and(|s| s.starts_with(&format!("{i}-"))))
                .collect();
            let want: Vec<Value> = (0..per_node).map(|k| json!(format!("{i}-{k}"))).collect();
            assert_eq!(own, want.iter().collect::<Vec<_>>());
        }
    }
}

/// While one node publishes without pause, a client on another node
/// subscribes a filter overlapping what a first client there wants, then
/// the first client leaves and the node's subscription for it goes: the
/// second client gets every message from its first one on, once, in order.
async fn subscriptions_coming_and_going_lose_and_repeat_nothing(engine: Engine) {
    use std::sync::atomic::{AtomicBool, Ordering};
    let Some((_server, [a, b, _c])) = cluster(engine).await else {
        return;
    };
    let mut first = subscriber(&b, &["flow"]).await;
    let (count, published) = tokio::sync::watch::channel(0u64);
    let done = AtomicBool::new(false);
    let publishing = async {
        let mut k = 0u64;
        while !done.load(Ordering::Acquire) {
            let (status, _) = a.publish("flow", json!(k)).await;
            assert_eq!(status, 200);
            k += 1;
            count.send_replace(k);
        }
        k
    };
    let driving = async {
        let after = |n: u64| {
            let from = *published.borrow();
            let mut published = published.clone();
            async move {
                let waited =
                    tokio::time::timeout(common::WAIT, published.wait_for(|k| *k >= from + n))
                        .await;
                assert!(waited.is_ok(), "publishes go on");
            }
        };
        after(20).await;
        // `#` is subscribed on B after `flow`, while `flow` flows.
        let second = subscriber(&b, &["#"]).await;
        after(20).await;
        // The first client leaves (its ack is read below); B leaves `flow`
        // a little later and keeps receiving it through `#`.
        first
            .send(json!({"type":"unsub","topic":"flow","id":7}))
            .await;
        let subs = |gw: &pulso::gateway::Gateway| gw.metrics.cluster_subscriptions.get();
        let before = subs(&b.gw);
        b.until("B leaves `flow`", |gw| subs(gw) < before).await;
        after(20).await;
        done.store(true, Ordering::Release);
        second
    };
    let (last, mut second) = tokio::join!(publishing, driving);
    let (topic, payload) = next(&mut second).await;
    assert_eq!(topic, "flow");
    let from = payload.as_u64().unwrap();
    for k in from + 1..last {
        assert_eq!(next(&mut second).await, ("flow".into(), json!(k)));
    }
    // The first client got a run from 0, in order, until it left.
    let mut k = 0;
    loop {
        let m = first.recv().await;
        if m["id"] == 7 {
            assert_eq!(m["type"], "ack", "{m}");
            break;
        }
        assert_eq!(
            (m["topic"].clone(), m["payload"].clone()),
            (json!("flow"), json!(k))
        );
        k += 1;
    }
    // Nothing more for the second: the next message is a fresh one.
    a.publish("flow", json!("end")).await;
    assert_eq!(next(&mut second).await, ("flow".into(), json!("end")));
}

/// `pulso_cluster_messages_total{kind="received"}` of a node.
async fn received(node: &TestServer) -> u64 {
    let m = node.metrics().await;
    m.lines()
        .find(|l| l.starts_with("pulso_cluster_messages_total{kind=\"received\"}"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

async fn a_node_receives_only_what_its_clients_want(engine: Engine) {
    let Some((_server, [a, b, c])) = cluster(engine).await else {
        return;
    };
    let mut on_b = subscriber(&b, &["wanted/+"]).await;
    let mut on_c = subscriber(&c, &["marker"]).await;
    for n in 0..20 {
        a.publish(&format!("wanted/{n}"), json!(n)).await;
    }
    for n in 0..20 {
        assert_eq!(next(&mut on_b).await, (format!("wanted/{n}"), json!(n)));
    }
    // C hears its own topic, and nothing of the twenty before it.
    a.publish("marker", json!("m")).await;
    assert_eq!(next(&mut on_c).await, ("marker".into(), json!("m")));
    assert_eq!(received(&c).await, 1);
    assert_eq!(received(&b).await, 20);
    // A, with no subscriber at all, receives nothing, not even its own.
    assert_eq!(received(&a).await, 0);
}

async fn while_the_backplane_is_down_nodes_serve_locally_then_resubscribe(engine: Engine) {
    let Some((mut server, [a, b, _c])) = cluster(engine).await else {
        return;
    };
    let mut on_a = subscriber(&a, &["t/+"]).await;
    server.kill();
    a.until("backplane down", |gw| !gw.readiness.report().0)
        .await;
    let (status, body) = common::get_json(&a.url("/readyz"), None).await;
    assert_eq!(status, 503);
    assert_eq!(body["checks"]["cluster"], "down", "{body}");
    // A local publish still reaches the local client.
    let (status, body) = a.publish("t/1", json!(1)).await;
    assert_eq!((status, body["recipients"].clone()), (200, json!(1)));
    assert_eq!(next(&mut on_a).await, ("t/1".into(), json!(1)));
    assert!(a.metrics().await.contains("pulso_cluster_up 0"));

    server.restart().await;
    a.until("backplane up again", |gw| gw.readiness.report().0)
        .await;
    b.until("backplane up again", |gw| gw.readiness.report().0)
        .await;
    // A subscribed again to what its client wants: B's publish reaches it.
    b.publish("t/2", json!(2)).await;
    assert_eq!(next(&mut on_a).await, ("t/2".into(), json!(2)));
    let m = a.metrics().await;
    assert!(m.contains("pulso_cluster_reconnects_total 1"), "{m}");
}

#[tokio::test]
async fn cluster_settings_are_checked() {
    use pulso::config::{Config, Layered};
    let check = |toml: &str| {
        let mut l = Layered::defaults();
        l.apply_toml(toml).unwrap();
        Config::from_layered(&l).err().map(|e| e.to_string())
    };
    let both = check("[cluster]\nredis_url = \"redis://h\"\nnats_url = \"nats://h\"\n");
    assert!(both.is_some_and(|e| e.contains("cluster.redis_url")));
    let sqlite = check("database_url = \"sqlite://x.db\"\n[cluster]\nredis_url = \"redis://h\"\n");
    assert!(sqlite.is_some_and(|e| e.contains("database_url") && e.contains("PostgreSQL")));
    let prefix = check("[cluster]\nprefix = \"a b\"\n");
    assert!(prefix.is_some_and(|e| e.contains("cluster.prefix")));
    let url = check("database_url = \"postgres://h/db\"\n[cluster]\nredis_url = \"http://h\"\n");
    assert!(url.is_some_and(|e| e.contains("cluster.redis_url")));
    assert!(
        check("database_url = \"postgres://h/db\"\n[cluster]\nredis_url = \"redis://h\"\n")
            .is_none()
    );
    let url = check("database_url = \"postgres://h/db\"\n[cluster]\nnats_url = \"redis://h\"\n");
    assert!(url.is_some_and(|e| e.contains("cluster.nats_url")));
    assert!(
        check("database_url = \"postgres://h/db\"\n[cluster]\nnats_url = \"nats://h:4222\"\n")
            .is_none()
    );
}

/// The NATS subjects of filters, subscribed on a real `nats-server`, get
/// exactly the topics the filters match (MQTT semantics): escaped dots and
/// spaces, literal `+` and `#` inside names, empty levels, and `a/#`
/// matching `a` itself.
#[tokio::test]
async fn nats_subjects_match_what_filters_match() {
    use futures_util::StreamExt;
    use pulso::cluster::channel::{nats_subject, nats_subjects};
    use pulso::hub::Filter;
    let Some(nats) = NatsServer::start().await else {
        return;
    };
    let client = async_nats::connect(nats.url()).await.unwrap();
    let filters = [
        "a/+", "a/#", "#", "+/b", "+", "+/#", "a/+/c", "x/+", "a.b", "a b", "/#",
    ];
    let topics = [
        "a",
        "a/b",
        "a/b/c",
        "a/x/c",
        "a.b",
        "a b",
        "/notifications#Ab3",
        "x/+",
        "x/y",
        "b",
        "c/b",
        "a/",
        "/b",
        "a//b",
        "~",
        "a~2Eb",
        "*",
        ">",
    ];
    let mut subscriptions = Vec::new();
    for f in filters {
        let filter = Filter::parse(f).unwrap();
        let mut streams = Vec::new();
        for subject in nats_subjects("p", &filter) {
            streams.push(client.subscribe(subject).await.unwrap());
        }
        subscriptions.push((filter, futures_util::stream::select_all(streams)));
    }
    // The server handles one connection's commands in order: every
    // subscription above is in place before the first publish.
    for t in topics {
        client
            .publish(nats_subject("p", t), t.as_bytes().to_vec().into())
            .await
            .unwrap();
    }
    // Sent last on the same connection: once it is back, every copy of the
    // publishes before it is in its subscription's queue.
    let mut end = client.subscribe("p.end").await.unwrap();
    client.publish("p.end", "".into()).await.unwrap();
    tokio::time::timeout(common::WAIT, end.next())
        .await
        .expect("the end marker in time");
    for (filter, mut stream) in subscriptions {
        let mut got = Vec::new();
        while let Some(Some(m)) = futures_util::FutureExt::now_or_never(stream.next()) {
            got.push(String::from_utf8(m.payload.to_vec()).unwrap());
        }
        got.sort();
        let mut want: Vec<String> = topics
            .iter()
            .filter(|t| filter.matches(t))
            .map(|t| t.to_string())
            .collect();
        want.sort();
        assert_eq!(got, want, "filter {}", filter.as_str());
    }
}
