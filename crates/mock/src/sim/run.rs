//! Running a workload through a policy's stack, in virtual time.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tower::util::BoxCloneService;
use tower::{Layer, Service, ServiceExt};

use crate::sim::backend::{SimBackend, SimRequest, SimStream};
use crate::sim::context::{route_context, TurnInfo};
use crate::sim::policy::Policy;
use crate::sim::report::{Percentiles, PolicyReport, ReasonCounts, ReplicaReport};
use crate::sim::scenario::Scenario;
use crate::sim::workload::{Pacing, SessionPlan, Workload};
use crate::{MockConfig, MockEngine, MockEvent, MockPrompt, MockRequest, MockStats};
use replica_router::affinity::AffinityConfigError;
use replica_router::decision::DecisionReason;
use replica_router::error::RouteError;
use replica_router::load::WaitEstimator;
use replica_router::pool::Pool;
use replica_router::prefix::{PrefixHashes, PrefixIndexConfig};
use replica_router::replica::PoolError;
use replica_router::replica::{ReplicaSpec, SpecPolicy};
use replica_router::request::RouteRequest;
use replica_router::shed::ShedLayer;

/// Knobs of a run beyond the scenario and the workload.
#[derive(Debug, Clone, PartialEq)]
pub struct SimOptions {
    /// Seeds the routers' random choices (the workload has its own seed).
    pub seed: u64,
    /// How often the replicas' in-flight counts are sampled for the load figures.
    pub sample_every: Duration,
    /// Wait before retrying a request that found no replica.
    pub retry_backoff: Duration,
    /// Attempts per turn before the session is abandoned.
    pub max_attempts: u32,
    /// Send requests without session and user keys (only their content can find the cache).
    pub keyless: bool,
    /// Put a [`ShedLayer`] with this wait budget in front of the policy's stack (a 429 when
    /// every replica's estimated queue wait is past it; the client retries after
    /// [`retry_backoff`](Self::retry_backoff)); its estimator counts each replica's
    /// `max_num_seqs` as its slots. `None` (the default): no shedding.
    pub shed_budget: Option<Duration>,
    /// The start of the arrival window left out of the throughput and of the replicas' batch,
    /// queue, KV and utilization figures, while the sessions ramp up (zero by default).
    pub warmup: Duration,
}

impl Default for SimOptions {
    fn default() -> Self {
        SimOptions {
            seed: 1,
            sample_every: Duration::from_millis(100),
            retry_backoff: Duration::from_millis(500),
            max_attempts: 20,
            keyless: false,
            shed_budget: None,
            warmup: Duration::ZERO,
        }
    }
}

