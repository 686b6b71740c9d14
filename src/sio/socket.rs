//! One Engine.IO session, whatever transport carries it: the Socket.IO
//! packets a client sends, the notifications namespace they open, and the
//! deadlines (authentication, token expiry) that end it.
//!
//! A session starts on WebSocket ([`super::websocket`]) or on long-polling
//! ([`super::polling`]) and may move from polling to WebSocket once: the
//! [`Socket`] and its [`Outbox`] move with it, so nothing queued is lost
//! or reordered. Handlers never await; a transport calls them with a
//! [`Link`] to its outbox.
//!
//! With connection state recovery on (Engine.IO 4 and `history.topics`),
//! a namespace socket that is still open when the session ends is kept
//! ([`super::recovery`]), and a CONNECT that names its pid may get it back
//! ([`Socket::join`]).

use std::sync::Arc;
use std::sync::atomic::AtomicUsize;

use serde_json::Value;
use tokio::time::Instant;

use super::packet::{self, engine, kind};
use super::proxy::{self, Proxy};
use super::recovery::{self, Store};
use super::{Answer, LABEL, Notifications, Transport};
use crate::gateway::Gateway;
use crate::gateway::admission::Permit;
use crate::hub::ConnId;
use crate::transport::close;
use crate::transport::connection::{Keepalive, Link, Protocol};
use crate::transport::outbox::{Outbound, Outbox};

use crate::transport::rate::{RateLimit, Verdict};

/// One Engine.IO session.
pub(crate) struct Socket {
    gw: Arc<Gateway>,
    nsp: &'static str,
    eio3: bool,
    engine_id: Box<str>,
    /// The hub handle (the outbox): registered from the start so that a
    /// server shutdown reaches unauthenticated sockets too; the
    /// notifications namespace's socket subscribes it to its rooms.
    conn: ConnId,
    outbox: Arc<Outbox>,
    /// The namespace sockets the client opened: [`NSP`] (the notifications
    /// namespace, on `conn`) and [`ROOT`] (the root namespace, which serves
    /// the same requests, on the outbox's lane). A client may have both.
    sockets: [Option<Notifications>; 2],
    /// The root namespace's hub handle, registered with its first socket.
    root_conn: Option<ConnId>,
    /// No socket has authenticated yet: the connection ends at this instant.
    auth_deadline: Option<Instant>,
    /// When the first authenticated socket's token stops being valid.
    expiry: Option<Instant>,
    /// `ws.rate_limit`, applied to Socket.IO packets.
    rate: RateLimit,
    /// Where sockets are kept for recovery (`None`: Engine.IO 3, or
    /// `history.topics` is empty).
    recovery: Option<Arc<Store>>,
    /// The application's backend (`socketio.proxy_url`).
    proxy: Option<Arc<Proxy>>,
    /// This connection's requests in flight to the backend.
    proxied: Arc<AtomicUsize>,
    closed: bool,
    /// A socket recovered from a session another node kept, made ready by
    /// a task of its own ([`Socket::recover_elsewhere`]), installed in its
    /// slot before anything else happens on the connection.
    pending: Arc<std::sync::Mutex<Option<(usize, Notifications)>>>,
    /// Its place among the open connections, freed with it.
    _permit: Permit,
}

/// The notifications namespace's slot in [`Socket::sockets`].
const NSP: usize = 0;
/// The root namespace's slot.
const ROOT: usize = 1;

