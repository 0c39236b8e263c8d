//! The shedding layer's advice in the affinity layer: sessions whose replica is over the wait
//! budget spill or wait, by policy; new sessions avoid replicas over budget.

mod common;

use std::time::Duration;

use common::{request, Script, ScriptedBackend};
use http_body_util::BodyExt;
use replica_router::affinity::AffinityLayer;
use replica_router::backend::LoadReport;
use replica_router::balance::LeastInFlightLayer;
use replica_router::context::RouteContext;
use replica_router::decision::{Decision, DecisionReason};
use replica_router::dispatch::Dispatch;
use replica_router::error::RouteError;
use replica_router::inflight::TrackedBody;
use replica_router::load::{StickyPolicy, WaitEstimator};
use replica_router::pool::Pool;
use replica_router::replica::{ReplicaId, ReplicaSpec};
use replica_router::rng::RngSeed;
use replica_router::shed::ShedLayer;
use tower::{Service, ServiceBuilder, ServiceExt};

type Resp = http::Response<TrackedBody<common::ChunkBody>>;

fn pool() -> Pool<ScriptedBackend> {
    let mut b = Pool::builder();
    for i in 0..3 {
        b = b.replica(
            format!("r{i}"),
            ReplicaSpec::new("m"),
            ScriptedBackend::default(),
        );
    }
    b.build().unwrap()
}

fn gateway(
    pool: &Pool<ScriptedBackend>,
    sticky: StickyPolicy,
) -> impl Service<http::Request<()>, Response = Resp, Error = RouteError> {
    ServiceBuilder::new()
        .layer(
            ShedLayer::new(pool.clone())
                .budget(Duration::from_millis(200))
                // Two slots per replica, 1 s service time: three in flight is 1 s of wait.
                .estimator(
                    WaitEstimator::new()
                        .slots_per_weight(2.0)
                        .default_service_time(Duration::from_secs(1)),
                )
                .sticky(sticky),
        )
        .layer(AffinityLayer::new(pool.clone()))
        .layer(LeastInFlightLayer::new(pool.clone()).seed(RngSeed::fixed(1)))
        .service(Dispatch::with_seed(pool.clone(), RngSeed::fixed(2)))
}

fn session(key: &str) -> http::Request<()> {
    let mut req = request(Script::Stream {
        chunks: 1,
        delay_ms: 0,
    });
    req.extensions_mut()
        .insert(RouteContext::with_session(key.to_string()));
    req
}

fn decision(r: &Resp) -> (String, DecisionReason) {
    let d = r.extensions().get::<Decision>().unwrap();
    (d.replica().to_string(), d.reason())
}

async fn send<S>(svc: &mut S, req: http::Request<()>) -> Result<Resp, RouteError>
where
    S: Service<http::Request<()>, Response = Resp, Error = RouteError>,
{
    svc.ready().await?.call(req).await
}

/// Puts three requests in flight on `id`, straight through dispatch.
async fn load(pool: &Pool<ScriptedBackend>, id: &str) -> Vec<Resp> {
    let mut d = Dispatch::with_seed(pool.clone(), RngSeed::fixed(3));
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut req = request(Script::Stream {
            chunks: 1,
            delay_ms: 0,
        });
        req.extensions_mut().insert(Decision::new(
            ReplicaId::new(id).unwrap(),
            DecisionReason::Home,
        ));
        held.push(d.ready().await.unwrap().call(req).await.unwrap());
    }
    held
}

#[tokio::test(start_paused = true)]
async fn pinned_session_spills_or_waits_by_policy() {
    for (policy, stays) in [
        (StickyPolicy::Spill, false),
        (
            StickyPolicy::Wait {
                max_wait: Duration::from_secs(5),
            },
            true,
        ),
        (
            StickyPolicy::Wait {
                max_wait: Duration::from_millis(500),
            },
            false,
        ),
    ] {
        let pool = pool();
        let mut gw = gateway(&pool, policy);
        let first = send(&mut gw, session("conv-1")).await.unwrap();
        let (home, reason) = decision(&first);
        assert_eq!(reason, DecisionReason::Home);
        let _ = first.into_body().collect().await;

        let held = load(&pool, &home).await;
        let r = send(&mut gw, session("conv-1")).await.unwrap();
        let (to, reason) = decision(&r);
        if stays {
            assert_eq!(
                (to.as_str(), reason),
                (home.as_str(), DecisionReason::Home),
                "{policy:?}"
            );
        } else {
            assert_ne!(to, home, "{policy:?}");
            assert_eq!(reason, DecisionReason::Spill, "{policy:?}");
        }
        drop(r);
        drop(held);
    }
}

#[tokio::test(start_paused = true)]
async fn new_sessions_avoid_a_replica_over_budget() {
    let pool = pool();
    let mut gw = gateway(&pool, StickyPolicy::Spill);
    // r1's engine is saturated by other gateways: this router has nothing in flight there, so
    // bounded loads alone would give it a third of the new sessions.
    pool.snapshot()
        .get("r1")
        .unwrap()
        .1
        .state()
        .set_load_report(LoadReport {
            running: 2,
            waiting: 6,
            kv_usage: Some(0.97),
            observed_at: tokio::time::Instant::now(),
        });
    for i in 0..60 {
        let r = send(&mut gw, session(&format!("new-{i}"))).await.unwrap();
        assert_ne!(decision(&r).0, "r1");
        let _ = r.into_body().collect().await;
    }
}

#[tokio::test(start_paused = true)]
async fn every_replica_over_budget_sheds_before_affinity() {
    let pool = pool();
    let mut gw = gateway(&pool, StickyPolicy::Spill);
    let mut held = Vec::new();
    for id in ["r0", "r1", "r2"] {
        held.extend(load(&pool, id).await);
    }
    let err = send(&mut gw, session("conv-9")).await.unwrap_err();
    assert!(matches!(err, RouteError::Overloaded { .. }), "{err}");
    drop(held);
    let r = send(&mut gw, session("conv-9")).await.unwrap();
    assert_eq!(decision(&r).1, DecisionReason::Home);
}
