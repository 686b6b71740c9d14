//! Engine.IO over WebSocket, on the same one-task connection as `/ws`
//! ([`crate::transport::connection`]): clients that open a WebSocket straight away
//! (`transport=websocket`, as sails.io.js and clients configured with
//! `transports: ["websocket"]` do), and polling sessions that upgrade
//! (`transport=websocket&sid=...`).
//!
//! An upgrade follows Engine.IO: the client probes with `2probe` and gets
//! `3probe` while its session still polls; a waiting GET is then answered
//! with NOOP so the client can pause polling; its `5` moves the session's
//! socket and outbox onto the WebSocket. Until then the WebSocket writes
//! only the probe's answer, WebSocket pongs and its close; one WebSocket at
//! a time may try to upgrade a session.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::Request;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Instant;

use super::Transport;
use super::packet;
use super::polling::{Session, Sessions};
use super::socket::Socket;
use crate::gateway::admission::Permit;
use crate::transport::connection::{Connection, Link, Protocol};
use crate::transport::handshake;

/// How long a probing WebSocket may take to send `5`.
const UPGRADE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a probe waits for `5` once its session has ended: a client
/// that already paused polling reads the session's last packets (a
/// DISCONNECT) only on the WebSocket, and only after sending `5`.
const ENDED_GRACE: Duration = Duration::from_secs(1);

/// Accepts the WebSocket handshake and serves the connection on a task.
fn accept<F>(
    t: &Transport,
    request: Request,
    serve: impl FnOnce(TokioIo<hyper::upgrade::Upgraded>) -> F + Send + 'static,
) -> Response
where
    F: Future<Output = ()> + Send + 'static,
{
    let (parts, _body) = request.into_parts();
    let (response, on_upgrade) = match handshake::accept(parts) {
        Ok(accepted) => accepted,
        Err(e) => return e.into_response(),
    };
    let tracker = t.gw.connections.clone();
    tokio::spawn(tracker.track_future(async move {
        match on_upgrade.await {
            Ok(upgraded) => serve(TokioIo::new(upgraded)).await,
            Err(e) => tracing::debug!(error = %e, "socket.io upgrade failed"),
        }
    }));
    response
}

/// `transport=websocket` without a session: a new one on this WebSocket.
pub(crate) fn direct(t: &Transport, request: Request, eio3: bool, permit: Permit) -> Response {
    let t2 = t.clone();
    accept(t, request, move |io| run(t2, io, eio3, permit))
}

async fn run<S>(t: Transport, io: S, eio3: bool, permit: Permit)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    // Built in a block: a named local moved into the connection would
    // otherwise still take room in this task's state (its storage lives
    // until the end of its scope, across the awaits below).
    let mut connection = {
        let (socket, outbox) = Socket::open(&t, eio3, false, permit);
        let (keepalive, conn) = (socket.keepalive(), socket.conn());
        Connection::new(
            io,
            socket,
            outbox,
            keepalive,
            t.gw.config.ws.max_message_size,
            conn,
        )
    };
    let reason = connection.serve().await;
    connection.protocol().close();
    connection.finish(reason).await;
}

/// `transport=websocket&sid=...`: the upgrade of a polling session.
pub(crate) fn upgrade(t: &Transport, request: Request, sess: Arc<Session>) -> Response {
    let t2 = t.clone();
    accept(t, request, move |io| run_upgrade(t2, io, sess))
}

async fn run_upgrade<S>(t: Transport, io: S, sess: Arc<Session>)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    if !sess.claim_probe() {
        tracing::debug!(engine = %sess.id(), "a second upgrade attempt; closed");
        return;
    }
    // The session's heartbeat; until the upgrade it only checks that the
    // probe is alive (no pings are written while the WebSocket is held).
    // Built in a block, as in `run`.
    let mut connection = {
        let (outbox, keepalive) = (sess.outbox().clone(), sess.keepalive());
        let probe = Upgrade {
            sessions: t.sessions.clone(),
            stage: Stage::Probing(sess),
            probe_deadline: Instant::now() + UPGRADE_TIMEOUT,
            ended_at: None,
            probe_answer: None,
        };
        let max_message = t.gw.config.ws.max_message_size;
        Connection::new(io, probe, outbox, keepalive, max_message, 0).hold()
    };
    let reason = connection.serve().await;
    match &mut connection.protocol().stage {
        Stage::Upgraded(socket) => socket.close(),
        Stage::Probing(sess) => sess.abandon_probe(),
    }
    connection.finish(reason).await;
}

