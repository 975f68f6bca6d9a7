//! `txmap`: the coordinator and admin CLI. Exit codes are listed in `txmap --help` and in
//! `docs/operations.md`; they come from [`txmap_common::exit`] and never change meaning.

use txmap_coordinator::cli::{CertCmd, Cli, Cmd, PendingCmd};
use txmap_coordinator::{check, cluster, commit, diff, history, recover, sandbox};

use clap::Parser;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use txmap_common::config::Config;
use txmap_common::exit;
use txmap_common::proto::{Request, Response, TableStatus};

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            // A monitoring plugin's usage error is UNKNOWN (3), never CRITICAL (2).
            let probe = std::env::args().skip(1).any(|a| a == "check");
            return ExitCode::from(match (e.use_stderr(), probe) {
                (false, _) => exit::OK,
                (true, true) => check::State::Unknown.code(),
                (true, false) => exit::USAGE,
            });
        }
    };
    txmap_coordinator::init_process("warn");
    let _failpoints = fail::FailScenario::setup();
    ExitCode::from(run(cli))
}

fn load(cli_config: Option<&Path>) -> Result<Config, u8> {
    let path = Config::resolve_path(cli_config);
    Config::load(&path).map_err(|e| {
        eprintln!("txmap: {e}");
        exit::USAGE
    })
}

fn runtime() -> Result<tokio::runtime::Runtime, u8> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| {
            eprintln!("txmap: cannot start the runtime: {e}");
            exit::LOCAL
        })
}

fn run(cli: Cli) -> u8 {
    let r = match cli.cmd {
        Cmd::Commit {
            table,
            source,
            force,
            json: _,
            dry_run: true,
        } => cmd_dry_run(cli.config.as_deref(), &table, source, force),
        Cmd::Commit {
            table,
            source,
            force,
            json,
            dry_run: false,
        } => cmd_commit(cli.config.as_deref(), &table, source, force, json),
        Cmd::Diff {
            table,
            source,
            lines,
            json,
        } => cmd_diff(cli.config.as_deref(), &table, source, lines, json),
        Cmd::Check {
            prometheus,
            socket,
            cert_warn_days,
            cert_crit_days,
            pending_crit,
            source_grace,
        } => Ok(cmd_probe(
            cli.config.as_deref(),
            prometheus,
            socket,
            check::Thresholds {
                cert_warn_days,
                cert_crit_days,
                pending_crit_s: pending_crit,
                source_grace_s: source_grace,
            },
        )),
        Cmd::Pending { cmd, json } => cmd_pending(cli.config.as_deref(), cmd, json),
        Cmd::Status { table, json } => cmd_status(cli.config.as_deref(), table, json),
        Cmd::CheckConfig => cmd_check_config(cli.config.as_deref()),
        Cmd::History { table, json } => cmd_history(cli.config.as_deref(), &table, json),
        Cmd::Rollback { table, to, json } => cmd_rollback(cli.config.as_deref(), &table, to, json),
        Cmd::Verify { table, json } => cmd_verify(cli.config.as_deref(), table, json),
        Cmd::Recover {
            abort,
            commit,
            json,
        } => cmd_recover(cli.config.as_deref(), abort, commit, json),
        Cmd::Cert { cmd } => cmd_cert(cmd),
        Cmd::Sandbox {
            dir,
            nodes,
            base_port,
        } => cmd_sandbox(&dir, nodes, base_port),
    };
    r.unwrap_or_else(|code| code)
}

