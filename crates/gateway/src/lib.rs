//! An OpenAI-compatible HTTP gateway over the crate's stack (feature `gateway`).
//!
//! [`Gateway`] listens on an address, validates each request cheaply and routes it through
//! route context -> picking layer -> [`Dispatch`](replica_router::dispatch::Dispatch) to HTTP replicas
//! (vLLM, SGLang, or the [`mock`](replica_router_mock) replicas) over a pooled keep-alive hyper client:
//!
//! - `POST /v1/chat/completions` and `/v1/completions`: the body (at most
//!   [`GatewayConfig::max_body_bytes`], else 413) must be JSON with `model` and `messages` /
//!   `prompt` (else 400 with an OpenAI-style error); header values must be UTF-8 (else 400). The body
//!   is scanned once to estimate prompt tokens ([`inspect_body`]) and forwarded **byte for byte**:
//!   the gateway never re-serialises JSON. Responses stream back frame by frame (SSE is never
//!   buffered), and the request stays in flight on its replica until the body ends.
//! - `--policy affinity` (the default) routes each session (`--affinity-header`, or the
//!   `--user-header` when a request has no session) by consistent hashing with bounded loads and
//!   sticky pins ([`affinity`](replica_router::affinity)); requests without a key, and every request under
//!   `--policy least-loaded`, go to the least loaded of two weighted random replicas; under
//!   `--policy round-robin`, in turn. Sessions are pinned in memory, or in Redis with
//!   `--counter-store redis://...` so every gateway instance agrees.
//! - Responses carry `x-replica-id` and, for session-routed requests, `x-replica-affinity:
//!   home | spill | failover` (anything but `home` means the replica replays the prefill).
//! - With `--tenant-rate` / `--tenant-tokens`, the [`quota`](replica_router::quota) layer holds each tenant
//!   (`--tenant-header`) to its quota across every gateway sharing the `--counter-store`.
//!   `--tenant-concurrency N` caps each tenant's requests in progress; `--store-failure
//!   open|closed` says whether requests are admitted uncounted or refused (503) while the counter
//!   store is down. Token reservations are settled, when the response body ends, to what the
//!   replica generated: its `usage` (JSON body, or the final chunk of a stream with
//!   `stream_options.include_usage`), else the SSE events that carried generated text (the
//!   gateway never rewrites the request to ask for usage); the engine's
//!   `usage.prompt_tokens_details.cached_tokens` also calibrates the replica's cache model. A body
//!   cut short keeps its estimate.
//! - `--api-keys FILE`: `Authorization: Bearer <key>` names the tenant (the file lists the keys'
//!   SHA-256 in hex, each with a tenant and optional own limits); a missing or unknown key gets 401
//!   on every path but `/health` and `/metrics`, and the tenant header is ignored unless
//!   `--trust-tenant-header`. The `Authorization` header is not forwarded to the replicas.
//! - Routing errors map through [`RouteError`](replica_router::error::RouteError): 503 when no replica is
//!   eligible, 429 with `Retry-After` when shed or over quota, 502 when the replica fails and no
//!   other replica could take the request.
//! - A request whose replica fails before answering (refused or reset connection: the replica died
//!   before the probes noticed) is sent again to the least loaded other replica
//!   ([`FailoverLayer`](replica_router::health::FailoverLayer), up to twice; the body is buffered, so the
//!   request is replayed byte for byte), answered with `x-replica-affinity: failover`, and its
//!   session is re-pinned there. Every attempt feeds passive outlier detection
//!   ([`OutlierDetector`](replica_router::health::OutlierDetector), default
//!   [`OutlierConfig`](replica_router::health::OutlierConfig)): five failures in a row eject the replica
//!   (30 s, doubling on each ejection in a row), so it gets no traffic until re-admitted.
//! - Replicas are probed in the background (`GET /health`; two failures in a row take a replica
//!   out until two successes) and their vLLM `/metrics` are read for the engines' own running and
//!   waiting counts ([`health`](replica_router::health)). With `--slo-wait-ms`, the [`shed`](replica_router::shed)
//!   layer answers 429 with `Retry-After` when every replica's estimated wait is past the budget.
//! - `--replica URL,model=NAME` on every replica: one pool per model, each with its own stack,
//!   and each request goes to the pool its body's `model` names through
//!   [`Select`](replica_router::select::Select) with [`ByModel`](replica_router::select::ByModel)
//!   (an unknown model: 404; a `model` that is not a string: 400); `GET /v1/models` is answered
//!   from the pools. A request without a model goes to the first pool. Session pins are shared by
//!   the pools (one pin table): a session key used with two models moves between them.
//! - Context fit ([`ContextFitLayer`](replica_router::fit::ContextFitLayer)): a replica's
//!   `max_context` comes from `--replica URL,max_context=N` or its own `GET /v1/models`
//!   (`max_model_len`, read at start, 2 s at most); a chat or completion whose prompt estimate plus
//!   `max_tokens` exceeds it never goes there, and one no replica holds gets 400
//!   `context_length_exceeded`. `/v1/embeddings` is routed without session affinity.
//! - `GET /admin/replicas` (JSON): per pool and replica its spec, state, in-flight requests and
//!   tokens, work model, engine load report and its age, wait estimate and share of traffic.
//!   `GET /admin/advice`: per pool the capacity
//!   [advisor](replica_router::advisor)'s verdict from the engines' load reports (batch occupancy
//!   against `--max-num-seqs`) and the wait estimates. `--admin off` turns admin routes off,
//!   `--admin ADDR` serves them only on that address; with `--api-keys` they need a key.
//! - `GET /metrics`: the installed recorder's rendering (if the application passes one, see
//!   [`Gateway::bind_with_metrics`]; the library itself never installs a recorder) followed by
//!   per-replica gauges read from the pool. `GET /health`: 200 while a replica is eligible, else 503.
//! - Any other path is forwarded unchanged to a least-loaded replica (`GET /v1/models`, ...), with
//!   a token estimate of its body's byte count (an upper bound). Paths must be canonical (no
//!   `%`-encoded unreserved character, `//`, dot segment or trailing `/`; else 404), so no
//!   spelling of a validated route escapes validation; `CONNECT` gets 405 and an HTTP/1.1 request
//!   without exactly one `Host` gets 400.
//! - Transport limits ([`TransportConfig`], 0 turns one off): a new connection's first request
//!   head must arrive within `--header-timeout-ms` (10 s), later ones (idle wait included) within
//!   `--keepalive-idle-ms` (60 s); a body within `--body-timeout-ms` (60 s) with no pause longer
//!   than `--body-idle-timeout-ms` (10 s), else 408; at most `--max-connections` client
//!   connections (beyond: 503 and close) and `--max-buffered-body-bytes` of request bodies held
//!   across them (192 MiB, beyond: 503; large bodies may use seven eighths of it); a replica must
//!   send its response head within `--upstream-ttfb-timeout-ms` (120 s, else the attempt fails
//!   over) and pause its body no longer than `--upstream-idle-timeout-ms` (60 s, else the stream
//!   ends with an error); a response write the client leaves unread for
//!   `--client-write-timeout-ms` (30 s) closes the connection and ends the replica's stream;
//!   shutdown waits `--shutdown-grace-ms` (10 s) for requests in progress, then closes what is
//!   left.
//!
//! `examples/gateway.rs` is the command-line front end ([`GatewayConfig::from_args`] parses the
//! flags). Tests start the gateway in-process on port 0:
//!
//! ```no_run
//! use replica_router_gateway::{Gateway, GatewayConfig};
//! # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let cfg = GatewayConfig::from_args(["--listen", "127.0.0.1:0", "--replica", "http://127.0.0.1:8001"])?;
//! let gw = Gateway::bind(cfg).await?;
//! println!("gateway on http://{}", gw.local_addr());
//! gw.shutdown().await;
//! # Ok(()) }
//! ```

