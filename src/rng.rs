//! Seeded randomness and stable hashes, in one place. Every generator here is a fixed algorithm
//! written out (or, for sampling and `randn`, `rand`'s `StdRng` pinned by its seed), so that a
//! seed gives the same numbers whatever the version of any dependency: label splits, batch
//! order, dropout masks, LoRA inits and seeded generations are reproducible, and a saved
//! training position resumes exactly.
//!
//! - [`SplitMix64`]: the stream behind splits, batches, read-layer draws and samples;
//!   [`splitmix`] is its one-step mix (dropout masks).
//! - [`fnv1a`]: FNV-1a over bytes, for stable ids of names and per-question seeds.
//! - [`Lcg64`]: Knuth's MMIX linear congruential generator (PEFT-style LoRA init).
//! - [`StdRng`]: token sampling and `randn` in scripts.

pub use rand::{rngs::StdRng, Rng, SeedableRng};

const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

/// SplitMix64 (Steele, Lea, Flood 2014): a small, fixed pseudo-random generator, so that seeded
/// shuffles never change with a dependency's version.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        SplitMix64 { state: seed }
    }

    /// An independent generator for one use (`stream`) of a seed.
    pub fn derive(seed: u64, stream: u64) -> Self {
        let a = SplitMix64::new(seed).next_u64();
        let b = SplitMix64::new(stream ^ 0xD1B5_4A32_D192_ED03).next_u64();
        SplitMix64::new(a ^ b)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(GOLDEN);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (unbiased). Panics if `n == 0`.
    pub fn below(&mut self, n: u64) -> u64 {
        assert!(n > 0, "below(0)");
        // Reject the lowest 2^64 mod n values so that the rest is a multiple of n.
        let threshold = n.wrapping_neg() % n;
        loop {
            let x = self.next_u64();
            if x >= threshold {
                return x % n;
            }
        }
    }

    /// Fisher-Yates shuffle.
    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = self.below(i as u64 + 1) as usize;
            v.swap(i, j);
        }
    }
}

/// One SplitMix64 step from state `z`: `SplitMix64::new(z).next_u64()`, as a pure mix.
pub fn splitmix(z: u64) -> u64 {
    SplitMix64::new(z).next_u64()
}

/// Add to a value before mixing so that nearby indices land far apart (`i * GOLDEN`).
pub fn spread(i: u64) -> u64 {
    i.wrapping_mul(GOLDEN)
}

/// The FNV-1a 64-bit offset basis (the hash of no bytes).
pub const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

/// FNV-1a over `bytes`, starting from `init` ([`FNV_OFFSET`] for the standard hash; mix a seed
/// into it for a seeded one).
pub fn fnv1a(init: u64, bytes: &[u8]) -> u64 {
    bytes
        .iter()
        .fold(init, |h, &b| (h ^ b as u64).wrapping_mul(0x0100_0000_01b3))
}

/// Knuth's MMIX linear congruential generator: `s = s * 6364136223846793005 + 1442695040888963407`.
#[derive(Clone, Debug)]
pub struct Lcg64 {
    state: u64,
}

impl Lcg64 {
    pub fn new(seed: u64) -> Self {
        Lcg64 { state: seed }
    }

    /// The next state.
    pub fn next_u64(&mut self) -> u64 {
        self.state = self
            .state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.state
    }

    /// Uniform in `[0, 1)` from the top 24 bits of the next state.
    pub fn next_unit_f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splitmix_is_one_step_of_the_stream() {
        let mut r = SplitMix64::new(12345);
        assert_eq!(splitmix(12345), r.next_u64());
    }

    #[test]
    fn fnv1a_matches_the_reference() {
        // FNV-1a 64 of "a" and of the empty string (reference values).
        assert_eq!(fnv1a(FNV_OFFSET, b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(FNV_OFFSET, b"a"), 0xaf63_dc4c_8601_ec8c);
    }

    #[test]
    fn lcg_is_knuths_mmix() {
        let mut g = Lcg64::new(0);
        assert_eq!(g.next_u64(), 1442695040888963407);
        let u = Lcg64::new(7).next_unit_f32();
        assert!((0.0..1.0).contains(&u));
    }
}
