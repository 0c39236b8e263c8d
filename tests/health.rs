//! Health on tokio's paused clock: ejection, re-admission with slow start, drain, failover,
//! active probes and load scraping.

mod common;

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use common::ChunkBody;
use http_body_util::BodyExt;
use parking_lot::Mutex;
use replica_router::backend::{Backend, BoxFuture, LoadReport};
use replica_router::balance::LeastInFlightLayer;
use replica_router::decision::{Decision, DecisionReason};
use replica_router::dispatch::Dispatch;
use replica_router::error::{BoxError, RouteError};
use replica_router::health::{
    drain_and_remove, DrainOutcome, FailoverLayer, HealthCheckConfig, HealthChecker, OutlierConfig,
    OutlierDetectionLayer, OutlierDetector,
};
use replica_router::inflight::{Completion, CompletionObserver, Outcome, TrackedBody};
use replica_router::load::WaitEstimator;
use replica_router::pool::{Health, Pool, SlowStart};
use replica_router::replica::{ReplicaId, ReplicaSpec};
use replica_router::request::RouteRequest;
use replica_router::rng::RngSeed;
use tokio::time::Instant;
use tower::{Service, ServiceBuilder, ServiceExt};

/// A replica whose behaviour the test switches: 500s, refused connections, failing probes, a
/// load report; responses stream `chunks` chunks `chunk_ms` apart.
#[derive(Clone, Default)]
struct TestReplica {
    calls: Arc<AtomicUsize>,
    fail_500: Arc<AtomicBool>,
    refuse: Arc<AtomicBool>,
    probe_fails: Arc<AtomicBool>,
    report: Arc<Mutex<Option<LoadReport>>>,
    chunks: usize,
    chunk_ms: u64,
}

impl TestReplica {
    fn streaming(chunks: usize, chunk_ms: u64) -> Self {
        TestReplica {
            chunks,
            chunk_ms,
            ..Default::default()
        }
    }
}

impl Backend for TestReplica {
    fn probe(&self) -> BoxFuture<'static, Result<(), BoxError>> {
        let fails = self.probe_fails.load(Ordering::SeqCst);
        Box::pin(async move {
            if fails {
                Err("probe failed".into())
            } else {
                Ok(())
            }
        })
    }

    fn load_report(&self) -> BoxFuture<'static, Result<Option<LoadReport>, BoxError>> {
        let r = *self.report.lock();
        Box::pin(async move { Ok(r) })
    }
}

impl Service<http::Request<()>> for TestReplica {
    type Response = http::Response<ChunkBody>;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _req: http::Request<()>) -> Self::Future {
        if self.refuse.load(Ordering::SeqCst) {
            return Box::pin(async {
                Err(std::io::Error::from(std::io::ErrorKind::ConnectionRefused))
            });
        }
        self.calls.fetch_add(1, Ordering::SeqCst);
        let fail = self.fail_500.load(Ordering::SeqCst);
        let body = ChunkBody::new(self.chunks.max(1), Duration::from_millis(self.chunk_ms));
        Box::pin(async move {
            let mut r = http::Response::new(body);
            if fail {
                *r.status_mut() = http::StatusCode::INTERNAL_SERVER_ERROR;
            }
            Ok(r)
        })
    }
}

type Resp = http::Response<TrackedBody<ChunkBody>>;

fn pool_of(replicas: &[(&str, TestReplica)], slow_start: SlowStart) -> Pool<TestReplica> {
    let mut b = Pool::builder().slow_start(slow_start);
    for (id, r) in replicas {
        b = b.replica(*id, ReplicaSpec::new("m"), r.clone());
    }
    b.build().unwrap()
}

fn health(pool: &Pool<TestReplica>, id: &str) -> Health {
    pool.snapshot().get(id).unwrap().1.state().health()
}

fn in_flight(pool: &Pool<TestReplica>) -> Vec<u64> {
    pool.snapshot()
        .replicas()
        .iter()
        .map(|r| r.state().in_flight())
        .collect()
}

fn replica_of(resp: &Resp) -> String {
    resp.extensions()
        .get::<Decision>()
        .unwrap()
        .replica()
        .to_string()
}

