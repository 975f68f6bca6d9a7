//! Failure handling and crash recovery with real processes: failpoints that kill `txmapd` or
//! `txmap` at each durability boundary, SIGSTOP, nodes down, a full disk, nodes out of service.
//! After every fault the cluster must end consistent and unblocked by itself.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers: a panic is a test failure

use std::time::{Duration, Instant};
use txmap_chaos_tests::cluster::{
    describe, is_root, transport_table, wait_until, TestCluster, TABLE,
};

const A: &str = "a.example";
const B: &str = "b.example";

fn serves(c: &TestCluster, i: usize, domain: &str) -> bool {
    c.lookup(i, &[format!("list3@{domain}")])
        .map(|v| v[0].is_some())
        .unwrap_or(false)
}

fn source_sha(c: &TestCluster) -> String {
    txmap_common::table::hex(
        &txmap_common::table::digest_file(&c.source())
            .unwrap()
            .sha256,
    )
}

/// Every node reachable, on one generation, serving the current source, nothing in progress,
/// no staged file, no held lock.
fn converged(c: &TestCluster) -> bool {
    let sha = source_sha(c);
    let gens = c.generations();
    gens.len() == c.n
        && gens.iter().all(|g| {
            g.as_ref()
                .is_some_and(|g| g.1 == sha && Some(g.0) == gens[0].as_ref().map(|x| x.0))
        })
        && c.nothing_in_progress(1)
        && (1..=c.n).all(|i| c.staged_files(i).is_empty() && c.lock_free(i))
}

fn cluster_on_a(name: &str) -> TestCluster {
    let c = TestCluster::start(name, 3).unwrap();
    c.write_source(&transport_table(A, 0..30));
    let out = c.commit(1);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    c.write_source(&transport_table(B, 0..30));
    c
}

/// A participant failpoint kills node2's txmapd during a commit; it is restarted.
fn participant_crash(fp: &str, expect_committed: bool) {
    participant_crash_on(2, fp, expect_committed);
}

/// The same on node `k` (node1 is also the coordinator's node).
fn participant_crash_on(k: usize, fp: &str, expect_committed: bool) {
    let mut c = cluster_on_a(&format!("{}-{k}", fp.replace("::", "-")));
    c.kill_node(k);
    c.start_node_with(k, &[("FAILPOINTS", &format!("{fp}=panic"))])
        .unwrap();
    let started = Instant::now();
    let (code, report) = c.commit_json(1);
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "commit took {:?}",
        started.elapsed()
    );
    let txid = report["txid"].as_str().expect("txid in report").to_string();
    assert!(
        c.wait_exit(k, Duration::from_secs(10)).is_some(),
        "{fp} did not kill node{k}"
    );
    if expect_committed {
        assert_eq!(
            code,
            Some(3),
            "decided commit, node{k} unacknowledged: {report}"
        );
    } else {
        assert_eq!(code, Some(1), "aborted: {report}");
    }
    c.start_node(k).unwrap();
    assert!(
        wait_until(Duration::from_secs(40), || converged(&c)),
        "no convergence after {fp}: {:?}",
        c.generations()
    );
    for i in 1..=3 {
        let o = c.outcome(i, &txid);
        if expect_committed {
            assert_eq!(
                o.as_deref(),
                Some("Committed"),
                "node{i}: transaction {txid} after {fp}"
            );
        } else {
            assert_ne!(
                o.as_deref(),
                Some("Committed"),
                "node{i}: transaction {txid} committed after {fp}"
            );
        }
        // Either way the newest source ends up everywhere (a pending retry redoes an abort).
        assert!(
            serves(&c, i, B) && !serves(&c, i, A),
            "node{i} does not serve the newest source"
        );
    }
}

/// Abort tombstones in node1's decision log: transactions recovery fenced (presumed abort).
fn fenced(c: &TestCluster) -> Vec<String> {
    let dir = c.node_dir(1).join("state/decisions");
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let Ok(b) = std::fs::read(e.path()) else {
            continue;
        };
        let Ok(v) = serde_json::from_slice::<serde_json::Value>(&b) else {
            continue;
        };
        if v["verdict"] == "abort" {
            out.push(v["txid"].as_str().unwrap_or_default().to_string());
        }
    }
    out
}

