//! # Guide: data-parallel inference, item by item
//!
//! This module has no code. It walks through the data-parallel (DP) inference guide this crate
//! was built from — its load-balancing policies, KV-isolation facts, deployment patterns, the
//! Harbor Analytics refactor, the technique decision table, the pitfalls and the production
//! checklist — and says for each which part of the crate serves it, or states plainly that the
//! crate does not, and what it offers instead.
//!
//! Data parallelism at inference runs N independent full copies of a model (each possibly TP=2
//! or TP=4 inside) behind a gateway. It multiplies aggregate throughput; it does not cut the
//! latency of one request on an idle replica, and it does not reduce memory per replica. The
//! hard parts are the gateway's: routing, session stickiness, KV-cache locality, health,
//! admission, quotas and rollouts. This crate is that gateway's routing logic, as tower layers
//! you put in front of your replicas in your own server.
//!
//! 1. [Typical stacks](#typical-stacks): stateless completions, multi-turn chat, a
//!    heterogeneous TP=2 + TP=4 pool, draining for a rollout.
//! 2. [Load-balancing policies](#load-balancing-policies)
//! 3. [KV isolation and memory](#kv-isolation-and-memory)
//! 4. [Deployment patterns](#deployment-patterns)
//! 5. [The Harbor Analytics refactor](#the-harbor-analytics-refactor)
//! 6. [Technique decision table](#technique-decision-table)
//! 7. [Pitfalls](#pitfalls)
//! 8. [Production checklist](#production-checklist)
//! 9. [Out of scope](#out-of-scope)
//!
//! # Typical stacks
//!
//! Layers go outermost first in a [`tower::ServiceBuilder`]. They cooperate through the request's
//! extensions: [`RouteContextLayer`](crate::context::RouteContextLayer) puts a
//! [`RouteContext`](crate::context::RouteContext) there (session, user, tenant, estimated tokens,
//! priority; from `x-session-id`, `x-user-id`, `x-tenant-id`, `x-estimated-tokens`,
//! `x-priority` by default), a picking layer adds a [`Decision`](crate::decision::Decision)
//! (which replica and why), and [`Dispatch`](crate::dispatch::Dispatch) sends the request there,
//! keeping it in flight until its response *body* ends (LLM responses stream for seconds). The
//! decision comes back in the response's extensions. Every error is a
//! [`RouteError`](crate::error::RouteError) with an HTTP mapping
//! ([`to_http_response`](crate::error::RouteError::to_http_response)).
//!
//! ## (a) Stateless completions
//!
//! Single-turn requests carry no server-side state: any replica is as good as another. Use
//! [`RoundRobinLayer`](crate::balance::RoundRobinLayer) when requests are of even size, or
//! [`LeastInFlightLayer`](crate::balance::LeastInFlightLayer) (weighted power of two choices)
//! when they are not; with
//! [`LoadMeasure::InFlightTokens`](crate::pool::LoadMeasure::InFlightTokens), a long prompt
//! weighs more than a short one.
//!
//! ```
//! use replica_router::backend::ServiceBackend;
//! use replica_router::balance::{LeastInFlightLayer, LoadMeasure, RoundRobinLayer};
//! use replica_router::context::RouteContextLayer;
//! use replica_router::decision::{Decision, DecisionReason};
//! use replica_router::dispatch::Dispatch;
//! use replica_router::pool::Pool;
//! use replica_router::replica::ReplicaSpec;
//! use tower::{Service, ServiceBuilder, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//! // Your engine client; `http_backend::HttpReplica` (feature `http-backend`) for real replicas.
//! let engine = ServiceBackend::new(tower::service_fn(|_req: http::Request<String>| async {
//!     Ok::<_, std::convert::Infallible>(http::Response::new(String::from("{}")))
//! }));
//! let spec = ReplicaSpec::new("llama-3-8b");
//! let pool = Pool::builder()
//!     .replica("gpu-0", spec.clone(), engine.clone())
//!     .replica("gpu-1", spec.clone(), engine.clone())
//!     .replica("gpu-2", spec, engine)
//!     .build()?;
//!
//! // Round-robin: fine for stateless traffic of even size.
//! let mut rr = ServiceBuilder::new()
//!     .layer(RouteContextLayer::default())
//!     .layer(RoundRobinLayer::new(pool.clone()))
//!     .service(Dispatch::new(pool.clone()));
//! let mut seen = Vec::new();
//! for _ in 0..3 {
//!     let resp = rr.ready().await?.call(http::Request::new(String::new())).await?;
//!     let d = resp.extensions().get::<Decision>().unwrap();
//!     assert_eq!(d.reason(), DecisionReason::RoundRobin);
//!     seen.push(d.replica().to_string());
//! }
//! seen.sort();
//! assert_eq!(seen, ["gpu-0", "gpu-1", "gpu-2"]);
//!
//! // Least in flight, counting estimated tokens: for uneven request sizes.
//! let mut lif = ServiceBuilder::new()
//!     .layer(RouteContextLayer::default())
//!     .layer(LeastInFlightLayer::new(pool.clone()).measure(LoadMeasure::InFlightTokens))
//!     .service(Dispatch::new(pool));
//! let req = http::Request::builder().header("x-estimated-tokens", "1200").body(String::new())?;
//! let resp = lif.ready().await?.call(req).await?;
//! assert_eq!(resp.extensions().get::<Decision>().unwrap().reason(), DecisionReason::LeastLoaded);
//! # Ok(())
//! # }
//! ```
//!
//! ## (b) Multi-turn chat
//!
//! Turn two of a conversation must go back to the replica holding turn one's KV cache, or pay a
//! full prefill replay. The full stack, outermost first:
//!
//! 1. [`QuotaLayer`](crate::quota::QuotaLayer): per-tenant requests, tokens and concurrency,
//!    counted in a shared [`CounterStore`](crate::store::CounterStore), so the quota holds across
//!    every gateway instance (`RedisStore`, feature `redis`; [`MemoryStore`](crate::store::MemoryStore)
//!    for one process). 429 with `Retry-After` when over.
//! 2. [`ShedLayer`](crate::shed::ShedLayer): when every replica's estimated queue wait is over
//!    the budget, a fast 429 (or a bounded, prioritized admission queue) instead of overloading
//!    the workers.
//! 3. [`AffinityLayer`](crate::affinity::AffinityLayer): sticky sessions by consistent hashing
//!    with bounded loads, pins that survive spills, failover with an explicit signal.
//! 4. [`LeastInFlightLayer`](crate::balance::LeastInFlightLayer): requests without a session key.
//! 5. [`Dispatch`](crate::dispatch::Dispatch).
//!
//! ```
//! use std::time::Duration;
//! use replica_router::affinity::{annotate_response, AffinityKey, AffinityLayer};
//! use replica_router::backend::ServiceBackend;
//! use replica_router::balance::LeastInFlightLayer;
//! use replica_router::context::RouteContextLayer;
//! use replica_router::decision::{Decision, DecisionReason};
//! use replica_router::dispatch::Dispatch;
//! use replica_router::pool::Pool;
//! use replica_router::quota::{QuotaConfig, QuotaLayer, TenantLimits};
//! use replica_router::replica::ReplicaSpec;
//! use replica_router::shed::ShedLayer;
//! use replica_router::load::StickyPolicy;
//! use replica_router::store::{MemoryStore, RateQuota};
//! use tower::{Service, ServiceBuilder, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//! let engine = ServiceBackend::new(tower::service_fn(|_req: http::Request<String>| async {
//!     Ok::<_, std::convert::Infallible>(http::Response::new(String::from("{}")))
//! }));
//! let spec = ReplicaSpec::new("llama-3-70b").quantization("fp8").tensor_parallel(2);
//! let pool = Pool::builder()
//!     .replica("gpu-0-1", spec.clone(), engine.clone())
//!     .replica("gpu-2-3", spec, engine)
//!     .build()?;
//! let limits = TenantLimits::unlimited()
//!     .requests(RateQuota::new(600, Duration::from_secs(60))?)
//!     .concurrency(16);
//! let affinity = AffinityLayer::builder(pool.clone())
//!     .key(AffinityKey::SessionThenUser) // conversation key, else the user's
//!     .balance_factor(1.25)              // no replica above 1.25 x its share of the load
//!     .tenant_share(Some(0.5))           // no tenant pins all its sessions on one replica
//!     .build()?;
//! let mut gateway = ServiceBuilder::new()
//!     .layer(RouteContextLayer::default())
//!     .layer(QuotaLayer::new(MemoryStore::new(), QuotaConfig::new(limits)))
//!     .layer(
//!         ShedLayer::new(pool.clone())
//!             .budget(Duration::from_millis(200)) // Harbor's wait budget
//!             .sticky(StickyPolicy::Spill),
//!     )
//!     .layer(affinity)
//!     .layer(LeastInFlightLayer::new(pool.clone()))
//!     .service(Dispatch::new(pool.clone()));
//!
//! let turn = || {
//!     http::Request::builder()
//!         .header("x-session-id", "conv-42")
//!         .header("x-tenant-id", "acme")
//!         .body(String::new())
//! };
//! let first = gateway.ready().await?.call(turn()?).await?;
//! let home = first.extensions().get::<Decision>().unwrap().replica().clone();
//! let mut second = gateway.ready().await?.call(turn()?).await?;
//! let d = second.extensions().get::<Decision>().unwrap();
//! assert_eq!((d.replica(), d.reason()), (&home, DecisionReason::Home));
//!
//! // The home replica dies: the session fails over, and the response says so, so the server
//! // knows the new replica starts with a cold cache and replays the conversation's prefill.
//! pool.eject(home.as_str())?;
//! let mut third = gateway.ready().await?.call(turn()?).await?;
//! let d = third.extensions().get::<Decision>().unwrap();
//! assert_ne!(d.replica(), &home);
//! assert_eq!(d.reason(), DecisionReason::Failover);
//! annotate_response(&mut third);
//! assert_eq!(third.headers()["x-replica-affinity"], "failover");
//! # annotate_response(&mut second);
//! # Ok(())
//! # }
//! ```
//!
//! Run a [`HealthChecker`](crate::health::HealthChecker) beside it (active probes; it also
//! scrapes the engines' `/metrics` into [`LoadReport`](crate::backend::LoadReport)s that the
//! shedding layer's [`WaitEstimator`](crate::load::WaitEstimator) uses), and put
//! [`FailoverLayer`](crate::health::FailoverLayer) and
//! [`OutlierDetectionLayer`](crate::health::OutlierDetectionLayer) above the picking layers to
//! retry requests whose replica died before answering and to eject failing replicas; see
//! [`health`](crate::health).
//!
//! ## (c) A heterogeneous pool: TP=2 beside TP=4
//!
//! Mixing replica sizes without weights skews latency: the small replicas saturate while the
//! big one idles. [`SpecPolicy::MixedParallelism`](crate::replica::SpecPolicy::MixedParallelism)
//! lets TP and PP differ (model and quantization must still match), and
//! [`capacity_weight`](crate::replica::ReplicaSpec::capacity_weight) tells every picker the
//! capacity: least-in-flight samples candidates in proportion to weight and compares
//! weight-normalized loads, the affinity ring gives each replica virtual nodes in proportion to
//! weight, and the shedding estimate scales its slots by weight.
//!
//! ```
//! use replica_router::backend::ServiceBackend;
//! use replica_router::balance::LeastInFlightLayer;
//! use replica_router::decision::Decision;
//! use replica_router::dispatch::Dispatch;
//! use replica_router::replica::PoolError;
//! use replica_router::pool::Pool;
//! use replica_router::replica::{ReplicaSpec, SpecPolicy};
//! use replica_router::rng::RngSeed;
//! use tower::{Service, ServiceBuilder, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//! let engine = ServiceBackend::new(tower::service_fn(|_req: http::Request<String>| async {
//!     Ok::<_, std::convert::Infallible>(http::Response::new(String::new()))
//! }));
//! let tp2 = ReplicaSpec::new("llama-3-70b").quantization("fp8").tensor_parallel(2);
//! let tp4 = tp2.clone().tensor_parallel(4).capacity_weight(2.0);
//!
//! // The default policy refuses the mix: the checklist's "validate TP settings identically".
//! let strict = Pool::builder()
//!     .replica("a", tp2.clone(), engine.clone())
//!     .replica("big", tp4.clone(), engine.clone())
//!     .build();
//! assert!(matches!(strict, Err(PoolError::SpecMismatch { field: "tensor_parallel", .. })));
//!
//! let pool = Pool::builder()
//!     .spec_policy(SpecPolicy::MixedParallelism)
//!     .replica("gpu-0-1", tp2.clone(), engine.clone())
//!     .replica("gpu-2-3", tp2, engine.clone())
//!     .replica("gpu-4-7", tp4, engine)
//!     .build()?;
//! assert_eq!(pool.total_gpus(), 8); // replicas x TP x PP
//!
//! let mut gateway = ServiceBuilder::new()
//!     .layer(LeastInFlightLayer::new(pool.clone()).seed(RngSeed::fixed(7)))
//!     .service(Dispatch::new(pool));
//! let mut big = 0;
//! for _ in 0..2000 {
//!     let resp = gateway.ready().await?.call(http::Request::new(String::new())).await?;
//!     if resp.extensions().get::<Decision>().unwrap().replica().as_str() == "gpu-4-7" {
//!         big += 1;
//!     }
//! }
//! // Weight 2 of 4: about half the requests go to the TP=4 replica.
//! assert!((800..1200).contains(&big), "{big}");
//! # Ok(())
//! # }
//! ```
//!
//! ## (d) Draining a replica for a rollout
//!
//! [`Pool::drain`](crate::pool::Pool::drain) stops new requests and sessions to a replica at
//! once; its in-flight requests, streamed bodies included, run to their end, and
//! [`Drain::wait`](crate::pool::Drain::wait) resolves when the last one has. Then restart it,
//! and [`readmit`](crate::pool::Pool::readmit) it (its [`SlowStart`](crate::pool::SlowStart)
//! ramp begins, so its cold prefix cache is not flooded) and [`undrain`](crate::pool::Pool::undrain)
//! it. [`Rollout`](crate::rollout::Rollout) does all of it for every replica, at most
//! `max_unavailable` at a time, waiting for each restarted replica's probe to pass.
//!
//! ```
//! use http_body_util::BodyExt;
//! use replica_router::backend::ServiceBackend;
//! use replica_router::balance::LeastInFlightLayer;
//! use replica_router::decision::Decision;
//! use replica_router::dispatch::Dispatch;
//! use replica_router::pool::Pool;
//! use replica_router::replica::ReplicaSpec;
//! use replica_router::rollout::{Rollout, RolloutConfig};
//! use tower::{Service, ServiceBuilder, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//! let engine = ServiceBackend::new(tower::service_fn(|_req: http::Request<String>| async {
//!     // A non-empty body: the request stays in flight until it is read.
//!     Ok::<_, std::convert::Infallible>(http::Response::new(String::from("data: hi\n\n")))
//! }));
//! let pool = Pool::builder()
//!     .replica("a", ReplicaSpec::new("m"), engine.clone())
//!     .replica("b", ReplicaSpec::new("m"), engine)
//!     .build()?;
//! let mut gateway = ServiceBuilder::new()
//!     .layer(LeastInFlightLayer::new(pool.clone()))
//!     .service(Dispatch::new(pool.clone()));
//!
//! // A response is streaming from some replica.
//! let streaming = gateway.ready().await?.call(http::Request::new(String::new())).await?;
//! let busy = streaming.extensions().get::<Decision>().unwrap().replica().clone();
//!
//! // Drain it: new requests go to the other replica; the stream is not cut.
//! let drain = pool.drain(busy.as_str())?;
//! assert!(!drain.is_drained());
//! let other = gateway.ready().await?.call(http::Request::new(String::new())).await?;
//! assert_ne!(other.extensions().get::<Decision>().unwrap().replica(), &busy);
//! drop(other);
//! let body = streaming.into_body().collect().await?.to_bytes();
//! assert_eq!(&body[..], b"data: hi\n\n");
//! drain.wait().await; // the last in-flight request has finished
//!
//! // ... restart the engine behind `busy` here, then bring it back with slow start:
//! pool.readmit(busy.as_str())?;
//! pool.undrain(busy.as_str())?;
//!
//! // Or let a rollout do it for every replica, one at a time.
//! let report = Rollout::new(pool.clone(), RolloutConfig::default())
//!     .run(|_replica| async { Ok::<_, std::io::Error>(()) /* restart it */ })
//!     .await?;
//! assert_eq!(report.completed.len(), 2);
//! # Ok(())
//! # }
//! ```
//!
//! [`drain_and_remove`](crate::health::drain_and_remove) drains and removes a replica for good
//! (scale in, or the old half of a blue/green upgrade after
//! [`StaggeredStart`](crate::rollout::StaggeredStart) brought the new replicas in).
//!
//! # Load-balancing policies
//!
//! | the guide's policy | in this crate |
//! |---|---|
//! | **Round-robin**: fine for stateless workloads; poor for sticky chat with uneven session lengths | [`RoundRobinLayer`](crate::balance::RoundRobinLayer) over the eligible replicas. For chat use affinity, not round-robin. |
//! | **Least connections / least in-flight**, with queue-depth metrics from each engine | [`LeastInFlightLayer`](crate::balance::LeastInFlightLayer): weighted power of two choices on requests (or estimated tokens, [`LoadMeasure`](crate::pool::LoadMeasure)) in flight, counted until the response body ends. The engines' own running/waiting counts ([`Backend::load_report`](crate::backend::Backend::load_report); vLLM's `/metrics` via [`VllmParser`](crate::load::prometheus::VllmParser)) feed the [`WaitEstimator`](crate::load::WaitEstimator) used by shedding and by the affinity layer's spill choice. |
//! | **Weighted / capacity-aware** for heterogeneous replicas | [`ReplicaSpec::capacity_weight`](crate::replica::ReplicaSpec::capacity_weight), used by every picker (weighted sampling, weight-normalized loads, virtual nodes in proportion to weight, bounded loads per weight, wait-estimate slots per weight); [`SlowStart`](crate::pool::SlowStart) ramps the weight of a replica that just joined. See stack (c). |
//! | **SLO-aware shedding**: 429 or queue at the gateway when all replicas exceed wait thresholds | [`ShedLayer`](crate::shed::ShedLayer): [`RouteError::Overloaded`](crate::error::RouteError::Overloaded) (429 with `Retry-After`) when every replica's estimated wait is over the budget; optional bounded admission queue that sheds batch before interactive ([`ShedLayer::queue`](crate::shed::ShedLayer::queue), per-priority budgets). |
//! | **Session affinity** by session id, user hash or conversation key, with cache migration only when a replica fails | [`AffinityLayer`](crate::affinity::AffinityLayer) with [`AffinityKey`](crate::affinity::AffinityKey) `Session`, `User` or `SessionThenUser`; bounded loads so stickiness does not hot-spot; pins with a TTL. On failure the session moves with reason [`Failover`](crate::decision::DecisionReason::Failover); the cache itself is not migrated (see [out of scope](#out-of-scope)). |
//!
//! # KV isolation and memory
//!
//! - *Each replica owns its KV blocks; cluster KV capacity is the sum of per-replica limits, not
//!   shared.* The crate does not pretend otherwise: it keeps each conversation on the replica
//!   that holds its cache ([`affinity`](crate::affinity)), says when a request lands on a
//!   replica without it ([`DecisionReason::Spill`](crate::decision::DecisionReason::Spill) and
//!   [`Failover`](crate::decision::DecisionReason::Failover), the `x-replica-affinity` header of
//!   [`annotate_response`](crate::affinity::annotate_response)), and never moves live sessions
//!   when a replica comes back.
//! - *Hot sessions on one replica can OOM it while siblings idle; improve affinity hashing
//!   (spread long conversations) or add replicas.* Bounded loads
//!   ([`balance_factor`](crate::affinity::AffinityBuilder::balance_factor)) cap every replica at
//!   `c x` its share of the load; [`LoadMeasure::InFlightTokens`](crate::pool::LoadMeasure::InFlightTokens)
//!   makes long conversations weigh more; [`AffinityKey::User`](crate::affinity::AffinityKey::User)
//!   spreads heavy users (Harbor's fix); [`tenant_share`](crate::affinity::AffinityBuilder::tenant_share)
//!   caps one tenant's share of a replica. The engines' KV usage
//!   ([`LoadReport::kv_usage`](crate::backend::LoadReport::kv_usage)) counts in the wait estimate
//!   ([`WaitEstimator::kv_saturation`](crate::load::WaitEstimator::kv_saturation)), is exported
//!   per replica by [`record_pool_metrics`](crate::health::record_pool_metrics) and averaged in
//!   the [`Recommendation`](crate::autoscale::Recommendation) of the autoscale signal.
//! - *PagedAttention pools apply per process; DP does not unify memory.* A fact about engines;
//!   nothing to route. Memory per request is the engine's business.
//!
//! # Deployment patterns
//!
//! - **One engine process per replica, N servers with identical TP flags, a gateway in front**:
//!   a [`Pool`](crate::pool::Pool) of N replicas, each a [`Backend`](crate::backend::Backend)
//!   (`http_backend::HttpReplica`, feature `http-backend`, forwards over pooled keep-alive HTTP/1.1
//!   and probes `GET /health`), with [`ReplicaSpec`](crate::replica::ReplicaSpec) recording TP,
//!   PP, quantization and max context. Membership changes at run time (`add`, `remove`, `drain`,
//!   `eject`, `readmit`), so a Kubernetes watcher or service discovery can drive it.
//! - **Homogeneous pools**: the default [`SpecPolicy::Identical`](crate::replica::SpecPolicy::Identical)
//!   enforces them.
//! - **Tiered pools** (a small model's DP pool for cheap queries, a large model's for
//!   escalations; pairs with model routing): one pool and stack per tier behind
//!   [`Select`](crate::select::Select) with [`ByModel`](crate::select::ByModel). Deciding *when*
//!   to escalate (a classifier, a retry on a low-quality answer) is the application's: it sets
//!   the [`ModelName`](crate::select::ModelName) extension.
//! - **Prefill/decode split** and **speculative decode**: not DP routing; see
//!   [out of scope](#out-of-scope). A set of decode replicas behind one router is still a
//!   [`Pool`](crate::pool::Pool), and draft and target models scaled independently are two
//!   pools behind [`Select`](crate::select::Select).
//! - **Autoscaling signals from queue wait and GPU batch utilization, not CPU**:
//!   [`AutoscaleSignal`](crate::autoscale::AutoscaleSignal) recommends scale out / hold / scale in
//!   from p95 queue wait at admission, shed rate and utilization (the engines' running batch when
//!   reported), and holds instead of scaling out while replicas are unhealthy
//!   ([`ScaleReason::ReplicasUnhealthy`](crate::autoscale::ScaleReason::ReplicasUnhealthy)).
//! - **Multi-tenant isolation so one tenant cannot pin all sticky sessions on one replica**:
//!   [`tenant_share`](crate::affinity::AffinityBuilder::tenant_share).
//!
//! # The Harbor Analytics refactor
//!
//! | Harbor did | here |
//! |---|---|
//! | a second identical TP=2 replica | [`Pool::add`](crate::pool::Pool::add) at run time (the ring rebuilds; slow start), or [`StaggeredStart`](crate::rollout::StaggeredStart) |
//! | consistent hash on `conversation_id`, least-request fallback for new sessions | [`AffinityLayer`](crate::affinity::AffinityLayer) over [`LeastInFlightLayer`](crate::balance::LeastInFlightLayer), stack (b) |
//! | per-replica queue depth exposed to the gateway via health endpoints | [`HealthChecker`](crate::health::HealthChecker) scraping [`Backend::load_report`](crate::backend::Backend::load_report) (vLLM `/metrics`, [`load`](crate::load)) |
//! | 429 when both replicas exceeded a 200 ms wait budget | [`ShedLayer::budget`](crate::shed::ShedLayer::budget) of 200 ms |
//! | batch summarization on a separate cluster | its own pool behind [`Select`](crate::select::Select) with [`ByPriority`](crate::select::ByPriority) or [`ByPath`](crate::select::ByPath) |
//! | hashing by user ID instead of conversation ID for heavy users | [`AffinityKey::User`](crate::affinity::AffinityKey::User) (or `SessionThenUser`) |
//!
//! # Technique decision table
//!
//! The rows that concern a gateway:
//!
//! | scenario | prefer | in this crate |
//! |---|---|---|
//! | model fits one GPU; high concurrent chat | DP replicas | a [`Pool`](crate::pool::Pool) of TP=1 replicas and stack (b) |
//! | 70B on 2x H100; queue depth maxed | a second TP=2 replica (DP=2), not TP=4 without more traffic | [`AutoscaleSignal`](crate::autoscale::AutoscaleSignal) says `scale_out` on queue wait; add it with [`StaggeredStart`](crate::rollout::StaggeredStart) |
//! | single-user latency SLO missed at low concurrency | TP, quantization, or a smaller model tier; not more DP | the autoscale signal keys on *queue wait*, so it does not recommend replicas that would not help; a smaller tier is a pool behind [`ByModel`](crate::select::ByModel); per-replica TTFB is a gauge of [`record_pool_metrics`](crate::health::record_pool_metrics) |
//! | 405B; cannot fit one replica | PP+TP within a replica, then DP of replicas | [`ReplicaSpec::pipeline_parallel`](crate::replica::ReplicaSpec::pipeline_parallel) and `tensor_parallel`; [`Pool::total_gpus`](crate::pool::Pool::total_gpus) |
//! | stateless embedding batch API | round-robin DP, no stickiness | [`RoundRobinLayer`](crate::balance::RoundRobinLayer) in its own route of [`Select`](crate::select::Select) ([`ByPath`](crate::select::ByPath) on `/v1/embeddings`): no affinity layer, no pin table |
//! | uneven conversation lengths | least-in-flight + user-hash spread, not round-robin on sticky chat | [`AffinityKey::User`](crate::affinity::AffinityKey::User) with bounded loads, [`LoadMeasure::InFlightTokens`](crate::pool::LoadMeasure::InFlightTokens), [`LeastInFlightLayer`](crate::balance::LeastInFlightLayer) |
//! | regional latency requirements | geo-distributed DP pools, not one global pool with cross-region stickiness | one [`Pool`](crate::pool::Pool) and stack per region behind [`Select`](crate::select::Select) (a closure selector on the region header); each region's affinity ring and pins are its own, so no session sticks across regions |
//!
//! # Pitfalls
//!
//! - **Sticky sessions without a failover plan.** Affinity moves the sessions of a replica that
//!   is removed, unhealthy, ejected or draining to the next eligible one in ring order and
//!   re-pins them there, with reason [`Failover`](crate::decision::DecisionReason::Failover) on
//!   the response (the server replays the history's prefill there; OpenAI-style clients resend
//!   the whole conversation each turn anyway). [`HealthChecker`](crate::health::HealthChecker)
//!   and [`OutlierDetector`](crate::health::OutlierDetector) take dead replicas out;
//!   [`FailoverLayer`](crate::health::FailoverLayer) resends requests that failed before any
//!   response; with no replica left the client gets a typed 503
//!   ([`RouteError::NoReplica`](crate::error::RouteError::NoReplica)).
//! - **Adding replicas when GPU utilization is low.** The
//!   [`AutoscaleSignal`](crate::autoscale::AutoscaleSignal) scales out only on queue wait or
//!   shedding, and recommends scale-in when wait and utilization are low; admission control is
//!   [`ShedLayer`](crate::shed::ShedLayer). Batching and chunked prefill are engine settings.
//! - **Ignoring weight load time.** [`Rollout`](crate::rollout::Rollout) restarts at most
//!   `max_unavailable` replicas at a time and waits for each to pass its probe (the weights are
//!   loaded) before the next; [`StaggeredStart`](crate::rollout::StaggeredStart) starts new
//!   replicas one (or k) at a time.
//! - **Heterogeneous replicas behind one pool.** Capacity weights and
//!   [`SpecPolicy::MixedParallelism`](crate::replica::SpecPolicy::MixedParallelism): stack (c).
//! - **Autoscaling on CPU.** The autoscale signal reads queue wait, shed rate and engine batch
//!   utilization; CPU never enters.
//! - **Shared rate limits per replica.** [`QuotaLayer`](crate::quota::QuotaLayer) counts per
//!   tenant in one [`CounterStore`](crate::store::CounterStore) shared by every gateway
//!   instance (Redis): one quota per tenant for the cluster, not per process.
//! - **DP for memory relief.** Replicas duplicate weights; the crate makes the cost visible
//!   ([`Pool::total_gpus`](crate::pool::Pool::total_gpus)) and nothing more: memory relief is
//!   TP/PP/quantization inside the replica.
//! - **No cross-replica observability.** [`record_pool_metrics`](crate::health::record_pool_metrics)
//!   (run by the health checker every second) exports per replica: in-flight requests and
//!   tokens, estimated wait, health, draining, slow-start factor, TTFB and duration EWMAs, and
//!   from the engine's load report its running batch, queue and KV usage. Decisions
//!   (`home`/`spill`/`failover`), sheds, quota rejections, ejections, rollout steps and routes are
//!   counted too. Tokens per second come from the engines' own metrics.
//!
//! # Production checklist
//!
//! | item | in this crate |
//! |---|---|
//! | Confirm the model fits on one replica with headroom for peak context and batch depth | out of scope (capacity planning); [`ReplicaSpec::max_context`](crate::replica::ReplicaSpec::max_context) records the limit, and KV usage per replica is a gauge |
//! | Profile GPU utilization at target concurrency: replica-bound vs shard-bound | out of scope (GPU profiling); the [`AutoscaleSignal`](crate::autoscale::AutoscaleSignal)'s p95 queue wait and utilization tell replica-bound (wait grows with load: add replicas) from latency-bound (no wait, slow replies: fix TP/quantization) |
//! | Define routing: stateless (round-robin) vs sticky (conversation or user hash) | [`RoundRobinLayer`](crate::balance::RoundRobinLayer) / [`AffinityLayer`](crate::affinity::AffinityLayer) with [`AffinityKey`](crate::affinity::AffinityKey); both on one gateway with [`Select`](crate::select::Select) |
//! | Implement least-in-flight or capacity-aware balancing with per-replica metrics | [`LeastInFlightLayer`](crate::balance::LeastInFlightLayer) (weighted), [`record_pool_metrics`](crate::health::record_pool_metrics) |
//! | Plan replica failure: replay prefill on a new worker or return a graceful retry | affinity failover ([`DecisionReason::Failover`](crate::decision::DecisionReason::Failover)), [`FailoverLayer`](crate::health::FailoverLayer), typed 503/429 with `Retry-After` ([`RouteError::to_http_response`](crate::error::RouteError::to_http_response)) |
//! | Isolate replica pools by workload (chat vs batch vs embedding) | [`Select`](crate::select::Select): one pool and stack per workload; a saturated pool never blocks another |
//! | Align autoscaling triggers with queue wait and GPU batch utilization | [`AutoscaleSignal`](crate::autoscale::AutoscaleSignal), fed by [`ShedLayer::autoscale`](crate::shed::ShedLayer::autoscale) |
//! | Apply cluster-wide tenant quotas and admission control, not per-replica silos | [`QuotaLayer`](crate::quota::QuotaLayer) over a shared [`CounterStore`](crate::store::CounterStore); [`ShedLayer`](crate::shed::ShedLayer) for admission |
//! | Stagger replica startup to avoid simultaneous weight downloads hammering storage | [`StaggeredStart`](crate::rollout::StaggeredStart) and [`Rollout`](crate::rollout::Rollout) |
//! | Validate quantization and TP settings identically across replicas | [`SpecPolicy::Identical`](crate::replica::SpecPolicy::Identical) (the default) at build and every [`Pool::add`](crate::pool::Pool::add): [`PoolError::SpecMismatch`](crate::replica::PoolError::SpecMismatch) names the odd replica; [`Pool::check_new`](crate::pool::Pool::check_new) before launching one |
//! | Load-test sticky hash distribution with realistic long/short session mixes | placement is a pure, deterministic function: replay your key mix through [`affinity::ring`](crate::pick::ring) offline (below); the `sim` module (feature `sim`, `examples/simulate.rs`) drives a long/short, heavy-user chat mix through the real layers in virtual time and reports max/mean replica load, TTFT and prefix-cache hit rate per policy; `benches/affinity.rs` and `examples/affinity_churn.rs` measure spread and churn |
//! | Document replica count x TP degree x PP degree = total GPUs required | [`Pool::total_gpus`](crate::pool::Pool::total_gpus), [`ReplicaSpec::gpus`](crate::replica::ReplicaSpec::gpus) |
//!
//! Load-testing the sticky distribution offline, with the same ring and bound the layer uses
//! (here: 10 000 sessions over 4 replicas, each replica within `ceil(1.25 x average)`):
//!
//! ```
//! use replica_router::pick::ring::{key_hash, place, BalanceFactor, Ring};
//!
//! let ids = ["gpu-0", "gpu-1", "gpu-2", "gpu-3"];
//! let ring = Ring::build(ids.iter().map(|id| (*id, 1.0)), 160);
//! let mut view: Vec<(bool, f64, f64)> = ids.iter().map(|_| (true, 1.0, 0.0)).collect();
//! let factor = BalanceFactor::new(1.25).unwrap();
//! for i in 0..10_000 {
//!     // Long sessions hold their slot: model a mix by the keys you draw and how long they stay.
//!     let h = key_hash(format!("conversation-{i}").as_bytes());
//!     let p = place(&ring, h, factor, &view[..]).unwrap();
//!     view[p.replica].2 += 1.0;
//! }
//! let max = view.iter().map(|v| v.2).fold(0.0, f64::max);
//! assert!(max <= (1.25f64 * 10_000.0 / 4.0).ceil());
//! ```
//!
//! # Out of scope
//!
//! Stated plainly, with what the crate offers instead:
//!
//! - **KV-cache migration between replicas.** The crate never moves cache blocks. When a
//!   session must leave its replica (failure, drain, overload) the response carries
//!   [`DecisionReason::Failover`](crate::decision::DecisionReason::Failover) or
//!   [`Spill`](crate::decision::DecisionReason::Spill) (and the `x-replica-affinity` header),
//!   the signal for the server that the new replica replays the prefill; the
//!   [`StickyPolicy`](crate::load::StickyPolicy) chooses between waiting for the warm replica and
//!   moving.
//! - **GPU profiling, capacity planning, engine tuning** (batch size, chunked prefill, TP/PP
//!   choice). The crate sees queue wait, in-flight load and what engines report; its
//!   [`AutoscaleSignal`](crate::autoscale::AutoscaleSignal) and per-replica gauges are the
//!   router-side evidence for those decisions.
//! - **Provisioning replicas.** The autoscale signal recommends; your orchestrator acts. The
//!   rollout helpers call your closure to restart or start an engine.
//! - **Prefill/decode disaggregation and speculative decoding.** Engine architectures, not DP
//!   routing; the crate routes among whatever replicas you give a pool.
//! - **The HTTP server itself.** The crate is layers; the server that terminates client
//!   connections, parses bodies (to set [`ModelName`](crate::select::ModelName), estimated
//!   tokens) and maps errors with [`RouteError::to_http_response`](crate::error::RouteError::to_http_response)
//!   is yours, or the crate's OpenAI-compatible `gateway` module (feature `gateway`).
