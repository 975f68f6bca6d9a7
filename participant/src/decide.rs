//! Decisions and the machine's actions: `Commit`/`Abort` with their authority check, the journal
//! (a failed write blocks the table until written), installs, unlock.

use crate::server::{Node, Slot};
use std::collections::VecDeque;
use tokio::sync::MutexGuard;
use tracing::{error, info, warn};
use txmap_common::config::{Config, TableConfig};
use txmap_common::history::History;
use txmap_common::machine::{Action, Active, Event, TableState};
use txmap_common::now_ms;
use txmap_common::proto::{HistoryEntry, Refusal, Response, TxId};
use txmap_common::table;

impl Node {
    /// Steps a table's machine with a decision (or a local retry when `peer` is `None`).
    /// Authority follows the transaction: a decision about a transaction this node holds comes
    /// from its coordinator or one of its nodes, never from an out-of-service node.
    pub(crate) async fn decide(&self, table: &str, event: Event, peer: Option<&str>) -> Response {
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
                // Logged once, with the peer and the reason, where the reply is sent (serve.rs).
                return Response::Refused(Refusal::NotAuthorized {
                    detail: format!(
                        "{peer} is not the coordinator or an in-service node of this transaction"
                    ),
                });
            }
        }
        let actions = guard.step(event, now_ms());
        self.execute(&slot, guard, actions).await
    }

    /// Writes a journal that lags behind its machine; refuses to answer until it is written.
    pub(crate) fn flush(&self, slot: &Slot, state: &TableState) -> Result<(), Response> {
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

    /// Executes actions in order, feeding install results back into the machine.
    pub(crate) async fn execute(
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
        // Work an install leaves for after the reply: the replaced `.db`, held open so that
        // freeing its blocks (166 MB at 1,000,000 lines) does not happen inside the rename,
        // and the history generations to drop.
        let mut after_install: Option<Option<std::fs::File>> = None;
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
                    match table::remove_staged(t, txid) {
                        Ok(()) => {
                            slot.cleanup.done(txid);
                        }
                        Err(e) => slot.cleanup.failed(t, txid, &e, now_ms()),
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
                    let staged = table::staged_paths(t, txid);
                    let (held, held_source) = (
                        table::hold_staged(&staged),
                        table::hold_staged_source(&staged),
                    );
                    let replaced = table::hold_live_indexed(t);
                    let installed = match state.active.as_ref().filter(|a| a.txid == txid) {
                        Some(a) => install_checked(t, a).map_err(Refusal::from),
                        None => Err(Refusal::UnknownTransaction { txid }),
                    };
                    let mut installed_as = None;
                    let ev = match installed {
                        Ok(()) => {
                            fail::fail_point!("participant::after_commit_rename");
                            if let Some(a) = state.active.as_ref().filter(|a| a.txid == txid) {
                                record_history(&self.cfg, t, a);
                                after_install = Some(replaced);
                                // What the next incremental build may copy: this very file.
                                installed_as = Some((
                                    table::stamp_installed(held, t),
                                    table::stamp_installed_source(held_source, t),
                                    a.incremental,
                                ));
                            }
                            Event::InstallDone { txid }
                        }
                        Err(why) => {
                            error!(%txid, error = %why, "commit decided but the install failed; it stays installing and is retried");
                            Event::InstallFailed { txid, why }
                        }
                    };
                    queue.extend(state.step(ev, now_ms()));
                    if let Some((stamp, source_stamp, incremental)) = installed_as {
                        if state.last_txid == Some(txid) {
                            // Persisted with the generation (the Persist action is queued).
                            state.indexed_stamp = stamp;
                            state.source_stamp = source_stamp;
                            state.deltas_since_full = match incremental {
                                true => state.deltas_since_full.saturating_add(1),
                                false => 0,
                            };
                        }
                    }
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
            if let Err(e) = table::remove_staged(t, txid) {
                slot.cleanup.failed(t, txid, &e, now_ms());
            }
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
        if let Some(replaced) = after_install {
            let (history, keep) = (
                History::new(&self.cfg.state_dir, &t.name),
                self.cfg.history_keep,
            );
            tokio::task::spawn_blocking(move || {
                drop(replaced);
                history.prune(keep);
            });
        }
        self.refresh_spare(slot, &state);
        reply
    }

    /// Once the table is idle, makes sure the next incremental build finds a spare copy of
    /// the live indexed file (see `spare.rs`).
    pub(crate) fn refresh_spare(&self, slot: &Slot, state: &TableState) {
        if state.active.is_none() && crate::spare::wanted(&self.cfg, &slot.table) {
            if let Some(of) = state.indexed_stamp {
                crate::spare::refresh(&slot.spare, &slot.table, of);
            }
        }
    }
}

/// Renames a transaction's staged files over the live ones. When both staged files are gone
/// (a crash after the renames, before the journal said so), the live source must be this
/// transaction's content: anything else is an error, never a generation reported installed.
pub(crate) fn install_checked(t: &TableConfig, a: &Active) -> Result<(), table::TableError> {
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

/// Turns the history copies of an installed transaction into its generation (old generations
/// are dropped by the caller, [`History::prune`]). History is for operators: a failure is
/// logged, never fatal.
pub(crate) fn record_history(cfg: &Config, t: &TableConfig, a: &txmap_common::machine::Active) {
    let entry = HistoryEntry {
        generation: a.generation,
        committed_at_ms: now_ms(),
        sha256: a.sha256,
        entries: a.entries,
        coordinator: a.coordinator.clone(),
        txid: a.txid,
    };
    if let Err(e) = History::new(&cfg.state_dir, &t.name).finalize_only(&entry) {
        warn!(error = %e, "cannot record the generation in history");
    }
}
