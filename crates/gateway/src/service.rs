//! The request path: validate cheaply, route through the crate's stack, forward the bytes.

use std::fmt::Write as _;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::header::{self, HeaderName};
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body::Body as _;
use http_body_util::Full;
use hyper::body::Incoming;
use parking_lot::Mutex;
use pin_project::pin_project;

use replica_router::balance::{LeastInFlight, LeastInFlightLayer, LoadMeasure, RoundRobin};
use replica_router::context::{HeaderExtractor, RouteContextService};
use replica_router::decision::{Decision, DecisionReason};
use replica_router::dispatch::Dispatch;
use replica_router::error::{json_escape_into, openai_error_json, RouteError};
use replica_router::fit::{ContextFit, ContextFitLayer};
use replica_router::inflight::TrackedBody;
use replica_router::replica::ReplicaId;
use replica_router::rng::RngSeed;
use replica_router::select::{ByModel, ModelName, Select};

use super::auth::ApiKeys;
use super::body::GatewayBody;
use super::config::{ConfigError, CounterStoreSpec, GatewayConfig, PlacementMode, Policy};
use super::inspect::{body_model, inspect_body, ApiKind};
use super::settle::Settle;
use super::tiers::{Tier, ANY_MODEL};
use super::GatewayError;
use super::MetricsRender;
use replica_router::affinity::{
    Affinity, AffinityFuture, AffinityKey, AffinityLayer, AFFINITY_HEADER, REPLICA_HEADER,
};
use replica_router::health::{
    Failover, FailoverLayer, OutlierDetection, OutlierDetectionLayer, OutlierDetector,
};
use replica_router::load::Placement;
use replica_router::pins::PinTable;
use replica_router::quota::TokenReport;
use replica_router::quota::{Quota, QuotaConfig, QuotaLayer, TenantLimits};
use replica_router::shed::{Shed, ShedLayer};
use replica_router::store::{MemoryStore, RateQuota};
use replica_router::usage::UsageSink;
use tower::util::Either;

pub use super::upstream::Upstream;
/// The request type inside the stack.
pub type UpstreamRequest = Request<Full<Bytes>>;
type UpstreamResponse = Response<TrackedBody<super::upstream::UpstreamBody>>;

/// Least-in-flight picking over dispatch: the fallback under affinity, and `--policy least-loaded`.
type LeastStack = LeastInFlight<Dispatch<Upstream>, Upstream>;
type LeastFuture = <LeastStack as tower::Service<UpstreamRequest>>::Future;

/// The picking layer chosen by `--policy`.
#[derive(Debug, Clone)]
pub(crate) enum Picker {
    /// Sessions by consistent hashing with bounded loads; unkeyed requests least-loaded.
    Affinity(Affinity<LeastStack, Upstream>),
    Least(LeastStack),
    Rotate(RoundRobin<Dispatch<Upstream>, Upstream>),
}

/// The future of [`Picker`]. Its variants differ in size; boxing the larger one would cost an
/// allocation per request, and the future lives in the connection's task anyway.
#[allow(clippy::large_enum_variant)]
#[pin_project(project = PickerFutureProj)]
pub(crate) enum PickerFuture {
    Affinity(#[pin] AffinityFuture<LeastStack, UpstreamRequest, Upstream>),
    Plain(#[pin] LeastFuture),
}

impl Future for PickerFuture {
    type Output = Result<UpstreamResponse, RouteError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            PickerFutureProj::Affinity(f) => f.poll(cx),
            PickerFutureProj::Plain(f) => f.poll(cx),
        }
    }
}

