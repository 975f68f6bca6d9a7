//! Cleanup that failed: staged files of a finished transaction (aborted, or refused before it
//! was prepared) whose removal failed with a storage error. Each is recorded here, retried by
//! [`Node::cleanup_loop`] with the backoff of the install retries ([`retry_wait_ms`]), logged
//! at warn, and shown in `status` ([`CleanupInfo`]) until its files are gone.
//!
//! Kept in memory only: start-up removes every staged file of a transaction that is not the
//! journal's active one (`server::open_slot`), so a restart loses nothing here; what fails
//! there is recorded here too.

use crate::resolve::retry_wait_ms;
use crate::server::{Live, Node};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tracing::{info, warn};
use txmap_common::config::TableConfig;
use txmap_common::now_ms;
use txmap_common::proto::{CleanupInfo, TxId};
use txmap_common::table;

/// One transaction whose staged files could not all be removed.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Failed {
    since_ms: u64,
    attempts: u32,
    next_ms: u64,
    last_error: String,
}

/// The failed cleanups of one table (see the module doc).
#[derive(Debug, Default)]
pub(crate) struct CleanupCell(std::sync::Mutex<BTreeMap<TxId, Failed>>);

impl CleanupCell {
    fn map(&self) -> std::sync::MutexGuard<'_, BTreeMap<TxId, Failed>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records that removing the staged files of `txid` failed at `now`; logs it at warn.
    pub(crate) fn failed(
        &self,
        t: &TableConfig,
        txid: TxId,
        error: &dyn std::fmt::Display,
        now: u64,
    ) {
        let mut map = self.map();
        let f = map.entry(txid).or_insert(Failed {
            since_ms: now,
            attempts: 0,
            next_ms: now,
            last_error: String::new(),
        });
        let wait = retry_wait_ms(f.attempts);
        f.attempts = f.attempts.saturating_add(1);
        f.next_ms = now.saturating_add(wait);
        f.last_error = error.to_string();
        warn!(table = %t.name, %txid, error = %error, attempts = f.attempts, retry_ms = wait,
            "could not remove the staged files of a finished transaction; retrying in the background");
    }

    /// The staged files of `txid` are gone.
    pub(crate) fn done(&self, txid: TxId) -> bool {
        self.map().remove(&txid).is_some()
    }

    /// Transactions whose retry is due at `now`.
    fn due(&self, now: u64) -> Vec<TxId> {
        self.map()
            .iter()
            .filter(|(_, f)| f.next_ms <= now)
            .map(|(txid, _)| *txid)
            .collect()
    }

    /// What `status` shows: `None` when nothing is left to clean up.
    pub(crate) fn info(&self, t: &TableConfig) -> Option<CleanupInfo> {
        let map = self.map();
        let last = map.values().max_by_key(|f| (f.next_ms, f.attempts))?;
        let staged_files = table::list_staged(t)
            .iter()
            .filter(|(txid, _)| map.contains_key(txid))
            .count() as u64;
        Some(CleanupInfo {
            staged_files,
            transactions: map.len() as u32,
            since_ms: map.values().map(|f| f.since_ms).min().unwrap_or_default(),
            attempts: map.values().map(|f| f.attempts).sum(),
            last_error: last.last_error.clone(),
        })
    }
}

impl Node {
    /// Retries the failed cleanups of every table, each when its backoff has passed.
    pub(crate) async fn cleanup_loop(live: Arc<Live>) {
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        loop {
            tick.tick().await;
            let this = live.node();
            for slot in this.slots.values() {
                let due = slot.cleanup.due(now_ms());
                if due.is_empty() {
                    continue;
                }
                // Under the table's state lock, as every other removal of staged files.
                let state = slot.state.lock().await;
                for txid in due {
                    let t = &slot.table;
                    if state.active.as_ref().is_some_and(|a| a.txid == txid) {
                        // The files belong to a live transaction again: its end removes them.
                        slot.cleanup.done(txid);
                        continue;
                    }
                    match table::remove_staged(t, txid) {
                        Ok(()) => {
                            slot.cleanup.done(txid);
                            info!(table = %t.name, %txid, "staged files of a finished transaction removed (retry)");
                        }
                        Err(e) => slot.cleanup.failed(t, txid, &e, now_ms()),
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(dir: &std::path::Path) -> TableConfig {
        use txmap_common::config::{Builder, TableType, VerifyMode};
        TableConfig {
            name: "t".into(),
            path: dir.join("t"),
            source: None,
            kind: TableType::Hash,
            builder: Builder::Postmap,
            allow_warnings: false,
            verify: VerifyMode::Count,
        }
    }

    #[test]
    fn a_failed_cleanup_backs_off_shows_its_files_and_clears_when_done() {
        let dir = std::env::temp_dir().join(format!("txmap-cleanup-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let t = table(&dir);
        let (a, b) = (TxId(1), TxId(2));
        let staged = table::staged_paths(&t, a);
        std::fs::write(&staged.source, b"k v\n").expect("write");
        std::fs::write(&staged.indexed, b"").expect("write");

        let cell = CleanupCell::default();
        assert_eq!(cell.info(&t), None);
        cell.failed(&t, a, &"remove x: Input/output error", 1000);
        assert!(cell.due(1999).is_empty(), "retried before its backoff");
        assert_eq!(cell.due(2000), vec![a]);
        cell.failed(&t, a, &"remove x: EIO again", 2000);
        assert!(cell.due(3999).is_empty(), "the backoff did not grow");
        assert_eq!(cell.due(4000), vec![a]);
        let info = cell.info(&t).expect("shown");
        assert_eq!(
            (info.staged_files, info.transactions, info.attempts),
            (2, 1, 2)
        );
        assert_eq!(
            (info.since_ms, info.last_error.as_str()),
            (1000, "remove x: EIO again")
        );
        // A transaction whose files are already gone still shows until its retry says so.
        cell.failed(&t, b, &"remove y: EIO", 4000);
        assert_eq!(
            cell.info(&t).map(|i| (i.staged_files, i.transactions)),
            Some((2, 2))
        );

        table::remove_staged(&t, a).expect("remove");
        assert!(cell.done(a));
        assert!(cell.done(b));
        assert_eq!(cell.info(&t), None);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
