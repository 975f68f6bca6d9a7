//! The disk model of the lossy filesystem: every inode with its live state and what of it is
//! durable, and the power cut that throws the difference away. No FUSE here, no I/O except
//! [`Disk::load`] and [`Disk::save`]: the unit tests at the bottom drive it directly.

use crate::rng::SplitMix64;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

/// The root directory's inode number (FUSE's `FUSE_ROOT_ID`).
pub const ROOT: u64 = 1;

/// An error of a filesystem operation: an errno value.
pub type Errno = i32;

/// What an inode is.
#[derive(Debug, Clone)]
pub enum Kind {
    /// A regular file.
    File(FileData),
    /// A directory.
    Dir(DirData),
    /// A symbolic link (txmap refuses them; tests plant them).
    Symlink(PathBuf),
    /// A socket or a FIFO (`S_IFSOCK`, `S_IFIFO`): a name only, the kernel does the rest
    /// (the hook's socket lives in the state directory). Not written back to the backing
    /// directory: after a reboot nobody listens on it anyway.
    Special(u32),
}

/// A regular file's bytes: live (what readers see) and durable (as of its last fsync).
#[derive(Debug, Clone, Default)]
pub struct FileData {
    /// What a read returns now.
    pub live: Arc<Vec<u8>>,
    /// What survives a power cut: the content at the last `fsync`/`fdatasync` (empty for a file
    /// never synced). Shared with `live` until the next write (copy on write).
    pub durable: Arc<Vec<u8>>,
    /// The last write since the last fsync, `(offset, bytes)`: what a torn cut keeps a prefix
    /// of.
    pub last_write: Option<(u64, Vec<u8>)>,
}

/// A directory's entries: live and durable (as of its last fsync).
#[derive(Debug, Clone, Default)]
pub struct DirData {
    /// The names a lookup finds now.
    pub live: BTreeMap<OsString, u64>,
    /// The names that survive a power cut: the entries at the directory's last fsync (empty
    /// for a directory never synced).
    pub durable: BTreeMap<OsString, u64>,
}

/// One inode.
#[derive(Debug, Clone)]
pub struct Node {
    /// File, directory or symlink, with its data.
    pub kind: Kind,
    /// Permission bits (`0o7777`).
    pub perm: u16,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Last access.
    pub atime: SystemTime,
    /// Last modification.
    pub mtime: SystemTime,
    /// Last status change.
    pub ctime: SystemTime,
    /// Live names of a file or symlink (directories: counted from their entries).
    pub links: u32,
    /// Open handles (files and directories): an unlinked inode lives while one is open.
    pub open: u32,
}

impl Node {
    fn new(kind: Kind, perm: u16, uid: u32, gid: u32) -> Node {
        let now = SystemTime::now();
        Node {
            kind,
            perm,
            uid,
            gid,
            atime: now,
            mtime: now,
            ctime: now,
            links: 0,
            open: 0,
            // a new inode is durable only through a synced directory entry
        }
    }

    /// True for a directory.
    pub fn is_dir(&self) -> bool {
        matches!(self.kind, Kind::Dir(_))
    }

    /// Size in bytes as `stat` reports it.
    pub fn size(&self) -> u64 {
        match &self.kind {
            Kind::File(f) => f.live.len() as u64,
            Kind::Dir(d) => d.live.len() as u64,
            Kind::Symlink(t) => t.as_os_str().len() as u64,
            Kind::Special(_) => 0,
        }
    }
}

/// What a power cut threw away.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CutReport {
    /// Files whose live content differed from the durable one.
    pub files_reverted: u64,
    /// Directories whose live entries differed from the durable ones.
    pub dirs_reverted: u64,
    /// Files whose last unsynced write was kept in part (a torn write).
    pub torn: u64,
    /// Inodes that no durable name reaches any more.
    pub inodes_lost: u64,
}

/// What is not durable right now.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Dirty {
    /// Files with unsynced content.
    pub files: u64,
    /// Directories with unsynced entries.
    pub dirs: u64,
}

/// The whole disk.
#[derive(Debug, Clone)]
pub struct Disk {
    /// Every inode by number.
    pub nodes: HashMap<u64, Node>,
    next: u64,
    removals: u64,
}

