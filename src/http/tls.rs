//! TLS on pulso's own listener (`tls.cert_file`, `tls.key_file`): HTTPS
//! and WSS on `listen`, HTTP/1.1 only, with rustls and its `ring`
//! provider.
//!
//! The certificate is chosen per handshake by a resolver that hands out
//! the current [`CertifiedKey`], so a reload ([`Tls::reload`], on SIGHUP)
//! swaps one `Arc` under a lock held for that swap or that clone only:
//! handshakes that start afterwards get the new certificate, connections
//! already established keep the session they have. A reload whose files do
//! not load (missing, not PEM, a key that does not fit the certificate)
//! changes nothing but the log and `pulso_tls_reloads_total{result="error"}`.
//!
//! The handshake itself runs on the connection's task, on the clock of the
//! request head that follows it (`http.header_timeout` from accept), so a
//! client that opens a connection and sends nothing is dropped like one
//! that sends no request.

use std::io::Read as _;
use std::path::Path;
use std::sync::{Arc, PoisonError, RwLock};

use rustls::ServerConfig;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;

use crate::config::TlsConfig;
use crate::metrics::Metrics;

/// The largest certificate or key file read: a chain of a few certificates
/// is a few KiB; this stops a wrong path (a log, a device) from being read
/// whole.
const MAX_PEM_FILE: u64 = 1024 * 1024;

/// A certificate or key file that did not load.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {reason}")]
pub struct LoadError {
    /// The setting naming the file at fault.
    pub setting: &'static str,
    path: String,
    reason: String,
}

impl LoadError {
    fn new(setting: &'static str, path: &Path, reason: impl Into<String>) -> Self {
        LoadError {
            setting,
            path: path.display().to_string(),
            reason: reason.into(),
        }
    }
}

/// The TLS side of the listener: the acceptor new connections go through
/// and the certificate it presents, which [`Tls::reload`] replaces.
pub struct Tls {
    files: TlsConfig,
    provider: Arc<CryptoProvider>,
    resolver: Arc<Resolver>,
    acceptor: TlsAcceptor,
    metrics: Arc<Metrics>,
}

impl Tls {
    /// Loads the certificate and key; an error names the setting at fault.
    pub fn new(files: &TlsConfig, metrics: Arc<Metrics>) -> Result<Tls, LoadError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let key = load(files, &provider)?;
        let resolver = Arc::new(Resolver(RwLock::new(key)));
        let mut config = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| LoadError::new("tls.cert_file", &files.cert_file, e.to_string()))?
            .with_no_client_auth()
            .with_cert_resolver(resolver.clone());
        // pulso's connections are HTTP/1.1 (WebSockets upgrade from it): a
        // client that offers ALPN must be able to pick it, and one that
        // offers only h2 is refused in the handshake rather than sent
        // HTTP/1.1 it cannot read.
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Tls {
            files: files.clone(),
            provider,
            resolver,
            acceptor: TlsAcceptor::from(Arc::new(config)),
            metrics,
        })
    }

    /// The server's side of the handshake on a new connection, done by
    /// `deadline`. `None` when it failed, did not finish in time or the
    /// server is stopping; the caller then drops the connection.
    pub(super) async fn handshake(
        &self,
        tcp: TcpStream,
        deadline: Instant,
        stop: &CancellationToken,
    ) -> Option<TlsStream<TcpStream>> {
        tokio::select! {
            biased;
            () = stop.cancelled() => None,
            () = tokio::time::sleep_until(deadline) => {
                self.metrics.tls_handshake_failed("timeout");
                tracing::debug!(
                    "TLS handshake not completed in time; connection closed (http.header_timeout)"
                );
                None
            }
            done = self.acceptor.accept(tcp) => match done {
                Ok(stream) => Some(stream),
                Err(e) => {
                    self.metrics.tls_handshake_failed("error");
                    tracing::debug!(error = %e, "TLS handshake failed; connection closed");
                    None
                }
            },
        }
    }

    /// Reads the files again and, if they load, presents the new
    /// certificate from the next handshake on; if not, keeps the current
    /// one. Either way the outcome is logged and counted.
    pub fn reload(&self) -> Result<(), LoadError> {
        match load(&self.files, &self.provider) {
            Ok(key) => {
                *self
                    .resolver
                    .0
                    .write()
                    .unwrap_or_else(PoisonError::into_inner) = key;
                self.metrics.tls_reload("ok");
                tracing::info!(
                    cert_file = %self.files.cert_file.display(),
                    "TLS certificate reloaded; new connections get it"
                );
                Ok(())
            }
            Err(e) => {
                self.metrics.tls_reload("error");
                tracing::error!(
                    setting = e.setting,
                    error = %e,
                    "TLS certificate reload failed; the previous certificate stays in use"
                );
                Err(e)
            }
        }
    }
}

/// Checks that the files load, without serving (`pulso check-config`).
pub fn check(files: &TlsConfig) -> Result<(), LoadError> {
    load(files, &rustls::crypto::ring::default_provider()).map(drop)
}

/// Hands every handshake the current certificate.
#[derive(Debug)]
struct Resolver(RwLock<Arc<CertifiedKey>>);

impl ResolvesServerCert for Resolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(
            self.0
                .read()
                .unwrap_or_else(PoisonError::into_inner)
                .clone(),
        )
    }
}

/// The chain and key from the files, checked to belong together.
fn load(files: &TlsConfig, provider: &CryptoProvider) -> Result<Arc<CertifiedKey>, LoadError> {
    let cert_error = |reason: String| LoadError::new("tls.cert_file", &files.cert_file, reason);
    let key_error = |reason: String| LoadError::new("tls.key_file", &files.key_file, reason);
    let chain = read_bounded(&files.cert_file).map_err(cert_error)?;
    let chain = CertificateDer::pem_slice_iter(&chain)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| cert_error(format!("not a PEM file: {e}")))?;
    if chain.is_empty() {
        return Err(cert_error("no CERTIFICATE block in it".into()));
    }
    let key = read_bounded(&files.key_file).map_err(key_error)?;
    let key = PrivateKeyDer::from_pem_slice(&key).map_err(|e| {
        key_error(match e {
            pem::Error::NoItemsFound => {
                "no PRIVATE KEY, RSA PRIVATE KEY or EC PRIVATE KEY block in it".into()
            }
            other => format!("not a PEM private key: {other}"),
        })
    })?;
    let key = CertifiedKey::from_der(chain, key, provider).map_err(|e| {
        key_error(format!(
            "cannot be used with the certificate in {}: {e}",
            files.cert_file.display()
        ))
    })?;
    Ok(Arc::new(key))
}

/// The file's bytes, if it is at most [`MAX_PEM_FILE`] long.
fn read_bounded(path: &Path) -> Result<Vec<u8>, String> {
    let file = std::fs::File::open(path).map_err(|e| format!("cannot open: {e}"))?;
    let mut bytes = Vec::new();
    file.take(MAX_PEM_FILE + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("cannot read: {e}"))?;
    if bytes.len() as u64 > MAX_PEM_FILE {
        return Err(format!(
            "larger than {MAX_PEM_FILE} bytes: not a certificate or key file"
        ));
    }
    Ok(bytes)
}
