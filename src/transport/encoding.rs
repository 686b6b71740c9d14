//! How a published message becomes the bytes a WebSocket writes.
//!
//! Server frames are never masked, so the frame of one message in one wire
//! format is the same for every recipient: it is built by the first
//! recipient that writes it and kept with the message (in its
//! [`Frames`](crate::hub::Frames)), and every other recipient writes the
//! same bytes. Each front end supplies its format as an [`Encoding`]: `/ws`
//! its JSON object, Socket.IO an event packet in a namespace.

use bytes::Bytes;

use crate::hub::{FrameSlot, Message};

/// A wire format for published messages.
pub trait Encoding: Send + Sync + 'static {
    /// Where this encoding's frame is kept on a message: one slot per wire
    /// format and Socket.IO namespace, taken from [`slot`].
    fn slot(&self) -> FrameSlot;

    /// The whole WebSocket frame (header included) of `msg`.
    fn encode(&self, msg: &Message) -> Bytes;
}

/// The frame of `msg` in `encoding`, built on first use.
pub fn frame<'m>(msg: &'m Message, encoding: &dyn Encoding) -> &'m [u8] {
    msg.frames
        .get_or_init(encoding.slot(), || encoding.encode(msg))
}

/// The frame slots, one per encoding in use, so that no two share one.
pub mod slot {
    use crate::hub::FrameSlot;

    /// `/ws`'s JSON messages.
    pub const WS_JSON: FrameSlot = FrameSlot::nth(0);
    /// Socket.IO events in the root namespace.
    pub const SIO_ROOT: FrameSlot = FrameSlot::nth(1);
    /// Socket.IO events in the notifications namespace.
    pub const SIO_NAMESPACE: FrameSlot = FrameSlot::nth(2);
}

/// For the transport's own tests: the payload as a text frame.
#[cfg(test)]
pub(crate) struct Payload;

#[cfg(test)]
pub(crate) static TEST_ENCODING: Payload = Payload;

#[cfg(test)]
impl Encoding for Payload {
    fn slot(&self) -> FrameSlot {
        slot::WS_JSON
    }

    fn encode(&self, msg: &Message) -> Bytes {
        super::frame::encode(super::frame::TEXT, msg.payload.get().as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::payload_of;
    use std::sync::atomic::{AtomicUsize, Ordering};

    struct Counting(FrameSlot, &'static str, AtomicUsize);

    impl Encoding for Counting {
        fn slot(&self) -> FrameSlot {
            self.0
        }
        fn encode(&self, _msg: &Message) -> Bytes {
            self.2.fetch_add(1, Ordering::Relaxed);
            Bytes::from_static(self.1.as_bytes())
        }
    }

    #[test]
    fn each_encoding_is_built_once_per_message_in_its_own_slot() {
        let a = Counting(slot::SIO_ROOT, "a", AtomicUsize::new(0));
        let b = Counting(slot::SIO_NAMESPACE, "b", AtomicUsize::new(0));
        let msg = Message::new("t".into(), None, payload_of(&1));
        for _ in 0..3 {
            assert_eq!(frame(&msg, &a), b"a");
            assert_eq!(frame(&msg, &b), b"b");
        }
        assert_eq!(a.2.load(Ordering::Relaxed), 1);
        assert_eq!(b.2.load(Ordering::Relaxed), 1);
    }
}
