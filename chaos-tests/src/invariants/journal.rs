//! Gathers what every node's journal (`<state_dir>/tables/<table>.json`) and decision log
//! (`<state_dir>/decisions/<txid>.json`) say over time, plus `txmap status` answers and, at the
//! end, each node's history: the raw material of the
//! [`super::monotonic`], [`super::aborted`] and [`super::outcomes`] checks.
//!
//! A journal keeps only its last 64 outcomes, so one sample at the end would not do: a thread
//! samples every node every `period` (50 ms by default; a commit takes longer than that) and
//! accumulates, per node, every transaction outcome ever seen and every change of the live
//! generation.

use super::Clock;
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;
use txmap_common::history::History;
use txmap_common::journal::Journal;
use txmap_common::machine::{Outcome, Phase};

/// The live state of a node at one moment, as one source reported it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Live {
    /// When it was seen (ms since the start).
    pub at_ms: u64,
    /// Live generation.
    pub generation: u64,
    /// sha256 (hex) of the live source, as recorded.
    pub sha256: Option<String>,
    /// Transaction that made it live.
    pub txid: Option<String>,
}

/// How one transaction ended on one node, as far as anything showed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NodeOutcome {
    /// Committed at this generation, first seen then.
    pub committed: Option<(u64, u64)>,
    /// Aborted, first seen then.
    pub aborted: Option<u64>,
}

/// Everything seen of one node.
#[derive(Debug, Clone, Default)]
pub struct NodeLog {
    /// Journal samples, only when (generation, sha256, txid) changed, in time order.
    pub journal: Vec<Live>,
    /// `txmap status` answers, in the order they were asked (each one finished before the
    /// next was asked, so they form a valid time sequence of their own).
    pub status: Vec<Live>,
    /// The node's history at the end: generation → (sha256, txid).
    pub history: BTreeMap<u64, (String, String)>,
    /// Transaction outcomes (from the journal's recent list and the history).
    pub outcomes: HashMap<String, NodeOutcome>,
    /// Transactions seen prepared (in doubt): first and last time.
    pub in_doubt: HashMap<String, (u64, u64)>,
    /// Transactions seen *Installing* (the node received Commit: the decision was commit),
    /// first seen then.
    pub installing: HashMap<String, u64>,
    /// Decisions in this node's decision log (`decisions/<txid>.json`): txid → (`commit` or
    /// `abort`, first seen then). A record is created once (no-replace) and never rewritten.
    pub decisions: HashMap<String, (String, u64)>,
    /// Journal reads.
    pub samples: u64,
    /// Journal reads that failed (file being replaced, node dir gone...).
    pub read_errors: u64,
    /// Power cuts of this node, from the instant the power went to the instant the disks were
    /// back (ms since the start): what was sampled before one may have been visible without
    /// being durable, so a sequence is not compared across a cut (the power checks of the
    /// runner compare what was *acknowledged* instead).
    pub cuts: Vec<(u64, u64)>,
    /// Decision records sampled shortly before a cut that the cut took back (linked, not yet
    /// fsynced: nobody acted on them), dropped from [`NodeLog::decisions`].
    pub decisions_lost_to_cuts: u64,
}

impl NodeLog {
    fn outcome(&mut self, txid: String, o: Outcome, at: u64) {
        let e = self.outcomes.entry(txid).or_default();
        match o {
            Outcome::Committed(g) => {
                if e.committed.is_none() {
                    e.committed = Some((g, at));
                }
            }
            Outcome::Aborted => {
                if e.aborted.is_none() {
                    e.aborted = Some(at);
                }
            }
        }
    }
}

/// One source's claim that a generation holds a content / a transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    /// Node number (1-based).
    pub node: usize,
    /// `journal`, `status`, `history` or `outcome`.
    pub source: &'static str,
    /// sha256 (hex), when the source says.
    pub sha256: Option<String>,
    /// Transaction id, when the source says.
    pub txid: Option<String>,
}

/// Per node (index 0 = node1).
#[derive(Debug, Clone, Default)]
pub struct JournalLog {
    /// One log per node.
    pub nodes: Vec<NodeLog>,
}

