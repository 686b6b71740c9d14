//! The MQTT bridge (SPEC §6): broker messages into the hub, selected client
//! messages back to the broker.
//!
//! One rumqttc connection per node. Two tasks share the [`Bridge`]:
//!
//! - the event-loop task polls the connection, publishes every incoming
//!   message into the hub (never waiting on a client: the hub only queues),
//!   and after each (re)connection subscribes everything that is wanted;
//!   after an error it waits with capped exponential backoff and jitter;
//! - the interest task follows the hub's interest changes and subscribes or
//!   unsubscribes on-demand filters while the connection is up.
//!
//! What is subscribed on the broker is a set of non-overlapping filters (see
//! [`plan`]) so each broker message arrives, and is published, once.
//! State shared by both tasks sits behind plain mutexes that are never held
//! across an `.await`: every rumqttc call made under them is a `try_*` call.

pub mod payload;
pub mod plan;

use std::collections::{BTreeSet, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rumqttc::{AsyncClient, ConnectionError, Event, EventLoop, MqttOptions, Packet, QoS};
use serde_json::value::RawValue;
use tokio_util::sync::CancellationToken;

use crate::config::mqtt::{is_mqtt_filter, is_mqtt_topic_name, is_under, topics_of};
use crate::config::{Config, ConfigError, MqttConfig};
use crate::hub::topic::{Filter, validate_name};
use crate::hub::{Hub, Interest, Message};
use crate::metrics::Metrics;

/// Requests (subscribes, publishes) queued for the connection. Forwarded
/// publishes are refused, not queued further, when it is full.
const REQUEST_QUEUE: usize = 1024;

/// Why a client `pub` could not be forwarded to the broker.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ForwardError {
    #[error("`{0}` cannot be an MQTT topic name (no `+`, `#` or NUL)")]
    InvalidTopic(String),
    #[error("the MQTT broker is not connected")]
    NotConnected,
    #[error("too many messages waiting for the MQTT broker")]
    Busy,
}

impl ForwardError {
    /// The `/ws` error code.
    pub fn code(&self) -> &'static str {
        match self {
            ForwardError::InvalidTopic(_) => "invalid_topic",
            ForwardError::NotConnected | ForwardError::Busy => "unavailable",
        }
    }
}

impl crate::gateway::Upstream for Bridge {
    fn forwards(&self, topic: &str) -> bool {
        Bridge::forwards(self, topic)
    }

    fn forward(&self, topic: &str, payload: &RawValue) -> Result<(), crate::gateway::Refused> {
        Bridge::forward(self, topic, payload).map_err(|e| crate::gateway::Refused {
            code: e.code(),
            message: e.to_string(),
        })
    }
}

/// What the bridge wants subscribed, and what it asked the broker for.
#[derive(Default)]
struct Subscriptions {
    /// `mqtt.topics` (broker names, without `mqtt.prefix`).
    fixed: Vec<Filter>,
    /// The topics `fixed` delivers (`$share/<group>/` removed).
    fixed_topics: Vec<Filter>,
    /// On-demand filters with at least one local subscriber (broker names).
    on_demand: HashSet<Filter>,
    /// The non-overlapping filters subscribed (or being subscribed) on the broker.
    broker: BTreeSet<String>,
    /// Filters dropped from `broker` while disconnected; with a persistent
    /// session the broker still has them, so they are unsubscribed on resume.
    stale: BTreeSet<String>,
    /// Whether the connection is up; changed only under this lock so a plan
    /// change and a reconnection's re-subscribe never miss each other.
    connected: bool,
    /// Subscribe/unsubscribe requests sent and not yet acknowledged.
    awaiting_acks: usize,
    /// On a node of a cluster, the shared-subscription group
    /// (`cluster.prefix`): every node subscribes as `$share/<group>/<f>`,
    /// so the broker hands each message to one node of the cluster, which
    /// publishes it to all through the backplane.
    share: Option<String>,
}

