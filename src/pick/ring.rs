//! The consistent-hash ring and the bounded-load placement over it.
//!
//! # Hashing (stable across processes, machines and versions of Rust)
//!
//! Every hash here is **SipHash-2-4 with both keys zero** — the hasher `hashring` uses by default
//! ([`hashring::DefaultHashBuilder`], from `siphasher` 0.3) — fed with explicit bytes through one
//! `Hasher::write` call per field, never through `Hash` impls of `str`, `[u8]` or integers (those
//! add a `usize` length prefix whose width depends on the platform):
//!
//! - a routing key hashes as `SipHash24(k0 = 0, k1 = 0, key bytes)` ([`key_hash`]);
//! - virtual node `v` of replica `id` hashes as
//!   `SipHash24(0, 0, id as UTF-8 bytes || v as 4 little-endian bytes)` ([`vnode_hash`]).
//!
//! So two gateways that name their replicas the same way and give them the same weights build
//! the same ring, whatever order the replicas joined in, and place every key the same way.
//! `tests/affinity_ring.rs` pins a table of keys to expected replica ids to catch any change.
//!
//! # Virtual nodes
//!
//! Replica `i` gets `round(vnodes_per_weight x weight_i)` points on the ring, at least 1 and at
//! most [`MAX_VNODES_PER_REPLICA`] (default 160 per unit of weight, as vllm-router's
//! `consistent_hash` uses per replica), so its share of the key space follows its capacity.
//!
//! # Why our own table beside `hashring`
//!
//! `hashring` 0.3.6 keeps a sorted `Vec` and answers `get` by binary search, which is what we
//! need for the point lookup, but it does not expose the position it found, and its
//! `get_with_replicas` clones and rotates the whole ring per call and can return the same
//! physical replica several times. A bounded-load walk must visit *distinct* replicas in ring
//! order from the key's position without allocating. [`Ring`] therefore keeps its own sorted
//! table of `(point, replica index)` built from the same hash and the same [`VirtualNode`]s, and
//! answers the point lookup with the same rule as `hashring::HashRing::get` (the first point at
//! or after the key's hash, wrapping to the first): for every key, [`Ring::home`] equals what a
//! `hashring::HashRing<VirtualNode>` holding the same virtual nodes returns (a property test
//! checks this, and the benchmark compares both lookups). Points that collide (two equal 64-bit
//! hashes) are ordered by replica id, then virtual node index, so the order never depends on
//! join order.
//!
//! # Bounded loads
//!
//! [`place`] implements *consistent hashing with bounded loads* (Mirrokni, Thorup and
//! Zadimoghaddam, SODA 2018), weighted as HAProxy's `hash-balance-factor` does. With balance
//! factor `c > 1`, total load `L` over the eligible replicas, their total weight `W` and a
//! request of cost `k` (1 for "requests in flight"), replica `i` has room when
//!
//! ```text
//! load_i + k <= ceil(c x w_i x (L + k) / W)
//! ```
//!
//! that is: its load after taking the request stays within `c` times its weight's share of the
//! average, rounded up. (The rounding is done in the replica's own units so the bound does not
//! depend on how weights are scaled; with equal weights it is exactly `ceil(c x (L + k) / n)`.)
//! The key goes to the first eligible replica with room, visiting distinct replicas in ring order
//! from the key's position. With integer loads and `k = 1` one always exists: if none had room,
//! `L >= sum_i ceil(c w_i (L + 1) / W) >= c (L + 1) > L`. The walk's expected length is `O(1/(c -
//! 1)^2)` replicas.

use std::cell::RefCell;
use std::hash::{BuildHasher, Hash, Hasher};
use std::ops::ControlFlow;

use hashring::DefaultHashBuilder;

use super::InvalidBalanceFactor;
use crate::decision::DecisionReason;
use crate::pool::{LoadMeasure, PoolSnapshot};
use crate::replica::ReplicaId;

