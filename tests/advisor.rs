//! The capacity advisor: each verdict on a simulated scenario built to produce it, and the
//! order of its rules.

use std::time::Duration;

use proptest::prelude::*;
use replica_router::advisor::{
    advise, Advice, AdvisorConfig, Measurements, MemoryFit, ReplicaMeasurement, Rule, Verdict,
};
use replica_router_mock::sim::harbor::{
    chat_config, harbor_scenario, low_load_tpot, open_loop, sessions_per_sec, HarborConfig,
    FULL_STACK,
};
use replica_router_mock::sim::{
    measurements, simulate, Policy, PolicyReport, Scenario, SimOptions,
};

const SLO: Duration = Duration::from_millis(200);

/// Runs `scenario` on the chat mix at `load` (a fraction of the scenario's capacity), open
/// loop, for `window` after a `warmup`, and returns the run and the advisor's reading.
fn run_chat(
    scenario: &Scenario,
    load: f64,
    window: Duration,
    warmup: Duration,
    policy: Policy,
) -> (PolicyReport, Advice) {
    let per_sec = sessions_per_sec(&chat_config(), scenario, load, 11);
    let workload = open_loop(
        &chat_config(),
        per_sec,
        window,
        11,
        scenario.engine.block_size(),
    );
    let options = SimOptions {
        seed: 11,
        shed_budget: Some(SLO),
        warmup,
        ..SimOptions::default()
    };
    let report = simulate(scenario, &workload, policy, &options).unwrap();
    let advice = advise(
        &measurements(&report, scenario, SLO),
        &AdvisorConfig::default(),
    );
    (report, advice)
}

#[test]
fn harbor_two_tp2_replicas_at_high_concurrency_read_replica_bound() {
    // The guide's Harbor case, with traffic past what two TP=2 replicas serve.
    let scenario = harbor_scenario(2, 2);
    let (report, advice) = run_chat(
        &scenario,
        1.3,
        Duration::from_secs(150),
        Duration::from_secs(60),
        FULL_STACK,
    );
    assert_eq!(advice.verdict, Verdict::ReplicaBound, "{advice}");
    assert_eq!(advice.rule, Rule::SaturatedByConcurrency);
    let e = &advice.evidence;
    // Busy GPUs (not memory-bound), batches mostly full and reaching max_num_seqs, waits past
    // the SLO (the shedding layer's 429s and retries included).
    assert!(e.mean_utilization >= 0.6, "{advice}");
    assert!(e.mean_batch_occupancy >= 0.8, "{advice}");
    assert!(e.max_kv_usage < 0.95, "{advice}");
    assert!(e.p95_queue_wait > SLO, "{advice}");
    assert!(report.retries > 0, "{advice}");
    assert!(
        report.replicas.iter().all(|r| r.peak_running == 256),
        "{:?}",
        report.replicas
    );
    // More replicas of the same TP=2 shape.
    assert!(advice.proposed.replicas >= 3, "{advice}");
    assert_eq!(advice.proposed.tensor_parallel, 2);
    assert_eq!(advice.current.gpus(), 4);
}

#[test]
fn a_405b_model_on_tp2_reads_memory_bound() {
    // 405B in FP8 (405 GB) with its fp16 KV (126 layers, 8 KV heads, dim 128) on two H100s.
    let mut scenario = harbor_scenario(1, 2);
    scenario.engine.weight_bytes = 405e9;
    scenario.engine.kv_bytes_per_token = 2.0 * 126.0 * 8.0 * 128.0 * 2.0;
    let workload = open_loop(&chat_config(), 0.5, Duration::from_secs(20), 3, 16);
    let options = SimOptions {
        max_attempts: 3,
        ..SimOptions::default()
    };
    let report = simulate(&scenario, &workload, Policy::LeastLoaded, &options).unwrap();
    // The replica has almost no KV room left: most prompts are refused.
    assert!(
        report.requests_completed < report.requests_planned / 2,
        "{report:?}"
    );
    let advice = advise(
        &measurements(&report, &scenario, SLO),
        &AdvisorConfig::default(),
    );
    assert_eq!(advice.verdict, Verdict::MemoryBound, "{advice}");
    assert_eq!(advice.rule, Rule::ModelDoesNotFit);
    assert!(advice.evidence.memory_required_bytes > advice.evidence.memory_available_bytes);
    // TP=8 holds 576 GB: the weights and a longest context fit; TP=4 (288 GB) does not.
    assert_eq!(advice.proposed.tensor_parallel, 8, "{advice}");
    assert_eq!(advice.proposed.pipeline_parallel, 1);
    let fit = replica_router_mock::sim::memory_fit(
        &scenario.engine,
        u64::from(report.max_context_tokens),
    );
    assert!(fit.fits(8) && !fit.fits(4));
}

