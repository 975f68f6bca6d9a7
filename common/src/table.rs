//! Staging, building, verifying and installing one table on one node.
//!
//! The new content is written beside the live file as `.<file>.txmap-<txid>` (same directory,
//! so the final `rename(2)` is atomic), built there with the node's own `postmap`/`postalias`,
//! verified (no builder output on stderr, entry count equal to the source's logical lines),
//! fsynced with its directory, and only then reported prepared. Commit renames the indexed file
//! over the live one first and the source second, so the live indexed file is never missing and
//! never older than its source; the old inode's link count drops to 0, which is how running
//! Postfix daemons notice the change.

use crate::config::{Builder, PostfixSettings, TableConfig, TableType};
use crate::entries::{EntryDigest, EntryHasher, LogicalLines};
use crate::proto::TxId;
use std::ffi::OsString;
use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Stdio;

/// What can go wrong with a table on this node. Converted to a wire refusal by the participant.
#[derive(Debug, thiserror::Error)]
pub enum TableError {
    /// A filesystem operation failed.
    #[error("{op} {}: {source}", path.display())]
    Io {
        /// What was being done (`create`, `rename`, ...).
        op: &'static str,
        /// On which path.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The builder exited non-zero or wrote to stderr.
    #[error("{program} failed ({status}): {stderr}")]
    BuildFailed {
        /// `postmap` or `postalias`.
        program: String,
        /// Exit status text.
        status: String,
        /// What it printed on stderr (trimmed).
        stderr: String,
    },
    /// The built file holds other keys or values than the source says.
    #[error("verification failed: {detail}")]
    ContentDiffers {
        /// What differs.
        detail: String,
    },
    /// The built file does not hold what the source says.
    #[error("verification failed: source has {expected} entries, built table has {found}")]
    VerifyFailed {
        /// Logical lines in the source.
        expected: u64,
        /// Entries dumped from the built file.
        found: u64,
    },
}

fn io<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> TableError + 'a {
    move |source| TableError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// `path` with `suffix` appended to its file name (`a/b` + `.db` = `a/b.db`).
pub fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut s: OsString = path.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

fn file_name(t: &TableConfig) -> String {
    t.path
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Prefix of every staged file of this table: `.<file>.txmap-`.
pub fn staged_prefix(t: &TableConfig) -> String {
    format!(".{}.txmap-", file_name(t))
}

/// The staged source and indexed paths of one transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Staged {
    /// `.<file>.txmap-<txid>` in the live directory.
    pub source: PathBuf,
    /// The same plus the type's suffix.
    pub indexed: PathBuf,
}

/// Where transaction `txid` stages table `t`.
pub fn staged_paths(t: &TableConfig, txid: TxId) -> Staged {
    let source = t.dir().join(format!("{}{txid}", staged_prefix(t)));
    let indexed = with_suffix(&source, t.kind.suffix());
    Staged { source, indexed }
}

/// Staged files of this table left in its directory (by any transaction), found by their exact
/// name shape; nothing else in the directory is ever touched.
pub fn list_staged(t: &TableConfig) -> Vec<(TxId, PathBuf)> {
    let prefix = staged_prefix(t);
    let Ok(rd) = std::fs::read_dir(t.dir()) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        // Berkeley DB's temporary file of a build that failed half-way: `__db.<staged>.db`.
        let plain = name.strip_prefix(BDB_TEMP_PREFIX).unwrap_or(&name);
        let Some(rest) = plain.strip_prefix(&prefix) else {
            continue;
        };
        let (id, suffix) = rest.split_at(rest.len().min(32));
        if suffix.is_empty() || suffix == t.kind.suffix() || suffix == ".cdb.tmp" {
            if let Some(txid) = TxId::parse(id) {
                out.push((txid, e.path()));
            }
        }
    }
    out
}

/// Prefix of the temporary file Berkeley DB creates beside a `.db` it builds; a build that fails
/// half-way (disk full) leaves it behind.
const BDB_TEMP_PREFIX: &str = "__db.";

/// Removes the staged files of `txid` (missing files are fine), including a temporary file the
/// builder left behind. Every file is tried; the first error is returned (what failed is then
/// the caller's to retry).
pub fn remove_staged(t: &TableConfig, txid: TxId) -> Result<(), TableError> {
    let s = staged_paths(t, txid);
    let bdb_temp = s
        .indexed
        .file_name()
        .map(|f| {
            t.dir()
                .join(format!("{BDB_TEMP_PREFIX}{}", f.to_string_lossy()))
        })
        .unwrap_or_else(|| s.indexed.clone());
    let mut first = None;
    for p in [
        &s.indexed,
        &s.source,
        &with_suffix(&s.source, ".cdb.tmp"),
        &bdb_temp,
    ] {
        match unlink_staged(p) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                first.get_or_insert(io("remove", p)(e));
            }
        }
    }
    first.map_or(Ok(()), Err)
}

/// `unlink(2)` of one staged file.
fn unlink_staged(p: &Path) -> std::io::Result<()> {
    // A storage error on a file that exists (chaos and regression tests: `N*return`).
    fail::fail_point!("table::remove_staged", p.symlink_metadata().is_ok(), |_| {
        Err(std::io::Error::from_raw_os_error(libc::EIO))
    });
    std::fs::remove_file(p)
}

/// Counts the logical lines of a Postfix table source as it streams by: a line whose first
/// byte is neither whitespace nor `#` starts an entry (postmap(1), "INPUT FILE FORMAT").
#[derive(Debug, Clone, Default)]
pub struct EntryCounter {
    mid_line: bool,
    entries: u64,
}

impl EntryCounter {
    /// Feeds the next bytes of the source.
    pub fn feed(&mut self, chunk: &[u8]) {
        // Line by line (a million-line table streams by at memchr speed): only each line's
        // first byte matters.
        let mut i = 0;
        while i < chunk.len() {
            if !self.mid_line && crate::entries::starts_entry(chunk[i]) {
                self.entries += 1;
            }
            match memchr::memchr(b'\n', &chunk[i..]) {
                Some(p) => {
                    i += p + 1;
                    self.mid_line = false;
                }
                None => {
                    i = chunk.len();
                    self.mid_line = true;
                }
            }
        }
    }
    /// Entries seen so far.
    pub fn entries(&self) -> u64 {
        self.entries
    }
}

/// A short stable tag naming a path in file names (16 hex digits of its sha256).
pub fn path_tag(p: &Path) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, p.as_os_str().as_encoded_bytes());
    hex(&d.as_ref()[..8])
}

/// sha256 of a byte stream, hex.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

/// What one pass over a source file yields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SourceDigest {
    /// sha256 of the bytes.
    pub sha256: [u8; 32],
    /// Length in bytes.
    pub len: u64,
    /// Logical lines (entries).
    pub entries: u64,
}

/// Reads a whole file once (streaming) for its digest, length and entry count.
pub fn digest_file(path: &Path) -> Result<SourceDigest, TableError> {
    let mut f = File::open(path).map_err(io("open", path))?;
    digest_reader(&mut f).map_err(io("read", path))
}

/// The digest of the snapshot this process wrote last (see [`Snapshots::take_from_path`]), by
/// its path and stamp: a commit reads it instead of hashing the 66 MB again.
static SNAPSHOT_DIGEST: std::sync::Mutex<Option<(PathBuf, FileStamp, SourceDigest)>> =
    std::sync::Mutex::new(None);

/// [`digest_file`] of a source, answered from the digest computed while this process wrote it
/// when it is that very snapshot, unchanged (same path, inode, size, mtime and ctime).
pub fn source_digest(path: &Path) -> Result<SourceDigest, TableError> {
    let mut f = File::open(path).map_err(io("open", path))?;
    let known = SNAPSHOT_DIGEST
        .lock()
        .ok()
        .and_then(|g| g.clone())
        .filter(|(p, stamp, _)| {
            p == path && f.metadata().is_ok_and(|m| FileStamp::of(&m) == *stamp)
        });
    match known {
        Some((_, _, d)) => Ok(d),
        None => digest_reader(&mut f).map_err(io("read", path)),
    }
}

/// [`digest_file`] over any reader.
pub fn digest_reader<R: Read>(r: &mut R) -> std::io::Result<SourceDigest> {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let mut counter = EntryCounter::default();
    let mut buf = vec![0u8; 256 * 1024];
    let mut len = 0u64;
    loop {
        let n = r.read(&mut buf)?;
        if n == 0 {
            break;
        }
        ctx.update(&buf[..n]);
        counter.feed(&buf[..n]);
        len += n as u64;
    }
    let mut sha256 = [0u8; 32];
    sha256.copy_from_slice(ctx.finish().as_ref());
    Ok(SourceDigest {
        sha256,
        len,
        entries: counter.entries(),
    })
}

/// Opens a path that a less privileged user may control, for reading: never follows a symbolic
/// link at its last component (`O_NOFOLLOW`) and never blocks on a FIFO or a device
/// (`O_NONBLOCK`), then checks with `fstat` that it is a regular file with one link and at most
/// `max` bytes. Returns the file and its size. The error says what is wrong, in words.
pub fn open_untrusted(path: &Path, max: u64) -> std::io::Result<(File, u64)> {
    open_untrusted_except(path, max, |_| false)
}

/// [`open_untrusted`], also accepting a file with two links when `second_link_ok` says the
/// other one is txmap's own (the history copy of a node's live source is a hard link to it).
pub fn open_untrusted_except(
    path: &Path,
    max: u64,
    second_link_ok: impl Fn(&std::fs::Metadata) -> bool,
) -> std::io::Result<(File, u64)> {
    use std::io::{Error, ErrorKind};
    use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ELOOP) => Error::new(
                ErrorKind::InvalidInput,
                format!(
                    "{} is a symbolic link; txmap never follows one there: make it a regular file",
                    path.display()
                ),
            ),
            _ => Error::new(e.kind(), format!("cannot open {}: {e}", path.display())),
        })?;
    let m = f.metadata()?;
    let ft = m.file_type();
    if !ft.is_file() {
        let what = if ft.is_fifo() {
            "a FIFO"
        } else if ft.is_char_device() {
            "a character device"
        } else if ft.is_block_device() {
            "a block device"
        } else if ft.is_socket() {
            "a socket"
        } else if ft.is_dir() {
            "a directory"
        } else {
            "not a regular file"
        };
        return Err(Error::new(
            ErrorKind::InvalidInput,
            format!("{} is {what}, not a regular file; refused", path.display()),
        ));
    }
    if m.nlink() > 1 && !(m.nlink() == 2 && second_link_ok(&m)) {
        return Err(Error::new(
            ErrorKind::InvalidInput,
            format!(
                "{} has {} hard links; a table source must have exactly one (a hard link can \
                 point at another user's file); refused",
                path.display(),
                m.nlink()
            ),
        ));
    }
    if m.len() > max {
        return Err(Error::new(
            ErrorKind::InvalidInput,
            format!(
                "{} has {} bytes, more than max_table_bytes = {max}; refused",
                path.display(),
                m.len()
            ),
        ));
    }
    Ok((f, m.len()))
}

