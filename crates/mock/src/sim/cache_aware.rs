//! A reference policy: SGLang's cache-aware router, rebuilt over the simulation's block hashes.
//!
//! Written from the published description of `sglang-router`'s `cache_aware` policy (its
//! README and launch options, and the policy's source comments): the router keeps an
//! *approximate* radix tree of the prompts it has sent to each worker (what it routed, not what
//! the engine actually cached), and for each request
//!
//! 1. if the load is imbalanced — `max - min > balance_abs_threshold` **and**
//!    `max > min * balance_rel_threshold`, over the workers' requests in flight as the router
//!    counts them — it sends the request to the shortest queue;
//! 2. otherwise it finds the worker whose tree matches the longest prefix of the prompt; if
//!    the match covers more than `cache_threshold` of the prompt it sends it there,
//! 3. else to the worker with the smallest tree (the most cache room).
//!
//! Either way the prompt is inserted into the chosen worker's tree. Trees are bounded
//! (`max_tree_size`, in characters in SGLang) and evict their least recently used leaves. The
//! policy reads only the prompt: it ignores session and user keys, so it works the same on
//! keyed and keyless traffic. It ignores capacity weights too, as SGLang's does.
//!
//! Differences from SGLang, all forced by the simulation or harmless:
//! - the tree is over the prompt's chain-hashed blocks ([`MockPrompt::Blocks`]), not its
//!   characters, so a match counts whole blocks and sizes count tokens;
//! - a tree over its bound is trimmed at once on insert, where SGLang trims every
//!   `eviction_interval` seconds (so ours is never over its bound);
//! - ties (equal matches, equal trees, equal queues) go to the less loaded worker, then to the
//!   first in pool order; SGLang takes whichever its hash map yields first.
//!
//! Defaults follow `sglang_router`'s launch defaults: `cache_threshold = 0.5`,
//! `balance_abs_threshold = 32`, `balance_rel_threshold = 1.0001` (the Rust crate's internal
//! default is 1.1; newer gateway releases use 0.3 / 64 / 1.5, see
//! [`CacheAwareConfig::SGLANG_GATEWAY`]), `max_tree_size = 2^24` characters, taken here as
//! `2^22` tokens at ~4 characters per token.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::task::{Context, Poll};

use parking_lot::Mutex;

use crate::sim::backend::{SimBackend, SimRequest};
use crate::{block_hashes, MockPrompt};
use replica_router::decision::{Decision, DecisionReason};
use replica_router::error::RouteError;
use replica_router::future::RouteFuture;
use replica_router::pick::no_replica;
use replica_router::pool::Pool;
use replica_router::request::RouteRequest;

/// Parameters of the cache-aware reference policy.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CacheAwareConfig {
    /// Smallest prefix match (a fraction of the prompt) that routes to the best-matching
    /// worker; at or below it the request goes to the smallest tree.
    pub cache_threshold: f64,
    /// Imbalance needs `max - min` requests in flight above this.
    pub balance_abs_threshold: u64,
    /// Imbalance also needs `max > min * balance_rel_threshold`.
    pub balance_rel_threshold: f64,
    /// Most tokens a worker's tree holds before it evicts its least recently used leaves.
    pub max_tree_tokens: u64,
}

impl CacheAwareConfig {
    /// `sglang_router` 0.1-0.2's launch defaults: 0.5, 32, 1.0001, `2^24` characters (`2^22`
    /// tokens).
    pub const SGLANG: CacheAwareConfig = CacheAwareConfig {
        cache_threshold: 0.5,
        balance_abs_threshold: 32,
        balance_rel_threshold: 1.0001,
        max_tree_tokens: 1 << 22,
    };

    /// Later SGLang model-gateway defaults: 0.3, 64, 1.5, `2^26` characters (`2^24` tokens).
    pub const SGLANG_GATEWAY: CacheAwareConfig = CacheAwareConfig {
        cache_threshold: 0.3,
        balance_abs_threshold: 64,
        balance_rel_threshold: 1.5,
        max_tree_tokens: 1 << 24,
    };
}

impl Default for CacheAwareConfig {
    /// [`CacheAwareConfig::SGLANG`].
    fn default() -> Self {
        CacheAwareConfig::SGLANG
    }
}

/// A worker as the decision sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkerLoad<'a> {
    /// The worker's id (names its tree).
    pub id: &'a str,
    /// Its requests in flight, as the router counts them.
    pub load: u64,
}

/// What the policy decided, and why.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum CacheAwareChoice {
    /// The load was imbalanced: the shortest queue.
    ShortestQueue(usize),
    /// The worker whose tree matched more than the threshold.
    BestMatch {
        /// The worker's index in the slice given to [`CacheAwareRouter::route`].
        index: usize,
        /// Matched share of the prompt.
        match_rate: f64,
    },
    /// No good match: the worker with the smallest tree.
    SmallestTree(usize),
}

