//! Per-block absmax of a 4-bit matrix: plain f32, or double-quantized (QLoRA's "double
//! quantization", bitsandbytes' `compress_statistics=True`).
//!
//! Double quantization, as `functional.quantize_4bit` does it: `offset = mean(absmax)`, then
//! `absmax - offset` is quantized with the 8-bit dynamic code in blocks of 256
//! ([`super::dynamic::quantize_blockwise`]), leaving one byte per 4-bit block plus one f32
//! per 256 blocks and the offset. Decoding is `code[q] * absmax2 + offset`, in f32, exactly as
//! `dequantize_4bit` (`dequantize_blockwise(...)` then `absmax += offset`).

use super::dynamic::{quantize_blockwise, DYNAMIC_CODE};

/// bitsandbytes' block size for the second-level quantization (`quantize_blockwise(...,
/// blocksize=256)` in `quantize_4bit`).
pub const DOUBLE_QUANT_BLOCK: usize = 256;

/// The scale of each 4-bit block.
#[derive(Clone, Debug, PartialEq)]
pub enum BlockScales {
    /// One f32 absmax per block.
    Plain(Vec<f32>),
    /// Double-quantized absmax (bitsandbytes' nested quant state).
    Double(DoubleQuantScales),
}

/// bitsandbytes' nested state: `quant_state.absmax` (u8 codes), `state2.absmax` (f32 per 256
/// codes) and `quant_state.offset`.
#[derive(Clone, Debug, PartialEq)]
pub struct DoubleQuantScales {
    pub codes: Vec<u8>,
    pub absmax2: Vec<f32>,
    pub offset: f32,
}

impl BlockScales {
    /// Stores `absmax`, double-quantized when asked.
    pub fn new(absmax: Vec<f32>, double_quant: bool) -> Self {
        if !double_quant {
            return BlockScales::Plain(absmax);
        }
        // bitsandbytes takes torch's f32 mean, whose summation order depends on the device, so
        // its last bit is not reproducible anyway; the f64 mean rounded once is the exact value.
        let offset = if absmax.is_empty() {
            0.0
        } else {
            (absmax.iter().map(|&v| v as f64).sum::<f64>() / absmax.len() as f64) as f32
        };
        let centred: Vec<f32> = absmax.iter().map(|&v| v - offset).collect();
        let (codes, absmax2) = quantize_blockwise(&centred, DOUBLE_QUANT_BLOCK);
        BlockScales::Double(DoubleQuantScales {
            codes,
            absmax2,
            offset,
        })
    }

    /// Number of blocks.
    pub fn len(&self) -> usize {
        match self {
            BlockScales::Plain(v) => v.len(),
            BlockScales::Double(d) => d.codes.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The absmax of block `b`, as bitsandbytes' dequantization uses it.
    #[inline]
    pub fn get(&self, b: usize) -> f32 {
        match self {
            BlockScales::Plain(v) => v[b],
            BlockScales::Double(d) => {
                DYNAMIC_CODE[d.codes[b] as usize] * d.absmax2[b / DOUBLE_QUANT_BLOCK] + d.offset
            }
        }
    }

    /// Storage in bytes (the shared 256-entry code is not counted: it is one static table here,
    /// where bitsandbytes keeps a 1 KiB copy in each nested quant state).
    pub fn bytes(&self) -> usize {
        match self {
            BlockScales::Plain(v) => 4 * v.len(),
            BlockScales::Double(d) => d.codes.len() + 4 * d.absmax2.len() + 4,
        }
    }

    /// Checks the parts of a [`BlockScales::Double`] agree with each other.
    pub(crate) fn check(&self, blocks: usize) -> Result<(), String> {
        if self.len() != blocks {
            return Err(format!("{} block scales, expected {blocks}", self.len()));
        }
        if let BlockScales::Double(d) = self {
            let want = blocks.div_ceil(DOUBLE_QUANT_BLOCK);
            if d.absmax2.len() != want {
                return Err(format!(
                    "{} second-level absmax values (nested_absmax), expected {want} for {blocks} \
                     blocks in groups of {DOUBLE_QUANT_BLOCK}",
                    d.absmax2.len()
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::Rng;

    #[test]
    fn double_quant_decodes_close_to_the_plain_absmax() {
        let mut rng = Rng::new(3);
        let absmax: Vec<f32> = (0..600)
            .map(|_| 0.05 + 0.05 * rng.uniform().abs())
            .collect();
        let s = BlockScales::new(absmax.clone(), true);
        let BlockScales::Double(d) = &s else {
            panic!("expected double quantization")
        };
        assert_eq!(d.absmax2.len(), 3);
        assert_eq!(s.bytes(), 600 + 12 + 4);
        for (b, &a) in absmax.iter().enumerate() {
            // 8-bit dynamic code on the centred values: error <= half a step near the top.
            let tol = d.absmax2[b / 256] / 64.0;
            assert!(
                (s.get(b) - a).abs() <= tol,
                "block {b}: {} vs {a}",
                s.get(b)
            );
        }
    }
}
