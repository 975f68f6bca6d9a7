//! `txmapd`: the participant daemon run on every Postfix node.
//!
//! It only parses arguments, sets up logging and calls [`server::run`]; everything else is in
//! the modules so that tests can reason about them.

mod converge;
mod decide;
mod hook;
mod prepare;
mod resolve;
mod serve;
mod server;

use clap::Parser;
use std::path::PathBuf;
use std::process::ExitCode;

/// txmap participant daemon: stages, builds, verifies and installs Postfix tables on this node
/// when the coordinator says so.
#[derive(Debug, Parser)]
#[command(name = "txmapd", version)]
struct Args {
    /// Config file [default: $TXMAP_CONFIG, else /etc/txmap/txmap.toml].
    #[arg(long, short)]
    config: Option<PathBuf>,
}

fn main() -> ExitCode {
    let args = Args::parse();
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
                _ = hup.recv() => tracing::warn!(
                    "SIGHUP ignored: txmapd does not reload its config; restart it to apply changes"
                ),
            }
        },
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
