//! [`Builder`]: a server's settings, given from Rust code.

use std::net::SocketAddr;
use std::path::Path;

use super::{Server, StartError};
use crate::config::{Config, ConfigError, Layered, Source};

/// The settings of a [`Server`] and whether it listens; [`Builder::build`]
/// prepares the server.
///
/// A builder starts from the built-in defaults, the same as the binary's
/// (`docs/configuration.md` lists every setting and its default); it reads
/// no file and no environment variable unless told to
/// ([`config_file`](Builder::config_file)). Each call overrides what
/// earlier calls set for the same setting. A wrong value is reported by
/// [`build`](Builder::build), naming the setting.
///
/// ```
/// # async fn start() -> Result<(), pulso::StartError> {
/// let server = pulso::Server::builder()
///     .listen("127.0.0.1:0".parse().unwrap())
///     .jwt_secret("a long random secret")
///     .database_url("sqlite::memory:")
///     .set("ws.outbound_queue", "4096")
///     .toml("[mqtt]\nurl = \"mqtt://127.0.0.1:1883\"\ntopics = [\"sensors/#\"]")
///     .demo(false)
///     .build()
///     .await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
#[must_use = "a builder does nothing until `build` is called"]
pub struct Builder {
    layered: Layered,
    /// The first error of a setting call, reported by `build`.
    error: Option<ConfigError>,
    listen: bool,
}

/// Shows no setting's value: some are secrets.
impl std::fmt::Debug for Builder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Builder")
            .field("listen", &self.listen)
            .field("error", &self.error)
            .finish_non_exhaustive()
    }
}

impl Default for Builder {
    fn default() -> Self {
        Builder::new()
    }
}

impl Builder {
    /// The built-in defaults; a server that listens on `listen`.
    pub fn new() -> Builder {
        Builder::from_layered(Layered::defaults())
    }

    /// Starts from settings already read from every source (the command
    /// line's).
    #[doc(hidden)]
    pub fn from_layered(layered: Layered) -> Builder {
        Builder {
            layered,
            error: None,
            listen: true,
        }
    }

    /// Sets any setting by its dotted name (`mqtt.url`, `ws.rate_limit`),
    /// written as on the command line: durations as `2s` or `500ms`, sizes
    /// as `64KiB`, booleans as `true`/`false`, lists comma-separated, a
    /// table (`acl`, `socketio.rooms`) as an inline TOML table. An unknown
    /// name is an error.
    pub fn set(mut self, name: &str, value: impl Into<String>) -> Builder {
        if self.error.is_none()
            && let Err(e) = self.layered.set_text(name, value.into(), Source::Flag)
        {
            self.error = Some(e);
        }
        self
    }

    /// Applies a TOML document, as in a configuration file: top-level
    /// settings first, then `[section]` tables. Unknown keys are errors.
    pub fn toml(mut self, text: &str) -> Builder {
        if self.error.is_none()
            && let Err(e) = self.layered.apply_toml(text)
        {
            self.error = Some(e);
        }
        self
    }

    /// Reads a TOML configuration file now and applies it like
    /// [`toml`](Builder::toml).
    pub fn config_file(mut self, path: impl AsRef<Path>) -> Builder {
        if self.error.is_some() {
            return self;
        }
        let path = path.as_ref();
        let applied = std::fs::read_to_string(path)
            .map_err(|e| ConfigError(format!("cannot read config file {}: {e}", path.display())))
            .and_then(|text| {
                self.layered
                    .apply_toml(&text)
                    .map_err(|e| ConfigError(format!("config file {}: {}", path.display(), e.0)))
            });
        if let Err(e) = applied {
            self.error = Some(e);
        }
        self
    }

    /// The address pulso's own listener binds (`listen`; port 0 lets the
    /// system choose, see [`Server::local_addr`]). It also gives the
    /// default `node_id` its port.
    pub fn listen(self, addr: SocketAddr) -> Builder {
        self.set("listen", addr.to_string())
    }

    /// No listener: the application serves [`Server::router`] (and maybe
    /// [`Server::ops_router`]) in its own axum server. Set a
    /// [`node_id`](Builder::node_id) when the node is part of a cluster:
    /// the default one is made of the host name and the port of `listen`.
    pub fn without_listener(mut self) -> Builder {
        self.listen = false;
        self
    }

    /// This process's name in presence rows, metrics and the cluster
    /// (`node_id`).
    pub fn node_id(self, id: impl Into<String>) -> Builder {
        self.set("node_id", id)
    }

    /// The HMAC secret client tokens are verified with (`jwt.secret`).
    /// Without it or a [public key](Builder::jwt_public_key_file), the
    /// server makes up a random secret (see [`Server::sample_tokens`]).
    pub fn jwt_secret(self, secret: impl Into<String>) -> Builder {
        self.set("jwt.secret", secret)
    }

    /// A PEM file with the RSA, EC or Ed25519 public key(s) client tokens
    /// are verified with (`jwt.public_key_file`).
    pub fn jwt_public_key_file(self, path: impl AsRef<Path>) -> Builder {
        let path = path.as_ref();
        match path.to_str() {
            Some(text) => self.set("jwt.public_key_file", text),
            None => self.fail(ConfigError::setting(
                "jwt.public_key_file",
                format!("{} is not valid UTF-8", path.display()),
            )),
        }
    }

    /// The presence store (`database_url`): `sqlite://file.db`,
    /// `sqlite::memory:` or `postgres://user@host/db`.
    pub fn database_url(self, url: impl Into<String>) -> Builder {
        self.set("database_url", url)
    }

    /// A static key the HTTP API also accepts as a bearer (`api_key`).
    pub fn api_key(self, key: impl Into<String>) -> Builder {
        self.set("api_key", key)
    }

    /// Whether to publish the demo feed on `metricas/demo` (`demo.enabled`,
    /// on by default).
    pub fn demo(self, enabled: bool) -> Builder {
        self.set("demo.enabled", enabled.to_string())
    }

    fn fail(mut self, e: ConfigError) -> Builder {
        if self.error.is_none() {
            self.error = Some(e);
        }
        self
    }

    /// Validates the settings, binds the listener (unless
    /// [`without_listener`](Builder::without_listener)), opens the presence
    /// store and prepares everything else. Nothing is served until
    /// [`Server::run`].
    pub async fn build(self) -> Result<Server, StartError> {
        if let Some(e) = self.error {
            return Err(e.into());
        }
        let config = Config::from_layered(&self.layered)?;
        Server::start(config, self.listen).await
    }
}
