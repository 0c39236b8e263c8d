use std::sync::Arc;
use std::time::Duration;

use crate::affinity::error::AffinityConfigError;
use crate::affinity::service::{Affinity, Settings, Shared};
use crate::affinity::spread::TenantSpread;
use crate::affinity::AffinityKey;
use crate::context::DEFAULT_MAX_KEY_LEN;
use crate::load::Placement;
use crate::pick::ring::{BalanceFactor, DEFAULT_VNODES_PER_WEIGHT, MAX_VNODES_PER_REPLICA};
use crate::pins::{MemoryPinTable, PinTable, DEFAULT_MAX_PINS};
use crate::pool::{LoadMeasure, Pool};

/// Default pin TTL: 30 minutes (an idle conversation's KV cache is likely evicted by then).
pub const DEFAULT_PIN_TTL: Duration = Duration::from_secs(30 * 60);

/// Default pinned-overload factor: a pinned session leaves its replica for load only past twice
/// the load bound.
pub const DEFAULT_PINNED_OVERLOAD_FACTOR: f64 = 2.0;

/// Default number of tenant buckets for the per-tenant spread.
pub const DEFAULT_TENANT_BUCKETS: u32 = 256;

/// Adds session affinity with bounded loads to a service stack.
///
/// See the [module docs](crate::affinity). Cloning is cheap; every service it makes shares one
/// ring cache, pin table and set of metric handles.
pub struct AffinityLayer<B> {
    shared: Arc<Shared<B>>,
}

impl<B> Clone for AffinityLayer<B> {
    fn clone(&self) -> Self {
        AffinityLayer {
            shared: self.shared.clone(),
        }
    }
}

impl<B> std::fmt::Debug for AffinityLayer<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AffinityLayer")
            .field("settings", &self.shared.settings)
            .finish()
    }
}

impl<B> AffinityLayer<B> {
    /// Affinity by session key over `pool`, with the defaults: balance factor 1.25, an in-memory
    /// pin table of [`DEFAULT_MAX_PINS`] pins with a 30-minute TTL, 160 virtual nodes per unit of
    /// weight, load = requests in flight, no tenant cap.
    pub fn new(pool: Pool<B>) -> Self {
        AffinityLayer {
            shared: Arc::new(AffinityBuilder::defaults(pool).into_shared()),
        }
    }

    /// Starts configuring an affinity layer over `pool`.
    pub fn builder(pool: Pool<B>) -> AffinityBuilder<B> {
        AffinityBuilder::defaults(pool)
    }

    /// The pin table in use.
    pub fn pins(&self) -> &Arc<dyn PinTable> {
        &self.shared.pins
    }
}

impl<S, B> tower::Layer<S> for AffinityLayer<B> {
    type Service = Affinity<S, B>;

    fn layer(&self, inner: S) -> Self::Service {
        Affinity::new(inner, self.shared.clone())
    }
}

/// Configures an [`AffinityLayer`]; [`build`](AffinityBuilder::build) validates.
///
/// ```
/// use replica_router::affinity::{AffinityKey, AffinityLayer};
/// use replica_router::pool::Pool;
/// use replica_router::replica::ReplicaSpec;
/// use std::time::Duration;
///
/// let pool = Pool::builder().replica("gpu-0", ReplicaSpec::new("m"), ()).build().unwrap();
/// let layer = AffinityLayer::builder(pool.clone())
///     .key(AffinityKey::SessionThenUser)
///     .balance_factor(1.5)
///     .pin_ttl(Duration::from_secs(600))
///     .tenant_share(Some(0.5))
///     .build()
///     .unwrap();
/// assert!(AffinityLayer::builder(pool).balance_factor(1.0).build().is_err());
/// # drop(layer);
/// ```
pub struct AffinityBuilder<B> {
    pool: Pool<B>,
    key: AffinityKey,
    balance_factor: f64,
    pinned_overload_factor: f64,
    pin_ttl: Duration,
    max_key_len: usize,
    measure: LoadMeasure,
    placement: Placement,
    vnodes_per_weight: u32,
    tenant_share: Option<f64>,
    tenant_buckets: u32,
    pins: Option<Arc<dyn PinTable>>,
    max_pins: usize,
}

impl<B> std::fmt::Debug for AffinityBuilder<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AffinityBuilder")
            .field("key", &self.key)
            .field("balance_factor", &self.balance_factor)
            .field("pinned_overload_factor", &self.pinned_overload_factor)
            .field("pin_ttl", &self.pin_ttl)
            .field("tenant_share", &self.tenant_share)
            .finish_non_exhaustive()
    }
}

impl<B> AffinityBuilder<B> {
    fn defaults(pool: Pool<B>) -> Self {
        AffinityBuilder {
            pool,
            key: AffinityKey::default(),
            balance_factor: BalanceFactor::DEFAULT.get(),
            pinned_overload_factor: DEFAULT_PINNED_OVERLOAD_FACTOR,
            pin_ttl: DEFAULT_PIN_TTL,
            max_key_len: DEFAULT_MAX_KEY_LEN,
            measure: LoadMeasure::default(),
            placement: Placement::default(),
            vnodes_per_weight: DEFAULT_VNODES_PER_WEIGHT,
            tenant_share: None,
            tenant_buckets: DEFAULT_TENANT_BUCKETS,
            pins: None,
            max_pins: DEFAULT_MAX_PINS,
        }
    }

