//! `txmap check`: a monitoring probe in the Nagios/Icinga plugin conventions, and the health
//! summary it reads from the local `txmapd`.
//!
//! # The probe channel
//! `txmapd` listens on a second Unix socket, `[probe] socket` (default
//! `<state_dir>/txmapd-probe.sock`, mode 0666), separate from the hook's. A client connects and
//! reads **one** frame, a [`Health`], then the daemon closes the connection. The daemon reads
//! nothing from the client: there is no request to parse, so no hostile input, and a client
//! cannot make the daemon do any work. The summary is built by the daemon's health loop every
//! [`HEALTH_INTERVAL_MS`] (asking every node over QUIC, as `txmap status` does) and only
//! copied out to the probe; a client that does not read gets its connection dropped after a
//! short write deadline, and at most a few probes are served at once.
//!
//! So a monitoring user needs neither the node's key (only `txmapd` talks to the cluster) nor
//! write access to anything; it only needs to reach the socket (the state directory is 0755).
//!
//! # Verdict
//! [`evaluate`] is a pure function of the summary, the thresholds and the time, tested below.

use serde::{Deserialize, Serialize};

/// How often `txmapd` refreshes its health summary.
pub const HEALTH_INTERVAL_MS: u64 = 3000;

/// Version of [`Health`]; a client refuses another.
pub const HEALTH_VERSION: u32 = 2;

/// What the local `txmapd` knows about the cluster's health.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Health {
    /// [`HEALTH_VERSION`].
    pub version: u32,
    /// This node.
    pub node: String,
    /// When the summary was made (ms since the epoch).
    pub as_of_ms: u64,
    /// When the daemon started.
    pub started_ms: u64,
    /// When its config was (re)loaded.
    pub config_loaded_ms: u64,
    /// `timeouts.in_doubt_ms` of this node.
    pub in_doubt_ms: u64,
    /// `timeouts.total_ms` + `timeouts.commit_ms`: how long a commit may normally take.
    pub commit_bound_ms: u64,
    /// Every configured node, this one included.
    pub nodes: Vec<NodeHealth>,
    /// Pending changes this node coordinates.
    pub pending: Vec<PendingHealth>,
    /// This node's certificate and the CA's.
    pub certs: Vec<CertHealth>,
    /// The configured sources of this node's tables, as txmapd last saw them (`lstat` only).
    pub sources: Vec<SourceHealth>,
}

/// A table's configured source on this node, as the health loop saw it (by `lstat`, never
/// opened: txmapd does not read a file a less privileged user controls for the probe).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceHealth {
    /// Table.
    pub table: String,
    /// Since when the source has had its current stamp, as first seen by this txmapd (ms
    /// since the epoch, this node's clock; `None`: not seen, e.g. missing). The catch-all's
    /// grace period runs from the later of this and the file's mtime.
    pub unchanged_since_ms: Option<u64>,
}

/// One node as seen from here.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeHealth {
    /// Name.
    pub node: String,
    /// In service per this node's config.
    pub in_service: bool,
    /// Answered the status question.
    pub reachable: bool,
    /// Why not, if not.
    pub error: Option<String>,
    /// Its tables.
    pub tables: Vec<TableHealth>,
    /// Expiry of the certificate it presented (ms since the epoch).
    pub cert_not_after_ms: Option<u64>,
}

/// One table on one node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableHealth {
    /// Table.
    pub table: String,
    /// Live generation.
    pub generation: u64,
    /// sha256 (hex) of the live content.
    pub sha256: Option<String>,
    /// A transaction holds the table: since when (ms since the epoch).
    pub busy_since_ms: Option<u64>,
    /// That transaction is prepared (durable) and waits for its decision.
    pub in_doubt: bool,
    /// That transaction was decided commit and its install is being retried.
    pub installing: bool,
    /// The node's live files changed since it installed them (see `TableStatus::drifted`).
    pub drifted: Option<String>,
}