fn cmd_commit(
    config: Option<&Path>,
    table: &str,
    source: Option<PathBuf>,
    force: bool,
    json: bool,
) -> Result<u8, u8> {
    let cfg = load_with_table(config, Some(table))?;
    let configured = cfg.table(table).and_then(|t| t.source.clone());
    // The configured source shares its snapshot (and pending change) with the Sympa hook: the
    // newest content wins. Another file is a change of its own, so neither drops the other.
    let name = match (&source, &configured) {
        (Some(s), c) if Some(s) != c.as_ref() => {
            format!("{table}@{}", txmap_common::table::path_tag(s))
        }
        _ => table.to_string(),
    };
    let Some(source) = source.or(configured) else {
        eprintln!(
            "txmap: table `{table}` has no `source` in {}; pass --source FILE",
            cfg.file.display()
        );
        return Err(exit::USAGE);
    };
    // Read as the caller (the operator), once, into a private snapshot: a pending retry by
    // txmapd (root) then reads the snapshot, never this path. The nodes are dialled meanwhile
    // (the handshakes overlap the snapshot's read and fsyncs).
    let snaps = txmap_common::table::Snapshots::new(&cfg.state_dir);
    let max = cfg.max_table_bytes;
    let started_ms = txmap_common::now_ms();
    let state_dir = cfg.state_dir.clone();
    let interrupted = with_cluster(cfg, async |c| {
        let taken = {
            let (name, source) = (name.clone(), source.clone());
            tokio::task::spawn_blocking(move || snaps.take_from_path(&name, &source, max))
        };
        let began = std::time::Instant::now();
        let (_, taken) = tokio::join!(c.dial_early(), taken);
        // The report's time counts from here: a node that cannot be reached costs its connect
        // deadline in `dial_early`, before the commit itself starts.
        let before_ms = began.elapsed().as_millis() as u64;
        let snapshot = match taken.unwrap_or_else(|e| Err(std::io::Error::other(e))) {
            Ok(p) => p,
            Err(e) => {
                eprintln!("txmap: cannot read source {}: {e}", source.display());
                return Err(Stop::Code(exit::LOCAL));
            }
        };
        let run = commit::commit_tracked_with(c, table, &snapshot, force, None);
        tokio::pin!(run);
        tokio::select! {
            r = &mut run => Ok(commit::CommitReport {
                elapsed_ms: r.elapsed_ms + before_ms,
                ..r
            }),
            _ = tokio::signal::ctrl_c() => {
                // Cancel the change before this process lets go of it: its pending record
                // goes first (txmapd would otherwise take it over and commit it), then the
                // transaction is dropped, which releases its locks: txmapd fences an
                // undecided transaction (abort) and delivers a decided commit.
                txmap_common::decision::DecisionLog::new(&c.cfg.state_dir)
                    .clear_pending(table, &snapshot);
                Err(Stop::Interrupted)
            }
        }
    })?;
    let report = match interrupted {
        Ok(r) => r,
        Err(Stop::Code(code)) => return Err(code),
        Err(Stop::Interrupted) => {
            let log = txmap_common::decision::DecisionLog::new(&state_dir);
            let decided = log.list().into_iter().find(|d| {
                d.table == table
                    && d.at_ms >= started_ms
                    && d.verdict == txmap_common::decision::Verdict::Commit
            });
            match decided {
                Some(d) => eprintln!(
                    "txmap: interrupted after the commit decision: {table} generation {} is committed (txid {}); txmapd delivers it to every node",
                    d.generation, d.txid
                ),
                None => eprintln!(
                    "txmap: interrupted before any decision: the change is cancelled, nothing is committed (txmapd aborts the transaction on every node within seconds) and it is not retried; run `txmap commit {table}` again to distribute it"
                ),
            }
            return Ok(130);
        }
    };
    print_report(&report, json, "commit");
    Ok(report.exit)
}

/// Why `txmap commit` stopped without a report.
enum Stop {
    /// An error already printed; exit with this code.
    Code(u8),
    /// Ctrl-C.
    Interrupted,
}

