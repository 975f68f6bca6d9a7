//! A filesystem that loses what was not synced: the power cut of the chaos tests (issue 13).
//!
//! # The model
//!
//! Every inode has a **live** state (what processes read now) and a **durable** state (what a
//! power cut leaves):
//!
//! - a regular file's durable state is its content as of its last `fsync`/`fdatasync` (any
//!   handle, read-only ones too); a file never synced is durably empty;
//! - a directory's durable state is its name → inode map as of its last `fsync` (an `opendir`
//!   handle: FUSE's `fsyncdir`); a directory never synced is durably empty.
//!
//! So, after a cut: a write without fsync is gone; `ftruncate`/`O_TRUNC` without fsync is
//! undone; a file created, renamed, linked or unlinked in a directory that was not fsynced
//! afterwards is back where it was (a rename of a synced file over another without a directory
//! fsync leaves the **old** content under the name, and the new file nowhere); a new file
//! fsynced in a directory not synced vanishes; a `mkdir` whose parent was not synced vanishes
//! with everything in it, synced or not. A `link(2)` (txmap's no-replace create of a decision)
//! is durable once its directory is synced, and the content it shows is whatever of the inode
//! was synced. The namespace after a cut is rebuilt from the root through the durable maps
//! only: what they do not reach is lost.
//!
//! A **power cut** ([`PowerNode::cut_power`]) freezes the node's mounts first (from that
//! instant every operation fails with `EIO`, so nothing a dying process still does becomes
//! durable), SIGKILLs every process of the node (the daemon, every process with a file or
//! working directory on the node's mounts: `postmap`, `txmap`), then reverts each disk to its
//! durable state, optionally **tearing** the last unsynced write of each file: with
//! probability ½ (seeded), a random prefix of that write is kept on top of the durable content
//! (as a disk that wrote some sectors of it). Then the helper remounts, so the kernel's caches
//! start empty, and the node can be restarted.
//!
//! # Implementation
//!
//! `lossyfs` ([`serve`], binary `src/bin/lossyfs.rs`) is a separate process per mount, driven
//! over its stdin by [`LossyMount`]: a cut can then never deadlock the test process (a FUSE
//! server inside the test would be frozen by the very processes it serves). The helper loads
//! the backing directory into memory at start (all of it durable), serves the mount with
//! `fuser` (pure-Rust mount through `fusermount3`, `default_permissions` and `allow_other`, so
//! the kernel checks modes and owners for the daemon's user), and writes the live tree back
//! into the backing directory when it is unmounted cleanly. The live and durable states are
//! kept in memory ([`disk::Disk`]), content shared between the two until the next write: the
//! test tables are small, and a model in memory has no second source of truth to drift from.
//! [`LossyMount::over`] moves a directory aside as the backing directory and mounts over its
//! path, and puts it back on unmount, so the node's files are where the config says.
//!
//! Locks: the filesystem does not advertise FUSE's lock capabilities, so the kernel handles
//! `flock` and `fcntl` locks itself on the FUSE inode, among the processes of this machine,
//! and drops them when a process dies: the same semantics txmap gets from a local disk.
//!
//! # Limits
//!
//! - Metadata (mode, owner, times) is not versioned: a `chmod`/`chown` is durable at once.
//!   txmap sets modes on fds it then fsyncs, so it does not depend on this.
//! - A file's size change by truncation is reverted with its content, and only the *last*
//!   write of a file since its last fsync can tear (a prefix of it kept); earlier unsynced
//!   writes are lost whole (like LazyFS's "torn-op", not a per-sector model of a disk that
//!   may persist any subset of unsynced blocks).
//! - What was synced is never lost or damaged by a later cut: no lying disk, no corruption of
//!   synced data, no reordering of a directory's unsynced entries (they all go, or, once the
//!   directory is synced, all stay).
//! - A directory moved between two parents where only one was synced keeps one name (the
//!   first in traversal order), where a real filesystem might show it in either.
//! - Sockets and FIFOs are names only (the kernel serves them; the hook's socket binds on
//!   it) and are not written back to the backing directory; devices cannot be created
//!   (`EPERM`). Extended attributes, `fallocate` and `copy_file_range` answer `ENOSYS`
//!   (callers fall back to plain writes).
//! - Sizes are limited to 4 GiB per file; everything lives in the helper's memory.

