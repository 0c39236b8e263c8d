//! The affinity layer through the real stack:
//! RouteContextLayer -> AffinityLayer -> LeastInFlightLayer -> Dispatch, in-process backends.

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use common::ScriptedBackend;
use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
use replica_router::affinity::{
    annotate_response, AffinityConfigError, AffinityKey, AffinityLayer, DECISIONS_COUNTER,
    PIN_ERRORS_COUNTER,
};
use replica_router::balance::LeastInFlightLayer;
use replica_router::context::{RouteContext, RouteContextLayer, RouteKey};
use replica_router::decision::{Decision, DecisionReason};
use replica_router::dispatch::Dispatch;
use replica_router::error::{KeyKind, RouteError};
use replica_router::inflight::TrackedBody;
use replica_router::pick::ring::{key_hash, Ring};
use replica_router::pins::{MemoryPinTable, PinError, PinFuture, PinTable};
use replica_router::pool::{Health, Pool};
use replica_router::replica::{ReplicaId, ReplicaSpec, SpecPolicy};
use replica_router::rng::RngSeed;
use tower::util::BoxCloneService;
use tower::{Service, ServiceBuilder, ServiceExt};

type Resp = http::Response<TrackedBody<common::ChunkBody>>;
type Gateway = BoxCloneService<http::Request<()>, Resp, RouteError>;

fn pool_of(ids: &[&str]) -> Pool<ScriptedBackend> {
    let mut b = Pool::builder().spec_policy(SpecPolicy::Unchecked);
    for id in ids {
        b = b.replica(id, ReplicaSpec::new("m"), ScriptedBackend::default());
    }
    b.build().unwrap()
}

fn gateway(pool: &Pool<ScriptedBackend>, affinity: AffinityLayer<ScriptedBackend>) -> Gateway {
    let svc = ServiceBuilder::new()
        .layer(RouteContextLayer::default())
        .layer(affinity)
        .layer(LeastInFlightLayer::new(pool.clone()).seed(RngSeed::fixed(1)))
        .service(Dispatch::with_seed(pool.clone(), RngSeed::fixed(2)));
    BoxCloneService::new(svc)
}

fn turn(session: &str) -> http::Request<()> {
    http::Request::builder()
        .header("x-session-id", session)
        .body(())
        .unwrap()
}

async fn send(gw: &mut Gateway, req: http::Request<()>) -> Result<Resp, RouteError> {
    gw.ready().await?.call(req).await
}

fn decision(resp: &Resp) -> (String, DecisionReason) {
    let d = resp
        .extensions()
        .get::<Decision>()
        .expect("decision on response");
    (d.replica().to_string(), d.reason())
}

/// One turn, body dropped at once (so nothing stays in flight).
async fn once(gw: &mut Gateway, session: &str) -> (String, DecisionReason) {
    let resp = send(gw, turn(session)).await.unwrap();
    decision(&resp)
}

fn ring_home(pool: &Pool<ScriptedBackend>, key: &str) -> String {
    let snap = pool.snapshot();
    let ring = Ring::from_snapshot(&snap, 160);
    snap.replicas()[ring.home(key_hash(key.as_bytes())).unwrap()]
        .id()
        .to_string()
}

/// A session key whose ring home is `replica`.
fn key_homed_at(pool: &Pool<ScriptedBackend>, replica: &str, prefix: &str) -> String {
    (0..100_000)
        .map(|i| format!("{prefix}-{i}"))
        .find(|k| ring_home(pool, k) == replica)
        .expect("some key lands on every replica")
}

fn assert_all_idle(pool: &Pool<ScriptedBackend>) {
    for r in pool.snapshot().replicas() {
        assert_eq!(r.state().in_flight(), 0, "{} still in flight", r.id());
    }
}

