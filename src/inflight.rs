//! In-flight accounting that survives streaming.
//!
//! LLM responses stream for seconds. A request counts as in flight from the moment dispatch
//! sends it until its response **body** ends, fails or is dropped, or the request future is
//! cancelled. [`InFlightGuard`] does the counting with RAII: dispatch creates it, moves it into
//! the response future, and then into the response body ([`TrackedBody`]); whichever owner drops
//! it last releases the counters, so every path (success, error, cancellation, panic unwinding,
//! a client hanging up mid-stream) returns them to zero.
//!
//! (tower's `PendingRequests` with `CompleteOnResponse` stops counting at the response head,
//! which undercounts streamed bodies; moving the guard into the body is the fix.)

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http_body::{Body, Frame, SizeHint};
use pin_project::{pin_project, pinned_drop};
use tokio::time::Instant;

use crate::context::RouteContext;
use crate::load::work::WorkPlan;
use crate::pool::ReplicaState;
use crate::replica::ReplicaId;
use crate::usage::{UsageScan, UsageScanner, UsageSink};

/// Most tokens one request's estimate counts in a replica's in-flight tokens: the estimate comes
/// from the client, and the sum over concurrent requests must not overflow.
pub(crate) const MAX_COUNTED_TOKENS: u64 = 1 << 32;

/// The observers to call when a request finishes, as stored in the request's extensions.
#[derive(Clone, Default)]
pub struct CompletionObservers(pub(crate) Vec<Arc<dyn CompletionObserver>>);

impl std::fmt::Debug for CompletionObservers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CompletionObservers({})", self.0.len())
    }
}

/// How a request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// The response was delivered in full.
    Success,
    /// The replica failed: a transport error, a failing status (HTTP 5xx) or a body error.
    Failure,
    /// The request or its response was dropped before the end (client went away, timeout).
    Cancelled,
}

impl Outcome {
    /// The lowercase name.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Success => "success",
            Outcome::Failure => "failure",
            Outcome::Cancelled => "cancelled",
        }
    }
}

/// What observers learn when a request finishes.
#[derive(Debug, Clone)]
pub struct Completion<'a> {
    /// The replica that served it.
    pub replica: &'a ReplicaId,
    /// How it ended.
    pub outcome: Outcome,
    /// From dispatch to the end.
    pub elapsed: Duration,
    /// From dispatch to the response head, if one arrived.
    pub time_to_head: Option<Duration>,
    /// Response status, if a response arrived.
    pub status: Option<u16>,
    /// Response body bytes delivered.
    pub body_bytes: u64,
    /// Response body data frames delivered (for SSE streams, roughly one per token event).
    pub body_frames: u64,
    /// The tokens estimated at admission.
    pub estimated_tokens: u64,
}

/// Told when a request finishes. Register one per request with
/// [`RouteRequest::add_completion_observer`](crate::request::RouteRequest::add_completion_observer)
/// (the tenant-quota layer settles token reservations this way).
pub trait CompletionObserver: Send + Sync + 'static {
    /// Called exactly once, when the request finishes.
    fn on_complete(&self, completion: &Completion<'_>);
}

/// Keeps one request counted as in flight on one replica until dropped.
#[derive(Debug)]
pub struct InFlightGuard {
    state: Arc<ReplicaState>,
    tokens: u64,
    started: Instant,
    time_to_head: Option<Duration>,
    status: Option<u16>,
    outcome: Option<Outcome>,
    body_bytes: u64,
    body_frames: u64,
    /// The request's prefill and decode work, counted on the replica's work model.
    plan: WorkPlan,
    /// Prefill tokens that were ahead of this request when it was sent.
    ahead: u64,
    /// Whether the first data frame arrived (the work moved from prefill to decode).
    decoding: bool,
    /// Whether the time to first data measures the prefill (a streamed response); a whole
    /// response sent at once measures the decode too, and must not feed the rate fit.
    measures_prefill: bool,
    /// Told when the request finishes (set by dispatch once the guard is counted).
    pub(crate) observers: Option<CompletionObservers>,
}

