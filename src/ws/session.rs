//! The `/ws` protocol (SPEC §3): JSON requests in text messages, answered
//! through hub calls. The connection it runs on is [`super::connection`].

use std::sync::Arc;

use bytes::Bytes;
use serde_json::value::RawValue;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Instant;

use super::protocol::{self, ClientError, Request};
use crate::auth::Identity;
use crate::gateway::Gateway;
use crate::hub::{ConnId, Message, SubscribeError, now_ms};
use crate::transport::close;
use crate::transport::connection::{Connection, Keepalive, Link, Protocol};
use crate::transport::outbox::{Outbound, Outbox};
use crate::transport::rate::{RateLimit, Verdict};

/// One authenticated `/ws` client.
struct Session {
    gw: Arc<Gateway>,
    id: ConnId,
    /// For answers sent later, from a task of their own.
    outbox: Arc<Outbox>,
    identity: Identity,
    rate: RateLimit,
    expiry: Option<Instant>,
}

/// Serves one upgraded connection until it ends.
pub async fn run<S>(gw: Arc<Gateway>, io: S, mut identity: Identity)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let label = [("protocol", "ws")];
    gw.metrics.connections.get_or_create(&label).inc();
    gw.metrics.connections_total.get_or_create(&label).inc();

    // Only Socket.IO rooms read other claims; a `/ws` connection keeps
    // role, sub and exp.
    identity.claims = Default::default();
    let outbox = Arc::new(Outbox::new(
        gw.config.ws.outbound_queue,
        gw.metrics.clone(),
        &protocol::JSON,
    ));
    let id = gw.hub.register(outbox.clone());
    // The server sweeps open connections when it stops; one that registered
    // after the sweep sees the flag here.
    if gw.shutdown.is_cancelled() {
        outbox.close(Some((close::GOING_AWAY, "server shutting down")));
    }
    tracing::debug!(conn = id, sub = %identity.sub, role = %identity.role, "ws connected");
    // Presence (SPEC §7): the server assigns /ws socket ids. A refresh keeps
    // sub and role, so the row written here stays the right one.
    let holder = crate::gateway::Holder {
        role: identity.role.clone(),
        sub: identity.sub.clone(),
        socket_id: format!("ws-{:016x}", rand::random::<u64>()),
        protocol: "ws",
    };
    let committed = gw.presence.set(holder.clone());
    // Built in place: a named local moved into the connection would still
    // take room in this task's state.
    let mut conn = Connection::new(
        io,
        Session {
            rate: RateLimit::new(gw.config.ws.rate_limit, std::time::Instant::now()),
            expiry: deadline_of(&gw, &identity),
            gw: gw.clone(),
            id,
            outbox: outbox.clone(),
            identity,
        },
        outbox,
        Keepalive {
            period: gw.config.keepalive_interval,
            ping: Some(crate::transport::frame::PING_FRAME),
        },
        gw.config.ws.max_message_size,
        id,
    );
    conn.protocol().auto_subscribe();
    // Read your writes (SPEC §7): nothing is answered before the row is
    // committed (or `presence.write_timeout` passed); what is published
    // meanwhile waits in the connection's rings.
    committed.wait().await;
    // In a cluster, likewise until the backplane carries the automatic
    // subscriptions.
    if let Some(subscribed) = gw.hub.backplane_subscribed() {
        subscribed.await;
    }
    let reason = conn.serve().await;
    gw.hub.unregister(id);
    gw.presence.clear(holder);
    gw.metrics.connections.get_or_create(&label).dec();
    tracing::debug!(conn = id, "ws disconnected");
    conn.finish(reason).await;
}

impl Protocol for Session {
    fn on_text(&mut self, link: &mut Link<'_>, text: &str) {
        let parsed = protocol::parse(text);
        if !self.admit(link, parsed.id) {
            return;
        }
        let id = parsed.id;
        match parsed
            .request
            .and_then(|request| self.apply(link, request, id))
        {
            Ok(Reply::Frame(reply)) => link.send(reply),
            Ok(Reply::Ack) => {
                if let Some(id) = id {
                    link.send(protocol::ack(id));
                }
            }
            Ok(Reply::Sent) => {}
            Err(err) => self.reply_error(link, id, &err),
        }
    }

