//! `txmap commit`: the coordinator's two phases against every node.
//!
//! 1. connect to every node and read its generation; offer `max + 1`;
//! 2. send `Prepare` + the whole source to every node in parallel, each within the prepare
//!    deadline;
//! 3. all prepared: write the decision to the decision log (fsync) and send `Commit` to all;
//!    otherwise send `Abort` to all. When every refusal was a conflict with another
//!    transaction (`Busy`, `StaleGeneration`), wait a random backoff and start again with a
//!    new transaction and generation, until the busy-retry deadline.
//!
//! The concurrency rule: nobody waits for a lock. A participant that already holds the table
//! for another transaction refuses at once (`Busy`), and one whose generation is already at or
//! above the offer refuses (`StaleGeneration`); the loser aborts everywhere and retries with a
//! fresh generation read from the nodes. So two coordinators never deadlock, and generations
//! strictly increase because each node only accepts a generation above its own.

use crate::cluster::{ask, join_all, Cluster, Link};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tracing::{info, warn};
use txmap_common::config::NodeConfig;
use txmap_common::exit;
use txmap_common::machine::{decide, next_generation, Decision, Vote};
use txmap_common::net;
use txmap_common::proto::{Prepare, Refusal, Request, Response, Sha256, TableStatus, TxId};
use txmap_common::table;

/// What happened on one node.
#[derive(Debug, Clone, Serialize)]
pub struct NodeReport {
    pub node: String,
    pub ok: bool,
    pub detail: String,
}

/// The result of `commit`.
#[derive(Debug, Serialize)]
pub struct CommitReport {
    pub table: String,
    pub txid: Option<String>,
    pub generation: Option<u64>,
    pub exit: u8,
    pub attempts: u32,
    pub elapsed_ms: u64,
    pub nodes: Vec<NodeReport>,
}

/// The decision log record, durable before any commit is sent.
#[derive(Debug, Serialize, Deserialize)]
pub struct DecisionRecord {
    pub txid: TxId,
    pub table: String,
    pub generation: u64,
    pub decision: String,
    pub nodes: Vec<String>,
    pub at_ms: u64,
}

fn decision_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("decisions")
}

fn log_decision(state_dir: &Path, rec: &DecisionRecord) -> anyhow::Result<PathBuf> {
    use std::io::Write;
    let dir = decision_dir(state_dir);
    std::fs::create_dir_all(&dir)?;
    let path = dir.join(format!("{}.json", rec.txid));
    let tmp = dir.join(format!(".{}.json.tmp", rec.txid));
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(&serde_json::to_vec_pretty(rec)?)?;
    f.sync_all()?;
    std::fs::rename(&tmp, &path)?;
    std::fs::File::open(&dir)?.sync_all()?;
    Ok(path)
}

fn vote_text(v: &Vote) -> String {
    match v {
        Vote::Prepared => "prepared".into(),
        Vote::Refused(r) => format!("refused: {r}"),
        Vote::Unreachable(e) => e.clone(),
    }
}

async fn prepare_one(cluster: &Cluster, link: &Link, req: &Request, source: &Path) -> Vote {
    let conn = match link {
        Ok(c) => c,
        Err(e) => return Vote::Unreachable(e.clone()),
    };
    let deadline = cluster.cfg.timeouts.prepare;
    let run = async {
        let file = tokio::fs::File::open(source)
            .await
            .map_err(|e| format!("cannot read source: {e}"))?;
        net::exchange(conn, req, Some(file))
            .await
            .map_err(|e| e.to_string())
    };
    match tokio::time::timeout(deadline, run).await {
        Ok(Ok(Response::Prepared { .. })) => Vote::Prepared,
        Ok(Ok(Response::Refused(r))) => Vote::Refused(r),
        Ok(Ok(other)) => Vote::Unreachable(format!("unexpected answer {other:?}")),
        Ok(Err(e)) => Vote::Unreachable(e),
        Err(_) => Vote::Unreachable(format!(
            "no answer within the prepare deadline of {} ms",
            deadline.as_millis()
        )),
    }
}

