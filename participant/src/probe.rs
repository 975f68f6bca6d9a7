//! The monitoring side of `txmapd`: the health loop, and the read-only probe socket that
//! `txmap check` reads it from (see `txmap_coordinator::check` for the channel's design).
//!
//! The socket reads nothing from its clients: each connection gets the last summary, one
//! frame, within [`WRITE_TIMEOUT`], and is closed. At most [`MAX_PROBES`] are served at once;
//! the rest wait in the listen backlog. The summary is made by [`health_loop`], never on a
//! client's demand, so no client can make the daemon do work.

use crate::server::{Live, Node};
use std::sync::Arc;
use std::time::Duration;
use tracing::{debug, warn};
use txmap_common::codec;
use txmap_common::decision::DecisionLog;
use txmap_common::now_ms;
use txmap_common::proto::{Request, Response, TableStatus};
use txmap_coordinator::check::{
    CertHealth, Health, NodeHealth, PendingHealth, SourceHealth, TableHealth, HEALTH_INTERVAL_MS,
    HEALTH_VERSION,
};
use txmap_coordinator::cluster::{ask, join_all, Cluster};

/// Probe connections served at once.
const MAX_PROBES: usize = 8;
/// How long a probe client has to take its answer.
const WRITE_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest error text kept in a summary.
const MAX_TEXT: usize = 300;

fn short(s: &str) -> String {
    if s.len() <= MAX_TEXT {
        return s.to_string();
    }
    let mut end = MAX_TEXT;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &s[..end])
}

fn tables(v: &[TableStatus]) -> Vec<TableHealth> {
    v.iter()
        .map(|t| TableHealth {
            table: t.table.clone(),
            generation: t.generation,
            sha256: t.sha256.map(|s| s.to_string()),
            busy_since_ms: t.prepared.as_ref().map(|p| p.since_ms),
            in_doubt: t
                .prepared
                .as_ref()
                .is_some_and(|p| p.durable && !p.installing),
            installing: t.prepared.as_ref().is_some_and(|p| p.installing),
            drifted: t.drifted.as_deref().map(short),
        })
        .collect()
}

/// Per table, the stamp its configured source had when last seen, and since when it has had
/// it (this txmapd's view, for the catch-all's grace period).
type SourcesSeen = std::collections::HashMap<String, (txmap_common::table::FileStamp, u64)>;

/// `lstat`s every configured source (never opened, never followed) and updates `seen`.
fn sources(node: &Node, seen: &mut SourcesSeen, now: u64) -> Vec<SourceHealth> {
    let mut out = Vec::new();
    for t in &node.cfg.tables {
        let Some(src) = &t.source else {
            continue;
        };
        let stamp = std::fs::symlink_metadata(src)
            .ok()
            .map(|m| txmap_common::table::FileStamp::of(&m));
        let since = match stamp {
            None => {
                seen.remove(&t.name);
                None
            }
            Some(st) => {
                let e = seen.entry(t.name.clone()).or_insert((st, now));
                if e.0 != st {
                    *e = (st, now);
                }
                Some(e.1)
            }
        };
        out.push(SourceHealth {
            table: t.name.clone(),
            unchanged_since_ms: since,
        });
    }
    out
}

/// Makes one summary: this node's own state directly, every other node over QUIC.
async fn summary(live: &Live, node: &Node, cluster: &Cluster, seen: &mut SourcesSeen) -> Health {
    let cfg = &node.cfg;
    let req = Request::Status { table: None };
    let others = join_all(cfg.nodes.iter().map(|n| async {
        if n.name == cfg.node {
            let st = match node.status(None).await {
                Response::Status(v) => Ok(v),
                other => Err(format!("{other:?}")),
            };
            return (n.clone(), st, None);
        }
        let link = cluster.connect(n).await;
        let cert = link
            .as_ref()
            .ok()
            .and_then(txmap_common::certs::peer_not_after_ms);
        let st = match ask(&link, &req, cfg.timeouts.connect).await {
            Ok(Response::Status(v)) => Ok(v),
            Ok(Response::Refused(r)) => Err(r.to_string()),
            Ok(other) => Err(format!("unexpected answer {other:?}")),
            Err(e) => Err(e),
        };
        (n.clone(), st, cert)
    }))
    .await;
    let nodes = others
        .into_iter()
        .map(|(n, st, cert)| NodeHealth {
            node: n.name.clone(),
            in_service: n.in_service,
            reachable: st.is_ok(),
            error: st.as_ref().err().map(|e| short(e)),
            tables: st.as_deref().map(tables).unwrap_or_default(),
            cert_not_after_ms: cert,
        })
        .collect();
    let pending = DecisionLog::new(&cfg.state_dir)
        .list_pending()
        .into_iter()
        .map(|p| PendingHealth {
            table: p.table,
            since_ms: p.since_ms,
            attempts: p.attempts,
            last_error: short(&p.last_error),
            held: p.held.is_some(),
        })
        .collect();
    let certs = [("node certificate", &cfg.cert), ("CA certificate", &cfg.ca)]
        .into_iter()
        .map(|(what, path)| CertHealth {
            what: what.into(),
            path: path.display().to_string(),
            not_after_ms: txmap_common::certs::file_not_after_ms(path),
        })
        .collect();
    Health {
        version: HEALTH_VERSION,
        node: cfg.node.clone(),
        as_of_ms: now_ms(),
        started_ms: live.started_ms,
        config_loaded_ms: live.loaded_ms.load(std::sync::atomic::Ordering::Relaxed),
        in_doubt_ms: cfg.timeouts.in_doubt.as_millis() as u64,
        commit_bound_ms: (cfg.timeouts.total + cfg.timeouts.commit).as_millis() as u64,
        nodes,
        pending,
        certs,
        sources: sources(node, seen, now_ms()),
    }
}

/// Refreshes the health summary every [`HEALTH_INTERVAL_MS`].
pub(crate) async fn health_loop(live: Arc<Live>) {
    let mut tick = tokio::time::interval(Duration::from_millis(HEALTH_INTERVAL_MS));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut seen = SourcesSeen::new();
    loop {
        tick.tick().await;
        let (node, cluster) = live.both();
        let h = summary(&live, &node, &cluster, &mut seen).await;
        *live.health.lock().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(h));
    }
}

/// Serves the last summary on the probe socket.
pub(crate) async fn probe_loop(live: Arc<Live>) {
    let p = live.node().cfg.probe.clone();
    let listener = match crate::hook::bind_socket(&p.socket, p.mode, None) {
        Ok(l) => l,
        Err(e) => {
            warn!(socket = %p.socket.display(), error = %e, "cannot listen on the probe socket; txmap check will report txmapd as not running");
            return;
        }
    };
    let permits = Arc::new(tokio::sync::Semaphore::new(MAX_PROBES));
    loop {
        let Ok(permit) = permits.clone().acquire_owned().await else {
            return;
        };
        match listener.accept().await {
            Ok((mut stream, _)) => {
                let h = live
                    .health
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .clone();
                tokio::spawn(async move {
                    if let Some(h) = h {
                        let r = tokio::time::timeout(
                            WRITE_TIMEOUT,
                            codec::write_frame(&mut stream, &*h),
                        )
                        .await;
                        if !matches!(r, Ok(Ok(()))) {
                            debug!("probe client did not take its answer");
                        }
                    }
                    drop(permit);
                });
            }
            Err(e) => {
                warn!(error = %e, "probe socket: accept failed; backing off");
                drop(permit);
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}
