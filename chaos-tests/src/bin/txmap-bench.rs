//! Benchmark: wall time of a 3-node `txmap commit` of a 20,000-line table, divided by the time
//! of one local `postmap` of the same table. Prints figures and the ratio; asserts nothing
//! (the machine is shared and noisy). Target: ratio <= 2.0 on 2 cores.
//!
//! Run: `cargo run --release -p txmap-chaos-tests --bin txmap-bench [-- ROUNDS LINES]`
//! It builds the release `txmap`/`txmapd` first (`cargo build --release --bins`), unless
//! `TXMAP_BIN_DIR` names a directory of binaries to bench instead (an older build, say).

use anyhow::{ensure, Context, Result};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};
use txmap_chaos_tests::cluster::{transport_table, TestCluster};

fn median(v: &mut [Duration]) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// `rounds` commits through node1, alternating two contents so every round changes the table.
fn run_commits(c: &TestCluster, table: &str, rounds: usize) -> Result<Vec<Duration>> {
    let mut out = Vec::new();
    for i in 0..rounds {
        if i % 2 == 1 {
            c.write_source(&format!(
                "{table}extra{i}@lists.example.org\tsympa:extra{i}\n"
            ));
        } else {
            c.write_source(table);
        }
        let t = Instant::now();
        let o = c.commit(1);
        out.push(t.elapsed());
        ensure!(
            o.status.success(),
            "commit failed: {}",
            String::from_utf8_lossy(&o.stdout)
        );
    }
    Ok(out)
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let rounds: usize = args.get(1).map(|s| s.parse()).transpose()?.unwrap_or(15);
    let lines: usize = args
        .get(2)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(20_000);
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("workspace root")?;
    // TXMAP_BIN_DIR set: bench those binaries as they are (e.g. an older build, to compare).
    if std::env::var_os("TXMAP_BIN_DIR").is_none() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let st = Command::new(cargo)
            .current_dir(root)
            .args(["build", "--release", "--quiet", "--bins"])
            .status()?;
        ensure!(st.success(), "cargo build --release failed");
        std::env::set_var("TXMAP_BIN_DIR", root.join("target/release"));
    }

    let table = transport_table("lists.example.org", 0..lines);

    // Baseline: one local postmap of the same table (what Sympa runs today).
    let mut c = TestCluster::create("bench", 3)?;
    for i in 1..=3 {
        if lines > 100_000 {
            // Big tables take seconds to build: give the deadlines room.
            c.edit_config(i, |s| {
                s.replace(
                    "prepare_ms = 5000",
                    "prepare_ms = 120000\ntotal_ms = 240000\nbusy_retry_ms = 240000",
                )
            });
        }
        c.start_node(i)?;
    }
    let local = c.dir.0.join("local");
    std::fs::create_dir_all(&local)?;
    std::fs::write(local.join("main.cf"), "")?;
    std::fs::write(local.join("sympa_transport"), &table)?;
    let mut base = Vec::new();
    for _ in 0..rounds {
        let t = Instant::now();
        let st = Command::new("postmap")
            .arg("-c")
            .arg(&local)
            .arg(format!("hash:{}", local.join("sympa_transport").display()))
            .status()?;
        base.push(t.elapsed());
        ensure!(st.success(), "postmap failed");
    }

    // txmap: a whole `txmap commit` process (start, TLS handshakes, 2PC) against 3 nodes,
    // first with the default verification (full dump, entry count), then with `verify = "sample"`.
    let commit = run_commits(&c, &table, rounds)?;
    // Peak resident memory of each daemon over the whole run (tables are streamed, so this
    // should not grow with the table).
    let hwm: Vec<String> = (1..=3)
        .map(|i| {
            let kb = c
                .pid(i)
                .and_then(|p| std::fs::read_to_string(format!("/proc/{p}/status")).ok())
                .and_then(|s| {
                    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?.to_string();
                    line.split_whitespace().nth(1)?.parse::<u64>().ok()
                })
                .unwrap_or(0);
            format!("{:.1} MiB", kb as f64 / 1024.0)
        })
        .collect();
    for i in 1..=3 {
        c.kill_node(i);
        c.edit_config(i, |s| {
            s.replacen(
                "builder = \"postmap\"\n",
                "builder = \"postmap\"\nverify = \"sample\"\n",
                1,
            )
        });
        c.start_node(i)?;
    }
    let mut sampled = run_commits(&c, &table, rounds)?;
    let mut commit = commit;
    let (b, m) = (median(&mut base), median(&mut commit));
    println!(
        "table: {lines} lines, {} bytes; {rounds} rounds each; medians",
        table.len()
    );
    println!("local postmap (1 node):         {:8.1} ms", ms(b));
    println!(
        "txmap commit (3 nodes, 2PC):    {:8.1} ms   (min {:.1}, max {:.1})",
        ms(m),
        ms(commit[0]),
        ms(commit[commit.len() - 1])
    );
    println!(
        "ratio commit / postmap:         {:8.2}   (target <= 2.0)",
        ms(m) / ms(b)
    );
    let sm = median(&mut sampled);
    println!(
        "txmap commit, verify = sample:  {:8.1} ms   ratio {:.2}",
        ms(sm),
        ms(sm) / ms(b)
    );
    println!("txmapd peak RSS (VmHWM):        {}", hwm.join(", "));
    Ok(())
}
