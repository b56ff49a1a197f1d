//! Matrix multiply on the `gemm` crate, and the linear layer (forward and backward) built on it.
//!
//! `gemm` 0.19 has f32/f64/f16 kernels but no bf16 one, so any operand that is not f32 is
//! converted to f32 before the multiply: the left operand whole (it is the activation side in
//! every layer), the right operand (the weight side) one block of its stored rows at a time, so
//! a large weight is never duplicated whole. A non-f32 destination is staged in f32 and rounded
//! once. Accumulation is always f32. (f16 takes the same conversion path rather than gemm's own
//! f16 kernel, so every storage type shares one tested f32 path.)
//!
//! Exception: when both operands are bf16 and the CPU has AVX512_BF16, [`crate::bf16_gemm`]
//! multiplies them as stored with `vdpbf16ps` (still f32 accumulation), several times faster.

use std::any::TypeId;
use std::borrow::Cow;

use gemm::Parallelism;
use half::bf16;
use rayon::prelude::*;

use crate::bf16_gemm;
use crate::dtype::Float;
use crate::f32_gemm;

/// Below this many multiply-adds the rayon fork/join costs more than it saves.
const PARALLEL_MIN_MACS: usize = 1 << 18;
/// Elementwise loops (conversion, bias, column sums) go parallel above this many elements.
const PARALLEL_MIN_ELEMS: usize = 1 << 16;
/// Target size, in elements, of one converted right-operand panel.
const PANEL_ELEMS: usize = 1 << 20;

/// Views `s` as f32 when `T` is f32, so the common case does no conversion at all.
pub(crate) fn as_f32<T: Float>(s: &[T]) -> Option<&[f32]> {
    if TypeId::of::<T>() == TypeId::of::<f32>() {
        // SAFETY: T is f32, so the slice already is a &[f32].
        Some(unsafe { std::slice::from_raw_parts(s.as_ptr().cast::<f32>(), s.len()) })
    } else {
        None
    }
}

pub(crate) fn as_f32_mut<T: Float>(s: &mut [T]) -> Option<&mut [f32]> {
    if TypeId::of::<T>() == TypeId::of::<f32>() {
        // SAFETY: T is f32, so the slice already is a &mut [f32].
        Some(unsafe { std::slice::from_raw_parts_mut(s.as_mut_ptr().cast::<f32>(), s.len()) })
    } else {
        None
    }
}

/// `dst[i] = src[i]` converted through f32, in parallel when large.
pub(crate) fn convert_into<S: Float, D: Float>(dst: &mut [D], src: &[S]) {
    assert_eq!(dst.len(), src.len(), "convert_into: length mismatch");
    if dst.len() >= PARALLEL_MIN_ELEMS {
        dst.par_chunks_mut(PARALLEL_MIN_ELEMS / 4)
            .zip(src.par_chunks(PARALLEL_MIN_ELEMS / 4))
            .for_each(|(d, s)| {
                d.iter_mut()
                    .zip(s)
                    .for_each(|(d, s)| *d = D::from_f32(s.to_f32()))
            });
    } else {
        dst.iter_mut()
            .zip(src)
            .for_each(|(d, s)| *d = D::from_f32(s.to_f32()));
    }
}

/// Views `s` as bf16 when `T` is bf16, to reach the `vdpbf16ps` path without a copy.
pub(crate) fn as_bf16<T: Float>(s: &[T]) -> Option<&[bf16]> {
    if TypeId::of::<T>() == TypeId::of::<bf16>() {
        // SAFETY: T is bf16, so the slice already is a &[bf16].
        Some(unsafe { std::slice::from_raw_parts(s.as_ptr().cast::<bf16>(), s.len()) })
    } else {
        None
    }
}

fn to_f32_cow<T: Float>(s: &[T]) -> Cow<'_, [f32]> {
    match as_f32(s) {
        Some(s) => Cow::Borrowed(s),
        None => {
            let mut v = vec![0f32; s.len()];
            convert_into(&mut v, s);
            Cow::Owned(v)
        }
    }
}

fn parallelism(m: usize, n: usize, k: usize) -> Parallelism {
    let threads = rayon::current_num_threads();
    if threads > 1 && m.saturating_mul(n).saturating_mul(k) >= PARALLEL_MIN_MACS {
        Parallelism::Rayon(threads)
    } else {
        Parallelism::None
    }
}