pub mod cluster;
pub mod disk;
pub mod fuse;

pub use disk::{CutReport, Dirty};

use anyhow::{bail, Context, Result};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Fails with a message that says what is missing when this machine cannot mount FUSE
/// filesystems (`/dev/fuse`, `fusermount3` from Debian's `fuse3`). The power tests call it
/// first and fail with that message: they never pass without having cut power.
pub fn check_available() -> Result<()> {
    if !Path::new("/dev/fuse").exists() {
        bail!(
            "the power-loss tests need FUSE: /dev/fuse is missing on this machine \
             (load the fuse module, or give the container --device /dev/fuse)"
        );
    }
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")
    {
        bail!("the power-loss tests need FUSE: /dev/fuse cannot be opened: {e}");
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    let found = std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/bin"), PathBuf::from("/bin")])
        .any(|d| d.join("fusermount3").is_file());
    if !found {
        bail!(
            "the power-loss tests need FUSE: fusermount3 is missing \
             (Debian package fuse3; scripts/setup.sh installs it)"
        );
    }
    Ok(())
}

/// The helper binary: `TXMAP_LOSSYFS`, or `lossyfs` beside (or one level above) the running
/// executable, which is where cargo puts it for the crate's tests and binaries.
pub fn helper() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("TXMAP_LOSSYFS") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe().context("current_exe")?;
    for dir in exe.ancestors().skip(1).take(2) {
        let p = dir.join("lossyfs");
        if p.is_file() {
            return Ok(p);
        }
    }
    bail!(
        "the lossyfs helper is not built next to {}: run `cargo build -p txmap-chaos-tests --bins`",
        exe.display()
    )
}

/// One mounted lossy filesystem, served by its own helper process.
#[derive(Debug)]
pub struct LossyMount {
    child: Child,
    stdin: Option<ChildStdin>,
    out: Arc<Mutex<BufReader<ChildStdout>>>,
    /// Where it is mounted.
    pub mountpoint: PathBuf,
    /// Where its files are kept between mounts.
    pub backing: PathBuf,
    done: bool,
}

fn backing_of(dir: &Path) -> PathBuf {
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    dir.with_file_name(format!(".{name}.lossyfs"))
}

