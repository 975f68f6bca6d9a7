//! `txmap commit`: the coordinator's two phases against every in-service node.
//!
//! 1. register the transaction in the decision log (`<txid>.open`: pid and deadline), connect to
//!    every node and read its generation; offer `max + 1`;
//! 2. send `Prepare` + the whole source to every node in parallel;
//! 3. all prepared: record *commit* in the decision log (durable, no-replace: if recovery fenced
//!    the transaction first, its *abort* stands) and send `Commit` to all; otherwise send
//!    `Abort` to all. When every refusal was a conflict with another transaction (`Busy`,
//!    `StaleGeneration`), wait a random backoff and start again with a new transaction and
//!    generation, until the busy-retry deadline.
//!
//! Every step is bounded by its own deadline and by the overall `timeouts.total` (default 9 s),
//! so a commit with a node down or frozen returns well inside Sympa's 20 s.
//!
//! The concurrency rule: nobody waits for a lock. A participant that already holds the table
//! for another transaction refuses at once (`Busy`), and one whose generation is already at or
//! above the offer refuses (`StaleGeneration`); the loser aborts everywhere and retries with a
//! fresh generation read from the nodes. So two coordinators never deadlock, and generations
//! strictly increase because each node only accepts a generation above its own.

use crate::cluster::{ask, join_all, Cluster, Link};
use serde::Serialize;
use std::collections::VecDeque;
use std::path::Path;
use std::time::{Duration, Instant};
use tracing::{debug, info, warn};
use txmap_common::attempt::{Act, Attempt, Ending, Event as AEvent, Phase};
use txmap_common::config::NodeConfig;
use txmap_common::coordinator::{
    already_served, content_guard, delivery, superseded, Delivery, WriteResult,
};
use txmap_common::decision::{DecisionLog, DecisionRecord, PendingRecord, Verdict};
use txmap_common::exit;
use txmap_common::machine::{next_generation, Vote};
use txmap_common::net;
use txmap_common::proto::{
    Change, Prepare, PrepareDelta, Request, Response, Sha256, TableStatus, TxId,
};
use txmap_common::{delta, now_ms, table};

/// What happened on one node.
#[derive(Debug, Clone, Serialize)]
pub struct NodeReport {
    /// Node name.
    pub node: String,
    /// Prepared/committed there.
    pub ok: bool,
    /// One line: what happened.
    pub detail: String,
}

/// The result of one commit.
#[derive(Debug, Serialize)]
pub struct CommitReport {
    /// Table.
    pub table: String,
    /// Last transaction tried.
    pub txid: Option<String>,
    /// Its generation.
    pub generation: Option<u64>,
    /// Exit code (see [`txmap_common::exit`]).
    pub exit: u8,
    /// Transactions tried (conflicts are retried).
    pub attempts: u32,
    /// Wall time.
    pub elapsed_ms: u64,
    /// One line per node.
    pub nodes: Vec<NodeReport>,
    /// The content guard refused the new source (exit 2): why. Not retried.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refused_content: Option<String>,
    /// Bytes of table content sent in prepares (whole tables and delta scripts), all attempts.
    pub bytes_sent: u64,
    /// Nodes sent a delta in the last attempt (the others got the whole table).
    pub delta_nodes: usize,
    /// Aborted because a node's builder or verifier rejected the content (not the node): a
    /// pending retry of the same bytes waits until the source changes.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub content_rejected: bool,
}

impl CommitReport {
    /// The failing nodes' lines, joined (for logs and pending records).
    pub fn failures(&self) -> String {
        let v: Vec<String> = self
            .nodes
            .iter()
            .filter(|n| !n.ok)
            .map(|n| format!("{}: {}", n.node, n.detail))
            .collect();
        if v.is_empty() {
            format!("exit {}", self.exit)
        } else {
            v.join("; ")
        }
    }
}

fn vote_text(v: &Vote) -> String {
    match v {
        Vote::Prepared => "prepared".into(),
        Vote::Refused(r) => format!("refused: {r}"),
        Vote::Unreachable(e) => e.clone(),
    }
}

/// The overall deadline of one command.
#[derive(Debug, Clone, Copy)]
struct Deadline(Instant);

impl Deadline {
    fn left(&self) -> Duration {
        self.0.saturating_duration_since(Instant::now())
    }
    fn cap(&self, d: Duration) -> Duration {
        d.min(self.left())
    }
}

