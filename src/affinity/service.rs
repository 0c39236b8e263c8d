use std::ops::Deref;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use metrics::Counter;
use tokio::time::Instant;

use crate::affinity::future::{AffinityFuture, PinWrite, Waiting};
use crate::affinity::spread::TenantSpread;
use crate::affinity::{AffinityKey, DECISIONS_COUNTER, PIN_ERRORS_COUNTER, RING_REBUILDS_COUNTER};
use crate::context::{RouteContext, RouteKey};
use crate::decision::{Decision, DecisionReason};
use crate::error::{KeyKind, RouteError};
use crate::load::{Placement, SloAdvice, WorkPlan};
use crate::pick::no_replica;
use crate::pick::ring::{
    key_hash, place_bounded, place_least_loaded, BalanceFactor, Bound, LoadView,
    Placement as RingPlacement, Ring, SnapshotView,
};
use crate::pins::{PinError, PinFuture, PinTable};
use crate::pool::{LoadMeasure, Pool, PoolSnapshot};
use crate::prefix::PrefixHashes;
use crate::replica::ReplicaId;
use crate::request::RouteRequest;

/// Validated settings.
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    pub(crate) key: AffinityKey,
    pub(crate) factor: BalanceFactor,
    pub(crate) pinned_overload_factor: f64,
    pub(crate) pin_ttl: Duration,
    pub(crate) max_key_len: usize,
    pub(crate) measure: LoadMeasure,
    pub(crate) vnodes_per_weight: u32,
    pub(crate) placement: Placement,
}

/// Metric handles, registered once per layer.
pub(crate) struct Metrics {
    home: Counter,
    spill: Counter,
    failover: Counter,
    pub(crate) pin_errors: Counter,
    rebuilds: Counter,
}

impl Metrics {
    fn new() -> Self {
        Metrics {
            home: metrics::counter!(DECISIONS_COUNTER, "reason" => "home"),
            spill: metrics::counter!(DECISIONS_COUNTER, "reason" => "spill"),
            failover: metrics::counter!(DECISIONS_COUNTER, "reason" => "failover"),
            pin_errors: metrics::counter!(PIN_ERRORS_COUNTER),
            rebuilds: metrics::counter!(RING_REBUILDS_COUNTER),
        }
    }

    pub(crate) fn decision(&self, reason: DecisionReason) {
        match reason {
            DecisionReason::Home => self.home.increment(1),
            DecisionReason::Spill => self.spill.increment(1),
            DecisionReason::Failover => self.failover.increment(1),
            _ => {}
        }
    }
}

struct RingEntry {
    version: u64,
    ring: Ring,
}

/// State shared by an [`AffinityLayer`](super::AffinityLayer) and its services.
pub(crate) struct Shared<B> {
    pub(crate) pool: Pool<B>,
    pub(crate) settings: Settings,
    pub(crate) pins: Arc<dyn PinTable>,
    ring: ArcSwapOption<RingEntry>,
    pub(crate) spread: Option<TenantSpread>,
    pub(crate) metrics: Metrics,
    /// Seeds the weighted samples of predicted-TTFT placement.
    pub(crate) draws: std::sync::atomic::AtomicU64,
}

/// A decision and the pin write it needs, if that write is still pending.
pub(crate) struct Routed {
    pub(crate) decision: Decision,
    pub(crate) write: Option<PinWrite>,
    /// The work plan of the chosen replica (predicted-TTFT placement only).
    pub(crate) plan: Option<WorkPlan>,
}

impl Routed {
    /// Puts the decision (and the work plan) on the request; returns the pending pin write.
    pub(crate) fn apply<Req: RouteRequest>(self, req: &mut Req) -> Option<PinWrite> {
        req.set_decision(self.decision);
        if let Some(plan) = self.plan {
            req.extensions_mut().insert(plan);
        }
        self.write
    }
}

/// The key a request is placed by, and what the layer needs to place it.
pub(crate) struct Keyed {
    pub(crate) key: RouteKey,
    pub(crate) tenant: Option<RouteKey>,
    pub(crate) cost: f64,
    /// The shedding layer's advice, when one sits above: replicas it says to leave are avoided.
    pub(crate) advice: Option<SloAdvice>,
    /// The prompt's fingerprints (predicted-TTFT placement).
    pub(crate) prefix: Option<PrefixHashes>,
    /// The route context's estimated tokens.
    pub(crate) estimated_tokens: u64,
}

