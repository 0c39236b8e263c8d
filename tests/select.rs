//! Workload-isolated and tiered pools behind one `Select`: requests reach the right pool, a
//! saturated, never-ready or empty pool never delays the others, unknown models get a typed 404.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http_body_util::BodyExt;
use metrics_util::debugging::{DebugValue, DebuggingRecorder};
use proptest::prelude::*;
use replica_router::affinity::AffinityLayer;
use replica_router::backend::Backend;
use replica_router::balance::{LeastInFlightLayer, RoundRobinLayer};
use replica_router::context::{Priority, RouteContext, RouteContextLayer};
use replica_router::decision::{Decision, DecisionReason};
use replica_router::dispatch::Dispatch;
use replica_router::error::{NoReplicaReason, RouteError};
use replica_router::inflight::TrackedBody;
use replica_router::pool::Pool;
use replica_router::replica::ReplicaSpec;
use replica_router::rng::RngSeed;
use replica_router::select::{
    ByModel, ByPath, ByPriority, ModelName, Select, SelectConfigError, Selector, NO_ROUTE,
    REQUESTS_COUNTER,
};
use tower::limit::ConcurrencyLimitLayer;
use tower::util::BoxCloneService;
use tower::{Service, ServiceBuilder, ServiceExt};

type Req = http::Request<String>;
type Resp = http::Response<TrackedBody<String>>;
type Stack = BoxCloneService<Req, Resp, RouteError>;

/// An engine that answers with its pool's name, or never answers (`hang`).
#[derive(Clone)]
struct Engine {
    pool: &'static str,
    hang: bool,
    calls: Arc<AtomicUsize>,
}

impl Engine {
    fn new(pool: &'static str) -> Self {
        Engine {
            pool,
            hang: false,
            calls: Arc::default(),
        }
    }

    fn hanging(pool: &'static str) -> Self {
        Engine {
            hang: true,
            ..Engine::new(pool)
        }
    }
}

impl Backend for Engine {}

impl Service<Req> for Engine {
    type Response = http::Response<String>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _req: Req) -> Self::Future {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let (pool, hang) = (self.pool, self.hang);
        Box::pin(async move {
            if hang {
                std::future::pending::<()>().await;
            }
            Ok(http::Response::new(pool.to_owned()))
        })
    }
}

fn pool(prefix: &str, model: &str, n: usize, engine: Engine) -> Pool<Engine> {
    let mut b = Pool::builder();
    for i in 0..n {
        b = b.replica(
            format!("{prefix}-{i}"),
            ReplicaSpec::new(model),
            engine.clone(),
        );
    }
    b.build().unwrap()
}

fn least_in_flight(pool: &Pool<Engine>) -> Stack {
    BoxCloneService::new(
        ServiceBuilder::new()
            .layer(LeastInFlightLayer::new(pool.clone()).seed(RngSeed::fixed(1)))
            .service(Dispatch::with_seed(pool.clone(), RngSeed::fixed(2))),
    )
}

fn chat_stack(pool: &Pool<Engine>) -> Stack {
    BoxCloneService::new(
        ServiceBuilder::new()
            .layer(AffinityLayer::new(pool.clone()))
            .layer(LeastInFlightLayer::new(pool.clone()).seed(RngSeed::fixed(3)))
            .service(Dispatch::with_seed(pool.clone(), RngSeed::fixed(4))),
    )
}

fn round_robin(pool: &Pool<Engine>) -> Stack {
    BoxCloneService::new(
        ServiceBuilder::new()
            .layer(RoundRobinLayer::new(pool.clone()))
            .service(Dispatch::with_seed(pool.clone(), RngSeed::fixed(5))),
    )
}

fn get(path: &str) -> Req {
    http::Request::builder()
        .uri(path)
        .body(String::new())
        .unwrap()
}

async fn body_of(resp: Resp) -> String {
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    String::from_utf8(bytes.to_vec()).unwrap()
}

async fn send<S>(svc: &mut S, req: Req) -> Result<Resp, RouteError>
where
    S: Service<Req, Response = Resp, Error = RouteError>,
{
    svc.ready().await?.call(req).await
}

