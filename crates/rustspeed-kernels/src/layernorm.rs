//! LayerNorm over the last dimension (GPT-2's `ln_1`, `ln_2`, `ln_f`), forward and backward.

use rayon::prelude::*;

use crate::activation::has_avx2_fma;
use crate::dtype::Float;

/// Rows go parallel above this many elements.
pub(crate) const PARALLEL_MIN_ELEMS: usize = 1 << 15;
/// Rows per block of the parameter-gradient reduction. Fixed, so that the summation order and
/// hence the result do not depend on the number of threads.
pub(crate) const GRAD_BLOCK_ROWS: usize = 32;

/// `out = (x - mean) * rstd * weight + bias` per row of `[n, c]`, computed in f32; saves each
/// row's `mean` and `rstd = 1 / sqrt(var + eps)` (biased variance, as PyTorch) for backward.
#[allow(clippy::too_many_arguments)]
pub fn layernorm_forward<T: Float>(
    out: &mut [T],
    mean: &mut [f32],
    rstd: &mut [f32],
    x: &[T],
    weight: &[T],
    bias: &[T],
    n: usize,
    c: usize,
    eps: f32,
) {
    assert_eq!(
        x.len(),
        n * c,
        "layernorm_forward: x has {} elements, expected n*c = {n}*{c}",
        x.len()
    );
    assert_eq!(
        out.len(),
        n * c,
        "layernorm_forward: out has {} elements, expected n*c = {n}*{c}",
        out.len()
    );
    assert_eq!(
        mean.len(),
        n,
        "layernorm_forward: mean has {} elements, expected n = {n}",
        mean.len()
    );
    assert_eq!(
        rstd.len(),
        n,
        "layernorm_forward: rstd has {} elements, expected n = {n}",
        rstd.len()
    );
    assert_eq!(
        weight.len(),
        c,
        "layernorm_forward: weight has {} elements, expected c = {c}",
        weight.len()
    );
    assert_eq!(
        bias.len(),
        c,
        "layernorm_forward: bias has {} elements, expected c = {c}",
        bias.len()
    );
    if c == 0 {
        return;
    }
    type Row<'a, T> = ((&'a mut [T], &'a [T]), (&'a mut f32, &'a mut f32));
    let simd = has_avx2_fma();
    let row = |((o, x), (m, r)): Row<'_, T>| {
        #[cfg(target_arch = "x86_64")]
        if simd {
            // SAFETY: the running CPU has AVX2 and FMA (checked above).
            (*m, *r) = unsafe { forward_row_avx2(o, x, weight, bias, eps) };
            return;
        }
        let _ = simd;
        (*m, *r) = forward_row(o, x, weight, bias, eps);
    };
    if n * c >= PARALLEL_MIN_ELEMS {
        out.par_chunks_mut(c)
            .zip(x.par_chunks(c))
            .zip(mean.par_iter_mut().zip(rstd.par_iter_mut()))
            .for_each(row);
    } else {
        out.chunks_mut(c)
            .zip(x.chunks(c))
            .zip(mean.iter_mut().zip(rstd.iter_mut()))
            .for_each(row);
    }
}

