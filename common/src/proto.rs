//! Wire messages between the coordinator (`txmap`) and the participants (`txmapd`).
//!
//! Every request travels on its own bidirectional QUIC stream: one request frame (see
//! [`crate::codec`]), for `Prepare` followed by exactly `source_len` raw bytes of the table, then
//! the stream is finished; the participant answers with one response frame.
//!
//! ```text
//!  coordinator (txmap commit)                 participant (txmapd) x N, in parallel
//!  ─────────────────────────                  ─────────────────────────────────────
//!  Status{table}                      ───────▶ reads its journal
//!                                     ◀─────── Status[generation, sha256, prepared?]
//!  gen = max(generations) + 1
//!  Prepare{txid, gen, sha256, len} + bytes ──▶ try-lock table, stream to .<file>.txmap-<txid>,
//!                                              check sha256/len, postmap/postalias it,
//!                                              verify entry count, fsync files + dir,
//!                                              journal "prepared" (fsync)
//!                                     ◀─────── Prepared | Refused{why}
//!  all Prepared?  ── yes: log decision COMMIT (fsync) ──┐
//!                 ── no:  Abort{txid} to every node     │
//!  Commit{txid}                       ───────▶ rename .db over live .db, then source;
//!                                              fsync dir, journal generation, unlock
//!                                     ◀─────── Committed{gen}
//! ```
//!
//! Every message is idempotent, keyed by the transaction id: a repeated `Prepare` of a prepared
//! transaction answers `Prepared` again, a repeated `Commit` of a committed one `Committed`, an
//! `Abort` of an unknown one `Aborted`. Refusals are a serde enum, not strings, so the
//! coordinator can act on them (retry on `Busy`, re-plan on `StaleGeneration`).

use serde::{Deserialize, Serialize};
use std::fmt;

/// ALPN protocol name of protocol version 4 (every message but [`Request::PrepareDelta`]); a
/// peer speaking neither this nor [`ALPN_DELTA`] is refused during the handshake. Version 4
/// orders changes by [`Change`] (a per-source counter) where versions 1 and 3 compared clocks:
/// a node of those versions is refused, so a cluster moves to it all at once (see
/// docs/operations.md, "Upgrading").
pub const ALPN: &[u8] = b"txmap/4";

/// ALPN protocol name of protocol version 5: version 4 plus [`Request::PrepareDelta`]. Both
/// sides offer it first; a node that knows only [`ALPN`] settles on that and keeps getting
/// whole tables.
pub const ALPN_DELTA: &[u8] = b"txmap/5";

/// The ALPN names this build offers and accepts, best first. `TXMAP_TEST_PROTOCOL=2` (for the
/// mixed-version tests) makes it speak only version 2, like the build before delta commits.
pub fn alpn_protocols() -> Vec<Vec<u8>> {
    if std::env::var("TXMAP_TEST_PROTOCOL").as_deref() == Ok("2") {
        vec![ALPN.to_vec()]
    } else {
        vec![ALPN_DELTA.to_vec(), ALPN.to_vec()]
    }
}

/// A transaction id: 128 random bits, shown as 32 hex digits (also in JSON journals).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TxId(pub u128);

impl Serialize for TxId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            s.serialize_str(&self.to_string())
        } else {
            s.serialize_u128(self.0)
        }
    }
}

impl<'de> Deserialize<'de> for TxId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        if d.is_human_readable() {
            let s = String::deserialize(d)?;
            TxId::parse(&s)
                .ok_or_else(|| serde::de::Error::custom(format!("`{s}` is not a transaction id")))
        } else {
            u128::deserialize(d).map(TxId)
        }
    }
}

impl TxId {
    /// A fresh random id.
    pub fn random() -> TxId {
        use ring::rand::SecureRandom;
        let mut b = [0u8; 16];
        // The system RNG failing is not recoverable in any useful way; fall back to time+pid.
        if ring::rand::SystemRandom::new().fill(&mut b).is_err() {
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0);
            return TxId(t ^ ((std::process::id() as u128) << 96));
        }
        TxId(u128::from_be_bytes(b))
    }
    /// Parses 32 lowercase hex digits.
    pub fn parse(s: &str) -> Option<TxId> {
        if s.len() != 32
            || !s
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return None;
        }
        u128::from_str_radix(s, 16).ok().map(TxId)
    }
}

impl fmt::Display for TxId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

impl fmt::Debug for TxId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TxId({self})")
    }
}

impl Serialize for Sha256 {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            s.serialize_str(&crate::table::hex(&self.0))
        } else {
            s.serialize_bytes(&self.0)
        }
    }
}

