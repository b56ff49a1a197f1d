//! Adam / AdamW, fused: one pass over (param, grad, exp_avg, exp_avg_sq) per element.
//!
//! Formula and operation order are torch's single-tensor `Adam`/`AdamW` (the default on CPU),
//! so goldens made with torch agree to the last bit or so:
//!
//! ```text
//! g  = grad * grad_scale
//! L2 mode (adam_w_mode = false):  g = fma(p, wd, g)          torch: grad.add(param, alpha=wd)
//! decoupled (adam_w_mode = true): p = p * (1 - lr*wd)        torch: param.mul_(1 - lr*wd)
//! m  = lerp(m, g, 1 - beta1)                                 torch: exp_avg.lerp_(grad, 1-beta1)
//! v  = v * beta2 + ((1 - beta2) * g) * g                     torch: mul_(beta2).addcmul_(g, g, 1-beta2)
//! denom = sqrt(v) / sqrt(1 - beta2^step) + eps
//! p  = p + (-(lr / (1 - beta1^step)) * m) / denom            torch: addcdiv_(m, denom, -step_size)
//! ```
//!
//! Scalars are computed in f64 (Python floats in torch) and rounded to f32 once. `lerp`
//! follows ATen's vectorised kernel (an fma around `g - m`, with the `weight >= 0.5` branch).
//! `bias_correction = false` (a DeepSpeed flag; torch always corrects) sets both corrections
//! to 1.
//!
//! DeepSpeed's own `DeepSpeedCPUAdam` (csrc/includes/cpu_adam.h) computes the same update in
//! a different order: `m = fma(g, 1-b1, m*b1)` instead of lerp, `v = fma(g*g, 1-b2, v*b2)`,
//! multiplies by `1/sqrt(bc2)` instead of dividing, and applies decay only when `wd > 0`.
//! The results differ from torch's in the last bits only; we follow torch because the golden
//! runs are torch's.

use rayon::prelude::*;

use super::{blocks, check_len, check_out, pieces, HalfOut, OptimError, Piece};

const NAME: &str = "adam";

/// Hyper-parameters of one parameter group, with DeepSpeed's defaults (FusedAdam /
/// DeepSpeedCPUAdam: lr 1e-3, betas (0.9, 0.999), eps 1e-8, wd 0, bias correction on,
/// AdamW mode on: `"type": "Adam"` is AdamW unless `adam_w_mode: false`).
#[derive(Clone, Debug, PartialEq)]
pub struct AdamParams {
    pub lr: f64,
    pub betas: (f64, f64),
    pub eps: f64,
    pub weight_decay: f64,
    pub bias_correction: bool,
    /// true: decoupled weight decay (AdamW); false: L2 penalty added to the gradient (Adam).
    pub adam_w_mode: bool,
}

impl Default for AdamParams {
    fn default() -> Self {
        AdamParams {
            lr: 1e-3,
            betas: (0.9, 0.999),
            eps: 1e-8,
            weight_decay: 0.0,
            bias_correction: true,
            adam_w_mode: true,
        }
    }
}

/// The buffers of one contiguous range (a group, a ZeRO partition, or both), equal lengths.
#[derive(Debug)]
pub struct AdamBuffers<'a> {
    pub params: &'a mut [f32],
    pub grads: &'a [f32],
    pub exp_avg: &'a mut [f32],
    pub exp_avg_sq: &'a mut [f32],
    pub out: HalfOut<'a>,
}

/// Per-step constants, rounded to f32 the way torch hands Python scalars to its kernels.
#[derive(Clone, Copy)]
struct Consts {
    grad_scale: f32,
    l2_decay: f32,
    decay_factor: f32,
    lerp_coeff: f32,
    lerp_small: bool,
    beta2: f32,
    one_minus_beta2: f32,
    bc2_sqrt: f32,
    eps: f32,
    neg_step_size: f32,
}

impl Consts {
    fn new(hp: &AdamParams, step: u64, grad_scale: f32) -> Self {
        let (beta1, beta2) = hp.betas;
        let (bc1, bc2) = if hp.bias_correction {
            let s = step as f64;
            (1.0 - beta1.powf(s), 1.0 - beta2.powf(s))
        } else {
            (1.0, 1.0)
        };
        let weight = (1.0 - beta1) as f32;
        let lerp_small = weight.abs() < 0.5;
        let decoupled = hp.adam_w_mode && hp.weight_decay != 0.0;
        Consts {
            grad_scale,
            l2_decay: if hp.adam_w_mode {
                0.0
            } else {
                hp.weight_decay as f32
            },
            decay_factor: if decoupled {
                (1.0 - hp.lr * hp.weight_decay) as f32
            } else {
                1.0
            },
            lerp_coeff: if lerp_small { weight } else { weight - 1.0 },
            lerp_small,
            beta2: beta2 as f32,
            one_minus_beta2: (1.0 - beta2) as f32,
            bc2_sqrt: bc2.sqrt() as f32,
            eps: hp.eps as f32,
            neg_step_size: (-(hp.lr / bc1)) as f32,
        }
    }
}

