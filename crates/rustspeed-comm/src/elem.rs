//! Element types the collectives move, and the reduction kernel. 16-bit types travel as 16
//! bits (half the bytes of f32) and are summed in f32, rounded once at the end, so a sum over
//! ranks loses no more than one rounding whatever the world size.

use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};

/// Wire/dtype tag, also used to check that all ranks call a collective with the same type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DType {
    F32 = 1,
    BF16 = 2,
    F16 = 3,
}

impl DType {
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::BF16 => "bf16",
            DType::F16 => "f16",
        }
    }
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::BF16 | DType::F16 => 2,
        }
    }
    pub fn from_code(code: u32) -> Option<DType> {
        match code {
            1 => Some(DType::F32),
            2 => Some(DType::BF16),
            3 => Some(DType::F16),
            _ => None,
        }
    }
}

/// How values from different ranks are combined.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReduceOp {
    Sum,
    /// Sum divided by the world size (DeepSpeed's default `gradient_allreduce_op`).
    Mean,
    /// Maximum; NaN wins (an overflow flag must not be hidden).
    Max,
}

impl ReduceOp {
    pub fn name(self) -> &'static str {
        match self {
            ReduceOp::Sum => "sum",
            ReduceOp::Mean => "mean",
            ReduceOp::Max => "max",
        }
    }
    pub(crate) fn code(self) -> u32 {
        match self {
            ReduceOp::Sum => 0,
            ReduceOp::Mean => 1,
            ReduceOp::Max => 2,
        }
    }
}

/// A type the collectives can carry: f32, bf16 or f16.
pub trait Elem: Copy + Send + Sync + Default + 'static {
    const DTYPE: DType;
    /// Widens `src` into `dst` (same length).
    fn widen(src: &[Self], dst: &mut [f32]);
    /// Rounds `src` to nearest-even into `dst` (same length).
    fn narrow(src: &[f32], dst: &mut [Self]);
}

impl Elem for f32 {
    const DTYPE: DType = DType::F32;
    fn widen(src: &[f32], dst: &mut [f32]) {
        dst.copy_from_slice(src);
    }
    fn narrow(src: &[f32], dst: &mut [f32]) {
        dst.copy_from_slice(src);
    }
}

impl Elem for bf16 {
    const DTYPE: DType = DType::BF16;
    fn widen(src: &[bf16], dst: &mut [f32]) {
        // Plain shifts vectorise; half's per-element call does not always.
        for (d, s) in dst.iter_mut().zip(src) {
            *d = bf16_to_f32(s.to_bits());
        }
    }
    fn narrow(src: &[f32], dst: &mut [bf16]) {
        for (d, &s) in dst.iter_mut().zip(src) {
            *d = bf16::from_bits(f32_to_bf16(s));
        }
    }
}

impl Elem for f16 {
    const DTYPE: DType = DType::F16;
    fn widen(src: &[f16], dst: &mut [f32]) {
        src.convert_to_f32_slice(dst);
    }
    fn narrow(src: &[f32], dst: &mut [f16]) {
        dst.convert_from_f32_slice(src);
    }
}

const BLOCK: usize = 2048;

#[inline(always)]
fn combine(op: ReduceOp, a: f32, b: f32) -> f32 {
    match op {
        ReduceOp::Sum | ReduceOp::Mean => a + b,
        ReduceOp::Max => {
            if b > a || b.is_nan() {
                b
            } else {
                a
            }
        }
    }
}

/// `d = op(d, x)` elementwise; monomorphised per op so each loop vectorises.
#[inline(always)]
fn fold_into(op: ReduceOp, d: &mut [f32], x: &[f32]) {
    match op {
        ReduceOp::Sum | ReduceOp::Mean => {
            for (d, x) in d.iter_mut().zip(x) {
                *d += *x;
            }
        }
        ReduceOp::Max => {
            for (d, &x) in d.iter_mut().zip(x) {
                *d = combine(ReduceOp::Max, *d, x);
            }
        }
    }
}

/// `d = op(a, b)` elementwise, one pass.
#[inline(always)]
fn fold2(op: ReduceOp, d: &mut [f32], a: &[f32], b: &[f32]) {
    match op {
        ReduceOp::Sum | ReduceOp::Mean => {
            for ((d, a), b) in d.iter_mut().zip(a).zip(b) {
                *d = *a + *b;
            }
        }
        ReduceOp::Max => {
            for ((d, &a), &b) in d.iter_mut().zip(a).zip(b) {
                *d = combine(ReduceOp::Max, a, b);
            }
        }
    }
}