/// `commit --dry-run`: asks the in-service nodes what they serve, applies the content guard,
/// shows the difference with this node's live table, changes nothing.
fn cmd_dry_run(
    config: Option<&Path>,
    table: &str,
    source: Option<PathBuf>,
    force: bool,
) -> Result<u8, u8> {
    let cfg = load_with_table(config, Some(table))?;
    let tcfg = cfg.table(table).cloned().ok_or(exit::USAGE)?;
    let Some(source) = source.or(tcfg.source.clone()) else {
        eprintln!("txmap: table `{table}` has no `source`; pass --source FILE");
        return Err(exit::USAGE);
    };
    // Read as `txmap commit` reads it: never through a link, never blocking on a FIFO.
    let new_bytes = txmap_common::table::open_untrusted(&source, cfg.max_table_bytes)
        .and_then(|(f, _)| txmap_common::table::read_bounded(f, cfg.max_table_bytes))
        .map_err(|e| {
            eprintln!("txmap: cannot read source {}: {e}", source.display());
            exit::LOCAL
        })?;
    let digest = txmap_common::table::digest_reader(&mut &new_bytes[..]).map_err(|e| {
        eprintln!("txmap: cannot read source {}: {e}", source.display());
        exit::LOCAL
    })?;
    let pct = cfg.max_shrink_percent;
    let free = cfg.guard_free_keys;
    let (state_dir, max) = (cfg.state_dir.clone(), cfg.max_table_bytes);
    let removed = commit::removed_keys(&cfg, table, &source);
    let (known, failed, asked) = with_cluster(cfg, async |c| {
        let nodes = c.cfg.active_nodes();
        let req = Request::Status {
            table: Some(table.to_string()),
        };
        let answers = cluster::join_all(nodes.iter().map(|n| async {
            let l = c.connect(n).await;
            cluster::ask(&l, &req, c.cfg.timeouts.connect).await
        }))
        .await;
        let mut known = Vec::new();
        let mut failed = Vec::new();
        for (n, a) in nodes.iter().zip(answers) {
            match a {
                Ok(Response::Status(v)) => known.extend(v),
                Ok(other) => failed.push(format!("{}: {other:?}", n.name)),
                Err(e) => failed.push(format!("{}: {e}", n.name)),
            }
        }
        (known, failed, nodes.len())
    })?;
    let live = txmap_common::history::History::new(&state_dir, table)
        .open_live(&tcfg.path, max)
        .and_then(|(f, _)| txmap_common::table::read_bounded(f, max));
    if let (Ok(live), Ok(new)) = (live, String::from_utf8(new_bytes)) {
        let live = String::from_utf8_lossy(&live);
        print!("{}", diff::Diff::of(&live, &new, tcfg.builder).render(10));
    }
    if !failed.is_empty() {
        eprintln!(
            "txmap: dry run: the commit would abort now: {}",
            failed.join("; ")
        );
        return Ok(exit::ABORTED);
    }
    let sha = txmap_common::proto::Sha256(digest.sha256);
    if let Some(g) = txmap_common::coordinator::already_served(&known, asked, &sha) {
        eprintln!("txmap: dry run: every in-service node already serves this content (generation {g}); a commit would do nothing");
        return Ok(exit::OK);
    }
    if !force {
        if let Err(why) =
            txmap_common::coordinator::content_guard(&known, digest.entries, removed, pct, free)
        {
            eprintln!("txmap: dry run: the commit would be refused: {why}");
            return Ok(exit::USAGE);
        }
    }
    eprintln!(
        "txmap: dry run: would commit {} ({} entries) to {asked} in-service node(s) as generation {}; nothing changed",
        source.display(),
        digest.entries,
        txmap_common::machine::next_generation(&known)
    );
    Ok(exit::OK)
}

/// `txmap diff`: the configured source (or FILE) against this node's live table.
fn cmd_diff(
    config: Option<&Path>,
    table: &str,
    source: Option<PathBuf>,
    lines: usize,
    json: bool,
) -> Result<u8, u8> {
    let cfg = load_with_table(config, Some(table))?;
    let tcfg = cfg.table(table).cloned().ok_or(exit::USAGE)?;
    let Some(source) = source.or(tcfg.source.clone()) else {
        eprintln!("txmap: table `{table}` has no `source`; pass --source FILE");
        return Err(exit::USAGE);
    };
    // The live source may have a second link: its own history copy (nothing else).
    let history = txmap_common::history::History::new(&cfg.state_dir, table);
    let read = |p: &Path| {
        history
            .open_live(p, cfg.max_table_bytes)
            .and_then(|(f, _)| txmap_common::table::read_bounded(f, cfg.max_table_bytes))
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .map_err(|e| {
                eprintln!("txmap: cannot read {}: {e}", p.display());
                exit::LOCAL
            })
    };
    let new = read(&source)?;
    let live = match std::fs::symlink_metadata(&tcfg.path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        _ => read(&tcfg.path)?,
    };
    let generation = txmap_common::journal::Journal::open(&cfg.state_dir)
        .ok()
        .and_then(|j| j.load(table).ok())
        .map(|st| st.generation);
    let d = diff::Diff::of(&live, &new, tcfg.builder);
    if json {
        #[derive(serde::Serialize)]
        struct Out<'a> {
            table: &'a str,
            source: &'a Path,
            live: &'a Path,
            live_generation: Option<u64>,
            #[serde(flatten)]
            diff: &'a diff::Diff,
        }
        let out = Out {
            table,
            source: &source,
            live: &tcfg.path,
            live_generation: generation,
            diff: &d,
        };
        println!("{}", serde_json::to_string_pretty(&out).unwrap_or_default());
    } else {
        println!(
            "{table}: {} against the live table {}{}",
            source.display(),
            tcfg.path.display(),
            generation
                .map(|g| format!(" (generation {g} on {})", cfg.node))
                .unwrap_or_default()
        );
        print!("{}", d.render(lines));
    }
    Ok(exit::OK)
}