/// A pending change on this node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingHealth {
    /// Table.
    pub table: String,
    /// Pending since (ms since the epoch).
    pub since_ms: u64,
    /// Failed attempts.
    pub attempts: u32,
    /// The last error (shortened).
    pub last_error: String,
    /// Held: its content was rejected by a builder, waiting for the source to change.
    pub held: bool,
}

/// A certificate of this node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertHealth {
    /// `node certificate` or `CA certificate`.
    pub what: String,
    /// Its file.
    pub path: String,
    /// Expiry (ms since the epoch), or why it is unknown.
    pub not_after_ms: Result<u64, String>,
}

/// Thresholds of `txmap check`.
#[derive(Debug, Clone, Copy)]
pub struct Thresholds {
    /// A certificate expiring within this many days: WARNING.
    pub cert_warn_days: u64,
    /// Within this many days (or expired): CRITICAL.
    pub cert_crit_days: u64,
    /// A pending change failing for longer than this (seconds): CRITICAL (WARNING before).
    pub pending_crit_s: u64,
    /// A source differing from what is served, with nothing pending or running for it, for
    /// longer than this (seconds): WARNING (the catch-all for lost changes).
    pub source_grace_s: u64,
}

impl Default for Thresholds {
    fn default() -> Self {
        Thresholds {
            cert_warn_days: 30,
            cert_crit_days: 7,
            pending_crit_s: 3600,
            source_grace_s: 60,
        }
    }
}

/// A table's configured source as `txmap check` read it itself (with the monitoring user's
/// rights, as an untrusted file).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalSource {
    /// Table.
    pub table: String,
    /// Path.
    pub path: String,
    /// sha256 (hex) and mtime (ms since the epoch), or why it could not be read.
    pub read: Result<(String, u64), String>,
}

impl LocalSource {
    /// Reads `path` as an untrusted file (no link followed, no FIFO, one link, at most `max`
    /// bytes) and digests it.
    pub fn read(table: &str, path: &std::path::Path, max: u64) -> LocalSource {
        let read = txmap_common::table::open_untrusted(path, max)
            .and_then(|(f, _)| {
                let mtime = f
                    .metadata()?
                    .modified()?
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_millis() as u64)
                    .unwrap_or(0);
                let bytes = txmap_common::table::read_bounded(f, max)?;
                let d = txmap_common::table::digest_reader(&mut bytes.as_slice())?;
                Ok((txmap_common::table::hex(&d.sha256), mtime))
            })
            .map_err(|e| e.to_string());
        LocalSource {
            table: table.to_string(),
            path: path.display().to_string(),
            read,
        }
    }
}

/// The catch-all for lost changes: a WARNING per table whose source here differs (sha256) from
/// what the in-service nodes agree to serve while nothing is pending or running for it, past
/// the grace period; a note (OK) per source that could not be read. The grace runs from the
/// later of the source's mtime and the time txmapd first saw the source as it is now
/// ([`SourceHealth::unchanged_since_ms`]), and the summary must have been made after it ended:
/// so the summary's "nothing pending" is a view from after the grace, not one from before a
/// hook could have queued the change.
pub fn catch_all(
    h: &Health,
    sources: &[LocalSource],
    grace_ms: u64,
    now_ms: u64,
) -> Vec<(State, String)> {
    let mut out = Vec::new();
    for s in sources {
        let (sha, mtime) = match &s.read {
            Ok(r) => r,
            Err(e) => {
                out.push((
                    State::Ok,
                    format!("source of {} not checked ({}: {e})", s.table, s.path),
                ));
                continue;
            }
        };
        let rows: Vec<&TableHealth> = h
            .nodes
            .iter()
            .filter(|n| n.in_service && n.reachable)
            .filter_map(|n| n.tables.iter().find(|t| t.table == s.table))
            .collect();
        // A table txmap never committed (generation 0 everywhere) has nothing served to
        // compare with: its first commit is the operator's.
        let Some(first) = rows.first().filter(|t| t.generation > 0) else {
            continue;
        };
        let busy = rows.iter().any(|t| t.busy_since_ms.is_some());
        let pending = h
            .pending
            .iter()
            .any(|p| p.table == s.table || p.table.starts_with(&format!("{}@", s.table)));
        let agreed = rows.iter().all(|t| t.sha256 == first.sha256);
        if busy || pending || !agreed || first.sha256.as_deref() == Some(sha.as_str()) {
            continue;
        }
        let seen = h
            .sources
            .iter()
            .find(|x| x.table == s.table)
            .and_then(|x| x.unchanged_since_ms)
            .unwrap_or(h.started_ms);
        let since = (*mtime).max(seen);
        if h.as_of_ms < since.saturating_add(grace_ms) || now_ms < since.saturating_add(grace_ms) {
            continue;
        }
        out.push((
            State::Warning,
            format!(
                "{}: source {} differs from what the in-service nodes serve (generation {}) with nothing pending or running, for {}; `txmap commit {}` distributes it",
                s.table,
                s.path,
                first.generation,
                secs(now_ms.saturating_sub(since)),
                s.table
            ),
        ));
    }
    out
}

