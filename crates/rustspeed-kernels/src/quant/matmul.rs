//! The linear layer over a quantized weight: `y = x W^T + b` forward and `dx = dy W` backward
//! (the weight is frozen, so there is no `dW`). The weight is never dequantized whole: each
//! call walks it in tiles of 64-256 rows (forward) or columns (backward) of `W` (at most 2M
//! elements), dequantizes a tile into one small buffer (in parallel) and hands it to the
//! ordinary gemm path ([`crate::matmul::matmul`], itself parallel), which sees a plain
//! `[rows, in] x [in, tile]` product.
//!
//! The tile's element type is the compute type: bf16 when the activations are bf16 and the
//! CPU has AVX512_BF16 (the `vdpbf16ps` kernel multiplies them as stored), f32 otherwise
//! (activations converted once per call). Dequantized values are `T::from_f32(code * absmax)`,
//! so with `T` = bf16 this is bitsandbytes' "dequantize to the compute dtype, then matmul".
//! Products are summed in f32 and each output is rounded to `T` once.

use std::borrow::Cow;
use std::ops::Range;

use half::{bf16, f16};
use rayon::prelude::*;

use super::QuantMatrix;
use crate::bf16_gemm;
use crate::dtype::{DType, Float};
use crate::matmul::{as_bf16, as_f32, convert_into, matmul};

/// Upper bound on one dequantized tile, in elements (4 MiB in bf16). Big enough that TinyLlama's
/// widest reduction (5632) still gets 256-row tiles: narrower ones left the bf16 kernel with
/// too few column panels to share between threads (0.6x of the dense layer at 64 rows).
const TILE_ELEMS: usize = 1 << 21;
/// Tiles are a multiple of the bf16 kernel's 64-column register tile, and no wider than 256.
const TILE_ALIGN: usize = 64;
const TILE_MAX: usize = 256;
/// Elements of a tile dequantized per rayon task.
const DEQUANT_TASK_ELEMS: usize = 1 << 15;
/// Output rows per rayon task when copying a tile's product into place.
const SCATTER_MIN_ROWS: usize = 32;

/// Tile width (rows of `W` forward, columns backward) when the other dimension is `k`.
fn tile_width(k: usize, total: usize) -> usize {
    let w = (TILE_ELEMS / k.max(1)).clamp(TILE_ALIGN, TILE_MAX) / TILE_ALIGN * TILE_ALIGN;
    w.min(total)
}

/// The activation operand in the compute type: bf16 as stored (fast path) or f32.
enum Lhs<'a> {
    Bf16(&'a [bf16]),
    F32(Cow<'a, [f32]>),
}

fn lhs<T: Float>(a: &[T]) -> Lhs<'_> {
    if let Some(a16) = as_bf16(a) {
        if bf16_gemm::available() {
            return Lhs::Bf16(a16);
        }
    }
    match as_f32(a) {
        Some(a32) => Lhs::F32(Cow::Borrowed(a32)),
        None => {
            let mut v = vec![0f32; a.len()];
            convert_into(&mut v, a);
            Lhs::F32(Cow::Owned(v))
        }
    }
}

