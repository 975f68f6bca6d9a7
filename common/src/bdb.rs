//! A reader of the Berkeley DB *hash* files that `postmap` and `postalias` build for `hash:`
//! tables (Debian's default `default_database_type`), used to check a staged table without
//! starting one more Postfix process per check.
//!
//! It reads what a lookup by Postfix reads: the meta page (page size, bucket masks, the
//! `spares` table that maps a bucket to its first page), each bucket's chain of pages, and
//! overflow chains for big items. The hash function is Berkeley DB's default (`__ham_func5`,
//! FNV-1 from 0), checked against the `h_charkey` the file records, so a file made with
//! another function is refused rather than misread. Postfix stores keys and values with a
//! trailing NUL (`DICT_FLAG_TRY1NULL`); [`HashDb::postfix_get`] tries that form first, then
//! the bare key, as Postfix does.
//!
//! Anything this reader does not know (another byte order, checksums, encryption, duplicate
//! items, an unknown page type) is [`BdbError::Unsupported`]; anything inconsistent is
//! [`BdbError::Corrupt`]. Callers then use Postfix's own tools, which stay the reference:
//! this reader may only *confirm* what they would say. The file is untrusted input: every
//! offset is checked, every walk is bounded by the file's page count, nothing panics.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// Why a file could not be read as a Berkeley DB hash table.
#[derive(Debug, thiserror::Error)]
pub enum BdbError {
    /// A format or option this reader does not handle (Postfix's tools can still read it).
    #[error("not a hash file this reader handles: {0}")]
    Unsupported(String),
    /// The file contradicts itself.
    #[error("inconsistent hash file: {0}")]
    Corrupt(String),
    /// Reading failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

const HASH_MAGIC: u32 = 0x0006_1561;
const P_HASH_UNSORTED: u8 = 2;
const P_OVERFLOW: u8 = 7;
const P_HASHMETA: u8 = 8;
const P_HASH: u8 = 13;
const H_KEYDATA: u8 = 1;
const H_OFFPAGE: u8 = 3;
/// Size of a page header (no checksum, no encryption).
const PAGE_HEADER: usize = 26;
/// The largest key or value this reader reassembles (no Postfix table line comes near it).
const MAX_ITEM: usize = 16 << 20;
/// `CHARKEY` with its NUL, whose hash the meta page records.
const CHARKEY: &[u8] = b"%$sniglet^&\0";

/// Berkeley DB's default hash function (`__ham_func5`).
pub fn hash(key: &[u8]) -> u32 {
    key.iter()
        .fold(0u32, |h, b| h.wrapping_mul(16_777_619) ^ u32::from(*b))
}

/// Smallest `i` with `2^i >= n` (`__db_log2`).
fn log2(n: u32) -> u32 {
    let mut i = 0;
    let mut limit = 1u64;
    while limit < u64::from(n) {
        limit <<= 1;
        i += 1;
    }
    i
}

fn u16_at(b: &[u8], off: usize) -> Result<u16, BdbError> {
    b.get(off..off + 2)
        .map(|s| u16::from_le_bytes([s[0], s[1]]))
        .ok_or_else(|| BdbError::Corrupt(format!("offset {off} beyond the page")))
}

fn u32_at(b: &[u8], off: usize) -> Result<u32, BdbError> {
    b.get(off..off + 4)
        .map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
        .ok_or_else(|| BdbError::Corrupt(format!("offset {off} beyond the page")))
}

/// One item of a hash page: inline bytes, or a big item on an overflow chain.
enum Item {
    Inline(std::ops::Range<usize>),
    Off { pgno: u32, len: u32 },
}

/// What a chain walk calls for each (key, data) pair; `Ok(false)` stops the walk.
type Visit<'a> = dyn FnMut(&[u8], &[u8]) -> Result<bool, BdbError> + 'a;

/// An open hash file.
#[derive(Debug)]
pub struct HashDb {
    file: File,
    page_size: usize,
    last_pgno: u32,
    max_bucket: u32,
    high_mask: u32,
    low_mask: u32,
    spares: [u32; 32],
}

/// Pages a walk may still read: one pass over the file at most.
struct Budget(u64);

impl Budget {
    fn spend(&mut self) -> Result<(), BdbError> {
        if self.0 == 0 {
            return Err(BdbError::Corrupt(
                "a walk reads more pages than the file holds (a cycle?)".into(),
            ));
        }
        self.0 -= 1;
        Ok(())
    }
}

impl HashDb {
    /// Opens `path` (never through a symbolic link; a regular file only) and reads its meta
    /// page.
    pub fn open(path: &Path) -> Result<HashDb, BdbError> {
        use std::os::unix::fs::OpenOptionsExt;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(path)?;
        let meta = file.metadata()?;
        if !meta.file_type().is_file() {
            return Err(BdbError::Unsupported(format!(
                "{} is not a regular file",
                path.display()
            )));
        }
        let mut m = [0u8; 512];
        file.read_exact_at(&mut m, 0)
            .map_err(|e| BdbError::Corrupt(format!("no meta page: {e}")))?;
        let magic = u32_at(&m, 12)?;
        if magic != HASH_MAGIC {
            return Err(BdbError::Unsupported(if magic.swap_bytes() == HASH_MAGIC {
                "the other byte order".to_string()
            } else {
                format!("magic {magic:#x}")
            }));
        }
        let version = u32_at(&m, 16)?;
        if !(8..=10).contains(&version) {
            return Err(BdbError::Unsupported(format!("hash version {version}")));
        }
        let page_size = u32_at(&m, 20)? as usize;
        if !(512..=65536).contains(&page_size) || !page_size.is_power_of_two() {
            return Err(BdbError::Corrupt(format!("page size {page_size}")));
        }
        let (encrypt, kind, metaflags) = (m[24], m[25], m[26]);
        if encrypt != 0 || metaflags & 0x1 != 0 {
            return Err(BdbError::Unsupported("checksums or encryption".into()));
        }
        if kind != P_HASHMETA {
            return Err(BdbError::Corrupt(format!("meta page of type {kind}")));
        }
        let last_pgno = u32_at(&m, 32)?;
        let pages = u64::from(last_pgno) + 1;
        if pages * page_size as u64 > meta.len() {
            return Err(BdbError::Corrupt(format!(
                "{pages} pages of {page_size} bytes, a file of {} bytes",
                meta.len()
            )));
        }
        let max_bucket = u32_at(&m, 72)?;
        let high_mask = u32_at(&m, 76)?;
        let low_mask = u32_at(&m, 80)?;
        if u32_at(&m, 92)? != hash(CHARKEY) {
            return Err(BdbError::Unsupported(
                "a hash function other than the default".into(),
            ));
        }
        if max_bucket > last_pgno {
            return Err(BdbError::Corrupt(format!(
                "{max_bucket} buckets in {pages} pages"
            )));
        }
        let mut spares = [0u32; 32];
        for (i, s) in spares.iter_mut().enumerate() {
            *s = u32_at(&m, 96 + 4 * i)?;
        }
        Ok(HashDb {
            file,
            page_size,
            last_pgno,
            max_bucket,
            high_mask,
            low_mask,
            spares,
        })
    }

