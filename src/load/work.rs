//! The work a replica faces, as the router saw it: counted on the request path with atomics.
//!
//! Requests in flight are a poor measure of an LLM replica's load: prompts differ by 100x in
//! length, and a replica with two 80k-token prefills queued is busier than one with three short
//! chats. [`WorkState`] (one per replica, [`ReplicaState::work`](crate::pool::ReplicaState::work))
//! keeps what a time-to-first-token model needs:
//!
//! - **outstanding prefill**: the uncached prompt tokens of the requests sent to the replica whose
//!   first response *data* frame has not arrived yet (they are queued or prefilling). Real vLLM
//!   sends the `200` head before the prefill ends, so the first body data frame, not the head, is
//!   what ends the prefill phase;
//! - **decode load**: requests streaming (first data seen, body not ended) and their expected
//!   output tokens;
//! - a **learned prefill rate** in tokens per second: an EWMA fitted from each request's time to
//!   its first data frame against the prefill work that was ahead of it plus its own. It starts
//!   at a seed (capacity weight x a base rate, set by [`TtftModel`](super::predict::TtftModel)),
//!   so a TP=4 replica beside TP=2 ones, or a throttled one, is measured rather than assumed.
//!   The average is taken in log space with each sample's pull bounded
//!   ([`RATE_MAX_STEP`]), so one outlier (a stall, a prompt served from a cache the router did not
//!   know of) cannot swing it; every sample is clamped to `[MIN_RATE, MAX_RATE]`, so the rate
//!   stays finite and positive under any timing;
//! - a **cache calibration**: an EWMA of `reported cached tokens / predicted cached tokens`, fed by
//!   [`WorkState::observe_cached`] from the engine's own `usage.prompt_tokens_details.cached_tokens`,
//!   which scales what the router's prefix index predicts for this replica.
//!
//! The in-flight guard ([`InFlightGuard`](crate::inflight::InFlightGuard)) moves a request from
//! prefill to decode at its first data frame and releases it on every end path (success,
//! failure, cancellation, a dropped stream, a panic unwinding), so every counter returns to zero.
//!
//! How much of a request is prefill comes from a [`WorkPlan`] in the request's extensions (the
//! predicted-TTFT placement writes one: the uncached tokens on the chosen replica); without one,
//! the whole prompt is counted as prefill (the prefix fingerprints' token count, else the route
//! context's estimated tokens).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Smallest prefill rate a sample or a seed may set, tokens per second.
pub const MIN_RATE: f64 = 1.0;
/// Largest prefill rate a sample or a seed may set, tokens per second.
pub const MAX_RATE: f64 = 1e9;
/// Prefill work (own plus ahead) below which a time-to-first-data sample is not used to fit the
/// rate: fixed latencies dominate short prompts.
pub const MIN_SAMPLE_TOKENS: u64 = 256;
/// Weight of the newest sample in the rate EWMA (taken in log space).
const RATE_ALPHA: f64 = 0.2;
/// A rate sample counts as at most this factor away from the current rate: one outlier (a
/// pause, a network stall, a prompt that was served from cache) moves the rate by at most
/// `RATE_MAX_STEP^RATE_ALPHA` (about 1.5x), while a real change is still followed within a few
/// samples.
pub const RATE_MAX_STEP: f64 = 8.0;
/// Weight of the newest sample in the cache-calibration EWMA.
const CACHE_ALPHA: f64 = 0.1;
/// Range of the cache calibration factor.
const CACHE_RANGE: (f64, f64) = (0.0, 1.5);

/// How much of one request is prefill and how much is decode, as the picking layer predicted it.
///
/// Insert one in the request's extensions after deciding; dispatch hands it to the in-flight
/// guard, which counts `prefill_tokens` as outstanding prefill on the chosen replica until the
/// first data frame, then `output_tokens` as decode load until the end.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct WorkPlan {
    /// Prompt tokens the chosen replica must prefill (not in its cache).
    pub prefill_tokens: u64,
    /// Expected output tokens.
    pub output_tokens: u64,
    /// Prompt tokens the picking layer predicted the replica holds (for
    /// [`WorkState::observe_cached`] once the engine reports what it actually had).
    pub cached_tokens: u64,
}

