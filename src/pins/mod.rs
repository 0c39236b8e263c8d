//! The pin table: which replica a session lives on.
//!
//! Once a session is placed (on its home replica or, past the load bound, on a spill replica) it
//! should stay there while that replica is healthy, because its KV cache is there. The affinity
//! layer records placements in a [`PinTable`]. [`MemoryPinTable`] is the in-process default; a
//! shared implementation (Redis) lets every gateway instance send a session to the same replica
//! even after a spill or failover.
//!
//! Pins expire after a TTL (idle conversations lose their cache anyway) and the in-memory table
//! is bounded in size.

#[cfg(feature = "redis")]
mod redis;

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use parking_lot::Mutex;
use tokio::time::Instant;

use crate::backend::BoxFuture;
use crate::context::RouteKey;
use crate::replica::ReplicaId;
use crate::store::{BoundedMap, KeyDigest};

#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub use self::redis::{
    RedisPinTable, DEFAULT_BREAKER_COOLDOWN, DEFAULT_BREAKER_THRESHOLD,
    DEFAULT_NEAR_CACHE_FRESHNESS, DEFAULT_NEAR_CACHE_PINS, DEFAULT_REFRESH_BELOW, PIN_SCOPE,
};

/// Errors of a pin table backed by a remote store.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PinError {
    /// The store did not answer in time.
    #[error("pin store timed out")]
    Timeout,
    /// The store failed.
    #[error("pin store failed: {0}")]
    Store(String),
}

/// A pin-table result that is either ready (in-memory tables: no allocation) or pending on a
/// boxed future (remote tables).
pub enum PinFuture<'a, T> {
    /// Already resolved.
    Ready(Option<Result<T, PinError>>),
    /// Waiting on a remote store.
    Pending(BoxFuture<'a, Result<T, PinError>>),
}

impl<T> std::fmt::Debug for PinFuture<'_, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PinFuture::Ready(_) => f.write_str("PinFuture::Ready"),
            PinFuture::Pending(_) => f.write_str("PinFuture::Pending"),
        }
    }
}

impl<T> PinFuture<'_, T> {
    /// A resolved result.
    pub fn ready(value: Result<T, PinError>) -> Self {
        PinFuture::Ready(Some(value))
    }
}

impl<T> Unpin for PinFuture<'_, T> {}

impl<T> Future for PinFuture<'_, T> {
    type Output = Result<T, PinError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        // Both variants are Unpin (Option<Result<..>> and Pin<Box<..>>).
        match self.get_mut() {
            PinFuture::Ready(v) => {
                Poll::Ready(v.take().expect("pin future polled after completion"))
            }
            PinFuture::Pending(f) => f.as_mut().poll(cx),
        }
    }
}

/// Where sessions are pinned.
///
/// Semantics every implementation keeps:
/// - [`get`](PinTable::get) returns the replica `session` was last pinned to, unless the pin
///   expired or was removed.
/// - [`pin`](PinTable::pin) sets or replaces the pin and restarts its TTL.
/// - [`unpin`](PinTable::unpin) removes it if it still points at `replica` (so a gateway that
///   saw an old placement cannot erase a newer one).
/// - Keys are arbitrary bytes; two different keys never share a pin. The tables of this crate
///   hold and store the [`KeyDigest`] of a key, never the key itself.
pub trait PinTable: Send + Sync + 'static {
    /// The replica `session` is pinned to, if any.
    fn get<'a>(&'a self, session: &'a RouteKey) -> PinFuture<'a, Option<ReplicaId>>;

    /// Pins `session` to `replica` for `ttl`.
    fn pin<'a>(
        &'a self,
        session: &'a RouteKey,
        replica: &'a ReplicaId,
        ttl: Duration,
    ) -> PinFuture<'a, ()>;

    /// Removes the pin if it still points at `replica`.
    fn unpin<'a>(&'a self, session: &'a RouteKey, replica: &'a ReplicaId) -> PinFuture<'a, ()>;

    /// [`get`](PinTable::get) with owned arguments, for callers (the affinity layer's response
    /// future) that must keep a pending lookup beyond the borrow.
    ///
    /// The default boxes a future that calls `get`; remote tables need not override it.
    /// In-memory tables override it to answer [`PinFuture::Ready`] without allocating.
    fn get_owned(self: Arc<Self>, session: RouteKey) -> PinFuture<'static, Option<ReplicaId>> {
        PinFuture::Pending(Box::pin(async move { self.get(&session).await }))
    }

    /// [`pin`](PinTable::pin) with owned arguments (see [`get_owned`](PinTable::get_owned)).
    fn pin_owned(
        self: Arc<Self>,
        session: RouteKey,
        replica: ReplicaId,
        ttl: Duration,
    ) -> PinFuture<'static, ()> {
        PinFuture::Pending(Box::pin(
            async move { self.pin(&session, &replica, ttl).await },
        ))
    }

    /// Pins `session` to `replica` after a lookup that saw `seen`: what the affinity layer
    /// calls once it has decided. Shared tables use `seen` to resolve races between gateways:
    ///
    /// - `seen == None` (first placement): set only if no pin exists; if another gateway (or a
    ///   concurrent turn) placed the session first, keep its pin and follow it from now on.
    /// - `seen == Some(replica)` (the session stayed): refresh the TTL, which a table may
    ///   coalesce (skip while much of the TTL remains), and never overwrite a pin another
    ///   gateway moved meanwhile.
    /// - `seen` names another replica (spill or failover): move the pin, unless another gateway
    ///   already moved it away from `seen`; then keep that move.
    ///
    /// The default ignores `seen` and calls [`pin_owned`](PinTable::pin_owned).
    fn pin_after_owned(
        self: Arc<Self>,
        session: RouteKey,
        seen: Option<ReplicaId>,
        replica: ReplicaId,
        ttl: Duration,
    ) -> PinFuture<'static, ()> {
        let _ = seen;
        self.pin_owned(session, replica, ttl)
    }
}

