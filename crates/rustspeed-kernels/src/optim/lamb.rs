//! LAMB with DeepSpeed's FusedLamb semantics (deepspeed/ops/lamb/fused_lamb.py,
//! csrc/lamb/fused_lamb_cuda_kernel.cu).
//!
//! Per element, with `sg = grad * grad_scale` (DeepSpeed divides by its `scale`; the engine
//! passes the reciprocal here):
//!
//! ```text
//! m = b1*m + (1-b1)*sg;   v = b2*v + (1-b2)*sg*sg
//! update = m / (sqrt(v) + eps) + wd*p        (eps_inside_sqrt: m / sqrt(v + eps))
//! ```
//!
//! and per parameter tensor: `coeff = |p| / |update|` clamped to `[min_coeff, max_coeff]`,
//! or 1 when either norm is 0; then `p -= step_size * coeff * update` with
//! `step_size = lr * sqrt(1 - b2^t) / (1 - b1^t)` (bias correction folded into the step
//! size, so the trust ratio sees the uncorrected moments, as DeepSpeed's kernel does).
//!
//! The trust ratio needs whole-tensor norms, so this is two passes: [`lamb_prepare`] updates
//! the moments and returns each tensor's partial squared norms, [`lamb_apply`] updates the
//! parameters given one coefficient per tensor. A ZeRO partition that cuts a tensor
//! all-reduces the partial norms of that tensor between the two; [`lamb_step`] does all of it
//! for a range made of whole tensors.

use rayon::prelude::*;

use super::{blocks, check_len, check_out, pieces, HalfOut, OptimError, Piece};

const NAME: &str = "lamb";

/// DeepSpeed FusedLamb's defaults. (`max_grad_norm` is not here: the engine clips.)
#[derive(Clone, Debug, PartialEq)]
pub struct LambParams {
    pub lr: f64,
    pub bias_correction: bool,
    pub betas: (f64, f64),
    pub eps: f64,
    pub eps_inside_sqrt: bool,
    pub weight_decay: f64,
    pub max_coeff: f64,
    pub min_coeff: f64,
}

impl Default for LambParams {
    fn default() -> Self {
        LambParams {
            lr: 1e-3,
            bias_correction: true,
            betas: (0.9, 0.999),
            eps: 1e-8,
            eps_inside_sqrt: false,
            weight_decay: 0.0,
            max_coeff: 10.0,
            min_coeff: 0.01,
        }
    }
}

#[derive(Debug)]
pub struct LambBuffers<'a> {
    pub params: &'a mut [f32],
    pub grads: &'a [f32],
    pub exp_avg: &'a mut [f32],
    pub exp_avg_sq: &'a mut [f32],
    pub out: HalfOut<'a>,
}

/// Squared norms of one tensor's (part of the) parameters and update, in f64.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct LambNorms {
    pub param_sq: f64,
    pub update_sq: f64,
}

/// Sum of the partial norms of disjoint parts of one tensor.
impl std::ops::Add for LambNorms {
    type Output = LambNorms;

    fn add(self, other: LambNorms) -> LambNorms {
        LambNorms {
            param_sq: self.param_sq + other.param_sq,
            update_sq: self.update_sq + other.update_sq,
        }
    }
}

#[derive(Clone, Copy)]
struct Consts {
    grad_scale: f32,
    beta1: f32,
    one_minus_beta1: f32,
    beta2: f32,
    one_minus_beta2: f32,
    eps: f32,
    eps_inside: bool,
    weight_decay: f32,
}

impl Consts {
    fn new(hp: &LambParams, grad_scale: f32) -> Self {
        let (b1, b2) = hp.betas;
        Consts {
            grad_scale,
            beta1: b1 as f32,
            one_minus_beta1: (1.0 - b1) as f32,
            beta2: b2 as f32,
            one_minus_beta2: (1.0 - b2) as f32,
            eps: hp.eps as f32,
            eps_inside: hp.eps_inside_sqrt,
            weight_decay: hp.weight_decay as f32,
        }
    }