impl Subscriptions {
    fn wants(&self, topic: &str) -> bool {
        self.fixed_topics.iter().any(|f| f.matches(topic))
            || self.on_demand.iter().any(|f| f.matches(topic))
    }

    fn plan(&self) -> BTreeSet<String> {
        let planned = plan::plan(
            self.fixed
                .iter()
                .chain(self.on_demand.iter())
                .map(|f| f.as_str()),
        );
        match &self.share {
            None => planned,
            // One group per cluster: an on-demand filter wanted on several
            // nodes is one subscription of the group, and lasts while any
            // node's clients want it.
            Some(group) => planned
                .into_iter()
                .map(|f| {
                    if f.starts_with("$share/") {
                        f
                    } else {
                        format!("$share/{group}/{f}")
                    }
                })
                .collect(),
        }
    }
}

/// Connection state for `/readyz`.
struct Link {
    connected: AtomicBool,
    last_error: Mutex<String>,
}

pub struct Bridge {
    config: MqttConfig,
    /// `host:port`, for log lines.
    address: String,
    client_id: String,
    qos: QoS,
    client: AsyncClient,
    /// Taken by [`Bridge::run`]; the bridge runs once.
    eventloop: Mutex<Option<EventLoop>>,
    subs: Mutex<Subscriptions>,
    link: Arc<Link>,
    metrics: Arc<Metrics>,
    /// Counts for log throttling (a flood of bad messages must not flood logs).
    oversized_seen: AtomicU64,
    bad_topic_seen: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Logs the 1st, 2nd, 4th, 8th… occurrence only.
fn worth_logging(counter: &AtomicU64) -> bool {
    (counter.fetch_add(1, Ordering::Relaxed) + 1).is_power_of_two()
}

impl Bridge {
    /// Prepares the bridge (no I/O yet); `None` when `mqtt.url` is unset.
    pub fn new(config: &Config, metrics: Arc<Metrics>) -> Result<Option<Arc<Bridge>>, ConfigError> {
        let mqtt = &config.mqtt;
        let Some(broker) = &mqtt.broker else {
            return Ok(None);
        };
        let client_id = mqtt.client_id(&config.node_id);
        let mut options = MqttOptions::new(client_id.clone(), &broker.host, broker.port);
        options
            .set_keep_alive(mqtt.keep_alive)
            .set_clean_session(mqtt.clean_session)
            .set_request_channel_capacity(REQUEST_QUEUE);
        // rumqttc treats a packet over its limit as a protocol error and drops
        // the connection, so its limit sits well above `mqtt.max_payload`:
        // messages in between are counted and dropped here, one by one.
        let packet_limit = mqtt
            .max_payload
            .saturating_mul(4)
            .max(mqtt.max_payload + 64 * 1024);
        options.set_max_packet_size(
            packet_limit,
            packet_limit.max(config.ws.max_message_size + 1024),
        );
        if let Some(user) = &broker.username {
            options.set_credentials(user.clone(), broker.password.clone().unwrap_or_default());
        }
        if broker.tls {
            options.set_transport(rumqttc::Transport::tls_with_config(
                rumqttc::TlsConfiguration::Rustls(Arc::new(tls_config(broker.ca_file.as_deref())?)),
            ));
        }
        let (client, eventloop) = AsyncClient::new(options, REQUEST_QUEUE);
        let qos = if mqtt.qos == 0 {
            QoS::AtMostOnce
        } else {
            QoS::AtLeastOnce
        };
        let bridge = Bridge {
            address: format!("{}:{}", broker.host, broker.port),
            client_id,
            qos,
            client,
            eventloop: Mutex::new(Some(eventloop)),
            subs: Mutex::new(Subscriptions {
                fixed: mqtt.topics.clone(),
                fixed_topics: mqtt
                    .topics
                    .iter()
                    .filter_map(|f| Filter::parse(topics_of(f.as_str())).ok())
                    .collect(),
                share: config
                    .cluster
                    .engine
                    .is_some()
                    .then(|| config.cluster.prefix.clone()),
                ..Default::default()
            }),
            link: Arc::new(Link {
                connected: AtomicBool::new(false),
                last_error: Mutex::new("not connected yet".into()),
            }),
            metrics,
            config: mqtt.clone(),
            oversized_seen: AtomicU64::new(0),
            bad_topic_seen: AtomicU64::new(0),
        };
        Ok(Some(Arc::new(bridge)))
    }

