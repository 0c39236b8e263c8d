//! The edge of a stack: turn it into a service a web framework mounts as is.
//!
//! The crate's layers answer `Result<Response<B>, RouteError>`. A framework wants more: axum's
//! `Router::route_service` takes only services whose error is `Infallible` and whose body it can
//! send, and a client wants the routing decision in the response headers. [`EdgeLayer`], placed
//! outermost, gives that:
//!
//! - every [`RouteError`] becomes its documented HTTP answer
//!   ([`RouteError::to_http_response`]: status, `Retry-After`, the OpenAI error JSON), so the
//!   service's error is `Infallible`;
//! - a response gets `x-replica-id` and `x-replica-affinity`
//!   ([`annotate_response`](crate::affinity::annotate_response));
//! - the body is one type, [`EdgeBody`] (`Data = Bytes`, `Error = BoxError`): the replica's body
//!   streamed through, or the error's bytes.
//!
//! Errors of tower's own middlewares placed between the crate's layers convert through
//! `From<BoxError> for RouteError`: `Timeout`'s `Elapsed` is a 504 ([`RouteError::Timeout`]),
//! `LoadShed`'s `Overloaded` a 429, a boxed `RouteError` itself, anything else a 500.
//!
//! # Where a request stops counting
//! The crate's in-flight accounting moves into the response body: a request counts on its
//! replica until its stream ends. tower's `ConcurrencyLimit` permit and `Timeout` deadline end
//! when the response **head** comes back, not at the end of a stream: a `ConcurrencyLimit` of 8
//! admits more than 8 streams at once, and a `Timeout` bounds the time to first byte, not the
//! generation. Use the crate's quota concurrency limit (`TenantLimits::concurrency`) for a
//! limit that holds for whole streams.
//!
//! ```
//! use replica_router::backend::ServiceBackend;
//! use replica_router::balance::LeastInFlightLayer;
//! use replica_router::dispatch::Dispatch;
//! use replica_router::edge::EdgeLayer;
//! use replica_router::pool::Pool;
//! use replica_router::replica::ReplicaSpec;
//! use tower::{Service, ServiceBuilder, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let echo = ServiceBackend::new(tower::service_fn(|_req: http::Request<String>| async {
//!     Ok::<_, std::convert::Infallible>(http::Response::new(String::from("hi")))
//! }));
//! let pool = Pool::builder().replica("a", ReplicaSpec::new("m"), echo).build().unwrap();
//! let mut svc = ServiceBuilder::new()
//!     .layer(EdgeLayer::new())
//!     .layer(LeastInFlightLayer::new(pool.clone()))
//!     .service(Dispatch::new(pool.clone()));
//! let resp = svc.ready().await.unwrap().call(http::Request::new(String::new())).await.unwrap();
//! assert_eq!(resp.headers()["x-replica-id"], "a");
//! // With no replica left, the error is an answer, not an `Err`.
//! pool.remove("a").unwrap();
//! let resp = svc.ready().await.unwrap().call(http::Request::new(String::new())).await.unwrap();
//! assert_eq!(resp.status(), 503);
//! # }
//! ```

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use http_body::{Body, Frame, SizeHint};
use pin_project::pin_project;

use crate::affinity::annotate_response;
use crate::error::{BoxError, RouteError};

/// Makes [`Edge`] services; see the [module docs](self).
#[derive(Debug, Clone, Copy, Default)]
pub struct EdgeLayer {
    _private: (),
}

impl EdgeLayer {
    /// The edge adapter.
    pub fn new() -> Self {
        EdgeLayer::default()
    }
}

impl<S> tower::Layer<S> for EdgeLayer {
    type Service = Edge<S>;

    fn layer(&self, inner: S) -> Edge<S> {
        Edge {
            inner,
            not_ready: None,
        }
    }
}

/// A stack whose errors are answers and whose responses carry the routing decision.
#[derive(Debug)]
pub struct Edge<S> {
    inner: S,
    /// A readiness error, answered by the next call.
    not_ready: Option<RouteError>,
}

