//! Session pins shared through Redis (cargo feature `redis`): a near-cache in front, coalesced
//! TTL refreshes, compare-and-set writes, an outage breaker, and a write-behind queue that puts
//! back the pins an outage kept out of Redis.

use std::collections::VecDeque;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use redis::aio::ConnectionManager;
use redis::Script;
use tokio::time::Instant;

use super::{expiry, PinError, PinFuture, PinTable};
use crate::context::RouteKey;
use crate::replica::ReplicaId;
use crate::store::redis::map_err;
use crate::store::{BoundedMap, FailurePolicy, KeyDigest};
use crate::store::{RedisStore, StoreError, StoreKey, MAX_WINDOW};

/// Scope of pin keys: `<prefix>:pin:{x<hex of the session's 16-byte KeyDigest>}`.
pub const PIN_SCOPE: &str = "pin";

/// The affinity layer's pin-error counter (`affinity::PIN_ERRORS_COUNTER`), which the table
/// counts itself when it fails open.
pub(super) const PIN_ERRORS: &str = "replica_router_affinity_pin_errors_total";

/// Default size bound of the near-cache.
pub const DEFAULT_NEAR_CACHE_PINS: usize = 1 << 16;
/// Default time a pin read from Redis is served locally without asking again.
pub const DEFAULT_NEAR_CACHE_FRESHNESS: Duration = Duration::from_secs(1);
/// Default fraction of the TTL below which a session's pin is refreshed in Redis.
pub const DEFAULT_REFRESH_BELOW: f64 = 0.5;
/// Default bound of the write-behind queue (pins whose write did not reach Redis).
pub const DEFAULT_WRITE_BEHIND_PINS: usize = 4096;
/// Default pause between two passes of the write-behind queue.
pub const DEFAULT_WRITE_BEHIND_RETRY: Duration = Duration::from_millis(500);
/// Pins written back per pass of the write-behind queue.
const WRITE_BEHIND_BATCH: usize = 256;

/// Default consecutive outage failures that open the breaker.
pub const DEFAULT_BREAKER_THRESHOLD: u32 = 2;
/// Default time the breaker stays open before a background probe.
pub const DEFAULT_BREAKER_COOLDOWN: Duration = Duration::from_secs(1);

const UNPIN: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
";

/// KEYS[1]: the pin. ARGV: replica, ttl ms, mode (place | refresh | move), seen replica.
/// Returns the replica the session is pinned to afterwards.
const PIN_AFTER: &str = r"
local cur = redis.call('GET', KEYS[1])
local mode = ARGV[3]
if not cur then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return ARGV[1]
end
if cur == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return cur
end
if mode == 'move' and cur == ARGV[4] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return ARGV[1]
end
return cur
";

/// What the near-cache knows of one session.
#[derive(Clone)]
struct Near {
    replica: ReplicaId,
    /// When the pin was last read from (or written to) Redis.
    checked: Instant,
    /// When the pin expires in Redis, as far as this gateway knows (`checked` when unknown).
    remote_expires: Instant,
    /// When the pin expires locally (its TTL from the last placement).
    local_expires: Instant,
    /// This gateway's last write of the pin did not reach Redis (it failed, timed out or was
    /// skipped by the open breaker), so a miss in Redis means the write was lost, not that
    /// another gateway removed the pin.
    unwritten: bool,
    /// For an unwritten move: the pin it was to replace. Finding that pin still in Redis means
    /// the move was lost, not overruled by another gateway.
    replaced: Option<ReplicaId>,
    /// The unwritten pin waits in the write-behind queue.
    queued: bool,
}

/// Pins whose write did not reach Redis, written back in the background once Redis answers
/// again (oldest first; the oldest is dropped past the bound, and keeps its local knowledge).
struct WriteBehind {
    capacity: usize,
    retry: Duration,
    queue: Mutex<VecDeque<KeyDigest>>,
    /// A background task is draining the queue.
    running: AtomicBool,
    /// Pins written back so far.
    written: AtomicU64,
}

/// The outage breaker: after `threshold` consecutive outage failures, Redis is skipped for
/// `cooldown`; then one background `PING` probes it, and a success closes the breaker.
struct Breaker {
    threshold: u32,
    cooldown: Duration,
    failures: AtomicU32,
    open_until: Mutex<Option<Instant>>,
    probing: AtomicBool,
}

