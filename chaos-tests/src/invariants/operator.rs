//! An operator's `txmap recover --abort|--commit TXID` never contradicts a decision (issue 9,
//! defect 2; guarantee 9 of `../shared/DESIGN.md`).
//!
//! The runner lists the in-doubt transactions (`txmap recover --json`) in the middle of a
//! commit and asks to resolve one of them by hand, either way. A refusal (exit 7) is always
//! acceptable; what is not:
//!
//! 1. an exit code other than 0 (done) or 7 (refused);
//! 2. `--abort T` done (exit 0) while T is committed on some node, installing on some node, or
//!    recorded `commit` in some decision log, at any time of the run;
//! 3. `--commit T` done (exit 0) while T is aborted on some node or recorded `abort` in some
//!    decision log, or while no node ever shows T committed by the end.
//!
//! Splits between nodes are judged by [`super::aborted`] (rule 2) whoever caused them.

use super::journal::JournalLog;
use super::Tally;

/// Invariant name.
pub const NAME: &str = "operator recover agrees";

/// One `txmap recover --abort|--commit TXID` the runner ran.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecoverRun {
    /// Step of the schedule.
    pub step: usize,
    /// Node whose config the operator used.
    pub from: usize,
    /// The transaction.
    pub txid: String,
    /// `--commit` (else `--abort`).
    pub commit: bool,
    /// Exit code (None: killed by a signal or not started).
    pub exit: Option<i32>,
    /// When it ran (ms since the start).
    pub at_ms: u64,
    /// Its output (stdout and stderr), for diagnostics.
    pub output: String,
}

impl RecoverRun {
    /// One line for reports.
    pub fn describe(&self) -> String {
        format!(
            "step {} recover --{} {} via node{}: exit {:?}: {}",
            self.step,
            if self.commit { "commit" } else { "abort" },
            self.txid,
            self.from,
            self.exit,
            self.output.trim().replace('\n', " | ")
        )
    }
}

/// Applies the three rules.
pub fn check(runs: &[RecoverRun], log: &JournalLog, end_ms: u64) -> Tally {
    let mut t = Tally::default();
    for r in runs {
        t.check(matches!(r.exit, Some(0 | 7)), NAME, r.at_ms, || {
            format!("unexpected exit code: {}", r.describe())
        });
        if r.exit != Some(0) {
            continue;
        }
        let mut against = Vec::new();
        let mut committed_somewhere = false;
        for (i, n) in log.nodes.iter().enumerate() {
            let o = n.outcomes.get(&r.txid).copied().unwrap_or_default();
            let decided = n.decisions.get(&r.txid).map(|d| d.0.as_str());
            committed_somewhere |= o.committed.is_some();
            if r.commit {
                if o.aborted.is_some() {
                    against.push(format!("node{} aborted it", i + 1));
                }
                if decided == Some("abort") {
                    against.push(format!("node{}'s decision log says abort", i + 1));
                }
            } else {
                if let Some((g, _)) = o.committed {
                    against.push(format!("node{} committed it at generation {g}", i + 1));
                }
                if n.installing.contains_key(&r.txid) {
                    against.push(format!("node{} was installing it", i + 1));
                }
                if decided == Some("commit") {
                    against.push(format!("node{}'s decision log says commit", i + 1));
                }
            }
        }
        if r.commit && !committed_somewhere {
            against.push("no node ever showed it committed".into());
        }
        t.check(against.is_empty(), NAME, end_ms, || {
            format!(
                "a recover contradicted the outcome ({}): {}",
                against.join("; "),
                r.describe()
            )
        });
    }
    t
}
