//! How many requests per second a replica set can serve: offered load as a fraction of capacity.
//!
//! The capacity model follows the mock engine's speed model ([`MockConfig`]): with a speed-up
//! `s = tp_speedup()`, prefill runs at `P * s` tokens per second (`P` =
//! `prefill_tokens_per_sec`), an engine step over a batch of `b` sequences costs
//! `d(b) = (d1 + (b - 1) * delta) / s` (`d1` = `decode_step_batch1`, `delta` the per-sequence
//! slope up to `decode_step_batch256`) plus the prefill time of the step's chunk, and the KV
//! cache holds `K` tokens. For a replica receiving `lambda` requests per second with mean
//! uncached prompt tokens `u`, mean answer tokens `o` and mean prompt tokens `p`:
//!
//! - prefill utilisation `rho = lambda * u / (P * s)`: the share of engine time spent
//!   prefilling, so the mean step lasts `tau = d(b) / (1 - rho)`;
//! - a request stays in the batch for `o + u / C + 1/2` steps (`C` =
//!   `max_num_batched_tokens`: its answer tokens and its prefill chunks), so by Little's law
//!   the batch holds `N = lambda * (o + u / C + 1/2) * tau` sequences; since `b = N`, this
//!   is linear in `N`: with `a = lambda * (o + u / C + 1/2) / (s * (1 - rho))`,
//!   `N = a * (d1 - delta) / (1 - a * delta)`;
//! - each sequence holds about `p + o / 2` tokens of KV.
//!
//! The replica's capacity is the largest `lambda` with `rho < 1`, `a * delta < 1`,
//! `N <= max_num_seqs` and `N * (p + o / 2) <= K` (found by bisection). With the default
//! 70B-on-2xH100 engine and the heavy workload's ~10k-token prompts the KV bound is the one
//! that binds: long prompts and slow mixed steps keep many sequences resident. A pool's
//! capacity is the sum over its replicas (each at its own TP), the rate a perfectly balanced,
//! weight-aware router could offer.
//!
//! `u` counts the uncached prompt tokens a *perfect-cache* router would face
//! ([`WorkMix::perfect_cache`]): a request's longest block prefix sent earlier by any request is
//! cached (an infinite cluster-wide cache that keeps every prompt's blocks, as the mock caches
//! prompt blocks but not answer tokens), and the last prompt token is always computed. Real
//! policies prefill more, so they saturate before 100%: this is the yardstick, not a promise.

use std::collections::HashSet;
use std::time::Duration;

use crate::sim::scenario::Scenario;
use crate::sim::trace::HeavyConfig;
use crate::sim::workload::Workload;
use crate::MockConfig;

/// Per-request averages of a workload, for the capacity model.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WorkMix {
    /// Requests counted.
    pub requests: u64,
    /// Mean prompt tokens.
    pub prompt_tokens: f64,
    /// Mean prompt tokens a perfect-cache router would still prefill.
    pub uncached_tokens: f64,
    /// Mean answer tokens.
    pub answer_tokens: f64,
    /// Mean requests (turns) per session.
    pub turns_per_session: f64,
}

impl WorkMix {
    /// The averages of `workload`, with uncached tokens counted against an infinite shared
    /// cache of every earlier request's prompt blocks (requests taken in planned send order).
    ///
    /// ```
    /// use replica_router_mock::sim::{HeavyConfig, Workload, WorkMix};
    /// let w = Workload::heavy(&HeavyConfig { conversations: 300, ..HeavyConfig::default() }, 1, 16);
    /// let mix = WorkMix::perfect_cache(&w);
    /// assert!(mix.uncached_tokens < mix.prompt_tokens);
    /// assert_eq!(mix.requests as usize, w.requests());
    /// ```
    pub fn perfect_cache(workload: &Workload) -> WorkMix {
        let bs = workload.block_size.max(1);
        let mut order: Vec<(Duration, usize, usize)> = Vec::with_capacity(workload.requests());
        for (i, s) in workload.sessions.iter().enumerate() {
            let mut at = s.arrival;
            for (k, t) in s.turns.iter().enumerate() {
                at += t.think;
                order.push((at, i, k));
            }
        }
        order.sort_unstable();
        let mut seen: HashSet<u64> = HashSet::new();
        let (mut prompt, mut uncached, mut answer) = (0u64, 0u64, 0u64);
        for &(_, i, k) in &order {
            let s = &workload.sessions[i];
            let t = s.turns[k];
            let blocks = &s.blocks[..((t.prompt_tokens / bs) as usize).min(s.blocks.len())];
            let hit = blocks.iter().take_while(|b| seen.contains(b)).count() as u64;
            let cached = (hit * u64::from(bs)).min(u64::from(t.prompt_tokens.saturating_sub(1)));
            seen.extend(blocks.iter().copied());
            prompt += u64::from(t.prompt_tokens);
            uncached += u64::from(t.prompt_tokens) - cached;
            answer += u64::from(t.answer_tokens);
        }
        let n = order.len().max(1) as f64;
        WorkMix {
            requests: order.len() as u64,
            prompt_tokens: prompt as f64 / n,
            uncached_tokens: uncached as f64 / n,
            answer_tokens: answer as f64 / n,
            turns_per_session: order.len() as f64 / workload.sessions.len().max(1) as f64,
        }
    }
}

