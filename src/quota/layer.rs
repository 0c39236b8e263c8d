use std::sync::Arc;

use super::config::QuotaConfig;
use super::service::Quota;
use super::shared::Shared;
use crate::store::CounterStore;

/// Applies tenant quotas to a service stack. See the [module docs](crate::quota).
///
/// Every service this layer builds shares one store client, one over-limit cache and one outage
/// breaker; two gateways share quotas by pointing their layers at the same store.
#[derive(Clone)]
pub struct QuotaLayer {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for QuotaLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QuotaLayer")
            .field("config", &self.shared.config)
            .finish_non_exhaustive()
    }
}

impl QuotaLayer {
    /// Quotas kept in `store` with `config`.
    pub fn new(store: impl CounterStore, config: QuotaConfig) -> Self {
        Self::from_arc(Arc::new(store), config)
    }

    /// Quotas kept in a shared, type-erased store.
    pub fn from_arc(store: Arc<dyn CounterStore>, config: QuotaConfig) -> Self {
        QuotaLayer {
            shared: Arc::new(Shared::new(store, config)),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &QuotaConfig {
        &self.shared.config
    }
}

impl<S> tower::Layer<S> for QuotaLayer {
    type Service = Quota<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Quota::from_shared(inner, self.shared.clone())
    }
}
