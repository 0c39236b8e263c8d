//! Placement by predicted time to first token: the work model, the prefix index's bounds,
//! hysteresis, and where sessions and keyless requests go.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{hold, request, scripted_pool, Script, ScriptedBackend};
use http_body_util::BodyExt;
use proptest::prelude::*;
use replica_router::affinity::AffinityLayer;
use replica_router::balance::{LeastInFlightLayer, LoadMeasure};
use replica_router::context::RouteContext;
use replica_router::decision::{Decision, DecisionReason};
use replica_router::dispatch::Dispatch;
use replica_router::load::work::{WorkState, MAX_RATE, MIN_RATE};
use replica_router::load::{Placement, WorkPlan};
use replica_router::pool::Pool;
use replica_router::prefix::{PrefixHashes, PrefixIndex, PrefixIndexConfig, MAX_CHECKPOINTS};
use replica_router::replica::ReplicaId;
use replica_router::request::RouteRequest;
use replica_router::rng::RngSeed;
use tower::util::BoxCloneService;
use tower::{Service, ServiceBuilder, ServiceExt};

type Stack = BoxCloneService<
    http::Request<()>,
    http::Response<replica_router::inflight::TrackedBody<common::ChunkBody>>,
    replica_router::error::RouteError,
>;

fn ttft_stack(pool: &Pool<ScriptedBackend>, keyed: bool) -> Stack {
    let placement = Placement::predicted_ttft(Arc::new(PrefixIndex::default()));
    let least = LeastInFlightLayer::new(pool.clone())
        .seed(RngSeed::fixed(7))
        .placement(placement.clone());
    // The backends see the work plan (a `Script::Prefill` engine answers by it).
    let dispatch = Dispatch::new(pool.clone()).extensions_to_backend(true);
    if keyed {
        let affinity = AffinityLayer::builder(pool.clone())
            .measure(LoadMeasure::InFlightTokens)
            .placement(placement)
            .build()
            .unwrap();
        BoxCloneService::new(
            ServiceBuilder::new()
                .layer(affinity)
                .layer(least)
                .service(dispatch),
        )
    } else {
        BoxCloneService::new(ServiceBuilder::new().layer(least).service(dispatch))
    }
}

/// Sends one turn whose prompt is the first `blocks` blocks of `chain`; returns its replica.
async fn turn(stack: &mut Stack, session: Option<&str>, chain: &[u64], blocks: usize) -> String {
    let script = Script::Stream {
        chunks: 1,
        delay_ms: 0,
    };
    turn_with(stack, session, chain, blocks, script).await
}

/// [`turn`] against replicas answering as `script` says.
async fn turn_with(
    stack: &mut Stack,
    session: Option<&str>,
    chain: &[u64],
    blocks: usize,
    script: Script,
) -> String {
    let mut req = request(script);
    let tokens = blocks as u64 * 16;
    req.set_route_context(RouteContext {
        session: session.map(|s| s.to_owned().into()),
        estimated_tokens: tokens + 100,
        prefix: Some(PrefixHashes::from_block_chain(&chain[..blocks], 16, tokens)),
        ..Default::default()
    });
    let resp = stack.ready().await.unwrap().call(req).await.unwrap();
    let id = resp
        .extensions()
        .get::<Decision>()
        .unwrap()
        .replica()
        .to_string();
    let _ = resp.into_body().collect().await;
    id
}

