//! Engine.IO long-polling (`transport=polling`), what socket.io-client 4.x
//! starts with by default and what socket.io 2.x browsers fall back to.
//!
//! A session is a [`Socket`] and its [`Outbox`], kept in [`Sessions`] under
//! its engine id. A GET waits until the outbox holds something and answers
//! with all of it as one payload, each published message taken from the
//! bytes encoded once for every Socket.IO recipient; a POST hands each of
//! its packets to the socket. One task per session runs the heartbeat and
//! the socket's deadlines, notices a client that fell too far behind while
//! not polling, and ends the session.
//!
//! The upgrade to WebSocket ([`super::websocket::upgrade`]) takes the socket
//! out of its session once the client sends `5`: what the outbox still holds
//! then goes out on the WebSocket, in order.

use std::collections::{HashMap, VecDeque};
use std::future::poll_fn;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Poll, Waker};
use std::time::Duration;

use axum::body::Body;
use axum::http::{Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use tokio::sync::Notify;
use tokio::time::Instant;

use super::payload;
use super::socket::Socket;
use super::{BAD_REQUEST, SESSION_UNKNOWN};
use crate::gateway::Gateway;
use crate::metrics::Metrics;
use crate::transport::close;
use crate::transport::connection::{Keepalive, Link, Protocol};
use crate::transport::frame;
use crate::transport::outbox::{CloseReason, Outbound, Outbox};

/// How long an ended session waits for the client's next GET to collect
/// its last packets and the CLOSE packet.
const CLOSE_GRACE: Duration = Duration::from_secs(2);
/// A POST may carry this many of the largest messages: socket.io-client
/// 2.x does not split its batches at `maxPayload` (4.x does).
const POST_MESSAGES: usize = 16;

/// The sessions that poll, by engine id: at most `max` of them
/// (`socketio.max_polling_sessions`).
pub struct Sessions {
    map: Mutex<HashMap<Box<str>, Arc<Session>>>,
    max: usize,
    metrics: Arc<Metrics>,
}

impl Sessions {
    pub(crate) fn new(max: usize, metrics: Arc<Metrics>) -> Self {
        Sessions {
            map: Mutex::default(),
            max,
            metrics,
        }
    }

    fn map(&self) -> MutexGuard<'_, HashMap<Box<str>, Arc<Session>>> {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn get(&self, id: &str) -> Option<Arc<Session>> {
        self.map().get(id).cloned()
    }

    pub(crate) fn remove(&self, id: &str) {
        if self.map().remove(id).is_some() {
            self.metrics.sio_polling_sessions.dec();
        }
    }

    fn full(&self) -> bool {
        self.map().len() >= self.max
    }

    /// Adds a session unless `max` are open.
    fn insert(&self, id: Box<str>, sess: Arc<Session>) -> bool {
        let mut map = self.map();
        if map.len() >= self.max {
            return false;
        }
        map.insert(id, sess);
        self.metrics.sio_polling_sessions.inc();
        true
    }
}

pub(crate) struct Session {
    id: Box<str>,
    eio3: bool,
    /// The heartbeat of the session's protocol version.
    keepalive: Keepalive,
    outbox: Arc<Outbox>,
    state: Mutex<State>,
    /// Wakes the session's task: the session ended or moved, a GET ended,
    /// or a POST moved the socket's deadline.
    changed: Notify,
}

struct State {
    /// `None` once the session moved to WebSocket or ended.
    socket: Option<Socket>,
    /// How the session ends, once decided.
    ending: Option<CloseReason>,
    /// A GET is waiting, and what wakes it.
    polling: bool,
    poller: Option<Waker>,
    /// A WebSocket probe answered: a waiting GET is answered with NOOP so
    /// the client can finish the upgrade.
    upgrading: bool,
    /// Heard from since the last heartbeat check.
    alive: bool,
    /// The CLOSE packet went out.
    closed: bool,
    /// A WebSocket holds the session's one upgrade attempt, and is woken
    /// when the session ends.
    probing: bool,
    prober: Option<Waker>,
}

impl State {
    fn wake_poller(&mut self) {
        if let Some(waker) = self.poller.take() {
            waker.wake();
        }
    }

    /// Ends the session, unless it moved to WebSocket (a late request for
    /// it must not end the WebSocket's socket).
    fn end(&mut self, reason: CloseReason) {
        if self.socket.is_none() {
            return;
        }
        if self.ending.is_none() {
            self.ending = Some(reason);
        }
        self.wake_ended();
    }

