//! Speed and capacity parameters of a mock replica.

use std::time::Duration;

/// Parameters of a [`MockEngine`](super::MockEngine): the model it pretends to serve, its batch limits,
/// its KV cache and its speed.
///
/// The defaults resemble a Llama-3-70B-class model with FP8 weights served by vLLM on two H100-80GB
/// (`tp = 2`):
///
/// | parameter | default (TP=2) | where it comes from |
/// |---|---|---|
/// | prefill throughput | 10 000 tokens/s | a long prompt of 8k tokens takes ~0.8 s to first token |
/// | decode step | 25 ms at batch 1, 60 ms at batch 256, linear between (and beyond) | ~40 tok/s for a lone user, ~4 300 tok/s aggregate at full batch |
/// | `max_num_seqs` | 256 | vLLM's default |
/// | `max_num_batched_tokens` | 8192 | chunked-prefill token budget per engine step |
/// | KV capacity | `tp * 80 GB * 0.9 - 70 GB` of weights, at 320 KiB per token (80 layers, 8 KV heads, dim 128, fp16 KV): ~240k tokens at TP=2, ~700k at TP=4 | |
/// | prefix-cache block | 16 tokens | vLLM's block size |
///
/// Tensor parallelism speeds compute by `(tp / 2) ^ tp_efficiency` relative to the TP=2 reference
/// (`tp_efficiency` defaults to 0.85: all-reduce costs keep the scaling sub-linear).
/// `time_scale` divides every duration (a value of 10 makes the replica ten times faster, for demos).
#[derive(Debug, Clone, PartialEq)]
pub struct MockConfig {
    /// The model name the replica serves (`/v1/models`, the `model_name` metric label).
    pub model: String,
    /// Tensor-parallel degree of the replica (GPUs per replica); 0 is treated as 1.
    pub tp: u32,
    /// Most sequences in the running batch; requests beyond it wait in a FIFO queue.
    pub max_num_seqs: usize,
    /// Token budget of one engine step (decode tokens plus prefill chunk tokens).
    pub max_num_batched_tokens: u32,
    /// Longest accepted prompt plus output, in tokens.
    pub max_model_len: u32,
    /// Prefill throughput at the TP=2 reference, in tokens per second.
    pub prefill_tokens_per_sec: f64,
    /// Decode step time at batch size 1 (TP=2 reference).
    pub decode_step_batch1: Duration,
    /// Decode step time at batch size 256 (TP=2 reference); the step time is linear in the batch size.
    pub decode_step_batch256: Duration,
    /// Exponent of the TP speed-up, `(tp / 2) ^ tp_efficiency`.
    pub tp_efficiency: f64,
    /// KV cache capacity in tokens; `None` derives it from `tp` (see the table above).
    pub kv_capacity_tokens: Option<u64>,
    /// Extra prefix-cache room per GPU in tokens, beyond the KV cache: a host-memory tier
    /// (CPU offload, LMCache, SGLang HiCache) that keeps evicted prefix blocks. Hits there cost
    /// nothing here (their transfer time is not modelled). 0 (the default): the prefix cache is
    /// the KV cache's size, as with HBM only.
    pub host_cache_tokens_per_gpu: u64,
    /// Tokens per prefix-cache block.
    pub block_size: u32,
    /// Output length when a request gives no `max_tokens`.
    pub default_output_tokens: u32,
    /// Divides every duration; 1.0 is real speed.
    pub time_scale: f64,
    /// Bytes of the model's weights (default: a 70B model in FP8, 70 GB), for the derived KV
    /// capacity.
    pub weight_bytes: f64,
    /// Bytes of KV cache per token (default: 320 KiB, a Llama-3-70B-class model in fp16; half
    /// that with an FP8 KV cache).
    pub kv_bytes_per_token: f64,
    /// Usable bytes of one GPU (default: an H100-80GB at vLLM's `gpu_memory_utilization` of
    /// 0.9, 72 GB).
    pub gpu_memory_bytes: f64,
}

impl Default for MockConfig {
    fn default() -> Self {
        MockConfig {
            model: "mock-llama-3-70b".to_owned(),
            tp: 2,
            max_num_seqs: 256,
            max_num_batched_tokens: 8192,
            max_model_len: 131_072,
            prefill_tokens_per_sec: 10_000.0,
            decode_step_batch1: Duration::from_millis(25),
            decode_step_batch256: Duration::from_millis(60),
            tp_efficiency: 0.85,
            kv_capacity_tokens: None,
            host_cache_tokens_per_gpu: 0,
            block_size: 16,
            default_output_tokens: 128,
            time_scale: 1.0,
            weight_bytes: WEIGHT_BYTES,
            kv_bytes_per_token: KV_BYTES_PER_TOKEN,
            gpu_memory_bytes: GPU_BYTES,
        }
    }
}