struct Local {
    conn: ConnectionManager,
    timeout: Duration,
    near: BoundedMap<Near>,
    freshness: Duration,
    refresh_below: f64,
    breaker: Breaker,
    behind: WriteBehind,
    errors: metrics::Counter,
    calls: AtomicU64,
}

impl WriteBehind {
    fn new(capacity: usize, retry: Duration) -> Self {
        WriteBehind {
            capacity,
            retry,
            queue: Mutex::new(VecDeque::new()),
            running: AtomicBool::new(false),
            written: AtomicU64::new(0),
        }
    }
}

impl Local {
    /// Whether a call may go to Redis now. When the cool-down is over, the first caller starts a
    /// background probe (or, outside a runtime, is let through as the probe).
    fn admit(self: &Arc<Self>) -> bool {
        let b = &self.breaker;
        let until = *b.open_until.lock();
        match until {
            None => true,
            Some(t) if Instant::now() < t => false,
            Some(_) => {
                if b.probing.swap(true, Ordering::AcqRel) {
                    return false;
                }
                match tokio::runtime::Handle::try_current() {
                    Ok(h) => {
                        let me = self.clone();
                        h.spawn(async move {
                            let mut conn = me.conn.clone();
                            me.calls.fetch_add(1, Ordering::Relaxed);
                            let r = crate::store::call_store(me.timeout, "pin_probe", async move {
                                redis::cmd("PING")
                                    .query_async::<String>(&mut conn)
                                    .await
                                    .map_err(map_err)
                            })
                            .await;
                            me.outcome(r.as_ref().err());
                        });
                        false
                    }
                    Err(_) => true,
                }
            }
        }
    }

    /// Records a call's outcome in the breaker.
    fn outcome(&self, err: Option<&StoreError>) {
        let b = &self.breaker;
        match err {
            Some(e) if e.is_outage() => {
                let n = b.failures.fetch_add(1, Ordering::AcqRel).saturating_add(1);
                let probing = b.probing.swap(false, Ordering::AcqRel);
                if n >= b.threshold || probing {
                    *b.open_until.lock() = Some(Instant::now() + b.cooldown);
                }
            }
            _ => {
                b.failures.store(0, Ordering::Release);
                b.probing.store(false, Ordering::Release);
                let mut g = b.open_until.lock();
                if g.is_some() {
                    *g = None;
                }
            }
        }
    }

    fn near(&self, key: &KeyDigest) -> Option<Near> {
        self.near.with(key, |n| n.clone())
    }

    fn remember(
        &self,
        key: KeyDigest,
        replica: ReplicaId,
        now: Instant,
        ttl: Duration,
        known: bool,
    ) {
        let local_expires = expiry(now, ttl);
        self.near.insert(
            key,
            Near {
                replica,
                checked: now,
                remote_expires: if known { local_expires } else { now },
                local_expires,
                unwritten: false,
                replaced: None,
                queued: false,
            },
            |n| n.local_expires <= now,
        );
    }
}

/// A [`PinTable`] in Redis: every gateway sharing the server sees the same session -> replica
/// pins, so a session stays on one replica across gateway instances even after a spill or a
/// failover moved it off its hash home.
///
/// * One key per session, `<prefix>:pin:{x<32 hex>}`: the [`KeyDigest`] of the session key,
///   never the key itself, so a key costs 16 bytes whatever the client sent. It holds the
///   replica id with a `PX` TTL so idle sessions leave nothing behind.
/// * A **near-cache** (bounded, [`near_cache`](Self::near_cache)) serves a pin read from Redis
///   less than the freshness ago (default 1 s) without a round trip, and remembers this
///   gateway's own placements.
/// * **Coalesced refreshes**: a session that stays where it is does not write each turn; its TTL
///   is refreshed only once less than [`refresh_below`](Self::refresh_below) of it remains.
/// * **Compare-and-set writes** ([`PinTable::pin_after_owned`], one Lua script): a first
///   placement sets only if no pin exists (the loser of a race adopts the winner's replica), a
///   refresh never overwrites a pin another gateway moved, and a move replaces only the pin it
///   saw. [`PinTable::pin`] still sets unconditionally.
/// * `unpin` deletes only if the pin still names the given replica (a Lua compare-and-delete),
///   so a gateway with an old view cannot erase a newer placement.
/// * An **outage breaker** ([`breaker`](Self::breaker)): after consecutive outage failures
///   (default 2), Redis is skipped for a cool-down (default 1 s), calls answer at once from the
///   near-cache, and a background `PING` probes it; a success closes the breaker.
/// * A **write-behind queue** ([`write_behind`](Self::write_behind)): a placement whose write
///   did not reach Redis is kept locally and written back in the background once Redis answers
///   again (a restarted, empty Redis gets this gateway's pins back without waiting for their
///   sessions' next turns).
/// * Every call is bounded by the store's timeout. On failure (or while the breaker is open)
///   the [`FailurePolicy`] applies: [`FailurePolicy::Open`] (default) answers from the
///   near-cache (or "no pin" / "done"), so routing falls back to local knowledge and placement
///   by hash, and counts `replica_router_affinity_pin_errors_total`;
///   [`FailurePolicy::Closed`] returns the [`PinError`] (the affinity layer counts it).
///
/// Register a `metrics` recorder before building the table (the counter handle is taken at
/// construction). Clones share the connection, the near-cache, the breaker and the write-behind
/// queue.
///
/// A pin naming a replica id that is no longer valid reads as "no pin".
#[derive(Clone)]
pub struct RedisPinTable {
    prefix: Arc<str>,
    policy: FailurePolicy,
    unpin: Arc<Script>,
    pin_after: Arc<Script>,
    local: Arc<Local>,
}

