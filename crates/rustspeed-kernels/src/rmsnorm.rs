//! RMSNorm as in HF `LlamaRMSNorm`: `weight * x * rsqrt(mean(x^2) + eps)`, forward and backward.
//!
//! HF computes the normalisation in f32, casts it back to the input dtype and then multiplies by
//! the weight in that dtype; here the whole row is computed in f32 and rounded once, so bf16
//! outputs can differ from HF's by one bf16 rounding. In f32 the two are the same.

use rayon::prelude::*;

use crate::dtype::Float;
use crate::layernorm::{reduce_partials, GRAD_BLOCK_ROWS, PARALLEL_MIN_ELEMS};

/// `out = x * rstd * weight` per row of `[n, c]`; saves `rstd = 1 / sqrt(mean(x^2) + eps)`.
pub fn rmsnorm_forward<T: Float>(
    out: &mut [T],
    rstd: &mut [f32],
    x: &[T],
    weight: &[T],
    n: usize,
    c: usize,
    eps: f32,
) {
    assert_eq!(
        x.len(),
        n * c,
        "rmsnorm_forward: x has {} elements, expected n*c = {n}*{c}",
        x.len()
    );
    assert_eq!(
        out.len(),
        n * c,
        "rmsnorm_forward: out has {} elements, expected n*c = {n}*{c}",
        out.len()
    );
    assert_eq!(
        rstd.len(),
        n,
        "rmsnorm_forward: rstd has {} elements, expected n = {n}",
        rstd.len()
    );
    assert_eq!(
        weight.len(),
        c,
        "rmsnorm_forward: weight has {} elements, expected c = {c}",
        weight.len()
    );
    if c == 0 {
        return;
    }
    let row = |((o, x), r): ((&mut [T], &[T]), &mut f32)| {
        let ms = x.iter().map(|v| v.to_f32().powi(2)).sum::<f32>() / c as f32;
        let rs = 1.0 / (ms + eps).sqrt();
        for ((o, x), w) in o.iter_mut().zip(x).zip(weight) {
            *o = T::from_f32(x.to_f32() * rs * w.to_f32());
        }
        *r = rs;
    };
    if n * c >= PARALLEL_MIN_ELEMS {
        out.par_chunks_mut(c)
            .zip(x.par_chunks(c))
            .zip(rstd.par_iter_mut())
            .for_each(row);
    } else {
        out.chunks_mut(c)
            .zip(x.chunks(c))
            .zip(rstd.iter_mut())
            .for_each(row);
    }
}

