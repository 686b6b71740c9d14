//! The Socket.IO "notifications" endpoint (SPEC §4), Sails-compatible.
//!
//! socketioxide does the framing (Engine.IO 3 and 4, WebSocket and
//! polling); this module only translates: a socket that authenticates with a
//! virtual `get`/`post` request is registered in the [`Hub`](crate::hub::Hub)
//! under its own-id room and its template rooms, so `POST /api/broadcast`
//! and `/ws` topics share one namespace and nothing else in pulso knows the
//! Socket.IO wire format.
//!
//! Each namespace socket gets a [`Session`] and one watchdog task (tracked
//! by the gateway's connection tracker) that enforces `auth_timeout` and
//! token expiry, and finishes the session on shutdown (the server then
//! closes the engine transports). Request handling itself is synchronous
//! under the session's lock: it never awaits, so the lock is never held
//! across an `.await`.

pub mod cors;
pub mod detach;
pub mod packet;
pub mod request;
pub mod rooms;
pub mod websocket;

use std::collections::HashSet;
use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use serde_json::Value;
use socketioxide::extract::{AckSender, Event, SocketRef, State, TryData};
use socketioxide::handler::ConnectHandler;
use socketioxide::layer::SocketIoLayer;
use socketioxide::socket::Sid;
use socketioxide::{ProtocolVersion, SocketIo};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::auth::Identity;
use crate::gateway::Gateway;
use crate::hub::{ConnId, Filter, Message, Recipient};
use crate::presence::Holder;
use request::{Failure, Token};

const PROTOCOL: &str = "socketio";
/// Where Socket.IO is served.
pub const PATH: &str = "/socket.io/";
const LABEL: [(&str, &str); 1] = [("protocol", PROTOCOL)];

/// State shared by every Socket.IO handler.
pub struct Sio {
    gw: Arc<Gateway>,
    /// Engine connections with an authenticated notifications socket, so the
    /// root namespace's watchdog knows the connection is in use.
    authed: Mutex<HashSet<Sid>>,
}

impl Sio {
    fn authed(&self) -> std::sync::MutexGuard<'_, HashSet<Sid>> {
        self.authed.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Builds the socketioxide layer for the router (path `/socket.io/`).
///
/// The root namespace `/` is registered first: Engine.IO 3 clients
/// (socket.io-client 2.x, sails.io.js) always join it, and socketioxide
/// closes their connection if it does not exist. It carries nothing.
pub fn layer(gw: &Arc<Gateway>) -> (SocketIoLayer, SocketIo) {
    let st = Arc::new(Sio {
        gw: gw.clone(),
        authed: Mutex::new(HashSet::new()),
    });
    let cfg = &gw.config;
    let (layer, io) = SocketIo::builder()
        .with_state(st)
        .req_path(PATH)
        // Inbound payloads are bounded like /ws messages.
        .max_payload(cfg.ws.max_message_size as u64)
        .ws_max_message_size(cfg.ws.max_message_size)
        .ws_max_frame_size(cfg.ws.max_message_size)
        // Small reads suit small messages, as on /ws (the default is 4 KiB).
        .ws_read_buffer_size(1024)
        // Outbound queue per connection; a full one means a slow consumer.
        .max_buffer_size(cfg.ws.outbound_queue)
        // An Engine.IO 4 connection that never opens a namespace is closed
        // after the same time an unauthenticated one would be.
        .connect_timeout(cfg.socketio.auth_timeout)
        .build_layer();
    // Everything is set up in connect *middlewares*: socketioxide awaits
    // them before it sends the CONNECT packet, whereas the connect handler
    // runs after it, so a fast client could otherwise emit its `get` before
    // the event handlers exist (and never get an ack).
    io.ns("/", connected.with(on_root));
    io.ns(cfg.socketio.namespace.clone(), connected.with(on_connect));
    (layer, io)
}

/// The connect handler proper; all the work happened in the middleware.
async fn connected(_s: SocketRef) {}

/// Root namespace: nothing is served; the connection must authenticate on
/// the notifications namespace within `auth_timeout`.
async fn on_root(s: SocketRef, State(st): State<Arc<Sio>>) -> Result<(), Infallible> {
    let done = CancellationToken::new();
    s.extensions.insert(done.clone());
    s.on_disconnect(async |s: SocketRef| {
        if let Some(done) = s.extensions.get::<CancellationToken>() {
            done.cancel();
        }
    });
    let timeout = st.gw.config.socketio.auth_timeout;
    let tracker = st.gw.connections.clone();
    tracker.spawn(async move {
        tokio::select! {
            _ = done.cancelled() => {}
            // The server closes the transport (see `Server::run`).
            _ = st.gw.shutdown.cancelled() => {}
            _ = tokio::time::sleep(timeout) => {
                if !st.authed().contains(&s.id) {
                    tracing::debug!(sid = %s.id, "no authenticated notifications socket in time; disconnecting");
                    let _ = s.disconnect();
                }
            }
        }
    });
    Ok(())
}

/// What an authenticated socket holds.
struct Authed {
    identity: Identity,
    rooms: Vec<String>,
    conn: ConnId,
}

/// One notifications-namespace socket, whatever transport carries it: the
/// virtual requests that authenticate it, and what it then holds.
pub(crate) struct Notifications {
    gw: Arc<Gateway>,
    /// The id the client sees as `socket.id`, also its own room's name.
    socket_id: String,
    auth: Option<Authed>,
}

impl Notifications {
    pub(crate) fn new(gw: Arc<Gateway>, socket_id: String) -> Self {
        Notifications {
            gw,
            socket_id,
            auth: None,
        }
    }

