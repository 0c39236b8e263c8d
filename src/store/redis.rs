//! The Redis-backed counter store (cargo feature `redis`).

use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{RedisError, Script};

use super::{
    check_units, validate_ident, window_ms, Acquire, CounterStore, LeaseId, RateQuota,
    SettleTarget, Settled, StoreError, StoreFuture, StoreKey, Take, Usage, WindowId,
};

/// Every script starts by reading store time (milliseconds since the Unix epoch) from the Redis
/// server, and formats integers without exponent notation.
const PRELUDE: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local function fmt(x) return string.format('%.0f', x) end
";

/// KEYS[1]: window hash {s = window start, n = used}. ARGV: window ms, limit, cost.
/// Returns {admitted, used, window start, ms until window end}.
const TAKE: &str = r"
local w = tonumber(ARGV[1])
local limit = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local start = now - (now % w)
local v = redis.call('HMGET', KEYS[1], 's', 'n')
local used = 0
if v[1] and tonumber(v[1]) == start then used = tonumber(v[2]) or 0 end
local reset = start + w - now
if used + cost <= limit then
  used = used + cost
  redis.call('HSET', KEYS[1], 's', fmt(start), 'n', fmt(used))
  redis.call('PEXPIRE', KEYS[1], fmt(reset))
  return {1, used, start, reset}
end
return {0, used, start, reset}
";

/// KEYS[1]: window hash. ARGV: window ms, reservation window start, signed delta.
/// Returns {target (0 same, 1 carried forward, 2 dropped), used, current window start}.
const SETTLE: &str = r"
local w = tonumber(ARGV[1])
local rs = tonumber(ARGV[2])
local delta = tonumber(ARGV[3])
local start = now - (now % w)
local v = redis.call('HMGET', KEYS[1], 's', 'n')
local used = 0
if v[1] and tonumber(v[1]) == start then used = tonumber(v[2]) or 0 end
local target = 0
if rs == start then
  used = math.max(0, used + delta)
elseif delta > 0 then
  target = 1
  used = used + delta
else
  return {2, used, start}
end
redis.call('HSET', KEYS[1], 's', fmt(start), 'n', fmt(used))
redis.call('PEXPIRE', KEYS[1], fmt(start + w - now))
return {target, used, start}
";

/// KEYS[1]: window hash. ARGV: window ms. Returns {used, window start, ms until window end}.
const USAGE: &str = r"
local w = tonumber(ARGV[1])
local start = now - (now % w)
local v = redis.call('HMGET', KEYS[1], 's', 'n')
local used = 0
if v[1] and tonumber(v[1]) == start then used = tonumber(v[2]) or 0 end
return {used, start, start + w - now}
";

/// KEYS[1]: lease zset {member = lease id, score = expiry ms}. ARGV: limit, ttl ms, lease id.
/// Returns {admitted, in use}.
const ACQUIRE: &str = r"
local limit = tonumber(ARGV[1])
local ttl = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', fmt(now))
local n = redis.call('ZCARD', KEYS[1])
if n < limit then
  redis.call('ZADD', KEYS[1], fmt(now + ttl), ARGV[3])
  local last = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
  redis.call('PEXPIREAT', KEYS[1], fmt(tonumber(last[2])))
  return {1, n + 1}
end
return {0, n}
";

/// KEYS[1]: lease zset. ARGV: lease id. Returns 1 if the lease was held and unexpired.
const RELEASE: &str = r"
local s = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not s then return 0 end
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', fmt(now))
if tonumber(s) > now then return 1 end
return 0
";

/// KEYS[1]: lease zset. ARGV: lease id, ttl ms. Returns 1 if renewed.
const RENEW: &str = r"
local s = redis.call('ZSCORE', KEYS[1], ARGV[1])
if (not s) or tonumber(s) <= now then return 0 end
redis.call('ZADD', KEYS[1], 'XX', fmt(now + tonumber(ARGV[2])), ARGV[1])
local last = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
redis.call('PEXPIREAT', KEYS[1], fmt(tonumber(last[2])))
return 1
";

/// KEYS[1]: lease zset. Returns the number of unexpired leases.
const IN_USE: &str = r"
return redis.call('ZCOUNT', KEYS[1], '(' .. fmt(now), '+inf')
";

