//! The participant's async shell: QUIC server, per-table state machines, journal, staging.
//!
//! Each table has a [`Slot`]: its [`TableState`] machine behind an async mutex, and the `flock`
//! file held while a transaction owns the table. A request steps the machine and executes the
//! [`Action`]s it returns, in order; the long part of a prepare (upload, build, verify) runs
//! outside the mutex, so `status` and other tables are never blocked by it.

use anyhow::Context as _;
use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{Mutex, MutexGuard};
use tracing::{debug, error, info, info_span, warn, Instrument};
use txmap_common::codec;
use txmap_common::config::{Config, TableConfig};
use txmap_common::coordinator::{log_answer, resolve, Heard, LogAnswer};
use txmap_common::decision::{DecisionLog, DecisionRecord, Verdict};
use txmap_common::history::History;
use txmap_common::journal::Journal;
use txmap_common::machine::{Action, Active, Event, Phase, TableState};
use txmap_common::now_ms;
use txmap_common::proto::{
    HistoryEntry, OutcomeAnswer, PendingInfo, Prepare, Refusal, Request, Response, Sha256, TxId,
};
use txmap_common::table;
use txmap_coordinator::cluster::{ask, Cluster};

/// How long a peer may take to send a request header.
pub(crate) const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// One table on this node.
struct Slot {
    table: TableConfig,
    state: Mutex<TableState>,
    /// The table's `flock`, held from the start of staging until commit or abort.
    lock: std::sync::Mutex<Option<std::fs::File>>,
    /// The journal lags behind the machine (a write failed): nothing is answered from this
    /// table until it is written.
    dirty: std::sync::atomic::AtomicBool,
}

/// Everything the daemon serves.
pub(crate) struct Node {
    pub(crate) cfg: Config,
    journal: Journal,
    slots: HashMap<String, Arc<Slot>>,
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
    info!(node = %node.cfg.node, listen = %node.cfg.listen, tables = node.slots.len(), "txmapd ready");
    tokio::pin!(shutdown);
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
    info!("shutting down");
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
        std::fs::create_dir_all(&cfg.state_dir)
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

    async fn connection(self: Arc<Self>, incoming: quinn::Incoming) {
        let remote = incoming.remote_address();
        let conn = match incoming.await {
            Ok(c) => c,
            Err(e) => {
                warn!(%remote, error = %e, "refused connection (handshake failed: no or foreign certificate?)");
                return;
            }
        };
        let Some(peer) = txmap_common::tls::peer_node(&conn, &self.cfg) else {
            warn!(%remote, "refused connection: certificate names no configured node");
            conn.close(quinn::VarInt::from_u32(1), b"not a configured node");
            return;
        };
        debug!(%remote, %peer, "connection");
        while let Ok((send, recv)) = conn.accept_bi().await {
            let node = self.clone();
            let peer = peer.clone();
            tokio::spawn(async move { node.stream(peer, send, recv).await });
        }
    }

    async fn stream(
        self: Arc<Self>,
        peer: String,
        mut send: quinn::SendStream,
        mut recv: quinn::RecvStream,
    ) {
        let req =
            match tokio::time::timeout(HEADER_TIMEOUT, codec::read_frame::<_, Request>(&mut recv))
                .await
            {
                Ok(Ok(r)) => r,
                Ok(Err(e)) => {
                    warn!(%peer, error = %e, "bad request");
                    let _ = recv.stop(quinn::VarInt::from_u32(2));
                    self.reply(
                        &mut send,
                        Response::Refused(Refusal::Protocol {
                            detail: e.to_string(),
                        }),
                    )
                    .await;
                    return;
                }
                Err(_) => {
                    warn!(%peer, "request header timed out");
                    return;
                }
            };
        let resp = match req {
            Request::Status { table } => self.status(table.as_deref()).await,
            Request::Prepare(p) => {
                let span =
                    info_span!("prepare", txid = %p.txid, table = %p.table, node = %self.cfg.node);
                self.prepare(&peer, p, &mut recv).instrument(span).await
            }
            Request::Commit {
                table,
                txid,
                generation,
            } => {
                let span = info_span!("commit", %txid, %table, node = %self.cfg.node);
                self.decide(&table, Event::Commit { txid, generation }, Some(&peer))
                    .instrument(span)
                    .await
            }
            Request::Abort {
                table,
                txid,
                generation,
            } => {
                let span = info_span!("abort", %txid, %table, node = %self.cfg.node);
                self.decide(&table, Event::Abort { txid, generation }, Some(&peer))
                    .instrument(span)
                    .await
            }
            Request::History { table } => match self.slot(&table) {
                Ok(_) => Response::History(History::new(&self.cfg.state_dir, &table).list()),
                Err(r) => r,
            },
            Request::Fetch { table, generation } => {
                self.fetch(&table, generation, &mut send).await;
                return;
            }
            Request::Verify { table } => self.verify(&table).await,
            Request::Outcome {
                table,
                txid,
                generation,
                coordinator,
                fence,
            } => {
                let mine = coordinator == self.cfg.node;
                match self.outcome(&table, txid, generation, mine, fence).await {
                    Ok(a) => Response::Outcome(a),
                    Err(r) => r,
                }
            }
        };
        self.reply(&mut send, resp).await;
    }

