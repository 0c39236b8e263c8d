//! Two independently built router stacks (quota layer over foundation dispatch, separate Redis
//! clients, as two gateway processes would have) sharing one real redis-server; fault tests; the
//! Redis pin table.
#![cfg(feature = "redis")]

mod common;
mod support;

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant as StdInstant};

use common::{ChunkBody, Script, ScriptedBackend};
use http_body_util::BodyExt;
use replica_router::balance::LeastInFlightLayer;
use replica_router::context::{RouteContextLayer, RouteKey};
use replica_router::dispatch::Dispatch;
use replica_router::error::RouteError;
use replica_router::inflight::TrackedBody;
use replica_router::pins::RedisPinTable;
use replica_router::pins::{PinError, PinTable};
use replica_router::pool::Pool;
use replica_router::quota::{FailurePolicy, QuotaConfig, QuotaLayer, TenantLimits};
use replica_router::replica::{ReplicaId, ReplicaSpec};
use replica_router::store::{
    CounterStore, RateQuota, RedisStore, RedisStoreConfig, StoreKey, MAX_WINDOW,
};
use tower::util::BoxCloneService;
use tower::{Service, ServiceBuilder, ServiceExt};

type Resp = http::Response<TrackedBody<ChunkBody>>;
type Stack = BoxCloneService<http::Request<()>, Resp, RouteError>;

async fn redis_client(server: &support::RedisServer, timeout: Duration) -> RedisStore {
    RedisStore::connect_with(&server.url(), RedisStoreConfig::default().timeout(timeout))
        .await
        .expect("connect")
}

/// One gateway: its own Redis client, its own pool of no-op replicas, its own stack.
async fn gateway(server: &support::RedisServer, config: QuotaConfig) -> Stack {
    let store = redis_client(server, Duration::from_millis(300)).await;
    let spec = ReplicaSpec::new("m");
    let pool = Pool::builder()
        .replica("r0", spec.clone(), ScriptedBackend::default())
        .replica("r1", spec, ScriptedBackend::default())
        .build()
        .unwrap();
    BoxCloneService::new(
        ServiceBuilder::new()
            .layer(RouteContextLayer::default())
            .layer(QuotaLayer::new(store, config))
            .layer(LeastInFlightLayer::new(pool.clone()))
            .service(Dispatch::new(pool)),
    )
}

fn req(tenant: &str, tokens: u64, script: Script) -> http::Request<()> {
    http::Request::builder()
        .header("x-tenant-id", tenant)
        .header("x-estimated-tokens", tokens.to_string())
        .header("x-script", script.header())
        .body(())
        .unwrap()
}

fn stream(chunks: usize, delay_ms: u64) -> Script {
    Script::Stream { chunks, delay_ms }
}

async fn send(svc: &mut Stack, r: http::Request<()>) -> Result<Resp, RouteError> {
    svc.ready().await?.call(r).await
}

