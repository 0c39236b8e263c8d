//! The heavy-tailed workload, offered load, keyless traffic, the cache-aware reference policy
//! and the trace export, asserted on fixed seeds (virtual time only).

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use replica_router_mock::sim::{
    read_trace, simulate, write_trace, HeavyConfig, Pacing, Policy, PolicyReport, Scenario,
    SimOptions, TraceError, WorkMix, Workload,
};

/// Prefix-cache blocks of 64 tokens: fewer cache operations in the debug-build tests.
const BLOCK: u32 = 64;

fn scenario(mut s: Scenario) -> Scenario {
    s.engine.block_size = BLOCK;
    s
}

fn quantile(v: &mut [u32], q: f64) -> u32 {
    v.sort_unstable();
    v[((q * v.len() as f64) as usize).min(v.len() - 1)]
}

#[test]
fn heavy_workload_statistics() {
    let cfg = HeavyConfig {
        conversations: 3000,
        ..HeavyConfig::default()
    };
    let w = Workload::heavy(&cfg, 11, BLOCK);
    assert_eq!(w.pacing, Pacing::FromSend);
    let mut prompts: Vec<u32> = w
        .sessions
        .iter()
        .flat_map(|s| s.turns.iter().map(|t| t.prompt_tokens))
        .collect();
    let mut answers: Vec<u32> = w
        .sessions
        .iter()
        .flat_map(|s| s.turns.iter().map(|t| t.answer_tokens))
        .collect();
    let n = prompts.len() as f64;
    let mean = prompts.iter().map(|&p| f64::from(p)).sum::<f64>() / n;
    assert!((8_000.0..13_000.0).contains(&mean), "mean prompt {mean}");
    let (min, max) = (
        *prompts.iter().min().unwrap(),
        *prompts.iter().max().unwrap(),
    );
    assert!(min >= 200 && max <= 120_000, "{min}..{max}");
    // Heavy tail: the p99 is many times the median, and some prompts pass 100k.
    let (p50, p99) = (quantile(&mut prompts, 0.5), quantile(&mut prompts, 0.99));
    assert!(p99 > 10 * p50, "p50 {p50}, p99 {p99}");
    assert!(prompts.iter().any(|&p| p > 100_000));
    // ~60% of the requests start a conversation.
    let share = w.sessions.len() as f64 / n;
    assert!(
        (0.55..0.65).contains(&share),
        "new-conversation share {share}"
    );
    // Answers: median a few hundred tokens, capped.
    let a50 = quantile(&mut answers, 0.5);
    assert!((200..=400).contains(&a50), "answer median {a50}");
    assert!(answers.iter().all(|&a| a <= 2048));
    // Follow-ups come 1-5 minutes after the previous turn.
    for s in &w.sessions {
        assert!(s.turns[0].think.is_zero());
        for t in &s.turns[1..] {
            assert!(
                (Duration::from_secs(60)..=Duration::from_secs(300)).contains(&t.think),
                "{:?}",
                t.think
            );
        }
        assert!(s
            .turns
            .windows(2)
            .all(|t| t[1].prompt_tokens > t[0].prompt_tokens));
    }
    // A few shared system prompts: new conversations share their first block with many others.
    let mut first: HashMap<u64, usize> = HashMap::new();
    for s in &w.sessions {
        *first.entry(s.blocks[0]).or_default() += 1;
    }
    assert!(first.len() <= 8, "{} distinct first blocks", first.len());
    assert!(*first.values().max().unwrap() > w.sessions.len() / 5);
    // Arrivals stay near the window (a mean rate of conversations / window).
    let last = w.sessions.iter().map(|s| s.arrival).max().unwrap();
    assert!(last > cfg.arrival_window * 8 / 10 && last < cfg.arrival_window * 12 / 10);
}

