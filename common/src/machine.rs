//! The two-phase-commit logic as pure functions: state + event → new state + actions.
//!
//! Nothing here touches the network, the disk or the clock (time is passed in). The async
//! shells in `txmapd` and `txmap` execute the [`Action`]s in order and feed the results back as
//! events, so every protocol decision can be tested step by step without I/O (the same split as
//! quinn-proto/quinn and openraft's engine).
//!
//! # Participant, per table
//! ```text
//!            Prepare(gen > current, table free)
//!   Idle ─────────────────────────────────────▶ Staging ──StageDone──▶ Prepared
//!    ▲                                             │  (persist, reply)     │
//!    │              StageFailed / Abort            │                       │ Commit
//!    ├─────────────────────────────────────────────┘                       ▼
//!    │◀──────────────── InstallDone (persist generation, unlock) ──── Installing
//!    │◀──────────────── Abort (remove staged, persist, unlock) ─────── Prepared
//! ```
//! Only *Prepared* is journaled; a crash while *Staging* leaves no record, so restart removes
//! the staged files (presumed abort) and the lock died with the process.

use crate::proto::{
    Change, OriginChange, OutcomeAnswer, PreparedInfo, Refusal, Response, Sha256, TableStatus, TxId,
};
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;

/// How many finished transactions a table remembers, to answer repeated messages.
pub const RECENT: usize = 64;

/// How a transaction ended on this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Outcome {
    /// Installed at this generation.
    Committed(u64),
    /// Dropped.
    Aborted,
}

/// Phase of the transaction holding a table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Phase {
    /// Receiving, building, verifying (not durable, not journaled).
    Staging,
    /// Built, verified, fsynced and journaled; waiting for the decision.
    Prepared,
    /// Commit received; renames under way.
    Installing,
}

/// The transaction holding a table.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Active {
    /// Transaction.
    pub txid: TxId,
    /// Generation it installs.
    pub generation: u64,
    /// Coordinating node.
    pub coordinator: String,
    /// sha256 of the new source.
    pub sha256: Sha256,
    /// Entries in the new source.
    pub entries: u64,
    /// Phase.
    pub phase: Phase,
    /// An abort arrived while staging: finish by cleaning up, never by preparing.
    pub abort_requested: bool,
    /// Since when (ms since epoch).
    pub since_ms: u64,
    /// Every node taking part (for cooperative termination).
    #[serde(default)]
    pub nodes: Vec<String>,
    /// Which change of its coordinator's source it is (see [`crate::proto::Change`]).
    #[serde(default)]
    pub change: Option<Change>,
    /// Staged by an incremental build (a delta applied to a copy of the live indexed file).
    #[serde(default)]
    pub incremental: bool,
}

/// Counters (sources) remembered per origin in [`TableState::newest`]: a node's table has one
/// for its configured source, and one for each other file an operator committed it from.
pub const EPOCHS_KEPT: usize = 8;

/// Everything a participant knows about one table; the journal stores exactly this.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct TableState {
    /// Live generation.
    pub generation: u64,
    /// sha256 of the live source.
    pub sha256: Option<Sha256>,
    /// Entries in it.
    pub entries: u64,
    /// When it went live.
    pub committed_at_ms: Option<u64>,
    /// Transaction that made it live.
    pub last_txid: Option<TxId>,
    /// Node that coordinated that.
    pub coordinator: Option<String>,
    /// Transaction holding the table.
    pub active: Option<Active>,
    /// Recently finished transactions, newest last (bounded: answers repeated messages; never
    /// the only proof of an abort).
    pub recent: VecDeque<(TxId, Outcome)>,
    /// No prepare of this generation or below is accepted (fences of aborted transactions).
    #[serde(default)]
    pub fenced: u64,
    /// The live content's change (`None`: unknown or unordered).
    #[serde(default)]
    pub content: Option<OriginChange>,
    /// The newest change installed from each origin and counter (bounded: only a configured
    /// node may coordinate, as itself, and [`EPOCHS_KEPT`] counters are kept per origin).
    #[serde(default)]
    pub newest: Vec<OriginChange>,
    /// The live indexed file as installed (`None`: unknown, so never the base of an
    /// incremental build).
    #[serde(default)]
    pub indexed_stamp: Option<crate::table::FileStamp>,
    /// Incremental builds since the last full one.
    #[serde(default)]
    pub deltas_since_full: u32,
    /// The live source as installed (`None`: unknown). While the live source keeps this stamp
    /// a delta is applied to it without hashing it again (the rebuilt source is still checked
    /// against the prepare's sha256).
    #[serde(default)]
    pub source_stamp: Option<crate::table::FileStamp>,
}