    async fn reply(&self, send: &mut quinn::SendStream, resp: Response) {
        if let Err(e) = codec::write_frame(send, &resp).await {
            debug!(error = %e, "could not send reply");
        }
        let _ = send.finish();
    }

    fn slot(&self, table: &str) -> Result<&Arc<Slot>, Response> {
        self.slots.get(table).ok_or_else(|| {
            Response::Refused(Refusal::UnknownTable {
                table: table.to_string(),
            })
        })
    }

    async fn status(&self, table: Option<&str>) -> Response {
        let mut names: Vec<&String> = match table {
            Some(t) => match self.slots.get_key_value(t) {
                Some((k, _)) => vec![k],
                None => {
                    return Response::Refused(Refusal::UnknownTable {
                        table: t.to_string(),
                    })
                }
            },
            None => self.slots.keys().collect(),
        };
        names.sort();
        let log = DecisionLog::new(&self.cfg.state_dir);
        let mut out = Vec::new();
        for n in names {
            let mut st = self.slots[n].state.lock().await.status(n);
            st.pending = log.pending(n).map(|p| PendingInfo {
                since_ms: p.since_ms,
                attempts: p.attempts,
                last_error: p.last_error,
            });
            out.push(st);
        }
        Response::Status(out)
    }

    async fn prepare(&self, peer: &str, p: Prepare, recv: &mut quinn::RecvStream) -> Response {
        let slot = match self.slot(&p.table) {
            Ok(s) => s.clone(),
            Err(r) => {
                warn!(%peer, table = %p.table, "prepare for an unknown table");
                let _ = recv.stop(quinn::VarInt::from_u32(3));
                return r;
            }
        };
        if p.coordinator != peer {
            let _ = recv.stop(quinn::VarInt::from_u32(3));
            return Response::Refused(Refusal::NotAuthorized {
                detail: format!("peer {peer} may not coordinate as {}", p.coordinator),
            });
        }
        if !self.cfg.node_by_name(peer).is_some_and(|n| n.in_service) {
            let _ = recv.stop(quinn::VarInt::from_u32(3));
            return Response::Refused(Refusal::NotAuthorized {
                detail: format!(
                    "{peer} is out of service here: out-of-service nodes do not coordinate"
                ),
            });
        }
        if let Err(r) = self.flush(&slot, &*slot.state.lock().await) {
            let _ = recv.stop(quinn::VarInt::from_u32(3));
            return r;
        }
        if p.source_len > self.cfg.max_table_bytes {
            let _ = recv.stop(quinn::VarInt::from_u32(3));
            return Response::Refused(Refusal::TooLarge {
                len: p.source_len,
                max: self.cfg.max_table_bytes,
            });
        }
        let event = Event::Prepare {
            txid: p.txid,
            generation: p.generation,
            coordinator: p.coordinator.clone(),
            sha256: p.sha256,
            entries: p.entries,
            nodes: p.nodes.clone(),
        };
        let actions = slot.state.lock().await.step(event, now_ms());
        if actions.first() != Some(&Action::Stage { txid: p.txid }) {
            let _ = recv.stop(quinn::VarInt::from_u32(0));
            return self.execute(&slot, slot.state.lock().await, actions).await;
        }
        let started = std::time::Instant::now();
        // A coordinator that stalls mid-upload must not hold the table forever.
        let limit = self.cfg.timeouts.prepare * 3;
        let staged = tokio::time::timeout(limit, self.stage(&slot, &p, recv))
            .await
            .unwrap_or_else(|_| {
                Err(Refusal::Protocol {
                    detail: format!(
                        "prepare not finished within {} ms; dropped",
                        limit.as_millis()
                    ),
                })
            });
        let event = match staged {
            Ok(()) => Event::StageDone { txid: p.txid },
            Err(why) => {
                warn!(error = %why, "prepare failed");
                let _ = recv.stop(quinn::VarInt::from_u32(4));
                Event::StageFailed { txid: p.txid, why }
            }
        };
        let mut guard = slot.state.lock().await;
        let actions = guard.step(event, now_ms());
        let resp = self.execute(&slot, guard, actions).await;
        if matches!(resp, Response::Prepared { .. }) {
            info!(
                generation = p.generation,
                bytes = p.source_len,
                entries = p.entries,
                ms = started.elapsed().as_millis() as u64,
                "prepared"
            );
            fail::fail_point!("participant::after_prepared_durable");
        }
        resp
    }

