//! The core guarantees with real processes: real `txmapd` daemons on loopback QUIC, the real
//! `txmap` CLI, Debian's real `postmap`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers: a panic is a test failure

use std::os::unix::fs::MetadataExt;
use std::time::{Duration, Instant};
use txmap_chaos_tests::cluster::{describe, transport_table, TestCluster, TABLE};

fn keys(domain: &str, range: std::ops::Range<usize>) -> Vec<String> {
    range.map(|i| format!("list{i}@{domain}")).collect()
}

fn assert_clean(c: &TestCluster) {
    for i in 1..=c.n {
        assert!(
            c.staged_files(i).is_empty(),
            "node{i} has staged files left: {:?}",
            c.staged_files(i)
        );
        assert!(c.lock_free(i), "node{i} still holds the table lock");
    }
}

#[test]
fn a_20000_line_table_committed_through_node1_is_served_by_every_node() {
    let c = TestCluster::start("big", 3).unwrap();
    c.write_source(&transport_table("lists.example.org", 0..20_000));
    let out = c.commit(1);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let all = keys("lists.example.org", 0..20_000);
    for i in 1..=3 {
        let got = c.lookup(i, &all).unwrap();
        let missing: Vec<_> = all
            .iter()
            .zip(&got)
            .filter(|(_, v)| v.is_none())
            .map(|(k, _)| k)
            .collect();
        assert!(
            missing.is_empty(),
            "node{i} misses {} keys, e.g. {:?}",
            missing.len(),
            missing.first()
        );
        assert_eq!(
            got[19_999].as_deref(),
            Some("sympa:list19999@lists.example.org")
        );
    }
    let gens = c.generations();
    assert_eq!(gens.len(), 3);
    let first = gens[0].clone().expect("node1 status");
    assert_eq!(first.0, 1, "first commit is generation 1");
    assert!(
        gens.iter().all(|g| g.as_ref() == Some(&first)),
        "status differs between nodes: {gens:?}"
    );
    let sha = txmap_common::table::hex(
        &txmap_common::table::digest_file(&c.source())
            .unwrap()
            .sha256,
    );
    assert_eq!(first.1, sha, "status sha256 is not the source's");
    assert_clean(&c);
}

#[test]
fn an_unwritable_node_aborts_the_commit_everywhere_and_names_the_node() {
    let mut c = TestCluster::start("ro", 3).unwrap();
    c.write_source(&transport_table("a.example", 0..50));
    assert_eq!(c.commit(1).status.code(), Some(0));
    let before = c.generations();

    c.make_unwritable(2).unwrap();
    c.write_source(&transport_table("b.example", 0..50));
    let out = c.commit(1);
    c.make_writable(2).unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let node2 = stdout
        .lines()
        .find(|l| l.starts_with("node2:"))
        .unwrap_or("");
    assert!(
        node2.contains("storage") || node2.contains("Read-only") || node2.contains("ermission"),
        "{}",
        describe(&out)
    );
    // Every node still serves the previous table, and only it.
    for i in 1..=3 {
        let got = c
            .lookup(i, &["list7@a.example".into(), "list7@b.example".into()])
            .unwrap();
        assert!(got[0].is_some(), "node{i} lost the previous table");
        assert!(got[1].is_none(), "node{i} serves the aborted table");
    }
    assert_eq!(
        c.generations(),
        before,
        "a generation moved on an aborted commit"
    );
    assert_clean(&c);

    // Fixed: the next commit succeeds everywhere.
    let out = c.commit(1);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    for i in 1..=3 {
        assert!(
            c.lookup(i, &["list7@b.example".into()]).unwrap()[0].is_some(),
            "node{i}"
        );
    }
}

