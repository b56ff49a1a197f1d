//! GPT-2's tanh GELU, forward and backward, 16 lanes at a time with AVX-512 for f32 and bf16
//! storage. The generic loops in `activation.rs` auto-vectorise only to AVX2 width, and for bf16
//! not well at all (the scalar round-to-nearest-even of `half` per element); GELU was 5.6% of a
//! bf16 GPT-2 124M step. The math is `activation.rs`'s (same exp polynomial and tanh identity),
//! evaluated with FMAs, so results agree with the scalar path to a few ulps.

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

use crate::dtype::{DType, Float};

/// True when the CPU can run this module's kernels.
pub(crate) fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx512f") && std::is_x86_feature_detected!("avx512bw")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether `T` is a storage type with a kernel here (f32 or bf16).
pub(crate) fn supports<T: Float>() -> bool {
    matches!(T::DTYPE, DType::F32 | DType::BF16)
}

const SCALE: f32 = 0.797_884_6;
const CUBIC: f32 = 0.044_715;

/// 16 elements of `T` as f32.
///
/// # Safety
/// AVX-512 F+BW; `p` points at 16 readable elements of `T`, which is f32 or bf16.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn load<T: Float>(p: *const T) -> __m512 {
    unsafe {
        if T::DTYPE == DType::F32 {
            _mm512_loadu_ps(p.cast())
        } else {
            let h = _mm256_loadu_si256(p.cast());
            _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16))
        }
    }
}

/// Stores 16 f32 as `T`; bf16 rounds to nearest even and keeps NaNs quiet, as `half` does.
///
/// # Safety
/// As [`load`], with `p` writable.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn store<T: Float>(p: *mut T, x: __m512) {
    unsafe {
        if T::DTYPE == DType::F32 {
            _mm512_storeu_ps(p.cast(), x);
        } else {
            let b = _mm512_castps_si512(x);
            let lsb = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
            let bias = _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), lsb);
            let rounded = _mm512_srli_epi32(_mm512_add_epi32(b, bias), 16);
            let abs = _mm512_and_si512(b, _mm512_set1_epi32(0x7FFF_FFFF));
            let nan = _mm512_cmpgt_epi32_mask(abs, _mm512_set1_epi32(0x7F80_0000));
            let quiet = _mm512_or_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(0x40));
            let out = _mm512_mask_blend_epi32(nan, rounded, quiet);
            _mm256_storeu_si256(p.cast(), _mm512_cvtepi32_epi16(out));
        }
    }
}

/// `activation::exp_fast` on 16 lanes.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn exp16(x: __m512) -> __m512 {
    const ROUND: f32 = 12_582_912.0;
    unsafe {
        let x = _mm512_min_ps(
            _mm512_max_ps(x, _mm512_set1_ps(-87.0)),
            _mm512_set1_ps(88.0),
        );
        let round = _mm512_set1_ps(ROUND);
        let n = _mm512_sub_ps(
            _mm512_fmadd_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E), round),
            round,
        );
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693_359_4), x);
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.121_944_4e-4), r);
        let mut p = _mm512_set1_ps(1.987_569_2e-4);
        for c in [
            1.398_199_9e-3,
            8.333_452e-3,
            4.166_579_6e-2,
            1.666_666_5e-1,
            0.5,
        ] {
            p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
        }
        let one = _mm512_set1_ps(1.0);
        let y = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, one));
        let e = _mm512_slli_epi32(
            _mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)),
            23,
        );
        _mm512_mul_ps(y, _mm512_castsi512_ps(e))
    }
}

/// `tanh(sqrt(2/pi) (x + 0.044715 x^3))` on 16 lanes, as `1 - 2 / (e^(2u) + 1)`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn inner_tanh(x: __m512) -> __m512 {
    unsafe {
        let x2 = _mm512_mul_ps(x, x);
        let poly = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_set1_ps(CUBIC), x2), x, x);
        let u2 = _mm512_mul_ps(_mm512_set1_ps(2.0 * SCALE), poly);
        let one = _mm512_set1_ps(1.0);
        let q = _mm512_div_ps(_mm512_set1_ps(2.0), _mm512_add_ps(exp16(u2), one));
        _mm512_sub_ps(one, q)
    }
}

