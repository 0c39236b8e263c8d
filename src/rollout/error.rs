//! Rollout errors.

use std::time::Duration;

use crate::error::BoxError;
use crate::pool::Health;
use crate::replica::PoolError;
use crate::replica::ReplicaId;
use crate::rollout::event::RolloutReport;

/// Why one replica's step failed. The replica is left out of service (drained, or for a
/// staggered start, never added).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StepError {
    /// Requests were still in flight at the drain timeout, under
    /// [`DrainTimeoutPolicy::Abort`](crate::rollout::DrainTimeoutPolicy::Abort).
    #[error("{in_flight} requests still in flight at the drain timeout")]
    DrainTimedOut {
        /// Requests in flight at the timeout.
        in_flight: u64,
    },
    /// The action (restart, upgrade, start) failed.
    #[error("action failed: {0}")]
    Action(#[source] BoxError),
    /// The action did not finish within its timeout.
    #[error("action did not finish within {0:?}")]
    ActionTimedOut(Duration),
    /// The replica's probe never passed within the ready gate's timeout.
    #[error("not ready after {probes} probes in {waited:?} (last error: {last_error})")]
    NotReady {
        /// Probes sent.
        probes: u32,
        /// Time spent probing.
        waited: Duration,
        /// The last probe's error.
        last_error: String,
    },
    /// The replica was not healthy any more at the end of the settle period (ejected by outlier
    /// detection, or marked unhealthy by the health checker).
    #[error("{} at the end of the settle period", .health.as_str())]
    Unstable {
        /// Its health then.
        health: Health,
    },
    /// A new replica could not join the pool (staggered start).
    #[error("could not join the pool: {0}")]
    Join(#[source] PoolError),
}

/// Why a rollout or staggered start did not complete.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RolloutError {
    /// A setting is out of range; nothing was touched.
    #[error("invalid rollout setting: {0}")]
    InvalidConfig(&'static str),
    /// A replica named in the rollout is not in the pool, or a new replica could not join it
    /// (duplicate id, invalid or mismatched spec); checked before anything was touched.
    #[error(transparent)]
    Pool(#[from] PoolError),
    /// A replica's step failed: no further replica was started, the ones in progress were
    /// finished, and the failed replica was left out of service.
    #[error("rollout aborted at replica {replica}: {cause}")]
    ReplicaFailed {
        /// The first replica that failed.
        replica: ReplicaId,
        /// Why.
        #[source]
        cause: StepError,
        /// What was done before stopping.
        report: Box<RolloutReport>,
    },
    /// Other replicas stayed out of service (unhealthy, ejected, draining) so long that the
    /// budget of unavailable replicas left no room to continue.
    #[error("rollout blocked for {waited:?}: {} replicas out of service ({unavailable:?})", .unavailable.len())]
    Blocked {
        /// The replicas out of service when the rollout gave up.
        unavailable: Vec<ReplicaId>,
        /// How long it waited.
        waited: Duration,
        /// What was done before stopping.
        report: Box<RolloutReport>,
    },
}

impl RolloutError {
    /// What was done before the rollout stopped, for the errors that stop a running rollout.
    pub fn report(&self) -> Option<&RolloutReport> {
        match self {
            RolloutError::ReplicaFailed { report, .. } | RolloutError::Blocked { report, .. } => {
                Some(report)
            }
            _ => None,
        }
    }
}
