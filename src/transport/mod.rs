//! The WebSocket runtime under both front ends: RFC 6455 framing
//! ([`frame`]) and handshake ([`handshake`]), the one task that serves a
//! connection ([`connection`]), the queue through which the hub and the
//! connection's own replies reach it ([`outbox`]), per-connection rate
//! limiting ([`rate`]), close codes ([`close`]), and how a published
//! message becomes the bytes every recipient writes ([`encoding`]).
//!
//! It knows no wire format of its own above RFC 6455: `/ws` and Socket.IO
//! each plug in their messages through
//! [`connection::Protocol`] and their encoding of published messages
//! through [`encoding::Encoding`]. It imports the hub below it and the
//! shared HTTP error type, never a front end.

pub mod connection;
pub mod encoding;
pub mod frame;
pub mod handshake;
pub mod outbox;
pub mod rate;

/// WebSocket close codes (RFC 6455 §7.4.1, plus pulso's own 4003).
pub mod close {
    pub const NORMAL: u16 = 1000;
    pub const GOING_AWAY: u16 = 1001;
    pub const PROTOCOL_ERROR: u16 = 1002;
    pub const INVALID_DATA: u16 = 1007;
    pub const POLICY: u16 = 1008;
    pub const TOO_BIG: u16 = 1009;
    pub const TRY_AGAIN_LATER: u16 = 1013;
    pub const TOKEN_EXPIRED: u16 = 4003;
}