struct Scripts {
    take: Script,
    settle: Script,
    usage: Script,
    acquire: Script,
    release: Script,
    renew: Script,
    in_use: Script,
}

impl Scripts {
    fn new() -> Self {
        let s = |body: &str| Script::new(&format!("{PRELUDE}{body}"));
        Scripts {
            take: s(TAKE),
            settle: s(SETTLE),
            usage: s(USAGE),
            acquire: s(ACQUIRE),
            release: s(RELEASE),
            renew: s(RENEW),
            in_use: s(IN_USE),
        }
    }
}

/// Settings of a [`RedisStore`].
#[derive(Debug, Clone)]
pub struct RedisStoreConfig {
    prefix: String,
    timeout: Duration,
    connect_timeout: Duration,
    reconnect_retries: usize,
    reconnect_max_delay: Duration,
}

impl Default for RedisStoreConfig {
    fn default() -> Self {
        RedisStoreConfig {
            prefix: "rr".to_owned(),
            timeout: Duration::from_millis(250),
            connect_timeout: Duration::from_secs(2),
            reconnect_retries: 2,
            reconnect_max_delay: Duration::from_millis(200),
        }
    }
}

impl RedisStoreConfig {
    /// Key prefix (default `rr`): every key is `<prefix>:<scope>:{<subject>}`. Must match
    /// `[A-Za-z0-9_.-]{1,64}`; give each deployment sharing a Redis its own prefix.
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// Bound on every call, round trip included (default 250 ms). A call that does not complete
    /// in time fails with [`StoreError::Timeout`].
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Bound on the initial connection in [`RedisStore::connect_with`] (default 2 s).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Reconnection attempts per outage before calls fail fast again (default 2). Whatever the
    /// count, the next call after a failed reconnection starts a new one, so the store recovers
    /// when Redis comes back.
    pub fn reconnect_retries(mut self, retries: usize) -> Self {
        self.reconnect_retries = retries;
        self
    }

    /// Longest pause between reconnection attempts (default 200 ms).
    pub fn reconnect_max_delay(mut self, delay: Duration) -> Self {
        self.reconnect_max_delay = delay;
        self
    }

    /// The configured key prefix.
    pub fn get_prefix(&self) -> &str {
        &self.prefix
    }

    /// The configured per-call timeout.
    pub fn get_timeout(&self) -> Duration {
        self.timeout
    }
}

/// A [`CounterStore`] in Redis, shared by every gateway that points at the same server.
///
/// * One round trip per call: each operation is a Lua script run with `EVALSHA` (the script is
///   loaded again automatically if the server answers `NOSCRIPT`, for example after a restart).
/// * Store time is the Redis server's `TIME`, read inside the script.
/// * Keys are `<prefix>:<scope>:{<encoded subject>}` (see [`StoreKey`]): any subject bytes are
///   safe, distinct subjects never share a key, and a subject's keys share one Redis Cluster slot.
///   Each script touches exactly one key, declared in `KEYS`.
/// * Rate keys expire (`PEXPIRE`) when their window ends and lease keys when their last lease
///   does, so idle tenants leave nothing behind.
/// * Every call is bounded by [`RedisStoreConfig::timeout`]. The connection is a redis-rs
///   [`ConnectionManager`] (multiplexed, reconnects in the background), so after an outage the
///   same store recovers without being rebuilt.
///
/// Clones share one connection.
#[derive(Clone)]
pub struct RedisStore {
    conn: ConnectionManager,
    scripts: Arc<Scripts>,
    config: Arc<RedisStoreConfig>,
    lease_prefix: u64,
    next_lease: Arc<AtomicU64>,
}

