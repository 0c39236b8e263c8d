//! The replica pool: live membership and per-replica state.
//!
//! A [`Pool`] is a cheap-to-clone handle. Readers on the request path load an immutable
//! [`PoolSnapshot`] (an `Arc` swapped atomically with [`arc_swap`], the pattern pingora's
//! selectors use) and read per-replica counters from atomics in [`ReplicaState`]; no lock is held
//! across a pick. Writers (add, remove, drain, health changes) serialize on a mutex, build a new
//! snapshot and swap it in.
//!
//! Membership changes bump [`PoolSnapshot::version`]; layers that derive structures from the
//! membership (the affinity ring) rebuild them when the version changes. Health and drain changes
//! keep the version (the membership is the same) but rebuild the snapshot's list of eligible
//! replicas.
//!
//! # Example
//! ```
//! use replica_router::pool::Pool;
//! use replica_router::replica::ReplicaSpec;
//!
//! let spec = ReplicaSpec::new("llama-3-70b").tensor_parallel(2);
//! let pool = Pool::builder()
//!     .replica("gpu-0-1", spec.clone(), ())
//!     .replica("gpu-2-3", spec, ())
//!     .build()
//!     .unwrap();
//! assert_eq!(pool.snapshot().len(), 2);
//! assert_eq!(pool.total_gpus(), 4);
//! ```

mod state;

use std::collections::HashMap;
use std::sync::Arc;

use arc_swap::ArcSwap;
use parking_lot::Mutex;
use rand::Rng;
use tokio::time::Instant;

pub use self::state::{Health, ReplicaState, SlowStart};
use crate::replica::PoolError;
use crate::replica::{ReplicaId, ReplicaSpec, SpecPolicy, Weight};

/// One member of a pool: identity, spec, validated weight, backend and live state.
#[derive(Debug)]
pub struct Replica<B> {
    id: ReplicaId,
    spec: ReplicaSpec,
    weight: Weight,
    backend: B,
    state: Arc<ReplicaState>,
}

impl<B> Replica<B> {
    /// The replica's id.
    pub fn id(&self) -> &ReplicaId {
        &self.id
    }

    /// The replica's spec.
    pub fn spec(&self) -> &ReplicaSpec {
        &self.spec
    }

    /// The validated capacity weight.
    pub fn weight(&self) -> Weight {
        self.weight
    }

    /// The backend that serves its requests.
    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// The live state.
    pub fn state(&self) -> &Arc<ReplicaState> {
        &self.state
    }

    /// Weight after slow start at `now`.
    pub fn effective_weight(&self, slow_start: &SlowStart, now: Instant) -> f64 {
        self.weight.get() * self.state.ramp_factor(slow_start, now)
    }

    /// Weight after slow start now; reads the clock only while the replica is ramping.
    pub fn current_weight(&self, slow_start: &SlowStart) -> f64 {
        if self.state.is_ramping() {
            self.effective_weight(slow_start, Instant::now())
        } else {
            self.weight.get()
        }
    }
}

/// What counts as a replica's load for least-loaded picks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LoadMeasure {
    /// Requests in flight (the guide's "least in-flight").
    #[default]
    InFlightRequests,
    /// Estimated tokens in flight: long prompts weigh more than short ones.
    InFlightTokens,
}

impl LoadMeasure {
    /// The raw load of a replica under this measure.
    pub fn raw(self, state: &ReplicaState) -> u64 {
        match self {
            LoadMeasure::InFlightRequests => state.in_flight(),
            LoadMeasure::InFlightTokens => state.in_flight_tokens(),
        }
    }
}

/// An immutable view of the pool's membership.
#[derive(Debug)]
pub struct PoolSnapshot<B> {
    version: u64,
    replicas: Vec<Arc<Replica<B>>>,
    index: HashMap<ReplicaId, usize>,
    /// Indices of eligible replicas (healthy, not draining) at build time.
    eligible: Vec<u32>,
    /// Running sums of the eligible replicas' base weights, for weighted sampling.
    cumulative: Vec<f64>,
    slow_start: SlowStart,
}

impl<B> PoolSnapshot<B> {
    fn build(version: u64, replicas: Vec<Arc<Replica<B>>>, slow_start: SlowStart) -> Self {
        let index = replicas
            .iter()
            .enumerate()
            .map(|(i, r)| (r.id.clone(), i))
            .collect();
        let mut eligible = Vec::new();
        let mut cumulative = Vec::new();
        let mut sum = 0.0;
        for (i, r) in replicas.iter().enumerate() {
            if r.state.is_eligible() {
                eligible.push(i as u32);
                sum += r.weight.get();
                cumulative.push(sum);
            }
        }
        PoolSnapshot {
            version,
            replicas,
            index,
            eligible,
            cumulative,
            slow_start,
        }
    }