    /// Lock, receive, build, verify, fsync. Any error leaves cleanup to the machine's actions.
    async fn stage(
        &self,
        slot: &Slot,
        p: &Prepare,
        recv: &mut quinn::RecvStream,
    ) -> Result<(), Refusal> {
        let t = &slot.table;
        let lock_path = table::lock_path(&self.cfg.state_dir, &t.name);
        let Some(lock) = table::try_lock(&lock_path)? else {
            return Err(Refusal::Storage {
                op: "lock".into(),
                path: lock_path.display().to_string(),
                error: "held by another process".into(),
            });
        };
        if let Ok(mut l) = slot.lock.lock() {
            *l = Some(lock);
        }
        let staged = table::staged_paths(t, p.txid);
        table::remove_staged(t, p.txid)?;
        let mut w = table::SourceWriter::create(t, &staged)?;
        loop {
            match recv.read_chunk(256 * 1024, true).await {
                Ok(Some(chunk)) => {
                    if w.len() + chunk.bytes.len() as u64 > p.source_len {
                        return Err(Refusal::ContentMismatch {
                            detail: format!("more than the announced {} bytes", p.source_len),
                        });
                    }
                    w.write(&chunk.bytes)?;
                }
                Ok(None) => break,
                Err(e) => {
                    return Err(Refusal::ContentMismatch {
                        detail: format!("upload broken after {} bytes: {e}", w.len()),
                    })
                }
            }
        }
        let t_upload = std::time::Instant::now();
        let (got, sample) = w.finish()?;
        if got.len != p.source_len || got.sha256 != p.sha256.0 {
            return Err(Refusal::ContentMismatch {
                detail: format!(
                    "received {} bytes sha256 {}, announced {} bytes sha256 {}",
                    got.len,
                    table::hex(&got.sha256),
                    p.source_len,
                    p.sha256
                ),
            });
        }
        let t_synced = std::time::Instant::now();
        table::build(&self.cfg.postfix, t, &staged).await?;
        #[cfg(feature = "failpoints")]
        if std::env::var("TXMAP_CHAOS_BROKEN").as_deref() == Ok("rename-before-durable") {
            // Deliberately broken build for the chaos tests (only with the `failpoints`
            // feature): install the new table before it is verified, durable and decided, so
            // an aborted transaction's content goes live. The checkers must catch this.
            std::fs::copy(&staged.indexed, t.live_indexed()).map_err(|e| Refusal::Storage {
                op: "broken copy".into(),
                path: t.live_indexed().display().to_string(),
                error: e.to_string(),
            })?;
        }
        let t_built = std::time::Instant::now();
        match sample {
            Some(keys) => table::verify_sample(&self.cfg.postfix, t, &staged, keys).await?,
            None => table::verify(&self.cfg.postfix, t, &staged, got.entries).await?,
        }
        let t_verified = std::time::Instant::now();
        table::fsync_path(&staged.indexed)?;
        table::fsync_dir(t.dir())?;
        if let Err(e) = History::new(&self.cfg.state_dir, &t.name).stage(p.txid, &staged) {
            // History is for operators; it never fails a transaction.
            warn!(error = %e, "cannot copy the new table into history");
        }
        let ms = |a: std::time::Instant, b: std::time::Instant| (b - a).as_secs_f64() * 1000.0;
        debug!(
            source_fsync_ms = ms(t_upload, t_synced),
            build_ms = ms(t_synced, t_built),
            verify_ms = ms(t_built, t_verified),
            fsync_ms = ms(t_verified, std::time::Instant::now()),
            "staged"
        );
        fail::fail_point!("participant::after_stage");
        Ok(())
    }