impl InFlightGuard {
    /// Counts a request on `state`. Returns `None` (counting nothing) if the replica has started
    /// draining.
    ///
    /// `plan` says how much of the request is prefill on this replica; `None` counts the whole
    /// prompt (see [`WorkPlan::unplanned`]).
    pub(crate) fn begin(
        state: Arc<ReplicaState>,
        ctx: Option<&RouteContext>,
        plan: Option<WorkPlan>,
    ) -> Option<Self> {
        let tokens = ctx.map_or(0, |c| c.estimated_tokens.min(MAX_COUNTED_TOKENS));
        if !state.try_begin(tokens) {
            return None;
        }
        let plan = plan.unwrap_or_else(|| {
            WorkPlan::unplanned(
                ctx.and_then(|c| c.prefix.as_ref()).map(|p| p.tokens()),
                tokens,
            )
        });
        let ahead = state.work().begin(&plan);
        Some(InFlightGuard {
            state,
            tokens,
            started: Instant::now(),
            time_to_head: None,
            status: None,
            outcome: None,
            body_bytes: 0,
            body_frames: 0,
            plan,
            ahead,
            decoding: false,
            measures_prefill: true,
            observers: None,
        })
    }

    /// The replica this guard counts on.
    pub fn replica(&self) -> &ReplicaId {
        self.state.id()
    }

    /// Records the response head: time to first byte, status, and whether it is a failure.
    pub(crate) fn on_head(&mut self, status: Option<u16>, failure: bool) {
        let ttfb = self.started.elapsed();
        self.time_to_head = Some(ttfb);
        self.status = status;
        self.state.record_head(ttfb);
        if failure {
            self.outcome = Some(Outcome::Failure);
        }
    }

    /// Marks the request as ended with `outcome` (the first outcome recorded wins).
    pub fn finish(&mut self, outcome: Outcome) {
        if self.outcome.is_none() {
            self.outcome = Some(outcome);
        }
    }

    fn on_data(&mut self, len: usize) {
        self.body_bytes += len as u64;
        self.body_frames += 1;
        self.on_first_data();
    }

    /// Records the first data frame of the response (the first token of a stream): the
    /// request's prefill is done. Fits the replica's prefill rate from the time it took and moves
    /// the request's work from prefill to decode. Later calls do nothing.
    pub fn on_first_data(&mut self) {
        if self.decoding || self.outcome.is_some() {
            return;
        }
        self.decoding = true;
        let work = self.state.work();
        work.first_data(&self.plan);
        if self.measures_prefill {
            work.observe_prefill(
                self.ahead.saturating_add(self.plan.prefill_tokens),
                self.started.elapsed(),
            );
        }
    }

    /// Says the response is not streamed (its first data arrives with the whole answer), so
    /// its time to first data says nothing about the prefill and is kept out of the replica's
    /// rate fit. The work still moves from prefill to decode at the first data.
    pub fn not_streamed(&mut self) {
        self.measures_prefill = false;
    }

    /// The work plan counted for this request.
    pub fn plan(&self) -> &WorkPlan {
        &self.plan
    }

    /// Reports the prompt tokens the replica said it had cached for this request (OpenAI
    /// `usage.prompt_tokens_details.cached_tokens`), calibrating the replica's cache model
    /// against the plan's prediction (see
    /// [`WorkState::observe_cached`](crate::load::work::WorkState::observe_cached)).
    pub fn observe_cached(&self, reported_cached: u64) {
        self.state
            .work()
            .observe_cached(self.plan.cached_tokens, reported_cached);
    }
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        let outcome = self.outcome.unwrap_or(Outcome::Cancelled);
        let elapsed = self.started.elapsed();
        match outcome {
            Outcome::Success => self.state.record_success(elapsed),
            Outcome::Failure => {
                self.state.record_failure();
            }
            Outcome::Cancelled => self.state.record_cancel(),
        }
        // Release the counters first, so observers (admission queues waiting for capacity) see
        // the replica without this request.
        self.state.end(self.tokens);
        if self.decoding {
            self.state.work().end_decode(&self.plan);
        } else {
            self.state.work().end_prefill(&self.plan);
        }
        if let Some(observers) = self.observers.take() {
            let completion = Completion {
                replica: self.state.id(),
                outcome,
                elapsed,
                time_to_head: self.time_to_head,
                status: self.status,
                body_bytes: self.body_bytes,
                body_frames: self.body_frames,
                estimated_tokens: self.tokens,
            };
            for o in &observers.0 {
                o.on_complete(&completion);
            }
        }
    }
}

