//! Rotary position embedding, HF LLaMA convention: the head dimension is split into two halves
//! and `x' = x * cos + rotate_half(x) * sin` with `rotate_half(x) = cat(-x2, x1)`.
//!
//! Frequencies follow transformers' `modeling_rope_utils.py` operation for operation in f32
//! (`_compute_default_rope_parameters`, `_compute_linear_scaling_rope_parameters`,
//! `_compute_llama3_parameters`), so tables match HF's to the last bit or so. HF's cos/sin tables
//! are `cat(freqs, freqs)`, i.e. both halves of a row are equal; [`RopeTable`] therefore stores
//! only the half row `[positions, head_dim / 2]`.

use crate::dtype::Float;
use rayon::prelude::*;

/// `rope_scaling` / `rope_parameters.rope_type` of an HF config.
#[derive(Clone, Debug, PartialEq)]
pub enum RopeScaling {
    /// `rope_type: "default"` or no scaling.
    None,
    /// `rope_type: "linear"`: every frequency divided by `factor` (positions / factor).
    Linear { factor: f32 },
    /// `rope_type: "llama3"` (Llama 3.1): long wavelengths divided by `factor`, short ones kept,
    /// a smooth interpolation in between.
    Llama3 {
        factor: f32,
        low_freq_factor: f32,
        high_freq_factor: f32,
        original_max_position_embeddings: usize,
    },
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum RopeError {
    #[error("rope: head_dim must be even and > 0, got {0}")]
    BadHeadDim(usize),
    #[error("rope: rope_theta must be finite and > 1, got {0}")]
    BadTheta(f32),
    #[error("rope: rope_scaling factor must be finite and > 0, got {0}")]
    BadFactor(f32),
    #[error(
        "rope: llama3 scaling needs high_freq_factor > low_freq_factor > 0 and \
         original_max_position_embeddings > 0, got low {low}, high {high}, original {original}"
    )]
    BadLlama3 {
        low: f32,
        high: f32,
        original: usize,
    },
    #[error("rope: position {position} is outside the table of {max_positions} positions")]
    PositionOutOfRange {
        position: usize,
        max_positions: usize,
    },
    #[error("rope: {what} has {got} elements, expected {expected}")]
    Shape {
        what: &'static str,
        expected: usize,
        got: usize,
    },
}

/// Inverse frequencies `[head_dim / 2]`, computed in f32 exactly as transformers does.
pub fn inv_freq(head_dim: usize, theta: f32, scaling: &RopeScaling) -> Result<Vec<f32>, RopeError> {
    if head_dim == 0 || !head_dim.is_multiple_of(2) {
        return Err(RopeError::BadHeadDim(head_dim));
    }
    if !theta.is_finite() || theta <= 1.0 {
        return Err(RopeError::BadTheta(theta));
    }
    // HF: 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim)), all f32.
    let default: Vec<f32> = (0..head_dim / 2)
        .map(|i| 1.0 / theta.powf((2 * i) as f32 / head_dim as f32))
        .collect();
    match *scaling {
        RopeScaling::None => Ok(default),
        RopeScaling::Linear { factor } => {
            check_factor(factor)?;
            Ok(default.into_iter().map(|f| f / factor).collect())
        }
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        } => {
            check_factor(factor)?;
            if !(low_freq_factor > 0.0 && high_freq_factor > low_freq_factor)
                || original_max_position_embeddings == 0
            {
                return Err(RopeError::BadLlama3 {
                    low: low_freq_factor,
                    high: high_freq_factor,
                    original: original_max_position_embeddings,
                });
            }
            let old_context_len = original_max_position_embeddings as f32;
            let low_freq_wavelen = old_context_len / low_freq_factor;
            let high_freq_wavelen = old_context_len / high_freq_factor;
            Ok(default
                .into_iter()
                .map(|f| {
                    let wavelen = (2.0 * std::f32::consts::PI) / f;
                    if wavelen < high_freq_wavelen {
                        f
                    } else if wavelen > low_freq_wavelen {
                        f / factor
                    } else {
                        // Same association order as HF so the f32 rounding agrees.
                        let smooth = (old_context_len / wavelen - low_freq_factor)
                            / (high_freq_factor - low_freq_factor);
                        (1.0 - smooth) * f / factor + smooth * f
                    }
                })
                .collect())
        }
    }
}