impl tower::Service<UpstreamRequest> for Picker {
    type Response = UpstreamResponse;
    type Error = RouteError;
    type Future = PickerFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), RouteError>> {
        match self {
            Picker::Affinity(s) => s.poll_ready(cx),
            Picker::Least(s) => s.poll_ready(cx),
            Picker::Rotate(s) => s.poll_ready(cx),
        }
    }

    fn call(&mut self, req: UpstreamRequest) -> Self::Future {
        match self {
            Picker::Affinity(s) => PickerFuture::Affinity(s.call(req)),
            Picker::Least(s) => PickerFuture::Plain(s.call(req)),
            // Round-robin and least-in-flight both answer `RouteFuture<DispatchFuture>`.
            Picker::Rotate(s) => PickerFuture::Plain(s.call(req)),
        }
    }
}

/// The context-length fit over the picker: a request that fits only some replicas' context
/// windows is placed among those; one that fits none is refused (400).
pub(crate) type Fitted = ContextFit<Picker, Upstream>;
/// Failover over passive outlier detection over the fit and the picker: a request whose replica
/// failed before answering (refused or reset connection) is sent again to another replica
/// (decision reason `Failover`, so an affinity session is re-pinned there), and every attempt's
/// outcome feeds the outlier detector, which ejects a replica that keeps failing.
pub(crate) type Resilient = Failover<OutlierDetection<Fitted>, Upstream>;
/// SLO shedding over failover, when `--slo-wait-ms` is set: one pool's whole stack.
pub(crate) type Admission = Either<Shed<Resilient, Upstream>, Resilient>;
/// One pool's stack, or (with `--replica URL,model=NAME`) the pool the request's `model` names.
pub(crate) type Routed = Either<Select<Admission, ByModel>, Admission>;
/// The tenant quota over the pools, when `--tenant-rate` or `--tenant-tokens` is set.
pub(crate) type Quotas = Either<Quota<Routed>, Routed>;

/// The whole routing stack, outermost first: route context -> tenant quota -> the model's pool
/// -> SLO shedding -> failover -> outlier detection -> context fit -> picker (affinity over
/// least-in-flight, or least-in-flight, or round-robin) -> dispatch.
pub(crate) type Stack = RouteContextService<Quotas, HeaderExtractor>;

/// The layers whose state may live in the counter store: the tenant quota (if `--tenant-rate` or
/// `--tenant-tokens` is set) and the session pin table (in Redis with `--counter-store redis://`,
/// so every gateway instance sends a session to the same replica, spills included).
pub(crate) struct StoreLayers {
    quota: Option<QuotaLayer>,
    pins: Option<Arc<dyn PinTable>>,
    /// The shared work views, one per pool (Redis store and `--work-view-ms` > 0): kept for as
    /// long as the gateway serves; dropping them stops publishing.
    pub(crate) work_views: Vec<replica_router_work_view::Handle>,
    /// The `--api-keys` file, for [`Shared::auth`] (taken out before the stack is built).
    pub(crate) auth: Option<ApiKeys>,
}

/// The shared views' handles (nothing without the `redis` feature).
mod replica_router_work_view {
    #[cfg(feature = "redis")]
    pub(crate) type Handle = super::WorkViewHandle;
    #[cfg(not(feature = "redis"))]
    pub(crate) type Handle = ();
}

/// A task sharing one pool's state with the other gateways, kept for as long as the gateway
/// serves (dropping it stops the task).
#[cfg(feature = "redis")]
#[allow(dead_code)] // held for its drop
pub(crate) enum WorkViewHandle {
    /// Outstanding work per replica.
    Work(replica_router::cluster::WorkView),
    /// Placements of the prefix index.
    Prefixes(replica_router::cluster::PrefixShare),
}

/// The session key standing in for a missing one: the conversation digest, marked so that it
/// cannot equal a key a client sends in the header (header values never start with `\x01`).
fn implicit_session(digest: u64) -> replica_router::context::RouteKey {
    format!("\u{1}conv:{digest:016x}").into()
}

