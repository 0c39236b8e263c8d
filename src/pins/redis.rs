//! Session pins shared through Redis (cargo feature `redis`).

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use redis::aio::ConnectionManager;
use redis::Script;

use super::{PinError, PinFuture, PinTable};
use crate::context::RouteKey;
use crate::replica::ReplicaId;
use crate::store::redis::map_err;
use crate::store::FailurePolicy;
use crate::store::{RedisStore, StoreError, StoreKey, MAX_WINDOW};

/// Scope of pin keys: `<prefix>:pin:{<encoded session>}`.
pub const PIN_SCOPE: &str = "pin";

const UNPIN: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
";

/// A [`PinTable`] in Redis: every gateway sharing the server sees the same session -> replica
/// pins, so a session stays on one replica across gateway instances even after a spill or a
/// failover moved it off its hash home.
///
/// * One key per session, `<prefix>:pin:{<encoded session>}` (the [`StoreKey`] encoding: any
///   session bytes are safe and distinct sessions never share a key), holding the replica id,
///   written with `SET .. PX ttl` so idle sessions leave nothing behind.
/// * `unpin` deletes only if the pin still names the given replica (a Lua compare-and-delete),
///   so a gateway with an old view cannot erase a newer placement.
/// * Every call is bounded by the store's timeout. On failure the [`FailurePolicy`] applies:
///   [`FailurePolicy::Open`] (default) answers "no pin" / "done" so routing falls back to
///   placement by hash, which every gateway computes the same way; [`FailurePolicy::Closed`]
///   returns the [`PinError`].
///
/// A pin naming a replica id that is no longer valid reads as "no pin".
#[derive(Clone)]
pub struct RedisPinTable {
    conn: ConnectionManager,
    prefix: Arc<str>,
    timeout: Duration,
    policy: FailurePolicy,
    unpin: Arc<Script>,
}

impl fmt::Debug for RedisPinTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisPinTable")
            .field("prefix", &self.prefix)
            .field("timeout", &self.timeout)
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

impl RedisPinTable {
    /// A pin table sharing `store`'s connection, key prefix and timeout.
    pub fn new(store: &RedisStore) -> Self {
        RedisPinTable {
            conn: store.connection(),
            prefix: store.config().get_prefix().into(),
            timeout: store.config().get_timeout(),
            policy: FailurePolicy::Open,
            unpin: Arc::new(Script::new(UNPIN)),
        }
    }

    /// What to answer when Redis fails or times out.
    pub fn failure_policy(mut self, policy: FailurePolicy) -> Self {
        self.policy = policy;
        self
    }

    /// The Redis key holding `session`'s pin.
    pub fn redis_key(&self, session: &RouteKey) -> Result<String, StoreError> {
        let key = StoreKey::new(PIN_SCOPE, session.as_bytes())?;
        Ok(format!("{}:{}", self.prefix, key.encoded()))
    }

    fn fail<T>(&self, e: StoreError, open: T) -> Result<T, PinError> {
        match self.policy {
            FailurePolicy::Open => Ok(open),
            FailurePolicy::Closed => Err(match e {
                StoreError::Timeout { .. } => PinError::Timeout,
                other => PinError::Store(other.to_string()),
            }),
        }
    }
}

impl PinTable for RedisPinTable {
    fn get<'a>(&'a self, session: &'a RouteKey) -> PinFuture<'a, Option<ReplicaId>> {
        PinFuture::Pending(Box::pin(async move {
            let key = match self.redis_key(session) {
                Ok(k) => k,
                Err(e) => return self.fail(e, None),
            };
            let mut conn = self.conn.clone();
            let got = crate::store::call_store(self.timeout, "pin_get", async move {
                redis::cmd("GET")
                    .arg(key)
                    .query_async::<Option<Vec<u8>>>(&mut conn)
                    .await
                    .map_err(map_err)
            })
            .await;
            match got {
                Ok(v) => Ok(v
                    .and_then(|b| String::from_utf8(b).ok())
                    .and_then(|s| ReplicaId::new(s).ok())),
                Err(e) => self.fail(e, None),
            }
        }))
    }

    fn pin<'a>(
        &'a self,
        session: &'a RouteKey,
        replica: &'a ReplicaId,
        ttl: Duration,
    ) -> PinFuture<'a, ()> {
        PinFuture::Pending(Box::pin(async move {
            let key = match self.redis_key(session) {
                Ok(k) => k,
                Err(e) => return self.fail(e, ()),
            };
            let ttl_ms = ttl.as_millis().clamp(1, MAX_WINDOW.as_millis()) as u64;
            let mut conn = self.conn.clone();
            let value = replica.as_str().to_owned();
            let done = crate::store::call_store(self.timeout, "pin_set", async move {
                redis::cmd("SET")
                    .arg(key)
                    .arg(value)
                    .arg("PX")
                    .arg(ttl_ms)
                    .query_async::<()>(&mut conn)
                    .await
                    .map_err(map_err)
            })
            .await;
            done.or_else(|e| self.fail(e, ()))
        }))
    }

    fn unpin<'a>(&'a self, session: &'a RouteKey, replica: &'a ReplicaId) -> PinFuture<'a, ()> {
        PinFuture::Pending(Box::pin(async move {
            let key = match self.redis_key(session) {
                Ok(k) => k,
                Err(e) => return self.fail(e, ()),
            };
            let mut conn = self.conn.clone();
            let mut inv = self.unpin.prepare_invoke();
            inv.key(key).arg(replica.as_str());
            let done = crate::store::call_store(self.timeout, "pin_unpin", async move {
                inv.invoke_async::<i64>(&mut conn)
                    .await
                    .map(|_| ())
                    .map_err(map_err)
            })
            .await;
            done.or_else(|e| self.fail(e, ()))
        }))
    }
}