impl fmt::Debug for RedisPinTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisPinTable")
            .field("prefix", &self.prefix)
            .field("timeout", &self.local.timeout)
            .field("policy", &self.policy)
            .field("near_cache", &self.local.near.capacity())
            .field("freshness", &self.local.freshness)
            .finish_non_exhaustive()
    }
}

enum Mode {
    Place,
    Refresh,
    Move,
}

impl RedisPinTable {
    /// A pin table sharing `store`'s connection, key prefix and timeout, with the default
    /// near-cache, refresh fraction and breaker.
    pub fn new(store: &RedisStore) -> Self {
        RedisPinTable {
            prefix: store.config().get_prefix().into(),
            policy: FailurePolicy::Open,
            unpin: Arc::new(Script::new(UNPIN)),
            pin_after: Arc::new(Script::new(PIN_AFTER)),
            local: Arc::new(Local {
                conn: store.connection(),
                timeout: store.config().get_timeout(),
                near: BoundedMap::new(DEFAULT_NEAR_CACHE_PINS),
                freshness: DEFAULT_NEAR_CACHE_FRESHNESS,
                refresh_below: DEFAULT_REFRESH_BELOW,
                breaker: Breaker {
                    threshold: DEFAULT_BREAKER_THRESHOLD,
                    cooldown: DEFAULT_BREAKER_COOLDOWN,
                    failures: AtomicU32::new(0),
                    open_until: Mutex::new(None),
                    probing: AtomicBool::new(false),
                },
                behind: WriteBehind::new(DEFAULT_WRITE_BEHIND_PINS, DEFAULT_WRITE_BEHIND_RETRY),
                errors: metrics::counter!(PIN_ERRORS),
                calls: AtomicU64::new(0),
            }),
        }
    }

    fn local_mut(&mut self) -> &mut Local {
        // Settings are applied while building, before any clone exists; a clone made earlier
        // gets a fresh copy of the local state.
        if Arc::get_mut(&mut self.local).is_none() {
            let l = &self.local;
            self.local = Arc::new(Local {
                conn: l.conn.clone(),
                timeout: l.timeout,
                near: BoundedMap::new(l.near.capacity()),
                freshness: l.freshness,
                refresh_below: l.refresh_below,
                breaker: Breaker {
                    threshold: l.breaker.threshold,
                    cooldown: l.breaker.cooldown,
                    failures: AtomicU32::new(0),
                    open_until: Mutex::new(None),
                    probing: AtomicBool::new(false),
                },
                behind: WriteBehind::new(l.behind.capacity, l.behind.retry),
                errors: l.errors.clone(),
                calls: AtomicU64::new(0),
            });
        }
        Arc::get_mut(&mut self.local).expect("unique after the copy")
    }

    /// What to answer when Redis fails or times out.
    pub fn failure_policy(mut self, policy: FailurePolicy) -> Self {
        self.policy = policy;
        self
    }

