//! The coordinator side of txmap, as a library: used by the `txmap` CLI and by `txmapd`, which
//! re-drives unfinished decisions and retries pending commits of its node.
//!
//! # Layout
//! - [`check`]: `txmap check`: the health summary `txmapd` serves on its probe socket, and
//!   its verdict as a Nagios/Icinga plugin line or Prometheus text.
//! - [`cli`]: the command-line definitions of `txmap` and `txmapd`.
//! - [`cluster`]: QUIC client endpoint, connections and one exchange per node with deadlines.
//! - [`commit`]: the two phases of one commit, with retry on conflicts, and pending tracking.
//! - [`diff`]: `txmap diff` and `commit --dry-run`: added, removed and changed keys.
//! - [`history`]: `txmap history`, `rollback` (a normal commit of an earlier generation) and
//!   `verify`.
//! - [`redrive`]: finishing decisions a dead coordinator left behind.
//! - [`recover`]: `txmap recover`, listing and resolving in-doubt transactions by hand.
//! - [`sandbox`]: `txmap sandbox`, a ready local cluster.

pub mod check;
pub mod cli;
pub mod cluster;
pub mod commit;
pub mod diff;
pub mod history;
pub mod recover;
pub mod redrive;
pub mod sandbox;

/// Process set-up shared by `txmap` and `txmapd`: logs to stderr filtered by `TXMAP_LOG`
/// (default `default_log`), colours only on a terminal and never with `NO_COLOR`; and
/// crash-only panics: a panic anywhere (a `panic` failpoint included) aborts the whole process,
/// and journal-driven recovery takes over.
pub fn init_process(default_log: &str) {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("TXMAP_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_log)),
        )
        .with_writer(std::io::stderr)
        .with_ansi(
            std::io::IsTerminal::is_terminal(&std::io::stderr())
                && std::env::var_os("NO_COLOR").is_none(),
        )
        .init();
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        default_hook(info);
        std::process::abort();
    }));
}
