//! The coordinator side of the protocol as pure functions: what to decide, what a reply means,
//! what recovery may conclude. The shells (`txmap commit`, the redrive and resolve loops of
//! `txmapd`, `txmap recover`) execute what these return; the model checker
//! (`chaos-tests/src/model`) drives the very same functions.
//!
//! # The rules they encode
//! - **A commit decision is sticky.** Once a commit record may be on disk, nothing aborts the
//!   transaction: a failed decision write is read back ([`after_decision_write`]), and when the
//!   read-back fails too, nobody sends anything ([`AfterWrite::Unsure`]): the node's recovery
//!   settles it from whatever the disk holds.
//! - **Delivery ends only on a definitive answer** ([`delivery`]): a participant that could not
//!   install yet (storage error) is asked again; only `Committed` ends a commit's delivery.
//! - **No abort inferred from missing memory.** Only a *member* of the transaction may vouch
//!   that it aborted it (its fence keeps the transaction from ever getting every vote), and only
//!   the coordinator's node may answer from the decision log ([`resolve`], [`may_recover`]).

use crate::decision::Verdict;
use crate::machine::{decide, Decision, Vote};
use crate::proto::{OutcomeAnswer, Refusal, Response};

/// What the coordinator does once every vote is in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OnVotes {
    /// Log *commit* (durably, no-replace), then deliver what stands on disk.
    LogCommit,
    /// Abort. `record`: log an abort first (some node may hold a prepared copy and miss the
    /// abort). `retry`: every refusal was a conflict; try again with a new transaction.
    Abort {
        /// Record the abort in the decision log before sending it.
        record: bool,
        /// Retry with a fresh transaction and generation.
        retry: bool,
    },
}

/// Decides from the votes. `past_deadline`: the coordinator's own deadline has passed, so its
/// node's recovery may already have fenced the transaction: never decide commit then.
/// `prepare_sent[i]`: a prepare was sent to node `i` (only such a node can hold a copy).
pub fn on_votes(votes: &[Vote], prepare_sent: &[bool], past_deadline: bool) -> OnVotes {
    let all: Vec<Option<Vote>> = votes.iter().cloned().map(Some).collect();
    match decide(&all).unwrap_or(Decision::Abort { retry: false }) {
        Decision::Commit if !past_deadline => OnVotes::LogCommit,
        Decision::Commit => OnVotes::Abort {
            record: true,
            retry: false,
        },
        Decision::Abort { retry } => {
            // A node that refused holds nothing; one that prepared or could not answer may.
            let record = votes
                .iter()
                .zip(prepare_sent)
                .any(|(v, sent)| *sent && !matches!(v, Vote::Refused(_)));
            OnVotes::Abort { record, retry }
        }
    }
}

/// What a decision write left on disk, as far as the coordinator can tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteResult {
    /// The write succeeded; this verdict stands (ours, or the fence that won the race).
    Stands(Verdict),
    /// The write failed; reading the decision back found this (`None`: no decision file).
    ReadBack(Option<Verdict>),
    /// The write failed and so did reading it back.
    Unreadable,
}

/// What the coordinator does after trying to log a commit decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterWrite {
    /// Deliver commit to every node.
    Commit,
    /// Deliver abort to every node (recovery fenced it first, or nothing was written).
    Abort,
    /// A commit record may or may not be durable: send nothing, leave the open record; the
    /// node's recovery reads the disk and delivers what it finds.
    Unsure,
}

/// The rule "nothing durable is contradicted" applied to a decision write.
pub fn after_decision_write(r: WriteResult) -> AfterWrite {
    // DEFECT (test only, issue 9 #4): the old rule aborted on any error of the write, even
    // with the commit record on disk.
    if crate::defects::on(crate::defects::Defect::AbortAfterFailedDecisionWrite)
        && !matches!(r, WriteResult::Stands(_))
    {
        return AfterWrite::Abort;
    }
    match r {
        WriteResult::Stands(Verdict::Commit) | WriteResult::ReadBack(Some(Verdict::Commit)) => {
            AfterWrite::Commit
        }
        WriteResult::Stands(Verdict::Abort) | WriteResult::ReadBack(Some(Verdict::Abort)) => {
            AfterWrite::Abort
        }
        // No file: the link never happened (we are the only writer of a commit).
        WriteResult::ReadBack(None) => AfterWrite::Abort,
        WriteResult::Unreadable => AfterWrite::Unsure,
    }
}

