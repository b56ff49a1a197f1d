//! SGD with momentum, dampening, Nesterov and L2 weight decay: torch.optim.SGD, fused.
//!
//! torch's order (single-tensor path), `add(x, alpha=a)` being an fma in ATen's vectorised
//! kernel:
//!
//! ```text
//! g = grad * grad_scale;  if wd != 0: g = fma(p, wd, g)
//! if momentum != 0:
//!     first step: buf = g                      (torch clones the gradient)
//!     later:      buf = fma(g, 1 - dampening, buf * momentum)
//!     g = nesterov ? fma(buf, momentum, g) : buf
//! p = fma(g, -lr, p)
//! ```

use rayon::prelude::*;

use super::{blocks, check_len, check_out, pieces, HalfOut, OptimError, Piece};

const NAME: &str = "sgd";

/// Hyper-parameters with torch's defaults (DeepSpeed passes them through to torch).
#[derive(Clone, Debug, PartialEq)]
pub struct SgdParams {
    pub lr: f64,
    pub momentum: f64,
    pub dampening: f64,
    pub weight_decay: f64,
    pub nesterov: bool,
}

impl Default for SgdParams {
    fn default() -> Self {
        SgdParams {
            lr: 1e-3,
            momentum: 0.0,
            dampening: 0.0,
            weight_decay: 0.0,
            nesterov: false,
        }
    }
}

/// `momentum_buffer` is ignored (and may be empty) when `momentum == 0`.
#[derive(Debug)]
pub struct SgdBuffers<'a> {
    pub params: &'a mut [f32],
    pub grads: &'a [f32],
    pub momentum_buffer: &'a mut [f32],
    pub out: HalfOut<'a>,
}

#[derive(Clone, Copy)]
struct Consts {
    grad_scale: f32,
    weight_decay: f32,
    momentum: f32,
    one_minus_dampening: f32,
    neg_lr: f32,
}

/// One SGD step over a range. `step` is 1 on the first step, when the momentum buffer is
/// initialised to the gradient (torch's `buf is None`).
pub fn sgd_step(
    hp: &SgdParams,
    step: u64,
    grad_scale: f32,
    bufs: SgdBuffers<'_>,
) -> Result<(), OptimError> {
    let n = bufs.params.len();
    check_len(NAME, "grads", n, bufs.grads.len())?;
    check_out(NAME, &bufs.out, n)?;
    if step == 0 {
        return Err(OptimError::ZeroStep { optimizer: NAME });
    }
    let c = Consts {
        grad_scale,
        weight_decay: hp.weight_decay as f32,
        momentum: hp.momentum as f32,
        one_minus_dampening: (1.0 - hp.dampening) as f32,
        neg_lr: -hp.lr as f32,
    };
    let mode = if hp.momentum == 0.0 {
        Mode::Plain
    } else if step == 1 {
        if hp.nesterov {
            Mode::FirstNesterov
        } else {
            Mode::First
        }
    } else if hp.nesterov {
        Mode::Nesterov
    } else {
        Mode::Momentum
    };
    let wd = hp.weight_decay != 0.0;
    if mode == Mode::Plain {
        pieces(&[n], [bufs.grads], [bufs.params], bufs.out)
            .into_par_iter()
            .for_each(|piece| plain_piece(&c, wd, piece));
    } else {
        check_len(NAME, "momentum_buffer", n, bufs.momentum_buffer.len())?;
        pieces(
            &[n],
            [bufs.grads],
            [bufs.params, bufs.momentum_buffer],
            bufs.out,
        )
        .into_par_iter()
        .for_each(|piece| momentum_piece(&c, wd, mode, piece));
    }
    Ok(())
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Plain,
    First,
    FirstNesterov,
    Momentum,
    Nesterov,
}

multiversion! {
    fn plain_piece(c: &Consts, wd: bool, piece: Piece<'_, 1, 1>) {
        let Piece { reads: [g], writes: [p], mut out, .. } = piece;
        for (s, e) in blocks(p.len()) {
            let (p, g) = (&mut p[s..e], &g[s..e]);
            for i in 0..p.len() {
                let mut gi = g[i] * c.grad_scale;
                if wd {
                    gi = p[i].mul_add(c.weight_decay, gi);
                }
                p[i] = gi.mul_add(c.neg_lr, p[i]);
            }
            out.write(s, p);
        }
    }
}