    #[inline(always)]
    fn update(&self, p: f32, m: f32, v: f32) -> f32 {
        let denom = if self.eps_inside {
            (v + self.eps).sqrt()
        } else {
            v.sqrt() + self.eps
        };
        m / denom + self.weight_decay * p
    }
}

fn check_segments(n: usize, tensor_lens: &[usize]) -> Result<(), OptimError> {
    let sum: usize = tensor_lens.iter().sum();
    if sum == n {
        Ok(())
    } else {
        Err(OptimError::SegmentSum {
            optimizer: NAME,
            sum,
            expected: n,
        })
    }
}

/// Pass 1: updates the moments and returns, per tensor (`tensor_lens` partition the range
/// in order), the squared norms of the parameters and of the update.
pub fn lamb_prepare(
    hp: &LambParams,
    grad_scale: f32,
    bufs: &mut LambBuffers<'_>,
    tensor_lens: &[usize],
) -> Result<Vec<LambNorms>, OptimError> {
    let n = bufs.params.len();
    check_len(NAME, "grads", n, bufs.grads.len())?;
    check_len(NAME, "exp_avg", n, bufs.exp_avg.len())?;
    check_len(NAME, "exp_avg_sq", n, bufs.exp_avg_sq.len())?;
    check_segments(n, tensor_lens)?;
    let c = Consts::new(hp, grad_scale);
    let partial: Vec<(usize, LambNorms)> = pieces(
        tensor_lens,
        [&*bufs.params, bufs.grads],
        [&mut *bufs.exp_avg, &mut *bufs.exp_avg_sq],
        HalfOut::None,
    )
    .into_par_iter()
    .map(|piece| (piece.segment, prepare_piece(&c, piece)))
    .collect();
    // Pieces come back in index order, so each tensor's sum has a fixed order.
    let mut norms = vec![LambNorms::default(); tensor_lens.len()];
    for (seg, part) in partial {
        norms[seg] = norms[seg] + part;
    }
    Ok(norms)
}

/// DeepSpeed's trust ratio from a tensor's complete squared norms.
pub fn lamb_trust_ratio(hp: &LambParams, norms: LambNorms) -> f32 {
    let w = norms.param_sq.sqrt() as f32;
    let u = norms.update_sq.sqrt() as f32;
    if w != 0.0 && u != 0.0 {
        (w / u).clamp(hp.min_coeff as f32, hp.max_coeff as f32)
    } else {
        1.0
    }
}

/// Pass 2: `p -= step_size * coeff * update` with one coefficient per tensor; writes the
/// half-precision copy if asked. The moments must be those left by [`lamb_prepare`].
pub fn lamb_apply(
    hp: &LambParams,
    step: u64,
    bufs: LambBuffers<'_>,
    tensor_lens: &[usize],
    coeffs: &[f32],
) -> Result<(), OptimError> {
    let n = bufs.params.len();
    check_len(NAME, "exp_avg", n, bufs.exp_avg.len())?;
    check_len(NAME, "exp_avg_sq", n, bufs.exp_avg_sq.len())?;
    check_out(NAME, &bufs.out, n)?;
    check_segments(n, tensor_lens)?;
    if coeffs.len() != tensor_lens.len() {
        return Err(OptimError::CoeffCount {
            optimizer: NAME,
            got: coeffs.len(),
            expected: tensor_lens.len(),
        });
    }
    if step == 0 {
        return Err(OptimError::ZeroStep { optimizer: NAME });
    }
    let step_size = if hp.bias_correction {
        let t = step as f64;
        let (b1, b2) = hp.betas;
        (hp.lr * (1.0 - b2.powf(t)).sqrt() / (1.0 - b1.powf(t))) as f32
    } else {
        hp.lr as f32
    };
    let c = Consts::new(hp, 1.0);
    pieces(
        tensor_lens,
        [&*bufs.exp_avg, &*bufs.exp_avg_sq],
        [bufs.params],
        bufs.out,
    )
    .into_par_iter()
    .for_each(|piece| {
        let scale = step_size * coeffs[piece.segment];
        apply_piece(&c, scale, piece)
    });
    Ok(())
}