impl fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisStore")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl RedisStore {
    /// Connects to `url` (for example `redis://127.0.0.1:6379/`) with the default settings.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        Self::connect_with(url, RedisStoreConfig::default()).await
    }

    /// Connects to `url` with `config`. Fails within the connect timeout if the server cannot
    /// be reached.
    pub async fn connect_with(url: &str, config: RedisStoreConfig) -> Result<Self, StoreError> {
        validate_ident(&config.prefix)?;
        if config.timeout.is_zero() || config.connect_timeout.is_zero() {
            return Err(StoreError::InvalidQuota("store timeouts must be positive"));
        }
        let client = redis::Client::open(url).map_err(map_err)?;
        let max_delay = config.reconnect_max_delay.max(Duration::from_millis(1));
        let manager_config = ConnectionManagerConfig::new()
            .set_number_of_retries(config.reconnect_retries)
            .set_min_delay(Duration::from_millis(10).min(max_delay))
            .set_exponent_base(2.0)
            .set_max_delay(max_delay)
            .set_connection_timeout(Some(config.timeout.min(config.connect_timeout)))
            .set_response_timeout(Some(config.timeout));
        let conn = match tokio::time::timeout(
            config.connect_timeout,
            ConnectionManager::new_with_config(client, manager_config),
        )
        .await
        {
            Err(_) => {
                return Err(StoreError::Timeout {
                    op: "connect",
                    after: config.connect_timeout,
                })
            }
            Ok(r) => r.map_err(map_err)?,
        };
        Ok(RedisStore {
            conn,
            scripts: Arc::new(Scripts::new()),
            config: Arc::new(config),
            lease_prefix: rand::random::<u64>(),
            next_lease: Arc::new(AtomicU64::new(1)),
        })
    }

    /// The settings this store was built with.
    pub fn config(&self) -> &RedisStoreConfig {
        &self.config
    }

    /// The full Redis key for `key`: `<prefix>:<encoded key>`.
    pub fn redis_key(&self, key: &StoreKey) -> String {
        let mut s = String::with_capacity(self.config.prefix.len() + 1 + key.encoded().len());
        s.push_str(&self.config.prefix);
        s.push(':');
        s.push_str(key.encoded());
        s
    }

    /// Sends `PING`, bounded by the timeout.
    pub async fn ping(&self) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        self.bounded("ping", async move {
            redis::cmd("PING").query_async::<String>(&mut conn).await
        })
        .await
        .map(|_| ())
    }

    /// The SHA-1 of each operation's Lua script, as `(operation, sha)`: what `EVALSHA` sends.
    /// Useful to preload the scripts (`SCRIPT LOAD`) or to benchmark them with `redis-benchmark`.
    pub fn script_hashes(&self) -> [(&'static str, &str); 7] {
        let s = &self.scripts;
        [
            ("take", s.take.get_hash()),
            ("settle", s.settle.get_hash()),
            ("usage", s.usage.get_hash()),
            ("acquire", s.acquire.get_hash()),
            ("release", s.release.get_hash()),
            ("renew", s.renew.get_hash()),
            ("in_use", s.in_use.get_hash()),
        ]
    }

    /// A clone of the underlying connection manager (for other Redis-backed components that
    /// should share this store's connection).
    pub fn connection(&self) -> ConnectionManager {
        self.conn.clone()
    }

    async fn bounded<T>(
        &self,
        op: &'static str,
        fut: impl Future<Output = Result<T, RedisError>>,
    ) -> Result<T, StoreError> {
        match tokio::time::timeout(self.config.timeout, fut).await {
            Err(_) => Err(StoreError::Timeout {
                op,
                after: self.config.timeout,
            }),
            Ok(r) => r.map_err(map_err),
        }
    }

    async fn eval<T: redis::FromRedisValue>(
        &self,
        op: &'static str,
        script: &Script,
        key: &StoreKey,
        args: &[String],
    ) -> Result<T, StoreError> {
        let mut inv = script.prepare_invoke();
        inv.key(self.redis_key(key));
        for a in args {
            inv.arg(a.as_str());
        }
        let mut conn = self.conn.clone();
        self.bounded(op, async move { inv.invoke_async::<T>(&mut conn).await })
            .await
    }

    fn lease_member(lease: LeaseId) -> String {
        format!("{:032x}", lease.0)
    }
}

/// Maps a redis-rs error to the store's typed error.
pub(crate) fn map_err(e: RedisError) -> StoreError {
    let wrong_type = e.code() == Some("WRONGTYPE") || e.to_string().contains("WRONGTYPE");
    if wrong_type {
        StoreError::WrongKind
    } else if e.is_io_error()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.is_timeout()
    {
        StoreError::Unavailable {
            source: Box::new(e),
        }
    } else {
        StoreError::Backend {
            source: Box::new(e),
        }
    }
}

fn to_u64(v: i64, what: &str) -> Result<u64, StoreError> {
    u64::try_from(v).map_err(|_| StoreError::Protocol(format!("negative {what}: {v}")))
}

