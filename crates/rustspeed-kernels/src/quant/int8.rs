//! Row-wise absmax int8 (LLM.int8()'s weight format, bitsandbytes' `Int8Params`), *without*
//! LLM.int8()'s outlier decomposition: every column is quantized, none is kept in 16 bits, so
//! this matches `Linear8bitLt(threshold=0.0)`. Rules (bitsandbytes commit 95f9af3):
//!
//! - `backends/default/ops.py` `int8_vectorwise_quant`: `row_absmax = max |row|` (f32),
//!   `q = round(x * (127 / row_absmax))`, round-half-to-even (`torch.round`), as int8;
//! - `_ops.py` `int8_vectorwise_dequant`: `q * row_absmax * 7.874015718698502e-3` in f32.
//!
//! An all-zero row (0 * (127 / 0) = NaN, an undefined int8 cast in torch) is stored as 0s.

use rayon::prelude::*;

use super::four_bit::{as_bits_mut, to_bits};
use crate::dtype::{DType, Float};

/// `7.874015718698502e-3` (1/127) as torch applies it to an f32 tensor: the Python float
/// rounded to f32.
const INV_127: f32 = 7.874015718698502e-3_f64 as f32;

/// Quantizes the row-major `[rows, cols]` matrix `w`: (codes, absmax per row).
pub(crate) fn quantize<T: Float>(w: &[T], rows: usize, cols: usize) -> (Vec<i8>, Vec<f32>) {
    let mut q = vec![0i8; w.len()];
    let mut absmax = vec![0f32; rows];
    if cols == 0 {
        return (q, absmax);
    }
    q.par_chunks_mut(cols)
        .zip(w.par_chunks(cols))
        .zip(absmax.par_iter_mut())
        .for_each(|((q, row), m)| {
            *m = row.iter().fold(0f32, |m, x| m.max(x.to_f32().abs()));
            let scale = 127.0 / *m;
            for (q, x) in q.iter_mut().zip(row) {
                // `as i8` saturates and maps NaN (a zero row) to 0; |x * scale| <= 127 anyway.
                *q = (x.to_f32() * scale).round_ties_even() as i8;
            }
        });
    (q, absmax)
}

/// Below this many elements a row segment converts element by element rather than through a
/// 256-entry table.
const LUT_MIN_ELEMS: usize = 512;

/// Dequantizes `q` (elements of one row whose absmax is `absmax`) into `out`.
#[inline]
pub(crate) fn dequantize_row<U: Float>(q: &[i8], absmax: f32, out: &mut [U]) {
    let value = |v: i8| U::from_f32(v as f32 * absmax * INV_127);
    if U::DTYPE == DType::F32 || std::mem::size_of::<U>() != 2 || q.len() < LUT_MIN_ELEMS {
        for (o, &v) in out.iter_mut().zip(q) {
            *o = value(v);
        }
    } else {
        // f32 -> bf16/f16 rounding costs more than a lookup: convert each of the 256 codes
        // once per row (the same values, so the result is identical), and look up bits (see
        // four_bit::dequantize_range for why).
        let lut: [u16; 256] = std::array::from_fn(|i| to_bits(value(i as u8 as i8)));
        let out = as_bits_mut(out).expect("2-byte element type");
        for (o, &v) in out.iter_mut().zip(q) {
            *o = lut[v as u8 as usize];
        }
    }
}
