//! When to add or remove replicas: a recommendation from queue wait, utilization and shed rate.
//!
//! The guide's rule: *scale on queue wait and GPU batch utilization, never on CPU* (an LLM
//! worker's CPU idles while its GPUs saturate), and *add replicas when p95 wait exceeds the SLO
//! despite healthy replicas*. [`AutoscaleSignal`] keeps a sliding window (default 60 s, in 12
//! slots) of the queue waits that requests faced at admission (time in the gateway's admission
//! queue plus the estimated wait on the best replica, as the [shedding layer](crate::shed)
//! records them) and of shed requests. [`AutoscaleSignal::recommend`] combines the window's p95
//! wait and shed rate with the pool's current utilization (requests on each replica over its
//! slots, from the [`WaitEstimator`], which uses the engines' own running/waiting counts when
//! fresh) and health:
//!
//! | condition | action |
//! |---|---|
//! | fewer than `min_samples` requests in the window | hold (`insufficient_data`) |
//! | p95 wait > SLO, or shed rate > `max_shed_rate`, with at least `min_healthy_fraction` of the replicas eligible | **scale out** |
//! | same, but too many replicas unhealthy, ejected or draining | hold (`replicas_unhealthy`: fix them first, new ones would not help) |
//! | p95 wait < `scale_in_wait_ratio` x SLO, utilization < `scale_in_utilization`, nothing shed, more than `min_replicas` eligible | **scale in** |
//! | otherwise | hold |
//!
//! The recommendation is a value (for an operator loop or a Kubernetes external metric) and,
//! through [`AutoscaleSignal::emit_metrics`], gauges: `replica_router_autoscale_p95_wait_seconds`,
//! `replica_router_autoscale_utilization`, `replica_router_autoscale_shed_rate` and
//! `replica_router_autoscale_recommendation` (+1 scale out, 0 hold, -1 scale in).
//!
//! ```
//! use replica_router::autoscale::{AutoscaleConfig, AutoscaleSignal, ScaleAction};
//! use replica_router::pool::Pool;
//! use replica_router::replica::ReplicaSpec;
//! use replica_router::load::WaitEstimator;
//! use std::time::Duration;
//! use tokio::time::Instant;
//!
//! let pool = Pool::builder().replica("a", ReplicaSpec::new("m"), ()).build().unwrap();
//! let signal = AutoscaleSignal::new(AutoscaleConfig::new(Duration::from_millis(200)));
//! let now = Instant::now();
//! for _ in 0..100 {
//!     signal.record_wait(now, Duration::from_millis(900));
//! }
//! let rec = signal.recommend(&pool.snapshot(), &WaitEstimator::new(), now);
//! assert_eq!(rec.action, ScaleAction::ScaleOut);
//! assert!(rec.p95_wait.unwrap() >= Duration::from_millis(900));
//! ```

mod window;

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::load::WaitEstimator;
use crate::pool::PoolSnapshot;

use self::window::Window;

/// Thresholds of the recommendation.
#[derive(Debug, Clone, PartialEq)]
pub struct AutoscaleConfig {
    /// The queue-wait SLO (use the shedding layer's wait budget).
    pub slo: Duration,
    /// How far back the window reaches. Default 60 s.
    pub window: Duration,
    /// Scale in only while p95 wait is under this fraction of the SLO. Default 0.25.
    pub scale_in_wait_ratio: f64,
    /// Scale in only while utilization is under this. Default 0.4.
    pub scale_in_utilization: f64,
    /// Scale out when more than this fraction of requests is shed. Default 0.01.
    pub max_shed_rate: f64,
    /// Scale out only while at least this fraction of the replicas is eligible. Default 0.75.
    pub min_healthy_fraction: f64,
    /// No recommendation but hold under this many requests in the window. Default 20.
    pub min_samples: u64,
    /// Never recommend scaling in at or below this many eligible replicas. Default 1.
    pub min_replicas: usize,
}

impl AutoscaleConfig {
    /// Defaults around a queue-wait SLO.
    pub fn new(slo: Duration) -> Self {
        AutoscaleConfig {
            slo,
            window: Duration::from_secs(60),
            scale_in_wait_ratio: 0.25,
            scale_in_utilization: 0.4,
            max_shed_rate: 0.01,
            min_healthy_fraction: 0.75,
            min_samples: 20,
            min_replicas: 1,
        }
    }
}

