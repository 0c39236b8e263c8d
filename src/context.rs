//! The route context: what a request carries for routing.
//!
//! [`RouteContext`] holds the session (conversation) key, the user key, the tenant, an estimate
//! of the request's tokens and its priority. [`RouteContextLayer`] extracts it from each request
//! with a [`ContextExtractor`] ([`HeaderExtractor`] reads HTTP headers; any closure
//! `Fn(&Req) -> Result<RouteContext, RouteError>` works too) and stores it in the request's
//! extensions, where every later layer reads it through [`RouteRequest`].
//!
//! A context already present in the extensions (put there by the application, for example after
//! it parsed the body) is kept as is.

use std::fmt;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::HeaderName;

use crate::error::{KeyKind, RouteError};
use crate::future::RouteFuture;
use crate::request::RouteRequest;

/// Default cap on a routing key's length in bytes.
pub const DEFAULT_MAX_KEY_LEN: usize = 4096;

/// A routing key: arbitrary bytes (header values need not be UTF-8), cheap to clone.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RouteKey(Bytes);

impl RouteKey {
    /// Makes a key from bytes. Empty keys are allowed here; extractors treat an empty header as
    /// "no key".
    pub fn new(bytes: impl Into<Bytes>) -> Self {
        RouteKey(bytes.into())
    }

    /// The key's bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// The key's bytes as a shared buffer.
    pub fn bytes(&self) -> &Bytes {
        &self.0
    }

    /// The key shortened to something printable (lossy UTF-8, at most 64 bytes).
    pub fn printable(&self) -> String {
        crate::error::printable_key(&self.0)
    }
}

impl fmt::Debug for RouteKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RouteKey({:?})", self.printable())
    }
}

impl From<&'static str> for RouteKey {
    fn from(s: &'static str) -> Self {
        RouteKey(Bytes::from_static(s.as_bytes()))
    }
}

impl From<String> for RouteKey {
    fn from(s: String) -> Self {
        RouteKey(Bytes::from(s))
    }
}

impl From<Vec<u8>> for RouteKey {
    fn from(v: Vec<u8>) -> Self {
        RouteKey(Bytes::from(v))
    }
}

/// How urgent a request is. Shedding and admission queues drop lower priorities first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub enum Priority {
    /// Offline or batch work: shed first.
    Batch,
    /// Ordinary traffic.
    #[default]
    Standard,
    /// A user waiting on the answer: shed last.
    Interactive,
}

impl Priority {
    /// Parses `batch`, `standard`, `interactive` (any ASCII case) or `0`, `1`, `2`.
    ///
    /// ```
    /// use replica_router::context::Priority;
    /// assert_eq!(Priority::parse(b"Interactive"), Some(Priority::Interactive));
    /// assert_eq!(Priority::parse(b"0"), Some(Priority::Batch));
    /// assert_eq!(Priority::parse(b"urgent!"), None);
    /// ```
    pub fn parse(value: &[u8]) -> Option<Priority> {
        let v = value.trim_ascii();
        if v.eq_ignore_ascii_case(b"batch") || v == b"0" {
            Some(Priority::Batch)
        } else if v.eq_ignore_ascii_case(b"standard") || v == b"1" {
            Some(Priority::Standard)
        } else if v.eq_ignore_ascii_case(b"interactive") || v == b"2" {
            Some(Priority::Interactive)
        } else {
            None
        }
    }

    /// The lowercase name.
    pub fn as_str(self) -> &'static str {
        match self {
            Priority::Batch => "batch",
            Priority::Standard => "standard",
            Priority::Interactive => "interactive",
        }
    }
}

/// What a request carries for routing.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RouteContext {
    /// Session or conversation key (sticky routing), if any.
    pub session: Option<RouteKey>,
    /// User key (an alternative affinity key that spreads heavy users), if any.
    pub user: Option<RouteKey>,
    /// Tenant (quota key), if any.
    pub tenant: Option<RouteKey>,
    /// Estimated tokens of the request (prompt plus expected output), for token-aware load and
    /// token quotas. 0 when unknown.
    pub estimated_tokens: u64,
    /// Tokens the request needs in a replica's context window (estimated prompt plus the
    /// `max_tokens` it asks for), for [`fit`](crate::fit): a replica whose
    /// [`max_context`](crate::replica::ReplicaSpec::max_context) is smaller never gets it. 0
    /// when unknown (every replica fits).
    pub context_tokens: u64,
    /// Priority for shedding and admission.
    pub priority: Priority,
    /// Fingerprints of the prompt's leading blocks, for cache affinity without a session key
    /// (see [`prefix`](crate::prefix)); `None` when the caller did not hash the prompt.
    pub prefix: Option<crate::prefix::PrefixHashes>,
}