/// The four plugin states.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub enum State {
    /// 0.
    Ok,
    /// 1.
    Warning,
    /// 2.
    Critical,
    /// 3.
    Unknown,
}

impl State {
    /// Plugin exit code.
    pub fn code(self) -> u8 {
        match self {
            State::Ok => 0,
            State::Warning => 1,
            State::Critical => 2,
            State::Unknown => 3,
        }
    }
    /// Plugin word.
    pub fn word(self) -> &'static str {
        match self {
            State::Ok => "OK",
            State::Warning => "WARNING",
            State::Critical => "CRITICAL",
            State::Unknown => "UNKNOWN",
        }
    }
}

/// A verdict: the state, the reasons (worst first), the figures.
#[derive(Debug, Clone)]
pub struct Verdict {
    /// Overall state.
    pub state: State,
    /// One phrase per finding.
    pub reasons: Vec<(State, String)>,
    /// Figures: name, value, unit.
    pub perf: Vec<(String, u64, &'static str)>,
}

impl Verdict {
    /// The plugin line: `TXMAP STATE - reasons | perfdata`.
    pub fn line(&self) -> String {
        let mut reasons: Vec<&(State, String)> = self.reasons.iter().collect();
        reasons.sort_by_key(|r| std::cmp::Reverse(r.0));
        let text: Vec<&str> = reasons.iter().map(|(_, r)| r.as_str()).collect();
        let perf: Vec<String> = self
            .perf
            .iter()
            .map(|(n, v, u)| format!("{n}={v}{u}"))
            .collect();
        format!(
            "TXMAP {} - {} | {}",
            self.state.word(),
            text.join("; ").replace('|', "/"),
            perf.join(" ")
        )
    }

