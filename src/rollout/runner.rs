//! The rolling restart.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::Arc;

use futures_util::stream::{FuturesUnordered, StreamExt};
use parking_lot::Mutex;
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::backend::Backend;
use crate::error::BoxError;
use crate::pool::{Health, Pool, Replica};
use crate::replica::PoolError;
use crate::replica::ReplicaId;
use crate::rollout::config::{DrainTimeoutPolicy, RolloutConfig};
use crate::rollout::error::{RolloutError, StepError};
use crate::rollout::event::{conclude, RolloutEvent, RolloutReport, Sinks};
use crate::rollout::ready::{ready_gate, run_action};
use crate::rollout::{PHASE_SECONDS_HISTOGRAM, REPLICAS_COUNTER, UNAVAILABLE_GAUGE};

/// Restarts (or upgrades) a pool's replicas in place, at most
/// [`max_unavailable`](RolloutConfig::max_unavailable) at a time. See the
/// [module docs](crate::rollout).
pub struct Rollout<B> {
    pool: Pool<B>,
    config: RolloutConfig,
    targets: Option<Vec<String>>,
    sinks: Sinks,
}

impl<B> std::fmt::Debug for Rollout<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rollout")
            .field("config", &self.config)
            .field("targets", &self.targets)
            .finish_non_exhaustive()
    }
}

/// How one replica's step ended, when it did not fail.
enum StepOutcome {
    Done {
        drain_timed_out: bool,
    },
    /// The replica left the pool during the step.
    Gone,
}

/// What the scheduler may do next.
enum Next<B> {
    Start(Arc<Replica<B>>),
    Wait(Vec<ReplicaId>),
    Empty,
}

impl<B> Rollout<B> {
    /// A rollout over every replica of `pool`, in pool order.
    pub fn new(pool: Pool<B>, config: RolloutConfig) -> Self {
        Rollout {
            pool,
            config,
            targets: None,
            sinks: Sinks::default(),
        }
    }

    /// Restricts the rollout to these replicas, in this order (a canary first, for example).
    pub fn replicas<I, S>(mut self, ids: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        self.targets = Some(ids.into_iter().map(|s| s.as_ref().to_owned()).collect());
        self
    }

    /// Calls `f` with every event, inline (keep it short; send to a channel for slow work).
    pub fn on_event(mut self, f: impl Fn(&RolloutEvent) + Send + Sync + 'static) -> Self {
        self.sinks.push(f);
        self
    }

    /// A channel that receives every event (unbounded: events are few, one handful per
    /// replica).
    pub fn events(&mut self) -> mpsc::UnboundedReceiver<RolloutEvent> {
        self.sinks.channel()
    }

    /// The settings.
    pub fn config(&self) -> &RolloutConfig {
        &self.config
    }
}