    /// Membership version: changes whenever a replica is added or removed.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// All members, in the order they joined.
    pub fn replicas(&self) -> &[Arc<Replica<B>>] {
        &self.replicas
    }

    /// Number of members.
    pub fn len(&self) -> usize {
        self.replicas.len()
    }

    /// Whether the pool has no members.
    pub fn is_empty(&self) -> bool {
        self.replicas.is_empty()
    }

    /// The member with `id` and its index.
    pub fn get(&self, id: &str) -> Option<(usize, &Arc<Replica<B>>)> {
        let i = *self.index.get(id)?;
        Some((i, &self.replicas[i]))
    }

    /// Indices (into [`replicas`](Self::replicas)) of the members that were eligible when the
    /// snapshot was built.
    pub fn eligible(&self) -> &[u32] {
        &self.eligible
    }

    /// The slow-start settings in force.
    pub fn slow_start(&self) -> &SlowStart {
        &self.slow_start
    }

    /// Sum over members of TP x PP.
    pub fn total_gpus(&self) -> u64 {
        self.replicas.iter().map(|r| r.spec.gpus()).sum()
    }

    /// Sum of the eligible members' base weights.
    pub fn eligible_weight(&self) -> f64 {
        self.cumulative.last().copied().unwrap_or(0.0)
    }

    /// Samples an eligible member with probability proportional to its base weight. Returns its
    /// index, or `None` when no member is eligible.
    pub fn sample_weighted<R: Rng + ?Sized>(&self, rng: &mut R) -> Option<usize> {
        let total = self.eligible_weight();
        if self.eligible.is_empty() || total <= 0.0 {
            return None;
        }
        let x = rng.random::<f64>() * total;
        let pos = self.cumulative.partition_point(|&c| c <= x);
        let pos = pos.min(self.eligible.len() - 1);
        Some(self.eligible[pos] as usize)
    }

    /// A replica's load normalized by its effective weight (`raw load / weight`), the quantity
    /// least-loaded policies compare. Reads the clock only while the replica is ramping up.
    pub fn weighted_load(&self, index: usize, measure: LoadMeasure) -> f64 {
        let r = &self.replicas[index];
        measure.raw(&r.state) as f64 / r.current_weight(&self.slow_start)
    }
}

struct Shared<B> {
    current: ArcSwap<PoolSnapshot<B>>,
    write: Mutex<()>,
    policy: SpecPolicy,
    slow_start: SlowStart,
    epoch: Instant,
    changes: tokio::sync::watch::Sender<u64>,
}

/// A live replica set. Cloning is cheap; clones share the same membership.
pub struct Pool<B> {
    shared: Arc<Shared<B>>,
}

impl<B> Clone for Pool<B> {
    fn clone(&self) -> Self {
        Pool {
            shared: self.shared.clone(),
        }
    }
}

impl<B> std::fmt::Debug for Pool<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let snap = self.shared.current.load();
        f.debug_struct("Pool")
            .field("version", &snap.version)
            .field(
                "replicas",
                &snap.replicas.iter().map(|r| &r.id).collect::<Vec<_>>(),
            )
            .finish()
    }
}

/// Builds a [`Pool`].
pub struct PoolBuilder<B> {
    policy: SpecPolicy,
    slow_start: SlowStart,
    members: Vec<(Result<ReplicaId, PoolError>, ReplicaSpec, B)>,
    allow_empty: bool,
}

impl<B> Default for PoolBuilder<B> {
    fn default() -> Self {
        PoolBuilder {
            policy: SpecPolicy::default(),
            slow_start: SlowStart::default(),
            members: Vec::new(),
            allow_empty: false,
        }
    }
}

impl<B> PoolBuilder<B> {
    /// How strictly replicas must agree on their spec (default: identical model, quantization,
    /// TP and PP).
    pub fn spec_policy(mut self, policy: SpecPolicy) -> Self {
        self.policy = policy;
        self
    }

    /// Slow start for replicas that join or are re-admitted after the pool is built.
    pub fn slow_start(mut self, slow_start: SlowStart) -> Self {
        self.slow_start = slow_start;
        self
    }

