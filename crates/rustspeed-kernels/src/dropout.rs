//! Dropout with counter-based masks: element `i` is kept iff a hash of `(key, i)` falls below the
//! keep threshold, where `key` mixes the micro-batch seed, the layer and the site within it.
//!
//! Nothing is stored between forward and backward: the backward (and a recomputed forward under
//! activation checkpointing) regenerates exactly the same mask from the same key. The mask does
//! not depend on how the work is split over threads, since each element's bit depends only on
//! its own index.

use rayon::prelude::*;

use crate::Float;

/// Elementwise loops go parallel above this many elements.
const PARALLEL_MIN_ELEMS: usize = 1 << 16;
/// Elements per parallel task.
const CHUNK: usize = 1 << 14;

/// splitmix64's finaliser: a bijective 64-bit mix whose output bits all depend on all input bits.
#[inline(always)]
fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

/// The mask key of one dropout site: `seed` is the micro-batch's dropout seed, `layer` the layer's
/// index in the model, `site` which dropout of that layer (each layer numbers its own).
pub fn dropout_key(seed: u64, layer: u64, site: u64) -> u64 {
    let a = mix64(seed.wrapping_add(GOLDEN));
    let b = mix64(
        a ^ layer
            .wrapping_mul(GOLDEN)
            .wrapping_add(0x2545_F491_4F6C_DD1D),
    );
    mix64(
        b ^ site
            .wrapping_mul(GOLDEN)
            .wrapping_add(0x6A09_E667_F3BC_C909),
    )
}

/// The keep test for probability `p` of dropping: `hash < threshold` on 32 bits.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DropoutMask {
    key: u64,
    /// `round((1 - p) * 2^32)`: element kept iff its 32-bit hash is below it.
    threshold: u64,
    /// `1 / (1 - p)`, applied to kept elements (inverted dropout, as PyTorch).
    scale: f32,
}

impl DropoutMask {
    /// `p` must be in `[0, 1)`; configs are validated before this point, so anything else is a bug.
    pub fn new(p: f32, key: u64) -> Self {
        assert!(
            (0.0..1.0).contains(&p),
            "dropout probability must be in [0, 1), got {p}"
        );
        let keep = 1.0 - p as f64;
        DropoutMask {
            key,
            threshold: (keep * 4_294_967_296.0).round() as u64,
            scale: (1.0 / keep) as f32,
        }
    }

    /// Whether element `i` is kept.
    #[inline(always)]
    pub fn keep(&self, i: usize) -> bool {
        let h = mix64(self.key ^ (i as u64).wrapping_mul(GOLDEN));
        (h >> 32) < self.threshold
    }

    /// The factor for kept elements, `1 / (1 - p)`.
    pub fn scale(&self) -> f32 {
        self.scale
    }
}