    /// The session has ended (here or through a [`Link`]): the waiting GET
    /// and a probing WebSocket learn it.
    fn wake_ended(&mut self) {
        self.wake_poller();
        if let Some(waker) = self.prober.take() {
            waker.wake();
        }
    }
}

impl Session {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A WebSocket for this session's upgrade opened; false if another one
    /// is already trying, or the session is over (as in engine.io, the
    /// newcomer is closed).
    pub(crate) fn claim_probe(&self) -> bool {
        let mut st = self.state();
        if st.probing || st.ending.is_some() || st.socket.is_none() {
            return false;
        }
        st.probing = true;
        true
    }

    /// A WebSocket probe (`2probe`) arrived; false if the session is over.
    pub(crate) fn probe(&self) -> bool {
        let mut st = self.state();
        if st.ending.is_some() || st.socket.is_none() {
            return false;
        }
        st.upgrading = true;
        st.wake_poller();
        true
    }

    /// The probe's WebSocket went away before the upgrade.
    pub(crate) fn abandon_probe(&self) {
        let mut st = self.state();
        st.upgrading = false;
        st.probing = false;
        st.prober = None;
    }

    /// How the session ended, if it has; otherwise `waker` (a probing
    /// WebSocket's) is woken when it does.
    pub(crate) fn ended(&self, waker: Option<&Waker>) -> Option<CloseReason> {
        let mut st = self.state();
        if st.ending.is_none()
            && let Some(waker) = waker
            && !st.prober.as_ref().is_some_and(|w| w.will_wake(waker))
        {
            st.prober = Some(waker.clone());
        }
        st.ending
    }

    /// The client finished the upgrade (`5`) on the WebSocket that holds
    /// the claim: the socket leaves the session (what it is still owed,
    /// pongs included, is in the outbox that moves with it). If the
    /// session has ended meanwhile, says how: the WebSocket then delivers
    /// its last replies (a DISCONNECT, unless the server is shutting down)
    /// in place of the GET the client no longer makes.
    pub(crate) fn upgrade(&self) -> Result<Socket, CloseReason> {
        let mut st = self.state();
        if let Some(reason) = st.ending {
            st.closed = true;
            drop(st);
            self.changed.notify_one();
            return Err(reason);
        }
        let Some(socket) = st.socket.take() else {
            return Err(None);
        };
        st.upgrading = false;
        st.prober = None;
        st.wake_poller();
        drop(st);
        self.changed.notify_one();
        Ok(socket)
    }

    pub(crate) fn outbox(&self) -> &Arc<Outbox> {
        &self.outbox
    }

    pub(crate) fn id(&self) -> &str {
        &self.id
    }

    pub(crate) fn keepalive(&self) -> Keepalive {
        self.keepalive
    }
}

/// `GET ?EIO=..&transport=polling` without a session: opens one and answers
/// with the OPEN packet (and Engine.IO 3's root CONNECT), unless
/// `socketio.max_polling_sessions` are open or the client at `ip` may not
/// open another connection (503, counted).
pub(crate) fn open(t: &super::Transport, eio3: bool, ip: Option<IpAddr>) -> Response {
    if t.sessions.full() {
        return polling_full(&t.gw);
    }
    let permit = match t.gw.admission.admit(ip) {
        Ok(permit) => permit,
        Err(refused) => return super::refusal(refused),
    };
    let (socket, outbox) = Socket::open(t, eio3, true, permit);
    let keepalive = socket.keepalive();
    let id: Box<str> = socket.engine_id().into();
    let mut first = VecDeque::new();
    let _ = outbox.take(&mut first, Waker::noop());
    let sess = Arc::new(Session {
        id: id.clone(),
        eio3,
        keepalive,
        outbox,
        state: Mutex::new(State {
            socket: Some(socket),
            ending: None,
            polling: false,
            poller: None,
            upgrading: false,
            alive: true,
            closed: false,
            probing: false,
            prober: None,
        }),
        changed: Notify::new(),
    });
    if !t.sessions.insert(id, sess.clone()) {
        // Others opened meanwhile: this one never starts.
        if let Some(mut socket) = sess.state().socket.take() {
            socket.close();
        }
        return polling_full(&t.gw);
    }
    t.gw.connections
        .spawn(run(t.gw.clone(), t.sessions.clone(), sess));
    text(payload_of(first, eio3))
}

fn polling_full(gw: &Gateway) -> Response {
    gw.metrics.connection_refused("max_polling_sessions");
    super::engine_refusal(
        StatusCode::SERVICE_UNAVAILABLE,
        "too many polling sessions (socketio.max_polling_sessions)",
    )
}

