//! Connection state recovery (SPEC §11), as socket.io v4 does it: what an
//! authenticated namespace socket held when its transport was lost, kept
//! under its private session id (`pid`) for `history.ttl`, so that the
//! client, reconnecting with that pid and the offset of the last event it
//! saw, gets the same socket back (id, rooms, authentication) and the
//! events it missed.
//!
//! Only a transport that ends without the socket having left keeps a
//! session: a client's DISCONNECT, a failed or lapsed authentication and an
//! expired token end the socket for good, and a socket that never
//! authenticated has nothing worth keeping. A session is taken (removed) by
//! the first reconnect that names its pid, whatever the outcome, so it is
//! used once and a wrong offset cannot be retried against it.
//!
//! The store is bounded: sessions older than `history.ttl` are swept (on
//! every use and periodically), and past [`MAX_SESSIONS`] the oldest is
//! dropped, so a crowd of clients that vanish cannot grow it.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use crate::auth::Identity;
use crate::metrics::Metrics;

/// Sessions kept at most; the oldest goes first.
pub const MAX_SESSIONS: usize = 100_000;

/// What a socket held when its transport was lost.
pub(crate) struct Saved {
    /// The id the client saw as `socket.id` (also its own room).
    pub socket_id: String,
    /// The namespace it was in (`/` or the notifications namespace): it is
    /// recovered in that namespace only.
    pub namespace: &'static str,
    /// Its template rooms (the own-id room is implied).
    pub rooms: Vec<String>,
    /// Who it authenticated as (role, sub, `exp`; claims dropped).
    pub identity: Identity,
    /// When its token stops being valid (`exp` plus leeway; `None`: never).
    pub deadline: Option<SystemTime>,
}

struct Kept {
    saved: Saved,
    at: Instant,
    /// Its key in `Inner::order`.
    serial: u64,
}

#[derive(Default)]
struct Inner {
    by_pid: HashMap<Box<str>, Kept>,
    /// Pids by age: sessions are kept at the moment their transport is
    /// lost, so a growing serial is also a growing disconnect time.
    order: BTreeMap<u64, Box<str>>,
    next: u64,
}

pub(crate) struct Store {
    inner: Mutex<Inner>,
    ttl: Duration,
    cap: usize,
    metrics: Arc<Metrics>,
}

impl Store {
    pub(crate) fn new(ttl: Duration, cap: usize, metrics: Arc<Metrics>) -> Self {
        Store {
            inner: Mutex::default(),
            ttl,
            cap: cap.max(1),
            metrics,
        }
    }

    // Nothing panics while holding the lock, so a poisoned store is intact.
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Keeps `saved` under `pid` (a pid is never reused: a second keep
    /// under the same one replaces the first).
    pub(crate) fn keep(&self, pid: &str, saved: Saved) {
        let now = Instant::now();
        let mut inner = self.lock();
        let inner = &mut *inner;
        inner.sweep(now, self.ttl);
        if let Some(old) = inner.by_pid.remove(pid) {
            inner.order.remove(&old.serial);
        }
        while inner.by_pid.len() >= self.cap {
            let Some((_, oldest)) = inner.order.pop_first() else {
                break;
            };
            inner.by_pid.remove(&oldest);
        }
        let serial = inner.next;
        inner.next += 1;
        let pid: Box<str> = pid.into();
        inner.order.insert(serial, pid.clone());
        inner.by_pid.insert(
            pid,
            Kept {
                saved,
                at: now,
                serial,
            },
        );
        self.metrics
            .sio_recovery_sessions
            .set(inner.by_pid.len() as i64);
    }

    /// Takes the session kept under `pid`, if there is one younger than
    /// `history.ttl`; it is gone from the store either way.
    pub(crate) fn take(&self, pid: &str) -> Option<Saved> {
        let now = Instant::now();
        let mut inner = self.lock();
        inner.sweep(now, self.ttl);
        let kept = inner.by_pid.remove(pid);
        if let Some(k) = &kept {
            inner.order.remove(&k.serial);
        }
        self.metrics
            .sio_recovery_sessions
            .set(inner.by_pid.len() as i64);
        kept.map(|k| k.saved)
    }

    /// Whether a session is kept here under `pid`.
    pub(crate) fn has(&self, pid: &str) -> bool {
        self.lock().by_pid.contains_key(pid)
    }

    /// Drops the sessions older than `history.ttl`.
    pub(crate) fn sweep(&self) {
        let mut inner = self.lock();
        inner.sweep(Instant::now(), self.ttl);
        self.metrics
            .sio_recovery_sessions
            .set(inner.by_pid.len() as i64);
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.lock().by_pid.len()
    }
}

impl Inner {
    fn sweep(&mut self, now: Instant, ttl: Duration) {
        while let Some((_, pid)) = self.order.first_key_value() {
            let expired = self
                .by_pid
                .get(pid)
                .is_none_or(|k| now.duration_since(k.at) >= ttl);
            if !expired {
                break;
            }
            if let Some((_, pid)) = self.order.pop_first() {
                self.by_pid.remove(&pid);
            }
        }
    }
}

/// A session as the nodes of a cluster share it (JSON).
pub(crate) fn encode(saved: &Saved) -> Vec<u8> {
    let deadline_ms = saved.deadline.map(|d| {
        d.duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |t| u64::try_from(t.as_millis()).unwrap_or(u64::MAX))
    });
    serde_json::json!({
        "id": saved.socket_id,
        "nsp": saved.namespace,
        "rooms": saved.rooms,
        "sub": saved.identity.sub,
        "role": saved.identity.role,
        "claims": saved.identity.claims,
        "exp": saved.identity.exp,
        "deadline": deadline_ms,
    })
    .to_string()
    .into_bytes()
}

