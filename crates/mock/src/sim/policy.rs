//! The routing policies compared, each a stack of the crate's real layers.

use std::fmt;
use std::sync::Arc;

use tower::util::BoxCloneService;
use tower::ServiceBuilder;

use crate::sim::backend::{SimBackend, SimRequest, SimStream};
use crate::sim::cache_aware::{CacheAwareConfig, CacheAwareLayer};
use replica_router::affinity::{AffinityConfigError, AffinityKey, AffinityLayer};
use replica_router::balance::{LeastInFlightLayer, LoadMeasure, RoundRobinLayer};
use replica_router::dispatch::Dispatch;
use replica_router::error::RouteError;
use replica_router::load::Placement;
use replica_router::pool::Pool;
use replica_router::prefix::{PrefixIndex, PrefixIndexConfig};
use replica_router::rng::RngSeed;

/// The balance factor that stands for "never spill": plain consistent hashing with pins.
const NEVER_SPILL: f64 = 1e12;

/// A routing policy, as a stack of the crate's layers over [`Dispatch`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Policy {
    /// [`RoundRobinLayer`]: rotate over the eligible replicas.
    RoundRobin,
    /// [`LeastInFlightLayer`]: weighted power of two choices on requests in flight.
    LeastLoaded,
    /// [`AffinityLayer`] in front of [`LeastInFlightLayer`].
    Affinity {
        /// Which key places a request (session or user).
        key: AffinityKey,
        /// The balance factor `c`; `None` never spills (the load bound and the pinned-overload
        /// cap are both infinite): plain sticky consistent hashing with pins.
        balance_factor: Option<f64>,
        /// What counts as load, for the bound and for the least-loaded fallback.
        measure: LoadMeasure,
    },
    /// The cache-aware reference policy ([`CacheAwareLayer`]): SGLang's router, rebuilt.
    CacheAware(CacheAwareConfig),
    /// Placement by predicted time to first token ([`Placement::PredictedTtft`]) over a prefix
    /// index fed with each turn's fingerprints: [`AffinityLayer`] (bounded loads, `c = 1.25` by
    /// `measure`) in front of [`LeastInFlightLayer`], both placing by predicted TTFT.
    Ttft {
        /// Sessions are placed by their session key; `false` is keyless traffic: no affinity
        /// layer, every request placed by its prompt fingerprints alone.
        keyed: bool,
        /// What counts as load for the affinity bound.
        measure: LoadMeasure,
    },
}

impl Policy {
    /// Plain sticky sessions: consistent hashing by session key, never spilling.
    pub const STICKY: Policy = Policy::Affinity {
        key: AffinityKey::Session,
        balance_factor: None,
        measure: LoadMeasure::InFlightRequests,
    };

    /// Plain sticky routing by user key.
    pub const STICKY_USER: Policy = Policy::Affinity {
        key: AffinityKey::User,
        balance_factor: None,
        measure: LoadMeasure::InFlightRequests,
    };

    /// Affinity with bounded loads by session key, `c = 1.25` (the layer's default).
    pub const BOUNDED: Policy = Policy::Affinity {
        key: AffinityKey::Session,
        balance_factor: Some(1.25),
        measure: LoadMeasure::InFlightRequests,
    };

    /// Affinity with bounded loads by user key, `c = 1.25`.
    pub const BOUNDED_USER: Policy = Policy::Affinity {
        key: AffinityKey::User,
        balance_factor: Some(1.25),
        measure: LoadMeasure::InFlightRequests,
    };

    /// Affinity with bounded loads by session key, `c = 1.25`, load measured in estimated
    /// tokens in flight rather than requests.
    pub const BOUNDED_TOKENS: Policy = Policy::Affinity {
        key: AffinityKey::Session,
        balance_factor: Some(1.25),
        measure: LoadMeasure::InFlightTokens,
    };

    /// The cache-aware reference policy with SGLang's router defaults.
    pub const CACHE_AWARE: Policy = Policy::CacheAware(CacheAwareConfig::SGLANG);
    /// Predicted-TTFT placement by session key, the load bound in estimated tokens in flight
    /// (a proxy of KV-cache occupancy, which the TTFT model does not see).
    pub const TTFT: Policy = Policy::Ttft {
        keyed: true,
        measure: LoadMeasure::InFlightTokens,
    };

    /// Predicted-TTFT placement without a session key (prompt fingerprints only).
    pub const TTFT_KEYLESS: Policy = Policy::Ttft {
        keyed: false,
        measure: LoadMeasure::InFlightTokens,
    };

