//! The [`Backend`] trait: what a replica can tell the router beyond serving requests.
//!
//! A replica serves requests as a tower [`Service`](tower::Service). On top of that it may answer
//! health probes and report the load it knows better than the router does (requests running and
//! waiting inside the engine, KV-cache usage). Reports carry the instant they were observed so
//! consumers can ignore stale ones.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::time::Instant;

use crate::error::BoxError;

/// A boxed, sendable future, as the [`Backend`] methods return.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Load a replica reports about itself (for vLLM: `vllm:num_requests_running`,
/// `vllm:num_requests_waiting` and `vllm:kv_cache_usage_perc` from `/metrics`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LoadReport {
    /// Sequences the engine is running (in its continuous batch).
    pub running: u64,
    /// Requests queued inside the engine, not yet scheduled.
    pub waiting: u64,
    /// KV-cache usage as a fraction in `0.0..=1.0`, when the engine reports it.
    pub kv_usage: Option<f64>,
    /// When the report was observed (router clock).
    pub observed_at: Instant,
}

impl LoadReport {
    /// Whether the report is younger than `max_age` at `now`.
    pub fn is_fresh(&self, now: Instant, max_age: std::time::Duration) -> bool {
        now.saturating_duration_since(self.observed_at) <= max_age
    }
}

/// A replica as the router sees it, beyond its `Service` impl.
///
/// Both methods have defaults (always healthy, no load report), so any cloneable service becomes
/// a backend with an empty `impl Backend for MyService {}` or by wrapping it in
/// [`ServiceBackend`]. Futures are `'static` so probes can run on background tasks.
pub trait Backend: Clone + Send + Sync + 'static {
    /// Actively probes the replica (for HTTP replicas, `GET /health`). `Ok` means healthy.
    fn probe(&self) -> BoxFuture<'static, Result<(), BoxError>> {
        Box::pin(std::future::ready(Ok(())))
    }

    /// Fetches the replica's own load report, if it publishes one.
    fn load_report(&self) -> BoxFuture<'static, Result<Option<LoadReport>, BoxError>> {
        Box::pin(std::future::ready(Ok(None)))
    }
}

/// Wraps any cloneable `Service` as a [`Backend`] with the default probe and no load report.
///
/// ```
/// use replica_router::backend::{Backend, ServiceBackend};
/// let svc = tower::service_fn(|_req: http::Request<()>| async {
///     Ok::<_, std::convert::Infallible>(http::Response::new(()))
/// });
/// fn is_backend<B: Backend>(_: &B) {}
/// is_backend(&ServiceBackend::new(svc));
/// ```
#[derive(Debug, Clone)]
pub struct ServiceBackend<S> {
    inner: S,
}

impl<S> ServiceBackend<S> {
    /// Wraps `inner`.
    pub fn new(inner: S) -> Self {
        ServiceBackend { inner }
    }

    /// The wrapped service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S: Clone + Send + Sync + 'static> Backend for ServiceBackend<S> {}

impl<S, Req> tower::Service<Req> for ServiceBackend<S>
where
    S: tower::Service<Req>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        self.inner.call(req)
    }
}
