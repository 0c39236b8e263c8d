//! Predicted time to first token, and placement by it.
//!
//! The predicted TTFT of a request on a replica is the prefill work queued ahead of it plus its
//! own uncached prompt tokens there, over the replica's prefill rate:
//!
//! ```text
//! ttft(i) = (queued_prefill_i + uncached_i) / rate_i  (+ decode_penalty x streaming_i / weight_i)
//! ```
//!
//! - `queued_prefill_i`: [`WorkState::prefill_tokens`](crate::load::work::WorkState::prefill_tokens), plus what other gateways have
//!   outstanding there when a shared work view read it recently
//!   ([`WorkState::foreign`](crate::load::work::WorkState::foreign)), plus, when the engine's own
//!   load report is fresh and shows more waiting requests than all of those, the rest at the
//!   average prefill of the known ones;
//! - `uncached_i`: the prompt minus what replica `i` probably holds: the longest match of the
//!   request's [`PrefixHashes`] in the [`PrefixIndex`] (scaled by the replica's
//!   [cache calibration](crate::load::work::WorkState::cache_calibration)); the whole prompt on a replica holding
//!   none of it;
//! - `rate_i`: the learned prefill rate ([`WorkState::rate`](crate::load::work::WorkState::rate)), seeded with
//!   `base_rate x capacity weight`.
//!
//! Everything is read from atomics; a prediction allocates nothing. [`Placement`] tells
//! [`AffinityLayer`](crate::affinity::AffinityLayer) and
//! [`LeastInFlightLayer`](crate::balance::LeastInFlightLayer) to place by it.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::context::RouteContext;
use crate::load::work::{ForeignWork, WorkPlan};
use crate::pool::Replica;
use crate::prefix::{PrefixHashes, PrefixIndex, PrefixMatch};

/// Prefill tokens assumed per waiting request the router did not send itself, when it has sent
/// none to compare with.
const DEFAULT_FOREIGN_PROMPT: f64 = 2_000.0;

/// The time-to-first-token model; see the [module docs](self).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TtftModel {
    /// Prefill tokens per second per unit of capacity weight, the seed of every replica's
    /// learned rate (default 10 000: a TP=2 70B-class replica).
    pub base_rate: f64,
    /// Engine load reports older than this are ignored; `None` ignores them all (default 2 s).
    pub report_max_age: Option<Duration>,
    /// Seconds added per streaming request per unit of weight (the decode batch slowing prefill
    /// steps down); default 0: in a chunked-prefill engine the decode share of a step is small.
    pub decode_penalty: f64,
    /// Other routers' outstanding work (a shared work view's last read, see
    /// [`WorkState::foreign`](crate::load::work::WorkState::foreign)) older than this is
    /// ignored; `None` ignores it always (default 1 s).
    pub shared_max_age: Option<Duration>,
}

impl Default for TtftModel {
    fn default() -> Self {
        TtftModel {
            base_rate: 10_000.0,
            report_max_age: Some(Duration::from_secs(2)),
            decode_penalty: 0.0,
            shared_max_age: Some(Duration::from_secs(1)),
        }
    }
}

impl TtftModel {
    /// The replica's prefill rate in tokens/s: learned (by this router and, through a shared
    /// work view, by the others), or seeded from its weight.
    pub fn rate<B>(&self, replica: &Replica<B>) -> f64 {
        let seed = self.base_rate * replica.weight().get();
        replica.state().work().blended_rate(seed)
    }

    /// Prefill tokens queued on the replica ahead of a new request.
    pub fn queued_tokens<B>(&self, replica: &Replica<B>) -> f64 {
        let work = replica.state().work();
        let mut queued = work.prefill_tokens() as f64;
        let mut known = work.prefill_requests();
        if let Some((foreign, age)) = self.shared_max_age.and_then(|a| work.foreign_aged(a)) {
            let (tokens, requests) = drained(&foreign, age, queued, self.rate(replica));
            queued += tokens;
            known += requests;
        }
        if let Some(max_age) = self.report_max_age {
            if let Some(report) = replica.state().load_report() {
                // A report taken before this router's latest answer there may count this
                // router's own (since answered) requests as waiting: only a newer one tells
                // of work from elsewhere (other gateways, direct clients).
                let newer = work
                    .last_first_data()
                    .is_none_or(|t| report.observed_at > t);
                let now = Instant::now();
                if newer && report.waiting > known && report.is_fresh(now, max_age) {
                    let avg = if known > 0 {
                        queued / known as f64
                    } else {
                        DEFAULT_FOREIGN_PROMPT
                    };
                    // Waiting then; the replica has been prefilling since the report was taken.
                    let unknown = ForeignWork {
                        prefill_tokens: ((report.waiting - known) as f64 * avg) as u64,
                        prefill_requests: report.waiting - known,
                        ..ForeignWork::default()
                    };
                    let age = now.saturating_duration_since(report.observed_at);
                    queued += drained(&unknown, age, queued, self.rate(replica)).0;
                }
            }
        }
        queued
    }

