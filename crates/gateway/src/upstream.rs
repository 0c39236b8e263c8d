//! HTTP replicas reached over per-thread pools of keep-alive connections.
//!
//! Each thread (each gateway shard) keeps its own idle connections to each replica: a connection is
//! created, driven and reused on one thread, so a request never wakes another thread on its way to
//! the replica and back. A connection goes back to its pool when the response body has been read
//! to its end (never while a stream is still flowing); a body dropped early closes it. A request
//! that a pooled connection could not even start sending (the replica closed it while idle) is
//! retried on another connection.

use std::cell::RefCell;
use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::uri::PathAndQuery;
use http::{HeaderValue, Request, Response, Uri};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use parking_lot::Mutex;

use replica_router::backend::{Backend, BoxFuture};
use replica_router::error::BoxError;
use replica_router::http_backend::{BaseUrl, HttpReplicaError};

type Sender = SendRequest<Full<Bytes>>;

/// Idle connections to one replica, owned by one thread.
#[derive(Debug)]
struct ConnPool {
    idle: Mutex<Vec<Sender>>,
    max_idle: usize,
}

impl ConnPool {
    fn take(&self) -> Option<Sender> {
        let mut idle = self.idle.lock();
        while let Some(s) = idle.pop() {
            if !s.is_closed() {
                return Some(s);
            }
        }
        None
    }

    fn put(&self, s: Sender) {
        if s.is_closed() {
            return;
        }
        let mut idle = self.idle.lock();
        if idle.len() < self.max_idle {
            idle.push(s);
        }
    }
}

thread_local! {
    static POOLS: RefCell<HashMap<u64, Arc<ConnPool>>> = RefCell::new(HashMap::new());
}

static NEXT_UPSTREAM: AtomicU64 = AtomicU64::new(1);

fn local_pool(id: u64, max_idle: usize) -> Arc<ConnPool> {
    POOLS.with(|p| {
        p.borrow_mut()
            .entry(id)
            .or_insert_with(|| {
                Arc::new(ConnPool {
                    idle: Mutex::new(Vec::new()),
                    max_idle,
                })
            })
            .clone()
    })
}

/// How long connecting to a replica may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Attempts for a request that pooled connections could not start sending.
const SEND_ATTEMPTS: usize = 3;

#[derive(Debug)]
struct Inner {
    id: u64,
    connect_addr: String,
    host: HeaderValue,
    prefix: String,
    base_url: String,
    max_idle_per_host: usize,
    /// Response head deadline (`--upstream-ttfb-timeout-ms`).
    ttfb: Option<Duration>,
    /// Longest pause between response body frames (`--upstream-idle-timeout-ms`).
    idle: Option<Duration>,
}

fn timed_out(what: &'static str) -> BoxError {
    Box::new(std::io::Error::new(std::io::ErrorKind::TimedOut, what))
}

/// One replica reached over HTTP/1.1 with the calling thread's pooled client.
#[derive(Debug, Clone)]
pub struct Upstream {
    inner: Arc<Inner>,
}

impl Upstream {
    /// A replica at `url` (`http://host:port`, optionally with a path prefix), keeping up to
    /// `max_idle_per_host` idle connections to it per thread.
    ///
    /// ```
    /// use replica_router_gateway::Upstream;
    /// assert_eq!(Upstream::new("http://127.0.0.1:8000/", 64).unwrap().base_url(), "http://127.0.0.1:8000");
    /// assert!(Upstream::new("https://x", 1).is_err() && Upstream::new("::", 1).is_err());
    /// ```
    pub fn new(url: &str, max_idle_per_host: usize) -> Result<Self, HttpReplicaError> {
        Self::with_timeouts(url, max_idle_per_host, None, None)
    }

    /// Like [`Upstream::new`], with a deadline for the response head (`ttfb`: else the attempt
    /// fails with a `TimedOut` I/O error, which failover retries on another replica) and a limit
    /// on the pause between two frames of the response body (`idle`: else the body ends with a
    /// `TimedOut` error and its connection is closed). `None` waits without limit.
    pub fn with_timeouts(
        url: &str,
        max_idle_per_host: usize,
        ttfb: Option<Duration>,
        idle: Option<Duration>,
    ) -> Result<Self, HttpReplicaError> {
        let BaseUrl {
            scheme,
            authority,
            prefix,
        } = BaseUrl::parse(url)?;
        let host = HeaderValue::from_str(authority.as_str()).map_err(|_| {
            HttpReplicaError::InvalidUrl {
                url: url.to_owned(),
                reason: "bad host",
            }
        })?;
        let base_url = format!("{scheme}://{authority}{prefix}");
        let connect_addr = format!(
            "{}:{}",
            authority.host(),
            authority.port_u16().unwrap_or(80)
        );
        let id = NEXT_UPSTREAM.fetch_add(1, Ordering::Relaxed);
        Ok(Upstream {
            inner: Arc::new(Inner {
                id,
                connect_addr,
                host,
                prefix,
                base_url,
                max_idle_per_host,
                ttfb,
                idle,
            }),
        })
    }

