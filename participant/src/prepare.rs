//! Prepare: the machine's `Stage` action run outside the table's mutex (lock, receive, build,
//! verify, fsync), bounded so a stalled coordinator cannot hold a table.

use crate::server::{Node, Slot};
use tracing::{debug, info, warn};
use txmap_common::delta;
use txmap_common::history::History;
use txmap_common::machine::{Action, Event};
use txmap_common::now_ms;
use txmap_common::proto::{Prepare, Refusal, Response, Sha256};
use txmap_common::table;

/// A delta prepare: the base it applies to and the bytes of script that follow.
pub(crate) type DeltaHeader = Option<(Sha256, u64)>;

impl Node {
    pub(crate) async fn prepare(
        &self,
        peer: &str,
        p: Prepare,
        delta: DeltaHeader,
        recv: &mut quinn::RecvStream,
    ) -> Response {
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
            change: p.change,
        };
        let actions = slot.state.lock().await.step(event, now_ms());
        if actions.first() != Some(&Action::Stage { txid: p.txid }) {
            let _ = recv.stop(quinn::VarInt::from_u32(0));
            return self.execute(&slot, slot.state.lock().await, actions).await;
        }
        let started = std::time::Instant::now();
        // A coordinator that stalls mid-upload must not hold the table forever.
        // A node sent a delta may still build the whole table: the whole table's budget.
        let limit = self.cfg.timeouts.prepare_for(p.source_len, true) * 3;
        let staged = tokio::time::timeout(limit, self.stage(&slot, &p, delta, recv))
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
                delta = delta.map(|d| d.1),
                entries = p.entries,
                ms = started.elapsed().as_millis() as u64,
                "prepared"
            );
            fail::fail_point!("participant::after_prepared_durable");
        }
        resp
    }

    /// Lock, receive, build, verify, fsync. Any error leaves cleanup to the machine's actions.
    pub(crate) async fn stage(
        &self,
        slot: &Slot,
        p: &Prepare,
        delta: DeltaHeader,
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
        // A delta's source is checked by sha256 and usually built in place: the full build's
        // check is only computed if that build is needed.
        let mut w = table::SourceWriter::create_with(t, &staged, delta.is_none())?;
        let change = match delta {
            None => {
                receive_whole(&mut w, p, recv).await?;
                None
            }
            Some((base, len)) => {
                let (back, applied, pre) = self
                    .receive_delta(slot, w, (base, len), p.source_len, &staged, recv)
                    .await?;
                w = back;
                Some((applied, pre))
            }
        };
        let t_upload = std::time::Instant::now();
        // The source's fsync runs beside the build; it is waited for before the `.db`'s.
        let (got, check, source_sync) = w.finish()?;
        if got.len != p.source_len || got.sha256 != p.sha256.0 {
            let detail = format!(
                "received {} bytes sha256 {}, announced {} bytes sha256 {}",
                got.len,
                table::hex(&got.sha256),
                p.source_len,
                p.sha256
            );
            return Err(match delta {
                // Rebuilt from this node's own copy: the coordinator sends the whole table.
                Some(_) => Refusal::DeltaBase { detail },
                None => Refusal::ContentMismatch { detail },
            });
        }
        // The history copy (a link and a directory fsync) is made beside the build; it is
        // joined whatever the build's outcome, so an aborted prepare's cleanup never races it.
        let history = {
            let (h, txid, st) = (
                History::new(&self.cfg.state_dir, &t.name),
                p.txid,
                staged.clone(),
            );
            tokio::task::spawn_blocking(move || h.stage(txid, &st))
        };
        let built = self
            .build_checked(
                slot,
                p,
                &staged,
                change,
                (check, got.entries),
                source_sync,
                t_upload,
            )
            .await;
        match history.await {
            Ok(Ok(())) => {}
            // History is for operators; it never fails a transaction.
            Ok(Err(e)) => warn!(error = %e, "cannot copy the new table into history"),
            Err(e) => warn!(error = %e, "cannot copy the new table into history"),
        }
        built?;
        fail::fail_point!("participant::after_stage");
        Ok(())
    }

    /// Builds (incrementally when `change` allows), verifies and fsyncs a staged table whose
    /// source is received and checked.
    #[allow(clippy::too_many_arguments)]
    async fn build_checked(
        &self,
        slot: &Slot,
        p: &Prepare,
        staged: &table::Staged,
        change: Option<(delta::Applied, Option<table::Prestarted>)>,
        (check, entries): (table::Check, u64),
        source_sync: table::Syncing,
        t_upload: std::time::Instant,
    ) -> Result<(), Refusal> {
        let t = &slot.table;
        let delta = change.is_some();
        let t_received = std::time::Instant::now();
        let incremental = match change {
            Some((applied, pre)) => self.build_incremental(slot, p, staged, &applied, pre).await,
            None => false,
        };
        if !incremental {
            crate::spare::discard(&slot.spare);
            table::build(&self.cfg.postfix, t, staged).await?;
        }
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
        if !incremental {
            let check = match delta {
                true => table::check_of(t, &staged.source)?,
                false => check,
            };
            // The `.db`'s fsync runs beside its verification (an incremental build does the
            // same inside).
            let db_sync = table::sync_path_beside(&staged.indexed)?;
            table::verify(&self.cfg.postfix, t, staged, entries, check).await?;
            db_sync.wait()?;
        }
        let t_verified = std::time::Instant::now();
        source_sync.wait()?;
        let t_source_synced = std::time::Instant::now();
        table::fsync_path(&staged.indexed)?;
        table::fsync_dir(t.dir())?;
        let ms = |a: std::time::Instant, b: std::time::Instant| (b - a).as_secs_f64() * 1000.0;
        debug!(
            finish_ms = ms(t_upload, t_received),
            build_ms = ms(t_received, t_built),
            verify_ms = ms(t_built, t_verified),
            source_fsync_wait_ms = ms(t_verified, t_source_synced),
            fsync_ms = ms(t_source_synced, std::time::Instant::now()),
            "staged"
        );
        Ok(())
    }

    /// Reads a delta script and rebuilds the whole new source from this node's live copy into
    /// `w`. A base other than the live content, or a script that does not fit it, is refused
    /// with [`Refusal::DeltaBase`] (the coordinator then sends the whole table).
    async fn receive_delta(
        &self,
        slot: &Slot,
        mut writer: table::SourceWriter,
        (base, len): (Sha256, u64),
        new_len: u64,
        staged: &table::Staged,
        recv: &mut quinn::RecvStream,
    ) -> Result<
        (
            table::SourceWriter,
            delta::Applied,
            Option<table::Prestarted>,
        ),
        Refusal,
    > {
        let t = &slot.table;
        // A delta is small by definition: beyond this node's own share of the table it is
        // refused before it is read (the coordinator then sends the whole table), so a peer
        // cannot make this node hold a table-sized script, or table-sized change sets.
        let max_change = 64 * 1024 + new_len.saturating_mul(self.cfg.delta_max_percent) / 100;
        if len > max_change {
            return Err(Refusal::DeltaBase {
                detail: format!(
                    "a delta of {len} bytes is above this node's limit of {max_change}"
                ),
            });
        }
        let mut script = Vec::with_capacity(len.min(1 << 20) as usize);
        loop {
            match recv.read_chunk(256 * 1024, true).await {
                Ok(Some(chunk)) => {
                    if script.len() as u64 + chunk.bytes.len() as u64 > len {
                        return Err(Refusal::ContentMismatch {
                            detail: format!("more than the announced {len} bytes of delta"),
                        });
                    }
                    script.extend_from_slice(&chunk.bytes);
                }
                Ok(None) => break,
                Err(e) => {
                    return Err(Refusal::ContentMismatch {
                        detail: format!("delta upload broken after {} bytes: {e}", script.len()),
                    })
                }
            }
        }
        if script.len() as u64 != len {
            return Err(Refusal::ContentMismatch {
                detail: format!("received {} of {len} bytes of delta", script.len()),
            });
        }
        let (live_sha, source_stamp) = {
            let s = slot.state.lock().await;
            (s.sha256, s.source_stamp)
        };
        if live_sha != Some(base) {
            return Err(Refusal::DeltaBase {
                detail: format!(
                    "the delta applies to {base}, this node serves {}",
                    live_sha
                        .map(|s| s.to_string())
                        .unwrap_or_else(|| "nothing".into())
                ),
            });
        }
        let history = History::new(&self.cfg.state_dir, &t.name);
        let (file, _) = history
            .open_live(&t.path, self.cfg.max_table_bytes)
            .map_err(|e| Refusal::DeltaBase {
                detail: format!("live source: {e}"),
            })?;
        // The live source as installed (same inode, size, mtime and ctime) is the recorded
        // content: it is not hashed again (at 1,000,000 lines that is a third of the node's
        // work). Anything else is hashed and must be the base.
        let known = source_stamp.is_some()
            && file
                .metadata()
                .is_ok_and(|m| Some(table::FileStamp::of(&m)) == source_stamp);
        // The incremental build's first builder starts now: its start-up runs beside the
        // rebuild.
        let pre = self.prestart(slot, &script, staged).await;
        let reader = std::io::BufReader::with_capacity(256 * 1024, file);
        // The rebuild is CPU and disk work: off the async threads.
        let res = tokio::task::spawn_blocking(move || {
            let r = delta::apply(reader, &script, 2 * max_change, !known, |b| {
                writer
                    .write(b)
                    .map_err(|e| std::io::Error::other(e.to_string()))
            });
            (r, writer)
        })
        .await;
        let (applied, writer) = res.map_err(|e| Refusal::Storage {
            op: "delta".into(),
            path: t.path.display().to_string(),
            error: e.to_string(),
        })?;
        let applied = applied.map_err(|e| Refusal::DeltaBase {
            detail: e.to_string(),
        })?;
        if applied.base_sha256.is_some_and(|s| s != base.0) {
            return Err(Refusal::DeltaBase {
                detail: format!(
                    "the live source {} is not the recorded content (drifted)",
                    t.path.display()
                ),
            });
        }
        Ok((writer, applied, pre))
    }

    /// Puts the spare copy at the staged name and starts the builder the change needs first
    /// ([`table::prestart_incremental`]) when the delta looks eligible for an incremental
    /// build; [`Node::build_incremental`] decides, and stops it if not.
    async fn prestart(
        &self,
        slot: &Slot,
        script: &[u8],
        staged: &table::Staged,
    ) -> Option<table::Prestarted> {
        let t = &slot.table;
        if !crate::spare::wanted(&self.cfg, t) {
            return None;
        }
        let (stamp, deltas) = {
            let s = slot.state.lock().await;
            (s.indexed_stamp?, s.deltas_since_full)
        };
        let (dropped, inserted) = delta::summary(script)?;
        if deltas >= self.cfg.delta_full_every || (dropped == 0 && inserted == 0) {
            return None;
        }
        let spare = crate::spare::take_ready(&slot.spare)?;
        let (postfix, t, staged) = (self.cfg.postfix.clone(), t.clone(), staged.clone());
        tokio::task::spawn_blocking(move || {
            table::prestart_incremental(&postfix, &t, &staged, stamp, spare, dropped > 0)
        })
        .await
        .ok()
        .flatten()
    }

    /// Tries the incremental build of a delta prepare; false when the full build must run
    /// (not eligible, or the incremental build failed: it is never the only way).
    async fn build_incremental(
        &self,
        slot: &Slot,
        p: &Prepare,
        staged: &table::Staged,
        applied: &delta::Applied,
        pre: Option<table::Prestarted>,
    ) -> bool {
        let t = &slot.table;
        let (stamp, base_entries, deltas) = {
            let s = slot.state.lock().await;
            (s.indexed_stamp, s.entries, s.deltas_since_full)
        };
        let count = |b: &[u8]| {
            let mut c = table::EntryCounter::default();
            c.feed(b);
            c.entries()
        };
        let (dropped, inserted) = (count(&applied.dropped), count(&applied.inserted));
        let why_not = if !table::updatable(t.kind) {
            Some(format!(
                "{} tables cannot be updated in place",
                t.kind.as_str()
            ))
        } else if t.allow_warnings {
            Some("the table allows builder warnings".into())
        } else if stamp.is_none() {
            Some("no record of the live indexed file".into())
        } else if deltas >= self.cfg.delta_full_every {
            Some(format!(
                "{deltas} incremental builds in a row: a full one is due"
            ))
        } else if (dropped + inserted) * 100 > self.cfg.delta_max_percent * base_entries.max(1) {
            Some(format!(
                "the change ({dropped} removed, {inserted} added) is above delta_max_percent of {base_entries} entries"
            ))
        } else if base_entries + inserted != p.entries + dropped {
            Some(format!(
                "entry count: {base_entries} - {dropped} + {inserted} is not {}",
                p.entries
            ))
        } else {
            None
        };
        if let Some(why) = why_not {
            debug!(%why, "full build");
            if let Some(pre) = pre {
                // Its builder stopped first, then the spare copy it was given is removed.
                drop(pre);
                let _ = std::fs::remove_file(&staged.indexed);
            }
            return false;
        }
        let Some(stamp) = stamp else { return false };
        let prestarted = pre.is_some();
        match table::build_incremental(
            &self.cfg.postfix,
            t,
            staged,
            stamp,
            match pre {
                Some(pre) => table::StagedCopy::Placed(pre),
                None => table::StagedCopy::Spare(crate::spare::take(&slot.spare)),
            },
            &applied.dropped,
            &applied.inserted,
        )
        .await
        {
            Ok(from_spare) => {
                debug!(from_spare, prestarted, "incremental build");
                if let Some(a) = slot.state.lock().await.active.as_mut() {
                    a.incremental = true;
                }
                true
            }
            Err(e) => {
                warn!(error = %e, "incremental build not possible; building the whole table");
                let _ = std::fs::remove_file(&staged.indexed);
                false
            }
        }
    }
}

/// Receives a whole table into `w`.
async fn receive_whole(
    w: &mut table::SourceWriter,
    p: &Prepare,
    recv: &mut quinn::RecvStream,
) -> Result<(), Refusal> {
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
            Ok(None) => return Ok(()),
            Err(e) => {
                return Err(Refusal::ContentMismatch {
                    detail: format!("upload broken after {} bytes: {e}", w.len()),
                })
            }
        }
    }
}