/// A shared session back, if it is one and names `nsp` or the root
/// namespace (the only two a connection serves).
pub(crate) fn decode(bytes: &[u8], nsp: &'static str) -> Option<Saved> {
    #[derive(serde::Deserialize)]
    struct Wire {
        id: String,
        nsp: String,
        rooms: Vec<String>,
        sub: String,
        role: String,
        #[serde(default)]
        claims: serde_json::Map<String, serde_json::Value>,
        exp: Option<u64>,
        deadline: Option<u64>,
    }
    let w: Wire = serde_json::from_slice(bytes).ok()?;
    let namespace = match w.nsp.as_str() {
        "/" => "/",
        n if n == nsp => nsp,
        _ => return None,
    };
    Some(Saved {
        socket_id: w.id,
        namespace,
        rooms: w.rooms,
        identity: Identity {
            sub: w.sub,
            role: w.role,
            claims: w.claims,
            exp: w.exp,
        },
        deadline: w
            .deadline
            .map(|ms| SystemTime::UNIX_EPOCH + Duration::from_millis(ms)),
    })
}

/// A private session id: 128 random bits as 22 URL-safe characters, from
/// the thread's cryptographically secure generator, so that it cannot be
/// guessed (whoever holds it gets the socket's authentication back).
pub(crate) fn new_pid() -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut bits: u128 = rand::random();
    (0..22)
        .map(|_| {
            let c = ALPHABET[(bits & 63) as usize] as char;
            bits >>= 6;
            c
        })
        .collect()
}

/// Sweeps `store` every `period` until the server stops (or the store is
/// dropped), so expired sessions do not wait for the next reconnect.
pub(crate) fn sweep_periodically(
    store: &Arc<Store>,
    period: Duration,
    stop: tokio_util::sync::CancellationToken,
) {
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return;
    };
    let store = Arc::downgrade(store);
    runtime.spawn(async move {
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => match store.upgrade() {
                    Some(store) => store.sweep(),
                    None => return,
                },
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn saved(id: &str) -> Saved {
        Saved {
            socket_id: id.into(),
            namespace: "/notifications",
            rooms: vec!["assistant".into()],
            identity: Identity {
                sub: "1".into(),
                role: "assistant".into(),
                claims: Default::default(),
                exp: None,
            },
            deadline: None,
        }
    }

    #[test]
    fn a_session_is_taken_once_and_the_store_is_bounded() {
        let metrics = Arc::new(Metrics::new());
        let store = Store::new(Duration::from_secs(60), 3, metrics.clone());
        for n in 0..5 {
            store.keep(&format!("p{n}"), saved(&format!("s{n}")));
        }
        assert_eq!(store.len(), 3, "capped");
        assert_eq!(metrics.sio_recovery_sessions.get(), 3);
        assert!(
            store.take("p0").is_none() && store.take("p1").is_none(),
            "oldest dropped"
        );
        assert_eq!(store.take("p3").map(|s| s.socket_id), Some("s3".into()));
        assert!(store.take("p3").is_none(), "single use");
        assert!(store.take("nope").is_none());
        assert_eq!(metrics.sio_recovery_sessions.get(), 2);
    }

    #[test]
    fn expired_sessions_are_swept() {
        let metrics = Arc::new(Metrics::new());
        let store = Store::new(Duration::ZERO, 10, metrics.clone());
        store.keep("p", saved("s"));
        assert!(store.take("p").is_none());
        store.keep("q", saved("s"));
        store.sweep();
        assert_eq!((store.len(), metrics.sio_recovery_sessions.get()), (0, 0));
    }

    #[test]
    fn pids_are_long_and_distinct() {
        let a = new_pid();
        assert_eq!(a.len(), 22);
        assert_ne!(a, new_pid());
    }
}
