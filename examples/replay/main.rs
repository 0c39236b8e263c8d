//! Replays a multi-turn JSONL trace (Mooncake format, optionally with `session` / `turn`) through a
//! router or a replica over HTTP, open-loop by timestamp, and reports TTFT, end-to-end latency,
//! errors, throughput and the replicas' prefix-cache hit rate.
//!
//! ```text
//! cargo run --release --example replay -- --url http://127.0.0.1:8080 \
//!     --trace tests/fixtures/replay_trace.jsonl --speed 2 \
//!     --replica-metrics http://127.0.0.1:8001 --replica-metrics http://127.0.0.1:8002 --out run.json
//! ```
//!
//! Trace lines: `{"timestamp": ms, "session": "id"?, "turn": n?, "input_length": N,
//! "output_length": N, "block_tokens": B?, "hash_ids": [u64...]}`. Each hash id becomes a fixed block
//! of B four-letter words (one token each for the mock's tokenizer), so equal hash-id prefixes give
//! equal text prefixes and prefix caches (the engine's, a router's) see the sharing the trace
//! describes. Each request is a streamed `POST /v1/chat/completions` (`max_tokens` =
//! `output_length`, `ignore_eos`, `stream_options.include_usage`), the session id in a header.
//!
//! Flags: `--url BASE` (required; repeat it for several routers in front of the same replicas:
//! requests go to each in turn, whatever their session, as an L4 balancer sends them) · `--trace FILE` (required) · `--model NAME` (default
//! `mock-llama-3-70b`) · `--session-header NAME` (default `x-session-id`) · `--no-session` (send no
//! session header) · `--session-from-prefix K` (session = digest of the first K hash ids, for traces
//! without sessions) · `--speed X` (default 1: trace time / X) · `--max-requests N` ·
//! `--duration SECS` (send nothing due later) · `--concurrency N` (default 256) · `--timeout SECS`
//! (per request, default 120) · `--replica-metrics URL` (repeatable; base URL or full `/metrics`
//! URL; read before and after) · `--out FILE` (JSON report) · `--label NAME` (put in the JSON) ·
//! `--quiet` (no summary on stdout).
//!
//! Exit status: 0 when the replay ran (request failures are counted, not fatal), 1 when it could not
//! run (trace unreadable, metrics unreachable), 2 for bad flags.

#[path = "replay.rs"]
mod replay;

use std::process::ExitCode;
use std::time::Duration;

use http::HeaderName;
use replay::{ReplayConfig, SessionSource};

const USAGE: &str = "usage: replay --url BASE [--url BASE...] --trace FILE [--model NAME] [--session-header NAME]
  [--no-session | --session-from-prefix K] [--speed X] [--max-requests N] [--duration SECS]
  [--concurrency N] [--timeout SECS] [--replica-metrics URL]... [--out FILE] [--label NAME] [--quiet]";

struct Args {
    cfg: ReplayConfig,
    trace: String,
    out: Option<String>,
    label: Option<String>,
    quiet: bool,
}

fn secs(flag: &str, v: &str) -> Result<Duration, String> {
    let x: f64 = v
        .parse()
        .map_err(|_| format!("{flag}: cannot parse {v:?}"))?;
    if !x.is_finite() || x <= 0.0 || x > 1e9 {
        return Err(format!("{flag} must be a positive number of seconds"));
    }
    Ok(Duration::from_secs_f64(x))
}

fn parse_args(args: &[String]) -> Result<Args, String> {
    let mut cfg = ReplayConfig::new(String::new());
    let (mut url, mut trace, mut out, mut label, mut quiet) = (None, None, None, None, false);
    let (mut no_session, mut from_prefix) = (false, None);
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = || {
            it.next()
                .cloned()
                .ok_or_else(|| format!("{a} needs a value\n{USAGE}"))
        };
        fn num<T: std::str::FromStr>(flag: &str, v: String) -> Result<T, String> {
            v.parse().map_err(|_| format!("{flag}: cannot parse {v:?}"))
        }
        match a.as_str() {
            "-h" | "--help" => return Err(USAGE.to_owned()),
            "--url" if url.is_none() => url = Some(value()?),
            "--url" => cfg.extra_urls.push(value()?),
            "--trace" => trace = Some(value()?),
            "--model" => cfg.model = value()?,
            "--session-header" => {
                let v = value()?;
                cfg.session_header = HeaderName::try_from(v.as_str())
                    .map_err(|_| format!("--session-header: {v:?} is not a header name"))?;
            }
            "--no-session" => no_session = true,
            "--session-from-prefix" => {
                let k: usize = num(a, value()?)?;
                if k == 0 {
                    return Err("--session-from-prefix must be at least 1".into());
                }
                from_prefix = Some(k);
            }
            "--speed" => {
                let x: f64 = num(a, value()?)?;
                if !x.is_finite() || x <= 0.0 {
                    return Err("--speed must be a positive number".into());
                }
                cfg.speed = x;
            }
            "--max-requests" => cfg.max_requests = Some(num(a, value()?)?),
            "--duration" => cfg.duration = Some(secs(a, &value()?)?),
            "--concurrency" => {
                cfg.concurrency = num(a, value()?)?;
                if cfg.concurrency == 0 {
                    return Err("--concurrency must be at least 1".into());
                }
            }
            "--timeout" => cfg.timeout = secs(a, &value()?)?,
            "--replica-metrics" => cfg.replica_metrics.push(value()?),
            "--out" => out = Some(value()?),
            "--label" => label = Some(value()?),
            "--quiet" => quiet = true,
            other => return Err(format!("unknown argument {other:?}\n{USAGE}")),
        }
    }
    cfg.sessions = match (no_session, from_prefix) {
        (true, Some(_)) => {
            return Err("--no-session and --session-from-prefix exclude each other".into())
        }
        (true, None) => SessionSource::Omit,
        (false, Some(k)) => SessionSource::HashPrefix(k),
        (false, None) => SessionSource::Trace,
    };
    cfg.base_url = url.ok_or_else(|| format!("--url is required\n{USAGE}"))?;
    let trace = trace.ok_or_else(|| format!("--trace is required\n{USAGE}"))?;
    Ok(Args {
        cfg,
        trace,
        out,
        label,
        quiet,
    })
}

#[tokio::main]
async fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let args = match parse_args(&argv) {
        Ok(a) => a,
        Err(msg) => {
            eprintln!("{msg}");
            return ExitCode::from(2);
        }
    };
    let text = match std::fs::read_to_string(&args.trace) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("cannot read {}: {e}", args.trace);
            return ExitCode::FAILURE;
        }
    };
    let entries = match replay::parse_trace(&text) {
        Ok(e) => e,
        Err(e) => {
            eprintln!("{}: {e}", args.trace);
            return ExitCode::FAILURE;
        }
    };
    let client = replay::client();
    let report = match replay::replay(&client, &args.cfg, &entries).await {
        Ok(r) => r,
        Err(e) => {
            eprintln!("replay: {e}");
            return ExitCode::FAILURE;
        }
    };
    if !args.quiet {
        print!("{}", report.summary_text());
    }
    if let Some(path) = &args.out {
        let json = report.to_json(args.label.as_deref());
        let text = serde_json::to_string_pretty(&json).unwrap_or_default();
        if let Err(e) = std::fs::write(path, text + "\n") {
            eprintln!("cannot write {path}: {e}");
            return ExitCode::FAILURE;
        }
    }
    ExitCode::SUCCESS
}
