//! The trace replay harness (`examples/replay`): prompt synthesis against the mock's tokenizer,
//! trace and metrics parsing, and a replay of the committed multi-turn fixture through the gateway in
//! front of two HTTP mock replicas on loopback.

#[allow(dead_code)]
#[path = "../../../examples/replay/replay.rs"]
mod replay;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use proptest::prelude::*;
use replay::{ReplayConfig, SessionSource, TraceEntry, TEMPLATE_TOKENS};
use replica_router_gateway::{Gateway, GatewayConfig};
use replica_router_mock::{chat_tokens, MockConfig, MockEngine, MockServer};

const FIXTURE: &str = include_str!("../../../tests/fixtures/replay_trace.jsonl");

fn entry(index: usize, input_length: u32, block_tokens: u32, hash_ids: Vec<u64>) -> TraceEntry {
    TraceEntry {
        index,
        timestamp_ms: 0.0,
        session: None,
        turn: None,
        input_length,
        output_length: 1,
        block_tokens,
        hash_ids,
    }
}

fn mock_prompt_tokens(e: &TraceEntry) -> Vec<u32> {
    chat_tokens([("user", replay::prompt_text(e).as_str())])
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// The rendered prompt has exactly `input_length` tokens for the mock (or the one-word minimum).
    #[test]
    fn prompt_has_the_trace_length(
        input in 0u32..3000,
        block in 1u32..600,
        ids in proptest::collection::vec(any::<u64>(), 0..8),
    ) {
        let e = entry(3, input, block, ids);
        prop_assert_eq!(mock_prompt_tokens(&e).len() as u32, input.max(TEMPLATE_TOKENS + 1));
    }

    /// Two entries share a token prefix exactly as long as their shared hash-id prefix (in full
    /// blocks), and no longer when the next ids differ.
    #[test]
    fn shared_hash_prefix_is_a_shared_token_prefix(
        common in proptest::collection::vec(0u64..1000, 0..5),
        tail_a in 1000u64..2000,
        tail_b in 2000u64..3000,
        block in 1u32..64,
    ) {
        let mut a_ids = common.clone();
        a_ids.push(tail_a);
        let mut b_ids = common.clone();
        b_ids.push(tail_b);
        let len = (a_ids.len() as u32) * block + TEMPLATE_TOKENS;
        let (a, b) = (entry(0, len, block, a_ids), entry(1, len, block, b_ids));
        let (ta, tb) = (mock_prompt_tokens(&a), mock_prompt_tokens(&b));
        let shared = ta.iter().zip(&tb).take_while(|(x, y)| x == y).count();
        // The message head (2 tokens) comes first; then `common.len()` equal blocks.
        let expected = 2 + common.len() * block as usize;
        // The first words of the differing blocks may collide by chance (26^4 words); allow that
        // but never less sharing than the common blocks.
        prop_assert!(shared >= expected, "shared {} < {}", shared, expected);
        prop_assert!(shared < ta.len());
        // The same entry renders the same text every time (deterministic).
        prop_assert_eq!(replay::prompt_text(&a), replay::prompt_text(&a.clone()));
    }
}

#[test]
fn fixture_is_a_multi_turn_trace_with_shared_prefixes() {
    let entries = replay::parse_trace(FIXTURE).unwrap();
    assert!(entries.len() >= 200, "{} entries", entries.len());
    let mut turns: HashMap<&str, Vec<&TraceEntry>> = HashMap::new();
    for e in &entries {
        turns
            .entry(e.session.as_deref().unwrap())
            .or_default()
            .push(e);
        let blocks = e.input_length.div_ceil(e.block_tokens) as usize;
        assert_eq!(e.hash_ids.len(), blocks, "line {}", e.index + 1);
    }
    assert!(turns.values().all(|t| t.len() >= 2));
    // Each later turn starts with the earlier turn's full blocks.
    for t in turns.values() {
        for w in t.windows(2) {
            let full = (w[0].input_length / w[0].block_tokens) as usize;
            assert_eq!(w[1].hash_ids[..full], w[0].hash_ids[..full]);
        }
    }
}