/// A request for an existing session.
pub(crate) async fn serve(
    t: &super::Transport,
    sess: Arc<Session>,
    method: &Method,
    body: Body,
) -> Response {
    match *method {
        Method::GET => poll(&sess).await,
        Method::POST => {
            let max_message = t.gw.config.ws.max_message_size;
            match axum::body::to_bytes(body, max_message.saturating_mul(POST_MESSAGES)).await {
                Ok(bytes) => post(&sess, &bytes, max_message),
                Err(e) if crate::http::is_body_timeout(&e) => {
                    // The client stopped sending: its packets are lost, so
                    // the session cannot go on (as when its transport fails).
                    sess.state().end(None);
                    sess.changed.notify_one();
                    (StatusCode::REQUEST_TIMEOUT, "request timeout").into_response()
                }
                Err(_) => {
                    // Too large (or cut short): like an oversized WebSocket
                    // message, it ends the session.
                    sess.state()
                        .end(Some((close::TOO_BIG, "payload too large")));
                    sess.changed.notify_one();
                    (StatusCode::PAYLOAD_TOO_LARGE, "payload too large").into_response()
                }
            }
        }
        _ => BAD_REQUEST.into_response(),
    }
}

/// Clears the session's GET when the request ends (answered, or dropped by
/// a client that went away).
struct Polling<'a>(&'a Session);

impl Drop for Polling<'_> {
    fn drop(&mut self) {
        let mut st = self.0.state();
        st.polling = false;
        st.poller = None;
        drop(st);
        // The task parks on the rings again while nobody polls.
        self.0.changed.notify_one();
    }
}

/// A GET: everything queued, or the first thing queued from now on.
async fn poll(sess: &Session) -> Response {
    {
        let mut st = sess.state();
        if st.polling {
            // Engine.IO allows one GET at a time; two mean a broken client.
            st.end(None);
            drop(st);
            sess.changed.notify_one();
            return BAD_REQUEST.into_response();
        }
        st.polling = true;
    }
    let _polling = Polling(sess);
    let mut items = VecDeque::new();
    let mut last = None;
    poll_fn(|cx| {
        let mut st = sess.state();
        // Once the session moved to WebSocket, its outbox is not ours.
        if st.ending.is_none() && st.socket.is_some() {
            sess.outbox.register(cx.waker());
            if let Some(reason) = sess.outbox.take(&mut items, cx.waker()) {
                st.end(reason);
                sess.changed.notify_one();
            }
        }
        if st.ending.is_some() {
            // The replies still queued (a DISCONNECT), then CLOSE; messages
            // are dropped, as on a closing WebSocket.
            let _ = sess.outbox.take(&mut items, Waker::noop());
            items.retain(|item| !item.is_message());
            st.closed = true;
            last = Some(CLOSE);
            sess.changed.notify_one();
            return Poll::Ready(());
        }
        if !items.is_empty() {
            return Poll::Ready(());
        }
        if st.upgrading || st.socket.is_none() {
            last = Some(NOOP);
            return Poll::Ready(());
        }
        st.poller = Some(cx.waker().clone());
        Poll::Pending
    })
    .await;
    let mut body = payload_of(items, sess.eio3);
    if let Some(packet) = last {
        payload::push(&mut body, packet, sess.eio3);
    }
    text(body)
}

const CLOSE: &[u8] = b"1";
const NOOP: &[u8] = b"6";

/// A POST: each packet goes to the socket, in order; each is at most
/// `max_message` bytes, as a WebSocket message would be.
fn post(sess: &Session, body: &[u8], max_message: usize) -> Response {
    let Ok(body) = std::str::from_utf8(body) else {
        // Engine.IO 3's binary payloads land here too.
        return refuse(sess, "payload is not UTF-8 text");
    };
    let mut st = sess.state();
    let State {
        socket,
        ending,
        alive,
        ..
    } = &mut *st;
    let Some(socket) = socket.as_mut().filter(|_| ending.is_none()) else {
        return SESSION_UNKNOWN.into_response();
    };
    *alive = true;
    let deadline = socket.deadline();
    let mut answer = text(b"ok".to_vec());
    for packet in payload::packets(body, sess.eio3) {
        let mut link = Link::new(&sess.outbox, ending);
        match packet {
            Err(why) => {
                tracing::debug!(engine = %sess.id, why, "invalid polling payload");
                link.end(Some((close::PROTOCOL_ERROR, why)));
                answer = BAD_REQUEST.into_response();
            }
            Ok(packet) if packet.len() > max_message => {
                link.end(Some((close::TOO_BIG, "message too big")));
                answer = (StatusCode::PAYLOAD_TOO_LARGE, "message too big").into_response();
            }
            // Engine.IO 4's base64 binary packet: an attachment, refused
            // with its event.
            Ok(packet) if packet.starts_with('b') => socket.on_binary(&mut link, &[]),
            Ok(packet) => socket.on_text(&mut link, packet),
        }
        if ending.is_some() {
            break;
        }
    }
    let ended = ending.is_some();
    // An authentication or a refresh moves the deadline the task sleeps to.
    let moved = socket.deadline() != deadline;
    if ended {
        st.wake_ended();
    }
    drop(st);
    if ended || moved {
        sess.changed.notify_one();
    }
    answer
}

