//! A bounded, approximate index of the prefixes recently sent to each replica.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use arc_swap::ArcSwap;
use parking_lot::Mutex;

use crate::prefix::hasher::PrefixHashes;
use crate::replica::ReplicaId;

/// Most replicas one index tracks (a bit each in a `u128`); replicas past it get no matches.
pub const MAX_TRACKED_REPLICAS: usize = 128;

/// Distinct match lengths one lookup reports; replicas beyond are reported at the last one.
const MAX_LEVELS: usize = 12;

/// Settings of a [`PrefixIndex`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PrefixIndexConfig {
    /// Tokens of prefixes remembered per unit of a replica's capacity weight (the router's
    /// guess of the engine's prefix cache; default 200 000, about a TP=2 70B replica's KV
    /// cache). The oldest prefixes are forgotten first, leaf before root, as engines evict.
    pub capacity_tokens_per_weight: u64,
    /// Hard cap on the fingerprints kept per replica, whatever the weights (default 16 384).
    pub max_entries_per_replica: usize,
}

impl Default for PrefixIndexConfig {
    fn default() -> Self {
        PrefixIndexConfig {
            capacity_tokens_per_weight: 200_000,
            max_entries_per_replica: 16_384,
        }
    }
}

/// Which replicas hold how much of one request's prefix, from [`PrefixIndex::lookup`].
/// A plain value (no allocation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PrefixMatch {
    /// `(replicas as slot bits, checkpoints they hold)`, shortest match first.
    levels: [(u128, u16); MAX_LEVELS],
    len: u8,
}

impl PrefixMatch {
    /// No replica holds any of the prefix.
    pub const NONE: PrefixMatch = PrefixMatch {
        levels: [(0, 0); MAX_LEVELS],
        len: 0,
    };

    /// Checkpoints of the prefix the replica in `slot` holds (0 when none).
    pub fn checkpoints(&self, slot: Option<u8>) -> usize {
        let Some(slot) = slot else { return 0 };
        let bit = 1u128 << (slot as u32 % 128);
        self.levels[..self.len as usize]
            .iter()
            .find(|(m, _)| m & bit != 0)
            .map_or(0, |&(_, n)| n as usize)
    }

    /// The replicas (slot bits) with the longest match, and its length in checkpoints.
    pub fn deepest(&self) -> Option<(u128, usize)> {
        self.levels[..self.len as usize]
            .last()
            .map(|&(m, n)| (m, n as usize))
    }

    /// Whether no replica holds any of the prefix.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn push(&mut self, mask: u128, n: usize) {
        if mask == 0 || n == 0 {
            return;
        }
        if (self.len as usize) < MAX_LEVELS {
            self.levels[self.len as usize] = (mask, n.min(u16::MAX as usize) as u16);
            self.len += 1;
        } else {
            // Out of levels: report them at the last (shorter) length.
            self.levels[MAX_LEVELS - 1].0 |= mask;
        }
    }
}

#[derive(Debug, Default)]
struct Slots {
    by_id: HashMap<ReplicaId, u8>,
    ids: Vec<Option<ReplicaId>>,
}

#[derive(Debug, Default)]
struct ReplicaEntries {
    /// Fingerprint -> (last touch stamp, tokens it stands for).
    map: HashMap<u64, (u64, u32)>,
    /// Touches in order, oldest first; entries whose stamp is stale are skipped at eviction.
    fifo: VecDeque<(u64, u64)>,
    used: u64,
}

#[derive(Debug, Default)]
struct Inner {
    /// Fingerprint -> replicas holding it.
    global: HashMap<u64, u128>,
    replicas: Vec<ReplicaEntries>,
    stamp: u64,
}

impl Inner {
    fn get(&self, h: u64) -> u128 {
        self.global.get(&h).copied().unwrap_or(0)
    }

    fn forget(&mut self, slot: usize, fp: u64) {
        let bit = 1u128 << slot;
        if let Some(m) = self.global.get_mut(&fp) {
            *m &= !bit;
            if *m == 0 {
                self.global.remove(&fp);
            }
        }
    }
}

