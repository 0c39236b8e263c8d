//! Seedable randomness for the picking layers.
//!
//! Each service clone owns its own small, fast RNG (no lock or shared cache line per pick). The
//! clones draw their seeds from one [`RngSeed`] sequence, so a router built with
//! [`RngSeed::fixed`] makes the same choices on every run: tests and simulations are exact.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use rand::rngs::SmallRng;
use rand::SeedableRng;

const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

fn splitmix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A source of RNG seeds shared by a layer and every service it makes.
#[derive(Debug, Clone)]
pub struct RngSeed {
    next: Arc<AtomicU64>,
}

impl RngSeed {
    /// A deterministic sequence starting from `seed`.
    pub fn fixed(seed: u64) -> Self {
        RngSeed {
            next: Arc::new(AtomicU64::new(seed)),
        }
    }

    /// A sequence seeded from the operating system's entropy.
    pub fn from_entropy() -> Self {
        RngSeed::fixed(rand::random())
    }

    /// A fresh RNG with the next seed of the sequence.
    pub fn fork(&self) -> SmallRng {
        let s = self.next.fetch_add(GOLDEN, Ordering::Relaxed);
        SmallRng::seed_from_u64(splitmix64(s))
    }
}

impl Default for RngSeed {
    fn default() -> Self {
        RngSeed::from_entropy()
    }
}