/// `dst = op(srcs[0], srcs[1], ...)` elementwise, accumulated in f32 in the order of `srcs`
/// (rank order), so whichever rank reduces a piece, the bits are the same.
/// `world` is the divisor for `Mean`.
pub fn reduce_into<T: Elem>(srcs: &[&[T]], dst: &mut [T], op: ReduceOp, world: usize) {
    let n = dst.len();
    assert!(srcs.iter().all(|s| s.len() == n) && !srcs.is_empty());
    if T::DTYPE == DType::F32 {
        // SAFETY: T is f32 (DTYPE is only F32 for f32), so these are the same slices.
        let srcs: Vec<&[f32]> = srcs
            .iter()
            .map(|s| unsafe { std::slice::from_raw_parts(s.as_ptr() as *const f32, n) })
            .collect();
        let dst = unsafe { std::slice::from_raw_parts_mut(dst.as_mut_ptr() as *mut f32, n) };
        return reduce_f32(&srcs, dst, op, world);
    }
    if T::DTYPE == DType::BF16 {
        // SAFETY: T is bf16 (repr(transparent) over u16), so these are the same slices.
        let srcs: Vec<&[u16]> = srcs
            .iter()
            .map(|s| unsafe { std::slice::from_raw_parts(s.as_ptr() as *const u16, n) })
            .collect();
        let dst = unsafe { std::slice::from_raw_parts_mut(dst.as_mut_ptr() as *mut u16, n) };
        return reduce_bf16(&srcs, dst, op, world);
    }
    let mut acc = [0f32; BLOCK];
    let mut tmp = [0f32; BLOCK];
    let mut lo = 0;
    while lo < n {
        let len = BLOCK.min(n - lo);
        let (acc, tmp) = (&mut acc[..len], &mut tmp[..len]);
        T::widen(&srcs[0][lo..lo + len], acc);
        for src in &srcs[1..] {
            T::widen(&src[lo..lo + len], tmp);
            fold_into(op, acc, tmp);
        }
        if op == ReduceOp::Mean {
            let w = world as f32;
            acc.iter_mut().for_each(|a| *a /= w);
        }
        T::narrow(acc, &mut dst[lo..lo + len]);
        lo += len;
    }
}

#[inline(always)]
fn bf16_to_f32(x: u16) -> f32 {
    f32::from_bits((x as u32) << 16)
}

/// Round to nearest even; NaN stays NaN (quieted). Branch-free so the loop vectorises.
#[inline(always)]
fn f32_to_bf16(x: f32) -> u16 {
    let b = x.to_bits();
    let rounded = b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16;
    let nan = (b & 0x7fff_ffff) > 0x7f80_0000;
    (if nan { (b >> 16) | 0x40 } else { rounded }) as u16
}

/// Picks the widest vector unit at run time: the branch-free rounding select costs 2x on
/// baseline x86-64 (SSE2 has no blend) compared with AVX2.
fn reduce_bf16(srcs: &[&[u16]], dst: &mut [u16], op: ReduceOp, world: usize) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2.
        return unsafe { reduce_bf16_avx2(srcs, dst, op, world) };
    }
    reduce_bf16_body(srcs, dst, op, world)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn reduce_bf16_avx2(srcs: &[&[u16]], dst: &mut [u16], op: ReduceOp, world: usize) {
    reduce_bf16_body(srcs, dst, op, world)
}

/// bf16 with the widening fused into the first combine and the rounding into the store:
/// one pass over the sources, f32 only in an L1-resident block.
#[inline(always)]
fn reduce_bf16_body(srcs: &[&[u16]], dst: &mut [u16], op: ReduceOp, world: usize) {
    let n = dst.len();
    let mut acc = [0f32; BLOCK];
    let mut lo = 0;
    while lo < n {
        let hi = (lo + BLOCK).min(n);
        let acc = &mut acc[..hi - lo];
        if srcs.len() == 1 {
            for (a, &x) in acc.iter_mut().zip(&srcs[0][lo..hi]) {
                *a = bf16_to_f32(x);
            }
        } else {
            let (s0, s1) = (&srcs[0][lo..hi], &srcs[1][lo..hi]);
            match op {
                ReduceOp::Sum | ReduceOp::Mean => {
                    for ((a, &x), &y) in acc.iter_mut().zip(s0).zip(s1) {
                        *a = bf16_to_f32(x) + bf16_to_f32(y);
                    }
                }
                ReduceOp::Max => {
                    for ((a, &x), &y) in acc.iter_mut().zip(s0).zip(s1) {
                        *a = combine(ReduceOp::Max, bf16_to_f32(x), bf16_to_f32(y));
                    }
                }
            }
        }
        for s in &srcs[2.min(srcs.len())..] {
            let s = &s[lo..hi];
            match op {
                ReduceOp::Sum | ReduceOp::Mean => {
                    for (a, &x) in acc.iter_mut().zip(s) {
                        *a += bf16_to_f32(x);
                    }
                }
                ReduceOp::Max => {
                    for (a, &x) in acc.iter_mut().zip(s) {
                        *a = combine(ReduceOp::Max, *a, bf16_to_f32(x));
                    }
                }
            }
        }
        if op == ReduceOp::Mean {
            let w = world as f32;
            acc.iter_mut().for_each(|a| *a /= w);
        }
        for (d, &a) in dst[lo..hi].iter_mut().zip(acc.iter()) {
            *d = f32_to_bf16(a);
        }
        lo = hi;
    }
}

