//! Causal self-attention with grouped-query heads and an optional sliding window, tiled like
//! FlashAttention-2 so that no task ever holds more than a `TILE x TILE` block of scores.
//!
//! Layouts (row-major): q, out `[B, T, H, D]`; k, v `[B, T, KVH, D]`, query head `h` reading kv
//! head `h / (H / KVH)`. The forward saves the per-row logsumexp `[B, T, H]` (f32); the backward
//! recomputes probabilities from it. Storage is any [`Float`]; everything is accumulated in f32
//! and the gradients are written in the storage type, like the activations they belong to.
//!
//! Dropout on the probabilities (FlashAttention-2's): the running max, sum and saved logsumexp
//! are those of the undropped scores, and the output accumulates `dropout(P) V`, where element
//! `(b, h, i, j)` is kept iff [`DropoutMask::keep`] of index `((b * H + h) * T + i) * T + j`
//! (a counter-based hash of the key and that index) and kept values are scaled by `1 / (1 - p)`.
//! The backward regenerates the same mask from the key, so nothing of size `T x T` is stored.
//! With `Z` the mask times the scale: dV += (Z * P)^T dO, dS = P * (Z * dO V^T - D_i), where
//! `D_i = dO_i . O_i` of the (dropped) output equals `sum_j P_ij Z_ij (dO V^T)_ij` as it must.
//! Without dropout (`None`, or `p = 0`) the code path is exactly the dropout-free one.
//!
//! Masking: query `i` sees key `j` iff `j <= i` and, with a window `W`, `j > i - W`, so a row sees
//! at most `W` keys including itself. This is transformers' `sliding_window_overlay`
//! (`kv_idx > q_idx - sliding_window`, masking_utils.py) AND-ed with the causal mask, the
//! convention Mistral and Qwen2 checkpoints are evaluated with.
//!
//! Parallelism and races: the forward and the dQ pass are split over (batch, query tile), the
//! dK/dV pass over (batch, key tile), so every task owns a contiguous block of rows of its output
//! and the GQA sum of a kv head's gradient over its query heads happens inside one task. The price
//! of this split is that the backward recomputes `QK^T` and `dO V^T` in both passes (7 tile
//! products instead of FlashAttention-2's 5), in exchange for no atomics and no unsafe code.

use crate::dropout::DropoutMask;
use crate::dtype::Float;
use crate::f32_gemm;
use rayon::prelude::*;

/// Runs a tile function compiled for AVX2 when the CPU has it: the workspace builds for baseline
/// x86-64 (SSE2), and the exp and the tile loads and stores below are twice as wide with AVX2
/// (`gemm` dispatches on its own).
macro_rules! dispatch {
    ($f:ident($($arg:expr),*)) => {{
        #[cfg(target_arch = "x86_64")]
        {
            if std::is_x86_feature_detected!("avx2") {
                // SAFETY: the CPU supports AVX2, checked just above.
                unsafe { avx2::$f($($arg),*) }
            } else {
                $f($($arg),*)
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            $f($($arg),*)
        }
    }};
}

/// Rows of queries (and of keys) per tile: 64 x 64 f32 blocks stay well inside L2.
pub const TILE: usize = 64;

/// Dimensions and options of one attention call.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AttnSpec {
    pub batch: usize,
    pub seq: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// Multiplies `q . k`; HF models use `1 / sqrt(head_dim)` ([`AttnSpec::new`]'s default).
    pub scale: f32,
    /// Sliding window `W` (see the module docs); `None` is plain causal attention.
    pub window: Option<usize>,
    /// Dropout on the attention probabilities: `(p, key)`, the key as from
    /// [`crate::dropout::dropout_key`]. `None` (or `p = 0`) never drops.
    pub dropout: Option<(f32, u64)>,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum AttentionError {
    #[error(
        "attention: num_attention_heads ({heads}) must be a positive multiple of \
         num_key_value_heads ({kv_heads})"
    )]
    Heads { heads: usize, kv_heads: usize },
    #[error("attention: head_dim must be > 0")]
    HeadDim,
    #[error("attention: sliding_window must be >= 1, got 0")]
    ZeroWindow,
    #[error("attention: dropout probability must be in [0, 1), got {p}")]
    DropoutProbability { p: f32 },
    #[error("attention: {what} has {got} elements, expected {expected}")]
    Shape {
        what: &'static str,
        expected: usize,
        got: usize,
    },
}

impl AttnSpec {
    pub fn new(batch: usize, seq: usize, heads: usize, kv_heads: usize, head_dim: usize) -> Self {
        AttnSpec {
            batch,
            seq,
            heads,
            kv_heads,
            head_dim,
            scale: 1.0 / (head_dim as f32).sqrt(),
            window: None,
            dropout: None,
        }
    }

    pub fn with_window(self, window: Option<usize>) -> Self {
        AttnSpec { window, ..self }
    }

    pub fn with_scale(self, scale: f32) -> Self {
        AttnSpec { scale, ..self }
    }

    /// Drops attention probabilities with probability `p`, masks drawn from `key`; `p = 0`
    /// stores `None`, so that it runs the dropout-free path.
    pub fn with_dropout(self, p: f32, key: u64) -> Self {
        let dropout = (p != 0.0).then_some((p, key));
        AttnSpec { dropout, ..self }
    }

    /// Elements of q / out / dq.
    pub fn q_len(&self) -> usize {
        self.batch * self.seq * self.heads * self.head_dim
    }

    /// Elements of k / v / dk / dv.
    pub fn kv_len(&self) -> usize {
        self.batch * self.seq * self.kv_heads * self.head_dim
    }

    /// Elements of the saved logsumexp.
    pub fn lse_len(&self) -> usize {
        self.batch * self.seq * self.heads
    }

    fn validate(&self) -> Result<(), AttentionError> {
        if self.kv_heads == 0 || self.heads == 0 || !self.heads.is_multiple_of(self.kv_heads) {
            return Err(AttentionError::Heads {
                heads: self.heads,
                kv_heads: self.kv_heads,
            });
        }
        if self.head_dim == 0 {
            return Err(AttentionError::HeadDim);
        }
        if self.window == Some(0) {
            return Err(AttentionError::ZeroWindow);
        }
        if let Some((p, _)) = self.dropout {
            if !(0.0..1.0).contains(&p) {
                return Err(AttentionError::DropoutProbability { p });
            }
        }
        Ok(())
    }

    /// The dropout of head `h` of sequence `b`, if any; `p = 0` counts as none.
    #[inline]
    fn head_dropout(&self, b: usize, h: usize) -> Option<HeadDropout> {
        let (p, key) = self.dropout.filter(|(p, _)| *p != 0.0)?;
        Some(HeadDropout {
            mask: DropoutMask::new(p, key),
            row0: (b * self.heads + h) * self.seq,
            seq: self.seq,
        })
    }

    /// First key visible from query `i`.
    #[inline]
    fn first_key(&self, i: usize) -> usize {
        match self.window {
            Some(w) => (i + 1).saturating_sub(w),
            None => 0,
        }
    }

    /// One past the last query that sees key `j`.
    #[inline]
    fn query_end(&self, j: usize) -> usize {
        match self.window {
            Some(w) => (j + w).min(self.seq),
            None => self.seq,
        }
    }