impl CacheAwareChoice {
    /// The chosen worker's index in the slice given to [`CacheAwareRouter::route`].
    pub fn index(&self) -> usize {
        match *self {
            CacheAwareChoice::ShortestQueue(i)
            | CacheAwareChoice::SmallestTree(i)
            | CacheAwareChoice::BestMatch { index: i, .. } => i,
        }
    }
}

/// One worker's approximate tree: the blocks of the prompts routed to it, with LRU eviction.
///
/// Blocks are chain hashes, so a block stands for its whole prefix and the set of blocks is a
/// radix tree. A prompt's blocks are touched leaf first, root last, so a block is always more
/// recently used than every block below it: evicting the least recently used block evicts a
/// leaf, and the set stays prefix-closed (a block present means its whole prefix is present),
/// which lets a match be found by binary search.
#[derive(Debug, Default)]
struct Tree {
    last_use: HashMap<u64, u64>,
    by_tick: BTreeMap<u64, u64>,
}

impl Tree {
    /// Leading blocks of `blocks` in the tree.
    fn matched(&self, blocks: &[u64]) -> usize {
        blocks.partition_point(|b| self.last_use.contains_key(b))
    }

    fn insert(&mut self, blocks: &[u64], tick: &mut u64, max_blocks: usize) {
        for &b in blocks.iter().rev() {
            *tick += 1;
            if let Some(old) = self.last_use.insert(b, *tick) {
                self.by_tick.remove(&old);
            }
            self.by_tick.insert(*tick, b);
        }
        while self.last_use.len() > max_blocks {
            match self.by_tick.pop_first() {
                Some((_, b)) => {
                    self.last_use.remove(&b);
                }
                None => break,
            }
        }
    }
}

/// The cache-aware policy's state and decision function (see the [module docs](self)).
///
/// ```
/// use replica_router_mock::sim::{CacheAwareChoice, CacheAwareConfig, CacheAwareRouter, WorkerLoad};
/// let mut r = CacheAwareRouter::new(CacheAwareConfig::default(), 16);
/// let w = |a, b| [WorkerLoad { id: "a", load: a }, WorkerLoad { id: "b", load: b }];
/// let prompt: Vec<u64> = (1..=10).collect();
/// // Nothing matches yet: the smallest tree (a tie, so the less loaded "b").
/// assert_eq!(r.route(&w(3, 2), &prompt, 160), Some(CacheAwareChoice::SmallestTree(1)));
/// // The same prompt again matches b's tree.
/// assert!(matches!(r.route(&w(2, 3), &prompt, 170), Some(CacheAwareChoice::BestMatch { index: 1, .. })));
/// // Imbalanced: the shortest queue, whatever the cache says.
/// assert_eq!(r.route(&w(0, 40), &prompt, 170), Some(CacheAwareChoice::ShortestQueue(0)));
/// ```
#[derive(Debug)]
pub struct CacheAwareRouter {
    config: CacheAwareConfig,
    block_size: u32,
    trees: HashMap<String, Tree>,
    tick: u64,
}

impl CacheAwareRouter {
    /// Empty trees over blocks of `block_size` tokens.
    pub fn new(config: CacheAwareConfig, block_size: u32) -> Self {
        CacheAwareRouter {
            config,
            block_size: block_size.max(1),
            trees: HashMap::new(),
            tick: 0,
        }
    }

    /// The configuration.
    pub fn config(&self) -> &CacheAwareConfig {
        &self.config
    }

    /// Tokens in worker `id`'s tree.
    pub fn tree_tokens(&self, id: &str) -> u64 {
        self.trees
            .get(id)
            .map_or(0, |t| t.last_use.len() as u64 * u64::from(self.block_size))
    }

    /// Leading blocks of `blocks` in worker `id`'s tree.
    pub fn matched_blocks(&self, id: &str, blocks: &[u64]) -> usize {
        self.trees.get(id).map_or(0, |t| t.matched(blocks))
    }