impl JournalLog {
    /// Every (generation → set of (sha256, txid)) claim from every source of every node.
    pub fn generation_claims(&self) -> BTreeMap<u64, Vec<Claim>> {
        let mut m: BTreeMap<u64, Vec<Claim>> = BTreeMap::new();
        let claim = |node, source, sha256, txid| Claim {
            node,
            source,
            sha256,
            txid,
        };
        for (i, n) in self.nodes.iter().enumerate() {
            for (src, list) in [("journal", &n.journal), ("status", &n.status)] {
                for l in list.iter().filter(|l| l.generation > 0) {
                    m.entry(l.generation).or_default().push(claim(
                        i + 1,
                        src,
                        l.sha256.clone(),
                        l.txid.clone(),
                    ));
                }
            }
            for (g, (sha, txid)) in &n.history {
                m.entry(*g).or_default().push(claim(
                    i + 1,
                    "history",
                    Some(sha.clone()),
                    Some(txid.clone()),
                ));
            }
            for (txid, o) in &n.outcomes {
                if let Some((g, _)) = o.committed {
                    m.entry(g)
                        .or_default()
                        .push(claim(i + 1, "outcome", None, Some(txid.clone())));
                }
            }
        }
        m
    }

    /// Every sha256 any node recorded as committed (live in a journal, in `status`, or in
    /// history).
    pub fn committed_shas(&self) -> Vec<String> {
        let mut v: Vec<String> = Vec::new();
        for n in &self.nodes {
            for l in n.journal.iter().chain(&n.status) {
                if let Some(s) = &l.sha256 {
                    v.push(s.clone());
                }
            }
            for (s, _) in n.history.values() {
                v.push(s.clone());
            }
        }
        v.sort();
        v.dedup();
        v
    }

    /// Longest time any transaction was seen prepared on one node, in ms, with its node.
    pub fn longest_in_doubt(&self) -> Option<(usize, String, u64)> {
        self.nodes
            .iter()
            .enumerate()
            .flat_map(|(i, n)| {
                n.in_doubt
                    .iter()
                    .map(move |(t, (a, b))| (i + 1, t.clone(), b.saturating_sub(*a)))
            })
            .max_by_key(|x| x.2)
    }
}

/// The sampling thread.
#[derive(Debug)]
pub struct Sampler {
    paused: Arc<Mutex<std::collections::HashSet<usize>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    log: Arc<Mutex<JournalLog>>,
    state_dirs: Vec<PathBuf>,
    table: String,
    clock: Clock,
}

fn sample(
    log: &Mutex<JournalLog>,
    paused: &Mutex<std::collections::HashSet<usize>>,
    state_dirs: &[PathBuf],
    table: &str,
    clock: Clock,
) {
    for (i, dir) in state_dirs.iter().enumerate() {
        if paused.lock().is_ok_and(|p| p.contains(&i)) {
            continue;
        }
        let read = Journal::open(dir)
            .map_err(|e| e.to_string())
            .and_then(|j| j.load(table).map_err(|e| e.to_string()));
        let at = clock.ms();
        let Ok(mut log) = log.lock() else { return };
        let n = &mut log.nodes[i];
        n.samples += 1;
        let st = match read {
            Ok(s) => s,
            Err(_) => {
                n.read_errors += 1;
                continue;
            }
        };
        let live = Live {
            at_ms: at,
            generation: st.generation,
            sha256: st.sha256.map(|s| s.to_string()),
            txid: st.last_txid.map(|t| t.to_string()),
        };
        let changed = n.journal.last().is_none_or(|l| {
            (l.generation, &l.sha256, &l.txid) != (live.generation, &live.sha256, &live.txid)
        });
        if changed {
            n.journal.push(live);
        }
        for (txid, o) in &st.recent {
            n.outcome(txid.to_string(), *o, at);
        }
        if let Some(a) = st.active.as_ref().filter(|a| a.phase == Phase::Prepared) {
            let e = n.in_doubt.entry(a.txid.to_string()).or_insert((at, at));
            e.1 = at;
        }
        if let Some(a) = st.active.as_ref().filter(|a| a.phase == Phase::Installing) {
            n.installing.entry(a.txid.to_string()).or_insert(at);
        }
        read_decisions(n, &dir.join("decisions"), at);
    }
}

/// Adds the decision records of `dir` not seen yet (records are immutable once linked).
fn read_decisions(n: &mut NodeLog, dir: &std::path::Path, at: u64) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        let name = e.file_name();
        let Some(txid) = name.to_str().and_then(|x| x.strip_suffix(".json")) else {
            continue;
        };
        if txid.len() != 32 || n.decisions.contains_key(txid) {
            continue;
        }
        let Ok(b) = std::fs::read(e.path()) else {
            continue;
        };
        let Ok(v) = serde_json::from_slice::<serde_json::Value>(&b) else {
            continue;
        };
        if let Some(verdict) = v.get("verdict").and_then(|x| x.as_str()) {
            n.decisions
                .insert(txid.to_string(), (verdict.to_string(), at));
        }
    }
}

