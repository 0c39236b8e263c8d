//! Routing quality in virtual time (feature `sim`).
//!
//! This module answers "does the router place chat traffic well?" with numbers: it drives a
//! synthetic multi-turn chat workload through the crate's real layers (the same
//! [`AffinityLayer`](replica_router::affinity::AffinityLayer),
//! [`LeastInFlightLayer`](replica_router::balance::LeastInFlightLayer),
//! [`RoundRobinLayer`](replica_router::balance::RoundRobinLayer) and
//! [`Dispatch`](replica_router::dispatch::Dispatch) a server would use) over in-process
//! [`MockEngine`](crate::MockEngine) replicas with continuous batching and a prefix cache,
//! under tokio's paused clock. A ten-minute workload runs in seconds, and a run depends only on
//! its seeds.
//!
//! - [`Workload`]: sessions arrive as a Poisson process; a long/short mix of light sessions (a
//!   few short turns) and heavy ones (8k-32k tokens of pasted context, many turns), users owning
//!   sessions by a Zipf law (heavy users), think times between turns. Each turn's prompt is the
//!   whole conversation so far plus the new message, named by the chain hashes of its 16-token
//!   blocks, so the earlier turns are a prefix-cache hit only on a replica that served them
//!   (and a user's prefix is shared by all of their sessions).
//! - [`Scenario`]: the replica set (homogeneous; heterogeneous TP=2 beside TP=4 with capacity
//!   weights; or a replica that fails half way, ejected and killed so its streams break and the
//!   clients retry).
//! - [`Policy`]: round-robin; least-loaded (weighted power of two choices); sticky (affinity
//!   whose load bound is never reached: plain consistent hashing with pins); affinity with
//!   bounded loads (`c = 1.25`); each affinity policy by session or by user key.
//! - [`simulate`] runs one policy and returns a [`PolicyReport`]: TTFT and end-to-end
//!   percentiles, generated tokens per second, the prefix-cache hit rate and prefilled tokens
//!   (from the engines' own counters), `max / mean` replica load (time-averaged requests in
//!   flight, and prefilled tokens, per unit of weight), decision reasons, and the failure
//!   counts. [`compare`] runs several on the same workload and renders a Markdown table.
//!
//! Requests reach the engines as [`SimRequest`]s (a [`RouteRequest`](replica_router::request::RouteRequest)
//! holding an `http::Extensions`); [`SimBackend`] answers with a stream that stays in flight on
//! its replica until its last token, as an HTTP body would.
//!
//! - [`HeavyConfig`] / [`Workload::heavy`]: a heavy-tailed workload from published trace
//!   statistics (log-normal prompts of mean ~10k tokens up to 120k, ~60% new conversations
//!   sharing only a system prompt, follow-ups minutes apart, bursty arrivals), sent open loop
//!   ([`Pacing::FromSend`]); [`HeavyConfig::at_load`] sets its rate as a fraction of a
//!   scenario's capacity ([`pool_capacity`]); [`Workload::trace`] and [`write_trace`] export it
//!   as Mooncake-style JSON Lines. [`SimOptions::keyless`] sends it without session and user
//!   keys.
//! - [`Policy::CacheAware`]: a reference policy rebuilt from SGLang's cache-aware router
//!   ([`CacheAwareRouter`]).
//!
//! - [`harbor`]: the guide's Harbor Analytics story (one TP=2 replica at holiday load, two behind
//!   the full stack, one TP=4 on the same GPUs, the long-context lesson) with the capacity
//!   advisor's verdict on each ([`measurements`] turns a run into the advisor's input);
//!   `examples/harbor.rs` prints its table.
//!
//! `examples/simulate.rs` prints the tables; `notes/BENCH-sim.md` and
//! `notes/BENCH-sim-heavy.md` have runs of it.
//!
//! ```
//! use replica_router_mock::sim::{compare, Policy, Scenario, SimOptions, Workload, WorkloadConfig};
//! use std::time::Duration;
//!
//! let cfg = WorkloadConfig { sessions: 30, arrival_window: Duration::from_secs(30), ..Default::default() };
//! let workload = Workload::generate(&cfg, 42, 16);
//! let report = compare(
//!     &Scenario::homogeneous(2),
//!     &workload,
//!     &[Policy::RoundRobin, Policy::BOUNDED],
//!     &SimOptions::default(),
//! )
//! .unwrap();
//! let (rr, bounded) = (report.get(Policy::RoundRobin).unwrap(), report.get(Policy::BOUNDED).unwrap());
//! assert!(bounded.prefix_hit_rate > rr.prefix_hit_rate);
//! println!("{}", report.to_markdown());
//! ```

mod advice;
mod backend;
mod cache_aware;
mod capacity;
mod context;
pub mod harbor;
mod policy;
mod report;
mod run;
mod scenario;
mod trace;
mod workload;

pub use self::advice::{measurements, memory_fit};
pub use self::backend::{SimBackend, SimError, SimRequest, SimResponse, SimStream};
pub use self::cache_aware::{
    CacheAware, CacheAwareChoice, CacheAwareConfig, CacheAwareLayer, CacheAwareRouter, WorkerLoad,
};
pub use self::capacity::{pool_capacity, replica_capacity, LoadError, WorkMix};
pub use self::policy::Policy;
pub use self::report::{Percentiles, PolicyReport, ReasonCounts, ReplicaReport, ScenarioReport};
pub use self::run::{simulate, SimOptions, SimSetupError};
pub use self::scenario::{FailurePlan, ReplicaPlan, Scenario};
pub use self::trace::{
    read_trace, write_trace, Burst, HeavyConfig, TraceError, TraceRecord, LONG_PROMPT_TOKENS,
};
pub use self::workload::{Pacing, SessionPlan, Turn, Workload, WorkloadConfig};

/// Runs each of `policies` on `scenario` with the same `workload` and collects the reports.
pub fn compare(
    scenario: &Scenario,
    workload: &Workload,
    policies: &[Policy],
    options: &SimOptions,
) -> Result<ScenarioReport, SimSetupError> {
    let mut reports = Vec::with_capacity(policies.len());
    for &p in policies {
        reports.push(simulate(scenario, workload, p, options)?);
    }
    Ok(ScenarioReport {
        scenario: scenario.name.clone(),
        workload: describe(workload),
        has_failure: scenario.failure.is_some(),
        policies: reports,
    })
}

/// One line describing a workload: sessions, requests, tokens, seeds.
pub fn describe(workload: &Workload) -> String {
    if workload.heavy.is_some() {
        return trace::describe_heavy(workload);
    }
    let heavy = workload.sessions.iter().filter(|s| s.heavy).count();
    format!(
        "Workload: {} sessions ({} heavy) of {} users over {} s, {} requests, {:.1} M prompt tokens, \
         {:.2} M answer tokens; workload seed {}.",
        workload.sessions.len(),
        heavy,
        workload.config.users,
        workload.config.arrival_window.as_secs(),
        workload.requests(),
        workload.prompt_tokens() as f64 / 1e6,
        workload.answer_tokens() as f64 / 1e6,
        workload.seed,
    )
}
