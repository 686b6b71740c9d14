//! The Socket.IO "notifications" endpoint (SPEC §4), Sails-compatible.
//!
//! pulso speaks Engine.IO 3 and 4 itself, as socket.io's own servers do:
//! [`websocket`] and [`polling`] are the transports, [`socket`] is one
//! Engine.IO session and the Socket.IO packets on it, [`packet`] and
//! [`payload`] are the wire format. A socket that authenticates with a
//! virtual `get`/`post` request ([`Notifications`]) is registered in the
//! [`Hub`](crate::hub::Hub) under its own-id room and its template rooms,
//! so `POST /api/broadcast` and `/ws` topics share one namespace and nothing
//! else in pulso knows the Socket.IO wire format. A published message is
//! encoded once as a Socket.IO event and those bytes go to every Socket.IO
//! recipient, whatever its transport.

pub mod packet;
pub mod payload;
pub mod polling;
pub mod proxy;
pub(crate) mod recovery;
pub mod request;
pub mod rooms;
pub mod socket;
pub mod websocket;

use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use axum::extract::{Request, State};
use axum::http::{Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde_json::Value;

use crate::auth::Identity;
use crate::gateway::Gateway;
use crate::gateway::admission::Refused;
use crate::gateway::{Committed, Holder};
use crate::http::peer_ip;
use crate::hub::{ConnId, Filter, Hub};
use request::{Failure, Token};

const PROTOCOL: &str = "socketio";
/// Where Socket.IO is served.
pub const PATH: &str = "/socket.io/";
const LABEL: [(&str, &str); 1] = [("protocol", PROTOCOL)];

/// What the Socket.IO endpoint needs, built once per server.
#[derive(Clone)]
pub struct Transport {
    gw: Arc<Gateway>,
    /// The notifications namespace, leaked once per server so that every
    /// queued event can name it without a reference count.
    nsp: &'static str,
    /// Published messages as events in that namespace, likewise leaked.
    events: &'static packet::Events,
    sessions: Arc<polling::Sessions>,
    /// Sessions kept for connection state recovery (`None`: history is
    /// off, so there is none).
    recovery: Option<Arc<recovery::Store>>,
    /// The application's backend (`None`: `socketio.proxy_url` is unset).
    proxy: Option<Arc<proxy::Proxy>>,
}

impl Transport {
    pub fn new(gw: &Arc<Gateway>) -> Self {
        let nsp: &'static str = Box::leak(gw.config.socketio.namespace.clone().into_boxed_str());
        let history = &gw.config.history;
        let recovery = (!history.topics.is_empty()).then(|| {
            let store = Arc::new(recovery::Store::new(
                history.ttl,
                recovery::MAX_SESSIONS,
                gw.metrics.clone(),
            ));
            let period = history.ttl.min(std::time::Duration::from_secs(60));
            recovery::sweep_periodically(&store, period, gw.shutdown.clone());
            store
        });
        let proxy = gw
            .config
            .socketio
            .proxy
            .clone()
            .map(|cfg| Arc::new(proxy::Proxy::new(cfg, gw.metrics.clone())));
        Transport {
            gw: gw.clone(),
            nsp,
            events: Box::leak(Box::new(packet::Events::namespace(nsp))),
            sessions: Arc::new(polling::Sessions::new(
                gw.config.socketio.max_polling_sessions,
                gw.metrics.clone(),
            )),
            recovery,
            proxy,
        }
    }
}

/// An Engine.IO request's query: `EIO`, `transport` and `sid`.
#[derive(Debug, PartialEq)]
struct EngineQuery<'a> {
    eio3: bool,
    websocket: bool,
    sid: Option<&'a str>,
}

