//! How the layers read and annotate requests and responses of any type.
//!
//! Layers keep their state in a type map ([`http::Extensions`]). [`RouteRequest`] and
//! [`RouteResponse`] are implemented for `http::Request<B>` and `http::Response<B>`; a non-HTTP
//! application implements them for its own types by embedding an `http::Extensions`.

use std::sync::Arc;

use crate::context::RouteContext;
use crate::decision::Decision;
use crate::inflight::{CompletionObserver, CompletionObservers, InFlightGuard, TrackedBody};

/// A request the routing layers can route.
pub trait RouteRequest {
    /// The request's extensions.
    fn extensions(&self) -> &http::Extensions;
    /// The request's extensions, mutably.
    fn extensions_mut(&mut self) -> &mut http::Extensions;

    /// The route context, if a [`RouteContextLayer`](crate::context::RouteContextLayer) or the
    /// application set one.
    fn route_context(&self) -> Option<&RouteContext> {
        self.extensions().get::<RouteContext>()
    }

    /// Sets the route context.
    fn set_route_context(&mut self, ctx: RouteContext) {
        self.extensions_mut().insert(ctx);
    }

    /// The routing decision, if a picking layer made one.
    fn decision(&self) -> Option<&Decision> {
        self.extensions().get::<Decision>()
    }

    /// Records the routing decision.
    fn set_decision(&mut self, decision: Decision) {
        self.extensions_mut().insert(decision);
    }

    /// Registers an observer to be told when the request finishes (its response body ended,
    /// failed, or was dropped).
    fn add_completion_observer(&mut self, observer: Arc<dyn CompletionObserver>) {
        let ext = self.extensions_mut();
        match ext.get_mut::<CompletionObservers>() {
            Some(list) => list.0.push(observer),
            None => {
                ext.insert(CompletionObservers(vec![observer]));
            }
        }
    }
}

impl<B> RouteRequest for http::Request<B> {
    fn extensions(&self) -> &http::Extensions {
        http::Request::extensions(self)
    }

    fn extensions_mut(&mut self) -> &mut http::Extensions {
        http::Request::extensions_mut(self)
    }
}

/// A response that dispatch can keep "in flight" until it is fully delivered.
pub trait RouteResponse: Sized {
    /// The response type with the in-flight guard moved inside (for HTTP: into the body).
    type Tracked;

    /// Whether the response counts as a replica failure for passive health (HTTP: 5xx).
    fn is_failure(&self) -> bool;

    /// The status code, if the response has one.
    fn status(&self) -> Option<u16> {
        None
    }

    /// Moves `guard` into the response so the request stays in flight until the response is
    /// consumed, and adds `extensions` (holding at least the [`Decision`]) to the response.
    fn track(self, guard: InFlightGuard, extensions: http::Extensions) -> Self::Tracked;
}

impl<B> RouteResponse for http::Response<B>
where
    B: http_body::Body,
{
    type Tracked = http::Response<TrackedBody<B>>;

    fn is_failure(&self) -> bool {
        self.status().is_server_error()
    }

    fn status(&self) -> Option<u16> {
        Some(http::Response::status(self).as_u16())
    }

    fn track(self, mut guard: InFlightGuard, extensions: http::Extensions) -> Self::Tracked {
        let (mut parts, body) = self.into_parts();
        parts.extensions.extend(extensions);
        if !is_event_stream(&parts.headers) {
            guard.not_streamed();
        }
        let body = if body.is_end_stream() {
            // Nothing left to deliver: the request is complete now.
            guard.finish(crate::inflight::Outcome::Success);
            drop(guard);
            TrackedBody::untracked(body)
        } else {
            TrackedBody::new(body, guard)
        };
        http::Response::from_parts(parts, body)
    }
}

/// Whether a response is a server-sent-event stream (`Content-Type: text/event-stream`), whose
/// first data frame is the first token; any other body arrives when the answer is done.
fn is_event_stream(headers: &http::HeaderMap) -> bool {
    headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(';')
                .next()
                .is_some_and(|t| t.trim().eq_ignore_ascii_case("text/event-stream"))
        })
}
