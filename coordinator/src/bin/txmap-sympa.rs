//! `txmap-sympa`: the program to set as Sympa's `aliases_program`.
//!
//! Sympa runs it with exactly one argument, the path of the table it just rewrote (`type:path`
//! is accepted too, as `postmap` does), as user `sympa`, with the environment cleared to
//! `PATH=/bin:/usr/bin`, while holding its own lock on that table. It:
//!
//! 1. reads the node's config (`--config PATH`, else `TXMAP_CONFIG`, else
//!    `/etc/txmap/txmap.toml`) and finds the table whose `source` is that path;
//! 2. opens that file **itself, with its caller's rights**, never through a symbolic link
//!    (`O_NOFOLLOW`) and without blocking (`O_NONBLOCK`), and reads it only if it is a regular
//!    file with one link and at most `max_table_bytes` bytes (anything else: exit 2);
//! 3. queues the content as a request of its own, `<state_dir>/requests/<table>@<order>` (see
//!    `txmap_common::requests`: a new file created with `O_EXCL`, group-readable by the
//!    directory's group, then linked in under a name no other request has), so that a request
//!    made while `txmapd` is down, or while it dies, is not lost: the daemon distributes the
//!    newest one it finds;
//! 4. sends the content, with its order, to the local `txmapd` over its Unix socket and waits
//!    for the outcome (at most `timeouts.total` + `timeouts.commit` + 1 s).
//!
//! The hook needs no key and no root: the socket's group and mode decide who may ask, and
//! `txmapd` never opens the user's file, so the hook can change its table's content and
//! nothing else. Exit codes are `txmap`'s.

use std::ffi::OsString;
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;
use txmap_common::config::{Config, HookSettings, TableConfig};
use txmap_common::exit;
use txmap_common::proto::{LocalRequest, LocalResponse, TxId, QUEUED_REQUEST_MAGIC};

const USAGE: &str = "usage: txmap-sympa [--config PATH] TABLE_PATH   (or TYPE:TABLE_PATH; as Sympa's aliases_program)";

fn main() -> ExitCode {
    ExitCode::from(run())
}

/// `--config PATH` (or `--config=PATH`) and exactly one table path, all valid UTF-8.
fn parse_args(args: Vec<OsString>) -> Result<(Option<PathBuf>, String), String> {
    let mut config = None;
    let mut rest = Vec::new();
    let mut it = args.into_iter();
    while let Some(a) = it.next() {
        if a == "--config" || a == "-c" {
            let Some(p) = it.next() else {
                return Err("--config needs a PATH".into());
            };
            config = Some(PathBuf::from(p));
            continue;
        }
        let s = a.into_string().map_err(|a| {
            format!(
                "argument {} is not valid UTF-8; no configured table has such a source",
                a.to_string_lossy()
            )
        })?;
        if let Some(p) = s.strip_prefix("--config=") {
            config = Some(PathBuf::from(p));
        } else if s.starts_with('-') {
            return Err(format!("unknown option {s}"));
        } else {
            rest.push(s);
        }
    }
    match <[String; 1]>::try_from(rest) {
        Ok([path]) => Ok((config, path)),
        Err(_) => Err("exactly one TABLE_PATH is needed".into()),
    }
}

fn run() -> u8 {
    let (config, arg) = match parse_args(std::env::args_os().skip(1).collect()) {
        Ok(x) => x,
        Err(e) => {
            eprintln!("txmap-sympa: {e}\n{USAGE}");
            return exit::USAGE;
        }
    };
    // `hash:/etc/sympa/sympa_transport` → `/etc/sympa/sympa_transport`.
    let path = match arg.split_once(':') {
        Some((ty, rest)) if !ty.contains('/') && rest.starts_with('/') => rest,
        _ => arg.as_str(),
    };
    let cfg_path = Config::resolve_path(config.as_deref());
    let cfg = match Config::load(&cfg_path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("txmap-sympa: {e}");
            return exit::USAGE;
        }
    };
    let Some(table) = cfg.table_by_source(Path::new(path)) else {
        let sources: Vec<String> = cfg
            .tables
            .iter()
            .filter_map(|t| {
                t.source
                    .as_ref()
                    .map(|s| format!("{} ({})", s.display(), t.name))
            })
            .collect();
        eprintln!(
            "txmap-sympa: no table in {} has source {path} (configured sources: {})",
            cfg.file.display(),
            sources.join(", ")
        );
        return exit::USAGE;
    };
    // Read with this process's rights only, never through a link, never from a FIFO or a
    // device: the daemon gets bytes, not a path.
    let content = match txmap_common::table::open_untrusted(Path::new(path), cfg.max_table_bytes)
        .and_then(|(f, _)| txmap_common::table::read_bounded(f, cfg.max_table_bytes))
    {
        Ok(c) => c,
        Err(e) => {
            eprintln!(
                "txmap-sympa: {}: source refused: {e}; nothing was distributed",
                table.name
            );
            return exit::USAGE;
        }
    };
    let dir = HookSettings::requests_dir(&cfg.state_dir);
    let order = match queue(&cfg, table, &content) {
        Ok(o) => Some(o),
        Err(e) => {
            eprintln!(
                "txmap-sympa: warning: cannot queue the request in {}: {e}",
                dir.display()
            );
            None
        }
    };
    match ask(&cfg, table, path, &content, order) {
        Ok(LocalResponse::Done { table, exit, lines }) => {
            for l in &lines {
                eprintln!("txmap-sympa: {table}: {l}");
            }
            if let Some(next) = what_next(exit) {
                eprintln!("txmap-sympa: {table}: {next}");
            }
            exit
        }
        Ok(LocalResponse::Refused { detail }) => {
            eprintln!("txmap-sympa: refused: {detail}");
            exit::USAGE
        }
        Err(e) => {
            let kept = match order {
                Some(o) => format!(
                    "the request stays queued as {} and is distributed when txmapd runs",
                    dir.join(txmap_common::requests::file_name(&table.name, o))
                        .display()
                ),
                None => {
                    "the request could not be queued either: run the hook again once txmapd runs"
                        .to_string()
                }
            };
            eprintln!(
                "txmap-sympa: txmapd not reachable at {}: {e}; {kept}",
                cfg.hook.socket.display(),
            );
            exit::LOCAL
        }
    }
}