impl<B: Backend> Rollout<B> {
    /// Runs the rollout: for each replica, drain, wait for its in-flight requests (up to the
    /// drain timeout), mark it unhealthy, run `action` on it, wait until its probe passes,
    /// re-admit it with slow start, and keep its slot for the settle period.
    ///
    /// On the first failed step no further replica is started, the steps in progress finish,
    /// and the error names the failed replica (left drained) and carries the report.
    pub async fn run<F, Fut, E>(self, action: F) -> Result<RolloutReport, RolloutError>
    where
        F: FnMut(Arc<Replica<B>>) -> Fut,
        Fut: Future<Output = Result<(), E>>,
        E: Into<BoxError>,
    {
        self.config.validate()?;
        let started = Instant::now();
        let mut queue = self.resolve_targets()?;
        let total = queue.len();
        self.sinks.emit(RolloutEvent::Started {
            replicas: queue.iter().cloned().collect(),
        });

        let action = Mutex::new(action);
        let mut running = FuturesUnordered::new();
        let mut in_progress: Vec<ReplicaId> = Vec::new();
        let mut report = RolloutReport::default();
        let mut first_error: Option<(ReplicaId, StepError)> = None;
        let mut changes = self.pool.subscribe();
        let mut blocked_since: Option<Instant> = None;
        let mut last_waiting: Option<Vec<ReplicaId>> = None;

        loop {
            let mut waiting_on = None;
            if first_error.is_none() {
                changes.borrow_and_update();
                loop {
                    match self.next_target(&mut queue, &in_progress, &mut report) {
                        Next::Start(replica) => {
                            let id = replica.id().clone();
                            in_progress.push(id.clone());
                            report.peak_in_progress =
                                report.peak_in_progress.max(in_progress.len());
                            metrics::gauge!(UNAVAILABLE_GAUGE).set(in_progress.len() as f64);
                            let step = self.restart_one(&action, replica);
                            running.push(async move { (id, step.await) });
                        }
                        Next::Wait(out) => {
                            waiting_on = Some(out);
                            break;
                        }
                        Next::Empty => break,
                    }
                }
            }

            if running.is_empty() {
                let Some(out) = waiting_on.filter(|_| first_error.is_none()) else {
                    break;
                };
                // Blocked by replicas that are out of service for other reasons.
                let now = Instant::now();
                let since = *blocked_since.get_or_insert(now);
                if last_waiting.as_ref() != Some(&out) {
                    self.sinks.emit(RolloutEvent::Waiting {
                        unavailable: out.clone(),
                    });
                    last_waiting = Some(out.clone());
                }
                let deadline = since + self.config.blocked_timeout;
                if now >= deadline {
                    report.not_started = queue.into_iter().collect();
                    report.elapsed = started.elapsed();
                    self.sinks.emit(RolloutEvent::Finished { success: false });
                    return Err(RolloutError::Blocked {
                        unavailable: out,
                        waited: now - since,
                        report: Box::new(report),
                    });
                }
                tokio::select! {
                    r = changes.changed() => {
                        if r.is_err() {
                            // Cannot happen while we hold the pool; do not spin if it does.
                            tokio::time::sleep_until(deadline).await;
                        }
                    }
                    _ = tokio::time::sleep_until(deadline) => {}
                }
                continue;
            }
            blocked_since = None;
            last_waiting = None;

            let can_start_more = first_error.is_none() && !queue.is_empty();
            tokio::select! {
                Some((id, result)) = running.next() => {
                    in_progress.retain(|r| r != &id);
                    metrics::gauge!(UNAVAILABLE_GAUGE).set(in_progress.len() as f64);
                    if let Err(e) = self.record_step(&mut report, id.clone(), result, total) {
                        first_error.get_or_insert((id, e));
                    }
                }
                r = changes.changed(), if can_start_more => {
                    if r.is_err() {
                        // Cannot happen while we hold the pool; wait for the steps instead.
                        std::future::pending::<()>().await;
                    }
                }
            }
        }

        report.not_started = queue.into_iter().collect();
        conclude(&self.sinks, report, started, first_error)
    }

    /// Records one replica's finished step in the report, the metrics and the sinks; a failed
    /// step's error is handed back.
    fn record_step(
        &self,
        report: &mut RolloutReport,
        id: ReplicaId,
        result: Result<StepOutcome, StepError>,
        total: usize,
    ) -> Result<(), StepError> {
        match result {
            Ok(StepOutcome::Done { drain_timed_out }) => {
                if drain_timed_out {
                    report.drain_timeouts.push(id.clone());
                }
                report.completed.push(id.clone());
                metrics::counter!(REPLICAS_COUNTER, "result" => "done").increment(1);
                self.sinks.emit(RolloutEvent::ReplicaDone {
                    replica: id,
                    done: report.completed.len(),
                    total,
                });
                Ok(())
            }
            Ok(StepOutcome::Gone) => {
                metrics::counter!(REPLICAS_COUNTER, "result" => "skipped").increment(1);
                report.skipped.push(id.clone());
                self.sinks.emit(RolloutEvent::Skipped { replica: id });
                Ok(())
            }
            Err(e) => {
                metrics::counter!(REPLICAS_COUNTER, "result" => "failed").increment(1);
                report.failed.push(id.clone());
                self.sinks.emit(RolloutEvent::ReplicaFailed {
                    replica: id,
                    error: e.to_string(),
                });
                Err(e)
            }
        }
    }

    /// The targets, checked, with the ones already out of service first (restarting them costs
    /// no capacity).
    fn resolve_targets(&self) -> Result<VecDeque<ReplicaId>, RolloutError> {
        let snap = self.pool.snapshot();
        let ids: Vec<ReplicaId> = match &self.targets {
            None => snap.replicas().iter().map(|r| r.id().clone()).collect(),
            Some(names) => {
                let mut ids: Vec<ReplicaId> = Vec::with_capacity(names.len());
                for name in names {
                    let (_, r) = snap.get(name).ok_or_else(|| {
                        PoolError::UnknownReplica(ReplicaId::new(name).unwrap_or_else(|_| {
                            ReplicaId::new("<invalid id>").expect("valid literal")
                        }))
                    })?;
                    if ids.contains(r.id()) {
                        return Err(RolloutError::InvalidConfig(
                            "a replica is listed twice in the rollout",
                        ));
                    }
                    ids.push(r.id().clone());
                }
                ids
            }
        };
        let out = |id: &ReplicaId| {
            snap.get(id.as_str())
                .is_some_and(|(_, r)| !r.state().is_eligible())
        };
        let (mut first, rest): (Vec<_>, Vec<_>) = ids.into_iter().partition(|id| out(id));
        first.extend(rest);
        Ok(first.into())
    }

