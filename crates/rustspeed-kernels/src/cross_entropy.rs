//! Softmax + cross-entropy over the vocabulary, fused with the LM head.
//!
//! The fused kernel never holds the logits of all positions: it walks the rows in chunks, and
//! for each chunk computes the logits `h_chunk · W^T`, the loss, the logits' gradient
//! `(softmax - onehot) * grad_scale` in the same buffer, then immediately `dh_chunk = dlogits · W`
//! and `dW += dlogits^T · h_chunk`. Memory is O(chunk_rows * vocab), not O(rows * vocab).
//!
//! Labels are already aligned with rows (for causal LM the caller shifts them: row t's label is
//! token t+1), and rows labelled [`IGNORE_INDEX`] contribute neither loss nor gradient.

use rayon::prelude::*;

use crate::activation::{exp_fast, has_avx2_fma};
use crate::bf16_gemm;
use crate::dtype::Float;
use crate::matmul::{as_bf16, convert_into, matmul};
use half::bf16;

/// PyTorch's default `ignore_index`, which HF uses for padding and prompt positions.
pub const IGNORE_INDEX: i64 = -100;

/// Rows go parallel above this many logits.
const PARALLEL_MIN_ELEMS: usize = 1 << 14;
/// Logits held at once by the fused kernel (f32 elements; 128 MiB). Every chunk re-reads and
/// re-packs the whole head weight in each of its three matmuls (154 MB for GPT-2 in f32), so
/// one chunk for a B=4, T=128 batch instead of four took 0.44 to 0.39 s off the 23M model's step;
/// PyTorch holds all the logits and their gradient (2 x 103 MB there).
const CHUNK_ELEMS: usize = 1 << 25;

/// A label type: HF passes `int64`, token buffers are often `i32`.
pub trait Label: Copy + Send + Sync {
    fn as_i64(self) -> i64;
}

impl Label for i32 {
    fn as_i64(self) -> i64 {
        self as i64
    }
}

impl Label for i64 {
    fn as_i64(self) -> i64 {
        self
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CrossEntropyError {
    #[error(
        "label {label} at row {row} is out of range: expected 0..{vocab} or the ignore index -100"
    )]
    LabelOutOfRange {
        row: usize,
        label: i64,
        vocab: usize,
    },
    #[error("row {row} requested for logits, but there are only {rows} rows")]
    RowOutOfRange { row: usize, rows: usize },
}

/// Summed negative log-likelihood and how many rows it counts (rows not ignored).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct CrossEntropyStats {
    pub nll_sum: f64,
    pub count: usize,
}

impl CrossEntropyStats {
    /// The mean loss, as `CrossEntropyLoss(reduction='mean')`: NaN when every row is ignored.
    pub fn mean(&self) -> f64 {
        self.nll_sum / self.count as f64
    }
}

fn check_labels<L: Label>(labels: &[L], v: usize) -> Result<usize, CrossEntropyError> {
    let mut count = 0;
    for (row, l) in labels.iter().enumerate() {
        let label = l.as_i64();
        if label == IGNORE_INDEX {
            continue;
        }
        if label < 0 || label as u64 >= v as u64 {
            return Err(CrossEntropyError::LabelOutOfRange {
                row,
                label,
                vocab: v,
            });
        }
        count += 1;
    }
    Ok(count)
}

/// One row of f32 logits: returns its NLL (0 when ignored) and, with `grad_scale`, overwrites the
/// row with `(softmax - onehot) * grad_scale` (zeros when ignored).
fn row_loss<L: Label>(row: &mut [f32], label: L, grad_scale: Option<f32>) -> f64 {
    let label = label.as_i64();
    if label == IGNORE_INDEX {
        if grad_scale.is_some() {
            row.fill(0.0);
        }
        return 0.0;
    }
    let t = label as usize;
    #[cfg(target_arch = "x86_64")]
    if crate::f32_gemm::available() {
        // SAFETY: the running CPU has AVX-512F (checked just above).
        return unsafe { row_loss_avx512(row, t, grad_scale) };
    }
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        // SAFETY: the running CPU has AVX2 and FMA (checked just above).
        return unsafe { row_loss_avx2(row, t, grad_scale) };
    }
    row_loss_body(row, t, grad_scale)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn row_loss_avx2(row: &mut [f32], t: usize, grad_scale: Option<f32>) -> f64 {
    row_loss_body(row, t, grad_scale)
}

/// The same body at full width: the 16 lanes become one zmm register (the rows are the LM
/// head's 50k logits; half the exp throughput was left on Zen 5's 512-bit units).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,fma")]
unsafe fn row_loss_avx512(row: &mut [f32], t: usize, grad_scale: Option<f32>) -> f64 {
    row_loss_body(row, t, grad_scale)
}

/// Lanes of the max and sum accumulators: two AVX2 registers, so the loops below vectorise
/// (a single running max or f32 sum is a serial dependency chain LLVM will not reorder).
const LANES: usize = 16;