/// Bytes of KV cache per token of a Llama-3-70B-class model (80 layers, 8 KV heads, head dim 128, fp16).
const KV_BYTES_PER_TOKEN: f64 = 2.0 * 80.0 * 8.0 * 128.0 * 2.0;
/// Bytes of FP8 weights of a 70B model.
const WEIGHT_BYTES: f64 = 70e9;
/// Usable bytes of one H100-80GB (vLLM's default `gpu_memory_utilization` of 0.9).
const GPU_BYTES: f64 = 80e9 * 0.9;

impl MockConfig {
    /// The effective tensor-parallel degree (at least 1).
    pub fn tp(&self) -> u32 {
        self.tp.max(1)
    }

    /// Compute speed-up relative to the TP=2 reference.
    pub fn tp_speedup(&self) -> f64 {
        let s = (f64::from(self.tp()) / 2.0).powf(self.tp_efficiency);
        if s.is_finite() && s > 0.0 {
            s
        } else {
            1.0
        }
    }

    /// KV cache capacity in tokens (configured, or derived from `tp`).
    pub fn kv_capacity(&self) -> u64 {
        if let Some(c) = self.kv_capacity_tokens {
            return c.max(u64::from(self.block_size()));
        }
        let free = f64::from(self.tp()) * self.gpu_memory_bytes - self.weight_bytes;
        let per_token = if self.kv_bytes_per_token.is_finite() && self.kv_bytes_per_token > 0.0 {
            self.kv_bytes_per_token
        } else {
            KV_BYTES_PER_TOKEN
        };
        // A replica too small for the weights still gets 64 blocks of room, so it can run.
        let tokens = free / per_token;
        let tokens = if tokens.is_finite() { tokens } else { 0.0 };
        tokens.max(f64::from(self.block_size()) * 64.0) as u64
    }

    /// Prefix-cache capacity in tokens: the KV capacity plus `tp` times the host tier.
    pub fn prefix_cache_capacity(&self) -> u64 {
        self.kv_capacity()
            .saturating_add(u64::from(self.tp()).saturating_mul(self.host_cache_tokens_per_gpu))
    }

    /// Tokens per prefix-cache block (at least 1).
    pub fn block_size(&self) -> u32 {
        self.block_size.max(1)
    }

    fn scale(&self) -> f64 {
        if self.time_scale.is_finite() && self.time_scale > 0.0 {
            self.time_scale
        } else {
            1.0
        }
    }

    /// Time to prefill `tokens` uncached prompt tokens.
    pub fn prefill_time(&self, tokens: u64) -> Duration {
        let rate = if self.prefill_tokens_per_sec.is_finite() && self.prefill_tokens_per_sec > 0.0 {
            self.prefill_tokens_per_sec
        } else {
            10_000.0
        };
        secs(tokens as f64 / (rate * self.tp_speedup() * self.scale()))
    }

    /// Time of one engine step over a batch of `batch` sequences (its fixed, decode part).
    pub fn decode_step(&self, batch: usize) -> Duration {
        let b1 = self.decode_step_batch1.as_secs_f64();
        let b256 = self.decode_step_batch256.as_secs_f64();
        let per_seq = (b256 - b1).max(0.0) / 255.0;
        let t = b1 + per_seq * (batch.max(1) - 1) as f64;
        secs(t / (self.tp_speedup() * self.scale()))
    }
}

fn secs(s: f64) -> Duration {
    if s.is_finite() && s > 0.0 {
        Duration::from_secs_f64(s.min(1e9))
    } else {
        Duration::ZERO
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_resemble_70b_on_h100() {
        let c = MockConfig::default();
        assert_eq!(c.decode_step(1), Duration::from_millis(25));
        assert_eq!(c.decode_step(256), Duration::from_millis(60));
        assert_eq!(c.prefill_time(10_000), Duration::from_secs(1));
        let kv = c.kv_capacity();
        assert!((200_000..300_000).contains(&kv), "{kv}");
        let tp4 = MockConfig {
            tp: 4,
            ..MockConfig::default()
        };
        assert!(tp4.decode_step(1) < c.decode_step(1));
        assert!(tp4.kv_capacity() > 2 * kv);
    }

    #[test]
    fn odd_parameters_do_not_panic() {
        let c = MockConfig {
            tp: 0,
            prefill_tokens_per_sec: f64::NAN,
            time_scale: -1.0,
            tp_efficiency: f64::INFINITY,
            block_size: 0,
            ..MockConfig::default()
        };
        let _ = c.prefill_time(u64::MAX);
        let _ = c.decode_step(usize::MAX);
        assert!(c.kv_capacity() > 0);
    }
}
