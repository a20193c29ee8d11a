//! Deterministic randomness and hashing for the scheduler (it must not depend on a global RNG):
//! SplitMix64 from `rand_xoshiro`, with the two draws the scheduler and the simulator use, and
//! the Fx hasher for the scheduler's maps.

use rand_xoshiro::rand_core::{Rng as _, SeedableRng as _};

/// SplitMix64 (Steele, Lea, Flood 2014), `rand_xoshiro`'s, seeded with the state itself. Not
/// cryptographic; only for tie-breaking and sampling.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SplitMix64(rand_xoshiro::SplitMix64);

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        Self(rand_xoshiro::SplitMix64::seed_from_u64(seed))
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0.next_u64()
    }

    /// Uniform in `0..n` (`n > 0`).
    pub fn below(&mut self, n: usize) -> usize {
        (((self.next_u64() >> 11) as u128 * n as u128) >> 53) as usize
    }

    /// Uniform in `[0, 1)`.
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// FxHash (the rustc hasher): fast, deterministic, not DoS-resistant. The scheduler's maps are
/// keyed by small interned ids, strings and node ids the caller controls, so SipHash buys
/// nothing there.
///
/// Hand-written, not `rustc-hash`'s, because neither maintained line gives the same hash values
/// (measured with a scratch program over this hasher and both crates' `FxHasher`):
/// `rustc-hash` 2.1.3 (the current line, already in Cargo.lock) is a different function
/// (another multiplier, add-then-multiply, a rotation in `finish`): `1u64` hashes to
/// `0xa8b98aa717c4d5eb` there, `0x517cc1b727220a95` here. `rustc-hash` 1.1.0 matches on
/// integers but hashes a byte tail of 3, 5, 6 or 7 bytes in several steps where this hasher
/// pads it to one word: `"eu-west"` hashes to `0x0e3e01c9152782ee` there, `0x4bfc7b84405bbc7f`
/// here. The maps are only looked up, never iterated, so the values should not reach a result;
/// but a swap is not an identical-output change, so it is not made here.
#[derive(Default, Clone, Copy)]
pub struct FxHasher(u64);

impl std::hash::Hasher for FxHasher {
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut b = [0u8; 8];
            b[..chunk.len()].copy_from_slice(chunk);
            self.write_u64(u64::from_le_bytes(b));
        }
    }

    fn write_u64(&mut self, i: u64) {
        self.0 = (self.0.rotate_left(5) ^ i).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }

    fn write_u32(&mut self, i: u32) {
        self.write_u64(i as u64);
    }

    fn write_u8(&mut self, i: u8) {
        self.write_u64(i as u64);
    }

    fn write_usize(&mut self, i: usize) {
        self.write_u64(i as u64);
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

/// A `HashMap` with [`FxHasher`].
pub type FxHashMap<K, V> = std::collections::HashMap<K, V, std::hash::BuildHasherDefault<FxHasher>>;

#[cfg(test)]
mod tests {
    use super::SplitMix64;

    /// The hand-written SplitMix64 this crate used before `rand_xoshiro`'s, constants as they
    /// were: the reference the crate's stream must equal draw for draw.
    struct Reference(u64);

    impl Reference {
        fn next_u64(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        }
    }

    #[test]
    fn splitmix64_is_the_hand_written_stream() {
        for seed in [0, 1, 42, 0xDEAD_BEEF, 0x9E37_79B9_7F4A_7C15, u64::MAX] {
            let (mut ours, mut reference) = (SplitMix64::new(seed), Reference(seed));
            for draw in 0..1000 {
                assert_eq!(
                    ours.next_u64(),
                    reference.next_u64(),
                    "seed {seed:#x}, draw {draw}"
                );
            }
        }
        // A published value: the first output for seed 0 (the SplitMix64 reference code).
        assert_eq!(SplitMix64::new(0).next_u64(), 0xE220_A839_7B1D_CDAF);
    }

    #[test]
    fn below_and_unit_map_the_stream_as_before() {
        let (mut ours, mut reference) = (SplitMix64::new(7), Reference(7));
        for n in [1usize, 2, 3, 10, 1000, usize::MAX] {
            let want = (((reference.next_u64() >> 11) as u128 * n as u128) >> 53) as usize;
            assert_eq!(ours.below(n), want, "below({n})");
            let want = (reference.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
            assert_eq!(ours.unit().to_bits(), want.to_bits());
        }
    }
}