/// Both passes for a range made of whole tensors. Returns the trust coefficients
/// (DeepSpeed's `get_lamb_coeffs()`).
pub fn lamb_step(
    hp: &LambParams,
    step: u64,
    grad_scale: f32,
    mut bufs: LambBuffers<'_>,
    tensor_lens: &[usize],
) -> Result<Vec<f32>, OptimError> {
    check_out(NAME, &bufs.out, bufs.params.len())?;
    if step == 0 {
        return Err(OptimError::ZeroStep { optimizer: NAME });
    }
    let norms = lamb_prepare(hp, grad_scale, &mut bufs, tensor_lens)?;
    let coeffs: Vec<f32> = norms.iter().map(|n| lamb_trust_ratio(hp, *n)).collect();
    lamb_apply(hp, step, bufs, tensor_lens, &coeffs)?;
    Ok(coeffs)
}

multiversion! {
    fn prepare_piece(c: &Consts, piece: Piece<'_, 2, 2>) -> LambNorms {
        let Piece { reads: [p, g], writes: [m, v], .. } = piece;
        let mut w_sq = [0.0f64; 4];
        let mut u_sq = [0.0f64; 4];
        for (s, e) in blocks(p.len()) {
            let (p, g, m, v) = (&p[s..e], &g[s..e], &mut m[s..e], &mut v[s..e]);
            for i in 0..p.len() {
                let sg = g[i] * c.grad_scale;
                let mi = c.beta1 * m[i] + c.one_minus_beta1 * sg;
                let vi = c.beta2 * v[i] + c.one_minus_beta2 * sg * sg;
                m[i] = mi;
                v[i] = vi;
                let u = c.update(p[i], mi, vi) as f64;
                let pi = p[i] as f64;
                w_sq[i % 4] += pi * pi;
                u_sq[i % 4] += u * u;
            }
        }
        LambNorms {
            param_sq: w_sq.iter().sum(),
            update_sq: u_sq.iter().sum(),
        }
    }
}