/// `txmap check`: the local txmapd's health summary as a plugin line or Prometheus text.
fn cmd_probe(
    config: Option<&Path>,
    prometheus: bool,
    socket: Option<PathBuf>,
    t: check::Thresholds,
) -> u8 {
    let now = txmap_common::now_ms();
    let cfg =
        Config::load(&Config::resolve_path(config)).map_err(|e| e.to_string().replace('\n', " "));
    let socket = match (socket, &cfg) {
        (Some(s), _) => Ok(s),
        (None, c) => c
            .as_ref()
            .map(|c| c.probe.socket.clone())
            .map_err(Clone::clone),
    };
    let (health, verdict) = match socket {
        Err(e) => (
            None,
            check::Verdict::failed(check::State::Unknown, format!("config: {e}")),
        ),
        Ok(sock) => match check::ask(&sock) {
            Ok(h) => {
                // The catch-all reads this node's configured sources itself, with the
                // monitoring user's rights (an unreadable one is skipped with a note).
                let sources: Vec<check::LocalSource> = match &cfg {
                    Ok(c) => c
                        .tables
                        .iter()
                        .filter_map(|tc| {
                            let src = tc.source.as_ref()?;
                            Some(check::LocalSource::read(&tc.name, src, c.max_table_bytes))
                        })
                        .collect(),
                    Err(_) => vec![],
                };
                let v = check::evaluate_with(&h, &t, now, &sources);
                (Some(h), v)
            }
            Err(e) => (None, check::Verdict::failed(check::State::Critical, e)),
        },
    };
    if prometheus {
        print!("{}", check::prometheus(health.as_ref(), &verdict, now));
        return exit::OK;
    }
    println!("{}", verdict.line());
    verdict.state.code()
}

/// `txmap pending [cancel|retry TABLE]`.
fn cmd_pending(config: Option<&Path>, cmd: Option<PendingCmd>, json: bool) -> Result<u8, u8> {
    let table = match &cmd {
        Some(PendingCmd::Cancel { table } | PendingCmd::Retry { table }) => Some(table.as_str()),
        None => None,
    };
    let cfg = load_with_table(config, table)?;
    let log = txmap_common::decision::DecisionLog::new(&cfg.state_dir);
    match cmd {
        None => {
            let list = log.list_pending();
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&list).unwrap_or_default()
                );
                return Ok(exit::OK);
            }
            if list.is_empty() {
                println!("no pending change on {}", cfg.node);
                return Ok(exit::OK);
            }
            let now = txmap_common::now_ms();
            println!(
                "{:<18} {:>8} {:>8} {:<24} LAST ERROR",
                "TABLE", "AGE", "ATTEMPTS", "NEXT"
            );
            for p in &list {
                let age = humantime::format_duration(std::time::Duration::from_secs(
                    now.saturating_sub(p.since_ms) / 1000,
                ));
                let next = if p.held.is_some() {
                    "held: source unchanged".to_string()
                } else if log.pending_owner_alive(&p.table) && p.owner_pid.is_some() {
                    "running now".to_string()
                } else if p.next_ms <= now {
                    "due".to_string()
                } else {
                    format!("in {} s", (p.next_ms - now).div_ceil(1000))
                };
                println!(
                    "{:<18} {:>8} {:>8} {:<24} {}",
                    p.table,
                    age.to_string(),
                    p.attempts,
                    next,
                    p.last_error
                );
            }
            Ok(exit::OK)
        }
        Some(PendingCmd::Cancel { table }) => match log.cancel_pending(&table) {
            Ok(v) if v.is_empty() => {
                eprintln!("txmap: no pending change of `{table}` on {}", cfg.node);
                Ok(exit::USAGE)
            }
            Ok(v) => {
                // The hook's queued requests of the table go too: marked served, then removed.
                let dir = txmap_common::config::HookSettings::requests_dir(&cfg.state_dir);
                let queued = txmap_common::requests::queued(&dir, &table);
                if let Some(top) = queued.iter().map(|q| q.order).max() {
                    if txmap_common::requests::publish_seen(&dir, &table, top).is_ok() {
                        for q in &queued {
                            let _ = std::fs::remove_file(&q.path);
                        }
                    }
                }
                println!(
                    "cancelled {} pending change(s) of {table}: txmapd no longer retries them; the nodes keep what they serve",
                    v.len()
                );
                Ok(exit::OK)
            }
            Err(e) => {
                eprintln!("txmap: pending cancel: {e}");
                Ok(exit::BUSY)
            }
        },
        Some(PendingCmd::Retry { table }) => match log.retry_pending(&table) {
            Ok(0) => {
                eprintln!("txmap: no pending change of `{table}` on {}", cfg.node);
                Ok(exit::USAGE)
            }
            Ok(n) => {
                println!("{n} pending change(s) of {table} due now: txmapd retries within a second (see `txmap pending`)");
                Ok(exit::OK)
            }
            Err(e) => {
                eprintln!("txmap: pending retry: {e}");
                Ok(exit::LOCAL)
            }
        },
    }
}

#[derive(serde::Serialize)]
struct NodeStatus {
    node: String,
    in_service: bool,
    reachable: bool,
    error: Option<String>,
    tables: Vec<TableStatus>,
}

