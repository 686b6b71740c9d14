//! pulso: a real-time gateway. Clients connect over a plain WebSocket
//! (`/ws`, JSON messages) or Socket.IO (Sails-compatible, Engine.IO 3 and
//! 4), authenticate with a JWT, and subscribe to topics (rooms, for
//! Socket.IO); messages published over the HTTP API, from an MQTT broker,
//! or from Rust code reach every subscriber, on one node or a cluster over
//! Redis or NATS; who holds which socket is kept in SQLite or PostgreSQL.
//!
//! The `pulso` binary is one user of this library; an application can be
//! another, in two ways:
//!
//! - **standalone**: pulso listens on its own port, exactly as the binary
//!   does ([`Server::run`]);
//! - **embedded**: pulso's endpoints (`/ws`, `/socket.io/`, `/api/…`) are an
//!   [`axum::Router`] ([`Server::router`]) that the application mounts in
//!   its own axum app, next to its own routes.
//!
//! Either way, [`Handle::publish`] and [`Handle::broadcast`] publish from
//! Rust code and say how many connections they reached, and
//! [`Handle::shutdown`] stops the server gracefully.
//!
//! Settings are those of the binary, by the same dotted names (`docs/configuration.md`
//! lists them all), given to a [`Builder`]: shortcuts for the main ones,
//! [`Builder::set`] for any, [`Builder::toml`] or [`Builder::config_file`]
//! for a whole configuration.
//!
//! # Embedding
//!
//! ```no_run
//! use std::net::SocketAddr;
//!
//! use axum::Router;
//! use axum::routing::get;
//!
//! #[tokio::main]
//! async fn main() -> Result<(), Box<dyn std::error::Error>> {
//!     let server = pulso::Server::builder()
//!         .jwt_secret("a long random secret")
//!         .database_url("sqlite://presence.db")
//!         .demo(false)
//!         .without_listener()
//!         .build()
//!         .await?;
//!     let pulso = server.handle();
//!     let app = Router::new()
//!         .route("/hello", get(|| async { "hello" }))
//!         .merge(server.router());
//!
//!     // The bridge, backplane and heartbeats run here, and the graceful
//!     // stop: every pulso connection closed, presence rows cleared.
//!     let running = tokio::spawn(server.run());
//!
//!     // From anywhere in the application:
//!     let reached = pulso.publish("alerts", &serde_json::json!({"level": "high"}))?;
//!     println!("{reached} connections reached");
//!
//!     let stop = pulso.clone();
//!     tokio::spawn(async move {
//!         let _ = tokio::signal::ctrl_c().await;
//!         stop.shutdown();
//!     });
//!     let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await?;
//!     // With the peer's address, `max_connections_per_ip` applies too.
//!     axum::serve(listener, app.into_make_service_with_connect_info::<SocketAddr>())
//!         .with_graceful_shutdown(pulso.stopping())
//!         .await?;
//!     running.await??;
//!     Ok(())
//! }
//! ```
//!
//! What pulso's own listener does for each HTTP connection, the embedding
//! application's server does instead, or not: the `http.*` timeouts (for
//! a request's head, between kept-alive requests, while reading a body),
//! the lingering close after a refused body, TLS. WebSocket connections,
//! once upgraded, are pulso's again: keepalive, limits and the graceful
//! stop apply as usual. `examples/embed.rs` is a complete application.
//!
//! # Standalone
//!
//! ```no_run
//! # async fn standalone() -> Result<(), Box<dyn std::error::Error>> {
//! let server = pulso::Server::builder()
//!     .listen("0.0.0.0:1337".parse()?)
//!     .config_file("pulso.toml")
//!     .build()
//!     .await?;
//! let pulso = server.handle();
//! tokio::spawn(async move {
//!     let _ = tokio::signal::ctrl_c().await;
//!     pulso.shutdown();
//! });
//! server.run().await?;
//! # Ok(()) }
//! ```
//!
//! # What is public
//!
//! The items at the crate root ([`Server`], [`Builder`], [`Handle`] and
//! their errors) are the library's interface, and the settings with their
//! names and meanings are the binary's documented contract. The modules
//! are public for pulso's own binary, tests and tools only, and hidden
//! from this documentation: they change without notice.
//!
//! The library has no `unsafe` code and must not grow any: everything it
//! does (sockets, framing, parsing client input) is done through safe APIs,
//! so memory safety does not depend on reviewing it. The load tool, which
//! needs `setrlimit`, is a separate crate (`bench/pulso-bench/`).
#![forbid(unsafe_code)]

/// The axum pulso's routers belong to: [`Server::router`] mounts in an
/// [`axum::Router`] of this version.
pub use axum;

pub use config::ConfigError;
pub use server::{Builder, Handle, MAX_ROOMS, PublishError, SampleTokens, Server, StartError};

// The modules: internal (see "What is public" above and ARCHITECTURE.md).
#[doc(hidden)]
pub mod api;
#[doc(hidden)]
pub mod auth;
#[doc(hidden)]
pub mod cli;
#[doc(hidden)]
pub mod cluster;
#[doc(hidden)]
pub mod config;
#[doc(hidden)]
pub mod demo;
#[doc(hidden)]
pub mod gateway;
#[doc(hidden)]
pub mod http;
#[doc(hidden)]
pub mod hub;
#[doc(hidden)]
pub mod metrics;
#[doc(hidden)]
pub mod mqtt;
#[doc(hidden)]
pub mod presence;
#[doc(hidden)]
pub mod server;
#[doc(hidden)]
pub mod sio;
#[cfg(test)]
mod test_seed;
#[doc(hidden)]
pub mod topic;
#[doc(hidden)]
pub mod transport;
#[doc(hidden)]
pub mod ws;