    /// Predicted seconds to first token of a request with `uncached_tokens` to prefill there.
    pub fn predict<B>(&self, replica: &Replica<B>, uncached_tokens: u64) -> f64 {
        let rate = self.rate(replica);
        let mut t = (self.queued_tokens(replica) + uncached_tokens as f64) / rate;
        if self.decode_penalty > 0.0 && self.decode_penalty.is_finite() {
            let w = replica.weight().get();
            t += self.decode_penalty * replica.state().work().decode_requests() as f64 / w;
        }
        if t.is_finite() {
            t.max(0.0)
        } else {
            f64::MAX
        }
    }
}

/// What is left of other routers' queued prefill `age` after they published it: the replica
/// has been prefilling since, at `rate` tokens/s shared between their work and the `local`
/// tokens queued now (in proportion). Returns (tokens, requests), the requests scaled with the
/// tokens. Without this a view one period old makes a replica that has just finished a burst
/// look busy, and sessions leave a home that is idle.
fn drained(foreign: &ForeignWork, age: Duration, local: f64, rate: f64) -> (f64, u64) {
    let tokens = foreign.prefill_tokens as f64;
    if tokens <= 0.0 || !rate.is_finite() || rate <= 0.0 {
        return (tokens, foreign.prefill_requests);
    }
    let share = tokens / (tokens + local.max(0.0));
    let left = (tokens - rate * age.as_secs_f64() * share).max(0.0);
    let requests = (foreign.prefill_requests as f64 * left / tokens).ceil() as u64;
    (left, requests.min(foreign.prefill_requests))
}

/// How a picking layer places requests.
#[derive(Debug, Clone, Default)]
pub enum Placement {
    /// By load (requests or estimated tokens in flight, the layer's
    /// [`LoadMeasure`](crate::pool::LoadMeasure)): the behaviour before predicted TTFT.
    #[default]
    Load,
    /// By predicted time to first token, see [`TtftPlacement`].
    PredictedTtft(TtftPlacement),
}

impl Placement {
    /// Placement by predicted TTFT with the default settings, sharing `index` (pass the same
    /// index to every layer of a stack).
    pub fn predicted_ttft(index: Arc<PrefixIndex>) -> Placement {
        Placement::PredictedTtft(TtftPlacement::new(Some(index)))
    }

    /// The TTFT settings, if this placement uses them.
    pub fn ttft(&self) -> Option<&TtftPlacement> {
        match self {
            Placement::Load => None,
            Placement::PredictedTtft(t) => Some(t),
        }
    }
}

/// Settings of placement by predicted time to first token.
///
/// - A **new session** goes to the least predicted TTFT among a few candidates: its first
///   `ring_candidates` distinct eligible ring successors with room under the load bound, a
///   weighted power-of-two-choices sample of `sampled` replicas, and the `indexed` replicas the
///   prefix index says hold the longest match. Then it is pinned there.
/// - A **follow-up turn** stays home unless the best alternative's predicted TTFT (which counts
///   re-prefilling the whole conversation there) is below `spill_ratio x` home's *and* at
///   least `spill_margin` shorter: hysteresis, so sessions do not flap.
/// - **Keyless** requests: the same candidates without the ring.
///
/// The load bound stays a hard cap (no candidate past it is considered while one within it
/// exists), and weights, tenant spread, SLO advice, pins and failover work as with
/// [`Placement::Load`].
#[derive(Debug, Clone)]
pub struct TtftPlacement {
    /// The TTFT model.
    pub model: TtftModel,
    /// The prefix index consulted for uncached tokens and recorded on every placement; `None`
    /// assumes only the session's home holds its prefix.
    pub index: Option<Arc<PrefixIndex>>,
    /// Ring successors considered for a new session (default 2).
    pub ring_candidates: usize,
    /// Replicas sampled by weight (default 2).
    pub sampled: usize,
    /// Replicas with the longest prefix match considered (default 2).
    pub indexed: usize,
    /// A session leaves home only for a replica predicted below this fraction of home's TTFT
    /// (default 0.7).
    pub spill_ratio: f64,
    /// ... and at least this much sooner (default 250 ms).
    pub spill_margin: Duration,
    /// Fraction of the prompt a session's home is assumed to hold at least, whatever the index
    /// says (default 0.75): the index forgets before the engine does, and a session should not
    /// leave home because the router's guess of its cache went stale.
    pub home_cached_guess: f64,
}

