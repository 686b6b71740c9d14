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
//! by the gateway's connection tracker) that enforces `auth_timeout`, token
//! expiry and shutdown. Request handling itself is synchronous under the
//! session's lock: it never awaits, so the lock is never held across an
//! `.await`.

pub mod cors;
pub mod detach;
pub mod request;
pub mod rooms;

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
        .req_path("/socket.io/")
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
    let gw = st.gw.clone();
    let timeout = gw.config.socketio.auth_timeout;
    let tracker = gw.connections.clone();
    tracker.spawn(async move {
        tokio::select! {
            _ = done.cancelled() => {}
            _ = gw.shutdown.cancelled() => { let _ = s.disconnect(); }
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

/// One notifications socket.
struct Session {
    st: Arc<Sio>,
    /// The id the client sees as `socket.id`, also its own room's name.
    socket_id: String,
    auth: Mutex<Option<Authed>>,
    /// When the current token stops being valid (`None`: never).
    deadline: watch::Sender<Option<SystemTime>>,
    /// Cancelled when the socket is gone.
    done: CancellationToken,
}

impl Session {
    fn auth(&self) -> std::sync::MutexGuard<'_, Option<Authed>> {
        self.auth.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn gw(&self) -> &Arc<Gateway> {
        &self.st.gw
    }

    /// Handles one virtual request. Returns the ack and whether the socket
    /// must be disconnected (any failure while not yet authenticated).
    fn request(&self, s: &SocketRef, v: &Value) -> (Value, bool) {
        let mut auth = self.auth();
        if self.done.is_cancelled() {
            // The socket went away while this request waited: registering it
            // now would leave a hub entry and a presence row nobody clears
            // (`finish` cancels `done` before it takes this lock).
            return (Failure::missing_token().ack(), false);
        }
        let was_authed = auth.is_some();
        match self.serve(s, v, &mut auth) {
            Ok(ack) => (ack, false),
            Err(f) => {
                self.gw().metrics.sio_auth_result(f.code);
                if !was_authed {
                    self.gw().metrics.auth_failure(reason_of(f.code));
                }
                tracing::debug!(socket = %self.socket_id, code = f.code, message = %f.message, "socket.io request refused");
                (f.ack(), !was_authed)
            }
        }
    }

    fn serve(&self, s: &SocketRef, v: &Value, auth: &mut Option<Authed>) -> Result<Value, Failure> {
        let gw = self.gw().clone();
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

        if let Some(current) = auth.as_mut() {
            // A refresh: same identity only; rooms stay as they are.
            if identity.sub != current.identity.sub || identity.role != current.identity.role {
                return Err(Failure::invalid_token(
                    "the token belongs to another identity",
                ));
            }
            self.deadline.send_replace(gw.verifier.deadline(&identity));
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

        let conn = gw.hub.register(Arc::new(SioRecipient {
            socket: s.clone(),
            gw: gw.clone(),
            closing: AtomicBool::new(false),
        }));
        for name in std::iter::once(&self.socket_id).chain(&rooms) {
            if let Ok(filter) = Filter::parse(name) {
                let _ = gw.hub.subscribe(conn, &filter, usize::MAX);
            }
        }
        // socketioxide's own rooms mirror the hub's, for anyone inspecting them.
        s.join(rooms.clone());
        self.st.authed().insert(s.id);
        gw.presence.set(self.holder(&identity));
        self.deadline.send_replace(gw.verifier.deadline(&identity));
        tracing::debug!(socket = %self.socket_id, sub = %identity.sub, role = %identity.role, ?rooms, "socket.io authenticated");
        gw.metrics.sio_auth_result("ok");
        let ack = request::success(&self.socket_id, &rooms);
        *auth = Some(Authed {
            identity,
            rooms,
            conn,
        });
        Ok(ack)
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
    fn finish(&self, sid: Sid) {
        self.done.cancel();
        let gw = self.gw();
        if let Some(a) = self.auth().take() {
            gw.hub.unregister(a.conn);
            gw.presence.clear(self.holder(&a.identity));
            self.st.authed().remove(&sid);
        }
        gw.metrics.connections.get_or_create(&LABEL).dec();
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
        socket_id: client_socket_id(&s),
        auth: Mutex::new(None),
        deadline,
        done: CancellationToken::new(),
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
            let until_expiry = tokio::time::sleep_until(
                expiry.unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(86400 * 365)),
            );
            tokio::select! {
                biased;
                _ = sess.done.cancelled() => return,
                _ = gw.shutdown.cancelled() => {
                    let _ = s.clone().disconnect();
                    return;
                }
                _ = &mut auth_deadline, if auth_pending => {
                    auth_pending = false;
                    if sess.auth().is_none() {
                        tracing::debug!(socket = %sess.socket_id, "auth_timeout reached; disconnecting");
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
                    tracing::debug!(socket = %sess.socket_id, "token expired; disconnecting");
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

/// Any other event: never processed; an ack request gets 401-1 before
/// authentication and 404-1 after.
async fn on_other(s: SocketRef, Event(event): Event, ack: AckSender) {
    let Some(sess) = s.extensions.get::<Arc<Session>>() else {
        return;
    };
    let failure = if sess.auth().is_some() {
        Failure::unknown_url(format!(
            "event `{}` is not served; use get or post",
            event.chars().take(64).collect::<String>()
        ))
    } else {
        Failure::missing_token()
    };
    sess.gw().metrics.client_error(failure.code);
    let _ = ack.send(&failure.ack());
}