/// Why a simulation could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SimSetupError {
    /// The scenario's replica set is not a valid pool (no replicas, bad ids or weights).
    #[error("invalid replica set: {0}")]
    Pool(#[from] PoolError),
    /// The policy's affinity settings are invalid.
    #[error("invalid policy: {0}")]
    Policy(#[from] AffinityConfigError),
    /// The failure names a replica the scenario does not have.
    #[error("the failure names replica {0}, which the scenario does not have")]
    FailureReplica(usize),
    /// The workload's prompts were hashed for another block size than the engines use.
    #[error("the workload has {workload}-token blocks but the engines use {engine}-token blocks")]
    BlockSize {
        /// The workload's block size.
        workload: u32,
        /// The engines' block size.
        engine: u32,
    },
    /// The tokio runtime could not be built.
    #[error("cannot build the runtime: {0}")]
    Runtime(#[from] std::io::Error),
}

/// Runs `workload` on `scenario` through `policy`'s stack and measures it.
///
/// The run gets its own single-threaded tokio runtime with a paused clock, so it takes virtual
/// time (a 10-minute workload runs in seconds) and its result depends only on its inputs.
///
/// ```
/// use replica_router_mock::sim::{simulate, Policy, Scenario, SimOptions, Workload, WorkloadConfig};
/// use std::time::Duration;
///
/// let cfg = WorkloadConfig { sessions: 20, arrival_window: Duration::from_secs(30), ..Default::default() };
/// let workload = Workload::generate(&cfg, 1, 16);
/// let scenario = Scenario::homogeneous(2);
/// let report = simulate(&scenario, &workload, Policy::BOUNDED, &SimOptions::default()).unwrap();
/// assert_eq!(report.requests_completed as usize, workload.requests());
/// assert_eq!(report.leftover_in_flight, 0);
/// ```
pub fn simulate(
    scenario: &Scenario,
    workload: &Workload,
    policy: Policy,
    options: &SimOptions,
) -> Result<PolicyReport, SimSetupError> {
    if let Some(f) = scenario.failure {
        if f.replica >= scenario.replicas.len() {
            return Err(SimSetupError::FailureReplica(f.replica));
        }
    }
    if workload.block_size != scenario.engine.block_size() {
        return Err(SimSetupError::BlockSize {
            workload: workload.block_size,
            engine: scenario.engine.block_size(),
        });
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()?;
    rt.block_on(run(scenario, workload, policy, options))
}

/// A completed request, as the client saw it.
struct Record {
    ttft: Duration,
    e2e: Duration,
    done_at: Duration,
    completion_tokens: u32,
    replica: usize,
    reason: DecisionReason,
    moved: bool,
    /// Prompt tokens prefilled for this turn (not found in the replica's cache).
    prefilled: u32,
    /// From the first send to the engine's admission of the attempt that completed.
    queue_wait: Duration,
    /// Mean time per output token after the first (when at least two).
    tpot: Option<Duration>,
}

#[derive(Default)]
struct SessionOutcome {
    records: Vec<Record>,
    aborted: u64,
    retries: u64,
    abandoned: bool,
    routed_to_failed: u64,
}

/// What every session task shares.
struct Env {
    start: Instant,
    block_size: u32,
    ids: Vec<String>,
    failure: Option<(usize, Duration)>,
    options: SimOptions,
    pacing: Pacing,
    /// Whether requests carry their session and user keys (false for keyless policies).
    keyed: bool,
}

impl Env {
    fn index_of(&self, id: &str) -> usize {
        self.ids.iter().position(|i| i == id).unwrap_or(usize::MAX)
    }

    /// Whether sending to replica `index` now goes to the failed replica after its failure.
    fn is_after_failure(&self, index: usize) -> bool {
        matches!(self.failure, Some((f, at)) if f == index && self.start.elapsed() > at)
    }
}

type Stack = BoxCloneService<SimRequest, SimStream, RouteError>;

async fn run(
    scenario: &Scenario,
    workload: &Workload,
    policy: Policy,
    options: &SimOptions,
) -> Result<PolicyReport, SimSetupError> {
    let start = Instant::now();
    let mut builder = Pool::builder().spec_policy(SpecPolicy::MixedParallelism);
    let mut backends = Vec::with_capacity(scenario.replicas.len());
    for r in &scenario.replicas {
        let engine = MockEngine::new(MockConfig {
            tp: r.tp,
            ..scenario.engine.clone()
        });
        let backend = SimBackend::new(engine);
        let spec = ReplicaSpec::new(scenario.engine.model.clone())
            .tensor_parallel(r.tp)
            .capacity_weight(r.weight);
        builder = builder.replica(&r.id, spec, backend.clone());
        backends.push(backend);
    }
    let pool = builder.build()?;
    // The router's prefix index: the default (about one TP=2 replica's KV cache per unit of
    // weight, what the gateway uses) plus the engines' host-memory tier, which an operator who
    // enabled one would add.
    let host_per_weight = scenario
        .replicas
        .iter()
        .map(|r| {
            let tier = u64::from(r.tp).saturating_mul(scenario.engine.host_cache_tokens_per_gpu);
            (tier as f64 / r.weight.max(1e-9)) as u64
        })
        .min()
        .unwrap_or(0);
    let defaults = PrefixIndexConfig::default();
    let index = PrefixIndexConfig {
        capacity_tokens_per_weight: defaults
            .capacity_tokens_per_weight
            .saturating_add(host_per_weight),
        ..defaults
    };
    let stack = policy.stack(&pool, options.seed, index)?;
    let stack = match options.shed_budget {
        None => stack,
        Some(budget) => {
            let slots = scenario.engine.max_num_seqs.max(1) as f64;
            let shed = ShedLayer::new(pool.clone())
                .budget(budget)
                .estimator(WaitEstimator::new().slots_per_weight(slots));
            BoxCloneService::new(shed.layer(stack))
        }
    };
    let env = Arc::new(Env {
        start,
        block_size: workload.block_size,
        ids: scenario.replicas.iter().map(|r| r.id.clone()).collect(),
        failure: scenario.failure.map(|f| (f.replica, f.at)),
        options: options.clone(),
        pacing: workload.pacing,
        keyed: policy.is_keyed(),
    });

    // Load sampler: time-averaged requests in flight per replica (the whole run), and the
    // engines' batch, queue and KV usage over the arrival window.
    let done = Arc::new(AtomicBool::new(false));
    let sampler = {
        let pool = pool.clone();
        let done = done.clone();
        let engines: Vec<MockEngine> = backends.iter().map(|b| b.engine().clone()).collect();
        let window = workload.config.arrival_window;
        let warmup = options.warmup.min(window);
        let every = options.sample_every.max(Duration::from_millis(1));
        tokio::spawn(async move {
            let snapshot = pool.snapshot();
            let mut samples = Samples::new(snapshot.len());
            while !done.load(Ordering::Relaxed) {
                tokio::time::sleep(every).await;
                let elapsed = start.elapsed();
                let in_window = elapsed >= warmup && elapsed <= window;
                for (i, r) in snapshot.replicas().iter().enumerate() {
                    samples.in_flight[i] += r.state().in_flight();
                    if in_window && samples.at_warmup_end[i].is_none() {
                        samples.at_warmup_end[i] = Some(engines[i].stats());
                    }
                    if in_window {
                        samples.engine[i].add(&engines[i].stats());
                    } else if elapsed > window && samples.at_window_end[i].is_none() {
                        samples.at_window_end[i] = Some(engines[i].stats());
                    }
                }
                samples.count += 1;
                samples.window_count += u64::from(in_window);
            }
            samples
        })
    };

    if let Some(f) = scenario.failure {
        let pool = pool.clone();
        let backend = backends[f.replica].clone();
        let id = scenario.replicas[f.replica].id.clone();
        tokio::spawn(async move {
            tokio::time::sleep_until(start + f.at).await;
            // Eject first so the retries of the broken requests already go elsewhere.
            let _ = pool.eject(&id);
            backend.kill();
        });
    }

    let tasks: Vec<_> = workload
        .sessions
        .iter()
        .map(|plan| tokio::spawn(run_session(plan.clone(), stack.clone(), env.clone())))
        .collect();
    drop(stack);
    let mut outcomes = Vec::with_capacity(tasks.len());
    for t in tasks {
        outcomes.push(joined(t.await));
    }
    let makespan = start.elapsed();
    done.store(true, Ordering::Relaxed);
    let samples = joined(sampler.await);

    let snapshot = pool.snapshot();
    let leftover_in_flight = snapshot
        .replicas()
        .iter()
        .map(|r| {
            let (s, w) = (r.state(), r.state().work());
            s.in_flight()
                + s.in_flight_tokens()
                + w.prefill_tokens()
                + w.prefill_requests()
                + w.decode_tokens()
                + w.decode_requests()
        })
        .sum();
    Ok(summarize(
        scenario,
        workload,
        policy,
        &backends,
        outcomes,
        samples,
        makespan,
        leftover_in_flight,
        options.warmup,
    ))
}

/// A task's output; a task that panicked re-raises its panic here (a bug in the simulation).
fn joined<T: Default>(result: Result<T, tokio::task::JoinError>) -> T {
    match result {
        Ok(v) => v,
        Err(e) => match e.try_into_panic() {
            Ok(panic) => std::panic::resume_unwind(panic),
            Err(_) => T::default(),
        },
    }
}

async fn run_session(plan: SessionPlan, mut stack: Stack, env: Arc<Env>) -> SessionOutcome {
    let mut out = SessionOutcome::default();
    tokio::time::sleep_until(env.start + plan.arrival).await;
    let session = plan.session_key();
    let user = plan.user_key();
    let mut last_replica: Option<usize> = None;
    let mut planned = env.start + plan.arrival;
    'turns: for turn in &plan.turns {
        planned += turn.think;
        match env.pacing {
            Pacing::AfterAnswer if !turn.think.is_zero() => tokio::time::sleep(turn.think).await,
            // Open loop: the planned send time, unless the previous answer ended later.
            Pacing::FromSend => tokio::time::sleep_until(planned).await,
            Pacing::AfterAnswer => {}
        }
        let t0 = Instant::now();
        let blocks = (turn.prompt_tokens / env.block_size) as usize;
        let mut attempts = 0;
        loop {
            attempts += 1;
            if attempts > env.options.max_attempts {
                out.abandoned = true;
                break 'turns;
            }
            let block_hashes = &plan.blocks[..blocks.min(plan.blocks.len())];
            let ctx = route_context(
                &TurnInfo {
                    session: &session,
                    user: &user,
                    blocks: block_hashes,
                    block_size: env.block_size,
                    prompt_tokens: turn.prompt_tokens,
                    answer_tokens: turn.answer_tokens,
                },
                env.options.keyless,
            );
            let prompt = MockPrompt::Blocks {
                block_hashes: block_hashes.to_vec(),
                prompt_tokens: turn.prompt_tokens,
            };
            let mut req = SimRequest::new(MockRequest::new(prompt, turn.answer_tokens).streamed());
            let mut ctx = ctx;
            if !env.keyed {
                ctx.session = None;
                ctx.user = None;
            }
            // The prompt's fingerprints, as a gateway hashing the messages would give them.
            ctx.prefix = Some(PrefixHashes::from_block_chain(
                block_hashes,
                env.block_size,
                u64::from(turn.prompt_tokens),
            ));
            req.set_route_context(ctx);
            let sent = match stack.ready().await {
                Ok(svc) => svc.call(req).await,
                Err(e) => Err(e),
            };
            let mut stream = match sent {
                Ok(s) => s,
                Err(RouteError::Backend { replica, .. }) => {
                    // The replica failed the request: retry at once (the pool routes around it).
                    if env.is_after_failure(env.index_of(replica.as_str())) {
                        out.routed_to_failed += 1;
                    }
                    out.retries += 1;
                    continue;
                }
                Err(_) => {
                    out.retries += 1;
                    tokio::time::sleep(env.options.retry_backoff).await;
                    continue;
                }
            };
            let (replica, reason) = match stream.decision() {
                Some(d) => (env.index_of(d.replica().as_str()), d.reason()),
                None => (usize::MAX, DecisionReason::LeastLoaded),
            };
            if env.is_after_failure(replica) {
                out.routed_to_failed += 1;
            }
            let mut ttft = None;
            loop {
                match stream.next_event().await {
                    Ok(Some(MockEvent::Token { .. })) => {
                        if ttft.is_none() {
                            ttft = Some(t0.elapsed());
                        }
                    }
                    Ok(Some(MockEvent::Done(usage))) => {
                        let now = Instant::now();
                        let first = ttft.unwrap_or(now - t0);
                        // The engine's own time from admission to the first token is prefill.
                        let engine_prefill = usage.ttft.saturating_sub(usage.queued);
                        let tpot = (usage.completion_tokens >= 2).then(|| {
                            (now - t0).saturating_sub(first) / (usage.completion_tokens - 1)
                        });
                        out.records.push(Record {
                            ttft: first,
                            e2e: now - t0,
                            done_at: now - env.start,
                            completion_tokens: usage.completion_tokens,
                            replica,
                            reason,
                            moved: last_replica.is_some_and(|r| r != replica),
                            prefilled: usage.prompt_tokens - usage.cached_tokens,
                            queue_wait: first.saturating_sub(engine_prefill),
                            tpot,
                        });
                        last_replica = Some(replica);
                        continue 'turns;
                    }
                    Ok(None) | Err(_) => {
                        out.aborted += 1;
                        break;
                    }
                }
            }
        }
    }
    out
}

#[allow(clippy::too_many_arguments)]
fn summarize(
    scenario: &Scenario,
    workload: &Workload,
    policy: Policy,
    backends: &[SimBackend],
    outcomes: Vec<SessionOutcome>,
    samples: Samples,
    makespan: Duration,
    leftover_in_flight: u64,
    options_warmup: Duration,
) -> PolicyReport {
    let window = workload.config.arrival_window;
    let warmup = options_warmup.min(window);
    let mut ttfts = Vec::new();
    let mut e2es = Vec::new();
    let mut waits = Vec::new();
    let mut tpots = Vec::new();
    let mut reasons = ReasonCounts::default();
    let mut per_replica_requests = vec![0u64; backends.len()];
    let (mut moved, mut aborted, mut retries, mut abandoned, mut routed_to_failed) =
        (0, 0, 0, 0, 0);
    let mut replayed = 0u64;
    let mut window_tokens = 0u64;
    for o in &outcomes {
        aborted += o.aborted;
        retries += o.retries;
        abandoned += u64::from(o.abandoned);
        routed_to_failed += o.routed_to_failed;
        for r in &o.records {
            ttfts.push(r.ttft);
            e2es.push(r.e2e);
            waits.push(r.queue_wait);
            tpots.extend(r.tpot);
            if r.moved {
                moved += 1;
                replayed += u64::from(r.prefilled);
            }
            if r.done_at >= warmup && r.done_at <= window {
                window_tokens += u64::from(r.completion_tokens);
            }
            if let Some(n) = per_replica_requests.get_mut(r.replica) {
                *n += 1;
            }
            match r.reason {
                DecisionReason::Home => reasons.home += 1,
                DecisionReason::Spill => reasons.spill += 1,
                DecisionReason::Failover => reasons.failover += 1,
                DecisionReason::LeastLoaded => reasons.least_loaded += 1,
                DecisionReason::RoundRobin => reasons.round_robin += 1,
                _ => reasons.redirected += 1,
            }
        }
    }
    let ttft_mean = if ttfts.is_empty() {
        Duration::ZERO
    } else {
        ttfts.iter().sum::<Duration>() / ttfts.len() as u32
    };
    let replicas: Vec<ReplicaReport> = scenario
        .replicas
        .iter()
        .zip(backends)
        .enumerate()
        .map(|(i, (plan, b))| {
            let stats = b.engine().stats();
            let at_end = samples.at_window_end[i].unwrap_or(stats);
            let at_start = samples.at_warmup_end[i].unwrap_or_default();
            let engine = &samples.engine[i];
            let n = samples.window_count.max(1) as f64;
            let span = window
                .min(makespan)
                .saturating_sub(warmup)
                .as_secs_f64()
                .max(1e-9);
            let busy = at_end.busy_time.saturating_sub(at_start.busy_time);
            let saturated = at_end
                .saturated_time
                .saturating_sub(at_start.saturated_time);
            ReplicaReport {
                id: plan.id.clone(),
                weight: plan.weight,
                requests: per_replica_requests[i],
                mean_in_flight: samples.in_flight[i] as f64 / samples.count.max(1) as f64,
                prefix_queries: stats.prefix_queries,
                prefix_hits: stats.prefix_hits,
                max_num_seqs: b.engine().config().max_num_seqs,
                busy_fraction: (busy.as_secs_f64() / span).min(1.0),
                utilization: (saturated.as_secs_f64() / span).min(1.0),
                mean_running: engine.running as f64 / n,
                peak_running: engine.peak_running,
                mean_waiting: engine.waiting as f64 / n,
                mean_kv_usage: engine.kv_usage / n,
                peak_kv_usage: engine.peak_kv_usage,
            }
        })
        .collect();
    let (queries, hits) = replicas.iter().fold((0, 0), |(q, h), r| {
        (q + r.prefix_queries, h + r.prefix_hits)
    });
    PolicyReport {
        policy,
        requests_planned: workload.requests() as u64,
        requests_completed: ttfts.len() as u64,
        ttft: Percentiles::of(&mut ttfts),
        ttft_samples: ttfts,
        e2e: Percentiles::of(&mut e2es),
        ttft_mean,
        queue_wait: Percentiles::of(&mut waits),
        tpot: Percentiles::of(&mut tpots),
        max_context_tokens: workload
            .sessions
            .iter()
            .flat_map(|s| s.turns.iter())
            .map(|t| t.prompt_tokens.saturating_add(t.answer_tokens))
            .max()
            .unwrap_or(0),
        throughput: window_tokens as f64 / (window - warmup).as_secs_f64().max(1e-9),
        makespan,
        prefix_hit_rate: hits as f64 / queries.max(1) as f64,
        prefill_computed: queries - hits,
        load_imbalance: imbalance(&replicas, |r| r.mean_in_flight),
        work_imbalance: imbalance(&replicas, |r| r.prefill_computed() as f64),
        reasons,
        moved,
        replayed,
        aborted,
        retries,
        abandoned_sessions: abandoned,
        routed_to_failed,
        leftover_in_flight,
        replicas,
    }
}

/// What the load sampler collected.
#[derive(Default)]
struct Samples {
    /// Per replica: the sum of sampled requests in flight (the whole run).
    in_flight: Vec<u64>,
    /// Per replica: the engine's sampled counters (the arrival window).
    engine: Vec<EngineSamples>,
    /// Per replica: the engine's counters at the first sample past the warm-up.
    at_warmup_end: Vec<Option<MockStats>>,
    /// Per replica: the engine's counters at the first sample past the arrival window.
    at_window_end: Vec<Option<MockStats>>,
    /// Samples taken.
    count: u64,
    /// Samples taken within the arrival window.
    window_count: u64,
}

impl Samples {
    fn new(replicas: usize) -> Samples {
        Samples {
            in_flight: vec![0; replicas],
            engine: vec![EngineSamples::default(); replicas],
            at_warmup_end: vec![None; replicas],
            at_window_end: vec![None; replicas],
            count: 0,
            window_count: 0,
        }
    }
}

/// Sums and peaks of one engine's sampled batch, queue and KV usage.
#[derive(Debug, Clone, Copy, Default)]
struct EngineSamples {
    running: u64,
    peak_running: usize,
    waiting: u64,
    kv_usage: f64,
    peak_kv_usage: f64,
}

impl EngineSamples {
    fn add(&mut self, s: &MockStats) {
        self.running += s.running as u64;
        self.peak_running = self.peak_running.max(s.running);
        self.waiting += s.waiting as u64;
        self.kv_usage += s.kv_usage;
        self.peak_kv_usage = self.peak_kv_usage.max(s.kv_usage);
    }
}

/// `max_i(x_i / w_i) / (sum x / sum w)`: 1.0 when every replica carries its weight's share.
fn imbalance(replicas: &[ReplicaReport], x: impl Fn(&ReplicaReport) -> f64) -> f64 {
    let total: f64 = replicas.iter().map(&x).sum();
    let weight: f64 = replicas.iter().map(|r| r.weight).sum();
    if total <= 0.0 || weight <= 0.0 {
        return 1.0;
    }
    let mean = total / weight;
    replicas.iter().map(|r| x(r) / r.weight).fold(0.0, f64::max) / mean
}
