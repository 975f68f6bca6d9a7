//! The coordinator side of txmap, as a library: used by the `txmap` CLI and by `txmapd`, which
//! re-drives unfinished decisions and retries pending commits of its node.
//!
//! # Layout
//! - [`cluster`]: QUIC client endpoint, connections and one exchange per node with deadlines.
//! - [`commit`]: the two phases of one commit, with retry on conflicts, and pending tracking.
//! - [`history`]: `txmap history`, `rollback` (a normal commit of an earlier generation) and
//!   `verify`.
//! - [`redrive`]: finishing decisions a dead coordinator left behind.
//! - [`recover`]: `txmap recover`, listing and resolving in-doubt transactions by hand.
//! - [`sandbox`]: `txmap sandbox`, a ready local cluster.

pub mod cluster;
pub mod commit;
pub mod history;
pub mod recover;
pub mod redrive;
pub mod sandbox;