/// Default upper bound on pins held by a [`MemoryPinTable`].
pub const DEFAULT_MAX_PINS: usize = 1 << 20;

/// How often a [`MemoryPinTable`] sweeps out expired pins while it is being written to.
pub const SWEEP_INTERVAL: Duration = Duration::from_secs(60);

/// Name of the gauge a [`MemoryPinTable`] keeps at its number of pins (expired ones included
/// until the next sweep, at most [`SWEEP_INTERVAL`] after a write).
pub const PINS_LIVE_GAUGE: &str = "replica_router_affinity_pins_live";

type PinEntry = (ReplicaId, Instant);

/// An in-process pin table with TTLs and a size bound.
///
/// Pins are keyed by the [`KeyDigest`] of the session key (16 bytes, whatever the key's
/// length), so the memory a pin holds does not depend on what the client sent. When full, a
/// CLOCK hand evicts an expired or not recently used pin: O(1) per write, in one of 16 shards.
/// Expired pins are also swept at most every [`SWEEP_INTERVAL`] on writes, and the gauge
/// [`PINS_LIVE_GAUGE`] follows the table's size (register a `metrics` recorder before building
/// the table: the handle is taken once, at construction).
///
/// ```
/// use replica_router::pins::{MemoryPinTable, PinTable};
/// use replica_router::context::RouteKey;
/// use replica_router::replica::ReplicaId;
/// use std::time::Duration;
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let pins = MemoryPinTable::new(1000);
/// let key = RouteKey::from("conv-1");
/// let r = ReplicaId::new("gpu-0").unwrap();
/// pins.pin(&key, &r, Duration::from_secs(600)).await.unwrap();
/// assert_eq!(pins.get(&key).await.unwrap(), Some(r));
/// # }
/// ```
pub struct MemoryPinTable {
    map: BoundedMap<PinEntry>,
    next_sweep: Mutex<Instant>,
    gauge: metrics::Gauge,
}

impl std::fmt::Debug for MemoryPinTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryPinTable")
            .field("max", &self.capacity())
            .field("len", &self.len())
            .finish()
    }
}

/// The expiry `ttl` from `now`, saturating far in the future.
pub(crate) fn expiry(now: Instant, ttl: Duration) -> Instant {
    now.checked_add(ttl)
        .unwrap_or(now + Duration::from_secs(86_400 * 365))
}

impl MemoryPinTable {
    /// A table holding at most `max_pins` pins (at least 1; rounded down to a multiple of the
    /// shard count when above 16).
    pub fn new(max_pins: usize) -> Self {
        MemoryPinTable {
            map: BoundedMap::new(max_pins.max(1)),
            next_sweep: Mutex::new(Instant::now() + SWEEP_INTERVAL),
            gauge: metrics::gauge!(PINS_LIVE_GAUGE),
        }
    }

    /// The size bound.
    pub fn capacity(&self) -> usize {
        self.map.capacity()
    }