    /// A verdict that could not be made (exit 3, or 2 when txmapd is not running).
    pub fn failed(state: State, why: String) -> Verdict {
        Verdict {
            state,
            reasons: vec![(state, why)],
            perf: vec![],
        }
    }
}

fn secs(ms: u64) -> String {
    let s = ms / 1000;
    match s {
        0..=119 => format!("{s}s"),
        120..=7199 => format!("{}m", s / 60),
        _ => format!("{}h", s / 3600),
    }
}

/// The nodes of a summary as [`txmap_common::view`] takes them.
fn observed(h: &Health) -> Vec<txmap_common::view::NodeObs> {
    h.nodes
        .iter()
        .map(|n| txmap_common::view::NodeObs {
            node: n.node.clone(),
            in_service: n.in_service,
            tables: match n.reachable {
                false => Err(n.error.clone().unwrap_or_else(|| "no answer".into())),
                true => Ok(n
                    .tables
                    .iter()
                    .map(|t| txmap_common::view::TableObs {
                        table: t.table.clone(),
                        generation: t.generation,
                        sha256: t.sha256.clone(),
                        busy: t.busy_since_ms.map(|since_ms| txmap_common::view::Busy {
                            since_ms,
                            in_doubt: t.in_doubt,
                            installing: t.installing,
                        }),
                        drifted: t.drifted.clone(),
                    })
                    .collect()),
            },
        })
        .collect()
}

/// Judges a health summary at `now_ms` (without the sources: see [`evaluate_with`]).
pub fn evaluate(h: &Health, t: &Thresholds, now_ms: u64) -> Verdict {
    evaluate_with(h, t, now_ms, &[])
}

/// Judges a health summary and this node's sources, as read by `txmap check`, at `now_ms`.
pub fn evaluate_with(h: &Health, t: &Thresholds, now_ms: u64, sources: &[LocalSource]) -> Verdict {
    let mut reasons: Vec<(State, String)> = Vec::new();
    let serving: Vec<&NodeHealth> = h.nodes.iter().filter(|n| n.in_service).collect();
    let stale = now_ms.saturating_sub(h.as_of_ms);
    if stale > 20 * HEALTH_INTERVAL_MS {
        reasons.push((
            State::Warning,
            format!(
                "health summary is {} old (txmapd's health loop stuck?)",
                secs(stale)
            ),
        ));
    }
    // Nodes.
    let unreachable: Vec<&NodeHealth> = serving.iter().copied().filter(|n| !n.reachable).collect();
    for n in &unreachable {
        reasons.push((
            State::Critical,
            format!(
                "{} unreachable ({})",
                n.node,
                n.error.as_deref().unwrap_or("no answer")
            ),
        ));
    }
    // Tables: the one rule of `txmap_common::view` (status and verify apply it too).
    let view = txmap_common::view::ClusterView::of(
        &observed(h),
        txmap_common::view::Bounds {
            in_doubt_ms: h.in_doubt_ms,
            commit_bound_ms: h.commit_bound_ms,
        },
        now_ms,
    );
    let names: Vec<&str> = view.tables.iter().map(|(n, _)| n.as_str()).collect();
    for (name, v) in &view.tables {
        use txmap_common::view::TableView;
        let state = match v {
            TableView::Agree { .. } | TableView::Busy { .. } => continue,
            TableView::Stuck { .. } => State::Warning,
            TableView::Disagree { .. } | TableView::Drifted { .. } | TableView::InDoubt { .. } => {
                State::Critical
            }
        };
        if let Some(line) = v.describe(name) {
            reasons.push((state, line));
        }
    }
    let mut in_doubt = 0u64;
    let mut oldest_busy = 0u64;
    for n in serving.iter().filter(|n| n.reachable) {
        for t in &n.tables {
            let Some(since) = t.busy_since_ms else {
                continue;
            };
            let age = now_ms.saturating_sub(since);
            oldest_busy = oldest_busy.max(age);
            if t.in_doubt && age > h.in_doubt_ms.min(h.commit_bound_ms) {
                in_doubt += 1;
            }
        }
    }
    // Pending changes.
    let mut oldest_pending = 0u64;
    let mut failing = 0u64;
    for p in &h.pending {
        let age = now_ms.saturating_sub(p.since_ms);
        oldest_pending = oldest_pending.max(age);
        if p.attempts == 0 {
            if age > h.commit_bound_ms * 2 {
                reasons.push((
                    State::Warning,
                    format!(
                        "{}: change pending for {}, not tried yet",
                        p.table,
                        secs(age)
                    ),
                ));
            }
            continue;
        }
        failing += 1;
        let state = if age / 1000 >= t.pending_crit_s {
            State::Critical
        } else {
            State::Warning
        };
        let what = if p.held {
            "content rejected, held until the source changes"
        } else {
            "failing"
        };
        reasons.push((
            state,
            format!(
                "{}: change pending for {}, {what} ({} attempt(s)): {}",
                p.table,
                secs(age),
                p.attempts,
                p.last_error
            ),
        ));
    }
    // Certificates: this node's, the CA's, and those the peers presented.
    let mut cert_days = u64::MAX;
    let mut check_cert = |who: String, until: Result<u64, &String>| match until {
        Err(e) => reasons.push((State::Warning, format!("{who}: {e}"))),
        Ok(until) => {
            let days = until.saturating_sub(now_ms) / 86_400_000;
            cert_days = cert_days.min(days);
            if until <= now_ms {
                reasons.push((State::Critical, format!("{who} expired")));
            } else if days < t.cert_crit_days {
                reasons.push((State::Critical, format!("{who} expires in {days} day(s)")));
            } else if days < t.cert_warn_days {
                reasons.push((State::Warning, format!("{who} expires in {days} day(s)")));
            }
        }
    };
    for c in &h.certs {
        check_cert(
            format!("{} {}", c.what, c.path),
            c.not_after_ms.as_ref().copied(),
        );
    }
    for n in &serving {
        if let Some(until) = n.cert_not_after_ms {
            check_cert(format!("certificate of {}", n.node), Ok(until));
        }
    }
    // The catch-all for lost changes; notes (OK) go after the summary line.
    let mut notes = Vec::new();
    for (s, r) in catch_all(h, sources, t.source_grace_s.saturating_mul(1000), now_ms) {
        match s {
            State::Ok => notes.push((s, r)),
            _ => reasons.push((s, r)),
        }
    }
    let state = reasons.iter().map(|(s, _)| *s).max().unwrap_or(State::Ok);
    if reasons.is_empty() {
        let gens: Vec<String> = names
            .iter()
            .filter_map(|name| {
                let g = serving
                    .iter()
                    .find_map(|n| n.tables.iter().find(|t| t.table == *name))?;
                Some(format!("{name} generation {}", g.generation))
            })
            .collect();
        let out = h.nodes.len() - serving.len();
        reasons.push((
            State::Ok,
            format!(
                "{} in-service node(s) agree{}{}{}",
                serving.len(),
                if gens.is_empty() { "" } else { ": " },
                gens.join(", "),
                if out > 0 {
                    format!(" ({out} out of service)")
                } else {
                    String::new()
                }
            ),
        ));
    }
    reasons.extend(notes);
    let perf = vec![
        ("nodes_in_service".to_string(), serving.len() as u64, ""),
        (
            "nodes_unreachable".to_string(),
            unreachable.len() as u64,
            "",
        ),
        ("pending".to_string(), h.pending.len() as u64, ""),
        ("pending_failing".to_string(), failing, ""),
        ("pending_oldest".to_string(), oldest_pending / 1000, "s"),
        ("in_doubt".to_string(), in_doubt, ""),
        ("busy_oldest".to_string(), oldest_busy / 1000, "s"),
        (
            "cert_days_left".to_string(),
            if cert_days == u64::MAX { 0 } else { cert_days },
            "",
        ),
    ];
    Verdict {
        state,
        reasons,
        perf,
    }
}

fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', " ")
}

