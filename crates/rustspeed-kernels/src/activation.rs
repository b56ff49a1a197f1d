//! Elementwise activations with their backward passes: GELU (tanh approximation and exact),
//! SiLU, and SwiGLU as LLaMA's MLP uses it (`silu(gate) * up`).
//!
//! Backward functions overwrite the input gradient; math is in f32 (erf in f64).

use rayon::prelude::*;

use crate::dtype::Float;

/// Elementwise loops go parallel above this many elements.
const PARALLEL_MIN_ELEMS: usize = 1 << 15;
const CHUNK: usize = 1 << 13;

/// Calls `f(offset, chunk)` over chunks of `out`, in parallel when `out` is large.
fn chunked<T: Send>(out: &mut [T], f: impl Fn(usize, &mut [T]) + Sync) {
    if out.len() >= PARALLEL_MIN_ELEMS {
        out.par_chunks_mut(CHUNK)
            .enumerate()
            .for_each(|(i, c)| f(i * CHUNK, c));
    } else {
        f(0, out);
    }
}

fn check(what: &str, lens: &[(&str, usize)]) {
    let n = lens[0].1;
    for (name, len) in lens {
        assert_eq!(
            *len, n,
            "{what}: {name} has {len} elements, expected {n} (as {})",
            lens[0].0
        );
    }
}

/// sqrt(2 / pi), as in HF's `NewGELUActivation`.
const GELU_TANH_SCALE: f32 = 0.797_884_6;
const GELU_TANH_CUBIC: f32 = 0.044_715;

/// `e^x`, branch-free and call-free so that loops over it vectorise (libm's `expf` is a call
/// per element): Cody-Waite reduction `x = n ln2 + r`, Cephes' degree-6 polynomial for `e^r`,
/// `2^n` built in the exponent bits. Relative error below 2e-7 on [-87, 88]; clamped outside.
#[inline(always)]
pub(crate) fn exp_fast(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding and subtracting 1.5 * 2^23 rounds to the nearest integer without a libm call.
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.0, 88.0);
    let shifted = x * LOG2E + ROUND;
    let n = shifted - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_2e-4_f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let y = p * r * r + r + 1.0;
    y * f32::from_bits(pow2_bits(shifted))
}

/// The bits of `2^n` for `shifted = n + 1.5 * 2^23` (|n| < 2^22): n sits in the low mantissa
/// bits, so it is read off with integer ops. `n as i32` is Rust's saturating cast, which LLVM
/// scalarises (a convert, a NaN test and two cmovs per lane, inserted back one by one): with it
/// the exp loops ran at a fraction of their vector width.
#[inline(always)]
pub(crate) fn pow2_bits(shifted: f32) -> u32 {
    let n = (shifted.to_bits() as i32).wrapping_sub(0x4B40_0000);
    (n.wrapping_add(127) as u32) << 23
}

/// `tanh(u) = 1 - 2 / (e^(2u) + 1)`: absolute error below 3e-7, which is what GELU needs
/// (it uses `1 + tanh`).
#[inline(always)]
fn tanh_fast(u: f32) -> f32 {
    1.0 - 2.0 / (exp_fast(2.0 * u) + 1.0)
}

#[inline(always)]
fn gelu_tanh_forward_body<T: Float>(out: &mut [T], x: &[T]) {
    for (o, x) in out.iter_mut().zip(x) {
        let x = x.to_f32();
        let t = tanh_fast(GELU_TANH_SCALE * (x + GELU_TANH_CUBIC * x * x * x));
        *o = T::from_f32(0.5 * x * (1.0 + t));
    }
}