impl<B> Shared<B> {
    pub(crate) fn new(
        pool: Pool<B>,
        settings: Settings,
        pins: Arc<dyn PinTable>,
        spread: Option<TenantSpread>,
    ) -> Self {
        Shared {
            pool,
            settings,
            pins,
            ring: ArcSwapOption::empty(),
            spread,
            metrics: Metrics::new(),
            draws: std::sync::atomic::AtomicU64::new(0x5EED_7F7F),
        }
    }

    /// The affinity key of a request: `Ok(None)` when it has none (or an empty one).
    pub(crate) fn keyed(&self, ctx: Option<&RouteContext>) -> Result<Option<Keyed>, RouteError> {
        let Some(ctx) = ctx else { return Ok(None) };
        fn pick(k: &Option<RouteKey>, kind: KeyKind) -> Option<(&RouteKey, KeyKind)> {
            k.as_ref()
                .filter(|k| !k.as_bytes().is_empty())
                .map(|k| (k, kind))
        }
        let found = match self.settings.key {
            AffinityKey::Session => pick(&ctx.session, KeyKind::Session),
            AffinityKey::User => pick(&ctx.user, KeyKind::User),
            AffinityKey::SessionThenUser => {
                pick(&ctx.session, KeyKind::Session).or_else(|| pick(&ctx.user, KeyKind::User))
            }
        };
        let Some((key, kind)) = found else {
            return Ok(None);
        };
        if key.as_bytes().len() > self.settings.max_key_len {
            return Err(RouteError::InvalidKey {
                kind,
                detail: "longer than the affinity layer's maximum",
            });
        }
        // Client-supplied: clamped like the in-flight count it is compared with.
        let estimated_tokens = ctx
            .estimated_tokens
            .min(crate::inflight::MAX_COUNTED_TOKENS);
        let cost = match self.settings.measure {
            LoadMeasure::InFlightRequests => 1.0,
            LoadMeasure::InFlightTokens => estimated_tokens.max(1) as f64,
        };
        let tenant = if self.spread.is_some() {
            ctx.tenant.clone()
        } else {
            None
        };
        Ok(Some(Keyed {
            key: key.clone(),
            tenant,
            cost,
            advice: None,
            prefix: ctx.prefix.clone(),
            estimated_tokens,
        }))
    }

    /// Runs `f` on the ring of `snapshot`'s membership, rebuilding it if the version changed.
    pub(crate) fn with_ring<T>(&self, snapshot: &PoolSnapshot<B>, f: impl FnOnce(&Ring) -> T) -> T {
        let version = snapshot.version();
        {
            let current = self.ring.load();
            if let Some(entry) = current.deref() {
                if entry.version == version {
                    return f(&entry.ring);
                }
            }
        }
        let built = Arc::new(RingEntry {
            version,
            ring: Ring::from_snapshot(snapshot, self.settings.vnodes_per_weight),
        });
        self.metrics.rebuilds.increment(1);
        // Never replace a newer ring with an older one (two requests may race across a change).
        self.ring.rcu(|cur| match cur {
            Some(e) if e.version > version => Some(e.clone()),
            _ => Some(built.clone()),
        });
        f(&built.ring)
    }

    /// Walks the ring from the key: the first eligible replica with room (and, with a tenant
    /// cap, within the cap), else within the bound ignoring the cap, else the least loaded.
    pub(crate) fn place(
        &self,
        snapshot: &PoolSnapshot<B>,
        view: &SnapshotView<'_, B>,
        bound: &Bound,
        keyed: &Keyed,
        exclude: Option<usize>,
    ) -> Option<RingPlacement> {
        let hash = key_hash(keyed.key.as_bytes());
        let version = snapshot.version();
        // Replicas the shedding layer says to leave (over the wait budget, under its sticky
        // policy) are avoided while another will do; the final fallback ignores the advice.
        let advised = |i: usize| {
            keyed
                .advice
                .as_ref()
                .is_none_or(|a| !a.should_leave_home(version, i))
        };
        let allowed = |i: usize| Some(i) != exclude && advised(i);
        let any = |i: usize| Some(i) != exclude;
        self.with_ring(snapshot, |ring| {
            if let (Some(spread), Some(tenant)) = (&self.spread, &keyed.tenant) {
                let bucket = spread.bucket(tenant.as_bytes());
                let mut guard = spread.lock(snapshot, Instant::now());
                let total = guard.total(bucket);
                let placed = place_bounded(ring, hash, bound, view, |i| {
                    allowed(i) && guard.allows(bucket, total, i)
                })
                .or_else(|| place_bounded(ring, hash, bound, view, allowed))
                .or_else(|| place_least_loaded(ring, hash, bound, view, allowed))
                .or_else(|| place_least_loaded(ring, hash, bound, view, any));
                if let Some(p) = placed {
                    guard.record(bucket, p.replica);
                }
                placed
            } else {
                place_bounded(ring, hash, bound, view, allowed)
                    .or_else(|| place_least_loaded(ring, hash, bound, view, allowed))
                    .or_else(|| place_least_loaded(ring, hash, bound, view, any))
            }
        })
    }

