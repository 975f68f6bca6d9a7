//! Benchmark of the real workload: a one-list change to a big table, committed to 3 nodes on
//! loopback, against one local full `postmap` of the same table (what Sympa runs today).
//! Prints figures and ratios and writes an SVG chart; asserts nothing (the machine is shared and
//! noisy).
//!
//! For each table size it measures (medians):
//! - `local postmap`: one full build of the table;
//! - `script`: copy + full postmap on each of the 3 nodes in turn (the usual scp/ssh script);
//! - `txmap full`: a commit with delta commits off (`delta_max_percent = 0`): whole table sent,
//!   full build and full verification on every node;
//! - `txmap delta`: a one-list change (6 lines added or removed) with the default settings,
//!   2 s after the previous commit (list changes come seconds apart; each node makes its spare
//!   copy of the live `.db` in that time, see participant/src/spare.rs);
//! - `delta back-to-back`: the same, each commit right after the previous one (the spare copy
//!   is then usually not ready and the live `.db` is copied during the prepare);
//! - bytes the coordinator sent for the delta commit, as a share of the table;
//! - `hook`: wall time of `txmap-sympa` for a one-list change (txmapd coordinates);
//! - txmapd peak RSS (VmHWM) over the run;
//! - `delta, 1 node`: the `txmap delta` measure on a 1-node sandbox, what a commit costs when
//!   its node has the machine to itself (the 3-node sandbox shares 2 cores among 3 nodes,
//!   which a real cluster does not).
//!
//! Run: `cargo run --release -p txmap-chaos-tests --bin txmap-bench [-- ROUNDS SIZE...]`
//! (default: 7 rounds, sizes 20000 and 1000000; sizes of 500,000 lines or more use 3 rounds).
//! It builds the release binaries first, unless `TXMAP_BIN_DIR` names binaries to bench. The
//! chart goes to `target/txmap-bench.svg` (copied to `docs/benchmarks.svg` by hand).

use anyhow::{ensure, Context, Result};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};
use txmap_chaos_tests::cluster::{TestCluster, TABLE};

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// A Sympa-like transport table of `n` lines (lists in name order).
fn table(n: usize) -> Vec<String> {
    (0..n)
        .map(|i| format!("list{i:07}@lists.example.org\tsympa:list{i:07}@lists.example.org"))
        .collect()
}

/// The table with (`with`) or without one more list's 6 lines, in its sorted place.
fn one_list(lines: &[String], with: bool) -> String {
    let mut v = lines.to_vec();
    if with {
        let at = v.len() / 2;
        for (k, suffix) in [
            "",
            "-request",
            "-editor",
            "-owner",
            "-subscribe",
            "-unsubscribe",
        ]
        .iter()
        .enumerate()
        {
            v.insert(
                at + k,
                format!(
                    "list{:07}x{suffix}@lists.example.org\tsympa:newlist{suffix}@lists.example.org",
                    v.len() / 2
                ),
            );
        }
    }
    let mut s = v.join("\n");
    s.push('\n');
    s
}

struct Row {
    lines: usize,
    bytes: usize,
    local: f64,
    script: f64,
    full: f64,
    delta: f64,
    sent: u64,
    back_to_back: f64,
    hook: f64,
    rss_mib: f64,
    one_node: f64,
}

fn set_delta(c: &mut TestCluster, on: bool) -> Result<()> {
    for i in 1..=3 {
        c.kill_node(i);
        c.edit_config(i, |s| {
            let s = s.replace("delta_max_percent = 0\n", "");
            if on {
                s
            } else {
                s.replacen("\n[tls]", "\ndelta_max_percent = 0\n\n[tls]", 1)
            }
        });
        c.start_node(i)?;
    }
    Ok(())
}

fn commit(c: &TestCluster, content: &str) -> Result<(Duration, serde_json::Value)> {
    c.write_source(content);
    let t = Instant::now();
    let o = c.txmap(1, &["commit", TABLE, "--json", "--force"]);
    let d = t.elapsed();
    ensure!(
        o.status.success(),
        "commit failed: {}",
        String::from_utf8_lossy(&o.stdout)
    );
    Ok((d, serde_json::from_slice(&o.stdout).unwrap_or_default()))
}

/// Commits `a`, then `rounds` one-list changes 2 s apart (`b`, `a`, `b`, ...), each a delta to
/// all `nodes`; returns their times and the bytes sent for each.
fn delta_rounds(
    c: &TestCluster,
    nodes: u64,
    rounds: usize,
    (a, b): (&str, &str),
) -> Result<(Vec<Duration>, Vec<u64>)> {
    commit(c, a)?;
    let (mut times, mut sent) = (Vec::new(), Vec::new());
    for r in 0..rounds {
        std::thread::sleep(Duration::from_secs(2));
        let (d, rep) = commit(c, if r % 2 == 0 { b } else { a })?;
        ensure!(rep["delta_nodes"] == nodes, "not a delta commit: {rep}");
        times.push(d);
        sent.push(rep["bytes_sent"].as_u64().unwrap_or(0));
    }
    Ok((times, sent))
}

