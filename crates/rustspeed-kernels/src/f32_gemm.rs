//! f32 x f32 -> f32 matrix multiply with AVX-512 FMA, for CPUs that run 512-bit FMAs at full
//! width.
//!
//! On this project's reference machine (AMD EPYC, family 26 / Zen 5, 2 vCPUs) a register-only
//! FMA loop runs at ~135 GFLOP/s per core with 256-bit vectors and ~270 with 512-bit ones, and
//! the `gemm` crate (0.19) enables its AVX-512 kernels only with a nightly feature: its AVX2
//! microkernel was 84% of a GPT-2 124M f32 step at ~95% of the 256-bit peak. This kernel has
//! the layout of [`crate::bf16_gemm`] with one f32 per word instead of a bf16 pair: the left
//! operand as `[k][MR]` micro-panels (read in place when its rows are k-contiguous), the right
//! one as `[k][NR]` panels packed per task, an `MR x NR` register tile over the whole
//! reduction. Every output is summed in k order whatever the thread split, so results do not
//! depend on the thread count.

use std::cell::Cell;
use std::thread::LocalKey;

use rayon::prelude::*;

/// Rows of the register tile: 6 x 4 accumulators + 4 right-operand vectors + 1 broadcast
/// fit the 32 zmm registers.
const MR: usize = 6;
/// Columns of the register tile (four 16-lane vectors).
const NR: usize = 64;
/// A right operand whose packed form fits this is packed whole up front.
const SMALL_RIGHT_BYTES: usize = 512 << 10;
/// Below this many multiply-adds the rayon fork/join costs more than it saves.
const PARALLEL_MIN_MACS: usize = 1 << 18;
/// A transposed left operand above this many elements is swapped to the right (see
/// `matmul_f32`).
const SWAP_LEFT_ELEMS: usize = 1 << 24;
/// Reduction block of a column panel whose packed form would not stay in L2 (256 KiB).
const KC: usize = 1024;
/// Largest packing buffer kept for the next call.
const KEEP_PACKED_BYTES: usize = 64 << 20;

/// Whether this CPU has AVX-512F (checked once, then cached by std).
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `dst[m, n] = op(a)[m, k] · op(b)[k, n]`, or `+=` when `accumulate`; the contract of
/// [`crate::matmul::matmul`] for f32 operands. Panics when [`available`] is false.
#[allow(clippy::too_many_arguments)]
pub fn matmul_f32(
    dst: &mut [f32],
    a: &[f32],
    b: &[f32],
    m: usize,
    k: usize,
    n: usize,
    trans_a: bool,
    trans_b: bool,
    accumulate: bool,
) {
    let parallel = rayon::current_num_threads() > 1
        && m.saturating_mul(n).saturating_mul(k) >= PARALLEL_MIN_MACS;
    matmul_f32_on(dst, a, b, [m, k, n], trans_a, trans_b, accumulate, parallel);
}

/// [`matmul_f32`] on the calling thread only: for small products inside tasks that are
/// already parallel (the attention tiles), where a nested fork/join would cost more than the
/// product.
#[allow(clippy::too_many_arguments)]
pub fn matmul_f32_serial(
    dst: &mut [f32],
    a: &[f32],
    b: &[f32],
    m: usize,
    k: usize,
    n: usize,
    trans_a: bool,
    trans_b: bool,
    accumulate: bool,
) {
    matmul_f32_on(dst, a, b, [m, k, n], trans_a, trans_b, accumulate, false);
}

