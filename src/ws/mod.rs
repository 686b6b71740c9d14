//! The plain WebSocket endpoint, `GET /ws`.
//!
//! Each connection runs two tasks: the reader (this module's [`Connection`])
//! parses requests and turns them into hub calls, and the writer drains the
//! connection's bounded outbound queue into the socket. Keeping the writer
//! apart means a client that stops reading only ever fills its own queue; the
//! hub sees the queue full, and the connection closes itself with 1013.

pub mod protocol;
pub mod rate;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{CloseFrame, Message as WsMessage, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::extract::{RawQuery, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use serde_json::value::RawValue;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::api::error::ApiError;
use crate::auth::Identity;
use crate::gateway::Gateway;
use crate::hub::{ConnId, Message, Recipient, SubscribeError, now_ms};
use protocol::{ClientError, Request};
use rate::{RateLimit, Verdict};

/// Close codes used by `/ws`.
pub mod close {
    pub const GOING_AWAY: u16 = 1001;
    pub const POLICY: u16 = 1008;
    pub const TOO_BIG: u16 = 1009;
    pub const TRY_AGAIN_LATER: u16 = 1013;
    pub const TOKEN_EXPIRED: u16 = 4003;
}

/// The token of an HTTP request: `Authorization: Bearer …`, else `?token=…`.
pub fn request_token(headers: &HeaderMap, query: Option<&str>) -> Option<String> {
    let bearer = crate::api::bearer_token(headers).map(str::to_string);
    bearer.or_else(|| {
        serde_urlencoded::from_str::<Vec<(String, String)>>(query?)
            .ok()?
            .into_iter()
            .find(|(k, _)| k == "token")
            .map(|(_, v)| v)
    })
}

pub async fn upgrade(
    State(gw): State<Arc<Gateway>>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    let token = request_token(&headers, query.as_deref()).unwrap_or_default();
    let identity = match gw.verifier.verify(&token) {
        Ok(identity) => identity,
        Err(e) => {
            gw.metrics.auth_failure(e.reason());
            return ApiError::from(e).into_response();
        }
    };
    let ws = match ws {
        Ok(ws) => ws,
        Err(rejection) => return rejection.into_response(),
    };
    let limit = gw.config.ws.max_message_size;
    let tracker = gw.connections.clone();
    ws.max_message_size(limit)
        .max_frame_size(limit)
        // Small reads suit small messages; the library's default is 128 KiB.
        .read_buffer_size(1024)
        .on_upgrade(move |socket| tracker.track_future(Connection::run(gw, socket, identity)))
}

/// What the writer task sends. Replies are boxed so that the item is two
/// words: the channel allocates its first block of 32 items for every
/// connection up front (512 B instead of 1 280 B), while replies are rare.
enum Outbound {
    Message(Arc<Message>),
    /// Last values replayed to a new subscription, in order. Boxed (not a
    /// boxed slice, which is two words) to keep the item two words.
    #[allow(clippy::box_collection)]
    Batch(Box<Vec<Arc<Message>>>),
    Text(Box<Utf8Bytes>),
    Ping,
}

impl Outbound {
    fn text(text: Utf8Bytes) -> Self {
        Outbound::Text(Box::new(text))
    }
}

/// How a connection ends: the first reason given wins.
struct Closer {
    token: CancellationToken,
    frame: Mutex<Option<Option<CloseFrame>>>,
}

impl Closer {
    fn new() -> Self {
        Closer {
            token: CancellationToken::new(),
            frame: Mutex::new(None),
        }
    }

    /// Ends the connection with a close frame (`None`: drop it without one).
    fn close(&self, frame: Option<(u16, &'static str)>) {
        let mut slot = self.frame.lock().unwrap_or_else(|e| e.into_inner());
        if slot.is_none() {
            *slot = Some(frame.map(|(code, reason)| CloseFrame {
                code,
                reason: Utf8Bytes::from_static(reason),
            }));
            self.token.cancel();
        }
    }

    fn take_frame(&self) -> Option<CloseFrame> {
        self.frame
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .flatten()
    }
}

/// The hub's handle on a `/ws` connection.
struct WsRecipient {
    tx: mpsc::Sender<Outbound>,
    closer: Arc<Closer>,
    gw: Arc<Gateway>,
}

impl WsRecipient {
    fn push(&self, item: Outbound) -> bool {
        match self.tx.try_send(item) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                if !self.closer.token.is_cancelled() {
                    self.gw.metrics.slow_consumer_closes.inc();
                    self.closer
                        .close(Some((close::TRY_AGAIN_LATER, "slow consumer")));
                }
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    }
}

impl Recipient for WsRecipient {
    fn deliver(&self, msg: &Arc<Message>) -> bool {
        self.push(Outbound::Message(msg.clone()))
    }

