//! The tenant quota layer over foundation dispatch, with the in-memory store and tokio's paused
//! clock (exact timing), plus failing and hanging stores for the failure policy.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{ChunkBody, Script, ScriptedBackend};
use http_body_util::BodyExt;
use replica_router::balance::LeastInFlightLayer;
use replica_router::context::{RouteContextLayer, RouteKey};
use replica_router::dispatch::Dispatch;
use replica_router::error::RouteError;
use replica_router::inflight::TrackedBody;
use replica_router::pool::Pool;
use replica_router::quota::{
    FailurePolicy, MissingTenant, QuotaConfig, QuotaLayer, TenantLimits, TokenReport,
};
use replica_router::replica::ReplicaSpec;
use replica_router::store::{
    Acquire, CounterStore, LeaseId, MemoryStore, RateQuota, Settled, StoreError, StoreFuture,
    StoreKey, Take, Usage, WindowId, MAX_WINDOW,
};
use tower::util::BoxCloneService;
use tower::{BoxError, Service, ServiceBuilder, ServiceExt};

type Resp = http::Response<TrackedBody<ChunkBody>>;

fn pool() -> Pool<ScriptedBackend> {
    let spec = ReplicaSpec::new("m");
    Pool::builder()
        .replica("r0", spec.clone(), ScriptedBackend::default())
        .replica("r1", spec, ScriptedBackend::default())
        .build()
        .unwrap()
}

type Stack = BoxCloneService<http::Request<()>, Resp, RouteError>;

fn stack_on(store: impl CounterStore, config: QuotaConfig, pool: Pool<ScriptedBackend>) -> Stack {
    BoxCloneService::new(
        ServiceBuilder::new()
            .layer(RouteContextLayer::default())
            .layer(QuotaLayer::new(store, config))
            .layer(LeastInFlightLayer::new(pool.clone()))
            .service(Dispatch::new(pool)),
    )
}

fn stack(store: impl CounterStore, config: QuotaConfig) -> Stack {
    stack_on(store, config, pool())
}

async fn admitted(svc: &mut Stack, t: Option<&'static [u8]>) -> bool {
    send(svc, req(t, 0, stream(1))).await.is_ok()
}

fn req(tenant: Option<&[u8]>, tokens: u64, script: Script) -> http::Request<()> {
    let mut b = http::Request::builder()
        .header("x-script", script.header())
        .header("x-estimated-tokens", tokens.to_string());
    if let Some(t) = tenant {
        b = b.header("x-tenant-id", http::HeaderValue::from_bytes(t).unwrap());
    }
    b.body(()).unwrap()
}

fn stream(chunks: usize) -> Script {
    Script::Stream {
        chunks,
        delay_ms: 0,
    }
}

async fn send<S>(svc: &mut S, r: http::Request<()>) -> Result<Resp, RouteError>
where
    S: Service<http::Request<()>, Response = Resp, Error = RouteError>,
{
    svc.ready().await?.call(r).await
}

async fn drain(resp: Resp) -> usize {
    resp.into_body().collect().await.unwrap().to_bytes().len()
}

/// Lets spawned settle/release tasks run (paused clock: sleeping auto-advances).
async fn settle_tasks() {
    for _ in 0..5 {
        tokio::task::yield_now().await;
    }
    tokio::time::sleep(Duration::from_millis(1)).await;
}

#[tokio::test(start_paused = true)]
async fn requests_per_window_with_retry_after_and_429() {
    let quota = RateQuota::new(3, Duration::from_secs(10)).unwrap();
    let mut svc = stack(
        MemoryStore::new(),
        QuotaConfig::new(TenantLimits::unlimited().requests(quota)),
    );
    tokio::time::advance(Duration::from_secs(4)).await;
    for _ in 0..3 {
        let r = send(&mut svc, req(Some(b"acme"), 0, stream(1)))
            .await
            .unwrap();
        drain(r).await;
    }
    let err = send(&mut svc, req(Some(b"acme"), 0, stream(1)))
        .await
        .unwrap_err();
    let RouteError::QuotaExceeded {
        ref tenant,
        retry_after,
    } = err
    else {
        panic!("{err:?}")
    };
    assert_eq!(tenant, "acme");
    assert_eq!(retry_after, Duration::from_secs(6));
    assert_eq!(err.status_code(), 429);
    assert_eq!(err.retry_after_header().unwrap(), "6");
    // Another tenant is unaffected.
    assert!(send(&mut svc, req(Some(b"other"), 0, stream(1)))
        .await
        .is_ok());
    tokio::time::advance(retry_after).await;
    assert!(send(&mut svc, req(Some(b"acme"), 0, stream(1)))
        .await
        .is_ok());
}