    /// Steps a table's machine with a decision (or a local retry when `peer` is `None`).
    /// Authority follows the transaction: a decision about a transaction this node holds comes
    /// from its coordinator or one of its nodes, never from an out-of-service node.
    async fn decide(&self, table: &str, event: Event, peer: Option<&str>) -> Response {
        let slot = match self.slot(table) {
            Ok(s) => s.clone(),
            Err(r) => return r,
        };
        let mut guard = slot.state.lock().await;
        if let Err(r) = self.flush(&slot, &guard) {
            return r;
        }
        if let Some(peer) = peer {
            let txid = match &event {
                Event::Commit { txid, .. } | Event::Abort { txid, .. } => Some(*txid),
                _ => None,
            };
            let in_service = self.cfg.node_by_name(peer).is_some_and(|n| n.in_service);
            let member = guard
                .active
                .as_ref()
                .filter(|a| Some(a.txid) == txid)
                .is_none_or(|a| a.coordinator == peer || a.nodes.iter().any(|n| n == peer));
            if !in_service || !member {
                warn!(%peer, ?event, "decision refused: the peer is not the transaction's coordinator or one of its in-service nodes");
                return Response::Refused(Refusal::NotAuthorized {
                    detail: format!("{peer} may not decide this transaction here"),
                });
            }
        }
        let actions = guard.step(event, now_ms());
        self.execute(&slot, guard, actions).await
    }

    /// Writes a journal that lags behind its machine; refuses to answer until it is written.
    fn flush(&self, slot: &Slot, state: &TableState) -> Result<(), Response> {
        use std::sync::atomic::Ordering;
        if !slot.dirty.load(Ordering::SeqCst) {
            return Ok(());
        }
        match self.journal.store(&slot.table.name, state) {
            Ok(()) => {
                slot.dirty.store(false, Ordering::SeqCst);
                Ok(())
            }
            Err(e) => Err(Response::Refused(Refusal::Storage {
                op: "journal".into(),
                path: self.cfg.state_dir.display().to_string(),
                error: e.to_string(),
            })),
        }
    }

