use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use rand::rngs::SmallRng;

use crate::decision::{Decision, DecisionReason};
use crate::error::RouteError;
use crate::future::RouteFuture;
use crate::load::predict::{push_indexed, Candidates, TtftRequest};
use crate::load::{Placement, TtftPlacement};
use crate::pick::{least_loaded_scan, no_replica, pick_two_choices};
use crate::pool::{LoadMeasure, Pool, PoolSnapshot};
use crate::request::RouteRequest;
use crate::rng::RngSeed;

/// Weighted least-in-flight picking; made by [`LeastInFlightLayer`](super::LeastInFlightLayer).
#[derive(Debug)]
pub struct LeastInFlight<S, B> {
    inner: S,
    pool: Pool<B>,
    measure: LoadMeasure,
    placement: Placement,
    seed: RngSeed,
    rng: SmallRng,
}

impl<S, B> LeastInFlight<S, B> {
    /// Wraps `inner`, picking among `pool`'s replicas.
    pub fn new(inner: S, pool: Pool<B>, measure: LoadMeasure, seed: RngSeed) -> Self {
        let rng = seed.fork();
        LeastInFlight {
            inner,
            pool,
            measure,
            placement: Placement::Load,
            seed,
            rng,
        }
    }

    /// The same service placing by `placement` (see [`LeastInFlightLayer::placement`](super::LeastInFlightLayer::placement)).
    pub fn with_placement(mut self, placement: Placement) -> Self {
        self.placement = placement;
        self
    }

    /// Picks a replica for a request with no decision; `None` when none is eligible.
    pub fn pick(&mut self) -> Result<Decision, RouteError> {
        let snap = self.pool.load();
        match pick_two_choices(&snap, self.measure, &mut self.rng) {
            Some(i) => Ok(Decision::at_slot(
                snap.replicas()[i].id().clone(),
                DecisionReason::LeastLoaded,
                snap.version(),
                i,
            )),
            None => Err(no_replica(&snap)),
        }
    }
}

impl<S: Clone, B> Clone for LeastInFlight<S, B> {
    fn clone(&self) -> Self {
        LeastInFlight {
            inner: self.inner.clone(),
            pool: self.pool.clone(),
            measure: self.measure,
            placement: self.placement.clone(),
            seed: self.seed.clone(),
            rng: self.seed.fork(),
        }
    }
}

impl<S, B, Req> tower::Service<Req> for LeastInFlight<S, B>
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
        if req.decision().is_none() {
            if let Placement::PredictedTtft(tp) = &self.placement {
                let picked = {
                    let snap = self.pool.load();
                    let r = tp.request(req.route_context());
                    pick_ttft(&snap, tp, &r, &mut self.rng)
                        .ok_or_else(|| no_replica(&snap))
                        .map(|(i, unc)| {
                            let replica = &snap.replicas()[i];
                            let plan = tp.record(&r, replica, unc);
                            let d = Decision::at_slot(
                                replica.id().clone(),
                                DecisionReason::LeastLoaded,
                                snap.version(),
                                i,
                            );
                            (d, plan)
                        })
                };
                match picked {
                    Ok((d, plan)) => {
                        req.set_decision(d);
                        req.extensions_mut().insert(plan);
                    }
                    Err(e) => return RouteFuture::failed(e),
                }
                return RouteFuture::new(self.inner.call(req));
            }
        }
        if let Err(e) = decide(&mut req, || self.pick()) {
            return RouteFuture::failed(e);
        }
        RouteFuture::new(self.inner.call(req))
    }
}

/// Keyless placement by predicted TTFT: the least predicted TTFT among `sampled` replicas drawn
/// by weight and the `indexed` replicas holding the longest prefix match. Returns the index and
/// the request's uncached tokens there.
pub fn pick_ttft<B, R: rand::Rng + ?Sized>(
    snapshot: &PoolSnapshot<B>,
    tp: &TtftPlacement,
    req: &TtftRequest<'_>,
    rng: &mut R,
) -> Option<(usize, u64)> {
    let replicas = snapshot.replicas();
    let ok = |i: usize| replicas[i].state().is_eligible();
    let mut cands = Candidates::new();
    for _ in 0..tp.sampled.clamp(1, Candidates::CAP / 2) {
        if let Some(i) = snapshot.sample_weighted(rng) {
            if ok(i) {
                cands.push(i);
            }
        }
    }
    push_indexed(tp, req, snapshot, ok, &mut cands);
    if cands.as_slice().is_empty() {
        cands.push(least_loaded_scan(snapshot, LoadMeasure::InFlightTokens)?);
    }
    let mut best: Option<(usize, f64, u64)> = None;
    for &i in cands.as_slice() {
        let (t, unc) = tp.predict(req, &replicas[i], false);
        if best.is_none_or(|(_, b, _)| t < b) {
            best = Some((i, t, unc));
        }
    }
    best.map(|(i, _, unc)| (i, unc))
}

/// Round-robin picking; made by [`RoundRobinLayer`](super::RoundRobinLayer).
#[derive(Debug)]
pub struct RoundRobin<S, B> {
    inner: S,
    pool: Pool<B>,
    next: Arc<AtomicUsize>,
}

impl<S: Clone, B> Clone for RoundRobin<S, B> {
    fn clone(&self) -> Self {
        RoundRobin {
            inner: self.inner.clone(),
            pool: self.pool.clone(),
            next: self.next.clone(),
        }
    }
}

impl<S, B> RoundRobin<S, B> {
    /// Wraps `inner`, rotating over `pool`'s eligible replicas. Clones share the rotation.
    pub fn new(inner: S, pool: Pool<B>) -> Self {
        RoundRobin {
            inner,
            pool,
            next: Arc::new(AtomicUsize::new(0)),
        }
    }

    fn pick(&self) -> Result<Decision, RouteError> {
        let snap = self.pool.load();
        let eligible = snap.eligible();
        for _ in 0..eligible.len() {
            let n = self.next.fetch_add(1, Ordering::Relaxed);
            let i = eligible[n % eligible.len()] as usize;
            let r = &snap.replicas()[i];
            if r.state().is_eligible() {
                return Ok(Decision::at_slot(
                    r.id().clone(),
                    DecisionReason::RoundRobin,
                    snap.version(),
                    i,
                ));
            }
        }
        Err(no_replica(&snap))
    }
}

impl<S, B, Req> tower::Service<Req> for RoundRobin<S, B>
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
        if let Err(e) = decide(&mut req, || self.pick()) {
            return RouteFuture::failed(e);
        }
        RouteFuture::new(self.inner.call(req))
    }
}

/// Records `pick()`'s decision on a request that has none yet; a request already decided by an
/// outer picking layer passes untouched.
fn decide<Req: RouteRequest>(
    req: &mut Req,
    pick: impl FnOnce() -> Result<Decision, RouteError>,
) -> Result<(), RouteError> {
    if req.decision().is_none() {
        req.set_decision(pick()?);
    }
    Ok(())
}
