//! Delta transfer: the change from a base source (the generation a node serves) to a new one,
//! as an edit script over **records**, so that a one-list change to a big table costs a few
//! hundred bytes on the wire instead of the whole table.
//!
//! A record is one entry as written: its first line (one that [`starts_entry`]) and every line
//! after it up to the next such line (continuation lines, comments, blank lines). The bytes
//! before the first entry form a record of their own. So records start at offset 0 and after
//! every newline followed by an entry's first byte, and the same bytes always split the same
//! way on the coordinator and on the node.
//!
//! The script (sent raw after the `PrepareDelta` frame) is a sequence of operations:
//!
//! | tag | operand | meaning |
//! |---|---|---|
//! | `K` | u64 LE `n` | copy the next `n` base records |
//! | `D` | u64 LE `n` | skip the next `n` base records (their keys are deleted) |
//! | `I` | u64 LE `len`, then `len` bytes | write these bytes (whole records; their entries are added) |
//! | `R` | — | copy the rest of the base (last operation) |
//!
//! The node rebuilds the whole new source from its own live copy, and checks its sha256 and
//! length against the prepare's: a node whose base differs gets a refusal it cannot mistake,
//! and the coordinator sends it the whole table instead.
//!
//! [`plan`] finds the script cheaply for the usual change (one region of a big file): the common
//! prefix and suffix are found by comparing bytes, and only the middle is diffed record by record
//! (Myers' O(ND) algorithm, bounded).

use crate::entries::starts_entry;
use std::fs::File;
use std::io::{BufRead, Read, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::Path;

const KEEP: u8 = b'K';
const DROP: u8 = b'D';
const INSERT: u8 = b'I';
const REST: u8 = b'R';

/// What goes wrong applying a script.
#[derive(Debug, thiserror::Error)]
pub enum DeltaError {
    /// The script is malformed.
    #[error("malformed delta: {0}")]
    Malformed(String),
    /// The script does not fit this base (another base, or a drifted live file).
    #[error("delta does not fit this node's base: {0}")]
    Base(String),
    /// Reading the base or writing the result failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Bounds of [`plan`]: beyond them the whole table is sent.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Most bytes of script (and of each side's changed middle region).
    pub max_bytes: u64,
    /// Most edits (records dropped plus records inserted) the diff looks for.
    pub max_edits: usize,
}

/// A script from a base to a new source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// The script.
    pub payload: Vec<u8>,
    /// sha256 of the base it applies to.
    pub base_sha256: [u8; 32],
    /// Records dropped.
    pub dropped: u64,
    /// Records inserted.
    pub inserted: u64,
}

/// One step of the middle's edit script.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Edit {
    Keep,
    Drop,
    Insert(usize),
}

/// Myers' greedy diff of `a` into `b`, or `None` past `max_d` edits.
fn myers<T: PartialEq>(a: &[T], b: &[T], max_d: usize) -> Option<Vec<Edit>> {
    let (n, m) = (a.len() as isize, b.len() as isize);
    let dmax = (max_d as isize).min(n + m);
    let off = dmax + 1;
    let mut v = vec![0isize; (2 * dmax + 3) as usize];
    // trace[d] holds v[k] for k in -d-1..=d+1 before step d.
    let mut trace: Vec<Vec<isize>> = Vec::new();
    let mut found = None;
    'outer: for d in 0..=dmax {
        trace.push(v[(off - d - 1) as usize..=(off + d + 1) as usize].to_vec());
        let mut k = -d;
        while k <= d {
            let down = k == -d || (k != d && v[(off + k - 1) as usize] < v[(off + k + 1) as usize]);
            let mut x = if down {
                v[(off + k + 1) as usize]
            } else {
                v[(off + k - 1) as usize] + 1
            };
            let mut y = x - k;
            while x < n && y < m && a[x as usize] == b[y as usize] {
                x += 1;
                y += 1;
            }
            v[(off + k) as usize] = x;
            if x >= n && y >= m {
                found = Some(d);
                break 'outer;
            }
            k += 2;
        }
    }
    let dfound = found?;
    let mut edits = Vec::new();
    let (mut x, mut y) = (n, m);
    for d in (0..=dfound).rev() {
        let t = &trace[d as usize];
        let at = |k: isize| t[(k + d + 1) as usize];
        let k = x - y;
        let prev_k = if k == -d || (k != d && at(k - 1) < at(k + 1)) {
            k + 1
        } else {
            k - 1
        };
        let prev_x = if d == 0 { 0 } else { at(prev_k) };
        let prev_y = if d == 0 { 0 } else { prev_x - prev_k };
        while x > prev_x && y > prev_y {
            edits.push(Edit::Keep);
            x -= 1;
            y -= 1;
        }
        if d > 0 {
            if x == prev_x {
                edits.push(Edit::Insert((y - 1) as usize));
            } else {
                edits.push(Edit::Drop);
            }
        }
        x = prev_x;
        y = prev_y;
    }
    edits.reverse();
    Some(edits)
}