/// `O_NOFOLLOW | O_DIRECTORY`: open a directory, never through a link.
pub const NOFOLLOW_DIRECTORY: i32 = libc::O_NOFOLLOW | libc::O_DIRECTORY;

/// Reads at most `max` bytes of `r`; more is an error (a file that grew past the limit).
pub fn read_bounded<R: Read>(r: R, max: u64) -> std::io::Result<Vec<u8>> {
    let mut v = Vec::new();
    r.take(max.saturating_add(1)).read_to_end(&mut v)?;
    if v.len() as u64 > max {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("more than max_table_bytes = {max} bytes; refused"),
        ));
    }
    Ok(v)
}

/// When this process is root and `dir` belongs to another user (`txmapd` running as a
/// dedicated user, and `txmap` run by root on its node), gives `f`, just created in `dir`, to
/// that user: the daemon must be able to go on using what the command left there.
pub fn adopt_owner(f: &File, dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    if !rustix::process::geteuid().is_root() {
        return Ok(());
    }
    let m = std::fs::metadata(dir)?;
    if m.uid() == 0 {
        return Ok(());
    }
    std::os::unix::fs::fchown(f, Some(m.uid()), Some(m.gid()))
}

/// Creates `dir` with `mode`, and any missing parent (0755), each made durable in its parent:
/// the parent is fsynced once the new entry exists, so a power cut cannot take back a
/// directory that records were then written into. An existing directory is left as it is.
pub fn create_dir_durable(dir: &Path, mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    if dir.is_dir() {
        // It may have been made by a process killed before it fsynced the parent: make its
        // entry durable once per process (not at every call: this runs on every prepare).
        static SYNCED: std::sync::Mutex<Option<std::collections::HashSet<PathBuf>>> =
            std::sync::Mutex::new(None);
        let mut synced = SYNCED.lock().unwrap_or_else(|e| e.into_inner());
        if synced
            .get_or_insert_with(Default::default)
            .insert(dir.to_path_buf())
        {
            if let Some(p) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
                // Best effort: a parent this process cannot open was made durable by its owner.
                let _ = File::open(p).and_then(|f| f.sync_all());
            }
        }
        return Ok(());
    }
    let parent = dir.parent().filter(|p| !p.as_os_str().is_empty());
    if let Some(p) = parent {
        create_dir_durable(p, 0o755)?;
    }
    match std::fs::DirBuilder::new().mode(mode).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return Ok(()),
        Err(e) => return Err(e),
    }
    match parent {
        Some(p) => {
            use std::os::unix::fs::OpenOptionsExt;
            let d = std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(NOFOLLOW_DIRECTORY)
                .open(dir)?;
            adopt_owner(&d, p)?;
            File::open(p)?.sync_all()
        }
        None => Ok(()),
    }
}

/// Creates a directory private to its owner (0700), durable in its parent, or makes an
/// existing one so. A symbolic link in its place is refused, never followed.
pub fn private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    create_dir_durable(dir, 0o700)?;
    let d = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(NOFOLLOW_DIRECTORY)
        .open(dir)?;
    d.set_permissions(std::fs::Permissions::from_mode(0o700))
}

/// Creates `path` for writing: it must not exist (`O_EXCL`, so a planted link is never
/// followed), mode 0600.
pub fn create_private(path: &Path) -> std::io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
}

/// Copies `from` (never through a link) to a new file `to` (mode 0600, created with `O_EXCL`)
/// and fsyncs the copy.
pub fn copy_private(from: &Path, to: &Path) -> std::io::Result<u64> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut src = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(from)?;
    if !src.metadata()?.file_type().is_file() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{} is not a regular file", from.display()),
        ));
    }
    let mut dst = create_private(to)?;
    let n = std::io::copy(&mut src, &mut dst)?;
    dst.sync_all()?;
    Ok(n)
}

/// Checks that nobody but its owner (root or this process's user) can change `dir` or any
/// directory above it, so that no other user can plant a link or rename a file there.
/// Group- or world-writable ancestors are accepted only with the sticky bit (like `/tmp`).
pub fn check_dir_safe(dir: &Path) -> Result<(), String> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let me = rustix::process::geteuid().as_raw();
    let abs = if dir.is_absolute() {
        dir.to_path_buf()
    } else {
        std::env::current_dir()
            .map_err(|e| format!("cannot resolve {}: {e}", dir.display()))?
            .join(dir)
    };
    let mut first = true;
    for p in abs.ancestors() {
        let m = match std::fs::symlink_metadata(p) {
            Ok(m) => m,
            Err(e) if first && e.kind() == std::io::ErrorKind::NotFound => {
                first = false;
                continue;
            }
            Err(e) => return Err(format!("cannot check {}: {e}", p.display())),
        };
        let mode = m.permissions().mode();
        if m.file_type().is_symlink() {
            // A link is as safe as the directory holding it (checked next) and its target.
            let target = std::fs::canonicalize(p)
                .map_err(|e| format!("cannot resolve {}: {e}", p.display()))?;
            check_dir_safe(&target)?;
            continue;
        }
        if m.uid() != 0 && m.uid() != me {
            return Err(format!(
                "{} is owned by uid {}, not by root or by txmapd's user (uid {me}): that user \
                 could plant links txmapd would use; fix: chown root {}",
                p.display(),
                m.uid(),
                p.display()
            ));
        }
        let sticky = mode & 0o1000 != 0;
        if mode & 0o022 != 0 && (first || !sticky) {
            return Err(format!(
                "{} is writable by its group or by others (mode {:04o}): another user could \
                 plant links or rename files there; fix: chmod go-w {}",
                p.display(),
                mode & 0o7777,
                p.display()
            ));
        }
        first = false;
    }
    Ok(())
}

/// Private copies of the content the Sympa hook (or an operator) asked to distribute:
/// `<state_dir>/snapshots/<table>` (0600, in a 0700 directory). A commit started by `txmapd`
/// reads only these, never the user's file: the newest content wins, and a pending retry uses
/// the newest snapshot.
#[derive(Debug, Clone)]
pub struct Snapshots {
    dir: PathBuf,
}

impl Snapshots {
    /// `<state_dir>/snapshots`.
    pub fn new(state_dir: &Path) -> Snapshots {
        Snapshots {
            dir: state_dir.join("snapshots"),
        }
    }

    /// The directory (created 0700 by [`Snapshots::ensure`]).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Creates the directory (0700), or makes it private.
    pub fn ensure(&self) -> std::io::Result<()> {
        private_dir(&self.dir)
    }

    /// The current snapshot of `table`, the path commits read.
    pub fn path(&self, table: &str) -> PathBuf {
        self.dir.join(table)
    }

    /// True when `p` is a snapshot of this node (a pending record's source).
    pub fn holds(&self, p: &Path) -> bool {
        p.parent() == Some(self.dir.as_path())
    }

    /// A new temporary file for a snapshot of `table` (0600, `O_EXCL`).
    pub fn create_temp(&self, table: &str) -> std::io::Result<(PathBuf, File)> {
        self.ensure()?;
        let p = self.dir.join(format!(".{table}.{}.tmp", TxId::random()));
        let f = create_private(&p)?;
        adopt_owner(&f, &self.dir)?;
        Ok((p, f))
    }

    /// Writes `bytes` as a finished temporary snapshot of `table` (fsynced).
    pub fn write_temp(&self, table: &str, bytes: &[u8]) -> std::io::Result<PathBuf> {
        let (p, mut f) = self.create_temp(table)?;
        let r = f.write_all(bytes).and_then(|_| f.sync_all());
        if let Err(e) = r {
            let _ = std::fs::remove_file(&p);
            return Err(e);
        }
        Ok(p)
    }

    /// Makes a finished temporary snapshot the current one of `table` (atomic rename, fsync).
    pub fn install(&self, table: &str, temp: &Path) -> std::io::Result<PathBuf> {
        let to = self.path(table);
        // The replaced snapshot is held open across the rename and let go on a thread of its
        // own: freeing its blocks (66 MB at 1,000,000 lines) then happens beside the commit,
        // not inside the rename it waits for.
        let replaced = open_nofollow(&to).ok();
        std::fs::rename(temp, &to)?;
        File::open(&self.dir).and_then(|d| d.sync_all())?;
        if let Some(f) = replaced {
            let _ = std::thread::Builder::new()
                .name("txmap-free".into())
                .spawn(move || drop(f));
        }
        Ok(to)
    }

    /// Removes temporary files left by a crash (older than a minute).
    pub fn remove_temps(&self) {
        let Ok(rd) = std::fs::read_dir(&self.dir) else {
            return;
        };
        for e in rd.flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            let old = e
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|m| m.elapsed().ok())
                > Some(std::time::Duration::from_secs(60));
            if n.starts_with('.') && n.ends_with(".tmp") && old {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }

    /// Snapshots a file read with the caller's own rights (`txmap commit` run by an operator):
    /// a regular file of at most `max` bytes.
    pub fn take_from_path(&self, table: &str, source: &Path, max: u64) -> std::io::Result<PathBuf> {
        // A path a less privileged user may control (`txmap commit` runs as root): never
        // through a link, never blocking on a FIFO, one link, bounded.
        let (f, _) = open_untrusted(source, max)?;
        let bytes = read_bounded(f, max)?;
        // Hashed while it is written and fsynced (the commit needs the digest next).
        let (written, digest) = std::thread::scope(|s| {
            let d = s.spawn(|| digest_reader(&mut &bytes[..]));
            let w = self.write_temp(table, &bytes);
            (w, d.join())
        });
        let installed = self.install(table, &written?)?;
        if let (Ok(Ok(d)), Ok(m)) = (digest, std::fs::symlink_metadata(&installed)) {
            if let Ok(mut g) = SNAPSHOT_DIGEST.lock() {
                *g = Some((installed.clone(), FileStamp::of(&m), d));
            }
        }
        Ok(installed)
    }
}

