//! The per-replica prefix KV cache: chain-hashed token blocks with LRU eviction.

use std::collections::{BTreeMap, HashMap};

/// Mixes `x` into the chain value `h` (a splitmix64 finaliser; stable across processes and platforms).
pub(crate) fn mix(h: u64, x: u64) -> u64 {
    let mut z = h ^ x
        .wrapping_add(0x9E37_79B9_7F4A_7C15)
        .wrapping_add(h << 6)
        .wrapping_add(h >> 2);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Hashes the full `block_size`-token blocks of `tokens` by chain: block `i`'s hash covers every token
/// before it, so two prompts share block `i` only if they share their first `(i + 1) * block_size`
/// tokens. A trailing partial block is not cached (as in vLLM).
///
/// ```
/// use replica_router_mock::block_hashes;
/// let turn1: Vec<u32> = (0..40).collect();
/// let mut turn2 = turn1.clone();
/// turn2.extend(100..140);
/// let (a, b) = (block_hashes(&turn1, 16), block_hashes(&turn2, 16));
/// assert_eq!(a.len(), 2);
/// assert_eq!(b.len(), 5);
/// assert_eq!(a[..], b[..2]);
/// ```
pub fn block_hashes(tokens: &[u32], block_size: u32) -> Vec<u64> {
    let bs = block_size.max(1) as usize;
    let mut out = Vec::with_capacity(tokens.len() / bs);
    let mut h = 0x5EED_u64;
    for block in tokens.chunks_exact(bs) {
        for &t in block {
            h = mix(h, u64::from(t));
        }
        out.push(h);
    }
    out
}

/// A least-recently-used set of cached blocks with a capacity in blocks.
///
/// Lookups and inserts are `O(log n)` (a hash map from block to its last-use tick, and an ordered map
/// from tick to block for eviction).
#[derive(Debug)]
pub(crate) struct PrefixCache {
    capacity_blocks: usize,
    tick: u64,
    last_use: HashMap<u64, u64>,
    by_tick: BTreeMap<u64, u64>,
}

impl PrefixCache {
    pub(crate) fn new(capacity_blocks: usize) -> Self {
        PrefixCache {
            capacity_blocks: capacity_blocks.max(1),
            tick: 0,
            last_use: HashMap::new(),
            by_tick: BTreeMap::new(),
        }
    }

    /// Number of leading blocks of `blocks` that are cached; they are marked used.
    pub(crate) fn lookup_and_touch(&mut self, blocks: &[u64]) -> usize {
        let mut n = 0;
        for &b in blocks {
            if !self.last_use.contains_key(&b) {
                break;
            }
            self.touch(b);
            n += 1;
        }
        n
    }

    /// Caches every block of `blocks` (marking them used), evicting the least recently used beyond capacity.
    pub(crate) fn insert(&mut self, blocks: &[u64]) {
        for &b in blocks {
            self.touch(b);
        }
        while self.last_use.len() > self.capacity_blocks {
            match self.by_tick.pop_first() {
                Some((_, b)) => {
                    self.last_use.remove(&b);
                }
                None => break,
            }
        }
    }

    fn touch(&mut self, b: u64) {
        self.tick += 1;
        if let Some(old) = self.last_use.insert(b, self.tick) {
            self.by_tick.remove(&old);
        }
        self.by_tick.insert(self.tick, b);
    }

    /// Number of cached blocks.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.last_use.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lru_evicts_the_oldest_and_hits_are_prefix_only() {
        let mut c = PrefixCache::new(3);
        c.insert(&[1, 2, 3]);
        assert_eq!(c.lookup_and_touch(&[1, 2, 3, 4]), 3);
        assert_eq!(c.lookup_and_touch(&[2, 3]), 2);
        // 1 is now the least recently used.
        c.insert(&[9]);
        assert_eq!(c.len(), 3);
        assert_eq!(c.lookup_and_touch(&[1]), 0);
        assert_eq!(c.lookup_and_touch(&[2, 3, 9]), 3);
        // A hole stops the prefix.
        assert_eq!(c.lookup_and_touch(&[2, 7, 3]), 1);
    }

    #[test]
    fn chain_hash_depends_on_everything_before() {
        let a = block_hashes(&[1; 32], 16);
        let mut t = vec![1; 32];
        t[0] = 2;
        let b = block_hashes(&t, 16);
        assert_ne!(a[0], b[0]);
        assert_ne!(a[1], b[1]);
        assert!(block_hashes(&[1; 15], 16).is_empty());
        assert_eq!(block_hashes(&[1; 3], 0).len(), 3);
    }
}