#[tokio::test(start_paused = true)]
async fn many_concurrent_tasks_admit_exactly_the_quota_per_window() {
    let quota = RateQuota::new(20, Duration::from_millis(100)).unwrap();
    let store = MemoryStore::new();
    // Two stacks over one store: two gateways in one process.
    let a = stack(
        store.clone(),
        QuotaConfig::new(TenantLimits::unlimited().requests(quota)),
    );
    let b = stack(
        store.clone(),
        QuotaConfig::new(TenantLimits::unlimited().requests(quota)),
    );
    let mut tasks = Vec::new();
    for i in 0..30u64 {
        let mut svc = if i % 2 == 0 { a.clone() } else { b.clone() };
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let mut admitted = Vec::new();
            for j in 0..60u64 {
                let before = store.now_ms() / 100;
                match send(&mut svc, req(Some(b"t"), 0, stream(1))).await {
                    Ok(r) => {
                        assert_eq!(store.now_ms() / 100, before, "paused clock: same window");
                        admitted.push(before);
                        drain(r).await;
                    }
                    Err(RouteError::QuotaExceeded { .. }) => {}
                    Err(e) => panic!("{e}"),
                }
                tokio::time::sleep(Duration::from_millis(1 + (i + j) % 9)).await;
            }
            admitted
        }));
    }
    let mut per_window = std::collections::BTreeMap::<u64, u64>::new();
    for t in tasks {
        for w in t.await.unwrap() {
            *per_window.entry(w).or_default() += 1;
        }
    }
    assert!(per_window.len() >= 3);
    assert!(per_window.values().all(|&n| n <= 20), "{per_window:?}");
    let full: Vec<_> = per_window.values().take(per_window.len() - 1).collect();
    assert!(full.iter().all(|&&n| n == 20), "{per_window:?}");
}

#[tokio::test(start_paused = true)]
async fn tokens_reserved_then_settled_to_streamed_frames() {
    let store = MemoryStore::new();
    let quota = RateQuota::new(10_000, MAX_WINDOW).unwrap();
    let config = QuotaConfig::new(TenantLimits::unlimited().tokens(quota))
        .token_meter(|c| Some(c.body_frames));
    let mut svc = stack(store.clone(), config);
    let key = StoreKey::new("quota.tok", b"t").unwrap();
    let mut expected = 0;
    for (est, frames) in [(100u64, 3usize), (5, 40), (0, 7), (50, 50)] {
        let r = send(&mut svc, req(Some(b"t"), est, stream(frames)))
            .await
            .unwrap();
        // While the body streams, the estimate is reserved.
        assert_eq!(store.usage(&key, quota).await.unwrap().used, expected + est);
        drain(r).await;
        settle_tasks().await;
        expected += frames as u64;
        assert_eq!(store.usage(&key, quota).await.unwrap().used, expected);
    }
    // A body dropped mid-stream settles to what was delivered (zero frames polled here).
    let r = send(&mut svc, req(Some(b"t"), 80, stream(10)))
        .await
        .unwrap();
    drop(r);
    settle_tasks().await;
    assert_eq!(store.usage(&key, quota).await.unwrap().used, expected);
}