impl<'de> Deserialize<'de> for Sha256 {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Sha256;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a sha256 digest (32 bytes, or 64 hex digits)")
            }
            fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Sha256, E> {
                let arr: [u8; 32] = v
                    .try_into()
                    .map_err(|_| E::invalid_length(v.len(), &self))?;
                Ok(Sha256(arr))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Sha256, E> {
                let b = v.as_bytes();
                if b.len() != 64 {
                    return Err(E::invalid_length(b.len(), &self));
                }
                let mut arr = [0u8; 32];
                for (i, pair) in b.chunks(2).enumerate() {
                    let s = std::str::from_utf8(pair).map_err(E::custom)?;
                    arr[i] = u8::from_str_radix(s, 16).map_err(E::custom)?;
                }
                Ok(Sha256(arr))
            }
        }
        if d.is_human_readable() {
            d.deserialize_str(V)
        } else {
            d.deserialize_bytes(V)
        }
    }
}

/// A sha256 digest.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Sha256(pub [u8; 32]);

impl fmt::Display for Sha256 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&crate::table::hex(&self.0))
    }
}

impl fmt::Debug for Sha256 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Sha256({self})")
    }
}

/// A request from a coordinator.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// Report the state of one table, or of every table.
    Status {
        /// `None`: all tables.
        table: Option<String>,
    },
    /// Stage, build, verify and lock a new content; `source_len` raw bytes follow the frame.
    Prepare(Prepare),
    /// Install a prepared transaction.
    Commit {
        /// Table name.
        table: String,
        /// Transaction.
        txid: TxId,
        /// The generation it installs.
        generation: u64,
    },
    /// Drop a transaction (prepared, in progress or unknown).
    Abort {
        /// Table name.
        table: String,
        /// Transaction.
        txid: TxId,
        /// The generation it would have installed (a node whose live generation is below it
        /// can prove it never installed it, and fences every prepare up to it).
        generation: u64,
    },
    /// The generations this node holds in its history.
    History {
        /// Table name.
        table: String,
    },
    /// Send the source of one generation from history: the answer is a `Source` frame followed
    /// by exactly `len` raw bytes.
    Fetch {
        /// Table name.
        table: String,
        /// Generation.
        generation: u64,
    },
    /// Check that the live files still match the recorded generation.
    Verify {
        /// Table name.
        table: String,
    },
    /// What became of a transaction? Asked by a participant in doubt (of the coordinator's
    /// node first, then of its peers) and by `txmap recover`. With `fence`, a node that never
    /// saw the transaction records it as aborted so it can never be prepared afterwards, and a
    /// coordinator's node whose coordinator is gone fences it in its decision log.
    Outcome {
        /// Table name.
        table: String,
        /// Transaction.
        txid: TxId,
        /// The generation it installs (the proof rule needs it).
        generation: u64,
        /// Its coordinator's node (from the prepare): only that node answers from its decision
        /// log and may presume abort; any other node answers from its participant state.
        coordinator: String,
        /// Fence an unknown transaction as aborted, when this node can prove it never
        /// installed it.
        fence: bool,
    },
    /// A prepare whose content is a delta script (`delta_len` raw bytes follow the frame; see
    /// [`crate::delta`]) against the node's live content `base_sha256`. Protocol 3 only.
    PrepareDelta(PrepareDelta),
}

/// The header of a delta prepare.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrepareDelta {
    /// The prepare as for a whole table: `source_len`, `sha256` and `entries` describe the
    /// new content the node must rebuild.
    pub prepare: Prepare,
    /// sha256 of the content the script applies to.
    pub base_sha256: Sha256,
    /// Bytes of script that follow.
    pub delta_len: u64,
}

/// The answer to [`Request::Outcome`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum OutcomeAnswer {
    /// Committed (decided commit, or installed here).
    Committed {
        /// Generation it installs.
        generation: u64,
    },
    /// Aborted (decided, fenced, or dropped here).
    Aborted,
    /// Prepared here, and no decision known here.
    InDoubt,
    /// The coordinator is still at work: ask again later.
    Pending,
    /// Not held here, and nothing here proves how it ended (never seen, or forgotten).
    Unknown,
}

/// The header of a prepare.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Prepare {
    /// Transaction.
    pub txid: TxId,
    /// Table name (must be configured on the participant).
    pub table: String,
    /// Generation this content will have; must be above the node's current one.
    pub generation: u64,
    /// Node that coordinates (asked for the outcome after a crash).
    pub coordinator: String,
    /// Bytes of source that follow.
    pub source_len: u64,
    /// sha256 of those bytes.
    pub sha256: Sha256,
    /// Entries the coordinator counted in the source.
    pub entries: u64,
    /// Every node taking part (asked for the outcome if the coordinator's node is unreachable).
    pub nodes: Vec<String>,
    /// Which change of its source (this coordinator's node and the table) this content is:
    /// a prepare of a change older than one this node installed from the same origin is
    /// refused ([`Refusal::Superseded`]). `None`: not ordered (never superseded).
    pub change: Option<Change>,
}

