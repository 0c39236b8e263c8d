//! SLO shedding and admission control: a fast 429 when every replica is past its wait budget.
//!
//! The guide's rule: *when all replicas exceed wait thresholds, return 429 or queue at the
//! gateway per admission control policy instead of overloading workers* (Harbor Analytics shed at
//! 429 when both replicas exceeded a 200 ms wait budget). A deeper queue only adds latency to
//! every request behind it; an early 429 with `Retry-After` lets clients back off and keeps the
//! requests that are admitted inside their SLO.
//!
//! [`ShedLayer`] estimates, for every request, the queue wait on each eligible replica with a
//! [`WaitEstimator`] (router in-flight counts, measured service times, and the engines' own
//! running/waiting/KV reports while fresh) and:
//!
//! - admits the request when at least one replica's estimated wait is within the budget of the
//!   request's priority (default 200 ms for all priorities, see [`ShedLayer::priority_budget`]);
//! - otherwise, without a queue, fails at once with [`RouteError::Overloaded`] (HTTP 429) and a
//!   `Retry-After` of the best wait's excess over the budget, clamped to
//!   [`ShedLayer::retry_after_bounds`];
//! - with an admission queue ([`ShedLayer::queue`]), lets the request wait at the gateway for at
//!   most `max_wait`, then sheds it. The queue is bounded; its head (oldest request of the
//!   highest priority) is admitted first when capacity frees up, and when the queue is full a
//!   new request evicts the youngest waiter of a lower priority. So batch traffic is shed first
//!   and interactive traffic last. No request is ever held past its deadline.
//!
//! Shedding is about load, not health: with no eligible replica at all, the request passes on
//! and the picking layer answers 503.
//!
//! # Sticky sessions over budget: wait or spill
//!
//! A session's home replica holds its KV cache. When the home is past the budget while other
//! replicas are not, there are two costs to choose between: wait in the home's queue, or move to
//! a replica with room and replay the conversation's prefill there. [`StickyPolicy`] makes the
//! choice explicit: [`StickyPolicy::Spill`] (the default) moves the session, keeping the
//! admitted requests inside the SLO; [`StickyPolicy::Wait`] keeps it home while the home's
//! estimated wait is under a bound, for deployments where long contexts make a prefill replay
//! cost more than the queue.
//!
//! The layer applies the policy in two ways, so it works whatever the layer order:
//! - when a picking layer below it will choose the replica (the usual order: shedding, then
//!   affinity), the layer puts an [`SloAdvice`] in the request's extensions. The affinity layer
//!   reads it (`req.extensions().get::<SloAdvice>()`) and asks
//!   [`SloAdvice::should_leave_home`] for the session's home, and [`SloAdvice::is_over_budget`]
//!   for spill candidates; the waits are estimated when asked, for those replicas only;
//! - when a [`Decision`] is already made (affinity placed above
//!   shedding, or the application decided), the layer itself moves a decided replica that is
//!   over budget to the replica with the least estimated wait, with reason
//!   [`DecisionReason::Spill`], if the policy says so.
//!
//! # Metrics
//! `replica_router_shed_total{reason, priority}` (reason: `over_budget`, `queue_full`,
//! `queue_timeout`, `evicted`), `replica_router_admission_queue_depth`,
//! `replica_router_admission_queue_wait_seconds`, `replica_router_sticky_spill_total`. With
//! [`ShedLayer::autoscale`], every admitted request's wait and every shed feed an
//! [`AutoscaleSignal`].
//!
//! # Example
//! ```
//! use replica_router::balance::LeastInFlightLayer;
//! use replica_router::backend::ServiceBackend;
//! use replica_router::dispatch::Dispatch;
//! use replica_router::pool::Pool;
//! use replica_router::replica::ReplicaSpec;
//! use replica_router::shed::ShedLayer;
//! use replica_router::load::{StickyPolicy, WaitEstimator};
//! use std::time::Duration;
//! use tower::{Service, ServiceBuilder, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let echo = ServiceBackend::new(tower::service_fn(|_req: http::Request<String>| async {
//!     Ok::<_, std::convert::Infallible>(http::Response::new(String::from("hi")))
//! }));
//! let pool = Pool::builder().replica("a", ReplicaSpec::new("m"), echo).build().unwrap();
//! let mut gateway = ServiceBuilder::new()
//!     .layer(
//!         ShedLayer::new(pool.clone())
//!             .budget(Duration::from_millis(200))
//!             .estimator(WaitEstimator::new().slots_per_weight(64.0))
//!             .queue(256, Duration::from_secs(1))
//!             .sticky(StickyPolicy::Spill),
//!     )
//!     .layer(LeastInFlightLayer::new(pool.clone()))
//!     .service(Dispatch::new(pool));
//! let resp = gateway.ready().await.unwrap().call(http::Request::new(String::new())).await;
//! assert!(resp.is_ok());
//! # }
//! ```

mod future;
mod layer;
mod queue;
mod service;

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

pub use self::future::ShedFuture;
pub use self::layer::ShedLayer;
use self::queue::AdmissionQueue;
pub use self::service::Shed;
use crate::autoscale::AutoscaleSignal;
use crate::context::Priority;
use crate::decision::{Decision, DecisionReason};
use crate::error::RouteError;
use crate::load::{SloAdvice, StickyPolicy, WaitEstimator, WaitSource};
use crate::pool::{Pool, PoolSnapshot, Replica};
use crate::request::RouteRequest;