    /// The base URL.
    pub fn base_url(&self) -> &str {
        &self.inner.base_url
    }

    /// The origin-form request target for `pq` (the replica's path prefix prepended).
    fn target(&self, pq: Option<&PathAndQuery>) -> Result<Uri, http::Error> {
        if self.inner.prefix.is_empty() {
            let pq = pq
                .cloned()
                .unwrap_or_else(|| PathAndQuery::from_static("/"));
            return Ok(Uri::from(pq));
        }
        let pq = PathAndQuery::try_from(format!(
            "{}{}",
            self.inner.prefix,
            pq.map_or("/", |p| p.as_str())
        ))?;
        Ok(Uri::from(pq))
    }

    fn prepare(&self, req: &mut Request<Full<Bytes>>) -> Result<(), http::Error> {
        *req.uri_mut() = self.target(req.uri().path_and_query())?;
        req.headers_mut()
            .insert(http::header::HOST, self.inner.host.clone());
        Ok(())
    }

    async fn get(
        &self,
        path: &'static str,
        timeout: Duration,
    ) -> Result<(http::StatusCode, Bytes), BoxError> {
        let mut req = Request::get(path).body(Full::new(Bytes::new()))?;
        self.prepare(&mut req)?;
        let fut = send(
            local_pool(self.inner.id, self.inner.max_idle_per_host),
            self.inner.clone(),
            req,
        );
        let resp = tokio::time::timeout(timeout, fut)
            .await
            .map_err(|_| BoxError::from("timed out"))??;
        let status = resp.status();
        let body = tokio::time::timeout(timeout, resp.into_body().collect())
            .await
            .map_err(|_| BoxError::from("timed out"))??
            .to_bytes();
        Ok((status, body))
    }
}

async fn connect(inner: &Inner) -> Result<Sender, BoxError> {
    let stream = tokio::time::timeout(
        CONNECT_TIMEOUT,
        tokio::net::TcpStream::connect(inner.connect_addr.as_str()),
    )
    .await
    .map_err(|_| BoxError::from(format!("connecting to {} timed out", inner.connect_addr)))??;
    let _ = stream.set_nodelay(true);
    let (sender, conn) = hyper::client::conn::http1::Builder::new()
        .writev(false)
        .handshake(TokioIo::new(stream))
        .await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}

async fn send(
    pool: Arc<ConnPool>,
    inner: Arc<Inner>,
    mut req: Request<Full<Bytes>>,
) -> Result<Response<UpstreamBody>, BoxError> {
    let mut attempt = 0;
    loop {
        attempt += 1;
        let mut sender = match pool.take() {
            Some(s) => s,
            None => connect(&inner).await?,
        };
        if !sender.is_ready() && sender.ready().await.is_err() {
            continue;
        }
        match sender.try_send_request(req).await {
            Ok(resp) => {
                let (parts, body) = resp.into_parts();
                let body = UpstreamBody {
                    inner: body,
                    conn: Some((sender, pool)),
                    idle: inner.idle,
                    timer: None,
                    progressed: false,
                };
                return Ok(Response::from_parts(parts, body));
            }
            Err(mut e) => match e.take_message() {
                // Never written: the connection was closed while idle. Try another one.
                Some(r) if attempt < SEND_ATTEMPTS => req = r,
                _ => return Err(e.into_error().into()),
            },
        }
    }
}

/// A replica's response body; its connection returns to the pool when the body has been read to
/// the end.
pub struct UpstreamBody {
    inner: Incoming,
    conn: Option<(Sender, Arc<ConnPool>)>,
    idle: Option<Duration>,
    /// Armed the first time the body is not ready; re-armed after each frame.
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
    progressed: bool,
}

impl std::fmt::Debug for UpstreamBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamBody").finish_non_exhaustive()
    }
}

