use std::sync::Arc;
use std::task::{Context, Poll};

use crate::error::RouteError;
use crate::future::RouteFuture;
use crate::health::deferred::Deferred;
use crate::health::future::{FailoverFuture, Retry};
use crate::health::ReplayRequest;
use crate::inflight::CompletionObserver;
use crate::inflight::CompletionObservers;
use crate::pool::Pool;
use crate::request::RouteRequest;

/// Registers an outlier detector's observer on each request; made by
/// [`OutlierDetectionLayer`](super::OutlierDetectionLayer).
#[derive(Clone)]
pub struct OutlierDetection<S> {
    inner: S,
    observer: Arc<dyn CompletionObserver>,
}

impl<S: std::fmt::Debug> std::fmt::Debug for OutlierDetection<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OutlierDetection")
            .field("inner", &self.inner)
            .finish()
    }
}

impl<S> OutlierDetection<S> {
    pub(crate) fn new(inner: S, observer: Arc<dyn CompletionObserver>) -> Self {
        OutlierDetection { inner, observer }
    }
}

impl<S, Req> tower::Service<Req> for OutlierDetection<S>
where
    S: tower::Service<Req>,
    S::Error: Into<RouteError>,
    Req: RouteRequest,
{
    type Response = S::Response;
    type Error = RouteError;
    type Future = RouteFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, mut req: Req) -> Self::Future {
        req.add_completion_observer(self.observer.clone());
        RouteFuture::new(self.inner.call(req))
    }
}

/// Retries never-sent requests on another replica; made by
/// [`FailoverLayer`](super::FailoverLayer).
#[derive(Debug)]
pub struct Failover<S, B> {
    inner: S,
    pool: Pool<B>,
    max_retries: usize,
    retry_if: fn(&RouteError) -> bool,
}

impl<S: Clone, B> Clone for Failover<S, B> {
    fn clone(&self) -> Self {
        Failover {
            inner: self.inner.clone(),
            pool: self.pool.clone(),
            max_retries: self.max_retries,
            retry_if: self.retry_if,
        }
    }
}

impl<S, B> Failover<S, B> {
    pub(crate) fn new(
        inner: S,
        pool: Pool<B>,
        max_retries: usize,
        retry_if: fn(&RouteError) -> bool,
    ) -> Self {
        Failover {
            inner,
            pool,
            max_retries,
            retry_if,
        }
    }
}

impl<S, B, Req> tower::Service<Req> for Failover<S, B>
where
    S: tower::Service<Req> + Clone,
    S::Error: Into<RouteError>,
    Req: RouteRequest + ReplayRequest,
{
    type Response = S::Response;
    type Error = RouteError;
    type Future = FailoverFuture<S, Req, B>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, mut req: Req) -> Self::Future {
        if self.max_retries == 0 {
            return FailoverFuture::new(self.inner.call(req), None, None);
        }
        // Observers registered above are told once, about the final attempt.
        let deferred = req
            .extensions_mut()
            .remove::<CompletionObservers>()
            .map(|o| Arc::new(Deferred::new(o)));
        if let Some(d) = &deferred {
            req.add_completion_observer(d.clone());
        }
        let spare = req.try_clone_request();
        let retry = spare.map(|spare| {
            Retry::new(
                spare,
                self.inner.clone(),
                self.pool.clone(),
                self.max_retries,
                self.retry_if,
            )
        });
        FailoverFuture::new(self.inner.call(req), retry, deferred)
    }
}
