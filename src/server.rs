//! Starting and stopping a pulso server: bind (or not, when an application
//! serves pulso's routes itself), build the gateway, compose the routers,
//! serve until the shutdown signal, then close every connection within
//! `shutdown_timeout`.
//!
//! This is the library's public face: [`Builder`] takes the settings,
//! [`Server`] runs, [`Handle`] publishes and stops; `lib.rs` re-exports
//! them at the crate root.

mod builder;
mod handle;

pub use builder::Builder;
pub use handle::{Handle, MAX_ROOMS, PublishError};

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::routing::get;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::{Signer, Verifier, random_secret};
use crate::config::{Config, ConfigError};
use crate::gateway::{Gateway, Readiness};
use crate::hub::Hub;
use crate::metrics::Metrics;

/// Why a server could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// A setting is invalid (the message names it), or a component could
    /// not be set up with it (an unparsable broker URL, say). Starting
    /// again unchanged cannot help: the binary exits with code 2.
    #[error("{0}")]
    Config(#[from] ConfigError),
    /// The `listen` address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address of the `listen` setting.
        addr: SocketAddr,
        /// What the operating system said.
        source: std::io::Error,
    },
    /// A cluster node with this `node_id` is alive: like a configuration
    /// error, starting again unchanged cannot help (exit code 2).
    #[error("{0}")]
    NodeInUse(#[from] crate::presence::NodeInUse),
}

/// A prepared pulso server: the gateway is built, the presence store is
/// open (in a cluster, the node id is claimed), the listener is bound
/// unless the server was built [without one](Builder::without_listener).
/// Nothing is served and no background work runs until [`Server::run`].
///
/// Made by [`Server::builder`]. Before `run` consumes it, take what you
/// need from it: a [`Handle`] to publish and stop with, and, when embedding,
/// the [`router`](Server::router) to mount in your own application.
pub struct Server {
    /// `None` when the application serves [`Server::router`] itself.
    listener: Option<TcpListener>,
    /// The bound address, or the configured `listen` without a listener.
    addr: SocketAddr,
    gateway: Arc<Gateway>,
    /// Every route (HTTP API, console, `/ws`, Socket.IO), built once: the
    /// Socket.IO sessions live in it, so the standalone listener and
    /// [`Server::router`] share them.
    app: Router,
    sample_tokens: Option<SampleTokens>,
    /// The backplane's tasks, started by [`Server::run`].
    cluster: Option<crate::cluster::Tasks>,
    /// The MQTT bridge, run by [`Server::run`].
    mqtt: Option<Arc<crate::mqtt::Bridge>>,
    /// The presence store, whose rows [`Server::run`] clears at the end.
    presence: crate::presence::Presence,
    /// TLS on the listener, when `tls.cert_file` is set.
    tls: Option<Arc<crate::http::tls::Tls>>,
}

/// Tokens signed with the secret a server made up because none was
/// configured (the binary prints them at start-up).
#[derive(Debug, Clone)]
pub struct SampleTokens {
    /// Role `assistant`, sub `demo`.
    pub client: String,
    /// The first of `publisher_roles`, for the HTTP API.
    pub publisher: String,
}

impl Server {
    /// A builder that starts from the built-in defaults (those of
    /// `docs/configuration.md`; no file and no environment variable is read).
    pub fn builder() -> Builder {
        Builder::new()
    }

    /// Binds `config.listen` and prepares everything; nothing is served
    /// until [`Server::run`]. The same as a [`Builder`] with these settings.
    #[doc(hidden)]
    pub async fn bind(config: Config) -> Result<Server, StartError> {
        Self::start(config, true).await
    }

