//! A replica set's shape (`replicas x TP x PP = GPUs`) and whether a model fits one replica.

use std::fmt;

/// `replicas x TP x PP`: how many copies of the model run, and how each one is split.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Shape {
    /// Data-parallel replicas (independent copies of the model).
    pub replicas: u32,
    /// Tensor-parallel degree inside each replica.
    pub tensor_parallel: u32,
    /// Pipeline-parallel degree inside each replica.
    pub pipeline_parallel: u32,
}

impl Shape {
    /// `replicas` copies, each `tensor_parallel x pipeline_parallel` GPUs (zeros count as 1).
    ///
    /// ```
    /// use replica_router::advisor::Shape;
    /// let s = Shape::new(2, 2, 1);
    /// assert_eq!(s.gpus(), 4);
    /// assert_eq!(s.to_string(), "2 x TP=2 x PP=1 = 4 GPUs");
    /// ```
    pub fn new(replicas: u32, tensor_parallel: u32, pipeline_parallel: u32) -> Shape {
        Shape {
            replicas: replicas.max(1),
            tensor_parallel: tensor_parallel.max(1),
            pipeline_parallel: pipeline_parallel.max(1),
        }
    }

    /// GPUs of one replica: `TP x PP`.
    pub fn gpus_per_replica(&self) -> u32 {
        self.tensor_parallel
            .max(1)
            .saturating_mul(self.pipeline_parallel.max(1))
    }

    /// GPUs of the whole set: `replicas x TP x PP`.
    pub fn gpus(&self) -> u32 {
        self.replicas.max(1).saturating_mul(self.gpus_per_replica())
    }
}

impl fmt::Display for Shape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} x TP={} x PP={} = {} GPUs",
            self.replicas,
            self.tensor_parallel,
            self.pipeline_parallel,
            self.gpus()
        )
    }
}

/// What one replica must hold in GPU memory: the weights and the KV cache of its longest
/// context.
///
/// A simple fit: the weights split evenly over the replica's GPUs, and the replica must still
/// have room for the KV cache of one sequence of [`context_tokens`](Self::context_tokens)
/// (one long conversation; a useful batch needs many times more).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryFit {
    /// Usable bytes of one GPU (its memory times the engine's utilization setting, e.g. vLLM's
    /// `gpu_memory_utilization` of 0.9).
    pub gpu_memory_bytes: u64,
    /// Bytes of the model's weights (at their quantization).
    pub weight_bytes: u64,
    /// Bytes of KV cache per token (all layers, K and V).
    pub kv_bytes_per_token: u64,
    /// The longest context (prompt plus output, in tokens) one replica must hold.
    pub context_tokens: u64,
}

impl MemoryFit {
    /// Bytes one replica needs: the weights plus one longest context's KV cache.
    pub fn required_bytes(&self) -> u64 {
        self.weight_bytes
            .saturating_add(self.kv_bytes_per_token.saturating_mul(self.context_tokens))
    }

    /// Usable bytes of a replica of `gpus` GPUs.
    pub fn available_bytes(&self, gpus: u32) -> u64 {
        self.gpu_memory_bytes.saturating_mul(u64::from(gpus.max(1)))
    }

    /// Whether a replica of `gpus` GPUs holds the weights and one longest context.
    ///
    /// ```
    /// use replica_router::advisor::MemoryFit;
    /// // A 70B model in FP8 (70 GB) with 32k tokens of fp16 KV at 320 KiB per token.
    /// let fit = MemoryFit { gpu_memory_bytes: 72_000_000_000, weight_bytes: 70_000_000_000,
    ///                       kv_bytes_per_token: 327_680, context_tokens: 32_768 };
    /// assert!(!fit.fits(1));
    /// assert!(fit.fits(2));
    /// ```
    pub fn fits(&self, gpus: u32) -> bool {
        self.required_bytes() <= self.available_bytes(gpus)
    }

    /// KV-cache tokens left to a replica of `gpus` GPUs once the weights are loaded.
    pub fn kv_capacity_tokens(&self, gpus: u32) -> u64 {
        self.available_bytes(gpus).saturating_sub(self.weight_bytes)
            / self.kv_bytes_per_token.max(1)
    }
}
