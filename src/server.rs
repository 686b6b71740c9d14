//! Starting and stopping a pulso server: bind, build the gateway, compose
//! the routers, serve until the shutdown signal, then close every
//! connection within `shutdown_timeout`.

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

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{0}")]
    Config(#[from] ConfigError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    /// A cluster node with this `node_id` is alive: like a configuration
    /// error, starting again unchanged cannot help (exit code 2).
    #[error("{0}")]
    NodeInUse(#[from] crate::presence::NodeInUse),
}

pub struct Server {
    listener: TcpListener,
    gateway: Arc<Gateway>,
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

/// Tokens printed at start-up when the JWT secret was generated.
pub struct SampleTokens {
    /// Role `assistant`, sub `demo`.
    pub client: String,
    /// The first of `publisher_roles`, for the HTTP API.
    pub publisher: String,
}

impl Server {
    /// Binds the listener and prepares everything; nothing is served until [`Server::run`].
    pub async fn bind(config: Config) -> Result<Server, StartError> {
        let listener =
            TcpListener::bind(config.listen)
                .await
                .map_err(|source| StartError::Bind {
                    addr: config.listen,
                    source,
                })?;
        let mut config = config;
        // With port 0 the node id should name the port actually bound.
        if let Ok(addr) = listener.local_addr()
            && config.listen.port() == 0
            && config.node_id.ends_with(":0")
        {
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
                // Redis keeps the history for the cluster; over NATS each
                // node keeps its own (see docs/history.md).
                let shared = Arc::new(match engine {
                    Engine::Redis(_) => shared.with_history(HistoryRules {
                        filters: config.history.topics.clone(),
                        size: config.history.size,
                        ttl: config.history.ttl,
                    }),
                    Engine::Nats(_) => shared,
                });
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
        Ok(Server {
            listener,
            gateway,
            sample_tokens,
            cluster,
            mqtt,
            presence,
            tls,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .unwrap_or(self.gateway.config.listen)
    }

    pub fn gateway(&self) -> &Arc<Gateway> {
        &self.gateway
    }

    /// The MQTT bridge, when `mqtt.url` is set (for tests and tools that
    /// look at its state).
    pub fn mqtt_bridge(&self) -> Option<&Arc<crate::mqtt::Bridge>> {
        self.mqtt.as_ref()
    }

    /// TLS on the listener, when configured: [`crate::http::tls::Tls::reload`]
    /// loads the certificate files again.
    pub fn tls(&self) -> Option<&Arc<crate::http::tls::Tls>> {
        self.tls.as_ref()
    }

    /// Ready-made tokens, when the secret was generated at start.
    pub fn sample_tokens(&self) -> Option<&SampleTokens> {
        self.sample_tokens.as_ref()
    }

    /// Cancelling this token stops the server gracefully.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.gateway.shutdown.clone()
    }

    /// The HTTP routes plus Socket.IO on `/socket.io/`, all on one port.
    pub fn router(gw: &Arc<Gateway>) -> Router {
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

    /// Serves until the shutdown token is cancelled, then closes every
    /// connection (1001 for `/ws`) and returns within `shutdown_timeout`.
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
        let app = Self::router(&gw);
        let stop = gw.shutdown.clone();
        // HTTP connections (not the upgraded ones, which `gw.connections`
        // tracks) finish their request in progress once `stop` is cancelled.
        let http = TaskTracker::new();
        let serving = tokio::spawn(crate::http::serve(
            self.listener,
            app,
            gw.config.http,
            self.tls.clone(),
            stop.clone(),
            http.clone(),
        ));

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
            let _ = serving.await;
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
