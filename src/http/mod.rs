//! HTTP/1.1 connections: pulso's own accept loop around hyper, for the
//! clocks `axum::serve` does not have, and a lingering close; over TLS
//! when `tls.cert_file` is set ([`tls`]).
//!
//! Without clocks, a client that connects and sends nothing, or sends a
//! header byte now and then, or stops halfway through a body, holds a file
//! descriptor and the connection's buffers for as long as it likes, and so
//! do idle keep-alive connections. Each phase of a connection has its own
//! clock (`http.*` settings):
//!
//! - from accept to the end of the first request's head: `header_timeout`
//!   (over TLS, the handshake comes first, on the same clock);
//! - between requests on a kept-alive connection, until the next request's
//!   first byte: `idle_timeout`; from that byte to the end of its head:
//!   `header_timeout` again;
//! - while a request is being answered there is no connection clock: a
//!   Socket.IO long-poll GET is legitimately held until something is queued
//!   or the next heartbeat (`keepalive_interval`). Only reading its body is
//!   bounded, by `body_timeout` between two reads ([`RequestBody`]);
//! - an upgraded connection (`/ws`, Socket.IO over WebSocket) leaves this
//!   module altogether; the WebSocket keepalive looks after it.
//!
//! hyper's own `header_read_timeout` is not used: it starts when hyper waits
//! for a head, so it also bounds the idle time between requests, and one
//! duration cannot serve both (a kept-alive connection should outlive a load
//! balancer's idle timeout; a head should take seconds).
//!
//! Lingering close: when a request's body is refused unread (413, 401, a
//! timeout), hyper answers and closes the connection. Closing a socket
//! whose receive buffer still holds data makes the kernel send a reset,
//! and a client still writing its body (Node's `http` writes all of it
//! before it reads) then gets EPIPE or ECONNRESET instead of the answer.
//! So, as nginx does, the write side is shut down after the answer and
//! whatever the client still sends is read and discarded, for at most
//! [`LINGER`], before the socket is closed.

pub mod cors;
pub mod error;
pub mod tls;

use std::convert::Infallible;
use std::future::{Future, poll_fn};
use std::io;
use std::net::SocketAddr;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::{Request, Response, StatusCode};
use bytes::Bytes;
use hyper::body::{Body as _, Frame, Incoming, SizeHint};
use hyper::server::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::{Instant, Sleep};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

use crate::config::HttpConfig;

/// Longest lingering close: enough for a client to finish sending a body
/// of a few MiB it wrote before reading, short enough that a client that
/// keeps sending cannot hold the connection.
pub const LINGER: Duration = Duration::from_secs(5);

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Accepts connections until `stop` is cancelled and serves each on its own
/// task in `tasks`, over TLS when `tls` is given; those finish their
/// current request and close once `stop` is cancelled.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    config: HttpConfig,
    tls: Option<Arc<tls::Tls>>,
    stop: CancellationToken,
    tasks: TaskTracker,
) {
    loop {
        let accepted = tokio::select! {
            biased;
            () = stop.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        let (tcp, peer) = match accepted {
            Ok(accepted) => accepted,
            // The peer gave up before accept: nothing to do.
            Err(e) if is_connection_error(&e) => continue,
            Err(e) => {
                // Out of file descriptors, typically: retrying at once would
                // spin, so wait a little (as axum::serve does).
                tracing::error!(error = %e, "accept failed; retrying in 1 s");
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(Duration::from_secs(1)) => continue,
                }
            }
        };
        // Small frames go out at once: without TCP_NODELAY a frame written
        // while an earlier one is unacknowledged waits for the peer's delayed
        // ACK (about 40 ms on Linux), which showed as a 40 ms p99 in fan-out.
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY");
        }
        if config.socket_unsent > 0
            && let Err(e) = limit_unsent(&tcp, config.socket_unsent)
        {
            tracing::debug!(error = %e, "cannot set TCP_NOTSENT_LOWAT");
        }
        tasks.spawn(connection(
            tcp,
            peer,
            app.clone(),
            config,
            tls.clone(),
            stop.clone(),
        ));
    }
}

/// Lets the kernel hold at most `bytes` of what is written to `tcp` and
/// not sent yet (TCP_NOTSENT_LOWAT): the socket takes more, and reports
/// room to write, only once less than that waits (half of it, for the
/// wake-up). The kernel may still add to the segment it is filling (up to
/// 64 KB when the round trip is well under a millisecond, a few KB on a
/// slow link). Data sent and not yet acknowledged is not counted, so a fast
/// client's throughput is the congestion window's, not this limit's; a
/// client that reads slowly leaves the backlog in the connection's own
/// bounded queue, where it is counted (`ws.outbound_queue`) and can be
/// dropped, rather than in a send buffer the kernel grows to MiBs, where
/// it delays the close frame by as many seconds as the link needs for it.
#[cfg(any(target_os = "linux", target_os = "android"))]
fn limit_unsent(tcp: &TcpStream, bytes: u32) -> io::Result<()> {
    socket2::SockRef::from(tcp).set_tcp_notsent_lowat(bytes)
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn limit_unsent(_: &TcpStream, _: u32) -> io::Result<()> {
    Ok(())
}

fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
}