#[test]
fn a_reader_never_misses_a_stable_key_during_50_commits() {
    let c = TestCluster::start("reader", 3).unwrap();
    let stable = keys("stable.example", 0..20);
    let base = transport_table("stable.example", 0..20);
    c.write_source(&base);
    assert_eq!(c.commit(1).status.code(), Some(0));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let readers: Vec<_> = (1..=3)
        .map(|i| {
            let (dir, live, stable, stop) =
                (c.table_dir(i), c.live(i), stable.clone(), stop.clone());
            std::thread::spawn(move || {
                let (mut lookups, mut misses) = (0u64, Vec::new());
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    match txmap_chaos_tests::cluster::postmap_query(&dir, &live, &stable) {
                        Ok(v) => {
                            lookups += v.len() as u64;
                            for (k, got) in stable.iter().zip(v) {
                                if got.is_none() {
                                    misses.push(k.clone());
                                }
                            }
                        }
                        Err(e) => misses.push(format!("postmap failed: {e}")),
                    }
                }
                (lookups, misses)
            })
        })
        .collect();
    for round in 0..50 {
        let mut content = base.clone();
        content.push_str(&transport_table("churn.example", 0..(100 + round * 37)));
        c.write_source(&content);
        let out = c.commit(1);
        assert_eq!(
            out.status.code(),
            Some(0),
            "round {round}: {}",
            describe(&out)
        );
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for (i, r) in readers.into_iter().enumerate() {
        let (lookups, misses) = r.join().unwrap();
        assert!(
            lookups >= 100,
            "node{} reader ran only {lookups} lookups",
            i + 1
        );
        assert!(
            misses.is_empty(),
            "node{} reader missed {} of {lookups}: {:?}",
            i + 1,
            misses.len(),
            &misses[..misses.len().min(5)]
        );
    }
    assert_eq!(c.generations()[0].as_ref().map(|g| g.0), Some(51));
}

#[test]
fn after_a_commit_the_old_live_db_has_link_count_zero() {
    let c = TestCluster::start("nlink", 3).unwrap();
    c.write_source(&transport_table("a.example", 0..10));
    assert_eq!(c.commit(1).status.code(), Some(0));
    // Hold the live .db open as a Postfix daemon does, then commit a new table.
    let olds: Vec<_> = (1..=3)
        .map(|i| std::fs::File::open(c.table_dir(i).join(format!("{TABLE}.db"))).unwrap())
        .collect();
    for f in &olds {
        assert_eq!(f.metadata().unwrap().nlink(), 1);
    }
    c.write_source(&transport_table("b.example", 0..10));
    assert_eq!(c.commit(1).status.code(), Some(0));
    for (i, f) in olds.iter().enumerate() {
        assert_eq!(
            f.metadata().unwrap().nlink(),
            0,
            "node{}: the old .db is still linked",
            i + 1
        );
        let new = std::fs::metadata(c.table_dir(i + 1).join(format!("{TABLE}.db"))).unwrap();
        assert_ne!(new.ino(), f.metadata().unwrap().ino());
    }
}

#[test]
fn committing_the_content_every_node_serves_makes_no_new_generation() {
    let c = TestCluster::start("noop", 3).unwrap();
    c.write_source(&transport_table("noop.example", 0..50));
    assert_eq!(c.commit(1).status.code(), Some(0));
    let before = c.generations();
    let out = c.commit(2);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("already serves this content"),
        "{}",
        describe(&out)
    );
    assert_eq!(
        c.generations(),
        before,
        "a no-op commit made a new generation"
    );
    // A change is committed as usual.
    c.write_source(&transport_table("noop.example", 0..51));
    assert_eq!(c.commit(2).status.code(), Some(0));
    let g = c.generations()[0].clone().expect("status").0;
    assert_eq!(Some(g), before[0].as_ref().map(|x| x.0 + 1));
}

