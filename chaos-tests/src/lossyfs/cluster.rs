//! A [`TestCluster`] whose nodes keep their table directory and state directory on lossy
//! filesystems, with a power cut per node.

use super::{CutReport, PowerNode};
use crate::cluster::TestCluster;
use anyhow::Result;
use std::path::PathBuf;

/// A sandbox cluster on lossy disks. Dereferences to the [`TestCluster`].
#[derive(Debug)]
pub struct PowerCluster {
    /// Per node (index `i - 1`), its mounts. Declared first: dropped (unmounted) before the
    /// sandbox directory is removed.
    pub disks: Vec<PowerNode>,
    /// The cluster.
    pub cluster: TestCluster,
}

impl std::ops::Deref for PowerCluster {
    type Target = TestCluster;
    fn deref(&self) -> &TestCluster {
        &self.cluster
    }
}

impl std::ops::DerefMut for PowerCluster {
    fn deref_mut(&mut self) -> &mut TestCluster {
        &mut self.cluster
    }
}

/// The directories of node `i` that live on its lossy disks: the table directory and the
/// state directory.
pub fn node_disks(c: &TestCluster, i: usize) -> Vec<PathBuf> {
    vec![c.table_dir(i), c.state_dir(i)]
}

impl PowerCluster {
    /// Mounts lossy disks under every node of an existing (not started) cluster.
    pub fn mount(cluster: TestCluster) -> Result<PowerCluster> {
        let mut c = PowerCluster {
            disks: Vec::new(),
            cluster,
        };
        for i in 1..=c.cluster.n {
            let dirs = node_disks(&c.cluster, i);
            for d in &dirs {
                std::fs::create_dir_all(d)?;
            }
            c.disks.push(PowerNode::over(&dirs)?);
        }
        Ok(c)
    }

    /// A sandbox of `n` nodes on lossy disks, every daemon started.
    pub fn start(name: &str, n: usize) -> Result<PowerCluster> {
        let mut c = PowerCluster::mount(TestCluster::create(name, n)?)?;
        for i in 1..=n {
            c.cluster.start_node(i)?;
        }
        Ok(c)
    }

    /// Cuts node `i`'s power: its daemon, the `extra` processes (e.g. a `txmap commit` run
    /// with its config) and everything else using its disks die, and the disks forget what was
    /// not synced. The node stays down: see [`PowerCluster::restart`].
    pub fn cut_power(
        &mut self,
        i: usize,
        seed: u64,
        tear: bool,
        extra: &mut [std::process::Child],
    ) -> Result<CutReport> {
        let PowerCluster { disks, cluster } = self;
        disks[i - 1].cut_power(seed, tear, || {
            cluster.kill_node(i);
            for c in extra.iter_mut() {
                let _ = c.kill();
                let _ = c.wait();
            }
        })
    }

    /// Starts node `i`'s daemon again after a cut.
    pub fn restart(&mut self, i: usize) -> Result<()> {
        self.cluster.start_node(i)
    }
}

impl Drop for PowerCluster {
    fn drop(&mut self) {
        for i in 1..=self.cluster.n {
            self.cluster.kill_node(i);
        }
        for d in &mut self.disks {
            if let Err(e) = d.unmount() {
                eprintln!("warning: {e:#}");
            }
        }
    }
}

/// What node `i` serves, checked whole: the generation and sha256 its journal records, the
/// live source file holding exactly that content, and the live `.db` holding exactly the
/// source's entries (a full `postmap -s` dump compared with the source).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Served {
    /// The journal's live generation.
    pub generation: u64,
    /// The sha256 of the live source (hex), equal to the journal's.
    pub sha256: String,
}

/// Checks that node `i`'s live table is whole and is the generation its journal records; the
/// error says what is wrong. A node that never committed anything serves generation 0 with no
/// live files.
pub fn served(c: &TestCluster, i: usize) -> std::result::Result<Served, String> {
    let j = c.journal(i);
    if j.is_null() {
        return Err(format!("node{i}: no journal"));
    }
    let generation = j["generation"].as_u64().unwrap_or(0);
    let want = j["sha256"].as_str().unwrap_or("").to_string();
    let live = c.live(i);
    if generation == 0 && want.is_empty() {
        return Ok(Served {
            generation,
            sha256: want,
        });
    }
    let source = std::fs::read(&live).map_err(|e| format!("node{i}: live source: {e}"))?;
    let sha = txmap_common::table::hex(
        &txmap_common::table::digest_reader(&mut source.as_slice())
            .map_err(|e| e.to_string())?
            .sha256,
    );
    if sha != want {
        return Err(format!(
            "node{i}: the journal says generation {generation} is {}, but the live source is {}",
            short(&want),
            short(&sha)
        ));
    }
    let mut expected: Vec<(String, String)> = String::from_utf8_lossy(&source)
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .filter_map(|l| {
            let (k, v) = l.split_once(|ch: char| ch.is_whitespace())?;
            Some((k.to_lowercase(), v.trim().to_string()))
        })
        .collect();
    expected.sort();
    let out = std::process::Command::new("postmap")
        .arg("-c")
        .arg(c.table_dir(i))
        .arg("-s")
        .arg(format!("hash:{}", live.display()))
        .output()
        .map_err(|e| format!("node{i}: postmap -s: {e}"))?;
    if !out.status.success() || !out.stderr.is_empty() {
        return Err(format!(
            "node{i}: postmap -s of generation {generation} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let mut dumped: Vec<(String, String)> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let (k, v) = l.split_once('\t')?;
            Some((k.to_string(), v.to_string()))
        })
        .collect();
    dumped.sort();
    if dumped != expected {
        return Err(format!(
            "node{i}: the live .db of generation {generation} holds {} entries, its source {} \
             (first difference: {:?})",
            dumped.len(),
            expected.len(),
            dumped
                .iter()
                .zip(&expected)
                .find(|(a, b)| a != b)
                .map(|(a, _)| a.clone())
                .or_else(|| dumped.get(expected.len()).cloned())
                .or_else(|| expected.get(dumped.len()).cloned())
        ));
    }
    Ok(Served {
        generation,
        sha256: sha,
    })
}

fn short(s: &str) -> &str {
    s.get(..12).unwrap_or(s)
}