    /// The `mqtt` check of `/readyz`: ready while connected, otherwise the
    /// last connection error. It only reads state the bridge keeps up to
    /// date (no I/O), and the bridge does not need to know where it is
    /// registered.
    pub fn readiness_check(&self) -> impl Fn() -> Result<(), String> + Send + Sync + 'static {
        let link = self.link.clone();
        move || {
            if link.connected.load(Ordering::Relaxed) {
                Ok(())
            } else {
                Err(format!(
                    "MQTT broker not connected: {}",
                    lock(&link.last_error)
                ))
            }
        }
    }

    pub fn is_connected(&self) -> bool {
        self.link.connected.load(Ordering::Relaxed)
    }

    /// Connected, and every subscription change acknowledged by the broker:
    /// from here on a message published on the broker reaches the hub.
    pub fn is_settled(&self) -> bool {
        let subs = lock(&self.subs);
        subs.connected && subs.awaiting_acks == 0
    }

    /// The filters currently subscribed on the broker.
    pub fn broker_subscriptions(&self) -> Vec<String> {
        lock(&self.subs).broker.iter().cloned().collect()
    }

    /// Is a client `pub` on this hub topic for the broker?
    pub fn forwards(&self, hub_topic: &str) -> bool {
        self.config
            .publish_prefixes
            .iter()
            .any(|p| is_under(hub_topic, p))
    }

    /// Sends a client's message to the broker (topic without `mqtt.prefix`,
    /// payload as [`payload::encode`] says). Refused while disconnected
    /// rather than queued: a command delivered minutes late is worse than an
    /// error the client can act on.
    pub fn forward(&self, hub_topic: &str, payload: &RawValue) -> Result<(), ForwardError> {
        let topic = hub_topic
            .strip_prefix(self.config.prefix.as_str())
            .filter(|t| is_mqtt_topic_name(t))
            .ok_or_else(|| ForwardError::InvalidTopic(hub_topic.to_string()))?;
        if !self.is_connected() {
            return Err(ForwardError::NotConnected);
        }
        self.client
            .try_publish(topic, self.qos, false, payload::encode(payload))
            .map_err(|_| ForwardError::Busy)?;
        self.metrics.mqtt_messages_out.inc();
        Ok(())
    }

