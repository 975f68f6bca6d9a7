//! The modelled cluster: its state, and one function per kind of step, each mirroring the shell
//! it models and calling txmap's own pure logic (`machine::TableState::step`, the coordinator's
//! `attempt::Attempt`, `coordinator::{delivery, resolve, may_recover, log_answer}`,
//! `machine::next_generation`).
//!
//! Disk state is kept twice, `visible` (what a restarted process reads) and `durable` (what
//! survives a power cut); an fsync copies the first to the second, a power cut the second to
//! the first.

use super::oracle::Oracle;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::hash::{Hash, Hasher};
use txmap_common::attempt::{Act, Attempt, Ending, Event as AEvent, Phase as Phase2};
use txmap_common::coordinator::{
    delivery, log_answer, may_recover, resolve, Delivery, Heard, LogAnswer, WriteResult,
};
use txmap_common::decision::Verdict;
use txmap_common::defects::{on, Defect};
use txmap_common::machine::{next_generation, Action, Event, Outcome, Phase, TableState, Vote};
use txmap_common::proto::{OutcomeAnswer, Refusal, Response, Sha256, TxId};

/// Node names: `n1`..`n3` are in service (every transaction's nodes), `n4` is configured but
/// out of service (it answers queries, takes part in nothing).
pub const NAMES: [&str; 4] = ["n1", "n2", "n3", "n4"];
/// In-service nodes (the members of every transaction).
pub const MEMBERS: usize = 3;
const ALL_MEMBERS: u8 = 0b111;
/// The node `txmap recover` runs on (its certificate names the peer of its deliveries).
pub const OPERATOR_NODE: usize = 2;
const TABLE: &str = "t";
/// Transaction ids per coordinator (its attempts).
const TX_PER_COORD: u128 = 8;

/// A decision verdict (the model's copy of [`Verdict`], with `Hash` and `Ord`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum V {
    /// Commit.
    Commit,
    /// Abort.
    Abort,
}

impl V {
    fn of(v: Verdict) -> V {
        match v {
            Verdict::Commit => V::Commit,
            Verdict::Abort => V::Abort,
        }
    }

    fn verdict(self) -> Verdict {
        match self {
            V::Commit => Verdict::Commit,
            V::Abort => Verdict::Abort,
        }
    }
}

/// Something kept on disk: what a restarted process sees, and what survives a power cut.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Disk<T> {
    /// In the page cache / directory as it is now.
    pub visible: T,
    /// On stable storage.
    pub durable: T,
}

impl<T: Clone> Disk<T> {
    fn sync(&mut self) {
        self.durable = self.visible.clone();
    }
    fn power_cut(&mut self) {
        self.visible = self.durable.clone();
    }
}

/// The table's directory: which transaction's content is live, which staged files exist.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Files {
    /// Transaction whose content is live (`None`: the initial table).
    pub live: Option<TxId>,
    /// Staged files of these transactions.
    pub staged: BTreeSet<TxId>,
}

/// A file of the decision log (`decisions/<txid>.open|.json|.delivered`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    /// `<txid>.open`
    Open,
    /// `<txid>.json`
    Decision,
    /// `<txid>.delivered`
    Delivered,
}

/// Its content.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Rec {
    /// Open record (the coordinator's lock is its process: see [`System::alive`]).
    Open {
        /// Generation offered.
        generation: u64,
    },
    /// Decision.
    Decision {
        /// Verdict.
        verdict: V,
        /// Generation.
        generation: u64,
    },
    /// Abort delivered everywhere (tombstone marker).
    Delivered,
}

/// A decision-log directory.
pub type Dir = BTreeMap<(TxId, Kind), Rec>;

/// One node: its `txmapd` (participant, resolver, redrive) and its disk.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Node {
    /// `txmapd` runs.
    pub up: bool,
    /// The machine in memory.
    pub mem: TableState,
    /// The journal file.
    pub journal: Disk<TableState>,
    /// The table directory.
    pub files: Disk<Files>,
    /// The table's `flock` is held by `txmapd`.
    pub lock: bool,
    /// The journal lags behind memory (a write failed).
    pub dirty: bool,
    /// The decision log (only coordinators' nodes ever have entries).
    pub log: Disk<Dir>,
    /// Redrive in progress (volatile): transaction → nodes that answered definitively.
    pub redrive: BTreeMap<TxId, u8>,
}

/// Where a `txmap commit` process is.
#[allow(clippy::large_enum_variant)] // one per coordinator: boxing buys nothing
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum CPhase {
    /// About to start an attempt (read statuses, write the open record, send prepares).
    Start {
        /// Transaction of this attempt.
        txid: TxId,
    },
    /// Open record written: the attempt runs (txmap's own machine, [`Attempt`]).
    Running {
        /// Transaction.
        txid: TxId,
        /// Generation offered.
        generation: u64,
        /// The attempt's state machine.
        attempt: Attempt,
    },
    /// Exited.
    Done,
    /// Killed.
    Crashed,
}

/// One `txmap commit` process.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Coord {
    /// Node it runs on (its decision log is there).
    pub home: usize,
    /// Attempt number (a conflict retries with a new transaction).
    pub attempt: u8,
    /// Its overall deadline has passed (recovery then treats it as dead).
    pub past_deadline: bool,
    /// Where it is.
    pub phase: CPhase,
}

/// Who sent a decision (and gets the answer).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Sender {
    /// A coordinator process (index).
    Coord(u8),
    /// The redrive loop of a node's `txmapd`.
    Redrive(u8),
    /// `txmap recover` (answers are only reported).
    Operator,
}

/// `DecisionLog::finish`/`delivered`: the decision stays as a tombstone. With defect 1 (its
/// redrive half: a storage refusal counted as final, then the commit record deleted, as
/// `finish` did before tombstones), the commit record is forgotten.
fn finish(log: &mut BTreeMap<(TxId, Kind), Rec>, txid: TxId) {
    let is_commit = matches!(
        log.get(&(txid, Kind::Decision)),
        Some(Rec::Decision {
            verdict: V::Commit,
            ..
        })
    );
    if is_commit && (on(Defect::InstallFailedDropsToPrepared) || on(Defect::FinishForgetsCommit)) {
        log.remove(&(txid, Kind::Decision)); // DEFECT (test only)
    } else {
        log.insert((txid, Kind::Delivered), Rec::Delivered);
    }
    log.remove(&(txid, Kind::Open));
}

/// A message in flight. The network is a set: any message may be delivered in any order, late
/// or never (loss); duplication is a fault (a copy is kept after delivery).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Msg {
    /// Prepare (header + body) to a node.
    Prepare {
        /// Node.
        to: u8,
        /// Transaction.
        txid: TxId,
        /// Generation offered.
        generation: u64,
    },
    /// A node's answer to a prepare.
    Vote {
        /// Transaction.
        txid: TxId,
        /// Node.
        from: u8,
        /// Its answer.
        resp: Response,
    },
    /// Commit or Abort to a node.
    Decide {
        /// Node.
        to: u8,
        /// Transaction.
        txid: TxId,
        /// Generation.
        generation: u64,
        /// Commit or abort.
        verdict: V,
        /// Sender.
        from: Sender,
    },
    /// A copy of a node's outcome question that arrives late (a fault: the asker timed out,
    /// or learned the outcome elsewhere, and no longer waits for the answer).
    Query {
        /// Node asked.
        to: u8,
        /// Node that asked.
        from: u8,
        /// Transaction.
        txid: TxId,
        /// Its generation, as the asker holds it.
        generation: u64,
    },
    /// A node's answer to a decision.
    Ack {
        /// The sender of the decision.
        to: Sender,
        /// Transaction.
        txid: TxId,
        /// Node.
        from: u8,
        /// What was delivered.
        verdict: V,
        /// Its answer.
        resp: Response,
    },
}

/// What happened to one transaction (history variables, for the properties only).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Ghost {
    /// Nodes that ever held it committed (installing, installed, remembered committed).
    pub committed: u8,
    /// Nodes that ever recorded it aborted.
    pub aborted: u8,
    /// Nodes that ever answered *prepared* to its prepare.
    pub voted: u8,
    /// A coordinator decided commit and started delivering it.
    pub reported: bool,
}

