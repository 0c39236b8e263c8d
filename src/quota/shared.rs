//! State shared by every clone of a quota service: the store, the config, the over-limit cache,
//! the outage breaker; and the per-request ticket that settles and releases at completion.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::time::Instant;

use super::config::{MissingTenant, QuotaConfig, TenantLimits, TokenReport};
use crate::context::RouteKey;
use crate::error::RouteError;
use crate::inflight::{Completion, CompletionObserver};
use crate::store::{
    call_store, Acquire, BoundedMap, CounterStore, FailurePolicy, KeyDigest, LeaseId, RateQuota,
    StoreError, StoreKey, Take, WindowId,
};

pub(crate) const SCOPE_REQUESTS: &str = "quota.req";
pub(crate) const SCOPE_TOKENS: &str = "quota.tok";
pub(crate) const SCOPE_CONCURRENCY: &str = "quota.conc";

pub(crate) struct Shared {
    pub(crate) store: Arc<dyn CounterStore>,
    pub(crate) config: QuotaConfig,
    /// Tenants known to be over limit until the given instant, by the digest of the tenant
    /// key (fixed size whatever the client sent), bounded with O(1) eviction.
    over_limit: BoundedMap<Instant>,
    outage_until: Mutex<Option<Instant>>,
}

/// What admission decided for one request.
pub(crate) enum Admission {
    /// Admitted; the ticket (if anything is held) settles and releases at completion.
    Admitted(Option<Arc<Ticket>>),
}

/// The tenant, its limits and its metrics class, resolved from the route context.
pub(crate) struct Resolved {
    pub(crate) tenant: RouteKey,
    pub(crate) limits: TenantLimits,
    pub(crate) class: &'static str,
}

impl Shared {
    pub(crate) fn new(store: Arc<dyn CounterStore>, config: QuotaConfig) -> Self {
        Shared {
            over_limit: BoundedMap::new(config.cache_capacity),
            store,
            config,
            outage_until: Mutex::new(None),
        }
    }

    pub(crate) fn resolve(&self, tenant: Option<&RouteKey>) -> Option<Resolved> {
        let (tenant, default_class) = match (tenant, &self.config.missing_tenant) {
            (Some(t), _) => (t.clone(), "default"),
            (None, MissingTenant::As(t)) => (t.clone(), "no_tenant"),
            (None, MissingTenant::Skip) => return None,
        };
        let (limits, class) = match self.config.overrides.get(&tenant) {
            Some((limits, class)) => (*limits, *class),
            None => (self.config.defaults, default_class),
        };
        if limits.is_unlimited() {
            return None;
        }
        Some(Resolved {
            tenant,
            limits,
            class,
        })
    }

    /// The cached rejection for `tenant`, if it is known to be over limit right now.
    pub(crate) fn cached_rejection(&self, r: &Resolved) -> Option<RouteError> {
        if self.config.cache_capacity == 0 {
            return None;
        }
        let key = KeyDigest::of(r.tenant.as_bytes());
        let until = self.over_limit.with(&key, |u| *u)?;
        let now = Instant::now();
        if until > now {
            metrics::counter!("replica_router_quota_checks_total",
                "class" => r.class, "result" => "rejected_cached")
            .increment(1);
            Some(RouteError::QuotaExceeded {
                tenant: r.tenant.printable(),
                retry_after: until - now,
            })
        } else {
            self.over_limit.remove_if(&key, |u| *u <= now);
            None
        }
    }

    fn remember_over_limit(&self, tenant: &RouteKey, retry_after: Duration) {
        let cap = self.config.cache_capacity;
        if cap == 0 || retry_after.is_zero() {
            return;
        }
        let now = Instant::now();
        let Some(until) = now.checked_add(retry_after) else {
            return;
        };
        // Full: CLOCK evicts an expired or not recently used entry, O(1).
        self.over_limit
            .insert(KeyDigest::of(tenant.as_bytes()), until, |u| *u <= now);
    }

    fn store_down(&self) -> bool {
        match *self.outage_until.lock() {
            Some(until) => Instant::now() < until,
            None => false,
        }
    }

