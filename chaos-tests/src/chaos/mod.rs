//! The chaos runner: a real N-node sandbox cluster, a UDP fault proxy on every link between
//! nodes, readers on every node, and a schedule of faults drawn from a seed; then the
//! invariant checkers of [`crate::invariants`] judge what happened.
//!
//! One *step* of the schedule writes a new version of the shared source (stable keys, a marker
//! key only this version has, some churn lines) and commits it under one primary fault
//! (a failpoint, a kill, a freeze, a partition, a failing builder, a full disk, concurrent
//! coordinators, and since issue 9: storage errors returned by failpoints in `txmap` and in
//! `txmapd`, failed installs on the coordinator's own node, an outage longer than the
//! remembered window, an operator's `txmap recover`, a commit via the out-of-service node),
//! while the background network condition (loss, delay, duplication, reordering on some or all
//! links) changes every few steps. With `Profile::out_of_service`, extra nodes run configured
//! `in_service = false` everywhere, reachable through proxies like the others. After the last step every fault
//! stops, and the cluster must converge by itself: nobody runs a command.
//!
//! With a `power` profile (issue 13) every node's table and state directories are on the
//! lossy filesystem of [`crate::lossyfs`], and a step can cut a node's power: see
//! [`Fault::PowerCut`]. Then one more checker runs ([`POWER`]): after every cut, the node's
//! durable journal still holds every commit `txmap` had reported committed, and once it is
//! back its live table is whole and is the generation its journal records; the same for
//! every node at the end.
//!
//! Use [`run`] (the `chaos` binary and `tests/chaos.rs` do).

pub mod config_edit;
pub mod schedule;

use crate::cluster::{bins, is_root, TestCluster, TABLE};
use crate::invariants::journal::Sampler;
use crate::invariants::operator::{self, RecoverRun};
use crate::invariants::outcomes::CommitRun;
use crate::invariants::visibility::{ReaderTarget, Readers};
use crate::invariants::{
    aborted, clean, convergence, monotonic, outcomes, visibility, Clock, Tally, Version, Versions,
    Violation,
};
use crate::lossyfs::cluster::{node_disks, served};
use crate::lossyfs::{CutReport, PowerNode};
use crate::proxy::{Faults, ProxySet, Stats};
use anyhow::{Context, Result};
use schedule::{
    storage_env, Fault, Kind, OutageStart, PowerMoment, Profile, Schedule, Step, FAILPOINTS,
    HOLD_POINTS, INSTALL_POINTS, STORAGE_POINTS,
};
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use txmap_common::machine::RECENT;

/// What to run.
#[derive(Debug, Clone)]
pub struct Options {
    /// Nodes in the cluster.
    pub nodes: usize,
    /// Steps (transactions) in the schedule.
    pub transactions: usize,
    /// The seed everything random is drawn from.
    pub seed: u64,
    /// The fault mix and settings.
    pub profile: Profile,
    /// Start this node's `txmapd` with `TXMAP_CHAOS_BROKEN=rename-before-durable` (a
    /// deliberately broken participant: the checkers must catch it).
    pub broken: Option<usize>,
    /// Print each step as it runs (to stderr).
    pub verbose: bool,
    /// Set (e.g. by a signal handler) to stop between two steps; the run then returns an
    /// error and cleans up.
    pub stop: Option<Arc<AtomicBool>>,
    /// `TXMAP_DEFECTS` for every `txmapd` and `txmap` (test-only switches of
    /// `common/src/defects.rs`, e.g. `install-skips-dir-fsync`): the run must then report
    /// violations.
    pub defects: Option<String>,
}

/// libfaketime, as Debian's `libfaketime` package installs it: every node's processes run with
/// a wall clock off by [`clock_offset_s`] when it is present (no clock may order changes).
const FAKETIME: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1";

/// Node `i`'s wall-clock offset in seconds for a run with `seed`: node1 is on time, the others
/// drawn in -7..=7 s from the seed (the same seed gives the same clocks).
pub fn clock_offset_s(seed: u64, i: usize) -> i64 {
    if i <= 1 {
        return 0;
    }
    let h = seed
        .wrapping_add(i as u64)
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .rotate_left(17);
    (h % 15) as i64 - 7
}

/// The environment that puts node `i`'s processes on its clock (empty without libfaketime).
fn clock_env(seed: u64, i: usize) -> Vec<(&'static str, String)> {
    let off = clock_offset_s(seed, i);
    if off == 0 || !std::path::Path::new(FAKETIME).exists() {
        return Vec::new();
    }
    vec![
        ("LD_PRELOAD", FAKETIME.to_string()),
        ("FAKETIME", format!("{off:+}s")),
        ("FAKETIME_DONT_FAKE_MONOTONIC", "1".to_string()),
        ("FAKETIME_NO_CACHE", "1".to_string()),
    ]
}

/// Name of the power checker (profiles with `power`).
pub const POWER: &str = "power: acknowledged commits kept, tables whole";

impl Options {
    /// The profile's defaults with this seed.
    pub fn new(profile: Profile, seed: u64) -> Options {
        Options {
            nodes: profile.nodes,
            transactions: profile.transactions,
            seed,
            profile,
            broken: None,
            verbose: false,
            stop: None,
            defects: None,
        }
    }
}

/// One row of the fault table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FaultRow {
    /// What.
    pub label: String,
    /// Times the schedule asked for it.
    pub planned: u64,
    /// Times it took effect (the failpoint fired, the kill hit a live process, datagrams...).
    pub injected: u64,
    /// Remark.
    pub note: String,
}

/// The result of a run.
#[derive(Debug, Clone)]
pub struct Report {
    /// The schedule that ran.
    pub schedule: Schedule,
    /// Deliberately broken node, if any.
    pub broken: Option<usize>,
    /// Faults planned and injected.
    pub faults: Vec<FaultRow>,
    /// Each invariant with its checks and violations.
    pub invariants: Vec<(&'static str, Tally)>,
    /// `txmap commit` runs by exit code (`killed` for those killed on purpose).
    pub exits: BTreeMap<String, u64>,
    /// Commits that sent a delta to some node, and commits that sent only whole tables (of those
    /// that prepared).
    pub delta_commits: (u64, u64),
    /// `txmap recover --abort/--commit` runs by exit code.
    pub recover_exits: BTreeMap<String, u64>,
    /// Nodes taking part: in service, then out of service.
    pub node_counts: (usize, usize),
    /// Distinct transactions the journals showed committed and aborted (retries by the
    /// coordinators and pending retries by `txmapd` included).
    pub transactions_seen: (u64, u64),
    /// Highest generation reached.
    pub final_generation: u64,
    /// Wall time of the whole run.
    pub elapsed: Duration,
    /// Time from the faults stopping to convergence (None: never).
    pub convergence: Option<Duration>,
    /// Reader lookups (`postmap -q` runs) and the slowest, in ms.
    pub reader_rounds: (u64, u64),
    /// Longest time a transaction stayed prepared on a node: (node, txid, ms).
    pub longest_in_doubt: Option<(usize, String, u64)>,
    /// Datagram counters of every proxy.
    pub proxy: Stats,
    /// The sandbox directory (kept only with `TXMAP_KEEP_TEST_DIRS`).
    pub dir: PathBuf,
    /// Oddities that break no guarantee of DESIGN.md but deserve a look.
    pub findings: Vec<String>,
}

impl Report {
    /// Every violation, in invariant order.
    pub fn violations(&self) -> Vec<&Violation> {
        self.invariants
            .iter()
            .flat_map(|(_, t)| t.violations.iter())
            .collect()
    }