    fn deliver_batch(&self, msgs: Vec<Arc<Message>>) -> bool {
        self.push(Outbound::Batch(Box::new(msgs)))
    }
}

struct Connection {
    gw: Arc<Gateway>,
    id: ConnId,
    identity: Identity,
    deadline: Option<tokio::time::Instant>,
    /// The same handle the hub delivers through; replies share its queue.
    out: Arc<WsRecipient>,
    rate: RateLimit,
    alive: bool,
}

impl Connection {
    async fn run(gw: Arc<Gateway>, socket: WebSocket, identity: Identity) {
        let metrics = gw.metrics.clone();
        let label = [("protocol", "ws")];
        metrics.connections.get_or_create(&label).inc();
        metrics.connections_total.get_or_create(&label).inc();

        let (tx, rx) = mpsc::channel(gw.config.ws.outbound_queue);
        let closer = Arc::new(Closer::new());
        let out = Arc::new(WsRecipient {
            tx,
            closer: closer.clone(),
            gw: gw.clone(),
        });
        let id = gw.hub.register(out.clone());
        let (sink, stream) = socket.split();
        let writer = tokio::spawn(write_loop(sink, rx, closer.clone()));

        let deadline = deadline_of(&gw, &identity);
        let mut conn = Connection {
            rate: RateLimit::new(gw.config.ws.rate_limit, Instant::now()),
            gw: gw.clone(),
            id,
            identity,
            deadline,
            out,
            alive: true,
        };
        tracing::debug!(conn = id, sub = %conn.identity.sub, role = %conn.identity.role, "ws connected");
        // Presence (SPEC §7): the server assigns /ws socket ids. A refresh
        // keeps sub and role, so the row written here stays the right one.
        let holder = crate::presence::Holder {
            role: conn.identity.role.clone(),
            sub: conn.identity.sub.clone(),
            socket_id: format!("ws-{:016x}", rand::random::<u64>()),
            protocol: "ws",
        };
        gw.presence.set(holder.clone());
        conn.auto_subscribe();
        conn.read_loop(stream).await;

        gw.hub.unregister(id);
        gw.presence.clear(holder);
        // Let the writer send the close frame; it gives up on its own after a
        // bounded wait if the peer does not read.
        drop(conn);
        let _ = writer.await;
        metrics.connections.get_or_create(&label).dec();
        tracing::debug!(conn = id, "ws disconnected");
    }

    fn auto_subscribe(&mut self) {
        let gw = self.gw.clone();
        for topic in &gw.config.auto_subscribe {
            if let Ok(filter) = crate::hub::Filter::parse(topic) {
                let _ = gw.hub.subscribe_with_last_values(
                    self.id,
                    &filter,
                    gw.config.ws.max_subscriptions,
                    || {},
                );
            }
        }
    }

    async fn read_loop(&mut self, mut stream: SplitStream<WebSocket>) {
        let period = self.gw.config.keepalive_interval;
        let mut keepalive = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        keepalive.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let expiry = tokio::time::sleep_until(self.deadline.unwrap_or_else(far_future));
        tokio::pin!(expiry);
        let closer = self.out.closer.clone();
        let shutdown = self.gw.shutdown.clone();

        loop {
            tokio::select! {
                biased;
                _ = closer.token.cancelled() => return,
                _ = shutdown.cancelled() => {
                    closer.close(Some((close::GOING_AWAY, "server shutting down")));
                    return;
                }
                _ = &mut expiry, if self.deadline.is_some() => {
                    closer.close(Some((close::TOKEN_EXPIRED, "token expired")));
                    return;
                }
                _ = keepalive.tick() => {
                    if !self.alive {
                        tracing::debug!(conn = self.id, "no pong since the last ping; terminating");
                        closer.close(None);
                        return;
                    }
                    self.alive = false;
                    self.out.push(Outbound::Ping);
                }
                frame = stream.next() => match frame {
                    None => {
                        closer.close(None);
                        return;
                    }
                    Some(Err(e)) => {
                        if e.to_string().contains("Space limit exceeded") {
                            closer.close(Some((close::TOO_BIG, "message too big")));
                        } else {
                            tracing::debug!(conn = self.id, error = %e, "ws read failed");
                            closer.close(None);
                        }
                        return;
                    }
                    Some(Ok(WsMessage::Text(text))) => self.on_text(&text, &mut expiry),
                    Some(Ok(WsMessage::Binary(_))) => {
                        if self.admit(None) {
                            self.reply_error(None, &ClientError::new("unsupported_binary", "binary frames are not supported; send JSON text"));
                        }
                    }
                    Some(Ok(WsMessage::Pong(_))) => self.alive = true,
                    Some(Ok(WsMessage::Ping(_))) => {}
                    Some(Ok(WsMessage::Close(_))) => {
                        closer.close(None);
                        return;
                    }
                },
            }
        }
    }

