//! The in-process engine: a scheduler task with continuous batching, chunked prefill and a prefix cache.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;

use super::cache::{block_hashes, PrefixCache};
use super::config::MockConfig;
use super::error::MockError;

/// What the engine must prefill: real tokens, or the block hashes that stand for them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MockPrompt {
    /// A prompt token list; its full blocks are hashed by chain (see [`block_hashes`]).
    Tokens(Vec<u32>),
    /// Precomputed chain hashes of the prompt's full blocks (of the engine's `block_size`), and the
    /// prompt length in tokens. Simulations use this to name a session's prefix without tokens.
    Blocks {
        /// Chain hashes of the full blocks, first block first.
        block_hashes: Vec<u64>,
        /// Prompt length in tokens (at least `block_hashes.len() * block_size` for a full match).
        prompt_tokens: u32,
    },
}

impl MockPrompt {
    /// Prompt length in tokens.
    pub fn len(&self) -> u32 {
        match self {
            MockPrompt::Tokens(t) => u32::try_from(t.len()).unwrap_or(u32::MAX),
            MockPrompt::Blocks { prompt_tokens, .. } => *prompt_tokens,
        }
    }

    /// Whether the prompt has no token.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A typed request to a [`MockEngine`].
///
/// It carries `http::Extensions` so the crate's layers can route it in-process (it implements
/// [`RouteRequest`](replica_router::request::RouteRequest)): put a
/// [`RouteContext`](replica_router::context::RouteContext) with the session key in `extensions`, and a
/// `Pool<MockEngine>` behind the stack simulates a cluster in virtual time.
#[derive(Debug, Clone)]
pub struct MockRequest {
    /// The prompt (its identity for the prefix cache, and its length).
    pub prompt: MockPrompt,
    /// Output tokens to generate; `None` generates the configured default and finishes with `stop`.
    pub max_tokens: Option<u32>,
    /// Streaming: the response future resolves at the first token (time to first token) rather than at
    /// the last.
    pub stream: bool,
    /// Routing state (route context, decision), as on an `http::Request`.
    pub extensions: http::Extensions,
}

impl MockRequest {
    /// A request for `prompt` generating `max_tokens` tokens, not streamed.
    pub fn new(prompt: MockPrompt, max_tokens: u32) -> Self {
        MockRequest {
            prompt,
            max_tokens: Some(max_tokens),
            stream: false,
            extensions: http::Extensions::new(),
        }
    }

    /// The same request with a route context (session key, estimated tokens, ...).
    pub fn with_context(mut self, ctx: replica_router::context::RouteContext) -> Self {
        self.extensions.insert(ctx);
        self
    }

    /// The same request, streamed.
    pub fn streamed(mut self) -> Self {
        self.stream = true;
        self
    }
}

/// Why a generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// The model ended its answer (the request gave no `max_tokens`).
    Stop,
    /// The request's `max_tokens` was reached.
    Length,
}

impl FinishReason {
    /// The OpenAI name (`stop`, `length`).
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

/// Accounting of one finished request, with its latencies in engine (tokio) time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MockUsage {
    /// Prompt length in tokens.
    pub prompt_tokens: u32,
    /// Prompt tokens served from the prefix cache (not prefilled).
    pub cached_tokens: u32,
    /// Generated tokens.
    pub completion_tokens: u32,
    /// Why the generation ended.
    pub finish_reason: FinishReason,
    /// Time spent in the waiting queue before joining the running batch.
    pub queued: Duration,
    /// Time from submission to the first generated token.
    pub ttft: Duration,
    /// Time from submission to the last generated token.
    pub e2e: Duration,
}

/// One event of a response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MockEvent {
    /// A generated token (`index` counts from 0); `text` starts with a space.
    Token {
        /// Position of the token in the output.
        index: u32,
        /// The token's text.
        text: &'static str,
    },
    /// The generation ended; always the last event.
    Done(MockUsage),
}

