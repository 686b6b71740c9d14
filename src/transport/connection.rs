//! One WebSocket connection: a single task that reads client frames, hands
//! whole messages to its [`Protocol`] (a front end's: `/ws`'s JSON, or
//! Engine.IO for Socket.IO clients), and writes what its [`Outbox`] holds.
//!
//! Everything happens in one `poll`: the task is woken by the socket (data
//! in, or room to write), by its outbox (a push), or by its timer
//! (keepalive, the protocol's deadlines), and each time it reads all it can, then writes
//! all it can with one vectored write of shared frames. A client that stops
//! reading only fills its own outbox, which then closes it with 1013: the
//! kernel holds little of the backlog (`ws.socket_unsent`, set where the
//! socket is accepted), so the outbox counts what the client has not read,
//! and the close frame, sent after the queued messages are dropped, waits
//! behind tens of KB rather than a send buffer of MiBs.
//!
//! Per connection this holds the socket, a few counters and two empty
//! `Vec`s: reads go into a buffer shared by every connection on the worker
//! thread, and only a frame that arrives in pieces is copied aside.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::future::poll_fn;
use std::io::IoSlice;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

use super::close;
use super::frame::{self, FrameError, Parsed};
use super::outbox::{CloseReason, Outbound, Outbox};

/// Bytes read at a time into the shared buffer.
const SCRATCH_SIZE: usize = 16 * 1024;
/// How far a frame's private buffer grows ahead of the bytes that arrived:
/// a header announces a length, but memory is spent only as the payload
/// comes (a client that sends headers of large frames and nothing more
/// costs this much per connection, not `ws.max_message_size`).
const GROW_AHEAD: usize = 16 * 1024;
/// How far past the frame it waits for a connection reads into its own
/// buffer (so the start of the next frames comes in the same read).
pub const READ_AHEAD: usize = 512;
/// Frames written by one `writev`, when they are not copied together.
const MAX_SLICES: usize = 64;
/// Frames up to this size in all are copied into one buffer and sent with
/// one `send` rather than a `writev` of many small pieces: the kernel copies
/// one contiguous buffer much faster than many ~200-byte iovec segments
/// (`_copy_from_iter` was 5 % of CPU in fan-out) and `send` skips the VFS
/// layer `writev` goes through.
const COALESCE_MAX: usize = 16 * 1024;
/// How long the close handshake may take before the socket is dropped.
const CLOSE_GRACE: Duration = Duration::from_secs(2);
/// The same for a slow consumer (1013): its close frame queues behind
/// what the kernel holds for the socket, which is at most `ws.socket_unsent`
/// plus one segment the kernel was still filling, plus what is in flight
/// (see `limit_unsent` in `http`): this covers about 80 KB at 64 kbit/s.
const SLOW_CLOSE_GRACE: Duration = Duration::from_secs(10);
/// A `sending` deque larger than this is freed once drained, so a burst
/// does not pin memory on a connection that then goes idle.
const KEEP_CAPACITY: usize = 32;

