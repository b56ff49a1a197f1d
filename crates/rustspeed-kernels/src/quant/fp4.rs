//! bitsandbytes' FP4: 1 sign bit, 2 exponent bits (bias 2), 1 mantissa bit, with the
//! magnitudes {0, 0.0625, 2, 3, 4, 6, 8, 12} normalised by 12. Unlike NF4 the code is a float
//! encoding: bit 3 is the sign, so +0 (0b0000) and -0 (0b1000) both exist.
//!
//! Source: bitsandbytes `csrc/kernels.cu` `fp4_dequantization_lut`, `dDequantizeFP4Tree` and
//! `dQuantizeFP4` (commit 95f9af3).

/// `fp4_dequantization_lut` (index = the three low bits), bitsandbytes' literals.
#[allow(clippy::excessive_precision)]
const FP4_MAGNITUDE: [f32; 8] = [
    0.0,            // 0b000
    0.005208333333, // 0b001
    0.66666667,     // 0b010
    1.0,            // 0b011
    0.33333333,     // 0b100
    0.5,            // 0b101
    0.16666667,     // 0b110
    0.25,           // 0b111
];

/// The code book, index = the 4-bit code: `dDequantizeFP4Tree` = magnitude times the sign bit.
pub const FP4_CODE: [f32; 16] = {
    let mut c = [0f32; 16];
    let mut i = 0;
    while i < 16 {
        c[i] = if i & 8 != 0 {
            -FP4_MAGNITUDE[i & 7]
        } else {
            FP4_MAGNITUDE[i & 7]
        };
        i += 1;
    }
    c
};

/// `dQuantizeFP4`'s thresholds on |x|, sorted (the CUDA literals: some are truncated
/// midpoints, e.g. 0.583333, and that decides ties), and the magnitude code each interval maps
/// to: |x| <= 0.00260417 -> 0b000, ..., |x| > 0.8333333 -> 0b011.
#[allow(clippy::excessive_precision)]
const FP4_THRESHOLDS: [f32; 7] = [
    0.00260417, 0.0859375, 0.20833333, 0.29166667, 0.4166667, 0.583333, 0.8333333,
];
const FP4_INTERVAL_CODE: [u8; 8] = [0b000, 0b001, 0b110, 0b111, 0b100, 0b101, 0b010, 0b011];

/// `dQuantizeFP4`: the sign bit from `x < 0`, then the magnitude by strict `>` comparisons
/// on |x| (a tie goes to the smaller magnitude). Tiny negatives give -0 (0b1000), as on the GPU.
#[inline]
pub fn quantize_fp4(x: f32) -> u8 {
    let sign = if x < 0.0 { 0b1000 } else { 0 };
    let a = x.abs();
    let interval: usize = FP4_THRESHOLDS.iter().map(|&t| (a > t) as usize).sum();
    FP4_INTERVAL_CODE[interval] + sign
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_is_the_normalised_e2m1_set() {
        let mut mags: Vec<f32> = FP4_MAGNITUDE.iter().map(|m| m * 12.0).collect();
        mags.sort_by(f32::total_cmp);
        let want = [0.0, 0.0625, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0];
        for (m, w) in mags.iter().zip(want) {
            assert!((m - w).abs() < 1e-5, "{m} vs {w}");
        }
        assert_eq!(FP4_CODE[0b1011], -1.0);
    }

    /// Away from the thresholds, the code is the nearest representable value.
    #[test]
    fn quantize_is_nearest_with_sign() {
        for i in 0..=40_000 {
            let x = -1.0 + i as f32 * 5e-5;
            if FP4_THRESHOLDS.iter().any(|t| (x.abs() - t).abs() < 1e-5) {
                continue;
            }
            let q = quantize_fp4(x) as usize;
            let best = (0..16)
                .min_by(|&a, &b| (FP4_CODE[a] - x).abs().total_cmp(&(FP4_CODE[b] - x).abs()))
                .unwrap();
            assert_eq!(FP4_CODE[q], FP4_CODE[best], "x = {x}");
            if x != 0.0 {
                assert_eq!(q & 8 != 0, x < 0.0, "x = {x}: sign bit");
            }
        }
    }
}
