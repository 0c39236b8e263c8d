//! Counter stores: the one seam through which gateway instances share quota state.
//!
//! A per-tenant cap enforced separately in each gateway process multiplies the tenant's quota by
//! the number of gateways. The quota layer therefore keeps its counters in a [`CounterStore`]:
//! every gateway that shares one store shares one counter per tenant.
//!
//! * [`MemoryStore`] is the embedded default: one process, no I/O, driven by
//!   [`tokio::time::Instant`] so tests with a paused clock are exact.
//! * `RedisStore` (cargo feature `redis`) is the distributed one: one Lua script per call, run
//!   with `EVALSHA`, time read from the Redis server's `TIME`.
//!
//! # Operations
//!
//! * **Rate windows** ([`CounterStore::take`], [`CounterStore::settle`], [`CounterStore::usage`]):
//!   an atomic check-and-take of `cost` units (requests or tokens) against a [`RateQuota`] of
//!   `limit` units per `window`, and a later signed adjustment of that take (reserve the estimated
//!   tokens at admission, settle with the actual count when the response ends).
//! * **Concurrency** ([`CounterStore::acquire`], [`CounterStore::release`],
//!   [`CounterStore::renew`], [`CounterStore::in_use`]): at most `limit` leases held at once per
//!   key; each lease carries a TTL so the slots of a crashed gateway come back by themselves.
//!
//! # The rate algorithm: fixed windows aligned to store time
//!
//! Store time is a millisecond clock owned by the store: for Redis, milliseconds since the Unix
//! epoch as read by `TIME` inside the script; for [`MemoryStore`], milliseconds since the store
//! was built, measured with [`tokio::time::Instant`]. Gateway clocks are never read, so clock
//! skew between gateways cannot matter.
//!
//! For a quota of `limit` per `window` (`W` milliseconds), **window `k` is the half-open interval
//! `[k·W, (k+1)·W)` of store time**, and [`WindowId`] is its start `k·W`. A take is admitted iff
//! the units already taken in the current window plus `cost` do not exceed `limit`; read, test and
//! write happen atomically in the store. Hence the invariant:
//!
//! > **For every key and every window `k`, the sum of `cost` over admitted takes whose
//! > [`Take::window`] is `k` is at most `limit`, across all clients sharing the store.**
//!
//! Why fixed windows rather than GCRA or a sliding window:
//!
//! * The bound above is exact and checkable: every [`Take`] reports the window it was counted in,
//!   so a test (or an auditor) can sum admissions per window and compare with the limit.
//!   GCRA with a burst of `N` admits up to `2N` in some interval of length `W` and has no
//!   per-window statement; a sliding *log* is exact over every interval but costs memory and time
//!   proportional to the requests in the window, which is too much for token quotas.
//! * State is one pair `(window start, used)` per key, so a check is O(1) and one round trip, and
//!   the key expires when its window ends: idle tenants leave nothing behind.
//! * Reserve-then-settle is simple: a settlement adjusts the window the reservation was counted
//!   in, or, when that window is over, charges an *over-use* to the current window (see below).
//!
//! The price, stated plainly: an interval of length `W` that straddles a window boundary can see up
//! to `2·limit` (the end of one window and the start of the next), the same worst case as GCRA
//! with a burst of `limit`; and denied callers are told to retry when the window ends.
//!
//! ## Settling
//!
//! [`CounterStore::settle`] takes the [`WindowId`] returned by the take and a signed `delta`
//! (actual minus reserved). If that window is still the current one, `delta` is applied to it
//! (never below zero). If it has ended, a positive `delta` is charged to the current window (so a
//! tenant whose estimates are too low pays for its over-use instead of escaping it) and a negative
//! `delta` is dropped (the window it would have freed is over). Settlements never deny; they may
//! push a window's usage above `limit`, after which that window admits nothing more. The
//! invariant above is about admitted *takes*; settled usage exceeds `limit` only through
//! over-use reported after admission.
//!
//! # Concurrency leases
//!
//! [`CounterStore::acquire`] admits iff fewer than `limit` unexpired leases are held on the key,
//! and returns a [`LeaseId`]. [`CounterStore::release`] frees it. A lease not released within its
//! TTL (measured in store time) stops counting: that is the safety net for a gateway that crashed
//! while holding slots. Requests that may outlive the TTL should [`CounterStore::renew`] their
//! lease.
//!
//! # Failures
//!
//! Every call returns a typed [`StoreError`]; stores bound every call with a timeout so a caller
//! never hangs on a dead store. The failure *policy* (admit or reject when the store is down)
//! belongs to the caller. A timeout is ambiguous: the command may still reach the store and be
//! applied after the caller gave up (a reconnecting client sends what it had queued), so a
//! timed-out `take` can count once even though the caller saw an error. Counts therefore err on
//! the side of the quota, never past it.

