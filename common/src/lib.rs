//! Shared core of txmap: everything the coordinator and the participant agree on.
//!
//! # Layout
//! - [`codec`]: the only module that knows the wire encoding (bincode 2.0.1 behind a version
//!   byte and a size limit).
//! - [`proto`]: the messages, the transaction id, and the message-flow diagram.
//! - [`machine`]: the participant's 2PC state machine (no I/O), tested step by step.
//! - [`coordinator`]: the coordinator side's rules as pure functions: decide, read back a
//!   failed decision write, classify acknowledgements, what recovery may conclude.
//! - [`config`]: the per-node TOML config and its validation.
//! - [`table`]: staging, building (`postmap`/`postalias`), verifying and installing a table.
//! - [`journal`]: durable per-table state of a participant (atomic write + fsync).
//! - [`decision`]: the coordinator's decision log (no-replace, so fencing works) and pending
//!   commits.
//! - [`history`]: the last K generations of each table, kept as copies.
//! - [`certs`]: inspecting the TLS files (chain, key, name, expiry) for `check-config`.
//! - [`tls`]: the cluster CA, node certificates, and mutual-TLS QUIC endpoints.
//! - [`net`]: one request/response exchange over a QUIC stream.
//! - [`exit`]: the documented exit codes of the CLI.
//! - [`describe`]: operator-facing `Display` text of answers, outcomes, verdicts, events.
//! - [`defects`]: test-only switches that put back the defects of issue 9 (model checker).

pub mod attempt;
pub mod bdb;
pub mod certs;
pub mod codec;
pub mod config;
pub mod coordinator;
pub mod decision;
pub mod defects;
pub mod delta;
pub mod describe;
pub mod entries;
pub mod exit;
pub mod history;
pub mod journal;
pub mod machine;
pub mod net;
pub mod proto;
pub mod requests;
pub mod table;
pub mod tls;
pub mod view;

/// Milliseconds since the Unix epoch (0 if the clock is before it).
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