/// The row's softmax pieces with `exp_fast` (libm's `expf` is a call per element: it was a
/// quarter of the 23M model's non-matmul time). The lane-wise sums only reassociate the f32 sum.
#[inline(always)]
fn row_loss_body(row: &mut [f32], t: usize, grad_scale: Option<f32>) -> f64 {
    let split = row.len() / LANES * LANES;
    let mut lanes = [f32::NEG_INFINITY; LANES];
    for c in row[..split].chunks_exact(LANES) {
        for (m, &v) in lanes.iter_mut().zip(c) {
            *m = if v > *m { v } else { *m };
        }
    }
    let max = lanes
        .iter()
        .chain(&row[split..])
        .fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    let target = row[t];
    let mut acc = [0f32; LANES];
    let mut tail_sum = 0f32;
    match grad_scale {
        // Keep exp(l - max) in the row for the gradient below.
        Some(_) => {
            let (body, tail) = row.split_at_mut(split);
            for c in body.chunks_exact_mut(LANES) {
                for (a, v) in acc.iter_mut().zip(c) {
                    *v = exp_fast(*v - max);
                    *a += *v;
                }
            }
            for v in tail {
                *v = exp_fast(*v - max);
                tail_sum += *v;
            }
        }
        None => {
            for c in row[..split].chunks_exact(LANES) {
                for (a, &v) in acc.iter_mut().zip(c) {
                    *a += exp_fast(v - max);
                }
            }
            tail_sum = row[split..].iter().map(|&v| exp_fast(v - max)).sum();
        }
    }
    let sum = acc.iter().sum::<f32>() + tail_sum;
    if let Some(scale) = grad_scale {
        let k = scale / sum;
        row.iter_mut().for_each(|v| *v *= k);
        row[t] -= scale;
    }
    (max as f64 + (sum as f64).ln()) - target as f64
}

/// Applies [`row_loss`] to `[rows, v]` f32 logits in place, summing the NLL in row order.
fn rows_loss<L: Label>(logits: &mut [f32], labels: &[L], v: usize, grad_scale: Option<f32>) -> f64 {
    let mut losses = vec![0f64; labels.len()];
    if logits.len() >= PARALLEL_MIN_ELEMS {
        logits
            .par_chunks_mut(v)
            .zip(labels.par_iter())
            .zip(losses.par_iter_mut())
            .for_each(|((row, &l), out)| *out = row_loss(row, l, grad_scale));
    } else {
        logits
            .chunks_mut(v)
            .zip(labels)
            .zip(losses.iter_mut())
            .for_each(|((row, &l), out)| *out = row_loss(row, l, grad_scale));
    }
    // Summed serially so the result does not depend on the thread count.
    losses.iter().sum()
}

/// Reference: cross-entropy over precomputed `[n, v]` logits, computed in f32 and summed in f64.
pub fn softmax_cross_entropy_forward<T: Float, L: Label>(
    logits: &[T],
    labels: &[L],
    n: usize,
    v: usize,
) -> Result<CrossEntropyStats, CrossEntropyError> {
    assert_eq!(
        logits.len(),
        n * v,
        "softmax_cross_entropy_forward: logits has {} elements, expected n*v = {n}*{v}",
        logits.len()
    );
    assert_eq!(
        labels.len(),
        n,
        "softmax_cross_entropy_forward: {} labels for {n} rows",
        labels.len()
    );
    let count = check_labels(labels, v)?;
    let mut row = vec![0f32; v];
    let mut nll_sum = 0f64;
    for (r, &l) in labels.iter().enumerate() {
        for (d, s) in row.iter_mut().zip(&logits[r * v..(r + 1) * v]) {
            *d = s.to_f32();
        }
        nll_sum += row_loss(&mut row, l, None);
    }
    Ok(CrossEntropyStats { nll_sum, count })
}

/// Reference backward: `dlogits = (softmax(logits) - onehot(label)) * grad_scale`, zero rows for
/// ignored labels. For a mean loss, `grad_scale = 1 / count` (times any loss scale).
pub fn softmax_cross_entropy_backward<T: Float, L: Label>(
    dlogits: &mut [T],
    logits: &[T],
    labels: &[L],
    n: usize,
    v: usize,
    grad_scale: f32,
) -> Result<(), CrossEntropyError> {
    assert_eq!(
        logits.len(),
        n * v,
        "softmax_cross_entropy_backward: logits has {} elements, expected n*v = {n}*{v}",
        logits.len()
    );
    assert_eq!(
        dlogits.len(),
        n * v,
        "softmax_cross_entropy_backward: dlogits has {} elements, expected n*v = {n}*{v}",
        dlogits.len()
    );
    assert_eq!(
        labels.len(),
        n,
        "softmax_cross_entropy_backward: {} labels for {n} rows",
        labels.len()
    );
    check_labels(labels, v)?;
    let mut row = vec![0f32; v];
    for (r, &l) in labels.iter().enumerate() {
        for (d, s) in row.iter_mut().zip(&logits[r * v..(r + 1) * v]) {
            *d = s.to_f32();
        }
        row_loss(&mut row, l, Some(grad_scale));
        for (d, s) in dlogits[r * v..(r + 1) * v].iter_mut().zip(&row) {
            *d = T::from_f32(*s);
        }
    }
    Ok(())
}

