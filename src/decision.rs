//! The routing decision the layers pass down to dispatch.
//!
//! A picking layer (affinity, least-in-flight, round-robin) stores one [`Decision`] in the
//! request's extensions. A picking layer that finds a decision already made passes the request
//! on untouched, so layers stack: affinity decides for keyed requests, least-in-flight for the
//! rest. [`Dispatch`](crate::dispatch::Dispatch) sends the request to the decided replica and
//! copies the decision into the response's extensions, so the caller learns where the request
//! went and why (for example: a [`DecisionReason::Failover`] means the new replica must replay
//! the conversation's prefill).

use std::fmt;

use crate::replica::ReplicaId;

/// Why a replica was chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum DecisionReason {
    /// The session went to its home replica (its ring owner, or where it is pinned).
    Home,
    /// The session's home was past its load bound; it went to the next replica with room.
    Spill,
    /// The session's replica was unhealthy, ejected, draining or removed; it moved. Its KV cache
    /// is lost: the new replica replays the prefill.
    Failover,
    /// No routing key: the least-loaded of two weighted random choices.
    LeastLoaded,
    /// No routing key: the next replica in rotation.
    RoundRobin,
    /// Dispatch found the decided replica gone at send time and re-picked the least loaded.
    Redirected,
}

impl DecisionReason {
    /// The lowercase name, as used in the `x-replica-affinity` header and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            DecisionReason::Home => "home",
            DecisionReason::Spill => "spill",
            DecisionReason::Failover => "failover",
            DecisionReason::LeastLoaded => "least-loaded",
            DecisionReason::RoundRobin => "round-robin",
            DecisionReason::Redirected => "redirected",
        }
    }
}

impl fmt::Display for DecisionReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Which replica serves a request, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    replica: ReplicaId,
    reason: DecisionReason,
    /// (snapshot version, index) so dispatch can skip the id lookup when membership is unchanged.
    slot: Option<(u64, u32)>,
}

impl Decision {
    /// A decision for `replica`.
    pub fn new(replica: ReplicaId, reason: DecisionReason) -> Self {
        Decision {
            replica,
            reason,
            slot: None,
        }
    }

    /// A decision for the replica at `index` of the snapshot with `version` (what a picking
    /// layer that read a [`PoolSnapshot`](crate::pool::PoolSnapshot) knows): dispatch then finds
    /// the replica without a lookup by id while the membership is unchanged.
    pub fn at_slot(replica: ReplicaId, reason: DecisionReason, version: u64, index: usize) -> Self {
        Decision {
            replica,
            reason,
            slot: u32::try_from(index).ok().map(|i| (version, i)),
        }
    }

    /// The chosen replica.
    pub fn replica(&self) -> &ReplicaId {
        &self.replica
    }

    /// Why it was chosen.
    pub fn reason(&self) -> DecisionReason {
        self.reason
    }

    pub(crate) fn slot(&self) -> Option<(u64, u32)> {
        self.slot
    }

    pub(crate) fn set_reason(&mut self, reason: DecisionReason) {
        self.reason = reason;
    }
}
