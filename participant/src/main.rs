//! `txmapd`: the participant daemon run on every Postfix node.
//!
//! It only parses arguments, sets up logging and calls [`server::run`]; everything else is in
//! the modules so that tests can reason about them.

mod cleanup;
mod converge;
mod decide;
mod hook;
mod notify;
mod prepare;
mod probe;
mod reload;
mod resolve;
mod serve;
mod server;
mod spare;

use clap::Parser;
use std::process::ExitCode;

fn main() -> ExitCode {
    let args = txmap_coordinator::cli::TxmapdArgs::parse();
    txmap_coordinator::init_process("info");
    let _failpoints = fail::FailScenario::setup();
    let path = txmap_common::config::Config::resolve_path(args.config.as_deref());
    // The same checks as `txmap check-config`: txmapd refuses to start on any problem that
    // would make it misbehave (certificates, key mode, hook group, listen, directories...).
    let (cfg, problems) = txmap_common::config::Config::check(&path);
    let fatal: Vec<_> = problems.iter().filter(|p| p.fatal).cloned().collect();
    let Some(cfg) = cfg.filter(|_| fatal.is_empty()) else {
        eprintln!(
            "txmapd: refusing to start: {}",
            txmap_common::config::format_problems(&path, &fatal)
        );
        return ExitCode::from(txmap_common::exit::USAGE);
    };
    for p in problems.iter().filter(|p| !p.fatal) {
        tracing::warn!("{}: {}", path.display(), p.text);
    }
    if let Err(e) = check_dirs(&cfg) {
        eprintln!("txmapd: refusing to start: {e}");
        return ExitCode::from(txmap_common::exit::USAGE);
    }
    // One txmapd per state directory: a second one would steal the hook socket and race the
    // first on every journal. Held until the process exits.
    let _state_lock = match lock_state_dir(&cfg.state_dir) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("txmapd: refusing to start: {e}");
            return ExitCode::from(txmap_common::exit::LOCAL);
        }
    };
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
    let r = rt.block_on(async {
        let (reload_tx, reload_rx) = tokio::sync::mpsc::unbounded_channel();
        server::run(cfg, shutdown_signal(reload_tx), reload_rx).await
    });
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("txmapd: {e:#}");
            ExitCode::from(txmap_common::exit::LOCAL)
        }
    }
}

/// Takes `state_dir/txmapd.lock` (an exclusive `flock`, dropped by the kernel with the
/// process) and writes this process's id in it. Fails, naming the holder, when another txmapd
/// runs on the same state directory.
fn lock_state_dir(state_dir: &std::path::Path) -> Result<std::fs::File, String> {
    use std::io::{Read, Seek, Write};
    use std::os::unix::fs::OpenOptionsExt;
    // state_dir is changeable only by its owner (checked above): no link can be planted here.
    txmap_common::table::create_dir_durable(state_dir, 0o755)
        .map_err(|e| format!("cannot create state_dir {}: {e}", state_dir.display()))?;
    let path = state_dir.join("txmapd.lock");
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o644)
        .open(&path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    match fs4::FileExt::try_lock(&f) {
        Ok(()) => {}
        Err(fs4::TryLockError::WouldBlock) => {
            let mut pid = String::new();
            let _ = f.read_to_string(&mut pid);
            return Err(format!(
                "another txmapd (pid {}) already runs on state_dir {} (it holds {})",
                pid.trim(),
                state_dir.display(),
                path.display()
            ));
        }
        Err(fs4::TryLockError::Error(e)) => {
            return Err(format!("cannot lock {}: {e}", path.display()))
        }
    }
    let _ = f.set_len(0);
    let _ = f.rewind();
    let _ = writeln!(f, "{}", std::process::id());
    Ok(f)
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
        // The hook's requests belong to its callers (the `sympa` user) by design.
        if e.file_name() == "requests" {
            continue;
        }
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

/// Completes on SIGTERM or SIGINT; forwards each SIGHUP to `reload`.
async fn shutdown_signal(reload: tokio::sync::mpsc::UnboundedSender<()>) {
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
                    tracing::info!("SIGHUP: reloading the config");
                    let _ = reload.send(());
                    notify::ready("serving (configuration reloaded)");
                }
            }
        },
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