/// What one node's answer to a delivered decision means.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delivery {
    /// The node holds the decision: delivery to it is over.
    Acked,
    /// Not yet (unreachable, storage error, a retryable refusal): send again later.
    Retry(String),
    /// The node holds the opposite outcome. Never happens unless a rule was broken; reported
    /// loudly and never retried.
    Contradicts(String),
}

/// Classifies a node's answer to `verdict` (`None`: no answer).
pub fn delivery(verdict: Verdict, answer: Option<&Response>) -> Delivery {
    // DEFECT (test only, issue 9 #1): the old redrive took a storage refusal of a commit as
    // final and forgot the commit record.
    if crate::defects::on(crate::defects::Defect::InstallFailedDropsToPrepared)
        && matches!(
            (verdict, answer),
            (
                Verdict::Commit,
                Some(Response::Refused(Refusal::Storage { .. }))
            )
        )
    {
        return Delivery::Acked;
    }
    match (verdict, answer) {
        (_, None) => Delivery::Retry("no answer".into()),
        (Verdict::Commit, Some(Response::Committed { .. })) => Delivery::Acked,
        (Verdict::Abort, Some(Response::Aborted { .. })) => Delivery::Acked,
        (Verdict::Commit, Some(Response::Refused(r @ Refusal::AlreadyAborted { .. })))
        | (Verdict::Abort, Some(Response::Refused(r @ Refusal::AlreadyCommitted { .. }))) => {
            Delivery::Contradicts(r.to_string())
        }
        // Not the transaction's business of this node (unknown table, not authorized) will not
        // change by itself, but neither is it an outcome: keep it visible and keep trying.
        (_, Some(Response::Refused(r))) => Delivery::Retry(r.to_string()),
        (_, Some(other)) => Delivery::Retry(format!("unexpected answer {other:?}")),
    }
}

/// One node's answer to an outcome query, with whether that node is a member of the
/// transaction (named in its prepare).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Heard {
    /// Node name.
    pub node: String,
    /// Whether it takes part in the transaction.
    pub member: bool,
    /// Whether it is the transaction's coordinator's node (answers from the decision log).
    pub coordinator: bool,
    /// Its answer.
    pub answer: OutcomeAnswer,
}

/// What an in-doubt participant may conclude from what it heard (`None`: stay in doubt).
///
/// A commit answer from anyone who knows it is a fact (commits are never undone). An abort
/// answer counts only from the coordinator's node (its decision log, or its fence) or from a
/// member (whose fence denies the transaction its vote forever); a non-member's fence proves
/// nothing.
pub fn resolve(heard: &[Heard]) -> Option<Verdict> {
    if heard
        .iter()
        .any(|h| matches!(h.answer, OutcomeAnswer::Committed { .. }))
    {
        return Some(Verdict::Commit);
    }
    if heard
        .iter()
        .any(|h| h.answer == OutcomeAnswer::Aborted && (h.member || h.coordinator))
    {
        return Some(Verdict::Abort);
    }
    None
}

/// Whether `txmap recover` may resolve the transaction as asked. `Err` says why not.
///
/// - Commit only when someone knows it was decided commit.
/// - Abort only when nobody reports it committed, no coordinator is still at work, and a
///   member or the coordinator's node vouches for the abort (its answer was `Aborted`, i.e. it
///   decided or fenced it). Answers of non-members never count.
pub fn may_recover(commit: bool, heard: &[Heard]) -> Result<(), String> {
    // DEFECT (test only, issue 9 #2): the old guard counted every node's answer.
    let old_guard = crate::defects::on(crate::defects::Defect::RecoverCountsNonMembers);
    let counted: Vec<&Heard> = heard
        .iter()
        .filter(|h| h.member || h.coordinator || old_guard)
        .collect();
    let committed = counted
        .iter()
        .any(|h| matches!(h.answer, OutcomeAnswer::Committed { .. }));
    if counted.iter().any(|h| h.answer == OutcomeAnswer::Pending) {
        return Err("its coordinator is still at work; try again shortly".into());
    }
    if commit {
        return if committed {
            Ok(())
        } else {
            Err("no member reports a commit decision (if the coordinator's node is down, it may hold one: bring it back)".into())
        };
    }
    if committed {
        return Err("it was decided commit".into());
    }
    if resolve(heard) == Some(Verdict::Abort)
        || (old_guard && counted.iter().any(|h| h.answer == OutcomeAnswer::Aborted))
    {
        Ok(())
    } else {
        Err("no member and not the coordinator's node can prove it aborted (every reachable member is prepared or does not know; only the coordinator's node knows whether it decided commit)".into())
    }
}