impl RouteContext {
    /// A context with a session key.
    pub fn with_session(session: impl Into<RouteKey>) -> Self {
        RouteContext {
            session: Some(session.into()),
            ..Default::default()
        }
    }
}

/// Extracts a [`RouteContext`] from a request.
pub trait ContextExtractor<Req> {
    /// Reads the context, or fails with a typed error for unusable input.
    fn extract(&self, req: &Req) -> Result<RouteContext, RouteError>;
}

impl<Req, F> ContextExtractor<Req> for F
where
    F: Fn(&Req) -> Result<RouteContext, RouteError>,
{
    fn extract(&self, req: &Req) -> Result<RouteContext, RouteError> {
        self(req)
    }
}

/// Reads the route context from HTTP headers.
///
/// Defaults: session from `x-session-id`, user from `x-user-id`, tenant from `x-tenant-id`,
/// priority from `x-priority`, estimated tokens from `x-estimated-tokens` or else from
/// `content-length / 4` (a rough bytes-per-token for English JSON prompts). An empty header is
/// "no key"; a key over `max_key_len` bytes is [`RouteError::InvalidKey`]. Non-UTF-8 values are
/// fine: keys are bytes.
///
/// ```
/// use replica_router::context::{ContextExtractor, HeaderExtractor};
/// let ex = HeaderExtractor::default();
/// let req = http::Request::builder()
///     .header("x-session-id", "conv-42")
///     .header("x-tenant-id", "acme")
///     .body(())
///     .unwrap();
/// let ctx = ex.extract(&req).unwrap();
/// assert_eq!(ctx.session.unwrap().as_bytes(), b"conv-42");
/// assert_eq!(ctx.tenant.unwrap().as_bytes(), b"acme");
/// ```
#[derive(Debug, Clone)]
pub struct HeaderExtractor {
    session: Option<HeaderName>,
    user: Option<HeaderName>,
    tenant: Option<HeaderName>,
    priority: Option<HeaderName>,
    estimated_tokens: Option<HeaderName>,
    bytes_per_token: u64,
    max_key_len: usize,
}

impl Default for HeaderExtractor {
    fn default() -> Self {
        HeaderExtractor {
            session: Some(HeaderName::from_static("x-session-id")),
            user: Some(HeaderName::from_static("x-user-id")),
            tenant: Some(HeaderName::from_static("x-tenant-id")),
            priority: Some(HeaderName::from_static("x-priority")),
            estimated_tokens: Some(HeaderName::from_static("x-estimated-tokens")),
            bytes_per_token: 4,
            max_key_len: DEFAULT_MAX_KEY_LEN,
        }
    }
}

impl HeaderExtractor {
    /// The session-key header (`None` to ignore sessions).
    pub fn session_header(mut self, name: Option<HeaderName>) -> Self {
        self.session = name;
        self
    }

    /// The user-key header.
    pub fn user_header(mut self, name: Option<HeaderName>) -> Self {
        self.user = name;
        self
    }

    /// The tenant header.
    pub fn tenant_header(mut self, name: Option<HeaderName>) -> Self {
        self.tenant = name;
        self
    }

    /// The priority header.
    pub fn priority_header(mut self, name: Option<HeaderName>) -> Self {
        self.priority = name;
        self
    }

    /// The estimated-tokens header.
    pub fn estimated_tokens_header(mut self, name: Option<HeaderName>) -> Self {
        self.estimated_tokens = name;
        self
    }

    /// Bytes per token for the `content-length` fallback estimate (0 disables the fallback).
    pub fn bytes_per_token(mut self, n: u64) -> Self {
        self.bytes_per_token = n;
        self
    }