/// `y[rows, out] (+)= x[rows, in] · W^T (+ bias)`, `W` dequantized a tile of rows at a time.
/// With `accumulate` the product (and bias) is added to `y`'s values; the sum is formed in f32
/// and rounded once.
pub fn quant_linear_forward<T: Float>(
    y: &mut [T],
    x: &[T],
    w: &QuantMatrix,
    bias: Option<&[T]>,
    rows: usize,
    accumulate: bool,
) {
    let (fi, fo) = (w.in_features, w.out_features);
    assert_eq!(
        x.len(),
        rows * fi,
        "quant_linear_forward: x has {} elements, expected rows*in = {rows}*{fi}",
        x.len()
    );
    assert_eq!(
        y.len(),
        rows * fo,
        "quant_linear_forward: y has {} elements, expected rows*out = {rows}*{fo}",
        y.len()
    );
    if let Some(b) = bias {
        assert_eq!(
            b.len(),
            fo,
            "quant_linear_forward: bias has {} elements, expected out = {fo}",
            b.len()
        );
    }
    if rows == 0 || fo == 0 {
        return;
    }
    if let Some(c) = w.config().compute_dtype.filter(|&c| c != T::DTYPE) {
        match c {
            DType::F32 => forward_via::<f32, T>(y, x, w, bias, rows, accumulate),
            DType::BF16 => forward_via::<bf16, T>(y, x, w, bias, rows, accumulate),
            DType::F16 => forward_via::<f16, T>(y, x, w, bias, rows, accumulate),
        }
        return;
    }
    match lhs(x) {
        Lhs::Bf16(x) => forward_tiles::<bf16, T>(y, x, w, bias, rows, accumulate),
        Lhs::F32(x) => forward_tiles::<f32, T>(y, &x, w, bias, rows, accumulate),
    }
}

fn forward_tiles<C: Float, T: Float>(
    y: &mut [T],
    x: &[C],
    w: &QuantMatrix,
    bias: Option<&[T]>,
    rows: usize,
    accumulate: bool,
) {
    let (fi, fo) = (w.in_features, w.out_features);
    let tw = tile_width(fi, fo);
    let mut tile = vec![C::default(); tw * fi];
    let mut part = vec![0f32; rows * tw];
    for j0 in (0..fo).step_by(tw) {
        let n = tw.min(fo - j0);
        let tile = &mut tile[..n * fi];
        w.dequantize_rows(j0..j0 + n, tile);
        let part = &mut part[..rows * n];
        matmul(part, x, tile, rows, fi, n, false, true, false);
        scatter(
            y,
            fo,
            j0..j0 + n,
            part,
            bias.map(|b| &b[j0..j0 + n]),
            accumulate,
        );
    }
}

/// `dx[rows, in] (+)= dy[rows, out] · W`, `W` dequantized a tile of columns at a time.
pub fn quant_linear_backward_input<T: Float>(
    dx: &mut [T],
    dy: &[T],
    w: &QuantMatrix,
    rows: usize,
    accumulate: bool,
) {
    let (fi, fo) = (w.in_features, w.out_features);
    assert_eq!(
        dy.len(),
        rows * fo,
        "quant_linear_backward_input: dy has {} elements, expected rows*out = {rows}*{fo}",
        dy.len()
    );
    assert_eq!(
        dx.len(),
        rows * fi,
        "quant_linear_backward_input: dx has {} elements, expected rows*in = {rows}*{fi}",
        dx.len()
    );
    if rows == 0 || fi == 0 {
        return;
    }
    if fo == 0 {
        if !accumulate {
            dx.fill(T::from_f32(0.0));
        }
        return;
    }
    if let Some(c) = w.config().compute_dtype.filter(|&c| c != T::DTYPE) {
        match c {
            DType::F32 => backward_via::<f32, T>(dx, dy, w, rows, accumulate),
            DType::BF16 => backward_via::<bf16, T>(dx, dy, w, rows, accumulate),
            DType::F16 => backward_via::<f16, T>(dx, dy, w, rows, accumulate),
        }
        return;
    }
    match lhs(dy) {
        Lhs::Bf16(dy) => backward_tiles::<bf16, T>(dx, dy, w, rows, accumulate),
        Lhs::F32(dy) => backward_tiles::<f32, T>(dx, &dy, w, rows, accumulate),
    }
}

/// `v` cast element by element to `C`.
fn cast<S: Float, C: Float>(v: &[S]) -> Vec<C> {
    let mut out = vec![C::default(); v.len()];
    convert_into(&mut out, v);
    out
}