    /// Pins held now (expired ones included until swept or evicted).
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether no pin is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Pins per replica among the live (unexpired) pins.
    pub fn counts(&self) -> HashMap<ReplicaId, usize> {
        let now = Instant::now();
        let mut out = HashMap::new();
        self.map.for_each(|(r, exp)| {
            if *exp > now {
                *out.entry(r.clone()).or_insert(0) += 1;
            }
        });
        out
    }

    fn lookup(&self, session: &RouteKey) -> Option<ReplicaId> {
        let now = Instant::now();
        self.map
            .with(&KeyDigest::of(session.as_bytes()), |(r, exp)| {
                (*exp > now).then(|| r.clone())
            })
            .flatten()
    }

    fn insert(&self, session: &RouteKey, replica: &ReplicaId, ttl: Duration) {
        let now = Instant::now();
        let expires = expiry(now, ttl);
        if let Some(mut next) = self.next_sweep.try_lock() {
            if now >= *next {
                *next = now + SWEEP_INTERVAL;
                drop(next);
                self.map.sweep(|(_, exp)| *exp <= now);
            }
        }
        self.map.insert(
            KeyDigest::of(session.as_bytes()),
            (replica.clone(), expires),
            |(_, exp)| *exp <= now,
        );
        self.gauge.set(self.map.len() as f64);
    }

    fn remove(&self, session: &RouteKey, replica: &ReplicaId) {
        self.map
            .remove_if(&KeyDigest::of(session.as_bytes()), |(r, _)| r == replica);
        self.gauge.set(self.map.len() as f64);
    }
}

impl Default for MemoryPinTable {
    fn default() -> Self {
        MemoryPinTable::new(DEFAULT_MAX_PINS)
    }
}

impl PinTable for MemoryPinTable {
    fn get<'a>(&'a self, session: &'a RouteKey) -> PinFuture<'a, Option<ReplicaId>> {
        PinFuture::ready(Ok(self.lookup(session)))
    }

    fn pin<'a>(
        &'a self,
        session: &'a RouteKey,
        replica: &'a ReplicaId,
        ttl: Duration,
    ) -> PinFuture<'a, ()> {
        self.insert(session, replica, ttl);
        PinFuture::ready(Ok(()))
    }

    fn unpin<'a>(&'a self, session: &'a RouteKey, replica: &'a ReplicaId) -> PinFuture<'a, ()> {
        self.remove(session, replica);
        PinFuture::ready(Ok(()))
    }

    fn get_owned(self: Arc<Self>, session: RouteKey) -> PinFuture<'static, Option<ReplicaId>> {
        PinFuture::ready(Ok(self.lookup(&session)))
    }

    fn pin_owned(
        self: Arc<Self>,
        session: RouteKey,
        replica: ReplicaId,
        ttl: Duration,
    ) -> PinFuture<'static, ()> {
        self.insert(&session, &replica, ttl);
        PinFuture::ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::FutureExt;
    use proptest::prelude::*;

    fn now<T>(f: PinFuture<'_, T>) -> T {
        f.now_or_never().unwrap().unwrap()
    }

    proptest! {
        #[test]
        fn memory_table_never_exceeds_its_cap(
            cap in 1usize..100,
            keys in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..600), 0..300),
        ) {
            let table = MemoryPinTable::new(cap);
            let r = ReplicaId::new("r").unwrap();
            for k in keys {
                now(table.pin(&RouteKey::new(k), &r, Duration::from_secs(60)));
                prop_assert!(table.len() <= cap);
            }
        }

        #[test]
        fn same_key_same_pin_different_keys_different_pins(
            a in proptest::collection::vec(any::<u8>(), 0..5000),
            b in proptest::collection::vec(any::<u8>(), 0..5000),
        ) {
            let table = MemoryPinTable::new(16);
            let (ra, rb) = (ReplicaId::new("a").unwrap(), ReplicaId::new("b").unwrap());
            let (ka, kb) = (RouteKey::new(a.clone()), RouteKey::new(b.clone()));
            now(table.pin(&ka, &ra, Duration::from_secs(60)));
            now(table.pin(&kb, &rb, Duration::from_secs(60)));
            let expect_a = if a == b { rb.clone() } else { ra.clone() };
            prop_assert_eq!(now(table.get(&ka)), Some(expect_a));
            prop_assert_eq!(now(table.get(&RouteKey::new(b))), Some(rb));
        }
    }
}