#[tokio::test(start_paused = true)]
async fn ejected_replica_gets_no_traffic_until_readmitted_then_ramps() {
    let good = TestReplica::default();
    let bad = TestReplica::default();
    let window = Duration::from_secs(10);
    let pool = pool_of(
        &[("good", good.clone()), ("bad", bad.clone())],
        SlowStart::linear(window),
    );
    let detector = OutlierDetector::new(
        pool.clone(),
        OutlierConfig {
            consecutive_failures: 3,
            base_ejection: Duration::from_secs(30),
            ..Default::default()
        },
    );
    let mut svc = ServiceBuilder::new()
        .layer(OutlierDetectionLayer::new(&detector))
        .layer(LeastInFlightLayer::new(pool.clone()).seed(RngSeed::fixed(11)))
        .service(Dispatch::with_seed(pool.clone(), RngSeed::fixed(12)));

    // "bad" answers 500: three in a row eject it.
    bad.fail_500.store(true, Ordering::SeqCst);
    let mut n = 0;
    while health(&pool, "bad") == Health::Healthy {
        let resp = svc
            .ready()
            .await
            .unwrap()
            .call(http::Request::new(()))
            .await
            .unwrap();
        let _ = resp.into_body().collect().await;
        n += 1;
        assert!(n < 100, "never ejected");
    }
    let ejected_at = Instant::now();
    assert_eq!(bad.calls.load(Ordering::SeqCst), 3);
    assert_eq!(detector.ejections("bad"), 1);
    bad.fail_500.store(false, Ordering::SeqCst);

    // Ejected for 30 s: no request reaches it, however many arrive.
    for _ in 0..290 {
        let resp = svc
            .ready()
            .await
            .unwrap()
            .call(http::Request::new(()))
            .await
            .unwrap();
        assert_eq!(replica_of(&resp), "good");
        let _ = resp.into_body().collect().await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ejected_at.elapsed() < Duration::from_secs(30));
    assert_eq!(bad.calls.load(Ordering::SeqCst), 3);
    assert_eq!(health(&pool, "bad"), Health::Ejected);

    // The ejection timer re-admits it at exactly 30 s, with slow start.
    tokio::time::sleep_until(ejected_at + Duration::from_secs(30)).await;
    tokio::task::yield_now().await;
    assert_eq!(health(&pool, "bad"), Health::Healthy);
    let readmitted_at = Instant::now();

    // Its share of 20 concurrent requests ramps with its weight: ~f/(1+f) of them.
    let mut shares = Vec::new();
    for at in [0u64, 5, 10] {
        tokio::time::sleep_until(readmitted_at + Duration::from_secs(at)).await;
        let mut held = Vec::new();
        for _ in 0..20 {
            held.push(
                svc.ready()
                    .await
                    .unwrap()
                    .call(http::Request::new(()))
                    .await
                    .unwrap(),
            );
        }
        shares.push(held.iter().filter(|r| replica_of(r) == "bad").count());
        drop(held);
        assert_eq!(in_flight(&pool), vec![0, 0]);
    }
    // Weight factor 0.1, 0.5, 1.0: 20 x f / (1 + f) = 1.8, 6.7, 10.
    assert!(shares[0] <= 3, "{shares:?}");
    assert!((5..=8).contains(&shares[1]), "{shares:?}");
    assert!(shares[2] >= 9, "{shares:?}");
}