/// Keys sampled from a source, for `verify = "sample"`.
pub type SampledKeys = Vec<Vec<u8>>;

/// Writes an incoming source to its staged path, hashing and counting as it goes.
pub struct SourceWriter {
    path: PathBuf,
    file: std::io::BufWriter<File>,
    ctx: ring::digest::Context,
    counter: EntryCounter,
    builder: Builder,
    sampler: Option<KeySampler>,
    content: Option<(EntryHasher, EntryDigest, LogicalLines)>,
    len: u64,
}

/// How a staged build is checked, as decided while its source streamed in.
#[derive(Debug)]
pub enum Check {
    /// `verify = "sample"`: these keys must be answered.
    Sample(SampledKeys),
    /// Every entry, by key and value (see [`crate::entries`]).
    Content(EntryHasher, EntryDigest),
    /// Only the count (`allow_warnings` tables: postmap may drop duplicates).
    Count,
}

impl std::fmt::Debug for SourceWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SourceWriter")
            .field("path", &self.path)
            .field("len", &self.len)
            .finish()
    }
}

impl SourceWriter {
    /// Creates the staged source (it must not exist; `O_EXCL`, never through a link), mode
    /// 0600 whatever the live file's: nobody else reads it before it is installed, when
    /// [`install`] gives it the live file's permission bits. It gets the live source's owner
    /// when there is one: postmap run as root drops to the source owner's privileges.
    pub fn create(t: &TableConfig, staged: &Staged) -> Result<SourceWriter, TableError> {
        Self::create_with(t, staged, true)
    }

    /// [`SourceWriter::create`], without preparing the build's check when `checks` is false
    /// (a delta that is built in place needs none; a fallback to the full build computes it
    /// with [`check_of`]). `finish` then returns [`Check::Count`].
    pub fn create_with(
        t: &TableConfig,
        staged: &Staged,
        checks: bool,
    ) -> Result<SourceWriter, TableError> {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let live = std::fs::symlink_metadata(&t.path)
            .ok()
            .filter(|m| m.file_type().is_file());
        let file = create_private(&staged.source).map_err(io("create", &staged.source))?;
        if let Some(m) = live {
            // Best effort: only root may give a file away, and only root needs to.
            let _ = std::os::unix::fs::fchown(&file, Some(m.uid()), Some(m.gid()));
            let _ = file.set_permissions(std::fs::Permissions::from_mode(0o600));
        }
        Ok(SourceWriter {
            path: staged.source.clone(),
            file: std::io::BufWriter::with_capacity(256 * 1024, file),
            ctx: ring::digest::Context::new(&ring::digest::SHA256),
            counter: EntryCounter::default(),
            builder: t.builder,
            sampler: (checks && t.verify == crate::config::VerifyMode::Sample)
                .then(|| KeySampler::new(t.builder, ring_seed())),
            content: (checks && t.verify != crate::config::VerifyMode::Sample && !t.allow_warnings)
                .then(|| {
                    (
                        EntryHasher::default(),
                        EntryDigest::default(),
                        LogicalLines::default(),
                    )
                }),
            len: 0,
        })
    }

    /// Appends the next chunk.
    pub fn write(&mut self, chunk: &[u8]) -> Result<(), TableError> {
        self.ctx.update(chunk);
        self.counter.feed(chunk);
        if let Some(s) = self.sampler.as_mut() {
            s.feed(chunk);
        }
        if let Some((h, d, ll)) = self.content.as_mut() {
            let b = self.builder;
            ll.feed(chunk, &mut |l| h.add_logical(d, b, l));
        }
        self.len += chunk.len() as u64;
        self.file.write_all(chunk).map_err(io("write", &self.path))
    }

    /// Bytes written so far.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// True when nothing was written.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Flushes the file and starts its fsync on a thread of its own (the build runs
    /// meanwhile); returns what was written, how to check its build, and the fsync to wait for
    /// before the staged table counts as durable.
    pub fn finish(self) -> Result<(SourceDigest, Check, Syncing), TableError> {
        let path = self.path;
        let file = self
            .file
            .into_inner()
            .map_err(|e| io("write", &path)(e.into_error()))?;
        let syncing = Syncing::start(file, path.clone());
        let mut sha256 = [0u8; 32];
        sha256.copy_from_slice(self.ctx.finish().as_ref());
        let check = match (self.sampler, self.content) {
            (Some(s), _) => Check::Sample(s.finish()),
            (None, Some((h, mut d, ll))) => {
                let b = self.builder;
                ll.finish(&mut |l| h.add_logical(&mut d, b, l));
                Check::Content(h, d)
            }
            (None, None) => Check::Count,
        };
        let digest = SourceDigest {
            sha256,
            len: self.len,
            entries: self.counter.entries(),
        };
        Ok((digest, check, syncing))
    }
}

/// An fsync running on a thread of its own, overlapping other work; [`Syncing::wait`] gives
/// its result (an fsync error is never lost: the file's durability is decided by this one
/// call, not by a later fsync that may no longer report it).
#[derive(Debug)]
pub struct Syncing {
    path: PathBuf,
    state: SyncState,
}

#[derive(Debug)]
enum SyncState {
    Running(std::thread::JoinHandle<std::io::Result<()>>),
    Done(std::io::Result<()>),
}

impl Syncing {
    /// Starts `file.sync_all()` on a new thread; if no thread can be started, runs it now.
    pub fn start(file: File, path: PathBuf) -> Syncing {
        let shared = std::sync::Arc::new(file);
        let f = shared.clone();
        let spawned = std::thread::Builder::new()
            .name("txmap-fsync".into())
            .spawn(move || {
                fail::fail_point!("table::background_fsync", |_| Err(std::io::Error::other(
                    "injected fsync failure"
                )));
                f.sync_all()
            });
        let state = match spawned {
            Ok(thread) => SyncState::Running(thread),
            Err(_) => SyncState::Done(shared.sync_all()),
        };
        Syncing { path, state }
    }

    /// Waits for the fsync and returns its result.
    pub fn wait(self) -> Result<(), TableError> {
        let r = match self.state {
            SyncState::Running(t) => t
                .join()
                .unwrap_or_else(|_| Err(std::io::Error::other("the fsync thread panicked"))),
            SyncState::Done(r) => r,
        };
        r.map_err(io("fsync", &self.path))
    }
}

/// The check of a full build of the staged source at `path`, read once more (the fallback of
/// an incremental build, whose writer prepared none).
pub fn check_of(t: &TableConfig, path: &Path) -> Result<Check, TableError> {
    let mut f = File::open(path).map_err(io("open", path))?;
    let mut sampler = (t.verify == crate::config::VerifyMode::Sample)
        .then(|| KeySampler::new(t.builder, ring_seed()));
    let mut content =
        (t.verify != crate::config::VerifyMode::Sample && !t.allow_warnings).then(|| {
            (
                EntryHasher::default(),
                EntryDigest::default(),
                LogicalLines::default(),
            )
        });
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = f.read(&mut buf).map_err(io("read", path))?;
        if n == 0 {
            break;
        }
        if let Some(s) = sampler.as_mut() {
            s.feed(&buf[..n]);
        }
        if let Some((h, d, ll)) = content.as_mut() {
            ll.feed(&buf[..n], &mut |l| h.add_logical(d, t.builder, l));
        }
    }
    Ok(match (sampler, content) {
        (Some(s), _) => Check::Sample(s.finish()),
        (None, Some((h, mut d, ll))) => {
            ll.finish(&mut |l| h.add_logical(&mut d, t.builder, l));
            Check::Content(h, d)
        }
        (None, None) => Check::Count,
    })
}

fn ring_seed() -> u64 {
    use ring::rand::SecureRandom;
    let mut b = [0u8; 8];
    let _ = ring::rand::SystemRandom::new().fill(&mut b);
    u64::from_le_bytes(b)
}

fn builder_command(postfix: &PostfixSettings, builder: Builder) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::from(std_builder_command(postfix, builder));
    cmd.stdin(Stdio::null()).kill_on_drop(true);
    cmd
}

fn typed(t: &TableConfig, path: &Path) -> OsString {
    let mut s = OsString::from(format!("{}:", t.kind.as_str()));
    s.push(path.as_os_str());
    s
}

fn clip(text: &[u8]) -> String {
    let s = String::from_utf8_lossy(text);
    let s = s.trim();
    if s.len() > 2000 {
        let mut end = 2000;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        format!("{}...", &s[..end])
    } else {
        s.to_string()
    }
}

/// Builds the indexed file of a staged source with the configured builder. Any output on
/// stderr fails the build unless the table allows warnings.
pub async fn build(
    postfix: &PostfixSettings,
    t: &TableConfig,
    staged: &Staged,
) -> Result<(), TableError> {
    let mut cmd = builder_command(postfix, t.builder);
    cmd.arg(typed(t, &staged.source))
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let program = t.builder.as_str().to_string();
    let failed = |status: String, stderr: String| TableError::BuildFailed {
        program: program.clone(),
        status,
        stderr,
    };
    let mut child = cmd
        .spawn()
        .map_err(|e| failed("not started".into(), format!("cannot run {program}: {e}")))?;
    // `postmap` prints about 110 bytes per bad line: what it says costs at most
    // `CHILD_OUTPUT_KEPT` bytes of memory, however long the source.
    let err = match child.stderr.take() {
        Some(e) => read_capped(e, CHILD_OUTPUT_KEPT).await,
        None => Vec::new(),
    };
    let status = child
        .wait()
        .await
        .map_err(|e| failed("wait".into(), e.to_string()))?;
    if !status.success() || (!err.is_empty() && !t.allow_warnings) {
        return Err(failed(status.to_string(), clip(&err)));
    }
    Ok(())
}

/// What txmap keeps of a child's stderr (the start: the first lines say what is wrong).
pub const CHILD_OUTPUT_KEPT: usize = 64 * 1024;

/// Reads `r` to its end, keeping at most `keep` bytes; the rest is read and dropped, so the
/// child never blocks on a full pipe and its output costs bounded memory.
pub async fn read_capped<R: tokio::io::AsyncRead + Unpin>(mut r: R, keep: usize) -> Vec<u8> {
    use tokio::io::AsyncReadExt;
    let mut kept = Vec::new();
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        match r.read(&mut buf).await {
            Ok(0) | Err(_) => return kept,
            Ok(n) => {
                let room = keep.saturating_sub(kept.len()).min(n);
                kept.extend_from_slice(&buf[..room]);
            }
        }
    }
}