    fn note_outage(&self) {
        if !self.config.outage_backoff.is_zero() {
            *self.outage_until.lock() = Some(Instant::now() + self.config.outage_backoff);
        }
    }

    fn note_healthy(&self) {
        let mut g = self.outage_until.lock();
        if g.is_some() {
            *g = None;
        }
    }

    /// Runs one store call under the timeout, with metrics.
    pub(crate) async fn call<T>(
        &self,
        op: &'static str,
        fut: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        call_store(self.config.timeout, op, fut).await
    }

    fn policy_outcome(
        &self,
        r: &Resolved,
        err: Option<&StoreError>,
    ) -> Result<Admission, RouteError> {
        match self.config.failure {
            FailurePolicy::Open => {
                metrics::counter!("replica_router_quota_checks_total",
                    "class" => r.class, "result" => "store_error_admitted")
                .increment(1);
                Ok(Admission::Admitted(None))
            }
            FailurePolicy::Closed => {
                metrics::counter!("replica_router_quota_checks_total",
                    "class" => r.class, "result" => "store_error_rejected")
                .increment(1);
                Err(RouteError::Unavailable(match err {
                    Some(e) => format!("quota store: {e}"),
                    None => "quota store: backing off after an outage".to_owned(),
                }))
            }
        }
    }

    /// Checks and takes every limited dimension of `r` in the store.
    pub(crate) async fn admit(
        self: Arc<Self>,
        r: Resolved,
        estimated_tokens: u64,
    ) -> Result<Admission, RouteError> {
        if self.store_down() {
            return self.policy_outcome(&r, None);
        }
        let keys = match Keys::new(&r.tenant, &r.limits) {
            Ok(k) => k,
            // Unreachable for valid scopes; treat as a store failure rather than panic.
            Err(e) => return self.policy_outcome(&r, Some(&e)),
        };
        let reserved = r
            .limits
            .tokens
            .map(|q| estimated_tokens.min(q.limit()))
            .unwrap_or(0);
        let taken = self.take_all(&r, &keys, reserved).await;
        let tally = Tally::of(taken, &r, reserved, self.config.concurrency_retry_after);
        if tally.error.as_ref().is_some_and(StoreError::is_outage) {
            self.note_outage();
        } else {
            self.note_healthy();
        }
        let Tally {
            held,
            error,
            denied,
            cache_for,
        } = tally;
        if let Some((_, retry_after)) = denied {
            self.clone().undo(&r.limits, keys, held);
            if let Some(d) = cache_for {
                self.remember_over_limit(&r.tenant, d);
            }
            metrics::counter!("replica_router_quota_checks_total",
                "class" => r.class, "result" => "rejected")
            .increment(1);
            return Err(RouteError::QuotaExceeded {
                tenant: r.tenant.printable(),
                retry_after,
            });
        }
        if let Some(e) = error {
            if self.config.failure == FailurePolicy::Closed {
                self.clone().undo(&r.limits, keys, held);
                return self.policy_outcome(&r, Some(&e));
            }
            // Fail open: keep what was taken (it is settled/released normally).
            let _ = self.policy_outcome(&r, Some(&e));
        } else {
            metrics::counter!("replica_router_quota_checks_total",
                "class" => r.class, "result" => "admitted")
            .increment(1);
        }
        if held.is_empty() {
            return Ok(Admission::Admitted(None));
        }
        Ok(Admission::Admitted(Some(self.ticket(&r, keys, held))))
    }

    /// Takes one request, `reserved` tokens and a concurrency lease (each dimension the tenant
    /// has a limit for), all at once.
    async fn take_all(&self, r: &Resolved, keys: &Keys, reserved: u64) -> Taken {
        let store = &*self.store;
        let req_f = async {
            match (&keys.requests, r.limits.requests) {
                (Some(k), Some(q)) => Some(self.call("take", store.take(k, q, 1)).await),
                _ => None,
            }
        };
        let tok_f = async {
            match (&keys.tokens, r.limits.tokens) {
                (Some(k), Some(q)) => Some(self.call("take", store.take(k, q, reserved)).await),
                _ => None,
            }
        };
        let conc_f = async {
            match (&keys.concurrency, r.limits.concurrency) {
                (Some(k), Some(limit)) => Some(
                    self.call("acquire", store.acquire(k, limit, self.config.lease_ttl))
                        .await,
                ),
                _ => None,
            }
        };
        let (requests, tokens, lease) = futures_util::future::join3(req_f, tok_f, conc_f).await;
        Taken {
            requests,
            tokens,
            lease,
        }
    }

