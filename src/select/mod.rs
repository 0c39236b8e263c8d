//! Workload-isolated and tiered pools: route each request to one of several named stacks.
//!
//! The guide's checklist: *isolate replica pools by workload (chat vs batch vs embedding)*, and
//! its deployment pattern *tiered pools: a small model's DP pool for cheap queries, a large
//! model's pool for escalations; pairs with model routing*. Each workload gets its own
//! [`Pool`](crate::pool::Pool) and its own stack of layers, because the right policy differs:
//! chat wants [affinity](crate::affinity) (its KV cache stays on the replica that served the
//! previous turn), a stateless embedding API wants plain [round-robin](crate::balance::RoundRobinLayer)
//! with no stickiness (the guide's decision table), batch jobs want a pool of their own so they
//! never take GPUs from interactive traffic.
//!
//! [`Select`] holds the named stacks and a [`Selector`] that names a route per request:
//! [`ByPath`] (longest path prefix: `/v1/embeddings` vs the rest), [`ByModel`] (the
//! [`ModelName`] the application put in the request's extensions, or a header, through an alias
//! table: the tiered-pool case), [`ByPriority`] (batch traffic to the batch pool), a pair of
//! selectors (first match wins), or any closure `Fn(&Req) -> Option<&'static str | String>`. A
//! request that names no route goes to the default route; one that names a route (a model) that
//! does not exist, or matches nothing without a default, fails with
//! [`RouteError::NoRoute`](crate::error::RouteError::NoRoute) (HTTP 404, as an OpenAI-compatible
//! server answers an unknown model).
//!
//! # Readiness: one saturated pool never blocks another
//!
//! tower's `Steer` has to ready *every* inner service in `poll_ready`, because it does not know
//! the request yet; one saturated pool (a full `ConcurrencyLimit`, a `Buffer` at capacity)
//! then stalls requests for all pools. `Select` is always ready instead: in `call` it picks the
//! route, clones that stack and readies the clone in the response future (tower's `Oneshot`),
//! exactly as [`Dispatch`](crate::dispatch::Dispatch) does per replica. A slow or empty pool only
//! delays (or fails, with its own typed error) the requests routed to it. Layers that reserve
//! capacity in `poll_ready` behave correctly: the clone is readied before it is called.
//!
//! Stacks of different types go in one `Select` boxed as `tower::util::BoxCloneService` (same
//! request, response and [`RouteError`](crate::error::RouteError) error types; map bodies to one
//! type first if the pools' backends differ).
//!
//! # Metrics
//! [`REQUESTS_COUNTER`] labelled `route` = the route's configured name, or [`NO_ROUTE`] for
//! rejected requests (a client-supplied model name is never a label).
//!
//! # Example
//! ```
//! use replica_router::affinity::AffinityLayer;
//! use replica_router::backend::ServiceBackend;
//! use replica_router::balance::{LeastInFlightLayer, RoundRobinLayer};
//! use replica_router::context::RouteContextLayer;
//! use replica_router::decision::{Decision, DecisionReason};
//! use replica_router::dispatch::Dispatch;
//! use replica_router::pool::Pool;
//! use replica_router::replica::ReplicaSpec;
//! use replica_router::select::{ByPath, Select};
//! use tower::util::BoxCloneService;
//! use tower::{Service, ServiceBuilder, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//! let engine = ServiceBackend::new(tower::service_fn(|_req: http::Request<String>| async {
//!     Ok::<_, std::convert::Infallible>(http::Response::new(String::from("{}")))
//! }));
//! let chat_spec = ReplicaSpec::new("llama-3-70b").tensor_parallel(2);
//! let chat_pool = Pool::builder()
//!     .replica("chat-0", chat_spec.clone(), engine.clone())
//!     .replica("chat-1", chat_spec, engine.clone())
//!     .build()?;
//! let embed_pool = Pool::builder()
//!     .replica("embed-0", ReplicaSpec::new("bge-m3"), engine.clone())
//!     .replica("embed-1", ReplicaSpec::new("bge-m3"), engine)
//!     .build()?;
//!
//! // Chat: sticky sessions, least-in-flight for new ones.
//! let chat = ServiceBuilder::new()
//!     .layer(AffinityLayer::new(chat_pool.clone()))
//!     .layer(LeastInFlightLayer::new(chat_pool.clone()))
//!     .service(Dispatch::new(chat_pool));
//! // Embeddings: stateless, round-robin, no stickiness.
//! let embeddings = ServiceBuilder::new()
//!     .layer(RoundRobinLayer::new(embed_pool.clone()))
//!     .service(Dispatch::new(embed_pool));
//!
//! let select = Select::builder(ByPath::new().prefix("/v1/embeddings", "embeddings"))
//!     .route("chat", BoxCloneService::new(chat))
//!     .route("embeddings", BoxCloneService::new(embeddings))
//!     .default_route("chat")
//!     .build()?;
//! let mut gateway = ServiceBuilder::new()
//!     .layer(RouteContextLayer::default())
//!     .service(select);
//!
//! let req = |path: &str| {
//!     http::Request::builder().uri(path).header("x-session-id", "conv-1").body(String::new())
//! };
//! let resp = gateway.ready().await?.call(req("/v1/embeddings")?).await?;
//! let d = resp.extensions().get::<Decision>().unwrap();
//! assert!(d.replica().as_str().starts_with("embed-"));
//! assert_eq!(d.reason(), DecisionReason::RoundRobin); // the session key is ignored there
//! let resp = gateway.ready().await?.call(req("/v1/chat/completions")?).await?;
//! let d = resp.extensions().get::<Decision>().unwrap();
//! assert!(d.replica().as_str().starts_with("chat-"));
//! assert_eq!(d.reason(), DecisionReason::Home);
//! # Ok(())
//! # }
//! ```

mod error;
mod selector;
mod service;

pub use self::error::SelectConfigError;
pub use self::selector::{ByModel, ByPath, ByPriority, ModelName, Selector, MAX_ROUTE_NAME_LEN};
pub use self::service::{Select, SelectBuilder};

/// Counter of requests per route, labelled `route`.
pub const REQUESTS_COUNTER: &str = "replica_router_select_requests_total";

/// The `route` label of requests that matched no route.
pub const NO_ROUTE: &str = "none";