    /// Binds `config.listen` when `listen`, and prepares everything.
    async fn start(config: Config, listen: bool) -> Result<Server, StartError> {
        let listener = if listen {
            Some(
                TcpListener::bind(config.listen)
                    .await
                    .map_err(|source| StartError::Bind {
                        addr: config.listen,
                        source,
                    })?,
            )
        } else {
            None
        };
        let addr = listener
            .as_ref()
            .and_then(|l| l.local_addr().ok())
            .unwrap_or(config.listen);
        let mut config = config;
        // With port 0 the node id should name the port actually bound.
        if listener.is_some() && config.listen.port() == 0 && config.node_id.ends_with(":0") {
            config.node_id = format!("{}:{}", config.node_id.trim_end_matches(":0"), addr.port());
        }

        let generated = (config.jwt.secret.is_none() && config.jwt.public_key_file.is_none())
            .then(random_secret);
        let secret = config.jwt.secret.clone().or(generated.clone());
        let verifier = Verifier::new(&config.jwt, secret.as_deref())?;
        // With a generated secret nobody else can mint tokens, so print two:
        // one to connect with and one to publish with.
        let sample_tokens = generated.as_ref().and_then(|secret| {
            let signer = Signer::hmac(secret);
            let day = Some(Duration::from_secs(24 * 3600));
            let publisher = config
                .publisher_roles
                .first()
                .map(String::as_str)
                .unwrap_or("admin");
            Some(SampleTokens {
                client: signer
                    .token("assistant", "demo", day, &Default::default())
                    .ok()?,
                publisher: signer
                    .token(publisher, "demo-publisher", day, &Default::default())
                    .ok()?,
            })
        });

        let metrics = Arc::new(Metrics::new());
        let tls = match &config.tls {
            None => None,
            Some(files) => Some(Arc::new(
                crate::http::tls::Tls::new(files, metrics.clone())
                    .map_err(|e| ConfigError::setting(e.setting, e))?,
            )),
        };
        let mqtt = crate::mqtt::Bridge::new(&config, metrics.clone())?;
        let hub = Hub::new(metrics.clone())
            .with_ring_capacity(config.ws.outbound_queue)
            .with_last_values(
                config.mqtt.last_value_filters(),
                config.mqtt.last_value_max_topics,
                config.mqtt.last_value_max_bytes,
            )
            .with_history(
                config.history.topics.clone(),
                config.history.size,
                config.history.ttl,
            );
        // Before anything is served: in a cluster this claims the node id
        // (and refuses a duplicate of a live node).
        let presence = crate::presence::Presence::start(
            &config.presence,
            &config.node_id,
            metrics.clone(),
            config.cluster.engine.is_some().then_some(&config.cluster),
        )
        .await?;
        let readiness = Readiness::default();
        let check = presence.clone();
        readiness.register("presence", move || check.status());
        if let Some(bridge) = &mqtt {
            readiness.register("mqtt", bridge.readiness_check());
        }
        let hub = Arc::new(hub);
        let cluster = match &config.cluster.engine {
            None => None,
            Some(engine) => {
                use crate::cluster::{HistoryRules, Shared, Tasks, nats, redis};
                use crate::config::cluster::Engine;
                let shared = Shared::new(
                    hub.clone(),
                    metrics.clone(),
                    &config.cluster.prefix,
                    &config.node_id,
                    config.mqtt.last_value_filters(),
                );
                // The engine keeps the history for the cluster (see
                // docs/history.md).
                let shared = Arc::new(shared.with_history(HistoryRules {
                    filters: config.history.topics.clone(),
                    size: config.history.size,
                    ttl: config.history.ttl,
                }));
                let (link, tasks) = match engine {
                    Engine::Redis(url) => redis::prepare(url, shared.clone())
                        .map(|(link, tasks)| (link, Tasks::Redis(Box::new(tasks))))
                        .map_err(|e| {
                            ConfigError::setting("cluster.redis_url", format!("`{url}`: {e}"))
                        })?,
                    Engine::Nats(url) => nats::prepare(url, &config.node_id, shared.clone())
                        .map(|(link, tasks)| (link, Tasks::Nats(tasks)))
                        .map_err(|e| {
                            ConfigError::setting("cluster.nats_url", format!("`{url}`: {e}"))
                        })?,
                };
                hub.attach_backplane(link);
                readiness.register("cluster", move || {
                    if shared.up.load(std::sync::atomic::Ordering::Acquire) {
                        Ok(())
                    } else {
                        Err("down".into())
                    }
                });
                Some(tasks)
            }
        };
        let admission = Arc::new(crate::gateway::admission::Admission::new(
            &config.limits,
            metrics.clone(),
        ));
        let gateway = Arc::new(Gateway {
            admission,
            hub,
            config: Arc::new(config),
            verifier,
            metrics,
            shutdown: CancellationToken::new(),
            connections: TaskTracker::new(),
            readiness,
            upstream: mqtt.clone().map(|b| b as Arc<dyn crate::gateway::Upstream>),
            presence: Arc::new(presence.clone()),
            sessions: cluster.as_ref().and_then(crate::cluster::Tasks::sessions),
            started: std::time::Instant::now(),
        });
        let app = Self::app(&gateway);
        Ok(Server {
            listener,
            addr,
            gateway,
            app,
            sample_tokens,
            cluster,
            mqtt,
            presence,
            tls,
        })
    }

