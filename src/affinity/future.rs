use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use metrics::Counter;
use pin_project::pin_project;

use crate::affinity::service::{Keyed, Shared};
use crate::error::RouteError;
use crate::pins::PinFuture;
use crate::replica::ReplicaId;
use crate::request::RouteRequest;

/// A pin write still in flight (remote pin tables), counted as an error if it fails.
pub(crate) struct PinWrite {
    future: PinFuture<'static, ()>,
    errors: Counter,
}

impl PinWrite {
    pub(crate) fn new(future: PinFuture<'static, ()>, errors: Counter) -> Self {
        PinWrite { future, errors }
    }
}

/// A request waiting for a remote pin lookup, with the readied inner service.
pub(crate) struct Waiting<S, Req, B> {
    pub(crate) service: S,
    pub(crate) req: Req,
    pub(crate) keyed: Keyed,
    pub(crate) shared: Arc<Shared<B>>,
}

/// The response future of [`Affinity`](super::Affinity).
///
/// With an in-memory pin table it is the inner service's future (the decision was made in
/// `call`). With a remote table it first waits for the pin lookup, then decides and calls the
/// inner service. A pending pin write runs beside the inner call; the response is returned once
/// both are done (a failed write is counted, never returned).
#[pin_project]
pub struct AffinityFuture<S, Req, B>
where
    S: tower::Service<Req>,
{
    #[pin]
    state: State<S, Req, B>,
}

#[pin_project(project = StateProj)]
enum State<S, Req, B>
where
    S: tower::Service<Req>,
{
    Lookup {
        lookup: PinFuture<'static, Option<ReplicaId>>,
        waiting: Option<Waiting<S, Req, B>>,
    },
    Inner {
        #[pin]
        future: S::Future,
        write: Option<PinWrite>,
        output: Option<Result<S::Response, S::Error>>,
    },
    Failed(Option<RouteError>),
}

impl<S, Req, B> AffinityFuture<S, Req, B>
where
    S: tower::Service<Req>,
{
    pub(crate) fn inner(future: S::Future, write: Option<PinWrite>) -> Self {
        AffinityFuture {
            state: State::Inner {
                future,
                write,
                output: None,
            },
        }
    }

    pub(crate) fn lookup(
        lookup: PinFuture<'static, Option<ReplicaId>>,
        waiting: Waiting<S, Req, B>,
    ) -> Self {
        AffinityFuture {
            state: State::Lookup {
                lookup,
                waiting: Some(waiting),
            },
        }
    }

    pub(crate) fn failed(error: RouteError) -> Self {
        AffinityFuture {
            state: State::Failed(Some(error)),
        }
    }
}

impl<S, Req, B> std::fmt::Debug for AffinityFuture<S, Req, B>
where
    S: tower::Service<Req>,
{
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AffinityFuture")
    }
}

const POLLED_AFTER_COMPLETION: &str = "affinity future polled after completion";

impl<S, Req, B> Future for AffinityFuture<S, Req, B>
where
    S: tower::Service<Req>,
    S::Error: Into<RouteError>,
    Req: RouteRequest,
{
    type Output = Result<S::Response, RouteError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut state = self.project().state;
        loop {
            match state.as_mut().project() {
                StateProj::Lookup { lookup, waiting } => {
                    let pinned = ready!(Pin::new(lookup).poll(cx));
                    let mut w = waiting.take().expect(POLLED_AFTER_COMPLETION);
                    match w.shared.decide(&w.keyed, pinned) {
                        Ok(routed) => {
                            let write = routed.apply(&mut w.req);
                            let future = w.service.call(w.req);
                            state.set(State::Inner {
                                future,
                                write,
                                output: None,
                            });
                        }
                        Err(e) => state.set(State::Failed(Some(e))),
                    }
                }
                StateProj::Inner {
                    future,
                    write,
                    output,
                } => {
                    if let Some(w) = write.as_mut() {
                        if let Poll::Ready(r) = Pin::new(&mut w.future).poll(cx) {
                            if r.is_err() {
                                w.errors.increment(1);
                            }
                            *write = None;
                        }
                    }
                    if output.is_none() {
                        *output = Some(ready!(future.poll(cx)));
                    }
                    if write.is_some() {
                        return Poll::Pending;
                    }
                    return Poll::Ready(
                        output
                            .take()
                            .expect(POLLED_AFTER_COMPLETION)
                            .map_err(Into::into),
                    );
                }
                StateProj::Failed(e) => {
                    return Poll::Ready(Err(e.take().expect(POLLED_AFTER_COMPLETION)))
                }
            }
        }
    }
}
