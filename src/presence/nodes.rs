//! Cluster nodes in the presence store (SPEC §8): heartbeats, dead nodes,
//! and one node id per live node.
//!
//! Each node of a cluster keeps a row in `pulso_nodes`, written every
//! `cluster.heartbeat`. Times are read from PostgreSQL's clock, for writing
//! and for judging alike, so nodes whose clocks disagree still agree on who
//! has been silent, and for how long.
//!
//! - **Claim before touching rows.** The writer claims the node id when it
//!   connects, before it clears "this node's" stale rows: a second process
//!   started with the `node_id` of a live node must not clear that node's
//!   clients. At start-up the claim may wait (at most `cluster.node_ttl`)
//!   for a heartbeat it finds: one that moves is a live node, and this one
//!   refuses to start; one that expires was an earlier run of this node
//!   that died (a `kill -9`, a crash restarted at once), and is taken over.
//! - **Dead nodes.** After its own heartbeat every node deletes the
//!   heartbeats of its cluster older than their node's `node_ttl` and
//!   clears those nodes' presence rows in the same transaction
//!   ([`Db::clear_dead`]). So rows are cleared within `node_ttl` +
//!   `heartbeat` of a node's last heartbeat, by whichever live node comes
//!   first; the others find nothing left. Each row carries its node's own
//!   `node_ttl`: while settings change across a cluster, no node is judged
//!   by a clock it did not promise.
//! - **Coming back.** A node whose heartbeat row is gone (it was silent too
//!   long: a partition, a stalled database) claims its id again and
//!   rewrites its rows from what it holds.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use super::{Claim, ConnectError, DB_TIMEOUT, Db, Presence, Shared};

/// How often a starting node looks at a heartbeat that holds its node id.
const CLAIM_POLL: Duration = Duration::from_millis(100);

/// Another live node holds this node's `node_id`.
#[derive(Debug, Clone, thiserror::Error)]
#[error(
    "node_id `{node}` is in use by a live node of the cluster (heartbeat {age_ms} ms old); give every node its own node_id"
)]
pub struct NodeInUse {
    pub node: String,
    pub age_ms: i64,
}

/// Claims this node's id, when it is a cluster node. With `wait` (the first
/// connection, at start-up) a heartbeat held by another instance is watched
/// until it moves (a live node: refused) or expires (claimed), at most this
/// node's own `node_ttl`; without, it is refused at once.
pub(super) async fn claim(db: &Db, shared: &Shared, wait: bool) -> Result<(), ConnectError> {
    let Some((member, _)) = &shared.member else {
        return Ok(());
    };
    let own_ttl = Duration::from_millis(u64::try_from(member.ttl_ms).unwrap_or(0));
    let mut watched: Option<(i64, Instant)> = None;
    loop {
        let connections = shared.metrics.open_connections();
        let claim = tokio::time::timeout(DB_TIMEOUT, db.claim(member, connections))
            .await
            .map_err(|_| "claiming the node id timed out".to_string())?
            .map_err(|e| format!("claiming the node id failed: {e}"))?;
        let (seen_at, age_ms, ttl_ms) = match claim {
            Claim::Claimed => {
                shared.claimed.store(true, Ordering::Release);
                return Ok(());
            }
            Claim::Held {
                seen_at,
                age_ms,
                ttl_ms,
            } => (seen_at, age_ms, ttl_ms),
        };
        let in_use = || {
            ConnectError::InUse(NodeInUse {
                node: member.node.clone(),
                age_ms,
            })
        };
        if !wait {
            return Err(in_use());
        }
        match watched {
            None => {
                let left = u64::try_from(ttl_ms.saturating_sub(age_ms)).unwrap_or(0);
                let left = Duration::from_millis(left).min(own_ttl);
                tracing::info!(
                    node = %member.node,
                    age_ms,
                    wait = ?left,
                    "another instance's heartbeat holds this node_id: waiting to see whether it is alive"
                );
                watched = Some((seen_at, Instant::now() + left + CLAIM_POLL * 2));
            }
            // It wrote another heartbeat: a live node.
            Some((first, _)) if first != seen_at => return Err(in_use()),
            Some((_, deadline)) if Instant::now() >= deadline => return Err(in_use()),
            Some(_) => {}
        }
        tokio::time::sleep(CLAIM_POLL).await;
    }
}

impl Presence {
    /// Writes this node's heartbeat every `cluster.heartbeat` and clears the
    /// nodes that died, until `stop`; returns at once outside a cluster.
    /// Each round is bounded; a failed one is logged once (and once when
    /// they work again) and skips the dead-node clearing: a node that cannot
    /// write its own heartbeat is in no position to judge others.
    pub async fn heartbeats(self, stop: CancellationToken) {
        let Some((member, every)) = self.shared.member.clone() else {
            return;
        };
        let limit = every.clamp(Duration::from_millis(500), DB_TIMEOUT);
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut failing = false;
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            let shared = &self.shared;
            if shared.stopping.load(Ordering::Acquire) {
                return;
            }
            // Not claimed yet (the store is down, or the id is held by
            // another node): nothing of ours to write.
            if !shared.claimed.load(Ordering::Acquire) {
                continue;
            }
            let Some(db) = shared.db() else { continue };
            let result = tokio::time::timeout(limit, self.round(&db, &member)).await;
            match result {
                Ok(Ok(())) if failing => {
                    failing = false;
                    tracing::info!("cluster heartbeats written again");
                }
                Ok(Err(e)) if !failing => {
                    failing = true;
                    tracing::warn!(error = %e, "cluster heartbeat failed");
                }
                Err(_) if !failing => {
                    failing = true;
                    tracing::warn!(timeout = ?limit, "cluster heartbeat timed out");
                }
                _ => {}
            }
        }
    }

    /// One heartbeat, then the dead nodes, then the count of live ones.
    async fn round(&self, db: &Db, member: &super::Member) -> Result<(), sqlx::Error> {
        let shared: &Arc<Shared> = &self.shared;
        let connections = shared.metrics.open_connections();
        if !db.beat(member, connections).await? {
            // Judged dead while silent (its rows were cleared), or another
            // instance took the id: the writer claims it again, or finds
            // it taken, and rewrites this node's rows.
            tracing::warn!(
                node = %member.node,
                "this node's heartbeat was removed by the cluster; claiming the node_id again"
            );
            shared.claimed.store(false, Ordering::Release);
            shared.reclaim.store(true, Ordering::Release);
            shared.stale.store(true, Ordering::Relaxed);
            // A full queue means a busy writer, which looks at the flag
            // before its next write anyway.
            let _ = self.wake.try_send(());
            return Ok(());
        }
        for (node, rows) in db.clear_dead(member, &shared.entities).await? {
            shared.metrics.cluster_dead_nodes.inc();
            tracing::warn!(%node, rows, "dead cluster node: its presence rows were cleared");
        }
        let live = db.nodes(member).await?;
        shared
            .metrics
            .cluster_nodes
            .set(i64::try_from(live.len()).unwrap_or(i64::MAX));
        Ok(())
    }
}