/// Per replica, an approximate LRU of the prompt prefixes recently sent there, bounded in
/// tokens like the engine's own prefix cache, answering "how many leading tokens of this request
/// does replica `i` probably hold" for every replica in one lookup.
///
/// - [`record`](Self::record) after a request is placed: the replica now holds its prefix.
///   Touches the request's checkpoints (at most [`MAX_CHECKPOINTS`](super::MAX_CHECKPOINTS)),
///   longest first, so the shared leading blocks are the most recently used and are forgotten
///   last; then forgets the least recently used fingerprints until the replica is within its
///   token capacity and its entry cap.
/// - [`lookup`](Self::lookup): one map from fingerprint to the set of replicas holding it, and a
///   binary search along the request's checkpoints for each distinct match length, so the cost
///   is `O(levels x log checkpoints)` map probes whatever the number of replicas.
///
/// Memory is bounded by `max_entries_per_replica` fingerprints per tracked replica (at most
/// [`MAX_TRACKED_REPLICAS`]), whatever the prompts: a hostile prompt can only displace other
/// prefixes. One mutex guards the maps; lookups and records each hold it for a few
/// microseconds at most.
///
/// ```
/// use replica_router::prefix::{PrefixHashes, PrefixIndex};
/// use replica_router::replica::ReplicaId;
///
/// let index = PrefixIndex::default();
/// let a = ReplicaId::new("a").unwrap();
/// let chain: Vec<u64> = (1..=100).collect(); // one conversation, 100 blocks of 16 tokens
/// let turn1 = PrefixHashes::from_block_chain(&chain[..60], 16, 960);
/// index.record(&a, 1.0, &turn1);
/// let turn2 = PrefixHashes::from_block_chain(&chain, 16, 1600);
/// let m = index.lookup(&turn2);
/// let held = turn2.tokens_at(m.checkpoints(index.slot(&a)));
/// assert!(held <= 960 && held >= 900, "{held}");
/// ```
#[derive(Debug)]
pub struct PrefixIndex {
    config: PrefixIndexConfig,
    inner: Mutex<Inner>,
    slots: ArcSwap<Slots>,
    /// Records queued for other gateways ([`PrefixIndex::sharing`]).
    shared: Option<Mutex<Outbox>>,
}

/// One placement as another gateway's index receives it.
#[derive(Debug, Clone)]
pub struct SharedRecord {
    /// The replica the prompt went to.
    pub replica: ReplicaId,
    /// Its capacity weight.
    pub weight: f64,
    /// The prompt's fingerprints.
    pub hashes: PrefixHashes,
}

/// Records waiting for the next share round, bounded: past `cap`, the oldest are dropped.
#[derive(Debug)]
struct Outbox {
    records: VecDeque<SharedRecord>,
    cap: usize,
}

impl Default for PrefixIndex {
    fn default() -> Self {
        PrefixIndex::new(PrefixIndexConfig::default())
    }
}

impl PrefixIndex {
    /// An empty index.
    pub fn new(config: PrefixIndexConfig) -> Self {
        PrefixIndex {
            config,
            inner: Mutex::new(Inner::default()),
            slots: ArcSwap::from_pointee(Slots::default()),
            shared: None,
        }
    }

    /// Also queues every placement [`record`](Self::record)ed, at most `cap` between two
    /// [`take_shared`](Self::take_shared) calls (the oldest go first), for a share with other
    /// gateways ([`cluster::PrefixShare`](crate::cluster)).
    pub fn sharing(mut self, cap: usize) -> Self {
        self.shared = Some(Mutex::new(Outbox {
            records: VecDeque::new(),
            cap: cap.max(1),
        }));
        self
    }

    /// The placements queued since the last call (empty unless [`sharing`](Self::sharing)).
    pub fn take_shared(&self) -> Vec<SharedRecord> {
        self.shared
            .as_ref()
            .map(|o| o.lock().records.drain(..).collect())
            .unwrap_or_default()
    }

    /// Records a placement another gateway made (not queued for sharing again).
    pub fn record_shared(&self, replica: &ReplicaId, weight: f64, hashes: &PrefixHashes) {
        self.record_local(replica, weight, hashes);
    }

    /// The settings.
    pub fn config(&self) -> &PrefixIndexConfig {
        &self.config
    }

    /// The index's slot of a replica, if it has one (it gets one at its first record).
    pub fn slot(&self, id: &ReplicaId) -> Option<u8> {
        self.slots.load().by_id.get(id).copied()
    }

    /// The replica in `slot`.
    pub fn replica(&self, slot: u8) -> Option<ReplicaId> {
        self.slots.load().ids.get(slot as usize).cloned().flatten()
    }

    fn slot_or_assign(&self, id: &ReplicaId, inner: &mut Inner) -> Option<usize> {
        if let Some(s) = self.slot(id) {
            return Some(s as usize);
        }
        let cur = self.slots.load_full();
        let free = cur
            .ids
            .iter()
            .position(Option::is_none)
            .or((cur.ids.len() < MAX_TRACKED_REPLICAS).then_some(cur.ids.len()))?;
        let mut next = Slots {
            by_id: cur.by_id.clone(),
            ids: cur.ids.clone(),
        };
        if free == next.ids.len() {
            next.ids.push(None);
        }
        next.ids[free] = Some(id.clone());
        next.by_id.insert(id.clone(), free as u8);
        self.slots.store(Arc::new(next));
        if inner.replicas.len() <= free {
            inner
                .replicas
                .resize_with(free + 1, ReplicaEntries::default);
        }
        Some(free)
    }

