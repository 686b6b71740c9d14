//! pulso: a real-time gateway.
//!
//! The [`hub`] is the protocol-agnostic core (topics, subscriptions, fan-out).
//! [`transport`] is the WebSocket runtime above it. Front ends translate
//! their wire format into hub calls: [`ws`] for the plain WebSocket
//! protocol, [`sio`] for Socket.IO and [`api`] for HTTP publishing;
//! [`presence`] records which socket each user holds. [`server`] composes
//! them and [`http`] serves their HTTP connections; `main.rs` only calls
//! [`cli::main`].
//!
//! Below them all sit two leaves, [`topic`] (names and filters) and
//! [`metrics`]; the hub uses only those, and the [`config`]uration only
//! [`topic`]. Front ends, the API and the MQTT bridge never import one
//! another. `tests/layering.rs` holds these rules and fails on a cycle.
//!
//! The library has no `unsafe` code and must not grow any: everything it
//! does (sockets, framing, parsing client input) is done through safe APIs,
//! so memory safety does not depend on reviewing it. The load tool, which
//! needs `setrlimit`, is a separate crate (`bench/pulso-bench/`).
#![forbid(unsafe_code)]

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
#[cfg(test)]
mod test_seed;
pub mod topic;
pub mod transport;
pub mod ws;