/// The whole modelled system.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct System {
    /// `n1`..`n4`.
    pub nodes: Vec<Node>,
    /// `txmap commit` processes: C1 on n1, C2 on n2.
    pub coords: Vec<Coord>,
    /// Messages in flight, canonically ordered.
    pub net: Vec<Msg>,
    /// Faults left.
    pub budget: u8,
    /// `txmap recover` runs left.
    pub operator: u8,
    /// Outcome questions may be delayed (a fault).
    pub late_questions: bool,
    /// Attempts per coordinator.
    pub attempts: u8,
    /// History of each transaction.
    pub ghost: BTreeMap<TxId, Ghost>,
}

/// One kind of step (with its parameters); [`System::apply`] runs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Deliver the message at this index of `net`; `true`: keep a copy (duplication fault).
    Deliver(usize, bool),
    /// Coordinator `k` reads every node's status, writes its open record and sends its
    /// prepares. (The reads are one step: each node's `next_generation` only grows, so reading
    /// them at different times yields no offer that reading them at one time cannot.)
    OpenAndPrepare(usize),
    /// Coordinator `k` stops waiting for missing votes (prepare deadline).
    VoteTimeout(usize),
    /// Coordinator `k` decides from its votes.
    Decide(usize),
    /// Coordinator `k` fsyncs the decision directory after linking its commit record.
    SyncDecision(usize),
    /// Coordinator `k` sends its commit again to node `i` (its delivery retries).
    Resend(usize, usize),
    /// Coordinator `k` stops delivering (all answered, or its deadline) and exits or retries.
    EndDelivery(usize),
    /// Coordinator `k`'s overall deadline passes.
    Deadline(usize),
    /// Coordinator `k` is killed.
    CoordCrash(usize),
    /// Node `i` finishes staging (build, verify, fsync), or fails to.
    StageFinish(usize),
    /// Node `i`'s resolve loop retries a failed install.
    InstallRetry(usize),
    /// Node `i`'s resolve loop resolves its prepared transaction (`resolve_one`).
    Resolve(usize),
    /// Node `i`'s redrive fences a dead coordinator's open transaction.
    RedriveFence(usize, TxId),
    /// Node `i`'s redrive (re-)sends a recorded decision.
    RedriveSend(usize, TxId),
    /// Node `i`'s redrive forgets a decision every node answered.
    RedriveFinish(usize, TxId),
    /// Node `i`'s `txmapd` is killed.
    Crash(usize),
    /// Node `i` loses power (both processes die, unsynced disk changes are lost).
    PowerCut(usize),
    /// Node `i`'s `txmapd` starts.
    Restart(usize),
    /// Node `i` forgets its oldest remembered outcome (as if 64 newer ones came).
    Evict(usize),
    /// `txmap recover --commit|--abort TXID`.
    Recover(TxId, bool),
}

fn storage(op: &str) -> Refusal {
    Refusal::Storage {
        op: op.into(),
        path: String::new(),
        error: "EIO".into(),
    }
}

fn bit(i: usize) -> u8 {
    1 << i
}

fn names(mask: u8) -> String {
    let v: Vec<&str> = (0..4)
        .filter(|i| mask & bit(*i) != 0)
        .map(|i| NAMES[i])
        .collect();
    v.join(",")
}

fn members() -> Vec<String> {
    NAMES[..MEMBERS].iter().map(|s| s.to_string()).collect()
}

fn index_of(name: &str) -> Option<usize> {
    NAMES.iter().position(|n| *n == name)
}

fn hash_of<T: Hash>(t: &T) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    t.hash(&mut h);
    h.finish()
}

/// Short name of a transaction: T1 (C1's first attempt), T2 (C2's first), T1b (C1's second).
pub fn tx(t: TxId) -> String {
    let k = (t.0 - 1) / TX_PER_COORD;
    let a = (t.0 - 1) % TX_PER_COORD;
    let suffix = if a == 0 {
        String::new()
    } else {
        ((b'a' + a as u8) as char).to_string()
    };
    format!("T{}{suffix}", k + 1)
}

fn resp_text(r: &Response) -> String {
    match r {
        Response::Prepared { .. } => "Prepared".into(),
        Response::Committed { generation, .. } => format!("Committed(gen {generation})"),
        Response::Aborted { .. } => "Aborted".into(),
        Response::Outcome(x) => format!("Outcome({x:?})"),
        Response::Refused(r) => format!("Refused({r})"),
        other => format!("{other:?}"),
    }
}

impl Msg {
    /// One line for traces.
    pub fn describe(&self) -> String {
        let sender = |s: &Sender| match s {
            Sender::Coord(k) => format!("C{}", k + 1),
            Sender::Redrive(h) => format!("redrive@{}", NAMES[*h as usize]),
            Sender::Operator => "recover".into(),
        };
        match self {
            Msg::Prepare {
                to,
                txid,
                generation,
            } => format!(
                "Prepare {} (gen {generation}) -> {}",
                tx(*txid),
                NAMES[*to as usize]
            ),
            Msg::Vote { txid, from, resp } => format!(
                "{} -> C: vote on {} = {}",
                NAMES[*from as usize],
                tx(*txid),
                resp_text(resp)
            ),
            Msg::Decide {
                to,
                txid,
                verdict,
                from,
                ..
            } => format!(
                "{:?} {} from {} -> {}",
                verdict,
                tx(*txid),
                sender(from),
                NAMES[*to as usize]
            ),
            Msg::Query { to, from, txid, .. } => format!(
                "LATE question from {}: what became of {}? -> {}",
                NAMES[*from as usize],
                tx(*txid),
                NAMES[*to as usize]
            ),
            Msg::Ack {
                to,
                txid,
                from,
                verdict,
                resp,
            } => format!(
                "{} -> {}: answer to {:?} {} = {}",
                NAMES[*from as usize],
                sender(to),
                verdict,
                tx(*txid),
                resp_text(resp)
            ),
        }
    }
}

impl System {
    /// The initial state: every node at generation 0, coordinators about to read statuses.
    pub fn new(coordinators: usize, faults: u8, attempts: u8, operator: bool) -> System {
        let node = Node {
            up: true,
            mem: TableState::default(),
            journal: Disk::default(),
            files: Disk::default(),
            lock: false,
            dirty: false,
            log: Disk::default(),
            redrive: BTreeMap::new(),
        };
        let coords = (0..coordinators)
            .map(|k| Coord {
                home: k,
                attempt: 0,
                past_deadline: false,
                phase: CPhase::Start {
                    txid: Self::txid(k, 0),
                },
            })
            .collect();
        System {
            nodes: vec![node; 4],
            coords,
            net: Vec::new(),
            budget: faults,
            operator: u8::from(operator),
            late_questions: false,
            attempts,
            ghost: BTreeMap::new(),
        }
    }

    /// The same, with delayed outcome questions as a fault kind (or not).
    pub fn with_late_questions(mut self, on: bool) -> System {
        self.late_questions = on;
        self
    }

    fn txid(k: usize, attempt: u8) -> TxId {
        TxId(k as u128 * TX_PER_COORD + attempt as u128 + 1)
    }

    /// The coordinator that owns `txid`.
    pub fn owner(txid: TxId) -> usize {
        ((txid.0 - 1) / TX_PER_COORD) as usize
    }

    /// A 64-bit digest of the state (the explorer's visited set).
    pub fn digest(&self) -> u64 {
        hash_of(self)
    }

    fn send(&mut self, m: Msg) {
        if !self.net.contains(&m) {
            self.net.push(m);
            self.net.sort_by_key(hash_of);
        }
    }

    fn drop_replies_to(&mut self, s: Sender) {
        self.net.retain(|m| match m {
            Msg::Ack { to, .. } => *to != s,
            Msg::Vote { txid, .. } => Sender::Coord(Self::owner(*txid) as u8) != s,
            _ => true,
        });
    }

