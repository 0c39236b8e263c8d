//! The cost of `Select` in front of per-workload stacks: one request routed by path to one of
//! three stacks (least-in-flight + dispatch over 8 no-op replicas each), beside the same stack
//! called directly. The allocation counter reports heap allocations per routed request.
//!
//! Run: `cargo bench --bench select`

mod support;
use std::hint::black_box;
use std::sync::atomic::Ordering;
use support::{Noop, ALLOCS};

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion};
use futures_util::FutureExt;
use http_body_util::Full;
use replica_router::balance::LeastInFlightLayer;
use replica_router::dispatch::Dispatch;
use replica_router::error::RouteError;
use replica_router::pool::Pool;
use replica_router::replica::ReplicaSpec;
use replica_router::rng::RngSeed;
use replica_router::select::{ByPath, Select};
use tower::util::BoxCloneService;
use tower::{Layer, Service, ServiceExt};

type Stack = replica_router::balance::LeastInFlight<Dispatch<Noop>, Noop>;

fn stack(name: &str) -> Stack {
    let mut b = Pool::builder();
    for i in 0..8 {
        b = b.replica(format!("{name}-{i}"), ReplicaSpec::new("m"), Noop);
    }
    let pool = b.build().unwrap();
    LeastInFlightLayer::new(pool.clone())
        .seed(RngSeed::fixed(1))
        .layer(Dispatch::new(pool))
}

fn by_path() -> ByPath {
    ByPath::new()
        .prefix("/v1/embeddings", "embeddings")
        .prefix("/v1/batch", "batch")
}

fn request() -> http::Request<()> {
    http::Request::builder()
        .uri("/v1/embeddings")
        .body(())
        .unwrap()
}

fn route<S>(svc: &mut S)
where
    S: Service<http::Request<()>>,
    S::Error: std::fmt::Debug,
{
    let ready = svc.ready().now_or_never().unwrap().unwrap();
    let resp = ready.call(request()).now_or_never().unwrap().unwrap();
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
    let mut plain = stack("embeddings");
    let mut select = Select::builder(by_path())
        .route("chat", stack("chat"))
        .route("embeddings", stack("embeddings"))
        .route("batch", stack("batch"))
        .default_route("chat")
        .build()
        .unwrap();
    type Boxed = BoxCloneService<
        http::Request<()>,
        http::Response<replica_router::inflight::TrackedBody<Full<Bytes>>>,
        RouteError,
    >;
    let boxed = |s: Stack| -> Boxed { BoxCloneService::new(s) };
    let mut select_boxed = Select::builder(by_path())
        .route("chat", boxed(stack("chat")))
        .route("embeddings", boxed(stack("embeddings")))
        .route("batch", boxed(stack("batch")))
        .default_route("chat")
        .build()
        .unwrap();
    let mut select_closure = Select::builder(|req: &http::Request<()>| {
        req.uri()
            .path()
            .starts_with("/v1/embeddings")
            .then_some("embeddings")
    })
    .route("chat", stack("chat"))
    .route("embeddings", stack("embeddings"))
    .default_route("chat")
    .build()
    .unwrap();
    eprintln!(
        "allocations per routed request: plain {:.2}, select {:.2}, select boxed {:.2}, \
         select closure {:.2}",
        allocs_per_request(&mut plain),
        allocs_per_request(&mut select),
        allocs_per_request(&mut select_boxed),
        allocs_per_request(&mut select_closure),
    );
    let mut group = c.benchmark_group("select_route_one_request");
    group.bench_function("plain-stack", |b| b.iter(|| route(&mut plain)));
    group.bench_function("select-by-path", |b| b.iter(|| route(&mut select)));
    group.bench_function("select-by-path-boxed", |b| {
        b.iter(|| route(&mut select_boxed))
    });
    group.bench_function("select-closure", |b| b.iter(|| route(&mut select_closure)));
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
