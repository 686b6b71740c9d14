//! RFC 6455 framing: as much of it as `/ws` needs, and no buffers of its own.
//!
//! pulso frames by hand rather than through tungstenite because of memory:
//! tungstenite keeps a read buffer and a write buffer in every connection,
//! idle or not. Here client frames are parsed (and unmasked) in place in
//! whatever buffer the caller read into, and a server frame, which is never
//! masked, is the same bytes for every recipient, so a published message is
//! framed once and those bytes are written to every socket.

use bytes::{BufMut, Bytes, BytesMut};

pub const CONTINUATION: u8 = 0x0;
pub const TEXT: u8 = 0x1;
pub const BINARY: u8 = 0x2;
pub const CLOSE: u8 = 0x8;
pub const PING: u8 = 0x9;
pub const PONG: u8 = 0xA;

/// The longest header a client frame can have: 2 + 8 (length) + 4 (mask).
pub const MAX_HEADER: usize = 14;

/// Control frames carry at most this many payload bytes.
const MAX_CONTROL_PAYLOAD: usize = 125;

/// A server frame (FIN set, unmasked) with `payload`, in one allocation.
pub fn encode(opcode: u8, payload: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(header_len(payload.len()) + payload.len());
    put_header(&mut out, opcode, payload.len());
    out.put_slice(payload);
    out.freeze()
}

/// The payload of a frame this server encoded (unmasked, one frame), for
/// a transport that carries the same packets without WebSocket framing.
pub fn server_payload(frame: &[u8]) -> &[u8] {
    let start = match frame.get(1).map(|b| b & 0x7f) {
        Some(126) => 4,
        Some(127) => 10,
        Some(_) => 2,
        None => frame.len(),
    };
    frame.get(start..).unwrap_or_default()
}

/// A text frame whose payload `write` appends to the buffer, sized with
/// `hint`; the header is written once the length is known.
pub fn encode_text_with(hint: usize, write: impl FnOnce(&mut Vec<u8>)) -> Bytes {
    // Leave room for the longest server header (10 bytes), then move the
    // payload down if the header turns out shorter: one allocation either way.
    let mut buf = Vec::with_capacity(10 + hint);
    buf.resize(10, 0);
    write(&mut buf);
    let len = buf.len() - 10;
    let mut header = BytesMut::with_capacity(10);
    put_header(&mut header, TEXT, len);
    let start = 10 - header.len();
    buf[start..10].copy_from_slice(&header);
    let mut bytes = Bytes::from(buf);
    let _ = bytes.split_to(start);
    bytes
}

/// A close frame with a status code and a short reason.
pub fn close(code: u16, reason: &str) -> Bytes {
    let reason = truncate(reason, MAX_CONTROL_PAYLOAD - 2);
    let mut payload = Vec::with_capacity(2 + reason.len());
    payload.extend_from_slice(&code.to_be_bytes());
    payload.extend_from_slice(reason.as_bytes());
    encode(CLOSE, &payload)
}

