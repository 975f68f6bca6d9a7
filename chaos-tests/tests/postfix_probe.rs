//! The throwaway Postfix harness against tables built with plain `postmap` (no txmap): a listed
//! recipient is accepted, an unlisted one refused, and rebuilding the live table in place while
//! Postfix reads it is measured (and printed, not asserted: it is timing dependent).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use txmap_chaos_tests::cluster::TempDir;
use txmap_chaos_tests::postfix::{
    self, probe, Map, PostfixInstance, PostfixTables, ProbeLoop, ProbeOptions, LIST_DOMAIN,
};

const LISTS: usize = 2000;

fn skip() -> bool {
    if let Some(why) = postfix::unavailable() {
        eprintln!("SKIPPED: {why}");
        return true;
    }
    false
}

fn addr(name: &str) -> String {
    format!("{name}@{LIST_DOMAIN}")
}

fn list_names(range: std::ops::Range<usize>) -> impl Iterator<Item = String> {
    range.map(|i| format!("list{i}"))
}

/// Writes `dir/tables/sympa_transport` with lists 0..LISTS, builds it with `postmap`, and
/// returns `(tool config dir, table)`.
fn build_table(dir: &Path) -> anyhow::Result<(PathBuf, Map)> {
    let tools = postfix::write_tool_config(&dir.join("tools"))?;
    let tables = dir.join("tables");
    std::fs::create_dir_all(&tables)?;
    let map = Map::hash(tables.join("sympa_transport"));
    std::fs::write(
        &map.path,
        postfix::sympa_transport_text(LIST_DOMAIN, list_names(0..LISTS)),
    )?;
    postfix::postmap(&tools, &map)?;
    Ok((tools, map))
}

#[test]
fn listed_recipient_accepted_unlisted_refused() {
    if skip() {
        return;
    }
    let dir = TempDir::new("postfix-probe");
    let (_tools, map) = build_table(&dir.0).unwrap();
    let pf = PostfixInstance::start(
        &dir.0.join("postfix"),
        &PostfixTables::sympa_transport(&map.path),
    )
    .unwrap();
    println!(
        "postfix on {} started in {:.1?} ({} processes)",
        pf.addr(),
        pf.started_in(),
        pf.processes().len()
    );
    assert!(
        pf.started_in() < Duration::from_secs(5),
        "start took {:?}",
        pf.started_in()
    );

    let rcpts = vec![
        addr("list0"),
        addr("list1999"),
        addr("nolist"),
        addr("list2000"),
        "list0@other.example.net".to_string(),
        addr("list7+bounce"),
    ];
    let codes = probe(pf.addr(), &rcpts).unwrap();
    println!("{rcpts:?} -> {codes:?}");
    assert_eq!(codes[0], 250, "a listed list is accepted");
    assert_eq!(codes[1], 250, "the last listed list is accepted");
    assert_eq!(codes[2] / 100, 5, "an unlisted address is refused");
    assert_eq!(codes[3] / 100, 5, "one past the last list is refused");
    assert_eq!(codes[4] / 100, 5, "another domain is not relayed");
    assert_eq!(codes[5], 250, "recipient_delimiter: list7+bounce is list7");

    // A single listed address, a fresh session each time.
    for i in [1, 500, 1234] {
        assert_eq!(
            probe(pf.addr(), &[addr(&format!("list{i}"))]).unwrap(),
            [250]
        );
    }
    assert!(
        pf.log_lines("User unknown in virtual mailbox table")
            .iter()
            .any(|l| l.contains("nolist@")),
        "the maillog records the refusal:\n{}",
        pf.log_text()
    );

    // Drop leaves nothing behind.
    let pgid = pf.process_group();
    let pids = pf.processes();
    assert!(pids.len() >= 3, "master and some daemons run: {pids:?}");
    drop(pf);
    let left = postfix::processes_in_group(pgid);
    assert!(left.is_empty(), "processes left after drop: {left:?}");
    let alive: Vec<u32> = pids
        .into_iter()
        .filter(|pid| Path::new(&format!("/proc/{pid}")).exists())
        .filter(|pid| {
            // A zombie waiting for init to reap it is not running.
            std::fs::read_to_string(format!("/proc/{pid}/status"))
                .map(|s| !s.contains("State:\tZ"))
                .unwrap_or(false)
        })
        .collect();
    assert!(
        alive.is_empty(),
        "processes of the instance still run: {alive:?}"
    );
}

