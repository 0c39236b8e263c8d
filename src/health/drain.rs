//! Draining a replica out of the pool for a rollout.

use std::time::Duration;

use crate::pool::Pool;
use crate::replica::PoolError;

/// How a [`drain_and_remove`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DrainOutcome {
    /// Every in-flight request finished; the replica was removed.
    Drained,
    /// The timeout passed first; the replica was removed anyway and these requests were still in
    /// flight (they finish or fail on their own; their counters still return to zero).
    TimedOut {
        /// Requests still in flight at the timeout.
        in_flight: u64,
    },
}

/// Drains replica `id` (no new requests or sessions from now on), waits up to `timeout` for its
/// in-flight requests to finish, then removes it from the pool.
///
/// For a drain without removal (to restart the replica in place and
/// [`undrain`](Pool::undrain) it), use [`Pool::drain`] and await [`Drain::wait`](crate::pool::Drain::wait).
///
/// ```
/// use replica_router::health::{drain_and_remove, DrainOutcome};
/// use replica_router::pool::Pool;
/// use replica_router::replica::ReplicaSpec;
/// use std::time::Duration;
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let pool = Pool::builder()
///     .replica("a", ReplicaSpec::new("m"), ())
///     .replica("b", ReplicaSpec::new("m"), ())
///     .build()
///     .unwrap();
/// let out = drain_and_remove(&pool, "a", Duration::from_secs(30)).await.unwrap();
/// assert_eq!(out, DrainOutcome::Drained);
/// assert_eq!(pool.snapshot().len(), 1);
/// # }
/// ```
pub async fn drain_and_remove<B>(
    pool: &Pool<B>,
    id: &str,
    timeout: Duration,
) -> Result<DrainOutcome, PoolError> {
    let drain = pool.drain(id)?;
    let outcome = match tokio::time::timeout(timeout, drain.wait()).await {
        Ok(()) => DrainOutcome::Drained,
        Err(_) => DrainOutcome::TimedOut {
            in_flight: pool
                .snapshot()
                .get(id)
                .map_or(0, |(_, r)| r.state().in_flight()),
        },
    };
    pool.remove(id)?;
    Ok(outcome)
}