    /// The tables and, on failure, the violations, the seed and the schedule.
    pub fn render(&self) -> String {
        let mut s = String::new();
        let sch = &self.schedule;
        s.push_str(&format!(
            "chaos run: seed {} profile {} nodes {} transactions {} (schedule {}){}\n",
            sch.seed,
            sch.profile,
            sch.nodes,
            sch.steps.len(),
            sch.fingerprint(),
            self.broken
                .map(|b| format!(", BROKEN participant on node{b}"))
                .unwrap_or_default()
        ));
        if std::path::Path::new(FAKETIME).exists() {
            let clocks: Vec<String> = (1..=sch.nodes)
                .map(|i| format!("node{i} {:+} s", clock_offset_s(sch.seed, i)))
                .collect();
            s.push_str(&format!("wall clocks: {}\n", clocks.join(", ")));
        }
        s.push_str(&format!(
            "wall time {:.1} s; final generation {}; transactions seen in journals: {} committed, {} aborted\n",
            self.elapsed.as_secs_f64(),
            self.final_generation,
            self.transactions_seen.0,
            self.transactions_seen.1
        ));
        let exits: Vec<String> = self
            .exits
            .iter()
            .map(|(k, v)| format!("{k}: {v}"))
            .collect();
        let total: u64 = self.exits.values().sum();
        s.push_str(&format!(
            "txmap commit runs: {total} ({}); with a delta: {}, whole tables only: {}\n",
            exits.join(", "),
            self.delta_commits.0,
            self.delta_commits.1
        ));
        if !self.recover_exits.is_empty() {
            let r: Vec<String> = self
                .recover_exits
                .iter()
                .map(|(k, v)| format!("{k}: {v}"))
                .collect();
            s.push_str(&format!(
                "txmap recover --abort/--commit: {}\n",
                r.join(", ")
            ));
        }
        if self.node_counts.1 > 0 {
            s.push_str(&format!(
                "nodes: {} in service + {} out of service (running, reachable)\n",
                self.node_counts.0, self.node_counts.1
            ));
        }
        s.push_str(&format!(
            "convergence after the faults stopped: {}; longest in doubt: {}; reader lookups: {} (slowest {} ms)\n\n",
            self.convergence
                .map(|d| format!("{:.1} s", d.as_secs_f64()))
                .unwrap_or_else(|| "NEVER".into()),
            self.longest_in_doubt
                .as_ref()
                .map(|(n, _, ms)| format!("{ms} ms on node{n}"))
                .unwrap_or_else(|| "-".into()),
            self.reader_rounds.0,
            self.reader_rounds.1
        ));
        let w = self
            .faults
            .iter()
            .map(|f| f.label.len())
            .max()
            .unwrap_or(10)
            .max(5);
        s.push_str(&format!(
            "{:<w$}  {:>8}  {:>9}  note\n",
            "fault", "planned", "injected"
        ));
        s.push_str(&format!("{}\n", "-".repeat(w + 32)));
        for f in &self.faults {
            s.push_str(&format!(
                "{:<w$}  {:>8}  {:>9}  {}\n",
                f.label, f.planned, f.injected, f.note
            ));
        }
        s.push('\n');
        let w = self
            .invariants
            .iter()
            .map(|(n, _)| n.len())
            .max()
            .unwrap_or(10)
            .max(9);
        s.push_str(&format!(
            "{:<w$}  {:>9}  {:>10}\n",
            "invariant", "checks", "violations"
        ));
        s.push_str(&format!("{}\n", "-".repeat(w + 24)));
        for (n, t) in &self.invariants {
            s.push_str(&format!(
                "{:<w$}  {:>9}  {:>10}\n",
                n,
                t.checks,
                t.violations.len()
            ));
        }
        if !self.findings.is_empty() {
            s.push_str(&format!(
                "\nfindings (no guarantee broken): {}\n",
                self.findings.len()
            ));
            for f in self.findings.iter().take(10) {
                s.push_str(&format!("  {f}\n"));
            }
        }
        let v = self.violations();
        if v.is_empty() {
            s.push_str("\nviolations: 0\n");
        } else {
            s.push_str(&format!(
                "\nVIOLATIONS: {} (seed {}, profile {}, nodes {}, transactions {})\n",
                v.len(),
                sch.seed,
                sch.profile,
                sch.nodes,
                sch.steps.len()
            ));
            for (name, t) in &self.invariants {
                for x in t.violations.iter().take(15) {
                    s.push_str(&format!("  {x}\n"));
                }
                if t.violations.len() > 15 {
                    s.push_str(&format!(
                        "  [{name}] ... and {} more\n",
                        t.violations.len() - 15
                    ));
                }
            }
            s.push_str(&format!(
                "\nreplay: cargo run -p txmap-chaos-tests --bin chaos -- run --nodes {} --transactions {} --seed {} --profile {}{}\n",
                sch.nodes,
                sch.steps.len(),
                sch.seed,
                sch.profile,
                self.broken.map(|b| format!(" --broken {b}")).unwrap_or_default()
            ));
            if std::env::var_os("TXMAP_KEEP_TEST_DIRS").is_some() {
                s.push_str(&format!("sandbox (kept): {}\n\n", self.dir.display()));
            } else {
                s.push_str("sandbox removed; add --keep to look at logs and journals\n\n");
            }
            s.push_str(&sch.to_string());
        }
        s
    }
}

/// A running `txmap commit --json`, its output drained by threads.
struct Proc {
    child: Child,
    out: Option<JoinHandle<String>>,
    err: Option<JoinHandle<String>>,
    started: Instant,
    started_ms: u64,
    coordinator: usize,
    version: u64,
}

fn drain<R: Read + Send + 'static>(r: Option<R>) -> Option<JoinHandle<String>> {
    r.map(|mut r| {
        std::thread::spawn(move || {
            let mut s = String::new();
            let _ = r.read_to_string(&mut s);
            s
        })
    })
}

/// Ballast file that fills a node's table directory.
const BALLAST: &str = "chaos-ballast";
/// Size of the tmpfs mounted over every table directory (root only).
const TMPFS_SIZE: &str = "24m";

#[derive(Debug, Default, Clone)]
struct Count {
    planned: u64,
    injected: u64,
    note: String,
}

struct Runner<'a> {
    /// Per node, its lossy disks (power profiles only). First: unmounted before the sandbox
    /// (`c`) is removed.
    power: Vec<PowerNode>,
    /// Per node, its power (odd while cut), shared with its reader.
    gates: Vec<Arc<AtomicU64>>,
    /// The power checker's tally.
    power_tally: Tally,
    /// What the cuts threw away, summed, and how many cuts hit.
    cut_stats: (CutReport, u64),
    /// Held cuts (deciding, installing) by the phase the node's durable journal held.
    landed: BTreeMap<(&'static str, String), u64>,
    opts: &'a Options,
    /// Churn lines of the last version: every other version keeps them (only its marker
    /// differs), so that about half the commits are small changes sent as deltas.
    last_churn: usize,
    /// In-service nodes plus out-of-service ones.
    total: usize,
    recovers: Vec<RecoverRun>,
    /// Long outages: commits with an outcome while a node was out, outages that left it
    /// prepared (aborted without its vote), outages that made it miss a decided commit.
    outage: (u64, u64, u64),
    c: TestCluster,
    proxies: ProxySet,
    clock: Clock,
    versions: Arc<Versions>,
    sampler: Option<Sampler>,
    readers: Option<Readers>,
    running: Vec<bool>,
    runs: Vec<CommitRun>,
    counts: BTreeMap<Kind, Count>,
    stuck: Tally,
    findings: Vec<String>,
    tmpfs: bool,
    failing_postmap: PathBuf,
    stable: Vec<String>,
    content: String,
    limit: Duration,
}

/// A run that failed half-way stops its sampler and readers before the sandbox goes (they
/// would recreate directories in it, or read from unmounted disks).
impl Drop for Runner<'_> {
    fn drop(&mut self) {
        drop(self.sampler.take());
        if let Some(r) = self.readers.take() {
            r.stop();
        }
    }
}

/// Runs the whole thing: setup, the schedule, the faults stopping, convergence, the checks.
pub fn run(opts: &Options) -> Result<Report> {
    let started = Instant::now();
    let tmpfs_possible = is_root();
    let schedule = Schedule::draw(
        opts.seed,
        &opts.profile,
        opts.nodes,
        opts.transactions,
        tmpfs_possible,
    );
    let mut r = Runner::setup(opts, tmpfs_possible)?;
    if opts.verbose {
        eprintln!(
            "chaos: sandbox {} (schedule {})",
            r.c.root().display(),
            schedule.fingerprint()
        );
    }
    for step in &schedule.steps {
        if opts.stop.as_ref().is_some_and(|s| s.load(Ordering::SeqCst)) {
            anyhow::bail!("interrupted before step {}", step.index);
        }
        r.step(step)?;
    }
    r.finish(schedule, started)
}