/// `dst (+)= src` cast back from the compute dtype, summed in f32 and rounded once.
fn cast_back<C: Float, T: Float>(dst: &mut [T], src: &[C], accumulate: bool) {
    dst.par_chunks_mut(DEQUANT_TASK_ELEMS)
        .zip(src.par_chunks(DEQUANT_TASK_ELEMS))
        .for_each(|(d, s)| {
            for (d, s) in d.iter_mut().zip(s) {
                let v = s.to_f32();
                *d = T::from_f32(if accumulate { d.to_f32() + v } else { v });
            }
        });
}

/// The forward with a compute dtype `C` other than the activations' `T` (bitsandbytes'
/// `Linear4bit.forward`: input and bias cast to `C`, the product rounded to `C`, then cast back).
/// For `C` = f16 the tiles are dequantized in f32 (no f16 kernel): only inputs and the output
/// are rounded to f16.
fn forward_via<C: Float, T: Float>(
    y: &mut [T],
    x: &[T],
    w: &QuantMatrix,
    bias: Option<&[T]>,
    rows: usize,
    accumulate: bool,
) {
    let xc: Vec<C> = cast(x);
    let bc: Option<Vec<C>> = bias.map(cast);
    let mut yc = vec![C::default(); y.len()];
    match lhs(&xc) {
        Lhs::Bf16(x) => forward_tiles::<bf16, C>(&mut yc, x, w, bc.as_deref(), rows, false),
        Lhs::F32(x) => forward_tiles::<f32, C>(&mut yc, &x, w, bc.as_deref(), rows, false),
    }
    cast_back(y, &yc, accumulate);
}

/// The input gradient in compute dtype `C` (see [`forward_via`]).
fn backward_via<C: Float, T: Float>(
    dx: &mut [T],
    dy: &[T],
    w: &QuantMatrix,
    rows: usize,
    accumulate: bool,
) {
    let dyc: Vec<C> = cast(dy);
    let mut dxc = vec![C::default(); dx.len()];
    match lhs(&dyc) {
        Lhs::Bf16(dy) => backward_tiles::<bf16, C>(&mut dxc, dy, w, rows, false),
        Lhs::F32(dy) => backward_tiles::<f32, C>(&mut dxc, &dy, w, rows, false),
    }
    cast_back(dx, &dxc, accumulate);
}

fn backward_tiles<C: Float, T: Float>(
    dx: &mut [T],
    dy: &[C],
    w: &QuantMatrix,
    rows: usize,
    accumulate: bool,
) {
    let (fi, fo) = (w.in_features, w.out_features);
    let tw = tile_width(fo, fi);
    let mut tile = vec![C::default(); fo * tw];
    let mut part = vec![0f32; rows * tw];
    for c0 in (0..fi).step_by(tw) {
        let n = tw.min(fi - c0);
        let tile = &mut tile[..fo * n];
        // W[:, c0..c0+n] as a row-major [out, n] block, rows of W split across tasks.
        let task_rows = (DEQUANT_TASK_ELEMS / n).max(1);
        tile.par_chunks_mut(task_rows * n)
            .enumerate()
            .for_each(|(t, block)| {
                let r0 = t * task_rows;
                w.dequantize_block(r0..r0 + block.len() / n, c0..c0 + n, block);
            });
        let part = &mut part[..rows * n];
        matmul(part, dy, tile, rows, fo, n, false, false, false);
        scatter(dx, fi, c0..c0 + n, part, None, accumulate);
    }
}

