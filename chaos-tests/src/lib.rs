//! Test harness for txmap: real `txmapd` processes on loopback, the real `txmap` CLI, real
//! `postmap`, real signals.
//!
//! # Layout
//! - [`model`]: the model checker of the commit protocol (drives `machine` and `coordinator`).
//! - [`cluster`]: a sandbox cluster of N nodes in a temporary directory, with helpers to start,
//!   kill (SIGKILL), freeze (SIGSTOP) and inspect each node.
//! - [`lossyfs`]: a FUSE filesystem that forgets what was not fsynced, and the power cut of a
//!   node (helper binary `lossyfs`).
//!
//! The binaries are built once per test process, with the `failpoints` feature, into
//! `target/chaos` (a separate target directory, so the feature never forces a rebuild of the
//! ordinary `target/debug` binaries).

pub mod chaos;
pub mod cluster;
pub mod invariants;
pub mod lossyfs;
pub mod model;
pub mod postfix;
pub mod proxy;
pub mod rng;
