//! The gateway's command line (what `replica-router-gateway` and `examples/gateway.rs` run).

use std::process::ExitCode;
use std::sync::Arc;

use metrics_exporter_prometheus::PrometheusBuilder;

use crate::{Gateway, GatewayConfig, MetricsRender};

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

/// Runs the gateway command line: parses `args` (the flags, without the program name), serves
/// until SIGINT or SIGTERM, then shuts down gracefully. The exit code is 0 after a clean stop (or
/// `--help`), 2 for bad flags, 1 when the gateway cannot start.
///
/// The binary `replica-router-gateway` and the repository's `examples/gateway.rs` are this call.
pub fn main_with_args<I, S>(args: I) -> ExitCode
where
    I: IntoIterator<Item = S>,
    S: AsRef<str>,
{
    let cfg = match GatewayConfig::from_args(args) {
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
        eprintln!("give at least one --replica URL\n{}", crate::USAGE);
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