    /// Whether the coordinator of `txid`, on node `h`, holds the lock on its open record and is
    /// within its deadline ([`txmap_common::decision::DecisionLog::coordinator_alive`]).
    pub fn alive(&self, h: usize, txid: TxId) -> bool {
        let Some(c) = self.coords.get(Self::owner(txid)) else {
            return false;
        };
        let holds = matches!(&c.phase, CPhase::Running { txid: t, attempt, .. }
            if *t == txid && attempt.ending().is_none());
        c.home == h && holds && !c.past_deadline
    }

    // ---- the participant's shell (participant/src/server.rs) ----

    /// `Journal::store`: a staging transaction is stored as absent.
    fn journal_store(&mut self, i: usize, st: &TableState, o: &mut Oracle) -> Result<(), ()> {
        let mut d = st.clone();
        if d.active.as_ref().is_some_and(|a| a.phase == Phase::Staging) {
            d.active = None;
        }
        if o.fault(&mut self.budget, || {
            format!("{}: journal write fails", NAMES[i])
        }) {
            if o.choose(2) == 1 {
                o.note(|| "  (after its rename: visible, not durable)".into());
                self.nodes[i].journal.visible = d;
            } else {
                o.note(|| "  (before its rename: nothing changed)".into());
            }
            return Err(());
        }
        let j = &mut self.nodes[i].journal;
        j.visible = d;
        j.sync();
        Ok(())
    }

    /// `Node::flush`: a journal that lags behind is written before anything is answered.
    fn flush(&mut self, i: usize, o: &mut Oracle) -> Result<(), Response> {
        if !self.nodes[i].dirty {
            return Ok(());
        }
        let st = self.nodes[i].mem.clone();
        match self.journal_store(i, &st, o) {
            Ok(()) => {
                self.nodes[i].dirty = false;
                Ok(())
            }
            Err(()) => Err(Response::Refused(storage("journal"))),
        }
    }

    /// `install_checked` + `table::install` (renames, then a directory fsync).
    fn install_checked(&mut self, i: usize, txid: TxId, o: &mut Oracle) -> Result<(), ()> {
        let f = &self.nodes[i].files.visible;
        if !f.staged.contains(&txid) {
            return if f.live == Some(txid) {
                Ok(())
            } else {
                Err(())
            };
        }
        if o.fault(&mut self.budget, || {
            format!("{}: install of {} fails (rename)", NAMES[i], tx(txid))
        }) {
            return Err(());
        }
        let f = &mut self.nodes[i].files.visible;
        f.staged.remove(&txid);
        f.live = Some(txid);
        if o.fault(&mut self.budget, || {
            format!(
                "{}: install of {}: directory fsync fails after the renames",
                NAMES[i],
                tx(txid)
            )
        }) {
            return Err(());
        }
        self.nodes[i].files.sync();
        Ok(())
    }

    /// `Node::execute`: runs the machine's actions in order.
    fn execute(&mut self, i: usize, actions: Vec<Action>, o: &mut Oracle) -> Response {
        let mut queue: VecDeque<Action> = actions.into();
        let mut persist_error = false;
        let mut reply = Response::Refused(Refusal::Protocol {
            detail: "no reply".into(),
        });
        while let Some(a) = queue.pop_front() {
            match a {
                Action::Stage { .. } | Action::DiscardBody => {}
                Action::Persist => {
                    let st = self.nodes[i].mem.clone();
                    if self.journal_store(i, &st, o).is_err() {
                        persist_error = true;
                    }
                }
                Action::RemoveStaged { txid } => {
                    self.nodes[i].files.visible.staged.remove(&txid);
                }
                Action::Unlock => self.nodes[i].lock = false,
                Action::Install { txid } => {
                    let held = self.nodes[i]
                        .mem
                        .active
                        .as_ref()
                        .is_some_and(|a| a.txid == txid);
                    let ok = held && self.install_checked(i, txid, o).is_ok();
                    let ev = if ok {
                        Event::InstallDone { txid }
                    } else {
                        Event::InstallFailed {
                            txid,
                            why: storage("rename"),
                        }
                    };
                    queue.extend(self.nodes[i].mem.step(ev, 0));
                }
                Action::Reply(r) => reply = r,
            }
        }
        if persist_error {
            if let Response::Prepared { txid } = reply {
                // Not durable, so not prepared: undo it all.
                let n = &mut self.nodes[i];
                if n.mem.active.as_ref().is_some_and(|a| a.txid == txid) {
                    n.mem.active = None;
                }
                n.files.visible.staged.remove(&txid);
                n.lock = false;
                return Response::Refused(storage("journal"));
            }
            self.nodes[i].dirty = true;
            return Response::Refused(storage("journal"));
        }
        reply
    }

    /// `Node::decide`: authority check, then the machine. `peer`: `None` for a local retry.
    fn decide_shell(
        &mut self,
        i: usize,
        event: Event,
        peer: Option<usize>,
        o: &mut Oracle,
    ) -> Response {
        if let Err(r) = self.flush(i, o) {
            return r;
        }
        if let Some(p) = peer {
            let txid = match &event {
                Event::Commit { txid, .. } | Event::Abort { txid, .. } => Some(*txid),
                _ => None,
            };
            let in_service = p < MEMBERS;
            let member = self.nodes[i]
                .mem
                .active
                .as_ref()
                .filter(|a| Some(a.txid) == txid)
                .is_none_or(|a| a.coordinator == NAMES[p] || a.nodes.iter().any(|n| n == NAMES[p]));
            if !in_service || !member {
                return Response::Refused(Refusal::NotAuthorized {
                    detail: "not the transaction's".into(),
                });
            }
        }
        let actions = self.nodes[i].mem.step(event, 0);
        self.execute(i, actions, o)
    }

    /// `DecisionLog::get`: read, and fsync the directory before returning a decision.
    fn log_get(&mut self, h: usize, txid: TxId, o: &mut Oracle) -> Result<Option<(V, u64)>, ()> {
        match self.nodes[h]
            .log
            .visible
            .get(&(txid, Kind::Decision))
            .copied()
        {
            Some(Rec::Decision {
                verdict,
                generation,
            }) => {
                // DEFECT (test only, issue 9 #5): the old read acted on a decision before the
                // directory holding its link was fsynced.
                if !on(Defect::DecisionVisibleBeforeDurable) {
                    self.log_sync(h, o)?;
                }
                Ok(Some((verdict, generation)))
            }
            _ => Ok(None),
        }
    }

    fn log_sync(&mut self, h: usize, o: &mut Oracle) -> Result<(), ()> {
        if o.fault(&mut self.budget, || {
            format!("{}: fsync of the decision directory fails", NAMES[h])
        }) {
            return Err(());
        }
        self.nodes[h].log.sync();
        Ok(())
    }

    /// The no-replace link of `write_atomic` (after the temporary file is written and fsynced).
    /// `Ok(false)`: a decision exists already.
    fn log_link(
        &mut self,
        h: usize,
        txid: TxId,
        verdict: V,
        generation: u64,
        o: &mut Oracle,
    ) -> Result<bool, ()> {
        if o.fault(&mut self.budget, || {
            format!(
                "{}: writing the {verdict:?} record of {} fails before its link",
                NAMES[h],
                tx(txid)
            )
        }) {
            return Err(());
        }
        let log = &mut self.nodes[h].log.visible;
        if log.contains_key(&(txid, Kind::Decision)) {
            return Ok(false);
        }
        log.insert(
            (txid, Kind::Decision),
            Rec::Decision {
                verdict,
                generation,
            },
        );
        Ok(true)
    }

    /// `DecisionLog::decide`: no-replace write, then the decision that stands.
    fn log_decide(
        &mut self,
        h: usize,
        txid: TxId,
        verdict: V,
        generation: u64,
        o: &mut Oracle,
    ) -> Result<(V, u64), ()> {
        if self.log_link(h, txid, verdict, generation, o)? {
            self.log_sync(h, o)?;
            return Ok((verdict, generation));
        }
        self.log_get(h, txid, o)?.ok_or(())
    }

