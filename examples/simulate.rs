//! Routing quality side by side, in virtual time: round-robin, least-loaded, sticky and
//! bounded-load affinity (and SGLang's cache-aware policy on the heavy workload) on the same
//! multi-turn chat workload over mock engine replicas.
//!
//! ```text
//! cargo run --release --example simulate -- \
//!     [--seed N] [--sessions N] [--replicas N] [--duration-secs S] \
//!     [--scenario homogeneous|heterogeneous|failure|all] [--jobs N] \
//!     [--heavy-fraction F] [--think-secs S] [--users N] [--block-size TOKENS] [--per-replica] \
//!     [--workload default|heavy] [--load 0.5,0.8,0.95] [--keyless] \
//!     [--write-trace FILE] [--trace-block-tokens N] [--host-cache-tokens-per-gpu N] \
//!     [--policy standard|all|NAME[,NAME...]]
//! ```
//!
//! `--workload heavy` runs the heavy-tailed workload (`HeavyConfig`) on the homogeneous and
//! heterogeneous scenarios (`all`; `failure` is not offered) at each `--load` (fractions of the
//! scenario's capacity, default `0.5,0.8,0.95`; conversations arrive over `--duration-secs`),
//! comparing round-robin, least-loaded, sticky, bounded, bounded (tokens), cache-aware
//! (SGLang) and predicted-TTFT placement (keyed and keyless); it prints one table per (scenario, load). `--keyless` sends every request without
//! session and user keys. `--write-trace FILE` writes the workload of the first scenario at the
//! first load as JSON Lines (Mooncake fields plus session, turn, block_tokens; 512-token blocks
//! unless `--trace-block-tokens`) and exits without simulating. `--host-cache-tokens-per-gpu`
//! gives each engine's prefix cache a host-memory tier (default 0; 750k on the heavy workload,
//! whose conversations come back minutes later: ~22 conversations of 10k tokens fill the KV of
//! a TP=2 replica).
//!
//! Policy names: `round-robin`, `least-loaded`, `sticky`, `bounded`, `bounded-tokens`,
//! `sticky-user`, `bounded-user`, `ttft` (predicted-TTFT placement by session), `ttft-keyless`
//! (predicted TTFT from prompt fingerprints alone); `standard` is the first seven, `all` adds
//! the TTFT ones.
//!
//! Defaults: seed 1, 4 replicas, a 1200 s arrival window with 0.2 sessions per second per
//! replica (960 sessions), all three scenarios (homogeneous; heterogeneous; the second replica
//! failing at half the window), 2 runs at a time. Prints one Markdown table per scenario (and
//! with `--per-replica` the per-replica detail). The run is deterministic by seed: the same
//! flags print the same tables, whatever `--jobs`.

use std::time::{Duration, Instant};

use replica_router_mock::sim::{
    compare, describe, pool_capacity, write_trace, HeavyConfig, Policy, PolicyReport, Scenario,
    ScenarioReport, SimOptions, Workload, WorkloadConfig,
};

/// Sessions per TP=2-equivalent replica and second of arrival window when `--sessions` is not
/// given (0.8 sessions per second for four replicas).
const SESSIONS_PER_REPLICA_SECOND: f64 = 0.2;

struct Args {
    seed: u64,
    sessions: Option<usize>,
    replicas: usize,
    duration: u64,
    scenario: String,
    jobs: usize,
    heavy_fraction: Option<f64>,
    think_secs: Option<f64>,
    users: Option<usize>,
    block_size: Option<u32>,
    per_replica: bool,
    workload: String,
    loads: Vec<f64>,
    keyless: bool,
    write_trace: Option<String>,
    trace_block_tokens: u32,
    host_cache: Option<u64>,
    policies: Vec<Policy>,
}

fn policy_by_name(name: &str) -> Vec<Policy> {
    match name {
        "standard" => Policy::STANDARD.to_vec(),
        "all" => {
            let mut v = Policy::STANDARD.to_vec();
            v.extend([Policy::TTFT, Policy::TTFT_KEYLESS, Policy::CACHE_AWARE]);
            v
        }
        "round-robin" => vec![Policy::RoundRobin],
        "least-loaded" => vec![Policy::LeastLoaded],
        "sticky" => vec![Policy::STICKY],
        "bounded" => vec![Policy::BOUNDED],
        "bounded-tokens" => vec![Policy::BOUNDED_TOKENS],
        "sticky-user" => vec![Policy::STICKY_USER],
        "bounded-user" => vec![Policy::BOUNDED_USER],
        "ttft" => vec![Policy::TTFT],
        "ttft-keyless" => vec![Policy::TTFT_KEYLESS],
        "cache-aware" => vec![Policy::CACHE_AWARE],
        "ttft-tokens" => vec![Policy::Ttft {
            keyed: true,
            measure: replica_router::balance::LoadMeasure::InFlightTokens,
        }],
        _ => usage(),
    }
}

