//! Fused optimizer kernels over flat fp32 buffers.
//!
//! Every kernel steps one contiguous range of the flat buffers with one set of
//! hyper-parameters. A parameter group is such a range; a ZeRO partition is such a range
//! (or the intersection of one with a group), so the engine slices the buffers and calls the
//! kernel once per (group, partition) piece. Kernels never allocate per element, read the
//! gradient through `grad_scale` (the engine folds `1 / (loss_scale * clip)` into it, so no
//! separate unscale pass is needed), and may write the updated parameter in bf16/f16 in the
//! same pass ([`HalfOut`]).
//!
//! Work is cut into fixed [`CHUNK`]-element pieces run on rayon's pool; each piece's loop is
//! compiled twice (AVX2+FMA and baseline) and picked at run time. Fused multiply-adds are
//! always explicit (`mul_add`) and nothing is reassociated, so both builds and any thread
//! count give bitwise-identical results.

use half::{bf16, f16};

/// Compiles `$body` for AVX2+FMA and for the baseline target and picks one at run time.
/// Results are identical: every operation is IEEE-exact and fused multiply-adds are explicit,
/// so the two builds differ only in speed.
macro_rules! multiversion {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($arg:ident : $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$m])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn body($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma")]
                unsafe fn fast($($arg: $ty),*) $(-> $ret)? {
                    body($($arg),*)
                }
                if !$crate::optim::force_baseline()
                    && std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                {
                    // SAFETY: the running CPU has the features `fast` was compiled for.
                    return unsafe { fast($($arg),*) };
                }
            }
            body($($arg),*)
        }
    };
}

pub mod adagrad;
pub mod adam;
pub mod grad;
pub mod lamb;
pub mod lion;
pub mod sgd;

pub use adagrad::{adagrad_step, AdagradBuffers, AdagradParams};
pub use adam::{adam_step, AdamBuffers, AdamParams};
pub use grad::{clip_coefficient, grad_norm, GradNorm, CLIP_EPS};
pub use lamb::{
    lamb_apply, lamb_prepare, lamb_step, lamb_trust_ratio, LambBuffers, LambNorms, LambParams,
};
pub use lion::{lion_step, LionBuffers, LionParams};
pub use sgd::{sgd_step, SgdBuffers, SgdParams};

/// Tests set this to run the baseline build and compare it bit for bit with the fast one.
#[cfg(test)]
pub(crate) static FORCE_BASELINE: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

#[inline(always)]
pub(crate) fn force_baseline() -> bool {
    #[cfg(test)]
    return FORCE_BASELINE.load(std::sync::atomic::Ordering::Relaxed);
    #[cfg(not(test))]
    false
}

/// Elements per parallel work item: large enough to amortise scheduling, small enough to
/// balance two to a few dozen threads on 100M-element buffers. Fixed, so reductions are
/// reproducible whatever the thread count.
pub const CHUNK: usize = 1 << 16;

/// Elements per inner block: the half-precision copy is written while the block is in L1.
const BLOCK: usize = 4096;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum OptimError {
    #[error("{optimizer}: buffer `{buffer}` has {got} elements, expected {expected} (the length of `params`)")]
    LengthMismatch {
        optimizer: &'static str,
        buffer: &'static str,
        expected: usize,
        got: usize,
    },
    #[error("{optimizer}: step must be >= 1 (the number of applied optimizer steps, counting this one), got 0")]
    ZeroStep { optimizer: &'static str },
    #[error(
        "{optimizer}: tensor lengths sum to {sum}, expected {expected} (the length of `params`)"
    )]
    SegmentSum {
        optimizer: &'static str,
        sum: usize,
        expected: usize,
    },
    #[error("{optimizer}: got {got} trust coefficients, expected {expected} (one per tensor)")]
    CoeffCount {
        optimizer: &'static str,
        got: usize,
        expected: usize,
    },
}

