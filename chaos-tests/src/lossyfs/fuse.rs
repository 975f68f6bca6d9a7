//! The FUSE side of the lossy filesystem: each request becomes one call on the [`Disk`] behind a
//! mutex (one FUSE worker thread: requests are applied in the order the kernel sends them).
//! A frozen disk (the instant of a power cut) answers `EIO` to everything, so that nothing a
//! dying process still does can become durable.

use super::disk::{Disk, Kind, Node, ROOT};
use fuser::{
    AccessFlags, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation,
    INodeNo, LockOwner, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory,
    ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request, TimeOrNow, WriteFlags,
};
use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

/// Attributes and entries are not cached by the kernel: after a cut nothing stale can be served
/// (the helper also remounts), and the link count Postfix checks with `fstat` is always fresh.
const TTL: Duration = Duration::ZERO;

/// One open file or directory.
#[derive(Debug)]
struct Handle {
    ino: u64,
    append: bool,
    /// A directory's entries as of `opendir` (POSIX allows a snapshot).
    listing: Vec<(OsString, u64, FileType)>,
}

/// The disk and its open handles.
#[derive(Debug)]
pub struct State {
    /// The disk model.
    pub disk: Disk,
    /// True from the instant of a power cut until the disk is reverted.
    pub frozen: bool,
    handles: HashMap<u64, Handle>,
    next_fh: u64,
}

impl State {
    /// A state over `disk`, not frozen.
    pub fn new(disk: Disk) -> State {
        State {
            disk,
            frozen: false,
            handles: HashMap::new(),
            next_fh: 1,
        }
    }

    /// Forgets every open handle (their processes are dead after a cut).
    pub fn drop_handles(&mut self) {
        self.handles.clear();
    }
}

/// The FUSE filesystem: a thin adapter over the shared [`State`].
#[derive(Debug, Clone)]
pub struct LossyFs {
    /// Shared with the helper's control loop.
    pub state: Arc<Mutex<State>>,
}

fn kind_of(n: &Node) -> FileType {
    match n.kind {
        Kind::File(_) => FileType::RegularFile,
        Kind::Dir(_) => FileType::Directory,
        Kind::Symlink(_) => FileType::Symlink,
        Kind::Special(f) if f == libc::S_IFSOCK => FileType::Socket,
        Kind::Special(_) => FileType::NamedPipe,
    }
}

fn attr(disk: &Disk, ino: u64) -> Result<FileAttr, i32> {
    let n = disk.node(ino)?;
    let size = n.size();
    Ok(FileAttr {
        ino: INodeNo(ino),
        size,
        blocks: size.div_ceil(512),
        atime: n.atime,
        mtime: n.mtime,
        ctime: n.ctime,
        crtime: n.ctime,
        kind: kind_of(n),
        perm: n.perm,
        nlink: disk.nlink(ino),
        uid: n.uid,
        gid: n.gid,
        rdev: 0,
        blksize: 4096,
        flags: 0,
    })
}

fn e(code: i32) -> Errno {
    Errno::from_i32(code)
}

fn time(t: TimeOrNow) -> SystemTime {
    match t {
        TimeOrNow::SpecificTime(t) => t,
        TimeOrNow::Now => SystemTime::now(),
    }
}