impl<B: Send + Sync + 'static> WaitSource for Shared<B> {
    fn wait(&self, version: u64, index: usize) -> Option<Duration> {
        let snap = self.pool.load();
        if snap.version() != version {
            return None;
        }
        let r = snap.replicas().get(index)?;
        r.state().is_eligible().then(|| {
            self.estimator
                .estimate(r, snap.slow_start(), Instant::now())
                .wait
        })
    }
}

/// Admission settings of a queue.
#[derive(Debug, Clone, Copy)]
pub(crate) struct QueueSettings {
    pub(crate) max_wait: Duration,
    pub(crate) recheck: Duration,
}

/// State shared by a layer and all its services.
#[derive(Debug)]
pub(crate) struct Shared<B> {
    pub(crate) pool: Pool<B>,
    pub(crate) estimator: WaitEstimator,
    pub(crate) budgets: [Duration; 3],
    pub(crate) sticky: StickyPolicy,
    pub(crate) advise: bool,
    pub(crate) retry_after: (Duration, Duration),
    pub(crate) queue: Option<(Arc<AdmissionQueue>, QueueSettings)>,
    /// Wakes the queue's head when an admitted request finishes (shared, so registering it on a
    /// request does not allocate an observer).
    pub(crate) notifier: Option<Arc<queue::QueueNotifier>>,
    pub(crate) autoscale: Option<AutoscaleSignal>,
}

/// The outcome of a capacity check.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Verdict {
    /// A replica has room; `wait` is what the request faces there.
    Admit { wait: Duration },
    /// Every eligible replica is over budget; `best` is the smallest estimate.
    Over { best: Duration },
}

fn locate<'s, B>(snap: &'s PoolSnapshot<B>, d: &Decision) -> Option<(usize, &'s Arc<Replica<B>>)> {
    snap.get(d.replica().as_str())
}

impl<B: Send + Sync + 'static> Shared<B> {
    pub(crate) fn budget(&self, p: Priority) -> Duration {
        self.budgets[queue::lane(p)]
    }

    /// Checks capacity for `req` at `now`, applying the sticky policy to a decided request and
    /// leaving [`SloAdvice`] for undecided ones.
    pub(crate) fn evaluate<Req: RouteRequest>(
        self: &Arc<Self>,
        req: &mut Req,
        priority: Priority,
        now: Instant,
    ) -> Verdict {
        let snap = self.pool.load();
        let budget = self.budget(priority);
        let slow = snap.slow_start();
        // A decided replica within budget: nothing else to look at.
        let home = req
            .decision()
            .and_then(|d| locate(&snap, d))
            .filter(|(_, r)| r.state().is_eligible())
            .map(|(_, r)| self.estimator.estimate(r, slow, now).wait);
        if let Some(home_w) = home {
            if home_w <= budget {
                return Verdict::Admit { wait: home_w };
            }
        }
        // Without a decision, the scan stops at the first replica within budget (at the first
        // idle one when the autoscaler wants the best wait); the advice answers the picking
        // layers' questions later, for the replicas they ask about.
        let early_exit = home.is_none();
        let mut best: Option<(usize, Duration)> = None;
        for &i in snap.eligible() {
            let i = i as usize;
            let r = &snap.replicas()[i];
            if !r.state().is_eligible() {
                continue;
            }
            let w = self.estimator.estimate(r, slow, now).wait;
            if best.is_none_or(|(_, b)| w < b) {
                best = Some((i, w));
            }
            if early_exit && w <= budget && (self.autoscale.is_none() || w.is_zero()) {
                break;
            }
        }
        let Some((best_i, best_w)) = best else {
            // Nothing eligible: not a load problem; the picking layer answers 503.
            return Verdict::Admit {
                wait: Duration::ZERO,
            };
        };
        if best_w > budget {
            return Verdict::Over { best: best_w };
        }
        if let Some(home_w) = home {
            // The home is over budget, another replica is not: the sticky policy decides.
            let stay = match self.sticky {
                StickyPolicy::Spill => false,
                StickyPolicy::Wait { max_wait } => home_w <= max_wait,
            };
            if stay {
                return Verdict::Admit { wait: home_w };
            }
            let target = snap.replicas()[best_i].id().clone();
            metrics::counter!("replica_router_sticky_spill_total").increment(1);
            req.set_decision(Decision::at_slot(
                target,
                DecisionReason::Spill,
                snap.version(),
                best_i,
            ));
            return Verdict::Admit { wait: best_w };
        }
        if self.advise {
            let source: Arc<dyn WaitSource> = self.clone();
            req.extensions_mut()
                .insert(SloAdvice::new(source, budget, self.sticky));
        }
        Verdict::Admit { wait: best_w }
    }

    /// The best wait now (for a `Retry-After` computed at a queue deadline).
    pub(crate) fn best_wait(&self, now: Instant) -> Duration {
        self.estimator
            .best(&self.pool.load(), now)
            .map_or(Duration::ZERO, |(_, w)| w)
    }

    /// Counts a shed and builds its error.
    pub(crate) fn shed(
        &self,
        reason: &'static str,
        priority: Priority,
        best: Duration,
        now: Instant,
    ) -> RouteError {
        metrics::counter!(
            "replica_router_shed_total",
            "reason" => reason,
            "priority" => priority.as_str()
        )
        .increment(1);
        if let Some(a) = &self.autoscale {
            a.record_shed(now);
        }
        let budget = self.budget(priority);
        let (lo, hi) = self.retry_after;
        RouteError::Overloaded {
            retry_after: best.saturating_sub(budget).clamp(lo, hi.max(lo)),
        }
    }

    /// Records an admission that faced `wait` in total.
    pub(crate) fn admitted(&self, now: Instant, wait: Duration) {
        if let Some(a) = &self.autoscale {
            a.record_wait(now, wait);
        }
    }
}