mod admin;
mod auth;
mod body;
pub mod cli;
mod config;
mod inspect;
mod limits;
mod service;
mod settle;
mod stall;
mod tiers;
mod upstream;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;

pub use self::body::GatewayBody;
pub use self::config::{
    AdminMode, ConfigError, CounterStoreSpec, GatewayConfig, ImplicitSessions, PlacementMode,
    Policy, Rate, ReplicaArg, TransportConfig, DEFAULT_MAX_BODY_BYTES, USAGE,
};
pub use self::inspect::{body_model, inspect_body, ApiKind, BodyInfo, DEFAULT_OUTPUT_ESTIMATE};
pub use self::limits::SMALL_BODY_BYTES;
pub use self::service::UpstreamRequest;
pub use self::upstream::{Upstream, UpstreamBody, UpstreamFuture};
pub use replica_router::affinity::{AFFINITY_HEADER, REPLICA_HEADER};

use self::service::{ConnState, Counters, Shared};
use replica_router::health::{
    HealthCheckConfig, HealthCheckHandle, HealthChecker, OutlierConfig, OutlierDetector,
};
use replica_router::http_backend::HttpReplicaError;
use replica_router::pool::Pool;
use replica_router::replica::PoolError;

/// Renders the application's metrics recorder (for example a `PrometheusHandle::render`).
pub type MetricsRender = Arc<dyn Fn() -> String + Send + Sync>;

