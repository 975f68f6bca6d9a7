//! One attempt of `txmap commit` (one transaction) as a state machine: events in, actions out,
//! no I/O and no clock (whether the deadline has passed comes in with the event that needs it).
//!
//! The shell (`coordinator/src/commit.rs`) reads the statuses, writes the open record, then
//! drives an [`Attempt`]: it executes each [`Act`] (send, write the decision, finish the log)
//! and feeds what came of it back as an [`Event`]. The model checker (`chaos-tests/src/model`)
//! drives the very same machine, one message, crash or failed write at a time. The rules it
//! applies are those of [`crate::coordinator`]: [`on_votes`], [`after_decision_write`] and
//! [`delivery`](crate::coordinator::delivery).
//!
//! ```text
//! start ──SendPrepares──▶ Preparing ──Decide──▶ WritingCommit ──CommitWritten──▶ Delivering(commit)
//!                              │                      │ (read back: abort / unsure)   │
//!                              └──Decide──▶ WritingAbort ──AbortWritten──▶ Delivering(abort)
//!                                  (or straight to Delivering(abort))                 │
//!                                                                    DeliveryOver ──▶ Over
//! ```

use crate::coordinator::{after_decision_write, on_votes, AfterWrite, Delivery};
use crate::coordinator::{OnVotes, WriteResult};
use crate::decision::Verdict;
use crate::machine::Vote;

/// Where an attempt is.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Phase {
    /// Collecting votes. `sent`: prepares went to every node (otherwise some status failed and
    /// nothing was sent; every vote is already in).
    Preparing {
        /// One slot per node.
        votes: Vec<Option<Vote>>,
        /// Prepares were sent.
        sent: bool,
    },
    /// The commit record is being written (linked, no-replace, then made durable).
    WritingCommit,
    /// An abort record is being written before the abort is sent.
    WritingAbort {
        /// Every refusal was a conflict: try again afterwards.
        retry: bool,
    },
    /// Delivering the decision to every node.
    Delivering {
        /// What is delivered.
        verdict: Verdict,
        /// Nodes that acknowledged it.
        acked: Vec<bool>,
        /// Nodes that answered definitively (acknowledged or contradicted; for an abort, any
        /// answer: it is best effort).
        done: Vec<bool>,
        /// An abort record was written (commit: always recorded).
        recorded: bool,
        /// Every refusal was a conflict: try again afterwards.
        retry: bool,
    },
    /// Finished.
    Over(Ending),
}

/// How an attempt ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Ending {
    /// Commit decided and acknowledged by every node.
    Committed,
    /// Commit decided; some node has not acknowledged yet (its node's txmapd re-drives it).
    Incomplete,
    /// Aborted. `retry`: every refusal was a conflict; try again with a new transaction.
    Aborted {
        /// Try again.
        retry: bool,
    },
    /// The commit record may or may not be durable: nothing was sent and the open record stays;
    /// the node's recovery settles it from the disk.
    Unsure,
}

/// What happened, as the shell tells it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Node `node` voted (the first vote counts; later ones and late ones are ignored).
    Vote {
        /// Node index.
        node: usize,
        /// Its vote.
        vote: Vote,
    },
    /// The prepare deadline passed: missing votes count as unreachable.
    VoteTimeout,
    /// Decide now (every vote in, or the deadline passed). `past_deadline`: the command's own
    /// deadline has passed (its node's recovery may have fenced the transaction).
    Decide {
        /// The overall deadline has passed.
        past_deadline: bool,
    },
    /// The commit record write ended so.
    CommitWritten(WriteResult),
    /// The abort record write ended (`true`: recorded).
    AbortWritten(bool),
    /// Node `node` answered the delivered decision so (classified by
    /// [`delivery`](crate::coordinator::delivery)).
    Answer {
        /// Node index.
        node: usize,
        /// Its answer, classified.
        answer: Delivery,
    },
    /// Delivery stops (every node answered, or the deadline passed).
    DeliveryOver,
}

/// What the shell must do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Act {
    /// Send the prepare to every node, then report each [`Event::Vote`] and [`Event::Decide`].
    SendPrepares,
    /// Write the commit record (hard link, no replace; then fsync the directory) and report
    /// [`Event::CommitWritten`] (after a failure, with what reading it back found).
    WriteCommit,
    /// Record the abort (a fence) and report [`Event::AbortWritten`].
    WriteAbort,
    /// Send this decision to every node; report each [`Event::Answer`], then
    /// [`Event::DeliveryOver`].
    Deliver(Verdict),
    /// The commit reached every node: keep its record as a finished tombstone.
    Finish,
    /// The recorded abort reached every node: mark it delivered.
    MarkDelivered,
    /// Remove the open record (this process is done with the transaction).
    Close,
}