fn check_factor(factor: f32) -> Result<(), RopeError> {
    if factor.is_finite() && factor > 0.0 {
        Ok(())
    } else {
        Err(RopeError::BadFactor(factor))
    }
}

/// cos/sin of `position * inv_freq` for positions `0..max_positions`, f32, `[max_positions, head_dim / 2]`.
#[derive(Clone, Debug)]
pub struct RopeTable {
    pub head_dim: usize,
    pub max_positions: usize,
    pub inv_freq: Vec<f32>,
    pub cos: Vec<f32>,
    pub sin: Vec<f32>,
}

impl RopeTable {
    pub fn new(
        head_dim: usize,
        theta: f32,
        scaling: &RopeScaling,
        max_positions: usize,
    ) -> Result<Self, RopeError> {
        let inv_freq = inv_freq(head_dim, theta, scaling)?;
        let half = head_dim / 2;
        let mut cos = vec![0.0f32; max_positions * half];
        let mut sin = vec![0.0f32; max_positions * half];
        for p in 0..max_positions {
            for (i, &f) in inv_freq.iter().enumerate() {
                // HF forms the angle as an f32 product (inv_freq @ position_ids in f32), then
                // takes cos/sin of that f32; evaluating cos/sin in f64 gives the correctly
                // rounded value of the same angle.
                let angle = (p as f32 * f) as f64;
                cos[p * half + i] = angle.cos() as f32;
                sin[p * half + i] = angle.sin() as f32;
            }
        }
        Ok(RopeTable {
            head_dim,
            max_positions,
            inv_freq,
            cos,
            sin,
        })
    }

    fn row(&self, position: usize) -> Result<(&[f32], &[f32]), RopeError> {
        if position >= self.max_positions {
            return Err(RopeError::PositionOutOfRange {
                position,
                max_positions: self.max_positions,
            });
        }
        let half = self.head_dim / 2;
        let r = position * half..(position + 1) * half;
        Ok((&self.cos[r.clone()], &self.sin[r]))
    }
}

/// Position of each token of a `[B, T]` batch.
#[derive(Clone, Copy, Debug)]
pub enum Positions<'a> {
    /// `offset + t` for every sequence (training: 0; generation with a KV cache: the cache length).
    Offset(usize),
    /// Explicit position ids, `[B, T]` row-major (e.g. packed sequences that restart at 0).
    Ids(&'a [usize]),
}

/// Rotates `x` `[B, T, H, D]` in place (any number of heads `H`, so q and k alike).
pub fn rope_forward<T: Float>(
    x: &mut [T],
    table: &RopeTable,
    batch: usize,
    seq: usize,
    heads: usize,
    positions: Positions<'_>,
) -> Result<(), RopeError> {
    rotate(x, table, batch, seq, heads, positions, 1.0)
}

/// Backward of [`rope_forward`] in place on the gradient: the rotation is orthogonal, so the
/// input gradient is the output gradient rotated by the transposed matrix (angle negated).
pub fn rope_backward<T: Float>(
    dx: &mut [T],
    table: &RopeTable,
    batch: usize,
    seq: usize,
    heads: usize,
    positions: Positions<'_>,
) -> Result<(), RopeError> {
    rotate(dx, table, batch, seq, heads, positions, -1.0)
}