/// The same health as Prometheus text (node_exporter's textfile collector).
pub fn prometheus(h: Option<&Health>, v: &Verdict, now_ms: u64) -> String {
    let mut out = String::new();
    let mut metric = |name: &str, help: &str, rows: Vec<(String, f64)>| {
        out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} gauge\n"));
        for (labels, value) in rows {
            if labels.is_empty() {
                out.push_str(&format!("{name} {value}\n"));
            } else {
                out.push_str(&format!("{name}{{{labels}}} {value}\n"));
            }
        }
    };
    metric(
        "txmap_up",
        "1 when the local txmapd answered the probe.",
        vec![(String::new(), if h.is_some() { 1.0 } else { 0.0 })],
    );
    metric(
        "txmap_check_state",
        "Verdict of txmap check: 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN.",
        vec![(String::new(), v.state.code() as f64)],
    );
    let Some(h) = h else {
        return out;
    };
    metric(
        "txmap_health_age_seconds",
        "Age of txmapd's health summary.",
        vec![(
            String::new(),
            now_ms.saturating_sub(h.as_of_ms) as f64 / 1000.0,
        )],
    );
    metric(
        "txmap_node_in_service",
        "1 when the node is in service in this node's config.",
        h.nodes
            .iter()
            .map(|n| {
                (
                    format!("node=\"{}\"", label(&n.node)),
                    if n.in_service { 1.0 } else { 0.0 },
                )
            })
            .collect(),
    );
    metric(
        "txmap_node_reachable",
        "1 when the node answered txmapd's status question.",
        h.nodes
            .iter()
            .map(|n| {
                (
                    format!("node=\"{}\"", label(&n.node)),
                    if n.reachable { 1.0 } else { 0.0 },
                )
            })
            .collect(),
    );
    let mut gens = Vec::new();
    let mut busy = Vec::new();
    let mut doubt = Vec::new();
    for n in &h.nodes {
        for t in &n.tables {
            let l = format!("node=\"{}\",table=\"{}\"", label(&n.node), label(&t.table));
            gens.push((l.clone(), t.generation as f64));
            busy.push((
                l.clone(),
                t.busy_since_ms
                    .map(|s| now_ms.saturating_sub(s) as f64 / 1000.0)
                    .unwrap_or(0.0),
            ));
            doubt.push((l, if t.in_doubt { 1.0 } else { 0.0 }));
        }
    }
    metric(
        "txmap_table_generation",
        "Live generation of the table on the node.",
        gens,
    );
    metric(
        "txmap_transaction_age_seconds",
        "Age of the transaction holding the table (0: none).",
        busy,
    );
    metric(
        "txmap_transaction_prepared",
        "1 when a prepared transaction waits for its decision.",
        doubt,
    );
    let mut pend: Vec<(String, f64)> = Vec::new();
    let mut att: Vec<(String, f64)> = Vec::new();
    let mut held: Vec<(String, f64)> = Vec::new();
    for p in &h.pending {
        let l = format!("table=\"{}\"", label(&p.table));
        pend.push((l.clone(), now_ms.saturating_sub(p.since_ms) as f64 / 1000.0));
        att.push((l.clone(), p.attempts as f64));
        held.push((l, if p.held { 1.0 } else { 0.0 }));
    }
    metric(
        "txmap_pending_age_seconds",
        "Age of each pending change this node coordinates.",
        pend,
    );
    metric(
        "txmap_pending_attempts",
        "Failed attempts of each pending change.",
        att,
    );
    metric(
        "txmap_pending_held",
        "1 when a pending change's content was rejected and waits for the source to change.",
        held,
    );
    let mut certs: Vec<(String, f64)> = h
        .certs
        .iter()
        .filter_map(|c| {
            let until = c.not_after_ms.as_ref().ok()?;
            Some((
                format!("cert=\"{}\"", label(&c.what)),
                *until as f64 / 1000.0,
            ))
        })
        .collect();
    for n in &h.nodes {
        if let Some(u) = n.cert_not_after_ms {
            certs.push((
                format!("cert=\"peer\",node=\"{}\"", label(&n.node)),
                u as f64 / 1000.0,
            ));
        }
    }
    metric(
        "txmap_certificate_expiry_timestamp_seconds",
        "When each certificate expires (Unix time).",
        certs,
    );
    out
}