impl WorkPlan {
    /// The plan of a request with no prediction: the whole prompt is prefill. The prompt length
    /// is `prompt_tokens` when known, else `estimated_tokens` (prompt plus output) is used.
    pub fn unplanned(prompt_tokens: Option<u64>, estimated_tokens: u64) -> WorkPlan {
        match prompt_tokens {
            Some(p) => WorkPlan {
                prefill_tokens: p,
                output_tokens: estimated_tokens.saturating_sub(p),
                cached_tokens: 0,
            },
            None => WorkPlan {
                prefill_tokens: estimated_tokens,
                output_tokens: 0,
                cached_tokens: 0,
            },
        }
    }
}

/// One replica's work model; see the [module docs](self).
#[derive(Debug, Default)]
pub struct WorkState {
    prefill_tokens: AtomicU64,
    prefill_requests: AtomicU64,
    decode_tokens: AtomicU64,
    decode_requests: AtomicU64,
    /// Prefill rate in tokens/s as f64 bits; 0 = neither seeded nor sampled yet.
    rate: AtomicU64,
    rate_samples: AtomicU64,
    /// Cache calibration factor as f64 bits; 0 = no report yet (read as 1.0).
    cache: AtomicU64,
    cache_samples: AtomicU64,
    /// When the latest first data frame arrived: an engine load report taken before it may
    /// still count this router's own requests as waiting.
    last_first_data: parking_lot::Mutex<Option<tokio::time::Instant>>,
    /// The line fitted through (prefill work, time to first data) samples.
    fit: parking_lot::Mutex<LatencyFit>,
    /// What other routers (gateways sharing a work view) have outstanding here.
    foreign: parking_lot::Mutex<Option<(ForeignWork, tokio::time::Instant)>>,
    /// The prefill rate other routers learned here (f64 bits; 0 = none) and their samples.
    shared_rate: AtomicU64,
    shared_rate_samples: AtomicU64,
}

/// The work other routers have outstanding on a replica, as a shared work view (for example
/// [`cluster::WorkView`](crate::cluster)) last read it: the sum over every other live gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ForeignWork {
    /// Uncached prompt tokens they sent whose first data frame has not arrived.
    pub prefill_tokens: u64,
    /// Their requests still prefilling (queued or prefilling).
    pub prefill_requests: u64,
    /// Their requests streaming.
    pub decode_requests: u64,
    /// Expected output tokens of their streaming requests.
    pub decode_tokens: u64,
}

/// Most samples either side counts for in [`WorkState::blended_rate`].
pub const BLEND_SAMPLES: u64 = 32;

/// Weight each older sample keeps per new one in the latency fit (about 20 samples' memory).
const FIT_DECAY: f64 = 0.95;
/// Decayed sample weight the fit needs before its line is trusted.
const FIT_MIN_WEIGHT: f64 = 4.0;
/// Spread of the work (coefficient of variation) the fit needs before its slope is trusted.
const FIT_MIN_SPREAD: f64 = 0.2;

/// An exponentially forgetting least-squares line `time = overhead + work / rate` through the
/// samples: the time to first data of a short prompt is mostly fixed cost (network, HTTP,
/// tokenizing, one engine step), and a plain `work / time` ratio would make a replica that
/// serves cache hits (little work each) look slow and push traffic off its cache.
#[derive(Debug, Default, Clone, Copy)]
struct LatencyFit {
    w: f64,
    x: f64,
    y: f64,
    xx: f64,
    xy: f64,
    /// The latest trusted intercept, seconds (0 until the line is trusted).
    overhead: f64,
}

impl LatencyFit {
    /// Adds a sample; returns the rate it implies (tokens/s), or `None` when it says nothing
    /// (work entirely hidden in the fixed cost).
    fn add(&mut self, work: f64, secs: f64) -> Option<f64> {
        self.w = self.w * FIT_DECAY + 1.0;
        self.x = self.x * FIT_DECAY + work;
        self.y = self.y * FIT_DECAY + secs;
        self.xx = self.xx * FIT_DECAY + work * work;
        self.xy = self.xy * FIT_DECAY + work * secs;
        let mx = self.x / self.w;
        let my = self.y / self.w;
        let var = self.xx / self.w - mx * mx;
        if self.w >= FIT_MIN_WEIGHT && var > (FIT_MIN_SPREAD * mx).powi(2) {
            let slope = (self.xy / self.w - mx * my) / var;
            let overhead = my - slope * mx;
            if slope > 0.0 && overhead.is_finite() {
                self.overhead = overhead.clamp(0.0, my);
                return Some(1.0 / slope);
            }
        }
        // Too little spread for a line: the ratio, net of the fixed cost learned so far.
        let net = secs - self.overhead;
        if net > 0.0 {
            Some(work / net)
        } else if secs > 0.0 {
            None
        } else {
            Some(MAX_RATE)
        }
    }
}