/// What a prepare carries after its frame.
#[derive(Debug, Clone)]
enum Body<'a> {
    /// The whole source file.
    Whole(&'a Path),
    /// A delta script (see [`txmap_common::delta`]).
    Delta(&'a [u8]),
}

async fn prepare_one(link: &Link, req: &Request, body: Body<'_>, deadline: Duration) -> Vote {
    let conn = match link {
        Ok(c) => c,
        Err(e) => return Vote::Unreachable(e.clone()),
    };
    let run = async {
        match body {
            Body::Whole(source) => {
                let file = tokio::fs::File::open(source)
                    .await
                    .map_err(|e| format!("cannot read source: {e}"))?;
                net::exchange(conn, req, Some(file)).await
            }
            Body::Delta(script) => net::exchange(conn, req, Some(script)).await,
        }
        .map_err(|e| e.to_string())
    };
    match tokio::time::timeout(deadline, run).await {
        Ok(Ok(Response::Prepared { .. })) => Vote::Prepared,
        Ok(Ok(Response::Refused(r))) => Vote::Refused(r),
        Ok(Ok(other)) => Vote::Unreachable(format!("unexpected answer: {other}")),
        Ok(Err(e)) => Vote::Unreachable(e),
        Err(_) => Vote::Unreachable(format!(
            "no answer within the prepare deadline of {} ms",
            deadline.as_millis()
        )),
    }
}

/// The delta script from this node's live copy of `table` to `source`, when delta commits are
/// on and the change is small enough (see [`txmap_common::delta::plan`]).
async fn plan_delta(
    cluster: &Cluster,
    table_name: &str,
    source: &Path,
    digest: &table::SourceDigest,
    own_base: Option<Sha256>,
) -> Option<delta::Plan> {
    start_plan(cluster, table_name, source, digest, own_base)?
        .await
        .ok()
        .flatten()
}

/// [`plan_delta`] started on a blocking thread, to be awaited when the prepares are sent.
fn start_plan(
    cluster: &Cluster,
    table_name: &str,
    source: &Path,
    digest: &table::SourceDigest,
    own_base: Option<Sha256>,
) -> Option<tokio::task::JoinHandle<Option<delta::Plan>>> {
    let cfg = &cluster.cfg;
    let t = cfg.table(table_name)?;
    if cfg.delta_max_percent == 0 {
        return None;
    }
    // The same share as the node's rule for an incremental build, in records and in bytes
    // (a little slack for small tables).
    let share = |x: u64| x.saturating_mul(cfg.delta_max_percent) / 100;
    let limits = delta::Limits {
        max_bytes: share(digest.len).max(4096),
        // Myers keeps about 8·D² bytes of trace: 1,500 edits stay under 20 MB.
        max_edits: share(digest.entries).clamp(4, 1500) as usize,
    };
    let (base, new) = (t.path.clone(), source.to_path_buf());
    let history = txmap_common::history::History::new(&cfg.state_dir, table_name);
    let run = move || {
        let (fb, _) = history.open_live(&base, u64::MAX)?;
        let fnew = std::fs::File::open(&new)?;
        delta::plan_files(&fb, &fnew, limits, own_base.map(|s| s.0))
    };
    Some(tokio::task::spawn_blocking(move || match run() {
        Ok(p) => p,
        Err(e) => {
            debug!(error = %e, "no delta: cannot read this node's live copy");
            None
        }
    }))
}

/// The delta script of a commit: started early from this node's journal (beside the status
/// round and the open record), or computed when the prepares go out; kept for a later attempt
/// while this node serves the same base.
enum EarlyPlan {
    /// Being computed against this recorded base.
    Running(Sha256, tokio::task::JoinHandle<Option<delta::Plan>>),
    /// The script from this base (`None`: none possible, such as no change from it).
    Done(Sha256, Option<delta::Plan>),
    /// None yet (this node's journal could not be read, or delta commits are off).
    None,
}

/// Why a decision was not acknowledged by a node.
#[derive(Debug, Clone)]
pub enum DeliverError {
    /// The node holds the opposite outcome (a broken rule; never retried, reported loudly).
    Contradicts(String),
    /// Not acknowledged before the deadline (unreachable, or not able to install yet): the
    /// decision stays recorded and is sent again.
    NotYet(String),
}

impl std::fmt::Display for DeliverError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeliverError::Contradicts(r) => write!(f, "CONTRADICTS the decision: {r}"),
            DeliverError::NotYet(e) => write!(f, "not acknowledged: {e}"),
        }
    }
}

