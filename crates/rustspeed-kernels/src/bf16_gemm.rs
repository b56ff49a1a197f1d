//! bf16 x bf16 -> f32 matrix multiply on the AVX512_BF16 dot-product instruction (`vdpbf16ps`).
//!
//! `vdpbf16ps` multiplies 16 lanes of bf16 *pairs* and adds both products to 16 f32 lanes, so
//! both operands are packed with two consecutive reduction (k) elements per 32-bit word:
//! the left operand as micro-panels of `MR` rows (`[k/2][MR]` words, each broadcast to a
//! whole register), the right one as micro-panels of `NR` columns (`[k/2][NR]` words, loaded
//! as `NR / 16` registers). The microkernel keeps an `MR x NR` f32 tile in registers over the
//! whole reduction, so a destination element is written once.
//!
//! The left operand (the activation side in every layer) is packed whole; the right one (the
//! weight side, possibly the 50k-row LM head) one `NR`-column panel at a time inside each rayon
//! task, so a large weight is never duplicated whole and its packed panel stays in L1/L2 while
//! every row panel streams past it.
//!
//! Every output element is summed in the same order, pair by pair along k, whatever the thread
//! count or task split, so results are bit-identical across thread counts. The instruction
//! flushes subnormal inputs and outputs to zero (values below ~1.2e-38), unlike the f32 path.

use std::cell::Cell;
use std::thread::LocalKey;

use half::bf16;
use rayon::prelude::*;

use crate::dtype::Float;

/// Rows of the register tile: `MR * NR / 16` accumulators plus `NR / 16` loaded right-operand
/// vectors and one broadcast must fit the 32 zmm registers.
const MR: usize = 6;
/// Columns of the register tile (four 16-lane f32 vectors).
const NR: usize = 64;
/// A right operand whose packed form fits this (half of L2) is packed whole up front.
const SMALL_RIGHT_BYTES: usize = 512 << 10;
/// Below this many multiply-adds the rayon fork/join costs more than it saves.
const PARALLEL_MIN_MACS: usize = 1 << 18;

/// Whether this CPU has the instructions [`matmul_bf16`] needs (checked once, then cached by std).
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `dst[m, n] = op(a)[m, k] · op(b)[k, n]`, or `+=` when `accumulate`, for bf16 operands.
///
/// Same contract as [`crate::matmul::matmul`]: `op(a)` is `a` stored `[m, k]` or, with
/// `trans_a`, the transpose of `a` stored `[k, m]`; `op(b)` is `b` stored `[k, n]` or, with
/// `trans_b`, the transpose of `[n, k]`. Products are summed in f32 and added to the f32 value
/// of `dst` when accumulating; a non-f32 `dst` is rounded once.
///
/// # Panics
/// On shape mismatches, and when [`available`] is false.
#[allow(clippy::too_many_arguments)]
pub fn matmul_bf16<D: Float>(
    dst: &mut [D],
    a: &[bf16],
    b: &[bf16],
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
        "matmul_bf16: dst has {} elements, expected m*n = {m}*{n}",
        dst.len()
    );
    assert_eq!(
        a.len(),
        m * k,
        "matmul_bf16: a has {} elements, expected m*k = {m}*{k}",
        a.len()
    );
    assert_eq!(
        b.len(),
        k * n,
        "matmul_bf16: b has {} elements, expected k*n = {k}*{n}",
        b.len()
    );
    assert!(
        available(),
        "matmul_bf16: this CPU lacks avx512bf16; check bf16_gemm::available() first"
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
    let (a, b) = (bits(a), bits(b));
    let parallel = rayon::current_num_threads() > 1
        && m.saturating_mul(n).saturating_mul(k) >= PARALLEL_MIN_MACS;
    // The left operand is read in place when its rows are k-contiguous; the right one is packed
    // per column panel, once per task. Computing C^T = op(b)^T op(a)^T instead swaps the roles
    // so that the left operand can be read in place, but C^T is then written column by column
    // with scalar stores (and bf16 roundings): for the input gradients `dy · W^T` of GPT-2's
    // layers that cost more than packing W^T (mlp_proj's 5.7 -> 3.0-3.5 ms, best of 15, and
    // 5% of a bf16 step), and the LM head's logits were no faster swapped (56-62 vs 57 ms).
    // So only a product with both operands transposed swaps (its left then reads in place).
    let swap = trans_b && trans_a;
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

/// `C[m, n] = L[m, k] · R[k, n]` with `L` stored `[m, k]` (or `[k, m]` when `l_trans`) and `R`
/// stored `[k, n]` (or `[n, k]` when `r_trans`); `C` is the destination, or its transpose
/// when `transposed_dst`.
struct Problem<'a> {
    l: &'a [u16],
    l_trans: bool,
    r: &'a [u16],
    r_trans: bool,
    m: usize,
    k: usize,
    n: usize,
    transposed_dst: bool,
}

