//! `txmapd`: the participant daemon run on every Postfix node.
//!
//! It only parses arguments, sets up logging and calls [`server::run`]; everything else is in
//! the modules so that tests can reason about them.

mod converge;
mod decide;
mod hook;
mod notify;
mod prepare;
mod resolve;
mod serve;
mod server;

use clap::Parser;
use std::process::ExitCode;

fn main() -> ExitCode {
    let args = txmap_coordinator::cli::TxmapdArgs::parse();
    txmap_coordinator::init_process("info");
    let _failpoints = fail::FailScenario::setup();
    let path = txmap_common::config::Config::resolve_path(args.config.as_deref());
    let cfg = match txmap_common::config::Config::load(&path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("txmapd: {e}");
            return ExitCode::from(txmap_common::exit::USAGE);
        }
    };
    if let Err(e) = check_dirs(&cfg) {
        eprintln!("txmapd: refusing to start: {e}");
        return ExitCode::from(txmap_common::exit::USAGE);
    }
    if let Some(w) = prepare_state_dirs(&cfg.state_dir) {
        tracing::warn!("{w}");
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("txmapd: cannot start the runtime: {e}");
            return ExitCode::from(txmap_common::exit::LOCAL);
        }
    };
    match rt.block_on(server::run(cfg, shutdown_signal())) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("txmapd: {e:#}");
            ExitCode::from(txmap_common::exit::LOCAL)
        }
    }
}

/// Every directory txmapd writes in (each table's, the state directory, the hook socket's) must
/// be changeable only by its owner (root or txmapd's user): otherwise another user could plant
/// links or swap files there.
fn check_dirs(cfg: &txmap_common::config::Config) -> Result<(), String> {
    let mut dirs: Vec<&std::path::Path> = cfg.tables.iter().map(|t| t.dir()).collect();
    dirs.push(&cfg.state_dir);
    if let Some(p) = cfg.hook.socket.parent() {
        dirs.push(p);
    }
    for d in dirs {
        txmap_common::table::check_dir_safe(d)?;
    }
    Ok(())
}

/// The state subdirectories that `txmap` (the admin CLI and the coordinator library) creates
/// when it first needs them. Created here first, so that they belong to txmapd's user: a
/// `txmap commit` run by root on a node whose txmapd runs as a dedicated user would otherwise
/// create them as root, and txmapd could then record no decision and no pending work (every
/// hook request failing with exit 6). Returns a warning naming what already belongs to
/// another user than the state directory's owner (txmapd may be unable to write it).
fn prepare_state_dirs(state_dir: &std::path::Path) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    for sub in ["decisions", "pending"] {
        let _ = txmap_common::table::create_dir_durable(&state_dir.join(sub), 0o700);
    }
    let owner = std::fs::metadata(state_dir).ok()?.uid();
    let mut foreign = Vec::new();
    let mut look = |p: std::path::PathBuf| {
        if std::fs::symlink_metadata(&p).is_ok_and(|m| m.uid() != owner) {
            foreign.push(p);
        }
    };
    for e in std::fs::read_dir(state_dir).ok()?.flatten() {
        look(e.path());
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            for f in std::fs::read_dir(e.path()).into_iter().flatten().flatten() {
                look(f.path());
            }
        }
    }
    let first = foreign.first()?;
    Some(format!(
        "{} entr{} in the state directory belong to another user than its owner (uid {owner}), \
         e.g. {}: txmapd may be unable to update them; run `txmap` as txmapd's user, and fix \
         with `chown -R` to that user on {}",
        foreign.len(),
        if foreign.len() == 1 { "y" } else { "ies" },
        first.display(),
        state_dir.display()
    ))
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::hangup()),
    ) {
        (Ok(mut term), Ok(mut hup)) => loop {
            tokio::select! {
                _ = term.recv() => return,
                _ = tokio::signal::ctrl_c() => return,
                _ = hup.recv() => {
                    notify::reloading();
                    tracing::warn!(
                        "SIGHUP ignored: txmapd does not reload its config; restart it to apply changes"
                    );
                    notify::ready("serving (configuration unchanged)");
                }
            }
        },
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
