//! A heavy-tailed chat workload built from published trace statistics, and its JSONL export.
//!
//! [`HeavyConfig`] describes it and [`Workload::heavy`] generates it; [`Workload::trace`] lists
//! its requests as [`TraceRecord`]s (the Mooncake trace fields plus session, turn and block
//! size), [`write_trace`] / [`read_trace`] move them through JSON Lines.

use std::collections::HashMap;
use std::io::{BufRead, Write};
use std::time::Duration;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use crate::sim::workload::{
    clamp_tokens, exponential, lognormal, loguniform, owner, Conversation, Pacing, SessionPlan,
    Turn, Workload, WorkloadConfig, ZipfTable,
};

/// Bursts of the arrival rate: a two-state Markov-modulated Poisson process.
///
/// The rate alternates between a calm state and a burst state `factor` times as fast; each state
/// lasts an exponential time of its mean. The calm rate is chosen so that the long-run mean rate
/// is the workload's nominal rate.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Burst {
    /// Burst rate over calm rate.
    pub factor: f64,
    /// Mean length of a calm period.
    pub calm_mean: Duration,
    /// Mean length of a burst.
    pub burst_mean: Duration,
}

impl Burst {
    /// Long-run mean rate over the calm rate.
    fn mean_multiplier(&self) -> f64 {
        let (c, b) = (self.calm_mean.as_secs_f64(), self.burst_mean.as_secs_f64());
        let f = if self.factor.is_finite() && self.factor > 0.0 {
            self.factor
        } else {
            1.0
        };
        if c + b <= 0.0 {
            return 1.0;
        }
        (c + b * f) / (c + b)
    }
}

/// Parameters of the heavy-tailed chat workload ([`Workload::heavy`]).
///
/// New conversations arrive as a Poisson process whose rate has bursts ([`Burst`]); about 60%
/// of the requests start a new conversation and the rest are follow-up turns of earlier ones.
/// A new conversation's prompt is one of a few shared system prompts (Zipf popularity) and a
/// first user message; a follow-up turn comes 1-5 minutes after the previous one and sends the
/// whole conversation so far (system prompt, earlier messages and answers) plus a new message,
/// so its earlier turns are a prefix-cache hit only on a replica that served them. Prompts are
/// named by the same 16-token chain hashes as [`Workload::generate`]'s, so equal prefixes share
/// blocks in the engines' caches.
///
/// Where the numbers come from (approximate published figures, not fitted here):
/// - Prompt lengths: the issue's figures for real chat traces (mean ~10-12k tokens, a tail past
///   100k; Mooncake's FAST'25 paper reports averages of this size for its conversation and
///   tool/agent traces, and its synthetic trace description mixes long-document turns of up to
///   ~128k). A log-normal first message with median 2.5k tokens and `sigma = 1.5` plus a
///   500-4k system prompt gives first turns of mean ~9-10k (about 1% above 100k); follow-ups
///   add the history, so the request mean is ~10-11k. Every prompt is clamped to 200..120k.
/// - New-conversation share ~60% (`follow_up_probability = 0.4`: geometric turns, mean 1.67):
///   the issue's figure; Azure's 2023 conversation trace and Mooncake's conversation trace both
///   show most requests without reusable history beyond a shared prefix.
/// - Shared system prompts: a handful (8, Zipf 1.0) of 500-4k tokens (log-uniform), the range
///   of production assistant/tool prompts.
/// - Follow-up gaps uniform in 1-5 minutes: the issue's figure (human think time between turns
///   in chat; far longer than a request's latency, so the KV of a conversation must survive
///   minutes of other traffic to be reused).
/// - Answers log-normal, median 250 tokens, `sigma = 0.8` (mean ~340), at most 2048: Azure's
///   2023/2024 conversation traces (median output a few hundred tokens, long tail) and
///   Mooncake's reported mean output of a few hundred tokens.
/// - Bursts: calm periods of mean 4 minutes, bursts of mean 40 s at 2.5x (Azure 2024 and
///   BurstGPT describe diurnal and minute-scale bursts of 2-3x over the mean).
#[derive(Debug, Clone, PartialEq)]
pub struct HeavyConfig {
    /// New conversations to generate.
    pub conversations: usize,
    /// New conversations arrive over this window (their long-run rate is
    /// `conversations / arrival_window`); follow-up turns may come later.
    pub arrival_window: Duration,
    /// Distinct users owning the conversations (their key is `u<n>`).
    pub users: usize,
    /// Zipf exponent of conversation ownership among users.
    pub user_zipf: f64,
    /// Number of shared system prompts.
    pub system_prompts: usize,
    /// Zipf exponent of system-prompt popularity.
    pub system_zipf: f64,
    /// Range of a system prompt's length in tokens (log-uniform).
    pub system_tokens: (u32, u32),
    /// Median tokens of a conversation's first user message.
    pub first_message_median: f64,
    /// Log-normal `sigma` of the first user message.
    pub first_message_sigma: f64,
    /// Every prompt's length is kept in this range (a conversation whose next turn would pass
    /// the upper end ends instead).
    pub prompt_tokens: (u32, u32),
    /// Probability that a conversation has one more turn (geometric number of turns).
    pub follow_up_probability: f64,
    /// Most turns of a conversation.
    pub max_turns: u32,
    /// Median tokens of a follow-up message.
    pub follow_up_median: f64,
    /// Log-normal `sigma` of a follow-up message.
    pub follow_up_sigma: f64,
    /// Range of the gap between a turn's send time and the next one's (uniform).
    pub follow_up_gap: (Duration, Duration),
    /// Median tokens of an answer.
    pub answer_median: f64,
    /// Log-normal `sigma` of an answer.
    pub answer_sigma: f64,
    /// Longest answer in tokens.
    pub answer_max: u32,
    /// Bursts of the arrival rate; `None` is a plain Poisson process.
    pub burst: Option<Burst>,
}

