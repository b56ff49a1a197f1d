//! bitsandbytes' signed 8-bit "dynamic" code and its blockwise quantizer. 4-bit weights use it
//! to double-quantize their per-block absmax values (`compress_statistics=True`, QLoRA's
//! "double quantization"); it is public because 8-bit optimizer states use the same rules.
//!
//! Source: bitsandbytes `functional.py` `create_dynamic_map` (the code) and `csrc/kernels.cu`
//! `dQuantize<0>` / `kQuantizeBlockwise` / `kDequantizeBlockwise` (the rules), commit 95f9af3.

use rayon::prelude::*;

/// `create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8)`, sorted, as computed by
/// PyTorch's vectorised (AVX2/AVX-512) `linspace`, which is what bitsandbytes runs on any x86
/// host. The map is stored rather than recomputed because `linspace`'s rounding is part of it:
/// PyTorch's scalar fallback gives 42 entries an ulp off these. tools/golden/nf4_golden.py
/// regenerates it and tests/quant_golden.rs checks this table against it.
#[rustfmt::skip]
pub const DYNAMIC_CODE: [f32; 256] = [
    -0.99296874, -0.9789063, -0.96484375, -0.9507812, -0.93671876, -0.92265624,
    -0.9085938, -0.89453125, -0.8804687, -0.86640626, -0.85234374, -0.8382813,
    -0.82421875, -0.8101562, -0.79609376, -0.78203124, -0.7679688, -0.75390625,
    -0.7398437, -0.72578126, -0.7117188, -0.6976563, -0.68359375, -0.6695312,
    -0.65546876, -0.6414063, -0.6273438, -0.61328125, -0.5992187, -0.58515626,
    -0.5710938, -0.5570313, -0.54296875, -0.5289062, -0.5148437, -0.50078124,
    -0.4867187, -0.47265625, -0.45859373, -0.44453126, -0.43046874, -0.41640624,
    -0.40234375, -0.38828123, -0.37421876, -0.36015624, -0.34609374, -0.33203125,
    -0.31796873, -0.30390626, -0.28984374, -0.27578127, -0.26171875, -0.24765624,
    -0.23359375, -0.21953125, -0.20546874, -0.19140625, -0.17734376, -0.16328125,
    -0.14921875, -0.13515624, -0.12109375, -0.107031256, -0.09859375, -0.09578126,
    -0.092968754, -0.09015625, -0.08734375, -0.08453125, -0.08171876, -0.07890625,
    -0.07609375, -0.07328125, -0.070468746, -0.067656256, -0.06484375, -0.06203125,
    -0.059218753, -0.05640625, -0.05359375, -0.05078125, -0.04796875, -0.04515625,
    -0.042343747, -0.03953125, -0.036718752, -0.03390625, -0.03109375, -0.028281251,
    -0.02546875, -0.02265625, -0.019843752, -0.01703125, -0.01421875, -0.01140625,
    -0.00971875, -0.009156249, -0.00859375, -0.00803125, -0.00746875, -0.00690625,
    -0.00634375, -0.00578125, -0.0052187503, -0.0046562497, -0.00409375, -0.0035312497,
    -0.00296875, -0.00240625, -0.00184375, -0.0012812499, -0.0009437501, -0.00083125,
    -0.00071875006, -0.0006062501, -0.00049375003, -0.00038125002, -0.00026875004, -0.00015625001,
    -8.875e-05, -6.625e-05, -4.375e-05, -2.1249998e-05, -7.75e-06, -3.2500002e-06,
    -5.5000004e-07, 0.0, 5.5000004e-07, 3.2500002e-06, 7.75e-06, 2.1249998e-05,
    4.375e-05, 6.625e-05, 8.875e-05, 0.00015625001, 0.00026875004, 0.00038125002,
    0.00049375003, 0.0006062501, 0.00071875006, 0.00083125, 0.0009437501, 0.0012812499,
    0.00184375, 0.00240625, 0.00296875, 0.0035312497, 0.00409375, 0.0046562497,
    0.0052187503, 0.00578125, 0.00634375, 0.00690625, 0.00746875, 0.00803125,
    0.00859375, 0.009156249, 0.00971875, 0.01140625, 0.01421875, 0.01703125,
    0.019843752, 0.02265625, 0.02546875, 0.028281251, 0.03109375, 0.03390625,
    0.036718752, 0.03953125, 0.042343747, 0.04515625, 0.04796875, 0.05078125,
    0.05359375, 0.05640625, 0.059218753, 0.06203125, 0.06484375, 0.067656256,
    0.070468746, 0.07328125, 0.07609375, 0.07890625, 0.08171876, 0.08453125,
    0.08734375, 0.09015625, 0.092968754, 0.09578126, 0.09859375, 0.107031256,
    0.12109375, 0.13515624, 0.14921875, 0.16328125, 0.17734376, 0.19140625,
    0.20546874, 0.21953125, 0.23359375, 0.24765624, 0.26171875, 0.27578127,
    0.28984374, 0.30390626, 0.31796873, 0.33203125, 0.34609374, 0.36015624,
    0.37421876, 0.38828123, 0.40234375, 0.41640624, 0.43046874, 0.44453126,
    0.45859373, 0.47265625, 0.4867187, 0.50078124, 0.5148437, 0.5289062,
    0.54296875, 0.5570313, 0.5710938, 0.58515626, 0.5992187, 0.61328125,
    0.6273438, 0.6414063, 0.65546876, 0.6695312, 0.68359375, 0.6976563,
    0.7117188, 0.72578126, 0.7398437, 0.75390625, 0.7679688, 0.78203124,
    0.79609376, 0.8101562, 0.82421875, 0.8382813, 0.85234374, 0.86640626,
    0.8804687, 0.89453125, 0.9085938, 0.92265624, 0.93671876, 0.9507812,
    0.96484375, 0.9789063, 0.99296874, 1.0,
];