/// Input to the participant machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A prepare header arrived (the body is still on the stream).
    Prepare {
        /// Transaction.
        txid: TxId,
        /// Offered generation.
        generation: u64,
        /// Coordinator.
        coordinator: String,
        /// Announced sha256.
        sha256: Sha256,
        /// Announced entries.
        entries: u64,
        /// Nodes taking part.
        nodes: Vec<String>,
        /// Which change of the coordinator's source it is.
        change: Option<Change>,
    },
    /// Staging finished: built, verified, fsynced.
    StageDone {
        /// Transaction.
        txid: TxId,
    },
    /// Staging failed (lock, upload, build, verify, storage).
    StageFailed {
        /// Transaction.
        txid: TxId,
        /// Why.
        why: Refusal,
    },
    /// Commit decision arrived.
    Commit {
        /// Transaction.
        txid: TxId,
        /// The generation it installs.
        generation: u64,
    },
    /// The renames are done and durable.
    InstallDone {
        /// Transaction.
        txid: TxId,
    },
    /// The renames failed.
    InstallFailed {
        /// Transaction.
        txid: TxId,
        /// Why.
        why: Refusal,
    },
    /// Abort decision arrived.
    Abort {
        /// Transaction.
        txid: TxId,
        /// The generation it would have installed.
        generation: u64,
    },
    /// What became of a transaction? (see [`crate::proto::Request::Outcome`]).
    Query {
        /// Transaction.
        txid: TxId,
        /// The generation it installs.
        generation: u64,
        /// Fence it if this node can prove it never installed it.
        fence: bool,
    },
}

/// What the shell must do, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Take the table's lock, receive the body into the staged file, build, verify, fsync;
    /// then feed `StageDone` or `StageFailed`.
    Stage {
        /// Transaction.
        txid: TxId,
    },
    /// Skip the body still on the stream (a repeated prepare).
    DiscardBody,
    /// Write the table state to the journal durably.
    Persist,
    /// Rename the staged files over the live ones; then feed `InstallDone`/`InstallFailed`.
    Install {
        /// Transaction.
        txid: TxId,
    },
    /// Remove the staged files of this transaction.
    RemoveStaged {
        /// Transaction.
        txid: TxId,
    },
    /// Release the table's lock.
    Unlock,
    /// Answer the request that caused this step.
    Reply(Response),
}

impl TableState {
    /// How `txid` ended here, if it did and is still remembered.
    pub fn outcome_of(&self, txid: TxId) -> Option<Outcome> {
        self.recent
            .iter()
            .rev()
            .find(|(t, _)| *t == txid)
            .map(|(_, o)| *o)
    }

    fn remember(&mut self, txid: TxId, o: Outcome) {
        self.recent.push_back((txid, o));
        while self.recent.len() > RECENT {
            self.recent.pop_front();
        }
    }

    /// The status report of this table.
    pub fn status(&self, table: &str) -> TableStatus {
        TableStatus {
            table: table.to_string(),
            generation: self.generation,
            sha256: self.sha256,
            entries: self.entries,
            committed_at_ms: self.committed_at_ms,
            last_txid: self.last_txid,
            coordinator: self.coordinator.clone(),
            fenced: self.fenced,
            content: self.content.clone(),
            newest: self.newest.clone(),
            prepared: self.active.as_ref().map(|a| PreparedInfo {
                txid: a.txid,
                generation: a.generation,
                coordinator: a.coordinator.clone(),
                durable: a.phase != Phase::Staging,
                installing: a.phase == Phase::Installing,
                since_ms: a.since_ms,
                nodes: a.nodes.clone(),
            }),
            pending: None,
            cleanup: None,
            drifted: None,
        }
    }

    /// The change installed here from `origin` that supersedes `change`, if any.
    pub fn newer_than(&self, origin: &str, change: &Change) -> Option<Change> {
        self.newest
            .iter()
            .filter(|n| n.origin == origin)
            .map(|n| n.change)
            .find(|n| n.supersedes(change))
    }

