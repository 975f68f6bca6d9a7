//! Each node keeps the last K generations of each table under
//! `<state_dir>/history/<table>/<generation>/`: `source` is a **copy** (never a hard link: the
//! live file must stay the only link to its inode), `meta.json` says what it is. The indexed
//! file is not kept: a rollback is a normal commit of the source, built again on every node
//! (a `.db` is 2–3 times the source, and copying it on every commit would cost more than a
//! delta commit itself).
//!
//! The directories are private (0700) and the copies 0600: a copy is only ever served to
//! cluster peers (`Fetch`) and to root.
//!
//! The copies are made while preparing (from the staged files, into `.tx-<txid>/`), so the
//! history of a generation is exactly what was installed; commit renames the directory to the
//! generation number, abort removes it.

use crate::proto::{HistoryEntry, TxId};
use crate::table::{self, Staged};
use std::path::{Path, PathBuf};

/// The history of one table on this node.
#[derive(Debug, Clone)]
pub struct History {
    dir: PathBuf,
}

impl History {
    /// `<state_dir>/history/<table>`.
    pub fn new(state_dir: &Path, table: &str) -> History {
        History {
            dir: state_dir.join("history").join(table),
        }
    }

    fn staging(&self, txid: TxId) -> PathBuf {
        self.dir.join(format!(".tx-{txid}"))
    }

    fn gen_dir(&self, generation: u64) -> PathBuf {
        self.dir.join(generation.to_string())
    }

    /// Copies the staged files of `txid` aside (called once they are built and verified).
    /// Every directory is private (0700) and every copy 0600, made without following links
    /// (`O_NOFOLLOW` on the staged file, `O_EXCL` on the copy) and fsynced.
    pub fn stage(&self, txid: TxId, staged: &Staged) -> std::io::Result<()> {
        if let Some(top) = self.dir.parent() {
            table::private_dir(top)?;
        }
        table::private_dir(&self.dir)?;
        let d = self.staging(txid);
        let _ = std::fs::remove_dir_all(&d);
        table::private_dir(&d)?;
        table::copy_private(&staged.source, &d.join("source"))?;
        std::fs::File::open(&d).and_then(|f| f.sync_all())?;
        Ok(())
    }

    /// Drops the copies of an aborted transaction.
    pub fn drop_staged(&self, txid: TxId) {
        let _ = std::fs::remove_dir_all(self.staging(txid));
    }

    /// Removes copies of transactions other than `keep` (after a restart).
    pub fn drop_staged_except(&self, keep: Option<TxId>) {
        let Ok(rd) = std::fs::read_dir(&self.dir) else {
            return;
        };
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(id) = name.strip_prefix(".tx-").and_then(TxId::parse) {
                if Some(id) != keep {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
    }

    /// Turns the copies of a committed transaction into generation `entry.generation`, then
    /// keeps only the newest `keep` generations (never the live one: it is the newest).
    pub fn finalize(&self, entry: &HistoryEntry, keep: usize) -> std::io::Result<()> {
        let from = self.staging(entry.txid);
        let to = self.gen_dir(entry.generation);
        if !from.is_dir() {
            return Ok(()); // already finalized (a repeated commit), or copies lost in a crash
        }
        let _ = std::fs::remove_dir_all(&to);
        let meta = from.join("meta.json");
        let _ = std::fs::remove_file(&meta);
        let mut f = table::create_private(&meta)?;
        std::io::Write::write_all(&mut f, &serde_json::to_vec_pretty(entry)?)?;
        f.sync_all()?;
        std::fs::rename(&from, &to)?;
        std::fs::File::open(&self.dir).and_then(|f| f.sync_all())?;
        let mut gens: Vec<u64> = self.list().iter().map(|e| e.generation).collect();
        gens.sort_unstable();
        let keep = keep.max(1);
        if gens.len() > keep {
            for g in &gens[..gens.len() - keep] {
                let _ = std::fs::remove_dir_all(self.gen_dir(*g));
            }
        }
        Ok(())
    }

    /// Every generation held, oldest first.
    pub fn list(&self) -> Vec<HistoryEntry> {
        let Ok(rd) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        let mut out: Vec<HistoryEntry> = rd
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().parse::<u64>().is_ok())
            .filter_map(|e| std::fs::read(e.path().join("meta.json")).ok())
            .filter_map(|b| serde_json::from_slice(&b).ok())
            .collect();
        out.sort_by_key(|e| e.generation);
        out
    }

    /// The source of generation `generation`, if held.
    pub fn source(&self, generation: u64) -> Option<PathBuf> {
        let p = self.gen_dir(generation).join("source");
        p.is_file().then_some(p)
    }
}