    /// Streams the source of one generation from history.
    async fn fetch(&self, table: &str, generation: u64, send: &mut quinn::SendStream) {
        let path = match self.slot(table) {
            Err(r) => {
                self.reply(send, r).await;
                return;
            }
            Ok(_) => History::new(&self.cfg.state_dir, table).source(generation),
        };
        let Some(path) = path else {
            let r = Response::Refused(Refusal::Storage {
                op: "history".into(),
                path: table.to_string(),
                error: format!("generation {generation} is not in this node's history"),
            });
            self.reply(send, r).await;
            return;
        };
        let digest = match table::digest_file(&path) {
            Ok(d) => d,
            Err(e) => {
                self.reply(send, Response::Refused(e.into())).await;
                return;
            }
        };
        let header = Response::Source {
            len: digest.len,
            sha256: Sha256(digest.sha256),
        };
        if codec::write_frame(send, &header).await.is_err() {
            return;
        }
        let Ok(mut f) = tokio::fs::File::open(&path).await else {
            return;
        };
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            use tokio::io::AsyncReadExt;
            match f.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if send.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            }
        }
        let _ = send.finish();
    }

    /// Checks the live files against the recorded generation.
    async fn verify(&self, table: &str) -> Response {
        let slot = match self.slot(table) {
            Ok(s) => s.clone(),
            Err(r) => return r,
        };
        let (generation, sha) = {
            let st = slot.state.lock().await;
            (st.generation, st.sha256.map(|s| s.0))
        };
        let problems = table::verify_live(&self.cfg.postfix, &slot.table, sha).await;
        Response::Verified {
            generation,
            problems,
        }
    }

    /// What this node knows of `txid` (see [`Request::Outcome`]): its decision log first (it
    /// may be the coordinator's node; see [`log_answer`]), then its own participant state (see
    /// the proof rule of the machine's `Query`).
    async fn outcome(
        &self,
        table: &str,
        txid: TxId,
        generation: u64,
        coordinated_here: bool,
        fence: bool,
    ) -> Result<OutcomeAnswer, Response> {
        let storage = |e: std::io::Error| {
            Response::Refused(Refusal::Storage {
                op: "decision log".into(),
                path: self.cfg.state_dir.display().to_string(),
                error: e.to_string(),
            })
        };
        let answer = |d: &DecisionRecord| match d.verdict {
            Verdict::Commit => OutcomeAnswer::Committed {
                generation: d.generation,
            },
            Verdict::Abort => OutcomeAnswer::Aborted,
        };
        let slot = self.slot(table)?.clone();
        let log = DecisionLog::new(&self.cfg.state_dir);
        let decision = log.get(txid).map_err(storage)?;
        let open = log.open_record(txid).map_err(storage)?;
        let mut st = slot.state.lock().await;
        self.flush(&slot, &st)?;
        let own = st
            .active
            .as_ref()
            .filter(|a| a.txid == txid && a.phase == Phase::Prepared)
            .filter(|a| a.coordinator == self.cfg.node)
            .cloned();
        let from_log = if coordinated_here {
            log_answer(
                decision.as_ref().map(|d| (d.verdict, d.generation)),
                open.as_ref().map(|o| log.coordinator_alive(o)),
                fence,
            )
        } else {
            LogAnswer::AskParticipant
        };
        match from_log {
            LogAnswer::Answer(x) => Ok(x),
            LogAnswer::Fence => {
                drop(st);
                let (generation, nodes) = match (&open, &own) {
                    (Some(o), _) => (o.generation, o.nodes.clone()),
                    (None, Some(a)) => (a.generation, a.nodes.clone()),
                    (None, None) => (generation, Vec::new()),
                };
                let d = log
                    .decide(&DecisionRecord::fence(txid, table, generation, nodes))
                    .map_err(storage)?;
                info!(%txid, verdict = ?d.verdict, "in-doubt query about a transaction whose coordinator is gone: its decision stands");
                Ok(answer(&d))
            }
            LogAnswer::AskParticipant => {
                let actions = st.step(
                    Event::Query {
                        txid,
                        generation,
                        fence,
                    },
                    now_ms(),
                );
                match self.execute(&slot, st, actions).await {
                    Response::Outcome(x) => Ok(x),
                    other => Err(other),
                }
            }
        }
    }

    /// Resolves prepared transactions whose decision has not arrived: asks the coordinator's
    /// node (which fences a dead coordinator's transaction), and when that node cannot be
    /// reached for half the in-doubt bound, asks the transaction's other nodes (cooperative
    /// termination); concludes only what [`resolve`] allows. Also retries the renames of
    /// transactions decided commit whose install failed (a storage error), with backoff.
    async fn resolve_loop(self: Arc<Self>, cluster: Arc<Cluster>) {
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        let mut install_retry: HashMap<String, (u64, u32)> = HashMap::new();
        loop {
            tick.tick().await;
            for slot in self.slots.values() {
                let active = slot.state.lock().await.active.clone();
                let table = slot.table.name.clone();
                match active {
                    Some(a) if a.phase == Phase::Installing => {
                        let (next, tries) = install_retry.get(&table).copied().unwrap_or((0, 0));
                        if now_ms() < next {
                            continue;
                        }
                        let resp = self
                            .decide(
                                &table,
                                Event::Commit {
                                    txid: a.txid,
                                    generation: a.generation,
                                },
                                None,
                            )
                            .await;
                        if matches!(resp, Response::Committed { .. }) {
                            info!(%table, txid = %a.txid, tries = tries + 1, "interrupted commit finished");
                            install_retry.remove(&table);
                        } else {
                            let wait = (1000u64 << tries.min(5)).min(30_000);
                            warn!(%table, txid = %a.txid, answer = ?resp, retry_ms = wait, "commit decided but not installed yet; retrying");
                            install_retry.insert(table, (now_ms() + wait, tries + 1));
                        }
                    }
                    Some(a) if a.phase == Phase::Prepared => {
                        install_retry.remove(&table);
                        self.resolve_one(&cluster, &table, &a).await;
                    }
                    _ => {
                        install_retry.remove(&table);
                    }
                }
            }
        }
    }

    async fn resolve_one(&self, cluster: &Cluster, table: &str, a: &Active) {
        let age = now_ms().saturating_sub(a.since_ms);
        if age < 1000 {
            return;
        }
        let q = Request::Outcome {
            table: table.to_string(),
            txid: a.txid,
            generation: a.generation,
            coordinator: a.coordinator.clone(),
            fence: true,
        };
        let deadline = self.cfg.timeouts.connect;
        let member = |n: &str| a.nodes.iter().any(|m| m == n);
        let mut heard = Vec::new();
        let from_coordinator = if a.coordinator == self.cfg.node {
            self.outcome(table, a.txid, a.generation, true, true)
                .await
                .ok()
        } else if let Some(n) = self.cfg.node_by_name(&a.coordinator) {
            match ask(&cluster.connect(n).await, &q, deadline).await {
                Ok(Response::Outcome(x)) => Some(x),
                _ => None,
            }
        } else {
            None
        };
        if let Some(x) = from_coordinator {
            heard.push(Heard {
                node: a.coordinator.clone(),
                member: member(&a.coordinator),
                coordinator: true,
                answer: x,
            });
        }
        let mut verdict = resolve(&heard);
        if verdict.is_none() && age > self.cfg.timeouts.in_doubt.as_millis() as u64 / 2 {
            // The transaction's own node list: this node's idea of who is in service may
            // differ from the coordinator's.
            let peers: Vec<_> = a
                .nodes
                .iter()
                .filter(|n| **n != self.cfg.node && **n != a.coordinator)
                .filter_map(|n| self.cfg.node_by_name(n))
                .cloned()
                .collect();
            for n in peers {
                if let Ok(Response::Outcome(x)) =
                    ask(&cluster.connect(&n).await, &q, deadline).await
                {
                    heard.push(Heard {
                        node: n.name.clone(),
                        member: true,
                        coordinator: false,
                        answer: x,
                    });
                    verdict = resolve(&heard);
                    if verdict.is_some() {
                        info!(txid = %a.txid, peer = %n.name, answer = ?x, "cooperative termination");
                        break;
                    }
                }
            }
        }
        let event = match verdict {
            Some(Verdict::Commit) => Event::Commit {
                txid: a.txid,
                generation: a.generation,
            },
            Some(Verdict::Abort) => Event::Abort {
                txid: a.txid,
                generation: a.generation,
            },
            None => return,
        };
        info!(%table, txid = %a.txid, ?event, age_ms = age, "resolving an in-doubt transaction");
        let resp = self.decide(table, event, None).await;
        debug!(?resp, "resolved");
    }

    /// Re-drives decisions that a dead coordinator on this node did not finish delivering.
    async fn redrive_loop(self: Arc<Self>, cluster: Arc<Cluster>) {
        let mut tick = tokio::time::interval(Duration::from_millis(1000));
        loop {
            tick.tick().await;
            let log = DecisionLog::new(&self.cfg.state_dir);
            if log.list().is_empty() && log.list_open().is_empty() {
                continue;
            }
            txmap_coordinator::redrive::redrive(&cluster).await;
        }
    }

    /// Retries pending commits of this node (convergence), each when its backoff has passed.
    async fn pending_loop(self: Arc<Self>, cluster: Arc<Cluster>) {
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        loop {
            tick.tick().await;
            self.adopt_queued_requests();
            let log = DecisionLog::new(&self.cfg.state_dir);
            for p in log.list_pending() {
                let Some(slot) = self.slots.get(&p.table) else {
                    continue;
                };
                // A transaction still holds the table here: let it resolve first (a dead
                // coordinator's commit may be finishing; retrying now would only be refused).
                if slot.state.lock().await.active.is_some() {
                    continue;
                }
                // A live owner (a `txmap commit` or a hook request at work) keeps it until its
                // deadline; a dead one hands it over at once.
                let owner_alive = log.pending_owner_alive(&p.table);
                if now_ms() < p.next_ms && (owner_alive || p.owner_pid.is_none()) {
                    continue;
                }
                if txmap_coordinator::commit::converged(&cluster, &p.table, &p.source).await {
                    info!(table = %p.table, "pending commit already served everywhere (its coordinator finished before dying)");
                    log.clear_pending(&p.table, &p.source);
                    continue;
                }
                let r =
                    txmap_coordinator::commit::commit_tracked(&cluster, &p.table, &p.source).await;
                if r.exit == txmap_common::exit::OK {
                    info!(table = %p.table, attempts = p.attempts + 1, generation = ?r.generation, "pending commit done: the cluster serves the newest source");
                } else {
                    info!(table = %p.table, attempts = p.attempts + 1, error = %r.failures(), "pending commit failed again; will retry");
                }
            }
        }
    }

    /// Executes actions in order, feeding install results back into the machine.
    async fn execute(
        &self,
        slot: &Slot,
        mut state: MutexGuard<'_, TableState>,
        actions: Vec<Action>,
    ) -> Response {
        let t = &slot.table;
        let mut queue: VecDeque<Action> = actions.into();
        let mut persist_error: Option<Refusal> = None;
        let mut reply = Response::Refused(Refusal::Protocol {
            detail: "no reply".into(),
        });
        while let Some(a) = queue.pop_front() {
            match a {
                Action::Stage { .. } | Action::DiscardBody => {}
                Action::Persist => {
                    if let Err(e) = self.journal.store(&t.name, &state) {
                        warn!(error = %e, "journal write failed");
                        persist_error = Some(Refusal::Storage {
                            op: "journal".into(),
                            path: self.cfg.state_dir.display().to_string(),
                            error: e.to_string(),
                        });
                    }
                }
                Action::RemoveStaged { txid } => {
                    if let Err(e) = table::remove_staged(t, txid) {
                        warn!(error = %e, "could not remove staged files");
                    }
                    History::new(&self.cfg.state_dir, &t.name).drop_staged(txid);
                }
                Action::Unlock => {
                    if let Ok(mut l) = slot.lock.lock() {
                        *l = None;
                    }
                }
                Action::Install { txid } => {
                    fail::fail_point!("participant::before_commit_rename");
                    let installed = match state.active.as_ref().filter(|a| a.txid == txid) {
                        Some(a) => install_checked(t, a).map_err(Refusal::from),
                        None => Err(Refusal::UnknownTransaction { txid }),
                    };
                    let ev = match installed {
                        Ok(()) => {
                            fail::fail_point!("participant::after_commit_rename");
                            if let Some(a) = state.active.as_ref().filter(|a| a.txid == txid) {
                                record_history(&self.cfg, t, a);
                            }
                            Event::InstallDone { txid }
                        }
                        Err(why) => {
                            error!(%txid, error = %why, "commit decided but the install failed; it stays installing and is retried");
                            Event::InstallFailed { txid, why }
                        }
                    };
                    queue.extend(state.step(ev, now_ms()));
                }
                Action::Reply(r) => reply = r,
            }
        }
        if let (Some(why), Response::Prepared { txid }) = (&persist_error, &reply) {
            // Not durable, so not prepared: undo it all.
            let txid: TxId = *txid;
            if state.active.as_ref().is_some_and(|a| a.txid == txid) {
                state.active = None;
            }
            let _ = table::remove_staged(t, txid);
            if let Ok(mut l) = slot.lock.lock() {
                *l = None;
            }
            return Response::Refused(why.clone());
        }
        if let Some(why) = persist_error {
            // What happened is not durable yet: answer nothing from it. The journal is written
            // again before this table answers anything else.
            slot.dirty.store(true, std::sync::atomic::Ordering::SeqCst);
            return Response::Refused(why);
        }
        if let Response::Committed { txid, generation } = &reply {
            info!(%txid, generation, "committed");
        }
        reply
    }
}

