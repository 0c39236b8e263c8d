use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use pin_project::pin_project;
use tower::util::Oneshot;

use crate::error::{BoxError, RouteError};
use crate::inflight::{InFlightGuard, Outcome};
use crate::request::RouteResponse;

/// The response future of [`Dispatch`](super::Dispatch).
#[pin_project(project = DispatchProj)]
pub struct DispatchFuture<B, Req>
where
    B: tower::Service<Req>,
{
    #[pin]
    state: State<B, Req>,
}

#[pin_project(project = StateProj)]
enum State<B, Req>
where
    B: tower::Service<Req>,
{
    Sending {
        #[pin]
        call: Oneshot<B, Req>,
        guard: Option<InFlightGuard>,
        extensions: Option<http::Extensions>,
    },
    Failed(Option<RouteError>),
}

impl<B, Req> DispatchFuture<B, Req>
where
    B: tower::Service<Req>,
{
    pub(crate) fn new(
        backend: B,
        req: Req,
        guard: InFlightGuard,
        extensions: http::Extensions,
    ) -> Self {
        DispatchFuture {
            state: State::Sending {
                call: Oneshot::new(backend, req),
                guard: Some(guard),
                extensions: Some(extensions),
            },
        }
    }

    pub(crate) fn failed(err: RouteError) -> Self {
        DispatchFuture {
            state: State::Failed(Some(err)),
        }
    }
}

impl<B, Req> std::fmt::Debug for DispatchFuture<B, Req>
where
    B: tower::Service<Req>,
{
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DispatchFuture")
    }
}

impl<B, Req> Future for DispatchFuture<B, Req>
where
    B: tower::Service<Req>,
    B::Response: RouteResponse,
    B::Error: Into<BoxError>,
{
    type Output = Result<<B::Response as RouteResponse>::Tracked, RouteError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().state.project() {
            StateProj::Sending {
                call,
                guard,
                extensions,
            } => {
                let result = std::task::ready!(call.poll(cx));
                let (Some(mut guard), Some(extensions)) = (guard.take(), extensions.take()) else {
                    panic!("dispatch future polled after completion");
                };
                match result {
                    Ok(resp) => {
                        guard.on_head(resp.status(), resp.is_failure());
                        Poll::Ready(Ok(resp.track(guard, extensions)))
                    }
                    Err(e) => {
                        guard.finish(Outcome::Failure);
                        let replica = guard.replica().clone();
                        drop(guard);
                        Poll::Ready(Err(RouteError::backend(replica, e)))
                    }
                }
            }
            StateProj::Failed(e) => Poll::Ready(Err(e
                .take()
                .expect("dispatch future polled after completion"))),
        }
    }
}
