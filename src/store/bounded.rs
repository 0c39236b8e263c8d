//! Fixed-size key digests and a bounded map with O(1) eviction, for state whose keys come from
//! client input (session pins, the quota's over-limit cache).

use std::collections::HashMap;
use std::fmt;

use parking_lot::Mutex;
use sha2::{Digest, Sha256};

/// A 128-bit digest of a key taken from client input (a session id, a tenant id): the first 16
/// bytes of SHA-256 over a domain tag and the key.
///
/// State keyed by a digest holds 16 bytes per entry whatever the key's length, and two different
/// keys share a digest only if truncated SHA-256 collides (about 2^-64 for a chosen pair, and
/// 2^-128 · n² / 2 among `n` keys): with overwhelming probability, distinct keys get distinct
/// entries. The digest is the same in every process, so gateways sharing a store agree on it.
///
/// ```
/// use replica_router::store::KeyDigest;
///
/// let a = KeyDigest::of(b"conv-1");
/// assert_eq!(a, KeyDigest::of(b"conv-1"));
/// assert_ne!(a, KeyDigest::of(b"conv-2"));
/// assert_eq!(KeyDigest::of(vec![7u8; 1 << 20]).as_bytes().len(), 16);
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyDigest([u8; 16]);

impl KeyDigest {
    /// The digest of `key` (any bytes, any length).
    pub fn of(key: impl AsRef<[u8]>) -> Self {
        let mut h = Sha256::new();
        h.update(b"replica-router.key\0");
        h.update(key.as_ref());
        let full = h.finalize();
        let mut out = [0u8; 16];
        out.copy_from_slice(&full[..16]);
        KeyDigest(out)
    }

    /// The 16 bytes.
    pub fn as_bytes(&self) -> &[u8; 16] {
        &self.0
    }

    /// Lower-case hex of the 16 bytes (32 characters).
    pub fn to_hex(&self) -> String {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut s = String::with_capacity(32);
        for b in self.0 {
            s.push(HEX[(b >> 4) as usize] as char);
            s.push(HEX[(b & 0xf) as usize] as char);
        }
        s
    }

    fn shard(&self, n: usize) -> usize {
        (u32::from_le_bytes([self.0[12], self.0[13], self.0[14], self.0[15]]) as usize) % n
    }
}

impl fmt::Debug for KeyDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyDigest({})", self.to_hex())
    }
}

impl fmt::Display for KeyDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// Slots a CLOCK hand looks at before it evicts whatever it points at.
const MAX_SCAN: usize = 8;

struct Slot<V> {
    key: KeyDigest,
    value: V,
    referenced: bool,
}

struct Shard<V> {
    index: HashMap<KeyDigest, usize>,
    slots: Vec<Option<Slot<V>>>,
    free: Vec<usize>,
    hand: usize,
    cap: usize,
}

impl<V> Shard<V> {
    fn new(cap: usize) -> Self {
        Shard {
            index: HashMap::new(),
            slots: Vec::new(),
            free: Vec::new(),
            hand: 0,
            cap,
        }
    }

    /// A slot for a new entry: a free one, a new one under the cap, or an evicted one (CLOCK:
    /// the first slot that is dead or not referenced since the hand last passed, at most
    /// [`MAX_SCAN`] slots on; else the one the hand reached). O(1).
    fn slot_for_new(&mut self, dead: &impl Fn(&V) -> bool) -> usize {
        if let Some(i) = self.free.pop() {
            return i;
        }
        if self.slots.len() < self.cap {
            self.slots.push(None);
            return self.slots.len() - 1;
        }
        let n = self.slots.len();
        let mut victim = self.hand % n;
        for step in 0..MAX_SCAN.min(n) {
            let i = (self.hand + step) % n;
            victim = i;
            match &mut self.slots[i] {
                Some(s) if s.referenced && !dead(&s.value) => s.referenced = false,
                _ => break,
            }
        }
        self.hand = (victim + 1) % n;
        if let Some(old) = self.slots[victim].take() {
            self.index.remove(&old.key);
        }
        victim
    }
}

/// A map from [`KeyDigest`] to `V` that never holds more than its capacity, with O(1) work per
/// operation: sharded (one small lock each) and evicting by CLOCK (an approximation of least
/// recently used that prefers entries the caller says are dead, e.g. expired).
pub(crate) struct BoundedMap<V> {
    shards: Box<[Mutex<Shard<V>>]>,
    capacity: usize,
}

impl<V> BoundedMap<V> {
    /// A map of at most `capacity` entries (0: holds nothing).
    pub(crate) fn new(capacity: usize) -> Self {
        // Shards of at least 64 entries (a small map is one shard), at most 16 of them.
        let n = (capacity / 64).clamp(1, 16);
        let per = capacity / n;
        BoundedMap {
            shards: (0..n).map(|_| Mutex::new(Shard::new(per))).collect(),
            capacity: per * n,
        }
    }