/// Virtual nodes per unit of capacity weight, by default.
pub const DEFAULT_VNODES_PER_WEIGHT: u32 = 160;

/// Most virtual nodes one replica gets, whatever its weight (bounds the ring's memory).
pub const MAX_VNODES_PER_REPLICA: u32 = 1 << 14;

/// Replicas whose visited-set fits in a 128-byte stack bitset during a walk; larger pools use a
/// reusable per-thread buffer.
const STACK_BITSET_REPLICAS: usize = 1024;

/// Key bytes that hash as exactly those bytes (one `Hasher::write`, no length prefix).
///
/// `hashring::HashRing::get(&KeyBytes(k))` hashes a key the way [`key_hash`] does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyBytes<'a>(pub &'a [u8]);

impl Hash for KeyBytes<'_> {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write(self.0);
    }
}

/// One virtual node of a replica: hashes as the id's UTF-8 bytes followed by the index as 4
/// little-endian bytes. Build a `hashring::HashRing<VirtualNode>` from these to get the plain
/// ring that [`Ring`] mirrors.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VirtualNode {
    /// The replica.
    pub replica: ReplicaId,
    /// Which of its virtual nodes.
    pub index: u32,
}

impl Hash for VirtualNode {
    fn hash<H: Hasher>(&self, state: &mut H) {
        write_vnode(state, self.replica.as_str(), self.index);
    }
}

fn write_vnode<H: Hasher>(state: &mut H, replica: &str, index: u32) {
    state.write(replica.as_bytes());
    state.write(&index.to_le_bytes());
}

/// The ring position of a routing key: SipHash-2-4, zero keys, over the key's bytes.
///
/// ```
/// use replica_router::pick::ring::key_hash;
/// // Stable everywhere: a fixed value for a fixed key.
/// assert_eq!(key_hash(b"conv-1"), key_hash(b"conv-1"));
/// assert_ne!(key_hash(b"conv-1"), key_hash(b"conv-2"));
/// ```
pub fn key_hash(key: &[u8]) -> u64 {
    DefaultHashBuilder.hash_one(KeyBytes(key))
}

/// The ring position of virtual node `index` of `replica`.
pub fn vnode_hash(replica: &str, index: u32) -> u64 {
    let mut h = DefaultHashBuilder.build_hasher();
    write_vnode(&mut h, replica, index);
    h.finish()
}

/// How many virtual nodes a replica of `weight` gets: `round(per_weight x weight)`, clamped to
/// `1..=MAX_VNODES_PER_REPLICA` (a non-finite or non-positive weight gets 1).
///
/// ```
/// use replica_router::pick::ring::vnode_count;
/// assert_eq!(vnode_count(1.0, 160), 160);
/// assert_eq!(vnode_count(1.5, 160), 240);
/// assert_eq!(vnode_count(0.0001, 160), 1);
/// assert_eq!(vnode_count(f64::NAN, 160), 1);
/// ```
pub fn vnode_count(weight: f64, per_weight: u32) -> u32 {
    let v = weight * f64::from(per_weight);
    if !v.is_finite() || v < 1.0 {
        return 1;
    }
    let r = v.round();
    if r >= f64::from(MAX_VNODES_PER_REPLICA) {
        MAX_VNODES_PER_REPLICA
    } else {
        r as u32
    }
}

/// A consistent-hash ring over one membership: sorted virtual-node points and, for each, the
/// index of its replica.
///
/// Built once per membership version; lookups and walks never allocate (pools of more than 1024
/// replicas reuse a per-thread buffer for the visited set).
///
/// ```
/// use replica_router::pick::ring::{key_hash, Ring};
/// let ring = Ring::build([("gpu-0", 1.0), ("gpu-1", 1.0), ("gpu-2", 2.0)], 160);
/// assert_eq!(ring.members(), 3);
/// assert_eq!(ring.len(), 640);
/// let home = ring.home(key_hash(b"conv-42")).unwrap();
/// // Distinct replicas in ring order from the key, home first.
/// let order = ring.order(key_hash(b"conv-42"));
/// assert_eq!(order[0], home);
/// assert_eq!(order.len(), 3);
/// ```
#[derive(Debug, Clone)]
pub struct Ring {
    points: Box<[u64]>,
    owners: Box<[u32]>,
    members: usize,
}

