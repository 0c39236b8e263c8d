//! The advice: a verdict, the rule that gave it, the numbers behind it and the proposed shape,
//! rendered as text ([`Display`](std::fmt::Display)) or JSON ([`Advice::to_json`]).

use std::fmt;
use std::fmt::Write as _;
use std::time::Duration;

use crate::advisor::shape::Shape;

/// What bounds the pool, and so which lever helps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Verdict {
    /// The model or its longest context does not fit one replica: raise TP (then PP) until it
    /// does; replicas duplicate the weights, so more DP gives no memory relief.
    MemoryBound,
    /// A lone request misses its latency target at low concurrency (shard- or latency-bound):
    /// widen TP, quantize, or choose a smaller model tier; more DP replicas will not help.
    ShardBound,
    /// Requests queue while the GPUs sit mostly idle: fix batching (`max_num_seqs`, chunked
    /// prefill) or admission before adding replicas.
    UnderUtilized,
    /// The replicas are busy and full and requests queue past the SLO: add a data-parallel
    /// replica (the model fits and a lone request is fast enough).
    ReplicaBound,
    /// No rule fired: the pool keeps up.
    Healthy,
}

impl Verdict {
    /// A short kebab-case name (`replica-bound`), as in the JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::MemoryBound => "memory-bound",
            Verdict::ShardBound => "shard-bound",
            Verdict::UnderUtilized => "under-utilized",
            Verdict::ReplicaBound => "replica-bound",
            Verdict::Healthy => "healthy",
        }
    }

    /// The lever, in one sentence.
    pub fn action(self) -> &'static str {
        match self {
            Verdict::MemoryBound => {
                "the model or its context does not fit one replica: raise TP, then PP, until it fits; then scale with DP"
            }
            Verdict::ShardBound => {
                "a lone request is too slow: widen TP, quantize, or choose a smaller tier; more DP replicas will not help"
            }
            Verdict::UnderUtilized => {
                "requests queue while the GPUs idle: fix batching (max_num_seqs, chunked prefill) or admission before adding replicas"
            }
            Verdict::ReplicaBound => {
                "replicas are saturated by concurrency: add data-parallel replicas before widening TP"
            }
            Verdict::Healthy => "the pool keeps up: no change",
        }
    }
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Which rule gave the verdict, in the order they are tried (see the [module docs](super)).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Rule {
    /// 1a. The weights plus one longest context exceed the replica's usable GPU memory.
    ModelDoesNotFit,
    /// 1b. The KV cache is full while the batch is nearly empty: a few long contexts fill it.
    KvFullSmallBatch,
    /// 2. The low-concurrency latency is over its target.
    LoneRequestTooSlow,
    /// 3. Queue pressure (wait over the SLO, or full batches) with low GPU utilization.
    QueueingWhileIdle,
    /// 4. Queue pressure with busy GPUs.
    SaturatedByConcurrency,
    /// 5. None of the above.
    NoPressure,
}

impl Rule {
    /// A short kebab-case name, as in the JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            Rule::ModelDoesNotFit => "model-does-not-fit",
            Rule::KvFullSmallBatch => "kv-full-small-batch",
            Rule::LoneRequestTooSlow => "lone-request-too-slow",
            Rule::QueueingWhileIdle => "queueing-while-idle",
            Rule::SaturatedByConcurrency => "saturated-by-concurrency",
            Rule::NoPressure => "no-pressure",
        }
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The numbers the rules read, pool-wide.
#[derive(Debug, Clone, PartialEq)]
pub struct Evidence {
    /// Replicas measured.
    pub replicas: u32,
    /// Mean GPU utilization over the replicas (measured, or batch occupancy in its place).
    pub mean_utilization: f64,
    /// Mean batch occupancy (running / `max_num_seqs`).
    pub mean_batch_occupancy: f64,
    /// Highest batch occupancy of one replica.
    pub max_batch_occupancy: f64,
    /// Mean requests waiting inside the engines, per replica.
    pub mean_waiting: f64,
    /// Highest KV-cache usage of one replica.
    pub max_kv_usage: f64,
    /// p95 queue wait.
    pub p95_queue_wait: Duration,
    /// The queue-wait SLO.
    pub queue_wait_slo: Duration,
    /// The low-concurrency latency, if measured.
    pub low_load_latency: Option<Duration>,
    /// Its target, if any.
    pub latency_target: Option<Duration>,
    /// Bytes one replica needs (weights plus one longest context), if the memory fit is known.
    pub memory_required_bytes: Option<u64>,
    /// Usable bytes of one replica, if the memory fit is known.
    pub memory_available_bytes: Option<u64>,
}

/// The advisor's report.
#[derive(Debug, Clone, PartialEq)]
pub struct Advice {
    /// What bounds the pool.
    pub verdict: Verdict,
    /// The rule that fired.
    pub rule: Rule,
    /// The numbers behind it.
    pub evidence: Evidence,
    /// The pool's shape now.
    pub current: Shape,
    /// The shape the verdict points to (the current one when nothing should change).
    pub proposed: Shape,
}

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1e3)
}