#[tokio::test(start_paused = true)]
async fn repeated_ejections_back_off() {
    let bad = TestReplica::default();
    bad.fail_500.store(true, Ordering::SeqCst);
    let pool = pool_of(
        &[("good", TestReplica::default()), ("bad", bad.clone())],
        SlowStart::DISABLED,
    );
    let detector = OutlierDetector::new(
        pool.clone(),
        OutlierConfig {
            consecutive_failures: 2,
            base_ejection: Duration::from_secs(10),
            max_ejection: Duration::from_secs(35),
            ..Default::default()
        },
    );
    let mut svc = ServiceBuilder::new()
        .layer(OutlierDetectionLayer::new(&detector))
        .service(Dispatch::with_seed(pool.clone(), RngSeed::fixed(1)));
    let to_bad = || {
        let mut req = http::Request::new(());
        req.set_decision(Decision::new(
            ReplicaId::new("bad").unwrap(),
            DecisionReason::Home,
        ));
        req
    };
    let mut lengths = Vec::new();
    for _ in 0..4 {
        while health(&pool, "bad") == Health::Healthy {
            let resp = svc.ready().await.unwrap().call(to_bad()).await.unwrap();
            let _ = resp.into_body().collect().await;
        }
        let start = Instant::now();
        let until = detector.ejected_until("bad").unwrap();
        lengths.push((until - start).as_secs());
        tokio::time::sleep_until(until - Duration::from_millis(1)).await;
        assert_eq!(health(&pool, "bad"), Health::Ejected);
        tokio::time::sleep_until(until).await;
        tokio::task::yield_now().await;
        assert_eq!(health(&pool, "bad"), Health::Healthy);
    }
    // 10, 20, 40 capped at 35, 35.
    assert_eq!(lengths, [10, 20, 35, 35]);
}

