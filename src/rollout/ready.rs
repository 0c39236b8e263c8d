//! Waiting until a replica passes its probe.

use std::time::Duration;

use tokio::time::Instant;

use crate::backend::Backend;
use crate::error::BoxError;
use crate::replica::ReplicaId;
use crate::rollout::config::ReadyGate;
use crate::rollout::error::StepError;
use crate::rollout::event::{RolloutEvent, Sinks};
use crate::rollout::{PHASE_SECONDS_HISTOGRAM, PROBE_FAILURES_COUNTER};

/// How a replica became ready.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Readiness {
    /// Probes sent, the passing ones included.
    pub probes: u32,
    /// Time from the first probe to readiness.
    pub waited: Duration,
}

/// Probes `backend` through [`Backend::probe`] until it passes `gate.consecutive` times in a row,
/// every `gate.interval`, each probe bounded by `gate.probe_timeout`; fails with
/// [`StepError::NotReady`] when `gate.timeout` passes first. The first probe goes at once.
/// `on_failure(attempt, error)` hears about every failed probe.
///
/// ```
/// use replica_router::backend::ServiceBackend;
/// use replica_router::rollout::{wait_until_ready, ReadyGate};
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let replica = ServiceBackend::new(tower::service_fn(|_req: ()| async {
///     Ok::<_, std::convert::Infallible>(())
/// }));
/// let ready = wait_until_ready(&replica, &ReadyGate::default(), |_, _| {}).await.unwrap();
/// assert_eq!(ready.probes, 1);
/// # }
/// ```
pub async fn wait_until_ready<B: Backend>(
    backend: &B,
    gate: &ReadyGate,
    mut on_failure: impl FnMut(u32, &str),
) -> Result<Readiness, StepError> {
    let start = Instant::now();
    let deadline = start + gate.timeout;
    let interval = gate.interval.max(Duration::from_millis(1));
    let need = gate.consecutive.max(1);
    let mut probes = 0u32;
    let mut streak = 0u32;
    let mut last_error = String::from("no probe sent");
    loop {
        let sent = Instant::now();
        probes = probes.saturating_add(1);
        match tokio::time::timeout(gate.probe_timeout, backend.probe()).await {
            Ok(Ok(())) => {
                streak += 1;
                if streak >= need {
                    return Ok(Readiness {
                        probes,
                        waited: sent.saturating_duration_since(start),
                    });
                }
            }
            Ok(Err(e)) => {
                streak = 0;
                last_error = e.to_string();
            }
            Err(_) => {
                streak = 0;
                last_error = format!("probe timed out after {:?}", gate.probe_timeout);
            }
        }
        if streak == 0 {
            metrics::counter!(PROBE_FAILURES_COUNTER).increment(1);
            on_failure(probes, &last_error);
        }
        let next = sent + interval;
        if next > deadline {
            return Err(StepError::NotReady {
                probes,
                waited: Instant::now().saturating_duration_since(start),
                last_error,
            });
        }
        tokio::time::sleep_until(next).await;
    }
}

/// Runs one replica's action (restart, upgrade, start) under `limit`: emits
/// [`RolloutEvent::ActionStarted`] and [`RolloutEvent::ActionFinished`] and records the phase
/// time. `make` builds the action's future after the start event.
pub(crate) async fn run_action<Fut, E>(
    sinks: &Sinks,
    id: &ReplicaId,
    limit: Option<Duration>,
    make: impl FnOnce() -> Fut,
) -> Result<(), StepError>
where
    Fut: std::future::Future<Output = Result<(), E>>,
    E: Into<BoxError>,
{
    sinks.emit(RolloutEvent::ActionStarted {
        replica: id.clone(),
    });
    let t = Instant::now();
    let fut = make();
    let result = match limit {
        Some(limit) => tokio::time::timeout(limit, fut)
            .await
            .map_err(|_| StepError::ActionTimedOut(limit))?,
        None => fut.await,
    };
    result.map_err(|e| StepError::Action(e.into()))?;
    metrics::histogram!(PHASE_SECONDS_HISTOGRAM, "phase" => "action")
        .record(t.elapsed().as_secs_f64());
    sinks.emit(RolloutEvent::ActionFinished {
        replica: id.clone(),
        took: t.elapsed(),
    });
    Ok(())
}

/// The ready gate of one replica: [`wait_until_ready`] with a [`RolloutEvent::ProbeFailed`] for
/// every failed probe, then the phase time and [`RolloutEvent::Ready`].
pub(crate) async fn ready_gate<B: Backend>(
    sinks: &Sinks,
    id: &ReplicaId,
    backend: &B,
    gate: &ReadyGate,
) -> Result<(), StepError> {
    let t = Instant::now();
    let ready = wait_until_ready(backend, gate, |attempt, error| {
        sinks.emit(RolloutEvent::ProbeFailed {
            replica: id.clone(),
            attempt,
            error: error.to_owned(),
        })
    })
    .await?;
    metrics::histogram!(PHASE_SECONDS_HISTOGRAM, "phase" => "ready")
        .record(t.elapsed().as_secs_f64());
    sinks.emit(RolloutEvent::Ready {
        replica: id.clone(),
        probes: ready.probes,
        waited: ready.waited,
    });
    Ok(())
}
