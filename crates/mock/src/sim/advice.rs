//! A simulation run as the capacity advisor's input.

use std::time::Duration;

use replica_router::advisor::{Measurements, MemoryFit, ReplicaMeasurement};

use crate::sim::report::PolicyReport;
use crate::sim::scenario::Scenario;
use crate::MockConfig;

/// What a router would measure on `scenario` during the run `report` describes, for
/// [`advise`](replica_router::advisor::advise): per replica the engine's compute utilization,
/// batch occupancy, queue and KV usage over the arrival window (past the warm-up), the run's p95
/// queue wait against `queue_wait_slo`, and the memory fit of the scenario's engine (its
/// weights, KV bytes per token and GPU memory) for the run's longest context. The latency
/// fields are left empty: set [`low_load_latency`](Measurements::low_load_latency) from a
/// low-load run and a [`latency_target`](Measurements::latency_target) if there is one.
///
/// TP is the first replica's (the advisor reads homogeneous pools).
pub fn measurements(
    report: &PolicyReport,
    scenario: &Scenario,
    queue_wait_slo: Duration,
) -> Measurements {
    let tp = scenario.replicas.first().map_or(1, |r| r.tp);
    let max_num_seqs = u32::try_from(scenario.engine.max_num_seqs).unwrap_or(u32::MAX);
    let mut m = Measurements::new(tp, 1, max_num_seqs);
    m.replicas = report
        .replicas
        .iter()
        .map(|r| ReplicaMeasurement {
            id: r.id.clone(),
            utilization: Some(r.utilization),
            batch_occupancy: r.batch_occupancy(),
            waiting: r.mean_waiting,
            kv_usage: r.mean_kv_usage,
        })
        .collect();
    m.p95_queue_wait = report.queue_wait.p95;
    m.queue_wait_slo = queue_wait_slo;
    m.memory = Some(memory_fit(
        &scenario.engine,
        u64::from(report.max_context_tokens),
    ));
    m
}

/// The memory fit of `engine`'s model (weights, KV bytes per token, usable GPU memory) for a
/// context of `context_tokens`.
///
/// ```
/// use replica_router_mock::MockConfig;
/// use replica_router_mock::sim::memory_fit;
/// let fit = memory_fit(&MockConfig::default(), 32_768);
/// assert!(fit.fits(2)); // 70B in FP8 on two H100s
/// assert!(!fit.fits(1));
/// ```
pub fn memory_fit(engine: &MockConfig, context_tokens: u64) -> MemoryFit {
    let bytes = |x: f64| {
        if x.is_finite() && x > 0.0 {
            x as u64
        } else {
            0
        }
    };
    MemoryFit {
        gpu_memory_bytes: bytes(engine.gpu_memory_bytes),
        weight_bytes: bytes(engine.weight_bytes),
        kv_bytes_per_token: bytes(engine.kv_bytes_per_token).max(1),
        context_tokens,
    }
}
