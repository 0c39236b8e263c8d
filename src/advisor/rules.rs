//! The decision rules, tried in order, and their thresholds.

use crate::advisor::measure::{clamp_unit, Measurements};
use crate::advisor::report::{Advice, Evidence, Rule, Verdict};
use crate::advisor::shape::Shape;

/// Thresholds of the rules.
#[derive(Debug, Clone, PartialEq)]
pub struct AdvisorConfig {
    /// Mean batch occupancy at or above which the batches count as full (`max_num_seqs`
    /// reached). Default 0.9.
    pub full_batch: f64,
    /// Mean utilization below which the GPUs count as under-utilized. Default 0.5.
    pub low_utilization: f64,
    /// KV-cache usage at or above which a replica's cache counts as full. Default 0.95.
    pub kv_full: f64,
    /// Mean batch occupancy below which a full KV cache means "a few long contexts fill it".
    /// Default 0.25.
    pub small_batch: f64,
    /// Batch occupancy the proposed replica count aims for. Default 0.8.
    pub target_occupancy: f64,
    /// The widest tensor parallelism proposed (GPUs of one node); beyond it, pipeline stages.
    /// Default 8.
    pub max_tensor_parallel: u32,
    /// Exponent of the latency gain of wider TP: a lone request's latency scales as
    /// `TP ^ -tp_scaling` (all-reduces keep it below 1). Default 0.85.
    pub tp_scaling: f64,
}

impl Default for AdvisorConfig {
    fn default() -> Self {
        AdvisorConfig {
            full_batch: 0.9,
            low_utilization: 0.5,
            kv_full: 0.95,
            small_batch: 0.25,
            target_occupancy: 0.8,
            max_tensor_parallel: 8,
            tp_scaling: 0.85,
        }
    }
}

/// Reads `m` against `config`'s thresholds: the first rule that fires gives the verdict (see
/// the [module docs](super) for the order and why).
///
/// ```
/// use replica_router::advisor::{advise, AdvisorConfig, Measurements, ReplicaMeasurement, Verdict};
/// use std::time::Duration;
///
/// // The guide's Harbor case: one TP=2 replica at max_num_seqs, 78% tensor utilization,
/// // new sessions queueing for seconds.
/// let mut m = Measurements::new(2, 1, 256);
/// m.replicas.push(ReplicaMeasurement {
///     id: "gpu-0-1".into(), utilization: Some(0.78), batch_occupancy: 1.0, waiting: 60.0,
///     kv_usage: 0.7,
/// });
/// m.p95_queue_wait = Duration::from_secs(6);
/// let advice = advise(&m, &AdvisorConfig::default());
/// assert_eq!(advice.verdict, Verdict::ReplicaBound);
/// assert!(advice.proposed.replicas >= 2);
/// assert_eq!(advice.proposed.tensor_parallel, 2);
/// ```
pub fn advise(m: &Measurements, config: &AdvisorConfig) -> Advice {
    let evidence = evidence(m);
    let current = m.shape();
    let (verdict, rule, proposed) = decide(m, &evidence, config, current);
    Advice {
        verdict,
        rule,
        evidence,
        current,
        proposed,
    }
}

fn evidence(m: &Measurements) -> Evidence {
    let n = m.replicas.len();
    let mean = |f: &dyn Fn(&crate::advisor::measure::ReplicaMeasurement) -> f64| -> f64 {
        if n == 0 {
            0.0
        } else {
            m.replicas.iter().map(f).sum::<f64>() / n as f64
        }
    };
    let max = |f: &dyn Fn(&crate::advisor::measure::ReplicaMeasurement) -> f64| -> f64 {
        m.replicas.iter().map(f).fold(0.0, f64::max)
    };
    let gpus = m
        .tensor_parallel
        .max(1)
        .saturating_mul(m.pipeline_parallel.max(1));
    Evidence {
        replicas: u32::try_from(n).unwrap_or(u32::MAX),
        mean_utilization: mean(&|r| r.effective_utilization()),
        mean_batch_occupancy: mean(&|r| clamp_unit(r.batch_occupancy)),
        max_batch_occupancy: max(&|r| clamp_unit(r.batch_occupancy)),
        mean_waiting: mean(&|r| finite_non_negative(r.waiting)),
        max_kv_usage: max(&|r| clamp_unit(r.kv_usage)),
        p95_queue_wait: m.p95_queue_wait,
        queue_wait_slo: m.queue_wait_slo,
        low_load_latency: m.low_load_latency,
        latency_target: m.latency_target,
        memory_required_bytes: m.memory.map(|f| f.required_bytes()),
        memory_available_bytes: m.memory.map(|f| f.available_bytes(gpus)),
    }
}

