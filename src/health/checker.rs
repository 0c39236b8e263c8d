//! Active health checks and load scraping on a background task.

use std::collections::HashMap;
use std::time::Duration;

use futures_util::future::join_all;
use tokio::task::JoinHandle;
use tokio::time::{Instant, MissedTickBehavior};

use crate::backend::Backend;
use crate::health::metrics::record_pool_metrics;
use crate::health::OutlierDetector;
use crate::load::WaitEstimator;
use crate::pool::{Health, Pool};
use crate::replica::ReplicaId;

/// How often and how strictly to probe.
#[derive(Debug, Clone, PartialEq)]
pub struct HealthCheckConfig {
    /// Time between probe rounds. Default 5 s.
    pub interval: Duration,
    /// A probe slower than this fails. Default 1 s.
    pub timeout: Duration,
    /// A healthy replica turns unhealthy after this many failed probes in a row. Default 2.
    pub unhealthy_threshold: u32,
    /// An unhealthy replica is re-admitted (with slow start) after this many passed probes in a
    /// row. Default 2.
    pub healthy_threshold: u32,
    /// Time between load-report scrapes ([`Backend::load_report`]) and per-replica metric
    /// updates; `None` scrapes nothing and updates metrics on probe rounds. Default 1 s.
    pub load_interval: Option<Duration>,
}

impl Default for HealthCheckConfig {
    fn default() -> Self {
        HealthCheckConfig {
            interval: Duration::from_secs(5),
            timeout: Duration::from_secs(1),
            unhealthy_threshold: 2,
            healthy_threshold: 2,
            load_interval: Some(Duration::from_secs(1)),
        }
    }
}

#[derive(Debug, Default, Clone, Copy)]
struct ProbeTrack {
    passes: u32,
    fails: u32,
}

/// What one probe round changed.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct ProbeRound {
    /// Replicas probed.
    pub probed: usize,
    /// Replicas whose probe failed.
    pub failed: Vec<ReplicaId>,
    /// Replicas marked unhealthy by this round.
    pub marked_unhealthy: Vec<ReplicaId>,
    /// Replicas re-admitted by this round (probes passing again, or an ejection ended).
    pub readmitted: Vec<ReplicaId>,
}

/// Probes every replica through [`Backend::probe`] (for HTTP replicas `GET /health`), marks
/// replicas unhealthy and back, scrapes [`Backend::load_report`] into the replica state (where
/// the [`WaitEstimator`] reads it), re-admits replicas whose outlier ejection ended, and updates
/// the per-replica metrics (see [`record_pool_metrics`]).
///
/// Run rounds yourself with [`probe_round`](Self::probe_round) and
/// [`scrape_round`](Self::scrape_round), or [`spawn`](Self::spawn) the loop on the current tokio
/// runtime. Ejected replicas are probed but left to their [`OutlierDetector`]; draining ones are
/// probed like any other.
pub struct HealthChecker<B> {
    pool: Pool<B>,
    config: HealthCheckConfig,
    estimator: WaitEstimator,
    outlier: Option<OutlierDetector<B>>,
    tracks: HashMap<ReplicaId, ProbeTrack>,
}

impl<B> std::fmt::Debug for HealthChecker<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HealthChecker")
            .field("config", &self.config)
            .finish()
    }
}

/// Stops the background task when dropped (or [`stop`](Self::stop)ped).
#[derive(Debug)]
pub struct HealthCheckHandle {
    task: JoinHandle<()>,
}

impl HealthCheckHandle {
    /// Stops the task.
    pub fn stop(self) {}
}

impl Drop for HealthCheckHandle {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl<B: Backend> HealthChecker<B> {
    /// A checker over `pool`.
    pub fn new(pool: Pool<B>, config: HealthCheckConfig) -> Self {
        HealthChecker {
            pool,
            config,
            estimator: WaitEstimator::default(),
            outlier: None,
            tracks: HashMap::new(),
        }
    }

    /// Re-admits the ejections of `detector` on every round.
    pub fn outlier_detector(mut self, detector: OutlierDetector<B>) -> Self {
        self.outlier = Some(detector);
        self
    }