impl UpstreamBody {
    fn release(&mut self) {
        if let Some((s, pool)) = self.conn.take() {
            pool.put(s);
        }
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => self.release(),
            Poll::Ready(Some(Ok(_))) => {
                self.progressed = true;
                if self.inner.is_end_stream() {
                    self.release();
                }
            }
            Poll::Ready(Some(Err(_))) => self.conn = None,
            Poll::Pending => {
                if let Some(idle) = self.idle {
                    let this = &mut *self;
                    let deadline = tokio::time::Instant::now() + idle;
                    let timer = match &mut this.timer {
                        Some(t) => {
                            if std::mem::take(&mut this.progressed) {
                                t.as_mut().reset(deadline);
                            }
                            t
                        }
                        None => {
                            this.progressed = false;
                            this.timer
                                .insert(Box::pin(tokio::time::sleep_until(deadline)))
                        }
                    };
                    if std::future::Future::poll(timer.as_mut(), cx).is_ready() {
                        // Mid-message: the connection cannot be reused.
                        this.conn = None;
                        this.idle = None;
                        metrics::counter!("gateway_upstream_timeouts_total", "phase" => "idle")
                            .increment(1);
                        return Poll::Ready(Some(Err(timed_out(
                            "the replica sent nothing for longer than the upstream idle timeout",
                        ))));
                    }
                }
            }
        }
        polled.map(|p| p.map(|r| r.map_err(Into::into)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for UpstreamBody {
    fn drop(&mut self) {
        // A body dropped before its end leaves the connection mid-message: it is closed, not reused.
        if self.inner.is_end_stream() {
            self.release();
        }
    }
}

/// The response future of [`Upstream`].
pub struct UpstreamFuture {
    inner:
        Result<BoxFuture<'static, Result<Response<UpstreamBody>, BoxError>>, Option<http::Error>>,
}

impl std::fmt::Debug for UpstreamFuture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("UpstreamFuture")
    }
}

impl std::future::Future for UpstreamFuture {
    type Output = Result<Response<UpstreamBody>, BoxError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match &mut self.inner {
            Ok(f) => f.as_mut().poll(cx),
            Err(e) => Poll::Ready(Err(e
                .take()
                .expect("upstream future polled after completion")
                .into())),
        }
    }
}

impl tower::Service<Request<Full<Bytes>>> for Upstream {
    type Response = Response<UpstreamBody>;
    type Error = BoxError;
    type Future = UpstreamFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut req: Request<Full<Bytes>>) -> UpstreamFuture {
        if let Err(e) = self.prepare(&mut req) {
            return UpstreamFuture {
                inner: Err(Some(e)),
            };
        }
        let pool = local_pool(self.inner.id, self.inner.max_idle_per_host);
        let fut = send(pool, self.inner.clone(), req);
        UpstreamFuture {
            inner: Ok(match self.inner.ttfb {
                None => Box::pin(fut),
                Some(ttfb) => Box::pin(async move {
                    match tokio::time::timeout(ttfb, fut).await {
                        Ok(r) => r,
                        Err(_) => {
                            metrics::counter!("gateway_upstream_timeouts_total", "phase" => "ttfb")
                                .increment(1);
                            Err(timed_out(
                                "the replica sent no response head within the upstream TTFB timeout",
                            ))
                        }
                    }
                }),
            }),
        }
    }
}

/// Probes `GET /health`; reads the engine's own load (running, waiting, KV usage) from vLLM's
/// `GET /metrics`, which the SLO shedding layer's wait estimate uses while it is fresh.
impl Backend for Upstream {
    fn load_report(
        &self,
    ) -> BoxFuture<'static, Result<Option<replica_router::backend::LoadReport>, BoxError>> {
        let this = self.clone();
        Box::pin(async move {
            let (status, body) = this.get("/metrics", Duration::from_secs(2)).await?;
            if !status.is_success() {
                return Ok(None);
            }
            match replica_router::load::prometheus::VllmParser::new()
                .parse(&body, tokio::time::Instant::now())
            {
                Ok(report) => Ok(Some(report)),
                // Not a vLLM-style engine (no running/waiting gauges): no report.
                Err(_) => Ok(None),
            }
        })
    }

    fn probe(&self) -> BoxFuture<'static, Result<(), BoxError>> {
        let this = self.clone();
        Box::pin(async move {
            let (status, _) = this.get("/health", Duration::from_secs(2)).await?;
            if status.is_success() {
                Ok(())
            } else {
                Err(format!("health probe answered {status}").into())
            }
        })
    }
}
