//! Metrics of shedding, health and autoscaling (read back with metrics-util's debugging
//! recorder), and the autoscaling signal fed by the shedding layer.

mod common;

use std::time::Duration;

use common::{request, scripted_pool, Script};
use http_body_util::BodyExt;
use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
use replica_router::autoscale::{AutoscaleConfig, AutoscaleSignal, ScaleAction, ScaleReason};
use replica_router::balance::LeastInFlightLayer;
use replica_router::context::{Priority, RouteContext};
use replica_router::dispatch::Dispatch;
use replica_router::error::RouteError;
use replica_router::health::{
    record_pool_metrics, OutlierConfig, OutlierDetectionLayer, OutlierDetector,
};
use replica_router::load::WaitEstimator;
use replica_router::rng::RngSeed;
use replica_router::shed::ShedLayer;
use tokio::time::Instant;
use tower::{Service, ServiceBuilder, ServiceExt};

type Flat = Vec<(String, Vec<(String, String)>, DebugValue)>;

fn flat(s: &Snapshotter) -> Flat {
    s.snapshot()
        .into_vec()
        .into_iter()
        .map(|(k, _, _, v)| {
            let key = k.key();
            (
                key.name().to_string(),
                key.labels()
                    .map(|l| (l.key().to_string(), l.value().to_string()))
                    .collect(),
                v,
            )
        })
        .collect()
}

fn find<'a>(snap: &'a Flat, name: &str, labels: &[(&str, &str)]) -> Vec<&'a DebugValue> {
    snap.iter()
        .filter(|(n, ls, _)| {
            n == name
                && labels
                    .iter()
                    .all(|(l, v)| ls.iter().any(|(kl, kv)| kl == l && kv == v))
        })
        .map(|(_, _, v)| v)
        .collect()
}

fn counter(snap: &Flat, name: &str, labels: &[(&str, &str)]) -> u64 {
    find(snap, name, labels)
        .iter()
        .map(|v| match v {
            DebugValue::Counter(n) => *n,
            _ => 0,
        })
        .sum()
}

fn gauge(snap: &Flat, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    find(snap, name, labels).iter().find_map(|v| match v {
        DebugValue::Gauge(g) => Some(g.into_inner()),
        _ => None,
    })
}

fn held_request(p: Priority) -> http::Request<()> {
    let mut req = request(Script::Stream {
        chunks: 1,
        delay_ms: 0,
    });
    req.extensions_mut().insert(RouteContext {
        priority: p,
        ..Default::default()
    });
    req
}

