use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use pin_project::{pin_project, pinned_drop};
use tokio::time::{Instant, Sleep};

use crate::context::Priority;
use crate::error::RouteError;
use crate::request::RouteRequest;
use crate::shed::queue::Waiter;
use crate::shed::service::on_admit;
use crate::shed::{Shared, Verdict};

/// The response future of [`Shed`](super::Shed): the inner call, a shed error, or a request
/// waiting in the admission queue.
#[pin_project(PinnedDrop)]
pub struct ShedFuture<S, Req, B>
where
    S: tower::Service<Req>,
{
    #[pin]
    call: Option<S::Future>,
    queued: Option<Pin<Box<Queued<S, Req, B>>>>,
    failed: Option<RouteError>,
}

#[pin_project]
struct Queued<S, Req, B> {
    shared: Arc<Shared<B>>,
    waiter: Arc<Waiter>,
    svc: Option<S>,
    req: Option<Req>,
    priority: Priority,
    enqueued_at: Instant,
    recheck_every: Duration,
    #[pin]
    deadline: Sleep,
    #[pin]
    recheck: Sleep,
}

impl<S, Req, B> std::fmt::Debug for ShedFuture<S, Req, B>
where
    S: tower::Service<Req>,
{
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShedFuture")
            .field("queued", &self.queued.is_some())
            .finish()
    }
}

impl<S, Req, B> ShedFuture<S, Req, B>
where
    S: tower::Service<Req>,
{
    pub(crate) fn admitted(fut: S::Future) -> Self {
        ShedFuture {
            call: Some(fut),
            queued: None,
            failed: None,
        }
    }

    pub(crate) fn failed(err: RouteError) -> Self {
        ShedFuture {
            call: None,
            queued: None,
            failed: Some(err),
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) fn queued(
        shared: Arc<Shared<B>>,
        waiter: Arc<Waiter>,
        svc: S,
        req: Req,
        priority: Priority,
        now: Instant,
        deadline: Instant,
        recheck_every: Duration,
    ) -> Self {
        ShedFuture {
            call: None,
            queued: Some(Box::pin(Queued {
                shared,
                waiter,
                svc: Some(svc),
                req: Some(req),
                priority,
                enqueued_at: now,
                recheck_every,
                deadline: tokio::time::sleep_until(deadline),
                recheck: tokio::time::sleep_until(now + recheck_every),
            })),
            failed: None,
        }
    }
}

enum Step<F> {
    Pending,
    Shed(RouteError),
    Call(F),
}

impl<S, Req, B> Queued<S, Req, B>
where
    S: tower::Service<Req>,
    Req: RouteRequest,
    B: Send + Sync + 'static,
{
    fn poll_wait(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Step<S::Future> {
        let mut this = self.project();
        let Some((queue, _)) = this.shared.queue.as_ref() else {
            return Step::Shed(RouteError::InvalidRequest("admission queue missing".into()));
        };
        this.waiter.register(cx.waker());
        if this.waiter.is_evicted() {
            let now = Instant::now();
            let best = this.shared.best_wait(now);
            return Step::Shed(this.shared.shed("evicted", *this.priority, best, now));
        }
        if this.deadline.as_mut().poll(cx).is_ready() {
            let now = Instant::now();
            if queue.remove(this.waiter) {
                queue.notify_head();
            }
            let best = this.shared.best_wait(now);
            return Step::Shed(this.shared.shed("queue_timeout", *this.priority, best, now));
        }
        if !queue.is_head(this.waiter) {
            return Step::Pending;
        }
        let now = Instant::now();
        let Some(req) = this.req.as_mut() else {
            return Step::Pending;
        };
        match this.shared.evaluate(req, *this.priority, now) {
            Verdict::Admit { wait } => {
                queue.remove(this.waiter);
                let queued_for = now.saturating_duration_since(*this.enqueued_at);
                metrics::histogram!("replica_router_admission_queue_wait_seconds")
                    .record(queued_for.as_secs_f64());
                this.shared.admitted(now, queued_for + wait);
                let (Some(mut svc), Some(mut req)) = (this.svc.take(), this.req.take()) else {
                    return Step::Pending;
                };
                on_admit(this.shared, &mut req);
                // The request is counted in flight during this call (dispatch counts it when
                // called), so the next head, woken below, sees this one's load.
                let fut = svc.call(req);
                queue.notify_head();
                Step::Call(fut)
            }
            Verdict::Over { .. } => {
                if this.recheck.is_elapsed() {
                    this.recheck
                        .as_mut()
                        .reset(now + (*this.recheck_every).max(Duration::from_millis(1)));
                }
                // Registers the timer; if it fired already, wake at once to check again.
                if this.recheck.as_mut().poll(cx).is_ready() {
                    cx.waker().wake_by_ref();
                }
                Step::Pending
            }
        }
    }
}

impl<S, Req, B> Future for ShedFuture<S, Req, B>
where
    S: tower::Service<Req>,
    S::Error: Into<RouteError>,
    Req: RouteRequest,
    B: Send + Sync + 'static,
{
    type Output = Result<S::Response, RouteError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        if let Some(fut) = this.call.as_mut().as_pin_mut() {
            return fut.poll(cx).map_err(Into::into);
        }
        if let Some(err) = this.failed.take() {
            return Poll::Ready(Err(err));
        }
        let queued = this
            .queued
            .as_mut()
            .expect("shed future polled after completion");
        match queued.as_mut().poll_wait(cx) {
            Step::Pending => Poll::Pending,
            Step::Shed(e) => {
                *this.queued = None;
                Poll::Ready(Err(e))
            }
            Step::Call(fut) => {
                *this.queued = None;
                this.call.set(Some(fut));
                match this.call.as_pin_mut() {
                    Some(fut) => fut.poll(cx).map_err(Into::into),
                    None => Poll::Pending,
                }
            }
        }
    }
}

#[pinned_drop]
impl<S, Req, B> PinnedDrop for ShedFuture<S, Req, B>
where
    S: tower::Service<Req>,
{
    fn drop(self: Pin<&mut Self>) {
        // A waiter dropped while queued (client gone): leave the queue, let the next one look.
        if let Some(q) = self.project().queued.take() {
            if let Some((queue, _)) = q.shared.queue.as_ref() {
                if queue.remove(&q.waiter) {
                    queue.notify_head();
                }
            }
        }
    }
}