    fn budget(&self) -> Budget {
        Budget(u64::from(self.last_pgno) + 1)
    }

    fn page(&self, pgno: u32, budget: &mut Budget) -> Result<Vec<u8>, BdbError> {
        if pgno == 0 || pgno > self.last_pgno {
            return Err(BdbError::Corrupt(format!(
                "page {pgno} outside 1..={}",
                self.last_pgno
            )));
        }
        budget.spend()?;
        let mut p = vec![0u8; self.page_size];
        self.file
            .read_exact_at(&mut p, u64::from(pgno) * self.page_size as u64)?;
        if u32_at(&p, 8)? != pgno {
            return Err(BdbError::Corrupt(format!("page {pgno} says it is another")));
        }
        Ok(p)
    }

    /// The first page of `bucket`.
    fn bucket_page(&self, bucket: u32) -> Result<u32, BdbError> {
        let spare = self.spares[log2(bucket.saturating_add(1)) as usize % 32];
        bucket
            .checked_add(spare)
            .ok_or_else(|| BdbError::Corrupt(format!("bucket {bucket} beyond the file")))
    }

    /// The bucket of a key (`__ham_call_hash`).
    fn bucket_of(&self, key: &[u8]) -> u32 {
        let b = hash(key) & self.high_mask;
        if b > self.max_bucket {
            b & self.low_mask
        } else {
            b
        }
    }