#[allow(clippy::too_many_arguments)]
fn matmul_f32_on(
    dst: &mut [f32],
    a: &[f32],
    b: &[f32],
    [m, k, n]: [usize; 3],
    trans_a: bool,
    trans_b: bool,
    accumulate: bool,
    parallel: bool,
) {
    assert_eq!(
        dst.len(),
        m * n,
        "matmul_f32: dst has {} elements, expected m*n = {m}*{n}",
        dst.len()
    );
    assert_eq!(
        a.len(),
        m * k,
        "matmul_f32: a has {} elements, expected m*k = {m}*{k}",
        a.len()
    );
    assert_eq!(
        b.len(),
        k * n,
        "matmul_f32: b has {} elements, expected k*n = {k}*{n}",
        b.len()
    );
    assert!(
        available(),
        "matmul_f32: this CPU lacks avx512f; check f32_gemm::available() first"
    );
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            dst.fill(0.0);
        }
        return;
    }
    // As in bf16_gemm: C^T = op(b)^T op(a)^T when both are transposed, so that the left
    // operand reads in place and C is otherwise written row-major with vector stores. Also when
    // a transposed left operand is huge (the LM head's dW = dlogits^T h, 50k x 512): packed
    // whole it is 103 MB streamed once per column panel; swapped, the small h^T is the packed
    // left and dlogits streams once, at the price of C^T's scalar (f32, no rounding) stores.
    let swap = trans_a && (trans_b || m * k > SWAP_LEFT_ELEMS);
    let problem = if swap {
        Problem {
            l: b,
            l_trans: !trans_b,
            r: a,
            r_trans: !trans_a,
            m: n,
            k,
            n: m,
            transposed_dst: true,
        }
    } else {
        Problem {
            l: a,
            l_trans: trans_a,
            r: b,
            r_trans: trans_b,
            m,
            k,
            n,
            transposed_dst: false,
        }
    };
    run(&problem, &DstPtr(dst.as_mut_ptr()), accumulate, parallel);
}

struct Problem<'a> {
    l: &'a [f32],
    l_trans: bool,
    r: &'a [f32],
    r_trans: bool,
    m: usize,
    k: usize,
    n: usize,
    transposed_dst: bool,
}

struct DstPtr(*mut f32);
// SAFETY: each task writes only its own tiles of the destination.
unsafe impl Sync for DstPtr {}
unsafe impl Send for DstPtr {}

thread_local! {
    static PACKED_LEFT: Cell<Vec<f32>> = const { Cell::new(Vec::new()) };
    static PACKED_RIGHT: Cell<Vec<f32>> = const { Cell::new(Vec::new()) };
    static PACKED_PANEL: Cell<Vec<f32>> = const { Cell::new(Vec::new()) };
}

/// A packing buffer reused across calls (see bf16_gemm's `PackBuffer`): the packers write
/// every element, so stale contents need no clearing.
struct PackBuffer {
    buf: Vec<f32>,
    len: usize,
    home: &'static LocalKey<Cell<Vec<f32>>>,
}

impl PackBuffer {
    fn take(home: &'static LocalKey<Cell<Vec<f32>>>, len: usize) -> Self {
        let mut buf = home.with(Cell::take);
        if buf.len() < len {
            buf.resize(len, 0.0);
        }
        PackBuffer { buf, len, home }
    }
}

impl Drop for PackBuffer {
    fn drop(&mut self) {
        if self.buf.capacity() * 4 <= KEEP_PACKED_BYTES {
            let v = std::mem::take(&mut self.buf);
            self.home.with(|c| c.set(v));
        }
    }
}

impl std::ops::Deref for PackBuffer {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        &self.buf[..self.len]
    }
}

impl std::ops::DerefMut for PackBuffer {
    fn deref_mut(&mut self) -> &mut [f32] {
        &mut self.buf[..self.len]
    }
}

