//! One Engine.IO session, whatever transport carries it: the Socket.IO
//! packets a client sends, the notifications namespace they open, and the
//! deadlines (authentication, token expiry) that end it.
//!
//! A session starts on WebSocket ([`super::websocket`]) or on long-polling
//! ([`super::polling`]) and may move from polling to WebSocket once: the
//! [`Socket`] and its [`Outbox`] move with it, so nothing queued is lost
//! or reordered. Handlers never await; a transport calls them with a
//! [`Link`] to its outbox.

use std::sync::Arc;

use serde_json::Value;
use tokio::time::Instant;

use super::packet::{self, engine, kind};
use super::{LABEL, Notifications};
use crate::gateway::Gateway;
use crate::hub::ConnId;
use crate::ws::close;
use crate::ws::connection::{Keepalive, Link, Protocol};
use crate::ws::outbox::{Outbound, Outbox};
use crate::ws::rate::{RateLimit, Verdict};

/// One Engine.IO session.
pub(crate) struct Socket {
    gw: Arc<Gateway>,
    nsp: &'static str,
    eio3: bool,
    engine_id: Box<str>,
    /// The hub handle (the outbox): registered from the start so that a
    /// server shutdown reaches unauthenticated sockets too; subscribed to
    /// rooms once the socket authenticates.
    conn: ConnId,
    /// The notifications namespace, once the client has joined it.
    notifications: Option<Notifications>,
    /// The socket must authenticate before this (cleared once it has).
    auth_deadline: Option<Instant>,
    /// When its token stops being valid.
    expiry: Option<Instant>,
    /// `ws.rate_limit`, applied to Socket.IO packets.
    rate: RateLimit,
}

impl Socket {
    /// Opens a session: its outbox is in the hub, and holds the OPEN packet
    /// (offering the upgrade to WebSocket when `upgrades`) and, for
    /// Engine.IO 3, the root namespace's CONNECT.
    pub(crate) fn open(
        gw: &Arc<Gateway>,
        nsp: &'static str,
        eio3: bool,
        upgrades: bool,
    ) -> (Socket, Arc<Outbox>) {
        let cfg = &gw.config;
        let outbox = Arc::new(Outbox::for_events(
            cfg.ws.outbound_queue,
            gw.metrics.clone(),
            nsp,
        ));
        let conn = gw.hub.register(outbox.clone());
        if gw.shutdown.is_cancelled() {
            outbox.close(Some((close::GOING_AWAY, "server shutting down")));
        }
        let engine_id = new_sid();
        // Engine.IO's heartbeat is `keepalive_interval`, like /ws's pings:
        // the ping interval, and as long again for the answer.
        let interval = cfg.keepalive_interval.as_millis();
        outbox.push(Outbound::Frame(packet::open(
            &engine_id,
            upgrades,
            interval,
            interval,
            cfg.ws.max_message_size,
        )));
        if eio3 {
            // Engine.IO 3 clients are in the root namespace without asking.
            outbox.push(Outbound::Frame(packet::connected("/", "", true)));
        }
        let socket = Socket {
            gw: gw.clone(),
            nsp,
            eio3,
            engine_id: engine_id.into_boxed_str(),
            conn,
            notifications: None,
            auth_deadline: Some(Instant::now() + cfg.socketio.auth_timeout),
            expiry: None,
            rate: RateLimit::new(cfg.ws.rate_limit, std::time::Instant::now()),
        };
        (socket, outbox)
    }

    pub(crate) fn engine_id(&self) -> &str {
        &self.engine_id
    }

    pub(crate) fn conn(&self) -> ConnId {
        self.conn
    }

    /// The liveness check of this session's transport.
    pub(crate) fn keepalive(&self) -> Keepalive {
        let interval = self.gw.config.keepalive_interval;
        if self.eio3 {
            // The client pings; one missing for a whole interval plus
            // timeout ends the connection.
            Keepalive {
                period: interval * 2,
                ping: None,
            }
        } else {
            // The server pings; a client silent since the last ping is
            // dropped at the next.
            Keepalive {
                period: interval,
                ping: Some(packet::PING_FRAME),
            }
        }
    }

    /// The session is over: leaves the namespace and the hub.
    pub(crate) fn close(&mut self) {
        self.leave();
        self.gw.hub.unregister(self.conn);
    }
}

/// A 16-character id, like socket.io's.
pub(crate) fn new_sid() -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut bits: u128 = rand::random();
    (0..16)
        .map(|_| {
            let c = ALPHABET[(bits & 63) as usize] as char;
            bits >>= 6;
            c
        })
        .collect()
}

impl Socket {
    /// Leaves the notifications namespace, if joined.
    fn leave(&mut self) {
        if let Some(mut n) = self.notifications.take() {
            n.finish();
            self.gw.metrics.connections.get_or_create(&LABEL).dec();
        }
    }

    /// Ends the connection with DISCONNECT in the namespace: the client
    /// takes it as final and does not reconnect (a failed or lapsed
    /// authentication). Every other end is a plain close, after which
    /// socket.io clients reconnect (shutdown, slow consumer, bad input).
    fn disconnect(&mut self, link: &mut Link<'_>, reason: &'static str) {
        if self.notifications.is_some() {
            link.send(packet::disconnect(self.nsp));
        }
        link.end(Some((close::NORMAL, reason)));
    }

