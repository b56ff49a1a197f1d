//! Blockwise 4-bit quantization (NF4 and FP4) over a flat, row-major matrix, bitsandbytes'
//! `kQuantizeBlockwise` / `kDequantizeBlockwise` rules (csrc/kernels.cu, commit 95f9af3):
//!
//! - the matrix is one flat array; blocks of `block_size` consecutive elements (they run across
//!   row ends when `in_features` is not a multiple of the block), the last one may be short;
//! - absmax = max |x| over the block's elements, and each element is coded from
//!   `x * (1.0f32 / absmax)`: a product with the rounded reciprocal, not a division;
//! - two codes per byte, element `2j` in the high nibble, `2j + 1` in the low one; an odd
//!   count's last low nibble codes a 0 (the missing element loaded as 0);
//! - dequantized element = `code[q] * absmax` in f32, rounded once to the output type.

use rayon::prelude::*;

use crate::dtype::Float;

/// Quantizes `w` (flat) into packed nibbles and per-block absmax, with `quantize_code`
/// mapping a scaled value to its 4-bit code. `block_size` must be even.
pub(crate) fn quantize<T: Float>(
    w: &[T],
    block_size: usize,
    quantize_code: fn(f32) -> u8,
) -> (Vec<u8>, Vec<f32>) {
    debug_assert!(block_size.is_multiple_of(2));
    let mut packed = vec![0u8; w.len().div_ceil(2)];
    let mut absmax = vec![0f32; w.len().div_ceil(block_size)];
    packed
        .par_chunks_mut(block_size / 2)
        .zip(w.par_chunks(block_size))
        .zip(absmax.par_iter_mut())
        .for_each(|((bytes, block), m)| {
            *m = block.iter().fold(0f32, |m, x| m.max(x.to_f32().abs()));
            // An all-zero block gives 1/0 = inf and 0 * inf = NaN, as on the GPU (NF4 codes
            // it 0, FP4 +0; either way it dequantizes to a zero).
            let inv = 1.0 / *m;
            for (byte, pair) in bytes.iter_mut().zip(block.chunks(2)) {
                let hi = quantize_code(pair[0].to_f32() * inv);
                let lo = quantize_code(pair.get(1).map_or(0.0, |v| v.to_f32()) * inv);
                *byte = hi << 4 | lo;
            }
        });
    (packed, absmax)
}

/// Dequantizes the flat elements `start..start + out.len()` into `out`, with `scale(b)` the
/// absmax of block `b` and `code` the 16-entry code book.
#[inline]
pub(crate) fn dequantize_range<U: Float>(
    packed: &[u8],
    code: &[f32; 16],
    block_size: usize,
    scale: impl Fn(usize) -> f32,
    start: usize,
    out: &mut [U],
) {
    // The lookup loop over `half::bf16` elements runs ~5x slower than the very same loop over
    // their u16 bits (LLVM keeps the wrapper's copies scalar), so 2-byte types run on bits.
    match as_bits_mut(out) {
        Some(bits) => dequantize_range_as(packed, code, block_size, scale, start, bits, |v| {
            to_bits(U::from_f32(v))
        }),
        None => dequantize_range_as(packed, code, block_size, scale, start, out, U::from_f32),
    }
}

/// `s` as its u16 bit patterns when `U` is a 2-byte type (bf16, f16).
pub(crate) fn as_bits_mut<U: Float>(s: &mut [U]) -> Option<&mut [u16]> {
    (std::mem::size_of::<U>() == 2).then(|| {
        // SAFETY: the 2-byte Float types are #[repr(transparent)] wrappers of u16, so the
        // slice's memory is a valid [u16] of the same length and alignment.
        unsafe { std::slice::from_raw_parts_mut(s.as_mut_ptr().cast::<u16>(), s.len()) }
    })
}

/// The bits of a 2-byte `U` (see [`as_bits_mut`]).
#[inline(always)]
pub(crate) fn to_bits<U: Float>(v: U) -> u16 {
    assert!(std::mem::size_of::<U>() == 2);
    // SAFETY: U is 2 bytes (asserted, compile-time constant) and a transparent u16.
    unsafe { std::mem::transmute_copy::<U, u16>(&v) }
}

#[inline]
fn dequantize_range_as<V: Copy>(
    packed: &[u8],
    code: &[f32; 16],
    block_size: usize,
    scale: impl Fn(usize) -> f32,
    start: usize,
    out: &mut [V],
    convert: impl Fn(f32) -> V,
) {
    let end = start + out.len();
    let mut e = start;
    let mut out = out;
    while e < end {
        let b = e / block_size;
        let block_end = ((b + 1) * block_size).min(end);
        let s = scale(b);
        // One product per code instead of one per element: the same f32 products, 16 of them
        // per block of (typically) 64 elements.
        let lut: [V; 16] = std::array::from_fn(|i| convert(code[i] * s));
        let (seg, rest) = out.split_at_mut(block_end - e);
        out = rest;
        let mut seg = seg;
        if e % 2 == 1 {
            seg[0] = lut[(packed[e / 2] & 0xF) as usize];
            seg = &mut seg[1..];
            e += 1;
        }
        // Now e is even: whole bytes, then maybe a lone high nibble.
        let bytes = &packed[e / 2..block_end / 2];
        let mut pairs = seg.chunks_exact_mut(2);
        for (pair, &byte) in (&mut pairs).zip(bytes) {
            pair[0] = lut[(byte >> 4) as usize];
            pair[1] = lut[(byte & 0xF) as usize];
        }
        if let [last] = pairs.into_remainder() {
            *last = lut[(packed[block_end / 2] >> 4) as usize];
        }
        e = block_end;
    }
}
