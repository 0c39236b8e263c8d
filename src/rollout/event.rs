//! Progress events and the final report.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;

use crate::replica::ReplicaId;
use crate::rollout::error::{RolloutError, StepError};

/// What a rollout or staggered start is doing, as it happens.
///
/// Subscribe with `on_event` (a callback, called inline: keep it short) or `events` (a channel)
/// on [`Rollout`](crate::rollout::Rollout) and [`StaggeredStart`](crate::rollout::StaggeredStart).
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum RolloutEvent {
    /// The run began with these replicas, in this order (already-unavailable ones may go first).
    Started {
        /// The replicas to process.
        replicas: Vec<ReplicaId>,
    },
    /// No replica can be taken out now: these are out of service and use the whole budget.
    Waiting {
        /// The replicas out of service.
        unavailable: Vec<ReplicaId>,
    },
    /// The replica stopped taking new requests; `in_flight` requests are finishing.
    Draining {
        /// The replica.
        replica: ReplicaId,
        /// Requests in flight when the drain began.
        in_flight: u64,
    },
    /// The replica has no request in flight any more.
    Drained {
        /// The replica.
        replica: ReplicaId,
        /// How long the drain took.
        waited: Duration,
    },
    /// The drain timeout passed with requests still in flight.
    DrainTimedOut {
        /// The replica.
        replica: ReplicaId,
        /// Requests still in flight.
        in_flight: u64,
    },
    /// The action (restart, upgrade, start) began.
    ActionStarted {
        /// The replica.
        replica: ReplicaId,
    },
    /// The action returned successfully.
    ActionFinished {
        /// The replica.
        replica: ReplicaId,
        /// How long it took.
        took: Duration,
    },
    /// A readiness probe failed (the replica may still be loading its weights).
    ProbeFailed {
        /// The replica.
        replica: ReplicaId,
        /// 1 for the first probe.
        attempt: u32,
        /// The probe's error.
        error: String,
    },
    /// The replica passed its ready gate.
    Ready {
        /// The replica.
        replica: ReplicaId,
        /// Probes sent.
        probes: u32,
        /// Time from the end of the action to readiness.
        waited: Duration,
    },
    /// The restarted replica takes requests again, starting its slow-start ramp.
    Readmitted {
        /// The replica.
        replica: ReplicaId,
    },
    /// The new replica joined the pool, starting its slow-start ramp.
    Added {
        /// The replica.
        replica: ReplicaId,
    },
    /// The replica is done (readmitted or added, and settled).
    ReplicaDone {
        /// The replica.
        replica: ReplicaId,
        /// Replicas done so far.
        done: usize,
        /// Replicas in the run.
        total: usize,
    },
    /// The replica's step failed; it is left out of service and the run stops.
    ReplicaFailed {
        /// The replica.
        replica: ReplicaId,
        /// Why (the [`StepError`](crate::rollout::StepError) as text).
        error: String,
    },
    /// The replica left the pool during the run (removed by someone else) and was skipped.
    Skipped {
        /// The replica.
        replica: ReplicaId,
    },
    /// The run ended.
    Finished {
        /// Whether every replica was done.
        success: bool,
    },
}

/// What a rollout or staggered start did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RolloutReport {
    /// Replicas done (restarted and readmitted, or started and added), in completion order.
    pub completed: Vec<ReplicaId>,
    /// Replicas whose step failed; they are left out of service (drained, or never added).
    pub failed: Vec<ReplicaId>,
    /// Replicas that left the pool during the run.
    pub skipped: Vec<ReplicaId>,
    /// Replicas never started because the run stopped.
    pub not_started: Vec<ReplicaId>,
    /// Replicas restarted with requests still in flight after the drain timeout.
    pub drain_timeouts: Vec<ReplicaId>,
    /// Most replicas the run itself held out of service at once (never above the budget).
    pub peak_in_progress: usize,
    /// Wall time of the run.
    pub elapsed: Duration,
}

type Callback = Arc<dyn Fn(&RolloutEvent) + Send + Sync>;

/// Where events go.
#[derive(Clone, Default)]
pub(crate) struct Sinks {
    callbacks: Vec<Callback>,
}

impl std::fmt::Debug for Sinks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Sinks({})", self.callbacks.len())
    }
}

impl Sinks {
    pub(crate) fn push(&mut self, f: impl Fn(&RolloutEvent) + Send + Sync + 'static) {
        self.callbacks.push(Arc::new(f));
    }

    pub(crate) fn channel(&mut self) -> mpsc::UnboundedReceiver<RolloutEvent> {
        let (tx, rx) = mpsc::unbounded_channel();
        self.push(move |e| {
            // A dropped receiver only means nobody listens any more.
            let _ = tx.send(e.clone());
        });
        rx
    }

    pub(crate) fn emit(&self, event: RolloutEvent) {
        for f in &self.callbacks {
            f(&event);
        }
    }
}

/// Ends a run: records the elapsed time, emits [`RolloutEvent::Finished`], and returns the
/// report, or [`RolloutError::ReplicaFailed`] for the first replica that failed.
pub(crate) fn conclude(
    sinks: &Sinks,
    mut report: RolloutReport,
    started: tokio::time::Instant,
    first_error: Option<(ReplicaId, StepError)>,
) -> Result<RolloutReport, RolloutError> {
    report.elapsed = started.elapsed();
    sinks.emit(RolloutEvent::Finished {
        success: first_error.is_none(),
    });
    match first_error {
        None => Ok(report),
        Some((replica, cause)) => Err(RolloutError::ReplicaFailed {
            replica,
            cause,
            report: Box::new(report),
        }),
    }
}
