//! What the advisor reads: per-replica measurements and the pool-wide latencies, as a plain
//! struct a caller fills, or builds from the pool's live state.

use std::time::Duration;

use tokio::time::Instant;

use crate::advisor::shape::{MemoryFit, Shape};
use crate::pool::PoolSnapshot;

/// What one replica did over the measurement window.
#[derive(Debug, Clone, PartialEq)]
pub struct ReplicaMeasurement {
    /// The replica's id.
    pub id: String,
    /// GPU compute utilization, `0.0..=1.0` (tensor-core activity from DCGM, or the share of
    /// the replica's peak token throughput it reached); `None` when not measured, in which case
    /// the rules use [`batch_occupancy`](Self::batch_occupancy) in its place.
    pub utilization: Option<f64>,
    /// Running sequences over the engine's `max_num_seqs`, `0.0..=1.0` (time-averaged, or the
    /// latest report).
    pub batch_occupancy: f64,
    /// Requests queued inside the engine, not yet scheduled (time-averaged, or the latest
    /// report).
    pub waiting: f64,
    /// KV-cache usage, `0.0..=1.0`.
    pub kv_usage: f64,
}

impl ReplicaMeasurement {
    /// The utilization the rules use: the measured one, else the batch occupancy.
    pub fn effective_utilization(&self) -> f64 {
        clamp_unit(self.utilization.unwrap_or(self.batch_occupancy))
    }
}

/// Everything the advisor reads, for one homogeneous pool (replicas of one shape).
#[derive(Debug, Clone, PartialEq)]
pub struct Measurements {
    /// Tensor-parallel degree of each replica.
    pub tensor_parallel: u32,
    /// Pipeline-parallel degree of each replica.
    pub pipeline_parallel: u32,
    /// The engines' `max_num_seqs` (batch ceiling), for the advice's wording and the demand
    /// estimate.
    pub max_num_seqs: u32,
    /// The replicas' measurements, one per replica in the pool.
    pub replicas: Vec<ReplicaMeasurement>,
    /// p95 of the time requests waited before their prefill began (gateway queue plus engine
    /// queue).
    pub p95_queue_wait: Duration,
    /// The queue-wait SLO (the shedding layer's wait budget).
    pub queue_wait_slo: Duration,
    /// Latency of a lone request (time per output token, or time to first token) measured at
    /// low concurrency; `None` when not measured.
    pub low_load_latency: Option<Duration>,
    /// The latency target [`low_load_latency`](Self::low_load_latency) is held to; `None`: no
    /// single-request latency SLO.
    pub latency_target: Option<Duration>,
    /// The model's memory needs against one replica's GPUs; `None` when unknown.
    pub memory: Option<MemoryFit>,
}

impl Measurements {
    /// Measurements of a pool with no replica measured yet: `TP x PP` replicas of
    /// `max_num_seqs`, a p95 queue wait of zero against the guide's 200 ms SLO, no latency
    /// target and no memory fit.
    pub fn new(tensor_parallel: u32, pipeline_parallel: u32, max_num_seqs: u32) -> Measurements {
        Measurements {
            tensor_parallel: tensor_parallel.max(1),
            pipeline_parallel: pipeline_parallel.max(1),
            max_num_seqs: max_num_seqs.max(1),
            replicas: Vec::new(),
            p95_queue_wait: Duration::ZERO,
            queue_wait_slo: Duration::from_millis(200),
            low_load_latency: None,
            latency_target: None,
            memory: None,
        }
    }

    /// From the pool's live state: one [`ReplicaMeasurement`] per replica whose latest load
    /// report (running, waiting, KV usage) is younger than `max_age` at `now`, and `TP x PP`
    /// from the first replica's spec. Utilization is left unmeasured (the router does not see
    /// the GPUs; set it from DCGM if you have it), and so are the latencies and the memory fit:
    /// set [`p95_queue_wait`](Self::p95_queue_wait) (e.g. from the
    /// [autoscale signal](crate::autoscale::AutoscaleSignal)'s recommendation) and the rest on
    /// the returned value.
    ///
    /// ```
    /// use replica_router::advisor::Measurements;
    /// use replica_router::backend::LoadReport;
    /// use replica_router::pool::Pool;
    /// use replica_router::replica::ReplicaSpec;
    /// use std::time::Duration;
    /// use tokio::time::Instant;
    ///
    /// let pool = Pool::builder()
    ///     .replica("a", ReplicaSpec::new("m").tensor_parallel(2), ())
    ///     .build()
    ///     .unwrap();
    /// let now = Instant::now();
    /// pool.snapshot().replicas()[0].state().set_load_report(LoadReport {
    ///     running: 256, waiting: 40, kv_usage: Some(0.6), observed_at: now,
    /// });
    /// let m = Measurements::from_snapshot(&pool.snapshot(), 256, now, Duration::from_secs(5));
    /// assert_eq!(m.tensor_parallel, 2);
    /// assert_eq!(m.replicas[0].batch_occupancy, 1.0);
    /// assert_eq!(m.replicas[0].waiting, 40.0);
    /// ```
    pub fn from_snapshot<B>(
        snapshot: &PoolSnapshot<B>,
        max_num_seqs: u32,
        now: Instant,
        max_age: Duration,
    ) -> Measurements {
        let (tp, pp) = snapshot
            .replicas()
            .first()
            .map(|r| (r.spec().tensor_parallel, r.spec().pipeline_parallel))
            .unwrap_or((1, 1));
        let mut m = Measurements::new(tp, pp, max_num_seqs);
        m.replicas = snapshot
            .replicas()
            .iter()
            .filter_map(|r| {
                let report = r.state().load_report()?;
                report.is_fresh(now, max_age).then(|| ReplicaMeasurement {
                    id: r.id().as_str().to_owned(),
                    utilization: None,
                    batch_occupancy: clamp_unit(report.running as f64 / f64::from(m.max_num_seqs)),
                    waiting: report.waiting as f64,
                    kv_usage: clamp_unit(report.kv_usage.unwrap_or(0.0)),
                })
            })
            .collect();
        m
    }

    /// The current shape: the measured replicas, each `TP x PP`.
    pub fn shape(&self) -> Shape {
        Shape::new(
            u32::try_from(self.replicas.len()).unwrap_or(u32::MAX),
            self.tensor_parallel,
            self.pipeline_parallel,
        )
    }
}

/// `x` clamped into `0.0..=1.0` (NaN reads 0).
pub(crate) fn clamp_unit(x: f64) -> f64 {
    if x.is_nan() {
        0.0
    } else {
        x.clamp(0.0, 1.0)
    }
}
