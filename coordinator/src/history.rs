//! `txmap history`, `txmap rollback` and `txmap verify`.
//!
//! A rollback is an ordinary two-phase commit whose content is an earlier generation's source,
//! fetched from a node that still holds it (verified against the sha256 recorded for that
//! generation, trying the next node's copy on a mismatch), so every node gets it even if
//! its own history lost it. It creates a new generation; history is never rewritten, so a
//! rollback can itself be rolled back.

use crate::cluster::{ask, join_all, Cluster};
use crate::commit::{commit_with, CommitReport, NodeReport};
use serde::Serialize;
use std::collections::BTreeMap;
use tracing::warn;
use txmap_common::exit;
use txmap_common::proto::{HistoryEntry, Request, Response};

/// One generation and the nodes that hold it.
#[derive(Debug, Clone, Serialize)]
pub struct Generation {
    /// What it is (as recorded by the first node that reported it).
    pub entry: HistoryEntry,
    /// Nodes holding a copy.
    pub nodes: Vec<String>,
    /// Nodes whose copy has another sha256 (should never happen).
    pub conflicting: Vec<String>,
}

/// The history of `table` across the cluster (or its in-service nodes), oldest first, plus the
/// nodes that could not be asked.
pub async fn history(
    cluster: &Cluster,
    table: &str,
    in_service_only: bool,
) -> (Vec<Generation>, Vec<String>) {
    let nodes = if in_service_only {
        cluster.cfg.active_nodes()
    } else {
        cluster.cfg.nodes.clone()
    };
    let links = join_all(
        nodes
            .iter()
            .map(|n| async { (n.clone(), cluster.connect(n).await) }),
    )
    .await;
    let req = Request::History {
        table: table.to_string(),
    };
    let answers = join_all(
        links
            .iter()
            .map(|(_, l)| ask(l, &req, cluster.cfg.timeouts.connect)),
    )
    .await;
    let mut gens: BTreeMap<u64, Generation> = BTreeMap::new();
    let mut unreachable = Vec::new();
    for ((n, _), a) in links.iter().zip(answers) {
        match a {
            Ok(Response::History(entries)) => {
                for e in entries {
                    let g = gens.entry(e.generation).or_insert_with(|| Generation {
                        entry: e.clone(),
                        nodes: vec![],
                        conflicting: vec![],
                    });
                    if g.entry.sha256 == e.sha256 {
                        g.nodes.push(n.name.clone());
                    } else {
                        g.conflicting.push(n.name.clone());
                    }
                }
            }
            Ok(Response::Refused(r)) => unreachable.push(format!("{}: {r}", n.name)),
            Ok(other) => unreachable.push(format!("{}: unexpected answer: {other}", n.name)),
            Err(e) => unreachable.push(format!("{}: {e}", n.name)),
        }
    }
    (gens.into_values().collect(), unreachable)
}