/// Backward of [`rmsnorm_forward`]: `dx` (overwritten, or added to with `accumulate_dx`) and
/// `dweight += Σ dout * x * rstd` (f32, skipped when `None`).
///
/// With `g = dout * weight`: `dx = rstd * g - x * rstd^3 * mean(g * x)`.
#[allow(clippy::too_many_arguments)]
pub fn rmsnorm_backward<T: Float>(
    dx: &mut [T],
    accumulate_dx: bool,
    dweight: Option<&mut [f32]>,
    dout: &[T],
    x: &[T],
    weight: &[T],
    rstd: &[f32],
    n: usize,
    c: usize,
) {
    for (name, len, want) in [
        ("dx", dx.len(), n * c),
        ("dout", dout.len(), n * c),
        ("x", x.len(), n * c),
    ] {
        assert_eq!(
            len, want,
            "rmsnorm_backward: {name} has {len} elements, expected n*c = {n}*{c}"
        );
    }
    assert_eq!(
        weight.len(),
        c,
        "rmsnorm_backward: weight has {} elements, expected c = {c}",
        weight.len()
    );
    assert_eq!(
        rstd.len(),
        n,
        "rmsnorm_backward: rstd has {} elements, expected n = {n}",
        rstd.len()
    );
    if let Some(dw) = &dweight {
        assert_eq!(
            dw.len(),
            c,
            "rmsnorm_backward: dweight has {} elements, expected c = {c}",
            dw.len()
        );
    }
    if n == 0 || c == 0 {
        return;
    }
    let blocks = n.div_ceil(GRAD_BLOCK_ROWS);
    let mut partial = vec![0f32; if dweight.is_some() { blocks * c } else { 0 }];
    let block = |(bi, dx_block): (usize, &mut [T]), part: &mut [f32]| {
        let r0 = bi * GRAD_BLOCK_ROWS;
        for (i, dx) in dx_block.chunks_mut(c).enumerate() {
            let r = r0 + i;
            let (x, dout) = (&x[r * c..(r + 1) * c], &dout[r * c..(r + 1) * c]);
            let rs = rstd[r];
            let dot = x
                .iter()
                .zip(dout)
                .zip(weight)
                .map(|((x, d), w)| x.to_f32() * d.to_f32() * w.to_f32())
                .sum::<f32>();
            let k = rs * rs * rs * dot / c as f32;
            for (j, dxj) in dx.iter_mut().enumerate() {
                let (xv, d) = (x[j].to_f32(), dout[j].to_f32());
                let g = rs * d * weight[j].to_f32() - xv * k;
                *dxj = T::from_f32(if accumulate_dx { dxj.to_f32() + g } else { g });
                if !part.is_empty() {
                    part[j] += d * xv * rs;
                }
            }
        }
    };
    let block_elems = GRAD_BLOCK_ROWS * c;
    let with_params = !partial.is_empty();
    match (n * c >= PARALLEL_MIN_ELEMS, with_params) {
        (true, true) => dx
            .par_chunks_mut(block_elems)
            .enumerate()
            .zip(partial.par_chunks_mut(c))
            .for_each(|(b, p)| block(b, p)),
        (true, false) => dx
            .par_chunks_mut(block_elems)
            .enumerate()
            .for_each(|b| block(b, &mut [])),
        (false, true) => dx
            .chunks_mut(block_elems)
            .enumerate()
            .zip(partial.chunks_mut(c))
            .for_each(|(b, p)| block(b, p)),
        (false, false) => dx
            .chunks_mut(block_elems)
            .enumerate()
            .for_each(|b| block(b, &mut [])),
    }
    reduce_partials(&partial, c, [dweight]);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::*;
    use half::bf16;

    fn naive(x: &[f32], w: &[f32], n: usize, c: usize, eps: f64) -> Vec<f64> {
        let mut out = vec![0f64; n * c];
        for r in 0..n {
            let row = &x[r * c..(r + 1) * c];
            let ms = row.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / c as f64;
            for j in 0..c {
                out[r * c + j] = row[j] as f64 / (ms + eps).sqrt() * w[j] as f64;
            }
        }
        out
    }

    #[test]
    fn forward_matches_naive() {
        let mut rng = Rng::new(30);
        let (n, c) = (6, 19);
        let (x, w) = (rng.vec(n * c, 3.0), rng.vec(c, 1.0));
        let (mut out, mut rstd) = (vec![0f32; n * c], vec![0f32; n]);
        rmsnorm_forward(&mut out, &mut rstd, &x, &w, n, c, 1e-6);
        assert_close("out", &out, &naive(&x, &w, n, c, 1e-6), 1e-5);
    }

    #[test]
    fn backward_matches_finite_differences() {
        let mut rng = Rng::new(31);
        let (n, c, eps) = (4, 9, 1e-6);
        let mut x = rng.vec(n * c, 1.0);
        let mut w = rng.vec(c, 1.0);
        let probe = rng.vec(n * c, 1.0);
        let loss = |x: &[f32], w: &[f32]| -> f64 {
            naive(x, w, n, c, eps)
                .iter()
                .zip(&probe)
                .map(|(o, p)| o * *p as f64)
                .sum()
        };
        let (mut out, mut rstd) = (vec![0f32; n * c], vec![0f32; n]);
        rmsnorm_forward(&mut out, &mut rstd, &x, &w, n, c, eps as f32);
        let mut dx = vec![0f32; n * c];
        let mut dw = vec![0.5f32; c];
        rmsnorm_backward(&mut dx, false, Some(&mut dw), &probe, &x, &w, &rstd, n, c);
        let wc = w.clone();
        let ndx = numeric_grad(&mut x, 1e-3, |x| loss(x, &wc));
        let xc = x.clone();
        let ndw = numeric_grad(&mut w, 1e-3, |w| loss(&xc, w));
        assert_grad_close("dx", &dx, &ndx, 1e-3);
        assert_grad_close(
            "dweight",
            &dw.iter().map(|v| v - 0.5).collect::<Vec<_>>(),
            &ndw,
            1e-3,
        );
        let mut dx2 = vec![-1.0f32; n * c];
        rmsnorm_backward(&mut dx2, true, None, &probe, &x, &w, &rstd, n, c);
        assert_close(
            "accumulate dx",
            &dx2,
            &dx.iter().map(|v| *v as f64 - 1.0).collect::<Vec<_>>(),
            1e-6,
        );
    }

    #[test]
    fn parallel_dweight_matches_f64_sum() {
        let mut rng = Rng::new(32);
        let (n, c) = (100, 400);
        let (x, w, dout) = (rng.vec(n * c, 1.0), rng.vec(c, 1.0), rng.vec(n * c, 1.0));
        let (mut out, mut rstd) = (vec![0f32; n * c], vec![0f32; n]);
        rmsnorm_forward(&mut out, &mut rstd, &x, &w, n, c, 1e-6);
        let (mut dx, mut dw) = (vec![0f32; n * c], vec![0f32; c]);
        rmsnorm_backward(&mut dx, false, Some(&mut dw), &dout, &x, &w, &rstd, n, c);
        let want: Vec<f64> = (0..c)
            .map(|j| {
                (0..n)
                    .map(|r| dout[r * c + j] as f64 * x[r * c + j] as f64 * rstd[r] as f64)
                    .sum()
            })
            .collect();
        assert_close("dweight", &dw, &want, 1e-4);
    }

    #[test]
    fn bf16_storage_matches_f32() {
        let mut rng = Rng::new(33);
        let (n, c) = (3, 64);
        let r = |v: Vec<f32>| v.into_iter().map(bf16::from_f32).collect::<Vec<_>>();
        let f = |v: &[bf16]| v.iter().map(|x| x.to_f32()).collect::<Vec<_>>();
        let (x, w, d) = (
            r(rng.vec(n * c, 1.0)),
            r(rng.vec(c, 1.0)),
            r(rng.vec(n * c, 1.0)),
        );
        let (mut out, mut rstd) = (vec![bf16::from_f32(0.0); n * c], vec![0f32; n]);
        rmsnorm_forward(&mut out, &mut rstd, &x, &w, n, c, 1e-6);
        assert_close(
            "bf16 out",
            &f(&out),
            &naive(&f(&x), &f(&w), n, c, 1e-6),
            1e-2,
        );
        let mut dx = vec![bf16::from_f32(0.0); n * c];
        rmsnorm_backward(&mut dx, false, None, &d, &x, &w, &rstd, n, c);
        let mut dx32 = vec![0f32; n * c];
        rmsnorm_backward(&mut dx32, false, None, &f(&d), &f(&x), &f(&w), &rstd, n, c);
        assert_close(
            "bf16 dx",
            &f(&dx),
            &dx32.iter().map(|v| *v as f64).collect::<Vec<_>>(),
            1e-2,
        );
    }
}