    /// The near-cache: at most `capacity` pins (default 2^16; 0 turns it off) served locally for
    /// `freshness` after they were read from Redis (default 1 s; zero: always ask Redis while it
    /// is up). During an outage, the near-cache answers whatever its freshness.
    pub fn near_cache(mut self, capacity: usize, freshness: Duration) -> Self {
        let l = self.local_mut();
        l.near = BoundedMap::new(capacity);
        l.freshness = freshness;
        self
    }

    /// Refresh a staying session's pin in Redis only once less than `fraction` of its TTL
    /// remains (default 0.5; clamped to 0..=1, and 1 refreshes on every turn).
    pub fn refresh_below(mut self, fraction: f64) -> Self {
        let f = if fraction.is_nan() { 1.0 } else { fraction };
        self.local_mut().refresh_below = f.clamp(0.0, 1.0);
        self
    }

    /// The outage breaker: open after `threshold` consecutive outage failures (at least 1;
    /// default 2) for `cooldown` (default 1 s), then probe in the background.
    pub fn breaker(mut self, threshold: u32, cooldown: Duration) -> Self {
        let l = self.local_mut();
        l.breaker.threshold = threshold.max(1);
        l.breaker.cooldown = cooldown;
        self
    }

    /// The write-behind queue: a pin whose write did not reach Redis (a timeout, an outage, the
    /// open breaker) is written again in the background every `retry` (default 500 ms) until
    /// Redis takes it, so other gateways find it without waiting for the session's next turn
    /// through this one. At most `capacity` pins wait (default 4096; 0 turns the queue off);
    /// past it the oldest is dropped from the queue (this gateway still keeps and replays it on
    /// the session's next turn). A write-back is a compare-and-set, like the write it replaces:
    /// a first placement yields to a pin another gateway wrote meanwhile, and a move replaces
    /// only the pin it saw.
    pub fn write_behind(mut self, capacity: usize, retry: Duration) -> Self {
        self.local_mut().behind = WriteBehind::new(capacity, retry.max(Duration::from_millis(1)));
        self
    }

    /// Pins waiting in the write-behind queue now.
    pub fn write_behind_len(&self) -> usize {
        self.local.behind.queue.lock().len()
    }

    /// Pins the write-behind queue has written back to Redis so far.
    pub fn written_behind(&self) -> u64 {
        self.local.behind.written.load(Ordering::Relaxed)
    }

    /// Whether the breaker is open now (Redis is being skipped).
    pub fn breaker_open(&self) -> bool {
        self.local
            .breaker
            .open_until
            .lock()
            .is_some_and(|t| Instant::now() < t)
    }

    /// Calls sent to Redis so far by this table and its clones (probes included).
    pub fn redis_calls(&self) -> u64 {
        self.local.calls.load(Ordering::Relaxed)
    }

    /// Pins held by the near-cache now.
    pub fn near_cache_len(&self) -> usize {
        self.local.near.len()
    }

    /// The near-cache's size bound.
    pub fn near_cache_capacity(&self) -> usize {
        self.local.near.capacity()
    }

    /// The Redis key holding `session`'s pin.
    pub fn redis_key(&self, session: &RouteKey) -> Result<String, StoreError> {
        Ok(self.digest_key(&KeyDigest::of(session.as_bytes())))
    }

    fn digest_key(&self, d: &KeyDigest) -> String {
        let key = StoreKey::new(PIN_SCOPE, d.as_bytes()).expect("the pin scope is valid");
        format!("{}:{}", self.prefix, key.encoded())
    }

    fn fail<T>(&self, e: Option<StoreError>, open: T) -> Result<T, PinError> {
        match self.policy {
            FailurePolicy::Open => {
                self.local.errors.increment(1);
                Ok(open)
            }
            FailurePolicy::Closed => Err(match e {
                Some(StoreError::Timeout { .. }) => PinError::Timeout,
                Some(other) => PinError::Store(other.to_string()),
                None => PinError::Store("pin store: backing off after an outage".into()),
            }),
        }
    }

    /// What the near-cache says while Redis cannot be asked: the last known pin, if its local TTL
    /// has not run out.
    fn fallback(&self, d: &KeyDigest) -> Option<ReplicaId> {
        let now = Instant::now();
        self.local
            .near(d)
            .filter(|n| n.local_expires > now)
            .map(|n| n.replica)
    }