    /// The estimator used for the `estimated_wait` metric (use the shedding layer's).
    pub fn estimator(mut self, estimator: WaitEstimator) -> Self {
        self.estimator = estimator;
        self
    }

    /// Probes every replica once, concurrently, and applies the thresholds.
    pub async fn probe_round(&mut self) -> ProbeRound {
        let snap = self.pool.snapshot();
        let timeout = self.config.timeout;
        let results = join_all(snap.replicas().iter().map(|r| {
            let probe = r.backend().probe();
            async move { matches!(tokio::time::timeout(timeout, probe).await, Ok(Ok(()))) }
        }))
        .await;
        let mut round = ProbeRound {
            probed: results.len(),
            ..Default::default()
        };
        self.tracks.retain(|id, _| snap.get(id.as_str()).is_some());
        for (r, ok) in snap.replicas().iter().zip(results) {
            let id = r.id();
            let t = self.tracks.entry(id.clone()).or_default();
            let health = r.state().health();
            if ok {
                t.fails = 0;
                t.passes = t.passes.saturating_add(1);
                if health == Health::Unhealthy
                    && t.passes >= self.config.healthy_threshold
                    && self.pool.readmit(id.as_str()).is_ok()
                {
                    round.readmitted.push(id.clone());
                }
            } else {
                t.passes = 0;
                t.fails = t.fails.saturating_add(1);
                round.failed.push(id.clone());
                metrics::counter!("replica_router_probe_failures_total", "replica" => id.to_string())
                    .increment(1);
                if health == Health::Healthy
                    && t.fails >= self.config.unhealthy_threshold
                    && self.pool.set_health(id.as_str(), Health::Unhealthy).is_ok()
                {
                    round.marked_unhealthy.push(id.clone());
                }
            }
        }
        if let Some(d) = &self.outlier {
            round.readmitted.extend(d.readmit_due(Instant::now()));
        }
        round
    }

    /// Fetches every replica's load report once, concurrently, and stores the reports that
    /// arrive within the probe timeout. Returns how many were stored.
    pub async fn scrape_round(&self) -> usize {
        let snap = self.pool.snapshot();
        let timeout = self.config.timeout;
        let results = join_all(snap.replicas().iter().map(|r| {
            let fetch = r.backend().load_report();
            async move { tokio::time::timeout(timeout, fetch).await }
        }))
        .await;
        let mut stored = 0;
        for (r, res) in snap.replicas().iter().zip(results) {
            match res {
                Ok(Ok(Some(report))) => {
                    r.state().set_load_report(report);
                    stored += 1;
                }
                Ok(Ok(None)) => {}
                _ => {
                    metrics::counter!(
                        "replica_router_load_scrape_failures_total",
                        "replica" => r.id().to_string()
                    )
                    .increment(1);
                }
            }
        }
        stored
    }

    /// Updates the per-replica gauges now.
    pub fn emit_metrics(&self) {
        record_pool_metrics(&self.pool.snapshot(), &self.estimator, Instant::now());
    }

    /// Runs probe rounds every `interval` and scrapes every `load_interval` on the current tokio
    /// runtime until the handle is dropped. The first probe round runs at once.
    pub fn spawn(mut self) -> HealthCheckHandle {
        let task = tokio::spawn(async move {
            let mut probe =
                tokio::time::interval(self.config.interval.max(Duration::from_millis(1)));
            probe.set_missed_tick_behavior(MissedTickBehavior::Delay);
            let mut load = self
                .config
                .load_interval
                .map(|d| tokio::time::interval(d.max(Duration::from_millis(1))));
            if let Some(l) = load.as_mut() {
                l.set_missed_tick_behavior(MissedTickBehavior::Delay);
            }
            loop {
                tokio::select! {
                    _ = probe.tick() => {
                        self.probe_round().await;
                        if load.is_none() {
                            self.emit_metrics();
                        }
                    }
                    _ = async { load.as_mut().expect("guarded").tick().await }, if load.is_some() => {
                        self.scrape_round().await;
                        self.emit_metrics();
                    }
                }
            }
        });
        HealthCheckHandle { task }
    }
}