/// Host-memory prefix-cache tier per GPU on the heavy workload unless
/// `--host-cache-tokens-per-gpu` says otherwise: ~250 GB of DRAM per GPU at 320 KiB per token
/// (2 TB for an 8-GPU node), enough to keep a conversation's KV through minutes of other
/// traffic, as offloading engines do.
const HEAVY_HOST_CACHE_TOKENS_PER_GPU: u64 = 750_000;

/// The policies compared on the heavy workload, in table order.
const HEAVY_POLICIES: [Policy; 8] = [
    Policy::RoundRobin,
    Policy::LeastLoaded,
    Policy::STICKY,
    Policy::BOUNDED,
    Policy::BOUNDED_TOKENS,
    Policy::CACHE_AWARE,
    Policy::TTFT,
    Policy::TTFT_KEYLESS,
];

fn usage() -> ! {
    eprintln!(
        "usage: simulate [--seed N] [--sessions N] [--replicas N] [--duration-secs S] \
         [--scenario homogeneous|heterogeneous|failure|all] [--jobs N] \
         [--heavy-fraction F] [--think-secs S] [--users N] [--block-size TOKENS] [--per-replica] \
         [--workload default|heavy] [--load 0.5,0.8,0.95] [--keyless] [--write-trace FILE] \
         [--trace-block-tokens N] [--host-cache-tokens-per-gpu N] \
[--policy standard|all|NAME[,NAME...]]"
    );
    std::process::exit(2)
}