    /// The ticket of an admitted request holding `held`.
    fn ticket(self: &Arc<Self>, r: &Resolved, keys: Keys, held: Held) -> Arc<Ticket> {
        Arc::new(Ticket {
            shared: self.clone(),
            handle: tokio::runtime::Handle::try_current().ok(),
            tokens: match (held.tokens, keys.tokens, r.limits.tokens) {
                (Some((w, n)), Some(k), Some(q)) => Some((k, q, w, n)),
                _ => None,
            },
            lease: match (held.lease, keys.concurrency) {
                (Some(l), Some(k)) => Some((k, l)),
                _ => None,
            },
            report: TokenReport::default(),
            done: AtomicBool::new(false),
            failed_early: AtomicBool::new(false),
        })
    }

    /// Gives back what a rejected request took, in the background (the 429 does not wait).
    fn undo(self: Arc<Self>, limits: &TenantLimits, keys: Keys, held: Held) {
        if held.is_empty() {
            return;
        }
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let (rq, tq) = (limits.requests, limits.tokens);
        handle.spawn(async move {
            let store = &*self.store;
            if let (Some((w, n)), Some(k), Some(q)) = (held.requests, &keys.requests, rq) {
                let _ = self
                    .call("settle", store.settle(k, q, w, -(n as i64)))
                    .await;
            }
            if let (Some((w, n)), Some(k), Some(q)) = (held.tokens, &keys.tokens, tq) {
                let _ = self
                    .call("settle", store.settle(k, q, w, -(n as i64)))
                    .await;
            }
            if let (Some(l), Some(k)) = (held.lease, &keys.concurrency) {
                let _ = self.call("release", store.release(k, l)).await;
            }
        });
    }
}

/// What the store answered for each dimension (`None`: no limit on it).
struct Taken {
    requests: Option<Result<Take, StoreError>>,
    tokens: Option<Result<Take, StoreError>>,
    lease: Option<Result<Acquire, StoreError>>,
}

/// The store's answers read together: what was taken, the first error, the longest denial.
struct Tally {
    /// What was taken, to undo on rejection or hand to the ticket on admission.
    held: Held,
    error: Option<StoreError>,
    /// The dimension that denied the request with the longest retry-after.
    denied: Option<(&'static str, Duration)>,
    /// How long the tenant is known to be over limit (a window used up).
    cache_for: Option<Duration>,
}

impl Tally {
    fn of(taken: Taken, r: &Resolved, reserved: u64, concurrency_retry: Duration) -> Self {
        let mut t = Tally {
            held: Held::default(),
            error: None,
            denied: None,
            cache_for: None,
        };
        match taken.requests {
            Some(Ok(take)) if take.admitted => t.held.requests = Some((take.window, 1)),
            Some(Ok(take)) => t.deny(r, "requests", &take),
            Some(Err(e)) => t.fail(e),
            None => {}
        }
        match taken.tokens {
            Some(Ok(take)) if take.admitted => t.held.tokens = Some((take.window, reserved)),
            Some(Ok(take)) => t.deny(r, "tokens", &take),
            Some(Err(e)) => t.fail(e),
            None => {}
        }
        match taken.lease {
            Some(Ok(a)) => match a.lease {
                Some(lease) => t.held.lease = Some(lease),
                None => t.note(r, "concurrency", concurrency_retry),
            },
            Some(Err(e)) => t.fail(e),
            None => {}
        }
        t
    }

    fn fail(&mut self, e: StoreError) {
        self.error.get_or_insert(e);
    }

    /// A rate dimension denied the request; a used-up window is remembered until it refills.
    fn deny(&mut self, r: &Resolved, dim: &'static str, take: &Take) {
        self.note(r, dim, take.retry_after);
        if take.remaining == 0 {
            self.cache_for = Some(
                self.cache_for
                    .map_or(take.retry_after, |c| c.max(take.retry_after)),
            );
        }
    }

