//! Helpers shared by the gateway's integration tests.

use replica_router_gateway::Gateway;

/// Requests in flight on all of `gw`'s replicas.
pub fn total_in_flight(gw: &Gateway) -> u64 {
    gw.pool()
        .snapshot()
        .replicas()
        .iter()
        .map(|r| r.state().in_flight())
        .sum()
}