/// Connects the counter store (once) and builds the layers that use it.
pub(crate) async fn store_layers(
    cfg: &GatewayConfig,
    tiers: &[Tier],
) -> Result<StoreLayers, GatewayError> {
    let mut limits = TenantLimits::unlimited();
    if let Some(r) = cfg.tenant_rate {
        limits =
            limits.requests(RateQuota::new(r.n, r.per).map_err(|e| bad_flag("--tenant-rate", e))?);
    }
    if let Some(r) = cfg.tenant_tokens {
        limits =
            limits.tokens(RateQuota::new(r.n, r.per).map_err(|e| bad_flag("--tenant-tokens", e))?);
    }
    if let Some(n) = cfg.tenant_concurrency {
        limits = limits.concurrency(n);
    }
    let auth = cfg.api_keys.as_deref().map(ApiKeys::load).transpose()?;
    let mut config = QuotaConfig::new(limits).failure_policy(cfg.store_failure);
    let mut per_key = false;
    for (tenant, own) in auth.iter().flat_map(|a| a.limits.iter()) {
        let l = own.over(limits).map_err(|e| bad_flag("--api-keys", e))?;
        config = config.tenant_in_class(tenant.clone(), l, "api_key");
        per_key = true;
    }
    let config = (!limits.is_unlimited() || per_key).then_some(config);
    match &cfg.counter_store {
        CounterStoreSpec::Memory => Ok(StoreLayers {
            quota: config.map(|c| QuotaLayer::new(MemoryStore::new(), c)),
            pins: None,
            work_views: Vec::new(),
            auth,
        }),
        #[cfg(feature = "redis")]
        CounterStoreSpec::Redis(url) => {
            let store = replica_router::store::RedisStore::connect(url)
                .await
                .map_err(|e| bad_flag("--counter-store", e))?;
            let pins: Arc<dyn PinTable> =
                Arc::new(replica_router::pins::RedisPinTable::new(&store));
            let mut work_views = Vec::new();
            if let Some(period) = cfg.work_view_period {
                for t in tiers {
                    let name = t.model.clone().unwrap_or_else(|| "default".to_owned());
                    work_views.push(WorkViewHandle::Work(
                        replica_router::cluster::WorkView::spawn(
                            &store,
                            t.pool.clone(),
                            replica_router::cluster::WorkViewConfig {
                                period,
                                name: name.clone(),
                                ..Default::default()
                            },
                        ),
                    ));
                    work_views.push(WorkViewHandle::Prefixes(
                        replica_router::cluster::PrefixShare::spawn(
                            &store,
                            t.pool.clone(),
                            t.index.clone(),
                            replica_router::cluster::PrefixShareConfig {
                                period,
                                name,
                                ..Default::default()
                            },
                        ),
                    ));
                }
            }
            Ok(StoreLayers {
                quota: config.map(|c| QuotaLayer::new(store, c)),
                pins: Some(pins),
                work_views,
                auth,
            })
        }
        #[cfg(not(feature = "redis"))]
        CounterStoreSpec::Redis(_) => {
            let _ = tiers;
            Err(GatewayError::Config(ConfigError::new(
                "--counter-store redis://...: this build has no Redis support (enable the `redis` feature)",
            )))
        }
    }
}

fn bad_flag(flag: &str, e: impl std::fmt::Display) -> GatewayError {
    GatewayError::Config(ConfigError::new(format!("{flag}: {e}")))
}

/// The route-context extractor for `cfg`'s headers.
pub(crate) fn extractor(cfg: &GatewayConfig) -> HeaderExtractor {
    HeaderExtractor::default()
        .session_header(Some(cfg.affinity_header.clone()))
        .user_header(cfg.user_header.clone())
        .tenant_header(Some(cfg.tenant_header.clone()))
        .estimated_tokens_header(None)
}