/// Renames a transaction's staged files over the live ones. When both staged files are gone
/// (a crash after the renames, before the journal said so), the live source must be this
/// transaction's content: anything else is an error, never a generation reported installed.
fn install_checked(t: &TableConfig, a: &Active) -> Result<(), table::TableError> {
    let staged = table::staged_paths(t, a.txid);
    if !staged.indexed.exists() && !staged.source.exists() {
        let live = table::digest_file(&t.path)?;
        if live.sha256 != a.sha256.0 {
            return Err(table::TableError::Io {
                op: "install",
                path: staged.indexed.clone(),
                source: std::io::Error::other(format!(
                    "the staged files of {} are missing and the live source is not its content",
                    a.txid
                )),
            });
        }
        return Ok(());
    }
    table::install(t, &staged)
}

/// Turns the history copies of an installed transaction into its generation. History is for
/// operators: a failure is logged, never fatal.
fn record_history(cfg: &Config, t: &TableConfig, a: &txmap_common::machine::Active) {
    let entry = HistoryEntry {
        generation: a.generation,
        committed_at_ms: now_ms(),
        sha256: a.sha256,
        entries: a.entries,
        coordinator: a.coordinator.clone(),
        txid: a.txid,
    };
    if let Err(e) = History::new(&cfg.state_dir, &t.name).finalize(&entry, cfg.history_keep) {
        warn!(error = %e, "cannot record the generation in history");
    }
}
