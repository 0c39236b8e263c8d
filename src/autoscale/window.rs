//! A lock-free sliding window of wait histograms and shed counts.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

/// Slots the window is cut into.
const SLOTS: usize = 12;
/// Histogram buckets: one for zero, then four per octave of milliseconds from 1 ms to ~185 s.
const BUCKETS: usize = 72;

#[derive(Debug)]
struct Slot {
    /// Epoch number + 1 of the data held (0: never used).
    epoch: AtomicU64,
    admitted: AtomicU64,
    shed: AtomicU64,
    hist: [AtomicU64; BUCKETS],
}

impl Slot {
    fn new() -> Self {
        Slot {
            epoch: AtomicU64::new(0),
            admitted: AtomicU64::new(0),
            shed: AtomicU64::new(0),
            hist: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }
}

#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Totals {
    pub admitted: u64,
    pub shed: u64,
}

#[derive(Debug)]
pub(crate) struct Window {
    start: Instant,
    slot_nanos: u64,
    slots: Box<[Slot]>,
}

fn bucket(wait: Duration) -> usize {
    if wait.is_zero() {
        return 0;
    }
    let ms = wait.as_secs_f64() * 1000.0;
    let k = (4.0 * ms.log2()).ceil();
    let k = if k.is_finite() && k > 0.0 {
        k as usize
    } else {
        0
    };
    (1 + k).min(BUCKETS - 1)
}

fn upper_edge(b: usize) -> Duration {
    if b == 0 {
        return Duration::ZERO;
    }
    let ms = 2f64.powf((b - 1) as f64 / 4.0);
    Duration::from_secs_f64(ms / 1000.0)
}

impl Window {
    pub(crate) fn new(window: Duration, start: Instant) -> Self {
        let slot_nanos = (window.as_nanos() / SLOTS as u128).clamp(1, u128::from(u64::MAX)) as u64;
        Window {
            start,
            slot_nanos,
            slots: (0..SLOTS).map(|_| Slot::new()).collect(),
        }
    }

    fn epoch(&self, now: Instant) -> u64 {
        let nanos = now.saturating_duration_since(self.start).as_nanos();
        (nanos / u128::from(self.slot_nanos)).min(u128::from(u64::MAX - 1)) as u64
    }

    /// The slot for `now`, cleared first if it holds an older epoch.
    fn slot(&self, now: Instant) -> &Slot {
        let e = self.epoch(now);
        let slot = &self.slots[(e % SLOTS as u64) as usize];
        let tag = e + 1;
        let cur = slot.epoch.load(Ordering::Acquire);
        if cur < tag
            && slot
                .epoch
                .compare_exchange(cur, tag, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            // Increments racing with this reset may be lost: this is a signal, not an audit log.
            slot.admitted.store(0, Ordering::Relaxed);
            slot.shed.store(0, Ordering::Relaxed);
            for h in &slot.hist {
                h.store(0, Ordering::Relaxed);
            }
        }
        slot
    }

    pub(crate) fn record_wait(&self, now: Instant, wait: Duration) {
        let s = self.slot(now);
        s.admitted.fetch_add(1, Ordering::Relaxed);
        s.hist[bucket(wait)].fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn record_shed(&self, now: Instant) {
        self.slot(now).shed.fetch_add(1, Ordering::Relaxed);
    }

    /// The slots whose data lies in the window ending at `now`.
    fn live(&self, now: Instant) -> impl Iterator<Item = &Slot> {
        let e = self.epoch(now) + 1;
        let oldest = e.saturating_sub(SLOTS as u64 - 1);
        self.slots.iter().filter(move |s| {
            let t = s.epoch.load(Ordering::Acquire);
            t >= oldest.max(1) && t <= e
        })
    }

    pub(crate) fn totals(&self, now: Instant) -> Totals {
        self.live(now).fold(Totals::default(), |mut t, s| {
            t.admitted += s.admitted.load(Ordering::Relaxed);
            t.shed += s.shed.load(Ordering::Relaxed);
            t
        })
    }

    pub(crate) fn quantile(&self, now: Instant, q: f64) -> Option<Duration> {
        let mut hist = [0u64; BUCKETS];
        for s in self.live(now) {
            for (h, a) in hist.iter_mut().zip(&s.hist) {
                *h += a.load(Ordering::Relaxed);
            }
        }
        let total: u64 = hist.iter().sum();
        if total == 0 {
            return None;
        }
        let target = ((q.clamp(0.0, 1.0) * total as f64).ceil() as u64).max(1);
        let mut cum = 0;
        for (b, n) in hist.iter().enumerate() {
            cum += n;
            if cum >= target {
                return Some(upper_edge(b));
            }
        }
        Some(upper_edge(BUCKETS - 1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_bound_their_values() {
        for ms in [0.001, 0.5, 1.0, 1.5, 7.0, 200.0, 999.0, 65_000.0, 1e9] {
            let d = Duration::from_secs_f64(ms / 1000.0);
            let b = bucket(d);
            if b < BUCKETS - 1 {
                assert!(upper_edge(b) >= d - Duration::from_nanos(1), "{ms}");
                assert!(
                    upper_edge(b).as_secs_f64() <= d.as_secs_f64() * 1.19 + 0.001,
                    "{ms}"
                );
            }
        }
        assert_eq!(bucket(Duration::ZERO), 0);
    }

    #[test]
    fn quantile_and_expiry() {
        let t0 = Instant::now();
        let w = Window::new(Duration::from_secs(60), t0);
        for i in 0..100u64 {
            w.record_wait(t0, Duration::from_millis(i * 10));
        }
        let p95 = w.quantile(t0, 0.95).unwrap();
        assert!(
            p95 >= Duration::from_millis(940) && p95 <= Duration::from_millis(1120),
            "{p95:?}"
        );
        w.record_shed(t0 + Duration::from_secs(30));
        let t = w.totals(t0 + Duration::from_secs(30));
        assert_eq!((t.admitted, t.shed), (100, 1));
        // 61 s later the first slot has left the window, the shed one has not.
        let t = w.totals(t0 + Duration::from_secs(61));
        assert_eq!((t.admitted, t.shed), (0, 1));
        assert_eq!(w.quantile(t0 + Duration::from_secs(61), 0.95), None);
        // Reusing a slot clears it.
        w.record_wait(t0 + Duration::from_secs(120), Duration::ZERO);
        assert_eq!(w.totals(t0 + Duration::from_secs(120)).admitted, 1);
    }
}
