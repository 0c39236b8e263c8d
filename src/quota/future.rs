use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use pin_project::pin_project;

use super::shared::{Admission, Ticket};
use crate::error::RouteError;
use crate::request::RouteRequest;

type AdmissionFuture = Pin<Box<dyn Future<Output = Result<Admission, RouteError>> + Send>>;

/// The response future of [`Quota`](super::Quota): waits for admission (bounded by the store
/// timeout), then for the inner service.
#[pin_project]
pub struct QuotaFuture<S, Req>
where
    S: tower::Service<Req>,
{
    #[pin]
    state: State<S, Req>,
}

#[pin_project(project = StateProj)]
enum State<S, Req>
where
    S: tower::Service<Req>,
{
    Admitting {
        admission: AdmissionFuture,
        inner: Option<S>,
        req: Option<Req>,
    },
    Calling {
        #[pin]
        fut: S::Future,
        ticket: Option<Arc<Ticket>>,
    },
    Failed(Option<RouteError>),
}

impl<S, Req> std::fmt::Debug for QuotaFuture<S, Req>
where
    S: tower::Service<Req>,
{
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("QuotaFuture")
    }
}

impl<S, Req> QuotaFuture<S, Req>
where
    S: tower::Service<Req>,
{
    pub(crate) fn admitting(admission: AdmissionFuture, inner: S, req: Req) -> Self {
        QuotaFuture {
            state: State::Admitting {
                admission,
                inner: Some(inner),
                req: Some(req),
            },
        }
    }

    pub(crate) fn calling(fut: S::Future, ticket: Option<Arc<Ticket>>) -> Self {
        QuotaFuture {
            state: State::Calling { fut, ticket },
        }
    }

    pub(crate) fn failed(err: RouteError) -> Self {
        QuotaFuture {
            state: State::Failed(Some(err)),
        }
    }
}

impl<S, Req> Future for QuotaFuture<S, Req>
where
    S: tower::Service<Req>,
    S::Error: Into<RouteError>,
    Req: RouteRequest,
{
    type Output = Result<S::Response, RouteError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        loop {
            let next = match self.as_mut().project().state.project() {
                StateProj::Admitting {
                    admission,
                    inner,
                    req,
                } => {
                    let outcome = ready!(admission.as_mut().poll(cx));
                    let (Some(mut inner), Some(mut req)) = (inner.take(), req.take()) else {
                        panic!("quota future polled after completion");
                    };
                    let ticket = match outcome {
                        Err(e) => {
                            self.set(QuotaFuture::failed_state(None));
                            return Poll::Ready(Err(e));
                        }
                        Ok(Admission::Admitted(None)) => None,
                        Ok(Admission::Admitted(Some(ticket))) => {
                            if ticket.has_tokens() {
                                req.extensions_mut().insert(ticket.report.clone());
                            }
                            req.add_completion_observer(ticket.clone());
                            Some(ticket)
                        }
                    };
                    State::Calling {
                        fut: inner.call(req),
                        ticket,
                    }
                }
                StateProj::Calling { fut, ticket } => {
                    let result = ready!(fut.poll(cx));
                    if let Some(t) = ticket.take() {
                        if result.is_err() {
                            t.mark_failed_early();
                        }
                    }
                    return Poll::Ready(result.map_err(Into::into));
                }
                StateProj::Failed(e) => {
                    return Poll::Ready(Err(e
                        .take()
                        .expect("quota future polled after completion")))
                }
            };
            self.as_mut().project().state.set(next);
        }
    }
}

impl<S, Req> QuotaFuture<S, Req>
where
    S: tower::Service<Req>,
{
    fn failed_state(err: Option<RouteError>) -> Self {
        QuotaFuture {
            state: State::Failed(err),
        }
    }
}
