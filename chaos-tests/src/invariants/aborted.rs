//! All or nothing (guarantee 2): an aborted transaction's content never appears on any node.
//!
//! Three rules, each sound on its own (see `docs/chaos.md` for why each holds in a correct
//! system even with pending retries, which may legitimately commit the same *content* later
//! under a new transaction):
//!
//! 1. **Reported aborts stay aborted.** A transaction id that `txmap commit` reported with
//!    exit 1 (aborted) or 4 (busy) is never committed in any node's journal or history.
//! 2. **One outcome per transaction.** No transaction is committed on one node and aborted
//!    (or presumed aborted) on another, or committed at two different generations.
//! 3. **Only committed contents are served.** Every version a node's live `.db` served (as the
//!    readers saw it, by its unique marker key) has its sha256 recorded as committed by some
//!    node (journal, `status` or history) at some time. A content that was only ever part of
//!    aborted transactions, and was replaced in the source before any retry committed it,
//!    is never recorded as committed: if a reader saw it, aborted content went live.

use super::journal::JournalLog;
use super::outcomes::CommitRun;
use super::visibility::VisibilityResult;
use super::{Tally, Versions};
use std::collections::BTreeMap;

/// Invariant name.
pub const NAME: &str = "aborted content never appears";

/// Applies the three rules.
pub fn check(
    runs: &[CommitRun],
    log: &JournalLog,
    seen: &VisibilityResult,
    versions: &Versions,
    end_ms: u64,
) -> Tally {
    let mut t = Tally::default();
    // 1. Reported aborts.
    for r in runs.iter().filter(|r| matches!(r.exit, Some(1 | 4))) {
        let Some(txid) = &r.txid else { continue };
        for (i, n) in log.nodes.iter().enumerate() {
            let c = n.outcomes.get(txid).and_then(|o| o.committed);
            t.check(c.is_none(), NAME, end_ms, || {
                format!(
                    "transaction {txid} was reported aborted (exit {:?}) but node{} committed it at generation {}: {}",
                    r.exit,
                    i + 1,
                    c.map(|x| x.0).unwrap_or(0),
                    r.describe()
                )
            });
        }
    }
    // 2. One outcome per transaction.
    // txid -> (node, generation it committed at there, aborted there), per node that knows it.
    type Seen = (usize, Option<u64>, bool);
    let mut by_txid: BTreeMap<&String, Vec<Seen>> = BTreeMap::new();
    for (i, n) in log.nodes.iter().enumerate() {
        for (txid, o) in &n.outcomes {
            by_txid.entry(txid).or_default().push((
                i + 1,
                o.committed.map(|c| c.0),
                o.aborted.is_some(),
            ));
        }
    }
    for (txid, v) in by_txid {
        let committed: Vec<u64> = v.iter().filter_map(|x| x.1).collect();
        let aborted: Vec<usize> = v.iter().filter(|x| x.2).map(|x| x.0).collect();
        let mut gens = committed.clone();
        gens.dedup();
        t.check(
            committed.is_empty() || (aborted.is_empty() && gens.len() == 1),
            NAME,
            end_ms,
            || {
                let who: Vec<String> = v
                    .iter()
                    .map(|(n, c, a)| match (c, a) {
                        (Some(g), true) => format!("node{n}: committed at {g} AND aborted"),
                        (Some(g), false) => format!("node{n}: committed at {g}"),
                        (None, _) => format!("node{n}: aborted"),
                    })
                    .collect();
                format!(
                    "transaction {txid} has different outcomes: {}",
                    who.join("; ")
                )
            },
        );
    }
    // 3. Only committed contents are served.
    let committed = log.committed_shas();
    let all = versions.all();
    for (i, served) in seen.served.iter().enumerate() {
        for (id, s) in served {
            let v = all.iter().find(|v| v.id == *id);
            let ok = v.is_some_and(|v| committed.binary_search(&v.sha256).is_ok());
            t.check(ok, NAME, s.first_ms, || {
                format!(
                    "node{} served version {id} (sha256 {}) from {:.1} s to {:.1} s ({} lookups), but no node ever recorded that content as committed",
                    i + 1,
                    v.map(|v| &v.sha256[..12]).unwrap_or("?"),
                    s.first_ms as f64 / 1000.0,
                    s.last_ms as f64 / 1000.0,
                    s.rounds
                )
            });
        }
    }
    t
}
