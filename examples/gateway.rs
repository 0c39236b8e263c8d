//! The OpenAI-compatible gateway: replica-router's stack in front of vLLM / SGLang / mock replicas.
//!
//! ```text
//! cargo run --release --features mock --example mock_replica -- --ports 8001,8002 --time-scale 10 &
//! cargo run --release --features gateway --example gateway -- --listen 127.0.0.1:8080 \
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

use std::process::ExitCode;
use std::sync::Arc;

use metrics_exporter_prometheus::PrometheusBuilder;

// A request allocates a few small objects (headers, extensions, futures); mimalloc's thread-local
// free lists serve them faster than glibc's malloc.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
use replica_router::gateway::{Gateway, GatewayConfig, MetricsRender};

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

async fn run(cfg: GatewayConfig, shards: usize) -> ExitCode {
    let render: Option<MetricsRender> = match PrometheusBuilder::new().install_recorder() {
        Ok(handle) => Some(Arc::new(move || handle.render())),
        Err(e) => {
            eprintln!("metrics recorder not installed: {e}");
            None
        }
    };
    let gateway = match Gateway::bind_sharded(cfg.clone(), shards, render).await {
        Ok(g) => g,
        Err(e) => {
            eprintln!("gateway: {e}");
            return ExitCode::FAILURE;
        }
    };
    println!(
        "gateway on http://{} -> {} replica(s), policy {}, {} shard(s)",
        gateway.local_addr(),
        cfg.replicas.len(),
        cfg.policy.as_str(),
        shards
    );
    shutdown_signal().await;
    eprintln!("shutting down: letting requests in progress finish (a second signal exits at once)");
    tokio::select! {
        _ = gateway.shutdown() => {}
        _ = shutdown_signal() => {}
    }
    ExitCode::SUCCESS
}

fn main() -> ExitCode {
    let cfg = match GatewayConfig::from_args(std::env::args().skip(1)) {
        Ok(c) => c,
        Err(e) if e.is_help() => {
            println!("{e}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    if cfg.replicas.is_empty() {
        eprintln!(
            "give at least one --replica URL\n{}",
            replica_router::gateway::USAGE
        );
        return ExitCode::from(2);
    }
    let threads = match cfg.threads {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    };
    // The main runtime only accepts connections and waits for signals; each shard thread serves
    // its connections start to end on its own single-threaded runtime.
    match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt.block_on(run(cfg, threads)),
        Err(e) => {
            eprintln!("cannot start the runtime: {e}");
            ExitCode::FAILURE
        }
    }
}
