//! The shedding layer's advice to the picking layers below it: which replicas are over the
//! request's wait budget now, and what a sticky session should do about it.

use std::sync::Arc;
use std::time::Duration;

/// What to do with a session whose home replica is over the wait budget while others are not.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StickyPolicy {
    /// Move the session to a replica within budget; the new replica replays the prefill.
    #[default]
    Spill,
    /// Keep the session on its home while the home's estimated wait is at most `max_wait`
    /// (use `Duration::MAX` to always wait); spill beyond.
    Wait {
        /// The longest estimated wait the session accepts to keep its KV cache.
        max_wait: Duration,
    },
}

/// The shedding layer's view of the replicas' waits, left in the request's extensions for the
/// picking layers below.
///
/// Estimates are computed when asked, from the live pool, so they describe the moment of the
/// pick and cost nothing for replicas nobody asks about. Indices are those of the caller's
/// [`PoolSnapshot`]; every query takes the caller's snapshot
/// [`version`](PoolSnapshot::version) and answers "not over budget" when the membership has
/// changed since, so a stale advice never blocks a pick.
#[derive(Clone)]
pub struct SloAdvice {
    source: Arc<dyn WaitSource>,
    budget: Duration,
    sticky: StickyPolicy,
}

impl std::fmt::Debug for SloAdvice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SloAdvice")
            .field("budget", &self.budget)
            .field("sticky", &self.sticky)
            .finish()
    }
}

/// Live waits of a pool's replicas, as an [`SloAdvice`] reads them (the shedding layer
/// implements it over its pool and estimator).
pub trait WaitSource: Send + Sync + 'static {
    /// The estimated wait of replica `index` of the snapshot with `version`, if that is still
    /// the current membership and the replica is eligible.
    fn wait(&self, version: u64, index: usize) -> Option<Duration>;
}

impl SloAdvice {
    /// An advice reading waits from `source`, for a request whose wait budget is `budget`.
    pub fn new(source: Arc<dyn WaitSource>, budget: Duration, sticky: StickyPolicy) -> Self {
        SloAdvice {
            source,
            budget,
            sticky,
        }
    }

    /// The wait budget that applies to the request (its priority's).
    pub fn budget(&self) -> Duration {
        self.budget
    }

    /// The configured policy for sticky sessions.
    pub fn sticky_policy(&self) -> StickyPolicy {
        self.sticky
    }

    /// The estimated wait of replica `index` now, if it is eligible (and `version` is the
    /// current membership).
    pub fn estimated_wait(&self, version: u64, index: usize) -> Option<Duration> {
        self.source.wait(version, index)
    }

    /// Whether replica `index` is over the budget now.
    pub fn is_over_budget(&self, version: u64, index: usize) -> bool {
        self.estimated_wait(version, index)
            .is_some_and(|w| w > self.budget)
    }

    /// Whether a session homed on replica `home` should move, under the sticky policy (the
    /// affinity layer then places it on a replica that is not over budget, or keeps it home if
    /// every candidate is).
    pub fn should_leave_home(&self, version: u64, home: usize) -> bool {
        match self.estimated_wait(version, home) {
            Some(w) if w > self.budget => match self.sticky {
                StickyPolicy::Spill => true,
                StickyPolicy::Wait { max_wait } => w > max_wait,
            },
            _ => false,
        }
    }
}
