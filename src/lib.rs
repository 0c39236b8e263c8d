//! # replica-router
//!
//! Data-parallel LLM inference routing as composable [tower] layers.
//!
//! Data parallelism at inference runs N full copies of a model (each maybe TP=2 or TP=4 inside)
//! and multiplies throughput only if the gateway in front spreads requests well: multi-turn chat
//! must go back to the replica that holds its KV cache, sticky routing alone hot-spots, replicas
//! differ, fail and drain, overload should answer a fast 429, and tenant quotas must hold across
//! every gateway instance. This crate gives any Rust server those pieces as tower layers.
//!
//! ## Concepts
//! - [`pool::Pool`]: the live replica set (add, remove, drain, eject, readmit) with per-replica
//!   atomics; readers load immutable snapshots, never a lock.
//! - [`backend::Backend`]: a replica's service plus optional health probe and load report.
//! - [`context::RouteContext`]: session, user, tenant, estimated tokens and priority, extracted
//!   by [`context::RouteContextLayer`].
//! - [`decision::Decision`]: which replica and why, carried in the request's extensions from the
//!   picking layer to [`dispatch::Dispatch`], then on the response.
//! - [`inflight`]: a request stays in flight until its response body ends (streaming-safe).
//!
//! ## Layers, outermost first in a typical chat stack
//! - [`quota`]: cluster-wide tenant quotas (requests, tokens, concurrency) over a shared
//!   [`store::CounterStore`] (in-memory, or Redis with the `redis` feature).
//! - [`shed`]: SLO shedding: a fast 429 when every replica's estimated queue wait is past the
//!   budget, an optional prioritized admission queue, and the wait-or-spill choice for sticky
//!   sessions.
//! - [`affinity`]: sticky sessions by consistent hashing with bounded loads, pins that survive
//!   spills, failover with an explicit signal.
//! - [`balance`]: weighted least-in-flight (power of two choices) or round-robin for requests
//!   without a session.
//! - [`dispatch`]: sends to the decided replica and keeps the request in flight until its body
//!   ends.
//!
//! Beside them: [`health`] (active probes, outlier ejection with back-off, slow-start
//! re-admission, failover of requests whose replica died before answering, drain), [`load`]
//! (vLLM's Prometheus `/metrics` as load reports), [`autoscale`] (scale out / hold / scale in
//! from p95 queue wait, utilization and shed rate), [`advisor`] (what to change: the guide's
//! decision tables as rules, reading replica-, shard-, memory-bound or under-utilized with the
//! proposed `replicas x TP x PP`), [`rollout`] (rolling restarts at most
//! `max_unavailable` replicas at a time: drain, restart, probe until ready, slow-start
//! readmission; and staggered starts of new replicas, so N replicas never load N copies of the
//! weights at once), [`select`] (one gateway in front of several pools: chat, batch, embeddings,
//! small and large model tiers, by path, model or priority, without one saturated pool blocking
//! another).
//!
//! Below the layers, the pieces they share and any application can call directly: [`pick`]
//! (weighted power of two choices and the consistent-hash ring with its bounded walk, apart from
//! tower), [`pins`] (session pin tables, in memory or Redis), [`load`] (engine load reports, the
//! queue-wait estimate, the shedding layer's advice) and [`store`] (the counter stores).
//! `ARCHITECTURE.md` in the repository shows the floors and the request's path; [`prelude`]
//! imports the names a typical stack needs, also re-exported at the root.
//!
//! The [`guide`] walks through the data-parallel inference guide's policies, pitfalls and
//! production checklist item by item, with the part of this crate that serves each.
//!
//! ## A chat stack
//! ```
//! use std::time::Duration;
//! use replica_router::{affinity::AffinityLayer, balance::LeastInFlightLayer,
//!     backend::ServiceBackend, context::RouteContextLayer, dispatch::Dispatch, pool::Pool,
//!     quota::{QuotaConfig, QuotaLayer, TenantLimits}, replica::ReplicaSpec,
//!     shed::ShedLayer, store::{MemoryStore, RateQuota}};
//! use tower::{Service, ServiceBuilder, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//! let replica = ServiceBackend::new(tower::service_fn(|_req: http::Request<String>| async {
//!     Ok::<_, std::convert::Infallible>(http::Response::new(String::from("{}")))
//! }));
//! let spec = ReplicaSpec::new("llama-3-70b").tensor_parallel(2);
//! let pool = Pool::builder()
//!     .replica("gpu-0-1", spec.clone(), replica.clone())
//!     .replica("gpu-2-3", spec, replica)
//!     .build()?;
//! let limits = TenantLimits::unlimited().requests(RateQuota::new(600, Duration::from_secs(60))?);
//! let mut gateway = ServiceBuilder::new()
//!     .layer(RouteContextLayer::default())             // headers -> RouteContext
//!     .layer(QuotaLayer::new(MemoryStore::new(), QuotaConfig::new(limits))) // 429 per tenant
//!     .layer(ShedLayer::new(pool.clone()).budget(Duration::from_millis(200))) // 429 when hot
//!     .layer(AffinityLayer::new(pool.clone()))          // sticky, bounded loads
//!     .layer(LeastInFlightLayer::new(pool.clone()))     // sessions-less requests
//!     .service(Dispatch::new(pool));                    // in flight until the body ends
//! let req = http::Request::builder()
//!     .header("x-session-id", "conv-1")
//!     .header("x-tenant-id", "acme")
//!     .body(String::new())?;
//! let resp = gateway.ready().await?.call(req).await?;
//! let decision = resp.extensions().get::<replica_router::decision::Decision>().unwrap();
//! println!("served by {} ({})", decision.replica(), decision.reason());
//! # Ok(())
//! # }
//! ```
//!
//! Errors are one type, [`error::RouteError`], with a documented HTTP mapping (503, 429 with
//! `Retry-After`, 400, 502).
#![deny(missing_docs)]
#![forbid(unsafe_code)]

pub mod advisor;
pub mod affinity;
pub mod autoscale;
pub mod backend;
pub mod balance;
#[cfg(feature = "redis")]
pub mod cluster;
pub mod context;
pub mod decision;
pub mod dispatch;
pub mod edge;
pub mod error;
pub mod fit;
pub mod future;
pub mod guide;
pub mod health;
#[cfg(feature = "http-backend")]
pub mod http_backend;
pub mod inflight;
pub mod load;
pub mod pick;
pub mod pins;
pub mod pool;
pub mod prefix;
pub mod prelude;
pub mod quota;
pub mod replica;
pub mod request;
pub mod rng;
pub mod rollout;
pub mod select;
pub mod shed;
pub mod store;
pub mod usage;

pub use crate::affinity::{AffinityKey, AffinityLayer};
pub use crate::backend::{Backend, LoadReport, ServiceBackend};
pub use crate::balance::{LeastInFlightLayer, RoundRobinLayer};
pub use crate::context::{HeaderExtractor, RouteContext, RouteContextLayer, RouteKey};
pub use crate::decision::{Decision, DecisionReason};
pub use crate::dispatch::Dispatch;
pub use crate::error::{BoxError, RouteError};
pub use crate::health::{FailoverLayer, HealthChecker, OutlierDetectionLayer};
pub use crate::pool::{LoadMeasure, Pool};
pub use crate::quota::{QuotaConfig, QuotaLayer, TenantLimits};
pub use crate::replica::{ReplicaId, ReplicaSpec};
pub use crate::shed::ShedLayer;
pub use crate::store::{CounterStore, MemoryStore, RateQuota};