#[tokio::test(start_paused = true)]
async fn draining_replica_finishes_in_flight_and_gets_no_new_request() {
    // Streams of 5 chunks, 1 s apart.
    let a = TestReplica::streaming(5, 1000);
    let b = TestReplica::streaming(5, 1000);
    let pool = pool_of(&[("a", a.clone()), ("b", b.clone())], SlowStart::DISABLED);
    let mut svc = ServiceBuilder::new()
        .layer(LeastInFlightLayer::new(pool.clone()).seed(RngSeed::fixed(5)))
        .service(Dispatch::with_seed(pool.clone(), RngSeed::fixed(6)));
    // Ten streams in flight, about half on each replica.
    let mut streams = Vec::new();
    for _ in 0..10 {
        streams.push(
            svc.ready()
                .await
                .unwrap()
                .call(http::Request::new(()))
                .await
                .unwrap(),
        );
    }
    let on_a = streams.iter().filter(|r| replica_of(r) == "a").count();
    assert_eq!(in_flight(&pool), vec![on_a as u64, 10 - on_a as u64]);
    let calls_a = a.calls.load(Ordering::SeqCst);

    let drain = pool.drain("a").unwrap();
    assert!(!drain.is_drained());
    let drained_at = {
        let d = drain.clone();
        tokio::spawn(async move {
            d.wait().await;
            Instant::now()
        })
    };
    // The streams are read to the end, in parallel.
    let start = Instant::now();
    let readers: Vec<_> = streams
        .into_iter()
        .map(|r| tokio::spawn(async move { r.into_body().collect().await.unwrap().to_bytes() }))
        .collect();
    // Meanwhile new requests keep coming: none goes to "a".
    for _ in 0..50 {
        let r = svc
            .ready()
            .await
            .unwrap()
            .call(http::Request::new(()))
            .await
            .unwrap();
        assert_eq!(replica_of(&r), "b");
        drop(r);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for r in readers {
        // Every in-flight stream on the draining replica finished whole.
        assert_eq!(r.await.unwrap().len(), 5 * b"data: tok\n\n".len());
    }
    let drained_at = drained_at.await.unwrap();
    assert_eq!(drained_at - start, Duration::from_secs(5));
    assert!(drain.is_drained());
    assert_eq!(a.calls.load(Ordering::SeqCst), calls_a);
    assert_eq!(in_flight(&pool), vec![0, 0]);

    // A request decided for "a" (a session homed there) is redirected.
    let mut req = http::Request::new(());
    req.set_decision(Decision::new(
        ReplicaId::new("a").unwrap(),
        DecisionReason::Home,
    ));
    let r = svc.ready().await.unwrap().call(req).await.unwrap();
    assert_eq!(replica_of(&r), "b");
}

#[tokio::test(start_paused = true)]
async fn drain_and_remove_times_out_on_a_stuck_stream() {
    let a = TestReplica::streaming(1000, 1000);
    let pool = pool_of(
        &[("a", a.clone()), ("b", TestReplica::default())],
        SlowStart::DISABLED,
    );
    let mut svc = Dispatch::with_seed(pool.clone(), RngSeed::fixed(1));
    let mut req = http::Request::new(());
    req.set_decision(Decision::new(
        ReplicaId::new("a").unwrap(),
        DecisionReason::Home,
    ));
    let stream = svc.ready().await.unwrap().call(req).await.unwrap();
    let out = drain_and_remove(&pool, "a", Duration::from_secs(3))
        .await
        .unwrap();
    assert_eq!(out, DrainOutcome::TimedOut { in_flight: 1 });
    assert!(pool.snapshot().get("a").is_none());
    let state = stream
        .extensions()
        .get::<Decision>()
        .map(|d| d.replica().clone())
        .unwrap();
    assert_eq!(state.as_str(), "a");
    drop(stream);
}

#[derive(Default)]
struct Counting(Mutex<Vec<(String, Outcome)>>);

impl CompletionObserver for Counting {
    fn on_complete(&self, c: &Completion<'_>) {
        self.0.lock().push((c.replica.to_string(), c.outcome));
    }
}

#[tokio::test(start_paused = true)]
async fn failover_resends_never_sent_requests_and_reports_once() {
    let dead = TestReplica::default();
    dead.refuse.store(true, Ordering::SeqCst);
    let live = TestReplica::default();
    let pool = pool_of(
        &[("dead", dead.clone()), ("live", live.clone())],
        SlowStart::DISABLED,
    );
    let mut svc = ServiceBuilder::new()
        .layer(FailoverLayer::new(pool.clone()))
        .service(Dispatch::with_seed(pool.clone(), RngSeed::fixed(1)));
    let seen = Arc::new(Counting::default());
    let mut req = http::Request::new(());
    req.set_decision(Decision::new(
        ReplicaId::new("dead").unwrap(),
        DecisionReason::Home,
    ));
    req.add_completion_observer(seen.clone());
    let resp = svc.ready().await.unwrap().call(req).await.unwrap();
    let d = resp.extensions().get::<Decision>().unwrap().clone();
    assert_eq!(
        (d.replica().as_str(), d.reason()),
        ("live", DecisionReason::Failover)
    );
    let _ = resp.into_body().collect().await;
    // The outer observer heard once, about the attempt that served the request.
    assert_eq!(*seen.0.lock(), vec![("live".to_string(), Outcome::Success)]);
    assert_eq!(live.calls.load(Ordering::SeqCst), 1);

    // Everything refuses: the last error comes back, observers told once.
    live.refuse.store(true, Ordering::SeqCst);
    let seen = Arc::new(Counting::default());
    let mut req = http::Request::new(());
    req.add_completion_observer(seen.clone());
    let err = svc.ready().await.unwrap().call(req).await.unwrap_err();
    assert!(matches!(err, RouteError::Backend { .. }), "{err}");
    assert_eq!(seen.0.lock().len(), 1);
    assert_eq!(seen.0.lock()[0].1, Outcome::Failure);

    // A 500 (the request reached the replica) is not retried.
    live.refuse.store(false, Ordering::SeqCst);
    live.fail_500.store(true, Ordering::SeqCst);
    let mut req = http::Request::new(());
    req.set_decision(Decision::new(
        ReplicaId::new("live").unwrap(),
        DecisionReason::Home,
    ));
    let resp = svc.ready().await.unwrap().call(req).await.unwrap();
    assert_eq!(resp.status(), 500);
    assert_eq!(live.calls.load(Ordering::SeqCst), 2);
    drop(resp);
    assert_eq!(in_flight(&pool), vec![0, 0]);
}

#[tokio::test(start_paused = true)]
async fn probes_mark_unhealthy_and_readmit_with_slow_start() {
    let a = TestReplica::default();
    let b = TestReplica::default();
    let pool = pool_of(
        &[("a", a.clone()), ("b", b.clone())],
        SlowStart::linear(Duration::from_secs(10)),
    );
    let mut checker = HealthChecker::new(
        pool.clone(),
        HealthCheckConfig {
            unhealthy_threshold: 2,
            healthy_threshold: 2,
            ..Default::default()
        },
    );
    a.probe_fails.store(true, Ordering::SeqCst);
    let r = checker.probe_round().await;
    assert_eq!(r.failed, vec![ReplicaId::new("a").unwrap()]);
    assert_eq!(
        health(&pool, "a"),
        Health::Healthy,
        "one failure is not enough"
    );
    let r = checker.probe_round().await;
    assert_eq!(r.marked_unhealthy, vec![ReplicaId::new("a").unwrap()]);
    assert_eq!(health(&pool, "a"), Health::Unhealthy);
    assert_eq!(pool.snapshot().eligible().len(), 1);

    a.probe_fails.store(false, Ordering::SeqCst);
    checker.probe_round().await;
    assert_eq!(
        health(&pool, "a"),
        Health::Unhealthy,
        "one pass is not enough"
    );
    let r = checker.probe_round().await;
    assert_eq!(r.readmitted, vec![ReplicaId::new("a").unwrap()]);
    let snap = pool.snapshot();
    let (_, ra) = snap.get("a").unwrap();
    assert_eq!(ra.state().health(), Health::Healthy);
    assert!(ra.state().is_ramping());
    assert_eq!(ra.current_weight(snap.slow_start()), 0.1);
}

#[tokio::test(start_paused = true)]
async fn a_probe_slower_than_the_timeout_fails() {
    #[derive(Clone, Default)]
    struct Slow;
    impl Backend for Slow {
        fn probe(&self) -> BoxFuture<'static, Result<(), BoxError>> {
            Box::pin(async {
                tokio::time::sleep(Duration::from_secs(5)).await;
                Ok(())
            })
        }
    }
    let pool = Pool::builder()
        .replica("s", ReplicaSpec::new("m"), Slow)
        .build()
        .unwrap();
    let mut checker = HealthChecker::new(
        pool.clone(),
        HealthCheckConfig {
            timeout: Duration::from_millis(500),
            unhealthy_threshold: 1,
            ..Default::default()
        },
    );
    let start = Instant::now();
    let r = checker.probe_round().await;
    assert_eq!(start.elapsed(), Duration::from_millis(500));
    assert_eq!(r.marked_unhealthy.len(), 1);
}