/// `dQuantize<0>` (kernels.cu): the index of the nearest code to `x` (already divided by the
/// block's absmax, so normally in [-1, 1]). A binary search over the sorted code, then the
/// nearer of the two neighbours by their f32 midpoint; the tie rules (`x > midpoint` goes up
/// from below, `x < midpoint` goes down from above) are bitsandbytes', kept branch for branch.
pub fn quantize_dynamic(code: &[f32; 256], x: f32) -> u8 {
    let mut pivot = 127usize;
    let mut upper_pivot = 255usize;
    let mut lower_pivot = 0usize;
    let mut lower = -1.0f32;
    let mut upper = 1.0f32;
    let mut val = code[pivot];
    let mut step = 64;
    while step > 0 {
        if x > val {
            lower_pivot = pivot;
            lower = val;
            pivot += step;
        } else {
            upper_pivot = pivot;
            upper = val;
            pivot -= step;
        }
        val = code[pivot];
        step >>= 1;
    }
    if upper_pivot == 255 {
        upper = code[upper_pivot];
    }
    if lower_pivot == 0 {
        lower = code[lower_pivot];
    }
    let idx = if x > val {
        if x > (upper + val) * 0.5 {
            upper_pivot
        } else {
            pivot
        }
    } else if x < (lower + val) * 0.5 {
        lower_pivot
    } else {
        pivot
    };
    idx as u8
}

/// bitsandbytes' `quantize_blockwise` with the dynamic code: per block of `block_size` values,
/// absmax = max |v| and codes of `v * (1 / absmax)`. Returns (codes, absmax per block).
pub fn quantize_blockwise(values: &[f32], block_size: usize) -> (Vec<u8>, Vec<f32>) {
    assert!(block_size > 0, "quantize_blockwise: block_size must be > 0");
    let mut codes = vec![0u8; values.len()];
    let mut absmax = vec![0f32; values.len().div_ceil(block_size)];
    codes
        .par_chunks_mut(block_size)
        .zip(values.par_chunks(block_size))
        .zip(absmax.par_iter_mut())
        .for_each(|((q, v), m)| {
            *m = v.iter().fold(0f32, |m, x| m.max(x.abs()));
            // 1/0 = inf and 0 * inf = NaN for an all-zero block, as on the GPU: NaN compares
            // false everywhere and lands on code 0, which dequantizes to -1 * 0.
            let inv = 1.0 / *m;
            for (q, &x) in q.iter_mut().zip(v) {
                *q = quantize_dynamic(&DYNAMIC_CODE, x * inv);
            }
        });
    (codes, absmax)
}

/// The inverse of [`quantize_blockwise`]: `code[q] * absmax` in f32.
pub fn dequantize_blockwise(codes: &[u8], absmax: &[f32], block_size: usize, out: &mut [f32]) {
    assert_eq!(
        out.len(),
        codes.len(),
        "dequantize_blockwise: out has {} elements, expected {}",
        out.len(),
        codes.len()
    );
    assert_eq!(
        absmax.len(),
        codes.len().div_ceil(block_size),
        "dequantize_blockwise: {} absmax values for {} codes in blocks of {block_size}",
        absmax.len(),
        codes.len()
    );
    for (i, (o, &q)) in out.iter_mut().zip(codes).enumerate() {
        *o = DYNAMIC_CODE[q as usize] * absmax[i / block_size];
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::Rng;

    #[test]
    fn code_is_sorted_signed_and_spans_minus_one_to_one() {
        assert!(DYNAMIC_CODE.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(DYNAMIC_CODE[127], 0.0);
        assert_eq!(DYNAMIC_CODE[255], 1.0);
        let first = DYNAMIC_CODE[0];
        assert!(first > -1.0 && first < -0.99, "{first}");
    }

    /// Away from exact midpoints the binary search must find the nearest code.
    #[test]
    fn quantize_dynamic_is_nearest_code() {
        let mut rng = Rng::new(5);
        for i in 0..20_000 {
            // Half the samples near zero, where the code is densest.
            let x = if i % 2 == 0 {
                rng.uniform()
            } else {
                rng.uniform() * 1e-3
            };
            let q = quantize_dynamic(&DYNAMIC_CODE, x) as usize;
            let best = (0..256)
                .min_by(|&a, &b| {
                    (DYNAMIC_CODE[a] - x)
                        .abs()
                        .total_cmp(&(DYNAMIC_CODE[b] - x).abs())
                })
                .unwrap();
            let (dq, db) = ((DYNAMIC_CODE[q] - x).abs(), (DYNAMIC_CODE[best] - x).abs());
            assert!(
                dq <= db * (1.0 + 1e-6),
                "x={x}: got code {q}, nearest {best}"
            );
        }
    }

    #[test]
    fn blockwise_round_trip_error_is_small() {
        let mut rng = Rng::new(6);
        let v = rng.vec(1000, 3.0);
        let (q, m) = quantize_blockwise(&v, 256);
        assert_eq!(m.len(), 4);
        let mut back = vec![0f32; v.len()];
        dequantize_blockwise(&q, &m, 256, &mut back);
        for (i, (a, b)) in v.iter().zip(&back).enumerate() {
            // The code's steps are at most 1/64 of the block's absmax away from 1.
            assert!((a - b).abs() <= m[i / 256] / 64.0, "[{i}] {a} vs {b}");
        }
    }
}
