//! The hook's request queue, `<state_dir>/requests/`: what `txmap-sympa` leaves there so that a
//! change Sympa made is never lost, whatever happens to `txmapd` meanwhile.
//!
//! - `<table>@<order>`: one file per request (the content Sympa wrote, after
//!   [`crate::proto::QUEUED_REQUEST_MAGIC`]), created by the hook with its caller's rights,
//!   never replaced: the hook links it in under a new name, so no request's file is ever
//!   written over or removed by another request. Mode 0640, group the directory's (the hook
//!   socket's group, of which `txmapd`'s user is a member): `txmapd` can read it whatever user
//!   it runs as.
//! - `<table>@seen`: written by `txmapd` only (its owner is the directory's owner, which both
//!   sides check): every request of `table` up to this order is served or durably pending on
//!   this node. `txmapd` writes it before it removes the files it covers, so a file left behind
//!   by a failed removal or a crash is recognized as old and never distributed again.
//!
//! **Order without clocks.** The hook numbers its request one above every order it can see
//! (the files present and `<table>@seen`), so a request's order is above that of every request
//! made before it (Sympa runs its hook for a table one call at a time). Of the files waiting,
//! only the highest order is distributed: it holds the newest content of the source, which
//! supersedes the others.

use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// The name of request `order` of `table`.
pub fn file_name(table: &str, order: u64) -> String {
    format!("{table}@{order}")
}

/// The name of `table`'s high-water mark.
pub fn seen_name(table: &str) -> String {
    format!("{table}@seen")
}

/// `(table, order)` of a request file's name; a name without `@` is a request queued by an
/// older `txmap-sympa` (`requests/<table>`, order 0). Hidden names (temporaries) are not.
pub fn parse(name: &str) -> Option<(&str, u64)> {
    if name.starts_with('.') {
        return None;
    }
    match name.rsplit_once('@') {
        Some((table, n)) if !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) => {
            Some((table, n.parse().ok()?))
        }
        Some(_) => None,
        None => Some((name, 0)),
    }
}

/// One entry of the queue for a table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Queued {
    /// Its order.
    pub order: u64,
    /// Its path.
    pub path: PathBuf,
    /// A regular file (anything else was planted: a link, a directory, a FIFO).
    pub regular: bool,
}

/// The entries of `table` in the queue directory `dir`, lowest order first (types read with
/// `lstat`: nothing is followed).
pub fn queued(dir: &Path, table: &str) -> Vec<Queued> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut v: Vec<Queued> = rd
        .flatten()
        .filter_map(|e| {
            let name = e.file_name();
            let (t, order) = parse(name.to_str()?)?;
            (t == table).then(|| Queued {
                order,
                path: e.path(),
                regular: e.file_type().is_ok_and(|t| t.is_file()),
            })
        })
        .collect();
    v.sort_by_key(|q| q.order);
    v
}

/// What to do with the queue of one table that no running request covers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// Entries to remove: requests at or below the mark (served or pending already), and
    /// anything that is not a regular file (planted).
    pub remove: Vec<Queued>,
    /// The newest request above the mark: it holds the newest content of the source and
    /// supersedes the others, which go once it is adopted ([`after_cover`]).
    pub adopt: Option<Queued>,
}

/// The plan for a table's queue (`queued` as [`queued`] lists it) under the mark `seen`.
pub fn plan(queued: &[Queued], seen: Option<u64>) -> Plan {
    let mut p = Plan::default();
    for q in queued {
        if !q.regular || seen.is_some_and(|s| q.order <= s) {
            p.remove.push(q.clone());
        } else if p.adopt.as_ref().is_none_or(|a| q.order > a.order) {
            p.adopt = Some(q.clone());
        }
    }
    p
}

/// The requests to remove once every request up to `order` is served or durably pending:
/// those below it, and the one at it only when the mark was `published` (otherwise it stays,
/// so that the hook's next order stays above `order`).
pub fn after_cover(queued: &[Queued], order: u64, published: bool) -> Vec<Queued> {
    queued
        .iter()
        .filter(|q| q.order < order || (q.order == order && published))
        .cloned()
        .collect()
}

/// The order a new request takes, one above every order visible: the files there and the mark.
pub fn order_after(queued: &[Queued], seen: Option<u64>) -> Option<u64> {
    queued
        .iter()
        .map(|q| q.order)
        .fold(seen.unwrap_or(0), u64::max)
        .checked_add(1)
}

/// The high-water mark of `table` in `dir`, when `<table>@seen` is a regular file owned by
/// `owner` (the queue directory's owner, `txmapd`'s user): anything else there was planted
/// and is ignored.
pub fn read_seen(dir: &Path, table: &str, owner: u32) -> Option<u64> {
    let (f, _) = crate::table::open_untrusted(&dir.join(seen_name(table)), 64).ok()?;
    if f.metadata().ok()?.uid() != owner {
        return None;
    }
    let mut s = String::new();
    f.take(64).read_to_string(&mut s).ok()?;
    s.trim().parse().ok()
}

