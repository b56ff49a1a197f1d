//! NF4 (4-bit NormalFloat, QLoRA): 16 quantiles of N(0, 1) scaled to [-1, 1]. The 4-bit index
//! is a position in the table, not a float encoding.
//!
//! Source: bitsandbytes `csrc/kernels.cu` `nf4_dequantization_lut` and `dQuantizeNF4` (commit
//! 95f9af3); the table is also `functional.get_4bit_type("nf4")` and REFERENCE.md §2.

/// The code book, index = the 4-bit code (bitsandbytes' literals, verbatim).
#[allow(clippy::excessive_precision)]
pub const NF4_CODE: [f32; 16] = [
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
];

/// The decision thresholds of `dQuantizeNF4`'s comparison tree, sorted: the midpoints between
/// neighbouring codes as the CUDA source spells them (f32 literals, which is what decides
/// ties). The tree is a balanced search over exactly these, each test `x > t`, so its answer
/// is the number of thresholds strictly below `x`.
#[allow(clippy::excessive_precision)]
const NF4_THRESHOLDS: [f32; 15] = [
    -0.8480964004993439,
    -0.6106329262256622,
    -0.4599952697753906,
    -0.33967943489551544,
    -0.23460740596055984,
    -0.13791173323988914,
    -0.045525018125772476,
    0.03979014977812767,
    0.1202552504837513,
    0.2035212516784668,
    0.2920137718319893,
    0.3893125355243683,
    0.5016634166240692,
    0.6427869200706482,
    0.8614784181118011,
];

/// `dQuantizeNF4`: the code for `x` (already scaled by 1/absmax). A tie (x exactly on a
/// threshold) goes to the lower code; NaN (an all-zero block's 0 * inf) gives code 0, as on
/// the GPU.
#[inline]
pub fn quantize_nf4(x: f32) -> u8 {
    NF4_THRESHOLDS.iter().map(|&t| (x > t) as u8).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thresholds_are_the_midpoints_of_the_code() {
        for (i, &t) in NF4_THRESHOLDS.iter().enumerate() {
            let mid = (NF4_CODE[i] as f64 + NF4_CODE[i + 1] as f64) / 2.0;
            assert!((t as f64 - mid).abs() < 1e-7, "threshold {i}: {t} vs {mid}");
        }
    }

    /// A literal port of the CUDA comparison tree, to pin the "count thresholds" form to it.
    #[allow(clippy::excessive_precision)]
    fn cuda_tree(x: f32) -> u8 {
        if x > 0.03979014977812767 {
            if x > 0.3893125355243683 {
                if x > 0.6427869200706482 {
                    if x > 0.8614784181118011 {
                        0b1111
                    } else {
                        0b1110
                    }
                } else if x > 0.5016634166240692 {
                    0b1101
                } else {
                    0b1100
                }
            } else if x > 0.2035212516784668 {
                if x > 0.2920137718319893 {
                    0b1011
                } else {
                    0b1010
                }
            } else if x > 0.1202552504837513 {
                0b1001
            } else {
                0b1000
            }
        } else if x > -0.33967943489551544 {
            if x > -0.13791173323988914 {
                if x > -0.045525018125772476 {
                    0b0111
                } else {
                    0b0110
                }
            } else if x > -0.23460740596055984 {
                0b0101
            } else {
                0b0100
            }
        } else if x > -0.6106329262256622 {
            if x > -0.4599952697753906 {
                0b0011
            } else {
                0b0010
            }
        } else if x > -0.8480964004993439 {
            0b0001
        } else {
            0b0000
        }
    }

    #[test]
    fn matches_the_cuda_tree_everywhere_that_matters() {
        let mut xs = vec![
            f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            0.0,
            -0.0,
            1.0,
            -1.0,
        ];
        for &t in &NF4_THRESHOLDS {
            xs.extend([t, t.next_up(), t.next_down()]);
        }
        // And a dense sweep of [-1.1, 1.1].
        xs.extend((0..=220_000).map(|i| -1.1 + i as f32 * 1e-5));
        for x in xs {
            assert_eq!(quantize_nf4(x), cuda_tree(x), "x = {x:e}");
        }
    }
}