/// Appends a client frame masked with `mask`: what pulso-bench's clients
/// and the framing tests send (a server never masks).
pub fn encode_client(out: &mut Vec<u8>, fin: bool, opcode: u8, payload: &[u8], mask: [u8; 4]) {
    out.push(if fin { 0x80 } else { 0 } | opcode);
    match payload.len() {
        n @ 0..=125 => out.push(0x80 | n as u8),
        n @ 126..=0xFFFF => {
            out.push(0x80 | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(0x80 | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(&mask);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
}

/// An empty ping.
pub const PING_FRAME: &[u8] = &[0x80 | PING, 0];

fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

fn header_len(len: usize) -> usize {
    match len {
        0..=125 => 2,
        126..=0xFFFF => 4,
        _ => 10,
    }
}

fn put_header(out: &mut impl BufMut, opcode: u8, len: usize) {
    out.put_u8(0x80 | opcode);
    match len {
        0..=125 => out.put_u8(len as u8),
        126..=0xFFFF => {
            out.put_u8(126);
            out.put_u16(len as u16);
        }
        _ => {
            out.put_u8(127);
            out.put_u64(len as u64);
        }
    }
}

/// A client frame, its payload already unmasked.
#[derive(Debug, PartialEq, Eq)]
pub struct Frame<'a> {
    pub fin: bool,
    pub opcode: u8,
    pub payload: &'a [u8],
}

/// What the front of a read buffer holds.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed<'a> {
    /// A whole frame, and how many bytes of the buffer it took.
    Frame(Frame<'a>, usize),
    /// Not a whole frame yet: at least this many bytes are needed in all.
    Incomplete(usize),
}

/// Why a client frame is refused; each maps to a close code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameError {
    /// Not valid RFC 6455 from a client (close 1002).
    Protocol(&'static str),
    /// Well framed, but text that must be UTF-8 is not: a close frame's
    /// reason (close 1007, as for a text message, RFC 6455 §8.1).
    InvalidData(&'static str),
    /// Larger than the message size limit (close 1009).
    TooBig,
}

/// Parses the client frame at the front of `buf`, unmasking its payload in
/// place. A frame whose payload exceeds `max_payload` is refused as soon as
/// its header is in, before the payload is read.
pub fn parse(buf: &mut [u8], max_payload: usize) -> Result<Parsed<'_>, FrameError> {
    if buf.len() < 2 {
        return Ok(Parsed::Incomplete(2));
    }
    let (b0, b1) = (buf[0], buf[1]);
    let fin = b0 & 0x80 != 0;
    if b0 & 0x70 != 0 {
        return Err(FrameError::Protocol("reserved bits set"));
    }
    let opcode = b0 & 0x0F;
    let control = opcode & 0x8 != 0;
    match opcode {
        CONTINUATION | TEXT | BINARY | CLOSE | PING | PONG => {}
        _ => return Err(FrameError::Protocol("unknown opcode")),
    }
    if b1 & 0x80 == 0 {
        return Err(FrameError::Protocol("client frames must be masked"));
    }
    let (len, mut at) = match b1 & 0x7F {
        126 => {
            if buf.len() < 4 {
                return Ok(Parsed::Incomplete(4));
            }
            (u64::from(u16::from_be_bytes([buf[2], buf[3]])), 4)
        }
        127 => {
            if buf.len() < 10 {
                return Ok(Parsed::Incomplete(10));
            }
            let mut n = [0u8; 8];
            n.copy_from_slice(&buf[2..10]);
            if n[0] & 0x80 != 0 {
                return Err(FrameError::Protocol("64-bit length with the high bit set"));
            }
            (u64::from_be_bytes(n), 10)
        }
        n => (u64::from(n), 2),
    };
    if control && (!fin || len > MAX_CONTROL_PAYLOAD as u64) {
        return Err(FrameError::Protocol(
            "control frames must be whole and at most 125 bytes",
        ));
    }
    if len > max_payload as u64 {
        return Err(FrameError::TooBig);
    }
    let len = len as usize;
    let total = at + 4 + len;
    if buf.len() < total {
        return Ok(Parsed::Incomplete(total));
    }
    let mask = [buf[at], buf[at + 1], buf[at + 2], buf[at + 3]];
    at += 4;
    let payload = &mut buf[at..total];
    unmask(payload, mask);
    Ok(Parsed::Frame(
        Frame {
            fin,
            opcode,
            payload,
        },
        total,
    ))
}

fn unmask(payload: &mut [u8], mask: [u8; 4]) {
    let word = u32::from_ne_bytes(mask);
    let mut chunks = payload.chunks_exact_mut(4);
    for chunk in &mut chunks {
        let v = u32::from_ne_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]) ^ word;
        chunk.copy_from_slice(&v.to_ne_bytes());
    }
    for (i, b) in chunks.into_remainder().iter_mut().enumerate() {
        *b ^= mask[i];
    }
}

/// The status code of a client's close frame, if it is a valid one.
pub fn close_code(payload: &[u8]) -> Result<Option<u16>, FrameError> {
    match payload {
        [] => Ok(None),
        [_] => Err(FrameError::Protocol("close frame with a one-byte payload")),
        [hi, lo, reason @ ..] => {
            let code = u16::from_be_bytes([*hi, *lo]);
            // RFC 6455 §7.4 plus IANA's 1012-1014; 1004-1006 and 1015
            // must never be sent.
            let valid = matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999);
            if !valid {
                return Err(FrameError::Protocol("invalid close code"));
            }
            if std::str::from_utf8(reason).is_err() {
                return Err(FrameError::InvalidData("close reason is not UTF-8"));
            }
            Ok(Some(code))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::Rng;

    /// `server_payload` undoes `encode` for each header length (7-bit,
    /// 16-bit and 64-bit lengths).
    #[test]
    fn server_payload_strips_each_header_length() {
        for len in [0, 1, 125, 126, 65_535, 65_536, 70_000] {
            let payload: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            let frame = encode(TEXT, &payload);
            assert_eq!(server_payload(&frame), &payload[..], "length {len}");
        }
        assert_eq!(server_payload(&[]), &[] as &[u8]);
    }

    /// A masked client frame, as a browser would send it.
    fn client(fin: bool, opcode: u8, payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
        let mut out = Vec::new();
        encode_client(&mut out, fin, opcode, payload, mask);
        out
    }

    #[test]
    fn parses_and_unmasks_every_length_form() {
        for len in [0usize, 1, 5, 125, 126, 300, 0xFFFF, 0x10000] {
            let payload: Vec<u8> = (0..len).map(|i| (i * 7) as u8).collect();
            let mut wire = client(true, TEXT, &payload, [1, 2, 3, 0xFF]);
            let total = wire.len();
            // Every strict prefix is incomplete and asks for more.
            for cut in [0, 1, 2, 3, total / 2, total - 1] {
                match parse(&mut wire.clone()[..cut], 1 << 20).unwrap() {
                    Parsed::Incomplete(need) => assert!(need > cut && need <= total),
                    other => panic!("prefix {cut} of {len}: {other:?}"),
                }
            }
            wire.extend_from_slice(b"next");
            match parse(&mut wire, 1 << 20).unwrap() {
                Parsed::Frame(f, used) => {
                    assert_eq!(used, total);
                    assert!(f.fin);
                    assert_eq!(f.opcode, TEXT);
                    assert_eq!(f.payload, &payload[..]);
                }
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn refuses_what_a_client_must_not_send() {
        let mut unmasked = vec![0x81, 0x01, b'a'];
        assert!(matches!(
            parse(&mut unmasked, 100),
            Err(FrameError::Protocol(_))
        ));
        let mut rsv = client(true, TEXT, b"a", [0; 4]);
        rsv[0] |= 0x40;
        assert!(matches!(parse(&mut rsv, 100), Err(FrameError::Protocol(_))));
        let mut opcode = client(true, 0x3, b"a", [0; 4]);
        assert!(matches!(
            parse(&mut opcode, 100),
            Err(FrameError::Protocol(_))
        ));
        let mut fragmented_ping = client(false, PING, b"a", [0; 4]);
        assert!(matches!(
            parse(&mut fragmented_ping, 100),
            Err(FrameError::Protocol(_))
        ));
        let mut long_ping = client(true, PING, &[0; 126], [0; 4]);
        assert!(matches!(
            parse(&mut long_ping, 1000),
            Err(FrameError::Protocol(_))
        ));
        // Too big is known from the header alone.
        let big = client(true, TEXT, &[0; 2000], [0; 4]);
        assert_eq!(parse(&mut big[..4].to_vec(), 1000), Err(FrameError::TooBig));
        let mut huge = vec![0x81, 0xFF, 0, 0, 1, 0, 0, 0, 0, 0];
        assert_eq!(parse(&mut huge, 1 << 30), Err(FrameError::TooBig));
        let mut high_bit = vec![0x81, 0xFF, 0x80, 0, 0, 0, 0, 0, 0, 0];
        assert!(matches!(
            parse(&mut high_bit, usize::MAX),
            Err(FrameError::Protocol(_))
        ));
    }

    #[test]
    fn server_frames_have_the_shortest_header() {
        for len in [0usize, 125, 126, 0xFFFF, 0x10000] {
            let payload = vec![b'x'; len];
            let a = encode(TEXT, &payload);
            let b = encode_text_with(0, |buf| buf.extend_from_slice(&payload));
            assert_eq!(a, b);
            assert_eq!(a.len(), header_len(len) + len);
            assert_eq!(a[0], 0x81);
            assert_eq!(&a[a.len() - len..], &payload[..]);
        }
    }

    /// Random bytes, and random corruptions of valid frames, never panic,
    /// and a parsed frame never claims more bytes than the buffer holds.
    #[test]
    fn arbitrary_bytes_never_panic() {
        let mut rng = crate::test_seed::rng("arbitrary_bytes_never_panic");
        let valid = [
            client(true, TEXT, b"{\"type\":\"ping\"}", [9, 8, 7, 6]),
            client(false, BINARY, &[0; 300], [1, 1, 1, 1]),
            client(true, CLOSE, &[0x03, 0xE8], [0; 4]),
        ];
        for i in 0..50_000u32 {
            let mut buf: Vec<u8> = if i % 2 == 0 {
                let len = rng.random_range(0..40);
                (0..len).map(|_| rng.random()).collect()
            } else {
                let mut b = valid[(i as usize / 2) % valid.len()].clone();
                let at = rng.random_range(0..b.len());
                b[at] = rng.random();
                b.truncate(rng.random_range(0..=b.len()));
                b
            };
            let len = buf.len();
            match parse(&mut buf, 1000) {
                Ok(Parsed::Frame(f, used)) => {
                    assert!(used <= len && f.payload.len() <= used);
                    if f.opcode == CLOSE {
                        let _ = close_code(f.payload);
                    }
                }
                Ok(Parsed::Incomplete(need)) => assert!(need > len),
                Err(_) => {}
            }
        }
    }

    #[test]
    fn close_frames() {
        assert_eq!(
            &close(1013, "slow")[..],
            &[0x88, 6, 0x03, 0xF5, b's', b'l', b'o', b'w']
        );
        assert_eq!(close(1000, &"é".repeat(100)).len(), 2 + 2 + 122);
        assert_eq!(close_code(&[]), Ok(None));
        assert_eq!(close_code(&[0x03, 0xE8, b'o', b'k']), Ok(Some(1000)));
        assert!(close_code(&[0x03]).is_err());
        assert!(close_code(&[0x03, 0xEC]).is_err()); // 1004 is reserved
        assert_eq!(close_code(&[0x03, 0xF5]), Ok(Some(1013)));
        assert!(close_code(&[0x03, 0xF7]).is_err()); // 1015 is reserved
        assert_eq!(
            close_code(&[0x03, 0xE8, 0xFF, 0xFE]),
            Err(FrameError::InvalidData("close reason is not UTF-8"))
        );
        // An invalid code is a protocol error whatever the reason.
        assert!(matches!(
            close_code(&[0x03, 0xEC, 0xFF]),
            Err(FrameError::Protocol(_))
        ));
    }
}