    /// Adds a replica.
    pub fn replica(mut self, id: impl AsRef<str>, spec: ReplicaSpec, backend: B) -> Self {
        self.members.push((ReplicaId::new(id), spec, backend));
        self
    }

    /// Lets [`build`](Self::build) succeed with no replicas (for pools filled by discovery).
    pub fn allow_empty(mut self) -> Self {
        self.allow_empty = true;
        self
    }

    /// Validates every replica and builds the pool.
    ///
    /// Fails on no replicas ([`PoolError::Empty`], unless [`allow_empty`](Self::allow_empty)),
    /// duplicate ids, invalid weights or specs, and spec mismatches (naming the odd replica).
    pub fn build(self) -> Result<Pool<B>, PoolError> {
        if self.members.is_empty() && !self.allow_empty {
            return Err(PoolError::Empty);
        }
        let epoch = Instant::now();
        let mut replicas: Vec<Arc<Replica<B>>> = Vec::with_capacity(self.members.len());
        for (id, spec, backend) in self.members {
            let id = id?;
            let weight = spec.validate(&id)?;
            if replicas.iter().any(|r| r.id == id) {
                return Err(PoolError::DuplicateReplica(id));
            }
            if let Some(first) = replicas.first() {
                self.policy.check(&first.spec, &id, &spec)?;
            }
            replicas.push(Arc::new(Replica {
                state: Arc::new(ReplicaState::new(id.clone(), epoch)),
                id,
                spec,
                weight,
                backend,
            }));
        }
        let (changes, _) = tokio::sync::watch::channel(1);
        Ok(Pool {
            shared: Arc::new(Shared {
                current: ArcSwap::from_pointee(PoolSnapshot::build(1, replicas, self.slow_start)),
                write: Mutex::new(()),
                policy: self.policy,
                slow_start: self.slow_start,
                epoch,
                changes,
            }),
        })
    }
}

impl<B> Pool<B> {
    /// Starts building a pool.
    pub fn builder() -> PoolBuilder<B> {
        PoolBuilder::default()
    }

    /// The current membership.
    pub fn snapshot(&self) -> Arc<PoolSnapshot<B>> {
        self.shared.current.load_full()
    }

    /// The current membership without touching its reference count (for hot paths; do not hold
    /// it across an `.await`).
    pub fn load(&self) -> arc_swap::Guard<Arc<PoolSnapshot<B>>> {
        self.shared.current.load()
    }

    /// Sum over members of TP x PP: the GPUs this pool occupies.
    pub fn total_gpus(&self) -> u64 {
        self.load().total_gpus()
    }

    /// Slow-start settings.
    pub fn slow_start(&self) -> SlowStart {
        self.shared.slow_start
    }

