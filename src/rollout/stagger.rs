//! Admitting new replicas a few at a time.

use std::future::Future;

use futures_util::stream::{FuturesUnordered, StreamExt};
use parking_lot::Mutex;
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::backend::Backend;
use crate::error::BoxError;
use crate::pool::{Health, Pool};
use crate::replica::PoolError;
use crate::replica::{ReplicaId, ReplicaSpec};
use crate::rollout::config::StaggerConfig;
use crate::rollout::error::{RolloutError, StepError};
use crate::rollout::event::{conclude, RolloutEvent, RolloutReport, Sinks};
use crate::rollout::ready::{ready_gate, run_action};
use crate::rollout::STAGGER_REPLICAS_COUNTER;

/// A replica to start and add to a pool.
#[derive(Debug, Clone)]
pub struct NewReplica<B> {
    id: String,
    spec: ReplicaSpec,
    backend: B,
}

impl<B> NewReplica<B> {
    /// A replica with this id, spec and backend (validated when the staggered start runs).
    pub fn new(id: impl Into<String>, spec: ReplicaSpec, backend: B) -> Self {
        NewReplica {
            id: id.into(),
            spec,
            backend,
        }
    }

    /// Its id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Its spec.
    pub fn spec(&self) -> &ReplicaSpec {
        &self.spec
    }

    /// Its backend.
    pub fn backend(&self) -> &B {
        &self.backend
    }
}

/// Starts new replicas a few at a time (default one) and adds each to the pool only once its
/// probe passes, so N replicas do not download N copies of the weights at once. See the
/// [module docs](crate::rollout).
pub struct StaggeredStart<B> {
    pool: Pool<B>,
    config: StaggerConfig,
    sinks: Sinks,
}

impl<B> std::fmt::Debug for StaggeredStart<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StaggeredStart")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl<B> StaggeredStart<B> {
    /// Adds replicas to `pool` with `config`.
    pub fn new(pool: Pool<B>, config: StaggerConfig) -> Self {
        StaggeredStart {
            pool,
            config,
            sinks: Sinks::default(),
        }
    }

    /// Calls `f` with every event, inline.
    pub fn on_event(mut self, f: impl Fn(&RolloutEvent) + Send + Sync + 'static) -> Self {
        self.sinks.push(f);
        self
    }

    /// A channel that receives every event.
    pub fn events(&mut self) -> mpsc::UnboundedReceiver<RolloutEvent> {
        self.sinks.channel()
    }

    /// The settings.
    pub fn config(&self) -> &StaggerConfig {
        &self.config
    }
}

impl<B: Backend> StaggeredStart<B> {
    /// Admits replicas that are already starting (their processes launched elsewhere): each
    /// joins the pool, one at a time, once its probe passes.
    pub async fn admit<I>(self, replicas: I) -> Result<RolloutReport, RolloutError>
    where
        I: IntoIterator<Item = NewReplica<B>>,
    {
        self.run(replicas, |_| {
            std::future::ready(Ok::<(), std::convert::Infallible>(()))
        })
        .await
    }