fn push_count(out: &mut Vec<u8>, tag: u8, n: u64) {
    if n > 0 {
        out.push(tag);
        out.extend_from_slice(&n.to_le_bytes());
    }
}

/// Encodes `edits` of middle records after `keep_prefix` kept records; `record(j)` gives the
/// bytes of the new side's record `j`.
fn encode(
    keep_prefix: u64,
    edits: &[Edit],
    mut record: impl FnMut(usize) -> std::io::Result<Vec<u8>>,
) -> std::io::Result<(Vec<u8>, u64, u64)> {
    let mut out = Vec::new();
    let (mut keep, mut drop) = (keep_prefix, 0u64);
    let mut ins: Vec<u8> = Vec::new();
    let (mut dropped, mut inserted) = (0u64, 0u64);
    let flush = |out: &mut Vec<u8>, keep: &mut u64, drop: &mut u64, ins: &mut Vec<u8>| {
        push_count(out, KEEP, std::mem::take(keep));
        push_count(out, DROP, std::mem::take(drop));
        if !ins.is_empty() {
            out.push(INSERT);
            out.extend_from_slice(&(ins.len() as u64).to_le_bytes());
            out.append(ins);
        }
    };
    for e in edits {
        match e {
            Edit::Keep => {
                if drop > 0 || !ins.is_empty() {
                    flush(&mut out, &mut 0, &mut drop, &mut ins);
                }
                keep += 1;
            }
            Edit::Drop => {
                if keep > 0 {
                    flush(&mut out, &mut keep, &mut 0, &mut Vec::new());
                }
                drop += 1;
                dropped += 1;
            }
            Edit::Insert(j) => {
                if keep > 0 {
                    flush(&mut out, &mut keep, &mut 0, &mut Vec::new());
                }
                ins.extend_from_slice(&record(*j)?);
                inserted += 1;
            }
        }
    }
    flush(&mut out, &mut keep, &mut drop, &mut ins);
    out.push(REST);
    Ok((out, dropped, inserted))
}

fn read_at(f: &File, buf: &mut [u8], at: u64) -> std::io::Result<()> {
    f.read_exact_at(buf, at)
}

/// The script turning `base` into `new`, or `None` when the files are equal or the change is
/// beyond `limits` (then the whole table is sent). Reads both files (the base once whole, for
/// its sha256) with bounded memory: only the changed middle is held.
pub fn plan(base: &Path, new: &Path, limits: Limits) -> std::io::Result<Option<Plan>> {
    let (fb, _) = crate::table::open_untrusted(base, u64::MAX)?;
    let fnew = File::open(new)?;
    plan_files(&fb, &fnew, limits, None)
}