#[tokio::test]
async fn multi_turn_session_keeps_its_replica() {
    let pool = pool_of(&["a", "b", "c", "d"]);
    let mut gw = gateway(&pool, AffinityLayer::new(pool.clone()));
    let (first, reason) = once(&mut gw, "conv-1").await;
    assert_eq!(reason, DecisionReason::Home);
    assert_eq!(first, ring_home(&pool, "conv-1"));
    for _ in 0..20 {
        assert_eq!(
            once(&mut gw, "conv-1").await,
            (first.clone(), DecisionReason::Home)
        );
    }
    assert_all_idle(&pool);
}

#[tokio::test]
async fn unkeyed_requests_fall_through_to_least_loaded() {
    let pool = pool_of(&["a", "b", "c"]);
    let mut gw = gateway(&pool, AffinityLayer::new(pool.clone()));
    let resp = send(&mut gw, http::Request::new(())).await.unwrap();
    assert_eq!(decision(&resp).1, DecisionReason::LeastLoaded);
    // An empty session header is "no key".
    let req = http::Request::builder()
        .header("x-session-id", "")
        .body(())
        .unwrap();
    let resp = send(&mut gw, req).await.unwrap();
    assert_eq!(decision(&resp).1, DecisionReason::LeastLoaded);
    // A decision made upstream is kept.
    let mut req = turn("conv-9");
    req.extensions_mut().insert(Decision::new(
        ReplicaId::new("c").unwrap(),
        DecisionReason::RoundRobin,
    ));
    let resp = send(&mut gw, req).await.unwrap();
    assert_eq!(decision(&resp), ("c".into(), DecisionReason::RoundRobin));
}

#[derive(Debug, Clone, Copy)]
enum Outage {
    Eject,
    Drain,
    Unhealthy,
    Remove,
}

async fn failover_then_stay(outage: Outage) {
    let pool = pool_of(&["a", "b", "c", "d"]);
    let mut gw = gateway(&pool, AffinityLayer::new(pool.clone()));
    let (home, _) = once(&mut gw, "conv-7").await;
    match outage {
        Outage::Eject => pool.eject(&home).unwrap(),
        Outage::Drain => drop(pool.drain(&home).unwrap()),
        Outage::Unhealthy => pool.set_health(&home, Health::Unhealthy).unwrap(),
        Outage::Remove => drop(pool.remove(&home).unwrap()),
    }
    let (moved, reason) = once(&mut gw, "conv-7").await;
    assert_eq!(reason, DecisionReason::Failover, "{outage:?}");
    assert_ne!(moved, home);
    // The failover target is the next replica in ring order from the key.
    let snap = pool.snapshot();
    let ring = Ring::from_snapshot(&snap, 160);
    let next = ring
        .order(key_hash(b"conv-7"))
        .into_iter()
        .map(|i| snap.replicas()[i].id().to_string())
        .find(|id| *id != home)
        .unwrap();
    assert_eq!(moved, next, "{outage:?}");
    // Then it stays there.
    for _ in 0..5 {
        assert_eq!(
            once(&mut gw, "conv-7").await,
            (moved.clone(), DecisionReason::Home)
        );
    }
    assert_all_idle(&pool);
}

#[tokio::test]
async fn eject_fails_over_and_stays() {
    failover_then_stay(Outage::Eject).await;
}

#[tokio::test]
async fn drain_fails_over_and_stays() {
    failover_then_stay(Outage::Drain).await;
}

#[tokio::test]
async fn unhealthy_fails_over_and_stays() {
    failover_then_stay(Outage::Unhealthy).await;
}

#[tokio::test]
async fn removal_fails_over_and_stays() {
    failover_then_stay(Outage::Remove).await;
}

