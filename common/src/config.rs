//! One TOML file per node: who this node is, its TLS files, every node of the cluster, every table.
//!
//! Loading never stops at the first problem: [`Config::load`] gathers every problem it can find,
//! each naming the file and the key, so that `txmap check-config` shows them all at once.
//! Relative paths in the file are taken relative to the file's own directory.

use serde::Deserialize;
use std::collections::BTreeSet;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Where the config is read from when neither `--config` nor `TXMAP_CONFIG` says otherwise.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/txmap/txmap.toml";

/// The indexed-file format of a table, as in Postfix's `type:name`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TableType {
    /// Berkeley DB hash, output `<path>.db`.
    Hash,
    /// Berkeley DB btree, output `<path>.db`.
    Btree,
    /// Constant database, output `<path>.cdb` (Debian package `postfix-cdb`).
    Cdb,
    /// LMDB, output `<path>.lmdb` (Debian package `postfix-lmdb`).
    Lmdb,
}

impl TableType {
    /// The Postfix type name (`hash`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            TableType::Hash => "hash",
            TableType::Btree => "btree",
            TableType::Cdb => "cdb",
            TableType::Lmdb => "lmdb",
        }
    }
    /// The suffix Postfix appends to the source path for the indexed file.
    pub fn suffix(self) -> &'static str {
        match self {
            TableType::Hash | TableType::Btree => ".db",
            TableType::Cdb => ".cdb",
            TableType::Lmdb => ".lmdb",
        }
    }
    /// Parses a Postfix type name.
    pub fn parse(s: &str) -> Option<TableType> {
        Some(match s {
            "hash" => TableType::Hash,
            "btree" => TableType::Btree,
            "cdb" => TableType::Cdb,
            "lmdb" => TableType::Lmdb,
            _ => return None,
        })
    }
}

/// Which Postfix program builds the table: `postmap` (lookup tables) or `postalias` (aliases).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Builder {
    /// `key value` lines.
    Postmap,
    /// `name: value` lines (aliases(5)).
    Postalias,
}

impl Builder {
    /// Program name.
    pub fn as_str(self) -> &'static str {
        match self {
            Builder::Postmap => "postmap",
            Builder::Postalias => "postalias",
        }
    }
}

/// How a built table is verified before the node answers *prepared*.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VerifyMode {
    /// Dump the built table (`postmap -s`) and compare its entry count with the source's
    /// (the default; costs about as much as the build).
    Count,
    /// Look up 64 keys sampled uniformly from the source (`postmap -q -`): much cheaper on
    /// large tables, but a dropped entry outside the sample goes unnoticed (postmap still
    /// fails the build on any warning).
    Sample,
}

/// One table this node serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableConfig {
    /// Cluster-wide name (`sympa_transport`); the only thing that crosses the wire.
    pub name: String,
    /// The live source path on this node; the indexed file is this plus the type's suffix.
    pub path: PathBuf,
    /// Where the coordinator reads the new content from (Sympa's file), if this node coordinates.
    pub source: Option<PathBuf>,
    /// Indexed format.
    pub kind: TableType,
    /// Builder program.
    pub builder: Builder,
    /// Accept builder warnings on stderr instead of failing the build.
    pub allow_warnings: bool,
    /// How the built table is verified.
    pub verify: VerifyMode,
}

impl TableConfig {
    /// Path of the live indexed file (`<path>.db`, ...).
    pub fn live_indexed(&self) -> PathBuf {
        crate::table::with_suffix(&self.path, self.kind.suffix())
    }
    /// The directory holding the live table (where staging happens).
    pub fn dir(&self) -> &Path {
        self.path.parent().unwrap_or_else(|| Path::new("/"))
    }
}

/// One node of the cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeConfig {
    /// Node name; also the DNS name in its certificate.
    pub name: String,
    /// UDP address of its `txmapd`.
    pub address: SocketAddr,
    /// `false` takes the node out of service: commits skip it (maintenance). It catches up
    /// with the next commit once back in service.
    pub in_service: bool,
}

/// Deadlines used by the coordinator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// QUIC handshake to one node.
    pub connect: Duration,
    /// Whole prepare phase (upload, build, verify, fsync) on one node.
    pub prepare: Duration,
    /// Commit or abort acknowledgement from one node.
    pub commit: Duration,
    /// How long a commit keeps retrying when another transaction holds the table.
    pub busy_retry: Duration,
    /// Hard bound on one `txmap commit` (Sympa waits 20 s for its own lock).
    pub total: Duration,
    /// Bound on how long a participant stays in doubt while every node is up.
    pub in_doubt: Duration,
    /// Longest wait between two retries of a pending commit.
    pub retry_max: Duration,
}

