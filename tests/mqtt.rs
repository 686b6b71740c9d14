//! The MQTT bridge against a real broker: a Mosquitto process per test on a
//! free loopback port (so it can be killed and restarted), real MQTT clients
//! (rumqttc, and `mosquitto_pub` once), real /ws clients.
//!
//! When `mosquitto` is not installed every test prints why it is skipped and
//! passes. Nothing sleeps to synchronise: every wait is for an event or a
//! condition, bounded by a timeout.

mod common;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use common::*;
use pulso::mqtt::Bridge;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, Publish, QoS};
use serde_json::{Value, json};
use tokio::sync::mpsc;

const MOSQUITTO: &str = "/usr/sbin/mosquitto";
const BROKER_WAIT: Duration = Duration::from_secs(10);

/// The broker binary: `PULSO_TEST_MOSQUITTO` if set (`none` to skip these
/// tests), else the Debian path, else `mosquitto` on the `PATH`.
fn mosquitto_binary() -> Option<PathBuf> {
    if let Some(chosen) = std::env::var_os("PULSO_TEST_MOSQUITTO") {
        let chosen = PathBuf::from(chosen);
        return chosen.is_file().then_some(chosen);
    }
    let fixed = PathBuf::from(MOSQUITTO);
    if fixed.is_file() {
        return Some(fixed);
    }
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|dir| PathBuf::from(dir).join("mosquitto"))
        .find(|p| p.is_file())
}