    /// The load bound of one decision over `view` (an error when no replica can take work).
    pub(crate) fn bound(
        &self,
        snap: &PoolSnapshot<B>,
        view: &SnapshotView<'_, B>,
        keyed: &Keyed,
    ) -> Result<Bound, RouteError> {
        Bound::over(view, snap.len(), self.settings.factor, keyed.cost)
            .ok_or_else(|| no_replica(snap))
    }

    /// The pin lookup's answer: whether the pin table answered (a failed lookup is counted,
    /// and its session's placement is not written back), and the pin.
    pub(crate) fn read_pin(
        &self,
        pinned: Result<Option<ReplicaId>, PinError>,
    ) -> (bool, Option<ReplicaId>) {
        match pinned {
            Ok(p) => (true, p),
            Err(_) => {
                self.metrics.pin_errors.increment(1);
                (false, None)
            }
        }
    }

    /// Decides where a keyed request goes, given what the pin table said, and starts the pin
    /// write.
    ///
    /// - Pinned to an eligible replica: stay (reason `Home`), unless it is past
    ///   `pinned_overload_factor x` the load bound; then walk on (`Spill`).
    /// - Pinned to a replica that is gone, unhealthy, ejected or draining: walk the ring from
    ///   the key (`Failover`).
    /// - No pin, or the pin table failed: walk the ring from the key (`Home`, `Spill`, or
    ///   `Failover` when the ring home itself is not eligible).
    pub(crate) fn decide(
        &self,
        keyed: &Keyed,
        pinned: Result<Option<ReplicaId>, PinError>,
    ) -> Result<Routed, RouteError> {
        if let Placement::PredictedTtft(ttft) = &self.settings.placement {
            return self.decide_ttft(keyed, pinned, ttft);
        }
        let snapshot = self.pool.load();
        let snap: &PoolSnapshot<B> = &snapshot;
        let view = SnapshotView::new(snap, self.settings.measure);
        let bound = self.bound(snap, &view, keyed)?;
        let (store_up, pinned) = self.read_pin(pinned);
        let seen = pinned.clone();
        let (index, reason) = match pinned.as_ref().map(|id| snap.get(id.as_str())) {
            Some(Some((i, r))) if r.state().is_eligible() => {
                let cap = self.settings.pinned_overload_factor * bound.capacity(view.weight(i));
                let leave = keyed
                    .advice
                    .as_ref()
                    .is_some_and(|a| a.should_leave_home(snap.version(), i));
                if !leave && view.load(i) + bound.cost() <= cap {
                    (i, DecisionReason::Home)
                } else {
                    // Leaving for the SLO only pays if the new replica is not over it too.
                    let worth = |j: usize| {
                        !leave
                            || keyed
                                .advice
                                .as_ref()
                                .is_none_or(|a| !a.should_leave_home(snap.version(), j))
                    };
                    match self.place(snap, &view, &bound, keyed, Some(i)) {
                        Some(p) if worth(p.replica) => (p.replica, DecisionReason::Spill),
                        _ => (i, DecisionReason::Home),
                    }
                }
            }
            Some(_) => {
                let p = self
                    .place(snap, &view, &bound, keyed, None)
                    .ok_or_else(|| no_replica(snap))?;
                (p.replica, DecisionReason::Failover)
            }
            None => {
                let p = self
                    .place(snap, &view, &bound, keyed, None)
                    .ok_or_else(|| no_replica(snap))?;
                (p.replica, p.reason)
            }
        };
        self.metrics.decision(reason);
        let id = snap.replicas()[index].id().clone();
        let decision = Decision::at_slot(id.clone(), reason, snap.version(), index);
        let write = if store_up {
            self.pin(keyed.key.clone(), seen, id)
        } else {
            None
        };
        Ok(Routed {
            decision,
            write,
            plan: None,
        })
    }

