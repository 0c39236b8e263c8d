//! The gateway's response body: a replica's streamed body passed through, or a local answer.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use pin_project::pin_project;

use replica_router::error::BoxError;
use replica_router::inflight::TrackedBody;

/// A response body of the gateway.
///
/// Upstream bodies are forwarded frame by frame as they arrive (SSE streams are never buffered),
/// and keep the request in flight on its replica until they end or are dropped.
#[pin_project(project = GatewayBodyProj)]
#[derive(Debug)]
// Nearly every response is the upstream variant: boxing it would add an allocation per request
// to save bytes only on the rare local answers.
#[allow(clippy::large_enum_variant)]
pub enum GatewayBody {
    /// A replica's body.
    Upstream(#[pin] TrackedBody<super::upstream::UpstreamBody>),
    /// A body produced by the gateway itself (errors, metrics, health).
    Local(Option<Bytes>),
}

impl GatewayBody {
    /// A local body.
    pub fn local(bytes: impl Into<Bytes>) -> Self {
        GatewayBody::Local(Some(bytes.into()))
    }

    /// An empty body.
    pub fn empty() -> Self {
        GatewayBody::Local(None)
    }
}

impl Body for GatewayBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.project() {
            // The tracked body finishes its request as soon as the upstream body says it has
            // ended (hyper stops polling then), so no extra poll is needed here.
            GatewayBodyProj::Upstream(b) => b.poll_frame(cx).map_err(Into::into),
            GatewayBodyProj::Local(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            GatewayBody::Upstream(b) => b.is_end_stream(),
            GatewayBody::Local(b) => b.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            GatewayBody::Upstream(b) => b.size_hint(),
            GatewayBody::Local(Some(b)) => SizeHint::with_exact(b.len() as u64),
            GatewayBody::Local(None) => SizeHint::with_exact(0),
        }
    }
}