/// Which clock a connection is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Waiting for (the rest of) a request head: `header_timeout`.
    Head = 0,
    /// Between requests, nothing of the next one read yet: `idle_timeout`.
    Idle = 1,
    /// A request is being answered: no connection clock.
    Busy = 2,
    /// Answered with 101: the connection is leaving HTTP.
    Upgraded = 3,
}

impl Phase {
    fn from_u8(n: u8) -> Phase {
        match n {
            0 => Phase::Head,
            1 => Phase::Idle,
            2 => Phase::Busy,
            _ => Phase::Upgraded,
        }
    }
}

/// What the connection task, the socket wrapper and the request and
/// response bodies tell each other. Until an upgrade they all run on the
/// connection's one task, so relaxed atomics only make it `Sync`.
struct ConnState {
    accepted: Instant,
    phase: AtomicU8,
    /// When the current phase started, in µs after `accepted`.
    since: AtomicU64,
    /// The last request's body was dropped before its end: its rest may
    /// still arrive, so a close should linger.
    unread_body: AtomicBool,
    /// The server is stopping: a close does not linger (the process is
    /// about to go, and `shutdown_timeout` is better spent elsewhere).
    stopping: AtomicBool,
}

impl ConnState {
    fn new() -> Self {
        ConnState {
            accepted: Instant::now(),
            phase: AtomicU8::new(Phase::Head as u8),
            since: AtomicU64::new(0),
            unread_body: AtomicBool::new(false),
            stopping: AtomicBool::new(false),
        }
    }

    fn phase(&self) -> Phase {
        Phase::from_u8(self.phase.load(Ordering::Relaxed))
    }

    fn now(&self) -> u64 {
        u64::try_from(self.accepted.elapsed().as_micros()).unwrap_or(u64::MAX)
    }

    /// Bytes arrived: on an idle connection they start the next request's
    /// head, and its clock.
    fn bytes_read(&self) {
        if self
            .phase
            .compare_exchange(
                Phase::Idle as u8,
                Phase::Head as u8,
                Ordering::Relaxed,
                Ordering::Relaxed,
            )
            .is_ok()
        {
            self.since.store(self.now(), Ordering::Relaxed);
        }
    }

    /// hyper parsed a request head and calls the service.
    fn request_started(&self) {
        self.phase.store(Phase::Busy as u8, Ordering::Relaxed);
        self.unread_body.store(false, Ordering::Relaxed);
    }

    /// The response's last byte went to hyper: the connection idles until
    /// the next request (unless it is being upgraded).
    fn response_ended(&self) {
        if self
            .phase
            .compare_exchange(
                Phase::Busy as u8,
                Phase::Idle as u8,
                Ordering::Relaxed,
                Ordering::Relaxed,
            )
            .is_ok()
        {
            self.since.store(self.now(), Ordering::Relaxed);
        }
    }

    /// Whether a close should linger now.
    fn should_linger(&self) -> bool {
        self.unread_body.load(Ordering::Relaxed) && !self.stopping.load(Ordering::Relaxed)
    }

    fn upgrading(&self) {
        self.phase.store(Phase::Upgraded as u8, Ordering::Relaxed);
    }

    /// When the connection must be closed, if it is on a clock.
    fn deadline(&self, config: &HttpConfig) -> Option<(Instant, Phase)> {
        let phase = self.phase();
        let limit = match phase {
            Phase::Head => config.header_timeout,
            Phase::Idle => config.idle_timeout,
            Phase::Busy | Phase::Upgraded => return None,
        };
        let since = Duration::from_micros(self.since.load(Ordering::Relaxed));
        Some((self.accepted + since + limit, phase))
    }
}

/// Serves one connection, after its TLS handshake when `tls` is given.
async fn connection(
    tcp: TcpStream,
    peer: SocketAddr,
    app: Router,
    config: HttpConfig,
    tls: Option<Arc<tls::Tls>>,
    stop: CancellationToken,
) {
    let state = Arc::new(ConnState::new());
    match tls {
        None => http_connection(tcp, peer, app, config, state, stop).await,
        Some(tls) => {
            // The handshake is on the first request head's clock, which
            // starts at accept: both must be done within header_timeout.
            let deadline = state.accepted + config.header_timeout;
            if let Some(stream) = tls.handshake(tcp, deadline, &stop).await {
                http_connection(stream, peer, app, config, state, stop).await;
            }
        }
    }
}

