//! The HTTP face of a mock replica: the OpenAI-compatible routes of vLLM, plus the probes of the peer
//! routers (`/health`, `/v1/models`, `/server_info`, `/model_info`) and vLLM's `/metrics`.

use std::convert::Infallible;
use std::fmt::Write as _;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use super::engine::{MockEngine, MockEvent, MockPrompt, MockRequest, MockResponse, MockUsage};
use super::error::MockError;
use super::tokenize::{push_message_end, push_message_head, tokenize_into};

/// Largest request body the mock accepts (larger gets 413).
pub const MAX_BODY_BYTES: usize = 32 * 1024 * 1024;

/// A running HTTP mock replica; dropping it (or [`MockServer::shutdown`]) stops it.
///
/// ```
/// use replica_router_mock::{MockConfig, MockEngine, MockServer};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> std::io::Result<()> {
/// let engine = MockEngine::new(MockConfig { time_scale: 100.0, ..MockConfig::default() });
/// let server = MockServer::bind("127.0.0.1:0".parse().unwrap(), engine).await?;
/// println!("serving on http://{}", server.local_addr());
/// server.shutdown().await;
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct MockServer {
    addr: SocketAddr,
    engine: MockEngine,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl MockServer {
    /// Binds `addr` (port 0 picks a free port) and serves `engine` on it, on the current runtime.
    pub async fn bind(addr: SocketAddr, engine: MockEngine) -> io::Result<MockServer> {
        let listener = TcpListener::bind(addr).await?;
        Ok(Self::from_listener(listener, engine))
    }

    /// Serves `engine` on an already bound listener.
    pub fn from_listener(listener: TcpListener, engine: MockEngine) -> MockServer {
        let addr = listener
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 0)));
        let (stop, stopped) = oneshot::channel();
        let app = Arc::new(App {
            engine: engine.clone(),
            ids: AtomicU64::new(1),
        });
        let task = tokio::spawn(accept_loop(listener, app, stopped));
        MockServer {
            addr,
            engine,
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// The address the server listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The engine behind the server.
    pub fn engine(&self) -> &MockEngine {
        &self.engine
    }

    /// Stops accepting, lets the requests in progress finish, then returns.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for MockServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

struct App {
    engine: MockEngine,
    ids: AtomicU64,
}

async fn accept_loop(listener: TcpListener, app: Arc<App>, mut stopped: oneshot::Receiver<()>) {
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    loop {
        let (stream, _) = tokio::select! {
            r = listener.accept() => match r {
                Ok(s) => s,
                // Out of file descriptors and the like: back off briefly rather than spin.
                Err(_) => {
                    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                    continue;
                }
            },
            _ = &mut stopped => break,
        };
        let _ = stream.set_nodelay(true);
        let app = app.clone();
        let svc = hyper::service::service_fn(move |req| {
            let app = app.clone();
            async move { Ok::<_, Infallible>(handle(&app, req).await) }
        });
        let conn =
            hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), svc);
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            let _ = conn.await;
        });
    }
    drop(listener);
    graceful.shutdown().await;
}

async fn handle(app: &App, req: Request<Incoming>) -> Response<MockBody> {
    let path = req.uri().path();
    match (req.method(), path) {
        (&Method::POST, "/v1/chat/completions") => completion(app, req, Kind::Chat).await,
        (&Method::POST, "/v1/completions") => completion(app, req, Kind::Text).await,
        (&Method::GET, "/health") => Response::new(MockBody::empty()),
        (&Method::GET, "/v1/models") => json_response(StatusCode::OK, &models(app)),
        (&Method::GET, "/server_info" | "/get_server_info") => {
            json_response(StatusCode::OK, &server_info(app))
        }
        (&Method::GET, "/model_info" | "/get_model_info") => {
            json_response(StatusCode::OK, &model_info(app))
        }
        (&Method::GET, "/version") => json_response(StatusCode::OK, &json!({"version": "mock"})),
        (&Method::GET, "/metrics") => metrics(app),
        (
            _,
            "/v1/chat/completions"
            | "/v1/completions"
            | "/health"
            | "/v1/models"
            | "/server_info"
            | "/get_server_info"
            | "/model_info"
            | "/get_model_info"
            | "/version"
            | "/metrics",
        ) => error_response(
            StatusCode::METHOD_NOT_ALLOWED,
            "invalid_request_error",
            "method not allowed",
        ),
        _ => error_response(StatusCode::NOT_FOUND, "not_found_error", "no such route"),
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Chat,
    Text,
}

#[derive(Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: Option<bool>,
}

