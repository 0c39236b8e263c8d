//! Runs N mock LLM engine replicas over HTTP (vLLM-compatible routes), until Ctrl-C or SIGTERM.
//!
//! ```text
//! cargo run --release --example mock_replica -- --ports 8001,8002 --tp 2 --time-scale 10
//! cargo run --release --example mock_replica -- --listen 127.0.0.1:8001 --listen 127.0.0.1:8002
//! ```
//!
//! Flags (speed defaults resemble a 70B model on two H100s; see `MockConfig`):
//! `--listen ADDR` (repeatable) · `--ports P[,P..|A-B]` (on `--host`, default 127.0.0.1) · `--model NAME` ·
//! `--tp N` · `--max-num-seqs N` · `--max-num-batched-tokens N` · `--max-model-len N` ·
//! `--prefill-tok-s X` · `--decode-ms-b1 X` · `--decode-ms-b256 X` · `--kv-capacity-tokens N` ·
//! `--block-size N` · `--default-output-tokens N` · `--time-scale X` (divides every duration).

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use replica_router_mock::{MockConfig, MockEngine, MockServer};

const USAGE: &str = "usage: mock_replica (--listen ADDR)... | --ports P[,P|A-B] [--host IP]
  [--model NAME] [--tp N] [--max-num-seqs N] [--max-num-batched-tokens N] [--max-model-len N]
  [--prefill-tok-s X] [--decode-ms-b1 X] [--decode-ms-b256 X] [--kv-capacity-tokens N]
  [--block-size N] [--default-output-tokens N] [--time-scale X]";

fn parse_args(args: &[String]) -> Result<(Vec<SocketAddr>, MockConfig), String> {
    let mut cfg = MockConfig::default();
    let mut addrs = Vec::new();
    let mut ports: Vec<u16> = Vec::new();
    let mut host = "127.0.0.1".to_owned();
    let mut it = args.iter();
    fn num<T: std::str::FromStr>(flag: &str, v: Option<&String>) -> Result<T, String> {
        let v = v.ok_or_else(|| format!("{flag} needs a value"))?;
        v.parse().map_err(|_| format!("{flag}: cannot parse {v:?}"))
    }
    fn ms(flag: &str, v: Option<&String>) -> Result<Duration, String> {
        let x: f64 = num(flag, v)?;
        if !x.is_finite() || x < 0.0 {
            return Err(format!("{flag} must be a non-negative number"));
        }
        Ok(Duration::from_secs_f64(x / 1000.0))
    }
    while let Some(a) = it.next() {
        match a.as_str() {
            "-h" | "--help" => return Err(USAGE.to_owned()),
            "--listen" => addrs.push(num("--listen", it.next())?),
            "--host" => host = it.next().ok_or("--host needs a value")?.clone(),
            "--ports" => {
                let v = it.next().ok_or("--ports needs a value")?;
                for part in v.split(',').filter(|p| !p.is_empty()) {
                    if let Some((a, b)) = part.split_once('-') {
                        let (a, b): (u16, u16) = (
                            num("--ports", Some(&a.to_owned()))?,
                            num("--ports", Some(&b.to_owned()))?,
                        );
                        if a > b || b - a > 1024 {
                            return Err(format!("--ports: bad range {part}"));
                        }
                        ports.extend(a..=b);
                    } else {
                        ports.push(num("--ports", Some(&part.to_owned()))?);
                    }
                }
            }
            "--model" => cfg.model = it.next().ok_or("--model needs a value")?.clone(),
            "--tp" => cfg.tp = num("--tp", it.next())?,
            "--max-num-seqs" => cfg.max_num_seqs = num("--max-num-seqs", it.next())?,
            "--max-num-batched-tokens" => {
                cfg.max_num_batched_tokens = num("--max-num-batched-tokens", it.next())?
            }
            "--max-model-len" => cfg.max_model_len = num("--max-model-len", it.next())?,
            "--prefill-tok-s" => cfg.prefill_tokens_per_sec = num("--prefill-tok-s", it.next())?,
            "--decode-ms-b1" => cfg.decode_step_batch1 = ms("--decode-ms-b1", it.next())?,
            "--decode-ms-b256" => cfg.decode_step_batch256 = ms("--decode-ms-b256", it.next())?,
            "--kv-capacity-tokens" => {
                cfg.kv_capacity_tokens = Some(num("--kv-capacity-tokens", it.next())?)
            }
            "--block-size" => cfg.block_size = num("--block-size", it.next())?,
            "--default-output-tokens" => {
                cfg.default_output_tokens = num("--default-output-tokens", it.next())?
            }
            "--time-scale" => {
                let x: f64 = num("--time-scale", it.next())?;
                if !x.is_finite() || x <= 0.0 {
                    return Err("--time-scale must be a positive number".into());
                }
                cfg.time_scale = x;
            }
            other => return Err(format!("unknown argument {other:?}\n{USAGE}")),
        }
    }
    for p in ports {
        addrs.push(
            format!("{host}:{p}")
                .parse()
                .map_err(|_| format!("bad --host {host:?}"))?,
        );
    }
    if addrs.is_empty() {
        return Err(format!("give at least one --listen or --ports\n{USAGE}"));
    }
    Ok((addrs, cfg))
}

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

#[tokio::main]
async fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (addrs, cfg) = match parse_args(&args) {
        Ok(x) => x,
        Err(msg) => {
            eprintln!("{msg}");
            return ExitCode::from(2);
        }
    };
    let mut servers = Vec::new();
    for addr in addrs {
        let engine = MockEngine::new(cfg.clone());
        match MockServer::bind(addr, engine).await {
            Ok(s) => {
                println!(
                    "mock replica {} on http://{} (tp={}, max_num_seqs={}, kv={} tokens, time-scale={})",
                    cfg.model,
                    s.local_addr(),
                    cfg.tp(),
                    cfg.max_num_seqs,
                    s.engine().kv_capacity(),
                    cfg.time_scale
                );
                servers.push(s);
            }
            Err(e) => {
                eprintln!("cannot listen on {addr}: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    shutdown_signal().await;
    eprintln!("shutting down: letting requests in progress finish (a second signal exits at once)");
    let all = futures_util::future::join_all(servers.into_iter().map(MockServer::shutdown));
    tokio::select! {
        _ = all => {}
        _ = shutdown_signal() => {}
    }
    ExitCode::SUCCESS
}
