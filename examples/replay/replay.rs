//! The replay logic of `examples/replay` (trace parsing, prompt synthesis, the open-loop driver,
//! SSE timing, Prometheus prefix-cache counters, the report). `main.rs` beside it is the command
//! line; `tests/replay.rs` includes this file with `#[path]` and drives it against in-process
//! replicas and the gateway.

use std::collections::BTreeMap;
use std::fmt::{self, Write as _};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Value};
use tokio::sync::Semaphore;

/// The HTTP client the replay uses (plain HTTP/1.1, pooled keep-alive connections).
pub type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// Tokens the mock engine's chat template adds around one user message: the message head (2), the
/// end-of-message token (1) and the assistant's generation prompt (2). See `src/mock/tokenize.rs`.
pub const TEMPLATE_TOKENS: u32 = 5;

/// Mooncake's block size, the default of the `block_tokens` field.
pub const DEFAULT_BLOCK_TOKENS: u32 = 512;

/// Bytes of an error body kept in a request's result.
const ERROR_BODY_BYTES: usize = 512;

/// One request of a trace (one JSONL line).
#[derive(Debug, Clone, PartialEq)]
pub struct TraceEntry {
    /// 0-based index among the trace's requests (its order in the file, blank lines skipped).
    pub index: usize,
    /// Arrival time, milliseconds since the trace's start.
    pub timestamp_ms: f64,
    /// Conversation id, sent in the session header unless the replay omits it.
    pub session: Option<String>,
    /// Turn number within the conversation, if the trace gives it.
    pub turn: Option<u64>,
    /// Prompt length in tokens (template included).
    pub input_length: u32,
    /// Tokens to generate (`max_tokens`).
    pub output_length: u32,
    /// Tokens per hash block.
    pub block_tokens: u32,
    /// One id per block of the prompt; equal ids mean equal block contents.
    pub hash_ids: Vec<u64>,
}

/// A trace line that cannot be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceError {
    /// 1-based line number in the file.
    pub line: usize,
    /// What is wrong with it.
    pub message: String,
}

impl fmt::Display for TraceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "trace line {}: {}", self.line, self.message)
    }
}

impl std::error::Error for TraceError {}

fn field_u32(v: &Value, name: &str) -> Result<u32, String> {
    let x = v
        .get(name)
        .ok_or_else(|| format!("missing `{name}`"))?
        .as_u64()
        .ok_or_else(|| format!("`{name}` must be a non-negative integer"))?;
    u32::try_from(x).map_err(|_| format!("`{name}` is too large ({x})"))
}

/// Parses a JSONL trace: one object per line with `timestamp` (ms), `input_length`,
/// `output_length`, `hash_ids`, and optionally `session` (string or number), `turn` and
/// `block_tokens` (default 512). Blank lines are skipped. Mooncake's traces are accepted as they are.
pub fn parse_trace(text: &str) -> Result<Vec<TraceEntry>, TraceError> {
    let mut out = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() {
            continue;
        }
        let err = |message: String| TraceError {
            line: i + 1,
            message,
        };
        let v: Value = serde_json::from_str(line).map_err(|e| err(format!("not JSON: {e}")))?;
        if !v.is_object() {
            return Err(err("not a JSON object".into()));
        }
        let timestamp_ms = v
            .get("timestamp")
            .ok_or_else(|| err("missing `timestamp`".into()))?
            .as_f64()
            .filter(|t| t.is_finite() && *t >= 0.0)
            .ok_or_else(|| err("`timestamp` must be a non-negative number".into()))?;
        let input_length = field_u32(&v, "input_length").map_err(err)?;
        let output_length = field_u32(&v, "output_length").map_err(err)?;
        let block_tokens = match v.get("block_tokens") {
            None | Some(Value::Null) => DEFAULT_BLOCK_TOKENS,
            Some(_) => field_u32(&v, "block_tokens").map_err(err)?,
        };
        if block_tokens == 0 {
            return Err(err("`block_tokens` must be positive".into()));
        }
        let hash_ids = v
            .get("hash_ids")
            .ok_or_else(|| err("missing `hash_ids`".into()))?
            .as_array()
            .ok_or_else(|| err("`hash_ids` must be an array".into()))?
            .iter()
            .map(|h| h.as_u64())
            .collect::<Option<Vec<u64>>>()
            .ok_or_else(|| err("`hash_ids` must hold non-negative integers".into()))?;
        let session = match v.get("session") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s.clone()),
            Some(Value::Number(n)) => Some(n.to_string()),
            Some(_) => return Err(err("`session` must be a string or a number".into())),
        };
        let turn = match v.get("turn") {
            None | Some(Value::Null) => None,
            Some(t) => Some(
                t.as_u64()
                    .ok_or_else(|| err("`turn` must be a non-negative integer".into()))?,
            ),
        };
        out.push(TraceEntry {
            index: out.len(),
            timestamp_ms,
            session,
            turn,
            input_length,
            output_length,
            block_tokens,
            hash_ids,
        });
    }
    Ok(out)
}

fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// Appends the word at position `pos` of the block seeded by `seed`: four lowercase letters, one
/// token for the mock's tokenizer (and a short word for real ones).
fn push_word(out: &mut String, seed: u64, pos: u32) {
    let mut h = splitmix64(seed ^ splitmix64(u64::from(pos) ^ 0x5EED_B10C));
    for _ in 0..4 {
        out.push(char::from(b'a' + (h % 26) as u8));
        h /= 26;
    }
}

/// The user message of `entry`: `input_length - TEMPLATE_TOKENS` words (at least one), block `k`
/// made of the words seeded by `hash_ids[k]`, so two entries whose hash ids share a prefix share a
/// text prefix of the same length in words. Positions past the hash ids are filled with words
/// seeded by the entry's index (shared with nobody).
///
/// With the mock engine's tokenizer and chat template the rendered prompt has exactly
/// `max(input_length, TEMPLATE_TOKENS + 1)` tokens.
pub fn prompt_text(entry: &TraceEntry) -> String {
    let words = entry.input_length.saturating_sub(TEMPLATE_TOKENS).max(1);
    let b = entry.block_tokens.max(1);
    let mut out = String::with_capacity(words as usize * 5);
    for j in 0..words {
        let (block, pos) = ((j / b) as usize, j % b);
        let seed = match entry.hash_ids.get(block) {
            Some(&h) => h,
            None => {
                splitmix64(entry.index as u64 ^ 0xF111_0000_0000_0000)
                    ^ splitmix64(block as u64 ^ 0xF111)
            }
        };
        if j > 0 {
            out.push(' ');
        }
        push_word(&mut out, seed, pos);
    }
    out
}

/// Where a request's session id comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionSource {
    /// The trace's `session` field (nothing when a line has none).
    Trace,
    /// None at all: no session header is sent.
    Omit,
    /// A digest of the first `k` hash ids (for traces without sessions, such as Mooncake's own);
    /// lines with fewer ids use all of theirs.
    HashPrefix(usize),
}

/// What to replay and how.
#[derive(Debug, Clone)]
pub struct ReplayConfig {
    /// Base URL of the router or replica (`http://host:port`, optionally with a path prefix).
    pub base_url: String,
    /// More routers in front of the same replicas: requests go to `base_url` and these in turn,
    /// whatever their session, as an L4 balancer in front of several gateways sends them.
    pub extra_urls: Vec<String>,
    /// The `model` field of every request.
    pub model: String,
    /// Header that carries the session id.
    pub session_header: HeaderName,
    /// Where session ids come from.
    pub sessions: SessionSource,
    /// Time scale: 2.0 replays twice as fast as the trace's timestamps.
    pub speed: f64,
    /// Replay at most this many requests (the first ones).
    pub max_requests: Option<usize>,
    /// Send nothing scheduled later than this after the start.
    pub duration: Option<Duration>,
    /// Requests in flight at once; a request due while all are busy waits (its lag is reported).
    pub concurrency: usize,
    /// Limit on each request, from sending to the end of the stream.
    pub timeout: Duration,
    /// Prometheus endpoints of the replicas, read before and after the replay.
    pub replica_metrics: Vec<String>,
}

impl ReplayConfig {
    /// Defaults for `base_url`: model `mock-llama-3-70b`, header `x-session-id`, sessions from the
    /// trace, speed 1, no bounds, 256 in flight, 120 s per request, no metrics.
    pub fn new(base_url: impl Into<String>) -> Self {
        ReplayConfig {
            base_url: base_url.into(),
            extra_urls: Vec::new(),
            model: "mock-llama-3-70b".to_owned(),
            session_header: HeaderName::from_static("x-session-id"),
            sessions: SessionSource::Trace,
            speed: 1.0,
            max_requests: None,
            duration: None,
            concurrency: 256,
            timeout: Duration::from_secs(120),
            replica_metrics: Vec::new(),
        }
    }
}

