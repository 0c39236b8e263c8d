//! Context-length fit: a request never goes to a replica whose context window it does not fit.
//!
//! The guide's pitfall: a pool of replicas that differ in `max_model_len` (one long-context
//! replica beside short ones, or a tier being rolled to a longer context) silently fails long
//! requests wherever they land on a short replica: the engine refuses them after the router
//! chose it, or truncates them, and a prefill slot was spent either way.
//!
//! [`ContextFitLayer`] goes above the picking layers (affinity, least-in-flight, round-robin).
//! For each request it reads [`RouteContext::context_tokens`](crate::context::RouteContext)
//! (estimated prompt plus the `max_tokens` the request asks for) against each replica's
//! [`ReplicaSpec::max_context`](crate::replica::ReplicaSpec) (0 = unknown, which fits anything):
//!
//! - every replica fits (the common case, and always when no replica declares a limit): the
//!   request goes on undecided, and the picking layers below place it as usual;
//! - no replica of the pool fits: [`RouteError::ContextTooLong`] (HTTP 400,
//!   `context_length_exceeded`) before any replica sees it, when the need is past the largest
//!   limit by more than the estimate's margin of error ([`ContextFitLayer::refuse_above`],
//!   default 1.5x: a router counts tokens from bytes, not with the model's tokenizer). Within
//!   the margin, the request goes to the replicas with the largest window, whose engine decides;
//! - some fit: the layer decides among the eligible replicas that fit. A request with a session
//!   (or user) key goes to the one its key ranks first by weighted rendezvous hashing, so a long
//!   conversation's turns keep one replica (and its cache) among those that can hold it; a
//!   keyless one to the least loaded. When every replica that fits is down: 503
//!   ([`RouteError::NoReplica`]).
//!
//! [`FailoverLayer`](crate::health::FailoverLayer) retries only on replicas that fit.
//!
//! ```
//! use replica_router::backend::ServiceBackend;
//! use replica_router::context::RouteContext;
//! use replica_router::decision::Decision;
//! use replica_router::dispatch::Dispatch;
//! use replica_router::error::RouteError;
//! use replica_router::fit::ContextFitLayer;
//! use replica_router::balance::LeastInFlightLayer;
//! use replica_router::pool::Pool;
//! use replica_router::replica::ReplicaSpec;
//! use tower::{Service, ServiceBuilder, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let echo = ServiceBackend::new(tower::service_fn(|_req: http::Request<String>| async {
//!     Ok::<_, std::convert::Infallible>(http::Response::new(String::new()))
//! }));
//! let pool = Pool::builder()
//!     .replica("short", ReplicaSpec::new("m").max_context(8_192), echo.clone())
//!     .replica("long", ReplicaSpec::new("m").max_context(131_072), echo)
//!     .build()
//!     .unwrap();
//! let mut svc = ServiceBuilder::new()
//!     .layer(ContextFitLayer::new(pool.clone()))
//!     .layer(LeastInFlightLayer::new(pool.clone()))
//!     .service(Dispatch::new(pool));
//! let request = |tokens: u64| {
//!     let mut req = http::Request::new(String::new());
//!     req.extensions_mut().insert(RouteContext { context_tokens: tokens, ..Default::default() });
//!     req
//! };
//! // 40k tokens fit only the long-context replica.
//! let resp = svc.ready().await.unwrap().call(request(40_000)).await.unwrap();
//! assert_eq!(resp.extensions().get::<Decision>().unwrap().replica().as_str(), "long");
//! // 150k tokens may be an overestimate: the largest window decides.
//! let resp = svc.ready().await.unwrap().call(request(150_000)).await.unwrap();
//! assert_eq!(resp.extensions().get::<Decision>().unwrap().replica().as_str(), "long");
//! // 300k tokens fit none: refused before any replica sees it.
//! let err = svc.ready().await.unwrap().call(request(300_000)).await.unwrap_err();
//! assert!(matches!(err, RouteError::ContextTooLong { needed: 300_000, largest: 131_072 }));
//! assert_eq!(err.status_code(), 400);
//! # }
//! ```

use crate::balance::{LoadMeasure, Pick, Picking};
use crate::decision::{Decision, DecisionReason};
use crate::error::RouteError;
use crate::pick::no_replica;
use crate::pick::ring::key_hash;
use crate::pool::{Pool, PoolSnapshot};
use crate::replica::ReplicaSpec;
use crate::request::RouteRequest;

/// Counter: requests refused because no replica's context window fits them.
pub const CONTEXT_TOO_LONG_COUNTER: &str = "replica_router_context_too_long_total";
/// Counter: requests placed by this layer because only some replicas fit them.
pub const CONTEXT_FIT_PLACED_COUNTER: &str = "replica_router_context_fit_placed_total";

/// Places requests that fit only some replicas' context windows; see the [module docs](self).
#[derive(Debug)]
pub struct ContextFitLayer<B> {
    pool: Pool<B>,
    measure: LoadMeasure,
    refuse_above: f64,
}

impl<B> Clone for ContextFitLayer<B> {
    fn clone(&self) -> Self {
        ContextFitLayer {
            pool: self.pool.clone(),
            measure: self.measure,
            refuse_above: self.refuse_above,
        }
    }
}

/// The default of [`ContextFitLayer::refuse_above`].
pub const DEFAULT_REFUSE_ABOVE: f64 = 1.5;