/// A strided f32 matrix view: element (r, c) is at `ptr + r * rs + c * cs`.
#[derive(Clone, Copy)]
struct View {
    ptr: *const f32,
    rs: isize,
    cs: isize,
}

/// `dst[m, n] (+)= lhs[m, k] · rhs[k, n]` on strided f32 views.
///
/// # Safety
/// Every view must address valid memory for its shape, and `dst` must not overlap the operands.
unsafe fn gemm_f32(
    (m, k, n): (usize, usize, usize),
    dst: *mut f32,
    dst_rs: isize,
    read_dst: bool,
    lhs: View,
    rhs: View,
) {
    // gemm computes dst = alpha * dst + beta * lhs * rhs; with read_dst false it never reads dst.
    gemm::gemm(
        m,
        n,
        k,
        dst,
        1,
        dst_rs,
        read_dst,
        lhs.ptr,
        lhs.cs,
        lhs.rs,
        rhs.ptr,
        rhs.cs,
        rhs.rs,
        1.0f32,
        1.0f32,
        false,
        false,
        false,
        parallelism(m, n, k),
    );
}

/// `dst[m, n] = op(a)[m, k] · op(b)[k, n]`, or `+=` when `accumulate`.
///
/// `op(a)` is `a` stored row-major `[m, k]`, or with `trans_a` the transpose of `a` stored
/// `[k, m]`; likewise `op(b)` is `b` as `[k, n]` or, with `trans_b`, the transpose of `[n, k]`.
/// Operands and destination may each be f32, bf16 or f16; the products are summed in f32.
#[allow(clippy::too_many_arguments)]
pub fn matmul<A: Float, B: Float, D: Float>(
    dst: &mut [D],
    a: &[A],
    b: &[B],
    m: usize,
    k: usize,
    n: usize,
    trans_a: bool,
    trans_b: bool,
    accumulate: bool,
) {
    assert_eq!(
        dst.len(),
        m * n,
        "matmul: dst has {} elements, expected m*n = {m}*{n}",
        dst.len()
    );
    assert_eq!(
        a.len(),
        m * k,
        "matmul: a has {} elements, expected m*k = {m}*{k}",
        a.len()
    );
    assert_eq!(
        b.len(),
        k * n,
        "matmul: b has {} elements, expected k*n = {k}*{n}",
        b.len()
    );
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            dst.fill(D::from_f32(0.0));
        }
        return;
    }
    // Both operands bf16 on a CPU with `vdpbf16ps`: multiply them as stored, no f32 copies.
    if let (Some(a16), Some(b16)) = (as_bf16(a), as_bf16(b)) {
        if bf16_gemm::available() {
            bf16_gemm::matmul_bf16(dst, a16, b16, m, k, n, trans_a, trans_b, accumulate);
            return;
        }
    }
    // All f32 on a CPU with AVX-512: the full-width kernel (twice gemm's AVX2 FLOP rate here).
    if let (Some(a32), Some(b32), true) = (as_f32(a), as_f32(b), f32_gemm::available()) {
        if let Some(d32) = as_f32_mut(dst) {
            f32_gemm::matmul_f32(d32, a32, b32, m, k, n, trans_a, trans_b, accumulate);
            return;
        }
    }
    let a32 = to_f32_cow(a);
    let (m_i, k_i, n_i) = (m as isize, k as isize, n as isize);
    let lhs = View {
        ptr: a32.as_ptr(),
        rs: if trans_a { 1 } else { k_i },
        cs: if trans_a { m_i } else { 1 },
    };
    // The destination: f32 in place, or an f32 staging copy written back once at the end.
    let dst_is_f32 = TypeId::of::<D>() == TypeId::of::<f32>();
    let mut stage = Vec::new();
    if !dst_is_f32 {
        stage = vec![0f32; m * n];
        if accumulate {
            convert_into(&mut stage, dst);
        }
    }
    let d_ptr = match as_f32_mut(dst) {
        Some(d32) => d32.as_mut_ptr(),
        None => stage.as_mut_ptr(),
    };

    match as_f32(b) {
        Some(b32) => {
            let rhs = View {
                ptr: b32.as_ptr(),
                rs: if trans_b { 1 } else { n_i },
                cs: if trans_b { k_i } else { 1 },
            };
            // SAFETY: lengths were asserted against the shapes; d_ptr is dst or stage, [m, n].
            unsafe { gemm_f32((m, k, n), d_ptr, n_i, accumulate, lhs, rhs) };
        }
        // b is stored [n, k]: convert blocks of its rows, i.e. panels of output columns.
        None if trans_b => {
            let panel = (PANEL_ELEMS / k).clamp(16, n.max(16)).min(n);
            let mut b_buf = vec![0f32; panel * k];
            for j0 in (0..n).step_by(panel) {
                let w = panel.min(n - j0);
                convert_into(&mut b_buf[..w * k], &b[j0 * k..(j0 + w) * k]);
                let rhs = View {
                    ptr: b_buf.as_ptr(),
                    rs: 1,
                    cs: k_i,
                };
                // SAFETY: the [m, w] panel at column j0 with row stride n lies inside [m, n].
                unsafe { gemm_f32((m, k, w), d_ptr.add(j0), n_i, accumulate, lhs, rhs) };
            }
        }
        // b is stored [k, n]: convert blocks of its rows, i.e. slices of the reduction, summed
        // into the f32 destination one after another.
        None => {
            let panel = (PANEL_ELEMS / n).clamp(16, k.max(16)).min(k);
            let mut b_buf = vec![0f32; panel * n];
            for p0 in (0..k).step_by(panel) {
                let kc = panel.min(k - p0);
                convert_into(&mut b_buf[..kc * n], &b[p0 * n..(p0 + kc) * n]);
                let rhs = View {
                    ptr: b_buf.as_ptr(),
                    rs: n_i,
                    cs: 1,
                };
                // SAFETY: columns p0..p0+kc of op(a) lie inside a32.
                let lhs_part = View {
                    ptr: unsafe { lhs.ptr.offset(p0 as isize * lhs.cs) },
                    ..lhs
                };
                let read = accumulate || p0 > 0;
                // SAFETY: as above; the destination is the whole [m, n].
                unsafe { gemm_f32((m, kc, n), d_ptr, n_i, read, lhs_part, rhs) };
            }
        }
    }
    if !dst_is_f32 {
        convert_into(dst, &stage);
    }
}

