//! The mock engine as a replica of the crate's pool: in-process routing simulations in virtual time.

use std::task::{Context, Poll};

use replica_router::backend::{Backend, BoxFuture, LoadReport};
use replica_router::decision::Decision;
use replica_router::error::BoxError;
use replica_router::inflight::{InFlightGuard, Outcome};
use replica_router::request::{RouteRequest, RouteResponse};

use super::engine::{MockEngine, MockEvent, MockRequest, MockResponse, MockUsage};
use super::error::MockError;

impl RouteRequest for MockRequest {
    fn extensions(&self) -> &http::Extensions {
        &self.extensions
    }

    fn extensions_mut(&mut self) -> &mut http::Extensions {
        &mut self.extensions
    }
}

/// A mock engine reports its own load, as vLLM does through `/metrics`: requests running and
/// waiting, and KV-cache usage.
impl Backend for MockEngine {
    fn load_report(&self) -> BoxFuture<'static, Result<Option<LoadReport>, BoxError>> {
        let s = self.stats();
        let report = LoadReport {
            running: s.running as u64,
            waiting: s.waiting as u64,
            kv_usage: Some(s.kv_usage),
            observed_at: tokio::time::Instant::now(),
        };
        Box::pin(std::future::ready(Ok(Some(report))))
    }
}

impl RouteResponse for MockResponse {
    type Tracked = RoutedResponse;

    fn is_failure(&self) -> bool {
        false
    }

    fn track(self, guard: InFlightGuard, extensions: http::Extensions) -> RoutedResponse {
        RoutedResponse {
            inner: self,
            guard: Some(guard),
            extensions,
        }
    }
}

/// A [`MockResponse`] that went through the routing stack: it says where it was routed and why,
/// and keeps its request in flight on that replica until the generation ends (or it is dropped).
#[derive(Debug)]
pub struct RoutedResponse {
    inner: MockResponse,
    guard: Option<InFlightGuard>,
    extensions: http::Extensions,
}

impl RoutedResponse {
    /// The routing decision (replica and reason).
    pub fn decision(&self) -> Option<&Decision> {
        self.extensions.get::<Decision>()
    }

    /// The request's extensions, moved here by dispatch (route context, decision, ...).
    pub fn extensions(&self) -> &http::Extensions {
        &self.extensions
    }

    /// Polls for the next event; the request leaves the replica's in-flight count at the last.
    pub fn poll_event(&mut self, cx: &mut Context<'_>) -> Poll<Option<MockEvent>> {
        let polled = self.inner.poll_event(cx);
        match &polled {
            Poll::Ready(Some(MockEvent::Done(_))) => self.end(Outcome::Success),
            Poll::Ready(Some(_)) => {
                if let Some(g) = self.guard.as_mut() {
                    g.on_first_data();
                }
            }
            Poll::Ready(None) => self.end(Outcome::Failure),
            _ => {}
        }
        polled
    }

    fn end(&mut self, outcome: Outcome) {
        if let Some(mut g) = self.guard.take() {
            g.finish(outcome);
        }
    }

    /// The next event, or `None` once the response has ended.
    pub async fn next_event(&mut self) -> Option<MockEvent> {
        std::future::poll_fn(|cx| self.poll_event(cx)).await
    }

    /// Waits for the end of the generation and returns its accounting.
    pub async fn finish(mut self) -> Result<MockUsage, MockError> {
        while let Some(e) = self.next_event().await {
            if let MockEvent::Done(u) = e {
                return Ok(u);
            }
        }
        Err(MockError::Stopped)
    }
}
