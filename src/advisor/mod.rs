//! Capacity advice: *what* to change when a pool falls behind (the autoscale signal says
//! *when*).
//!
//! The guide's "DP vs deeper model parallelism" table and its technique decision table, as
//! code. From what the router measures ([`Measurements`]: per replica the GPU utilization,
//! batch occupancy against `max_num_seqs`, engine queue and KV usage; pool-wide the p95 queue
//! wait against the SLO, a lone request's latency at low concurrency against its target, and
//! the model's memory needs against one replica's GPUs), [`advise`] gives an [`Advice`]: a
//! [`Verdict`], the [`Rule`] that fired, the numbers behind it ([`Evidence`]) and the proposed
//! [`Shape`], `replicas x TP x PP = GPUs`.
//!
//! The rules, tried in this order (the first that fires wins):
//!
//! | # | rule | condition | verdict | proposed shape |
//! |---|---|---|---|---|
//! | 1a | [`Rule::ModelDoesNotFit`] | weights + one longest context's KV > the replica's usable GPU memory | [`Verdict::MemoryBound`] | the smallest TP (powers of two up to `max_tensor_parallel`), then PP, that fits; same replica count |
//! | 1b | [`Rule::KvFullSmallBatch`] | requests queue, a KV cache is full (`>= kv_full`) and the batches nearly empty (`< small_batch`) | [`Verdict::MemoryBound`] | TP doubled |
//! | 2 | [`Rule::LoneRequestTooSlow`] | low-concurrency latency > its target | [`Verdict::ShardBound`] | the smallest TP expected to meet the target (`latency x TP^-tp_scaling`) |
//! | 3 | [`Rule::QueueingWhileIdle`] | requests queue (p95 wait > SLO, or full batches with a queue) and mean utilization `< low_utilization` | [`Verdict::UnderUtilized`] | unchanged |
//! | 4 | [`Rule::SaturatedByConcurrency`] | requests queue and the GPUs are busy | [`Verdict::ReplicaBound`] | more replicas: at least one, enough for the demand at `target_occupancy` |
//! | 5 | [`Rule::NoPressure`] | otherwise | [`Verdict::Healthy`] | unchanged |
//!
//! Why this order: memory first, because a model that does not fit one replica cannot be
//! scaled by copying it ("DP for memory relief" is one of the guide's pitfalls: replicas
//! duplicate the weights). Latency next: if a lone request misses its SLO at low concurrency,
//! more replicas leave it exactly as slow (DP does not reduce single-request latency), so TP,
//! quantization or a smaller tier come first. Only then does queueing count: with idle GPUs it
//! means the engine is not batching (the guide's pitfall "adding replicas when GPU utilization
//! is low"), with busy ones the pool is replica-bound, the Harbor case, where another TP=2
//! replica nearly doubled throughput and widening to TP=4 would not have.
//!
//! ```
//! use replica_router::advisor::{advise, AdvisorConfig, Measurements, MemoryFit, Verdict};
//!
//! // A 405B model in FP8 on TP=2 H100s: it does not fit, so TP (then PP) comes first.
//! let mut m = Measurements::new(2, 1, 256);
//! m.memory = Some(MemoryFit { gpu_memory_bytes: 72_000_000_000, weight_bytes: 405_000_000_000,
//!                             kv_bytes_per_token: 516_096, context_tokens: 32_768 });
//! let advice = advise(&m, &AdvisorConfig::default());
//! assert_eq!(advice.verdict, Verdict::MemoryBound);
//! assert_eq!(advice.proposed.tensor_parallel, 8);
//! println!("{advice}");
//! ```

mod measure;
mod report;
mod rules;
mod shape;

pub use self::measure::{Measurements, ReplicaMeasurement};
pub use self::report::{Advice, Evidence, Rule, Verdict};
pub use self::rules::{advise, AdvisorConfig};
pub use self::shape::{MemoryFit, Shape};
