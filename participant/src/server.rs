//! The participant's async shell: the node, its tables, start-up and recovery from the journal.
//!
//! # Layout of `txmapd`
//! - `server` (this file): [`Node`], [`Slot`], [`run`], start-up recovery.
//! - `serve`: QUIC connections and requests; status, fetch, verify.
//! - `prepare`: staging a prepare (upload, build, verify, fsync).
//! - `decide`: decisions, the machine's actions, the journal.
//! - `resolve`: outcome answers, in-doubt resolution, install retries.
//! - `converge`: redrive of this node's decisions, pending retries.
//! - `hook`: the Sympa hook's Unix socket, snapshots, queued requests.
//!
//! Each table has a [`Slot`]: its [`TableState`] machine behind an async mutex, and the `flock`
//! file held while a transaction owns the table. A request steps the machine and executes the
//! [`Action`]s it returns, in order; the long part of a prepare (upload, build, verify) runs
//! outside the mutex, so `status` and other tables are never blocked by it.

use crate::decide::{install_checked, record_history};
use anyhow::Context as _;
use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Mutex;
use tracing::{debug, error, info};
use txmap_common::config::{Config, TableConfig};
use txmap_common::history::History;
use txmap_common::journal::Journal;
use txmap_common::machine::{Event, Phase, TableState};
use txmap_common::now_ms;
use txmap_common::proto::{Refusal, Response};
use txmap_common::table;
use txmap_coordinator::cluster::Cluster;

/// How long a peer may take to send a request header.
pub(crate) const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// One table on this node.
pub(crate) struct Slot {
    pub(crate) table: TableConfig,
    pub(crate) state: Mutex<TableState>,
    /// The table's `flock`, held from the start of staging until commit or abort.
    pub(crate) lock: std::sync::Mutex<Option<std::fs::File>>,
    /// The journal lags behind the machine (a write failed): nothing is answered from this
    /// table until it is written.
    pub(crate) dirty: std::sync::atomic::AtomicBool,
}

/// Everything the daemon serves.
pub(crate) struct Node {
    pub(crate) cfg: Config,
    pub(crate) journal: Journal,
    pub(crate) slots: HashMap<String, Arc<Slot>>,
}

/// Runs the daemon until `shutdown` completes.
pub async fn run(cfg: Config, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let node = Arc::new(Node::open(cfg)?);
    let server = txmap_common::tls::server_config(&node.cfg).context("TLS setup")?;
    let endpoint = quinn::Endpoint::server(server, node.cfg.listen)
        .with_context(|| format!("cannot listen on {}", node.cfg.listen))?;
    let cluster = Arc::new(Cluster::new(node.cfg.clone()).context("QUIC client setup")?);
    let background = [
        tokio::spawn(node.clone().resolve_loop(cluster.clone())),
        tokio::spawn(node.clone().redrive_loop(cluster.clone())),
        tokio::spawn(node.clone().pending_loop(cluster.clone())),
        tokio::spawn(node.clone().hook_loop(cluster.clone())),
    ];
    tokio::pin!(shutdown);
    // Poll the shutdown future once before announcing readiness: that installs the signal
    // handlers, so a SIGTERM sent right after READY=1 (`systemctl start` then `stop`) is a
    // clean stop rather than the default action.
    let stop_now =
        std::future::poll_fn(|cx| std::task::Poll::Ready(shutdown.as_mut().poll(cx).is_ready()))
            .await;
    info!(node = %node.cfg.node, listen = %node.cfg.listen, tables = node.slots.len(), "txmapd ready");
    crate::notify::ready(&format!(
        "serving {} table(s) on {}",
        node.slots.len(),
        node.cfg.listen
    ));
    if !stop_now {
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                incoming = endpoint.accept() => match incoming {
                    None => break,
                    Some(inc) => {
                        let node = node.clone();
                        tokio::spawn(async move { node.connection(inc).await });
                    }
                }
            }
        }
    }
    info!("shutting down");
    crate::notify::stopping();
    for b in background {
        b.abort();
    }
    endpoint.close(quinn::VarInt::from_u32(0), b"shutdown");
    let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
    Ok(())
}

impl Node {
    /// Loads every table's journal and recovers what a crash left behind.
    fn open(cfg: Config) -> anyhow::Result<Node> {
        table::create_dir_durable(&cfg.state_dir, 0o755)
            .with_context(|| format!("cannot create state_dir {}", cfg.state_dir.display()))?;
        let journal = Journal::open(&cfg.state_dir)?;
        let mut slots = HashMap::new();
        for t in &cfg.tables {
            let mut state = journal.load(&t.name)?;
            let mut lock = None;
            let keep = state.active.as_ref().map(|a| a.txid);
            History::new(&cfg.state_dir, &t.name).drop_staged_except(keep);
            for (txid, path) in table::list_staged(t) {
                if Some(txid) != keep {
                    info!(table = %t.name, %txid, path = %path.display(), "removing staged file of an unfinished transaction");
                    let _ = std::fs::remove_file(&path);
                }
            }
            if let Some(a) = state.active.clone() {
                lock = Some(
                    table::try_lock(&table::lock_path(&cfg.state_dir, &t.name))?.with_context(
                        || {
                            format!(
                                "table {}: lock held by another process (another txmapd?)",
                                t.name
                            )
                        },
                    )?,
                );
                if a.phase == Phase::Installing {
                    // The decision was commit and is journaled: finish the renames. If they
                    // still fail, the table stays installing and the retry loop keeps at it;
                    // the daemon (and every other table) serves on.
                    info!(table = %t.name, txid = %a.txid, "finishing an interrupted commit");
                    match install_checked(t, &a) {
                        Ok(()) => {
                            record_history(&cfg, t, &a);
                            let actions = state.step(Event::InstallDone { txid: a.txid }, now_ms());
                            debug!(?actions, "recovered");
                            journal.store(&t.name, &state)?;
                            lock = None;
                        }
                        Err(e) => {
                            error!(table = %t.name, txid = %a.txid, error = %e, "cannot finish the commit yet; the table stays installing and it is retried");
                        }
                    }
                } else {
                    info!(table = %t.name, txid = %a.txid, generation = a.generation, "transaction still prepared; holding its lock until the decision arrives");
                }
            }
            slots.insert(
                t.name.clone(),
                Arc::new(Slot {
                    table: t.clone(),
                    state: Mutex::new(state),
                    lock: std::sync::Mutex::new(lock),
                    dirty: std::sync::atomic::AtomicBool::new(false),
                }),
            );
        }
        Ok(Node {
            cfg,
            journal,
            slots,
        })
    }

    pub(crate) fn slot(&self, table: &str) -> Result<&Arc<Slot>, Response> {
        self.slots.get(table).ok_or_else(|| {
            Response::Refused(Refusal::UnknownTable {
                table: table.to_string(),
            })
        })
    }
}
