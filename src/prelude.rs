//! The names a typical stack needs, for one glob import.
//!
//! ```
//! use replica_router::prelude::*;
//!
//! let pool = Pool::builder()
//!     .replica("gpu-0-1", ReplicaSpec::new("llama-3-70b").tensor_parallel(2), ())
//!     .build()
//!     .unwrap();
//! let _affinity = AffinityLayer::new(pool.clone());
//! let _fallback = LeastInFlightLayer::new(pool.clone());
//! let _dispatch = Dispatch::new(pool);
//! ```

pub use crate::affinity::{AffinityKey, AffinityLayer};
pub use crate::backend::{Backend, ServiceBackend};
pub use crate::balance::{LeastInFlightLayer, RoundRobinLayer};
pub use crate::context::{HeaderExtractor, Priority, RouteContext, RouteContextLayer};
pub use crate::decision::{Decision, DecisionReason};
pub use crate::dispatch::Dispatch;
pub use crate::error::RouteError;
pub use crate::health::{FailoverLayer, HealthCheckConfig, HealthChecker, OutlierDetectionLayer};
pub use crate::load::{StickyPolicy, WaitEstimator};
pub use crate::pool::{LoadMeasure, Pool};
pub use crate::quota::{FailurePolicy, QuotaConfig, QuotaLayer, TenantLimits};
pub use crate::replica::{ReplicaId, ReplicaSpec};
pub use crate::request::RouteRequest;
pub use crate::shed::ShedLayer;
pub use crate::store::{CounterStore, MemoryStore, RateQuota};