    /// `Node::outcome`: the decision log first (`log_answer`), then the machine's `Query`.
    fn outcome(
        &mut self,
        j: usize,
        txid: TxId,
        generation: u64,
        fence: bool,
        o: &mut Oracle,
    ) -> Result<OutcomeAnswer, ()> {
        if !self.nodes[j].up {
            return Err(());
        }
        let decision = self.log_get(j, txid, o)?;
        let open = match self.nodes[j].log.visible.get(&(txid, Kind::Open)) {
            Some(Rec::Open { generation }) => Some((*generation, self.alive(j, txid))),
            _ => None,
        };
        self.flush(j, o).map_err(|_| ())?;
        let own = self.nodes[j]
            .mem
            .active
            .as_ref()
            .filter(|a| a.txid == txid && a.phase == Phase::Prepared)
            .filter(|a| a.coordinator == NAMES[j])
            .map(|a| a.generation);
        // Only the transaction's coordinator's node answers from its decision log (the
        // request names the coordinator); any other node answers from its machine.
        let coordinated_here = self
            .coords
            .get(Self::owner(txid))
            .is_some_and(|c| c.home == j);
        let from_log = if coordinated_here {
            log_answer(
                decision.map(|(v, g)| (v.verdict(), g)),
                open.map(|(_, alive)| alive),
                fence,
            )
        } else {
            LogAnswer::AskParticipant
        };
        match from_log {
            LogAnswer::Answer(x) => Ok(x),
            LogAnswer::Fence => {
                let g = open.map(|(g, _)| g).or(own).unwrap_or(generation);
                o.note(|| format!("  {} fences {} in its decision log", NAMES[j], tx(txid)));
                let (v, g) = self.log_decide(j, txid, V::Abort, g, o)?;
                Ok(match v {
                    V::Commit => OutcomeAnswer::Committed { generation: g },
                    V::Abort => OutcomeAnswer::Aborted,
                })
            }
            LogAnswer::AskParticipant => {
                let actions = self.nodes[j].mem.step(
                    Event::Query {
                        txid,
                        generation,
                        fence,
                    },
                    0,
                );
                match self.execute(j, actions, o) {
                    Response::Outcome(x) => Ok(x),
                    _ => Err(()),
                }
            }
        }
    }

    /// A node's answer to a prepare reaches the waiting coordinator at once, or is lost. (Its
    /// arrival time does not matter otherwise: the coordinator acts only once every vote is in
    /// or its prepare deadline passed.)
    fn vote(&mut self, i: usize, txid: TxId, resp: Response, o: &mut Oracle) {
        if matches!(resp, Response::Prepared { .. }) {
            self.ghost.entry(txid).or_default().voted |= bit(i);
        }
        let k = Self::owner(txid);
        let waiting = matches!(&self.coords[k].phase, CPhase::Running { txid: t, attempt, .. }
            if *t == txid && attempt.awaits_vote(i));
        if waiting && !o.lost(|| format!("{}'s answer to the prepare", NAMES[i])) {
            self.receive(Msg::Vote {
                txid,
                from: i as u8,
                resp,
            });
        }
    }

    /// A node's answer to a decision reaches its sender at once, or is lost (same argument).
    fn answer(
        &mut self,
        to: Sender,
        txid: TxId,
        from: usize,
        verdict: V,
        resp: Response,
        o: &mut Oracle,
    ) {
        let waiting = match to {
            Sender::Coord(k) => matches!(&self.coords[k as usize].phase,
                CPhase::Running { txid: t, attempt, .. }
                    if *t == txid && attempt.delivering() == Some(verdict.verdict())),
            Sender::Redrive(h) => {
                self.nodes[h as usize].up && self.nodes[h as usize].redrive.contains_key(&txid)
            }
            Sender::Operator => false,
        };
        if waiting && !o.lost(|| format!("{}'s answer", NAMES[from])) {
            self.receive(Msg::Ack {
                to,
                txid,
                from: from as u8,
                verdict,
                resp,
            });
        }
    }

    // ---- delivery of one message ----

    fn deliver(&mut self, m: Msg, o: &mut Oracle) {
        match m {
            Msg::Vote { .. } | Msg::Ack { .. } => self.receive(m),
            Msg::Query {
                to,
                txid,
                generation,
                ..
            } => {
                // `Node::outcome` answers (and may fence); nobody waits for the answer.
                match self.outcome(to as usize, txid, generation, true, o) {
                    Ok(x) => {
                        o.note(|| format!("  {} answers {x:?} (to nobody)", NAMES[to as usize]))
                    }
                    Err(()) => o.note(|| format!("  {} cannot answer", NAMES[to as usize])),
                }
            }
            Msg::Prepare {
                to,
                txid,
                generation,
            } => {
                let i = to as usize;
                let k = Self::owner(txid);
                let home = self.coords[k].home;
                // `Node::prepare`: the peer is the coordinator it names, in service.
                if let Err(r) = self.flush(i, o) {
                    self.vote(i, txid, r, o);
                    return;
                }
                let ev = Event::Prepare {
                    txid,
                    generation,
                    coordinator: NAMES[home].into(),
                    sha256: Sha256([k as u8 + 1; 32]),
                    entries: 1,
                    nodes: members(),
                    change: None,
                };
                let actions = self.nodes[i].mem.step(ev, 0);
                if actions.first() == Some(&Action::Stage { txid }) {
                    // `stage`: takes the lock, receives, builds (finished by StageFinish).
                    let n = &mut self.nodes[i];
                    n.lock = true;
                    n.files.visible.staged.insert(txid);
                    return;
                }
                let r = self.execute(i, actions, o);
                self.vote(i, txid, r, o);
            }
            Msg::Decide {
                to,
                txid,
                generation,
                verdict,
                from,
            } => {
                let i = to as usize;
                let peer = match from {
                    Sender::Coord(k) => self.coords[k as usize].home,
                    Sender::Redrive(h) => h as usize,
                    Sender::Operator => OPERATOR_NODE,
                };
                let ev = match verdict {
                    V::Commit => Event::Commit { txid, generation },
                    V::Abort => Event::Abort { txid, generation },
                };
                let r = self.decide_shell(i, ev, Some(peer), o);
                o.note(|| format!("  {} answers {}", NAMES[i], resp_text(&r)));
                self.answer(from, txid, i, verdict, r, o);
            }
        }
    }

    fn receive(&mut self, m: Msg) {
        match m {
            Msg::Prepare { .. } | Msg::Decide { .. } | Msg::Query { .. } => {}
            Msg::Vote { txid, from, resp } => {
                let k = Self::owner(txid);
                if let CPhase::Running {
                    txid: t, attempt, ..
                } = &mut self.coords[k].phase
                {
                    if *t == txid {
                        // `prepare_one`.
                        let vote = match resp {
                            Response::Prepared { .. } => Vote::Prepared,
                            Response::Refused(r) => Vote::Refused(r),
                            _ => Vote::Unreachable("unexpected answer".into()),
                        };
                        attempt.step(AEvent::Vote {
                            node: from as usize,
                            vote,
                        });
                    }
                }
            }
            Msg::Ack {
                to,
                txid,
                from,
                verdict,
                resp,
            } => match to {
                Sender::Coord(k) => {
                    if let CPhase::Running {
                        txid: t, attempt, ..
                    } = &mut self.coords[k as usize].phase
                    {
                        if *t == txid && attempt.delivering() == Some(verdict.verdict()) {
                            let answer = delivery(verdict.verdict(), Some(&resp));
                            attempt.step(AEvent::Answer {
                                node: from as usize,
                                answer,
                            });
                        }
                    }
                }
                Sender::Redrive(h) => {
                    let n = &mut self.nodes[h as usize];
                    if let Some(m) = n.redrive.get_mut(&txid) {
                        match delivery(verdict.verdict(), Some(&resp)) {
                            Delivery::Acked | Delivery::Contradicts(_) => *m |= bit(from as usize),
                            Delivery::Retry(_) => {}
                        }
                    }
                }
                Sender::Operator => {}
            },
        }
    }

