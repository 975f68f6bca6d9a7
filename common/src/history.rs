//! Each node keeps the last K generations of each table under
//! `<state_dir>/history/<table>/<generation>/`: `source` is the installed source itself, a hard
//! link to the file that went live (no copy: at 1,000,000 lines a copy cost more than the rest
//! of a delta commit), or a copy when the state directory is on another filesystem. The live
//! source therefore has two links while its generation is in history; only
//! [`History::open_live`] accepts that second link, when it is this history's own. A rollback
//! checks the sha256 recorded for the generation before it uses a copy, so a live file changed
//! in place (which changes its history link too) is refused, and another node's copy is used.
//! `meta.json` says what the generation is. The indexed file is not kept: a rollback is a
//! normal commit of the source, built again on every node.
//!
//! The directories are private (0700); a copy is 0600, a link has the live file's mode (the
//! private directory keeps it from anyone but root). A copy is only ever served to cluster
//! peers (`Fetch`) and to root.
//!
//! The links are made while preparing (from the staged files, into `.tx-<txid>/`), so the
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

    /// Links the staged source of `txid` aside (called once its content is received and
    /// checked, beside its build; the prepare joins it before answering), or copies it when a link is not possible (another filesystem). Every
    /// directory is private (0700); a copy is 0600, made without following links (`O_NOFOLLOW`
    /// on the staged file, `O_EXCL` on the copy) and fsynced; the directory is fsynced.
    pub fn stage(&self, txid: TxId, staged: &Staged) -> std::io::Result<()> {
        if let Some(top) = self.dir.parent() {
            table::private_dir(top)?;
        }
        table::private_dir(&self.dir)?;
        let d = self.staging(txid);
        let _ = std::fs::remove_dir_all(&d);
        table::private_dir(&d)?;
        let to = d.join("source");
        // `link(2)` never follows a symbolic link; the staged file is txmap's own (`O_EXCL`).
        if std::fs::hard_link(&staged.source, &to).is_err() {
            table::copy_private(&staged.source, &to)?;
        }
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
        self.finalize_only(entry)?;
        self.prune(keep);
        Ok(())
    }

    /// [`History::finalize`] without removing old generations ([`History::prune`], which frees
    /// a whole table's blocks, runs after the commit is acknowledged).
    pub fn finalize_only(&self, entry: &HistoryEntry) -> std::io::Result<()> {
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
        Ok(())
    }

    /// Keeps only the newest `keep` generations (at least one).
    pub fn prune(&self, keep: usize) {
        let mut gens: Vec<u64> = self.list().iter().map(|e| e.generation).collect();
        gens.sort_unstable();
        let keep = keep.max(1);
        if gens.len() > keep {
            for g in &gens[..gens.len() - keep] {
                let _ = std::fs::remove_dir_all(self.gen_dir(*g));
            }
        }
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

    /// True when the file `m` describes is one of this history's sources (same inode).
    pub fn holds_inode(&self, m: &std::fs::Metadata) -> bool {
        use std::os::unix::fs::MetadataExt;
        let Ok(rd) = std::fs::read_dir(&self.dir) else {
            return false;
        };
        rd.flatten().any(|e| {
            std::fs::symlink_metadata(e.path().join("source"))
                .is_ok_and(|h| h.is_file() && h.dev() == m.dev() && h.ino() == m.ino())
        })
    }

    /// Opens a node's live source `path` for reading like [`table::open_untrusted`], accepting
    /// the second link that this history holds to it.
    pub fn open_live(&self, path: &Path, max: u64) -> std::io::Result<(std::fs::File, u64)> {
        table::open_untrusted_except(path, max, |m| self.holds_inode(m))
    }

    /// The source of generation `generation`, if held.
    pub fn source(&self, generation: u64) -> Option<PathBuf> {
        let p = self.gen_dir(generation).join("source");
        p.is_file().then_some(p)
    }
}
