//! Per-replica gauges.

use tokio::time::Instant;

use crate::load::WaitEstimator;
use crate::pool::{Health, PoolSnapshot};

/// Sets the per-replica gauges for every member of `snapshot`, labelled `replica`:
///
/// - `replica_router_replica_in_flight` and `replica_router_replica_in_flight_tokens`;
/// - `replica_router_replica_estimated_wait_seconds` (by `estimator`);
/// - `replica_router_replica_health`: 0 healthy, 1 unhealthy, 2 ejected;
/// - `replica_router_replica_draining`: 1 while draining;
/// - `replica_router_replica_weight_factor`: the slow-start ramp, 1.0 when not ramping;
/// - `replica_router_replica_ttfb_seconds` and `replica_router_replica_duration_seconds`: the
///   smoothed time to the response head and to the end of the body, once a request completed;
/// - from the engine's latest [`LoadReport`](crate::backend::LoadReport), when it published one:
///   `replica_router_replica_engine_running` (its running batch),
///   `replica_router_replica_engine_waiting` (its own queue),
///   `replica_router_replica_kv_cache_usage` (0 to 1, when reported) and
///   `replica_router_replica_load_report_age_seconds` (how stale the three are).
///
/// Together these are the per-replica dashboard the guide asks for against tail latency
/// (batch size, KV usage, queueing, latency per replica). Tokens per second come from the
/// engines' own metrics (vLLM's `vllm:generation_tokens_total`): the router does not count
/// tokens.
///
/// Replica ids are operator-chosen and few, so they are safe as labels (tenants never are).
pub fn record_pool_metrics<B>(snapshot: &PoolSnapshot<B>, estimator: &WaitEstimator, now: Instant) {
    for r in snapshot.replicas() {
        let s = r.state();
        let id = r.id().to_string();
        let health = match s.health() {
            Health::Healthy => 0.0,
            Health::Unhealthy => 1.0,
            Health::Ejected => 2.0,
        };
        let wait = estimator.estimate(r, snapshot.slow_start(), now).wait;
        metrics::gauge!("replica_router_replica_in_flight", "replica" => id.clone())
            .set(s.in_flight() as f64);
        metrics::gauge!("replica_router_replica_in_flight_tokens", "replica" => id.clone())
            .set(s.in_flight_tokens() as f64);
        metrics::gauge!("replica_router_replica_estimated_wait_seconds", "replica" => id.clone())
            .set(wait.as_secs_f64());
        metrics::gauge!("replica_router_replica_health", "replica" => id.clone()).set(health);
        metrics::gauge!("replica_router_replica_draining", "replica" => id.clone())
            .set(if s.is_draining() { 1.0 } else { 0.0 });
        metrics::gauge!("replica_router_replica_weight_factor", "replica" => id.clone())
            .set(s.ramp_factor(snapshot.slow_start(), now));
        if let Some(t) = s.ewma_ttfb() {
            metrics::gauge!("replica_router_replica_ttfb_seconds", "replica" => id.clone())
                .set(t.as_secs_f64());
        }
        if let Some(t) = s.ewma_duration() {
            metrics::gauge!("replica_router_replica_duration_seconds", "replica" => id.clone())
                .set(t.as_secs_f64());
        }
        if let Some(report) = s.load_report() {
            metrics::gauge!("replica_router_replica_engine_running", "replica" => id.clone())
                .set(report.running as f64);
            metrics::gauge!("replica_router_replica_engine_waiting", "replica" => id.clone())
                .set(report.waiting as f64);
            if let Some(kv) = report.kv_usage {
                metrics::gauge!("replica_router_replica_kv_cache_usage", "replica" => id.clone())
                    .set(kv);
            }
            metrics::gauge!("replica_router_replica_load_report_age_seconds", "replica" => id).set(
                now.saturating_duration_since(report.observed_at)
                    .as_secs_f64(),
            );
        }
    }
}