    // ---- the coordinator (coordinator/src/commit.rs) ----

    fn read_back(&mut self, h: usize, txid: TxId, o: &mut Oracle) -> WriteResult {
        match self.log_get(h, txid, o) {
            Ok(d) => WriteResult::ReadBack(d.map(|(v, _)| v.verdict())),
            Err(()) => WriteResult::Unreadable,
        }
    }

    /// Executes what coordinator `k`'s attempt asks for (as `commit_with` does), feeding back
    /// what came of each action, until the attempt waits for the network or a step.
    fn run_acts(&mut self, k: usize, acts: Vec<Act>, o: &mut Oracle) {
        let CPhase::Running {
            txid, generation, ..
        } = self.coords[k].phase
        else {
            return;
        };
        let home = self.coords[k].home;
        let mut queue: VecDeque<Act> = acts.into();
        while let Some(act) = queue.pop_front() {
            let event = match act {
                Act::SendPrepares => {
                    for i in 0..MEMBERS {
                        self.send(Msg::Prepare {
                            to: i as u8,
                            txid,
                            generation,
                        });
                    }
                    None
                }
                Act::WriteCommit => match self.log_link(home, txid, V::Commit, generation, o) {
                    Ok(true) => {
                        // The directory fsync is a step of its own (`SyncDecision`).
                        o.note(|| "  commit record linked (not yet durable)".into());
                        None
                    }
                    Ok(false) => {
                        // The no-replace link lost: `decide` returns what stands (via `get`).
                        let w = match self.log_get(home, txid, o) {
                            Ok(Some((v, _))) => WriteResult::Stands(v.verdict()),
                            _ => self.read_back(home, txid, o),
                        };
                        Some(AEvent::CommitWritten(w))
                    }
                    Err(()) => Some(AEvent::CommitWritten(self.read_back(home, txid, o))),
                },
                Act::WriteAbort => Some(AEvent::AbortWritten(
                    self.log_decide(home, txid, V::Abort, generation, o).is_ok(),
                )),
                Act::Deliver(verdict) => {
                    let v = V::of(verdict);
                    if v == V::Commit {
                        self.ghost.entry(txid).or_default().reported = true;
                    }
                    for i in 0..MEMBERS {
                        self.send(Msg::Decide {
                            to: i as u8,
                            txid,
                            generation,
                            verdict: v,
                            from: Sender::Coord(k as u8),
                        });
                    }
                    None
                }
                Act::Finish => {
                    finish(&mut self.nodes[home].log.visible, txid);
                    None
                }
                Act::MarkDelivered => {
                    self.nodes[home]
                        .log
                        .visible
                        .insert((txid, Kind::Delivered), Rec::Delivered);
                    None
                }
                Act::Close => {
                    self.nodes[home].log.visible.remove(&(txid, Kind::Open));
                    None
                }
            };
            if let Some(e) = event {
                o.note(|| format!("  C{}: {e:?}", k + 1));
                if let CPhase::Running { attempt, .. } = &mut self.coords[k].phase {
                    queue.extend(attempt.step(e));
                }
            }
        }
        let ending = match &self.coords[k].phase {
            CPhase::Running { attempt, .. } => attempt.ending(),
            _ => None,
        };
        let c = &mut self.coords[k];
        match ending {
            None => {}
            Some(Ending::Aborted { retry: true }) if c.attempt + 1 < self.attempts => {
                c.attempt += 1;
                let t = Self::txid(k, c.attempt);
                o.note(|| format!("  conflict: retries as {}", tx(t)));
                c.phase = CPhase::Start { txid: t };
            }
            // Exits (after `Unsure`, the open record stays; its lock goes with the process).
            Some(_) => c.phase = CPhase::Done,
        }
    }

    /// Feeds one event to coordinator `k`'s attempt and runs what it asks for.
    fn coord_event(&mut self, k: usize, e: AEvent, o: &mut Oracle) {
        let acts = match &mut self.coords[k].phase {
            CPhase::Running { attempt, .. } => attempt.step(e),
            _ => return,
        };
        self.run_acts(k, acts, o);
    }

    // ---- steps ----

    /// Every step enabled in this state (each may still branch on the oracle's choices).
    pub fn steps(&self) -> Vec<Step> {
        self.steps_all()
    }

    /// `DecisionLog::list` + redrive's filter: not delivered, and its coordinator is not still
    /// at work on it.
    fn redrive_lists(&self, h: usize, t: TxId) -> bool {
        let log = &self.nodes[h].log.visible;
        let delivered = log.contains_key(&(t, Kind::Delivered));
        let delivering = log.contains_key(&(t, Kind::Open)) && self.alive(h, t);
        !delivered && !delivering
    }

    fn steps_all(&self) -> Vec<Step> {
        let mut v = Vec::new();
        for (idx, m) in self.net.iter().enumerate() {
            let to = match m {
                Msg::Prepare { to, .. } | Msg::Decide { to, .. } | Msg::Query { to, .. } => {
                    Some(*to as usize)
                }
                _ => None,
            };
            if to.is_none_or(|i| self.nodes[i].up) {
                v.push(Step::Deliver(idx, false));
                if self.budget > 0 {
                    v.push(Step::Deliver(idx, true));
                }
            }
        }
        for (k, c) in self.coords.iter().enumerate() {
            match &c.phase {
                CPhase::Start { .. } => v.push(Step::OpenAndPrepare(k)),
                CPhase::Running { attempt, .. } => match &attempt.phase {
                    Phase2::Preparing { .. } if attempt.votes_in() => v.push(Step::Decide(k)),
                    Phase2::Preparing { .. } => v.push(Step::VoteTimeout(k)),
                    Phase2::WritingCommit => v.push(Step::SyncDecision(k)),
                    Phase2::Delivering { .. } => {
                        for i in 0..MEMBERS {
                            if attempt.resend_to(i) {
                                v.push(Step::Resend(k, i));
                            }
                        }
                        v.push(Step::EndDelivery(k));
                    }
                    // Run to their end within the step that entered them.
                    Phase2::WritingAbort { .. } | Phase2::Over(_) => {}
                },
                CPhase::Done | CPhase::Crashed => continue,
            }
            if !c.past_deadline {
                v.push(Step::Deadline(k));
            }
            if self.budget > 0 {
                v.push(Step::CoordCrash(k));
            }
        }
        for (i, n) in self.nodes.iter().enumerate() {
            if !n.up {
                v.push(Step::Restart(i));
                continue;
            }
            match n.mem.active.as_ref().map(|a| a.phase) {
                Some(Phase::Staging) => v.push(Step::StageFinish(i)),
                Some(Phase::Installing) => v.push(Step::InstallRetry(i)),
                Some(Phase::Prepared) => v.push(Step::Resolve(i)),
                None => {}
            }
            for ((t, kind), rec) in &n.log.visible {
                match (kind, rec) {
                    (Kind::Open, _) if !self.alive(i, *t) => v.push(Step::RedriveFence(i, *t)),
                    (Kind::Decision, _) if self.redrive_lists(i, *t) => {
                        v.push(Step::RedriveSend(i, *t))
                    }
                    _ => {}
                }
            }
            for (t, m) in &n.redrive {
                if *m == ALL_MEMBERS {
                    v.push(Step::RedriveFinish(i, *t));
                }
            }
            if self.budget > 0 {
                v.push(Step::Crash(i));
                v.push(Step::PowerCut(i));
                if !n.mem.recent.is_empty() {
                    v.push(Step::Evict(i));
                }
            }
        }
        if self.operator > 0 {
            let mut held: Vec<TxId> = self
                .nodes
                .iter()
                .filter(|n| n.up)
                .filter_map(|n| n.mem.active.as_ref().map(|a| a.txid))
                .collect();
            held.sort();
            held.dedup();
            for t in held {
                v.push(Step::Recover(t, false));
                v.push(Step::Recover(t, true));
            }
        }
        v
    }