/// One attempt.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Attempt {
    /// Nodes of the transaction (indices `0..nodes` in events).
    pub nodes: usize,
    /// Where it is.
    pub phase: Phase,
}

impl Attempt {
    /// Starts an attempt over `early.len()` nodes once its open record is written. `early[i]`:
    /// node `i`'s status already failed (that is its vote). When any did, nothing is sent: the
    /// others count as not asked and the attempt waits only for [`Event::Decide`].
    pub fn start(early: Vec<Option<Vote>>) -> (Attempt, Vec<Act>) {
        let sent = early.iter().all(Option::is_none);
        let votes = if sent {
            early
        } else {
            early
                .into_iter()
                .map(|v| {
                    v.or_else(|| {
                        Some(Vote::Unreachable(
                            "not asked: another node failed first".into(),
                        ))
                    })
                })
                .collect()
        };
        let acts = if sent {
            vec![Act::SendPrepares]
        } else {
            vec![]
        };
        (
            Attempt {
                nodes: votes.len(),
                phase: Phase::Preparing { votes, sent },
            },
            acts,
        )
    }

    /// Whether node `node`'s vote is still awaited.
    pub fn awaits_vote(&self, node: usize) -> bool {
        matches!(&self.phase, Phase::Preparing { votes, .. } if votes.get(node).is_some_and(Option::is_none))
    }

    /// Whether every vote is in.
    pub fn votes_in(&self) -> bool {
        matches!(&self.phase, Phase::Preparing { votes, .. } if votes.iter().all(Option::is_some))
    }

    /// The verdict being delivered, if delivering.
    pub fn delivering(&self) -> Option<Verdict> {
        match &self.phase {
            Phase::Delivering { verdict, .. } => Some(*verdict),
            _ => None,
        }
    }

    /// Whether a commit is being delivered and node `node` has not answered definitively (the
    /// shell sends it again).
    pub fn resend_to(&self, node: usize) -> bool {
        matches!(&self.phase, Phase::Delivering { verdict: Verdict::Commit, done, .. }
            if done.get(node).is_some_and(|d| !d))
    }

    /// How it ended, once over.
    pub fn ending(&self) -> Option<Ending> {
        match self.phase {
            Phase::Over(e) => Some(e),
            _ => None,
        }
    }

    fn deliver(&mut self, verdict: Verdict, n: usize, recorded: bool, retry: bool) -> Vec<Act> {
        self.phase = Phase::Delivering {
            verdict,
            acked: vec![false; n],
            done: vec![false; n],
            recorded,
            retry,
        };
        vec![Act::Deliver(verdict)]
    }

