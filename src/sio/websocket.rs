//! Socket.IO clients that open a WebSocket straight away
//! (`/socket.io/?EIO=4&transport=websocket`, as sails.io.js and clients
//! configured with `transports: ["websocket"]` do) are served by pulso
//! itself, on the same one-task connection as `/ws`
//! ([`crate::ws::connection`]): an idle socket costs a few KB instead of
//! socketioxide's ~22 KB, and a published message is encoded once as
//! `42/nsp,[event,payload]` for every recipient. Polling, and the upgrade
//! from polling, stay with socketioxide.
//!
//! Both Engine.IO 3 (socket.io 2.x, Sails) and 4 are spoken; the
//! notifications namespace works exactly as on socketioxide (the shared
//! [`Notifications`]): `get`/`post` virtual requests authenticate, nothing
//! else is served, and a socket must authenticate within `auth_timeout`.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Instant;

use super::packet::{self, engine, kind};
use super::{LABEL, Notifications};
use crate::gateway::Gateway;
use crate::hub::ConnId;
use crate::ws::close;
use crate::ws::connection::{Connection, Keepalive, Link, Protocol};
use crate::ws::handshake;
use crate::ws::outbox::Outbox;
use crate::ws::rate::{RateLimit, Verdict};

/// What the middleware needs, built once per server.
#[derive(Clone)]
pub struct Transport {
    gw: Arc<Gateway>,
    /// The notifications namespace, leaked once per server so that every
    /// queued event can name it without a reference count.
    nsp: &'static str,
}

impl Transport {
    pub fn new(gw: &Arc<Gateway>) -> Self {
        let nsp: &'static str = Box::leak(gw.config.socketio.namespace.clone().into_boxed_str());
        Transport {
            gw: gw.clone(),
            nsp,
        }
    }
}

/// Which Engine.IO version a request opens a direct WebSocket for, if it
/// does: `EIO=3|4`, `transport=websocket`, no `sid` (an upgrade of a
/// polling session belongs to socketioxide).
fn direct_websocket(query: Option<&str>) -> Option<bool> {
    let mut eio3 = None;
    let mut websocket = false;
    for pair in query?.split('&') {
        match pair.split_once('=').unwrap_or((pair, "")) {
            ("EIO", "3") => eio3 = Some(true),
            ("EIO", "4") => eio3 = Some(false),
            ("transport", "websocket") => websocket = true,
            ("sid", _) => return None,
            _ => {}
        }
    }
    eio3.filter(|_| websocket)
}

/// Middleware in front of socketioxide: takes the direct WebSocket
/// connections, passes everything else on.
pub async fn intercept(State(t): State<Transport>, request: Request, next: Next) -> Response {
    let eio3 = match direct_websocket(request.uri().query()) {
        Some(eio3)
            if request.uri().path().trim_end_matches('/') == super::PATH.trim_end_matches('/') =>
        {
            eio3
        }
        _ => return next.run(request).await,
    };
    let (parts, _body) = request.into_parts();
    let (response, on_upgrade) = match handshake::accept(parts) {
        Ok(accepted) => accepted,
        Err(e) => return e.into_response(),
    };
    let tracker = t.gw.connections.clone();
    tokio::spawn(tracker.track_future(async move {
        match on_upgrade.await {
            Ok(upgraded) => run(t, TokioIo::new(upgraded), eio3).await,
            Err(e) => tracing::debug!(error = %e, "socket.io upgrade failed"),
        }
    }));
    response
}

/// One Engine.IO connection on pulso's transport.
struct Socket {
    gw: Arc<Gateway>,
    nsp: &'static str,
    eio3: bool,
    engine_id: String,
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

async fn run<S>(t: Transport, io: S, eio3: bool)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let gw = t.gw;
    let cfg = &gw.config;
    let outbox = Arc::new(Outbox::for_events(
        cfg.ws.outbound_queue,
        gw.metrics.clone(),
        t.nsp,
    ));
    let conn = gw.hub.register(outbox.clone());
    if gw.shutdown.is_cancelled() {
        outbox.close(Some((close::GOING_AWAY, "server shutting down")));
    }
    let engine_id = new_sid();
    // Engine.IO's heartbeat is `keepalive_interval`, like /ws's pings: the
    // ping interval, and as long again for the answer.
    let interval = cfg.keepalive_interval;
    outbox.push(crate::ws::outbox::Outbound::Frame(packet::open(
        &engine_id,
        interval.as_millis(),
        interval.as_millis(),
        cfg.ws.max_message_size,
    )));
    if eio3 {
        // Engine.IO 3 clients are in the root namespace without asking.
        outbox.push(crate::ws::outbox::Outbound::Frame(packet::connected(
            "/", "", true,
        )));
    }
    // Built in place: a named local moved into the connection would still
    // take room in this task's state.
    let mut connection = Connection::new(
        io,
        Socket {
            gw: gw.clone(),
            nsp: t.nsp,
            eio3,
            engine_id,
            conn,
            notifications: None,
            auth_deadline: Some(Instant::now() + cfg.socketio.auth_timeout),
            expiry: None,
            rate: RateLimit::new(cfg.ws.rate_limit, std::time::Instant::now()),
        },
        outbox,
        if eio3 {
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
        },
        cfg.ws.max_message_size,
        conn,
    );
    let reason = connection.serve().await;
    let socket = connection.protocol();
    socket.leave();
    gw.hub.unregister(conn);
    connection.finish(reason).await;
}

/// A 16-character id like socketioxide's.
fn new_sid() -> String {
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
            engine::PING => link.pong(packet::pong(&text[1..])),
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
