//! The participant's durable record of each table: one small JSON file per table under
//! `<state_dir>/tables/`, replaced atomically (write to a temporary file, fsync it, rename it
//! over the old one, fsync the directory). JSON so an operator can read it in an emergency.

use crate::machine::TableState;
use std::io::Write;
use std::path::{Path, PathBuf};

/// Journal errors.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    /// Reading or writing failed.
    #[error("journal {}: {source}", path.display())]
    Io {
        /// File.
        path: PathBuf,
        /// OS error.
        source: std::io::Error,
    },
    /// The file exists but is not a valid record (it is left in place for inspection).
    #[error("journal {} is corrupt: {detail}", path.display())]
    Corrupt {
        /// File.
        path: PathBuf,
        /// Parser message.
        detail: String,
    },
}

/// The journal directory of one node.
#[derive(Debug, Clone)]
pub struct Journal {
    dir: PathBuf,
}

impl Journal {
    /// Opens (creating if needed) `<state_dir>/tables`.
    pub fn open(state_dir: &Path) -> Result<Journal, JournalError> {
        let dir = state_dir.join("tables");
        crate::table::create_dir_durable(&dir, 0o700).map_err(|source| JournalError::Io {
            path: dir.clone(),
            source,
        })?;
        Ok(Journal { dir })
    }

    fn path(&self, table: &str) -> PathBuf {
        self.dir.join(format!("{table}.json"))
    }

    /// Reads a table's state; a table never committed has the default state.
    pub fn load(&self, table: &str) -> Result<TableState, JournalError> {
        let path = self.path(table);
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| JournalError::Corrupt {
                path,
                detail: e.to_string(),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(TableState::default()),
            Err(source) => Err(JournalError::Io { path, source }),
        }
    }

    /// The sha256 of the content a table's journal in `state_dir` records as live, read
    /// without creating anything; `None` when there is no readable journal for it.
    pub fn recorded_sha256(state_dir: &Path, table: &str) -> Option<crate::proto::Sha256> {
        let journal = Journal {
            dir: state_dir.join("tables"),
        };
        journal.load(table).ok()?.sha256
    }

    /// Durably replaces a table's state. A staging transaction is recorded as absent: only
    /// prepared and later phases survive a crash.
    pub fn store(&self, table: &str, state: &TableState) -> Result<(), JournalError> {
        let mut durable = state.clone();
        if durable
            .active
            .as_ref()
            .is_some_and(|a| a.phase == crate::machine::Phase::Staging)
        {
            durable.active = None;
        }
        let path = self.path(table);
        fail::fail_point!("journal::store", |_| Err(JournalError::Io {
            path: path.clone(),
            source: std::io::Error::other("injected failure (journal::store)"),
        }));
        let tmp = self.dir.join(format!(".{table}.json.tmp"));
        let io = |source| JournalError::Io {
            path: path.clone(),
            source,
        };
        let bytes =
            serde_json::to_vec_pretty(&durable).map_err(|e| io(std::io::Error::other(e)))?;
        let mut f = std::fs::File::create(&tmp).map_err(io)?;
        f.write_all(&bytes).map_err(io)?;
        f.sync_all().map_err(io)?;
        drop(f);
        std::fs::rename(&tmp, &path).map_err(io)?;
        std::fs::File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::machine::{Event, Phase};
    use crate::proto::{Sha256, TxId};

    #[test]
    fn stores_prepared_state_but_never_staging() {
        let dir = std::env::temp_dir().join(format!("txmap-journal-{}", TxId::random()));
        let j = Journal::open(&dir).unwrap();
        assert_eq!(j.load("t").unwrap(), TableState::default());
        let mut s = TableState::default();
        s.step(
            Event::Prepare {
                txid: TxId(1),
                generation: 1,
                coordinator: "n".into(),
                sha256: Sha256([2; 32]),
                entries: 1,
                nodes: vec![],
                change: None,
            },
            0,
        );
        j.store("t", &s).unwrap();
        assert!(
            j.load("t").unwrap().active.is_none(),
            "staging must not be journaled"
        );
        s.step(Event::StageDone { txid: TxId(1) }, 0);
        j.store("t", &s).unwrap();
        let back = j.load("t").unwrap();
        assert_eq!(back.active.map(|a| a.phase), Some(Phase::Prepared));
        std::fs::write(dir.join("tables/t.json"), b"{not json").unwrap();
        assert!(matches!(j.load("t"), Err(JournalError::Corrupt { .. })));
        let _ = std::fs::remove_dir_all(dir);
    }
}