    /// The address the listener is bound to (with port 0 in `listen`, the
    /// port the system chose). Without a listener, the `listen` setting.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// A handle to publish through and to stop the server with; it stays
    /// usable (and cheap to clone) after [`Server::run`] takes the server.
    pub fn handle(&self) -> Handle {
        Handle::new(self.gateway.clone())
    }

    /// The gateway every front end shares.
    #[doc(hidden)]
    pub fn gateway(&self) -> &Arc<Gateway> {
        &self.gateway
    }

    /// The MQTT bridge, when `mqtt.url` is set (for tests and tools that
    /// look at its state).
    #[doc(hidden)]
    pub fn mqtt_bridge(&self) -> Option<&Arc<crate::mqtt::Bridge>> {
        self.mqtt.as_ref()
    }

    /// TLS on the listener, when configured: [`crate::http::tls::Tls::reload`]
    /// loads the certificate files again.
    pub fn tls(&self) -> Option<&Arc<crate::http::tls::Tls>> {
        self.tls.as_ref()
    }

    /// Ready-made tokens, when no `jwt.secret` or `jwt.public_key_file` was
    /// set and the server made up a secret for this run.
    pub fn sample_tokens(&self) -> Option<&SampleTokens> {
        self.sample_tokens.as_ref()
    }

    /// Cancelling this token stops the server gracefully
    /// ([`Handle::shutdown`] does).
    #[doc(hidden)]
    pub fn shutdown_token(&self) -> CancellationToken {
        self.gateway.shutdown.clone()
    }

    /// pulso's endpoints for an application that serves HTTP itself:
    /// `/ws`, `/socket.io/` (Engine.IO 3 and 4, WebSocket and long-polling)
    /// and `/api/…` (publish, broadcast, presence, cluster), to
    /// [`merge`](Router::merge) into your router or
    /// [`nest`](Router::nest) under a prefix.
    ///
    /// The router has no fallback, so yours applies to every other path.
    /// Every call returns routes onto the same server (one table of
    /// Socket.IO sessions), so it may be mounted more than once.
    ///
    /// What pulso's own listener does per connection is then the
    /// application's business: the HTTP timeouts (`http.header_timeout`,
    /// `http.idle_timeout`, `http.body_timeout`), the lingering close after
    /// a refused body, TLS. The limit per client address
    /// (`max_connections_per_ip`) needs the peer's address: serve with
    /// [`into_make_service_with_connect_info::<SocketAddr>`](Router::into_make_service_with_connect_info),
    /// else only `max_connections` applies.
    ///
    /// [`Server::run`] must run too (it drives the MQTT bridge, the cluster
    /// backplane, the heartbeats and the graceful stop).
    pub fn router(&self) -> Router {
        let app = &self.app;
        Router::new()
            .route("/ws", Self::forward(app))
            .route("/socket.io", Self::forward(app))
            .route("/socket.io/", Self::forward(app))
            .route("/api/{*rest}", Self::forward(app))
            .layer(axum::middleware::from_fn(peer_from_connect_info))
    }

    /// The operations endpoints, `/healthz`, `/readyz` and `/metrics`
    /// (Prometheus), for an application that serves HTTP itself: apart
    /// from [`Server::router`], as an application may have its own on
    /// those paths. Merge it, nest it under a prefix, or serve it on
    /// another port.
    pub fn ops_router(&self) -> Router {
        let app = &self.app;
        Router::new()
            .route("/healthz", Self::forward(app))
            .route("/readyz", Self::forward(app))
            .route("/metrics", Self::forward(app))
    }

    /// A route that hands every method to the complete router, which then
    /// answers as the standalone server does (its JSON 404 and 405, CORS,
    /// the Socket.IO middleware).
    fn forward(app: &Router) -> axum::routing::MethodRouter {
        let app = app.clone();
        axum::routing::any(move |request: axum::extract::Request| {
            let app = app.clone();
            async move {
                use tower::ServiceExt as _;
                match app.oneshot(request).await {
                    Ok(response) => response,
                    Err(never) => match never {},
                }
            }
        })
    }

