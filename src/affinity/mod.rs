//! Session affinity: consistent hashing with bounded loads, sticky pins, explicit failover.
//!
//! Multi-turn chat must go back to the replica that holds its KV cache, but plain sticky hashing
//! hot-spots: long conversations and heavy users pile onto one replica while the others idle.
//! [`AffinityLayer`] keeps the cache hits of stickiness and the balance of least-loaded routing:
//!
//! 1. **Key.** Each request is placed by a key of its [`RouteContext`](crate::context::RouteContext):
//!    the session (conversation) key by default, the user key, or the session key falling back to
//!    the user key ([`AffinityKey`]; the guide's case: hashing by user spread heavy users better).
//!    A request with no key (or an empty one), or with a [`Decision`](crate::decision::Decision)
//!    already made, passes through untouched to the next picking layer (least-in-flight) —
//!    the guide's "consistent-hash routing on `conversation_id` for sticky sessions and
//!    least-request fallback for new sessions". A key longer than the configured maximum fails
//!    with [`RouteError::InvalidKey`](crate::error::RouteError::InvalidKey) (HTTP 400).
//! 2. **Ring.** Replicas sit on a consistent-hash ring ([`ring`]) with virtual nodes in
//!    proportion to their capacity weight, hashed with a documented, stable hash (SipHash-2-4,
//!    zero keys, over explicit bytes) so every gateway instance agrees without talking. The ring
//!    is rebuilt only when the pool's membership version changes (cached in an `ArcSwap`);
//!    health is checked during the walk.
//! 3. **Bounded loads** (Mirrokni, Thorup and Zadimoghaddam, *Consistent Hashing with Bounded
//!    Loads*, SODA 2018; HAProxy's `hash-balance-factor`). With balance factor `c` (default
//!    1.25), a session goes to its home replica unless that replica's load would exceed
//!    `ceil(c x its weight's share of the average load)`, counting this request; then to the next
//!    distinct eligible replica in ring order with room. Load is requests in flight (or estimated
//!    tokens, [`LoadMeasure`](crate::pool::LoadMeasure)), read from the replicas' atomics, which
//!    return to zero when response bodies end. Weights in the bound are effective weights, so a
//!    replica in its slow-start ramp takes its home sessions gradually. The walk neither clones
//!    the ring nor allocates; the average costs one pass over the replicas' atomics per placement
//!    (about 0.7 µs at 100 replicas, see `notes/BENCH-affinity.md`).
//! 4. **Stickiness with memory.** After placement (home or spill), the session is pinned to its
//!    replica in a [`PinTable`](pins::PinTable) with a TTL (default 30 minutes, refreshed on
//!    every request of the session). A pinned session keeps going to its pinned replica while
//!    that replica is eligible, **even above the load bound**, because its KV cache is there —
//!    up to a hard cap of `pinned_overload_factor x` the bound (default 2x), past which it
//!    spills like a new session. A shared pin table (Redis) makes every gateway instance send
//!    a session to the same replica even after a spill.
//! 5. **Failover.** If the pinned replica is removed, unhealthy, ejected or draining, the
//!    session moves to the first eligible replica with room in ring order from its key, with
//!    reason [`Failover`](crate::decision::DecisionReason::Failover), and is re-pinned there.
//!    When a replica comes back, only sessions without a live pin go to it (new sessions, or
//!    ones whose ring home it is): live sessions stay where they are, so nothing thrashes.
//! 6. **Wait budget.** With a [`ShedLayer`](crate::shed::ShedLayer) above, each request
//!    carries an [`SloAdvice`](crate::load::SloAdvice): a replica whose estimated queue wait is
//!    over the budget is avoided while another will do, and a session pinned to such a replica
//!    follows the shedding layer's [`StickyPolicy`](crate::load::StickyPolicy): spill (replay
//!    the prefill elsewhere, reason `spill`) or wait at home up to a bound. It only leaves home
//!    for a replica that is within budget.
//! 7. **Pin-table failures** (a remote store down or timing out) never fail a request: the
//!    layer falls back to pure ring placement (which every gateway computes the same way), skips
//!    the pin write, and counts the error in [`PIN_ERRORS_COUNTER`].
//!
//! Races worth knowing: if the decided replica starts draining between this layer's decision
//! and the send, [`Dispatch`](crate::dispatch::Dispatch) re-picks (reason `redirected`) while the
//! pin still names the draining replica; the session's next request then fails over along its
//! ring order. Loads are per gateway instance, so two gateways may spill the same new session to
//! different replicas; with a shared pin table the last placement wins and both follow it.
//!
//! # What the decision says
//!
//! | reason | when | KV cache on the chosen replica |
//! |---|---|---|
//! | `home` | pinned replica (or ring home for an unpinned session) took it | yes, if the session has history |
//! | `spill` | home (or pinned replica past the hard cap) had no room | no: replay the prefill |
//! | `failover` | pinned replica (or ring home) is gone, unhealthy, ejected or draining | no: replay the prefill |
//!
//! There is no "new" reason: the router cannot tell a new conversation from one whose pin
//! expired or lived on another gateway's memory table, so an unpinned session is reported by
//! where it landed relative to its ring home. The decision travels in the request's
//! extensions to [`Dispatch`](crate::dispatch::Dispatch), which copies it onto the response;
//! [`annotate_response`] turns it into `x-replica-affinity` / `x-replica-id` headers.
//!
//! # Per-tenant spread
//!
//! With [`AffinityBuilder::tenant_share`] set to `s`, no tenant (by the context's tenant key)
//! may hold more than a share `s` of its live sessions on one replica: a placement that would
//! break the cap walks on to the next replica. Counts are kept per (tenant bucket, replica) in
//! bounded memory and decay with the pin TTL; the cap is soft (it yields when no replica can
//! satisfy both it and the load bound). Details in the source of `spread.rs`.
//!
//! # Metrics
//!
//! Handles are registered once, when the layer is built (install a recorder before that):
//! [`DECISIONS_COUNTER`] with label `reason` = `home` | `spill` | `failover` (affinity hits are
//! `home`), [`PIN_ERRORS_COUNTER`], [`RING_REBUILDS_COUNTER`], and the gauge
//! [`PINS_LIVE_GAUGE`](pins::PINS_LIVE_GAUGE) kept by [`MemoryPinTable`](pins::MemoryPinTable).
//! No label carries a session, user or tenant key.
//!
//! # Example
//! ```
//! use replica_router::affinity::{annotate_response, AffinityLayer};
//! use replica_router::backend::ServiceBackend;
//! use replica_router::balance::LeastInFlightLayer;
//! use replica_router::context::RouteContextLayer;
//! use replica_router::decision::{Decision, DecisionReason};
//! use replica_router::dispatch::Dispatch;
//! use replica_router::pool::Pool;
//! use replica_router::replica::ReplicaSpec;
//! use tower::{Service, ServiceBuilder, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//! let engine = ServiceBackend::new(tower::service_fn(|_req: http::Request<String>| async {
//!     Ok::<_, std::convert::Infallible>(http::Response::new(String::from("{}")))
//! }));
//! let spec = ReplicaSpec::new("llama-3-70b").tensor_parallel(2);
//! let pool = Pool::builder()
//!     .replica("gpu-0-1", spec.clone(), engine.clone())
//!     .replica("gpu-2-3", spec, engine)
//!     .build()?;
//! let mut gateway = ServiceBuilder::new()
//!     .layer(RouteContextLayer::default())          // x-session-id -> RouteContext
//!     .layer(AffinityLayer::new(pool.clone()))       // keyed: ring + bounded loads + pins
//!     .layer(LeastInFlightLayer::new(pool.clone()))  // unkeyed: weighted two choices
//!     .service(Dispatch::new(pool));
//!
//! let turn = || http::Request::builder().header("x-session-id", "conv-1").body(String::new());
//! let mut first = gateway.ready().await?.call(turn()?).await?;
//! let second = gateway.ready().await?.call(turn()?).await?;
//! let (a, b) = (first.extensions().get::<Decision>().unwrap(), second.extensions().get::<Decision>().unwrap());
//! assert_eq!(a.replica(), b.replica());            // sticky
//! assert_eq!(b.reason(), DecisionReason::Home);
//! annotate_response(&mut first);
//! assert_eq!(first.headers()["x-replica-affinity"], "home");
//! # Ok(())
//! # }
//! ```

