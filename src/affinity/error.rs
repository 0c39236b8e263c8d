//! Configuration errors of the affinity layer.

/// A rejected affinity setting.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum AffinityConfigError {
    /// The balance factor must be finite and > 1.
    #[error("balance factor must be finite and > 1, got {0}")]
    BalanceFactor(f64),
    /// The pinned-overload factor must be >= 1 (infinity allowed: never move for load).
    #[error("pinned overload factor must be >= 1 (or infinite), got {0}")]
    PinnedOverloadFactor(f64),
    /// The tenant share must be in `(0, 1]`.
    #[error("tenant share must be in (0, 1], got {0}")]
    TenantShare(f64),
    /// Tenant buckets must be in `1..=65536`.
    #[error("tenant buckets must be in 1..=65536, got {0}")]
    TenantBuckets(u32),
    /// Virtual nodes per unit of weight must be in `1..=16384`.
    #[error("virtual nodes per unit of weight must be in 1..=16384, got {0}")]
    VnodesPerWeight(u32),
    /// The pin TTL must be positive.
    #[error("pin TTL must be positive")]
    PinTtl,
    /// The longest accepted key must be at least 1 byte.
    #[error("max key length must be at least 1")]
    MaxKeyLen,
}

impl From<crate::pick::InvalidBalanceFactor> for AffinityConfigError {
    fn from(e: crate::pick::InvalidBalanceFactor) -> Self {
        AffinityConfigError::BalanceFactor(e.0)
    }
}
