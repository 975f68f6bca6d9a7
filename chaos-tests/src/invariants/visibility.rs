//! Atomic visibility (guarantee 1): a reader on every node, looping Debian's real
//! `postmap -q - hash:<live table>` the way a Postfix daemon looks up a list, must never miss
//! a stable key, never get an error, never block, and always find exactly one version marker
//! (a partial, empty or mixed table has none or several).
//!
//! Besides judging, the readers record which version each node's live `.db` served and when:
//! [`super::aborted`] checks that every served version was committed somewhere.
//!
//! **Machine stalls.** A heartbeat thread in the runner ticks every 50 ms; a tick that comes
//! more than 200 ms late means the whole machine (or VM) stood still, every process alike. A slow
//! lookup is judged on its time *outside* such stalls: txmap can block a `postmap -q` (a lock),
//! never the runner's own sleeping thread. Stalls are reported, and the lookups they excused.

use super::{Clock, Tally, Versions};
use crate::cluster::postmap_query;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Invariant name.
pub const NAME: &str = "atomic visibility";

/// A lookup slower than this counts as blocked (txmap must never make a reader wait).
pub const BLOCKED_AFTER: Duration = Duration::from_secs(3);

/// Heartbeat ticks (every 50 ms) further apart than this mark a machine stall: the runner's own
/// sleeping thread was not scheduled for that long, which no lock of txmap can cause.
const STALL_AFTER: Duration = Duration::from_millis(250);

/// A lookup slower than [`BLOCKED_AFTER`], judged when the readers stop.
#[derive(Debug, Clone, Copy)]
struct Slow {
    node: usize,
    started: Instant,
    took: Duration,
    at_ms: u64,
}

/// When and how often one node served one version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Served {
    /// First lookup that saw it (ms since the start).
    pub first_ms: u64,
    /// Last lookup that saw it.
    pub last_ms: u64,
    /// Lookups that saw it.
    pub rounds: u64,
}

/// What the readers found.
#[derive(Debug, Clone, Default)]
pub struct VisibilityResult {
    /// Checks: one per key looked up; violations of [`NAME`].
    pub tally: Tally,
    /// Per node (index 0 = node1): version id → when it was served.
    pub served: Vec<BTreeMap<u64, Served>>,
    /// `postmap -q` runs.
    pub rounds: u64,
    /// Slowest single `postmap -q` run, in ms.
    pub slowest_ms: u64,
}

/// Machine stalls the heartbeat saw while the readers ran.
#[derive(Debug, Clone, Default)]
pub struct Stalls {
    /// (start, ms since the run started; length, ms).
    pub windows: Vec<(u64, u64)>,
    /// Slow lookups excused because a machine stall made them slow.
    pub excused: u64,
}

/// One reader thread per node.
#[derive(Debug)]
pub struct Readers {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<ReaderOutcome>>,
    heartbeat: Option<JoinHandle<Vec<(Instant, Instant)>>>,
    clock: Clock,
}

/// What one reader thread found: checks, served versions, rounds, slowest lookup (ms), slow
/// lookups to judge.
type ReaderOutcome = (Tally, BTreeMap<u64, Served>, u64, u64, Vec<Slow>);

/// What one reader reads: node number, `postmap -c` directory, live table path.
#[derive(Debug, Clone)]
pub struct ReaderTarget {
    /// Node number (1-based).
    pub node: usize,
    /// Postfix config directory of the node (holds `main.cf`).
    pub confdir: PathBuf,
    /// The live table source path (`hash:` of it is the `.db`).
    pub live: PathBuf,
    /// The node's power: odd while it is cut (the runner adds 1 when the power goes and 1
    /// when the node is back). A lookup that overlaps a cut is not judged: the node's own
    /// Postfix would be dead too.
    pub power: Option<Arc<AtomicU64>>,
}

impl Readers {
    /// Starts one reader per target. Each loops until [`Readers::stop`], sleeping `pause`
    /// between lookups so that the system under test keeps some CPU.
    pub fn start(
        targets: Vec<ReaderTarget>,
        stable: Vec<String>,
        versions: Arc<Versions>,
        clock: Clock,
        pause: Duration,
    ) -> Readers {
        let stop = Arc::new(AtomicBool::new(false));
        let threads = targets
            .into_iter()
            .map(|t| {
                let (stop, stable, versions) = (stop.clone(), stable.clone(), versions.clone());
                std::thread::Builder::new()
                    .name(format!("reader-node{}", t.node))
                    .spawn(move || read_loop(t, stable, versions, clock, pause, stop))
                    .expect("spawn a reader thread")
            })
            .collect();
        let heartbeat = {
            let stop = stop.clone();
            std::thread::Builder::new()
                .name("stall-heartbeat".into())
                .spawn(move || {
                    let mut stalls = Vec::new();
                    let mut last = Instant::now();
                    while !stop.load(Ordering::SeqCst) {
                        std::thread::sleep(Duration::from_millis(50));
                        let now = Instant::now();
                        if now - last > STALL_AFTER {
                            stalls.push((last, now));
                        }
                        last = now;
                    }
                    stalls
                })
                .ok()
        };
        Readers {
            stop,
            threads,
            heartbeat,
            clock,
        }
    }