    /// The items of a hash page, in pairs (key, data).
    fn items(&self, p: &[u8], pgno: u32) -> Result<Vec<Item>, BdbError> {
        let kind = p[25];
        if kind != P_HASH && kind != P_HASH_UNSORTED {
            return Err(BdbError::Corrupt(format!(
                "page {pgno} of type {kind} in a bucket chain"
            )));
        }
        let n = usize::from(u16_at(p, 20)?);
        if n % 2 != 0 || PAGE_HEADER + 2 * n > self.page_size {
            return Err(BdbError::Corrupt(format!("page {pgno}: {n} items")));
        }
        let mut out = Vec::with_capacity(n);
        let mut end = self.page_size;
        for i in 0..n {
            let start = usize::from(u16_at(p, PAGE_HEADER + 2 * i)?);
            if start < PAGE_HEADER + 2 * n || start >= end {
                return Err(BdbError::Corrupt(format!(
                    "page {pgno}: item {i} at {start}, before the next one at {end}"
                )));
            }
            match p[start] {
                H_KEYDATA => out.push(Item::Inline(start + 1..end)),
                H_OFFPAGE => {
                    if end - start < 12 {
                        return Err(BdbError::Corrupt(format!(
                            "page {pgno}: item {i} too short"
                        )));
                    }
                    out.push(Item::Off {
                        pgno: u32_at(p, start + 4)?,
                        len: u32_at(p, start + 8)?,
                    })
                }
                other => {
                    return Err(BdbError::Unsupported(format!(
                        "page {pgno}: item of type {other} (duplicates?)"
                    )))
                }
            }
            end = start;
        }
        Ok(out)
    }

    /// The bytes of an item (following an overflow chain).
    fn bytes(&self, page: &[u8], item: &Item, budget: &mut Budget) -> Result<Vec<u8>, BdbError> {
        match item {
            Item::Inline(r) => Ok(page[r.clone()].to_vec()),
            Item::Off { pgno, len } => {
                let len = *len as usize;
                if len as u64 > (u64::from(self.last_pgno) + 1) * self.page_size as u64 {
                    return Err(BdbError::Corrupt(format!(
                        "an item of {len} bytes in a smaller file"
                    )));
                }
                if len > MAX_ITEM {
                    // Memory stays bounded whatever the file says; Postfix's tools decide.
                    return Err(BdbError::Unsupported(format!("an item of {len} bytes")));
                }
                let mut out = Vec::with_capacity(len.min(1 << 20));
                let mut next = *pgno;
                while out.len() < len {
                    let p = self.page(next, budget)?;
                    if p[25] != P_OVERFLOW {
                        return Err(BdbError::Corrupt(format!(
                            "page {next} of type {} in an overflow chain",
                            p[25]
                        )));
                    }
                    let here = usize::from(u16_at(&p, 22)?);
                    if here == 0 || PAGE_HEADER + here > self.page_size {
                        return Err(BdbError::Corrupt(format!(
                            "overflow page {next} holds {here} bytes"
                        )));
                    }
                    out.extend_from_slice(&p[PAGE_HEADER..PAGE_HEADER + here]);
                    next = u32_at(&p, 16)?;
                    if out.len() < len && next == 0 {
                        break;
                    }
                }
                if out.len() != len {
                    return Err(BdbError::Corrupt(format!(
                        "an overflow chain of {} bytes for an item of {len}",
                        out.len()
                    )));
                }
                Ok(out)
            }
        }
    }

    /// Calls `each(key, data)` for every item pair of the chain starting at page `first`.
    fn walk_chain(
        &self,
        first: u32,
        budget: &mut Budget,
        each: &mut Visit<'_>,
    ) -> Result<(), BdbError> {
        let mut next = first;
        while next != 0 {
            let p = self.page(next, budget)?;
            let items = self.items(&p, next)?;
            for pair in items.chunks_exact(2) {
                let k = self.bytes(&p, &pair[0], budget)?;
                let v = self.bytes(&p, &pair[1], budget)?;
                if !each(&k, &v)? {
                    return Ok(());
                }
            }
            next = u32_at(&p, 16)?;
        }
        Ok(())
    }

    /// The data stored under exactly `key`.
    pub fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, BdbError> {
        let first = self.bucket_page(self.bucket_of(key))?;
        let mut found = None;
        self.walk_chain(first, &mut self.budget(), &mut |k, v| {
            if k == key {
                found = Some(v.to_vec());
                return Ok(false);
            }
            Ok(true)
        })?;
        Ok(found)
    }