#[tokio::test(start_paused = true)]
async fn token_estimate_over_limit_is_clamped_and_exhaustion_rejects() {
    let store = MemoryStore::new();
    let quota = RateQuota::new(100, Duration::from_secs(60)).unwrap();
    let config = QuotaConfig::new(TenantLimits::unlimited().tokens(quota))
        .token_meter(|c| Some(c.estimated_tokens));
    let mut svc = stack(store.clone(), config);
    // 500 estimated > 100 per window: admitted (reserving the whole window), then charged 500.
    let r = send(&mut svc, req(Some(b"big"), 500, stream(1)))
        .await
        .unwrap();
    drain(r).await;
    settle_tasks().await;
    let key = StoreKey::new("quota.tok", b"big").unwrap();
    assert_eq!(store.usage(&key, quota).await.unwrap().used, 500);
    let err = send(&mut svc, req(Some(b"big"), 1, stream(1)))
        .await
        .unwrap_err();
    assert!(matches!(err, RouteError::QuotaExceeded { .. }));
}

/// The TokenReport handle in the request wins over the meter; works without dispatch too.
#[tokio::test(start_paused = true)]
async fn reported_tokens_win() {
    let store = MemoryStore::new();
    let quota = RateQuota::new(10_000, MAX_WINDOW).unwrap();
    let config =
        QuotaConfig::new(TenantLimits::unlimited().tokens(quota)).token_meter(|_| Some(999_999));
    let inner = tower::service_fn(|r: http::Request<()>| async move {
        r.extensions()
            .get::<TokenReport>()
            .expect("handle present")
            .report(42);
        Ok::<_, RouteError>(http::Response::new(()))
    });
    let mut svc = ServiceBuilder::new()
        .layer(RouteContextLayer::default())
        .layer(QuotaLayer::new(store.clone(), config))
        .service(inner);
    svc.ready()
        .await
        .unwrap()
        .call(req(Some(b"t"), 300, stream(1)))
        .await
        .unwrap();
    settle_tasks().await;
    let key = StoreKey::new("quota.tok", b"t").unwrap();
    assert_eq!(store.usage(&key, quota).await.unwrap().used, 42);
}

#[tokio::test(start_paused = true)]
async fn concurrency_released_on_body_end_error_cancel_and_no_replica() {
    let store = MemoryStore::new();
    let config = QuotaConfig::new(TenantLimits::unlimited().concurrency(2))
        .concurrency_retry_after(Duration::from_millis(700));
    let mut svc = stack(store.clone(), config.clone());
    let key = StoreKey::new("quota.conc", b"t").unwrap();
    let slow = Script::Stream {
        chunks: 2,
        delay_ms: 50,
    };
    let a = send(&mut svc, req(Some(b"t"), 0, slow)).await.unwrap();
    let b = send(&mut svc, req(Some(b"t"), 0, slow)).await.unwrap();
    let err = send(&mut svc, req(Some(b"t"), 0, slow)).await.unwrap_err();
    assert_eq!(err.retry_after(), Some(Duration::from_millis(700)));
    assert_eq!(store.in_use(&key).await.unwrap(), 2);
    drain(a).await; // body ends
    drop(b); // client hangs up mid-stream
    settle_tasks().await;
    assert_eq!(store.in_use(&key).await.unwrap(), 0);

    // Backend error (502) and a 500 response: both release.
    let e = send(&mut svc, req(Some(b"t"), 0, Script::Error))
        .await
        .unwrap_err();
    assert_eq!(e.status_code(), 502);
    let r = send(&mut svc, req(Some(b"t"), 0, Script::ServerError))
        .await
        .unwrap();
    drain(r).await;
    settle_tasks().await;
    assert_eq!(store.in_use(&key).await.unwrap(), 0);
    // The request future dropped before completion (cancelled by a timeout).
    let fut =
        svc.ready()
            .await
            .unwrap()
            .call(req(Some(b"t"), 0, Script::Slow { delay_ms: 10_000 }));
    assert!(tokio::time::timeout(Duration::from_millis(10), fut)
        .await
        .is_err());
    settle_tasks().await;
    assert_eq!(store.in_use(&key).await.unwrap(), 0);

    // No replica at all: the error comes from inside the stack, the lease is released.
    let empty: Pool<ScriptedBackend> = Pool::builder().allow_empty().build().unwrap();
    let mut svc = stack_on(store.clone(), config, empty);
    let e = send(&mut svc, req(Some(b"t"), 0, stream(1)))
        .await
        .unwrap_err();
    assert_eq!(e.status_code(), 503);
    settle_tasks().await;
    assert_eq!(store.in_use(&key).await.unwrap(), 0);
}

