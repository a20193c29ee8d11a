//! Deterministic random numbers for the simulator (SplitMix64 from the scheduler crate) with the
//! few distributions the models need.
//!
//! Owns: `Rng`. May import: no simulator module (the generator is the scheduler crate's).

use tokenfleet_scheduler::rng::SplitMix64;

pub struct Rng(SplitMix64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(SplitMix64::new(seed))
    }

    /// An independent stream derived from this seed and a label.
    pub fn derive(seed: u64, label: u64) -> Self {
        let mut r = SplitMix64::new(seed ^ label.wrapping_mul(0xD6E8_FEB8_6659_FD93));
        r.next_u64();
        Self(r)
    }

    pub fn unit(&mut self) -> f64 {
        self.0.unit()
    }

    pub fn below(&mut self, n: usize) -> usize {
        self.0.below(n.max(1))
    }

    pub fn chance(&mut self, p: f64) -> bool {
        self.unit() < p
    }

    pub fn uniform(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.unit()
    }

    pub fn normal(&mut self, mean: f64, sd: f64) -> f64 {
        // Box-Muller.
        let u1 = self.unit().max(1e-12);
        let u2 = self.unit();
        mean + sd * (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }

    pub fn lognormal(&mut self, median: f64, sigma: f64) -> f64 {
        median * self.normal(0.0, sigma).exp()
    }

    pub fn exp(&mut self, mean: f64) -> f64 {
        -mean * (1.0 - self.unit()).max(1e-12).ln()
    }

    /// Index drawn with probability proportional to `weights`.
    pub fn weighted(&mut self, weights: impl Iterator<Item = f64> + Clone) -> usize {
        let total: f64 = weights.clone().sum();
        let mut x = self.unit() * total;
        let mut last = 0;
        for (i, w) in weights.enumerate() {
            if x < w {
                return i;
            }
            x -= w;
            last = i;
        }
        last
    }
}