fn errno_of(e: &std::io::Error) -> Errno {
    e.raw_os_error().unwrap_or(libc::EIO)
}

impl Disk {
    /// An empty disk: a root directory `0755` owned by `uid:gid`, durable.
    pub fn empty(uid: u32, gid: u32) -> Disk {
        let mut nodes = HashMap::new();
        nodes.insert(
            ROOT,
            Node::new(Kind::Dir(DirData::default()), 0o755, uid, gid),
        );
        Disk {
            nodes,
            next: ROOT + 1,
            removals: 0,
        }
    }

    /// Reads the tree under `dir` (not following symlinks; hard links are kept as one inode).
    /// Everything read is durable: a mount starts from a disk that was synced.
    pub fn load(dir: &Path) -> std::io::Result<Disk> {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::symlink_metadata(dir)?;
        let mut disk = Disk::empty(m.uid(), m.gid());
        disk.set_meta(ROOT, &m);
        let mut seen: HashMap<(u64, u64), u64> = HashMap::new();
        disk.load_dir(dir, ROOT, &mut seen)?;
        Ok(disk)
    }

    fn set_meta(&mut self, ino: u64, m: &std::fs::Metadata) {
        use std::os::unix::fs::MetadataExt;
        if let Some(n) = self.nodes.get_mut(&ino) {
            n.perm = (m.mode() & 0o7777) as u16;
            n.uid = m.uid();
            n.gid = m.gid();
            n.mtime = m.modified().unwrap_or(n.mtime);
            n.atime = m.accessed().unwrap_or(n.atime);
        }
    }

    fn load_dir(
        &mut self,
        dir: &Path,
        ino: u64,
        seen: &mut HashMap<(u64, u64), u64>,
    ) -> std::io::Result<()> {
        use std::os::unix::fs::MetadataExt;
        let mut entries = BTreeMap::new();
        for e in std::fs::read_dir(dir)? {
            let e = e?;
            let p = e.path();
            let m = std::fs::symlink_metadata(&p)?;
            let key = (m.dev(), m.ino());
            let child = if let Some(&c) = seen.get(&key) {
                c
            } else {
                let kind = if m.is_dir() {
                    Kind::Dir(DirData::default())
                } else if m.file_type().is_symlink() {
                    Kind::Symlink(std::fs::read_link(&p)?)
                } else if m.is_file() {
                    let bytes = Arc::new(std::fs::read(&p)?);
                    Kind::File(FileData {
                        live: bytes.clone(),
                        durable: bytes,
                        last_write: None,
                    })
                } else {
                    continue; // sockets, FIFOs, devices: not kept
                };
                let c = self.alloc(Node::new(kind, 0, 0, 0));
                self.set_meta(c, &m);
                seen.insert(key, c);
                if m.is_dir() {
                    self.load_dir(&p, c, seen)?;
                }
                c
            };
            if let Some(n) = self.nodes.get_mut(&child) {
                n.links += 1;
            }
            entries.insert(e.file_name(), child);
        }
        if let Some(Kind::Dir(d)) = self.nodes.get_mut(&ino).map(|n| &mut n.kind) {
            d.durable = entries.clone();
            d.live = entries;
        }
        Ok(())
    }

    /// Writes the live tree into `dir` (which must exist and be empty), with modes, owners,
    /// modification times and hard links.
    pub fn save(&self, dir: &Path) -> std::io::Result<()> {
        let mut written: HashMap<u64, PathBuf> = HashMap::new();
        self.save_dir(ROOT, dir, &mut written)?;
        self.apply_meta(ROOT, dir)
    }