fn clamp_rate(r: f64) -> f64 {
    if r.is_nan() {
        return MIN_RATE;
    }
    r.clamp(MIN_RATE, MAX_RATE)
}

/// A robust EWMA of a positive quantity: the geometric mean moves by `alpha` of the sample's
/// log distance, that distance clamped to `ln(max_step)`; `cell = sample` while it is 0.
fn log_ewma(cell: &AtomicU64, sample: f64, alpha: f64, max_step: f64) {
    let limit = max_step.ln();
    update_f64(cell, |old| {
        if old <= 0.0 || !old.is_finite() {
            sample
        } else {
            let step = (sample / old).ln().clamp(-limit, limit);
            clamp_rate(old * (alpha * step).exp())
        }
    });
}

/// Replaces the f64 held (as bits) in `cell` with `f(old)`, atomically.
fn update_f64(cell: &AtomicU64, f: impl Fn(f64) -> f64) {
    let _ = cell.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |bits| {
        Some(f(f64::from_bits(bits)).to_bits())
    });
}

fn sub(cell: &AtomicU64, n: u64) {
    if n > 0 {
        // Saturating: a counter never wraps even if a caller's bookkeeping were off.
        let _ = cell.fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| {
            Some(v.saturating_sub(n))
        });
    }
}

impl WorkState {
    /// The fixed cost per request the latency fit found (the line's intercept), zero until the
    /// samples spread enough to fit a line.
    pub fn overhead(&self) -> Duration {
        Duration::try_from_secs_f64(self.fit.lock().overhead).unwrap_or_default()
    }

    /// Records what other routers have outstanding here, as it stood at `at` (when they
    /// published it, not when it was read).
    pub fn set_foreign(&self, work: ForeignWork, at: tokio::time::Instant) {
        *self.foreign.lock() = Some((work, at));
    }

    /// What other routers have outstanding here, if it is at most `max_age` old.
    pub fn foreign(&self, max_age: Duration) -> Option<ForeignWork> {
        self.foreign_aged(max_age).map(|(work, _)| work)
    }

    /// What other routers have outstanding here and how old the figures are, if at most
    /// `max_age`: a figure that old overstates the work still queued, which the replica has
    /// been working through since.
    pub fn foreign_aged(&self, max_age: Duration) -> Option<(ForeignWork, Duration)> {
        let guard = self.foreign.lock();
        let (work, at) = (*guard)?;
        let age = at.elapsed();
        (age <= max_age).then_some((work, age))
    }

    /// A replica with no work and no rate yet.
    pub fn new() -> Self {
        WorkState::default()
    }

    /// When the latest request on this replica got its first data frame, if any has.
    pub fn last_first_data(&self) -> Option<tokio::time::Instant> {
        *self.last_first_data.lock()
    }

    /// Uncached prompt tokens of the requests sent and not yet answered with a data frame.
    pub fn prefill_tokens(&self) -> u64 {
        self.prefill_tokens.load(Ordering::Acquire)
    }

    /// Requests sent and not yet answered with a data frame (queued or prefilling).
    pub fn prefill_requests(&self) -> u64 {
        self.prefill_requests.load(Ordering::Acquire)
    }

    /// Expected output tokens of the requests streaming.
    pub fn decode_tokens(&self) -> u64 {
        self.decode_tokens.load(Ordering::Acquire)
    }

    /// Requests streaming: first data frame seen, body not ended.
    pub fn decode_requests(&self) -> u64 {
        self.decode_requests.load(Ordering::Acquire)
    }

    /// The prefill rate (tokens/s) learned or seeded so far; `None` before either.
    pub fn rate(&self) -> Option<f64> {
        let r = f64::from_bits(self.rate.load(Ordering::Relaxed));
        (r > 0.0).then_some(r)
    }

    /// Samples that went into the learned rate.
    pub fn rate_samples(&self) -> u64 {
        self.rate_samples.load(Ordering::Relaxed)
    }

    /// The rate, seeding it with `seed` tokens/s (clamped) if nothing set it yet.
    pub fn rate_or_seed(&self, seed: f64) -> f64 {
        if let Some(r) = self.rate() {
            return r;
        }
        let seed = clamp_rate(seed);
        match self
            .rate
            .compare_exchange(0, seed.to_bits(), Ordering::Relaxed, Ordering::Relaxed)
        {
            Ok(_) => seed,
            Err(now) => f64::from_bits(now),
        }
    }

