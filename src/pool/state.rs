//! Per-replica live state, shared by every snapshot the replica appears in.
//!
//! Everything here is atomics (plus one tiny lock for the backend's load report), so the request
//! path never waits on a lock held by another request.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::backend::LoadReport;
use crate::load::work::WorkState;
use crate::replica::ReplicaId;

/// A replica's health as the router sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Health {
    /// Serving: eligible for new requests unless draining.
    Healthy = 0,
    /// Failing active probes: no new requests.
    Unhealthy = 1,
    /// Ejected by passive outlier detection: no new requests until re-admitted.
    Ejected = 2,
}

impl Health {
    fn from_u8(v: u8) -> Health {
        match v {
            0 => Health::Healthy,
            1 => Health::Unhealthy,
            _ => Health::Ejected,
        }
    }

    /// The lowercase name.
    pub fn as_str(self) -> &'static str {
        match self {
            Health::Healthy => "healthy",
            Health::Unhealthy => "unhealthy",
            Health::Ejected => "ejected",
        }
    }
}

/// Slow start: after a replica joins or is re-admitted, its effective weight ramps from
/// `floor x weight` to the full weight over `window`, following Envoy's shape
/// `max(floor, (elapsed / window) ^ (1 / aggression))`. A restarted replica has a cold prefix
/// cache, so it should not take a full share at once.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SlowStart {
    /// How long the ramp lasts. Zero disables slow start.
    pub window: Duration,
    /// Smallest fraction of the weight during the ramp, in `(0, 1]`.
    pub floor: f64,
    /// Curve shape: 1.0 is linear; larger values ramp faster early.
    pub aggression: f64,
}

impl SlowStart {
    /// Slow start turned off.
    pub const DISABLED: SlowStart = SlowStart {
        window: Duration::ZERO,
        floor: 1.0,
        aggression: 1.0,
    };

    /// A linear ramp over `window` starting at 10% of the weight.
    pub fn linear(window: Duration) -> SlowStart {
        SlowStart {
            window,
            floor: 0.1,
            aggression: 1.0,
        }
    }

    /// The weight factor `elapsed` after the ramp began.
    pub fn factor(&self, elapsed: Duration) -> f64 {
        if self.window.is_zero() || elapsed >= self.window {
            return 1.0;
        }
        let floor = if self.floor.is_finite() {
            self.floor.clamp(0.001, 1.0)
        } else {
            1.0
        };
        let aggression = if self.aggression.is_finite() && self.aggression > 0.0 {
            self.aggression
        } else {
            1.0
        };
        let x = elapsed.as_secs_f64() / self.window.as_secs_f64();
        x.powf(1.0 / aggression).max(floor)
    }
}

impl Default for SlowStart {
    fn default() -> Self {
        SlowStart::DISABLED
    }
}

/// Smoothing factor of the latency EWMAs (weight of the newest sample).
const EWMA_ALPHA: f64 = 0.2;

/// Live state of one replica.
#[derive(Debug)]
pub struct ReplicaState {
    id: ReplicaId,
    epoch: Instant,
    in_flight: AtomicU64,
    in_flight_tokens: AtomicU64,
    health: AtomicU8,
    draining: AtomicBool,
    /// Nanoseconds after `epoch` when the slow-start ramp began; 0 when not ramping.
    ramp_start: AtomicU64,
    consecutive_failures: AtomicU32,
    completed: AtomicU64,
    failed: AtomicU64,
    cancelled: AtomicU64,
    /// EWMA of time to the response head, nanoseconds as f64 bits; 0 = no sample yet.
    ewma_ttfb: AtomicU64,
    /// EWMA of the full request duration (until the body ends), nanoseconds as f64 bits.
    ewma_duration: AtomicU64,
    load_report: Mutex<Option<LoadReport>>,
    work: WorkState,
    idle: Notify,
}

fn ewma_update(cell: &AtomicU64, sample: f64) {
    let mut cur = cell.load(Ordering::Relaxed);
    loop {
        let old = f64::from_bits(cur);
        let new = if old == 0.0 {
            sample
        } else {
            old + EWMA_ALPHA * (sample - old)
        };
        match cell.compare_exchange_weak(cur, new.to_bits(), Ordering::Relaxed, Ordering::Relaxed) {
            Ok(_) => return,
            Err(actual) => cur = actual,
        }
    }
}

impl ReplicaState {
    pub(crate) fn new(id: ReplicaId, epoch: Instant) -> Self {
        ReplicaState {
            id,
            epoch,
            in_flight: AtomicU64::new(0),
            in_flight_tokens: AtomicU64::new(0),
            health: AtomicU8::new(Health::Healthy as u8),
            draining: AtomicBool::new(false),
            ramp_start: AtomicU64::new(0),
            consecutive_failures: AtomicU32::new(0),
            completed: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            cancelled: AtomicU64::new(0),
            ewma_ttfb: AtomicU64::new(0),
            ewma_duration: AtomicU64::new(0),
            load_report: Mutex::new(None),
            work: WorkState::new(),
            idle: Notify::new(),
        }
    }

    /// The replica's id.
    pub fn id(&self) -> &ReplicaId {
        &self.id
    }

    /// Requests in flight (sent and not yet fully answered).
    pub fn in_flight(&self) -> u64 {
        self.in_flight.load(Ordering::Acquire)
    }

    /// Estimated tokens of the requests in flight.
    pub fn in_flight_tokens(&self) -> u64 {
        self.in_flight_tokens.load(Ordering::Acquire)
    }

    /// The work model: outstanding prefill, decode load, learned prefill rate, cache
    /// calibration (see [`load::work`](crate::load::work)).
    pub fn work(&self) -> &WorkState {
        &self.work
    }