fn parse_args() -> Args {
    let mut args = Args {
        seed: 1,
        sessions: None,
        replicas: 4,
        duration: 1200,
        scenario: "all".to_owned(),
        jobs: 2,
        heavy_fraction: None,
        think_secs: None,
        users: None,
        block_size: None,
        per_replica: false,
        workload: "default".to_owned(),
        loads: vec![0.5, 0.8, 0.95],
        keyless: false,
        write_trace: None,
        trace_block_tokens: 512,
        host_cache: None,
        policies: Policy::STANDARD.to_vec(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().unwrap_or_else(|| usage());
        fn num<T: std::str::FromStr>(s: String) -> T {
            s.parse().unwrap_or_else(|_| usage())
        }
        match flag.as_str() {
            "--seed" => args.seed = num(value()),
            "--sessions" => args.sessions = Some(num(value())),
            "--replicas" => args.replicas = num(value()),
            "--duration-secs" => args.duration = num(value()),
            "--scenario" => args.scenario = value(),
            "--jobs" => args.jobs = num::<usize>(value()).max(1),
            "--heavy-fraction" => args.heavy_fraction = Some(num(value())),
            "--think-secs" => args.think_secs = Some(num(value())),
            "--users" => args.users = Some(num(value())),
            "--block-size" => args.block_size = Some(num(value())),
            "--per-replica" => args.per_replica = true,
            "--workload" => args.workload = value(),
            "--load" => {
                args.loads = value()
                    .split(',')
                    .map(|x| num::<f64>(x.trim().to_owned()))
                    .collect()
            }
            "--keyless" => args.keyless = true,
            "--write-trace" => args.write_trace = Some(value()),
            "--trace-block-tokens" => args.trace_block_tokens = num(value()),
            "--host-cache-tokens-per-gpu" => args.host_cache = Some(num(value())),
            "--policy" => {
                args.policies = value().split(',').flat_map(policy_by_name).collect();
            }
            "-h" | "--help" => usage(),
            _ => usage(),
        }
    }
    if args.replicas == 0
        || args.duration == 0
        || args.loads.is_empty()
        || args.loads.iter().any(|l| !(l.is_finite() && *l > 0.0))
        || !matches!(args.workload.as_str(), "default" | "heavy")
    {
        usage();
    }
    args
}

/// Runs the policies of one scenario, `jobs` at a time (each run has its own runtime, so the
/// result does not depend on `jobs`).
fn run_scenario(
    scenario: &Scenario,
    workload: &Workload,
    options: &SimOptions,
    jobs: usize,
    policies: &[Policy],
) -> ScenarioReport {
    let mut reports: Vec<Option<PolicyReport>> = vec![None; policies.len()];
    for (chunk_policies, chunk_out) in policies.chunks(jobs).zip(reports.chunks_mut(jobs)) {
        std::thread::scope(|s| {
            let handles: Vec<_> = chunk_policies
                .iter()
                .map(|&p| {
                    s.spawn(move || {
                        compare(scenario, workload, &[p], options)
                            .unwrap_or_else(|e| {
                                eprintln!("simulate: {e}");
                                std::process::exit(1)
                            })
                            .policies
                            .remove(0)
                    })
                })
                .collect();
            for (h, out) in handles.into_iter().zip(chunk_out.iter_mut()) {
                *out = Some(h.join().expect("simulation thread panicked"));
            }
        });
    }
    ScenarioReport {
        scenario: scenario.name.clone(),
        workload: describe(workload),
        has_failure: scenario.failure.is_some(),
        policies: reports.into_iter().flatten().collect(),
    }
}

fn main() {
    let args = parse_args();
    if args.workload == "heavy" {
        return heavy_main(&args);
    }
    let sessions = args.sessions.unwrap_or(
        (SESSIONS_PER_REPLICA_SECOND * args.replicas as f64 * args.duration as f64).round()
            as usize,
    );
    let window = Duration::from_secs(args.duration);
    let defaults = WorkloadConfig::default();
    let config = WorkloadConfig {
        sessions,
        users: args.users.unwrap_or((sessions / 4).max(1)),
        arrival_window: window,
        heavy_fraction: args.heavy_fraction.unwrap_or(defaults.heavy_fraction),
        think_mean: args
            .think_secs
            .map_or(defaults.think_mean, Duration::from_secs_f64),
        ..defaults
    };
    let mut scenarios: Vec<Scenario> = match args.scenario.as_str() {
        "homogeneous" => vec![Scenario::homogeneous(args.replicas)],
        "heterogeneous" => vec![Scenario::heterogeneous(args.replicas)],
        "failure" => vec![Scenario::failure(args.replicas, window / 2)],
        "all" => vec![
            Scenario::homogeneous(args.replicas),
            Scenario::heterogeneous(args.replicas),
            Scenario::failure(args.replicas, window / 2),
        ],
        _ => usage(),
    };
    if let Some(bs) = args.block_size {
        for s in &mut scenarios {
            s.engine.block_size = bs.max(1);
        }
    }
    for s in &mut scenarios {
        s.engine.host_cache_tokens_per_gpu = args.host_cache.unwrap_or(0);
    }
    let options = SimOptions {
        seed: args.seed,
        keyless: args.keyless,
        ..SimOptions::default()
    };
    if let Some(path) = &args.write_trace {
        let workload = Workload::generate(&config, args.seed, scenarios[0].engine.block_size());
        return save_trace(path, &workload, args.trace_block_tokens);
    }
    let block_size = scenarios[0].engine.block_size();
    let workload = Workload::generate(&config, args.seed, block_size);
    let wall = Instant::now();
    for scenario in &scenarios {
        let report = run_scenario(scenario, &workload, &options, args.jobs, &args.policies);
        println!("{}", report.to_markdown());
        if args.per_replica {
            println!("Per replica:\n\n{}", report.replicas_markdown());
        }
        for p in &report.policies {
            assert_eq!(
                p.leftover_in_flight, 0,
                "{}: in-flight counters leaked",
                p.policy
            );
        }
    }
    eprintln!(
        "simulated {} scenario(s) x {} policies in {:.1} s of wall time",
        scenarios.len(),
        args.policies.len(),
        wall.elapsed().as_secs_f64()
    );
}

/// Writes `workload` as a JSON Lines trace to `path`.
fn save_trace(path: &str, workload: &Workload, block_tokens: u32) {
    let records = workload.trace(block_tokens).unwrap_or_else(|e| {
        eprintln!("simulate: {e}");
        std::process::exit(1)
    });
    let written = std::fs::File::create(path)
        .map_err(replica_router_mock::sim::TraceError::from)
        .and_then(|f| write_trace(std::io::BufWriter::new(f), &records));
    if let Err(e) = written {
        eprintln!("simulate: {path}: {e}");
        std::process::exit(1)
    }
    eprintln!("{}", describe(workload));
    eprintln!("wrote {} requests to {path}", records.len());
}

/// The heavy-tailed workload at each offered load, on the homogeneous and heterogeneous pools.
fn heavy_main(args: &Args) {
    let mut scenarios: Vec<Scenario> = match args.scenario.as_str() {
        "homogeneous" => vec![Scenario::homogeneous(args.replicas)],
        "heterogeneous" => vec![Scenario::heterogeneous(args.replicas)],
        "all" => vec![
            Scenario::homogeneous(args.replicas),
            Scenario::heterogeneous(args.replicas),
        ],
        _ => usage(),
    };
    for s in &mut scenarios {
        if let Some(bs) = args.block_size {
            s.engine.block_size = bs.max(1);
        }
        s.engine.host_cache_tokens_per_gpu =
            args.host_cache.unwrap_or(HEAVY_HOST_CACHE_TOKENS_PER_GPU);
    }
    let base = HeavyConfig {
        arrival_window: Duration::from_secs(args.duration),
        ..HeavyConfig::default()
    };
    let options = SimOptions {
        seed: args.seed,
        keyless: args.keyless,
        ..SimOptions::default()
    };
    let wall = Instant::now();
    for scenario in &scenarios {
        let bs = scenario.engine.block_size();
        let mix = base.mix(scenario, args.seed);
        let capacity = pool_capacity(scenario, &mix);
        for &load in &args.loads {
            let config = base.at_load(load, scenario, args.seed).unwrap_or_else(|e| {
                eprintln!("simulate: {e}");
                std::process::exit(1)
            });
            let workload = Workload::heavy(&config, args.seed, bs);
            if let Some(path) = &args.write_trace {
                return save_trace(path, &workload, args.trace_block_tokens);
            }
            let mut report =
                run_scenario(scenario, &workload, &options, args.jobs, &HEAVY_POLICIES);
            report.scenario = format!(
                "{}, {:.0}% load{}",
                scenario.name,
                100.0 * load,
                if args.keyless { ", keyless" } else { "" }
            );
            println!("### {}\n", report.scenario);
            println!("{}", report.workload);
            println!(
                "Engines: mock defaults (70B FP8 on H100s), prefix cache = KV + {} tokens per GPU \
                 of host memory.",
                scenario.engine.host_cache_tokens_per_gpu
            );
            println!(
                "Capacity (perfect cache, mock speed model): {capacity:.2} requests/s for a mean \
                 prompt of {:.1}k tokens, {:.1}k uncached, {:.0}-token answers, {:.2} turns per \
                 conversation; offered {:.2} requests/s. Seeds: workload {}, routers {}.\n",
                mix.prompt_tokens / 1000.0,
                mix.uncached_tokens / 1000.0,
                mix.answer_tokens,
                mix.turns_per_session,
                load * capacity,
                args.seed,
                options.seed,
            );
            println!("{}", heavy_table(&report));
            if args.per_replica {
                println!("Per replica:\n\n{}", report.replicas_markdown());
            }
            for p in &report.policies {
                assert_eq!(
                    p.leftover_in_flight, 0,
                    "{}: in-flight counters leaked",
                    p.policy
                );
            }
        }
    }
    eprintln!(
        "simulated {} scenario(s) x {} load(s) x {} policies in {:.1} s of wall time",
        scenarios.len(),
        args.loads.len(),
        HEAVY_POLICIES.len(),
        wall.elapsed().as_secs_f64()
    );
}

/// The heavy workload's table: latency, cache, and how the prefill work was shared.
fn heavy_table(report: &ScenarioReport) -> String {
    let secs = |d: Duration| format!("{:.2}", d.as_secs_f64());
    let mut out = String::from(
        "| policy | TTFT p50 (s) | TTFT p95 (s) | TTFT p99 (s) | E2E p95 (s) | prefix hit \
         | prefill (Mtok) | prefill share per replica | in-flight max/mean | prefill max/mean \
         | completed | last answer (s) | decisions |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for p in &report.policies {
        let total: u64 = p.replicas.iter().map(|r| r.prefill_computed()).sum();
        let shares: Vec<String> = p
            .replicas
            .iter()
            .map(|r| {
                format!(
                    "{:.0}",
                    100.0 * r.prefill_computed() as f64 / total.max(1) as f64
                )
            })
            .collect();
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} | {:.1}% | {:.1} | {}% | {:.2} | {:.2} | {}/{} | {:.0} | {} |\n",
            p.policy,
            secs(p.ttft.p50),
            secs(p.ttft.p95),
            secs(p.ttft.p99),
            secs(p.e2e.p95),
            100.0 * p.prefix_hit_rate,
            p.prefill_computed as f64 / 1e6,
            shares.join("/"),
            p.load_imbalance,
            p.work_imbalance,
            p.requests_completed,
            p.requests_planned,
            p.makespan.as_secs_f64(),
            p.reasons.summary(),
        ));
    }
    out
}