    /// Which replicas hold how much of `hashes`' prefix.
    pub fn lookup(&self, hashes: &PrefixHashes) -> PrefixMatch {
        let h = hashes.hashes();
        let mut out = PrefixMatch::NONE;
        if h.is_empty() {
            return out;
        }
        let inner = self.inner.lock();
        let n = h.len();
        let mut mask = inner.get(h[0]);
        let mut lo = 0usize;
        while mask != 0 {
            // Largest j >= lo such that every replica of `mask` holds checkpoint j (holdings
            // are prefix-closed up to eviction, so this is a binary search).
            let (mut a, mut b) = (lo, n);
            while b - a > 1 {
                let m = a + (b - a) / 2;
                if inner.get(h[m]) & mask == mask {
                    a = m;
                } else {
                    b = m;
                }
            }
            if a + 1 == n {
                out.push(mask, n);
                break;
            }
            let next = inner.get(h[a + 1]) & mask;
            out.push(mask & !next, a + 1);
            mask = next;
            lo = a + 1;
        }
        out
    }

    /// Records that `replica` (of capacity weight `weight`) was sent the prompt `hashes`.
    pub fn record(&self, replica: &ReplicaId, weight: f64, hashes: &PrefixHashes) {
        if hashes.is_empty() {
            return;
        }
        if let Some(outbox) = &self.shared {
            let mut o = outbox.lock();
            if o.records.len() >= o.cap {
                o.records.pop_front();
            }
            o.records.push_back(SharedRecord {
                replica: replica.clone(),
                weight,
                hashes: hashes.clone(),
            });
        }
        self.record_local(replica, weight, hashes);
    }

    fn record_local(&self, replica: &ReplicaId, weight: f64, hashes: &PrefixHashes) {
        if hashes.is_empty() {
            return;
        }
        let w = if weight.is_finite() && weight > 0.0 {
            weight
        } else {
            1.0
        };
        let capacity = (self.config.capacity_tokens_per_weight as f64 * w) as u64;
        let max_entries = self.config.max_entries_per_replica.max(1);
        let mut guard = self.inner.lock();
        let inner = &mut *guard;
        let Some(slot) = self.slot_or_assign(replica, inner) else {
            return;
        };
        let bit = 1u128 << slot;
        // Longest first, so the leading (shared) checkpoints are touched last.
        for (k, &fp) in hashes.hashes().iter().enumerate().rev() {
            inner.stamp += 1;
            let stamp = inner.stamp;
            let span = hashes.span_tokens(k).min(u64::from(u32::MAX)) as u32;
            let entries = &mut inner.replicas[slot];
            match entries.map.get_mut(&fp) {
                Some(e) => e.0 = stamp,
                None => {
                    entries.map.insert(fp, (stamp, span));
                    entries.used += u64::from(span);
                    *inner.global.entry(fp).or_insert(0) |= bit;
                }
            }
            inner.replicas[slot].fifo.push_back((fp, stamp));
        }
        // Forget the least recently used until within bounds.
        loop {
            let entries = &mut inner.replicas[slot];
            if entries.used <= capacity && entries.map.len() <= max_entries {
                break;
            }
            let Some((fp, stamp)) = entries.fifo.pop_front() else {
                break;
            };
            if let Some(&(s, span)) = entries.map.get(&fp) {
                if s == stamp {
                    entries.map.remove(&fp);
                    entries.used -= u64::from(span);
                    inner.forget(slot, fp);
                }
            }
        }
        // Drop stale touches once they outnumber the live entries.
        let entries = &mut inner.replicas[slot];
        if entries.fifo.len() > 2 * entries.map.len() + 1024 {
            let map = &entries.map;
            entries
                .fifo
                .retain(|(fp, s)| map.get(fp).is_some_and(|e| e.0 == *s));
        }
    }

    /// Forgets everything about `replica` and frees its slot (call when it leaves the pool or
    /// restarts with a cold cache).
    pub fn forget(&self, replica: &ReplicaId) {
        let mut inner = self.inner.lock();
        let Some(slot) = self.slot(replica) else {
            return;
        };
        let slot = slot as usize;
        if let Some(entries) = inner.replicas.get_mut(slot) {
            let fps: Vec<u64> = entries.map.keys().copied().collect();
            *entries = ReplicaEntries::default();
            for fp in fps {
                inner.forget(slot, fp);
            }
        }
        let cur = self.slots.load_full();
        let mut next = Slots {
            by_id: cur.by_id.clone(),
            ids: cur.ids.clone(),
        };
        next.by_id.remove(replica);
        if let Some(s) = next.ids.get_mut(slot) {
            *s = None;
        }
        self.slots.store(Arc::new(next));
    }

    /// Memory in use: `(distinct fingerprints, fingerprint entries over all replicas, queued
    /// touches over all replicas)`.
    pub fn sizes(&self) -> (usize, usize, usize) {
        let inner = self.inner.lock();
        let entries = inner.replicas.iter().map(|r| r.map.len()).sum();
        let fifo = inner.replicas.iter().map(|r| r.fifo.len()).sum();
        (inner.global.len(), entries, fifo)
    }

    /// Tokens remembered for `replica`.
    pub fn tokens_held(&self, replica: &ReplicaId) -> u64 {
        let Some(slot) = self.slot(replica) else {
            return 0;
        };
        self.inner
            .lock()
            .replicas
            .get(slot as usize)
            .map_or(0, |r| r.used)
    }
}
