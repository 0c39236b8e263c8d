//! The synthetic chat workload: multi-turn sessions with a heavy-tailed long/short mix.

use std::sync::Arc;
use std::time::Duration;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

/// Parameters of the synthetic chat workload.
///
/// Sessions arrive as a Poisson process over [`arrival_window`](Self::arrival_window). Each one
/// belongs to a user drawn from a Zipf law (a few heavy users own many sessions) and starts with
/// that user's own prefix (system prompt and memory, shared by all of the user's sessions). A
/// share [`heavy_fraction`](Self::heavy_fraction) of the sessions are *heavy*: they begin with a
/// long pasted context (log-uniform in [`heavy_context`](Self::heavy_context)) and last many
/// turns; the rest are *light*: a few short turns. Message and answer lengths are log-normal,
/// think times exponential. Every turn sends the whole conversation so far plus the new
/// message, so its earlier turns are a prefix-cache hit only on a replica that served them.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkloadConfig {
    /// Sessions to generate.
    pub sessions: usize,
    /// Sessions arrive (Poisson) between 0 and this time.
    pub arrival_window: Duration,
    /// Distinct users the sessions belong to.
    pub users: usize,
    /// Zipf exponent of session ownership among users (0: uniform; 1: the top user owns about
    /// `1 / ln(users)` of the sessions).
    pub user_zipf: f64,
    /// Median tokens of a user's prefix (system prompt and memory), shared by the user's sessions.
    pub user_prefix_median: f64,
    /// Share of the sessions that are heavy (long context, many turns).
    pub heavy_fraction: f64,
    /// Range of a heavy session's initial context in tokens (log-uniform).
    pub heavy_context: (u32, u32),
    /// Range of a heavy session's turns (uniform, inclusive).
    pub heavy_turns: (u32, u32),
    /// Range of a light session's turns (uniform, inclusive).
    pub light_turns: (u32, u32),
    /// Median tokens of a user message in a light session.
    pub light_message_median: f64,
    /// Median tokens of a user message in a heavy session.
    pub heavy_message_median: f64,
    /// Median tokens of an answer.
    pub answer_median: f64,
    /// Longest answer in tokens.
    pub answer_max: u32,
    /// Mean think time between an answer and the next message.
    pub think_mean: Duration,
}

impl Default for WorkloadConfig {
    /// 960 sessions over 20 minutes (0.8 per second: what four TP=2 replicas of the default mock
    /// engine serve comfortably with cache-aware routing), 240 users (Zipf 1.0), 10% heavy
    /// sessions with 8k-32k tokens of context and 8-24 turns, light sessions of 2-6 turns, 8 s
    /// mean think time.
    fn default() -> Self {
        WorkloadConfig {
            sessions: 960,
            arrival_window: Duration::from_secs(1200),
            users: 240,
            user_zipf: 1.0,
            user_prefix_median: 600.0,
            heavy_fraction: 0.1,
            heavy_context: (8_000, 32_000),
            heavy_turns: (8, 24),
            light_turns: (2, 6),
            light_message_median: 80.0,
            heavy_message_median: 250.0,
            answer_median: 220.0,
            answer_max: 1024,
            think_mean: Duration::from_secs(8),
        }
    }
}

/// One turn of a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Turn {
    /// Prompt length in tokens (the whole conversation so far plus the new message).
    pub prompt_tokens: u32,
    /// Tokens of the answer.
    pub answer_tokens: u32,
    /// Think time before this turn is sent (zero for the first turn).
    pub think: Duration,
}

/// One planned session.
#[derive(Debug, Clone, PartialEq)]
pub struct SessionPlan {
    /// Session number (its key is `s<id>`).
    pub id: u32,
    /// Owning user (its key is `u<user>`).
    pub user: u32,
    /// Whether the session is heavy (long context, many turns).
    pub heavy: bool,
    /// When the session's first turn is sent.
    pub arrival: Duration,
    /// Its turns, in order.
    pub turns: Vec<Turn>,
    /// Chain hashes of every full block of the final conversation; turn `k` sends the first
    /// `turns[k].prompt_tokens / block_size` of them.
    pub blocks: Arc<[u64]>,
}

impl SessionPlan {
    /// The session key.
    pub fn session_key(&self) -> String {
        format!("s{}", self.id)
    }

    /// The user key.
    pub fn user_key(&self) -> String {
        format!("u{}", self.user)
    }
}

/// How a session's turns are paced: what [`Turn::think`] counts from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Pacing {
    /// The think time counts from the end of the previous answer (a closed loop: a slower
    /// policy also slows its clients down). The default chat workload.
    #[default]
    AfterAnswer,
    /// The think time counts from the previous turn's *planned* send time, so every turn has a
    /// fixed send time, as in a trace (an open loop: the offered load does not depend on the
    /// policy). A turn is still never sent before the previous answer has ended.
    FromSend,
}

