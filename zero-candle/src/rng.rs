//! Deterministic random numbers for initialization and sampling: SplitMix64 (Steele et al. 2014)
//! and Box-Muller normals. Each parameter's stream is seeded from (run seed, parameter name), so
//! initialization does not depend on the order of units, the world size or the stage.

const GAMMA: u64 = 0x9e3779b97f4a7c15;

/// SplitMix64: tiny, fast, statistically solid for this purpose, and trivially reproducible.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SplitMix64 {
    pub state: u64,
}

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        Self { state: seed }
    }

    /// A stream for one named object of a run (FNV-1a of the name mixed with the seed).
    pub fn for_name(seed: u64, name: &str) -> Self {
        let mut h: u64 = 0xcbf29ce484222325;
        for b in name.bytes() {
            h ^= b as u64;
            h = h.wrapping_mul(0x100000001b3);
        }
        Self::new(seed ^ h.rotate_left(17))
    }

    /// Jump ahead by `draws` calls of `next_u64` in O(1) (the state is a plain counter), so a rank
    /// can initialize only its shard of a parameter and get the same numbers as a full init.
    pub fn skip(&mut self, draws: u64) {
        self.state = self.state.wrapping_add(draws.wrapping_mul(GAMMA));
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(GAMMA);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58476d1ce4e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d049bb133111eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1) with 53 bits.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Standard normal (Box-Muller; one of the pair is discarded for simplicity). Uses exactly two
    /// `next_u64` draws, which `skip` relies on.
    pub fn next_normal(&mut self) -> f64 {
        let u1 = self.next_f64().max(f64::MIN_POSITIVE);
        let u2 = self.next_f64();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }
}

#[cfg(test)]
mod tests {
    use super::SplitMix64;

    #[test]
    fn skip_lands_where_sequential_draws_do() {
        let mut a = SplitMix64::for_name(5, "transformer.wte.weight");
        let mut b = a;
        for _ in 0..37 {
            a.next_normal();
        }
        b.skip(2 * 37);
        assert_eq!(a.next_normal().to_bits(), b.next_normal().to_bits());
    }
}