/// Rows per chunk of the fused kernel for a vocabulary of `v`: about 128 MiB of f32 logits.
pub fn chunk_rows(v: usize) -> usize {
    chunk_rows_within(v, CHUNK_ELEMS)
}

/// Rows per chunk when `budget` f32 logits may be held at once (tests use small budgets).
fn chunk_rows_within(v: usize, budget: usize) -> usize {
    (budget / v.max(1)).clamp(8, 1024)
}

fn check_fused<T, L>(h: &[T], weight: &[T], labels: &[L], n: usize, c: usize, v: usize) {
    assert_eq!(
        h.len(),
        n * c,
        "lm_head_cross_entropy: hidden has {} elements, expected n*c = {n}*{c}",
        h.len()
    );
    assert_eq!(
        weight.len(),
        v * c,
        "lm_head_cross_entropy: weight has {} elements, expected v*c = {v}*{c}",
        weight.len()
    );
    assert_eq!(
        labels.len(),
        n,
        "lm_head_cross_entropy: {} labels for {n} rows",
        labels.len()
    );
}

/// The gradient outputs of the fused kernel.
type FusedGrads<'a, T, G> = (&'a mut [T], Option<&'a mut [G]>);

#[allow(clippy::too_many_arguments)]
fn fused<T: Float, G: Float, L: Label>(
    mut grads: Option<FusedGrads<'_, T, G>>,
    h: &[T],
    weight: &[T],
    labels: &[L],
    n: usize,
    c: usize,
    v: usize,
    grad_scale: f32,
    scratch: &mut Vec<f32>,
    budget: usize,
) -> Result<CrossEntropyStats, CrossEntropyError> {
    check_fused(h, weight, labels, n, c, v);
    let count = check_labels(labels, v)?;
    let chunk = chunk_rows_within(v, budget);
    let need = chunk.min(n) * v;
    if let (Some((dh, dweight)), Some(w16), Some(h16), true) = (
        grads.as_mut(),
        as_bf16(weight),
        as_bf16(h),
        bf16_gemm::available(),
    ) {
        // The bf16 dlogits of a gradient chunk live after the f32 logits, in the same scratch.
        let gchunk = grad_chunk_rows(v, budget).max(chunk);
        let gneed = gchunk.min(n) * v;
        if scratch.len() < need + gneed.div_ceil(2) {
            scratch.resize(need + gneed.div_ceil(2), 0.0);
        }
        let (logits, tail) = scratch.split_at_mut(need);
        // SAFETY: `tail` holds at least gneed/2 f32s = `gneed` bf16s, bf16's alignment (2)
        // divides f32's, and the two views do not overlap.
        let d16 =
            unsafe { std::slice::from_raw_parts_mut(tail.as_mut_ptr().cast::<bf16>(), gneed) };
        let rows = Rows {
            n,
            c,
            v,
            chunk,
            gchunk,
        };
        let nll_sum = fused_bf16(
            dh,
            dweight.as_deref_mut(),
            h16,
            w16,
            labels,
            rows,
            grad_scale,
            logits,
            d16,
        );
        return Ok(CrossEntropyStats { nll_sum, count });
    }
    if scratch.len() < need {
        scratch.resize(need, 0.0);
    }
    let want_grad = grads.is_some().then_some(grad_scale);
    let mut nll_sum = 0f64;
    for r0 in (0..n).step_by(chunk) {
        let m = chunk.min(n - r0);
        let (h_chunk, l_chunk) = (&h[r0 * c..(r0 + m) * c], &labels[r0..r0 + m]);
        let logits = &mut scratch[..m * v];
        matmul(logits, h_chunk, weight, m, c, v, false, true, false);
        nll_sum += rows_loss(logits, l_chunk, v, want_grad);
        if let Some((dh, dweight)) = grads.as_mut() {
            let dh_chunk = &mut dh[r0 * c..(r0 + m) * c];
            if l_chunk.iter().all(|l| l.as_i64() == IGNORE_INDEX) {
                dh_chunk.fill(T::from_f32(0.0));
                continue;
            }
            let dlogits = &*logits;
            matmul(dh_chunk, dlogits, weight, m, v, c, false, false, false);
            if let Some(dw) = dweight.as_deref_mut() {
                matmul(dw, dlogits, h_chunk, v, m, c, true, false, true);
            }
        }
    }
    Ok(CrossEntropyStats { nll_sum, count })
}

/// Row counts of the fused kernel: `n` rows of width `c`, vocabulary `v`; logits are formed
/// `chunk` rows at a time, gradients `gchunk` rows at a time (bf16 path).
#[derive(Clone, Copy)]
struct Rows {
    n: usize,
    c: usize,
    v: usize,
    chunk: usize,
    gchunk: usize,
}

