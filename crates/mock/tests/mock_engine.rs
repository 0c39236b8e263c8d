//! The mock engine, driven alone in virtual time, shows the effects routing depends on.

use std::time::Duration;

use proptest::prelude::*;
use replica_router_mock::{
    chat_tokens, FinishReason, MockConfig, MockEngine, MockError, MockEvent, MockPrompt,
    MockRequest, MockUsage,
};
use tokio::time::Instant;
use tower::{Service, ServiceExt};

fn tokens(seed: u32, n: u32) -> Vec<u32> {
    (0..n)
        .map(|i| seed.wrapping_mul(1_000_003).wrapping_add(i))
        .collect()
}

async fn run(engine: &MockEngine, prompt: Vec<u32>, max_tokens: u32) -> MockUsage {
    let req = MockRequest::new(MockPrompt::Tokens(prompt), max_tokens);
    engine
        .clone()
        .oneshot(req)
        .await
        .expect("accepted")
        .finish()
        .await
        .expect("finished")
}

#[tokio::test(start_paused = true)]
async fn returning_session_is_faster_on_the_replica_that_served_it() {
    let home = MockEngine::new(MockConfig::default());
    let cold = MockEngine::new(MockConfig::default());
    let turn1 = tokens(7, 4000);
    let first = run(&home, turn1.clone(), 50).await;
    assert_eq!(first.cached_tokens, 0);

    let mut turn2 = turn1.clone();
    turn2.extend(tokens(8, 500));
    let warm = run(&home, turn2.clone(), 50).await;
    let replay = run(&cold, turn2, 50).await;

    // Every full block of turn 1 is a hit at home; nothing is on the cold replica.
    assert_eq!(warm.cached_tokens, 4000);
    assert_eq!(replay.cached_tokens, 0);
    assert!(
        warm.ttft < replay.ttft,
        "warm {:?} vs replay {:?}",
        warm.ttft,
        replay.ttft
    );
    // Prefill is proportional to the uncached tokens: 500 vs 4500 tokens at 10k tok/s, plus one 25 ms step.
    assert_eq!(warm.ttft, Duration::from_millis(75));
    assert_eq!(replay.ttft, Duration::from_millis(475));

    let s = home.stats();
    assert_eq!(s.prefix_queries, 8500);
    assert_eq!(s.prefix_hits, 4000);
    assert_eq!(cold.stats().prefix_hits, 0);
}

#[tokio::test(start_paused = true)]
async fn chat_turns_share_blocks() {
    let engine = MockEngine::new(MockConfig::default());
    let sys = "You are a helpful assistant. ".repeat(40);
    let t1 = chat_tokens([
        ("system", sys.as_str()),
        ("user", "explain data parallel inference"),
    ]);
    let t2 = chat_tokens([
        ("system", sys.as_str()),
        ("user", "explain data parallel inference"),
        ("assistant", "replicas serve different requests"),
        ("user", "and tensor parallel?"),
    ]);
    run(&engine, t1.clone(), 4).await;
    let u = run(&engine, t2, 4).await;
    assert_eq!(u.cached_tokens as usize, t1.len() / 16 * 16);
}

#[tokio::test(start_paused = true)]
async fn lru_evicts_old_sessions() {
    let cfg = MockConfig {
        kv_capacity_tokens: Some(1024),
        ..MockConfig::default()
    };
    let engine = MockEngine::new(cfg);
    let a = tokens(1, 512);
    run(&engine, a.clone(), 1).await;
    assert_eq!(run(&engine, a.clone(), 1).await.cached_tokens, 511);
    // Two other sessions of 512 tokens push `a` out of a 1024-token cache.
    run(&engine, tokens(2, 512), 1).await;
    run(&engine, tokens(3, 512), 1).await;
    assert_eq!(run(&engine, a, 1).await.cached_tokens, 0);
}

/// Completes `n` identical requests submitted at once; returns (requests per second, usages).
async fn burst(cfg: &MockConfig, n: usize) -> (f64, Vec<MockUsage>) {
    let engine = MockEngine::new(cfg.clone());
    let start = Instant::now();
    let mut handles = Vec::new();
    for i in 0..n {
        let resp = engine
            .submit(MockRequest::new(
                MockPrompt::Tokens(tokens(i as u32 + 100, 64)),
                100,
            ))
            .unwrap();
        handles.push(tokio::spawn(resp.finish()));
    }
    let mut usages = Vec::new();
    for h in handles {
        usages.push(h.await.unwrap().unwrap());
    }
    (n as f64 / start.elapsed().as_secs_f64(), usages)
}

#[tokio::test(start_paused = true)]
async fn throughput_saturates_at_max_num_seqs_and_queues_beyond() {
    let cfg = MockConfig {
        max_num_seqs: 8,
        ..MockConfig::default()
    };
    let (rps1, _) = burst(&cfg, 1).await;
    let (rps4, _) = burst(&cfg, 4).await;
    let (rps8, at8) = burst(&cfg, 8).await;
    let (rps16, at16) = burst(&cfg, 16).await;
    let (rps32, at32) = burst(&cfg, 32).await;
    // Batching: throughput grows almost linearly up to the batch limit...
    assert!(rps4 > 3.5 * rps1, "{rps4} vs {rps1}");
    assert!(rps8 > 7.0 * rps1, "{rps8} vs {rps1}");
    // ...and stops growing beyond it.
    assert!(
        rps16 < 1.05 * rps8 && rps32 < 1.05 * rps8,
        "{rps8} {rps16} {rps32}"
    );
    // Nobody waits up to the limit; beyond it, the excess waits in FIFO order.
    assert!(at8.iter().all(|u| u.queued == Duration::ZERO));
    assert_eq!(at16.iter().filter(|u| u.queued > Duration::ZERO).count(), 8);
    assert_eq!(
        at32.iter().filter(|u| u.queued > Duration::ZERO).count(),
        24
    );
    let q: Vec<Duration> = at32.iter().map(|u| u.queued).collect();
    assert!(q.windows(2).all(|w| w[0] <= w[1]), "FIFO: {q:?}");
}

