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
//! - `probe`: the read-only monitoring socket (`txmap check`) and the health loop.
//! - `reload`: `SIGHUP`: re-reading the config into a new [`Node`].
//!
//! # Reload
//! Every task reaches the node through [`Live`]: a new connection, stream, hook request or
//! background tick takes the current [`Node`] (and its [`Cluster`] client) from it. A reload
//! builds a new `Node` from the new config, sharing the [`Slot`]s of the tables it keeps (a
//! table has exactly one state machine, whatever the config), and swaps it in; requests in
//! flight finish with the node they started with.
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
    /// A spare copy of the live indexed file for the next incremental build.
    pub(crate) spare: crate::spare::SpareCell,
    /// Staged files whose removal failed, retried in the background (see `cleanup`).
    pub(crate) cleanup: crate::cleanup::CleanupCell,
}

/// Everything the daemon serves.
pub(crate) struct Node {
    pub(crate) cfg: Config,
    pub(crate) journal: Journal,
    pub(crate) slots: HashMap<String, Arc<Slot>>,
}

/// The current node and its coordinator client; swapped by a reload.
pub(crate) struct Live {
    node: std::sync::RwLock<Arc<Node>>,
    cluster: std::sync::RwLock<Arc<Cluster>>,
    /// The last health summary (see `probe`).
    pub(crate) health: std::sync::Mutex<Option<Arc<txmap_coordinator::check::Health>>>,
    /// When the daemon started (ms since the epoch).
    pub(crate) started_ms: u64,
    /// When the config in use was loaded (ms since the epoch).
    pub(crate) loaded_ms: std::sync::atomic::AtomicU64,
}

impl Live {
    /// The current node.
    pub(crate) fn node(&self) -> Arc<Node> {
        self.node.read().unwrap_or_else(|e| e.into_inner()).clone()
    }
    /// The current coordinator client.
    pub(crate) fn cluster(&self) -> Arc<Cluster> {
        self.cluster
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
    /// Both, for one tick of a background loop.
    pub(crate) fn both(&self) -> (Arc<Node>, Arc<Cluster>) {
        (self.node(), self.cluster())
    }
    /// Swaps in a reloaded node and its client.
    pub(crate) fn swap(&self, node: Arc<Node>, cluster: Arc<Cluster>) {
        *self.node.write().unwrap_or_else(|e| e.into_inner()) = node;
        *self.cluster.write().unwrap_or_else(|e| e.into_inner()) = cluster;
        self.loaded_ms
            .store(now_ms(), std::sync::atomic::Ordering::Relaxed);
    }
}

/// Runs the daemon until `shutdown` completes; each message on `reload` re-reads the config.
pub async fn run(
    cfg: Config,
    shutdown: impl Future<Output = ()>,
    mut reload: tokio::sync::mpsc::UnboundedReceiver<()>,
) -> anyhow::Result<()> {
    let node = Arc::new(Node::open(cfg)?);
    for slot in node.slots.values() {
        node.refresh_spare(slot, &*slot.state.lock().await);
    }
    let server = txmap_common::tls::server_config(&node.cfg).context("TLS setup")?;
    let endpoint = quinn::Endpoint::server(server, node.cfg.listen)
        .with_context(|| format!("cannot listen on {}", node.cfg.listen))?;
    let cluster = Arc::new(Cluster::new(node.cfg.clone()).context("QUIC client setup")?);
    let live = Arc::new(Live {
        node: std::sync::RwLock::new(node.clone()),
        cluster: std::sync::RwLock::new(cluster),
        health: std::sync::Mutex::new(None),
        started_ms: now_ms(),
        loaded_ms: std::sync::atomic::AtomicU64::new(now_ms()),
    });
    let background = [
        tokio::spawn(Node::resolve_loop(live.clone())),
        tokio::spawn(Node::redrive_loop(live.clone())),
        tokio::spawn(Node::pending_loop(live.clone())),
        tokio::spawn(Node::cleanup_loop(live.clone())),
        tokio::spawn(Node::hook_loop(live.clone())),
        tokio::spawn(crate::probe::health_loop(live.clone())),
        tokio::spawn(crate::probe::probe_loop(live.clone())),
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
    drop(node);
    if !stop_now {
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                Some(()) = reload.recv() => crate::reload::reload(&live).await,
                incoming = endpoint.accept() => match incoming {
                    None => break,
                    Some(inc) => {
                        let live = live.clone();
                        tokio::spawn(async move { Node::connection(live, inc).await });
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
            slots.insert(t.name.clone(), open_slot(&cfg, &journal, t)?);
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

/// Loads one table's journal into a new [`Slot`] and recovers what a crash left behind: staged
/// files of unfinished transactions go, a prepared transaction keeps its lock, an interrupted
/// commit is finished.
pub(crate) fn open_slot(
    cfg: &Config,
    journal: &Journal,
    t: &TableConfig,
) -> anyhow::Result<Arc<Slot>> {
    let mut state = journal.load(&t.name)?;
    let mut lock = None;
    let keep = state.active.as_ref().map(|a| a.txid);
    History::new(&cfg.state_dir, &t.name).drop_staged_except(keep);
    // No spare copy is known valid after a restart (made again once the table is idle).
    table::remove_spares(t);
    // What cannot be removed now is retried in the background (see `cleanup`).
    let mut failed = std::collections::BTreeMap::new();
    for (txid, path) in table::list_staged(t) {
        if Some(txid) != keep {
            info!(table = %t.name, %txid, path = %path.display(), "removing staged file of an unfinished transaction");
            match std::fs::remove_file(&path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    failed.insert(txid, format!("remove {}: {e}", path.display()));
                }
                _ => {}
            }
        }
    }
    let cleanup = crate::cleanup::CleanupCell::default();
    for (txid, e) in failed {
        cleanup.failed(t, txid, &e, now_ms());
    }
    if let Some(a) = state.active.clone() {
        lock = Some(
            table::try_lock(&table::lock_path(&cfg.state_dir, &t.name))?.with_context(|| {
                format!(
                    "table {}: lock held by another process (another txmapd?)",
                    t.name
                )
            })?,
        );
        if a.phase == Phase::Installing {
            // The decision was commit and is journaled: finish the renames. If they still
            // fail, the table stays installing and the retry loop keeps at it; the daemon
            // (and every other table) serves on.
            info!(table = %t.name, txid = %a.txid, "finishing an interrupted commit");
            match install_checked(t, &a) {
                Ok(()) => {
                    record_history(cfg, t, &a);
                    History::new(&cfg.state_dir, &t.name).prune(cfg.history_keep);
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
    Ok(Arc::new(Slot {
        table: t.clone(),
        state: Mutex::new(state),
        lock: std::sync::Mutex::new(lock),
        dirty: std::sync::atomic::AtomicBool::new(false),
        spare: Default::default(),
        cleanup,
    }))
}
