//! Per-replica queue-wait estimates.

use std::time::Duration;

use tokio::time::Instant;

use crate::pool::{PoolSnapshot, Replica, SlowStart};

/// Estimates how long a new request would wait on a replica before the engine starts on it.
///
/// The model is a multi-server queue: a replica runs up to `slots` sequences at once (its
/// continuous batch, vLLM's `max_num_seqs`), each lasting the service time `S`, so a slot frees
/// up every `S / slots` on average. A new request that finds `load` requests on the replica has
/// `ahead = max(0, load + 1 - slots)` requests to wait for, and waits about
///
/// ```text
/// wait = ahead x S / slots
/// ```
///
/// - `load` is the router's own in-flight count; when the backend's [`LoadReport`] is fresh
///   (younger than [`max_report_age`](Self::max_report_age)) it is the larger of that and the
///   engine's `running + waiting`, which also counts requests from other gateways.
/// - `slots` is [`slots_per_weight`](Self::slots_per_weight) times the replica's effective
///   weight (capacity weight x slow-start ramp: a cold replica is given less room). When a fresh
///   report shows the engine saturated (requests waiting inside it, or KV usage at
///   [`kv_saturation`](Self::kv_saturation)), its running batch *is* its capacity:
///   `slots = running`.
/// - `S` is the replica's EWMA of full request duration (until the body ends); before any request
///   completed, its EWMA of time to first byte (a lower bound that arrives sooner on long
///   streams); before that, [`default_service_time`](Self::default_service_time).
///
/// Stale reports are ignored, so a backend whose `/metrics` stopped answering falls back to the
/// router's own view instead of freezing at its last number.
///
/// ```
/// use replica_router::load::WaitEstimator;
/// use std::time::Duration;
/// let est = WaitEstimator::new().slots_per_weight(4.0);
/// // 6 in flight on 4 slots: 3 ahead of a new request, one slot frees every 250 ms.
/// assert_eq!(est.wait_for(6.0, 4.0, Duration::from_secs(1)), Duration::from_millis(750));
/// assert_eq!(est.wait_for(3.0, 4.0, Duration::from_secs(1)), Duration::ZERO);
/// ```
///
/// [`LoadReport`]: crate::backend::LoadReport
#[derive(Debug, Clone, PartialEq)]
pub struct WaitEstimator {
    /// Sequences a replica of capacity weight 1.0 runs at once before new requests queue.
    /// Default 16.
    pub slots_per_weight: f64,
    /// Service time assumed before the replica has any latency sample. Default 1 s.
    pub default_service_time: Duration,
    /// Backend load reports older than this are ignored. Default 5 s.
    pub max_report_age: Duration,
    /// KV usage at or above which a reporting engine counts as full. Default 0.95.
    pub kv_saturation: f64,
}

impl Default for WaitEstimator {
    fn default() -> Self {
        WaitEstimator {
            slots_per_weight: 16.0,
            default_service_time: Duration::from_secs(1),
            max_report_age: Duration::from_secs(5),
            kv_saturation: 0.95,
        }
    }
}

/// One replica's estimate, with the inputs that produced it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WaitEstimate {
    /// Estimated wait before a new request starts.
    pub wait: Duration,
    /// Requests ahead of a new one.
    pub ahead: f64,
    /// The load used (requests on the replica).
    pub load: f64,
    /// The concurrent slots used.
    pub slots: f64,
    /// The service time used.
    pub service_time: Duration,
    /// Whether a fresh backend report was used.
    pub from_report: bool,
}

impl WaitEstimator {
    /// The defaults (16 slots per unit of weight, 1 s prior service time, reports stale after
    /// 5 s, KV full at 95 %).
    pub fn new() -> Self {
        WaitEstimator::default()
    }

    /// Sets [`slots_per_weight`](Self::slots_per_weight) (values that are not finite and > 0
    /// mean 1).
    pub fn slots_per_weight(mut self, slots: f64) -> Self {
        self.slots_per_weight = slots;
        self
    }

    /// Sets [`default_service_time`](Self::default_service_time).
    pub fn default_service_time(mut self, d: Duration) -> Self {
        self.default_service_time = d;
        self
    }

    /// Sets [`max_report_age`](Self::max_report_age).
    pub fn max_report_age(mut self, d: Duration) -> Self {
        self.max_report_age = d;
        self
    }

    /// Sets [`kv_saturation`](Self::kv_saturation).
    pub fn kv_saturation(mut self, fraction: f64) -> Self {
        self.kv_saturation = fraction;
        self
    }

    /// The queue formula alone: wait for a new request given `load`, `slots` and service time.
    pub fn wait_for(&self, load: f64, slots: f64, service_time: Duration) -> Duration {
        let slots = if slots.is_finite() && slots >= 1.0 {
            slots
        } else {
            1.0
        };
        let load = if load.is_finite() { load.max(0.0) } else { 0.0 };
        let ahead = (load + 1.0 - slots).max(0.0);
        duration_mul(service_time, ahead / slots)
    }

    /// Estimates the wait on `replica` at `now`.
    pub fn estimate<B>(
        &self,
        replica: &Replica<B>,
        slow_start: &SlowStart,
        now: Instant,
    ) -> WaitEstimate {
        let state = replica.state();
        let per_weight = if self.slots_per_weight.is_finite() && self.slots_per_weight > 0.0 {
            self.slots_per_weight
        } else {
            1.0
        };
        let weight = if state.is_ramping() {
            replica.effective_weight(slow_start, now)
        } else {
            replica.weight().get()
        };
        let mut slots = (per_weight * weight).max(1.0);
        let mut load = state.in_flight() as f64;
        let mut from_report = false;
        if let Some(r) = state
            .load_report()
            .filter(|r| r.is_fresh(now, self.max_report_age))
        {
            from_report = true;
            load = load.max(r.running.saturating_add(r.waiting) as f64);
            let kv_full = r.kv_usage.is_some_and(|k| k >= self.kv_saturation);
            if r.waiting > 0 || kv_full {
                slots = (r.running as f64).max(1.0);
            }
        }
        let service_time = state
            .ewma_duration()
            .or_else(|| state.ewma_ttfb())
            .unwrap_or(self.default_service_time);
        let ahead = (load + 1.0 - slots).max(0.0);
        WaitEstimate {
            wait: duration_mul(service_time, ahead / slots),
            ahead,
            load,
            slots,
            service_time,
            from_report,
        }
    }

    /// The smallest estimated wait over the replicas eligible right now, with the replica's
    /// index; `None` when none is eligible.
    pub fn best<B>(&self, snapshot: &PoolSnapshot<B>, now: Instant) -> Option<(usize, Duration)> {
        let mut best: Option<(usize, Duration)> = None;
        for &i in snapshot.eligible() {
            let i = i as usize;
            let r = &snapshot.replicas()[i];
            if !r.state().is_eligible() {
                continue;
            }
            let w = self.estimate(r, snapshot.slow_start(), now).wait;
            if best.is_none_or(|(_, b)| w < b) {
                best = Some((i, w));
            }
        }
        best
    }
}

/// `d x factor`, saturating, for finite non-negative factors.
pub(crate) fn duration_mul(d: Duration, factor: f64) -> Duration {
    if !(factor.is_finite() && factor > 0.0) {
        return Duration::ZERO;
    }
    Duration::try_from_secs_f64(d.as_secs_f64() * factor).unwrap_or(Duration::MAX)
}
