//! The shared work view over a real redis-server: two gateways (separate pools and Redis
//! clients, as two processes would have) see each other's outstanding prefill, place by it, and
//! forget a gateway that stopped publishing; Redis down, each falls back to its own counts.
#![cfg(feature = "redis")]

mod common;
#[macro_use]
mod support;

use std::sync::Arc;
use std::time::Duration;

use common::{hold, request, scripted_pool, Script, ScriptedBackend};
use replica_router::balance::LeastInFlightLayer;
use replica_router::cluster::{WorkView, WorkViewConfig};
use replica_router::context::RouteContext;
use replica_router::decision::Decision;
use replica_router::dispatch::Dispatch;
use replica_router::load::work::ForeignWork;
use replica_router::load::Placement;
use replica_router::pool::Pool;
use replica_router::prefix::PrefixIndex;
use replica_router::request::RouteRequest;
use replica_router::rng::RngSeed;
use replica_router::store::{RedisStore, RedisStoreConfig};
use tower::{Service, ServiceBuilder, ServiceExt};

async fn store(url: &str) -> RedisStore {
    let cfg = RedisStoreConfig::default().timeout(Duration::from_millis(200));
    RedisStore::connect_with(url, cfg).await.unwrap()
}

fn view(store: &RedisStore, pool: &Pool<ScriptedBackend>, id: &str) -> WorkView {
    WorkView::spawn(
        store,
        pool.clone(),
        WorkViewConfig {
            name: "test".into(),
            gateway_id: id.into(),
            period: Duration::from_millis(50),
            ttl: Duration::from_millis(600),
        },
    )
}

fn foreign(pool: &Pool<ScriptedBackend>, i: usize) -> Option<ForeignWork> {
    pool.snapshot().replicas()[i]
        .state()
        .work()
        .foreign(Duration::from_secs(1))
}