/// A coordinator failpoint kills `txmap` itself during a commit. Nobody runs a command: the
/// daemons resolve the transaction as the protocol requires (abort before the decision is
/// durable, commit after), and since the change was recorded as pending before it started,
/// node1's daemon then brings the newest source everywhere (guarantee 6).
fn coordinator_crash(fp: &str, expect_committed: bool) {
    let c = cluster_on_a(&fp.replace("::", "-"));
    let out = c.txmap_with(
        1,
        &["commit", TABLE],
        &[("FAILPOINTS", &format!("{fp}=panic"))],
    );
    assert!(
        out.status.code().is_none(),
        "txmap should have been killed by {fp}: {}",
        describe(&out)
    );
    assert!(
        wait_until(Duration::from_secs(40), || converged(&c)),
        "no convergence after {fp}: {}",
        c.status(1)
    );
    // Every transaction recorded as aborted stayed aborted everywhere.
    let fenced = fenced(&c);
    for t in &fenced {
        for i in 1..=3 {
            assert_ne!(
                c.outcome(i, t).as_deref(),
                Some("Committed"),
                "node{i}: {t} after {fp}"
            );
        }
    }
    // Which transactions committed, in order, per node1's journal (the first one is A's).
    let committed: Vec<String> = c.journal(1)["recent"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e[1].get("Committed").is_some())
        .map(|e| e[0].as_str().unwrap().to_string())
        .collect();
    if expect_committed {
        // Exactly one new generation: the crashed coordinator's own transaction, finished by
        // recovery; the pending retry found the source already served and made none.
        let gens = c.generations();
        assert!(
            gens.iter().all(|g| g.as_ref().map(|g| g.0) == Some(2)),
            "after {fp}: {gens:?}"
        );
        assert_eq!(committed.len(), 2, "after {fp}: {committed:?}");
        assert!(!fenced.contains(&committed[1]), "after {fp}");
    } else {
        // The crashed transaction was fenced as aborted, and the pending retry committed the
        // newest source in another one.
        assert!(!fenced.is_empty(), "after {fp} nothing was fenced");
    }
    for i in 1..=3 {
        assert!(serves(&c, i, B) && !serves(&c, i, A), "node{i} after {fp}");
    }
}

#[test]
fn crash_after_stage_aborts() {
    participant_crash("participant::after_stage", false);
}

#[test]
fn the_coordinators_own_node_crashing_after_prepared_aborts_and_does_not_stay_in_doubt() {
    participant_crash_on(1, "participant::after_prepared_durable", false);
}

#[test]
fn crash_after_prepared_durable_aborts() {
    participant_crash("participant::after_prepared_durable", false);
}

#[test]
fn crash_before_commit_rename_commits_on_restart() {
    participant_crash("participant::before_commit_rename", true);
}

#[test]
fn crash_after_commit_rename_commits_on_restart() {
    participant_crash("participant::after_commit_rename", true);
}

#[test]
fn coordinator_crash_after_all_prepared_aborts() {
    coordinator_crash("coordinator::after_all_prepared", false);
}

#[test]
fn coordinator_crash_after_decision_durable_commits() {
    coordinator_crash("coordinator::after_decision_durable", true);
}

#[test]
fn coordinator_crash_after_first_commit_sent_commits() {
    coordinator_crash("coordinator::after_first_commit_sent", true);
}

#[test]
fn a_frozen_node_fails_the_commit_in_time_and_cleans_up_after_sigcont() {
    let c = TestCluster::start("frozen", 3).unwrap();
    c.write_source(&transport_table(A, 0..20_000));
    assert_eq!(c.commit(1).status.code(), Some(0));
    c.write_source(&transport_table(B, 0..20_000));
    let started = Instant::now();
    let child = c.spawn_txmap(1, &["commit", TABLE]);
    std::thread::sleep(Duration::from_millis(40));
    c.signal(2, libc::SIGSTOP);
    let out = child.wait_with_output().unwrap();
    let took = started.elapsed();
    // Frozen before it prepared: abort. (Frozen after it prepared but before the vote reached
    // the coordinator is the same.) Either way under 10 s, and nothing changed elsewhere.
    assert!(took < Duration::from_secs(10), "commit took {took:?}");
    if out.status.code() == Some(0) {
        // node2 had already answered before it froze: a legitimate commit.
        c.signal(2, libc::SIGCONT);
        return;
    }
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("node2:"),
        "{}",
        describe(&out)
    );
    for i in [1, 3] {
        assert!(serves(&c, i, A) && !serves(&c, i, B), "node{i} changed");
    }
    c.signal(2, libc::SIGCONT);
    // node2 cleans up by itself, and the newest source arrives (pending retry) with no command.
    assert!(
        wait_until(Duration::from_secs(40), || converged(&c)),
        "no convergence: {}",
        c.status(1)
    );
    for i in 1..=3 {
        assert!(serves(&c, i, B), "node{i}");
    }
    let out = c.commit(1);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
}