    pub(crate) fn authed(&self) -> bool {
        self.auth.is_some()
    }

    /// When the current token stops being valid (`None`: never, or not
    /// authenticated).
    pub(crate) fn deadline(&self) -> Option<SystemTime> {
        self.gw.verifier.deadline(&self.auth.as_ref()?.identity)
    }

    pub(crate) fn socket_id(&self) -> &str {
        &self.socket_id
    }

    /// Handles one virtual request; `register` puts the socket in the hub
    /// when it authenticates. Returns the ack and whether the socket must be
    /// disconnected (any failure while not yet authenticated).
    pub(crate) fn request(
        &mut self,
        v: &Value,
        register: impl FnOnce() -> ConnId,
    ) -> (Value, bool) {
        let was_authed = self.auth.is_some();
        match self.serve(v, register) {
            Ok(ack) => (ack, false),
            Err(f) => {
                self.gw.metrics.sio_auth_result(f.code);
                if !was_authed {
                    self.gw.metrics.auth_failure(reason_of(f.code));
                }
                tracing::debug!(socket = %self.socket_id, code = f.code, message = %f.message, "socket.io request refused");
                (f.ack(), !was_authed)
            }
        }
    }

    fn serve(&mut self, v: &Value, register: impl FnOnce() -> ConnId) -> Result<Value, Failure> {
        let gw = self.gw.clone();
        let req = request::parse(v)?;
        if req.path != gw.config.socketio.namespace {
            return Err(Failure::unknown_url(format!(
                "no such url `{}`; authenticate with `{}`",
                req.path.chars().take(100).collect::<String>(),
                gw.config.socketio.namespace
            )));
        }
        let token = match &req.token {
            Token::Missing => return Err(Failure::missing_token()),
            Token::WrongType => {
                return Err(Failure::invalid_token("`jwt-api-key` must be a string"));
            }
            Token::Text(t) => t,
        };
        let mut identity = gw.verifier.verify(token)?;

        if let Some(current) = self.auth.as_mut() {
            // A refresh: same identity only; rooms stay as they are.
            if identity.sub != current.identity.sub || identity.role != current.identity.role {
                return Err(Failure::invalid_token(
                    "the token belongs to another identity",
                ));
            }
            identity.claims = Default::default();
            current.identity = identity;
            gw.metrics.sio_auth_result("refreshed");
            return Ok(request::success(&self.socket_id, &current.rooms));
        }

        let allowed = &gw.config.socketio.allowed_roles;
        if !allowed.is_empty() && !allowed.contains(&identity.role) {
            return Err(Failure::forbidden_role(&identity.role));
        }
        let rooms = rooms::rooms_for(&gw.config.socketio.rooms, &identity, &req.params);
        // Rooms are decided; only role, sub and exp are needed from here on.
        identity.claims = Default::default();

        let conn = register();
        for name in std::iter::once(&self.socket_id).chain(&rooms) {
            if let Ok(filter) = Filter::parse(name) {
                let _ = gw.hub.subscribe(conn, &filter, usize::MAX);
            }
        }
        gw.presence.set(self.holder(&identity));
        tracing::debug!(socket = %self.socket_id, sub = %identity.sub, role = %identity.role, ?rooms, "socket.io authenticated");
        gw.metrics.sio_auth_result("ok");
        let ack = request::success(&self.socket_id, &rooms);
        self.auth = Some(Authed {
            identity,
            rooms,
            conn,
        });
        Ok(ack)
    }

