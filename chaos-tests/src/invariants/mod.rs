//! Invariant checkers of the chaos runner, one module per guarantee.
//!
//! | module | guarantee (`../shared/DESIGN.md`) | how |
//! |---|---|---|
//! | [`visibility`] | 1 atomic per node | a reader per node loops real `postmap -q` over stable keys and every version's marker |
//! | [`convergence`] | 2, 5, 6 agreement, no lost update | after the faults stop, with no command run, every in-service node serves the newest source |
//! | [`clean`] | 5 no stuck state | no staged file, no held lock, no prepared transaction, no pending or undelivered decision |
//! | [`monotonic`] | 4 ordered | per-node generations sampled from journals and `status` never go down; one transaction and one content per generation |
//! | [`aborted`] | 2, 9 all or nothing, one outcome | an aborted transaction is committed nowhere; no transaction is committed (or installing, or decided commit) on one node and aborted (or decided abort) on another, per every node's journal, history and decision log; every content a node served was committed |
//! | [`outcomes`] | 3, Sympa's 20 s | every `txmap commit` ends in time with a documented exit code; an acknowledged commit is committed on every node; an out-of-service node's commit fails |
//! | [`operator`] | 9 one outcome | an operator's `txmap recover --abort/--commit` is refused (exit 7) whenever it would contradict a decision |
//!
//! The checkers never trust what the system says about itself alone: the readers look at the
//! live `.db` with Debian's `postmap`, and the journals are cross-checked against each other,
//! against the coordinators' reports and against what the readers saw. The exact rules are in
//! `docs/chaos.md`.
//!
//! Shared inputs: [`Versions`] (every source content the runner wrote, with its unique marker
//! key), [`journal::JournalLog`] (what each node's journal said over time, gathered by
//! [`journal::Sampler`]) and [`outcomes::CommitRun`] (every coordinator the runner started).

pub mod aborted;
pub mod clean;
pub mod convergence;
pub mod journal;
pub mod monotonic;
pub mod operator;
pub mod outcomes;
pub mod visibility;

use std::sync::{Arc, RwLock};
use std::time::Instant;

/// One broken rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// Invariant name (one of the `NAME` constants of the modules).
    pub invariant: &'static str,
    /// Milliseconds since the run started.
    pub at_ms: u64,
    /// What was seen.
    pub detail: String,
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "[{}] at {:.1} s: {}",
            self.invariant,
            self.at_ms as f64 / 1000.0,
            self.detail
        )
    }
}

/// Checks made and violations found by one checker.
#[derive(Debug, Clone, Default)]
pub struct Tally {
    /// Individual checks made (lookups, samples, transactions judged...).
    pub checks: u64,
    /// What broke.
    pub violations: Vec<Violation>,
}

impl Tally {
    /// Counts one check; records a violation when `ok` is false.
    pub fn check(
        &mut self,
        ok: bool,
        invariant: &'static str,
        at_ms: u64,
        detail: impl FnOnce() -> String,
    ) {
        self.checks += 1;
        if !ok {
            self.violations.push(Violation {
                invariant,
                at_ms,
                detail: detail(),
            });
        }
    }

    /// Adds another tally.
    pub fn merge(&mut self, o: Tally) {
        self.checks += o.checks;
        self.violations.extend(o.violations);
    }
}

/// The run's clock: milliseconds since it started.
#[derive(Debug, Clone, Copy)]
pub struct Clock(pub Instant);

impl Clock {
    /// Starts now.
    pub fn start() -> Clock {
        Clock(Instant::now())
    }
    /// Milliseconds since the start.
    pub fn ms(&self) -> u64 {
        self.0.elapsed().as_millis() as u64
    }
}

/// One source content written by the runner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Version {
    /// 0, 1, 2... in writing order.
    pub id: u64,
    /// sha256 of the bytes, lowercase hex (as journals and `status` show it).
    pub sha256: String,
    /// The key only this content holds.
    pub marker: String,
    /// When it was written (ms since the start).
    pub written_ms: u64,
}

/// Every source content written so far; shared with the readers.
#[derive(Debug, Default)]
pub struct Versions {
    list: RwLock<Vec<Version>>,
}

/// Domain of the stable keys: present in every content the runner writes.
pub const STABLE_DOMAIN: &str = "stable.chaos.example";
/// Domain of the marker keys: `v<id>@marker.chaos.example`, one per content.
pub const MARKER_DOMAIN: &str = "marker.chaos.example";

impl Versions {
    /// A new, shared, empty registry.
    pub fn shared() -> Arc<Versions> {
        Arc::new(Versions::default())
    }

    /// The marker key of version `id`.
    pub fn marker(id: u64) -> String {
        format!("v{id}@{MARKER_DOMAIN}")
    }

    /// The stable keys (`stable` of them).
    pub fn stable_keys(stable: usize) -> Vec<String> {
        (0..stable)
            .map(|i| format!("list{i}@{STABLE_DOMAIN}"))
            .collect()
    }

    /// The source text of version `id`: the stable keys, its marker, and `churn` lines (lists
    /// that come and go: versions with the same churn differ only by their marker).
    pub fn content(id: u64, stable: usize, churn: usize) -> String {
        let mut s = format!("# sympa_transport written by the chaos runner, version {id}\n");
        for k in Versions::stable_keys(stable) {
            s.push_str(&format!("{k}\tsympa:{k}\n"));
        }
        s.push_str(&format!("{}\tsmtp:[version-{id}]\n", Versions::marker(id)));
        for j in 0..churn {
            s.push_str(&format!("c{j}@churn.chaos.example\tsympa:c{j}\n"));
        }
        s
    }

    /// Registers a version (before it is written, so readers already look for its marker).
    pub fn add(&self, v: Version) {
        if let Ok(mut l) = self.list.write() {
            l.push(v);
        }
    }

    /// Every version so far.
    pub fn all(&self) -> Vec<Version> {
        self.list.read().map(|l| l.clone()).unwrap_or_default()
    }

    /// Every marker key so far, in version order.
    pub fn markers(&self) -> Vec<String> {
        self.list
            .read()
            .map(|l| l.iter().map(|v| v.marker.clone()).collect())
            .unwrap_or_default()
    }

    /// The version whose marker is `key`.
    pub fn by_marker(&self, key: &str) -> Option<u64> {
        let id = key
            .strip_prefix('v')?
            .strip_suffix(&format!("@{MARKER_DOMAIN}"))?;
        id.parse().ok()
    }

    /// The version with this sha256 (hex).
    pub fn by_sha(&self, sha: &str) -> Option<u64> {
        self.list
            .read()
            .ok()?
            .iter()
            .find(|v| v.sha256 == sha)
            .map(|v| v.id)
    }

    /// The newest version.
    pub fn last(&self) -> Option<Version> {
        self.list.read().ok()?.last().cloned()
    }
}
