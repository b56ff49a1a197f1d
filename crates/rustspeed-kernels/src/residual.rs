//! Residual connections: `out = a + b`.
//!
//! There is no separate backward kernel: the gradient of a sum flows unchanged to both inputs,
//! so the caller passes `dout` on as the gradient of each branch. Where two branches meet on the
//! way back (the residual stream and a block's input), their gradients are summed with
//! [`add_inplace`]; most backward kernels here can instead accumulate into `dx` directly.

use rayon::prelude::*;

use crate::dtype::Float;

const PARALLEL_MIN_ELEMS: usize = 1 << 15;
const CHUNK: usize = 1 << 13;

/// `out = a + b`, added in f32 and rounded once.
pub fn residual_forward<T: Float>(out: &mut [T], a: &[T], b: &[T]) {
    assert_eq!(
        a.len(),
        out.len(),
        "residual_forward: a has {} elements, out has {}",
        a.len(),
        out.len()
    );
    assert_eq!(
        b.len(),
        out.len(),
        "residual_forward: b has {} elements, out has {}",
        b.len(),
        out.len()
    );
    let body = |o0: usize, out: &mut [T]| {
        for ((o, a), b) in out.iter_mut().zip(&a[o0..]).zip(&b[o0..]) {
            *o = T::from_f32(a.to_f32() + b.to_f32());
        }
    };
    if out.len() >= PARALLEL_MIN_ELEMS {
        out.par_chunks_mut(CHUNK)
            .enumerate()
            .for_each(|(i, c)| body(i * CHUNK, c));
    } else {
        body(0, out);
    }
}

/// `acc += x`: sums the gradients of two branches, or adds a residual in place.
/// `acc` may be a wider type than `x` (an f32 gradient buffer fed bf16 values).
pub fn add_inplace<A: Float, T: Float>(acc: &mut [A], x: &[T]) {
    assert_eq!(
        x.len(),
        acc.len(),
        "add_inplace: x has {} elements, acc has {}",
        x.len(),
        acc.len()
    );
    let body = |o0: usize, acc: &mut [A]| {
        for (a, x) in acc.iter_mut().zip(&x[o0..]) {
            *a = A::from_f32(a.to_f32() + x.to_f32());
        }
    };
    if acc.len() >= PARALLEL_MIN_ELEMS {
        acc.par_chunks_mut(CHUNK)
            .enumerate()
            .for_each(|(i, c)| body(i * CHUNK, c));
    } else {
        body(0, acc);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::*;
    use half::bf16;

    #[test]
    fn forward_and_accumulate_match_naive_sums() {
        let mut rng = Rng::new(50);
        for n in [7usize, 50_000] {
            let (a, b) = (rng.vec(n, 1.0), rng.vec(n, 1.0));
            let mut out = vec![0f32; n];
            residual_forward(&mut out, &a, &b);
            let want: Vec<f64> = a
                .iter()
                .zip(&b)
                .map(|(a, b)| *a as f64 + *b as f64)
                .collect();
            assert_close("residual", &out, &want, 1e-7);
            let mut acc = a.clone();
            add_inplace(&mut acc, &b);
            assert_eq!(acc, out);
        }
    }

    #[test]
    fn gradient_is_identity_for_both_inputs() {
        // d/da and d/db of Σ probe * (a + b) are probe: what the module doc tells callers to pass on.
        let mut rng = Rng::new(51);
        let (mut a, b, probe) = (rng.vec(9, 1.0), rng.vec(9, 1.0), rng.vec(9, 1.0));
        let loss = |a: &[f32]| -> f64 {
            let mut out = vec![0f32; 9];
            residual_forward(&mut out, a, &b);
            out.iter()
                .zip(&probe)
                .map(|(o, p)| *o as f64 * *p as f64)
                .sum()
        };
        let num = numeric_grad(&mut a, 1e-2, loss);
        assert_grad_close("da", &probe, &num, 1e-3);
    }

    #[test]
    fn bf16_storage_rounds_once_and_f32_accumulator_is_exact() {
        let mut rng = Rng::new(52);
        let a: Vec<bf16> = rng.vec(64, 1.0).into_iter().map(bf16::from_f32).collect();
        let b: Vec<bf16> = rng.vec(64, 1.0).into_iter().map(bf16::from_f32).collect();
        let mut out = vec![bf16::from_f32(0.0); 64];
        residual_forward(&mut out, &a, &b);
        let exact: Vec<f64> = a
            .iter()
            .zip(&b)
            .map(|(a, b)| a.to_f32() as f64 + b.to_f32() as f64)
            .collect();
        let got: Vec<f32> = out.iter().map(|v| v.to_f32()).collect();
        assert_close("bf16 residual", &got, &exact, 4e-3);
        let mut acc: Vec<f32> = a.iter().map(|v| v.to_f32()).collect();
        add_inplace(&mut acc, &b);
        assert_close("f32 += bf16", &acc, &exact, 1e-7);
    }
}