/// `x[i] *= keep(i) / (1 - p)` in place, with `i` counted from `offset` (so that a slice of a
/// larger tensor gets the same bits as the whole). `p == 0` does nothing at all, exactly.
///
/// Forward and backward are the same operation: the gradient of `y = x * m / keep` is
/// `dx = dy * m / keep`, so the backward calls this on the output gradient with the same key.
pub fn dropout_inplace<T: Float>(x: &mut [T], p: f32, key: u64, offset: usize) {
    if p == 0.0 {
        return;
    }
    let mask = DropoutMask::new(p, key);
    let apply = |(c, chunk): (usize, &mut [T])| {
        let base = offset + c * CHUNK;
        for (j, v) in chunk.iter_mut().enumerate() {
            *v = if mask.keep(base + j) {
                T::from_f32(v.to_f32() * mask.scale)
            } else {
                T::from_f32(0.0)
            };
        }
    };
    if x.len() >= PARALLEL_MIN_ELEMS {
        x.par_chunks_mut(CHUNK).enumerate().for_each(apply);
    } else {
        x.chunks_mut(CHUNK).enumerate().for_each(apply);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::bf16;

    #[test]
    fn zero_probability_is_the_identity() {
        let mut x: Vec<f32> = (0..1000).map(|i| i as f32 * 0.37 - 5.0).collect();
        let orig = x.clone();
        dropout_inplace(&mut x, 0.0, 42, 0);
        assert_eq!(x, orig);
    }

    #[test]
    fn kept_fraction_and_scale_match_p() {
        for p in [0.1f32, 0.5, 0.9] {
            let n = 200_000;
            let mut x = vec![1.0f32; n];
            dropout_inplace(&mut x, p, dropout_key(7, 3, 1), 0);
            let kept = x.iter().filter(|&&v| v != 0.0).count();
            let frac = kept as f64 / n as f64;
            // Binomial standard deviation is at most 0.0012 here; 5 sigma.
            assert!(
                (frac - (1.0 - p as f64)).abs() < 0.006,
                "p={p}: kept {frac}"
            );
            let want = 1.0 / (1.0 - p);
            assert!(x.iter().all(|&v| v == 0.0 || (v - want).abs() < 1e-6));
            // Inverted dropout keeps the expectation: the mean stays near 1.
            let mean = x.iter().map(|&v| v as f64).sum::<f64>() / n as f64;
            assert!(
                (mean - 1.0).abs() < 0.05 * want as f64,
                "p={p}: mean {mean}"
            );
        }
    }

    #[test]
    fn same_key_same_mask_and_backward_uses_it() {
        let key = dropout_key(11, 2, 0);
        let x: Vec<f32> = (0..5000).map(|i| (i % 17) as f32 + 1.0).collect();
        let mut y = x.clone();
        dropout_inplace(&mut y, 0.3, key, 0);
        let mut again = x.clone();
        dropout_inplace(&mut again, 0.3, key, 0);
        assert_eq!(y, again);
        // Backward: the gradient of sum(w * y) w.r.t. x is w * mask / keep.
        let mut g = vec![1.0f32; x.len()];
        dropout_inplace(&mut g, 0.3, key, 0);
        for i in 0..x.len() {
            assert_eq!(g[i] == 0.0, y[i] == 0.0, "element {i}");
            if y[i] != 0.0 {
                assert!((y[i] - x[i] * g[i]).abs() < 1e-5);
            }
        }
    }

    #[test]
    fn keys_differ_by_seed_layer_and_site() {
        let keys = [
            dropout_key(1, 0, 0),
            dropout_key(2, 0, 0),
            dropout_key(1, 1, 0),
            dropout_key(1, 0, 1),
            dropout_key(0, 0, 0),
        ];
        let masks: Vec<Vec<bool>> = keys
            .iter()
            .map(|&k| {
                let m = DropoutMask::new(0.5, k);
                (0..256).map(|i| m.keep(i)).collect()
            })
            .collect();
        for a in 0..masks.len() {
            for b in a + 1..masks.len() {
                let same = masks[a]
                    .iter()
                    .zip(&masks[b])
                    .filter(|(x, y)| x == y)
                    .count();
                // Independent masks agree on about half the elements.
                assert!((80..176).contains(&same), "keys {a},{b}: {same}/256 agree");
            }
        }
    }

    #[test]
    fn parallel_and_offset_slices_give_the_same_bits() {
        let n = 3 * PARALLEL_MIN_ELEMS + 123;
        let key = dropout_key(5, 9, 2);
        let mut whole = vec![1.0f32; n];
        dropout_inplace(&mut whole, 0.25, key, 0);
        let mask = DropoutMask::new(0.25, key);
        for (i, &v) in whole.iter().enumerate() {
            assert_eq!(v != 0.0, mask.keep(i), "element {i}");
        }
        // Processing the tensor in two pieces with offsets gives the same result.
        let mut parts = vec![1.0f32; n];
        let (a, b) = parts.split_at_mut(1000);
        dropout_inplace(a, 0.25, key, 0);
        dropout_inplace(b, 0.25, key, 1000);
        assert_eq!(parts, whole);
    }

    #[test]
    fn bf16_storage_uses_the_same_mask() {
        let key = dropout_key(3, 1, 1);
        let mut x32 = vec![1.5f32; 4096];
        let mut x16 = vec![bf16::from_f32(1.5); 4096];
        dropout_inplace(&mut x32, 0.5, key, 0);
        dropout_inplace(&mut x16, 0.5, key, 0);
        for (a, b) in x32.iter().zip(&x16) {
            assert_eq!(*a, b.to_f32());
        }
    }

    #[test]
    #[should_panic(expected = "dropout probability")]
    fn probability_one_is_refused() {
        DropoutMask::new(1.0, 0);
    }
}
