//! What a run measured, and its Markdown rendering.

use std::fmt::Write as _;
use std::time::Duration;

use crate::sim::policy::Policy;

/// Latency percentiles of one run.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Percentiles {
    /// Median.
    pub p50: Duration,
    /// 95th percentile.
    pub p95: Duration,
    /// 99th percentile.
    pub p99: Duration,
}

impl Percentiles {
    /// Nearest-rank percentiles of `samples` (sorted in place); zero when empty.
    pub fn of(samples: &mut [Duration]) -> Percentiles {
        samples.sort_unstable();
        let at = |q: f64| -> Duration {
            if samples.is_empty() {
                return Duration::ZERO;
            }
            let rank = (q * samples.len() as f64).ceil() as usize;
            samples[rank.clamp(1, samples.len()) - 1]
        };
        Percentiles {
            p50: at(0.50),
            p95: at(0.95),
            p99: at(0.99),
        }
    }
}

/// What one replica did during a run.
#[derive(Debug, Clone, PartialEq)]
pub struct ReplicaReport {
    /// Its id.
    pub id: String,
    /// Its capacity weight.
    pub weight: f64,
    /// Completed requests it served.
    pub requests: u64,
    /// Requests in flight on it, averaged over the run (sampled).
    pub mean_in_flight: f64,
    /// Prompt tokens it looked up in its prefix cache (every admitted prompt).
    pub prefix_queries: u64,
    /// Prompt tokens it found there.
    pub prefix_hits: u64,
    /// The engine's `max_num_seqs`.
    pub max_num_seqs: usize,
    /// Share of the arrival window past the warm-up
    /// ([`SimOptions::warmup`](crate::sim::SimOptions::warmup)) the engine spent running steps
    /// (0 to 1).
    pub busy_fraction: f64,
    /// Compute utilization over the same span (0 to 1): the engine's work at full-batch
    /// efficiency over that span (see [`MockStats::saturated_time`](crate::MockStats)).
    pub utilization: f64,
    /// Sequences in its running batch, averaged over the same span (sampled).
    pub mean_running: f64,
    /// Most sequences seen in its running batch (sampled).
    pub peak_running: usize,
    /// Requests waiting in its engine queue, averaged over the same span (sampled).
    pub mean_waiting: f64,
    /// KV-cache usage averaged over the same span (sampled, 0 to 1).
    pub mean_kv_usage: f64,
    /// Highest KV-cache usage seen (sampled, 0 to 1).
    pub peak_kv_usage: f64,
}

impl ReplicaReport {
    /// Prompt tokens it prefilled (not found in its cache).
    pub fn prefill_computed(&self) -> u64 {
        self.prefix_queries.saturating_sub(self.prefix_hits)
    }

    /// Mean running sequences over `max_num_seqs` (0 to 1).
    pub fn batch_occupancy(&self) -> f64 {
        (self.mean_running / self.max_num_seqs.max(1) as f64).min(1.0)
    }
}

/// Counts of routing decisions of completed requests, by reason.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReasonCounts {
    /// The session's home (pinned or ring) replica.
    pub home: u64,
    /// Past the load bound: the next replica with room.
    pub spill: u64,
    /// The session's replica had failed: moved.
    pub failover: u64,
    /// Least-loaded of two choices (no key, or a non-affinity policy).
    pub least_loaded: u64,
    /// Round-robin.
    pub round_robin: u64,
    /// Re-picked by dispatch.
    pub redirected: u64,
}

impl ReasonCounts {
    /// A compact rendering of the non-zero counts (`home 812 · spill 40`).
    pub fn summary(&self) -> String {
        let parts = [
            ("home", self.home),
            ("spill", self.spill),
            ("failover", self.failover),
            ("least-loaded", self.least_loaded),
            ("round-robin", self.round_robin),
            ("redirected", self.redirected),
        ];
        let s: Vec<String> = parts
            .iter()
            .filter(|(_, n)| *n > 0)
            .map(|(name, n)| format!("{name} {n}"))
            .collect();
        if s.is_empty() {
            "-".to_owned()
        } else {
            s.join(" · ")
        }
    }
}

