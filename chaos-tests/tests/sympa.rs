//! The Sympa hook and a real Postfix: mail to an existing list is never refused.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers: a panic is a test failure

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};
use txmap_chaos_tests::cluster::{bins, describe, is_root, wait_until, TestCluster};
use txmap_chaos_tests::postfix::{
    self, Map, PostfixInstance, PostfixTables, ProbeLoop, LIST_DOMAIN,
};

const ALIAS_DOMAIN: &str = "aliases.example.org";

/// Runs `txmap-sympa ARG` as Sympa does: one argument, environment cleared to
/// `PATH=/bin:/usr/bin`, as an unprivileged user, with the default config path. As root that is
/// done in a private mount namespace where node `i`'s directory is bind-mounted on
/// `/etc/txmap`, then `setpriv` to `nobody`; as a normal user, `TXMAP_CONFIG` names the file.
fn hook(c: &TestCluster, i: usize, arg: &str) -> Output {
    let bin = &bins().txmap_sympa;
    if is_root() {
        std::fs::create_dir_all("/etc/txmap").unwrap();
        Command::new("unshare")
            .args(["-m", "--propagation", "private", "sh", "-c"])
            .arg(
                "mount --bind \"$1\" /etc/txmap && exec setpriv --reuid=nobody --regid=nogroup --clear-groups \
                 env -i PATH=/bin:/usr/bin \"$2\" \"$3\"",
            )
            .arg("sh")
            .arg(c.node_dir(i))
            .arg(bin)
            .arg(arg)
            .output()
            .unwrap()
    } else {
        Command::new("env")
            .args(["-i", "PATH=/bin:/usr/bin"])
            .arg(format!("TXMAP_CONFIG={}", c.config(i).display()))
            .arg(bin)
            .arg(arg)
            .output()
            .unwrap()
    }
}

fn shared(c: &TestCluster, name: &str) -> std::path::PathBuf {
    c.root().join("shared").join(name)
}

fn transport_text(names: &[String]) -> String {
    postfix::sympa_transport_text(LIST_DOMAIN, names)
}

fn aliases_text(names: &[String]) -> String {
    let mut s = String::from("# sympa_aliases\n");
    for n in names {
        s.push_str(&format!(
            "{n}: \"| /usr/lib/sympa/bin/queue {n}@{LIST_DOMAIN}\"\n"
        ));
        s.push_str(&format!(
            "{n}-request: \"| /usr/lib/sympa/bin/queue {n}-request@{LIST_DOMAIN}\"\n"
        ));
    }
    s
}

fn node_has(c: &TestCluster, i: usize, table: &str, key: &str) -> bool {
    let (tool, live) = (
        if table == "sympa_aliases" {
            "postalias"
        } else {
            "postmap"
        },
        c.table_dir(i).join(table),
    );
    Command::new(tool)
        .arg("-c")
        .arg(c.table_dir(i))
        .args(["-q", key])
        .arg(format!("hash:{}", live.display()))
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

#[test]
fn the_hook_run_as_sympa_runs_it_reaches_every_node() {
    let c = TestCluster::start("hook", 3).unwrap();
    let names: Vec<String> = (0..100).map(|i| format!("list{i}")).collect();
    std::fs::write(shared(&c, "sympa_transport"), transport_text(&names)).unwrap();
    std::fs::write(shared(&c, "sympa_aliases"), aliases_text(&names)).unwrap();
    let started = Instant::now();
    let out = hook(&c, 1, &shared(&c, "sympa_transport").display().to_string());
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    // `type:path`, as postmap accepts it, for the postalias table.
    let out = hook(
        &c,
        1,
        &format!("hash:{}", shared(&c, "sympa_aliases").display()),
    );
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    assert!(started.elapsed() < Duration::from_secs(10));
    for i in 1..=3 {
        assert!(
            node_has(&c, i, "sympa_transport", &format!("list99@{LIST_DOMAIN}")),
            "node{i} transport"
        );
        assert!(
            node_has(&c, i, "sympa_aliases", "list99-request"),
            "node{i} aliases"
        );
    }
    // A path no table has: a clear error, nothing changes.
    let out = hook(&c, 1, "/etc/sympa/unknown_table");
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no table in"),
        "{}",
        describe(&out)
    );
}

