//! Cleanup that fails is retried and shows in `status`, with real
//! processes: an abort on a node whose `unlink` of the staged files fails (EIO, injected with
//! the `table::remove_staged` failpoint in its txmapd) leaves the staged copy only until a
//! background retry removes it, without a restart, and `txmap status` shows it meanwhile.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers: a panic is a test failure

use std::time::{Duration, Instant};
use txmap_chaos_tests::cluster::{describe, transport_table, wait_until, TestCluster, TABLE};

/// Node `i`'s status of the table, as node `via` reports it (`txmap status --json`).
fn table_status(c: &TestCluster, via: usize, i: usize) -> serde_json::Value {
    let s = c.status(via);
    s.as_array()
        .and_then(|nodes| {
            nodes
                .iter()
                .find(|n| n["node"] == format!("node{i}").as_str())
        })
        .and_then(|n| n["tables"].as_array())
        .and_then(|ts| ts.iter().find(|t| t["table"] == TABLE))
        .cloned()
        .unwrap_or(serde_json::Value::Null)
}

#[test]
fn a_failed_unlink_of_aborted_staged_files_is_retried_without_a_restart_and_shows_in_status() {
    let mut c = TestCluster::start("cleanup-eio", 3).unwrap();
    c.write_source(&transport_table("a.example", 0..30));
    let out = c.commit(1);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));

    // node2's disk fails every unlink of an existing staged file 6 times (the first abort
    // and the first retries), then recovers.
    c.kill_node(2);
    c.start_node_with(2, &[("FAILPOINTS", "table::remove_staged=6*return")])
        .unwrap();
    let pid = c.pid(2);

    // The coordinator dies once every node prepared, before any decision: the daemons resolve
    // the transaction as aborted, and node2 cannot unlink its staged copy.
    c.write_source(&transport_table("a.example", 0..31));
    let out = c.txmap_with(
        1,
        &["commit", TABLE, "--json"],
        &[("FAILPOINTS", "coordinator::after_all_prepared=panic")],
    );
    assert!(
        out.status.code() != Some(0),
        "txmap should have died: {}",
        describe(&out)
    );
    let txid = std::fs::read_dir(c.table_dir(2))
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let rest = name.strip_prefix(&format!(".{TABLE}.txmap-"))?;
            Some(rest.get(..32)?.to_string())
        })
        .next()
        .expect("node2 holds the staged files of the interrupted transaction");
    assert!(
        wait_until(Duration::from_secs(20), || c.outcome(2, &txid).as_deref()
            == Some("Aborted")),
        "node2 never aborted {txid}: {}",
        c.journal(2)
    );
    let aborted_at = Instant::now();

    // Right after the abort: the staged copy is still there (the unlink failed), and status
    // says so, with the error.
    let left: Vec<_> = c
        .staged_files(2)
        .into_iter()
        .filter(|p| p.to_string_lossy().contains(&txid))
        .collect();
    assert!(
        !left.is_empty(),
        "the failpoint did not fire: node2 removed the staged files of {txid} at once"
    );
    let st = table_status(&c, 1, 2);
    let cleanup = &st["cleanup"];
    assert!(
        cleanup["staged_files"].as_u64().is_some_and(|n| n >= 1),
        "status does not show the pending cleanup on node2: {st}"
    );
    assert!(
        cleanup["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("Input/output error")),
        "status does not name the error: {st}"
    );
    let text = c.txmap(1, &["status", TABLE]);
    let text = String::from_utf8_lossy(&text.stdout).into_owned();
    assert!(
        text.contains("cleanup pending"),
        "`txmap status` shows no cleanup line: {text}"
    );

    // Retried by the running daemon (no restart), with backoff: gone in bounded time.
    assert!(
        wait_until(Duration::from_secs(30), || !c
            .staged_files(2)
            .iter()
            .any(|p| p.to_string_lossy().contains(&txid))),
        "the staged files of {txid} stayed on node2 for {:?}: {:?}",
        aborted_at.elapsed(),
        c.staged_files(2)
    );
    assert_eq!(c.pid(2), pid, "node2's txmapd was restarted");
    assert!(
        wait_until(Duration::from_secs(10), || {
            table_status(&c, 1, 2)["cleanup"].is_null()
        }),
        "status still shows a cleanup on node2: {}",
        table_status(&c, 1, 2)
    );
    let text = c.txmap(1, &["status", TABLE]);
    let text = String::from_utf8_lossy(&text.stdout).into_owned();
    assert!(
        !text.contains("cleanup pending"),
        "`txmap status` still shows a cleanup line: {text}"
    );
    let log = std::fs::read_to_string(c.log(2)).unwrap_or_default();
    assert!(
        log.lines()
            .any(|l| l.contains("WARN") && l.contains(&txid) && l.contains("staged")),
        "node2 logged no warning about the failed cleanup of {txid}"
    );
}
