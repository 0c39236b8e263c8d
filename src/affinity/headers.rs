//! The affinity decision on HTTP responses.
//!
//! [`Dispatch`](crate::dispatch::Dispatch) copies the [`Decision`] into the response's
//! extensions (Rust callers read it there). A gateway that answers over HTTP calls
//! [`annotate_response`] (or stacks [`annotate_layer`] outermost) so the client or the serving
//! framework sees it too:
//!
//! - `x-replica-affinity: home | spill | failover` for affinity decisions. Anything other than
//!   `home` means the replica does not hold the conversation's KV cache: it replays the prefill.
//!   Requests without an affinity key (placed by least-in-flight) get no such header.
//! - `x-replica-id: <id>` for every decided request (omitted if the id is not a valid header
//!   value).

use http::{HeaderName, HeaderValue};
use tower::util::MapResponseLayer;

use crate::decision::{Decision, DecisionReason};

/// `x-replica-affinity`: `home`, `spill` or `failover`.
pub const AFFINITY_HEADER: HeaderName = HeaderName::from_static("x-replica-affinity");

/// `x-replica-id`: the replica that served the request.
pub const REPLICA_HEADER: HeaderName = HeaderName::from_static("x-replica-id");

/// Sets [`AFFINITY_HEADER`] and [`REPLICA_HEADER`] from the response's [`Decision`], if it has
/// one.
///
/// ```
/// use replica_router::affinity::annotate_response;
/// use replica_router::decision::{Decision, DecisionReason};
/// use replica_router::replica::ReplicaId;
///
/// let mut resp = http::Response::new(());
/// let id = ReplicaId::new("gpu-2-3").unwrap();
/// resp.extensions_mut().insert(Decision::new(id, DecisionReason::Failover));
/// annotate_response(&mut resp);
/// assert_eq!(resp.headers()["x-replica-affinity"], "failover");
/// assert_eq!(resp.headers()["x-replica-id"], "gpu-2-3");
/// ```
pub fn annotate_response<B>(resp: &mut http::Response<B>) {
    let Some(decision) = resp.extensions().get::<Decision>() else {
        return;
    };
    let affinity = match decision.reason() {
        DecisionReason::Home => Some("home"),
        DecisionReason::Spill => Some("spill"),
        DecisionReason::Failover => Some("failover"),
        _ => None,
    };
    let id = HeaderValue::from_str(decision.replica().as_str()).ok();
    let headers = resp.headers_mut();
    if let Some(a) = affinity {
        headers.insert(AFFINITY_HEADER, HeaderValue::from_static(a));
    }
    if let Some(id) = id {
        headers.insert(REPLICA_HEADER, id);
    }
}

fn annotated<B>(mut resp: http::Response<B>) -> http::Response<B> {
    annotate_response(&mut resp);
    resp
}

/// A layer that applies [`annotate_response`] to every response (place it outside the dispatch,
/// for example outermost in the `ServiceBuilder`).
///
/// ```
/// use replica_router::affinity::annotate_layer;
/// let layer = annotate_layer::<String>();
/// let svc = tower::ServiceBuilder::new().layer(layer).service(tower::service_fn(
///     |_req: ()| async { Ok::<_, std::convert::Infallible>(http::Response::new(String::new())) },
/// ));
/// # drop(svc);
/// ```
pub fn annotate_layer<B>() -> MapResponseLayer<fn(http::Response<B>) -> http::Response<B>> {
    MapResponseLayer::new(annotated::<B> as fn(http::Response<B>) -> http::Response<B>)
}