    /// One line describing a step (before it runs).
    pub fn describe(&self, step: &Step) -> String {
        let c = |k: &usize| format!("C{}@{}", k + 1, NAMES[self.coords[*k].home]);
        match step {
            Step::Deliver(idx, dup) => format!(
                "deliver{} {}",
                if *dup {
                    " (DUPLICATED: a copy stays in flight)"
                } else {
                    ""
                },
                self.net[*idx].describe()
            ),
            Step::OpenAndPrepare(k) => format!(
                "{} reads every status, writes its open record, sends Prepare to every node",
                c(k)
            ),
            Step::VoteTimeout(k) => {
                format!("{}: prepare deadline, missing votes are unreachable", c(k))
            }
            Step::Decide(k) => format!("{} decides from its votes", c(k)),
            Step::SyncDecision(k) => format!("{} fsyncs the decision directory", c(k)),
            Step::Resend(k, i) => format!("{} sends its commit again to {}", c(k), NAMES[*i]),
            Step::EndDelivery(k) => format!("{} stops delivering", c(k)),
            Step::Deadline(k) => format!("{}'s overall deadline passes", c(k)),
            Step::CoordCrash(k) => format!("CRASH: {} is killed", c(k)),
            Step::StageFinish(i) => format!("{} finishes staging", NAMES[*i]),
            Step::InstallRetry(i) => format!("{}'s resolve loop retries its install", NAMES[*i]),
            Step::Resolve(i) => format!(
                "{}'s resolve loop asks about its prepared transaction",
                NAMES[*i]
            ),
            Step::RedriveFence(i, t) => {
                format!("redrive@{} fences dead coordinator's {}", NAMES[*i], tx(*t))
            }
            Step::RedriveSend(i, t) => format!(
                "redrive@{} sends the recorded decision of {}",
                NAMES[*i],
                tx(*t)
            ),
            Step::RedriveFinish(i, t) => format!(
                "redrive@{}: every node answered about {}; done",
                NAMES[*i],
                tx(*t)
            ),
            Step::Crash(i) => format!("CRASH: txmapd on {} is killed", NAMES[*i]),
            Step::PowerCut(i) => format!("POWER CUT on {} (unsynced changes lost)", NAMES[*i]),
            Step::Restart(i) => format!("txmapd on {} starts", NAMES[*i]),
            Step::Evict(i) => format!("FORGET: {} evicts its oldest remembered outcome", NAMES[*i]),
            Step::Recover(t, commit) => format!(
                "operator on {}: txmap recover --{} {}",
                NAMES[OPERATOR_NODE],
                if *commit { "commit" } else { "abort" },
                tx(*t)
            ),
        }
    }

    /// Runs one step, asking `o` at every nondeterministic point.
    pub fn apply(&mut self, step: &Step, o: &mut Oracle) {
        match *step {
            Step::Deliver(idx, dup) => {
                let m = if dup {
                    self.budget -= 1;
                    self.net[idx].clone()
                } else {
                    self.net.remove(idx)
                };
                self.deliver(m, o);
            }
            Step::OpenAndPrepare(k) => self.open_and_prepare(k, o),
            Step::VoteTimeout(k) => self.coord_event(k, AEvent::VoteTimeout, o),
            Step::Decide(k) => {
                let past_deadline = self.coords[k].past_deadline;
                self.coord_event(k, AEvent::Decide { past_deadline }, o)
            }
            Step::SyncDecision(k) => {
                let CPhase::Running { txid, .. } = self.coords[k].phase else {
                    return;
                };
                let home = self.coords[k].home;
                let w = match self.log_sync(home, o) {
                    Ok(()) => WriteResult::Stands(Verdict::Commit),
                    Err(()) => self.read_back(home, txid, o),
                };
                o.note(|| format!("  C{}: {w:?}", k + 1));
                self.coord_event(k, AEvent::CommitWritten(w), o);
            }
            Step::Resend(k, i) => {
                if let CPhase::Running {
                    txid,
                    generation,
                    attempt,
                } = &self.coords[k].phase
                {
                    if let Some(verdict) = attempt.delivering() {
                        let m = Msg::Decide {
                            to: i as u8,
                            txid: *txid,
                            generation: *generation,
                            verdict: V::of(verdict),
                            from: Sender::Coord(k as u8),
                        };
                        self.send(m);
                    }
                }
            }
            Step::EndDelivery(k) => {
                self.coord_event(k, AEvent::DeliveryOver, o);
                self.drop_replies_to(Sender::Coord(k as u8));
            }
            Step::Deadline(k) => self.coords[k].past_deadline = true,
            Step::CoordCrash(k) => {
                self.budget -= 1;
                self.coords[k].phase = CPhase::Crashed;
                self.drop_replies_to(Sender::Coord(k as u8));
            }
            Step::StageFinish(i) => {
                let Some(txid) = self.nodes[i].mem.active.as_ref().map(|a| a.txid) else {
                    return;
                };
                // The second node's staging fails as a delta whose base it does not hold (a
                // conflict: the coordinator aborts and retries with the whole table), the
                // others' as a build error (final).
                let delta_base = i == 1;
                let ev = if o.fault(&mut self.budget, || {
                    let what = match delta_base {
                        true => "delta base refused",
                        false => "build error",
                    };
                    format!("{}: staging of {} fails ({what})", NAMES[i], tx(txid))
                }) {
                    Event::StageFailed {
                        txid,
                        why: match delta_base {
                            true => Refusal::DeltaBase {
                                detail: "the delta applies to another base".into(),
                            },
                            false => Refusal::BuildFailed {
                                program: "postmap".into(),
                                status: "1".into(),
                                stderr: String::new(),
                            },
                        },
                    }
                } else {
                    // Built, verified, fsynced (file and directory).
                    self.nodes[i].files.sync();
                    Event::StageDone { txid }
                };
                let actions = self.nodes[i].mem.step(ev, 0);
                let r = self.execute(i, actions, o);
                o.note(|| format!("  {} answers {}", NAMES[i], resp_text(&r)));
                self.vote(i, txid, r, o);
            }
            Step::InstallRetry(i) => {
                let Some(a) = self.nodes[i].mem.active.clone() else {
                    return;
                };
                let r = self.decide_shell(
                    i,
                    Event::Commit {
                        txid: a.txid,
                        generation: a.generation,
                    },
                    None,
                    o,
                );
                o.note(|| format!("  {}", resp_text(&r)));
            }
            Step::Resolve(i) => self.resolve_one(i, o),
            Step::RedriveFence(h, txid) => {
                let Some(Rec::Open { generation }) =
                    self.nodes[h].log.visible.get(&(txid, Kind::Open)).copied()
                else {
                    return;
                };
                if let Ok((v, _)) = self.log_decide(h, txid, V::Abort, generation, o) {
                    o.note(|| format!("  the decision that stands: {v:?}"));
                    self.nodes[h].log.visible.remove(&(txid, Kind::Open));
                }
            }
            Step::RedriveSend(h, txid) => {
                // `DecisionLog::list` fsyncs the directory first (nothing listed if it fails).
                if !on(Defect::DecisionVisibleBeforeDurable) && self.log_sync(h, o).is_err() {
                    return;
                }
                let Some(Rec::Decision {
                    verdict,
                    generation,
                }) = self.nodes[h]
                    .log
                    .visible
                    .get(&(txid, Kind::Decision))
                    .copied()
                else {
                    return;
                };
                let acked = *self.nodes[h].redrive.entry(txid).or_insert(0);
                for i in 0..MEMBERS {
                    if acked & bit(i) == 0 {
                        self.send(Msg::Decide {
                            to: i as u8,
                            txid,
                            generation,
                            verdict,
                            from: Sender::Redrive(h as u8),
                        });
                    }
                }
            }
            Step::RedriveFinish(h, txid) => {
                let n = &mut self.nodes[h];
                n.redrive.remove(&txid);
                let log = &mut n.log.visible;
                // `finish` (commit) and `delivered` (abort): keep the decision as a tombstone
                // (the marker and the unlink are not fsynced).
                finish(log, txid);
            }
            Step::Crash(i) => {
                self.budget -= 1;
                self.crash_txmapd(i);
            }
            Step::PowerCut(i) => {
                self.budget -= 1;
                self.crash_txmapd(i);
                let n = &mut self.nodes[i];
                n.journal.power_cut();
                n.files.power_cut();
                n.log.power_cut();
                for k in 0..self.coords.len() {
                    let c = &mut self.coords[k];
                    if c.home == i && !matches!(c.phase, CPhase::Done | CPhase::Crashed) {
                        c.phase = CPhase::Crashed;
                        self.drop_replies_to(Sender::Coord(k as u8));
                    }
                }
            }
            Step::Restart(i) => self.restart(i, o),
            Step::Evict(i) => {
                self.budget -= 1;
                let n = &mut self.nodes[i];
                if let Some((t, _)) = n.mem.recent.pop_front() {
                    for j in [&mut n.journal.visible, &mut n.journal.durable] {
                        if j.recent.front().is_some_and(|(u, _)| *u == t) {
                            j.recent.pop_front();
                        }
                    }
                    o.note(|| format!("  {} forgets how {} ended", NAMES[i], tx(t)));
                }
            }
            Step::Recover(txid, commit) => self.recover(txid, commit, o),
        }
        self.update_ghost();
    }

