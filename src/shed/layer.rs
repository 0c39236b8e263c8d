use std::sync::Arc;
use std::time::Duration;

use crate::autoscale::AutoscaleSignal;
use crate::context::Priority;
use crate::load::{StickyPolicy, WaitEstimator};
use crate::pool::Pool;
use crate::shed::queue::{lane, AdmissionQueue, QueueNotifier};
use crate::shed::{QueueSettings, Shared, Shed};

/// Adds SLO shedding (and optionally an admission queue) to a service stack.
///
/// Every service made by one layer (and its clones) shares one admission queue. See the
/// [module docs](crate::shed).
#[derive(Debug, Clone)]
pub struct ShedLayer<B> {
    pool: Pool<B>,
    estimator: WaitEstimator,
    budgets: [Duration; 3],
    sticky: StickyPolicy,
    advise: bool,
    retry_after: (Duration, Duration),
    queue: Option<(Arc<AdmissionQueue>, QueueSettings)>,
    autoscale: Option<AutoscaleSignal>,
}

/// The guide's example budget.
const DEFAULT_BUDGET: Duration = Duration::from_millis(200);

impl<B> ShedLayer<B> {
    /// Sheds over `pool` with a 200 ms budget for every priority, the default
    /// [`WaitEstimator`], no queue, sticky sessions spilling, and `Retry-After` between 1 s and
    /// 60 s.
    pub fn new(pool: Pool<B>) -> Self {
        ShedLayer {
            pool,
            estimator: WaitEstimator::default(),
            budgets: [DEFAULT_BUDGET; 3],
            sticky: StickyPolicy::default(),
            advise: true,
            retry_after: (Duration::from_secs(1), Duration::from_secs(60)),
            queue: None,
            autoscale: None,
        }
    }

    /// The wait budget for every priority.
    pub fn budget(mut self, budget: Duration) -> Self {
        self.budgets = [budget; 3];
        self
    }

    /// The wait budget for one priority (for example a tighter budget for batch traffic, so it
    /// is shed before interactive traffic is). Set it after [`budget`](Self::budget).
    pub fn priority_budget(mut self, priority: Priority, budget: Duration) -> Self {
        self.budgets[lane(priority)] = budget;
        self
    }

    /// How waits are estimated.
    pub fn estimator(mut self, estimator: WaitEstimator) -> Self {
        self.estimator = estimator;
        self
    }

    /// What to do with sticky sessions whose home is over budget.
    pub fn sticky(mut self, policy: StickyPolicy) -> Self {
        self.sticky = policy;
        self
    }

    /// Whether to leave an [`SloAdvice`](super::SloAdvice) in undecided requests for the picking
    /// layers below (default on; one small allocation per request). A stack without session
    /// affinity can turn it off.
    pub fn advise(mut self, on: bool) -> Self {
        self.advise = on;
        self
    }

    /// Bounds of the `Retry-After` given with a shed (the best wait's excess over the budget,
    /// clamped into `min..=max`).
    pub fn retry_after_bounds(mut self, min: Duration, max: Duration) -> Self {
        self.retry_after = (min, max);
        self
    }

    /// Adds an admission queue of `capacity` requests, each waiting at most `max_wait`. The
    /// head re-checks capacity whenever an admitted request finishes and at least every 10 ms.
    /// A capacity of 0 or a zero `max_wait` means no queue.
    pub fn queue(mut self, capacity: usize, max_wait: Duration) -> Self {
        self.queue = (capacity > 0 && !max_wait.is_zero()).then(|| {
            (
                Arc::new(AdmissionQueue::new(capacity)),
                QueueSettings {
                    max_wait,
                    recheck: Duration::from_millis(10),
                },
            )
        });
        self
    }

    /// How often the queue's head re-checks capacity when no request finishes (default 10 ms,
    /// at least 1 ms; no effect without a queue).
    pub fn queue_recheck(mut self, every: Duration) -> Self {
        if let Some((_, q)) = self.queue.as_mut() {
            q.recheck = every.max(Duration::from_millis(1));
        }
        self
    }

    /// Feeds admitted waits and sheds to `signal`.
    pub fn autoscale(mut self, signal: AutoscaleSignal) -> Self {
        self.autoscale = Some(signal);
        self
    }

    /// Requests waiting in the admission queue now.
    pub fn queue_len(&self) -> usize {
        self.queue.as_ref().map_or(0, |(q, _)| q.len())
    }
}

impl<S, B> tower::Layer<S> for ShedLayer<B> {
    type Service = Shed<S, B>;

    fn layer(&self, inner: S) -> Self::Service {
        Shed::from_shared(
            inner,
            Arc::new(Shared {
                pool: self.pool.clone(),
                estimator: self.estimator.clone(),
                budgets: self.budgets,
                sticky: self.sticky,
                advise: self.advise,
                retry_after: self.retry_after,
                queue: self.queue.clone(),
                notifier: self
                    .queue
                    .as_ref()
                    .map(|(q, _)| Arc::new(QueueNotifier(q.clone()))),
                autoscale: self.autoscale.clone(),
            }),
        )
    }
}