    /// Takes one event; returns what to do. An event that does not fit the phase (a late vote,
    /// an answer to an earlier delivery) changes nothing.
    pub fn step(&mut self, ev: Event) -> Vec<Act> {
        let nodes = self.nodes;
        match (&mut self.phase, ev) {
            (Phase::Preparing { votes, .. }, Event::Vote { node, vote }) => {
                if let Some(slot @ None) = votes.get_mut(node) {
                    *slot = Some(vote);
                }
                vec![]
            }
            (Phase::Preparing { votes, .. }, Event::VoteTimeout) => {
                for v in votes.iter_mut().filter(|v| v.is_none()) {
                    *v = Some(Vote::Unreachable("timeout".into()));
                }
                vec![]
            }
            (Phase::Preparing { votes, sent }, Event::Decide { past_deadline }) => {
                let votes: Vec<Vote> = votes
                    .iter()
                    .map(|v| v.clone().unwrap_or(Vote::Unreachable("no vote".into())))
                    .collect();
                let sent = vec![*sent; votes.len()];
                match on_votes(&votes, &sent, past_deadline) {
                    OnVotes::LogCommit => {
                        self.phase = Phase::WritingCommit;
                        vec![Act::WriteCommit]
                    }
                    OnVotes::Abort {
                        record: true,
                        retry,
                    } => {
                        self.phase = Phase::WritingAbort { retry };
                        vec![Act::WriteAbort]
                    }
                    OnVotes::Abort {
                        record: false,
                        retry,
                    } => self.deliver(Verdict::Abort, nodes, false, retry),
                }
            }
            (Phase::WritingCommit, Event::CommitWritten(w)) => match after_decision_write(w) {
                AfterWrite::Commit => self.deliver(Verdict::Commit, nodes, true, false),
                AfterWrite::Abort => self.deliver(Verdict::Abort, nodes, false, false),
                // Send nothing; leave the open record.
                AfterWrite::Unsure => {
                    self.phase = Phase::Over(Ending::Unsure);
                    vec![]
                }
            },
            (Phase::WritingAbort { retry }, Event::AbortWritten(recorded)) => {
                let retry = *retry;
                self.deliver(Verdict::Abort, nodes, recorded, retry)
            }
            (
                Phase::Delivering {
                    verdict,
                    acked,
                    done,
                    ..
                },
                Event::Answer { node, answer },
            ) => {
                if node < acked.len() {
                    match (*verdict, answer) {
                        // `deliver`: retried until a definitive answer.
                        (Verdict::Commit, Delivery::Acked) => {
                            (acked[node], done[node]) = (true, true)
                        }
                        (Verdict::Commit, Delivery::Contradicts(_)) => done[node] = true,
                        (Verdict::Commit, Delivery::Retry(_)) => {}
                        // An abort is best effort: one answer each.
                        (Verdict::Abort, a) => {
                            acked[node] |= a == Delivery::Acked;
                            done[node] = true;
                        }
                    }
                }
                vec![]
            }
            (
                Phase::Delivering {
                    verdict,
                    acked,
                    recorded,
                    retry,
                    ..
                },
                Event::DeliveryOver,
            ) => {
                let all = acked.iter().all(|a| *a);
                let (acts, ending) = match *verdict {
                    Verdict::Commit if all => (vec![Act::Finish, Act::Close], Ending::Committed),
                    Verdict::Commit => (vec![Act::Close], Ending::Incomplete),
                    Verdict::Abort if all && *recorded => (
                        vec![Act::MarkDelivered, Act::Close],
                        Ending::Aborted { retry: *retry },
                    ),
                    Verdict::Abort => (vec![Act::Close], Ending::Aborted { retry: *retry }),
                };
                self.phase = Phase::Over(ending);
                acts
            }
            _ => vec![],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{Refusal, TxId};

    fn run(a: &mut Attempt, evs: Vec<Event>) -> Vec<Act> {
        evs.into_iter().flat_map(|e| a.step(e)).collect()
    }

    /// Every node votes `vote`, then the coordinator decides (within its deadline).
    fn votes(vote: Vote) -> Vec<Event> {
        (0..3)
            .map(|node| Event::Vote {
                node,
                vote: vote.clone(),
            })
            .chain([Event::Decide {
                past_deadline: false,
            }])
            .collect()
    }

    /// Every node answers the delivery so, then delivery stops.
    fn answers(answer: Delivery) -> Vec<Event> {
        (0..3)
            .map(|node| Event::Answer {
                node,
                answer: answer.clone(),
            })
            .chain([Event::DeliveryOver])
            .collect()
    }

    /// An attempt whose nodes all prepared, writing its commit record.
    fn writing_commit() -> Attempt {
        let (mut a, acts) = Attempt::start(vec![None, None, None]);
        assert_eq!(acts, vec![Act::SendPrepares]);
        assert_eq!(run(&mut a, votes(Vote::Prepared)), vec![Act::WriteCommit]);
        a
    }

    fn busy() -> Vote {
        Vote::Refused(Refusal::Busy {
            txid: TxId(9),
            generation: 1,
        })
    }

    #[test]
    fn every_vote_prepared_commits_and_finishes() {
        let mut a = writing_commit();
        assert_eq!(
            a.step(Event::CommitWritten(WriteResult::Stands(Verdict::Commit))),
            vec![Act::Deliver(Verdict::Commit)]
        );
        // A retryable answer leaves the node to be asked again.
        a.step(Event::Answer {
            node: 1,
            answer: Delivery::Retry("storage".into()),
        });
        assert!(a.resend_to(1));
        assert_eq!(
            run(&mut a, answers(Delivery::Acked)),
            vec![Act::Finish, Act::Close]
        );
        assert!(!a.resend_to(1));
        assert_eq!(a.ending(), Some(Ending::Committed));
    }

    #[test]
    fn an_unacknowledged_commit_keeps_its_record_and_a_late_vote_changes_nothing() {
        let (mut a, _) = Attempt::start(vec![None, None, None]);
        a.step(Event::Vote {
            node: 0,
            vote: Vote::Prepared,
        });
        // Only the first vote counts; the rest as usual.
        assert_eq!(run(&mut a, votes(busy())), vec![Act::WriteAbort]);
        let mut b = writing_commit();
        b.step(Event::CommitWritten(WriteResult::Stands(Verdict::Commit)));
        b.step(Event::Answer {
            node: 0,
            answer: Delivery::Acked,
        });
        assert_eq!(b.step(Event::DeliveryOver), vec![Act::Close]);
        assert_eq!(b.ending(), Some(Ending::Incomplete));
        // A vote after the decision changes nothing.
        assert!(b
            .step(Event::Vote {
                node: 1,
                vote: busy()
            })
            .is_empty());
        assert_eq!(b.ending(), Some(Ending::Incomplete));
    }

    #[test]
    fn a_failed_status_sends_nothing_and_aborts_without_a_record() {
        let (mut a, acts) =
            Attempt::start(vec![None, Some(Vote::Unreachable("down".into())), None]);
        assert!(acts.is_empty());
        assert!(a.votes_in());
        assert_eq!(
            a.step(Event::Decide {
                past_deadline: false
            }),
            vec![Act::Deliver(Verdict::Abort)]
        );
        // Nothing was recorded, so nothing is marked delivered.
        assert_eq!(run(&mut a, answers(Delivery::Acked)), vec![Act::Close]);
        assert_eq!(a.ending(), Some(Ending::Aborted { retry: false }));
    }

    #[test]
    fn a_timeout_aborts_with_a_record_marked_delivered_once_everyone_acknowledged() {
        let (mut a, _) = Attempt::start(vec![None, None, None]);
        a.step(Event::Vote {
            node: 0,
            vote: Vote::Prepared,
        });
        assert!(a.awaits_vote(1));
        a.step(Event::VoteTimeout);
        assert!(!a.awaits_vote(1));
        let acts = a.step(Event::Decide {
            past_deadline: false,
        });
        assert_eq!(acts, vec![Act::WriteAbort]);
        assert_eq!(
            a.step(Event::AbortWritten(true)),
            vec![Act::Deliver(Verdict::Abort)]
        );
        assert_eq!(
            run(&mut a, answers(Delivery::Acked)),
            vec![Act::MarkDelivered, Act::Close]
        );
    }

    #[test]
    fn a_commit_write_that_may_have_landed_is_never_aborted() {
        // Unreadable after a failure: nothing is sent, the open record stays.
        let mut b = writing_commit();
        assert!(b
            .step(Event::CommitWritten(WriteResult::Unreadable))
            .is_empty());
        assert_eq!(b.ending(), Some(Ending::Unsure));
        // Read back as commit after a failed write: delivered.
        let mut c = writing_commit();
        assert_eq!(
            c.step(Event::CommitWritten(WriteResult::ReadBack(Some(
                Verdict::Commit
            )))),
            vec![Act::Deliver(Verdict::Commit)]
        );
        // Read back as nothing: the link never happened; abort, unrecorded.
        let mut d = writing_commit();
        assert_eq!(
            d.step(Event::CommitWritten(WriteResult::ReadBack(None))),
            vec![Act::Deliver(Verdict::Abort)]
        );
        assert_eq!(run(&mut d, answers(Delivery::Acked)), vec![Act::Close]);
        // A fence that won the no-replace race stands: the abort is delivered, never a commit.
        let mut e = writing_commit();
        assert_eq!(
            e.step(Event::CommitWritten(WriteResult::Stands(Verdict::Abort))),
            vec![Act::Deliver(Verdict::Abort)]
        );
    }

    #[test]
    fn votes_past_the_deadline_abort_and_conflicts_retry() {
        let (mut a, _) = Attempt::start(vec![None, None, None]);
        for node in 0..3 {
            a.step(Event::Vote {
                node,
                vote: Vote::Prepared,
            });
        }
        assert_eq!(
            a.step(Event::Decide {
                past_deadline: true
            }),
            vec![Act::WriteAbort]
        );
        // Nobody prepared: no record, abort sent, and retried.
        let (mut b, _) = Attempt::start(vec![None, None, None]);
        assert_eq!(
            run(&mut b, votes(busy())),
            vec![Act::Deliver(Verdict::Abort)]
        );
        b.step(Event::DeliveryOver);
        assert_eq!(b.ending(), Some(Ending::Aborted { retry: true }));
    }
}
