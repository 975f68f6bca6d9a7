//! All or nothing (guarantee 2): an aborted transaction's content never appears on any node.
//!
//! Three rules, each sound on its own (see `docs/chaos.md` for why each holds in a correct
//! system even with pending retries, which may legitimately commit the same *content* later
//! under a new transaction):
//!
//! 1. **Reported aborts stay aborted.** A transaction id that `txmap commit` reported with
//!    exit 1 (aborted) or 4 (busy) is never committed in any node's journal or history.
//! 2. **One outcome per transaction.** No transaction is committed on one node and aborted
//!    (or presumed aborted) on another, or committed at two different generations. Every
//!    node's journal (its outcomes, sampled every 50 ms, and a transaction seen *Installing*,
//!    which only a commit decision leads to), history and decision log (`commit`/`abort`
//!    records) count, on every node, out-of-service ones included.
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
    // 2. One outcome per transaction, from every node's journal (outcomes and the *Installing*
    // phase, which only a commit decision leads to), history and decision log.
    #[derive(Default)]
    struct Seen {
        committed: Vec<(usize, u64)>,
        aborted: Vec<usize>,
        installing: Vec<usize>,
        decided: Vec<(usize, String)>,
    }
    let mut by_txid: BTreeMap<&String, Seen> = BTreeMap::new();
    for (i, n) in log.nodes.iter().enumerate() {
        for (txid, o) in &n.outcomes {
            let e = by_txid.entry(txid).or_default();
            if let Some((g, _)) = o.committed {
                e.committed.push((i + 1, g));
            }
            if o.aborted.is_some() {
                e.aborted.push(i + 1);
            }
        }
        for txid in n.installing.keys() {
            by_txid.entry(txid).or_default().installing.push(i + 1);
        }
        for (txid, (verdict, _)) in &n.decisions {
            by_txid
                .entry(txid)
                .or_default()
                .decided
                .push((i + 1, verdict.clone()));
        }
    }
    for (txid, v) in by_txid {
        let mut gens: Vec<u64> = v.committed.iter().map(|c| c.1).collect();
        gens.sort();
        gens.dedup();
        let commit_side = !v.committed.is_empty()
            || !v.installing.is_empty()
            || v.decided.iter().any(|d| d.1 == "commit");
        let abort_side = !v.aborted.is_empty() || v.decided.iter().any(|d| d.1 == "abort");
        t.check(
            !(commit_side && abort_side) && gens.len() <= 1,
            NAME,
            end_ms,
            || {
                let mut who: Vec<String> = Vec::new();
                for (n, g) in &v.committed {
                    who.push(format!("node{n}: committed at {g}"));
                }
                for n in &v.installing {
                    who.push(format!("node{n}: installing (received commit)"));
                }
                for n in &v.aborted {
                    who.push(format!("node{n}: aborted"));
                }
                for (n, d) in &v.decided {
                    who.push(format!("node{n}: decision log says {d}"));
                }
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
