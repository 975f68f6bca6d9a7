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
//! - [`logging`]: log output: stderr, the journal (priority prefixes) or syslog (facility mail).
//! - [`redrive`]: finishing decisions a dead coordinator left behind.
//! - [`recover`]: `txmap recover`, listing and resolving in-doubt transactions by hand.
//! - [`sandbox`]: `txmap sandbox`, a ready local cluster.

pub mod check;
pub mod cli;
pub mod cluster;
pub mod commit;
pub mod diff;
pub mod history;
pub mod logging;
pub mod recover;
pub mod redrive;
pub mod sandbox;

/// Process set-up shared by `txmap` and `txmapd`: logs filtered by `TXMAP_LOG` (default
/// `default_log`) to stderr, to the journal (priority prefixes, no timestamps) or to syslog
/// (`TXMAP_LOG_SYSLOG`), as [`logging`] describes; and crash-only panics: a panic anywhere (a
/// `panic` failpoint included) aborts the whole process, and journal-driven recovery takes over.
pub fn init_process(default_log: &str) {
    let filter = || {
        tracing_subscriber::EnvFilter::try_from_env("TXMAP_LOG")
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_log))
    };
    let (target, warning) = logging::from_env();
    let ident = std::env::args_os()
        .next()
        .and_then(|a| {
            std::path::Path::new(&a)
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
        })
        .unwrap_or_else(|| "txmap".into());
    match target {
        logging::Target::Stderr { ansi } => tracing_subscriber::fmt()
            .with_env_filter(filter())
            .with_writer(std::io::stderr)
            .with_ansi(ansi)
            .init(),
        logging::Target::Journal => tracing_subscriber::fmt()
            .with_env_filter(filter())
            .with_writer(logging::Sink::journal())
            .with_ansi(false)
            .without_time()
            .with_level(false)
            .init(),
        logging::Target::Syslog { socket, facility } => tracing_subscriber::fmt()
            .with_env_filter(filter())
            .with_writer(logging::Sink::syslog(socket, facility, &ident))
            .with_ansi(false)
            .without_time()
            .with_level(false)
            .init(),
    }
    if let Some(w) = warning {
        tracing::warn!("{w}");
    }
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        default_hook(info);
        std::process::abort();
    }));
}