fn gb(bytes: u64) -> String {
    format!("{:.0} GB", bytes as f64 / 1e9)
}

impl fmt::Display for Advice {
    /// Several lines: the verdict and its lever, the rule, the numbers, the shapes.
    ///
    /// ```text
    /// verdict: replica-bound (rule saturated-by-concurrency)
    ///   replicas are saturated by concurrency: add data-parallel replicas before widening TP
    ///   utilization 78% · batch 100% of max_num_seqs (max 100%) · 31 waiting/replica · KV 64% · p95 wait 5210 ms vs SLO 200 ms
    ///   shape: 1 x TP=2 x PP=1 = 2 GPUs -> 2 x TP=2 x PP=1 = 4 GPUs
    /// ```
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let e = &self.evidence;
        writeln!(f, "verdict: {} (rule {})", self.verdict, self.rule)?;
        writeln!(f, "  {}", self.verdict.action())?;
        write!(
            f,
            "  utilization {:.0}% · batch {:.0}% of max_num_seqs (max {:.0}%) · {:.0} waiting/replica · KV {:.0}% · p95 wait {} vs SLO {}",
            100.0 * e.mean_utilization,
            100.0 * e.mean_batch_occupancy,
            100.0 * e.max_batch_occupancy,
            e.mean_waiting,
            100.0 * e.max_kv_usage,
            ms(e.p95_queue_wait),
            ms(e.queue_wait_slo),
        )?;
        if let Some(l) = e.low_load_latency {
            write!(f, " · lone request {}", ms(l))?;
            if let Some(t) = e.latency_target {
                write!(f, " vs target {}", ms(t))?;
            }
        }
        if let (Some(r), Some(a)) = (e.memory_required_bytes, e.memory_available_bytes) {
            write!(f, " · memory {} needed of {} per replica", gb(r), gb(a))?;
        }
        writeln!(f)?;
        write!(f, "  shape: {} -> {}", self.current, self.proposed)
    }
}

fn json_shape(out: &mut String, s: &Shape) {
    let _ = write!(
        out,
        "{{\"replicas\":{},\"tensor_parallel\":{},\"pipeline_parallel\":{},\"gpus\":{}}}",
        s.replicas,
        s.tensor_parallel,
        s.pipeline_parallel,
        s.gpus()
    );
}

fn json_f64(x: f64) -> String {
    if x.is_finite() {
        format!("{x:.4}")
    } else {
        "null".to_owned()
    }
}

fn json_opt<T: fmt::Display>(x: Option<T>) -> String {
    x.map_or_else(|| "null".to_owned(), |v| v.to_string())
}

impl Advice {
    /// The report as one JSON object (durations in seconds, fractions in `0..=1`, bytes as
    /// integers; unknown values `null`).
    ///
    /// ```
    /// use replica_router::advisor::{advise, AdvisorConfig, Measurements};
    /// let advice = advise(&Measurements::new(2, 1, 256), &AdvisorConfig::default());
    /// let json = advice.to_json();
    /// assert!(json.starts_with("{\"verdict\":\"healthy\""));
    /// assert!(json.contains("\"proposed\":{\"replicas\":1,"));
    /// ```
    pub fn to_json(&self) -> String {
        let e = &self.evidence;
        let mut out = String::with_capacity(512);
        let _ = write!(
            out,
            "{{\"verdict\":\"{}\",\"rule\":\"{}\",\"action\":\"{}\",\"evidence\":{{",
            self.verdict,
            self.rule,
            self.verdict.action()
        );
        let _ = write!(
            out,
            "\"replicas\":{},\"mean_utilization\":{},\"mean_batch_occupancy\":{},\
             \"max_batch_occupancy\":{},\"mean_waiting\":{},\"max_kv_usage\":{},\
             \"p95_queue_wait_s\":{},\"queue_wait_slo_s\":{},\"low_load_latency_s\":{},\
             \"latency_target_s\":{},\"memory_required_bytes\":{},\"memory_available_bytes\":{}}}",
            e.replicas,
            json_f64(e.mean_utilization),
            json_f64(e.mean_batch_occupancy),
            json_f64(e.max_batch_occupancy),
            json_f64(e.mean_waiting),
            json_f64(e.max_kv_usage),
            json_f64(e.p95_queue_wait.as_secs_f64()),
            json_f64(e.queue_wait_slo.as_secs_f64()),
            json_opt(e.low_load_latency.map(|d| json_f64(d.as_secs_f64()))),
            json_opt(e.latency_target.map(|d| json_f64(d.as_secs_f64()))),
            json_opt(e.memory_required_bytes),
            json_opt(e.memory_available_bytes),
        );
        out.push_str(",\"current\":");
        json_shape(&mut out, &self.current);
        out.push_str(",\"proposed\":");
        json_shape(&mut out, &self.proposed);
        out.push('}');
        out
    }
}
