//! The Redis pin table against a real redis-server: near-cache, coalesced refreshes,
//! compare-and-set writes, the outage breaker (Redis killed, then back), fixed-size keys.
#![cfg(feature = "redis")]

mod common;
#[macro_use]
mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{scripted_pool_of, ChunkBody, ScriptedBackend};
use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
use replica_router::affinity::{AffinityLayer, PIN_ERRORS_COUNTER};
use replica_router::balance::LeastInFlightLayer;
use replica_router::context::{RouteContextLayer, RouteKey};
use replica_router::decision::{Decision, DecisionReason};
use replica_router::dispatch::Dispatch;
use replica_router::error::RouteError;
use replica_router::inflight::TrackedBody;
use replica_router::pins::{PinTable, RedisPinTable};
use replica_router::pool::Pool;
use replica_router::replica::ReplicaId;
use replica_router::store::{RedisStore, RedisStoreConfig};
use tower::util::BoxCloneService;
use tower::{Service, ServiceBuilder, ServiceExt};

type Resp = http::Response<TrackedBody<ChunkBody>>;
type Gateway = BoxCloneService<http::Request<()>, Resp, RouteError>;

async fn store(server: &support::RedisServer) -> RedisStore {
    RedisStore::connect_with(
        &server.url(),
        RedisStoreConfig::default().timeout(Duration::from_millis(250)),
    )
    .await
    .expect("connect")
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

async fn send(gw: &mut Gateway, session: &str) -> (String, DecisionReason, Duration) {
    let req = http::Request::builder()
        .header("x-session-id", session)
        .body(())
        .unwrap();
    let started = Instant::now();
    let resp = gw.ready().await.unwrap().call(req).await.unwrap();
    let took = started.elapsed();
    let d = resp.extensions().get::<Decision>().unwrap();
    (d.replica().to_string(), d.reason(), took)
}

fn pin_errors(s: &Snapshotter) -> u64 {
    s.snapshot()
        .into_vec()
        .into_iter()
        .filter(|(key, ..)| key.key().name() == PIN_ERRORS_COUNTER)
        .map(|(.., v)| match v {
            DebugValue::Counter(n) => n,
            _ => 0,
        })
        .sum()
}

fn id(s: &str) -> ReplicaId {
    ReplicaId::new(s).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_outage_opens_the_breaker_and_pins_keep_working() {
    let mut server = redis_or_skip!();
    let pool = scripted_pool_of(&["a", "b", "c"]);
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let st = store(&server).await;
    let table = metrics::with_local_recorder(&recorder, || {
        Arc::new(
            RedisPinTable::new(&st)
                .near_cache(4096, Duration::from_millis(100))
                .breaker(2, Duration::from_millis(400)),
        )
    });
    let layer = metrics::with_local_recorder(&recorder, || {
        AffinityLayer::builder(pool.clone())
            .pin_table(table.clone())
            .build()
            .unwrap()
    });
    let mut gw = gateway(&pool, layer);

    // Redis up: place 20 sessions; one of them is moved to "b" by another gateway's write.
    let sessions: Vec<String> = (0..20).map(|i| format!("outage-{i}")).collect();
    let mut placed = Vec::new();
    let mut normal = Duration::ZERO;
    for s in &sessions {
        let (r, _, took) = send(&mut gw, s).await;
        normal = normal.max(took);
        placed.push(r);
    }
    let moved = RouteKey::from("moved-by-another-gateway");
    let other = RedisPinTable::new(&st);
    other
        .pin(&moved, &id("b"), Duration::from_secs(600))
        .await
        .unwrap();
    assert_eq!(send(&mut gw, "moved-by-another-gateway").await.0, "b");
    assert_eq!(pin_errors(&snapshotter), 0);

    // Redis down. Past the near-cache's freshness, every request asks Redis until the breaker
    // opens (two failures), then none does.
    server.stop();
    tokio::time::sleep(Duration::from_millis(150)).await;
    let mut before_open = 0;
    while !table.breaker_open() {
        send(&mut gw, &sessions[0]).await;
        before_open += 1;
        assert!(before_open <= 4, "the breaker opens after two failures");
    }
    let calls = table.redis_calls();
    let errors = pin_errors(&snapshotter);
    assert!(errors >= before_open, "fail-open lookups are counted");
    let mut slowest = Duration::ZERO;
    let mut requests = 0;
    for (s, r) in sessions.iter().zip(&placed) {
        let (got, _, took) = send(&mut gw, s).await;
        assert_eq!(&got, r, "pins keep working from the near-cache");
        slowest = slowest.max(took);
        requests += 1;
    }
    // The session another gateway moved still goes where it was moved (near-cache).
    let (got, reason, took) = send(&mut gw, "moved-by-another-gateway").await;
    assert_eq!((got.as_str(), reason), ("b", DecisionReason::Home));
    slowest = slowest.max(took);
    requests += 1;
    // New sessions are placed by hash, and keep their placement.
    for i in 0..10 {
        let s = format!("new-during-outage-{i}");
        let (first, _, t1) = send(&mut gw, &s).await;
        let (again, _, t2) = send(&mut gw, &s).await;
        assert_eq!(first, again);
        slowest = slowest.max(t1).max(t2);
        requests += 2;
    }
    assert!(
        table.redis_calls() <= calls + 1,
        "with the breaker open Redis is not called (a background probe at most): {} -> {}",
        calls,
        table.redis_calls()
    );
    assert!(
        pin_errors(&snapshotter) >= errors + requests,
        "every fail-open answer is counted: {} -> {} over {requests} requests",
        errors,
        pin_errors(&snapshotter)
    );
    assert!(
        slowest < Duration::from_millis(150),
        "requests with the breaker open answer at once: slowest {slowest:?} (normal {normal:?})"
    );
    eprintln!("normal (slowest while up) {normal:?}; slowest with the breaker open {slowest:?}; {before_open} requests before it opened");

    // Redis back: the background probe closes the breaker, and Redis is read again (a pin
    // written by another client is followed once the near-cache entry is no longer fresh).
    server.restart();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        send(&mut gw, &sessions[1]).await;
        if !table.breaker_open() && table.redis_calls() > calls + 1 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the breaker closes once Redis is back"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let st2 = store(&server).await;
    let writer = RedisPinTable::new(&st2);
    let s5 = RouteKey::new(sessions[5].clone().into_bytes());
    let target = ["a", "b", "c"]
        .into_iter()
        .find(|r| *r != placed[5])
        .unwrap();
    writer
        .pin(&s5, &id(target), Duration::from_secs(600))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(150)).await;
    let mut followed = false;
    for _ in 0..20 {
        if send(&mut gw, &sessions[5]).await.0 == target {
            followed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(followed, "after the outage, pins are read from Redis again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn turns_of_a_staying_session_do_not_write_each_time() {
    let server = redis_or_skip!();
    let pool = scripted_pool_of(&["a", "b", "c"]);
    let table = Arc::new(RedisPinTable::new(&store(&server).await));
    let layer = AffinityLayer::builder(pool.clone())
        .pin_table(table.clone())
        .build()
        .unwrap();
    let mut gw = gateway(&pool, layer);
    let long = "L".repeat(4000);
    let first = send(&mut gw, &long).await.0;
    for _ in 0..20 {
        assert_eq!(send(&mut gw, &long).await.0, first);
    }
    assert!(
        table.redis_calls() <= 3,
        "one lookup and one placement, not a write per turn: {}",
        table.redis_calls()
    );
    // Redis holds one key, of fixed size, whatever the session key's length.
    assert_eq!(server.dbsize(), 1);
    let key = table
        .redis_key(&RouteKey::new(long.clone().into_bytes()))
        .unwrap();
    let short = table.redis_key(&RouteKey::from("s")).unwrap();
    assert_eq!(key.len(), short.len());
    assert!(key.len() < 60, "{key}");
    let got = server.raw(&[b"GET", key.as_bytes()]);
    assert!(String::from_utf8_lossy(&got).contains(&first));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_placements_agree_and_refreshes_do_not_undo_a_move() {
    let server = redis_or_skip!();
    let ttl = Duration::from_secs(600);
    // Two gateways, no near-cache freshness, refresh on every turn.
    let g1 = Arc::new(
        RedisPinTable::new(&store(&server).await)
            .near_cache(1024, Duration::ZERO)
            .refresh_below(1.0),
    );
    let g2 = Arc::new(
        RedisPinTable::new(&store(&server).await)
            .near_cache(1024, Duration::ZERO)
            .refresh_below(1.0),
    );
    let s = RouteKey::from("race");
    // Both saw no pin and placed differently: the second adopts the first.
    g1.clone()
        .pin_after_owned(s.clone(), None, id("a"), ttl)
        .await
        .unwrap();
    g2.clone()
        .pin_after_owned(s.clone(), None, id("b"), ttl)
        .await
        .unwrap();
    assert_eq!(g1.get(&s).await.unwrap(), Some(id("a")));
    assert_eq!(g2.get(&s).await.unwrap(), Some(id("a")));
    // g1 spills the session a -> c; g2, which last saw a, refreshes a: the move stands.
    g1.clone()
        .pin_after_owned(s.clone(), Some(id("a")), id("c"), ttl)
        .await
        .unwrap();
    g2.clone()
        .pin_after_owned(s.clone(), Some(id("a")), id("a"), ttl)
        .await
        .unwrap();
    assert_eq!(g2.get(&s).await.unwrap(), Some(id("c")));
    // g2 too decides to move it off a (to b), having seen a: g1's move to c stands.
    g2.clone()
        .pin_after_owned(s.clone(), Some(id("a")), id("b"), ttl)
        .await
        .unwrap();
    assert_eq!(g1.get(&s).await.unwrap(), Some(id("c")));
    // A move from what is pinned now goes through.
    g2.clone()
        .pin_after_owned(s.clone(), Some(id("c")), id("b"), ttl)
        .await
        .unwrap();
    assert_eq!(g1.get(&s).await.unwrap(), Some(id("b")));
}

/// A pin this gateway could not write (Redis down or timing out) is kept from the near-cache
/// when Redis comes back without it, and written back; a pin Redis confirmed and another
/// gateway then removed is not resurrected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pin_lost_in_redis_is_kept_from_local_knowledge_and_written_back() {
    let mut server = redis_or_skip!();
    let pool = scripted_pool_of(&["a", "b", "c"]);
    // Freshness zero: every turn asks Redis, as happens once a turn comes more than the
    // near-cache's freshness after the last. The write-behind queue is off: this is the turn
    // path's own recovery (what a pin dropped from a full queue gets).
    let table = Arc::new(
        RedisPinTable::new(&store(&server).await)
            .near_cache(1024, Duration::ZERO)
            .breaker(2, Duration::from_millis(200))
            .write_behind(0, Duration::from_secs(1)),
    );
    let layer = AffinityLayer::builder(pool.clone())
        .pin_table(table.clone())
        .build()
        .unwrap();
    let mut gw = gateway(&pool, layer);
    let key = |s: usize| RouteKey::new(format!("lost-{s}").into_bytes());
    let homes: Vec<String> = ring_homes(&mut gw).await;
    // A confirmed pin, later removed by another gateway.
    let removed = RouteKey::from("removed-elsewhere");
    let removed_home = send(&mut gw, "removed-elsewhere").await.0;
    let elsewhere = ["a", "b", "c"]
        .into_iter()
        .find(|r| *r != removed_home)
        .unwrap();
    table
        .pin(&removed, &id(elsewhere), Duration::from_secs(600))
        .await
        .unwrap();
    RedisPinTable::new(&store(&server).await)
        .unpin(&removed, &id(elsewhere))
        .await
        .unwrap();

    // Redis goes down; each session is moved off its ring home (as a spill would), and the
    // write of that move never reaches Redis.
    server.stop();
    let mut placed = Vec::new();
    for (s, home) in homes.iter().enumerate() {
        let moved = ["a", "b", "c"].into_iter().find(|r| r != home).unwrap();
        table
            .pin(&key(s), &id(moved), Duration::from_secs(600))
            .await
            .unwrap();
        placed.push(moved.to_owned());
    }
    // Redis comes back empty (a restart without persistence, or a failover to a replica that
    // never got the writes); the breaker's probe closes it.
    server.restart();
    let deadline = Instant::now() + Duration::from_secs(10);
    let probe = RouteKey::from("probe");
    loop {
        // Until the breaker is closed and the connection is back, writes fail open.
        table
            .pin(&probe, &id("a"), Duration::from_secs(600))
            .await
            .unwrap();
        if !table.breaker_open() && server.dbsize() == 1 {
            break;
        }
        assert!(Instant::now() < deadline, "the table reaches Redis again");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    server.raw(&[b"FLUSHALL"]);
    assert_eq!(server.dbsize(), 0);
    for (s, moved) in placed.iter().enumerate() {
        let (got, reason, _) = send(&mut gw, &format!("lost-{s}")).await;
        assert_eq!(
            &got, moved,
            "session {s} stays where this gateway placed it"
        );
        assert_eq!(reason, DecisionReason::Home);
    }
    // ... and the pins are back in Redis for every other gateway.
    assert_eq!(server.dbsize(), placed.len() as u64);
    let other = RedisPinTable::new(&store(&server).await);
    for (s, moved) in placed.iter().enumerate() {
        assert_eq!(other.get(&key(s)).await.unwrap(), Some(id(moved)));
    }
    // The pin removed elsewhere stays removed: the session goes back to its ring home.
    assert_eq!(send(&mut gw, "removed-elsewhere").await.0, removed_home);
}

/// The ring homes of twelve fresh sessions `lost-0..12`.
async fn ring_homes(gw: &mut Gateway) -> Vec<String> {
    let mut homes = Vec::new();
    for s in 0..12 {
        homes.push(send(gw, &format!("lost-{s}")).await.0);
    }
    homes
}

#[tokio::test]
async fn a_lost_move_is_kept_over_the_pin_it_replaced_and_replayed() {
    let mut server = redis_or_skip!();
    // Write-behind off: the move is replayed by the session's next turn (see
    // `pins_kept_out_of_redis_by_an_outage_are_written_back_once_it_returns` for the queue).
    let table = Arc::new(
        RedisPinTable::new(&store(&server).await)
            .near_cache(1024, Duration::ZERO)
            .breaker(2, Duration::from_millis(200))
            .write_behind(0, Duration::from_secs(1)),
    );
    let session = RouteKey::from("spilled-conv");
    let ttl = Duration::from_secs(600);
    // The session is placed on a (confirmed in Redis), ...
    table
        .clone()
        .pin_after_owned(session.clone(), None, id("a"), ttl)
        .await
        .unwrap();
    assert_eq!(table.get(&session).await.unwrap(), Some(id("a")));
    // ... then spills to b while Redis is down: the move never reaches Redis.
    server.stop();
    table
        .clone()
        .pin_after_owned(session.clone(), Some(id("a")), id("b"), ttl)
        .await
        .unwrap();
    server.restart();
    // Redis comes back holding the pin the move replaced (here restored by another gateway's
    // earlier write, as a Redis that kept its data would hold it).
    let other = Arc::new(RedisPinTable::new(&store(&server).await));
    other.pin(&session, &id("a"), ttl).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let got = loop {
        match table.get(&session).await {
            Ok(r) if !table.breaker_open() => break r,
            _ => {}
        }
        assert!(Instant::now() < deadline, "the table reaches Redis again");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    // The spill stands: the session stays on b, where its cache now is.
    assert_eq!(got, Some(id("b")));
    // The next turn's write (a stay at b) replays the move over a.
    table
        .clone()
        .pin_after_owned(session.clone(), Some(id("b")), id("b"), ttl)
        .await
        .unwrap();
    assert_eq!(
        RedisPinTable::new(&store(&server).await)
            .get(&session)
            .await
            .unwrap(),
        Some(id("b"))
    );
    // A pin another gateway moved somewhere else is respected.
    other
        .clone()
        .pin_after_owned(session.clone(), Some(id("b")), id("c"), ttl)
        .await
        .unwrap();
    assert_eq!(table.get(&session).await.unwrap(), Some(id("c")));
}

#[tokio::test]
async fn pins_kept_out_of_redis_by_an_outage_are_written_back_once_it_returns() {
    let mut server = redis_or_skip!();
    let table = Arc::new(
        RedisPinTable::new(&store(&server).await)
            .near_cache(1024, Duration::ZERO)
            .breaker(2, Duration::from_millis(200))
            .write_behind(1024, Duration::from_millis(50)),
    );
    let ttl = Duration::from_secs(600);
    let key = |s: usize| RouteKey::new(format!("behind-{s}").into_bytes());
    let replica = |s: usize| id(["a", "b", "c"][s % 3]);
    // One session is confirmed on a before the outage.
    table
        .clone()
        .pin_after_owned(key(0), None, id("a"), ttl)
        .await
        .unwrap();
    server.stop();
    // During the outage it moves to b (a spill), and twelve new sessions are placed: none of
    // these writes reaches Redis (they fail open).
    table
        .clone()
        .pin_after_owned(key(0), Some(id("a")), id("b"), ttl)
        .await
        .unwrap();
    for s in 1..=12 {
        table
            .clone()
            .pin_after_owned(key(s), None, replica(s), ttl)
            .await
            .unwrap();
    }
    assert!(
        table.write_behind_len() > 0,
        "the lost writes wait in the queue"
    );
    assert_eq!(table.written_behind(), 0);
    // Redis comes back empty, and no session sends another turn: the queue writes them back.
    server.restart();
    let deadline = Instant::now() + Duration::from_secs(10);
    while server.dbsize() < 13 {
        assert!(
            Instant::now() < deadline,
            "pins written back: {} of 13",
            server.dbsize()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let other = RedisPinTable::new(&store(&server).await).near_cache(0, Duration::ZERO);
    for s in 1..=12 {
        assert_eq!(
            other.get(&key(s)).await.unwrap(),
            Some(replica(s)),
            "session {s}"
        );
    }
    assert_eq!(other.get(&key(0)).await.unwrap(), Some(id("b")), "the move");
    assert_eq!(table.write_behind_len(), 0);
    assert_eq!(table.written_behind(), 13);
    // Written back as compare-and-set: a later write-back yields to what another gateway wrote.
    server.stop();
    table
        .clone()
        .pin_after_owned(key(20), None, id("a"), ttl)
        .await
        .unwrap();
    server.restart();
    // Another gateway places the session on c as soon as Redis is back (before this table's
    // probe has even closed its breaker).
    let pin_key = table.redis_key(&key(20)).unwrap();
    server.raw(&[b"SET", pin_key.as_bytes(), b"c", b"PX", b"600000"]);
    // The write-back runs once the breaker's probe finds Redis; it yields to c and adopts it.
    let deadline = Instant::now() + Duration::from_secs(10);
    while table.written_behind() < 14 {
        assert!(Instant::now() < deadline, "the queued pin is written back");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(table.write_behind_len(), 0);
    assert_eq!(
        String::from_utf8_lossy(&server.raw(&[b"GET", pin_key.as_bytes()])).trim(),
        "$1\r\nc"
    );
    assert_eq!(table.get(&key(20)).await.unwrap(), Some(id("c")), "adopted");
}