    fn apply_meta(&self, ino: u64, p: &Path) -> std::io::Result<()> {
        use std::os::unix::fs::PermissionsExt;
        let Some(n) = self.nodes.get(&ino) else {
            return Ok(());
        };
        if let Kind::Symlink(_) = n.kind {
            return std::os::unix::fs::lchown(p, Some(n.uid), Some(n.gid));
        }
        std::os::unix::fs::chown(p, Some(n.uid), Some(n.gid))?;
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(u32::from(n.perm)))?;
        if let Ok(f) = std::fs::File::open(p) {
            let _ = f.set_modified(n.mtime);
        }
        Ok(())
    }

    fn save_dir(
        &self,
        ino: u64,
        dir: &Path,
        written: &mut HashMap<u64, PathBuf>,
    ) -> std::io::Result<()> {
        let Some(Kind::Dir(d)) = self.nodes.get(&ino).map(|n| &n.kind) else {
            return Ok(());
        };
        for (name, &child) in &d.live {
            let p = dir.join(name);
            if let Some(first) = written.get(&child) {
                std::fs::hard_link(first, &p)?;
                continue;
            }
            let Some(n) = self.nodes.get(&child) else {
                continue;
            };
            match &n.kind {
                Kind::Special(_) => continue,
                Kind::File(f) => std::fs::write(&p, f.live.as_slice())?,
                Kind::Symlink(t) => std::os::unix::fs::symlink(t, &p)?,
                Kind::Dir(_) => {
                    std::fs::create_dir(&p)?;
                    self.save_dir(child, &p, written)?;
                }
            }
            self.apply_meta(child, &p)?;
            if !n.is_dir() {
                written.insert(child, p);
            }
        }
        Ok(())
    }

    fn alloc(&mut self, n: Node) -> u64 {
        let ino = self.next;
        self.next += 1;
        self.nodes.insert(ino, n);
        ino
    }

    /// The inode, or `ENOENT`.
    pub fn node(&self, ino: u64) -> Result<&Node, Errno> {
        self.nodes.get(&ino).ok_or(libc::ENOENT)
    }

    fn node_mut(&mut self, ino: u64) -> Result<&mut Node, Errno> {
        self.nodes.get_mut(&ino).ok_or(libc::ENOENT)
    }

    fn dir(&self, ino: u64) -> Result<&DirData, Errno> {
        match &self.node(ino)?.kind {
            Kind::Dir(d) => Ok(d),
            _ => Err(libc::ENOTDIR),
        }
    }

    fn dir_mut(&mut self, ino: u64) -> Result<&mut DirData, Errno> {
        match &mut self.node_mut(ino)?.kind {
            Kind::Dir(d) => Ok(d),
            _ => Err(libc::ENOTDIR),
        }
    }

    fn file_mut(&mut self, ino: u64) -> Result<&mut FileData, Errno> {
        match &mut self.node_mut(ino)?.kind {
            Kind::File(f) => Ok(f),
            Kind::Dir(_) => Err(libc::EISDIR),
            Kind::Symlink(_) | Kind::Special(_) => Err(libc::EINVAL),
        }
    }

    /// Number of links as `stat` reports it (a directory: 2 + its subdirectories).
    pub fn nlink(&self, ino: u64) -> u32 {
        match self.nodes.get(&ino) {
            Some(Node {
                kind: Kind::Dir(d), ..
            }) => {
                2 + d
                    .live
                    .values()
                    .filter(|c| self.nodes.get(c).is_some_and(Node::is_dir))
                    .count() as u32
            }
            Some(n) => n.links,
            None => 0,
        }
    }

    /// The inode `name` names in directory `parent`.
    pub fn lookup(&self, parent: u64, name: &OsStr) -> Result<u64, Errno> {
        self.dir(parent)?
            .live
            .get(name)
            .copied()
            .ok_or(libc::ENOENT)
    }

    /// `(name, inode)` of every live entry of directory `ino`, in name order.
    pub fn entries(&self, ino: u64) -> Result<Vec<(OsString, u64)>, Errno> {
        Ok(self
            .dir(ino)?
            .live
            .iter()
            .map(|(k, v)| (k.clone(), *v))
            .collect())
    }

    fn add_entry(
        &mut self,
        parent: u64,
        name: &OsStr,
        kind: Kind,
        perm: u16,
        uid: u32,
        gid: u32,
    ) -> Result<u64, Errno> {
        if name.len() > 255 {
            return Err(libc::ENAMETOOLONG);
        }
        let p = self.node(parent)?;
        let (pgid, setgid) = (p.gid, p.perm & 0o2000 != 0);
        if self.dir(parent)?.live.contains_key(name) {
            return Err(libc::EEXIST);
        }
        let is_dir = matches!(kind, Kind::Dir(_));
        let (gid, perm) = if setgid {
            (pgid, if is_dir { perm | 0o2000 } else { perm })
        } else {
            (gid, perm)
        };
        let mut n = Node::new(kind, perm, uid, gid);
        n.links = 1;
        let ino = self.alloc(n);
        self.dir_mut(parent)?.live.insert(name.to_owned(), ino);
        self.touch(parent);
        Ok(ino)
    }

    fn touch(&mut self, ino: u64) {
        if let Some(n) = self.nodes.get_mut(&ino) {
            let now = SystemTime::now();
            n.mtime = now;
            n.ctime = now;
        }
    }

    /// Creates an empty regular file.
    pub fn create(
        &mut self,
        parent: u64,
        name: &OsStr,
        perm: u16,
        uid: u32,
        gid: u32,
    ) -> Result<u64, Errno> {
        self.add_entry(
            parent,
            name,
            Kind::File(FileData::default()),
            perm,
            uid,
            gid,
        )
    }

    /// Creates an empty directory.
    pub fn mkdir(
        &mut self,
        parent: u64,
        name: &OsStr,
        perm: u16,
        uid: u32,
        gid: u32,
    ) -> Result<u64, Errno> {
        self.add_entry(parent, name, Kind::Dir(DirData::default()), perm, uid, gid)
    }

    /// Creates a symbolic link.
    pub fn symlink(
        &mut self,
        parent: u64,
        name: &OsStr,
        target: &Path,
        uid: u32,
        gid: u32,
    ) -> Result<u64, Errno> {
        self.add_entry(
            parent,
            name,
            Kind::Symlink(target.to_owned()),
            0o777,
            uid,
            gid,
        )
    }

    /// Creates a socket or FIFO node (`fmt`: `S_IFSOCK` or `S_IFIFO`).
    pub fn special(
        &mut self,
        parent: u64,
        name: &OsStr,
        fmt: u32,
        perm: u16,
        uid: u32,
        gid: u32,
    ) -> Result<u64, Errno> {
        self.add_entry(parent, name, Kind::Special(fmt), perm, uid, gid)
    }

    /// A second name for a file (`link(2)`): `EEXIST` when the name exists.
    pub fn link(&mut self, ino: u64, parent: u64, name: &OsStr) -> Result<(), Errno> {
        if self.node(ino)?.is_dir() {
            return Err(libc::EPERM);
        }
        if self.dir(parent)?.live.contains_key(name) {
            return Err(libc::EEXIST);
        }
        self.dir_mut(parent)?.live.insert(name.to_owned(), ino);
        let n = self.node_mut(ino)?;
        n.links += 1;
        n.ctime = SystemTime::now();
        self.touch(parent);
        Ok(())
    }

    fn drop_link(&mut self, ino: u64) {
        if let Some(n) = self.nodes.get_mut(&ino) {
            n.links = n.links.saturating_sub(1);
            n.ctime = SystemTime::now();
        }
        self.removals += 1;
        if self.removals >= 2000 {
            self.collect();
        }
    }

    /// Removes a non-directory name.
    pub fn unlink(&mut self, parent: u64, name: &OsStr) -> Result<(), Errno> {
        let ino = self.lookup(parent, name)?;
        if self.node(ino)?.is_dir() {
            return Err(libc::EISDIR);
        }
        self.dir_mut(parent)?.live.remove(name);
        self.touch(parent);
        self.drop_link(ino);
        Ok(())
    }

    /// Removes an empty directory.
    pub fn rmdir(&mut self, parent: u64, name: &OsStr) -> Result<(), Errno> {
        let ino = self.lookup(parent, name)?;
        if !self.dir(ino)?.live.is_empty() {
            return Err(libc::ENOTEMPTY);
        }
        self.dir_mut(parent)?.live.remove(name);
        self.touch(parent);
        self.drop_link(ino);
        Ok(())
    }

    /// `rename(2)`; `noreplace`: `RENAME_NOREPLACE`. (The kernel already refused moving a
    /// directory into itself.)
    pub fn rename(
        &mut self,
        parent: u64,
        name: &OsStr,
        newparent: u64,
        newname: &OsStr,
        noreplace: bool,
    ) -> Result<(), Errno> {
        let ino = self.lookup(parent, name)?;
        self.dir(newparent)?;
        if newname.len() > 255 {
            return Err(libc::ENAMETOOLONG);
        }
        let src_dir = self.node(ino)?.is_dir();
        if let Ok(old) = self.lookup(newparent, newname) {
            if noreplace {
                return Err(libc::EEXIST);
            }
            if old == ino {
                return Ok(());
            }
            match (src_dir, self.node(old)?.is_dir()) {
                (true, false) => return Err(libc::ENOTDIR),
                (false, true) => return Err(libc::EISDIR),
                (true, true) if !self.dir(old)?.live.is_empty() => return Err(libc::ENOTEMPTY),
                _ => {}
            }
            self.dir_mut(newparent)?.live.remove(newname);
            self.drop_link(old);
        }
        self.dir_mut(parent)?.live.remove(name);
        self.dir_mut(newparent)?
            .live
            .insert(newname.to_owned(), ino);
        self.touch(parent);
        self.touch(newparent);
        if let Some(n) = self.nodes.get_mut(&ino) {
            n.ctime = SystemTime::now();
        }
        Ok(())
    }

    /// Reads up to `size` bytes at `offset`.
    pub fn read(&self, ino: u64, offset: u64, size: u32) -> Result<&[u8], Errno> {
        match &self.node(ino)?.kind {
            Kind::File(f) => {
                let len = f.live.len();
                let start = usize::try_from(offset).unwrap_or(usize::MAX).min(len);
                let end = start.saturating_add(size as usize).min(len);
                Ok(&f.live[start..end])
            }
            Kind::Dir(_) => Err(libc::EISDIR),
            Kind::Symlink(_) | Kind::Special(_) => Err(libc::EINVAL),
        }
    }

    /// Writes `data` at `offset` (or at the end: `append`); returns the bytes written.
    pub fn write(
        &mut self,
        ino: u64,
        offset: u64,
        data: &[u8],
        append: bool,
    ) -> Result<u32, Errno> {
        const LIMIT: u64 = 1 << 32;
        let f = self.file_mut(ino)?;
        let offset = if append { f.live.len() as u64 } else { offset };
        let end = offset.checked_add(data.len() as u64).ok_or(libc::EFBIG)?;
        if end > LIMIT {
            return Err(libc::EFBIG);
        }
        let live = Arc::make_mut(&mut f.live);
        let (start, end) = (offset as usize, end as usize);
        if live.len() < end {
            live.resize(end, 0);
        }
        live[start..end].copy_from_slice(data);
        f.last_write = Some((offset, data.to_vec()));
        self.touch(ino);
        Ok(data.len() as u32)
    }

    /// Sets the size (`truncate`, `ftruncate`, `O_TRUNC`).
    pub fn truncate(&mut self, ino: u64, size: u64) -> Result<(), Errno> {
        if size > 1 << 32 {
            return Err(libc::EFBIG);
        }
        let f = self.file_mut(ino)?;
        if f.live.len() as u64 != size {
            Arc::make_mut(&mut f.live).resize(size as usize, 0);
            // the size change is not a write: a torn cut has nothing of it to keep
            f.last_write = None;
        }
        self.touch(ino);
        Ok(())
    }

    /// Mode, owner, times (`chmod`, `chown`, `utimensat`); metadata is not versioned.
    pub fn set_meta_of(
        &mut self,
        ino: u64,
        perm: Option<u16>,
        uid: Option<u32>,
        gid: Option<u32>,
        atime: Option<SystemTime>,
        mtime: Option<SystemTime>,
    ) -> Result<(), Errno> {
        let n = self.node_mut(ino)?;
        if let Some(p) = perm {
            n.perm = p & 0o7777;
        }
        if let Some(u) = uid {
            n.uid = u;
        }
        if let Some(g) = gid {
            n.gid = g;
        }
        if let Some(t) = atime {
            n.atime = t;
        }
        if let Some(t) = mtime {
            n.mtime = t;
        }
        n.ctime = SystemTime::now();
        Ok(())
    }

    /// `fsync`/`fdatasync` of a file, or `fsync` of a directory: its live state becomes
    /// durable. (A symlink has nothing to sync.)
    pub fn fsync(&mut self, ino: u64) -> Result<(), Errno> {
        match &mut self.node_mut(ino)?.kind {
            Kind::File(f) => {
                f.durable = f.live.clone();
                f.last_write = None;
            }
            Kind::Dir(d) => d.durable = d.live.clone(),
            Kind::Symlink(_) | Kind::Special(_) => {}
        }
        Ok(())
    }

    /// Counts an open handle of `ino`.
    pub fn opened(&mut self, ino: u64) -> Result<(), Errno> {
        self.node_mut(ino)?.open += 1;
        Ok(())
    }

    /// Drops an open handle of `ino`.
    pub fn released(&mut self, ino: u64) {
        if let Some(n) = self.nodes.get_mut(&ino) {
            n.open = n.open.saturating_sub(1);
        }
    }

    /// What is not durable now.
    pub fn dirty(&self) -> Dirty {
        let mut d = Dirty::default();
        for n in self.nodes.values() {
            match &n.kind {
                Kind::File(f) if !Arc::ptr_eq(&f.live, &f.durable) && f.live != f.durable => {
                    d.files += 1
                }
                Kind::Dir(x) if x.live != x.durable => d.dirs += 1,
                _ => {}
            }
        }
        d
    }

    /// Every inode reachable from the root by live or durable entries, or held open.
    fn reachable(&self) -> HashSet<u64> {
        let mut seen = HashSet::new();
        let mut stack = vec![ROOT];
        stack.extend(
            self.nodes
                .iter()
                .filter(|(_, n)| n.open > 0)
                .map(|(i, _)| *i),
        );
        while let Some(i) = stack.pop() {
            if !seen.insert(i) {
                continue;
            }
            if let Some(Node {
                kind: Kind::Dir(d), ..
            }) = self.nodes.get(&i)
            {
                stack.extend(d.live.values().chain(d.durable.values()).copied());
            }
        }
        seen
    }

    /// Forgets inodes nothing can reach any more (not live, not durable, not open).
    pub fn collect(&mut self) {
        self.removals = 0;
        let keep = self.reachable();
        self.nodes.retain(|i, _| keep.contains(i));
    }

    /// The power cut: every file goes back to its durable content (keeping, when `tear` and
    /// the seeded draw say so, a random prefix of its last unsynced write on top), every
    /// directory to its durable entries, and whatever no durable entry reaches is gone.
    /// Open handles die with the processes that held them.
    pub fn cut(&mut self, seed: u64, tear: bool) -> CutReport {
        let mut r = CutReport::default();
        let mut rng = SplitMix64::new(seed);
        let mut inos: Vec<u64> = self.nodes.keys().copied().collect();
        inos.sort_unstable(); // a seed means the same tears
        for ino in &inos {
            let Some(n) = self.nodes.get_mut(ino) else {
                continue;
            };
            n.open = 0;
            match &mut n.kind {
                Kind::File(f) => {
                    let differs = f.live != f.durable;
                    let mut durable = f.durable.clone();
                    if let Some((off, bytes)) = f.last_write.take() {
                        if tear && differs && !bytes.is_empty() && rng.chance(50.0) {
                            let keep = rng.below(bytes.len() as u64) as usize;
                            let d = Arc::make_mut(&mut durable);
                            let (s, e) = (off as usize, off as usize + keep);
                            if d.len() < e {
                                d.resize(e, 0);
                            }
                            d[s..e].copy_from_slice(&bytes[..keep]);
                            r.torn += 1;
                        }
                    }
                    if differs {
                        r.files_reverted += 1;
                    }
                    f.durable = durable.clone();
                    f.live = durable;
                }
                Kind::Dir(d) => {
                    if d.live != d.durable {
                        r.dirs_reverted += 1;
                    }
                    d.live = d.durable.clone();
                }
                Kind::Symlink(_) | Kind::Special(_) => {}
            }
        }
        // Rebuild the namespace from the root: link counts from the durable entries; a
        // directory reached twice (moved between two parents and only one synced) keeps its
        // first name in name order.
        for n in self.nodes.values_mut() {
            n.links = 0;
        }
        let mut placed = HashSet::new();
        let mut stack = vec![ROOT];
        placed.insert(ROOT);
        while let Some(dir) = stack.pop() {
            let entries = match self.nodes.get(&dir).map(|n| &n.kind) {
                Some(Kind::Dir(d)) => d.live.clone(),
                _ => continue,
            };
            let mut kept = BTreeMap::new();
            for (name, child) in entries {
                let Some(c) = self.nodes.get_mut(&child) else {
                    continue; // cannot happen: a durable entry keeps its inode alive
                };
                if c.is_dir() {
                    if !placed.insert(child) {
                        continue;
                    }
                    stack.push(child);
                }
                c.links += 1;
                kept.insert(name, child);
            }
            if let Some(Kind::Dir(d)) = self.nodes.get_mut(&dir).map(|n| &mut n.kind) {
                d.durable = kept.clone();
                d.live = kept;
            }
        }
        let before = self.nodes.len();
        let links: HashSet<u64> = self
            .nodes
            .iter()
            .filter(|(i, n)| **i == ROOT || n.links > 0)
            .map(|(i, _)| *i)
            .collect();
        self.nodes.retain(|i, _| links.contains(i));
        r.inodes_lost = (before - self.nodes.len()) as u64;
        self.removals = 0;
        r
    }

    /// Resolves a `/`-separated path relative to the root (for tests).
    pub fn resolve(&self, path: &str) -> Result<u64, Errno> {
        let mut ino = ROOT;
        for part in path.split('/').filter(|p| !p.is_empty()) {
            ino = self.lookup(ino, OsStr::new(part))?;
        }
        Ok(ino)
    }
}

