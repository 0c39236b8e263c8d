use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use pin_project::pin_project;
use tower::util::Oneshot;

use crate::decision::{Decision, DecisionReason};
use crate::error::RouteError;
use crate::health::deferred::Deferred;
use crate::health::ReplayRequest;
use crate::pool::{LoadMeasure, Pool};
use crate::replica::ReplicaId;
use crate::request::RouteRequest;

/// The response future of [`Failover`](super::Failover).
#[pin_project]
pub struct FailoverFuture<S, Req, B>
where
    S: tower::Service<Req>,
{
    #[pin]
    attempt: Attempt<S, Req>,
    retry: Option<Box<Retry<S, Req, B>>>,
    deferred: Option<Arc<Deferred>>,
}

pub(crate) struct Retry<S, Req, B> {
    spare: Option<Req>,
    svc: S,
    pool: Pool<B>,
    left: usize,
    retry_if: fn(&RouteError) -> bool,
    tried: Vec<ReplicaId>,
}

#[pin_project(project = AttemptProj)]
enum Attempt<S, Req>
where
    S: tower::Service<Req>,
{
    First(#[pin] S::Future),
    Again(#[pin] Oneshot<S, Req>),
}

impl<S, Req, B> std::fmt::Debug for FailoverFuture<S, Req, B>
where
    S: tower::Service<Req>,
{
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FailoverFuture")
    }
}

impl<S, Req, B> FailoverFuture<S, Req, B>
where
    S: tower::Service<Req>,
{
    pub(crate) fn new(
        first: S::Future,
        retry: Option<Box<Retry<S, Req, B>>>,
        deferred: Option<Arc<Deferred>>,
    ) -> Self {
        if retry.is_none() {
            if let Some(d) = &deferred {
                d.disarm();
            }
        }
        FailoverFuture {
            attempt: Attempt::First(first),
            retry,
            deferred,
        }
    }
}

impl<S, Req, B> Retry<S, Req, B> {
    pub(crate) fn new(
        spare: Req,
        svc: S,
        pool: Pool<B>,
        left: usize,
        retry_if: fn(&RouteError) -> bool,
    ) -> Box<Self> {
        Box::new(Retry {
            spare: Some(spare),
            svc,
            pool,
            left,
            retry_if,
            tried: Vec::new(),
        })
    }
}

impl<S, Req, B> Retry<S, Req, B>
where
    S: tower::Service<Req> + Clone,
    Req: RouteRequest + ReplayRequest,
{
    /// The next attempt for `err`, if it may and can be retried.
    fn next(&mut self, err: &RouteError) -> Option<Oneshot<S, Req>> {
        if self.left == 0 || !(self.retry_if)(err) {
            return None;
        }
        if let RouteError::Backend { replica, .. } = err {
            self.tried.push(replica.clone());
        }
        let snap = self.pool.load();
        let needed = self
            .spare
            .as_ref()
            .and_then(|r| r.route_context())
            .map_or(0, |c| c.context_tokens);
        let mut best: Option<(usize, f64)> = None;
        for (i, r) in snap.replicas().iter().enumerate() {
            if !r.state().is_eligible()
                || !r.spec().fits(needed)
                || self.tried.iter().any(|t| t == r.id())
            {
                continue;
            }
            let load = snap.weighted_load(i, LoadMeasure::default());
            if best.is_none_or(|(_, l)| load < l) {
                best = Some((i, load));
            }
        }
        let (i, _) = best?;
        let mut req = self.spare.take()?;
        self.spare = req.try_clone_request();
        req.set_decision(Decision::at_slot(
            snap.replicas()[i].id().clone(),
            DecisionReason::Failover,
            snap.version(),
            i,
        ));
        self.left -= 1;
        metrics::counter!("replica_router_failover_retries_total").increment(1);
        Some(Oneshot::new(self.svc.clone(), req))
    }
}

impl<S, Req, B> Future for FailoverFuture<S, Req, B>
where
    S: tower::Service<Req> + Clone,
    S::Error: Into<RouteError>,
    Req: RouteRequest + ReplayRequest,
{
    type Output = Result<S::Response, RouteError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            let result = match this.attempt.as_mut().project() {
                AttemptProj::First(f) => ready!(f.poll(cx)),
                AttemptProj::Again(f) => ready!(f.poll(cx)),
            };
            let err = match result {
                Ok(resp) => return Poll::Ready(Ok(resp)),
                Err(e) => e.into(),
            };
            match this.retry.as_mut().and_then(|r| r.next(&err)) {
                Some(next) => {
                    if let Some(d) = this.deferred.as_ref() {
                        d.discard();
                        if this
                            .retry
                            .as_ref()
                            .is_none_or(|r| r.left == 0 || r.spare.is_none())
                        {
                            d.disarm();
                        }
                    }
                    this.attempt.set(Attempt::Again(next));
                }
                None => {
                    if let Some(d) = this.deferred.as_ref() {
                        d.flush();
                    }
                    return Poll::Ready(Err(err));
                }
            }
        }
    }
}