    /// Records `c` as installed: the newest count of its origin's counter (one entry per
    /// origin and epoch, most recently installed last; at most [`EPOCHS_KEPT`] per origin).
    fn note_installed(&mut self, c: OriginChange) {
        let same = |n: &OriginChange| n.origin == c.origin && n.change.epoch == c.change.epoch;
        let seq = self
            .newest
            .iter()
            .filter(|n| same(n))
            .map(|n| n.change.seq)
            .fold(c.change.seq, u64::max);
        self.newest.retain(|n| !same(n));
        self.newest.push(OriginChange {
            origin: c.origin.clone(),
            change: Change { seq, ..c.change },
        });
        while self.newest.iter().filter(|n| n.origin == c.origin).count() > EPOCHS_KEPT {
            if let Some(i) = self.newest.iter().position(|n| n.origin == c.origin) {
                self.newest.remove(i);
            }
        }
    }

    /// The highest generation no prepare may offer any more: the live one, or a fence above it.
    pub fn floor(&self) -> u64 {
        self.generation.max(self.fenced)
    }

    /// Records that no transaction of generation `generation` or below may be prepared here any
    /// more (the fence of an aborted or presumed-aborted transaction). A number, not a list of
    /// transaction ids: it cannot be evicted by a flood of fences.
    fn fence(&mut self, generation: u64) -> bool {
        if generation > self.fenced {
            self.fenced = generation;
            true
        } else {
            false
        }
    }

    /// What this node can say about `txid` (installing `generation`) from its own state; with
    /// `fence`, an unknown transaction is fenced when this node can prove it never installed it.
    ///
    /// The proof rule: a transaction this node no longer holds and whose generation is above the
    /// live one was never installed here (generations only grow, and a transaction installs
    /// exactly its own). Anything else that is not remembered is `Unknown`, never `Aborted`:
    /// "not remembered" is not "aborted" (it may have been committed and forgotten since).
    fn knowledge(&self, txid: TxId, generation: u64) -> Knowledge {
        if let Some(o) = self.outcome_of(txid) {
            return Knowledge::Ended(o);
        }
        if let Some(a) = self.active.as_ref().filter(|a| a.txid == txid) {
            return Knowledge::Holds(a.phase);
        }
        // DEFECT (test only, issue 9 #3): the old rule took "not remembered" for "never
        // installed here", whatever the generation.
        if generation > self.generation
            || crate::defects::on(crate::defects::Defect::AbortFromMissingMemory)
        {
            Knowledge::NeverInstalled
        } else {
            Knowledge::Unknown
        }
    }

