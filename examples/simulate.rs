//! Routing quality side by side, in virtual time: round-robin, least-loaded, sticky and
//! bounded-load affinity on the same multi-turn chat workload over mock engine replicas.
//!
//! ```text
//! cargo run --release --example simulate --features sim -- \
//!     [--seed N] [--sessions N] [--replicas N] [--duration-secs S] \
//!     [--scenario homogeneous|heterogeneous|failure|all] [--jobs N] \
//!     [--heavy-fraction F] [--think-secs S] [--users N] [--block-size TOKENS] [--per-replica] \
//!     [--policy standard|all|NAME[,NAME...]]
//! ```
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

use replica_router::sim::{
    compare, describe, Policy, PolicyReport, Scenario, ScenarioReport, SimOptions, Workload,
    WorkloadConfig,
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
    policies: Vec<Policy>,
}

fn policy_by_name(name: &str) -> Vec<Policy> {
    match name {
        "standard" => Policy::STANDARD.to_vec(),
        "all" => {
            let mut v = Policy::STANDARD.to_vec();
            v.extend([Policy::TTFT, Policy::TTFT_KEYLESS]);
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
        "ttft-tokens" => vec![Policy::Ttft {
            keyed: true,
            measure: replica_router::balance::LoadMeasure::InFlightTokens,
        }],
        _ => usage(),
    }
}

fn usage() -> ! {
    eprintln!(
        "usage: simulate [--seed N] [--sessions N] [--replicas N] [--duration-secs S] \
         [--scenario homogeneous|heterogeneous|failure|all] [--jobs N] \
         [--heavy-fraction F] [--think-secs S] [--users N] [--block-size TOKENS] [--per-replica] \
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
            "--policy" => {
                args.policies = value().split(',').flat_map(policy_by_name).collect();
            }
            "-h" | "--help" => usage(),
            _ => usage(),
        }
    }
    if args.replicas == 0 || args.duration == 0 {
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
    let options = SimOptions {
        seed: args.seed,
        ..SimOptions::default()
    };
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