#[test]
fn alias_table_recipients_beside_transport_table() {
    if skip() {
        return;
    }
    let dir = TempDir::new("postfix-aliases");
    let (tools, transport) = build_table(&dir.0).unwrap();
    // Sympa's single domain setting: `sympa_aliases`, built by `postalias`.
    let aliases = Map::hash(dir.0.join("tables").join("sympa_aliases"));
    let text: String = (0..100)
        .map(|i| format!("alist{i}: \"| /usr/lib/sympa/bin/queue alist{i}@aliases.example.org\"\n"))
        .collect();
    std::fs::write(&aliases.path, text).unwrap();
    postfix::postalias(&tools, &aliases).unwrap();
    let tables = PostfixTables::sympa_transport(&transport.path).with_aliases(aliases);
    let pf = PostfixInstance::start(&dir.0.join("postfix"), &tables).unwrap();
    let rcpts: Vec<String> = [
        "alist0@aliases.example.org",
        "alist99@aliases.example.org",
        "alist100@aliases.example.org",
        "root@aliases.example.org",
        "list5@lists.example.org",
        "alist0@lists.example.org",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let codes = probe(pf.addr(), &rcpts).unwrap();
    println!("{rcpts:?} -> {codes:?}");
    assert_eq!(codes[0], 250);
    assert_eq!(codes[1], 250);
    assert_eq!(codes[2] / 100, 5, "not in the alias table");
    assert_eq!(
        codes[3] / 100,
        5,
        "the passwd file is not a recipient table here"
    );
    assert_eq!(codes[4], 250);
    assert_eq!(
        codes[5] / 100,
        5,
        "an alias is not a list of the virtual domain"
    );
}

#[test]
fn in_place_postmap_rebuild_under_smtp_probes() {
    if skip() {
        return;
    }
    let rebuilds: usize = std::env::var("TXMAP_POSTFIX_REBUILDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100);
    let dir = TempDir::new("postfix-inplace");
    let (tools, map) = build_table(&dir.0).unwrap();
    let pf = PostfixInstance::start(
        &dir.0.join("postfix"),
        &PostfixTables::sympa_transport(&map.path),
    )
    .unwrap();
    // Lists 0..LISTS are never removed: Postfix must accept every one of them, always.
    let stable: Vec<String> = [0, 1, 777, 1500, 1999]
        .iter()
        .map(|i| addr(&format!("list{i}")))
        .collect();
    assert_eq!(probe(pf.addr(), &stable).unwrap(), vec![250; stable.len()]);

    // A calm baseline first, so that the figures below can be compared with it.
    let base = ProbeLoop::start(pf.addr(), stable.clone()).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let base = base.stop();
    println!("baseline (no rebuild):\n{base}");

    let prober = ProbeLoop::start_with(
        pf.addr(),
        stable.clone(),
        ProbeOptions {
            delay_threshold: Duration::from_millis(100),
            ..ProbeOptions::default()
        },
    )
    .unwrap();
    let rebuilder = {
        let (map, tools) = (map.clone(), tools.clone());
        std::thread::spawn(move || {
            let mut times = Vec::new();
            for n in 0..rebuilds {
                // Sympa's way: rewrite the source in place, then `postmap` it in place. Each round
                // adds ten lists and removes the ten of the previous round.
                let churn = list_names(LISTS + 10 * n..LISTS + 10 * n + 10);
                let text =
                    postfix::sympa_transport_text(LIST_DOMAIN, list_names(0..LISTS).chain(churn));
                std::fs::write(&map.path, text).unwrap();
                let t0 = Instant::now();
                postfix::postmap(&tools, &map).unwrap();
                times.push(t0.elapsed());
            }
            times
        })
    };
    let t0 = Instant::now();
    let times = rebuilder.join().unwrap();
    let rebuild_time = t0.elapsed();
    let at_last_rebuild = prober.snapshot();
    // Keep probing a little: do the daemons notice the last rebuild?
    std::thread::sleep(Duration::from_millis(500));
    let stats = prober.stop();
    let after = stats.since(&at_last_rebuild);

    let max_build = times.iter().max().copied().unwrap_or_default();
    let mean_build = times.iter().sum::<Duration>() / times.len().max(1) as u32;
    let total = stats.total();
    println!(
        "{rebuilds} in-place rebuilds of {LISTS}+10 lists in {rebuild_time:.2?} \
         (postmap mean {mean_build:.1?}, max {max_build:.1?})"
    );
    println!("during the rebuilds:\n{at_last_rebuild}");
    println!("in the 500 ms after the last rebuild:\n{after}");
    println!(
        "=> in all, stable lists refused (5xx): {}, temp-failed (4xx): {}, delayed > {:?}: {}, \
         sessions failed: {} of {}",
        total.refused,
        total.temp_fail,
        stats.delay_threshold,
        total.delayed,
        stats.session_errors,
        stats.connections
    );
    for needle in [
        "has changed -- restarting",
        "warning:",
        "fatal:",
        "Temporary lookup failure",
        "User unknown",
    ] {
        println!(
            "maillog lines with {needle:?}: {}",
            pf.log_lines(needle).len()
        );
    }
    for l in pf
        .log_lines("fatal:")
        .iter()
        .chain(pf.log_lines("warning:").iter())
        .take(5)
    {
        println!("  {l}");
    }

    // What is robust: the prober ran throughout and Postfix accepted the stable lists at least
    // sometimes; and once the rebuilds stop, every stable list is accepted again.
    assert!(
        stats.connections >= 20,
        "too few probes to mean anything: {stats}"
    );
    for a in &stable {
        let c = &stats.per_address[a];
        assert!(c.accepted > 0, "{a} was never accepted: {stats}");
    }
    let settle = Instant::now();
    // A stale smtpd is replaced after at most max_use (100) sessions.
    let until = settle + Duration::from_secs(20);
    loop {
        match probe(pf.addr(), &stable) {
            Ok(codes) if codes.iter().all(|&c| c == 250) => {
                println!(
                    "every stable list accepted again {:.1?} after the prober stopped",
                    settle.elapsed()
                );
                break;
            }
            other => {
                assert!(
                    Instant::now() < until,
                    "stable lists still not accepted 20 s after the last rebuild: {other:?}"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
    assert_eq!(
        probe(pf.addr(), &[addr("nolist")]).unwrap()[0] / 100,
        5,
        "an unlisted address is still refused"
    );
}
