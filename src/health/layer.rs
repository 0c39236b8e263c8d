use std::sync::Arc;

use crate::error::RouteError;
use crate::health::service::{Failover, OutlierDetection};
use crate::health::{failed_before_response, OutlierDetector};
use crate::inflight::CompletionObserver;
use crate::pool::Pool;

/// Feeds every request's outcome to an [`OutlierDetector`].
///
/// Place it anywhere above [`Dispatch`](crate::dispatch::Dispatch); it only registers a
/// completion observer on each request.
#[derive(Clone)]
pub struct OutlierDetectionLayer {
    observer: Arc<dyn CompletionObserver>,
}

impl std::fmt::Debug for OutlierDetectionLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("OutlierDetectionLayer")
    }
}

impl OutlierDetectionLayer {
    /// Feeds `detector`.
    pub fn new<B: Send + Sync + 'static>(detector: &OutlierDetector<B>) -> Self {
        OutlierDetectionLayer {
            observer: detector.observer(),
        }
    }
}

impl<S> tower::Layer<S> for OutlierDetectionLayer {
    type Service = OutlierDetection<S>;

    fn layer(&self, inner: S) -> Self::Service {
        OutlierDetection::new(inner, self.observer.clone())
    }
}

/// Sends a request whose replica failed before any response arrived to another replica, up to
/// `max_retries` times.
///
/// Which errors are retried is [`failed_before_response`] by default (refused or reset
/// connections, a replica that died mid-prefill: the client has received nothing yet), or
/// [`never_sent`](super::never_sent) (only connections that were never made) with
/// [`retry_if`](Self::retry_if). A request whose response head arrived is never retried: its
/// tokens may already be on their way to the client. Requests must be copyable
/// ([`ReplayRequest`](super::ReplayRequest); for HTTP, a body that is `Clone`, such as
/// `Full<Bytes>`). The retry carries a [`Decision`](crate::decision::Decision) for the
/// least-loaded eligible replica not yet tried, with reason
/// [`Failover`](crate::decision::DecisionReason::Failover), so the picking layers below pass it
/// on. Place it above the picking layers (and above the [`OutlierDetectionLayer`], so every
/// attempt is observed):
///
/// ```text
/// quota -> shed -> failover -> outlier detection -> affinity -> least-in-flight -> dispatch
/// ```
///
/// Completion observers registered above this layer (a quota's token settlement, the admission
/// queue's wake-up) are told exactly once, about the final attempt: a never-sent failure that is
/// followed by a retry is not reported to them.
///
/// Metric: `replica_router_failover_retries_total`.
#[derive(Debug, Clone)]
pub struct FailoverLayer<B> {
    pool: Pool<B>,
    max_retries: usize,
    retry_if: fn(&RouteError) -> bool,
}

impl<B> FailoverLayer<B> {
    /// Retries requests that failed before any response, up to twice, on `pool`'s replicas.
    pub fn new(pool: Pool<B>) -> Self {
        FailoverLayer {
            pool,
            max_retries: 2,
            retry_if: failed_before_response,
        }
    }

    /// How many retries a request gets.
    pub fn max_retries(mut self, n: usize) -> Self {
        self.max_retries = n;
        self
    }

    /// Which errors to retry (default [`failed_before_response`]; [`never_sent`](super::never_sent) is stricter).
    pub fn retry_if(mut self, f: fn(&RouteError) -> bool) -> Self {
        self.retry_if = f;
        self
    }
}

impl<S, B> tower::Layer<S> for FailoverLayer<B> {
    type Service = Failover<S, B>;

    fn layer(&self, inner: S) -> Self::Service {
        Failover::new(inner, self.pool.clone(), self.max_retries, self.retry_if)
    }
}