/// What one policy achieved on one scenario.
#[derive(Debug, Clone, PartialEq)]
pub struct PolicyReport {
    /// The policy.
    pub policy: Policy,
    /// Requests (turns) in the workload.
    pub requests_planned: u64,
    /// Requests completed.
    pub requests_completed: u64,
    /// Time to first token, from the client sending the turn (first attempt) to the first
    /// streamed token of the attempt that completed.
    pub ttft: Percentiles,
    /// End-to-end latency, from the client sending the turn to the last token.
    pub e2e: Percentiles,
    /// Every completed request's time to first token, sorted (the distribution behind
    /// [`ttft`](Self::ttft)).
    pub ttft_samples: Vec<Duration>,
    /// Mean time to first token.
    pub ttft_mean: Duration,
    /// Queue wait: from the client sending the turn (first attempt) to the engine admitting the
    /// attempt that completed into its batch (shed retries, backoff and the engine's queue).
    pub queue_wait: Percentiles,
    /// Time per output token after the first, per request with at least two output tokens.
    pub tpot: Percentiles,
    /// The longest context one request needed (prompt plus answer tokens).
    pub max_context_tokens: u32,
    /// Tokens generated by requests that ended within the arrival window (past the warm-up,
    /// [`SimOptions::warmup`](crate::sim::SimOptions::warmup)), per second of it.
    pub throughput: f64,
    /// Virtual time until the last session ended.
    pub makespan: Duration,
    /// Prefix-cache hits over queries, in tokens, over every replica (the engines' counters).
    pub prefix_hit_rate: f64,
    /// Prompt tokens prefilled (cache misses) over every replica.
    pub prefill_computed: u64,
    /// `max / mean` over replicas of the time-averaged requests in flight per unit of weight
    /// (1.0 is perfect balance).
    pub load_imbalance: f64,
    /// `max / mean` over replicas of prefilled tokens per unit of weight.
    pub work_imbalance: f64,
    /// Decisions of the completed requests, by reason.
    pub reasons: ReasonCounts,
    /// Turns served on a different replica than the session's previous turn (each one replays
    /// the conversation's prefill there, unless that replica cached it earlier).
    pub moved: u64,
    /// Prompt tokens prefilled by the moved turns: the replayed conversation prefixes.
    pub replayed: u64,
    /// Response streams broken by a replica failure (retried).
    pub aborted: u64,
    /// Requests that failed at dispatch (replica error or no replica) and were retried.
    pub retries: u64,
    /// Sessions abandoned after too many failed attempts.
    pub abandoned_sessions: u64,
    /// Requests routed to the failed replica after its failure (should be 0).
    pub routed_to_failed: u64,
    /// Requests and estimated tokens still counted in flight after the run (should be 0).
    pub leftover_in_flight: u64,
    /// Per-replica detail.
    pub replicas: Vec<ReplicaReport>,
}

/// The reports of several policies on one scenario and workload.
#[derive(Debug, Clone, PartialEq)]
pub struct ScenarioReport {
    /// The scenario's name.
    pub scenario: String,
    /// One line describing the workload.
    pub workload: String,
    /// Whether the scenario has a failure (adds failure columns to the table).
    pub has_failure: bool,
    /// One report per policy, in the order run.
    pub policies: Vec<PolicyReport>,
}

fn secs(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64())
}

impl ScenarioReport {
    /// The report of `policy`, if it was run.
    pub fn get(&self, policy: Policy) -> Option<&PolicyReport> {
        self.policies.iter().find(|p| p.policy == policy)
    }

    /// A Markdown section: a heading, the workload line and one table row per policy.
    pub fn to_markdown(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "### {}\n", self.scenario);
        let _ = writeln!(out, "{}\n", self.workload);
        out.push_str(
            "| policy | TTFT p50 (s) | TTFT p95 (s) | TTFT p99 (s) | TTFT mean (s) | E2E p50 (s) \
             | E2E p95 (s) | gen tok/s | prefix hit | prefill (Mtok) | in-flight max/mean \
             | prefill max/mean | moved turns (replayed Mtok) | decisions |",
        );
        if self.has_failure {
            out.push_str(" aborted streams | retries | sent to failed |");
        }
        out.push('\n');
        let cols = 14 + if self.has_failure { 3 } else { 0 };
        out.push('|');
        for i in 0..cols {
            out.push_str(if i == 0 { "---|" } else { "---:|" });
        }
        out.push('\n');
        for p in &self.policies {
            let _ = write!(
                out,
                "| {} | {} | {} | {} | {} | {} | {} | {:.0} | {:.1}% | {:.1} | {:.2} | {:.2} | {} ({:.1}) | {} |",
                p.policy,
                secs(p.ttft.p50),
                secs(p.ttft.p95),
                secs(p.ttft.p99),
                secs(p.ttft_mean),
                secs(p.e2e.p50),
                secs(p.e2e.p95),
                p.throughput,
                100.0 * p.prefix_hit_rate,
                p.prefill_computed as f64 / 1e6,
                p.load_imbalance,
                p.work_imbalance,
                p.moved,
                p.replayed as f64 / 1e6,
                p.reasons.summary(),
            );
            if self.has_failure {
                let _ = write!(
                    out,
                    " {} | {} | {} |",
                    p.aborted, p.retries, p.routed_to_failed
                );
            }
            out.push('\n');
        }
        out
    }
}

impl ScenarioReport {
    /// A Markdown table of the per-replica detail: for each policy and replica, the
    /// time-averaged requests in flight, the requests served and the prefix-cache hit rate.
    pub fn replicas_markdown(&self) -> String {
        let mut out = String::new();
        let Some(first) = self.policies.first() else {
            return out;
        };
        out.push_str("| policy |");
        for r in &first.replicas {
            let _ = write!(out, " {} (w={}) |", r.id, r.weight);
        }
        out.push_str("\n|---|");
        for _ in &first.replicas {
            out.push_str("---:|");
        }
        out.push('\n');
        for p in &self.policies {
            let _ = write!(out, "| {} |", p.policy);
            for r in &p.replicas {
                let hit = r.prefix_hits as f64 / r.prefix_queries.max(1) as f64;
                let _ = write!(
                    out,
                    " {:.1} in flight · {} req · {:.0}% hit |",
                    r.mean_in_flight,
                    r.requests,
                    100.0 * hit
                );
            }
            out.push('\n');
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let mut v: Vec<Duration> = (1..=100).rev().map(Duration::from_millis).collect();
        let p = Percentiles::of(&mut v);
        assert_eq!(p.p50, Duration::from_millis(50));
        assert_eq!(p.p95, Duration::from_millis(95));
        assert_eq!(p.p99, Duration::from_millis(99));
        assert_eq!(Percentiles::of(&mut []), Percentiles::default());
    }
}
