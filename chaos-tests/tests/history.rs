//! History, rollback and verify, with real processes and the real postmap.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers: a panic is a test failure

use txmap_chaos_tests::cluster::{describe, transport_table, TestCluster, TABLE};

fn serves(c: &TestCluster, i: usize, domain: &str) -> bool {
    c.lookup(i, &[format!("list3@{domain}")]).unwrap()[0].is_some()
}

fn history(c: &TestCluster) -> Vec<(u64, Vec<String>)> {
    let out = c.txmap(1, &["history", TABLE, "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|g| {
            let nodes = g["nodes"]
                .as_array()
                .unwrap()
                .iter()
                .map(|n| n.as_str().unwrap().to_string())
                .collect();
            (g["entry"]["generation"].as_u64().unwrap(), nodes)
        })
        .collect()
}

#[test]
fn rollback_restores_the_previous_table_everywhere_and_can_itself_be_rolled_back() {
    let c = TestCluster::start("rollback", 3).unwrap();
    c.write_source(&transport_table("a.example", 0..40));
    assert_eq!(c.commit(1).status.code(), Some(0));
    c.write_source(&transport_table("b.example", 0..40));
    assert_eq!(c.commit(1).status.code(), Some(0));

    let out = c.txmap(1, &["rollback", TABLE]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    for i in 1..=3 {
        assert!(
            serves(&c, i, "a.example") && !serves(&c, i, "b.example"),
            "node{i} after rollback"
        );
    }
    let gens = c.generations();
    assert!(
        gens.iter().all(|g| g.as_ref().map(|g| g.0) == Some(3)),
        "{gens:?}"
    );

    let out = c.txmap(1, &["rollback", TABLE]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    for i in 1..=3 {
        assert!(
            serves(&c, i, "b.example") && !serves(&c, i, "a.example"),
            "node{i} after second rollback"
        );
    }
    let all: Vec<String> = (1..=3).map(|i| format!("node{i}")).collect();
    assert_eq!(
        history(&c),
        (1..=4).map(|g| (g, all.clone())).collect::<Vec<_>>()
    );
    // A rolled-back generation's content is byte for byte the original: same sha256.
    let out = c.txmap(1, &["history", TABLE, "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v[0]["entry"]["sha256"], v[2]["entry"]["sha256"]);
    assert_eq!(v[1]["entry"]["sha256"], v[3]["entry"]["sha256"]);
}

#[test]
fn rollback_with_a_node_unreachable_changes_nothing() {
    let mut c = TestCluster::start("rollback-down", 3).unwrap();
    c.write_source(&transport_table("a.example", 0..40));
    assert_eq!(c.commit(1).status.code(), Some(0));
    c.write_source(&transport_table("b.example", 0..40));
    assert_eq!(c.commit(1).status.code(), Some(0));
    c.kill_node(3);
    let out = c.txmap(1, &["rollback", TABLE]);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("node3"),
        "{}",
        describe(&out)
    );
    for i in 1..=2 {
        assert!(
            serves(&c, i, "b.example") && !serves(&c, i, "a.example"),
            "node{i} changed"
        );
    }
    c.start_node(3).unwrap();
    assert!(serves(&c, 3, "b.example"));
    let gens = c.generations();
    assert!(
        gens.iter().all(|g| g.as_ref().map(|g| g.0) == Some(2)),
        "{gens:?}"
    );
}

#[test]
fn verify_reports_a_table_changed_by_hand() {
    let c = TestCluster::start("verify", 3).unwrap();
    c.write_source(&transport_table("a.example", 0..40));
    assert_eq!(c.commit(1).status.code(), Some(0));
    let out = c.txmap(1, &["verify"]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));

    // Someone edits node2's live table and runs postmap by hand.
    let live = c.live(2);
    let mut t = std::fs::read_to_string(&live).unwrap();
    t.push_str("intruder@a.example\tsmtp:elsewhere\n");
    std::fs::write(&live, t).unwrap();
    let st = std::process::Command::new("postmap")
        .arg("-c")
        .arg(c.table_dir(2))
        .arg(format!("hash:{}", live.display()))
        .status()
        .unwrap();
    assert!(st.success());
    let out = c.txmap(1, &["verify", TABLE]);
    assert_eq!(out.status.code(), Some(5), "{}", describe(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with("node2:") && l.contains("DRIFT")),
        "{}",
        describe(&out)
    );
    assert!(!stdout
        .lines()
        .any(|l| (l.starts_with("node1:") || l.starts_with("node3:")) && l.contains("DRIFT")));

    // A .db replaced without its source (here: an empty table) is drift too.
    std::fs::write(c.table_dir(3).join("empty"), "").unwrap();
    let st = std::process::Command::new("postmap")
        .arg("-c")
        .arg(c.table_dir(3))
        .arg(format!("hash:{}", c.table_dir(3).join("empty").display()))
        .status()
        .unwrap();
    assert!(st.success());
    std::fs::rename(
        c.table_dir(3).join("empty.db"),
        c.table_dir(3).join(format!("{TABLE}.db")),
    )
    .unwrap();
    let out = c.txmap(1, &["verify", TABLE]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with("node3:") && l.contains("answers for 0 of")),
        "{}",
        describe(&out)
    );
}

#[test]
fn retention_keeps_k_generations_and_never_the_live_one_out() {
    let mut c = TestCluster::create("retention", 3).unwrap();
    for i in 1..=3 {
        c.edit_config(i, |s| {
            s.replacen("listen =", "history_keep = 3\nlisten =", 1)
        });
        c.start_node(i).unwrap();
    }
    for k in 0..6 {
        c.write_source(&transport_table(&format!("d{k}.example"), 0..20));
        assert_eq!(c.commit(1).status.code(), Some(0));
    }
    // Old generations are dropped just after each commit is acknowledged.
    let gens = || history(&c).iter().map(|g| g.0).collect::<Vec<_>>();
    let until = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while gens() != [4, 5, 6] && std::time::Instant::now() < until {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let h = history(&c);
    assert_eq!(
        h.iter().map(|g| g.0).collect::<Vec<_>>(),
        vec![4, 5, 6],
        "{h:?}"
    );
    for i in 1..=3 {
        let dir = c.node_dir(i).join("state/history").join(TABLE);
        let listing = || {
            let mut held: Vec<String> = std::fs::read_dir(&dir)
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            held.sort();
            held
        };
        let until = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while listing() != ["4", "5", "6"] && std::time::Instant::now() < until {
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        assert_eq!(listing(), vec!["4", "5", "6"], "node{i}");
        // The live generation's history is a hard link to the live source (no copy of a big
        // table on every commit); the older ones are the only links left to theirs.
        use std::os::unix::fs::MetadataExt;
        let (h6, live) = (
            std::fs::metadata(dir.join("6/source")).unwrap(),
            std::fs::metadata(c.table_dir(i).join(TABLE)).unwrap(),
        );
        assert_eq!((h6.ino(), h6.nlink()), (live.ino(), 2), "node{i}");
        for g in ["4", "5"] {
            assert_eq!(
                std::fs::metadata(dir.join(g).join("source"))
                    .unwrap()
                    .nlink(),
                1
            );
        }
        assert!(
            !dir.join("6/indexed").exists(),
            "history keeps sources only"
        );
        assert_eq!(
            std::fs::metadata(c.table_dir(i).join(format!("{TABLE}.db")))
                .unwrap()
                .nlink(),
            1
        );
    }
    // Rolling back to a generation nobody holds any more is refused, clearly.
    let out = c.txmap(1, &["rollback", TABLE, "--to", "2"]);
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("no node holds generation 2"),
        "{}",
        describe(&out)
    );
}