    /// A receiver that changes whenever the membership or eligibility changes.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.shared.changes.subscribe()
    }

    /// Replaces the snapshot with `f(members)`, keeping or bumping the version.
    fn rebuild(&self, bump: bool, members: Vec<Arc<Replica<B>>>) {
        let old = self.shared.current.load();
        let version = old.version + u64::from(bump);
        let snap = PoolSnapshot::build(version, members, self.shared.slow_start);
        self.shared.current.store(Arc::new(snap));
        self.shared.changes.send_modify(|v| *v += 1);
    }

    fn with_replica<T>(&self, id: &str, f: impl FnOnce(&Replica<B>) -> T) -> Result<T, PoolError> {
        let _w = self.shared.write.lock();
        let snap = self.shared.current.load_full();
        let (_, r) = snap
            .get(id)
            .ok_or_else(|| PoolError::UnknownReplica(unknown_id(id)))?;
        let out = f(r);
        self.rebuild(false, snap.replicas.clone());
        Ok(out)
    }

    /// The pool's spec policy.
    pub fn spec_policy(&self) -> SpecPolicy {
        self.shared.policy
    }

    /// Checks that a replica could join now (valid id, spec and weight, no member with that id,
    /// the pool's [`SpecPolicy`]) without adding it, so a new replica can be validated before
    /// paying for its weight download. Returns the validated id.
    ///
    /// ```
    /// use replica_router::pool::Pool;
    /// use replica_router::replica::ReplicaSpec;
    /// let pool = Pool::builder().replica("a", ReplicaSpec::new("m"), ()).build().unwrap();
    /// assert!(pool.check_new("b", &ReplicaSpec::new("m")).is_ok());
    /// assert!(pool.check_new("a", &ReplicaSpec::new("m")).is_err()); // duplicate
    /// assert!(pool.check_new("c", &ReplicaSpec::new("other")).is_err()); // model mismatch
    /// ```
    pub fn check_new(&self, id: &str, spec: &ReplicaSpec) -> Result<ReplicaId, PoolError> {
        let id = ReplicaId::new(id)?;
        spec.validate(&id)?;
        let snap = self.shared.current.load();
        if snap.index.contains_key(id.as_str()) {
            return Err(PoolError::DuplicateReplica(id));
        }
        if let Some(first) = snap.replicas.first() {
            self.shared.policy.check(&first.spec, &id, spec)?;
        }
        Ok(id)
    }

    /// Adds a replica at run time. It starts healthy; with slow start configured, its weight
    /// ramps up (its prefix cache is cold).
    pub fn add(&self, id: impl AsRef<str>, spec: ReplicaSpec, backend: B) -> Result<(), PoolError> {
        let id = ReplicaId::new(id)?;
        let weight = spec.validate(&id)?;
        let _w = self.shared.write.lock();
        let snap = self.shared.current.load_full();
        if snap.index.contains_key(id.as_str()) {
            return Err(PoolError::DuplicateReplica(id));
        }
        if let Some(first) = snap.replicas.first() {
            self.shared.policy.check(&first.spec, &id, &spec)?;
        }
        let state = Arc::new(ReplicaState::new(id.clone(), self.shared.epoch));
        if !self.shared.slow_start.window.is_zero() {
            state.start_ramp(Instant::now());
        }
        let mut members = snap.replicas.clone();
        members.push(Arc::new(Replica {
            id,
            spec,
            weight,
            backend,
            state,
        }));
        self.rebuild(true, members);
        Ok(())
    }

    /// Removes a replica at once. Requests already in flight on it still finish (they hold its
    /// state); affinity moves its sessions. Returns the removed member.
    pub fn remove(&self, id: &str) -> Result<Arc<Replica<B>>, PoolError> {
        let _w = self.shared.write.lock();
        let snap = self.shared.current.load_full();
        let (i, _) = snap
            .get(id)
            .ok_or_else(|| PoolError::UnknownReplica(unknown_id(id)))?;
        let mut members = snap.replicas.clone();
        let removed = members.remove(i);
        self.rebuild(true, members);
        Ok(removed)
    }

    /// Starts draining a replica: it gets no new requests, and the returned [`Drain`] completes
    /// when its in-flight requests have finished.
    pub fn drain(&self, id: &str) -> Result<Drain, PoolError> {
        self.with_replica(id, |r| {
            r.state.set_draining(true);
            Drain {
                state: r.state.clone(),
            }
        })
    }

    /// Ends a drain: the replica takes new requests again.
    pub fn undrain(&self, id: &str) -> Result<(), PoolError> {
        self.with_replica(id, |r| r.state.set_draining(false))
    }

    /// Sets a replica's health (for active health checks).
    pub fn set_health(&self, id: &str, health: Health) -> Result<(), PoolError> {
        self.with_replica(id, |r| r.state.set_health(health))
    }

    /// Ejects a replica (passive outlier detection): no new requests until
    /// [`readmit`](Self::readmit).
    pub fn eject(&self, id: &str) -> Result<(), PoolError> {
        self.set_health(id, Health::Ejected)
    }

    /// Re-admits an ejected or unhealthy replica, starting its slow-start ramp.
    pub fn readmit(&self, id: &str) -> Result<(), PoolError> {
        self.with_replica(id, |r| {
            r.state.set_health(Health::Healthy);
            if !self.shared.slow_start.window.is_zero() {
                r.state.start_ramp(Instant::now());
            }
        })
    }
}

fn unknown_id(id: &str) -> ReplicaId {
    ReplicaId::new(id).unwrap_or_else(|_| ReplicaId::new("<invalid id>").expect("valid literal"))
}

/// A drain in progress: [`wait`](Drain::wait) completes when the replica has no request in
/// flight.
#[derive(Debug, Clone)]
pub struct Drain {
    state: Arc<ReplicaState>,
}

impl Drain {
    /// Waits until every in-flight request of the draining replica has finished.
    pub async fn wait(&self) {
        self.state.idle().await
    }

    /// Whether the replica has no request in flight now.
    pub fn is_drained(&self) -> bool {
        self.state.in_flight() == 0
    }
}