fn run<D: Float>(p: &Problem, out: &DstPtr<D>, accumulate: bool, parallel: bool) {
    let (m, k, n) = (p.m, p.k, p.n);
    let k2 = k.div_ceil(2);
    let m_panels = m.div_ceil(MR);
    let n_panels = n.div_ceil(NR);
    // In-place rows need whole pairs (even k) and MR real rows; other row panels are packed.
    let in_place = !p.l_trans && k % 2 == 0;
    let first_packed = if in_place { m / MR } else { 0 };
    let mut packed = PackBuffer::take(&PACKED_LEFT, (m_panels - first_packed) * k2 * MR);
    let pack_panel =
        |(i, buf): (usize, &mut [u32])| pack_a(buf, p.l, m, k, (first_packed + i) * MR, p.l_trans);
    if parallel {
        packed
            .par_chunks_mut(k2 * MR)
            .enumerate()
            .for_each(pack_panel);
    } else {
        packed.chunks_mut(k2 * MR).enumerate().for_each(pack_panel);
    }
    // Where row panel `ip` is read: (pointer, row stride, pair stride), in u16 units.
    let left = |ip: usize| -> (*const u16, usize, usize) {
        if ip >= first_packed {
            let panel = &packed[(ip - first_packed) * k2 * MR..][..k2 * MR];
            (panel.as_ptr().cast::<u16>(), 2, 2 * MR)
        } else {
            (p.l[ip * MR * k..][..MR * k].as_ptr(), k, 2)
        }
    };

    let tile_job = |ip: usize, jp: usize, r_panel: &[u32]| {
        let mut tile = [[0f32; NR]; MR];
        let (lp, rs, ps) = left(ip);
        // SAFETY: available() was asserted by the caller; `left` addresses MR rows of k2
        // pairs (in place only for full panels of even k), r_panel holds k2 * NR words.
        unsafe { microkernel(k2, lp, rs, ps, r_panel, &mut tile) };
        let at = Tile {
            i0: ip * MR,
            j0: jp * NR,
            rows: MR.min(m - ip * MR),
            cols: NR.min(n - jp * NR),
        };
        // SAFETY: tasks own disjoint (row panel, column panel) tiles of C, which is the
        // [m, n] destination or its transpose; the tile is clipped to it.
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

    if n_panels * k2 * NR * 4 <= SMALL_RIGHT_BYTES {
        // A small right operand (the activations against the LM head's 50k rows) is packed
        // whole and stays in L2, and tasks split the rows: the large left operand then
        // streams from memory once instead of once per column panel.
        let mut packed_r = PackBuffer::take(&PACKED_RIGHT, n_panels * k2 * NR);
        packed_r
            .chunks_mut(k2 * NR)
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
                for (jp, r_panel) in packed_r.chunks_exact(k2 * NR).enumerate() {
                    tile_job(ip, jp, r_panel);
                }
            }
        });
    } else {
        // Tasks are column panels, each packed once into a task-local buffer that stays in
        // L2 while every row panel streams past it; when there are too few panels to keep
        // every thread busy the rows are split too (each split repacks its panel).
        let row_splits = if parallel {
            (4 * threads).div_ceil(n_panels).clamp(1, m_panels)
        } else {
            1
        };
        let per_split = m_panels.div_ceil(row_splits);
        for_each_task(n_panels * row_splits, &|t| {
            let (jp, split) = (t / row_splits, t % row_splits);
            let mut r_buf = PackBuffer::take(&PACKED_PANEL, k2 * NR);
            pack_b(&mut r_buf, p.r, k, n, jp * NR, p.r_trans);
            for ip in split * per_split..((split + 1) * per_split).min(m_panels) {
                tile_job(ip, jp, &r_buf);
            }
        });
    }
}

/// Largest packed left operand kept for the next call (the GPT-2 LM head's dlogits, 512 rows of
/// a 50k vocabulary, are 51 MB).
const KEEP_PACKED_BYTES: usize = 64 << 20;

thread_local! {
    /// Packing buffers reused across calls: the calling thread's packed left operand and
    /// whole packed right operand, and each worker's packed column panel.
    static PACKED_LEFT: Cell<Vec<u32>> = const { Cell::new(Vec::new()) };
    static PACKED_RIGHT: Cell<Vec<u32>> = const { Cell::new(Vec::new()) };
    static PACKED_PANEL: Cell<Vec<u32>> = const { Cell::new(Vec::new()) };
}