    /// Publishes broker messages into `hub` and follows its interest until
    /// `shutdown` is cancelled. Never returns early because of the broker:
    /// it keeps reconnecting while the rest of the gateway serves.
    pub async fn run(self: Arc<Self>, hub: Arc<Hub>, shutdown: CancellationToken) {
        let Some(mut eventloop) = lock(&self.eventloop).take() else {
            return;
        };
        // Watch first, then read the current state, so nothing falls between.
        let mut interest = hub.watch_interest();
        for filter in hub.active_filters() {
            self.on_interest(&Interest {
                filter,
                active: true,
            });
        }
        let follower = {
            let bridge = self.clone();
            let stop = shutdown.clone();
            tokio::spawn(async move {
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        change = interest.recv() => match change {
                            Some(change) => bridge.on_interest(&change),
                            None => return,
                        },
                    }
                }
            })
        };

        let mut backoff = Backoff::new(self.config.reconnect_min, self.config.reconnect_max);
        let mut failed_before = false;
        loop {
            // Only shutdown races the poll: rumqttc's poll is not documented
            // as cancel-safe, and it is only ever cancelled when stopping.
            let event = tokio::select! {
                _ = shutdown.cancelled() => break,
                event = eventloop.poll() => event,
            };
            match event {
                Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                    if failed_before {
                        self.metrics.mqtt_reconnects.inc();
                    }
                    failed_before = false;
                    backoff.reset();
                    self.on_connected(ack.session_present);
                }
                Ok(Event::Incoming(Packet::Publish(publish))) => {
                    self.on_publish(&hub, &publish.topic, &publish.payload);
                }
                Ok(Event::Incoming(Packet::UnsubAck(_))) => self.acknowledged(),
                Ok(Event::Incoming(Packet::SubAck(ack))) => {
                    self.acknowledged();
                    if ack
                        .return_codes
                        .iter()
                        .any(|c| matches!(c, rumqttc::SubscribeReasonCode::Failure))
                    {
                        tracing::warn!("the MQTT broker refused a subscription (check its ACL)");
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    self.on_error(&e, !failed_before);
                    failed_before = true;
                    let delay = backoff.next_delay();
                    tracing::debug!(?delay, "reconnecting to the MQTT broker after a pause");
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }

        follower.abort();
        let was_connected = self.set_connected(false, "stopping");
        if was_connected {
            // Say goodbye so the broker does not publish a will or keep
            // the session waiting for a keep-alive timeout; bounded.
            let _ = self.client.try_disconnect();
            let _ = tokio::time::timeout(Duration::from_millis(500), async {
                loop {
                    match eventloop.poll().await {
                        Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) | Err(_) => break,
                        Ok(_) => {}
                    }
                }
            })
            .await;
        }
    }

    /// Records the connection state; returns the previous one.
    fn set_connected(&self, connected: bool, reason: &str) -> bool {
        let mut subs = lock(&self.subs);
        let was = subs.connected;
        subs.connected = connected;
        subs.awaiting_acks = 0;
        self.link.connected.store(connected, Ordering::Relaxed);
        self.metrics.mqtt_connected.set(i64::from(connected));
        if !connected {
            *lock(&self.link.last_error) = reason.to_string();
        }
        was
    }

    fn on_connected(&self, session_present: bool) {
        let mut subs = lock(&self.subs);
        subs.connected = true;
        self.link.connected.store(true, Ordering::Relaxed);
        self.metrics.mqtt_connected.set(1);
        let wanted = subs.plan();
        let stale = std::mem::take(&mut subs.stale);
        subs.awaiting_acks = 0;
        if session_present {
            for filter in stale.difference(&wanted) {
                if self.client.try_unsubscribe(filter.clone()).is_ok() {
                    subs.awaiting_acks += 1;
                }
            }
        }
        let all: Vec<_> = wanted
            .iter()
            .map(|f| rumqttc::SubscribeFilter::new(f.clone(), self.qos))
            .collect();
        if !all.is_empty() {
            match self.client.try_subscribe_many(all) {
                Ok(()) => subs.awaiting_acks += 1,
                Err(e) => tracing::warn!(error = %e, "could not queue the MQTT subscriptions"),
            }
        }
        self.metrics
            .mqtt_broker_subscriptions
            .set(wanted.len() as i64);
        tracing::info!(
            broker = %self.address,
            client_id = %self.client_id,
            subscriptions = ?wanted,
            session_present,
            "connected to the MQTT broker"
        );
        subs.broker = wanted;
    }

    fn acknowledged(&self) {
        let mut subs = lock(&self.subs);
        subs.awaiting_acks = subs.awaiting_acks.saturating_sub(1);
    }

    /// Records a failed attempt or a lost connection. Logged as a warning
    /// once per outage (the first failure), then at debug level, so a broker
    /// that stays down does not fill the log.
    fn on_error(&self, e: &ConnectionError, first_failure: bool) {
        self.metrics.mqtt_connection_errors.inc();
        if let ConnectionError::MqttState(rumqttc::StateError::Deserialization(
            rumqttc::Error::TopicNotUtf8,
        )) = e
        {
            // rumqttc cannot skip such a packet: the connection is dropped.
            self.metrics.mqtt_decode_failures.inc();
        }
        let was_connected = self.set_connected(false, &e.to_string());
        if was_connected {
            tracing::warn!(broker = %self.address, error = %e, "lost the MQTT broker connection; reconnecting");
        } else if first_failure {
            tracing::warn!(broker = %self.address, error = %e, "cannot connect to the MQTT broker; retrying with backoff");
        } else {
            tracing::debug!(broker = %self.address, error = %e, "MQTT broker connection failed");
        }
    }

    /// Follows one hub interest change: on-demand filters are subscribed on
    /// the broker while at least one local client wants them.
    fn on_interest(&self, change: &Interest) {
        let hub_filter = change.filter.as_str();
        if !self
            .config
            .on_demand
            .iter()
            .any(|p| is_under(hub_filter, p))
        {
            return;
        }
        let Some(mqtt_filter) = hub_filter
            .strip_prefix(self.config.prefix.as_str())
            .filter(|f| is_mqtt_filter(f))
            .and_then(|f| Filter::parse(f).ok())
        else {
            return;
        };
        let mut subs = lock(&self.subs);
        let changed = if change.active {
            subs.on_demand.insert(mqtt_filter)
        } else {
            subs.on_demand.remove(&mqtt_filter)
        };
        if changed {
            self.apply_plan(&mut subs);
        }
    }

    /// Brings the broker's subscriptions in line with what is wanted.
    /// New filters are subscribed before old ones are dropped, so a topic
    /// moving from a narrow filter to a broader one is never missed.
    fn apply_plan(&self, subs: &mut Subscriptions) {
        let wanted = subs.plan();
        if wanted == subs.broker {
            return;
        }
        let added: Vec<String> = wanted.difference(&subs.broker).cloned().collect();
        let removed: Vec<String> = subs.broker.difference(&wanted).cloned().collect();
        if subs.connected {
            for filter in &added {
                match self.client.try_subscribe(filter.clone(), self.qos) {
                    Ok(()) => subs.awaiting_acks += 1,
                    Err(e) => {
                        tracing::warn!(filter, error = %e, "could not queue an MQTT subscribe")
                    }
                }
            }
            for filter in &removed {
                match self.client.try_unsubscribe(filter.clone()) {
                    Ok(()) => subs.awaiting_acks += 1,
                    Err(e) => {
                        tracing::warn!(filter, error = %e, "could not queue an MQTT unsubscribe")
                    }
                }
            }
        } else {
            // Subscribed on reconnection; stale ones cleared then if needed.
            subs.stale.extend(removed.iter().cloned());
        }
        tracing::debug!(?added, ?removed, "MQTT subscriptions changed");
        self.metrics
            .mqtt_broker_subscriptions
            .set(wanted.len() as i64);
        subs.broker = wanted;
    }

    /// Publishes one broker message into the hub, or counts why not.
    fn on_publish(&self, hub: &Hub, topic: &str, bytes: &[u8]) {
        if bytes.len() > self.config.max_payload {
            self.metrics.mqtt_oversized.inc();
            if worth_logging(&self.oversized_seen) {
                tracing::warn!(
                    topic,
                    size = bytes.len(),
                    max = self.config.max_payload,
                    "dropping an MQTT message larger than mqtt.max_payload"
                );
            }
            return;
        }
        // With a broad filter standing in for several (see `plan`), some
        // messages were not asked for by anyone.
        if !lock(&self.subs).wants(topic) {
            return;
        }
        let hub_topic = format!("{}{}", self.config.prefix, topic);
        if let Err(why) = validate_name(&hub_topic) {
            self.metrics.mqtt_decode_failures.inc();
            if worth_logging(&self.bad_topic_seen) {
                tracing::warn!(
                    topic,
                    why,
                    "dropping an MQTT message whose topic is not a valid hub topic"
                );
            }
            return;
        }
        self.metrics.mqtt_messages_in.inc();
        self.metrics.published_from("mqtt");
        hub.publish(Message::new(hub_topic.into(), None, payload::decode(bytes)));
    }
}