mod bounded;
mod error;
mod key;
mod memory;
mod policy;
#[cfg(feature = "redis")]
pub(crate) mod redis;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

pub(crate) use self::bounded::BoundedMap;
pub use self::bounded::KeyDigest;
pub use self::error::{BoxError, StoreError};
pub use self::key::{validate_ident, StoreKey, MAX_RAW_SUBJECT, MAX_SCOPE_LEN};
pub use self::memory::MemoryStore;
pub use self::policy::{call_store, FailurePolicy};
#[cfg(feature = "redis")]
pub use self::redis::{RedisStore, RedisStoreConfig};

/// The boxed future every [`CounterStore`] method returns (keeps the trait dyn-compatible).
pub type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'a>>;

/// Largest limit or cost a store accepts (2^53 - 1: exact in a Lua number).
pub const MAX_UNITS: u64 = (1 << 53) - 1;

/// Longest accepted window or TTL (about 34 years).
pub const MAX_WINDOW: Duration = Duration::from_millis(1 << 40);

/// A rate quota: at most `limit` units per fixed window of `window` length.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RateQuota {
    limit: u64,
    window_ms: u64,
}

impl RateQuota {
    /// A quota of `limit` units per `window`.
    ///
    /// `window` is truncated to whole milliseconds and must be between 1 ms and [`MAX_WINDOW`];
    /// `limit` must be at most [`MAX_UNITS`]. A limit of 0 denies every take with a positive cost.
    pub fn new(limit: u64, window: Duration) -> Result<Self, StoreError> {
        if limit > MAX_UNITS {
            return Err(StoreError::InvalidQuota("limit above 2^53 - 1"));
        }
        let window_ms = window_ms(window)?;
        Ok(RateQuota { limit, window_ms })
    }

    /// The number of units admitted per window.
    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// The window length.
    pub fn window(&self) -> Duration {
        Duration::from_millis(self.window_ms)
    }

    /// The window length in milliseconds.
    pub fn window_ms(&self) -> u64 {
        self.window_ms
    }
}

pub(crate) fn window_ms(d: Duration) -> Result<u64, StoreError> {
    let ms = d.as_millis();
    if ms == 0 {
        return Err(StoreError::InvalidQuota("window or TTL shorter than 1 ms"));
    }
    if ms > MAX_WINDOW.as_millis() {
        return Err(StoreError::InvalidQuota(
            "window or TTL longer than 2^40 ms",
        ));
    }
    Ok(ms as u64)
}

pub(crate) fn check_units(n: u64) -> Result<(), StoreError> {
    if n > MAX_UNITS {
        Err(StoreError::InvalidQuota("cost or limit above 2^53 - 1"))
    } else {
        Ok(())
    }
}

/// Identifies one fixed window: its start in store milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct WindowId(pub u64);

/// The answer to [`CounterStore::take`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Take {
    /// Whether the cost was taken.
    pub admitted: bool,
    /// Units taken in this window after this call.
    pub used: u64,
    /// Units still available in this window (`limit - used`, or 0 if over).
    pub remaining: u64,
    /// When denied, how long until the window ends (then the take may succeed); zero when
    /// admitted.
    pub retry_after: Duration,
    /// The window the take was counted in (or would have been).
    pub window: WindowId,
    /// Time from the take until the window ends.
    pub reset_after: Duration,
}

/// Where a [`CounterStore::settle`] went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SettleTarget {
    /// Applied to the reservation's own window, which is still current.
    SameWindow,
    /// The reservation's window is over; the positive delta was charged to the current window.
    CarriedForward,
    /// The reservation's window is over and the delta was a refund (or zero): nothing changed.
    Dropped,
}

/// The answer to [`CounterStore::settle`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settled {
    /// What the settlement changed.
    pub target: SettleTarget,
    /// Units used in the current window after the settlement.
    pub used: u64,
    /// The current window.
    pub window: WindowId,
}

/// The answer to [`CounterStore::usage`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    /// The current window.
    pub window: WindowId,
    /// Units used in it.
    pub used: u64,
    /// Time until it ends.
    pub reset_after: Duration,
}

/// Identifies one concurrency lease (unique per store client).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct LeaseId(pub u128);