impl Default for HeavyConfig {
    /// 1200 conversations over 20 minutes (1 per second), 400 users (Zipf 1.0), and the
    /// distributions documented on [`HeavyConfig`]. Use [`HeavyConfig::at_load`] to set the
    /// rate as a fraction of a scenario's capacity.
    fn default() -> Self {
        HeavyConfig {
            conversations: 1200,
            arrival_window: Duration::from_secs(1200),
            users: 400,
            user_zipf: 1.0,
            system_prompts: 8,
            system_zipf: 1.0,
            system_tokens: (500, 4000),
            first_message_median: 2500.0,
            first_message_sigma: 1.5,
            prompt_tokens: (200, 120_000),
            follow_up_probability: 0.4,
            max_turns: 8,
            follow_up_median: 300.0,
            follow_up_sigma: 1.0,
            follow_up_gap: (Duration::from_secs(60), Duration::from_secs(300)),
            answer_median: 250.0,
            answer_sigma: 0.8,
            answer_max: 2048,
            burst: Some(Burst {
                factor: 2.5,
                calm_mean: Duration::from_secs(240),
                burst_mean: Duration::from_secs(40),
            }),
        }
    }
}

/// Segment kinds of the heavy workload's conversations (distinct from the chat workload's).
const SYSTEM: u64 = 5;
const FIRST: u64 = 6;
const MESSAGE: u64 = 7;
const ANSWER: u64 = 8;

/// Sessions whose first prompt is at least this long count as heavy in [`SessionPlan::heavy`].
pub const LONG_PROMPT_TOKENS: u32 = 32_000;