    fn open_and_prepare(&mut self, k: usize, o: &mut Oracle) {
        let CPhase::Start { txid } = self.coords[k].phase else {
            return;
        };
        let got: [Option<u64>; MEMBERS] = std::array::from_fn(|i| {
            (self.nodes[i].up && !o.lost(|| format!("status of {}", NAMES[i])))
                .then(|| next_generation(&[self.nodes[i].mem.status(TABLE)]))
        });
        // `next_generation` over the statuses that answered (max of each node's, as one call).
        let generation = got
            .iter()
            .flatten()
            .copied()
            .max()
            .unwrap_or_else(|| next_generation(&[]));
        let home = self.coords[k].home;
        if o.fault(&mut self.budget, || {
            format!(
                "{}: writing the open record of {} fails",
                NAMES[home],
                tx(txid)
            )
        }) {
            if o.choose(2) == 1 {
                o.note(|| "  (after its rename: visible, not durable)".into());
                self.nodes[home]
                    .log
                    .visible
                    .insert((txid, Kind::Open), Rec::Open { generation });
            }
            // Local failure: the command exits.
            self.coords[k].phase = CPhase::Done;
            return;
        }
        let log = &mut self.nodes[home].log;
        log.visible
            .insert((txid, Kind::Open), Rec::Open { generation });
        log.sync();
        // A failed status: nothing is sent (every node counts as not asked).
        let early: Vec<Option<Vote>> = if got.iter().all(|g| g.is_some()) {
            vec![None; MEMBERS]
        } else {
            vec![Some(Vote::Unreachable("not asked".into())); MEMBERS]
        };
        let (attempt, acts) = Attempt::start(early);
        self.coords[k].phase = CPhase::Running {
            txid,
            generation,
            attempt,
        };
        o.note(|| format!("  {} offers generation {generation}", tx(txid)));
        self.run_acts(k, acts, o);
    }

    /// A fault: node `i`'s question to `j` is delayed; the asker gives up on it (true: no
    /// answer now) and the question stays in flight, to arrive at any later moment.
    fn late_copy(
        &mut self,
        i: usize,
        j: usize,
        txid: TxId,
        generation: u64,
        o: &mut Oracle,
    ) -> bool {
        let late = self.late_questions
            && o.fault(&mut self.budget, || {
                format!(
                    "{}'s question about {} to {} is delayed (it arrives late)",
                    NAMES[i],
                    tx(txid),
                    NAMES[j]
                )
            });
        if late {
            self.send(Msg::Query {
                to: j as u8,
                from: i as u8,
                txid,
                generation,
            });
        }
        late
    }

    #[allow(clippy::needless_range_loop)] // nodes are indices throughout the model
    /// `Node::resolve_one`: the coordinator's node first, then (old enough) the other members.
    fn resolve_one(&mut self, i: usize, o: &mut Oracle) {
        let Some(a) = self.nodes[i].mem.active.clone() else {
            return;
        };
        let Some(c) = index_of(&a.coordinator) else {
            return;
        };
        let member = |n: usize| a.nodes.iter().any(|m| m == NAMES[n]);
        let mut heard = Vec::new();
        let from_c = if c == i {
            self.outcome(i, a.txid, a.generation, true, o).ok()
        } else if self.late_copy(i, c, a.txid, a.generation, o)
            || o.lost(|| format!("query to {}", NAMES[c]))
        {
            None
        } else {
            self.outcome(c, a.txid, a.generation, true, o).ok()
        };
        if let Some(x) = from_c {
            o.note(|| format!("  {} (coordinator's node) answers {x:?}", NAMES[c]));
            heard.push(Heard {
                node: NAMES[c].into(),
                member: member(c),
                coordinator: true,
                answer: x,
            });
        }
        let mut verdict = resolve(&heard);
        // Choice 1: the transaction is still young (only the coordinator's node is asked).
        if verdict.is_none() && o.choose(2) == 0 {
            for p in 0..MEMBERS {
                if p == i || p == c || !member(p) {
                    continue;
                }
                if self.late_copy(i, p, a.txid, a.generation, o)
                    || o.lost(|| format!("query to {}", NAMES[p]))
                {
                    continue;
                }
                if let Ok(x) = self.outcome(p, a.txid, a.generation, true, o) {
                    o.note(|| format!("  {} answers {x:?}", NAMES[p]));
                    heard.push(Heard {
                        node: NAMES[p].into(),
                        member: true,
                        coordinator: false,
                        answer: x,
                    });
                    verdict = resolve(&heard);
                    if verdict.is_some() {
                        break;
                    }
                }
            }
        }
        let event = match verdict {
            Some(Verdict::Commit) => Event::Commit {
                txid: a.txid,
                generation: a.generation,
            },
            Some(Verdict::Abort) => Event::Abort {
                txid: a.txid,
                generation: a.generation,
            },
            None => return,
        };
        o.note(|| format!("  {} concludes {verdict:?}", NAMES[i]));
        let r = self.decide_shell(i, event, None, o);
        o.note(|| format!("  {}", resp_text(&r)));
    }

    #[allow(clippy::needless_range_loop)] // nodes are indices throughout the model
    /// `recover::resolve`: asks every configured node (a superset of what the shell asks:
    /// `may_recover` must ignore non-members by itself), then delivers if allowed.
    fn recover(&mut self, txid: TxId, commit: bool, o: &mut Oracle) {
        self.operator -= 1;
        let Some(p) = self
            .nodes
            .iter()
            .filter(|n| n.up)
            .find_map(|n| n.mem.active.clone().filter(|a| a.txid == txid))
        else {
            return;
        };
        let mut heard = Vec::new();
        for j in 0..NAMES.len() {
            if o.lost(|| format!("query to {}", NAMES[j])) {
                continue;
            }
            if let Ok(x) = self.outcome(j, txid, p.generation, !commit, o) {
                o.note(|| format!("  {} answers {x:?}", NAMES[j]));
                heard.push(Heard {
                    node: NAMES[j].into(),
                    member: p.nodes.iter().any(|m| m == NAMES[j]),
                    coordinator: p.coordinator == NAMES[j],
                    answer: x,
                });
            }
        }
        match may_recover(commit, &heard) {
            Err(why) => o.note(|| format!("  refused: {why}")),
            Ok(()) => {
                o.note(|| "  allowed: delivering".into());
                let verdict = if commit { V::Commit } else { V::Abort };
                for j in 0..NAMES.len() {
                    if p.nodes.iter().any(|m| m == NAMES[j]) || p.coordinator == NAMES[j] {
                        self.send(Msg::Decide {
                            to: j as u8,
                            txid,
                            generation: p.generation,
                            verdict,
                            from: Sender::Operator,
                        });
                    }
                }
            }
        }
    }