fn cmd_status(config: Option<&Path>, table: Option<String>, json: bool) -> Result<u8, u8> {
    let cfg = load_with_table(config, table.as_deref())?;
    let bounds = bounds_of(&cfg);
    let in_service: std::collections::HashMap<String, bool> = cfg
        .nodes
        .iter()
        .map(|n| (n.name.clone(), n.in_service))
        .collect();
    let nodes: Vec<NodeStatus> = with_cluster(cfg, async |cluster| {
        let links = cluster.connect_all().await;
        let req = Request::Status {
            table: table.clone(),
        };
        let answers = cluster::join_all(
            links
                .iter()
                .map(|(_, l)| cluster::ask(l, &req, cluster.cfg.timeouts.connect)),
        )
        .await;
        links
            .iter()
            .zip(answers)
            .map(|((n, _), a)| {
                let (reachable, error, tables) = match a {
                    Ok(Response::Status(t)) => (true, None, t),
                    Ok(Response::Refused(r)) => (true, Some(r.to_string()), vec![]),
                    Ok(other) => (true, Some(format!("unexpected answer: {other}")), vec![]),
                    Err(e) => (false, Some(e), vec![]),
                };
                let in_service = in_service.get(&n.name).copied().unwrap_or(true);
                NodeStatus {
                    node: n.name.clone(),
                    in_service,
                    reachable,
                    error,
                    tables,
                }
            })
            .collect()
    })?;
    let serving: Vec<&NodeStatus> = nodes.iter().filter(|n| n.in_service).collect();
    let view = view_of(&nodes, bounds);
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&nodes).unwrap_or_default()
        );
    } else {
        println!(
            "{:<10} {:<18} {:>5} {:<16} {:>8} {:<20} IN PROGRESS",
            "NODE", "TABLE", "GEN", "SHA256", "ENTRIES", "COMMITTED"
        );
        for n in &nodes {
            if !n.in_service {
                println!("{:<10} (out of service)", n.node);
            }
            if let Some(e) = &n.error {
                println!(
                    "{:<10} {}",
                    n.node,
                    if n.reachable {
                        format!("error: {e}")
                    } else {
                        format!("UNREACHABLE: {e}")
                    }
                );
                continue;
            }
            for t in &n.tables {
                let sha = t
                    .sha256
                    .map(|s| s.to_string()[..16].to_string())
                    .unwrap_or_else(|| "-".into());
                let when = t
                    .committed_at_ms
                    .map(|ms| {
                        humantime::format_rfc3339_seconds(
                            std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms),
                        )
                        .to_string()
                    })
                    .unwrap_or_else(|| "-".into());
                let prep = t
                    .prepared
                    .as_ref()
                    .map(|p| {
                        format!(
                            "{} gen {} from {} ({})",
                            p.txid,
                            p.generation,
                            p.coordinator,
                            if p.durable { "prepared" } else { "staging" }
                        )
                    })
                    .unwrap_or_else(|| "-".into());
                println!(
                    "{:<10} {:<18} {:>5} {:<16} {:>8} {:<20} {}",
                    n.node, t.table, t.generation, sha, t.entries, when, prep
                );
                if let Some(p) = &t.pending {
                    let since = humantime::format_rfc3339_seconds(
                        std::time::UNIX_EPOCH + std::time::Duration::from_millis(p.since_ms),
                    );
                    println!(
                        "{:<10}   PENDING commit of {} since {since}, {} attempt(s), last error: {}",
                        "", t.table, p.attempts, p.last_error
                    );
                }
                if let Some(c) = &t.cleanup {
                    let since = humantime::format_rfc3339_seconds(
                        std::time::UNIX_EPOCH + std::time::Duration::from_millis(c.since_ms),
                    );
                    println!(
                        "{:<10}   cleanup pending: {} staged file(s) of {} finished transaction(s) since {since}, {} failed attempt(s), last error: {}",
                        "", c.staged_files, c.transactions, c.attempts, c.last_error
                    );
                }
                if let Some(d) = &t.drifted {
                    println!(
                        "{:<10}   DRIFTED: {d}; it does not serve generation {} as committed (`txmap commit {}` reinstalls it)",
                        "", t.generation, t.table
                    );
                }
            }
        }
    }
    for (name, v) in &view.tables {
        if let Some(line) = v.describe(name) {
            eprintln!("txmap: {line}");
        }
    }
    let stuck = stuck_work(&serving);
    for w in &stuck {
        eprintln!("txmap: stuck: {w}");
    }
    Ok(exit_of(&view, &stuck))
}