#[inline(always)]
fn gelu_tanh_backward_body<T: Float>(dx: &mut [T], x: &[T], dout: &[T]) {
    for ((d, x), g) in dx.iter_mut().zip(x).zip(dout) {
        let x = x.to_f32();
        let t = tanh_fast(GELU_TANH_SCALE * (x + GELU_TANH_CUBIC * x * x * x));
        let du = GELU_TANH_SCALE * (1.0 + 3.0 * GELU_TANH_CUBIC * x * x);
        let grad = 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * du;
        *d = T::from_f32(g.to_f32() * grad);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn gelu_tanh_forward_avx2<T: Float>(out: &mut [T], x: &[T]) {
    gelu_tanh_forward_body(out, x)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn gelu_tanh_backward_avx2<T: Float>(dx: &mut [T], x: &[T], dout: &[T]) {
    gelu_tanh_backward_body(dx, x, dout)
}

pub(crate) fn has_avx2_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// GPT-2's `gelu_new`: `0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))`.
pub fn gelu_tanh_forward<T: Float>(out: &mut [T], x: &[T]) {
    check("gelu_tanh_forward", &[("out", out.len()), ("x", x.len())]);
    let simd = has_avx2_fma();
    let wide = crate::gelu_avx512::available() && crate::gelu_avx512::supports::<T>();
    chunked(out, |o0, out| {
        let x = &x[o0..o0 + out.len()];
        #[cfg(target_arch = "x86_64")]
        if wide {
            // SAFETY: AVX-512 F+BW present and T is f32 or bf16 (checked above); equal lengths.
            return unsafe { crate::gelu_avx512::gelu_tanh_forward(out, x) };
        }
        #[cfg(target_arch = "x86_64")]
        if simd {
            // SAFETY: the running CPU has AVX2 and FMA (checked above).
            return unsafe { gelu_tanh_forward_avx2(out, x) };
        }
        let _ = (simd, wide);
        gelu_tanh_forward_body(out, x)
    });
}

pub fn gelu_tanh_backward<T: Float>(dx: &mut [T], x: &[T], dout: &[T]) {
    check(
        "gelu_tanh_backward",
        &[("dx", dx.len()), ("x", x.len()), ("dout", dout.len())],
    );
    let simd = has_avx2_fma();
    let wide = crate::gelu_avx512::available() && crate::gelu_avx512::supports::<T>();
    chunked(dx, |o0, dx| {
        let (x, dout) = (&x[o0..o0 + dx.len()], &dout[o0..o0 + dx.len()]);
        #[cfg(target_arch = "x86_64")]
        if wide {
            // SAFETY: AVX-512 F+BW present and T is f32 or bf16 (checked above); equal lengths.
            return unsafe { crate::gelu_avx512::gelu_tanh_backward(dx, x, dout) };
        }
        #[cfg(target_arch = "x86_64")]
        if simd {
            // SAFETY: the running CPU has AVX2 and FMA (checked above).
            return unsafe { gelu_tanh_backward_avx2(dx, x, dout) };
        }
        let _ = (simd, wide);
        gelu_tanh_backward_body(dx, x, dout)
    });
}

/// The complementary error function, with fractional error below 1.2e-7 everywhere.
///
/// Chebyshev-fitted form from Numerical Recipes (`erfcc`); its relative accuracy in the tails is
/// what exact GELU needs for large negative inputs, where `1 + erf` is tiny.
pub fn erfc(x: f64) -> f64 {
    let z = x.abs();
    let t = 1.0 / (1.0 + 0.5 * z);
    let poly = -z * z - 1.265_512_23
        + t * (1.000_023_68
            + t * (0.374_091_96
                + t * (0.096_784_18
                    + t * (-0.186_288_06
                        + t * (0.278_868_07
                            + t * (-1.135_203_98
                                + t * (1.488_515_87 + t * (-0.822_152_23 + t * 0.170_872_77))))))));
    let r = t * poly.exp();
    if x >= 0.0 {
        r
    } else {
        2.0 - r
    }
}

pub fn erf(x: f64) -> f64 {
    1.0 - erfc(x)
}

const FRAC_1_SQRT_2PI: f64 = 0.398_942_280_401_432_7;

/// Exact GELU, `x * Phi(x) = 0.5 x erfc(-x / sqrt(2))` (HF `gelu`, PyTorch `approximate='none'`).
pub fn gelu_erf_forward<T: Float>(out: &mut [T], x: &[T]) {
    check("gelu_erf_forward", &[("out", out.len()), ("x", x.len())]);
    chunked(out, |o0, out| {
        for (o, x) in out.iter_mut().zip(&x[o0..]) {
            let x = x.to_f32() as f64;
            *o = T::from_f32((0.5 * x * erfc(-x * std::f64::consts::FRAC_1_SQRT_2)) as f32);
        }
    });
}

/// d/dx [x Phi(x)] = Phi(x) + x phi(x).
pub fn gelu_erf_backward<T: Float>(dx: &mut [T], x: &[T], dout: &[T]) {
    check(
        "gelu_erf_backward",
        &[("dx", dx.len()), ("x", x.len()), ("dout", dout.len())],
    );
    chunked(dx, |o0, dx| {
        for ((d, x), g) in dx.iter_mut().zip(&x[o0..]).zip(&dout[o0..]) {
            let x = x.to_f32() as f64;
            let cdf = 0.5 * erfc(-x * std::f64::consts::FRAC_1_SQRT_2);
            let pdf = FRAC_1_SQRT_2PI * (-0.5 * x * x).exp();
            *d = T::from_f32(g.to_f32() * (cdf + x * pdf) as f32);
        }
    });
}

#[inline]
fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// `silu(x) = x * sigmoid(x)`.
pub fn silu_forward<T: Float>(out: &mut [T], x: &[T]) {
    check("silu_forward", &[("out", out.len()), ("x", x.len())]);
    chunked(out, |o0, out| {
        for (o, x) in out.iter_mut().zip(&x[o0..]) {
            let x = x.to_f32();
            *o = T::from_f32(x * sigmoid(x));
        }
    });
}

#[inline]
fn silu_grad(x: f32) -> f32 {
    let s = sigmoid(x);
    s * (1.0 + x * (1.0 - s))
}

pub fn silu_backward<T: Float>(dx: &mut [T], x: &[T], dout: &[T]) {
    check(
        "silu_backward",
        &[("dx", dx.len()), ("x", x.len()), ("dout", dout.len())],
    );
    chunked(dx, |o0, dx| {
        for ((d, x), g) in dx.iter_mut().zip(&x[o0..]).zip(&dout[o0..]) {
            *d = T::from_f32(g.to_f32() * silu_grad(x.to_f32()));
        }
    });
}

/// LLaMA's MLP nonlinearity: `h = silu(gate) * up`, all `[n, intermediate]`.
pub fn swiglu_forward<T: Float>(h: &mut [T], gate: &[T], up: &[T]) {
    check(
        "swiglu_forward",
        &[("h", h.len()), ("gate", gate.len()), ("up", up.len())],
    );
    chunked(h, |o0, h| {
        for ((h, g), u) in h.iter_mut().zip(&gate[o0..]).zip(&up[o0..]) {
            let g = g.to_f32();
            *h = T::from_f32(g * sigmoid(g) * u.to_f32());
        }
    });
}

/// Backward of [`swiglu_forward`]: `dgate = dh * up * silu'(gate)`, `dup = dh * silu(gate)`.
pub fn swiglu_backward<T: Float>(dgate: &mut [T], dup: &mut [T], gate: &[T], up: &[T], dh: &[T]) {
    check(
        "swiglu_backward",
        &[
            ("dgate", dgate.len()),
            ("dup", dup.len()),
            ("gate", gate.len()),
            ("up", up.len()),
            ("dh", dh.len()),
        ],
    );
    let body = |o0: usize, dg: &mut [T], du: &mut [T]| {
        for (((dg, du), (g, u)), d) in dg
            .iter_mut()
            .zip(du)
            .zip(gate[o0..].iter().zip(&up[o0..]))
            .zip(&dh[o0..])
        {
            let (g, u, d) = (g.to_f32(), u.to_f32(), d.to_f32());
            let s = sigmoid(g);
            *dg = T::from_f32(d * u * s * (1.0 + g * (1.0 - s)));
            *du = T::from_f32(d * g * s);
        }
    };
    if dgate.len() >= PARALLEL_MIN_ELEMS {
        dgate
            .par_chunks_mut(CHUNK)
            .zip(dup.par_chunks_mut(CHUNK))
            .enumerate()
            .for_each(|(i, (dg, du))| body(i * CHUNK, dg, du));
    } else {
        body(0, dgate, dup);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::*;
    use half::bf16;

    /// erf by its Taylor series in f64: slow, but exact to ~1e-11 for |x| <= 4.
    fn erf_series(x: f64) -> f64 {
        let (mut term, mut sum) = (x, x);
        for n in 1..200 {
            term *= -x * x / n as f64;
            sum += term / (2 * n + 1) as f64;
        }
        sum * 2.0 / std::f64::consts::PI.sqrt()
    }

    fn f64s(v: &[f32]) -> Vec<f64> {
        v.iter().map(|x| *x as f64).collect()
    }

    #[test]
    fn erf_is_accurate() {
        for i in -400..=400 {
            let x = i as f64 / 100.0;
            let want = erf_series(x);
            assert!(
                (erf(x) - want).abs() < 1.5e-7,
                "erf({x}) = {} vs {want}",
                erf(x)
            );
            // Relative accuracy of the complement, which exact GELU relies on for x << 0.
            let want_c = 1.0 - want;
            if want_c > 1e-6 {
                assert!(
                    (erfc(x) - want_c).abs() / want_c < 2e-6,
                    "erfc({x}) = {} vs {want_c}",
                    erfc(x)
                );
            }
        }
    }

    type Fwd = fn(&mut [f32], &[f32]);
    type Bwd = fn(&mut [f32], &[f32], &[f32]);

    fn check_unary(name: &str, fwd: Fwd, bwd: Bwd, reference: fn(f64) -> f64) {
        let mut rng = Rng::new(40);
        let mut x = rng.vec(64, 4.0);
        let mut out = vec![0f32; 64];
        fwd(&mut out, &x);
        let want: Vec<f64> = x.iter().map(|v| reference(*v as f64)).collect();
        assert_close(&format!("{name} forward"), &out, &want, 1e-6);
        let probe = rng.vec(64, 1.0);
        let mut dx = vec![0f32; 64];
        bwd(&mut dx, &x, &probe);
        let num = numeric_grad(&mut x, 1e-3, |x| {
            x.iter()
                .zip(&probe)
                .map(|(x, p)| reference(*x as f64) * *p as f64)
                .sum()
        });
        assert_grad_close(&format!("{name} backward"), &dx, &num, 1e-3);
        // bf16 storage: one rounding of the output.
        let xb: Vec<bf16> = x.iter().map(|v| bf16::from_f32(*v)).collect();
        let xbf: Vec<f32> = xb.iter().map(|v| v.to_f32()).collect();
        let mut ob = vec![bf16::from_f32(0.0); 64];
        let mut of = vec![0f32; 64];
        fwd(&mut of, &xbf);
        match name {
            "gelu_tanh" => gelu_tanh_forward(&mut ob, &xb),
            "gelu_erf" => gelu_erf_forward(&mut ob, &xb),
            _ => silu_forward(&mut ob, &xb),
        }
        let obf: Vec<f32> = ob.iter().map(|v| v.to_f32()).collect();
        assert_close(&format!("{name} bf16"), &obf, &f64s(&of), 4e-3);
    }

    #[test]
    fn pow2_bits_reads_the_rounded_exponent() {
        for n in -126i32..=127 {
            let shifted = n as f32 + 12_582_912.0;
            assert_eq!(f32::from_bits(pow2_bits(shifted)), 2f32.powi(n), "n = {n}");
        }
    }

    #[test]
    fn fast_exp_and_tanh_match_libm() {
        let mut worst = (0f64, 0f64);
        for i in -200_000..=200_000 {
            let x = i as f32 * 4.35e-4; // [-87, 87]
            let (got, want) = (exp_fast(x) as f64, (x as f64).exp());
            worst.0 = worst.0.max(((got - want) / want).abs());
            let u = i as f32 * 1e-4; // [-20, 20]
            worst.1 = worst.1.max((tanh_fast(u) as f64 - (u as f64).tanh()).abs());
        }
        assert!(worst.0 < 2e-7, "exp relative error {}", worst.0);
        assert!(worst.1 < 3e-7, "tanh absolute error {}", worst.1);
        assert_eq!(tanh_fast(100.0), 1.0);
        assert_eq!(tanh_fast(-100.0), -1.0);
    }

    #[test]
    fn gelu_tanh_matches_reference_and_gradient() {
        check_unary("gelu_tanh", gelu_tanh_forward, gelu_tanh_backward, |x| {
            0.5 * x
                * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x.powi(3))).tanh())
        });
    }

    /// The AVX-512 kernels (whole vectors, then a scalar tail: 1000 + 7 elements) against the
    /// scalar bodies, over a range wide enough to saturate tanh on both sides.
    #[test]
    fn gelu_tanh_wide_path_matches_scalar_body() {
        if !crate::gelu_avx512::available() {
            eprintln!("skipped: no AVX-512 on this CPU");
            return;
        }
        let mut rng = Rng::new(42);
        let n = 1007;
        let mut x = rng.vec(n, 12.0);
        x[3] = 0.0;
        x[5] = -40.0;
        x[7] = 40.0;
        let g = rng.vec(n, 1.0);
        let (mut want, mut got) = (vec![0f32; n], vec![0f32; n]);
        gelu_tanh_forward_body(&mut want, &x);
        gelu_tanh_forward(&mut got, &x);
        let w64 = f64s(&want);
        assert_close("wide forward", &got, &w64, 1e-6);
        gelu_tanh_backward_body(&mut want, &x, &g);
        gelu_tanh_backward(&mut got, &x, &g);
        assert_close("wide backward", &got, &f64s(&want), 1e-6);
        // bf16: at most one bf16 ulp apart (the f32 values differ by a few ulps before rounding).
        let xb: Vec<bf16> = x.iter().map(|v| bf16::from_f32(*v)).collect();
        let gb: Vec<bf16> = g.iter().map(|v| bf16::from_f32(*v)).collect();
        let (mut wb, mut ob) = (vec![bf16::ZERO; n], vec![bf16::ZERO; n]);
        for backward in [false, true] {
            if backward {
                gelu_tanh_backward_body(&mut wb, &xb, &gb);
                gelu_tanh_backward(&mut ob, &xb, &gb);
            } else {
                gelu_tanh_forward_body(&mut wb, &xb);
                gelu_tanh_forward(&mut ob, &xb);
            }
            for i in 0..n {
                // One bf16 ulp is at most 2^-7 of the value (signed zeros compare equal).
                let (w, o) = (wb[i].to_f32(), ob[i].to_f32());
                assert!(
                    (w - o).abs() <= w.abs() / 128.0,
                    "bf16 backward={backward} at {i}: x {} want {} got {}",
                    xb[i],
                    wb[i],
                    ob[i]
                );
            }
        }
    }

    /// An element's GELU does not depend on its position (vector body or tail): runs with other
    /// batch shapes (another world size) must round identically.
    #[test]
    fn gelu_tanh_is_position_independent() {
        let mut rng = Rng::new(7);
        let x = rng.vec(37, 4.0);
        let g = rng.vec(37, 1.0);
        let (mut full, mut dfull) = (vec![0f32; 37], vec![0f32; 37]);
        gelu_tanh_forward(&mut full, &x);
        gelu_tanh_backward(&mut dfull, &x, &g);
        for start in [1, 5, 21, 33] {
            let (mut part, mut dpart) = (vec![0f32; 37 - start], vec![0f32; 37 - start]);
            gelu_tanh_forward(&mut part, &x[start..]);
            gelu_tanh_backward(&mut dpart, &x[start..], &g[start..]);
            assert_eq!(part, full[start..], "forward from {start}");
            assert_eq!(dpart, dfull[start..], "backward from {start}");
        }
    }

    #[test]
    fn gelu_erf_matches_reference_and_gradient() {
        check_unary("gelu_erf", gelu_erf_forward, gelu_erf_backward, |x| {
            0.5 * x * (1.0 + erf_series(x / std::f64::consts::SQRT_2))
        });
    }

    #[test]
    fn silu_matches_reference_and_gradient() {
        check_unary("silu", silu_forward, silu_backward, |x| {
            x / (1.0 + (-x).exp())
        });
    }

    #[test]
    fn exact_gelu_tail_is_relatively_accurate() {
        // gelu(-6) = -6 * Phi(-6) ~ -5.9e-9: an absolute-error erf would lose it entirely.
        let mut out = [0f32];
        gelu_erf_forward(&mut out, &[-6.0f32]);
        let want = -6.0 * 9.865_876_450_376_98e-10;
        assert!(
            ((out[0] as f64 - want) / want).abs() < 1e-5,
            "{} vs {want}",
            out[0]
        );
    }

    #[test]
    fn swiglu_matches_reference_and_gradient_and_parallel_path() {
        let mut rng = Rng::new(41);
        let silu = |g: f64| g / (1.0 + (-g).exp());
        for n in [50usize, 40_000] {
            let mut gate = rng.vec(n, 4.0);
            let mut up = rng.vec(n, 2.0);
            let mut h = vec![0f32; n];
            swiglu_forward(&mut h, &gate, &up);
            let want: Vec<f64> = gate
                .iter()
                .zip(&up)
                .map(|(g, u)| silu(*g as f64) * *u as f64)
                .collect();
            assert_close("swiglu forward", &h, &want, 1e-6);
            let dh = rng.vec(n, 1.0);
            let (mut dg, mut du) = (vec![0f32; n], vec![0f32; n]);
            swiglu_backward(&mut dg, &mut du, &gate, &up, &dh);
            if n > 100 {
                // Large case: the parallel path against the same formula evaluated in f64.
                let want_dg: Vec<f64> = (0..n)
                    .map(|i| {
                        let (g, s) = (gate[i] as f64, 1.0 / (1.0 + (-gate[i] as f64).exp()));
                        dh[i] as f64 * up[i] as f64 * s * (1.0 + g * (1.0 - s))
                    })
                    .collect();
                assert_close("dgate (parallel)", &dg, &want_dg, 1e-5);
                continue;
            }
            let loss = |g: &[f32], u: &[f32]| -> f64 {
                (0..g.len())
                    .map(|i| silu(g[i] as f64) * u[i] as f64 * dh[i] as f64)
                    .sum()
            };
            let uc = up.clone();
            let ndg = numeric_grad(&mut gate, 1e-3, |g| loss(g, &uc));
            let gc = gate.clone();
            let ndu = numeric_grad(&mut up, 1e-3, |u| loss(&gc, u));
            assert_grad_close("dgate", &dg, &ndg, 1e-3);
            assert_grad_close("dup", &du, &ndu, 1e-3);
            // bf16 storage against f32 on the same (rounded) inputs.
            let b = |v: &[f32]| v.iter().map(|x| bf16::from_f32(*x)).collect::<Vec<_>>();
            let f = |v: &[bf16]| v.iter().map(|x| x.to_f32()).collect::<Vec<_>>();
            let (gb, ub, dhb) = (b(&gate), b(&up), b(&dh));
            let (mut dgb, mut dub) = (vec![bf16::from_f32(0.0); n], vec![bf16::from_f32(0.0); n]);
            swiglu_backward(&mut dgb, &mut dub, &gb, &ub, &dhb);
            let (mut dgf, mut duf) = (vec![0f32; n], vec![0f32; n]);
            swiglu_backward(&mut dgf, &mut duf, &f(&gb), &f(&ub), &f(&dhb));
            assert_close("bf16 dgate", &f(&dgb), &f64s(&dgf), 1e-2);
            assert_close("bf16 dup", &f(&dub), &f64s(&duf), 1e-2);
        }
    }
}
