//! Finishing what a dead coordinator left on this node, run by `txmapd` in the background:
//!
//! - an open transaction whose coordinator is gone (process dead or past its deadline) and that
//!   has no decision is *fenced*: an abort decision is recorded with no-replace semantics, so a
//!   slow coordinator can never commit it afterwards (presumed abort);
//! - every recorded decision not yet acknowledged by all its nodes is sent again (commit or
//!   abort; both are idempotent on the participants) until every node acknowledges it, then
//!   forgotten.

use crate::cluster::{join_all, Cluster};
use crate::commit::{deliver, DeliverError};
use std::time::Instant;
use tracing::{info, warn};
use txmap_common::decision::{DecisionLog, DecisionRecord, Verdict};
use txmap_common::proto::Request;

/// One pass. Returns what it finished, for logs and tests.
pub async fn redrive(cluster: &Cluster) -> Vec<String> {
    let log = DecisionLog::new(&cluster.cfg.state_dir);
    let mut done = Vec::new();
    for open in log.list_open() {
        if DecisionLog::coordinator_alive(&open) {
            continue;
        }
        match log.get(open.txid) {
            Ok(None) => {
                let rec = DecisionRecord::fence(
                    open.txid,
                    &open.table,
                    cluster
                        .cfg
                        .active_nodes()
                        .into_iter()
                        .map(|n| n.name)
                        .collect(),
                );
                match log.decide(&rec) {
                    Ok(d) => {
                        info!(txid = %open.txid, verdict = ?d.verdict, "coordinator gone before deciding: fenced")
                    }
                    Err(e) => warn!(txid = %open.txid, error = %e, "cannot fence"),
                }
            }
            Ok(Some(_)) => {}
            Err(e) => warn!(txid = %open.txid, error = %e, "unreadable decision"),
        }
        log.close(open.txid);
    }
    for rec in log.list() {
        if let Ok(Some(open)) = log.open_record(rec.txid) {
            if DecisionLog::coordinator_alive(&open) {
                continue; // its coordinator is still delivering it
            }
        }
        let req = match rec.verdict {
            Verdict::Commit => Request::Commit {
                table: rec.table.clone(),
                txid: rec.txid,
            },
            Verdict::Abort => Request::Abort {
                table: rec.table.clone(),
                txid: rec.txid,
            },
        };
        let nodes: Vec<_> = rec
            .nodes
            .iter()
            .filter_map(|n| cluster.cfg.node_by_name(n).cloned())
            .collect();
        let until = Instant::now() + cluster.cfg.timeouts.commit;
        let results = join_all(nodes.iter().map(|n| {
            let req = &req;
            async move {
                let link = cluster.connect(n).await;
                deliver(cluster, n, &link, req, until).await
            }
        }))
        .await;
        let failed = crate::commit::failures(&nodes, &results);
        // A node that answered and refused will refuse forever: sending again is pointless.
        let retry = results
            .iter()
            .any(|r| matches!(r, Err(DeliverError::Unreachable(_))));
        if !failed.is_empty() && !retry {
            warn!(txid = %rec.txid, verdict = ?rec.verdict, refusals = %failed.join("; "), "decision refused by nodes; giving up on it");
        }
        if !retry {
            match rec.verdict {
                Verdict::Commit => log.finish(rec.txid),
                Verdict::Abort => log.delivered(rec.txid),
            }
            if failed.is_empty() {
                info!(txid = %rec.txid, table = %rec.table, verdict = ?rec.verdict, "decision delivered to every node");
            }
            done.push(format!("{} {:?}", rec.txid, rec.verdict));
        } else {
            info!(txid = %rec.txid, verdict = ?rec.verdict, failed = %failed.join("; "), "decision not yet delivered everywhere");
        }
    }
    // Abort tombstones outlive any coordinator by far (deadlines are seconds).
    log.expire_tombstones(24 * 3600 * 1000);
    done
}