/// Requests per second one replica of `engine` (its `tp` included) can serve for `mix` (see the
/// [module docs](self) for the model); 0 when it cannot serve any.
///
/// ```
/// use replica_router_mock::MockConfig;
/// use replica_router_mock::sim::{replica_capacity, WorkMix};
/// let mix = WorkMix { requests: 1, prompt_tokens: 10_000.0, uncached_tokens: 5_000.0,
///                     answer_tokens: 340.0, turns_per_session: 1.7 };
/// let tp2 = replica_capacity(&MockConfig::default(), &mix);
/// let tp4 = replica_capacity(&MockConfig { tp: 4, ..MockConfig::default() }, &mix);
/// assert!(tp2 > 0.0 && tp2 < 2.0); // below the prefill bound of 10k / 5k = 2 per second
/// assert!(tp4 > 2.0 * tp2); // faster and with more KV
/// ```
pub fn replica_capacity(engine: &MockConfig, mix: &WorkMix) -> f64 {
    let s = engine.tp_speedup();
    let prefill = engine.prefill_time(1_000_000).as_secs_f64() / 1e6; // seconds per token
    let d1 = engine.decode_step(1).as_secs_f64() * s;
    let delta = (engine.decode_step(256).as_secs_f64() * s - d1).max(0.0) / 255.0;
    let chunk = f64::from(engine.max_num_batched_tokens.max(1));
    let kv = engine.kv_capacity() as f64;
    let max_seqs = engine.max_num_seqs.max(1) as f64;
    let (u, o, p) = (
        finite(mix.uncached_tokens).max(1.0),
        finite(mix.answer_tokens).max(1.0),
        finite(mix.prompt_tokens).max(1.0),
    );
    let held = p + o / 2.0;
    if prefill <= 0.0 || held > kv {
        return 0.0;
    }
    let steps = o + u / chunk + 0.5;
    let feasible = |lambda: f64| -> bool {
        let rho = lambda * u * prefill;
        if rho >= 1.0 {
            return false;
        }
        let a = lambda * steps / (s * (1.0 - rho));
        if a * delta >= 1.0 {
            return false;
        }
        let n = a * (d1 - delta).max(0.0) / (1.0 - a * delta);
        n <= max_seqs && n * held <= kv
    };
    // rho < 1 bounds lambda by the prefill rate.
    let (mut lo, mut hi) = (0.0, 1.0 / (u * prefill));
    for _ in 0..100 {
        let mid = 0.5 * (lo + hi);
        if feasible(mid) {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    lo
}

/// Requests per second `scenario`'s replicas can serve for `mix`: the sum of
/// [`replica_capacity`] over them, each at its own TP.
pub fn pool_capacity(scenario: &Scenario, mix: &WorkMix) -> f64 {
    scenario
        .replicas
        .iter()
        .map(|r| {
            replica_capacity(
                &MockConfig {
                    tp: r.tp,
                    ..scenario.engine.clone()
                },
                mix,
            )
        })
        .sum()
}

fn finite(x: f64) -> f64 {
    if x.is_finite() {
        x
    } else {
        0.0
    }
}

/// Why an offered load could not be set.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum LoadError {
    /// The load fraction is not a positive finite number.
    #[error("the offered load must be a positive fraction of capacity, not {0}")]
    InvalidLoad(f64),
    /// The scenario cannot serve the workload at all (no replicas, or prompts beyond the KV
    /// cache).
    #[error("the scenario has no capacity for this workload")]
    NoCapacity,
}

/// Conversations of the pilot workload that estimates a configuration's [`WorkMix`].
const PILOT_CONVERSATIONS: usize = 3000;

impl HeavyConfig {
    /// This configuration with as many conversations over its arrival window as offer `load`
    /// (a fraction: 0.8 is 80%) of `scenario`'s capacity ([`pool_capacity`]).
    ///
    /// The mix is estimated on a pilot workload of 3000 conversations drawn from `seed`, so
    /// the request rate is exactly proportional to `load`: the offered request rate is
    /// `load * capacity`, i.e. `load * capacity / turns_per_session` new conversations per
    /// second.
    ///
    /// ```
    /// use replica_router_mock::sim::{HeavyConfig, Scenario};
    /// let s = Scenario::homogeneous(4);
    /// let half = HeavyConfig::default().at_load(0.5, &s, 1).unwrap();
    /// let full = HeavyConfig::default().at_load(1.0, &s, 1).unwrap();
    /// assert!(full.conversations.abs_diff(2 * half.conversations) <= 1);
    /// assert!(HeavyConfig::default().at_load(-1.0, &s, 1).is_err());
    /// ```
    pub fn at_load(&self, load: f64, scenario: &Scenario, seed: u64) -> Result<Self, LoadError> {
        if !(load.is_finite() && load > 0.0) {
            return Err(LoadError::InvalidLoad(load));
        }
        if scenario.replicas.is_empty() {
            return Err(LoadError::NoCapacity);
        }
        let mix = self.mix(scenario, seed);
        let capacity = pool_capacity(scenario, &mix);
        if capacity <= 0.0 || mix.turns_per_session <= 0.0 {
            return Err(LoadError::NoCapacity);
        }
        let per_sec = load * capacity / mix.turns_per_session;
        let conversations = (per_sec * self.arrival_window.as_secs_f64()).round();
        Ok(HeavyConfig {
            conversations: conversations.clamp(1.0, 1e8) as usize,
            ..self.clone()
        })
    }

    /// The per-request averages of this configuration (on a pilot workload from `seed`, with
    /// `scenario`'s block size).
    pub fn mix(&self, scenario: &Scenario, seed: u64) -> WorkMix {
        let pilot = HeavyConfig {
            conversations: PILOT_CONVERSATIONS,
            ..self.clone()
        };
        WorkMix::perfect_cache(&Workload::heavy(
            &pilot,
            seed ^ 0x9110_7000,
            scenario.engine.block_size(),
        ))
    }
}