/// [`plan`] from open files (the base opened by its owner's rules, see
/// [`crate::history::History::open_live`]). With `known_base` (the sha256 the base is recorded
/// to have) the base is not hashed, and read only where it is compared: a base that is not
/// that content makes every node's rebuilt source differ from the announced sha256, so each
/// refuses the delta ([`crate::proto::Refusal::DeltaBase`]) and gets the whole table.
pub fn plan_files(
    fb: &File,
    fnew: &File,
    limits: Limits,
    known_base: Option<[u8; 32]>,
) -> std::io::Result<Option<Plan>> {
    let lb = fb.metadata()?.len();
    let ln = fnew.metadata()?.len();
    const CHUNK: usize = 1 << 20;
    // Forward: the base's sha256, and the first differing offset.
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let (mut bb, mut nb) = (vec![0u8; CHUNK], vec![0u8; CHUNK]);
    let mut pos = 0u64;
    let mut first_diff: Option<u64> = None;
    let mut rb = fb.try_clone()?;
    rb.seek(SeekFrom::Start(0))?;
    loop {
        if known_base.is_some() && first_diff.is_some() {
            break;
        }
        let n = read_full(&mut rb, &mut bb)?;
        if n == 0 {
            break;
        }
        if known_base.is_none() {
            ctx.update(&bb[..n]);
        }
        if first_diff.is_none() {
            let want = (n as u64).min(ln.saturating_sub(pos)) as usize;
            read_at(fnew, &mut nb[..want], pos)?;
            // Whole chunks compare at memcmp speed; only the differing one is searched.
            if bb[..want] != nb[..want] {
                let i = bb[..want].iter().zip(&nb[..want]).position(|(x, y)| x != y);
                first_diff = Some(pos + i.unwrap_or(want) as u64);
            } else if want < n {
                first_diff = Some(pos + want as u64);
            }
        }
        pos += n as u64;
    }
    let base_sha256 = match known_base {
        Some(s) => s,
        None => {
            let mut sha = [0u8; 32];
            sha.copy_from_slice(ctx.finish().as_ref());
            sha
        }
    };
    let p = match first_diff {
        Some(p) => p,
        None if ln == lb => return Ok(None),
        None => lb,
    };
    // Backward: the common suffix, never overlapping the common prefix on either side.
    let max_suffix = lb.min(ln) - p;
    let mut s = 0u64;
    while s < max_suffix {
        let want = ((max_suffix - s) as usize).min(CHUNK);
        read_at(fb, &mut bb[..want], lb - s - want as u64)?;
        read_at(fnew, &mut nb[..want], ln - s - want as u64)?;
        if bb[..want] == nb[..want] {
            s += want as u64;
            continue;
        }
        match bb[..want]
            .iter()
            .rev()
            .zip(nb[..want].iter().rev())
            .position(|(x, y)| x != y)
        {
            Some(i) => {
                s += i as u64;
                break;
            }
            None => s += want as u64,
        }
    }
    // Widen [p, lb - s) to record boundaries: `cut` is the last record start before `p`
    // (bytes before `p` are common, so it starts a record in both files); `q` the first start
    // inside the common suffix (its newline too), or the end.
    let cut = last_start_before(fb, p)?;
    let q = first_start_after(fb, lb - s, lb)?;
    let (end_b, end_n) = (q, q + ln - lb);
    let hasher = std::collections::hash_map::RandomState::new();
    let (a, _) = record_hashes(fb, cut, end_b, &hasher)?;
    let (b, b_starts) = record_hashes(fnew, cut, end_n, &hasher)?;
    let Some(edits) = myers(&a, &b, limits.max_edits) else {
        return Ok(None);
    };
    let keep_prefix = count_starts(fb, cut)?;
    let mut budget = limits.max_bytes;
    let (payload, dropped, inserted) = encode(keep_prefix, &edits, |j| {
        let (from, to) = (b_starts[j], b_starts.get(j + 1).copied().unwrap_or(end_n));
        if to - from > budget {
            return Err(std::io::Error::other("delta over its byte limit"));
        }
        budget -= to - from;
        let mut v = vec![0u8; (to - from) as usize];
        read_at(fnew, &mut v, from)?;
        Ok(v)
    })
    .map_or((Vec::new(), 0, 0), |r| r);
    if payload.is_empty() || payload.len() as u64 > limits.max_bytes {
        return Ok(None);
    }
    Ok(Some(Plan {
        payload,
        base_sha256,
        dropped,
        inserted,
    }))
}

/// A keyed hash and the start offset of every record in `[from, to)` of `f` (`from` is a
/// record start), read in chunks: only 16 bytes per record are held.
fn record_hashes(
    f: &File,
    from: u64,
    to: u64,
    hasher: &std::collections::hash_map::RandomState,
) -> std::io::Result<(Vec<u64>, Vec<u64>)> {
    use std::hash::BuildHasher;
    let (mut hashes, mut starts) = (Vec::new(), Vec::new());
    let mut rec: Vec<u8> = Vec::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut pos = from;
    let mut prev_newline = false;
    while pos < to {
        let want = ((to - pos) as usize).min(buf.len());
        read_at(f, &mut buf[..want], pos)?;
        for (i, b) in buf[..want].iter().enumerate() {
            let at = pos + i as u64;
            if at == from || (prev_newline && starts_entry(*b)) {
                if at != from {
                    hashes.push(hasher.hash_one(&rec));
                }
                rec.clear();
                starts.push(at);
            }
            rec.push(*b);
            prev_newline = *b == b'\n';
        }
        pos += want as u64;
    }
    if to > from {
        hashes.push(hasher.hash_one(&rec));
    }
    Ok((hashes, starts))
}