/// A packing buffer taken from one of the thread-local cells above and given back on drop. Its
/// stale contents need no clearing: `pack_a` and `pack_b` write every word, padding included.
/// A fresh `vec![0; n]` per call cost a memset and, above malloc's mmap threshold, a page fault
/// per 4 KiB (~3% of a bf16 GPT-2 step). A nested call on the same thread finds the cell empty
/// and allocates.
/// Only its first `len` words are in use; it never shrinks, so that a large call after a small
/// one does not zero the difference again.
struct PackBuffer {
    buf: Vec<u32>,
    len: usize,
    home: &'static LocalKey<Cell<Vec<u32>>>,
}

impl PackBuffer {
    fn take(home: &'static LocalKey<Cell<Vec<u32>>>, len: usize) -> Self {
        let mut buf = home.with(Cell::take);
        if buf.len() < len {
            buf.resize(len, 0);
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
    type Target = [u32];
    fn deref(&self) -> &[u32] {
        &self.buf[..self.len]
    }
}

impl std::ops::DerefMut for PackBuffer {
    fn deref_mut(&mut self) -> &mut [u32] {
        &mut self.buf[..self.len]
    }
}

/// Where a register tile lands in C, and how much of it is real.
#[derive(Clone, Copy)]
struct Tile {
    i0: usize,
    j0: usize,
    rows: usize,
    cols: usize,
}

/// The destination pointer shared by tasks that write disjoint tiles.
struct DstPtr<D>(*mut D);
// SAFETY: each task writes only its own tile (see matmul_bf16), so sharing the pointer is sound.
unsafe impl<D: Send> Sync for DstPtr<D> {}
unsafe impl<D: Send> Send for DstPtr<D> {}

fn bits(s: &[bf16]) -> &[u16] {
    // SAFETY: bf16 is a transparent wrapper over its u16 bits.
    unsafe { std::slice::from_raw_parts(s.as_ptr().cast::<u16>(), s.len()) }
}

/// One 32-bit word as `vdpbf16ps` reads it: element `2i` in the low half, `2i + 1` in the high.
fn pair(lo: u16, hi: u16) -> u32 {
    lo as u32 | (hi as u32) << 16
}

/// Packs rows `i0..i0 + MR` of `op(a)` as `[k2][MR]` words; rows past `m` and the odd k
/// element past the end are zero, so they add exact zeros.
fn pack_a(out: &mut [u32], a: &[u16], m: usize, k: usize, i0: usize, trans_a: bool) {
    let rows = MR.min(m - i0);
    let full = k / 2;
    if rows < MR || k % 2 == 1 {
        out.fill(0);
    }
    if trans_a {
        // a is [k, m]: a row pair of k holds MR adjacent elements each.
        for p2 in 0..k.div_ceil(2) {
            let lo = &a[2 * p2 * m + i0..][..rows];
            let dst = &mut out[p2 * MR..][..rows];
            if p2 < full {
                let hi = &a[(2 * p2 + 1) * m + i0..][..rows];
                for ((d, &l), &h) in dst.iter_mut().zip(lo).zip(hi) {
                    *d = pair(l, h);
                }
            } else {
                for (d, &l) in dst.iter_mut().zip(lo) {
                    *d = pair(l, 0);
                }
            }
        }
    } else {
        // a is [m, k]: each row's pairs are already adjacent.
        for r in 0..rows {
            let row = &a[(i0 + r) * k..][..k];
            for (p2, c) in row.chunks(2).enumerate() {
                out[p2 * MR + r] = pair(c[0], c.get(1).copied().unwrap_or(0));
            }
        }
    }
}

/// Packs columns `j0..j0 + NR` of `op(b)` as `[k2][NR]` words into `out` (length `k2 * NR`);
/// columns past `n` and the odd k element past the end are zero.
fn pack_b(out: &mut [u32], b: &[u16], k: usize, n: usize, j0: usize, trans_b: bool) {
    // SAFETY: packing only runs inside matmul_bf16, which asserted available() (AVX-512 F+BW).
    #[cfg(target_arch = "x86_64")]
    unsafe {
        pack_b_avx512(out, b, k, n, j0, trans_b)
    }
    #[cfg(not(target_arch = "x86_64"))]
    pack_b_body(out, b, k, n, j0, trans_b)
}

/// [`pack_b_body`] compiled for AVX-512 (the workspace's baseline target is SSE2). pack_a was
/// tried the same way and lost on the LM head's transposed dW panels, so it stays as is.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn pack_b_avx512(out: &mut [u32], b: &[u16], k: usize, n: usize, j0: usize, trans_b: bool) {
    if trans_b && n - j0 >= NR {
        // SAFETY: the CPU has avx512f (this function's own requirement).
        return unsafe { pack_b_trans_full(out, b, k, j0) };
    }
    pack_b_body(out, b, k, n, j0, trans_b)
}

/// [`pack_b_body`]'s transposing case for a whole panel (NR columns): 16 columns x 16 pairs at a
/// time are loaded as 16 rows of 32-bit words (a column's pairs are adjacent in `b`),
/// transposed in registers and stored as 16 panel rows. The scalar version wrote one word per
/// store; it was most of pack_b's ~7% of a bf16 GPT-2 step once every `dy · W^T` packed W^T.
///
/// # Safety
/// The CPU must support avx512f; `b` is `[n, k]` with `j0 + NR <= n`, `out` holds `k2 * NR`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn pack_b_trans_full(out: &mut [u32], b: &[u16], k: usize, j0: usize) {
    use std::arch::x86_64::*;
    const PB: usize = 16;
    let k2 = k.div_ceil(2);
    assert!(out.len() >= k2 * NR && b.len() >= (j0 + NR) * k);
    let blocks = k / (2 * PB);
    for blk in 0..blocks {
        let pb = blk * PB;
        for c0 in (0..NR).step_by(16) {
            let mut rows = [_mm512_setzero_si512(); 16];
            for (i, row) in rows.iter_mut().enumerate() {
                let seg = &b[(j0 + c0 + i) * k + 2 * pb..][..2 * PB];
                // SAFETY: seg holds 32 u16 = 64 bytes.
                *row = unsafe { _mm512_loadu_si512(seg.as_ptr().cast()) };
            }
            for (q, v) in transpose_16x16(rows).into_iter().enumerate() {
                let dst = &mut out[(pb + q) * NR + c0..][..16];
                // SAFETY: dst holds 16 u32 = 64 bytes.
                unsafe { _mm512_storeu_si512(dst.as_mut_ptr().cast(), v) };
            }
        }
    }
    // The pairs after the last whole block, and an odd k's zero-padded last pair; every word
    // of the panel is written (all NR columns are real), so no fill is needed.
    let rest = blocks * PB;
    for c in 0..NR {
        let seg = &b[(j0 + c) * k + 2 * rest..(j0 + c + 1) * k];
        let (whole, last) = seg.split_at(seg.len() & !1);
        for (q, v) in whole.chunks_exact(2).enumerate() {
            out[(rest + q) * NR + c] = pair(v[0], v[1]);
        }
        if let [l] = last {
            out[(rest + whole.len() / 2) * NR + c] = pair(*l, 0);
        }
    }
}

