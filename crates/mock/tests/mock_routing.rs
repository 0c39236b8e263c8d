//! The crate's stack routing over in-process mock engines, in virtual time: session affinity keeps
//! multi-turn conversations on the replica that holds their prefix cache; round-robin replays them.

use std::time::Duration;

use replica_router::affinity::AffinityLayer;
use replica_router::balance::{LeastInFlightLayer, RoundRobinLayer};
use replica_router::context::RouteContext;
use replica_router::decision::DecisionReason;
use replica_router::dispatch::Dispatch;
use replica_router::error::RouteError;
use replica_router::pool::Pool;
use replica_router::replica::ReplicaSpec;
use replica_router::rng::RngSeed;
use replica_router_mock::{MockConfig, MockEngine, MockPrompt, MockRequest, RoutedResponse};
use tower::util::BoxCloneService;
use tower::{ServiceBuilder, ServiceExt};

type Svc = BoxCloneService<MockRequest, RoutedResponse, RouteError>;

fn pool(n: usize) -> (Pool<MockEngine>, Vec<MockEngine>) {
    let engines: Vec<MockEngine> = (0..n)
        .map(|_| MockEngine::new(MockConfig::default()))
        .collect();
    let mut b = Pool::builder();
    for (i, e) in engines.iter().enumerate() {
        b = b.replica(
            format!("gpu-{i}"),
            ReplicaSpec::new("llama-3-70b").tensor_parallel(2),
            e.clone(),
        );
    }
    (b.build().unwrap(), engines)
}

#[derive(Debug, Default)]
struct Outcome {
    returning_ttft: Vec<Duration>,
    homes: usize,
    returning_turns: usize,
    hits: u64,
    queries: u64,
}

/// 24 conversations of 4 turns each: a 3000-token system prompt of their own, 200 new tokens per
/// turn, 40 output tokens, 2 s of think time between turns, starting 100 ms apart.
async fn run(svc: Svc, engines: &[MockEngine]) -> Outcome {
    let mut tasks = Vec::new();
    for s in 0..24u32 {
        let svc = svc.clone();
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(100 * u64::from(s))).await;
            let mut tokens: Vec<u32> = (0..3000).map(|i| s * 1_000_000 + i).collect();
            let mut out = Vec::new();
            for turn in 0..4u32 {
                tokens.extend((0..200).map(|i| s * 1_000_000 + 500_000 + turn * 1000 + i));
                let ctx = RouteContext {
                    estimated_tokens: tokens.len() as u64 + 40,
                    ..RouteContext::with_session(format!("conv-{s}"))
                };
                let req =
                    MockRequest::new(MockPrompt::Tokens(tokens.clone()), 40).with_context(ctx);
                let resp = svc.clone().oneshot(req).await.expect("routed");
                let reason = resp.decision().expect("decided").reason();
                let usage = resp.finish().await.expect("finished");
                out.push((turn, reason, usage.ttft));
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
            out
        }));
    }
    let mut o = Outcome::default();
    for t in tasks {
        for (turn, reason, ttft) in t.await.unwrap() {
            if turn > 0 {
                o.returning_turns += 1;
                o.returning_ttft.push(ttft);
                o.homes += usize::from(reason == DecisionReason::Home);
            }
        }
    }
    for e in engines {
        let st = e.stats();
        o.hits += st.prefix_hits;
        o.queries += st.prefix_queries;
        assert_eq!((st.running, st.waiting), (0, 0));
    }
    o
}

fn mean(v: &[Duration]) -> Duration {
    v.iter().sum::<Duration>() / v.len() as u32
}

#[tokio::test(start_paused = true)]
async fn affinity_keeps_conversations_on_their_cache_and_beats_round_robin() {
    let (p, engines) = pool(3);
    let affinity: Svc = BoxCloneService::new(
        ServiceBuilder::new()
            .layer(AffinityLayer::new(p.clone()))
            .layer(LeastInFlightLayer::new(p.clone()).seed(RngSeed::fixed(7)))
            .service(Dispatch::with_seed(p.clone(), RngSeed::fixed(8))),
    );
    let sticky = run(affinity, &engines).await;
    for r in p.snapshot().replicas() {
        assert_eq!(r.state().in_flight(), 0);
    }

    let (p, engines) = pool(3);
    let rotate: Svc = BoxCloneService::new(
        ServiceBuilder::new()
            .layer(RoundRobinLayer::new(p.clone()))
            .service(Dispatch::with_seed(p.clone(), RngSeed::fixed(8))),
    );
    let rr = run(rotate, &engines).await;

    // Every returning turn went home and found its whole history cached.
    assert_eq!(sticky.homes, sticky.returning_turns);
    let hit_rate = |o: &Outcome| o.hits as f64 / o.queries as f64;
    assert!(
        hit_rate(&sticky) > 0.7,
        "affinity hit rate {}",
        hit_rate(&sticky)
    );
    assert!(
        hit_rate(&sticky) > hit_rate(&rr) + 0.2,
        "affinity {} vs round-robin {}",
        hit_rate(&sticky),
        hit_rate(&rr)
    );
    // So returning turns start answering sooner: no 3000+ token prefill replay.
    let (a, b) = (mean(&sticky.returning_ttft), mean(&rr.returning_ttft));
    eprintln!(
        "prefix-cache hit rate: affinity {:.3}, round-robin {:.3}; mean TTFT of returning turns: affinity {a:?}, round-robin {b:?}",
        hit_rate(&sticky),
        hit_rate(&rr)
    );
    assert!(
        a * 2 < b,
        "mean TTFT of returning turns: affinity {a:?}, round-robin {b:?}"
    );
}