#[test]
fn with_a_node_down_the_hook_fails_fast_and_the_list_arrives_by_itself() {
    let mut c = TestCluster::start("hook-down", 3).unwrap();
    let src = shared(&c, "sympa_transport").display().to_string();
    std::fs::write(
        shared(&c, "sympa_transport"),
        transport_text(&["old".into()]),
    )
    .unwrap();
    assert_eq!(hook(&c, 1, &src).status.code(), Some(0));
    c.kill_node(3);
    std::fs::write(
        shared(&c, "sympa_transport"),
        transport_text(&["old".into(), "newlist".into()]),
    )
    .unwrap();
    let started = Instant::now();
    let out = hook(&c, 1, &src);
    let took = started.elapsed();
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert!(took < Duration::from_secs(10), "hook took {took:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("node3"),
        "{}",
        describe(&out)
    );
    c.start_node(3).unwrap();
    let key = format!("newlist@{LIST_DOMAIN}");
    assert!(
        wait_until(Duration::from_secs(40), || (1..=3).all(|i| node_has(
            &c,
            i,
            "sympa_transport",
            &key
        ))),
        "the new list never reached every node: {}",
        c.status(1)
    );
}

#[test]
fn a_request_made_while_the_local_daemon_is_down_is_not_lost() {
    let mut c = TestCluster::start("hook-nodaemon", 3).unwrap();
    let src = shared(&c, "sympa_transport").display().to_string();
    c.kill_node(1);
    std::fs::write(
        shared(&c, "sympa_transport"),
        transport_text(&["queued".into()]),
    )
    .unwrap();
    let out = hook(&c, 1, &src);
    assert_eq!(out.status.code(), Some(6), "{}", describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("stays queued"),
        "{}",
        describe(&out)
    );
    c.start_node(1).unwrap();
    let key = format!("queued@{LIST_DOMAIN}");
    assert!(
        wait_until(Duration::from_secs(30), || (1..=3).all(|i| node_has(
            &c,
            i,
            "sympa_transport",
            &key
        ))),
        "the queued request was lost: {}",
        c.status(1)
    );
}

/// One workload, two ways of installing the tables, and the same prober against a real Postfix.
#[derive(Debug, Default)]
struct Figures {
    rounds: usize,
    stable_accepted: u64,
    stable_temp_fail: u64,
    stable_refused: u64,
    stable_delayed: u64,
    lookups_per_sec: f64,
    new_lists_refused_after_return: usize,
    closed_lists_accepted_after_return: usize,
}

fn stable_names() -> Vec<String> {
    (0..5).map(|i| format!("stable{i}")).collect()
}

fn names_for_round(r: usize) -> Vec<String> {
    // Each round opens one list and closes the one opened two rounds before.
    let mut v = stable_names();
    v.extend((r.saturating_sub(1)..=r).map(|k| format!("new{k}")));
    v
}

fn stable_rcpts() -> Vec<String> {
    let mut v: Vec<String> = stable_names()
        .iter()
        .map(|n| format!("{n}@{LIST_DOMAIN}"))
        .collect();
    v.extend(
        stable_names()
            .iter()
            .map(|n| format!("{n}-request@{ALIAS_DOMAIN}")),
    );
    v
}

/// Runs `rounds` list changes through `install`, probing Postfix all along.
fn workload(pf: &PostfixInstance, rounds: usize, mut install: impl FnMut(&[String])) -> Figures {
    let prober = ProbeLoop::start(pf.addr(), stable_rcpts()).unwrap();
    let mut f = Figures {
        rounds,
        ..Default::default()
    };
    for r in 0..rounds {
        let names = names_for_round(r);
        install(&names);
        // Once the change has returned, a fresh SMTP session sees it.
        let opened = [
            format!("new{r}@{LIST_DOMAIN}"),
            format!("new{r}-request@{ALIAS_DOMAIN}"),
        ];
        let codes = postfix::probe(pf.addr(), &opened).unwrap();
        f.new_lists_refused_after_return += codes.iter().filter(|c| **c != 250).count();
        if r >= 2 {
            let closed = [
                format!("new{}@{LIST_DOMAIN}", r - 2),
                format!("new{}-request@{ALIAS_DOMAIN}", r - 2),
            ];
            let codes = postfix::probe(pf.addr(), &closed).unwrap();
            f.closed_lists_accepted_after_return += codes.iter().filter(|c| **c == 250).count();
        }
    }
    let stats = prober.stop();
    let t = stats.total();
    f.stable_accepted = t.accepted;
    f.stable_temp_fail = t.temp_fail;
    f.stable_refused = t.refused;
    f.stable_delayed = t.delayed;
    f.lookups_per_sec = stats.lookups_per_sec();
    f
}