impl<S: Clone> Clone for Edge<S> {
    fn clone(&self) -> Self {
        Edge {
            inner: self.inner.clone(),
            not_ready: None,
        }
    }
}

impl<S> Edge<S> {
    /// The wrapped stack.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S, Req, B> tower::Service<Req> for Edge<S>
where
    S: tower::Service<Req, Response = http::Response<B>>,
    S::Error: Into<RouteError>,
{
    type Response = http::Response<EdgeBody<B>>;
    type Error = Infallible;
    type Future = EdgeFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        if self.not_ready.is_some() {
            return Poll::Ready(Ok(()));
        }
        match self.inner.poll_ready(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Ok(())) => Poll::Ready(Ok(())),
            // The error type is `Infallible`: the next call answers it instead.
            Poll::Ready(Err(e)) => {
                self.not_ready = Some(e.into());
                Poll::Ready(Ok(()))
            }
        }
    }

    fn call(&mut self, req: Req) -> Self::Future {
        match self.not_ready.take() {
            Some(e) => EdgeFuture::Failed(Some(e)),
            None => EdgeFuture::Inner(self.inner.call(req)),
        }
    }
}

/// The future of [`Edge`].
#[pin_project(project = EdgeFutureProj)]
#[derive(Debug)]
pub enum EdgeFuture<F> {
    /// The stack's answer.
    Inner(#[pin] F),
    /// A readiness error, answered.
    Failed(Option<RouteError>),
}

impl<F, B, E> Future for EdgeFuture<F>
where
    F: Future<Output = Result<http::Response<B>, E>>,
    E: Into<RouteError>,
{
    type Output = Result<http::Response<EdgeBody<B>>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let result = match self.project() {
            EdgeFutureProj::Inner(f) => std::task::ready!(f.poll(cx)).map_err(Into::into),
            EdgeFutureProj::Failed(e) => {
                Err(e.take().expect("edge future polled after completion"))
            }
        };
        Poll::Ready(Ok(match result {
            Ok(mut resp) => {
                annotate_response(&mut resp);
                resp.map(EdgeBody::upstream)
            }
            Err(e) => e.to_http_response().map(EdgeBody::local),
        }))
    }
}

/// The body of an [`Edge`] response: the replica's, streamed through, or a local answer.
#[pin_project(project = EdgeBodyProj)]
#[derive(Debug)]
pub enum EdgeBody<B> {
    /// The replica's body.
    Upstream(#[pin] B),
    /// A local answer (an error's JSON), sent once.
    Local(Option<Bytes>),
}

impl<B> EdgeBody<B> {
    /// The replica's body.
    pub fn upstream(body: B) -> Self {
        EdgeBody::Upstream(body)
    }

    /// A local answer.
    pub fn local(bytes: impl Into<Bytes>) -> Self {
        EdgeBody::Local(Some(bytes.into()))
    }
}

impl<B> Body for EdgeBody<B>
where
    B: Body,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.project() {
            EdgeBodyProj::Upstream(b) => match std::task::ready!(b.poll_frame(cx)) {
                None => Poll::Ready(None),
                Some(Err(e)) => Poll::Ready(Some(Err(e.into()))),
                Some(Ok(frame)) => Poll::Ready(Some(Ok(
                    frame.map_data(|mut d| d.copy_to_bytes(d.remaining()))
                ))),
            },
            EdgeBodyProj::Local(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            EdgeBody::Upstream(b) => b.is_end_stream(),
            EdgeBody::Local(b) => b.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            EdgeBody::Upstream(b) => b.size_hint(),
            EdgeBody::Local(Some(b)) => SizeHint::with_exact(b.len() as u64),
            EdgeBody::Local(None) => SizeHint::with_exact(0),
        }
    }
}