/// A snapshot of an engine's counters, as its `/metrics` reports them.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct MockStats {
    /// Sequences in the running batch.
    pub running: usize,
    /// Requests waiting to join the batch.
    pub waiting: usize,
    /// Fraction of the KV cache held by running sequences (0 to 1).
    pub kv_usage: f64,
    /// Prompt tokens looked up in the prefix cache.
    pub prefix_queries: u64,
    /// Prompt tokens found in the prefix cache.
    pub prefix_hits: u64,
    /// Prompt tokens of admitted requests.
    pub prompt_tokens: u64,
    /// Generated tokens.
    pub generation_tokens: u64,
    /// Requests that finished (all their tokens generated).
    pub finished: u64,
    /// Engine steps run.
    pub steps: u64,
    /// Time spent running engine steps (the engine is idle the rest of the time).
    pub busy_time: Duration,
    /// The time the steps' work would take at full-batch efficiency: each decoded token at the
    /// per-sequence cost of a batch of 256 (the speed table's saturation point), each prefilled
    /// token at the prefill rate. Over elapsed time it is the engine's compute utilization (a
    /// batch of one uses about 1% of the GPUs; a full batch, all of it).
    pub saturated_time: Duration,
}

/// The batch size at which the engine's step is taken as fully efficient (the reference point
/// of [`MockConfig::decode_step_batch256`]).
const SATURATION_BATCH: usize = 256;

#[derive(Debug, Default)]
struct Stats {
    running: AtomicUsize,
    waiting: AtomicUsize,
    kv_used: AtomicU64,
    prefix_queries: AtomicU64,
    prefix_hits: AtomicU64,
    prompt_tokens: AtomicU64,
    generation_tokens: AtomicU64,
    finished: AtomicU64,
    steps: AtomicU64,
    busy_nanos: AtomicU64,
    saturated_nanos: AtomicU64,
}

#[derive(Debug)]
struct Shared {
    cfg: MockConfig,
    kv_capacity: u64,
    stats: Stats,
}

