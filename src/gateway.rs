//! The gateway core shared by every front end: configuration, hub, token
//! verifier, metrics and the process-wide shutdown signal.

use std::sync::{Arc, Mutex};

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::{Identity, Verifier};
use crate::config::{Config, RoleAcl};
use crate::hub::Hub;
use crate::hub::topic::Filter;
use crate::metrics::Metrics;

pub struct Gateway {
    pub config: Arc<Config>,
    pub hub: Arc<Hub>,
    pub verifier: Verifier,
    pub metrics: Arc<Metrics>,
    /// Cancelled when the process starts to stop.
    pub shutdown: CancellationToken,
    /// Every connection task, so a stop can wait for them to close.
    pub connections: TaskTracker,
    pub readiness: Readiness,
    /// The MQTT bridge, when `mqtt.url` is set.
    pub mqtt: Option<Arc<crate::mqtt::Bridge>>,
    /// Who holds which socket (SPEC §7); writes never block.
    pub presence: crate::presence::Presence,
}

type Check = Box<dyn Fn() -> Result<(), String> + Send + Sync>;

/// Named readiness checks that components (MQTT bridge, presence store,
/// cluster) register. A check reads state its component keeps up to date; it
/// never does I/O, so `/readyz` answers at once.
#[derive(Default)]
pub struct Readiness {
    checks: Mutex<Vec<(&'static str, Check)>>,
}

impl Readiness {
    pub fn register(
        &self,
        name: &'static str,
        check: impl Fn() -> Result<(), String> + Send + Sync + 'static,
    ) {
        self.checks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((name, Box::new(check)));
    }

    /// Whether all checks pass, and each check's state ("ok" or the reason).
    pub fn report(&self) -> (bool, serde_json::Map<String, serde_json::Value>) {
        let checks = self.checks.lock().unwrap_or_else(|e| e.into_inner());
        let mut all = true;
        let mut out = serde_json::Map::new();
        for (name, check) in checks.iter() {
            let state = match check() {
                Ok(()) => "ok".to_string(),
                Err(reason) => {
                    all = false;
                    reason
                }
            };
            out.insert((*name).to_string(), state.into());
        }
        (all, out)
    }
}

impl Gateway {
    fn acl(&self, role: &str) -> Option<&RoleAcl> {
        self.config.acl.get(role)
    }

    /// May this identity subscribe to `filter`? A wildcard must be entirely
    /// inside one of the role's subscribe filters.
    pub fn may_subscribe(&self, who: &Identity, filter: &Filter) -> bool {
        match self.acl(&who.role).and_then(|a| a.subscribe.as_ref()) {
            None => true,
            Some(rules) => rules.iter().any(|rule| rule.covers(filter)),
        }
    }

    /// May this identity publish on `topic`? Off unless the role has rules.
    pub fn may_publish(&self, who: &Identity, topic: &str) -> bool {
        self.acl(&who.role)
            .is_some_and(|a| a.publish.iter().any(|rule| rule.matches(topic)))
    }

    /// Is this identity allowed to use the HTTP publish API?
    pub fn is_publisher(&self, who: &Identity) -> bool {
        self.config.publisher_roles.contains(&who.role)
    }
}