impl Workload {
    /// Generates the heavy-tailed workload of `config` from `seed`, with prefix-cache blocks of
    /// `block_size` tokens (the engines' block size). Its turns are paced from their planned
    /// send times ([`Pacing::FromSend`]).
    ///
    /// ```
    /// use replica_router_mock::sim::{HeavyConfig, Workload};
    /// let cfg = HeavyConfig { conversations: 200, ..HeavyConfig::default() };
    /// let w = Workload::heavy(&cfg, 7, 16);
    /// assert_eq!(w, Workload::heavy(&cfg, 7, 16)); // deterministic by seed
    /// assert_eq!(w.sessions.len(), 200);
    /// let requests = w.requests() as f64;
    /// // About 60% of the requests start a conversation.
    /// assert!((0.5..0.7).contains(&(200.0 / requests)));
    /// ```
    pub fn heavy(config: &HeavyConfig, seed: u64, block_size: u32) -> Workload {
        let mut rng = SmallRng::seed_from_u64(seed);
        let block_size = block_size.max(1);
        let (sys_lo, sys_hi) = (
            config.system_tokens.0.max(1),
            config.system_tokens.1.max(config.system_tokens.0.max(1)),
        );
        let system_len: Vec<u32> = (0..config.system_prompts.max(1))
            .map(|_| loguniform(&mut rng, f64::from(sys_lo), f64::from(sys_hi)).round() as u32)
            .collect();
        let system_zipf = ZipfTable::new(system_len.len(), config.system_zipf);
        let users = config.users.max(1);
        let user_zipf = ZipfTable::new(users, config.user_zipf);
        let (lo, hi) = (
            config.prompt_tokens.0.max(1),
            config.prompt_tokens.1.max(config.prompt_tokens.0.max(1)),
        );
        let (gap_lo, gap_hi) = (
            config.follow_up_gap.0.as_secs_f64(),
            config
                .follow_up_gap
                .1
                .as_secs_f64()
                .max(config.follow_up_gap.0.as_secs_f64()),
        );
        let p_more = if config.follow_up_probability.is_finite() {
            config.follow_up_probability.clamp(0.0, 1.0)
        } else {
            0.0
        };
        let mut arrivals = Arrivals::new(config);
        let mut sessions = Vec::with_capacity(config.conversations);
        for id in 0..config.conversations {
            let arrival = arrivals.next(&mut rng);
            let user = user_zipf.sample(&mut rng);
            let system = system_zipf.sample(&mut rng);
            let mut conv = Conversation::new(block_size);
            let sys = system_len[system as usize];
            conv.push(owner(SYSTEM, u64::from(system), 0), sys);
            let first = clamp_tokens(
                lognormal(
                    &mut rng,
                    config.first_message_median,
                    config.first_message_sigma,
                ),
                1,
                hi,
            );
            let total = clamp_tokens(f64::from(sys) + f64::from(first), lo, hi);
            conv.push(owner(FIRST, id as u64, 0), total.saturating_sub(sys).max(1));
            let mut turns = Vec::new();
            let mut think = Duration::ZERO;
            loop {
                let answer = clamp_tokens(
                    lognormal(&mut rng, config.answer_median, config.answer_sigma),
                    1,
                    config.answer_max.max(1),
                );
                let k = turns.len() as u64;
                turns.push(Turn {
                    prompt_tokens: conv.len,
                    answer_tokens: answer,
                    think,
                });
                if turns.len() as u32 >= config.max_turns.max(1) || rng.random::<f64>() >= p_more {
                    break;
                }
                let message = clamp_tokens(
                    lognormal(&mut rng, config.follow_up_median, config.follow_up_sigma),
                    1,
                    hi,
                );
                if u64::from(conv.len) + u64::from(answer) + u64::from(message) > u64::from(hi) {
                    // The context is full: the conversation ends here.
                    break;
                }
                conv.push(owner(ANSWER, id as u64, k), answer);
                conv.push(owner(MESSAGE, id as u64, k + 1), message);
                think = Duration::from_secs_f64(gap_lo + rng.random::<f64>() * (gap_hi - gap_lo));
            }
            sessions.push(SessionPlan {
                id: id as u32,
                user,
                heavy: turns[0].prompt_tokens >= LONG_PROMPT_TOKENS,
                arrival,
                turns,
                blocks: conv.blocks.into(),
            });
        }
        Workload {
            sessions,
            block_size,
            config: WorkloadConfig {
                sessions: config.conversations,
                arrival_window: config.arrival_window,
                users,
                ..WorkloadConfig::default()
            },
            seed,
            pacing: Pacing::FromSend,
            heavy: Some(config.clone()),
        }
    }