impl Ring {
    /// Builds the ring of `members` (id and capacity weight, in index order) with
    /// `vnodes_per_weight` virtual nodes per unit of weight.
    pub fn build<'a, I>(members: I, vnodes_per_weight: u32) -> Ring
    where
        I: IntoIterator<Item = (&'a str, f64)>,
    {
        let members: Vec<(&str, f64)> = members.into_iter().collect();
        let total: usize = members
            .iter()
            .map(|(_, w)| vnode_count(*w, vnodes_per_weight) as usize)
            .sum();
        let mut table: Vec<(u64, u32, u32)> = Vec::with_capacity(total);
        for (i, (id, w)) in members.iter().enumerate() {
            let owner = u32::try_from(i).unwrap_or(u32::MAX);
            for v in 0..vnode_count(*w, vnodes_per_weight) {
                table.push((vnode_hash(id, v), owner, v));
            }
        }
        table.sort_unstable_by(|a, b| {
            a.0.cmp(&b.0)
                .then_with(|| members[a.1 as usize].0.cmp(members[b.1 as usize].0))
                .then_with(|| a.2.cmp(&b.2))
        });
        Ring {
            points: table.iter().map(|t| t.0).collect(),
            owners: table.iter().map(|t| t.1).collect(),
            members: members.len(),
        }
    }

    /// The ring of a pool snapshot's members (indices are the snapshot's), by base capacity
    /// weight. Health plays no part: it is checked during walks.
    pub fn from_snapshot<B>(snapshot: &PoolSnapshot<B>, vnodes_per_weight: u32) -> Ring {
        Ring::build(
            snapshot
                .replicas()
                .iter()
                .map(|r| (r.id().as_str(), r.weight().get())),
            vnodes_per_weight,
        )
    }

    /// Number of replicas.
    pub fn members(&self) -> usize {
        self.members
    }

    /// Number of virtual nodes.
    pub fn len(&self) -> usize {
        self.points.len()
    }

    /// Whether the ring has no replica.
    pub fn is_empty(&self) -> bool {
        self.points.is_empty()
    }

    /// Position of the first point at or after `hash`, wrapping (the rule of
    /// `hashring::HashRing::get`).
    fn start(&self, hash: u64) -> usize {
        let p = self.points.partition_point(|&x| x < hash);
        if p == self.points.len() {
            0
        } else {
            p
        }
    }

    /// The replica owning the key with ring position `hash` (its home), ignoring health.
    pub fn home(&self, hash: u64) -> Option<usize> {
        if self.points.is_empty() {
            return None;
        }
        Some(self.owners[self.start(hash)] as usize)
    }

    /// Visits the distinct replicas in ring order from `hash` (home first), calling `f` with each
    /// replica index until it breaks; returns the break value. Does not allocate (see the type
    /// docs for very large pools).
    pub fn walk<T>(&self, hash: u64, mut f: impl FnMut(usize) -> ControlFlow<T>) -> Option<T> {
        if self.points.is_empty() {
            return None;
        }
        let start = self.start(hash);
        let words = self.members.div_ceil(64);
        if self.members <= STACK_BITSET_REPLICAS {
            let mut bits = [0u64; STACK_BITSET_REPLICAS / 64];
            return self.walk_with(start, &mut bits[..words], &mut f);
        }
        thread_local! {
            static SCRATCH: RefCell<Vec<u64>> = const { RefCell::new(Vec::new()) };
        }
        SCRATCH.with(|cell| match cell.try_borrow_mut() {
            Ok(mut v) => {
                v.clear();
                v.resize(words, 0);
                self.walk_with(start, &mut v, &mut f)
            }
            // Re-entered from inside `f`: fall back to a fresh buffer.
            Err(_) => self.walk_with(start, &mut vec![0; words], &mut f),
        })
    }

    fn walk_with<T>(
        &self,
        start: usize,
        seen: &mut [u64],
        f: &mut impl FnMut(usize) -> ControlFlow<T>,
    ) -> Option<T> {
        let n = self.points.len();
        let mut distinct = 0;
        let mut pos = start;
        for _ in 0..n {
            let owner = self.owners[pos] as usize;
            pos += 1;
            if pos == n {
                pos = 0;
            }
            let (word, bit) = (owner / 64, 1u64 << (owner % 64));
            let Some(w) = seen.get_mut(word) else {
                continue;
            };
            if *w & bit != 0 {
                continue;
            }
            *w |= bit;
            if let ControlFlow::Break(t) = f(owner) {
                return Some(t);
            }
            distinct += 1;
            if distinct == self.members {
                break;
            }
        }
        None
    }

    /// The distinct replicas in ring order from `hash`, home first (allocates; for tests and
    /// diagnostics).
    pub fn order(&self, hash: u64) -> Vec<usize> {
        let mut out = Vec::with_capacity(self.members);
        self.walk(hash, |i| {
            out.push(i);
            ControlFlow::<()>::Continue(())
        });
        out
    }
}

/// The balance factor `c` of bounded-load hashing: finite and > 1.
#[derive(Debug, Clone, Copy, PartialEq, PartialOrd)]
pub struct BalanceFactor(f64);

impl BalanceFactor {
    /// The default, 1.25: no replica above 125% of its share of the average load.
    pub const DEFAULT: BalanceFactor = BalanceFactor(1.25);