/// Builds the stack for `cfg` over its pools (`tiers`, each with its outlier detector).
/// Validated requests arrive with their route context already set (with the token estimate from
/// the body); others get it from their headers here.
pub(crate) fn build_stack(
    cfg: &GatewayConfig,
    tiers: &[(Tier, OutlierDetector<Upstream>)],
    layers: StoreLayers,
) -> Result<Stack, GatewayError> {
    let extractor = extractor(cfg);
    let routed = match tiers {
        [(t, outliers)] if t.model.is_none() => {
            Either::Right(pool_stack(cfg, t, layers.pins.clone(), outliers)?)
        }
        _ => {
            let mut select = Select::builder(ByModel::new());
            for (t, outliers) in tiers {
                let name = t.model.clone().unwrap_or_else(|| ANY_MODEL.to_owned());
                select = select.route(name, pool_stack(cfg, t, layers.pins.clone(), outliers)?);
            }
            // A request that names no model (a GET, a body without `model`) goes to the first.
            if let Some((t, _)) = tiers.first() {
                select =
                    select.default_route(t.model.clone().unwrap_or_else(|| ANY_MODEL.to_owned()));
            }
            Either::Left(select.build().map_err(|e| bad_flag("--replica", e))?)
        }
    };
    let quotas = match layers.quota {
        Some(q) => Either::Left(tower::Layer::layer(&q, routed)),
        None => Either::Right(routed),
    };
    Ok(tower::Layer::layer(
        &replica_router::context::RouteContextLayer::new(extractor),
        quotas,
    ))
}

/// One pool's stack: shedding -> failover -> outlier detection -> context fit -> picker ->
/// dispatch.
fn pool_stack(
    cfg: &GatewayConfig,
    tier: &Tier,
    pins: Option<Arc<dyn PinTable>>,
    outliers: &OutlierDetector<Upstream>,
) -> Result<Admission, GatewayError> {
    let pool = &tier.pool;
    let dispatch = Dispatch::new(pool.clone());
    // One prefix index shared by both picking layers: what was sent where, keyed or not.
    let (placement, measure) = match cfg.placement {
        PlacementMode::PredictedTtft => (
            Placement::predicted_ttft(tier.index.clone()),
            LoadMeasure::InFlightTokens,
        ),
        PlacementMode::Requests => (Placement::Load, LoadMeasure::InFlightRequests),
    };
    let least = || {
        tower::Layer::layer(
            &LeastInFlightLayer::new(pool.clone())
                .measure(measure)
                .placement(placement.clone())
                .seed(RngSeed::from_entropy()),
            dispatch.clone(),
        )
    };
    let picker = match cfg.policy {
        Policy::Affinity => {
            let key = if cfg.user_header.is_some() {
                AffinityKey::SessionThenUser
            } else {
                AffinityKey::Session
            };
            let mut builder = AffinityLayer::builder(pool.clone())
                .key(key)
                .measure(measure)
                .placement(placement.clone());
            if let Some(pins) = pins {
                builder = builder.dyn_pin_table(pins);
            }
            let affinity = builder
                .build()
                .map_err(|e| bad_flag("--policy affinity", e))?;
            Picker::Affinity(tower::Layer::layer(&affinity, least()))
        }
        Policy::LeastLoaded => Picker::Least(least()),
        Policy::RoundRobin => Picker::Rotate(RoundRobin::new(dispatch.clone(), pool.clone())),
    };
    let fitted = tower::Layer::layer(&ContextFitLayer::new(pool.clone()).measure(measure), picker);
    // Above the picker, so a retry is re-picked with the failed replica excluded; above the
    // outlier detection, so every attempt (the failed one included) is observed.
    let resilient = tower::Layer::layer(
        &FailoverLayer::new(pool.clone()),
        tower::Layer::layer(&OutlierDetectionLayer::new(outliers), fitted),
    );
    Ok(match cfg.slo_wait {
        Some(budget) => Either::Left(tower::Layer::layer(
            &ShedLayer::new(pool.clone()).budget(budget),
            resilient,
        )),
        None => Either::Right(resilient),
    })
}

/// Counters of the request path (handles resolved once, so recording is an atomic add).
pub(crate) struct Counters {
    ok: metrics::Counter,
    client_error: metrics::Counter,
    server_error: metrics::Counter,
}

