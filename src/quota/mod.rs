//! Cluster-wide tenant quotas.
//!
//! [`QuotaLayer`] admits or rejects each request by its tenant's quotas, kept in a shared
//! [`CounterStore`](crate::store::CounterStore) so that every gateway instance pointing at the
//! same store (for example one Redis) enforces **one** quota per tenant, not one per process.
//! (The guide's pitfall: per-process caps multiply a tenant's quota by the gateway count.)
//!
//! Put it outermost, after [`RouteContextLayer`](crate::context::RouteContextLayer): a rejected
//! request should cost nothing downstream.
//!
//! # What is limited
//!
//! Per tenant ([`RouteContext::tenant`](crate::context::RouteContext::tenant)), any of
//! ([`TenantLimits`]):
//!
//! * **requests per window**: one unit per admitted request;
//! * **tokens per window**: at admission the request's
//!   [`estimated_tokens`](crate::context::RouteContext::estimated_tokens) are reserved (clamped to
//!   the window's limit, so a request bigger than a whole window can still run once the window is
//!   free); when the request finishes (its response *body* ends, fails or is dropped: dispatch
//!   reports it through a [`CompletionObserver`](crate::inflight::CompletionObserver)) the
//!   reservation is settled to the actual count. The actual count is, in order: a count reported
//!   through the [`TokenReport`] handle the layer puts in the request's extensions (for example by
//!   a backend that parsed the engine's `usage`), else the configured
//!   [token meter](QuotaConfig::token_meter) applied to the completion (for example one token per
//!   streamed frame), else the estimate stands;
//! * **concurrent requests**: a lease taken at admission and released when the request finishes,
//!   errors, is cancelled or dropped. Leases carry a TTL ([`QuotaConfig::lease_ttl`]) so the slots
//!   of a crashed gateway come back.
//!
//! Windows are the store's fixed windows aligned to store time: a quota of `N` per window admits
//! at most `N` per window across the cluster (see [`crate::store`] for the exact statement and
//! why fixed windows). Limits are the defaults given to [`QuotaConfig::new`] unless the tenant has an
//! override ([`QuotaConfig::tenant`]).
//!
//! A request over quota fails with [`RouteError::QuotaExceeded`](crate::error::RouteError) (429)
//! whose `retry_after` is when its window ends (for concurrency, a configured hint).
//!
//! # Requests without a tenant
//!
//! [`MissingTenant::Skip`] (the default) passes them through unlimited;
//! [`MissingTenant::As`] counts them all under one configured tenant.
//!
//! # When the store fails
//!
//! Every store call is bounded by [`QuotaConfig::timeout`]. On a timeout or store error the
//! [`FailurePolicy`] decides: [`FailurePolicy::Open`] admits (without reservation) and
//! [`FailurePolicy::Closed`] rejects with [`RouteError::Unavailable`](crate::error::RouteError)
//! (503). After an outage error the layer stops calling the store for
//! [`QuotaConfig::outage_backoff`] (so requests do not each wait a full timeout while the store
//! is down) and applies the policy at once; the first request after the backoff tries the store
//! again, and on success normal operation resumes. No request ever waits longer than the timeout
//! on the store, and the layer never panics.
//!
//! # Over-limit cache
//!
//! A tenant whose requests or tokens window is exhausted (`remaining == 0`) is remembered locally
//! until that window ends; its requests are rejected without a store round trip. Only exhausted
//! windows are cached, so the cache never rejects a request the store would have admitted
//! (except for refunds settled within the window, which are rare and would merely delay the
//! tenant to the window's end).
//!
//! # Metrics
//!
//! Emitted through the `metrics` facade (install a recorder in your binary):
//!
//! | name | kind | labels |
//! |---|---|---|
//! | `replica_router_quota_checks_total` | counter | `class`, `result` (`admitted`, `rejected`, `rejected_cached`, `store_error_admitted`, `store_error_rejected`) |
//! | `replica_router_quota_rejections_total` | counter | `class`, `dimension` (`requests`, `tokens`, `concurrency`) |
//! | `replica_router_store_call_seconds` | histogram | `op` |
//! | `replica_router_store_errors_total` | counter | `op`, `kind` |
//!
//! `class` is the tenant's class, never its id: `default` for tenants on the default limits,
//! `no_tenant` for requests counted under [`MissingTenant::As`], and the class given with each
//! override (`override` unless named).
//!
//! # Example
//!
//! ```
//! use std::time::Duration;
//! use replica_router::quota::{QuotaConfig, QuotaLayer, TenantLimits};
//! use replica_router::store::{MemoryStore, RateQuota};
//!
//! # fn main() -> Result<(), replica_router::store::StoreError> {
//! let config = QuotaConfig::new(
//!     TenantLimits::unlimited()
//!         .requests(RateQuota::new(600, Duration::from_secs(60))?)
//!         .tokens(RateQuota::new(100_000, Duration::from_secs(60))?)
//!         .concurrency(8),
//! )
//! .tenant("enterprise-1", TenantLimits::unlimited().concurrency(64));
//! let layer = QuotaLayer::new(MemoryStore::new(), config);
//! # let _ = layer;
//! # Ok(()) }
//! ```

mod config;
mod future;
mod layer;
mod service;
mod shared;

pub use self::config::{MissingTenant, QuotaConfig, TenantLimits, TokenMeter, TokenReport};
pub use self::future::QuotaFuture;
pub use self::layer::QuotaLayer;
pub use self::service::Quota;
pub use crate::store::FailurePolicy;