fn chain(seed: u64, n: usize) -> Vec<u64> {
    (0..n as u64).map(|i| seed * 1_000_003 + i).collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Whatever the timing, the learned rate stays finite, positive and within the clamp.
    #[test]
    fn rates_stay_finite_and_positive(
        seed in prop_oneof![Just(f64::NAN), Just(f64::INFINITY), Just(0.0), Just(-5.0), 1.0..1e7f64],
        samples in prop::collection::vec((0u64..10_000_000, 0u64..100_000_000_000), 0..50),
    ) {
        let w = WorkState::new();
        let r = w.rate_or_seed(seed);
        prop_assert!(r.is_finite() && (MIN_RATE..=MAX_RATE).contains(&r), "seed {}", r);
        for (tokens, nanos) in samples {
            w.observe_prefill(tokens, Duration::from_nanos(nanos));
            let r = w.rate().unwrap();
            prop_assert!(r.is_finite() && (MIN_RATE..=MAX_RATE).contains(&r), "rate {}", r);
        }
    }

    /// The cache calibration stays within its range under any reports.
    #[test]
    fn cache_calibration_stays_in_range(reports in prop::collection::vec((any::<u64>(), any::<u64>()), 0..50)) {
        let w = WorkState::new();
        for (p, r) in reports {
            w.observe_cached(p, r);
            let c = w.cache_calibration();
            prop_assert!(c.is_finite() && (0.0..=1.5).contains(&c), "calibration {}", c);
        }
    }

    /// Adversarial prompts (random, huge, repeated, colliding) never grow the index past its
    /// bounds: entries per replica, tokens per replica, and queued touches.
    #[test]
    fn index_memory_is_bounded(
        prompts in prop::collection::vec(
            (0usize..6, prop_oneof![
                prop::collection::vec(any::<u64>(), 0..600),
                prop::collection::vec(0u64..4, 0..600), // collisions and repeats
            ], 1u32..5000, any::<u64>()),
            1..60,
        ),
    ) {
        let config = PrefixIndexConfig { capacity_tokens_per_weight: 50_000, max_entries_per_replica: 300 };
        let index = PrefixIndex::new(config);
        let ids: Vec<ReplicaId> = (0..6).map(|i| ReplicaId::new(format!("r{i}")).unwrap()).collect();
        for (r, hashes, block_tokens, tokens) in prompts {
            let p = PrefixHashes::new(hashes, block_tokens, tokens);
            prop_assert!(p.len() <= MAX_CHECKPOINTS);
            index.record(&ids[r], 1.0, &p);
            let _ = index.lookup(&p);
            let (global, entries, touches) = index.sizes();
            prop_assert!(entries <= 6 * 300, "entries {}", entries);
            prop_assert!(global <= entries);
            prop_assert!(touches <= 6 * (2 * 300 + 1024 + MAX_CHECKPOINTS), "touches {}", touches);
            for id in &ids {
                prop_assert!(index.tokens_held(id) <= 50_000, "tokens {}", index.tokens_held(id));
            }
        }
    }

    /// Under constant background load, a session never changes replica twice: once it has left
    /// home, its new home holds its conversation and every alternative must re-prefill it.
    #[test]
    fn sessions_do_not_flap(
        loads in prop::collection::vec(0u64..300_000, 3),
        start in 20usize..400,
        step in 1usize..60,
    ) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
        rt.block_on(async move {
            let pool = scripted_pool(3);
            let held: Vec<_> = loads
                .iter()
                .enumerate()
                .filter(|(_, &l)| l > 0)
                .map(|(i, &l)| hold(&pool, &format!("r{i}"), l))
                .collect();
            // Let the held requests reach dispatch.
            tokio::task::yield_now().await;
            while pool.snapshot().replicas().iter().map(|r| r.state().in_flight()).sum::<u64>()
                < held.len() as u64
            {
                tokio::task::yield_now().await;
            }
            let mut stack = ttft_stack(&pool, true);
            let c = chain(1, start + 12 * step);
            let mut seen = Vec::new();
            for t in 0..12 {
                seen.push(turn(&mut stack, Some("conv"), &c, start + t * step).await);
            }
            for h in held {
                h.abort();
            }
            let flips = seen.windows(2).filter(|w| w[0] != w[1]).count();
            prop_assert!(flips <= 1, "replicas by turn: {:?}", seen);
            Ok(())
        })?;
    }
}

#[tokio::test]
async fn a_new_session_avoids_the_replica_with_queued_prefill() {
    let pool = scripted_pool(2);
    let h = hold(&pool, "r0", 200_000);
    while pool.snapshot().replicas()[0].state().in_flight() == 0 {
        tokio::task::yield_now().await;
    }
    assert_eq!(
        pool.snapshot().replicas()[0]
            .state()
            .work()
            .prefill_tokens(),
        200_000
    );
    let mut stack = ttft_stack(&pool, true);
    for s in 0..20 {
        let key = format!("conv-{s}");
        let c = chain(s, 200);
        assert_eq!(turn(&mut stack, Some(&key), &c, 200).await, "r1", "{key}");
    }
    h.abort();
}