#[test]
fn a_node_down_while_the_source_changes_three_times_catches_up_by_itself() {
    let mut c = TestCluster::start("down", 3).unwrap();
    c.write_source(&transport_table(A, 0..30));
    assert_eq!(c.commit(1).status.code(), Some(0));
    c.kill_node(3);
    for (k, d) in ["one.example", "two.example", "three.example"]
        .iter()
        .enumerate()
    {
        c.write_source(&transport_table(d, 0..30));
        let started = Instant::now();
        let out = c.commit(1);
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "commit {k} took {:?}",
            started.elapsed()
        );
        assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("node3: unreachable"),
            "{}",
            describe(&out)
        );
    }
    let s = c.status(1);
    let pending = &s[0]["tables"][0]["pending"];
    assert!(pending.is_object(), "status shows no pending commit: {s}");
    c.start_node(3).unwrap();
    assert!(
        wait_until(Duration::from_secs(60), || converged(&c)),
        "no convergence: {}",
        c.status(1)
    );
    for i in 1..=3 {
        assert!(
            serves(&c, i, "three.example") && !serves(&c, i, "two.example"),
            "node{i}"
        );
    }
    assert!(c.status(1)[0]["tables"][0]["pending"].is_null());
}

#[test]
fn a_full_disk_aborts_cleanly_with_a_clear_error() {
    if !is_root() {
        eprintln!("skipped: mounting a tmpfs needs root (CI runs as root)");
        return;
    }
    let mut c = TestCluster::start("full", 3).unwrap();
    c.write_source(&transport_table(A, 0..30));
    assert_eq!(c.commit(1).status.code(), Some(0));
    c.mount_tmpfs(2, "1m").unwrap();
    c.write_source(&transport_table(B, 0..20_000));
    let out = c.commit(1);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .find(|l| l.starts_with("node2:"))
        .unwrap_or("");
    assert!(
        line.contains("No space left on device"),
        "{}",
        describe(&out)
    );
    for i in 1..=3 {
        assert!(serves(&c, i, A) && !serves(&c, i, B), "node{i}");
        assert!(
            c.staged_files(i).is_empty(),
            "node{i}: {:?}",
            c.staged_files(i)
        );
        assert!(c.lock_free(i));
    }
}

#[test]
fn a_node_out_of_service_is_skipped_and_catches_up_when_back() {
    let mut c = TestCluster::start("maint", 3).unwrap();
    c.write_source(&transport_table(A, 0..30));
    assert_eq!(c.commit(1).status.code(), Some(0));
    c.kill_node(3);
    let mark = |s: String, v: &str| {
        s.replace(
            &format!(
                "name = \"node3\"\naddress = \"127.0.0.1:{}\"\n",
                c.base_port + 2
            ),
            &format!(
                "name = \"node3\"\naddress = \"127.0.0.1:{}\"\nin_service = {v}\n",
                c.base_port + 2
            ),
        )
    };
    c.edit_config(1, |s| mark(s, "false"));
    c.write_source(&transport_table(B, 0..30));
    let out = c.commit(1);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    assert!(serves(&c, 1, B) && serves(&c, 2, B));
    assert_eq!(
        c.txmap(1, &["status"]).status.code(),
        Some(0),
        "status with node3 out of service"
    );
    c.edit_config(1, |s| s.replace("in_service = false", "in_service = true"));
    c.start_node(3).unwrap();
    assert!(
        serves(&c, 3, A) && !serves(&c, 3, B),
        "node3 changed while out of service"
    );
    let out = c.commit(1);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    assert!(wait_until(Duration::from_secs(5), || converged(&c)));
    assert!(serves(&c, 3, B));
}