/// Buffers each request's body (at most `max_bytes`) before the stack sees it, so the request
/// can be replayed: [`FailoverLayer`](crate::health::FailoverLayer) retries only requests it
/// can copy, and a streaming body (hyper's `Incoming`, axum's `Body`) cannot be copied. The
/// inner stack gets `Request<`[`BufferedBody`]`>` (the bytes in memory, cheap to clone). A body
/// over the limit is answered 413 ([`RouteError::PayloadTooLarge`]), one that fails to arrive
/// 400. Put a body timeout in front of it (the framework's, or tower's `Timeout`): this layer
/// waits as long as the client sends.
#[derive(Debug, Clone, Copy)]
pub struct BufferBodyLayer {
    max_bytes: usize,
}

impl BufferBodyLayer {
    /// Buffers bodies of at most `max_bytes`.
    pub fn new(max_bytes: usize) -> Self {
        BufferBodyLayer { max_bytes }
    }
}

impl<S> tower::Layer<S> for BufferBodyLayer {
    type Service = BufferBody<S>;

    fn layer(&self, inner: S) -> BufferBody<S> {
        BufferBody {
            inner,
            max_bytes: self.max_bytes,
        }
    }
}

/// The service of [`BufferBodyLayer`].
#[derive(Debug, Clone)]
pub struct BufferBody<S> {
    inner: S,
    max_bytes: usize,
}

/// A request body held in memory: cheap to clone, so the request can be replayed.
#[derive(Debug, Clone, Default)]
pub struct BufferedBody(Option<Bytes>);

impl BufferedBody {
    /// The body's bytes.
    pub fn new(bytes: Bytes) -> Self {
        BufferedBody((!bytes.is_empty()).then_some(bytes))
    }

    /// The bytes not yet sent.
    pub fn bytes(&self) -> &[u8] {
        self.0.as_deref().unwrap_or_default()
    }
}

impl Body for BufferedBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Poll::Ready(self.0.take().map(|b| Ok(Frame::data(b))))
    }

    fn is_end_stream(&self) -> bool {
        self.0.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.0.as_ref().map_or(0, |b| b.len() as u64))
    }
}

impl<S, B> tower::Service<http::Request<B>> for BufferBody<S>
where
    S: tower::Service<http::Request<BufferedBody>> + Clone + Send + 'static,
    S::Error: Into<RouteError>,
    S::Future: Send,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    type Response = S::Response;
    type Error = RouteError;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, RouteError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), RouteError>> {
        // The inner stack is readied in the future, once the body is in (as `Dispatch` does).
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let inner = self.inner.clone();
        let max = self.max_bytes;
        Box::pin(async move {
            let (parts, body) = req.into_parts();
            let bytes = collect(body, max).await?;
            let req = http::Request::from_parts(parts, BufferedBody::new(bytes));
            tower::ServiceExt::oneshot(inner, req)
                .await
                .map_err(Into::into)
        })
    }
}

/// Reads `body` to the end, refusing more than `max` bytes.
async fn collect<B>(body: B, max: usize) -> Result<Bytes, RouteError>
where
    B: Body,
    B::Error: Into<BoxError>,
{
    if body.size_hint().lower() > max as u64 {
        return Err(RouteError::PayloadTooLarge { limit: max });
    }
    let mut body = std::pin::pin!(body);
    let mut buf = bytes::BytesMut::new();
    while let Some(frame) = std::future::poll_fn(|cx| body.as_mut().poll_frame(cx)).await {
        let frame = frame
            .map_err(|e| RouteError::InvalidRequest(format!("reading the body: {}", e.into())))?;
        if let Ok(mut data) = frame.into_data() {
            if buf.len() + data.remaining() > max {
                return Err(RouteError::PayloadTooLarge { limit: max });
            }
            while data.has_remaining() {
                let chunk = data.chunk();
                buf.extend_from_slice(chunk);
                let n = chunk.len();
                data.advance(n);
            }
        }
    }
    Ok(buf.freeze())
}