#[tokio::test(start_paused = true)]
async fn tokens_refunded_when_no_replica_takes_the_request() {
    let store = MemoryStore::new();
    let quota = RateQuota::new(1000, MAX_WINDOW).unwrap();
    let empty: Pool<ScriptedBackend> = Pool::builder().allow_empty().build().unwrap();
    let mut svc = stack_on(
        store.clone(),
        QuotaConfig::new(TenantLimits::unlimited().tokens(quota)),
        empty,
    );
    assert!(send(&mut svc, req(Some(b"t"), 300, stream(1)))
        .await
        .is_err());
    settle_tasks().await;
    let key = StoreKey::new("quota.tok", b"t").unwrap();
    assert_eq!(store.usage(&key, quota).await.unwrap().used, 0);
}

#[tokio::test(start_paused = true)]
async fn a_denied_dimension_undoes_the_others() {
    let store = MemoryStore::new();
    let rq = RateQuota::new(100, MAX_WINDOW).unwrap();
    let tq = RateQuota::new(10, MAX_WINDOW).unwrap();
    let config = QuotaConfig::new(
        TenantLimits::unlimited()
            .requests(rq)
            .tokens(tq)
            .concurrency(5),
    );
    let mut svc = stack(store.clone(), config);
    let r = send(&mut svc, req(Some(b"t"), 10, stream(1)))
        .await
        .unwrap();
    // Tokens exhausted (10 of 10 reserved while the body is alive).
    let err = send(&mut svc, req(Some(b"t"), 1, stream(1)))
        .await
        .unwrap_err();
    assert!(matches!(err, RouteError::QuotaExceeded { .. }));
    settle_tasks().await;
    let rk = StoreKey::new("quota.req", b"t").unwrap();
    let ck = StoreKey::new("quota.conc", b"t").unwrap();
    assert_eq!(
        store.usage(&rk, rq).await.unwrap().used,
        1,
        "the denied request was refunded"
    );
    assert_eq!(
        store.in_use(&ck).await.unwrap(),
        1,
        "its lease was released"
    );
    drain(r).await;
}

#[tokio::test(start_paused = true)]
async fn overrides_defaults_and_missing_tenant() {
    let one = RateQuota::new(1, MAX_WINDOW).unwrap();
    let three = RateQuota::new(3, MAX_WINDOW).unwrap();
    let store = MemoryStore::new();
    let config = QuotaConfig::new(TenantLimits::unlimited().requests(one))
        .tenant("vip", TenantLimits::unlimited().requests(three))
        .tenant("free-for-all", TenantLimits::unlimited());
    let mut svc = stack(store.clone(), config.clone());
    assert!(admitted(&mut svc, Some(b"plain")).await);
    assert!(!admitted(&mut svc, Some(b"plain")).await);
    for _ in 0..3 {
        assert!(admitted(&mut svc, Some(b"vip")).await);
    }
    assert!(!admitted(&mut svc, Some(b"vip")).await);
    for _ in 0..10 {
        assert!(admitted(&mut svc, Some(b"free-for-all")).await);
        assert!(
            admitted(&mut svc, None).await,
            "no tenant: skipped by default"
        );
    }
    let mut svc = stack(
        store.clone(),
        config.missing_tenant(MissingTenant::As(RouteKey::from("anonymous"))),
    );
    assert!(admitted(&mut svc, None).await);
    assert!(
        !admitted(&mut svc, None).await,
        "all anonymous requests share one quota"
    );
}

/// A store that counts calls and can be switched to fail or hang.
#[derive(Clone, Default)]
struct FlakyStore {
    inner: MemoryStore,
    calls: Arc<AtomicUsize>,
    mode: Arc<AtomicUsize>, // 0 ok, 1 error, 2 hang
}