fn refuse(sess: &Session, why: &'static str) -> Response {
    tracing::debug!(engine = %sess.id, why, "invalid polling payload");
    sess.state().end(Some((close::PROTOCOL_ERROR, why)));
    sess.changed.notify_one();
    BAD_REQUEST.into_response()
}

/// The payload of queued items (WebSocket frames, unwrapped).
fn payload_of(items: VecDeque<Outbound>, eio3: bool) -> Vec<u8> {
    let size: usize = items.iter().map(|i| i.bytes().len() + 8).sum();
    let mut body = Vec::with_capacity(size);
    for item in &items {
        payload::push(&mut body, frame::server_payload(item.bytes()), eio3);
    }
    body
}

fn text(body: Vec<u8>) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; charset=UTF-8")], body).into_response()
}

/// The session's task: heartbeat, the socket's deadlines, shutdown, and a
/// client that falls too far behind while it is not polling. Ends when the
/// session moves to WebSocket, or when it ends (then the CLOSE packet gets
/// `CLOSE_GRACE` to be collected).
async fn run(gw: Arc<Gateway>, sessions: Arc<Sessions>, sess: Arc<Session>) {
    let keepalive = sess.keepalive;
    let mut next_ping = Instant::now() + keepalive.period;
    loop {
        let deadline = {
            let st = sess.state();
            let Some(socket) = st.socket.as_ref() else {
                break;
            };
            if st.ending.is_some() {
                break;
            }
            socket.deadline().map_or(next_ping, |d| d.min(next_ping))
        };
        tokio::select! {
            _ = tokio::time::sleep_until(deadline) => {}
            _ = sess.changed.notified() => {}
            _ = gw.shutdown.cancelled() => {
                sess.state().end(Some((close::GOING_AWAY, "server shutting down")));
            }
            // Nobody polls: the next publish wakes this task, which then
            // learns whether the client fell too far behind.
            // Under the state's lock, so that it never takes the rings'
            // wake-up from a GET or from the WebSocket the session moved to.
            _ = poll_fn(|cx| {
                let st = sess.state();
                if st.polling || st.socket.is_none() {
                    return Poll::Pending;
                }
                match sess.outbox.park(cx.waker()) {
                    Some(_) => Poll::Ready(()),
                    None => Poll::Pending,
                }
            }) => {}
        }
        let now = Instant::now();
        let mut st = sess.state();
        let st = &mut *st;
        if st.socket.is_none() {
            break;
        }
        if st.ending.is_none()
            && let Some(reason) = sess.outbox.close_requested()
        {
            st.end(reason);
        }
        if let Some(socket) = st.socket.as_mut()
            && st.ending.is_none()
            && socket.deadline().is_some_and(|d| now >= d)
        {
            let mut link = Link::new(&sess.outbox, &mut st.ending);
            socket.on_deadline(&mut link);
        }
        if st.ending.is_none() && now >= next_ping {
            if !st.alive {
                tracing::debug!(engine = %sess.id, "nothing heard from a polling client; closing");
                st.end(None);
            } else {
                st.alive = false;
                if let Some(ping) = keepalive.ping {
                    sess.outbox.push(Outbound::Static(ping));
                }
                next_ping = now + keepalive.period;
            }
        }
        if st.ending.is_some() {
            st.wake_ended();
        }
    }
    let mut socket = {
        let mut st = sess.state();
        // Moved to WebSocket: the session is no longer this task's.
        let (Some(_), Some(socket)) = (st.ending, st.socket.take()) else {
            return;
        };
        st.wake_ended();
        socket
    };
    socket.close();
    // Its place among the open connections is free from now.
    drop(socket);
    // Wait for the client to collect the CLOSE packet, briefly.
    let grace = tokio::time::sleep(CLOSE_GRACE);
    tokio::pin!(grace);
    while !sess.state().closed {
        tokio::select! {
            _ = &mut grace => break,
            _ = sess.changed.notified() => {}
        }
    }
    sessions.remove(&sess.id);
}