    fn group(&self) -> usize {
        self.heads / self.kv_heads
    }
}

/// The probability dropout of one (sequence, head): element `(i, j)` has mask index
/// `(row0 + i) * T + j`, `row0 = (b * H + h) * T`.
#[derive(Clone, Copy)]
struct HeadDropout {
    mask: DropoutMask,
    row0: usize,
    seq: usize,
}

impl HeadDropout {
    /// Mask index of element `(i, j)`.
    #[inline(always)]
    fn index(&self, i: usize, j: usize) -> usize {
        (self.row0 + i) * self.seq + j
    }

    /// `1 / (1 - p)` if element `index` is kept, else 0.
    #[inline(always)]
    fn factor(&self, index: usize) -> f32 {
        if self.mask.keep(index) {
            self.mask.scale()
        } else {
            0.0
        }
    }

    /// Applies the factors of row `i`, keys `j0..j0 + row.len()`.
    #[inline(always)]
    fn apply_row(&self, row: &mut [f32], i: usize, j0: usize) {
        let first = self.index(i, j0);
        for (c, x) in row.iter_mut().enumerate() {
            *x *= self.factor(first + c);
        }
    }
}

fn check_len(what: &'static str, got: usize, expected: usize) -> Result<(), AttentionError> {
    if got == expected {
        Ok(())
    } else {
        Err(AttentionError::Shape {
            what,
            expected,
            got,
        })
    }
}

/// `out = softmax(scale * q k^T + mask) v`, and `lse[b, t, h] = logsumexp` of that row's scores.
pub fn attention_forward<T: Float>(
    out: &mut [T],
    lse: &mut [f32],
    q: &[T],
    k: &[T],
    v: &[T],
    spec: &AttnSpec,
) -> Result<(), AttentionError> {
    spec.validate()?;
    check_len("attention out [B, T, H, D]", out.len(), spec.q_len())?;
    check_len("attention logsumexp [B, T, H]", lse.len(), spec.lse_len())?;
    check_len("attention q [B, T, H, D]", q.len(), spec.q_len())?;
    check_len("attention k [B, T, KVH, D]", k.len(), spec.kv_len())?;
    check_len("attention v [B, T, KVH, D]", v.len(), spec.kv_len())?;
    if spec.batch == 0 || spec.seq == 0 {
        return Ok(());
    }
    let (t, h, d) = (spec.seq, spec.heads, spec.head_dim);
    out.par_chunks_mut(t * h * d)
        .zip(lse.par_chunks_mut(t * h))
        .enumerate()
        .for_each(|(b, (out_b, lse_b))| {
            out_b
                .par_chunks_mut(TILE * h * d)
                .zip(lse_b.par_chunks_mut(TILE * h))
                .enumerate()
                .for_each(|(tile, (out_t, lse_t))| {
                    let rows = Rows {
                        b,
                        start: tile * TILE,
                    };
                    dispatch!(forward_tile(out_t, lse_t, q, k, v, spec, rows))
                });
        });
    Ok(())
}

/// Gradients of [`attention_forward`]: overwrites `dq`, `dk`, `dv` (not accumulated) given the
/// output gradient `dout`, the inputs and the forward's `out` and `lse`.
#[allow(clippy::too_many_arguments)]
pub fn attention_backward<T: Float>(
    dq: &mut [T],
    dk: &mut [T],
    dv: &mut [T],
    dout: &[T],
    q: &[T],
    k: &[T],
    v: &[T],
    out: &[T],
    lse: &[f32],
    spec: &AttnSpec,
) -> Result<(), AttentionError> {
    spec.validate()?;
    for (what, len) in [
        ("attention dq [B, T, H, D]", dq.len()),
        ("attention dout [B, T, H, D]", dout.len()),
        ("attention q [B, T, H, D]", q.len()),
        ("attention out [B, T, H, D]", out.len()),
    ] {
        check_len(what, len, spec.q_len())?;
    }
    for (what, len) in [
        ("attention dk [B, T, KVH, D]", dk.len()),
        ("attention dv [B, T, KVH, D]", dv.len()),
        ("attention k [B, T, KVH, D]", k.len()),
        ("attention v [B, T, KVH, D]", v.len()),
    ] {
        check_len(what, len, spec.kv_len())?;
    }
    check_len("attention logsumexp [B, T, H]", lse.len(), spec.lse_len())?;
    if spec.batch == 0 || spec.seq == 0 {
        return Ok(());
    }
    let (t, h, kvh, d) = (spec.seq, spec.heads, spec.kv_heads, spec.head_dim);
    let inputs = BackwardInputs {
        dout,
        q,
        k,
        v,
        out,
        lse,
    };
    dk.par_chunks_mut(t * kvh * d)
        .zip(dv.par_chunks_mut(t * kvh * d))
        .enumerate()
        .for_each(|(b, (dk_b, dv_b))| {
            dk_b.par_chunks_mut(TILE * kvh * d)
                .zip(dv_b.par_chunks_mut(TILE * kvh * d))
                .enumerate()
                .for_each(|(tile, (dk_t, dv_t))| {
                    let rows = Rows {
                        b,
                        start: tile * TILE,
                    };
                    dispatch!(dkv_tile(dk_t, dv_t, &inputs, spec, rows))
                });
        });
    dq.par_chunks_mut(t * h * d)
        .enumerate()
        .for_each(|(b, dq_b)| {
            dq_b.par_chunks_mut(TILE * h * d)
                .enumerate()
                .for_each(|(tile, dq_t)| {
                    let rows = Rows {
                        b,
                        start: tile * TILE,
                    };
                    dispatch!(dq_tile(dq_t, &inputs, spec, rows))
                });
        });
    Ok(())
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::*;

    #[target_feature(enable = "avx2")]
    pub unsafe fn forward_tile<T: Float>(
        out: &mut [T],
        lse: &mut [f32],
        q: &[T],
        k: &[T],
        v: &[T],
        spec: &AttnSpec,
        rows: Rows,
    ) {
        super::forward_tile(out, lse, q, k, v, spec, rows)
    }

    #[target_feature(enable = "avx2")]
    pub unsafe fn dkv_tile<T: Float>(
        dk: &mut [T],
        dv: &mut [T],
        x: &BackwardInputs<'_, T>,
        spec: &AttnSpec,
        rows: Rows,
    ) {
        super::dkv_tile(dk, dv, x, spec, rows)
    }

    #[target_feature(enable = "avx2")]
    pub unsafe fn dq_tile<T: Float>(
        dq: &mut [T],
        x: &BackwardInputs<'_, T>,
        spec: &AttnSpec,
        rows: Rows,
    ) {
        super::dq_tile(dq, x, spec, rows)
    }
}

/// The tile a task owns: sequence `b`, rows `start..start + chunk rows`.
#[derive(Clone, Copy)]
struct Rows {
    b: usize,
    start: usize,
}

struct BackwardInputs<'a, T> {
    dout: &'a [T],
    q: &'a [T],
    k: &'a [T],
    v: &'a [T],
    out: &'a [T],
    lse: &'a [f32],
}