    /// Every request of the workload in planned send order, as trace records whose prompts are
    /// named by `block_tokens`-token blocks (Mooncake's traces use 512).
    ///
    /// A record's `hash_ids` has one id per `block_tokens` tokens of its prompt, the last one
    /// possibly partial (as in Mooncake's traces: `ceil(input_length / block_tokens)` ids).
    /// Equal ids name equal content *and* equal prefix: a full block's id is derived from the
    /// workload's chain hash at its end, renumbered densely from 0 in order of first
    /// appearance; a partial last block gets an id of its own that no other record shares.
    ///
    /// A turn's timestamp is its planned send time: exact for [`Pacing::FromSend`]; for
    /// [`Pacing::AfterAnswer`] it is the session's arrival plus its think times (the time spent
    /// waiting for answers is left out).
    ///
    /// Fails with [`TraceError::BlockTokens`] unless `block_tokens` is a positive multiple of
    /// the workload's block size.
    ///
    /// ```
    /// use replica_router_mock::sim::{HeavyConfig, Workload};
    /// let w = Workload::heavy(&HeavyConfig { conversations: 20, ..HeavyConfig::default() }, 1, 16);
    /// let trace = w.trace(512).unwrap();
    /// assert_eq!(trace.len(), w.requests());
    /// let r = &trace[0];
    /// assert_eq!(r.hash_ids.len() as u32, r.input_length.div_ceil(512));
    /// assert!(w.trace(500).is_err()); // not a multiple of 16
    /// ```
    pub fn trace(&self, block_tokens: u32) -> Result<Vec<TraceRecord>, TraceError> {
        let bs = self.block_size.max(1);
        if block_tokens == 0 || !block_tokens.is_multiple_of(bs) {
            return Err(TraceError::BlockTokens {
                export: block_tokens,
                workload: bs,
            });
        }
        let per = (block_tokens / bs) as usize;
        let mut planned: Vec<(Duration, &SessionPlan, usize)> = Vec::with_capacity(self.requests());
        for s in &self.sessions {
            let mut at = s.arrival;
            for (k, t) in s.turns.iter().enumerate() {
                at += t.think;
                planned.push((at, s, k));
            }
        }
        planned.sort_by_key(|&(at, s, k)| (at, s.id, k));
        let mut ids: HashMap<u64, u64> = HashMap::new();
        let mut next_id = 0u64;
        let mut out = Vec::with_capacity(planned.len());
        for (at, s, k) in planned {
            let t = s.turns[k];
            let n = t.prompt_tokens.div_ceil(block_tokens) as usize;
            let mut hash_ids = Vec::with_capacity(n);
            for b in 0..n {
                let end = (b + 1) * per;
                let full = (b as u64 + 1) * u64::from(block_tokens) <= u64::from(t.prompt_tokens);
                let id = match s.blocks.get(end - 1) {
                    Some(&h) if full => *ids.entry(h).or_insert_with(|| {
                        next_id += 1;
                        next_id - 1
                    }),
                    _ => {
                        next_id += 1;
                        next_id - 1
                    }
                };
                hash_ids.push(id);
            }
            out.push(TraceRecord {
                timestamp: at.as_secs_f64() * 1000.0,
                session: s.session_key(),
                turn: k as u32,
                input_length: t.prompt_tokens,
                output_length: t.answer_tokens,
                block_tokens,
                hash_ids,
            });
        }
        Ok(out)
    }
}

/// Arrival times of new conversations: Poisson, modulated by [`Burst`].
struct Arrivals {
    t: f64,
    calm_rate: f64,
    burst: Option<Burst>,
    in_burst: bool,
    state_end: f64,
    started: bool,
}

impl Arrivals {
    fn new(config: &HeavyConfig) -> Self {
        let rate = config.conversations as f64 / config.arrival_window.as_secs_f64().max(1e-3);
        let burst = config.burst.filter(|b| {
            b.factor.is_finite()
                && b.factor > 0.0
                && !b.calm_mean.is_zero()
                && !b.burst_mean.is_zero()
        });
        let calm_rate = rate / burst.map_or(1.0, |b| b.mean_multiplier());
        Arrivals {
            t: 0.0,
            calm_rate: calm_rate.max(1e-12),
            burst,
            in_burst: false,
            state_end: f64::INFINITY,
            started: false,
        }
    }

    fn next<R: Rng>(&mut self, rng: &mut R) -> Duration {
        if !self.started {
            self.started = true;
            if let Some(b) = self.burst {
                self.state_end = exponential(rng, b.calm_mean.as_secs_f64());
            }
        }
        // Unit-rate exponential work, spent at the current state's rate.
        let mut e = exponential(rng, 1.0);
        loop {
            let rate = match (self.burst, self.in_burst) {
                (Some(b), true) => self.calm_rate * b.factor,
                _ => self.calm_rate,
            };
            let left = self.state_end - self.t;
            if e <= rate * left {
                self.t += e / rate;
                break;
            }
            e -= rate * left;
            self.t = self.state_end;
            let Some(b) = self.burst else { break };
            self.in_burst = !self.in_burst;
            let mean = if self.in_burst {
                b.burst_mean
            } else {
                b.calm_mean
            };
            self.state_end = self.t + exponential(rng, mean.as_secs_f64());
        }
        Duration::from_secs_f64(self.t.clamp(0.0, 1e9))
    }
}

