//! The guide's Harbor Analytics story, in virtual time: one TP=2 replica of a 70B model at
//! holiday load, two TP=2 replicas behind the full stack, one TP=4 replica on the same four
//! GPUs, the long-context lesson, and the capacity advisor's verdict on each.
//!
//! Every figure comes from [`simulate`] runs; nothing is fixed in advance but the load. The
//! load is set from the capacity model ([`replica_capacity`]): the *normal* load is
//! [`HarborConfig::normal_load`] of one TP=2 replica's capacity for the chat mix, the
//! *holiday* load [`HarborConfig::holiday_factor`] times that (Black Friday doubled the
//! concurrent sessions). Turns are sent open loop ([`Pacing::FromSend`]), so the offered load
//! does not depend on the configuration serving it, and the first
//! [`HarborConfig::warmup`] of the window is left out of the throughput while the sessions ramp
//! up.
//!
//! The engine is the mock's 70B-on-H100 model ([`MockConfig`]) with an FP8 KV cache (Harbor
//! ran FP8), so at TP=2 `max_num_seqs` (256) binds before the KV cache for chat under 8k
//! tokens. TP=4 speeds every step by `2 ^ tp_efficiency` (1.8x with the default 0.85: the
//! all-reduces keep it sub-linear) and has more KV room, but the same `max_num_seqs`: lower
//! latency per token, not twice the throughput of a TP=2 replica.

use std::fmt::Write as _;
use std::time::Duration;

use replica_router::advisor::{advise, Advice, AdvisorConfig, Shape};

use crate::sim::advice::measurements;
use crate::sim::capacity::{replica_capacity, WorkMix};
use crate::sim::policy::Policy;
use crate::sim::report::PolicyReport;
use crate::sim::run::{simulate, SimOptions, SimSetupError};
use crate::sim::scenario::{ReplicaPlan, Scenario};
use crate::sim::workload::{Pacing, Workload, WorkloadConfig};
use crate::MockConfig;

/// Bytes of FP8 KV cache per token of a Llama-3-70B-class model (80 layers, 8 KV heads, head
/// dim 128, one byte per value).
pub const FP8_KV_BYTES_PER_TOKEN: f64 = 2.0 * 80.0 * 8.0 * 128.0;

/// The knobs of the story.
#[derive(Debug, Clone, PartialEq)]
pub struct HarborConfig {
    /// Seeds the workloads and the routers.
    pub seed: u64,
    /// Sessions arrive over this window.
    pub arrival_window: Duration,
    /// The start of the window left out of the throughput and the replicas' figures.
    pub warmup: Duration,
    /// The normal (pre-holiday) load, as a fraction of one TP=2 replica's capacity.
    pub normal_load: f64,
    /// The holiday load over the normal load.
    pub holiday_factor: f64,
    /// The load of the low-load runs that measure per-token latency, as a fraction of one TP=2
    /// replica's capacity.
    pub low_load: f64,
    /// The shedding layer's wait budget (429 when every replica is past it).
    pub wait_budget: Duration,
    /// The long-context lesson's load, as a fraction of two TP=2 replicas' capacity for its
    /// mix.
    pub long_context_load: f64,
    /// Context range of the long-context lesson's heavy sessions, in tokens (log-uniform).
    pub long_context: (u32, u32),
}

impl Default for HarborConfig {
    /// Ten minutes of holiday traffic at twice a normal load of 92% of one TP=2 replica, two
    /// minutes of warm-up, a 200 ms wait budget, and for the lesson 10% of sessions with
    /// 32k-64k tokens of context at 35% of two replicas' modelled capacity (the model assumes a
    /// perfect cache; long contexts keep far fewer sequences resident than it credits).
    fn default() -> Self {
        HarborConfig {
            seed: 7,
            arrival_window: Duration::from_secs(600),
            warmup: Duration::from_secs(120),
            normal_load: 0.92,
            holiday_factor: 2.0,
            low_load: 0.03,
            wait_budget: Duration::from_millis(200),
            long_context_load: 0.35,
            long_context: (32_768, 65_536),
        }
    }
}

/// One configuration of the story, run and advised.
#[derive(Debug, Clone)]
pub struct HarborRun {
    /// What it is (`1 x TP=2, holiday load`).
    pub label: String,
    /// Its shape.
    pub shape: Shape,
    /// The routing stack's policy.
    pub policy: Policy,
    /// Whether the stack sheds at the wait budget.
    pub shed: bool,
    /// Offered new sessions per second.
    pub sessions_per_sec: f64,
    /// New sessions per second the shape serves at most for the run's mix, by the capacity
    /// model ([`replica_capacity`]).
    pub capacity_sessions_per_sec: f64,
    /// What the run measured.
    pub report: PolicyReport,
    /// Median time per output token of the same shape at low load.
    pub low_load_tpot: Duration,
    /// The advisor's reading of the run.
    pub advice: Advice,
}