#[tokio::test]
async fn readmitted_home_gets_only_new_sessions() {
    let pool = pool_of(&["a", "b", "c", "d"]);
    let mut gw = gateway(&pool, AffinityLayer::new(pool.clone()));
    let live = key_homed_at(&pool, "b", "live");
    assert_eq!(
        once(&mut gw, &live).await,
        ("b".into(), DecisionReason::Home)
    );
    pool.eject("b").unwrap();
    let (moved, reason) = once(&mut gw, &live).await;
    assert_eq!(reason, DecisionReason::Failover);
    // A new session homed at b while b is out: failover placement (its ring home is down).
    let newcomer = key_homed_at(&pool, "b", "new-while-down");
    let (elsewhere, reason) = once(&mut gw, &newcomer).await;
    assert_ne!(elsewhere, "b");
    assert_eq!(reason, DecisionReason::Failover);
    pool.readmit("b").unwrap();
    // Live sessions stay where they are: no thrash.
    for _ in 0..3 {
        assert_eq!(
            once(&mut gw, &live).await,
            (moved.clone(), DecisionReason::Home)
        );
        assert_eq!(
            once(&mut gw, &newcomer).await,
            (elsewhere.clone(), DecisionReason::Home)
        );
    }
    // New sessions go home again.
    let fresh = key_homed_at(&pool, "b", "fresh");
    assert_eq!(
        once(&mut gw, &fresh).await,
        ("b".into(), DecisionReason::Home)
    );
}

#[tokio::test]
async fn ineligible_replicas_never_get_new_sessions() {
    let pool = pool_of(&["a", "b", "c", "d", "e", "f"]);
    pool.eject("a").unwrap();
    let _drain = pool.drain("c").unwrap();
    pool.set_health("e", Health::Unhealthy).unwrap();
    let mut gw = gateway(&pool, AffinityLayer::new(pool.clone()));
    let mut held = Vec::new();
    let mut seen = HashMap::new();
    for i in 0..300 {
        let resp = send(&mut gw, turn(&format!("s-{i}"))).await.unwrap();
        let (id, _) = decision(&resp);
        assert!(
            ["b", "d", "f"].contains(&id.as_str()),
            "new session on {id}"
        );
        *seen.entry(id).or_insert(0) += 1;
        if i % 2 == 0 {
            held.push(resp); // keep some in flight so the bound bites
        }
    }
    assert_eq!(seen.len(), 3);
    drop(held);
    assert_all_idle(&pool);
}

#[tokio::test]
async fn overloaded_home_spills_and_pinned_sessions_stay() {
    let pool = pool_of(&["a", "b"]);
    let mut gw = gateway(&pool, AffinityLayer::new(pool.clone()));
    let keys: Vec<String> = (0..3)
        .map(|i| key_homed_at(&pool, "a", &format!("k{i}")))
        .collect();
    // Two in flight on a: L = 2, capacity of a for the third = ceil(1.25 x 3 / 2) = 2: full.
    let r1 = send(&mut gw, turn(&keys[0])).await.unwrap();
    let r2 = send(&mut gw, turn(&keys[1])).await.unwrap();
    assert_eq!(decision(&r1), ("a".into(), DecisionReason::Home));
    assert_eq!(decision(&r2), ("a".into(), DecisionReason::Home));
    let r3 = send(&mut gw, turn(&keys[2])).await.unwrap();
    assert_eq!(decision(&r3), ("b".into(), DecisionReason::Spill));
    // A pinned session stays on its replica although it is past the bound (KV cache there).
    let again = send(&mut gw, turn(&keys[0])).await.unwrap();
    assert_eq!(decision(&again), ("a".into(), DecisionReason::Home));
    drop((r1, r2, r3, again));
    // The spilled session is pinned to b: it stays there when a is idle again.
    assert_eq!(
        once(&mut gw, &keys[2]).await,
        ("b".into(), DecisionReason::Home)
    );
    assert_all_idle(&pool);
}