#[derive(Deserialize)]
struct ChatMessage {
    role: String,
    #[serde(default)]
    content: Option<Value>,
}

#[derive(Deserialize)]
struct ChatBody {
    #[serde(default)]
    model: Option<String>,
    messages: Vec<ChatMessage>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
    #[serde(default)]
    max_tokens: Option<u32>,
    #[serde(default)]
    max_completion_tokens: Option<u32>,
    #[serde(default)]
    n: Option<u32>,
}

#[derive(Deserialize)]
struct TextBody {
    #[serde(default)]
    model: Option<String>,
    prompt: Value,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
    #[serde(default)]
    max_tokens: Option<u32>,
    #[serde(default)]
    n: Option<u32>,
}

struct Parsed {
    model: Option<String>,
    tokens: Vec<u32>,
    stream: bool,
    include_usage: bool,
    max_tokens: Option<u32>,
    n: Option<u32>,
}

fn parse(kind: Kind, body: &[u8]) -> Result<Parsed, String> {
    match kind {
        Kind::Chat => {
            let b: ChatBody =
                serde_json::from_slice(body).map_err(|e| format!("invalid request body: {e}"))?;
            if b.messages.is_empty() {
                return Err("`messages` must not be empty".into());
            }
            let mut tokens = Vec::new();
            for m in &b.messages {
                push_message_head(&m.role, &mut tokens);
                match &m.content {
                    None | Some(Value::Null) => {}
                    Some(Value::String(s)) => tokenize_into(s, &mut tokens),
                    Some(Value::Array(parts)) => {
                        for p in parts {
                            match p.get("text").and_then(Value::as_str) {
                                Some(t) => tokenize_into(t, &mut tokens),
                                None => return Err("only text content parts are supported".into()),
                            }
                        }
                    }
                    Some(_) => return Err("`content` must be a string or an array of parts".into()),
                }
                push_message_end(&mut tokens);
            }
            push_message_head("assistant", &mut tokens);
            Ok(Parsed {
                model: b.model,
                tokens,
                stream: b.stream.unwrap_or(false),
                include_usage: b
                    .stream_options
                    .and_then(|o| o.include_usage)
                    .unwrap_or(false),
                max_tokens: b.max_completion_tokens.or(b.max_tokens),
                n: b.n,
            })
        }
        Kind::Text => {
            let b: TextBody =
                serde_json::from_slice(body).map_err(|e| format!("invalid request body: {e}"))?;
            let mut tokens = Vec::new();
            let one = match &b.prompt {
                Value::Array(items) if items.len() == 1 => &items[0],
                Value::Array(items) if items.iter().all(Value::is_u64) => &b.prompt,
                Value::Array(_) => return Err("batched prompts are not supported".into()),
                p => p,
            };
            match one {
                Value::String(s) => tokenize_into(s, &mut tokens),
                Value::Array(ids) => {
                    for id in ids {
                        match id.as_u64().and_then(|v| u32::try_from(v).ok()) {
                            Some(t) => tokens.push(t),
                            None => {
                                return Err(
                                    "`prompt` token ids must be unsigned 32-bit integers".into()
                                )
                            }
                        }
                    }
                }
                Value::Number(n) if n.is_u64() => tokens.push(n.as_u64().unwrap_or(0) as u32),
                _ => return Err("`prompt` must be a string or a list of token ids".into()),
            }
            Ok(Parsed {
                model: b.model,
                tokens,
                stream: b.stream.unwrap_or(false),
                include_usage: b
                    .stream_options
                    .and_then(|o| o.include_usage)
                    .unwrap_or(false),
                max_tokens: b.max_tokens,
                n: b.n,
            })
        }
    }
}

