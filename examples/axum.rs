//! An axum 0.8 server with the crate's full stack over HTTP replicas, tower's `Timeout` and
//! `ConcurrencyLimit` and tower-http's `Trace` between the crate's layers, mounted with
//! `Router::route_service`: no wrapper types.
//!
//! ```sh
//! cargo run --release --example mock_replica -- --ports 8001,8002 --time-scale 10 &
//! cargo run --release --example axum --features http-backend -- 127.0.0.1:8080 \
//!     http://127.0.0.1:8001 http://127.0.0.1:8002
//! curl -N localhost:8080/v1/chat/completions -H 'x-session-id: conv-1' \
//!     -d '{"model":"mock-llama-3-70b","messages":[{"role":"user","content":"hi"}],"stream":true}'
//! ```
//!
//! The order, outermost first: the edge (errors become their HTTP answers, the decision goes
//! into `x-replica-id` / `x-replica-affinity`), `Trace`, the body buffer (so failover can replay
//! a request), the route context, SLO shedding, failover, `ConcurrencyLimit` and `Timeout`
//! (both end at the response head, not at the end of a stream: see `replica_router::edge`),
//! affinity, least-in-flight, dispatch.

use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use replica_router::affinity::AffinityLayer;
use replica_router::balance::LeastInFlightLayer;
use replica_router::context::RouteContextLayer;
use replica_router::dispatch::Dispatch;
use replica_router::edge::{BufferBodyLayer, BufferedBody, EdgeLayer};
use replica_router::health::{FailoverLayer, HealthCheckConfig, HealthCheckHandle, HealthChecker};
use replica_router::http_backend::{default_client, HttpReplica};
use replica_router::pool::Pool;
use replica_router::replica::ReplicaSpec;
use replica_router::shed::ShedLayer;
use tower::limit::ConcurrencyLimitLayer;
use tower::timeout::TimeoutLayer;
use tower::ServiceBuilder;
use tower_http::trace::TraceLayer;

/// The replicas at `urls`, one pool.
pub fn pool(urls: &[String]) -> Pool<HttpReplica<BufferedBody>> {
    let client = default_client::<BufferedBody>(64);
    let mut builder = Pool::builder();
    for url in urls {
        let replica = HttpReplica::new(url, client.clone()).expect("replica URL");
        let id = url.trim_start_matches("http://").to_owned();
        builder = builder.replica(id, ReplicaSpec::new("served-model"), replica);
    }
    builder.build().expect("pool")
}

/// The axum app: the full stack on the OpenAI routes.
pub fn app(pool: &Pool<HttpReplica<BufferedBody>>) -> Router {
    let stack = ServiceBuilder::new()
        .layer(EdgeLayer::new())
        .layer(TraceLayer::new_for_http())
        .layer(BufferBodyLayer::new(10 << 20))
        .layer(RouteContextLayer::default())
        .layer(ShedLayer::new(pool.clone()).budget(Duration::from_millis(500)))
        .layer(FailoverLayer::new(pool.clone()))
        .layer(ConcurrencyLimitLayer::new(512))
        .layer(TimeoutLayer::new(Duration::from_secs(120)))
        .layer(AffinityLayer::new(pool.clone()))
        .layer(LeastInFlightLayer::new(pool.clone()))
        .service(Dispatch::new(pool.clone()));
    Router::new()
        .route_service("/v1/chat/completions", stack.clone())
        .route_service("/v1/completions", stack)
}

/// Probes the replicas in the background for as long as the handle lives.
pub fn health(pool: &Pool<HttpReplica<BufferedBody>>) -> HealthCheckHandle {
    HealthChecker::new(pool.clone(), HealthCheckConfig::default()).spawn()
}

#[allow(dead_code)]
#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let listen: SocketAddr = args
        .next()
        .unwrap_or_else(|| "127.0.0.1:8080".into())
        .parse()?;
    let urls: Vec<String> = args.collect();
    if urls.is_empty() {
        eprintln!("usage: axum LISTEN_ADDR REPLICA_URL [REPLICA_URL ...]");
        std::process::exit(2);
    }
    let pool = pool(&urls);
    let _health = health(&pool);
    let listener = tokio::net::TcpListener::bind(listen).await?;
    println!("axum + replica-router on http://{}", listener.local_addr()?);
    axum::serve(listener, app(&pool)).await?;
    Ok(())
}