/// Copies rows `start..start + n` of head `head` out of a `[B, T, heads, D]` tensor into a dense
/// f32 `[n, D]` tile, multiplied by `mul`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn load_tile<T: Float>(
    dst: &mut [f32],
    src: &[T],
    spec: &AttnSpec,
    b: usize,
    start: usize,
    n: usize,
    heads: usize,
    head: usize,
    mul: f32,
) {
    let d = spec.head_dim;
    for r in 0..n {
        let at = ((b * spec.seq + start + r) * heads + head) * d;
        for (x, s) in dst[r * d..(r + 1) * d].iter_mut().zip(&src[at..at + d]) {
            *x = s.to_f32() * mul;
        }
    }
}

/// `x[i] = exp(x[i] - shift)` for a row of scores. libm's scalar `expf` was a third of the
/// kernel's time; this branch-free Cephes-style version vectorises (about 2 ulp; inputs below
/// -87 flush to 0, which is what a masked or negligible probability is anyway).
#[inline(always)]
fn exp_shifted(x: &mut [f32], shift: f32) {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding then subtracting 1.5 * 2^23 rounds to the nearest integer without a branch.
    const ROUND: f32 = 12_582_912.0;
    for v in x.iter_mut() {
        let y = (*v - shift).clamp(-87.0, 88.0);
        let shifted = y * LOG2E + ROUND;
        let n = shifted - ROUND;
        let r = y - n * LN2_HI - n * LN2_LO;
        let p = ((((1.987_569_1e-4 * r + 1.398_2e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r
            + 1.666_666_5e-1)
            * r
            + 0.5;
        let e = p * r * r + r + 1.0;
        let scale = f32::from_bits(crate::activation::pow2_bits(shifted));
        *v = if y <= -87.0 { 0.0 } else { e * scale };
    }
}

/// A dense f32 matrix operand: element `(r, c)` is `data[r * rs + c * cs]`, so a transpose is
/// just swapped strides.
#[derive(Clone, Copy)]
struct Mat<'a> {
    data: &'a [f32],
    rs: usize,
    cs: usize,
}

/// `c[m x n] = a[m x k] * b[k x n]` (or `+=` when `accumulate`), `c` row-major with row stride
/// `c_rs`. The bounds are checked here so that the `gemm` call cannot read or write outside the
/// slices.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn matmul(
    c: &mut [f32],
    c_rs: usize,
    a: Mat<'_>,
    b: Mat<'_>,
    m: usize,
    n: usize,
    k: usize,
    accumulate: bool,
) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            (0..m).for_each(|r| c[r * c_rs..r * c_rs + n].fill(0.0));
        }
        return;
    }
    assert!(
        (m - 1) * c_rs + n <= c.len(),
        "attention matmul: dst too short"
    );
    assert!(
        (m - 1) * a.rs + (k - 1) * a.cs < a.data.len(),
        "attention matmul: lhs too short"
    );
    assert!(
        (k - 1) * b.rs + (n - 1) * b.cs < b.data.len(),
        "attention matmul: rhs too short"
    );
    // Dense views (every full 64-key tile: the row strides equal the widths) go to the
    // AVX-512 kernel, which beats `gemm`'s AVX2 one at these 64 x 64 x 64 shapes.
    if f32_gemm::available() && c_rs == n {
        let dense = |v: &Mat<'_>, rows: usize, cols: usize| -> Option<bool> {
            if v.cs == 1 && v.rs == cols {
                Some(false)
            } else if v.rs == 1 && v.cs == rows {
                Some(true)
            } else {
                None
            }
        };
        if let (Some(ta), Some(tb)) = (dense(&a, m, k), dense(&b, k, n)) {
            f32_gemm::matmul_f32_serial(
                &mut c[..m * n],
                &a.data[..m * k],
                &b.data[..k * n],
                m,
                k,
                n,
                ta,
                tb,
                accumulate,
            );
            return;
        }
    }
    // SAFETY: every index gemm touches, (r, c) for r < m, c < n (and inner index < k), lies inside
    // the slices by the asserts above; `c` is borrowed mutably and cannot alias `a` or `b`.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            c_rs as isize,
            accumulate,
            a.data.as_ptr(),
            a.cs as isize,
            a.rs as isize,
            b.data.as_ptr(),
            b.cs as isize,
            b.rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        )
    }
}

/// Keeps `row[ca..ce]` as `exp(row - shift)` and zeroes the masked rest; returns the kept sum.
#[inline(always)]
fn softmax_row(row: &mut [f32], ca: usize, ce: usize, shift: f32) -> f32 {
    if ca >= ce {
        row.fill(0.0);
        return 0.0;
    }
    exp_shifted(&mut row[ca..ce], shift);
    row[..ca].fill(0.0);
    row[ce..].fill(0.0);
    row[ca..ce].iter().sum()
}

/// Forward for the query rows of one (batch, tile) over all heads: online softmax over key tiles.
#[inline(always)]
fn forward_tile<T: Float>(
    out: &mut [T],
    lse: &mut [f32],
    q: &[T],
    k: &[T],
    v: &[T],
    spec: &AttnSpec,
    rows: Rows,
) {
    let (h_n, kvh_n, d) = (spec.heads, spec.kv_heads, spec.head_dim);
    let nq = lse.len() / h_n;
    let (q0, q1) = (rows.start, rows.start + nq);
    let mut qt = vec![0.0f32; nq * d];
    let mut kt = vec![0.0f32; TILE * d];
    let mut vt = vec![0.0f32; TILE * d];
    let mut acc = vec![0.0f32; nq * d];
    let mut s = vec![0.0f32; nq * TILE];
    let mut m = vec![0.0f32; nq];
    let mut l = vec![0.0f32; nq];
    for h in 0..h_n {
        let kvh = h / spec.group();
        let drop = spec.head_dropout(rows.b, h);
        // Folding the scale into q saves a multiply per score.
        load_tile(&mut qt, q, spec, rows.b, q0, nq, h_n, h, spec.scale);
        acc.fill(0.0);
        m.fill(f32::NEG_INFINITY);
        l.fill(0.0);
        let mut k0 = spec.first_key(q0);
        while k0 < q1 {
            let k1 = (k0 + TILE).min(q1);
            let nk = k1 - k0;
            load_tile(&mut kt, k, spec, rows.b, k0, nk, kvh_n, kvh, 1.0);
            load_tile(&mut vt, v, spec, rows.b, k0, nk, kvh_n, kvh, 1.0);
            let qm = Mat {
                data: &qt,
                rs: d,
                cs: 1,
            };
            let ktm = Mat {
                data: &kt,
                rs: 1,
                cs: d,
            };
            matmul(&mut s, TILE, qm, ktm, nq, nk, d, false);
            for r in 0..nq {
                let i = q0 + r;
                let (a, e) = (spec.first_key(i).max(k0), (i + 1).min(k1));
                let row = &mut s[r * TILE..r * TILE + nk];
                if a >= e {
                    row.fill(0.0);
                    continue;
                }
                let (ca, ce) = (a - k0, e - k0);
                let mx = row[ca..ce].iter().fold(f32::NEG_INFINITY, |x, y| x.max(*y));
                if mx > m[r] {
                    // m[r] = -inf on the first visit gives corr = 0 on an all-zero row.
                    let corr = (m[r] - mx).exp();
                    l[r] *= corr;
                    acc[r * d..(r + 1) * d].iter_mut().for_each(|x| *x *= corr);
                    m[r] = mx;
                }
                l[r] += softmax_row(row, ca, ce, m[r]);
                // The sum above is of the undropped probabilities: dropout scales what reaches
                // V, not the normaliser.
                if let Some(drop) = &drop {
                    drop.apply_row(&mut row[ca..ce], i, a);
                }
            }
            let pm = Mat {
                data: &s,
                rs: TILE,
                cs: 1,
            };
            let vm = Mat {
                data: &vt,
                rs: d,
                cs: 1,
            };
            matmul(&mut acc, d, pm, vm, nq, d, nk, true);
            k0 = k1;
        }
        for r in 0..nq {
            let inv = 1.0 / l[r];
            let at = (r * h_n + h) * d;
            for (o, a) in out[at..at + d].iter_mut().zip(&acc[r * d..(r + 1) * d]) {
                *o = T::from_f32(a * inv);
            }
            lse[r * h_n + h] = m[r] + l[r].ln();
        }
    }
}