/// The replay could not run (request failures are not errors: they are counted in the report).
#[derive(Debug)]
pub enum ReplayError {
    /// A configuration value is out of range or malformed.
    Config(String),
    /// A replica's metrics could not be read.
    Metrics {
        /// The endpoint.
        url: String,
        /// Why.
        message: String,
    },
}

impl fmt::Display for ReplayError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReplayError::Config(m) => write!(f, "{m}"),
            ReplayError::Metrics { url, message } => write!(f, "metrics {url}: {message}"),
        }
    }
}

impl std::error::Error for ReplayError {}

/// The outcome of one request.
#[derive(Debug, Clone, Default)]
pub struct RequestResult {
    /// The trace entry's index.
    pub index: usize,
    /// The session id sent, if any.
    pub session: Option<String>,
    /// The trace's turn number, if it gives one.
    pub turn: Option<u64>,
    /// When it was due, ms after the replay's start (trace time divided by the speed).
    pub due_ms: f64,
    /// How late it was sent (waiting for a concurrency slot), ms.
    pub lag_ms: f64,
    /// HTTP status, when a response came.
    pub status: Option<u16>,
    /// Why it failed, if it did.
    pub error: Option<String>,
    /// Whether it ran past the timeout.
    pub timed_out: bool,
    /// Time to the first SSE chunk that carries content, ms.
    pub ttft_ms: Option<f64>,
    /// Time to the end of the stream, ms.
    pub e2e_ms: f64,
    /// Content chunks received.
    pub content_chunks: u64,
    /// `usage.prompt_tokens`, if reported.
    pub prompt_tokens: Option<u64>,
    /// `usage.completion_tokens`, if reported.
    pub completion_tokens: Option<u64>,
    /// `usage.prompt_tokens_details.cached_tokens`, if reported.
    pub cached_tokens: Option<u64>,
}

impl RequestResult {
    /// Whether it got a 200 and a stream with content, in time.
    pub fn ok(&self) -> bool {
        self.error.is_none()
    }
}

/// Prefix-cache counters of one replica, summed over label sets.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct CacheCounters {
    /// Prefix-cache queries (vLLM: in tokens).
    pub queries: f64,
    /// Prefix-cache hits (vLLM: in tokens).
    pub hits: f64,
    /// Prompt tokens processed.
    pub prompt_tokens: f64,
    /// Whether the endpoint exported the query/hit counters at all.
    pub has_cache_counters: bool,
}

/// Sample names read for each counter (with `:` written `_`, as OpenMetrics exposition escapes
/// it), most preferred first; the first one present is used, so a server that exports a new and an
/// old name is not counted twice.
const QUERY_NAMES: [&str; 4] = [
    "vllm_prefix_cache_queries_total",
    "vllm_prefix_cache_queries",
    "vllm_gpu_prefix_cache_queries_total",
    "vllm_gpu_prefix_cache_queries",
];
const HIT_NAMES: [&str; 4] = [
    "vllm_prefix_cache_hits_total",
    "vllm_prefix_cache_hits",
    "vllm_gpu_prefix_cache_hits_total",
    "vllm_gpu_prefix_cache_hits",
];
const PROMPT_NAMES: [&str; 2] = ["vllm_prompt_tokens_total", "vllm_prompt_tokens"];

/// Reads the prefix-cache counters from Prometheus (or OpenMetrics) text: vLLM's
/// `vllm:prefix_cache_{queries,hits}_total` (older `vllm:gpu_prefix_cache_*`) and
/// `vllm:prompt_tokens_total`, summed over label sets (engines, models).
pub fn parse_cache_counters(text: &str) -> CacheCounters {
    let mut sums: BTreeMap<String, f64> = BTreeMap::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let name_end = line
            .find(|c: char| c == '{' || c.is_ascii_whitespace())
            .unwrap_or(line.len());
        let name = &line[..name_end];
        let mut rest = &line[name_end..];
        if rest.starts_with('{') {
            // Skip the label set; label values may hold `}` and spaces inside quotes.
            let mut in_quote = false;
            let mut escaped = false;
            let mut end = None;
            for (i, c) in rest.char_indices() {
                match c {
                    _ if escaped => escaped = false,
                    '\\' if in_quote => escaped = true,
                    '"' => in_quote = !in_quote,
                    '}' if !in_quote => {
                        end = Some(i);
                        break;
                    }
                    _ => {}
                }
            }
            let Some(end) = end else { continue };
            rest = &rest[end + 1..];
        }
        let Some(value) = rest
            .split_ascii_whitespace()
            .next()
            .and_then(|v| v.parse::<f64>().ok())
        else {
            continue;
        };
        if value.is_finite() {
            *sums.entry(name.replace(':', "_")).or_insert(0.0) += value;
        }
    }
    let first = |names: &[&str]| names.iter().find_map(|n| sums.get(*n).copied());
    let queries = first(&QUERY_NAMES);
    let hits = first(&HIT_NAMES);
    CacheCounters {
        queries: queries.unwrap_or(0.0),
        hits: hits.unwrap_or(0.0),
        prompt_tokens: first(&PROMPT_NAMES).unwrap_or(0.0),
        has_cache_counters: queries.is_some() && hits.is_some(),
    }
}