    /// Picks one of `workers` for a prompt of `prompt_tokens` tokens whose full blocks hash to
    /// `blocks`, and records the prompt in the chosen worker's tree; `None` when `workers` is
    /// empty.
    pub fn route(
        &mut self,
        workers: &[WorkerLoad<'_>],
        blocks: &[u64],
        prompt_tokens: u32,
    ) -> Option<CacheAwareChoice> {
        let max = workers.iter().map(|w| w.load).max()?;
        let min = workers.iter().map(|w| w.load).min()?;
        let cfg = self.config;
        let imbalanced = max - min > cfg.balance_abs_threshold
            && max as f64 > min as f64 * cfg.balance_rel_threshold;
        // Lowest key, then less loaded, then first.
        let argmin = |key: &dyn Fn(usize) -> u64| -> usize {
            (0..workers.len())
                .min_by_key(|&i| (key(i), workers[i].load, i))
                .unwrap_or(0)
        };
        let choice = if imbalanced {
            CacheAwareChoice::ShortestQueue(argmin(&|i| workers[i].load))
        } else {
            let matched: Vec<usize> = workers
                .iter()
                .map(|w| self.matched_blocks(w.id, blocks))
                .collect();
            let best = argmin(&|i| u64::MAX - matched[i] as u64);
            let tokens =
                (matched[best] as u64 * u64::from(self.block_size)).min(u64::from(prompt_tokens));
            let rate = if prompt_tokens == 0 {
                0.0
            } else {
                tokens as f64 / f64::from(prompt_tokens)
            };
            if rate > cfg.cache_threshold {
                CacheAwareChoice::BestMatch {
                    index: best,
                    match_rate: rate,
                }
            } else {
                CacheAwareChoice::SmallestTree(argmin(&|i| self.tree_tokens(workers[i].id)))
            }
        };
        let max_blocks = (cfg.max_tree_tokens / u64::from(self.block_size)).max(1);
        let max_blocks = usize::try_from(max_blocks).unwrap_or(usize::MAX);
        let tree = self
            .trees
            .entry(workers[choice.index()].id.to_owned())
            .or_default();
        tree.insert(blocks, &mut self.tick, max_blocks);
        Some(choice)
    }
}

/// Adds the cache-aware reference policy to a simulation stack: it decides for every request
/// that has no decision yet (see the [module docs](self)).
///
/// Decision reasons: [`DecisionReason::Home`] for the best-matching worker,
/// [`DecisionReason::LeastLoaded`] for the shortest queue or the smallest tree.
#[derive(Debug, Clone)]
pub struct CacheAwareLayer {
    pool: Pool<SimBackend>,
    router: Arc<Mutex<CacheAwareRouter>>,
}

impl CacheAwareLayer {
    /// Routes over `pool`, with trees over its engines' block size (every clone of the
    /// service shares the trees).
    pub fn new(pool: Pool<SimBackend>, config: CacheAwareConfig) -> Self {
        let block_size = pool
            .snapshot()
            .replicas()
            .first()
            .map_or(16, |r| r.backend().engine().config().block_size());
        CacheAwareLayer {
            pool,
            router: Arc::new(Mutex::new(CacheAwareRouter::new(config, block_size))),
        }
    }
}

impl<S> tower::Layer<S> for CacheAwareLayer {
    type Service = CacheAware<S>;

