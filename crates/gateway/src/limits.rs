//! Transport hardening of the request path: request-line and header checks, canonical routes,
//! the request-body reader with its timeouts and the global bound on buffered body bytes, and the
//! connection cap.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::{header, HeaderValue, Method, Request, Response, StatusCode, Version};
use http_body::Body as _;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tokio::time::Instant;

use super::body::GatewayBody;
use super::config::TransportConfig;

/// Past this many bytes of one request body, the body counts as large: it may use only seven
/// eighths of `--max-buffered-body-bytes`, the rest being kept for small requests.
pub const SMALL_BODY_BYTES: usize = 1024 * 1024;

/// The connection cap when the file-descriptor limit allows it.
const MAX_CONNECTIONS: usize = 10_000;

/// `--max-connections`' default: 10 000, or less when the soft file-descriptor limit is lower (half
/// of it minus 64, at least 16: each client connection may hold an upstream connection too).
pub(crate) fn default_max_connections() -> usize {
    match fd_limit() {
        Some(n) => (n.saturating_sub(64) / 2).clamp(16, MAX_CONNECTIONS),
        None => MAX_CONNECTIONS,
    }
}

#[cfg(unix)]
fn fd_limit() -> Option<usize> {
    let mut rl = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `getrlimit` writes the limit into the struct it is given and reads nothing else.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) };
    if rc != 0 || rl.rlim_cur == libc::RLIM_INFINITY {
        return None;
    }
    usize::try_from(rl.rlim_cur).ok()
}

#[cfg(not(unix))]
fn fd_limit() -> Option<usize> {
    None
}

/// Bytes of request bodies buffered across every connection, against a cap.
#[derive(Debug)]
pub(crate) struct BodyBudget {
    used: AtomicUsize,
    cap: usize,
    large_cap: usize,
}

impl BodyBudget {
    pub(crate) fn new(cap: usize) -> Self {
        let cap = if cap == 0 { usize::MAX } else { cap };
        BodyBudget {
            used: AtomicUsize::new(0),
            cap,
            large_cap: cap - cap / 8,
        }
    }

    /// Bytes held now (for metrics and tests).
    #[allow(dead_code)]
    pub(crate) fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }
}

/// Bytes of [`BodyBudget`] held by one request, given back when dropped.
#[derive(Debug)]
pub(crate) struct BodyPermit<'a> {
    budget: &'a BodyBudget,
    held: usize,
}

impl BodyPermit<'_> {
    /// Holds at least `total` bytes, or fails (the budget is full).
    fn grow_to(&mut self, total: usize) -> bool {
        if total <= self.held {
            return true;
        }
        let n = total - self.held;
        let limit = if total > SMALL_BODY_BYTES {
            self.budget.large_cap
        } else {
            self.budget.cap
        };
        let before = self.budget.used.fetch_add(n, Ordering::Relaxed);
        if before.saturating_add(n) > limit {
            self.budget.used.fetch_sub(n, Ordering::Relaxed);
            return false;
        }
        self.held = total;
        true
    }
}

impl Drop for BodyPermit<'_> {
    fn drop(&mut self) {
        if self.held > 0 {
            self.budget.used.fetch_sub(self.held, Ordering::Relaxed);
        }
    }
}

/// The transport limits the request path applies.
#[derive(Debug)]
pub(crate) struct Limits {
    pub(crate) body_timeout: Option<Duration>,
    pub(crate) body_idle_timeout: Option<Duration>,
    pub(crate) budget: BodyBudget,
}

fn nonzero(d: Duration) -> Option<Duration> {
    (!d.is_zero()).then_some(d)
}

impl Limits {
    pub(crate) fn new(t: &TransportConfig) -> Self {
        Limits {
            body_timeout: nonzero(t.body_timeout),
            body_idle_timeout: nonzero(t.body_idle_timeout),
            budget: BodyBudget::new(t.max_buffered_body_bytes),
        }
    }
}

/// Why a request body could not be read.
#[derive(Debug)]
pub(crate) enum ReadError {
    /// Larger than `--max-body-bytes` (413).
    TooLarge,
    /// The connection failed mid-body (400).
    Io,
    /// Too slow (408).
    TimedOut,
    /// The global body budget is full (503).
    Busy,
}