/// A generated workload: the same for every policy compared on it.
#[derive(Debug, Clone, PartialEq)]
pub struct Workload {
    /// The sessions, by arrival time.
    pub sessions: Vec<SessionPlan>,
    /// Tokens per prefix-cache block the hashes were made for.
    pub block_size: u32,
    /// The configuration it was generated from.
    pub config: WorkloadConfig,
    /// The seed it was generated from.
    pub seed: u64,
    /// What [`Turn::think`] counts from.
    pub pacing: Pacing,
    /// The heavy-tailed generator's parameters when it made this workload (then only
    /// `sessions`, `users` and `arrival_window` of [`config`](Self::config) are meaningful);
    /// `None` for [`Workload::generate`]'s chat workload.
    pub heavy: Option<crate::sim::trace::HeavyConfig>,
}

impl Workload {
    /// Generates the workload of `config` from `seed`, with prefix-cache blocks of `block_size`
    /// tokens (the engines' block size).
    ///
    /// ```
    /// use replica_router_mock::sim::{Workload, WorkloadConfig};
    /// let cfg = WorkloadConfig { sessions: 50, ..WorkloadConfig::default() };
    /// let a = Workload::generate(&cfg, 7, 16);
    /// assert_eq!(a, Workload::generate(&cfg, 7, 16)); // deterministic by seed
    /// let s = &a.sessions[0];
    /// // Each turn's prompt extends the previous turn's prompt and answer.
    /// assert!(s.turns.windows(2).all(|t| t[1].prompt_tokens > t[0].prompt_tokens + t[0].answer_tokens));
    /// ```
    pub fn generate(config: &WorkloadConfig, seed: u64, block_size: u32) -> Workload {
        let mut rng = SmallRng::seed_from_u64(seed);
        let block_size = block_size.max(1);
        let users = config.users.max(1);
        let zipf = ZipfTable::new(users, config.user_zipf);
        let user_prefix: Vec<u32> = (0..users)
            .map(|_| {
                clamp_tokens(
                    lognormal(&mut rng, config.user_prefix_median, 0.6),
                    32,
                    8_000,
                )
            })
            .collect();
        let rate = config.sessions as f64 / config.arrival_window.as_secs_f64().max(1e-3);
        let mut t = 0.0;
        let mut sessions = Vec::with_capacity(config.sessions);
        for id in 0..config.sessions {
            t += exponential(&mut rng, 1.0 / rate);
            let user = zipf.sample(&mut rng);
            let heavy = rng.random::<f64>() < config.heavy_fraction;
            let mut conv = Conversation::new(block_size);
            // The user's prefix: the same tokens (so the same blocks) in each of their sessions.
            conv.push(owner(1, u64::from(user), 0), user_prefix[user as usize]);
            let (turns_range, message_median) = if heavy {
                let (lo, hi) = config.heavy_context;
                let ctx = loguniform(&mut rng, f64::from(lo.max(1)), f64::from(hi.max(lo).max(1)));
                conv.push(owner(2, id as u64, 0), ctx as u32);
                (config.heavy_turns, config.heavy_message_median)
            } else {
                (config.light_turns, config.light_message_median)
            };
            let n =
                rng.random_range(turns_range.0.max(1)..=turns_range.1.max(turns_range.0.max(1)));
            let mut turns = Vec::with_capacity(n as usize);
            for k in 0..n {
                let think = if k == 0 {
                    Duration::ZERO
                } else {
                    Duration::from_secs_f64(
                        exponential(&mut rng, config.think_mean.as_secs_f64()).max(0.5),
                    )
                };
                let message = clamp_tokens(lognormal(&mut rng, message_median, 0.9), 4, 8_000);
                conv.push(owner(3, id as u64, u64::from(k)), message);
                let answer = clamp_tokens(
                    lognormal(&mut rng, config.answer_median, 0.7),
                    8,
                    config.answer_max,
                );
                turns.push(Turn {
                    prompt_tokens: conv.len,
                    answer_tokens: answer,
                    think,
                });
                conv.push(owner(4, id as u64, u64::from(k)), answer);
            }
            sessions.push(SessionPlan {
                id: id as u32,
                user,
                heavy,
                arrival: Duration::from_secs_f64(t),
                turns,
                blocks: conv.blocks.into(),
            });
        }
        Workload {
            sessions,
            block_size,
            config: config.clone(),
            seed,
            pacing: Pacing::AfterAnswer,
            heavy: None,
        }
    }

    /// Total requests (turns) in the workload.
    pub fn requests(&self) -> usize {
        self.sessions.iter().map(|s| s.turns.len()).sum()
    }

    /// Total prompt tokens over all requests (what a cache-less cluster would prefill).
    pub fn prompt_tokens(&self) -> u64 {
        self.sessions
            .iter()
            .flat_map(|s| &s.turns)
            .map(|t| u64::from(t.prompt_tokens))
            .sum()
    }

