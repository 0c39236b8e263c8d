//! Session placement by predicted time to first token ([`Placement::PredictedTtft`]).
//!
//! Same contract as the ring placement (bounded loads as a hard cap, weights, tenant spread,
//! SLO advice, pins, failover, reasons `home` / `spill` / `failover`); only the choice among
//! the replicas within the bound changes. See [`TtftPlacement`] for the rules.
//!
//! [`Placement::PredictedTtft`]: crate::load::Placement::PredictedTtft

use std::ops::ControlFlow;
use std::sync::atomic::Ordering;

use rand::rngs::SmallRng;
use rand::SeedableRng;
use tokio::time::Instant;

use crate::affinity::service::{Keyed, Routed, Shared};
use crate::decision::{Decision, DecisionReason};
use crate::error::RouteError;
use crate::load::predict::{push_indexed, Candidates, TtftRequest};
use crate::load::TtftPlacement;
use crate::pick::no_replica;
use crate::pick::ring::{key_hash, Bound, LoadView, SnapshotView};
use crate::pins::PinError;
use crate::pool::PoolSnapshot;
use crate::replica::ReplicaId;

/// The best candidate: index, predicted seconds, uncached tokens.
type Best = (usize, f64, u64);

impl<B> Shared<B> {
    /// A fresh RNG for one decision's weighted samples (deterministic sequence per layer).
    fn draw_rng(&self) -> SmallRng {
        let n = self
            .draws
            .fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed);
        SmallRng::seed_from_u64(n)
    }

    /// The least predicted TTFT among the candidates passing `allow` and the load bound,
    /// excluding `exclude`: the first `ring_candidates` ring successors of `hash`, a weighted
    /// sample, and the replicas holding the longest prefix match.
    #[allow(clippy::too_many_arguments)]
    fn best_ttft(
        &self,
        snap: &PoolSnapshot<B>,
        view: &SnapshotView<'_, B>,
        bound: &Bound,
        tp: &TtftPlacement,
        req: &TtftRequest<'_>,
        hash: u64,
        exclude: Option<usize>,
        allow: &mut dyn FnMut(usize) -> bool,
    ) -> Option<Best> {
        let mut ok = |i: usize| {
            Some(i) != exclude
                && view.is_eligible(i)
                && bound.has_room(view.load(i), view.weight(i))
                && allow(i)
        };
        let mut cands = Candidates::new();
        let k = tp.ring_candidates.min(Candidates::CAP / 2);
        if k > 0 {
            self.with_ring(snap, |ring| {
                let mut found = 0;
                ring.walk(hash, |i| {
                    if ok(i) {
                        cands.push(i);
                        found += 1;
                        if found >= k {
                            return ControlFlow::Break(());
                        }
                    }
                    ControlFlow::Continue(())
                });
            });
        }
        if tp.sampled > 0 {
            let mut rng = self.draw_rng();
            for _ in 0..tp.sampled.min(Candidates::CAP / 4) {
                if let Some(i) = snap.sample_weighted(&mut rng) {
                    if ok(i) {
                        cands.push(i);
                    }
                }
            }
        }
        push_indexed(tp, req, snap, &mut ok, &mut cands);
        let replicas = snap.replicas();
        let mut best: Option<Best> = None;
        for &i in cands.as_slice() {
            let (t, unc) = tp.predict(req, &replicas[i], false);
            if best.is_none_or(|(_, b, _)| t < b) {
                best = Some((i, t, unc));
            }
        }
        best
    }

    /// [`Shared::decide`] under predicted-TTFT placement.
    pub(crate) fn decide_ttft(
        &self,
        keyed: &Keyed,
        pinned: Result<Option<ReplicaId>, PinError>,
        tp: &TtftPlacement,
    ) -> Result<Routed, RouteError> {
        let snapshot = self.pool.load();
        let snap: &PoolSnapshot<B> = &snapshot;
        let view = SnapshotView::new(snap, self.settings.measure);
        let bound = self.bound(snap, &view, keyed)?;
        let (store_up, pinned) = self.read_pin(pinned);
        let seen = pinned.clone();
        let req = tp.request_parts(keyed.prefix.as_ref(), keyed.estimated_tokens);
        let version = snap.version();
        let hash = key_hash(keyed.key.as_bytes());
        let advised = |i: usize| {
            keyed
                .advice
                .as_ref()
                .is_none_or(|a| !a.should_leave_home(version, i))
        };
        let replicas = snap.replicas();

        // Tenant spread: a soft cap, checked first with the cap and then without it.
        let spread = match (&self.spread, &keyed.tenant) {
            (Some(spread), Some(tenant)) => Some((spread, spread.bucket(tenant.as_bytes()))),
            _ => None,
        };
        let mut guard = spread.map(|(s, bucket)| (s.lock(snap, Instant::now()), bucket));
        let choose = |exclude: Option<usize>| -> Option<Best> {
            if let Some((g, bucket)) = guard.as_ref() {
                let total = g.total(*bucket);
                let found =
                    self.best_ttft(snap, &view, &bound, tp, &req, hash, exclude, &mut |i| {
                        advised(i) && g.allows(*bucket, total, i)
                    });
                if found.is_some() {
                    return found;
                }
            }
            self.best_ttft(snap, &view, &bound, tp, &req, hash, exclude, &mut |i| {
                advised(i)
            })
            .or_else(|| {
                // Nothing within the bound (or all advised against): the ring placement's own
                // fallbacks (least loaded, then ignoring the advice).
                let p = self.place(snap, &view, &bound, keyed, exclude)?;
                let (t, unc) = tp.predict(&req, &replicas[p.replica], false);
                Some((p.replica, t, unc))
            })
        };

        let (index, reason, uncached, placed) =
            match pinned.as_ref().map(|id| snap.get(id.as_str())) {
                Some(Some((i, r))) if r.state().is_eligible() => {
                    let cap = self.settings.pinned_overload_factor * bound.capacity(view.weight(i));
                    let leave = !advised(i);
                    let over = view.load(i) + bound.cost() > cap;
                    let forced = leave || over;
                    let (home_t, home_unc) = tp.predict(&req, r, true);
                    match choose(Some(i)) {
                        // Leaving for the SLO only pays if the new replica is not over it too.
                        Some((j, _, unc)) if forced && (!leave || advised(j)) => {
                            (j, DecisionReason::Spill, unc, true)
                        }
                        Some((j, t, unc)) if !forced && tp.should_spill(home_t, t) => {
                            (j, DecisionReason::Spill, unc, true)
                        }
                        _ => (i, DecisionReason::Home, home_unc, false),
                    }
                }
                Some(_) => {
                    let (j, _, unc) = choose(None).ok_or_else(|| no_replica(snap))?;
                    (j, DecisionReason::Failover, unc, true)
                }
                None => {
                    let (j, _, unc) = choose(None).ok_or_else(|| no_replica(snap))?;
                    // An unpinned session's first placement is its home: the prediction already
                    // weighed whatever the prefix index knows of its prompt, so nothing cached is
                    // left behind. `failover` still says its ring home is out.
                    let home = self.with_ring(snap, |ring| ring.home(hash));
                    let reason = match home {
                        Some(h) if h != j && !view.is_eligible(h) => DecisionReason::Failover,
                        _ => DecisionReason::Home,
                    };
                    (j, reason, unc, true)
                }
            };
        if placed {
            if let Some((g, bucket)) = guard.as_mut() {
                g.record(*bucket, index);
            }
        }
        drop(guard);
        self.metrics.decision(reason);
        let chosen = &replicas[index];
        let plan = tp.record(&req, chosen, uncached);
        let id = chosen.id().clone();
        let decision = Decision::at_slot(id.clone(), reason, version, index);
        let write = if store_up {
            self.pin(keyed.key.clone(), seen, id)
        } else {
            None
        };
        Ok(Routed {
            decision,
            write,
            plan: Some(plan),
        })
    }
}