async fn completion(app: &App, req: Request<Incoming>, kind: Kind) -> Response<MockBody> {
    let body = match Limited::new(req.into_body(), MAX_BODY_BYTES)
        .collect()
        .await
    {
        Ok(b) => b.to_bytes(),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            return error_response(
                StatusCode::PAYLOAD_TOO_LARGE,
                "invalid_request_error",
                "request body too large",
            )
        }
        Err(_) => {
            return error_response(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "could not read the body",
            )
        }
    };
    let parsed = match parse(kind, &body) {
        Ok(p) => p,
        Err(msg) => return error_response(StatusCode::BAD_REQUEST, "invalid_request_error", &msg),
    };
    let served = &app.engine.config().model;
    if let Some(m) = &parsed.model {
        if m != served {
            return error_response(
                StatusCode::NOT_FOUND,
                "model_not_found",
                &format!("the model `{m}` does not exist (this replica serves `{served}`)"),
            );
        }
    }
    if parsed.n.unwrap_or(1) != 1 {
        return error_response(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "only n = 1 is supported",
        );
    }
    let prompt_tokens = parsed.tokens.len();
    let request = MockRequest {
        prompt: MockPrompt::Tokens(parsed.tokens),
        max_tokens: parsed.max_tokens,
        stream: parsed.stream,
        extensions: http::Extensions::new(),
    };
    let resp = match app.engine.submit(request) {
        Ok(r) => r,
        Err(e @ (MockError::InvalidRequest(_) | MockError::PromptTooLong { .. })) => {
            return error_response(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                &e.to_string(),
            )
        }
        Err(e) => {
            return error_response(
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                &e.to_string(),
            )
        }
    };
    let n = app.ids.fetch_add(1, Ordering::Relaxed);
    let id: Arc<str> = match kind {
        Kind::Chat => format!("chatcmpl-mock-{n}").into(),
        Kind::Text => format!("cmpl-mock-{n}").into(),
    };
    let meta = Meta {
        id,
        model: Arc::from(served.as_str()),
        created: unix_now(),
        kind,
    };
    if parsed.stream {
        let sse = SseBody {
            resp,
            meta,
            include_usage: parsed.include_usage,
            started: false,
            finished: false,
        };
        let mut r = Response::new(MockBody::Sse(Box::new(sse)));
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/event-stream"),
        );
        r.headers_mut()
            .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        return r;
    }
    let mut text = String::with_capacity(prompt_tokens.min(4096));
    let mut resp = resp;
    let usage = loop {
        match resp.next_event().await {
            Some(MockEvent::Token { text: t, .. }) => text.push_str(t),
            Some(MockEvent::Done(u)) => break u,
            None => {
                return error_response(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "server_error",
                    "the engine has stopped",
                )
            }
        }
    };
    let choice = match kind {
        Kind::Chat => json!({
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "logprobs": null,
            "finish_reason": usage.finish_reason.as_str(),
        }),
        Kind::Text => {
            json!({"index": 0, "text": text, "logprobs": null, "finish_reason": usage.finish_reason.as_str()})
        }
    };
    let object = if kind == Kind::Chat {
        "chat.completion"
    } else {
        "text_completion"
    };
    json_response(
        StatusCode::OK,
        &json!({
            "id": &*meta.id,
            "object": object,
            "created": meta.created,
            "model": &*meta.model,
            "choices": [choice],
            "usage": usage_json(&usage),
        }),
    )
}