impl Timeouts {
    /// The prepare deadline for a table of `bytes`: `prepare`, plus time in proportion to the
    /// work, so that a big table commits with the default settings. A whole table is uploaded,
    /// built and dumped on every node (allowed 300 ns per byte: 64 MB adds 19 s); a delta
    /// copies the live file and rewrites the source (30 ns per byte).
    pub fn prepare_for(&self, bytes: u64, whole: bool) -> Duration {
        let per_byte = if whole { 300 } else { 30 };
        self.prepare + Duration::from_nanos(bytes.saturating_mul(per_byte))
    }
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            connect: Duration::from_millis(1500),
            prepare: Duration::from_millis(5000),
            commit: Duration::from_millis(2000),
            busy_retry: Duration::from_millis(6000),
            total: Duration::from_millis(9000),
            in_doubt: Duration::from_millis(30_000),
            retry_max: Duration::from_millis(30_000),
        }
    }
}

/// Postfix programs and configuration directory of this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PostfixSettings {
    /// Passed as `-c DIR` to postmap/postalias when set.
    pub config_dir: Option<PathBuf>,
    /// Path of `postmap`.
    pub postmap: PathBuf,
    /// Path of `postalias`.
    pub postalias: PathBuf,
}

/// The local socket `txmap-sympa` uses to ask this node's `txmapd` to distribute a table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HookSettings {
    /// Unix socket path [default: `<state_dir>/txmapd.sock`].
    pub socket: PathBuf,
    /// Group given the socket (e.g. `sympa`), so that only its members may ask.
    pub group: Option<String>,
    /// Permission bits of the socket [default: 0660].
    pub mode: u32,
}

impl HookSettings {
    /// Where requests wait while `txmapd` is down: `<state_dir>/requests/<table>`.
    pub fn requests_dir(state_dir: &Path) -> PathBuf {
        state_dir.join("requests")
    }
}

/// The read-only probe socket `txmap check` asks for a health summary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeSettings {
    /// Unix socket path [default: `<state_dir>/txmapd-probe.sock`].
    pub socket: PathBuf,
    /// Permission bits [default: 0666: any local user, e.g. the monitoring agent's].
    pub mode: u32,
}

/// A node's whole configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file it was read from.
    pub file: PathBuf,
    /// This node's name (must be one of `nodes`).
    pub node: String,
    /// Journal, decision log and history live here.
    pub state_dir: PathBuf,
    /// Where `txmapd` listens (UDP).
    pub listen: SocketAddr,
    /// Cluster CA certificate (PEM).
    pub ca: PathBuf,
    /// This node's certificate (PEM).
    pub cert: PathBuf,
    /// This node's private key (PEM).
    pub key: PathBuf,
    /// Postfix programs.
    pub postfix: PostfixSettings,
    /// The Sympa hook's local socket.
    pub hook: HookSettings,
    /// The monitoring probe's local socket.
    pub probe: ProbeSettings,
    /// Deadlines.
    pub timeouts: Timeouts,
    /// Largest table source accepted, in bytes.
    pub max_table_bytes: u64,
    /// Generations of each table kept in history (at least 1).
    pub history_keep: usize,
    /// A commit that would remove more than this share (percent) of the live table's keys is
    /// refused unless forced; 100 turns the share off (emptying a table of more than
    /// `guard_free_keys` keys is refused anyway unless forced).
    pub max_shrink_percent: u64,
    /// The content guard never refuses a change that removes at most this many keys
    /// (Sympa's ordinary change, even one that empties the table).
    pub guard_free_keys: u64,
    /// Delta commits: a change touching at most this share (percent) of the live entries is
    /// sent as a delta and built incrementally; 0 turns delta commits off (always whole tables).
    pub delta_max_percent: u64,
    /// Every this many incremental builds of a table in a row, the next one is a full build
    /// (the reference).
    pub delta_full_every: u32,
    /// Every node of the cluster, this one included.
    pub nodes: Vec<NodeConfig>,
    /// Every table.
    pub tables: Vec<TableConfig>,
}