#[test]
fn a_lone_request_over_its_latency_target_reads_shard_bound_and_tp4_meets_it() {
    let config = HarborConfig::default();
    let target = Duration::from_millis(20);
    let scenario = harbor_scenario(1, 2);
    let (report, _) = run_chat(
        &scenario,
        0.03,
        Duration::from_secs(90),
        Duration::ZERO,
        Policy::LeastLoaded,
    );
    let mut m = measurements(&report, &scenario, SLO);
    m.low_load_latency = Some(report.tpot.p50);
    m.latency_target = Some(target);
    let advice = advise(&m, &AdvisorConfig::default());
    assert_eq!(advice.verdict, Verdict::ShardBound, "{advice}");
    assert_eq!(advice.rule, Rule::LoneRequestTooSlow);
    // Adding a replica would not help (low load: nothing queues), widening TP would.
    assert!(advice.evidence.p95_queue_wait < SLO, "{advice}");
    assert_eq!(advice.proposed.tensor_parallel, 4, "{advice}");
    assert_eq!(advice.proposed.replicas, 1);
    // The proposed shape meets the target on the simulation.
    let tp4 = low_load_tpot(&config, 4).unwrap();
    assert!(tp4 <= target, "TP=4 at low load: {tp4:?}");
    assert!(low_load_tpot(&config, 2).unwrap() > target);
}

#[test]
fn queueing_behind_a_tiny_batch_reads_under_utilized_and_batching_fixes_it() {
    // max_num_seqs = 8: requests queue for seconds while the GPUs run nearly empty batches.
    let mut tiny = harbor_scenario(1, 2);
    tiny.engine.max_num_seqs = 8;
    let full = harbor_scenario(1, 2);
    let load = 0.3 * sessions_per_sec(&chat_config(), &full, 1.0, 11)
        / sessions_per_sec(&chat_config(), &tiny, 1.0, 11);
    let window = Duration::from_secs(120);
    let warmup = Duration::from_secs(30);
    let (_, advice) = run_chat(&tiny, load, window, warmup, Policy::LeastLoaded);
    assert_eq!(advice.verdict, Verdict::UnderUtilized, "{advice}");
    assert_eq!(advice.rule, Rule::QueueingWhileIdle);
    assert!(advice.evidence.mean_utilization < 0.5, "{advice}");
    assert!(advice.evidence.p95_queue_wait > SLO, "{advice}");
    assert_eq!(advice.proposed, advice.current);
    // The same traffic on the same replica with vLLM's default batch: no queue, healthy.
    let (_, fixed) = run_chat(&full, 0.3, window, warmup, Policy::LeastLoaded);
    assert_eq!(fixed.verdict, Verdict::Healthy, "{fixed}");
}

#[test]
fn the_guides_harbor_numbers_read_replica_bound() {
    // One TP=2 replica at max_num_seqs, 78% tensor utilization, sessions queueing 4-8 s.
    let mut m = Measurements::new(2, 1, 256);
    m.replicas.push(ReplicaMeasurement {
        id: "gpu-0-1".into(),
        utilization: Some(0.78),
        batch_occupancy: 1.0,
        waiting: 120.0,
        kv_usage: 0.6,
    });
    m.p95_queue_wait = Duration::from_secs(8);
    m.memory = Some(MemoryFit {
        gpu_memory_bytes: 72_000_000_000,
        weight_bytes: 70_000_000_000,
        kv_bytes_per_token: 163_840,
        context_tokens: 8_192,
    });
    let advice = advise(&m, &AdvisorConfig::default());
    assert_eq!(advice.verdict, Verdict::ReplicaBound);
    // 1.0 + 120/256 of demand at 80% occupancy: two replicas.
    assert_eq!(advice.proposed.to_string(), "2 x TP=2 x PP=1 = 4 GPUs");
    let text = advice.to_string();
    assert!(
        text.contains("replica-bound") && text.contains("utilization 78%"),
        "{text}"
    );
}

#[test]
fn json_carries_the_verdict_the_evidence_and_the_shapes() {
    let mut m = Measurements::new(2, 1, 256);
    m.replicas.push(ReplicaMeasurement {
        id: "a".into(),
        utilization: None,
        batch_occupancy: 0.95,
        waiting: 10.0,
        kv_usage: 0.5,
    });
    m.p95_queue_wait = Duration::from_millis(900);
    let advice = advise(&m, &AdvisorConfig::default());
    let v: serde_json::Value = serde_json::from_str(&advice.to_json()).unwrap();
    assert_eq!(v["verdict"], "replica-bound");
    assert_eq!(v["rule"], "saturated-by-concurrency");
    assert_eq!(v["evidence"]["p95_queue_wait_s"], 0.9);
    assert_eq!(v["evidence"]["mean_utilization"], 0.95); // occupancy stands in
    assert_eq!(v["evidence"]["low_load_latency_s"], serde_json::Value::Null);
    assert_eq!(v["current"]["gpus"], 2);
    assert_eq!(v["proposed"]["replicas"], 2);
    assert_eq!(v["proposed"]["tensor_parallel"], 2);
}