#[tokio::test(start_paused = true)]
async fn scraped_reports_drive_the_wait_estimate_until_stale() {
    let a = TestReplica::default();
    let pool = pool_of(&[("a", a.clone())], SlowStart::DISABLED);
    let est = WaitEstimator::new()
        .slots_per_weight(16.0)
        .default_service_time(Duration::from_secs(1))
        .max_report_age(Duration::from_secs(3));
    // The engine is saturated by other gateways: 8 running, 8 waiting.
    *a.report.lock() = Some(LoadReport {
        running: 8,
        waiting: 8,
        kv_usage: Some(0.9),
        observed_at: Instant::now(),
    });
    let checker =
        HealthChecker::new(pool.clone(), HealthCheckConfig::default()).estimator(est.clone());
    assert_eq!(checker.scrape_round().await, 1);
    let snap = pool.snapshot();
    let r = &snap.replicas()[0];
    let e = est.estimate(r, snap.slow_start(), Instant::now());
    assert!(e.from_report);
    // Saturated at 8 slots with 8 waiting: (16 + 1 - 8) x 1 s / 8.
    assert_eq!(e.wait, Duration::from_millis(1125));
    tokio::time::sleep(Duration::from_secs(4)).await;
    let e = est.estimate(r, snap.slow_start(), Instant::now());
    assert!(!e.from_report);
    assert_eq!(e.wait, Duration::ZERO);
    checker.emit_metrics();
}

#[tokio::test(start_paused = true)]
async fn spawned_checker_stops_when_dropped() {
    let a = TestReplica::default();
    a.probe_fails.store(true, Ordering::SeqCst);
    let pool = pool_of(&[("a", a.clone())], SlowStart::DISABLED);
    let handle = HealthChecker::new(
        pool.clone(),
        HealthCheckConfig {
            interval: Duration::from_secs(1),
            ..Default::default()
        },
    )
    .spawn();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(health(&pool, "a"), Health::Unhealthy);
    a.probe_fails.store(false, Ordering::SeqCst);
    handle.stop();
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(health(&pool, "a"), Health::Unhealthy, "no probe after stop");
}