impl Counters {
    pub(crate) fn new() -> Self {
        let c =
            |class: &'static str| metrics::counter!("gateway_requests_total", "status" => class);
        Counters {
            ok: c("2xx"),
            client_error: c("4xx"),
            server_error: c("5xx"),
        }
    }

    fn record(&self, status: StatusCode) {
        if status.is_server_error() {
            self.server_error.increment(1);
        } else if status.is_client_error() {
            self.client_error.increment(1);
        } else {
            self.ok.increment(1);
        }
    }
}

/// State shared by every connection.
pub(crate) struct Shared {
    /// The pools, one per model (one in all without `--replica URL,model=NAME`).
    pub(crate) tiers: Vec<Tier>,
    /// Whether requests are routed by their `model` (`--replica URL,model=NAME`).
    pub(crate) by_model: bool,
    /// Whether this listener serves the admin routes (`--admin on`).
    pub(crate) admin_here: bool,
    /// `--max-num-seqs`, for `/admin/advice`.
    pub(crate) max_num_seqs: u32,
    /// `--slo-wait-ms`, for `/admin/advice`.
    pub(crate) slo_wait: Option<std::time::Duration>,
    pub(crate) stack: Stack,
    pub(crate) max_body: usize,
    pub(crate) render: Option<MetricsRender>,
    pub(crate) counters: Counters,
    pub(crate) extractor: HeaderExtractor,
    pub(crate) replica_headers: Vec<(ReplicaId, HeaderValue)>,
    /// Whether chats without a session key get an implicit one (`--implicit-sessions`).
    pub(crate) implicit_sessions: bool,
    /// Kept alive with the gateway (see [`StoreLayers`]).
    pub(crate) _work_views: Vec<replica_router_work_view::Handle>,
    /// Body timeouts and the global body budget.
    pub(crate) limits: super::limits::Limits,
    /// `--api-keys`: bearer keys name the tenant.
    pub(crate) auth: Option<ApiKeys>,
    /// `--trust-tenant-header`: with `--api-keys`, a request's tenant header still wins.
    pub(crate) trust_tenant_header: bool,
}

/// One connection's handle on the stack (a connection serves one request at a time, so the lock is
/// uncontended; it exists because the stack is `&mut` and the request future is `'static`).
pub(crate) struct ConnState {
    shared: Arc<Shared>,
    stack: Mutex<Stack>,
}

impl ConnState {
    pub(crate) fn new(shared: Arc<Shared>) -> Arc<Self> {
        let stack = Mutex::new(shared.stack.clone());
        Arc::new(ConnState { shared, stack })
    }
}

/// The hop-by-hop headers (RFC 9110 section 7.6.1), never forwarded, as bits of a mask.
fn hop_by_hop_bit(name: &HeaderName) -> u8 {
    match name.as_str() {
        "connection" => 1,
        "keep-alive" => 2,
        "proxy-connection" => 4,
        "te" => 8,
        "trailer" => 16,
        "transfer-encoding" => 32,
        "upgrade" => 64,
        _ => 0,
    }
}

const HOP_BY_HOP: [&str; 7] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // One pass over the (few) headers; then remove only what is there.
    let mask = headers.keys().fold(0u8, |m, k| m | hop_by_hop_bit(k));
    if mask == 0 {
        return;
    }
    if mask & 1 != 0 {
        // `Connection: keep-alive` / `close` (the usual values) name no other header.
        let named: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            // Bytes, not `to_str`: a non-ASCII token must not hide the names around it.
            .flat_map(|v| v.as_bytes().split(|b| *b == b','))
            .map(<[u8]>::trim_ascii)
            .filter(|t| !t.eq_ignore_ascii_case(b"keep-alive") && !t.eq_ignore_ascii_case(b"close"))
            .filter_map(|t| HeaderName::from_bytes(t).ok())
            .collect();
        for n in named {
            headers.remove(n);
        }
    }
    for (i, name) in HOP_BY_HOP.iter().enumerate() {
        if mask & (1 << i) != 0 {
            headers.remove(*name);
        }
    }
}