    /// Starts writing the pin `key -> id`; `None` when the write is done (or failed, counted).
    /// `seen` is what the lookup said.
    pub(crate) fn pin(
        &self,
        key: RouteKey,
        seen: Option<ReplicaId>,
        id: ReplicaId,
    ) -> Option<PinWrite> {
        match self
            .pins
            .clone()
            .pin_after_owned(key, seen, id, self.settings.pin_ttl)
        {
            PinFuture::Ready(Some(Ok(()))) => None,
            PinFuture::Ready(_) => {
                self.metrics.pin_errors.increment(1);
                None
            }
            pending => Some(PinWrite::new(pending, self.metrics.pin_errors.clone())),
        }
    }

    /// A request that arrives decided with reason `Failover` (a
    /// [`FailoverLayer`](crate::health::FailoverLayer) retry after its replica failed): its
    /// session moves to the new replica, so the next turns go there as `Home`.
    pub(crate) fn repin_failover(
        &self,
        ctx: Option<&RouteContext>,
        to: &Decision,
    ) -> Option<PinWrite> {
        let keyed = self.keyed(ctx).ok().flatten()?;
        self.metrics.decision(DecisionReason::Failover);
        // The failover layer moved the request: pin unconditionally.
        match self
            .pins
            .clone()
            .pin_owned(keyed.key, to.replica().clone(), self.settings.pin_ttl)
        {
            PinFuture::Ready(Some(Ok(()))) => None,
            PinFuture::Ready(_) => {
                self.metrics.pin_errors.increment(1);
                None
            }
            pending => Some(PinWrite::new(pending, self.metrics.pin_errors.clone())),
        }
    }
}

/// Session affinity with bounded loads; made by [`AffinityLayer`](super::AffinityLayer).
pub struct Affinity<S, B> {
    inner: S,
    shared: Arc<Shared<B>>,
}

impl<S: Clone, B> Clone for Affinity<S, B> {
    fn clone(&self) -> Self {
        Affinity {
            inner: self.inner.clone(),
            shared: self.shared.clone(),
        }
    }
}

impl<S: std::fmt::Debug, B> std::fmt::Debug for Affinity<S, B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Affinity")
            .field("inner", &self.inner)
            .field("settings", &self.shared.settings)
            .finish()
    }
}

impl<S, B> Affinity<S, B> {
    pub(crate) fn new(inner: S, shared: Arc<Shared<B>>) -> Self {
        Affinity { inner, shared }
    }

    /// The wrapped service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S, B, Req> tower::Service<Req> for Affinity<S, B>
where
    S: tower::Service<Req> + Clone,
    S::Error: Into<RouteError>,
    Req: RouteRequest,
{
    type Response = S::Response;
    type Error = RouteError;
    type Future = AffinityFuture<S, Req, B>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, mut req: Req) -> Self::Future {
        if let Some(d) = req.decision() {
            let write = if d.reason() == DecisionReason::Failover {
                self.shared.repin_failover(req.route_context(), d)
            } else {
                None
            };
            return AffinityFuture::inner(self.inner.call(req), write);
        }
        let keyed = match self.shared.keyed(req.route_context()) {
            Ok(Some(mut k)) => {
                k.advice = req.extensions().get::<SloAdvice>().cloned();
                k
            }
            Ok(None) => return AffinityFuture::inner(self.inner.call(req), None),
            Err(e) => return AffinityFuture::failed(e),
        };
        match self.shared.pins.clone().get_owned(keyed.key.clone()) {
            PinFuture::Ready(pinned) => {
                let pinned = pinned.expect("a ready pin lookup holds its answer");
                match self.shared.decide(&keyed, pinned) {
                    Ok(routed) => {
                        let write = routed.apply(&mut req);
                        AffinityFuture::inner(self.inner.call(req), write)
                    }
                    Err(e) => AffinityFuture::failed(e),
                }
            }
            pending => {
                // The lookup is remote: keep the readied service for later, leave a clone here.
                let clone = self.inner.clone();
                let service = std::mem::replace(&mut self.inner, clone);
                AffinityFuture::lookup(
                    pending,
                    Waiting {
                        service,
                        req,
                        keyed,
                        shared: self.shared.clone(),
                    },
                )
            }
        }
    }
}
