//! Mock LLM engine replicas, in-process and over HTTP (feature `mock`).
//!
//! A [`MockEngine`] models what routing depends on in a vLLM-like engine, in tokio time (so a paused
//! clock runs it exactly, in virtual time):
//!
//! - **continuous batching**: at most `max_num_seqs` sequences run at once; the rest wait in a FIFO
//!   queue (also while the KV cache is full);
//! - **prefill cost proportional to the uncached prompt**: a request's prompt is cut into 16-token blocks
//!   hashed by chain ([`block_hashes`]); the leading blocks found in the replica's own prefix cache are
//!   skipped, so a returning multi-turn session is fast only on the replica that served its earlier
//!   turns, and pays a full prefill replay anywhere else;
//! - a **prefix KV cache** with a token capacity and least-recently-used eviction;
//! - **decode steps that slow down as the batch grows** (memory-bound at small batches), and chunked
//!   prefill sharing each step's token budget with the decodes;
//! - **tensor parallelism** that speeds compute sub-linearly and adds KV room.
//!
//! [`MockConfig`] documents the defaults (a 70B model with FP8 weights on two H100s).
//!
//! [`MockServer`] serves an engine over HTTP like vLLM's OpenAI server: `POST /v1/chat/completions` and
//! `/v1/completions` (streamed as SSE ending with `data: [DONE]`, or one JSON body with `usage`),
//! `GET /health`, `/v1/models`, `/server_info` and `/model_info` (which sglang-router and vllm-router
//! probe), and `GET /metrics` with vLLM's metric names (`vllm:num_requests_running`,
//! `vllm:num_requests_waiting`, `vllm:kv_cache_usage_perc`, `vllm:prefix_cache_queries_total`,
//! `vllm:prefix_cache_hits_total`, labelled by `model_name`). Chat messages become tokens through a
//! deterministic stand-in tokenizer ([`tokenize`], [`chat_tokens`]), so the same conversation prefix gives
//! the same blocks on every replica. Malformed requests get an OpenAI-style error body with status 400
//! (413 when over [`MAX_BODY_BYTES`], 404 for another model's name).
//!
//! In-process, a `Pool<MockEngine>` is a cluster the crate's layers route over directly:
//! [`MockRequest`] carries extensions (the route context and decision), [`MockEngine`] is a
//! [`Backend`](replica_router::backend::Backend) that reports its load as vLLM does, and a routed response
//! ([`RoutedResponse`]) stays in flight on its replica until its last token. Under a paused tokio
//! clock such a simulation is exact and fast (`tests/mock_routing.rs` compares session affinity
//! with round-robin this way).
//!
//! `examples/mock_replica.rs` runs several replicas from the command line.

mod cache;
mod config;
mod engine;
mod error;
mod http;
mod route;
mod tokenize;

pub mod sim;

pub use cache::block_hashes;
pub use config::MockConfig;
pub use engine::{
    FinishReason, MockEngine, MockEvent, MockPrompt, MockRequest, MockResponse, MockStats,
    MockUsage, ResponseFuture,
};
pub use error::MockError;
pub use http::{MockServer, MAX_BODY_BYTES};
pub use route::RoutedResponse;
pub use tokenize::{chat_tokens, tokenize, tokenize_into};