/// Why a gateway could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GatewayError {
    /// The configuration is unusable.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A replica URL is invalid.
    #[error(transparent)]
    Replica(#[from] HttpReplicaError),
    /// The pool rejected the replicas (duplicates, bad weights).
    #[error(transparent)]
    Pool(#[from] PoolError),
    /// The listener could not be bound.
    #[error("cannot listen: {0}")]
    Io(#[from] std::io::Error),
}

/// A running gateway. Dropping it stops accepting; [`Gateway::shutdown`] also waits for the
/// requests in progress.
pub struct Gateway {
    addr: SocketAddr,
    tiers: Vec<tiers::Tier>,
    _health: Vec<HealthCheckHandle>,
    admin: Option<(SocketAddr, JoinHandle<()>)>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

/// Builds one pool of all the HTTP replicas of `cfg` (ids are the URLs' `host:port[/prefix]`;
/// each replica's `model`, `max_context`, `tp` and `pp` go into its spec), for
/// [`Gateway::serve`]. [`Gateway::bind`] builds one pool per model instead.
pub fn build_pool(cfg: &GatewayConfig) -> Result<Pool<Upstream>, GatewayError> {
    let all: Vec<&ReplicaArg> = cfg.replicas.iter().collect();
    let model = cfg.replicas.first().and_then(|r| r.model.as_deref());
    tiers::build_tier_pool(cfg, model, &all)
}

impl Gateway {
    /// Binds `cfg.listen` and serves on the current tokio runtime.
    pub async fn bind(cfg: GatewayConfig) -> Result<Gateway, GatewayError> {
        Self::bind_with_metrics(cfg, None).await
    }

    /// Like [`Gateway::bind`], with a metrics recorder rendering for `GET /metrics`.
    ///
    /// Replicas that name their model (`--replica URL,model=NAME`) form one pool per model, and
    /// each request goes to the pool its `model` names. Replicas that declare no `max_context`
    /// are asked for it first (`GET /v1/models`, at most 2 s).
    pub async fn bind_with_metrics(
        mut cfg: GatewayConfig,
        render: Option<MetricsRender>,
    ) -> Result<Gateway, GatewayError> {
        tiers::discover_limits(&mut cfg).await;
        let tiers = tiers::build_tiers(&cfg)?;
        let listener = TcpListener::bind(cfg.listen).await?;
        Self::serve_tiers(listener, &cfg, tiers, render).await
    }

    /// Serves on an already bound listener, routing over `pool` (whose membership the caller may
    /// change at run time), on the current tokio runtime. One pool: requests are not routed by
    /// model.
    pub async fn serve(
        listener: TcpListener,
        cfg: &GatewayConfig,
        pool: Pool<Upstream>,
        render: Option<MetricsRender>,
    ) -> Result<Gateway, GatewayError> {
        let tiers = vec![tiers::Tier::new(cfg, None, pool)];
        Self::serve_tiers(listener, cfg, tiers, render).await
    }

    async fn serve_tiers(
        listener: TcpListener,
        cfg: &GatewayConfig,
        tiers: Vec<tiers::Tier>,
        render: Option<MetricsRender>,
    ) -> Result<Gateway, GatewayError> {
        let addr = listener.local_addr()?;
        let (shared, health) = shared(cfg, &tiers, render).await?;
        let admin = admin_listener(cfg, &shared).await?;
        let (stop, stopped) = oneshot::channel();
        let ctl = ServeCtl::new(&cfg.transport);
        let task = tokio::spawn(accept_loop(listener, shared, ctl, stopped));
        Ok(Gateway {
            _health: health,
            admin,
            addr,
            tiers,
            stop: Some(stop),
            task: Some(task),
        })
    }

    /// Binds `cfg.listen` and serves on `shards` threads, each running its own single-threaded
    /// runtime with its own upstream connections (the way nginx runs one event loop per worker).
    /// The current runtime only accepts connections and hands them to the shards in turn; a
    /// request is then served start to end on one thread, with no cross-thread wake-ups. The
    /// replica pool (and so the in-flight accounting the picking layers read) is shared by all.
    pub async fn bind_sharded(
        mut cfg: GatewayConfig,
        shards: usize,
        render: Option<MetricsRender>,
    ) -> Result<Gateway, GatewayError> {
        tiers::discover_limits(&mut cfg).await;
        let tiers = tiers::build_tiers(&cfg)?;
        let listener = TcpListener::bind(cfg.listen).await?;
        let addr = listener.local_addr()?;
        let (shared, health) = shared(&cfg, &tiers, render).await?;
        let admin = admin_listener(&cfg, &shared).await?;
        let mut senders = Vec::new();
        let mut done = Vec::new();
        let ctl = ServeCtl::new(&cfg.transport);
        for i in 0..shards.max(1) {
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Accepted>();
            let (done_tx, done_rx) = oneshot::channel::<()>();
            let shared = shared.clone();
            let ctl = ctl.clone();
            std::thread::Builder::new()
                .name(format!("gateway-shard-{i}"))
                .spawn(move || {
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build();
                    if let Ok(rt) = rt {
                        rt.block_on(shard_loop(rx, shared, ctl));
                    }
                    let _ = done_tx.send(());
                })?;
            senders.push(tx);
            done.push(done_rx);
        }
        let (stop, mut stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let mut next = 0usize;
            while let Some(stream) = accept_or_stop(&listener, &mut stopped).await {
                let Some(permit) = ctl.admit(&stream) else {
                    continue;
                };
                if let Ok(s) = stream.into_std() {
                    let _ = senders[next % senders.len()].send((s, permit));
                    next = next.wrapping_add(1);
                }
            }
            drop(listener);
            drop(senders);
            for d in done {
                let _ = d.await;
            }
        });
        Ok(Gateway {
            _health: health,
            admin,
            addr,
            tiers,
            stop: Some(stop),
            task: Some(task),
        })
    }

    /// The address of the admin listener (`--admin ADDR`), if any.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().map(|(a, _)| *a)
    }

    /// The address the gateway listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The replica pool (membership can be changed while serving); with one pool per model,
    /// the first model's.
    pub fn pool(&self) -> &Pool<Upstream> {
        &self.tiers[0].pool
    }

    /// Every pool with the model it serves (`None`: the one pool of a gateway that does not
    /// route by model).
    pub fn pools(&self) -> impl Iterator<Item = (Option<&str>, &Pool<Upstream>)> {
        self.tiers.iter().map(|t| (t.model.as_deref(), &t.pool))
    }

    /// Stops accepting, closes idle connections, and waits for the requests in progress (streams
    /// included) to finish, for at most `--shutdown-grace-ms`; then closes the connections left.
    pub async fn shutdown(mut self) {
        if let Some((_, admin)) = self.admin.take() {
            admin.abort();
        }
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if let Some((_, admin)) = self.admin.take() {
            admin.abort();
        }
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// The state every connection shares, and the pools' health checkers.
async fn shared(
    cfg: &GatewayConfig,
    tiers: &[tiers::Tier],
    render: Option<MetricsRender>,
) -> Result<(Arc<Shared>, Vec<HealthCheckHandle>), GatewayError> {
    let mut layers = service::store_layers(cfg, tiers).await?;
    let work_views = std::mem::take(&mut layers.work_views);
    let auth = layers.auth.take();
    let mut replica_headers = Vec::new();
    for t in tiers {
        for r in t.pool.snapshot().replicas() {
            if let Ok(v) = http::HeaderValue::from_str(r.id().as_str()) {
                replica_headers.push((r.id().clone(), v));
            }
        }
    }
    let with_outliers: Vec<(tiers::Tier, OutlierDetector<Upstream>)> = tiers
        .iter()
        .map(|t| (t.clone(), outlier_detector(&t.pool)))
        .collect();
    let stack = service::build_stack(cfg, &with_outliers, layers)?;
    let health = with_outliers
        .into_iter()
        .map(|(t, outliers)| health(&t.pool, outliers))
        .collect();
    let shared = Arc::new(Shared {
        limits: limits::Limits::new(&cfg.transport),
        stack,
        extractor: service::extractor(cfg),
        by_model: tiers.iter().any(|t| t.model.is_some()),
        admin_here: cfg.admin == AdminMode::On,
        max_num_seqs: cfg.max_num_seqs,
        slo_wait: cfg.slo_wait,
        tiers: tiers.to_vec(),
        max_body: cfg.max_body_bytes,
        render,
        counters: Counters::new(),
        replica_headers,
        implicit_sessions: cfg.implicit_sessions.enabled(&cfg.counter_store),
        _work_views: work_views,
        auth,
        trust_tenant_header: cfg.trust_tenant_header,
    });
    Ok((shared, health))
}

/// The admin listener of `--admin ADDR`: `GET /admin/...` only, one request per connection,
/// each connection closed after 10 s.
async fn admin_listener(
    cfg: &GatewayConfig,
    shared: &Arc<Shared>,
) -> Result<Option<(SocketAddr, JoinHandle<()>)>, GatewayError> {
    let AdminMode::Listen(at) = cfg.admin else {
        return Ok(None);
    };
    let listener = TcpListener::bind(at).await?;
    let addr = listener.local_addr()?;
    let shared = shared.clone();
    let task = tokio::spawn(async move {
        let conns = Arc::new(Semaphore::new(64));
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(5)).await;
                continue;
            };
            let Ok(permit) = conns.clone().try_acquire_owned() else {
                continue;
            };
            let shared = shared.clone();
            tokio::spawn(async move {
                let _permit = permit;
                let svc =
                    hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let shared = shared.clone();
                        async move {
                            let resp = if req.method() == http::Method::GET {
                                admin::route(&shared, req.uri().path())
                            } else {
                                None
                            };
                            Ok::<_, Infallible>(resp.unwrap_or_else(service::not_found))
                        }
                    });
                let mut http = hyper::server::conn::http1::Builder::new();
                http.timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(Duration::from_secs(5))
                    .keep_alive(false);
                let conn = http.serve_connection(TokioIo::new(stream), svc);
                let _ = tokio::time::timeout(Duration::from_secs(10), conn).await;
            });
        }
    });
    Ok(Some((addr, task)))
}