#[tokio::test(start_paused = true)]
async fn keyless_requests_follow_their_prefix() {
    let pool = scripted_pool(4);
    let mut stack = ttft_stack(&pool, false);
    // Replicas with a fixed cost per request (30 ms) and 40k tokens/s of prefill, so the rates
    // they teach are real; a cache hit is answered sooner than a cold prompt.
    let engine = Script::Prefill {
        overhead_ms: 30,
        tokens_per_s: 40_000,
    };
    // Four conversations without session keys, each replayed in full and growing by turn.
    let chains: Vec<Vec<u64>> = (0..4).map(|s| chain(s + 10, 800)).collect();
    let mut homes = Vec::new();
    for c in &chains {
        homes.push(turn_with(&mut stack, None, c, 100, engine).await);
    }
    for t in 1..12 {
        for (c, home) in chains.iter().zip(&homes) {
            let got = turn_with(&mut stack, None, c, 100 + 50 * t, engine).await;
            assert_eq!(&got, home, "turn {t}");
        }
    }
    // The replicas taught their real speed and fixed cost, cache hits and cold prompts alike.
    for r in pool.snapshot().replicas() {
        let w = r.state().work();
        if w.rate_samples() >= 10 {
            let rate = w.rate().unwrap();
            assert!((30_000.0..50_000.0).contains(&rate), "{}: {rate}", r.id());
            let o = w.overhead().as_secs_f64();
            assert!((0.025..0.035).contains(&o), "{}: {o}", r.id());
        }
    }
}

#[tokio::test]
async fn the_work_plan_is_counted_until_the_first_data_frame() {
    let pool = scripted_pool(1);
    let mut svc = Dispatch::new(pool.clone());
    let mut req = request(Script::Stream {
        chunks: 3,
        delay_ms: 5,
    });
    req.set_decision(Decision::new(
        ReplicaId::new("r0").unwrap(),
        DecisionReason::LeastLoaded,
    ));
    req.extensions_mut().insert(WorkPlan {
        prefill_tokens: 700,
        output_tokens: 30,
        cached_tokens: 0,
    });
    let resp = svc.ready().await.unwrap().call(req).await.unwrap();
    let work = || {
        pool.snapshot().replicas()[0]
            .state()
            .work()
            .prefill_tokens()
    };
    let decode = || pool.snapshot().replicas()[0].state().work().decode_tokens();
    // The head arrived; no data yet: still prefilling (vLLM sends the head first).
    assert_eq!((work(), decode()), (700, 0));
    let mut body = resp.into_body();
    body.frame().await.unwrap().unwrap();
    assert_eq!((work(), decode()), (0, 30));
    while body.frame().await.is_some() {}
    drop(body);
    assert_eq!((work(), decode()), (0, 0));
}

#[tokio::test]
async fn only_streamed_answers_teach_the_prefill_rate() {
    let pool = scripted_pool(1);
    let mut svc = Dispatch::new(pool.clone());
    let send = |script: Script| {
        let mut req = request(script);
        req.set_decision(Decision::new(
            ReplicaId::new("r0").unwrap(),
            DecisionReason::LeastLoaded,
        ));
        req.extensions_mut().insert(WorkPlan {
            prefill_tokens: 2_000,
            output_tokens: 10,
            cached_tokens: 0,
        });
        req
    };
    let work = || {
        let snapshot = pool.snapshot();
        let w = snapshot.replicas()[0].state().work();
        (w.prefill_tokens(), w.decode_tokens(), w.rate_samples())
    };
    // A whole answer sent at once (no event stream): its first data arrives with the last token,
    // so its time says nothing about the prefill. The work still moves and returns to zero.
    for _ in 0..5 {
        let req = send(Script::Slow { delay_ms: 20 });
        let resp = svc.ready().await.unwrap().call(req).await.unwrap();
        resp.into_body().collect().await.unwrap();
        assert_eq!(work(), (0, 0, 0));
    }
    // A streamed answer teaches it.
    let req = send(Script::Prefill {
        overhead_ms: 0,
        tokens_per_s: 100_000,
    });
    let resp = svc.ready().await.unwrap().call(req).await.unwrap();
    resp.into_body().collect().await.unwrap();
    assert_eq!(work(), (0, 0, 1));
}