/// How a linear layer's weight is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightLayout {
    /// `[out_features, in_features]`: `torch.nn.Linear` (LLaMA family, GPT-2's untied heads).
    OutIn,
    /// `[in_features, out_features]`: GPT-2's `Conv1D`.
    InOut,
}

/// The dimensions of one linear layer application: `rows` input rows (B*T) of `in_features`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinearShape {
    pub rows: usize,
    pub in_features: usize,
    pub out_features: usize,
    pub layout: WeightLayout,
}

impl LinearShape {
    fn check<T, W>(&self, what: &str, x: &[T], y_or_dy: &[T], weight: &[W]) {
        let LinearShape {
            rows,
            in_features: fi,
            out_features: fo,
            ..
        } = *self;
        assert_eq!(
            x.len(),
            rows * fi,
            "{what}: x has {} elements, expected rows*in = {rows}*{fi}",
            x.len()
        );
        assert_eq!(
            y_or_dy.len(),
            rows * fo,
            "{what}: output has {} elements, expected rows*out = {rows}*{fo}",
            y_or_dy.len()
        );
        assert_eq!(
            weight.len(),
            fi * fo,
            "{what}: weight has {} elements, expected in*out = {fi}*{fo}",
            weight.len()
        );
    }
}

/// `y[rows, out] = x[rows, in] · W^T + bias` (for `InOut` weights, `x · W + bias`).
pub fn linear_forward<T: Float>(
    y: &mut [T],
    x: &[T],
    weight: &[T],
    bias: Option<&[T]>,
    shape: LinearShape,
) {
    shape.check("linear_forward", x, y, weight);
    let LinearShape {
        rows,
        in_features,
        out_features,
        layout,
    } = shape;
    if let Some(bias) = bias {
        assert_eq!(
            bias.len(),
            out_features,
            "linear_forward: bias has {} elements, expected out = {out_features}",
            bias.len()
        );
        // Starting from the bias and accumulating the product rounds once, in f32.
        y.chunks_exact_mut(out_features)
            .for_each(|row| row.copy_from_slice(bias));
    }
    let trans_b = layout == WeightLayout::OutIn;
    matmul(
        y,
        x,
        weight,
        rows,
        in_features,
        out_features,
        false,
        trans_b,
        bias.is_some(),
    );
}

