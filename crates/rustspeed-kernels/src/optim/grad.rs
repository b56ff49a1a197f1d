//! Global gradient L2 norm with a fused inf/nan check, and DeepSpeed's clip coefficient.
//!
//! The sum of squares is accumulated in f64 over fixed [`CHUNK`]s, each chunk in eight fixed
//! lanes (so the loop vectorises without reassociation), and the chunk sums are added in
//! index order. The result is bitwise reproducible whatever the thread count. Squares of
//! finite f32 values cannot overflow f64 and are never negative, so the sum is non-finite
//! exactly when some gradient is inf or nan: the overflow check costs nothing extra.

use rayon::prelude::*;

use super::CHUNK;

/// DeepSpeed's epsilon in the clip formula (`stage_1_and_2.py`): `(norm + 1e-6) / max_norm`.
pub const CLIP_EPS: f64 = 1e-6;

const LANES: usize = 8;

/// The squared L2 norm of a gradient range, and what follows from it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GradNorm {
    /// Sum of squares in f64: what ranks all-reduce before taking the root.
    pub sum_sq: f64,
}

impl GradNorm {
    pub fn norm(&self) -> f64 {
        self.sum_sq.sqrt()
    }

    /// false if any gradient was inf or nan (an fp16 overflow).
    pub fn is_finite(&self) -> bool {
        self.sum_sq.is_finite()
    }

    /// Combines partial norms of disjoint ranges (e.g. after an all-reduce of `sum_sq`).
    pub fn combine(parts: &[GradNorm]) -> GradNorm {
        GradNorm {
            sum_sq: parts.iter().map(|p| p.sum_sq).sum(),
        }
    }
}

/// Sum of squares of `grads` (as stored: scaled by the loss scale, if any).
pub fn grad_norm(grads: &[f32]) -> GradNorm {
    let partials: Vec<f64> = grads.par_chunks(CHUNK).map(chunk_sum_sq).collect();
    GradNorm {
        sum_sq: partials.iter().sum(),
    }
}

multiversion! {
    fn chunk_sum_sq(x: &[f32]) -> f64 {
        let mut lanes = [0.0f64; LANES];
        let mut blocks = x.chunks_exact(LANES);
        for b in &mut blocks {
            for k in 0..LANES {
                let v = b[k] as f64;
                lanes[k] += v * v;
            }
        }
        for (k, v) in blocks.remainder().iter().enumerate() {
            lanes[k] += (*v as f64) * (*v as f64);
        }
        let mut s = 0.0;
        for l in lanes {
            s += l;
        }
        s
    }
}

/// DeepSpeed's clip coefficient (ZeRO 1/2 path, `stage_1_and_2.py`), for a norm computed on
/// gradients still multiplied by `loss_scale`:
/// `clip = ((total_norm / loss_scale) + 1e-6) / max_norm; clip = max(clip, 1)`.
/// The engine then reads gradients with `grad_scale = 1 / (clip * loss_scale)`.
/// `max_norm <= 0` (`gradient_clipping: 0`) disables clipping: 1.
pub fn clip_coefficient(total_norm: f64, loss_scale: f64, max_norm: f64) -> f64 {
    if max_norm <= 0.0 {
        return 1.0;
    }
    let clip = ((total_norm / loss_scale) + CLIP_EPS) / max_norm;
    clip.max(1.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::Rng;

    #[test]
    fn norm_matches_naive_sum() {
        let mut rng = Rng::new(1);
        let g = rng.vec(3 * CHUNK + 17, 2.0);
        let naive: f64 = g.iter().map(|&x| (x as f64) * (x as f64)).sum();
        let n = grad_norm(&g);
        assert!(
            (n.sum_sq - naive).abs() <= 1e-12 * naive,
            "{} vs {naive}",
            n.sum_sq
        );
        assert!(n.is_finite());
        assert_eq!(grad_norm(&[3.0, 4.0]).norm(), 5.0);
        assert_eq!(grad_norm(&[]).sum_sq, 0.0);
    }

    #[test]
    fn bitwise_reproducible_across_thread_counts() {
        let mut rng = Rng::new(2);
        let g = rng.vec(5 * CHUNK + 3, 1e3);
        let sums: Vec<u64> = [1, 2, 3, 7]
            .iter()
            .map(|&t| {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(t)
                    .build()
                    .unwrap();
                pool.install(|| grad_norm(&g)).sum_sq.to_bits()
            })
            .collect();
        assert!(sums.windows(2).all(|w| w[0] == w[1]), "{sums:?}");
    }

    #[test]
    fn detects_inf_and_nan_anywhere() {
        for bad in [f32::INFINITY, f32::NEG_INFINITY, f32::NAN] {
            for pos in [0, CHUNK - 1, CHUNK + 8, 2 * CHUNK + 4] {
                let mut g = vec![0.5f32; 2 * CHUNK + 5];
                g[pos] = bad;
                assert!(!grad_norm(&g).is_finite(), "{bad} at {pos} missed");
            }
        }
        // The largest finite f32 squared does not overflow f64.
        assert!(grad_norm(&[f32::MAX, f32::MAX]).is_finite());
    }

    #[test]
    fn clip_coefficient_follows_deepspeed() {
        // norm 10 on grads scaled by 4 -> true norm 2.5; max 1 -> clip 2.500001.
        let c = clip_coefficient(10.0, 4.0, 1.0);
        assert!((c - 2.500001).abs() < 1e-12);
        // Below the threshold the coefficient is 1, never an up-scale.
        assert_eq!(clip_coefficient(0.5, 1.0, 1.0), 1.0);
        assert_eq!(
            clip_coefficient(100.0, 1.0, 0.0),
            1.0,
            "gradient_clipping 0 disables"
        );
        let parts = [grad_norm(&[3.0]), grad_norm(&[4.0])];
        assert_eq!(GradNorm::combine(&parts).norm(), 5.0);
    }
}
