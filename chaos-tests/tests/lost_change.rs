//! Guarantee 6 around the commit: a change Sympa (or an operator) made is never lost or
//! silently dropped. Real processes, real `postmap`, real QUIC on loopback:
//!
//! - no clock orders changes: a node whose clock is seconds ahead (or a clock stepped back)
//!   never makes a later change "superseded" (the clock is moved with libfaketime, from
//!   outside the binaries);
//! - a request waiting behind a group commit survives txmapd killed at that moment;
//! - with txmapd run as a dedicated user and the hook as another, a request queued while
//!   txmapd is down is distributed when it starts;
//! - closing the last list (a source with no entries) is distributed; a change that replaces
//!   most keys, however many entries it keeps, is held by the guard and shown as pending.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers: a panic is a test failure

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;
use txmap_chaos_tests::cluster::{
    bins, describe, is_root, transport_table, wait_until, TestCluster, TABLE,
};

/// libfaketime, as Debian's `libfaketime` package installs it.
const FAKETIME: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1";

/// The environment that moves a process's wall clock by `offset` (libfaketime syntax, e.g.
/// `+2s`), leaving its monotonic clock alone (timers and deadlines stay true).
fn clock(offset: &'static str) -> Vec<(&'static str, &'static str)> {
    vec![
        ("LD_PRELOAD", FAKETIME),
        ("FAKETIME", offset),
        ("FAKETIME_DONT_FAKE_MONOTONIC", "1"),
        ("FAKETIME_NO_CACHE", "1"),
    ]
}

fn faketime_missing() -> bool {
    if Path::new(FAKETIME).exists() {
        return false;
    }
    eprintln!(
        "skipped: {FAKETIME} missing (Debian package libfaketime; scripts/setup.sh installs it)"
    );
    true
}

/// True when every node's live table answers `key` with `value`.
fn everywhere(c: &TestCluster, key: &str, value: Option<&str>) -> bool {
    (1..=c.n).all(|i| c.lookup(i, &[key.to_string()]).ok() == Some(vec![value.map(str::to_string)]))
}

fn wait_everywhere(c: &TestCluster, key: &str, value: Option<&str>, limit: Duration) -> bool {
    wait_until(limit, || everywhere(c, key, value))
}

/// `txmap-sympa PATH` as Sympa runs it: one argument, the environment cleared, as `user` (with
/// `group`, no other group) when given, with node `i`'s config.
fn hook_command(c: &TestCluster, i: usize, user: Option<(&str, &str)>) -> Command {
    let mut cmd = match user {
        Some((u, g)) => {
            let mut cmd = Command::new("setpriv");
            cmd.arg(format!("--reuid={u}"))
                .arg(format!("--regid={g}"))
                .arg("--clear-groups")
                .arg("env");
            cmd
        }
        None => Command::new("env"),
    };
    cmd.args(["-i", "PATH=/bin:/usr/bin"])
        .arg(format!("TXMAP_CONFIG={}", c.config(i).display()))
        .arg(&bins().txmap_sympa)
        .arg(c.source())
        .stdin(Stdio::null());
    cmd
}

/// [`hook_command`], run to its end.
fn hook_as(c: &TestCluster, i: usize, user: Option<(&str, &str)>) -> Output {
    hook_command(c, i, user).output().unwrap()
}

/// [`hook_command`] of node 1, as the test's user, on a thread of its own.
fn spawn_hook(c: &TestCluster) -> std::thread::JoinHandle<Output> {
    let mut cmd = hook_command(c, 1, None);
    std::thread::spawn(move || cmd.output().unwrap())
}

fn line(name: &str) -> String {
    format!("{name}@lists.example.org\tsympa:{name}@lists.example.org\n")
}