/// Backward of [`linear_forward`].
///
/// `dx = dy · W` (or `dy · W^T` for `InOut`), overwritten or, with `accumulate_dx`, added to
/// (for inputs that feed several branches). `dweight += dy^T x` and `dbias += Σ_rows dy`: parameter
/// gradients always accumulate, typically into f32 buffers while `T` is bf16.
/// Pass `None` for gradients that are not wanted (frozen weights, the first layer's input).
#[allow(clippy::too_many_arguments)]
pub fn linear_backward<T: Float, G: Float>(
    dx: Option<&mut [T]>,
    accumulate_dx: bool,
    dweight: Option<&mut [G]>,
    dbias: Option<&mut [G]>,
    dy: &[T],
    x: &[T],
    weight: &[T],
    shape: LinearShape,
) {
    shape.check("linear_backward", x, dy, weight);
    let LinearShape {
        rows,
        in_features: fi,
        out_features: fo,
        layout,
    } = shape;
    if let Some(dx) = dx {
        assert_eq!(
            dx.len(),
            rows * fi,
            "linear_backward: dx has {} elements, expected rows*in = {rows}*{fi}",
            dx.len()
        );
        // OutIn: W is [out, in] = op(b) as stored; InOut: W is [in, out], so transpose it.
        matmul(
            dx,
            dy,
            weight,
            rows,
            fo,
            fi,
            false,
            layout == WeightLayout::InOut,
            accumulate_dx,
        );
    }
    if let Some(dw) = dweight {
        assert_eq!(
            dw.len(),
            fi * fo,
            "linear_backward: dweight has {} elements, expected in*out = {fi}*{fo}",
            dw.len()
        );
        match layout {
            WeightLayout::OutIn => matmul(dw, dy, x, fo, rows, fi, true, false, true),
            WeightLayout::InOut => matmul(dw, x, dy, fi, rows, fo, true, false, true),
        }
    }
    if let Some(db) = dbias {
        assert_eq!(
            db.len(),
            fo,
            "linear_backward: dbias has {} elements, expected out = {fo}",
            db.len()
        );
        column_sums_accumulate(db, dy, rows, fo);
    }
}

