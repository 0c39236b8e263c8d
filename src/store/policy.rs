//! What a caller does when the store fails, and the one bounded way every caller calls it.

use std::future::Future;
use std::time::Duration;

use super::StoreError;

/// What to do when the counter store fails or times out.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum FailurePolicy {
    /// Admit the request without counting it (availability over strictness). The default.
    #[default]
    Open,
    /// Reject: the quota layer answers `RouteError::Unavailable` (503); a pin table reports the
    /// error instead of falling back.
    Closed,
}

/// Runs one store operation with a timeout, recording its latency
/// (`replica_router_store_call_seconds{op}`) and failures (`replica_router_store_errors_total{op,kind}`).
pub async fn call_store<T>(
    timeout: Duration,
    op: &'static str,
    fut: impl Future<Output = Result<T, StoreError>>,
) -> Result<T, StoreError> {
    let started = std::time::Instant::now();
    let result = match tokio::time::timeout(timeout, fut).await {
        Ok(r) => r,
        Err(_) => Err(StoreError::Timeout { op, after: timeout }),
    };
    metrics::histogram!("replica_router_store_call_seconds", "op" => op)
        .record(started.elapsed().as_secs_f64());
    if let Err(e) = &result {
        metrics::counter!("replica_router_store_errors_total", "op" => op, "kind" => e.kind())
            .increment(1);
    }
    result
}