/// A model of one LLM engine replica (vLLM-like), running in the current tokio runtime.
///
/// A scheduler task admits waiting requests into the running batch (FIFO, at most `max_num_seqs`, and
/// only while the KV cache has room), then runs engine steps: each step generates one token for every
/// decoding sequence and prefills chunks of the admitted prompts within `max_num_batched_tokens`, and
/// lasts `decode_step(batch) + prefill_time(prefill tokens)`. A prompt's leading blocks found in the
/// replica's prefix cache are not prefilled, which is why a returning session is faster on the replica
/// that served its earlier turns. All waits are `tokio::time` sleeps, so under a paused clock
/// (`#[tokio::test(start_paused = true)]`) the engine runs in virtual time, exactly.
///
/// `MockEngine` is a cheap-clone handle and a tower [`Service`](tower::Service) that never applies
/// back-pressure (the queue is the engine's). The scheduler task ends when every handle is dropped and
/// the last request has finished. A response whose receiver is dropped is cancelled and leaves the batch.
///
/// ```
/// use replica_router_mock::{MockConfig, MockEngine, MockPrompt, MockRequest};
/// use tower::ServiceExt;
///
/// # #[tokio::main(flavor = "current_thread", start_paused = true)]
/// # async fn main() {
/// let engine = MockEngine::new(MockConfig::default());
/// let req = MockRequest::new(MockPrompt::Tokens((0..2000).collect()), 8);
/// let usage = engine.clone().oneshot(req).await.unwrap().finish().await.unwrap();
/// assert_eq!(usage.completion_tokens, 8);
/// // 2000 tokens at 10k tok/s plus a 25 ms step: ~225 ms to the first token.
/// assert!(usage.ttft.as_millis() >= 200);
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct MockEngine {
    tx: mpsc::UnboundedSender<Seq>,
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Seq {
    id: u64,
    blocks: Vec<u64>,
    prompt_tokens: u32,
    cached_tokens: u32,
    prefill_left: u32,
    generated: u32,
    target: u32,
    finish: FinishReason,
    submitted: Instant,
    admitted: Option<Instant>,
    first_token: Option<Instant>,
    tx: mpsc::UnboundedSender<MockEvent>,
}

static NEXT_SEQ: AtomicU64 = AtomicU64::new(1);

impl MockEngine {
    /// Starts an engine (its scheduler task) on the current tokio runtime.
    ///
    /// # Panics
    /// Outside a tokio runtime (as `tokio::spawn` does).
    pub fn new(cfg: MockConfig) -> Self {
        let kv_capacity = cfg.kv_capacity();
        let shared = Arc::new(Shared {
            cfg,
            kv_capacity,
            stats: Stats::default(),
        });
        let (tx, rx) = mpsc::unbounded_channel();
        let cache = PrefixCache::new(
            (shared.cfg.prefix_cache_capacity() / u64::from(shared.cfg.block_size())) as usize,
        );
        tokio::spawn(scheduler(shared.clone(), rx, cache));
        MockEngine { tx, shared }
    }

    /// The engine's configuration.
    pub fn config(&self) -> &MockConfig {
        &self.shared.cfg
    }

    /// The KV cache capacity in tokens.
    pub fn kv_capacity(&self) -> u64 {
        self.shared.kv_capacity
    }

    /// A snapshot of the engine's counters.
    pub fn stats(&self) -> MockStats {
        let s = &self.shared.stats;
        let kv_used = s.kv_used.load(Ordering::Relaxed);
        MockStats {
            running: s.running.load(Ordering::Relaxed),
            waiting: s.waiting.load(Ordering::Relaxed),
            kv_usage: (kv_used as f64 / self.shared.kv_capacity.max(1) as f64).min(1.0),
            prefix_queries: s.prefix_queries.load(Ordering::Relaxed),
            prefix_hits: s.prefix_hits.load(Ordering::Relaxed),
            prompt_tokens: s.prompt_tokens.load(Ordering::Relaxed),
            generation_tokens: s.generation_tokens.load(Ordering::Relaxed),
            finished: s.finished.load(Ordering::Relaxed),
            steps: s.steps.load(Ordering::Relaxed),
            busy_time: Duration::from_nanos(s.busy_nanos.load(Ordering::Relaxed)),
            saturated_time: Duration::from_nanos(s.saturated_nanos.load(Ordering::Relaxed)),
        }
    }

    /// Submits a request; the returned response yields its events as the engine produces them.
    pub fn submit(&self, req: MockRequest) -> Result<MockResponse, MockError> {
        let cfg = &self.shared.cfg;
        let prompt_tokens = req.prompt.len();
        if prompt_tokens == 0 {
            return Err(MockError::InvalidRequest("the prompt is empty".into()));
        }
        let (target, finish) = match req.max_tokens {
            Some(0) => {
                return Err(MockError::InvalidRequest(
                    "max_tokens must be at least 1".into(),
                ))
            }
            Some(n) => (n, FinishReason::Length),
            None => (cfg.default_output_tokens.max(1), FinishReason::Stop),
        };
        let total = u64::from(prompt_tokens) + u64::from(target);
        if total > u64::from(cfg.max_model_len)
            || u64::from(prompt_tokens) > self.shared.kv_capacity
        {
            return Err(MockError::PromptTooLong {
                prompt_tokens,
                max_tokens: target,
                max_model_len: cfg
                    .max_model_len
                    .min(u32::try_from(self.shared.kv_capacity).unwrap_or(u32::MAX)),
            });
        }
        let bs = cfg.block_size();
        let full_blocks = (prompt_tokens / bs) as usize;
        let mut blocks = match req.prompt {
            MockPrompt::Tokens(t) => block_hashes(&t, bs),
            MockPrompt::Blocks { block_hashes, .. } => block_hashes,
        };
        blocks.truncate(full_blocks);
        let (etx, erx) = mpsc::unbounded_channel();
        let seq = Seq {
            id: NEXT_SEQ.fetch_add(1, Ordering::Relaxed),
            blocks,
            prompt_tokens,
            cached_tokens: 0,
            prefill_left: prompt_tokens,
            generated: 0,
            target,
            finish,
            submitted: Instant::now(),
            admitted: None,
            first_token: None,
            tx: etx,
        };
        self.shared.stats.waiting.fetch_add(1, Ordering::Relaxed);
        if self.tx.send(seq).is_err() {
            self.shared.stats.waiting.fetch_sub(1, Ordering::Relaxed);
            return Err(MockError::Stopped);
        }
        Ok(MockResponse {
            rx: erx,
            buffered: VecDeque::new(),
        })
    }
}

impl tower::Service<MockRequest> for MockEngine {
    type Response = MockResponse;
    type Error = MockError;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: MockRequest) -> Self::Future {
        let stream = req.stream;
        ResponseFuture {
            inner: Some(self.submit(req)),
            stream,
        }
    }
}