    /// The next replica to take out, if the budget allows.
    fn next_target(
        &self,
        queue: &mut VecDeque<ReplicaId>,
        in_progress: &[ReplicaId],
        report: &mut RolloutReport,
    ) -> Next<B> {
        let snap = self.pool.snapshot();
        queue.retain(|id| {
            let present = snap.get(id.as_str()).is_some();
            if !present {
                metrics::counter!(REPLICAS_COUNTER, "result" => "skipped").increment(1);
                report.skipped.push(id.clone());
                self.sinks.emit(RolloutEvent::Skipped {
                    replica: id.clone(),
                });
            }
            present
        });
        if queue.is_empty() {
            return Next::Empty;
        }
        let mut out: Vec<ReplicaId> = in_progress.to_vec();
        if self.config.count_other_unavailable {
            for r in snap.replicas() {
                if !r.state().is_eligible() && !out.contains(r.id()) {
                    out.push(r.id().clone());
                }
            }
            // A target that is already out of service costs nothing to take.
            if let Some(pos) = queue.iter().position(|id| out.contains(id)) {
                if let Some((_, r)) = queue.remove(pos).and_then(|id| snap.get(id.as_str())) {
                    return Next::Start(r.clone());
                }
            }
        }
        if out.len() < self.config.max_unavailable {
            if let Some((_, r)) = queue.pop_front().and_then(|id| snap.get(id.as_str())) {
                return Next::Start(r.clone());
            }
        }
        Next::Wait(out)
    }

    /// Drain, action, ready gate, readmission and settle for one replica.
    async fn restart_one<F, Fut, E>(
        &self,
        action: &Mutex<F>,
        replica: Arc<Replica<B>>,
    ) -> Result<StepOutcome, StepError>
    where
        F: FnMut(Arc<Replica<B>>) -> Fut,
        Fut: Future<Output = Result<(), E>>,
        E: Into<BoxError>,
    {
        let pool = &self.pool;
        let cfg = &self.config;
        let id = replica.id().clone();

        // 1. Drain: no new request or session from now on; in-flight ones finish.
        let in_flight = replica.state().in_flight();
        let Ok(drain) = pool.drain(id.as_str()) else {
            return Ok(StepOutcome::Gone);
        };
        self.sinks.emit(RolloutEvent::Draining {
            replica: id.clone(),
            in_flight,
        });
        let t = Instant::now();
        let mut drain_timed_out = false;
        if tokio::time::timeout(cfg.drain_timeout, drain.wait())
            .await
            .is_err()
        {
            let left = replica.state().in_flight();
            self.sinks.emit(RolloutEvent::DrainTimedOut {
                replica: id.clone(),
                in_flight: left,
            });
            if cfg.on_drain_timeout == DrainTimeoutPolicy::Abort {
                return Err(StepError::DrainTimedOut { in_flight: left });
            }
            drain_timed_out = true;
        } else {
            self.sinks.emit(RolloutEvent::Drained {
                replica: id.clone(),
                waited: t.elapsed(),
            });
        }
        metrics::histogram!(PHASE_SECONDS_HISTOGRAM, "phase" => "drain")
            .record(t.elapsed().as_secs_f64());

        // 2. Out of service: unhealthy (gauges and dashboards show it) as well as draining.
        if pool.set_health(id.as_str(), Health::Unhealthy).is_err() {
            return Ok(StepOutcome::Gone);
        }

        // 3. The action.
        run_action(&self.sinks, &id, cfg.action_timeout, || {
            let mut f = action.lock();
            (*f)(replica.clone())
        })
        .await?;

        // 4. Ready gate: the replica reloads its weights; it stays out until its probe passes.
        ready_gate(&self.sinks, &id, replica.backend(), &cfg.ready).await?;

        // 5. Readmit: healthy with the slow-start ramp begun while still draining, then open.
        if pool.readmit(id.as_str()).is_err() || pool.undrain(id.as_str()).is_err() {
            return Ok(StepOutcome::Gone);
        }
        self.sinks.emit(RolloutEvent::Readmitted {
            replica: id.clone(),
        });

        // 6. Settle: the slot stays taken; the replica must still be healthy at the end.
        if !cfg.settle.is_zero() {
            tokio::time::sleep(cfg.settle).await;
            let health = replica.state().health();
            if health != Health::Healthy && pool.snapshot().get(id.as_str()).is_some() {
                // Left drained, like every failed step, so nothing re-admits it behind our back.
                let _ = pool.drain(id.as_str());
                return Err(StepError::Unstable { health });
            }
        }
        Ok(StepOutcome::Done { drain_timed_out })
    }
}
