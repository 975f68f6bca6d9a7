//! Exit codes of `txmap` and `txmap-sympa`. They are part of the interface: Sympa and scripts
//! read them. Never renumber; only add.

/// Everything asked for was done (every node committed; status: all nodes agree).
pub const OK: u8 = 0;
/// The transaction was aborted and nothing changed anywhere: a node was unreachable or timed
/// out, or refused (build failed, verify failed, storage error...). One line per node says why.
pub const ABORTED: u8 = 1;
/// Bad usage or configuration (unknown table, missing key, unreadable file), or a content the
/// guard refused (an empty source, or one removing more than `max_shrink_percent` of the live
/// entries, without `--force`); nothing changed.
pub const USAGE: u8 = 2;
/// The decision was *commit* but some node has not acknowledged it yet; it holds the prepared
/// table and installs it when the decision reaches it. Not a failure of the change itself.
pub const INCOMPLETE: u8 = 3;
/// Other transactions kept the table busy past the retry deadline; nothing changed.
pub const BUSY: u8 = 4;
/// `status`/`verify`: some in-service node is unreachable, nodes disagree on the generation,
/// or a node drifted (its live files changed since it installed them); see
/// [`crate::view`].
pub const DISAGREE: u8 = 5;
/// A local failure on this node (cannot read the source, state directory, certificates).
pub const LOCAL: u8 = 6;
/// `recover`: the requested resolution was refused because it would contradict a decision (or
/// nobody can know the decision yet). Nothing was changed.
pub const REFUSED: u8 = 7;
/// `status`/`verify`: every in-service node is reachable and they agree, but work is stuck: a
/// pending change has failed at least once, a transaction has been in progress longer than
/// `timeouts.total_ms` + `timeouts.commit_ms`, or a prepared one has waited for its decision
/// longer than `timeouts.in_doubt_ms`.
pub const STUCK: u8 = 8;