#[test]
fn bursts_raise_the_rate_for_a_while() {
    // Short prompts: only the arrival process matters here.
    let cfg = HeavyConfig {
        conversations: 8000,
        arrival_window: Duration::from_secs(4000),
        first_message_median: 100.0,
        system_tokens: (100, 100),
        follow_up_probability: 0.0,
        ..HeavyConfig::default()
    };
    let w = Workload::heavy(&cfg, 5, BLOCK);
    // Arrivals per 20 s bin over the first 3000 s (the count is fixed, so the process may end
    // a little before or after 4000 s): a bursty process spreads far more than Poisson.
    let mut bins = vec![0u32; 150];
    for s in &w.sessions {
        if let Some(b) = bins.get_mut((s.arrival.as_secs() / 20) as usize) {
            *b += 1;
        }
    }
    let mean = bins.iter().map(|&b| f64::from(b)).sum::<f64>() / 150.0;
    let var = bins
        .iter()
        .map(|&b| (f64::from(b) - mean).powi(2))
        .sum::<f64>()
        / 150.0;
    assert!(var > 3.0 * mean, "variance {var} vs mean {mean}");
    let plain = Workload::heavy(
        &HeavyConfig {
            burst: None,
            ..cfg.clone()
        },
        5,
        BLOCK,
    );
    let mut bins = vec![0u32; 150];
    for s in &plain.sessions {
        if let Some(b) = bins.get_mut((s.arrival.as_secs() / 20) as usize) {
            *b += 1;
        }
    }
    let mean = bins.iter().map(|&b| f64::from(b)).sum::<f64>() / 150.0;
    let var_plain = bins
        .iter()
        .map(|&b| (f64::from(b) - mean).powi(2))
        .sum::<f64>()
        / 150.0;
    assert!(
        var_plain < 2.0 * mean,
        "Poisson variance {var_plain} vs mean {mean}"
    );
}

#[test]
fn heavy_workload_is_deterministic_by_seed() {
    let cfg = HeavyConfig {
        conversations: 300,
        ..HeavyConfig::default()
    };
    let a = Workload::heavy(&cfg, 3, BLOCK);
    assert_eq!(a, Workload::heavy(&cfg, 3, BLOCK));
    assert_ne!(a, Workload::heavy(&cfg, 4, BLOCK));
}

#[test]
fn offered_load_scales_the_arrival_rate_in_proportion() {
    let s = scenario(Scenario::homogeneous(4));
    let base = HeavyConfig::default();
    let rates: Vec<f64> = [0.4, 0.8, 1.2]
        .iter()
        .map(|&load| {
            let c = base.at_load(load, &s, 1).unwrap();
            assert_eq!(c.arrival_window, base.arrival_window);
            c.conversations as f64 / c.arrival_window.as_secs_f64()
        })
        .collect();
    assert!((rates[1] / rates[0] - 2.0).abs() < 0.01, "{rates:?}");
    assert!((rates[2] / rates[0] - 3.0).abs() < 0.01, "{rates:?}");
    // A bigger pool has more capacity: the same load offers more.
    let big = scenario(Scenario::homogeneous(8));
    let c8 = base.at_load(0.8, &big, 1).unwrap();
    let c4 = base.at_load(0.8, &s, 1).unwrap();
    assert!((c8.conversations as f64 / c4.conversations as f64 - 2.0).abs() < 0.01);
    // The perfect-cache mix prefills less than the prompts, but more than nothing.
    let mix = base.mix(&s, 1);
    assert!(
        mix.uncached_tokens < 0.9 * mix.prompt_tokens
            && mix.uncached_tokens > 0.2 * mix.prompt_tokens
    );
    assert!(base.at_load(f64::NAN, &s, 1).is_err());
    assert!(base
        .at_load(0.5, &scenario(Scenario::homogeneous(0)), 1)
        .is_err());
}

fn small_heavy(seed: u64) -> Workload {
    let s = scenario(Scenario::homogeneous(3));
    let cfg = HeavyConfig {
        arrival_window: Duration::from_secs(240),
        ..HeavyConfig::default()
    }
    .at_load(0.5, &s, seed)
    .unwrap();
    Workload::heavy(&cfg, seed, BLOCK)
}

fn run(w: &Workload, policy: Policy, keyless: bool) -> PolicyReport {
    let s = scenario(Scenario::homogeneous(3));
    let o = SimOptions {
        seed: 2,
        keyless,
        ..SimOptions::default()
    };
    let r = simulate(&s, w, policy, &o).unwrap();
    eprintln!(
        "{policy} keyless={keyless}: ttft p50 {:?} p95 {:?}, hit {:.3}, {:?}",
        r.ttft.p50, r.ttft.p95, r.prefix_hit_rate, r.reasons
    );
    assert_eq!(r.requests_completed, r.requests_planned, "{policy}");
    assert_eq!(r.leftover_in_flight, 0);
    r
}

#[test]
fn keyless_requests_reach_the_router_without_keys() {
    let w = small_heavy(1);
    let keyed = run(&w, Policy::BOUNDED, false);
    let keyless = run(&w, Policy::BOUNDED, true);
    // Keyed: affinity places (home or spill); keyless: nothing for affinity to read.
    assert!(keyed.reasons.home > 0);
    assert_eq!(keyless.reasons.home + keyless.reasons.spill, 0);
    assert_eq!(keyless.reasons.least_loaded, keyless.requests_completed);
    assert!(keyless.prefix_hit_rate < keyed.prefix_hit_rate);
}