    /// Current health.
    pub fn health(&self) -> Health {
        Health::from_u8(self.health.load(Ordering::Acquire))
    }

    /// Whether the replica is draining (no new requests; in-flight ones finish).
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// Healthy and not draining: may take new requests.
    pub fn is_eligible(&self) -> bool {
        self.health() == Health::Healthy && !self.is_draining()
    }

    /// Failures (errors or failing responses) since the last success.
    pub fn consecutive_failures(&self) -> u32 {
        self.consecutive_failures.load(Ordering::Relaxed)
    }

    /// Requests that finished successfully.
    pub fn completed(&self) -> u64 {
        self.completed.load(Ordering::Relaxed)
    }

    /// Requests that failed (transport error or failing status).
    pub fn failed(&self) -> u64 {
        self.failed.load(Ordering::Relaxed)
    }

    /// Requests dropped before their response ended (client went away, timeout upstream).
    pub fn cancelled(&self) -> u64 {
        self.cancelled.load(Ordering::Relaxed)
    }

    /// Smoothed time to the response head, if any request completed.
    pub fn ewma_ttfb(&self) -> Option<Duration> {
        let v = f64::from_bits(self.ewma_ttfb.load(Ordering::Relaxed));
        (v > 0.0).then(|| Duration::from_nanos(v as u64))
    }

    /// Smoothed full request duration, if any request completed.
    pub fn ewma_duration(&self) -> Option<Duration> {
        let v = f64::from_bits(self.ewma_duration.load(Ordering::Relaxed));
        (v > 0.0).then(|| Duration::from_nanos(v as u64))
    }

    /// The latest load report the backend gave, fresh or not.
    pub fn load_report(&self) -> Option<LoadReport> {
        *self.load_report.lock()
    }

    /// Stores a load report from the backend.
    pub fn set_load_report(&self, report: LoadReport) {
        *self.load_report.lock() = Some(report);
    }

    /// The slow-start factor at `now` (1.0 when not ramping).
    pub fn ramp_factor(&self, slow_start: &SlowStart, now: Instant) -> f64 {
        let start = self.ramp_start.load(Ordering::Relaxed);
        if start == 0 {
            return 1.0;
        }
        let elapsed = now
            .saturating_duration_since(self.epoch)
            .saturating_sub(Duration::from_nanos(start));
        let f = slow_start.factor(elapsed);
        if f >= 1.0 {
            // Ramp over: stop paying for the computation.
            self.ramp_start.store(0, Ordering::Relaxed);
        }
        f
    }

    /// Whether the replica is in a slow-start ramp.
    pub fn is_ramping(&self) -> bool {
        self.ramp_start.load(Ordering::Relaxed) != 0
    }

    pub(crate) fn start_ramp(&self, now: Instant) {
        let nanos = now.saturating_duration_since(self.epoch).as_nanos() as u64;
        self.ramp_start.store(nanos.max(1), Ordering::Relaxed);
    }

    pub(crate) fn set_health(&self, health: Health) {
        self.health.store(health as u8, Ordering::SeqCst);
    }

    pub(crate) fn set_draining(&self, draining: bool) {
        self.draining.store(draining, Ordering::SeqCst);
    }

    /// Counts a request in flight. Returns false (and counts nothing) if the replica started
    /// draining, so a drain that observed zero in flight stays drained.
    pub(crate) fn try_begin(&self, tokens: u64) -> bool {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        if self.draining.load(Ordering::SeqCst) {
            self.end(0);
            return false;
        }
        self.in_flight_tokens.fetch_add(tokens, Ordering::AcqRel);
        true
    }

    pub(crate) fn end(&self, tokens: u64) {
        if tokens > 0 {
            self.in_flight_tokens.fetch_sub(tokens, Ordering::AcqRel);
        }
        // Only a drain waits for idleness; skip the notification otherwise (it takes a lock).
        if self.in_flight.fetch_sub(1, Ordering::SeqCst) == 1 && self.is_draining() {
            self.idle.notify_waiters();
        }
    }

    pub(crate) fn record_head(&self, ttfb: Duration) {
        ewma_update(&self.ewma_ttfb, ttfb.as_nanos() as f64);
    }

    pub(crate) fn record_success(&self, duration: Duration) {
        self.completed.fetch_add(1, Ordering::Relaxed);
        self.consecutive_failures.store(0, Ordering::Relaxed);
        ewma_update(&self.ewma_duration, duration.as_nanos() as f64);
    }

    pub(crate) fn record_failure(&self) -> u32 {
        self.failed.fetch_add(1, Ordering::Relaxed);
        self.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1
    }

    pub(crate) fn record_cancel(&self) {
        self.cancelled.fetch_add(1, Ordering::Relaxed);
    }

    /// Waits until no request is in flight. Only a draining replica is guaranteed to wake the
    /// waiter (see [`Pool::drain`](crate::pool::Pool::drain)).
    pub async fn idle(&self) {
        loop {
            let notified = self.idle.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.in_flight() == 0 {
                return;
            }
            notified.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slow_start_shape() {
        let s = SlowStart::linear(Duration::from_secs(10));
        assert_eq!(s.factor(Duration::ZERO), 0.1);
        assert!((s.factor(Duration::from_secs(5)) - 0.5).abs() < 1e-9);
        assert_eq!(s.factor(Duration::from_secs(10)), 1.0);
        assert_eq!(SlowStart::DISABLED.factor(Duration::ZERO), 1.0);
        let nan = SlowStart {
            window: Duration::from_secs(1),
            floor: f64::NAN,
            aggression: f64::NAN,
        };
        assert_eq!(nan.factor(Duration::ZERO), 1.0);
    }
}
