//! Clustering over Redis (SPEC §8): three pulso nodes against a
//! `redis-server` of the test's own and the machine's PostgreSQL, driven
//! with real `/ws` and Socket.IO clients. Each test uses its own Redis and
//! its own `cluster.prefix`.

mod common;
#[path = "support/services.rs"]
mod services;
#[path = "support/sio_client.rs"]
mod sio_client;

use common::{TestServer, WsClient};
use serde_json::{Value, json};
use services::{RedisServer, postgres_url};
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

/// A node of a cluster on `redis` with `prefix`.
async fn node(redis: &str, pg: &str, prefix: &str) -> TestServer {
    let toml = format!(
        "node_id = \"{}\"\ndatabase_url = \"{pg}\"\n[cluster]\nredis_url = \"{redis}\"\nprefix = \"{prefix}\"\n[acl.admin]\npublish = [\"#\"]\n",
        unique("node")
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

/// Three nodes, or `None` when Redis or PostgreSQL is missing.
async fn cluster() -> Option<(RedisServer, [TestServer; 3])> {
    let pg = postgres_url().await?;
    let redis = RedisServer::start().await?;
    let prefix = unique("c");
    let a = node(&redis.url(), &pg, &prefix).await;
    let b = node(&redis.url(), &pg, &prefix).await;
    let c = node(&redis.url(), &pg, &prefix).await;
    Some((redis, [a, b, c]))
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

#[tokio::test]
async fn publishes_and_broadcasts_reach_every_node_once_on_both_protocols() {
    let Some((_redis, [a, b, c])) = cluster().await else {
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

#[tokio::test]
async fn a_topics_messages_arrive_in_the_same_order_on_every_connection() {
    let Some((_redis, nodes)) = cluster().await else {
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
    for o in &orders[1..] {
        assert_eq!(o, &orders[0], "one order on every connection");
    }
    // And each node's own messages in the order it published them.
    for i in 0..nodes.len() {
        let own: Vec<&Value> = orders[0]
            .iter()
            .filter(|v| v.as_str().is_some_and(|s| s.starts_with(&format!("{i}-"))))
            .collect();
        let want: Vec<Value> = (0..per_node).map(|k| json!(format!("{i}-{k}"))).collect();
        assert_eq!(own, want.iter().collect::<Vec<_>>());
    }
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

#[tokio::test]
async fn a_node_receives_only_what_its_clients_want() {
    let Some((_redis, [a, b, c])) = cluster().await else {
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

#[tokio::test]
async fn while_redis_is_down_nodes_serve_locally_then_resubscribe() {
    let Some((mut redis, [a, b, _c])) = cluster().await else {
        return;
    };
    let mut on_a = subscriber(&a, &["t/+"]).await;
    redis.kill();
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

    redis.restart().await;
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
}

/// `name value` of a counter or gauge line in a node's metrics.
async fn metric(node: &TestServer, name: &str) -> u64 {
    let m = node.metrics().await;
    m.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

#[tokio::test]
async fn mqtt_messages_enter_the_cluster_once_and_the_last_value_is_served_on_any_node() {
    // The machine's Mosquitto (never stopped here), with topics of this
    // test's own.
    if tokio::net::TcpStream::connect("127.0.0.1:1883").await.is_err()
        || std::process::Command::new("mosquitto_pub").arg("--help").output().is_err()
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
    for ws in [&mut on_a, &mut on_b] {
        for n in 0..10 {
            assert_eq!(next(ws).await, (topic.clone(), json!(n)));
        }
    }
    // Each broker message entered the cluster once: on one node only.
    let mut entered = 0;
    for node in &nodes {
        entered += metric(node, "pulso_mqtt_messages_in_total").await;
    }
    assert_eq!(entered, 10);
    // A first subscriber on C, which no client of its had wanted: the
    // current reading at once.
    let mut on_c = subscriber(&nodes[2], &[&topic]).await;
    assert_eq!(next(&mut on_c).await, (topic.clone(), json!(9)));
}