/// Rows per gradient chunk of the bf16 path: `2 * budget` bf16 dlogits, as many bytes as the
/// f32 logits chunk. `dW += dlogits^T h` reads and writes all of `dW` (f32, vocab x hidden) once per
/// gradient chunk, so fewer, taller chunks save that traffic: for GPT-2, 154 MB each way.
fn grad_chunk_rows(v: usize, budget: usize) -> usize {
    ((2 * budget) / v.max(1)).clamp(8, 1024)
}

/// The fused kernel with bf16 weight and hidden states: dlogits are rounded to bf16 (as
/// PyTorch's bf16 backward does), so both gradient matmuls run on `vdpbf16ps` instead of
/// converting the weight to f32 per chunk. Logits are formed and reduced in f32 `chunk` rows
/// at a time; their bf16 gradients are gathered for `gchunk` rows, then multiplied out.
#[allow(clippy::too_many_arguments)]
fn fused_bf16<T: Float, G: Float, L: Label>(
    dh: &mut [T],
    mut dweight: Option<&mut [G]>,
    h: &[bf16],
    weight: &[bf16],
    labels: &[L],
    rows: Rows,
    grad_scale: f32,
    logits: &mut [f32],
    d16: &mut [bf16],
) -> f64 {
    let Rows {
        n,
        c,
        v,
        chunk,
        gchunk,
    } = rows;
    let mut nll_sum = 0f64;
    for g0 in (0..n).step_by(gchunk) {
        let gm = gchunk.min(n - g0);
        for r0 in (g0..g0 + gm).step_by(chunk) {
            let m = chunk.min(g0 + gm - r0);
            let logits = &mut logits[..m * v];
            matmul(
                logits,
                &h[r0 * c..(r0 + m) * c],
                weight,
                m,
                c,
                v,
                false,
                true,
                false,
            );
            nll_sum += rows_loss(logits, &labels[r0..r0 + m], v, Some(grad_scale));
            convert_into(&mut d16[(r0 - g0) * v..(r0 - g0 + m) * v], logits);
        }
        let dh_chunk = &mut dh[g0 * c..(g0 + gm) * c];
        if labels[g0..g0 + gm]
            .iter()
            .all(|l| l.as_i64() == IGNORE_INDEX)
        {
            dh_chunk.fill(T::from_f32(0.0));
            continue;
        }
        let dl = &d16[..gm * v];
        matmul(dh_chunk, dl, weight, gm, v, c, false, false, false);
        if let Some(dw) = dweight.as_deref_mut() {
            matmul(
                dw,
                dl,
                &h[g0 * c..(g0 + gm) * c],
                v,
                gm,
                c,
                true,
                false,
                true,
            );
        }
    }
    nll_sum
}

/// Fused LM head + cross-entropy, forward and backward in one pass.
///
/// `h` is the final hidden states `[n, c]`, `weight` the LM head `[v, c]` (the token embedding
/// when tied). Writes `dh` (`[n, c]`, overwritten) and adds into `dweight` (`[v, c]`, typically
/// f32; `None` when frozen) the gradients of `grad_scale * Σ nll`. `scratch` is reused across
/// calls to hold one chunk of logits.
#[allow(clippy::too_many_arguments)]
pub fn lm_head_cross_entropy<T: Float, G: Float, L: Label>(
    dh: &mut [T],
    dweight: Option<&mut [G]>,
    h: &[T],
    weight: &[T],
    labels: &[L],
    n: usize,
    c: usize,
    v: usize,
    grad_scale: f32,
    scratch: &mut Vec<f32>,
) -> Result<CrossEntropyStats, CrossEntropyError> {
    assert_eq!(
        dh.len(),
        n * c,
        "lm_head_cross_entropy: dh has {} elements, expected n*c = {n}*{c}",
        dh.len()
    );
    if let Some(dw) = &dweight {
        assert_eq!(
            dw.len(),
            v * c,
            "lm_head_cross_entropy: dweight has {} elements, expected v*c = {v}*{c}",
            dw.len()
        );
    }
    fused(
        Some((dh, dweight)),
        h,
        weight,
        labels,
        n,
        c,
        v,
        grad_scale,
        scratch,
        CHUNK_ELEMS,
    )
}

/// Forward only (evaluation): the loss of the LM head over `h`, chunked like the fused kernel.
pub fn lm_head_cross_entropy_loss<T: Float, L: Label>(
    h: &[T],
    weight: &[T],
    labels: &[L],
    n: usize,
    c: usize,
    v: usize,
    scratch: &mut Vec<f32>,
) -> Result<CrossEntropyStats, CrossEntropyError> {
    fused::<T, f32, L>(None, h, weight, labels, n, c, v, 0.0, scratch, CHUNK_ELEMS)
}