/// Sends `req` (a Commit) to one node, retrying until the commit deadline.
async fn commit_one(
    cluster: &Cluster,
    node: &NodeConfig,
    link: &Link,
    req: &Request,
) -> Result<u64, String> {
    let until = Instant::now() + cluster.cfg.timeouts.commit;
    let mut link = link.clone();
    let mut last = String::new();
    while Instant::now() < until {
        if link.is_err() {
            link = cluster.connect(node).await;
        }
        let left = until.saturating_duration_since(Instant::now());
        match ask(&link, req, left).await {
            Ok(Response::Committed { generation, .. }) => return Ok(generation),
            Ok(Response::Refused(r)) => return Err(format!("refused commit: {r}")),
            Ok(other) => return Err(format!("unexpected answer {other:?}")),
            Err(e) => {
                last = e;
                link = Err(last.clone());
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    Err(format!("commit not acknowledged: {last}"))
}

fn backoff(attempt: u32) -> Duration {
    let r = (TxId::random().0 % 1000) as u64;
    let base = 20u64 << attempt.min(4);
    Duration::from_millis(base + r * base / 1000)
}

/// Runs the whole commit of `table` from `source`. Never panics; the report carries the exit.
pub async fn commit(cluster: &Cluster, table_name: &str, source: &Path) -> CommitReport {
    let started = Instant::now();
    let mut report = CommitReport {
        table: table_name.to_string(),
        txid: None,
        generation: None,
        exit: exit::ABORTED,
        attempts: 0,
        elapsed_ms: 0,
        nodes: Vec::new(),
    };
    let digest = match table::digest_file(source) {
        Ok(d) => d,
        Err(e) => {
            report.exit = exit::LOCAL;
            report.nodes.push(NodeReport {
                node: cluster.cfg.node.clone(),
                ok: false,
                detail: format!("source: {e}"),
            });
            return report;
        }
    };
    let busy_until = started + cluster.cfg.timeouts.busy_retry;
    let mut links: Vec<(NodeConfig, Link)> = cluster.connect_all().await;
    loop {
        report.attempts += 1;
        // Re-dial nodes whose connection failed or closed.
        for (node, link) in links.iter_mut() {
            if link
                .as_ref()
                .map(|c| c.close_reason().is_some())
                .unwrap_or(true)
                && report.attempts > 1
            {
                *link = cluster.connect(node).await;
            }
        }
        let sreq = Request::Status {
            table: Some(table_name.to_string()),
        };
        let statuses = join_all(
            links
                .iter()
                .map(|(_, l)| ask(l, &sreq, cluster.cfg.timeouts.connect)),
        )
        .await;
        let mut known: Vec<TableStatus> = Vec::new();
        let mut votes: Vec<Option<Vote>> = vec![None; links.len()];
        for (i, s) in statuses.into_iter().enumerate() {
            match s {
                Ok(Response::Status(v)) => known.extend(v),
                Ok(Response::Refused(r)) => votes[i] = Some(Vote::Refused(r)),
                Ok(other) => {
                    votes[i] = Some(Vote::Unreachable(format!("unexpected answer {other:?}")))
                }
                Err(e) => votes[i] = Some(Vote::Unreachable(e)),
            }
        }
        let txid = TxId::random();
        let generation = next_generation(&known);
        report.txid = Some(txid.to_string());
        report.generation = Some(generation);
        let req = Request::Prepare(Prepare {
            txid,
            table: table_name.to_string(),
            generation,
            coordinator: cluster.cfg.node.clone(),
            source_len: digest.len,
            sha256: Sha256(digest.sha256),
            entries: digest.entries,
        });
        if votes.iter().all(|v| v.is_none()) {
            let fresh = join_all(
                links
                    .iter()
                    .map(|(_, l)| prepare_one(cluster, l, &req, source)),
            )
            .await;
            votes = fresh.into_iter().map(Some).collect();
        } else {
            // Some node failed before prepare: abort without sending the table anywhere.
            for v in votes.iter_mut().filter(|v| v.is_none()) {
                *v = Some(Vote::Unreachable(
                    "not asked: another node failed first".into(),
                ));
            }
        }
        let decision = decide(&votes).unwrap_or(Decision::Abort { retry: false });
        match decision {
            Decision::Commit => {
                fail::fail_point!("coordinator::after_all_prepared");
                let rec = DecisionRecord {
                    txid,
                    table: table_name.to_string(),
                    generation,
                    decision: "commit".into(),
                    nodes: links.iter().map(|(n, _)| n.name.clone()).collect(),
                    at_ms: txmap_common::now_ms(),
                };
                let logged = match log_decision(&cluster.cfg.state_dir, &rec) {
                    Ok(p) => p,
                    Err(e) => {
                        // Not durable: the decision cannot be commit.
                        warn!(error = %e, "cannot log the decision; aborting");
                        abort_all(cluster, &links, table_name, txid).await;
                        report.exit = exit::LOCAL;
                        report.nodes = vec![NodeReport {
                            node: cluster.cfg.node.clone(),
                            ok: false,
                            detail: format!(
                                "decision log in {}: {e}",
                                cluster.cfg.state_dir.display()
                            ),
                        }];
                        break;
                    }
                };
                fail::fail_point!("coordinator::after_decision_durable");
                let creq = Request::Commit {
                    table: table_name.to_string(),
                    txid,
                };
                let acks = join_all(links.iter().enumerate().map(|(i, (n, l))| {
                    let creq = &creq;
                    async move {
                        let r = commit_one(cluster, n, l, creq).await;
                        if i == 0 {
                            fail::fail_point!("coordinator::after_first_commit_sent");
                        }
                        r
                    }
                }))
                .await;
                report.nodes = links
                    .iter()
                    .zip(&acks)
                    .map(|((n, _), a)| match a {
                        Ok(g) => NodeReport {
                            node: n.name.clone(),
                            ok: true,
                            detail: format!("committed generation {g}"),
                        },
                        Err(e) => NodeReport {
                            node: n.name.clone(),
                            ok: false,
                            detail: e.clone(),
                        },
                    })
                    .collect();
                if acks.iter().all(|a| a.is_ok()) {
                    let _ = std::fs::remove_file(&logged);
                    report.exit = exit::OK;
                } else {
                    report.exit = exit::INCOMPLETE;
                }
                break;
            }
            Decision::Abort { retry } => {
                abort_all(cluster, &links, table_name, txid).await;
                report.nodes = links
                    .iter()
                    .zip(&votes)
                    .map(|((n, _), v)| {
                        let v = v.clone().unwrap_or(Vote::Unreachable("no vote".into()));
                        NodeReport {
                            node: n.name.clone(),
                            ok: v == Vote::Prepared,
                            detail: vote_text(&v),
                        }
                    })
                    .collect();
                if retry && Instant::now() + Duration::from_millis(50) < busy_until {
                    let wait = backoff(report.attempts);
                    info!(
                        attempt = report.attempts,
                        wait_ms = wait.as_millis() as u64,
                        "conflict with another transaction; retrying"
                    );
                    tokio::time::sleep(wait).await;
                    continue;
                }
                report.exit = if retry { exit::BUSY } else { exit::ABORTED };
                break;
            }
        }
    }
    report.elapsed_ms = started.elapsed().as_millis() as u64;
    report
}

async fn abort_all(cluster: &Cluster, links: &[(NodeConfig, Link)], table_name: &str, txid: TxId) {
    let req = Request::Abort {
        table: table_name.to_string(),
        txid,
    };
    let res = join_all(
        links
            .iter()
            .map(|(_, l)| ask(l, &req, cluster.cfg.timeouts.commit)),
    )
    .await;
    for ((n, _), r) in links.iter().zip(res) {
        match r {
            Ok(Response::Aborted { .. }) => {}
            Ok(Response::Refused(Refusal::AlreadyCommitted { .. })) => {
                warn!(node = %n.name, %txid, "abort refused: already committed (should be impossible)")
            }
            other => {
                info!(node = %n.name, %txid, result = ?other, "abort not acknowledged; the node resolves it by itself")
            }
        }
    }
}