/// One change of one source, the source being a table on the node that coordinates it (the
/// change's *origin*): the `seq`-th change counted by that node's durable counter for the
/// table, in the counter's incarnation `epoch` (random, chosen when the counter is created, so
/// a counter lost and made anew never looks older than the changes it counted before).
///
/// Changes are ordered only within one origin and one epoch, by `seq`; no clock takes part.
/// Changes of different origins are not ordered at all: each is committed in turn, and the
/// last commit wins, in generation order (docs/protocol.md, "Which change wins").
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Change {
    /// The counter's incarnation.
    pub epoch: u64,
    /// Its count.
    pub seq: u64,
}

impl Change {
    /// True when `self` is a later change of the same source (same origin assumed) than
    /// `other`.
    pub fn supersedes(&self, other: &Change) -> bool {
        self.epoch == other.epoch && self.seq > other.seq
    }
}

impl fmt::Display for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "#{} (counter {:016x})", self.seq, self.epoch)
    }
}

/// A change and its origin (the node that coordinated it).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct OriginChange {
    /// The node whose table changed (and which coordinated the change).
    pub origin: String,
    /// Which of its changes.
    pub change: Change,
}

/// A participant's answer.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Response {
    /// Status of the requested tables.
    Status(Vec<TableStatus>),
    /// The transaction is prepared: built, verified, durable, locked.
    Prepared {
        /// Transaction.
        txid: TxId,
    },
    /// The transaction is installed.
    Committed {
        /// Transaction.
        txid: TxId,
        /// The generation now live.
        generation: u64,
    },
    /// The transaction is aborted (or was never known).
    Aborted {
        /// Transaction.
        txid: TxId,
    },
    /// What this node knows of a transaction.
    Outcome(OutcomeAnswer),
    /// The generations held, oldest first.
    History(Vec<HistoryEntry>),
    /// A generation's source follows: `len` bytes with this sha256.
    Source {
        /// Bytes that follow.
        len: u64,
        /// Their sha256.
        sha256: Sha256,
    },
    /// The result of a verification: empty `problems` means the live table is as recorded.
    Verified {
        /// Generation checked.
        generation: u64,
        /// Each drift found.
        problems: Vec<String>,
    },
    /// The request was refused; nothing changed.
    Refused(Refusal),
}

/// A request from `txmap-sympa` to the local `txmapd`, over its Unix socket.
///
/// The hook reads the source itself, with its caller's rights (never root's), and sends the
/// content: exactly `len` raw bytes follow the frame. The daemon never opens the user's path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum LocalRequest {
    /// Distribute this content as the new version of the configured table `table` (one that
    /// has a `source`).
    Distribute {
        /// The table's name, as the hook found it by the path Sympa passed.
        table: String,
        /// The path Sympa passed (for logs only: the daemon never opens it).
        source: String,
        /// Bytes of content following the frame (at most `max_table_bytes`).
        len: u64,
        /// The order number of the copy the hook queued in `requests/` (`<table>@<order>`),
        /// `None` when it could not queue one: the daemon removes that copy (and older ones)
        /// once this content is served or durably pending, and never another's.
        queued: Option<u64>,
    },
}

/// First line of a request file that `txmap-sympa` queues in
/// `<state_dir>/requests/<table>@<order>`; the table's content follows it.
pub const QUEUED_REQUEST_MAGIC: &[u8] = b"txmap-request 1\n";

/// The local `txmapd`'s answer to `txmap-sympa`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum LocalResponse {
    /// The commit ran; `exit` is its exit code (see `exit`), `lines` one per node.
    Done {
        /// Table name.
        table: String,
        /// Exit code.
        exit: u8,
        /// One line per node.
        lines: Vec<String>,
    },
    /// The request was refused (no such table, too large, incomplete); nothing changed.
    Refused {
        /// Why.
        detail: String,
    },
}

/// One generation of a table kept in a node's history.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct HistoryEntry {
    /// Generation.
    pub generation: u64,
    /// When it went live (ms since epoch).
    pub committed_at_ms: u64,
    /// sha256 of its source.
    pub sha256: Sha256,
    /// Entries in it.
    pub entries: u64,
    /// Node that coordinated it.
    pub coordinator: String,
    /// Transaction that installed it.
    pub txid: TxId,
}