/// The story's runs.
#[derive(Debug, Clone)]
pub struct HarborReport {
    /// The configuration.
    pub config: HarborConfig,
    /// (a) One TP=2 replica at holiday load, no gateway: before the refactor.
    pub one_replica_holiday: HarborRun,
    /// One TP=2 replica at the normal load (half the holiday load): the latency baseline.
    pub one_replica_normal: HarborRun,
    /// (b) Two TP=2 replicas at holiday load behind the full stack ([`FULL_STACK`]).
    pub two_replicas_holiday: HarborRun,
    /// (b') The same, sticky by conversation with bounded loads counted in requests (no
    /// predicted-TTFT placement).
    pub two_replicas_bounded: HarborRun,
    /// (c) One TP=4 replica on the same four GPUs at holiday load, same stack.
    pub tp4_holiday: HarborRun,
    /// (d) Two TP=2 replicas with long-context heavy users: sticky by conversation, sticky by
    /// user, bounded loads by each, and the full stack.
    pub long_context: Vec<HarborRun>,
}

impl HarborReport {
    /// Aggregate throughput of two TP=2 replicas over one, both at holiday load.
    pub fn dp_speedup(&self) -> f64 {
        self.two_replicas_holiday.report.throughput
            / self.one_replica_holiday.report.throughput.max(1e-9)
    }

    /// Aggregate throughput of one TP=4 replica over one TP=2 replica, at holiday load.
    pub fn tp4_speedup(&self) -> f64 {
        self.tp4_holiday.report.throughput / self.one_replica_holiday.report.throughput.max(1e-9)
    }

    /// Modelled capacity of one TP=4 replica over one TP=2 replica (two TP=2 replicas: 2.0).
    pub fn tp4_capacity_ratio(&self) -> f64 {
        self.tp4_holiday.capacity_sessions_per_sec
            / self.one_replica_holiday.capacity_sessions_per_sec.max(1e-9)
    }

    /// The main runs in table order, then the long-context ones.
    pub fn runs(&self) -> impl Iterator<Item = &HarborRun> {
        [
            &self.one_replica_holiday,
            &self.one_replica_normal,
            &self.two_replicas_holiday,
            &self.two_replicas_bounded,
            &self.tp4_holiday,
        ]
        .into_iter()
        .chain(self.long_context.iter())
    }

    /// One Markdown table: a row per run (throughput, TTFT, queue wait, per-token latency at low
    /// load, batch occupancy, utilization, balance, the advisor's verdict and proposed shape).
    pub fn to_markdown(&self) -> String {
        let mut out = String::new();
        out.push_str(
            "| configuration | GPUs | sessions/s (capacity) | gen tok/s | x (a) | TTFT p50 (s) | TTFT p95 (s) \
             | wait p95 (s) | TPOT low load (ms) | batch / max_num_seqs | utilization | in-flight max/mean \
             | prefill max/mean | shed retries | advisor: verdict -> shape |\n",
        );
        out.push_str(
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|\n",
        );
        let base = self.one_replica_holiday.report.throughput.max(1e-9);
        for run in self.runs() {
            let r = &run.report;
            let replicas = r.replicas.len().max(1) as f64;
            let occupancy = r.replicas.iter().map(|x| x.batch_occupancy()).sum::<f64>() / replicas;
            let peak = r.replicas.iter().map(|x| x.peak_running).max().unwrap_or(0);
            let max_seqs = r.replicas.first().map_or(0, |x| x.max_num_seqs);
            let util = r.replicas.iter().map(|x| x.utilization).sum::<f64>() / replicas;
            let _ = writeln!(
                out,
                "| {} | {} | {:.2} ({:.2}) | {:.0} | {:.2} | {:.2} | {:.2} | {:.2} | {:.1} | {:.0}% (peak {}/{}) | {:.0}% | {:.2} | {:.2} | {} | {} -> {} |",
                run.label,
                run.shape.gpus(),
                run.sessions_per_sec,
                run.capacity_sessions_per_sec,
                r.throughput,
                r.throughput / base,
                r.ttft.p50.as_secs_f64(),
                r.ttft.p95.as_secs_f64(),
                r.queue_wait.p95.as_secs_f64(),
                run.low_load_tpot.as_secs_f64() * 1e3,
                100.0 * occupancy,
                peak,
                max_seqs,
                100.0 * util,
                r.load_imbalance,
                r.work_imbalance,
                r.retries,
                run.advice.verdict,
                run.advice.proposed,
            );
        }
        out
    }
}

/// The story's engine: the mock 70B-on-H100 model with an FP8 KV cache.
pub fn harbor_engine() -> MockConfig {
    MockConfig {
        kv_bytes_per_token: FP8_KV_BYTES_PER_TOKEN,
        ..MockConfig::default()
    }
}