/// One replica's counters over the replay (after minus before).
#[derive(Debug, Clone)]
pub struct ReplicaDelta {
    /// The metrics endpoint.
    pub url: String,
    /// Counter increases.
    pub delta: CacheCounters,
}

impl ReplicaDelta {
    /// Prompt tokens this replica had to compute (queries minus hits; vLLM counts both in tokens).
    pub fn computed_tokens(&self) -> f64 {
        (self.delta.queries - self.delta.hits).max(0.0)
    }
}

/// Nearest-rank percentile of `sorted` (ascending), `q` in 0..=100; `None` when empty.
pub fn percentile(sorted: &[f64], q: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((q / 100.0) * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

/// Latency percentiles, ms.
#[derive(Debug, Clone, Copy, Default)]
pub struct Percentiles {
    /// Median.
    pub p50: Option<f64>,
    /// 95th percentile.
    pub p95: Option<f64>,
    /// 99th percentile.
    pub p99: Option<f64>,
}

impl Percentiles {
    fn of(mut v: Vec<f64>) -> Self {
        v.sort_by(f64::total_cmp);
        Percentiles {
            p50: percentile(&v, 50.0),
            p95: percentile(&v, 95.0),
            p99: percentile(&v, 99.0),
        }
    }
}

/// The headline numbers.
#[derive(Debug, Clone, Default)]
pub struct Summary {
    /// Requests sent.
    pub requests: usize,
    /// Requests that failed (any reason), timeouts included.
    pub errors: usize,
    /// Requests that ran past the timeout.
    pub timeouts: usize,
    /// TTFT over successful requests.
    pub ttft_ms: Percentiles,
    /// End-to-end latency over successful requests.
    pub e2e_ms: Percentiles,
    /// Wall time from the first send to the last completion, s.
    pub wall_s: f64,
    /// Successful requests per second of wall time.
    pub requests_per_s: f64,
    /// Completion tokens (usage, else content chunks) per second of wall time.
    pub output_tokens_per_s: f64,
    /// Largest send lag (concurrency limit reached), ms.
    pub max_lag_ms: f64,
    /// Sum of `usage.prompt_tokens`.
    pub usage_prompt_tokens: u64,
    /// Sum of `usage.prompt_tokens_details.cached_tokens`.
    pub usage_cached_tokens: u64,
    /// Requests whose usage reported `cached_tokens`.
    pub usage_cached_reported: usize,
    /// Prefix-cache hit rate over all replicas' counters (hits / queries), if any were read.
    pub metrics_hit_rate: Option<f64>,
}

impl Summary {
    /// Cached over prompt tokens from the responses' usage, if any response reported it.
    pub fn usage_hit_rate(&self) -> Option<f64> {
        (self.usage_cached_reported > 0 && self.usage_prompt_tokens > 0)
            .then(|| self.usage_cached_tokens as f64 / self.usage_prompt_tokens as f64)
    }
}

/// Everything a replay measured.
#[derive(Debug, Clone)]
pub struct Report {
    /// Per request, in trace order.
    pub results: Vec<RequestResult>,
    /// Per replica, in `replica_metrics` order.
    pub replicas: Vec<ReplicaDelta>,
    /// The headline numbers.
    pub summary: Summary,
}

/// A client for [`replay`] (kept separate so a caller can share one).
pub fn client() -> HttpClient {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .build(connector)
}

fn metrics_uri(url: &str) -> String {
    let trimmed = url.trim_end_matches('/');
    let after_scheme = trimmed.split_once("://").map_or(trimmed, |(_, r)| r);
    if after_scheme.contains('/') {
        trimmed.to_owned()
    } else {
        format!("{trimmed}/metrics")
    }
}

/// Reads one replica's counters. `url` is a base URL (`/metrics` is appended) or a full metrics URL.
pub async fn scrape(client: &HttpClient, url: &str) -> Result<CacheCounters, ReplayError> {
    let fail = |message: String| ReplayError::Metrics {
        url: url.to_owned(),
        message,
    };
    let uri = metrics_uri(url);
    let req = Request::get(&uri)
        .body(Full::new(Bytes::new()))
        .map_err(|e| fail(format!("bad URL {uri:?}: {e}")))?;
    let fut = async {
        let resp = client.request(req).await.map_err(|e| fail(e.to_string()))?;
        if resp.status() != StatusCode::OK {
            return Err(fail(format!("status {}", resp.status())));
        }
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| fail(e.to_string()))?
            .to_bytes();
        Ok(parse_cache_counters(&String::from_utf8_lossy(&body)))
    };
    tokio::time::timeout(Duration::from_secs(10), fut)
        .await
        .map_err(|_| fail("timed out".into()))?
}

/// The session id sent for `entry` (none: no header).
pub fn session_for(entry: &TraceEntry, src: &SessionSource) -> Option<String> {
    match src {
        SessionSource::Trace => entry.session.clone(),
        SessionSource::Omit => None,
        SessionSource::HashPrefix(k) => {
            let mut h = 0xC0FF_EE00_u64;
            for id in entry.hash_ids.iter().take((*k).max(1)) {
                h = splitmix64(h ^ *id);
            }
            Some(format!("prefix-{h:016x}"))
        }
    }
}

/// The JSON body sent for `entry`.
pub fn request_body(entry: &TraceEntry, model: &str) -> Value {
    json!({
        "model": model,
        "messages": [{"role": "user", "content": prompt_text(entry)}],
        "max_tokens": entry.output_length.max(1),
        "ignore_eos": true,
        "stream": true,
        "stream_options": {"include_usage": true},
    })
}

/// Incremental SSE reader: feeds bytes, reports content chunks and usage.
#[derive(Debug, Default)]
struct SseState {
    buf: Vec<u8>,
    content_chunks: u64,
    prompt_tokens: Option<u64>,
    completion_tokens: Option<u64>,
    cached_tokens: Option<u64>,
    stream_error: Option<String>,
    done: bool,
}

impl SseState {
    /// Consumes complete lines of `data`; returns whether a content chunk was among them.
    fn feed(&mut self, data: &[u8]) -> bool {
        self.buf.extend_from_slice(data);
        let mut saw_content = false;
        let mut start = 0;
        while let Some(nl) = self.buf[start..].iter().position(|&b| b == b'\n') {
            let line = &self.buf[start..start + nl];
            start += nl + 1;
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            let Some(payload) = line.strip_prefix(b"data:") else {
                continue;
            };
            let payload = payload.trim_ascii();
            if payload == b"[DONE]" {
                self.done = true;
                continue;
            }
            let Ok(v) = serde_json::from_slice::<Value>(payload) else {
                continue;
            };
            if let Some(e) = v.get("error").filter(|e| !e.is_null()) {
                self.stream_error = Some(e.to_string());
            }
            let choice = v.get("choices").and_then(|c| c.get(0));
            let content = choice.and_then(|c| {
                c.get("delta")
                    .and_then(|d| d.get("content"))
                    .or_else(|| c.get("text"))
                    .and_then(Value::as_str)
            });
            if content.is_some_and(|s| !s.is_empty()) {
                self.content_chunks += 1;
                saw_content = true;
            }
            if let Some(u) = v.get("usage").filter(|u| u.is_object()) {
                self.prompt_tokens = u.get("prompt_tokens").and_then(Value::as_u64);
                self.completion_tokens = u.get("completion_tokens").and_then(Value::as_u64);
                self.cached_tokens = u
                    .get("prompt_tokens_details")
                    .and_then(|d| d.get("cached_tokens"))
                    .and_then(Value::as_u64);
            }
        }
        self.buf.drain(..start);
        saw_content
    }
}

async fn send_one(
    client: HttpClient,
    uri: String,
    header: Option<(HeaderName, HeaderValue)>,
    body: Bytes,
    timeout: Duration,
    out: &mut RequestResult,
) {
    let start = Instant::now();
    let ms = |t: Instant| t.duration_since(start).as_secs_f64() * 1000.0;
    let mut req = Request::post(&uri).header(http::header::CONTENT_TYPE, "application/json");
    if let Some((k, v)) = header {
        req = req.header(k, v);
    }
    let req = match req.body(Full::new(body)) {
        Ok(r) => r,
        Err(e) => {
            out.error = Some(format!("bad request: {e}"));
            return;
        }
    };
    let mut ttft = None;
    let mut sse = SseState::default();
    let work = async {
        let resp = client
            .request(req)
            .await
            .map_err(|e| format!("send: {e}"))?;
        let status = resp.status();
        out.status = Some(status.as_u16());
        let mut body = resp.into_body();
        if status != StatusCode::OK {
            let mut kept = Vec::new();
            while let Some(Ok(frame)) = body.frame().await {
                if let Some(d) = frame.data_ref() {
                    let room = ERROR_BODY_BYTES.saturating_sub(kept.len());
                    kept.extend_from_slice(&d[..d.len().min(room)]);
                }
            }
            return Err(format!(
                "status {}: {}",
                status.as_u16(),
                String::from_utf8_lossy(&kept).trim()
            ));
        }
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| format!("body: {e}"))?;
            if let Some(d) = frame.data_ref() {
                if sse.feed(d) && ttft.is_none() {
                    ttft = Some(ms(Instant::now()));
                }
            }
        }
        Ok(())
    };
    let outcome = tokio::time::timeout(timeout, work).await;
    out.e2e_ms = ms(Instant::now());
    out.ttft_ms = ttft;
    out.content_chunks = sse.content_chunks;
    out.prompt_tokens = sse.prompt_tokens;
    out.completion_tokens = sse.completion_tokens;
    out.cached_tokens = sse.cached_tokens;
    out.error = match outcome {
        Err(_) => {
            out.timed_out = true;
            Some(format!("timed out after {:.1} s", timeout.as_secs_f64()))
        }
        Ok(Err(e)) => Some(e),
        Ok(Ok(())) => match (&sse.stream_error, ttft) {
            (Some(e), _) => Some(format!("error in stream: {e}")),
            (None, None) => Some("the stream carried no content".into()),
            (None, Some(_)) if !sse.done => Some("the stream ended without [DONE]".into()),
            _ => None,
        },
    };
}

