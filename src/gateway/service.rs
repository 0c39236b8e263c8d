//! The request path: validate cheaply, route through the crate's stack, forward the bytes.

use std::fmt::Write as _;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::header::{self, HeaderName};
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body::Body as _;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use parking_lot::Mutex;

use crate::balance::{LeastInFlight, LoadMeasure, RoundRobin};
use crate::context::{HeaderExtractor, RouteContextService};
use crate::decision::Decision;
use crate::dispatch::Dispatch;
use crate::error::{json_escape_into, RouteError};
use crate::inflight::TrackedBody;
use crate::pool::Pool;
use crate::replica::ReplicaId;
use crate::rng::RngSeed;

use super::body::GatewayBody;
use super::config::{GatewayConfig, Policy};
use super::inspect::{inspect_body, ApiKind};
use super::MetricsRender;

pub use super::upstream::Upstream;
/// The request type inside the stack.
pub type UpstreamRequest = Request<Full<Bytes>>;
type UpstreamResponse = Response<TrackedBody<super::upstream::UpstreamBody>>;

/// The header carrying the routing decision's reason (`home`, `spill`, `failover`, `least-loaded`, ...).
pub const AFFINITY_HEADER: HeaderName = HeaderName::from_static("x-replica-affinity");
/// The header naming the replica that served the request.
pub const REPLICA_HEADER: HeaderName = HeaderName::from_static("x-replica-id");

/// The picking layer chosen by `--policy`.
#[derive(Debug, Clone)]
pub(crate) enum Picker {
    Least(LeastInFlight<Dispatch<Upstream>, Upstream>),
    Rotate(RoundRobin<Dispatch<Upstream>, Upstream>),
}

impl tower::Service<UpstreamRequest> for Picker {
    type Response = UpstreamResponse;
    type Error = RouteError;
    type Future =
        crate::future::RouteFuture<crate::dispatch::DispatchFuture<Upstream, UpstreamRequest>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), RouteError>> {
        match self {
            Picker::Least(s) => s.poll_ready(cx),
            Picker::Rotate(s) => s.poll_ready(cx),
        }
    }

    fn call(&mut self, req: UpstreamRequest) -> Self::Future {
        match self {
            Picker::Least(s) => s.call(req),
            Picker::Rotate(s) => s.call(req),
        }
    }
}

/// The whole routing stack, outermost first: route context -> picker -> dispatch.
pub(crate) type Stack = RouteContextService<Picker, HeaderExtractor>;

/// Builds the stack for `cfg` over `pool`.
pub(crate) fn extractor(cfg: &GatewayConfig) -> HeaderExtractor {
    HeaderExtractor::default()
        .session_header(Some(cfg.affinity_header.clone()))
        .user_header(cfg.user_header.clone())
        .tenant_header(Some(cfg.tenant_header.clone()))
        .estimated_tokens_header(None)
}

/// Builds the stack for `cfg` over `pool`. Validated requests arrive with their route context
/// already set (with the token estimate from the body); others get it from their headers here.
pub(crate) fn build_stack(cfg: &GatewayConfig, pool: &Pool<Upstream>) -> Stack {
    let extractor = extractor(cfg);
    let dispatch = Dispatch::new(pool.clone());
    let picker = match cfg.policy {
        // Session affinity is not in the crate yet: requests go to the least loaded replica.
        Policy::Affinity | Policy::LeastLoaded => Picker::Least(LeastInFlight::new(
            dispatch,
            pool.clone(),
            LoadMeasure::default(),
            RngSeed::from_entropy(),
        )),
        Policy::RoundRobin => Picker::Rotate(RoundRobin::new(dispatch, pool.clone())),
    };
    tower::Layer::layer(&crate::context::RouteContextLayer::new(extractor), picker)
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
    pub(crate) pool: Pool<Upstream>,
    pub(crate) stack: Stack,
    pub(crate) max_body: usize,
    pub(crate) render: Option<MetricsRender>,
    pub(crate) counters: Counters,
    pub(crate) extractor: HeaderExtractor,
    pub(crate) replica_headers: Vec<(ReplicaId, HeaderValue)>,
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

/// Whether `name` is a hop-by-hop header (RFC 9110 section 7.6.1), never forwarded.
fn is_hop_by_hop(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection" | "keep-alive" | "proxy-connection" | "te" | "trailer" | "transfer-encoding" | "upgrade"
    )
}

fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // One pass over the (few) headers; removal only when there is something to remove.
    if !headers.keys().any(is_hop_by_hop) {
        return;
    }
    let mut named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .flat_map(|v| v.to_str().unwrap_or("").split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    named.extend(headers.keys().filter(|k| is_hop_by_hop(k)).cloned());
    for n in named {
        headers.remove(n);
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
    let kind = match (req.method(), req.uri().path()) {
        (&Method::POST, "/v1/chat/completions") => Some(ApiKind::Chat),
        (&Method::POST, "/v1/completions") => Some(ApiKind::Completion),
        (&Method::GET, "/metrics") => return metrics(shared),
        (&Method::GET, "/health") => return health(shared),
        _ => None,
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
    let bytes = match read_body(body, shared.max_body).await {
        Ok(b) => b,
        Err(ReadError::TooLarge) => return too_large(shared.max_body),
        Err(ReadError::Io) => {
            return error(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "could not read the request body",
            )
        }
    };
    let ctx = match kind {
        Some(kind) => {
            let info = match inspect_body(kind, &bytes) {
                Ok(info) => info,
                Err(msg) => return error(StatusCode::BAD_REQUEST, "invalid_request_error", &msg),
            };
            match shared.extractor.extract_headers(&parts.headers) {
                Ok(mut ctx) => {
                    ctx.estimated_tokens = info.estimated_tokens();
                    Some(ctx)
                }
                Err(e) => return route_error(&e),
            }
        }
        None => None,
    };
    strip_hop_by_hop(&mut parts.headers);
    let mut up = Request::from_parts(parts, Full::new(bytes));
    if let Some(ctx) = ctx {
        up.extensions_mut().insert(ctx);
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
            let (mut parts, body) = resp.into_parts();
            strip_hop_by_hop(&mut parts.headers);
            if let Some(d) = parts.extensions.get::<Decision>() {
                let reason = HeaderValue::from_static(d.reason().as_str());
                let id = shared
                    .replica_headers
                    .iter()
                    .find(|(id, _)| id == d.replica())
                    .map(|(_, v)| v.clone())
                    .or_else(|| HeaderValue::from_str(d.replica().as_str()).ok());
                parts.headers.insert(AFFINITY_HEADER, reason);
                if let Some(id) = id {
                    parts.headers.insert(REPLICA_HEADER, id);
                }
            }
            Response::from_parts(parts, GatewayBody::Upstream(body))
        }
        Err(e) => route_error(&e),
    }
}

enum ReadError {
    TooLarge,
    Io,
}

/// Reads a request body of at most `max` bytes. The usual case, a body that arrives in one frame,
/// is kept as that frame's buffer: no copy, no allocation.
async fn read_body(mut body: Incoming, max: usize) -> Result<Bytes, ReadError> {
    let mut first: Option<Bytes> = None;
    let mut rest: Option<bytes::BytesMut> = None;
    while !body.is_end_stream() {
        let Some(frame) = body.frame().await else {
            break;
        };
        let Ok(data) = frame.map_err(|_| ReadError::Io)?.into_data() else {
            continue;
        };
        let len = first.as_ref().map_or(0, Bytes::len)
            + rest.as_ref().map_or(0, |r| r.len())
            + data.len();
        if len > max {
            return Err(ReadError::TooLarge);
        }
        match (&first, &mut rest) {
            (None, _) => first = Some(data),
            (Some(f), None) => {
                let mut r = bytes::BytesMut::with_capacity(len.max(2 * f.len()));
                r.extend_from_slice(f);
                r.extend_from_slice(&data);
                rest = Some(r);
            }
            (Some(_), Some(r)) => r.extend_from_slice(&data),
        }
    }
    Ok(match rest {
        Some(r) => r.freeze(),
        None => first.unwrap_or_default(),
    })
}

fn route_error(e: &RouteError) -> Response<GatewayBody> {
    metrics::counter!("gateway_route_errors_total", "code" => e.code()).increment(1);
    e.to_http_response().map(GatewayBody::local)
}

fn too_large(max: usize) -> Response<GatewayBody> {
    let msg = format!("request body larger than {max} bytes");
    error(StatusCode::PAYLOAD_TOO_LARGE, "invalid_request_error", &msg)
}

/// An OpenAI-style error response.
pub(crate) fn error(status: StatusCode, kind: &str, message: &str) -> Response<GatewayBody> {
    let mut body = String::with_capacity(64 + message.len());
    body.push_str("{\"error\":{\"message\":\"");
    json_escape_into(message, &mut body);
    let _ = write!(
        body,
        "\",\"type\":\"{kind}\",\"param\":null,\"code\":{}}}}}",
        status.as_u16()
    );
    let mut r = Response::new(GatewayBody::local(body));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

fn health(shared: &Shared) -> Response<GatewayBody> {
    let snap = shared.pool.load();
    if snap.eligible().is_empty() {
        error(
            StatusCode::SERVICE_UNAVAILABLE,
            "no_replica",
            "no replica is eligible",
        )
    } else {
        Response::new(GatewayBody::local(Bytes::from_static(b"ok\n")))
    }
}

fn metrics(shared: &Shared) -> Response<GatewayBody> {
    let mut out = shared.render.as_ref().map(|r| r()).unwrap_or_default();
    let snap = shared.pool.load();
    let series: [(&str, &str, fn(&crate::pool::ReplicaState) -> f64); 4] = [
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
        for r in snap.replicas() {
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