    fn layer(&self, inner: S) -> Self::Service {
        CacheAware {
            inner,
            pool: self.pool.clone(),
            router: self.router.clone(),
        }
    }
}

/// The cache-aware picking service; made by [`CacheAwareLayer`].
#[derive(Debug, Clone)]
pub struct CacheAware<S> {
    inner: S,
    pool: Pool<SimBackend>,
    router: Arc<Mutex<CacheAwareRouter>>,
}

impl<S> CacheAware<S> {
    fn pick(&self, req: &SimRequest) -> Result<Decision, RouteError> {
        let snap = self.pool.load();
        let eligible: Vec<usize> = snap
            .eligible()
            .iter()
            .map(|&i| i as usize)
            .filter(|&i| snap.replicas()[i].state().is_eligible())
            .collect();
        let workers: Vec<WorkerLoad<'_>> = eligible
            .iter()
            .map(|&i| {
                let r = &snap.replicas()[i];
                WorkerLoad {
                    id: r.id().as_str(),
                    load: r.state().in_flight(),
                }
            })
            .collect();
        let mut router = self.router.lock();
        let hashed;
        let (blocks, prompt_tokens): (&[u64], u32) = match &req.mock.prompt {
            MockPrompt::Blocks {
                block_hashes,
                prompt_tokens,
            } => (block_hashes, *prompt_tokens),
            MockPrompt::Tokens(t) => {
                hashed = block_hashes(t, router.block_size);
                (&hashed, req.mock.prompt.len())
            }
        };
        let Some(choice) = router.route(&workers, blocks, prompt_tokens) else {
            return Err(no_replica(&snap));
        };
        let i = eligible[choice.index()];
        let reason = match choice {
            CacheAwareChoice::BestMatch { .. } => DecisionReason::Home,
            _ => DecisionReason::LeastLoaded,
        };
        Ok(Decision::at_slot(
            snap.replicas()[i].id().clone(),
            reason,
            snap.version(),
            i,
        ))
    }
}

impl<S> tower::Service<SimRequest> for CacheAware<S>
where
    S: tower::Service<SimRequest>,
    S::Error: Into<RouteError>,
{
    type Response = S::Response;
    type Error = RouteError;
    type Future = RouteFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, mut req: SimRequest) -> Self::Future {
        if req.decision().is_none() {
            match self.pick(&req) {
                Ok(d) => req.set_decision(d),
                Err(e) => return RouteFuture::failed(e),
            }
        }
        RouteFuture::new(self.inner.call(req))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn workers<'a>(loads: &[(&'a str, u64)]) -> Vec<WorkerLoad<'a>> {
        loads
            .iter()
            .map(|&(id, load)| WorkerLoad { id, load })
            .collect()
    }

    /// A chain of `n` blocks extending `prefix`.
    fn chain(prefix: &[u64], n: u64, salt: u64) -> Vec<u64> {
        let mut v = prefix.to_vec();
        let mut h = prefix.last().copied().unwrap_or(0);
        for i in 0..n {
            h = crate::sim::workload::splitmix64(
                h ^ salt.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (i + 1) << 48,
            );
            v.push(h);
        }
        v
    }

    #[test]
    fn prefers_the_matching_worker_when_balanced() {
        let mut r = CacheAwareRouter::new(CacheAwareConfig::default(), 16);
        let conv = chain(&[], 20, 1);
        // Seed worker "b" with the conversation.
        let w = workers(&[("a", 0), ("b", 0), ("c", 0)]);
        r.trees
            .entry("b".into())
            .or_default()
            .insert(&conv, &mut r.tick, usize::MAX);
        let follow_up = chain(&conv, 4, 2);
        let c = r.route(&w, &follow_up, 24 * 16).unwrap();
        assert!(
            matches!(c, CacheAwareChoice::BestMatch { index: 1, match_rate } if (match_rate - 20.0 / 24.0).abs() < 1e-9),
            "{c:?}"
        );
        // A mild load difference (within the thresholds) does not move it.
        let w = workers(&[("a", 0), ("b", 30), ("c", 5)]);
        assert_eq!(r.route(&w, &follow_up, 24 * 16).unwrap().index(), 1);
        // A short match (at most half of the prompt) goes to the smallest tree instead.
        let long = chain(&conv[..5], 30, 3);
        let c = r.route(&w, &long, 35 * 16).unwrap();
        assert_eq!(c, CacheAwareChoice::SmallestTree(0), "{c:?}");
    }

    #[test]
    fn shortest_queue_when_imbalanced() {
        let mut r = CacheAwareRouter::new(CacheAwareConfig::default(), 16);
        let conv = chain(&[], 20, 1);
        let w = workers(&[("a", 40), ("b", 3), ("c", 10)]);
        r.trees
            .entry("a".into())
            .or_default()
            .insert(&conv, &mut r.tick, usize::MAX);
        // 40 - 3 > 32 and 40 > 3 * 1.0001: imbalanced, so "b" despite "a"'s full match.
        assert_eq!(
            r.route(&w, &conv, 320),
            Some(CacheAwareChoice::ShortestQueue(1))
        );
        // The prompt was still recorded in b's tree.
        assert_eq!(r.matched_blocks("b", &conv), 20);
        // 32 apart is not more than the threshold of 32: balanced, so the best match again.
        let w = workers(&[("a", 35), ("b", 3)]);
        assert!(matches!(
            r.route(&w, &conv, 320),
            Some(CacheAwareChoice::BestMatch { .. })
        ));
        assert_eq!(r.route(&[], &conv, 320), None);
    }

    #[test]
    fn trees_are_bounded_and_stay_prefix_closed() {
        let cfg = CacheAwareConfig {
            max_tree_tokens: 100 * 16,
            ..CacheAwareConfig::default()
        };
        let mut r = CacheAwareRouter::new(cfg, 16);
        let w = workers(&[("a", 0)]);
        let mut convs = Vec::new();
        for salt in 0..20 {
            let c = chain(&[], 30, salt);
            r.route(&w, &c, 30 * 16).unwrap();
            assert!(r.tree_tokens("a") <= 100 * 16);
            convs.push(c);
        }
        // The most recent conversations survive whole; older ones lose their tails first.
        assert_eq!(r.matched_blocks("a", &convs[19]), 30);
        assert_eq!(r.matched_blocks("a", &convs[0]), 0);
        let tree = &r.trees["a"];
        for c in &convs {
            let m = tree.matched(c);
            // Prefix-closed: nothing present past the first missing block.
            assert!(c[m..].iter().all(|b| !tree.last_use.contains_key(b)));
        }
    }
}
