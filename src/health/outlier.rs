//! Passive outlier detection: eject a replica that keeps failing, re-admit it after a back-off.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::time::Instant;

use crate::inflight::{Completion, CompletionObserver, Outcome};
use crate::load::estimate::duration_mul;
use crate::pool::{Health, Pool};
use crate::replica::ReplicaId;

/// When to eject and for how long.
#[derive(Debug, Clone, PartialEq)]
pub struct OutlierConfig {
    /// Eject after this many failures in a row (transport errors, 5xx, body errors; a success
    /// resets the count). 0 disables. Default 5.
    pub consecutive_failures: u32,
    /// Eject after this many failures within [`window`](Self::window), successes or not.
    /// 0 disables. Default 10.
    pub window_failures: u32,
    /// The window for [`window_failures`](Self::window_failures). Default 10 s.
    pub window: Duration,
    /// First ejection's length; each further ejection doubles it. Default 30 s.
    pub base_ejection: Duration,
    /// Longest ejection. A replica that stays in for this long after a re-admission starts
    /// over at `base_ejection`. Default 300 s.
    pub max_ejection: Duration,
    /// At most this fraction of the pool's replicas is ejected at once (one replica can always
    /// be), so a cluster-wide problem does not eject everything. Default 0.5.
    pub max_ejected_fraction: f64,
}

impl Default for OutlierConfig {
    fn default() -> Self {
        OutlierConfig {
            consecutive_failures: 5,
            window_failures: 10,
            window: Duration::from_secs(10),
            base_ejection: Duration::from_secs(30),
            max_ejection: Duration::from_secs(300),
            max_ejected_fraction: 0.5,
        }
    }
}

impl OutlierConfig {
    /// The length of the `n`-th ejection in a row (1-based): `base x 2^(n-1)`, capped.
    ///
    /// ```
    /// use replica_router::health::OutlierConfig;
    /// use std::time::Duration;
    /// let c = OutlierConfig::default();
    /// assert_eq!(c.ejection_time(1), Duration::from_secs(30));
    /// assert_eq!(c.ejection_time(3), Duration::from_secs(120));
    /// assert_eq!(c.ejection_time(40), Duration::from_secs(300));
    /// ```
    pub fn ejection_time(&self, n: u32) -> Duration {
        let factor = 2f64.powi(n.saturating_sub(1).min(62) as i32);
        duration_mul(self.base_ejection, factor).min(self.max_ejection)
    }
}

#[derive(Debug, Default)]
struct Track {
    recent: VecDeque<Instant>,
    ejections: u32,
    ejected_until: Option<Instant>,
    last_readmit: Option<Instant>,
    /// The replica's `consecutive_failures` and `completed` counters at re-admission, so failures
    /// from before the ejection do not count again.
    base_consecutive: u32,
    base_completed: u64,
}

struct Inner<B> {
    pool: Pool<B>,
    config: OutlierConfig,
    tracks: Mutex<HashMap<ReplicaId, Track>>,
}

/// Ejects replicas from dispatch outcomes and re-admits them after a growing back-off.
///
/// Feed it with [`OutlierDetectionLayer`](super::OutlierDetectionLayer) (which registers
/// [`observer`](Self::observer) on every request) or by calling [`record`](Self::record).
/// Re-admission goes through [`Pool::readmit`], which starts the pool's slow-start ramp. It
/// happens on a timer task when a tokio runtime is running, and otherwise (or additionally) when
/// [`readmit_due`](Self::readmit_due) is called, as the [`HealthChecker`](super::HealthChecker)
/// does on every round.
///
/// Metrics: `replica_router_ejections_total{replica, cause}` (cause: `consecutive_failures`,
/// `failure_rate`), `replica_router_ejections_skipped_total{replica}` (over the ejected
/// fraction), `replica_router_readmissions_total{replica}`.
pub struct OutlierDetector<B> {
    inner: Arc<Inner<B>>,
}