#[test]
fn recover_lists_in_doubt_transactions_and_refuses_guesses() {
    let mut c = cluster_on_a("recover");
    // The coordinator stops right after every node prepared; meanwhile its node goes down, so
    // nobody can learn the decision (there is none) until that node is back.
    let child = c.spawn_txmap_with(
        1,
        &["commit", TABLE],
        &[("FAILPOINTS", "coordinator::after_all_prepared=sleep(4000)")],
    );
    assert!(wait_until(Duration::from_secs(5), || {
        let s = c.status(2);
        s.as_array().is_some_and(|n| {
            n.iter().skip(1).all(|n| {
                n["tables"]
                    .as_array()
                    .is_some_and(|t| t.iter().any(|t| t["prepared"]["durable"] == true))
            })
        })
    }));
    c.kill_node(1);
    let mut child = child;
    let _ = child.kill();
    let _ = child.wait();

    let out = c.txmap(2, &["recover", "--json"]);
    assert_eq!(
        out.status.code(),
        Some(5),
        "node1 is unreachable: {}",
        describe(&out)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let held: Vec<&str> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["node"].as_str().unwrap())
        .collect();
    assert_eq!(held, vec!["node2", "node3"], "{v}");
    let txid = v[0]["prepared"]["txid"].as_str().unwrap().to_string();

    // No commit decision exists: committing by hand is refused.
    let out = c.txmap(2, &["recover", "--commit", &txid]);
    assert_eq!(out.status.code(), Some(7), "{}", describe(&out));
    // Every reachable node is prepared and the coordinator's node is down: only it could know,
    // so aborting by hand is refused too.
    let out = c.txmap(2, &["recover", "--abort", &txid]);
    assert_eq!(out.status.code(), Some(7), "{}", describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("cannot be reached"),
        "{}",
        describe(&out)
    );
    for i in [2, 3] {
        assert!(serves(&c, i, A), "node{i}");
    }

    // The coordinator's node comes back: it fences the dead coordinator's transaction, every
    // node resolves it to abort by itself, and the change, recorded as pending before the
    // coordinator started, then reaches every node.
    c.start_node(1).unwrap();
    assert!(
        wait_until(Duration::from_secs(35), || converged(&c)),
        "{}",
        c.status(1)
    );
    for i in 1..=3 {
        assert_eq!(c.outcome(i, &txid).as_deref(), Some("Aborted"), "node{i}");
        assert!(serves(&c, i, B) && !serves(&c, i, A), "node{i}");
    }
    let out = c.txmap(2, &["recover", "--abort", &txid]);
    assert_eq!(
        out.status.code(),
        Some(7),
        "nothing left to resolve: {}",
        describe(&out)
    );
}

#[test]
fn a_coordinator_that_wakes_up_after_being_fenced_cannot_commit() {
    let c = cluster_on_a("late");
    // Every node prepares, then the coordinator stalls past its deadline (9 s + 1 s): recovery
    // fences the transaction as aborted while it sleeps.
    let started = Instant::now();
    let out = c.txmap_with(
        1,
        &["commit", TABLE, "--json"],
        &[("FAILPOINTS", "coordinator::after_all_prepared=sleep(11500)")],
    );
    assert!(started.elapsed() < Duration::from_secs(20));
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let txid = report["txid"].as_str().unwrap().to_string();
    assert!(
        wait_until(Duration::from_secs(40), || converged(&c)),
        "{}",
        c.status(1)
    );
    for i in 1..=3 {
        assert_eq!(
            c.outcome(i, &txid).as_deref(),
            Some("Aborted"),
            "node{i}: {txid}"
        );
    }
    // The fence stays on record (a tombstone), so the late coordinator could never win it.
    assert!(fenced(&c).contains(&txid), "{:?}", fenced(&c));
}

#[test]
fn a_disk_that_fills_up_during_the_build_leaves_nothing_behind() {
    if !is_root() {
        eprintln!("skipped: mounting a tmpfs needs root (CI runs as root)");
        return;
    }
    let mut c = TestCluster::start("full-build", 3).unwrap();
    c.write_source(&transport_table(A, 0..30));
    assert_eq!(c.commit(1).status.code(), Some(0));
    // Room for the 1.2 MB source and one more page: postmap fails as it creates the .db, and
    // Berkeley DB leaves its `__db.` temporary file behind (txmap must remove it).
    c.mount_tmpfs(2, "4m").unwrap();
    let source = transport_table(B, 0..20_000);
    c.write_source(&source);
    let df = std::process::Command::new("df")
        .args(["-k", "--output=avail"])
        .arg(c.table_dir(2))
        .output()
        .unwrap();
    let avail_kb: u64 = String::from_utf8_lossy(&df.stdout)
        .lines()
        .last()
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let pages = (source.len() as u64).div_ceil(4096);
    let filler = avail_kb * 1024 - pages * 4096 - 4096;
    let st = std::process::Command::new("fallocate")
        .args(["-l", &filler.to_string()])
        .arg(c.table_dir(2).join("filler"))
        .status()
        .unwrap();
    assert!(st.success());
    let out = c.commit(1);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("node2: refused: build failed"),
        "{}",
        describe(&out)
    );
    for i in 1..=3 {
        assert!(serves(&c, i, A) && !serves(&c, i, B), "node{i}");
        assert!(
            c.staged_files(i).is_empty(),
            "node{i}: {:?}",
            c.staged_files(i)
        );
        assert!(c.lock_free(i));
    }
}