/// f32 needs no staging: the first two sources combine straight into `dst`, block by block
/// so the later sources fold into a block that is still in L1.
fn reduce_f32(srcs: &[&[f32]], dst: &mut [f32], op: ReduceOp, world: usize) {
    let n = dst.len();
    let mut lo = 0;
    while lo < n {
        let hi = (lo + BLOCK).min(n);
        let d = &mut dst[lo..hi];
        if srcs.len() == 1 {
            d.copy_from_slice(&srcs[0][lo..hi]);
        } else {
            fold2(op, d, &srcs[0][lo..hi], &srcs[1][lo..hi]);
        }
        for s in &srcs[2.min(srcs.len())..] {
            fold_into(op, d, &s[lo..hi]);
        }
        if op == ReduceOp::Mean {
            let w = world as f32;
            d.iter_mut().for_each(|a| *a /= w);
        }
        lo = hi;
    }
}

/// Reference reduction (element by element, no blocking) used by the tests and by
/// world size 1; same order and rounding as `reduce_into`.
pub fn reduce_reference<T: Elem>(inputs: &[Vec<T>], op: ReduceOp) -> Vec<T> {
    let n = inputs[0].len();
    let mut out = vec![T::default(); n];
    let mut one = [0f32; 1];
    for (i, o) in out.iter_mut().enumerate() {
        let mut acc = 0f32;
        for (r, input) in inputs.iter().enumerate() {
            T::widen(&input[i..i + 1], &mut one);
            let v = one[0];
            acc = match (r, op) {
                (0, _) => v,
                (_, ReduceOp::Max) => {
                    if v > acc || v.is_nan() {
                        v
                    } else {
                        acc
                    }
                }
                _ => acc + v,
            };
        }
        if op == ReduceOp::Mean {
            acc /= inputs.len() as f32;
        }
        let mut slot = [T::default()];
        T::narrow(&[acc], &mut slot);
        *o = slot[0];
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_narrow_matches_half() {
        let vals = [
            0.0f32,
            -0.0,
            1.0,
            1.0 + 1.0 / 256.0, // ties: round to even
            1.0078125,
            1.0 + 3.0 / 256.0,
            3.3 - 2.5e-40,
            65504.0,
            3.4e38,
            f32::INFINITY,
            f32::NEG_INFINITY,
            1e-45,
        ];
        let mut out = [bf16::ZERO; 13];
        bf16::narrow(&vals, &mut out);
        for (v, o) in vals.iter().zip(out) {
            assert_eq!(o.to_bits(), bf16::from_f32(*v).to_bits(), "{v}");
        }
        let mut nan = [bf16::ZERO];
        bf16::narrow(&[f32::NAN], &mut nan);
        assert!(nan[0].is_nan());
    }

    #[test]
    fn blocked_reduce_equals_reference() {
        let n = 1500;
        let inputs: Vec<Vec<bf16>> = (0..3)
            .map(|r| {
                (0..n)
                    .map(|i| bf16::from_f32(((i * 7 + r * 13) % 31) as f32 * 0.37 - 5.0))
                    .collect()
            })
            .collect();
        for op in [ReduceOp::Sum, ReduceOp::Mean, ReduceOp::Max] {
            let want = reduce_reference(&inputs, op);
            let srcs: Vec<&[bf16]> = inputs.iter().map(|v| v.as_slice()).collect();
            let mut got = vec![bf16::ZERO; n];
            reduce_into(&srcs, &mut got, op, 3);
            assert_eq!(got, want, "{op:?}");
        }
        let mut m = [0f32];
        reduce_into(&[&[1.0f32][..], &[f32::NAN][..]], &mut m, ReduceOp::Max, 2);
        assert!(m[0].is_nan());
    }
}