#[test]
fn an_empty_source_or_a_big_shrink_is_refused_unless_forced() {
    let c = TestCluster::start("guard", 3).unwrap();
    c.set_shrink_percent(50);
    c.write_source(&transport_table("guard.example", 0..100));
    assert_eq!(c.commit(1).status.code(), Some(0));
    let before = c.generations();
    // Every list gone: refused, nothing changes anywhere.
    c.write_source("# nothing left\n");
    let out = c.commit(1);
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("all 100 entries"),
        "{}",
        describe(&out)
    );
    assert_eq!(c.generations(), before);
    // 60 % of the entries gone: refused (default max_shrink_percent = 50).
    c.write_source(&transport_table("guard.example", 0..40));
    let out = c.commit(1);
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("60 of the 100"),
        "{}",
        describe(&out)
    );
    assert_eq!(c.generations(), before);
    // The refused change is held, visible as pending (never silently dropped), not retried.
    let status = c.status(1).to_string();
    assert!(status.contains("refused by the content guard"), "{status}");
    // Forced, it goes through, and nothing is left pending.
    let out = c.txmap(1, &["commit", TABLE, "--force"]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let g = c.generations()[0].clone().expect("status").0;
    assert_eq!(Some(g), before[0].as_ref().map(|x| x.0 + 1));
    let status = c.status(1).to_string();
    assert!(!status.contains("\"pending\":{"), "{status}");
}

#[test]
fn two_coordinators_racing_on_one_table_never_deadlock_and_generations_increase() {
    let c = TestCluster::start("race", 3).unwrap();
    c.write_source(&transport_table("race.example", 0..2000));
    assert_eq!(c.commit(1).status.code(), Some(0));
    let mut last = 1u64;
    let mut committed = 0;
    for round in 0..5 {
        // A new content each round (the same content again is no work: no new generation).
        c.write_source(&transport_table("race.example", 0..(2001 + round)));
        let started = Instant::now();
        let a = c.spawn_txmap(1, &["commit", TABLE]);
        let b = c.spawn_txmap(2, &["commit", TABLE]);
        let (a, b) = (a.wait_with_output().unwrap(), b.wait_with_output().unwrap());
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "round {round} took {:?}",
            started.elapsed()
        );
        for o in [&a, &b] {
            let code = o.status.code();
            assert!(
                code == Some(0) || code == Some(4),
                "round {round}: {}",
                describe(o)
            );
            if code == Some(0) {
                committed += 1;
            }
        }
        let gens = c.generations();
        let g = gens[0].clone().expect("status").0;
        assert!(
            gens.iter().all(|x| x.as_ref().map(|x| x.0) == Some(g)),
            "round {round}: nodes disagree: {gens:?}"
        );
        assert!(g > last, "round {round}: generation {g} not above {last}");
        last = g;
        assert_clean(&c);
    }
    assert!(
        committed >= 5,
        "only {committed} of 10 racing commits succeeded"
    );
}

#[test]
fn a_table_verified_by_sample_commits_and_a_broken_build_still_aborts() {
    let mut c = TestCluster::create("sample", 3).unwrap();
    for i in 1..=3 {
        c.edit_config(i, |s| {
            s.replacen(
                "builder = \"postmap\"\n",
                "builder = \"postmap\"\nverify = \"sample\"\n",
                1,
            )
        });
        c.start_node(i).unwrap();
    }
    c.write_source(&transport_table("lists.example.org", 0..5000));
    let out = c.commit(1);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let all = keys("lists.example.org", 0..5000);
    for i in 1..=3 {
        assert!(
            c.lookup(i, &all).unwrap().iter().all(|v| v.is_some()),
            "node{i}"
        );
    }
    // A line postmap warns about still fails the build on every node (the content guard is
    // forced past: this checks the build, not the guard).
    c.write_source(&format!(
        "{}bad-line-without-value\n",
        transport_table("x.example", 0..10)
    ));
    let out = c.txmap(1, &["commit", TABLE, "--force"]);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("expected format"),
        "{}",
        describe(&out)
    );
    assert_clean(&c);
}