/// What to do with the replica count.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ScaleAction {
    /// Add replicas.
    ScaleOut,
    /// Keep the count.
    Hold,
    /// Remove a replica.
    ScaleIn,
}

impl ScaleAction {
    /// The lowercase name.
    pub fn as_str(self) -> &'static str {
        match self {
            ScaleAction::ScaleOut => "scale_out",
            ScaleAction::Hold => "hold",
            ScaleAction::ScaleIn => "scale_in",
        }
    }

    /// +1, 0 or -1.
    pub fn as_delta(self) -> i8 {
        match self {
            ScaleAction::ScaleOut => 1,
            ScaleAction::Hold => 0,
            ScaleAction::ScaleIn => -1,
        }
    }
}

/// Why the recommendation is what it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ScaleReason {
    /// p95 queue wait is over the SLO.
    WaitOverSlo,
    /// Too many requests are shed.
    Shedding,
    /// Wait and utilization are far under their targets.
    Underused,
    /// Within targets.
    WithinSlo,
    /// Too few requests in the window to judge.
    InsufficientData,
    /// Over the SLO, but too many replicas are out: restore them before adding more.
    ReplicasUnhealthy,
}

impl ScaleReason {
    /// The lowercase name.
    pub fn as_str(self) -> &'static str {
        match self {
            ScaleReason::WaitOverSlo => "wait_over_slo",
            ScaleReason::Shedding => "shedding",
            ScaleReason::Underused => "underused",
            ScaleReason::WithinSlo => "within_slo",
            ScaleReason::InsufficientData => "insufficient_data",
            ScaleReason::ReplicasUnhealthy => "replicas_unhealthy",
        }
    }
}

/// A recommendation and the numbers behind it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Recommendation {
    /// What to do.
    pub action: ScaleAction,
    /// Why.
    pub reason: ScaleReason,
    /// p95 of the queue waits in the window (bucket upper bound, within 19 %), if any request.
    pub p95_wait: Option<Duration>,
    /// Mean over eligible replicas of `min(1, load / slots)`.
    pub utilization: f64,
    /// Mean KV usage over eligible replicas with a fresh report, if any.
    pub kv_usage: Option<f64>,
    /// Shed requests over all requests in the window.
    pub shed_rate: f64,
    /// Requests (admitted and shed) in the window.
    pub samples: u64,
    /// Eligible replicas (healthy, not draining).
    pub eligible: usize,
    /// All replicas.
    pub replicas: usize,
}

/// The autoscaling signal: a cheap-to-clone handle on one shared window.
#[derive(Debug, Clone)]
pub struct AutoscaleSignal {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    config: AutoscaleConfig,
    window: Window,
}

