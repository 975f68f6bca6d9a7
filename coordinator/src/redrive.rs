//! Finishing what a dead coordinator left on this node, run by `txmapd` in the background:
//!
//! - an open transaction whose coordinator is gone (its lock released, or past its deadline)
//!   and that has no decision is *fenced*: an abort decision is recorded with no-replace
//!   semantics, so a slow coordinator can never commit it afterwards (presumed abort); if a
//!   commit record is there already (the coordinator died, or could not tell whether its write
//!   succeeded), the commit stands and is delivered;
//! - every recorded decision not yet acknowledged by all its nodes is sent again, commits
//!   first and all in parallel, until every node of the transaction acknowledges it (see
//!   [`txmap_common::coordinator::delivery`]: a node that cannot install yet is asked again;
//!   only a definitive answer ends delivery). Then a commit is forgotten and an abort is kept
//!   as a tombstone for a day.

use crate::cluster::{join_all, Cluster, Link};
use crate::commit::{deliver, DeliverError};
use std::collections::HashMap;
use std::time::Instant;
use tracing::{error, info, warn};
use txmap_common::config::NodeConfig;
use txmap_common::decision::{DecisionLog, DecisionRecord, Verdict};
use txmap_common::proto::Request;

/// One pass. Returns what it finished, for logs and tests.
pub async fn redrive(cluster: &Cluster) -> Vec<String> {
    let log = DecisionLog::new(&cluster.cfg.state_dir);
    for open in log.list_open() {
        if log.coordinator_alive(&open) {
            continue;
        }
        let rec = DecisionRecord::fence(open.txid, &open.table, open.generation, open.nodes);
        match log.decide(&rec) {
            Ok(d) => {
                info!(txid = %open.txid, verdict = %d.verdict, "coordinator gone: its transaction's decision stands");
                log.close(open.txid);
            }
            // Keep the open record: the next pass tries again (the disk decides, never us).
            Err(e) => {
                warn!(txid = %open.txid, error = %e, "cannot settle a dead coordinator's transaction yet")
            }
        }
    }
    let pending: Vec<DecisionRecord> = log
        .list()
        .into_iter()
        .filter(|rec| match log.open_record(rec.txid) {
            // Its coordinator is still delivering it.
            Ok(Some(open)) => !log.coordinator_alive(&open),
            _ => true,
        })
        .collect();
    // One connection per node for the whole pass, dialled once: a node that is down costs
    // one connect timeout per pass, not one per record (a node down for a day can have
    // thousands of aborts waiting for it).
    let mut wanted: Vec<NodeConfig> = Vec::new();
    for rec in &pending {
        for n in rec.nodes.iter().filter_map(|n| cluster.cfg.node_by_name(n)) {
            if !wanted.iter().any(|w| w.name == n.name) {
                wanted.push(n.clone());
            }
        }
    }
    let dialled = join_all(wanted.iter().map(|n| cluster.connect(n))).await;
    let links: HashMap<String, Link> = wanted.iter().map(|n| n.name.clone()).zip(dialled).collect();
    let done = join_all(
        pending
            .iter()
            .map(|rec| redrive_one(cluster, &log, &links, rec)),
    )
    .await;
    // Abort tombstones outlive any coordinator by far (deadlines are seconds).
    log.expire_tombstones(24 * 3600 * 1000);
    done.into_iter().flatten().collect()
}

/// Delivers one decision to every node of its transaction; `Some` when that is over.
async fn redrive_one(
    cluster: &Cluster,
    log: &DecisionLog,
    links: &HashMap<String, Link>,
    rec: &DecisionRecord,
) -> Option<String> {
    let req = match rec.verdict {
        Verdict::Commit => Request::Commit {
            table: rec.table.clone(),
            txid: rec.txid,
            generation: rec.generation,
        },
        Verdict::Abort => Request::Abort {
            table: rec.table.clone(),
            txid: rec.txid,
            generation: rec.generation,
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
            match links.get(&n.name) {
                Some(link @ Ok(_)) => deliver(cluster, n, link, req, until).await,
                Some(Err(e)) => Err(DeliverError::NotYet(e.clone())),
                None => Err(DeliverError::NotYet("not dialled".into())),
            }
        }
    }))
    .await;
    let failed = crate::commit::failures(&nodes, &results);
    let again = results
        .iter()
        .any(|r| matches!(r, Err(DeliverError::NotYet(_))));
    if again {
        info!(txid = %rec.txid, verdict = %rec.verdict, failed = %failed.join("; "), "decision not yet acknowledged by every node; will send it again");
        return None;
    }
    if !failed.is_empty() {
        error!(txid = %rec.txid, verdict = %rec.verdict, nodes = %failed.join("; "), "a node holds the opposite outcome of a recorded decision");
    } else {
        info!(txid = %rec.txid, table = %rec.table, verdict = %rec.verdict, "decision delivered to every node");
    }
    match rec.verdict {
        Verdict::Commit => log.finish(rec.txid),
        Verdict::Abort => log.delivered(rec.txid),
    }
    Some(format!("{} {}", rec.txid, rec.verdict))
}