impl FlakyStore {
    fn wrap<'a, T: Send + 'a>(&'a self, f: StoreFuture<'a, T>) -> StoreFuture<'a, T> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        match self.mode.load(Ordering::SeqCst) {
            0 => f,
            1 => Box::pin(async {
                Err(StoreError::Unavailable {
                    source: "connection refused".into(),
                })
            }),
            _ => Box::pin(std::future::pending()),
        }
    }
}

impl CounterStore for FlakyStore {
    fn take<'a>(&'a self, k: &'a StoreKey, q: RateQuota, c: u64) -> StoreFuture<'a, Take> {
        self.wrap(self.inner.take(k, q, c))
    }
    fn settle<'a>(
        &'a self,
        k: &'a StoreKey,
        q: RateQuota,
        w: WindowId,
        d: i64,
    ) -> StoreFuture<'a, Settled> {
        self.wrap(self.inner.settle(k, q, w, d))
    }
    fn usage<'a>(&'a self, k: &'a StoreKey, q: RateQuota) -> StoreFuture<'a, Usage> {
        self.wrap(self.inner.usage(k, q))
    }
    fn acquire<'a>(&'a self, k: &'a StoreKey, l: u64, t: Duration) -> StoreFuture<'a, Acquire> {
        self.wrap(self.inner.acquire(k, l, t))
    }
    fn release<'a>(&'a self, k: &'a StoreKey, l: LeaseId) -> StoreFuture<'a, bool> {
        self.wrap(self.inner.release(k, l))
    }
    fn renew<'a>(&'a self, k: &'a StoreKey, l: LeaseId, t: Duration) -> StoreFuture<'a, bool> {
        self.wrap(self.inner.renew(k, l, t))
    }
    fn in_use<'a>(&'a self, k: &'a StoreKey) -> StoreFuture<'a, u64> {
        self.wrap(self.inner.in_use(k))
    }
}

#[tokio::test(start_paused = true)]
async fn over_limit_tenants_cost_no_round_trip_until_their_window_ends() {
    let store = FlakyStore::default();
    let quota = RateQuota::new(2, Duration::from_secs(1)).unwrap();
    let mut svc = stack(
        store.clone(),
        QuotaConfig::new(TenantLimits::unlimited().requests(quota)),
    );
    for _ in 0..2 {
        assert!(send(&mut svc, req(Some(b"t"), 0, stream(1))).await.is_ok());
    }
    assert!(send(&mut svc, req(Some(b"t"), 0, stream(1))).await.is_err());
    let calls = store.calls.load(Ordering::SeqCst);
    for _ in 0..100 {
        let e = send(&mut svc, req(Some(b"t"), 0, stream(1)))
            .await
            .unwrap_err();
        assert!(e.retry_after().unwrap() <= Duration::from_secs(1));
    }
    assert_eq!(
        store.calls.load(Ordering::SeqCst),
        calls,
        "no store call while cached"
    );
    tokio::time::advance(Duration::from_secs(1)).await;
    assert!(send(&mut svc, req(Some(b"t"), 0, stream(1))).await.is_ok());
    assert!(store.calls.load(Ordering::SeqCst) > calls);
}