/// The order a new request of `table` takes: one above every order visible in `dir`.
pub fn next_order(dir: &Path, table: &str) -> std::io::Result<u64> {
    let owner = std::fs::metadata(dir)?.uid();
    let seen = read_seen(dir, table, owner).unwrap_or(0);
    let top = queued(dir, table)
        .iter()
        .map(|q| q.order)
        .fold(seen, u64::max);
    top.checked_add(1)
        .ok_or_else(|| std::io::Error::other(format!("{table}: request order exhausted")))
}

/// Writes `<table>@seen` = `order` (a fresh file renamed over the old one, fsynced with the
/// directory), owned by the directory's owner (given to it when root writes it). Fails when something planted at that name cannot be
/// replaced (a directory).
pub fn publish_seen(dir: &Path, table: &str, order: u64) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::PermissionsExt;
    let tmp = dir.join(format!(
        ".{}.{}",
        seen_name(table),
        crate::proto::TxId::random()
    ));
    let r = (|| {
        let mut f = crate::table::create_private(&tmp)?;
        crate::table::adopt_owner(&f, dir)?;
        f.set_permissions(std::fs::Permissions::from_mode(0o644))?;
        writeln!(f, "{order}")?;
        f.sync_all()?;
        std::fs::rename(&tmp, dir.join(seen_name(table)))?;
        std::fs::File::open(dir)?.sync_all()
    })();
    if r.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_back_and_temporaries_are_not_requests() {
        assert_eq!(
            parse(&file_name("sympa_transport", 42)),
            Some(("sympa_transport", 42))
        );
        assert_eq!(parse("a.b@7"), Some(("a.b", 7)));
        assert_eq!(parse("sympa_aliases"), Some(("sympa_aliases", 0)));
        assert_eq!(parse(&seen_name("t")), None);
        assert_eq!(parse(".t.1234"), None);
        assert_eq!(parse("t@"), None);
        assert_eq!(parse("t@99999999999999999999999"), None, "past u64");
    }

    #[test]
    fn the_plan_adopts_the_newest_request_above_the_mark_and_removes_the_rest() {
        let q = |order, regular| Queued {
            order,
            path: PathBuf::from(format!("t@{order}")),
            regular,
        };
        let all = [q(2, true), q(5, true), q(7, false), q(9, true), q(4, true)];
        let p = plan(&all, Some(4));
        assert_eq!(p.adopt, Some(q(9, true)));
        let gone: Vec<u64> = p.remove.iter().map(|q| q.order).collect();
        assert_eq!(
            gone,
            vec![2, 7, 4],
            "at or below the mark, and the planted entry"
        );
        assert_eq!(plan(&all, None).adopt, Some(q(9, true)));
        assert_eq!(plan(&all, Some(9)).adopt, None);
        // A legacy request (order 0) is adopted only while no mark exists.
        assert_eq!(plan(&[q(0, true)], None).adopt, Some(q(0, true)));
        assert_eq!(plan(&[q(0, true)], Some(0)).adopt, None);
        let gone = |published| -> Vec<u64> {
            after_cover(&all, 5, published)
                .iter()
                .map(|q| q.order)
                .collect()
        };
        assert_eq!(gone(true), vec![2, 5, 4]);
        assert_eq!(
            gone(false),
            vec![2, 4],
            "the newest covered stays as the order's marker"
        );
        assert_eq!(order_after(&all, Some(3)), Some(10));
        assert_eq!(order_after(&[], Some(u64::MAX)), None);
    }

    #[test]
    fn a_new_order_is_above_every_file_and_the_published_mark() {
        let dir = std::env::temp_dir().join(format!("txmap-req-{}", crate::proto::TxId::random()));
        std::fs::create_dir_all(&dir).unwrap();
        assert_eq!(next_order(&dir, "t").unwrap(), 1);
        std::fs::write(dir.join(file_name("t", 3)), b"x").unwrap();
        std::fs::write(dir.join(file_name("u", 9)), b"x").unwrap();
        assert_eq!(next_order(&dir, "t").unwrap(), 4);
        publish_seen(&dir, "t", 7).unwrap();
        assert_eq!(next_order(&dir, "t").unwrap(), 8);
        let q = queued(&dir, "t");
        assert_eq!(q.len(), 1);
        assert!(q[0].regular && q[0].order == 3);
        // A planted mark (not a regular file) is ignored, never followed.
        publish_seen(&dir, "v", 5).unwrap();
        std::fs::remove_file(dir.join(seen_name("v"))).unwrap();
        std::os::unix::fs::symlink(dir.join(seen_name("t")), dir.join(seen_name("v"))).unwrap();
        assert_eq!(next_order(&dir, "v").unwrap(), 1);
        let _ = std::fs::remove_dir_all(dir);
    }
}
