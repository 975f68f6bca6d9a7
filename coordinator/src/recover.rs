//! `txmap recover`: list in-doubt transactions on every node, and resolve one by hand without
//! ever contradicting a recorded decision.
//!
//! - `--abort TXID` asks every node for the outcome *with fencing*: the coordinator's node
//!   fences a dead coordinator's transaction, and a node that never prepared it fences it
//!   locally. It is refused when any node reports it committed (or a commit decision exists),
//!   and when every node is prepared and the coordinator's node cannot be reached (only that
//!   node may know it decided commit). Otherwise it sends `Abort` everywhere.
//! - `--commit TXID` is accepted only when a commit decision exists or a node already committed
//!   it (it then re-drives the commit to every node). Anything else would be a guess.

use crate::cluster::{ask, join_all, Cluster};
use crate::commit::deliver;
use std::time::Instant;
use txmap_common::proto::{OutcomeAnswer, PreparedInfo, Request, Response};

/// A transaction found prepared (or staging) on some node.
#[derive(Debug, Clone, serde::Serialize)]
pub struct InDoubt {
    /// Node holding it.
    pub node: String,
    /// Table.
    pub table: String,
    /// What it holds.
    pub prepared: PreparedInfo,
}

/// Every transaction in progress on every reachable node, and the nodes that could not be asked.
pub async fn list(cluster: &Cluster) -> (Vec<InDoubt>, Vec<String>) {
    let links = cluster.connect_all().await;
    let req = Request::Status { table: None };
    let answers = join_all(
        links
            .iter()
            .map(|(_, l)| ask(l, &req, cluster.cfg.timeouts.connect)),
    )
    .await;
    let mut found = Vec::new();
    let mut unreachable = Vec::new();
    for ((n, _), a) in links.iter().zip(answers) {
        match a {
            Ok(Response::Status(tables)) => {
                for t in tables {
                    if let Some(p) = t.prepared {
                        found.push(InDoubt {
                            node: n.name.clone(),
                            table: t.table,
                            prepared: p,
                        });
                    }
                }
            }
            Ok(other) => unreachable.push(format!("{}: unexpected answer {other:?}", n.name)),
            Err(e) => unreachable.push(format!("{}: {e}", n.name)),
        }
    }
    (found, unreachable)
}

/// Resolves `txid` by hand. `Ok(message)` when done; `Err(message)` when refused.
pub async fn resolve(cluster: &Cluster, txid_text: &str, commit: bool) -> Result<String, String> {
    let txid = txmap_common::proto::TxId::parse(txid_text)
        .ok_or_else(|| format!("`{txid_text}` is not a transaction id (32 hex digits)"))?;
    let (found, _) = list(cluster).await;
    let Some(first) = found.iter().find(|d| d.prepared.txid == txid).cloned() else {
        return Err(format!("no reachable node holds transaction {txid}"));
    };
    let table = first.table.clone();
    let coordinator = first.prepared.coordinator.clone();
    let nodes = cluster.cfg.nodes.clone();
    let links = join_all(nodes.iter().map(|n| cluster.connect(n))).await;
    let q = Request::Outcome {
        table: table.clone(),
        txid,
        fence: !commit,
    };
    let answers = join_all(
        links
            .iter()
            .map(|l| ask(l, &q, cluster.cfg.timeouts.connect)),
    )
    .await;
    let mut committed = false;
    let mut aborted = false;
    let mut pending = false;
    let mut coordinator_reached = false;
    let mut lines = Vec::new();
    for (n, a) in nodes.iter().zip(&answers) {
        match a {
            Ok(Response::Outcome(x)) => {
                if n.name == coordinator {
                    coordinator_reached = true;
                }
                committed |= matches!(x, OutcomeAnswer::Committed { .. });
                aborted |= matches!(x, OutcomeAnswer::Aborted);
                pending |= matches!(x, OutcomeAnswer::Pending);
                lines.push(format!("{}: {x:?}", n.name));
            }
            Ok(other) => lines.push(format!("{}: {other:?}", n.name)),
            Err(e) => lines.push(format!("{}: unreachable: {e}", n.name)),
        }
    }
    let summary = lines.join("; ");
    if pending {
        return Err(format!(
            "the coordinator of {txid} is still at work; try again shortly ({summary})"
        ));
    }
    if commit && !committed {
        return Err(format!(
            "refusing to commit {txid}: no reachable node reports a commit decision (if the coordinator's node is down, it may hold one: bring it back) ({summary})"
        ));
    }
    if !commit && committed {
        return Err(format!(
            "refusing to abort {txid}: it was decided commit ({summary})"
        ));
    }
    if !commit && !aborted && !coordinator_reached {
        return Err(format!(
            "refusing to abort {txid}: every reachable node is prepared and the coordinator's node {coordinator} \
             cannot be reached; only it knows whether it decided commit ({summary})"
        ));
    }
    let req = if commit {
        Request::Commit { table, txid }
    } else {
        Request::Abort { table, txid }
    };
    let until = Instant::now() + cluster.cfg.timeouts.commit;
    let results = join_all(
        nodes
            .iter()
            .zip(&links)
            .map(|(n, l)| deliver(cluster, n, l, &req, until)),
    )
    .await;
    let failed = crate::commit::failures(&nodes, &results);
    let what = if commit { "committed" } else { "aborted" };
    if failed.is_empty() {
        Ok(format!("{txid} {what} on every node"))
    } else {
        Ok(format!(
            "{txid} {what}; not yet acknowledged by {} (they resolve it by themselves)",
            failed.join("; ")
        ))
    }
}