/// Optional reduced-precision copy of the updated parameters, written in the same pass.
#[derive(Debug, Default)]
pub enum HalfOut<'a> {
    #[default]
    None,
    Bf16(&'a mut [bf16]),
    F16(&'a mut [f16]),
}

impl<'a> HalfOut<'a> {
    fn len(&self) -> Option<usize> {
        match self {
            HalfOut::None => None,
            HalfOut::Bf16(s) => Some(s.len()),
            HalfOut::F16(s) => Some(s.len()),
        }
    }

    fn split_at(self, n: usize) -> (HalfOut<'a>, HalfOut<'a>) {
        match self {
            HalfOut::None => (HalfOut::None, HalfOut::None),
            HalfOut::Bf16(s) => {
                let (a, b) = s.split_at_mut(n);
                (HalfOut::Bf16(a), HalfOut::Bf16(b))
            }
            HalfOut::F16(s) => {
                let (a, b) = s.split_at_mut(n);
                (HalfOut::F16(a), HalfOut::F16(b))
            }
        }
    }

    /// Rounds `src` (to nearest even) into elements `start..start + src.len()` of the copy.
    #[inline(always)]
    fn write(&mut self, start: usize, src: &[f32]) {
        match self {
            HalfOut::None => {}
            HalfOut::Bf16(dst) => {
                for (d, s) in dst[start..start + src.len()].iter_mut().zip(src) {
                    *d = bf16::from_f32(*s);
                }
            }
            HalfOut::F16(dst) => {
                for (d, s) in dst[start..start + src.len()].iter_mut().zip(src) {
                    *d = f16::from_f32(*s);
                }
            }
        }
    }
}

pub(crate) fn check_len(
    optimizer: &'static str,
    buffer: &'static str,
    expected: usize,
    got: usize,
) -> Result<(), OptimError> {
    if expected == got {
        Ok(())
    } else {
        Err(OptimError::LengthMismatch {
            optimizer,
            buffer,
            expected,
            got,
        })
    }
}

pub(crate) fn check_out(
    optimizer: &'static str,
    out: &HalfOut<'_>,
    expected: usize,
) -> Result<(), OptimError> {
    match out.len() {
        Some(n) => check_len(optimizer, "out", expected, n),
        None => Ok(()),
    }
}

/// One work item: aligned sub-slices of every buffer, and the tensor (segment) it lies in.
pub(crate) struct Piece<'a, const R: usize, const W: usize> {
    pub reads: [&'a [f32]; R],
    pub writes: [&'a mut [f32]; W],
    pub out: HalfOut<'a>,
    pub segment: usize,
}

/// Cuts buffers of equal length `n` into pieces of at most [`CHUNK`] elements that never
/// cross a segment boundary (`segments` are lengths summing to `n`; pass `&[n]` for none).
/// The cut depends only on `n` and `segments`, never on the thread count.
pub(crate) fn pieces<'a, const R: usize, const W: usize>(
    segments: &[usize],
    mut reads: [&'a [f32]; R],
    mut writes: [&'a mut [f32]; W],
    mut out: HalfOut<'a>,
) -> Vec<Piece<'a, R, W>> {
    let mut result = Vec::new();
    for (segment, &seg_len) in segments.iter().enumerate() {
        let mut left = seg_len;
        while left > 0 {
            let n = left.min(CHUNK);
            left -= n;
            let r: [&'a [f32]; R] = std::array::from_fn(|k| {
                let (head, tail) = reads[k].split_at(n);
                reads[k] = tail;
                head
            });
            let w: [&'a mut [f32]; W] = std::array::from_fn(|k| {
                let (head, tail) = std::mem::take(&mut writes[k]).split_at_mut(n);
                writes[k] = tail;
                head
            });
            let (o, rest) = std::mem::take(&mut out).split_at(n);
            out = rest;
            result.push(Piece {
                reads: r,
                writes: w,
                out: o,
                segment,
            });
        }
    }
    result
}