/// Loads the query-side tiles the backward needs for rows `q0..q0 + n` of head `h`: q (scaled),
/// dO, `D_i = dO_i . O_i` and the saved logsumexp.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn load_query_side<T: Float>(
    qt: &mut [f32],
    dot_: &mut [f32],
    di: &mut [f32],
    lse: &mut [f32],
    x: &BackwardInputs<'_, T>,
    spec: &AttnSpec,
    b: usize,
    q0: usize,
    n: usize,
    h: usize,
) {
    let (h_n, d) = (spec.heads, spec.head_dim);
    load_tile(qt, x.q, spec, b, q0, n, h_n, h, spec.scale);
    load_tile(dot_, x.dout, spec, b, q0, n, h_n, h, 1.0);
    for r in 0..n {
        let row = (b * spec.seq + q0 + r) * h_n + h;
        let o = &x.out[row * d..(row + 1) * d];
        di[r] = dot_[r * d..(r + 1) * d]
            .iter()
            .zip(o)
            .map(|(g, o)| g * o.to_f32())
            .sum();
        lse[r] = x.lse[row];
    }
}

/// Recomputes one score block: `p` becomes P (masked entries 0) and `dp` becomes
/// dS = P * (dO V^T - D_i), for query rows `q0..q0 + n` against keys `k0..k0 + nk`. With
/// dropout, dS = P * (Z * dO V^T - D_i) and `p` becomes the dropped Z * P that dV needs.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn probs_and_dscores(
    p: &mut [f32],
    dp: &mut [f32],
    qt: &[f32],
    dot_: &[f32],
    di: &[f32],
    lse: &[f32],
    kt: &[f32],
    vt: &[f32],
    spec: &AttnSpec,
    drop: Option<HeadDropout>,
    q0: usize,
    n: usize,
    k0: usize,
    nk: usize,
) {
    let d = spec.head_dim;
    let ktm = Mat {
        data: kt,
        rs: 1,
        cs: d,
    };
    let vtm = Mat {
        data: vt,
        rs: 1,
        cs: d,
    };
    matmul(
        p,
        TILE,
        Mat {
            data: qt,
            rs: d,
            cs: 1,
        },
        ktm,
        n,
        nk,
        d,
        false,
    );
    matmul(
        dp,
        TILE,
        Mat {
            data: dot_,
            rs: d,
            cs: 1,
        },
        vtm,
        n,
        nk,
        d,
        false,
    );
    for r in 0..n {
        let i = q0 + r;
        let (a, e) = (spec.first_key(i).max(k0), (i + 1).min(k0 + nk));
        let (ca, ce) = if a < e { (a - k0, e - k0) } else { (0, 0) };
        let prow = &mut p[r * TILE..r * TILE + nk];
        softmax_row(prow, ca, ce, lse[r]);
        let drow = &mut dp[r * TILE..r * TILE + nk];
        match &drop {
            None => {
                for (g, p) in drow.iter_mut().zip(prow.iter()) {
                    *g = p * (*g - di[r]);
                }
            }
            Some(drop) => {
                let first = drop.index(i, k0);
                for (c, (g, p)) in drow.iter_mut().zip(prow.iter_mut()).enumerate() {
                    // Invisible entries have P = 0 whatever their factor: skip their hash.
                    let z = if (ca..ce).contains(&c) {
                        drop.factor(first + c)
                    } else {
                        0.0
                    };
                    *g = *p * (z * *g - di[r]);
                    *p *= z;
                }
            }
        }
    }
}

/// dK and dV for the key rows of one (batch, tile) over all kv heads; each kv head sums over the
/// query heads of its group and over every query tile that sees these keys.
#[inline(always)]
fn dkv_tile<T: Float>(
    dk: &mut [T],
    dv: &mut [T],
    x: &BackwardInputs<'_, T>,
    spec: &AttnSpec,
    rows: Rows,
) {
    let (kvh_n, d) = (spec.kv_heads, spec.head_dim);
    let nk = dk.len() / (kvh_n * d);
    let (k0, k1) = (rows.start, rows.start + nk);
    let mut kt = vec![0.0f32; nk * d];
    let mut vt = vec![0.0f32; nk * d];
    let mut dkt = vec![0.0f32; nk * d];
    let mut dvt = vec![0.0f32; nk * d];
    let mut qt = vec![0.0f32; TILE * d];
    let mut dot_ = vec![0.0f32; TILE * d];
    let mut di = vec![0.0f32; TILE];
    let mut lse = vec![0.0f32; TILE];
    let mut p = vec![0.0f32; TILE * TILE];
    let mut ds = vec![0.0f32; TILE * TILE];
    let q_end = spec.query_end(k1 - 1);
    for kvh in 0..kvh_n {
        load_tile(&mut kt, x.k, spec, rows.b, k0, nk, kvh_n, kvh, 1.0);
        load_tile(&mut vt, x.v, spec, rows.b, k0, nk, kvh_n, kvh, 1.0);
        dkt.fill(0.0);
        dvt.fill(0.0);
        for h in kvh * spec.group()..(kvh + 1) * spec.group() {
            let drop = spec.head_dropout(rows.b, h);
            let mut q0 = k0;
            while q0 < q_end {
                let n = (q0 + TILE).min(q_end) - q0;
                load_query_side(
                    &mut qt, &mut dot_, &mut di, &mut lse, x, spec, rows.b, q0, n, h,
                );
                probs_and_dscores(
                    &mut p, &mut ds, &qt, &dot_, &di, &lse, &kt, &vt, spec, drop, q0, n, k0, nk,
                );
                // dV += P^T dO (P dropped, if dropout); dK += dS^T Q (qt carries the scale).
                let pt = Mat {
                    data: &p,
                    rs: 1,
                    cs: TILE,
                };
                let dst = Mat {
                    data: &ds,
                    rs: 1,
                    cs: TILE,
                };
                matmul(
                    &mut dvt,
                    d,
                    pt,
                    Mat {
                        data: &dot_,
                        rs: d,
                        cs: 1,
                    },
                    nk,
                    d,
                    n,
                    true,
                );
                matmul(
                    &mut dkt,
                    d,
                    dst,
                    Mat {
                        data: &qt,
                        rs: d,
                        cs: 1,
                    },
                    nk,
                    d,
                    n,
                    true,
                );
                q0 += n;
            }
        }
        for c in 0..nk {
            let at = (c * kvh_n + kvh) * d;
            for (o, g) in dk[at..at + d].iter_mut().zip(&dkt[c * d..(c + 1) * d]) {
                *o = T::from_f32(*g);
            }
            for (o, g) in dv[at..at + d].iter_mut().zip(&dvt[c * d..(c + 1) * d]) {
                *o = T::from_f32(*g);
            }
        }
    }
}