#[tokio::test(start_paused = true)]
async fn requests_reach_their_workload_pool() {
    let chat = pool("chat", "llama-70b", 2, Engine::new("chat"));
    let embed = pool("embed", "bge-m3", 3, Engine::new("embed"));
    let batch = pool("batch", "llama-70b", 1, Engine::new("batch"));
    let select = Select::builder((
        ByPath::new().prefix("/v1/embeddings", "embeddings"),
        ByPriority::new().route(Priority::Batch, "batch"),
    ))
    .route("chat", chat_stack(&chat))
    .route("embeddings", round_robin(&embed))
    .route("batch", least_in_flight(&batch))
    .default_route("chat")
    .build()
    .unwrap();
    assert_eq!(
        select.route_names().collect::<Vec<_>>(),
        ["chat", "embeddings", "batch"]
    );
    assert_eq!(select.default_route(), Some("chat"));
    let mut gateway = ServiceBuilder::new()
        .layer(RouteContextLayer::default())
        .service(select);

    // Embeddings: round-robin over all three replicas, session header or not.
    let mut seen = Vec::new();
    for _ in 0..6 {
        let mut req = get("/v1/embeddings");
        req.headers_mut()
            .insert("x-session-id", http::HeaderValue::from_static("s1"));
        let resp = send(&mut gateway, req).await.unwrap();
        let d = resp.extensions().get::<Decision>().unwrap().clone();
        assert_eq!(d.reason(), DecisionReason::RoundRobin);
        seen.push(d.replica().to_string());
        assert_eq!(body_of(resp).await, "embed");
    }
    assert_eq!(&seen[..3], &seen[3..]);
    let mut distinct = seen[..3].to_vec();
    distinct.sort();
    assert_eq!(distinct, ["embed-0", "embed-1", "embed-2"]);

    // Chat: sticky by session.
    let mut homes = Vec::new();
    for _ in 0..4 {
        let mut req = get("/v1/chat/completions");
        req.headers_mut()
            .insert("x-session-id", http::HeaderValue::from_static("conv-7"));
        let resp = send(&mut gateway, req).await.unwrap();
        let d = resp.extensions().get::<Decision>().unwrap().clone();
        assert_eq!(d.reason(), DecisionReason::Home);
        homes.push(d.replica().to_string());
        assert_eq!(body_of(resp).await, "chat");
    }
    assert!(homes
        .iter()
        .all(|h| h == &homes[0] && h.starts_with("chat-")));

    // Batch priority on the same path goes to the batch pool.
    let mut req = get("/v1/chat/completions");
    req.headers_mut()
        .insert("x-priority", http::HeaderValue::from_static("batch"));
    let resp = send(&mut gateway, req).await.unwrap();
    assert_eq!(body_of(resp).await, "batch");

    // A path the selector does not know takes the default.
    let resp = send(&mut gateway, get("/v1/completions")).await.unwrap();
    assert_eq!(body_of(resp).await, "chat");

    // Every in-flight counter is back to zero.
    for p in [&chat, &embed, &batch] {
        for r in p.snapshot().replicas() {
            assert_eq!(r.state().in_flight(), 0);
        }
    }
}

/// A stack that is never ready.
#[derive(Clone)]
struct NeverReady;

impl Service<Req> for NeverReady {
    type Response = Resp;
    type Error = RouteError;
    type Future = std::future::Ready<Result<Resp, RouteError>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), RouteError>> {
        Poll::Pending
    }

    fn call(&mut self, _req: Req) -> Self::Future {
        panic!("called without being ready")
    }
}

#[tokio::test(start_paused = true)]
async fn a_saturated_or_never_ready_pool_does_not_delay_the_others() {
    let chat = pool("chat", "m", 2, Engine::new("chat"));
    // The batch pool hangs, behind a concurrency limit of 1: after one request it is saturated.
    let batch = pool("batch", "m", 1, Engine::hanging("batch"));
    let batch_stack: Stack = BoxCloneService::new(
        ServiceBuilder::new()
            .layer(ConcurrencyLimitLayer::new(1))
            .service(least_in_flight(&batch)),
    );
    let select = Select::builder(|req: &Req| {
        Some(match req.uri().path() {
            "/batch" => "batch",
            "/stuck" => "stuck",
            _ => "chat",
        })
    })
    .route("chat", least_in_flight(&chat))
    .route("batch", batch_stack)
    .route("stuck", BoxCloneService::new(NeverReady))
    .build()
    .unwrap();

    // Occupy and then queue on the saturated pool, and queue on the never-ready one.
    let mut pending = Vec::new();
    for path in ["/batch", "/batch", "/batch", "/stuck", "/stuck"] {
        let mut svc = select.clone();
        pending.push(tokio::spawn(async move { send(&mut svc, get(path)).await }));
    }
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(batch.snapshot().replicas()[0].state().in_flight(), 1);

    // The same Select instance is ready at once, and chat requests complete at once.
    let mut svc = select.clone();
    for _ in 0..50 {
        let resp = tokio::time::timeout(Duration::from_millis(1), send(&mut svc, get("/chat")))
            .await
            .expect("a chat request waited on another pool")
            .unwrap();
        assert_eq!(body_of(resp).await, "chat");
    }
    // Still nothing from the stuck pools, which is the point.
    for p in &pending {
        assert!(!p.is_finished());
    }
    for p in pending {
        p.abort();
    }
}