/// One Adam/AdamW step over a range. `step` counts applied optimizer steps including this
/// one (1 on the first), as torch's `state['step']` after its increment.
pub fn adam_step(
    hp: &AdamParams,
    step: u64,
    grad_scale: f32,
    bufs: AdamBuffers<'_>,
) -> Result<(), OptimError> {
    let n = bufs.params.len();
    check_len(NAME, "grads", n, bufs.grads.len())?;
    check_len(NAME, "exp_avg", n, bufs.exp_avg.len())?;
    check_len(NAME, "exp_avg_sq", n, bufs.exp_avg_sq.len())?;
    check_out(NAME, &bufs.out, n)?;
    if step == 0 {
        return Err(OptimError::ZeroStep { optimizer: NAME });
    }
    let c = Consts::new(hp, step, grad_scale);
    let l2 = !hp.adam_w_mode && hp.weight_decay != 0.0;
    pieces(
        &[n],
        [bufs.grads],
        [bufs.params, bufs.exp_avg, bufs.exp_avg_sq],
        bufs.out,
    )
    .into_par_iter()
    .for_each(|piece| {
        if l2 {
            piece_l2(&c, piece)
        } else {
            piece_plain(&c, piece)
        }
    });
    Ok(())
}

multiversion! {
    fn piece_l2(c: &Consts, piece: Piece<'_, 1, 3>) {
        run_piece::<true>(c, piece)
    }
}

multiversion! {
    fn piece_plain(c: &Consts, piece: Piece<'_, 1, 3>) {
        run_piece::<false>(c, piece)
    }
}

#[inline(always)]
fn run_piece<const L2: bool>(c: &Consts, piece: Piece<'_, 1, 3>) {
    let Piece {
        reads: [grads],
        writes: [params, m, v],
        mut out,
        ..
    } = piece;
    for (s, e) in blocks(params.len()) {
        update::<L2>(
            c,
            &mut params[s..e],
            &grads[s..e],
            &mut m[s..e],
            &mut v[s..e],
        );
        out.write(s, &params[s..e]);
    }
}