/// Serves one connection until it closes, is upgraded, or misses a clock.
async fn http_connection<S>(
    io: S,
    peer: SocketAddr,
    app: Router,
    config: HttpConfig,
    state: Arc<ConnState>,
    stop: CancellationToken,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let io = TokioIo::new(Watched {
        io,
        state: Some(state.clone()),
        linger: None,
    });
    let service = Service {
        app,
        peer: PeerAddr(peer),
        state: state.clone(),
        body_timeout: config.body_timeout,
    };
    let mut builder = http1::Builder::new();
    // pulso's own clocks (above) replace hyper's.
    builder.header_read_timeout(None);
    let mut conn = pin!(builder.serve_connection(io, service).with_upgrades());
    let mut stopping = pin!(stop.cancelled());
    let mut stopped = false;
    let mut clock = pin!(tokio::time::sleep_until(
        state.accepted + config.header_timeout
    ));
    // The phase changes only while `conn` is polled (hyper reads, calls the
    // service, drops a body), so the deadline is worked out again after
    // every poll of it, and the clock is never late.
    let missed = poll_fn(|cx| {
        if !stopped && stopping.as_mut().poll(cx).is_ready() {
            stopped = true;
            state.stopping.store(true, Ordering::Relaxed);
            // Finishes the request in progress, then closes; an idle
            // connection closes at once.
            conn.as_mut().graceful_shutdown();
        }
        if let Poll::Ready(result) = conn.as_mut().poll(cx) {
            if let Err(e) = result {
                tracing::debug!(error = %e, "HTTP connection ended with an error");
            }
            return Poll::Ready(None);
        }
        let Some((deadline, phase)) = state.deadline(&config) else {
            return Poll::Pending;
        };
        if clock.deadline() != deadline {
            clock.as_mut().reset(deadline);
        }
        ready!(clock.as_mut().poll(cx));
        Poll::Ready(Some(phase))
    })
    .await;
    // Dropping `conn` closes the socket.
    match missed {
        Some(Phase::Idle) => {
            tracing::debug!("idle keep-alive connection closed (http.idle_timeout)")
        }
        Some(_) => tracing::debug!(
            "request head not received in time; connection closed (http.header_timeout)"
        ),
        None => {}
    }
}

/// The router as hyper's service: each request's body gets its read clock
/// and each response tells the connection when it is done.
struct Service {
    app: Router,
    peer: PeerAddr,
    state: Arc<ConnState>,
    body_timeout: Duration,
}

impl hyper::service::Service<Request<Incoming>> for Service {
    type Response = Response<ResponseBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn call(&self, request: Request<Incoming>) -> Self::Future {
        self.state.request_started();
        let mut request = request.map(|body| {
            // Most requests (GETs) have no body: nothing to watch.
            if body.is_end_stream() {
                Body::new(body)
            } else {
                Body::new(RequestBody {
                    inner: body,
                    timeout: self.body_timeout,
                    clock: None,
                    waiting: false,
                    ended: false,
                    state: self.state.clone(),
                })
            }
        });
        request.extensions_mut().insert(self.peer);
        let app = self.app.clone();
        let state = self.state.clone();
        Box::pin(async move {
            let response = app.oneshot(request).await?;
            if response.status() == StatusCode::SWITCHING_PROTOCOLS {
                state.upgrading();
            }
            Ok(response.map(|body| ResponseBody {
                body,
                _done: ResponseDone(state),
            }))
        })
    }
}

/// A response body that, once hyper has taken all of it (and drops it),
/// starts the connection's idle clock.
struct ResponseBody {
    body: Body,
    _done: ResponseDone,
}

struct ResponseDone(Arc<ConnState>);

impl Drop for ResponseDone {
    fn drop(&mut self) {
        self.0.response_ended();
    }
}

impl hyper::body::Body for ResponseBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// A request body read with at most `http.body_timeout` between two reads
/// (like nginx's `client_body_timeout`, not a bound on the whole upload,
/// which `api.max_body` and the like limit in size instead).
struct RequestBody {
    inner: Incoming,
    timeout: Duration,
    /// Allocated the first time a read has to wait.
    clock: Option<Pin<Box<Sleep>>>,
    /// The clock runs for the wait in progress.
    waiting: bool,
    ended: bool,
    state: Arc<ConnState>,
}

/// The error a request body yields when the client stopped sending it.
#[derive(Debug, thiserror::Error)]
#[error("the client sent no request body data for {0:?} (http.body_timeout)")]
pub struct BodyTimeout(Duration);

/// Whether reading a request body failed because the client stalled.
pub fn is_body_timeout(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(error);
    while let Some(e) = next {
        if e.is::<BodyTimeout>() {
            return true;
        }
        next = e.source();
    }
    false
}