fn run(p: &Problem, out: &DstPtr, accumulate: bool, parallel: bool) {
    let (m, k, n) = (p.m, p.k, p.n);
    let m_panels = m.div_ceil(MR);
    let n_panels = n.div_ceil(NR);
    // Whole row panels of a k-contiguous left operand are read in place; the rest is packed.
    let first_packed = if p.l_trans { 0 } else { m / MR };
    let mut packed = PackBuffer::take(&PACKED_LEFT, (m_panels - first_packed) * k * MR);
    let pack_panel =
        |(i, buf): (usize, &mut [f32])| pack_a(buf, p.l, m, k, (first_packed + i) * MR, p.l_trans);
    if parallel {
        packed
            .par_chunks_mut(k * MR)
            .enumerate()
            .for_each(pack_panel);
    } else {
        packed.chunks_mut(k * MR).enumerate().for_each(pack_panel);
    }
    // Row panel `ip`: (pointer, row stride, k stride).
    let left = |ip: usize| -> (*const f32, usize, usize) {
        if ip >= first_packed {
            (
                packed[(ip - first_packed) * k * MR..][..k * MR].as_ptr(),
                1,
                MR,
            )
        } else {
            (p.l[ip * MR * k..][..MR * k].as_ptr(), k, 1)
        }
    };
    let tile_job = |ip: usize, jp: usize, r_panel: &[f32]| {
        let mut tile = [[0f32; NR]; MR];
        let (lp, rs, ks) = left(ip);
        // SAFETY: available() was asserted by matmul_f32; `left` addresses MR rows of k
        // elements with these strides, r_panel holds k * NR.
        unsafe { microkernel(k, lp, rs, ks, r_panel, &mut tile) };
        let at = (ip * MR, jp * NR, MR.min(m - ip * MR), NR.min(n - jp * NR));
        // SAFETY: tasks own disjoint tiles of C, clipped to it.
        unsafe { store_tile(out, p, at, &tile, accumulate) };
    };
    let threads = rayon::current_num_threads();
    let for_each_task = |tasks: usize, job: &(dyn Fn(usize) + Sync)| {
        if parallel {
            (0..tasks).into_par_iter().for_each(job);
        } else {
            (0..tasks).for_each(job);
        }
    };
    if n_panels * k * NR * 4 <= SMALL_RIGHT_BYTES {
        let mut packed_r = PackBuffer::take(&PACKED_RIGHT, n_panels * k * NR);
        packed_r
            .chunks_mut(k * NR)
            .enumerate()
            .for_each(|(jp, buf)| pack_b(buf, p.r, k, n, jp * NR, p.r_trans));
        let splits = if parallel {
            (16 * threads).min(m_panels)
        } else {
            1
        };
        let per_split = m_panels.div_ceil(splits);
        for_each_task(splits, &|t| {
            for ip in t * per_split..((t + 1) * per_split).min(m_panels) {
                for (jp, r_panel) in packed_r.chunks_exact(k * NR).enumerate() {
                    tile_job(ip, jp, r_panel);
                }
            }
        });
    } else {
        let row_splits = if parallel {
            (4 * threads).div_ceil(n_panels).clamp(1, m_panels)
        } else {
            1
        };
        let per_split = m_panels.div_ceil(row_splits);
        for_each_task(n_panels * row_splits, &|t| {
            let (jp, split) = (t / row_splits, t % row_splits);
            let mut r_buf = PackBuffer::take(&PACKED_PANEL, k * NR);
            pack_b(&mut r_buf, p.r, k, n, jp * NR, p.r_trans);
            let panels = split * per_split..((split + 1) * per_split).min(m_panels);
            if k <= KC {
                panels.for_each(|ip| tile_job(ip, jp, &r_buf));
                return;
            }
            // A long reduction (the LM head's dh, k = vocabulary): a whole packed panel is
            // k * NR * 4 bytes (12.8 MB at k = 50k) and would stream from memory once per row
            // panel; in KC blocks each block stays in L2 for all row panels, and the tiles'
            // partial sums wait in a task-local buffer so C is still written once.
            let mut sums = vec![[[0f32; NR]; MR]; panels.len()];
            for k0 in (0..k).step_by(KC) {
                let kc = KC.min(k - k0);
                let block = &r_buf[k0 * NR..(k0 + kc) * NR];
                for (sum, ip) in sums.iter_mut().zip(panels.clone()) {
                    let mut tile = [[0f32; NR]; MR];
                    let (lp, rs, ks) = left(ip);
                    // SAFETY: as in tile_job, with the row panel's pointer advanced to k0
                    // (k0 + kc <= k) and `block` holding kc * NR.
                    unsafe { microkernel(kc, lp.add(k0 * ks), rs, ks, block, &mut tile) };
                    for (s_row, t_row) in sum.iter_mut().zip(&tile) {
                        s_row.iter_mut().zip(t_row).for_each(|(s, t)| *s += t);
                    }
                }
            }
            for (sum, ip) in sums.iter().zip(panels) {
                let at = (ip * MR, jp * NR, MR.min(m - ip * MR), NR.min(n - jp * NR));
                // SAFETY: tasks own disjoint tiles of C, clipped to it.
                unsafe { store_tile(out, p, at, sum, accumulate) };
            }
        });
    }
}

/// Packs rows `i0..i0 + MR` of `op(a)` as `[k][MR]`; rows past `m` are zero.
fn pack_a(out: &mut [f32], a: &[f32], m: usize, k: usize, i0: usize, trans_a: bool) {
    let rows = MR.min(m - i0);
    if rows < MR {
        out.fill(0.0);
    }
    if trans_a {
        // a is [k, m]: MR adjacent elements per k.
        for p in 0..k {
            out[p * MR..][..rows].copy_from_slice(&a[p * m + i0..][..rows]);
        }
    } else {
        for r in 0..rows {
            for (p, &v) in a[(i0 + r) * k..][..k].iter().enumerate() {
                out[p * MR + r] = v;
            }
        }
    }
}

