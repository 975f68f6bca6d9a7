//! The command-line definitions of `txmap` and `txmapd`, in the library so that man pages and
//! shell completions can be generated from them (see `packaging/`).

use clap::{Parser, Subcommand};
use std::path::PathBuf;

pub const EXIT_CODES: &str = "\
Exit codes (stable; Sympa and scripts read them):
  0  done: every node committed (status/verify: every in-service node reachable, agreeing,
     nothing stuck)
  1  aborted: nothing changed anywhere; one line per node says why
  2  usage or configuration error (unknown table, bad config, no such generation, a no-op
     rollback); commit: content refused by the guard (more than guard_free_keys keys and
     more than max_shrink_percent of the live keys removed; held as pending; --force to
     commit it anyway); txmap-sympa: the source is missing or refused (nothing queued), or
     the change is held by the guard
  3  commit decided but not yet acknowledged by every node (it completes on its own)
  4  busy: other transactions held the table past the retry deadline; nothing changed
  5  status/verify/history/recover: some in-service node unreachable, disagreeing, or drifted
  6  local error (source unreadable, state directory, certificates); txmap-sympa: txmapd
     unreachable, the request is queued and distributed when txmapd runs
  7  recover: the requested resolution was refused (it would contradict a decision)
  8  status/verify: nodes agree but work is stuck (a pending change failed, a transaction
     in progress longer than total_ms + commit_ms, or prepared and undecided past in_doubt_ms)
`txmap check` uses the monitoring-plugin codes instead: 0 OK, 1 WARNING, 2 CRITICAL,
3 UNKNOWN.";