#[test]
fn cache_aware_finds_the_cache_without_keys() {
    let w = small_heavy(2);
    let keyed = run(&w, Policy::CACHE_AWARE, false);
    let keyless = run(&w, Policy::CACHE_AWARE, true);
    // It reads only the prompt: keys change nothing.
    assert_eq!(keyed, keyless);
    let rr = run(&w, Policy::RoundRobin, true);
    assert!(
        keyless.prefix_hit_rate > rr.prefix_hit_rate + 0.05,
        "cache-aware {:.3} vs round-robin {:.3}",
        keyless.prefix_hit_rate,
        rr.prefix_hit_rate
    );
    assert!(keyless.reasons.home > 0 && keyless.reasons.least_loaded > 0);
}

#[test]
fn trace_round_trips_and_names_shared_prefixes() {
    let cfg = HeavyConfig {
        conversations: 200,
        ..HeavyConfig::default()
    };
    let w = Workload::heavy(&cfg, 8, BLOCK);
    let records = w.trace(512).unwrap();
    assert_eq!(records.len(), w.requests());
    assert!(records.windows(2).all(|r| r[0].timestamp <= r[1].timestamp));
    let mut buf = Vec::new();
    write_trace(&mut buf, &records).unwrap();
    let text = String::from_utf8(buf.clone()).unwrap();
    assert_eq!(text.lines().count(), records.len());
    let first: serde_json::Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
    for field in [
        "timestamp",
        "session",
        "turn",
        "input_length",
        "output_length",
        "block_tokens",
        "hash_ids",
    ] {
        assert!(first.get(field).is_some(), "missing {field}");
    }
    let back = read_trace(&buf[..]).unwrap();
    assert_eq!(back.len(), records.len());
    for (a, b) in back.iter().zip(&records) {
        // serde_json parses floats to within an ulp or so; everything else is exact.
        assert!(
            (a.timestamp - b.timestamp).abs() < 1e-6,
            "{} vs {}",
            a.timestamp,
            b.timestamp
        );
        let (mut a, mut b) = (a.clone(), b.clone());
        a.timestamp = 0.0;
        b.timestamp = 0.0;
        assert_eq!(a, b);
    }

    // A follow-up turn starts with its previous turn's full blocks.
    let mut by_session: HashMap<&str, Vec<&_>> = HashMap::new();
    for r in &records {
        assert_eq!(r.hash_ids.len() as u32, r.input_length.div_ceil(512));
        by_session.entry(r.session.as_str()).or_default().push(r);
    }
    let mut follow_ups = 0;
    for turns in by_session.values() {
        for t in turns.windows(2) {
            let full = (t[0].input_length / 512) as usize;
            assert_eq!(t[0].hash_ids[..full], t[1].hash_ids[..full]);
            assert_eq!(t[1].turn, t[0].turn + 1);
            follow_ups += 1;
        }
    }
    assert!(follow_ups > 50);
    // Partial last blocks are never shared; the system prompts' leading blocks are.
    let mut seen: HashSet<u64> = HashSet::new();
    let mut shared_first = 0;
    for r in records
        .iter()
        .filter(|r| r.turn == 0 && r.input_length >= 1024)
    {
        if !seen.insert(r.hash_ids[0]) {
            shared_first += 1;
        }
    }
    assert!(shared_first > 10);

    // Bad input is a typed error, not a panic.
    assert!(matches!(
        w.trace(100),
        Err(TraceError::BlockTokens {
            export: 100,
            workload: 64
        })
    ));
    assert!(matches!(
        read_trace(&b"{\"timestamp\": 1}\n"[..]),
        Err(TraceError::Json { line: 1, .. })
    ));
}

#[test]
fn perfect_cache_counts_follow_ups_as_mostly_cached() {
    let w = Workload::heavy(
        &HeavyConfig {
            conversations: 300,
            ..HeavyConfig::default()
        },
        9,
        BLOCK,
    );
    let mix = WorkMix::perfect_cache(&w);
    // Without follow-ups only system prompts are shared: more is uncached.
    let singles = Workload::heavy(
        &HeavyConfig {
            conversations: 300,
            follow_up_probability: 0.0,
            ..HeavyConfig::default()
        },
        9,
        BLOCK,
    );
    let single_mix = WorkMix::perfect_cache(&singles);
    assert_eq!(single_mix.turns_per_session, 1.0);
    assert!(
        mix.uncached_tokens / mix.prompt_tokens
            < single_mix.uncached_tokens / single_mix.prompt_tokens
    );
}