    /// Stops the readers and returns what they saw.
    pub fn stop(self) -> VisibilityResult {
        self.stop_with_stalls().0
    }

    /// Stops the readers and returns what they saw, and the machine stalls.
    pub fn stop_with_stalls(self) -> (VisibilityResult, Stalls) {
        self.stop.store(true, Ordering::SeqCst);
        let mut out = VisibilityResult::default();
        let mut slow = Vec::new();
        for t in self.threads {
            let (tally, served, rounds, slowest, s) = t.join().unwrap_or_default();
            out.tally.merge(tally);
            out.served.push(served);
            out.rounds += rounds;
            out.slowest_ms = out.slowest_ms.max(slowest);
            slow.extend(s);
        }
        let stalls = self
            .heartbeat
            .and_then(|h| h.join().ok())
            .unwrap_or_default();
        let since = |t: Instant| t.saturating_duration_since(self.clock.0).as_millis() as u64;
        let mut st = Stalls {
            windows: stalls
                .iter()
                .map(|(a, b)| (since(*a), (*b - *a).as_millis() as u64))
                .collect(),
            excused: 0,
        };
        for l in slow {
            let end = l.started + l.took;
            let stalled: Duration = stalls
                .iter()
                .map(|(a, b)| {
                    let (lo, hi) = ((*a).max(l.started), (*b).min(end));
                    hi.saturating_duration_since(lo)
                })
                .sum();
            let own = l.took.saturating_sub(stalled);
            if own < BLOCKED_AFTER {
                st.excused += 1;
            }
            let node = l.node;
            out.tally.check(own < BLOCKED_AFTER, NAME, l.at_ms, || {
                format!(
                    "node{node}: a postmap -q lookup took {:?} (blocked; {:?} of it outside machine stalls)",
                    l.took, own
                )
            });
        }
        (out, st)
    }
}

fn read_loop(
    t: ReaderTarget,
    stable: Vec<String>,
    versions: Arc<Versions>,
    clock: Clock,
    pause: Duration,
    stop: Arc<AtomicBool>,
) -> ReaderOutcome {
    let mut tally = Tally::default();
    let mut served: BTreeMap<u64, Served> = BTreeMap::new();
    let (mut rounds, mut slowest) = (0u64, 0u64);
    let mut slow = Vec::new();
    let node = t.node;
    while !stop.load(Ordering::SeqCst) {
        let markers = versions.markers();
        let mut keys = stable.clone();
        keys.extend(markers.iter().cloned());
        let power = || t.power.as_ref().map(|p| p.load(Ordering::SeqCst));
        let before = power();
        if before.is_some_and(|p| p % 2 == 1) {
            std::thread::sleep(pause);
            continue;
        }
        let started = Instant::now();
        let r = postmap_query(&t.confdir, &t.live, &keys);
        let took = started.elapsed();
        if power() != before {
            continue; // the node lost power meanwhile
        }
        let at = clock.ms();
        rounds += 1;
        slowest = slowest.max(took.as_millis() as u64);
        if took < BLOCKED_AFTER {
            tally.check(true, NAME, at, String::new);
        } else {
            // Judged at the end, against the machine stalls the heartbeat saw.
            slow.push(Slow {
                node,
                started,
                took,
                at_ms: at,
            });
        }
        match r {
            Err(e) => tally.check(false, NAME, at, || {
                format!("node{node}: postmap -q failed: {e:#}")
            }),
            Ok(values) => {
                let missing: Vec<&String> = stable
                    .iter()
                    .zip(&values)
                    .filter(|(_, v)| v.is_none())
                    .map(|(k, _)| k)
                    .collect();
                tally.checks += stable.len() as u64 - 1;
                tally.check(missing.is_empty(), NAME, at, || {
                    format!(
                        "node{node}: {} of {} stable keys missing, e.g. {:?}",
                        missing.len(),
                        stable.len(),
                        &missing[..missing.len().min(3)]
                    )
                });
                let found: Vec<u64> = markers
                    .iter()
                    .zip(&values[stable.len()..])
                    .filter(|(_, v)| v.is_some())
                    .filter_map(|(k, _)| versions.by_marker(k))
                    .collect();
                if found.is_empty() && versions.markers().len() != markers.len() {
                    // A version registered after this lookup's key list was taken: look again
                    // with the new list rather than blame the table.
                    continue;
                }
                tally.check(found.len() == 1, NAME, at, || {
                    format!(
                        "node{node}: the live table holds {} version markers {found:?} (expected exactly one: a partial, empty or mixed table)",
                        found.len()
                    )
                });
                for id in found {
                    let e = served.entry(id).or_insert(Served {
                        first_ms: at,
                        last_ms: at,
                        rounds: 0,
                    });
                    e.last_ms = at;
                    e.rounds += 1;
                }
            }
        }
        std::thread::sleep(pause);
    }
    (tally, served, rounds, slowest, slow)
}
