//! A model checker for txmap's atomic commit, driving txmap's **own** protocol logic.
//!
//! The participant's per-table machine (`machine::TableState::step`) and the coordinator's
//! rules (`coordinator::{on_votes, after_decision_write, delivery, resolve, may_recover,
//! log_answer}`, `machine::next_generation`) are called as they are; only the shells around
//! them (`txmap commit`, `txmapd`'s request handlers, resolve loop and redrive, `txmap
//! recover`, the journal and the decision log) are mirrored, step for step, in
//! [`system`]. See `docs/verification.md` for what is modelled, the bounds and what is not.
//!
//! # Layout
//! - [`oracle`]: exhaustive enumeration of the choices inside one step (faults, lost answers).
//! - [`system`]: the cluster's state (machines, journals, table files, decision logs with
//!   synced and unsynced entries, messages in flight, coordinator processes, operator) and its
//!   steps; the safety and quiescence properties.
//! - [`explore`]: breadth-first search over hashed states, the fault-free drain (termination),
//!   and readable counterexample traces.
//! - [`queue`]: the layer around the commit on the Sympa node (the hook's queue, group
//!   commit, pending records, the change order), with its own small explorer and the "no
//!   lost update" property.
//!
//! Why not `stateright`: its model API would fit, but it brings a web explorer and several
//! dependencies to a 2-core CI machine, and txmap's steps need nested nondeterminism (a step
//! whose storage calls may each fail) that an oracle enumerates more simply than `actions`
//! lists. The explorer here is ~300 lines, exhaustive up to the stated bounds, and gives
//! shortest counterexamples (BFS).

pub mod explore;
pub mod oracle;
pub mod queue;
pub mod system;

pub use explore::{check, Counterexample, Report};

/// The bounds of one check.
#[derive(Debug, Clone)]
pub struct Bounds {
    /// Concurrent `txmap commit` processes on the same table (1 or 2: C1 on n1, C2 on n2).
    pub coordinators: usize,
    /// Faults in one schedule: crashes, power cuts, storage errors, duplicated messages,
    /// evictions of remembered outcomes, failed builds. Message loss and delay are free.
    pub faults: u8,
    /// Transactions per coordinator (a conflict retries with a new one).
    pub attempts: u8,
    /// One operator `txmap recover --abort|--commit` anywhere in the schedule.
    pub operator: bool,
    /// An outcome question may be delayed (a fault) and arrive at any later moment.
    pub late_questions: bool,
    /// Run the fault-free drain from every state (termination, cleanliness).
    pub drain: bool,
    /// Steps a drain may take before it counts as not terminating.
    pub drain_limit: usize,
    /// Explore schedules of at most this many steps (BFS depth; the drain comes on top).
    pub max_depth: usize,
    /// Stop after this many states (the report then says the check was not exhaustive).
    pub max_states: usize,
    /// Print progress to stderr.
    pub progress: bool,
}

impl Bounds {
    /// The bound CI runs (see `docs/verification.md`).
    pub fn ci() -> Bounds {
        Bounds {
            coordinators: 2,
            faults: 1,
            attempts: 1,
            operator: true,
            late_questions: true,
            drain: true,
            drain_limit: 400,
            max_depth: 60,
            max_states: 50_000_000,
            progress: false,
        }
    }
}
