//! `txmap-gendoc OUT_DIR [--docs DOCS_DIR]`: writes the man pages and shell completions of
//! the Debian package (scripts/package/build-deb.sh), generated from the CLI definitions in
//! `coordinator/src/cli.rs` and from the config reference in `docs/operations.md`:
//!
//! - `OUT_DIR/man/txmap.8`, `txmapd.8`, `txmap-sympa.8` (clap_mangen, with every subcommand's
//!   options, exit status, environment, files) and `txmap.toml.5` (the "Config reference"
//!   section of `docs/operations.md`, converted from Markdown to roff);
//! - `OUT_DIR/completions/{bash,zsh,fish}/` for the three programs (clap_complete).
//!
//! A dev-only binary, in the test crate, so that nothing shipped depends on clap_mangen or
//! clap_complete. It fails (exit 1, naming the cause) rather than write an incomplete page.

use anyhow::{bail, Context, Result};
use clap::CommandFactory;
use clap_complete::Shell;
use clap_mangen::roff::{bold, italic, roman, Inline, Roff};
use clap_mangen::Man;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

const SOURCE: &str = concat!("txmap ", env!("CARGO_PKG_VERSION"));
const MANUAL: &str = "System Administration";

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("txmap-gendoc: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<()> {
    let mut args = std::env::args_os().skip(1);
    let mut out = None;
    let mut docs = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs");
    while let Some(a) = args.next() {
        if a == "--docs" {
            docs = PathBuf::from(args.next().context("--docs needs a directory")?);
        } else if out.is_none() {
            out = Some(PathBuf::from(a));
        } else {
            bail!("usage: txmap-gendoc OUT_DIR [--docs DOCS_DIR]");
        }
    }
    let out = out.context("usage: txmap-gendoc OUT_DIR [--docs DOCS_DIR]")?;
    let man = out.join("man");
    std::fs::create_dir_all(&man).with_context(|| format!("create {}", man.display()))?;

    let programs = programs();
    for (cmd, extra) in &programs {
        let name = cmd.get_name().to_string();
        let path = man.join(format!("{name}.8"));
        let page = man_page(cmd.clone(), extra)?;
        std::fs::write(&path, page).with_context(|| format!("write {}", path.display()))?;
    }
    let reference = std::fs::read_to_string(docs.join("operations.md"))
        .with_context(|| format!("read {}", docs.join("operations.md").display()))?;
    let path = man.join("txmap.toml.5");
    std::fs::write(&path, config_page(&reference)?)
        .with_context(|| format!("write {}", path.display()))?;

    for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
        let dir = out.join("completions").join(shell.to_string());
        std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
        for (cmd, _) in &programs {
            let mut cmd = cmd.clone();
            let name = cmd.get_name().to_string();
            let mut buf = Vec::new();
            clap_complete::generate(shell, &mut cmd, &name, &mut buf);
            let file = match shell {
                Shell::Zsh => format!("_{name}"),
                Shell::Fish => format!("{name}.fish"),
                _ => name.clone(),
            };
            std::fs::write(dir.join(&file), buf)
                .with_context(|| format!("write {}", dir.join(&file).display()))?;
        }
    }
    Ok(())
}

/// What a page says beyond the CLI definition.
struct Extra {
    exit_codes: &'static str,
    environment: Vec<(&'static str, &'static str)>,
    files: &'static [(&'static str, &'static str)],
    see_also: &'static str,
}

const COMMON_ENV: &[(&str, &str)] = &[
    (
        "TXMAP_CONFIG",
        "Config file when --config is not given (default /etc/txmap/txmap.toml).",
    ),
    (
        "TXMAP_LOG",
        "Log filter (tracing EnvFilter syntax), e.g. info or txmapd=debug,quinn=warn.",
    ),
    (
        "TXMAP_LOG_SYSLOG",
        "1 (or a facility: mail, daemon, user, local0..local7) logs to syslog through /dev/log \
         with facility mail by default, as Postfix does, instead of stderr.",
    ),
    (
        "JOURNAL_STREAM",
        "Set by systemd: when it names stderr, log lines carry their syslog priority (<3>, <4>, \
         <6>, <7>) and no timestamp, for the journal.",
    ),
    (
        "NO_COLOR",
        "Never use colours (they are only used on a terminal anyway).",
    ),
];