    /// Total answer tokens over all requests.
    pub fn answer_tokens(&self) -> u64 {
        self.sessions
            .iter()
            .flat_map(|s| &s.turns)
            .map(|t| u64::from(t.answer_tokens))
            .sum()
    }
}

/// Builds a conversation's block chain hashes token by token.
pub(super) struct Conversation {
    block_size: u32,
    hash: u64,
    in_block: u32,
    pub(super) len: u32,
    pub(super) blocks: Vec<u64>,
}

impl Conversation {
    pub(super) fn new(block_size: u32) -> Self {
        Conversation {
            block_size,
            hash: 0x51D_C4A7,
            in_block: 0,
            len: 0,
            blocks: Vec::new(),
        }
    }

    /// Appends `n` tokens whose identity is (`owner`, position in the segment).
    pub(super) fn push(&mut self, owner: u64, n: u32) {
        for p in 0..n {
            self.hash = splitmix64(self.hash ^ splitmix64(owner.wrapping_add(u64::from(p))));
            self.in_block += 1;
            if self.in_block == self.block_size {
                self.blocks.push(self.hash);
                self.in_block = 0;
            }
        }
        self.len = self.len.saturating_add(n);
    }
}

/// A segment owner id: what the tokens belong to (user prefix, context, message, answer).
pub(super) fn owner(kind: u64, id: u64, index: u64) -> u64 {
    splitmix64(splitmix64(kind << 56 ^ id) ^ index.wrapping_mul(0x9E37_79B9_7F4A_7C15))
}

pub(super) fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

pub(super) fn clamp_tokens(x: f64, lo: u32, hi: u32) -> u32 {
    if x.is_finite() {
        (x.round() as u32).clamp(lo, hi.max(lo))
    } else {
        lo
    }
}

pub(super) fn exponential<R: Rng>(rng: &mut R, mean: f64) -> f64 {
    let u: f64 = rng.random();
    -mean * (1.0 - u).ln()
}

fn standard_normal<R: Rng>(rng: &mut R) -> f64 {
    // Box-Muller; one of the pair is enough here.
    let u1: f64 = 1.0 - rng.random::<f64>();
    let u2: f64 = rng.random();
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

pub(super) fn lognormal<R: Rng>(rng: &mut R, median: f64, sigma: f64) -> f64 {
    median * (sigma * standard_normal(rng)).exp()
}

pub(super) fn loguniform<R: Rng>(rng: &mut R, lo: f64, hi: f64) -> f64 {
    (lo.ln() + rng.random::<f64>() * (hi.ln() - lo.ln())).exp()
}

/// Inverse-CDF sampling of a Zipf law over `0..n`.
pub(super) struct ZipfTable {
    cdf: Vec<f64>,
}

impl ZipfTable {
    pub(super) fn new(n: usize, s: f64) -> Self {
        let s = if s.is_finite() { s.max(0.0) } else { 1.0 };
        let mut acc = 0.0;
        let cdf = (1..=n)
            .map(|k| {
                acc += 1.0 / (k as f64).powf(s);
                acc
            })
            .collect();
        ZipfTable { cdf }
    }

    pub(super) fn sample<R: Rng>(&self, rng: &mut R) -> u32 {
        let total = self.cdf.last().copied().unwrap_or(1.0);
        let x = rng.random::<f64>() * total;
        self.cdf
            .partition_point(|&c| c <= x)
            .min(self.cdf.len() - 1) as u32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompts_are_prefixes_and_users_share_their_prefix() {
        let cfg = WorkloadConfig {
            sessions: 300,
            users: 20,
            ..WorkloadConfig::default()
        };
        let w = Workload::generate(&cfg, 3, 16);
        assert_eq!(w.sessions.len(), 300);
        for s in &w.sessions {
            let last = s.turns.last().unwrap();
            assert!(s.blocks.len() as u32 >= last.prompt_tokens / 16);
            assert!(s.arrival <= cfg.arrival_window * 2);
        }
        // Two sessions of the same user share their first block (the user's prefix).
        let a = &w.sessions[0];
        let b = w.sessions[1..].iter().find(|s| s.user == a.user).unwrap();
        assert_eq!(a.blocks[0], b.blocks[0]);
        let c = w.sessions.iter().find(|s| s.user != a.user).unwrap();
        assert_ne!(a.blocks[0], c.blocks[0]);
        // The mix is long/short: some heavy sessions, most light.
        let heavy = w.sessions.iter().filter(|s| s.heavy).count();
        assert!((10..80).contains(&heavy), "{heavy}");
    }

    #[test]
    fn zipf_favours_low_ranks() {
        let z = ZipfTable::new(100, 1.0);
        let mut rng = SmallRng::seed_from_u64(1);
        let mut counts = [0u32; 100];
        for _ in 0..10_000 {
            counts[z.sample(&mut rng) as usize] += 1;
        }
        assert!(counts[0] > 5 * counts[50]);
        let flat = ZipfTable::new(4, 0.0);
        assert!(flat.sample(&mut rng) < 4);
    }
}