/// A WebSocket probing a polling session, then serving it.
struct Upgrade {
    sessions: Arc<Sessions>,
    stage: Stage,
    probe_deadline: Instant,
    /// When the probe learned that its session ended.
    ended_at: Option<Instant>,
    /// `3probe`, until the connection writes it: while the session still
    /// polls, the outbox is not this WebSocket's (see
    /// [`Protocol::take_held_reply`]).
    probe_answer: Option<Bytes>,
}

// The large variant is the one a connection lives in; boxing it would add
// an allocation per connection and save nothing.
#[allow(clippy::large_enum_variant)]
enum Stage {
    /// Until the client sends `5`.
    Probing(Arc<Session>),
    /// The session's socket, now served here; the polling session is gone.
    Upgraded(Socket),
}

const UPGRADE_EXPECTED: crate::transport::outbox::CloseReason =
    Some((crate::transport::close::PROTOCOL_ERROR, "upgrade expected"));

impl Protocol for Upgrade {
    fn on_text(&mut self, link: &mut Link<'_>, text: &str) {
        let sess = match &mut self.stage {
            Stage::Upgraded(socket) => return socket.on_text(link, text),
            Stage::Probing(sess) => sess,
        };
        match text {
            // Only the latest answer is kept until written: a peer that
            // probes without reading holds one.
            "2probe" if sess.probe() => self.probe_answer = Some(packet::pong("probe")),
            "5" => match sess.upgrade() {
                Ok(socket) => {
                    self.sessions.remove(sess.id());
                    self.stage = Stage::Upgraded(socket);
                    link.release();
                }
                // The session ended during the probe: its last replies (a
                // DISCONNECT) go out here, then the close.
                Err(reason) => {
                    link.release();
                    link.end(reason.or(Some((crate::transport::close::NORMAL, ""))));
                }
            },
            // Anything else before the upgrade breaks the protocol.
            _ => link.end(UPGRADE_EXPECTED),
        }
    }

    fn on_binary(&mut self, link: &mut Link<'_>, data: &[u8]) {
        match &mut self.stage {
            Stage::Upgraded(socket) => socket.on_binary(link, data),
            Stage::Probing(_) => link.end(UPGRADE_EXPECTED),
        }
    }

    fn deadline(&self) -> Option<Instant> {
        match &self.stage {
            Stage::Upgraded(socket) => socket.deadline(),
            // A session that ended (or a server shutting down) ends the
            // probe soon.
            Stage::Probing(_) => Some(match self.ended_at {
                Some(at) => self.probe_deadline.min(at + ENDED_GRACE),
                None => self.probe_deadline,
            }),
        }
    }

    fn on_deadline(&mut self, link: &mut Link<'_>) {
        let sess = match &mut self.stage {
            Stage::Upgraded(socket) => return socket.on_deadline(link),
            Stage::Probing(sess) => sess,
        };
        match sess.ended(None) {
            Some(reason) => link.end(reason.or(Some((crate::transport::close::NORMAL, "")))),
            None => {
                tracing::debug!(engine = %sess.id(), "no upgrade in time");
                link.end(None);
            }
        }
    }

    fn take_held_reply(&mut self) -> Option<Bytes> {
        self.probe_answer.take()
    }

    fn register(&mut self, waker: &std::task::Waker) {
        if let Stage::Probing(sess) = &self.stage
            && self.ended_at.is_none()
            && sess.ended(Some(waker)).is_some()
        {
            self.ended_at = Some(Instant::now());
        }
    }
}
