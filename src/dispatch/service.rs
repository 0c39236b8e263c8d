use std::sync::Arc;
use std::task::{Context, Poll};

use rand::rngs::SmallRng;

use crate::backend::Backend;
use crate::decision::{Decision, DecisionReason};
use crate::dispatch::future::DispatchFuture;
use crate::error::{BoxError, NoReplicaReason, RouteError};
use crate::inflight::CompletionObservers;
use crate::inflight::InFlightGuard;
use crate::load::work::WorkPlan;
use crate::pick::{least_loaded_scan, no_replica, pick_two_choices};
use crate::pool::{LoadMeasure, Pool, PoolSnapshot, Replica};
use crate::request::{RouteRequest, RouteResponse};
use crate::rng::RngSeed;

/// How many times dispatch re-picks when the decided replica cannot take the request.
const MAX_REDIRECTS: usize = 3;

/// Sends each request to its decided replica. See the [module docs](crate::dispatch).
#[derive(Debug)]
pub struct Dispatch<B> {
    pool: Pool<B>,
    seed: RngSeed,
    rng: SmallRng,
    extensions_to_backend: bool,
}

impl<B> Clone for Dispatch<B> {
    fn clone(&self) -> Self {
        Dispatch {
            pool: self.pool.clone(),
            seed: self.seed.clone(),
            rng: self.seed.fork(),
            extensions_to_backend: self.extensions_to_backend,
        }
    }
}

impl<B> Dispatch<B> {
    /// Dispatches to `pool`'s replicas.
    pub fn new(pool: Pool<B>) -> Self {
        Dispatch::with_seed(pool, RngSeed::from_entropy())
    }

    /// Dispatches to `pool`'s replicas, with a seeded RNG for its fallback picks.
    pub fn with_seed(pool: Pool<B>, seed: RngSeed) -> Self {
        let rng = seed.fork();
        Dispatch {
            pool,
            seed,
            rng,
            extensions_to_backend: false,
        }
    }

    /// Where the request's extensions go. By default (`false`) they move to the response: the
    /// caller finds the [`Decision`], the route context and anything else it attached on the
    /// response, at no cost (HTTP clients ignore request extensions anyway). With `true` the
    /// backend receives them and the response gets a fresh copy of the decision (a few
    /// allocations per request); use it for in-process backends that read extensions.
    pub fn extensions_to_backend(mut self, yes: bool) -> Self {
        self.extensions_to_backend = yes;
        self
    }

    /// The pool.
    pub fn pool(&self) -> &Pool<B> {
        &self.pool
    }
}

fn locate<'s, B>(snap: &'s PoolSnapshot<B>, decision: &Decision) -> Option<&'s Arc<Replica<B>>> {
    if let Some((version, i)) = decision.slot() {
        if version == snap.version() {
            let r = snap.replicas().get(i as usize)?;
            if r.id() == decision.replica() {
                return Some(r);
            }
        }
    }
    snap.get(decision.replica().as_str()).map(|(_, r)| r)
}

impl<B, Req> tower::Service<Req> for Dispatch<B>
where
    B: Backend + tower::Service<Req>,
    B::Response: RouteResponse,
    B::Error: Into<BoxError>,
    Req: RouteRequest,
{
    type Response = <B::Response as RouteResponse>::Tracked;
    type Error = RouteError;
    type Future = DispatchFuture<B, Req>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // Readiness is per replica and checked in the response future.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut req: Req) -> Self::Future {
        let snap = self.pool.load();
        let mut decision = req.decision().cloned();
        let mut observers = req.extensions_mut().remove::<CompletionObservers>();
        let mut target = decision.as_ref().and_then(|d| locate(&snap, d).cloned());
        // The work plan was made for the decided replica; a re-pick counts the whole prompt.
        let mut plan = req.extensions().get::<WorkPlan>().copied();
        for attempt in 0..=MAX_REDIRECTS {
            let replica = match target.take() {
                Some(r) => r,
                None => {
                    plan = None;
                    let pick = if attempt == 0 {
                        pick_two_choices(&snap, LoadMeasure::default(), &mut self.rng)
                    } else {
                        least_loaded_scan(&snap, LoadMeasure::default())
                    };
                    let Some(i) = pick else { break };
                    let r = snap.replicas()[i].clone();
                    let reason = if decision.is_some() {
                        DecisionReason::Redirected
                    } else {
                        DecisionReason::LeastLoaded
                    };
                    decision = Some(Decision::at_slot(r.id().clone(), reason, snap.version(), i));
                    r
                }
            };
            let guard = InFlightGuard::begin(replica.state().clone(), req.route_context(), plan);
            let Some(mut guard) = guard else {
                // Started draining after the pick: choose again.
                if let Some(d) = decision.as_mut() {
                    d.set_reason(DecisionReason::Redirected);
                }
                continue;
            };
            guard.observers = observers.take();
            let changed = req.decision() != decision.as_ref();
            let decision = decision.unwrap_or_else(|| {
                Decision::new(replica.id().clone(), DecisionReason::LeastLoaded)
            });
            let extensions = if self.extensions_to_backend {
                if changed {
                    req.set_decision(decision.clone());
                }
                let mut ext = http::Extensions::new();
                ext.insert(decision);
                ext
            } else {
                if changed {
                    req.set_decision(decision);
                }
                std::mem::take(req.extensions_mut())
            };
            let backend = replica.backend().clone();
            return DispatchFuture::new(backend, req, guard, extensions);
        }
        let err = if decision.is_some() && !snap.is_empty() && !snap.eligible().is_empty() {
            RouteError::NoReplica {
                reason: NoReplicaReason::ReplicaGone,
            }
        } else {
            no_replica(&snap)
        };
        DispatchFuture::failed(err)
    }
}