/// `dst[:, cols] = T(part (+ bias) (+ dst))` for a row-major `dst` of `width` columns and the
/// `[rows, cols.len()]` f32 product `part`.
fn scatter<T: Float>(
    dst: &mut [T],
    width: usize,
    cols: Range<usize>,
    part: &[f32],
    bias: Option<&[T]>,
    accumulate: bool,
) {
    let n = cols.len();
    dst.par_chunks_mut(width)
        .zip(part.par_chunks(n))
        .with_min_len(SCATTER_MIN_ROWS)
        .for_each(|(d, p)| {
            for (c, (d, &p)) in d[cols.clone()].iter_mut().zip(p).enumerate() {
                let mut v = p;
                if let Some(b) = bias {
                    v += b[c].to_f32();
                }
                if accumulate {
                    v += d.to_f32();
                }
                *d = T::from_f32(v);
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::matmul::{linear_forward, LinearShape, WeightLayout};
    use crate::quant::QuantConfig;
    use crate::testing::*;

    fn configs() -> Vec<QuantConfig> {
        vec![
            QuantConfig::nf4(false),
            QuantConfig::nf4(true),
            QuantConfig::fp4(true),
            QuantConfig::int8(),
        ]
    }

    /// Odd shapes: in/out not multiples of the block or the tile; several tiles each way.
    const SHAPES: [(usize, usize, usize); 5] = [
        (1, 7, 5),
        (3, 70, 33),
        (17, 130, 300),
        (5, 2100, 67),
        (9, 67, 2100),
    ];

    /// `x W^T + b` in f64 from the dequantized weight (the inputs as stored in `T`).
    fn reference<T: Float>(x: &[T], wd: &[T], bias: Option<&[T]>, r: usize, fi: usize) -> Vec<f64> {
        let fo = wd.len() / fi;
        let mut y = vec![0f64; r * fo];
        for i in 0..r {
            for j in 0..fo {
                let mut s = bias.map_or(0.0, |b| b[j].to_f32() as f64);
                for k in 0..fi {
                    s += x[i * fi + k].to_f32() as f64 * wd[j * fi + k].to_f32() as f64;
                }
                y[i * fo + j] = s;
            }
        }
        y
    }

    fn check_forward<T: Float>(tol: f64) {
        let mut rng = Rng::new(21);
        for &(rows, fi, fo) in &SHAPES {
            let wf = rng.vec(fo * fi, 0.1);
            let x: Vec<T> = rng
                .vec(rows * fi, 1.0)
                .into_iter()
                .map(T::from_f32)
                .collect();
            let bias: Vec<T> = rng.vec(fo, 0.5).into_iter().map(T::from_f32).collect();
            for cfg in configs() {
                let q = QuantMatrix::quantize(&wf, fo, fi, &cfg);
                let mut wd = vec![T::default(); fo * fi];
                q.dequantize_into(&mut wd);
                let what = format!("{} {cfg:?} {rows}x{fi}->{fo}", T::DTYPE);
                let want = reference(&x, &wd, Some(&bias), rows, fi);
                // NaN garbage must be overwritten when not accumulating.
                let mut y = vec![T::from_f32(f32::NAN); rows * fo];
                quant_linear_forward(&mut y, &x, &q, Some(&bias), rows, false);
                let y32: Vec<f32> = y.iter().map(|v| v.to_f32()).collect();
                assert_close(&what, &y32, &want, tol);
                // Against the dense linear layer on the dequantized weight: same products,
                // same f32 sums, so equal up to the gemm's summation order.
                let mut dense = vec![T::default(); rows * fo];
                let shape = LinearShape {
                    rows,
                    in_features: fi,
                    out_features: fo,
                    layout: WeightLayout::OutIn,
                };
                linear_forward(&mut dense, &x, &wd, Some(&bias), shape);
                let d64: Vec<f64> = dense.iter().map(|v| v.to_f32() as f64).collect();
                assert_close(&format!("{what} vs linear_forward"), &y32, &d64, tol);
                // Accumulate adds to what is there, without bias.
                let init: Vec<T> = rng
                    .vec(rows * fo, 2.0)
                    .into_iter()
                    .map(T::from_f32)
                    .collect();
                let mut acc = init.clone();
                quant_linear_forward(&mut acc, &x, &q, None, rows, true);
                let nob = reference(&x, &wd, None, rows, fi);
                let want_acc: Vec<f64> = nob
                    .iter()
                    .zip(&init)
                    .map(|(a, b)| a + b.to_f32() as f64)
                    .collect();
                let acc32: Vec<f32> = acc.iter().map(|v| v.to_f32()).collect();
                assert_close(&format!("{what} accumulate"), &acc32, &want_acc, tol);
            }
        }
    }

    #[test]
    fn forward_matches_dequantize_then_matmul_f32() {
        check_forward::<f32>(2e-5);
    }

    #[test]
    fn forward_matches_dequantize_then_matmul_bf16() {
        // One bf16 rounding of outputs up to ~10 in magnitude.
        check_forward::<bf16>(1e-2);
    }

    fn check_backward<T: Float>(tol: f64) {
        let mut rng = Rng::new(22);
        for &(rows, fi, fo) in &SHAPES {
            let wf = rng.vec(fo * fi, 0.1);
            let dy: Vec<T> = rng
                .vec(rows * fo, 1.0)
                .into_iter()
                .map(T::from_f32)
                .collect();
            for cfg in configs() {
                let q = QuantMatrix::quantize(&wf, fo, fi, &cfg);
                let mut wd = vec![T::default(); fo * fi];
                q.dequantize_into(&mut wd);
                let what = format!("{} {cfg:?} {rows}x{fi}->{fo}", T::DTYPE);
                let mut want = vec![0f64; rows * fi];
                for i in 0..rows {
                    for j in 0..fo {
                        let g = dy[i * fo + j].to_f32() as f64;
                        for k in 0..fi {
                            want[i * fi + k] += g * wd[j * fi + k].to_f32() as f64;
                        }
                    }
                }
                let mut dx = vec![T::from_f32(f32::NAN); rows * fi];
                quant_linear_backward_input(&mut dx, &dy, &q, rows, false);
                let dx32: Vec<f32> = dx.iter().map(|v| v.to_f32()).collect();
                assert_close(&what, &dx32, &want, tol);
                let init: Vec<T> = rng
                    .vec(rows * fi, 2.0)
                    .into_iter()
                    .map(T::from_f32)
                    .collect();
                let mut acc = init.clone();
                quant_linear_backward_input(&mut acc, &dy, &q, rows, true);
                let want_acc: Vec<f64> = want
                    .iter()
                    .zip(&init)
                    .map(|(a, b)| a + b.to_f32() as f64)
                    .collect();
                let acc32: Vec<f32> = acc.iter().map(|v| v.to_f32()).collect();
                assert_close(&format!("{what} accumulate"), &acc32, &want_acc, tol);
            }
        }
    }

    #[test]
    fn backward_input_matches_dequantize_then_matmul_f32() {
        check_backward::<f32>(2e-5);
    }

    #[test]
    fn backward_input_matches_dequantize_then_matmul_bf16() {
        check_backward::<bf16>(1e-2);
    }

    /// dL/dx of L = Σ g ⊙ (x W^T + b) by central differences through the forward kernel.
    #[test]
    fn backward_input_is_the_gradient_of_forward() {
        let mut rng = Rng::new(23);
        let (rows, fi, fo) = (3, 70, 45);
        let wf = rng.vec(fo * fi, 0.2);
        let bias = rng.vec(fo, 0.5);
        let g = rng.vec(rows * fo, 1.0);
        for cfg in configs() {
            let q = QuantMatrix::quantize(&wf, fo, fi, &cfg);
            let mut x = rng.vec(rows * fi, 1.0);
            let numeric = numeric_grad(&mut x, 1e-2, |x| {
                let mut y = vec![0f32; rows * fo];
                quant_linear_forward(&mut y, x, &q, Some(&bias), rows, false);
                y.iter().zip(&g).map(|(a, b)| *a as f64 * *b as f64).sum()
            });
            let mut dx = vec![0f32; rows * fi];
            quant_linear_backward_input(&mut dx, &g, &q, rows, false);
            assert_grad_close(&format!("{cfg:?}"), &dx, &numeric, 1e-3);
        }
    }

    /// bitsandbytes' compute_dtype bf16 under f32 activations: the input and bias rounded to
    /// bf16, the weight dequantized to bf16, the product summed in f32 and rounded to bf16, then
    /// returned as f32 (and added when accumulating); the input gradient likewise.
    #[test]
    fn compute_dtype_casts_in_and_out_like_linear4bit() {
        let mut rng = Rng::new(23);
        let (rows, fi, fo) = (5, 70, 33);
        let r16 = |v: f32| bf16::from_f32(v).to_f32();
        let wf = rng.vec(fo * fi, 0.1);
        let x = rng.vec(rows * fi, 1.0);
        let bias = rng.vec(fo, 0.5);
        let cfg = QuantConfig::nf4(true).with_compute_dtype(Some(DType::BF16));
        let q = QuantMatrix::quantize(&wf, fo, fi, &cfg);
        let mut wd = vec![bf16::default(); fo * fi];
        q.dequantize_into(&mut wd);
        let mut want = vec![0f64; rows * fo];
        for r in 0..rows {
            for o in 0..fo {
                let dot: f64 = (0..fi)
                    .map(|i| r16(x[r * fi + i]) as f64 * wd[o * fi + i].to_f32() as f64)
                    .sum();
                want[r * fo + o] = r16((dot + r16(bias[o]) as f64) as f32) as f64;
            }
        }
        let mut y = vec![f32::NAN; rows * fo];
        quant_linear_forward(&mut y, &x, &q, Some(&bias), rows, false);
        assert_close("bf16 compute forward", &y, &want, 8e-3);
        // Computing in f32 instead gives different values: the cast really happened.
        let plain = QuantMatrix::quantize(&wf, fo, fi, &QuantConfig::nf4(true));
        let mut y32 = vec![0f32; rows * fo];
        quant_linear_forward(&mut y32, &x, &plain, Some(&bias), rows, false);
        assert!(y.iter().zip(&y32).any(|(a, b)| a != b));
        assert!(y.iter().all(|v| *v == r16(*v)), "outputs are bf16 values");
        // Accumulate adds the bf16-rounded product to the f32 destination.
        let mut acc = vec![1.5f32; rows * fo];
        quant_linear_forward(&mut acc, &x, &q, Some(&bias), rows, true);
        for (a, v) in acc.iter().zip(&y) {
            assert_eq!(*a, 1.5 + v);
        }
        // Input gradient: dy rounded to bf16, dx = dy W in bf16.
        let dy = rng.vec(rows * fo, 1.0);
        let mut want_dx = vec![0f64; rows * fi];
        for r in 0..rows {
            for i in 0..fi {
                let dot: f64 = (0..fo)
                    .map(|o| r16(dy[r * fo + o]) as f64 * wd[o * fi + i].to_f32() as f64)
                    .sum();
                want_dx[r * fi + i] = r16(dot as f32) as f64;
            }
        }
        let mut dx = vec![f32::NAN; rows * fi];
        quant_linear_backward_input(&mut dx, &dy, &q, rows, false);
        assert_close("bf16 compute backward", &dx, &want_dx, 8e-3);
        assert!(
            dx.iter().all(|v| *v == r16(*v)),
            "input gradients are bf16 values"
        );
    }

    #[test]
    fn empty_shapes() {
        let q = QuantMatrix::quantize(&[0f32; 0], 0, 5, &QuantConfig::nf4(false));
        let mut y: Vec<f32> = vec![];
        quant_linear_forward(&mut y, &[1.0; 10], &q, None, 2, false);
        let mut dx = vec![3.0f32; 10];
        quant_linear_backward_input(&mut dx, &[], &q, 2, true);
        assert_eq!(dx, vec![3.0; 10]);
        quant_linear_backward_input(&mut dx, &[], &q, 2, false);
        assert_eq!(dx, vec![0.0; 10]);
        let q = QuantMatrix::quantize(&[0f32; 0], 4, 0, &QuantConfig::int8());
        let mut y = vec![f32::NAN; 8];
        quant_linear_forward(&mut y, &[], &q, Some(&[1.0, 2.0, 3.0, 4.0]), 2, false);
        assert_eq!(y, vec![1.0, 2.0, 3.0, 4.0, 1.0, 2.0, 3.0, 4.0]);
    }
}