impl hyper::body::Body for RequestBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(frame) => {
                this.waiting = false;
                if frame.is_none() || this.inner.is_end_stream() {
                    this.ended = true;
                }
                Poll::Ready(frame.map(|r| r.map_err(BoxError::from)))
            }
            Poll::Pending => {
                let timeout = this.timeout;
                let clock = match &mut this.clock {
                    Some(clock) => {
                        if !this.waiting {
                            clock.as_mut().reset(Instant::now() + timeout);
                        }
                        clock
                    }
                    None => this.clock.insert(Box::pin(tokio::time::sleep(timeout))),
                };
                this.waiting = true;
                ready!(clock.as_mut().poll(cx));
                Poll::Ready(Some(Err(Box::new(BodyTimeout(this.timeout)))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for RequestBody {
    fn drop(&mut self) {
        if !self.ended && !self.inner.is_end_stream() {
            self.state.unread_body.store(true, Ordering::Relaxed);
        }
    }
}

/// The TCP (or TLS) stream as hyper sees it: reads start the head clock of
/// an idle connection, and a shutdown after an unread body lingers.
struct Watched<S> {
    io: S,
    /// Let go once the connection is upgraded: a WebSocket has no use for
    /// it, and its allocation is freed with the connection's task.
    state: Option<Arc<ConnState>>,
    /// Running while a close lingers.
    linger: Option<Pin<Box<Sleep>>>,
}

impl<S> Watched<S> {
    /// Lets the state go once the connection is upgraded.
    fn release_if_upgraded(&mut self) {
        if let Some(state) = &self.state
            && state.phase() == Phase::Upgraded
        {
            self.state = None;
        }
    }

    /// The state, unless the connection has been upgraded.
    fn state(&mut self) -> Option<&ConnState> {
        self.release_if_upgraded();
        self.state.as_deref()
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let result = ready!(Pin::new(&mut self.io).poll_read(cx, buf));
        if buf.filled().len() > before
            && let Some(state) = self.state()
        {
            state.bytes_read();
        }
        Poll::Ready(result)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for Watched<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        // The first write of an upgraded connection is its 101: the state
        // is let go there, before the connection changes hands.
        self.release_if_upgraded();
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.release_if_upgraded();
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    /// Shuts the write side down (the client reads the answer and then the
    /// end of the stream) and, after an unread body, lingers: reads and
    /// discards until the client closes too, [`LINGER`] passes or the
    /// server stops.
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.linger.is_none() {
            ready!(Pin::new(&mut this.io).poll_shutdown(cx))?;
            if !this.state().is_some_and(ConnState::should_linger) {
                return Poll::Ready(Ok(()));
            }
            this.linger = Some(Box::pin(tokio::time::sleep(LINGER)));
        } else if !this.state().is_some_and(ConnState::should_linger) {
            // The server started to stop (the connection task, woken by
            // it, polls the connection and so this again).
            return Poll::Ready(Ok(()));
        }
        let mut scratch = [0u8; 8192];
        loop {
            let mut buf = ReadBuf::new(&mut scratch);
            match Pin::new(&mut this.io).poll_read(cx, &mut buf) {
                // The client closed its side: nothing more can arrive.
                Poll::Ready(Ok(())) if buf.filled().is_empty() => return Poll::Ready(Ok(())),
                Poll::Ready(Ok(())) => continue,
                Poll::Ready(Err(_)) => return Poll::Ready(Ok(())),
                // tokio's cooperative budget also ends up here, so a client
                // that sends without pause cannot keep this loop spinning.
                Poll::Pending => break,
            }
        }
        match this.linger.as_mut().map(|l| l.as_mut().poll(cx)) {
            Some(Poll::Pending) => Poll::Pending,
            _ => Poll::Ready(Ok(())),
        }
    }
}

/// The TCP peer of the connection a request came on, in its extensions.
/// Behind a proxy it is the proxy's address: `X-Forwarded-For` is not read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerAddr(pub SocketAddr);

/// The IP address of the client a request came from, as the TCP peer.
pub fn peer_ip(extensions: &axum::http::Extensions) -> Option<std::net::IpAddr> {
    extensions.get::<PeerAddr>().map(|p| p.0.ip())
}

/// The token of an `Authorization: Bearer …` header.
pub fn bearer_token(headers: &axum::http::HeaderMap) -> Option<&str> {
    headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::trim)
}

/// The token of an upgrade request: `Authorization: Bearer …`, else
/// `?token=…` (browsers cannot set headers on a WebSocket).
pub fn request_token(headers: &axum::http::HeaderMap, query: Option<&str>) -> Option<String> {
    let bearer = bearer_token(headers).map(str::to_string);
    bearer.or_else(|| {
        serde_urlencoded::from_str::<Vec<(String, String)>>(query?)
            .ok()?
            .into_iter()
            .find(|(k, _)| k == "token")
            .map(|(_, v)| v)
    })
}
