//! Prepare: the machine's `Stage` action run outside the table's mutex (lock, receive, build,
//! verify, fsync), bounded so a stalled coordinator cannot hold a table.

use crate::server::{Node, Slot};
use tracing::{debug, info, warn};
use txmap_common::history::History;
use txmap_common::machine::{Action, Event};
use txmap_common::now_ms;
use txmap_common::proto::{Prepare, Refusal, Response};
use txmap_common::table;

impl Node {
    pub(crate) async fn prepare(
        &self,
        peer: &str,
        p: Prepare,
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
            requested_ms: p.requested_ms,
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
    pub(crate) async fn stage(
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
}