fn usage_json(u: &MockUsage) -> Value {
    json!({
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": u.cached_tokens},
    })
}

struct Meta {
    id: Arc<str>,
    model: Arc<str>,
    created: u64,
    kind: Kind,
}

impl Meta {
    fn chunk(&self, delta_or_text: Value, finish: Option<&str>) -> Value {
        match self.kind {
            Kind::Chat => json!({
                "id": &*self.id,
                "object": "chat.completion.chunk",
                "created": self.created,
                "model": &*self.model,
                "choices": [{"index": 0, "delta": delta_or_text, "logprobs": null, "finish_reason": finish}],
            }),
            Kind::Text => json!({
                "id": &*self.id,
                "object": "text_completion",
                "created": self.created,
                "model": &*self.model,
                "choices": [{"index": 0, "text": delta_or_text, "logprobs": null, "finish_reason": finish}],
            }),
        }
    }

    fn empty_delta(&self) -> Value {
        match self.kind {
            Kind::Chat => json!({}),
            Kind::Text => json!(""),
        }
    }
}

fn sse(out: &mut Vec<u8>, v: &Value) {
    out.extend_from_slice(b"data: ");
    // Serialising a `Value` into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, v);
    out.extend_from_slice(b"\n\n");
}

/// The streamed body: one SSE event per token, then the finish chunk, the usage chunk if asked, and
/// `data: [DONE]`.
struct SseBody {
    resp: MockResponse,
    meta: Meta,
    include_usage: bool,
    started: bool,
    finished: bool,
}

impl SseBody {
    fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<Bytes>> {
        if self.finished {
            return Poll::Ready(None);
        }
        let event = match self.resp.poll_event(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(e) => e,
        };
        let mut out = Vec::with_capacity(256);
        // The role chunk goes out with the first token, as vLLM and SGLang send it: nothing
        // reaches the client before the prefill is done.
        if !self.started && self.meta.kind == Kind::Chat {
            sse(
                &mut out,
                &self
                    .meta
                    .chunk(json!({"role": "assistant", "content": ""}), None),
            );
        }
        self.started = true;
        match event {
            Some(MockEvent::Token { text, .. }) => {
                let delta = match self.meta.kind {
                    Kind::Chat => json!({"content": text}),
                    Kind::Text => json!(text),
                };
                sse(&mut out, &self.meta.chunk(delta, None));
                // One event per frame, so a client sees tokens as they are generated.
                Poll::Ready(Some(out.into()))
            }
            Some(MockEvent::Done(u)) => {
                sse(
                    &mut out,
                    &self
                        .meta
                        .chunk(self.meta.empty_delta(), Some(u.finish_reason.as_str())),
                );
                if self.include_usage {
                    let mut v = self.meta.chunk(self.meta.empty_delta(), None);
                    v["choices"] = json!([]);
                    v["usage"] = usage_json(&u);
                    sse(&mut out, &v);
                }
                out.extend_from_slice(b"data: [DONE]\n\n");
                self.finished = true;
                Poll::Ready(Some(out.into()))
            }
            None => {
                out.extend_from_slice(b"data: [DONE]\n\n");
                self.finished = true;
                Poll::Ready(Some(out.into()))
            }
        }
    }
}

/// Body of every mock response: a complete buffer or an SSE stream.
enum MockBody {
    Full(Option<Bytes>),
    Sse(Box<SseBody>),
}

impl MockBody {
    fn empty() -> Self {
        MockBody::Full(None)
    }
}