    fn on_binary(&mut self, link: &mut Link<'_>, _data: &[u8]) {
        if self.admit(link, None) {
            self.reply_error(
                link,
                None,
                &ClientError::new(
                    "unsupported_binary",
                    "binary frames are not supported; send JSON text",
                ),
            );
        }
    }

    fn deadline(&self) -> Option<Instant> {
        self.expiry
    }

    fn on_deadline(&mut self, link: &mut Link<'_>) {
        link.end(Some((close::TOKEN_EXPIRED, "token expired")));
    }
}

impl Session {
    fn auto_subscribe(&self) {
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

    /// Applies the rate limit; false when the message must not be processed.
    fn admit(&mut self, link: &mut Link<'_>, id: Option<&RawValue>) -> bool {
        match self.rate.check(std::time::Instant::now()) {
            Verdict::Allow => true,
            Verdict::Refuse => {
                self.reply_error(
                    link,
                    id,
                    &ClientError::new("rate_limited", "too many messages; slow down"),
                );
                false
            }
            Verdict::Close => {
                self.reply_error(
                    link,
                    id,
                    &ClientError::new("rate_limited", "too many messages; closing"),
                );
                link.end(Some((close::POLICY, "rate limit exceeded")));
                false
            }
        }
    }

    /// Replies go through the outbox, behind anything the hub queued.
    fn reply_error(&self, link: &Link<'_>, id: Option<&RawValue>, err: &ClientError) {
        self.gw.metrics.client_error(err.code);
        link.send(protocol::error(id, err));
    }

    /// Carries out one request.
    fn apply(
        &mut self,
        link: &Link<'_>,
        request: Request,
        id: Option<&RawValue>,
    ) -> Result<Reply, ClientError> {
        let gw = self.gw.clone();
        match request {
            Request::Sub(filter, since) => {
                if !gw.may_subscribe(&self.identity, &filter) {
                    return Err(ClientError::new(
                        "forbidden",
                        format!("role may not subscribe to `{filter}`"),
                    ));
                }
                if let Some(since) = since {
                    return self.recover(link, &filter, &since, id);
                }
                // A new subscription queues its ack from inside the hub, just
                // ahead of the topic's last values (see the hub for why);
                // in a cluster the ack waits for the backplane instead.
                let clustered = gw.hub.clustered();
                let mut acked = false;
                let outbox = link.outbox;
                let subscribed = gw.hub.subscribe_with_last_values(
                    self.id,
                    &filter,
                    gw.config.ws.max_subscriptions,
                    || {
                        if clustered {
                            return;
                        }
                        if let Some(id) = id {
                            outbox.push(Outbound::Frame(protocol::ack(id)));
                        }
                        acked = true;
                    },
                );
                match subscribed {
                    Ok(_) if acked => Ok(Reply::Sent),
                    Ok(_) => match (id, gw.hub.backplane_subscribed()) {
                        // Whatever any node publishes after the ack reaches
                        // this client (SPEC §8).
                        (Some(id), Some(subscribed)) => {
                            let (ack, outbox) = (protocol::ack(id), self.outbox.clone());
                            tokio::spawn(async move {
                                subscribed.await;
                                outbox.push(Outbound::Frame(ack));
                            });
                            Ok(Reply::Sent)
                        }
                        _ => Ok(Reply::Ack),
                    },
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
            Request::Ping => Ok(Reply::Frame(protocol::pong(id, now_ms()))),
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
                if let Some(upstream) = gw.upstream.as_ref().filter(|u| u.forwards(&topic)) {
                    upstream
                        .forward(&topic, &payload)
                        .map_err(|e| ClientError::new(e.code, e.message))?;
                    return Ok(Reply::Ack);
                }
                gw.metrics.published_from("ws");
                gw.hub.publish(Message::new(topic, event, payload));
                Ok(Reply::Ack)
            }
            Request::Auth(token) => {
                let mut refreshed = gw
                    .verifier
                    .verify(&token)
                    .map_err(|e| ClientError::new("invalid_token", e.to_string()))?;
                if refreshed.sub != self.identity.sub || refreshed.role != self.identity.role {
                    return Err(ClientError::new(
                        "invalid_token",
                        "the token belongs to another identity",
                    ));
                }
                self.expiry = deadline_of(&gw, &refreshed);
                refreshed.claims = Default::default();
                self.identity = refreshed;
                Ok(Reply::Ack)
            }
        }
    }
}

impl Session {
    /// `sub` with `since` (SPEC §11): the ack says whether every missed
    /// message follows it; the missed messages come next, then live ones.
    /// The ack is sent even without an `id`: the client needs `recovered`.
    fn recover(
        &self,
        link: &Link<'_>,
        filter: &crate::hub::Filter,
        since: &crate::hub::history::Since,
        id: Option<&RawValue>,
    ) -> Result<Reply, ClientError> {
        let gw = &self.gw;
        if gw.hub.history_in_backplane() {
            self.recover_from_backplane(filter, since, id);
            return Ok(Reply::Sent);
        }
        let clustered = gw.hub.clustered();
        let outbox = link.outbox;
        let mut answer = None;
        let subscribed = gw.hub.subscribe_since(
            self.id,
            filter,
            gw.config.ws.max_subscriptions,
            since,
            |recovered| {
                answer = Some(recovered);
                if !clustered {
                    outbox.push(Outbound::Frame(protocol::ack_recovered(id, recovered)));
                }
            },
        );
        match subscribed {
            Ok(_) => {}
            Err(SubscribeError::TooMany) => {
                return Err(ClientError::new(
                    "too_many_subscriptions",
                    format!(
                        "at most {} subscriptions per connection",
                        gw.config.ws.max_subscriptions
                    ),
                ));
            }
            Err(SubscribeError::Closed) => return Ok(Reply::Sent),
        }
        match answer {
            // A subscription that existed: nothing was replayed.
            None => {
                link.send(protocol::ack_recovered(id, false));
                Ok(Reply::Sent)
            }
            Some(_) if !clustered => Ok(Reply::Sent),
            // In a cluster the ack waits for the backplane (and so follows
            // the replayed messages).
            Some(recovered) => {
                let ack = protocol::ack_recovered(id, recovered);
                match gw.hub.backplane_subscribed() {
                    Some(subscribed) => {
                        let outbox = self.outbox.clone();
                        tokio::spawn(async move {
                            subscribed.await;
                            outbox.push(Outbound::Frame(ack));
                        });
                    }
                    None => link.send(ack),
                }
                Ok(Reply::Sent)
            }
        }
    }
}

impl Session {
    /// `sub` with `since` when the cluster's backplane keeps the history:
    /// in a task of its own, so this connection's other requests go on
    /// meanwhile. The topic is followed on the backplane first, then what
    /// the backplane holds of it is fetched and joined to what arrived
    /// since, so the replay and the live messages meet with no gap and no
    /// duplicate; the ack (with `recovered`) goes ahead of the replay.
    fn recover_from_backplane(
        &self,
        filter: &crate::hub::Filter,
        since: &crate::hub::history::Since,
        id: Option<&RawValue>,
    ) {
        let (gw, outbox, conn) = (self.gw.clone(), self.outbox.clone(), self.id);
        let (filter, since) = (filter.clone(), since.clone());
        let id: Option<Box<RawValue>> = id.map(ToOwned::to_owned);
        tokio::spawn(async move {
            let id = id.as_deref();
            let _prepared = gw.hub.prepare_recovery(std::slice::from_ref(&filter)).await;
            let limit = gw.config.ws.max_subscriptions;
            let subscribed = gw
                .hub
                .subscribe_since(conn, &filter, limit, &since, |recovered| {
                    outbox.push(Outbound::Frame(protocol::ack_recovered(id, recovered)));
                });
            match subscribed {
                Ok(true) | Err(SubscribeError::Closed) => {}
                // A subscription that existed: nothing was replayed.
                Ok(false) => {
                    outbox.push(Outbound::Frame(protocol::ack_recovered(id, false)));
                }
                Err(SubscribeError::TooMany) => {
                    let err = ClientError::new(
                        "too_many_subscriptions",
                        format!("at most {limit} subscriptions per connection"),
                    );
                    gw.metrics.client_error(err.code);
                    outbox.push(Outbound::Frame(protocol::error(id, &err)));
                }
            }
        });
    }
}

/// What answers a request that succeeded.
enum Reply {
    /// The plain ack (when the request had an `id`).
    Ack,
    /// A reply that replaces the ack (`pong`).
    Frame(Bytes),
    /// Already queued (a new subscription's ack, ahead of its last values).
    Sent,
}

/// The instant the connection's token stops being valid, on tokio's clock.
fn deadline_of(gw: &Gateway, identity: &Identity) -> Option<Instant> {
    Some(crate::auth::instant_of(gw.verifier.deadline(identity)?))
}
