//! The response future shared by the routing layers.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use pin_project::pin_project;

use crate::error::RouteError;

/// Either the inner service's future, with its error turned into a [`RouteError`], or an error
/// decided before the inner service was called.
#[pin_project(project = RouteFutureProj)]
#[derive(Debug)]
pub enum RouteFuture<F> {
    /// Waiting on the inner service.
    Inner(#[pin] F),
    /// Failed before calling it.
    Failed(Option<RouteError>),
}

impl<F> RouteFuture<F> {
    /// Wraps the inner service's future.
    pub fn new(inner: F) -> Self {
        RouteFuture::Inner(inner)
    }

    /// A future that fails at once with `error`.
    pub fn failed(error: RouteError) -> Self {
        RouteFuture::Failed(Some(error))
    }
}

impl<F, T, E> Future for RouteFuture<F>
where
    F: Future<Output = Result<T, E>>,
    E: Into<RouteError>,
{
    type Output = Result<T, RouteError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            RouteFutureProj::Inner(f) => f.poll(cx).map_err(Into::into),
            RouteFutureProj::Failed(e) => Poll::Ready(Err(e
                .take()
                .expect("routing future polled after completion"))),
        }
    }
}