    /// The rooms of an authenticated socket.
    fn rooms(&self) -> &[String] {
        self.auth.as_ref().map_or(&[], |a| &a.rooms)
    }

    /// The ack to any event other than `get`/`post`: never processed; 401-1
    /// before authentication and 404-1 after.
    pub(crate) fn other_event(&self, event: &str) -> Value {
        let failure = if self.auth.is_some() {
            Failure::unknown_url(format!(
                "event `{}` is not served; use get or post",
                event.chars().take(64).collect::<String>()
            ))
        } else {
            Failure::missing_token()
        };
        self.gw.metrics.client_error(failure.code);
        failure.ack()
    }

    fn holder(&self, who: &Identity) -> Holder {
        Holder {
            role: who.role.clone(),
            sub: who.sub.clone(),
            socket_id: self.socket_id.clone(),
            protocol: PROTOCOL,
        }
    }

    /// The socket is gone: leave the hub, clear presence if it was ours.
    /// Returns whether it had authenticated.
    pub(crate) fn finish(&mut self) -> bool {
        let Some(a) = self.auth.take() else {
            return false;
        };
        self.gw.hub.unregister(a.conn);
        self.gw.presence.clear(self.holder(&a.identity));
        true
    }
}

/// A notifications socket served by socketioxide (polling, and WebSocket
/// after an upgrade from polling).
struct Session {
    st: Arc<Sio>,
    state: Mutex<Notifications>,
    /// When the current token stops being valid (`None`: never).
    deadline: watch::Sender<Option<SystemTime>>,
    /// Cancelled when the socket is gone.
    done: CancellationToken,
    finished: AtomicBool,
}

impl Session {
    fn state(&self) -> std::sync::MutexGuard<'_, Notifications> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Handles one virtual request under the state's lock (it never awaits).
    fn request(&self, s: &SocketRef, v: &Value) -> (Value, bool) {
        let mut state = self.state();
        if self.done.is_cancelled() {
            // The socket went away while this request waited: registering it
            // now would leave a hub entry and a presence row nobody clears
            // (`finish` cancels `done` before it takes this lock).
            return (Failure::missing_token().ack(), false);
        }
        let was_authed = state.authed();
        let gw = &self.st.gw;
        let reply = state.request(v, || {
            gw.hub.register(Arc::new(SioRecipient {
                socket: s.clone(),
                gw: gw.clone(),
                closing: AtomicBool::new(false),
            }))
        });
        if state.authed() && !was_authed {
            // socketioxide's own rooms mirror the hub's, for anyone inspecting them.
            s.join(state.rooms().to_vec());
            self.st.authed().insert(s.id);
        }
        self.deadline.send_replace(state.deadline());
        reply
    }

    /// The socket is gone.
    /// Runs once, from the disconnect handler or on shutdown (socketioxide
    /// runs no disconnect handler for the transports `SocketIo::close` ends).
    fn finish(&self, sid: Sid) {
        if self.finished.swap(true, Ordering::AcqRel) {
            return;
        }
        self.done.cancel();
        if self.state().finish() {
            self.st.authed().remove(&sid);
        }
        self.st.gw.metrics.connections.get_or_create(&LABEL).dec();
    }
}

/// The auth-failure metric's reason for an error code.
fn reason_of(code: &str) -> &'static str {
    match code {
        "401-1" => "missing",
        "401-2" => "invalid",
        "401-3" => "expired",
        "403-1" => "forbidden_role",
        "404-1" => "unknown_url",
        _ => "malformed",
    }
}

/// The hub's handle on a Socket.IO socket: a plain `emit(event, data)`.
struct SioRecipient {
    socket: SocketRef,
    gw: Arc<Gateway>,
    closing: AtomicBool,
}