/// Handles one request.
pub(crate) async fn handle(conn: Arc<ConnState>, req: Request<Incoming>) -> Response<GatewayBody> {
    let shared = &conn.shared;
    let resp = route(&conn, req).await;
    shared.counters.record(resp.status());
    resp
}

async fn route(conn: &ConnState, req: Request<Incoming>) -> Response<GatewayBody> {
    let shared = &conn.shared;
    if let Some(refused) = super::limits::check_request(&req) {
        return refused;
    }
    let kind = match (req.method(), req.uri().path()) {
        (&Method::POST, "/v1/chat/completions") => Some(ApiKind::Chat),
        (&Method::POST, "/v1/completions") => Some(ApiKind::Completion),
        (&Method::GET, "/metrics") => return metrics(shared),
        (&Method::GET, "/health") => return health(shared),
        (&Method::GET, "/v1/models") if shared.by_model => return models(shared),
        (&Method::GET, p) if shared.admin_here && p.starts_with("/admin/") => {
            if let Some(keys) = &shared.auth {
                if keys.tenant(req.headers()).is_none() {
                    return unauthorized();
                }
            }
            return super::admin::route(shared, p).unwrap_or_else(not_found);
        }
        _ => None,
    };
    // Stateless routes: no session affinity, whatever headers the client sends.
    let stateless = req.uri().path() == "/v1/embeddings";
    // `--api-keys`: the bearer key names the tenant (checked before the body is read).
    let key_tenant = match &shared.auth {
        Some(keys) => match keys.tenant(req.headers()) {
            Some(t) => Some(t.clone()),
            None => return unauthorized(),
        },
        None => None,
    };
    for (name, value) in req.headers() {
        let b = value.as_bytes();
        if !b.is_ascii() && std::str::from_utf8(b).is_err() {
            let msg = format!("header {name} is not valid UTF-8");
            return error(StatusCode::BAD_REQUEST, "invalid_request_error", &msg);
        }
    }
    let (mut parts, body) = req.into_parts();
    if body.size_hint().lower() > shared.max_body as u64 {
        return too_large(shared.max_body);
    }
    // `_held` keeps the body's bytes counted against the global budget until the answer is in.
    let (bytes, _held) = match super::limits::read_body(body, shared.max_body, &shared.limits).await
    {
        Ok(b) => b,
        Err(e) => {
            return super::limits::read_error_response(&e)
                .unwrap_or_else(|| too_large(shared.max_body))
        }
    };
    let mut prompt_estimate = None;
    let mut model = None;
    let mut ctx = match kind {
        Some(kind) => {
            let info = match inspect_body(kind, &bytes) {
                Ok(info) => info,
                Err(msg) => return error(StatusCode::BAD_REQUEST, "invalid_request_error", &msg),
            };
            prompt_estimate = Some(info.prompt_tokens);
            match shared.extractor.extract_headers(&parts.headers) {
                Ok(mut ctx) => {
                    if ctx.session.is_none() && shared.implicit_sessions {
                        ctx.session = info.conversation.map(implicit_session);
                    }
                    ctx.estimated_tokens = info.estimated_tokens();
                    ctx.context_tokens = info.context_tokens();
                    ctx.prefix = Some(info.prefix);
                    model = Some(info.model);
                    Some(ctx)
                }
                Err(e) => return route_error(&e),
            }
        }
        // Not validated: the estimate is an upper bound of what the body can hold (a token is
        // at least a byte), never a guess that a crafted body could undercut.
        None => match shared.extractor.extract_headers(&parts.headers) {
            Ok(mut ctx) => {
                ctx.estimated_tokens = bytes.len() as u64;
                if stateless {
                    ctx.session = None;
                    ctx.user = None;
                }
                if shared.by_model && !bytes.is_empty() {
                    match body_model(&bytes) {
                        Ok(m) => model = m,
                        Err(msg) => {
                            return error(StatusCode::BAD_REQUEST, "invalid_request_error", &msg)
                        }
                    }
                }
                Some(ctx)
            }
            Err(e) => return route_error(&e),
        },
    };
    if let (Some(t), Some(ctx)) = (key_tenant, ctx.as_mut()) {
        if !(shared.trust_tenant_header && ctx.tenant.is_some()) {
            ctx.tenant = Some(t);
        }
        // The client's credential for the gateway, not for the replicas.
        parts.headers.remove(header::AUTHORIZATION);
    }
    strip_hop_by_hop(&mut parts.headers);
    let mut up = Request::from_parts(parts, Full::new(bytes));
    if let Some(ctx) = ctx {
        up.extensions_mut().insert(ctx);
    }
    if let (true, Some(m)) = (shared.by_model, model) {
        up.extensions_mut().insert(ModelName::new(m));
    }
    let fut = {
        let mut stack = conn.stack.lock();
        let waker = futures_util::task::noop_waker_ref();
        match tower::Service::poll_ready(&mut *stack, &mut Context::from_waker(waker)) {
            Poll::Ready(Ok(())) => Ok(tower::Service::call(&mut *stack, up)),
            Poll::Ready(Err(e)) => return route_error(&e),
            // A layer that applies back-pressure: wait on a clone of the stack instead.
            Poll::Pending => Err((stack.clone(), up)),
        }
    };
    let result = match fut {
        Ok(f) => f.await,
        Err((s, up)) => tower::ServiceExt::oneshot(s, up).await,
    };
    match result {
        Ok(resp) => {
            let (mut parts, mut body) = resp.into_parts();
            if let Some(prompt_estimate) = prompt_estimate {
                // Settle the token quota to what was generated, calibrate the cache model.
                let sink = parts.extensions.get::<TokenReport>().map(|report| {
                    Box::new(Settle {
                        report: report.clone(),
                        prompt_estimate,
                    }) as Box<dyn UsageSink>
                });
                body.scan_usage(sink);
            }
            strip_hop_by_hop(&mut parts.headers);
            if let Some(d) = parts.extensions.get::<Decision>() {
                // As `affinity::annotate_response`, with the replica ids' header values prepared once.
                let affinity = match d.reason() {
                    DecisionReason::Home => Some("home"),
                    DecisionReason::Spill => Some("spill"),
                    DecisionReason::Failover => Some("failover"),
                    _ => None,
                };
                let id = shared
                    .replica_headers
                    .iter()
                    .find(|(id, _)| id == d.replica())
                    .map(|(_, v)| v.clone())
                    .or_else(|| HeaderValue::from_str(d.replica().as_str()).ok());
                if let Some(a) = affinity {
                    parts
                        .headers
                        .insert(AFFINITY_HEADER, HeaderValue::from_static(a));
                }
                if let Some(id) = id {
                    parts.headers.insert(REPLICA_HEADER, id);
                }
            }
            Response::from_parts(parts, GatewayBody::Upstream(body))
        }
        Err(e) => route_error(&e),
    }
}