/// Engine.IO's error answer: 400 with `{"code":n,"message":...}`.
#[derive(Debug, Clone, Copy, PartialEq)]
struct EngineError(u8, &'static str);

const TRANSPORT_UNKNOWN: EngineError = EngineError(0, "Transport unknown");
const SESSION_UNKNOWN: EngineError = EngineError(1, "Session ID unknown");
const BAD_HANDSHAKE_METHOD: EngineError = EngineError(2, "Bad handshake method");
const BAD_REQUEST: EngineError = EngineError(3, "Bad request");
const UNSUPPORTED_VERSION: EngineError = EngineError(5, "Unsupported protocol version");

/// Engine.IO's refusal (socket.io's `allowRequest` answers so): code 4,
/// with this status and message.
pub(crate) fn engine_refusal(status: StatusCode, message: &'static str) -> Response {
    (
        status,
        axum::Json(serde_json::json!({"code": 4, "message": message})),
    )
        .into_response()
}

/// The answer to a refused connection: 403 for its origin, 503 when full.
pub(crate) fn refusal(refused: Refused) -> Response {
    let status = match refused {
        Refused::Origin => StatusCode::FORBIDDEN,
        Refused::Full | Refused::FullForAddress => StatusCode::SERVICE_UNAVAILABLE,
    };
    engine_refusal(status, refused.message())
}

impl IntoResponse for EngineError {
    fn into_response(self) -> Response {
        (
            StatusCode::BAD_REQUEST,
            axum::Json(serde_json::json!({"code": self.0, "message": self.1})),
        )
            .into_response()
    }
}

impl<'a> EngineQuery<'a> {
    fn parse(query: Option<&'a str>) -> Result<Self, EngineError> {
        let (mut eio, mut transport, mut sid) = (None, None, None);
        for pair in query.unwrap_or("").split('&') {
            match pair.split_once('=').unwrap_or((pair, "")) {
                ("EIO", v) => eio = Some(v),
                ("transport", v) => transport = Some(v),
                ("sid", v) => sid = Some(v),
                // JSONP (Engine.IO 3's `j`) is not served.
                ("j", _) => return Err(TRANSPORT_UNKNOWN),
                _ => {}
            }
        }
        let websocket = match transport {
            Some("websocket") => true,
            Some("polling") => false,
            _ => return Err(TRANSPORT_UNKNOWN),
        };
        let eio3 = match eio {
            Some("3") => true,
            Some("4") => false,
            _ => return Err(UNSUPPORTED_VERSION),
        };
        Ok(EngineQuery {
            eio3,
            websocket,
            sid,
        })
    }
}

/// Middleware that serves `/socket.io/` and passes everything else on.
pub async fn serve(State(t): State<Transport>, request: Request, next: Next) -> Response {
    if request.uri().path().trim_end_matches('/') != PATH.trim_end_matches('/') {
        return next.run(request).await;
    }
    // Every request of a browser page on a foreign origin, not only the
    // first: a session id must not let another page in.
    if let Err(refused) = t.gw.admission.check_origin(request.headers(), "socketio") {
        return refusal(refused);
    }
    let query = match EngineQuery::parse(request.uri().query()) {
        Ok(q) => q,
        Err(e) => return e.into_response(),
    };
    let (eio3, websocket) = (query.eio3, query.websocket);
    let session = match query.sid {
        None => None,
        Some(sid) => match t.sessions.get(sid) {
            Some(session) => Some(session),
            None => return SESSION_UNKNOWN.into_response(),
        },
    };
    match (websocket, session) {
        (true, None) => match t.gw.admission.admit(peer_ip(request.extensions())) {
            Ok(permit) => websocket::direct(&t, request, eio3, permit),
            Err(refused) => refusal(refused),
        },
        (true, Some(session)) => websocket::upgrade(&t, request, session),
        (false, None) if request.method() == Method::GET => {
            polling::open(&t, eio3, peer_ip(request.extensions()))
        }
        (false, None) => BAD_HANDSHAKE_METHOD.into_response(),
        (false, Some(session)) => {
            let (parts, body) = request.into_parts();
            polling::serve(&t, session, &parts.method, body).await
        }
    }
}

/// The answer to a virtual request.
pub(crate) struct Answer {
    pub ack: Value,
    /// Any failure while not yet authenticated disconnects the socket.
    pub disconnect: bool,
    /// An authentication's presence write: the ack goes out once it is
    /// committed (read your writes, SPEC §7).
    pub committed: Option<Committed>,
}

/// What an authenticated socket holds.
struct Authed {
    identity: Identity,
    rooms: Vec<String>,
}

/// One namespace socket (the notifications namespace's or the root's: both
/// serve the same requests), whatever transport carries it: the virtual
/// requests that authenticate it, and what it then holds.
pub(crate) struct Notifications {
    gw: Arc<Gateway>,
    /// The id the client sees as `socket.id`, also its own room's name.
    socket_id: String,
    /// Its handle in the hub, subscribed to its rooms once it authenticates.
    conn: ConnId,
    auth: Option<Authed>,
    /// Its private session id, told to the client on CONNECT when
    /// connection state recovery is on (Engine.IO 4 with `history.topics`).
    pid: Option<Box<str>>,
    /// The rooms the application's backend joined it to, shared with its
    /// forwarded requests in flight.
    backend_rooms: Arc<BackendRooms>,
}

/// The rooms the application's backend joined a socket to with
/// `X-Pulso-Join` (`socketio.proxy_rooms`), as a Sails action calls
/// `sails.sockets.join(req, room)`. Only an authenticated socket has any:
/// the set opens when it authenticates and closes when it leaves, so an
/// answer that comes back later changes nothing. Its own-id room and its
/// template rooms are pulso's and the backend can neither join nor leave
/// them.
#[derive(Default)]
pub(crate) struct BackendRooms(Mutex<Joined>);

#[derive(Default)]
struct Joined {
    open: bool,
    /// The socket's own-id room and template rooms.
    fixed: Vec<String>,
    rooms: Vec<String>,
}

impl BackendRooms {
    fn lock(&self) -> std::sync::MutexGuard<'_, Joined> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The socket authenticated: from now on the backend may add rooms.
    fn open(&self, fixed: Vec<String>, rooms: Vec<String>) {
        *self.lock() = Joined {
            open: true,
            fixed,
            rooms,
        };
    }

    /// The socket left: the rooms to leave in the hub.
    fn close(&self) -> Vec<String> {
        let mut j = self.lock();
        j.open = false;
        std::mem::take(&mut j.rooms)
    }

    fn rooms(&self) -> Vec<String> {
        self.lock().rooms.clone()
    }

    /// Leaves `leave` and joins `join` on `conn` in the hub (through
    /// [`Hub::subscribe`], which in a cluster subscribes the backplane),
    /// keeping at most `limit` rooms. Names that are not literal room
    /// names are skipped. Returns whether a room was joined.
    pub(crate) fn apply(
        &self,
        hub: &Hub,
        conn: ConnId,
        join: &[String],
        leave: &[String],
        limit: usize,
    ) -> bool {
        let mut j = self.lock();
        if !j.open {
            return false;
        }
        for name in leave {
            if let Some(i) = j.rooms.iter().position(|r| r == name) {
                j.rooms.swap_remove(i);
                if let Ok(filter) = Filter::parse(name) {
                    hub.unsubscribe(conn, &filter);
                }
            }
        }
        let mut joined = false;
        for name in join {
            if j.fixed.contains(name) || j.rooms.contains(name) {
                continue;
            }
            let filter = match Filter::parse(name) {
                Ok(f) if !f.is_wildcard() => f,
                _ => {
                    tracing::debug!(room = %name.chars().take(64).collect::<String>(), "X-Pulso-Join: not a room name; skipped");
                    continue;
                }
            };
            if j.rooms.len() >= limit {
                tracing::debug!(
                    limit,
                    "X-Pulso-Join: the socket has as many rooms as it may; skipped"
                );
                break;
            }
            if hub.subscribe(conn, &filter, usize::MAX).is_ok() {
                j.rooms.push(name.clone());
                joined = true;
            }
        }
        joined
    }
}

impl Notifications {
    pub(crate) fn new(
        gw: Arc<Gateway>,
        socket_id: String,
        conn: ConnId,
        pid: Option<String>,
    ) -> Self {
        Notifications {
            gw,
            socket_id,
            conn,
            auth: None,
            pid: pid.map(String::into_boxed_str),
            backend_rooms: Arc::default(),
        }
    }

    /// The socket a client recovered (its hub subscriptions already
    /// resumed on `conn`): authenticated as before, and its presence row
    /// written again. The row is not waited for: nothing acknowledges a
    /// recovery but the CONNECT answer, which must precede the missed
    /// events queued with it.
    pub(crate) fn recovered(
        gw: Arc<Gateway>,
        conn: ConnId,
        pid: &str,
        saved: recovery::Saved,
    ) -> Self {
        let mut n = Notifications::new(gw, saved.socket_id, conn, Some(pid.to_string()));
        let _ = n.gw.presence.set(n.holder(&saved.identity));
        n.open_backend_rooms(&saved.rooms);
        n.auth = Some(Authed {
            identity: saved.identity,
            rooms: saved.rooms,
        });
        n
    }

    pub(crate) fn pid(&self) -> Option<&str> {
        self.pid.as_deref()
    }

    /// What to keep for recovery, now that its transport is lost: only an
    /// authenticated socket that was told a pid has anything to recover.
    pub(crate) fn to_keep(&self, namespace: &'static str) -> Option<(&str, recovery::Saved)> {
        let (pid, a) = (self.pid.as_deref()?, self.auth.as_ref()?);
        // Rooms the backend joined come back as the socket's own.
        let mut rooms = a.rooms.clone();
        rooms.extend(self.backend_rooms.rooms());
        Some((
            pid,
            recovery::Saved {
                socket_id: self.socket_id.clone(),
                namespace,
                rooms,
                identity: a.identity.clone(),
                deadline: self.deadline(),
            },
        ))
    }

    /// Its hub names: its own-id room and its template rooms.
    fn names<'a>(socket_id: &'a str, rooms: &'a [String]) -> impl Iterator<Item = Filter> + 'a {
        std::iter::once(socket_id)
            .chain(rooms.iter().map(String::as_str))
            .filter_map(|name| Filter::parse(name).ok())
    }

    /// The hub names of a kept session, for [`crate::hub::Hub::resume`].
    pub(crate) fn saved_names(saved: &recovery::Saved) -> Vec<Filter> {
        Self::names(&saved.socket_id, &saved.rooms).collect()
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

    /// Its hub handle.
    pub(crate) fn conn(&self) -> ConnId {
        self.conn
    }

    /// Who it is, for a request forwarded to the application's backend.
    pub(crate) fn caller(&self) -> proxy::Caller<'_> {
        proxy::Caller {
            socket_id: &self.socket_id,
            identity: self.auth.as_ref().map(|a| &a.identity),
        }
    }

    pub(crate) fn backend_rooms(&self) -> &Arc<BackendRooms> {
        &self.backend_rooms
    }

    fn open_backend_rooms(&self, rooms: &[String]) {
        let fixed = std::iter::once(self.socket_id.clone())
            .chain(rooms.iter().cloned())
            .collect();
        self.backend_rooms.open(fixed, Vec::new());
    }

    /// Whether the claims stay with the socket after authentication: only
    /// the backend's `X-Pulso-Claims` needs them.
    fn keeps_claims(&self) -> bool {
        self.gw.config.socketio.proxy.is_some()
    }

    /// Handles one virtual request.
    pub(crate) fn request(&mut self, v: &Value) -> Answer {
        let was_authed = self.auth.is_some();
        let mut committed = None;
        match self.serve(v, &mut committed) {
            Ok(ack) => Answer {
                ack,
                disconnect: false,
                committed,
            },
            Err(f) => {
                self.gw.metrics.sio_auth_result(f.code);
                if !was_authed {
                    self.gw.metrics.auth_failure(reason_of(f.code));
                }
                tracing::debug!(socket = %self.socket_id, code = f.code, message = %f.message, "socket.io request refused");
                Answer {
                    ack: f.ack(),
                    disconnect: !was_authed,
                    committed: None,
                }
            }
        }
    }

    /// Serves a request; an authentication sets `committed` to its
    /// presence write.
    fn serve(&mut self, v: &Value, committed: &mut Option<Committed>) -> Result<Value, Failure> {
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
            if gw.config.socketio.proxy.is_none() {
                identity.claims = Default::default();
            }
            current.identity = identity;
            gw.metrics.sio_auth_result("refreshed");
            return Ok(request::success(&self.socket_id, &current.rooms));
        }

        let allowed = &gw.config.socketio.allowed_roles;
        if !allowed.is_empty() && !allowed.contains(&identity.role) {
            return Err(Failure::forbidden_role(&identity.role));
        }
        let rooms = rooms::rooms_for(&gw.config.socketio.rooms, &identity, &req.params);
        // Rooms are decided; only role, sub and exp are needed from here
        // on, and the claims only for a backend.
        if !self.keeps_claims() {
            identity.claims = Default::default();
        }

        for filter in Self::names(&self.socket_id, &rooms) {
            let _ = gw.hub.subscribe(self.conn, &filter, usize::MAX);
        }
        self.open_backend_rooms(&rooms);
        *committed = Some(gw.presence.set(self.holder(&identity)));
        tracing::debug!(socket = %self.socket_id, sub = %identity.sub, role = %identity.role, ?rooms, "socket.io authenticated");
        gw.metrics.sio_auth_result("ok");
        let ack = request::success(&self.socket_id, &rooms);
        self.auth = Some(Authed { identity, rooms });
        Ok(ack)
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

    /// The socket is gone: leave its rooms, clear presence if it was ours.
    /// Its hub handle stays with the connection, which may still have a
    /// socket in the other namespace.
    pub(crate) fn finish(&mut self) {
        let Some(a) = self.auth.take() else {
            return;
        };
        for filter in Self::names(&self.socket_id, &a.rooms) {
            self.gw.hub.unsubscribe(self.conn, &filter);
        }
        for name in self.backend_rooms.close() {
            if let Ok(filter) = Filter::parse(&name) {
                self.gw.hub.unsubscribe(self.conn, &filter);
            }
        }
        self.gw.presence.clear(self.holder(&a.identity));
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
