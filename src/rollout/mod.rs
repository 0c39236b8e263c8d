//! Staggered rollouts: restart replicas a few at a time, and admit new ones one by one.
//!
//! The guide's pitfall *ignoring weight load time* ("N replicas means N copies loaded from disk
//! or object storage at startup — stagger rollouts") and its checklist item *stagger replica
//! startup to avoid simultaneous weight downloads hammering storage*. Restarting every replica
//! at once takes the whole service down for a full weight load and has N processes pull N copies
//! of the weights from the same storage; restarting one at a time keeps `N - 1` replicas
//! serving and the storage load flat.
//!
//! # Rolling restart: [`Rollout`]
//!
//! For every replica of the pool (or a chosen list, in order), at most
//! [`max_unavailable`](RolloutConfig::max_unavailable) at a time (default 1):
//!
//! 1. **Drain** ([`Pool::drain`](crate::pool::Pool::drain)): no new request or session goes to
//!    it; sessions pinned there fail over to other replicas (their KV caches are lost there
//!    anyway). Wait for its in-flight requests, streamed bodies included, up to
//!    [`drain_timeout`](RolloutConfig::drain_timeout); then proceed or abort per
//!    [`DrainTimeoutPolicy`].
//! 2. Mark it [`Unhealthy`](crate::pool::Health::Unhealthy) (gauges show it) and run the
//!    **action**: your async closure that restarts or upgrades the engine behind the replica.
//! 3. **Ready gate** ([`ReadyGate`]): probe it through
//!    [`Backend::probe`](crate::backend::Backend::probe) every `interval` until it passes
//!    (`consecutive` times), within `timeout`. It gets no traffic meanwhile.
//! 4. **Readmit** ([`Pool::readmit`](crate::pool::Pool::readmit) then
//!    [`Pool::undrain`](crate::pool::Pool::undrain)): its slow-start ramp begins, so its cold
//!    prefix cache is not flooded.
//! 5. **Settle**: keep its slot for [`settle`](RolloutConfig::settle); if it is no longer healthy
//!    at the end (ejected for errors, failing probes), abort.
//!
//! The budget counts replicas out of service for other reasons too (unhealthy, ejected or
//! draining; [`count_other_unavailable`](RolloutConfig::count_other_unavailable)), as
//! Kubernetes' `maxUnavailable` does: a rollout never turns one dead replica into two. Targets
//! that are already out go first (restarting them costs no capacity). If others stay out so
//! long that nothing can proceed, the rollout gives up with [`RolloutError::Blocked`].
//!
//! **Failure.** If a step fails (the action errs or times out, the replica never passes its
//! probe, it is unstable after settling, or its drain times out under
//! [`DrainTimeoutPolicy::Abort`]), no further replica is started, steps already in progress
//! finish, and [`RolloutError::ReplicaFailed`] names the replica and carries the
//! [`RolloutReport`]. The failed replica is left **drained** (out of service) for the operator;
//! untouched replicas are untouched. To resume after fixing it, run a rollout over the report's
//! `failed` and `not_started` replicas: the drained one goes first, at no cost to the budget.
//!
//! A rollout with one replica (or `max_unavailable` >= the pool size) empties the pool while it
//! runs: requests then fail with [`RouteError::NoReplica`](crate::error::RouteError::NoReplica).
//!
//! Upgrades that change a replica's address or spec are not in-place restarts: start the new
//! replicas with [`StaggeredStart`], then drain and remove the old ones with
//! [`drain_and_remove`](crate::health::drain_and_remove).
//!
//! # Adding replicas: [`StaggeredStart`]
//!
//! For each [`NewReplica`] in order, at most
//! [`max_concurrent`](StaggerConfig::max_concurrent) at a time (default 1) and at least
//! [`min_interval`](StaggerConfig::min_interval) apart: run the start action (launch the engine;
//! it begins loading weights), wait until its probe passes, add it to the pool
//! ([`Pool::add`](crate::pool::Pool::add), which starts its slow-start ramp), settle. The next
//! replica starts loading only when a slot is free, so storage serves one weight download at a
//! time. Every replica is validated first ([`Pool::check_new`](crate::pool::Pool::check_new)),
//! so a spec mismatch fails before any download.
//!
//! # Progress
//!
//! Every step emits a [`RolloutEvent`] to the callbacks given with `on_event` and the channels
//! taken with `events`, and these metrics:
//!
//! | name | kind | labels |
//! |---|---|---|
//! | [`UNAVAILABLE_GAUGE`] | gauge | |
//! | [`REPLICAS_COUNTER`] | counter | `result` = `done`, `failed`, `skipped` |
//! | [`STAGGER_REPLICAS_COUNTER`] | counter | `result` = `added`, `failed` |
//! | [`PHASE_SECONDS_HISTOGRAM`] | histogram | `phase` = `drain`, `action`, `ready` |
//! | [`PROBE_FAILURES_COUNTER`] | counter | |
//!
//! # Example
//! ```
//! use replica_router::backend::ServiceBackend;
//! use replica_router::pool::{Pool, SlowStart};
//! use replica_router::replica::ReplicaSpec;
//! use replica_router::rollout::{Rollout, RolloutConfig, RolloutEvent};
//! use std::time::Duration;
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() {
//! let engine = ServiceBackend::new(tower::service_fn(|_req: http::Request<String>| async {
//!     Ok::<_, std::convert::Infallible>(http::Response::new(String::new()))
//! }));
//! let spec = ReplicaSpec::new("llama-3-70b").tensor_parallel(2);
//! let pool = Pool::builder()
//!     .slow_start(SlowStart::linear(Duration::from_secs(60)))
//!     .replica("gpu-0-1", spec.clone(), engine.clone())
//!     .replica("gpu-2-3", spec, engine)
//!     .build()
//!     .unwrap();
//! let config = RolloutConfig {
//!     max_unavailable: 1,
//!     drain_timeout: Duration::from_secs(120),
//!     settle: Duration::from_secs(30),
//!     ..RolloutConfig::default()
//! };
//! let mut rollout = Rollout::new(pool.clone(), config);
//! let mut events = rollout.events();
//! let report = rollout
//!     .run(|replica| async move {
//!         // Restart the engine behind `replica.id()` here (systemd, Kubernetes, ...).
//!         let _ = replica.id();
//!         Ok::<_, std::io::Error>(())
//!     })
//!     .await
//!     .unwrap();
//! assert_eq!(report.completed.len(), 2);
//! assert_eq!(report.peak_in_progress, 1);
//! assert!(matches!(events.recv().await, Some(RolloutEvent::Started { .. })));
//! # }
//! ```

mod config;
mod error;
mod event;
mod ready;
mod runner;
mod stagger;

pub use self::config::{DrainTimeoutPolicy, ReadyGate, RolloutConfig, StaggerConfig};
pub use self::error::{RolloutError, StepError};
pub use self::event::{RolloutEvent, RolloutReport};
pub use self::ready::{wait_until_ready, Readiness};
pub use self::runner::Rollout;
pub use self::stagger::{NewReplica, StaggeredStart};

/// Gauge: replicas a rollout holds out of service right now.
pub const UNAVAILABLE_GAUGE: &str = "replica_router_rollout_unavailable";

/// Counter of rollout steps, labelled `result` = `done`, `failed` or `skipped`.
pub const REPLICAS_COUNTER: &str = "replica_router_rollout_replicas_total";

/// Counter of staggered-start steps, labelled `result` = `added` or `failed`.
pub const STAGGER_REPLICAS_COUNTER: &str = "replica_router_stagger_replicas_total";

/// Histogram of step phases in seconds, labelled `phase` = `drain`, `action` or `ready`.
pub const PHASE_SECONDS_HISTOGRAM: &str = "replica_router_rollout_phase_seconds";

/// Counter of failed readiness probes (a replica still loading its weights fails a few).
pub const PROBE_FAILURES_COUNTER: &str = "replica_router_rollout_probe_failures_total";