async fn until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !cond() {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateways_see_each_others_prefill_and_place_by_it() {
    let server = redis_or_skip!();
    let (pa, pb) = (scripted_pool(2), scripted_pool(2));
    let (sa, sb) = (store(&server.url()).await, store(&server.url()).await);
    let va = view(&sa, &pa, "gw-a");
    let vb = view(&sb, &pb, "gw-b");

    // Gateway A has 300k tokens of prefill outstanding on r0; B has none of its own.
    let h = hold(&pa, "r0", 300_000);
    until("B sees A's prefill on r0", || {
        foreign(&pb, 0).is_some_and(|f| f.prefill_tokens == 300_000 && f.prefill_requests == 1)
    })
    .await;
    assert_eq!(foreign(&pb, 1).map(|f| f.prefill_tokens), Some(0));
    // A does not count its own work twice.
    assert_eq!(foreign(&pa, 0).map(|f| f.prefill_tokens), Some(0));
    assert!(vb.stats().gateways() >= 1 && va.stats().rounds() > 0);

    // B's keyless placement by predicted TTFT avoids r0, which looks idle to B alone.
    let placement = Placement::predicted_ttft(Arc::new(PrefixIndex::default()));
    let mut svc = ServiceBuilder::new()
        .layer(
            LeastInFlightLayer::new(pb.clone())
                .seed(RngSeed::fixed(3))
                .placement(placement),
        )
        .service(Dispatch::new(pb.clone()));
    for _ in 0..20 {
        let mut req = request(Script::Stream {
            chunks: 1,
            delay_ms: 0,
        });
        req.set_route_context(RouteContext {
            estimated_tokens: 2_000,
            ..Default::default()
        });
        let resp = svc.ready().await.unwrap().call(req).await.unwrap();
        let d = resp.extensions().get::<Decision>().unwrap();
        assert_eq!(d.replica().as_str(), "r1");
    }

    // A's request ends: B sees r0 free again.
    h.abort();
    until("B sees r0 free", || {
        foreign(&pb, 0).is_some_and(|f| f.prefill_tokens == 0)
    })
    .await;

    // A gateway that stops publishing drops out after the TTL, whatever it had outstanding.
    let h = hold(&pa, "r1", 50_000);
    until("B sees A's prefill on r1", || {
        foreign(&pb, 1).is_some_and(|f| f.prefill_tokens == 50_000)
    })
    .await;
    drop(va);
    until("A's entry expired", || {
        foreign(&pb, 1).is_some_and(|f| f.prefill_tokens == 0)
    })
    .await;
    h.abort();
    drop(vb);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_the_view_ages_out_and_comes_back() {
    let mut server = redis_or_skip!();
    let (pa, pb) = (scripted_pool(1), scripted_pool(1));
    let (sa, sb) = (store(&server.url()).await, store(&server.url()).await);
    let _va = view(&sa, &pa, "gw-a");
    let vb = view(&sb, &pb, "gw-b");
    let h = hold(&pa, "r0", 10_000);
    until("B sees A", || {
        foreign(&pb, 0).is_some_and(|f| f.prefill_tokens == 10_000)
    })
    .await;

    server.stop();
    let errors = vb.stats().errors();
    until("rounds fail", || vb.stats().errors() > errors).await;
    // With no fresh read the figures are ignored: the prediction falls back to own counts.
    until("the view ages out", || {
        pb.snapshot().replicas()[0]
            .state()
            .work()
            .foreign(Duration::from_millis(500))
            .is_none()
    })
    .await;

    server.restart();
    until("B sees A again", || {
        foreign(&pb, 0).is_some_and(|f| f.prefill_tokens == 10_000)
    })
    .await;
    h.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_round_trip_per_period() {
    let server = redis_or_skip!();
    let p = scripted_pool(4);
    let s = store(&server.url()).await;
    let v = view(&s, &p, "gw-a");
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    let rounds = v.stats().rounds() + v.stats().errors();
    // 50 ms period over 1 s: about 20 rounds, never one per request (there are none here).
    assert!((5..=25).contains(&rounds), "{rounds} rounds");
    let info = String::from_utf8(server.raw(&[b"INFO", b"commandstats"])).unwrap();
    assert!(info.contains("evalsha") || info.contains("eval"), "{info}");
}

/// A keyless prompt one gateway sent is found from another: the placements of each gateway's
/// prefix index reach the others' through one Redis stream, never echoed back to the sender.
#[tokio::test]
async fn a_prefix_sent_through_one_gateway_is_found_from_the_other() {
    use replica_router::cluster::{PrefixShare, PrefixShareConfig};
    use replica_router::prefix::PrefixHashes;
    use replica_router::replica::ReplicaId;

    let server = redis_or_skip!();
    let url = server.url();
    let (pool_a, pool_b) = (scripted_pool(3), scripted_pool(3));
    let index_a = Arc::new(PrefixIndex::default().sharing(1024));
    let index_b = Arc::new(PrefixIndex::default().sharing(1024));
    let config = |id: &str| PrefixShareConfig {
        name: "test".into(),
        gateway_id: id.into(),
        period: Duration::from_millis(50),
        ..PrefixShareConfig::default()
    };
    let share_a = PrefixShare::spawn(
        &store(&url).await,
        pool_a.clone(),
        index_a.clone(),
        config("a"),
    );
    let share_b = PrefixShare::spawn(
        &store(&url).await,
        pool_b.clone(),
        index_b.clone(),
        config("b"),
    );
    until("both shares ran a round", || {
        share_a.stats().rounds() > 0 && share_b.stats().rounds() > 0
    })
    .await;
    // Gateway A sends a 4k-token prompt to r1 (and one to a replica B's pool does not have).
    let chain: Vec<u64> = (1..=256).collect();
    let prompt = PrefixHashes::from_block_chain(&chain, 16, 4096);
    let r1 = ReplicaId::new("r1").unwrap();
    index_a.record(&r1, 1.0, &prompt);
    index_a.record(
        &ReplicaId::new("elsewhere").unwrap(),
        1.0,
        &PrefixHashes::from_block_chain(&chain[..8], 16, 128),
    );
    // B's index learns it: the whole prompt is held by r1.
    until("B's index knows r1 holds the prompt", || {
        let m = index_b.lookup(&prompt);
        prompt.tokens_at(m.checkpoints(index_b.slot(&r1))) == 4096
    })
    .await;
    assert_eq!(
        share_b.stats().received(),
        1,
        "only the record for a replica B has"
    );
    assert!(index_b
        .slot(&ReplicaId::new("elsewhere").unwrap())
        .is_none());
    // A placement B learned is not sent again, and A never hears its own.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(share_a.stats().received(), 0);
    assert_eq!(share_b.stats().sent(), 0);
}
