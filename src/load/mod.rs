//! Load signals: what a replica reports about itself, the queue-wait estimate built on it, and
//! the wait advice the shedding layer hands to the picking layers.
//!
//! The router counts what it sends (in-flight requests and tokens), but an inference engine knows
//! things the router cannot see: how many sequences are in its running batch, how many wait in its
//! own scheduler queue, and how full its KV cache is. vLLM publishes these on its Prometheus
//! `/metrics` endpoint; [`prometheus`] reads that text into a [`LoadReport`].
//!
//! The report type is the backend's [`LoadReport`], re-exported here.
//! A report is a snapshot taken at [`LoadReport::observed_at`]: it goes stale, and consumers
//! (the wait estimate in the shedding layer) ignore reports older than a configured age.
//! Prefix-cache counters, which only matter to dashboards, come separately in
//! [`prometheus::VllmLoad`].
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

mod advice;
pub(crate) mod estimate;
pub mod predict;
pub mod prometheus;
pub mod work;

pub use self::predict::{Placement, TtftModel, TtftPlacement};
pub use self::work::{ForeignWork, WorkPlan, WorkState};

pub use self::advice::{SloAdvice, StickyPolicy, WaitSource};
pub use self::estimate::{WaitEstimate, WaitEstimator};
pub use crate::backend::LoadReport;

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