/// Replays `entries` against `cfg.base_url` open-loop: each request is sent at its timestamp
/// (divided by `cfg.speed`, counted from the first entry's), at most `cfg.concurrency` at once.
/// Reads the replicas' metrics before and after.
pub async fn replay(
    client: &HttpClient,
    cfg: &ReplayConfig,
    entries: &[TraceEntry],
) -> Result<Report, ReplayError> {
    if !(cfg.speed.is_finite() && cfg.speed > 0.0) {
        return Err(ReplayError::Config(
            "speed must be a positive number".into(),
        ));
    }
    if cfg.concurrency == 0 {
        return Err(ReplayError::Config("concurrency must be positive".into()));
    }
    let mut uris = Vec::with_capacity(1 + cfg.extra_urls.len());
    for base in std::iter::once(&cfg.base_url).chain(&cfg.extra_urls) {
        let uri = format!("{}/v1/chat/completions", base.trim_end_matches('/'));
        if uri.parse::<http::Uri>().is_err() {
            return Err(ReplayError::Config(format!("bad base URL {base:?}")));
        }
        uris.push(uri);
    }
    let mut order: Vec<&TraceEntry> = entries.iter().collect();
    order.sort_by(|a, b| a.timestamp_ms.total_cmp(&b.timestamp_ms));
    order.truncate(cfg.max_requests.unwrap_or(usize::MAX));
    let t_first = order.first().map_or(0.0, |e| e.timestamp_ms);

    let mut before = Vec::new();
    for url in &cfg.replica_metrics {
        before.push(scrape(client, url).await?);
    }

    let sem = Arc::new(Semaphore::new(cfg.concurrency));
    let start = tokio::time::Instant::now();
    let wall_start = Instant::now();
    let mut tasks = Vec::with_capacity(order.len());
    for (sent, entry) in order.into_iter().enumerate() {
        let uri = &uris[sent % uris.len()];
        let due = Duration::from_secs_f64(((entry.timestamp_ms - t_first) / cfg.speed) / 1000.0);
        if cfg.duration.is_some_and(|d| due > d) {
            break;
        }
        tokio::time::sleep_until(start + due).await;
        let Ok(permit) = sem.clone().acquire_owned().await else {
            break;
        };
        let lag = start.elapsed().saturating_sub(due);
        let session = session_for(entry, &cfg.sessions);
        let header = match &session {
            Some(s) => match HeaderValue::from_str(s) {
                Ok(v) => Some((cfg.session_header.clone(), v)),
                Err(_) => None,
            },
            None => None,
        };
        let mut result = RequestResult {
            index: entry.index,
            session,
            turn: entry.turn,
            due_ms: due.as_secs_f64() * 1000.0,
            lag_ms: lag.as_secs_f64() * 1000.0,
            ..RequestResult::default()
        };
        let body = Bytes::from(request_body(entry, &cfg.model).to_string());
        let (client, uri, timeout) = (client.clone(), uri.clone(), cfg.timeout);
        tasks.push(tokio::spawn(async move {
            send_one(client, uri, header, body, timeout, &mut result).await;
            drop(permit);
            result
        }));
    }
    let mut results = Vec::with_capacity(tasks.len());
    for t in tasks {
        match t.await {
            Ok(r) => results.push(r),
            Err(e) => results.push(RequestResult {
                error: Some(format!("request task failed: {e}")),
                ..RequestResult::default()
            }),
        }
    }
    let wall_s = wall_start.elapsed().as_secs_f64();

    let mut replicas = Vec::new();
    for (url, b) in cfg.replica_metrics.iter().zip(before) {
        let a = scrape(client, url).await?;
        replicas.push(ReplicaDelta {
            url: url.clone(),
            delta: CacheCounters {
                queries: (a.queries - b.queries).max(0.0),
                hits: (a.hits - b.hits).max(0.0),
                prompt_tokens: (a.prompt_tokens - b.prompt_tokens).max(0.0),
                has_cache_counters: a.has_cache_counters,
            },
        });
    }
    results.sort_by_key(|r| r.index);
    let summary = summarize(&results, &replicas, wall_s);
    Ok(Report {
        results,
        replicas,
        summary,
    })
}

