//! The documented PRNG behind shuffling and the eval split, so an order can be reproduced
//! from its seed by anyone: SplitMix64 (Steele, Lea & Flood 2014; the constants of
//! `java.util.SplittableRandom`), Lemire's unbiased bounded integers, and a Fisher-Yates
//! shuffle that swaps position i (from n-1 down to 1) with a uniform j in 0..=i.

pub struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    pub fn new(seed: u64) -> SplitMix64 {
        SplitMix64 { state: seed }
    }

    /// The generator for stream `stream` of `seed` (epoch e uses stream e; the eval split uses
    /// `EVAL_SPLIT_STREAM`): seeded with `seed XOR (stream * 0xD1B54A32D192ED03)` and advanced once
    /// so that neighbouring streams start far apart.
    pub fn for_stream(seed: u64, stream: u64) -> SplitMix64 {
        let mut g = SplitMix64::new(seed ^ stream.wrapping_mul(0xD1B5_4A32_D192_ED03));
        let mixed = g.next_u64();
        SplitMix64::new(mixed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (Lemire 2019, multiply-shift with rejection).
    pub fn below(&mut self, n: u64) -> u64 {
        assert!(n > 0, "below(0)");
        let threshold = n.wrapping_neg() % n;
        loop {
            let m = u128::from(self.next_u64()) * u128::from(n);
            if (m as u64) >= threshold {
                return (m >> 64) as u64;
            }
        }
    }
}

/// The eval split's stream; far from any epoch number.
pub const EVAL_SPLIT_STREAM: u64 = u64::MAX;

/// A uniformly random permutation of `0..n`.
pub fn permutation(n: usize, rng: &mut SplitMix64) -> Vec<usize> {
    let mut p: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        p.swap(i, j);
    }
    p
}