#[test]
fn trace_errors_name_the_line() {
    let ok = r#"{"timestamp": 5, "input_length": 10, "output_length": 2, "hash_ids": [1]}"#;
    let parsed = replay::parse_trace(&format!("{ok}\n\n{ok}\n")).unwrap();
    assert_eq!(parsed.len(), 2);
    assert_eq!(parsed[1].index, 1);
    assert_eq!(parsed[0].block_tokens, replay::DEFAULT_BLOCK_TOKENS);
    let numeric_session = r#"{"timestamp": 1.5, "session": 7, "turn": 2, "input_length": 1, "output_length": 1, "block_tokens": 16, "hash_ids": []}"#;
    let p = replay::parse_trace(numeric_session).unwrap();
    assert_eq!(
        (p[0].session.as_deref(), p[0].turn, p[0].block_tokens),
        (Some("7"), Some(2), 16)
    );
    for (bad, what) in [
        ("not json", "not JSON"),
        ("[1]", "object"),
        (
            r#"{"input_length": 1, "output_length": 1, "hash_ids": []}"#,
            "timestamp",
        ),
        (
            r#"{"timestamp": -1, "input_length": 1, "output_length": 1, "hash_ids": []}"#,
            "timestamp",
        ),
        (
            r#"{"timestamp": 0, "input_length": -3, "output_length": 1, "hash_ids": []}"#,
            "input_length",
        ),
        (
            r#"{"timestamp": 0, "input_length": 99999999999, "output_length": 1, "hash_ids": []}"#,
            "too large",
        ),
        (
            r#"{"timestamp": 0, "input_length": 1, "output_length": 1, "hash_ids": ["a"]}"#,
            "hash_ids",
        ),
        (
            r#"{"timestamp": 0, "input_length": 1, "output_length": 1, "hash_ids": [], "block_tokens": 0}"#,
            "block_tokens",
        ),
        (
            r#"{"timestamp": 0, "input_length": 1, "output_length": 1, "hash_ids": [], "session": []}"#,
            "session",
        ),
    ] {
        let err = replay::parse_trace(&format!("{ok}\n{bad}")).unwrap_err();
        assert_eq!(err.line, 2, "{bad}");
        assert!(err.message.contains(what), "{bad}: {err}");
    }
}

#[test]
fn cache_counters_from_vllm_text_and_openmetrics() {
    for text in [
        include_str!("../../../tests/fixtures/vllm_metrics.txt"),
        include_str!("../../../tests/fixtures/vllm_metrics.openmetrics.txt"),
    ] {
        let c = replay::parse_cache_counters(text);
        assert!(c.has_cache_counters);
        assert_eq!((c.queries, c.hits), (4000.0, 1000.0));
    }
    // Old and new names both present: the new one is used, not the sum.
    let both = "vllm:prefix_cache_hits_total{a=\"x} y\"} 3\nvllm:gpu_prefix_cache_hits_total 100\n\
                vllm:prefix_cache_queries_total 10 1700000000\nvllm:gpu_prefix_cache_queries_total 500\n";
    let c = replay::parse_cache_counters(both);
    assert_eq!((c.queries, c.hits), (10.0, 3.0));
    let old = "vllm:gpu_prefix_cache_hits_total 7\nvllm:gpu_prefix_cache_queries_total 70\n";
    assert_eq!(replay::parse_cache_counters(old).hits, 7.0);
    let none = replay::parse_cache_counters("# nothing\nfoo 1\nvllm:prefix_cache_hits_total{ 3\n");
    assert!(!none.has_cache_counters);
}

#[test]
fn percentiles_are_nearest_rank() {
    let v: Vec<f64> = (1..=20).map(f64::from).collect();
    assert_eq!(replay::percentile(&v, 50.0), Some(10.0));
    assert_eq!(replay::percentile(&v, 95.0), Some(19.0));
    assert_eq!(replay::percentile(&v, 100.0), Some(20.0));
    assert_eq!(replay::percentile(&v, 0.0), Some(1.0));
    assert_eq!(replay::percentile(&[], 50.0), None);
}

async fn replicas(n: usize) -> Vec<MockServer> {
    let mut v = Vec::new();
    for _ in 0..n {
        let cfg = MockConfig {
            time_scale: 100.0,
            ..MockConfig::default()
        };
        v.push(
            MockServer::bind(SocketAddr::from(([127, 0, 0, 1], 0)), MockEngine::new(cfg))
                .await
                .unwrap(),
        );
    }
    v
}

async fn gateway(replicas: &[MockServer], policy: &str) -> Gateway {
    let mut args = vec!["--listen".to_owned(), "127.0.0.1:0".to_owned()];
    for r in replicas {
        args.push("--replica".into());
        args.push(format!("http://{}", r.local_addr()));
    }
    args.extend(["--policy".to_owned(), policy.to_owned()]);
    Gateway::bind(GatewayConfig::from_args(&args).unwrap())
        .await
        .unwrap()
}