    fn crash_txmapd(&mut self, i: usize) {
        let n = &mut self.nodes[i];
        n.up = false;
        n.mem = TableState::default();
        n.lock = false;
        n.dirty = false;
        n.redrive.clear();
        self.drop_replies_to(Sender::Redrive(i as u8));
    }

    /// `Node::open`: load the journal, clean staged files, re-take the lock, finish an install.
    fn restart(&mut self, i: usize, o: &mut Oracle) {
        let mut st = self.nodes[i].journal.visible.clone();
        let keep = st.active.as_ref().map(|a| a.txid);
        self.nodes[i]
            .files
            .visible
            .staged
            .retain(|t| Some(*t) == keep);
        let mut lock = st.active.is_some();
        if let Some(a) = st.active.clone().filter(|a| a.phase == Phase::Installing) {
            if self.install_checked(i, a.txid, o).is_ok() {
                st.step(Event::InstallDone { txid: a.txid }, 0);
                if self.journal_store(i, &st, o).is_err() {
                    // `Node::open` fails: txmapd exits (it is started again later).
                    o.note(|| "  txmapd exits".into());
                    return;
                }
                lock = false;
            }
        }
        let n = &mut self.nodes[i];
        n.mem = st;
        n.lock = lock;
        n.up = true;
    }

    fn update_ghost(&mut self) {
        for (i, n) in self.nodes.iter().enumerate() {
            let mut mark = |s: &TableState| {
                if let Some(a) = s.active.as_ref().filter(|a| a.phase == Phase::Installing) {
                    self.ghost.entry(a.txid).or_default().committed |= bit(i);
                }
                for (t, out) in &s.recent {
                    let g = self.ghost.entry(*t).or_default();
                    match out {
                        Outcome::Committed(_) => g.committed |= bit(i),
                        Outcome::Aborted => g.aborted |= bit(i),
                    }
                }
            };
            if n.up {
                mark(&n.mem);
            }
            mark(&n.journal.visible);
            mark(&n.journal.durable);
            if let Some(t) = n.files.visible.live {
                self.ghost.entry(t).or_default().committed |= bit(i);
            }
        }
    }

    // ---- properties ----

    /// The safety properties, checked in every state: `Err` names the broken one.
    pub fn check_safety(&self) -> Result<(), String> {
        for (t, g) in &self.ghost {
            let decided_commit = self.nodes.iter().any(|n| {
                matches!(
                    n.log.visible.get(&(*t, Kind::Decision)),
                    Some(Rec::Decision {
                        verdict: V::Commit,
                        ..
                    })
                )
            });
            if g.committed != 0 && g.aborted != 0 {
                return Err(format!(
                    "AGREEMENT: {} committed on {} and aborted on {}",
                    tx(*t),
                    names(g.committed),
                    names(g.aborted)
                ));
            }
            if (g.committed != 0 || decided_commit) && g.voted != ALL_MEMBERS {
                return Err(format!(
                    "VALIDITY: {} committed (on {}) or decided commit, but only {} voted prepared",
                    tx(*t),
                    names(g.committed),
                    names(g.voted)
                ));
            }
            if g.reported || g.committed != 0 {
                if g.aborted != 0 {
                    return Err(format!(
                        "DURABILITY: {} was decided commit but is aborted on {}",
                        tx(*t),
                        names(g.aborted)
                    ));
                }
                for (h, n) in self.nodes.iter().enumerate() {
                    if matches!(
                        n.log.visible.get(&(*t, Kind::Decision)),
                        Some(Rec::Decision {
                            verdict: V::Abort,
                            ..
                        })
                    ) {
                        return Err(format!(
                            "DURABILITY: {} was decided commit but {}'s decision log now says abort",
                            tx(*t),
                            NAMES[h]
                        ));
                    }
                }
            }
        }
        for (i, n) in self.nodes.iter().enumerate() {
            if n.up && n.lock != n.mem.active.is_some() {
                return Err(format!(
                    "CLEANLINESS: {} holds the table lock {} a transaction",
                    NAMES[i],
                    if n.lock { "without" } else { "not held by" }
                ));
            }
        }
        Ok(())
    }

    /// What must hold once the fault-free drain has settled: `Err` says what is left.
    pub fn check_quiet(&self) -> Result<(), String> {
        for (i, n) in self.nodes.iter().enumerate() {
            if !n.up {
                return Err(format!("TERMINATION: {} is down", NAMES[i]));
            }
            if let Some(a) = &n.mem.active {
                return Err(format!(
                    "TERMINATION: {} still holds {} ({:?})",
                    NAMES[i],
                    tx(a.txid),
                    a.phase
                ));
            }
            if n.lock {
                return Err(format!(
                    "CLEANLINESS: {} still holds the table lock",
                    NAMES[i]
                ));
            }
            if let Some(t) = n.files.visible.staged.iter().next() {
                return Err(format!(
                    "CLEANLINESS: {} keeps the staged files of {}",
                    NAMES[i],
                    tx(*t)
                ));
            }
            for (t, kind) in n.log.visible.keys() {
                let left = match kind {
                    Kind::Open => true,
                    // Commit and abort alike: delivered ones stay as tombstones.
                    Kind::Decision => !n.log.visible.contains_key(&(*t, Kind::Delivered)),
                    Kind::Delivered => false,
                };
                if left {
                    return Err(format!(
                        "TERMINATION: {}'s decision log still has {kind:?} of {}",
                        NAMES[i],
                        tx(*t)
                    ));
                }
            }
        }
        for (k, c) in self.coords.iter().enumerate() {
            if !matches!(c.phase, CPhase::Done | CPhase::Crashed) {
                return Err(format!("TERMINATION: C{} has not finished", k + 1));
            }
        }
        Ok(())
    }

    /// The steps of the fault-free drain, in priority order: restarts, messages, staging,
    /// coordinators, installs, redrive, resolvers.
    pub fn drain_steps(&self) -> Vec<Step> {
        let all = self.steps();
        let rank = |s: &Step| match s {
            // A late question arrives after everything else settled: that is what late means.
            Step::Deliver(i, false) if matches!(self.net[*i], Msg::Query { .. }) => 9,
            Step::Restart(_) => 0,
            Step::Deliver(_, false) => 1,
            Step::StageFinish(_) => 2,
            Step::OpenAndPrepare(_) | Step::Decide(_) | Step::SyncDecision(_) => 3,
            Step::VoteTimeout(_) | Step::EndDelivery(_) => 4,
            Step::InstallRetry(_) => 5,
            Step::RedriveFence(..) | Step::RedriveFinish(..) => 6,
            Step::RedriveSend(..) => 7,
            Step::Resolve(_) => 8,
            _ => 99,
        };
        let mut v: Vec<Step> = all.into_iter().filter(|s| rank(s) < 99).collect();
        v.sort_by_key(rank);
        v
    }

    /// A short summary of every node (for the end of a trace).
    pub fn summary(&self) -> String {
        let mut out = String::new();
        for (i, n) in self.nodes.iter().enumerate() {
            let act = n
                .mem
                .active
                .as_ref()
                .map(|a| format!("{} {:?}", tx(a.txid), a.phase))
                .unwrap_or_else(|| "-".into());
            let recent: Vec<String> = n
                .mem
                .recent
                .iter()
                .map(|(t, o)| format!("{}:{o:?}", tx(*t)))
                .collect();
            let log: Vec<String> = n
                .log
                .visible
                .iter()
                .map(|((t, k), r)| {
                    let synced = n.log.durable.get(&(*t, *k)) == Some(r);
                    format!(
                        "{} {k:?}{}{}",
                        tx(*t),
                        match r {
                            Rec::Decision { verdict, .. } => format!("={verdict:?}"),
                            _ => String::new(),
                        },
                        if synced { "" } else { " (unsynced)" }
                    )
                })
                .collect();
            out.push_str(&format!(
                "    {}: {} gen {} fenced {} active {act} recent [{}] log [{}]\n",
                NAMES[i],
                if n.up { "up" } else { "DOWN" },
                n.mem.generation,
                n.mem.fenced,
                recent.join(" "),
                log.join(", ")
            ));
        }
        out
    }
}
