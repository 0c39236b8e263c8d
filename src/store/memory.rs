//! The embedded, in-process counter store.

use std::collections::HashMap;
use std::fmt;
use std::future::ready;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::time::Instant;

use super::{
    check_units, window_ms, Acquire, CounterStore, LeaseId, RateQuota, SettleTarget, Settled,
    StoreError, StoreFuture, StoreKey, Take, Usage, WindowId,
};

const SHARDS: usize = 16;
/// A shard is swept after at least this many calls (and at least as many calls as it has keys),
/// so sweeping costs O(1) amortized per call.
const SWEEP_MIN_OPS: usize = 256;

/// An in-process [`CounterStore`]: the embedded default for a single gateway.
///
/// * Store time is milliseconds since the store was built, read from [`tokio::time::Instant`], so
///   a test with `tokio::time::pause()` controls it exactly.
/// * Calls never wait on I/O: each future is ready when returned.
/// * Memory is bounded by the live keys: a rate key lives until its window ends and a concurrency
///   key until its last lease expires or is released; expired keys are swept as calls go by
///   (amortized O(1) per call) or by [`MemoryStore::sweep`].
///
/// Clones share the same counters.
///
/// ```
/// use std::time::Duration;
/// use replica_router::store::{CounterStore, MemoryStore, RateQuota, StoreKey};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), replica_router::store::StoreError> {
/// let store = MemoryStore::new();
/// let key = StoreKey::new("quota.req", b"tenant-a")?;
/// let quota = RateQuota::new(2, Duration::from_secs(60))?;
/// assert!(store.take(&key, quota, 1).await?.admitted);
/// assert!(store.take(&key, quota, 1).await?.admitted);
/// let third = store.take(&key, quota, 1).await?;
/// assert!(!third.admitted);
/// assert!(third.retry_after <= Duration::from_secs(60));
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct MemoryStore {
    inner: Arc<Inner>,
}

struct Inner {
    epoch: Instant,
    shards: Vec<Mutex<Shard>>,
    next_lease: AtomicU64,
    ops: AtomicUsize,
}

#[derive(Default)]
struct Shard {
    map: HashMap<StoreKey, Entry>,
    /// Calls on this shard since its last sweep.
    ops: usize,
    /// Value of the store-wide call counter at this shard's last sweep.
    swept_at: usize,
}

impl Shard {
    fn sweep(&mut self, now: u64, global_ops: usize) {
        self.map.retain(|_, e| !e.expired(now));
        self.ops = 0;
        self.swept_at = global_ops;
    }
}

enum Entry {
    Window { start: u64, end: u64, used: u64 },
    Leases(HashMap<u128, u64>),
}

impl Entry {
    fn expired(&mut self, now: u64) -> bool {
        match self {
            Entry::Window { end, .. } => *end <= now,
            Entry::Leases(leases) => {
                leases.retain(|_, exp| *exp > now);
                leases.is_empty()
            }
        }
    }
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryStore")
            .field("keys", &self.len())
            .finish()
    }
}

impl MemoryStore {
    /// A new, empty store whose clock starts now.
    pub fn new() -> Self {
        MemoryStore {
            inner: Arc::new(Inner {
                epoch: Instant::now(),
                shards: (0..SHARDS).map(|_| Mutex::new(Shard::default())).collect(),
                next_lease: AtomicU64::new(1),
                ops: AtomicUsize::new(0),
            }),
        }
    }

    /// Store time: milliseconds since the store was built.
    pub fn now_ms(&self) -> u64 {
        Instant::now()
            .saturating_duration_since(self.inner.epoch)
            .as_millis() as u64
    }

    /// Number of keys currently held (including expired ones not yet swept).
    pub fn len(&self) -> usize {
        self.inner.shards.iter().map(|s| s.lock().map.len()).sum()
    }

    /// True when no key is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Drops every expired key now.
    pub fn sweep(&self) {
        let now = self.now_ms();
        let g = self.inner.ops.load(Ordering::Relaxed);
        for shard in &self.inner.shards {
            shard.lock().sweep(now, g);
        }
    }

