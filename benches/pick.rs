//! One pick, end to end through the service stack, beside tower's `balance::p2c::Balance`.
//!
//! Both sides route a request to one of N no-op services that answer at once; both count
//! requests in flight (tower: `PendingRequests`; here: the dispatch guard). The allocation
//! counter reports heap allocations per routed request.
//!
//! Run: `cargo bench --bench pick`

mod support;
use std::convert::Infallible;
use std::future::ready;
use std::hint::black_box;
use std::sync::atomic::Ordering;
use support::{Noop, ALLOCS};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use futures_util::FutureExt;
use replica_router::balance::{LeastInFlightLayer, LoadMeasure};
use replica_router::dispatch::Dispatch;
use replica_router::pick::pick_two_choices;
use replica_router::pool::Pool;
use replica_router::replica::{ReplicaSpec, SpecPolicy};
use replica_router::rng::RngSeed;
use tower::{Layer, Service, ServiceExt};

fn ours(
    n: usize,
) -> impl Service<http::Request<()>, Response = impl Sized, Error = impl std::fmt::Debug> {
    let mut b = Pool::builder().spec_policy(SpecPolicy::Unchecked);
    for i in 0..n {
        b = b.replica(
            format!("replica-{i}"),
            ReplicaSpec::new("m").capacity_weight(1.0 + (i % 3) as f64),
            Noop,
        );
    }
    let pool = b.build().unwrap();
    LeastInFlightLayer::new(pool.clone())
        .seed(RngSeed::fixed(1))
        .layer(Dispatch::new(pool))
}

/// The picking layer alone over a no-op inner service: pick, record the decision, call.
fn ours_pick_layer(
    n: usize,
) -> impl Service<http::Request<()>, Response = impl Sized, Error = impl std::fmt::Debug> {
    let mut b = Pool::builder().spec_policy(SpecPolicy::Unchecked);
    for i in 0..n {
        b = b.replica(
            format!("replica-{i}"),
            ReplicaSpec::new("m").capacity_weight(1.0 + (i % 3) as f64),
            Noop,
        );
    }
    let pool = b.build().unwrap();
    LeastInFlightLayer::new(pool)
        .seed(RngSeed::fixed(1))
        .layer(tower::service_fn(|_req: http::Request<()>| {
            ready(Ok::<_, Infallible>(()))
        }))
}

type TowerBalance = tower::balance::p2c::Balance<
    tower::discover::ServiceList<
        Vec<tower::load::PendingRequests<Noop, tower::load::CompleteOnResponse>>,
    >,
    http::Request<()>,
>;

fn towers(n: usize) -> TowerBalance {
    let services: Vec<_> = (0..n)
        .map(|_| {
            tower::load::PendingRequests::new(Noop, tower::load::CompleteOnResponse::default())
        })
        .collect();
    tower::balance::p2c::Balance::new(tower::discover::ServiceList::new::<http::Request<()>>(
        services,
    ))
}

fn route<S>(svc: &mut S)
where
    S: Service<http::Request<()>>,
    S::Error: std::fmt::Debug,
{
    let ready = svc.ready().now_or_never().unwrap().unwrap();
    let resp = ready
        .call(http::Request::new(()))
        .now_or_never()
        .unwrap()
        .unwrap();
    black_box(resp);
}

fn allocs_per_request<S>(svc: &mut S) -> f64
where
    S: Service<http::Request<()>>,
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
        let mut o = ours(n);
        let mut p = ours_pick_layer(n);
        let mut t = towers(n);
        eprintln!(
            "allocations per routed request at {n} replicas: replica-router {:.2}, \
             replica-router pick layer {:.2}, tower p2c {:.2}",
            allocs_per_request(&mut o),
            allocs_per_request(&mut p),
            allocs_per_request(&mut t)
        );
        group.bench_with_input(
            BenchmarkId::new("replica-router-pick-layer", n),
            &n,
            |b, _| b.iter(|| route(&mut p)),
        );
        group.bench_with_input(BenchmarkId::new("replica-router", n), &n, |b, _| {
            b.iter(|| route(&mut o))
        });
        group.bench_with_input(BenchmarkId::new("tower-p2c", n), &n, |b, _| {
            b.iter(|| route(&mut t))
        });
    }
    group.finish();

    let mut group = c.benchmark_group("pick_only");
    for n in [8usize, 64, 512] {
        let mut b = Pool::builder().spec_policy(SpecPolicy::Unchecked);
        for i in 0..n {
            b = b.replica(
                format!("replica-{i}"),
                ReplicaSpec::new("m").capacity_weight(1.0 + (i % 3) as f64),
                (),
            );
        }
        let pool = b.build().unwrap();
        let mut rng = RngSeed::fixed(3).fork();
        let before = ALLOCS.load(Ordering::Relaxed);
        for _ in 0..10_000 {
            let snap = pool.load();
            black_box(pick_two_choices(
                &snap,
                LoadMeasure::InFlightRequests,
                &mut rng,
            ));
        }
        eprintln!(
            "allocations per pick_two_choices at {n} replicas: {:.2}",
            (ALLOCS.load(Ordering::Relaxed) - before) as f64 / 10_000.0
        );
        group.bench_with_input(BenchmarkId::new("pick_two_choices", n), &n, |b, _| {
            b.iter(|| {
                let snap = pool.load();
                black_box(pick_two_choices(
                    &snap,
                    LoadMeasure::InFlightRequests,
                    &mut rng,
                ))
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
