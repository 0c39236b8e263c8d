//! Weighted least-in-flight picking: eligibility, weight shares, bad input.

mod common;

use std::collections::HashMap;

use common::{request, Script, ScriptedBackend};
use proptest::prelude::*;
use replica_router::balance::{LeastInFlightLayer, LoadMeasure, RoundRobinLayer};
use replica_router::decision::{Decision, DecisionReason};
use replica_router::dispatch::Dispatch;
use replica_router::error::{NoReplicaReason, RouteError};
use replica_router::pick::pick_two_choices;
use replica_router::pool::{Health, Pool};
use replica_router::replica::{ReplicaSpec, SpecPolicy};
use replica_router::rng::RngSeed;
use tower::{Service, ServiceBuilder, ServiceExt};

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap()
}

#[derive(Debug, Clone, Copy)]
enum Condition {
    Healthy,
    Unhealthy,
    Ejected,
    Draining,
}

fn condition() -> impl Strategy<Value = Condition> {
    prop_oneof![
        3 => Just(Condition::Healthy),
        1 => Just(Condition::Unhealthy),
        1 => Just(Condition::Ejected),
        1 => Just(Condition::Draining),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// An unhealthy, ejected or draining replica is never picked, whatever the weights and the
    /// loads; with none eligible the error is typed.
    #[test]
    fn ineligible_replicas_are_never_picked(
        members in prop::collection::vec((0.1f64..10.0, condition(), 0u64..5), 1..24),
        seed in any::<u64>(),
    ) {
        rt().block_on(async {
            let mut b = Pool::builder().spec_policy(SpecPolicy::Unchecked);
            for (i, (w, _, _)) in members.iter().enumerate() {
                b = b.replica(format!("r{i}"), ReplicaSpec::new("m").capacity_weight(*w), ScriptedBackend::default());
            }
            let pool = b.build().unwrap();
            for (i, (_, c, _)) in members.iter().enumerate() {
                let id = format!("r{i}");
                match c {
                    Condition::Healthy => {}
                    Condition::Unhealthy => pool.set_health(&id, Health::Unhealthy).unwrap(),
                    Condition::Ejected => pool.eject(&id).unwrap(),
                    Condition::Draining => { pool.drain(&id).unwrap(); }
                }
            }
            let eligible: Vec<bool> = members.iter().map(|(_, c, _)| matches!(c, Condition::Healthy)).collect();
            let mut svc = ServiceBuilder::new()
                .layer(LeastInFlightLayer::new(pool.clone()).seed(RngSeed::fixed(seed)))
                .service(Dispatch::with_seed(pool.clone(), RngSeed::fixed(seed)));
            // Hold some responses open to create uneven loads.
            let mut held = Vec::new();
            for n in 0..200 {
                let res = svc.ready().await.unwrap().call(request(Script::Stream { chunks: 1, delay_ms: 0 })).await;
                if eligible.iter().any(|e| *e) {
                    let resp = res.unwrap();
                    let d = resp.extensions().get::<Decision>().unwrap();
                    let idx: usize = d.replica().as_str()[1..].parse().unwrap();
                    prop_assert!(eligible[idx], "picked ineligible {}", d.replica());
                    if n % 3 == 0 { held.push(resp); }
                } else {
                    let is_none_eligible = matches!(res, Err(RouteError::NoReplica { reason: NoReplicaReason::NoneEligible }));
                    prop_assert!(is_none_eligible);
                }
            }
            drop(held);
            for r in pool.snapshot().replicas() {
                prop_assert_eq!(r.state().in_flight(), 0);
            }
            Ok(())
        })?;
    }

    /// At equal load, the share of picks follows the capacity weights.
    #[test]
    fn shares_follow_weights(seed in any::<u64>()) {
        let pool = Pool::builder()
            .spec_policy(SpecPolicy::MixedParallelism)
            .replica("w1", ReplicaSpec::new("m").capacity_weight(1.0), ())
            .replica("w2", ReplicaSpec::new("m").capacity_weight(2.0), ())
            .replica("w4", ReplicaSpec::new("m").capacity_weight(4.0), ())
            .build()
            .unwrap();
        let snap = pool.snapshot();
        let mut rng = RngSeed::fixed(seed).fork();
        let mut counts = [0usize; 3];
        for _ in 0..10_000 {
            counts[pick_two_choices(&snap, LoadMeasure::InFlightRequests, &mut rng).unwrap()] += 1;
        }
        for (i, w) in [1.0, 2.0, 4.0].iter().enumerate() {
            let share = counts[i] as f64 / 10_000.0;
            prop_assert!((share - w / 7.0).abs() < 0.05, "replica {} share {} vs {}", i, share, w / 7.0);
        }
    }
}

/// Under sustained concurrency (requests held open), in-flight load converges to the weights:
/// the heavier replica carries proportionally more open requests.
#[tokio::test]
async fn open_requests_spread_in_proportion_to_weight() {
    let pool = Pool::builder()
        .spec_policy(SpecPolicy::MixedParallelism)
        .replica(
            "tp2",
            ReplicaSpec::new("m").capacity_weight(1.0),
            ScriptedBackend::default(),
        )
        .replica(
            "tp4",
            ReplicaSpec::new("m").capacity_weight(2.0),
            ScriptedBackend::default(),
        )
        .build()
        .unwrap();
    let mut svc = ServiceBuilder::new()
        .layer(LeastInFlightLayer::new(pool.clone()).seed(RngSeed::fixed(7)))
        .service(Dispatch::new(pool.clone()));
    let mut held = Vec::new();
    for _ in 0..300 {
        let resp = svc
            .ready()
            .await
            .unwrap()
            .call(request(Script::Stream {
                chunks: 1,
                delay_ms: 0,
            }))
            .await
            .unwrap();
        held.push(resp);
    }
    let snap = pool.snapshot();
    let a = snap.replicas()[0].state().in_flight() as f64;
    let b = snap.replicas()[1].state().in_flight() as f64;
    assert_eq!(a + b, 300.0);
    assert!((b / a - 2.0).abs() < 0.1, "tp2={a} tp4={b}");
    drop(held);
    assert_eq!(snap.replicas()[0].state().in_flight(), 0);
    assert_eq!(snap.replicas()[1].state().in_flight(), 0);
}

#[tokio::test]
async fn empty_pool_gives_no_replica() {
    let pool: Pool<ScriptedBackend> = Pool::builder().allow_empty().build().unwrap();
    let mut svc = ServiceBuilder::new()
        .layer(LeastInFlightLayer::new(pool.clone()))
        .service(Dispatch::new(pool.clone()));
    let err = svc
        .ready()
        .await
        .unwrap()
        .call(request(Script::Error))
        .await
        .unwrap_err();
    assert!(matches!(
        err,
        RouteError::NoReplica {
            reason: NoReplicaReason::EmptyPool
        }
    ));
    assert_eq!(err.status_code(), 503);
}

#[tokio::test]
async fn round_robin_rotates_over_eligible_replicas() {
    let pool = Pool::builder()
        .replica("a", ReplicaSpec::new("m"), ScriptedBackend::default())
        .replica("b", ReplicaSpec::new("m"), ScriptedBackend::default())
        .replica("c", ReplicaSpec::new("m"), ScriptedBackend::default())
        .build()
        .unwrap();
    pool.drain("b").unwrap();
    let mut svc = ServiceBuilder::new()
        .layer(RoundRobinLayer::new(pool.clone()))
        .service(Dispatch::new(pool.clone()));
    let mut seen = HashMap::new();
    for _ in 0..10 {
        let resp = svc
            .ready()
            .await
            .unwrap()
            .call(request(Script::Stream {
                chunks: 0,
                delay_ms: 0,
            }))
            .await
            .unwrap();
        let d = resp.extensions().get::<Decision>().unwrap().clone();
        assert_eq!(d.reason(), DecisionReason::RoundRobin);
        *seen.entry(d.replica().to_string()).or_insert(0) += 1;
    }
    assert_eq!(seen.get("a"), Some(&5));
    assert_eq!(seen.get("c"), Some(&5));
    assert_eq!(seen.get("b"), None);
}

/// A decision for a replica that was removed after the pick is redirected, not lost.
#[tokio::test]
async fn dispatch_redirects_when_the_decided_replica_is_gone() {
    let pool = Pool::builder()
        .replica("a", ReplicaSpec::new("m"), ScriptedBackend::default())
        .replica("b", ReplicaSpec::new("m"), ScriptedBackend::default())
        .build()
        .unwrap();
    let mut dispatch = Dispatch::new(pool.clone());
    let mut req = request(Script::Stream {
        chunks: 0,
        delay_ms: 0,
    });
    req.extensions_mut().insert(Decision::new(
        replica_router::replica::ReplicaId::new("a").unwrap(),
        DecisionReason::Home,
    ));
    pool.remove("a").unwrap();
    let resp = dispatch.ready().await.unwrap().call(req).await.unwrap();
    let d = resp.extensions().get::<Decision>().unwrap();
    assert_eq!(d.replica().as_str(), "b");
    assert_eq!(d.reason(), DecisionReason::Redirected);
}