/// Every problem found in a config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The file.
    pub file: PathBuf,
    /// One line per problem: `key: what is wrong`.
    pub problems: Vec<String>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: {} problem(s)",
            self.file.display(),
            self.problems.len()
        )?;
        for p in &self.problems {
            write!(f, "\n  {}: {p}", self.file.display())?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    node: Option<String>,
    state_dir: Option<PathBuf>,
    listen: Option<String>,
    tls: Option<RawTls>,
    postfix: Option<RawPostfix>,
    hook: Option<RawHook>,
    probe: Option<RawProbe>,
    timeouts: Option<RawTimeouts>,
    max_table_bytes: Option<u64>,
    history_keep: Option<usize>,
    max_shrink_percent: Option<u64>,
    guard_free_keys: Option<u64>,
    delta_max_percent: Option<u64>,
    delta_full_every: Option<u32>,
    #[serde(default)]
    nodes: Vec<RawNode>,
    #[serde(default)]
    tables: Vec<RawTable>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    ca: Option<PathBuf>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPostfix {
    config_dir: Option<PathBuf>,
    postmap: Option<PathBuf>,
    postalias: Option<PathBuf>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHook {
    socket: Option<PathBuf>,
    group: Option<String>,
    mode: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProbe {
    socket: Option<PathBuf>,
    mode: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTimeouts {
    connect_ms: Option<u64>,
    prepare_ms: Option<u64>,
    commit_ms: Option<u64>,
    busy_retry_ms: Option<u64>,
    total_ms: Option<u64>,
    in_doubt_ms: Option<u64>,
    retry_max_ms: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNode {
    name: Option<String>,
    address: Option<String>,
    in_service: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTable {
    name: Option<String>,
    path: Option<PathBuf>,
    source: Option<PathBuf>,
    #[serde(rename = "type")]
    kind: Option<String>,
    builder: Option<String>,
    #[serde(default)]
    allow_warnings: bool,
    verify: Option<String>,
}

/// A table name is a plain file-name-like word: it can never name a path.
pub fn valid_table_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b))
}

/// A node name is a DNS name (it is matched against certificate names).
pub fn valid_node_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

impl Config {
    /// Picks the config path: `--config`, else `TXMAP_CONFIG`, else [`DEFAULT_CONFIG_PATH`].
    pub fn resolve_path(explicit: Option<&Path>) -> PathBuf {
        if let Some(p) = explicit {
            return p.to_path_buf();
        }
        match std::env::var_os("TXMAP_CONFIG") {
            Some(p) if !p.is_empty() => PathBuf::from(p),
            _ => PathBuf::from(DEFAULT_CONFIG_PATH),
        }
    }

    /// Reads and validates a config file, reporting every problem found.
    pub fn load(file: &Path) -> Result<Config, ConfigError> {
        let err = |problems: Vec<String>| ConfigError {
            file: file.to_path_buf(),
            problems,
        };
        let text =
            std::fs::read_to_string(file).map_err(|e| err(vec![format!("cannot read: {e}")]))?;
        Config::parse(&text, file)
    }

    /// Validates config text; `file` names it in errors and anchors relative paths.
    pub fn parse(text: &str, file: &Path) -> Result<Config, ConfigError> {
        match Config::parse_partial(text, file) {
            (Some(c), p) if p.is_empty() => Ok(c),
            (_, p) => Err(ConfigError {
                file: file.to_path_buf(),
                problems: if p.is_empty() {
                    vec!["incomplete configuration".into()]
                } else {
                    p
                },
            }),
        }
    }

    /// Validates config text and returns every problem found, plus the config whenever its
    /// required keys are usable (so that the filesystem checks of `check-config` can run in
    /// the same pass). A TOML syntax or type error stops the parse: it is reported alone, with
    /// its line and, when it concerns a value, its key.
    pub fn parse_partial(text: &str, file: &Path) -> (Option<Config>, Vec<String>) {
        let raw: RawConfig = match toml::from_str(text) {
            Ok(r) => r,
            Err(e) => {
                let msg = e.message().to_string();
                let at = e
                    .span()
                    .map(|s| {
                        let start = s.start.min(text.len());
                        let line = text.as_bytes()[..start]
                            .iter()
                            .filter(|b| **b == b'\n')
                            .count()
                            + 1;
                        match key_at(text, start) {
                            Some(k) => format!("line {line}: key `{k}`: "),
                            None => format!("line {line}: "),
                        }
                    })
                    .unwrap_or_default();
                return (None, vec![format!("{at}{msg}")]);
            }
        };
        let base = file.parent().map(Path::to_path_buf).unwrap_or_default();
        let abs = |p: PathBuf| if p.is_absolute() { p } else { base.join(p) };
        let mut problems = Vec::new();
        let need = |key: &str, v: Option<PathBuf>, problems: &mut Vec<String>| match v {
            Some(p) => Some(abs(p)),
            None => {
                problems.push(format!("missing key `{key}`"));
                None
            }
        };

        let node = raw.node.clone();
        if node.is_none() {
            problems.push("missing key `node` (this node's name)".into());
        }
        let state_dir = need("state_dir", raw.state_dir, &mut problems);
        let listen = match raw.listen.as_deref() {
            None => {
                problems.push("missing key `listen` (address:port of txmapd)".into());
                None
            }
            Some(s) => match s.parse::<SocketAddr>() {
                Ok(a) => Some(a),
                Err(_) => {
                    problems.push(format!("key `listen`: `{s}` is not an address:port"));
                    None
                }
            },
        };
        let (ca, cert, key) = match raw.tls {
            None => {
                problems.push("missing table `[tls]` (keys ca, cert, key)".into());
                (None, None, None)
            }
            Some(t) => (
                need("tls.ca", t.ca, &mut problems),
                need("tls.cert", t.cert, &mut problems),
                need("tls.key", t.key, &mut problems),
            ),
        };
        let postfix = {
            let p = raw.postfix.unwrap_or(RawPostfix {
                config_dir: None,
                postmap: None,
                postalias: None,
            });
            PostfixSettings {
                config_dir: p.config_dir.map(&abs),
                postmap: p
                    .postmap
                    .map(&abs)
                    .unwrap_or_else(|| PathBuf::from("/usr/sbin/postmap")),
                postalias: p
                    .postalias
                    .map(&abs)
                    .unwrap_or_else(|| PathBuf::from("/usr/sbin/postalias")),
            }
        };
        let raw_hook = raw.hook.unwrap_or(RawHook {
            socket: None,
            group: None,
            mode: None,
        });
        let hook_mode = match raw_hook.mode.as_deref() {
            None => 0o660,
            Some(m) => match u32::from_str_radix(m.trim_start_matches("0o"), 8) {
                Ok(v) if v <= 0o777 => v,
                _ => {
                    problems.push(format!(
                        "key `hook.mode`: `{m}` is not an octal mode like \"0660\""
                    ));
                    0o660
                }
            },
        };
        let mut timeouts = Timeouts::default();
        if let Some(t) = raw.timeouts {
            let mut set = |key: &str, v: Option<u64>, slot: &mut Duration| {
                if let Some(ms) = v {
                    if ms == 0 || ms > 3_600_000 {
                        problems.push(format!("key `timeouts.{key}`: {ms} is outside 1..=3600000"));
                    } else {
                        *slot = Duration::from_millis(ms);
                    }
                }
            };
            set("connect_ms", t.connect_ms, &mut timeouts.connect);
            set("prepare_ms", t.prepare_ms, &mut timeouts.prepare);
            set("commit_ms", t.commit_ms, &mut timeouts.commit);
            set("busy_retry_ms", t.busy_retry_ms, &mut timeouts.busy_retry);
            set("total_ms", t.total_ms, &mut timeouts.total);
            set("in_doubt_ms", t.in_doubt_ms, &mut timeouts.in_doubt);
            set("retry_max_ms", t.retry_max_ms, &mut timeouts.retry_max);
        }
        if timeouts.commit >= timeouts.total {
            problems.push(format!(
                "keys `timeouts.commit_ms` ({}) and `timeouts.total_ms` ({}): commit_ms must be below total_ms (the commit phase is part of the total; otherwise every commit aborts)",
                timeouts.commit.as_millis(),
                timeouts.total.as_millis()
            ));
        }

        if raw.max_shrink_percent.is_some_and(|p| p > 100) {
            problems.push("key `max_shrink_percent`: must be between 0 and 100".into());
        }
        if raw.delta_max_percent.is_some_and(|p| p > 100) {
            problems.push("key `delta_max_percent`: must be between 0 and 100".into());
        }
        if raw.delta_full_every == Some(0) {
            problems.push(
                "key `delta_full_every`: must be at least 1 (use delta_max_percent = 0 to turn delta commits off)"
                    .into(),
            );
        }
        if raw.history_keep == Some(0) {
            problems.push("key `history_keep`: must be at least 1 (the live generation)".into());
        }
        let mut nodes = Vec::new();
        let mut names = BTreeSet::new();
        let mut addrs = BTreeSet::new();
        if raw.nodes.is_empty() {
            problems.push("no `[[nodes]]`: the cluster needs at least this node".into());
        }
        let raw_names: BTreeSet<String> = raw.nodes.iter().filter_map(|n| n.name.clone()).collect();
        for (i, n) in raw.nodes.into_iter().enumerate() {
            let name = match n.name {
                None => {
                    problems.push(format!("missing key `nodes[{i}].name`"));
                    continue;
                }
                Some(name) if !valid_node_name(&name) => {
                    problems.push(format!("key `nodes[{i}].name`: `{name}` is not a DNS name"));
                    continue;
                }
                Some(name) => name,
            };
            // Certificates match names case-insensitively (DNS names), so must we.
            if !names.insert(name.to_ascii_lowercase()) {
                problems.push(format!(
                    "key `nodes[{i}].name`: node `{name}` is listed twice (names compare case-insensitively)"
                ));
            }
            match n.address.as_deref().map(|a| (a, a.parse::<SocketAddr>())) {
                None => problems.push(format!("missing key `nodes[{i}].address` (node {name})")),
                Some((a, Err(_))) => problems.push(format!(
                    "key `nodes[{i}].address`: `{a}` is not an address:port"
                )),
                Some((_, Ok(address))) => {
                    if !addrs.insert(address) {
                        problems.push(format!("key `nodes[{i}].address`: {address} is used twice"));
                    }
                    nodes.push(NodeConfig {
                        name,
                        address,
                        in_service: n.in_service.unwrap_or(true),
                    });
                }
            }
        }
        if let Some(n) = &node {
            if !names.contains(&n.to_ascii_lowercase()) || !raw_names.contains(n) {
                problems.push(format!("key `node`: `{n}` is not one of the `[[nodes]]`"));
            }
        }

        let mut tables = Vec::new();
        let mut tnames = BTreeSet::new();
        let mut tpaths = BTreeSet::new();
        for (i, t) in raw.tables.into_iter().enumerate() {
            let name = match t.name {
                None => {
                    problems.push(format!("missing key `tables[{i}].name`"));
                    continue;
                }
                Some(n) if !valid_table_name(&n) => {
                    problems.push(format!(
                        "key `tables[{i}].name`: `{n}` is not a plain name (letters, digits, `_-.`)"
                    ));
                    continue;
                }
                Some(n) => n,
            };
            if !tnames.insert(name.clone()) {
                problems.push(format!(
                    "key `tables[{i}].name`: table `{name}` is listed twice"
                ));
            }
            let path = match t.path {
                None => {
                    problems.push(format!("missing key `tables[{i}].path` (table {name})"));
                    None
                }
                Some(p) => {
                    let p = abs(p);
                    if p.file_name().is_none() || p.parent().is_none() {
                        problems.push(format!(
                            "key `tables[{i}].path`: `{}` names no file",
                            p.display()
                        ));
                        None
                    } else {
                        if !tpaths.insert(p.clone()) {
                            problems.push(format!(
                                "key `tables[{i}].path`: `{}` used twice",
                                p.display()
                            ));
                        }
                        Some(p)
                    }
                }
            };
            let kind = match t.kind.as_deref() {
                None => {
                    problems.push(format!("missing key `tables[{i}].type` (table {name})"));
                    None
                }
                Some(k) => TableType::parse(k).or_else(|| {
                    problems.push(format!(
                        "key `tables[{i}].type`: unknown type `{k}` (expected hash, btree, cdb or lmdb)"
                    ));
                    None
                }),
            };
            let builder = match t.builder.as_deref() {
                None | Some("postmap") => Some(Builder::Postmap),
                Some("postalias") => Some(Builder::Postalias),
                Some(b) => {
                    problems.push(format!(
                        "key `tables[{i}].builder`: unknown builder `{b}` (expected postmap or postalias)"
                    ));
                    None
                }
            };
            let verify = match t.verify.as_deref() {
                None | Some("count") => Some(VerifyMode::Count),
                Some("sample") => Some(VerifyMode::Sample),
                Some(v) => {
                    problems.push(format!(
                        "key `tables[{i}].verify`: unknown mode `{v}` (expected count or sample)"
                    ));
                    None
                }
            };
            if let (Some(path), Some(kind), Some(builder), Some(verify)) =
                (path, kind, builder, verify)
            {
                tables.push(TableConfig {
                    name,
                    path,
                    source: t.source.map(&abs),
                    kind,
                    builder,
                    allow_warnings: t.allow_warnings,
                    verify,
                });
            }
        }

        for (i, t) in tables.iter().enumerate() {
            let same = |a: &Path, b: &Path| {
                a == b
                    || matches!(
                        (std::fs::canonicalize(a), std::fs::canonicalize(b)),
                        (Ok(x), Ok(y)) if x == y
                    )
            };
            if let Some(src) = &t.source {
                if same(src, &t.path) {
                    problems.push(format!(
                        "key `tables[{i}].source`: the same file as `tables[{i}].path` ({}): txmap renames its own copy over `path` at every commit; keep Sympa's file elsewhere",
                        t.path.display()
                    ));
                }
            }
        }
        if let (Some(n), Some(l)) = (&node, listen) {
            if let Some(me) = nodes.iter().find(|x| &x.name == n) {
                let ip_ok = l.ip().is_unspecified() || l.ip() == me.address.ip();
                if l.port() != me.address.port() || !ip_ok {
                    problems.push(format!(
                        "key `listen`: {l} does not match this node's own address {} (`nodes[].address` of `{n}`): peers would dial a port nobody listens on",
                        me.address
                    ));
                }
            }
        }
        for (key, v) in [
            ("connect_ms", timeouts.connect),
            ("prepare_ms", timeouts.prepare),
        ] {
            if v >= timeouts.total {
                problems.push(format!(
                    "keys `timeouts.{key}` ({}) and `timeouts.total_ms` ({}): {key} must be below total_ms (a commit is bounded by total_ms)",
                    v.as_millis(),
                    timeouts.total.as_millis()
                ));
            }
        }
        if timeouts.in_doubt < timeouts.commit * 2 {
            problems.push(format!(
                "keys `timeouts.in_doubt_ms` ({}) and `timeouts.commit_ms` ({}): in_doubt_ms must be at least twice commit_ms (a prepared node would ask its peers while the decision is still being delivered)",
                timeouts.in_doubt.as_millis(),
                timeouts.commit.as_millis()
            ));
        }
        let probe_mode = match raw.probe.as_ref().and_then(|p| p.mode.as_deref()) {
            None => 0o666,
            Some(m) => match u32::from_str_radix(m.trim_start_matches("0o"), 8) {
                Ok(v) if v <= 0o777 => v,
                _ => {
                    problems.push(format!(
                        "key `probe.mode`: `{m}` is not an octal mode like \"0666\""
                    ));
                    0o666
                }
            },
        };
        let (Some(node), Some(state_dir), Some(listen), Some(ca), Some(cert), Some(key)) =
            (node, state_dir, listen, ca, cert, key)
        else {
            return (None, problems);
        };
        let probe = ProbeSettings {
            socket: raw
                .probe
                .and_then(|p| p.socket)
                .map(&abs)
                .unwrap_or_else(|| state_dir.join("txmapd-probe.sock")),
            mode: probe_mode,
        };
        let hook = HookSettings {
            socket: raw_hook
                .socket
                .map(&abs)
                .unwrap_or_else(|| state_dir.join("txmapd.sock")),
            group: raw_hook.group,
            mode: hook_mode,
        };
        let cfg = Config {
            file: file.to_path_buf(),
            hook,
            probe,
            node,
            state_dir,
            listen,
            ca,
            cert,
            key,
            postfix,
            timeouts,
            max_table_bytes: raw.max_table_bytes.unwrap_or(1 << 30),
            history_keep: raw.history_keep.unwrap_or(10),
            max_shrink_percent: raw.max_shrink_percent.unwrap_or(50),
            guard_free_keys: raw.guard_free_keys.unwrap_or(20),
            delta_max_percent: raw.delta_max_percent.unwrap_or(10),
            delta_full_every: raw.delta_full_every.unwrap_or(100),
            nodes,
            tables,
        };
        (Some(cfg), problems)
    }

    /// The table named `name`, if this node serves it.
    pub fn table(&self, name: &str) -> Option<&TableConfig> {
        self.tables.iter().find(|t| t.name == name)
    }

    /// The nodes that take part in commits (in service).
    pub fn active_nodes(&self) -> Vec<NodeConfig> {
        self.nodes
            .iter()
            .filter(|n| n.in_service)
            .cloned()
            .collect()
    }

    /// The table whose `source` is `path` (compared as given, then canonicalized).
    pub fn table_by_source(&self, path: &Path) -> Option<&TableConfig> {
        let canon = |p: &Path| std::fs::canonicalize(p).ok();
        self.tables
            .iter()
            .find(|t| t.source.as_deref() == Some(path))
            .or_else(|| {
                let want = canon(path)?;
                self.tables
                    .iter()
                    .find(|t| t.source.as_deref().and_then(canon).as_ref() == Some(&want))
            })
    }

    /// The node named `name`, if configured.
    pub fn node_by_name(&self, name: &str) -> Option<&NodeConfig> {
        self.nodes.iter().find(|n| n.name == name)
    }

    /// Problems that need the filesystem, all in one pass, each naming its key: the TLS files
    /// (parse, chain to the CA, key matches, name matches `node`, expiry, key mode), the hook's
    /// group, the state directory and the table directories (usable for writing), the builder
    /// programs, the sources, `postfix.config_dir`. Empty when all is well.
    ///
    /// [`Problem::fatal`] ones make `txmapd` refuse to start; the others (a missing source or
    /// builder, say) concern commits only and `txmapd` logs them as warnings.
    pub fn check_files(&self) -> Vec<Problem> {
        let mut out = Vec::new();
        let fatal = |text: String| Problem { text, fatal: true };
        let advisory = |text: String| Problem { text, fatal: false };
        for p in crate::certs::check_node_tls(
            &self.ca,
            &self.cert,
            &self.key,
            &self.node,
            crate::now_ms(),
        ) {
            out.push(fatal(format!("key `{}`: {}", p.key, p.detail)));
        }
        if let Some(g) = &self.hook.group {
            if group_id(g).is_none() {
                out.push(fatal(format!(
                    "key `hook.group`: group `{g}` not found in /etc/group (the hook socket could not be given to it)"
                )));
            }
        }
        if let Err(e) = usable_dir(&self.state_dir, true) {
            out.push(fatal(format!("key `state_dir`: {e}")));
        }
        for (i, t) in self.tables.iter().enumerate() {
            if let Err(e) = usable_dir(t.dir(), false) {
                // Not fatal: txmapd must start and serve every other table while one table's
                // directory is unusable (an install that keeps failing is retried; issue 9).
                out.push(advisory(format!(
                    "key `tables[{i}].path` (table {}): directory {e}",
                    t.name
                )));
            }
            let (key, prog) = match t.builder {
                Builder::Postmap => ("postfix.postmap", &self.postfix.postmap),
                Builder::Postalias => ("postfix.postalias", &self.postfix.postalias),
            };
            if !prog.is_file() {
                out.push(advisory(format!(
                    "key `{key}` (table {}): builder {} not found (install Debian package postfix)",
                    t.name,
                    prog.display()
                )));
            }
            if let Some(src) = &t.source {
                if !src.is_file() {
                    out.push(advisory(format!(
                        "key `tables[{i}].source` (table {}): {} does not exist",
                        t.name,
                        src.display()
                    )));
                }
            }
        }
        if let Some(d) = &self.postfix.config_dir {
            if !d.join("main.cf").is_file() {
                out.push(advisory(format!(
                    "key `postfix.config_dir`: {} has no main.cf",
                    d.display()
                )));
            }
        }
        out
    }

    /// Everything `txmap check-config` checks, in one pass: the file's problems, then (when it
    /// could be read far enough) the filesystem's. `None` config: unusable.
    pub fn check(file: &Path) -> (Option<Config>, Vec<Problem>) {
        let text = match std::fs::read_to_string(file) {
            Ok(t) => t,
            Err(e) => {
                return (
                    None,
                    vec![Problem {
                        text: format!("cannot read: {e}"),
                        fatal: true,
                    }],
                )
            }
        };
        let (cfg, problems) = Config::parse_partial(&text, file);
        let mut all: Vec<Problem> = problems
            .into_iter()
            .map(|text| Problem { text, fatal: true })
            .collect();
        if let Some(c) = &cfg {
            all.extend(c.check_files());
        }
        let usable = all.iter().all(|p| !p.fatal);
        (cfg.filter(|_| usable), all)
    }
}

/// One problem found by [`Config::check`]: `key `K`: what is wrong`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The text, starting with the key it concerns.
    pub text: String,
    /// `txmapd` refuses to start on it.
    pub fatal: bool,
}

/// Formats problems the one way `check-config` and `txmapd` print them.
pub fn format_problems(file: &Path, problems: &[Problem]) -> String {
    let mut s = format!("{}: {} problem(s)", file.display(), problems.len());
    for p in problems {
        s.push_str(&format!("\n  {}: {}", file.display(), p.text));
    }
    s
}

/// The id of group `g` in /etc/group.
pub fn group_id(g: &str) -> Option<u32> {
    std::fs::read_to_string("/etc/group")
        .ok()?
        .lines()
        .find_map(|l| {
            let mut f = l.split(':');
            (f.next() == Some(g))
                .then(|| f.nth(1).and_then(|x| x.parse::<u32>().ok()))
                .flatten()
        })
}

/// A directory txmap must write in: it is a directory (or, with `may_create`, its parent is
/// one), and a file can be created in it (a read-only mount or a file in its place fails).
fn usable_dir(dir: &Path, may_create: bool) -> Result<(), String> {
    match std::fs::symlink_metadata(dir) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => return Err(format!("{} is not a directory", dir.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && may_create => {
            let parent = dir.parent().unwrap_or_else(|| Path::new("/"));
            return if parent.is_dir() {
                Ok(())
            } else {
                Err(format!(
                    "{} does not exist, nor does its parent",
                    dir.display()
                ))
            };
        }
        Err(e) => return Err(format!("{}: {e}", dir.display())),
    }
    let probe = dir.join(format!(".txmap-check-{}", crate::proto::TxId::random()));
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&probe)
    {
        Ok(_) => {
            let _ = std::fs::remove_file(&probe);
            Ok(())
        }
        Err(e) => Err(format!("{} is not writable: {e}", dir.display())),
    }
}

/// The dotted key of the value at byte `offset` of a TOML text (`tables[1].verify`), from the
/// line's `key =` and the table header above it.
fn key_at(text: &str, offset: usize) -> Option<String> {
    let before = &text[..offset.min(text.len())];
    let line_start = before.rfind('\n').map(|i| i + 1).unwrap_or(0);
    let line_end = text[line_start..]
        .find('\n')
        .map(|i| line_start + i)
        .unwrap_or(text.len());
    let line = &text[line_start..line_end];
    let (k, _) = line.split_once('=')?;
    let k = k.trim();
    if k.is_empty() || k.starts_with('[') || k.starts_with('#') {
        return None;
    }
    // The nearest header above, and its index among headers of the same array of tables.
    let mut header: Option<(String, bool)> = None;
    for l in text[..line_start].lines() {
        let l = l.trim();
        if let Some(h) = l.strip_prefix("[[").and_then(|r| r.split_once("]]")) {
            header = Some((h.0.trim().to_string(), true));
        } else if let Some(h) = l.strip_prefix('[').and_then(|r| r.split_once(']')) {
            header = Some((h.0.trim().to_string(), false));
        }
    }
    Some(match header {
        None => k.to_string(),
        Some((h, false)) => format!("{h}.{k}"),
        Some((h, true)) => {
            let n = text[..line_start]
                .lines()
                .filter(|l| {
                    l.trim()
                        .strip_prefix("[[")
                        .and_then(|r| r.split_once("]]"))
                        .is_some_and(|x| x.0.trim() == h)
                })
                .count();
            format!("{h}[{}].{k}", n.saturating_sub(1))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
node = "node1"
state_dir = "state"
listen = "127.0.0.1:7401"
[tls]
ca = "ca.pem"
cert = "node1.pem"
key = "node1.key"
[[nodes]]
name = "node1"
address = "127.0.0.1:7401"
[[nodes]]
name = "node2"
address = "127.0.0.1:7402"
[[tables]]
name = "sympa_transport"
path = "/etc/postfix/sympa_transport"
source = "/var/lib/sympa/sympa_transport"
type = "hash"
"#;

    #[test]
    fn reads_a_good_file_and_anchors_relative_paths() {
        let c = Config::parse(GOOD, Path::new("/etc/txmap/txmap.toml")).unwrap();
        assert_eq!(c.node, "node1");
        assert_eq!(c.state_dir, PathBuf::from("/etc/txmap/state"));
        assert_eq!(c.nodes.len(), 2);
        let t = c.table("sympa_transport").unwrap();
        assert_eq!(t.kind, TableType::Hash);
        assert_eq!(t.builder, Builder::Postmap);
        assert_eq!(
            t.live_indexed(),
            PathBuf::from("/etc/postfix/sympa_transport.db")
        );
    }

    #[test]
    fn reports_every_problem_with_its_key() {
        let bad = GOOD
            .replace("listen = \"127.0.0.1:7401\"\n", "")
            .replace("type = \"hash\"", "type = \"hsh\"")
            .replace("name = \"node2\"", "name = \"node1\"");
        let e = Config::parse(&bad, Path::new("x.toml")).unwrap_err();
        let all = e.problems.join("\n");
        assert!(all.contains("missing key `listen`"), "{all}");
        assert!(
            all.contains("`tables[0].type`: unknown type `hsh`"),
            "{all}"
        );
        assert!(all.contains("node `node1` is listed twice"), "{all}");
        assert_eq!(e.problems.len(), 3, "{all}");
    }

    #[test]
    fn refuses_a_table_name_that_is_a_path() {
        let bad = GOOD.replace("name = \"sympa_transport\"", "name = \"../../x\"");
        let e = Config::parse(&bad, Path::new("x.toml")).unwrap_err();
        assert!(e.problems[0].contains("not a plain name"), "{e}");
        assert!(!valid_table_name(".."));
        assert!(!valid_table_name("a/b"));
        assert!(valid_table_name("sympa_aliases"));
    }

    #[test]
    fn names_the_line_of_a_syntax_error_and_unknown_keys() {
        let e = Config::parse("node = \"a\"\nbogus = 1\n", Path::new("x.toml")).unwrap_err();
        assert!(e.problems[0].contains("line 2"), "{e}");
        assert!(e.problems[0].contains("bogus"), "{e}");
    }

    #[test]
    fn a_type_error_names_its_key() {
        let bad = GOOD.replace(
            "type = \"hash\"",
            "type = \"hash\"\nallow_warnings = \"yes\"",
        );
        let e = Config::parse(&bad, Path::new("x.toml")).unwrap_err();
        assert!(
            e.problems[0].contains("key `tables[0].allow_warnings`"),
            "{e}"
        );
        let bad = GOOD.replace("[tls]", "max_table_bytes = \"big\"\n[tls]");
        let e = Config::parse(&bad, Path::new("x.toml")).unwrap_err();
        assert!(e.problems[0].contains("key `max_table_bytes`"), "{e}");
    }

    #[test]
    fn path_equal_to_source_and_a_listen_port_not_the_nodes_own_are_refused() {
        let bad = GOOD
            .replace(
                "source = \"/var/lib/sympa/sympa_transport\"",
                "source = \"/etc/postfix/sympa_transport\"",
            )
            .replace("listen = \"127.0.0.1:7401\"", "listen = \"0.0.0.0:7409\"");
        let e = Config::parse(&bad, Path::new("x.toml")).unwrap_err();
        let all = e.problems.join("\n");
        assert!(
            all.contains("key `tables[0].source`: the same file"),
            "{all}"
        );
        assert!(
            all.contains("key `listen`: 0.0.0.0:7409 does not match"),
            "{all}"
        );
        let ok = GOOD.replace("listen = \"127.0.0.1:7401\"", "listen = \"0.0.0.0:7401\"");
        assert!(Config::parse(&ok, Path::new("x.toml")).is_ok());
    }
}