thread_local! {
    /// The read buffer of every connection polled on this worker thread.
    static SCRATCH: RefCell<Box<[u8]>> = RefCell::new(vec![0; SCRATCH_SIZE].into_boxed_slice());
    /// Where small queued frames are copied together before one write.
    static COALESCE: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// What a connection speaks inside its WebSocket messages, supplied by a
/// front end: `/ws`'s JSON, or Engine.IO/Socket.IO.
/// Handlers run inside the connection's poll and must not block.
pub trait Protocol {
    /// A whole text message.
    fn on_text(&mut self, link: &mut Link<'_>, text: &str);
    /// A whole binary message.
    fn on_binary(&mut self, link: &mut Link<'_>, data: &[u8]);
    /// When [`Protocol::on_deadline`] is due next (token expiry, auth
    /// timeout), if ever.
    fn deadline(&self) -> Option<Instant>;
    fn on_deadline(&mut self, link: &mut Link<'_>);
    /// Called on every poll of the connection, for a protocol that may move
    /// its deadline on its own (an upgrade probe whose session ends).
    fn register(&mut self, _waker: &std::task::Waker) {}
    /// While the outbox is held ([`Connection::hold`]): the protocol's own
    /// reply to write (an upgrade probe's `3probe`), taken when the
    /// connection can write. Kept by the protocol, which holds one at
    /// most, so that connections that never hold pay nothing for it.
    fn take_held_reply(&mut self) -> Option<Bytes> {
        None
    }
}

/// What a protocol handler may do to its connection.
pub struct Link<'a> {
    pub outbox: &'a Outbox,
    ending: &'a mut Option<CloseReason>,
    /// On a [`Connection`]: whether another transport owns its outbox (see
    /// [`Connection::hold`]). `None` on a transport that never holds one.
    held: Option<&'a mut bool>,
}

impl<'a> Link<'a> {
    /// A link for a transport other than [`Connection`] (Engine.IO's
    /// long-polling), with its own end slot.
    pub fn new(outbox: &'a Outbox, ending: &'a mut Option<CloseReason>) -> Self {
        Link {
            outbox,
            ending,
            held: None,
        }
    }

    /// Lets a connection built with [`Connection::hold`] write its outbox.
    pub fn release(&mut self) {
        if let Some(held) = &mut self.held {
            **held = false;
        }
    }

    /// Queues a framed reply behind anything queued before it. Replies
    /// count against the outbox's limit, so a peer that keeps asking
    /// without reading is closed as a slow consumer rather than buffered.
    pub fn send(&self, frame: Bytes) {
        self.outbox.push(Outbound::Frame(frame));
    }

    /// Decides how the connection ends; the first decision stands.
    pub fn end(&mut self, reason: CloseReason) {
        if self.ending.is_none() {
            *self.ending = Some(reason);
        }
    }
}

/// The connection's liveness check: every `period`, a peer that sent
/// nothing since the last check is dropped, and `ping` (if any) is sent.
#[derive(Clone, Copy)]
pub struct Keepalive {
    pub period: Duration,
    pub ping: Option<&'static [u8]>,
}

pub struct Connection<S, P> {
    io: S,
    proto: P,
    /// For logs.
    id: u64,
    max_message: usize,
    keepalive: Keepalive,
    outbox: Arc<Outbox>,
    /// Taken from the outbox, being written; `written` bytes of the first
    /// item are already out.
    sending: VecDeque<Outbound>,
    written: usize,
    /// A lone message was held back for one turn of the scheduler.
    deferred: bool,
    /// The start of a frame that has not fully arrived: `partial[..filled]`
    /// (no allocation between frames), and how many bytes it needs in all.
    partial: Vec<u8>,
    filled: usize,
    need: usize,
    /// The answer to the client's latest ping frame, not yet queued. Pings
    /// with no data message between them share it (RFC 6455 §5.5.3 allows
    /// answering only the latest), so a ping flood holds one pong, not one
    /// per ping. A data message moves it to the outbox first (see
    /// `on_message`), so answers keep the order of what they answer; left
    /// here, it is written after whatever was queued before it.
    pong: Option<Bytes>,
    /// A fragmented message being put together, and its opcode.
    message: Vec<u8>,
    message_opcode: Option<u8>,
    /// A frame came since the last keepalive check.
    alive: bool,
    next_ping: Instant,
    /// How the connection ends, once that is decided.
    ending: Option<CloseReason>,
    /// The outbox belongs to another transport for now: only pongs are
    /// written, and no pings (an Engine.IO upgrade being probed).
    held: bool,
}

impl<S: AsyncRead + AsyncWrite + Unpin, P: Protocol> Connection<S, P> {
    pub fn new(
        io: S,
        proto: P,
        outbox: Arc<Outbox>,
        keepalive: Keepalive,
        max_message: usize,
        id: u64,
    ) -> Self {
        Connection {
            io,
            proto,
            id,
            max_message,
            keepalive,
            outbox,
            sending: VecDeque::new(),
            written: 0,
            deferred: false,
            partial: Vec::new(),
            filled: 0,
            need: 0,
            pong: None,
            message: Vec::new(),
            message_opcode: None,
            alive: true,
            next_ping: Instant::now() + keepalive.period,
            ending: None,
            held: false,
        }
    }

    /// Leaves the outbox alone until the protocol calls [`Link::release`].
    pub fn hold(mut self) -> Self {
        self.held = true;
        self
    }

    pub fn protocol(&mut self) -> &mut P {
        &mut self.proto
    }

    /// Bytes held for the client's unfinished input: the frame not fully
    /// read yet and the fragmented message being put together. Bounded by
    /// the message size limit plus a frame header and [`READ_AHEAD`]; the
    /// fuzz target `ws_frame` checks it after every read.
    #[doc(hidden)]
    pub fn buffered(&self) -> usize {
        self.partial.len() + self.message.len()
    }

    /// Serves the connection until it must end, and says how.
    pub async fn serve(&mut self) -> CloseReason {
        let mut timer = pin!(tokio::time::sleep_until(self.next_deadline()));
        poll_fn(|cx| self.poll_serve(cx, timer.as_mut())).await
    }

    fn poll_serve(
        &mut self,
        cx: &mut Context<'_>,
        mut timer: Pin<&mut Sleep>,
    ) -> Poll<CloseReason> {
        self.proto.register(cx.waker());
        self.poll_read(cx);
        self.poll_write(cx);
        loop {
            if let Some(reason) = self.ending {
                return Poll::Ready(reason);
            }
            // A refresh may have moved the expiry; a tick moves the ping.
            let deadline = self.next_deadline();
            if timer.deadline() != deadline {
                timer.as_mut().reset(deadline);
            }
            if timer.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            self.on_timer();
            // A ping was queued: write it now.
            self.poll_write(cx);
        }
    }

    fn next_deadline(&self) -> Instant {
        match self.proto.deadline() {
            Some(deadline) => deadline.min(self.next_ping),
            None => self.next_ping,
        }
    }

    fn on_timer(&mut self) {
        let now = Instant::now();
        if self.proto.deadline().is_some_and(|d| now >= d) {
            let was_held = self.held;
            let mut link = Link {
                outbox: &self.outbox,
                ending: &mut self.ending,
                held: Some(&mut self.held),
            };
            self.proto.on_deadline(&mut link);
            self.on_released(was_held);
        }
        if self.ending.is_none() && now >= self.next_ping {
            if !self.alive {
                tracing::debug!(
                    conn = self.id,
                    "nothing heard since the last ping; terminating"
                );
                self.end(None);
                return;
            }
            self.alive = false;
            if let Some(ping) = self.keepalive.ping
                && !self.held
            {
                self.sending.push_back(Outbound::Static(ping));
            }
            self.next_ping = now + self.keepalive.period;
        }
    }

    /// Decides how the connection ends; the first decision stands.
    fn end(&mut self, reason: CloseReason) {
        if self.ending.is_none() {
            self.ending = Some(reason);
        }
    }

    // ---- reading ----------------------------------------------------------

    /// Reads and handles everything the socket has, until it would block.
    fn poll_read(&mut self, cx: &mut Context<'_>) {
        while self.ending.is_none() {
            let read = if self.filled == 0 {
                self.read_shared(cx)
            } else {
                self.read_partial(cx)
            };
            match read {
                Poll::Pending => return,
                Poll::Ready(Ok(0)) => self.end(None),
                Poll::Ready(Ok(_)) => {}
                Poll::Ready(Err(e)) => {
                    tracing::debug!(conn = self.id, error = %e, "ws read failed");
                    self.end(None);
                }
            }
        }
    }

    /// Reads into the thread's shared buffer and handles the whole frames
    /// in it; a trailing piece of a frame is copied to `partial`.
    fn read_shared(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<usize>> {
        SCRATCH.with(|cell| {
            // Frames are handled synchronously and never read a socket, so
            // the buffer is free here; if it were not, read privately.
            let Ok(mut scratch) = cell.try_borrow_mut() else {
                return self.read_partial(cx);
            };
            let mut buf = ReadBuf::new(&mut scratch[..]);
            ready!(Pin::new(&mut self.io).poll_read(cx, &mut buf))?;
            let n = buf.filled().len();
            let data = &mut scratch[..n];
            let used = self.consume(data);
            if used < n && self.ending.is_none() {
                let rest = &data[used..];
                self.partial = rest.to_vec();
                self.filled = rest.len();
            }
            Poll::Ready(Ok(n))
        })
    }

    /// Reads more of the frame in `partial` (and possibly what follows).
    /// The buffer grows with what arrives, at most [`GROW_AHEAD`] past it
    /// whatever length the frame's header announced, and only grows
    /// (zero-filled once, its capacity doubling), so a frame trickling in a
    /// byte at a time costs no more than twice its length in copying.
    fn read_partial(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<usize>> {
        let want = self
            .need
            .max(self.filled + READ_AHEAD)
            .min(self.filled + GROW_AHEAD);
        if self.partial.len() < want {
            self.partial.resize(want, 0);
        }
        let mut buf = ReadBuf::new(&mut self.partial[self.filled..]);
        ready!(Pin::new(&mut self.io).poll_read(cx, &mut buf))?;
        let n = buf.filled().len();
        self.filled += n;
        if n > 0 {
            let mut data = std::mem::take(&mut self.partial);
            let used = self.consume(&mut data[..self.filled]);
            if used < self.filled && self.ending.is_none() {
                data.copy_within(used..self.filled, 0);
                self.filled -= used;
                self.partial = data;
            } else {
                // Dropped: no buffer is kept between frames.
                self.filled = 0;
            }
        }
        Poll::Ready(Ok(n))
    }

    /// Handles the whole frames at the front of `data`; returns the bytes used.
    fn consume(&mut self, data: &mut [u8]) -> usize {
        let max = self.max_message;
        let mut at = 0;
        while self.ending.is_none() && at < data.len() {
            // A continuation frame may only bring what the message being
            // put together has left of the limit: one announcing more is
            // refused at its header, so at most one limit's worth of
            // message and frame is ever held.
            let limit = if data[at] & 0x0F == frame::CONTINUATION {
                max.saturating_sub(self.message.len())
            } else {
                max
            };
            match frame::parse(&mut data[at..], limit) {
                Ok(Parsed::Frame(f, used)) => {
                    at += used;
                    self.on_frame(f.fin, f.opcode, f.payload);
                }
                Ok(Parsed::Incomplete(need)) => {
                    self.need = need;
                    break;
                }
                Err(e) => self.refuse(e),
            }
        }
        at
    }

    fn refuse(&mut self, e: FrameError) {
        match e {
            FrameError::TooBig => self.end(Some((close::TOO_BIG, "message too big"))),
            FrameError::Protocol(why) => {
                tracing::debug!(conn = self.id, why, "ws protocol error");
                self.end(Some((close::PROTOCOL_ERROR, why)));
            }
            FrameError::InvalidData(why) => {
                tracing::debug!(conn = self.id, why, "ws invalid data");
                self.end(Some((close::INVALID_DATA, why)));
            }
        }
    }

    fn on_frame(&mut self, fin: bool, opcode: u8, payload: &[u8]) {
        self.alive = true;
        match opcode {
            frame::PING => self.pong = Some(frame::encode(frame::PONG, payload)),
            frame::PONG => {}
            frame::CLOSE => match frame::close_code(payload) {
                // Answer with the peer's own code (RFC 6455 §5.5.1).
                Ok(code) => self.end(Some((code.unwrap_or(close::NORMAL), ""))),
                Err(e) => self.refuse(e),
            },
            frame::TEXT | frame::BINARY if self.message_opcode.is_some() => {
                self.refuse(FrameError::Protocol(
                    "a new message before the last one ended",
                ));
            }
            frame::TEXT | frame::BINARY if fin => self.on_message(opcode, payload),
            frame::TEXT | frame::BINARY => {
                self.message_opcode = Some(opcode);
                self.message.extend_from_slice(payload);
            }
            _ => {
                // A continuation frame.
                let Some(first) = self.message_opcode else {
                    return self.refuse(FrameError::Protocol("continuation without a message"));
                };
                if self.message.len() + payload.len() > self.max_message {
                    return self.refuse(FrameError::TooBig);
                }
                self.message.extend_from_slice(payload);
                if fin {
                    let message = std::mem::take(&mut self.message);
                    self.message_opcode = None;
                    self.on_message(first, &message);
                }
            }
        }
    }

    fn on_message(&mut self, opcode: u8, payload: &[u8]) {
        // A pong still in its slot answers a ping that came before this
        // message: it goes to the outbox ahead of this message's replies
        // (a `/ws` pong, an Engine.IO `3`), and neither displaces the other.
        // A held outbox is not ours; the slot is then written first.
        if !self.held
            && let Some(pong) = self.pong.take()
        {
            self.outbox.push(Outbound::Frame(pong));
        }
        let was_held = self.held;
        let mut link = Link {
            outbox: &self.outbox,
            ending: &mut self.ending,
            held: Some(&mut self.held),
        };
        if opcode == frame::BINARY {
            self.proto.on_binary(&mut link, payload);
        } else {
            match std::str::from_utf8(payload) {
                Ok(text) => self.proto.on_text(&mut link, text),
                Err(_) => link.end(Some((close::INVALID_DATA, "text is not UTF-8"))),
            }
        }
        self.on_released(was_held);
    }

    /// After a handler: if it released the outbox, what the connection
    /// answered on its own meanwhile goes out before anything the outbox
    /// holds. Only `sending` is written before the outbox is taken.
    fn on_released(&mut self, was_held: bool) {
        if was_held && !self.held {
            self.queue_own();
        }
    }

    /// Moves the pong and the protocol's held reply, in that order, to the
    /// back of `sending`. While held, the pong goes first even when the
    /// ping came after the message the held reply answers: a pong may be
    /// sent at any point between messages, and keeping one of each bounds
    /// what a peer that does not read can make the connection hold.
    fn queue_own(&mut self) {
        let own = [self.pong.take(), self.proto.take_held_reply()];
        self.sending
            .extend(own.into_iter().flatten().map(Outbound::Frame));
    }

    // ---- writing ----------------------------------------------------------

    /// Writes what is queued until the socket would block or nothing is left.
    fn poll_write(&mut self, cx: &mut Context<'_>) {
        if self.held {
            return self.poll_write_held(cx);
        }
        self.outbox.register(cx.waker());
        if !self.sending.is_empty() && !self.deferred {
            // Writing is under way (perhaps blocked by a peer that does not
            // read): a close request, or falling a ring behind, must not
            // wait for it.
            if let Some(reason) = self.outbox.close_requested() {
                self.end(reason);
                return;
            }
        }
        if self.deferred {
            // What was published meanwhile joins the deferred frame.
            self.deferred = false;
            if let Some(reason) = self.outbox.take(&mut self.sending, cx.waker()) {
                self.end(reason);
                return;
            }
        }
        while self.ending.is_none() {
            if self.sending.is_empty() {
                if self.sending.capacity() > KEEP_CAPACITY {
                    self.sending = VecDeque::new();
                }
                if let Some(reason) = self.outbox.take(&mut self.sending, cx.waker()) {
                    self.end(reason);
                    return;
                }
                if let Some(pong) = self.pong.take() {
                    self.sending.push_back(Outbound::Frame(pong));
                }
                if self.sending.is_empty() {
                    return;
                }
                // A lone published message waits one turn of the scheduler:
                // a publish still being queued on the other core usually
                // adds its next message meanwhile, and both share a write
                // (measured: +4% deliveries/s, lower p99, in fan-out).
                if self.sending.len() == 1 && self.sending[0].is_message() {
                    self.deferred = true;
                    cx.waker().wake_by_ref();
                    return;
                }
            }
            match self.poll_write_some(cx) {
                Poll::Pending => {
                    if let Some(reason) = self.outbox.park(cx.waker()) {
                        self.end(reason);
                    }
                    return;
                }
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(e)) => {
                    tracing::debug!(conn = self.id, error = %e, "ws write failed");
                    self.end(None);
                }
            }
        }
    }

    /// Writes the connection's own answers only (its pong, then the
    /// protocol's held reply): the outbox is another transport's for now.
    fn poll_write_held(&mut self, cx: &mut Context<'_>) {
        while self.ending.is_none() {
            if self.sending.is_empty() {
                self.queue_own();
                if self.sending.is_empty() {
                    return;
                }
            }
            match self.poll_write_some(cx) {
                Poll::Pending => return,
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(e)) => {
                    tracing::debug!(conn = self.id, error = %e, "ws write failed");
                    self.end(None);
                }
            }
        }
    }

    /// One write of the front of `sending`: small frames copied together
    /// into one buffer, a lone frame as it is, otherwise one vectored write.
    fn poll_write_some(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let io = Pin::new(&mut self.io);
        let (sending, written) = (&self.sending, self.written);
        let pieces = || {
            sending.iter().enumerate().map(move |(i, item)| {
                let bytes = item.bytes();
                if i == 0 { &bytes[written..] } else { bytes }
            })
        };
        let coalesced = COALESCE.with(|cell| {
            let mut buf = cell.try_borrow_mut().ok()?;
            let mut pieces = pieces().peekable();
            let first = pieces.next()?;
            if pieces
                .peek()
                .is_none_or(|next| first.len() + next.len() > COALESCE_MAX)
            {
                return None;
            }
            buf.clear();
            buf.extend_from_slice(first);
            for piece in pieces {
                if buf.len() + piece.len() > COALESCE_MAX {
                    break;
                }
                buf.extend_from_slice(piece);
            }
            Some(io.poll_write(cx, &buf))
        });
        let mut n = match coalesced {
            Some(poll) => ready!(poll)?,
            None => {
                let mut slices = [IoSlice::new(&[]); MAX_SLICES];
                let mut count = 0;
                for (slot, piece) in slices.iter_mut().zip(pieces()) {
                    *slot = IoSlice::new(piece);
                    count += 1;
                }
                let io = Pin::new(&mut self.io);
                match &slices[..count] {
                    [one] => ready!(io.poll_write(cx, one))?,
                    many => ready!(io.poll_write_vectored(cx, many))?,
                }
            }
        };
        if n == 0 {
            return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()));
        }
        while n > 0 {
            let Some(first) = self.sending.front() else {
                break;
            };
            let left = first.bytes().len() - self.written;
            if n >= left {
                n -= left;
                self.sending.pop_front();
                self.written = 0;
            } else {
                self.written += n;
                n = 0;
            }
        }
        Poll::Ready(Ok(()))
    }

    /// Ends the connection: the close handshake, bounded by `CLOSE_GRACE`.
    /// Not an `async fn`: the connection moves into a boxed future here, so
    /// the caller's task does not hold a second copy of it inline (measured:
    /// about 400 B per idle connection).
    pub fn finish(self, reason: CloseReason) -> impl Future<Output = ()> {
        // Boxed: the closing handshake's state is needed once, at the end,
        // and need not make every connection's task larger.
        let grace = match reason {
            Some((close::TRY_AGAIN_LATER, _)) => SLOW_CLOSE_GRACE,
            _ => CLOSE_GRACE,
        };
        let handshake = tokio::time::timeout(grace, Box::pin(self.close_handshake(reason)));
        async move {
            let _ = handshake.await;
        }
    }

    /// Sends queued replies and the close frame, then waits for the peer to
    /// close too: dropping a socket with unread input would turn the close
    /// into a reset that can overtake the frame.
    async fn close_handshake(mut self, reason: CloseReason) {
        // The answer to a ping that came before the end is owed too (RFC
        // 6455 §5.5.2): in the order the write path would have sent it.
        let mut rest = VecDeque::new();
        if self.held {
            self.queue_own();
        } else {
            let _ = self.outbox.take(&mut rest, std::task::Waker::noop());
            rest.extend(self.pong.take().map(Outbound::Frame));
        }
        // Keep a frame already partly written (the stream must stay framed),
        // and replies; drop undelivered messages.
        let partly = self.written > 0;
        let sending = std::mem::take(&mut self.sending);
        self.sending = sending
            .into_iter()
            .chain(rest)
            .enumerate()
            .filter(|(i, item)| (*i == 0 && partly) || !item.is_message())
            .map(|(_, item)| item)
            .collect();
        if let Some((code, why)) = reason {
            self.sending
                .push_back(Outbound::Frame(frame::close(code, why)));
        }
        let flushed = poll_fn(|cx| {
            while !self.sending.is_empty() {
                ready!(self.poll_write_some(cx))?;
            }
            Pin::new(&mut self.io).poll_shutdown(cx)
        })
        .await;
        if flushed.is_err() {
            return;
        }
        // Drain the input until the peer closes.
        let _ = poll_fn(|cx| {
            SCRATCH.with(|cell| {
                let mut own = [0u8; 0];
                let mut scratch = cell.try_borrow_mut();
                let target: &mut [u8] = match scratch.as_mut() {
                    Ok(s) => &mut s[..],
                    Err(_) => &mut own,
                };
                loop {
                    let mut buf = ReadBuf::new(target);
                    ready!(Pin::new(&mut self.io).poll_read(cx, &mut buf))?;
                    if buf.filled().is_empty() {
                        return Poll::Ready(Ok::<(), std::io::Error>(()));
                    }
                }
            })
        })
        .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    struct Quiet;

    impl Protocol for Quiet {
        fn on_text(&mut self, _: &mut Link<'_>, _: &str) {}
        fn on_binary(&mut self, _: &mut Link<'_>, _: &[u8]) {}
        fn deadline(&self) -> Option<Instant> {
            None
        }
        fn on_deadline(&mut self, _: &mut Link<'_>) {}
    }

    /// Frames of every size around the coalescing limit, through a pipe
    /// that takes 100 bytes at a time: every write is partial, and the
    /// peer must still read each frame once, whole and in order.
    #[tokio::test]
    async fn partial_writes_keep_frames_whole_and_in_order() {
        let (server, mut client) = tokio::io::duplex(100);
        let outbox = Arc::new(Outbox::new(
            10_000,
            Arc::new(Metrics::new()),
            &crate::transport::encoding::TEST_ENCODING,
        ));
        let sizes = [
            1,
            7,
            200,
            5000,
            COALESCE_MAX - 3,
            300,
            COALESCE_MAX + 9,
            2,
            999,
        ];
        let mut expected = Vec::new();
        for (i, size) in sizes.iter().cycle().take(60).enumerate() {
            let frame = frame::encode(frame::TEXT, &vec![b'a' + (i % 26) as u8; *size]);
            expected.extend_from_slice(&frame);
            outbox.push(Outbound::Frame(frame));
        }
        let keepalive = Keepalive {
            period: Duration::from_secs(60),
            ping: None,
        };
        let mut conn = Connection::new(server, Quiet, outbox, keepalive, 1 << 20, 1);
        let serving = tokio::spawn(async move { conn.serve().await });
        let mut got = vec![0; expected.len()];
        tokio::time::timeout(Duration::from_secs(10), client.read_exact(&mut got))
            .await
            .expect("every frame arrives")
            .unwrap();
        assert!(got == expected, "frames arrived cut, repeated or reordered");
        drop(client);
        assert_eq!(serving.await.unwrap(), None, "the peer went away");
    }

    /// Answers to whatever a test sends while held: `probe` gets a held
    /// reply (the latest kept), `release` releases the outbox.
    #[derive(Default)]
    struct Probe(Option<Bytes>);

    impl Protocol for Probe {
        fn on_text(&mut self, link: &mut Link<'_>, text: &str) {
            match text {
                "probe" => self.0 = Some(frame::encode(frame::TEXT, b"answer")),
                "release" => link.release(),
                _ => {}
            }
        }
        fn on_binary(&mut self, _: &mut Link<'_>, _: &[u8]) {}
        fn deadline(&self) -> Option<Instant> {
            None
        }
        fn on_deadline(&mut self, _: &mut Link<'_>) {}
        fn take_held_reply(&mut self) -> Option<Bytes> {
            self.0.take()
        }
    }

    fn client_frame(out: &mut Vec<u8>, opcode: u8, payload: &[u8]) {
        frame::encode_client(out, true, opcode, payload, [1, 2, 3, 4]);
    }

    /// Splits what a server wrote into (opcode, payload) frames.
    fn server_frames(mut bytes: &[u8]) -> Vec<(u8, Vec<u8>)> {
        let mut frames = Vec::new();
        while !bytes.is_empty() {
            let (len, start) = match bytes[1] & 0x7F {
                126 => (usize::from(u16::from_be_bytes([bytes[2], bytes[3]])), 4),
                127 => panic!("no test frame is that long"),
                n => (usize::from(n), 2),
            };
            frames.push((bytes[0] & 0x0F, bytes[start..start + len].to_vec()));
            bytes = &bytes[start + len..];
        }
        frames
    }

    /// Serves `proto` on one end of a pipe of `capacity` bytes with
    /// `queued` in its outbox; writes `wire` without reading, then reads
    /// everything until the server closes.
    async fn exchange<P: Protocol + Send + 'static>(
        proto: P,
        held: bool,
        capacity: usize,
        wire: &[u8],
    ) -> Vec<(u8, Vec<u8>)> {
        let (server, mut client) = tokio::io::duplex(capacity);
        let outbox = Arc::new(Outbox::new(
            16,
            Arc::new(Metrics::new()),
            &crate::transport::encoding::TEST_ENCODING,
        ));
        outbox.push(Outbound::Frame(frame::encode(frame::TEXT, b"queued")));
        let keepalive = Keepalive {
            period: Duration::from_secs(60),
            ping: None,
        };
        let mut conn = Connection::new(server, proto, outbox, keepalive, 1 << 20, 1);
        if held {
            conn = conn.hold();
        }
        let serving = tokio::spawn(async move {
            let reason = conn.serve().await;
            conn.finish(reason).await;
        });
        let mut got = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), async {
            client.write_all(wire).await.unwrap();
            client.read_to_end(&mut got).await.unwrap();
        })
        .await
        .expect("the server answers and closes");
        drop(client);
        serving.await.unwrap();
        server_frames(&got)
    }

    fn close_1000() -> Vec<u8> {
        let mut wire = Vec::new();
        client_frame(&mut wire, frame::CLOSE, &1000u16.to_be_bytes());
        wire
    }

    /// Thousands of pings from a peer that does not read: the server's
    /// writes block, and while they do every new ping replaces the pong
    /// waiting in the slot, so the pongs sent are bounded by what the pipe
    /// holds, not by the pings; the latest is answered, before the close.
    #[tokio::test]
    async fn a_ping_flood_from_a_peer_that_does_not_read_holds_one_pong() {
        let n = 5000u32;
        let mut wire = Vec::new();
        for i in 0..n {
            client_frame(&mut wire, frame::PING, &i.to_be_bytes());
        }
        wire.extend(close_1000());
        let frames = exchange(Quiet, false, 256, &wire).await;
        let pongs: Vec<u32> = frames
            .iter()
            .filter(|(op, _)| *op == frame::PONG)
            .map(|(_, p)| u32::from_be_bytes(p[..].try_into().unwrap()))
            .collect();
        assert!(pongs.len() < 100, "{} pongs for {n} pings", pongs.len());
        assert!(pongs.is_sorted());
        assert_eq!(pongs.last(), Some(&(n - 1)), "the latest ping is answered");
        // What was queued before, then only pongs, then the close.
        assert_eq!(frames[0], (frame::TEXT, b"queued".to_vec()));
        assert_eq!(frames.len(), 1 + pongs.len() + 1, "{frames:?}");
        assert_eq!(
            frames.last(),
            Some(&(frame::CLOSE, 1000u16.to_be_bytes().to_vec()))
        );
    }

    /// While the outbox is held, the pong and the held reply each keep a
    /// slot: a ping and a probe together are both answered, and nothing
    /// from the outbox goes out until the release.
    #[tokio::test]
    async fn a_held_connection_answers_both_a_ping_and_a_probe() {
        let mut wire = Vec::new();
        client_frame(&mut wire, frame::PING, b"a");
        client_frame(&mut wire, frame::TEXT, b"probe");
        client_frame(&mut wire, frame::TEXT, b"release");
        wire.extend(close_1000());
        let frames = exchange(Probe::default(), true, 1 << 16, &wire).await;
        let expected = [
            (frame::PONG, b"a".to_vec()),
            (frame::TEXT, b"answer".to_vec()),
            (frame::TEXT, b"queued".to_vec()),
            (frame::CLOSE, 1000u16.to_be_bytes().to_vec()),
        ];
        assert_eq!(frames, expected);
    }

    /// A flood of pings and probes while held, from a peer that does not
    /// read: bounded by what the pipe holds; the latest of each is answered
    /// and the outbox follows the release.
    #[tokio::test]
    async fn a_ping_and_probe_flood_while_held_is_bounded() {
        let n = 3000u32;
        let mut wire = Vec::new();
        for i in 0..n {
            client_frame(&mut wire, frame::PING, &i.to_be_bytes());
            client_frame(&mut wire, frame::TEXT, b"probe");
        }
        client_frame(&mut wire, frame::TEXT, b"release");
        wire.extend(close_1000());
        let frames = exchange(Probe::default(), true, 256, &wire).await;
        assert!(frames.len() < 100, "{} frames for {n} pings", frames.len());
        let queued = frames
            .iter()
            .position(|f| f == &(frame::TEXT, b"queued".to_vec()))
            .expect("the outbox after the release");
        let own = &frames[..queued];
        let last_pong = own.iter().rev().find(|(op, _)| *op == frame::PONG);
        assert_eq!(
            last_pong,
            Some(&(frame::PONG, (n - 1).to_be_bytes().to_vec()))
        );
        assert_eq!(own.last(), Some(&(frame::TEXT, b"answer".to_vec())));
        assert_eq!(frames.len(), queued + 2, "then only the close: {frames:?}");
    }

    /// A slow consumer whose socket is full when it is closed: nothing more
    /// can be written until its peer reads again, which this one does only
    /// after 5 s (the clock is paused: the runtime moves it on when every
    /// task waits), longer than the 2 s other closes get. Its close frame
    /// (1013) still comes, right behind what the socket held; the messages
    /// still queued are dropped rather than sent ahead of it.
    #[tokio::test(start_paused = true)]
    async fn a_slow_consumer_whose_socket_is_full_still_gets_its_close_frame() {
        let (server, mut client) = tokio::io::duplex(4096);
        let outbox = Arc::new(Outbox::new(
            8,
            Arc::new(Metrics::new()),
            &crate::transport::encoding::TEST_ENCODING,
        ));
        let keepalive = Keepalive {
            period: Duration::from_secs(60),
            ping: None,
        };
        let mut conn = Connection::new(server, Quiet, outbox.clone(), keepalive, 1 << 20, 1);
        let serving = tokio::spawn(async move {
            let reason = conn.serve().await;
            conn.finish(reason).await;
            reason
        });
        // Messages of about 1 KB until the outbox refuses one: the pipe
        // holds four, the outbox eight more.
        let pad = "x".repeat(1000);
        let mut pushed = 0;
        loop {
            let msg = Arc::new(crate::hub::Message::new(
                "t".into(),
                None,
                crate::hub::payload_of(&pad),
            ));
            if !outbox.push(Outbound::Message(
                msg,
                &crate::transport::encoding::TEST_ENCODING,
            )) {
                break;
            }
            pushed += 1;
            assert!(pushed < 100, "never closed as a slow consumer");
            // The connection (on this one thread) writes what fits.
            tokio::task::yield_now().await;
        }
        // The peer that does not read: not a wait for an event.
        tokio::time::sleep(Duration::from_secs(5)).await;
        let mut got = Vec::new();
        tokio::time::timeout(Duration::from_secs(30), client.read_to_end(&mut got))
            .await
            .expect("the server ends the stream")
            .unwrap();
        drop(client);
        let close_frame = frame::close(close::TRY_AGAIN_LATER, "slow consumer");
        assert!(
            got.ends_with(&close_frame),
            "{} bytes read, and no close frame at their end",
            got.len()
        );
        let frames = server_frames(&got);
        let texts = frames.iter().filter(|(op, _)| *op == frame::TEXT).count();
        assert_eq!(frames.len(), texts + 1, "only messages, then the close");
        assert!(
            texts < pushed,
            "{texts} of {pushed} messages sent: none dropped"
        );
        assert_eq!(
            serving.await.unwrap(),
            Some((close::TRY_AGAIN_LATER, "slow consumer"))
        );
    }

    /// A fragmented message close to the limit, then a continuation frame
    /// whose header alone shows the message would pass it: refused with
    /// 1009 at the header, before its payload is waited for or buffered
    /// (a client cannot make the connection hold twice the limit).
    #[tokio::test]
    async fn a_continuation_over_the_limit_is_refused_at_its_header() {
        let limit = 1000;
        let (server, mut client) = tokio::io::duplex(4096);
        let outbox = Arc::new(Outbox::new(
            16,
            Arc::new(Metrics::new()),
            &crate::transport::encoding::TEST_ENCODING,
        ));
        let keepalive = Keepalive {
            period: Duration::from_secs(60),
            ping: None,
        };
        let mut conn = Connection::new(server, Quiet, outbox, keepalive, limit, 1);
        let serving = tokio::spawn(async move {
            let reason = conn.serve().await;
            conn.finish(reason).await;
        });
        let mut wire = Vec::new();
        frame::encode_client(&mut wire, false, frame::TEXT, &[b'a'; 990], [1, 2, 3, 4]);
        // The continuation's header only: 100 bytes announced, 10 allowed.
        wire.extend_from_slice(&[frame::CONTINUATION | 0x80, 0x80 | 100, 9, 9, 9, 9]);
        let mut got = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), async {
            client.write_all(&wire).await.unwrap();
            client.read_to_end(&mut got).await.unwrap();
        })
        .await
        .expect("the server closes without waiting for the payload");
        let frames = server_frames(&got);
        let close = frames.last().expect("a close frame");
        assert_eq!(close.0, frame::CLOSE);
        assert_eq!(close.1[..2], close::TOO_BIG.to_be_bytes());
        serving.await.unwrap();
    }
}