fn summarize(results: &[RequestResult], replicas: &[ReplicaDelta], wall_s: f64) -> Summary {
    let ok: Vec<&RequestResult> = results.iter().filter(|r| r.ok()).collect();
    let output: u64 = ok
        .iter()
        .map(|r| r.completion_tokens.unwrap_or(r.content_chunks))
        .sum();
    let (queries, hits) = replicas
        .iter()
        .filter(|r| r.delta.has_cache_counters)
        .fold((0.0, 0.0), |(q, h), r| {
            (q + r.delta.queries, h + r.delta.hits)
        });
    let per_s = |x: f64| if wall_s > 0.0 { x / wall_s } else { 0.0 };
    Summary {
        requests: results.len(),
        errors: results.len() - ok.len(),
        timeouts: results.iter().filter(|r| r.timed_out).count(),
        ttft_ms: Percentiles::of(ok.iter().filter_map(|r| r.ttft_ms).collect()),
        e2e_ms: Percentiles::of(ok.iter().map(|r| r.e2e_ms).collect()),
        wall_s,
        requests_per_s: per_s(ok.len() as f64),
        output_tokens_per_s: per_s(output as f64),
        max_lag_ms: results.iter().map(|r| r.lag_ms).fold(0.0, f64::max),
        usage_prompt_tokens: ok.iter().filter_map(|r| r.prompt_tokens).sum(),
        usage_cached_tokens: ok.iter().filter_map(|r| r.cached_tokens).sum(),
        usage_cached_reported: ok.iter().filter(|r| r.cached_tokens.is_some()).count(),
        metrics_hit_rate: (queries > 0.0).then(|| hits / queries),
    }
}