impl<B> Clone for OutlierDetector<B> {
    fn clone(&self) -> Self {
        OutlierDetector {
            inner: self.inner.clone(),
        }
    }
}

impl<B> std::fmt::Debug for OutlierDetector<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OutlierDetector")
            .field("config", &self.inner.config)
            .finish()
    }
}

impl<B: Send + Sync + 'static> OutlierDetector<B> {
    /// A detector over `pool`.
    pub fn new(pool: Pool<B>, config: OutlierConfig) -> Self {
        OutlierDetector {
            inner: Arc::new(Inner {
                pool,
                config,
                tracks: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &OutlierConfig {
        &self.inner.config
    }

    /// An observer to register on requests (see
    /// [`RouteRequest::add_completion_observer`](crate::request::RouteRequest::add_completion_observer)).
    pub fn observer(&self) -> Arc<dyn CompletionObserver> {
        Arc::new(self.clone())
    }

    /// How many times `replica` was ejected in a row (0 once it stayed in long enough).
    pub fn ejections(&self, replica: &str) -> u32 {
        self.inner
            .tracks
            .lock()
            .get(replica)
            .map_or(0, |t| t.ejections)
    }

    /// When `replica`'s current ejection ends, if it is ejected by this detector.
    pub fn ejected_until(&self, replica: &str) -> Option<Instant> {
        self.inner
            .tracks
            .lock()
            .get(replica)
            .and_then(|t| t.ejected_until)
    }

    /// Records one finished request on `replica`. Only failures do work (a map lookup under a
    /// lock); successes and cancellations return at once.
    pub fn record(&self, replica: &ReplicaId, outcome: Outcome, now: Instant) {
        if outcome != Outcome::Failure {
            return;
        }
        let inner = &*self.inner;
        let snap = inner.pool.load();
        let Some((_, r)) = snap.get(replica.as_str()) else {
            return;
        };
        let state = r.state();
        if state.health() != Health::Healthy {
            return;
        }
        let c = &inner.config;
        let (cause, until) = {
            let mut tracks = inner.tracks.lock();
            let t = tracks.entry(replica.clone()).or_default();
            if t.ejected_until.is_some() {
                return;
            }
            t.recent.push_back(now);
            let horizon = now.checked_sub(c.window);
            while t
                .recent
                .front()
                .is_some_and(|&f| horizon.is_some_and(|h| f <= h))
            {
                t.recent.pop_front();
            }
            let consecutive = if state.completed() > t.base_completed {
                state.consecutive_failures()
            } else {
                state
                    .consecutive_failures()
                    .saturating_sub(t.base_consecutive)
            };
            let cause = if c.consecutive_failures > 0 && consecutive >= c.consecutive_failures {
                "consecutive_failures"
            } else if c.window_failures > 0 && t.recent.len() >= c.window_failures as usize {
                "failure_rate"
            } else {
                return;
            };
            let ejected = snap
                .replicas()
                .iter()
                .filter(|r| r.state().health() == Health::Ejected)
                .count();
            let limit = c.max_ejected_fraction * snap.len() as f64;
            if ejected > 0 && (ejected + 1) as f64 > limit + 1e-9 {
                metrics::counter!(
                    "replica_router_ejections_skipped_total",
                    "replica" => replica.to_string()
                )
                .increment(1);
                return;
            }
            if t.last_readmit
                .is_some_and(|l| now.saturating_duration_since(l) >= c.max_ejection)
            {
                t.ejections = 0;
            }
            t.ejections = t.ejections.saturating_add(1);
            let until = now + c.ejection_time(t.ejections);
            t.ejected_until = Some(until);
            t.recent.clear();
            (cause, until)
        };
        if inner.pool.eject(replica.as_str()).is_err() {
            return;
        }
        metrics::counter!(
            "replica_router_ejections_total",
            "replica" => replica.to_string(),
            "cause" => cause
        )
        .increment(1);
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            let this = self.clone();
            handle.spawn(async move {
                tokio::time::sleep_until(until).await;
                this.readmit_due(Instant::now());
            });
        }
    }

    /// Re-admits every replica whose ejection has ended by `now` (with slow start); returns
    /// their ids.
    pub fn readmit_due(&self, now: Instant) -> Vec<ReplicaId> {
        let inner = &*self.inner;
        let snap = inner.pool.load();
        let mut due = Vec::new();
        {
            let mut tracks = inner.tracks.lock();
            tracks.retain(|id, _| snap.get(id.as_str()).is_some());
            for (id, t) in tracks.iter_mut() {
                if t.ejected_until.is_some_and(|u| u <= now) {
                    t.ejected_until = None;
                    t.last_readmit = Some(now);
                    if let Some((_, r)) = snap.get(id.as_str()) {
                        t.base_consecutive = r.state().consecutive_failures();
                        t.base_completed = r.state().completed();
                    }
                    due.push(id.clone());
                }
            }
        }
        due.retain(|id| {
            let ejected = snap
                .get(id.as_str())
                .is_some_and(|(_, r)| r.state().health() == Health::Ejected);
            ejected && inner.pool.readmit(id.as_str()).is_ok()
        });
        for id in &due {
            metrics::counter!("replica_router_readmissions_total", "replica" => id.to_string())
                .increment(1);
        }
        due
    }
}

impl<B: Send + Sync + 'static> CompletionObserver for OutlierDetector<B> {
    fn on_complete(&self, completion: &Completion<'_>) {
        if completion.outcome == Outcome::Failure {
            self.record(completion.replica, completion.outcome, Instant::now());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replica::ReplicaSpec;

    fn pool(n: usize) -> Pool<()> {
        let mut b = Pool::builder();
        for i in 0..n {
            b = b.replica(format!("r{i}"), ReplicaSpec::new("m"), ());
        }
        b.build().unwrap()
    }

    #[test]
    fn window_failures_eject_and_fraction_limits() {
        let p = pool(3);
        let d = OutlierDetector::new(
            p.clone(),
            OutlierConfig {
                consecutive_failures: 0,
                window_failures: 3,
                window: Duration::from_secs(10),
                ..Default::default()
            },
        );
        let t0 = Instant::now();
        let id = |s: &str| ReplicaId::new(s).unwrap();
        // Failures at 0 s and 1 s have left the 10 s window by 12 s: three needed within it.
        d.record(&id("r0"), Outcome::Failure, t0);
        d.record(&id("r0"), Outcome::Failure, t0 + Duration::from_secs(1));
        d.record(&id("r0"), Outcome::Failure, t0 + Duration::from_secs(12));
        assert_eq!(
            p.snapshot().get("r0").unwrap().1.state().health(),
            Health::Healthy
        );
        d.record(&id("r0"), Outcome::Failure, t0 + Duration::from_secs(13));
        assert_eq!(
            p.snapshot().get("r0").unwrap().1.state().health(),
            Health::Healthy
        );
        d.record(&id("r0"), Outcome::Failure, t0 + Duration::from_secs(14));
        assert_eq!(
            p.snapshot().get("r0").unwrap().1.state().health(),
            Health::Ejected
        );
        assert_eq!(d.ejections("r0"), 1);
        // A second replica would exceed half of three: kept.
        for s in 0..5 {
            d.record(
                &id("r1"),
                Outcome::Failure,
                t0 + Duration::from_secs(14 + s),
            );
        }
        assert_eq!(
            p.snapshot().get("r1").unwrap().1.state().health(),
            Health::Healthy
        );
        // Re-admission after 30 s.
        assert!(d.readmit_due(t0 + Duration::from_secs(43)).is_empty());
        assert_eq!(d.readmit_due(t0 + Duration::from_secs(44)), vec![id("r0")]);
        assert_eq!(
            p.snapshot().get("r0").unwrap().1.state().health(),
            Health::Healthy
        );
    }
}
