//! Least-in-flight balancing by weighted power of two choices, and round-robin.
//!
//! [`LeastInFlightLayer`] picks, for every request that carries no decision yet, the less loaded
//! of two replicas sampled **with probability proportional to their capacity weight**, where load
//! is in-flight requests (or estimated in-flight tokens, see [`LoadMeasure`]) divided by the
//! effective weight (capacity weight x slow-start ramp). This is Mitzenmacher's "power of two
//! choices" (*The Power of Two Choices in Randomized Load Balancing*, 2001): comparing two random
//! replicas instead of all keeps the maximum load within `O(log log n)` of the mean at constant
//! cost per pick, and avoids the herd effect of every gateway sending to the one global minimum.
//!
//! Why weighted sampling: with uniform sampling a replica is a candidate in at most `2/n` of the
//! picks, so a TP=4 replica beside three TP=2 replicas cannot get the share its capacity deserves
//! however light its load. Sampling by weight and comparing weight-normalized loads gives each
//! replica a share proportional to its weight at equal load. (tower's `p2c::Balance` samples
//! uniformly and has no weights; weighted p2c was proposed upstream and never merged.)
//!
//! Unlike tower's balancer, readiness is not consulted: replicas are dispatched through a clone
//! of their backend that is readied in the response future, so a slow replica never blocks picks
//! for the others, and the layer sees every replica in the pool's snapshot, not only the ready
//! ones. Replicas that are unhealthy, ejected or draining are never picked.
//!
//! [`RoundRobinLayer`] rotates over the eligible replicas; the guide recommends it for stateless
//! traffic with even request sizes.
//!
//! # Example
//! ```
//! use replica_router::balance::LeastInFlightLayer;
//! use replica_router::dispatch::Dispatch;
//! use replica_router::pool::Pool;
//! use replica_router::replica::ReplicaSpec;
//! use replica_router::backend::ServiceBackend;
//! use tower::{Service, ServiceBuilder, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let echo = ServiceBackend::new(tower::service_fn(|_req: http::Request<String>| async {
//!     Ok::<_, std::convert::Infallible>(http::Response::new(String::from("hi")))
//! }));
//! let pool = Pool::builder()
//!     .replica("a", ReplicaSpec::new("m").capacity_weight(1.0), echo.clone())
//!     .replica("b", ReplicaSpec::new("m").capacity_weight(2.0), echo)
//!     .build()
//!     .unwrap();
//! let mut svc = ServiceBuilder::new()
//!     .layer(LeastInFlightLayer::new(pool.clone()))
//!     .service(Dispatch::new(pool));
//! let resp = svc.ready().await.unwrap().call(http::Request::new(String::new())).await.unwrap();
//! assert!(resp.extensions().get::<replica_router::decision::Decision>().is_some());
//! # }
//! ```

mod layer;
mod service;

use rand::Rng;

pub use self::layer::{LeastInFlightLayer, RoundRobinLayer};
pub use self::service::{pick_ttft, LeastInFlight, RoundRobin};
use crate::error::{NoReplicaReason, RouteError};
pub use crate::pool::LoadMeasure;
use crate::pool::PoolSnapshot;

/// How many weighted draws to try for a second, distinct candidate before falling back to a
/// uniform draw among the others.
const DISTINCT_DRAWS: usize = 4;

/// Picks a replica by weighted power of two choices. Returns its index in
/// [`PoolSnapshot::replicas`], or `None` when no replica is eligible.
///
/// Ties go to the first candidate, which was drawn in proportion to weight, so at equal load the
/// shares converge to the weights.
pub fn pick_two_choices<B, R: Rng + ?Sized>(
    snapshot: &PoolSnapshot<B>,
    measure: LoadMeasure,
    rng: &mut R,
) -> Option<usize> {
    let eligible = snapshot.eligible();
    let a = snapshot.sample_weighted(rng)?;
    if eligible.len() == 1 {
        return live_or_scan(snapshot, a, measure);
    }
    let mut b = a;
    for _ in 0..DISTINCT_DRAWS {
        b = snapshot.sample_weighted(rng)?;
        if b != a {
            break;
        }
    }
    if b == a {
        // Heavily skewed weights: take any other eligible replica uniformly.
        let pos = eligible.iter().position(|&i| i as usize == a).unwrap_or(0);
        let other = rng.random_range(0..eligible.len() - 1);
        let other = if other >= pos { other + 1 } else { other };
        b = eligible[other] as usize;
    }
    let replicas = snapshot.replicas();
    let (a_ok, b_ok) = (
        replicas[a].state().is_eligible(),
        replicas[b].state().is_eligible(),
    );
    match (a_ok, b_ok) {
        (true, true) => {
            let (la, lb) = (
                snapshot.weighted_load(a, measure),
                snapshot.weighted_load(b, measure),
            );
            Some(if lb < la { b } else { a })
        }
        (true, false) => Some(a),
        (false, true) => Some(b),
        (false, false) => least_loaded_scan(snapshot, measure),
    }
}

fn live_or_scan<B>(snapshot: &PoolSnapshot<B>, i: usize, measure: LoadMeasure) -> Option<usize> {
    if snapshot.replicas()[i].state().is_eligible() {
        Some(i)
    } else {
        least_loaded_scan(snapshot, measure)
    }
}

/// The least weighted-loaded replica that is eligible right now, by a full scan (the slow path
/// when the snapshot's eligibility is out of date).
pub fn least_loaded_scan<B>(snapshot: &PoolSnapshot<B>, measure: LoadMeasure) -> Option<usize> {
    let mut best: Option<(usize, f64)> = None;
    for (i, r) in snapshot.replicas().iter().enumerate() {
        if !r.state().is_eligible() {
            continue;
        }
        let load = snapshot.weighted_load(i, measure);
        if best.is_none_or(|(_, l)| load < l) {
            best = Some((i, load));
        }
    }
    best.map(|(i, _)| i)
}

/// The error for "nothing to pick" in this snapshot.
pub fn no_replica<B>(snapshot: &PoolSnapshot<B>) -> RouteError {
    RouteError::NoReplica {
        reason: if snapshot.is_empty() {
            NoReplicaReason::EmptyPool
        } else {
            NoReplicaReason::NoneEligible
        },
    }
}