/// Passive outlier detection over `pool`, fed by every request's outcome (see
/// [`OutlierDetectionLayer`](replica_router::health::OutlierDetectionLayer)).
fn outlier_detector(pool: &Pool<Upstream>) -> OutlierDetector<Upstream> {
    OutlierDetector::new(pool.clone(), OutlierConfig::default())
}

/// Active health checks (`GET /health`) and engine load scrapes (`GET /metrics`) in the
/// background, for as long as the gateway lives; its rounds also re-admit the replicas `outliers`
/// ejected once their ejection ends.
fn health(pool: &Pool<Upstream>, outliers: OutlierDetector<Upstream>) -> HealthCheckHandle {
    HealthChecker::new(pool.clone(), HealthCheckConfig::default())
        .outlier_detector(outliers)
        .spawn()
}

/// A connection handed to a shard, with its slot under `--max-connections`.
type Accepted = (std::net::TcpStream, Option<OwnedSemaphorePermit>);

/// How connections are served: hyper's settings, the first-request head deadline, the connection
/// cap and the shutdown grace.
#[derive(Clone)]
struct ServeCtl {
    header_timeout: Option<Duration>,
    keepalive_idle: Option<Duration>,
    grace: Option<Duration>,
    conns: Option<Arc<Semaphore>>,
    write_timeout: Duration,
}