#[tokio::test]
async fn pinned_session_moves_past_the_hard_cap() {
    let pool = pool_of(&["a", "b"]);
    let layer = AffinityLayer::builder(pool.clone())
        .pinned_overload_factor(1.0)
        .build()
        .unwrap();
    let mut gw = gateway(&pool, layer);
    let pinned = key_homed_at(&pool, "a", "pinned");
    assert_eq!(once(&mut gw, &pinned).await.0, "a");
    // Pile requests on a directly (upstream decisions), leaving b idle.
    let mut held = Vec::new();
    for _ in 0..4 {
        let mut req = turn("other");
        req.extensions_mut().insert(Decision::new(
            ReplicaId::new("a").unwrap(),
            DecisionReason::RoundRobin,
        ));
        held.push(send(&mut gw, req).await.unwrap());
    }
    let resp = send(&mut gw, turn(&pinned)).await.unwrap();
    assert_eq!(decision(&resp), ("b".into(), DecisionReason::Spill));
    drop(held);
    drop(resp);
    // Re-pinned to b.
    assert_eq!(
        once(&mut gw, &pinned).await,
        ("b".into(), DecisionReason::Home)
    );
}

#[tokio::test]
async fn user_key_and_fallback() {
    let pool = pool_of(&["a", "b", "c", "d"]);
    let layer = AffinityLayer::builder(pool.clone())
        .key(AffinityKey::User)
        .build()
        .unwrap();
    let mut gw = gateway(&pool, layer);
    let user_turn = |s: &str| {
        http::Request::builder()
            .header("x-user-id", "heavy-user")
            .header("x-session-id", s)
            .body(())
            .unwrap()
    };
    let first = decision(&send(&mut gw, user_turn("s1")).await.unwrap());
    for s in ["s2", "s3", "s4"] {
        assert_eq!(
            decision(&send(&mut gw, user_turn(s)).await.unwrap()),
            (first.0.clone(), DecisionReason::Home)
        );
    }
    assert_eq!(first.0, ring_home(&pool, "heavy-user"));

    let layer = AffinityLayer::builder(pool.clone())
        .key(AffinityKey::SessionThenUser)
        .build()
        .unwrap();
    let mut gw = gateway(&pool, layer);
    let only_user = http::Request::builder()
        .header("x-user-id", "u-7")
        .body(())
        .unwrap();
    let (id, reason) = decision(&send(&mut gw, only_user).await.unwrap());
    assert_eq!(
        (id, reason),
        (ring_home(&pool, "u-7"), DecisionReason::Home)
    );
}

#[tokio::test]
async fn bad_keys_route_or_fail_typed() {
    let pool = pool_of(&["a", "b", "c"]);
    let mut gw = gateway(&pool, AffinityLayer::new(pool.clone()));
    // Non-UTF-8 header bytes are a fine key.
    let req = http::Request::builder()
        .header(
            "x-session-id",
            http::HeaderValue::from_bytes(b"\xff\xfe\x80conv").unwrap(),
        )
        .body(())
        .unwrap();
    let resp = send(&mut gw, req).await.unwrap();
    assert_eq!(decision(&resp).1, DecisionReason::Home);

    // A 1 MiB key set by the application: typed 400 by default...
    let huge = RouteKey::from(vec![b'x'; 1 << 20]);
    let mut req = http::Request::new(());
    req.extensions_mut()
        .insert(RouteContext::with_session(huge.clone()));
    match send(&mut gw, req).await {
        Err(RouteError::InvalidKey { kind, .. }) => assert_eq!(kind, KeyKind::Session),
        other => panic!("expected InvalidKey, got {other:?}"),
    }
    // ...and routed when the limit allows it.
    let layer = AffinityLayer::builder(pool.clone())
        .max_key_len(2 << 20)
        .build()
        .unwrap();
    let mut gw = gateway(&pool, layer);
    let mut req = http::Request::new(());
    req.extensions_mut()
        .insert(RouteContext::with_session(huge.clone()));
    let resp = send(&mut gw, req).await.unwrap();
    assert_eq!(decision(&resp).1, DecisionReason::Home);
    // An empty key set by the application is "no key".
    let mut req = http::Request::new(());
    req.extensions_mut()
        .insert(RouteContext::with_session(RouteKey::new(Vec::new())));
    let resp = send(&mut gw, req).await.unwrap();
    assert_eq!(decision(&resp).1, DecisionReason::LeastLoaded);
}

