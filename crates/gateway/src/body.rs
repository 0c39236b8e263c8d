//! The gateway's response body: a replica's streamed body passed through, or a local answer.

use replica_router::edge::EdgeBody;
use replica_router::inflight::TrackedBody;

/// A response body of the gateway: the library's [`EdgeBody`] over a replica's body.
///
/// Upstream bodies are forwarded frame by frame as they arrive (SSE streams are never buffered),
/// and keep the request in flight on its replica until they end or are dropped
/// ([`TrackedBody`]); local answers (errors, metrics, health) are sent in one frame.
pub type GatewayBody = EdgeBody<TrackedBody<super::upstream::UpstreamBody>>;
