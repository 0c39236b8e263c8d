//! The typed error of every counter-store call.

use std::time::Duration;

/// A boxed error from a store backend (for example a `redis::RedisError`).
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Why a counter-store call failed.
///
/// Callers that need a failure policy (the quota layer's fail-open / fail-closed) treat every
/// variant the same way except [`StoreError::InvalidKey`] and [`StoreError::InvalidQuota`], which
/// are caller bugs or bad input and never a store outage.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The call did not complete within the store's bounded timeout.
    #[error("counter store call `{op}` timed out after {after:?}")]
    Timeout {
        /// The operation that timed out (`"take"`, `"settle"`, ...).
        op: &'static str,
        /// The timeout that elapsed.
        after: Duration,
    },
    /// The store could not be reached (connection refused, reset, reconnecting).
    #[error("counter store unavailable: {source}")]
    Unavailable {
        /// The underlying transport error.
        #[source]
        source: BoxError,
    },
    /// The store answered with an error (script error, out of memory, read-only replica, ...).
    #[error("counter store error: {source}")]
    Backend {
        /// The underlying error.
        #[source]
        source: BoxError,
    },
    /// The store answered with a reply of an unexpected shape.
    #[error("unexpected reply from the counter store: {0}")]
    Protocol(String),
    /// A key's scope or prefix is not a valid identifier.
    #[error("invalid store key: {0}")]
    InvalidKey(&'static str),
    /// A quota's limit, window or TTL is out of range.
    #[error("invalid quota: {0}")]
    InvalidQuota(&'static str),
    /// The key already holds a different kind of counter (for example a rate window where a
    /// concurrency counter was expected).
    #[error("store key holds a different kind of counter")]
    WrongKind,
}

impl StoreError {
    /// True when the error says the store is down or slow (timeout, unreachable, server error),
    /// as opposed to bad input from the caller.
    pub fn is_outage(&self) -> bool {
        !matches!(
            self,
            StoreError::InvalidKey(_) | StoreError::InvalidQuota(_) | StoreError::WrongKind
        )
    }

    /// A short, fixed label for metrics (never includes tenant data).
    pub fn kind(&self) -> &'static str {
        match self {
            StoreError::Timeout { .. } => "timeout",
            StoreError::Unavailable { .. } => "unavailable",
            StoreError::Backend { .. } => "backend",
            StoreError::Protocol(_) => "protocol",
            StoreError::InvalidKey(_) => "invalid_key",
            StoreError::InvalidQuota(_) => "invalid_quota",
            StoreError::WrongKind => "wrong_kind",
        }
    }
}