    /// The policies of the standard comparison, in table order.
    pub const STANDARD: [Policy; 7] = [
        Policy::RoundRobin,
        Policy::LeastLoaded,
        Policy::STICKY,
        Policy::BOUNDED,
        Policy::BOUNDED_TOKENS,
        Policy::STICKY_USER,
        Policy::BOUNDED_USER,
    ];

    /// Whether the policy's requests carry session and user keys (all but the keyless ones).
    pub fn is_keyed(&self) -> bool {
        !matches!(self, Policy::Ttft { keyed: false, .. })
    }

    /// Builds the stack over `pool`; `seed` fixes every random choice.
    pub(crate) fn stack(
        &self,
        pool: &Pool<SimBackend>,
        seed: u64,
        index: PrefixIndexConfig,
    ) -> Result<BoxCloneService<SimRequest, SimStream, RouteError>, AffinityConfigError> {
        let dispatch = Dispatch::with_seed(pool.clone(), RngSeed::fixed(seed ^ 0xD15));
        let least = LeastInFlightLayer::new(pool.clone()).seed(RngSeed::fixed(seed ^ 0x1EA5));
        Ok(match *self {
            Policy::RoundRobin => BoxCloneService::new(
                ServiceBuilder::new()
                    .layer(RoundRobinLayer::new(pool.clone()))
                    .service(dispatch),
            ),
            Policy::LeastLoaded => {
                BoxCloneService::new(ServiceBuilder::new().layer(least).service(dispatch))
            }
            Policy::Ttft { keyed, measure } => {
                let placement = Placement::predicted_ttft(Arc::new(PrefixIndex::new(index)));
                let least = least.placement(placement.clone());
                if keyed {
                    let affinity = AffinityLayer::builder(pool.clone())
                        .measure(measure)
                        .placement(placement)
                        .build()?;
                    BoxCloneService::new(
                        ServiceBuilder::new()
                            .layer(affinity)
                            .layer(least)
                            .service(dispatch),
                    )
                } else {
                    BoxCloneService::new(ServiceBuilder::new().layer(least).service(dispatch))
                }
            }
            Policy::Affinity {
                key,
                balance_factor,
                measure,
            } => {
                let builder = AffinityLayer::builder(pool.clone())
                    .key(key)
                    .measure(measure);
                let least = least.measure(measure);
                let builder = match balance_factor {
                    Some(c) => builder.balance_factor(c),
                    None => builder
                        .balance_factor(NEVER_SPILL)
                        .pinned_overload_factor(f64::INFINITY),
                };
                let affinity = builder.build()?;
                BoxCloneService::new(
                    ServiceBuilder::new()
                        .layer(affinity)
                        .layer(least)
                        .service(dispatch),
                )
            }
            Policy::CacheAware(config) => BoxCloneService::new(
                ServiceBuilder::new()
                    .layer(CacheAwareLayer::new(pool.clone(), config))
                    .service(dispatch),
            ),
        })
    }
}

impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Policy::RoundRobin => f.write_str("round-robin"),
            Policy::LeastLoaded => f.write_str("least-loaded (p2c)"),
            Policy::Ttft { keyed, measure } => {
                f.write_str(if *keyed {
                    "predicted TTFT by session"
                } else {
                    "predicted TTFT, keyless"
                })?;
                match measure {
                    LoadMeasure::InFlightRequests => Ok(()),
                    LoadMeasure::InFlightTokens => f.write_str(" (tokens)"),
                }
            }
            Policy::Affinity {
                key,
                balance_factor,
                measure,
            } => {
                let by = match key {
                    AffinityKey::Session => "session",
                    AffinityKey::User => "user",
                    AffinityKey::SessionThenUser => "session/user",
                };
                match balance_factor {
                    None => write!(f, "sticky by {by}")?,
                    Some(c) => write!(f, "bounded c={c} by {by}")?,
                }
                match measure {
                    LoadMeasure::InFlightRequests => Ok(()),
                    LoadMeasure::InFlightTokens => f.write_str(" (tokens)"),
                }
            }
            Policy::CacheAware(c) if *c == CacheAwareConfig::SGLANG => {
                f.write_str("cache-aware (SGLang)")
            }
            Policy::CacheAware(c) => write!(
                f,
                "cache-aware (SGLang: {}/{}/{})",
                c.cache_threshold, c.balance_abs_threshold, c.balance_rel_threshold
            ),
        }
    }
}