fn bench(lines: usize, rounds: usize) -> Result<Row> {
    let base = table(lines);
    let (a, b) = (one_list(&base, false), one_list(&base, true));
    let mut c = TestCluster::create("bench", 3)?;
    for i in 1..=3 {
        c.start_node(i)?;
    }
    // Local postmap and the script method, on plain directories.
    let local = c.dir.0.join("local");
    // Each directory's `main.cf` is written once, dated a minute back: Postfix waits (300 ms,
    // up to 5 times) for a `main.cf` modified in the last second to settle, which would be
    // timed otherwise (the script method copies the table, not the configuration).
    for d in
        std::iter::once(local.clone()).chain((1..=3).map(|n| c.dir.0.join(format!("script{n}"))))
    {
        std::fs::create_dir_all(&d)?;
        let f = std::fs::File::create(d.join("main.cf"))?;
        f.set_modified(std::time::SystemTime::now() - Duration::from_secs(60))?;
    }
    std::fs::write(local.join("t"), &a)?;
    let postmap = |dir: &Path| -> Result<()> {
        let st = Command::new("postmap")
            .arg("-c")
            .arg(dir)
            .arg(format!("hash:{}", dir.join("t").display()))
            .status()?;
        ensure!(st.success(), "postmap failed");
        Ok(())
    };
    let mut t_local = Vec::new();
    let mut t_script = Vec::new();
    for _ in 0..rounds {
        let t = Instant::now();
        postmap(&local)?;
        t_local.push(t.elapsed());
        let t = Instant::now();
        for n in 1..=3 {
            let d = c.dir.0.join(format!("script{n}"));
            std::fs::copy(local.join("t"), d.join("t"))?;
            postmap(&d)?;
        }
        t_script.push(t.elapsed());
    }
    // txmap, whole tables and full builds.
    set_delta(&mut c, false)?;
    let mut t_full = Vec::new();
    for r in 0..rounds {
        t_full.push(commit(&c, if r % 2 == 0 { &b } else { &a })?.0);
    }
    // Peak memory of the full phase's daemons, before they are restarted.
    let hwm_full = peak_rss_kb(&c);
    // txmap, delta commits (defaults), alternating adding and removing one list.
    set_delta(&mut c, true)?;
    let (t_delta, mut sent) = delta_rounds(&c, 3, rounds, (&a, &b))?;
    let mut t_b2b = Vec::new();
    for r in 0..rounds {
        // Continues the alternation (the previous loop ended on `b` when `rounds` is odd).
        let (d, rep) = commit(
            &c,
            if (rounds + r).is_multiple_of(2) {
                &b
            } else {
                &a
            },
        )?;
        ensure!(rep["delta_nodes"] == 3, "not a delta commit: {rep}");
        t_b2b.push(d);
    }
    // The Sympa hook: txmap-sympa hands the new content to txmapd, which coordinates.
    let hook_bin = std::path::PathBuf::from(std::env::var("TXMAP_BIN_DIR")?).join("txmap-sympa");
    let mut t_hook = Vec::new();
    for r in 0..rounds {
        std::thread::sleep(Duration::from_secs(2));
        c.write_source(if r % 2 == 0 { &b } else { &a });
        let t = Instant::now();
        let o = Command::new(&hook_bin)
            .env("TXMAP_CONFIG", c.config(1))
            .arg(c.source())
            .output()?;
        t_hook.push(t.elapsed());
        ensure!(
            o.status.success(),
            "hook failed: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    let rss_kb = peak_rss_kb(&c).max(hwm_full);
    drop(c);
    // The same one-list commits on a 1-node sandbox.
    let mut one = TestCluster::create("bench1", 1)?;
    one.start_node(1)?;
    let (t_one, _) = delta_rounds(&one, 1, rounds, (&a, &b))?;
    sent.sort();
    Ok(Row {
        lines,
        bytes: a.len(),
        local: ms(median(t_local)),
        script: ms(median(t_script)),
        full: ms(median(t_full)),
        delta: ms(median(t_delta)),
        sent: sent[sent.len() / 2],
        back_to_back: ms(median(t_b2b)),
        hook: ms(median(t_hook)),
        rss_mib: rss_kb as f64 / 1024.0,
        one_node: ms(median(t_one)),
    })
}

/// The largest peak resident memory (VmHWM, KiB) of the running daemons.
fn peak_rss_kb(c: &TestCluster) -> u64 {
    (1..=3)
        .filter_map(|i| {
            let s = std::fs::read_to_string(format!("/proc/{}/status", c.pid(i)?)).ok()?;
            let line = s.lines().find(|l| l.starts_with("VmHWM:"))?.to_string();
            line.split_whitespace().nth(1)?.parse::<u64>().ok()
        })
        .max()
        .unwrap_or(0)
}

/// commit time against table size, full and delta, with the local postmap for reference.
fn chart(rows: &[Row]) -> String {
    let (w, h, pad) = (640.0, 400.0, 60.0);
    let max_x = rows.iter().map(|r| r.lines).max().unwrap_or(1) as f64;
    let max_y = rows.iter().map(|r| r.full.max(r.local)).fold(1.0, f64::max);
    let x = |l: usize| pad + (l as f64 / max_x) * (w - 2.0 * pad);
    let y = |v: f64| h - pad - (v / max_y) * (h - 2.0 * pad);
    let line = |f: &dyn Fn(&Row) -> f64, color: &str, name: &str, k: usize| {
        let pts: Vec<String> = rows
            .iter()
            .map(|r| format!("{:.1},{:.1}", x(r.lines), y(f(r))))
            .collect();
        format!(
            "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"2\" points=\"{}\"/>\n\
             <text x=\"{}\" y=\"{}\" fill=\"{color}\" font-size=\"13\">{name}</text>\n",
            pts.join(" "),
            pad + 10.0,
            pad + 18.0 * k as f64
        )
    };
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <line x1=\"{pad}\" y1=\"{0}\" x2=\"{1}\" y2=\"{0}\" stroke=\"black\"/>\n\
         <line x1=\"{pad}\" y1=\"{pad}\" x2=\"{pad}\" y2=\"{0}\" stroke=\"black\"/>\n\
         <text x=\"{2}\" y=\"{3}\" font-size=\"12\">table lines (max {max_x})</text>\n\
         <text x=\"8\" y=\"{pad}\" font-size=\"12\">ms (max {max_y:.0})</text>\n",
        h - pad,
        w - pad,
        w / 2.0 - 60.0,
        h - pad / 2.0
    );
    s += &line(&|r| r.full, "#c0392b", "txmap full (3 nodes)", 1);
    s += &line(&|r| r.local, "#7f8c8d", "local postmap (1 node)", 2);
    s += &line(
        &|r| r.delta,
        "#27ae60",
        "txmap delta, one list (3 nodes)",
        3,
    );
    s += &line(
        &|r| r.one_node,
        "#2980b9",
        "txmap delta, one list (1 node)",
        4,
    );
    for r in rows {
        s += &format!(
            "<text x=\"{:.1}\" y=\"{}\" font-size=\"11\" text-anchor=\"middle\">{}</text>\n",
            x(r.lines),
            h - pad + 15.0,
            r.lines
        );
    }
    s + "</svg>\n"
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let rounds: usize = args.get(1).map(|s| s.parse()).transpose()?.unwrap_or(7);
    let mut sizes: Vec<usize> = args[2.min(args.len())..]
        .iter()
        .map(|s| s.parse())
        .collect::<Result<_, _>>()?;
    if sizes.is_empty() {
        sizes = vec![20_000, 1_000_000];
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("workspace root")?;
    if std::env::var_os("TXMAP_BIN_DIR").is_none() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let st = Command::new(cargo)
            .current_dir(root)
            .args(["build", "--release", "--quiet", "--bins"])
            .status()?;
        ensure!(st.success(), "cargo build --release failed");
        std::env::set_var("TXMAP_BIN_DIR", root.join("target/release"));
    }
    let mut rows = Vec::new();
    for &n in &sizes {
        let r = if n >= 500_000 { 3 } else { rounds };
        eprintln!("bench: {n} lines, {r} rounds");
        rows.push(bench(n, r)?);
    }
    println!(
        "| lines | MB | local postmap ms | script (3 nodes) | txmap full | txmap delta (1 list) | delta bytes sent | delta back-to-back | hook (1 list) | txmapd peak RSS | delta, 1 node |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    for r in &rows {
        println!(
            "| {} | {:.1} | {:.0} | {:.0} ms = {:.2}x | {:.0} ms = {:.2}x | {:.0} ms = {:.3}x | {} B = {:.4} % | {:.0} ms = {:.3}x | {:.0} ms = {:.3}x | {:.1} MiB | {:.0} ms = {:.3}x |",
            r.lines,
            r.bytes as f64 / 1e6,
            r.local,
            r.script,
            r.script / r.local,
            r.full,
            r.full / r.local,
            r.delta,
            r.delta / r.local,
            r.sent,
            r.sent as f64 * 100.0 / r.bytes as f64,
            r.back_to_back,
            r.back_to_back / r.local,
            r.hook,
            r.hook / r.local,
            r.rss_mib,
            r.one_node,
            r.one_node / r.local
        );
    }
    let svg = root.join("target").join("txmap-bench.svg");
    std::fs::write(&svg, chart(&rows))?;
    println!("chart: {}", svg.display());
    Ok(())
}