multiversion! {
    fn momentum_piece(c: &Consts, wd: bool, mode: Mode, piece: Piece<'_, 1, 2>) {
        let Piece { reads: [g], writes: [p, buf], mut out, .. } = piece;
        for (s, e) in blocks(p.len()) {
            let (p, g, b) = (&mut p[s..e], &g[s..e], &mut buf[s..e]);
            let first = matches!(mode, Mode::First | Mode::FirstNesterov);
            let nesterov = matches!(mode, Mode::FirstNesterov | Mode::Nesterov);
            for i in 0..p.len() {
                let mut gi = g[i] * c.grad_scale;
                if wd {
                    gi = p[i].mul_add(c.weight_decay, gi);
                }
                let bi = if first {
                    gi
                } else {
                    gi.mul_add(c.one_minus_dampening, b[i] * c.momentum)
                };
                b[i] = bi;
                let d = if nesterov { bi.mul_add(c.momentum, gi) } else { bi };
                p[i] = d.mul_add(c.neg_lr, p[i]);
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

    fn reference(hp: &SgdParams, p0: &[f32], steps: &[Vec<f32>], gs: f32) -> Vec<f64> {
        let mut p: Vec<f64> = p0.iter().map(|&x| x as f64).collect();
        let mut buf = vec![0.0f64; p.len()];
        for (t, g) in steps.iter().enumerate() {
            for i in 0..p.len() {
                let mut gi = g[i] as f64 * gs as f64 + hp.weight_decay * p[i];
                if hp.momentum != 0.0 {
                    buf[i] = if t == 0 {
                        gi
                    } else {
                        hp.momentum * buf[i] + (1.0 - hp.dampening) * gi
                    };
                    gi = if hp.nesterov {
                        gi + hp.momentum * buf[i]
                    } else {
                        buf[i]
                    };
                }
                p[i] -= hp.lr * gi;
            }
        }
        p
    }

    fn run(hp: &SgdParams, p0: &[f32], steps: &[Vec<f32>], gs: f32) -> (Vec<f32>, Vec<f32>) {
        let mut p = p0.to_vec();
        let mut b = vec![0.0f32; p.len()];
        for (t, g) in steps.iter().enumerate() {
            let bufs = SgdBuffers {
                params: &mut p,
                grads: g,
                momentum_buffer: &mut b,
                out: HalfOut::None,
            };
            sgd_step(hp, t as u64 + 1, gs, bufs).unwrap();
        }
        (p, b)
    }

    fn data(n: usize, steps: usize, seed: u64) -> (Vec<f32>, Vec<Vec<f32>>) {
        let mut rng = Rng::new(seed);
        (
            rng.vec(n, 1.0),
            (0..steps).map(|_| rng.vec(n, 1.0)).collect(),
        )
    }

    #[test]
    fn matches_f64_reference_in_every_mode() {
        let (p0, steps) = data(777, 4, 1);
        let modes = [
            SgdParams {
                lr: 0.1,
                ..Default::default()
            },
            SgdParams {
                lr: 0.1,
                weight_decay: 0.01,
                ..Default::default()
            },
            SgdParams {
                lr: 0.1,
                momentum: 0.9,
                dampening: 0.1,
                weight_decay: 0.01,
                ..Default::default()
            },
            SgdParams {
                lr: 0.1,
                momentum: 0.9,
                nesterov: true,
                weight_decay: 0.01,
                ..Default::default()
            },
        ];
        for hp in &modes {
            let (p, _) = run(hp, &p0, &steps, 0.5);
            assert_close(
                &format!("{hp:?}"),
                &p,
                &reference(hp, &p0, &steps, 0.5),
                1e-5,
            );
        }
    }

    /// torch.optim.SGD(lr=0.5, momentum=0.5) on p = 1, grads 1 then 1:
    /// step 1: buf = 1, p = 0.5; step 2: buf = 0.5 + 1 = 1.5, p = 0.5 - 0.75 = -0.25.
    #[test]
    fn momentum_hand_values() {
        let hp = SgdParams {
            lr: 0.5,
            momentum: 0.5,
            ..Default::default()
        };
        let (p, b) = run(&hp, &[1.0], &[vec![1.0], vec![1.0]], 1.0);
        assert_eq!((p[0], b[0]), (-0.25, 1.5));
    }

    #[test]
    fn sub_ranges_and_grad_scale_and_half_out() {
        let n = super::super::CHUNK + 999;
        let (p0, steps) = data(n, 3, 2);
        let hp = SgdParams {
            lr: 0.05,
            momentum: 0.9,
            nesterov: true,
            weight_decay: 1e-3,
            ..Default::default()
        };
        let (whole, whole_b) = run(&hp, &p0, &steps, 0.25);
        let pre: Vec<Vec<f32>> = steps
            .iter()
            .map(|g| g.iter().map(|x| x * 0.25).collect())
            .collect();
        assert_eq!(run(&hp, &p0, &pre, 1.0).0, whole, "grad_scale folding");

        let mut p = p0.clone();
        let mut b = vec![0.0f32; n];
        let mut o = vec![bf16::ZERO; n];
        let cut = 12_345;
        for (t, g) in steps.iter().enumerate() {
            let (pa, pb) = p.split_at_mut(cut);
            let (ba, bb) = b.split_at_mut(cut);
            let (oa, ob) = o.split_at_mut(cut);
            let (ga, gb) = g.split_at(cut);
            for (pp, gg, bu, oo) in [(pa, ga, ba, oa), (pb, gb, bb, ob)] {
                let bufs = SgdBuffers {
                    params: pp,
                    grads: gg,
                    momentum_buffer: bu,
                    out: HalfOut::Bf16(oo),
                };
                sgd_step(&hp, t as u64 + 1, 0.25, bufs).unwrap();
            }
        }
        assert!(p == whole && b == whole_b, "partitioned step differs");
        assert!(o.iter().zip(&p).all(|(o, x)| *o == bf16::from_f32(*x)));
    }

    #[test]
    fn no_momentum_needs_no_buffer() {
        let mut p = vec![1.0f32; 3];
        let bufs = SgdBuffers {
            params: &mut p,
            grads: &[1.0, 2.0, 3.0],
            momentum_buffer: &mut [],
            out: HalfOut::None,
        };
        sgd_step(
            &SgdParams {
                lr: 0.5,
                ..Default::default()
            },
            1,
            1.0,
            bufs,
        )
        .unwrap();
        assert_eq!(p, [0.5, 0.0, -0.5]);
        let bufs = SgdBuffers {
            params: &mut p,
            grads: &[1.0, 2.0, 3.0],
            momentum_buffer: &mut [],
            out: HalfOut::None,
        };
        let hp = SgdParams {
            momentum: 0.9,
            ..Default::default()
        };
        assert!(matches!(
            sgd_step(&hp, 1, 1.0, bufs),
            Err(OptimError::LengthMismatch {
                buffer: "momentum_buffer",
                ..
            })
        ));
    }
}