/// What happens to a change after a commit that ended with `exit` (`None`: nothing to add).
fn what_next(exit: u8) -> Option<&'static str> {
    match exit {
        exit::OK => None,
        exit::USAGE => Some("refused by the content guard (exit 2): held, not distributed; `txmap pending` shows it, `txmap commit TABLE --force` distributes it, a later change of the source replaces it"),
        exit::INCOMPLETE => Some("decided (exit 3): the nodes that have not installed it yet get it from txmapd, on its own"),
        exit::LOCAL => Some("not distributed (exit 6): txmapd could not take the change on (see its log); the request stays queued and is retried"),
        e => Some(match e {
            exit::BUSY => "not distributed yet (exit 4: busy): pending; txmapd retries it until every in-service node serves it or a later change of this source",
            _ => "not distributed everywhere: pending; txmapd retries it until every in-service node serves it or a later change of this source",
        }),
    }
}

/// Queues the request as `requests/<table>@<order>`: written to a new file under a temporary
/// name (`O_EXCL`, never through a link), group-readable by the directory's group (so that
/// `txmapd`, a member, can read it as whatever user it runs as), fsynced, then hard-linked in
/// under its order, which fails rather than replace anything (another request that took the
/// same order makes it take the next one). The directory is fsynced: a request reported
/// queued survives a power cut. Returns its order.
fn queue(cfg: &Config, table: &TableConfig, content: &[u8]) -> std::io::Result<u64> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    use txmap_common::requests;
    let dir = HookSettings::requests_dir(&cfg.state_dir);
    let tmp = dir.join(format!(".{}.{}", table.name, TxId::random()));
    let r = (|| {
        let gid = std::fs::metadata(&dir)?.gid();
        let mut f = txmap_common::table::create_private(&tmp)?;
        // As a member of the directory's group (the setgid directory gives it anyway).
        let _ = std::os::unix::fs::fchown(&f, None, Some(gid));
        f.set_permissions(std::fs::Permissions::from_mode(0o640))?;
        f.write_all(QUEUED_REQUEST_MAGIC)?;
        f.write_all(content)?;
        f.sync_all()?;
        let mut order = requests::next_order(&dir, &table.name)?;
        for _ in 0..64 {
            match std::fs::hard_link(&tmp, dir.join(requests::file_name(&table.name, order))) {
                Ok(()) => {
                    std::fs::remove_file(&tmp)?;
                    std::fs::File::open(&dir)?.sync_all()?;
                    return Ok(order);
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    order = order.checked_add(1).ok_or(e)?;
                }
                Err(e) => return Err(e),
            }
        }
        Err(std::io::Error::other("no free request name"))
    })();
    if r.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    r
}

fn ask(
    cfg: &Config,
    table: &TableConfig,
    path: &str,
    content: &[u8],
    queued: Option<u64>,
) -> std::io::Result<LocalResponse> {
    let mut s = UnixStream::connect(&cfg.hook.socket)?;
    // The commit is bounded by `total`, plus `commit` to collect acknowledgements once decided.
    let wait = cfg.timeouts.total + cfg.timeouts.commit + Duration::from_secs(1);
    s.set_read_timeout(Some(wait))?;
    s.set_write_timeout(Some(Duration::from_secs(5)))?;
    let frame = txmap_common::codec::encode(&LocalRequest::Distribute {
        table: table.name.clone(),
        source: path.to_string(),
        len: content.len() as u64,
        queued,
    })
    .map_err(std::io::Error::other)?;
    s.write_all(&frame)?;
    s.write_all(content)?;
    txmap_common::codec::read_frame_blocking(&mut s).map_err(std::io::Error::other)
}