/// Reads a request body of at most `max` bytes within the body timeouts, holding its bytes
/// against the global budget (given back when the returned permit drops). The usual case, a body
/// that arrives in one frame, is kept as that frame's buffer: no copy, no allocation.
pub(crate) async fn read_body<'a>(
    mut body: Incoming,
    max: usize,
    limits: &'a Limits,
) -> Result<(Bytes, BodyPermit<'a>), ReadError> {
    let mut permit = BodyPermit {
        budget: &limits.budget,
        held: 0,
    };
    if body.is_end_stream() {
        return Ok((Bytes::new(), permit));
    }
    let declared = body.size_hint().exact().map(|n| n as usize);
    if declared.is_some_and(|n| n > max) {
        return Err(ReadError::TooLarge);
    }
    let deadline = limits.body_timeout.map(|d| Instant::now() + d);
    let mut first: Option<Bytes> = None;
    let mut rest: Option<BytesMut> = None;
    while !body.is_end_stream() {
        let next = match (limits.body_idle_timeout, deadline) {
            (None, None) => body.frame().await,
            (idle, total) => {
                let at = match (idle.map(|i| Instant::now() + i), total) {
                    (Some(a), Some(b)) => a.min(b),
                    (Some(a), None) | (None, Some(a)) => a,
                    (None, None) => return Err(ReadError::Io),
                };
                tokio::time::timeout_at(at, body.frame())
                    .await
                    .map_err(|_| ReadError::TimedOut)?
            }
        };
        let Some(frame) = next else {
            break;
        };
        let Ok(data) = frame.map_err(|_| ReadError::Io)?.into_data() else {
            continue;
        };
        let len = match (&first, &rest) {
            (_, Some(r)) => r.len() + data.len(),
            (Some(f), None) => f.len() + data.len(),
            (None, None) => data.len(),
        };
        if len > max {
            return Err(ReadError::TooLarge);
        }
        match (&first, &mut rest) {
            (None, _) => {
                if !permit.grow_to(len) {
                    return Err(ReadError::Busy);
                }
                first = Some(data);
            }
            (Some(f), None) => {
                // Sized for the declared length when there is one, else doubling.
                let cap = declared
                    .unwrap_or(0)
                    .max(len.max(2 * f.len()))
                    .min(max.max(len));
                if !permit.grow_to(cap + f.len()) {
                    return Err(ReadError::Busy);
                }
                let mut r = BytesMut::with_capacity(cap);
                r.extend_from_slice(f);
                r.extend_from_slice(&data);
                rest = Some(r);
            }
            (Some(_), Some(r)) => {
                if r.capacity() - r.len() < data.len() {
                    let want = (2 * r.capacity()).max(len).min(max.max(len));
                    // While growing, the old and the new buffer both exist.
                    if !permit.grow_to(want + r.capacity()) {
                        return Err(ReadError::Busy);
                    }
                    r.reserve(want - r.len());
                }
                r.extend_from_slice(&data);
                if !permit.grow_to(r.capacity()) {
                    return Err(ReadError::Busy);
                }
            }
        }
    }
    let bytes = match rest {
        Some(r) => {
            // Give back what the growth needed beyond the final buffer.
            let cap = r.capacity();
            if permit.held > cap {
                limits
                    .budget
                    .used
                    .fetch_sub(permit.held - cap, Ordering::Relaxed);
                permit.held = cap;
            }
            r.freeze()
        }
        None => first.unwrap_or_default(),
    };
    Ok((bytes, permit))
}

/// The answer for a body that could not be read, `None` for sizes (the caller answers 413).
pub(crate) fn read_error_response(e: &ReadError) -> Option<Response<GatewayBody>> {
    let mut r = match e {
        ReadError::TooLarge => return None,
        ReadError::Io => super::service::error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "could not read the request body",
        ),
        ReadError::TimedOut => {
            metrics::counter!("gateway_body_timeouts_total").increment(1);
            super::service::error(
                StatusCode::REQUEST_TIMEOUT,
                "invalid_request_error",
                "the request body did not arrive in time",
            )
        }
        ReadError::Busy => {
            metrics::counter!("gateway_body_budget_full_total").increment(1);
            let mut r = super::service::error(
                StatusCode::SERVICE_UNAVAILABLE,
                "server_overloaded",
                "too many request bodies in progress; retry later",
            );
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            r
        }
    };
    // The body was not read to its end: the connection cannot carry another request.
    r.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    Some(r)
}