#[tokio::test(start_paused = true)]
async fn an_empty_pool_fails_its_own_requests_only() {
    let chat = pool("chat", "m", 2, Engine::new("chat"));
    let empty: Pool<Engine> = Pool::builder().allow_empty().build().unwrap();
    let drained = pool("drained", "m", 1, Engine::new("drained"));
    let _drain = drained.drain("drained-0").unwrap();
    let mut select = Select::builder(
        ByPath::new()
            .prefix("/empty", "empty")
            .prefix("/drained", "drained"),
    )
    .route("chat", least_in_flight(&chat))
    .route("empty", least_in_flight(&empty))
    .route("drained", least_in_flight(&drained))
    .default_route("chat")
    .build()
    .unwrap();
    for _ in 0..3 {
        let err = send(&mut select, get("/empty")).await.unwrap_err();
        assert!(matches!(
            err,
            RouteError::NoReplica {
                reason: NoReplicaReason::EmptyPool
            }
        ));
        let err = send(&mut select, get("/drained/x")).await.unwrap_err();
        assert!(matches!(
            err,
            RouteError::NoReplica {
                reason: NoReplicaReason::NoneEligible
            }
        ));
        assert_eq!(err.status_code(), 503);
        let resp = send(&mut select, get("/v1/chat")).await.unwrap();
        assert_eq!(body_of(resp).await, "chat");
    }
    // A replica joins the empty pool: its route works from then on.
    empty
        .add("late-0", ReplicaSpec::new("m"), Engine::new("late"))
        .unwrap();
    let resp = send(&mut select, get("/empty")).await.unwrap();
    assert_eq!(body_of(resp).await, "late");
}