/// A commit recorded on a coordinator's node as still to be distributed.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PendingInfo {
    /// First failure (ms since epoch).
    pub since_ms: u64,
    /// Attempts so far.
    pub attempts: u32,
    /// Why the last attempt failed.
    pub last_error: String,
}

/// What a participant knows about one table.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct TableStatus {
    /// Table name.
    pub table: String,
    /// Live generation (0: never committed by txmap).
    pub generation: u64,
    /// sha256 of the live source as last committed.
    pub sha256: Option<Sha256>,
    /// Entries in it.
    pub entries: u64,
    /// When it was committed (ms since the Unix epoch).
    pub committed_at_ms: Option<u64>,
    /// Transaction that committed it.
    pub last_txid: Option<TxId>,
    /// Node that coordinated it.
    pub coordinator: Option<String>,
    /// No prepare at or below this generation is accepted (fences of aborted transactions).
    pub fenced: u64,
    /// The live content's change (`None`: unknown, installed by an older txmap or unordered).
    pub content: Option<OriginChange>,
    /// The newest change installed here from each origin (one entry per origin): a change of
    /// that origin older than its entry is superseded.
    pub newest: Vec<OriginChange>,
    /// A transaction holding the table, if any.
    pub prepared: Option<PreparedInfo>,
    /// A commit this node coordinated that has not reached every node yet.
    pub pending: Option<PendingInfo>,
    /// The live files are not what this node installed (their stamps changed since: a hand
    /// edit, a `postmap` run by hand): what changed. `None`: as installed, or unknown. Such a
    /// node does not really serve the recorded content; the next commit reinstalls it.
    pub drifted: Option<String>,
    /// Staged files of finished transactions that this node failed to remove and retries
    /// (with backoff) until they are gone; `None` when there are none.
    pub cleanup: Option<CleanupInfo>,
}

/// Staged files a participant failed to remove (a storage error on `unlink`), retried in the
/// background until they are gone.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct CleanupInfo {
    /// Staged files still on disk.
    pub staged_files: u64,
    /// Transactions they belong to.
    pub transactions: u32,
    /// First failure (ms since the Unix epoch).
    pub since_ms: u64,
    /// Failed attempts so far.
    pub attempts: u32,
    /// Why the last attempt failed.
    pub last_error: String,
}

/// A transaction in progress on a participant.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PreparedInfo {
    /// Transaction.
    pub txid: TxId,
    /// Generation it would install.
    pub generation: u64,
    /// Coordinating node.
    pub coordinator: String,
    /// `true` once prepared (durable); `false` while staging.
    pub durable: bool,
    /// `true` once the commit decision arrived (the renames are under way, or retried).
    pub installing: bool,
    /// Since when (ms since the Unix epoch).
    pub since_ms: u64,
    /// Every node taking part.
    pub nodes: Vec<String>,
}

/// Why a participant refused a request. Nothing changed on that node.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Refusal {
    /// The table is not in this node's config.
    UnknownTable {
        /// The name asked for.
        table: String,
    },
    /// Another transaction holds the table; retry later.
    Busy {
        /// The holder.
        txid: TxId,
        /// Its generation.
        generation: u64,
    },
    /// The offered generation is not above the node's own.
    StaleGeneration {
        /// Offered.
        offered: u64,
        /// The node's current generation.
        current: u64,
    },
    /// The source is larger than the node accepts.
    TooLarge {
        /// Announced length.
        len: u64,
        /// The node's limit.
        max: u64,
    },
    /// The bytes received do not match the announced length or sha256.
    ContentMismatch {
        /// What differed.
        detail: String,
    },
    /// The builder failed or warned.
    BuildFailed {
        /// Program.
        program: String,
        /// Exit status.
        status: String,
        /// Its stderr.
        stderr: String,
    },
    /// The built table does not match the source.
    VerifyFailed {
        /// Source entries.
        expected: u64,
        /// Built entries.
        found: u64,
    },
    /// A filesystem operation failed (permissions, disk full, ...).
    Storage {
        /// Operation.
        op: String,
        /// Path.
        path: String,
        /// OS error text.
        error: String,
    },
    /// No such transaction is prepared here.
    UnknownTransaction {
        /// Transaction.
        txid: TxId,
    },
    /// The transaction was aborted here; it cannot be prepared or committed.
    AlreadyAborted {
        /// Transaction.
        txid: TxId,
    },
    /// The transaction was committed here; it cannot be aborted.
    AlreadyCommitted {
        /// Transaction.
        txid: TxId,
    },
    /// The peer may not do this.
    NotAuthorized {
        /// Why.
        detail: String,
    },
    /// The request was malformed.
    Protocol {
        /// What was wrong.
        detail: String,
    },
    /// A delta prepare does not fit this node's live content: send the whole table.
    DeltaBase {
        /// What did not fit.
        detail: String,
    },
    /// This node installed a later change of the same source: the offered one is superseded.
    Superseded {
        /// The later change installed here.
        newer: Change,
    },
}