impl Socket {
    /// Opens a session: its outbox is in the hub, and holds the OPEN packet
    /// (offering the upgrade to WebSocket when `upgrades`) and, for
    /// Engine.IO 3, the root namespace's CONNECT.
    pub(crate) fn open(
        t: &Transport,
        eio3: bool,
        upgrades: bool,
        permit: Permit,
    ) -> (Socket, Arc<Outbox>) {
        let (gw, nsp, events) = (&t.gw, t.nsp, t.events);
        let cfg = &gw.config;
        let outbox = Arc::new(Outbox::new(
            cfg.ws.outbound_queue,
            gw.metrics.clone(),
            events,
        ));
        let conn = gw.hub.register(outbox.clone());
        gw.metrics.connections.get_or_create(&LABEL).inc();
        gw.metrics.connections_total.get_or_create(&LABEL).inc();
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
            outbox.push(Outbound::Frame(packet::connected("/", "", None, true)));
        }
        let socket = Socket {
            gw: gw.clone(),
            nsp,
            eio3,
            engine_id: engine_id.into_boxed_str(),
            conn,
            outbox: outbox.clone(),
            sockets: [None, None],
            root_conn: None,
            auth_deadline: Some(Instant::now() + cfg.socketio.auth_timeout),
            expiry: None,
            rate: RateLimit::new(cfg.ws.rate_limit, std::time::Instant::now()),
            // Engine.IO 3 clients (socket.io-client 2.x) have no recovery.
            recovery: if eio3 { None } else { t.recovery.clone() },
            proxy: t.proxy.clone(),
            proxied: Arc::default(),
            closed: false,
            pending: Arc::default(),
            _permit: permit,
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

    /// The session is over: keeps its open sockets for recovery (their
    /// transport was lost: every deliberate end left them already), then
    /// leaves its namespaces and the hub.
    pub(crate) fn close(&mut self) {
        if std::mem::replace(&mut self.closed, true) {
            return;
        }
        self.install_pending();
        if let Some(store) = &self.recovery {
            for slot in [NSP, ROOT] {
                if let Some((pid, saved)) = self.sockets[slot]
                    .as_ref()
                    .and_then(|n| n.to_keep(self.name(slot)))
                {
                    // The other nodes' copy: `history.ttl` from now.
                    if let Some(shared) = &self.gw.sessions {
                        shared.save(pid, recovery::encode(&saved), false);
                    }
                    store.keep(pid, saved);
                }
            }
        }
        self.leave(NSP);
        self.leave(ROOT);
        self.gw.hub.unregister(self.conn);
        if let Some(root) = self.root_conn {
            self.gw.hub.unregister(root);
        }
        self.gw.metrics.connections.get_or_create(&LABEL).dec();
    }
}

/// A kept session a client may have back with its last `offset`, and
/// where that offset is (epoch, sequence); else the recovery's outcome.
fn usable(
    saved: Option<recovery::Saved>,
    offset: &str,
) -> Result<(recovery::Saved, &str, u64), &'static str> {
    let saved = saved.ok_or("unknown_session")?;
    if saved
        .deadline
        .is_some_and(|d| d <= std::time::SystemTime::now())
    {
        return Err("token_expired");
    }
    let (epoch, after) = packet::parse_offset(offset).ok_or("reload")?;
    Ok((saved, epoch, after))
}

/// A 16-character id, like socket.io's.
pub(crate) fn new_sid() -> String {
    crate::hub::random_id()
}

impl Socket {
    /// The slot of namespace `nsp`, if it is one of the two served.
    fn slot(&self, nsp: &str) -> Option<usize> {
        if nsp == self.nsp {
            Some(NSP)
        } else if nsp == "/" {
            Some(ROOT)
        } else {
            None
        }
    }