impl AutoscaleSignal {
    /// A signal with `config`.
    pub fn new(config: AutoscaleConfig) -> Self {
        let window = Window::new(config.window, Instant::now());
        AutoscaleSignal {
            inner: Arc::new(Inner { config, window }),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &AutoscaleConfig {
        &self.inner.config
    }

    /// Records an admitted request that faced `wait` (lock-free).
    pub fn record_wait(&self, now: Instant, wait: Duration) {
        self.inner.window.record_wait(now, wait);
    }

    /// Records a shed request (lock-free).
    pub fn record_shed(&self, now: Instant) {
        self.inner.window.record_shed(now);
    }

    /// p95 queue wait over the window, if any request was admitted in it.
    pub fn p95_wait(&self, now: Instant) -> Option<Duration> {
        self.inner.window.quantile(now, 0.95)
    }

    /// The recommendation for `snapshot` at `now`.
    pub fn recommend<B>(
        &self,
        snapshot: &PoolSnapshot<B>,
        estimator: &WaitEstimator,
        now: Instant,
    ) -> Recommendation {
        let c = &self.inner.config;
        let totals = self.inner.window.totals(now);
        let samples = totals.admitted + totals.shed;
        let shed_rate = if samples == 0 {
            0.0
        } else {
            totals.shed as f64 / samples as f64
        };
        let p95_wait = self.inner.window.quantile(now, 0.95);
        let (mut util_sum, mut eligible) = (0.0, 0usize);
        let (mut kv_sum, mut kv_n) = (0.0, 0u32);
        for r in snapshot.replicas() {
            if !r.state().is_eligible() {
                continue;
            }
            eligible += 1;
            let e = estimator.estimate(r, snapshot.slow_start(), now);
            util_sum += (e.load / e.slots).clamp(0.0, 1.0);
            if let Some(kv) = r
                .state()
                .load_report()
                .filter(|rep| rep.is_fresh(now, estimator.max_report_age))
                .and_then(|rep| rep.kv_usage)
            {
                kv_sum += kv;
                kv_n += 1;
            }
        }
        let replicas = snapshot.len();
        let utilization = if eligible == 0 {
            0.0
        } else {
            util_sum / eligible as f64
        };
        let kv_usage = (kv_n > 0).then(|| kv_sum / f64::from(kv_n));
        let healthy_fraction = if replicas == 0 {
            0.0
        } else {
            eligible as f64 / replicas as f64
        };
        let over_wait = p95_wait.is_some_and(|p| p > c.slo);
        let shedding = shed_rate > c.max_shed_rate;
        let (action, reason) = if samples < c.min_samples {
            (ScaleAction::Hold, ScaleReason::InsufficientData)
        } else if over_wait || shedding {
            if healthy_fraction + 1e-9 >= c.min_healthy_fraction {
                let reason = if over_wait {
                    ScaleReason::WaitOverSlo
                } else {
                    ScaleReason::Shedding
                };
                (ScaleAction::ScaleOut, reason)
            } else {
                (ScaleAction::Hold, ScaleReason::ReplicasUnhealthy)
            }
        } else if p95_wait.unwrap_or(Duration::ZERO).as_secs_f64()
            < c.slo.as_secs_f64() * c.scale_in_wait_ratio
            && utilization < c.scale_in_utilization
            && totals.shed == 0
            && eligible > c.min_replicas
        {
            (ScaleAction::ScaleIn, ScaleReason::Underused)
        } else {
            (ScaleAction::Hold, ScaleReason::WithinSlo)
        };
        Recommendation {
            action,
            reason,
            p95_wait,
            utilization,
            kv_usage,
            shed_rate,
            samples,
            eligible,
            replicas,
        }
    }

    /// Emits `rec` as gauges (see the [module docs](self)).
    pub fn emit_metrics(&self, rec: &Recommendation) {
        if let Some(p) = rec.p95_wait {
            metrics::gauge!("replica_router_autoscale_p95_wait_seconds").set(p.as_secs_f64());
        }
        metrics::gauge!("replica_router_autoscale_utilization").set(rec.utilization);
        metrics::gauge!("replica_router_autoscale_shed_rate").set(rec.shed_rate);
        metrics::gauge!("replica_router_autoscale_recommendation")
            .set(f64::from(rec.action.as_delta()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pool::Pool;
    use crate::replica::ReplicaSpec;

    fn pool(n: usize) -> Pool<()> {
        let mut b = Pool::builder();
        for i in 0..n {
            b = b.replica(format!("r{i}"), ReplicaSpec::new("m"), ());
        }
        b.build().unwrap()
    }

    #[test]
    fn rules() {
        let slo = Duration::from_millis(200);
        let est = WaitEstimator::new();
        let now = Instant::now();
        let p = pool(4);

        let s = AutoscaleSignal::new(AutoscaleConfig::new(slo));
        assert_eq!(
            s.recommend(&p.snapshot(), &est, now).reason,
            ScaleReason::InsufficientData
        );
        for _ in 0..50 {
            s.record_wait(now, Duration::ZERO);
        }
        let r = s.recommend(&p.snapshot(), &est, now);
        assert_eq!(r.action, ScaleAction::ScaleIn, "{r:?}");
        assert_eq!(r.p95_wait, Some(Duration::ZERO));

        for _ in 0..50 {
            s.record_wait(now, Duration::from_millis(100));
        }
        assert_eq!(
            s.recommend(&p.snapshot(), &est, now).action,
            ScaleAction::Hold
        );

        for _ in 0..10 {
            s.record_shed(now);
        }
        let r = s.recommend(&p.snapshot(), &est, now);
        assert_eq!(
            (r.action, r.reason),
            (ScaleAction::ScaleOut, ScaleReason::Shedding)
        );

        // Two of four replicas out: over the SLO, but adding replicas is not the fix.
        p.eject("r0").unwrap();
        p.drain("r1").unwrap();
        let r = s.recommend(&p.snapshot(), &est, now);
        assert_eq!(
            (r.action, r.reason),
            (ScaleAction::Hold, ScaleReason::ReplicasUnhealthy)
        );
        assert_eq!((r.eligible, r.replicas), (2, 4));

        // The window forgets.
        let later = now + Duration::from_secs(61);
        assert_eq!(s.recommend(&p.snapshot(), &est, later).samples, 0);
    }
}
