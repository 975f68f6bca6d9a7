//! No stuck state (guarantee 5): once the faults stop and recovery has run, nothing is left
//! behind on any node: no staged file in the table directory, no held table lock, no
//! transaction prepared, no pending commit, no decision still waiting to be delivered, no open
//! coordinator record. (Half-made history copies are reported as findings.)

use super::{Clock, Tally};
use crate::cluster::{TestCluster, TABLE};
use txmap_common::decision::DecisionLog;

/// Invariant name.
pub const NAME: &str = "no staged files, no held locks";

/// Everything left behind on node `i`, one line each (empty: clean). `status` is the parsed
/// `txmap status --json` answer, used for the prepared transaction.
pub fn leftovers(c: &TestCluster, i: usize, status: &serde_json::Value) -> Vec<String> {
    let mut out = Vec::new();
    let staged = c.staged_files(i);
    if !staged.is_empty() {
        out.push(format!("node{i}: staged files left: {staged:?}"));
    }
    if !c.lock_free(i) {
        out.push(format!("node{i}: the table lock is held"));
    }
    let t = table_status(status, i);
    match t {
        None => out.push(format!("node{i}: no status (unreachable?)")),
        Some(t) => {
            if !t.get("prepared").is_some_and(|p| p.is_null()) {
                out.push(format!(
                    "node{i}: a transaction is still in progress: {}",
                    t["prepared"]
                ));
            }
        }
    }
    let state = c.node_dir(i).join("state");
    let log = DecisionLog::new(&state);
    if let Some(p) = log.pending(TABLE) {
        out.push(format!(
            "node{i}: pending commit since {} ms ({} attempts): {}",
            p.since_ms, p.attempts, p.last_error
        ));
    }
    let open = log.list_open();
    if !open.is_empty() {
        out.push(format!(
            "node{i}: {} open coordinator record(s)",
            open.len()
        ));
    }
    let undelivered = log.list();
    if !undelivered.is_empty() {
        let v: Vec<String> = undelivered
            .iter()
            .map(|d| format!("{} {:?}", d.txid, d.verdict))
            .collect();
        out.push(format!(
            "node{i}: decisions not yet delivered: {}",
            v.join(", ")
        ));
    }
    out
}

/// Copies of the history left half-made on node `i` (`<state>/history/<table>/.tx-<txid>`).
///
/// Not a guarantee of DESIGN.md (history is for operators, and it never blocks a table), so
/// these are reported as findings, not violations.
pub fn history_leftovers(c: &TestCluster, i: usize) -> Vec<String> {
    let hist = c.node_dir(i).join("state").join("history").join(TABLE);
    std::fs::read_dir(&hist)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(".tx-"))
                .map(|n| {
                    format!(
                        "node{i}: unfinished history copy {}",
                        hist.join(n).display()
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// The status of `TABLE` on node `i` (1-based) in a `status --json` answer.
pub fn table_status(status: &serde_json::Value, i: usize) -> Option<&serde_json::Value> {
    let n = status.as_array()?.get(i - 1)?;
    if n.get("reachable").and_then(|r| r.as_bool()) != Some(true) {
        return None;
    }
    n.get("tables")?
        .as_array()?
        .iter()
        .find(|t| t.get("table").and_then(|x| x.as_str()) == Some(TABLE))
}

/// One check per node: nothing left behind.
pub fn check(c: &TestCluster, nodes: &[usize], status: &serde_json::Value, clock: Clock) -> Tally {
    let mut t = Tally::default();
    for &i in nodes {
        let left = leftovers(c, i, status);
        t.check(left.is_empty(), NAME, clock.ms(), || left.join("; "));
    }
    t
}