/// `timeouts.in_doubt_ms`, and `total_ms` + `commit_ms` (how long a commit may normally take).
fn bounds_of(cfg: &Config) -> txmap_common::view::Bounds {
    txmap_common::view::Bounds {
        in_doubt_ms: cfg.timeouts.in_doubt.as_millis() as u64,
        commit_bound_ms: (cfg.timeouts.total + cfg.timeouts.commit).as_millis() as u64,
    }
}

/// The one rule for "the in-service nodes agree" ([`txmap_common::view`]) over the answers.
fn view_of(
    nodes: &[NodeStatus],
    bounds: txmap_common::view::Bounds,
) -> txmap_common::view::ClusterView {
    let obs: Vec<txmap_common::view::NodeObs> = nodes
        .iter()
        .map(|n| txmap_common::view::NodeObs {
            node: n.node.clone(),
            in_service: n.in_service,
            tables: match &n.error {
                Some(e) => Err(e.clone()),
                None if !n.reachable => Err("no answer".into()),
                None => Ok(n.tables.iter().map(Into::into).collect()),
            },
        })
        .collect();
    txmap_common::view::ClusterView::of(&obs, bounds, txmap_common::now_ms())
}

/// `status`/`verify`: 5 when an in-service node is unreachable, disagrees or drifted; 8 when
/// they agree but work is stuck (in the view, or a failing pending change); else 0.
fn exit_of(view: &txmap_common::view::ClusterView, stuck: &[String]) -> u8 {
    if !view.agree() {
        exit::DISAGREE
    } else if view.stuck() || !stuck.is_empty() {
        exit::STUCK
    } else {
        exit::OK
    }
}

/// Pending changes that failed at least once (transactions under way for too long are in the
/// view, [`txmap_common::view::TableView::Stuck`] and `InDoubt`).
fn stuck_work(nodes: &[&NodeStatus]) -> Vec<String> {
    let now = txmap_common::now_ms();
    let mut out = Vec::new();
    for n in nodes {
        for t in &n.tables {
            if let Some(p) = &t.pending {
                if p.attempts > 0 {
                    out.push(format!(
                        "{}: {} change pending for {} s, {} failed attempt(s): {}",
                        n.node,
                        t.table,
                        now.saturating_sub(p.since_ms) / 1000,
                        p.attempts,
                        p.last_error
                    ));
                }
            }
        }
    }
    out
}

fn cmd_recover(
    config: Option<&Path>,
    abort: Option<String>,
    commit: Option<String>,
    json: bool,
) -> Result<u8, u8> {
    with_cluster(load(config)?, async |cluster| {
        let code = match (abort, commit) {
            (None, None) => {
                let (found, unreachable) = recover::list(cluster).await;
                if json {
                    println!(
                        "{}",
                        serde_json::to_string_pretty(&found).unwrap_or_default()
                    );
                } else if found.is_empty() {
                    println!("no transaction in progress on any reachable node");
                } else {
                    for d in &found {
                        println!(
                            "{}: {} txid {} generation {} from {} ({})",
                            d.node,
                            d.table,
                            d.prepared.txid,
                            d.prepared.generation,
                            d.prepared.coordinator,
                            if d.prepared.durable {
                                "prepared"
                            } else {
                                "staging"
                            }
                        );
                    }
                }
                for u in &unreachable {
                    eprintln!("txmap: unreachable: {u}");
                }
                if unreachable.is_empty() {
                    exit::OK
                } else {
                    exit::DISAGREE
                }
            }
            (abort, commit) => {
                let want_commit = commit.is_some();
                let txid = commit.or(abort).unwrap_or_default();
                match recover::resolve(cluster, &txid, want_commit).await {
                    Ok(msg) => {
                        println!("{msg}");
                        exit::OK
                    }
                    Err(msg) => {
                        eprintln!("txmap: recover: {msg}");
                        exit::REFUSED
                    }
                }
            }
        };
        code
    })
}

/// Loads the config and checks that `table`, when given, is configured.
fn load_with_table(config: Option<&Path>, table: Option<&str>) -> Result<Config, u8> {
    let cfg = load(config)?;
    if let Some(t) = table {
        if cfg.table(t).is_none() {
            let known: Vec<_> = cfg.tables.iter().map(|t| t.name.as_str()).collect();
            eprintln!(
                "txmap: unknown table `{t}` in {} (configured: {})",
                cfg.file.display(),
                known.join(", ")
            );
            return Err(exit::USAGE);
        }
    }
    Ok(cfg)
}