#[tokio::test(start_paused = true)]
async fn tiered_pools_by_model_name() {
    let small = pool("small", "llama-8b", 2, Engine::new("small"));
    let large = pool("large", "llama-70b", 2, Engine::new("large"));
    let by_model = ByModel::new()
        .header(http::HeaderName::from_static("x-model"))
        .alias("llama-3-8b-instruct", "small")
        .alias("llama-3-70b-instruct", "large");
    let build = |default: bool| {
        let mut b = Select::builder(by_model.clone())
            .route("small", least_in_flight(&small))
            .route("large", least_in_flight(&large));
        if default {
            b = b.default_route("small");
        }
        b.build().unwrap()
    };
    let mut select = build(true);
    let with_model = |m: &str| {
        let mut r = get("/v1/chat/completions");
        r.headers_mut()
            .insert("x-model", http::HeaderValue::from_str(m).unwrap());
        r
    };
    // Aliases and route names both work.
    for (model, pool) in [
        ("llama-3-8b-instruct", "small"),
        ("llama-3-70b-instruct", "large"),
        ("large", "large"),
        ("small", "small"),
    ] {
        let resp = send(&mut select, with_model(model)).await.unwrap();
        assert_eq!(body_of(resp).await, pool, "{model}");
    }
    // Escalation decided by the application: the extension wins over the header.
    let mut req = with_model("llama-3-8b-instruct");
    req.extensions_mut()
        .insert(ModelName::new("llama-3-70b-instruct"));
    let resp = send(&mut select, req).await.unwrap();
    assert_eq!(body_of(resp).await, "large");
    // No model: the default (cheap) tier.
    let resp = send(&mut select, get("/v1/chat/completions"))
        .await
        .unwrap();
    assert_eq!(body_of(resp).await, "small");
    // An unknown model: 404 naming it, and no pool was touched.
    let calls_before: usize = [&small, &large]
        .iter()
        .flat_map(|p| p.snapshot().replicas().to_vec())
        .map(|r| r.backend().calls.load(Ordering::SeqCst))
        .sum();
    let err = send(&mut select, with_model("gpt-9")).await.unwrap_err();
    match &err {
        RouteError::NoRoute { route } => assert_eq!(route.as_deref(), Some("gpt-9")),
        other => panic!("{other:?}"),
    }
    assert_eq!(err.status_code(), 404);
    let http = err.to_http_response();
    assert_eq!(http.status(), 404);
    assert!(std::str::from_utf8(http.body()).unwrap().contains("gpt-9"));
    let calls_after: usize = [&small, &large]
        .iter()
        .flat_map(|p| p.snapshot().replicas().to_vec())
        .map(|r| r.backend().calls.load(Ordering::SeqCst))
        .sum();
    assert_eq!(calls_before, calls_after);
    // Without a default, a request naming no model is a 404 too.
    let mut strict = build(false);
    let err = send(&mut strict, get("/v1/chat/completions"))
        .await
        .unwrap_err();
    assert!(matches!(err, RouteError::NoRoute { route: None }));
    // Bad model values: 400.
    let mut req = get("/");
    req.headers_mut().insert(
        "x-model",
        http::HeaderValue::from_bytes(b"caf\xc3\xa9").unwrap(),
    );
    let err = send(&mut select, req).await.unwrap_err();
    assert!(matches!(err, RouteError::InvalidRequest(_)));
    assert_eq!(err.status_code(), 400);
    let err = send(&mut select, with_model(&"m".repeat(300)))
        .await
        .unwrap_err();
    assert!(matches!(err, RouteError::InvalidRequest(_)));
    // An empty header is "no model".
    let resp = send(&mut select, with_model("")).await.unwrap();
    assert_eq!(body_of(resp).await, "small");
}

#[tokio::test(start_paused = true)]
async fn unknown_route_names_are_shortened() {
    let p = pool("p", "m", 1, Engine::new("p"));
    let mut select = Select::builder(|req: &Req| Some(req.uri().path().to_owned()))
        .route("/known", least_in_flight(&p))
        .build()
        .unwrap();
    let long = format!("/{}", "x".repeat(500));
    let err = send(&mut select, get(&long)).await.unwrap_err();
    match err {
        RouteError::NoRoute { route: Some(r) } => assert!(r.chars().count() <= 65),
        other => panic!("{other:?}"),
    }
    let resp = send(&mut select, get("/known")).await.unwrap();
    assert_eq!(body_of(resp).await, "p");
}

#[test]
fn build_errors() {
    let s = || least_in_flight(&pool("p", "m", 1, Engine::new("p")));
    let none = Select::<Stack, _>::builder(ByPath::new()).build();
    assert_eq!(none.unwrap_err(), SelectConfigError::NoRoutes);
    let dup = Select::builder(ByPath::new())
        .route("a", s())
        .route("a", s())
        .build();
    assert_eq!(
        dup.unwrap_err(),
        SelectConfigError::DuplicateRoute("a".into())
    );
    let bad_default = Select::builder(ByPath::new())
        .route("a", s())
        .default_route("b")
        .build();
    assert_eq!(
        bad_default.unwrap_err(),
        SelectConfigError::UnknownDefault("b".into())
    );
    let empty_name = Select::builder(ByPath::new()).route("", s()).build();
    assert!(matches!(
        empty_name.unwrap_err(),
        SelectConfigError::InvalidName(_)
    ));
}

#[test]
fn select_is_send_and_clone_with_boxed_stacks() {
    fn check<T: Send + Clone + 'static>(_: &T) {}
    let p = pool("p", "m", 1, Engine::new("p"));
    let select = Select::builder(ByPath::new())
        .route("a", least_in_flight(&p))
        .build()
        .unwrap();
    check(&select);
}