#[tokio::test(start_paused = true)]
async fn shed_and_autoscale_metrics() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let _guard = metrics::set_default_local_recorder(&recorder);

    let pool = scripted_pool(2);
    let est = WaitEstimator::new()
        .slots_per_weight(1.0)
        .default_service_time(Duration::from_secs(1));
    let signal = AutoscaleSignal::new(AutoscaleConfig {
        min_samples: 5,
        ..AutoscaleConfig::new(Duration::from_millis(200))
    });
    let mut svc = ServiceBuilder::new()
        .layer(
            ShedLayer::new(pool.clone())
                .budget(Duration::from_millis(200))
                .estimator(est.clone())
                .autoscale(signal.clone()),
        )
        .layer(LeastInFlightLayer::new(pool.clone()).seed(RngSeed::fixed(1)))
        .service(Dispatch::with_seed(pool.clone(), RngSeed::fixed(2)));

    // Idle pool: requests pass with zero wait; the signal says scale in.
    for _ in 0..10 {
        let r = svc
            .ready()
            .await
            .unwrap()
            .call(held_request(Priority::Standard))
            .await
            .unwrap();
        let _ = r.into_body().collect().await;
    }
    let rec = signal.recommend(&pool.snapshot(), &est, Instant::now());
    assert_eq!(
        (rec.action, rec.reason),
        (ScaleAction::ScaleIn, ScaleReason::Underused)
    );
    assert_eq!(rec.p95_wait, Some(Duration::ZERO));

    // Fill both replicas (one slot each), then overload: batch and interactive shed.
    let mut held = Vec::new();
    for _ in 0..2 {
        held.push(
            svc.ready()
                .await
                .unwrap()
                .call(held_request(Priority::Standard))
                .await
                .unwrap(),
        );
    }
    for p in [Priority::Batch, Priority::Batch, Priority::Interactive] {
        let e = svc
            .ready()
            .await
            .unwrap()
            .call(held_request(p))
            .await
            .unwrap_err();
        assert!(matches!(e, RouteError::Overloaded { .. }));
    }
    let rec = signal.recommend(&pool.snapshot(), &est, Instant::now());
    assert_eq!(
        (rec.action, rec.reason),
        (ScaleAction::ScaleOut, ScaleReason::Shedding),
        "{rec:?}"
    );
    assert_eq!(rec.utilization, 1.0);
    signal.emit_metrics(&rec);
    record_pool_metrics(&pool.snapshot(), &est, Instant::now());

    let snap = flat(&snapshotter);
    let shed = "replica_router_shed_total";
    assert_eq!(
        counter(
            &snap,
            shed,
            &[("reason", "over_budget"), ("priority", "batch")]
        ),
        2
    );
    assert_eq!(
        counter(
            &snap,
            shed,
            &[("reason", "over_budget"), ("priority", "interactive")]
        ),
        1
    );
    assert_eq!(
        gauge(&snap, "replica_router_autoscale_recommendation", &[]),
        Some(1.0)
    );
    assert_eq!(
        gauge(
            &snap,
            "replica_router_replica_in_flight",
            &[("replica", "r0")]
        ),
        Some(1.0)
    );
    // One in flight on one slot: the next waits one service time.
    assert_eq!(
        gauge(
            &snap,
            "replica_router_replica_estimated_wait_seconds",
            &[("replica", "r1")]
        ),
        Some(1.0)
    );
    assert_eq!(
        gauge(&snap, "replica_router_replica_health", &[("replica", "r0")]),
        Some(0.0)
    );
    drop(held);
}

#[tokio::test(start_paused = true)]
async fn ejection_metrics() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let _guard = metrics::set_default_local_recorder(&recorder);

    let pool = scripted_pool(2);
    let detector = OutlierDetector::new(
        pool.clone(),
        OutlierConfig {
            consecutive_failures: 2,
            base_ejection: Duration::from_secs(5),
            ..Default::default()
        },
    );
    let mut svc = ServiceBuilder::new()
        .layer(OutlierDetectionLayer::new(&detector))
        .layer(LeastInFlightLayer::new(pool.clone()).seed(RngSeed::fixed(1)))
        .service(Dispatch::with_seed(pool.clone(), RngSeed::fixed(2)));
    // Every request fails with a 500: the first replica to fail twice is ejected; the second
    // would exceed half the pool and is kept.
    for _ in 0..8 {
        let r = svc
            .ready()
            .await
            .unwrap()
            .call(request(Script::ServerError))
            .await
            .unwrap();
        let _ = r.into_body().collect().await;
    }
    tokio::time::sleep(Duration::from_secs(6)).await;
    record_pool_metrics(&pool.snapshot(), &WaitEstimator::new(), Instant::now());
    let snap = flat(&snapshotter);
    assert_eq!(
        counter(
            &snap,
            "replica_router_ejections_total",
            &[("cause", "consecutive_failures")]
        ),
        1
    );
    assert!(counter(&snap, "replica_router_ejections_skipped_total", &[]) >= 1);
    assert_eq!(counter(&snap, "replica_router_readmissions_total", &[]), 1);
    for r in ["r0", "r1"] {
        assert_eq!(
            gauge(&snap, "replica_router_replica_health", &[("replica", r)]),
            Some(0.0)
        );
    }
}