fn config(gw: &Gateway, reps: &[MockServer], max: usize) -> ReplayConfig {
    let mut cfg = ReplayConfig::new(format!("http://{}", gw.local_addr()));
    cfg.speed = 25.0;
    cfg.max_requests = Some(max);
    cfg.timeout = Duration::from_secs(20);
    cfg.replica_metrics = reps
        .iter()
        .map(|r| format!("http://{}", r.local_addr()))
        .collect();
    cfg
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyed_multi_turn_replay_through_the_gateway() {
    let reps = replicas(2).await;
    let gw = gateway(&reps, "affinity").await;
    let entries = replay::parse_trace(FIXTURE).unwrap();
    let cfg = config(&gw, &reps, 120);
    let report = replay::replay(&replay::client(), &cfg, &entries)
        .await
        .unwrap();
    let s = &report.summary;
    assert_eq!(s.requests, 120);
    assert_eq!(s.errors, 0, "{:?}", report.results.iter().find(|r| !r.ok()));
    let by_index: HashMap<usize, &TraceEntry> = entries.iter().map(|e| (e.index, e)).collect();
    for r in &report.results {
        let e = by_index[&r.index];
        let ttft = r.ttft_ms.expect("TTFT measured");
        assert!(ttft > 0.0 && ttft <= r.e2e_ms, "{r:?}");
        assert_eq!(r.status, Some(200));
        assert_eq!(r.session, e.session);
        // The synthesized prompt has the trace's length for the engine, and it generated
        // exactly output_length tokens.
        assert_eq!(r.prompt_tokens, Some(u64::from(e.input_length)), "{r:?}");
        assert_eq!(r.completion_tokens, Some(u64::from(e.output_length)));
        assert_eq!(r.content_chunks, u64::from(e.output_length));
    }
    // The replicas' counters agree with the responses' usage, and later turns hit the cache.
    let prompt: f64 = report.replicas.iter().map(|r| r.delta.prompt_tokens).sum();
    assert_eq!(prompt, s.usage_prompt_tokens as f64);
    let hits: f64 = report.replicas.iter().map(|r| r.delta.hits).sum();
    assert_eq!(hits, s.usage_cached_tokens as f64);
    let rate = s
        .metrics_hit_rate
        .expect("hit rate from the replicas' counters");
    assert!(rate > 0.0 && rate < 1.0, "{rate}");
    assert_eq!(s.usage_hit_rate(), Some(rate));
    assert!(s.ttft_ms.p50.unwrap() <= s.ttft_ms.p95.unwrap());
    let json = report.to_json(Some("gw-affinity"));
    assert_eq!(json["summary"]["errors"], 0);
    assert_eq!(json["requests"].as_array().unwrap().len(), 120);
    assert_eq!(json["replicas"].as_array().unwrap().len(), 2);
    assert!(report.summary_text().contains("hit rate"));
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unkeyed_and_failing_replays_are_counted_not_fatal() {
    let reps = replicas(2).await;
    let gw = gateway(&reps, "least-loaded").await;
    let entries = replay::parse_trace(FIXTURE).unwrap();
    let mut cfg = config(&gw, &reps, 30);
    cfg.sessions = SessionSource::Omit;
    let report = replay::replay(&replay::client(), &cfg, &entries)
        .await
        .unwrap();
    assert_eq!(report.summary.errors, 0);
    assert!(report.results.iter().all(|r| r.session.is_none()));

    // A model no replica serves: every request fails with the replicas' 404, and is reported.
    cfg.model = "no-such-model".into();
    cfg.max_requests = Some(5);
    let report = replay::replay(&replay::client(), &cfg, &entries)
        .await
        .unwrap();
    assert_eq!(report.summary.errors, 5);
    assert!(report.results.iter().all(|r| r.status == Some(404)
        && r.ttft_ms.is_none()
        && r.error.as_deref().unwrap().contains("404")));
    assert_eq!(report.summary.ttft_ms.p95, None);

    // Nothing listening at a metrics URL is an error of the run, named.
    cfg.replica_metrics = vec!["http://127.0.0.1:9/".into()];
    let err = replay::replay(&replay::client(), &cfg, &entries)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("127.0.0.1:9"), "{err}");
    cfg.speed = 0.0;
    assert!(replay::replay(&replay::client(), &cfg, &entries)
        .await
        .is_err());
    gw.shutdown().await;
}

#[test]
fn hash_prefix_sessions_group_by_leading_blocks() {
    let mut cfg = ReplayConfig::new("http://127.0.0.1:1");
    cfg.sessions = SessionSource::HashPrefix(2);
    let a = entry(0, 100, 16, vec![1, 2, 3]);
    let b = entry(1, 100, 16, vec![1, 2, 9]);
    let c = entry(2, 100, 16, vec![1, 5, 3]);
    let body = |e: &TraceEntry| replay::request_body(e, "m");
    assert_eq!(body(&a)["max_tokens"], 1);
    assert_eq!(body(&a)["stream"], true);
    assert_eq!(
        replay::session_for(&a, &cfg.sessions),
        replay::session_for(&b, &cfg.sessions)
    );
    assert_ne!(
        replay::session_for(&a, &cfg.sessions),
        replay::session_for(&c, &cfg.sessions)
    );
    assert_eq!(replay::session_for(&a, &SessionSource::Omit), None);
}