#[tokio::test(start_paused = true)]
async fn many_concurrent_requests_across_pools() {
    let a = pool("a", "m", 3, Engine::new("a"));
    let b = pool("b", "m", 2, Engine::new("b"));
    let select = Select::builder(ByPath::new().prefix("/a", "a").prefix("/b", "b"))
        .route("a", least_in_flight(&a))
        .route("b", round_robin(&b))
        .build()
        .unwrap();
    let mut tasks = Vec::new();
    for i in 0..200 {
        let mut svc = select.clone();
        let path = if i % 3 == 0 { "/b" } else { "/a" };
        tasks.push(tokio::spawn(async move {
            let resp = send(&mut svc, get(path)).await.unwrap();
            (path, body_of(resp).await)
        }));
    }
    let mut counts = (0, 0);
    for t in tasks {
        let (path, body) = t.await.unwrap();
        assert_eq!(&path[1..], body);
        if body == "a" {
            counts.0 += 1;
        } else {
            counts.1 += 1;
        }
    }
    assert_eq!(counts, (133, 67));
}

#[tokio::test(start_paused = true)]
async fn per_route_metrics() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let _guard = metrics::set_default_local_recorder(&recorder);
    let a = pool("a", "m", 1, Engine::new("a"));
    let mut select =
        Select::builder(ByModel::new().header(http::HeaderName::from_static("x-model")))
            .route("a", least_in_flight(&a))
            .build()
            .unwrap();
    let model = |m: &'static str| {
        let mut r = get("/");
        r.headers_mut()
            .insert("x-model", http::HeaderValue::from_static(m));
        r
    };
    for _ in 0..3 {
        send(&mut select, model("a")).await.unwrap();
    }
    send(&mut select, model("secret-tenant-model"))
        .await
        .unwrap_err();
    let snap = snapshotter.snapshot().into_vec();
    let count = |route: &str| {
        snap.iter()
            .filter(|(k, _, _, _)| {
                k.key().name() == REQUESTS_COUNTER
                    && k.key()
                        .labels()
                        .any(|l| l.key() == "route" && l.value() == route)
            })
            .map(|(_, _, _, v)| match v {
                DebugValue::Counter(n) => *n,
                _ => 0,
            })
            .sum::<u64>()
    };
    assert_eq!(count("a"), 3);
    assert_eq!(count(NO_ROUTE), 1);
    // The client's model name never became a label.
    assert!(!snap
        .iter()
        .any(|(k, _, _, _)| k.key().labels().any(|l| l.value().contains("secret"))));
}

#[test]
fn closure_and_pair_selectors() {
    let by_header = |req: &Req| {
        req.headers()
            .get("x-tier")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let both = (
        by_header,
        ByPath::new().prefix("/v1/embeddings", "embeddings"),
    );
    let mut req = get("/v1/embeddings");
    assert_eq!(both.select(&req).unwrap().as_deref(), Some("embeddings"));
    req.headers_mut()
        .insert("x-tier", http::HeaderValue::from_static("large"));
    assert_eq!(both.select(&req).unwrap().as_deref(), Some("large"));
    // Priority from the route context.
    let by_priority = ByPriority::new()
        .route(Priority::Interactive, "fast")
        .route(Priority::Batch, "batch");
    let mut req = get("/");
    assert_eq!(by_priority.select(&req).unwrap(), None);
    req.extensions_mut().insert(RouteContext {
        priority: Priority::Interactive,
        ..Default::default()
    });
    assert_eq!(by_priority.select(&req).unwrap().as_deref(), Some("fast"));
}

/// The reference: longest prefix that matches on a segment boundary.
fn reference(prefixes: &[(String, String)], path: &str) -> Option<String> {
    prefixes
        .iter()
        .filter(|(p, _)| {
            path == p
                || (path.starts_with(p.as_str())
                    && (p.ends_with('/') || path[p.len()..].starts_with('/')))
        })
        .max_by_key(|(p, _)| p.len())
        .map(|(_, r)| r.clone())
}

proptest! {
    #[test]
    fn by_path_takes_the_longest_segment_prefix(
        prefixes in proptest::collection::btree_map("(/[ab]{0,2}){1,3}/?", "[rst]", 0..6),
        path in "(/[ab]{0,2}){0,4}/?",
    ) {
        let prefixes: Vec<(String, String)> = prefixes.into_iter().collect();
        let mut by_path = ByPath::new();
        for (p, r) in &prefixes {
            by_path = by_path.prefix(p.clone(), r);
        }
        prop_assert_eq!(
            by_path.route_for(&path).map(str::to_owned),
            reference(&prefixes, &path)
        );
    }
}
