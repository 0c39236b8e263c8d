use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use rand::rngs::SmallRng;

use crate::decision::{Decision, DecisionReason};
use crate::error::RouteError;
use crate::future::RouteFuture;
use crate::load::predict::{push_indexed, Candidates, TtftRequest};
use crate::load::{Placement, TtftPlacement, WorkPlan};
use crate::pick::{least_loaded_scan, no_replica, pick_two_choices};
use crate::pool::{LoadMeasure, Pool, PoolSnapshot};
use crate::request::RouteRequest;
use crate::rng::RngSeed;

/// A picking policy: what a picking layer does to a request no outer layer has decided yet.
///
/// [`Picking`] is the one tower service every picking layer of this module builds: it forwards
/// readiness to the inner service and, for a request without a [`Decision`], asks its picker.
/// Implement it to write a picking policy of your own.
pub trait Pick {
    /// Records a decision (and whatever else the policy writes, such as a work plan) on `req`,
    /// which carries none yet; an error fails the request.
    fn decide<Req: RouteRequest>(&mut self, req: &mut Req) -> Result<(), RouteError>;
}

/// The service of a picking layer: `picker` decides requests that carry no decision, then
/// `inner` (usually [`Dispatch`](crate::dispatch::Dispatch)) sends them.
#[derive(Debug, Clone)]
pub struct Picking<S, P> {
    inner: S,
    picker: P,
}

impl<S, P> Picking<S, P> {
    /// Wraps `inner`, deciding with `picker`.
    pub fn from_parts(inner: S, picker: P) -> Self {
        Picking { inner, picker }
    }

    /// The picking policy.
    pub fn picker(&self) -> &P {
        &self.picker
    }

    /// The picking policy, mutably.
    pub fn picker_mut(&mut self) -> &mut P {
        &mut self.picker
    }
}

impl<S, P, Req> tower::Service<Req> for Picking<S, P>
where
    S: tower::Service<Req>,
    S::Error: Into<RouteError>,
    P: Pick,
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
            if let Err(e) = self.picker.decide(&mut req) {
                return RouteFuture::failed(e);
            }
        }
        RouteFuture::new(self.inner.call(req))
    }
}

/// Weighted least-in-flight picking; made by [`LeastInFlightLayer`](super::LeastInFlightLayer).
pub type LeastInFlight<S, B> = Picking<S, LeastInFlightPicker<B>>;

/// Round-robin picking; made by [`RoundRobinLayer`](super::RoundRobinLayer).
pub type RoundRobin<S, B> = Picking<S, RoundRobinPicker<B>>;

/// The policy of [`LeastInFlight`]: the less loaded of two replicas sampled by weight, or the
/// least predicted TTFT under [`Placement::PredictedTtft`].
#[derive(Debug)]
pub struct LeastInFlightPicker<B> {
    pool: Pool<B>,
    measure: LoadMeasure,
    placement: Placement,
    seed: RngSeed,
    rng: SmallRng,
}

impl<B> Clone for LeastInFlightPicker<B> {
    fn clone(&self) -> Self {
        LeastInFlightPicker {
            pool: self.pool.clone(),
            measure: self.measure,
            placement: self.placement.clone(),
            seed: self.seed.clone(),
            rng: self.seed.fork(),
        }
    }
}

impl<B> LeastInFlightPicker<B> {
    /// Picks among `pool`'s replicas by `measure`, drawing from `seed`.
    pub fn new(pool: Pool<B>, measure: LoadMeasure, seed: RngSeed) -> Self {
        let rng = seed.fork();
        LeastInFlightPicker {
            pool,
            measure,
            placement: Placement::Load,
            seed,
            rng,
        }
    }

    /// Picks a replica by load alone (two weighted samples, the less loaded).
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

    /// Picks by predicted TTFT, returning the decision and the work plan to count.
    fn pick_by_ttft(
        pool: &Pool<B>,
        rng: &mut SmallRng,
        tp: &TtftPlacement,
        ctx: Option<&crate::context::RouteContext>,
    ) -> Result<(Decision, WorkPlan), RouteError> {
        let snap = pool.load();
        let r = tp.request(ctx);
        let (i, unc) = pick_ttft(&snap, tp, &r, rng).ok_or_else(|| no_replica(&snap))?;
        let replica = &snap.replicas()[i];
        let plan = tp.record(&r, replica, unc);
        let d = Decision::at_slot(
            replica.id().clone(),
            DecisionReason::LeastLoaded,
            snap.version(),
            i,
        );
        Ok((d, plan))
    }
}

impl<B> Pick for LeastInFlightPicker<B> {
    fn decide<Req: RouteRequest>(&mut self, req: &mut Req) -> Result<(), RouteError> {
        if let Placement::PredictedTtft(tp) = &self.placement {
            let (d, plan) = Self::pick_by_ttft(&self.pool, &mut self.rng, tp, req.route_context())?;
            req.set_decision(d);
            req.extensions_mut().insert(plan);
        } else {
            req.set_decision(self.pick()?);
        }
        Ok(())
    }
}

impl<S, B> LeastInFlight<S, B> {
    /// Wraps `inner`, picking among `pool`'s replicas.
    pub fn new(inner: S, pool: Pool<B>, measure: LoadMeasure, seed: RngSeed) -> Self {
        Picking::from_parts(inner, LeastInFlightPicker::new(pool, measure, seed))
    }

    /// The same service placing by `placement` (see [`LeastInFlightLayer::placement`](super::LeastInFlightLayer::placement)).
    pub fn with_placement(mut self, placement: Placement) -> Self {
        self.picker.placement = placement;
        self
    }

    /// Picks a replica for a request with no decision by load alone.
    pub fn pick(&mut self) -> Result<Decision, RouteError> {
        self.picker.pick()
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
    // Distinct samples: a draw that repeats one is retried (a bounded number of times), so two
    // samples compare two replicas even in a pool of two.
    let want = tp.sampled.clamp(1, Candidates::CAP / 2);
    let (mut got, mut draws) = (0, 0);
    while got < want && draws < 4 * want {
        draws += 1;
        if let Some(i) = snapshot.sample_weighted(rng) {
            if ok(i) && cands.push(i) {
                got += 1;
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

/// The policy of [`RoundRobin`]: the next eligible replica in turn; clones share the rotation.
#[derive(Debug)]
pub struct RoundRobinPicker<B> {
    pool: Pool<B>,
    next: Arc<AtomicUsize>,
}

impl<B> Clone for RoundRobinPicker<B> {
    fn clone(&self) -> Self {
        RoundRobinPicker {
            pool: self.pool.clone(),
            next: self.next.clone(),
        }
    }
}

impl<B> RoundRobinPicker<B> {
    /// Rotates over `pool`'s eligible replicas.
    pub fn new(pool: Pool<B>) -> Self {
        RoundRobinPicker {
            pool,
            next: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// The next eligible replica.
    pub fn pick(&self) -> Result<Decision, RouteError> {
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

impl<B> Pick for RoundRobinPicker<B> {
    fn decide<Req: RouteRequest>(&mut self, req: &mut Req) -> Result<(), RouteError> {
        req.set_decision(self.pick()?);
        Ok(())
    }
}

impl<S, B> RoundRobin<S, B> {
    /// Wraps `inner`, rotating over `pool`'s eligible replicas. Clones share the rotation.
    pub fn new(inner: S, pool: Pool<B>) -> Self {
        Picking::from_parts(inner, RoundRobinPicker::new(pool))
    }
}
