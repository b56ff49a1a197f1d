//! Helpers shared by the kernels' tests: a seeded RNG and finite-difference gradient checks.

/// splitmix64: tiny, seeded, good enough for test data.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [-1, 1).
    pub fn uniform(&mut self) -> f32 {
        ((self.next_u64() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    pub fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.uniform() * scale).collect()
    }

    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}

/// Central finite difference of the scalar `f` with respect to every element of `x`.
/// `f` is evaluated in f64 so that the difference is not swamped by rounding.
pub fn numeric_grad(x: &mut [f32], eps: f32, mut f: impl FnMut(&[f32]) -> f64) -> Vec<f64> {
    (0..x.len())
        .map(|i| {
            let orig = x[i];
            x[i] = orig + eps;
            let plus = f(x);
            x[i] = orig - eps;
            let minus = f(x);
            x[i] = orig;
            (plus - minus) / (2.0 * eps as f64)
        })
        .collect()
}

/// Asserts `analytic` matches `numeric` to a relative tolerance (scaled by the gradients' magnitude).
pub fn assert_grad_close(what: &str, analytic: &[f32], numeric: &[f64], rel_tol: f64) {
    assert_eq!(analytic.len(), numeric.len(), "{what}: length mismatch");
    let scale = numeric.iter().fold(1e-6f64, |m, v| m.max(v.abs()));
    for (i, (a, n)) in analytic.iter().zip(numeric).enumerate() {
        let err = (*a as f64 - n).abs() / scale;
        assert!(
            err <= rel_tol,
            "{what}[{i}]: analytic {a} vs numeric {n} (relative error {err:.2e} > {rel_tol:.0e})"
        );
    }
}

/// Asserts two slices match to `rel_tol` relative to the larger magnitude (plus a tiny absolute floor).
pub fn assert_close(what: &str, got: &[f32], want: &[f64], rel_tol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length mismatch");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let tol = rel_tol * w.abs().max(1.0);
        assert!(
            (*g as f64 - w).abs() <= tol,
            "{what}[{i}]: got {g}, want {w} (tolerance {tol:.1e})"
        );
    }
}