    fn with_shard<T>(
        &self,
        key: &StoreKey,
        f: impl FnOnce(&mut HashMap<StoreKey, Entry>, u64) -> T,
    ) -> T {
        use std::hash::{Hash, Hasher};
        let mut fh = FnvHasher::default();
        key.hash(&mut fh);
        let idx = (fh.finish() as usize) % SHARDS;
        let now = self.now_ms();
        let g = self.inner.ops.fetch_add(1, Ordering::Relaxed);
        // Keys in shards that see no calls must expire too: every 16th call looks at one other
        // shard (round robin) and sweeps it once the store has made SHARDS times as many calls
        // as it holds keys since its last sweep. Each shard then costs at most 1/SHARDS of a
        // key visit per call, so sweeping stays O(1) amortized.
        if g.is_multiple_of(16) {
            let j = (g / 16) % SHARDS;
            if j != idx {
                if let Some(mut other) = self.inner.shards[j].try_lock() {
                    let due = SWEEP_MIN_OPS.max(SHARDS * other.map.len());
                    if g.wrapping_sub(other.swept_at) >= due {
                        other.sweep(now, g);
                    }
                }
            }
        }
        let mut shard = self.inner.shards[idx].lock();
        shard.ops += 1;
        if shard.ops >= SWEEP_MIN_OPS.max(shard.map.len()) {
            shard.sweep(now, g);
        }
        f(&mut shard.map, now)
    }

    fn take_sync(&self, key: &StoreKey, quota: RateQuota, cost: u64) -> Result<Take, StoreError> {
        check_units(cost)?;
        let w = quota.window_ms();
        self.with_shard(key, |map, now| {
            let start = now - now % w;
            let end = start + w;
            let used = match map.get(key) {
                Some(Entry::Window { start: s, used, .. }) if *s == start => *used,
                Some(Entry::Window { .. }) | None => 0,
                Some(Entry::Leases(_)) => return Err(StoreError::WrongKind),
            };
            let reset_after = Duration::from_millis(end - now);
            if used.saturating_add(cost) <= quota.limit() {
                let used = used + cost;
                map.insert(key.clone(), Entry::Window { start, end, used });
                Ok(Take {
                    admitted: true,
                    used,
                    remaining: quota.limit() - used,
                    retry_after: Duration::ZERO,
                    window: WindowId(start),
                    reset_after,
                })
            } else {
                Ok(Take {
                    admitted: false,
                    used,
                    remaining: quota.limit().saturating_sub(used),
                    retry_after: reset_after,
                    window: WindowId(start),
                    reset_after,
                })
            }
        })
    }

    fn settle_sync(
        &self,
        key: &StoreKey,
        quota: RateQuota,
        window: WindowId,
        delta: i64,
    ) -> Result<Settled, StoreError> {
        check_units(delta.unsigned_abs())?;
        let w = quota.window_ms();
        self.with_shard(key, |map, now| {
            let start = now - now % w;
            let end = start + w;
            let used = match map.get(key) {
                Some(Entry::Window { start: s, used, .. }) if *s == start => *used,
                Some(Entry::Window { .. }) | None => 0,
                Some(Entry::Leases(_)) => return Err(StoreError::WrongKind),
            };
            let (target, new_used) = if window.0 == start {
                (SettleTarget::SameWindow, apply(used, delta))
            } else if delta > 0 {
                (SettleTarget::CarriedForward, apply(used, delta))
            } else {
                (SettleTarget::Dropped, used)
            };
            if target != SettleTarget::Dropped {
                map.insert(
                    key.clone(),
                    Entry::Window {
                        start,
                        end,
                        used: new_used,
                    },
                );
            }
            Ok(Settled {
                target,
                used: new_used,
                window: WindowId(start),
            })
        })
    }

    fn usage_sync(&self, key: &StoreKey, quota: RateQuota) -> Result<Usage, StoreError> {
        let w = quota.window_ms();
        self.with_shard(key, |map, now| {
            let start = now - now % w;
            let used = match map.get(key) {
                Some(Entry::Window { start: s, used, .. }) if *s == start => *used,
                Some(Entry::Window { .. }) | None => 0,
                Some(Entry::Leases(_)) => return Err(StoreError::WrongKind),
            };
            Ok(Usage {
                window: WindowId(start),
                used,
                reset_after: Duration::from_millis(start + w - now),
            })
        })
    }