#[inline(always)]
fn update<const L2: bool>(c: &Consts, p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32]) {
    let n = p.len();
    let (g, m, v) = (&g[..n], &mut m[..n], &mut v[..n]);
    for i in 0..n {
        let mut gi = g[i] * c.grad_scale;
        let mut pi = p[i];
        if L2 {
            gi = pi.mul_add(c.l2_decay, gi);
        } else {
            pi *= c.decay_factor;
        }
        let mi = m[i];
        let base = if c.lerp_small { mi } else { gi };
        let mi = c.lerp_coeff.mul_add(gi - mi, base);
        let vi = v[i] * c.beta2 + c.one_minus_beta2 * gi * gi;
        let denom = vi.sqrt() / c.bc2_sqrt + c.eps;
        p[i] = pi + c.neg_step_size * mi / denom;
        m[i] = mi;
        v[i] = vi;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::Rng;
    use half::{bf16, f16};

    /// The same formula in f64, no fma: the mathematical reference.
    fn reference(hp: &AdamParams, steps: &[Vec<f32>], p0: &[f32], gs: f32) -> Vec<f64> {
        let (b1, b2) = hp.betas;
        let mut p: Vec<f64> = p0.iter().map(|&x| x as f64).collect();
        let mut m = vec![0.0f64; p.len()];
        let mut v = vec![0.0f64; p.len()];
        for (t, grads) in steps.iter().enumerate() {
            let t = (t + 1) as f64;
            let (bc1, bc2) = if hp.bias_correction {
                (1.0 - b1.powf(t), 1.0 - b2.powf(t))
            } else {
                (1.0, 1.0)
            };
            for i in 0..p.len() {
                let mut g = grads[i] as f64 * gs as f64;
                if hp.adam_w_mode {
                    p[i] *= 1.0 - hp.lr * hp.weight_decay;
                } else {
                    g += hp.weight_decay * p[i];
                }
                m[i] = b1 * m[i] + (1.0 - b1) * g;
                v[i] = b2 * v[i] + (1.0 - b2) * g * g;
                let denom = v[i].sqrt() / bc2.sqrt() + hp.eps;
                p[i] -= hp.lr / bc1 * m[i] / denom;
            }
        }
        p
    }

    struct Run {
        p: Vec<f32>,
        m: Vec<f32>,
        v: Vec<f32>,
    }

    fn run(hp: &AdamParams, p0: &[f32], steps: &[Vec<f32>], gs: f32) -> Run {
        let n = p0.len();
        let mut r = Run {
            p: p0.to_vec(),
            m: vec![0.0; n],
            v: vec![0.0; n],
        };
        for (t, g) in steps.iter().enumerate() {
            let bufs = AdamBuffers {
                params: &mut r.p,
                grads: g,
                exp_avg: &mut r.m,
                exp_avg_sq: &mut r.v,
                out: HalfOut::None,
            };
            adam_step(hp, t as u64 + 1, gs, bufs).unwrap();
        }
        r
    }

    fn data(n: usize, steps: usize, seed: u64) -> (Vec<f32>, Vec<Vec<f32>>) {
        let mut rng = Rng::new(seed);
        let p0 = rng.vec(n, 1.0);
        let gs = (0..steps).map(|_| rng.vec(n, 0.5)).collect();
        (p0, gs)
    }

    fn max_rel(got: &[f32], want: &[f64]) -> f64 {
        got.iter()
            .zip(want)
            .map(|(g, w)| (*g as f64 - w).abs() / w.abs().max(1e-3))
            .fold(0.0, f64::max)
    }

    #[test]
    fn matches_f64_reference_in_every_mode() {
        let (p0, steps) = data(1000, 5, 7);
        let modes = [
            AdamParams {
                lr: 1e-2,
                weight_decay: 0.1,
                ..Default::default()
            },
            AdamParams {
                lr: 1e-2,
                weight_decay: 0.1,
                adam_w_mode: false,
                ..Default::default()
            },
            AdamParams {
                lr: 1e-2,
                bias_correction: false,
                ..Default::default()
            },
            // beta1 < 0.5 takes lerp's other branch.
            AdamParams {
                lr: 1e-2,
                betas: (0.3, 0.9),
                weight_decay: 0.01,
                ..Default::default()
            },
        ];
        for hp in &modes {
            let r = run(hp, &p0, &steps, 1.0);
            let want = reference(hp, &steps, &p0, 1.0);
            let err = max_rel(&r.p, &want);
            assert!(err < 2e-5, "{hp:?}: max relative error {err:.2e}");
            // The parameters moved by far more than the tolerance.
            assert!(r.p.iter().zip(&p0).any(|(a, b)| (a - b).abs() > 1e-2));
        }
    }

    /// torch.optim.AdamW(lr=0.1, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1) on
    /// p = [1.0, -0.5, 0.25, 0.0], grads [0.5, -0.25, 1e-3, 2.0] then [0.5, 0.5, -1e-3, 0.0].
    /// Step 1 by hand: p *= 0.99; m = 0.1 g; v = 0.001 g^2; step_size = 0.1 / 0.1 = 1;
    /// denom = |g| sqrt(0.001) / sqrt(0.001) + eps, so p = 0.99 p - 0.1 sign(g) (less eps):
    /// 0.89, -0.395, 0.1475 (+1e-6 from eps at |g| = 1e-3), -0.1. The literals are the f32
    /// results of each torch operation in order (one rounding per ATen op, fma where ATen's
    /// vectorised lerp uses one), transcribed independently of this kernel; they must match
    /// to the bit.
    #[test]
    #[allow(clippy::excessive_precision)]
    fn adamw_hand_computed_torch_values() {
        let hp = AdamParams {
            lr: 0.1,
            weight_decay: 0.1,
            ..Default::default()
        };
        let p0 = [1.0f32, -0.5, 0.25, 0.0];
        let steps = vec![
            vec![0.5f32, -0.25, 1e-3, 2.0],
            vec![0.5f32, 0.5, -1e-3, 0.0],
        ];
        let r1 = run(&hp, &p0, &steps[..1], 1.0);
        assert_eq!(
            r1.p,
            [
                0.89000004529953_f32,
                -0.39500001072883606,
                0.14750100672245026,
                -0.09999998658895493
            ]
        );
        assert_eq!(
            r1.m,
            [
                0.05000000074505806_f32,
                -0.02500000037252903,
                0.00010000000474974513,
                0.20000000298023224
            ]
        );
        assert_eq!(
            r1.v,
            [
                0.0002500000118743628_f32,
                6.25000029685907e-05,
                1.0000001937626735e-09,
                0.004000000189989805
            ]
        );
        let r2 = run(&hp, &p0, &steps, 1.0);
        assert_eq!(
            r2.p,
            [
                0.7811000347137451_f32,
                -0.42766034603118896,
                0.15128910541534424,
                -0.16600582003593445
            ]
        );
        assert_eq!(
            r2.m,
            [
                0.0949999988079071_f32,
                0.02749999798834324,
                -9.999996109399945e-06,
                0.18000000715255737
            ]
        );
        assert_eq!(
            r2.v,
            [
                0.0004997500218451023_f32,
                0.0003124375070910901,
                1.9990005206693695e-09,
                0.003996000159531832
            ]
        );
    }

    #[test]
    fn sub_range_steps_equal_whole_buffer_steps() {
        let n = super::super::CHUNK * 2 + 1234;
        let (p0, steps) = data(n, 3, 11);
        let hp = AdamParams {
            lr: 3e-3,
            weight_decay: 0.05,
            ..Default::default()
        };
        let whole = run(&hp, &p0, &steps, 1.0);
        // Two "ranks" own [0, cut) and [cut, n), cut not aligned to anything.
        let cut = 70_001;
        let mut p = p0.clone();
        let mut m = vec![0.0; n];
        let mut v = vec![0.0; n];
        for (t, g) in steps.iter().enumerate() {
            let (pa, pb) = p.split_at_mut(cut);
            let (ma, mb) = m.split_at_mut(cut);
            let (va, vb) = v.split_at_mut(cut);
            let (ga, gb) = g.split_at(cut);
            for (pp, gg, mm, vv) in [(pb, gb, mb, vb), (pa, ga, ma, va)] {
                let bufs = AdamBuffers {
                    params: pp,
                    grads: gg,
                    exp_avg: mm,
                    exp_avg_sq: vv,
                    out: HalfOut::None,
                };
                adam_step(&hp, t as u64 + 1, 1.0, bufs).unwrap();
            }
        }
        assert!(
            p == whole.p && m == whole.m && v == whole.v,
            "partitioned step differs"
        );
    }

    #[test]
    fn grad_scale_folding_equals_prescaled_gradients() {
        let (p0, steps) = data(5000, 3, 3);
        let hp = AdamParams {
            lr: 1e-2,
            weight_decay: 0.01,
            adam_w_mode: false,
            ..Default::default()
        };
        let scale = 1.0f32 / 1024.0 / 1.7;
        let folded = run(&hp, &p0, &steps, scale);
        let pre: Vec<Vec<f32>> = steps
            .iter()
            .map(|g| g.iter().map(|x| x * scale).collect())
            .collect();
        let prescaled = run(&hp, &p0, &pre, 1.0);
        assert!(folded.p == prescaled.p && folded.m == prescaled.m && folded.v == prescaled.v);
    }

    #[test]
    fn half_output_equals_rounded_fp32_params() {
        let n = 100_003;
        let (p0, steps) = data(n, 1, 5);
        let hp = AdamParams::default();
        let mut p = p0.clone();
        let (mut m, mut v) = (vec![0.0; n], vec![0.0; n]);
        let mut ob = vec![bf16::ZERO; n];
        let bufs = AdamBuffers {
            params: &mut p,
            grads: &steps[0],
            exp_avg: &mut m,
            exp_avg_sq: &mut v,
            out: HalfOut::Bf16(&mut ob),
        };
        adam_step(&hp, 1, 1.0, bufs).unwrap();
        assert!(ob.iter().zip(&p).all(|(o, x)| *o == bf16::from_f32(*x)));
        let plain = run(&hp, &p0, &steps, 1.0);
        assert_eq!(p, plain.p, "writing a copy must not change the fp32 result");

        let mut p = p0.clone();
        let (mut m, mut v) = (vec![0.0; n], vec![0.0; n]);
        let mut oh = vec![f16::ZERO; n];
        let bufs = AdamBuffers {
            params: &mut p,
            grads: &steps[0],
            exp_avg: &mut m,
            exp_avg_sq: &mut v,
            out: HalfOut::F16(&mut oh),
        };
        adam_step(&hp, 1, 1.0, bufs).unwrap();
        assert!(oh.iter().zip(&p).all(|(o, x)| *o == f16::from_f32(*x)));
    }

    #[test]
    fn rejects_bad_lengths_and_step_zero() {
        let mut p = vec![0.0f32; 4];
        let (mut m, mut v) = (vec![0.0f32; 4], vec![0.0f32; 3]);
        let g = vec![0.0f32; 4];
        let bufs = AdamBuffers {
            params: &mut p,
            grads: &g,
            exp_avg: &mut m,
            exp_avg_sq: &mut v,
            out: HalfOut::None,
        };
        let err = adam_step(&AdamParams::default(), 1, 1.0, bufs).unwrap_err();
        assert_eq!(
            err,
            OptimError::LengthMismatch {
                optimizer: "adam",
                buffer: "exp_avg_sq",
                expected: 4,
                got: 3
            }
        );
        assert!(err.to_string().contains("exp_avg_sq"));
        let mut v = vec![0.0f32; 4];
        let bufs = AdamBuffers {
            params: &mut p,
            grads: &g,
            exp_avg: &mut m,
            exp_avg_sq: &mut v,
            out: HalfOut::None,
        };
        assert_eq!(
            adam_step(&AdamParams::default(), 0, 1.0, bufs),
            Err(OptimError::ZeroStep { optimizer: "adam" })
        );
    }
}