#[test]
fn invalid_settings_are_typed_errors() {
    let pool = pool_of(&["a"]);
    let b = || AffinityLayer::builder(pool.clone());
    assert!(matches!(
        b().balance_factor(f64::NAN).build(),
        Err(AffinityConfigError::BalanceFactor(_))
    ));
    assert!(matches!(
        b().balance_factor(1.0).build(),
        Err(AffinityConfigError::BalanceFactor(_))
    ));
    assert!(matches!(
        b().balance_factor(0.5).build(),
        Err(AffinityConfigError::BalanceFactor(_))
    ));
    assert!(matches!(
        b().balance_factor(f64::INFINITY).build(),
        Err(AffinityConfigError::BalanceFactor(_))
    ));
    assert!(matches!(
        b().pinned_overload_factor(0.9).build(),
        Err(AffinityConfigError::PinnedOverloadFactor(_))
    ));
    assert!(b().pinned_overload_factor(f64::INFINITY).build().is_ok());
    assert!(matches!(
        b().pin_ttl(Duration::ZERO).build(),
        Err(AffinityConfigError::PinTtl)
    ));
    assert!(matches!(
        b().tenant_share(Some(0.0)).build(),
        Err(AffinityConfigError::TenantShare(_))
    ));
    assert!(matches!(
        b().tenant_share(Some(f64::NAN)).build(),
        Err(AffinityConfigError::TenantShare(_))
    ));
    assert!(matches!(
        b().vnodes_per_weight(0).build(),
        Err(AffinityConfigError::VnodesPerWeight(0))
    ));
    assert!(matches!(
        b().max_key_len(0).build(),
        Err(AffinityConfigError::MaxKeyLen)
    ));
    assert!(b().balance_factor(1.01).build().is_ok());
}

#[tokio::test]
async fn no_replica_is_a_typed_error() {
    let pool = pool_of(&["a", "b"]);
    pool.eject("a").unwrap();
    pool.eject("b").unwrap();
    let mut gw = gateway(&pool, AffinityLayer::new(pool.clone()));
    let err = send(&mut gw, turn("conv")).await.unwrap_err();
    assert!(matches!(err, RouteError::NoReplica { .. }), "{err:?}");
    assert_eq!(err.status_code(), 503);
}

#[tokio::test]
async fn two_gateways_agree_without_talking() {
    let p1 = pool_of(&["a", "b", "c", "d", "e"]);
    let p2 = pool_of(&["e", "c", "a", "d", "b"]);
    let mut g1 = gateway(&p1, AffinityLayer::new(p1.clone()));
    let mut g2 = gateway(&p2, AffinityLayer::new(p2.clone()));
    for i in 0..200 {
        let k = format!("conv-{i}");
        assert_eq!(once(&mut g1, &k).await, once(&mut g2, &k).await, "{k}");
    }
}

#[tokio::test]
async fn response_headers_name_the_affinity() {
    let pool = pool_of(&["a", "b", "c"]);
    let mut gw = gateway(&pool, AffinityLayer::new(pool.clone()));
    let mut resp = send(&mut gw, turn("conv-h")).await.unwrap();
    annotate_response(&mut resp);
    assert_eq!(resp.headers()["x-replica-affinity"], "home");
    let home = resp.headers()["x-replica-id"].to_str().unwrap().to_string();
    drop(resp);
    pool.eject(&home).unwrap();
    let mut resp = send(&mut gw, turn("conv-h")).await.unwrap();
    annotate_response(&mut resp);
    assert_eq!(resp.headers()["x-replica-affinity"], "failover");
    assert_ne!(resp.headers()["x-replica-id"], home.as_str());
    let mut resp = send(&mut gw, http::Request::new(())).await.unwrap();
    annotate_response(&mut resp);
    assert!(resp.headers().get("x-replica-affinity").is_none());
    assert!(resp.headers().get("x-replica-id").is_some());
}

/// A pin table whose store is down: every call fails after a yield (a remote-like future).
struct DownTable;