impl LossyMount {
    /// Moves `dir` aside (to `.<name>.lossyfs` beside it) and mounts a lossy filesystem with
    /// its content over `dir`. Everything in it counts as durable.
    pub fn over(dir: &Path) -> Result<LossyMount> {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        check_available()?;
        let backing = backing_of(dir);
        let m = std::fs::metadata(dir).with_context(|| format!("{}", dir.display()))?;
        std::fs::rename(dir, &backing)?;
        std::fs::create_dir(dir)?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(m.mode() & 0o7777))?;
        std::os::unix::fs::chown(dir, Some(m.uid()), Some(m.gid()))?;
        match LossyMount::mount(&backing, dir) {
            Ok(l) => Ok(l),
            Err(e) => {
                let _ = std::fs::remove_dir(dir);
                let _ = std::fs::rename(&backing, dir);
                Err(e)
            }
        }
    }

    /// Mounts `backing`'s content at `mountpoint` (an existing directory).
    pub fn mount(backing: &Path, mountpoint: &Path) -> Result<LossyMount> {
        check_available()?;
        let mut child = Command::new(helper()?)
            .arg(backing)
            .arg(mountpoint)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("spawn lossyfs")?;
        let stdin = child.stdin.take();
        let Some(out) = child.stdout.take() else {
            bail!("lossyfs: no stdout");
        };
        let mut l = LossyMount {
            child,
            stdin,
            out: Arc::new(Mutex::new(BufReader::new(out))),
            mountpoint: mountpoint.to_path_buf(),
            backing: backing.to_path_buf(),
            done: false,
        };
        let line = l.answer(Duration::from_secs(20))?;
        if line != "ready" {
            l.done = true;
            let _ = l.child.kill();
            let _ = l.child.wait();
            bail!("lossyfs on {}: {line}", mountpoint.display());
        }
        Ok(l)
    }

    fn answer(&mut self, limit: Duration) -> Result<String> {
        let (tx, rx) = std::sync::mpsc::channel();
        let out = self.out.clone();
        std::thread::spawn(move || {
            let mut line = String::new();
            let r = out
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .read_line(&mut line);
            let _ = tx.send(r.map(|_| line));
        });
        match rx.recv_timeout(limit) {
            Ok(Ok(l)) if !l.is_empty() => Ok(l.trim_end().to_string()),
            Ok(Ok(_)) => bail!("lossyfs on {} exited", self.mountpoint.display()),
            Ok(Err(e)) => Err(e.into()),
            Err(_) => bail!(
                "lossyfs on {} did not answer within {limit:?}",
                self.mountpoint.display()
            ),
        }
    }

    fn command(&mut self, cmd: &str, limit: Duration) -> Result<String> {
        let Some(stdin) = self.stdin.as_mut() else {
            bail!("lossyfs already stopped");
        };
        writeln!(stdin, "{cmd}")?;
        stdin.flush()?;
        self.answer(limit)
    }

    /// The instant of the power cut: from now on every operation fails with `EIO`.
    pub fn freeze(&mut self) -> Result<()> {
        let a = self.command("freeze", Duration::from_secs(10))?;
        if a != "frozen" {
            bail!("lossyfs freeze: {a}");
        }
        Ok(())
    }

    /// Reverts the disk to its durable state (tearing last writes when `tear`, seeded by
    /// `seed`) and remounts it. Every process that used it must be dead (see
    /// [`PowerNode::cut_power`]).
    pub fn cut(&mut self, seed: u64, tear: bool) -> Result<CutReport> {
        let a = self.command(
            &format!("cut {seed} {}", u8::from(tear)),
            Duration::from_secs(30),
        )?;
        let f: Vec<u64> = a
            .strip_prefix("ready ")
            .unwrap_or("")
            .split(' ')
            .filter_map(|w| w.split_once('=').and_then(|(_, v)| v.parse().ok()))
            .collect();
        if f.len() != 4 {
            bail!("lossyfs cut on {}: {a}", self.mountpoint.display());
        }
        Ok(CutReport {
            files_reverted: f[0],
            dirs_reverted: f[1],
            torn: f[2],
            inodes_lost: f[3],
        })
    }

    /// What is not durable now.
    pub fn dirty(&mut self) -> Result<Dirty> {
        let a = self.command("dirty", Duration::from_secs(10))?;
        let f: Vec<u64> = a
            .strip_prefix("dirty ")
            .unwrap_or("")
            .split(' ')
            .filter_map(|w| w.split_once('=').and_then(|(_, v)| v.parse().ok()))
            .collect();
        if f.len() != 2 {
            bail!("lossyfs dirty: {a}");
        }
        Ok(Dirty {
            files: f[0],
            dirs: f[1],
        })
    }

    /// Unmounts cleanly (everything live is written to the backing directory, as a clean
    /// shutdown would sync it) and, for a mount made by [`LossyMount::over`], puts the
    /// directory back in place.
    pub fn unmount(mut self) -> Result<()> {
        self.stop()
    }

    fn stop(&mut self) -> Result<()> {
        if self.done {
            return Ok(());
        }
        self.done = true;
        let r = self.command("quit", Duration::from_secs(60));
        self.stdin = None;
        let ok = matches!(&r, Ok(a) if a == "bye");
        if !ok {
            let _ = self.child.kill();
            let _ = Command::new("fusermount3")
                .arg("-u")
                .arg("-z")
                .arg(&self.mountpoint)
                .status();
        }
        let _ = self.child.wait();
        if self.backing == backing_of(&self.mountpoint)
            && std::fs::remove_dir(&self.mountpoint).is_ok()
        {
            std::fs::rename(&self.backing, &self.mountpoint)?;
        }
        match r {
            Ok(a) if a == "bye" => Ok(()),
            Ok(a) => bail!("lossyfs quit on {}: {a}", self.mountpoint.display()),
            Err(e) => Err(e),
        }
    }
}