    fn note(&mut self, r: &Resolved, dim: &'static str, retry: Duration) {
        metrics::counter!("replica_router_quota_rejections_total",
            "class" => r.class, "dimension" => dim)
        .increment(1);
        if self.denied.is_none_or(|(_, d)| d < retry) {
            self.denied = Some((dim, retry));
        }
    }
}

#[derive(Default)]
struct Held {
    requests: Option<(WindowId, u64)>,
    tokens: Option<(WindowId, u64)>,
    lease: Option<LeaseId>,
}

impl Held {
    fn is_empty(&self) -> bool {
        self.requests.is_none() && self.tokens.is_none() && self.lease.is_none()
    }
}

struct Keys {
    requests: Option<StoreKey>,
    tokens: Option<StoreKey>,
    concurrency: Option<StoreKey>,
}

impl Keys {
    fn new(tenant: &RouteKey, limits: &TenantLimits) -> Result<Self, StoreError> {
        let base = StoreKey::new(SCOPE_REQUESTS, tenant.as_bytes())?;
        Ok(Keys {
            tokens: limits
                .tokens
                .map(|_| base.rescope(SCOPE_TOKENS))
                .transpose()?,
            concurrency: limits
                .concurrency
                .map(|_| base.rescope(SCOPE_CONCURRENCY))
                .transpose()?,
            requests: limits.requests.map(|_| base),
        })
    }
}

/// Held by an admitted request: settles its token reservation and releases its concurrency lease
/// exactly once, when dispatch reports completion or, failing that, when the last reference is
/// dropped (error before dispatch, cancellation, a stack without dispatch).
pub(crate) struct Ticket {
    shared: Arc<Shared>,
    handle: Option<tokio::runtime::Handle>,
    tokens: Option<(StoreKey, RateQuota, WindowId, u64)>,
    lease: Option<(StoreKey, LeaseId)>,
    pub(crate) report: TokenReport,
    done: AtomicBool,
    failed_early: AtomicBool,
}

impl Ticket {
    pub(crate) fn has_tokens(&self) -> bool {
        self.tokens.is_some()
    }

    /// The request failed before reaching a replica: refund its whole token reservation.
    pub(crate) fn mark_failed_early(&self) {
        self.failed_early.store(true, Ordering::Relaxed);
    }

    fn finish(&self, actual: Option<u64>) {
        if self.done.swap(true, Ordering::AcqRel) {
            return;
        }
        let settle = match (&self.tokens, actual) {
            (Some((key, quota, window, reserved)), Some(actual)) if actual != *reserved => {
                let delta = actual.min(crate::store::MAX_UNITS) as i64 - *reserved as i64;
                Some((key.clone(), *quota, *window, delta))
            }
            _ => None,
        };
        let release = self.lease.clone();
        if settle.is_none() && release.is_none() {
            return;
        }
        let handle = match &self.handle {
            Some(h) => h.clone(),
            None => match tokio::runtime::Handle::try_current() {
                Ok(h) => h,
                // No runtime to run on: the lease TTL will free the slot.
                Err(_) => return,
            },
        };
        let shared = self.shared.clone();
        handle.spawn(async move {
            let store = &*shared.store;
            if let Some((key, quota, window, delta)) = settle {
                let _ = shared
                    .call("settle", store.settle(&key, quota, window, delta))
                    .await;
            }
            if let Some((key, lease)) = release {
                let _ = shared.call("release", store.release(&key, lease)).await;
            }
        });
    }
}

impl CompletionObserver for Ticket {
    fn on_complete(&self, completion: &Completion<'_>) {
        let actual = self.report.get().or_else(|| {
            self.shared
                .config
                .token_meter
                .as_ref()
                .and_then(|m| m(completion))
        });
        self.finish(actual);
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let actual = if self.failed_early.load(Ordering::Relaxed) {
            Some(self.report.get().unwrap_or(0))
        } else {
            self.report.get()
        };
        self.finish(actual);
    }
}