    /// Records the prefill rate other routers learned here (their sample-weighted mean) and
    /// how many samples it rests on; `samples == 0` clears it.
    pub fn set_shared_rate(&self, rate: f64, samples: u64) {
        let ok = samples > 0 && rate.is_finite() && rate > 0.0;
        self.shared_rate.store(
            if ok { clamp_rate(rate).to_bits() } else { 0 },
            Ordering::Relaxed,
        );
        self.shared_rate_samples
            .store(if ok { samples } else { 0 }, Ordering::Relaxed);
    }

    /// The prefill rate other routers learned here and their samples, if any did.
    pub fn shared_rate(&self) -> Option<(f64, u64)> {
        let r = f64::from_bits(self.shared_rate.load(Ordering::Relaxed));
        let n = self.shared_rate_samples.load(Ordering::Relaxed);
        (r > 0.0 && n > 0).then_some((r, n))
    }

    /// The rate to predict with: this router's own (learned, else `seed`), blended with the
    /// rate other routers learned here in proportion to the samples behind each (each side's
    /// count capped at [`BLEND_SAMPLES`], so neither drowns the other). A gateway that has just
    /// started, or sends little to this replica, predicts with what the cluster measured
    /// instead of its seed.
    ///
    /// ```
    /// use replica_router::load::work::WorkState;
    /// let w = WorkState::new();
    /// assert_eq!(w.blended_rate(10_000.0), 10_000.0);
    /// w.set_shared_rate(1_000_000.0, 50); // other gateways measured 1M tokens/s
    /// assert!((w.blended_rate(10_000.0) - 1_000_000.0).abs() < 1.0);
    /// ```
    pub fn blended_rate(&self, seed: f64) -> f64 {
        let own = self.rate_or_seed(seed);
        let Some((shared, n_shared)) = self.shared_rate() else {
            return own;
        };
        let n_own = self.rate_samples().min(BLEND_SAMPLES) as f64;
        let n_shared = n_shared.min(BLEND_SAMPLES) as f64;
        let ln = (n_own * own.ln() + n_shared * shared.ln()) / (n_own + n_shared);
        clamp_rate(ln.exp())
    }

    /// Folds in one request's time to first data frame: `tokens` of prefill work (the work ahead
    /// of it when it was sent, plus its own) took `elapsed`. The samples are fitted with a line
    /// `time = overhead + work / rate`, so the fixed cost of a request (network, HTTP, one
    /// engine step) does not read as slow prefill; the rate each sample implies is then
    /// averaged robustly (see [`RATE_MAX_STEP`]). Samples under [`MIN_SAMPLE_TOKENS`] are
    /// ignored; every sample is clamped to `[MIN_RATE, MAX_RATE]`, so the rate stays finite and
    /// positive.
    pub fn observe_prefill(&self, tokens: u64, elapsed: Duration) {
        if tokens < MIN_SAMPLE_TOKENS {
            return;
        }
        let Some(sample) = self.fit.lock().add(tokens as f64, elapsed.as_secs_f64()) else {
            return;
        };
        log_ewma(&self.rate, clamp_rate(sample), RATE_ALPHA, RATE_MAX_STEP);
        self.rate_samples.fetch_add(1, Ordering::Relaxed);
    }

    /// The cache calibration: how many of the cached tokens the router predicts this replica
    /// actually reports, as a factor in `[0, 1.5]` (1.0 until a report arrives).
    pub fn cache_calibration(&self) -> f64 {
        let c = f64::from_bits(self.cache.load(Ordering::Relaxed));
        if self.cache_samples.load(Ordering::Relaxed) == 0 || !c.is_finite() {
            1.0
        } else {
            c
        }
    }

    /// Reports what the replica said it had cached for one request (OpenAI
    /// `usage.prompt_tokens_details.cached_tokens`) beside what the router predicted. Requests
    /// for which the router predicted no cached tokens carry no information and are ignored.
    ///
    /// ```
    /// use replica_router::load::work::WorkState;
    /// let w = WorkState::new();
    /// assert_eq!(w.cache_calibration(), 1.0);
    /// w.observe_cached(1000, 500); // the router over-predicted by 2x
    /// assert!(w.cache_calibration() < 1.0);
    /// ```
    pub fn observe_cached(&self, predicted_cached: u64, reported_cached: u64) {
        if predicted_cached == 0 {
            return;
        }
        let ratio =
            (reported_cached as f64 / predicted_cached as f64).clamp(CACHE_RANGE.0, CACHE_RANGE.1);
        if self.cache_samples.fetch_add(1, Ordering::Relaxed) == 0 {
            self.cache.store(ratio.to_bits(), Ordering::Relaxed);
        } else {
            update_f64(&self.cache, |old| old + CACHE_ALPHA * (ratio - old));
        }
    }