/// One 16-lane block of `out = gelu_tanh(x)`. SAFETY: 16 elements readable at `x`, writable at
/// `out`; the CPU features of [`available`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn forward16<T: Float>(out: *mut T, x: *const T) {
    unsafe {
        let half = _mm512_set1_ps(0.5);
        let v = load(x);
        let t = inner_tanh(v);
        let hv = _mm512_mul_ps(half, v);
        store(out, _mm512_fmadd_ps(hv, t, hv));
    }
}

/// One 16-lane block of `dx = dout * gelu_tanh'(x)`. SAFETY: as [`forward16`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn backward16<T: Float>(dx: *mut T, x: *const T, dout: *const T) {
    unsafe {
        let half = _mm512_set1_ps(0.5);
        let one = _mm512_set1_ps(1.0);
        let v = load(x);
        let g = load(dout);
        let t = inner_tanh(v);
        // du/dx = sqrt(2/pi) (1 + 3 * 0.044715 x^2)
        let x2 = _mm512_mul_ps(v, v);
        let du = _mm512_mul_ps(
            _mm512_set1_ps(SCALE),
            _mm512_fmadd_ps(_mm512_set1_ps(3.0 * CUBIC), x2, one),
        );
        // 0.5 (1 + t) + 0.5 x (1 - t^2) du
        let sech2 = _mm512_fnmadd_ps(t, t, one);
        let left = _mm512_fmadd_ps(half, t, half);
        let grad = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_mul_ps(half, v), sech2), du, left);
        store(dx, _mm512_mul_ps(g, grad));
    }
}

/// `out = gelu_tanh(x)`. The tail shorter than 16 runs through the same vector code on a padded
/// copy, so an element's result does not depend on where it sits in the slice (runs with other
/// batch shapes, e.g. another world size, must round identically).
///
/// # Safety
/// [`available`] and [`supports::<T>`] hold; `out.len() == x.len()`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
pub(crate) unsafe fn gelu_tanh_forward<T: Float>(out: &mut [T], x: &[T]) {
    assert_eq!(out.len(), x.len());
    let whole = out.len() / 16 * 16;
    for i in (0..whole).step_by(16) {
        // SAFETY: i + 16 <= whole <= len of both slices.
        unsafe { forward16(out.as_mut_ptr().add(i), x.as_ptr().add(i)) };
    }
    let r = out.len() - whole;
    if r > 0 {
        let (mut xb, mut ob) = ([T::default(); 16], [T::default(); 16]);
        xb[..r].copy_from_slice(&x[whole..]);
        // SAFETY: 16-element stack buffers.
        unsafe { forward16(ob.as_mut_ptr(), xb.as_ptr()) };
        out[whole..].copy_from_slice(&ob[..r]);
    }
}

/// `dx = dout * gelu_tanh'(x)`, the tail as in [`gelu_tanh_forward`].
///
/// # Safety
/// As [`gelu_tanh_forward`], with all three slices of one length.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
pub(crate) unsafe fn gelu_tanh_backward<T: Float>(dx: &mut [T], x: &[T], dout: &[T]) {
    assert!(dx.len() == x.len() && dx.len() == dout.len());
    let whole = dx.len() / 16 * 16;
    for i in (0..whole).step_by(16) {
        // SAFETY: i + 16 <= whole <= len of all three slices.
        unsafe {
            backward16(
                dx.as_mut_ptr().add(i),
                x.as_ptr().add(i),
                dout.as_ptr().add(i),
            )
        };
    }
    let r = dx.len() - whole;
    if r > 0 {
        let (mut xb, mut gb, mut db) = ([T::default(); 16], [T::default(); 16], [T::default(); 16]);
        xb[..r].copy_from_slice(&x[whole..]);
        gb[..r].copy_from_slice(&dout[whole..]);
        // SAFETY: 16-element stack buffers.
        unsafe { backward16(db.as_mut_ptr(), xb.as_ptr(), gb.as_ptr()) };
        dx[whole..].copy_from_slice(&db[..r]);
    }
}