/// [`read_capped`] for a blocking reader.
pub fn read_capped_blocking<R: Read>(mut r: R, keep: usize) -> Vec<u8> {
    let mut kept = Vec::new();
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        match r.read(&mut buf) {
            Ok(0) | Err(_) => return kept,
            Ok(n) => {
                let room = keep.saturating_sub(kept.len()).min(n);
                kept.extend_from_slice(&buf[..room]);
            }
        }
    }
}

/// Streams the entries of a built table (`postmap -s`) to `each`, one output line at a time
/// (the dump can be hundreds of megabytes: never held whole).
pub async fn dump_built(
    postfix: &PostfixSettings,
    t: &TableConfig,
    path: &Path,
    mut each: impl FnMut(&[u8]) + Send,
) -> Result<(), TableError> {
    let mut cmd = builder_command(postfix, t.builder);
    cmd.arg("-s")
        .arg(typed(t, path))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let program = t.builder.as_str().to_string();
    let fail = |status: String, stderr: String| TableError::BuildFailed {
        program: format!("{program} -s"),
        status,
        stderr,
    };
    let mut child = cmd
        .spawn()
        .map_err(|e| fail("not started".into(), e.to_string()))?;
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| fail("no stdout".into(), String::new()))?;
    let mut stderr = child
        .stderr
        .take()
        .ok_or_else(|| fail("no stderr".into(), String::new()))?;
    let lines = async move {
        use tokio::io::AsyncBufReadExt;
        let mut r = tokio::io::BufReader::with_capacity(256 * 1024, stdout);
        let mut line = Vec::new();
        loop {
            line.clear();
            if r.read_until(b'\n', &mut line).await? == 0 {
                return Ok::<(), std::io::Error>(());
            }
            each(&line);
        }
    };
    let errs = async move { read_capped(&mut stderr, CHILD_OUTPUT_KEPT).await };
    let (n, err_text) = tokio::join!(lines, errs);
    n.map_err(|e| fail("read".into(), e.to_string()))?;
    let status = child
        .wait()
        .await
        .map_err(|e| fail("wait".into(), e.to_string()))?;
    if !status.success() || !err_text.is_empty() {
        return Err(fail(status.to_string(), clip(&err_text)));
    }
    Ok(())
}

/// Looks up every key of the staged source in the built table (`postmap -q -`), streaming
/// both: each answer line goes to `each`. For map types that cannot be listed (`cdb`).
pub async fn lookup_all(
    postfix: &PostfixSettings,
    t: &TableConfig,
    staged: &Staged,
    each: &mut (impl FnMut(&[u8]) + Send),
) -> Result<(), TableError> {
    let (pf, tc, source) = (postfix.clone(), t.clone(), staged.source.clone());
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<u8>>(64);
    let task = tokio::task::spawn_blocking(move || {
        lookup_lines(&pf, &tc, &source, |line| {
            let _ = tx.blocking_send(line.to_vec());
        })
    });
    while let Some(line) = rx.recv().await {
        each(&line);
    }
    let fail = |e: String| TableError::BuildFailed {
        program: format!("{} -q", t.builder.as_str()),
        status: "lookup".into(),
        stderr: e,
    };
    match task.await {
        Ok(Ok(err)) if err.is_empty() => Ok(()),
        Ok(Ok(err)) => Err(fail(clip(&err))),
        Ok(Err(e)) => Err(fail(e)),
        Err(e) => Err(fail(e.to_string())),
    }
}

/// The builder as a blocking command (`postmap` or `postalias`, with `-c` when configured).
fn std_builder_command(postfix: &PostfixSettings, builder: Builder) -> std::process::Command {
    let program = match builder {
        Builder::Postmap => &postfix.postmap,
        Builder::Postalias => &postfix.postalias,
    };
    let mut cmd = std::process::Command::new(program);
    if let Some(dir) = &postfix.config_dir {
        cmd.arg("-c").arg(dir);
    }
    cmd
}

/// Starts `postmap -q - TYPE:path` (or `postalias`) with all three pipes.
fn spawn_lookup(
    postfix: &PostfixSettings,
    t: &TableConfig,
    path: &Path,
) -> Result<
    (
        std::process::Child,
        std::process::ChildStdin,
        std::process::ChildStdout,
        std::process::ChildStderr,
    ),
    String,
> {
    let mut cmd = std_builder_command(postfix, t.builder);
    cmd.arg("-q").arg("-").arg(typed(t, path));
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot run {}: {e}", t.builder.as_str()))?;
    match (child.stdin.take(), child.stdout.take(), child.stderr.take()) {
        (Some(i), Some(o), Some(e)) => Ok((child, i, o, e)),
        _ => Err("cannot talk to the lookup process".into()),
    }
}

/// Feeds every key of the source at `path` to `postmap -q - TYPE:path`, and gives each output
/// line to `each`; returns what the program wrote on stderr.
fn lookup_lines(
    postfix: &PostfixSettings,
    t: &TableConfig,
    path: &Path,
    mut each: impl FnMut(&[u8]),
) -> Result<Vec<u8>, String> {
    use std::io::BufRead;
    let (mut child, mut stdin, stdout, stderr) = spawn_lookup(postfix, t, path)?;
    let (builder, source) = (t.builder, path.to_path_buf());
    let feeder = std::thread::spawn(move || -> std::io::Result<()> {
        let mut f = std::io::BufReader::new(File::open(&source)?);
        let mut ll = LogicalLines::default();
        let mut buf = vec![0u8; 256 * 1024];
        let mut out = std::io::BufWriter::new(&mut stdin);
        let mut err = Ok(());
        let mut write_key = |l: &[u8]| {
            let k = crate::entries::split_entry(builder, l).0;
            if err.is_ok() {
                err = out.write_all(k).and_then(|_| out.write_all(b"\n"));
            }
        };
        loop {
            let n = f.read(&mut buf)?;
            if n == 0 {
                break;
            }
            ll.feed(&buf[..n], &mut write_key);
        }
        ll.finish(&mut write_key);
        err?;
        out.flush()
    });
    let errors = std::thread::spawn(move || read_capped_blocking(stderr, CHILD_OUTPUT_KEPT));
    let mut r = std::io::BufReader::new(stdout);
    let mut line = Vec::new();
    loop {
        line.clear();
        match r.read_until(b'\n', &mut line) {
            Ok(0) | Err(_) => break,
            Ok(_) => each(&line),
        }
    }
    let fed = feeder.join();
    let status = child.wait().map_err(|e| e.to_string())?;
    let err = errors.join().unwrap_or_default();
    match fed {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(format!("feeding keys: {e}")),
        Err(_) => return Err("feeding keys failed".into()),
    }
    // Exit 1: no key at all was found (an empty table): an answer, not a failure.
    if !status.success() && status.code() != Some(1) {
        return Err(format!("{status}: {}", clip(&err)));
    }
    Ok(err)
}

/// Counts the entries of a built table by dumping it (`postmap -s`); `postalias`'s own keys
/// are not counted.
pub async fn count_built(
    postfix: &PostfixSettings,
    t: &TableConfig,
    path: &Path,
) -> Result<u64, TableError> {
    let mut n = 0u64;
    let b = t.builder;
    dump_built(postfix, t, path, |line| {
        if b == Builder::Postmap || crate::entries::parse_output_line(b, line).is_some() {
            n += 1;
        }
    })
    .await?;
    Ok(n)
}

/// Checks a built table against its source: the entry count always; with
/// [`Check::Content`], every key and value (one dump, hashed as it streams; see
/// [`crate::entries`]); with [`Check::Sample`], the sampled keys.
pub async fn verify(
    postfix: &PostfixSettings,
    t: &TableConfig,
    staged: &Staged,
    expected: u64,
    check: Check,
) -> Result<(), TableError> {
    let (hasher, want) = match check {
        Check::Sample(keys) => return verify_sample(postfix, t, staged, keys).await,
        Check::Count if t.kind == TableType::Cdb => {
            let mut found = 0u64;
            lookup_all(postfix, t, staged, &mut |_| found += 1).await?;
            let ok = match t.allow_warnings {
                true => found <= expected && (found > 0 || expected == 0),
                false => found == expected,
            };
            return if ok {
                Ok(())
            } else {
                Err(TableError::VerifyFailed { expected, found })
            };
        }
        Check::Count => {
            let found = count_built(postfix, t, &staged.source).await?;
            let ok = if t.allow_warnings {
                found <= expected && (found > 0 || expected == 0)
            } else {
                found == expected
            };
            return if ok {
                Ok(())
            } else {
                Err(TableError::VerifyFailed { expected, found })
            };
        }
        Check::Content(h, d) => (h, d),
    };
    // The file itself answers first (a `hash:` table read in place, in a fraction of what
    // `postmap -s` costs); when it does not confirm the source, Postfix's dump decides (and
    // names the error).
    let native = {
        let (t, staged, hasher) = (t.clone(), staged.clone(), hasher.clone());
        tokio::task::spawn_blocking(move || native_digest(&t, &staged, &hasher))
            .await
            .ok()
            .flatten()
    };
    let native_refused = match native {
        Some(got) if got.count == expected && want.count == expected && want.matches(&got) => {
            tracing::debug!(
                target: "txmapd::verify",
                entries = expected,
                "built table checked by reading the file"
            );
            return Ok(());
        }
        Some(_) => true,
        None => false,
    };
    let mut got = EntryDigest::default();
    let b = t.builder;
    let mut each = |line: &[u8]| {
        if let Some((k, v)) = crate::entries::parse_output_line(b, line) {
            hasher.add(&mut got, k, v);
        }
    };
    if t.kind == TableType::Cdb {
        // cdb cannot be listed (`postmap -s`: "sequence operation is not supported"): ask it
        // for every key of the source instead.
        lookup_all(postfix, t, staged, &mut each).await?;
    } else {
        dump_built(postfix, t, &staged.source, each).await?;
    }
    if got.count != expected || want.count != expected {
        return Err(TableError::VerifyFailed {
            expected,
            found: got.count,
        });
    }
    if !want.matches(&got) {
        return Err(TableError::ContentDiffers {
            detail: format!(
                "the built table holds {expected} entries, as the source, but their keys or \
                 values differ from the source's"
            ),
        });
    }
    if native_refused {
        reader_disagrees(staged, "postmap -s");
    }
    Ok(())
}