impl TtftPlacement {
    /// Default settings with `index`.
    pub fn new(index: Option<Arc<PrefixIndex>>) -> Self {
        TtftPlacement {
            model: TtftModel::default(),
            index,
            ring_candidates: 2,
            sampled: 2,
            indexed: 2,
            spill_ratio: 0.7,
            spill_margin: Duration::from_millis(250),
            home_cached_guess: 0.75,
        }
    }

    /// Reads what placement needs from a request's route context: its prompt and output
    /// lengths, fingerprints, and their match in the index.
    pub fn request<'a>(&self, ctx: Option<&'a RouteContext>) -> TtftRequest<'a> {
        self.request_parts(
            ctx.and_then(|c| c.prefix.as_ref()),
            ctx.map_or(0, |c| c.estimated_tokens),
        )
    }

    /// [`request`](Self::request) from the context's fingerprints and estimated tokens.
    pub fn request_parts<'a>(
        &self,
        prefix: Option<&'a PrefixHashes>,
        estimated: u64,
    ) -> TtftRequest<'a> {
        let prompt = prefix.map_or(estimated, |p| p.tokens());
        let matched = match (&self.index, prefix) {
            (Some(index), Some(p)) => index.lookup(p),
            _ => PrefixMatch::NONE,
        };
        TtftRequest {
            prompt_tokens: prompt,
            output_tokens: estimated.saturating_sub(prompt),
            prefix,
            matched,
        }
    }

    /// Prompt tokens of `req` that `replica` probably holds.
    pub fn cached_tokens<B>(&self, req: &TtftRequest<'_>, replica: &Replica<B>) -> u64 {
        let (Some(index), Some(prefix)) = (&self.index, req.prefix) else {
            return 0;
        };
        if req.matched.is_empty() {
            return 0;
        }
        let held = prefix.tokens_at(req.matched.checkpoints(index.slot(replica.id())));
        let calibrated = held as f64 * replica.state().work().cache_calibration();
        (calibrated as u64).min(req.prompt_tokens)
    }

    /// Uncached prompt tokens of `req` on `replica`; `home` says it is the session's home,
    /// which is assumed to hold at least `home_cached_guess` of the prompt.
    pub fn uncached_tokens<B>(
        &self,
        req: &TtftRequest<'_>,
        replica: &Replica<B>,
        home: bool,
    ) -> u64 {
        let mut cached = self.cached_tokens(req, replica);
        if home {
            let g = self.home_cached_guess.clamp(0.0, 1.0);
            cached = cached.max((req.prompt_tokens as f64 * g) as u64);
        }
        req.prompt_tokens.saturating_sub(cached)
    }

    /// Predicted seconds to first token of `req` on `replica`, and its uncached tokens there.
    pub fn predict<B>(
        &self,
        req: &TtftRequest<'_>,
        replica: &Replica<B>,
        home: bool,
    ) -> (f64, u64) {
        let uncached = self.uncached_tokens(req, replica, home);
        (self.model.predict(replica, uncached), uncached)
    }

    /// Whether a session should leave its home (predicted `home_secs`) for an alternative
    /// predicted at `alt_secs`: only past both margins (hysteresis).
    ///
    /// ```
    /// use replica_router::load::TtftPlacement;
    /// let p = TtftPlacement::new(None);
    /// assert!(!p.should_spill(1.0, 0.9)); // not 30% better
    /// assert!(!p.should_spill(0.3, 0.1)); // 66% better but only 200 ms
    /// assert!(p.should_spill(3.0, 1.0));
    /// ```
    pub fn should_spill(&self, home_secs: f64, alt_secs: f64) -> bool {
        let ratio = if self.spill_ratio.is_finite() {
            self.spill_ratio.clamp(0.0, 1.0)
        } else {
            0.7
        };
        alt_secs < home_secs * ratio && alt_secs + self.spill_margin.as_secs_f64() < home_secs
    }

    /// Records the placement of `req` on `replica` in the prefix index, and returns the work
    /// plan to put in the request's extensions.
    pub fn record<B>(
        &self,
        req: &TtftRequest<'_>,
        replica: &Replica<B>,
        uncached: u64,
    ) -> WorkPlan {
        if let (Some(index), Some(prefix)) = (&self.index, req.prefix) {
            index.record(replica.id(), replica.weight().get(), prefix);
        }
        WorkPlan {
            prefill_tokens: uncached,
            output_tokens: req.output_tokens,
            cached_tokens: req.prompt_tokens.saturating_sub(uncached),
        }
    }
}