/// Consecutive `(start, end)` blocks of at most [`BLOCK`] elements covering `0..n`. An
/// iterator rather than a callback: a closure would not inherit the caller's target features.
#[inline(always)]
pub(crate) fn blocks(n: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..n).step_by(BLOCK).map(move |s| (s, (s + BLOCK).min(n)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_respect_chunks_and_segments() {
        let n = CHUNK * 2 + 10;
        let a = vec![0.0f32; n];
        let mut b = vec![0.0f32; n];
        let segs = [5, CHUNK + 3, n - 5 - CHUNK - 3];
        let ps = pieces::<1, 1>(&segs, [&a], [&mut b], HalfOut::None);
        let lens: Vec<(usize, usize)> = ps.iter().map(|p| (p.segment, p.reads[0].len())).collect();
        assert_eq!(
            lens,
            vec![(0, 5), (1, CHUNK), (1, 3), (2, CHUNK), (2, 2)],
            "pieces must split at CHUNK and at every segment end"
        );
        assert!(ps.iter().all(|p| p.writes[0].len() == p.reads[0].len()));
    }

    /// Every kernel, baseline build vs AVX2+FMA build: identical bits (other tests may run
    /// meanwhile with the flag set; they only get slower).
    #[test]
    fn baseline_and_simd_builds_agree_bitwise() {
        use crate::testing::Rng;
        use std::sync::atomic::Ordering;
        let n = CHUNK + 4099;
        let mut rng = Rng::new(99);
        let p0 = rng.vec(n, 1.0);
        let g = rng.vec(n, 0.3);
        let run_all = || {
            let mut outs = Vec::new();
            for adam_w_mode in [true, false] {
                let (mut p, mut m, mut v) = (p0.clone(), vec![0.1f32; n], vec![0.01f32; n]);
                let mut o = vec![bf16::ZERO; n];
                let hp = AdamParams {
                    weight_decay: 0.1,
                    adam_w_mode,
                    ..Default::default()
                };
                let b = AdamBuffers {
                    params: &mut p,
                    grads: &g,
                    exp_avg: &mut m,
                    exp_avg_sq: &mut v,
                    out: HalfOut::Bf16(&mut o),
                };
                adam_step(&hp, 3, 0.5, b).unwrap();
                outs.extend([p, m, v, o.iter().map(|x| x.to_f32()).collect()]);
            }
            let (mut p, mut b) = (p0.clone(), vec![0.2f32; n]);
            let hp = SgdParams {
                lr: 0.1,
                momentum: 0.9,
                nesterov: true,
                weight_decay: 0.01,
                ..Default::default()
            };
            sgd_step(
                &hp,
                2,
                0.5,
                SgdBuffers {
                    params: &mut p,
                    grads: &g,
                    momentum_buffer: &mut b,
                    out: HalfOut::None,
                },
            )
            .unwrap();
            outs.extend([p, b]);
            let (mut p, mut m) = (p0.clone(), vec![0.05f32; n]);
            lion_step(
                &LionParams {
                    weight_decay: 0.1,
                    ..Default::default()
                },
                0.5,
                LionBuffers {
                    params: &mut p,
                    grads: &g,
                    exp_avg: &mut m,
                    out: HalfOut::None,
                },
            )
            .unwrap();
            outs.extend([p, m]);
            let (mut p, mut v) = (p0.clone(), vec![0.05f32; n]);
            adagrad_step(
                &AdagradParams {
                    weight_decay: 0.1,
                    ..Default::default()
                },
                0.5,
                AdagradBuffers {
                    params: &mut p,
                    grads: &g,
                    exp_avg_sq: &mut v,
                    out: HalfOut::None,
                },
            )
            .unwrap();
            outs.extend([p, v]);
            let (mut p, mut m, mut v) = (p0.clone(), vec![0.0f32; n], vec![0.0f32; n]);
            let lb = LambBuffers {
                params: &mut p,
                grads: &g,
                exp_avg: &mut m,
                exp_avg_sq: &mut v,
                out: HalfOut::None,
            };
            let c = lamb_step(
                &LambParams {
                    weight_decay: 0.01,
                    ..Default::default()
                },
                1,
                0.5,
                lb,
                &[100, n - 100],
            )
            .unwrap();
            outs.extend([p, m, v, c]);
            let bits = grad_norm(&g).sum_sq.to_bits();
            outs.push(vec![
                f32::from_bits((bits >> 32) as u32),
                f32::from_bits(bits as u32),
            ]);
            outs
        };
        let fast = run_all();
        FORCE_BASELINE.store(true, Ordering::Relaxed);
        let base = run_all();
        FORCE_BASELINE.store(false, Ordering::Relaxed);
        for (k, (a, b)) in fast.iter().zip(&base).enumerate() {
            let same = a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits());
            assert!(same, "output {k} differs between builds");
        }
    }

    #[test]
    fn half_out_rounds_to_nearest_even() {
        let src = [1.0f32 + 1.0 / 256.0, 1.0 + 3.0 / 256.0, -2.5];
        let mut o = vec![bf16::ZERO; 3];
        HalfOut::Bf16(&mut o).write(0, &src);
        // 1 + 2^-8 is a tie between 1 and 1 + 2^-7: even mantissa wins (1.0).
        assert_eq!(o[0], bf16::from_f32(1.0));
        assert_eq!(o[1], bf16::from_f32(1.0 + 4.0 / 256.0));
        assert_eq!(o[2], bf16::from_f32(-2.5));
    }
}
