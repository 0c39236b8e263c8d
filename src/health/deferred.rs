//! Completion observers told once, about the final attempt of a retried request.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use parking_lot::Mutex;

use crate::inflight::CompletionObservers;
use crate::inflight::{Completion, CompletionObserver, Outcome};
use crate::replica::ReplicaId;

/// An owned copy of a [`Completion`].
#[derive(Debug)]
struct Held {
    replica: ReplicaId,
    outcome: Outcome,
    elapsed: Duration,
    time_to_head: Option<Duration>,
    status: Option<u16>,
    body_bytes: u64,
    body_frames: u64,
    estimated_tokens: u64,
}

/// Stands in for the observers registered above the failover layer. A failure before any
/// response head (the kind a retry may follow) is held back while `armed`; the failover future
/// then discards it (a retry follows and will report) or flushes it (no retry). Anything else is
/// forwarded at once, and a held completion is flushed when the last handle drops.
#[derive(Debug)]
pub(crate) struct Deferred {
    observers: CompletionObservers,
    armed: AtomicBool,
    held: Mutex<Option<Held>>,
}

impl Deferred {
    pub(crate) fn new(observers: CompletionObservers) -> Self {
        Deferred {
            observers,
            armed: AtomicBool::new(true),
            held: Mutex::new(None),
        }
    }

    fn forward(&self, c: &Completion<'_>) {
        for o in &self.observers.0 {
            o.on_complete(c);
        }
    }

    /// The next attempt is the last: report whatever it does.
    pub(crate) fn disarm(&self) {
        self.armed.store(false, Ordering::Release);
    }

    /// A retry follows: forget the held failure.
    pub(crate) fn discard(&self) {
        self.held.lock().take();
    }

    /// No retry follows: report the held failure.
    pub(crate) fn flush(&self) {
        let held = self.held.lock().take();
        if let Some(h) = held {
            self.forward(&Completion {
                replica: &h.replica,
                outcome: h.outcome,
                elapsed: h.elapsed,
                time_to_head: h.time_to_head,
                status: h.status,
                body_bytes: h.body_bytes,
                body_frames: h.body_frames,
                estimated_tokens: h.estimated_tokens,
            });
        }
    }
}

impl CompletionObserver for Deferred {
    fn on_complete(&self, c: &Completion<'_>) {
        if self.armed.load(Ordering::Acquire)
            && c.outcome == Outcome::Failure
            && c.time_to_head.is_none()
        {
            *self.held.lock() = Some(Held {
                replica: c.replica.clone(),
                outcome: c.outcome,
                elapsed: c.elapsed,
                time_to_head: c.time_to_head,
                status: c.status,
                body_bytes: c.body_bytes,
                body_frames: c.body_frames,
                estimated_tokens: c.estimated_tokens,
            });
            return;
        }
        self.forward(c);
    }
}

impl Drop for Deferred {
    fn drop(&mut self) {
        self.flush();
    }
}
