//! The request, backend and response types that put a [`MockEngine`] behind the crate's stack.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::sync::Notify;

use crate::{MockEngine, MockError, MockEvent, MockRequest, MockResponse};
use replica_router::backend::Backend;
use replica_router::decision::Decision;
use replica_router::inflight::{InFlightGuard, Outcome};
use replica_router::request::{RouteRequest, RouteResponse};

/// A non-HTTP request the routing layers can route: a [`MockRequest`] and the extensions the
/// layers read and write (route context, decision).
#[derive(Debug)]
pub struct SimRequest {
    extensions: http::Extensions,
    /// The request the engine serves.
    pub mock: MockRequest,
}

impl SimRequest {
    /// Wraps `mock` with empty extensions.
    pub fn new(mock: MockRequest) -> Self {
        SimRequest {
            extensions: http::Extensions::new(),
            mock,
        }
    }
}

impl RouteRequest for SimRequest {
    fn extensions(&self) -> &http::Extensions {
        &self.extensions
    }

    fn extensions_mut(&mut self) -> &mut http::Extensions {
        &mut self.extensions
    }
}

/// Why a simulated replica failed a request.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SimError {
    /// The replica was killed (the failure scenario); its requests and streams break.
    #[error("replica is down")]
    ReplicaDown,
    /// The engine refused the request or stopped.
    #[error(transparent)]
    Engine(#[from] MockError),
}

/// A replica of the simulation: a [`MockEngine`] that can be killed.
///
/// Killing it ([`kill`](Self::kill)) breaks every request waiting on it and every response
/// stream still open (they end with [`SimError::ReplicaDown`], which dispatch counts as a
/// failure) and fails new requests at once, as a crashed server would.
#[derive(Debug, Clone)]
pub struct SimBackend {
    engine: MockEngine,
    down: Arc<Down>,
}

/// Whether a replica is down, and the requests waiting to hear it.
///
/// (Not a `watch` channel: tokio's watch spreads its waiters over several notifiers chosen at
/// random, so the order in which they wake, and with it the whole run, would vary. `Notify`
/// wakes its waiters in order.)
#[derive(Debug, Default)]
struct Down {
    flag: AtomicBool,
    notify: Notify,
}

impl Down {
    fn is_down(&self) -> bool {
        self.flag.load(Ordering::Acquire)
    }

    /// Waits until the replica is down.
    async fn wait(&self) {
        let notified = self.notify.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if self.is_down() {
            return;
        }
        notified.await;
    }
}

impl SimBackend {
    /// Wraps `engine`.
    pub fn new(engine: MockEngine) -> Self {
        SimBackend {
            engine,
            down: Arc::new(Down::default()),
        }
    }

    /// The engine (its counters are the prefix-cache statistics of the run).
    pub fn engine(&self) -> &MockEngine {
        &self.engine
    }

    /// Kills the replica.
    pub fn kill(&self) {
        self.down.flag.store(true, Ordering::Release);
        self.down.notify.notify_waiters();
    }

    /// Whether the replica was killed.
    pub fn is_down(&self) -> bool {
        self.down.is_down()
    }
}

impl Backend for SimBackend {}

impl tower::Service<SimRequest> for SimBackend {
    type Response = SimResponse;
    type Error = SimError;
    type Future = Pin<Box<dyn Future<Output = Result<SimResponse, SimError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: SimRequest) -> Self::Future {
        let down = self.down.clone();
        if down.is_down() {
            return Box::pin(std::future::ready(Err(SimError::ReplicaDown)));
        }
        let call = tower::Service::call(&mut self.engine, req.mock);
        Box::pin(async move {
            tokio::select! {
                biased;
                () = down.wait() => Err(SimError::ReplicaDown),
                r = call => Ok(SimResponse { events: r?, down }),
            }
        })
    }
}

/// A replica's answer as it arrives: resolved at the first token for streamed requests.
#[derive(Debug)]
pub struct SimResponse {
    events: MockResponse,
    down: Arc<Down>,
}

impl RouteResponse for SimResponse {
    type Tracked = SimStream;

    fn is_failure(&self) -> bool {
        false
    }

    fn track(self, guard: InFlightGuard, extensions: http::Extensions) -> SimStream {
        SimStream {
            events: self.events,
            down: self.down,
            guard: Some(guard),
            extensions,
        }
    }
}

/// A response stream as the client sees it after dispatch: the engine's events, with the
/// request kept in flight on its replica until the last event (or a failure, or a drop).
#[derive(Debug)]
pub struct SimStream {
    events: MockResponse,
    down: Arc<Down>,
    guard: Option<InFlightGuard>,
    extensions: http::Extensions,
}

impl SimStream {
    /// The routing decision (which replica, and why).
    pub fn decision(&self) -> Option<&Decision> {
        self.extensions.get::<Decision>()
    }

    /// The next event; `Ok(None)` after [`MockEvent::Done`]. A killed replica ends the stream
    /// with [`SimError::ReplicaDown`] at its next event (running sequences produce one every
    /// engine step, so the client notices within a step, as it would a reset connection).
    pub async fn next_event(&mut self) -> Result<Option<MockEvent>, SimError> {
        if self.guard.is_none() {
            return Ok(None);
        }
        let next = self.events.next_event().await;
        if self.down.is_down() {
            self.end(Outcome::Failure);
            return Err(SimError::ReplicaDown);
        }
        match next {
            Some(MockEvent::Done(usage)) => {
                // What the engine had cached calibrates the router's guess (a gateway reads it
                // from `usage.prompt_tokens_details.cached_tokens`).
                if let Some(g) = self.guard.as_ref() {
                    g.observe_cached(u64::from(usage.cached_tokens));
                }
                self.end(Outcome::Success);
                Ok(Some(MockEvent::Done(usage)))
            }
            Some(token) => {
                if let Some(g) = self.guard.as_mut() {
                    g.on_first_data();
                }
                Ok(Some(token))
            }
            None => {
                self.end(Outcome::Failure);
                Err(SimError::Engine(MockError::Stopped))
            }
        }
    }

    fn end(&mut self, outcome: Outcome) {
        if let Some(mut g) = self.guard.take() {
            g.finish(outcome);
        }
    }
}
