//! `chaos`: runs txmap under faults drawn from a seed and checks every guarantee.
//!
//! ```text
//! chaos run --nodes 3 --transactions 200 --seed 42 [--profile ci] [--out-of-service 1] [--broken 2] [--defect NAME] [--verbose] [--keep]
//! chaos schedule --seed 42 [--profile ci] [--nodes 3] [--transactions 200]
//! chaos profiles
//! ```
//! Exit status: 0 no violation; 1 violations (the seed and the schedule are printed); 2 the
//! run itself could not be carried out.

use clap::{Parser, Subcommand};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use txmap_chaos_tests::chaos::schedule::{profile, profiles, Schedule};
use txmap_chaos_tests::chaos::{run, Options};

#[derive(Debug, Parser)]
#[command(
    name = "chaos",
    about = "Fault injection and invariant checking for txmap"
)]
struct Args {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Run a schedule on a fresh sandbox cluster and check every invariant.
    Run {
        /// Nodes [default: the profile's].
        #[arg(long)]
        nodes: Option<usize>,
        /// Transactions (steps) [default: the profile's].
        #[arg(long)]
        transactions: Option<usize>,
        /// Seed [default: from the clock; printed].
        #[arg(long)]
        seed: Option<u64>,
        /// Profile (see `chaos profiles`).
        #[arg(long, default_value = "ci")]
        profile: String,
        /// Run this node's txmapd as the deliberately broken participant
        /// (TXMAP_CHAOS_BROKEN=rename-before-durable): the run must then report violations.
        #[arg(long)]
        broken: Option<usize>,
        /// Extra nodes configured `in_service = false`, running and reachable [default: the
        /// profile's].
        #[arg(long)]
        out_of_service: Option<usize>,
        /// Switch a test-only defect on in every txmapd and txmap (TXMAP_DEFECTS, e.g.
        /// `install-skips-dir-fsync` with `--profile power`): the run must then report
        /// violations.
        #[arg(long)]
        defect: Option<String>,
        /// Keep the sandbox directory (logs, journals) after the run.
        #[arg(long)]
        keep: bool,
        /// Print every step as it runs.
        #[arg(long, short)]
        verbose: bool,
    },
    /// Print the schedule a seed gives, without running it.
    Schedule {
        /// Nodes [default: the profile's].
        #[arg(long)]
        nodes: Option<usize>,
        /// Transactions [default: the profile's].
        #[arg(long)]
        transactions: Option<usize>,
        /// Seed.
        #[arg(long)]
        seed: u64,
        /// Profile.
        #[arg(long, default_value = "ci")]
        profile: String,
        /// Extra nodes configured `in_service = false`, running and reachable [default: the
        /// profile's].
        #[arg(long)]
        out_of_service: Option<usize>,
    },
    /// List the profiles.
    Profiles,
}

/// A flag set by SIGINT or SIGTERM: the run stops between two steps and cleans up (kills its
/// daemons, unmounts its tmpfs) instead of leaving them behind.
fn stop_on_signal() -> Arc<AtomicBool> {
    let flag = Arc::new(AtomicBool::new(false));
    let f = flag.clone();
    let _ = std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async {
                use tokio::signal::unix::{signal, SignalKind};
                let (Ok(mut int), Ok(mut term)) = (
                    signal(SignalKind::interrupt()),
                    signal(SignalKind::terminate()),
                ) else {
                    return;
                };
                tokio::select! {
                    _ = int.recv() => {}
                    _ = term.recv() => {}
                }
                eprintln!("chaos: stopping after the current step (signal)");
                f.store(true, Ordering::SeqCst);
            });
        });
    flag
}

/// Under `cargo run`, builds the `lossyfs` helper beside this binary (cargo builds only the
/// binary it runs), so that a power run never uses a stale or missing helper.
fn build_lossyfs() {
    let Some(cargo) = std::env::var_os("CARGO") else {
        return;
    };
    let release = std::env::current_exe()
        .map(|p| p.components().any(|c| c.as_os_str() == "release"))
        .unwrap_or(false);
    let mut cmd = std::process::Command::new(cargo);
    cmd.args([
        "build",
        "--quiet",
        "-p",
        "txmap-chaos-tests",
        "--bin",
        "lossyfs",
    ]);
    if release {
        cmd.arg("--release");
    }
    if !cmd.status().is_ok_and(|s| s.success()) {
        eprintln!("chaos: building the lossyfs helper failed");
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    match args.cmd {
        Cmd::Profiles => {
            for p in profiles() {
                println!(
                    "{:<8} {} nodes, {} transactions: {}",
                    p.name, p.nodes, p.transactions, p.about
                );
            }
            ExitCode::SUCCESS
        }
        Cmd::Schedule {
            nodes,
            transactions,
            seed,
            profile: name,
            out_of_service,
        } => {
            let Some(mut p) = profile(&name) else {
                eprintln!("chaos: unknown profile `{name}` (see `chaos profiles`)");
                return ExitCode::from(2);
            };
            p.out_of_service = out_of_service.unwrap_or(p.out_of_service);
            let s = Schedule::draw(
                seed,
                &p,
                nodes.unwrap_or(p.nodes),
                transactions.unwrap_or(p.transactions),
                txmap_chaos_tests::cluster::is_root(),
            );
            print!("{s}");
            println!("fingerprint {}", s.fingerprint());
            ExitCode::SUCCESS
        }
        Cmd::Run {
            nodes,
            transactions,
            seed,
            profile: name,
            broken,
            out_of_service,
            defect,
            keep,
            verbose,
        } => {
            if let Some(d) = &defect {
                if txmap_common::defects::Defect::parse(d).is_none() {
                    eprintln!("chaos: unknown defect `{d}`");
                    return ExitCode::from(2);
                }
            }
            let Some(mut p) = profile(&name) else {
                eprintln!("chaos: unknown profile `{name}` (see `chaos profiles`)");
                return ExitCode::from(2);
            };
            p.out_of_service = out_of_service.unwrap_or(p.out_of_service);
            if keep {
                // Read by the harness's temporary directory when it is dropped.
                std::env::set_var("TXMAP_KEEP_TEST_DIRS", "1");
            }
            let seed = seed.unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos() as u64)
                    .unwrap_or(1)
            });
            let mut o = Options::new(p, seed);
            o.nodes = nodes.unwrap_or(o.nodes);
            o.transactions = transactions.unwrap_or(o.transactions);
            o.broken = broken;
            o.defects = defect;
            o.verbose = verbose;
            if o.profile.power {
                build_lossyfs();
            }
            o.stop = Some(stop_on_signal());
            eprintln!(
                "chaos: seed {seed} profile {} nodes {} transactions {}",
                o.profile.name, o.nodes, o.transactions
            );
            match run(&o) {
                Ok(report) => {
                    print!("{}", report.render());
                    if report.violations().is_empty() {
                        ExitCode::SUCCESS
                    } else {
                        ExitCode::from(1)
                    }
                }
                Err(e) => {
                    eprintln!("chaos: the run failed (seed {seed}): {e:#}");
                    ExitCode::from(2)
                }
            }
        }
    }
}