impl Body for MockBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.get_mut() {
            MockBody::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            MockBody::Sse(s) => s.poll_next(cx).map(|o| o.map(|b| Ok(Frame::data(b)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            MockBody::Full(b) => b.is_none(),
            MockBody::Sse(s) => s.finished,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            MockBody::Full(Some(b)) => SizeHint::with_exact(b.len() as u64),
            MockBody::Full(None) => SizeHint::with_exact(0),
            MockBody::Sse(_) => SizeHint::default(),
        }
    }
}

fn json_response(status: StatusCode, v: &Value) -> Response<MockBody> {
    let bytes = serde_json::to_vec(v).unwrap_or_default();
    let mut r = Response::new(MockBody::Full(Some(bytes.into())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

fn error_response(status: StatusCode, kind: &str, message: &str) -> Response<MockBody> {
    json_response(
        status,
        &json!({"error": {"message": message, "type": kind, "param": null, "code": status.as_u16()}}),
    )
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn models(app: &App) -> Value {
    let cfg = app.engine.config();
    json!({
        "object": "list",
        "data": [{
            "id": cfg.model,
            "object": "model",
            "created": unix_now(),
            "owned_by": "replica-router-mock",
            "root": cfg.model,
            "parent": null,
            "max_model_len": cfg.max_model_len,
        }],
    })
}

fn server_info(app: &App) -> Value {
    let cfg = app.engine.config();
    let s = app.engine.stats();
    json!({
        "model_path": cfg.model,
        "served_model_name": cfg.model,
        "tp_size": cfg.tp(),
        "dp_size": 1,
        "max_running_requests": cfg.max_num_seqs,
        "max_total_num_tokens": app.engine.kv_capacity(),
        "chunked_prefill_size": cfg.max_num_batched_tokens,
        "page_size": cfg.block_size(),
        "context_length": cfg.max_model_len,
        "num_running_reqs": s.running,
        "num_waiting_reqs": s.waiting,
        "version": "mock",
    })
}

fn model_info(app: &App) -> Value {
    let cfg = app.engine.config();
    json!({
        "model_path": cfg.model,
        "tokenizer_path": cfg.model,
        "is_generation": true,
        "served_model_name": cfg.model,
        "max_model_len": cfg.max_model_len,
    })
}

fn metrics(app: &App) -> Response<MockBody> {
    let s = app.engine.stats();
    let model = app
        .engine
        .config()
        .model
        .replace('\\', "\\\\")
        .replace('"', "\\\"");
    let mut out = String::with_capacity(2048);
    let mut put = |name: &str, kind: &str, help: &str, value: f64| {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
        let _ = writeln!(out, "{name}{{model_name=\"{model}\"}} {value:?}");
    };
    put(
        "vllm:num_requests_running",
        "gauge",
        "Number of requests in model execution batches.",
        s.running as f64,
    );
    put(
        "vllm:num_requests_waiting",
        "gauge",
        "Number of requests waiting to be processed.",
        s.waiting as f64,
    );
    put(
        "vllm:kv_cache_usage_perc",
        "gauge",
        "KV-cache usage. 1 means 100 percent usage.",
        s.kv_usage,
    );
    put(
        "vllm:gpu_cache_usage_perc",
        "gauge",
        "GPU KV-cache usage. 1 means 100 percent usage (older name).",
        s.kv_usage,
    );
    put(
        "vllm:prefix_cache_queries_total",
        "counter",
        "Prefix cache queries, in queried tokens.",
        s.prefix_queries as f64,
    );
    put(
        "vllm:prefix_cache_hits_total",
        "counter",
        "Prefix cache hits, in cached tokens.",
        s.prefix_hits as f64,
    );
    put(
        "vllm:prompt_tokens_total",
        "counter",
        "Number of prefill tokens processed.",
        s.prompt_tokens as f64,
    );
    put(
        "vllm:generation_tokens_total",
        "counter",
        "Number of generation tokens processed.",
        s.generation_tokens as f64,
    );
    put(
        "vllm:request_success_total",
        "counter",
        "Count of successfully processed requests.",
        s.finished as f64,
    );
    let mut r = Response::new(MockBody::Full(Some(Bytes::from(out))));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4"),
    );
    r
}
