//! Typed errors and their HTTP mapping.
//!
//! Every layer in this crate fails with [`RouteError`]. Each variant maps to one HTTP status
//! ([`RouteError::status_code`]) and, for the two "come back later" cases, a `Retry-After`
//! ([`RouteError::retry_after`]):
//!
//! | variant | status | `Retry-After` |
//! |---|---|---|
//! | [`RouteError::NoReplica`] | 503 Service Unavailable | no |
//! | [`RouteError::Overloaded`] | 429 Too Many Requests | yes |
//! | [`RouteError::QuotaExceeded`] | 429 Too Many Requests | yes |
//! | [`RouteError::InvalidKey`] | 400 Bad Request | no |
//! | [`RouteError::InvalidRequest`] | 400 Bad Request | no |
//! | [`RouteError::NoRoute`] | 404 Not Found | no |
//! | [`RouteError::Backend`] | 502 Bad Gateway | no |
//! | [`RouteError::Unavailable`] | 503 Service Unavailable | no |
//!
//! Membership changes on a [`Pool`](crate::pool::Pool) fail with [`PoolError`] instead; they never
//! reach a client.

use std::fmt;
use std::time::Duration;

use crate::replica::ReplicaId;

/// A boxed error, as tower uses for middleware that wraps arbitrary services.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Why no replica could take a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum NoReplicaReason {
    /// The pool has no members at all.
    EmptyPool,
    /// Members exist, but every one is unhealthy, ejected or draining.
    NoneEligible,
    /// The decided replica left the pool between the pick and the dispatch.
    ReplicaGone,
}

impl fmt::Display for NoReplicaReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            NoReplicaReason::EmptyPool => "the pool is empty",
            NoReplicaReason::NoneEligible => "every replica is unhealthy, ejected or draining",
            NoReplicaReason::ReplicaGone => "the chosen replica left the pool",
        })
    }
}

/// Which part of the route context a bad key came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum KeyKind {
    /// The session (conversation) key.
    Session,
    /// The user key.
    User,
    /// The tenant key.
    Tenant,
    /// The priority field.
    Priority,
    /// The estimated-token count.
    EstimatedTokens,
}

impl fmt::Display for KeyKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            KeyKind::Session => "session",
            KeyKind::User => "user",
            KeyKind::Tenant => "tenant",
            KeyKind::Priority => "priority",
            KeyKind::EstimatedTokens => "estimated tokens",
        })
    }
}

/// The error every routing layer returns.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RouteError {
    /// No replica can take the request (HTTP 503).
    #[error("no replica available: {reason}")]
    NoReplica {
        /// Why none could.
        reason: NoReplicaReason,
    },
    /// Every eligible replica is past its wait budget, or the admission queue is full or timed out
    /// (HTTP 429 with `Retry-After`).
    #[error("all replicas are overloaded; retry after {retry_after:?}")]
    Overloaded {
        /// When the client should try again.
        retry_after: Duration,
    },
    /// The tenant has used its quota (HTTP 429 with `Retry-After`).
    #[error("quota exceeded for tenant {tenant}; retry after {retry_after:?}")]
    QuotaExceeded {
        /// The tenant, printable (lossy UTF-8, shortened).
        tenant: String,
        /// When the client should try again.
        retry_after: Duration,
    },
    /// A routing key taken from the request is unusable (HTTP 400).
    #[error("invalid {kind} key: {detail}")]
    InvalidKey {
        /// Which key.
        kind: KeyKind,
        /// What is wrong with it.
        detail: &'static str,
    },
    /// The request itself is malformed (HTTP 400).
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// The replica failed to serve the request (HTTP 502).
    #[error("replica {replica} failed: {source}")]
    Backend {
        /// The replica that failed.
        replica: ReplicaId,
        /// Its error.
        #[source]
        source: BoxError,
    },
    /// The request names a model (or route) that no pool serves, or matches no route and there
    /// is no default (HTTP 404, as OpenAI-compatible servers answer an unknown model). Raised by
    /// [`Select`](crate::select::Select).
    #[error("no route for {}", no_route_target(.route))]
    NoRoute {
        /// The model or route name the request asked for (printable, shortened), or `None` when
        /// it named none and matched no route.
        route: Option<String>,
    },
    /// A dependency of the router (such as the counter store, under a fail-closed policy) is
    /// unavailable (HTTP 503).
    #[error("routing dependency unavailable: {0}")]
    Unavailable(String),
    /// The request needs more context (prompt plus `max_tokens`) than any replica of the pool
    /// accepts (HTTP 400, code `context_length_exceeded`, as OpenAI-compatible servers answer):
    /// refused before any replica spends a prefill on it. Raised by
    /// [`ContextFit`](crate::fit::ContextFit).
    #[error(
        "this request needs about {needed} tokens of context (prompt plus max_tokens), more than \
         any replica accepts (largest: {largest}); shorten the prompt or lower max_tokens"
    )]
    ContextTooLong {
        /// Tokens the request needs (estimated prompt plus `max_tokens`).
        needed: u64,
        /// The largest `max_context` among the pool's replicas.
        largest: u64,
    },
    /// The request body is larger than the stack buffers (HTTP 413); see
    /// [`BufferBodyLayer`](crate::edge::BufferBodyLayer).
    #[error("request body larger than {limit} bytes")]
    PayloadTooLarge {
        /// The limit in bytes.
        limit: usize,
    },
    /// A deadline set around part of the stack (tower's `Timeout`) passed before the replica
    /// answered (HTTP 504).
    #[error("the replica did not answer in time")]
    Timeout,
    /// Any other error of a middleware placed between the crate's layers (HTTP 500).
    #[error("internal routing error: {0}")]
    Internal(BoxError),
}