impl PinTable for DownTable {
    fn get<'a>(&'a self, _session: &'a RouteKey) -> PinFuture<'a, Option<ReplicaId>> {
        PinFuture::Pending(Box::pin(async {
            tokio::task::yield_now().await;
            Err(PinError::Timeout)
        }))
    }
    fn pin<'a>(&'a self, _: &'a RouteKey, _: &'a ReplicaId, _: Duration) -> PinFuture<'a, ()> {
        PinFuture::ready(Err(PinError::Store("down".into())))
    }
    fn unpin<'a>(&'a self, _: &'a RouteKey, _: &'a ReplicaId) -> PinFuture<'a, ()> {
        PinFuture::ready(Err(PinError::Store("down".into())))
    }
}

/// A remote-like table that works: the memory table behind yielding futures.
struct SlowTable(MemoryPinTable);

impl PinTable for SlowTable {
    fn get<'a>(&'a self, session: &'a RouteKey) -> PinFuture<'a, Option<ReplicaId>> {
        PinFuture::Pending(Box::pin(async move {
            tokio::task::yield_now().await;
            self.0.get(session).await
        }))
    }
    fn pin<'a>(&'a self, s: &'a RouteKey, r: &'a ReplicaId, ttl: Duration) -> PinFuture<'a, ()> {
        PinFuture::Pending(Box::pin(async move {
            tokio::task::yield_now().await;
            self.0.pin(s, r, ttl).await
        }))
    }
    fn unpin<'a>(&'a self, s: &'a RouteKey, r: &'a ReplicaId) -> PinFuture<'a, ()> {
        self.0.unpin(s, r)
    }
}

fn counter(snapshotter: &Snapshotter, name: &str, label: Option<(&str, &str)>) -> u64 {
    snapshotter
        .snapshot()
        .into_vec()
        .into_iter()
        .filter(|(k, _, _, _)| {
            k.key().name() == name
                && label.is_none_or(|(lk, lv)| {
                    k.key().labels().any(|l| l.key() == lk && l.value() == lv)
                })
        })
        .map(|(_, _, _, v)| match v {
            DebugValue::Counter(n) => n,
            _ => 0,
        })
        .sum()
}

#[tokio::test]
async fn pin_store_down_falls_back_to_the_ring() {
    let pool = pool_of(&["a", "b", "c"]);
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let layer = metrics::with_local_recorder(&recorder, || {
        AffinityLayer::builder(pool.clone())
            .pin_table(Arc::new(DownTable))
            .build()
            .unwrap()
    });
    let mut gw = gateway(&pool, layer);
    for i in 0..10 {
        let k = format!("conv-{i}");
        assert_eq!(
            once(&mut gw, &k).await,
            (ring_home(&pool, &k), DecisionReason::Home)
        );
    }
    assert_eq!(counter(&snapshotter, PIN_ERRORS_COUNTER, None), 10);
    assert_eq!(
        counter(&snapshotter, DECISIONS_COUNTER, Some(("reason", "home"))),
        10
    );
    assert_all_idle(&pool);
}

#[tokio::test]
async fn remote_pins_keep_sessions_across_gateways() {
    // Two gateways (separate layers and pools with the same members) share one pin table.
    let shared = Arc::new(SlowTable(MemoryPinTable::new(1000)));
    let p1 = pool_of(&["a", "b"]);
    let p2 = pool_of(&["b", "a"]);
    let mut g1 = gateway(
        &p1,
        AffinityLayer::builder(p1.clone())
            .pin_table(shared.clone())
            .build()
            .unwrap(),
    );
    let mut g2 = gateway(
        &p2,
        AffinityLayer::builder(p2.clone())
            .pin_table(shared.clone())
            .build()
            .unwrap(),
    );
    let keys: Vec<String> = (0..3)
        .map(|i| key_homed_at(&p1, "a", &format!("x{i}")))
        .collect();
    let r1 = send(&mut g1, turn(&keys[0])).await.unwrap();
    let r2 = send(&mut g1, turn(&keys[1])).await.unwrap();
    let r3 = send(&mut g1, turn(&keys[2])).await.unwrap();
    assert_eq!(decision(&r3), ("b".into(), DecisionReason::Spill));
    drop((r1, r2, r3));
    // Gateway 2 has no load at all, yet sends the spilled session where gateway 1 pinned it.
    assert_eq!(
        once(&mut g2, &keys[2]).await,
        ("b".into(), DecisionReason::Home)
    );
    assert_eq!(
        once(&mut g2, &keys[0]).await,
        ("a".into(), DecisionReason::Home)
    );
    assert_all_idle(&p1);
    assert_all_idle(&p2);
}

