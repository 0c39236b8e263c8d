//! Affinity over the real Redis pin table: two gateways (separate pools, layers and Redis
//! clients, as two processes would have) share one redis-server, so a session spilled by one is
//! found where it was placed by the other; with Redis down, placement falls back to the ring.
#![cfg(feature = "redis")]

mod common;
#[macro_use]
mod support;

use std::sync::Arc;
use std::time::Duration;

use common::{scripted_pool_of, ChunkBody, ScriptedBackend};
use metrics_util::debugging::{DebugValue, DebuggingRecorder};
use replica_router::affinity::{AffinityLayer, PIN_ERRORS_COUNTER};
use replica_router::balance::LeastInFlightLayer;
use replica_router::context::RouteContextLayer;
use replica_router::decision::{Decision, DecisionReason};
use replica_router::dispatch::Dispatch;
use replica_router::error::RouteError;
use replica_router::inflight::TrackedBody;
use replica_router::pick::ring::{key_hash, Ring};
use replica_router::pins::RedisPinTable;
use replica_router::pool::Pool;
use replica_router::quota::FailurePolicy;
use replica_router::store::{RedisStore, RedisStoreConfig};
use tower::util::BoxCloneService;
use tower::{Service, ServiceBuilder, ServiceExt};

type Resp = http::Response<TrackedBody<ChunkBody>>;
type Gateway = BoxCloneService<http::Request<()>, Resp, RouteError>;

async fn pins(server: &support::RedisServer, policy: FailurePolicy) -> Arc<RedisPinTable> {
    let store = RedisStore::connect_with(
        &server.url(),
        RedisStoreConfig::default().timeout(Duration::from_millis(300)),
    )
    .await
    .expect("connect");
    // No near-cache freshness: these tests check what every gateway reads from Redis at once
    // (tests/pins_redis.rs covers the near-cache and the breaker).
    Arc::new(
        RedisPinTable::new(&store)
            .failure_policy(policy)
            .near_cache(1024, Duration::ZERO),
    )
}

fn gateway(pool: &Pool<ScriptedBackend>, layer: AffinityLayer<ScriptedBackend>) -> Gateway {
    BoxCloneService::new(
        ServiceBuilder::new()
            .layer(RouteContextLayer::default())
            .layer(layer)
            .layer(LeastInFlightLayer::new(pool.clone()))
            .service(Dispatch::new(pool.clone())),
    )
}

async fn send(gw: &mut Gateway, session: &str) -> Resp {
    let req = http::Request::builder()
        .header("x-session-id", session)
        .body(())
        .unwrap();
    gw.ready().await.unwrap().call(req).await.unwrap()
}

fn decision(resp: &Resp) -> (String, DecisionReason) {
    let d = resp.extensions().get::<Decision>().unwrap();
    (d.replica().to_string(), d.reason())
}

fn key_homed_at(pool: &Pool<ScriptedBackend>, replica: &str, prefix: &str) -> String {
    let snap = pool.snapshot();
    let ring = Ring::from_snapshot(&snap, 160);
    (0..100_000)
        .map(|i| format!("{prefix}-{i}"))
        .find(|k| {
            snap.replicas()[ring.home(key_hash(k.as_bytes())).unwrap()]
                .id()
                .as_str()
                == replica
        })
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateways_share_spills_through_redis() {
    let server = redis_or_skip!();
    let p1 = scripted_pool_of(&["a", "b"]);
    let p2 = scripted_pool_of(&["b", "a"]);
    let l1 = AffinityLayer::builder(p1.clone())
        .pin_table(pins(&server, FailurePolicy::Closed).await)
        .build()
        .unwrap();
    let l2 = AffinityLayer::builder(p2.clone())
        .pin_table(pins(&server, FailurePolicy::Closed).await)
        .build()
        .unwrap();
    let (mut g1, mut g2) = (gateway(&p1, l1), gateway(&p2, l2));
    let keys: Vec<String> = (0..3)
        .map(|i| key_homed_at(&p1, "a", &format!("r{i}")))
        .collect();
    // Two in flight on a through gateway 1: the third session homed at a spills to b.
    let r1 = send(&mut g1, &keys[0]).await;
    let r2 = send(&mut g1, &keys[1]).await;
    let r3 = send(&mut g1, &keys[2]).await;
    assert_eq!(decision(&r3), ("b".into(), DecisionReason::Spill));
    drop((r1, r2, r3));
    // Gateway 2 sees no load, yet follows the pins gateway 1 wrote.
    assert_eq!(
        decision(&send(&mut g2, &keys[2]).await),
        ("b".into(), DecisionReason::Home)
    );
    assert_eq!(
        decision(&send(&mut g2, &keys[0]).await),
        ("a".into(), DecisionReason::Home)
    );
    // A failover decided by gateway 2 is followed by gateway 1.
    p2.eject("a").unwrap();
    assert_eq!(
        decision(&send(&mut g2, &keys[0]).await),
        ("b".into(), DecisionReason::Failover)
    );
    assert_eq!(
        decision(&send(&mut g1, &keys[0]).await),
        ("b".into(), DecisionReason::Home)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_falls_back_to_the_ring() {
    let mut server = redis_or_skip!();
    let pool = scripted_pool_of(&["a", "b", "c"]);
    let table = pins(&server, FailurePolicy::Closed).await;
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let layer = metrics::with_local_recorder(&recorder, || {
        AffinityLayer::builder(pool.clone())
            .pin_table(table)
            .build()
            .unwrap()
    });
    let mut gw = gateway(&pool, layer);
    let k = key_homed_at(&pool, "c", "down");
    assert_eq!(
        decision(&send(&mut gw, &k).await),
        ("c".into(), DecisionReason::Home)
    );
    server.stop();
    for _ in 0..3 {
        assert_eq!(
            decision(&send(&mut gw, &k).await),
            ("c".into(), DecisionReason::Home)
        );
    }
    let errors: u64 = snapshotter
        .snapshot()
        .into_vec()
        .into_iter()
        .filter(|(key, ..)| key.key().name() == PIN_ERRORS_COUNTER)
        .map(|(.., v)| match v {
            DebugValue::Counter(n) => n,
            _ => 0,
        })
        .sum();
    assert_eq!(
        errors, 3,
        "one failed lookup per request (no write after a failed lookup)"
    );
}
