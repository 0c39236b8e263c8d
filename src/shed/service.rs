use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::time::Instant;

use crate::context::Priority;
use crate::error::RouteError;
use crate::inflight::CompletionObserver;
use crate::request::RouteRequest;
use crate::shed::future::ShedFuture;
use crate::shed::queue::{lane, Push, Waiter};
use crate::shed::{Shared, Verdict};

/// SLO shedding in front of `S`; made by [`ShedLayer`](super::ShedLayer).
#[derive(Debug)]
pub struct Shed<S, B> {
    inner: S,
    shared: Arc<Shared<B>>,
}

impl<S: Clone, B> Clone for Shed<S, B> {
    fn clone(&self) -> Self {
        Shed {
            inner: self.inner.clone(),
            shared: self.shared.clone(),
        }
    }
}

impl<S, B> Shed<S, B> {
    pub(crate) fn from_shared(inner: S, shared: Arc<Shared<B>>) -> Self {
        Shed { inner, shared }
    }

    /// Requests waiting in the admission queue now.
    pub fn queue_len(&self) -> usize {
        self.shared.queue.as_ref().map_or(0, |(q, _)| q.len())
    }
}

/// Registers the queue's wake-up on an admitted request.
pub(crate) fn on_admit<B, Req: RouteRequest>(shared: &Shared<B>, req: &mut Req) {
    if let Some(n) = &shared.notifier {
        req.add_completion_observer(n.clone() as Arc<dyn CompletionObserver>);
    }
}

impl<S, B, Req> tower::Service<Req> for Shed<S, B>
where
    S: tower::Service<Req> + Clone,
    S::Error: Into<RouteError>,
    Req: RouteRequest,
    B: Send + Sync + 'static,
{
    type Response = S::Response;
    type Error = RouteError;
    type Future = ShedFuture<S, Req, B>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, mut req: Req) -> Self::Future {
        let now = Instant::now();
        let priority = req
            .route_context()
            .map_or(Priority::default(), |c| c.priority);
        let verdict = self.shared.evaluate(&mut req, priority, now);
        let queue = self.shared.queue.clone();
        let Some((queue, settings)) = queue else {
            return match verdict {
                Verdict::Admit { wait } => {
                    self.shared.admitted(now, wait);
                    ShedFuture::admitted(self.inner.call(req))
                }
                Verdict::Over { best } => {
                    ShedFuture::failed(self.shared.shed("over_budget", priority, best, now))
                }
            };
        };
        // Requests already waiting with this priority or higher go first.
        let behind = queue.highest().is_some_and(|h| lane(h) >= lane(priority));
        if let (Verdict::Admit { wait }, false) = (verdict, behind) {
            self.shared.admitted(now, wait);
            on_admit(&self.shared, &mut req);
            return ShedFuture::admitted(self.inner.call(req));
        }
        let waiter = Waiter::new(priority);
        match queue.push(&waiter) {
            Push::Queued | Push::Evicted => {}
            Push::Full => {
                let best = match verdict {
                    Verdict::Over { best } => best,
                    Verdict::Admit { .. } => self.shared.best_wait(now),
                };
                return ShedFuture::failed(self.shared.shed("queue_full", priority, best, now));
            }
        }
        // The head may be able to go now (this request queued behind it with room available).
        queue.notify_head();
        // Take the readied service into the future; keep a clone to ready for the next call.
        let clone = self.inner.clone();
        let svc = std::mem::replace(&mut self.inner, clone);
        ShedFuture::queued(
            self.shared.clone(),
            waiter,
            svc,
            req,
            priority,
            now,
            now + settings.max_wait,
            settings.recheck,
        )
    }
}
