//! Quota configuration.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::context::RouteKey;
use crate::inflight::Completion;
use crate::store::{FailurePolicy, RateQuota};

/// The limits of one tenant. Each dimension is optional; [`TenantLimits::unlimited`] has none.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TenantLimits {
    /// Requests per window.
    pub requests: Option<RateQuota>,
    /// Tokens per window (reserved at admission, settled at completion).
    pub tokens: Option<RateQuota>,
    /// Concurrent requests.
    pub concurrency: Option<u64>,
}

impl TenantLimits {
    /// No limit at all.
    pub fn unlimited() -> Self {
        TenantLimits::default()
    }

    /// Limits requests per window.
    pub fn requests(mut self, quota: RateQuota) -> Self {
        self.requests = Some(quota);
        self
    }

    /// Limits tokens per window.
    pub fn tokens(mut self, quota: RateQuota) -> Self {
        self.tokens = Some(quota);
        self
    }

    /// Limits concurrent requests (0 rejects every request).
    pub fn concurrency(mut self, limit: u64) -> Self {
        self.concurrency = Some(limit.min(crate::store::MAX_UNITS));
        self
    }

    /// Whether no dimension is limited.
    pub fn is_unlimited(&self) -> bool {
        self.requests.is_none() && self.tokens.is_none() && self.concurrency.is_none()
    }
}

/// What to do with requests whose route context has no tenant.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum MissingTenant {
    /// Pass them through unlimited. The default.
    #[default]
    Skip,
    /// Count them all under this tenant (metrics class `no_tenant`).
    As(RouteKey),
}

/// Computes a finished request's actual token count from its completion, or `None` to keep the
/// reservation as it is.
pub type TokenMeter = Arc<dyn Fn(&Completion<'_>) -> Option<u64> + Send + Sync>;

/// A handle in the request's extensions (present when a token quota applies) through which any
/// inner layer or backend that knows the real token count reports it. The reported count wins
/// over the [token meter](QuotaConfig::token_meter).
///
/// ```
/// use replica_router::quota::TokenReport;
/// let report = TokenReport::default();
/// assert_eq!(report.get(), None);
/// report.report(1234);
/// assert_eq!(report.get(), Some(1234));
/// ```
#[derive(Debug, Clone)]
pub struct TokenReport(Arc<AtomicU64>);

const UNREPORTED: u64 = u64::MAX;

impl Default for TokenReport {
    fn default() -> Self {
        TokenReport(Arc::new(AtomicU64::new(UNREPORTED)))
    }
}

impl TokenReport {
    /// Records the request's actual token count (the last report wins).
    pub fn report(&self, tokens: u64) {
        self.0
            .store(tokens.min(crate::store::MAX_UNITS), Ordering::Relaxed);
    }

    /// The reported count, if any.
    pub fn get(&self) -> Option<u64> {
        match self.0.load(Ordering::Relaxed) {
            UNREPORTED => None,
            n => Some(n),
        }
    }
}

/// Configuration of a [`QuotaLayer`](super::QuotaLayer).
#[derive(Clone)]
pub struct QuotaConfig {
    pub(crate) defaults: TenantLimits,
    pub(crate) overrides: HashMap<RouteKey, (TenantLimits, &'static str)>,
    pub(crate) missing_tenant: MissingTenant,
    pub(crate) failure: FailurePolicy,
    pub(crate) timeout: Duration,
    pub(crate) outage_backoff: Duration,
    pub(crate) lease_ttl: Duration,
    pub(crate) concurrency_retry_after: Duration,
    pub(crate) cache_capacity: usize,
    pub(crate) token_meter: Option<TokenMeter>,
}

impl fmt::Debug for QuotaConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("QuotaConfig")
            .field("defaults", &self.defaults)
            .field("overrides", &self.overrides.len())
            .field("missing_tenant", &self.missing_tenant)
            .field("failure", &self.failure)
            .field("timeout", &self.timeout)
            .field("outage_backoff", &self.outage_backoff)
            .field("lease_ttl", &self.lease_ttl)
            .field("concurrency_retry_after", &self.concurrency_retry_after)
            .field("cache_capacity", &self.cache_capacity)
            .field("token_meter", &self.token_meter.is_some())
            .finish()
    }
}