/// One request as TTFT placement sees it; made by [`TtftPlacement::request`].
#[derive(Debug, Clone, Copy)]
pub struct TtftRequest<'a> {
    /// Prompt length in tokens.
    pub prompt_tokens: u64,
    /// Expected output tokens.
    pub output_tokens: u64,
    /// The prompt's fingerprints, if the request carries them.
    pub prefix: Option<&'a PrefixHashes>,
    /// Their match in the index.
    pub matched: PrefixMatch,
}

/// A small set of candidate replica indices (no allocation).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Candidates {
    items: [usize; Candidates::CAP],
    len: usize,
}

impl Candidates {
    pub(crate) const CAP: usize = 12;

    pub(crate) fn new() -> Self {
        Candidates {
            items: [0; Candidates::CAP],
            len: 0,
        }
    }

    /// Adds `i` unless present or full; returns whether it was added.
    pub(crate) fn push(&mut self, i: usize) -> bool {
        if self.len == Candidates::CAP || self.as_slice().contains(&i) {
            return false;
        }
        self.items[self.len] = i;
        self.len += 1;
        true
    }

    pub(crate) fn as_slice(&self) -> &[usize] {
        &self.items[..self.len]
    }
}

/// Adds to `out` up to `n` replicas of the deepest prefix match that `keep` accepts.
pub(crate) fn push_indexed<B>(
    placement: &TtftPlacement,
    req: &TtftRequest<'_>,
    snapshot: &crate::pool::PoolSnapshot<B>,
    mut keep: impl FnMut(usize) -> bool,
    out: &mut Candidates,
) {
    let (Some(index), Some((mask, _))) = (&placement.index, req.matched.deepest()) else {
        return;
    };
    let mut mask = mask;
    let mut added = 0;
    while mask != 0 && added < placement.indexed {
        let slot = mask.trailing_zeros() as u8;
        mask &= mask - 1;
        if let Some(id) = index.replica(slot) {
            if let Some((i, _)) = snapshot.get(id.as_str()) {
                if keep(i) && out.push(i) {
                    added += 1;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn work(tokens: u64, requests: u64) -> ForeignWork {
        ForeignWork {
            prefill_tokens: tokens,
            prefill_requests: requests,
            ..ForeignWork::default()
        }
    }

    #[test]
    fn foreign_work_drains_with_its_age_at_its_share_of_the_rate() {
        let f = work(10_000, 4);
        // Fresh: all of it.
        assert_eq!(drained(&f, Duration::ZERO, 0.0, 10_000.0), (10_000.0, 4));
        // Half a second alone at 10k tok/s: half left, requests scaled (rounded up).
        assert_eq!(
            drained(&f, Duration::from_millis(500), 0.0, 10_000.0),
            (5_000.0, 2)
        );
        // Sharing the replica with as much local work: drains half as fast.
        assert_eq!(
            drained(&f, Duration::from_millis(500), 10_000.0, 10_000.0),
            (7_500.0, 3)
        );
        // Long gone: nothing left.
        assert_eq!(drained(&f, Duration::from_secs(5), 0.0, 10_000.0), (0.0, 0));
        // No rate: nothing assumed drained.
        assert_eq!(drained(&f, Duration::from_secs(5), 0.0, 0.0), (10_000.0, 4));
    }
}
