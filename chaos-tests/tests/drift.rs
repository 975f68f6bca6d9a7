//! Drift is state, with real processes: a hand edit of one node's live
//! table (a line appended to the live source, then the real `postmap` run on it) is reported by
//! `status` (non-zero exit, naming the node), `check` (CRITICAL) and `verify`; the next
//! `txmap commit` of the same content reinstalls it there (a real transaction, a full build);
//! and the catch-all: `txmap check` warns when the configured source differs from what the
//! in-service nodes serve while nothing is pending, until it is committed.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers: a panic is a test failure

use std::io::Write;
use std::process::{Command, Output};
use std::time::{Duration, Instant};
use txmap_chaos_tests::cluster::{describe, transport_table, wait_until, TestCluster, TABLE};

const DOMAIN: &str = "drift.example";
/// The key the hand edit adds on node2.
const HAND: &str = "handmade@drift.example";

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn keys(range: std::ops::Range<usize>) -> Vec<String> {
    range.map(|i| format!("list{i}@{DOMAIN}")).collect()
}

/// Polls `txmap check` until `want` holds (or `limit` passes); returns the last output.
fn check_until(
    c: &TestCluster,
    i: usize,
    extra: &[&str],
    limit: Duration,
    want: impl Fn(&Output) -> bool,
) -> Output {
    let until = Instant::now() + limit;
    loop {
        let o = c.check_as_nobody(i, extra);
        if want(&o) || Instant::now() > until {
            return o;
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// The hand edit: a line appended to node `i`'s live source, then `postmap` run on it (what an
/// operator does when they "just fix it on that node").
fn hand_edit(c: &TestCluster, i: usize) {
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(c.live(i))
        .expect("open live source");
    writeln!(f, "{HAND}\tsmtp:[elsewhere.example]").expect("append");
    drop(f);
    let out = Command::new("postmap")
        .arg("-c")
        .arg(c.table_dir(i))
        .arg(format!("hash:{}", c.live(i).display()))
        .output()
        .expect("run postmap");
    assert!(out.status.success(), "postmap: {}", describe(&out));
    assert_eq!(
        c.lookup(i, &[HAND.to_string()]).unwrap()[0].as_deref(),
        Some("smtp:[elsewhere.example]"),
        "the hand edit is live on node{i}"
    );
}

/// A 3-node cluster serving generation 1 of a 40-list table, then the hand edit on node2.
fn drifted_cluster(name: &str) -> TestCluster {
    let c = TestCluster::start(name, 3).unwrap();
    c.write_source(&transport_table(DOMAIN, 0..40));
    let out = c.commit(1);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    hand_edit(&c, 2);
    c
}

#[test]
fn a_hand_edit_of_one_node_is_reported_by_status_check_and_verify() {
    let c = drifted_cluster("drift-seen");

    // status: exit 5 (some in-service node drifted), naming node2 and what changed.
    let st = c.txmap(1, &["status", TABLE]);
    assert_eq!(
        st.status.code(),
        Some(5),
        "status must flag the drifted node: {}",
        describe(&st)
    );
    let out = text(&st);
    assert!(
        out.contains("node2") && out.contains("DRIFTED"),
        "status must name node2 as drifted: {out}"
    );
    // Its JSON says which file changed, on node2 only.
    let js = c.status(1);
    let drifted = |n: usize| js[n - 1]["tables"][0]["drifted"].clone();
    assert!(
        drifted(2).as_str().is_some_and(|s| s.contains(TABLE)),
        "node2's status must say which file drifted: {js}"
    );
    assert!(
        drifted(1).is_null() && drifted(3).is_null(),
        "only node2 drifted: {js}"
    );

    // check: CRITICAL, naming node2 and the command that heals it.
    let o = check_until(&c, 1, &[], Duration::from_secs(12), |o| {
        o.status.code() == Some(2) && text(o).contains("drifted on node2")
    });
    let line = String::from_utf8_lossy(&o.stdout).to_string();
    assert_eq!(o.status.code(), Some(2), "{}", describe(&o));
    assert!(line.contains("node2"), "{line}");
    assert!(line.contains("drift"), "{line}");
    assert!(line.contains(&format!("txmap commit {TABLE}")), "{line}");
    // Seen from another node the same.
    let o = check_until(&c, 3, &[], Duration::from_secs(12), |o| {
        o.status.code() == Some(2) && text(o).contains("drifted on node2")
    });
    assert_eq!(o.status.code(), Some(2), "{}", describe(&o));

    // verify: reports it (exit 5), on node2 only.
    let v = c.txmap(1, &["verify", TABLE]);
    assert_eq!(v.status.code(), Some(5), "{}", describe(&v));
    let out = text(&v);
    assert!(
        out.lines()
            .any(|l| l.starts_with("node2:") && l.contains("DRIFT")),
        "{out}"
    );
    assert!(
        !out.lines()
            .any(|l| (l.starts_with("node1:") || l.starts_with("node3:")) && l.contains("DRIFT")),
        "{out}"
    );
}

#[test]
fn a_commit_of_the_same_content_heals_a_drifted_node() {
    let c = drifted_cluster("drift-heal");
    let before = c.generations();
    assert_eq!(before.len(), 3);
    let gen1 = before[0].clone().expect("node1 status").0;

    // The content every node should serve is unchanged: still a commit reinstalls it on node2.
    let (code, report) = c.commit_json(1);
    assert_eq!(code, Some(0), "{report}");
    assert!(
        !report["nodes"].to_string().contains("already serves"),
        "a drifted node does not really serve this content: {report}"
    );
    assert!(report["txid"].is_string(), "a real transaction: {report}");

    // node2 no longer has the hand-added key; every node serves the committed content.
    assert_eq!(
        c.lookup(2, &[HAND.to_string()]).unwrap()[0],
        None,
        "the hand-added key is gone from node2"
    );
    let all = keys(0..40);
    for i in 1..=3 {
        let got = c.lookup(i, &all).unwrap();
        assert!(got.iter().all(|v| v.is_some()), "node{i} misses keys");
        assert_eq!(
            std::fs::read(c.live(i)).unwrap(),
            std::fs::read(c.source()).unwrap(),
            "node{i}'s live source is the committed content"
        );
    }
    // One new generation, the same everywhere.
    let after = c.generations();
    let first = after[0].clone().expect("node1 status");
    assert!(
        first.0 > gen1,
        "the generation grew: {before:?} -> {after:?}"
    );
    assert!(
        after.iter().all(|g| g.as_ref() == Some(&first)),
        "{after:?}"
    );
    // No drift left: status 0, check OK, verify 0.
    let st = c.txmap(1, &["status", TABLE]);
    assert_eq!(st.status.code(), Some(0), "{}", describe(&st));
    assert!(!text(&st).contains("DRIFTED"), "{}", describe(&st));
    let o = check_until(&c, 1, &[], Duration::from_secs(12), |o| {
        o.status.code() == Some(0)
    });
    assert_eq!(o.status.code(), Some(0), "{}", describe(&o));
    let v = c.txmap(1, &["verify", TABLE]);
    assert_eq!(v.status.code(), Some(0), "{}", describe(&v));
    // And now a commit of that content has nothing to do.
    let (code, report) = c.commit_json(1);
    assert_eq!(code, Some(0), "{report}");
    assert!(report["txid"].is_null(), "nothing to do now: {report}");
}

#[test]
fn check_warns_when_the_source_differs_from_what_is_served_with_nothing_pending() {
    let c = TestCluster::start("drift-catchall", 3).unwrap();
    c.write_source(&transport_table(DOMAIN, 0..40));
    let out = c.commit(1);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let ok = check_until(&c, 1, &[], Duration::from_secs(12), |o| {
        o.status.code() == Some(0)
    });
    assert_eq!(ok.status.code(), Some(0), "{}", describe(&ok));

    // A change that reached nobody: the source is rewritten, nothing commits it, nothing is
    // pending (whatever lost it).
    c.write_source(&transport_table(DOMAIN, 0..41));
    // Inside the grace period (the default, 60 s): still OK.
    let o = c.check_as_nobody(1, &[]);
    assert_eq!(o.status.code(), Some(0), "{}", describe(&o));
    // Past it (a 1 s grace here): WARNING, naming the table and the command.
    std::thread::sleep(Duration::from_millis(1100));
    let o = check_until(
        &c,
        1,
        &["--source-grace", "1"],
        Duration::from_secs(12),
        |o| o.status.code() == Some(1),
    );
    let line = String::from_utf8_lossy(&o.stdout).to_string();
    assert_eq!(o.status.code(), Some(1), "{}", describe(&o));
    assert!(line.contains(TABLE), "{line}");
    assert!(line.contains("differs"), "{line}");
    assert!(line.contains(&format!("txmap commit {TABLE}")), "{line}");
    // Committed: OK again.
    let out = c.commit(1);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let o = check_until(
        &c,
        1,
        &["--source-grace", "1"],
        Duration::from_secs(12),
        |o| o.status.code() == Some(0),
    );
    assert_eq!(o.status.code(), Some(0), "{}", describe(&o));
    assert!(
        wait_until(Duration::from_secs(5), || c.nothing_in_progress(1)),
        "nothing left in progress"
    );
}