    /// Applies the rate limit; false when the message must not be processed.
    fn admit(&mut self, id: Option<&RawValue>) -> bool {
        match self.rate.check(Instant::now()) {
            Verdict::Allow => true,
            Verdict::Refuse => {
                self.reply_error(
                    id,
                    &ClientError::new("rate_limited", "too many messages; slow down"),
                );
                false
            }
            Verdict::Close => {
                self.reply_error(
                    id,
                    &ClientError::new("rate_limited", "too many messages; closing"),
                );
                self.out
                    .closer
                    .close(Some((close::POLICY, "rate limit exceeded")));
                false
            }
        }
    }

    fn reply_error(&self, id: Option<&RawValue>, err: &ClientError) {
        self.gw.metrics.client_error(err.code);
        self.out.push(Outbound::text(protocol::error(id, err)));
    }

    fn on_text(&mut self, text: &str, expiry: &mut std::pin::Pin<&mut tokio::time::Sleep>) {
        let parsed = protocol::parse(text);
        if !self.admit(parsed.id) {
            return;
        }
        let id = parsed.id;
        let result = parsed
            .request
            .and_then(|request| self.apply(request, id, expiry));
        match result {
            Ok(Reply::Text(reply)) => {
                self.out.push(Outbound::text(reply));
            }
            Ok(Reply::Ack) => {
                if let Some(id) = id {
                    self.out.push(Outbound::text(protocol::ack(id)));
                }
            }
            Ok(Reply::Sent) => {}
            Err(err) => self.reply_error(id, &err),
        }
    }