/// Transposes a 16 x 16 matrix of 32-bit words held as 16 rows: `out[q]` lane `i` is `rows[i]`
/// lane `q`. 32-bit then 64-bit interleaves within 128-bit lanes, then a 4 x 4 transpose of
/// the 128-bit lanes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
pub(crate) fn transpose_16x16(
    rows: [std::arch::x86_64::__m512i; 16],
) -> [std::arch::x86_64::__m512i; 16] {
    use std::arch::x86_64::*;
    let mut t = [_mm512_setzero_si512(); 16];
    for i in 0..8 {
        t[2 * i] = _mm512_unpacklo_epi32(rows[2 * i], rows[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_epi32(rows[2 * i], rows[2 * i + 1]);
    }
    // u[4b + j], 128-bit lane L: rows 4b..4b+4 of column 4L + j.
    let mut u = [_mm512_setzero_si512(); 16];
    for b in 0..4 {
        u[4 * b] = _mm512_unpacklo_epi64(t[4 * b], t[4 * b + 2]);
        u[4 * b + 1] = _mm512_unpackhi_epi64(t[4 * b], t[4 * b + 2]);
        u[4 * b + 2] = _mm512_unpacklo_epi64(t[4 * b + 1], t[4 * b + 3]);
        u[4 * b + 3] = _mm512_unpackhi_epi64(t[4 * b + 1], t[4 * b + 3]);
    }
    let mut out = [_mm512_setzero_si512(); 16];
    for j in 0..4 {
        let (x0, x1, x2, x3) = (u[j], u[4 + j], u[8 + j], u[12 + j]);
        let p = _mm512_shuffle_i32x4::<0x44>(x0, x1);
        let q = _mm512_shuffle_i32x4::<0xEE>(x0, x1);
        let r = _mm512_shuffle_i32x4::<0x44>(x2, x3);
        let s = _mm512_shuffle_i32x4::<0xEE>(x2, x3);
        out[j] = _mm512_shuffle_i32x4::<0x88>(p, r);
        out[4 + j] = _mm512_shuffle_i32x4::<0xDD>(p, r);
        out[8 + j] = _mm512_shuffle_i32x4::<0x88>(q, s);
        out[12 + j] = _mm512_shuffle_i32x4::<0xDD>(q, s);
    }
    out
}

#[inline(always)]
fn pack_b_body(out: &mut [u32], b: &[u16], k: usize, n: usize, j0: usize, trans_b: bool) {
    let cols = NR.min(n - j0);
    let full = k / 2;
    if cols < NR || k % 2 == 1 {
        out.fill(0);
    }
    if trans_b {
        // b is [n, k]: each column of op(b) is a stored row with its pairs adjacent. Transpose
        // in blocks of PB pairs (one cache line per stored row) so the written block, PB rows
        // of the panel, stays in L1.
        const PB: usize = 16;
        for pb in (0..k.div_ceil(2)).step_by(PB) {
            let ks = (2 * PB).min(k - 2 * pb);
            let block = &mut out[pb * NR..];
            for c in 0..cols {
                let seg = &b[(j0 + c) * k + 2 * pb..][..ks];
                let (whole, rest) = seg.split_at(ks & !1);
                for (q, v) in whole.chunks_exact(2).enumerate() {
                    block[q * NR + c] = pair(v[0], v[1]);
                }
                if let [last] = rest {
                    block[whole.len() / 2 * NR + c] = pair(*last, 0);
                }
            }
        }
    } else {
        // b is [k, n]: interleave two stored rows.
        for p2 in 0..k.div_ceil(2) {
            let lo = &b[2 * p2 * n + j0..][..cols];
            let dst = &mut out[p2 * NR..][..cols];
            if p2 < full {
                let hi = &b[(2 * p2 + 1) * n + j0..][..cols];
                for ((d, &l), &h) in dst.iter_mut().zip(lo).zip(hi) {
                    *d = pair(l, h);
                }
            } else {
                for (d, &l) in dst.iter_mut().zip(lo) {
                    *d = pair(l, 0);
                }
            }
        }
    }
}

/// Adds (or writes) the valid `rows x cols` corner of `tile` into C at `(i0, j0)`.
///
/// # Safety
/// `dst` must point to C (row-major `[p.m, p.n]`, or its transpose when `p.transposed_dst`)
/// containing the clipped tile, which no other thread touches meanwhile.
unsafe fn store_tile<D: Float>(
    dst: &DstPtr<D>,
    p: &Problem,
    at: Tile,
    tile: &[[f32; NR]; MR],
    accumulate: bool,
) {
    // Whole rows of a row-major destination: 64 contiguous outputs, stored with vector code
    // (the scalar loop below cost ~10% of a bf16 GPT-2 step).
    #[cfg(target_arch = "x86_64")]
    if !p.transposed_dst && at.cols == NR {
        let bits = D::DTYPE == crate::DType::BF16;
        if D::DTYPE == crate::DType::F32 || bits {
            for (r, t) in tile.iter().enumerate().take(at.rows) {
                let at_row = (at.i0 + r) * p.n + at.j0;
                // SAFETY: the row's NR outputs lie inside C and are this task's alone; D is f32
                // or bf16 (a transparent u16) as checked; the CPU has avx512f (caller).
                unsafe {
                    let d = dst.0.add(at_row);
                    if bits {
                        store_row_bf16(d.cast::<u16>(), t, accumulate);
                    } else {
                        store_row_f32(d.cast::<f32>(), t, accumulate);
                    }
                }
            }
            return;
        }
    }
    let put = |d: &mut D, v: f32| {
        *d = D::from_f32(if accumulate { d.to_f32() + v } else { v });
    };
    for (r, t) in tile.iter().enumerate().take(at.rows) {
        for (c, &v) in t.iter().enumerate().take(at.cols) {
            let (i, j) = (at.i0 + r, at.j0 + c);
            let idx = if p.transposed_dst {
                j * p.m + i
            } else {
                i * p.n + j
            };
            // SAFETY: the caller guarantees (i, j) lies inside C and is ours alone.
            put(unsafe { &mut *dst.0.add(idx) }, v);
        }
    }
}

/// `d[0..NR] (+)= row`, f32 destination.
///
/// # Safety
/// The CPU must support avx512f; `d` addresses NR writable f32s.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn store_row_f32(d: *mut f32, row: &[f32; NR], accumulate: bool) {
    use std::arch::x86_64::*;
    for v in 0..NR / 16 {
        // SAFETY: v * 16 + 16 <= NR, inside both.
        unsafe {
            let mut x = _mm512_loadu_ps(row.as_ptr().add(v * 16));
            if accumulate {
                x = _mm512_add_ps(_mm512_loadu_ps(d.add(v * 16)), x);
            }
            _mm512_storeu_ps(d.add(v * 16), x);
        }
    }
}

/// `d[0..NR] (+)= row`, bf16 destination (as bits), rounded to nearest even exactly as
/// `half::bf16::from_f32` (NaN stays a quiet NaN), so vector and scalar stores agree bit for bit.
///
/// # Safety
/// The CPU must support avx512f; `d` addresses NR writable u16s.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn store_row_bf16(d: *mut u16, row: &[f32; NR], accumulate: bool) {
    use std::arch::x86_64::*;
    let abs_mask = _mm512_set1_epi32(0x7FFF_FFFF);
    let inf = _mm512_set1_epi32(0x7F80_0000);
    let quiet = _mm512_set1_epi32(0x0040);
    let half = _mm512_set1_epi32(0x7FFF);
    let one = _mm512_set1_epi32(1);
    for v in 0..NR / 16 {
        // SAFETY: v * 16 + 16 <= NR, inside both.
        unsafe {
            let mut x = _mm512_loadu_ps(row.as_ptr().add(v * 16));
            if accumulate {
                let old = _mm256_loadu_si256(d.add(v * 16).cast());
                let old = _mm512_slli_epi32(_mm512_cvtepu16_epi32(old), 16);
                x = _mm512_add_ps(_mm512_castsi512_ps(old), x);
            }
            let b = _mm512_castps_si512(x);
            let lsb = _mm512_and_si512(_mm512_srli_epi32(b, 16), one);
            let rounded = _mm512_srli_epi32(_mm512_add_epi32(b, _mm512_add_epi32(half, lsb)), 16);
            let nan = _mm512_cmpgt_epi32_mask(_mm512_and_si512(b, abs_mask), inf);
            let nan_bits = _mm512_or_si512(_mm512_srli_epi32(b, 16), quiet);
            let out = _mm512_mask_blend_epi32(nan, rounded, nan_bits);
            _mm256_storeu_si256(d.add(v * 16).cast(), _mm512_cvtepi32_epi16(out));
        }
    }
}