/// Packs columns `j0..j0 + NR` of `op(b)` as `[k][NR]`; columns past `n` are zero.
fn pack_b(out: &mut [f32], b: &[f32], k: usize, n: usize, j0: usize, trans_b: bool) {
    let cols = NR.min(n - j0);
    if cols < NR {
        out.fill(0.0);
    }
    if trans_b {
        #[cfg(target_arch = "x86_64")]
        if cols == NR {
            // SAFETY: matmul_f32 asserted avx512f.
            return unsafe { pack_b_trans_full(out, b, k, j0) };
        }
        // b is [n, k]: column c of op(b) is stored row j0 + c.
        for c in 0..cols {
            for (p, &v) in b[(j0 + c) * k..][..k].iter().enumerate() {
                out[p * NR + c] = v;
            }
        }
    } else {
        for p in 0..k {
            out[p * NR..][..cols].copy_from_slice(&b[p * n + j0..][..cols]);
        }
    }
}

/// The transposing pack of a whole panel, 16 x 16 blocks transposed in registers.
///
/// # Safety
/// The CPU must support avx512f; `b` is `[n, k]` with `j0 + NR <= n`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn pack_b_trans_full(out: &mut [f32], b: &[f32], k: usize, j0: usize) {
    use std::arch::x86_64::*;
    assert!(out.len() >= k * NR && b.len() >= (j0 + NR) * k);
    let blocks = k / 16;
    for blk in 0..blocks {
        let p0 = blk * 16;
        for c0 in (0..NR).step_by(16) {
            let mut rows = [_mm512_setzero_si512(); 16];
            for (i, row) in rows.iter_mut().enumerate() {
                let seg = &b[(j0 + c0 + i) * k + p0..][..16];
                // SAFETY: seg holds 16 f32.
                *row = unsafe { _mm512_loadu_si512(seg.as_ptr().cast()) };
            }
            for (q, v) in crate::bf16_gemm::transpose_16x16(rows)
                .into_iter()
                .enumerate()
            {
                let dst = &mut out[(p0 + q) * NR + c0..][..16];
                // SAFETY: dst holds 16 f32.
                unsafe { _mm512_storeu_si512(dst.as_mut_ptr().cast(), v) };
            }
        }
    }
    for c in 0..NR {
        for p in blocks * 16..k {
            out[p * NR + c] = b[(j0 + c) * k + p];
        }
    }
}

/// Adds (or writes) the valid `rows x cols` corner of `tile` into C at `(i0, j0)`.
///
/// # Safety
/// `dst` must point to C (`[p.m, p.n]`, or its transpose when `p.transposed_dst`) containing
/// the clipped tile, which no other thread touches meanwhile.
unsafe fn store_tile(
    dst: &DstPtr,
    p: &Problem,
    (i0, j0, rows, cols): (usize, usize, usize, usize),
    tile: &[[f32; NR]; MR],
    accumulate: bool,
) {
    for (r, t) in tile.iter().enumerate().take(rows) {
        if !p.transposed_dst {
            // SAFETY: the row's `cols` outputs lie inside C and are this task's alone.
            let d = unsafe { std::slice::from_raw_parts_mut(dst.0.add((i0 + r) * p.n + j0), cols) };
            if accumulate {
                d.iter_mut().zip(t).for_each(|(d, v)| *d += v);
            } else {
                d.copy_from_slice(&t[..cols]);
            }
            continue;
        }
        for (c, &v) in t.iter().enumerate().take(cols) {
            // SAFETY: (i0 + r, j0 + c) of C^T lies inside C and is this task's alone.
            let d = unsafe { &mut *dst.0.add((j0 + c) * p.m + i0 + r) };
            *d = if accumulate { *d + v } else { v };
        }
    }
}

