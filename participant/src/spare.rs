//! Spare copies of the live indexed files (see [`table::Spare`]): made in the background once a
//! table is idle after a transaction, taken by the next incremental build, so a one-list change
//! to a big table does not copy its whole `.db` while the cluster waits. Only for tables that
//! may be built incrementally (delta commits on, an updatable type, no builder warnings).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use tracing::debug;
use txmap_common::config::{Config, TableConfig};
use txmap_common::table::{self, FileStamp, Spare};

/// Where a table's spare copy is.
#[derive(Debug, Default)]
pub(crate) enum SpareState {
    /// None.
    #[default]
    Empty,
    /// Being copied from the live file stamped `of`; `cancel` stops it.
    Copying {
        of: FileStamp,
        cancel: Arc<AtomicBool>,
    },
    /// Ready.
    Ready(Spare),
}

/// A table's spare, shared with its copying task.
pub(crate) type SpareCell = Arc<Mutex<SpareState>>;

fn lock(cell: &SpareCell) -> std::sync::MutexGuard<'_, SpareState> {
    cell.lock().unwrap_or_else(|p| p.into_inner())
}

/// True when incremental builds, hence spares, are possible for `t`.
pub(crate) fn wanted(cfg: &Config, t: &TableConfig) -> bool {
    cfg.delta_max_percent > 0 && table::updatable(t.kind) && !t.allow_warnings
}

/// Makes sure a spare of the live file stamped `of` exists or is being made (called when the
/// table is idle). A spare of another live file is removed first.
pub(crate) fn refresh(cell: &SpareCell, t: &TableConfig, of: FileStamp) {
    let mut g = lock(cell);
    match &*g {
        SpareState::Ready(s) if s.of == of => return,
        SpareState::Copying { of: o, .. } if *o == of => return,
        _ => {}
    }
    match std::mem::take(&mut *g) {
        SpareState::Ready(s) => {
            let _ = std::fs::remove_file(&s.path);
        }
        SpareState::Copying { cancel, .. } => cancel.store(true, Ordering::SeqCst),
        SpareState::Empty => {}
    }
    let cancel = Arc::new(AtomicBool::new(false));
    *g = SpareState::Copying {
        of,
        cancel: cancel.clone(),
    };
    drop(g);
    let (cell, t) = (cell.clone(), t.clone());
    tokio::task::spawn_blocking(move || {
        // Not while the other nodes are still finishing the same commit (their fsyncs share
        // the disk in a test cluster, and in a real one the commit's tail is latency).
        std::thread::sleep(std::time::Duration::from_millis(300));
        let made = table::make_spare(&t, of, &cancel);
        let mut g = lock(&cell);
        let mine = matches!(&*g, SpareState::Copying { cancel: c, .. } if Arc::ptr_eq(c, &cancel));
        match made {
            Ok(s) if mine && !cancel.load(Ordering::SeqCst) => *g = SpareState::Ready(s),
            Ok(s) => {
                let _ = std::fs::remove_file(&s.path);
            }
            Err(e) => {
                debug!(table = %t.name, error = %e, "no spare copy of the live indexed file");
                if mine {
                    *g = SpareState::Empty;
                }
            }
        }
    });
}

/// Takes the ready spare, if any, for an incremental build; a copy still being made is
/// cancelled (the build copies the live file itself).
pub(crate) fn take(cell: &SpareCell) -> Option<Spare> {
    match std::mem::take(&mut *lock(cell)) {
        SpareState::Ready(s) => Some(s),
        SpareState::Copying { cancel, .. } => {
            cancel.store(true, Ordering::SeqCst);
            None
        }
        SpareState::Empty => None,
    }
}

/// Takes the spare only when it is ready (a copy still being made goes on).
pub(crate) fn take_ready(cell: &SpareCell) -> Option<Spare> {
    let mut g = lock(cell);
    match std::mem::take(&mut *g) {
        SpareState::Ready(s) => Some(s),
        other => {
            *g = other;
            None
        }
    }
}

/// Drops the spare (a prepare that builds in full does not use it, and it must not hold the
/// space that build needs on a nearly full disk); made again once the table is idle.
pub(crate) fn discard(cell: &SpareCell) {
    if let Some(s) = take(cell) {
        let _ = std::fs::remove_file(&s.path);
    }
}