fn read_full(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// The last record start strictly before `p` (0 if none).
fn last_start_before(f: &File, p: u64) -> std::io::Result<u64> {
    const WIN: u64 = 64 * 1024;
    let mut end = p; // examine starts x in (lo, end) with x < p
    while end > 0 {
        let lo = end.saturating_sub(WIN);
        // Bytes lo-1 ..= end-1 decide starts in [lo, end).
        let from = lo.saturating_sub(1);
        let mut buf = vec![0u8; (end - from) as usize];
        read_at(f, &mut buf, from)?;
        for x in (lo.max(1)..end).rev() {
            let i = (x - from) as usize;
            if buf[i - 1] == b'\n' && starts_entry(buf[i]) {
                return Ok(x);
            }
        }
        end = lo;
    }
    Ok(0)
}

/// The first record start `x` with `from < x < len`, or `len`.
fn first_start_after(f: &File, from: u64, len: u64) -> std::io::Result<u64> {
    const WIN: u64 = 64 * 1024;
    let mut lo = from;
    while lo < len {
        let hi = (lo + WIN).min(len);
        let mut buf = vec![0u8; (hi - lo) as usize];
        read_at(f, &mut buf, lo)?;
        for (i, w) in buf.windows(2).enumerate() {
            if w[0] == b'\n' && starts_entry(w[1]) {
                return Ok(lo + i as u64 + 1);
            }
        }
        // A newline at the window's end pairs with the next window's first byte.
        lo = if hi == len { hi } else { hi - 1 };
    }
    Ok(len)
}

/// Record starts in `[0, end)`.
fn count_starts(f: &File, end: u64) -> std::io::Result<u64> {
    if end == 0 {
        return Ok(0);
    }
    let mut n = 1u64;
    let mut prev_newline = false;
    let mut buf = vec![0u8; 1 << 20];
    let mut pos = 0u64;
    while pos < end {
        let want = ((end - pos) as usize).min(buf.len());
        read_at(f, &mut buf[..want], pos)?;
        let chunk = &buf[..want];
        if prev_newline && pos > 0 && starts_entry(chunk[0]) {
            n += 1;
        }
        for i in memchr::memchr_iter(b'\n', chunk) {
            if chunk.get(i + 1).is_some_and(|b| starts_entry(*b)) {
                n += 1;
            }
        }
        prev_newline = chunk[want - 1] == b'\n';
        pos += want as u64;
    }
    Ok(n)
}

/// What applying a script changed, for the incremental build.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Applied {
    /// The dropped records, as written in the base.
    pub dropped: Vec<u8>,
    /// The inserted records, as written in the new source.
    pub inserted: Vec<u8>,
    /// sha256 of the whole base as read (`None` when it was not hashed: see [`apply`]).
    pub base_sha256: Option<[u8; 32]>,
}

/// Reads a base record by record (hashing it, unless its content is known).
struct Records<R> {
    r: R,
    pending: Vec<u8>,
    has_pending: bool,
    started: bool,
    ctx: Option<ring::digest::Context>,
}

impl<R: BufRead> Records<R> {
    #[cfg(test)]
    fn new(r: R) -> Self {
        Self::hashing(r, true)
    }

    fn hashing(r: R, hash: bool) -> Self {
        Records {
            r,
            pending: Vec::new(),
            has_pending: false,
            started: false,
            ctx: hash.then(|| ring::digest::Context::new(&ring::digest::SHA256)),
        }
    }

    fn hash(&mut self, bytes: &[u8]) {
        if let Some(c) = self.ctx.as_mut() {
            c.update(bytes);
        }
    }

    fn digest(self) -> Option<[u8; 32]> {
        self.ctx.map(|c| {
            let mut sha = [0u8; 32];
            sha.copy_from_slice(c.finish().as_ref());
            sha
        })
    }

    fn line(&mut self, into: &mut Vec<u8>) -> std::io::Result<usize> {
        let start = into.len();
        let n = self.r.read_until(b'\n', into)?;
        let (_, read) = into.split_at(start);
        if let Some(c) = self.ctx.as_mut() {
            c.update(read);
        }
        Ok(n)
    }