/// What the coordinator's node answers about a transaction from its decision log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogAnswer {
    /// Answer this.
    Answer(OutcomeAnswer),
    /// Record an abort (no-replace: a commit that got there first wins), then answer what
    /// stands.
    Fence,
    /// The log says nothing: answer from the participant state.
    AskParticipant,
}

/// The coordinator node's rule. `decision`: the decision on disk (read and made durable);
/// `open`: `Some(alive)` when a coordinator registered the transaction here; `own_prepared`:
/// this node holds the transaction prepared and coordinated it itself (so a commit decision
/// would have been logged here first).
pub fn log_answer(
    decision: Option<(Verdict, u64)>,
    open: Option<bool>,
    own_prepared: bool,
    fence: bool,
) -> LogAnswer {
    match (decision, open) {
        (Some((Verdict::Commit, g)), _) => {
            LogAnswer::Answer(OutcomeAnswer::Committed { generation: g })
        }
        (Some((Verdict::Abort, _)), _) => LogAnswer::Answer(OutcomeAnswer::Aborted),
        (None, Some(true)) => LogAnswer::Answer(OutcomeAnswer::Pending),
        (None, Some(false)) if fence => LogAnswer::Fence,
        (None, None) if fence && own_prepared => LogAnswer::Fence,
        _ => LogAnswer::AskParticipant,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::TxId;

    fn h(node: &str, member: bool, answer: OutcomeAnswer) -> Heard {
        Heard {
            node: node.into(),
            member,
            coordinator: false,
            answer,
        }
    }

    #[test]
    fn a_failed_decision_write_is_read_back_and_never_aborts_a_possible_commit() {
        assert_eq!(
            after_decision_write(WriteResult::ReadBack(Some(Verdict::Commit))),
            AfterWrite::Commit
        );
        assert_eq!(
            after_decision_write(WriteResult::Unreadable),
            AfterWrite::Unsure
        );
        assert_eq!(
            after_decision_write(WriteResult::ReadBack(None)),
            AfterWrite::Abort
        );
    }

    #[test]
    fn a_storage_refusal_of_a_commit_is_retried_not_final() {
        let r = Response::Refused(Refusal::Storage {
            op: "rename".into(),
            path: "x".into(),
            error: "EPERM".into(),
        });
        assert!(matches!(
            delivery(Verdict::Commit, Some(&r)),
            Delivery::Retry(_)
        ));
        assert_eq!(
            delivery(
                Verdict::Commit,
                Some(&Response::Committed {
                    txid: TxId(1),
                    generation: 2
                })
            ),
            Delivery::Acked
        );
    }

    #[test]
    fn a_non_members_abort_proves_nothing() {
        let heard = vec![
            h("node2", true, OutcomeAnswer::InDoubt),
            h("node4", false, OutcomeAnswer::Aborted),
        ];
        assert_eq!(resolve(&heard), None);
        assert!(may_recover(false, &heard).is_err());
        let heard = vec![h("node2", true, OutcomeAnswer::Aborted)];
        assert_eq!(resolve(&heard), Some(Verdict::Abort));
        assert!(may_recover(false, &heard).is_ok());
    }

    #[test]
    fn recover_abort_is_refused_once_anyone_knows_commit() {
        let heard = vec![
            h("node2", true, OutcomeAnswer::Committed { generation: 3 }),
            h("node3", true, OutcomeAnswer::Aborted),
        ];
        assert!(may_recover(false, &heard).is_err());
        assert!(may_recover(true, &heard).is_ok());
    }

    #[test]
    fn votes_past_the_deadline_never_commit() {
        let v = vec![Vote::Prepared, Vote::Prepared];
        assert_eq!(on_votes(&v, &[true, true], false), OnVotes::LogCommit);
        assert!(matches!(
            on_votes(&v, &[true, true], true),
            OnVotes::Abort { record: true, .. }
        ));
        // Nothing sent anywhere: nothing to record.
        let v = vec![Vote::Unreachable("x".into()), Vote::Unreachable("y".into())];
        assert_eq!(
            on_votes(&v, &[false, false], false),
            OnVotes::Abort {
                record: false,
                retry: false
            }
        );
    }
}
