//! The coordinator's durable records, kept in the coordinating node's `state_dir`:
//!
//! - `decisions/<txid>.open`: a coordinator is working on this transaction (its generation,
//!   nodes and deadline). The coordinator holds an exclusive `flock` on it for as long as it
//!   lives: the node's `txmapd` tells a live coordinator from a dead one by trying that lock,
//!   which works in a chroot without `/proc` and across pid namespaces (the kernel drops the lock
//!   with the process).
//! - `decisions/<txid>.json`: the decision. Created with *no-replace* semantics (a hard link
//!   from a fsynced temporary file), so exactly one of "the coordinator decides commit" and
//!   "recovery fences the transaction as aborted" can ever happen: whoever creates the file
//!   first wins, and the loser sees the winner's decision. A decision is acted on only once it
//!   is durable: whoever reads one ([`DecisionLog::get`]) first fsyncs the directory, so a
//!   power cut can never take back a decision that somebody already acted on.
//! - `pending/<table>.<tag>.json`: a commit of this table that could not be completed (a node
//!   down, a deadline passed). `txmapd` retries it with backoff until the cluster serves it or
//!   a later change of its source.
//! - `changes/<table>.json`: the table's change counter on this node (see
//!   [`crate::proto::Change`]): every new change of the table made here takes the next count,
//!   under the lock of `changes/<table>.lock`, durably before it is used.

use crate::proto::TxId;
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};

/// What was decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    /// Every node prepared; the decision is commit.
    Commit,
    /// Fenced or decided abort.
    Abort,
}

/// A durable decision.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DecisionRecord {
    /// Transaction.
    pub txid: TxId,
    /// Table.
    pub table: String,
    /// Generation it installs.
    pub generation: u64,
    /// Commit or abort.
    pub verdict: Verdict,
    /// Nodes that take part.
    pub nodes: Vec<String>,
    /// When it was decided (ms since epoch).
    pub at_ms: u64,
}

impl DecisionRecord {
    /// The abort that fences a transaction whose coordinator is gone (presumed abort), or that
    /// was decided abort. `generation` is the one it offered: nodes fence prepares up to it.
    pub fn fence(txid: TxId, table: &str, generation: u64, nodes: Vec<String>) -> DecisionRecord {
        DecisionRecord {
            txid,
            table: table.to_string(),
            generation,
            verdict: Verdict::Abort,
            nodes,
            at_ms: crate::now_ms(),
        }
    }
}

/// A coordinator at work.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpenRecord {
    /// Transaction.
    pub txid: TxId,
    /// Table.
    pub table: String,
    /// Generation it offers.
    pub generation: u64,
    /// Nodes it asks.
    pub nodes: Vec<String>,
    /// Process id of the coordinator (for operators; liveness is its lock).
    pub pid: u32,
    /// When it started (ms since epoch).
    pub started_ms: u64,
    /// Its overall deadline (ms since epoch); past it, it is considered dead.
    pub deadline_ms: u64,
}

/// The lock a live coordinator holds on its open record (see [`DecisionLog::open`]).
#[derive(Debug)]
pub struct CoordinatorLock {
    _file: std::fs::File,
}

/// A commit that still has to reach every node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingRecord {
    /// Table.
    pub table: String,
    /// Source file to read again at each retry.
    pub source: PathBuf,
    /// First failure (ms since epoch).
    pub since_ms: u64,
    /// Attempts so far.
    pub attempts: u32,
    /// Why the last attempt failed.
    pub last_error: String,
    /// Not before (ms since epoch).
    pub next_ms: u64,
    /// Set while a process works on it (a coordinator records its intent before it starts, so
    /// that if it dies, `txmapd` takes over at once instead of waiting for `next_ms`). Whether
    /// that process is alive is told by its lock ([`DecisionLog::pending_owner_alive`]), never
    /// by this pid.
    #[serde(default)]
    pub owner_pid: Option<u32>,
    /// Forced past the content guard (`txmap commit --force`): so are its retries.
    #[serde(default)]
    pub force: bool,
    /// Which change of this node's table it is: a retry is dropped once a later change of
    /// the same source is live (see `coordinator::superseded`). `None` (a record of an older
    /// txmap): the retry takes a new count.
    #[serde(default)]
    pub change: Option<crate::proto::Change>,
    /// The last attempt's content was refused by a node's builder or verifier (content that
    /// `postmap` rejects): it is not retried until the source changes, or until
    /// `txmap pending retry`. Retrying the same bytes could only fail the same way.
    #[serde(default)]
    pub held: Option<HeldContent>,
}