impl<B> ContextFitLayer<B> {
    /// Checks requests against `pool`'s replicas.
    pub fn new(pool: Pool<B>) -> Self {
        ContextFitLayer {
            pool,
            measure: LoadMeasure::default(),
            refuse_above: DEFAULT_REFUSE_ABOVE,
        }
    }

    /// Refuses a request only when its need is above `factor x` the largest window (at least
    /// 1.0; default [`DEFAULT_REFUSE_ABOVE`]): the margin for an estimated token count. Pass 1.0
    /// when the context's token count is exact.
    pub fn refuse_above(mut self, factor: f64) -> Self {
        self.refuse_above = if factor.is_finite() {
            factor.max(1.0)
        } else {
            DEFAULT_REFUSE_ABOVE
        };
        self
    }

    /// How keyless requests compare the replicas that fit (default: requests in flight).
    pub fn measure(mut self, measure: LoadMeasure) -> Self {
        self.measure = measure;
        self
    }
}

impl<S, B> tower::Layer<S> for ContextFitLayer<B> {
    type Service = ContextFit<S, B>;

    fn layer(&self, inner: S) -> Self::Service {
        Picking::from_parts(
            inner,
            ContextFitPicker {
                pool: self.pool.clone(),
                measure: self.measure,
                refuse_above: self.refuse_above,
            },
        )
    }
}

/// The service of [`ContextFitLayer`].
pub type ContextFit<S, B> = Picking<S, ContextFitPicker<B>>;

/// The policy of [`ContextFit`].
#[derive(Debug)]
pub struct ContextFitPicker<B> {
    pool: Pool<B>,
    measure: LoadMeasure,
    refuse_above: f64,
}

impl<B> Clone for ContextFitPicker<B> {
    fn clone(&self) -> Self {
        ContextFitPicker {
            pool: self.pool.clone(),
            measure: self.measure,
            refuse_above: self.refuse_above,
        }
    }
}

/// How a pool's replicas stand against a request's context need.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fit {
    /// Every replica fits (or the need is unknown).
    All,
    /// Some replicas fit, not all.
    Some,
    /// None fits; the largest declared `max_context`.
    None {
        /// The largest `max_context` in the pool.
        largest: u64,
    },
}

/// How `snapshot`'s replicas stand against a request needing `tokens` of context (0: unknown).
pub fn fit<B>(snapshot: &PoolSnapshot<B>, tokens: u64) -> Fit {
    if tokens == 0 {
        return Fit::All;
    }
    let (mut fits, mut misses, mut largest) = (0usize, 0usize, 0u64);
    for r in snapshot.replicas() {
        let spec = r.spec();
        largest = largest.max(u64::from(spec.max_context));
        if spec.fits(tokens) {
            fits += 1;
        } else {
            misses += 1;
        }
    }
    match (fits, misses) {
        (_, 0) => Fit::All,
        (0, _) => Fit::None { largest },
        _ => Fit::Some,
    }
}

/// A uniform draw in (0, 1] from a 64-bit hash.
fn unit(h: u64) -> f64 {
    ((h >> 11) as f64 + 1.0) / (1u64 << 53) as f64
}

impl<B> Pick for ContextFitPicker<B> {
    fn decide<Req: RouteRequest>(&mut self, req: &mut Req) -> Result<(), RouteError> {
        let Some(ctx) = req.route_context() else {
            return Ok(());
        };
        let needed = ctx.context_tokens;
        let snap = self.pool.load();
        // Replicas that may take it: those it fits, else (within the margin) the largest.
        let admits: Box<dyn Fn(&ReplicaSpec) -> bool> = match fit(&snap, needed) {
            Fit::All => return Ok(()),
            Fit::None { largest } if needed as f64 > largest as f64 * self.refuse_above => {
                metrics::counter!(CONTEXT_TOO_LONG_COUNTER).increment(1);
                return Err(RouteError::ContextTooLong { needed, largest });
            }
            Fit::None { largest } => {
                Box::new(move |spec: &ReplicaSpec| u64::from(spec.max_context) == largest)
            }
            Fit::Some => Box::new(move |spec: &ReplicaSpec| spec.fits(needed)),
        };
        let key = ctx.session.as_ref().or(ctx.user.as_ref());
        let key_h = key.map(|k| key_hash(k.as_bytes()));
        let replicas = snap.replicas();
        let mut best: Option<(usize, f64)> = None;
        for (i, r) in replicas.iter().enumerate() {
            if !r.state().is_eligible() || !admits(r.spec()) {
                continue;
            }
            // Higher is better: the weighted rendezvous score for a key, minus the load without.
            let score = match key_h {
                Some(h) => {
                    let u = unit(h ^ key_hash(r.id().as_str().as_bytes()).rotate_left(17));
                    r.weight().get() / -u.ln()
                }
                None => -snap.weighted_load(i, self.measure),
            };
            if best.is_none_or(|(_, b)| score > b) {
                best = Some((i, score));
            }
        }
        let (i, _) = best.ok_or_else(|| no_replica(&snap))?;
        let reason = if key.is_some() {
            DecisionReason::Home
        } else {
            DecisionReason::LeastLoaded
        };
        metrics::counter!(CONTEXT_FIT_PLACED_COUNTER).increment(1);
        req.set_decision(Decision::at_slot(
            replicas[i].id().clone(),
            reason,
            snap.version(),
            i,
        ));
        Ok(())
    }
}