const TXMAPD_ENV: &[(&str, &str)] = &[(
    "NOTIFY_SOCKET",
    "Set by systemd for Type=notify: txmapd sends READY=1 once it serves, RELOADING=1 on \
     SIGHUP and STOPPING=1 when it stops.",
)];

fn programs() -> Vec<(clap::Command, Extra)> {
    let files: &'static [(&str, &str)] = &[
        ("/etc/txmap/txmap.toml", "the node's config, see txmap.toml(5)"),
        ("/var/lib/txmap", "state_dir of the example config: journal, decisions, pending work, history, hook socket"),
        ("/lib/systemd/system/txmapd.service", "the hardened systemd unit"),
    ];
    vec![
        (
            txmap_coordinator::cli::Cli::command(),
            Extra {
                exit_codes: txmap_coordinator::cli::EXIT_CODES,
                environment: COMMON_ENV.to_vec(),
                files,
                see_also: "txmapd(8), txmap-sympa(8), txmap.toml(5), postmap(1), postalias(1)",
            },
        ),
        (
            txmap_coordinator::cli::TxmapdArgs::command(),
            Extra {
                exit_codes: "Exit status:\n  0  stopped by SIGTERM or SIGINT\n  2  configuration \
                             error, or an unsafe directory (restarting will not help)\n  6  \
                             runtime error: cannot listen, TLS files, a corrupt journal, a table \
                             lock held by another process",
                environment: [COMMON_ENV, TXMAPD_ENV].concat(),
                files,
                see_also: "txmap(8), txmap-sympa(8), txmap.toml(5), systemd.exec(5), sd_notify(3)",
            },
        ),
        (
            txmap_coordinator::cli::txmap_sympa_command(),
            Extra {
                exit_codes: txmap_coordinator::cli::TXMAP_SYMPA_EXIT_CODES,
                environment: vec![(
                    "TXMAP_CONFIG",
                    "Config file when --config is not given (Sympa clears the environment, so \
                     the default /etc/txmap/txmap.toml is what it uses).",
                )],
                files,
                see_also: "txmap(8), txmapd(8), txmap.toml(5), sympa.conf(5)",
            },
        ),
    ]
}

/// One program's page: clap_mangen's sections, every subcommand with its options, then exit
/// status, environment, files, see also.
fn man_page(cmd: clap::Command, extra: &Extra) -> Result<Vec<u8>> {
    let mut cmd = cmd;
    cmd.build();
    let man = Man::new(cmd.clone())
        .section("8")
        .source(SOURCE)
        .manual(MANUAL);
    let mut out = Vec::new();
    man.render_title(&mut out)?;
    man.render_name_section(&mut out)?;
    man.render_synopsis_section(&mut out)?;
    man.render_description_section(&mut out)?;
    if cmd.get_arguments().any(|a| !a.is_hide_set()) {
        man.render_options_section(&mut out)?;
    }
    let mut roff = Roff::default();
    if cmd.has_subcommands() {
        roff.control("SH", ["COMMANDS"]);
        for sub in cmd.get_subcommands() {
            subcommand(&mut roff, cmd.get_name(), sub);
        }
    }
    roff.control("SH", ["EXIT STATUS"]);
    preformatted(
        &mut roff,
        extra
            .exit_codes
            .trim_start_matches("Exit codes:\n")
            .trim_start_matches("Exit status:\n"),
    );
    roff.control("SH", ["ENVIRONMENT"]);
    for (k, v) in &extra.environment {
        roff.control("TP", []);
        roff.text([bold(*k)]);
        roff.text([roman(*v)]);
    }
    roff.control("SH", ["FILES"]);
    for (k, v) in extra.files {
        roff.control("TP", []);
        roff.text([italic(*k)]);
        roff.text([roman(*v)]);
    }
    roff.control("SH", ["SEE ALSO"]);
    roff.text([roman(extra.see_also)]);
    roff.control("PP", []);
    roff.text([roman(
        "The full guides are in /usr/share/doc/txmap/ (operations.md, sympa-postfix.md, \
         security.md).",
    )]);
    roff.to_writer(&mut out)?;
    man.render_version_section(&mut out)?;
    Ok(out)
}