/// `errno` of an I/O error, for the adapters.
pub fn errno(e: &std::io::Error) -> Errno {
    errno_of(e)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn o(s: &str) -> &OsStr {
        OsStr::new(s)
    }

    fn content(d: &Disk, path: &str) -> Option<Vec<u8>> {
        let ino = d.resolve(path).ok()?;
        match &d.node(ino).ok()?.kind {
            Kind::File(f) => Some(f.live.to_vec()),
            _ => None,
        }
    }

    #[test]
    fn an_unsynced_write_is_lost_and_a_synced_one_kept() {
        let mut d = Disk::empty(0, 0);
        let f = d.create(ROOT, o("f"), 0o644, 0, 0).unwrap();
        d.fsync(ROOT).unwrap();
        d.write(f, 0, b"synced", false).unwrap();
        d.fsync(f).unwrap();
        d.write(f, 6, b" not", false).unwrap();
        let r = d.cut(1, false);
        assert_eq!(content(&d, "f").unwrap(), b"synced");
        assert_eq!(r.files_reverted, 1);
    }

    #[test]
    fn a_rename_without_a_directory_fsync_is_undone() {
        let mut d = Disk::empty(0, 0);
        let a = d.create(ROOT, o("live"), 0o644, 0, 0).unwrap();
        d.write(a, 0, b"old", false).unwrap();
        d.fsync(a).unwrap();
        d.fsync(ROOT).unwrap();
        let b = d.create(ROOT, o("tmp"), 0o644, 0, 0).unwrap();
        d.write(b, 0, b"new", false).unwrap();
        d.fsync(b).unwrap();
        d.rename(ROOT, o("tmp"), ROOT, o("live"), false).unwrap();
        assert_eq!(content(&d, "live").unwrap(), b"new");
        let mut kept = d.clone();
        d.cut(2, false);
        assert_eq!(content(&d, "live").unwrap(), b"old");
        assert!(
            d.resolve("tmp").is_err(),
            "tmp was never durable in the directory"
        );
        // the same with the directory synced
        kept.fsync(ROOT).unwrap();
        kept.cut(2, false);
        assert_eq!(content(&kept, "live").unwrap(), b"new");
    }

    #[test]
    fn a_new_directory_vanishes_with_its_synced_contents_unless_its_parent_is_synced() {
        let mut d = Disk::empty(0, 0);
        let s = d.mkdir(ROOT, o("state"), 0o700, 0, 0).unwrap();
        let f = d.create(s, o("j"), 0o600, 0, 0).unwrap();
        d.write(f, 0, b"x", false).unwrap();
        d.fsync(f).unwrap();
        d.fsync(s).unwrap();
        let r = d.cut(3, false);
        assert!(d.resolve("state").is_err());
        assert!(r.inodes_lost >= 2);
    }

    #[test]
    fn a_link_is_durable_once_its_directory_is_synced_and_unlink_is_undone_otherwise() {
        let mut d = Disk::empty(0, 0);
        let t = d.create(ROOT, o("t"), 0o600, 0, 0).unwrap();
        d.write(t, 0, b"decision", false).unwrap();
        d.fsync(t).unwrap();
        d.link(t, ROOT, o("d")).unwrap();
        assert_eq!(d.link(t, ROOT, o("d")), Err(libc::EEXIST));
        d.fsync(ROOT).unwrap();
        d.unlink(ROOT, o("t")).unwrap();
        d.unlink(ROOT, o("d")).unwrap();
        d.cut(4, false);
        assert_eq!(content(&d, "d").unwrap(), b"decision");
        assert_eq!(content(&d, "t").unwrap(), b"decision");
        assert_eq!(d.nlink(d.resolve("d").unwrap()), 2);
    }

    #[test]
    fn truncation_without_fsync_is_undone_and_a_torn_write_keeps_a_prefix() {
        let mut d = Disk::empty(0, 0);
        let f = d.create(ROOT, o("f"), 0o644, 0, 0).unwrap();
        d.write(f, 0, b"0123456789", false).unwrap();
        d.fsync(f).unwrap();
        d.fsync(ROOT).unwrap();
        d.truncate(f, 0).unwrap();
        d.cut(5, true);
        assert_eq!(content(&d, "f").unwrap(), b"0123456789");
        let mut torn = 0;
        for seed in 0..64 {
            let mut d2 = Disk::empty(0, 0);
            let f = d2.create(ROOT, o("f"), 0o644, 0, 0).unwrap();
            d2.fsync(ROOT).unwrap();
            d2.write(f, 0, b"abcdefgh", false).unwrap();
            let r = d2.cut(seed, true);
            let c = content(&d2, "f").unwrap();
            assert!(b"abcdefgh".starts_with(&c), "{c:?}");
            assert!(c.len() < 8);
            torn += r.torn;
        }
        assert!(torn > 10 && torn < 54, "about half the cuts tear: {torn}");
    }

    #[test]
    fn unreachable_inodes_are_collected_but_durable_and_open_ones_kept() {
        let mut d = Disk::empty(0, 0);
        let a = d.create(ROOT, o("a"), 0o644, 0, 0).unwrap();
        d.fsync(ROOT).unwrap();
        let b = d.create(ROOT, o("b"), 0o644, 0, 0).unwrap();
        let c = d.create(ROOT, o("c"), 0o644, 0, 0).unwrap();
        d.opened(c).unwrap();
        for n in ["a", "b", "c"] {
            d.unlink(ROOT, o(n)).unwrap();
        }
        d.collect();
        assert!(d.nodes.contains_key(&a), "durable name");
        assert!(!d.nodes.contains_key(&b));
        assert!(d.nodes.contains_key(&c), "open");
        d.released(c);
        d.collect();
        assert!(!d.nodes.contains_key(&c));
    }

    #[test]
    fn save_and_load_keep_the_tree_and_its_hard_links() {
        let dir = std::env::temp_dir().join(format!("lossyfs-unit-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mut d = Disk::empty(0, 0);
        let s = d.mkdir(ROOT, o("s"), 0o700, 0, 0).unwrap();
        let f = d.create(s, o("f"), 0o600, 0, 0).unwrap();
        d.write(f, 0, b"hello", false).unwrap();
        d.link(f, ROOT, o("g")).unwrap();
        d.symlink(ROOT, o("l"), Path::new("s/f"), 0, 0).unwrap();
        d.save(&dir).unwrap();
        let e = Disk::load(&dir).unwrap();
        assert_eq!(content(&e, "s/f").unwrap(), b"hello");
        assert_eq!(e.resolve("s/f"), e.resolve("g"));
        assert_eq!(e.nlink(e.resolve("g").unwrap()), 2);
        assert!(matches!(
            e.node(e.resolve("l").unwrap()).unwrap().kind,
            Kind::Symlink(_)
        ));
        assert_eq!(e.node(e.resolve("s").unwrap()).unwrap().perm, 0o700);
        assert_eq!(e.dirty(), Dirty::default());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