impl RouteError {
    /// The HTTP status a gateway should answer with.
    ///
    /// ```
    /// use replica_router::error::RouteError;
    /// use std::time::Duration;
    /// let e = RouteError::Overloaded { retry_after: Duration::from_secs(1) };
    /// assert_eq!(e.status_code(), http::StatusCode::TOO_MANY_REQUESTS);
    /// assert_eq!(e.retry_after(), Some(Duration::from_secs(1)));
    /// ```
    pub fn status_code(&self) -> http::StatusCode {
        use http::StatusCode as S;
        match self {
            RouteError::NoReplica { .. } | RouteError::Unavailable(_) => S::SERVICE_UNAVAILABLE,
            RouteError::Overloaded { .. } | RouteError::QuotaExceeded { .. } => {
                S::TOO_MANY_REQUESTS
            }
            RouteError::InvalidKey { .. }
            | RouteError::InvalidRequest(_)
            | RouteError::ContextTooLong { .. } => S::BAD_REQUEST,
            RouteError::NoRoute { .. } => S::NOT_FOUND,
            RouteError::Backend { .. } => S::BAD_GATEWAY,
            RouteError::Timeout => S::GATEWAY_TIMEOUT,
            RouteError::PayloadTooLarge { .. } => S::PAYLOAD_TOO_LARGE,
            RouteError::Internal(_) => S::INTERNAL_SERVER_ERROR,
        }
    }

    /// How long the client should wait before retrying, for the 429 variants.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            RouteError::Overloaded { retry_after }
            | RouteError::QuotaExceeded { retry_after, .. } => Some(*retry_after),
            _ => None,
        }
    }

    /// The `Retry-After` header value in whole seconds, rounded up and at least 1.
    pub fn retry_after_header(&self) -> Option<http::HeaderValue> {
        self.retry_after().map(|d| {
            let secs = d.as_secs() + u64::from(d.subsec_nanos() > 0);
            http::HeaderValue::from(secs.max(1))
        })
    }

    /// A short machine-readable code for logs, metrics labels and JSON error bodies.
    pub fn code(&self) -> &'static str {
        match self {
            RouteError::NoReplica { .. } => "no_replica",
            RouteError::Overloaded { .. } => "overloaded",
            RouteError::QuotaExceeded { .. } => "quota_exceeded",
            RouteError::InvalidKey { .. } => "invalid_key",
            RouteError::InvalidRequest(_) => "invalid_request",
            RouteError::NoRoute { .. } => "route_not_found",
            RouteError::Backend { .. } => "backend_error",
            RouteError::Unavailable(_) => "unavailable",
            RouteError::ContextTooLong { .. } => "context_length_exceeded",
            RouteError::Timeout => "timeout",
            RouteError::PayloadTooLarge { .. } => "payload_too_large",
            RouteError::Internal(_) => "internal_error",
        }
    }

    /// Turns the error into a complete HTTP response: status, `Retry-After` where it applies,
    /// and an OpenAI-style JSON error body.
    ///
    /// ```
    /// use replica_router::error::{RouteError, NoReplicaReason};
    /// let resp = RouteError::NoReplica { reason: NoReplicaReason::EmptyPool }.to_http_response();
    /// assert_eq!(resp.status(), 503);
    /// assert!(resp.body().starts_with(b"{\"error\""));
    /// ```
    pub fn to_http_response(&self) -> http::Response<bytes::Bytes> {
        let body = openai_error_json(self.status_code(), self.code(), &self.to_string());
        let mut resp = http::Response::new(bytes::Bytes::from(body));
        *resp.status_mut() = self.status_code();
        resp.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/json"),
        );
        if let Some(v) = self.retry_after_header() {
            resp.headers_mut().insert(http::header::RETRY_AFTER, v);
        }
        resp
    }

    /// Wraps a backend failure.
    pub fn backend(replica: ReplicaId, source: impl Into<BoxError>) -> Self {
        RouteError::Backend {
            replica,
            source: source.into(),
        }
    }
}