impl Sampler {
    /// Records that node `node` (1-based) just lost power and came back with what was durable:
    /// decision records first seen less than `window` before now and gone now were never
    /// durable, and are forgotten (they cannot have been acted on: every reader of a decision
    /// fsyncs its directory first).
    pub fn power_cut(&self, node: usize, from_ms: u64, window: Duration) {
        let at = self.clock.ms();
        let Some(dir) = self.state_dirs.get(node - 1) else {
            return;
        };
        let dir = dir.join("decisions");
        let Ok(mut log) = self.log.lock() else { return };
        let n = &mut log.nodes[node - 1];
        n.cuts.push((from_ms, at));
        let recent = at.saturating_sub(window.as_millis() as u64);
        let gone: Vec<String> = n
            .decisions
            .iter()
            .filter(|(txid, (_, seen))| {
                *seen >= recent && !dir.join(format!("{txid}.json")).exists()
            })
            .map(|(t, _)| t.clone())
            .collect();
        for t in gone {
            n.decisions.remove(&t);
            n.decisions_lost_to_cuts += 1;
        }
    }

    /// Stops (`true`) or resumes sampling node `node` (1-based): while its disks are being
    /// cut, its state directory is frozen and then, between two mounts, empty.
    pub fn pause(&self, node: usize, paused: bool) {
        if let Ok(mut p) = self.paused.lock() {
            if paused {
                p.insert(node - 1);
            } else {
                p.remove(&(node - 1));
            }
        }
    }

    /// Starts sampling the journal of `table` in every state directory (index 0 = node1).
    pub fn start(state_dirs: Vec<PathBuf>, table: &str, clock: Clock, period: Duration) -> Sampler {
        let log = Arc::new(Mutex::new(JournalLog {
            nodes: vec![NodeLog::default(); state_dirs.len()],
        }));
        let stop = Arc::new(AtomicBool::new(false));
        let paused = Arc::new(Mutex::new(std::collections::HashSet::new()));
        let thread = {
            let (log, paused, stop, dirs, table) = (
                log.clone(),
                paused.clone(),
                stop.clone(),
                state_dirs.clone(),
                table.to_string(),
            );
            std::thread::Builder::new()
                .name("journal-sampler".into())
                .spawn(move || {
                    while !stop.load(Ordering::SeqCst) {
                        sample(&log, &paused, &dirs, &table, clock);
                        std::thread::sleep(period);
                    }
                })
                .expect("spawn the journal sampler")
        };
        Sampler {
            paused,
            stop,
            thread: Some(thread),
            log,
            state_dirs,
            table: table.to_string(),
            clock,
        }
    }

    /// Records one `txmap status --json` answer (the array of nodes, in config order).
    pub fn record_status(&self, status: &serde_json::Value) {
        let at = self.clock.ms();
        let Some(nodes) = status.as_array() else {
            return;
        };
        let Ok(mut log) = self.log.lock() else { return };
        for (i, n) in nodes.iter().enumerate().take(log.nodes.len()) {
            let Some(t) = n.get("tables").and_then(|t| t.as_array()).and_then(|ts| {
                ts.iter()
                    .find(|t| t.get("table").and_then(|x| x.as_str()) == Some(self.table.as_str()))
            }) else {
                continue;
            };
            let Some(generation) = t.get("generation").and_then(|g| g.as_u64()) else {
                continue;
            };
            log.nodes[i].status.push(Live {
                at_ms: at,
                generation,
                sha256: t.get("sha256").and_then(|s| s.as_str()).map(str::to_string),
                txid: t
                    .get("last_txid")
                    .and_then(|s| s.as_str())
                    .map(str::to_string),
            });
        }
    }

    /// Stops sampling, takes a last sample and reads every node's history.
    pub fn stop(mut self) -> JournalLog {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        sample(
            &self.log,
            &self.paused,
            &self.state_dirs,
            &self.table,
            self.clock,
        );
        let at = self.clock.ms();
        let mut log = self.log.lock().map(|l| l.clone()).unwrap_or_default();
        for (i, dir) in self.state_dirs.iter().enumerate() {
            for e in History::new(dir, &self.table).list() {
                let n = &mut log.nodes[i];
                n.history
                    .insert(e.generation, (e.sha256.to_string(), e.txid.to_string()));
                n.outcome(e.txid.to_string(), Outcome::Committed(e.generation), at);
            }
        }
        log
    }
}

/// A sampler dropped without [`Sampler::stop`] (a run that failed half-way) stops its thread
/// first: it must not recreate the state directories the sandbox is about to remove.
impl Drop for Sampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