fn replica() -> impl Strategy<Value = ReplicaMeasurement> {
    (
        proptest::option::of(0.0..=1.0f64),
        0.0..=1.0f64,
        0.0..500.0f64,
        0.0..=1.0f64,
    )
        .prop_map(
            |(utilization, batch_occupancy, waiting, kv_usage)| ReplicaMeasurement {
                id: "r".into(),
                utilization,
                batch_occupancy,
                waiting,
                kv_usage,
            },
        )
}

fn measurements_strategy() -> impl Strategy<Value = Measurements> {
    (
        prop::sample::select(vec![1u32, 2, 4, 8]),
        proptest::collection::vec(replica(), 1..6),
        0u64..10_000,
        proptest::option::of(1u64..200),
        proptest::option::of(1u64..200),
        proptest::option::of((20u64..900, 1u64..200_000)),
    )
        .prop_map(|(tp, replicas, wait_ms, latency, target, memory)| {
            let mut m = Measurements::new(tp, 1, 256);
            m.replicas = replicas;
            m.p95_queue_wait = Duration::from_millis(wait_ms);
            m.low_load_latency = latency.map(Duration::from_millis);
            m.latency_target = target.map(Duration::from_millis);
            m.memory = memory.map(|(weights_gb, context)| MemoryFit {
                gpu_memory_bytes: 72_000_000_000,
                weight_bytes: weights_gb * 1_000_000_000,
                kv_bytes_per_token: 327_680,
                context_tokens: context,
            });
            m
        })
}

proptest! {
    #[test]
    fn memory_comes_first_and_its_proposal_fits(m in measurements_strategy()) {
        let advice = advise(&m, &AdvisorConfig::default());
        let fit = m.memory;
        let fits_now = fit.is_none_or(|f| f.fits(m.tensor_parallel));
        prop_assert_eq!(advice.rule == Rule::ModelDoesNotFit, !fits_now);
        if let (Some(f), Rule::ModelDoesNotFit) = (fit, advice.rule) {
            prop_assert_eq!(advice.verdict, Verdict::MemoryBound);
            prop_assert!(f.fits(advice.proposed.gpus_per_replica()));
            prop_assert!(advice.proposed.tensor_parallel <= 8);
            prop_assert_eq!(advice.proposed.replicas, advice.current.replicas);
        }
    }

    #[test]
    fn latency_over_target_beats_every_queue_rule(m in measurements_strategy()) {
        let advice = advise(&m, &AdvisorConfig::default());
        let slow = matches!((m.low_load_latency, m.latency_target), (Some(l), Some(t)) if l > t);
        let memory = matches!(advice.rule, Rule::ModelDoesNotFit | Rule::KvFullSmallBatch);
        if slow && !memory {
            prop_assert_eq!(advice.verdict, Verdict::ShardBound);
            prop_assert!(advice.proposed.tensor_parallel > m.tensor_parallel || m.tensor_parallel == 8);
        }
        if advice.verdict == Verdict::ShardBound {
            prop_assert!(slow);
        }
    }

    #[test]
    fn replica_bound_needs_queueing_and_busy_gpus(m in measurements_strategy()) {
        let config = AdvisorConfig::default();
        let advice = advise(&m, &config);
        let e = &advice.evidence;
        let queued = e.p95_queue_wait > e.queue_wait_slo
            || (e.mean_batch_occupancy >= config.full_batch && e.mean_waiting >= 1.0);
        match advice.verdict {
            Verdict::ReplicaBound => {
                prop_assert!(queued);
                prop_assert!(e.mean_utilization >= config.low_utilization);
                prop_assert!(advice.proposed.replicas > advice.current.replicas);
                prop_assert_eq!(advice.proposed.tensor_parallel, advice.current.tensor_parallel);
            }
            Verdict::UnderUtilized => {
                prop_assert!(queued);
                prop_assert!(e.mean_utilization < config.low_utilization);
                prop_assert_eq!(advice.proposed, advice.current);
            }
            Verdict::Healthy => {
                prop_assert!(!queued);
                prop_assert_eq!(advice.proposed, advice.current);
            }
            Verdict::MemoryBound | Verdict::ShardBound => {}
        }
        // Every report renders and serializes.
        prop_assert!(advice.to_string().starts_with("verdict: "));
        prop_assert!(serde_json::from_str::<serde_json::Value>(&advice.to_json()).is_ok());
    }
}