/// txmap: update a Postfix lookup table on every node of a cluster as one transaction.
#[derive(Debug, Parser)]
#[command(name = "txmap", version, after_help = EXIT_CODES)]
pub struct Cli {
    /// Config file [default: $TXMAP_CONFIG, else /etc/txmap/txmap.toml].
    #[arg(long, short, global = true)]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(Debug, Subcommand)]
pub enum Cmd {
    /// Distribute TABLE to every node as one two-phase transaction.
    Commit {
        /// Table name from the config.
        table: String,
        /// Read the new content from FILE instead of the table's configured `source`.
        #[arg(long)]
        source: Option<PathBuf>,
        /// Commit even a source that would remove more than `guard_free_keys` keys and more
        /// than `max_shrink_percent` of the live ones (refused and held otherwise, exit 2).
        #[arg(long)]
        force: bool,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
        /// Only say what would happen (the nodes asked, the guard applied); change nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Show what a commit of TABLE would change: added, removed and changed keys.
    Diff {
        /// Table name from the config.
        table: String,
        /// Compare FILE instead of the table's configured `source`.
        #[arg(long)]
        source: Option<PathBuf>,
        /// Show at most N lines of each kind.
        #[arg(long, default_value_t = 20)]
        lines: usize,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Monitoring probe (Nagios/Icinga plugin): asks the local txmapd, needs no key or root.
    /// Exit 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN.
    Check {
        /// Print Prometheus text (for node_exporter's textfile collector) instead; exit 0
        /// whenever it printed (txmap_up 0 when txmapd did not answer).
        #[arg(long)]
        prometheus: bool,
        /// The probe socket [default: `[probe] socket` of the config].
        #[arg(long)]
        socket: Option<PathBuf>,
        /// A certificate expiring within DAYS is a WARNING.
        #[arg(long, default_value_t = 30, value_name = "DAYS")]
        cert_warn_days: u64,
        /// A certificate expiring within DAYS is CRITICAL.
        #[arg(long, default_value_t = 7, value_name = "DAYS")]
        cert_crit_days: u64,
        /// A pending change failing for more than SECS is CRITICAL (a WARNING before).
        #[arg(long, default_value_t = 3600, value_name = "SECS")]
        pending_crit: u64,
        /// A table's configured source on this node that differs from what the in-service
        /// nodes serve, with nothing pending or running for it, for more than SECS is a
        /// WARNING (the catch-all for lost changes).
        #[arg(long, default_value_t = 60, value_name = "SECS")]
        source_grace: u64,
    },
    /// List the changes this node still has to distribute; cancel or retry one.
    Pending {
        #[command(subcommand)]
        cmd: Option<PendingCmd>,
        /// Print JSON (listing only).
        #[arg(long)]
        json: bool,
    },
    /// Show every node's generation, sha256 and transaction in progress.
    Status {
        /// Only this table.
        table: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show the generations of TABLE kept in history, and which nodes hold each.
    History {
        /// Table name.
        table: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Distribute an earlier generation of TABLE as a new generation (a normal transaction).
    Rollback {
        /// Table name.
        table: String,
        /// Generation to restore [default: the one before the live one].
        #[arg(long)]
        to: Option<u64>,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Check on every node that the live table matches its recorded generation.
    Verify {
        /// Only this table [default: every table].
        table: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Check the config file and report every problem with its key.
    CheckConfig,
    /// List transactions in doubt on every node, or resolve one by hand.
    Recover {
        /// Abort this transaction everywhere (refused if it was decided commit).
        #[arg(long, value_name = "TXID", conflicts_with = "commit")]
        abort: Option<String>,
        /// Commit this transaction everywhere (only when a commit decision exists).
        #[arg(long, value_name = "TXID")]
        commit: Option<String>,
        /// Print JSON (listing only).
        #[arg(long)]
        json: bool,
    },
    /// Make the cluster CA and node certificates.
    Cert {
        #[command(subcommand)]
        cmd: CertCmd,
    },
    /// Write a ready N-node cluster on 127.0.0.1 under DIR.
    Sandbox {
        /// Directory to create (must be new or empty).
        dir: PathBuf,
        /// Number of nodes.
        #[arg(long, default_value_t = 3)]
        nodes: usize,
        /// UDP port of node1; node i listens on base-port + i - 1.
        #[arg(long, default_value_t = 7401)]
        base_port: u16,
    },
}

#[derive(Debug, Subcommand)]
pub enum PendingCmd {
    /// Drop TABLE's pending change(s): txmapd stops retrying them (the cluster keeps what it
    /// serves).
    Cancel {
        /// Table name.
        table: String,
    },
    /// Retry TABLE's pending change(s) now, including one held because a node rejected its
    /// content.
    Retry {
        /// Table name.
        table: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum CertCmd {
    /// Create DIR/ca.pem and DIR/ca.key.
    InitCa {
        /// Directory for the CA.
        dir: PathBuf,
    },
    /// Issue NODE.pem and NODE.key signed by the CA.
    Issue {
        /// Node name (its DNS name in the certificate).
        node: String,
        /// CA directory.
        #[arg(long)]
        ca: PathBuf,
        /// Output directory [default: the current directory].
        #[arg(long, default_value = ".")]
        out: PathBuf,
    },
}

pub const TXMAPD_EXIT_CODES: &str = "\
Exit codes: 0 stopped by SIGTERM/SIGINT; 2 configuration problem (every one listed, as by
txmap check-config); 6 runtime error (another txmapd on the same state_dir, cannot listen,
corrupt journal, table lock held by another process). SIGHUP reloads the config.";

/// txmap participant daemon: stages, builds, verifies and installs Postfix tables on this node
/// when the coordinator says so.
#[derive(Debug, Parser)]
#[command(name = "txmapd", version, after_help = TXMAPD_EXIT_CODES)]
pub struct TxmapdArgs {
    /// Config file [default: $TXMAP_CONFIG, else /etc/txmap/txmap.toml].
    #[arg(long, short)]
    pub config: Option<PathBuf>,
}

/// Exit codes of `txmap-sympa` (a subset of `txmap`'s).
pub const TXMAP_SYMPA_EXIT_CODES: &str = "\
Exit codes:
  0  every in-service node serves the new table
  1  aborted: nothing changed anywhere (txmapd retries it until it is distributed)
  2  usage or configuration error, no table has this source, the source was refused (a link,
     a FIFO, too large), or the content guard refused it (txmap commit --force decides)
  3  commit decided, not yet acknowledged by every node (it completes on its own)
  4  busy: other transactions held the table; txmapd retries it
  6  txmapd not reachable: the request stays queued in state_dir/requests/ and is distributed
     when txmapd runs";

/// The command line of `txmap-sympa`, for its man page and shell completions. The hook parses
/// its arguments by hand (`src/bin/txmap-sympa.rs`: Sympa runs it with one path and a cleared
/// environment, and it must start fast); this describes the same arguments without changing
/// how they are parsed.
pub fn txmap_sympa_command() -> clap::Command {
    use clap::{Arg, ArgAction, Command, ValueHint};
    Command::new("txmap-sympa")
        .version(env!("CARGO_PKG_VERSION"))
        .about("Sympa's aliases_program: distribute the table Sympa just rewrote to every node")
        .long_about(
            "Sympa's aliases_program: distribute the table Sympa just rewrote to every node.\n\n\
             Set `aliases_program /usr/bin/txmap-sympa` in sympa.conf. Sympa runs it as user \
             sympa with one argument, the path of the table it rewrote (TYPE:PATH is accepted \
             too, as postmap takes it). The hook finds the configured table whose `source` is \
             that path, reads the file with its caller's rights (never through a symbolic link, \
             never from a FIFO or device, at most max_table_bytes), queues the content in \
             state_dir/requests/ and asks the local txmapd over the hook socket to commit it \
             to every node, waiting at most timeouts.total_ms + timeouts.commit_ms + 1 s. A \
             change that could not be distributed stays pending and txmapd retries it.",
        )
        .after_help(TXMAP_SYMPA_EXIT_CODES)
        .arg(
            Arg::new("config")
                .long("config")
                .short('c')
                .value_name("PATH")
                .value_hint(ValueHint::FilePath)
                .action(ArgAction::Set)
                .help("Config file [default: $TXMAP_CONFIG, else /etc/txmap/txmap.toml]"),
        )
        .arg(
            Arg::new("table_path")
                .value_name("TABLE_PATH")
                .required(true)
                .value_hint(ValueHint::FilePath)
                .help("The table source Sympa rewrote, as PATH or TYPE:PATH"),
        )
}

#[cfg(test)]
mod txmap_sympa_tests {
    #[test]
    fn the_txmap_sympa_description_accepts_what_the_hook_accepts() {
        let cmd = super::txmap_sympa_command();
        cmd.clone().debug_assert();
        for argv in [
            vec!["txmap-sympa", "/etc/sympa/sympa_transport"],
            vec!["txmap-sympa", "--config", "/x.toml", "hash:/etc/sympa/t"],
            vec!["txmap-sympa", "-c", "/x.toml", "/t"],
            vec!["txmap-sympa", "--config=/x.toml", "/t"],
        ] {
            assert!(cmd.clone().try_get_matches_from(&argv).is_ok(), "{argv:?}");
        }
        for argv in [
            vec!["txmap-sympa"],
            vec!["txmap-sympa", "/a", "/b"],
            vec!["txmap-sympa", "--bogus", "/a"],
        ] {
            assert!(cmd.clone().try_get_matches_from(&argv).is_err(), "{argv:?}");
        }
    }
}