#[test]
fn a_node_whose_clock_is_ahead_never_makes_a_later_change_superseded() {
    if faketime_missing() {
        return;
    }
    let c = TestCluster::start("lost-clock", 3).unwrap();
    let base = transport_table("lists.example.org", 0..5);
    c.write_source(&base);
    assert_eq!(c.commit(1).status.code(), Some(0));

    // Node2's clock is 2 s ahead: it commits A.
    c.write_source(&(base.clone() + &line("from-node2")));
    let out = c.txmap_with(2, &["commit", TABLE], &clock("+2s"));
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    assert!(wait_everywhere(
        &c,
        "from-node2@lists.example.org",
        Some("sympa:from-node2@lists.example.org"),
        Duration::from_secs(5)
    ));

    // Then node1 commits B at once: B is a later change and must win.
    let b = base.clone() + &line("from-node2") + &line("from-node1");
    c.write_source(&b);
    let out = c.commit(1);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    assert!(
        !String::from_utf8_lossy(&out.stderr).contains("superseded")
            && !String::from_utf8_lossy(&out.stdout).contains("superseded"),
        "a change of another node's source never supersedes this one: {}",
        describe(&out)
    );
    assert!(
        everywhere(
            &c,
            "from-node1@lists.example.org",
            Some("sympa:from-node1@lists.example.org")
        ),
        "every node serves node1's later change B"
    );

    // The hook on node1 sends C: served everywhere too, the hook exits 0 only then.
    c.write_source(&(b.clone() + &line("from-hook")));
    let out = hook_as(&c, 1, None);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    assert!(everywhere(
        &c,
        "from-hook@lists.example.org",
        Some("sympa:from-hook@lists.example.org")
    ));

    // Node1's clock stepped back 5 s (NTP after a resume): its own later change still wins.
    c.write_source(&(b + &line("after-step")));
    let out = c.txmap_with(1, &["commit", TABLE], &clock("-5s"));
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    assert!(
        everywhere(
            &c,
            "after-step@lists.example.org",
            Some("sympa:after-step@lists.example.org")
        ),
        "a clock stepped back never drops this node's own later change: {}",
        describe(&out)
    );
    assert!(!everywhere(
        &c,
        "from-hook@lists.example.org",
        Some("sympa:from-hook@lists.example.org")
    ));
}