    /// Validates `c`: NaN, infinite or `<= 1` is an error.
    ///
    /// ```
    /// use replica_router::pick::ring::BalanceFactor;
    /// assert!(BalanceFactor::new(1.25).is_ok());
    /// assert!(BalanceFactor::new(1.0).is_err());
    /// assert!(BalanceFactor::new(f64::NAN).is_err());
    /// ```
    pub fn new(c: f64) -> Result<BalanceFactor, InvalidBalanceFactor> {
        if c.is_finite() && c > 1.0 {
            Ok(BalanceFactor(c))
        } else {
            Err(InvalidBalanceFactor(c))
        }
    }

    /// The value.
    pub fn get(self) -> f64 {
        self.0
    }
}

impl Default for BalanceFactor {
    fn default() -> Self {
        BalanceFactor::DEFAULT
    }
}

/// What placement needs to know about each replica, by index (the ring's indices).
///
/// The layer reads a pool snapshot's atomics; property tests drive it with counts of placed keys.
pub trait LoadView {
    /// Whether the replica may take new sessions (healthy, not draining).
    fn is_eligible(&self, index: usize) -> bool;
    /// Its capacity weight (> 0).
    fn weight(&self, index: usize) -> f64;
    /// Its current load (requests in flight, or placed keys in a test).
    fn load(&self, index: usize) -> f64;
}

/// Plain slices as a [`LoadView`]: `(eligible, weight, load)` per replica.
impl LoadView for [(bool, f64, f64)] {
    fn is_eligible(&self, index: usize) -> bool {
        self.get(index).is_some_and(|r| r.0)
    }
    fn weight(&self, index: usize) -> f64 {
        self.get(index).map_or(0.0, |r| r.1)
    }
    fn load(&self, index: usize) -> f64 {
        self.get(index).map_or(0.0, |r| r.2)
    }
}

/// A pool snapshot as a [`LoadView`]: live eligibility, effective weight (after slow start) and
/// load by `measure`, read from the replicas' atomics.
#[derive(Debug)]
pub struct SnapshotView<'a, B> {
    snapshot: &'a PoolSnapshot<B>,
    measure: LoadMeasure,
}