impl CounterStore for RedisStore {
    fn take<'a>(&'a self, key: &'a StoreKey, quota: RateQuota, cost: u64) -> StoreFuture<'a, Take> {
        Box::pin(async move {
            check_units(cost)?;
            let args = [
                quota.window_ms().to_string(),
                quota.limit().to_string(),
                cost.to_string(),
            ];
            let (admitted, used, start, reset): (i64, i64, i64, i64) =
                self.eval("take", &self.scripts.take, key, &args).await?;
            let used = to_u64(used, "used")?;
            let reset_after = Duration::from_millis(to_u64(reset, "reset")?);
            let admitted = admitted == 1;
            Ok(Take {
                admitted,
                used,
                remaining: quota.limit().saturating_sub(used),
                retry_after: if admitted {
                    Duration::ZERO
                } else {
                    reset_after
                },
                window: WindowId(to_u64(start, "window")?),
                reset_after,
            })
        })
    }

    fn settle<'a>(
        &'a self,
        key: &'a StoreKey,
        quota: RateQuota,
        window: WindowId,
        delta: i64,
    ) -> StoreFuture<'a, Settled> {
        Box::pin(async move {
            check_units(delta.unsigned_abs())?;
            let args = [
                quota.window_ms().to_string(),
                window.0.to_string(),
                delta.to_string(),
            ];
            let (target, used, start): (i64, i64, i64) = self
                .eval("settle", &self.scripts.settle, key, &args)
                .await?;
            let target = match target {
                0 => SettleTarget::SameWindow,
                1 => SettleTarget::CarriedForward,
                2 => SettleTarget::Dropped,
                other => return Err(StoreError::Protocol(format!("settle target {other}"))),
            };
            Ok(Settled {
                target,
                used: to_u64(used, "used")?,
                window: WindowId(to_u64(start, "window")?),
            })
        })
    }

    fn usage<'a>(&'a self, key: &'a StoreKey, quota: RateQuota) -> StoreFuture<'a, Usage> {
        Box::pin(async move {
            let args = [quota.window_ms().to_string()];
            let (used, start, reset): (i64, i64, i64) =
                self.eval("usage", &self.scripts.usage, key, &args).await?;
            Ok(Usage {
                window: WindowId(to_u64(start, "window")?),
                used: to_u64(used, "used")?,
                reset_after: Duration::from_millis(to_u64(reset, "reset")?),
            })
        })
    }

    fn acquire<'a>(
        &'a self,
        key: &'a StoreKey,
        limit: u64,
        ttl: Duration,
    ) -> StoreFuture<'a, Acquire> {
        Box::pin(async move {
            check_units(limit)?;
            let ttl = window_ms(ttl)?;
            let n = self.next_lease.fetch_add(1, Ordering::Relaxed);
            let lease = LeaseId((u128::from(self.lease_prefix) << 64) | u128::from(n));
            let args = [
                limit.to_string(),
                ttl.to_string(),
                Self::lease_member(lease),
            ];
            let (admitted, in_use): (i64, i64) = self
                .eval("acquire", &self.scripts.acquire, key, &args)
                .await?;
            Ok(Acquire {
                lease: (admitted == 1).then_some(lease),
                in_use: to_u64(in_use, "in_use")?,
            })
        })
    }

    fn release<'a>(&'a self, key: &'a StoreKey, lease: LeaseId) -> StoreFuture<'a, bool> {
        Box::pin(async move {
            let args = [Self::lease_member(lease)];
            let held: i64 = self
                .eval("release", &self.scripts.release, key, &args)
                .await?;
            Ok(held == 1)
        })
    }

    fn renew<'a>(
        &'a self,
        key: &'a StoreKey,
        lease: LeaseId,
        ttl: Duration,
    ) -> StoreFuture<'a, bool> {
        Box::pin(async move {
            let ttl = window_ms(ttl)?;
            let args = [Self::lease_member(lease), ttl.to_string()];
            let renewed: i64 = self.eval("renew", &self.scripts.renew, key, &args).await?;
            Ok(renewed == 1)
        })
    }

    fn in_use<'a>(&'a self, key: &'a StoreKey) -> StoreFuture<'a, u64> {
        Box::pin(async move {
            let n: i64 = self.eval("in_use", &self.scripts.in_use, key, &[]).await?;
            to_u64(n, "in_use")
        })
    }
}