    /// Advances the machine by one event. `now_ms` is the wall clock, passed in.
    pub fn step(&mut self, event: Event, now_ms: u64) -> Vec<Action> {
        use Action as A;
        let refuse = |r: Refusal| A::Reply(Response::Refused(r));
        match event {
            Event::Prepare {
                txid,
                generation,
                coordinator,
                sha256,
                entries,
                nodes,
                change,
            } => {
                match self.outcome_of(txid) {
                    Some(Outcome::Committed(g)) => {
                        return vec![
                            A::DiscardBody,
                            A::Reply(Response::Committed {
                                txid,
                                generation: g,
                            }),
                        ]
                    }
                    Some(Outcome::Aborted) => {
                        return vec![A::DiscardBody, refuse(Refusal::AlreadyAborted { txid })]
                    }
                    None => {}
                }
                if let Some(a) = &self.active {
                    if a.txid == txid && a.phase == Phase::Prepared {
                        return vec![A::DiscardBody, A::Reply(Response::Prepared { txid })];
                    }
                    return vec![
                        A::DiscardBody,
                        refuse(Refusal::Busy {
                            txid: a.txid,
                            generation: a.generation,
                        }),
                    ];
                }
                if let Some(newer) = change.and_then(|c| self.newer_than(&coordinator, &c)) {
                    return vec![A::DiscardBody, refuse(Refusal::Superseded { newer })];
                }
                if generation <= self.floor() {
                    return vec![
                        A::DiscardBody,
                        refuse(Refusal::StaleGeneration {
                            offered: generation,
                            current: self.floor(),
                        }),
                    ];
                }
                self.active = Some(Active {
                    txid,
                    generation,
                    coordinator,
                    sha256,
                    entries,
                    phase: Phase::Staging,
                    abort_requested: false,
                    since_ms: now_ms,
                    nodes,
                    change,
                    incremental: false,
                });
                vec![A::Stage { txid }]
            }
            Event::StageDone { txid } => match &mut self.active {
                Some(a) if a.txid == txid && a.phase == Phase::Staging => {
                    if a.abort_requested {
                        let g = a.generation;
                        self.active = None;
                        self.fence(g);
                        self.remember(txid, Outcome::Aborted);
                        vec![
                            A::RemoveStaged { txid },
                            A::Persist,
                            A::Unlock,
                            refuse(Refusal::AlreadyAborted { txid }),
                        ]
                    } else {
                        a.phase = Phase::Prepared;
                        vec![A::Persist, A::Reply(Response::Prepared { txid })]
                    }
                }
                _ => vec![refuse(Refusal::UnknownTransaction { txid })],
            },
            Event::StageFailed { txid, why } => match &self.active {
                Some(a) if a.txid == txid && a.phase == Phase::Staging => {
                    self.active = None;
                    self.remember(txid, Outcome::Aborted);
                    vec![A::RemoveStaged { txid }, A::Unlock, refuse(why)]
                }
                _ => vec![A::RemoveStaged { txid }, refuse(why)],
            },
            Event::Commit { txid, generation } => match self.knowledge(txid, generation) {
                Knowledge::Ended(Outcome::Committed(g)) => vec![A::Reply(Response::Committed {
                    txid,
                    generation: g,
                })],
                Knowledge::Ended(Outcome::Aborted) => {
                    vec![refuse(Refusal::AlreadyAborted { txid })]
                }
                Knowledge::Holds(Phase::Prepared) => {
                    // Journal the decision first: a crash before the renames finishes them, and
                    // from here on nothing can abort it (a commit decision is sticky).
                    if let Some(a) = self.active.as_mut() {
                        a.phase = Phase::Installing;
                    }
                    vec![A::Persist, A::Install { txid }]
                }
                Knowledge::Holds(Phase::Installing) => vec![A::Install { txid }],
                Knowledge::Holds(Phase::Staging) => vec![refuse(Refusal::Protocol {
                    detail: format!("commit of {txid} before it was prepared"),
                })],
                // A commit decision means this node prepared it; it holds it no more and its
                // live generation is at or past it: it installed it and forgot (or a newer
                // generation replaced it). Either way there is nothing left to do.
                Knowledge::Unknown => vec![A::Reply(Response::Committed { txid, generation })],
                Knowledge::NeverInstalled => vec![refuse(Refusal::UnknownTransaction { txid })],
            },
            Event::InstallDone { txid } => match self.active.take() {
                Some(a) if a.txid == txid && a.phase == Phase::Installing => {
                    self.generation = a.generation;
                    self.sha256 = Some(a.sha256);
                    self.entries = a.entries;
                    self.committed_at_ms = Some(now_ms);
                    self.last_txid = Some(txid);
                    self.coordinator = Some(a.coordinator);
                    self.content = a
                        .change
                        .zip(self.coordinator.clone())
                        .map(|(change, origin)| OriginChange { origin, change });
                    if let Some(c) = &self.content {
                        self.note_installed(c.clone());
                    }
                    self.remember(txid, Outcome::Committed(a.generation));
                    vec![
                        A::Persist,
                        A::Unlock,
                        A::Reply(Response::Committed {
                            txid,
                            generation: a.generation,
                        }),
                    ]
                }
                other => {
                    self.active = other;
                    vec![refuse(Refusal::UnknownTransaction { txid })]
                }
            },
            // Stay *Installing*: the decision is commit and journaled; the shell retries the
            // renames with backoff, and nothing can turn this transaction into an abort.
            Event::InstallFailed { txid, why } => {
                // DEFECT (test only, issue 9 #1): the old rule dropped a failed install back to
                // Prepared, where a later fence could abort a transaction decided commit.
                if crate::defects::on(crate::defects::Defect::InstallFailedDropsToPrepared) {
                    if let Some(a) = self.active.as_mut().filter(|a| a.txid == txid) {
                        a.phase = Phase::Prepared;
                    }
                }
                vec![refuse(why)]
            }
            Event::Abort { txid, generation } => match self.knowledge(txid, generation) {
                Knowledge::Ended(Outcome::Committed(_)) | Knowledge::Holds(Phase::Installing) => {
                    vec![refuse(Refusal::AlreadyCommitted { txid })]
                }
                Knowledge::Ended(Outcome::Aborted) => vec![A::Reply(Response::Aborted { txid })],
                Knowledge::Holds(Phase::Staging) => {
                    if let Some(a) = self.active.as_mut() {
                        a.abort_requested = true;
                    }
                    vec![A::Reply(Response::Aborted { txid })]
                }
                Knowledge::Holds(Phase::Prepared) => {
                    self.active = None;
                    self.fence(generation);
                    self.remember(txid, Outcome::Aborted);
                    vec![
                        A::RemoveStaged { txid },
                        A::Persist,
                        A::Unlock,
                        A::Reply(Response::Aborted { txid }),
                    ]
                }
                // Presumed abort: the fence makes sure a late prepare can never resurrect it.
                Knowledge::NeverInstalled => {
                    self.fence(generation);
                    vec![A::Persist, A::Reply(Response::Aborted { txid })]
                }
                // At or below the live generation, a prepare of it is refused as stale anyway.
                Knowledge::Unknown => vec![A::Reply(Response::Aborted { txid })],
            },
            Event::Query {
                txid,
                generation,
                fence,
            } => {
                let answer = |x| A::Reply(Response::Outcome(x));
                match self.knowledge(txid, generation) {
                    Knowledge::Ended(Outcome::Committed(g)) => {
                        vec![answer(OutcomeAnswer::Committed { generation: g })]
                    }
                    Knowledge::Ended(Outcome::Aborted) => vec![answer(OutcomeAnswer::Aborted)],
                    Knowledge::Holds(Phase::Staging) => vec![answer(OutcomeAnswer::Pending)],
                    Knowledge::Holds(Phase::Prepared) => vec![answer(OutcomeAnswer::InDoubt)],
                    Knowledge::Holds(Phase::Installing) => {
                        vec![answer(OutcomeAnswer::Committed { generation })]
                    }
                    Knowledge::NeverInstalled if fence => {
                        self.fence(generation);
                        vec![A::Persist, answer(OutcomeAnswer::Aborted)]
                    }
                    Knowledge::NeverInstalled | Knowledge::Unknown => {
                        vec![answer(OutcomeAnswer::Unknown)]
                    }
                }
            }
        }
    }
}

