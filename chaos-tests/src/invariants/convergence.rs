//! Agreement and no lost update (guarantees 2, 5, 6): after the faults stop, with no command
//! run by anyone, within a bound every in-service node is reachable, on one generation, and
//! serves the newest source: its journal and `status` show that source's sha256, its live
//! source file holds exactly those bytes, and its live `.db` (read with `postmap -q`) holds
//! every stable key and that version's marker and no other.

use super::clean;
use super::journal::Sampler;
use super::{Clock, Tally, Version, Versions};
use crate::cluster::TestCluster;
use std::time::{Duration, Instant};

/// Invariant name.
pub const NAME: &str = "agreement, no lost update";

/// Why node set `nodes` has not converged on `target` yet (empty: converged and clean).
fn not_yet(
    c: &TestCluster,
    nodes: &[usize],
    target: &Version,
    status: &serde_json::Value,
) -> Vec<String> {
    let mut why = Vec::new();
    let mut gens = Vec::new();
    for &i in nodes {
        match clean::table_status(status, i) {
            None => why.push(format!("node{i}: unreachable")),
            Some(t) => {
                let g = t.get("generation").and_then(|g| g.as_u64()).unwrap_or(0);
                let sha = t.get("sha256").and_then(|s| s.as_str()).unwrap_or("");
                gens.push(g);
                if sha != target.sha256 {
                    why.push(format!(
                        "node{i}: generation {g} serves sha256 {}, not the newest source (version {})",
                        &sha[..sha.len().min(12)],
                        target.id
                    ));
                }
            }
        }
        why.extend(clean::leftovers(c, i, status));
    }
    gens.dedup();
    if gens.len() > 1 {
        why.push(format!("nodes on different generations: {gens:?}"));
    }
    why
}

/// Waits up to `bound` for convergence on `target` (the newest source, whose bytes are
/// `content`), then checks every node in detail. Returns the checks, the time it took (None:
/// never converged) and the last status.
#[allow(clippy::too_many_arguments)]
pub fn wait_and_check(
    c: &TestCluster,
    nodes: &[usize],
    target: &Version,
    content: &str,
    stable: &[String],
    versions: &Versions,
    bound: Duration,
    clock: Clock,
    sampler: &Sampler,
) -> (Tally, Option<Duration>, serde_json::Value) {
    let mut t = Tally::default();
    let started = Instant::now();
    let mut status;
    let took = loop {
        status = c.status(1);
        sampler.record_status(&status);
        let why = not_yet(c, nodes, target, &status);
        if why.is_empty() {
            break Some(started.elapsed());
        }
        if started.elapsed() > bound {
            t.check(false, NAME, clock.ms(), || {
                format!(
                    "no convergence on the newest source (version {}) within {} s of the faults stopping: {}",
                    target.id,
                    bound.as_secs(),
                    why.join("; ")
                )
            });
            break None;
        }
        std::thread::sleep(Duration::from_millis(300));
    };
    let mut first_gen = None;
    let markers = versions.markers();
    for &i in nodes {
        let at = clock.ms();
        let ts = clean::table_status(&status, i);
        let g = ts
            .and_then(|t| t.get("generation"))
            .and_then(|g| g.as_u64());
        let sha = ts
            .and_then(|t| t.get("sha256"))
            .and_then(|s| s.as_str())
            .unwrap_or("");
        if first_gen.is_none() {
            first_gen = g;
        }
        t.check(g.is_some() && g == first_gen, NAME, at, || {
            format!(
                "node{i}: generation {g:?}, node{} has {first_gen:?}",
                nodes[0]
            )
        });
        t.check(sha == target.sha256, NAME, at, || {
            format!(
                "node{i}: status sha256 {sha:?} is not the newest source's {}",
                target.sha256
            )
        });
        let journal_gen = txmap_common::journal::Journal::open(&c.node_dir(i).join("state"))
            .ok()
            .and_then(|j| j.load(crate::cluster::TABLE).ok())
            .map(|s| s.generation);
        t.check(journal_gen == g, NAME, at, || {
            format!("node{i}: journal generation {journal_gen:?}, status says {g:?}")
        });
        let live = std::fs::read_to_string(c.live(i)).unwrap_or_default();
        t.check(live == content, NAME, at, || {
            format!(
                "node{i}: the live source file is not the newest source ({} bytes, expected {})",
                live.len(),
                content.len()
            )
        });
        let mut keys = stable.to_vec();
        keys.extend(markers.iter().cloned());
        match c.lookup(i, &keys) {
            Err(e) => t.check(false, NAME, at, || {
                format!("node{i}: postmap -q failed: {e:#}")
            }),
            Ok(v) => {
                let missing = v[..stable.len()].iter().filter(|x| x.is_none()).count();
                let found: Vec<u64> = markers
                    .iter()
                    .zip(&v[stable.len()..])
                    .filter(|(_, x)| x.is_some())
                    .filter_map(|(k, _)| versions.by_marker(k))
                    .collect();
                t.check(missing == 0 && found == vec![target.id], NAME, at, || {
                    format!(
                        "node{i}: the live .db serves versions {found:?} with {missing} stable keys missing; expected version {} only",
                        target.id
                    )
                });
            }
        }
    }
    (t, took, status)
}