impl LossyFs {
    fn lock(&self) -> Result<MutexGuard<'_, State>, i32> {
        let g = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if g.frozen {
            return Err(libc::EIO);
        }
        Ok(g)
    }

    fn entry(&self, reply: ReplyEntry, f: impl FnOnce(&mut State) -> Result<u64, i32>) {
        let r = self.lock().and_then(|mut s| {
            let ino = f(&mut s)?;
            attr(&s.disk, ino)
        });
        match r {
            Ok(a) => reply.entry(&TTL, &a, Generation(0)),
            Err(c) => reply.error(e(c)),
        }
    }

    fn empty(&self, reply: ReplyEmpty, f: impl FnOnce(&mut State) -> Result<(), i32>) {
        match self.lock().and_then(|mut s| f(&mut s)) {
            Ok(()) => reply.ok(),
            Err(c) => reply.error(e(c)),
        }
    }

    fn open_handle(&self, s: &mut State, ino: u64, append: bool, dir: bool) -> Result<u64, i32> {
        let listing = if dir {
            let mut l = Vec::new();
            for (name, child) in s.disk.entries(ino)? {
                if let Ok(n) = s.disk.node(child) {
                    l.push((name, child, kind_of(n)));
                }
            }
            l
        } else {
            Vec::new()
        };
        s.disk.opened(ino)?;
        let fh = s.next_fh;
        s.next_fh += 1;
        s.handles.insert(
            fh,
            Handle {
                ino,
                append,
                listing,
            },
        );
        Ok(fh)
    }

    fn release_handle(&self, fh: FileHandle) {
        // Never refused, not even frozen: the kernel does not retry a release.
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(h) = s.handles.remove(&fh.0) {
            s.disk.released(h.ino);
        }
    }
}

fn perm_of(mode: u32, umask: u32) -> u16 {
    (mode & !umask & 0o7777) as u16
}