#[tokio::test(start_paused = true)]
async fn stats_show_running_and_waiting() {
    let cfg = MockConfig {
        max_num_seqs: 4,
        ..MockConfig::default()
    };
    let engine = MockEngine::new(cfg);
    let mut held = Vec::new();
    for i in 0..10 {
        held.push(
            engine
                .submit(MockRequest::new(MockPrompt::Tokens(tokens(i, 32)), 1000))
                .unwrap(),
        );
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let s = engine.stats();
    assert_eq!((s.running, s.waiting), (4, 6));
    assert!(s.kv_usage > 0.0 && s.kv_usage < 1.0);
    // Dropping responses cancels the requests: the batch drains.
    drop(held);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let s = engine.stats();
    assert_eq!((s.running, s.waiting), (0, 0));
    assert_eq!(s.kv_usage, 0.0);
}

#[tokio::test(start_paused = true)]
async fn streaming_future_resolves_at_the_first_token() {
    let mut engine = MockEngine::new(MockConfig::default());
    let start = Instant::now();
    let req = MockRequest::new(MockPrompt::Tokens(tokens(1, 1000)), 20).streamed();
    let mut resp = engine.ready().await.unwrap().call(req).await.unwrap();
    let at_head = start.elapsed();
    assert_eq!(at_head, Duration::from_millis(125));
    let mut n = 0;
    let usage = loop {
        match resp.next_event().await.unwrap() {
            MockEvent::Token { index, .. } => {
                assert_eq!(index, n);
                n += 1;
            }
            MockEvent::Done(u) => break u,
        }
    };
    assert_eq!(n, 20);
    assert_eq!(usage.ttft, at_head);
    assert_eq!(usage.finish_reason, FinishReason::Length);
    // 19 more decode steps of 25 ms at batch 1.
    assert_eq!(usage.e2e, at_head + Duration::from_millis(19 * 25));
}

#[tokio::test(start_paused = true)]
async fn tensor_parallelism_speeds_compute() {
    let tp2 = run(&MockEngine::new(MockConfig::default()), tokens(1, 8000), 10).await;
    let tp4 = run(
        &MockEngine::new(MockConfig {
            tp: 4,
            ..MockConfig::default()
        }),
        tokens(1, 8000),
        10,
    )
    .await;
    assert!(tp4.ttft < tp2.ttft && tp4.e2e < tp2.e2e);
}

#[tokio::test(start_paused = true)]
async fn bad_requests_are_typed_errors() {
    let engine = MockEngine::new(MockConfig {
        max_model_len: 100,
        ..MockConfig::default()
    });
    let e = engine
        .submit(MockRequest::new(MockPrompt::Tokens(vec![]), 1))
        .unwrap_err();
    assert!(matches!(e, MockError::InvalidRequest(_)));
    let e = engine
        .submit(MockRequest::new(MockPrompt::Tokens(vec![1]), 0))
        .unwrap_err();
    assert!(matches!(e, MockError::InvalidRequest(_)));
    let e = engine
        .submit(MockRequest::new(MockPrompt::Tokens(vec![1; 90]), 20))
        .unwrap_err();
    assert!(matches!(e, MockError::PromptTooLong { .. }));
    // Block hashes beyond the prompt length are ignored, not trusted.
    let req = MockRequest::new(
        MockPrompt::Blocks {
            block_hashes: vec![1, 2, 3, 4, 5, 6, 7, 8],
            prompt_tokens: 40,
        },
        1,
    );
    assert_eq!(
        engine
            .clone()
            .oneshot(req)
            .await
            .unwrap()
            .finish()
            .await
            .unwrap()
            .prompt_tokens,
        40
    );
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// Any mix of requests, some cancelled, finishes with exact token counts and empty queues.
    #[test]
    fn every_request_finishes_and_counters_return_to_zero(
        reqs in proptest::collection::vec((1u32..3000, 1u32..40, 0u32..4, any::<bool>()), 1..40),
        max_num_seqs in 1usize..12,
    ) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_time().start_paused(true).build().unwrap();
        rt.block_on(async move {
            let engine = MockEngine::new(MockConfig { max_num_seqs, kv_capacity_tokens: Some(20_000), ..MockConfig::default() });
            let mut done = Vec::new();
            let mut cancelled = Vec::new();
            for (i, &(prompt, out, session, cancel)) in reqs.iter().enumerate() {
                let mut t = tokens(session, prompt);
                t.push(i as u32);
                let resp = engine.submit(MockRequest::new(MockPrompt::Tokens(t), out)).unwrap();
                if cancel { cancelled.push(resp) } else { done.push((out, tokio::spawn(resp.finish()))) }
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
            drop(cancelled);
            for (out, h) in done {
                let u = h.await.unwrap().unwrap();
                assert_eq!(u.completion_tokens, out);
                assert!(u.cached_tokens < u.prompt_tokens);
                assert!(u.queued <= u.ttft && u.ttft <= u.e2e);
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
            let s = engine.stats();
            assert_eq!((s.running, s.waiting), (0, 0));
            assert!(s.prefix_hits <= s.prefix_queries);
        });
    }
}