/// The answer to [`CounterStore::acquire`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Acquire {
    /// The lease, if one was granted; `None` when the limit was reached.
    pub lease: Option<LeaseId>,
    /// Unexpired leases held on the key after this call.
    pub in_use: u64,
}

impl Acquire {
    /// Whether a lease was granted.
    pub fn admitted(&self) -> bool {
        self.lease.is_some()
    }
}

/// An async, shareable store of quota counters. See the [module docs](self) for the exact
/// semantics; in short:
///
/// * every method is **atomic** with respect to every other call on the same key from any client
///   sharing the store;
/// * **time is the store's**: windows and TTLs are measured with the store's clock, never the
///   caller's;
/// * a quota of `limit` per window admits at most `limit` units in each window
///   (`[k·W, (k+1)·W)` of store time) across all clients;
/// * every call completes or fails with a [`StoreError`] within the store's timeout;
/// * keys of different subjects never share state ([`StoreKey`] is injective);
/// * state for a key disappears once its window ends or its last lease expires.
///
/// The trait is dyn-compatible: use `Arc<dyn CounterStore>` to choose the store at run time.
pub trait CounterStore: Send + Sync + 'static {
    /// Atomically takes `cost` units from `key`'s current window if `used + cost <= limit`.
    fn take<'a>(&'a self, key: &'a StoreKey, quota: RateQuota, cost: u64) -> StoreFuture<'a, Take>;

    /// Adjusts a previous take counted in `window` by `delta` units (positive: more was used than
    /// reserved; negative: refund). Never denies. See the module docs for ended windows.
    fn settle<'a>(
        &'a self,
        key: &'a StoreKey,
        quota: RateQuota,
        window: WindowId,
        delta: i64,
    ) -> StoreFuture<'a, Settled>;

    /// Reads the current window's usage without changing it.
    fn usage<'a>(&'a self, key: &'a StoreKey, quota: RateQuota) -> StoreFuture<'a, Usage>;

    /// Grants a lease on `key` if fewer than `limit` unexpired leases are held; the lease expires
    /// `ttl` after this call (store time) unless renewed or released first.
    fn acquire<'a>(
        &'a self,
        key: &'a StoreKey,
        limit: u64,
        ttl: Duration,
    ) -> StoreFuture<'a, Acquire>;

    /// Releases `lease`. Returns whether it was still held (false if it had expired or was
    /// already released). Idempotent.
    fn release<'a>(&'a self, key: &'a StoreKey, lease: LeaseId) -> StoreFuture<'a, bool>;

    /// Extends `lease` to expire `ttl` from now. Returns false (and does nothing) if the lease is
    /// no longer held.
    fn renew<'a>(
        &'a self,
        key: &'a StoreKey,
        lease: LeaseId,
        ttl: Duration,
    ) -> StoreFuture<'a, bool>;

    /// Number of unexpired leases held on `key`.
    fn in_use<'a>(&'a self, key: &'a StoreKey) -> StoreFuture<'a, u64>;
}

macro_rules! forward_store {
    ($($ty:ty),*) => {$(
        impl<T: CounterStore + ?Sized> CounterStore for $ty {
            fn take<'a>(&'a self, key: &'a StoreKey, quota: RateQuota, cost: u64) -> StoreFuture<'a, Take> {
                (**self).take(key, quota, cost)
            }
            fn settle<'a>(&'a self, key: &'a StoreKey, quota: RateQuota, window: WindowId, delta: i64) -> StoreFuture<'a, Settled> {
                (**self).settle(key, quota, window, delta)
            }
            fn usage<'a>(&'a self, key: &'a StoreKey, quota: RateQuota) -> StoreFuture<'a, Usage> {
                (**self).usage(key, quota)
            }
            fn acquire<'a>(&'a self, key: &'a StoreKey, limit: u64, ttl: Duration) -> StoreFuture<'a, Acquire> {
                (**self).acquire(key, limit, ttl)
            }
            fn release<'a>(&'a self, key: &'a StoreKey, lease: LeaseId) -> StoreFuture<'a, bool> {
                (**self).release(key, lease)
            }
            fn renew<'a>(&'a self, key: &'a StoreKey, lease: LeaseId, ttl: Duration) -> StoreFuture<'a, bool> {
                (**self).renew(key, lease, ttl)
            }
            fn in_use<'a>(&'a self, key: &'a StoreKey) -> StoreFuture<'a, u64> {
                (**self).in_use(key)
            }
        }
    )*};
}

forward_store!(Arc<T>, Box<T>);