#[tokio::test]
async fn tenant_spread_caps_one_tenants_share() {
    let pool = pool_of(&["a", "b", "c", "d"]);
    let layer = AffinityLayer::builder(pool.clone())
        .tenant_share(Some(0.3))
        .build()
        .unwrap();
    let mut gw = gateway(&pool, layer);
    let tenant_turn = |tenant: &str, s: &str| {
        http::Request::builder()
            .header("x-tenant-id", tenant)
            .header("x-session-id", s)
            .body(())
            .unwrap()
    };
    // Twelve sessions of one tenant, all homed at a.
    let mut per_replica: HashMap<String, usize> = HashMap::new();
    for i in 0..12 {
        let k = key_homed_at(&pool, "a", &format!("acme-{i}"));
        let (id, _) = decision(&send(&mut gw, tenant_turn("acme", &k)).await.unwrap());
        *per_replica.entry(id).or_insert(0) += 1;
    }
    let on_a = per_replica.get("a").copied().unwrap_or(0);
    assert!(
        (1..=4).contains(&on_a),
        "acme on a: {on_a} ({per_replica:?})"
    );
    assert!(per_replica.values().all(|&n| n <= 4), "{per_replica:?}");
    // Another tenant's sessions still go home.
    let k = key_homed_at(&pool, "a", "globex");
    assert_eq!(
        decision(&send(&mut gw, tenant_turn("globex", &k)).await.unwrap()),
        ("a".into(), DecisionReason::Home)
    );
    // Without the cap all twelve would have gone to a.
    let mut gw = gateway(&pool, AffinityLayer::new(pool.clone()));
    for i in 0..12 {
        let k = key_homed_at(&pool, "a", &format!("acme-{i}"));
        assert_eq!(
            decision(&send(&mut gw, tenant_turn("acme", &k)).await.unwrap()).0,
            "a"
        );
    }
}

#[tokio::test]
async fn pins_expire_after_the_ttl() {
    tokio::time::pause();
    let pool = pool_of(&["a", "b"]);
    let layer = AffinityLayer::builder(pool.clone())
        .pin_ttl(Duration::from_secs(60))
        .build()
        .unwrap();
    let pins = layer.pins().clone();
    let mut gw = gateway(&pool, layer);
    let k = key_homed_at(&pool, "a", "ttl");
    assert_eq!(once(&mut gw, &k).await.0, "a");
    pool.eject("a").unwrap();
    assert_eq!(
        once(&mut gw, &k).await,
        ("b".into(), DecisionReason::Failover)
    );
    pool.readmit("a").unwrap();
    tokio::time::advance(Duration::from_secs(30)).await;
    // Refreshed on every turn: still pinned to b after 30 + 30 + 30 s of activity.
    assert_eq!(once(&mut gw, &k).await, ("b".into(), DecisionReason::Home));
    tokio::time::advance(Duration::from_secs(45)).await;
    assert_eq!(once(&mut gw, &k).await, ("b".into(), DecisionReason::Home));
    // Idle past the TTL: the pin is gone and the session goes to its ring home.
    tokio::time::advance(Duration::from_secs(61)).await;
    assert_eq!(pins.get(&RouteKey::from(k.clone())).await.unwrap(), None);
    assert_eq!(once(&mut gw, &k).await, ("a".into(), DecisionReason::Home));
}