impl ServeCtl {
    fn new(t: &TransportConfig) -> Self {
        let nz = |d: Duration| (!d.is_zero()).then_some(d);
        ServeCtl {
            header_timeout: nz(t.header_timeout),
            keepalive_idle: nz(t.keepalive_idle),
            grace: nz(t.shutdown_grace),
            conns: (t.max_connections > 0).then(|| Arc::new(Semaphore::new(t.max_connections))),
            write_timeout: t.client_write_timeout,
        }
    }

    /// A slot for `stream` under the connection cap; `None` (after a best-effort 503) beyond it.
    fn admit(&self, stream: &tokio::net::TcpStream) -> Option<Option<OwnedSemaphorePermit>> {
        let Some(conns) = &self.conns else {
            return Some(None);
        };
        match conns.clone().try_acquire_owned() {
            Ok(p) => Some(Some(p)),
            Err(_) => {
                metrics::counter!("gateway_connections_refused_total").increment(1);
                let _ = stream.try_write(limits::OVER_CAPACITY);
                None
            }
        }
    }

    fn http_builder(&self) -> hyper::server::conn::http1::Builder {
        let mut http = hyper::server::conn::http1::Builder::new();
        http.timer(hyper_util::rt::TokioTimer::new());
        match self.keepalive_idle {
            // hyper's header timer runs from the moment a connection waits for a request head:
            // after the first request, that covers the idle wait and the head's arrival.
            Some(idle) => {
                http.keep_alive(true);
                http.header_read_timeout(idle);
            }
            None => {
                http.keep_alive(false);
                http.header_read_timeout(self.header_timeout);
            }
        }
        // Small OpenAI answers and SSE events: one flat buffer and one `write` beat a vectored write.
        http.writev(false);
        http
    }
}