/// Polls `$check` (an expression that may `.await`) until true, for at most 10 s.
macro_rules! wait_for {
    ($what:expr, $check:expr) => {{
        let deadline = StdInstant::now() + Duration::from_secs(10);
        while !$check {
            assert!(
                StdInstant::now() < deadline,
                "timed out waiting for {}",
                $what
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }};
}

/// Requests per window: two gateways, 24 concurrent tasks; the cluster admits exactly the quota
/// in the (one, long) window, never more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gateways_admit_at_most_the_quota() {
    let server = redis_or_skip!();
    let quota = RateQuota::new(100, MAX_WINDOW).unwrap();
    let config = QuotaConfig::new(TenantLimits::unlimited().requests(quota));
    let a = gateway(&server, config.clone()).await;
    let b = gateway(&server, config).await;
    let admitted = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for i in 0..24 {
        let mut svc = if i % 2 == 0 { a.clone() } else { b.clone() };
        let admitted = admitted.clone();
        tasks.push(tokio::spawn(async move {
            for _ in 0..10 {
                match send(&mut svc, req("acme", 0, stream(1, 0))).await {
                    Ok(r) => {
                        admitted.fetch_add(1, Ordering::SeqCst);
                        r.into_body().collect().await.unwrap();
                    }
                    Err(RouteError::QuotaExceeded { .. }) => {}
                    Err(e) => panic!("{e}"),
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    // 240 attempts against a quota of 100: exactly 100 pass (rejected requests that had taken a
    // unit are refunded only when another dimension denied them; here none did).
    assert_eq!(admitted.load(Ordering::SeqCst), 100);
}

/// Short windows: admitted requests per window (in Redis time) never exceed the quota.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gateways_respect_short_windows() {
    let server = redis_or_skip!();
    let quota = RateQuota::new(15, Duration::from_millis(200)).unwrap();
    // No over-limit cache, so every request asks Redis.
    let config = QuotaConfig::new(TenantLimits::unlimited().requests(quota)).cache_capacity(0);
    let a = gateway(&server, config.clone()).await;
    let b = gateway(&server, config).await;
    // Observer: a third client reads the window usage as the run goes.
    let observer = redis_client(&server, Duration::from_secs(2)).await;
    let key = StoreKey::new("quota.req", b"acme").unwrap();
    let max_seen = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicU64::new(0));
    let watcher = {
        let (max_seen, stop, key) = (max_seen.clone(), stop.clone(), key.clone());
        tokio::spawn(async move {
            while stop.load(Ordering::SeqCst) == 0 {
                let u = observer.usage(&key, quota).await.unwrap();
                max_seen.fetch_max(u.used, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(3)).await;
            }
        })
    };
    let admitted = Arc::new(AtomicU64::new(0));
    let started = StdInstant::now();
    let mut tasks = Vec::new();
    for i in 0..16 {
        let mut svc = if i % 2 == 0 { a.clone() } else { b.clone() };
        let admitted = admitted.clone();
        tasks.push(tokio::spawn(async move {
            while started.elapsed() < Duration::from_millis(1000) {
                if let Ok(r) = send(&mut svc, req("acme", 0, stream(1, 0))).await {
                    admitted.fetch_add(1, Ordering::SeqCst);
                    r.into_body().collect().await.unwrap();
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let elapsed = started.elapsed();
    stop.store(1, Ordering::SeqCst);
    watcher.await.unwrap();
    assert!(max_seen.load(Ordering::SeqCst) <= 15);
    // The run touched at most ceil(elapsed / 200 ms) + 1 windows.
    let windows = elapsed.as_millis() as u64 / 200 + 2;
    let total = admitted.load(Ordering::SeqCst);
    assert!(
        total <= 15 * windows,
        "{total} admitted over {windows} windows"
    );
    assert!(total >= 15, "the quota was reached at least once");
}

/// Tokens: estimates reserved at admission are settled to the streamed counts, across two
/// gateways, and concurrency stays within its limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_settle_to_actual_and_concurrency_holds_across_gateways() {
    let server = redis_or_skip!();
    let tq = RateQuota::new(1_000_000, MAX_WINDOW).unwrap();
    let config = QuotaConfig::new(TenantLimits::unlimited().tokens(tq).concurrency(4))
        .token_meter(|c| Some(c.body_frames))
        .concurrency_retry_after(Duration::from_millis(5));
    let a = gateway(&server, config.clone()).await;
    let b = gateway(&server, config).await;
    let actual = Arc::new(AtomicU64::new(0));
    let live = Arc::new(AtomicI64::new(0));
    let max_live = Arc::new(AtomicI64::new(0));
    let mut tasks = Vec::new();
    for i in 0..12u64 {
        let mut svc = if i % 2 == 0 { a.clone() } else { b.clone() };
        let (actual, live, max_live) = (actual.clone(), live.clone(), max_live.clone());
        tasks.push(tokio::spawn(async move {
            let mut served = 0;
            while served < 6 {
                let frames = 1 + (i as usize * 5 + served) % 7;
                let est = 10 + (i * 37 + served as u64) % 50;
                match send(&mut svc, req("tok-tenant", est, stream(frames, 2))).await {
                    Ok(r) => {
                        let n = live.fetch_add(1, Ordering::SeqCst) + 1;
                        max_live.fetch_max(n, Ordering::SeqCst);
                        r.into_body().collect().await.unwrap();
                        live.fetch_sub(1, Ordering::SeqCst);
                        actual.fetch_add(frames as u64, Ordering::SeqCst);
                        served += 1;
                    }
                    Err(RouteError::QuotaExceeded { retry_after, .. }) => {
                        tokio::time::sleep(retry_after).await;
                    }
                    Err(e) => panic!("{e}"),
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert!(max_live.load(Ordering::SeqCst) <= 4);
    let store = redis_client(&server, Duration::from_secs(2)).await;
    let tok = StoreKey::new("quota.tok", b"tok-tenant").unwrap();
    let conc = StoreKey::new("quota.conc", b"tok-tenant").unwrap();
    let expected = actual.load(Ordering::SeqCst);
    wait_for!(
        "settlements",
        store.usage(&tok, tq).await.unwrap().used == expected
    );
    wait_for!("releases", store.in_use(&conc).await.unwrap() == 0);
}

/// Redis stopped mid-run: fail-open admits, fail-closed rejects, both within the timeout;
/// Redis restarted: both gateways use it again without being rebuilt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outage_policies_and_recovery() {
    let mut server = redis_or_skip!();
    let quota = RateQuota::new(1_000_000, MAX_WINDOW).unwrap();
    let base = QuotaConfig::new(TenantLimits::unlimited().requests(quota).concurrency(100))
        .timeout(Duration::from_millis(300))
        .outage_backoff(Duration::from_millis(100));
    let mut open = gateway(&server, base.clone().failure_policy(FailurePolicy::Open)).await;
    let mut closed = gateway(&server, base.failure_policy(FailurePolicy::Closed)).await;
    for svc in [&mut open, &mut closed] {
        let r = send(svc, req("t", 0, stream(1, 0))).await.unwrap();
        r.into_body().collect().await.unwrap();
    }

    server.stop();
    for round in 0..10 {
        for (name, svc) in [("open", &mut open), ("closed", &mut closed)] {
            let started = StdInstant::now();
            let r = send(svc, req("t", 0, stream(1, 0))).await;
            let took = started.elapsed();
            // Bound: the configured timeout plus scheduling slack on a busy machine.
            assert!(
                took < Duration::from_millis(300 + 700),
                "{name} round {round} took {took:?}"
            );
            match (name, r) {
                ("open", Ok(resp)) => {
                    resp.into_body().collect().await.unwrap();
                }
                ("closed", Err(e)) => assert_eq!(e.status_code(), 503, "{e}"),
                (name, r) => panic!("{name}: unexpected {:?}", r.map(|_| ())),
            }
        }
        tokio::time::sleep(Duration::from_millis(40)).await;
    }

    server.restart();
    let observer = redis_client(&server, Duration::from_secs(2)).await;
    let key = StoreKey::new("quota.req", b"t").unwrap();
    // Both gateways count in Redis again: usage grows by their admissions.
    wait_for!(
        "fail-closed gateway to admit again",
        match send(&mut closed, req("t", 0, stream(1, 0))).await {
            Ok(r) => {
                r.into_body().collect().await.unwrap();
                true
            }
            Err(_) => false,
        }
    );
    let before = observer.usage(&key, quota).await.unwrap().used;
    assert!(before >= 1);
    wait_for!("fail-open gateway to count in Redis again", {
        let r = send(&mut open, req("t", 0, stream(1, 0))).await.unwrap();
        r.into_body().collect().await.unwrap();
        observer.usage(&key, quota).await.unwrap().used > before
    });
}

/// An exhausted tenant is rejected from the local cache even while Redis is down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_limit_cache_rejects_without_redis() {
    let mut server = redis_or_skip!();
    let quota = RateQuota::new(2, MAX_WINDOW).unwrap();
    let mut gw = gateway(
        &server,
        QuotaConfig::new(TenantLimits::unlimited().requests(quota))
            .timeout(Duration::from_millis(200)),
    )
    .await;
    for _ in 0..2 {
        let r = send(&mut gw, req("greedy", 0, stream(1, 0))).await.unwrap();
        r.into_body().collect().await.unwrap();
    }
    assert!(send(&mut gw, req("greedy", 0, stream(1, 0))).await.is_err());
    server.stop();
    let started = StdInstant::now();
    let e = send(&mut gw, req("greedy", 0, stream(1, 0)))
        .await
        .unwrap_err();
    assert!(matches!(e, RouteError::QuotaExceeded { .. }), "{e}");
    assert!(
        started.elapsed() < Duration::from_millis(100),
        "answered from the cache"
    );
}

/// Shared session pins: two gateways' pin tables see one pin; compare-and-delete; TTL;
/// hostile session ids; failure policy with Redis down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_pin_table_is_shared_and_fails_by_policy() {
    let mut server = redis_or_skip!();
    // No near-cache freshness: each read goes to Redis while it is up.
    let a = RedisPinTable::new(&redis_client(&server, Duration::from_millis(200)).await)
        .near_cache(64, Duration::ZERO);
    let b = RedisPinTable::new(&redis_client(&server, Duration::from_millis(200)).await)
        .near_cache(64, Duration::ZERO)
        .failure_policy(FailurePolicy::Closed);
    let r0 = ReplicaId::new("gpu-0").unwrap();
    let r1 = ReplicaId::new("gpu-1").unwrap();
    let sessions: Vec<RouteKey> = vec![
        RouteKey::from("conv-1"),
        RouteKey::from(vec![0xff, b'{', b'}', b'\n', 0]),
        RouteKey::from(vec![b'x'; 1 << 20]),
        RouteKey::from(""),
    ];
    for (i, s) in sessions.iter().enumerate() {
        let r = if i % 2 == 0 { &r0 } else { &r1 };
        a.pin(s, r, Duration::from_secs(60)).await.unwrap();
    }
    for (i, s) in sessions.iter().enumerate() {
        let r = if i % 2 == 0 { &r0 } else { &r1 };
        assert_eq!(b.get(s).await.unwrap().as_ref(), Some(r), "session {i}");
    }
    // Unpin with a stale replica keeps the newer pin; with the right one removes it.
    b.unpin(&sessions[0], &r1).await.unwrap();
    assert_eq!(a.get(&sessions[0]).await.unwrap(), Some(r0.clone()));
    b.unpin(&sessions[0], &r0).await.unwrap();
    assert_eq!(a.get(&sessions[0]).await.unwrap(), None);
    // TTL: idle pins vanish.
    a.pin(&sessions[0], &r1, Duration::from_millis(50))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(120)).await;
    assert_eq!(b.get(&sessions[0]).await.unwrap(), None);

    server.stop();
    let started = StdInstant::now();
    assert_eq!(
        a.get(&sessions[1]).await.unwrap(),
        Some(r1.clone()),
        "fail open: the pin this gateway wrote, from its near-cache"
    );
    assert_eq!(
        a.get(&RouteKey::from("never-seen")).await.unwrap(),
        None,
        "fail open: no pin"
    );
    a.pin(&sessions[1], &r0, Duration::from_secs(1))
        .await
        .unwrap();
    let e = b.get(&sessions[1]).await.unwrap_err();
    assert!(matches!(e, PinError::Timeout | PinError::Store(_)), "{e}");
    assert!(started.elapsed() < Duration::from_secs(3));

    server.restart();
    wait_for!(
        "pins to work again",
        (a.pin(&sessions[1], &r0, Duration::from_secs(60))
            .await
            .is_ok()
            && b.get(&sessions[1]).await.ok().flatten() == Some(r0.clone()))
    );
}