/// `tile = Σ_p a[:, p] ⊗ b[p, :]` over `k`, in registers; element `(r, p)` of the left row
/// panel is at `a + r * rs + p * ks`.
///
/// # Safety
/// The CPU must support avx512f; `a` addresses MR rows of k as described; `b` holds k * NR.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn microkernel(
    k: usize,
    a: *const f32,
    rs: usize,
    ks: usize,
    b: &[f32],
    tile: &mut [[f32; NR]; MR],
) {
    use std::arch::x86_64::*;
    const NV: usize = NR / 16;
    assert!(b.len() >= k * NR);
    let b = b.as_ptr();
    let mut acc = [[_mm512_setzero_ps(); NV]; MR];
    for p in 0..k {
        let mut bv = [_mm512_setzero_ps(); NV];
        for (v, reg) in bv.iter_mut().enumerate() {
            // SAFETY: p < k and v * 16 + 16 <= NR, inside b.
            *reg = unsafe { _mm512_loadu_ps(b.add(p * NR + v * 16)) };
        }
        for (r, acc_r) in acc.iter_mut().enumerate() {
            // SAFETY: r < MR and p < k, inside a by the caller's guarantee.
            let av = _mm512_set1_ps(unsafe { *a.add(r * rs + p * ks) });
            for (x, &bvv) in acc_r.iter_mut().zip(&bv) {
                *x = _mm512_fmadd_ps(av, bvv, *x);
            }
        }
    }
    for (t, acc_r) in tile.iter_mut().zip(&acc) {
        for (v, &x) in acc_r.iter().enumerate() {
            // SAFETY: 16 floats at v * 16 lie inside the NR-wide row.
            unsafe { _mm512_storeu_ps(t.as_mut_ptr().add(v * 16), x) };
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn microkernel(
    _: usize,
    _: *const f32,
    _: usize,
    _: usize,
    _: &[f32],
    _: &mut [[f32; NR]; MR],
) {
    unreachable!("matmul_f32 asserts available(), which is false off x86_64")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::*;

    #[allow(clippy::too_many_arguments)]
    fn naive(a: &[f32], b: &[f32], m: usize, k: usize, n: usize, ta: bool, tb: bool) -> Vec<f64> {
        let mut out = vec![0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                out[i * n + j] = (0..k)
                    .map(|p| {
                        let av = if ta { a[p * m + i] } else { a[i * k + p] };
                        let bv = if tb { b[j * k + p] } else { b[p * n + j] };
                        av as f64 * bv as f64
                    })
                    .sum();
            }
        }
        out
    }

    /// Every transpose combination against an f64 reference, with sizes straddling MR, NR, the
    /// 16-wide transposing pack, the small-right-operand path and the column-panel path, both
    /// overwriting (NaN garbage must not leak) and accumulating; and the same bits with one
    /// thread as with two.
    #[test]
    fn all_transposes_match_f64_reference_and_thread_counts() {
        if !available() {
            eprintln!("skipped: no avx512f on this CPU");
            return;
        }
        let mut rng = Rng::new(93);
        let one = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap();
        let two = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap();
        for &(m, k, n) in &[
            (1, 1, 1),
            (7, 13, 5),
            (6, 16, 64),
            (13, 67, 65),
            (33, 70, 129),
            (40, 1000, 301),
            (130, 33, 200),
            // A long reduction with a large right operand: KC blocks (two whole, one partial).
            (13, 2 * KC + 452, 70),
            // A transposed left operand above SWAP_LEFT_ELEMS: computed as C^T.
            (SWAP_LEFT_ELEMS / 1024 + 1, 1024, 3),
        ] {
            for ta in [false, true] {
                for tb in [false, true] {
                    let (a, b) = (rng.vec(m * k, 1.0), rng.vec(k * n, 1.0));
                    let want = naive(&a, &b, m, k, n, ta, tb);
                    let what = format!("{m}x{k}x{n} ta={ta} tb={tb}");
                    let mut d = vec![f32::NAN; m * n];
                    two.install(|| matmul_f32(&mut d, &a, &b, m, k, n, ta, tb, false));
                    let tol = 2e-7 * k as f64;
                    assert_close(&what, &d, &want, tol);
                    let mut d1 = vec![f32::NAN; m * n];
                    one.install(|| matmul_f32(&mut d1, &a, &b, m, k, n, ta, tb, false));
                    assert!(
                        d.iter().zip(&d1).all(|(x, y)| x.to_bits() == y.to_bits()),
                        "{what}: 1 and 2 threads differ"
                    );
                    let init = rng.vec(m * n, 4.0);
                    let mut acc = init.clone();
                    two.install(|| matmul_f32(&mut acc, &a, &b, m, k, n, ta, tb, true));
                    let want_acc: Vec<f64> =
                        want.iter().zip(&init).map(|(w, i)| w + *i as f64).collect();
                    assert_close(&format!("{what} accumulate"), &acc, &want_acc, tol);
                }
            }
        }
    }
}