    /// The most entries held at once.
    pub(crate) fn capacity(&self) -> usize {
        self.capacity
    }

    fn shard(&self, key: &KeyDigest) -> &Mutex<Shard<V>> {
        &self.shards[key.shard(self.shards.len())]
    }

    /// Runs `f` on `key`'s value (marking it recently used).
    pub(crate) fn with<R>(&self, key: &KeyDigest, f: impl FnOnce(&mut V) -> R) -> Option<R> {
        let mut s = self.shard(key).lock();
        let i = *s.index.get(key)?;
        let slot = s.slots[i].as_mut()?;
        slot.referenced = true;
        Some(f(&mut slot.value))
    }

    /// Inserts or replaces `key`'s value; when full, evicts one entry (preferring those `dead`
    /// says may go).
    pub(crate) fn insert(&self, key: KeyDigest, value: V, dead: impl Fn(&V) -> bool) {
        let mut s = self.shard(&key).lock();
        if s.cap == 0 {
            return;
        }
        if let Some(&i) = s.index.get(&key) {
            if let Some(slot) = s.slots[i].as_mut() {
                slot.value = value;
                slot.referenced = true;
                return;
            }
        }
        let i = s.slot_for_new(&dead);
        s.slots[i] = Some(Slot {
            key,
            value,
            referenced: false,
        });
        s.index.insert(key, i);
    }

    /// Removes `key` if `pred` holds for its value; returns whether it was removed.
    pub(crate) fn remove_if(&self, key: &KeyDigest, pred: impl FnOnce(&V) -> bool) -> bool {
        let mut s = self.shard(key).lock();
        let Some(&i) = s.index.get(key) else {
            return false;
        };
        if !s.slots[i].as_ref().is_some_and(|slot| pred(&slot.value)) {
            return false;
        }
        s.slots[i] = None;
        s.index.remove(key);
        s.free.push(i);
        true
    }

    /// Removes every entry for which `dead` holds (O(n), one shard locked at a time).
    pub(crate) fn sweep(&self, dead: impl Fn(&V) -> bool) {
        for shard in self.shards.iter() {
            let mut s = shard.lock();
            let s = &mut *s;
            for (i, slot) in s.slots.iter_mut().enumerate() {
                if slot.as_ref().is_some_and(|x| dead(&x.value)) {
                    if let Some(x) = slot.take() {
                        s.index.remove(&x.key);
                        s.free.push(i);
                    }
                }
            }
        }
    }

    /// Calls `f` on every value (one shard locked at a time).
    pub(crate) fn for_each(&self, mut f: impl FnMut(&V)) {
        for shard in self.shards.iter() {
            for slot in shard.lock().slots.iter().flatten() {
                f(&slot.value);
            }
        }
    }

    /// Entries held now.
    pub(crate) fn len(&self) -> usize {
        self.shards.iter().map(|s| s.lock().index.len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn evicts_when_full_and_keeps_recent() {
        let m = BoundedMap::new(16);
        for i in 0..1000u32 {
            m.insert(KeyDigest::of(i.to_le_bytes()), i, |_| false);
            assert!(m.len() <= 16);
        }
        assert_eq!(m.len(), 16);
        let k = KeyDigest::of(b"x");
        m.insert(k, 7, |_| false);
        assert_eq!(m.with(&k, |v| *v), Some(7));
        assert!(m.remove_if(&k, |v| *v == 7));
        assert_eq!(m.with(&k, |v| *v), None);
        let z = BoundedMap::new(0);
        z.insert(k, 1, |_| false);
        assert_eq!(z.len(), 0);
    }

    proptest! {
        #[test]
        fn never_exceeds_capacity(
            cap in 0usize..64,
            ops in proptest::collection::vec((proptest::collection::vec(any::<u8>(), 0..300), 0u8..4), 0..400),
        ) {
            let m = BoundedMap::new(cap);
            prop_assert!(m.capacity() <= cap);
            for (key, op) in ops {
                let d = KeyDigest::of(&key);
                match op {
                    0 | 1 => m.insert(d, key.len(), |v| *v % 3 == 0),
                    2 => { m.with(&d, |v| *v += 1); }
                    _ => { m.remove_if(&d, |_| true); }
                }
                prop_assert!(m.len() <= m.capacity());
                let mut n = 0;
                m.for_each(|_| n += 1);
                prop_assert_eq!(n, m.len());
            }
        }

        #[test]
        fn digests_are_stable_and_distinct(a in proptest::collection::vec(any::<u8>(), 0..5000), b in proptest::collection::vec(any::<u8>(), 0..5000)) {
            prop_assert_eq!(KeyDigest::of(&a), KeyDigest::of(a.clone()));
            prop_assert_eq!(KeyDigest::of(&a) == KeyDigest::of(&b), a == b);
        }
    }
}