    fn name(&self, slot: usize) -> &'static str {
        if slot == NSP { self.nsp } else { "/" }
    }

    /// The hub handle of the namespace in `slot`.
    fn slot_conn(&mut self, slot: usize) -> ConnId {
        if slot == NSP {
            self.conn
        } else {
            *self.root_conn.get_or_insert_with(|| {
                self.outbox
                    .add_lane(&self.gw.hub, &packet::ROOT_EVENTS)
                    .unwrap_or(self.conn)
            })
        }
    }

    /// The namespace socket in `slot`, opened if it is not yet.
    fn open_socket(&mut self, slot: usize) -> &mut Notifications {
        let socket = match self.sockets[slot].take() {
            Some(open) => open,
            None => {
                // What the client sees as `socket.id`: Engine.IO 3 clients
                // derive it from the engine id, Engine.IO 4 clients are told.
                let socket_id = match (self.eio3, self.name(slot)) {
                    (true, "/") => self.engine_id.to_string(),
                    (true, nsp) => format!("{nsp}#{}", self.engine_id),
                    (false, _) => new_sid(),
                };
                let conn = self.slot_conn(slot);
                let pid = self.recovery.as_ref().map(|_| recovery::new_pid());
                Notifications::new(self.gw.clone(), socket_id, conn, pid)
            }
        };
        self.sockets[slot].insert(socket)
    }

    /// Leaves the namespace in `slot`, if joined.
    fn leave(&mut self, slot: usize) {
        if let Some(mut n) = self.sockets[slot].take() {
            n.finish();
        }
        self.update_deadlines();
    }

    /// The connection's deadlines after a socket authenticated, refreshed
    /// its token, or left.
    fn update_deadlines(&mut self) {
        let authed = self.sockets.iter().flatten().filter(|n| n.authed());
        self.expiry = authed
            .filter_map(Notifications::deadline)
            .map(crate::auth::instant_of)
            .min();
        if self.sockets.iter().flatten().any(Notifications::authed) {
            self.auth_deadline = None;
        }
    }

    /// Disconnects the socket in `slot` (a DISCONNECT the client takes as
    /// final: a failed or lapsed authentication); the connection ends
    /// with its last socket. Every other end is a plain close, after
    /// which socket.io clients reconnect (shutdown, slow consumer, bad
    /// input).
    fn disconnect(&mut self, link: &mut Link<'_>, slot: usize, reason: &'static str) {
        if self.sockets[slot].is_some() {
            link.send(packet::disconnect(self.name(slot)));
            self.forget_session(slot);
            self.leave(slot);
        }
        if self.sockets.iter().all(Option::is_none) {
            link.end(Some((close::NORMAL, reason)));
        }
    }

    fn on_packet(&mut self, link: &mut Link<'_>, text: &str) {
        let p = match packet::parse(text) {
            Ok(p) => p,
            Err(why) => {
                tracing::debug!(why, "invalid socket.io packet");
                return link.end(Some((close::PROTOCOL_ERROR, why)));
            }
        };
        // Events count against `ws.rate_limit`; CONNECT and DISCONNECT are
        // state changes that are always answered.
        if matches!(p.kind, kind::EVENT | kind::BINARY_EVENT) {
            let verdict = self.rate.check(std::time::Instant::now());
            if verdict != Verdict::Allow {
                return self.refuse(link, &p, verdict);
            }
        }
        let Some(slot) = self.slot(p.nsp) else {
            if p.kind == kind::CONNECT {
                link.send(packet::connect_error(p.nsp, "Invalid namespace", self.eio3));
            }
            return;
        };
        match p.kind {
            kind::CONNECT => self.join(link, slot, p.data),
            kind::DISCONNECT => {
                self.forget_session(slot);
                self.leave(slot);
                // Its last namespace is gone: so is the connection.
                if self.sockets.iter().all(Option::is_none) {
                    link.end(Some((close::NORMAL, "")));
                }
            }
            kind::EVENT | kind::BINARY_EVENT => self.on_event(link, &p, slot),
            // Acks answer nothing of ours.
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

    /// A CONNECT to the namespace in `slot`: the socket the client asked
    /// to recover, or else a new one (or the one already open: answered
    /// again).
    fn join(&mut self, link: &mut Link<'_>, slot: usize, data: &str) {
        if self.sockets[slot].is_none() && self.recover_elsewhere(slot, data) {
            return;
        }
        if self.sockets[slot].is_none()
            && let Some(n) = self.recover(link, slot, data)
        {
            self.sockets[slot] = Some(n);
            self.update_deadlines();
            self.share_session(slot);
            return;
        }
        let (eio3, name) = (self.eio3, self.name(slot));
        let n = self.open_socket(slot);
        let sid = if eio3 { "" } else { n.socket_id() };
        link.send(packet::connected(name, sid, n.pid(), eio3));
    }

    /// Recovers the socket a CONNECT's auth names (`{"pid","offset"}`, what
    /// socket.io-client ≥ 4.6 sends when it reconnects), if it was kept in
    /// this namespace, its token is still valid and the history still holds
    /// every event of its rooms after that offset. Its rooms are then
    /// resumed and, under the hub's lock, the CONNECT answer (same `sid`,
    /// same `pid`: the client sets `socket.recovered`) is queued ahead of
    /// the missed events, which come ahead of any live one. `None`: the
    /// client connects as new (a new pid tells it it was not recovered).
    fn recover(&mut self, link: &mut Link<'_>, slot: usize, data: &str) -> Option<Notifications> {
        let store = self.recovery.clone()?;
        let asked = packet::recovery(data)?;
        let name = self.name(slot);
        // Taken whatever follows: a session is used once.
        let saved = store.take(asked.pid).filter(|s| s.namespace == name);
        let resumed = match usable(saved, asked.offset) {
            Err(why) => Err(why),
            Ok((saved, epoch, after)) => {
                let conn = self.slot_conn(slot);
                let names = Notifications::saved_names(&saved);
                let answer = packet::connected(name, &saved.socket_id, Some(asked.pid), false);
                match self
                    .gw
                    .hub
                    .resume(conn, &names, epoch, after, None, || link.send(answer))
                {
                    Ok(true) => Ok((conn, saved)),
                    _ => Err("reload"),
                }
            }
        };
        let outcome = match &resumed {
            Ok(_) => "recovered",
            Err(why) => why,
        };
        self.gw
            .metrics
            .recoveries
            .get_or_create(&[("outcome", outcome)])
            .inc();
        let (conn, saved) = resumed.ok()?;
        tracing::debug!(socket = %saved.socket_id, nsp = name, "socket.io session recovered");
        Some(Notifications::recovered(
            self.gw.clone(),
            conn,
            asked.pid,
            saved,
        ))
    }

    /// Puts in its slot a socket [`Socket::recover_elsewhere`] made ready.
    fn install_pending(&mut self) {
        let ready = self
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some((slot, n)) = ready {
            if let Some(mut old) = self.sockets[slot].replace(n) {
                old.finish();
            }
            self.update_deadlines();
            self.share_session(slot);
        }
    }

    /// The cluster's half of [`Socket::recover`]: a CONNECT naming a pid
    /// this node does not keep, with the sessions shared by the nodes. The
    /// session is taken from the backplane, its rooms followed and their
    /// history fetched, then resumed, all on a task of its own; the CONNECT
    /// answer (recovered, or a new socket) is queued by that task, after
    /// the socket is ready to be installed. True when the task took it.
    fn recover_elsewhere(&mut self, slot: usize, data: &str) -> bool {
        let (Some(store), Some(shared)) = (&self.recovery, &self.gw.sessions) else {
            return false;
        };
        let Some(asked) = packet::recovery(data) else {
            return false;
        };
        if store.has(asked.pid) {
            // Kept here: the synchronous path takes it.
            return false;
        }
        let take = shared.take(asked.pid);
        let (gw, outbox, pending) = (self.gw.clone(), self.outbox.clone(), self.pending.clone());
        let (conn, name, nsp) = (self.slot_conn(slot), self.name(slot), self.nsp);
        let (pid, offset) = (asked.pid.to_string(), asked.offset.to_string());
        tokio::spawn(async move {
            let saved = match take.await {
                Ok(Some(bytes)) => recovery::decode(&bytes, nsp).filter(|s| s.namespace == name),
                Ok(None) => None,
                Err(e) => {
                    tracing::warn!(error = %e, "recovery session not read from the backplane");
                    None
                }
            };
            let outcome = match usable(saved, &offset) {
                Err(why) => Err(why),
                Ok((saved, epoch, after)) => {
                    let names = Notifications::saved_names(&saved);
                    let prepared = gw.hub.prepare_recovery(&names).await;
                    let answer = packet::connected(name, &saved.socket_id, Some(&pid), false);
                    let n = Notifications::recovered(gw.clone(), conn, &pid, saved);
                    // Installed before the client can hear it was recovered.
                    *pending.lock().unwrap_or_else(|e| e.into_inner()) = Some((slot, n));
                    let resumed =
                        gw.hub
                            .resume(conn, &names, epoch, after, Some(&prepared), || {
                                outbox.push(Outbound::Frame(answer));
                            });
                    if matches!(resumed, Ok(true)) {
                        Ok(())
                    } else {
                        let taken = pending.lock().unwrap_or_else(|e| e.into_inner()).take();
                        if let Some((_, mut n)) = taken {
                            n.finish();
                        }
                        Err("reload")
                    }
                }
            };
            gw.metrics
                .recoveries
                .get_or_create(&[("outcome", outcome.err().unwrap_or("recovered"))])
                .inc();
            if outcome.is_err() {
                // Connects as new: a new id and pid tell the client.
                let n = Notifications::new(gw.clone(), new_sid(), conn, Some(recovery::new_pid()));
                let answer = packet::connected(name, n.socket_id(), n.pid(), false);
                *pending.lock().unwrap_or_else(|e| e.into_inner()) = Some((slot, n));
                outbox.push(Outbound::Frame(answer));
            }
        });
        true
    }

    /// Shares the session of the socket in `slot` with the other nodes
    /// while it is connected (after it authenticated).
    fn share_session(&self, slot: usize) {
        if let (Some(shared), Some(n)) = (&self.gw.sessions, self.sockets[slot].as_ref())
            && let Some((pid, saved)) = n.to_keep(self.name(slot))
        {
            shared.save(pid, recovery::encode(&saved), true);
        }
    }

    /// The socket in `slot` ends for good: no node may recover it.
    fn forget_session(&self, slot: usize) {
        if let (Some(shared), Some(pid)) = (
            &self.gw.sessions,
            self.sockets[slot].as_ref().and_then(Notifications::pid),
        ) {
            shared.forget(pid);
        }
    }

    fn on_event(&mut self, link: &mut Link<'_>, p: &packet::Packet<'_>, slot: usize) {
        if slot == ROOT && self.eio3 {
            // Engine.IO 3 clients are in the root namespace without asking.
            self.open_socket(ROOT);
        }
        let Some(n) = self.sockets[slot].as_mut() else {
            return;
        };
        let answer = if p.kind == kind::BINARY_EVENT {
            // Binary attachments follow as frames of their own; they are
            // ignored (see `on_binary`) and so is the event. Like any failed
            // request, it disconnects a socket that has not authenticated.
            let failure = super::request::Failure::malformed("binary payloads are not supported");
            self.gw.metrics.client_error(failure.code);
            Answer {
                ack: failure.ack(),
                disconnect: !n.authed(),
                committed: None,
            }
        } else {
            match packet::event_args(p.data) {
                Some((name, args)) if proxy::method_of(&name).is_some() => {
                    // The first argument is the request; others are ignored.
                    let v: Value = args
                        .first()
                        .and_then(|a| serde_json::from_str(a.get()).ok())
                        .unwrap_or(Value::Null);
                    if let Some(backend) = &self.proxy
                        && super::request::names_other_url(&v, &self.gw.config.socketio.namespace)
                        && let Some(method) = proxy::method_of(&name)
                    {
                        let backend = backend.clone();
                        return self.forward(link, &backend, method, &v, slot, p.ack);
                    }
                    if name == "get" || name == "post" {
                        let answer = n.request(&v);
                        self.update_deadlines();
                        self.share_session(slot);
                        answer
                    } else {
                        Answer {
                            ack: n.other_event(&name),
                            disconnect: false,
                            committed: None,
                        }
                    }
                }
                Some((name, _)) => Answer {
                    ack: n.other_event(&name),
                    disconnect: false,
                    committed: None,
                },
                None => {
                    tracing::debug!("socket.io event without a name");
                    return link.end(Some((close::PROTOCOL_ERROR, "invalid event")));
                }
            }
        };
        if let Some(id) = p.ack {
            let ack = packet::ack(self.name(slot), id, &answer.ack);
            match answer.committed {
                // Read your writes: the ack waits for the presence row, on
                // a task of its own so that the connection goes on.
                // In a cluster it also waits for the backplane to carry
                // the socket's rooms (SPEC §8).
                Some(committed) => {
                    let outbox = self.outbox.clone();
                    let subscribed = self.gw.hub.backplane_subscribed();
                    tokio::spawn(async move {
                        committed.wait().await;
                        if let Some(subscribed) = subscribed {
                            subscribed.await;
                        }
                        outbox.push(Outbound::Frame(ack));
                    });
                }
                None => link.send(ack),
            }
        }
        if answer.disconnect {
            self.disconnect(link, slot, "");
        }
    }
}

impl Socket {
    /// Forwards a virtual request to the application's backend: checked
    /// and admitted here, sent on a task of its own, which queues the ack
    /// when the answer comes (SPEC §4). The socket is never disconnected
    /// for what the backend answers.
    fn forward(
        &mut self,
        link: &mut Link<'_>,
        backend: &Arc<Proxy>,
        method: axum::http::Method,
        v: &Value,
        slot: usize,
        ack: Option<u64>,
    ) {
        let nsp = self.name(slot);
        let Some(n) = self.sockets[slot].as_ref() else {
            return;
        };
        let admitted = backend
            .prepare(method, v, &n.caller())
            .and_then(|prepared| Ok((prepared, backend.admit(&self.proxied)?)));
        let (prepared, admitted) = match admitted {
            Ok(ok) => ok,
            Err(failure) => {
                backend.refused(&failure);
                self.gw.metrics.client_error(failure.code);
                if let Some(id) = ack {
                    link.send(packet::ack(nsp, id, &failure.ack()));
                }
                return;
            }
        };
        let (hub, conn, rooms) = (self.gw.hub.clone(), n.conn(), n.backend_rooms().clone());
        let limit = self.gw.config.ws.max_subscriptions;
        let outbox = self.outbox.clone();
        let backend = backend.clone();
        tokio::spawn(async move {
            let reply = backend.send(prepared).await;
            drop(admitted);
            let joined = (!reply.join.is_empty() || !reply.leave.is_empty())
                && rooms.apply(&hub, conn, &reply.join, &reply.leave, limit);
            // In a cluster the ack waits for the backplane to carry the
            // new rooms, as an authentication's does (SPEC §8).
            if joined && let Some(subscribed) = hub.backplane_subscribed() {
                subscribed.await;
            }
            if let Some(id) = ack {
                outbox.push(Outbound::Frame(packet::ack(nsp, id, &reply.ack)));
            }
        });
    }
}

impl Protocol for Socket {
    fn on_text(&mut self, link: &mut Link<'_>, text: &str) {
        self.install_pending();
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
        self.install_pending();
        let now = Instant::now();
        if self.auth_deadline.is_some_and(|d| now >= d) {
            if self.sockets.iter().any(Option::is_some) {
                tracing::debug!(engine = %self.engine_id, "auth_timeout reached; disconnecting");
                self.gw.metrics.sio_auth_result("timeout");
            }
            for slot in [NSP, ROOT] {
                if self.sockets[slot].is_some() {
                    link.send(packet::disconnect(self.name(slot)));
                    self.leave(slot);
                }
            }
            link.end(Some((close::NORMAL, "auth timeout")));
        } else if self.expiry.is_some_and(|e| now >= e) {
            for slot in [NSP, ROOT] {
                let expired = self.sockets[slot]
                    .as_ref()
                    .and_then(Notifications::deadline)
                    .is_some_and(|d| d <= std::time::SystemTime::now());
                if expired {
                    tracing::debug!(engine = %self.engine_id, nsp = self.name(slot), "token expired; disconnecting");
                    self.disconnect(link, slot, "token expired");
                }
            }
        }
    }
}