/// Skips the test (returning from it) when there is no broker binary.
macro_rules! broker_or_skip {
    () => {
        match Broker::start().await {
            Some(b) => b,
            None => {
                common::skip(
                    "mosquitto is not installed (apt-get install mosquitto mosquitto-clients)",
                );
                return;
            }
        }
    };
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// A Mosquitto process with its own config file and port.
struct Broker {
    binary: PathBuf,
    port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

impl Broker {
    async fn start() -> Option<Broker> {
        let mut b = Broker::prepare(free_port())?;
        b.run().await;
        Some(b)
    }

    /// Writes the config for `port` without starting the process.
    fn prepare(port: u16) -> Option<Broker> {
        Broker::prepare_with(port, |_| String::new())
    }

    /// Like [`Broker::prepare`], with extra config lines written by `extra`
    /// (given the broker's directory).
    fn prepare_with(port: u16, extra: impl FnOnce(&std::path::Path) -> String) -> Option<Broker> {
        static N: AtomicU32 = AtomicU32::new(0);
        let binary = mosquitto_binary()?;
        let dir = std::env::temp_dir().join(format!(
            "pulso-mqtt-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let extra = extra(&dir);
        std::fs::write(
            dir.join("mosquitto.conf"),
            format!(
                "per_listener_settings false\nallow_anonymous true\npersistence false\nsys_interval 1\nlog_dest stderr\nlistener {port} 127.0.0.1\n{extra}"
            ),
        )
        .expect("write mosquitto.conf");
        Some(Broker {
            binary,
            port,
            dir,
            child: None,
        })
    }

    /// Starts the process and waits until it accepts connections.
    async fn run(&mut self) {
        let log = std::fs::File::create(self.dir.join("mosquitto.log")).expect("log file");
        let child = Command::new(&self.binary)
            .arg("-c")
            .arg(self.dir.join("mosquitto.conf"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn mosquitto");
        self.child = Some(child);
        let deadline = tokio::time::Instant::now() + BROKER_WAIT;
        while tokio::net::TcpStream::connect(("127.0.0.1", self.port))
            .await
            .is_err()
        {
            let exited = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten());
            assert!(
                exited.is_none() && tokio::time::Instant::now() < deadline,
                "mosquitto did not start listening on {} ({exited:?}): {}",
                self.port,
                std::fs::read_to_string(self.dir.join("mosquitto.log")).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }

    /// A gateway config block for this broker (fast reconnects for tests).
    fn toml(&self, extra: &str) -> String {
        format!(
            "[mqtt]\nurl = \"{}\"\nreconnect_min = \"50ms\"\nreconnect_max = \"300ms\"\n{extra}",
            self.url()
        )
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A plain MQTT client (rumqttc) for publishing and observing the broker.
struct Peer {
    client: AsyncClient,
    events: mpsc::UnboundedReceiver<Packet>,
    task: tokio::task::JoinHandle<()>,
}

impl Peer {
    async fn connect(port: u16, id: &str) -> Peer {
        let mut options = MqttOptions::new(id, "127.0.0.1", port);
        options.set_keep_alive(Duration::from_secs(5));
        options.set_max_packet_size(1 << 20, 1 << 20);
        let (client, mut eventloop) = AsyncClient::new(options, 100);
        let (tx, events) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(packet)) => {
                        if tx.send(packet).is_err() {
                            return;
                        }
                    }
                    Ok(Event::Outgoing(_)) => {}
                    Err(_) => return,
                }
            }
        });
        let mut peer = Peer {
            client,
            events,
            task,
        };
        peer.next_matching("CONNACK", |p| matches!(p, Packet::ConnAck(_)))
            .await;
        peer
    }

    async fn next_matching(&mut self, what: &str, want: impl Fn(&Packet) -> bool) -> Packet {
        let deadline = tokio::time::Instant::now() + BROKER_WAIT;
        loop {
            let packet = tokio::time::timeout_at(deadline, self.events.recv())
                .await
                .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
                .unwrap_or_else(|| panic!("MQTT peer closed while waiting for {what}"));
            if want(&packet) {
                return packet;
            }
        }
    }

    async fn subscribe(&mut self, filter: &str, qos: QoS) {
        self.client.subscribe(filter, qos).await.unwrap();
        self.next_matching("SUBACK", |p| matches!(p, Packet::SubAck(_)))
            .await;
    }

    async fn publish(&self, topic: &str, qos: QoS, payload: impl Into<Vec<u8>>) {
        self.client
            .publish(topic, qos, false, payload.into())
            .await
            .unwrap();
    }

    async fn publish_retained(&self, topic: &str, payload: impl Into<Vec<u8>>) {
        self.client
            .publish(topic, QoS::AtLeastOnce, true, payload.into())
            .await
            .unwrap();
    }

    async fn next_publish(&mut self) -> Publish {
        match self
            .next_matching("PUBLISH", |p| matches!(p, Packet::Publish(_)))
            .await
        {
            Packet::Publish(p) => p,
            _ => unreachable!(),
        }
    }

    /// Waits until the broker's `$SYS` subscription count equals `n` (it
    /// is republished every second; see `sys_interval` above). This peer's
    /// own `$SYS` subscription is included in the count.
    async fn until_broker_subscriptions(&mut self, n: u64) {
        let deadline = tokio::time::Instant::now() + BROKER_WAIT;
        loop {
            let packet = tokio::time::timeout_at(deadline, self.events.recv())
                .await
                .unwrap_or_else(|_| panic!("broker never reported {n} subscriptions"))
                .expect("peer open");
            if let Packet::Publish(p) = packet
                && p.topic == "$SYS/broker/subscriptions/count"
                && String::from_utf8_lossy(&p.payload).trim() == n.to_string()
            {
                return;
            }
        }
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn bridge(srv: &TestServer) -> &Bridge {
    srv.mqtt.as_deref().expect("the bridge is configured")
}

/// Waits until the bridge is connected and the broker acknowledged every
/// subscription, so what is published next is bridged.
async fn until_settled(srv: &TestServer) {
    let b = bridge(srv);
    srv.until("the bridge to be subscribed", |_| b.is_settled())
        .await;
}

/// The next published message (skipping acks and replies).
async fn next_message(c: &mut WsClient) -> Value {
    loop {
        let v = c.recv().await;
        if v.get("topic").is_some() {
            return v;
        }
    }
}

async fn readyz(srv: &TestServer) -> (u16, Value) {
    let resp = reqwest::get(srv.url("/readyz")).await.unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap())
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| {
            let rest = l.strip_prefix(name)?;
            let value = rest.strip_prefix(' ')?;
            value.trim().parse().ok()
        })
        .unwrap_or_else(|| panic!("metric {name} not found in\n{text}"))
}

#[tokio::test]
async fn static_topics_wildcards_and_payload_kinds() {
    let broker = broker_or_skip!();
    let srv = TestServer::start_toml(
        &broker.toml("topics = [\"temperature/#\", \"sensors/+/humidity\"]\nqos = 1\n"),
    )
    .await;
    until_settled(&srv).await;
    let mut c = srv.ws("assistant", "dash").await; // auto-subscribed to `temperature`
    c.sub("temperature/#").await;
    c.sub("sensors/#").await;
    let peer = Peer::connect(broker.port, "sensor-1").await;

    // JSON (QoS 0 and QoS 1), plain text, binary.
    peer.publish("temperature", QoS::AtMostOnce, "21.5").await;
    peer.publish(
        "temperature/room1",
        QoS::AtLeastOnce,
        r#"{"c":22,"unit":"C"}"#,
    )
    .await;
    peer.publish("temperature/room2", QoS::AtMostOnce, "hot")
        .await;
    peer.publish(
        "sensors/k1/humidity",
        QoS::AtLeastOnce,
        vec![0xff, 0x00, 0x10],
    )
    .await;
    // Not bridged: matches no mqtt.topics filter.
    peer.publish("sensors/k1/pressure", QoS::AtMostOnce, "1013")
        .await;
    peer.publish("temperature/end", QoS::AtMostOnce, "\"end\"")
        .await;

    let mut got = vec![];
    loop {
        let m = next_message(&mut c).await;
        assert!(m["ts"].as_u64().unwrap() > 1_700_000_000_000);
        let done = m["topic"] == "temperature/end";
        got.push((m["topic"].clone(), m["payload"].clone()));
        if done {
            break;
        }
    }
    assert_eq!(
        got,
        vec![
            (json!("temperature"), json!(21.5)),
            (json!("temperature/room1"), json!({"c":22,"unit":"C"})),
            (json!("temperature/room2"), json!("hot")),
            (json!("sensors/k1/humidity"), json!({"base64":"/wAQ"})),
            (json!("temperature/end"), json!("end")),
        ]
    );

    // The mosquitto_pub command line client, as an operator would use it.
    let status = Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &broker.port.to_string()])
        .args([
            "-q",
            "1",
            "-t",
            "sensors/cli/humidity",
            "-m",
            "{\"rh\": 40}",
        ])
        .status();
    match status {
        Ok(s) => {
            assert!(s.success(), "mosquitto_pub failed: {s}");
            let m = next_message(&mut c).await;
            assert_eq!(
                (m["topic"].clone(), m["payload"].clone()),
                (json!("sensors/cli/humidity"), json!({"rh":40}))
            );
        }
        Err(e) => eprintln!("mosquitto_pub not run ({e}); install mosquitto-clients"),
    }
    let text = srv.metrics().await;
    assert!(
        metric(&text, "pulso_mqtt_messages_in_total") >= 5.0,
        "{text}"
    );
    assert_eq!(metric(&text, "pulso_mqtt_connected"), 1.0);
    srv.stop().await;
}

#[tokio::test]
async fn overlapping_filters_deliver_each_message_once() {
    let broker = broker_or_skip!();
    let srv = TestServer::start_toml(&broker.toml(
        "topics = [\"temperature/#\", \"temperature/+\", \"temperature/room1\", \"a/+/c\", \"a/b/#\"]\n",
    ))
    .await;
    until_settled(&srv).await;
    // Covered filters are dropped, partial overlaps merged.
    assert_eq!(
        bridge(&srv).broker_subscriptions(),
        vec!["a/+/#", "temperature/#"]
    );
    let mut c = srv.ws("assistant", "1").await;
    c.sub("#").await;
    let peer = Peer::connect(broker.port, "sensor-2").await;
    for (topic, n) in [
        ("temperature/room1", 1), // three filters match
        ("a/b/c", 2),             // both a/+/c and a/b/# match
        ("a/x/d", 3),             // let through by a/+/# but wanted by nobody
        ("a/b", 4),               // a/b/# matches its parent
        ("temperature", 5),
    ] {
        peer.publish(topic, QoS::AtLeastOnce, n.to_string()).await;
    }
    let mut got = vec![];
    while got.len() < 4 {
        let m = next_message(&mut c).await;
        got.push((
            m["topic"].as_str().unwrap().to_string(),
            m["payload"].clone(),
        ));
    }
    assert_eq!(
        got,
        vec![
            ("temperature/room1".to_string(), json!(1)),
            ("a/b/c".to_string(), json!(2)),
            ("a/b".to_string(), json!(4)),
            ("temperature".to_string(), json!(5)),
        ]
    );
    // Nothing else (a duplicate would have arrived before the last one).
    let text = srv.metrics().await;
    assert_eq!(metric(&text, "pulso_mqtt_messages_in_total"), 4.0, "{text}");
    srv.stop().await;
}

#[tokio::test]
async fn on_demand_subscriptions_follow_local_interest() {
    let broker = broker_or_skip!();
    let srv = TestServer::start_toml(&broker.toml("on_demand = [\"fleet\"]\n")).await;
    until_settled(&srv).await;
    let mut observer = Peer::connect(broker.port, "observer").await;
    observer
        .subscribe("$SYS/broker/subscriptions/count", QoS::AtMostOnce)
        .await;
    // The bridge's temperature/# and the observer's own $SYS subscription.
    observer.until_broker_subscriptions(2).await;

    let mut a = srv.ws("assistant", "a").await;
    let mut b = srv.ws("assistant", "b").await;
    a.sub("fleet/+/pos").await;
    b.sub("fleet/+/pos").await;
    until_settled(&srv).await;
    assert_eq!(
        bridge(&srv).broker_subscriptions(),
        vec!["fleet/+/pos", "temperature/#"]
    );
    observer.until_broker_subscriptions(3).await;
    let truck = Peer::connect(broker.port, "truck-7").await;
    truck
        .publish("fleet/t7/pos", QoS::AtLeastOnce, "[40.4,-3.7]")
        .await;
    for c in [&mut a, &mut b] {
        let m = next_message(c).await;
        assert_eq!(
            (m["topic"].clone(), m["payload"].clone()),
            (json!("fleet/t7/pos"), json!([40.4, -3.7]))
        );
    }

    // One client leaves: the other still wants it.
    drop(a);
    srv.until("a's subscriptions to go", |gw| {
        gw.hub.stats().connections == 1
    })
    .await;
    assert_eq!(bridge(&srv).broker_subscriptions().len(), 2);
    // The last one unsubscribes: the broker subscription goes.
    assert_eq!(
        b.request(json!({"type":"unsub","topic":"fleet/+/pos"}), 1)
            .await["type"],
        "ack"
    );
    until_settled(&srv).await;
    assert_eq!(bridge(&srv).broker_subscriptions(), vec!["temperature/#"]);
    observer.until_broker_subscriptions(2).await;
    let text = srv.metrics().await;
    assert_eq!(metric(&text, "pulso_mqtt_broker_subscriptions"), 1.0);

    // Not under an on-demand prefix: nothing is subscribed on the broker.
    b.sub("elsewhere/#").await;
    assert_eq!(bridge(&srv).broker_subscriptions(), vec!["temperature/#"]);
    srv.stop().await;
}

#[tokio::test]
async fn client_pub_reaches_mqtt_subscribers_only_where_allowed() {
    let broker = broker_or_skip!();
    let srv = TestServer::start_toml(&broker.toml(
        "publish_prefixes = [\"cmd\"]\nqos = 1\n[acl.operator]\npublish = [\"cmd/#\", \"local/#\"]\n",
    ))
    .await;
    until_settled(&srv).await;
    let mut device = Peer::connect(broker.port, "heater").await;
    device.subscribe("cmd/#", QoS::AtLeastOnce).await;
    let mut op = srv.ws("operator", "op1").await;

    let ack = op
        .request(json!({"type":"pub","topic":"cmd/heater","payload":"ON"}), 1)
        .await;
    assert_eq!(ack, json!({"type":"ack","id":1}));
    let p = device.next_publish().await;
    assert_eq!(
        (p.topic.as_str(), &p.payload[..]),
        ("cmd/heater", &b"ON"[..])
    );
    assert_eq!(p.qos, QoS::AtLeastOnce, "forwarded with mqtt.qos");
    op.request(
        json!({"type":"pub","topic":"cmd/heater","payload":{"setpoint":21}}),
        2,
    )
    .await;
    let p = device.next_publish().await;
    assert_eq!(&p.payload[..], br#"{"setpoint":21}"#);

    // Refusals: role without publish rights, topic outside the ACL,
    // a name MQTT cannot carry.
    let mut other = srv.ws("assistant", "x").await;
    let e = other
        .request(
            json!({"type":"pub","topic":"cmd/heater","payload":"OFF"}),
            3,
        )
        .await;
    assert_eq!(e["code"], "forbidden");
    let e = op
        .request(json!({"type":"pub","topic":"other/x","payload":1}), 4)
        .await;
    assert_eq!(e["code"], "forbidden");
    let e = op
        .request(json!({"type":"pub","topic":"cmd/a+b","payload":1}), 5)
        .await;
    assert_eq!(e["code"], "invalid_topic");

    // ACL-allowed but not under publish_prefixes: published locally, as before.
    other.sub("local/#").await;
    op.request(json!({"type":"pub","topic":"local/x","payload":7}), 6)
        .await;
    let m = next_message(&mut other).await;
    assert_eq!(
        (m["topic"].clone(), m["payload"].clone()),
        (json!("local/x"), json!(7))
    );

    // Only the two allowed messages reached the broker.
    device.publish("cmd/marker", QoS::AtLeastOnce, "m").await;
    let p = device.next_publish().await;
    assert_eq!(p.topic, "cmd/marker");
    let text = srv.metrics().await;
    assert_eq!(
        metric(&text, "pulso_mqtt_messages_out_total"),
        2.0,
        "{text}"
    );
    srv.stop().await;
}

#[tokio::test]
async fn broker_restart_mid_stream_then_messages_flow_again() {
    let mut broker = broker_or_skip!();
    let srv = TestServer::start_toml(&broker.toml(
        "on_demand = [\"fleet\"]\npublish_prefixes = [\"cmd\"]\n[acl.operator]\npublish = [\"cmd/#\"]\n",
    ))
    .await;
    until_settled(&srv).await;
    let mut c = srv.ws("operator", "1").await;
    c.sub("temperature/#").await;
    c.sub("fleet/+/pos").await; // on demand
    until_settled(&srv).await;
    let peer = Peer::connect(broker.port, "s1").await;
    peer.publish("temperature/a", QoS::AtLeastOnce, "1").await;
    assert_eq!(next_message(&mut c).await["payload"], json!(1));
    assert_eq!(readyz(&srv).await.0, 200);
    drop(peer);

    broker.kill();
    let b = bridge(&srv);
    srv.until("the bridge to see the broker gone", |_| !b.is_connected())
        .await;
    let (status, body) = readyz(&srv).await;
    assert_eq!(status, 503, "{body}");
    assert!(
        body["checks"]["mqtt"]
            .as_str()
            .unwrap()
            .contains("not connected"),
        "{body}"
    );
    let text = srv.metrics().await;
    assert_eq!(metric(&text, "pulso_mqtt_connected"), 0.0);
    // Everything else keeps working while the broker is away.
    assert_eq!(
        reqwest::get(srv.url("/healthz")).await.unwrap().status(),
        200
    );
    let (status, _) = srv.publish("temperature/a", json!(2)).await;
    assert_eq!(status, 200);
    assert_eq!(next_message(&mut c).await["payload"], json!(2));
    // A command for the broker is refused rather than queued.
    let e = c
        .request(json!({"type":"pub","topic":"cmd/x","payload":1}), 9)
        .await;
    assert_eq!(e["code"], "unavailable", "{e}");

    broker.run().await;
    until_settled(&srv).await;
    // Both the static and the on-demand subscription are back.
    let peer = Peer::connect(broker.port, "s1").await;
    peer.publish("temperature/a", QoS::AtLeastOnce, "3").await;
    assert_eq!(next_message(&mut c).await["payload"], json!(3));
    peer.publish("fleet/t1/pos", QoS::AtLeastOnce, "[1,2]")
        .await;
    let m = next_message(&mut c).await;
    assert_eq!(
        (m["topic"].clone(), m["payload"].clone()),
        (json!("fleet/t1/pos"), json!([1, 2]))
    );
    assert_eq!(readyz(&srv).await.0, 200);
    let text = srv.metrics().await;
    assert!(
        metric(&text, "pulso_mqtt_reconnects_total") >= 1.0,
        "{text}"
    );
    assert!(metric(&text, "pulso_mqtt_connection_errors_total") >= 1.0);
    assert_eq!(metric(&text, "pulso_mqtt_connected"), 1.0);
    srv.stop().await;
}

#[tokio::test]
async fn gateway_starts_while_the_broker_is_down() {
    let Some(mut broker) = mosquitto_binary().and_then(|_| Broker::prepare(free_port())) else {
        common::skip("mosquitto is not installed");
        return;
    };
    let srv = TestServer::start_toml(&broker.toml("")).await;
    let mut c = srv.ws("assistant", "1").await;
    c.sub("temperature/#").await;
    // Serving, not ready.
    let (status, body) = readyz(&srv).await;
    assert_eq!(status, 503, "{body}");
    srv.publish("temperature/x", json!("via http")).await;
    assert_eq!(next_message(&mut c).await["payload"], json!("via http"));
    srv.until("a failed connection attempt", |gw| {
        gw.metrics.mqtt_connection_errors.get() >= 1
    })
    .await;

    broker.run().await;
    until_settled(&srv).await;
    assert_eq!(readyz(&srv).await.0, 200);
    let peer = Peer::connect(broker.port, "late-sensor").await;
    peer.publish("temperature/x", QoS::AtMostOnce, "19").await;
    assert_eq!(next_message(&mut c).await["payload"], json!(19));
    srv.stop().await;
}

#[tokio::test]
async fn last_values_are_sent_on_subscribe() {
    let broker = broker_or_skip!();
    let srv = TestServer::start_toml(&broker.toml("")).await;
    until_settled(&srv).await;
    let peer = Peer::connect(broker.port, "thermo").await;
    peer.publish("temperature/room1", QoS::AtLeastOnce, "20")
        .await;
    peer.publish("temperature/room2", QoS::AtLeastOnce, "21")
        .await;
    peer.publish("temperature", QoS::AtLeastOnce, "22").await;
    peer.publish("temperature/room1", QoS::AtLeastOnce, "23")
        .await;
    let all = pulso::hub::Filter::parse("temperature/#").unwrap();
    srv.until("three last values", |gw| {
        gw.hub
            .last_values(&all)
            .iter()
            .any(|m| m.payload.get() == "23")
            && gw.hub.last_values(&all).len() == 3
    })
    .await;
    let kept_ts = srv.gw.hub.last_values(&all)[0].ts;

    // The automatic `temperature` subscription gets its last value at once.
    let mut c = srv.ws("assistant", "1").await;
    let m = next_message(&mut c).await;
    assert_eq!(
        (m["topic"].clone(), m["payload"].clone()),
        (json!("temperature"), json!(22))
    );

    // A wildcard subscription: the ack, then every match, original ts.
    c.send(json!({"type":"sub","topic":"temperature/+","id":1}))
        .await;
    assert_eq!(c.recv().await, json!({"type":"ack","id":1}));
    let first = c.recv().await;
    let second = c.recv().await;
    assert_eq!(
        (first["topic"].clone(), first["payload"].clone()),
        (json!("temperature/room2"), json!(21))
    );
    assert_eq!(
        (second["topic"].clone(), second["payload"].clone()),
        (json!("temperature/room1"), json!(23))
    );
    assert_eq!(first["ts"], json!(kept_ts));

    // A repeated subscribe only acks.
    c.send(json!({"type":"sub","topic":"temperature/+","id":2}))
        .await;
    assert_eq!(c.recv().await, json!({"type":"ack","id":2}));
    // Any source updates it: an HTTP publish on a bridged topic.
    srv.publish("temperature/room3", json!(24)).await;
    let m = c.recv().await;
    assert_eq!(m["topic"], "temperature/room3", "{m}");

    let mut d = srv.ws("assistant", "2").await;
    next_message(&mut d).await; // `temperature`
    d.send(json!({"type":"sub","topic":"temperature/#","id":3}))
        .await;
    assert_eq!(d.recv().await, json!({"type":"ack","id":3}));
    // `temperature` itself came with the automatic subscription: not again.
    let mut topics = vec![];
    for _ in 0..3 {
        topics.push(d.recv().await["topic"].as_str().unwrap().to_string());
    }
    assert_eq!(
        topics,
        vec![
            "temperature/room2",
            "temperature/room1",
            "temperature/room3"
        ]
    );
    // Not a bridged topic: nothing kept.
    srv.publish("news", json!(1)).await;
    d.send(json!({"type":"sub","topic":"news","id":4})).await;
    assert_eq!(d.recv().await, json!({"type":"ack","id":4}));
    let text = srv.metrics().await;
    assert_eq!(metric(&text, "pulso_last_value_topics"), 4.0);
    srv.stop().await;
}

#[tokio::test]
async fn oversized_and_unusable_messages_are_counted_and_dropped() {
    let broker = broker_or_skip!();
    let srv =
        TestServer::start_toml(&broker.toml("max_payload = \"1KiB\"\nprefix = \"site/\"\n")).await;
    until_settled(&srv).await;
    let mut c = srv.ws("assistant", "1").await;
    c.sub("site/#").await;
    let peer = Peer::connect(broker.port, "noisy").await;
    peer.publish("temperature/big", QoS::AtLeastOnce, vec![b'1'; 2048])
        .await;
    // Longer than a hub topic may be once the prefix is added.
    let long = format!("temperature/{}", "x".repeat(250));
    peer.publish(&long, QoS::AtLeastOnce, "1").await;
    // Exactly at the limit is fine.
    let at_limit = format!("\"{}\"", "y".repeat(1022));
    peer.publish("temperature/ok", QoS::AtLeastOnce, at_limit.clone())
        .await;
    let m = next_message(&mut c).await;
    assert_eq!(m["topic"], "site/temperature/ok", "the prefix is prepended");
    assert_eq!(m["payload"].as_str().unwrap().len(), 1022);
    let text = srv.metrics().await;
    assert_eq!(metric(&text, "pulso_mqtt_oversized_total"), 1.0, "{text}");
    assert_eq!(metric(&text, "pulso_mqtt_decode_failures_total"), 1.0);
    assert_eq!(metric(&text, "pulso_mqtt_messages_in_total"), 1.0);
    assert!(
        bridge(&srv).is_connected(),
        "dropping never costs the connection"
    );
    srv.stop().await;
}

#[tokio::test]
async fn retained_broker_messages_fill_the_last_values() {
    let broker = broker_or_skip!();
    let peer = Peer::connect(broker.port, "retainer").await;
    peer.publish_retained("temperature/lab", "18.5").await;
    // Make sure the broker stored it before the gateway subscribes.
    let mut check = Peer::connect(broker.port, "check").await;
    check.subscribe("temperature/lab", QoS::AtMostOnce).await;
    assert_eq!(&check.next_publish().await.payload[..], b"18.5");

    let srv = TestServer::start_toml(&broker.toml("")).await;
    until_settled(&srv).await;
    let lab = pulso::hub::Filter::parse("temperature/lab").unwrap();
    srv.until("the retained message", |gw| {
        !gw.hub.last_values(&lab).is_empty()
    })
    .await;
    let mut c = srv.ws("assistant", "1").await;
    c.send(json!({"type":"sub","topic":"temperature/lab","id":1}))
        .await;
    assert_eq!(c.recv().await, json!({"type":"ack","id":1}));
    assert_eq!(c.recv().await["payload"], json!(18.5));
    srv.stop().await;
}

/// Makes a throw-away CA and a server certificate for 127.0.0.1 with the
/// `openssl` command; `None` when it is not available.
fn make_certificates(dir: &std::path::Path) -> Option<()> {
    let run = |args: &[&str]| {
        Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .ok()
            .filter(|s| s.success())
    };
    std::fs::write(dir.join("san.ext"), "subjectAltName=IP:127.0.0.1\n").ok()?;
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    run(&[
        &["req", "-x509"],
        &ec[..],
        &[
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
            "-days",
            "1",
            "-subj",
            "/CN=pulso test CA",
        ],
    ]
    .concat())?;
    run(&[
        &["req"],
        &ec[..],
        &[
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=127.0.0.1",
        ],
    ]
    .concat())?;
    run(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.crt",
        "-days",
        "1",
        "-extfile",
        "san.ext",
    ])?;
    // Mosquitto started as root drops to its own user, which must still
    // read this throw-away key.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(
        dir.join("server.key"),
        std::fs::Permissions::from_mode(0o644),
    )
    .ok()?;
    Some(())
}

#[tokio::test]
async fn mqtts_with_a_given_ca_file() {
    if mosquitto_binary().is_none() {
        common::skip("mosquitto is not installed");
        return;
    }
    let tls_port = free_port();
    let mut made = false;
    let mut broker = Broker::prepare_with(free_port(), |dir| {
        made = make_certificates(dir).is_some();
        format!(
            "listener {tls_port} 127.0.0.1\ncafile {0}/ca.crt\ncertfile {0}/server.crt\nkeyfile {0}/server.key\n",
            dir.display()
        )
    })
    .expect("broker config");
    if !made {
        common::skip("could not make test certificates with openssl");
        return;
    }
    broker.run().await;
    let ca = broker.dir.join("ca.crt");
    let srv = TestServer::start_toml(&format!(
        "[mqtt]\nurl = \"mqtts://127.0.0.1:{tls_port}\"\nca_file = \"{}\"\nreconnect_min = \"50ms\"\nreconnect_max = \"300ms\"\n",
        ca.display()
    ))
    .await;
    until_settled(&srv).await;
    let mut c = srv.ws("assistant", "1").await;
    c.sub("temperature/#").await;
    // The peer uses the plain listener of the same broker.
    let peer = Peer::connect(broker.port, "tls-sensor").await;
    peer.publish("temperature/secure", QoS::AtLeastOnce, "17")
        .await;
    let m = next_message(&mut c).await;
    assert_eq!(
        (m["topic"].clone(), m["payload"].clone()),
        (json!("temperature/secure"), json!(17))
    );
    srv.stop().await;

    // The system roots do not trust the test CA: never connected, and /readyz says why.
    let srv = TestServer::start_toml(&format!(
        "[mqtt]\nurl = \"mqtts://127.0.0.1:{tls_port}\"\nreconnect_min = \"50ms\"\nreconnect_max = \"300ms\"\n"
    ))
    .await;
    srv.until("a failed TLS handshake", |gw| {
        gw.metrics.mqtt_connection_errors.get() >= 1
    })
    .await;
    let (status, body) = readyz(&srv).await;
    assert_eq!(status, 503);
    let reason = body["checks"]["mqtt"].as_str().unwrap().to_lowercase();
    assert!(
        reason.contains("tls") || reason.contains("certificate"),
        "{body}"
    );
    srv.stop().await;
}

#[tokio::test]
async fn a_broker_flood_closes_slow_clients_without_stalling_the_bridge() {
    const FLOOD: u64 = 1000;
    let broker = broker_or_skip!();
    let srv =
        TestServer::start_toml(&format!("[ws]\noutbound_queue = 64\n{}", broker.toml(""))).await;
    until_settled(&srv).await;
    let mut slow = srv.ws("assistant", "slow").await; // never reads
    slow.sub("temperature/#").await;
    // 1000 × 32 KiB: far more than socket buffers and the queue can hold.
    let peer = Peer::connect(broker.port, "flood").await;
    let big = format!("\"{}\"", "z".repeat(32 * 1024 - 2));
    for _ in 0..FLOOD {
        peer.publish("temperature/flood", QoS::AtMostOnce, big.clone())
            .await;
    }
    // The bridge took every message off the broker without waiting for the
    // client, which was closed as a slow consumer.
    srv.until("the whole flood to be bridged", |gw| {
        gw.metrics.mqtt_messages_in.get() == FLOOD
    })
    .await;
    assert_eq!(slow.close_code().await, 1013, "slow consumer closed");
    assert!(srv.gw.metrics.slow_consumer_closes.get() >= 1);
    // And it still bridges for everyone else.
    let mut fresh = srv.ws("assistant", "fresh").await;
    fresh.sub("temperature/after").await;
    peer.publish("temperature/after", QoS::AtMostOnce, "1")
        .await;
    assert_eq!(next_message(&mut fresh).await["topic"], "temperature/after");
    assert!(bridge(&srv).is_connected());
    srv.stop().await;
}

#[tokio::test]
async fn persistent_session_gets_what_was_published_while_away() {
    let broker = broker_or_skip!();
    let session = "clean_session = false\nqos = 1\nclient_id = \"pulso-persistent-test\"\n";
    let srv = TestServer::start_toml(&broker.toml(session)).await;
    until_settled(&srv).await;
    srv.stop().await; // disconnects; the broker keeps the session

    let mut peer = Peer::connect(broker.port, "while-away").await;
    peer.publish("temperature/vault", QoS::AtLeastOnce, "4.5")
        .await;
    // Acknowledged: the broker has queued it for the absent session (with a
    // clean session it would be gone, and this test would time out below).
    peer.next_matching("PUBACK", |p| matches!(p, Packet::PubAck(_)))
        .await;

    let srv = TestServer::start_toml(&broker.toml(session)).await;
    let vault = pulso::hub::Filter::parse("temperature/vault").unwrap();
    srv.until("the message queued by the broker", |gw| {
        !gw.hub.last_values(&vault).is_empty()
    })
    .await;
    assert_eq!(srv.gw.hub.last_values(&vault)[0].payload.get(), "4.5");
    srv.stop().await;
}

#[tokio::test]
async fn the_prefix_maps_topics_both_ways() {
    let broker = broker_or_skip!();
    let srv = TestServer::start_toml(&broker.toml(
        "prefix = \"site/\"\non_demand = [\"site/fleet\"]\npublish_prefixes = [\"site/cmd\"]\n[acl.operator]\npublish = [\"site/cmd/#\"]\n",
    ))
    .await;
    until_settled(&srv).await;
    let mut device = Peer::connect(broker.port, "device").await;
    device.subscribe("cmd/#", QoS::AtMostOnce).await;
    let mut op = srv.ws("operator", "op").await;

    op.sub("site/fleet/+").await;
    until_settled(&srv).await;
    assert_eq!(
        bridge(&srv).broker_subscriptions(),
        vec!["fleet/+", "temperature/#"],
        "broker names carry no prefix"
    );
    device.publish("fleet/van", QoS::AtMostOnce, "1").await;
    assert_eq!(next_message(&mut op).await["topic"], "site/fleet/van");

    op.request(
        json!({"type":"pub","topic":"site/cmd/heat","payload":"ON"}),
        1,
    )
    .await;
    let p = device.next_publish().await;
    assert_eq!((p.topic.as_str(), &p.payload[..]), ("cmd/heat", &b"ON"[..]));
    srv.stop().await;
}

#[tokio::test]
async fn shared_subscriptions_are_bridged() {
    let broker = broker_or_skip!();
    let srv =
        TestServer::start_toml(&broker.toml("topics = [\"$share/pulso/temperature/#\"]\n")).await;
    until_settled(&srv).await;
    let mut c = srv.ws("assistant", "1").await;
    c.sub("temperature/#").await;
    let peer = Peer::connect(broker.port, "s").await;
    peer.publish("temperature/shared", QoS::AtMostOnce, "5")
        .await;
    let m = next_message(&mut c).await;
    assert_eq!(
        (m["topic"].clone(), m["payload"].clone()),
        (json!("temperature/shared"), json!(5))
    );
    let kept = pulso::hub::Filter::parse("temperature/shared").unwrap();
    assert_eq!(srv.gw.hub.last_values(&kept).len(), 1, "kept as last value");
    srv.stop().await;
}

/// More kept values than the outbound queue holds: a wildcard subscriber
/// still gets all of them and is not taken for a slow consumer.
#[tokio::test]
async fn a_wildcard_replay_larger_than_the_queue_is_not_a_slow_consumer() {
    let broker = broker_or_skip!();
    let srv = TestServer::start_toml(&broker.toml("[ws]\noutbound_queue = 16\n")).await;
    let n = 100;
    for i in 0..n {
        let (status, _) = srv.publish(&format!("temperature/s{i}"), json!(i)).await;
        assert_eq!(status, 200);
    }
    let all = pulso::hub::Filter::parse("temperature/#").unwrap();
    srv.until("kept values", |gw| gw.hub.last_values(&all).len() == n)
        .await;
    let mut c = srv.ws("assistant", "1").await;
    let ack = c
        .request(json!({"type":"sub","topic":"temperature/#"}), 1)
        .await;
    assert_eq!(ack, json!({"type":"ack","id":1}));
    let mut got = std::collections::HashSet::new();
    while got.len() < n {
        let m = c.recv().await;
        got.insert(m["payload"].as_u64().unwrap());
    }
    assert_eq!(c.request(json!({"type":"ping"}), 2).await["type"], "pong");
    assert!(
        srv.metrics()
            .await
            .contains("pulso_slow_consumer_closes_total 0")
    );
    srv.stop().await;
}
