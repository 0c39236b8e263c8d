//! Per-tenant spread: an optional cap on the share of one tenant's sessions per replica.
//!
//! The guide asks that "one tenant cannot pin all sticky sessions on one replica". With a share
//! `s` configured, a placement (new session, spill or failover) of tenant `t` on replica `r` is
//! allowed only while `count(t, r) + 1 <= max(1, ceil(s x (count(t) + 1)))`; otherwise the walk
//! goes on to the next replica in ring order.
//!
//! Kept simple, and approximate on purpose:
//! - **Bounded memory**: tenants are hashed ([`key_hash`](crate::pick::ring::key_hash)) into a fixed
//!   number of buckets (default 256); tenants sharing a bucket are capped together, which only
//!   makes the cap stricter. The table holds `buckets x replicas` cells, remapped by replica id
//!   when the membership changes.
//! - **Live sessions, estimated**: a cell counts the placements made on this gateway, decayed
//!   exponentially with the pin TTL as time constant, which tracks sessions whose pins are still
//!   alive without scanning the pin table (a remote table could not be scanned cheaply anyway).
//! - **Soft**: if no eligible replica satisfies both the cap and the load bound, the cap yields
//!   (the load bound and eligibility never do).
//! - **Local**: counts are per gateway instance; shared pins keep sessions where they are placed.

use std::collections::HashMap;

use parking_lot::{Mutex, MutexGuard};
use tokio::time::Instant;

use crate::pick::ring::key_hash;
use crate::pool::PoolSnapshot;
use crate::replica::ReplicaId;

#[derive(Debug, Clone, Copy)]
struct Cell {
    value: f64,
    at: Instant,
}

#[derive(Debug)]
struct Table {
    version: u64,
    ids: Vec<ReplicaId>,
    cells: Vec<Cell>,
}

/// Per-(tenant bucket, replica) decayed session counts.
#[derive(Debug)]
pub(crate) struct TenantSpread {
    share: f64,
    buckets: u32,
    tau_secs: f64,
    table: Mutex<Table>,
}

impl TenantSpread {
    pub(crate) fn new(share: f64, buckets: u32, tau_secs: f64) -> Self {
        TenantSpread {
            share,
            buckets: buckets.max(1),
            tau_secs: if tau_secs.is_finite() && tau_secs > 0.0 {
                tau_secs
            } else {
                1.0
            },
            table: Mutex::new(Table {
                version: u64::MAX,
                ids: Vec::new(),
                cells: Vec::new(),
            }),
        }
    }

    pub(crate) fn bucket(&self, tenant: &[u8]) -> usize {
        (key_hash(tenant) % u64::from(self.buckets)) as usize
    }

    /// Locks the table, remapped to `snapshot`'s membership.
    pub(crate) fn lock<B>(&self, snapshot: &PoolSnapshot<B>, now: Instant) -> SpreadGuard<'_> {
        let mut t = self.table.lock();
        if t.version != snapshot.version() {
            let old: HashMap<&ReplicaId, usize> =
                t.ids.iter().enumerate().map(|(i, id)| (id, i)).collect();
            let ids: Vec<ReplicaId> = snapshot.replicas().iter().map(|r| r.id().clone()).collect();
            let (n_old, n_new) = (t.ids.len(), ids.len());
            let mut cells = vec![
                Cell {
                    value: 0.0,
                    at: now
                };
                self.buckets as usize * n_new
            ];
            for b in 0..self.buckets as usize {
                for (j, id) in ids.iter().enumerate() {
                    if let Some(&i) = old.get(id) {
                        cells[b * n_new + j] = t.cells[b * n_old + i];
                    }
                }
            }
            drop(old);
            t.version = snapshot.version();
            t.ids = ids;
            t.cells = cells;
        }
        SpreadGuard {
            spread: self,
            table: t,
            now,
        }
    }
}

/// The locked table during one placement.
pub(crate) struct SpreadGuard<'a> {
    spread: &'a TenantSpread,
    table: MutexGuard<'a, Table>,
    now: Instant,
}