/// What a node knows of one transaction from its own state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Knowledge {
    /// Remembered as ended.
    Ended(Outcome),
    /// Held here, in this phase.
    Holds(Phase),
    /// Not held, not remembered, and above the live generation: never installed here.
    NeverInstalled,
    /// Not held, not remembered, at or below the live generation: can't tell.
    Unknown,
}

/// A participant's vote as the coordinator sees it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Vote {
    /// Prepared.
    Prepared,
    /// Refused, with the participant's reason.
    Refused(Refusal),
    /// Could not be reached, or the exchange failed.
    Unreachable(String),
}

/// The coordinator's decision for one round.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Every node prepared.
    Commit,
    /// At least one did not; `retry` when every failure was a conflict with another transaction.
    Abort {
        /// The round may be retried with a new generation.
        retry: bool,
    },
}

/// Decides a round from the votes of every node (`None` while any vote is missing).
pub fn decide(votes: &[Option<Vote>]) -> Option<Decision> {
    if votes.iter().any(|v| v.is_none()) {
        // An early abort is still safe; but waiting lets us report every node's cause.
        return None;
    }
    let failures: Vec<&Vote> = votes
        .iter()
        .flatten()
        .filter(|v| **v != Vote::Prepared)
        .collect();
    if failures.is_empty() {
        return Some(Decision::Commit);
    }
    let retry = failures
        .iter()
        .all(|v| matches!(v, Vote::Refused(r) if r.is_conflict()));
    Some(Decision::Abort { retry })
}