impl<'a> Runner<'a> {
    fn setup(opts: &'a Options, tmpfs_possible: bool) -> Result<Runner<'a>> {
        anyhow::ensure!(opts.nodes >= 1 && opts.nodes <= 9, "--nodes must be 1..=9");
        anyhow::ensure!(opts.transactions >= 1, "--transactions must be at least 1");
        if let Some(b) = opts.broken {
            anyhow::ensure!(
                (1..=opts.nodes).contains(&b),
                "--broken must name a node (1..={})",
                opts.nodes
            );
        }
        let n = opts.nodes;
        let total = n + opts.profile.out_of_service;
        let c = TestCluster::create(&format!("chaos-{}", opts.seed), total)?;
        let clock = Clock::start();
        // A proxy for every link between two different nodes; every node's config names its
        // peers by their proxy. A node reaches itself directly.
        let mut proxies = ProxySet::new()?;
        let real = |k: usize| -> SocketAddr {
            SocketAddr::from(([127, 0, 0, 1], c.base_port + k as u16 - 1))
        };
        for j in 1..=total {
            for k in (1..=total).filter(|k| *k != j) {
                let via = proxies.add(j, k, 0, real(k), opts.seed)?;
                c.edit_config(j, |t| {
                    config_edit::set_node_address(&t, &format!("node{k}"), &via.to_string())
                });
            }
            // The extra nodes are configured out of service everywhere (their own config too),
            // and run: reachable, answering, never members.
            for k in n + 1..=total {
                c.edit_config(j, |t| {
                    config_edit::set_node_key(&t, &format!("node{k}"), "in_service", "false")
                });
            }
            c.edit_config(j, |mut t| {
                for (k, v) in &opts.profile.timeouts {
                    t = config_edit::set_key(&t, Some("timeouts"), k, &v.to_string());
                }
                // The content guard off: every step's churn changes many entries on purpose
                // (an empty source stays refused, and the runner never writes one).
                t = config_edit::set_key(&t, None, "max_shrink_percent", "100");
                // Keep every generation's copy: the checkers read the history at the end.
                config_edit::set_key(&t, None, "history_keep", "1000000")
            });
        }
        let failing_postmap = c.dir.0.join("failing-postmap");
        std::fs::write(
            &failing_postmap,
            "#!/bin/sh\necho \"postmap: fatal: chaos: this node's builder fails on purpose\" >&2\nexit 1\n",
        )?;
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&failing_postmap, std::fs::Permissions::from_mode(0o755))?;
        }
        let mut c = c;
        let mut tmpfs = false;
        let mut power = Vec::new();
        if opts.profile.power {
            crate::lossyfs::check_available()?;
            for i in 1..=total {
                power.push(PowerNode::over(&node_disks(&c, i))?);
            }
        } else if tmpfs_possible {
            tmpfs = true;
            for i in 1..=n {
                if let Err(e) = c.mount_tmpfs(i, TMPFS_SIZE) {
                    eprintln!("chaos: cannot mount a tmpfs ({e:#}); no full-disk faults");
                    tmpfs = false;
                    break;
                }
            }
        }
        let versions = Versions::shared();
        let stable = Versions::stable_keys(opts.profile.stable_keys);
        let state_dirs = (1..=total).map(|i| c.node_dir(i).join("state")).collect();
        let sampler = Sampler::start(state_dirs, TABLE, clock, Duration::from_millis(50));
        let t = |k: &str| {
            opts.profile
                .timeouts
                .iter()
                .find(|(x, _)| *x == k)
                .map(|(_, v)| *v)
        };
        let limit = Duration::from_millis(
            t("total_ms").unwrap_or(9000) + t("commit_ms").unwrap_or(2000) + 3000,
        );
        let mut r = Runner {
            last_churn: 0,
            power,
            gates: (0..total).map(|_| Arc::new(AtomicU64::new(0))).collect(),
            power_tally: Tally::default(),
            cut_stats: (CutReport::default(), 0),
            landed: BTreeMap::new(),
            opts,
            total,
            recovers: Vec::new(),
            outage: (0, 0, 0),
            c,
            proxies,
            clock,
            versions,
            sampler: Some(sampler),
            readers: None,
            running: vec![false; total],
            runs: Vec::new(),
            counts: BTreeMap::new(),
            stuck: Tally::default(),
            findings: Vec::new(),
            tmpfs,
            failing_postmap,
            stable,
            content: String::new(),
            limit,
        };
        for i in 1..=total {
            anyhow::ensure!(r.start(i, None), "txmapd of node{i} does not start");
        }
        // Version 0, committed with no fault, is what the readers find first.
        r.new_version(0)?;
        let mut ok = false;
        for _ in 0..5 {
            let p = r.spawn_commit(1, &[])?;
            let run = r.finish_commit(p, usize::MAX, false);
            if run.exit == Some(0) {
                ok = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        anyhow::ensure!(ok, "the first, fault-free commit failed");
        let targets = (1..=n)
            .map(|i| ReaderTarget {
                node: i,
                confdir: r.c.table_dir(i),
                live: r.c.live(i),
                power: r.opts.profile.power.then(|| r.gates[i - 1].clone()),
            })
            .collect();
        r.readers = Some(Readers::start(
            targets,
            r.stable.clone(),
            r.versions.clone(),
            clock,
            opts.profile.reader_pause,
        ));
        Ok(r)
    }

    fn count(&mut self, k: Kind, planned: bool, injected: bool) {
        let e = self.counts.entry(k).or_default();
        e.planned += planned as u64;
        e.injected += injected as u64;
    }

    fn note(&mut self, k: Kind, note: &str) {
        let e = self.counts.entry(k).or_default();
        if !e.note.contains(note) {
            if !e.note.is_empty() {
                e.note.push_str("; ");
            }
            e.note.push_str(note);
        }
    }

    /// Starts node `i` (with a failpoint, or the broken switch when it is the broken node).
    /// A daemon that cannot start again is a stuck state.
    fn start(&mut self, i: usize, failpoint: Option<&str>) -> bool {
        let fp = failpoint.map(|p| format!("{p}=panic"));
        self.start_fp(i, fp.as_deref())
    }

    /// Starts node `i` with `FAILPOINTS=<fp>` (any action), as [`Runner::start`] does.
    fn start_fp(&mut self, i: usize, fp: Option<&str>) -> bool {
        let clock = clock_env(self.opts.seed, i);
        let mut env: Vec<(&str, &str)> = clock.iter().map(|(k, v)| (*k, v.as_str())).collect();
        if let Some(f) = fp {
            env.push(("FAILPOINTS", f));
        }
        if self.opts.broken == Some(i) {
            env.push(("TXMAP_CHAOS_BROKEN", "rename-before-durable"));
        }
        if let Some(d) = &self.opts.defects {
            env.push(("TXMAP_DEFECTS", d));
        }
        let mut last = String::new();
        for _ in 0..10 {
            match self.c.start_node_with(i, &env) {
                Ok(()) => {
                    self.running[i - 1] = true;
                    return true;
                }
                Err(e) => {
                    last = format!("{e:#}");
                    self.c.kill_node(i);
                    std::thread::sleep(Duration::from_millis(1000));
                }
            }
        }
        let at = self.clock.ms();
        self.stuck.check(false, clean::NAME, at, || {
            format!(
                "node{i}: txmapd does not start again: {}",
                last.chars()
                    .rev()
                    .take(600)
                    .collect::<String>()
                    .chars()
                    .rev()
                    .collect::<String>()
            )
        });
        false
    }

    /// Starts node `i` once with `FAILPOINTS=<env>` (storage errors). A daemon that refuses to
    /// start with them armed (a journal write at start-up failed: crash-only) is not stuck:
    /// `false`, and the caller starts it clean.
    fn start_armed(&mut self, i: usize, env: &str) -> bool {
        let clock = clock_env(self.opts.seed, i);
        let mut e: Vec<(&str, &str)> = clock.iter().map(|(k, v)| (*k, v.as_str())).collect();
        e.push(("FAILPOINTS", env));
        if self.opts.broken == Some(i) {
            e.push(("TXMAP_CHAOS_BROKEN", "rename-before-durable"));
        }
        if let Some(d) = &self.opts.defects {
            e.push(("TXMAP_DEFECTS", d));
        }
        match self.c.start_node_with(i, &e) {
            Ok(()) => {
                self.running[i - 1] = true;
                true
            }
            Err(_) => {
                self.c.kill_node(i);
                self.running[i - 1] = false;
                false
            }
        }
    }

    /// Length of node `i`'s daemon log (to read what a fault made it log).
    fn log_len(&self, i: usize) -> u64 {
        std::fs::metadata(self.c.log(i))
            .map(|m| m.len())
            .unwrap_or(0)
    }

    /// What node `i`'s daemon logged since `from`.
    fn log_since(&self, i: usize, from: u64) -> String {
        let b = std::fs::read(self.c.log(i)).unwrap_or_default();
        String::from_utf8_lossy(b.get(from as usize..).unwrap_or_default()).into_owned()
    }

    /// Every proxy's faults (to put back after a quiet stretch).
    fn save_net(&self) -> Vec<((usize, usize), Faults)> {
        self.proxies
            .links()
            .into_iter()
            .filter_map(|l| self.proxies.get(l.0, l.1).map(|p| (l, p.faults())))
            .collect()
    }

    fn restore_net(&self, saved: Vec<((usize, usize), Faults)>) {
        for ((a, b), f) in saved {
            if let Some(p) = self.proxies.get(a, b) {
                p.set(f);
            }
        }
    }

    /// Restarts node `j`'s daemon (to load an edited config).
    fn restart(&mut self, j: usize) {
        self.kill(j);
        self.start(j, None);
    }

    fn kill(&mut self, i: usize) {
        self.c.kill_node(i);
        self.running[i - 1] = false;
    }

    /// Notices daemons that died on their own (none should: every failpoint is cleared
    /// within its step).
    fn check_daemons(&mut self) {
        for i in 1..=self.total {
            if !self.running[i - 1] {
                continue;
            }
            if let Some(st) = self.c.wait_exit(i, Duration::from_millis(1)) {
                self.running[i - 1] = false;
                let log = std::fs::read_to_string(self.c.log(i)).unwrap_or_default();
                let tail: String = log
                    .lines()
                    .rev()
                    .take(5)
                    .collect::<Vec<_>>()
                    .into_iter()
                    .rev()
                    .collect::<Vec<_>>()
                    .join(" | ");
                let at = self.clock.ms();
                if st.success() && tail.contains("shutting down") {
                    // A clean shutdown: SIGTERM or SIGINT from outside the runner (which only
                    // ever sends SIGKILL, SIGSTOP and SIGCONT). Not txmap's doing; restart it.
                    self.findings.push(format!(
                        "node{i}: txmapd was stopped by a SIGTERM/SIGINT from outside the runner at {:.1} s (restarted)",
                        at as f64 / 1000.0
                    ));
                } else {
                    self.stuck.check(false, clean::NAME, at, || {
                        format!("node{i}: txmapd exited on its own ({st}); log: {tail}")
                    });
                }
            }
        }
    }

    fn ensure_running(&mut self) {
        for i in 1..=self.total {
            if !self.running[i - 1] {
                self.start(i, None);
            }
        }
    }

    /// Registers and writes (atomically: temp file + rename, as an editor would) a new
    /// version of the shared source.
    fn new_version(&mut self, churn: usize) -> Result<Version> {
        self.new_version_with(churn, false)
    }

    /// [`Runner::new_version`]; with `small`, the churn lines stay as they are.
    fn new_version_with(&mut self, churn: usize, small: bool) -> Result<Version> {
        let id = self.versions.all().len() as u64;
        // Like Sympa: lists come and go (churn lines added or removed at the end), and every
        // other version changes only its marker, a change small enough for a delta commit.
        if id % 2 == 1 && !small {
            self.last_churn = churn;
        }
        let churn = self.last_churn;
        let content = Versions::content(id, self.opts.profile.stable_keys, churn);
        let sha = txmap_common::table::hex(
            &txmap_common::table::digest_reader(&mut content.as_bytes())?.sha256,
        );
        let v = Version {
            id,
            sha256: sha,
            marker: Versions::marker(id),
            written_ms: self.clock.ms(),
        };
        self.versions.add(v.clone());
        let src = self.c.source();
        let tmp = src.with_file_name(".sympa_transport.chaos-tmp");
        {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(content.as_bytes())?;
            f.sync_all()?;
        }
        std::fs::rename(&tmp, &src)?;
        self.content = content;
        Ok(v)
    }

    fn spawn_commit(&self, node: usize, env: &[(&str, &str)]) -> Result<Proc> {
        let mut cmd = Command::new(&bins().txmap);
        cmd.arg("--config")
            .arg(self.c.config(node))
            .args(["commit", TABLE, "--json"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .env("NO_COLOR", "1");
        if let Some(d) = &self.opts.defects {
            cmd.env("TXMAP_DEFECTS", d);
        }
        for (k, v) in clock_env(self.opts.seed, node) {
            cmd.env(k, v);
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().context("spawn txmap commit")?;
        let out = drain(child.stdout.take());
        let err = drain(child.stderr.take());
        Ok(Proc {
            child,
            out,
            err,
            started: Instant::now(),
            started_ms: self.clock.ms(),
            coordinator: node,
            version: self.versions.last().map(|v| v.id).unwrap_or(0),
        })
    }

    /// Waits for a commit (killing it if it hangs far past every deadline) and records it.
    fn finish_commit(&mut self, mut p: Proc, step: usize, killed: bool) -> CommitRun {
        let hard = self.limit + Duration::from_secs(30);
        let status = loop {
            match p.child.try_wait() {
                Ok(Some(st)) => break Some(st),
                Ok(None) if p.started.elapsed() > hard => {
                    let _ = p.child.kill();
                    let _ = p.child.wait();
                    break None;
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(10)),
                Err(_) => break None,
            }
        };
        let elapsed_ms = p.started.elapsed().as_millis() as u64;
        let out = p.out.take().and_then(|h| h.join().ok()).unwrap_or_default();
        let err = p.err.take().and_then(|h| h.join().ok()).unwrap_or_default();
        let json: serde_json::Value = serde_json::from_str(&out).unwrap_or(serde_json::Value::Null);
        let mut lines: Vec<String> = json
            .get("nodes")
            .and_then(|n| n.as_array())
            .map(|a| {
                a.iter()
                    .map(|n| {
                        format!(
                            "{}: {}",
                            n.get("node").and_then(|x| x.as_str()).unwrap_or("?"),
                            n.get("detail").and_then(|x| x.as_str()).unwrap_or("")
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        if status.is_none() {
            lines.push("HUNG: killed by the runner".into());
        }
        if lines.is_empty() && !err.trim().is_empty() {
            lines.push(err.lines().last().unwrap_or("").to_string());
        }
        let run = CommitRun {
            step,
            coordinator: p.coordinator,
            version: p.version,
            started_ms: p.started_ms,
            elapsed_ms,
            exit: status.and_then(|s| s.code()),
            killed,
            txid: json
                .get("txid")
                .and_then(|t| t.as_str())
                .map(str::to_string),
            generation: json.get("generation").and_then(|g| g.as_u64()),
            injected: out.contains("injected failure") || err.contains("injected failure"),
            lines,
            members: None,
            storage_fault: false,
            out_of_service: false,
            delta_nodes: json
                .get("delta_nodes")
                .and_then(|d| d.as_u64())
                .unwrap_or(0),
        };
        self.runs.push(run.clone());
        run
    }

    fn commit(&mut self, s: &Step, node: usize, env: &[(&str, &str)]) -> Result<CommitRun> {
        let p = self.spawn_commit(node, env)?;
        Ok(self.finish_commit(p, s.index, false))
    }

    fn apply_net(&mut self, s: &Step) {
        let Some(n) = &s.net else { return };
        let partitioned: Vec<(usize, usize)> = self
            .proxies
            .links()
            .into_iter()
            .filter(|(a, b)| {
                self.proxies
                    .get(*a, *b)
                    .is_some_and(|p| p.faults().partitioned)
            })
            .collect();
        match n.scope {
            None => self.proxies.set_all(n.faults),
            Some(node) => {
                self.proxies.set_all(Faults::clean());
                self.proxies.set_node(node, n.faults);
            }
        }
        for (a, b) in partitioned {
            if let Some(p) = self.proxies.get(a, b) {
                let mut f = p.faults();
                f.partitioned = true;
                p.set(f);
            }
        }
    }

    fn fill_disk(&self, node: usize, leave_kb: u64) -> Result<()> {
        let p = self.c.table_dir(node).join(BALLAST);
        let mut f = std::fs::File::create(&p)?;
        let chunk = vec![0u8; 256 * 1024];
        loop {
            if f.write_all(&chunk).is_err() {
                break;
            }
        }
        let _ = f.flush();
        if leave_kb > 0 {
            let len = f.metadata()?.len();
            f.set_len(len.saturating_sub(leave_kb * 1024))?;
        }
        Ok(())
    }

    fn free_disk(&self, node: usize) {
        let _ = std::fs::remove_file(self.c.table_dir(node).join(BALLAST));
    }

    fn step(&mut self, s: &Step) -> Result<()> {
        let t0 = Instant::now();
        self.apply_net(s);
        self.check_daemons();
        self.ensure_running();
        // A crash inside an incremental build needs a change small enough to be built in place.
        let small = matches!(&s.fault, Fault::ParticipantFailpoint { point, .. }
            if FAILPOINTS[*point].0 == "participant::mid_incremental_build");
        self.new_version_with(s.churn, small)?;
        let kind = s.fault.kind();
        let first = self.runs.len();
        match &s.fault {
            Fault::None => {
                self.count(kind, true, true);
                self.commit(s, s.coordinator, &[])?;
            }
            Fault::ParticipantFailpoint { point, node } => {
                let (point, node) = (*point, *node);
                self.kill(node);
                self.start(node, Some(FAILPOINTS[point].0));
                // A commit that aborts early (another fault) never reaches the point: one more
                // try, still armed.
                let mut fired = false;
                for _ in 0..2 {
                    self.commit(s, s.coordinator, &[])?;
                    fired = self
                        .c
                        .wait_exit(node, Duration::from_millis(1000))
                        .is_some();
                    if fired {
                        break;
                    }
                }
                if fired {
                    self.running[node - 1] = false;
                } else {
                    self.note(kind, "some never reached the point");
                    self.kill(node);
                }
                self.count(kind, true, fired);
                self.start(node, None);
            }
            Fault::CoordinatorFailpoint { point } => {
                let fp = format!("{}=panic", FAILPOINTS[*point].0);
                let mut fired = false;
                for _ in 0..2 {
                    let p = self.spawn_commit(s.coordinator, &[("FAILPOINTS", &fp)])?;
                    let run = self.finish_commit(p, s.index, false);
                    fired = run.exit.is_none();
                    if fired {
                        if let Some(last) = self.runs.last_mut() {
                            last.killed = true;
                        }
                        break;
                    }
                }
                if !fired {
                    self.note(kind, "some never reached the point");
                }
                self.count(kind, true, fired);
            }
            Fault::KillTxmapd {
                node,
                after_ms,
                down_ms,
            } => {
                let node = *node;
                let p = self.spawn_commit(s.coordinator, &[])?;
                std::thread::sleep(Duration::from_millis(*after_ms));
                let hit = self.running[node - 1];
                self.kill(node);
                std::thread::sleep(Duration::from_millis(*down_ms));
                self.start(node, None);
                self.finish_commit(p, s.index, false);
                self.count(kind, true, hit);
            }
            Fault::KillTxmap { after_ms } => {
                let mut p = self.spawn_commit(s.coordinator, &[])?;
                std::thread::sleep(Duration::from_millis(*after_ms));
                let alive = matches!(p.child.try_wait(), Ok(None));
                if alive {
                    let _ = p.child.kill();
                } else {
                    self.note(kind, "some commits ended before the kill");
                }
                self.finish_commit(p, s.index, alive);
                self.count(kind, true, alive);
            }
            Fault::Freeze {
                node,
                after_ms,
                for_ms,
            } => {
                let node = *node;
                let p = self.spawn_commit(s.coordinator, &[])?;
                std::thread::sleep(Duration::from_millis(*after_ms));
                let hit = self.running[node - 1];
                self.c.signal(node, libc::SIGSTOP);
                std::thread::sleep(Duration::from_millis(*for_ms));
                self.c.signal(node, libc::SIGCONT);
                self.finish_commit(p, s.index, false);
                self.count(kind, true, hit);
            }
            Fault::Partition {
                node,
                heal_after_ms,
            } => {
                self.proxies.partition(*node);
                let p = self.spawn_commit(s.coordinator, &[])?;
                std::thread::sleep(Duration::from_millis(*heal_after_ms));
                self.proxies.heal();
                self.finish_commit(p, s.index, false);
                self.count(kind, true, true);
            }
            Fault::BuilderFails { node } => {
                let node = *node;
                let original = std::fs::read_to_string(self.c.config(node))?;
                let wrapper = format!("\"{}\"", self.failing_postmap.display());
                self.c.edit_config(node, |t| {
                    config_edit::set_key(&t, Some("postfix"), "postmap", &wrapper)
                });
                self.kill(node);
                self.start(node, None);
                let run = self.commit(s, s.coordinator, &[])?;
                let hit = run.lines.iter().any(|l| {
                    l.starts_with(&format!("node{node}:"))
                        && l.contains("chaos: this node's builder")
                });
                if !hit {
                    self.note(kind, "some commits failed before building");
                }
                self.c.edit_config(node, |_| original);
                self.kill(node);
                self.start(node, None);
                self.count(kind, true, hit);
            }
            Fault::DiskFull { node, leave_kb } => {
                if self.tmpfs {
                    self.fill_disk(*node, *leave_kb)?;
                    let run = self.commit(s, s.coordinator, &[])?;
                    self.free_disk(*node);
                    let hit = run.lines.iter().any(|l| {
                        l.starts_with(&format!("node{node}:")) && l.contains("No space left")
                    });
                    if !hit {
                        self.note(kind, "some commits fit in the space left or failed first");
                    }
                    self.count(kind, true, hit);
                } else {
                    self.note(kind, "skipped: needs root for a tmpfs");
                    self.count(kind, true, false);
                    self.commit(s, s.coordinator, &[])?;
                }
            }
            Fault::Concurrent { nodes } => {
                let mut ps = Vec::new();
                for n in nodes {
                    ps.push(self.spawn_commit(*n, &[])?);
                }
                for p in ps {
                    self.finish_commit(p, s.index, false);
                }
                let k = Kind::Concurrent;
                self.count(k, true, true);
                self.note(k, &format!("{} coordinators", nodes.len()));
            }
            Fault::StorageTxmap { point, spec } => {
                let fp = format!("{}={spec}", STORAGE_POINTS[*point].0);
                let run = self.commit(s, s.coordinator, &[("FAILPOINTS", &fp)])?;
                if let Some(last) = self.runs.last_mut() {
                    last.storage_fault = true;
                }
                if !run.injected {
                    self.note(kind, "some never reached the error");
                }
                if run.exit == Some(6) {
                    self.note(kind, "some exited 6");
                }
                self.count(kind, true, run.injected);
            }
            Fault::StorageTxmapd {
                node,
                points,
                commits,
                kill_after_ms,
                hold_ms,
                restart_armed,
            } => {
                let node = *node;
                let env = storage_env(points);
                let mark = self.log_len(node);
                self.kill(node);
                let mut armed = self.start_armed(node, &env);
                if !armed {
                    self.note(kind, "some refused to start armed (crash-only)");
                }
                for k in 0..*commits {
                    if k > 0 {
                        // New content for each commit: the same content again is served at
                        // once ("no work for no change") and would never reach the armed
                        // points.
                        self.new_version_with(s.churn, true)?;
                    }
                    match kill_after_ms {
                        None => {
                            self.commit(s, s.coordinator, &[])?;
                        }
                        Some(ms) => {
                            let mut p = self.spawn_commit(s.coordinator, &[])?;
                            std::thread::sleep(Duration::from_millis(*ms));
                            let alive = matches!(p.child.try_wait(), Ok(None));
                            if alive {
                                let _ = p.child.kill();
                            }
                            self.finish_commit(p, s.index, alive);
                        }
                    }
                }
                std::thread::sleep(Duration::from_millis(*hold_ms));
                if *restart_armed && armed {
                    self.kill(node);
                    armed = self.start_armed(node, &env);
                    if !armed {
                        self.note(kind, "some refused to start armed (crash-only)");
                    }
                    std::thread::sleep(Duration::from_millis(500));
                }
                if armed && self.c.wait_exit(node, Duration::from_millis(1)).is_some() {
                    self.running[node - 1] = false;
                    self.note(kind, "some txmapd stopped on the error (crash-only)");
                }
                let hit = self.log_since(node, mark).contains("injected failure");
                if !hit {
                    self.note(kind, "some never reached the error");
                }
                self.kill(node);
                self.start(node, None);
                self.count(kind, true, hit);
            }
            Fault::InstallFailsOwn {
                spec,
                hold_ms,
                restart_armed,
            } => {
                let own = s.coordinator;
                let env = format!("table::install={spec}");
                let mark = self.log_len(own);
                self.kill(own);
                let armed = self.start_armed(own, &env);
                if !armed {
                    self.stuck.check(false, clean::NAME, self.clock.ms(), || {
                        format!("node{own}: txmapd does not start with {env}")
                    });
                }
                self.commit(s, own, &[])?;
                std::thread::sleep(Duration::from_millis(*hold_ms));
                let st = self.c.status(own);
                if let Some(sm) = &self.sampler {
                    sm.record_status(&st);
                }
                if st.to_string().contains("\"installing\":true") {
                    self.note(kind, "status showed installing");
                }
                if *restart_armed && armed {
                    // Defect 1 of issue 9: a daemon whose install keeps failing must still start
                    // (and serve its other tables).
                    self.kill(own);
                    if !self.start_armed(own, &env) {
                        self.stuck.check(false, clean::NAME, self.clock.ms(), || {
                            format!(
                                "node{own}: txmapd does not start again while an install keeps failing ({env})"
                            )
                        });
                    }
                    std::thread::sleep(Duration::from_millis(300));
                }
                let hit = self
                    .log_since(own, mark)
                    .contains("injected failure (table::install)");
                if !hit {
                    self.note(kind, "some commits never reached the install");
                }
                self.kill(own);
                self.start(own, None);
                self.count(kind, true, hit);
            }
            Fault::LongOutage {
                node,
                start,
                burst,
                cooperative_ms,
            } => {
                let (n, c) = (*node, s.coordinator);
                match start {
                    OutageStart::Kill { after_ms } => {
                        let p = self.spawn_commit(c, &[])?;
                        std::thread::sleep(Duration::from_millis(*after_ms));
                        self.kill(n);
                        self.finish_commit(p, s.index, false);
                    }
                    OutageStart::AfterPrepared => {
                        self.kill(n);
                        self.start(n, Some("participant::after_prepared_durable"));
                        self.commit(s, c, &[])?;
                        if self.c.wait_exit(n, Duration::from_millis(1000)).is_some() {
                            self.running[n - 1] = false;
                            self.outage.1 += 1;
                        }
                        self.kill(n);
                    }
                    OutageStart::AfterDecision { sleep_ms } => {
                        let fp = format!("coordinator::after_decision_durable=sleep({sleep_ms})");
                        let mark = self.log_len(n);
                        let p = self.spawn_commit(c, &[("FAILPOINTS", &fp)])?;
                        // Killed once prepared, before the decision reaches it: wait for its
                        // prepare (the coordinator then sleeps), then kill.
                        let until = Instant::now() + Duration::from_millis(*sleep_ms);
                        while Instant::now() < until
                            && !self.log_since(n, mark).contains("prepared generation")
                        {
                            std::thread::sleep(Duration::from_millis(20));
                        }
                        self.kill(n);
                        let run = self.finish_commit(p, s.index, false);
                        if run.exit == Some(3) {
                            self.outage.2 += 1;
                        }
                    }
                }
                // Out of service on every other node (a restart loads the config).
                let others: Vec<usize> = (1..=self.total).filter(|j| *j != n).collect();
                let mut saved = Vec::new();
                for &j in &others {
                    saved.push((j, std::fs::read_to_string(self.c.config(j))?));
                    self.c.edit_config(j, |t| {
                        config_edit::set_node_key(&t, &format!("node{n}"), "in_service", "false")
                    });
                    self.restart(j);
                }
                // A quiet network while the burst runs (it is about memory, not packets).
                let net = self.save_net();
                self.proxies.set_all(Faults::clean());
                let members: Vec<usize> = (1..=self.opts.nodes).filter(|j| *j != n).collect();
                let mut outcomes = 0u64;
                for k in 0..*burst as usize {
                    if self
                        .opts
                        .stop
                        .as_ref()
                        .is_some_and(|x| x.load(Ordering::SeqCst))
                    {
                        break;
                    }
                    self.new_version((k * 7) % 40)?;
                    let run = self.commit(s, members[k % members.len()], &[])?;
                    if let Some(last) = self.runs.last_mut() {
                        last.members = Some(members.clone());
                    }
                    outcomes += u64::from(matches!(run.exit, Some(0 | 1 | 3)));
                }
                for (j, text) in saved {
                    self.c.edit_config(j, |_| text);
                    self.restart(j);
                }
                self.restore_net(net);
                if let Some(ms) = cooperative_ms {
                    // The returning node's coordinator's node is unreachable: its in-doubt
                    // resolution must use cooperative termination with peers that forgot.
                    self.proxies.partition(c);
                    self.start(n, None);
                    std::thread::sleep(Duration::from_millis(*ms));
                    self.proxies.heal();
                } else {
                    self.start(n, None);
                }
                let hit = outcomes > RECENT as u64;
                if !hit {
                    self.note(kind, "some bursts had too few outcomes");
                }
                self.outage.0 += outcomes;
                let e = self.counts.entry(kind).or_default();
                e.note = format!(
                    "{} commits while out; back prepared: {}, after a missed commit: {}",
                    self.outage.0, self.outage.1, self.outage.2
                );
                self.count(kind, true, hit);
            }
            Fault::Recover {
                hold,
                hold_ms,
                after_ms,
                kill_coordinator,
                from,
                commit,
            } => {
                let fp = format!("{}=sleep({hold_ms})", HOLD_POINTS[*hold]);
                let mut p = self.spawn_commit(s.coordinator, &[("FAILPOINTS", &fp)])?;
                std::thread::sleep(Duration::from_millis(*after_ms));
                let mut killed = false;
                if *kill_coordinator && matches!(p.child.try_wait(), Ok(None)) {
                    let _ = p.child.kill();
                    killed = true;
                }
                let list = self.c.txmap(*from, &["recover", "--json"]);
                let found: serde_json::Value =
                    serde_json::from_slice(&list.stdout).unwrap_or(serde_json::Value::Null);
                let txid = found.as_array().and_then(|a| {
                    a.iter()
                        .filter_map(|d| d.pointer("/prepared/txid").and_then(|t| t.as_str()))
                        .next()
                        .map(str::to_string)
                });
                let hit = txid.is_some();
                match txid {
                    None => self.note(kind, "some found nothing in doubt"),
                    Some(txid) => {
                        let flag = if *commit { "--commit" } else { "--abort" };
                        let at_ms = self.clock.ms();
                        let out = self.c.txmap(*from, &["recover", flag, &txid]);
                        let run = RecoverRun {
                            step: s.index,
                            from: *from,
                            txid,
                            commit: *commit,
                            exit: out.status.code(),
                            at_ms,
                            output: format!(
                                "{}{}",
                                String::from_utf8_lossy(&out.stdout),
                                String::from_utf8_lossy(&out.stderr)
                            ),
                        };
                        if self.opts.verbose {
                            eprintln!("        {}", run.describe());
                        }
                        if run.exit == Some(0) && run.output.contains("not authorized") {
                            self.findings.push(format!(
                                "recover exited 0 (done) although nodes refused it as not authorized: {}",
                                run.describe()
                            ));
                        }
                        self.recovers.push(run);
                    }
                }
                self.finish_commit(p, s.index, killed);
                let done = self.recovers.iter().filter(|r| r.exit == Some(0)).count();
                let refused = self.recovers.iter().filter(|r| r.exit == Some(7)).count();
                let e = self.counts.entry(kind).or_default();
                e.note = format!("{done} done, {refused} refused (exit 7)");
                self.count(kind, true, hit);
            }
            Fault::PowerCut {
                node,
                moment,
                tear,
                seed,
                down_ms,
            } => {
                let node = *node;
                let mut fp = None;
                match *moment {
                    PowerMoment::Deciding { hold, hold_ms, .. } => {
                        fp = Some(format!("{}=sleep({hold_ms})", HOLD_POINTS[hold]));
                    }
                    PowerMoment::Installing { point, hold_ms, .. } => {
                        self.kill(node);
                        let armed = format!("{}=sleep({hold_ms})", INSTALL_POINTS[point]);
                        if !self.start_fp(node, Some(&armed)) {
                            self.start(node, None);
                        }
                    }
                    PowerMoment::Random { .. } | PowerMoment::AfterCommit => {}
                }
                let env: Vec<(&str, &str)> =
                    fp.iter().map(|f| ("FAILPOINTS", f.as_str())).collect();
                let mut pending = Some(self.spawn_commit(s.coordinator, &env)?);
                match *moment {
                    PowerMoment::AfterCommit => {
                        if let Some(p) = pending.take() {
                            self.finish_commit(p, s.index, false);
                        }
                    }
                    PowerMoment::Random { after_ms }
                    | PowerMoment::Deciding { after_ms, .. }
                    | PowerMoment::Installing { after_ms, .. } => {
                        std::thread::sleep(Duration::from_millis(after_ms));
                    }
                }
                let on_coordinator = node == s.coordinator;
                let coordinator_killed = on_coordinator
                    && pending
                        .as_mut()
                        .is_some_and(|p| matches!(p.child.try_wait(), Ok(None)));
                let victim = pending
                    .as_mut()
                    .filter(|_| coordinator_killed)
                    .map(|p| &mut p.child);
                let (hit, at, acked) = self.power_cut(node, *tear, *seed, victim)?;
                // Where the held cuts landed, as the node's durable journal tells.
                let found = self.c.active(node).map(|(_, p)| p);
                let landed = match moment {
                    PowerMoment::Deciding { .. } => Some("deciding"),
                    PowerMoment::Installing { .. } => Some("installing"),
                    _ => None,
                };
                if let Some(m) = landed {
                    let e = self
                        .landed
                        .entry((m, found.unwrap_or_else(|| "no transaction".into())))
                        .or_default();
                    *e += 1;
                }
                std::thread::sleep(Duration::from_millis(*down_ms));
                self.start(node, None);
                self.gates[node - 1].fetch_add(1, Ordering::SeqCst);
                if let Some(p) = pending.take() {
                    self.finish_commit(p, s.index, coordinator_killed);
                }
                self.check_after_power(node, at, acked);
                self.count(kind, true, hit);
            }
            Fault::OutOfService { node } => {
                let oos = self.spawn_commit(*node, &[])?;
                let own = self.spawn_commit(s.coordinator, &[])?;
                let run = self.finish_commit(oos, s.index, false);
                if let Some(last) = self.runs.last_mut() {
                    last.out_of_service = true;
                }
                self.finish_commit(own, s.index, false);
                let refused = !matches!(run.exit, Some(0 | 3));
                if let Some(c) = run.exit {
                    self.note(kind, &format!("exit {c}"));
                }
                self.count(kind, true, refused);
            }
        }
        if s.index % 10 == 9 {
            let st = self.c.status(1);
            if let Some(sm) = &self.sampler {
                sm.record_status(&st);
            }
        }
        if self.opts.verbose {
            let exits: Vec<String> = self.runs[first..]
                .iter()
                .map(|r| match (r.exit, r.killed) {
                    (_, true) => "killed".to_string(),
                    (Some(c), _) => c.to_string(),
                    (None, _) => "signal".to_string(),
                })
                .collect();
            eprintln!(
                "{s} => exit {} in {} ms",
                exits.join(","),
                t0.elapsed().as_millis()
            );
            for r in &self.runs[first..] {
                if r.exit != Some(0) && !r.lines.is_empty() {
                    eprintln!("        {}", r.lines.join(" | "));
                }
            }
        }
        Ok(())
    }

    /// The highest generation a `txmap commit` reported committed (exit 0) before `at_ms`:
    /// every in-service node had made it durable before it was reported.
    fn acknowledged(&self, at_ms: u64) -> u64 {
        self.runs
            .iter()
            .filter(|r| r.exit == Some(0) && !r.killed && r.started_ms + r.elapsed_ms <= at_ms)
            .filter_map(|r| r.generation)
            .max()
            .unwrap_or(0)
    }

    /// Cuts node `node`'s power (its `txmapd`, `coordinator` if given, everything else using its
    /// disks die; the disks forget what was not synced) and checks at once that its durable
    /// journal and history kept every acknowledged commit. The node stays down (its reader paused) until
    /// the caller restarts it and bumps its gate. Returns whether the cut hit anything, when,
    /// and the acknowledged generation then.
    fn power_cut(
        &mut self,
        node: usize,
        tear: bool,
        seed: u64,
        coordinator: Option<&mut Child>,
    ) -> Result<(bool, u64, u64)> {
        let at = self.clock.ms();
        let acked = self.acknowledged(at);
        self.gates[node - 1].fetch_add(1, Ordering::SeqCst);
        if let Some(sm) = &self.sampler {
            sm.pause(node, true); // the mount is frozen, then briefly absent
        }
        let was_running = self.running[node - 1];
        let r = {
            let Runner { power, c, .. } = self;
            power[node - 1].cut_power(seed, tear, || {
                c.kill_node(node);
                if let Some(p) = coordinator {
                    let _ = p.kill();
                }
            })?
        };
        self.running[node - 1] = false;
        if let Some(sm) = &self.sampler {
            sm.power_cut(node, at, Duration::from_secs(2));
            sm.pause(node, false);
        }
        let g = self.c.journal_generation(node);
        self.power_tally.check(g >= acked, POWER, at, || {
            format!(
                "node{node} lost an acknowledged commit: generation {acked} was reported committed before the power cut at {:.1} s, its durable journal came back at generation {g}",
                at as f64 / 1000.0
            )
        });
        if acked > 0 {
            // History is finalized (renamed, its directory fsynced) before `Committed` is
            // answered, and this profile keeps every generation.
            let kept = txmap_common::history::History::new(&self.c.state_dir(node), TABLE)
                .source(acked)
                .is_some();
            self.power_tally.check(kept, POWER, at, || {
                format!(
                    "node{node} lost the history of acknowledged generation {acked} in the power cut at {:.1} s",
                    at as f64 / 1000.0
                )
            });
        }
        let hit = was_running || r.files_reverted + r.dirs_reverted + r.inodes_lost > 0;
        let st = &mut self.cut_stats;
        st.0.files_reverted += r.files_reverted;
        st.0.dirs_reverted += r.dirs_reverted;
        st.0.torn += r.torn;
        st.0.inodes_lost += r.inodes_lost;
        st.1 += u64::from(hit);
        Ok((hit, at, acked))
    }

    /// Once node `node` is back from a cut at `at`: its live table is whole and is the
    /// generation its journal records, at or above `acked` (retried up to 8 s: a commit
    /// redriven or retried at restart may be installing meanwhile).
    fn check_after_power(&mut self, node: usize, at: u64, acked: u64) {
        let until = Instant::now() + Duration::from_secs(8);
        let last = loop {
            let r = served(&self.c, node).and_then(|s| {
                if s.generation >= acked {
                    Ok(s)
                } else {
                    Err(format!(
                        "node{node} serves generation {} below the acknowledged {acked}",
                        s.generation
                    ))
                }
            });
            if r.is_ok() || Instant::now() > until {
                break r;
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        self.power_tally.check(last.is_ok(), POWER, at, || {
            format!(
                "after the power cut of node{node} at {:.1} s: {}",
                at as f64 / 1000.0,
                last.err().unwrap_or_default()
            )
        });
    }

    fn finish(mut self, schedule: Schedule, started: Instant) -> Result<Report> {
        // The faults stop.
        self.proxies.set_all(Faults::clean());
        for i in 1..=self.total {
            self.c.signal(i, libc::SIGCONT);
            self.free_disk(i);
        }
        self.check_daemons();
        self.ensure_running();
        let n = self.opts.nodes;
        let nodes = in_service(&self.c, n);
        // Changes made through different nodes are different sources, committed in turn (the
        // last commit wins; no clock decides, docs/protocol.md "Which change wins"): as an
        // operator would, the newest source is committed once through every in-service node,
        // a later change of each node's own source, which supersedes what it still has pending.
        for i in &nodes {
            let clock = clock_env(self.opts.seed, *i);
            let env: Vec<(&str, &str)> = clock.iter().map(|(k, v)| (*k, v.as_str())).collect();
            let _ = self
                .c
                .txmap_with(*i, &["commit", crate::cluster::TABLE], &env);
        }
        let target = self.versions.last().context("no version was written")?;
        let sampler = self.sampler.take().context("sampler")?;
        let (conv, took, status) = convergence::wait_and_check(
            &self.c,
            &nodes,
            &target,
            &self.content,
            &self.stable,
            &self.versions,
            self.opts.profile.convergence_bound,
            self.clock,
            &sampler,
        );
        let mut cleanup = clean::check(&self.c, &nodes, &status, self.clock);
        let mut findings = std::mem::take(&mut self.findings);
        findings.extend((1..=n).flat_map(|i| clean::history_leftovers(&self.c, i)));
        cleanup.merge(std::mem::take(&mut self.stuck));
        let seen = self.readers_result();
        findings.append(&mut self.findings);
        // Out-of-service nodes are not judged by `clean`, but what they leave behind is worth a
        // look (a decision they keep re-sending, a pending change they keep retrying).
        for i in n + 1..=self.total {
            let state = self.c.node_dir(i).join("state");
            for sub in ["decisions", "pending"] {
                let left: Vec<String> = std::fs::read_dir(state.join(sub))
                    .into_iter()
                    .flatten()
                    .flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|f| f.ends_with(".json"))
                    .collect();
                if !left.is_empty() {
                    findings.push(format!(
                        "out-of-service node{i} still holds {sub}/ {}",
                        left.join(", ")
                    ));
                }
            }
        }
        let log = sampler.stop();
        let end = self.clock.ms();
        if self.opts.profile.power {
            for &i in &nodes {
                let r = served(&self.c, i);
                self.power_tally.check(r.is_ok(), POWER, end, || {
                    format!("at the end: {}", r.err().unwrap_or_default())
                });
            }
            let lost: u64 = log.nodes.iter().map(|n| n.decisions_lost_to_cuts).sum();
            let (st, cuts) = self.cut_stats.clone();
            let landed: Vec<String> = self
                .landed
                .iter()
                .map(|((m, p), n)| format!("{m} cuts finding {p}: {n}"))
                .collect();
            if !landed.is_empty() {
                self.note(Kind::PowerCut, &landed.join(", "));
            }
            self.note(
                Kind::PowerCut,
                &format!(
                    "{cuts} hit; reverted {} files ({} torn), {} directories, {} inodes lost; {lost} decision records seen shortly before a cut and gone after it (never synced, or finished) not counted",
                    st.files_reverted, st.torn, st.dirs_reverted, st.inodes_lost
                ),
            );
        }
        let mut invariants = vec![
            (visibility::NAME, seen.tally.clone()),
            (convergence::NAME, conv),
            (clean::NAME, cleanup),
            (monotonic::NAME, monotonic::check(&log, end)),
            (
                aborted::NAME,
                aborted::check(&self.runs, &log, &seen, &self.versions, end),
            ),
            (
                outcomes::NAME,
                outcomes::check(&self.runs, &log, &nodes, self.limit, end),
            ),
            (operator::NAME, operator::check(&self.recovers, &log, end)),
        ];
        if self.opts.profile.power {
            invariants.push((POWER, std::mem::take(&mut self.power_tally)));
        }
        let mut recover_exits: BTreeMap<String, u64> = BTreeMap::new();
        for r in &self.recovers {
            let k = match r.exit {
                Some(c) => format!("exit {c}"),
                None => "signal".to_string(),
            };
            *recover_exits.entry(k).or_default() += 1;
        }
        let mut exits: BTreeMap<String, u64> = BTreeMap::new();
        for r in &self.runs {
            let k = match (r.killed, r.exit) {
                (true, _) => "killed".to_string(),
                (false, Some(c)) => format!("exit {c}"),
                (false, None) => "signal".to_string(),
            };
            *exits.entry(k).or_default() += 1;
        }
        let mut committed = std::collections::BTreeSet::new();
        let mut aborted_set = std::collections::BTreeSet::new();
        for nl in &log.nodes {
            for (t, o) in &nl.outcomes {
                if o.committed.is_some() {
                    committed.insert(t.clone());
                } else if o.aborted.is_some() {
                    aborted_set.insert(t.clone());
                }
            }
        }
        let final_generation = log
            .nodes
            .iter()
            .filter_map(|n| n.journal.last().map(|l| l.generation))
            .max()
            .unwrap_or(0);
        let faults = self.fault_rows(&schedule);
        let with_delta = self.runs.iter().filter(|r| r.delta_nodes > 0).count() as u64;
        let prepared = self
            .runs
            .iter()
            .filter(|r| r.txid.is_some() && r.generation.is_some())
            .count() as u64;
        Ok(Report {
            delta_commits: (with_delta, prepared.saturating_sub(with_delta)),
            broken: self.opts.broken,
            faults,
            invariants,
            exits,
            recover_exits,
            node_counts: (self.opts.nodes, self.total - self.opts.nodes),
            transactions_seen: (committed.len() as u64, aborted_set.len() as u64),
            final_generation,
            elapsed: started.elapsed(),
            convergence: took,
            reader_rounds: (seen.rounds, seen.slowest_ms),
            longest_in_doubt: log.longest_in_doubt(),
            proxy: self.proxies.stats(),
            dir: self.c.root(),
            findings,
            schedule,
        })
    }

    fn readers_result(&mut self) -> visibility::VisibilityResult {
        let (seen, stalls) = self
            .readers
            .take()
            .map(Readers::stop_with_stalls)
            .unwrap_or_default();
        if !stalls.windows.is_empty() {
            let longest = stalls.windows.iter().map(|w| w.1).max().unwrap_or(0);
            let list: Vec<String> = stalls
                .windows
                .iter()
                .take(5)
                .map(|(a, l)| format!("{:.1} s for {l} ms", *a as f64 / 1000.0))
                .collect();
            self.findings.push(format!(
                "the whole machine stalled {} times (longest {longest} ms: {}); {} slow lookups excused",
                stalls.windows.len(),
                list.join(", "),
                stalls.excused
            ));
        }
        seen
    }

    fn fault_rows(&self, schedule: &Schedule) -> Vec<FaultRow> {
        let mut rows = Vec::new();
        for k in Kind::all() {
            let c = self.counts.get(&k).cloned().unwrap_or_default();
            rows.push(FaultRow {
                label: k.label(),
                planned: c.planned,
                injected: c.injected,
                note: c.note,
            });
        }
        let changes: Vec<&schedule::NetChange> = schedule
            .steps
            .iter()
            .filter_map(|s| s.net.as_ref())
            .collect();
        let periods =
            |f: &dyn Fn(&Faults) -> bool| changes.iter().filter(|c| f(&c.faults)).count() as u64;
        let st = self.proxies.stats();
        rows.push(FaultRow {
            label: "net: datagram loss".into(),
            planned: periods(&|f| f.drop_pct > 0.0),
            injected: st.dropped,
            note: "planned: periods; injected: datagrams dropped".into(),
        });
        rows.push(FaultRow {
            label: "net: delay + jitter".into(),
            planned: periods(&|f| f.delay_ms > 0 || f.jitter_ms > 0),
            injected: st.delayed,
            note: "datagrams delayed".into(),
        });
        rows.push(FaultRow {
            label: "net: duplication".into(),
            planned: periods(&|f| f.dup_pct > 0.0),
            injected: st.duplicated,
            note: "datagrams duplicated".into(),
        });
        rows.push(FaultRow {
            label: "net: reordering".into(),
            planned: periods(&|f| f.reorder_pct > 0.0),
            injected: st.reordered,
            note: "datagrams held back to be overtaken".into(),
        });
        rows.push(FaultRow {
            label: "net: partition".into(),
            planned: self
                .counts
                .get(&Kind::Partition)
                .map(|c| c.planned)
                .unwrap_or(0),
            injected: st.partitioned,
            note: "datagrams cut off".into(),
        });
        rows
    }
}

/// The in-service node numbers, per node1's config (every node unless marked otherwise).
fn in_service(c: &TestCluster, n: usize) -> Vec<usize> {
    match txmap_common::config::Config::load(&c.config(1)) {
        Ok(cfg) => (1..=n)
            .filter(|i| {
                cfg.nodes
                    .iter()
                    .find(|x| x.name == format!("node{i}"))
                    .is_none_or(|x| x.in_service)
            })
            .collect(),
        Err(_) => (1..=n).collect(),
    }
}