/// `tile = Σ_p a[p] ⊗ b[p]` over `k2` pairs, in registers. Pair `p` of row `r` of the left
/// operand is the (possibly unaligned) 32-bit word at `a + r * rs + p * ps` (u16 units).
///
/// # Safety
/// The CPU must support avx512f and avx512bf16; `a` must address MR rows of `k2` pairs as
/// described, and `b` holds `k2 * NR` words.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn microkernel(
    k2: usize,
    a: *const u16,
    rs: usize,
    ps: usize,
    b: &[u32],
    tile: &mut [[f32; NR]; MR],
) {
    use std::arch::x86_64::*;
    const NV: usize = NR / 16;
    assert!(b.len() >= k2 * NR);
    let b = b.as_ptr();
    let mut acc = [[_mm512_setzero_ps(); NV]; MR];
    for p in 0..k2 {
        let mut bv = [_mm512_setzero_si512(); NV];
        for (v, reg) in bv.iter_mut().enumerate() {
            // SAFETY: p < k2 and v * 16 + 16 <= NR, inside b.
            *reg = unsafe { _mm512_loadu_si512(b.add(p * NR + v * 16).cast()) };
        }
        for (r, acc_r) in acc.iter_mut().enumerate() {
            // SAFETY: p < k2 and r < MR, inside a by the caller's guarantee.
            let word = unsafe { a.add(r * rs + p * ps).cast::<u32>().read_unaligned() };
            // SAFETY: __m512i and __m512bh are both 512 plain bits.
            let av: __m512bh = unsafe { std::mem::transmute(_mm512_set1_epi32(word as i32)) };
            for (acc_rv, &bvv) in acc_r.iter_mut().zip(&bv) {
                // SAFETY: __m512i and __m512bh are both 512 plain bits.
                let bh: __m512bh = unsafe { std::mem::transmute(bvv) };
                *acc_rv = _mm512_dpbf16_ps(*acc_rv, av, bh);
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
    _: *const u16,
    _: usize,
    _: usize,
    _: &[u32],
    _: &mut [[f32; NR]; MR],
) {
    unreachable!("matmul_bf16 asserts available(), which is false off x86_64")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::*;

    /// op(a) · op(b) in f64 from the bf16 values.
    #[allow(clippy::too_many_arguments)]
    fn naive(a: &[bf16], b: &[bf16], m: usize, k: usize, n: usize, ta: bool, tb: bool) -> Vec<f64> {
        let mut out = vec![0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                let mut s = 0f64;
                for p in 0..k {
                    let av = if ta { a[p * m + i] } else { a[i * k + p] };
                    let bv = if tb { b[j * k + p] } else { b[p * n + j] };
                    s += av.to_f64() * bv.to_f64();
                }
                out[i * n + j] = s;
            }
        }
        out
    }

    fn rand_bf16(rng: &mut Rng, len: usize) -> Vec<bf16> {
        rng.vec(len, 1.0).into_iter().map(bf16::from_f32).collect()
    }

    /// The vector store of whole 64-column rows rounds exactly like `bf16::from_f32` (which the
    /// scalar edge store uses), with and without accumulation, NaN included: a bf16 destination
    /// equals the f32 destination's values rounded one by one.
    #[test]
    fn vector_bf16_store_rounds_like_the_scalar_one() {
        if !available() {
            return;
        }
        let mut rng = Rng::new(91);
        // k = 2: every output is one or two bf16 products, exact in f32, so exact ties (low 16
        // bits 0x8000, where round-to-even decides) occur; k = 40: ordinary sums.
        for k in [2, 40] {
            let (m, n) = (13, NR + 5);
            let mut a = rand_bf16(&mut rng, m * k);
            let b = rand_bf16(&mut rng, k * n);
            a[3 * k] = bf16::NAN;
            let mut f = vec![0f32; m * n];
            matmul_bf16(&mut f, &a, &b, m, k, n, false, false, false);
            if k == 2 {
                let ties = f.iter().filter(|v| v.to_bits() & 0xFFFF == 0x8000).count();
                assert!(ties > 0, "the test needs exact ties");
            }
            let start: Vec<bf16> = rand_bf16(&mut rng, m * n);
            for accumulate in [false, true] {
                let mut d = start.clone();
                matmul_bf16(&mut d, &a, &b, m, k, n, false, false, accumulate);
                for (i, (&got, (&v, &old))) in d.iter().zip(f.iter().zip(&start)).enumerate() {
                    let want = bf16::from_f32(if accumulate { old.to_f32() + v } else { v });
                    if want.is_nan() {
                        assert!(got.is_nan(), "[{i}] {got} should be NaN");
                    } else {
                        assert_eq!(
                            got.to_bits(),
                            want.to_bits(),
                            "k {k} [{i}] accumulate {accumulate}"
                        );
                    }
                }
            }
        }
    }

    /// The AVX-512 transposing pack of whole panels equals the scalar one word for word.
    #[test]
    fn vector_transposing_pack_equals_scalar() {
        if !available() {
            return;
        }
        let mut rng = Rng::new(92);
        for k in [1, 2, 31, 32, 33, 64, 97, 130] {
            let n = NR + 21;
            let b: Vec<u16> = (0..n * k).map(|_| rng.next_u64() as u16).collect();
            for j0 in [0, 21] {
                let k2 = k.div_ceil(2);
                let (mut fast, mut slow) = (vec![7u32; k2 * NR], vec![9u32; k2 * NR]);
                pack_b(&mut fast, &b, k, n, j0, true);
                pack_b_body(&mut slow, &b, k, n, j0, true);
                assert_eq!(fast, slow, "k {k} j0 {j0}");
            }
        }
    }

    #[test]
    fn all_transposes_odd_sizes_match_f64_reference() {
        if !available() {
            eprintln!("skipped: no avx512bf16 on this CPU");
            return;
        }
        let mut rng = Rng::new(11);
        // Sizes straddle MR = 6, NR = 64 and odd k (a zero-padded last pair).
        for &(m, k, n) in &[
            (1, 1, 1),
            (7, 13, 5),
            (6, 2, 64),
            (13, 67, 65),
            (33, 70, 129),
            (50, 301, 200),
            // Packed right operand > SMALL_RIGHT_BYTES: the column-panel task path.
            (40, 1000, 301),
            // A long odd k (the LM head's dlogits · W has k = vocab) through that path.
            (13, 2563, 130),
        ] {
            for ta in [false, true] {
                for tb in [false, true] {
                    let a = rand_bf16(&mut rng, m * k);
                    let b = rand_bf16(&mut rng, k * n);
                    let want = naive(&a, &b, m, k, n, ta, tb);
                    let what = format!("{m}x{k}x{n} ta={ta} tb={tb}");
                    // NaN garbage must not leak through when not accumulating.
                    let mut d = vec![f32::NAN; m * n];
                    matmul_bf16(&mut d, &a, &b, m, k, n, ta, tb, false);
                    // Products of bf16 are exact in f32: only the k-long f32 sum rounds.
                    let tol = 2e-7 * k as f64;
                    assert_close(&what, &d, &want, tol);
                    let init = rng.vec(m * n, 4.0);
                    let mut acc = init.clone();
                    matmul_bf16(&mut acc, &a, &b, m, k, n, ta, tb, true);
                    let want_acc: Vec<f64> =
                        want.iter().zip(&init).map(|(w, i)| w + *i as f64).collect();
                    assert_close(&format!("{what} accumulate"), &acc, &want_acc, tol);
                    // A bf16 destination is the f32 result rounded once.
                    let mut d16 = vec![bf16::from_f32(0.0); m * n];
                    matmul_bf16(&mut d16, &a, &b, m, k, n, ta, tb, false);
                    for (i, (h, f)) in d16.iter().zip(&d).enumerate() {
                        assert_eq!(*h, bf16::from_f32(*f), "{what} bf16 dst [{i}]");
                    }
                }
            }
        }
    }

    #[test]
    fn bit_identical_across_thread_counts_and_to_the_serial_path() {
        if !available() {
            eprintln!("skipped: no avx512bf16 on this CPU");
            return;
        }
        let mut rng = Rng::new(12);
        // Large enough to go parallel; the first shape takes the small-right-operand path, the
        // second the column-panel path with rows split across tasks.
        for (m, k, n, ta, tb) in [
            (97, 515, 70, false, true),
            (97, 515, 70, false, false),
            (97, 515, 70, true, false),
            (97, 1030, 300, false, false),
            (301, 1030, 97, true, true),
        ] {
            let a = rand_bf16(&mut rng, m * k);
            let b = rand_bf16(&mut rng, k * n);
            let run = |threads: usize| {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .unwrap();
                let mut d = vec![0f32; m * n];
                pool.install(|| matmul_bf16(&mut d, &a, &b, m, k, n, ta, tb, false));
                d
            };
            let one = run(1);
            for threads in [2, 3, 7] {
                let d = run(threads);
                let same = one.iter().zip(&d).all(|(x, y)| x.to_bits() == y.to_bits());
                assert!(same, "ta={ta} tb={tb}: {threads} threads differ from 1");
            }
            assert_close(
                "parallel vs f64",
                &one,
                &naive(&a, &b, m, k, n, ta, tb),
                2e-7 * k as f64,
            );
        }
    }

    /// Best-of-N time of the GPT-2 MLP matmuls (rows 512, 768 <-> 3072) here against the f32
    /// gemm on the same values (what the conversion path ends in). Best-of-N because the
    /// machine may be shared.
    /// `cargo test -p rustspeed-kernels --release -- --ignored bf16_gemm_throughput --nocapture`
    #[test]
    #[ignore]
    fn bf16_gemm_throughput() {
        if !available() {
            eprintln!("skipped: no avx512bf16 on this CPU");
            return;
        }
        let mut rng = Rng::new(13);
        let (r, c, f) = (512, 768, 3072);
        // (name, m, k, n, ta, tb): forward x W (Conv1D), dx = dy W^T, dW = x^T dy, lm-head-like.
        for (name, m, k, n, ta, tb) in [
            ("fwd  x.W    ", r, c, f, false, false),
            ("bwd  dy.W^T ", r, f, c, false, true),
            ("bwd  x^T.dy ", c, r, f, true, false),
            ("head h.E^T  ", 166, c, 50257, false, true),
        ] {
            let a = rand_bf16(&mut rng, m * k);
            let b = rand_bf16(&mut rng, k * n);
            let (a32, b32): (Vec<f32>, Vec<f32>) = (
                a.iter().map(|v| v.to_f32()).collect(),
                b.iter().map(|v| v.to_f32()).collect(),
            );
            let mut d = vec![0f32; m * n];
            let (mut best16, mut best32) = (f64::MAX, f64::MAX);
            for _ in 0..5 {
                let t = std::time::Instant::now();
                matmul_bf16(&mut d, &a, &b, m, k, n, ta, tb, false);
                best16 = best16.min(t.elapsed().as_secs_f64());
                let t = std::time::Instant::now();
                crate::matmul::matmul(&mut d, &a32, &b32, m, k, n, ta, tb, false);
                best32 = best32.min(t.elapsed().as_secs_f64());
            }
            let gf = 2.0 * (m * k * n) as f64 / 1e9;
            println!(
                "{name} {m}x{k}x{n}: bf16 {:.2} ms ({:.0} GFLOP/s), f32 gemm {:.2} ms ({:.0} GFLOP/s)",
                best16 * 1e3,
                gf / best16,
                best32 * 1e3,
                gf / best32
            );
        }
    }

    #[test]
    fn zero_sized_shapes() {
        if !available() {
            return;
        }
        let mut d = vec![3.0f32; 6];
        matmul_bf16(&mut d, &[], &[], 2, 0, 3, false, false, true);
        assert_eq!(d, vec![3.0; 6]);
        matmul_bf16(&mut d, &[], &[], 2, 0, 3, true, true, false);
        assert_eq!(d, vec![0.0; 6]);
        let mut empty: Vec<f32> = vec![];
        matmul_bf16(
            &mut empty,
            &[],
            &[bf16::ONE; 12],
            0,
            4,
            3,
            false,
            false,
            false,
        );
    }
}
