//! Settings of rollouts and staggered starts.

use std::time::Duration;

use crate::rollout::error::RolloutError;

/// When a restarted or new replica counts as ready: its [`Backend::probe`] must pass
/// `consecutive` times in a row, probing every `interval`, within `timeout` overall.
///
/// The default `timeout` is long (15 minutes) on purpose: a replica that restarts loads its
/// weights again, from local disk or object storage, and a 70B model takes minutes.
///
/// [`Backend::probe`]: crate::backend::Backend::probe
#[derive(Debug, Clone, PartialEq)]
pub struct ReadyGate {
    /// Time between probes (from the start of one to the start of the next). Default 2 s.
    pub interval: Duration,
    /// A probe slower than this fails. Default 5 s.
    pub probe_timeout: Duration,
    /// Give up when the replica is not ready this long after the gate opened. Default 15 min.
    pub timeout: Duration,
    /// Passed probes in a row that make the replica ready. Default 1.
    pub consecutive: u32,
}

impl Default for ReadyGate {
    fn default() -> Self {
        ReadyGate {
            interval: Duration::from_secs(2),
            probe_timeout: Duration::from_secs(5),
            timeout: Duration::from_secs(15 * 60),
            consecutive: 1,
        }
    }
}

impl ReadyGate {
    pub(crate) fn validate(&self) -> Result<(), RolloutError> {
        if self.interval.is_zero() {
            return Err(RolloutError::InvalidConfig(
                "ready gate interval must be > 0",
            ));
        }
        if self.probe_timeout.is_zero() {
            return Err(RolloutError::InvalidConfig(
                "ready gate probe timeout must be > 0",
            ));
        }
        if self.consecutive == 0 {
            return Err(RolloutError::InvalidConfig(
                "ready gate needs at least one passed probe",
            ));
        }
        Ok(())
    }
}

/// What a rollout does when a replica still has requests in flight at the drain timeout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DrainTimeoutPolicy {
    /// Run the action anyway (the restart cuts the remaining streams). The replica is listed in
    /// [`RolloutReport::drain_timeouts`](crate::rollout::RolloutReport::drain_timeouts).
    #[default]
    Proceed,
    /// Abort the rollout with
    /// [`StepError::DrainTimedOut`](crate::rollout::StepError::DrainTimedOut); the replica stays
    /// drained and its streams finish.
    Abort,
}

/// Settings of a [`Rollout`](crate::rollout::Rollout).
#[derive(Debug, Clone, PartialEq)]
pub struct RolloutConfig {
    /// Most replicas out of service at once. Default 1. With
    /// [`count_other_unavailable`](Self::count_other_unavailable), replicas that are unhealthy,
    /// ejected or draining for other reasons use this budget too.
    pub max_unavailable: usize,
    /// How long to wait for a draining replica's in-flight requests (streams included). Default
    /// 5 minutes.
    pub drain_timeout: Duration,
    /// What to do when the drain timeout passes first. Default: proceed.
    pub on_drain_timeout: DrainTimeoutPolicy,
    /// Bound on the action (restart, upgrade); `None` (the default) waits as long as it takes.
    pub action_timeout: Option<Duration>,
    /// When the replica counts as ready again after the action.
    pub ready: ReadyGate,
    /// How long a readmitted replica keeps its slot before the next one goes down (its
    /// slow-start ramp, a canary look at its errors). After it the replica must still be
    /// healthy, or the rollout aborts with
    /// [`StepError::Unstable`](crate::rollout::StepError::Unstable). Default 0.
    pub settle: Duration,
    /// Count replicas that are out for other reasons (unhealthy, ejected, draining) against
    /// [`max_unavailable`](Self::max_unavailable), as Kubernetes does. Default true.
    pub count_other_unavailable: bool,
    /// How long the rollout may wait for other replicas to come back before it gives up with
    /// [`RolloutError::Blocked`]. Default 10 minutes.
    pub blocked_timeout: Duration,
}

impl Default for RolloutConfig {
    fn default() -> Self {
        RolloutConfig {
            max_unavailable: 1,
            drain_timeout: Duration::from_secs(300),
            on_drain_timeout: DrainTimeoutPolicy::default(),
            action_timeout: None,
            ready: ReadyGate::default(),
            settle: Duration::ZERO,
            count_other_unavailable: true,
            blocked_timeout: Duration::from_secs(600),
        }
    }
}

impl RolloutConfig {
    pub(crate) fn validate(&self) -> Result<(), RolloutError> {
        if self.max_unavailable == 0 {
            return Err(RolloutError::InvalidConfig("max_unavailable must be >= 1"));
        }
        self.ready.validate()
    }
}

/// Settings of a [`StaggeredStart`](crate::rollout::StaggeredStart).
#[derive(Debug, Clone, PartialEq)]
pub struct StaggerConfig {
    /// Most replicas starting (loading weights) at once. Default 1.
    pub max_concurrent: usize,
    /// Least time between two starts, even when a slot is free. Default 0.
    pub min_interval: Duration,
    /// Bound on the start action; `None` (the default) waits as long as it takes.
    pub action_timeout: Option<Duration>,
    /// When a new replica is ready to join the pool.
    pub ready: ReadyGate,
    /// How long an admitted replica keeps its slot before the next one starts. Default 0.
    pub settle: Duration,
}

impl Default for StaggerConfig {
    fn default() -> Self {
        StaggerConfig {
            max_concurrent: 1,
            min_interval: Duration::ZERO,
            action_timeout: None,
            ready: ReadyGate::default(),
            settle: Duration::ZERO,
        }
    }
}

impl StaggerConfig {
    pub(crate) fn validate(&self) -> Result<(), RolloutError> {
        if self.max_concurrent == 0 {
            return Err(RolloutError::InvalidConfig("max_concurrent must be >= 1"));
        }
        self.ready.validate()
    }
}