/// `.SS txmap commit`, its usage, what it does, and its arguments; nested subcommands too.
fn subcommand(roff: &mut Roff, parent: &str, sub: &clap::Command) {
    if sub.is_hide_set() || sub.get_name() == "help" {
        return;
    }
    let name = format!("{parent} {}", sub.get_name());
    let mut usage_cmd = sub.clone().bin_name(&name);
    let usage = usage_cmd.render_usage().to_string();
    let usage = usage.trim_start_matches("Usage: ").trim();
    roff.control("SS", [name.as_str()]);
    roff.text([bold(usage)]);
    roff.control("br", []);
    let about = sub
        .get_long_about()
        .or_else(|| sub.get_about())
        .map(|s| s.to_string())
        .unwrap_or_default();
    roff.text(md_inlines(&about));
    for arg in sub.get_arguments() {
        if arg.is_hide_set()
            || arg.is_global_set()
            || matches!(arg.get_id().as_str(), "help" | "version")
        {
            continue;
        }
        roff.control("TP", []);
        roff.text([bold(arg_header(arg))]);
        let mut help = arg
            .get_long_help()
            .or_else(|| arg.get_help())
            .map(|s| s.to_string())
            .unwrap_or_default();
        let defaults: Vec<String> = arg
            .get_default_values()
            .iter()
            .map(|v| v.to_string_lossy().into_owned())
            .collect();
        let flag = matches!(
            arg.get_action(),
            clap::ArgAction::SetTrue | clap::ArgAction::SetFalse
        );
        if !defaults.is_empty() && !arg.is_hide_default_value_set() && !flag {
            help.push_str(&format!(" [default: {}]", defaults.join(", ")));
        }
        roff.text(md_inlines(&help));
    }
    for nested in sub.get_subcommands() {
        subcommand(roff, &name, nested);
    }
}