/// A response body that keeps its request in flight until the body ends, errors or is dropped.
#[pin_project(PinnedDrop)]
#[derive(Debug)]
pub struct TrackedBody<B> {
    #[pin]
    inner: B,
    guard: Option<InFlightGuard>,
    /// The usage scan, when [`TrackedBody::scan_usage`] asked for one (boxed: bodies that do
    /// not scan stay small).
    usage: Option<Box<UsageScan>>,
}

/// Ends the request: the usage scan (if any) reports first, then the guard is released with
/// `outcome` (and the completion observers run).
fn end_request(
    guard: &mut Option<InFlightGuard>,
    usage: &mut Option<Box<UsageScan>>,
    outcome: Outcome,
) {
    let Some(mut g) = guard.take() else {
        return;
    };
    if let Some(mut scan) = usage.take() {
        let u = scan.scanner.finish();
        if let Some(cached) = u.cached_tokens {
            g.observe_cached(cached);
        }
        if let Some(sink) = scan.sink.take() {
            sink.on_usage(&u, outcome);
        }
    }
    g.finish(outcome);
}

impl<B> TrackedBody<B> {
    /// Wraps `inner`, holding `guard` until the body is done.
    pub fn new(inner: B, guard: InFlightGuard) -> Self {
        TrackedBody {
            inner,
            guard: Some(guard),
            usage: None,
        }
    }

    /// A body with no guard (for responses that were never counted).
    pub fn untracked(inner: B) -> Self {
        TrackedBody {
            inner,
            guard: None,
            usage: None,
        }
    }

    /// Reads the body's OpenAI `usage` (or, for an SSE stream without it, its content events)
    /// as it streams, with a fixed-size [`UsageScanner`] (the body is never buffered). When the
    /// body ends, before the request completes (so before its
    /// [completion observers](CompletionObserver), such as a token quota's settlement, run):
    /// the `cached_tokens` the engine reported go to the replica's work model
    /// ([`InFlightGuard::observe_cached`]), then `sink` (if any) is told the [`Usage`](crate::usage::Usage) and the
    /// outcome, for example to settle a token quota through
    /// [`TokenReport`](crate::quota::TokenReport).
    ///
    /// Call it before the body is first polled; a body that was never counted (it was empty
    /// from the start) has nothing to scan and `sink` is never called.
    pub fn scan_usage(&mut self, sink: Option<Box<dyn UsageSink>>) {
        if self.guard.is_some() {
            self.usage = Some(Box::new(UsageScan {
                scanner: UsageScanner::new(),
                sink,
            }));
        }
    }

    /// The wrapped body.
    pub fn get_ref(&self) -> &B {
        &self.inner
    }
}

impl<B: Body> Body for TrackedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        use bytes::Buf;
        let mut this = self.project();
        let polled = this.inner.as_mut().poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(g) = this.guard.as_mut() {
                    if let Some(data) = frame.data_ref() {
                        g.on_data(data.remaining());
                        if let Some(scan) = this.usage.as_mut() {
                            feed(&mut scan.scanner, data);
                        }
                    }
                }
                // Servers such as hyper stop polling once the body says it has ended, so the
                // final `None` may never be seen: finish as soon as the end is known.
                if this.inner.is_end_stream() {
                    end_request(this.guard, this.usage, Outcome::Success);
                }
            }
            Poll::Ready(Some(Err(_))) => end_request(this.guard, this.usage, Outcome::Failure),
            Poll::Ready(None) => end_request(this.guard, this.usage, Outcome::Success),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[pinned_drop]
impl<B> PinnedDrop for TrackedBody<B> {
    fn drop(self: Pin<&mut Self>) {
        let this = self.project();
        // Dropped before its end was polled: the client went away mid-stream. (Bodies that are
        // empty from the start are finished in `RouteResponse::track`, never tracked.)
        end_request(this.guard, this.usage, Outcome::Cancelled);
    }
}

/// Feeds every chunk of `data` (a `Buf` may be non-contiguous) to `scanner`.
fn feed(scanner: &mut UsageScanner, data: &impl bytes::Buf) {
    let chunk = data.chunk();
    if chunk.len() == data.remaining() {
        scanner.feed(chunk);
        return;
    }
    let mut slices = [std::io::IoSlice::new(&[]); 16];
    let n = data.chunks_vectored(&mut slices);
    for s in &slices[..n] {
        scanner.feed(s);
    }
}
