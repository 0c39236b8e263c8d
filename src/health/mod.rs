//! Replica health: active probes, passive outlier ejection, slow start, failover and drain.
//!
//! The guide's pitfalls this module answers: *sticky sessions without failover plan* (a dead
//! replica must stop getting traffic and its sessions must move), a *restarted replica has a
//! cold cache and cold weights* (bring it in gently), and rollouts must *stagger* (drain one
//! replica at a time without cutting streams).
//!
//! - **Active checks**: [`HealthChecker`] probes each replica through
//!   [`Backend::probe`](crate::backend::Backend::probe) (for
//!   `http_backend::HttpReplica` under feature `http-backend`, `GET /health`) every `interval`, with a
//!   timeout; `unhealthy_threshold` failed probes in a row mark a replica
//!   [`Unhealthy`](crate::pool::Health::Unhealthy), `healthy_threshold` passed probes re-admit it.
//!   The same task scrapes [`Backend::load_report`](crate::backend::Backend::load_report) (vLLM's
//!   `/metrics`, see [`load`](crate::load)) for the wait estimate, and updates the per-replica
//!   gauges ([`record_pool_metrics`]).
//! - **Passive outlier detection** (Envoy's outlier detection): [`OutlierDetector`], fed by
//!   every request's outcome through [`OutlierDetectionLayer`], ejects a replica after
//!   `consecutive_failures` failures in a row or `window_failures` failures (transport errors and
//!   5xx) within `window`, never more than `max_ejected_fraction` of the pool at once. An ejected
//!   replica gets no new request until its ejection ends: `base_ejection x 2^(n-1)` for its
//!   `n`-th ejection in a row, capped at `max_ejection`.
//! - **Slow start** on re-admission (and on joining): the pool's
//!   [`SlowStart`](crate::pool::SlowStart) ramps the replica's effective weight from a floor to
//!   full over a window, in Envoy's shape `max(floor, (t / window)^(1 / aggression))`, so the
//!   weighted pickers and the wait estimate give a cold replica a small share first.
//! - **Failover**: [`FailoverLayer`] sends a request whose replica failed before answering
//!   (connection refused or reset: the replica died before the checks noticed) to another one,
//!   so requests that had not started are not lost. A request whose response had begun (tokens
//!   already streamed to the client) is never retried.
//! - **Drain**: [`Pool::drain`](crate::pool::Pool::drain) stops new requests and sessions to a
//!   replica and returns a [`Drain`](crate::pool::Drain) whose `wait()` resolves when its last
//!   in-flight request (streamed body included) has finished; [`drain_and_remove`] does drain,
//!   wait with a timeout, and removal in one call.
//!
//! # A gateway with all of it
//! ```
//! use replica_router::balance::LeastInFlightLayer;
//! use replica_router::backend::ServiceBackend;
//! use replica_router::dispatch::Dispatch;
//! use replica_router::health::{
//!     FailoverLayer, HealthCheckConfig, HealthChecker, OutlierConfig, OutlierDetectionLayer,
//!     OutlierDetector,
//! };
//! use replica_router::pool::{Pool, SlowStart};
//! use replica_router::replica::ReplicaSpec;
//! use std::time::Duration;
//! use tower::{Service, ServiceBuilder, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let echo = ServiceBackend::new(tower::service_fn(|_req: http::Request<String>| async {
//!     Ok::<_, std::convert::Infallible>(http::Response::new(String::from("hi")))
//! }));
//! let pool = Pool::builder()
//!     .slow_start(SlowStart::linear(Duration::from_secs(30)))
//!     .replica("a", ReplicaSpec::new("m"), echo.clone())
//!     .replica("b", ReplicaSpec::new("m"), echo)
//!     .build()
//!     .unwrap();
//! let detector = OutlierDetector::new(pool.clone(), OutlierConfig::default());
//! let _checks = HealthChecker::new(pool.clone(), HealthCheckConfig::default())
//!     .outlier_detector(detector.clone())
//!     .spawn(); // stops when dropped
//! let mut gateway = ServiceBuilder::new()
//!     .layer(FailoverLayer::new(pool.clone()))
//!     .layer(OutlierDetectionLayer::new(&detector))
//!     .layer(LeastInFlightLayer::new(pool.clone()))
//!     .service(Dispatch::new(pool));
//! let resp = gateway.ready().await.unwrap().call(http::Request::new(String::new())).await;
//! assert!(resp.is_ok());
//! # }
//! ```