/// Reads the health summary from the local `txmapd`'s probe socket.
pub fn ask(socket: &std::path::Path) -> Result<Health, String> {
    let mut s = std::os::unix::net::UnixStream::connect(socket)
        .map_err(|e| format!("txmapd not answering on {}: {e}", socket.display()))?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    let h: Health = txmap_common::codec::read_frame_blocking(&mut s)
        .map_err(|e| format!("bad answer on {}: {e}", socket.display()))?;
    if h.version != HEALTH_VERSION {
        return Err(format!(
            "txmapd speaks health version {}, this txmap {HEALTH_VERSION} (upgrade both)",
            h.version
        ));
    }
    Ok(h)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(generation: u64) -> TableHealth {
        TableHealth {
            table: "t".into(),
            generation,
            sha256: Some(format!("{generation:064}")),
            busy_since_ms: None,
            in_doubt: false,
            installing: false,
            drifted: None,
        }
    }

    fn node(name: &str, generation: u64) -> NodeHealth {
        NodeHealth {
            node: name.into(),
            in_service: true,
            reachable: true,
            error: None,
            tables: vec![table(generation)],
            cert_not_after_ms: None,
        }
    }

    fn health() -> Health {
        Health {
            version: HEALTH_VERSION,
            node: "a".into(),
            as_of_ms: 1_000_000,
            started_ms: 0,
            config_loaded_ms: 0,
            in_doubt_ms: 30_000,
            commit_bound_ms: 11_000,
            nodes: vec![node("a", 3), node("b", 3)],
            pending: vec![],
            certs: vec![CertHealth {
                what: "node certificate".into(),
                path: "/x".into(),
                not_after_ms: Ok(1_000_000 + 365 * 86_400_000),
            }],
            sources: vec![],
        }
    }

    #[test]
    fn a_drifted_node_is_critical_and_names_the_healing_command() {
        let mut h = health();
        h.nodes[1].tables[0].drifted = Some("/x/t changed since it was installed".into());
        let v = evaluate(&h, &Thresholds::default(), 1_000_500);
        assert_eq!(v.state, State::Critical, "{}", v.line());
        assert!(v.line().contains("drifted on b"), "{}", v.line());
        assert!(v.line().contains("`txmap commit t`"), "{}", v.line());
    }

    #[test]
    fn the_catch_all_warns_after_the_grace_when_nothing_is_pending() {
        let mut h = health();
        let src = |sha: u64, mtime: u64| LocalSource {
            table: "t".into(),
            path: "/src/t".into(),
            read: Ok((format!("{sha:064}"), mtime)),
        };
        let t = Thresholds::default();
        // The same content as served: OK.
        let v = evaluate_with(&h, &t, 1_000_500, &[src(3, 0)]);
        assert_eq!(v.state, State::Ok, "{}", v.line());
        // Different, changed long ago: WARNING naming the command.
        let v = evaluate_with(&h, &t, 1_000_500, &[src(4, 0)]);
        assert_eq!(v.state, State::Warning, "{}", v.line());
        assert!(
            v.line().contains("`txmap commit t` distributes it"),
            "{}",
            v.line()
        );
        // Within the grace by its mtime, or by when txmapd first saw it: OK.
        let v = evaluate_with(&h, &t, 1_000_500, &[src(4, 990_000)]);
        assert_eq!(v.state, State::Ok, "{}", v.line());
        h.sources.push(SourceHealth {
            table: "t".into(),
            unchanged_since_ms: Some(980_000),
        });
        let v = evaluate_with(&h, &t, 1_000_500, &[src(4, 0)]);
        assert_eq!(v.state, State::Ok, "{}", v.line());
        h.sources.clear();
        // Pending or running: not the catch-all's business.
        h.pending.push(PendingHealth {
            table: "t".into(),
            since_ms: 1_000_000,
            attempts: 0,
            last_error: String::new(),
            held: false,
        });
        assert_eq!(
            evaluate_with(&h, &t, 1_000_500, &[src(4, 0)]).state,
            State::Ok
        );
        h.pending.clear();
        h.nodes[0].tables[0].busy_since_ms = Some(1_000_000);
        assert_eq!(
            evaluate_with(&h, &t, 1_000_500, &[src(4, 0)]).state,
            State::Ok
        );
        h.nodes[0].tables[0].busy_since_ms = None;
        // Unreadable: a note, still OK.
        let v = evaluate_with(
            &h,
            &t,
            1_000_500,
            &[LocalSource {
                table: "t".into(),
                path: "/src/t".into(),
                read: Err("Permission denied".into()),
            }],
        );
        assert_eq!(v.state, State::Ok, "{}", v.line());
        assert!(
            v.line()
                .starts_with("TXMAP OK - 2 in-service node(s) agree"),
            "{}",
            v.line()
        );
        assert!(v.line().contains("source of t not checked"), "{}", v.line());
    }

    #[test]
    fn healthy_is_ok_and_names_the_generation() {
        let v = evaluate(&health(), &Thresholds::default(), 1_000_500);
        assert_eq!(v.state, State::Ok, "{}", v.line());
        assert!(
            v.line()
                .starts_with("TXMAP OK - 2 in-service node(s) agree: t generation 3 | "),
            "{}",
            v.line()
        );
    }

    #[test]
    fn a_down_node_is_critical_but_not_an_out_of_service_one() {
        let mut h = health();
        h.nodes[1].reachable = false;
        h.nodes[1].error = Some("no answer".into());
        assert_eq!(
            evaluate(&h, &Thresholds::default(), 1_000_500).state,
            State::Critical
        );
        h.nodes[1].in_service = false;
        let v = evaluate(&h, &Thresholds::default(), 1_000_500);
        assert_eq!(v.state, State::Ok, "{}", v.line());
    }

    #[test]
    fn drift_is_critical_unless_a_transaction_is_under_way() {
        let mut h = health();
        h.nodes[1].tables[0] = table(2);
        assert_eq!(
            evaluate(&h, &Thresholds::default(), 1_000_500).state,
            State::Critical
        );
        h.nodes[1].tables[0].busy_since_ms = Some(1_000_000);
        assert_eq!(
            evaluate(&h, &Thresholds::default(), 1_000_500).state,
            State::Ok
        );
    }

    #[test]
    fn a_failing_pending_change_warns_then_goes_critical() {
        let mut h = health();
        h.pending.push(PendingHealth {
            table: "t".into(),
            since_ms: 1_000_000,
            attempts: 2,
            last_error: "b: refused: build failed".into(),
            held: true,
        });
        let v = evaluate(&h, &Thresholds::default(), 1_010_000);
        assert_eq!(v.state, State::Warning, "{}", v.line());
        assert!(
            v.line().contains("held until the source changes"),
            "{}",
            v.line()
        );
        let v = evaluate(&h, &Thresholds::default(), 1_000_000 + 3_601_000);
        assert_eq!(v.state, State::Critical);
    }

    #[test]
    fn in_doubt_past_the_bound_is_critical_and_certificates_expire() {
        let mut h = health();
        h.nodes[1].tables[0].busy_since_ms = Some(1_000_000);
        h.nodes[1].tables[0].in_doubt = true;
        assert_eq!(
            evaluate(&h, &Thresholds::default(), 1_005_000).state,
            State::Ok
        );
        assert_eq!(
            evaluate(&h, &Thresholds::default(), 1_015_000).state,
            State::Warning
        );
        let v = evaluate(&h, &Thresholds::default(), 1_031_000);
        assert_eq!(v.state, State::Critical, "{}", v.line());
        let mut h = health();
        h.certs[0].not_after_ms = Ok(1_000_000 + 10 * 86_400_000);
        assert_eq!(
            evaluate(&h, &Thresholds::default(), 1_000_000).state,
            State::Warning
        );
        h.certs[0].not_after_ms = Ok(999_999);
        assert_eq!(
            evaluate(&h, &Thresholds::default(), 1_000_000).state,
            State::Critical
        );
    }

    #[test]
    fn prometheus_text_has_the_figures() {
        let h = health();
        let v = evaluate(&h, &Thresholds::default(), 1_000_500);
        let text = prometheus(Some(&h), &v, 1_000_500);
        assert!(text.contains("txmap_up 1\n"), "{text}");
        assert!(
            text.contains("txmap_table_generation{node=\"b\",table=\"t\"} 3\n"),
            "{text}"
        );
        assert!(
            text.contains("# TYPE txmap_check_state gauge\ntxmap_check_state 0\n"),
            "{text}"
        );
    }
}