#[test]
fn a_request_waiting_behind_a_group_commit_survives_txmapd_killed_then() {
    let mut c = TestCluster::create("lost-group", 3).unwrap();
    for i in 2..=3 {
        c.start_node(i).unwrap();
    }
    // Node1's txmapd pauses after each hook commit, before it tidies the queue: the window in
    // which a request waiting behind it exists only as its queued file and a temporary copy.
    c.start_node_with(1, &[("FAILPOINTS", "hook::after_commit=sleep(4000)")])
        .unwrap();
    let base = transport_table("lists.example.org", 0..5);
    c.write_source(&(base.clone() + &line("first")));
    let first = spawn_hook(&c);
    assert!(wait_everywhere(
        &c,
        "first@lists.example.org",
        Some("sympa:first@lists.example.org"),
        Duration::from_secs(10)
    ));
    // The first request's commit is done; txmapd sits in the pause. A second request comes.
    c.write_source(&(base.clone() + &line("first") + &line("second")));
    let second = spawn_hook(&c);
    std::thread::sleep(Duration::from_millis(700));
    c.kill_node(1);
    let (a, b) = (first.join().unwrap(), second.join().unwrap());
    assert_ne!(a.status.code(), None);
    assert_eq!(
        b.status.code(),
        Some(6),
        "txmapd died under it: {}",
        describe(&b)
    );
    c.start_node(1).unwrap();
    assert!(
        wait_everywhere(
            &c,
            "second@lists.example.org",
            Some("sympa:second@lists.example.org"),
            Duration::from_secs(20)
        ),
        "the second request is distributed after the restart: {}",
        std::fs::read_to_string(c.log(1)).unwrap_or_default()
    );
    // Nothing left queued or pending once it is served.
    assert!(wait_until(Duration::from_secs(10), || {
        let p = c.txmap(1, &["pending", "--json"]);
        let v: serde_json::Value = serde_json::from_slice(&p.stdout).unwrap_or_default();
        v.as_array().is_some_and(|a| a.is_empty())
    }));
    let left: Vec<_> = std::fs::read_dir(c.state_dir(1).join("requests"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !n.ends_with("@seen"))
        .collect();
    assert!(left.is_empty(), "requests left: {left:?}");
}

#[test]
fn a_change_queued_while_txmapd_is_down_is_distributed_with_the_packaged_users() {
    if !is_root() {
        eprintln!("skipped: needs root to run txmapd and the hook as two other users");
        return;
    }
    let mut c = TestCluster::create("lost-users", 3).unwrap();
    c.set_daemon_user(Some("txmap-test"));
    for i in 1..=3 {
        c.start_node(i).unwrap();
    }
    let base = transport_table("lists.example.org", 0..5);
    c.write_source(&base);
    let out = hook_as(&c, 1, Some(("nobody", "nogroup")));
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    // txmapd down on node1; Sympa creates a list: the hook queues it and says so (exit 6).
    c.kill_node(1);
    c.write_source(&(base + &line("queued")));
    let out = hook_as(&c, 1, Some(("nobody", "nogroup")));
    assert_eq!(out.status.code(), Some(6), "{}", describe(&out));
    assert!(
        describe(&out).contains("stays queued"),
        "{}",
        describe(&out)
    );
    c.start_node(1).unwrap();
    assert!(
        wait_everywhere(
            &c,
            "queued@lists.example.org",
            Some("sympa:queued@lists.example.org"),
            Duration::from_secs(20)
        ),
        "the queued change reaches every node: {}",
        std::fs::read_to_string(c.log(1)).unwrap_or_default()
    );
    let log = std::fs::read_to_string(c.log(1)).unwrap_or_default();
    assert!(!log.contains("Permission denied"), "{log}");
    assert!(
        !log.contains("chown -R"),
        "requests of the hook's user are by design: {log}"
    );
}

#[test]
fn closing_the_last_list_is_distributed_and_a_change_of_most_keys_is_held_visibly() {
    let mut c = TestCluster::create("lost-guard", 3).unwrap();
    c.set_shrink_percent(50);
    for i in 1..=3 {
        c.start_node(i).unwrap();
    }
    // Sympa's table with one list, then the list closed: a source with no entries.
    c.write_source(&("# sympa_transport\n".to_string() + &line("only") + &line("only-request")));
    let out = hook_as(&c, 1, None);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    assert!(everywhere(
        &c,
        "only@lists.example.org",
        Some("sympa:only@lists.example.org")
    ));
    c.write_source("# sympa_transport\n");
    let out = hook_as(&c, 1, None);
    assert_eq!(
        out.status.code(),
        Some(0),
        "closing the last list: {}",
        describe(&out)
    );
    assert!(
        everywhere(&c, "only@lists.example.org", None),
        "the closed list is served nowhere"
    );

    // 100 keys; then 60 of them replaced by 60 others: the same count, 60 % of the keys gone.
    let names = |r: std::ops::Range<usize>| r.map(|k| line(&format!("l{k}"))).collect::<String>();
    c.write_source(&names(0..100));
    assert_eq!(c.commit(1).status.code(), Some(0));
    c.write_source(&(names(60..100) + &names(100..160)));
    let out = hook_as(&c, 1, None);
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
    let text = describe(&out);
    assert!(text.contains("60 of the 100"), "{text}");
    assert!(
        text.contains("held") && !text.contains("retries it until it is"),
        "{text}"
    );
    assert!(everywhere(
        &c,
        "l0@lists.example.org",
        Some("sympa:l0@lists.example.org")
    ));
    // The held change is visible: `txmap pending` lists it as held.
    let p = c.txmap(1, &["pending", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&p.stdout).unwrap_or_default();
    let held = v.as_array().is_some_and(|a| {
        a.iter()
            .any(|r| r["table"] == TABLE && !r["held"].is_null())
    });
    assert!(held, "pending: {}", describe(&p));
}
