//! Test-only switches that put back the five defects of issue 9, so the model checker
//! (`chaos-tests/src/model`) can prove that it finds each of them.
//!
//! [`on`] is a constant `false` unless the crate is built with the `defects` feature (only the
//! chaos-tests crate turns it on) *and* a test switched the defect on with [`set`]. Every
//! switched branch in `machine.rs` and `coordinator.rs` is marked `DEFECT (test only)`.

/// One of the defects of issue 9.
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
}

impl Defect {
    /// Every defect, in issue order.
    pub const ALL: [Defect; 5] = [
        Defect::InstallFailedDropsToPrepared,
        Defect::RecoverCountsNonMembers,
        Defect::AbortFromMissingMemory,
        Defect::AbortAfterFailedDecisionWrite,
        Defect::DecisionVisibleBeforeDurable,
    ];

    fn bit(self) -> u32 {
        1 << (self as u32)
    }
}

#[cfg(feature = "defects")]
static ON: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

/// Whether `d` is switched on (always `false` without the `defects` feature).
#[inline]
pub fn on(d: Defect) -> bool {
    #[cfg(feature = "defects")]
    {
        ON.load(std::sync::atomic::Ordering::Relaxed) & d.bit() != 0
    }
    #[cfg(not(feature = "defects"))]
    {
        let _ = d;
        false
    }
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
        for d in Defect::ALL {
            assert!(!on(d));
        }
    }
}