/// Runs `f` with a cluster client on a fresh runtime, then closes the client.
fn with_cluster<T>(cfg: Config, f: impl AsyncFnOnce(&cluster::Cluster) -> T) -> Result<T, u8> {
    let rt = runtime()?;
    rt.block_on(async {
        let cluster = cluster::Cluster::new(cfg).map_err(|e| {
            eprintln!("txmap: {e:#}");
            exit::LOCAL
        })?;
        let r = f(&cluster).await;
        cluster.close().await;
        Ok(r)
    })
}

fn print_report(report: &commit::CommitReport, json: bool, verb: &str) {
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(report).unwrap_or_default()
        );
        return;
    }
    for n in &report.nodes {
        println!("{}: {}", n.node, n.detail);
    }
    let what = match report.exit {
        exit::OK if report.txid.is_none() => "already served everywhere, nothing to do",
        exit::OK => "committed",
        exit::INCOMPLETE => "decided commit, not yet acknowledged everywhere",
        exit::BUSY => "aborted (table busy)",
        exit::LOCAL => "failed locally",
        exit::USAGE => "refused",
        _ => "aborted, nothing changed",
    };
    let gen = report
        .generation
        .map(|g| format!(" generation {g}"))
        .unwrap_or_default();
    let tx = report.txid.as_deref().unwrap_or("-");
    eprintln!(
        "txmap: {verb} {}{gen}: {what} (txid {tx}, {} attempt(s), {} ms)",
        report.table, report.attempts, report.elapsed_ms
    );
}

fn cmd_history(config: Option<&Path>, table: &str, json: bool) -> Result<u8, u8> {
    let (gens, unreachable) = with_cluster(load_with_table(config, Some(table))?, async |c| {
        history::history(c, table, false).await
    })?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&gens).unwrap_or_default()
        );
    } else {
        println!(
            "{:>5} {:<20} {:<16} {:>8} {:<10} NODES",
            "GEN", "COMMITTED", "SHA256", "ENTRIES", "BY"
        );
        for g in &gens {
            let e = &g.entry;
            let when = humantime::format_rfc3339_seconds(
                std::time::UNIX_EPOCH + std::time::Duration::from_millis(e.committed_at_ms),
            );
            let mut nodes = g.nodes.join(",");
            if !g.conflicting.is_empty() {
                nodes.push_str(&format!(
                    " (DIFFERENT CONTENT on {})",
                    g.conflicting.join(",")
                ));
            }
            println!(
                "{:>5} {:<20} {:<16} {:>8} {:<10} {nodes}",
                e.generation,
                when.to_string(),
                &e.sha256.to_string()[..16],
                e.entries,
                e.coordinator
            );
        }
    }
    for u in &unreachable {
        eprintln!("txmap: {u}");
    }
    Ok(if unreachable.is_empty() {
        exit::OK
    } else {
        exit::DISAGREE
    })
}

fn cmd_rollback(config: Option<&Path>, table: &str, to: Option<u64>, json: bool) -> Result<u8, u8> {
    let report = with_cluster(load_with_table(config, Some(table))?, async |c| {
        history::rollback(c, table, to).await
    })?;
    print_report(&report, json, "rollback");
    Ok(report.exit)
}