/// One runtime's connections: hyper's builder, graceful shutdown, and the switch that closes
/// what is left once the grace is over.
struct Conns {
    http: hyper::server::conn::http1::Builder,
    graceful: hyper_util::server::graceful::GracefulShutdown,
    kill: (watch::Sender<bool>, watch::Receiver<bool>),
    ctl: ServeCtl,
}

impl Conns {
    fn new(ctl: ServeCtl) -> Self {
        Conns {
            http: ctl.http_builder(),
            graceful: hyper_util::server::graceful::GracefulShutdown::new(),
            kill: watch::channel(false),
            ctl,
        }
    }

    fn serve(
        &self,
        shared: &Arc<Shared>,
        stream: tokio::net::TcpStream,
        permit: Option<OwnedSemaphorePermit>,
    ) {
        let _ = stream.set_nodelay(true);
        let conn_state = ConnState::new(shared.clone());
        let seen = Arc::new(AtomicBool::new(false));
        let seen_svc = seen.clone();
        let svc = hyper::service::service_fn(move |req| {
            seen_svc.store(true, Ordering::Relaxed);
            let conn_state = conn_state.clone();
            async move { Ok::<_, Infallible>(service::handle(conn_state, req).await) }
        });
        let conn = self.graceful.watch(self.http.serve_connection(
            TokioIo::new(stall::WriteTimeout::new(stream, self.ctl.write_timeout)),
            svc,
        ));
        let mut kill = self.kill.1.clone();
        let first_head = self.ctl.header_timeout;
        tokio::spawn(async move {
            let _permit = permit;
            let killed = async move {
                let _ = kill.wait_for(|k| *k).await;
            };
            tokio::pin!(conn, killed);
            if let Some(t) = first_head {
                tokio::select! {
                    _ = &mut conn => return,
                    _ = &mut killed => return,
                    _ = tokio::time::sleep(t) => {}
                }
                if !seen.load(Ordering::Relaxed) {
                    // No request head within the header timeout: drop (close) the connection.
                    metrics::counter!("gateway_header_timeouts_total").increment(1);
                    return;
                }
            }
            tokio::select! {
                _ = conn => {}
                _ = killed => {}
            }
        });
    }

    /// Graceful shutdown for at most the grace; then every connection left is closed.
    async fn shutdown(self) {
        let graceful = self.graceful.shutdown();
        match self.ctl.grace {
            Some(g) => {
                if tokio::time::timeout(g, graceful).await.is_err() {
                    metrics::counter!("gateway_shutdown_forced_total").increment(1);
                }
            }
            None => graceful.await,
        }
        let _ = self.kill.0.send(true);
        // Let the connection tasks see the switch and drop their connections.
        tokio::task::yield_now().await;
    }
}

async fn shard_loop(
    mut rx: tokio::sync::mpsc::UnboundedReceiver<Accepted>,
    shared: Arc<Shared>,
    ctl: ServeCtl,
) {
    let conns = Conns::new(ctl);
    while let Some((s, permit)) = rx.recv().await {
        if let Ok(stream) = tokio::net::TcpStream::from_std(s) {
            conns.serve(&shared, stream, permit);
        }
    }
    conns.shutdown().await;
}

async fn accept_loop(
    listener: TcpListener,
    shared: Arc<Shared>,
    ctl: ServeCtl,
    mut stopped: oneshot::Receiver<()>,
) {
    let conns = Conns::new(ctl);
    while let Some(stream) = accept_or_stop(&listener, &mut stopped).await {
        if let Some(permit) = conns.ctl.admit(&stream) {
            conns.serve(&shared, stream, permit);
        }
    }
    drop(listener);
    conns.shutdown().await;
}

/// The next accepted connection, or `None` once `stopped` fires. Accept errors (out of file
/// descriptors and the like) back off for 5 ms rather than spin.
async fn accept_or_stop(
    listener: &TcpListener,
    stopped: &mut oneshot::Receiver<()>,
) -> Option<tokio::net::TcpStream> {
    loop {
        tokio::select! {
            r = listener.accept() => match r {
                Ok((s, _)) => return Some(s),
                Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
            },
            _ = &mut *stopped => return None,
        }
    }
}