    /// The HTTP routes plus Socket.IO on `/socket.io/`, all on one port.
    fn app(gw: &Arc<Gateway>) -> Router {
        Router::new()
            .route("/ws", get(crate::ws::upgrade))
            .merge(crate::api::router())
            .fallback(crate::api::not_found)
            .method_not_allowed_fallback(crate::api::method_not_allowed)
            .with_state(gw.clone())
            .layer(axum::middleware::from_fn_with_state(
                crate::sio::Transport::new(gw),
                crate::sio::serve,
            ))
            .layer(crate::http::cors::CorsFor::new(
                gw.config.limits.allowed_origins.clone(),
            ))
    }

    /// Serves until the shutdown signal ([`Handle::shutdown`]), then closes
    /// every connection (1001 for `/ws`; Socket.IO transports without a
    /// DISCONNECT, so that clients reconnect), clears this node's presence
    /// rows and returns, within `shutdown_timeout`.
    ///
    /// With a listener it serves pulso's HTTP connections. In both cases it
    /// runs the background work: the MQTT bridge, the cluster backplane,
    /// the node's heartbeats, the demo feed. An application that serves
    /// [`Server::router`] itself spawns this and stops its own HTTP server
    /// on [`Handle::stopping`].
    pub async fn run(self) -> std::io::Result<()> {
        let gw = self.gateway.clone();
        let background = TaskTracker::new();
        if gw.config.demo.enabled {
            background.spawn(crate::demo::run(gw.clone()));
        }
        if let Some(bridge) = self.mqtt.clone() {
            background.spawn(bridge.run(gw.hub.clone(), gw.shutdown.clone()));
        }
        if let Some(cluster) = self.cluster {
            background.spawn(cluster.run(gw.shutdown.clone()));
        }
        // Heartbeats and dead nodes (returns at once outside a cluster).
        background.spawn(self.presence.clone().heartbeats(gw.shutdown.clone()));
        let stop = gw.shutdown.clone();
        // HTTP connections (not the upgraded ones, which `gw.connections`
        // tracks) finish their request in progress once `stop` is cancelled.
        let http = TaskTracker::new();
        let tls = self.tls.clone();
        let serving = self.listener.map(|listener| {
            tokio::spawn(crate::http::serve(
                listener,
                self.app,
                gw.config.http,
                tls,
                stop.clone(),
                http.clone(),
            ))
        });

        stop.cancelled().await;
        tracing::info!("stopping: closing connections");
        gw.hub.shutdown_all();
        gw.connections.close();
        background.close();
        let started = tokio::time::Instant::now();
        let limit = gw.config.shutdown_timeout;
        // Connection tasks (and polling sessions' tasks) end on the shutdown
        // signal: WebSockets with 1001, Socket.IO transports without a
        // DISCONNECT packet so that socket.io clients reconnect. A tenth of
        // the limit (at most 1 s) is kept for clearing presence.
        let reserve = (limit / 10).min(std::time::Duration::from_secs(1));
        let drained = tokio::time::timeout(limit - reserve, async {
            // HTTP connections first: once they are gone no upgrade can
            // add a connection task.
            if let Some(serving) = serving {
                let _ = serving.await;
            }
            http.close();
            http.wait().await;
            gw.connections.wait().await;
            background.wait().await;
        })
        .await;
        // Every client is gone: clear this node's presence rows (SPEC §1).
        self.presence
            .stop(limit.saturating_sub(started.elapsed()))
            .await;
        if drained.is_err() {
            tracing::warn!(
                timeout = ?gw.config.shutdown_timeout,
                "shutdown_timeout reached with connections still open; exiting anyway"
            );
        }
        Ok(())
    }
}

/// Under an application's own server, the TCP peer comes as axum's
/// `ConnectInfo` (when it serves with connect info); pulso's admission
/// reads it as [`PeerAddr`](crate::http::PeerAddr), which pulso's own
/// listener sets.
async fn peer_from_connect_info(
    mut request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use crate::http::PeerAddr;
    use axum::extract::ConnectInfo;
    let extensions = request.extensions_mut();
    if extensions.get::<PeerAddr>().is_none()
        && let Some(ConnectInfo(peer)) = extensions.get::<ConnectInfo<SocketAddr>>().copied()
    {
        extensions.insert(PeerAddr(peer));
    }
    next.run(request).await
}
