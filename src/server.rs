//! Starting and stopping a pulso server: bind, build the gateway, compose
//! the routers, serve until the shutdown signal, then close every
//! connection within `shutdown_timeout`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::routing::get;
use axum::serve::ListenerExt;
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
}

pub struct Server {
    listener: TcpListener,
    gateway: Arc<Gateway>,
    sample_token: Option<String>,
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
        let sample_token = match &generated {
            Some(secret) => Signer::hmac(secret)
                .token(
                    "assistant",
                    "demo",
                    Some(Duration::from_secs(24 * 3600)),
                    &Default::default(),
                )
                .ok(),
            None => None,
        };

        let metrics = Arc::new(Metrics::new());
        let gateway = Arc::new(Gateway {
            hub: Arc::new(Hub::new(metrics.clone())),
            config: Arc::new(config),
            verifier,
            metrics,
            shutdown: CancellationToken::new(),
            connections: TaskTracker::new(),
            readiness: Readiness::default(),
        });
        Ok(Server {
            listener,
            gateway,
            sample_token,
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

    /// A token for role `assistant`, when the secret was generated at start.
    pub fn sample_token(&self) -> Option<&str> {
        self.sample_token.as_deref()
    }

    /// Cancelling this token stops the server gracefully.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.gateway.shutdown.clone()
    }

    pub fn router(gw: &Arc<Gateway>) -> Router {
        Router::new()
            .route("/ws", get(crate::ws::upgrade))
            .merge(crate::api::router())
            .with_state(gw.clone())
    }

    /// Serves until the shutdown token is cancelled, then closes every
    /// connection (1001 for `/ws`) and returns within `shutdown_timeout`.
    pub async fn run(self) -> std::io::Result<()> {
        let gw = self.gateway.clone();
        let background = TaskTracker::new();
        if gw.config.demo.enabled {
            background.spawn(crate::demo::run(gw.clone()));
        }
        let app = Self::router(&gw);
        let stop = gw.shutdown.clone();
        // Small frames go out at once: without TCP_NODELAY a frame written
        // while an earlier one is unacknowledged waits for the peer's delayed
        // ACK (about 40 ms on Linux), which showed as a 40 ms p99 in fan-out.
        let listener = self.listener.tap_io(|tcp| {
            if let Err(e) = tcp.set_nodelay(true) {
                tracing::debug!(error = %e, "cannot set TCP_NODELAY");
            }
        });
        let serve =
            axum::serve(listener, app).with_graceful_shutdown(stop.clone().cancelled_owned());
        let serving = tokio::spawn(async move { serve.await });

        stop.cancelled().await;
        tracing::info!("stopping: closing connections");
        gw.connections.close();
        background.close();
        let drained = tokio::time::timeout(gw.config.shutdown_timeout, async {
            gw.connections.wait().await;
            background.wait().await;
            let _ = serving.await;
        })
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