fn no_route_target(route: &Option<String>) -> String {
    match route {
        Some(r) => format!("`{r}`"),
        None => "this request".to_owned(),
    }
}

/// Errors of tower's middlewares between the crate's layers: a boxed [`RouteError`] is itself,
/// `Timeout`'s `Elapsed` is [`RouteError::Timeout`] (504), `LoadShed`'s `Overloaded` is
/// [`RouteError::Overloaded`] (429, retry after 1 s), anything else [`RouteError::Internal`]
/// (500).
///
/// ```
/// use replica_router::error::{BoxError, RouteError};
/// let elapsed: BoxError = Box::new(tower::timeout::error::Elapsed::new());
/// assert_eq!(RouteError::from(elapsed).status_code(), 504);
/// let inner: BoxError = Box::new(RouteError::Timeout);
/// assert!(matches!(RouteError::from(inner), RouteError::Timeout));
/// let other: BoxError = "boom".into();
/// assert_eq!(RouteError::from(other).status_code(), 500);
/// ```
impl From<BoxError> for RouteError {
    fn from(e: BoxError) -> Self {
        let e = match e.downcast::<RouteError>() {
            Ok(route) => return *route,
            Err(e) => e,
        };
        if e.is::<tower::timeout::error::Elapsed>() {
            return RouteError::Timeout;
        }
        if e.is::<tower::load_shed::error::Overloaded>() {
            return RouteError::Overloaded {
                retry_after: Duration::from_secs(1),
            };
        }
        RouteError::Internal(e)
    }
}

impl From<std::convert::Infallible> for RouteError {
    fn from(never: std::convert::Infallible) -> Self {
        match never {}
    }
}

/// The OpenAI error shape every error answer of the crate uses:
/// `{"error":{"message":...,"type":...,"param":null,"code":<status>}}`.
///
/// ```
/// let body = replica_router::error::openai_error_json(http::StatusCode::BAD_REQUEST,
///     "invalid_request_error", "say \"hi\"");
/// assert_eq!(body, r#"{"error":{"message":"say \"hi\"","type":"invalid_request_error","param":null,"code":400}}"#);
/// ```
pub fn openai_error_json(status: http::StatusCode, kind: &str, message: &str) -> String {
    let mut body = String::with_capacity(64 + message.len());
    body.push_str("{\"error\":{\"message\":\"");
    json_escape_into(message, &mut body);
    body.push_str("\",\"type\":\"");
    json_escape_into(kind, &mut body);
    body.push_str("\",\"param\":null,\"code\":");
    body.push_str(&status.as_u16().to_string());
    body.push_str("}}");
    body
}

/// Escapes `s` as the inside of a JSON string (quotes, backslashes and control characters).
///
/// ```
/// let mut out = String::new();
/// replica_router::error::json_escape_into("a\"b\n", &mut out);
/// assert_eq!(out, "a\\\"b\\n");
/// ```
pub fn json_escape_into(s: &str, out: &mut String) {
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
}

/// Shortens arbitrary tenant bytes into a printable string for errors and logs.
pub(crate) fn printable_key(bytes: &[u8]) -> String {
    const MAX: usize = 64;
    let cut = &bytes[..bytes.len().min(MAX)];
    let mut s = String::from_utf8_lossy(cut).into_owned();
    if bytes.len() > MAX {
        s.push('…');
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_rounds_up() {
        let e = RouteError::QuotaExceeded {
            tenant: "t".into(),
            retry_after: Duration::from_millis(1500),
        };
        assert_eq!(e.retry_after_header().unwrap(), "2");
        let e = RouteError::Overloaded {
            retry_after: Duration::ZERO,
        };
        assert_eq!(e.retry_after_header().unwrap(), "1");
    }

    #[test]
    fn json_body_is_escaped() {
        let e = RouteError::InvalidRequest("bad \"quote\"\n".into());
        let r = e.to_http_response();
        let s = std::str::from_utf8(r.body()).unwrap();
        assert!(s.contains("bad \\\"quote\\\"\\n"), "{s}");
        assert_eq!(r.status(), 400);
    }

    #[test]
    fn no_route_is_404() {
        let e = RouteError::NoRoute {
            route: Some("gpt-9".into()),
        };
        assert_eq!(e.status_code(), 404);
        assert_eq!(e.to_string(), "no route for `gpt-9`");
        let e = RouteError::NoRoute { route: None };
        assert_eq!(e.to_string(), "no route for this request");
        assert_eq!(e.code(), "route_not_found");
        assert!(e.retry_after().is_none());
    }

    #[test]
    fn printable_key_truncates() {
        let k = vec![b'a'; 1000];
        assert!(printable_key(&k).chars().count() <= 65);
        assert_eq!(printable_key(&[0xff, b'x']), "\u{fffd}x");
    }
}
