use std::sync::Arc;
use std::task::{Context, Poll};

use super::future::QuotaFuture;
use super::shared::Shared;
use crate::error::RouteError;
use crate::request::RouteRequest;

/// The tenant-quota service; made by [`QuotaLayer`](super::QuotaLayer).
pub struct Quota<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S: Clone> Clone for Quota<S> {
    fn clone(&self) -> Self {
        Quota {
            inner: self.inner.clone(),
            shared: self.shared.clone(),
        }
    }
}

impl<S: std::fmt::Debug> std::fmt::Debug for Quota<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Quota")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl<S> Quota<S> {
    pub(crate) fn from_shared(inner: S, shared: Arc<Shared>) -> Self {
        Quota { inner, shared }
    }

    /// The wrapped service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S, Req> tower::Service<Req> for Quota<S>
where
    S: tower::Service<Req> + Clone + Send + 'static,
    S::Error: Into<RouteError>,
    Req: RouteRequest + Send + 'static,
{
    type Response = S::Response;
    type Error = RouteError;
    type Future = QuotaFuture<S, Req>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        let ctx = req.route_context();
        let Some(resolved) = self.shared.resolve(ctx.and_then(|c| c.tenant.as_ref())) else {
            return QuotaFuture::calling(self.inner.call(req), None);
        };
        if let Some(err) = self.shared.cached_rejection(&resolved) {
            return QuotaFuture::failed(err);
        }
        let estimated = ctx.map_or(0, |c| c.estimated_tokens);
        // The readied service goes into the future; a fresh clone stays here (tower's idiom for
        // calling after an await without losing readiness).
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        let admission = Box::pin(self.shared.clone().admit(resolved, estimated));
        QuotaFuture::admitting(admission, inner, req)
    }
}
