//! Test-only switches that put back the five defects of issue 9 and the one its long chaos
//! runs found (6), so the model checker (`chaos-tests/src/model`) can prove that it finds each
//! of them, and the missing fsyncs of issue 13, so the power-loss tests
//! (`chaos-tests/tests/power.rs`) can prove that they find them on the real processes.
//!
//! [`on`] is `false` unless the crate is built with the `defects` feature (only the chaos-tests
//! crate turns it on) and a test switched the defect on with [`set`], or it is built with the
//! `failpoints` feature (the test binaries in `target/chaos`, never a release) and the process
//! was started with `TXMAP_DEFECTS=<name>[,<name>...]` ([`Defect::name`]). Every switched
//! branch is marked `DEFECT (test only)`.

/// One of the defects of issues 9 and 13.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Defect {
    /// 1. A failed install drops the node back to *Prepared*, and a storage refusal ends a
    ///    commit's delivery (so the commit record is forgotten and the node aborts later).
    InstallFailedDropsToPrepared,
    /// 2. `recover --abort` counts an `Aborted` answer from a node that was never a member.
    RecoverCountsNonMembers,
    /// 3. "Not remembered" is taken for "never installed": a forgotten commit is fenced and
    ///    answered `Aborted`.
    AbortFromMissingMemory,
    /// 4. Any error while writing the commit decision aborts, even when the record is on disk.
    AbortAfterFailedDecisionWrite,
    /// 5. A decision is read (and acted on) without making the directory durable first.
    DecisionVisibleBeforeDurable,
    /// Issue 13: the table directory is not fsynced after the install renames, so a power
    /// cut after the commit was acknowledged can take the renames back.
    InstallSkipsDirFsync,
    /// 6. (Found by the long chaos run of seed 9009.) A finished commit's record is deleted, so
    ///    a late outcome question finds no record, and the coordinator's node fences the
    ///    transaction as aborted in its log although every member committed it.
    FinishForgetsCommit,
}

impl Defect {
    /// The defects of issue 9, in issue order, and the one its long chaos runs found (those
    /// the model checker finds).
    pub const ALL: [Defect; 6] = [
        Defect::InstallFailedDropsToPrepared,
        Defect::RecoverCountsNonMembers,
        Defect::AbortFromMissingMemory,
        Defect::AbortAfterFailedDecisionWrite,
        Defect::DecisionVisibleBeforeDurable,
        Defect::FinishForgetsCommit,
    ];

    /// Every defect a power cut can show (issue 13).
    pub const POWER: [Defect; 1] = [Defect::InstallSkipsDirFsync];

    fn bit(self) -> u32 {
        1 << (self as u32)
    }

    /// The name `TXMAP_DEFECTS` knows it by.
    pub fn name(self) -> &'static str {
        match self {
            Defect::InstallFailedDropsToPrepared => "install-failed-drops-to-prepared",
            Defect::RecoverCountsNonMembers => "recover-counts-non-members",
            Defect::AbortFromMissingMemory => "abort-from-missing-memory",
            Defect::AbortAfterFailedDecisionWrite => "abort-after-failed-decision-write",
            Defect::DecisionVisibleBeforeDurable => "decision-visible-before-durable",
            Defect::InstallSkipsDirFsync => "install-skips-dir-fsync",
            Defect::FinishForgetsCommit => "finish-forgets-commit",
        }
    }

    /// The defect named `name`.
    pub fn parse(name: &str) -> Option<Defect> {
        Defect::ALL
            .into_iter()
            .chain(Defect::POWER)
            .find(|d| d.name() == name)
    }
}

/// The defects `TXMAP_DEFECTS` switches on in a failpoints build (read once).
#[cfg(feature = "failpoints")]
fn from_env() -> u32 {
    static BITS: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    *BITS.get_or_init(|| {
        std::env::var("TXMAP_DEFECTS")
            .unwrap_or_default()
            .split(',')
            .filter_map(|n| Defect::parse(n.trim()))
            .fold(0, |b, d| b | d.bit())
    })
}

#[cfg(feature = "defects")]
static ON: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

/// Whether `d` is switched on (always `false` without the `defects` or `failpoints` feature).
#[inline]
pub fn on(d: Defect) -> bool {
    #[allow(unused_mut)]
    let mut bits = 0u32;
    #[cfg(feature = "defects")]
    {
        bits |= ON.load(std::sync::atomic::Ordering::Relaxed);
    }
    #[cfg(feature = "failpoints")]
    {
        bits |= from_env();
    }
    bits & d.bit() != 0
}

/// The directory fsync after the install renames (`table::install`), skipped under
/// [`Defect::InstallSkipsDirFsync`].
pub fn install_dir_fsync<E>(f: impl FnOnce() -> Result<(), E>) -> Result<(), E> {
    fsync_unless(Defect::InstallSkipsDirFsync, f)
}

/// Runs the fsync `f` unless defect `d` is on (then it is skipped: `DEFECT (test only)`). The
/// hook that the storage code calls where the defect removes an fsync.
pub fn fsync_unless<E>(d: Defect, f: impl FnOnce() -> Result<(), E>) -> Result<(), E> {
    if on(d) {
        return Ok(()); // DEFECT (test only)
    }
    f()
}

/// Switches exactly the defects in `ds` on (an empty slice switches every defect off). Without
/// the `defects` feature this does nothing. Process-global: tests that use it must not run
/// concurrently with others that expect a different set (the model tests serialize on a mutex).
pub fn set(ds: &[Defect]) {
    let bits = ds.iter().fold(0u32, |b, d| b | d.bit());
    #[cfg(feature = "defects")]
    ON.store(bits, std::sync::atomic::Ordering::Relaxed);
    #[cfg(not(feature = "defects"))]
    let _ = bits;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_defect_is_off_by_default() {
        for d in Defect::ALL.into_iter().chain(Defect::POWER) {
            assert!(!on(d));
            assert_eq!(Defect::parse(d.name()), Some(d));
        }
        assert_eq!(Defect::parse("nonsense"), None);
    }
}