/// `-c, --config <PATH>` or `<TABLE>`.
fn arg_header(arg: &clap::Arg) -> String {
    let value = arg
        .get_value_names()
        .map(|v| {
            v.iter()
                .map(|n| format!("<{n}>"))
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_else(|| format!("<{}>", arg.get_id().as_str().to_uppercase()));
    if arg.is_positional() {
        return value;
    }
    let mut flags = Vec::new();
    if let Some(s) = arg.get_short() {
        flags.push(format!("-{s}"));
    }
    if let Some(l) = arg.get_long() {
        flags.push(format!("--{l}"));
    }
    let takes_value = arg.get_action().takes_values();
    if takes_value {
        format!("{} {value}", flags.join(", "))
    } else {
        flags.join(", ")
    }
}

/// Lines kept as they are (`.nf` … `.fi`).
fn preformatted(roff: &mut Roff, text: &str) {
    roff.control("nf", []);
    for line in text.lines() {
        roff.text([roman(line)]);
    }
    roff.control("fi", []);
}

/// Markdown inline text to roff: `code` in bold, links as their text, emphasis dropped.
fn md_inlines(text: &str) -> Vec<Inline> {
    let text = strip_links(text).replace("**", "");
    let mut out = Vec::new();
    for (i, part) in text.split('`').enumerate() {
        if part.is_empty() {
            continue;
        }
        out.push(if i % 2 == 1 { bold(part) } else { roman(part) });
    }
    out
}

/// `[text](target)` → `text`.
fn strip_links(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(open) = rest.find('[') {
        let Some(close) = rest[open..].find("](").map(|c| open + c) else {
            break;
        };
        let Some(end) = rest[close..].find(')').map(|e| close + e) else {
            break;
        };
        out.push_str(&rest[..open]);
        out.push_str(&rest[open + 1..close]);
        rest = &rest[end + 1..];
    }
    out.push_str(rest);
    out
}

/// `txmap.toml(5)`: the "Config reference" section of `docs/operations.md` in roff. Fails when
/// the section or its key tables are not found (the docs changed shape).
fn config_page(operations_md: &str) -> Result<Vec<u8>> {
    let start = operations_md
        .find("\n## Config reference")
        .context("docs/operations.md has no `## Config reference` section")?;
    let body = &operations_md[start + 1..];
    let body = body
        .lines()
        .skip(1)
        .take_while(|l| !l.starts_with("## "))
        .collect::<Vec<_>>();
    let mut roff = Roff::default();
    roff.control("TH", ["TXMAP.TOML", "5", "", SOURCE, "File Formats Manual"]);
    roff.control("SH", ["NAME"]);
    roff.text([roman(
        "txmap.toml - configuration of txmap, txmapd and txmap-sympa",
    )]);
    roff.control("SH", ["SYNOPSIS"]);
    roff.text([italic("/etc/txmap/txmap.toml")]);
    roff.control("SH", ["DESCRIPTION"]);
    let mut keys = 0;
    let mut in_code = false;
    let mut para = String::new();
    let flush = |roff: &mut Roff, para: &mut String| {
        if !para.trim().is_empty() {
            roff.control("PP", []);
            roff.text(md_inlines(para.trim()));
        }
        para.clear();
    };
    for line in body {
        if let Some(rest) = line.strip_prefix("```") {
            flush(&mut roff, &mut para);
            if in_code {
                roff.control("fi", []);
                roff.control("RE", []);
            } else {
                let _ = rest;
                roff.control("RS", []);
                roff.control("nf", []);
            }
            in_code = !in_code;
            continue;
        }
        if in_code {
            roff.text([roman(line)]);
            continue;
        }
        if let Some(h) = line.strip_prefix("### ") {
            flush(&mut roff, &mut para);
            let h = h.replace('`', "");
            roff.control("SH", [h.to_uppercase().as_str()]);
            continue;
        }
        if line.starts_with('|') {
            flush(&mut roff, &mut para);
            let cells: Vec<&str> = line
                .trim()
                .trim_matches('|')
                .split('|')
                .map(str::trim)
                .collect();
            if cells.len() < 2
                || cells[0] == "key"
                || cells
                    .iter()
                    .all(|c| c.chars().all(|ch| ch == '-' || ch == ':'))
            {
                continue;
            }
            roff.control("TP", []);
            let mut head = vec![bold(cells[0].replace('`', ""))];
            if cells.len() >= 3 {
                head.push(roman(" (default: "));
                head.extend(md_inlines(cells[1]));
                head.push(roman(")"));
            }
            roff.text(head);
            roff.text(md_inlines(cells[cells.len() - 1]));
            keys += 1;
            continue;
        }
        if line.trim().is_empty() {
            flush(&mut roff, &mut para);
        } else {
            para.push_str(line);
            para.push(' ');
        }
    }
    flush(&mut roff, &mut para);
    if keys < 10 {
        bail!("the config reference of docs/operations.md yielded only {keys} key(s)");
    }
    roff.control("SH", ["SEE ALSO"]);
    roff.text([roman(
        "txmap(8), txmapd(8), txmap-sympa(8), postmap(1), postalias(1); \
         /usr/share/doc/txmap/operations.md",
    )]);
    Ok(roff.to_roff().into_bytes())
}