/// dQ for the query rows of one (batch, tile) over all heads.
#[inline(always)]
fn dq_tile<T: Float>(dq: &mut [T], x: &BackwardInputs<'_, T>, spec: &AttnSpec, rows: Rows) {
    let (h_n, kvh_n, d) = (spec.heads, spec.kv_heads, spec.head_dim);
    let nq = dq.len() / (h_n * d);
    let (q0, q1) = (rows.start, rows.start + nq);
    let mut qt = vec![0.0f32; nq * d];
    let mut dot_ = vec![0.0f32; nq * d];
    let mut di = vec![0.0f32; nq];
    let mut lse = vec![0.0f32; nq];
    let mut dqt = vec![0.0f32; nq * d];
    let mut kt = vec![0.0f32; TILE * d];
    let mut vt = vec![0.0f32; TILE * d];
    let mut p = vec![0.0f32; nq * TILE];
    let mut ds = vec![0.0f32; nq * TILE];
    for h in 0..h_n {
        let kvh = h / spec.group();
        let drop = spec.head_dropout(rows.b, h);
        load_query_side(
            &mut qt, &mut dot_, &mut di, &mut lse, x, spec, rows.b, q0, nq, h,
        );
        dqt.fill(0.0);
        let mut k0 = spec.first_key(q0);
        while k0 < q1 {
            let nk = (k0 + TILE).min(q1) - k0;
            load_tile(&mut kt, x.k, spec, rows.b, k0, nk, kvh_n, kvh, 1.0);
            load_tile(&mut vt, x.v, spec, rows.b, k0, nk, kvh_n, kvh, 1.0);
            probs_and_dscores(
                &mut p, &mut ds, &qt, &dot_, &di, &lse, &kt, &vt, spec, drop, q0, nq, k0, nk,
            );
            let dsm = Mat {
                data: &ds,
                rs: TILE,
                cs: 1,
            };
            matmul(
                &mut dqt,
                d,
                dsm,
                Mat {
                    data: &kt,
                    rs: d,
                    cs: 1,
                },
                nq,
                d,
                nk,
                true,
            );
            k0 += nk;
        }
        for r in 0..nq {
            let at = (r * h_n + h) * d;
            for (o, g) in dq[at..at + d].iter_mut().zip(&dqt[r * d..(r + 1) * d]) {
                *o = T::from_f32(g * spec.scale);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dropout::dropout_key;
    use crate::rope::{rope_forward, Positions, RopeScaling, RopeTable};
    use crate::testing::*;
    use half::bf16;

    fn visible(spec: &AttnSpec, i: usize, j: usize) -> bool {
        j <= i && spec.window.is_none_or(|w| j + w > i)
    }

    /// The dropout factors `[B, H, T, T]` spelled out: element `(b, h, i, j)` is 1 / (1 - p) if
    /// the mask keeps index `((b * H + h) * T + i) * T + j`, else 0; all 1 without dropout.
    fn explicit_mask(s: &AttnSpec) -> Vec<f64> {
        let n = s.batch * s.heads * s.seq * s.seq;
        match s.dropout {
            None => vec![1.0; n],
            Some((p, key)) => {
                let mask = DropoutMask::new(p, key);
                let keep = 1.0 / (1.0 - p as f64);
                (0..n)
                    .map(|e| if mask.keep(e) { keep } else { 0.0 })
                    .collect()
            }
        }
    }

    /// Full T x T scores with the masks applied, f64 softmax, probabilities times the explicit
    /// dropout mask before V: (out, lse).
    fn naive_forward(q: &[f32], k: &[f32], v: &[f32], s: &AttnSpec) -> (Vec<f64>, Vec<f64>) {
        let (t, h_n, kvh_n, d) = (s.seq, s.heads, s.kv_heads, s.head_dim);
        let z = explicit_mask(s);
        let mut out = vec![0.0; s.q_len()];
        let mut lse = vec![0.0; s.lse_len()];
        for b in 0..s.batch {
            for h in 0..h_n {
                let kvh = h / (h_n / kvh_n);
                for i in 0..t {
                    let qi = ((b * t + i) * h_n + h) * d;
                    let scores: Vec<f64> = (0..t)
                        .map(|j| {
                            if !visible(s, i, j) {
                                return f64::NEG_INFINITY;
                            }
                            let kj = ((b * t + j) * kvh_n + kvh) * d;
                            s.scale as f64
                                * (0..d)
                                    .map(|x| q[qi + x] as f64 * k[kj + x] as f64)
                                    .sum::<f64>()
                        })
                        .collect();
                    let mx = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let sum: f64 = scores.iter().map(|x| (x - mx).exp()).sum();
                    lse[(b * t + i) * h_n + h] = mx + sum.ln();
                    for (j, sc) in scores.iter().enumerate() {
                        let p = (sc - mx).exp() / sum * z[((b * h_n + h) * t + i) * t + j];
                        let vj = ((b * t + j) * kvh_n + kvh) * d;
                        for x in 0..d {
                            out[qi + x] += p * v[vj + x] as f64;
                        }
                    }
                }
            }
        }
        (out, lse)
    }

    /// Textbook softmax backward on the full matrices, f64, with the explicit dropout mask
    /// `Z` between P and V: (dq, dk, dv).
    fn naive_backward(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        dout: &[f32],
        s: &AttnSpec,
    ) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
        let (t, h_n, kvh_n, d) = (s.seq, s.heads, s.kv_heads, s.head_dim);
        let (mut dq, mut dk, mut dv) = (
            vec![0.0; s.q_len()],
            vec![0.0; s.kv_len()],
            vec![0.0; s.kv_len()],
        );
        let sc = s.scale as f64;
        let zm = explicit_mask(s);
        for b in 0..s.batch {
            for h in 0..h_n {
                let kvh = h / (h_n / kvh_n);
                let qa = |i: usize| ((b * t + i) * h_n + h) * d;
                let ka = |j: usize| ((b * t + j) * kvh_n + kvh) * d;
                let dotf = |a: &[f32], ia: usize, bb: &[f32], ib: usize| {
                    (0..d)
                        .map(|x| a[ia + x] as f64 * bb[ib + x] as f64)
                        .sum::<f64>()
                };
                for i in 0..t {
                    let js: Vec<usize> = (0..t).filter(|&j| visible(s, i, j)).collect();
                    let raw: Vec<f64> = js.iter().map(|&j| sc * dotf(q, qa(i), k, ka(j))).collect();
                    let mx = raw.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let z: f64 = raw.iter().map(|x| (x - mx).exp()).sum();
                    let p: Vec<f64> = raw.iter().map(|x| (x - mx).exp() / z).collect();
                    let z: Vec<f64> = js
                        .iter()
                        .map(|&j| zm[((b * h_n + h) * t + i) * t + j])
                        .collect();
                    // Gradient with respect to the undropped P: Z * (dO . V_j).
                    let dp: Vec<f64> = js
                        .iter()
                        .zip(&z)
                        .map(|(&j, z)| z * dotf(dout, qa(i), v, ka(j)))
                        .collect();
                    let pdp: f64 = p.iter().zip(&dp).map(|(a, b)| a * b).sum();
                    for (n, &j) in js.iter().enumerate() {
                        let ds = p[n] * (dp[n] - pdp);
                        for x in 0..d {
                            dq[qa(i) + x] += sc * ds * k[ka(j) + x] as f64;
                            dk[ka(j) + x] += sc * ds * q[qa(i) + x] as f64;
                            dv[ka(j) + x] += z[n] * p[n] * dout[qa(i) + x] as f64;
                        }
                    }
                }
            }
        }
        (dq, dk, dv)
    }

    fn run_forward<T: Float>(q: &[T], k: &[T], v: &[T], s: &AttnSpec) -> (Vec<T>, Vec<f32>) {
        let mut out = vec![T::default(); s.q_len()];
        let mut lse = vec![0.0; s.lse_len()];
        attention_forward(&mut out, &mut lse, q, k, v, s).unwrap();
        (out, lse)
    }

    fn run_backward<T: Float>(
        q: &[T],
        k: &[T],
        v: &[T],
        dout: &[T],
        s: &AttnSpec,
    ) -> (Vec<T>, Vec<T>, Vec<T>) {
        let (out, lse) = run_forward(q, k, v, s);
        let (mut dq, mut dk, mut dv) = (
            vec![T::default(); s.q_len()],
            vec![T::default(); s.kv_len()],
            vec![T::default(); s.kv_len()],
        );
        attention_backward(&mut dq, &mut dk, &mut dv, dout, q, k, v, &out, &lse, s).unwrap();
        (dq, dk, dv)
    }

    fn inputs(s: &AttnSpec, seed: u64) -> (Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>) {
        let mut rng = Rng::new(seed);
        // Scale 2 makes the softmax peaked enough that masking mistakes show.
        (
            rng.vec(s.q_len(), 2.0),
            rng.vec(s.kv_len(), 2.0),
            rng.vec(s.kv_len(), 1.0),
            rng.vec(s.q_len(), 1.0),
        )
    }

    /// Shapes crossing tile edges (T not a multiple of TILE), GQA (4/2), MQA (4/1), windows
    /// shorter than a tile, spanning tiles, of one token, and longer than T; D not a multiple of 8.
    fn shapes() -> Vec<AttnSpec> {
        vec![
            AttnSpec::new(2, 5, 2, 2, 8),
            AttnSpec::new(1, 70, 4, 2, 16),
            AttnSpec::new(2, 130, 4, 1, 8).with_window(Some(50)),
            AttnSpec::new(1, 150, 4, 2, 12).with_window(Some(100)),
            AttnSpec::new(1, 67, 2, 2, 4).with_window(Some(1)),
            AttnSpec::new(1, 40, 3, 3, 6)
                .with_window(Some(200))
                .with_scale(0.3),
        ]
    }

    #[test]
    fn forward_matches_naive_reference() {
        for (n, s) in shapes().iter().enumerate() {
            let (q, k, v, _) = inputs(s, n as u64);
            let (out, lse) = run_forward(&q, &k, &v, s);
            let (want_out, want_lse) = naive_forward(&q, &k, &v, s);
            assert_close(&format!("out {s:?}"), &out, &want_out, 1e-5);
            assert_close(&format!("lse {s:?}"), &lse, &want_lse, 1e-5);
        }
    }

    #[test]
    fn backward_matches_naive_reference() {
        for (n, s) in shapes().iter().enumerate() {
            let (q, k, v, dout) = inputs(s, 100 + n as u64);
            let (dq, dk, dv) = run_backward(&q, &k, &v, &dout, s);
            let (wq, wk, wv) = naive_backward(&q, &k, &v, &dout, s);
            assert_close(&format!("dq {s:?}"), &dq, &wq, 2e-5);
            assert_close(&format!("dk {s:?}"), &dk, &wk, 2e-5);
            assert_close(&format!("dv {s:?}"), &dv, &wv, 2e-5);
        }
    }

    /// GPT-2's head size over two whole 64-key tiles and a partial one, so that the tile
    /// products take both the dense (AVX-512 f32 kernel) and the strided (`gemm`) route.
    #[test]
    fn gpt2_head_dim_tiles_match_naive_reference() {
        let s = AttnSpec::new(1, 140, 2, 1, 64);
        let (q, k, v, dout) = inputs(&s, 7);
        let (out, lse) = run_forward(&q, &k, &v, &s);
        let (want_out, want_lse) = naive_forward(&q, &k, &v, &s);
        assert_close("out", &out, &want_out, 1e-5);
        assert_close("lse", &lse, &want_lse, 1e-5);
        let (dq, dk, dv) = run_backward(&q, &k, &v, &dout, &s);
        let (wq, wk, wv) = naive_backward(&q, &k, &v, &dout, &s);
        assert_close("dq", &dq, &wq, 2e-5);
        assert_close("dk", &dk, &wk, 2e-5);
        assert_close("dv", &dv, &wv, 2e-5);
    }

    /// Central differences of `sum(w * out)` against the analytic gradients.
    fn check_finite_differences(specs: &[AttnSpec]) {
        for &s in specs {
            let (mut q, mut k, mut v, w) = inputs(&s, 7);
            let (dq, dk, dv) = run_backward(&q, &k, &v, &w, &s);
            let loss = |q: &[f32], k: &[f32], v: &[f32]| -> f64 {
                let (out, _) = run_forward(q, k, v, &s);
                out.iter().zip(&w).map(|(o, w)| *o as f64 * *w as f64).sum()
            };
            let eps = 1e-2;
            let (k0, v0) = (k.clone(), v.clone());
            let nq = numeric_grad(&mut q, eps, |q| loss(q, &k0, &v0));
            let q0 = q.clone();
            let nk = numeric_grad(&mut k, eps, |k| loss(&q0, k, &v0));
            let nv = numeric_grad(&mut v, eps, |v| loss(&q0, &k0, v));
            assert_grad_close("dq", &dq, &nq, 2e-3);
            assert_grad_close("dk", &dk, &nk, 2e-3);
            assert_grad_close("dv", &dv, &nv, 2e-3);
        }
    }

    #[test]
    fn gradients_match_finite_differences() {
        check_finite_differences(&[
            AttnSpec::new(1, 5, 4, 2, 4).with_window(Some(3)),
            AttnSpec::new(2, 4, 2, 1, 3),
        ]);
    }

    /// The shapes of [`shapes`] with probability dropout, a different key for each.
    fn dropout_shapes(p: f32) -> Vec<AttnSpec> {
        shapes()
            .into_iter()
            .enumerate()
            .map(|(n, s)| s.with_dropout(p, dropout_key(17, n as u64, 2)))
            .collect()
    }

    #[test]
    fn dropout_forward_and_backward_match_naive_reference() {
        for (n, s) in dropout_shapes(0.3).iter().enumerate() {
            let (q, k, v, dout) = inputs(s, 200 + n as u64);
            let (out, lse) = run_forward(&q, &k, &v, s);
            let (want_out, want_lse) = naive_forward(&q, &k, &v, s);
            assert_close(&format!("dropped out {s:?}"), &out, &want_out, 1e-5);
            // The logsumexp is that of the undropped scores.
            assert_close(&format!("dropped lse {s:?}"), &lse, &want_lse, 1e-5);
            let (dq, dk, dv) = run_backward(&q, &k, &v, &dout, s);
            let (wq, wk, wv) = naive_backward(&q, &k, &v, &dout, s);
            assert_close(&format!("dropped dq {s:?}"), &dq, &wq, 2e-5);
            assert_close(&format!("dropped dk {s:?}"), &dk, &wk, 2e-5);
            assert_close(&format!("dropped dv {s:?}"), &dv, &wv, 2e-5);
            // The reference without dropout differs, so the comparison above saw the mask.
            let undropped = AttnSpec {
                dropout: None,
                ..*s
            };
            let (plain, _) = naive_forward(&q, &k, &v, &undropped);
            let diff = plain
                .iter()
                .zip(&want_out)
                .fold(0.0f64, |m, (a, b)| m.max((a - b).abs()));
            assert!(diff > 1e-2, "{s:?}: dropout changed nothing ({diff})");
        }
    }

    #[test]
    fn dropout_gradients_match_finite_differences() {
        // The mask is a function of the key, so the dropped attention is deterministic and
        // differentiable; p = 0.5 drops enough that a wrong factor would show.
        let key = dropout_key(3, 1, 2);
        check_finite_differences(&[
            AttnSpec::new(1, 5, 4, 2, 4)
                .with_window(Some(3))
                .with_dropout(0.5, key),
            AttnSpec::new(2, 4, 2, 1, 3).with_dropout(0.2, key),
        ]);
    }

    #[test]
    fn dropout_keeps_a_fraction_one_minus_p_scaled_up() {
        // q = 0 makes row i uniform over its i + 1 keys, and one-hot values (D = T) make
        // out[i][j] = Z_ij / (i + 1): the mask itself, read through the kernel.
        let t = 128;
        for p in [0.1f32, 0.5] {
            let s = AttnSpec::new(1, t, 2, 2, t).with_dropout(p, dropout_key(5, 0, 2));
            let q = vec![0.0f32; s.q_len()];
            let mut v = vec![0.0f32; s.kv_len()];
            for j in 0..t {
                for h in 0..2 {
                    v[(j * 2 + h) * t + j] = 1.0;
                }
            }
            let (out, _) = run_forward(&q, &q, &v, &s);
            let scale = 1.0 / (1.0 - p);
            let (mut kept, mut visible) = (0usize, 0usize);
            for i in 0..t {
                for h in 0..2 {
                    let row = &out[(i * 2 + h) * t..(i * 2 + h + 1) * t];
                    assert!(row[i + 1..].iter().all(|&x| x == 0.0), "future key seen");
                    for &x in &row[..=i] {
                        visible += 1;
                        if x != 0.0 {
                            kept += 1;
                            let want = scale / (i + 1) as f32;
                            assert!((x - want).abs() < 1e-5 * want, "kept {x}, want {want}");
                        }
                    }
                }
            }
            let frac = kept as f64 / visible as f64;
            // 16512 Bernoulli draws: standard deviation at most 0.004; 5 sigma.
            assert!(
                (frac - (1.0 - p as f64)).abs() < 0.02,
                "p = {p}: kept {frac}"
            );
        }
    }

    #[test]
    fn dropout_is_deterministic_per_key_and_p_zero_is_exact() {
        let base = AttnSpec::new(2, 70, 4, 2, 16).with_window(Some(60));
        let (q, k, v, dout) = inputs(&base, 31);
        let s = base.with_dropout(0.25, dropout_key(9, 4, 2));
        let (out, lse) = run_forward(&q, &k, &v, &s);
        let (again, lse_again) = run_forward(&q, &k, &v, &s);
        assert_eq!(out, again);
        assert_eq!(lse, lse_again);
        assert_eq!(
            run_backward(&q, &k, &v, &dout, &s),
            run_backward(&q, &k, &v, &dout, &s)
        );
        let other = base.with_dropout(0.25, dropout_key(10, 4, 2));
        let (out_other, lse_other) = run_forward(&q, &k, &v, &other);
        assert_ne!(out, out_other);
        // Dropout leaves the normaliser alone.
        assert_eq!(lse, lse_other);

        // p = 0 is the dropout-free path, bit for bit, however it is spelled.
        let (plain, plain_lse) = run_forward(&q, &k, &v, &base);
        let zero = base.with_dropout(0.0, 123);
        assert_eq!(zero.dropout, None);
        let spelled = AttnSpec {
            dropout: Some((0.0, 123)),
            ..base
        };
        for z in [zero, spelled] {
            assert_eq!(
                run_forward(&q, &k, &v, &z),
                (plain.clone(), plain_lse.clone())
            );
            assert_eq!(
                run_backward(&q, &k, &v, &dout, &z),
                run_backward(&q, &k, &v, &dout, &base)
            );
        }
    }

    #[test]
    fn dropout_bf16_storage_close_to_f32() {
        let s = AttnSpec::new(2, 80, 4, 2, 16)
            .with_window(Some(70))
            .with_dropout(0.1, dropout_key(1, 2, 2));
        let (q, k, v, dout) = inputs(&s, 23);
        let to_bf = |x: &[f32]| x.iter().map(|v| bf16::from_f32(*v)).collect::<Vec<_>>();
        let to_f = |x: &[bf16]| x.iter().map(|v| v.to_f32()).collect::<Vec<_>>();
        let (qb, kb, vb, gb) = (to_bf(&q), to_bf(&k), to_bf(&v), to_bf(&dout));
        let (qf, kf, vf, gf) = (to_f(&qb), to_f(&kb), to_f(&vb), to_f(&gb));
        let (ob, _) = run_forward(&qb, &kb, &vb, &s);
        let (of, _) = run_forward(&qf, &kf, &vf, &s);
        let of64: Vec<f64> = of.iter().map(|x| *x as f64).collect();
        // As without dropout, plus the 1 / (1 - p) factor's growth of the values.
        assert_close("bf16 dropped out", &to_f(&ob), &of64, 5e-3);
        let (dqb, dkb, dvb) = run_backward(&qb, &kb, &vb, &gb, &s);
        let (dqf, dkf, dvf) = run_backward(&qf, &kf, &vf, &gf, &s);
        for (name, b, f) in [("dq", dqb, dqf), ("dk", dkb, dkf), ("dv", dvb, dvf)] {
            let f64s: Vec<f64> = f.iter().map(|x| *x as f64).collect();
            assert_grad_close(&format!("bf16 dropped {name}"), &to_f(&b), &f64s, 1e-2);
        }
    }

    #[test]
    fn bf16_storage_close_to_f32() {
        let s = AttnSpec::new(2, 80, 4, 2, 16).with_window(Some(70));
        let (q, k, v, dout) = inputs(&s, 21);
        let to_bf = |x: &[f32]| x.iter().map(|v| bf16::from_f32(*v)).collect::<Vec<_>>();
        let to_f = |x: &[bf16]| x.iter().map(|v| v.to_f32()).collect::<Vec<_>>();
        let (qb, kb, vb, gb) = (to_bf(&q), to_bf(&k), to_bf(&v), to_bf(&dout));
        // The f32 run sees the same bf16-rounded inputs, so the difference is the kernel's
        // own bf16 output rounding (2^-8 relative) plus, in backward, the rounded `out` in D_i.
        let (qf, kf, vf, gf) = (to_f(&qb), to_f(&kb), to_f(&vb), to_f(&gb));
        let (ob, _) = run_forward(&qb, &kb, &vb, &s);
        let (of, _) = run_forward(&qf, &kf, &vf, &s);
        let of64: Vec<f64> = of.iter().map(|x| *x as f64).collect();
        assert_close("bf16 out", &to_f(&ob), &of64, 4e-3);
        let (dqb, dkb, dvb) = run_backward(&qb, &kb, &vb, &gb, &s);
        let (dqf, dkf, dvf) = run_backward(&qf, &kf, &vf, &gf, &s);
        for (name, b, f) in [("dq", dqb, dqf), ("dk", dkb, dkf), ("dv", dvb, dvf)] {
            let f64s: Vec<f64> = f.iter().map(|x| *x as f64).collect();
            assert_grad_close(&format!("bf16 {name}"), &to_f(&b), &f64s, 1e-2);
        }
    }

    #[test]
    fn rope_then_attention_depends_only_on_relative_positions() {
        let s = AttnSpec::new(1, 20, 2, 1, 16).with_window(Some(12));
        let table = RopeTable::new(16, 10000.0, &RopeScaling::None, 200).unwrap();
        let (q, k, v, _) = inputs(&s, 9);
        let run = |positions: Positions<'_>| {
            let (mut q, mut k) = (q.clone(), k.clone());
            rope_forward(&mut q, &table, 1, s.seq, s.heads, positions).unwrap();
            rope_forward(&mut k, &table, 1, s.seq, s.kv_heads, positions).unwrap();
            run_forward(&q, &k, &v, &s)
        };
        let (out0, lse0) = run(Positions::Offset(0));
        let (out1, lse1) = run(Positions::Offset(137));
        let f = |x: &[f32]| x.iter().map(|v| *v as f64).collect::<Vec<_>>();
        assert_close("shifted out", &out1, &f(&out0), 2e-5);
        assert_close("shifted lse", &lse1, &f(&lse0), 2e-5);
        // Positions that are not a shift change relative distances, hence the output.
        let spread: Vec<usize> = (0..s.seq).map(|t| 3 * t).collect();
        let (out2, _) = run(Positions::Ids(&spread));
        let diff = out2
            .iter()
            .zip(&out0)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(
            diff > 1e-2,
            "non-shift positions should change the output (max diff {diff})"
        );
    }

    #[test]
    fn fast_exp_is_accurate() {
        let xs: Vec<f32> = (0..20_000).map(|i| -90.0 + i as f32 * 0.0046).collect();
        let mut got = xs.clone();
        exp_shifted(&mut got, 0.5);
        for (x, g) in xs.iter().zip(&got) {
            let want = ((*x - 0.5) as f64).exp();
            if *x - 0.5 <= -87.0 {
                assert_eq!(*g, 0.0);
            } else {
                let rel = (*g as f64 - want).abs() / want;
                assert!(
                    rel < 5e-7,
                    "exp({}) = {g}, want {want} (rel {rel:.1e})",
                    x - 0.5
                );
            }
        }
    }

    #[test]
    fn errors_name_the_problem() {
        let s = AttnSpec::new(1, 4, 3, 2, 4);
        let (mut out, mut lse) = (vec![0.0f32; 48], vec![0.0f32; 12]);
        let kv = vec![0.0f32; 32];
        let q = out.clone();
        let err = attention_forward(&mut out, &mut lse, &q, &kv, &kv, &s).unwrap_err();
        assert_eq!(
            err,
            AttentionError::Heads {
                heads: 3,
                kv_heads: 2
            }
        );
        assert!(err.to_string().contains("num_key_value_heads (2)"));
        let s = AttnSpec::new(1, 4, 2, 2, 4).with_window(Some(0));
        let q = vec![0.0f32; 32];
        let (mut out, mut lse) = (vec![0.0f32; 32], vec![0.0f32; 8]);
        assert_eq!(
            attention_forward(&mut out, &mut lse, &q, &q, &q, &s),
            Err(AttentionError::ZeroWindow)
        );
        let s = s.with_window(None);
        for p in [1.0, -0.1, f32::NAN] {
            let err = attention_forward(&mut out, &mut lse, &q, &q, &q, &s.with_dropout(p, 0))
                .unwrap_err();
            assert!(
                matches!(err, AttentionError::DropoutProbability { .. }),
                "p = {p}: {err}"
            );
            assert!(err.to_string().contains("must be in [0, 1)"), "{err}");
        }
        let err = attention_forward(&mut out, &mut lse, &q, &q[..31], &q, &s).unwrap_err();
        assert_eq!(
            err,
            AttentionError::Shape {
                what: "attention k [B, T, KVH, D]",
                expected: 32,
                got: 31
            }
        );
    }

    /// `cargo test -p rustspeed-kernels --release attention_timing -- --ignored --nocapture`
    #[test]
    #[ignore]
    fn attention_timing() {
        fn time<T: Float>(name: &str, p: f32) {
            let s = AttnSpec::new(4, 512, 12, 12, 64).with_dropout(p, dropout_key(1, 1, 2));
            let (q, k, v, dout) = inputs(&s, 1);
            let c = |x: &[f32]| x.iter().map(|v| T::from_f32(*v)).collect::<Vec<_>>();
            let (q, k, v, dout) = (c(&q), c(&k), c(&v), c(&dout));
            let (mut out, mut lse) = (vec![T::default(); s.q_len()], vec![0.0; s.lse_len()]);
            let (mut dq, mut dk, mut dv) = (
                vec![T::default(); s.q_len()],
                vec![T::default(); s.kv_len()],
                vec![T::default(); s.kv_len()],
            );
            let (mut fwd, mut bwd) = (f64::MAX, f64::MAX);
            for _ in 0..5 {
                let t0 = std::time::Instant::now();
                attention_forward(&mut out, &mut lse, &q, &k, &v, &s).unwrap();
                let t1 = std::time::Instant::now();
                attention_backward(&mut dq, &mut dk, &mut dv, &dout, &q, &k, &v, &out, &lse, &s)
                    .unwrap();
                let t2 = std::time::Instant::now();
                fwd = fwd.min((t1 - t0).as_secs_f64());
                bwd = bwd.min((t2 - t1).as_secs_f64());
            }
            println!(
                "attention {name} B=4 T=512 H=12 D=64 dropout {p}, {} threads: forward {:.1} ms, \
                 backward {:.1} ms",
                rayon::current_num_threads(),
                fwd * 1e3,
                bwd * 1e3
            );
        }
        time::<f32>("f32", 0.0);
        time::<bf16>("bf16", 0.0);
        time::<f32>("f32", 0.1);
    }
}