/// One request of a trace: Mooncake's trace fields plus the session, the turn and the block
/// size. Serialised as one JSON object per line by [`write_trace`].
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TraceRecord {
    /// Planned send time in milliseconds since the start of the trace.
    pub timestamp: f64,
    /// The session (conversation) key.
    pub session: String,
    /// The turn within the session, from 0.
    pub turn: u32,
    /// Prompt tokens.
    pub input_length: u32,
    /// Answer tokens.
    pub output_length: u32,
    /// Tokens named by each of `hash_ids` (the last one may be partial).
    pub block_tokens: u32,
    /// The prompt's block chain ids: equal ids name equal content with an equal prefix.
    pub hash_ids: Vec<u64>,
}

/// Why a trace could not be written or read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TraceError {
    /// The export block size is not a positive multiple of the workload's block size.
    #[error("export blocks of {export} tokens are not a multiple of the workload's {workload}-token blocks")]
    BlockTokens {
        /// The requested export block size.
        export: u32,
        /// The workload's block size.
        workload: u32,
    },
    /// Reading or writing failed.
    #[error("trace i/o: {0}")]
    Io(#[from] std::io::Error),
    /// A line is not a trace record.
    #[error("trace line {line}: {source}")]
    Json {
        /// The 1-based line number.
        line: usize,
        /// What the JSON parser said.
        source: serde_json::Error,
    },
}

/// Writes `records` as JSON Lines, one record per line.
///
/// ```
/// use replica_router_mock::sim::{read_trace, write_trace, HeavyConfig, Workload};
/// let w = Workload::heavy(&HeavyConfig { conversations: 10, ..HeavyConfig::default() }, 1, 16);
/// let records = w.trace(512).unwrap();
/// let mut buf = Vec::new();
/// write_trace(&mut buf, &records).unwrap();
/// let back = read_trace(&buf[..]).unwrap();
/// assert_eq!(back.len(), records.len());
/// assert_eq!(back[3].hash_ids, records[3].hash_ids);
/// assert!((back[3].timestamp - records[3].timestamp).abs() < 1e-6);
/// ```
pub fn write_trace<W: Write>(mut out: W, records: &[TraceRecord]) -> Result<(), TraceError> {
    for (i, r) in records.iter().enumerate() {
        serde_json::to_writer(&mut out, r).map_err(|source| TraceError::Json {
            line: i + 1,
            source,
        })?;
        out.write_all(b"\n")?;
    }
    out.flush()?;
    Ok(())
}

/// Reads JSON Lines trace records (blank lines are skipped).
pub fn read_trace<R: BufRead>(input: R) -> Result<Vec<TraceRecord>, TraceError> {
    let mut out = Vec::new();
    for (i, line) in input.lines().enumerate() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        out.push(
            serde_json::from_str(&line).map_err(|source| TraceError::Json {
                line: i + 1,
                source,
            })?,
        );
    }
    Ok(out)
}

/// The [`describe`](crate::sim::describe) line of a heavy workload.
pub(super) fn describe_heavy(workload: &Workload) -> String {
    let requests = workload.requests();
    let window = workload.config.arrival_window.as_secs_f64().max(1e-9);
    let long = workload.sessions.iter().filter(|s| s.heavy).count();
    let mean_prompt = workload.prompt_tokens() as f64 / requests.max(1) as f64;
    format!(
        "Workload (heavy-tailed): {} conversations ({:.2}/s, {} with a first prompt of 32k+ tokens) \
         over {} s, {} requests ({:.0}% new conversations), mean prompt {:.1}k tokens, \
         {:.1} M prompt tokens, {:.2} M answer tokens; workload seed {}.",
        workload.sessions.len(),
        workload.sessions.len() as f64 / window,
        long,
        workload.config.arrival_window.as_secs(),
        requests,
        100.0 * workload.sessions.len() as f64 / requests.max(1) as f64,
        mean_prompt / 1000.0,
        workload.prompt_tokens() as f64 / 1e6,
        workload.answer_tokens() as f64 / 1e6,
        workload.seed,
    )
}