fn cmd_verify(config: Option<&Path>, table: Option<String>, json: bool) -> Result<u8, u8> {
    let cfg = load_with_table(config, table.as_deref())?;
    let bounds = bounds_of(&cfg);
    let out_of_service: Vec<String> = cfg
        .nodes
        .iter()
        .filter(|n| !n.in_service)
        .map(|n| n.name.clone())
        .collect();
    let (results, mut statuses) = with_cluster(cfg, async |c| {
        let tables: Vec<String> = match &table {
            Some(t) => vec![t.clone()],
            None => c.cfg.tables.iter().map(|t| t.name.clone()).collect(),
        };
        let v = history::verify(c, &tables).await;
        // Agreement and stuck work are judged as `status` judges them (one rule).
        let req = Request::Status {
            table: table.clone(),
        };
        let nodes = c.cfg.active_nodes();
        let answers = cluster::join_all(nodes.iter().map(|n| async {
            let l = c.connect(n).await;
            cluster::ask(&l, &req, c.cfg.timeouts.connect).await
        }))
        .await;
        let st: Vec<NodeStatus> = nodes
            .iter()
            .zip(answers)
            .map(|(n, a)| {
                let (reachable, error, tables) = match a {
                    Ok(Response::Status(t)) => (true, None, t),
                    Ok(Response::Refused(r)) => (true, Some(r.to_string()), vec![]),
                    Ok(other) => (true, Some(format!("unexpected answer: {other}")), vec![]),
                    Err(e) => (false, Some(e), vec![]),
                };
                NodeStatus {
                    node: n.name.clone(),
                    in_service: true,
                    reachable,
                    error,
                    tables,
                }
            })
            .collect();
        (v, st)
    })?;
    // What the full verification found on a node is drift of that node, as its stamps say.
    for v in results.iter().filter(|v| !v.problems.is_empty()) {
        let Some(n) = statuses.iter_mut().find(|n| n.node == v.node) else {
            continue;
        };
        match (
            v.generation,
            n.tables.iter_mut().find(|t| t.table == v.table),
        ) {
            (Some(_), Some(t)) => {
                let found = v.problems.join("; ");
                t.drifted = Some(match t.drifted.take() {
                    Some(d) => format!("{d}; {found}"),
                    None => found,
                });
            }
            _ if n.error.is_none() => n.error = Some(v.problems.join("; ")),
            _ => {}
        }
    }
    let counted = |v: &history::Verification| !out_of_service.contains(&v.node);
    let stamp_drift = |v: &history::Verification| {
        statuses
            .iter()
            .find(|n| n.node == v.node)
            .and_then(|n| n.tables.iter().find(|t| t.table == v.table))
            .and_then(|t| t.drifted.clone())
    };
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&results).unwrap_or_default()
        );
    } else {
        for v in &results {
            let gen = v
                .generation
                .map(|g| format!("generation {g}"))
                .unwrap_or_else(|| "-".into());
            let note = if counted(v) {
                ""
            } else {
                " (out of service, not counted)"
            };
            if !counted(v) {
                for p in &v.problems {
                    println!("{}: {} {gen}: {p}{note}", v.node, v.table);
                }
                if v.problems.is_empty() {
                    println!("{}: {} {gen}: ok{note}", v.node, v.table);
                }
            } else if !v.problems.is_empty() {
                for p in &v.problems {
                    println!("{}: {} {gen}: DRIFT: {p}", v.node, v.table);
                }
            } else if let Some(d) = stamp_drift(v) {
                // The content checks out, yet the files are not the ones installed.
                println!("{}: {} {gen}: DRIFT: {d}", v.node, v.table);
            } else {
                println!("{}: {} {gen}: ok", v.node, v.table);
            }
        }
    }
    let view = view_of(&statuses, bounds);
    for (name, v) in &view.tables {
        if let Some(line) = v.describe(name) {
            eprintln!("txmap: {line}");
        }
    }
    let refs: Vec<&NodeStatus> = statuses.iter().collect();
    let stuck = stuck_work(&refs);
    for w in &stuck {
        eprintln!("txmap: stuck: {w}");
    }
    Ok(exit_of(&view, &stuck))
}

fn cmd_check_config(config: Option<&Path>) -> Result<u8, u8> {
    let path = Config::resolve_path(config);
    let (cfg, problems) = Config::check(&path);
    if !problems.is_empty() {
        eprintln!(
            "{}",
            txmap_common::config::format_problems(&path, &problems)
        );
        return Ok(exit::USAGE);
    }
    match cfg {
        Some(cfg) => {
            println!(
                "{}: ok (node {}, {} node(s), {} table(s))",
                path.display(),
                cfg.node,
                cfg.nodes.len(),
                cfg.tables.len()
            );
            Ok(exit::OK)
        }
        None => Ok(exit::USAGE),
    }
}

fn cmd_cert(cmd: CertCmd) -> Result<u8, u8> {
    let r = match cmd {
        CertCmd::InitCa { dir } => txmap_common::tls::init_ca(&dir),
        CertCmd::Issue { node, ca, out } => txmap_common::tls::issue_node(&ca, &node, &out),
    };
    match r {
        Ok((cert, key)) => {
            println!("wrote {} and {}", cert.display(), key.display());
            Ok(exit::OK)
        }
        Err(e) => {
            eprintln!("txmap: {e}");
            Ok(exit::LOCAL)
        }
    }
}

fn cmd_sandbox(dir: &Path, nodes: usize, base_port: u16) -> Result<u8, u8> {
    match sandbox::create(dir, nodes, base_port) {
        Ok(configs) => {
            println!(
                "sandbox of {} node(s) written to {}",
                configs.len(),
                dir.display()
            );
            println!("start each participant daemon:");
            for c in &configs {
                println!("  txmapd --config {} &", c.display());
            }
            if let Some(first) = configs.first() {
                let shared = dir.join("shared/sympa_transport");
                println!(
                    "then edit {} and commit it to every node:",
                    shared.display()
                );
                println!(
                    "  txmap --config {} commit sympa_transport",
                    first.display()
                );
                println!("  txmap --config {} status", first.display());
            }
            Ok(exit::OK)
        }
        Err(e) => {
            eprintln!("txmap: sandbox: {e:#}");
            Ok(exit::LOCAL)
        }
    }
}