impl Drop for LossyMount {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            eprintln!("warning: {e:#}");
        }
    }
}

/// SIGKILLs every process (but this one) that has a file, its working directory or its root
/// under one of `dirs`, until none is left (at most 2 s); returns their pids.
pub fn kill_users(dirs: &[PathBuf]) -> Vec<u32> {
    let me = std::process::id();
    let mut killed = Vec::new();
    let until = Instant::now() + Duration::from_secs(2);
    loop {
        let mut found = Vec::new();
        let Ok(rd) = std::fs::read_dir("/proc") else {
            return killed;
        };
        for e in rd.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            if pid == me {
                continue;
            }
            let p = e.path();
            let mut links: Vec<PathBuf> = ["cwd", "root"]
                .iter()
                .filter_map(|l| std::fs::read_link(p.join(l)).ok())
                .filter(|l| l != Path::new("/"))
                .collect();
            if let Ok(fds) = std::fs::read_dir(p.join("fd")) {
                links.extend(
                    fds.flatten()
                        .filter_map(|f| std::fs::read_link(f.path()).ok()),
                );
            }
            if links.iter().any(|l| dirs.iter().any(|d| l.starts_with(d))) {
                found.push(pid);
            }
        }
        if found.is_empty() || Instant::now() > until {
            return killed;
        }
        for pid in found {
            if let Ok(pid) = i32::try_from(pid) {
                if let Some(p) = rustix::process::Pid::from_raw(pid) {
                    let _ = rustix::process::kill_process(p, rustix::process::Signal::KILL);
                }
            }
            killed.push(pid);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The lossy disks of one node: its table directory and its state directory.
#[derive(Debug, Default)]
pub struct PowerNode {
    /// One mount per directory.
    pub mounts: Vec<LossyMount>,
}

impl PowerNode {
    /// Mounts a lossy filesystem over each of `dirs`.
    pub fn over(dirs: &[PathBuf]) -> Result<PowerNode> {
        let mut n = PowerNode::default();
        for d in dirs {
            n.mounts.push(LossyMount::over(d)?);
        }
        Ok(n)
    }

    fn dirs(&self) -> Vec<PathBuf> {
        self.mounts.iter().map(|m| m.mountpoint.clone()).collect()
    }

    /// Cuts the node's power: freezes every mount, calls `kill` (which must SIGKILL and reap
    /// the processes the caller started for this node: its daemon, its `txmap` commands), kills
    /// whatever else still uses the mounts (`postmap`, a `txmap` the caller did not know), then
    /// reverts every mount to its durable state and remounts it. The node is then ready to be
    /// restarted.
    pub fn cut_power(&mut self, seed: u64, tear: bool, kill: impl FnOnce()) -> Result<CutReport> {
        for m in &mut self.mounts {
            m.freeze()?;
        }
        kill();
        kill_users(&self.dirs());
        let mut total = CutReport::default();
        for (k, m) in self.mounts.iter_mut().enumerate() {
            let r = m.cut(seed.wrapping_add(k as u64), tear)?;
            total.files_reverted += r.files_reverted;
            total.dirs_reverted += r.dirs_reverted;
            total.torn += r.torn;
            total.inodes_lost += r.inodes_lost;
        }
        Ok(total)
    }

    /// Kills whatever still uses the mounts, then unmounts them cleanly.
    pub fn unmount(&mut self) -> Result<()> {
        kill_users(&self.dirs());
        let mut first = Ok(());
        for m in self.mounts.drain(..) {
            let r = m.unmount();
            if first.is_ok() {
                first = r;
            }
        }
        first
    }
}

impl Drop for PowerNode {
    fn drop(&mut self) {
        if let Err(e) = self.unmount() {
            eprintln!("warning: {e:#}");
        }
    }
}

/// The helper's main loop (`lossyfs BACKING MOUNTPOINT`): loads `backing`, mounts it at
/// `mountpoint`, prints `ready`, then obeys one command per stdin line: `freeze`,
/// `cut SEED TEAR` (answers `ready files=F dirs=D torn=T lost=L` once remounted), `dirty`
/// (answers `dirty files=F dirs=D`), `quit` or end of input (unmounts, writes the live tree
/// back into `backing`, answers `bye`).
pub fn serve(backing: &Path, mountpoint: &Path) -> Result<()> {
    use fuse::{LossyFs, State};
    let disk = disk::Disk::load(backing).with_context(|| format!("load {}", backing.display()))?;
    let fs = LossyFs {
        state: Arc::new(Mutex::new(State::new(disk))),
    };
    let mountpoint = &mountpoint
        .canonicalize()
        .with_context(|| format!("{}", mountpoint.display()))?;
    let mut session = Some(mount_fs(&fs, mountpoint)?);
    let mut out = std::io::stdout().lock();
    writeln!(out, "ready")?;
    out.flush()?;
    let stdin = std::io::stdin();
    for line in stdin.lock().lines() {
        let line = line.unwrap_or_default();
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["freeze"] => {
                lock(&fs.state).frozen = true;
                writeln!(out, "frozen")?;
            }
            ["cut", seed, tear] => {
                lock(&fs.state).frozen = true;
                if let Some(s) = session.take() {
                    unmount_session(s, mountpoint);
                }
                let r = {
                    let mut st = lock(&fs.state);
                    st.drop_handles();
                    let r = st.disk.cut(seed.parse().unwrap_or(0), *tear == "1");
                    st.frozen = false;
                    r
                };
                session = Some(mount_fs(&fs, mountpoint)?);
                writeln!(
                    out,
                    "ready files={} dirs={} torn={} lost={}",
                    r.files_reverted, r.dirs_reverted, r.torn, r.inodes_lost
                )?;
            }
            ["dirty"] => {
                let d = lock(&fs.state).disk.dirty();
                writeln!(out, "dirty files={} dirs={}", d.files, d.dirs)?;
            }
            ["quit"] => break,
            _ => writeln!(out, "error: unknown command {line:?}")?,
        }
        out.flush()?;
    }
    if let Some(s) = session.take() {
        unmount_session(s, mountpoint);
    }
    let st = lock(&fs.state);
    // Write the tree back: clear the backing directory, then save into it.
    for e in std::fs::read_dir(backing)?.flatten() {
        let p = e.path();
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            std::fs::remove_dir_all(&p)?;
        } else {
            std::fs::remove_file(&p)?;
        }
    }
    st.disk.save(backing)?;
    writeln!(out, "bye")?;
    out.flush()?;
    Ok(())
}

