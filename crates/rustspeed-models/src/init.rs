//! Seeded normal draws for weight initialisation (and tests): splitmix64 turned into standard
//! normals by Box-Muller in f64. Each parameter gets its own stream derived from the seed and
//! its name, so its values do not depend on which other parameters exist. They do not
//! reproduce PyTorch's generator.

/// FNV-1a hash of a parameter name, mixed into a seed to give each tensor its own stream.
pub fn name_hash(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Standard normals from one splitmix64 stream.
pub struct NormalRng {
    state: u64,
    spare: Option<f64>,
}

impl NormalRng {
    /// A stream starting from `state`.
    pub fn new(state: u64) -> Self {
        NormalRng { state, spare: None }
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in (0, 1]: never 0, so the logarithm in `normal` is finite.
    fn uniform(&mut self) -> f64 {
        ((self.next_u64() >> 11) + 1) as f64 / (1u64 << 53) as f64
    }

    /// The next standard normal draw.
    pub fn normal(&mut self) -> f64 {
        if let Some(z) = self.spare.take() {
            return z;
        }
        let r = (-2.0 * self.uniform().ln()).sqrt();
        let angle = 2.0 * std::f64::consts::PI * self.uniform();
        self.spare = Some(r * angle.sin());
        r * angle.cos()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_are_seeded_and_standard_normal() {
        let mut a = NormalRng::new(7);
        let mut b = NormalRng::new(7);
        let xs: Vec<f64> = (0..20_000).map(|_| a.normal()).collect();
        assert!(xs
            .iter()
            .zip((0..).map(|_| b.normal()))
            .all(|(x, y)| *x == y));
        let mean = xs.iter().sum::<f64>() / xs.len() as f64;
        let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / xs.len() as f64;
        assert!(
            mean.abs() < 0.03 && (var - 1.0).abs() < 0.05,
            "mean {mean} var {var}"
        );
        assert_ne!(name_hash("a.weight"), name_hash("b.weight"));
    }
}