impl<'a, B> SnapshotView<'a, B> {
    /// A view of `snapshot` with load measured by `measure`.
    pub fn new(snapshot: &'a PoolSnapshot<B>, measure: LoadMeasure) -> Self {
        SnapshotView { snapshot, measure }
    }
}

impl<B> LoadView for SnapshotView<'_, B> {
    fn is_eligible(&self, index: usize) -> bool {
        self.snapshot
            .replicas()
            .get(index)
            .is_some_and(|r| r.state().is_eligible())
    }
    fn weight(&self, index: usize) -> f64 {
        self.snapshot
            .replicas()
            .get(index)
            .map_or(0.0, |r| r.current_weight(self.snapshot.slow_start()))
    }
    fn load(&self, index: usize) -> f64 {
        self.snapshot
            .replicas()
            .get(index)
            .map_or(0.0, |r| self.measure.raw(r.state()) as f64)
    }
}

/// The load bound of one placement: `capacity(w) = ceil(c x w x (L + k) / W)`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Bound {
    per_weight: f64,
    cost: f64,
}

impl Bound {
    /// The bound for a request of `cost` over the eligible replicas among the first `members`
    /// of `view`. `None` when no replica is eligible (or their weights sum to zero).
    pub fn over<V: LoadView + ?Sized>(
        view: &V,
        members: usize,
        factor: BalanceFactor,
        cost: f64,
    ) -> Option<Bound> {
        let (mut load, mut weight) = (0.0, 0.0);
        for i in 0..members {
            if view.is_eligible(i) {
                load += view.load(i);
                weight += view.weight(i);
            }
        }
        Bound::from_totals(factor, load, weight, cost)
    }

    /// The bound from totals over the eligible replicas.
    pub fn from_totals(
        factor: BalanceFactor,
        total_load: f64,
        total_weight: f64,
        cost: f64,
    ) -> Option<Bound> {
        let cost = if cost.is_finite() && cost > 0.0 {
            cost
        } else {
            1.0
        };
        if !(total_weight.is_finite() && total_weight > 0.0) {
            return None;
        }
        let total_load = if total_load.is_finite() {
            total_load.max(0.0)
        } else {
            0.0
        };
        Some(Bound {
            per_weight: factor.get() * (total_load + cost) / total_weight,
            cost,
        })
    }

    /// The most load a replica of `weight` may hold after this placement: its share
    /// `c x (total + cost) x weight / total weight`, rounded up to a whole number of this
    /// request's cost (the ceiling of Mirrokni-Thorup-Zadimoghaddam's bound in units of one
    /// request; for unit costs, the plain ceiling). So a replica with nothing in flight always has
    /// room for the request, whether load counts requests or tokens.
    pub fn capacity(&self, weight: f64) -> f64 {
        let share = self.per_weight * weight;
        if self.cost == 1.0 {
            return share.ceil();
        }
        let units = (share / self.cost).ceil();
        if units.is_finite() {
            units * self.cost
        } else {
            share
        }
    }

    /// Whether a replica with `load` and `weight` has room for this request.
    pub fn has_room(&self, load: f64, weight: f64) -> bool {
        load + self.cost <= self.capacity(weight)
    }

    /// The request's cost.
    pub fn cost(&self) -> f64 {
        self.cost
    }
}

/// Where a key was placed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placement {
    /// The chosen replica's index.
    pub replica: usize,
    /// The key's ring home (its first replica in ring order), eligible or not.
    pub home: usize,
    /// [`Home`](DecisionReason::Home) if the home took it,
    /// [`Failover`](DecisionReason::Failover) if the home is not eligible,
    /// [`Spill`](DecisionReason::Spill) if the home had no room (or was not allowed).
    pub reason: DecisionReason,
    /// False when no replica had room and the least-loaded eligible one was taken instead (only
    /// possible with non-integer costs or loads changing during the walk).
    pub within_bound: bool,
}

