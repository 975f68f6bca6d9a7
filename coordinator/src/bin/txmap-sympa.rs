//! `txmap-sympa`: the program to set as Sympa's `aliases_program`.
//!
//! Sympa runs it with exactly one argument, the path of the table it just rewrote (`type:path`
//! is accepted too, as `postmap` does), as user `sympa`, with the environment cleared to
//! `PATH=/bin:/usr/bin`, while holding its own lock on that table. It:
//!
//! 1. reads the node's config (`/etc/txmap/txmap.toml`, or `TXMAP_CONFIG` when set) and finds
//!    the table whose `source` is that path;
//! 2. drops a request file in `<state_dir>/requests/` (so that a request made while `txmapd` is
//!    down is not lost: the daemon adopts it when it starts);
//! 3. asks the local `txmapd` over its Unix socket to distribute that table, and waits for the
//!    outcome (at most `timeouts.total` + 1 s; the commit itself is bounded by `timeouts.total`).
//!
//! The hook needs no key and no root: the socket's group and mode decide who may ask, and the
//! daemon reads the content from the configured source itself, so the hook can name a
//! configured table but never supply content. Exit codes are `txmap`'s.

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;
use txmap_common::config::{Config, HookSettings};
use txmap_common::exit;
use txmap_common::proto::{LocalRequest, LocalResponse};

fn main() -> ExitCode {
    ExitCode::from(run())
}

fn run() -> u8 {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() != 1 || args[0].starts_with('-') {
        eprintln!(
            "usage: txmap-sympa TABLE_PATH   (or TYPE:TABLE_PATH; as Sympa's aliases_program)"
        );
        return exit::USAGE;
    }
    let arg = args[0].as_str();
    // `hash:/etc/sympa/sympa_transport` → `/etc/sympa/sympa_transport`.
    let path = match arg.split_once(':') {
        Some((ty, rest)) if !ty.contains('/') && rest.starts_with('/') => rest,
        _ => arg,
    };
    let cfg_path = Config::resolve_path(None);
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
    let queued = HookSettings::requests_dir(&cfg.state_dir).join(&table.name);
    if let Err(e) = std::fs::write(&queued, b"") {
        eprintln!(
            "txmap-sympa: warning: cannot queue the request in {}: {e}",
            queued.display()
        );
    }
    match ask(&cfg, path) {
        Ok(LocalResponse::Done { table, exit, lines }) => {
            for l in &lines {
                eprintln!("txmap-sympa: {table}: {l}");
            }
            if exit != exit::OK {
                eprintln!("txmap-sympa: {table}: not distributed everywhere (exit {exit}); txmapd retries it until it is");
            }
            exit
        }
        Ok(LocalResponse::Refused { detail }) => {
            eprintln!("txmap-sympa: refused: {detail}");
            exit::USAGE
        }
        Err(e) => {
            eprintln!(
                "txmap-sympa: txmapd not reachable at {}: {e}; the request stays queued in {} and is distributed when txmapd runs",
                cfg.hook.socket.display(),
                queued.display()
            );
            exit::LOCAL
        }
    }
}

fn ask(cfg: &Config, path: &str) -> std::io::Result<LocalResponse> {
    let mut s = UnixStream::connect(&cfg.hook.socket)?;
    // The commit is bounded by `total`, plus `commit` to collect acknowledgements once decided.
    let wait = cfg.timeouts.total + cfg.timeouts.commit + Duration::from_secs(1);
    s.set_read_timeout(Some(wait))?;
    s.set_write_timeout(Some(Duration::from_secs(2)))?;
    let frame = txmap_common::codec::encode(&LocalRequest::Distribute {
        source: path.to_string(),
    })
    .map_err(std::io::Error::other)?;
    s.write_all(&frame)?;
    txmap_common::codec::read_frame_blocking(&mut s).map_err(std::io::Error::other)
}