    /// For each replica in order, at most `max_concurrent` at a time and `min_interval` apart:
    /// run `start` (launch the engine, which loads its weights), wait until the replica's probe
    /// passes, add it to the pool (its slow-start ramp begins), and keep its slot for the settle
    /// period.
    ///
    /// Every replica is checked first ([`Pool::check_new`]): a duplicate id or a spec the pool
    /// rejects fails with [`RolloutError::Pool`] before anything starts. On the first failed
    /// step no further replica starts, the ones in progress finish, and the failed replica is
    /// not added (or, if it became unhealthy while settling, is left drained).
    pub async fn run<I, F, Fut, E>(
        self,
        replicas: I,
        start: F,
    ) -> Result<RolloutReport, RolloutError>
    where
        I: IntoIterator<Item = NewReplica<B>>,
        F: FnMut(NewReplica<B>) -> Fut,
        Fut: Future<Output = Result<(), E>>,
        E: Into<BoxError>,
    {
        self.config.validate()?;
        let started = Instant::now();
        let mut queue = self.check(replicas.into_iter().collect())?;
        let total = queue.len();
        self.sinks.emit(RolloutEvent::Started {
            replicas: queue.iter().map(|(id, _)| id.clone()).collect(),
        });
        queue.reverse(); // pop from the back in the given order

        let start = Mutex::new(start);
        let mut running = FuturesUnordered::new();
        let mut report = RolloutReport::default();
        let mut first_error: Option<(ReplicaId, StepError)> = None;
        let mut last_start: Option<Instant> = None;

        loop {
            let mut next_allowed = None;
            while first_error.is_none() && running.len() < self.config.max_concurrent {
                if queue.is_empty() {
                    break;
                }
                if let Some(t) = last_start {
                    let at = t + self.config.min_interval;
                    if Instant::now() < at {
                        next_allowed = Some(at);
                        break;
                    }
                }
                let Some((id, replica)) = queue.pop() else {
                    break;
                };
                last_start = Some(Instant::now());
                let step = self.start_one(&start, id.clone(), replica);
                running.push(async move { (id, step.await) });
                report.peak_in_progress = report.peak_in_progress.max(running.len());
            }

            if running.is_empty() {
                match next_allowed {
                    Some(at) if first_error.is_none() => {
                        tokio::time::sleep_until(at).await;
                        continue;
                    }
                    _ => break,
                }
            }

            let wake = next_allowed.unwrap_or_else(Instant::now);
            tokio::select! {
                Some((id, result)) = running.next() => match result {
                    Ok(()) => {
                        metrics::counter!(STAGGER_REPLICAS_COUNTER, "result" => "added").increment(1);
                        report.completed.push(id.clone());
                        self.sinks.emit(RolloutEvent::ReplicaDone {
                            replica: id,
                            done: report.completed.len(),
                            total,
                        });
                    }
                    Err(e) => {
                        metrics::counter!(STAGGER_REPLICAS_COUNTER, "result" => "failed").increment(1);
                        report.failed.push(id.clone());
                        self.sinks.emit(RolloutEvent::ReplicaFailed {
                            replica: id.clone(),
                            error: e.to_string(),
                        });
                        if first_error.is_none() {
                            first_error = Some((id, e));
                        }
                    }
                },
                _ = tokio::time::sleep_until(wake), if next_allowed.is_some() => {}
            }
        }

        report.not_started = queue.into_iter().rev().map(|(id, _)| id).collect();
        conclude(&self.sinks, report, started, first_error)
    }

    /// Validates every new replica against the pool and against each other.
    fn check(
        &self,
        replicas: Vec<NewReplica<B>>,
    ) -> Result<Vec<(ReplicaId, NewReplica<B>)>, RolloutError> {
        let policy = self.pool.spec_policy();
        let mut out: Vec<(ReplicaId, NewReplica<B>)> = Vec::with_capacity(replicas.len());
        for r in replicas {
            let id = self.pool.check_new(&r.id, &r.spec)?;
            if out.iter().any(|(other, _)| other == &id) {
                return Err(PoolError::DuplicateReplica(id).into());
            }
            if self.pool.snapshot().is_empty() {
                if let Some((_, first)) = out.first() {
                    policy.check(&first.spec, &id, &r.spec)?;
                }
            }
            out.push((id, r));
        }
        Ok(out)
    }

    /// Start action, ready gate, addition and settle for one replica.
    async fn start_one<F, Fut, E>(
        &self,
        start: &Mutex<F>,
        id: ReplicaId,
        replica: NewReplica<B>,
    ) -> Result<(), StepError>
    where
        F: FnMut(NewReplica<B>) -> Fut,
        Fut: Future<Output = Result<(), E>>,
        E: Into<BoxError>,
    {
        let cfg = &self.config;
        run_action(&self.sinks, &id, cfg.action_timeout, || {
            let mut f = start.lock();
            (*f)(replica.clone())
        })
        .await?;

        ready_gate(&self.sinks, &id, &replica.backend, &cfg.ready).await?;

        let NewReplica { spec, backend, .. } = replica;
        self.pool
            .add(id.as_str(), spec, backend)
            .map_err(StepError::Join)?;
        self.sinks.emit(RolloutEvent::Added {
            replica: id.clone(),
        });

        if !cfg.settle.is_zero() {
            tokio::time::sleep(cfg.settle).await;
            if let Some((_, r)) = self.pool.snapshot().get(id.as_str()) {
                let health = r.state().health();
                if health != Health::Healthy {
                    let _ = self.pool.drain(id.as_str());
                    return Err(StepError::Unstable { health });
                }
            }
        }
        Ok(())
    }
}