/// `n` replicas of tensor parallelism `tp` with the story's engine.
pub fn harbor_scenario(n: usize, tp: u32) -> Scenario {
    Scenario {
        name: format!("Harbor: {n} x TP={tp}"),
        replicas: (0..n)
            .map(|i| ReplicaPlan {
                id: format!("tp{tp}-{i}"),
                tp,
                weight: 1.0,
            })
            .collect(),
        failure: None,
        engine: harbor_engine(),
    }
}

/// The chat mix for sessions under 8k tokens: light sessions only.
pub fn chat_config() -> WorkloadConfig {
    WorkloadConfig {
        heavy_fraction: 0.0,
        ..WorkloadConfig::default()
    }
}

/// The long-context lesson's mix: 10% of the sessions carry `context` tokens of pasted context
/// (log-uniform), and users own sessions by a Zipf law, so a few heavy users own many of them.
pub fn long_context_config(context: (u32, u32)) -> WorkloadConfig {
    WorkloadConfig {
        heavy_fraction: 0.1,
        heavy_context: context,
        heavy_turns: (6, 12),
        ..WorkloadConfig::default()
    }
}

/// Conversations of the pilot workload that estimates a mix.
const PILOT_SESSIONS: usize = 2000;

/// New sessions per second that offer `load` (a fraction) of `scenario`'s capacity for the
/// sessions of `config`.
pub fn sessions_per_sec(config: &WorkloadConfig, scenario: &Scenario, load: f64, seed: u64) -> f64 {
    let pilot = WorkloadConfig {
        sessions: PILOT_SESSIONS,
        ..config.clone()
    };
    let mix = WorkMix::perfect_cache(&Workload::generate(
        &pilot,
        seed ^ 0x9170_7000,
        scenario.engine.block_size(),
    ));
    let capacity: f64 = scenario
        .replicas
        .iter()
        .map(|r| {
            replica_capacity(
                &MockConfig {
                    tp: r.tp,
                    ..scenario.engine.clone()
                },
                &mix,
            )
        })
        .sum();
    load * capacity / mix.turns_per_session.max(1e-9)
}

/// An open-loop workload of `config` at `per_sec` new sessions per second over `window`.
pub fn open_loop(
    config: &WorkloadConfig,
    per_sec: f64,
    window: Duration,
    seed: u64,
    block_size: u32,
) -> Workload {
    let sessions = (per_sec * window.as_secs_f64()).round().max(1.0) as usize;
    let mut w = Workload::generate(
        &WorkloadConfig {
            sessions,
            arrival_window: window,
            ..config.clone()
        },
        seed,
        block_size,
    );
    w.pacing = Pacing::FromSend;
    w
}

struct Stage<'a> {
    label: String,
    scenario: Scenario,
    mix: &'a WorkloadConfig,
    workload: &'a Workload,
    policy: Policy,
    shed: bool,
    per_sec: f64,
    low_load_tpot: Duration,
}

fn run_stage(stage: Stage<'_>, config: &HarborConfig) -> Result<HarborRun, SimSetupError> {
    let options = SimOptions {
        seed: config.seed,
        shed_budget: stage.shed.then_some(config.wait_budget),
        warmup: config.warmup,
        ..SimOptions::default()
    };
    let report = simulate(&stage.scenario, stage.workload, stage.policy, &options)?;
    let capacity = sessions_per_sec(stage.mix, &stage.scenario, 1.0, config.seed);
    let mut m = measurements(&report, &stage.scenario, config.wait_budget);
    m.low_load_latency = Some(stage.low_load_tpot);
    let advice = advise(&m, &AdvisorConfig::default());
    let tp = stage.scenario.replicas.first().map_or(1, |r| r.tp);
    Ok(HarborRun {
        label: stage.label,
        shape: Shape::new(stage.scenario.replicas.len() as u32, tp, 1),
        policy: stage.policy,
        shed: stage.shed,
        sessions_per_sec: stage.per_sec,
        capacity_sessions_per_sec: capacity,
        report,
        low_load_tpot: stage.low_load_tpot,
        advice,
    })
}

/// Median time per output token of one replica of tensor parallelism `tp` at `config`'s low
/// load.
pub fn low_load_tpot(config: &HarborConfig, tp: u32) -> Result<Duration, SimSetupError> {
    let one_tp2 = harbor_scenario(1, 2);
    let scenario = harbor_scenario(1, tp);
    let per_sec = sessions_per_sec(&chat_config(), &one_tp2, config.low_load, config.seed);
    let window = config.arrival_window.min(Duration::from_secs(120));
    let workload = open_loop(
        &chat_config(),
        per_sec,
        window,
        config.seed ^ 0x10,
        scenario.engine.block_size(),
    );
    let options = SimOptions {
        seed: config.seed,
        ..SimOptions::default()
    };
    Ok(
        simulate(&scenario, &workload, Policy::LeastLoaded, &options)?
            .tpot
            .p50,
    )
}

