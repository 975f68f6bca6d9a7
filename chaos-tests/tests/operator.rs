//! Operator experience (issue 12), with real processes: `txmap check` run as an unprivileged
//! user, `check-config` and `txmapd` on bad configs, one txmapd per state directory, `SIGHUP`,
//! pending work, rollback. (The content guard's empty source and 60 % shrink are in
//! `core.rs`, `the_content_guard_refuses_an_empty_source_and_a_big_shrink`.)

use anyhow::Result;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};
use txmap_chaos_tests::cluster::{bins, describe, transport_table, wait_until, TestCluster, TABLE};

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Polls `txmap check` until its line satisfies `want`; returns the last output.
fn check_until(
    c: &TestCluster,
    i: usize,
    limit: Duration,
    want: impl Fn(&Output) -> bool,
) -> Output {
    let until = Instant::now() + limit;
    loop {
        let o = c.check_as_nobody(i, &[]);
        if want(&o) || Instant::now() > until {
            return o;
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}

fn state_of(o: &Output) -> Option<i32> {
    o.status.code()
}

#[test]
fn check_as_an_unprivileged_user_sees_ok_in_doubt_stuck_and_down() {
    // A short in-doubt bound, so that a coordinator frozen after the prepares shows.
    let mut c = TestCluster::start_edited("op-check", 3, |_, t| {
        t.replace(
            "commit_ms = 2000\n",
            "commit_ms = 2000\nin_doubt_ms = 4000\n",
        )
    })
    .unwrap();
    c.write_source(&transport_table("check.example", 0..50));
    assert_eq!(c.commit(1).status.code(), Some(0));

    // Healthy: OK, one line, with perfdata.
    let o = check_until(&c, 1, Duration::from_secs(10), |o| state_of(o) == Some(0));
    let line = String::from_utf8_lossy(&o.stdout).to_string();
    assert_eq!(o.status.code(), Some(0), "{}", describe(&o));
    assert!(
        line.starts_with("TXMAP OK - 3 in-service node(s) agree"),
        "{line}"
    );
    assert!(
        line.contains(" | nodes_in_service=3 nodes_unreachable=0"),
        "{line}"
    );
    assert_eq!(line.lines().count(), 1, "{line}");

    // In doubt: every node prepared, the coordinator frozen before deciding.
    c.write_source(&transport_table("check.example", 0..51));
    let mut frozen = c.spawn_txmap_with(
        1,
        &["commit", TABLE],
        &[("FAILPOINTS", "coordinator::after_all_prepared=sleep(9000)")],
    );
    let o = check_until(&c, 1, Duration::from_secs(12), |o| state_of(o) == Some(2));
    let line = String::from_utf8_lossy(&o.stdout).to_string();
    assert_eq!(o.status.code(), Some(2), "{}", describe(&o));
    assert!(line.contains("in doubt"), "{line}");
    let _ = frozen.wait();
    assert!(wait_until(Duration::from_secs(20), || c.nothing_in_progress(1)));

    // Stuck: content that postmap rejects fails on every node and stays pending, held.
    c.write_source("good@check.example ok\nlonelykey\n");
    let _ = c.txmap(1, &["commit", TABLE, "--force"]);
    let o = check_until(&c, 1, Duration::from_secs(10), |o| state_of(o) == Some(1));
    let line = String::from_utf8_lossy(&o.stdout).to_string();
    assert_eq!(o.status.code(), Some(1), "{}", describe(&o));
    assert!(line.contains("held until the source changes"), "{line}");
    let st = c.txmap(1, &["status", TABLE]);
    assert_eq!(
        st.status.code(),
        Some(8),
        "status must flag stuck work: {}",
        describe(&st)
    );
    let p = c.txmap(1, &["pending"]);
    assert!(
        text(&p).contains("held: source unchanged"),
        "{}",
        describe(&p)
    );
    // Not retried while the source is unchanged.
    let attempts = |c: &TestCluster| {
        let o = c.txmap(1, &["pending", "--json"]);
        serde_json::from_slice::<serde_json::Value>(&o.stdout).unwrap_or_default()[0]["attempts"]
            .as_u64()
    };
    let before = attempts(&c);
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(attempts(&c), before, "a held change was retried");
    let o = c.txmap(1, &["pending", "cancel", TABLE]);
    assert_eq!(o.status.code(), Some(0), "{}", describe(&o));
    let o = check_until(&c, 1, Duration::from_secs(10), |o| state_of(o) == Some(0));
    assert_eq!(o.status.code(), Some(0), "{}", describe(&o));

    // A node down: CRITICAL, naming it; Prometheus text says the same.
    c.kill_node(3);
    let o = check_until(&c, 1, Duration::from_secs(12), |o| state_of(o) == Some(2));
    let line = String::from_utf8_lossy(&o.stdout).to_string();
    assert_eq!(o.status.code(), Some(2), "{}", describe(&o));
    assert!(line.contains("node3 unreachable"), "{line}");
    let prom = c.check_as_nobody(1, &["--prometheus"]);
    let body = String::from_utf8_lossy(&prom.stdout).to_string();
    assert_eq!(prom.status.code(), Some(0), "{}", describe(&prom));
    assert!(
        body.contains("txmap_node_reachable{node=\"node3\"} 0\n"),
        "{body}"
    );
    assert!(body.contains("txmap_check_state 2\n"), "{body}");
    // Its own txmapd down: CRITICAL, not a crash of the plugin.
    let o = c.check_as_nobody(3, &[]);
    assert_eq!(o.status.code(), Some(2), "{}", describe(&o));
    assert!(
        text(&o).contains("txmapd not answering"),
        "{}",
        describe(&o)
    );
}

/// Runs `txmap check-config` and `txmapd` on node 1's config; both must refuse, naming `key`
/// and `what`.
fn assert_refused(c: &TestCluster, key: &str, what: &str) {
    let o = c.txmap(1, &["check-config"]);
    let t = text(&o);
    assert_eq!(
        o.status.code(),
        Some(2),
        "check-config passed {key}: {}",
        describe(&o)
    );
    assert!(
        t.contains(&format!("`{key}`")) && t.contains(what),
        "check-config on {key}: {}",
        describe(&o)
    );
    let mut child = Command::new(&bins().txmapd)
        .arg("--config")
        .arg(c.config(1))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn txmapd");
    let until = Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Ok(Some(s)) = child.try_wait() {
            break Some(s);
        }
        if Instant::now() > until {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let out = child.wait_with_output().expect("txmapd output");
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(2),
        "txmapd started with bad {key}: {err}"
    );
    assert!(err.contains(&format!("`{key}`")), "txmapd on {key}: {err}");
}

#[test]
fn check_config_reports_every_bad_setting_in_one_pass_and_txmapd_refuses_them() {
    let mut c = TestCluster::create("op-config", 2).unwrap();
    let good = std::fs::read_to_string(c.config(1)).unwrap();
    let n1 = c.node_dir(1);
    let tls = n1.join("tls");
    let set = |c: &TestCluster, f: &dyn Fn(&str) -> String| {
        c.edit_config(1, |_| f(&good));
    };
    let o = c.txmap(1, &["check-config"]);
    assert_eq!(o.status.code(), Some(0), "{}", describe(&o));

    let cert = tls.join("node1.pem").display().to_string();
    let key = tls.join("node1.key").display().to_string();
    // An unparsable certificate.
    let junk = tls.join("junk.pem");
    std::fs::write(
        &junk,
        "-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    set(&c, &|g| g.replace(&cert, &junk.display().to_string()));
    assert_refused(&c, "tls.cert", "junk.pem");
    // The key of another node: mismatch.
    let key2 = c.node_dir(2).join("tls/node2.key").display().to_string();
    set(&c, &|g| g.replace(&key, &key2));
    assert_refused(&c, "tls.key", "is not the key of the certificate");
    // The certificate (and key) of another node: name mismatch.
    let cert2 = c.node_dir(2).join("tls/node2.pem").display().to_string();
    set(&c, &|g| g.replace(&cert, &cert2).replace(&key, &key2));
    assert_refused(&c, "tls.cert", "names node2 but this node is `node1`");
    // A certificate from another CA.
    let other = c.root().join("other-ca");
    txmap_common::tls::init_ca(&other).unwrap();
    txmap_common::tls::issue_node(&other, "node1", &c.root().join("other-certs")).unwrap();
    let ocert = c.root().join("other-certs/node1.pem").display().to_string();
    let okey = c.root().join("other-certs/node1.key").display().to_string();
    set(&c, &|g| g.replace(&cert, &ocert).replace(&key, &okey));
    assert_refused(&c, "tls.cert", "is not issued by the CA");
    // A key readable by others.
    set(&c, &|g| g.to_string());
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    assert_refused(&c, "tls.key", "mode 0644");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    // An unknown hook group.
    set(&c, &|g| {
        g.replace("[hook]\n", "[hook]\ngroup = \"no-such-group-txmap\"\n")
    });
    assert_refused(&c, "hook.group", "not found in /etc/group");
    // `listen` on another port than the node's own address.
    let port = c.base_port;
    set(&c, &|g| {
        g.replacen(
            &format!("listen = \"127.0.0.1:{port}\""),
            &format!("listen = \"127.0.0.1:{}\"", port + 50),
            1,
        )
    });
    assert_refused(&c, "listen", "does not match this node's own address");
    // `path` equal to `source`.
    let live = c.live(1).display().to_string();
    let source = c.source().display().to_string();
    set(&c, &|g| {
        g.replace(
            &format!("source = \"{source}\""),
            &format!("source = \"{live}\""),
        )
    });
    assert_refused(&c, "tables[0].source", "the same file");
    // `state_dir` a file.
    let file = n1.join("state-file");
    std::fs::write(&file, "").unwrap();
    let state = c.state_dir(1).display().to_string();
    set(&c, &|g| {
        g.replace(
            &format!("state_dir = \"{state}\""),
            &format!("state_dir = \"{}\"", file.display()),
        )
    });
    assert_refused(&c, "state_dir", "is not a directory");
    // A table directory read-only: `check-config` reports it, but txmapd starts and serves
    // its other tables (that table's commits are refused, or retried once decided: issue 9).
    set(&c, &|g| g.to_string());
    c.make_unwritable(1).unwrap();
    let o = c.txmap(1, &["check-config"]);
    assert_eq!(o.status.code(), Some(2), "{}", describe(&o));
    assert!(
        text(&o).contains("`tables[0].path`") && text(&o).contains("is not writable"),
        "{}",
        describe(&o)
    );
    c.start_node(1)
        .expect("txmapd starts with one table directory unwritable");
    c.kill_node(1);
    c.make_writable(1).unwrap();
    // Timeouts that contradict each other.
    set(&c, &|g| g.replace("connect_ms = 1500", "connect_ms = 9500"));
    assert_refused(&c, "timeouts.connect_ms", "must be below total_ms");
    // A type error names its key.
    set(&c, &|g| g.replace("[tls]", "history_keep = \"ten\"\n[tls]"));
    assert_refused(&c, "history_keep", "invalid type");
    // Several problems: one pass, one format, each with its key.
    set(&c, &|g| {
        g.replace(&cert, &junk.display().to_string())
            .replace("[hook]\n", "[hook]\ngroup = \"no-such-group-txmap\"\n")
    });
    let o = c.txmap(1, &["check-config"]);
    let t = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(
        t.contains("2 problem(s)") || t.contains("3 problem(s)"),
        "{t}"
    );
    assert!(
        t.contains("key `tls.cert`") && t.contains("key `hook.group`"),
        "{t}"
    );
}

#[test]
fn a_second_txmapd_on_the_same_state_refuses_and_the_first_keeps_serving() {
    let c = TestCluster::start("op-lock", 2).unwrap();
    c.write_source(&transport_table("lock.example", 0..20));
    assert_eq!(c.commit(1).status.code(), Some(0));
    let sock = c.state_dir(1).join("txmapd.sock");
    let ino = |p: &Path| std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(p).unwrap());
    let before = ino(&sock);
    // Same state directory, another port (its own address moved too, so the config is valid).
    let port = c.base_port;
    let text = std::fs::read_to_string(c.config(1)).unwrap().replace(
        &format!("127.0.0.1:{port}\""),
        &format!("127.0.0.1:{}\"", port + 60),
    );
    let second = c.node_dir(1).join("second.toml");
    std::fs::write(&second, text).unwrap();
    let out = Command::new(&bins().txmapd)
        .arg("--config")
        .arg(&second)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(6), "second txmapd: {err}");
    assert!(err.contains("another txmapd (pid"), "{err}");
    // The first still owns its hook socket and serves it.
    assert_eq!(ino(&sock), before, "the hook socket was replaced");
    c.write_source(&transport_table("lock.example", 0..21));
    let hook = Command::new(&bins().txmap_sympa)
        .arg("--config")
        .arg(c.config(1))
        .arg(c.source())
        .output()
        .unwrap();
    assert_eq!(hook.status.code(), Some(0), "{}", describe(&hook));
}

#[test]
fn sighup_takes_a_node_out_of_service_without_a_restart() {
    let mut c = TestCluster::start("op-hup", 3).unwrap();
    c.write_source(&transport_table("hup.example", 0..20));
    assert_eq!(c.commit(1).status.code(), Some(0));
    let pid = c.pid(1);
    c.kill_node(3);
    for i in 1..=2 {
        c.edit_config(i, |t| c.out_of_service(t, 3));
        c.signal(i, libc::SIGHUP);
    }
    for i in 1..=2 {
        assert!(
            wait_until(Duration::from_secs(10), || std::fs::read_to_string(
                c.log(i)
            )
            .unwrap_or_default()
            .contains("config reloaded")),
            "node{i} did not reload"
        );
    }
    // The hook's commit runs inside txmapd: it now skips node3 (before the reload it would
    // have tried node3 and aborted).
    c.write_source(&transport_table("hup.example", 0..21));
    let hook = Command::new(&bins().txmap_sympa)
        .arg("--config")
        .arg(c.config(1))
        .arg(c.source())
        .output()
        .unwrap();
    assert_eq!(hook.status.code(), Some(0), "{}", describe(&hook));
    assert!(!text(&hook).contains("node3"), "{}", describe(&hook));
    assert_eq!(c.pid(1), pid, "txmapd was restarted");
    let o = check_until(&c, 1, Duration::from_secs(10), |o| {
        String::from_utf8_lossy(&o.stdout).contains("out of service")
    });
    assert_eq!(o.status.code(), Some(0), "{}", describe(&o));
    // A bad config is not applied: the daemon keeps serving with the old one.
    c.edit_config(1, |t| t.replace("[tls]", "history_keep = 0\n[tls]"));
    c.signal(1, libc::SIGHUP);
    assert!(wait_until(Duration::from_secs(10), || {
        std::fs::read_to_string(c.log(1))
            .unwrap_or_default()
            .contains("config not reloaded")
    }));
    assert_eq!(c.txmap(2, &["status", TABLE]).status.code(), Some(0));
}

#[test]
fn a_rollback_names_the_generation_it_restores_and_a_no_op_is_refused() -> Result<()> {
    let c = TestCluster::start("op-rollback", 2)?;
    let a = transport_table("rb.example", 0..20);
    let b = transport_table("rb.example", 0..25);
    for content in [&a, &b, &a] {
        c.write_source(content);
        assert_eq!(c.commit(1).status.code(), Some(0));
    }
    // Generation 3 serves A again: rolling back to generation 1 (A) would change nothing.
    let o = c.txmap(1, &["rollback", TABLE, "--to", "1"]);
    assert_eq!(o.status.code(), Some(2), "{}", describe(&o));
    assert!(
        text(&o).contains("would change nothing"),
        "{}",
        describe(&o)
    );
    // Without --to: the newest earlier generation with other content, named.
    let o = c.txmap(1, &["rollback", TABLE]);
    assert_eq!(o.status.code(), Some(0), "{}", describe(&o));
    assert!(
        text(&o).contains("restoring the content of generation 2"),
        "{}",
        describe(&o)
    );
    // diff and dry run show what a commit of A would do, and change nothing.
    c.write_source(&a);
    let d = c.txmap(1, &["diff", TABLE]);
    assert!(
        text(&d).contains("0 added, 5 removed, 0 changed, 20 unchanged"),
        "{}",
        describe(&d)
    );
    let before = c.generations();
    let o = c.txmap(1, &["commit", TABLE, "--dry-run"]);
    assert_eq!(o.status.code(), Some(0), "{}", describe(&o));
    assert!(text(&o).contains("would commit"), "{}", describe(&o));
    assert_eq!(c.generations(), before);
    Ok(())
}