/// Sends a decision (`Commit` or `Abort`) to one node, re-dialling and retrying until `until`
/// or a definitive answer (see [`txmap_common::coordinator::delivery`]).
pub async fn deliver(
    cluster: &Cluster,
    node: &NodeConfig,
    link: &Link,
    req: &Request,
    until: Instant,
) -> Result<u64, DeliverError> {
    let verdict = match req {
        Request::Commit { .. } => Verdict::Commit,
        _ => Verdict::Abort,
    };
    let mut link = link.clone();
    let mut last = String::from("no time left");
    while Instant::now() < until {
        if link.is_err() {
            link = cluster.connect(node).await;
        }
        let left = until.saturating_duration_since(Instant::now());
        let answer = ask(&link, req, left).await;
        match delivery(verdict, answer.as_ref().ok()) {
            Delivery::Acked => {
                return Ok(match answer {
                    Ok(Response::Committed { generation, .. }) => generation,
                    _ => 0,
                })
            }
            Delivery::Contradicts(r) => return Err(DeliverError::Contradicts(r)),
            Delivery::Retry(why) => {
                last = match answer {
                    Err(e) => {
                        link = Err(e.clone());
                        e
                    }
                    Ok(_) => why,
                };
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    Err(DeliverError::NotYet(last))
}

/// The keys of this node's live copy of the table that `source` no longer has (`None` when
/// either cannot be read: the guard then counts entries). Both are opened as untrusted files,
/// bounded by `max_table_bytes`; only the region where they differ is split into keys.
pub fn removed_keys(
    cfg: &txmap_common::config::Config,
    table_name: &str,
    source: &Path,
) -> Option<u64> {
    let t = cfg.table(table_name)?;
    let max = cfg.max_table_bytes;
    // The live source has a second link: this node's history copy of it.
    let live = txmap_common::history::History::new(&cfg.state_dir, table_name)
        .open_live(&t.path, max)
        .ok()?
        .0;
    let new = table::open_untrusted(source, max).ok()?.0;
    txmap_common::entries::removed_keys_of_files(t.builder, &live, &new).ok()
}

fn backoff(attempt: u32) -> Duration {
    let r = TxId::random().0 % 1000;
    let base = 20u64 << attempt.min(4);
    Duration::from_millis(base + (r as u64) * base / 1000)
}

/// Runs one whole commit of `table` from `source`, a new change of the table's own counter on
/// this node, guarded (see [`commit_with`]).
pub async fn commit(cluster: &Cluster, table_name: &str, source: &Path) -> CommitReport {
    let change = match DecisionLog::new(&cluster.cfg.state_dir).next_change(table_name) {
        Ok(c) => c,
        Err(e) => return count_failed(cluster, table_name, e),
    };
    commit_with(cluster, table_name, source, false, Some(change)).await
}

/// The report of a change that could not be counted (its counter in the state directory):
/// nothing is sent anywhere.
pub fn count_failed(cluster: &Cluster, table_name: &str, e: std::io::Error) -> CommitReport {
    CommitReport {
        table: table_name.to_string(),
        txid: None,
        generation: None,
        exit: exit::LOCAL,
        attempts: 0,
        elapsed_ms: 0,
        nodes: vec![NodeReport {
            node: cluster.cfg.node.clone(),
            ok: false,
            detail: format!(
                "cannot count the change in {}: {e}; nothing was sent",
                cluster.cfg.state_dir.join("changes").display()
            ),
        }],
        refused_content: None,
        bytes_sent: 0,
        delta_nodes: 0,
        content_rejected: false,
    }
}

/// Runs one whole commit of `table` from `source`. Never panics; the report carries the exit.
/// Unless `force`, a source that would remove more than `guard_free_keys` keys and more than
/// `max_shrink_percent` of the live ones is refused before anything is sent (exit 2).
/// `change` says which change of this node's source it is: when some node already installed a
/// later change of the same source, this one is superseded and makes no transaction (exit 0
/// once every node serves that later change, else 3: it is on its way). `None`: unordered.
pub async fn commit_with(
    cluster: &Cluster,
    table_name: &str,
    source: &Path,
    force: bool,
    change: Option<Change>,
) -> CommitReport {
    let started = Instant::now();
    let t = &cluster.cfg.timeouts;
    let log = DecisionLog::new(&cluster.cfg.state_dir);
    let mut report = CommitReport {
        table: table_name.to_string(),
        txid: None,
        generation: None,
        exit: exit::ABORTED,
        attempts: 0,
        elapsed_ms: 0,
        nodes: Vec::new(),
        refused_content: None,
        bytes_sent: 0,
        delta_nodes: 0,
        content_rejected: false,
    };
    let local_failure = |report: &mut CommitReport, detail: String| {
        report.exit = exit::LOCAL;
        report.nodes = vec![NodeReport {
            node: cluster.cfg.node.clone(),
            ok: false,
            detail,
        }];
    };
    if let Err(why) = may_coordinate(cluster) {
        report.exit = exit::USAGE;
        report.nodes = vec![NodeReport {
            node: cluster.cfg.node.clone(),
            ok: false,
            detail: why,
        }];
        return report;
    }
    let digest = match table::source_digest(source) {
        Ok(d) => d,
        Err(e) => {
            local_failure(&mut report, format!("source: {e}"));
            return report;
        }
    };
    // The delta script does not wait for the status round: this node's journal says which
    // content its live copy is (its status answer would say the same).
    let mut early =
        match txmap_common::journal::Journal::recorded_sha256(&cluster.cfg.state_dir, table_name) {
            // This node serves this very content: no script to plan (and no read of both files).
            Some(base) if base.0 == digest.sha256 => EarlyPlan::Done(base, None),
            Some(base) => match start_plan(cluster, table_name, source, &digest, Some(base)) {
                Some(h) => EarlyPlan::Running(base, h),
                None => EarlyPlan::None,
            },
            None => EarlyPlan::None,
        };
    // Deadlines fit the table: a big one needs longer to upload and build.
    let prepare_limit = t.prepare_for(digest.len, true);
    let deadline = Deadline(started + t.total + (prepare_limit - t.prepare));
    let busy_until = started + t.busy_retry.min(t.total);
    let nodes = cluster.cfg.active_nodes();
    let mut links: Vec<(NodeConfig, Link)> = Vec::new();
    // Nodes that refused a delta (their copy differs): they get the whole table from now on.
    let mut whole_only: std::collections::HashSet<String> = Default::default();
    loop {
        report.attempts += 1;
        let txid = TxId::random();
        report.txid = Some(txid.to_string());
        let deadline_ms = now_ms() + deadline.left().as_millis() as u64 + 1000;
        // (Re-)dial nodes whose connection failed or closed.
        if links.is_empty() {
            links =
                join_all(nodes.iter().map(|n| async {
                    (n.clone(), cluster.connect_warm(n, deadline.left()).await)
                }))
                .await;
        } else {
            for (node, link) in links.iter_mut() {
                if link
                    .as_ref()
                    .map(|c| c.close_reason().is_some())
                    .unwrap_or(true)
                {
                    *link = cluster.connect_within(node, deadline.left()).await;
                }
            }
        }
        let sreq = Request::Status {
            table: Some(table_name.to_string()),
        };
        let t_connected = Instant::now();
        let statuses = join_all(
            links
                .iter()
                .map(|(_, l)| ask(l, &sreq, deadline.cap(t.connect))),
        )
        .await;
        let mut known: Vec<TableStatus> = Vec::new();
        let mut live_sha: Vec<Option<Sha256>> = vec![None; links.len()];
        let mut votes: Vec<Option<Vote>> = vec![None; links.len()];
        for (i, s) in statuses.into_iter().enumerate() {
            match s {
                Ok(Response::Status(v)) => {
                    let mine = v.iter().find(|s| s.table == table_name);
                    live_sha[i] = mine.and_then(|s| s.sha256);
                    // A drifted node's live files are not its recorded content: it gets the
                    // whole table and a full build, never a delta against its drifted copy.
                    if mine.is_some_and(|s| s.drifted.is_some()) {
                        whole_only.insert(links[i].0.name.clone());
                    }
                    known.extend(v)
                }
                Ok(Response::Refused(r)) => votes[i] = Some(Vote::Refused(r)),
                Ok(other) => {
                    votes[i] = Some(Vote::Unreachable(format!("unexpected answer: {other}")))
                }
                Err(e) => votes[i] = Some(Vote::Unreachable(e)),
            }
        }
        let sha = Sha256(digest.sha256);
        let t_status = Instant::now();
        if votes.iter().all(|v| v.is_none()) {
            if let Some(g) = already_served(&known, links.len(), &sha) {
                // No work for no change: nothing to distribute, no new generation.
                report.txid = None;
                report.generation = Some(g);
                report.exit = exit::OK;
                report.nodes = links
                    .iter()
                    .map(|(n, _)| NodeReport {
                        node: n.name.clone(),
                        ok: true,
                        detail: format!("already serves this content (generation {g})"),
                    })
                    .collect();
                break;
            }
            if let Some(sup) =
                change.and_then(|c| superseded(&known, links.len(), &cluster.cfg.node, &c))
            {
                // Only a later change of the same source wins; no clock is compared.
                report.txid = None;
                report.generation = Some(sup.generation);
                report.exit = if sup.everywhere {
                    exit::OK
                } else {
                    exit::INCOMPLETE
                };
                report.nodes = vec![NodeReport {
                    node: cluster.cfg.node.clone(),
                    ok: sup.everywhere,
                    detail: format!(
                        "superseded: a later change of this source ({}) is live (generation {}){}",
                        sup.by,
                        sup.generation,
                        if sup.everywhere {
                            ""
                        } else {
                            "; not yet on every node"
                        }
                    ),
                }];
                break;
            }
            if !force {
                let removed = removed_keys(&cluster.cfg, table_name, source);
                if let Err(why) = content_guard(
                    &known,
                    digest.entries,
                    removed,
                    cluster.cfg.max_shrink_percent,
                    cluster.cfg.guard_free_keys,
                ) {
                    report.txid = None;
                    report.exit = exit::USAGE;
                    report.nodes = vec![NodeReport {
                        node: cluster.cfg.node.clone(),
                        ok: false,
                        detail: format!("refused: {why}"),
                    }];
                    report.refused_content = Some(why);
                    break;
                }
            }
        }
        let generation = next_generation(&known);
        report.generation = Some(generation);
        let names: Vec<String> = links.iter().map(|(n, _)| n.name.clone()).collect();
        // Registered before anything is sent: from here on the node's recovery knows this
        // transaction, and knows this process is alive by the lock the guard holds.
        let _alive = match log.open(txid, table_name, generation, names.clone(), deadline_ms) {
            Ok(g) => g,
            Err(e) => {
                local_failure(
                    &mut report,
                    format!("decision log in {}: {e}", cluster.cfg.state_dir.display()),
                );
                break;
            }
        };
        let prepare = Prepare {
            txid,
            table: table_name.to_string(),
            generation,
            coordinator: cluster.cfg.node.clone(),
            source_len: digest.len,
            sha256: sha,
            entries: digest.entries,
            nodes: names.clone(),
            change,
        };
        // From here the attempt is txmap's own state machine (`txmap_common::attempt`, the one
        // the model checker drives); this shell executes its actions and reports back.
        let (mut attempt, first) = Attempt::start(votes.clone());
        let mut queue: VecDeque<Act> = first.into();
        let mut events: Vec<AEvent> = Vec::new();
        if queue.is_empty() {
            // Some node failed before prepare: abort without sending the table anywhere.
            events.push(AEvent::Decide {
                past_deadline: now_ms() > deadline_ms,
            });
        }
        let mut votes: Vec<Vote> = Vec::new();
        let mut acks: Vec<Result<u64, DeliverError>> = Vec::new();
        let (mut wrote_commit, mut no_decision) = (false, false);
        let mut t_decided = Instant::now();
        loop {
            for e in events.drain(..) {
                if let (AEvent::Decide { .. }, Phase::Preparing { votes: v, .. }) =
                    (&e, &attempt.phase)
                {
                    // The votes as decided on, for the report.
                    votes = v
                        .iter()
                        .map(|v| v.clone().unwrap_or(Vote::Unreachable("no vote".into())))
                        .collect();
                }
                queue.extend(attempt.step(e));
            }
            let Some(act) = queue.pop_front() else {
                break;
            };
            events = match act {
                Act::SendPrepares => {
                    let fresh = send_prepares(
                        cluster,
                        &links,
                        &live_sha,
                        &mut whole_only,
                        &prepare,
                        (source, &digest, &mut early),
                        deadline,
                        &mut report,
                    )
                    .await;
                    debug!(
                        connect_ms = (t_connected - started).as_millis() as u64,
                        status_ms = (t_status - t_connected).as_millis() as u64,
                        prepare_ms = t_status.elapsed().as_millis() as u64,
                        "phases"
                    );
                    fresh
                        .into_iter()
                        .enumerate()
                        .map(|(node, vote)| AEvent::Vote { node, vote })
                        .chain([AEvent::Decide {
                            past_deadline: now_ms() > deadline_ms,
                        }])
                        .collect()
                }
                Act::WriteCommit => {
                    fail::fail_point!("coordinator::after_all_prepared");
                    wrote_commit = true;
                    let rec = DecisionRecord {
                        txid,
                        table: table_name.to_string(),
                        generation,
                        verdict: Verdict::Commit,
                        nodes: names.clone(),
                        at_ms: now_ms(),
                    };
                    let written = match log.decide(&rec) {
                        Ok(d) => WriteResult::Stands(d.verdict),
                        Err(e) => {
                            warn!(error = %e, "decision log write failed; reading back what is on disk");
                            match log.get(txid) {
                                Ok(d) => WriteResult::ReadBack(d.map(|d| d.verdict)),
                                Err(e) => {
                                    warn!(error = %e, "cannot read the decision back");
                                    WriteResult::Unreadable
                                }
                            }
                        }
                    };
                    vec![AEvent::CommitWritten(written)]
                }
                Act::WriteAbort => {
                    // A node that prepared may miss the abort (down, or its vote lost): record
                    // the abort, so its resolver, even on this very node, finds it, and txmapd
                    // re-drives it.
                    let recorded = log
                        .decide(&DecisionRecord::fence(
                            txid,
                            table_name,
                            generation,
                            names.clone(),
                        ))
                        .map_err(|e| warn!(error = %e, "cannot record the abort; nodes presume it"))
                        .is_ok();
                    vec![AEvent::AbortWritten(recorded)]
                }
                Act::Deliver(Verdict::Commit) => {
                    fail::fail_point!("coordinator::after_decision_durable");
                    t_decided = Instant::now();
                    let creq = Request::Commit {
                        table: table_name.to_string(),
                        txid,
                        generation,
                    };
                    // The prepare phase left `commit` of the overall deadline for this (at
                    // least 500 ms even if the clock ran over: the decision is made and worth
                    // finishing).
                    let until =
                        Instant::now() + deadline.cap(t.commit).max(Duration::from_millis(500));
                    acks = join_all(links.iter().enumerate().map(|(i, (n, l))| {
                        let creq = &creq;
                        async move {
                            let r = deliver(cluster, n, l, creq, until).await;
                            if i == 0 {
                                fail::fail_point!("coordinator::after_first_commit_sent");
                            }
                            r
                        }
                    }))
                    .await;
                    acks.iter()
                        .enumerate()
                        .map(|(node, a)| AEvent::Answer {
                            node,
                            answer: match a {
                                Ok(_) => Delivery::Acked,
                                Err(DeliverError::Contradicts(r)) => {
                                    Delivery::Contradicts(r.clone())
                                }
                                Err(DeliverError::NotYet(e)) => Delivery::Retry(e.clone()),
                            },
                        })
                        .chain([AEvent::DeliveryOver])
                        .collect()
                }
                Act::Deliver(Verdict::Abort) => {
                    if wrote_commit {
                        warn!(%txid, "no commit decision stands (recovery fenced it first, or the write failed before it existed); aborting");
                        no_decision = true;
                    }
                    abort_all(&links, table_name, txid, generation, deadline)
                        .await
                        .into_iter()
                        .enumerate()
                        .map(|(node, answer)| AEvent::Answer { node, answer })
                        .chain([AEvent::DeliveryOver])
                        .collect()
                }
                Act::Finish => {
                    log.finish(txid);
                    vec![]
                }
                Act::MarkDelivered => {
                    log.delivered(txid);
                    vec![]
                }
                Act::Close => {
                    log.close(txid);
                    vec![]
                }
            };
        }
        match attempt.ending() {
            Some(Ending::Committed | Ending::Incomplete) => {
                report.nodes = links
                    .iter()
                    .zip(&acks)
                    .map(|((n, _), a)| match a {
                        Ok(g) => NodeReport {
                            node: n.name.clone(),
                            ok: true,
                            detail: format!("committed generation {g}"),
                        },
                        Err(e) => NodeReport {
                            node: n.name.clone(),
                            ok: false,
                            detail: format!("commit decided, {e} (re-driven by txmapd)"),
                        },
                    })
                    .collect();
                if attempt.ending() == Some(Ending::Committed) {
                    report.exit = exit::OK;
                    debug!(commit_ms = t_decided.elapsed().as_millis() as u64, "phases");
                } else {
                    report.exit = exit::INCOMPLETE;
                }
                break;
            }
            Some(Ending::Aborted { retry }) => {
                if no_decision {
                    for v in votes.iter_mut() {
                        *v = Vote::Unreachable("no commit decision could be recorded".into());
                    }
                }
                report.nodes = links
                    .iter()
                    .zip(&votes)
                    .map(|((n, _), v)| NodeReport {
                        node: n.name.clone(),
                        ok: *v == Vote::Prepared,
                        detail: vote_text(v),
                    })
                    .collect();
                if retry && Instant::now() + Duration::from_millis(50) < busy_until {
                    let wait = backoff(report.attempts);
                    info!(
                        attempt = report.attempts,
                        wait_ms = wait.as_millis() as u64,
                        "conflict with another transaction; retrying"
                    );
                    tokio::time::sleep(wait).await;
                    continue;
                }
                // Held only when every node rejected the content itself: one node's failing
                // builder or full disk is that node's problem and is retried.
                report.content_rejected = votes.iter().all(|v| {
                    matches!(
                        v,
                        Vote::Refused(
                            txmap_common::proto::Refusal::BuildFailed { .. }
                                | txmap_common::proto::Refusal::VerifyFailed { .. }
                        )
                    )
                });
                report.exit = if retry { exit::BUSY } else { exit::ABORTED };
                break;
            }
            // A commit record may be durable: never abort. The open record stays; this node's
            // txmapd settles it from the disk (it delivers a commit it finds, and fences
            // otherwise) once this process is gone. (`None` cannot happen: every action
            // reports back; it is treated the same way, as the safe side.)
            Some(Ending::Unsure) | None => {
                local_failure(
                    &mut report,
                    format!(
                        "decision log in {}: cannot tell whether the commit decision was recorded; txmapd resolves it from the disk",
                        cluster.cfg.state_dir.display()
                    ),
                );
                break;
            }
        }
    }
    report.elapsed_ms = started.elapsed().as_millis() as u64;
    report
}

/// Sends the prepare (a delta to a node that serves its base and speaks protocol 3, the whole
/// table otherwise) to every node at once; returns their votes. A node that refuses a delta
/// (`DeltaBase`: its copy differs) is put in `whole_only` for the rest of the command.
#[allow(clippy::too_many_arguments)] // one call site; the command's state, passed in
async fn send_prepares(
    cluster: &Cluster,
    links: &[(NodeConfig, Link)],
    live_sha: &[Option<Sha256>],
    whole_only: &mut std::collections::HashSet<String>,
    prepare: &Prepare,
    (source, digest, early): (&Path, &table::SourceDigest, &mut EarlyPlan),
    deadline: Deadline,
    report: &mut CommitReport,
) -> Vec<Vote> {
    let t = &cluster.cfg.timeouts;
    let table_name = prepare.table.as_str();
    let wants_delta = |i: usize, base: &[u8; 32]| {
        let (n, l) = &links[i];
        !whole_only.contains(&n.name)
            && l.as_ref().is_ok_and(net::speaks_delta)
            && live_sha[i].is_some_and(|s| &s.0 == base)
    };
    let plan = match links
        .iter()
        .any(|(_, l)| l.as_ref().is_ok_and(net::speaks_delta))
    {
        true => {
            // This node's recorded content: its live copy is not hashed again.
            let own = links
                .iter()
                .position(|(n, _)| n.name == cluster.cfg.node)
                .and_then(|i| live_sha[i]);
            let plan = match std::mem::replace(early, EarlyPlan::None) {
                // Started, or made by an earlier attempt, on the base this node still serves.
                EarlyPlan::Running(base, h) if Some(base) == own => h.await.ok().flatten(),
                EarlyPlan::Done(base, p) if Some(base) == own => p,
                _ => plan_delta(cluster, table_name, source, digest, own).await,
            };
            if let Some(base) = own {
                *early = EarlyPlan::Done(base, plan.clone());
            }
            plan
        }
        false => None,
    };
    let bodies: Vec<(Request, Body)> = (0..links.len())
        .map(|i| match &plan {
            Some(p) if wants_delta(i, &p.base_sha256) => (
                Request::PrepareDelta(PrepareDelta {
                    prepare: prepare.clone(),
                    base_sha256: Sha256(p.base_sha256),
                    delta_len: p.payload.len() as u64,
                }),
                Body::Delta(&p.payload),
            ),
            _ => (Request::Prepare(prepare.clone()), Body::Whole(source)),
        })
        .collect();
    report.delta_nodes = bodies
        .iter()
        .filter(|(_, b)| matches!(b, Body::Delta(_)))
        .count();
    report.bytes_sent += bodies
        .iter()
        .zip(links)
        .filter(|(_, (_, l))| l.is_ok())
        .map(|((_, b), _)| match b {
            Body::Whole(_) => digest.len,
            Body::Delta(d) => d.len() as u64,
        })
        .sum::<u64>();
    // Leave room in the overall deadline for the commit acknowledgements. A node sent a delta
    // may still build the whole table (a full build is due, its `.db` drifted): the deadline
    // is the whole table's either way (it only bounds failures).
    let pd = deadline
        .cap(t.prepare_for(digest.len, true))
        .min(deadline.left().saturating_sub(t.commit));
    let fresh = join_all(
        links
            .iter()
            .zip(&bodies)
            .map(|((_, l), (req, body))| prepare_one(l, req, body.clone(), pd)),
    )
    .await;
    for ((n, _), v) in links.iter().zip(&fresh) {
        if matches!(
            v,
            Vote::Refused(txmap_common::proto::Refusal::DeltaBase { .. })
        ) {
            info!(node = %n.name, "the node's copy differs from the delta's base; it gets the whole table");
            whole_only.insert(n.name.clone());
        }
    }
    fresh
}

/// Sends `Abort` to every node; returns each node's answer, classified (see
/// [`delivery`]).
async fn abort_all(
    links: &[(NodeConfig, Link)],
    table_name: &str,
    txid: TxId,
    generation: u64,
    deadline: Deadline,
) -> Vec<Delivery> {
    let req = Request::Abort {
        table: table_name.to_string(),
        txid,
        generation,
    };
    // Abort is best effort: a node that misses it resolves the transaction by itself
    // (presumed abort), so it never costs more than a short, bounded wait.
    let d = deadline
        .cap(Duration::from_millis(1000))
        .max(Duration::from_millis(200));
    let res = join_all(links.iter().map(|(_, l)| ask(l, &req, d))).await;
    links
        .iter()
        .zip(res)
        .map(|((n, _), r)| {
            let answer = delivery(Verdict::Abort, r.as_ref().ok());
            if answer != Delivery::Acked {
                info!(node = %n.name, %txid, result = %r.as_ref().map_or_else(|e| e.clone(), |r| r.to_string()), "abort not acknowledged; the node resolves it by itself");
            }
            answer
        })
        .collect()
}

/// Out-of-service nodes do not coordinate: the other nodes refuse their prepares anyway, and a
/// change recorded there would be retried (and its aborts re-sent) for ever.
pub fn may_coordinate(cluster: &Cluster) -> Result<(), String> {
    match cluster.cfg.node_by_name(&cluster.cfg.node) {
        Some(n) if n.in_service => Ok(()),
        _ => Err(format!(
            "refused: {} is out of service in {}: it does not coordinate (run txmap on an in-service node)",
            cluster.cfg.node,
            cluster.cfg.file.display()
        )),
    }
}

/// [`commit`], tracked for convergence (guarantee 6). The intent is recorded as pending
/// *before* the commit starts, owned by this process: if the process dies, `txmapd` sees the
/// owner gone and retries at once. A complete commit clears it; a failed one leaves it pending
/// with a backoff, and `txmapd` retries it, reading the source again each time.
pub async fn commit_tracked(cluster: &Cluster, table_name: &str, source: &Path) -> CommitReport {
    commit_tracked_with(cluster, table_name, source, false, None).await
}

/// [`commit_tracked`], forced past the content guard when `force` (kept in the pending record,
/// so a retry is forced too).
/// `change`: `None` for a new change (it takes the next count of the source's counter, named
/// after the snapshot `source`); a pending retry passes its record's.
pub async fn commit_tracked_with(
    cluster: &Cluster,
    table_name: &str,
    source: &Path,
    force: bool,
    change: Option<Change>,
) -> CommitReport {
    if may_coordinate(cluster).is_err() {
        // Nothing recorded: this node will never distribute it.
        return commit_with(cluster, table_name, source, force, change).await;
    }
    let log = DecisionLog::new(&cluster.cfg.state_dir);
    let change = match change {
        Some(c) => c,
        None => {
            let counter = source
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| table_name.to_string());
            match log.next_change(&counter) {
                Ok(c) => c,
                Err(e) => return count_failed(cluster, table_name, e),
            }
        }
    };
    // Held until this function returns: txmapd sees this process at work (or gone) by it.
    let _owner = log.own_pending(table_name).ok().flatten();
    let prev = log.pending_for(table_name, source);
    let since_ms = prev.as_ref().map(|p| p.since_ms).unwrap_or_else(now_ms);
    let attempts = prev.as_ref().map(|p| p.attempts).unwrap_or(0);
    let intent = PendingRecord {
        table: table_name.to_string(),
        source: source.to_path_buf(),
        since_ms,
        attempts,
        last_error: prev
            .as_ref()
            .map(|p| p.last_error.clone())
            .unwrap_or_else(|| "in progress".into()),
        next_ms: now_ms()
            + (cluster.cfg.timeouts.total + cluster.cfg.timeouts.commit).as_millis() as u64,
        owner_pid: Some(std::process::id()),
        force: force || prev.as_ref().is_some_and(|p| p.force),
        change: Some(change),
        held: None,
    };
    if let Err(e) = log.set_pending(&intent) {
        warn!(error = %e, "cannot record the commit's intent as pending");
    }
    let report = commit_with(cluster, table_name, source, intent.force, Some(change)).await;
    if report.exit == exit::OK {
        log.clear_pending(table_name, source);
        return report;
    }
    if let Some(why) = &report.refused_content {
        // Retrying the same content cannot help: it is held, visible in `txmap pending` and
        // `txmap check`, until the source changes or a person decides (`--force`, `cancel`).
        warn!(table = %table_name, reason = %why, "content refused by the guard; held until the source changes, `txmap commit --force` or `txmap pending cancel`");
        let rec = PendingRecord {
            held: txmap_common::decision::HeldContent::of(source),
            attempts: attempts + 1,
            last_error: format!("refused by the content guard: {why}"),
            next_ms: now_ms(),
            owner_pid: None,
            ..intent
        };
        if let Err(e) = log.set_pending(&rec) {
            warn!(error = %e, "cannot record the refused change as held");
        }
        return report;
    }
    if !source.exists() {
        // The change it described is gone with its source: nothing left to converge to.
        warn!(table = %table_name, source = %source.display(), "source vanished; dropping the pending commit");
        log.clear_pending(table_name, source);
        return report;
    }
    let attempts = attempts + 1;
    let wait = (1000u64 << attempts.min(6)).min(cluster.cfg.timeouts.retry_max.as_millis() as u64);
    // Content a node's builder rejected waits for the source to change (or an operator's
    // `txmap pending retry`): the same bytes would only fail the same way.
    let held = report
        .content_rejected
        .then(|| txmap_common::decision::HeldContent::of(source))
        .flatten();
    if held.is_some() {
        warn!(table = %table_name, "content rejected by a node's builder; not retried until the source changes (or `txmap pending retry`)");
    }
    let rec = PendingRecord {
        held,
        attempts,
        last_error: report.failures(),
        next_ms: now_ms() + wait,
        owner_pid: None,
        ..intent
    };
    if let Err(e) = log.set_pending(&rec) {
        warn!(error = %e, "cannot record the pending commit");
    }
    report
}

/// True when every in-service node serves exactly `source` (same sha256): a pending commit of
/// it has nothing left to do.
pub async fn converged(cluster: &Cluster, table_name: &str, source: &Path) -> bool {
    let Ok(digest) = table::digest_file(source) else {
        return false;
    };
    let nodes = cluster.cfg.active_nodes();
    let req = Request::Status {
        table: Some(table_name.to_string()),
    };
    let answers = join_all(nodes.iter().map(|n| async {
        let link = cluster.connect(n).await;
        ask(&link, &req, cluster.cfg.timeouts.connect).await
    }))
    .await;
    answers.iter().all(|a| match a {
        Ok(Response::Status(v)) => v
            .iter()
            .any(|s| s.prepared.is_none() && s.sha256.map(|h| h.0) == Some(digest.sha256)),
        _ => false,
    })
}

/// `node: error` for every node whose decision was not acknowledged.
pub fn failures(nodes: &[NodeConfig], results: &[Result<u64, DeliverError>]) -> Vec<String> {
    nodes
        .iter()
        .zip(results)
        .filter_map(|(n, r)| r.as_ref().err().map(|e| format!("{}: {e}", n.name)))
        .collect()
}