/// The source as it was when its content was refused (see [`PendingRecord::held`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeldContent {
    /// Modification time of the source then (ns since the epoch).
    pub mtime_ns: u128,
    /// Its size then.
    pub len: u64,
}

impl HeldContent {
    /// How `source` is now (None: unreadable).
    pub fn of(source: &Path) -> Option<HeldContent> {
        let m = std::fs::metadata(source).ok()?;
        let mtime_ns = m
            .modified()
            .ok()?
            .duration_since(std::time::UNIX_EPOCH)
            .ok()?
            .as_nanos();
        Some(HeldContent {
            mtime_ns,
            len: m.len(),
        })
    }

    /// True while `source` is unchanged since it was refused.
    pub fn unchanged(&self, source: &Path) -> bool {
        HeldContent::of(source).as_ref() == Some(self)
    }
}

fn write_atomic(dir: &Path, name: &str, bytes: &[u8], replace: bool) -> std::io::Result<bool> {
    write_atomic_locked(dir, name, bytes, replace, false).map(|(created, _)| created)
}

/// Writes `name` atomically; with `lock`, the new file is returned with an exclusive `flock`
/// held on it (taken before it becomes visible under its name).
fn write_atomic_locked(
    dir: &Path,
    name: &str,
    bytes: &[u8],
    replace: bool,
    lock: bool,
) -> std::io::Result<(bool, Option<std::fs::File>)> {
    crate::table::create_dir_durable(dir, 0o700)?;
    let tmp = dir.join(format!(".{name}.{}.tmp", TxId::random()));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&tmp)?;
    crate::table::adopt_owner(&f, dir)?;
    if lock {
        fs4::FileExt::lock(&f)?;
    }
    f.write_all(bytes)?;
    f.sync_all()?;
    let target = dir.join(name);
    let created = if replace {
        std::fs::rename(&tmp, &target)?;
        true
    } else {
        let r = std::fs::hard_link(&tmp, &target);
        let _ = std::fs::remove_file(&tmp);
        match r {
            Ok(()) => true,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => false,
            Err(e) => return Err(e),
        }
    };
    // Storage error after the new name exists (chaos and regression tests).
    fail::fail_point!("decision::after_link", |_| Err(std::io::Error::other(
        "injected failure (decision::after_link)"
    )));
    sync_dir(dir)?;
    Ok((created, lock.then_some(f)))
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    fail::fail_point!("decision::sync_dir", |_| Err(std::io::Error::other(
        "injected failure (decision::sync_dir)"
    )));
    std::fs::File::open(dir)?.sync_all()
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> std::io::Result<Option<T>> {
    match std::fs::read(path) {
        Ok(b) => serde_json::from_slice(&b).map(Some).map_err(|e| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("{}: {e}", path.display()),
            )
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// The decision log of one node.
#[derive(Debug, Clone)]
pub struct DecisionLog {
    dir: PathBuf,
    pending: PathBuf,
}

impl DecisionLog {
    /// The log under `state_dir`.
    pub fn new(state_dir: &Path) -> DecisionLog {
        DecisionLog {
            dir: state_dir.join("decisions"),
            pending: state_dir.join("pending"),
        }
    }

    /// Records that this process coordinates `txid` (offering `generation` to `nodes`) until
    /// `deadline_ms`. The returned file holds the record's lock: keep it until the transaction
    /// is decided and delivered (or given up); dropping it tells recovery the coordinator is
    /// gone.
    pub fn open(
        &self,
        txid: TxId,
        table: &str,
        generation: u64,
        nodes: Vec<String>,
        deadline_ms: u64,
    ) -> std::io::Result<CoordinatorLock> {
        let rec = OpenRecord {
            txid,
            table: table.to_string(),
            generation,
            nodes,
            pid: std::process::id(),
            started_ms: crate::now_ms(),
            deadline_ms,
        };
        let (_, file) = write_atomic_locked(
            &self.dir,
            &format!("{txid}.open"),
            &serde_json::to_vec(&rec)?,
            true,
            true,
        )?;
        file.map(|f| CoordinatorLock { _file: f })
            .ok_or_else(|| std::io::Error::other("open record written without its lock"))
    }

    /// The open record of `txid`, if a coordinator registered it.
    pub fn open_record(&self, txid: TxId) -> std::io::Result<Option<OpenRecord>> {
        read_json(&self.dir.join(format!("{txid}.open")))
    }

    /// True when the coordinator of `rec` may still be working: it still holds the lock on its
    /// open record and its deadline has not passed. (No `/proc`: the kernel releases the lock
    /// when the process dies, whatever its pid namespace.)
    pub fn coordinator_alive(&self, rec: &OpenRecord) -> bool {
        if crate::now_ms() > rec.deadline_ms {
            return false;
        }
        let path = self.dir.join(format!("{}.open", rec.txid));
        let Ok(f) = std::fs::File::open(&path) else {
            return false;
        };
        match fs4::FileExt::try_lock_shared(&f) {
            Ok(()) => false,
            Err(fs4::TryLockError::WouldBlock) => true,
            // Cannot tell: presume alive until its deadline (never fence a live coordinator).
            Err(fs4::TryLockError::Error(_)) => true,
        }
    }

    /// Durably records `rec` unless a decision for that transaction exists already; returns the
    /// decision that stands (ours, or the one found).
    pub fn decide(&self, rec: &DecisionRecord) -> std::io::Result<DecisionRecord> {
        if write_atomic(
            &self.dir,
            &format!("{}.json", rec.txid),
            &serde_json::to_vec_pretty(rec)?,
            false,
        )? {
            return Ok(rec.clone());
        }
        self.get(rec.txid)?
            .ok_or_else(|| std::io::Error::other(format!("decision {} vanished", rec.txid)))
    }

    /// The decision for `txid`, if any, made durable before it is returned: the directory is
    /// fsynced first, so nobody acts on a decision a power cut could still take back.
    pub fn get(&self, txid: TxId) -> std::io::Result<Option<DecisionRecord>> {
        let rec = read_json(&self.dir.join(format!("{txid}.json")))?;
        if rec.is_some() {
            sync_dir(&self.dir)?;
        }
        Ok(rec)
    }

    /// Every recorded decision not yet delivered to all its nodes (for re-driving), commits
    /// first; empty when the directory cannot be made durable.
    pub fn list(&self) -> Vec<DecisionRecord> {
        let Ok(rd) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        let mut out: Vec<DecisionRecord> = rd
            .flatten()
            .filter(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                name.strip_suffix(".json")
                    .is_some_and(|id| !self.dir.join(format!("{id}.delivered")).exists())
            })
            .filter_map(|e| read_json(&e.path()).ok().flatten())
            .collect();
        // Made durable before anyone acts on them (nothing to sync when there is nothing).
        if !out.is_empty() && sync_dir(&self.dir).is_err() {
            return Vec::new();
        }
        out.sort_by_key(|r| (r.verdict != Verdict::Commit, r.at_ms));
        out
    }

    /// Every open record (coordinators at work or dead).
    pub fn list_open(&self) -> Vec<OpenRecord> {
        let Ok(rd) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        rd.flatten()
            .filter(|e| e.file_name().to_string_lossy().ends_with(".open"))
            .filter_map(|e| read_json(&e.path()).ok().flatten())
            .collect()
    }

    /// Marks a *commit* as acknowledged by every node, keeping its decision file as a
    /// tombstone (like an abort's, see [`DecisionLog::delivered`]): a question about it that
    /// comes late (a member asked while in doubt and learned the outcome elsewhere) must find
    /// the commit, never an empty log that it would fence as aborted.
    pub fn finish(&self, txid: TxId) {
        use crate::defects::{on, Defect};
        if on(Defect::InstallFailedDropsToPrepared) || on(Defect::FinishForgetsCommit) {
            // DEFECT (test only): the commit record forgotten, as before tombstones.
            let _ = std::fs::remove_file(self.dir.join(format!("{txid}.json")));
            let _ = std::fs::remove_file(self.dir.join(format!("{txid}.open")));
            return;
        }
        self.delivered(txid);
    }

    /// Marks a decision as delivered everywhere, but keeps its decision file as a tombstone: a
    /// coordinator that wakes up late must still find it and lose the no-replace race, and a
    /// late question must get the decision. Tombstones are removed by
    /// [`DecisionLog::expire_tombstones`].
    pub fn delivered(&self, txid: TxId) {
        use std::os::unix::fs::OpenOptionsExt;
        // Never through a link, and owned like the directory (root's `txmap` writing into a
        // non-root txmapd's state directory leaves nothing of root's there).
        if let Ok(f) = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(self.dir.join(format!("{txid}.delivered")))
        {
            let _ = crate::table::adopt_owner(&f, &self.dir);
        }
        let _ = std::fs::remove_file(self.dir.join(format!("{txid}.open")));
    }

    /// Removes abort records older than `age_ms`, delivered or not, and delivered commit
    /// records older than that. Safe for aborts because the coordinator's node presumes abort:
    /// asked about a transaction it holds no record of, it fences it (a coordinator never
    /// decides past its deadline, which is seconds). A commit record is removed only once every
    /// member acknowledged it and `age_ms` passed (a day: no member's question is that late);
    /// an undelivered commit record never expires.
    pub fn expire_tombstones(&self, age_ms: u64) {
        let Ok(rd) = std::fs::read_dir(&self.dir) else {
            return;
        };
        let now = crate::now_ms();
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(id) = name.strip_suffix(".json") else {
                continue;
            };
            let Ok(Some(rec)) = read_json::<DecisionRecord>(&e.path()) else {
                continue;
            };
            let delivered = self.dir.join(format!("{id}.delivered")).exists();
            let expires = rec.verdict == Verdict::Abort || delivered;
            if expires && now.saturating_sub(rec.at_ms) > age_ms {
                let _ = std::fs::remove_file(e.path());
                let _ = std::fs::remove_file(self.dir.join(format!("{id}.delivered")));
            }
        }
    }

    /// Removes only the open record (the coordinator ended without a commit decision, or the
    /// decision is durable and re-driving takes over).
    pub fn close(&self, txid: TxId) {
        let _ = std::fs::remove_file(self.dir.join(format!("{txid}.open")));
    }

    /// Takes the next change of `table` from this node's durable counter (created, with a new
    /// random epoch, when there is none). Serialized by an exclusive `flock` between the
    /// processes of this node that make changes (`txmapd`'s hook, `txmap commit`, `rollback`);
    /// the new count is on disk (fsynced) before it is returned.
    pub fn next_change(&self, table: &str) -> std::io::Result<crate::proto::Change> {
        let dir = self.pending.with_file_name("changes");
        crate::table::create_dir_durable(&dir, 0o700)?;
        let lock = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(dir.join(format!("{table}.lock")))?;
        crate::table::adopt_owner(&lock, &dir)?;
        fs4::FileExt::lock(&lock)?;
        let name = format!("{table}.json");
        let last: Option<crate::proto::Change> = read_json(&dir.join(&name))?;
        let next = match last {
            Some(c) => crate::proto::Change {
                epoch: c.epoch,
                seq: c.seq.checked_add(1).ok_or_else(|| {
                    std::io::Error::other(format!("change counter of `{table}` exhausted"))
                })?,
            },
            None => crate::proto::Change {
                epoch: (TxId::random().0 as u64) | 1,
                seq: 1,
            },
        };
        // Written as the decision log's files are, without their failpoints (those count the
        // decision log's own writes).
        let tmp = dir.join(format!(".{name}.{}.tmp", TxId::random()));
        let r = (|| {
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&tmp)?;
            crate::table::adopt_owner(&f, &dir)?;
            f.write_all(&serde_json::to_vec(&next)?)?;
            f.sync_all()?;
            std::fs::rename(&tmp, dir.join(&name))?;
            std::fs::File::open(&dir)?.sync_all()
        })();
        if r.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        r.map(|()| next)
    }

    /// The file of the pending change of `table` from `source`: one per (table, source), so
    /// a commit of one source never drops another source's undistributed change.
    fn pending_file(&self, table: &str, source: &Path) -> PathBuf {
        let tag = crate::table::path_tag(source);
        self.pending.join(format!("{table}.{tag}.json"))
    }

    /// Records (or updates) a pending commit of `rec.table` from `rec.source`.
    pub fn set_pending(&self, rec: &PendingRecord) -> std::io::Result<()> {
        let file = self.pending_file(&rec.table, &rec.source);
        let name = file
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        write_atomic(&self.pending, &name, &serde_json::to_vec_pretty(rec)?, true)?;
        Ok(())
    }

    /// The pending change of `table` from `source`, if any.
    pub fn pending_for(&self, table: &str, source: &Path) -> Option<PendingRecord> {
        read_json(&self.pending_file(table, source)).ok().flatten()
    }

    /// The oldest pending change of `table`, if any (what `status` shows).
    pub fn pending(&self, table: &str) -> Option<PendingRecord> {
        self.list_pending().into_iter().find(|p| p.table == table)
    }

    /// Every pending change, in the order of their changes per table (a table's retries run
    /// in that order, so its newest change lands last); records without a change come first.
    pub fn list_pending(&self) -> Vec<PendingRecord> {
        let Ok(rd) = std::fs::read_dir(&self.pending) else {
            return Vec::new();
        };
        let mut v: Vec<PendingRecord> = rd
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().ends_with(".json"))
            .filter_map(|e| read_json(&e.path()).ok().flatten())
            .collect();
        v.sort_by_key(|p: &PendingRecord| (p.change.map(|c| (c.epoch, c.seq)), p.since_ms));
        v
    }

    /// Marks this process as the one working on `table`'s pending commit, for as long as the
    /// returned file lives (an exclusive `flock` on `pending/<table>.owner`). `None`: another
    /// live process works on it.
    pub fn own_pending(&self, table: &str) -> std::io::Result<Option<std::fs::File>> {
        crate::table::create_dir_durable(&self.pending, 0o700)?;
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(self.pending.join(format!("{table}.owner")))?;
        crate::table::adopt_owner(&f, &self.pending)?;
        match fs4::FileExt::try_lock(&f) {
            Ok(()) => Ok(Some(f)),
            Err(fs4::TryLockError::WouldBlock) => Ok(None),
            Err(fs4::TryLockError::Error(e)) => Err(e),
        }
    }

    /// True while some process holds the owner lock of `table`'s pending commit.
    pub fn pending_owner_alive(&self, table: &str) -> bool {
        let Ok(f) = std::fs::File::open(self.pending.join(format!("{table}.owner"))) else {
            return false;
        };
        matches!(
            fs4::FileExt::try_lock_shared(&f),
            Err(fs4::TryLockError::WouldBlock)
        )
    }

    /// Clears the pending change of `table` from `source`.
    pub fn clear_pending(&self, table: &str, source: &Path) {
        let _ = std::fs::remove_file(self.pending_file(table, source));
    }

    /// `txmap pending cancel`: drops every pending change of `table` (whatever its source).
    /// Refused while a live process works on one (a `txmap commit` or a hook request running):
    /// it is then the owner's to finish. Returns the records dropped.
    pub fn cancel_pending(&self, table: &str) -> Result<Vec<PendingRecord>, String> {
        let Some(_owner) = self
            .own_pending(table)
            .map_err(|e| format!("{}: {e}", self.pending.display()))?
        else {
            return Err(format!(
                "a commit of `{table}` is running right now (a `txmap commit` or a hook request); wait for it, then cancel"
            ));
        };
        let mine: Vec<PendingRecord> = self
            .list_pending()
            .into_iter()
            .filter(|p| p.table == table)
            .collect();
        for p in &mine {
            self.clear_pending(&p.table, &p.source);
        }
        Ok(mine)
    }

    /// `txmap pending retry`: makes every pending change of `table` due now, including one
    /// held for its content. Returns how many there are.
    pub fn retry_pending(&self, table: &str) -> std::io::Result<usize> {
        let mut n = 0;
        for p in self.list_pending().into_iter().filter(|p| p.table == table) {
            let rec = PendingRecord {
                next_ms: 0,
                held: None,
                ..p
            };
            self.set_pending(&rec)?;
            n += 1;
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(txid: TxId, verdict: Verdict) -> DecisionRecord {
        DecisionRecord {
            txid,
            table: "t".into(),
            generation: 3,
            verdict,
            nodes: vec!["a".into()],
            at_ms: 1,
        }
    }

    #[test]
    fn the_first_decision_wins_and_the_second_sees_it() {
        let dir = std::env::temp_dir().join(format!("txmap-decision-{}", TxId::random()));
        let log = DecisionLog::new(&dir);
        let t = TxId::random();
        assert_eq!(log.get(t).unwrap(), None);
        // Recovery fences first...
        assert_eq!(
            log.decide(&rec(t, Verdict::Abort)).unwrap().verdict,
            Verdict::Abort
        );
        // ...so a slow coordinator can no longer commit.
        assert_eq!(
            log.decide(&rec(t, Verdict::Commit)).unwrap().verdict,
            Verdict::Abort
        );
        assert_eq!(log.list().len(), 1);
        log.finish(t);
        assert!(log.list().is_empty());
        let _ = std::fs::remove_dir_all(dir);
    }

    /// A finished commit stays readable (a late question finds it), leaves the redrive list,
    /// and expires like an abort tombstone; an undelivered commit never expires.
    #[test]
    fn a_finished_commit_is_a_tombstone_and_only_a_delivered_one_expires() {
        let dir = std::env::temp_dir().join(format!("txmap-decision-{}", TxId::random()));
        let log = DecisionLog::new(&dir);
        let (done, open) = (TxId::random(), TxId::random());
        let old = |t| DecisionRecord {
            at_ms: 1,
            ..rec(t, Verdict::Commit)
        };
        log.decide(&old(done)).unwrap();
        log.decide(&old(open)).unwrap();
        log.finish(done);
        assert_eq!(
            log.get(done).unwrap().map(|d| d.verdict),
            Some(Verdict::Commit)
        );
        assert_eq!(
            log.list().iter().map(|d| d.txid).collect::<Vec<_>>(),
            vec![open]
        );
        log.expire_tombstones(1000);
        assert_eq!(
            log.get(done).unwrap(),
            None,
            "delivered and a day old: gone"
        );
        assert!(log.get(open).unwrap().is_some(), "undelivered: kept");
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn a_coordinator_is_alive_while_it_holds_its_open_record() {
        let dir = std::env::temp_dir().join(format!("txmap-decision-{}", TxId::random()));
        let log = DecisionLog::new(&dir);
        let t = TxId::random();
        let far = crate::now_ms() + 60_000;
        let guard = log.open(t, "t", 3, vec!["a".into()], far).unwrap();
        let rec = log.open_record(t).unwrap().unwrap();
        assert_eq!(rec.generation, 3);
        assert!(log.coordinator_alive(&rec));
        assert!(!log.coordinator_alive(&OpenRecord {
            deadline_ms: 1,
            ..rec.clone()
        }));
        drop(guard);
        assert!(!log.coordinator_alive(&rec), "lock released: gone");
        let _ = std::fs::remove_dir_all(dir);
    }
}