mod error;
mod future;
mod headers;
mod layer;
mod service;
mod spread;
mod ttft;

pub use self::error::AffinityConfigError;
pub use self::future::AffinityFuture;
pub use self::headers::{annotate_layer, annotate_response, AFFINITY_HEADER, REPLICA_HEADER};
pub use self::layer::{
    AffinityBuilder, AffinityLayer, DEFAULT_PINNED_OVERLOAD_FACTOR, DEFAULT_PIN_TTL,
    DEFAULT_TENANT_BUCKETS,
};
pub use self::service::Affinity;
pub use crate::pick::ring::BalanceFactor;

/// Counter of affinity decisions, labelled `reason` = `home`, `spill` or `failover`.
pub const DECISIONS_COUNTER: &str = "replica_router_affinity_decisions_total";

/// Counter of pin-table failures (lookups and writes); each one fell back to ring placement.
pub const PIN_ERRORS_COUNTER: &str = "replica_router_affinity_pin_errors_total";

/// Counter of ring rebuilds (one per membership version seen).
pub const RING_REBUILDS_COUNTER: &str = "replica_router_affinity_ring_rebuilds_total";

/// Which key of the route context places a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AffinityKey {
    /// The session (conversation) key.
    #[default]
    Session,
    /// The user key: all of a user's conversations share a replica (spreads heavy users).
    User,
    /// The session key if present, else the user key.
    SessionThenUser,
}
