//! What every `txmap commit` answered, judged against what the journals show.
//!
//! - A commit nobody killed ends within `timeouts.total + timeouts.commit` plus a slack for
//!   process start-up (Sympa waits 20 s), with a documented exit code: 0, 1, 3 or 4 (and 6,
//!   local error, when a storage failpoint was armed in it).
//! - A commit coordinated by an out-of-service node fails, and its transaction is committed
//!   nowhere.
//! - Exit 0 (every node acknowledged): the transaction is committed on every in-service node.
//! - Exit 3 (decided, not acknowledged everywhere): by the end of the run (after recovery) it
//!   is committed on every in-service node: a reported decision is durable.
//!
//! Aborts (exit 1 and 4) are judged by [`super::aborted`].

use super::journal::JournalLog;
use super::Tally;
use std::time::Duration;

/// Invariant name.
pub const NAME: &str = "commit outcomes";

/// One `txmap commit` started by the runner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommitRun {
    /// Step of the schedule (`usize::MAX`: the fault-free commit of the setup).
    pub step: usize,
    /// Node whose config it used.
    pub coordinator: usize,
    /// Source version it was started on (the file may change while it runs).
    pub version: u64,
    /// When it started (ms since the start).
    pub started_ms: u64,
    /// How long it ran.
    pub elapsed_ms: u64,
    /// Exit code (None: killed by a signal).
    pub exit: Option<i32>,
    /// The runner killed it on purpose (SIGKILL, or a `panic` failpoint it set).
    pub killed: bool,
    /// Last transaction it tried, from its `--json` report.
    pub txid: Option<String>,
    /// Generation it offered.
    pub generation: Option<u64>,
    /// Its per-node lines, for diagnostics.
    pub lines: Vec<String>,
    /// The in-service nodes when it ran, when they differ from the end's (a long outage takes
    /// a node out of service for a while): exit 0 is judged on these.
    pub members: Option<Vec<usize>>,
    /// A storage failpoint was armed in this process: exit 6 (local error) is documented.
    pub storage_fault: bool,
    /// Coordinated from an out-of-service node: it must not commit (exit 0 or 3 is a violation,
    /// and so is its transaction committed anywhere).
    pub out_of_service: bool,
    /// Its output mentions an injected failure (a storage failpoint fired in it).
    pub injected: bool,
    /// Nodes its last attempt sent a delta to (the others got the whole table).
    pub delta_nodes: u64,
}

impl CommitRun {
    /// One line for reports.
    pub fn describe(&self) -> String {
        let step = if self.step == usize::MAX {
            "setup".to_string()
        } else {
            format!("step {}", self.step)
        };
        format!(
            "{step} coordinator node{} exit {:?}{} txid {} gen {:?} after {} ms: {}",
            self.coordinator,
            self.exit,
            if self.killed {
                " (killed on purpose)"
            } else {
                ""
            },
            self.txid.as_deref().unwrap_or("-"),
            self.generation,
            self.elapsed_ms,
            self.lines.join("; ")
        )
    }
}

/// Judges every run; `nodes` are the in-service node numbers; `limit` is the longest a commit
/// may take.
pub fn check(
    runs: &[CommitRun],
    log: &JournalLog,
    nodes: &[usize],
    limit: Duration,
    end_ms: u64,
) -> Tally {
    let mut t = Tally::default();
    for r in runs {
        if r.killed {
            continue;
        }
        t.check(
            r.elapsed_ms <= limit.as_millis() as u64,
            NAME,
            r.started_ms,
            || {
                format!(
                    "a commit took {} ms, over the {} ms bound: {}",
                    r.elapsed_ms,
                    limit.as_millis(),
                    r.describe()
                )
            },
        );
        if r.out_of_service {
            t.check(
                !matches!(r.exit, Some(0 | 3) | None),
                NAME,
                r.started_ms,
                || {
                    format!(
                        "a commit coordinated by an out-of-service node did not fail: {}",
                        r.describe()
                    )
                },
            );
            if let Some(txid) = &r.txid {
                for (i, l) in log.nodes.iter().enumerate() {
                    let c = l.outcomes.get(txid).and_then(|o| o.committed);
                    t.check(c.is_none(), NAME, end_ms, || {
                        format!(
                            "node{} committed {txid}, coordinated by an out-of-service node: {}",
                            i + 1,
                            r.describe()
                        )
                    });
                }
            }
            continue;
        }
        let exit_ok = match r.exit {
            Some(0 | 1 | 3 | 4) => true,
            Some(6) => r.storage_fault,
            _ => false,
        };
        t.check(exit_ok, NAME, r.started_ms, || {
            format!(
                "a commit ended with an unexpected exit code: {}",
                r.describe()
            )
        });
        if !matches!(r.exit, Some(0 | 3)) {
            continue;
        }
        let Some(txid) = &r.txid else {
            // "Already served": no transaction, no new generation. Every node it asked must
            // have committed some transaction at the generation it reports.
            let served = r.exit == Some(0)
                && r.generation.is_some_and(|g| {
                    r.members.as_deref().unwrap_or(nodes).iter().all(|&n| {
                        log.nodes.get(n - 1).is_some_and(|l| {
                            l.outcomes
                                .values()
                                .any(|o| o.committed.is_some_and(|(cg, _)| cg == g))
                        })
                    })
                });
            t.check(served, NAME, r.started_ms, || {
                format!(
                    "a commit reported success without a txid, and not every node committed its generation: {}",
                    r.describe()
                )
            });
            continue;
        };
        for &n in r.members.as_deref().unwrap_or(nodes) {
            let committed = log
                .nodes
                .get(n - 1)
                .and_then(|l| l.outcomes.get(txid))
                .and_then(|o| o.committed);
            t.check(committed.is_some(), NAME, end_ms, || {
                format!(
                    "exit {:?} reported, yet node{n} never showed transaction {txid} committed: {}",
                    r.exit,
                    r.describe()
                )
            });
            if let (Some((g, _)), Some(offered)) = (committed, r.generation) {
                t.check(g == offered, NAME, end_ms, || {
                    format!("node{n} committed {txid} at generation {g}, the coordinator offered {offered}")
                });
            }
        }
    }
    t
}