#[test]
fn postfix_never_refuses_an_existing_list_while_lists_change_through_the_hook() {
    if let Some(why) = postfix::unavailable() {
        eprintln!("skipped: {why}");
        return;
    }
    // 1. The problem txmap removes: the same workload with plain in-place postmap/postalias.
    let plain = txmap_chaos_tests::cluster::TempDir::new("inplace");
    let conf = postfix::write_tool_config(&plain.0.join("tools")).unwrap();
    let (pt, pa) = (
        Map::hash(plain.0.join("sympa_transport")),
        Map::hash(plain.0.join("sympa_aliases")),
    );
    let write_plain = |names: &[String]| {
        std::fs::write(&pt.path, transport_text(names)).unwrap();
        postfix::postmap(&conf, &pt).unwrap();
        std::fs::write(&pa.path, aliases_text(names)).unwrap();
        postfix::postalias(&conf, &pa).unwrap();
    };
    write_plain(&names_for_round(0));
    let tables = PostfixTables::default()
        .with_transport(pt.clone())
        .with_aliases(pa.clone());
    let pf = PostfixInstance::start(&plain.0.join("postfix"), &tables).unwrap();
    let in_place = workload(&pf, 100, write_plain);
    drop(pf);

    // 2. The same through txmap-sympa, run as Sympa runs it, on a 3-node cluster; Postfix reads
    //    node1's live tables.
    let c = TestCluster::start("e2e", 3).unwrap();
    let (st, sa) = (shared(&c, "sympa_transport"), shared(&c, "sympa_aliases"));
    let write_txmap = |names: &[String]| {
        std::fs::write(&st, transport_text(names)).unwrap();
        let o = hook(&c, 1, &st.display().to_string());
        assert_eq!(o.status.code(), Some(0), "{}", describe(&o));
        std::fs::write(&sa, aliases_text(names)).unwrap();
        let o = hook(&c, 1, &format!("hash:{}", sa.display()));
        assert_eq!(o.status.code(), Some(0), "{}", describe(&o));
        // No node was skipped: the newest list is on every node.
        let newest = names.last().unwrap();
        for i in 1..=3 {
            assert!(
                node_has(&c, i, "sympa_transport", &format!("{newest}@{LIST_DOMAIN}")),
                "node{i}"
            );
            assert!(node_has(&c, i, "sympa_aliases", newest), "node{i}");
        }
    };
    write_txmap(&names_for_round(0));
    let tables = PostfixTables::default()
        .with_transport(Map::hash(c.live(1)))
        .with_aliases(Map::hash(c.table_dir(1).join("sympa_aliases")));
    let pf_dir = c.dir.0.join("postfix");
    let pf = PostfixInstance::start(&pf_dir, &tables).unwrap();
    let txmap = workload(&pf, 25, write_txmap);

    println!("\nRCPT TO for 10 stable list addresses while lists are opened and closed:");
    println!("{:<34} {:>12} {:>12}", "", "in-place", "txmap-sympa");
    let row = |name: &str, a: String, b: String| println!("{name:<34} {a:>12} {b:>12}");
    row(
        "list changes",
        in_place.rounds.to_string(),
        txmap.rounds.to_string(),
    );
    row(
        "stable RCPTs accepted (250)",
        in_place.stable_accepted.to_string(),
        txmap.stable_accepted.to_string(),
    );
    row(
        "stable RCPTs refused (5xx)",
        in_place.stable_refused.to_string(),
        txmap.stable_refused.to_string(),
    );
    row(
        "stable RCPTs temp-failed (4xx)",
        in_place.stable_temp_fail.to_string(),
        txmap.stable_temp_fail.to_string(),
    );
    row(
        "stable RCPTs delayed (>100 ms)",
        in_place.stable_delayed.to_string(),
        txmap.stable_delayed.to_string(),
    );
    row(
        "lookups per second",
        format!("{:.0}", in_place.lookups_per_sec),
        format!("{:.0}", txmap.lookups_per_sec),
    );
    row(
        "new list refused after return",
        in_place.new_lists_refused_after_return.to_string(),
        txmap.new_lists_refused_after_return.to_string(),
    );
    row(
        "closed list accepted after return",
        in_place.closed_lists_accepted_after_return.to_string(),
        txmap.closed_lists_accepted_after_return.to_string(),
    );

    assert!(
        txmap.stable_accepted > 100,
        "the prober barely ran: {txmap:?}"
    );
    assert_eq!(
        txmap.stable_refused + txmap.stable_temp_fail,
        0,
        "an existing list was refused: {txmap:?}"
    );
    assert_eq!(
        txmap.new_lists_refused_after_return, 0,
        "a new list was refused after its commit: {txmap:?}"
    );
    assert_eq!(
        txmap.closed_lists_accepted_after_return, 0,
        "a closed list is still accepted: {txmap:?}"
    );
    let _ = Path::new("/");
}
