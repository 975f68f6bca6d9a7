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
use crate::proto::{Change, OutcomeAnswer, Refusal, Response, Sha256, TableStatus};

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

/// `Some(generation)` when every asked node already serves exactly this content (same sha256,
/// same generation, nothing in progress, live files as installed): a commit then has nothing to
/// do and makes no new generation. A drifted node (its live files changed since it installed
/// them) does not really serve the recorded content: the commit reinstalls it.
pub fn already_served(statuses: &[TableStatus], asked: usize, sha256: &Sha256) -> Option<u64> {
    let first = statuses.first()?;
    let same = statuses.len() == asked
        && statuses.iter().all(|s| {
            s.prepared.is_none()
                && s.drifted.is_none()
                && s.sha256.as_ref() == Some(sha256)
                && s.generation == first.generation
        });
    (same && first.generation > 0).then_some(first.generation)
}

/// A later change of the same source is live: the change asked for is superseded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Superseded {
    /// The later change.
    pub by: Change,
    /// The highest generation seen holding it (or a change after it).
    pub generation: u64,
    /// Every asked node reported it: each serves that later change (or one after it).
    pub everywhere: bool,
}

/// `Some` when some node installed a change of the same source (the same origin node and
/// table) later than `change`: this one is superseded and must never replace it. Only the
/// source's own counter decides (see [`Change`]); no clock takes part, and a change of
/// another origin never supersedes anything.
pub fn superseded(
    statuses: &[TableStatus],
    asked: usize,
    origin: &str,
    change: &Change,
) -> Option<Superseded> {
    let later = |s: &TableStatus| {
        s.newest
            .iter()
            .find(|n| n.origin == origin)
            .map(|n| n.change)
            .filter(|n| n.supersedes(change))
    };
    let holding: Vec<(u64, Change)> = statuses
        .iter()
        .filter_map(|s| later(s).map(|c| (s.generation, c)))
        .collect();
    let (generation, by) = holding.iter().max_by_key(|(g, c)| (*g, c.seq))?;
    Some(Superseded {
        by: *by,
        generation: *generation,
        everywhere: statuses.len() == asked && holding.len() == asked,
    })
}