fn route_error(e: &RouteError) -> Response<GatewayBody> {
    metrics::counter!("gateway_route_errors_total", "code" => e.code()).increment(1);
    e.to_http_response().map(GatewayBody::local)
}

pub(crate) fn not_found() -> Response<GatewayBody> {
    error(StatusCode::NOT_FOUND, "not_found_error", "no such route")
}

fn unauthorized() -> Response<GatewayBody> {
    metrics::counter!("gateway_unauthorized_total").increment(1);
    let mut r = error(
        StatusCode::UNAUTHORIZED,
        "invalid_request_error",
        "missing or unknown API key (send `Authorization: Bearer <key>`)",
    );
    r.headers_mut()
        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    r
}

fn too_large(max: usize) -> Response<GatewayBody> {
    let msg = format!("request body larger than {max} bytes");
    error(StatusCode::PAYLOAD_TOO_LARGE, "invalid_request_error", &msg)
}

/// An OpenAI-style error response.
pub(crate) fn error(status: StatusCode, kind: &str, message: &str) -> Response<GatewayBody> {
    let body = openai_error_json(status, kind, message);
    let mut r = Response::new(GatewayBody::local(body));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

fn health(shared: &Shared) -> Response<GatewayBody> {
    if shared
        .tiers
        .iter()
        .all(|t| t.pool.load().eligible().is_empty())
    {
        error(
            StatusCode::SERVICE_UNAVAILABLE,
            "no_replica",
            "no replica is eligible",
        )
    } else {
        Response::new(GatewayBody::local(Bytes::from_static(b"ok\n")))
    }
}

/// `GET /v1/models` of a gateway routing by model: the models its pools serve, in the OpenAI
/// list shape, each with the smallest context limit among its replicas when all declare one.
fn models(shared: &Shared) -> Response<GatewayBody> {
    let data: Vec<serde_json::Value> = shared
        .tiers
        .iter()
        .map(|t| {
            let snap = t.pool.load();
            let limits: Vec<u32> = snap
                .replicas()
                .iter()
                .map(|r| r.spec().max_context)
                .collect();
            let max_len = (!limits.is_empty() && limits.iter().all(|l| *l > 0))
                .then(|| limits.iter().copied().min())
                .flatten();
            serde_json::json!({
                "id": t.model.as_deref().unwrap_or(ANY_MODEL),
                "object": "model",
                "owned_by": "replica-router",
                "max_model_len": max_len,
                "replicas": snap.len(),
            })
        })
        .collect();
    super::admin::json_response(
        StatusCode::OK,
        &serde_json::json!({"object": "list", "data": data}),
    )
}

/// A per-replica gauge: name, help text, and how to read it from the replica's state.
type Series = (
    &'static str,
    &'static str,
    fn(&replica_router::pool::ReplicaState) -> f64,
);

fn metrics(shared: &Shared) -> Response<GatewayBody> {
    let mut out = shared.render.as_ref().map(|r| r()).unwrap_or_default();
    let snaps: Vec<_> = shared.tiers.iter().map(|t| t.pool.load()).collect();
    let series: [Series; 4] = [
        (
            "gateway_replica_in_flight",
            "Requests in flight on the replica (until their body ends).",
            |s| s.in_flight() as f64,
        ),
        (
            "gateway_replica_in_flight_tokens",
            "Estimated tokens in flight on the replica.",
            |s| s.in_flight_tokens() as f64,
        ),
        (
            "gateway_replica_eligible",
            "1 if the replica may take new requests.",
            |s| f64::from(u8::from(s.is_eligible())),
        ),
        (
            "gateway_replica_completed",
            "Requests the replica completed.",
            |s| s.completed() as f64,
        ),
    ];
    for (name, help, f) in series {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
        for r in snaps.iter().flat_map(|s| s.replicas()) {
            let mut id = String::new();
            json_escape_into(r.id().as_str(), &mut id);
            let _ = writeln!(out, "{name}{{replica=\"{id}\"}} {}", f(r.state()));
        }
    }
    let mut resp = Response::new(GatewayBody::local(out));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4"),
    );
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_are_stripped_and_others_kept() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-private"),
        );
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert("x-private", HeaderValue::from_static("1"));
        h.insert("x-session-id", HeaderValue::from_static("conv-1"));
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        strip_hop_by_hop(&mut h);
        let left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(left, ["x-session-id", "content-type"]);

        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("close"));
        h.insert(header::SERVER, HeaderValue::from_static("nginx"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_bytes(b"\xff, ,,").unwrap(),
        );
        strip_hop_by_hop(&mut h);
        assert!(h.is_empty());
    }
}