fn reason<V: LoadView + ?Sized>(view: &V, home: usize, chosen: usize) -> DecisionReason {
    if chosen == home {
        DecisionReason::Home
    } else if !view.is_eligible(home) {
        DecisionReason::Failover
    } else {
        DecisionReason::Spill
    }
}

/// The first replica in ring order from `hash` that is eligible, passes `allow`, and has room
/// under `bound`. `None` if there is none.
pub fn place_bounded<V: LoadView + ?Sized>(
    ring: &Ring,
    hash: u64,
    bound: &Bound,
    view: &V,
    mut allow: impl FnMut(usize) -> bool,
) -> Option<Placement> {
    let mut home = None;
    ring.walk(hash, |i| {
        let home = *home.get_or_insert(i);
        if view.is_eligible(i) && allow(i) && bound.has_room(view.load(i), view.weight(i)) {
            ControlFlow::Break(Placement {
                replica: i,
                home,
                reason: reason(view, home, i),
                within_bound: true,
            })
        } else {
            ControlFlow::Continue(())
        }
    })
}

/// The eligible replica passing `allow` with the least weighted load after taking the request
/// (ties to the earliest in ring order from `hash`). The fallback when nothing has room.
pub fn place_least_loaded<V: LoadView + ?Sized>(
    ring: &Ring,
    hash: u64,
    bound: &Bound,
    view: &V,
    mut allow: impl FnMut(usize) -> bool,
) -> Option<Placement> {
    let mut home = None;
    let mut best: Option<(usize, f64)> = None;
    ring.walk(hash, |i| {
        home.get_or_insert(i);
        if view.is_eligible(i) && allow(i) {
            let w = view.weight(i);
            let l = (view.load(i) + bound.cost()) / w;
            if l.is_finite() && best.is_none_or(|(_, b)| l < b) {
                best = Some((i, l));
            }
        }
        ControlFlow::<()>::Continue(())
    });
    let (i, _) = best?;
    let home = home?;
    Some(Placement {
        replica: i,
        home,
        reason: reason(view, home, i),
        within_bound: false,
    })
}

/// Bounded-load placement of one request of cost 1: the first eligible replica with room in ring
/// order from `hash`, else the least loaded eligible one. `None` only when no replica is
/// eligible.
///
/// A pure function of the ring, the key's hash and `view`, so property tests drive it with
/// counts of placed keys.
///
/// ```
/// use replica_router::pick::ring::{key_hash, place, BalanceFactor, Ring};
/// use replica_router::decision::DecisionReason;
/// let ring = Ring::build([("a", 1.0), ("b", 1.0)], 160);
/// let h = key_hash(b"conv-7");
/// let home = ring.home(h).unwrap();
/// // Idle pool: the key goes home.
/// let idle = [(true, 1.0, 0.0), (true, 1.0, 0.0)];
/// let p = place(&ring, h, BalanceFactor::DEFAULT, &idle[..]).unwrap();
/// assert_eq!((p.replica, p.reason), (home, DecisionReason::Home));
/// // Home far above the average: the key spills to the other replica.
/// let mut busy = idle;
/// busy[home].2 = 10.0;
/// let p = place(&ring, h, BalanceFactor::DEFAULT, &busy[..]).unwrap();
/// assert_eq!((p.replica, p.reason), (1 - home, DecisionReason::Spill));
/// ```
pub fn place<V: LoadView + ?Sized>(
    ring: &Ring,
    hash: u64,
    factor: BalanceFactor,
    view: &V,
) -> Option<Placement> {
    let bound = Bound::over(view, ring.members(), factor, 1.0)?;
    place_bounded(ring, hash, &bound, view, |_| true)
        .or_else(|| place_least_loaded(ring, hash, &bound, view, |_| true))
}
