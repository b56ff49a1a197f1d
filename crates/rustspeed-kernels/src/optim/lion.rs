//! Lion (Chen et al. 2023), fused: DeepSpeed's FusedLion / DeepSpeedCPULion update.
//!
//! ```text
//! g = grad * grad_scale
//! c = fma(g, 1 - beta1, m * beta1)
//! p = p * (1 - lr*wd) - lr * sign(c)
//! m = fma(g, 1 - beta2, m * beta2)
//! ```
//!
//! `sign(0) = 0` as in lion-pytorch's `sign_()`. DeepSpeed's kernels differ only at an exact
//! zero: the CUDA kernel moves by `+lr` (`c > 0 ? -lr : lr`) and the CPU one by `-lr`
//! (copysign of +0); a zero update keeps zero-gradient padding where it is.

use rayon::prelude::*;

use super::{blocks, check_len, check_out, pieces, HalfOut, OptimError, Piece};

const NAME: &str = "lion";

/// DeepSpeed's defaults (`deepspeed/ops/lion`): lr 1e-3, betas (0.9, 0.999), wd 0.
#[derive(Clone, Debug, PartialEq)]
pub struct LionParams {
    pub lr: f64,
    pub betas: (f64, f64),
    pub weight_decay: f64,
}

impl Default for LionParams {
    fn default() -> Self {
        LionParams {
            lr: 1e-3,
            betas: (0.9, 0.999),
            weight_decay: 0.0,
        }
    }
}

#[derive(Debug)]
pub struct LionBuffers<'a> {
    pub params: &'a mut [f32],
    pub grads: &'a [f32],
    pub exp_avg: &'a mut [f32],
    pub out: HalfOut<'a>,
}

#[derive(Clone, Copy)]
struct Consts {
    grad_scale: f32,
    beta1: f32,
    one_minus_beta1: f32,
    beta2: f32,
    one_minus_beta2: f32,
    decay_factor: f32,
    neg_lr: f32,
}

/// One Lion step over a range (Lion has no step-dependent terms, so no step counter).
pub fn lion_step(
    hp: &LionParams,
    grad_scale: f32,
    bufs: LionBuffers<'_>,
) -> Result<(), OptimError> {
    let n = bufs.params.len();
    check_len(NAME, "grads", n, bufs.grads.len())?;
    check_len(NAME, "exp_avg", n, bufs.exp_avg.len())?;
    check_out(NAME, &bufs.out, n)?;
    let (b1, b2) = hp.betas;
    let c = Consts {
        grad_scale,
        beta1: b1 as f32,
        one_minus_beta1: (1.0 - b1) as f32,
        beta2: b2 as f32,
        one_minus_beta2: (1.0 - b2) as f32,
        decay_factor: (1.0 - hp.lr * hp.weight_decay) as f32,
        neg_lr: -hp.lr as f32,
    };
    pieces(&[n], [bufs.grads], [bufs.params, bufs.exp_avg], bufs.out)
        .into_par_iter()
        .for_each(|piece| lion_piece(&c, piece));
    Ok(())
}

