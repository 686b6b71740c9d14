//! The WebSocket frame decoder and message reassembly.
//!
//! Arbitrary bytes, cut into arbitrary chunks, are read by a real
//! `transport::connection::Connection` from an in-memory socket, one chunk
//! per poll. After every poll the bytes it holds for unfinished input
//! (a frame not fully read, a fragmented message) must stay within the
//! message size limit plus a frame header and the read-ahead, and every
//! message handed to the protocol must be within the limit. The same bytes
//! also go through `frame::parse` directly, checking what it reports.
#![no_main]

use std::cell::RefCell;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::{Arc, LazyLock};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use pulso::metrics::Metrics;
use pulso::transport::connection::{Connection, Keepalive, Link, Protocol, READ_AHEAD};
use pulso::transport::frame::{self, MAX_HEADER, Parsed};
use pulso::transport::outbox::Outbox;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

#[derive(Arbitrary, Debug)]
struct Input {
    /// The message size limit, 1..=4096 (small, so the limit is reached).
    max: u16,
    /// Chunk lengths, used in turn.
    cuts: Vec<u8>,
    data: Vec<u8>,
}

static RUNTIME: LazyLock<tokio::runtime::Runtime> = LazyLock::new(|| {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("a current-thread runtime")
});

/// A socket whose reads return what the target put in `chunk`, then
/// `Pending`; writes are swallowed.
#[derive(Default, Clone)]
struct Wire {
    chunk: Rc<RefCell<Vec<u8>>>,
}

impl AsyncRead for Wire {
    fn poll_read(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let mut chunk = self.chunk.borrow_mut();
        if chunk.is_empty() {
            return Poll::Pending;
        }
        let n = chunk.len().min(buf.remaining());
        buf.put_slice(&chunk[..n]);
        chunk.drain(..n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Wire {
    fn poll_write(self: Pin<&mut Self>, _: &mut Context<'_>, b: &[u8]) -> Poll<io::Result<usize>> {
        Poll::Ready(Ok(b.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// Checks the size of every message the connection hands over.
struct Sizes {
    max: usize,
}

impl Protocol for Sizes {
    fn on_text(&mut self, _: &mut Link<'_>, text: &str) {
        assert!(text.len() <= self.max, "a text message over the limit");
    }
    fn on_binary(&mut self, _: &mut Link<'_>, data: &[u8]) {
        assert!(data.len() <= self.max, "a binary message over the limit");
    }
    fn deadline(&self) -> Option<Instant> {
        None
    }
    fn on_deadline(&mut self, _: &mut Link<'_>) {}
}

/// `frame::parse` on its own: a frame never claims more bytes than given,
/// nor a payload over the limit, and `Incomplete` asks for more than given.
fn parse_all(mut data: Vec<u8>, max: usize) {
    let mut at = 0;
    while at < data.len() {
        let len = data.len() - at;
        match frame::parse(&mut data[at..], max) {
            Ok(Parsed::Frame(f, used)) => {
                assert!(used <= len && used > 0);
                assert!(f.payload.len() <= max);
                assert!(used <= f.payload.len() + MAX_HEADER);
                if f.opcode == frame::CLOSE {
                    let _ = frame::close_code(f.payload);
                }
                at += used;
            }
            Ok(Parsed::Incomplete(need)) => {
                assert!(need > len, "incomplete, yet the bytes were there");
                assert!(need <= max + MAX_HEADER);
                break;
            }
            Err(_) => break,
        }
    }
}

fuzz_target!(|input: Input| {
    let max = usize::from(input.max % 4096) + 1;
    parse_all(input.data.clone(), max);

    let _guard = RUNTIME.enter();
    let outbox = Arc::new(Outbox::new(
        16,
        Arc::new(Metrics::new()),
        &pulso::ws::protocol::JSON,
    ));
    let keepalive = Keepalive {
        period: Duration::from_secs(3600),
        ping: None,
    };
    let wire = Wire::default();
    let mut conn = Connection::new(wire.clone(), Sizes { max }, outbox, keepalive, max, 1);
    let bound = max + MAX_HEADER + READ_AHEAD;
    let mut cx = Context::from_waker(Waker::noop());
    let mut rest = &input.data[..];
    let mut cuts = input.cuts.iter().cycle();
    let mut ended = false;
    while !rest.is_empty() && !ended {
        let n = match cuts.next() {
            Some(&c) => usize::from(c).max(1),
            None => rest.len(),
        }
        .min(rest.len());
        wire.chunk.borrow_mut().extend_from_slice(&rest[..n]);
        rest = &rest[n..];
        {
            let mut serving = std::pin::pin!(conn.serve());
            ended = serving.as_mut().poll(&mut cx).is_ready();
        }
        assert!(
            conn.buffered() <= bound,
            "{} bytes held for unfinished input, limit {max}",
            conn.buffered()
        );
    }
});