multiversion! {
    fn apply_piece(c: &Consts, scale: f32, piece: Piece<'_, 2, 1>) {
        let Piece { reads: [m, v], writes: [p], mut out, .. } = piece;
        for (s, e) in blocks(p.len()) {
            let (p, m, v) = (&mut p[s..e], &m[s..e], &v[s..e]);
            for i in 0..p.len() {
                p[i] -= scale * c.update(p[i], m[i], v[i]);
            }
            out.write(s, p);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{assert_close, Rng};
    use half::bf16;

    /// FusedLamb in f64, tensor by tensor.
    fn reference(hp: &LambParams, p0: &[f32], steps: &[Vec<f32>], lens: &[usize]) -> Vec<f64> {
        let (b1, b2) = hp.betas;
        let mut p: Vec<f64> = p0.iter().map(|&x| x as f64).collect();
        let mut m = vec![0.0f64; p.len()];
        let mut v = vec![0.0f64; p.len()];
        for (t, g) in steps.iter().enumerate() {
            let t = (t + 1) as f64;
            let step_size = hp.lr * (1.0 - b2.powf(t)).sqrt() / (1.0 - b1.powf(t));
            let mut start = 0;
            for &len in lens {
                let r = start..start + len;
                start += len;
                let mut upd = Vec::with_capacity(len);
                for i in r.clone() {
                    m[i] = b1 * m[i] + (1.0 - b1) * g[i] as f64;
                    v[i] = b2 * v[i] + (1.0 - b2) * (g[i] as f64).powi(2);
                    upd.push(m[i] / (v[i].sqrt() + hp.eps) + hp.weight_decay * p[i]);
                }
                let w = r.clone().map(|i| p[i] * p[i]).sum::<f64>().sqrt();
                let u = upd.iter().map(|x| x * x).sum::<f64>().sqrt();
                let coeff = if w != 0.0 && u != 0.0 {
                    (w / u).clamp(hp.min_coeff, hp.max_coeff)
                } else {
                    1.0
                };
                for (k, i) in r.enumerate() {
                    p[i] -= step_size * coeff * upd[k];
                }
            }
        }
        p
    }

    fn data(n: usize, steps: usize, seed: u64) -> (Vec<f32>, Vec<Vec<f32>>) {
        let mut rng = Rng::new(seed);
        (
            rng.vec(n, 1.0),
            (0..steps).map(|_| rng.vec(n, 0.1)).collect(),
        )
    }

    fn run(
        hp: &LambParams,
        p0: &[f32],
        steps: &[Vec<f32>],
        lens: &[usize],
        gs: f32,
    ) -> (Vec<f32>, Vec<Vec<f32>>) {
        let mut p = p0.to_vec();
        let (mut m, mut v) = (vec![0.0f32; p.len()], vec![0.0f32; p.len()]);
        let mut all = Vec::new();
        for (t, g) in steps.iter().enumerate() {
            let bufs = LambBuffers {
                params: &mut p,
                grads: g,
                exp_avg: &mut m,
                exp_avg_sq: &mut v,
                out: HalfOut::None,
            };
            all.push(lamb_step(hp, t as u64 + 1, gs, bufs, lens).unwrap());
        }
        (p, all)
    }

    #[test]
    fn matches_f64_reference_with_per_tensor_trust_ratio() {
        // A large tensor spanning chunks, a tiny one, an all-zero one (coeff 1), and one whose
        // ratio hits max_coeff (large weights: the Adam-like update is ~1 per element).
        let lens = [super::super::CHUNK + 100, 7, 50, 300];
        let n: usize = lens.iter().sum();
        let (mut p0, mut steps) = data(n, 4, 13);
        let z = lens[0] + lens[1];
        p0[z..z + 50].iter_mut().for_each(|x| *x = 0.0);
        for g in &mut steps {
            g[z..z + 50].iter_mut().for_each(|x| *x = 0.0);
        }
        p0[n - 300..].iter_mut().for_each(|x| *x *= 100.0);
        let hp = LambParams {
            lr: 1e-2,
            weight_decay: 0.01,
            ..Default::default()
        };
        let (p, coeffs) = run(&hp, &p0, &steps, &lens, 1.0);
        assert_close("lamb", &p, &reference(&hp, &p0, &steps, &lens), 1e-5);
        assert_eq!(coeffs[0].len(), 4);
        assert_eq!(coeffs[0][2], 1.0, "zero tensor keeps coefficient 1");
        assert_eq!(coeffs[0][3], 10.0, "large weights clamp at max_coeff");
        assert!(coeffs
            .iter()
            .all(|c| c.iter().all(|&x| (0.01..=10.0).contains(&x))));
    }

    #[test]
    fn trust_ratio_clamps() {
        let hp = LambParams::default();
        assert_eq!(
            lamb_trust_ratio(
                &hp,
                LambNorms {
                    param_sq: 1e6,
                    update_sq: 1.0
                }
            ),
            10.0
        );
        assert_eq!(
            lamb_trust_ratio(
                &hp,
                LambNorms {
                    param_sq: 1e-8,
                    update_sq: 1.0
                }
            ),
            0.01
        );
        assert_eq!(
            lamb_trust_ratio(
                &hp,
                LambNorms {
                    param_sq: 4.0,
                    update_sq: 1.0
                }
            ),
            2.0
        );
        assert_eq!(
            lamb_trust_ratio(
                &hp,
                LambNorms {
                    param_sq: 0.0,
                    update_sq: 1.0
                }
            ),
            1.0
        );
    }

    /// A tensor cut between two "ranks": each prepares its part, the partial norms are summed
    /// (the all-reduce), and each applies the shared coefficient.
    #[test]
    fn partitioned_tensor_equals_whole() {
        let lens = [1000, 3000];
        let (p0, steps) = data(4000, 3, 17);
        let hp = LambParams {
            lr: 1e-2,
            weight_decay: 0.1,
            ..Default::default()
        };
        let (whole, _) = run(&hp, &p0, &steps, &lens, 0.5);
        let mut p = p0.clone();
        let (mut m, mut v) = (vec![0.0f32; 4000], vec![0.0f32; 4000]);
        let cut = 2500; // rank 0: tensor 0 + 1500 of tensor 1; rank 1: the other 1500.
        for (t, g) in steps.iter().enumerate() {
            let (pa, pb) = p.split_at_mut(cut);
            let (ma, mb) = m.split_at_mut(cut);
            let (va, vb) = v.split_at_mut(cut);
            let mut a = LambBuffers {
                params: pa,
                grads: &g[..cut],
                exp_avg: ma,
                exp_avg_sq: va,
                out: HalfOut::None,
            };
            let mut b = LambBuffers {
                params: pb,
                grads: &g[cut..],
                exp_avg: mb,
                exp_avg_sq: vb,
                out: HalfOut::None,
            };
            let na = lamb_prepare(&hp, 0.5, &mut a, &[1000, 1500]).unwrap();
            let nb = lamb_prepare(&hp, 0.5, &mut b, &[1500]).unwrap();
            let shared = na[1] + nb[0];
            let c0 = lamb_trust_ratio(&hp, na[0]);
            let c1 = lamb_trust_ratio(&hp, shared);
            lamb_apply(&hp, t as u64 + 1, a, &[1000, 1500], &[c0, c1]).unwrap();
            lamb_apply(&hp, t as u64 + 1, b, &[1500], &[c1]).unwrap();
        }
        assert_close(
            "partitioned lamb",
            &p,
            &whole.iter().map(|&x| x as f64).collect::<Vec<_>>(),
            1e-6,
        );
    }

    #[test]
    fn grad_scale_and_half_out_and_errors() {
        let lens = [600, 400];
        let (p0, steps) = data(1000, 2, 19);
        let hp = LambParams {
            lr: 1e-2,
            ..Default::default()
        };
        let (folded, _) = run(&hp, &p0, &steps, &lens, 0.25);
        let pre: Vec<Vec<f32>> = steps
            .iter()
            .map(|g| g.iter().map(|x| x * 0.25).collect())
            .collect();
        assert_eq!(run(&hp, &p0, &pre, &lens, 1.0).0, folded);

        let mut p = p0.clone();
        let (mut m, mut v, mut o) = (
            vec![0.0f32; 1000],
            vec![0.0f32; 1000],
            vec![bf16::ZERO; 1000],
        );
        let bufs = LambBuffers {
            params: &mut p,
            grads: &steps[0],
            exp_avg: &mut m,
            exp_avg_sq: &mut v,
            out: HalfOut::Bf16(&mut o),
        };
        lamb_step(&hp, 1, 1.0, bufs, &lens).unwrap();
        assert!(o.iter().zip(&p).all(|(o, x)| *o == bf16::from_f32(*x)));

        let bufs = LambBuffers {
            params: &mut p,
            grads: &steps[0],
            exp_avg: &mut m,
            exp_avg_sq: &mut v,
            out: HalfOut::None,
        };
        let err = lamb_step(&hp, 2, 1.0, bufs, &[600, 300]).unwrap_err();
        assert_eq!(
            err,
            OptimError::SegmentSum {
                optimizer: "lamb",
                sum: 900,
                expected: 1000
            }
        );
    }
}