    /// The next record into `rec` (cleared first); false at the end.
    fn next(&mut self, rec: &mut Vec<u8>) -> std::io::Result<bool> {
        rec.clear();
        if self.has_pending {
            std::mem::swap(rec, &mut self.pending);
            self.has_pending = false;
        } else if self.started || self.line(rec)? == 0 {
            return Ok(false);
        }
        self.started = true;
        loop {
            self.pending.clear();
            let mut line = std::mem::take(&mut self.pending);
            if self.line(&mut line)? == 0 {
                self.pending = line;
                return Ok(true);
            }
            if starts_entry(line[0]) {
                self.pending = line;
                self.has_pending = true;
                return Ok(true);
            }
            rec.extend_from_slice(&line);
            self.pending = line;
        }
    }

    /// Copies the next `n` records to `out` in large slices (a 1,000,000-line table is kept
    /// almost whole by a one-list change); returns how many records were missing when the base
    /// ended first. Leaves the same state as `n` calls of [`Records::next`].
    fn keep(
        &mut self,
        mut n: u64,
        out: &mut impl FnMut(&[u8]) -> std::io::Result<()>,
    ) -> std::io::Result<u64> {
        if n == 0 {
            return Ok(0);
        }
        if !self.has_pending {
            // The first record of the file (or the end): the line-by-line path.
            let mut rec = Vec::new();
            if !self.next(&mut rec)? {
                return Ok(n);
            }
            out(&rec)?;
            n -= 1;
            if n == 0 || !self.has_pending {
                return Ok(n);
            }
        }
        // `pending` is the first line of the next record: emit it, then cross `n - 1` record
        // starts and stop before the next one.
        out(&self.pending)?;
        self.has_pending = false;
        let mut starts_left = n - 1;
        let mut at_line_start = self.pending.last() == Some(&b'\n');
        loop {
            let buf = self.r.fill_buf()?;
            if buf.is_empty() {
                return Ok(starts_left);
            }
            let mut i = 0;
            let mut stop = None;
            while i < buf.len() {
                if at_line_start && starts_entry(buf[i]) {
                    if starts_left == 0 {
                        stop = Some(i);
                        break;
                    }
                    starts_left -= 1;
                }
                match memchr::memchr(b'\n', &buf[i..]) {
                    Some(p) => {
                        i += p + 1;
                        at_line_start = true;
                    }
                    None => {
                        i = buf.len();
                        at_line_start = false;
                    }
                }
            }
            let upto = stop.unwrap_or(buf.len());
            if let Some(c) = self.ctx.as_mut() {
                c.update(&buf[..upto]);
            }
            out(&buf[..upto])?;
            self.r.consume(upto);
            if stop.is_some() {
                let mut line = std::mem::take(&mut self.pending);
                line.clear();
                self.line(&mut line)?;
                self.pending = line;
                self.has_pending = true;
                return Ok(0);
            }
        }
    }

    /// Everything not read yet, to `out`; then the base's sha256.
    fn rest(
        mut self,
        out: &mut impl FnMut(&[u8]) -> std::io::Result<()>,
    ) -> std::io::Result<Option<[u8; 32]>> {
        if self.has_pending {
            out(&self.pending)?;
        }
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            let n = self.r.read(&mut buf)?;
            if n == 0 {
                break;
            }
            self.hash(&buf[..n]);
            out(&buf[..n])?;
        }
        Ok(self.digest())
    }

    /// `Some(sha256)` (or `Some(None)` when not hashing) when the base is read exactly to its
    /// end; `None` when records are left.
    fn finish(mut self) -> std::io::Result<Option<Option<[u8; 32]>>> {
        if self.has_pending {
            return Ok(None);
        }
        if !self.started {
            let mut probe = Vec::new();
            if self.line(&mut probe)? > 0 {
                return Ok(None);
            }
        }
        Ok(Some(self.digest()))
    }
}

fn take<'a>(p: &mut &'a [u8], n: usize, what: &str) -> Result<&'a [u8], DeltaError> {
    if p.len() < n {
        return Err(DeltaError::Malformed(format!("truncated {what}")));
    }
    let (a, b) = p.split_at(n);
    *p = b;
    Ok(a)
}