fn decide(
    m: &Measurements,
    e: &Evidence,
    config: &AdvisorConfig,
    current: Shape,
) -> (Verdict, Rule, Shape) {
    // 1a. Static fit: nothing else matters until one replica holds the model and its context.
    if let Some(fit) = m.memory {
        if !fit.fits(current.gpus_per_replica()) {
            return (
                Verdict::MemoryBound,
                Rule::ModelDoesNotFit,
                fitting_shape(&fit, current, config),
            );
        }
    }
    let queued = e.p95_queue_wait > e.queue_wait_slo
        || (e.mean_batch_occupancy >= config.full_batch && e.mean_waiting >= 1.0);
    // 1b. Measured fit: the cache is full with a nearly empty batch, and requests wait.
    if queued && e.max_kv_usage >= config.kv_full && e.mean_batch_occupancy < config.small_batch {
        return (
            Verdict::MemoryBound,
            Rule::KvFullSmallBatch,
            wider(current, current.tensor_parallel.saturating_mul(2), config),
        );
    }
    // 2. A lone request too slow: only a faster replica helps.
    if let (Some(latency), Some(target)) = (e.low_load_latency, e.latency_target) {
        if latency > target {
            return (
                Verdict::ShardBound,
                Rule::LoneRequestTooSlow,
                faster_shape(latency.as_secs_f64(), target.as_secs_f64(), current, config),
            );
        }
    }
    if queued {
        // 3. Waiting while the GPUs idle: the engine is not batching, more replicas would idle too.
        if e.mean_utilization < config.low_utilization {
            return (Verdict::UnderUtilized, Rule::QueueingWhileIdle, current);
        }
        // 4. Busy and full: another copy of the model takes the overflow.
        return (
            Verdict::ReplicaBound,
            Rule::SaturatedByConcurrency,
            more_replicas(m, e, current, config),
        );
    }
    (Verdict::Healthy, Rule::NoPressure, current)
}

/// The current replica count at the smallest `TP` (powers of two up to the maximum), then
/// `PP`, whose replica holds the model and one longest context.
fn fitting_shape(
    fit: &crate::advisor::shape::MemoryFit,
    current: Shape,
    config: &AdvisorConfig,
) -> Shape {
    let max_tp = config.max_tensor_parallel.max(1);
    let mut tp = current.tensor_parallel.max(1);
    let mut pp = current.pipeline_parallel.max(1);
    for _ in 0..32 {
        if fit.fits(tp.saturating_mul(pp)) {
            break;
        }
        if tp.saturating_mul(2) <= max_tp {
            tp *= 2;
        } else {
            pp = pp.saturating_mul(2);
        }
    }
    Shape::new(current.replicas, tp, pp)
}

/// The current replica count with TP raised to `tp` (capped at the maximum; the rest as PP).
fn wider(current: Shape, tp: u32, config: &AdvisorConfig) -> Shape {
    let max_tp = config.max_tensor_parallel.max(1);
    if tp <= max_tp {
        Shape::new(current.replicas, tp, current.pipeline_parallel)
    } else {
        Shape::new(
            current.replicas,
            max_tp,
            current
                .pipeline_parallel
                .saturating_mul(tp.div_ceil(max_tp)),
        )
    }
}

/// The smallest power-of-two TP (up to the maximum) whose expected lone-request latency,
/// `latency * (tp / TP') ^ tp_scaling`, meets the target; the same replica count.
fn faster_shape(latency: f64, target: f64, current: Shape, config: &AdvisorConfig) -> Shape {
    let max_tp = config.max_tensor_parallel.max(1);
    let scaling = if config.tp_scaling.is_finite() && config.tp_scaling > 0.0 {
        config.tp_scaling
    } else {
        1.0
    };
    let from = current.tensor_parallel.max(1);
    let mut tp = from;
    while tp < max_tp {
        tp = tp.saturating_mul(2).min(max_tp);
        let expected = latency * (f64::from(from) / f64::from(tp)).powf(scaling);
        if expected <= target {
            break;
        }
    }
    Shape::new(current.replicas, tp, current.pipeline_parallel)
}

/// At least one more replica; more when the demand (running plus waiting, per `max_num_seqs`)
/// needs them to run at the target occupancy.
fn more_replicas(m: &Measurements, e: &Evidence, current: Shape, config: &AdvisorConfig) -> Shape {
    let n = f64::from(e.replicas.max(1));
    let demand = e.mean_batch_occupancy + e.mean_waiting / f64::from(m.max_num_seqs.max(1));
    let target = if config.target_occupancy.is_finite() && config.target_occupancy > 0.0 {
        config.target_occupancy
    } else {
        0.8
    };
    let needed = (n * demand / target).ceil();
    let needed = if needed.is_finite() {
        needed.min(f64::from(u32::MAX / 2)) as u32
    } else {
        0
    };
    let replicas = needed.max(e.replicas.max(1).saturating_add(1));
    Shape::new(replicas, current.tensor_parallel, current.pipeline_parallel)
}

fn finite_non_negative(x: f64) -> f64 {
    if x.is_finite() {
        x.max(0.0)
    } else {
        0.0
    }
}
