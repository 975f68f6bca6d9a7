//! `txmap`: the coordinator and admin CLI. Exit codes are listed in `txmap --help` and in
//! `docs/operations.md`; they come from [`txmap_common::exit`] and never change meaning.

use txmap_coordinator::cli::{CertCmd, Cli, Cmd};
use txmap_coordinator::{cluster, commit, history, recover, sandbox};

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
            return ExitCode::from(if e.use_stderr() {
                exit::USAGE
            } else {
                exit::OK
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
            json,
        } => cmd_commit(cli.config.as_deref(), &table, source, force, json),
        Cmd::Status { table, json } => cmd_status(cli.config.as_deref(), table, json),
        Cmd::CheckConfig => cmd_check(cli.config.as_deref()),
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
    // txmapd (root) then reads the snapshot, never this path.
    let snaps = txmap_common::table::Snapshots::new(&cfg.state_dir);
    let source = match snaps.take_from_path(&name, &source, cfg.max_table_bytes) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("txmap: cannot read source {}: {e}", source.display());
            return Err(exit::LOCAL);
        }
    };
    let report = with_cluster(cfg, async |c| {
        commit::commit_tracked_with(c, table, &source, force, None).await
    })?;
    print_report(&report, json, "commit");
    Ok(report.exit)
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
    let all_reachable = serving.iter().all(|n| n.reachable && n.error.is_none());
    let mut agree = true;
    let mut names: Vec<&str> = nodes
        .iter()
        .flat_map(|n| n.tables.iter().map(|t| t.table.as_str()))
        .collect();
    names.sort();
    names.dedup();
    for name in &names {
        let gens: Vec<(u64, Option<_>)> = serving
            .iter()
            .filter_map(|n| n.tables.iter().find(|t| t.table == *name))
            .map(|t| (t.generation, t.sha256))
            .collect();
        if gens.windows(2).any(|w| w[0] != w[1]) || gens.len() != serving.len() {
            agree = false;
        }
    }
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
            }
        }
    }
    Ok(if all_reachable && agree {
        exit::OK
    } else {
        exit::DISAGREE
    })
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
    let results = with_cluster(load_with_table(config, table.as_deref())?, async |c| {
        let tables: Vec<String> = match &table {
            Some(t) => vec![t.clone()],
            None => c.cfg.tables.iter().map(|t| t.name.clone()).collect(),
        };
        history::verify(c, &tables).await
    })?;
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
            if v.problems.is_empty() {
                println!("{}: {} {gen}: ok", v.node, v.table);
            } else {
                for p in &v.problems {
                    println!("{}: {} {gen}: DRIFT: {p}", v.node, v.table);
                }
            }
        }
    }
    Ok(if results.iter().all(|v| v.problems.is_empty()) {
        exit::OK
    } else {
        exit::DISAGREE
    })
}

fn cmd_check(config: Option<&Path>) -> Result<u8, u8> {
    let path = Config::resolve_path(config);
    match Config::load(&path) {
        Err(e) => {
            eprintln!("{e}");
            Ok(exit::USAGE)
        }
        Ok(cfg) => {
            let problems = cfg.check_files();
            for p in &problems {
                eprintln!("{}: {p}", path.display());
            }
            if problems.is_empty() {
                println!(
                    "{}: ok (node {}, {} node(s), {} table(s))",
                    path.display(),
                    cfg.node,
                    cfg.nodes.len(),
                    cfg.tables.len()
                );
                Ok(exit::OK)
            } else {
                Ok(exit::USAGE)
            }
        }
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