mod checker;
mod deferred;
mod drain;
mod future;
mod layer;
mod metrics;
mod outlier;
mod service;

pub use self::checker::{HealthCheckConfig, HealthCheckHandle, HealthChecker, ProbeRound};
pub use self::drain::{drain_and_remove, DrainOutcome};
pub use self::future::FailoverFuture;
pub use self::layer::{FailoverLayer, OutlierDetectionLayer};
pub use self::metrics::record_pool_metrics;
pub use self::outlier::{OutlierConfig, OutlierDetector};
pub use self::service::{Failover, OutlierDetection};

use crate::error::RouteError;

/// A request that can be copied before it is sent, so it can be sent again elsewhere.
pub trait ReplayRequest: Sized {
    /// A copy of the request, or `None` when it cannot be copied.
    fn try_clone_request(&self) -> Option<Self>;
}

impl<B: Clone> ReplayRequest for http::Request<B> {
    fn try_clone_request(&self) -> Option<Self> {
        let mut r = http::Request::new(self.body().clone());
        *r.method_mut() = self.method().clone();
        *r.uri_mut() = self.uri().clone();
        *r.version_mut() = self.version();
        *r.headers_mut() = self.headers().clone();
        *r.extensions_mut() = self.extensions().clone();
        Some(r)
    }
}

/// Whether `err` is a replica failure before any response arrived (refused or reset
/// connection, connection closed before the response head, a transport timeout): nothing reached
/// the client yet, so another replica can serve the request from scratch. The default of
/// [`FailoverLayer`].
///
/// For LLM inference this is safe: generation has no side effect but its cost. The replica may
/// have begun the prefill, so a request that itself crashes replicas (a "query of death") is
/// tried on up to `max_retries` more; use [`never_sent`] where that matters more than
/// availability.
///
/// ```
/// use replica_router::error::{RouteError, NoReplicaReason};
/// use replica_router::health::failed_before_response;
/// use replica_router::replica::ReplicaId;
/// let reset = std::io::Error::from(std::io::ErrorKind::ConnectionReset);
/// assert!(failed_before_response(&RouteError::backend(ReplicaId::new("a").unwrap(), reset)));
/// let none = RouteError::NoReplica { reason: NoReplicaReason::NoneEligible };
/// assert!(!failed_before_response(&none));
/// ```
pub fn failed_before_response(err: &RouteError) -> bool {
    matches!(err, RouteError::Backend { .. })
}

/// Whether `err` says the request never reached its replica: a backend error caused by a
/// refused connection (or, with feature `http-backend`, any connect failure of the HTTP client,
/// timeouts included).
///
/// ```
/// use replica_router::error::RouteError;
/// use replica_router::health::never_sent;
/// use replica_router::replica::ReplicaId;
/// let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
/// assert!(never_sent(&RouteError::backend(ReplicaId::new("a").unwrap(), refused)));
/// let reset = std::io::Error::from(std::io::ErrorKind::ConnectionReset);
/// assert!(!never_sent(&RouteError::backend(ReplicaId::new("a").unwrap(), reset)));
/// ```
pub fn never_sent(err: &RouteError) -> bool {
    let RouteError::Backend { source, .. } = err else {
        return false;
    };
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(source.as_ref());
    while let Some(e) = cur {
        #[cfg(feature = "http-backend")]
        if e.downcast_ref::<hyper_util::client::legacy::Error>()
            .is_some_and(|h| h.is_connect())
        {
            return true;
        }
        if e.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::ConnectionRefused)
        {
            return true;
        }
        cur = e.source();
    }
    false
}