    async fn lookup(&self, d: KeyDigest) -> Result<Option<ReplicaId>, PinError> {
        let now = Instant::now();
        if let Some(n) = self.local.near(&d) {
            if now.saturating_duration_since(n.checked) < self.local.freshness
                && n.local_expires > now
            {
                return Ok(Some(n.replica));
            }
        }
        if !self.local.admit() {
            return self.fail(None, self.fallback(&d));
        }
        let key = self.digest_key(&d);
        let mut conn = self.local.conn.clone();
        self.local.calls.fetch_add(1, Ordering::Relaxed);
        let got = crate::store::call_store(self.local.timeout, "pin_get", async move {
            redis::pipe()
                .cmd("GET")
                .arg(&key)
                .cmd("PTTL")
                .arg(&key)
                .query_async::<(Option<Vec<u8>>, i64)>(&mut conn)
                .await
                .map_err(map_err)
        })
        .await;
        self.local.outcome(got.as_ref().err());
        match got {
            Ok((v, pttl)) => {
                let found = v
                    .and_then(|b| String::from_utf8(b).ok())
                    .and_then(|s| ReplicaId::new(s).ok());
                let now = Instant::now();
                match &found {
                    Some(r) => {
                        // Redis still holds the pin this gateway's own move replaced, and the
                        // move never reached Redis: the move was lost (a timeout, an outage),
                        // not overruled. Keep it; the next write replays it as a move.
                        let lost_move = self
                            .local
                            .near(&d)
                            .filter(|n| {
                                n.unwritten
                                    && n.local_expires > now
                                    && n.replica != *r
                                    && n.replaced.as_ref() == Some(r)
                            })
                            .map(|n| n.replica);
                        if let Some(mine) = lost_move {
                            self.local.near.with(&d, |n| {
                                n.remote_expires = now;
                                n.checked = now;
                            });
                            return Ok(Some(mine));
                        }
                        let ttl = Duration::from_millis(pttl.max(0) as u64);
                        self.local.remember(d, r.clone(), now, ttl, pttl > 0);
                    }
                    None => {
                        // Redis holds no pin, but this gateway's own write of it never reached
                        // Redis and its local TTL has not run out: the write was lost, not
                        // removed by another gateway. Keep the placement; the caller's next
                        // write puts it back. (A confirmed pin that is gone was unpinned or
                        // expired elsewhere, and that is respected.)
                        let lost = self
                            .local
                            .near(&d)
                            .filter(|n| n.unwritten && n.local_expires > now)
                            .map(|n| n.replica);
                        if let Some(r) = lost {
                            self.local.near.with(&d, |n| n.remote_expires = now);
                            return Ok(Some(r));
                        }
                        self.local.near.remove_if(&d, |_| true);
                    }
                }
                Ok(found)
            }
            Err(e) => self.fail(Some(e), self.fallback(&d)),
        }
    }

    async fn write(
        &self,
        d: KeyDigest,
        replica: ReplicaId,
        ttl: Duration,
        mode: Option<(Mode, Option<ReplicaId>)>,
    ) -> Result<(), PinError> {
        let now = Instant::now();
        let replaced = match &mode {
            Some((Mode::Move, seen)) => seen.clone(),
            _ => None,
        };
        if !self.local.admit() {
            self.remember_unwritten(d, replica, replaced, now, ttl);
            return self.fail(None, ());
        }
        let key = self.digest_key(&d);
        let ttl_ms = ttl.as_millis().clamp(1, MAX_WINDOW.as_millis()) as u64;
        let mut conn = self.local.conn.clone();
        self.local.calls.fetch_add(1, Ordering::Relaxed);
        let done = match mode {
            None => {
                let value = replica.as_str().to_owned();
                crate::store::call_store(self.local.timeout, "pin_set", async move {
                    redis::cmd("SET")
                        .arg(key)
                        .arg(value)
                        .arg("PX")
                        .arg(ttl_ms)
                        .query_async::<()>(&mut conn)
                        .await
                        .map_err(map_err)
                })
                .await
                .map(|()| None)
            }
            Some((mode, seen)) => {
                let mut inv = self.pin_after.prepare_invoke();
                inv.key(key)
                    .arg(replica.as_str())
                    .arg(ttl_ms)
                    .arg(match mode {
                        Mode::Place => "place",
                        Mode::Refresh => "refresh",
                        Mode::Move => "move",
                    })
                    .arg(seen.as_ref().map_or("", |s| s.as_str()));
                crate::store::call_store(self.local.timeout, "pin_set", async move {
                    inv.invoke_async::<Option<String>>(&mut conn)
                        .await
                        .map_err(map_err)
                })
                .await
                .map(|v| v.and_then(|s| ReplicaId::new(s).ok()))
            }
        };
        self.local.outcome(done.as_ref().err());
        let now = Instant::now();
        match done {
            Ok(winner) => {
                match winner {
                    Some(w) if w != replica => self.local.remember(d, w, now, ttl, false),
                    _ => self.local.remember(d, replica, now, ttl, true),
                }
                Ok(())
            }
            Err(e) => {
                self.remember_unwritten(d, replica, replaced, now, ttl);
                self.fail(Some(e), ())
            }
        }
    }