/// Checks what must hold before a request is routed at all: `CONNECT` is refused (405), an
/// HTTP/1.1 request must carry exactly one `Host` (RFC 9112 section 3.2, else 400), and the path
/// must be canonical (no `%`-encoded unreserved character, empty segment, dot segment or trailing
/// `/`; else 404), so that no spelling of a validated route escapes validation.
pub(crate) fn check_request<B>(req: &Request<B>) -> Option<Response<GatewayBody>> {
    if req.method() == Method::CONNECT {
        let mut r = super::service::error(
            StatusCode::METHOD_NOT_ALLOWED,
            "invalid_request_error",
            "CONNECT is not supported",
        );
        r.headers_mut().insert(
            header::ALLOW,
            HeaderValue::from_static("GET, POST, PUT, PATCH, DELETE, HEAD, OPTIONS"),
        );
        return Some(r);
    }
    if req.version() == Version::HTTP_11 {
        let mut hosts = req.headers().get_all(header::HOST).iter();
        if hosts.next().is_none() || hosts.next().is_some() {
            let mut r = super::service::error(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "an HTTP/1.1 request needs exactly one Host header",
            );
            r.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
            return Some(r);
        }
    }
    if !canonical_path(req.uri().path()) {
        return Some(super::service::error(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            "unknown path (paths must be in canonical form)",
        ));
    }
    None
}

/// Whether `path` is in canonical form: starts with `/`, has no empty segment (`//`), no `.` or
/// `..` segment, no trailing `/` (but `/` itself), no backslash, and no `%`-encoding other than
/// of a reserved or non-ASCII byte (`%2F` stays meaningful; `%63` is just `c`).
///
/// ```ignore
/// assert!(canonical_path("/v1/chat/completions") && canonical_path("/") && canonical_path("/v1/models/a%2Fb"));
/// assert!(!canonical_path("/v1/chat/%63ompletions") && !canonical_path("/v1/completions/"));
/// ```
pub(crate) fn canonical_path(path: &str) -> bool {
    let b = path.as_bytes();
    if b.first() != Some(&b'/') {
        return false;
    }
    if path == "/" {
        return true;
    }
    if b.contains(&b'\\') {
        return false;
    }
    if b.contains(&b'%') {
        let mut i = 0;
        while i < b.len() {
            if b[i] == b'%' {
                let (Some(h), Some(l)) = (
                    b.get(i + 1).and_then(|c| (*c as char).to_digit(16)),
                    b.get(i + 2).and_then(|c| (*c as char).to_digit(16)),
                ) else {
                    return false;
                };
                let c = (h * 16 + l) as u8;
                if c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_' | b'~') {
                    return false;
                }
                i += 3;
            } else {
                i += 1;
            }
        }
    }
    path[1..]
        .split('/')
        .all(|seg| !seg.is_empty() && seg != "." && seg != "..")
}

/// The canned answer written to a connection beyond `--max-connections` before it is closed.
pub(crate) const OVER_CAPACITY: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\nconnection: close\r\ncontent-length: 96\r\n\r\n{\"error\":{\"message\":\"too many connections\",\"type\":\"server_overloaded\",\"param\":null,\"code\":503}}\n";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_paths() {
        for ok in [
            "/",
            "/v1/chat/completions",
            "/v1/models/a%2Fb",
            "/health",
            "/v1/x%C3%A9",
        ] {
            assert!(canonical_path(ok), "{ok}");
        }
        for bad in [
            "",
            "*",
            "/v1/chat/%63ompletions",
            "/v1/completions/",
            "//v1/completions",
            "/v1//completions",
            "/v1/./completions",
            "/v1/x/../completions",
            "/v1/completions/.",
            "/v1/completions%2",
            "/v1/completions%zz",
            "/v1\\completions",
            "/v1/%2e%2e/x",
        ] {
            assert!(!canonical_path(bad), "{bad}");
        }
    }

    #[test]
    fn over_capacity_answer_is_well_formed() {
        let s = std::str::from_utf8(OVER_CAPACITY).unwrap();
        let (_, body) = s.split_once("\r\n\r\n").unwrap();
        assert_eq!(body.len(), 96);
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(v["error"]["type"], "server_overloaded");
    }

    #[test]
    fn budget_keeps_room_for_small_bodies() {
        let b = BodyBudget::new(8 * SMALL_BODY_BYTES);
        let mut big = BodyPermit {
            budget: &b,
            held: 0,
        };
        assert!(big.grow_to(7 * SMALL_BODY_BYTES));
        assert!(!big.grow_to(7 * SMALL_BODY_BYTES + 1));
        let mut small = BodyPermit {
            budget: &b,
            held: 0,
        };
        assert!(small.grow_to(SMALL_BODY_BYTES));
        assert!(!small.grow_to(SMALL_BODY_BYTES + 1));
        drop(big);
        drop(small);
        assert_eq!(b.used(), 0);
    }
}