    /// The longest accepted key in bytes.
    pub fn max_key_len(mut self, n: usize) -> Self {
        self.max_key_len = n;
        self
    }

    fn key(
        &self,
        headers: &http::HeaderMap,
        name: &Option<HeaderName>,
        kind: KeyKind,
    ) -> Result<Option<RouteKey>, RouteError> {
        let Some(name) = name else { return Ok(None) };
        let Some(value) = headers.get(name) else {
            return Ok(None);
        };
        let bytes = value.as_bytes();
        if bytes.is_empty() {
            return Ok(None);
        }
        if bytes.len() > self.max_key_len {
            return Err(RouteError::InvalidKey {
                kind,
                detail: "longer than the configured maximum",
            });
        }
        Ok(Some(RouteKey(Bytes::copy_from_slice(bytes))))
    }

    /// Extracts from a header map alone (for callers that are not `http::Request`).
    pub fn extract_headers(&self, headers: &http::HeaderMap) -> Result<RouteContext, RouteError> {
        let session = self.key(headers, &self.session, KeyKind::Session)?;
        let user = self.key(headers, &self.user, KeyKind::User)?;
        let tenant = self.key(headers, &self.tenant, KeyKind::Tenant)?;
        let priority = match self.priority.as_ref().and_then(|n| headers.get(n)) {
            None => Priority::default(),
            Some(v) => Priority::parse(v.as_bytes()).ok_or(RouteError::InvalidKey {
                kind: KeyKind::Priority,
                detail: "expected batch, standard, interactive, 0, 1 or 2",
            })?,
        };
        let estimated_tokens = match self.estimated_tokens.as_ref().and_then(|n| headers.get(n)) {
            Some(v) => parse_u64(v.as_bytes()).ok_or(RouteError::InvalidKey {
                kind: KeyKind::EstimatedTokens,
                detail: "expected a non-negative integer",
            })?,
            None if self.bytes_per_token > 0 => headers
                .get(http::header::CONTENT_LENGTH)
                .and_then(|v| parse_u64(v.as_bytes()))
                .map_or(0, |len| len / self.bytes_per_token),
            None => 0,
        };
        Ok(RouteContext {
            session,
            user,
            tenant,
            estimated_tokens,
            priority,
            prefix: None,
            context_tokens: 0,
        })
    }
}

fn parse_u64(b: &[u8]) -> Option<u64> {
    std::str::from_utf8(b).ok()?.trim().parse().ok()
}

impl<B> ContextExtractor<http::Request<B>> for HeaderExtractor {
    fn extract(&self, req: &http::Request<B>) -> Result<RouteContext, RouteError> {
        self.extract_headers(req.headers())
    }
}

/// A layer that puts a [`RouteContext`] in every request's extensions.
#[derive(Debug, Clone)]
pub struct RouteContextLayer<E> {
    extractor: E,
}

impl<E> RouteContextLayer<E> {
    /// A layer that extracts with `extractor`.
    pub fn new(extractor: E) -> Self {
        RouteContextLayer { extractor }
    }
}

impl Default for RouteContextLayer<HeaderExtractor> {
    fn default() -> Self {
        RouteContextLayer::new(HeaderExtractor::default())
    }
}

impl<S, E: Clone> tower::Layer<S> for RouteContextLayer<E> {
    type Service = RouteContextService<S, E>;

    fn layer(&self, inner: S) -> Self::Service {
        RouteContextService {
            inner,
            extractor: self.extractor.clone(),
        }
    }
}

/// The service [`RouteContextLayer`] makes.
#[derive(Debug, Clone)]
pub struct RouteContextService<S, E> {
    inner: S,
    extractor: E,
}

impl<S, E, Req> tower::Service<Req> for RouteContextService<S, E>
where
    S: tower::Service<Req>,
    S::Error: Into<RouteError>,
    E: ContextExtractor<Req>,
    Req: RouteRequest,
{
    type Response = S::Response;
    type Error = RouteError;
    type Future = RouteFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, mut req: Req) -> Self::Future {
        if req.route_context().is_none() {
            match self.extractor.extract(&req) {
                Ok(ctx) => req.set_route_context(ctx),
                Err(e) => return RouteFuture::failed(e),
            }
        }
        RouteFuture::new(self.inner.call(req))
    }
}