    /// What Postfix answers for `key` (already folded as Postfix folds it): the key stored
    /// with its NUL first, then without; the value without its NUL.
    pub fn postfix_get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, BdbError> {
        let mut with_nul = key.to_vec();
        with_nul.push(0);
        if let Some(mut v) = self.get(&with_nul)? {
            if v.last() == Some(&0) {
                v.pop();
            }
            return Ok(Some(v));
        }
        self.get(key)
    }

    /// Calls `each(key, value)` for every entry, as Postfix lists them (one trailing NUL
    /// removed from each), walking every bucket's chain; an entry stored in a bucket where a
    /// lookup would not find it is [`BdbError::Corrupt`]. Returns the number of entries.
    pub fn for_each(&self, mut each: impl FnMut(&[u8], &[u8])) -> Result<u64, BdbError> {
        let mut budget = self.budget();
        let mut n = 0u64;
        for bucket in 0..=self.max_bucket {
            let first = self.bucket_page(bucket)?;
            self.walk_chain(first, &mut budget, &mut |k, v| {
                if self.bucket_of(k) != bucket {
                    return Err(BdbError::Corrupt(format!(
                        "key `{}` in bucket {bucket}, where lookups do not look",
                        String::from_utf8_lossy(k)
                    )));
                }
                let strip = |b: &[u8]| -> usize { b.len() - usize::from(b.last() == Some(&0)) };
                each(&k[..strip(k)], &v[..strip(v)]);
                n += 1;
                Ok(true)
            })?;
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::process::Command;

    fn postmap() -> Option<String> {
        ["/usr/sbin/postmap", "/usr/bin/postmap", "/sbin/postmap"]
            .iter()
            .find(|p| Path::new(p).exists())
            .map(|p| p.to_string())
    }

    struct Dir(std::path::PathBuf);
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn dir(name: &str) -> Dir {
        let d = std::env::temp_dir().join(format!(
            "txmap-bdb-{name}-{}-{}",
            std::process::id(),
            crate::proto::TxId::random()
        ));
        std::fs::create_dir_all(&d).unwrap();
        // Dated back: Postfix waits for a main.cf younger than a second to settle.
        let f = File::create(d.join("main.cf")).unwrap();
        f.set_modified(std::time::SystemTime::now() - std::time::Duration::from_secs(60))
            .unwrap();
        Dir(d)
    }

    fn run(pm: &str, d: &Path, args: &[&str], stdin: &[u8]) -> Vec<u8> {
        use std::io::Write;
        let mut c = Command::new(pm)
            .arg("-c")
            .arg(d)
            .args(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        c.stdin.take().unwrap().write_all(stdin).unwrap();
        let o = c.wait_with_output().unwrap();
        assert!(
            o.status.success() || args.first() == Some(&"-q"),
            "{args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        o.stdout
    }

    /// `postmap -s`, parsed.
    fn dump(pm: &str, d: &Path, map: &str) -> BTreeMap<Vec<u8>, Vec<u8>> {
        run(pm, d, &["-s", map], b"")
            .split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
            .map(|l| {
                let t = l.iter().position(|b| *b == b'\t').unwrap();
                (l[..t].to_vec(), l[t + 1..].to_vec())
            })
            .collect()
    }

    fn read_all(db: &HashDb) -> BTreeMap<Vec<u8>, Vec<u8>> {
        let mut m = BTreeMap::new();
        let n = db
            .for_each(|k, v| {
                assert!(m.insert(k.to_vec(), v.to_vec()).is_none(), "key twice");
            })
            .unwrap();
        assert_eq!(n as usize, m.len());
        m
    }

    fn rng(mut seed: u64) -> impl FnMut() -> u64 {
        move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        }
    }

    /// A table with mixed-case keys, short values and values longer than a page (overflow
    /// chains), built by the real `postmap`: the reader lists exactly what `postmap -s`
    /// lists, finds every key as `postmap -q` does, and finds no absent key; still so after
    /// `postmap -d` and `postmap -i` changed the file in place.
    #[test]
    fn reads_what_postmap_reads() {
        let Some(pm) = postmap() else {
            eprintln!("postmap not installed; skipped");
            return;
        };
        let d = dir("same");
        let mut next = rng(7);
        let mut src = String::new();
        for i in 0..6000u64 {
            let long = next().is_multiple_of(50);
            let value = if long {
                format!("v{i}-{}", "x".repeat(3000 + (next() % 9000) as usize))
            } else {
                format!("smtp:[host{}.example.org]", next() % 1000)
            };
            let key = if i % 7 == 0 {
                format!("List{i}@Lists.Example.ORG")
            } else {
                format!("list{i}@lists.example.org")
            };
            src.push_str(&format!("{key}\t{value}\n"));
        }
        let t = d.0.join("t");
        std::fs::write(&t, &src).unwrap();
        let map = format!("hash:{}", t.display());
        run(&pm, &d.0, &[&map], b"");
        let db_path = d.0.join("t.db");
        for round in 0..2 {
            let want = dump(&pm, &d.0, &map);
            let db = HashDb::open(&db_path).unwrap();
            let got = read_all(&db);
            assert_eq!(got.len(), want.len(), "round {round}");
            assert!(
                got == want,
                "round {round}: the reader differs from postmap -s"
            );
            for (k, v) in &want {
                assert_eq!(
                    db.postfix_get(k).unwrap().as_ref(),
                    Some(v),
                    "round {round}"
                );
            }
            for i in 0..200 {
                let absent = format!("absent{i}@lists.example.org");
                assert_eq!(db.postfix_get(absent.as_bytes()).unwrap(), None);
            }
            // Change it in place as an incremental build does.
            let del: String = want
                .keys()
                .take(500)
                .map(|k| format!("{}\n", String::from_utf8_lossy(k)))
                .collect();
            run(&pm, &d.0, &["-d", "-", &map], del.as_bytes());
            let add: String = (0..300)
                .map(|i| format!("new{i}@lists.example.org\t{}\n", "y".repeat(i * 37)))
                .collect();
            run(&pm, &d.0, &["-i", &map], add.as_bytes());
        }
    }

    /// A damaged file is an error, never a panic nor an endless walk: random bytes written
    /// over random places of a real file.
    #[test]
    fn damaged_files_are_errors_not_panics() {
        let Some(pm) = postmap() else {
            eprintln!("postmap not installed; skipped");
            return;
        };
        let d = dir("damaged");
        let src: String = (0..3000)
            .map(|i| format!("k{i}\t{}\n", "v".repeat(i % 5000)))
            .collect();
        let t = d.0.join("t");
        std::fs::write(&t, &src).unwrap();
        run(&pm, &d.0, &[&format!("hash:{}", t.display())], b"");
        let good = std::fs::read(d.0.join("t.db")).unwrap();
        let bad = d.0.join("bad.db");
        let mut next = rng(99);
        let mut refused = 0;
        for _ in 0..300 {
            let mut b = good.clone();
            for _ in 0..1 + next() % 8 {
                let at = (next() % b.len() as u64) as usize;
                b[at] = next() as u8;
            }
            if next().is_multiple_of(10) {
                b.truncate((next() % b.len() as u64) as usize);
            }
            std::fs::write(&bad, &b).unwrap();
            let r = HashDb::open(&bad).and_then(|db| {
                db.postfix_get(b"k17")?;
                db.for_each(|_, _| {})
            });
            refused += usize::from(r.is_err());
        }
        assert!(refused > 0, "no damage was ever noticed");
        // A link to a good file, and a FIFO: refused (a planted name is never followed, a
        // FIFO never waited on).
        let link = d.0.join("link.db");
        std::os::unix::fs::symlink(d.0.join("t.db"), &link).unwrap();
        assert!(HashDb::open(&link).is_err());
        let fifo = d.0.join("fifo.db");
        assert!(Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success());
        assert!(HashDb::open(&fifo).is_err());
        // Not a hash file at all.
        std::fs::write(&bad, b"hello").unwrap();
        assert!(HashDb::open(&bad).is_err());
        std::fs::write(&bad, vec![0u8; 8192]).unwrap();
        assert!(HashDb::open(&bad).is_err());
    }

    #[test]
    fn the_hash_function_is_berkeley_dbs() {
        // The value Berkeley DB records in every hash file's meta page (`h_charkey`).
        assert_eq!(hash(CHARKEY), 0x5e68_8dd1);
        assert_eq!(log2(1), 0);
        assert_eq!(log2(2), 1);
        assert_eq!(log2(3), 2);
        assert_eq!(log2(5), 3);
    }
}