/// The content guard: `Err(why)` when the new source would remove more than
/// `max_shrink_percent` of the entries the nodes serve now (the largest live count among
/// `statuses`). It counts the keys that would go (`removed_keys`, when the live content could
/// be compared key by key; otherwise the drop in the number of entries), not entry totals,
/// and never refuses a change that removes at most `free_keys` keys: Sympa's ordinary change
/// (a list created or closed, about ten entries) passes, even when it empties the table. A
/// forced commit skips it.
pub fn content_guard(
    statuses: &[TableStatus],
    new_entries: u64,
    removed_keys: Option<u64>,
    max_shrink_percent: u64,
    free_keys: u64,
) -> Result<(), String> {
    let live = statuses
        .iter()
        .filter(|s| s.generation > 0)
        .map(|s| s.entries)
        .max()
        .unwrap_or(0);
    let gone = removed_keys.unwrap_or_else(|| live.saturating_sub(new_entries));
    if live == 0 || gone <= free_keys {
        return Ok(());
    }
    if new_entries == 0 {
        return Err(format!(
            "the new source has no entries: all {live} entries of the live table would go, more than guard_free_keys = {free_keys}"
        ));
    }
    if gone * 100 > live * max_shrink_percent {
        return Err(format!(
            "the new source would remove {gone} of the {live} live keys ({}%), more than max_shrink_percent = {max_shrink_percent} and more than guard_free_keys = {free_keys}",
            gone * 100 / live
        ));
    }
    Ok(())
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
        (_, Some(other)) => Delivery::Retry(format!("unexpected answer: {other}")),
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

/// The coordinator node's rule, for a question about a transaction that names this node as its
/// coordinator. `decision`: the decision on disk (read and made durable); `open`:
/// `Some(alive)` when a coordinator registered the transaction here. Without `fence`, a node
/// with no record answers from its participant state.
pub fn log_answer(decision: Option<(Verdict, u64)>, open: Option<bool>, fence: bool) -> LogAnswer {
    match (decision, open) {
        (Some((Verdict::Commit, g)), _) => {
            LogAnswer::Answer(OutcomeAnswer::Committed { generation: g })
        }
        (Some((Verdict::Abort, _)), _) => LogAnswer::Answer(OutcomeAnswer::Aborted),
        (None, Some(true)) => LogAnswer::Answer(OutcomeAnswer::Pending),
        (None, Some(false)) if fence => LogAnswer::Fence,
        // No record at all: presumed abort. The open record is written (durably) before any
        // prepare is sent and a commit record is kept until every member acknowledged it, so
        // a member still asking was never decided commit.
        (None, None) if fence => LogAnswer::Fence,
        _ => LogAnswer::AskParticipant,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::TxId;

    /// A node's status of table `t` at generation `g` (one entry, nothing else known).
    fn status(g: u64) -> TableStatus {
        TableStatus {
            table: "t".into(),
            generation: g,
            sha256: None,
            entries: 1,
            committed_at_ms: None,
            last_txid: None,
            coordinator: None,
            fenced: 0,
            content: None,
            newest: Vec::new(),
            prepared: None,
            pending: None,
            cleanup: None,
            drifted: None,
        }
    }

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
    fn the_coordinators_node_presumes_abort_only_without_any_record_and_a_live_coordinator() {
        let c = OutcomeAnswer::Committed { generation: 4 };
        assert_eq!(
            log_answer(Some((Verdict::Commit, 4)), Some(false), true),
            LogAnswer::Answer(c)
        );
        assert_eq!(
            log_answer(None, Some(true), true),
            LogAnswer::Answer(OutcomeAnswer::Pending)
        );
        assert_eq!(log_answer(None, Some(false), true), LogAnswer::Fence);
        assert_eq!(log_answer(None, None, true), LogAnswer::Fence);
        assert_eq!(log_answer(None, None, false), LogAnswer::AskParticipant);
    }

    #[test]
    fn unchanged_content_everywhere_needs_no_transaction() {
        let st = |g: u64, sha: u8| TableStatus {
            sha256: Some(Sha256([sha; 32])),
            ..status(g)
        };
        let sha = Sha256([7; 32]);
        assert_eq!(already_served(&[st(4, 7), st(4, 7)], 2, &sha), Some(4));
        // One node behind, one not answering, another content: work to do.
        assert_eq!(already_served(&[st(4, 7), st(3, 7)], 2, &sha), None);
        assert_eq!(already_served(&[st(4, 7)], 2, &sha), None);
        assert_eq!(already_served(&[st(4, 7), st(4, 8)], 2, &sha), None);
        // A drifted node does not really serve it: the commit reinstalls it.
        let drifted = TableStatus {
            drifted: Some("/x/t changed".into()),
            ..st(4, 7)
        };
        assert_eq!(already_served(&[st(4, 7), drifted], 2, &sha), None);
    }

    #[test]
    fn the_content_guard_counts_keys_that_go_and_lets_an_ordinary_change_through() {
        let st = |g: u64, entries: u64| TableStatus {
            entries,
            ..status(g)
        };
        let live = [st(3, 100), st(3, 100)];
        assert!(content_guard(&live, 0, None, 50, 20)
            .unwrap_err()
            .contains("all 100 entries"));
        assert!(content_guard(&live, 40, None, 50, 20)
            .unwrap_err()
            .contains("60 of the 100"));
        assert!(content_guard(&live, 50, None, 50, 20).is_ok());
        // Same count, every key replaced: the keys that go are counted, not the totals.
        assert!(content_guard(&live, 100, Some(100), 50, 20)
            .unwrap_err()
            .contains("100 of the 100"));
        assert!(content_guard(&live, 1, Some(99), 100, 20).is_ok());
        assert!(
            content_guard(&live, 0, Some(100), 100, 20).is_err(),
            "emptying a big table is refused even at 100"
        );
        // Sympa closing its last list: a few keys, the table empties; never refused.
        let small = [st(7, 9), st(7, 9)];
        assert!(content_guard(&small, 0, Some(9), 50, 20).is_ok());
        assert!(content_guard(&small, 0, None, 0, 20).is_ok());
        assert!(content_guard(&small, 0, Some(9), 50, 5).is_err());
        // A table never committed by txmap has nothing to lose.
        assert!(content_guard(&[st(0, 0)], 0, Some(0), 50, 0).is_ok());
    }

    #[test]
    fn only_a_later_change_of_the_same_source_supersedes() {
        let c = |epoch: u64, seq: u64| Change { epoch, seq };
        let st = |g: u64, newest: &[(&str, Change)]| TableStatus {
            newest: newest
                .iter()
                .map(|(o, change)| crate::proto::OriginChange {
                    origin: o.to_string(),
                    change: *change,
                })
                .collect(),
            ..status(g)
        };
        let both = [st(5, &[("n1", c(9, 4))]), st(5, &[("n1", c(9, 4))])];
        let s = superseded(&both, 2, "n1", &c(9, 3)).unwrap();
        assert_eq!((s.generation, s.by, s.everywhere), (5, c(9, 4), true));
        // The same change, or a later one, is not superseded.
        assert_eq!(superseded(&both, 2, "n1", &c(9, 4)), None);
        assert_eq!(superseded(&both, 2, "n1", &c(9, 5)), None);
        // Another origin's changes never supersede, whatever their count (or clock).
        assert_eq!(superseded(&both, 2, "n2", &c(9, 1)), None);
        // Another epoch (a counter made anew) is not ordered against this one.
        assert_eq!(superseded(&both, 2, "n1", &c(8, 1)), None);
        // Seen on one node only (the other behind, or not answering): not everywhere.
        let one = [st(5, &[("n1", c(9, 4))]), st(4, &[("n1", c(9, 2))])];
        assert!(!superseded(&one, 2, "n1", &c(9, 3)).unwrap().everywhere);
        assert!(
            !superseded(&both[..1], 2, "n1", &c(9, 3))
                .unwrap()
                .everywhere
        );
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
