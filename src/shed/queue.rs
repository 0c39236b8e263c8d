//! The bounded, prioritized admission queue.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::Waker;

use parking_lot::Mutex;

use crate::context::Priority;
use crate::inflight::{Completion, CompletionObserver};

pub(crate) fn lane(p: Priority) -> usize {
    match p {
        Priority::Batch => 0,
        Priority::Standard => 1,
        Priority::Interactive => 2,
    }
}

/// One queued request's handle.
#[derive(Debug)]
pub(crate) struct Waiter {
    pub(crate) priority: Priority,
    evicted: AtomicBool,
    waker: Mutex<Option<Waker>>,
}

impl Waiter {
    pub(crate) fn new(priority: Priority) -> Arc<Self> {
        Arc::new(Waiter {
            priority,
            evicted: AtomicBool::new(false),
            waker: Mutex::new(None),
        })
    }

    pub(crate) fn register(&self, waker: &Waker) {
        let mut w = self.waker.lock();
        match &*w {
            Some(old) if old.will_wake(waker) => {}
            _ => *w = Some(waker.clone()),
        }
    }

    pub(crate) fn is_evicted(&self) -> bool {
        self.evicted.load(Ordering::Acquire)
    }

    fn wake(&self) {
        if let Some(w) = self.waker.lock().as_ref() {
            w.wake_by_ref();
        }
    }
}

/// What [`AdmissionQueue::push`] did.
pub(crate) enum Push {
    /// Queued.
    Queued,
    /// Queued in place of a lower-priority waiter, which is now evicted.
    Evicted,
    /// Full of requests of this priority or higher: not queued.
    Full,
}

/// Waiters in three FIFO lanes, one per priority. The head is the oldest waiter of the highest
/// non-empty priority; only the head checks for capacity, so admission goes in priority order
/// and one at a time (each admitted request is counted in flight before the next head looks).
#[derive(Debug)]
pub(crate) struct AdmissionQueue {
    lanes: Mutex<[VecDeque<Arc<Waiter>>; 3]>,
    len: AtomicUsize,
    capacity: usize,
}

impl AdmissionQueue {
    pub(crate) fn new(capacity: usize) -> Self {
        AdmissionQueue {
            lanes: Mutex::new(Default::default()),
            len: AtomicUsize::new(0),
            capacity,
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.len.load(Ordering::Acquire)
    }

    fn set_len(&self, n: usize) {
        self.len.store(n, Ordering::Release);
        metrics::gauge!("replica_router_admission_queue_depth").set(n as f64);
    }

    /// The highest priority waiting, if any.
    pub(crate) fn highest(&self) -> Option<Priority> {
        if self.len() == 0 {
            return None;
        }
        let lanes = self.lanes.lock();
        lanes
            .iter()
            .rev()
            .find_map(|l| l.front().map(|w| w.priority))
    }

    pub(crate) fn push(&self, waiter: &Arc<Waiter>) -> Push {
        let mut lanes = self.lanes.lock();
        let len: usize = lanes.iter().map(VecDeque::len).sum();
        let mine = lane(waiter.priority);
        if len < self.capacity {
            lanes[mine].push_back(waiter.clone());
            self.set_len(len + 1);
            return Push::Queued;
        }
        // Full: the youngest waiter of the lowest priority below ours makes room.
        let victim = lanes[..mine].iter_mut().find_map(VecDeque::pop_back);
        match victim {
            Some(v) => {
                v.evicted.store(true, Ordering::Release);
                lanes[mine].push_back(waiter.clone());
                drop(lanes);
                v.wake();
                Push::Evicted
            }
            None => Push::Full,
        }
    }

    pub(crate) fn is_head(&self, waiter: &Arc<Waiter>) -> bool {
        let lanes = self.lanes.lock();
        lanes
            .iter()
            .rev()
            .find_map(|l| l.front())
            .is_some_and(|h| Arc::ptr_eq(h, waiter))
    }

    /// Removes `waiter` if still queued; returns whether it was.
    pub(crate) fn remove(&self, waiter: &Arc<Waiter>) -> bool {
        let mut lanes = self.lanes.lock();
        let l = &mut lanes[lane(waiter.priority)];
        match l.iter().position(|w| Arc::ptr_eq(w, waiter)) {
            Some(i) => {
                l.remove(i);
                let len = lanes.iter().map(VecDeque::len).sum();
                self.set_len(len);
                true
            }
            None => false,
        }
    }

    /// Wakes the head so it checks for capacity.
    pub(crate) fn notify_head(&self) {
        if self.len() == 0 {
            return;
        }
        let head = {
            let lanes = self.lanes.lock();
            lanes.iter().rev().find_map(|l| l.front()).cloned()
        };
        if let Some(h) = head {
            h.wake();
        }
    }
}

/// Wakes the queue's head whenever an admitted request finishes (a slot freed up).
#[derive(Debug)]
pub(crate) struct QueueNotifier(pub(crate) Arc<AdmissionQueue>);

impl CompletionObserver for QueueNotifier {
    fn on_complete(&self, _completion: &Completion<'_>) {
        self.0.notify_head();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn priority_order_and_eviction() {
        let q = AdmissionQueue::new(2);
        let b = Waiter::new(Priority::Batch);
        let s = Waiter::new(Priority::Standard);
        let i = Waiter::new(Priority::Interactive);
        assert!(matches!(q.push(&b), Push::Queued));
        assert!(q.is_head(&b));
        assert!(matches!(q.push(&s), Push::Queued));
        assert!(q.is_head(&s));
        // Full: an interactive request evicts the batch one.
        assert!(matches!(q.push(&i), Push::Evicted));
        assert!(b.is_evicted());
        assert!(q.is_head(&i));
        // Another batch request finds no lower priority to evict.
        assert!(matches!(q.push(&Waiter::new(Priority::Batch)), Push::Full));
        assert!(q.remove(&i));
        assert!(!q.remove(&i));
        assert!(q.is_head(&s));
        assert_eq!(q.highest(), Some(Priority::Standard));
        assert_eq!(q.len(), 1);
    }
}