    /// Counts a request's prefill; returns the prefill tokens that were ahead of it.
    pub(crate) fn begin(&self, plan: &WorkPlan) -> u64 {
        self.prefill_requests.fetch_add(1, Ordering::AcqRel);
        self.prefill_tokens
            .fetch_add(plan.prefill_tokens, Ordering::AcqRel)
    }

    /// The request's first data frame arrived: its prefill is done, it decodes now.
    pub(crate) fn first_data(&self, plan: &WorkPlan) {
        *self.last_first_data.lock() = Some(tokio::time::Instant::now());
        self.decode_requests.fetch_add(1, Ordering::AcqRel);
        self.decode_tokens
            .fetch_add(plan.output_tokens, Ordering::AcqRel);
        self.end_prefill(plan);
    }

    /// The request ended before its first data frame.
    pub(crate) fn end_prefill(&self, plan: &WorkPlan) {
        sub(&self.prefill_tokens, plan.prefill_tokens);
        sub(&self.prefill_requests, 1);
    }

    /// The request ended after its first data frame.
    pub(crate) fn end_decode(&self, plan: &WorkPlan) {
        sub(&self.decode_tokens, plan.output_tokens);
        sub(&self.decode_requests, 1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_seeds_then_learns() {
        let w = WorkState::new();
        assert_eq!(w.rate(), None);
        assert_eq!(w.rate_or_seed(10_000.0), 10_000.0);
        w.observe_prefill(20_000, Duration::from_secs(1));
        let r = w.rate().unwrap();
        assert!(r > 10_000.0 && r < 20_000.0, "{r}");
        // One outlier moves the rate by a bounded factor, however far off it is.
        let before = w.rate().unwrap();
        w.observe_prefill(1_000_000, Duration::from_micros(1));
        let after = w.rate().unwrap();
        let bound = RATE_MAX_STEP.powf(RATE_ALPHA) * 1.000_001;
        assert!(
            after > before && after <= before * bound,
            "{before} -> {after}"
        );
        w.observe_prefill(300, Duration::from_secs(3_000));
        let r = w.rate().unwrap();
        assert!(r < after && r >= after / bound, "{after} -> {r}");
        // Too little work to learn from.
        w.observe_prefill(10, Duration::from_secs(100));
        assert_eq!(w.rate().unwrap(), r);
        w.observe_prefill(1_000, Duration::ZERO);
        assert!(w.rate().unwrap().is_finite());
    }

    #[test]
    fn a_fixed_cost_does_not_read_as_slow_prefill() {
        // A replica with 40 ms of fixed cost per request and 50k tokens/s of prefill: short
        // prompts (cache hits) and long ones alike must teach the same rate.
        let w = WorkState::new();
        w.rate_or_seed(10_000.0);
        for i in 0..60u64 {
            let work = [500, 4_000, 30_000][(i % 3) as usize];
            w.observe_prefill(
                work,
                Duration::from_secs_f64(0.040 + work as f64 / 50_000.0),
            );
        }
        let r = w.rate().unwrap();
        assert!((45_000.0..55_000.0).contains(&r), "{r}");
        let o = w.overhead().as_secs_f64();
        assert!((0.035..0.045).contains(&o), "{o}");
        // Only short prompts now: the ratio net of the learned fixed cost keeps the rate.
        for _ in 0..40 {
            w.observe_prefill(600, Duration::from_secs_f64(0.040 + 600.0 / 50_000.0));
        }
        let r = w.rate().unwrap();
        assert!((40_000.0..60_000.0).contains(&r), "{r}");
    }

    #[test]
    fn unplanned_splits_prompt_and_output() {
        let p = WorkPlan::unplanned(Some(100), 150);
        assert_eq!((p.prefill_tokens, p.output_tokens), (100, 50));
        let p = WorkPlan::unplanned(None, 150);
        assert_eq!((p.prefill_tokens, p.output_tokens), (150, 0));
    }
}
