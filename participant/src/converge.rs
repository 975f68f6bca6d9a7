//! Convergence: re-driving decisions a dead coordinator on this node left, and retrying pending
//! changes until the cluster serves the newest content.

use crate::server::{Live, Node};
use std::sync::Arc;
use std::time::Duration;
use tracing::info;
use txmap_common::decision::DecisionLog;
use txmap_common::now_ms;

impl Node {
    /// Re-drives decisions that a dead coordinator on this node did not finish delivering.
    pub(crate) async fn redrive_loop(live: Arc<Live>) {
        let mut tick = tokio::time::interval(Duration::from_millis(1000));
        loop {
            tick.tick().await;
            let (this, cluster) = live.both();
            let log = DecisionLog::new(&this.cfg.state_dir);
            if log.list().is_empty() && log.list_open().is_empty() {
                continue;
            }
            txmap_coordinator::redrive::redrive(&cluster).await;
        }
    }

    /// Retries pending commits of this node (convergence), each when its backoff has passed.
    pub(crate) async fn pending_loop(live: Arc<Live>) {
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        loop {
            tick.tick().await;
            let (this, cluster) = live.both();
            this.adopt_queued_requests();
            let log = DecisionLog::new(&this.cfg.state_dir);
            for p in log.list_pending() {
                let Some(slot) = this.slots.get(&p.table) else {
                    continue;
                };
                // A transaction still holds the table here: let it resolve first (a dead
                // coordinator's commit may be finishing; retrying now would only be refused).
                if slot.state.lock().await.active.is_some() {
                    continue;
                }
                // Content a node's builder rejected waits until its source changes.
                if p.held.as_ref().is_some_and(|h| h.unchanged(&p.source)) {
                    continue;
                }
                // A live owner (a `txmap commit` or a hook request at work) keeps it until its
                // deadline; a dead one hands it over at once.
                let owner_alive = log.pending_owner_alive(&p.table);
                if now_ms() < p.next_ms && (owner_alive || p.owner_pid.is_none()) {
                    continue;
                }
                if txmap_coordinator::commit::converged(&cluster, &p.table, &p.source).await {
                    info!(table = %p.table, "pending commit already served everywhere (its coordinator finished before dying)");
                    log.clear_pending(&p.table, &p.source);
                    continue;
                }
                let r = txmap_coordinator::commit::commit_tracked_with(
                    &cluster, &p.table, &p.source, p.force, p.change,
                )
                .await;
                if r.exit == txmap_common::exit::OK {
                    info!(table = %p.table, attempts = p.attempts + 1, generation = r.generation.unwrap_or_default(), "pending commit done: the cluster serves the newest source");
                } else {
                    info!(table = %p.table, attempts = p.attempts + 1, error = %r.failures(), "pending commit failed again; will retry");
                }
            }
        }
    }
}