    /// Which key of the route context sessions are placed by (default: the session key).
    pub fn key(mut self, key: AffinityKey) -> Self {
        self.key = key;
        self
    }

    /// The balance factor `c` (default 1.25): no replica takes a new session past
    /// `ceil(c x its share of the average load)`. Must be finite and > 1.
    pub fn balance_factor(mut self, c: f64) -> Self {
        self.balance_factor = c;
        self
    }

    /// How far past the load bound a *pinned* session stays on its replica (default 2.0: up to
    /// twice the bound, because its KV cache is there). `f64::INFINITY` keeps pinned sessions in
    /// place whatever the load. Must be >= 1.
    pub fn pinned_overload_factor(mut self, factor: f64) -> Self {
        self.pinned_overload_factor = factor;
        self
    }

    /// How long a pin lives after the session's last request (default 30 minutes).
    pub fn pin_ttl(mut self, ttl: Duration) -> Self {
        self.pin_ttl = ttl;
        self
    }

    /// The pin table (default: a [`MemoryPinTable`]); pass a shared one so every gateway
    /// instance sends a session to the same replica even after a spill.
    pub fn pin_table<P: PinTable>(mut self, table: Arc<P>) -> Self {
        self.pins = Some(table);
        self
    }

    /// The pin table as a trait object.
    pub fn dyn_pin_table(mut self, table: Arc<dyn PinTable>) -> Self {
        self.pins = Some(table);
        self
    }

    /// Size bound of the default in-memory pin table (default 2^20).
    pub fn max_pins(mut self, n: usize) -> Self {
        self.max_pins = n;
        self
    }

    /// Longest key accepted, in bytes (default 4096, as the header extractor); longer keys fail
    /// with [`RouteError::InvalidKey`](crate::error::RouteError::InvalidKey).
    pub fn max_key_len(mut self, n: usize) -> Self {
        self.max_key_len = n;
        self
    }

    /// What counts as load for the bound (default: requests in flight).
    pub fn measure(mut self, measure: LoadMeasure) -> Self {
        self.measure = measure;
        self
    }

    /// How sessions are placed (default [`Placement::Load`]: ring order under the load bound).
    /// [`Placement::PredictedTtft`] places new sessions on the least predicted time to first
    /// token among a few candidates and lets a pinned session leave home only when another
    /// replica's predicted TTFT, re-prefill included, is better by a margin; see
    /// [`TtftPlacement`](crate::load::TtftPlacement). The load bound stays a hard cap.
    pub fn placement(mut self, placement: Placement) -> Self {
        self.placement = placement;
        self
    }

    /// Virtual nodes per unit of capacity weight (default 160).
    pub fn vnodes_per_weight(mut self, n: u32) -> Self {
        self.vnodes_per_weight = n;
        self
    }

    /// Caps the share of one tenant's live sessions on any one replica (`None`, the default,
    /// disables the cap). See [`affinity`](crate::affinity#per-tenant-spread).
    pub fn tenant_share(mut self, share: Option<f64>) -> Self {
        self.tenant_share = share;
        self
    }

    /// Buckets tenants are hashed into for the spread cap (default 256).
    pub fn tenant_buckets(mut self, n: u32) -> Self {
        self.tenant_buckets = n;
        self
    }

    /// Validates the settings and builds the layer.
    pub fn build(self) -> Result<AffinityLayer<B>, AffinityConfigError> {
        BalanceFactor::new(self.balance_factor)?;
        let o = self.pinned_overload_factor;
        if o.is_nan() || o < 1.0 {
            return Err(AffinityConfigError::PinnedOverloadFactor(o));
        }
        if self.pin_ttl.is_zero() {
            return Err(AffinityConfigError::PinTtl);
        }
        if self.max_key_len == 0 {
            return Err(AffinityConfigError::MaxKeyLen);
        }
        if self.vnodes_per_weight == 0 || self.vnodes_per_weight > MAX_VNODES_PER_REPLICA {
            return Err(AffinityConfigError::VnodesPerWeight(self.vnodes_per_weight));
        }
        if let Some(s) = self.tenant_share {
            if !(s > 0.0 && s <= 1.0) {
                return Err(AffinityConfigError::TenantShare(s));
            }
            if self.tenant_buckets == 0 || self.tenant_buckets > 65_536 {
                return Err(AffinityConfigError::TenantBuckets(self.tenant_buckets));
            }
        }
        Ok(AffinityLayer {
            shared: Arc::new(self.into_shared()),
        })
    }

    /// Assumes validated (or default) settings.
    fn into_shared(self) -> Shared<B> {
        let factor = BalanceFactor::new(self.balance_factor).unwrap_or_default();
        let pins = self
            .pins
            .unwrap_or_else(|| Arc::new(MemoryPinTable::new(self.max_pins)));
        let spread = self
            .tenant_share
            .map(|s| TenantSpread::new(s, self.tenant_buckets, self.pin_ttl.as_secs_f64()));
        Shared::new(
            self.pool,
            Settings {
                key: self.key,
                factor,
                pinned_overload_factor: self.pinned_overload_factor,
                pin_ttl: self.pin_ttl,
                max_key_len: self.max_key_len,
                measure: self.measure,
                placement: self.placement,
                vnodes_per_weight: self.vnodes_per_weight,
            },
            pins,
            spread,
        )
    }
}