impl Default for QuotaConfig {
    fn default() -> Self {
        QuotaConfig::new(TenantLimits::unlimited())
    }
}

impl QuotaConfig {
    /// Every tenant gets `defaults` unless overridden.
    ///
    /// Other defaults: requests without a tenant are skipped; fail open; 250 ms store timeout;
    /// 1 s outage backoff; 10 min lease TTL; 1 s `Retry-After` for concurrency rejections; an
    /// over-limit cache of 65 536 tenants; no token meter.
    pub fn new(defaults: TenantLimits) -> Self {
        QuotaConfig {
            defaults,
            overrides: HashMap::new(),
            missing_tenant: MissingTenant::Skip,
            failure: FailurePolicy::Open,
            timeout: Duration::from_millis(250),
            outage_backoff: Duration::from_secs(1),
            lease_ttl: Duration::from_secs(600),
            concurrency_retry_after: Duration::from_secs(1),
            cache_capacity: 1 << 16,
            token_meter: None,
        }
    }

    /// Gives `tenant` its own limits (metrics class `override`).
    pub fn tenant(self, tenant: impl Into<RouteKey>, limits: TenantLimits) -> Self {
        self.tenant_in_class(tenant, limits, "override")
    }

    /// Gives `tenant` its own limits and a metrics class (a small fixed set of names, such as
    /// `free` or `enterprise`: classes are metric labels).
    pub fn tenant_in_class(
        mut self,
        tenant: impl Into<RouteKey>,
        limits: TenantLimits,
        class: &'static str,
    ) -> Self {
        self.overrides.insert(tenant.into(), (limits, class));
        self
    }

    /// What to do with requests that have no tenant.
    pub fn missing_tenant(mut self, policy: MissingTenant) -> Self {
        self.missing_tenant = policy;
        self
    }

    /// Fail open or closed when the store is down.
    pub fn failure_policy(mut self, policy: FailurePolicy) -> Self {
        self.failure = policy;
        self
    }

    /// Bound on every store call (at least 1 ms).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout.max(Duration::from_millis(1));
        self
    }

    /// How long to stop calling the store after an outage error (zero: retry on every request).
    pub fn outage_backoff(mut self, backoff: Duration) -> Self {
        self.outage_backoff = backoff;
        self
    }

    /// TTL of concurrency leases: the longest a crashed gateway's slot stays taken. Requests
    /// running longer than this stop counting against the limit. At least 1 ms.
    pub fn lease_ttl(mut self, ttl: Duration) -> Self {
        self.lease_ttl = ttl.max(Duration::from_millis(1));
        self
    }

    /// `Retry-After` hint for concurrency rejections.
    pub fn concurrency_retry_after(mut self, hint: Duration) -> Self {
        self.concurrency_retry_after = hint;
        self
    }

    /// Most tenants remembered as over limit (0 disables the cache; rounded down to a multiple
    /// of 16 above 16). Entries hold a 16-byte digest of the tenant key and are evicted in O(1)
    /// when the cache is full.
    pub fn cache_capacity(mut self, capacity: usize) -> Self {
        self.cache_capacity = capacity;
        self
    }

    /// How to count a finished request's actual tokens when nothing was reported through
    /// [`TokenReport`]. For example, one token per streamed SSE event:
    ///
    /// ```
    /// use replica_router::quota::{QuotaConfig, TenantLimits};
    /// let config = QuotaConfig::new(TenantLimits::unlimited())
    ///     .token_meter(|c| Some(c.estimated_tokens.min(512) + c.body_frames));
    /// # let _ = config;
    /// ```
    pub fn token_meter(
        mut self,
        meter: impl Fn(&Completion<'_>) -> Option<u64> + Send + Sync + 'static,
    ) -> Self {
        self.token_meter = Some(Arc::new(meter));
        self
    }
}