/// What a node recorded of the live indexed file it installed. A byte copy of that file is
/// trusted as the base of an incremental build only while every field is unchanged: any write,
/// `chmod`, link or replacement changes the inode, size, mtime or ctime.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct FileStamp {
    /// Device.
    pub dev: u64,
    /// Inode.
    pub ino: u64,
    /// Size in bytes.
    pub size: u64,
    /// Modification time (ns since the epoch).
    pub mtime_ns: i128,
    /// Inode change time (ns since the epoch).
    pub ctime_ns: i128,
}

impl FileStamp {
    /// The stamp of an open file.
    pub fn of(m: &std::fs::Metadata) -> FileStamp {
        use std::os::unix::fs::MetadataExt;
        FileStamp {
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
            ctime_ns: i128::from(m.ctime()) * 1_000_000_000 + i128::from(m.ctime_nsec()),
        }
    }
}

/// Opens `path` for reading, never through a symbolic link at its last component and never
/// blocking on a FIFO.
fn open_nofollow(path: &Path) -> std::io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
}

/// Opens a staged indexed file (never through a link) so that its stamp can be read once it is
/// installed: see [`stamp_installed`].
pub fn hold_staged(staged: &Staged) -> Option<File> {
    open_nofollow(&staged.indexed).ok()
}

/// The stamp of the indexed file just installed, read from the descriptor opened on the staged
/// file before the rename (so nothing swapped in at the live path between the rename and now
/// can be recorded as txmap's); `None` when the live path is not that very inode any more.
/// Without a held descriptor (a repeated install), the live file's own stamp.
pub fn stamp_installed(held: Option<File>, t: &TableConfig) -> Option<FileStamp> {
    let Some(f) = held else {
        return live_stamp(t).ok();
    };
    let mine = FileStamp::of(&f.metadata().ok()?);
    let live = live_stamp(t).ok()?;
    (live.dev == mine.dev && live.ino == mine.ino).then_some(mine)
}

/// [`hold_staged`] and [`stamp_installed`] for the staged source: opened before the rename,
/// stamped after it, `None` unless the live source is that very inode.
pub fn hold_staged_source(staged: &Staged) -> Option<File> {
    open_nofollow(&staged.source).ok()
}

/// The live indexed file of `t`, opened (never through a link) so that the inode a rename
/// replaces is freed when this is dropped, not inside the rename.
pub fn hold_live_indexed(t: &TableConfig) -> Option<File> {
    open_nofollow(&t.live_indexed()).ok()
}

/// See [`hold_staged_source`].
pub fn stamp_installed_source(held: Option<File>, t: &TableConfig) -> Option<FileStamp> {
    let mine = FileStamp::of(&held?.metadata().ok()?);
    let live = FileStamp::of(&std::fs::symlink_metadata(&t.path).ok()?);
    (live.dev == mine.dev && live.ino == mine.ino).then_some(mine)
}

/// Whether the live files of `t` are still the ones a node installed, by their stamps
/// (`lstat` of the two paths, no read): `Some(what changed)` when a recorded stamp and the live
/// file differ in device, inode, size or mtime (a write, a `postmap` run, a replacement), or the
/// file is gone or not a regular file; `None` when both are as installed, or nothing is
/// recorded (unknown). The inode change time is not compared: a `chmod`, or the link count of
/// the source's history copy, changes it without changing the content.
pub fn drift(
    t: &TableConfig,
    source: Option<FileStamp>,
    indexed: Option<FileStamp>,
) -> Option<String> {
    let same = |a: &FileStamp, b: &FileStamp| {
        (a.dev, a.ino, a.size, a.mtime_ns) == (b.dev, b.ino, b.size, b.mtime_ns)
    };
    let live_indexed = t.live_indexed();
    for (path, recorded) in [
        (live_indexed.as_path(), indexed),
        (t.path.as_path(), source),
    ] {
        let Some(recorded) = recorded else {
            continue;
        };
        match std::fs::symlink_metadata(path) {
            Ok(m) if !m.file_type().is_file() => {
                return Some(format!("{} is not a regular file any more", path.display()))
            }
            Ok(m) if !same(&FileStamp::of(&m), &recorded) => {
                return Some(format!("{} changed since it was installed", path.display()))
            }
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Some(format!("{} is missing", path.display()))
            }
            // Cannot tell (permissions): not reported as drift.
            Err(_) => {}
        }
    }
    None
}

/// The stamp of the live indexed file of `t` (never through a link).
pub fn live_stamp(t: &TableConfig) -> std::io::Result<FileStamp> {
    let m = std::fs::symlink_metadata(t.live_indexed())?;
    if !m.file_type().is_file() {
        return Err(std::io::Error::other(
            "the live indexed file is not a regular file",
        ));
    }
    Ok(FileStamp::of(&m))
}

/// A spare byte copy of a live indexed file, made in the background once a transaction ended,
/// so that an incremental build starts from it instead of copying the whole `.db` while the
/// cluster waits (166 MB at 1,000,000 lines). Named `.<file>.txmap-spare-<id><suffix>` in the
/// table's directory (a unique name per copy: a cancelled copy never removes another's file),
/// mode 0600 with the live file's owner. It is used only while the live file still has the
/// stamp it was copied from and the spare itself the stamp it had once written and fsynced;
/// otherwise it is removed and the live file is copied as before.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Spare {
    /// Where it is.
    pub path: PathBuf,
    /// Its own stamp once written and fsynced.
    pub stamp: FileStamp,
    /// The stamp of the live file it is a copy of.
    pub of: FileStamp,
}

/// Prefix of the spare copies of `t`: `.<file>.txmap-spare-`.
pub fn spare_prefix(t: &TableConfig) -> String {
    format!(".{}.txmap-spare-", file_name(t))
}