fn lock(s: &Mutex<fuse::State>) -> std::sync::MutexGuard<'_, fuse::State> {
    s.lock().unwrap_or_else(|p| p.into_inner())
}

fn mount_fs(fs: &fuse::LossyFs, mountpoint: &Path) -> Result<fuser::BackgroundSession> {
    use fuser::{Config, MountOption, SessionACL};
    let mut cfg = Config::default();
    cfg.mount_options = vec![
        MountOption::FSName("lossyfs".into()),
        MountOption::Subtype("lossyfs".into()),
        MountOption::DefaultPermissions,
    ];
    cfg.acl = SessionACL::All;
    fuser::spawn_mount(fs.clone(), mountpoint, &cfg)
        .with_context(|| format!("mount lossyfs at {}", mountpoint.display()))
}

/// Unmounts (lazily if busy: a process the caller failed to kill keeps the old, frozen
/// mount) and waits up to 5 s for the session thread to end.
fn unmount_session(s: fuser::BackgroundSession, mountpoint: &Path) {
    let (tx, rx) = std::sync::mpsc::channel();
    let mp = mountpoint.to_path_buf();
    std::thread::spawn(move || {
        // fuser unmounts without MNT_DETACH as root, and EBUSY ends nothing: detach first.
        let _ = Command::new("fusermount3")
            .arg("-u")
            .arg("-q")
            .arg("-z")
            .arg(&mp)
            .status();
        let _ = tx.send(s.umount_and_join());
    });
    if rx.recv_timeout(Duration::from_secs(5)).is_err() {
        eprintln!("lossyfs: the old session did not end within 5 s (a process still uses it)");
    }
}