/// `sin_sign` = 1 rotates forward, -1 applies the transpose.
fn rotate<T: Float>(
    x: &mut [T],
    table: &RopeTable,
    batch: usize,
    seq: usize,
    heads: usize,
    positions: Positions<'_>,
    sin_sign: f32,
) -> Result<(), RopeError> {
    let d = table.head_dim;
    let half = d / 2;
    let row_len = heads * d;
    let expected = batch * seq * row_len;
    if x.len() != expected {
        return Err(RopeError::Shape {
            what: "rope input [B, T, H, D]",
            expected,
            got: x.len(),
        });
    }
    if let Positions::Ids(ids) = positions {
        if ids.len() != batch * seq {
            return Err(RopeError::Shape {
                what: "rope position ids [B, T]",
                expected: batch * seq,
                got: ids.len(),
            });
        }
    }
    if row_len == 0 || seq == 0 {
        return Ok(());
    }
    let position_of = |row: usize| match positions {
        Positions::Offset(o) => o + row % seq,
        Positions::Ids(ids) => ids[row],
    };
    // Validate every position up front so that an error leaves `x` untouched.
    for row in 0..batch * seq {
        table.row(position_of(row))?;
    }
    x.par_chunks_mut(row_len)
        .enumerate()
        .for_each(|(row, tokens)| {
            let (cos, sin) = table
                .row(position_of(row))
                .expect("positions checked above");
            for head in tokens.chunks_exact_mut(d) {
                let (x1, x2) = head.split_at_mut(half);
                for i in 0..half {
                    let a = x1[i].to_f32();
                    let b = x2[i].to_f32();
                    let (c, s) = (cos[i], sin[i] * sin_sign);
                    // [x1; x2] * cos + [-x2; x1] * sin
                    x1[i] = T::from_f32(a * c - b * s);
                    x2[i] = T::from_f32(b * c + a * s);
                }
            }
        });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::*;
    use half::bf16;

    fn llama3() -> RopeScaling {
        RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192,
        }
    }

    /// HF's formula written out directly: full [T, D] tables from cat(freqs, freqs) and
    /// `q * cos + rotate_half(q) * sin`, in f64.
    fn reference(x: &[f32], inv: &[f32], b: usize, t: usize, h: usize, pos: &[usize]) -> Vec<f64> {
        let half = inv.len();
        let d = 2 * half;
        let mut out = vec![0.0f64; x.len()];
        for bi in 0..b {
            for ti in 0..t {
                let p = pos[bi * t + ti] as f64;
                let freqs: Vec<f64> = inv.iter().map(|&f| p * f as f64).collect();
                let emb: Vec<f64> = freqs.iter().chain(freqs.iter()).copied().collect();
                for hi in 0..h {
                    let base = ((bi * t + ti) * h + hi) * d;
                    let q = &x[base..base + d];
                    let rot: Vec<f64> = (0..d)
                        .map(|i| {
                            if i < half {
                                -(q[i + half] as f64)
                            } else {
                                q[i - half] as f64
                            }
                        })
                        .collect();
                    for i in 0..d {
                        out[base + i] = q[i] as f64 * emb[i].cos() + rot[i] * emb[i].sin();
                    }
                }
            }
        }
        out
    }

    #[test]
    fn llama3_inv_freq_matches_hand_computed_values() {
        // theta 500000, head_dim 64, factor 8, low 1, high 4, original 8192; values from the
        // formula in f64 (i = 0..14 high frequency: kept; 15..17 interpolated; 18.. divided by 8).
        let inv = inv_freq(64, 500000.0, &llama3()).unwrap();
        let want = [
            (0, 1.0),
            (14, 3.211445995e-3),
            (15, 1.371893568e-3),
            (16, 5.248461610e-4),
            (17, 1.785078128e-4),
            (18, 7.784655274e-5),
            (31, 3.767322690e-7),
        ];
        for (i, w) in want {
            let rel = (inv[i] as f64 - w).abs() / w;
            assert!(
                rel < 2e-6,
                "inv_freq[{i}] = {} want {w} (rel {rel:.1e})",
                inv[i]
            );
        }
        let default = inv_freq(64, 500000.0, &RopeScaling::None).unwrap();
        assert_eq!(default[..15], inv[..15]);
        for i in 18..32 {
            assert_eq!(inv[i], default[i] / 8.0);
        }
    }

    #[test]
    fn default_and_linear_inv_freq() {
        let inv = inv_freq(8, 10000.0, &RopeScaling::None).unwrap();
        let want = [1.0, 0.1, 0.01, 0.001];
        for (g, w) in inv.iter().zip(want) {
            assert!((*g as f64 - w).abs() <= 1e-7 * w, "{g} vs {w}");
        }
        let lin = inv_freq(8, 10000.0, &RopeScaling::Linear { factor: 4.0 }).unwrap();
        for (l, d) in lin.iter().zip(&inv) {
            assert_eq!(*l, d / 4.0);
        }
    }

    #[test]
    fn forward_matches_hf_formula_for_each_scaling() {
        let (b, t, h, d) = (2, 7, 3, 16);
        for scaling in [
            RopeScaling::None,
            RopeScaling::Linear { factor: 2.5 },
            llama3(),
        ] {
            let theta = if matches!(scaling, RopeScaling::Llama3 { .. }) {
                500000.0
            } else {
                10000.0
            };
            let table = RopeTable::new(d, theta, &scaling, 64).unwrap();
            let mut rng = Rng::new(3);
            let x = rng.vec(b * t * h * d, 1.0);
            // Training positions with an offset, and explicit ids that differ per sequence.
            let offset: Vec<usize> = (0..b * t).map(|r| 5 + r % t).collect();
            let ids: Vec<usize> = (0..b * t).map(|r| (r * 7 + 3) % 64).collect();
            for (positions, pos) in [
                (Positions::Offset(5), &offset),
                (Positions::Ids(&ids), &ids),
            ] {
                let mut y = x.clone();
                rope_forward(&mut y, &table, b, t, h, positions).unwrap();
                let want = reference(&x, &table.inv_freq, b, t, h, pos);
                assert_close(&format!("rope {scaling:?}"), &y, &want, 2e-6);
            }
        }
    }

    #[test]
    fn backward_matches_finite_differences_and_inverts_forward() {
        let (b, t, h, d) = (1, 4, 2, 8);
        let table = RopeTable::new(d, 10000.0, &RopeScaling::None, 16).unwrap();
        let mut rng = Rng::new(11);
        let mut x = rng.vec(b * t * h * d, 1.0);
        let w = rng.vec(x.len(), 1.0);
        let mut dx = w.clone();
        rope_backward(&mut dx, &table, b, t, h, Positions::Offset(3)).unwrap();
        let num = numeric_grad(&mut x, 1e-2, |x| {
            let mut y = x.to_vec();
            rope_forward(&mut y, &table, b, t, h, Positions::Offset(3)).unwrap();
            y.iter().zip(&w).map(|(a, b)| *a as f64 * *b as f64).sum()
        });
        assert_grad_close("rope dx", &dx, &num, 1e-3);
        // Orthogonality: backward undoes forward.
        let mut y = x.clone();
        rope_forward(&mut y, &table, b, t, h, Positions::Offset(3)).unwrap();
        rope_backward(&mut y, &table, b, t, h, Positions::Offset(3)).unwrap();
        let x64: Vec<f64> = x.iter().map(|v| *v as f64).collect();
        assert_close("rope round trip", &y, &x64, 1e-6);
    }

    #[test]
    fn bf16_storage_close_to_f32() {
        let (b, t, h, d) = (2, 5, 2, 32);
        let table = RopeTable::new(d, 10000.0, &RopeScaling::None, 8).unwrap();
        let mut rng = Rng::new(5);
        let x: Vec<f32> = rng.vec(b * t * h * d, 2.0);
        let mut xb: Vec<bf16> = x.iter().map(|v| bf16::from_f32(*v)).collect();
        let mut xf: Vec<f32> = xb.iter().map(|v| v.to_f32()).collect();
        rope_forward(&mut xb, &table, b, t, h, Positions::Offset(0)).unwrap();
        rope_forward(&mut xf, &table, b, t, h, Positions::Offset(0)).unwrap();
        let want: Vec<f64> = xf.iter().map(|v| *v as f64).collect();
        let got: Vec<f32> = xb.iter().map(|v| v.to_f32()).collect();
        // One bf16 rounding of the result: 2^-8 relative.
        assert_close("rope bf16", &got, &want, 8e-3);
    }

    #[test]
    fn errors_name_the_problem() {
        assert_eq!(
            inv_freq(7, 10000.0, &RopeScaling::None),
            Err(RopeError::BadHeadDim(7))
        );
        assert_eq!(
            inv_freq(8, 10000.0, &RopeScaling::Linear { factor: 0.0 }),
            Err(RopeError::BadFactor(0.0))
        );
        let table = RopeTable::new(4, 10000.0, &RopeScaling::None, 4).unwrap();
        let mut x = vec![1.0f32; 2 * 3 * 4];
        let err = rope_forward(&mut x, &table, 1, 3, 2, Positions::Offset(2)).unwrap_err();
        assert_eq!(
            err,
            RopeError::PositionOutOfRange {
                position: 4,
                max_positions: 4
            }
        );
        assert!(
            x.iter().all(|v| *v == 1.0),
            "input must be untouched on error"
        );
        let err = rope_forward(&mut x, &table, 1, 3, 3, Positions::Offset(0)).unwrap_err();
        assert!(matches!(
            err,
            RopeError::Shape {
                expected: 36,
                got: 24,
                ..
            }
        ));
        let msg = RopeError::BadTheta(0.5).to_string();
        assert!(msg.contains("rope_theta") && msg.contains("0.5"), "{msg}");
    }
}