impl Recipient for SioRecipient {
    fn deliver(&self, msg: &Arc<Message>) -> bool {
        let event = msg.event.as_deref().unwrap_or("message");
        // A one-element tuple is one event argument, whatever the payload
        // (an array payload stays one array argument).
        match self.socket.emit(event, &(&*msg.payload,)) {
            Ok(()) => true,
            Err(socketioxide::SendError::Socket(
                socketioxide::SocketError::InternalChannelFull,
            )) => {
                if !self.closing.swap(true, Ordering::Relaxed) {
                    self.gw.metrics.slow_consumer_closes.inc();
                    tracing::debug!(sid = %self.socket.id, "socket.io slow consumer; disconnecting");
                    // socketioxide queues the DISCONNECT packet on the same
                    // full channel, so `disconnect()` fails until there is
                    // room: keep trying on a task (never here, under the
                    // hub's lock). A peer that never reads again is closed
                    // by Engine.IO's heartbeat timeout instead.
                    let socket = self.socket.clone();
                    let shutdown = self.gw.shutdown.clone();
                    self.gw.connections.spawn(async move {
                        let give_up = tokio::time::Instant::now() + Duration::from_secs(60);
                        while socket.connected() && tokio::time::Instant::now() < give_up {
                            if socket.clone().disconnect().is_ok() {
                                return;
                            }
                            tokio::select! {
                                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                                // The shutdown closes every transport anyway.
                                _ = shutdown.cancelled() => return,
                            }
                        }
                    });
                }
                false
            }
            Err(_) => false,
        }
    }
}

/// The client-visible socket id: Engine.IO 3 clients see `<nsp>#<engine id>`.
fn client_socket_id(s: &SocketRef) -> String {
    match s.protocol() {
        ProtocolVersion::V4 => format!("{}#{}", s.ns(), s.id),
        _ => s.id.to_string(),
    }
}

async fn on_connect(s: SocketRef, State(st): State<Arc<Sio>>) -> Result<(), Infallible> {
    let gw = st.gw.clone();
    gw.metrics.connections.get_or_create(&LABEL).inc();
    gw.metrics.connections_total.get_or_create(&LABEL).inc();
    let (deadline, mut deadline_rx) = watch::channel(None);
    let sess = Arc::new(Session {
        st: st.clone(),
        state: Mutex::new(Notifications::new(gw.clone(), client_socket_id(&s))),
        deadline,
        done: CancellationToken::new(),
        finished: AtomicBool::new(false),
    });
    s.extensions.insert(sess.clone());
    s.on("get", on_request);
    s.on("post", on_request);
    s.on_fallback(on_other);
    s.on_disconnect(async |s: SocketRef| {
        if let Some(sess) = s.extensions.get::<Arc<Session>>() {
            sess.finish(s.id);
        }
    });

    // The watchdog: auth timeout, token expiry, shutdown.
    let timeout = gw.config.socketio.auth_timeout;
    let tracker = gw.connections.clone();
    tracker.spawn(async move {
        let auth_deadline = tokio::time::sleep(timeout);
        tokio::pin!(auth_deadline);
        let mut auth_pending = true;
        loop {
            let expiry = *deadline_rx.borrow_and_update();
            let expiry = expiry.map(crate::auth::instant_of);
            let until_expiry =
                tokio::time::sleep_until(expiry.unwrap_or_else(|| {
                    tokio::time::Instant::now() + Duration::from_secs(86400 * 365)
                }));
            tokio::select! {
                biased;
                _ = sess.done.cancelled() => return,
                // The server closes the transport without a DISCONNECT packet
                // (see `Server::run`), so clients reconnect.
                _ = gw.shutdown.cancelled() => {
                    sess.finish(s.id);
                    return;
                }
                _ = &mut auth_deadline, if auth_pending => {
                    auth_pending = false;
                    if !sess.state().authed() {
                        tracing::debug!(sid = %s.id, "auth_timeout reached; disconnecting");
                        gw.metrics.sio_auth_result("timeout");
                        let _ = s.clone().disconnect();
                        return;
                    }
                }
                changed = deadline_rx.changed() => {
                    if changed.is_err() {
                        return;
                    }
                }
                _ = until_expiry, if expiry.is_some() => {
                    tracing::debug!(sid = %s.id, "token expired; disconnecting");
                    let _ = s.clone().disconnect();
                    return;
                }
            }
        }
    });
    Ok(())
}

async fn on_request(s: SocketRef, TryData(data): TryData<Value>, ack: AckSender) {
    let Some(sess) = s.extensions.get::<Arc<Session>>() else {
        return;
    };
    // Arguments that are not one JSON value read as no request at all.
    let v = data.unwrap_or(Value::Null);
    let (reply, disconnect) = sess.request(&s, &v);
    let _ = ack.send(&reply);
    if disconnect {
        let _ = s.disconnect();
    }
}

/// Any other event: never processed (see [`Notifications::other_event`]).
async fn on_other(s: SocketRef, Event(event): Event, ack: AckSender) {
    let Some(sess) = s.extensions.get::<Arc<Session>>() else {
        return;
    };
    let reply = sess.state().other_event(&event);
    let _ = ack.send(&reply);
}