    /// Carries out one request.
    fn apply(
        &mut self,
        request: Request,
        id: Option<&RawValue>,
        expiry: &mut std::pin::Pin<&mut tokio::time::Sleep>,
    ) -> Result<Reply, ClientError> {
        let gw = self.gw.clone();
        match request {
            Request::Sub(filter) => {
                if !gw.may_subscribe(&self.identity, &filter) {
                    return Err(ClientError::new(
                        "forbidden",
                        format!("role may not subscribe to `{filter}`"),
                    ));
                }
                // A new subscription queues its ack from inside the hub, just
                // ahead of the topic's last values (see the hub for why).
                let mut acked = false;
                let out = &self.out;
                let subscribed = gw.hub.subscribe_with_last_values(
                    self.id,
                    &filter,
                    gw.config.ws.max_subscriptions,
                    || {
                        if let Some(id) = id {
                            out.push(Outbound::text(protocol::ack(id)));
                        }
                        acked = true;
                    },
                );
                match subscribed {
                    Ok(_) if acked => Ok(Reply::Sent),
                    Ok(_) => Ok(Reply::Ack),
                    Err(SubscribeError::TooMany) => Err(ClientError::new(
                        "too_many_subscriptions",
                        format!(
                            "at most {} subscriptions per connection",
                            gw.config.ws.max_subscriptions
                        ),
                    )),
                    Err(SubscribeError::Closed) => Ok(Reply::Ack),
                }
            }
            Request::Unsub(filter) => {
                gw.hub.unsubscribe(self.id, &filter);
                Ok(Reply::Ack)
            }
            Request::Ping => Ok(Reply::Text(protocol::pong(id, now_ms()))),
            Request::Pub {
                topic,
                event,
                payload,
            } => {
                if !gw.may_publish(&self.identity, &topic) {
                    return Err(ClientError::new(
                        "forbidden",
                        format!("role may not publish on `{topic}`"),
                    ));
                }
                if let Some(bridge) = gw.mqtt.as_ref().filter(|b| b.forwards(&topic)) {
                    bridge
                        .forward(&topic, &payload)
                        .map_err(|e| ClientError::new(e.code(), e.to_string()))?;
                    return Ok(Reply::Ack);
                }
                gw.metrics.published_from("ws");
                gw.hub.publish(Message::new(topic, event, payload));
                Ok(Reply::Ack)
            }
            Request::Auth(token) => {
                let refreshed = gw
                    .verifier
                    .verify(&token)
                    .map_err(|e| ClientError::new("invalid_token", e.to_string()))?;
                if refreshed.sub != self.identity.sub || refreshed.role != self.identity.role {
                    return Err(ClientError::new(
                        "invalid_token",
                        "the token belongs to another identity",
                    ));
                }
                self.deadline = deadline_of(&gw, &refreshed);
                expiry
                    .as_mut()
                    .reset(self.deadline.unwrap_or_else(far_future));
                self.identity = refreshed;
                Ok(Reply::Ack)
            }
        }
    }
}

/// What answers a request that succeeded.
enum Reply {
    /// The plain ack (when the request had an `id`).
    Ack,
    /// A reply that replaces the ack (`pong`).
    Text(Utf8Bytes),
    /// Already queued (a new subscription's ack, ahead of its last values).
    Sent,
}

fn far_future() -> tokio::time::Instant {
    tokio::time::Instant::now() + Duration::from_secs(86400 * 365)
}

/// The instant the connection's token stops being valid, on tokio's clock.
fn deadline_of(gw: &Gateway, identity: &Identity) -> Option<tokio::time::Instant> {
    Some(crate::auth::instant_of(gw.verifier.deadline(identity)?))
}

/// How long the writer waits for a peer to take the close frame.
const CLOSE_GRACE: Duration = Duration::from_secs(2);

async fn write_loop(
    mut sink: SplitSink<WebSocket, WsMessage>,
    mut rx: mpsc::Receiver<Outbound>,
    closer: Arc<Closer>,
) {
    loop {
        let item = tokio::select! {
            biased;
            _ = closer.token.cancelled() => break,
            item = rx.recv() => match item {
                Some(item) => item,
                None => break,
            },
        };
        let frame = match item {
            Outbound::Message(msg) => WsMessage::Text(protocol::frame(&msg)),
            Outbound::Batch(msgs) => {
                let mut msgs = (*msgs).into_iter();
                let Some(last) = msgs.next_back() else {
                    continue;
                };
                let fed = tokio::select! {
                    fed = async {
                        for msg in msgs {
                            sink.feed(WsMessage::Text(protocol::frame(&msg))).await?;
                        }
                        Ok::<_, axum::Error>(())
                    } => fed,
                    _ = closer.token.cancelled() => break,
                };
                if fed.is_err() {
                    closer.close(None);
                    return;
                }
                WsMessage::Text(protocol::frame(&last))
            }
            Outbound::Text(text) => WsMessage::Text(*text),
            Outbound::Ping => WsMessage::Ping(bytes::Bytes::new()),
        };
        // Feed without flushing while more is queued: one write for a batch.
        // Before flushing a lone frame, yield once: a publish on another core
        // is usually still filling queues, and its next frame can then share
        // this write. A peer that stops reading blocks this send; the closer
        // still ends it.
        let sent = tokio::select! {
            sent = async {
                if rx.is_empty() {
                    tokio::task::yield_now().await;
                }
                if rx.is_empty() { sink.send(frame).await } else { sink.feed(frame).await }
            } => sent,
            _ = closer.token.cancelled() => break,
        };
        if sent.is_err() {
            closer.close(None);
            return;
        }
    }
    // Flush what is queued (replies to the last requests), then close.
    let frame = closer.take_frame();
    let finish = async {
        while let Ok(item) = rx.try_recv() {
            if let Outbound::Text(text) = item {
                sink.feed(WsMessage::Text(*text)).await?;
            }
        }
        if let Some(frame) = frame {
            sink.send(WsMessage::Close(Some(frame))).await?;
        }
        sink.close().await
    };
    let _ = tokio::time::timeout(CLOSE_GRACE, finish).await;
}