#[tokio::test(start_paused = true)]
async fn failure_policy_open_and_closed_with_bounded_waits_and_recovery() {
    for policy in [FailurePolicy::Open, FailurePolicy::Closed] {
        let store = FlakyStore::default();
        let quota = RateQuota::new(1000, MAX_WINDOW).unwrap();
        let config = QuotaConfig::new(TenantLimits::unlimited().requests(quota).concurrency(10))
            .failure_policy(policy)
            .timeout(Duration::from_millis(250))
            .outage_backoff(Duration::from_secs(2));
        let mut svc = stack(store.clone(), config);
        assert!(send(&mut svc, req(Some(b"t"), 0, stream(1))).await.is_ok());

        for mode in [1, 2] {
            // 1: the store errors at once; 2: it hangs (the timeout bounds the wait).
            store.mode.store(mode, Ordering::SeqCst);
            let started = tokio::time::Instant::now();
            let r = send(&mut svc, req(Some(b"t"), 0, stream(1))).await;
            let waited = started.elapsed();
            assert!(waited <= Duration::from_millis(250), "{waited:?}");
            match policy {
                FailurePolicy::Open => {
                    drain(r.expect("fail-open admits")).await;
                }
                FailurePolicy::Closed => {
                    let e = r.expect_err("fail-closed rejects");
                    assert_eq!(e.status_code(), 503, "{e}");
                }
            }
            // During the backoff the store is not called and answers come at once.
            let calls = store.calls.load(Ordering::SeqCst);
            let started = tokio::time::Instant::now();
            for _ in 0..10 {
                let r = send(&mut svc, req(Some(b"t"), 0, stream(1))).await;
                assert_eq!(r.is_ok(), policy == FailurePolicy::Open);
            }
            assert_eq!(started.elapsed(), Duration::ZERO);
            assert_eq!(store.calls.load(Ordering::SeqCst), calls);
            // The store comes back; after the backoff the layer uses it again.
            store.mode.store(0, Ordering::SeqCst);
            tokio::time::advance(Duration::from_secs(2)).await;
            let r = send(&mut svc, req(Some(b"t"), 0, stream(1))).await;
            drain(r.expect("recovered")).await;
            assert!(store.calls.load(Ordering::SeqCst) > calls);
        }
    }
}

#[tokio::test(start_paused = true)]
async fn metrics_use_tenant_classes_not_ids() {
    use metrics_util::debugging::{DebugValue, DebuggingRecorder};
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let _guard = metrics::set_default_local_recorder(&recorder);

    let one = RateQuota::new(1, MAX_WINDOW).unwrap();
    let config = QuotaConfig::new(TenantLimits::unlimited().requests(one)).tenant_in_class(
        "big-co",
        TenantLimits::unlimited().requests(one),
        "enterprise",
    );
    let mut svc = stack(MemoryStore::new(), config);
    for t in [
        &b"secret-tenant-1"[..],
        b"secret-tenant-1",
        b"big-co",
        b"big-co",
    ] {
        let _ = send(&mut svc, req(Some(t), 0, stream(1))).await;
    }
    let snap = snapshot_to_vec(snapshotter.snapshot());
    let text = format!("{snap:?}");
    assert!(!text.contains("secret-tenant"), "{text}");
    assert!(!text.contains("big-co"), "{text}");
    let count = |name: &str, labels: &[(&str, &str)]| -> u64 {
        snap.iter()
            .filter(|(k, _)| {
                k.0 == name
                    && labels
                        .iter()
                        .all(|(l, v)| k.1.iter().any(|(kl, kv)| kl == l && kv == v))
            })
            .map(|(_, v)| match v {
                DebugValue::Counter(n) => *n,
                _ => 0,
            })
            .sum()
    };
    let checks = "replica_router_quota_checks_total";
    assert_eq!(
        count(checks, &[("class", "default"), ("result", "admitted")]),
        1
    );
    assert_eq!(
        count(checks, &[("class", "default"), ("result", "rejected")]),
        1
    );
    assert_eq!(
        count(checks, &[("class", "enterprise"), ("result", "admitted")]),
        1
    );
    assert_eq!(
        count(
            "replica_router_quota_rejections_total",
            &[("class", "enterprise"), ("dimension", "requests")]
        ),
        1
    );
    assert!(snap
        .iter()
        .any(|(k, _)| k.0 == "replica_router_store_call_seconds"));
}

type Flat = Vec<(
    (String, Vec<(String, String)>),
    metrics_util::debugging::DebugValue,
)>;

fn snapshot_to_vec(s: metrics_util::debugging::Snapshot) -> Flat {
    s.into_vec()
        .into_iter()
        .map(|(ck, _, _, v)| {
            let key = ck.key();
            (
                (
                    key.name().to_owned(),
                    key.labels()
                        .map(|l| (l.key().to_owned(), l.value().to_owned()))
                        .collect(),
                ),
                v,
            )
        })
        .collect()
}

#[allow(dead_code)]
fn _error_type_is_boxable(e: RouteError) -> BoxError {
    Box::new(e)
}