/// The generation to offer: one above anything any node reported, live or in progress.
pub fn next_generation(statuses: &[TableStatus]) -> u64 {
    statuses
        .iter()
        .map(|s| {
            s.generation
                .max(s.fenced)
                .max(s.prepared.as_ref().map(|p| p.generation).unwrap_or(0))
        })
        .max()
        .unwrap_or(0)
        + 1
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prepare(txid: u128, generation: u64) -> Event {
        Event::Prepare {
            txid: TxId(txid),
            generation,
            coordinator: "node1".into(),
            sha256: Sha256([1; 32]),
            entries: 3,
            nodes: vec!["node1".into(), "node2".into()],
            change: None,
        }
    }

    fn replies(actions: &[Action]) -> Vec<&Response> {
        actions
            .iter()
            .filter_map(|a| {
                if let Action::Reply(r) = a {
                    Some(r)
                } else {
                    None
                }
            })
            .collect()
    }

    /// Prepares, commits and installs transaction `t` at generation `g` from `origin`, as
    /// change `c`; returns what the prepare answered when it was refused.
    fn install(
        s: &mut TableState,
        t: u128,
        g: u64,
        origin: &str,
        c: Change,
    ) -> Option<Vec<Action>> {
        let p = Event::Prepare {
            txid: TxId(t),
            generation: g,
            coordinator: origin.into(),
            sha256: Sha256([t as u8; 32]),
            entries: 1,
            nodes: vec![origin.into()],
            change: Some(c),
        };
        let a = s.step(p, 0);
        if a != vec![Action::Stage { txid: TxId(t) }] {
            return Some(a);
        }
        s.step(Event::StageDone { txid: TxId(t) }, 0);
        s.step(
            Event::Commit {
                txid: TxId(t),
                generation: g,
            },
            0,
        );
        s.step(Event::InstallDone { txid: TxId(t) }, 0);
        None
    }

    #[test]
    fn a_prepare_of_a_change_older_than_one_installed_from_its_source_is_refused() {
        let c = |epoch, seq| Change { epoch, seq };
        let mut s = TableState::default();
        assert_eq!(install(&mut s, 1, 1, "node1", c(7, 5)), None);
        assert_eq!(
            s.content,
            Some(OriginChange {
                origin: "node1".into(),
                change: c(7, 5)
            })
        );
        // An older change of the same source: refused, nothing staged.
        let refused = install(&mut s, 2, 2, "node1", c(7, 4)).expect("refused");
        assert!(
            refused.contains(&Action::Reply(Response::Refused(Refusal::Superseded {
                newer: c(7, 5)
            })))
        );
        assert!(s.active.is_none() && s.generation == 1);
        // A later one, another origin's (whatever its count), another epoch's: all installed.
        assert_eq!(install(&mut s, 3, 2, "node1", c(7, 6)), None);
        assert_eq!(install(&mut s, 4, 3, "node2", c(9, 1)), None);
        assert_eq!(install(&mut s, 5, 4, "node1", c(8, 1)), None);
        assert_eq!(s.generation, 4);
        // The newest of each counter is kept: node1's epoch 7 still supersedes its seq 6.
        assert_eq!(s.newer_than("node1", &c(7, 6)), None);
        assert_eq!(s.newer_than("node1", &c(7, 2)), Some(c(7, 6)));
        // At most EPOCHS_KEPT counters per origin.
        for e in 0..20 {
            assert_eq!(
                install(&mut s, 100 + e, 5 + e as u64, "node1", c(100 + e as u64, 1)),
                None
            );
        }
        assert_eq!(
            s.newest.iter().filter(|n| n.origin == "node1").count(),
            EPOCHS_KEPT
        );
    }

    #[test]
    fn a_prepare_then_commit_installs_and_persists_before_replying() {
        let mut s = TableState::default();
        assert_eq!(
            s.step(prepare(1, 1), 10),
            vec![Action::Stage { txid: TxId(1) }]
        );
        assert_eq!(
            s.step(Event::StageDone { txid: TxId(1) }, 11),
            vec![
                Action::Persist,
                Action::Reply(Response::Prepared { txid: TxId(1) })
            ]
        );
        assert_eq!(
            s.step(
                Event::Commit {
                    txid: TxId(1),
                    generation: 1
                },
                12
            ),
            vec![Action::Persist, Action::Install { txid: TxId(1) }]
        );
        let a = s.step(Event::InstallDone { txid: TxId(1) }, 13);
        assert_eq!(a[0], Action::Persist);
        assert_eq!(a[1], Action::Unlock);
        assert_eq!(s.generation, 1);
        assert_eq!(s.entries, 3);
        assert!(s.active.is_none());
    }

    #[test]
    fn repeated_messages_are_idempotent() {
        let mut s = TableState::default();
        s.step(prepare(1, 1), 0);
        s.step(Event::StageDone { txid: TxId(1) }, 0);
        // A duplicated prepare answers Prepared again without staging twice.
        let a = s.step(prepare(1, 1), 0);
        assert_eq!(
            a,
            vec![
                Action::DiscardBody,
                Action::Reply(Response::Prepared { txid: TxId(1) })
            ]
        );
        s.step(
            Event::Commit {
                txid: TxId(1),
                generation: 1,
            },
            0,
        );
        s.step(Event::InstallDone { txid: TxId(1) }, 0);
        // A duplicated commit answers Committed, with no second install.
        let a = s.step(
            Event::Commit {
                txid: TxId(1),
                generation: 1,
            },
            0,
        );
        assert_eq!(
            a,
            vec![Action::Reply(Response::Committed {
                txid: TxId(1),
                generation: 1
            })]
        );
        // An abort after commit is refused.
        let a = s.step(
            Event::Abort {
                txid: TxId(1),
                generation: 1,
            },
            0,
        );
        assert_eq!(
            replies(&a),
            vec![&Response::Refused(Refusal::AlreadyCommitted {
                txid: TxId(1)
            })]
        );
    }

    #[test]
    fn a_second_transaction_is_busy_and_an_old_generation_is_stale() {
        let mut s = TableState::default();
        s.step(prepare(1, 5), 0);
        let a = s.step(prepare(2, 6), 0);
        assert_eq!(
            replies(&a),
            vec![&Response::Refused(Refusal::Busy {
                txid: TxId(1),
                generation: 5
            })]
        );
        s.step(Event::StageDone { txid: TxId(1) }, 0);
        s.step(
            Event::Commit {
                txid: TxId(1),
                generation: 1,
            },
            0,
        );
        s.step(Event::InstallDone { txid: TxId(1) }, 0);
        let a = s.step(prepare(3, 5), 0);
        assert_eq!(
            replies(&a),
            vec![&Response::Refused(Refusal::StaleGeneration {
                offered: 5,
                current: 5
            })]
        );
        assert!(s.active.is_none());
    }

    #[test]
    fn abort_during_staging_never_becomes_prepared() {
        let mut s = TableState::default();
        s.step(prepare(1, 1), 0);
        let a = s.step(
            Event::Abort {
                txid: TxId(1),
                generation: 1,
            },
            0,
        );
        assert_eq!(replies(&a), vec![&Response::Aborted { txid: TxId(1) }]);
        let a = s.step(Event::StageDone { txid: TxId(1) }, 0);
        assert!(a.contains(&Action::RemoveStaged { txid: TxId(1) }));
        assert!(a.contains(&Action::Unlock));
        assert!(s.active.is_none());
        // And a late duplicate prepare cannot resurrect it.
        let a = s.step(prepare(1, 1), 0);
        assert_eq!(
            replies(&a),
            vec![&Response::Refused(Refusal::AlreadyAborted {
                txid: TxId(1)
            })]
        );
    }

    #[test]
    fn abort_of_an_unknown_transaction_fences_it() {
        let mut s = TableState::default();
        let a = s.step(
            Event::Abort {
                txid: TxId(9),
                generation: 1,
            },
            0,
        );
        assert_eq!(replies(&a), vec![&Response::Aborted { txid: TxId(9) }]);
        let a = s.step(prepare(9, 1), 0);
        assert_eq!(
            replies(&a),
            vec![&Response::Refused(Refusal::StaleGeneration {
                offered: 1,
                current: 1
            })]
        );
    }

    #[test]
    fn a_failed_stage_unlocks_and_reports_the_cause() {
        let mut s = TableState::default();
        s.step(prepare(1, 1), 0);
        let why = Refusal::VerifyFailed {
            expected: 3,
            found: 2,
        };
        let a = s.step(
            Event::StageFailed {
                txid: TxId(1),
                why: why.clone(),
            },
            0,
        );
        assert_eq!(
            a,
            vec![
                Action::RemoveStaged { txid: TxId(1) },
                Action::Unlock,
                Action::Reply(Response::Refused(why))
            ]
        );
        assert_eq!(s.generation, 0);
    }

    #[test]
    fn a_failed_install_stays_installing_and_can_never_be_aborted() {
        let mut s = TableState::default();
        s.step(prepare(1, 1), 0);
        s.step(Event::StageDone { txid: TxId(1) }, 0);
        s.step(
            Event::Commit {
                txid: TxId(1),
                generation: 1,
            },
            0,
        );
        let why = Refusal::Storage {
            op: "rename".into(),
            path: "x".into(),
            error: "EIO".into(),
        };
        s.step(Event::InstallFailed { txid: TxId(1), why }, 0);
        assert_eq!(s.active.as_ref().map(|a| a.phase), Some(Phase::Installing));
        // An abort (from anyone) is refused: the decision was commit.
        let a = s.step(
            Event::Abort {
                txid: TxId(1),
                generation: 1,
            },
            0,
        );
        assert_eq!(
            replies(&a),
            vec![&Response::Refused(Refusal::AlreadyCommitted {
                txid: TxId(1)
            })]
        );
        // A fencing query answers committed.
        let a = s.step(
            Event::Query {
                txid: TxId(1),
                generation: 1,
                fence: true,
            },
            0,
        );
        assert_eq!(
            replies(&a),
            vec![&Response::Outcome(OutcomeAnswer::Committed {
                generation: 1
            })]
        );
        // The retry installs.
        assert_eq!(
            s.step(
                Event::Commit {
                    txid: TxId(1),
                    generation: 1
                },
                0
            ),
            vec![Action::Install { txid: TxId(1) }]
        );
        s.step(Event::InstallDone { txid: TxId(1) }, 0);
        assert_eq!(s.generation, 1);
    }

    /// Commits `n` transactions 1..=n, generation = txid.
    fn committed(n: u128) -> TableState {
        let mut s = TableState::default();
        for t in 1..=n {
            s.step(prepare(t, t as u64), 0);
            s.step(Event::StageDone { txid: TxId(t) }, 0);
            s.step(
                Event::Commit {
                    txid: TxId(t),
                    generation: t as u64,
                },
                0,
            );
            s.step(Event::InstallDone { txid: TxId(t) }, 0);
        }
        s
    }

    #[test]
    fn a_forgotten_commit_is_unknown_never_aborted() {
        let n = RECENT as u128 + 10;
        let mut s = committed(n);
        assert_eq!(s.outcome_of(TxId(1)), None, "evicted from memory");
        for fence in [false, true] {
            let a = s.step(
                Event::Query {
                    txid: TxId(1),
                    generation: 1,
                    fence,
                },
                0,
            );
            assert_eq!(
                replies(&a),
                vec![&Response::Outcome(OutcomeAnswer::Unknown)]
            );
        }
        // A late commit delivery is acknowledged, an abort changes nothing.
        let a = s.step(
            Event::Commit {
                txid: TxId(1),
                generation: 1,
            },
            0,
        );
        assert_eq!(
            replies(&a),
            vec![&Response::Committed {
                txid: TxId(1),
                generation: 1
            }]
        );
        let before = s.clone();
        s.step(
            Event::Abort {
                txid: TxId(1),
                generation: 1,
            },
            0,
        );
        assert_eq!(s, before);
    }

    #[test]
    fn a_flood_of_fences_cannot_evict_a_fence() {
        let mut s = TableState::default();
        // Fence T=500 at generation 3, then ten thousand other fences.
        let a = s.step(
            Event::Query {
                txid: TxId(500),
                generation: 3,
                fence: true,
            },
            0,
        );
        assert_eq!(a[0], Action::Persist);
        for t in 1000..11000u128 {
            s.step(
                Event::Abort {
                    txid: TxId(t),
                    generation: 2,
                },
                0,
            );
        }
        // T's late prepare is still refused.
        let a = s.step(prepare(500, 3), 0);
        assert!(matches!(
            replies(&a)[..],
            [Response::Refused(Refusal::StaleGeneration { .. })]
        ));
        // And the next coordinator offers above the fence.
        assert_eq!(next_generation(&[s.status("t")]), 4);
    }

    #[test]
    fn an_unknown_transaction_above_the_live_generation_is_fenced_only_when_asked() {
        let mut s = committed(2);
        let a = s.step(
            Event::Query {
                txid: TxId(7),
                generation: 3,
                fence: false,
            },
            0,
        );
        assert_eq!(
            replies(&a),
            vec![&Response::Outcome(OutcomeAnswer::Unknown)]
        );
        assert_eq!(s.fenced, 0);
        let a = s.step(
            Event::Query {
                txid: TxId(7),
                generation: 3,
                fence: true,
            },
            0,
        );
        assert_eq!(
            a,
            vec![
                Action::Persist,
                Action::Reply(Response::Outcome(OutcomeAnswer::Aborted))
            ]
        );
        assert_eq!(s.fenced, 3);
    }

    #[test]
    fn the_coordinator_commits_only_on_unanimous_prepared() {
        assert_eq!(decide(&[Some(Vote::Prepared), None]), None);
        assert_eq!(
            decide(&[Some(Vote::Prepared), Some(Vote::Prepared)]),
            Some(Decision::Commit)
        );
        assert_eq!(
            decide(&[
                Some(Vote::Prepared),
                Some(Vote::Unreachable("timeout".into()))
            ]),
            Some(Decision::Abort { retry: false })
        );
        let busy = Vote::Refused(Refusal::Busy {
            txid: TxId(1),
            generation: 1,
        });
        assert_eq!(
            decide(&[Some(Vote::Prepared), Some(busy)]),
            Some(Decision::Abort { retry: true })
        );
    }

    #[test]
    fn the_next_generation_is_above_live_and_in_progress_ones() {
        let mut a = TableState {
            generation: 4,
            ..Default::default()
        };
        let b = TableState {
            generation: 2,
            ..Default::default()
        };
        assert_eq!(next_generation(&[a.status("t"), b.status("t")]), 5);
        a.step(prepare(1, 9), 0);
        assert_eq!(next_generation(&[a.status("t"), b.status("t")]), 10);
    }
}
