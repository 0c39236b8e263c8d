//! The OpenAI-compatible gateway: replica-router's stack in front of vLLM / SGLang / mock replicas.
//!
//! ```text
//! cargo run --release --example mock_replica -- --ports 8001,8002 --time-scale 10 &
//! cargo run --release --example gateway -- --listen 127.0.0.1:8080 \
//!     --replica http://127.0.0.1:8001 --replica http://127.0.0.1:8002,weight=2 --policy affinity
//! curl -N localhost:8080/v1/chat/completions -H 'x-session-id: conv-1' \
//!     -d '{"model":"mock-llama-3-70b","messages":[{"role":"user","content":"hi"}],"stream":true}'
//! ```
//!
//! Flags: `--listen ADDR` · `--replica URL[,weight=W]` (repeatable) · `--affinity-header NAME`
//! (default `x-session-id`) · `--user-header NAME` · `--tenant-header NAME` (default `x-tenant-id`) ·
//! `--slo-wait-ms N` · `--tenant-rate N/SECS` · `--tenant-tokens N/SECS` ·
//! `--counter-store memory|redis://HOST:PORT` · `--policy affinity|least-loaded|round-robin` ·
//! `--max-body-bytes N` · `--upstream-idle N` · `--threads N` (serving shards, each a single-threaded runtime;
//! 0 = one per core). `GET /metrics` serves Prometheus text. SIGINT / SIGTERM stop it gracefully: it stops
//! accepting, and lets requests in progress (streams included) finish; a second signal exits at once.

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    replica_router_gateway::cli::main_with_args(std::env::args().skip(1))
}