    fn acquire_sync(
        &self,
        key: &StoreKey,
        limit: u64,
        ttl: Duration,
    ) -> Result<Acquire, StoreError> {
        check_units(limit)?;
        let ttl = window_ms(ttl)?;
        let id = u128::from(self.inner.next_lease.fetch_add(1, Ordering::Relaxed));
        self.with_shard(key, |map, now| {
            let entry = map
                .entry(key.clone())
                .or_insert_with(|| Entry::Leases(HashMap::new()));
            let Entry::Leases(leases) = entry else {
                return Err(StoreError::WrongKind);
            };
            leases.retain(|_, exp| *exp > now);
            let held = leases.len() as u64;
            if held < limit {
                leases.insert(id, now + ttl);
                Ok(Acquire {
                    lease: Some(LeaseId(id)),
                    in_use: held + 1,
                })
            } else {
                if leases.is_empty() {
                    map.remove(key);
                }
                Ok(Acquire {
                    lease: None,
                    in_use: held,
                })
            }
        })
    }

    fn release_sync(&self, key: &StoreKey, lease: LeaseId) -> Result<bool, StoreError> {
        self.with_shard(key, |map, now| match map.get_mut(key) {
            None => Ok(false),
            Some(Entry::Window { .. }) => Err(StoreError::WrongKind),
            Some(Entry::Leases(leases)) => {
                let held = matches!(leases.remove(&lease.0), Some(exp) if exp > now);
                leases.retain(|_, exp| *exp > now);
                if leases.is_empty() {
                    map.remove(key);
                }
                Ok(held)
            }
        })
    }

    fn renew_sync(
        &self,
        key: &StoreKey,
        lease: LeaseId,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        let ttl = window_ms(ttl)?;
        self.with_shard(key, |map, now| match map.get_mut(key) {
            None => Ok(false),
            Some(Entry::Window { .. }) => Err(StoreError::WrongKind),
            Some(Entry::Leases(leases)) => match leases.get_mut(&lease.0) {
                Some(exp) if *exp > now => {
                    *exp = now + ttl;
                    Ok(true)
                }
                _ => Ok(false),
            },
        })
    }

    fn in_use_sync(&self, key: &StoreKey) -> Result<u64, StoreError> {
        self.with_shard(key, |map, now| match map.get_mut(key) {
            None => Ok(0),
            Some(Entry::Window { .. }) => Err(StoreError::WrongKind),
            Some(Entry::Leases(leases)) => {
                leases.retain(|_, exp| *exp > now);
                let n = leases.len() as u64;
                if n == 0 {
                    map.remove(key);
                }
                Ok(n)
            }
        })
    }
}

fn apply(used: u64, delta: i64) -> u64 {
    if delta >= 0 {
        used.saturating_add(delta as u64)
    } else {
        used.saturating_sub(delta.unsigned_abs())
    }
}

/// FNV-1a: a fixed, cheap hasher for picking a shard.
struct FnvHasher(u64);

impl Default for FnvHasher {
    fn default() -> Self {
        FnvHasher(0xcbf2_9ce4_8422_2325)
    }
}

impl std::hash::Hasher for FnvHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 ^= u64::from(b);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }
}

impl CounterStore for MemoryStore {
    fn take<'a>(&'a self, key: &'a StoreKey, quota: RateQuota, cost: u64) -> StoreFuture<'a, Take> {
        Box::pin(ready(self.take_sync(key, quota, cost)))
    }

    fn settle<'a>(
        &'a self,
        key: &'a StoreKey,
        quota: RateQuota,
        window: WindowId,
        delta: i64,
    ) -> StoreFuture<'a, Settled> {
        Box::pin(ready(self.settle_sync(key, quota, window, delta)))
    }

    fn usage<'a>(&'a self, key: &'a StoreKey, quota: RateQuota) -> StoreFuture<'a, Usage> {
        Box::pin(ready(self.usage_sync(key, quota)))
    }

    fn acquire<'a>(
        &'a self,
        key: &'a StoreKey,
        limit: u64,
        ttl: Duration,
    ) -> StoreFuture<'a, Acquire> {
        Box::pin(ready(self.acquire_sync(key, limit, ttl)))
    }

    fn release<'a>(&'a self, key: &'a StoreKey, lease: LeaseId) -> StoreFuture<'a, bool> {
        Box::pin(ready(self.release_sync(key, lease)))
    }

    fn renew<'a>(
        &'a self,
        key: &'a StoreKey,
        lease: LeaseId,
        ttl: Duration,
    ) -> StoreFuture<'a, bool> {
        Box::pin(ready(self.renew_sync(key, lease, ttl)))
    }

    fn in_use<'a>(&'a self, key: &'a StoreKey) -> StoreFuture<'a, u64> {
        Box::pin(ready(self.in_use_sync(key)))
    }
}