/// The events of one request, in order, ending with [`MockEvent::Done`].
///
/// Dropping it cancels the request (the sequence leaves the batch at the next step).
#[derive(Debug)]
pub struct MockResponse {
    rx: mpsc::UnboundedReceiver<MockEvent>,
    buffered: VecDeque<MockEvent>,
}

impl MockResponse {
    /// Polls for the next event; `Ready(None)` after [`MockEvent::Done`] (or if the engine vanished).
    pub fn poll_event(&mut self, cx: &mut Context<'_>) -> Poll<Option<MockEvent>> {
        if let Some(e) = self.buffered.pop_front() {
            return Poll::Ready(Some(e));
        }
        self.rx.poll_recv(cx)
    }

    /// The next event, or `None` once the response has ended.
    pub async fn next_event(&mut self) -> Option<MockEvent> {
        std::future::poll_fn(|cx| self.poll_event(cx)).await
    }

    /// Waits for the end of the generation and returns its accounting.
    pub async fn finish(mut self) -> Result<MockUsage, MockError> {
        while let Some(e) = self.next_event().await {
            if let MockEvent::Done(u) = e {
                return Ok(u);
            }
        }
        Err(MockError::Stopped)
    }
}

/// Future of [`MockEngine`]'s `Service::call`: resolves at the first token when streaming, at the last
/// one otherwise.
#[derive(Debug)]
pub struct ResponseFuture {
    inner: Option<Result<MockResponse, MockError>>,
    stream: bool,
}

impl Future for ResponseFuture {
    type Output = Result<MockResponse, MockError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        let resp = match this.inner.as_mut() {
            None => return Poll::Ready(Err(MockError::Stopped)),
            Some(Err(_)) => return Poll::Ready(this.inner.take().expect("checked")),
            Some(Ok(r)) => r,
        };
        loop {
            match resp.rx.poll_recv(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) => {
                    this.inner = None;
                    return Poll::Ready(Err(MockError::Stopped));
                }
                Poll::Ready(Some(e)) => {
                    let done = matches!(e, MockEvent::Done(_));
                    resp.buffered.push_back(e);
                    if done || this.stream {
                        return Poll::Ready(this.inner.take().expect("checked"));
                    }
                }
            }
        }
    }
}

const WORDS: [&str; 16] = [
    " the",
    " replica",
    " serves",
    " tokens",
    " from",
    " its",
    " cache",
    " while",
    " a",
    " batch",
    " of",
    " requests",
    " decodes",
    " in",
    " parallel",
    ".",
];