    /// Remembers a placement whose write did not reach Redis.
    fn remember_unwritten(
        &self,
        d: KeyDigest,
        replica: ReplicaId,
        replaced: Option<ReplicaId>,
        now: Instant,
        ttl: Duration,
    ) {
        // A failed write over an earlier unwritten move still replaces what that move did.
        let replaced = replaced.or_else(|| {
            self.local
                .near(&d)
                .filter(|n| n.unwritten)
                .and_then(|n| n.replaced)
        });
        let was_queued = self.local.near(&d).is_some_and(|n| n.unwritten && n.queued);
        self.local.remember(d, replica, now, ttl, false);
        let behind = &self.local.behind;
        let queue = behind.capacity > 0 && !was_queued;
        self.local.near.with(&d, |n| {
            n.unwritten = true;
            n.replaced = replaced;
            n.queued = was_queued || queue;
        });
        if queue {
            let dropped = {
                let mut q = behind.queue.lock();
                q.push_back(d);
                if q.len() > behind.capacity {
                    q.pop_front()
                } else {
                    None
                }
            };
            if let Some(old) = dropped {
                self.local.near.with(&old, |n| n.queued = false);
            }
            self.start_write_behind();
        }
    }

    /// Starts the background task draining the write-behind queue, unless one runs (or no
    /// runtime is there to run it: the pins then wait for their sessions' next turn).
    fn start_write_behind(&self) {
        let behind = &self.local.behind;
        if behind.running.swap(true, Ordering::AcqRel) {
            return;
        }
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            behind.running.store(false, Ordering::Release);
            return;
        };
        let table = self.clone();
        handle.spawn(async move { table.drain_write_behind().await });
    }

    async fn drain_write_behind(self) {
        let behind = &self.local.behind;
        loop {
            tokio::time::sleep(behind.retry).await;
            // While the breaker is open, wait (without counting an error per pin); the first
            // pass after the cool-down starts the probe.
            if !self.local.admit() {
                continue;
            }
            let batch: Vec<KeyDigest> = {
                let mut q = behind.queue.lock();
                let n = q.len().min(WRITE_BEHIND_BATCH);
                q.drain(..n).collect()
            };
            if batch.is_empty() {
                behind.running.store(false, Ordering::Release);
                // A pin queued between the last look and the flag: take it on.
                if behind.queue.lock().is_empty() || behind.running.swap(true, Ordering::AcqRel) {
                    return;
                }
                continue;
            }
            let mut rest = batch.into_iter();
            for d in rest.by_ref() {
                self.write_back(d).await;
                if self.breaker_open() {
                    break;
                }
            }
            // Redis went away again mid-pass: the rest go back to the front, in order.
            let rest: Vec<KeyDigest> = rest.collect();
            if !rest.is_empty() {
                let mut q = behind.queue.lock();
                for d in rest.into_iter().rev() {
                    q.push_front(d);
                }
            }
        }
    }

    /// Writes one queued pin back, if this gateway still holds it unwritten and alive.
    async fn write_back(&self, d: KeyDigest) {
        let now = Instant::now();
        let Some(n) = self.local.near(&d).filter(|n| n.unwritten && n.queued) else {
            return;
        };
        self.local.near.with(&d, |n| n.queued = false);
        if n.local_expires <= now {
            return;
        }
        let ttl = n.local_expires.saturating_duration_since(now);
        let mode = match n.replaced {
            Some(seen) => (Mode::Move, Some(seen)),
            None => (Mode::Place, None),
        };
        // A failure queues it again (`remember_unwritten`).
        if self.write(d, n.replica, ttl, Some(mode)).await.is_ok()
            && self.local.near(&d).is_some_and(|n| !n.unwritten)
        {
            self.local.behind.written.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The pin an unwritten move of `d` to `replica` was to replace, if there is one.
    fn unwritten_move(&self, d: &KeyDigest, replica: &ReplicaId) -> Option<ReplicaId> {
        self.local
            .near(d)
            .filter(|n| n.unwritten && n.replica == *replica)
            .and_then(|n| n.replaced)
    }

    async fn remove(&self, d: KeyDigest, replica: ReplicaId) -> Result<(), PinError> {
        self.local.near.remove_if(&d, |n| n.replica == replica);
        if !self.local.admit() {
            return self.fail(None, ());
        }
        let mut conn = self.local.conn.clone();
        let mut inv = self.unpin.prepare_invoke();
        inv.key(self.digest_key(&d)).arg(replica.as_str());
        self.local.calls.fetch_add(1, Ordering::Relaxed);
        let done = crate::store::call_store(self.local.timeout, "pin_unpin", async move {
            inv.invoke_async::<i64>(&mut conn)
                .await
                .map(|_| ())
                .map_err(map_err)
        })
        .await;
        self.local.outcome(done.as_ref().err());
        done.or_else(|e| self.fail(Some(e), ()))
    }

    /// Whether a staying session's refresh can be skipped: the near-cache knows the pin names
    /// `replica` in Redis with more than the refresh fraction of `ttl` left.
    fn refresh_not_due(&self, d: &KeyDigest, replica: &ReplicaId, ttl: Duration) -> bool {
        let now = Instant::now();
        self.local.near(d).is_some_and(|n| {
            n.replica == *replica
                && n.remote_expires.saturating_duration_since(now)
                    > ttl.mul_f64(self.local.refresh_below)
        })
    }
}

impl PinTable for RedisPinTable {
    fn get<'a>(&'a self, session: &'a RouteKey) -> PinFuture<'a, Option<ReplicaId>> {
        PinFuture::Pending(Box::pin(self.lookup(KeyDigest::of(session.as_bytes()))))
    }

    fn pin<'a>(
        &'a self,
        session: &'a RouteKey,
        replica: &'a ReplicaId,
        ttl: Duration,
    ) -> PinFuture<'a, ()> {
        PinFuture::Pending(Box::pin(self.write(
            KeyDigest::of(session.as_bytes()),
            replica.clone(),
            ttl,
            None,
        )))
    }

    fn unpin<'a>(&'a self, session: &'a RouteKey, replica: &'a ReplicaId) -> PinFuture<'a, ()> {
        PinFuture::Pending(Box::pin(
            self.remove(KeyDigest::of(session.as_bytes()), replica.clone()),
        ))
    }

    fn get_owned(self: Arc<Self>, session: RouteKey) -> PinFuture<'static, Option<ReplicaId>> {
        let d = KeyDigest::of(session.as_bytes());
        let now = Instant::now();
        if let Some(n) = self.local.near(&d) {
            if now.saturating_duration_since(n.checked) < self.local.freshness
                && n.local_expires > now
            {
                return PinFuture::ready(Ok(Some(n.replica)));
            }
        }
        PinFuture::Pending(Box::pin(async move { self.lookup(d).await }))
    }

    fn pin_after_owned(
        self: Arc<Self>,
        session: RouteKey,
        seen: Option<ReplicaId>,
        replica: ReplicaId,
        ttl: Duration,
    ) -> PinFuture<'static, ()> {
        let d = KeyDigest::of(session.as_bytes());
        let (mode, seen) = match &seen {
            None => (Mode::Place, seen),
            Some(s) if *s == replica => match self.unwritten_move(&d, &replica) {
                // Staying where a lost move put the session: replay the move over the pin it
                // was to replace (a refresh would find that pin and give up).
                Some(replaced) => (Mode::Move, Some(replaced)),
                None => {
                    if self.refresh_not_due(&d, &replica, ttl) {
                        return PinFuture::ready(Ok(()));
                    }
                    (Mode::Refresh, seen)
                }
            },
            Some(_) => (Mode::Move, seen),
        };
        PinFuture::Pending(Box::pin(async move {
            self.write(d, replica, ttl, Some((mode, seen))).await
        }))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn error_counter_name_matches_the_affinity_layer() {
        assert_eq!(super::PIN_ERRORS, crate::affinity::PIN_ERRORS_COUNTER);
    }
}
