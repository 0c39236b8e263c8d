//! Load that a replica reports about itself.
//!
//! The router counts what it sends (in-flight requests and tokens), but an inference engine knows
//! things the router cannot see: how many sequences are in its running batch, how many wait in its
//! own scheduler queue, and how full its KV cache is. vLLM publishes these on its Prometheus
//! `/metrics` endpoint; [`prometheus`] reads that text into a [`LoadReport`].
//!
//! A report is a snapshot taken at [`LoadReport::observed_at`]: it goes stale, and consumers
//! (the wait estimate in the shedding layer) ignore reports older than a configured age.
//!
//! ```
//! use replica_router::load::prometheus::VllmParser;
//! use tokio::time::Instant;
//!
//! let text = b"# TYPE vllm:num_requests_running gauge\n\
//!     vllm:num_requests_running{model_name=\"llama\"} 3\n\
//!     vllm:num_requests_waiting{model_name=\"llama\"} 1\n\
//!     vllm:kv_cache_usage_perc{model_name=\"llama\"} 0.25\n";
//! let report = VllmParser::new().parse(text, Instant::now()).unwrap();
//! assert_eq!((report.running, report.waiting), (3, 1));
//! assert_eq!(report.kv_usage, Some(0.25));
//! ```

pub mod prometheus;

use std::time::Duration;

use tokio::time::Instant;

/// Cumulative prefix-cache counters, as an engine exports them (monotonic since engine start).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PrefixCacheCounters {
    /// Tokens (vLLM: tokens, not requests) found in the prefix cache.
    pub hits: f64,
    /// Tokens looked up in the prefix cache.
    pub queries: f64,
}

impl PrefixCacheCounters {
    /// Hit rate between an earlier reading and this one, `None` when no query happened in between
    /// or the counters went backwards (the engine restarted).
    ///
    /// ```
    /// use replica_router::load::PrefixCacheCounters;
    /// let a = PrefixCacheCounters { hits: 10.0, queries: 100.0 };
    /// let b = PrefixCacheCounters { hits: 60.0, queries: 200.0 };
    /// assert_eq!(b.hit_rate_since(&a), Some(0.5));
    /// assert_eq!(a.hit_rate_since(&b), None);
    /// ```
    pub fn hit_rate_since(&self, earlier: &PrefixCacheCounters) -> Option<f64> {
        let hits = self.hits - earlier.hits;
        let queries = self.queries - earlier.queries;
        if queries.is_nan() || hits.is_nan() || queries <= 0.0 || hits < 0.0 || hits > queries {
            return None;
        }
        Some(hits / queries)
    }
}

/// What a replica says about its own load, at one instant.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LoadReport {
    /// Requests in the engine's running batch (vLLM `num_requests_running`).
    pub running: u64,
    /// Requests waiting in the engine's own queue (vLLM `num_requests_waiting`).
    pub waiting: u64,
    /// KV-cache usage as a fraction in `0.0..=1.0`, if the engine exports it.
    pub kv_usage: Option<f64>,
    /// Prefix-cache counters, if the engine exports them.
    pub prefix_cache: Option<PrefixCacheCounters>,
    /// When the report was read (tokio's clock, so tests can pause it).
    pub observed_at: Instant,
}

impl LoadReport {
    /// A report of `running` and `waiting` requests observed at `observed_at`, nothing else known.
    pub fn new(running: u64, waiting: u64, observed_at: Instant) -> Self {
        LoadReport {
            running,
            waiting,
            kv_usage: None,
            prefix_cache: None,
            observed_at,
        }
    }

    /// How old the report is at `now` (zero if `now` is before the observation).
    pub fn age(&self, now: Instant) -> Duration {
        now.saturating_duration_since(self.observed_at)
    }

    /// Whether the report is at most `max_age` old at `now`.
    ///
    /// ```
    /// use replica_router::load::LoadReport;
    /// use std::time::Duration;
    /// use tokio::time::Instant;
    /// let t = Instant::now();
    /// let r = LoadReport::new(1, 0, t);
    /// assert!(r.is_fresh(t + Duration::from_secs(1), Duration::from_secs(2)));
    /// assert!(!r.is_fresh(t + Duration::from_secs(3), Duration::from_secs(2)));
    /// ```
    pub fn is_fresh(&self, now: Instant, max_age: Duration) -> bool {
        self.age(now) <= max_age
    }

    /// Requests the engine holds, running or waiting.
    pub fn queued_total(&self) -> u64 {
        self.running.saturating_add(self.waiting)
    }
}