fn take_u64(p: &mut &[u8], what: &str) -> Result<u64, DeltaError> {
    let b = take(p, 8, what)?;
    let mut a = [0u8; 8];
    a.copy_from_slice(b);
    Ok(u64::from_le_bytes(a))
}

/// What a script changes, told from the script alone: how many base records it drops, and
/// how many bytes it inserts. `None` for a script that is not well formed ([`apply`] says
/// what is wrong).
pub fn summary(script: &[u8]) -> Option<(u64, u64)> {
    let (mut dropped, mut inserted) = (0u64, 0u64);
    let mut p = script;
    while let Some((&tag, rest)) = p.split_first() {
        p = rest;
        match tag {
            KEEP => {
                take_u64(&mut p, "count").ok()?;
            }
            DROP => dropped = dropped.checked_add(take_u64(&mut p, "count").ok()?)?,
            INSERT => {
                let len = take_u64(&mut p, "length").ok()?;
                take(&mut p, usize::try_from(len).ok()?, "insert").ok()?;
                inserted = inserted.checked_add(len)?;
            }
            REST => return p.is_empty().then_some((dropped, inserted)),
            _ => return None,
        }
    }
    Some((dropped, inserted))
}

/// Applies `script` to `base`, writing the new source to `out`. Fails, having written a prefix
/// only, when the script is malformed or does not cover the base exactly.
/// At most `max_changed` bytes of records may be dropped and inserted in all (they are held for
/// the incremental build): a script beyond that is refused.
/// The base is hashed unless `hash_base` is false (its content is known by other means).
pub fn apply<R: BufRead>(
    base: R,
    script: &[u8],
    max_changed: u64,
    hash_base: bool,
    mut out: impl FnMut(&[u8]) -> std::io::Result<()>,
) -> Result<Applied, DeltaError> {
    let mut recs = Records::hashing(base, hash_base);
    let mut applied = Applied::default();
    let mut p = script;
    let mut rec = Vec::new();
    while let Some((&tag, rest)) = p.split_first() {
        p = rest;
        match tag {
            KEEP => {
                let n = take_u64(&mut p, "count")?;
                let missing = recs.keep(n, &mut out)?;
                if missing > 0 {
                    return Err(DeltaError::Base(format!(
                        "the base ends {missing} records early"
                    )));
                }
            }
            DROP => {
                let n = take_u64(&mut p, "count")?;
                for i in 0..n {
                    if !recs.next(&mut rec)? {
                        return Err(DeltaError::Base(format!(
                            "the base ends {} records early",
                            n - i
                        )));
                    }
                    applied.dropped.extend_from_slice(&rec);
                    if (applied.dropped.len() + applied.inserted.len()) as u64 > max_changed {
                        return Err(DeltaError::Base(format!(
                            "the delta changes more than {max_changed} bytes"
                        )));
                    }
                }
            }
            INSERT => {
                let len = take_u64(&mut p, "length")?;
                let bytes = take(&mut p, usize::try_from(len).unwrap_or(usize::MAX), "insert")?;
                if (applied.dropped.len() + applied.inserted.len() + bytes.len()) as u64
                    > max_changed
                {
                    return Err(DeltaError::Base(format!(
                        "the delta changes more than {max_changed} bytes"
                    )));
                }
                out(bytes)?;
                applied.inserted.extend_from_slice(bytes);
            }
            REST => {
                if !p.is_empty() {
                    return Err(DeltaError::Malformed("operations after the rest".into()));
                }
                applied.base_sha256 = recs.rest(&mut out)?;
                return Ok(applied);
            }
            other => {
                return Err(DeltaError::Malformed(format!(
                    "unknown operation byte {other:#04x}"
                )))
            }
        }
    }
    match recs.finish()? {
        Some(sha) => {
            applied.base_sha256 = sha;
            Ok(applied)
        }
        None => Err(DeltaError::Base(
            "the base has more records than the delta covers".into(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str, bytes: &[u8]) -> std::path::PathBuf {
        let dir =
            std::env::temp_dir().join(format!("txmap-delta-{}", crate::proto::TxId::random()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    }

    const LIMITS: Limits = Limits {
        max_bytes: 1 << 20,
        max_edits: 1000,
    };

    fn roundtrip(base: &[u8], new: &[u8]) -> Option<Plan> {
        let (pb, pn) = (tmp("base", base), tmp("new", new));
        let plan = plan(&pb, &pn, LIMITS).unwrap();
        // A base whose sha256 is known is not hashed again: the same script.
        let sha = ring::digest::digest(&ring::digest::SHA256, base);
        let mut known = [0u8; 32];
        known.copy_from_slice(sha.as_ref());
        let (fb, fnew) = (File::open(&pb).unwrap(), File::open(&pn).unwrap());
        let again = plan_files(&fb, &fnew, LIMITS, Some(known)).unwrap();
        assert_eq!(
            again.as_ref().map(|p| (&p.payload, p.base_sha256)),
            plan.as_ref().map(|p| (&p.payload, p.base_sha256))
        );
        if let Some(plan) = &plan {
            let mut out = Vec::new();
            let applied = apply(base, &plan.payload, u64::MAX, true, |b| {
                out.extend_from_slice(b);
                Ok(())
            })
            .unwrap();
            assert_eq!(out, new, "base {base:?} new {new:?}");
            let sha = ring::digest::digest(&ring::digest::SHA256, base);
            assert_eq!(&applied.base_sha256.unwrap()[..], sha.as_ref());
            assert_eq!(Some(plan.base_sha256), applied.base_sha256);
        }
        let _ = std::fs::remove_dir_all(pb.parent().unwrap());
        plan
    }

    /// The bulk copy of `K` leaves exactly what record-by-record reading does, whatever the
    /// buffer size (record starts split across buffer boundaries) and the counts asked.
    #[test]
    fn bulk_keep_equals_record_by_record() {
        let inputs: &[&[u8]] = &[
            b"",
            b"a b\n",
            b"a b",
            b"# head\n\na b\n  cont\n# c\nc d\ne f",
            b"  lead\n#x\na b\nc d\n\n\ne f\n g\n",
            b"k1 v\nk2 v\nk3 v\nk4 v\nk5 v\nk6 v\nk7 v\n",
        ];
        for input in inputs {
            let mut whole = Records::new(&input[..]);
            let mut all = Vec::new();
            let mut rec = Vec::new();
            while whole.next(&mut rec).unwrap() {
                all.push(rec.clone());
            }
            for cap in [1usize, 2, 3, 5, 64] {
                for split in 0..=all.len() + 1 {
                    // `split` records by `keep`, then the rest one by one.
                    let mut r = Records::new(std::io::BufReader::with_capacity(cap, &input[..]));
                    let mut got = Vec::new();
                    let missing = r
                        .keep(split as u64, &mut |b| {
                            got.extend_from_slice(b);
                            Ok(())
                        })
                        .unwrap();
                    assert_eq!(missing, (split as u64).saturating_sub(all.len() as u64));
                    let want: Vec<u8> = all.iter().take(split).flatten().copied().collect();
                    assert_eq!(got, want, "input {input:?} cap {cap} split {split}");
                    let mut rest = Vec::new();
                    while r.next(&mut rec).unwrap() {
                        rest.push(rec.clone());
                    }
                    assert_eq!(
                        rest,
                        all[split.min(all.len())..],
                        "input {input:?} cap {cap}"
                    );
                    let sha = ring::digest::digest(&ring::digest::SHA256, input);
                    assert_eq!(
                        r.finish().unwrap().flatten().map(|s| s.to_vec()),
                        Some(sha.as_ref().to_vec())
                    );
                }
            }
        }
    }

    #[test]
    fn small_changes_make_small_scripts() {
        let mut base = Vec::new();
        for i in 0..2000 {
            base.extend_from_slice(format!("list{i}@x sympa:list{i}@x\n").as_bytes());
        }
        let mut new = base.clone();
        let at = base.len() / 2;
        let at = at + base[at..].iter().position(|b| *b == b'\n').unwrap() + 1;
        new.splice(
            at..at,
            b"newlist@x sympa:newlist@x\n  continued\n".iter().copied(),
        );
        let plan = roundtrip(&base, &new).unwrap();
        assert!(plan.payload.len() < 100, "{} bytes", plan.payload.len());
        assert_eq!((plan.dropped, plan.inserted), (0, 1));
        // Deleting one and changing another.
        let text = String::from_utf8(base.clone()).unwrap();
        let new = text
            .replace("list7@x sympa:list7@x\n", "")
            .replace("list1500@x sympa:list1500@x", "list1500@x other");
        let plan = roundtrip(&base, new.as_bytes()).unwrap();
        assert_eq!((plan.dropped, plan.inserted), (2, 1));
    }

    #[test]
    fn edge_cases_roundtrip() {
        let cases: &[(&[u8], &[u8])] = &[
            (b"", b"a b\n"),
            (b"a b\n", b""),
            (b"# head\na b\n", b"# other head\na b\n"),
            (b"a b\nc d", b"a b\nc e"),
            (b"a b\nc d\n", b"a b\nc d"),
            (b"a b\n  cont\nc d\n", b"a b\n  cont2\nc d\n"),
            (b"a b\nb c\na b\nb c\n", b"a b\nb c\nb c\n"),
            (b"x\nx\nx\n", b"x\nx\nx\nx\n"),
            (b"a 1\n\n\nb 2\n", b"a 1\n\nb 2\n"),
            (b"k v\n", b"  lead\nk v\n"),
            (b"\n\n", b"\n"),
        ];
        for (b, n) in cases {
            let plan = roundtrip(b, n);
            assert!(plan.is_some(), "no plan for {b:?} -> {n:?}");
        }
        assert_eq!(roundtrip(b"same\n", b"same\n"), None);
    }

    #[test]
    fn randomized_changes_roundtrip() {
        // A small deterministic generator (xorshift), so a failure can be replayed.
        let mut s = 0x9e37_79b9_7f4a_7c15u64;
        let mut rnd = move |n: u64| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s % n.max(1)
        };
        let pieces: [&[u8]; 8] = [
            b"k1 v1\n",
            b"K2 v2\n",
            b"  cont\n",
            b"# comment\n",
            b"\n",
            b"a: b, c\n",
            b"k1 other\n",
            b"tail-without-newline",
        ];
        for _ in 0..400 {
            let mut base = Vec::new();
            for _ in 0..rnd(12) {
                base.extend_from_slice(pieces[rnd(7) as usize]);
            }
            let mut new = base.clone();
            for _ in 0..rnd(4) + 1 {
                let at = rnd(new.len() as u64 + 1) as usize;
                match rnd(3) {
                    0 => new
                        .splice(at..at, pieces[rnd(8) as usize].iter().copied())
                        .for_each(drop),
                    1 => {
                        let end = (at + rnd(8) as usize).min(new.len());
                        new.drain(at..end);
                    }
                    _ => {
                        if let Some(b) = new.get_mut(at) {
                            *b = b"xy \n#"[rnd(5) as usize];
                        }
                    }
                }
            }
            let plan = roundtrip(&base, &new);
            assert_eq!(plan.is_none(), base == new, "{base:?} -> {new:?}");
        }
    }

    #[test]
    fn a_script_for_another_base_is_refused_or_detected() {
        let plan = roundtrip(b"a 1\nb 2\nc 3\n", b"a 1\nc 3\n").unwrap();
        // One record fewer: the script runs out of base.
        let err = apply(&b"a 1\n"[..], &plan.payload, u64::MAX, true, |_| Ok(())).unwrap_err();
        assert!(matches!(err, DeltaError::Base(_)), "{err}");
        // Same shape, other content: applies, but the base's sha256 tells.
        let other = apply(
            &b"a 9\nb 2\nc 3\n"[..],
            &plan.payload,
            u64::MAX,
            true,
            |_| Ok(()),
        )
        .unwrap();
        assert_ne!(other.base_sha256, Some(plan.base_sha256));
        // Garbage never panics.
        for bad in [
            &b"Z"[..],
            b"K\x01",
            b"I\xff\xff\xff\xff\xff\xff\xff\xff",
            b"R R",
        ] {
            assert!(apply(&b"a 1\n"[..], bad, u64::MAX, true, |_| Ok(())).is_err());
        }
        // A script without `R` must cover the whole base.
        assert!(apply(
            &b"a 1\nb 2\n"[..],
            b"K\x01\0\0\0\0\0\0\0",
            u64::MAX,
            true,
            |_| Ok(())
        )
        .is_err());
        // A script that drops (or inserts) more than allowed is refused.
        assert!(apply(
            &b"a 1\nb 2\n"[..],
            b"D\x02\0\0\0\0\0\0\0R",
            4,
            true,
            |_| Ok(())
        )
        .is_err());
        assert!(apply(
            &b""[..],
            b"I\x05\0\0\0\0\0\0\0x y\n\nR",
            4,
            true,
            |_| Ok(())
        )
        .is_err());
    }
}
