//! The selection algorithms, apart from tower: weighted power of two choices ([`p2c`]) and the
//! consistent-hash ring with its allocation-free walk over distinct replicas and bounded-load
//! placement ([`ring`]).
//!
//! Everything here is a pure function of a [`PoolSnapshot`] (membership, weights, the replicas'
//! atomics) and a key or a random source: the picking layers ([`balance`](crate::balance),
//! [`affinity`](crate::affinity), [`dispatch`](crate::dispatch)) call it, and so can any
//! application that wants the decision without the layers.

pub mod p2c;
pub mod ring;

pub use self::p2c::{least_loaded_scan, pick_two_choices};

use crate::error::{NoReplicaReason, RouteError};
use crate::pool::PoolSnapshot;

/// A balance factor that is not finite and greater than 1.
#[derive(Debug, Clone, Copy, PartialEq, thiserror::Error)]
#[error("balance factor must be finite and > 1, got {0}")]
pub struct InvalidBalanceFactor(pub f64);

/// The error for "nothing to pick" in this snapshot.
pub fn no_replica<B>(snapshot: &PoolSnapshot<B>) -> RouteError {
    RouteError::NoReplica {
        reason: if snapshot.is_empty() {
            NoReplicaReason::EmptyPool
        } else {
            NoReplicaReason::NoneEligible
        },
    }
}
