//! A tiny seeded PRNG (SplitMix64) for the chaos runner and the fault proxy.
//!
//! Written here rather than taken from `rand` so that a seed means the same schedule forever:
//! nothing outside this file can change the sequence. Not for cryptography.

/// SplitMix64 (Steele, Lea, Flood 2014): 64-bit state, one addition and a mix per draw.
#[derive(Debug, Clone)]
pub struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    /// A generator whose whole sequence is fixed by `seed`.
    pub fn new(seed: u64) -> SplitMix64 {
        SplitMix64 { state: seed }
    }

    /// An independent generator for a named purpose (e.g. one per proxy): same `seed` and
    /// `stream`, same sequence; different streams do not overlap in practice.
    pub fn derive(seed: u64, stream: u64) -> SplitMix64 {
        let mut g = SplitMix64::new(seed ^ stream.wrapping_mul(0xD6E8_FEB8_6659_FD93));
        g.next_u64();
        g
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`0` when `n == 0`); the tiny modulo bias does not matter here.
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next_u64() % n
        }
    }

    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        if hi <= lo {
            lo
        } else {
            lo + self.below(hi - lo + 1)
        }
    }

    /// True with probability `pct` percent (0..=100, fractions allowed).
    pub fn chance(&mut self, pct: f64) -> bool {
        if pct <= 0.0 {
            return false;
        }
        ((self.next_u64() >> 11) as f64 / (1u64 << 53) as f64) * 100.0 < pct
    }

    /// A uniformly chosen element (None when empty).
    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> Option<&'a T> {
        if items.is_empty() {
            None
        } else {
            items.get(self.below(items.len() as u64) as usize)
        }
    }

    /// Index drawn with the given non-negative weights (None when they sum to 0).
    pub fn weighted(&mut self, weights: &[u32]) -> Option<usize> {
        let total: u64 = weights.iter().map(|w| *w as u64).sum();
        if total == 0 {
            return None;
        }
        let mut r = self.below(total);
        for (i, w) in weights.iter().enumerate() {
            if r < *w as u64 {
                return Some(i);
            }
            r -= *w as u64;
        }
        None
    }

    /// Fisher–Yates shuffle.
    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = self.below(i as u64 + 1) as usize;
            items.swap(i, j);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_sequence_and_known_first_value() {
        let mut a = SplitMix64::new(1234567);
        let mut b = SplitMix64::new(1234567);
        let va: Vec<u64> = (0..100).map(|_| a.next_u64()).collect();
        let vb: Vec<u64> = (0..100).map(|_| b.next_u64()).collect();
        assert_eq!(va, vb);
        // Reference value of SplitMix64 for seed 1234567 (from the published C code).
        assert_eq!(SplitMix64::new(1234567).next_u64(), 6457827717110365317);
        assert_ne!(
            SplitMix64::derive(1, 1).next_u64(),
            SplitMix64::derive(1, 2).next_u64()
        );
    }

    #[test]
    fn helpers_stay_in_range() {
        let mut g = SplitMix64::new(7);
        for _ in 0..1000 {
            assert!(g.below(10) < 10);
            let r = g.range(5, 9);
            assert!((5..=9).contains(&r));
        }
        assert_eq!(g.weighted(&[0, 0]), None);
        assert_eq!(g.weighted(&[0, 3, 0]), Some(1));
        let hits = (0..10_000).filter(|_| g.chance(25.0)).count();
        assert!((2000..3000).contains(&hits), "{hits}");
    }
}
