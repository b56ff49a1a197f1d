//! Adagrad, fused: DeepSpeed's `DeepSpeedCPUAdagrad` update (csrc/includes/cpu_adagrad.h).
//!
//! ```text
//! g  = grad * grad_scale
//! gd = wd > 0 ? fma(p, wd, g) : g
//! v  = fma(gd, gd, v)
//! p  = fma(g / (sqrt(v) + eps), -lr, p)
//! ```
//!
//! Note DeepSpeed's quirk, kept here: the numerator is the raw gradient `g`, not the decayed
//! `gd` (torch.optim.Adagrad uses `gd` in both places), so weight decay only enters through
//! the accumulator. There are no lr decay or initial accumulator options.

use rayon::prelude::*;

use super::{blocks, check_len, check_out, pieces, HalfOut, OptimError, Piece};

const NAME: &str = "adagrad";

/// DeepSpeed's defaults (`deepspeed/ops/adagrad/cpu_adagrad.py`): lr 1e-2, eps 1e-10, wd 0.
#[derive(Clone, Debug, PartialEq)]
pub struct AdagradParams {
    pub lr: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdagradParams {
    fn default() -> Self {
        AdagradParams {
            lr: 1e-2,
            eps: 1e-10,
            weight_decay: 0.0,
        }
    }
}

#[derive(Debug)]
pub struct AdagradBuffers<'a> {
    pub params: &'a mut [f32],
    pub grads: &'a [f32],
    pub exp_avg_sq: &'a mut [f32],
    pub out: HalfOut<'a>,
}

#[derive(Clone, Copy)]
struct Consts {
    grad_scale: f32,
    weight_decay: f32,
    eps: f32,
    neg_lr: f32,
}

/// One Adagrad step over a range (no step-dependent terms, so no step counter).
pub fn adagrad_step(
    hp: &AdagradParams,
    grad_scale: f32,
    bufs: AdagradBuffers<'_>,
) -> Result<(), OptimError> {
    let n = bufs.params.len();
    check_len(NAME, "grads", n, bufs.grads.len())?;
    check_len(NAME, "exp_avg_sq", n, bufs.exp_avg_sq.len())?;
    check_out(NAME, &bufs.out, n)?;
    // DeepSpeed applies decay only for wd > 0; a zero factor would be a no-op anyway.
    let c = Consts {
        grad_scale,
        weight_decay: if hp.weight_decay > 0.0 {
            hp.weight_decay as f32
        } else {
            0.0
        },
        eps: hp.eps as f32,
        neg_lr: -hp.lr as f32,
    };
    pieces(&[n], [bufs.grads], [bufs.params, bufs.exp_avg_sq], bufs.out)
        .into_par_iter()
        .for_each(|piece| adagrad_piece(&c, piece));
    Ok(())
}

multiversion! {
    fn adagrad_piece(c: &Consts, piece: Piece<'_, 1, 2>) {
        let Piece { reads: [g], writes: [p, v], mut out, .. } = piece;
        for (s, e) in blocks(p.len()) {
            let (p, g, v) = (&mut p[s..e], &g[s..e], &mut v[s..e]);
            for i in 0..p.len() {
                let gi = g[i] * c.grad_scale;
                let gd = p[i].mul_add(c.weight_decay, gi);
                let vi = gd.mul_add(gd, v[i]);
                v[i] = vi;
                p[i] = (gi / (vi.sqrt() + c.eps)).mul_add(c.neg_lr, p[i]);
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

    fn reference(hp: &AdagradParams, p0: &[f32], steps: &[Vec<f32>]) -> Vec<f64> {
        let mut p: Vec<f64> = p0.iter().map(|&x| x as f64).collect();
        let mut v = vec![0.0f64; p.len()];
        for g in steps {
            for i in 0..p.len() {
                let gi = g[i] as f64;
                let gd = gi + hp.weight_decay * p[i];
                v[i] += gd * gd;
                p[i] -= hp.lr * gi / (v[i].sqrt() + hp.eps);
            }
        }
        p
    }

    fn run(hp: &AdagradParams, p0: &[f32], steps: &[Vec<f32>], gs: f32) -> Vec<f32> {
        let mut p = p0.to_vec();
        let mut v = vec![0.0f32; p.len()];
        for g in steps {
            let bufs = AdagradBuffers {
                params: &mut p,
                grads: g,
                exp_avg_sq: &mut v,
                out: HalfOut::None,
            };
            adagrad_step(hp, gs, bufs).unwrap();
        }
        p
    }

    #[test]
    fn matches_f64_reference() {
        let mut rng = Rng::new(21);
        let p0 = rng.vec(3000, 1.0);
        let steps: Vec<Vec<f32>> = (0..5).map(|_| rng.vec(3000, 1.0)).collect();
        for hp in [
            AdagradParams::default(),
            AdagradParams {
                lr: 0.1,
                weight_decay: 0.3,
                ..Default::default()
            },
        ] {
            assert_close(
                &format!("{hp:?}"),
                &run(&hp, &p0, &steps, 1.0),
                &reference(&hp, &p0, &steps),
                1e-5,
            );
        }
    }

    /// By hand, lr 0.1, wd 1, p = 1, g = 1: gd = 2, v = 4, p = 1 - 0.1 * 1 / 2 = 0.95
    /// (torch's Adagrad would give 1 - 0.1 * 2 / 2 = 0.9).
    #[test]
    fn raw_gradient_numerator_quirk() {
        let hp = AdagradParams {
            lr: 0.1,
            eps: 0.0,
            weight_decay: 1.0,
        };
        assert_eq!(run(&hp, &[1.0], &[vec![1.0]], 1.0), [0.95]);
    }

    #[test]
    fn sub_ranges_grad_scale_and_half_out() {
        let n = super::super::CHUNK * 2 + 5;
        let mut rng = Rng::new(22);
        let p0 = rng.vec(n, 1.0);
        let steps: Vec<Vec<f32>> = (0..3).map(|_| rng.vec(n, 1.0)).collect();
        let hp = AdagradParams {
            weight_decay: 0.01,
            ..Default::default()
        };
        let whole = run(&hp, &p0, &steps, 0.5);
        let pre: Vec<Vec<f32>> = steps
            .iter()
            .map(|g| g.iter().map(|x| x * 0.5).collect())
            .collect();
        assert_eq!(run(&hp, &p0, &pre, 1.0), whole);
        let (mut p, mut v, mut o) = (p0.clone(), vec![0.0f32; n], vec![bf16::ZERO; n]);
        let cut = n - 3;
        for g in &steps {
            let (pa, pb) = p.split_at_mut(cut);
            let (va, vb) = v.split_at_mut(cut);
            let (oa, ob) = o.split_at_mut(cut);
            for (pp, gg, vv, oo) in [(pb, &g[cut..], vb, ob), (pa, &g[..cut], va, oa)] {
                let bufs = AdagradBuffers {
                    params: pp,
                    grads: gg,
                    exp_avg_sq: vv,
                    out: HalfOut::Bf16(oo),
                };
                adagrad_step(&hp, 0.5, bufs).unwrap();
            }
        }
        assert_eq!(p, whole);
        assert!(o.iter().zip(&p).all(|(o, x)| *o == bf16::from_f32(*x)));
    }
}