impl Filesystem for LossyFs {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        self.entry(reply, |s| s.disk.lookup(parent.0, name));
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.lock().and_then(|s| attr(&s.disk, ino.0)) {
            Ok(a) => reply.attr(&TTL, &a),
            Err(c) => reply.error(e(c)),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let r = self.lock().and_then(|mut s| {
            if let Some(sz) = size {
                s.disk.truncate(ino.0, sz)?;
            }
            s.disk.set_meta_of(
                ino.0,
                mode.map(|m| (m & 0o7777) as u16),
                uid,
                gid,
                atime.map(time),
                mtime.map(time),
            )?;
            attr(&s.disk, ino.0)
        });
        match r {
            Ok(a) => reply.attr(&TTL, &a),
            Err(c) => reply.error(e(c)),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        let r = self.lock().and_then(|s| match &s.disk.node(ino.0)?.kind {
            Kind::Symlink(t) => Ok(t.as_os_str().as_encoded_bytes().to_vec()),
            _ => Err(libc::EINVAL),
        });
        match r {
            Ok(b) => reply.data(&b),
            Err(c) => reply.error(e(c)),
        }
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        let (uid, gid) = (req.uid(), req.gid());
        let fmt = mode & libc::S_IFMT;
        if fmt == libc::S_IFSOCK || fmt == libc::S_IFIFO {
            return self.entry(reply, |s| {
                s.disk
                    .special(parent.0, name, fmt, perm_of(mode, umask), uid, gid)
            });
        }
        if fmt != libc::S_IFREG && fmt != 0 {
            // devices are not modelled
            return reply.error(e(libc::EPERM));
        }
        self.entry(reply, |s| {
            s.disk
                .create(parent.0, name, perm_of(mode, umask), uid, gid)
        });
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        let (uid, gid) = (req.uid(), req.gid());
        self.entry(reply, |s| {
            s.disk.mkdir(parent.0, name, perm_of(mode, umask), uid, gid)
        });
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.empty(reply, |s| s.disk.unlink(parent.0, name));
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.empty(reply, |s| s.disk.rmdir(parent.0, name));
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let (uid, gid) = (req.uid(), req.gid());
        self.entry(reply, |s| {
            s.disk.symlink(parent.0, link_name, target, uid, gid)
        });
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        if flags.intersects(RenameFlags::RENAME_EXCHANGE | RenameFlags::RENAME_WHITEOUT) {
            return reply.error(e(libc::EINVAL));
        }
        let noreplace = flags.contains(RenameFlags::RENAME_NOREPLACE);
        self.empty(reply, |s| {
            s.disk
                .rename(parent.0, name, newparent.0, newname, noreplace)
        });
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        self.entry(reply, |s| {
            s.disk.link(ino.0, newparent.0, newname)?;
            Ok(ino.0)
        });
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let r = self.lock().and_then(|mut s| {
            if s.disk.node(ino.0)?.is_dir() {
                return Err(libc::EISDIR);
            }
            if flags.0 & libc::O_TRUNC != 0 && flags.0 & libc::O_ACCMODE != libc::O_RDONLY {
                s.disk.truncate(ino.0, 0)?;
            }
            let append = flags.0 & libc::O_APPEND != 0;
            self.open_handle(&mut s, ino.0, append, false)
        });
        match r {
            Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::empty()),
            Err(c) => reply.error(e(c)),
        }
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let (uid, gid) = (req.uid(), req.gid());
        let r = self.lock().and_then(|mut s| {
            let ino = match s.disk.lookup(parent.0, name) {
                Ok(_) if flags & libc::O_EXCL != 0 => return Err(libc::EEXIST),
                Ok(ino) => {
                    if flags & libc::O_TRUNC != 0 {
                        s.disk.truncate(ino, 0)?;
                    }
                    ino
                }
                Err(_) => s
                    .disk
                    .create(parent.0, name, perm_of(mode, umask), uid, gid)?,
            };
            let fh = self.open_handle(&mut s, ino, flags & libc::O_APPEND != 0, false)?;
            Ok((attr(&s.disk, ino)?, fh))
        });
        match r {
            Ok((a, fh)) => {
                reply.created(&TTL, &a, Generation(0), FileHandle(fh), FopenFlags::empty())
            }
            Err(c) => reply.error(e(c)),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        match self.lock() {
            Ok(s) => match s.disk.read(ino.0, offset, size) {
                Ok(b) => reply.data(b),
                Err(c) => reply.error(e(c)),
            },
            Err(c) => reply.error(e(c)),
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let r = self.lock().and_then(|mut s| {
            let append =
                s.handles.get(&fh.0).is_some_and(|h| h.append) || flags.0 & libc::O_APPEND != 0;
            s.disk.write(ino.0, offset, data, append)
        });
        match r {
            Ok(n) => reply.written(n),
            Err(c) => reply.error(e(c)),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // close(2) does not make anything durable
        self.empty(reply, |_| Ok(()));
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.release_handle(fh);
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        self.empty(reply, |s| s.disk.fsync(ino.0));
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let r = self
            .lock()
            .and_then(|mut s| self.open_handle(&mut s, ino.0, false, true));
        match r {
            Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::empty()),
            Err(c) => reply.error(e(c)),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let mut s = match self.lock() {
            Ok(s) => s,
            Err(c) => return reply.error(e(c)),
        };
        if offset == 0 {
            // rewinddir: a fresh snapshot
            let mut l = Vec::new();
            if let Ok(entries) = s.disk.entries(ino.0) {
                for (name, child) in entries {
                    if let Ok(n) = s.disk.node(child) {
                        l.push((name, child, kind_of(n)));
                    }
                }
            }
            if let Some(h) = s.handles.get_mut(&fh.0) {
                h.listing = l;
            }
        }
        let Some(h) = s.handles.get(&fh.0) else {
            return reply.error(e(libc::EBADF));
        };
        let mut all: Vec<(OsString, u64, FileType)> = vec![
            (".".into(), ino.0, FileType::Directory),
            ("..".into(), ROOT, FileType::Directory),
        ];
        all.extend(h.listing.iter().cloned());
        for (i, (name, child, kind)) in all.into_iter().enumerate().skip(offset as usize) {
            if reply.add(INodeNo(child), i as u64 + 1, kind, &name) {
                break;
            }
        }
        reply.ok();
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        self.release_handle(fh);
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        self.empty(reply, |s| s.disk.fsync(ino.0));
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        reply.statfs(1 << 24, 1 << 23, 1 << 23, 1 << 20, 1 << 19, 4096, 255, 4096);
    }

    fn access(&self, _req: &Request, ino: INodeNo, _mask: AccessFlags, reply: ReplyEmpty) {
        // permissions are checked by the kernel (default_permissions)
        self.empty(reply, |s| s.disk.node(ino.0).map(|_| ()));
    }
}