/// Rolls `table` back to generation `to` (default: the newest one below the live generation).
pub async fn rollback(cluster: &Cluster, table: &str, to: Option<u64>) -> CommitReport {
    let fail = |code: u8, detail: String| CommitReport {
        table: table.to_string(),
        txid: None,
        generation: None,
        exit: code,
        attempts: 0,
        elapsed_ms: 0,
        nodes: vec![NodeReport {
            node: cluster.cfg.node.clone(),
            ok: false,
            detail,
        }],
        refused_content: None,
        bytes_sent: 0,
        delta_nodes: 0,
        content_rejected: false,
    };
    let (gens, unreachable) = history(cluster, table, true).await;
    if !unreachable.is_empty() {
        return fail(
            exit::ABORTED,
            format!(
                "nothing changed: cannot read every node's history ({})",
                unreachable.join("; ")
            ),
        );
    }
    let live = gens.iter().map(|g| g.entry.generation).max().unwrap_or(0);
    let live_sha = gens
        .iter()
        .find(|g| g.entry.generation == live)
        .map(|g| g.entry.sha256);
    // Without `--to`: the newest earlier generation whose content differs from the live one
    // (a generation that restored the same bytes is no step back).
    let target = match to {
        Some(g) => gens.iter().find(|x| x.entry.generation == g),
        None => gens
            .iter()
            .rev()
            .find(|x| x.entry.generation < live && Some(x.entry.sha256) != live_sha),
    };
    if let Some(t) = target {
        if Some(t.entry.sha256) == live_sha {
            return fail(
                exit::USAGE,
                format!(
                    "refused: generation {} has exactly the content live now (generation {live}, sha256 {}): a rollback to it would change nothing",
                    t.entry.generation,
                    &t.entry.sha256.to_string()[..16]
                ),
            );
        }
        let when = humantime::format_rfc3339_seconds(
            std::time::UNIX_EPOCH + std::time::Duration::from_millis(t.entry.committed_at_ms),
        );
        eprintln!(
            "txmap: rollback {table}: restoring the content of generation {} (committed {when} by {}, {} entries, sha256 {}) as a new generation above {live}",
            t.entry.generation,
            t.entry.coordinator,
            t.entry.entries,
            &t.entry.sha256.to_string()[..16]
        );
    }
    let Some(target) = target.cloned() else {
        let held: Vec<String> = gens
            .iter()
            .map(|g| g.entry.generation.to_string())
            .collect();
        let what = to
            .map(|g| format!("generation {g}"))
            .unwrap_or_else(|| "an earlier generation with other content than the live one".into());
        return fail(
            exit::USAGE,
            format!(
                "no node holds {what} of `{table}` (held: {})",
                held.join(", ")
            ),
        );
    };
    // Ship the content from a node that has it: fetched once, verified, then committed as usual.
    let tmp = cluster
        .cfg
        .state_dir
        .join(format!(".rollback-{table}-{}.tmp", target.entry.generation));
    // A copy is accepted only if its sha256 is the one recorded for that generation in
    // history, not merely the one the serving node announces (its copy may be damaged or
    // tampered with): a mismatch is reported and the next node's copy is tried.
    let want = target.entry.sha256;
    let mut fetched = Err("no node could send it".to_string());
    let mut bad = Vec::new();
    for name in &target.nodes {
        let Some(node) = cluster.cfg.node_by_name(name) else {
            continue;
        };
        let Ok(conn) = cluster.connect(node).await else {
            bad.push(format!("{name}: unreachable"));
            continue;
        };
        let req = Request::Fetch {
            table: table.to_string(),
            generation: target.entry.generation,
        };
        let _ = std::fs::remove_file(&tmp);
        match txmap_common::net::fetch(&conn, &req, &tmp).await {
            Ok(Response::Source { .. }) => match txmap_common::table::digest_file(&tmp) {
                Ok(d) if d.sha256 == want.0 => {
                    fetched = Ok(());
                    break;
                }
                Ok(d) => {
                    let why = format!(
                        "{name}: its copy of generation {} has sha256 {}, not the recorded {want}; refused",
                        target.entry.generation,
                        txmap_common::table::hex(&d.sha256)
                    );
                    warn!("{why}");
                    bad.push(why);
                }
                Err(e) => bad.push(format!("{name}: {e}")),
            },
            Ok(other) => bad.push(format!("{name}: {other}")),
            Err(e) => bad.push(format!("{name}: {e}")),
        }
    }
    if fetched.is_err() && !bad.is_empty() {
        fetched = Err(bad.join("; "));
    }
    if let Err(e) = fetched {
        let _ = std::fs::remove_file(&tmp);
        return fail(
            exit::ABORTED,
            format!(
                "nothing changed: cannot fetch generation {}: {e}",
                target.entry.generation
            ),
        );
    }
    // A rollback restores an earlier content on purpose: past the content guard. It is a new
    // change of this node's table (its own counter): a pending retry of an older change made
    // here never undoes it.
    let change =
        match txmap_common::decision::DecisionLog::new(&cluster.cfg.state_dir).next_change(table) {
            Ok(c) => c,
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                return crate::commit::count_failed(cluster, table, e);
            }
        };
    let report = commit_with(cluster, table, &tmp, true, Some(change)).await;
    let _ = std::fs::remove_file(&tmp);
    report
}

/// One node's verification of one table.
#[derive(Debug, Clone, Serialize)]
pub struct Verification {
    /// Node.
    pub node: String,
    /// Table.
    pub table: String,
    /// Generation recorded there.
    pub generation: Option<u64>,
    /// Drift found (empty: as recorded).
    pub problems: Vec<String>,
}

/// Asks every node to check its live files against the recorded generation.
pub async fn verify(cluster: &Cluster, tables: &[String]) -> Vec<Verification> {
    let links = cluster.connect_all().await;
    let mut out = Vec::new();
    for table in tables {
        let req = Request::Verify {
            table: table.clone(),
        };
        let answers = join_all(
            links
                .iter()
                .map(|(_, l)| ask(l, &req, cluster.cfg.timeouts.prepare)),
        )
        .await;
        for ((n, _), a) in links.iter().zip(answers) {
            let (generation, problems) = match a {
                Ok(Response::Verified {
                    generation,
                    problems,
                }) => (Some(generation), problems),
                Ok(Response::Refused(r)) => (None, vec![r.to_string()]),
                Ok(other) => (None, vec![format!("unexpected answer: {other}")]),
                Err(e) => (None, vec![format!("unreachable: {e}")]),
            };
            out.push(Verification {
                node: n.name.clone(),
                table: table.clone(),
                generation,
                problems,
            });
        }
    }
    out
}