    fn on_packet(&mut self, link: &mut Link<'_>, text: &str) {
        let p = match packet::parse(text) {
            Ok(p) => p,
            Err(why) => {
                tracing::debug!(why, "invalid socket.io packet");
                return link.end(Some((close::PROTOCOL_ERROR, why)));
            }
        };
        let ours = p.nsp == self.nsp;
        // Events count against `ws.rate_limit`; CONNECT and DISCONNECT are
        // state changes that are always answered.
        if matches!(p.kind, kind::EVENT | kind::BINARY_EVENT) {
            let verdict = self.rate.check(std::time::Instant::now());
            if verdict != Verdict::Allow {
                return self.refuse(link, &p, verdict);
            }
        }
        match p.kind {
            kind::CONNECT if ours => self.join(link),
            kind::CONNECT if p.nsp == "/" => {
                link.send(packet::connected("/", &new_sid(), self.eio3));
            }
            kind::CONNECT => {
                link.send(packet::connect_error(p.nsp, "Invalid namespace", self.eio3));
            }
            kind::DISCONNECT if ours => {
                // Its only namespace is gone: so is the connection.
                self.leave();
                link.end(Some((close::NORMAL, "")));
            }
            kind::EVENT | kind::BINARY_EVENT if ours => self.on_event(link, &p),
            // The root namespace serves nothing; acks answer nothing of ours.
            _ => {}
        }
    }

    /// An event over the rate limit: not processed; one that asked for an
    /// ack gets 429-1, and a client refused in three seconds running is
    /// closed (1008), as on `/ws`.
    fn refuse(&mut self, link: &mut Link<'_>, p: &packet::Packet<'_>, verdict: Verdict) {
        let failure = super::request::Failure::rate_limited();
        self.gw.metrics.client_error(failure.code);
        if let Some(id) = p.ack {
            link.send(packet::ack(p.nsp, id, &failure.ack()));
        }
        if verdict == Verdict::Close {
            link.end(Some((close::POLICY, "rate limit exceeded")));
        }
    }

    fn join(&mut self, link: &mut Link<'_>) {
        let (gw, eio3, engine_id, nsp) = (&self.gw, self.eio3, &self.engine_id, self.nsp);
        let n = self.notifications.get_or_insert_with(|| {
            gw.metrics.connections.get_or_create(&LABEL).inc();
            gw.metrics.connections_total.get_or_create(&LABEL).inc();
            // What the client sees as `socket.id`.
            let socket_id = if eio3 {
                format!("{nsp}#{engine_id}")
            } else {
                new_sid()
            };
            Notifications::new(gw.clone(), socket_id)
        });
        let sid = if eio3 { "" } else { n.socket_id() };
        link.send(packet::connected(nsp, sid, eio3));
    }

    fn on_event(&mut self, link: &mut Link<'_>, p: &packet::Packet<'_>) {
        let Some(n) = self.notifications.as_mut() else {
            return;
        };
        let (ack, disconnect) = if p.kind == kind::BINARY_EVENT {
            // Binary attachments follow as frames of their own; they are
            // ignored (see `on_binary`) and so is the event. Like any failed
            // request, it disconnects a socket that has not authenticated.
            let failure = super::request::Failure::malformed("binary payloads are not supported");
            self.gw.metrics.client_error(failure.code);
            (failure.ack(), !n.authed())
        } else {
            match packet::event_args(p.data) {
                Some((name, args)) if name == "get" || name == "post" => {
                    // The first argument is the request; others are ignored.
                    let v: Value = args
                        .first()
                        .and_then(|a| serde_json::from_str(a.get()).ok())
                        .unwrap_or(Value::Null);
                    let conn = self.conn;
                    let reply = n.request(&v, || conn);
                    self.expiry = n.deadline().map(crate::auth::instant_of);
                    if n.authed() {
                        self.auth_deadline = None;
                    }
                    reply
                }
                Some((name, _)) => (n.other_event(&name), false),
                None => {
                    tracing::debug!("socket.io event without a name");
                    return link.end(Some((close::PROTOCOL_ERROR, "invalid event")));
                }
            }
        };
        if let Some(id) = p.ack {
            link.send(packet::ack(self.nsp, id, &ack));
        }
        if disconnect {
            self.disconnect(link, "");
        }
    }
}

impl Protocol for Socket {
    fn on_text(&mut self, link: &mut Link<'_>, text: &str) {
        let Some(&first) = text.as_bytes().first() else {
            return link.end(Some((close::PROTOCOL_ERROR, "empty Engine.IO packet")));
        };
        match first {
            engine::MESSAGE => self.on_packet(link, &text[1..]),
            // Every ping gets its own answer, in order with other replies
            // and counted against the outbox's limit like them.
            engine::PING => link.send(packet::pong(&text[1..])),
            engine::CLOSE => link.end(Some((close::NORMAL, ""))),
            engine::PONG | engine::UPGRADE | engine::NOOP => {}
            _ => link.end(Some((close::PROTOCOL_ERROR, "invalid Engine.IO packet"))),
        }
    }

    fn on_binary(&mut self, _link: &mut Link<'_>, _data: &[u8]) {
        // Attachments of a binary event, refused in `on_event`.
    }

    fn deadline(&self) -> Option<Instant> {
        match (self.auth_deadline, self.expiry) {
            (Some(a), Some(e)) => Some(a.min(e)),
            (a, e) => a.or(e),
        }
    }

    fn on_deadline(&mut self, link: &mut Link<'_>) {
        let now = Instant::now();
        if self.auth_deadline.is_some_and(|d| now >= d) {
            if self.notifications.is_some() {
                tracing::debug!(engine = %self.engine_id, "auth_timeout reached; disconnecting");
                self.gw.metrics.sio_auth_result("timeout");
            }
            self.disconnect(link, "auth timeout");
        } else if self.expiry.is_some_and(|e| now >= e) {
            tracing::debug!(engine = %self.engine_id, "token expired; disconnecting");
            self.disconnect(link, "token expired");
        }
    }
}
