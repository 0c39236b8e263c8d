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

pub use self::layer::{LeastInFlightLayer, RoundRobinLayer};
pub use self::service::{
    pick_ttft, LeastInFlight, LeastInFlightPicker, Pick, Picking, RoundRobin, RoundRobinPicker,
};
pub use crate::pool::LoadMeasure;