fn opt(x: Option<f64>) -> Value {
    x.map_or(Value::Null, |v| json!((v * 1000.0).round() / 1000.0))
}

impl Report {
    /// The report as JSON (`summary`, `replicas`, `requests`), written by `--out`.
    pub fn to_json(&self, label: Option<&str>) -> Value {
        let s = &self.summary;
        let pct =
            |p: &Percentiles| json!({"p50": opt(p.p50), "p95": opt(p.p95), "p99": opt(p.p99)});
        let prompt_total: f64 = self.replicas.iter().map(|r| r.delta.prompt_tokens).sum();
        let computed_total: f64 = self
            .replicas
            .iter()
            .map(ReplicaDelta::computed_tokens)
            .sum();
        let share = |x: f64, total: f64| (total > 0.0).then(|| x / total);
        json!({
            "label": label,
            "summary": {
                "requests": s.requests,
                "errors": s.errors,
                "timeouts": s.timeouts,
                "ttft_ms": pct(&s.ttft_ms),
                "e2e_ms": pct(&s.e2e_ms),
                "wall_s": opt(Some(s.wall_s)),
                "requests_per_s": opt(Some(s.requests_per_s)),
                "output_tokens_per_s": opt(Some(s.output_tokens_per_s)),
                "max_lag_ms": opt(Some(s.max_lag_ms)),
                "usage_prompt_tokens": s.usage_prompt_tokens,
                "usage_cached_tokens": s.usage_cached_tokens,
                "usage_hit_rate": opt(s.usage_hit_rate()),
                "metrics_hit_rate": opt(s.metrics_hit_rate),
            },
            "replicas": self.replicas.iter().map(|r| json!({
                "url": r.url,
                "prefix_cache_queries": r.delta.queries,
                "prefix_cache_hits": r.delta.hits,
                "prompt_tokens": r.delta.prompt_tokens,
                "computed_tokens": r.computed_tokens(),
                "hit_rate": opt(share(r.delta.hits, r.delta.queries)),
                "prompt_share": opt(share(r.delta.prompt_tokens, prompt_total)),
                "computed_share": opt(share(r.computed_tokens(), computed_total)),
            })).collect::<Vec<_>>(),
            "requests": self.results.iter().map(|r| json!({
                "index": r.index,
                "session": r.session,
                "turn": r.turn,
                "due_ms": opt(Some(r.due_ms)),
                "lag_ms": opt(Some(r.lag_ms)),
                "status": r.status,
                "error": r.error,
                "ttft_ms": opt(r.ttft_ms),
                "e2e_ms": opt(Some(r.e2e_ms)),
                "prompt_tokens": r.prompt_tokens,
                "completion_tokens": r.completion_tokens,
                "cached_tokens": r.cached_tokens,
            })).collect::<Vec<_>>(),
        })
    }

