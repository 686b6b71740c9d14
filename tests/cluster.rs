//! Clustering (SPEC §8): three pulso nodes against a `redis-server` or a
//! `nats-server` of the test's own and the machine's PostgreSQL, driven
//! with real `/ws` and Socket.IO clients. Each scenario runs once per
//! engine (`<scenario>::redis`, `<scenario>::nats`), with its own server
//! and its own `cluster.prefix`. The node-liveness tests also run the real
//! `pulso` binary, to `kill -9` it or to see it refuse to start.

mod common;
#[path = "support/services.rs"]
mod services;
#[path = "support/sio_client.rs"]
mod sio_client;

use common::{TestServer, WsClient, unique};
use serde_json::{Value, json};
use services::{NatsServer, RedisServer, postgres_url};
use sio_client::SioClient;

const NS: &str = "/notifications";

/// The engine a scenario runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
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
    a_subscribed_node_stays_connected_across_pings,
    publishes_and_broadcasts_reach_every_node_once_on_both_protocols,
    a_topics_messages_arrive_in_the_same_order_on_every_connection,
    many_concurrent_publishers_still_give_one_order,
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
    node_with(server, pg, prefix, "").await
}

/// [`node`] with more settings (TOML).
async fn node_with(server: &Server, pg: &str, prefix: &str, extra: &str) -> TestServer {
    let toml = format!(
        "node_id = \"{}\"\ndatabase_url = \"{pg}\"\n[cluster]\n{}\nprefix = \"{prefix}\"\n[acl.admin]\npublish = [\"#\"]\n{extra}",
        unique("node"),
        server.setting(),
    );
    TestServer::start_ready(&toml).await
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
    // Redis hands every subscriber one order; with NATS the backplane's
    // stream makes one.
    for o in &orders[1..] {
        assert_eq!(o, &orders[0], "one order on every connection ({engine:?})");
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

/// Publishes `per_node` messages (`"<node>-<k>"`) to `topic` through each
/// of `nodes`, from `publishers` concurrent publishers per node.
async fn publish_from_every_node(
    nodes: &[TestServer],
    topic: &str,
    per_node: usize,
    publishers: usize,
) {
    let all = nodes.iter().enumerate().flat_map(|(i, n)| {
        (0..publishers).map(move |p| async move {
            for k in (p..per_node).step_by(publishers) {
                let (status, _) = n.publish(topic, json!(format!("{i}-{k}"))).await;
                assert_eq!(status, 200);
            }
        })
    });
    futures_util::future::join_all(all).await;
}

/// Many publishes at once on every node, more than the engine can hand
/// out one by one: every connection of the cluster still gets them in one
/// order. (With core NATS alone, where each publishing connection is fanned
/// out on its own, the subscribers disagree here.)
async fn many_concurrent_publishers_still_give_one_order(engine: Engine) {
    let Some((_server, nodes)) = cluster(engine).await else {
        return;
    };
    let mut subs = Vec::new();
    for n in &nodes {
        subs.push(subscriber(n, &["burst"]).await);
    }
    let per_node = 400;
    publish_from_every_node(&nodes, "burst", per_node, 8).await;
    let mut orders = Vec::new();
    for ws in &mut subs {
        let mut got = Vec::new();
        for _ in 0..per_node * nodes.len() {
            got.push(next(ws).await.1);
        }
        orders.push(got);
    }
    let differ = |o: &Vec<Value>| o.iter().zip(&orders[0]).filter(|(a, b)| a != b).count();
    for o in &orders[1..] {
        assert_eq!(
            differ(o),
            0,
            "positions that differ from the first connection's ({engine:?})"
        );
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

/// Redis stops answering without closing anything (frozen with SIGSTOP, as
/// a hung server or a silent link): a publish made meanwhile reaches the
/// publishing node's own client once the engine's command times out, the
/// node notices the silent connection by its ping and says so, and once
/// Redis answers again the node reconnects and cross-node delivery resumes.
#[tokio::test]
async fn a_frozen_redis_is_detected_and_local_clients_keep_being_served() {
    let Some((server, [a, b, _c])) = cluster(Engine::Redis).await else {
        return;
    };
    let Server::Redis(redis) = &server else {
        unreachable!("a Redis cluster")
    };
    let mut on_a = subscriber(&a, &["t/+"]).await;
    redis.freeze();
    let (status, _) = a.publish("t/1", json!(1)).await;
    assert_eq!(status, 200, "the publish is answered at once");
    // Within the engine's command timeout (3 s), not never.
    assert_eq!(next(&mut on_a).await, ("t/1".into(), json!(1)));
    // A ping every 5 s, unanswered after 3 s: down within about 8 s.
    let long = std::time::Duration::from_secs(15);
    a.until_within("the silence detected", long, |gw| !gw.readiness.report().0)
        .await;
    let (status, body) = common::get_json(&a.url("/readyz"), None).await;
    assert_eq!(
        (status, body["checks"]["cluster"].clone()),
        (503, json!("down"))
    );
    redis.thaw();
    for node in [&a, &b] {
        node.until_within("reconnected", long, |gw| gw.readiness.report().0)
            .await;
    }
    b.publish("t/2", json!(2)).await;
    assert_eq!(next(&mut on_a).await, ("t/2".into(), json!(2)));
    assert!(metric(&a, "pulso_cluster_reconnects_total").await >= 1);
}

/// A publish whose batch Redis does not confirm within the command timeout
/// is delivered on its own node at once; when Redis runs it after all (it
/// was only slow), the copy that comes back is dropped, not delivered again.
#[tokio::test]
async fn a_publish_confirmed_too_late_is_delivered_once() {
    let Some((server, [a, b, _c])) = cluster(Engine::Redis).await else {
        return;
    };
    let Server::Redis(redis) = &server else {
        unreachable!("a Redis cluster")
    };
    let mut on_a = subscriber(&a, &["late/+"]).await;
    redis.freeze();
    a.publish("late/1", json!(1)).await;
    // Delivered here once the batch timed out (3 s)…
    assert_eq!(next(&mut on_a).await, ("late/1".into(), json!(1)));
    // …and Redis, thawed, runs the batch it had received.
    redis.thaw();
    let long = std::time::Duration::from_secs(15);
    for node in [&a, &b] {
        node.until_within("up", long, |gw| gw.readiness.report().0)
            .await;
    }
    b.publish("late/2", json!(2)).await;
    assert_eq!(
        next(&mut on_a).await,
        ("late/2".into(), json!(2)),
        "late/1 once only"
    );
}

/// The backplane connection is pinged every 5 s (a subscribed Redis
/// connection answers `["pong", ""]`), and an answer must count as alive.
/// The test lets one ping period pass (nothing to await: what is checked
/// is that nothing happens), then checks that no node reconnected and no
/// publish was delivered locally only.
async fn a_subscribed_node_stays_connected_across_pings(engine: Engine) {
    let Some((_server, [a, b, _c])) = cluster(engine).await else {
        return;
    };
    let mut on_b = subscriber(&b, &["kept"]).await;
    tokio::time::sleep(std::time::Duration::from_secs(6)).await;
    a.publish("kept", json!(1)).await;
    assert_eq!(next(&mut on_b).await, ("kept".into(), json!(1)));
    assert_eq!(metric(&b, "pulso_cluster_reconnects_total").await, 0);
    assert_eq!(metric(&a, "pulso_cluster_reconnects_total").await, 0);
    let unsent = "pulso_cluster_messages_total{kind=\"unsent\"}";
    assert_eq!(metric(&a, unsent).await, 0);
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

// ---- Nodes, heartbeats and presence ---------------------------------------

use std::time::{Duration, Instant};

/// Fast liveness clocks, so a dead node is found within 1.2 s.
const HEARTBEAT: Duration = Duration::from_millis(200);
const NODE_TTL: Duration = Duration::from_secs(1);
/// What measuring adds to a bound: polling (20 ms), HTTP, PostgreSQL, on a
/// busy two-core machine.
const SLACK: Duration = Duration::from_millis(500);

/// A cluster prefix no earlier run of the tests used (a node judges the
/// heartbeats of its own cluster, and these tests count what it cleans).
fn fresh_prefix() -> String {
    format!("{}-{:08x}", unique("c"), rand::random::<u32>())
}

/// A node with the fast clocks, named `id`.
async fn fast_node(redis: &str, pg: &str, prefix: &str, id: &str) -> TestServer {
    let toml = format!(
        "node_id = \"{id}\"\ndatabase_url = \"{pg}\"\n[cluster]\nredis_url = \"{redis}\"\nprefix = \"{prefix}\"\nheartbeat = \"200ms\"\nnode_ttl = \"1s\"\n"
    );
    TestServer::start_ready(&toml).await
}

/// PostgreSQL, a `redis-server` of the test's own and a fresh prefix:
/// what the node-lifecycle tests start from (`None`: skipped).
async fn lifecycle_setup() -> Option<(String, RedisServer, String)> {
    let pg = postgres_url().await?;
    let redis = RedisServer::start().await?;
    Some((pg, redis, fresh_prefix()))
}

/// An authenticated `/ws` client of the node at `at`, once the node at
/// `seen` lists its presence row (whichever node holds it).
async fn client_with_row(
    at: std::net::SocketAddr,
    seen: std::net::SocketAddr,
    sub: &str,
) -> WsClient {
    let token = common::token("assistant", sub, Some(Duration::from_secs(60)));
    let client = WsClient::connect(&format!("ws://{at}/ws?token={token}")).await;
    within(common::WAIT, "the client's row", || async {
        holder(seen, sub).await.is_some()
    })
    .await;
    client
}

/// The real `pulso` binary as a cluster node with the fast clocks, so it
/// can be `kill -9`ed; killed when dropped.
struct Process {
    child: std::process::Child,
    addr: std::net::SocketAddr,
    log: std::path::PathBuf,
}

impl Process {
    /// `engine`: the backplane's URL, `redis://…` or `nats://…`.
    fn command(engine: &str, pg: &str, prefix: &str, id: &str) -> (std::process::Command, u16) {
        let engine_var = if engine.starts_with("nats://") {
            "PULSO_CLUSTER_NATS_URL"
        } else {
            "PULSO_CLUSTER_REDIS_URL"
        };
        let port = services::free_port();
        let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_pulso"));
        for (k, _) in std::env::vars() {
            if k.starts_with("PULSO_") {
                c.env_remove(k);
            }
        }
        c.current_dir(std::env::temp_dir())
            .env("PULSO_LISTEN", format!("127.0.0.1:{port}"))
            .env("PULSO_NODE_ID", id)
            .env("PULSO_DATABASE_URL", pg)
            .env(engine_var, engine)
            .env("PULSO_CLUSTER_PREFIX", prefix)
            .env("PULSO_CLUSTER_HEARTBEAT", "200ms")
            .env("PULSO_CLUSTER_NODE_TTL", "1s")
            .env("PULSO_JWT_SECRET", common::SECRET)
            .env("PULSO_DEMO_ENABLED", "false")
            .env("PULSO_LOG_FORMAT", "text")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null());
        (c, port)
    }

    /// Starts it and waits until `/readyz` answers 200.
    async fn start(engine: &str, pg: &str, prefix: &str, id: &str) -> Process {
        Self::start_with(engine, pg, prefix, id, &[]).await
    }

    /// [`Process::start`] with more `PULSO_*` variables.
    async fn start_with(
        engine: &str,
        pg: &str,
        prefix: &str,
        id: &str,
        env: &[(&str, &str)],
    ) -> Process {
        let (mut c, port) = Self::command(engine, pg, prefix, id);
        c.envs(env.iter().copied());
        let log = std::env::temp_dir().join(format!("{}.log", unique("pulso-node")));
        c.stderr(std::fs::File::create(&log).unwrap());
        let mut p = Process {
            child: c.spawn().expect("the pulso binary starts"),
            addr: ([127, 0, 0, 1], port).into(),
            log,
        };
        let deadline = Instant::now() + common::WAIT;
        loop {
            if let Ok(r) = reqwest::get(format!("http://{}/readyz", p.addr)).await
                && r.status() == 200
            {
                return p;
            }
            if let Ok(Some(status)) = p.child.try_wait() {
                panic!("pulso exited with {status}: {}", p.stderr());
            }
            assert!(
                Instant::now() < deadline,
                "not ready in time: {}",
                p.stderr()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGKILL: no shutdown, no clearing of rows.
    fn kill9(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.log);
    }
}

/// `GET /api/cluster` on `addr` with a publisher token.
async fn nodes_at(addr: std::net::SocketAddr) -> Vec<Value> {
    let admin = common::token("admin", "test-admin", Some(Duration::from_secs(60)));
    let (status, body) =
        common::get_json(&format!("http://{addr}/api/cluster"), Some(&admin)).await;
    assert_eq!(status, 200, "{body}");
    body["nodes"].as_array().cloned().unwrap_or_default()
}

/// The node ids in a listing, and the one marked `self`.
fn ids(nodes: &[Value]) -> (Vec<String>, Vec<String>) {
    let id = |n: &Value| n["node"].as_str().unwrap_or_default().to_string();
    let mut all: Vec<String> = nodes.iter().map(id).collect();
    all.sort();
    let this = nodes.iter().filter(|n| n["self"] == true).map(id).collect();
    (all, this)
}

/// Polls `check` until it holds, at most `limit`; returns how long it took.
async fn within<F, Fut>(limit: Duration, what: &str, mut check: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let started = Instant::now();
    while !check().await {
        assert!(started.elapsed() < limit, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    started.elapsed()
}

/// Who holds `sub`'s socket, as node `addr` reads it from the store.
async fn holder(addr: std::net::SocketAddr, sub: &str) -> Option<String> {
    let admin = common::token("admin", "test-admin", Some(Duration::from_secs(60)));
    let url = format!("http://{addr}/api/presence?sub={sub}");
    let (status, body) = common::get_json(&url, Some(&admin)).await;
    assert_eq!(status, 200, "{body}");
    body["sockets"][0]["node"].as_str().map(str::to_string)
}

/// A counter or gauge of a node (0 when absent).
async fn metric(node: &TestServer, name: &str) -> u64 {
    node.metrics()
        .await
        .lines()
        .find(|l| l.split(' ').next() == Some(name))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

#[tokio::test]
async fn a_node_killed_with_kill_9_is_cleared_by_a_live_node_within_node_ttl_and_heartbeat() {
    let Some((pg, redis, prefix)) = lifecycle_setup().await else {
        return;
    };
    let (id_a, id_b, id_c) = (unique("a"), unique("b"), unique("c"));
    let a = fast_node(&redis.url(), &pg, &prefix, &id_a).await;
    let b = fast_node(&redis.url(), &pg, &prefix, &id_b).await;
    let mut c = Process::start(&redis.url(), &pg, &prefix, &id_c).await;

    // Every node lists the three, and itself as `self`.
    let mut all = vec![id_a.clone(), id_b.clone(), id_c.clone()];
    all.sort();
    for (addr, me) in [(a.addr, &id_a), (b.addr, &id_b), (c.addr, &id_c)] {
        let nodes = nodes_at(addr).await;
        assert_eq!(ids(&nodes), (all.clone(), vec![me.clone()]), "{nodes:?}");
        assert!(
            nodes
                .iter()
                .all(|n| n["seen_at"].as_str().is_some_and(|s| s.ends_with('Z')))
        );
    }

    // An authenticated client of C: its row names C, and C counts it.
    let sub = unique("victim");
    let _client = client_with_row(c.addr, a.addr, &sub).await;
    assert_eq!(holder(a.addr, &sub).await.as_deref(), Some(id_c.as_str()));
    within(common::WAIT, "C's heartbeat counts its client", || async {
        nodes_at(a.addr)
            .await
            .iter()
            .any(|n| n["node"] == id_c.as_str() && n["connections"] == 1)
    })
    .await;

    c.kill9();
    let killed = Instant::now();
    let bound = NODE_TTL + HEARTBEAT;
    within(bound + SLACK, "C's rows cleared by a live node", || async {
        holder(a.addr, &sub).await.is_none()
    })
    .await;
    let cleared = killed.elapsed();
    eprintln!("kill -9 to rows cleared: {cleared:?} (bound {bound:?})");
    // Not before C could be dead: its last heartbeat was about one period
    // (two, on a busy machine) before the kill.
    assert!(
        cleared >= NODE_TTL - HEARTBEAT * 2,
        "cleared too early: {cleared:?}"
    );
    // Its heartbeat went in the same transaction as its rows.
    assert_eq!(ids(&nodes_at(a.addr).await).0, {
        let mut live = vec![id_a.clone(), id_b.clone()];
        live.sort();
        live
    });
    // Exactly one of the live nodes cleaned it; both count two live nodes.
    let dead = "pulso_cluster_dead_nodes_total";
    within(common::WAIT, "the cleaning counted", || async {
        metric(&a, dead).await + metric(&b, dead).await >= 1
    })
    .await;
    assert_eq!(metric(&a, dead).await + metric(&b, dead).await, 1);
    within(common::WAIT, "the live-node gauge", || async {
        metric(&a, "pulso_cluster_nodes").await == 2 && metric(&b, "pulso_cluster_nodes").await == 2
    })
    .await;
}

#[tokio::test]
async fn a_node_started_with_the_node_id_of_a_live_node_exits_2() {
    let Some((pg, redis, prefix)) = lifecycle_setup().await else {
        return;
    };
    let id = unique("a");
    let a = fast_node(&redis.url(), &pg, &prefix, &id).await;
    let sub = unique("kept");
    let _client = client_with_row(a.addr, a.addr, &sub).await;

    let (mut second, _) = Process::command(&redis.url(), &pg, &prefix, &id);
    let started = Instant::now();
    let out = tokio::time::timeout(
        common::WAIT,
        tokio::task::spawn_blocking(move || second.output()),
    )
    .await
    .expect("the second node exits in time")
    .unwrap()
    .unwrap();
    let took = started.elapsed();
    eprintln!("duplicate node_id refused after {took:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(errors.len(), 1, "{stderr}");
    assert_eq!(
        stderr.trim_end().lines().last(),
        Some(errors[0]),
        "{stderr}"
    );
    assert!(
        errors[0].contains("node_id") && errors[0].contains(&id),
        "{stderr}"
    );
    // A live holder is recognised by its next heartbeat, not by waiting
    // for a node_ttl.
    assert!(took < NODE_TTL, "refused only after {took:?}");

    // The live node kept its client's row and its place.
    assert_eq!(holder(a.addr, &sub).await.as_deref(), Some(id.as_str()));
    assert_eq!(ids(&nodes_at(a.addr).await), (vec![id.clone()], vec![id]));
}

#[tokio::test]
async fn a_node_restarted_at_once_after_kill_9_takes_its_node_id_back() {
    let Some((pg, redis, prefix)) = lifecycle_setup().await else {
        return;
    };
    let id = unique("r");
    let mut first = Process::start(&redis.url(), &pg, &prefix, &id).await;
    let sub = unique("old");
    let _client = client_with_row(first.addr, first.addr, &sub).await;
    first.kill9();

    // Its heartbeat is younger than node_ttl, but it does not move: the new
    // run waits for it to expire instead of refusing.
    let started = Instant::now();
    let second = Process::start(&redis.url(), &pg, &prefix, &id).await;
    let took = started.elapsed();
    eprintln!("restart with the same node_id ready after {took:?}");
    assert!(took < NODE_TTL + SLACK * 2, "{took:?}");
    assert_eq!(
        ids(&nodes_at(second.addr).await),
        (vec![id.clone()], vec![id])
    );
    // The row the first run left is cleared.
    assert_eq!(holder(second.addr, &sub).await, None);
}

#[tokio::test]
async fn a_stopped_node_leaves_the_cluster_at_once() {
    let Some((pg, redis, prefix)) = lifecycle_setup().await else {
        return;
    };
    let (id_a, id_b) = (unique("a"), unique("b"));
    let a = fast_node(&redis.url(), &pg, &prefix, &id_a).await;
    let b = fast_node(&redis.url(), &pg, &prefix, &id_b).await;
    let sub = unique("s");
    let client = client_with_row(b.addr, a.addr, &sub).await;
    assert_eq!(nodes_at(a.addr).await.len(), 2);
    drop(client);
    b.stop().await;
    // At once: no waiting for a node_ttl.
    assert_eq!(
        ids(&nodes_at(a.addr).await),
        (vec![id_a.clone()], vec![id_a])
    );
    assert_eq!(holder(a.addr, &sub).await, None);
}

#[tokio::test]
async fn a_single_node_lists_itself() {
    let node = TestServer::start().await;
    let (status, _) = common::get_json(&node.url("/api/cluster"), None).await;
    assert_eq!(status, 401);
    let client = node.token("assistant", "x");
    let (status, _) = common::get_json(&node.url("/api/cluster"), Some(&client)).await;
    assert_eq!(status, 403);
    let _ws = node.ws("assistant", "x").await;
    let nodes = nodes_at(node.addr).await;
    assert_eq!(nodes.len(), 1, "{nodes:?}");
    assert_eq!(nodes[0]["node"], node.gw.config.node_id.as_str());
    assert_eq!(
        (&nodes[0]["self"], &nodes[0]["connections"]),
        (&json!(true), &json!(1))
    );
    assert!(
        nodes[0]["seen_at"]
            .as_str()
            .is_some_and(|s| s.ends_with('Z'))
    );
}

#[tokio::test]
async fn a_node_judged_dead_while_alive_comes_back_with_its_rows() {
    let Some((pg, redis, prefix)) = lifecycle_setup().await else {
        return;
    };
    let id = unique("a");
    let a = fast_node(&redis.url(), &pg, &prefix, &id).await;
    let sub = unique("s");
    let _client = client_with_row(a.addr, a.addr, &sub).await;
    // What another node does to a node silent for node_ttl (a partition,
    // a stalled database): its heartbeat and its rows go, at once.
    let pool = sqlx::PgPool::connect(&pg).await.unwrap();
    let mut tx = pool.begin().await.unwrap();
    sqlx::query("DELETE FROM pulso_nodes WHERE node = $1")
        .bind(&id)
        .execute(&mut *tx)
        .await
        .unwrap();
    sqlx::query("UPDATE pulso_presence SET socket_id = NULL WHERE node = $1")
        .bind(&id)
        .execute(&mut *tx)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    assert_eq!(holder(a.addr, &sub).await, None);
    // Its next heartbeat finds the row gone: it claims its id again and
    // writes back the rows of the clients it holds.
    let took = within(HEARTBEAT + SLACK, "the row written back", || async {
        holder(a.addr, &sub).await.as_deref() == Some(id.as_str())
    })
    .await;
    eprintln!("rows written back {took:?} after the heartbeat was removed");
    assert_eq!(ids(&nodes_at(a.addr).await), (vec![id.clone()], vec![id]));
    pool.close().await;
}

#[tokio::test]
async fn mqtt_messages_enter_the_cluster_once_and_the_last_value_is_served_on_any_node() {
    // The machine's Mosquitto (never stopped here), with topics of this
    // test's own.
    if tokio::net::TcpStream::connect("127.0.0.1:1883")
        .await
        .is_err()
        || std::process::Command::new("mosquitto_pub")
            .arg("--help")
            .output()
            .is_err()
    {
        common::skip("Mosquitto on 127.0.0.1:1883 and mosquitto_pub are needed");
        return;
    }
    let (Some(pg), Some(redis)) = (postgres_url().await, RedisServer::start().await) else {
        return;
    };
    let (prefix, root) = (unique("c"), unique("sensors"));
    let mut nodes = Vec::new();
    for _ in 0..3 {
        let toml = format!(
            "node_id = \"{}\"\ndatabase_url = \"{pg}\"\n[cluster]\nredis_url = \"{}\"\nprefix = \"{prefix}\"\n[mqtt]\nurl = \"mqtt://127.0.0.1:1883\"\ntopics = [\"{root}/#\"]\nqos = 1\n",
            unique("node"),
            redis.url()
        );
        let node = TestServer::start_with(move |l| {
            l.apply_toml(&common::base_toml()).unwrap();
            l.apply_toml(&toml).unwrap();
        })
        .await;
        let bridge = node.mqtt.clone().expect("bridge");
        node.until("backplane and broker", |gw| {
            gw.readiness.report().0 && bridge.is_settled()
        })
        .await;
        // Every node's broker subscription is in the cluster's group.
        assert_eq!(
            bridge.broker_subscriptions(),
            [format!("$share/{prefix}/{root}/#")]
        );
        nodes.push(node);
    }
    let mut on_a = subscriber(&nodes[0], &[&format!("{root}/#")]).await;
    let mut on_b = subscriber(&nodes[1], &[&format!("{root}/+")]).await;
    let topic = format!("{root}/s1");
    for n in 0..10 {
        let status = std::process::Command::new("mosquitto_pub")
            .args(["-h", "127.0.0.1", "-p", "1883", "-q", "1", "-t", &topic])
            .args(["-m", &n.to_string()])
            .status()
            .expect("mosquitto_pub");
        assert!(status.success());
    }
    // The broker hands each message to one node of the group, so the
    // cluster's order need not be the broker's; it is one order, the same
    // on every connection, each message once.
    let mut orders = Vec::new();
    for ws in [&mut on_a, &mut on_b] {
        let mut got = Vec::new();
        for _ in 0..10 {
            let (t, payload) = next(ws).await;
            assert_eq!(t, topic);
            got.push(payload.as_i64().expect("a number"));
        }
        orders.push(got);
    }
    assert_eq!(orders[0], orders[1]);
    let mut sorted = orders[0].clone();
    sorted.sort();
    assert_eq!(sorted, (0..10).collect::<Vec<i64>>());
    // Each broker message entered the cluster once: on one node only.
    let mut entered = 0;
    for node in &nodes {
        entered += metric(node, "pulso_mqtt_messages_in_total").await;
    }
    assert_eq!(entered, 10);
    // A first subscriber on C, which no client of its had wanted: the
    // current reading at once.
    // (In a cluster the kept value may come before the `sub` ack, which
    // waits for the backplane.)
    let mut on_c = nodes[2].ws("assistant", &unique("ws")).await;
    on_c.send(json!({"type": "sub", "topic": topic, "id": 1}))
        .await;
    let last = orders[0][9];
    let mut got = None;
    let mut acked = false;
    while got.is_none() || !acked {
        let m = on_c.recv().await;
        if m["type"] == "ack" {
            acked = true;
        } else {
            assert!(got.is_none(), "one kept value: {m}");
            got = Some((m["topic"].clone(), m["payload"].clone()));
        }
    }
    assert_eq!(got, Some((json!(topic), json!(last))));
}

// ---- History in the backplane ----------------------------------------------

/// History on `h/#`, `size` messages per topic.
fn history_toml(size: usize) -> String {
    format!("[history]\ntopics = [\"h/#\"]\nsize = {size}\n")
}

/// `N` nodes on an engine server of the test's own, with history on `h/#`
/// (`size` messages per topic), or `None` when the engine or PostgreSQL
/// is missing.
async fn history_cluster<const N: usize>(
    engine: Engine,
    size: usize,
) -> Option<(Server, [TestServer; N])> {
    let pg = postgres_url().await?;
    let server = Server::start(engine).await?;
    let prefix = unique("h");
    let extra = history_toml(size);
    let mut nodes = Vec::with_capacity(N);
    for _ in 0..N {
        nodes.push(node_with(&server, &pg, &prefix, &extra).await);
    }
    let nodes: [TestServer; N] = nodes.try_into().ok()?;
    Some((server, nodes))
}

/// The next published message on `ws` (skipping replies).
async fn published(ws: &mut WsClient) -> Value {
    loop {
        let m = ws.recv().await;
        if m.get("topic").is_some() {
            return m;
        }
    }
}

/// Reads `ws`'s published messages until the one with `payload`: the
/// backplane carried every publish before it (it stores a tracked message
/// after the publish is answered).
async fn until_payload(ws: &mut WsClient, payload: Value) {
    while published(ws).await["payload"] != payload {}
}

/// `sub` with `since` on `ws`; returns the ack.
async fn sub_since(ws: &mut WsClient, topic: &str, offset: u64, epoch: &Value) -> Value {
    ws.send(json!({"type":"sub","topic":topic,"since":{"offset":offset,"epoch":epoch},"id":"r"}))
        .await;
    ws.recv().await
}

on_each_engine!(
    a_ws_client_recovers_on_another_node_from_the_history_in_the_backplane,
    a_client_of_a_killed_node_recovers_on_a_survivor,
    recovery_from_the_backplane_has_no_gap_and_no_duplicate_at_the_seam,
    a_broadcast_to_two_tracked_rooms_and_recovery,
    concurrent_publishers_on_every_node_share_one_numbering,
);

/// The history lives in the backplane: every node hands out the same
/// offsets, and a `/ws` client whose connection was cut recovers on
/// another node what was published meanwhile through a third, then goes
/// live with no gap; with more missed than `history.size` it is told to
/// reload.
async fn a_ws_client_recovers_on_another_node_from_the_history_in_the_backplane(engine: Engine) {
    let Some((_server, [a, b, c])) = history_cluster::<3>(engine, 20).await else {
        return;
    };
    let mut ws = subscriber(&a, &["h/feed"]).await;
    let mut on_b = subscriber(&b, &["h/feed"]).await;
    a.publish("h/feed", json!(0)).await;
    let first = published(&mut ws).await;
    let (offset, epoch) = (first["offset"].as_u64().unwrap(), first["epoch"].clone());
    assert!(epoch.is_string(), "{first}");
    let seen_on_b = published(&mut on_b).await;
    assert_eq!(
        (seen_on_b["offset"].clone(), seen_on_b["epoch"].clone()),
        (json!(offset), epoch.clone()),
        "one numbering for the cluster"
    );
    // The TCP connection is cut: no close frame.
    drop(ws);
    for n in 1..=15 {
        b.publish("h/feed", json!(n)).await;
    }
    until_payload(&mut on_b, json!(15)).await;
    let mut back = c.ws("assistant", &unique("back")).await;
    let ack = sub_since(&mut back, "h/feed", offset, &epoch).await;
    assert_eq!(ack, json!({"type":"ack","id":"r","recovered":true}));
    for n in 1..=15u64 {
        let m = published(&mut back).await;
        assert_eq!(
            (
                m["payload"].clone(),
                m["offset"].clone(),
                m["epoch"].clone()
            ),
            (json!(n), json!(offset + n), epoch.clone())
        );
    }
    a.publish("h/feed", json!("live")).await;
    let m = published(&mut back).await;
    assert_eq!(
        (m["payload"].clone(), m["offset"].clone()),
        (json!("live"), json!(offset + 16))
    );
    // 26 missed with 20 kept: reload, nothing replayed, live follows.
    for n in 17..=25 {
        b.publish("h/feed", json!(n)).await;
    }
    until_payload(&mut on_b, json!(25)).await;
    let mut late = c.ws("assistant", &unique("late")).await;
    let ack = sub_since(&mut late, "h/feed", offset, &epoch).await;
    assert_eq!(ack, json!({"type":"ack","id":"r","recovered":false}));
    a.publish("h/feed", json!("after")).await;
    assert_eq!(published(&mut late).await["payload"], json!("after"));
    // Another epoch: reload.
    let mut other = b.ws("assistant", &unique("other")).await;
    let ack = sub_since(&mut other, "h/feed", offset, &json!("not-the-epoch")).await;
    assert_eq!(ack["recovered"], json!(false));
}

/// A broadcast naming two tracked rooms, missed or not. Redis stores it
/// once with both offsets, so a client that missed it recovers it; over
/// NATS each room stores its own copy and the copies have no one place in
/// the cluster's order, so a client that missed it is told to reload
/// rather than risk a duplicate, and one that had it recovers what came
/// after.
async fn a_broadcast_to_two_tracked_rooms_and_recovery(engine: Engine) {
    let Some((_server, [a, b])) = history_cluster::<2>(engine, 20).await else {
        return;
    };
    let mut ws = subscriber(&a, &["h/a"]).await;
    a.publish("h/a", json!(0)).await;
    let before = published(&mut ws).await;
    let (k, epoch) = (before["offset"].as_u64().unwrap(), before["epoch"].clone());
    broadcast_at(b.addr, &["h/a", "h/b"], json!("both")).await;
    let both = published(&mut ws).await;
    assert_eq!(both["payload"], json!("both"));
    assert_eq!(both["offset"], json!(k + 1), "{both}");
    drop(ws);
    for n in 1..=3 {
        b.publish("h/a", json!(n)).await;
    }
    // Had the broadcast: what came after is recovered.
    let mut had = b.ws("assistant", &unique("had")).await;
    let ack = sub_since(&mut had, "h/a", k + 1, &epoch).await;
    assert_eq!(ack, json!({"type":"ack","id":"r","recovered":true}));
    for n in 1..=3u64 {
        let m = published(&mut had).await;
        assert_eq!(
            (m["payload"].clone(), m["offset"].clone()),
            (json!(n), json!(k + 1 + n))
        );
    }
    // Missed it: recovered over Redis, told to reload over NATS.
    let mut missed = b.ws("assistant", &unique("missed")).await;
    let ack = sub_since(&mut missed, "h/a", k, &epoch).await;
    match engine {
        Engine::Redis => {
            assert_eq!(ack, json!({"type":"ack","id":"r","recovered":true}));
            let m = published(&mut missed).await;
            assert_eq!(
                (m["payload"].clone(), m["offset"].clone()),
                (json!("both"), json!(k + 1))
            );
            for n in 1..=3u64 {
                assert_eq!(published(&mut missed).await["payload"], json!(n));
            }
        }
        Engine::Nats => {
            assert_eq!(ack, json!({"type":"ack","id":"r","recovered":false}));
        }
    }
    b.publish("h/a", json!("live")).await;
    let m = published(&mut missed).await;
    assert_eq!(m["payload"], json!("live"));
    if engine == Engine::Redis {
        assert_eq!(m["offset"], json!(k + 5));
    }
}

/// Three nodes publishing at once, many publishers each, on one tracked
/// topic: every message gets its own offset, one after the other with no
/// gap, and every connection sees the same offsets on the same messages
/// (over NATS the nodes race for each store and the losers number again).
async fn concurrent_publishers_on_every_node_share_one_numbering(engine: Engine) {
    let Some((_server, nodes)) = history_cluster::<3>(engine, 1000).await else {
        return;
    };
    let mut subs = Vec::new();
    for n in &nodes {
        subs.push(subscriber(n, &["h/race"]).await);
    }
    let per_node = 150;
    publish_from_every_node(&nodes, "h/race", per_node, 6).await;
    let total = per_node * nodes.len();
    let mut seen = Vec::new();
    for ws in &mut subs {
        let mut got = Vec::new();
        for _ in 0..total {
            let m = published(ws).await;
            got.push((m["offset"].as_u64().unwrap(), m["payload"].clone()));
        }
        seen.push(got);
    }
    let offsets: Vec<u64> = seen[0].iter().map(|(o, _)| *o).collect();
    let want: Vec<u64> = (1..=total as u64).collect();
    assert_eq!(
        offsets, want,
        "one offset per message, in order ({engine:?})"
    );
    for other in &seen[1..] {
        assert_eq!(
            other, &seen[0],
            "the same numbering on every node ({engine:?})"
        );
    }
}

/// Two real `pulso` nodes on an engine server of the test's own, with
/// history on `topics`: the server, the cluster prefix and the nodes.
async fn two_processes(engine: Engine, topics: &str) -> Option<(Server, String, Process, Process)> {
    let pg = postgres_url().await?;
    let server = Server::start(engine).await?;
    let url = match &server {
        Server::Redis(r) => r.url(),
        Server::Nats(n) => n.url(),
    };
    let prefix = fresh_prefix();
    let env = [("PULSO_HISTORY_TOPICS", topics)];
    let a = Process::start_with(&url, &pg, &prefix, &unique("a"), &env).await;
    let b = Process::start_with(&url, &pg, &prefix, &unique("b"), &env).await;
    Some((server, prefix, a, b))
}

/// A node killed with `kill -9` while its client was away: the client
/// recovers everything on a survivor, since nothing was only on that node.
async fn a_client_of_a_killed_node_recovers_on_a_survivor(engine: Engine) {
    let Some((_server, _prefix, mut a, b)) = two_processes(engine, "h/#").await else {
        return;
    };
    let token = common::token("assistant", &unique("k"), Some(Duration::from_secs(60)));
    let mut ws = WsClient::connect(&format!("ws://{}/ws?token={token}", a.addr)).await;
    assert_eq!(ws.sub("h/k").await["type"], "ack");
    let admin = common::token("admin", "test-admin", Some(Duration::from_secs(60)));
    let publish = |addr: std::net::SocketAddr, n: Value| {
        let admin = admin.clone();
        async move {
            let body = json!({"topic":"h/k","payload":n}).to_string();
            let (status, _) =
                common::post_json(&format!("http://{addr}/api/publish"), Some(&admin), &body).await;
            assert_eq!(status, 200);
        }
    };
    publish(a.addr, json!(0)).await;
    let first = published(&mut ws).await;
    let (offset, epoch) = (first["offset"].as_u64().unwrap(), first["epoch"].clone());
    drop(ws);
    a.kill9();
    for n in 1..=50 {
        publish(b.addr, json!(n)).await;
    }
    let mut back = WsClient::connect(&format!("ws://{}/ws?token={token}", b.addr)).await;
    let ack = sub_since(&mut back, "h/k", offset, &epoch).await;
    assert_eq!(ack, json!({"type":"ack","id":"r","recovered":true}));
    for n in 1..=50u64 {
        let m = published(&mut back).await;
        assert_eq!(
            (m["payload"].clone(), m["offset"].clone()),
            (json!(n), json!(offset + n))
        );
    }
}

/// The seam between replay and live messages while another node publishes
/// without pause: every offset once, in order.
async fn recovery_from_the_backplane_has_no_gap_and_no_duplicate_at_the_seam(engine: Engine) {
    let Some((_server, [a, c])) = history_cluster::<2>(engine, 1000).await else {
        return;
    };
    let mut first = subscriber(&a, &["h/s"]).await;
    a.publish("h/s", json!(0)).await;
    let m = published(&mut first).await;
    let (base, epoch) = (m["offset"].as_u64().unwrap(), m["epoch"].clone());
    let total = 400u64;
    let publisher = {
        let url = a.url("/api/publish");
        let admin = a.token("admin", "p");
        tokio::spawn(async move {
            for n in 1..=total {
                let body = json!({"topic":"h/s","payload":n}).to_string();
                common::post_json(&url, Some(&admin), &body).await;
            }
        })
    };
    // Wait until some are published, so the replay is not empty.
    for _ in 0..20 {
        published(&mut first).await;
    }
    let mut back = c.ws("assistant", &unique("seam")).await;
    let ack = sub_since(&mut back, "h/s", base, &epoch).await;
    assert_eq!(ack, json!({"type":"ack","id":"r","recovered":true}));
    let mut offsets = Vec::new();
    while offsets.last() != Some(&(base + total)) {
        offsets.push(published(&mut back).await["offset"].as_u64().unwrap());
    }
    let want: Vec<u64> = (base + 1..=base + total).collect();
    assert_eq!(offsets, want, "every offset once, in order");
    publisher.await.unwrap();
}

// ---- Socket.IO recovery sessions in the backplane ---------------------------

/// History for the assistants' rooms of tournament 2.
const SIO_HISTORY: &str = "[history]\ntopics = [\"assistant\", \"assistant_2\"]\n";

/// PostgreSQL, an engine server of the test's own and a fresh prefix: what
/// the Socket.IO recovery tests start from (`None`: skipped).
async fn sio_setup(engine: Engine) -> Option<(String, Server, String)> {
    let pg = postgres_url().await?;
    let server = Server::start(engine).await?;
    Some((pg, server, unique("s")))
}

async fn broadcast_at(addr: std::net::SocketAddr, rooms: &[&str], data: Value) {
    let admin = common::token("admin", "test-admin", Some(Duration::from_secs(60)));
    let body = json!({"rooms": rooms, "event": "check_in", "data": data}).to_string();
    let (status, body) =
        common::post_json(&format!("http://{addr}/api/broadcast"), Some(&admin), &body).await;
    assert_eq!(status, 200, "{body}");
}

/// The next event's payload and offset (its last argument).
async fn check_in(c: &mut SioClient) -> (Value, Option<String>) {
    let (name, args) = c.event().await;
    assert_eq!(name, "check_in");
    let offset = match args.as_slice() {
        [_, Value::String(o)] => Some(o.clone()),
        _ => None,
    };
    (args[0].clone(), offset)
}

/// An authenticated assistant of tournament 2 on `addr` that has seen one
/// tracked event; returns it with its socket id, pid and offset.
async fn sio_assistant(addr: std::net::SocketAddr) -> (SioClient, String, String, String) {
    let mut c = SioClient::connect(addr, 4, NS).await;
    let token = common::token("assistant", &unique("sio"), Some(Duration::from_secs(60)));
    let ack = c.auth(&token, json!({"tournamentId": 2})).await;
    assert_eq!(
        ack["body"]["rooms"],
        json!(["assistant", "assistant_2"]),
        "{ack}"
    );
    broadcast_at(addr, &["assistant_2"], json!("first")).await;
    let (payload, offset) = check_in(&mut c).await;
    assert_eq!(payload, json!("first"));
    let (sid, pid) = (c.socket_id(), c.pid.clone().expect("a pid"));
    (c, sid, pid, offset.expect("an offset"))
}

/// Receives `n` missed events `1..=n` in order, each with an offset.
async fn missed_in_order(c: &mut SioClient, n: u64) {
    for k in 1..=n {
        let (payload, offset) = check_in(c).await;
        assert_eq!(payload, json!(k));
        assert!(offset.is_some(), "tracked events carry an offset");
    }
}

on_each_engine!(
    a_socketio_client_recovers_on_another_node,
    a_socketio_client_that_missed_more_than_the_history_connects_as_new,
    a_socketio_client_of_a_killed_node_recovers_on_a_survivor,
);

/// Socket.IO recovery sessions live in the backplane: a socket.io client
/// whose connection was cut on one node comes back on another and gets
/// its socket id, rooms and the 50 events published meanwhile on a third,
/// then live ones. Over Redis the missed events mix broadcasts to one room
/// and to both; over NATS a broadcast to several tracked rooms cannot be
/// replayed (see `cluster::nats_history`), so they name one room each, and
/// a client that missed one to both rooms connects as new.
async fn a_socketio_client_recovers_on_another_node(engine: Engine) {
    let Some((pg, server, prefix)) = sio_setup(engine).await else {
        return;
    };
    let a = node_with(&server, &pg, &prefix, SIO_HISTORY).await;
    let b = node_with(&server, &pg, &prefix, SIO_HISTORY).await;
    let c = node_with(&server, &pg, &prefix, SIO_HISTORY).await;
    let (client, sid, pid, offset) = sio_assistant(a.addr).await;
    // The TCP connection is cut: no DISCONNECT, no close frame.
    drop(client);
    for n in 1..=50 {
        let rooms: &[&str] = match (n % 2, engine) {
            (0, _) => &["assistant"],
            (_, Engine::Redis) => &["assistant_2", "assistant"],
            (_, Engine::Nats) => &["assistant_2"],
        };
        broadcast_at(b.addr, rooms, json!(n)).await;
    }
    let mut back = SioClient::reconnect(c.addr, NS, &pid, &offset).await;
    assert!(back.recovered(&pid), "same pid: socket.recovered === true");
    assert_eq!(back.socket_id(), sid, "same socket id");
    missed_in_order(&mut back, 50).await;
    broadcast_at(a.addr, &["assistant_2"], json!("live")).await;
    assert_eq!(check_in(&mut back).await.0, json!("live"));
    // Taken once: the session is gone for every node.
    let again = SioClient::reconnect(b.addr, NS, &pid, &offset).await;
    assert!(!again.recovered(&pid), "a session is used once");
    if let Engine::Nats = engine {
        let mut watch = subscriber(&b, &["assistant"]).await;
        let (client, sid, pid, offset) = sio_assistant(a.addr).await;
        drop(client);
        broadcast_at(b.addr, &["assistant_2", "assistant"], json!("both")).await;
        // Stored: a live subscriber has it.
        until_payload(&mut watch, json!("both")).await;
        let back = SioClient::reconnect(c.addr, NS, &pid, &offset).await;
        assert!(
            !back.recovered(&pid),
            "a missed broadcast to two tracked rooms: socket.recovered === false"
        );
        assert_ne!(back.socket_id(), sid, "connected as new");
    }
}

/// The history keeps `history.size` messages a topic: a Socket.IO client
/// that missed exactly that many recovers on another node with all of
/// them; one that missed one more connects as new, because the backplane
/// dropped a message it had not seen (its sequence is above the client's
/// offset).
async fn a_socketio_client_that_missed_more_than_the_history_connects_as_new(engine: Engine) {
    let Some((pg, server, prefix)) = sio_setup(engine).await else {
        return;
    };
    let history = format!("{SIO_HISTORY}size = 5\n");
    let a = node_with(&server, &pg, &prefix, &history).await;
    let c = node_with(&server, &pg, &prefix, &history).await;
    let mut watch = subscriber(&c, &["assistant_2"]).await;
    for (missed, recovers) in [(5, true), (6, false)] {
        let (client, sid, pid, offset) = sio_assistant(a.addr).await;
        drop(client);
        for n in 1..=missed {
            broadcast_at(a.addr, &["assistant_2"], json!(n)).await;
        }
        // Stored: a live subscriber has the last one.
        until_payload(&mut watch, json!(missed)).await;
        let mut back = SioClient::reconnect(c.addr, NS, &pid, &offset).await;
        assert_eq!(back.recovered(&pid), recovers, "{missed} missed");
        if recovers {
            assert_eq!(back.socket_id(), sid, "same socket id");
            missed_in_order(&mut back, missed).await;
        } else {
            assert_ne!(back.socket_id(), sid, "connected as new");
        }
        back.close().await;
    }
}

/// While a change of `history.size` rolls out, nodes keep different sizes:
/// a publish on a node with the smaller one trims several messages of a
/// stream at once, and a Socket.IO client that missed any of them
/// connects as new instead of recovering with a gap. (Redis: over NATS
/// the stream's limit is one setting of the stream.)
#[tokio::test]
async fn a_socketio_client_that_missed_what_a_smaller_history_size_trimmed_connects_as_new() {
    let Some((pg, server, prefix)) = sio_setup(Engine::Redis).await else {
        return;
    };
    let a = node_with(&server, &pg, &prefix, &format!("{SIO_HISTORY}size = 10\n")).await;
    let c = node_with(&server, &pg, &prefix, &format!("{SIO_HISTORY}size = 5\n")).await;
    let mut watch = subscriber(&c, &["assistant_2"]).await;
    let (client, sid, pid, offset) = sio_assistant(a.addr).await;
    drop(client);
    // The stream holds the client's last event and 9 more: 10, a's size.
    for n in 1..=9 {
        broadcast_at(a.addr, &["assistant_2"], json!(n)).await;
    }
    until_payload(&mut watch, json!(9)).await;
    // Added on c, which keeps 5: the client's last event and 1..=5 go.
    broadcast_at(c.addr, &["assistant_2"], json!(10)).await;
    until_payload(&mut watch, json!(10)).await;
    let back = SioClient::reconnect(c.addr, NS, &pid, &offset).await;
    assert!(
        !back.recovered(&pid),
        "1..=5 are gone: socket.recovered === false"
    );
    assert_ne!(back.socket_id(), sid, "connected as new");
}

/// Whether the engine holds the recovery session `pid` of the cluster
/// `prefix`, read by the engine's own means.
async fn session_in_engine(server: &Server, prefix: &str, pid: &str) -> bool {
    match server {
        Server::Redis(redis) => {
            let mut conn = redis::Client::open(redis.url())
                .unwrap()
                .get_multiplexed_async_connection()
                .await
                .unwrap();
            redis::cmd("EXISTS")
                .arg(format!("{prefix}:s:{pid}"))
                .query_async::<bool>(&mut conn)
                .await
                .unwrap()
        }
        Server::Nats(nats) => {
            // A direct get of the subject's last message in the stream.
            // Without the stream, JetStream does not answer at all.
            let client = async_nats::connect(nats.url()).await.unwrap();
            let request = json!({ "last_by_subj": format!("{prefix}.s.{pid}") }).to_string();
            let reply = tokio::time::timeout(
                Duration::from_millis(500),
                client.request(
                    format!("$JS.API.DIRECT.GET.{prefix}-sessions"),
                    request.into(),
                ),
            )
            .await;
            match reply {
                Ok(Ok(m)) => m.status.is_none() && !m.payload.is_empty(),
                _ => false,
            }
        }
    }
}

/// The node a socket.io client was on is killed with `kill -9` while the
/// client is away: the session was in the backplane from the
/// authentication on, and the client recovers everything on a survivor.
async fn a_socketio_client_of_a_killed_node_recovers_on_a_survivor(engine: Engine) {
    let Some((server, prefix, mut a, b)) = two_processes(engine, "assistant,assistant_2").await
    else {
        return;
    };
    let (client, sid, pid, offset) = sio_assistant(a.addr).await;
    // The session reached the backplane when the socket authenticated.
    let deadline = Instant::now() + common::WAIT;
    while !session_in_engine(&server, &prefix, &pid).await {
        assert!(Instant::now() < deadline, "session {pid} in the backplane");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    a.kill9();
    drop(client);
    for n in 1..=50 {
        broadcast_at(b.addr, &["assistant_2"], json!(n)).await;
    }
    let mut back = SioClient::reconnect(b.addr, NS, &pid, &offset).await;
    assert!(back.recovered(&pid), "recovered on the survivor");
    assert_eq!(back.socket_id(), sid);
    missed_in_order(&mut back, 50).await;
}

/// A node's recovery sessions in NATS, without the rest of the node: the
/// store of `prefix` on `nats`, with `history.ttl` = `ttl`.
async fn nats_sessions(
    nats: &NatsServer,
    prefix: &str,
    ttl: Duration,
) -> (
    std::sync::Arc<pulso::cluster::nats_sessions::NatsSessions>,
    tokio_util::sync::CancellationToken,
) {
    use pulso::cluster::{HistoryRules, Shared, nats_sessions::NatsSessions};
    use std::sync::Arc;
    let metrics = Arc::new(pulso::metrics::Metrics::new());
    let hub = Arc::new(pulso::hub::Hub::new(metrics.clone()));
    let rules = HistoryRules {
        filters: vec![pulso::hub::Filter::parse("x").unwrap()],
        size: 10,
        ttl,
    };
    let shared = Shared::new(hub, metrics, prefix, &unique("n"), Vec::new()).with_history(rules);
    let (sessions, ops) = NatsSessions::prepare(&shared).unwrap();
    let client = async_nats::connect(nats.url()).await.unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    tokio::spawn(sessions.clone().run(client, ops, stop.clone()));
    (sessions, stop)
}

/// The recovery sessions in NATS: a live session outlives `history.ttl`
/// while its node keeps it, one that was let go expires, a forgotten one
/// is gone at once; of eight takes of one session at the same time only
/// one gets it, and the node that kept it alive does not bring it back;
/// a pid that is not one of pulso's (`>` would match any) finds nothing;
/// a lost stream is made again with the sessions still alive.
#[tokio::test]
async fn nats_recovery_sessions_are_kept_alive_taken_once_and_expire() {
    use pulso::gateway::SharedSessions;
    let Some(nats) = NatsServer::start().await else {
        return;
    };
    let prefix = unique("ns");
    let server = Server::Nats(nats);
    let Server::Nats(nats) = &server else {
        unreachable!()
    };
    let ttl = Duration::from_millis(1500);
    let (a, _stop_a) = nats_sessions(nats, &prefix, ttl).await;
    let (b, _stop_b) = nats_sessions(nats, &prefix, ttl).await;
    let (c, _stop_c) = nats_sessions(nats, &prefix, ttl).await;
    let present = |pid: &'static str| session_in_engine(&server, &prefix, pid);

    for (pid, session) in [
        ("live-1", "one"),
        ("gone-1", "two"),
        ("forgotten-1", "three"),
    ] {
        a.save(pid, session.as_bytes().to_vec(), true);
    }
    within(common::WAIT, "sessions stored", || async {
        present("live-1").await && present("gone-1").await && present("forgotten-1").await
    })
    .await;
    let stored = Instant::now();
    // Its transport lost: kept `history.ttl` from now, no longer alive.
    a.save("gone-1", b"two".to_vec(), false);
    // Ended for good.
    a.forget("forgotten-1");
    within(common::WAIT, "a forgotten session gone", || async {
        !present("forgotten-1").await
    })
    .await;
    within(ttl * 3, "a session no longer alive expires", || async {
        !present("gone-1").await
    })
    .await;
    // The live one is there all along, twice the ttl after it was stored.
    within(ttl * 3, "twice the ttl", || async {
        assert!(present("live-1").await, "a live session kept alive");
        stored.elapsed() >= ttl * 2
    })
    .await;

    assert_eq!(b.take(">").await.unwrap(), None, "a wildcard is no pid");
    // Eight takes at once, from two nodes: one gets it.
    let takes = (0..8).map(|i| {
        if i % 2 == 0 {
            b.take("live-1")
        } else {
            c.take("live-1")
        }
    });
    let got: Vec<Option<Vec<u8>>> = futures_util::future::join_all(takes)
        .await
        .into_iter()
        .map(Result::unwrap)
        .filter(Option::is_some)
        .collect();
    assert_eq!(got, [Some(b"one".to_vec())], "taken once");
    assert!(!present("live-1").await);
    // Past two of `a`'s refreshes, still gone: its node stopped keeping it.
    let since = Instant::now();
    within(ttl * 2, "not brought back", || async {
        assert!(!present("live-1").await, "brought back after the take");
        since.elapsed() >= ttl
    })
    .await;
    assert_eq!(b.take("live-1").await.unwrap(), None);

    // The stream lost (deleted, or a NATS server that lost its data): the
    // sessions still alive are stored again.
    a.save("live-2", b"four".to_vec(), true);
    within(common::WAIT, "stored", || present("live-2")).await;
    let client = async_nats::connect(nats.url()).await.unwrap();
    let deleted = client
        .request(
            format!("$JS.API.STREAM.DELETE.{prefix}-sessions"),
            "".into(),
        )
        .await
        .unwrap();
    assert!(
        String::from_utf8_lossy(&deleted.payload).contains("\"success\":true"),
        "{:?}",
        deleted.payload
    );
    assert!(!present("live-2").await);
    within(ttl + common::WAIT, "stored again", || present("live-2")).await;
    assert_eq!(b.take("live-2").await.unwrap(), Some(b"four".to_vec()));
}
