//! pulso: a real-time gateway.
//!
//! The [`hub`] is the protocol-agnostic core (topics, subscriptions, fan-out).
//! [`transport`] is the WebSocket runtime above it. Front ends translate
//! their wire format into hub calls: [`ws`] for the plain WebSocket
//! protocol, [`sio`] for Socket.IO and [`api`] for HTTP publishing;
//! [`presence`] records which socket each user holds. [`server`] composes
//! them and [`http`] serves their HTTP connections; `main.rs` only calls
//! [`cli::main`].

pub mod api;
pub mod auth;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod demo;
pub mod gateway;
pub mod http;
pub mod hub;
pub mod metrics;
pub mod mqtt;
pub mod presence;
pub mod server;
pub mod sio;
pub mod transport;
pub mod ws;
