//! Who may open a client connection, before any upgrade or session: the
//! browser origins in `allowed_origins`, and the caps on open connections,
//! in all (`max_connections`) and per IP address (`max_connections_per_ip`).
//!
//! A connection counts from the moment it is admitted (before the `101` of
//! a WebSocket, or when a long-polling session opens) until its [`Permit`]
//! is dropped with it; a Socket.IO session that upgrades from polling to
//! WebSocket keeps the one permit. The address is the TCP peer's: behind a
//! proxy every client has the proxy's, so the per-address cap is off by
//! default.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};

use axum::http::HeaderMap;
use axum::http::header::{HOST, ORIGIN};

use crate::config::{AllowedOrigins, LimitsConfig};
use crate::metrics::Metrics;

/// Why a connection or request is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// Its `Origin` is not in `allowed_origins` (403).
    Origin,
    /// `max_connections` are open (503).
    Full,
    /// `max_connections_per_ip` are open from its address (503).
    FullForAddress,
}

impl Refused {
    /// The `/ws` error code.
    pub fn code(self) -> &'static str {
        match self {
            Refused::Origin => "origin_not_allowed",
            Refused::Full | Refused::FullForAddress => "too_many_connections",
        }
    }

    pub fn message(self) -> &'static str {
        match self {
            Refused::Origin => "this origin may not connect (allowed_origins)",
            Refused::Full => "the server has as many connections as it takes (max_connections)",
            Refused::FullForAddress => {
                "this address has as many connections as it may have (max_connections_per_ip)"
            }
        }
    }
}

pub struct Admission {
    max_total: usize,
    /// 0: no per-address cap.
    max_per_ip: usize,
    origins: AllowedOrigins,
    open: Mutex<Open>,
    metrics: Arc<Metrics>,
}

#[derive(Default)]
struct Open {
    total: usize,
    /// Only kept with a per-address cap; an address leaves it with its
    /// last connection.
    per_ip: HashMap<IpAddr, usize>,
}

/// One admitted connection; dropping it frees its place.
pub struct Permit {
    admission: Arc<Admission>,
    ip: Option<IpAddr>,
}

impl Drop for Permit {
    fn drop(&mut self) {
        let mut open = self.admission.lock();
        open.total = open.total.saturating_sub(1);
        if let Some(ip) = self.ip
            && let Some(n) = open.per_ip.get_mut(&ip)
        {
            *n -= 1;
            if *n == 0 {
                open.per_ip.remove(&ip);
            }
        }
    }
}

impl Admission {
    pub fn new(config: &LimitsConfig, metrics: Arc<Metrics>) -> Self {
        Admission {
            max_total: config.max_connections,
            max_per_ip: config.max_connections_per_ip,
            origins: config.allowed_origins.clone(),
            open: Mutex::default(),
            metrics,
        }
    }

    // Nothing panics while holding the lock, so a poisoned one is intact.
    fn lock(&self) -> MutexGuard<'_, Open> {
        self.open.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether a request with these headers may go on: no `Origin` (not a
    /// browser), an allowed one, or the server's own. A refusal is counted
    /// under `endpoint`.
    pub fn check_origin(&self, headers: &HeaderMap, endpoint: &'static str) -> Result<(), Refused> {
        let Some(origin) = headers.get(ORIGIN) else {
            return Ok(());
        };
        let host = headers.get(HOST).map(|h| h.as_bytes());
        if self.origins.allows(origin.as_bytes(), host) {
            return Ok(());
        }
        self.metrics.origin_refused(endpoint);
        tracing::debug!(endpoint, origin = ?origin, "origin not allowed; refused");
        Err(Refused::Origin)
    }

    /// Admits one connection from `ip` (`None`: unknown, counted in the
    /// total only), or says why not; a refusal is counted.
    pub fn admit(self: &Arc<Self>, ip: Option<IpAddr>) -> Result<Permit, Refused> {
        let ip = ip.map(|ip| ip.to_canonical());
        // The address is counted only under a per-address cap.
        let counted = ip.filter(|_| self.max_per_ip > 0);
        let refused = {
            let mut open = self.lock();
            let from_ip = counted.map_or(0, |ip| open.per_ip.get(&ip).copied().unwrap_or(0));
            if open.total >= self.max_total {
                Refused::Full
            } else if counted.is_some() && from_ip >= self.max_per_ip {
                Refused::FullForAddress
            } else {
                open.total += 1;
                if let Some(ip) = counted {
                    *open.per_ip.entry(ip).or_default() += 1;
                }
                return Ok(Permit {
                    admission: self.clone(),
                    ip: counted,
                });
            }
        };
        self.metrics.connection_refused(match refused {
            Refused::FullForAddress => "max_connections_per_ip",
            _ => "max_connections",
        });
        tracing::debug!(?ip, ?refused, "connection refused");
        Err(refused)
    }

    /// Connections admitted and still open.
    pub fn open(&self) -> usize {
        self.lock().total
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn admission(max_total: usize, max_per_ip: usize) -> Arc<Admission> {
        Arc::new(Admission::new(
            &LimitsConfig {
                max_connections: max_total,
                max_connections_per_ip: max_per_ip,
                allowed_origins: AllowedOrigins::Any,
            },
            Arc::new(Metrics::new()),
        ))
    }

    #[test]
    fn permits_are_counted_in_all_and_per_address_until_dropped() {
        let a = admission(3, 2);
        let (one, two) = ("10.0.0.1".parse().ok(), "10.0.0.2".parse().ok());
        let p1 = a.admit(one).unwrap();
        let p2 = a.admit(one).unwrap();
        assert_eq!(a.admit(one).err(), Some(Refused::FullForAddress));
        let p3 = a.admit(two).unwrap();
        assert_eq!(a.admit(two).err(), Some(Refused::Full));
        drop(p1);
        assert_eq!(a.open(), 2);
        let p4 = a.admit(one).unwrap();
        drop((p2, p3, p4));
        assert_eq!(a.open(), 0);
        assert!(
            a.lock().per_ip.is_empty(),
            "addresses leave with their last connection"
        );
        // An IPv4 client seen through an IPv6 socket is the same address.
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().unwrap();
        let _p5 = a.admit(Some(mapped)).unwrap();
        let _p6 = a.admit(one).unwrap();
        assert_eq!(a.admit(one).err(), Some(Refused::FullForAddress));
    }
}