    /// A human-readable summary (what the command prints).
    pub fn summary_text(&self) -> String {
        let s = &self.summary;
        let f = |x: Option<f64>| x.map_or("-".to_owned(), |v| format!("{v:.1}"));
        let pctf = |x: Option<f64>| x.map_or("-".to_owned(), |v| format!("{:.1}%", v * 100.0));
        let mut out = String::new();
        let _ = writeln!(
            out,
            "requests {}  errors {} (timeouts {})  wall {:.1} s  {:.2} req/s  {:.0} output tok/s  max send lag {:.0} ms",
            s.requests, s.errors, s.timeouts, s.wall_s, s.requests_per_s, s.output_tokens_per_s, s.max_lag_ms
        );
        let _ = writeln!(
            out,
            "TTFT ms  p50 {}  p95 {}  p99 {}   |   e2e ms  p50 {}  p95 {}  p99 {}",
            f(s.ttft_ms.p50),
            f(s.ttft_ms.p95),
            f(s.ttft_ms.p99),
            f(s.e2e_ms.p50),
            f(s.e2e_ms.p95),
            f(s.e2e_ms.p99)
        );
        let _ = writeln!(
            out,
            "prefix-cache hit rate  replicas' counters {}  responses' usage {} ({} of {} prompt tokens cached)",
            pctf(s.metrics_hit_rate),
            pctf(s.usage_hit_rate()),
            s.usage_cached_tokens,
            s.usage_prompt_tokens
        );
        let prompt_total: f64 = self.replicas.iter().map(|r| r.delta.prompt_tokens).sum();
        let computed_total: f64 = self
            .replicas
            .iter()
            .map(ReplicaDelta::computed_tokens)
            .sum();
        for r in &self.replicas {
            let share = |x: f64, t: f64| if t > 0.0 { x / t * 100.0 } else { 0.0 };
            let _ = writeln!(
                out,
                "  {}  prompt {:.0} tok ({:.1}%)  computed {:.0} tok ({:.1}%)  hit rate {}",
                r.url,
                r.delta.prompt_tokens,
                share(r.delta.prompt_tokens, prompt_total),
                r.computed_tokens(),
                share(r.computed_tokens(), computed_total),
                if r.delta.has_cache_counters {
                    pctf((r.delta.queries > 0.0).then(|| r.delta.hits / r.delta.queries))
                } else {
                    "(no prefix-cache counters)".to_owned()
                }
            );
        }
        out
    }
}