impl Refusal {
    /// Refusals that a later retry of the whole transaction may overcome.
    pub fn is_conflict(&self) -> bool {
        matches!(
            self,
            Refusal::Busy { .. }
                | Refusal::StaleGeneration { .. }
                | Refusal::DeltaBase { .. }
                | Refusal::Superseded { .. }
        )
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::UnknownTable { table } => write!(f, "unknown table `{table}`"),
            Refusal::Busy { txid, generation } => {
                write!(
                    f,
                    "busy: transaction {txid} (generation {generation}) holds the table"
                )
            }
            Refusal::StaleGeneration { offered, current } => {
                write!(
                    f,
                    "stale generation {offered}: node is at generation {current}"
                )
            }
            Refusal::TooLarge { len, max } => {
                write!(f, "table of {len} bytes exceeds the limit of {max}")
            }
            Refusal::ContentMismatch { detail } => write!(f, "content mismatch: {detail}"),
            Refusal::BuildFailed {
                program,
                status,
                stderr,
            } => {
                write!(f, "build failed: {program} ({status}): {stderr}")
            }
            Refusal::VerifyFailed { expected, found } => write!(
                f,
                "verify failed: source has {expected} entries, built table has {found}"
            ),
            Refusal::Storage { op, path, error } => write!(f, "storage: {op} {path}: {error}"),
            Refusal::UnknownTransaction { txid } => write!(f, "unknown transaction {txid}"),
            Refusal::AlreadyAborted { txid } => write!(f, "transaction {txid} was aborted"),
            Refusal::AlreadyCommitted { txid } => write!(f, "transaction {txid} was committed"),
            Refusal::NotAuthorized { detail } => write!(f, "not authorized: {detail}"),
            Refusal::Protocol { detail } => write!(f, "protocol error: {detail}"),
            Refusal::DeltaBase { detail } => {
                write!(f, "delta does not fit this node's table: {detail}")
            }
            Refusal::Superseded { newer } => write!(
                f,
                "superseded: this node installed a later change of the same source ({newer})"
            ),
        }
    }
}

impl From<crate::table::TableError> for Refusal {
    fn from(e: crate::table::TableError) -> Refusal {
        use crate::table::TableError as E;
        match e {
            E::Io { op, path, source } => Refusal::Storage {
                op: op.to_string(),
                path: path.display().to_string(),
                error: source.to_string(),
            },
            E::BuildFailed {
                program,
                status,
                stderr,
            } => Refusal::BuildFailed {
                program,
                status,
                stderr,
            },
            E::VerifyFailed { expected, found } => Refusal::VerifyFailed { expected, found },
            E::ContentDiffers { detail } => Refusal::ContentMismatch { detail },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn txid_round_trips_through_text() {
        let t = TxId::random();
        assert_eq!(TxId::parse(&t.to_string()), Some(t));
        assert_eq!(TxId::parse("xyz"), None);
        assert_eq!(TxId::parse(&"A".repeat(32)), None);
    }

    #[test]
    fn messages_round_trip_through_the_codec() {
        let p = Request::Prepare(Prepare {
            txid: TxId(42),
            table: "sympa_transport".into(),
            generation: 7,
            coordinator: "node1".into(),
            source_len: 10,
            sha256: Sha256([9; 32]),
            entries: 2,
            nodes: vec!["node1".into()],
            change: Some(Change { epoch: 7, seq: 5 }),
        });
        let f = crate::codec::encode(&p).unwrap();
        assert_eq!(crate::codec::decode::<Request>(&f).unwrap(), p);
        let r = Response::Refused(Refusal::Busy {
            txid: TxId(1),
            generation: 3,
        });
        let f = crate::codec::encode(&r).unwrap();
        assert_eq!(crate::codec::decode::<Response>(&f).unwrap(), r);
    }

    #[test]
    fn sha256_is_hex_in_json() {
        let s = Sha256([0xab; 32]);
        let j = serde_json::to_string(&s).unwrap();
        assert_eq!(j, format!("\"{}\"", "ab".repeat(32)));
        let back: Sha256 = serde_json::from_str(&j).unwrap();
        assert_eq!(back, s);
        let short: Result<Sha256, _> = serde_json::from_str("\"abcd\"");
        assert!(short.is_err());
    }
}