async fn scheduler(
    shared: Arc<Shared>,
    mut rx: mpsc::UnboundedReceiver<Seq>,
    mut cache: PrefixCache,
) {
    let cfg = &shared.cfg;
    let stats = &shared.stats;
    let bs = cfg.block_size();
    let max_seqs = cfg.max_num_seqs.max(1);
    let budget_per_step = cfg.max_num_batched_tokens.max(1);
    let mut waiting: VecDeque<Seq> = VecDeque::new();
    let mut running: Vec<Seq> = Vec::new();
    let mut open = true;
    loop {
        // Take every submission that has arrived; block only when there is nothing to do.
        loop {
            match rx.try_recv() {
                Ok(s) => waiting.push_back(s),
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => {
                    open = false;
                    break;
                }
            }
        }
        // Cancelled requests leave.
        let before = waiting.len();
        waiting.retain(|s| !s.tx.is_closed());
        stats
            .waiting
            .fetch_sub(before - waiting.len(), Ordering::Relaxed);
        running.retain(|s| !s.tx.is_closed());
        if running.is_empty() && waiting.is_empty() {
            stats.running.store(0, Ordering::Relaxed);
            stats.kv_used.store(0, Ordering::Relaxed);
            if !open {
                return;
            }
            match rx.recv().await {
                Some(s) => waiting.push_back(s),
                None => return,
            }
            continue;
        }
        // Admission: FIFO, bounded by max_num_seqs and by the KV cache.
        let mut kv_used: u64 = running
            .iter()
            .map(|s| u64::from(s.prompt_tokens) + u64::from(s.generated))
            .sum();
        while running.len() < max_seqs {
            let Some(front) = waiting.front() else { break };
            let need = u64::from(front.prompt_tokens);
            if !running.is_empty() && kv_used + need > shared.kv_capacity {
                break;
            }
            let mut s = waiting.pop_front().expect("front exists");
            stats.waiting.fetch_sub(1, Ordering::Relaxed);
            let hit_blocks = cache.lookup_and_touch(&s.blocks) as u64;
            // The last prompt token is always computed (its logits start the generation).
            let cached = (hit_blocks * u64::from(bs)).min(u64::from(s.prompt_tokens) - 1) as u32;
            s.cached_tokens = cached;
            s.prefill_left = s.prompt_tokens - cached;
            s.admitted = Some(Instant::now());
            stats
                .prefix_queries
                .fetch_add(u64::from(s.prompt_tokens), Ordering::Relaxed);
            stats
                .prefix_hits
                .fetch_add(u64::from(cached), Ordering::Relaxed);
            stats
                .prompt_tokens
                .fetch_add(u64::from(s.prompt_tokens), Ordering::Relaxed);
            kv_used += need;
            running.push(s);
        }
        stats.running.store(running.len(), Ordering::Relaxed);
        stats.kv_used.store(kv_used, Ordering::Relaxed);

        // Plan one step: every decoding sequence generates a token, prefills share the rest of the budget.
        let decoders = running.iter().filter(|s| s.prefill_left == 0).count() as u32;
        let mut budget = budget_per_step.saturating_sub(decoders);
        let mut prefill_tokens: u64 = 0;
        let mut chunks: Vec<u32> = Vec::with_capacity(running.len());
        let mut batch = decoders as usize;
        for s in &running {
            let chunk = if s.prefill_left > 0 {
                s.prefill_left.min(budget)
            } else {
                0
            };
            budget -= chunk;
            prefill_tokens += u64::from(chunk);
            if chunk > 0 {
                batch += 1;
            }
            chunks.push(chunk);
        }
        let prefill = cfg.prefill_time(prefill_tokens);
        let step = cfg.decode_step(batch) + prefill;
        tokio::time::sleep(step).await;
        stats.steps.fetch_add(1, Ordering::Relaxed);
        let saturated = cfg
            .decode_step(SATURATION_BATCH)
            .mul_f64(batch as f64 / SATURATION_BATCH as f64)
            .min(cfg.decode_step(batch))
            + prefill;
        stats.busy_nanos.fetch_add(nanos(step), Ordering::Relaxed);
        stats
            .saturated_nanos
            .fetch_add(nanos(saturated), Ordering::Relaxed);

        let now = Instant::now();
        let mut generated_now: u64 = 0;
        let mut i = 0;
        running.retain_mut(|s| {
            let chunk = chunks[i];
            i += 1;
            let emits = if s.prefill_left > 0 {
                s.prefill_left -= chunk;
                if s.prefill_left == 0 {
                    cache.insert(&s.blocks);
                    true
                } else {
                    false
                }
            } else {
                true
            };
            if !emits {
                return true;
            }
            if s.first_token.is_none() {
                s.first_token = Some(now);
            }
            let index = s.generated;
            s.generated += 1;
            generated_now += 1;
            let text = WORDS[((s.id + u64::from(index)) % WORDS.len() as u64) as usize];
            if s.tx.send(MockEvent::Token { index, text }).is_err() {
                return false;
            }
            if s.generated < s.target {
                return true;
            }
            let usage = MockUsage {
                prompt_tokens: s.prompt_tokens,
                cached_tokens: s.cached_tokens,
                completion_tokens: s.generated,
                finish_reason: s.finish,
                queued: s.admitted.unwrap_or(now) - s.submitted,
                ttft: s.first_token.unwrap_or(now) - s.submitted,
                e2e: now - s.submitted,
            };
            let _ = s.tx.send(MockEvent::Done(usage));
            stats.finished.fetch_add(1, Ordering::Relaxed);
            false
        });
        stats
            .generation_tokens
            .fetch_add(generated_now, Ordering::Relaxed);
        stats.running.store(running.len(), Ordering::Relaxed);
        let kv_used: u64 = running
            .iter()
            .map(|s| u64::from(s.prompt_tokens) + u64::from(s.generated))
            .sum();
        stats.kv_used.store(kv_used, Ordering::Relaxed);
    }
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}
