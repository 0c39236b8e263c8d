//! Test backends shared by the integration tests.
#![allow(dead_code)]

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::Frame;
use replica_router::backend::Backend;

/// What a scripted backend does with a request, chosen by the `x-script` header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Script {
    /// 200 with `chunks` body chunks, each after `delay`.
    Stream { chunks: usize, delay_ms: u64 },
    /// The service fails (transport error).
    Error,
    /// 500 with a short body.
    ServerError,
    /// The service panics.
    Panic,
    /// Waits before answering.
    Slow { delay_ms: u64 },
    /// Like an engine serving one request at a time: the first data frame comes after a fixed
    /// cost plus the request's planned prefill ([`WorkPlan`] in its extensions, the whole
    /// estimate without one) at `tokens_per_s`.
    Prefill { overhead_ms: u64, tokens_per_s: u64 },
}

impl Script {
    pub fn header(self) -> String {
        match self {
            Script::Stream { chunks, delay_ms } => format!("stream:{chunks}:{delay_ms}"),
            Script::Error => "error".into(),
            Script::ServerError => "500".into(),
            Script::Panic => "panic".into(),
            Script::Slow { delay_ms } => format!("slow:{delay_ms}"),
            Script::Prefill {
                overhead_ms,
                tokens_per_s,
            } => format!("prefill:{overhead_ms}:{tokens_per_s}"),
        }
    }

    fn parse(v: &str) -> Script {
        let parts: Vec<&str> = v.split(':').collect();
        match parts.as_slice() {
            ["stream", c, d] => Script::Stream {
                chunks: c.parse().unwrap(),
                delay_ms: d.parse().unwrap(),
            },
            ["error"] => Script::Error,
            ["500"] => Script::ServerError,
            ["panic"] => Script::Panic,
            ["slow", d] => Script::Slow {
                delay_ms: d.parse().unwrap(),
            },
            ["prefill", o, r] => Script::Prefill {
                overhead_ms: o.parse().unwrap(),
                tokens_per_s: r.parse().unwrap(),
            },
            _ => Script::Stream {
                chunks: 1,
                delay_ms: 0,
            },
        }
    }
}

/// A body that yields `remaining` chunks, sleeping `delay` before each.
#[derive(Debug)]
pub struct ChunkBody {
    remaining: usize,
    delay: Duration,
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl ChunkBody {
    pub fn new(chunks: usize, delay: Duration) -> Self {
        ChunkBody {
            remaining: chunks,
            delay,
            sleep: None,
        }
    }
}

impl http_body::Body for ChunkBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.remaining == 0 {
            return Poll::Ready(None);
        }
        if !self.delay.is_zero() {
            let delay = self.delay;
            let sleep = self
                .sleep
                .get_or_insert_with(|| Box::pin(tokio::time::sleep(delay)));
            if sleep.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            self.sleep = None;
        }
        self.remaining -= 1;
        Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(b"data: tok\n\n")))))
    }

    fn is_end_stream(&self) -> bool {
        self.remaining == 0
    }
}

use std::future::Future;

/// A backend that follows the request's `x-script` header and counts calls.
#[derive(Clone, Default)]
pub struct ScriptedBackend {
    pub calls: Arc<AtomicUsize>,
}

impl Backend for ScriptedBackend {}

#[derive(Debug)]
pub struct ScriptError;

impl std::fmt::Display for ScriptError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("scripted failure")
    }
}

impl std::error::Error for ScriptError {}

impl tower::Service<http::Request<()>> for ScriptedBackend {
    type Response = http::Response<ChunkBody>;
    type Error = ScriptError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, ScriptError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), ScriptError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<()>) -> Self::Future {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let script = req
            .headers()
            .get("x-script")
            .and_then(|v| v.to_str().ok())
            .map_or(
                Script::Stream {
                    chunks: 1,
                    delay_ms: 0,
                },
                Script::parse,
            );
        let prefill = req
            .extensions()
            .get::<replica_router::load::WorkPlan>()
            .map(|p| p.prefill_tokens)
            .or_else(|| {
                req.extensions()
                    .get::<replica_router::context::RouteContext>()
                    .map(|c| c.estimated_tokens)
            })
            .unwrap_or(0);
        Box::pin(async move {
            match script {
                Script::Prefill {
                    overhead_ms,
                    tokens_per_s,
                } => {
                    let secs =
                        overhead_ms as f64 / 1e3 + prefill as f64 / tokens_per_s.max(1) as f64;
                    Ok(event_stream(ChunkBody::new(
                        1,
                        Duration::from_secs_f64(secs),
                    )))
                }
                Script::Stream { chunks, delay_ms } => Ok(event_stream(ChunkBody::new(
                    chunks,
                    Duration::from_millis(delay_ms),
                ))),
                Script::Error => Err(ScriptError),
                Script::ServerError => {
                    let mut r = http::Response::new(ChunkBody::new(1, Duration::ZERO));
                    *r.status_mut() = http::StatusCode::INTERNAL_SERVER_ERROR;
                    Ok(r)
                }
                Script::Panic => panic!("scripted panic"),
                Script::Slow { delay_ms } => {
                    tokio::time::sleep(Duration::from_millis(delay_ms)).await;
                    Ok(http::Response::new(ChunkBody::new(1, Duration::ZERO)))
                }
            }
        })
    }
}

/// A streamed response (`Content-Type: text/event-stream`): its first data frame is the first
/// token, so its time to first data measures the prefill.
fn event_stream<B>(body: B) -> http::Response<B> {
    let mut r = http::Response::new(body);
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/event-stream"),
    );
    r
}

/// A request with a script.
pub fn request(script: Script) -> http::Request<()> {
    http::Request::builder()
        .header("x-script", script.header())
        .body(())
        .unwrap()
}

/// A pool of `n` scripted replicas `r0`..`r{n-1}` of model `m`.
pub fn scripted_pool(n: usize) -> replica_router::pool::Pool<ScriptedBackend> {
    let ids: Vec<String> = (0..n).map(|i| format!("r{i}")).collect();
    scripted_pool_of(&ids)
}

/// A pool of scripted replicas with `ids`, of model `m`.
pub fn scripted_pool_of(ids: &[impl AsRef<str>]) -> replica_router::pool::Pool<ScriptedBackend> {
    let mut b = replica_router::pool::Pool::builder();
    for id in ids {
        b = b.replica(
            id.as_ref(),
            replica_router::replica::ReplicaSpec::new("m"),
            ScriptedBackend::default(),
        );
    }
    b.build().unwrap()
}

/// Keeps a request with `tokens` of prefill outstanding on replica `id` (sent straight to
/// dispatch, answered after an hour) until the returned task is aborted.
pub fn hold(
    pool: &replica_router::pool::Pool<ScriptedBackend>,
    id: &str,
    tokens: u64,
) -> tokio::task::JoinHandle<()> {
    use replica_router::request::RouteRequest;
    use tower::{Service, ServiceExt};
    let mut svc = replica_router::dispatch::Dispatch::new(pool.clone());
    let mut req = request(Script::Slow {
        delay_ms: 3_600_000,
    });
    req.set_route_context(replica_router::context::RouteContext {
        estimated_tokens: tokens,
        ..Default::default()
    });
    req.set_decision(replica_router::decision::Decision::new(
        replica_router::replica::ReplicaId::new(id).unwrap(),
        replica_router::decision::DecisionReason::LeastLoaded,
    ));
    tokio::spawn(async move {
        let _ = svc.ready().await.unwrap().call(req).await;
    })
}