/// The full stack of the refactor: sticky by conversation with bounded loads (in estimated
/// tokens in flight), a session with no home yet, or whose home is over the bound, placed on
/// the replica with the least predicted time to first token (least loaded by queued work, its
/// cached prefix counted), shedding in front ([`HarborConfig::wait_budget`]).
pub const FULL_STACK: Policy = Policy::TTFT;

/// Runs the story.
///
/// ```no_run
/// use replica_router_mock::sim::harbor::{harbor, HarborConfig};
/// let report = harbor(&HarborConfig::default()).unwrap();
/// assert!(report.dp_speedup() >= 1.8);
/// println!("{}", report.to_markdown());
/// ```
pub fn harbor(config: &HarborConfig) -> Result<HarborReport, SimSetupError> {
    let chat = chat_config();
    let one_tp2 = harbor_scenario(1, 2);
    let bs = one_tp2.engine.block_size();
    let normal = sessions_per_sec(&chat, &one_tp2, config.normal_load, config.seed);
    let holiday = normal * config.holiday_factor;
    let holiday_load = open_loop(&chat, holiday, config.arrival_window, config.seed, bs);
    let normal_load = open_loop(&chat, normal, config.arrival_window, config.seed, bs);
    let tpot2 = low_load_tpot(config, 2)?;
    let tpot4 = low_load_tpot(config, 4)?;

    let one_replica_holiday = run_stage(
        Stage {
            label: "(a) 1 x TP=2, holiday load".into(),
            scenario: one_tp2.clone(),
            mix: &chat,
            workload: &holiday_load,
            policy: Policy::LeastLoaded,
            shed: false,
            per_sec: holiday,
            low_load_tpot: tpot2,
        },
        config,
    )?;
    let one_replica_normal = run_stage(
        Stage {
            label: "1 x TP=2, normal load (half)".into(),
            scenario: one_tp2,
            mix: &chat,
            workload: &normal_load,
            policy: Policy::LeastLoaded,
            shed: false,
            per_sec: normal,
            low_load_tpot: tpot2,
        },
        config,
    )?;
    let two_replicas_holiday = run_stage(
        Stage {
            label: "(b) 2 x TP=2, holiday load, full stack".into(),
            scenario: harbor_scenario(2, 2),
            mix: &chat,
            workload: &holiday_load,
            policy: FULL_STACK,
            shed: true,
            per_sec: holiday,
            low_load_tpot: tpot2,
        },
        config,
    )?;
    let two_replicas_bounded = run_stage(
        Stage {
            label: "(b') 2 x TP=2, holiday load, bounded loads (requests)".into(),
            scenario: harbor_scenario(2, 2),
            mix: &chat,
            workload: &holiday_load,
            policy: Policy::BOUNDED,
            shed: true,
            per_sec: holiday,
            low_load_tpot: tpot2,
        },
        config,
    )?;
    let tp4_holiday = run_stage(
        Stage {
            label: "(c) 1 x TP=4, holiday load, full stack".into(),
            scenario: harbor_scenario(1, 4),
            mix: &chat,
            workload: &holiday_load,
            policy: FULL_STACK,
            shed: true,
            per_sec: holiday,
            low_load_tpot: tpot4,
        },
        config,
    )?;

    let long = long_context_config(config.long_context);
    let two_tp2 = harbor_scenario(2, 2);
    let long_rate = sessions_per_sec(&long, &two_tp2, config.long_context_load, config.seed);
    let long_load = open_loop(
        &long,
        long_rate,
        config.arrival_window,
        config.seed ^ 0x32,
        bs,
    );
    let mut long_context = Vec::new();
    for (name, policy) in [
        ("sticky by conversation", Policy::STICKY),
        ("sticky by user", Policy::STICKY_USER),
        ("bounded loads by conversation", Policy::BOUNDED),
        ("bounded loads by user", Policy::BOUNDED_USER),
        ("full stack", FULL_STACK),
    ] {
        long_context.push(run_stage(
            Stage {
                label: format!("(d) 2 x TP=2, >32k sessions, {name}"),
                scenario: two_tp2.clone(),
                mix: &long,
                workload: &long_load,
                policy,
                shed: true,
                per_sec: long_rate,
                low_load_tpot: tpot2,
            },
            config,
        )?);
    }
    Ok(HarborReport {
        config: config.clone(),
        one_replica_holiday,
        one_replica_normal,
        two_replicas_holiday,
        two_replicas_bounded,
        tp4_holiday,
        long_context,
    })
}
