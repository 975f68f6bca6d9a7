//! `txmap recover`: list in-doubt transactions on every node, and resolve one by hand without
//! ever contradicting a recorded decision.
//!
//! - `--abort TXID` asks the transaction's own nodes and its coordinator's node for the outcome
//!   *with fencing*: the coordinator's node fences a dead coordinator's transaction, and a member
//!   that can prove it never installed it fences it locally. It is refused when any of them
//!   reports it committed (or a commit decision exists), and unless the coordinator's node or a
//!   member vouches for the abort. Otherwise it sends `Abort` to those nodes.
//! - `--commit TXID` is accepted only when a commit decision exists or a node already committed
//!   it (it then re-drives the commit to every node). Anything else would be a guess.

use crate::cluster::{ask, join_all, Cluster};
use crate::commit::deliver;
use std::time::Instant;
use txmap_common::config::NodeConfig;
use txmap_common::coordinator::{may_recover, Heard};
use txmap_common::proto::{PreparedInfo, Request, Response};

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
            Ok(other) => unreachable.push(format!("{}: unexpected answer: {other}", n.name)),
            Err(e) => unreachable.push(format!("{}: {e}", n.name)),
        }
    }
    (found, unreachable)
}

/// Resolves `txid` by hand. `Ok(message)` when done; `Err(message)` when refused.
///
/// Only the transaction's own nodes (named in its prepare) and its coordinator's node are
/// asked and counted (see [`txmap_common::coordinator::may_recover`]): a node that never took
/// part can fence an unknown transaction, which proves nothing about the others.
pub async fn resolve(cluster: &Cluster, txid_text: &str, commit: bool) -> Result<String, String> {
    let txid = txmap_common::proto::TxId::parse(txid_text)
        .ok_or_else(|| format!("`{txid_text}` is not a transaction id (32 hex digits)"))?;
    crate::commit::may_coordinate(cluster)?;
    let (found, _) = list(cluster).await;
    let Some(first) = found.iter().find(|d| d.prepared.txid == txid).cloned() else {
        return Err(format!("no reachable node holds transaction {txid}"));
    };
    let table = first.table.clone();
    let p = first.prepared;
    let nodes: Vec<NodeConfig> = cluster
        .cfg
        .nodes
        .iter()
        .filter(|n| {
            p.nodes.iter().any(|m| m.eq_ignore_ascii_case(&n.name)) || n.name == p.coordinator
        })
        .cloned()
        .collect();
    let links = join_all(nodes.iter().map(|n| cluster.connect(n))).await;
    let q = Request::Outcome {
        table: table.clone(),
        txid,
        generation: p.generation,
        coordinator: p.coordinator.clone(),
        fence: !commit,
    };
    let answers = join_all(
        links
            .iter()
            .map(|l| ask(l, &q, cluster.cfg.timeouts.connect)),
    )
    .await;
    let mut heard = Vec::new();
    let mut lines = Vec::new();
    for (n, a) in nodes.iter().zip(&answers) {
        match a {
            Ok(Response::Outcome(x)) => {
                heard.push(Heard {
                    node: n.name.clone(),
                    member: p.nodes.iter().any(|m| m.eq_ignore_ascii_case(&n.name)),
                    coordinator: n.name == p.coordinator,
                    answer: *x,
                });
                lines.push(format!("{}: {x}", n.name));
            }
            Ok(other) => lines.push(format!("{}: {other}", n.name)),
            Err(e) => lines.push(format!("{}: unreachable: {e}", n.name)),
        }
    }
    let summary = lines.join("; ");
    let what = if commit { "commit" } else { "abort" };
    may_recover(commit, &heard).map_err(|why| {
        let note = if heard.iter().any(|h| h.coordinator) {
            String::new()
        } else {
            format!(
                "; the coordinator's node {} cannot be reached",
                p.coordinator
            )
        };
        format!("refusing to {what} {txid}: {why}{note} ({summary})")
    })?;
    let req = if commit {
        Request::Commit {
            table,
            txid,
            generation: p.generation,
        }
    } else {
        Request::Abort {
            table,
            txid,
            generation: p.generation,
        }
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
    if !nodes.is_empty() && failed.len() == nodes.len() {
        return Err(format!(
            "no node took the {} of {txid} from this node: {} (run recover on one of the transaction's nodes)",
            if commit { "commit" } else { "abort" },
            failed.join("; ")
        ));
    }
    if failed.is_empty() {
        Ok(format!("{txid} {what} on every node"))
    } else {
        Ok(format!(
            "{txid} {what}; not yet acknowledged by {} (they resolve it by themselves)",
            failed.join("; ")
        ))
    }
}