impl SpreadGuard<'_> {
    fn decayed(&self, c: Cell) -> f64 {
        let dt = self.now.saturating_duration_since(c.at).as_secs_f64();
        c.value * (-dt / self.spread.tau_secs).exp()
    }

    fn row(&self, bucket: usize) -> &[Cell] {
        let n = self.table.ids.len();
        self.table
            .cells
            .get(bucket * n..(bucket + 1) * n)
            .unwrap_or(&[])
    }

    /// The tenant's decayed session total in `bucket`.
    pub(crate) fn total(&self, bucket: usize) -> f64 {
        self.row(bucket).iter().map(|c| self.decayed(*c)).sum()
    }

    /// Whether one more session of the tenant in `bucket` may go to `replica`, given its
    /// `total`.
    pub(crate) fn allows(&self, bucket: usize, total: f64, replica: usize) -> bool {
        let Some(c) = self.row(bucket).get(replica) else {
            return true;
        };
        let cap = (self.spread.share * (total + 1.0)).ceil().max(1.0);
        // Decayed counts are fractional: compare to the nearest whole session, so the residue
        // of long-gone sessions never blocks a tenant's home.
        self.decayed(*c) + 1.0 < cap + 0.5
    }

    /// Counts one session of the tenant in `bucket` on `replica`.
    pub(crate) fn record(&mut self, bucket: usize, replica: usize) {
        let n = self.table.ids.len();
        if replica >= n {
            return;
        }
        let i = bucket * n + replica;
        if let Some(&c) = self.table.cells.get(i) {
            let value = self.decayed(c) + 1.0;
            let now = self.now;
            self.table.cells[i] = Cell { value, at: now };
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::pool::Pool;
    use crate::replica::ReplicaSpec;

    #[test]
    fn cap_follows_share_and_decays() {
        let pool = Pool::builder()
            .replica("a", ReplicaSpec::new("m"), ())
            .replica("b", ReplicaSpec::new("m"), ())
            .build()
            .unwrap();
        let snap = pool.snapshot();
        let spread = TenantSpread::new(0.5, 16, 60.0);
        let b = spread.bucket(b"acme");
        let t0 = Instant::now();
        let mut g = spread.lock(&snap, t0);
        // First session: allowed anywhere.
        assert!(g.allows(b, g.total(b), 0));
        g.record(b, 0);
        // Second: a already has 1 of 1; cap = ceil(0.5 x 2) = 1.
        assert!(!g.allows(b, g.total(b), 0));
        assert!(g.allows(b, g.total(b), 1));
        g.record(b, 1);
        // Third: cap = ceil(0.5 x 3) = 2: either replica.
        assert!(g.allows(b, g.total(b), 0));
        g.record(b, 0);
        g.record(b, 0);
        assert!(!g.allows(b, g.total(b), 0));
        drop(g);
        // Ten time constants later the counts have decayed: home is open again.
        let g = spread.lock(&snap, t0 + Duration::from_secs(600));
        assert!(g.total(b) < 0.01);
        assert!(g.allows(b, g.total(b), 0));
        // Other buckets were never touched.
        let other = (b + 1) % 16;
        assert_eq!(g.total(other), 0.0);
    }

    #[test]
    fn membership_change_keeps_counts_by_id() {
        let pool = Pool::builder()
            .replica("a", ReplicaSpec::new("m"), ())
            .replica("b", ReplicaSpec::new("m"), ())
            .build()
            .unwrap();
        let spread = TenantSpread::new(0.5, 4, 60.0);
        let t0 = Instant::now();
        let mut g = spread.lock(&pool.snapshot(), t0);
        g.record(0, 1); // one session on b
        drop(g);
        pool.remove("a").unwrap();
        pool.add("c", ReplicaSpec::new("m"), ()).unwrap();
        let snap = pool.snapshot();
        let g = spread.lock(&snap, t0);
        // b is now index 0, c index 1.
        assert_eq!(snap.replicas()[0].id().as_str(), "b");
        assert!((g.total(0) - 1.0).abs() < 1e-9);
        assert!(!g.allows(0, g.total(0), 0));
        assert!(g.allows(0, g.total(0), 1));
    }
}
