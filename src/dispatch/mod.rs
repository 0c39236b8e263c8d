//! The terminal service: send the request to the decided replica.
//!
//! [`Dispatch`] reads the [`Decision`](crate::decision::Decision) a picking layer stored in the
//! request, finds that replica in the pool's current snapshot, counts the request in flight with
//! an [`InFlightGuard`](crate::inflight::InFlightGuard), and calls a clone of the replica's
//! backend (readied inside the response future, so one slow replica never blocks the others).
//! The guard moves into the response body, so the request stays in flight until the body ends.
//!
//! If the request has no decision, dispatch picks the least loaded of two weighted random
//! replicas itself, so `Dispatch` alone is a working balancer. If the decided replica left the
//! pool or started draining between the pick and the send, dispatch re-picks the same way and
//! marks the decision [`Redirected`](crate::decision::DecisionReason::Redirected): the request is
//! not lost.
//!
//! Failures of the backend become [`RouteError::Backend`](crate::error::RouteError::Backend);
//! the decision is copied into the response's extensions.

mod future;
mod service;

pub use self::future::DispatchFuture;
pub use self::service::Dispatch;