/// Capped exponential backoff with "equal jitter": each delay is between
/// half and all of the current step, so many nodes restarting together do
/// not reconnect in lockstep.
struct Backoff {
    min: Duration,
    max: Duration,
    step: Duration,
}

impl Backoff {
    fn new(min: Duration, max: Duration) -> Self {
        Backoff {
            min,
            max,
            step: min,
        }
    }

    fn reset(&mut self) {
        self.step = self.min;
    }

    fn next_delay(&mut self) -> Duration {
        let step = self.step;
        self.step = (self.step * 2).min(self.max);
        step.mul_f64(0.5 + rand::random::<f64>() * 0.5)
    }
}

/// rustls with the ring provider; roots from `ca_file` or the system.
fn tls_config(ca_file: Option<&std::path::Path>) -> Result<rustls::ClientConfig, ConfigError> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;

    let mut roots = rustls::RootCertStore::empty();
    match ca_file {
        Some(path) => {
            let certs = CertificateDer::pem_file_iter(path)
                .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                .map_err(|e| ConfigError(format!("invalid setting `mqtt.ca_file`: {e}")))?;
            let (added, _) = roots.add_parsable_certificates(certs);
            if added == 0 {
                return Err(ConfigError(format!(
                    "invalid setting `mqtt.ca_file`: no certificate in {}",
                    path.display()
                )));
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            for e in &found.errors {
                tracing::warn!(error = %e, "could not load some system root certificates");
            }
            roots.add_parsable_certificates(found.certs);
        }
    }
    rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map(|b| b.with_root_certificates(roots).with_no_client_auth())
        .map_err(|e| ConfigError(format!("invalid setting `mqtt.url`: TLS: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap_with_jitter() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(800));
        let mut steps = vec![];
        for _ in 0..6 {
            steps.push(b.step);
            let d = b.next_delay();
            assert!(d >= steps.last().unwrap().mul_f64(0.5) && d <= *steps.last().unwrap());
        }
        let ms: Vec<u128> = steps.iter().map(|d| d.as_millis()).collect();
        assert_eq!(ms, vec![100, 200, 400, 800, 800, 800]);
        b.reset();
        assert_eq!(b.step, Duration::from_millis(100));
    }

    #[test]
    fn wants_follows_fixed_and_on_demand_filters() {
        let fixed = vec![
            Filter::parse("a/+/c").unwrap(),
            Filter::parse("a/b/#").unwrap(),
        ];
        let mut subs = Subscriptions {
            fixed_topics: fixed.clone(),
            fixed,
            ..Default::default()
        };
        assert_eq!(subs.plan().into_iter().collect::<Vec<_>>(), vec!["a/+/#"]);
        assert!(subs.wants("a/x/c") && subs.wants("a/b/z"));
        assert!(!subs.wants("a/x/d"), "let through by a/+/# but not wanted");
        subs.on_demand.insert(Filter::parse("s/1").unwrap());
        assert!(subs.wants("s/1"));

        // A shared subscription delivers its filter's topics.
        let shared = Subscriptions {
            fixed: vec![Filter::parse("$share/pulso/t/#").unwrap()],
            fixed_topics: vec![Filter::parse(topics_of("$share/pulso/t/#")).unwrap()],
            ..Default::default()
        };
        assert!(shared.wants("t/1"));
        assert_eq!(
            shared.plan().into_iter().collect::<Vec<_>>(),
            vec!["$share/pulso/t/#"]
        );
    }
}