/// True for a file name that is a spare copy of `t` (exact shape: prefix, 32 hex digits, the
/// type's suffix).
pub fn is_spare_name(t: &TableConfig, name: &str) -> bool {
    name.strip_prefix(&spare_prefix(t))
        .and_then(|rest| rest.strip_suffix(t.kind.suffix()))
        .is_some_and(|id| id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// Removes every spare copy of `t` (at start: none is known valid).
pub fn remove_spares(t: &TableConfig) {
    let Ok(rd) = std::fs::read_dir(t.dir()) else {
        return;
    };
    for e in rd.flatten() {
        if is_spare_name(t, &e.file_name().to_string_lossy()) {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// Copies the live indexed file of `t`, which must have stamp `of` before and after, to a new
/// spare (fsynced). Stops early, removing the copy, when `cancel` is set.
pub fn make_spare(
    t: &TableConfig,
    of: FileStamp,
    cancel: &std::sync::atomic::AtomicBool,
) -> std::io::Result<Spare> {
    use std::os::unix::fs::MetadataExt;
    use std::sync::atomic::Ordering;
    let mut src = open_nofollow(&t.live_indexed())?;
    let before = src.metadata()?;
    if !before.file_type().is_file() || FileStamp::of(&before) != of {
        return Err(std::io::Error::other(
            "the live indexed file is not the one installed",
        ));
    }
    let path = t.dir().join(format!(
        "{}{}{}",
        spare_prefix(t),
        TxId::random(),
        t.kind.suffix()
    ));
    let mut dst = create_private(&path)?;
    let copied = (|| {
        let _ = std::os::unix::fs::fchown(&dst, Some(before.uid()), Some(before.gid()));
        let mut buf = vec![0u8; 1 << 20];
        loop {
            if cancel.load(Ordering::SeqCst) {
                return Err(std::io::Error::other("cancelled"));
            }
            let n = src.read(&mut buf)?;
            if n == 0 {
                break;
            }
            dst.write_all(&buf[..n])?;
        }
        if FileStamp::of(&src.metadata()?) != of {
            return Err(std::io::Error::other(
                "the live indexed file changed while copied",
            ));
        }
        dst.sync_all()?;
        Ok(FileStamp::of(&dst.metadata()?))
    })();
    match copied {
        Ok(stamp) => Ok(Spare { path, stamp, of }),
        Err(e) => {
            let _ = std::fs::remove_file(&path);
            Err(e)
        }
    }
}

/// Moves a valid spare of the live file stamped `of` to `to` (same directory); false, having
/// removed the spare, when it is not valid (then the caller copies the live file).
fn use_spare(spare: Spare, of: FileStamp, to: &Path) -> bool {
    let now = open_nofollow(&spare.path).and_then(|f| f.metadata());
    let why_not = if spare.of != of {
        Some("it is a copy of another live file".to_string())
    } else {
        match now {
            Ok(m) if m.file_type().is_file() && FileStamp::of(&m) == spare.stamp => {
                match std::fs::rename(&spare.path, to) {
                    Ok(()) => return true,
                    Err(e) => Some(format!("cannot rename it: {e}")),
                }
            }
            Ok(_) => Some("it changed since it was made".to_string()),
            Err(e) => Some(e.to_string()),
        }
    };
    if let Some(why) = why_not {
        tracing::warn!(spare = %spare.path.display(), %why, "spare copy not used; removed (the live file is copied instead)");
    }
    let _ = std::fs::remove_file(&spare.path);
    false
}

/// True for the map types Postfix can update in place (`postmap -i`, `postmap -d`); `cdb`
/// cannot.
pub fn updatable(kind: TableType) -> bool {
    kind != TableType::Cdb
}

/// Why an incremental build was not made (the full build then runs instead).
#[derive(Debug, thiserror::Error)]
pub enum IncrementalError {
    /// The live indexed file is not the one recorded at install.
    #[error("the live indexed file changed since txmap installed it ({0})")]
    Drifted(String),
    /// A Postfix command failed, or the result is not what the change says.
    #[error("{0}")]
    Failed(#[from] TableError),
}

/// Incremental build: copies the live indexed file (which must still carry `stamp`) to the
/// staged name, deletes the keys of `dropped` records (`postmap -d -`) and adds the `inserted`
/// records (`postmap -i`), then checks every changed key with `postmap -q -`: each added key
/// answers its new value, each deleted key that was not added again is gone. The unchanged part
/// is a byte copy of a table txmap built and verified: the spare copy of it when valid (see
/// [`Spare`]; with [`StagedCopy::Placed`] it is in place already and the first builder
/// started), else a copy made now. True when the spare was used.
pub async fn build_incremental(
    postfix: &PostfixSettings,
    t: &TableConfig,
    staged: &Staged,
    stamp: FileStamp,
    copy: StagedCopy,
    dropped: &[u8],
    inserted: &[u8],
) -> Result<bool, IncrementalError> {
    let (postfix, t, staged) = (postfix.clone(), t.clone(), staged.clone());
    let (dropped, inserted) = (dropped.to_vec(), inserted.to_vec());
    tokio::task::spawn_blocking(move || {
        incremental_blocking(&postfix, &t, &staged, stamp, copy, &dropped, &inserted)
    })
    .await
    .map_err(|e| {
        IncrementalError::Failed(io("incremental build", Path::new(""))(
            std::io::Error::other(e.to_string()),
        ))
    })?
}

/// Opens `t`'s live indexed file (never through a link, never blocking) and checks that it is
/// the one txmap installed (`stamp`); an incremental build may start from no other.
fn open_recorded_live(
    t: &TableConfig,
    stamp: FileStamp,
) -> Result<(File, std::fs::Metadata), IncrementalError> {
    let live = t.live_indexed();
    let f = open_nofollow(&live)
        .map_err(|e| IncrementalError::Drifted(format!("{}: {e}", live.display())))?;
    let m = f.metadata().map_err(io("stat", &live))?;
    if !m.file_type().is_file() || FileStamp::of(&m) != stamp {
        return Err(IncrementalError::Drifted(format!(
            "{} is not the file recorded at install",
            live.display()
        )));
    }
    Ok((f, m))
}

/// Where an incremental build's copy of the live indexed file comes from.
#[derive(Debug)]
pub enum StagedCopy {
    /// Already at the staged name, with the first builder started on it.
    Placed(Prestarted),
    /// The spare copy, if any, else a copy of the live file made now.
    Spare(Option<Spare>),
}

fn incremental_blocking(
    postfix: &PostfixSettings,
    t: &TableConfig,
    staged: &Staged,
    stamp: FileStamp,
    copy: StagedCopy,
    dropped: &[u8],
    inserted: &[u8],
) -> Result<bool, IncrementalError> {
    use crate::entries::{fold_key, parse_output_line, split_entry, LogicalLines};
    use std::collections::HashMap;
    use std::os::unix::fs::MetadataExt;
    let live = t.live_indexed();
    let (mut src, before) = open_recorded_live(t, stamp)?;
    let (from_spare, mut pre) = match copy {
        StagedCopy::Placed(p) => (true, Some(p)),
        StagedCopy::Spare(spare) => (
            spare.is_some_and(|s| use_spare(s, stamp, &staged.indexed)),
            None,
        ),
    };
    if !from_spare {
        let mut dst = create_private(&staged.indexed).map_err(io("create", &staged.indexed))?;
        let _ = std::os::unix::fs::fchown(&dst, Some(before.uid()), Some(before.gid()));
        std::io::copy(&mut src, &mut dst).map_err(io("copy", &live))?;
        let after = src.metadata().map_err(io("stat", &live))?;
        if FileStamp::of(&after) != stamp {
            return Err(IncrementalError::Drifted(format!(
                "{} changed while it was copied",
                live.display()
            )));
        }
    }
    // Keys of the dropped records, as written, one per line.
    let mut del_keys: Vec<Vec<u8>> = Vec::new();
    let mut ll = LogicalLines::default();
    let mut each = |l: &[u8]| del_keys.push(split_entry(t.builder, l).0.to_vec());
    ll.feed(dropped, &mut each);
    ll.finish(&mut each);
    // Added entries with their keys as written: Postfix folds keys by its own config (ASCII
    // only without `smtputf8_enable`), so lookups use the key as written and Postfix folds it.
    let mut added: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
    let mut ll = LogicalLines::default();
    let mut each = |l: &[u8]| {
        let (k, v) = split_entry(t.builder, l);
        added.push((k.to_vec(), crate::entries::norm_value(v)));
    };
    ll.feed(inserted, &mut each);
    ll.finish(&mut each);
    let want: HashMap<Vec<u8>, Vec<u8>> = added.iter().cloned().collect();
    // The builder started early, when it is the one this step needs (else it is stopped).
    let mut run = |args: &[&str], input: &[u8]| match pre.take() {
        Some(mut p) if p.args() == args => match p.child.take() {
            Some(child) => finish_builder(child, t, args, input),
            None => run_with_stdin(postfix, t, args, staged, input),
        },
        _ => run_with_stdin(postfix, t, args, staged, input),
    };
    if !del_keys.is_empty() {
        let mut stdin = Vec::new();
        for k in &del_keys {
            stdin.extend_from_slice(k);
            stdin.push(b'\n');
        }
        run(&["-d", "-"], &stdin)?;
    }
    // Crash point: the copy is half updated (keys deleted, none added yet).
    fail::fail_point!("participant::mid_incremental_build");
    if !inserted.is_empty() {
        run(&["-i"], inserted)?;
    }
    // One started early that was not needed after all: stopped before the file is read.
    drop(pre);
    // The updated file's fsync runs beside the check of its changed keys.
    let synced = sync_path_beside(&staged.indexed)?;
    // Check every changed key, asked as written.
    let mut ask: Vec<Vec<u8>> = want.keys().cloned().collect();
    ask.extend(del_keys.iter().filter(|k| !want.contains_key(*k)).cloned());
    ask.sort();
    ask.dedup();
    let mut query = Vec::new();
    for k in &ask {
        query.extend_from_slice(k);
        query.push(b'\n');
    }
    let show = |v: Option<&Vec<u8>>| {
        v.map(|v| format!("`{}`", String::from_utf8_lossy(v)))
            .unwrap_or_else(|| "no entry".into())
    };
    let differs = |k: &[u8], found: Option<&Vec<u8>>, expected: Option<&Vec<u8>>| {
        IncrementalError::Failed(TableError::ContentDiffers {
            detail: format!(
                "after the incremental update, key `{}` has {} instead of {}",
                String::from_utf8_lossy(k),
                show(found),
                show(expected)
            ),
        })
    };
    let check = |got: &HashMap<Vec<u8>, Vec<u8>>| -> Result<(), IncrementalError> {
        for (k, v) in &want {
            if got.get(k) != Some(v) {
                return Err(differs(k, got.get(k), Some(v)));
            }
        }
        for k in ask.iter().filter(|k| !want.contains_key(*k)) {
            // A removed key must be gone, unless Postfix folds it onto an added key (`Foo`
            // removed, `foo` added): then it answers that key's value.
            if let Some(found) = got.get(k) {
                let same = want
                    .iter()
                    .any(|(w, v)| fold_key(w) == fold_key(k) && v == found);
                if !same {
                    return Err(differs(k, Some(found), None));
                }
            }
        }
        Ok(())
    };
    // The file itself answers first (a `hash:` table read in place: no process); only what it
    // cannot confirm is asked of Postfix, whose answer decides.
    let native = native_lookups(t, staged, &ask).map(|got| check(&got).is_ok());
    let confirmed = native == Some(true);
    if !confirmed {
        let out = run_with_stdin(postfix, t, &["-q", "-"], staged, &query)?;
        let mut got: HashMap<Vec<u8>, Vec<u8>> = HashMap::new();
        for line in out.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
            if let Some((k, v)) = parse_output_line(t.builder, line) {
                got.insert(k.to_vec(), crate::entries::norm_value(v));
            }
        }
        check(&got)?;
        if native == Some(false) {
            reader_disagrees(staged, "postmap -q");
        }
    }
    // Logged under txmapd's target: these run in txmapd, whose debug lines the tests read.
    tracing::debug!(
        target: "txmapd::verify",
        keys = ask.len(),
        by = if confirmed {
            "reading the file"
        } else {
            "postmap -q"
        },
        "changed keys checked"
    );
    synced.wait()?;
    Ok(from_spare)
}

/// Says, loudly, that reading the staged file found other content than Postfix's own tool
/// (`tool`), whose answer was used: a bug of [`crate::bdb`], or a file changed between the two
/// reads.
fn reader_disagrees(staged: &Staged, tool: &str) {
    tracing::warn!(
        target: "txmapd::verify",
        file = %staged.indexed.display(),
        "reading the staged table found other content than {tool}; {tool}'s answer is used (please report this)"
    );
}

/// What a lookup of each key of `ask` (as written) finds in a staged `hash:` table, read in
/// place by [`crate::bdb`] (values normalized as compared); `None` when the file cannot answer
/// for Postfix: another map type, a key that is not ASCII (Postfix's folding of other keys
/// depends on its `smtputf8_enable`), or a file the reader does not handle.
fn native_lookups(
    t: &TableConfig,
    staged: &Staged,
    ask: &[Vec<u8>],
) -> Option<std::collections::HashMap<Vec<u8>, Vec<u8>>> {
    if !ask.iter().all(|k| k.is_ascii()) {
        return None;
    }
    read_staged_hash(t, staged, |db| {
        let mut got = std::collections::HashMap::new();
        for k in ask {
            if let Some(v) = db.postfix_get(&k.to_ascii_lowercase())? {
                got.insert(k.clone(), crate::entries::norm_value(&v));
            }
        }
        Ok(got)
    })
}

/// The digest of every entry of a staged `hash:` table, read in place by [`crate::bdb`]
/// (`postalias`'s own keys left out, as in [`crate::entries::parse_output_line`]); `None`
/// when the reader does not handle the file.
fn native_digest(t: &TableConfig, staged: &Staged, hasher: &EntryHasher) -> Option<EntryDigest> {
    read_staged_hash(t, staged, |db| {
        let mut d = EntryDigest::default();
        db.for_each(|k, v| {
            if !crate::entries::builder_own_key(t.builder, k) {
                hasher.add(&mut d, k, v);
            }
        })?;
        Ok(d)
    })
}

/// `read` applied to the staged indexed file of a `hash:` table `t`; `None` for another map
/// type, or (logged) when the reader does not handle the file: Postfix's tools then check it.
fn read_staged_hash<T>(
    t: &TableConfig,
    staged: &Staged,
    read: impl FnOnce(&crate::bdb::HashDb) -> Result<T, crate::bdb::BdbError>,
) -> Option<T> {
    if t.kind != TableType::Hash {
        return None;
    }
    crate::bdb::HashDb::open(&staged.indexed)
        .and_then(|db| read(&db))
        .map_err(|e| {
            tracing::debug!(target: "txmapd::verify", error = %e, "the staged table is checked by Postfix")
        })
        .ok()
}

/// Runs the table's builder with `args` on the staged file, `stdin` fed from another thread;
/// returns its stdout. Any stderr output or a failure status is an error.
fn run_with_stdin(
    postfix: &PostfixSettings,
    t: &TableConfig,
    args: &[&str],
    staged: &Staged,
    stdin: &[u8],
) -> Result<Vec<u8>, TableError> {
    let child = spawn_builder(postfix, t, args, staged)?;
    finish_builder(child, t, args, stdin)
}

/// Starts the table's builder with `args` on the staged file, all three pipes open.
fn spawn_builder(
    postfix: &PostfixSettings,
    t: &TableConfig,
    args: &[&str],
    staged: &Staged,
) -> Result<std::process::Child, TableError> {
    let mut cmd = std_builder_command(postfix, t.builder);
    cmd.args(args).arg(typed(t, &staged.source));
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd.spawn().map_err(|e| TableError::BuildFailed {
        program: format!("{} {}", t.builder.as_str(), args.join(" ")),
        status: "not started".into(),
        stderr: e.to_string(),
    })
}

/// Feeds `stdin` to a builder started by [`spawn_builder`] with `args` and waits for it;
/// returns its stdout. Any stderr output or a failure status is an error.
fn finish_builder(
    mut child: std::process::Child,
    t: &TableConfig,
    args: &[&str],
    stdin: &[u8],
) -> Result<Vec<u8>, TableError> {
    let what = format!("{} {}", t.builder.as_str(), args.join(" "));
    let fail = |status: String, stderr: String| TableError::BuildFailed {
        program: what.clone(),
        status,
        stderr,
    };
    let Some(mut input) = child.stdin.take() else {
        let _ = child.kill();
        let _ = child.wait();
        return Err(fail("no stdin".into(), String::new()));
    };
    let data = stdin.to_vec();
    let writer = std::thread::spawn(move || {
        let _ = input.write_all(&data);
    });
    // stderr bounded (a warning per bad line); stdout answers the keys fed in, so it is
    // bounded by the input, and kept whole.
    let errs = child
        .stderr
        .take()
        .map(|e| std::thread::spawn(move || read_capped_blocking(e, CHILD_OUTPUT_KEPT)));
    let mut stdout = Vec::new();
    if let Some(mut o) = child.stdout.take() {
        let _ = o.read_to_end(&mut stdout);
    }
    let err = errs.and_then(|h| h.join().ok()).unwrap_or_default();
    let status = child
        .wait()
        .map_err(|e| fail("wait".into(), e.to_string()))?;
    let _ = writer.join();
    // `-q` exits 1 when no key at all was found: an answer, not a failure.
    let nothing_found = args.first() == Some(&"-q") && status.code() == Some(1);
    if !(status.success() || nothing_found) || !err.is_empty() {
        return Err(fail(status.to_string(), clip(&err)));
    }
    Ok(stdout)
}

/// The first step of an incremental build, started while the new source is still being
/// rebuilt: the spare copy of the live indexed file is in place at the staged name and the
/// builder that applies the change (`postmap -d -`, or `postmap -i` when nothing is removed)
/// runs on it, waiting for its input. [`build_incremental`] feeds it; dropping it kills the
/// builder (the staged copy is then the caller's to remove).
#[derive(Debug)]
pub struct Prestarted {
    child: Option<std::process::Child>,
    deletes: bool,
}

impl Prestarted {
    /// The builder's arguments.
    fn args(&self) -> &'static [&'static str] {
        match self.deletes {
            true => &["-d", "-"],
            false => &["-i"],
        }
    }
}

impl Drop for Prestarted {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Puts the spare copy of `t`'s live indexed file (the one stamped `stamp`) at the staged name
/// and starts the builder that will apply the change on it (see [`Prestarted`]): `deletes` when
/// the change removes records. `None`, having started nothing, when the live file is not the
/// one recorded or the spare cannot be used (the build then copies the live file, or builds in
/// full).
pub fn prestart_incremental(
    postfix: &PostfixSettings,
    t: &TableConfig,
    staged: &Staged,
    stamp: FileStamp,
    spare: Spare,
    deletes: bool,
) -> Option<Prestarted> {
    if open_recorded_live(t, stamp).is_err() {
        let _ = std::fs::remove_file(&spare.path);
        return None;
    }
    if !use_spare(spare, stamp, &staged.indexed) {
        return None;
    }
    let mut pre = Prestarted {
        child: None,
        deletes,
    };
    // A builder that does not start is started again, and fails again, in its turn.
    pre.child = spawn_builder(postfix, t, pre.args(), staged).ok();
    Some(pre)
}

/// Starts the fsync of the file at `path` on a thread of its own (see [`Syncing`]).
pub fn sync_path_beside(p: &Path) -> Result<Syncing, TableError> {
    let f = open_nofollow(p).map_err(io("open", p))?;
    Ok(Syncing::start(f, p.to_path_buf()))
}

/// fsyncs a file given by path.
pub fn fsync_path(p: &Path) -> Result<(), TableError> {
    File::open(p)
        .and_then(|f| f.sync_all())
        .map_err(io("fsync", p))
}

/// fsyncs a directory (makes renames and creations in it durable).
pub fn fsync_dir(p: &Path) -> Result<(), TableError> {
    File::open(p)
        .and_then(|f| f.sync_all())
        .map_err(io("fsync directory", p))
}

/// Installs a prepared table: indexed file first, then the source, then fsync the directory.
/// Idempotent: a staged file already renamed is skipped (a crash between the two renames is
/// finished by calling this again).
pub fn install(t: &TableConfig, staged: &Staged) -> Result<(), TableError> {
    let live_indexed = t.live_indexed();
    fail::fail_point!("table::install", |_| Err(io("rename", &staged.indexed)(
        std::io::Error::other("injected failure (table::install)")
    )));
    for (from, to) in [(&staged.indexed, &live_indexed), (&staged.source, &t.path)] {
        publish_mode(from, to).map_err(io("chmod", from))?;
        match std::fs::rename(from, to) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !from.exists() => {}
            Err(e) => return Err(io("rename", from)(e)),
        }
    }
    crate::defects::install_dir_fsync(|| fsync_dir(t.dir())) // hook: defects.rs (tests only)
}

/// Gives a staged file, just before it is installed over `live`, the live file's permission
/// bits (0644 for a first install), never set-uid, set-gid or sticky. A staged file already
/// renamed (a repeated install) is skipped.
fn publish_mode(staged: &Path, live: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let mode = std::fs::symlink_metadata(live)
        .ok()
        .filter(|m| m.file_type().is_file())
        .map(|m| m.permissions().mode() & 0o777)
        .unwrap_or(0o644);
    let f = match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(staged)
    {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    f.set_permissions(std::fs::Permissions::from_mode(mode))
}

/// The lock file that serializes transactions on one table: `<state_dir>/locks/<table>.lock`.
/// It is a separate file (never the live `.db`) because Postfix readers take a shared `flock`
/// on the live `.db` for every lookup: holding that exclusively would block mail.
pub fn lock_path(state_dir: &Path, table: &str) -> PathBuf {
    state_dir.join("locks").join(format!("{table}.lock"))
}

/// Takes the table's exclusive `flock` without waiting. `Ok(None)`: another process holds it.
/// The lock is released when the returned file is dropped, or by the kernel when the process
/// dies, so a crash can never leave it held.
pub fn try_lock(path: &Path) -> Result<Option<File>, TableError> {
    if let Some(dir) = path.parent() {
        create_dir_durable(dir, 0o755).map_err(io("create", dir))?;
    }
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(io("open lock", path))?;
    match fs4::FileExt::try_lock(&f) {
        Ok(()) => Ok(Some(f)),
        Err(fs4::TryLockError::WouldBlock) => Ok(None),
        Err(fs4::TryLockError::Error(e)) => Err(io("lock", path)(e)),
    }
}

/// The lookup key of one source line, if the line starts an entry: its first word (for
/// `postalias`, the name before the colon).
pub fn key_of(builder: Builder, line: &[u8]) -> Option<&[u8]> {
    match line.first() {
        None | Some(b' ' | b'\t' | b'\r' | b'\n' | b'#' | 0x0b | 0x0c) => None,
        _ => {
            let end = line
                .iter()
                .position(|b| {
                    b.is_ascii_whitespace() || (builder == Builder::Postalias && *b == b':')
                })
                .unwrap_or(line.len());
            Some(&line[..end])
        }
    }
}

/// The lookup keys of a table source held in memory (tests and small tables).
pub fn keys_of(builder: Builder, source: &[u8]) -> Vec<String> {
    source
        .split(|b| *b == b'\n')
        .filter_map(|l| key_of(builder, l))
        .map(|k| String::from_utf8_lossy(k).into_owned())
        .collect()
}

/// Checks that the live table is what was recorded: the source's sha256, and that the live
/// indexed file answers for every key of the source (`postmap -q -`). Returns every drift found.
/// The source is streamed (read once, line by line), never held whole in memory.
pub async fn verify_live(
    postfix: &PostfixSettings,
    t: &TableConfig,
    recorded: Option<[u8; 32]>,
) -> Vec<String> {
    let (postfix, t) = (postfix.clone(), t.clone());
    tokio::task::spawn_blocking(move || verify_live_blocking(&postfix, &t, recorded))
        .await
        .unwrap_or_else(|e| vec![format!("verification task failed: {e}")])
}

/// Runs `postmap -q - TYPE:PATH` (or `postalias`), feeding it keys with `feed` while another
/// thread counts the answers, so that neither pipe can fill up. Returns the number of keys
/// answered, what the program printed on stderr, and what `feed` returned.
fn lookup_keys<R>(
    postfix: &PostfixSettings,
    t: &TableConfig,
    path: &Path,
    feed: impl FnOnce(&mut std::process::ChildStdin) -> R,
) -> Result<(usize, Vec<u8>, R), String> {
    use std::io::BufRead;
    let (mut child, mut stdin, stdout, stderr) = spawn_lookup(postfix, t, path)?;
    let counter = std::thread::spawn(move || std::io::BufReader::new(stdout).split(b'\n').count());
    let errors = std::thread::spawn(move || read_capped_blocking(stderr, CHILD_OUTPUT_KEPT));
    let fed = feed(&mut stdin);
    drop(stdin);
    let _ = child.wait();
    let found = counter.join().unwrap_or(0);
    Ok((found, errors.join().unwrap_or_default(), fed))
}

fn verify_live_blocking(
    postfix: &PostfixSettings,
    t: &TableConfig,
    recorded: Option<[u8; 32]>,
) -> Vec<String> {
    use std::io::BufRead;
    let mut problems = Vec::new();
    let indexed = t.live_indexed();
    match (std::fs::metadata(&t.path), std::fs::metadata(&indexed)) {
        (Err(e), _) => return vec![format!("cannot read live source {}: {e}", t.path.display())],
        (_, Err(e)) => return vec![format!("live indexed file {}: {e}", indexed.display())],
        (Ok(s), Ok(i)) => {
            if let (Ok(sm), Ok(im)) = (s.modified(), i.modified()) {
                if im < sm {
                    problems.push(format!("{} is older than its source", indexed.display()));
                }
            }
        }
    }
    // Stream the live source once: hash it, and feed its keys to the lookup.
    let feed = |stdin: &mut std::process::ChildStdin| -> std::io::Result<([u8; 32], usize)> {
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        let mut keys = 0usize;
        let mut r = std::io::BufReader::with_capacity(256 * 1024, File::open(&t.path)?);
        let mut line = Vec::new();
        loop {
            line.clear();
            if r.read_until(b'\n', &mut line)? == 0 {
                break;
            }
            ctx.update(&line);
            if let Some(k) = key_of(t.builder, &line) {
                keys += 1;
                // A lookup process that died early shows as missing answers; keep hashing.
                let _ = stdin.write_all(k).and_then(|_| stdin.write_all(b"\n"));
            }
        }
        Ok((ctx.finish().as_ref().try_into().unwrap_or([0; 32]), keys))
    };
    let (found, err_text, (sha, keys)) = match lookup_keys(postfix, t, &t.path, feed) {
        Ok((f, e, Ok(x))) => (f, e, x),
        Ok((_, _, Err(e))) => {
            problems.push(format!("cannot read live source {}: {e}", t.path.display()));
            return problems;
        }
        Err(e) => {
            problems.push(e);
            return problems;
        }
    };
    if let Some(r) = recorded {
        if r != sha {
            problems.push(format!(
                "live source {} changed: sha256 {} but generation recorded {}",
                t.path.display(),
                hex(&sha),
                hex(&r)
            ));
        }
    }
    if found != keys {
        problems.push(format!(
            "live indexed file answers for {found} of the source's {keys} keys (rebuilt or edited by hand?)"
        ));
    }
    if !err_text.is_empty() {
        problems.push(format!("{} -q: {}", t.builder.as_str(), clip(&err_text)));
    }
    problems
}

/// Keeps a uniform random sample of the keys of a source as it streams by (reservoir sampling),
/// for `verify = "sample"`.
#[derive(Debug, Clone)]
pub struct KeySampler {
    builder: Builder,
    state: SamplerState,
    cur: Vec<u8>,
    seen: u64,
    keys: Vec<Vec<u8>>,
    rng: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SamplerState {
    LineStart,
    InKey,
    Skip,
}

/// Keys kept by [`KeySampler`].
pub const SAMPLE_KEYS: usize = 64;

impl KeySampler {
    /// A sampler for a source of `builder`'s format; `seed` makes it deterministic.
    pub fn new(builder: Builder, seed: u64) -> KeySampler {
        KeySampler {
            builder,
            state: SamplerState::LineStart,
            cur: Vec::new(),
            seen: 0,
            keys: Vec::new(),
            rng: seed | 1,
        }
    }

    fn next(&mut self) -> u64 {
        // xorshift64*
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        self.rng.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn take_key(&mut self) {
        self.seen += 1;
        let key = std::mem::take(&mut self.cur);
        if self.keys.len() < SAMPLE_KEYS {
            self.keys.push(key);
        } else {
            let j = self.next() % self.seen;
            if let Some(slot) = self.keys.get_mut(j as usize) {
                *slot = key;
            }
        }
    }

    /// Feeds the next bytes of the source.
    pub fn feed(&mut self, chunk: &[u8]) {
        for &b in chunk {
            match self.state {
                SamplerState::LineStart => {
                    if matches!(b, b' ' | b'\t' | b'\r' | b'#' | 0x0b | 0x0c) {
                        self.state = SamplerState::Skip;
                    } else if b != b'\n' {
                        self.cur.clear();
                        self.cur.push(b);
                        self.state = SamplerState::InKey;
                    }
                }
                SamplerState::InKey => {
                    if b == b'\n' {
                        self.take_key();
                        self.state = SamplerState::LineStart;
                    } else if b.is_ascii_whitespace()
                        || (self.builder == Builder::Postalias && b == b':')
                    {
                        self.take_key();
                        self.state = SamplerState::Skip;
                    } else if self.cur.len() < 4096 {
                        self.cur.push(b);
                    }
                }
                SamplerState::Skip => {
                    if b == b'\n' {
                        self.state = SamplerState::LineStart;
                    }
                }
            }
        }
    }

    /// The sample (at most [`SAMPLE_KEYS`] keys).
    pub fn finish(mut self) -> Vec<Vec<u8>> {
        if self.state == SamplerState::InKey {
            self.take_key();
        }
        self.keys
    }
}

/// `verify = "sample"`: the built table must answer for every sampled key of the source.
pub async fn verify_sample(
    postfix: &PostfixSettings,
    t: &TableConfig,
    staged: &Staged,
    keys: Vec<Vec<u8>>,
) -> Result<(), TableError> {
    let (postfix, t, path) = (postfix.clone(), t.clone(), staged.source.clone());
    let total = keys.len() as u64;
    let res = tokio::task::spawn_blocking(move || {
        lookup_keys(&postfix, &t, &path, |stdin| {
            for k in &keys {
                if stdin
                    .write_all(k)
                    .and_then(|_| stdin.write_all(b"\n"))
                    .is_err()
                {
                    break;
                }
            }
        })
    })
    .await;
    let fail = |stderr: String| TableError::BuildFailed {
        program: "postmap -q".into(),
        status: "lookup".into(),
        stderr,
    };
    match res {
        Ok(Ok((found, err, ()))) if err.is_empty() => {
            if found as u64 == total {
                Ok(())
            } else {
                Err(TableError::VerifyFailed {
                    expected: total,
                    found: found as u64,
                })
            }
        }
        Ok(Ok((_, err, ()))) => Err(fail(clip(&err))),
        Ok(Err(e)) => Err(fail(e)),
        Err(e) => Err(fail(e.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn count(s: &str) -> u64 {
        let mut c = EntryCounter::default();
        // Feed in awkward pieces: counting must not depend on chunk boundaries.
        for piece in s.as_bytes().chunks(3) {
            c.feed(piece);
        }
        c.entries()
    }

    #[test]
    fn counts_logical_lines_like_postmap() {
        assert_eq!(count(""), 0);
        assert_eq!(count("a b\nc d\n"), 2);
        assert_eq!(count("a b\nc d"), 2);
        assert_eq!(
            count("# comment\n\n   \na b\n  continued\n\t# indented comment\nc d\n"),
            2
        );
        assert_eq!(count("owner: root,\n  other\nlist: \"| cmd\"\n"), 2);
        assert_eq!(count("a b\r\n\r\nc d\r\n"), 2);
    }

    /// The line-skipping counter equals the byte-by-byte definition, whatever the chunking.
    #[test]
    fn counter_equals_the_byte_by_byte_definition() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _ in 0..300 {
            let len = (next() % 200) as usize;
            let text: Vec<u8> = (0..len)
                .map(|_| b"ab \n\n#\t\r"[(next() % 8) as usize])
                .collect();
            let mut want = 0;
            let mut mid = false;
            for &b in &text {
                if !mid && !matches!(b, b' ' | b'\t' | b'\n' | b'\r' | b'#' | 0x0b | 0x0c) {
                    want += 1;
                }
                mid = b != b'\n';
            }
            let mut c = EntryCounter::default();
            let mut rest = &text[..];
            while !rest.is_empty() {
                let n = 1 + (next() % 9) as usize;
                let (a, b) = rest.split_at(n.min(rest.len()));
                c.feed(a);
                rest = b;
            }
            assert_eq!(c.entries(), want, "{:?}", String::from_utf8_lossy(&text));
        }
    }

    #[test]
    fn digest_matches_counter_and_ring() {
        let text = b"a b\n# x\nc d\n";
        let d = digest_reader(&mut &text[..]).unwrap();
        assert_eq!(d.len, text.len() as u64);
        assert_eq!(d.entries, 2);
        assert_eq!(
            hex(&d.sha256),
            hex(ring::digest::digest(&ring::digest::SHA256, text).as_ref())
        );
    }

    #[test]
    fn extracts_lookup_keys() {
        let src = b"# c\na@x b\n  cont\nc@y\td\n\nowner: root\n";
        assert_eq!(keys_of(Builder::Postmap, src), vec!["a@x", "c@y", "owner:"]);
        assert_eq!(
            keys_of(Builder::Postalias, b"list1: \"| q\"\nx:y\n"),
            vec!["list1", "x"]
        );
    }

    #[test]
    fn samples_every_key_of_a_small_source_and_at_most_64_of_a_large_one() {
        let src = b"# c\na@x b\n  cont\nc@y\td\n\nlast z";
        let mut s = KeySampler::new(Builder::Postmap, 7);
        for piece in src.chunks(2) {
            s.feed(piece);
        }
        let mut keys = s.finish();
        keys.sort();
        assert_eq!(
            keys,
            vec![b"a@x".to_vec(), b"c@y".to_vec(), b"last".to_vec()]
        );
        let big: String = (0..10_000).map(|i| format!("k{i} v\n")).collect();
        let mut s = KeySampler::new(Builder::Postmap, 7);
        s.feed(big.as_bytes());
        let keys = s.finish();
        assert_eq!(keys.len(), SAMPLE_KEYS);
        // Uniform, not just the first 64.
        assert!(keys.iter().any(|k| k.len() >= 5), "{keys:?}");
        let mut a = KeySampler::new(Builder::Postalias, 1);
        a.feed(b"list1: \"| q\"\n");
        assert_eq!(a.finish(), vec![b"list1".to_vec()]);
    }

    #[test]
    fn appends_suffixes() {
        assert_eq!(
            with_suffix(Path::new("/a/b"), ".db"),
            PathBuf::from("/a/b.db")
        );
    }
}