/// One row of [`layernorm_forward`]; returns `(mean, rstd)`.
#[inline(always)]
fn forward_row<T: Float>(out: &mut [T], x: &[T], weight: &[T], bias: &[T], eps: f32) -> (f32, f32) {
    let c = x.len() as f32;
    // Two passes: the one-pass E[x^2] - E[x]^2 cancels badly for rows with a large mean.
    let mu = lane_sum(x, |v| v.to_f32()) / c;
    let var = lane_sum(x, |v| (v.to_f32() - mu) * (v.to_f32() - mu)) / c;
    let rs = 1.0 / (var + eps).sqrt();
    for (((o, x), w), b) in out.iter_mut().zip(x).zip(weight).zip(bias) {
        *o = T::from_f32((x.to_f32() - mu) * rs * w.to_f32() + b.to_f32());
    }
    (mu, rs)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn forward_row_avx2<T: Float>(
    out: &mut [T],
    x: &[T],
    weight: &[T],
    bias: &[T],
    eps: f32,
) -> (f32, f32) {
    forward_row(out, x, weight, bias, eps)
}

/// Accumulator lanes of the row sums: a single f32 accumulator is a serial chain that LLVM may
/// not reorder, so it would not vectorise; 16 lanes only reassociate the sum.
const LANES: usize = 16;

/// `Σ f(x[j])` over a row, in [`LANES`] partial sums.
#[inline(always)]
fn lane_sum<T: Copy>(x: &[T], f: impl Fn(T) -> f32) -> f32 {
    let mut acc = [0f32; LANES];
    let chunks = x.chunks_exact(LANES);
    let tail: f32 = chunks.remainder().iter().map(|&v| f(v)).sum();
    for c in chunks {
        for (s, &v) in acc.iter_mut().zip(c) {
            *s += f(v);
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// One row of [`layernorm_backward`]: writes (or adds to) `dx` and, when `part` is not empty,
/// adds `dout * xhat` and `dout` into its two halves.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn backward_row<T: Float>(
    dx: &mut [T],
    part: &mut [f32],
    accumulate_dx: bool,
    x: &[T],
    dout: &[T],
    weight: &[T],
    mu: f32,
    rs: f32,
) {
    let c = x.len();
    // dx = rstd * (dnorm - mean(dnorm) - xhat * mean(dnorm * xhat)), dnorm = dout * w.
    let (mut acc_dn, mut acc_dn_xhat) = ([0f32; LANES], [0f32; LANES]);
    let (xc, dc, wc) = (
        x.chunks_exact(LANES),
        dout.chunks_exact(LANES),
        weight.chunks_exact(LANES),
    );
    let (mut sum_dn, mut sum_dn_xhat) = (0f32, 0f32);
    for ((x, d), w) in xc
        .remainder()
        .iter()
        .zip(dc.remainder())
        .zip(wc.remainder())
    {
        let dn = d.to_f32() * w.to_f32();
        sum_dn += dn;
        sum_dn_xhat += dn * (x.to_f32() - mu) * rs;
    }
    for ((x, d), w) in xc.zip(dc).zip(wc) {
        for l in 0..LANES {
            let dn = d[l].to_f32() * w[l].to_f32();
            acc_dn[l] += dn;
            acc_dn_xhat[l] += dn * (x[l].to_f32() - mu) * rs;
        }
    }
    sum_dn += acc_dn.iter().sum::<f32>();
    sum_dn_xhat += acc_dn_xhat.iter().sum::<f32>();
    let (mean_dn, mean_dn_xhat) = (sum_dn / c as f32, sum_dn_xhat / c as f32);
    let grad = |j: usize| {
        let xhat = (x[j].to_f32() - mu) * rs;
        let d = dout[j].to_f32();
        (
            xhat,
            d,
            rs * (d * weight[j].to_f32() - mean_dn - xhat * mean_dn_xhat),
        )
    };
    // Four copies of the loop rather than two branches inside it, so that each vectorises.
    match (accumulate_dx, part.is_empty()) {
        (false, true) => dx
            .iter_mut()
            .enumerate()
            .for_each(|(j, dxj)| *dxj = T::from_f32(grad(j).2)),
        (true, true) => dx.iter_mut().enumerate().for_each(|(j, dxj)| {
            *dxj = T::from_f32(dxj.to_f32() + grad(j).2);
        }),
        (acc, false) => {
            let (pw, pb) = part.split_at_mut(c);
            for (j, ((dxj, pw), pb)) in dx.iter_mut().zip(pw).zip(pb).enumerate() {
                let (xhat, d, g) = grad(j);
                *dxj = T::from_f32(if acc { dxj.to_f32() + g } else { g });
                *pw += d * xhat;
                *pb += d;
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn backward_row_avx2<T: Float>(
    dx: &mut [T],
    part: &mut [f32],
    accumulate_dx: bool,
    x: &[T],
    dout: &[T],
    weight: &[T],
    mu: f32,
    rs: f32,
) {
    backward_row(dx, part, accumulate_dx, x, dout, weight, mu, rs)
}

/// Backward of [`layernorm_forward`].
///
/// `dx` is overwritten, or added to with `accumulate_dx` (the residual stream's gradient);
/// `dweight += Σ dout * xhat` and `dbias += Σ dout` (f32), each skipped when `None`.
#[allow(clippy::too_many_arguments)]
pub fn layernorm_backward<T: Float>(
    dx: &mut [T],
    accumulate_dx: bool,
    dweight: Option<&mut [f32]>,
    dbias: Option<&mut [f32]>,
    dout: &[T],
    x: &[T],
    weight: &[T],
    mean: &[f32],
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
            "layernorm_backward: {name} has {len} elements, expected n*c = {n}*{c}"
        );
    }
    assert_eq!(
        weight.len(),
        c,
        "layernorm_backward: weight has {} elements, expected c = {c}",
        weight.len()
    );
    assert_eq!(
        mean.len(),
        n,
        "layernorm_backward: mean has {} elements, expected n = {n}",
        mean.len()
    );
    assert_eq!(
        rstd.len(),
        n,
        "layernorm_backward: rstd has {} elements, expected n = {n}",
        rstd.len()
    );
    if let Some(dw) = &dweight {
        assert_eq!(
            dw.len(),
            c,
            "layernorm_backward: dweight has {} elements, expected c = {c}",
            dw.len()
        );
    }
    if let Some(db) = &dbias {
        assert_eq!(
            db.len(),
            c,
            "layernorm_backward: dbias has {} elements, expected c = {c}",
            db.len()
        );
    }
    if n == 0 || c == 0 {
        return;
    }
    let want_params = dweight.is_some() || dbias.is_some();
    let blocks = n.div_ceil(GRAD_BLOCK_ROWS);
    // Per block: [dweight partial | dbias partial].
    let mut partial = vec![0f32; if want_params { blocks * 2 * c } else { 0 }];
    let simd = has_avx2_fma();
    let block = |(bi, dx_block): (usize, &mut [T]), part: &mut [f32]| {
        let r0 = bi * GRAD_BLOCK_ROWS;
        for (i, dx) in dx_block.chunks_mut(c).enumerate() {
            let r = r0 + i;
            let (x, dout) = (&x[r * c..(r + 1) * c], &dout[r * c..(r + 1) * c]);
            let (mu, rs) = (mean[r], rstd[r]);
            #[cfg(target_arch = "x86_64")]
            if simd {
                // SAFETY: the running CPU has AVX2 and FMA (checked above).
                unsafe { backward_row_avx2(dx, part, accumulate_dx, x, dout, weight, mu, rs) };
                continue;
            }
            let _ = simd;
            backward_row(dx, part, accumulate_dx, x, dout, weight, mu, rs);
        }
    };
    let block_elems = GRAD_BLOCK_ROWS * c;
    if n * c >= PARALLEL_MIN_ELEMS {
        if want_params {
            dx.par_chunks_mut(block_elems)
                .enumerate()
                .zip(partial.par_chunks_mut(2 * c))
                .for_each(|(b, p)| block(b, p));
        } else {
            dx.par_chunks_mut(block_elems)
                .enumerate()
                .for_each(|b| block(b, &mut []));
        }
    } else if want_params {
        dx.chunks_mut(block_elems)
            .enumerate()
            .zip(partial.chunks_mut(2 * c))
            .for_each(|(b, p)| block(b, p));
    } else {
        dx.chunks_mut(block_elems)
            .enumerate()
            .for_each(|b| block(b, &mut []));
    }
    reduce_partials(&partial, c, [dweight, dbias]);
}

/// Adds block partials (`[blocks, parts.len() * c]`) into the requested gradients, in block order.
pub(crate) fn reduce_partials<const P: usize>(
    partial: &[f32],
    c: usize,
    grads: [Option<&mut [f32]>; P],
) {
    for (p, grad) in grads.into_iter().enumerate() {
        if let Some(g) = grad {
            for block in partial.chunks(P * c) {
                for (g, v) in g.iter_mut().zip(&block[p * c..(p + 1) * c]) {
                    *g += v;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::*;
    use half::bf16;

    fn naive(x: &[f32], w: &[f32], b: &[f32], n: usize, c: usize, eps: f64) -> Vec<f64> {
        let mut out = vec![0f64; n * c];
        for r in 0..n {
            let row = &x[r * c..(r + 1) * c];
            let mu = row.iter().map(|v| *v as f64).sum::<f64>() / c as f64;
            let var = row.iter().map(|v| (*v as f64 - mu).powi(2)).sum::<f64>() / c as f64;
            for j in 0..c {
                out[r * c + j] =
                    (row[j] as f64 - mu) / (var + eps).sqrt() * w[j] as f64 + b[j] as f64;
            }
        }
        out
    }

    #[test]
    fn forward_matches_naive_and_saves_stats() {
        let mut rng = Rng::new(20);
        let (n, c) = (5, 33);
        // A large offset checks the two-pass variance.
        let x: Vec<f32> = rng.vec(n * c, 1.0).iter().map(|v| v + 100.0).collect();
        let (w, b) = (rng.vec(c, 1.0), rng.vec(c, 1.0));
        let (mut out, mut mean, mut rstd) = (vec![0f32; n * c], vec![0f32; n], vec![0f32; n]);
        layernorm_forward(&mut out, &mut mean, &mut rstd, &x, &w, &b, n, c, 1e-5);
        assert_close("out", &out, &naive(&x, &w, &b, n, c, 1e-5), 1e-4);
        let mu0 = x[..c].iter().map(|v| *v as f64).sum::<f64>() / c as f64;
        assert_close("mean[0]", &mean[..1], &[mu0], 1e-6);
    }

    #[test]
    fn backward_matches_finite_differences() {
        let mut rng = Rng::new(21);
        let (n, c, eps) = (4, 7, 1e-5);
        let mut x = rng.vec(n * c, 1.0);
        let mut w = rng.vec(c, 1.0);
        let mut b = rng.vec(c, 1.0);
        let probe = rng.vec(n * c, 1.0);
        let loss = |x: &[f32], w: &[f32], b: &[f32]| -> f64 {
            naive(x, w, b, n, c, eps)
                .iter()
                .zip(&probe)
                .map(|(o, p)| o * *p as f64)
                .sum()
        };
        let (mut out, mut mean, mut rstd) = (vec![0f32; n * c], vec![0f32; n], vec![0f32; n]);
        layernorm_forward(&mut out, &mut mean, &mut rstd, &x, &w, &b, n, c, eps as f32);
        let mut dx = vec![0f32; n * c];
        let (mut dw, mut db) = (vec![0.25f32; c], vec![0.5f32; c]);
        layernorm_backward(
            &mut dx,
            false,
            Some(&mut dw),
            Some(&mut db),
            &probe,
            &x,
            &w,
            &mean,
            &rstd,
            n,
            c,
        );
        let (wc, bc) = (w.clone(), b.clone());
        let ndx = numeric_grad(&mut x, 1e-3, |x| loss(x, &wc, &bc));
        let xc = x.clone();
        let ndw = numeric_grad(&mut w, 1e-3, |w| loss(&xc, w, &bc));
        let ndb = numeric_grad(&mut b, 1e-3, |b| loss(&xc, &wc, b));
        assert_grad_close("dx", &dx, &ndx, 1e-3);
        assert_grad_close(
            "dweight",
            &dw.iter().map(|v| v - 0.25).collect::<Vec<_>>(),
            &ndw,
            1e-3,
        );
        assert_grad_close(
            "dbias",
            &db.iter().map(|v| v - 0.5).collect::<Vec<_>>(),
            &ndb,
            1e-3,
        );
        let mut dx2 = vec![1.0f32; n * c];
        layernorm_backward(
            &mut dx2, true, None, None, &probe, &x, &w, &mean, &rstd, n, c,
        );
        assert_close(
            "accumulate dx",
            &dx2,
            &dx.iter().map(|v| *v as f64 + 1.0).collect::<Vec<_>>(),
            1e-6,
        );
    }

    #[test]
    fn parallel_path_matches_serial_reference() {
        // Large enough for the parallel branch; compare to per-row serial calls.
        let mut rng = Rng::new(22);
        let (n, c) = (70, 512);
        let x = rng.vec(n * c, 2.0);
        let (w, b) = (rng.vec(c, 1.0), rng.vec(c, 1.0));
        let dout = rng.vec(n * c, 1.0);
        let (mut out, mut mean, mut rstd) = (vec![0f32; n * c], vec![0f32; n], vec![0f32; n]);
        layernorm_forward(&mut out, &mut mean, &mut rstd, &x, &w, &b, n, c, 1e-5);
        let (mut dx, mut dw, mut db) = (vec![0f32; n * c], vec![0f32; c], vec![0f32; c]);
        layernorm_backward(
            &mut dx,
            false,
            Some(&mut dw),
            Some(&mut db),
            &dout,
            &x,
            &w,
            &mean,
            &rstd,
            n,
            c,
        );
        let (mut dw_s, mut db_s) = (vec![0f64; c], vec![0f64; c]);
        for r in 0..n {
            let rs = r * c..(r + 1) * c;
            let (mut o, mut m, mut s) = (vec![0f32; c], [0f32], [0f32]);
            layernorm_forward(&mut o, &mut m, &mut s, &x[rs.clone()], &w, &b, 1, c, 1e-5);
            assert_eq!(o, out[rs.clone()], "row {r}");
            let mut d = vec![0f32; c];
            layernorm_backward(
                &mut d,
                false,
                None,
                None,
                &dout[rs.clone()],
                &x[rs.clone()],
                &w,
                &m,
                &s,
                1,
                c,
            );
            assert_eq!(d, dx[rs.clone()], "dx row {r}");
            for j in 0..c {
                let xhat = (x[r * c + j] - m[0]) * s[0];
                dw_s[j] += (dout[r * c + j] * xhat) as f64;
                db_s[j] += dout[r * c + j] as f64;
            }
        }
        assert_close("dweight", &dw, &dw_s, 1e-4);
        assert_close("dbias", &db, &db_s, 1e-4);
    }

    #[test]
    fn bf16_storage_matches_f32() {
        let mut rng = Rng::new(23);
        let (n, c) = (3, 64);
        let r = |v: Vec<f32>| v.into_iter().map(bf16::from_f32).collect::<Vec<_>>();
        let f = |v: &[bf16]| v.iter().map(|x| x.to_f32()).collect::<Vec<_>>();
        let (x, w, b, d) = (
            r(rng.vec(n * c, 1.0)),
            r(rng.vec(c, 1.0)),
            r(rng.vec(c, 1.0)),
            r(rng.vec(n * c, 1.0)),
        );
        let (mut out, mut mean, mut rstd) = (
            vec![bf16::from_f32(0.0); n * c],
            vec![0f32; n],
            vec![0f32; n],
        );
        layernorm_forward(&mut out, &mut mean, &mut rstd, &x, &w, &b, n, c, 1e-5);
        let want = naive(&f(&x), &f(&w), &f(&b), n, c, 1e-5);
        assert_close("bf16 out", &f(&out), &want, 1e-2);
        let mut dx = vec![bf16::from_f32(0.0); n * c];
        let mut dw = vec![0f32; c];
        layernorm_backward(
            &mut dx,
            false,
            Some(&mut dw),
            None,
            &d,
            &x,
            &w,
            &mean,
            &rstd,
            n,
            c,
        );
        let (mut out32, mut dx32, mut dw32) = (vec![0f32; n * c], vec![0f32; n * c], vec![0f32; c]);
        layernorm_forward(
            &mut out32,
            &mut mean,
            &mut rstd,
            &f(&x),
            &f(&w),
            &f(&b),
            n,
            c,
            1e-5,
        );
        layernorm_backward(
            &mut dx32,
            false,
            Some(&mut dw32),
            None,
            &f(&d),
            &f(&x),
            &f(&w),
            &mean,
            &rstd,
            n,
            c,
        );
        let f64s = |v: &[f32]| v.iter().map(|x| *x as f64).collect::<Vec<_>>();
        assert_close("bf16 dx", &f(&dx), &f64s(&dx32), 1e-2);
        assert_close("bf16 dweight (f32)", &dw, &f64s(&dw32), 1e-5);
    }
}