/// `acc[j] += Σ_i m[i, j]` over a row-major `[rows, cols]` matrix, summed in f32 in row order
/// (the same result for any thread count).
pub fn column_sums_accumulate<T: Float, G: Float>(
    acc: &mut [G],
    m: &[T],
    rows: usize,
    cols: usize,
) {
    assert_eq!(
        acc.len(),
        cols,
        "column_sums_accumulate: acc has {} elements, expected {cols}",
        acc.len()
    );
    assert_eq!(
        m.len(),
        rows * cols,
        "column_sums_accumulate: matrix has {} elements, expected {rows}*{cols}",
        m.len()
    );
    const BLOCK: usize = 64;
    let sum_block = |j0: usize, out: &mut [G]| {
        let mut s = [0f32; BLOCK];
        let w = out.len();
        for row in m.chunks_exact(cols) {
            for (s, v) in s[..w].iter_mut().zip(&row[j0..j0 + w]) {
                *s += v.to_f32();
            }
        }
        for (o, s) in out.iter_mut().zip(&s[..w]) {
            *o = G::from_f32(o.to_f32() + s);
        }
    };
    if rows * cols >= PARALLEL_MIN_ELEMS {
        acc.par_chunks_mut(BLOCK)
            .enumerate()
            .for_each(|(b, out)| sum_block(b * BLOCK, out));
    } else {
        acc.chunks_mut(BLOCK)
            .enumerate()
            .for_each(|(b, out)| sum_block(b * BLOCK, out));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::*;
    use half::bf16;

    /// op(a) · op(b) in f64, element by element.
    fn naive(a: &[f32], b: &[f32], m: usize, k: usize, n: usize, ta: bool, tb: bool) -> Vec<f64> {
        let mut out = vec![0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                let mut s = 0f64;
                for p in 0..k {
                    let av = if ta { a[p * m + i] } else { a[i * k + p] };
                    let bv = if tb { b[j * k + p] } else { b[p * n + j] };
                    s += av as f64 * bv as f64;
                }
                out[i * n + j] = s;
            }
        }
        out
    }

    fn to_bf16(v: &[f32]) -> Vec<bf16> {
        v.iter().map(|&x| bf16::from_f32(x)).collect()
    }

    fn to_f32<T: Float>(v: &[T]) -> Vec<f32> {
        v.iter().map(|x| x.to_f32()).collect()
    }

    #[test]
    fn all_transposes_odd_sizes_match_naive() {
        let mut rng = Rng::new(1);
        for &(m, k, n) in &[
            (7, 13, 5),
            (1, 1, 1),
            (3, 1, 9),
            (33, 70, 65),
            (130, 90, 70),
        ] {
            for ta in [false, true] {
                for tb in [false, true] {
                    let a = rng.vec(m * k, 1.0);
                    let b = rng.vec(k * n, 1.0);
                    let want = naive(&a, &b, m, k, n, ta, tb);
                    // NaN garbage in dst must not leak through when not accumulating.
                    let mut dst = vec![f32::NAN; m * n];
                    matmul(&mut dst, &a, &b, m, k, n, ta, tb, false);
                    assert_close(&format!("{m}x{k}x{n} ta={ta} tb={tb}"), &dst, &want, 1e-5);
                    let init = rng.vec(m * n, 1.0);
                    let mut acc = init.clone();
                    matmul(&mut acc, &a, &b, m, k, n, ta, tb, true);
                    let want_acc: Vec<f64> =
                        want.iter().zip(&init).map(|(w, i)| w + *i as f64).collect();
                    assert_close("accumulate", &acc, &want_acc, 1e-5);
                }
            }
        }
    }

    #[test]
    fn bf16_operands_and_mixed_destinations() {
        let mut rng = Rng::new(2);
        // n large enough (with k) to need several converted panels.
        let (m, k, n) = (9, 600, 1800);
        for ta in [false, true] {
            for tb in [false, true] {
                let a = to_bf16(&rng.vec(m * k, 1.0));
                let b = to_bf16(&rng.vec(k * n, 1.0));
                let want = naive(&to_f32(&a), &to_f32(&b), m, k, n, ta, tb);
                // f32 destination from bf16 operands: only f32 summation error.
                let init = rng.vec(m * n, 1.0);
                let mut d32 = init.clone();
                matmul(&mut d32, &a, &b, m, k, n, ta, tb, true);
                let want_acc: Vec<f64> =
                    want.iter().zip(&init).map(|(w, i)| w + *i as f64).collect();
                assert_close("bf16 -> f32 accumulate", &d32, &want_acc, 1e-4);
                // bf16 destination: one final rounding, 2^-8 relative.
                let mut d16 = vec![bf16::from_f32(0.0); m * n];
                matmul(&mut d16, &a, &b, m, k, n, ta, tb, false);
                assert_close("bf16 -> bf16", &to_f32(&d16), &want, 8e-3);
                // Mixed: f32 left operand, bf16 right operand (the cross-entropy's dlogits · W).
                let a32 = to_f32(&a);
                let mut mixed = vec![0f32; m * n];
                matmul(&mut mixed, &a32, &b, m, k, n, ta, tb, false);
                assert_close("f32 x bf16", &mixed, &want, 1e-4);
            }
        }
    }

    #[test]
    fn f16_operands_match_f32_reference() {
        use half::f16;
        let mut rng = Rng::new(7);
        let (m, k, n) = (5, 31, 17);
        let a: Vec<f16> = rng.vec(m * k, 1.0).into_iter().map(f16::from_f32).collect();
        let b: Vec<f16> = rng.vec(k * n, 1.0).into_iter().map(f16::from_f32).collect();
        let want = naive(&to_f32(&a), &to_f32(&b), m, k, n, false, true);
        let mut d = vec![f16::from_f32(0.0); m * n];
        matmul(&mut d, &a, &b, m, k, n, false, true, false);
        // One f16 rounding of the result: 2^-11 relative, values up to ~5.
        assert_close("f16", &to_f32(&d), &want, 3e-3);
    }

    #[test]
    fn k_zero_clears_or_keeps() {
        let mut d = vec![3.0f32; 6];
        matmul(
            &mut d,
            &[] as &[f32],
            &[] as &[f32],
            2,
            0,
            3,
            false,
            false,
            true,
        );
        assert_eq!(d, vec![3.0; 6]);
        matmul(
            &mut d,
            &[] as &[f32],
            &[] as &[f32],
            2,
            0,
            3,
            false,
            false,
            false,
        );
        assert_eq!(d, vec![0.0; 6]);
    }

    fn shape(rows: usize, fi: usize, fo: usize, layout: WeightLayout) -> LinearShape {
        LinearShape {
            rows,
            in_features: fi,
            out_features: fo,
            layout,
        }
    }

    /// y = x W^T + b in f64, with W read according to its layout.
    fn naive_linear(x: &[f32], w: &[f32], b: &[f32], s: LinearShape) -> Vec<f64> {
        let mut y = vec![0f64; s.rows * s.out_features];
        for r in 0..s.rows {
            for o in 0..s.out_features {
                let mut acc = b[o] as f64;
                for i in 0..s.in_features {
                    let wv = match s.layout {
                        WeightLayout::OutIn => w[o * s.in_features + i],
                        WeightLayout::InOut => w[i * s.out_features + o],
                    };
                    acc += x[r * s.in_features + i] as f64 * wv as f64;
                }
                y[r * s.out_features + o] = acc;
            }
        }
        y
    }

    #[test]
    fn linear_forward_matches_naive_both_layouts() {
        let mut rng = Rng::new(3);
        for layout in [WeightLayout::OutIn, WeightLayout::InOut] {
            let s = shape(6, 11, 7, layout);
            let x = rng.vec(6 * 11, 1.0);
            let w = rng.vec(11 * 7, 1.0);
            let b = rng.vec(7, 1.0);
            let mut y = vec![0f32; 6 * 7];
            linear_forward(&mut y, &x, &w, Some(&b), s);
            assert_close("linear y", &y, &naive_linear(&x, &w, &b, s), 1e-5);
        }
    }

    #[test]
    fn linear_backward_matches_finite_differences() {
        let mut rng = Rng::new(4);
        for layout in [WeightLayout::OutIn, WeightLayout::InOut] {
            let s = shape(5, 6, 4, layout);
            let mut x = rng.vec(5 * 6, 1.0);
            let mut w = rng.vec(6 * 4, 1.0);
            let mut b = rng.vec(4, 1.0);
            let probe = rng.vec(5 * 4, 1.0);
            // Loss = Σ probe · y, so dy = probe.
            let loss = |x: &[f32], w: &[f32], b: &[f32]| -> f64 {
                naive_linear(x, w, b, s)
                    .iter()
                    .zip(&probe)
                    .map(|(y, p)| y * *p as f64)
                    .sum()
            };
            let mut dx = vec![0f32; 5 * 6];
            let dw_init = rng.vec(6 * 4, 1.0);
            let mut dw = dw_init.clone();
            let mut db = vec![0.5f32; 4];
            linear_backward(
                Some(&mut dx),
                false,
                Some(&mut dw),
                Some(&mut db),
                &probe,
                &x,
                &w,
                s,
            );
            let (wc, bc) = (w.clone(), b.clone());
            let ndx = numeric_grad(&mut x, 1e-2, |x| loss(x, &wc, &bc));
            let xc = x.clone();
            let ndw = numeric_grad(&mut w, 1e-2, |w| loss(&xc, w, &bc));
            let wc = w.clone();
            let ndb = numeric_grad(&mut b, 1e-2, |b| loss(&xc, &wc, b));
            assert_grad_close("dx", &dx, &ndx, 1e-3);
            let dw_delta: Vec<f32> = dw.iter().zip(&dw_init).map(|(a, b)| a - b).collect();
            assert_grad_close("dw (accumulated)", &dw_delta, &ndw, 1e-3);
            let db_delta: Vec<f32> = db.iter().map(|v| v - 0.5).collect();
            assert_grad_close("db (accumulated)", &db_delta, &ndb, 1e-3);
            // accumulate_dx adds onto what is there.
            let mut dx2 = vec![1.0f32; 5 * 6];
            linear_backward::<f32, f32>(Some(&mut dx2), true, None, None, &probe, &x, &w, s);
            let want: Vec<f64> = dx.iter().map(|v| *v as f64 + 1.0).collect();
            assert_close("dx accumulate", &dx2, &want, 1e-6);
        }
    }

    #[test]
    fn bf16_linear_matches_f32_within_bf16_tolerance() {
        let mut rng = Rng::new(5);
        for layout in [WeightLayout::OutIn, WeightLayout::InOut] {
            let s = shape(16, 40, 24, layout);
            let (x, w, b) = (
                to_bf16(&rng.vec(16 * 40, 1.0)),
                to_bf16(&rng.vec(40 * 24, 1.0)),
                to_bf16(&rng.vec(24, 1.0)),
            );
            let dy = to_bf16(&rng.vec(16 * 24, 1.0));
            let (xf, wf, bf, dyf) = (to_f32(&x), to_f32(&w), to_f32(&b), to_f32(&dy));
            let mut y = vec![bf16::from_f32(0.0); 16 * 24];
            linear_forward(&mut y, &x, &w, Some(&b), s);
            let mut yf = vec![0f32; 16 * 24];
            linear_forward(&mut yf, &xf, &wf, Some(&bf), s);
            assert_close(
                "bf16 y",
                &to_f32(&y),
                &yf.iter().map(|v| *v as f64).collect::<Vec<_>>(),
                1e-2,
            );
            let mut dx = vec![bf16::from_f32(0.0); 16 * 40];
            let mut dw = vec![0f32; 40 * 24];
            let mut db = vec![0f32; 24];
            linear_backward(
                Some(&mut dx),
                false,
                Some(&mut dw),
                Some(&mut db),
                &dy,
                &x,
                &w,
                s,
            );
            let mut dxf = vec![0f32; 16 * 40];
            let mut dwf = vec![0f32; 40 * 24];
            let mut dbf = vec![0f32; 24];
            linear_backward(
                Some(&mut dxf),
                false,
                Some(&mut dwf),
                Some(&mut dbf),
                &dyf,
                &xf,
                &wf,
                s,
            );
            let f64s = |v: &[f32]| v.iter().map(|x| *x as f64).collect::<Vec<_>>();
            assert_close("bf16 dx", &to_f32(&dx), &f64s(&dxf), 1e-2);
            // f32 gradient buffers from bf16 inputs lose nothing but summation order.
            assert_close("bf16 dw (f32 grads)", &dw, &f64s(&dwf), 1e-5);
            assert_close("bf16 db (f32 grads)", &db, &f64s(&dbf), 1e-5);
        }
    }

    #[test]
    fn column_sums_are_exact_for_large_inputs() {
        let (rows, cols) = (300, 301);
        let m: Vec<f32> = (0..rows * cols).map(|i| (i % 7) as f32).collect();
        let mut acc = vec![1.0f32; cols];
        column_sums_accumulate(&mut acc, &m, rows, cols);
        for (j, a) in acc.iter().enumerate() {
            let want: f32 = 1.0 + (0..rows).map(|i| ((i * cols + j) % 7) as f32).sum::<f32>();
            assert_eq!(*a, want, "column {j}");
        }
    }

    /// Times a GPT-2 MLP-sized linear (rows 512, 768 -> 3072) forward + backward.
    /// `cargo test -p rustspeed-kernels --release -- --ignored linear_throughput --nocapture`
    #[test]
    #[ignore]
    fn linear_throughput() {
        fn run<T: Float>(name: &str) {
            let mut rng = Rng::new(6);
            let s = shape(512, 768, 3072, WeightLayout::InOut);
            let conv = |v: Vec<f32>| v.into_iter().map(T::from_f32).collect::<Vec<T>>();
            let x = conv(rng.vec(512 * 768, 1.0));
            let w = conv(rng.vec(768 * 3072, 0.02));
            let b = conv(rng.vec(3072, 0.02));
            let dy = conv(rng.vec(512 * 3072, 1.0));
            let mut y = vec![T::from_f32(0.0); 512 * 3072];
            let mut dx = vec![T::from_f32(0.0); 512 * 768];
            let mut dw = vec![0f32; 768 * 3072];
            let mut db = vec![0f32; 3072];
            let flops = 3.0 * 2.0 * 512.0 * 768.0 * 3072.0;
            for iter in 0..6 {
                let t0 = std::time::Instant::now();
                linear_forward(&mut y, &x, &w, Some(&b), s);
                let t1 = std::time::Instant::now();
                linear_backward(
                    Some(&mut dx),
                    false,
                    Some(&mut dw),
                    Some(&mut db),
                    &dy,
                    &x,
                    &w,
                    s,
                );
                let t2 = std::time::Instant::now();
                if iter > 0 {
                    let (f, bk) = ((t1 - t0).as_secs_f64(), (t2 - t1).as_secs_f64());
                    println!(
                        "{name}: fwd {:.2} ms, bwd {:.2} ms, {:.1} GFLOP/s",
                        f * 1e3,
                        bk * 1e3,
                        flops / (f + bk) / 1e9
                    );
                }
            }
        }
        run::<f32>("f32");
        run::<bf16>("bf16");
    }
}