/// The f32 logits `[rows.len(), v]` of the selected rows of `h` (the last position for
/// generation, all of them for parity tests).
pub fn lm_head_logits<T: Float>(
    logits: &mut [f32],
    h: &[T],
    weight: &[T],
    rows: &[usize],
    c: usize,
    v: usize,
) -> Result<(), CrossEntropyError> {
    assert_eq!(
        h.len() % c.max(1),
        0,
        "lm_head_logits: hidden length {} is not a multiple of c = {c}",
        h.len()
    );
    assert_eq!(
        weight.len(),
        v * c,
        "lm_head_logits: weight has {} elements, expected v*c = {v}*{c}",
        weight.len()
    );
    assert_eq!(
        logits.len(),
        rows.len() * v,
        "lm_head_logits: logits has {} elements, expected rows*v = {}*{v}",
        logits.len(),
        rows.len()
    );
    let n = h.len() / c.max(1);
    if let Some(&row) = rows.iter().find(|&&r| r >= n) {
        return Err(CrossEntropyError::RowOutOfRange { row, rows: n });
    }
    let mut gathered = Vec::with_capacity(rows.len() * c);
    for &r in rows {
        gathered.extend_from_slice(&h[r * c..(r + 1) * c]);
    }
    matmul(
        logits,
        &gathered,
        weight,
        rows.len(),
        c,
        v,
        false,
        true,
        false,
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::*;

    /// NLL of each row in f64, NaN-free for moderate logits.
    fn naive_nll(logits: &[f32], labels: &[i64], v: usize) -> (f64, usize) {
        let mut sum = 0.0;
        let mut count = 0;
        for (r, &l) in labels.iter().enumerate() {
            if l == IGNORE_INDEX {
                continue;
            }
            let row = &logits[r * v..(r + 1) * v];
            let lse = row.iter().map(|x| (*x as f64).exp()).sum::<f64>().ln();
            sum += lse - row[l as usize] as f64;
            count += 1;
        }
        (sum, count)
    }

    fn naive_logits(h: &[f32], w: &[f32], n: usize, c: usize, v: usize) -> Vec<f32> {
        let mut out = vec![0f32; n * v];
        for r in 0..n {
            for j in 0..v {
                out[r * v + j] = (0..c)
                    .map(|p| h[r * c + p] as f64 * w[j * c + p] as f64)
                    .sum::<f64>() as f32;
            }
        }
        out
    }

    #[test]
    fn reference_matches_naive_and_ignores_rows() {
        let mut rng = Rng::new(60);
        let (n, v) = (6, 13);
        let logits = rng.vec(n * v, 5.0);
        let labels: Vec<i64> = vec![3, IGNORE_INDEX, 0, 12, IGNORE_INDEX, 7];
        let stats = softmax_cross_entropy_forward(&logits, &labels, n, v).unwrap();
        let (want, count) = naive_nll(&logits, &labels, v);
        assert_eq!(stats.count, count);
        assert!(
            (stats.nll_sum - want).abs() < 1e-5 * want.abs(),
            "{} vs {want}",
            stats.nll_sum
        );
        // Large logits: the max subtraction keeps exp finite.
        let big: Vec<f32> = logits.iter().map(|x| x + 1000.0).collect();
        let s = softmax_cross_entropy_forward(&big, &labels, n, v).unwrap();
        assert!((s.nll_sum - want).abs() < 1e-3, "{} vs {want}", s.nll_sum);
    }

    /// Rows wider than the 16 vector lanes (plus a tail) against an f64 softmax: loss and
    /// gradient, with the max in the vector body, in the tail, and a large shared offset.
    #[test]
    fn wide_rows_match_f64_softmax() {
        let mut rng = Rng::new(63);
        let v = 16 * 70 + 7;
        for (case, peak) in [(0usize, 3usize), (1, v - 2)] {
            let mut logits: Vec<f32> = rng.vec(2 * v, 6.0);
            logits[peak] = 9.0;
            logits[v + peak] = 9.0;
            if case == 1 {
                logits.iter_mut().for_each(|x| *x += 500.0);
            }
            let labels: Vec<i64> = vec![5, (v - 1) as i64];
            let stats = softmax_cross_entropy_forward(&logits, &labels, 2, v).unwrap();
            let (want, _) = naive_nll(
                &logits
                    .iter()
                    .map(|x| x - 500.0 * case as f32)
                    .collect::<Vec<_>>(),
                &labels,
                v,
            );
            assert!(
                (stats.nll_sum - want).abs() < 1e-5 * want.abs().max(1.0),
                "case {case}: {} vs {want}",
                stats.nll_sum
            );
            let scale = 0.5;
            let mut d = vec![0f32; 2 * v];
            softmax_cross_entropy_backward(&mut d, &logits, &labels, 2, v, scale).unwrap();
            let mut expect = Vec::with_capacity(2 * v);
            for (r, &l) in labels.iter().enumerate() {
                let row: Vec<f64> = logits[r * v..(r + 1) * v]
                    .iter()
                    .map(|&x| x as f64)
                    .collect();
                let mx = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = row.iter().map(|x| (x - mx).exp()).sum();
                for (j, x) in row.iter().enumerate() {
                    let onehot = if j == l as usize { 1.0 } else { 0.0 };
                    expect.push(((x - mx).exp() / z - onehot) * scale as f64);
                }
            }
            assert_close("dlogits", &d, &expect, 1e-6);
        }
    }

    #[test]
    fn bad_labels_are_errors() {
        let logits = vec![0f32; 2 * 4];
        for bad in [4i64, -1, -101] {
            let err = softmax_cross_entropy_forward(&logits, &[0, bad], 2, 4).unwrap_err();
            assert_eq!(
                err,
                CrossEntropyError::LabelOutOfRange {
                    row: 1,
                    label: bad,
                    vocab: 4
                }
            );
        }
        let i32_ok = softmax_cross_entropy_forward(&logits, &[0i32, -100], 2, 4).unwrap();
        assert_eq!(i32_ok.count, 1);
        assert!((i32_ok.mean() - 4f64.ln()).abs() < 1e-6);
    }

    #[test]
    fn reference_backward_matches_finite_differences() {
        let mut rng = Rng::new(61);
        let (n, v) = (4, 9);
        let mut logits = rng.vec(n * v, 2.0);
        let labels: Vec<i64> = vec![1, IGNORE_INDEX, 8, 0];
        let scale = 0.37;
        let mut d = vec![0f32; n * v];
        softmax_cross_entropy_backward(&mut d, &logits, &labels, n, v, scale).unwrap();
        let num = numeric_grad(&mut logits, 1e-2, |l| {
            naive_nll(l, &labels, v).0 * scale as f64
        });
        assert_grad_close("dlogits", &d, &num, 1e-3);
        assert!(
            d[v..2 * v].iter().all(|x| *x == 0.0),
            "ignored row must have zero gradient"
        );
    }

    /// Fused kernel against naive logits + naive NLL, with finite differences for dh and dW.
    #[test]
    fn fused_matches_reference_and_finite_differences() {
        let mut rng = Rng::new(62);
        let (n, c, v) = (5, 4, 11);
        let mut h = rng.vec(n * c, 1.0);
        let mut w = rng.vec(v * c, 1.0);
        let labels: Vec<i64> = vec![2, 10, IGNORE_INDEX, 0, 5];
        let scale = 0.25;
        let mut dh = vec![f32::NAN; n * c];
        let dw_init = rng.vec(v * c, 1.0);
        let mut dw = dw_init.clone();
        let mut scratch = Vec::new();
        let stats = lm_head_cross_entropy(
            &mut dh,
            Some(&mut dw),
            &h,
            &w,
            &labels,
            n,
            c,
            v,
            scale,
            &mut scratch,
        )
        .unwrap();
        let (want, count) = naive_nll(&naive_logits(&h, &w, n, c, v), &labels, v);
        assert_eq!(stats.count, count);
        assert!(
            (stats.nll_sum - want).abs() < 1e-5 * want,
            "{} vs {want}",
            stats.nll_sum
        );
        let eval = lm_head_cross_entropy_loss(&h, &w, &labels, n, c, v, &mut scratch).unwrap();
        assert_eq!(eval, stats);

        let loss = |h: &[f32], w: &[f32]| {
            naive_nll(&naive_logits(h, w, n, c, v), &labels, v).0 * scale as f64
        };
        let wc = w.clone();
        let ndh = numeric_grad(&mut h, 1e-2, |h| loss(h, &wc));
        let hc = h.clone();
        let ndw = numeric_grad(&mut w, 1e-2, |w| loss(&hc, w));
        assert_grad_close("dh", &dh, &ndh, 2e-3);
        let delta: Vec<f32> = dw.iter().zip(&dw_init).map(|(a, b)| a - b).collect();
        assert_grad_close("dweight", &delta, &ndw, 2e-3);
    }

    /// A logits budget small enough that the tests below run many chunks.
    const TEST_BUDGET: usize = 1 << 23;

    /// Many chunks (vocab large enough that a chunk is a few rows) agree with one reference pass.
    #[test]
    fn chunked_equals_unchunked_reference() {
        let mut rng = Rng::new(63);
        let v = TEST_BUDGET / 8; // 8 rows per chunk
        assert_eq!(chunk_rows_within(v, TEST_BUDGET), 8);
        let (n, c) = (19, 3);
        let h = rng.vec(n * c, 1.0);
        let w = rng.vec(v * c, 1.0);
        let labels: Vec<i64> = (0..n)
            .map(|r| {
                if r % 7 == 3 {
                    IGNORE_INDEX
                } else {
                    rng.below(v) as i64
                }
            })
            .collect();
        // Also with a fully ignored chunk (rows 8..16), which skips its matmuls.
        let mut labels2 = labels.clone();
        labels2[8..16].fill(IGNORE_INDEX);
        for labels in [labels, labels2] {
            let count = labels.iter().filter(|l| **l != IGNORE_INDEX).count();
            let scale = 1.0 / count as f32;
            let (mut dh, mut dw, mut scratch) =
                (vec![f32::NAN; n * c], vec![0f32; v * c], Vec::new());
            let stats = fused(
                Some((&mut dh, Some(&mut dw))),
                &h,
                &w,
                &labels,
                n,
                c,
                v,
                scale,
                &mut scratch,
                TEST_BUDGET,
            )
            .unwrap();
            assert!(
                scratch.len() <= 8 * v,
                "scratch must hold one chunk, not all rows"
            );

            let mut logits = vec![0f32; n * v];
            lm_head_logits(&mut logits, &h, &w, &(0..n).collect::<Vec<_>>(), c, v).unwrap();
            let r = softmax_cross_entropy_forward(&logits, &labels, n, v).unwrap();
            assert_eq!(r.count, stats.count);
            assert!(
                (r.nll_sum - stats.nll_sum).abs() < 1e-9 * r.nll_sum.abs().max(1.0),
                "{r:?} vs {stats:?}"
            );
            let mut dlogits = vec![0f32; n * v];
            softmax_cross_entropy_backward(&mut dlogits, &logits, &labels, n, v, scale).unwrap();
            let mut want_dh = vec![0f32; n * c];
            matmul(&mut want_dh, &dlogits, &w, n, v, c, false, false, false);
            let mut want_dw = vec![0f32; v * c];
            matmul(&mut want_dw, &dlogits, &h, v, n, c, true, false, false);
            let f64s = |x: &[f32]| x.iter().map(|v| *v as f64).collect::<Vec<_>>();
            assert_close("dh", &dh, &f64s(&want_dh), 1e-5);
            assert_close("dweight", &dw, &f64s(&want_dw), 1e-6);
        }
    }

    /// The bf16 path's two chunk sizes (logits 8 rows, gradients 16 rows here), with a fully
    /// ignored gradient chunk and a short last one: loss as f32 on the same values, gradients
    /// exactly those of round_bf16(dlogits).
    #[test]
    fn bf16_gradient_chunks_equal_the_reference() {
        if !crate::bf16_gemm::available() {
            return;
        }
        let mut rng = Rng::new(67);
        let v = TEST_BUDGET / 8;
        assert_eq!(
            (
                chunk_rows_within(v, TEST_BUDGET),
                grad_chunk_rows(v, TEST_BUDGET)
            ),
            (8, 16)
        );
        let (n, c) = (37, 3);
        let b = |x: Vec<f32>| x.into_iter().map(bf16::from_f32).collect::<Vec<_>>();
        let f = |x: &[bf16]| x.iter().map(|v| v.to_f32()).collect::<Vec<_>>();
        let (h, w) = (b(rng.vec(n * c, 1.0)), b(rng.vec(v * c, 1.0)));
        let mut labels: Vec<i64> = (0..n).map(|_| rng.below(v) as i64).collect();
        labels[16..32].fill(IGNORE_INDEX);
        labels[5] = IGNORE_INDEX;
        let count = labels.iter().filter(|l| **l != IGNORE_INDEX).count();
        let scale = 1.0 / count as f32;
        let mut dh = vec![bf16::NAN; n * c];
        let (mut dw, mut scratch) = (vec![0f32; v * c], Vec::new());
        let stats = fused(
            Some((&mut dh, Some(&mut dw))),
            &h,
            &w,
            &labels,
            n,
            c,
            v,
            scale,
            &mut scratch,
            TEST_BUDGET,
        )
        .unwrap();
        let (hf, wf) = (f(&h), f(&w));
        let mut logits = vec![0f32; n * v];
        lm_head_logits(&mut logits, &hf, &wf, &(0..n).collect::<Vec<_>>(), c, v).unwrap();
        let r = softmax_cross_entropy_forward(&logits, &labels, n, v).unwrap();
        assert_eq!(r.count, stats.count);
        assert!(
            (r.nll_sum - stats.nll_sum).abs() < 1e-6 * r.nll_sum,
            "{r:?} vs {stats:?}"
        );
        let mut dlogits = vec![0f32; n * v];
        softmax_cross_entropy_backward(&mut dlogits, &logits, &labels, n, v, scale).unwrap();
        let (mut want_dh, mut want_dw) = (vec![0f64; n * c], vec![0f64; v * c]);
        for (r, row) in dlogits.chunks_exact(v).enumerate() {
            for (j, &d) in row.iter().enumerate() {
                let d = bf16::from_f32(d).to_f32() as f64;
                for k in 0..c {
                    want_dh[r * c + k] += d * wf[j * c + k] as f64;
                    want_dw[j * c + k] += d * hf[r * c + k] as f64;
                }
            }
        }
        assert_close("bf16 dh", &f(&dh), &want_dh, 1e-2);
        assert_close("bf16 dweight", &dw, &want_dw, 1e-5);
        assert!(dh[16 * c..32 * c].iter().all(|x| x.to_f32() == 0.0));
    }

    #[test]
    fn logits_for_selected_rows() {
        let mut rng = Rng::new(64);
        let (n, c, v) = (4, 5, 7);
        let (h, w) = (rng.vec(n * c, 1.0), rng.vec(v * c, 1.0));
        let all = naive_logits(&h, &w, n, c, v);
        let mut got = vec![0f32; 2 * v];
        lm_head_logits(&mut got, &h, &w, &[3, 1], c, v).unwrap();
        let want: Vec<f64> = all[3 * v..4 * v]
            .iter()
            .chain(&all[v..2 * v])
            .map(|x| *x as f64)
            .collect();
        assert_close("logits", &got, &want, 1e-5);
        let err = lm_head_logits(&mut got, &h, &w, &[0, 4], c, v).unwrap_err();
        assert_eq!(err, CrossEntropyError::RowOutOfRange { row: 4, rows: 4 });
    }

    #[test]
    fn bf16_storage_matches_f32() {
        let mut rng = Rng::new(65);
        let (n, c, v) = (6, 16, 40);
        let b = |x: Vec<f32>| x.into_iter().map(bf16::from_f32).collect::<Vec<_>>();
        let f = |x: &[bf16]| x.iter().map(|v| v.to_f32()).collect::<Vec<_>>();
        let (h, w) = (b(rng.vec(n * c, 1.0)), b(rng.vec(v * c, 1.0)));
        let labels: Vec<i32> = vec![0, 39, -100, 7, 7, 20];
        let (mut dh, mut dw, mut scratch) = (
            vec![bf16::from_f32(0.0); n * c],
            vec![0f32; v * c],
            Vec::new(),
        );
        let s16 = lm_head_cross_entropy(
            &mut dh,
            Some(&mut dw),
            &h,
            &w,
            &labels,
            n,
            c,
            v,
            0.2,
            &mut scratch,
        )
        .unwrap();
        let (mut dh32, mut dw32) = (vec![0f32; n * c], vec![0f32; v * c]);
        let s32 = lm_head_cross_entropy(
            &mut dh32,
            Some(&mut dw32),
            &f(&h),
            &f(&w),
            &labels,
            n,
            c,
            v,
            0.2,
            &mut scratch,
        )
        .unwrap();
        // bf16 inputs are exact in f32, so the loss is the f32 one.
        assert!(
            (s16.nll_sum - s32.nll_sum).abs() < 1e-5 * s32.nll_sum,
            "{s16:?} vs {s32:?}"
        );
        let f64s = |x: &[f32]| x.iter().map(|v| *v as f64).collect::<Vec<_>>();
        assert_close("bf16 dh", &f(&dh), &f64s(&dh32), 1e-2);
        if !crate::bf16_gemm::available() {
            // Without vdpbf16ps dlogits stay f32: dW is the f32 one up to summation order.
            assert_close("bf16 dweight (f32)", &dw, &f64s(&dw32), 1e-5);
            return;
        }
        // With vdpbf16ps dlogits are rounded to bf16 (as PyTorch's bf16 backward): dW is
        // exactly round_bf16(dlogits)^T · h, summed in f32.
        let hf = f(&h);
        let mut dlogits = vec![0f32; n * v];
        let logits = naive_logits(&hf, &f(&w), n, c, v);
        softmax_cross_entropy_backward(&mut dlogits, &logits, &labels, n, v, 0.2).unwrap();
        let mut want = vec![0f64; v * c];
        for r in 0..n {
            for j in 0..v {
                let d = bf16::from_f32(dlogits[r * v + j]).to_f32() as f64;
                for k in 0..c {
                    want[j * c + k] += d * hf[r * c + k] as f64;
                }
            }
        }
        assert_close("bf16 dweight (f32)", &dw, &want, 1e-5);
        // ... which is within bf16's rounding of the f32 gradient.
        assert_close("bf16 dweight vs f32", &dw, &f64s(&dw32), 1e-2);
    }

    /// Times the fused GPT-2 head (rows 512, c 768, vocab 50257) forward + backward, f32 and bf16.
    /// `cargo test -p rustspeed-kernels --release -- --ignored lm_head_throughput --nocapture`
    #[test]
    #[ignore]
    fn lm_head_throughput() {
        fn run<T: Float>(what: &str, rng: &mut Rng) {
            let (n, c, v) = (512, 768, 50257);
            let cast = |x: Vec<f32>| x.into_iter().map(T::from_f32).collect::<Vec<T>>();
            let h = cast(rng.vec(n * c, 1.0));
            let w = cast(rng.vec(v * c, 0.02));
            let labels: Vec<i64> = (0..n).map(|_| rng.below(v) as i64).collect();
            let mut dh = vec![T::from_f32(0.0); n * c];
            let (mut dw, mut scratch) = (vec![0f32; v * c], Vec::new());
            let flops = 3.0 * 2.0 * (n * c * v) as f64;
            for _ in 0..3 {
                let t = std::time::Instant::now();
                let s = lm_head_cross_entropy(
                    &mut dh,
                    Some(&mut dw),
                    &h,
                    &w,
                    &labels,
                    n,
                    c,
                    v,
                    1.0 / n as f32,
                    &mut scratch,
                )
                .unwrap();
                let dt = t.elapsed().as_secs_f64();
                println!(
                    "lm head {what}: {:.1} ms, {:.1} GFLOP/s, loss {:.3}",
                    dt * 1e3,
                    flops / dt / 1e9,
                    s.mean()
                );
            }
        }
        let mut rng = Rng::new(66);
        run::<f32>("f32", &mut rng);
        run::<bf16>("bf16", &mut rng);
    }
}
