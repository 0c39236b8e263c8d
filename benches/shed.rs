//! Cost of the shedding and health layers on the request path.
//!
//! Each routed request goes through the layers to a no-op replica that answers at once (so every
//! replica is idle and the shedding layer admits): the numbers are pure router overhead, beside
//! the same stack without the layers. Allocations per request come from a counting allocator.
//!
//! Run: `cargo bench --bench shed`

mod support;
use std::hint::black_box;
use std::sync::atomic::Ordering;
use std::time::Duration;
use support::{Noop, ALLOCS};

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use futures_util::FutureExt;
use http_body_util::Full;
use replica_router::balance::LeastInFlightLayer;
use replica_router::dispatch::Dispatch;
use replica_router::health::{
    FailoverLayer, OutlierConfig, OutlierDetectionLayer, OutlierDetector,
};
use replica_router::load::WaitEstimator;
use replica_router::pool::Pool;
use replica_router::replica::{ReplicaSpec, SpecPolicy};
use replica_router::rng::RngSeed;
use replica_router::shed::ShedLayer;
use tokio::time::Instant;
use tower::{Service, ServiceBuilder, ServiceExt};

fn pool(n: usize) -> Pool<Noop> {
    let mut b = Pool::builder().spec_policy(SpecPolicy::Unchecked);
    for i in 0..n {
        b = b.replica(
            format!("replica-{i}"),
            ReplicaSpec::new("m").capacity_weight(1.0 + (i % 3) as f64),
            Noop,
        );
    }
    b.build().unwrap()
}

fn route<S>(svc: &mut S)
where
    S: Service<http::Request<Full<Bytes>>>,
    S::Error: std::fmt::Debug,
{
    let ready = svc.ready().now_or_never().unwrap().unwrap();
    let resp = ready
        .call(http::Request::new(Full::new(Bytes::from_static(b"{}"))))
        .now_or_never()
        .unwrap()
        .unwrap();
    black_box(resp);
}

fn allocs_per_request<S>(svc: &mut S) -> f64
where
    S: Service<http::Request<Full<Bytes>>>,
    S::Error: std::fmt::Debug,
{
    for _ in 0..1000 {
        route(svc);
    }
    let before = ALLOCS.load(Ordering::Relaxed);
    const N: u64 = 10_000;
    for _ in 0..N {
        route(svc);
    }
    (ALLOCS.load(Ordering::Relaxed) - before) as f64 / N as f64
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("route_one_request");
    for n in [8usize, 64, 512] {
        let p = pool(n);
        let base = || {
            ServiceBuilder::new()
                .layer(LeastInFlightLayer::new(p.clone()).seed(RngSeed::fixed(1)))
                .service(Dispatch::with_seed(p.clone(), RngSeed::fixed(2)))
        };
        let mut plain = base();
        let mut shed = ServiceBuilder::new()
            .layer(ShedLayer::new(p.clone()))
            .service(base());
        let mut shed_no_advice = ServiceBuilder::new()
            .layer(ShedLayer::new(p.clone()).advise(false))
            .service(base());
        let mut shed_queue = ServiceBuilder::new()
            .layer(ShedLayer::new(p.clone()).queue(1024, Duration::from_secs(1)))
            .service(base());
        let detector = OutlierDetector::new(p.clone(), OutlierConfig::default());
        let mut health = ServiceBuilder::new()
            .layer(FailoverLayer::new(p.clone()))
            .layer(OutlierDetectionLayer::new(&detector))
            .service(base());
        eprintln!(
            "allocations per request at {n} replicas: plain {:.2}, +shed {:.2}, +shed without advice {:.2}, \
             +shed with queue {:.2}, +failover+outlier {:.2}",
            allocs_per_request(&mut plain),
            allocs_per_request(&mut shed),
            allocs_per_request(&mut shed_no_advice),
            allocs_per_request(&mut shed_queue),
            allocs_per_request(&mut health),
        );
        group.bench_with_input(BenchmarkId::new("plain", n), &n, |b, _| {
            b.iter(|| route(&mut plain))
        });
        group.bench_with_input(BenchmarkId::new("shed", n), &n, |b, _| {
            b.iter(|| route(&mut shed))
        });
        group.bench_with_input(BenchmarkId::new("shed-no-advice", n), &n, |b, _| {
            b.iter(|| route(&mut shed_no_advice))
        });
        group.bench_with_input(BenchmarkId::new("shed-queue", n), &n, |b, _| {
            b.iter(|| route(&mut shed_queue))
        });
        group.bench_with_input(BenchmarkId::new("failover-outlier", n), &n, |b, _| {
            b.iter(|| route(&mut health))
        });
    }
    group.finish();

    let mut group = c.benchmark_group("wait_estimate");
    for n in [8usize, 64, 512] {
        let p = pool(n);
        let est = WaitEstimator::new();
        group.bench_with_input(BenchmarkId::new("best_of_pool", n), &n, |b, _| {
            b.iter(|| black_box(est.best(&p.load(), Instant::now())))
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