multiversion! {
    fn lion_piece(c: &Consts, piece: Piece<'_, 1, 2>) {
        let Piece { reads: [g], writes: [p, m], mut out, .. } = piece;
        for (s, e) in blocks(p.len()) {
            let (p, g, m) = (&mut p[s..e], &g[s..e], &mut m[s..e]);
            for i in 0..p.len() {
                let gi = g[i] * c.grad_scale;
                let mi = m[i];
                let ci = gi.mul_add(c.one_minus_beta1, mi * c.beta1);
                let sign = (ci > 0.0) as i32 as f32 - (ci < 0.0) as i32 as f32;
                p[i] = sign.mul_add(c.neg_lr, p[i] * c.decay_factor);
                m[i] = gi.mul_add(c.one_minus_beta2, mi * c.beta2);
            }
            out.write(s, p);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{assert_close, Rng};
    use half::f16;

    fn reference(hp: &LionParams, p0: &[f32], steps: &[Vec<f32>], gs: f32) -> Vec<f64> {
        let (b1, b2) = hp.betas;
        let mut p: Vec<f64> = p0.iter().map(|&x| x as f64).collect();
        let mut m = vec![0.0f64; p.len()];
        for g in steps {
            for i in 0..p.len() {
                let gi = g[i] as f64 * gs as f64;
                let c = b1 * m[i] + (1.0 - b1) * gi;
                let s = if c > 0.0 {
                    1.0
                } else if c < 0.0 {
                    -1.0
                } else {
                    0.0
                };
                p[i] = p[i] * (1.0 - hp.lr * hp.weight_decay) - hp.lr * s;
                m[i] = b2 * m[i] + (1.0 - b2) * gi;
            }
        }
        p
    }

    fn run(hp: &LionParams, p0: &[f32], steps: &[Vec<f32>], gs: f32) -> Vec<f32> {
        let mut p = p0.to_vec();
        let mut m = vec![0.0f32; p.len()];
        for g in steps {
            lion_step(
                hp,
                gs,
                LionBuffers {
                    params: &mut p,
                    grads: g,
                    exp_avg: &mut m,
                    out: HalfOut::None,
                },
            )
            .unwrap();
        }
        p
    }

    #[test]
    fn matches_f64_reference() {
        let mut rng = Rng::new(4);
        let p0 = rng.vec(2000, 1.0);
        let steps: Vec<Vec<f32>> = (0..5).map(|_| rng.vec(2000, 1.0)).collect();
        let hp = LionParams {
            lr: 1e-2,
            betas: (0.9, 0.99),
            weight_decay: 0.1,
        };
        assert_close(
            "lion",
            &run(&hp, &p0, &steps, 2.0),
            &reference(&hp, &p0, &steps, 2.0),
            1e-6,
        );
    }

    /// lion-pytorch by hand: p = 1, m = 0, g = -2, lr 0.1, wd 0.5, betas (0.9, 0.99):
    /// c = -0.2 -> sign -1; p = 1 * 0.95 + 0.1 = 1.05; m = -0.02. A zero gradient with zero
    /// momentum leaves p only decayed.
    #[test]
    fn hand_values_and_zero_sign() {
        let hp = LionParams {
            lr: 0.1,
            betas: (0.9, 0.99),
            weight_decay: 0.5,
        };
        let mut p = vec![1.0f32, 1.0];
        let mut m = vec![0.0f32, 0.0];
        lion_step(
            &hp,
            1.0,
            LionBuffers {
                params: &mut p,
                grads: &[-2.0, 0.0],
                exp_avg: &mut m,
                out: HalfOut::None,
            },
        )
        .unwrap();
        assert_eq!(p, [1.05, 0.95]);
        assert!((m[0] + 0.02).abs() < 1e-8 && m[1] == 0.0);
    }

    #[test]
    fn sub_ranges_grad_scale_and_half_out() {
        let n = super::super::CHUNK + 77;
        let mut rng = Rng::new(9);
        let p0 = rng.vec(n, 1.0);
        let steps: Vec<Vec<f32>> = (0..3).map(|_| rng.vec(n, 1.0)).collect();
        let hp = LionParams {
            lr: 1e-3,
            weight_decay: 0.01,
            ..Default::default()
        };
        let whole = run(&hp, &p0, &steps, 0.125);
        let pre: Vec<Vec<f32>> = steps
            .iter()
            .map(|g| g.iter().map(|x| x * 0.125).collect())
            .collect();
        assert_eq!(run(&hp, &p0, &pre, 1.0), whole);
        let (mut p, mut m, mut o) = (p0.clone(), vec![0.0f32; n], vec![f16::ZERO; n]);
        for g in &steps {
            let (pa, pb) = p.split_at_mut(500);
            let (ma, mb) = m.split_at_mut(500);
            let (oa, ob) = o.split_at_mut(500);
            for (pp, gg, mm, oo) in [(pa, &g[..500], ma, oa), (pb, &g[500..], mb, ob)] {
                lion_step(
                    &hp,
                    0.125,
                    LionBuffers {
                        params: pp,
                        grads: gg,
                        exp_avg: mm,
                        out: HalfOut::F16(oo),
                    },
                )
                .unwrap();
            }
        }
        assert_eq!(p, whole);
        assert!(o.iter().zip(&p).all(|(o, x)| *o == f16::from_f32(*x)));
    }
}
