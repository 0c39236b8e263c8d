//! Replica identity and specification.
//!
//! A replica is one full copy of the model, with its own tensor-parallel (TP) and pipeline-parallel
//! (PP) groups inside. [`ReplicaSpec`] records what the guide's checklist asks a pool to validate
//! (model, quantization, TP, PP) and what routing needs (max context, capacity weight).

use std::borrow::Borrow;
use std::fmt;
use std::sync::Arc;

/// Longest accepted replica id, in bytes.
pub const MAX_REPLICA_ID_LEN: usize = 256;

/// A replica's identity: a cheap-to-clone string, stable across gateway instances.
///
/// The id's bytes feed the consistent-hash ring, so two gateways that name their replicas the
/// same way place sessions the same way.
#[derive(Clone, PartialOrd, Ord)]
pub struct ReplicaId(Arc<str>);

impl PartialEq for ReplicaId {
    fn eq(&self, other: &Self) -> bool {
        // Clones of one id share the allocation: skip the byte comparison.
        Arc::ptr_eq(&self.0, &other.0) || self.0 == other.0
    }
}

impl Eq for ReplicaId {}

impl std::hash::Hash for ReplicaId {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        // Must agree with `Borrow<str>`: hash exactly as the string does.
        self.0.hash(state)
    }
}

impl ReplicaId {
    /// Makes an id, rejecting empty ids and ids over [`MAX_REPLICA_ID_LEN`] bytes.
    ///
    /// ```
    /// use replica_router::replica::ReplicaId;
    /// assert_eq!(ReplicaId::new("gpu-0").unwrap().as_str(), "gpu-0");
    /// assert!(ReplicaId::new("").is_err());
    /// ```
    pub fn new(id: impl AsRef<str>) -> Result<Self, PoolError> {
        let id = id.as_ref();
        if id.is_empty() {
            return Err(PoolError::InvalidId("empty"));
        }
        if id.len() > MAX_REPLICA_ID_LEN {
            return Err(PoolError::InvalidId("longer than 256 bytes"));
        }
        Ok(ReplicaId(Arc::from(id)))
    }

    /// The id as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for ReplicaId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl fmt::Display for ReplicaId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl Borrow<str> for ReplicaId {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl AsRef<str> for ReplicaId {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

/// A validated capacity weight: finite and strictly positive.
#[derive(Debug, Clone, Copy, PartialEq, PartialOrd)]
pub struct Weight(f64);

impl Weight {
    /// The weight of an ordinary replica.
    pub const ONE: Weight = Weight(1.0);

    /// Validates a weight.
    ///
    /// ```
    /// use replica_router::replica::Weight;
    /// assert!(Weight::new(2.0).is_some());
    /// assert!(Weight::new(0.0).is_none());
    /// assert!(Weight::new(f64::NAN).is_none());
    /// assert!(Weight::new(-1.0).is_none());
    /// ```
    pub fn new(value: f64) -> Option<Weight> {
        (value.is_finite() && value > 0.0).then_some(Weight(value))
    }

    /// The value.
    pub fn get(self) -> f64 {
        self.0
    }
}

impl Default for Weight {
    fn default() -> Self {
        Weight::ONE
    }
}

/// What a replica is: model, quantization, parallelism, context and capacity.
///
/// ```
/// use replica_router::replica::ReplicaSpec;
/// let spec = ReplicaSpec::new("llama-3-70b")
///     .quantization("fp8")
///     .tensor_parallel(2)
///     .max_context(32_768)
///     .capacity_weight(1.0);
/// assert_eq!(spec.gpus(), 2);
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct ReplicaSpec {
    /// The model name, as replicas report it.
    pub model: String,
    /// Weight quantization (`fp8`, `awq`, ...); `None` for full precision.
    pub quantization: Option<String>,
    /// Tensor-parallel degree inside the replica.
    pub tensor_parallel: u32,
    /// Pipeline-parallel degree inside the replica.
    pub pipeline_parallel: u32,
    /// Longest context the replica accepts, in tokens; 0 when unknown.
    pub max_context: u32,
    /// Relative capacity used for weighted routing (a TP=4 replica might be 2.0 beside TP=2 ones
    /// at 1.0). Validated when the replica joins a pool: finite and > 0.
    pub capacity_weight: f64,
}

impl ReplicaSpec {
    /// A spec for `model` with TP = PP = 1, unknown context and weight 1.
    pub fn new(model: impl Into<String>) -> Self {
        ReplicaSpec {
            model: model.into(),
            quantization: None,
            tensor_parallel: 1,
            pipeline_parallel: 1,
            max_context: 0,
            capacity_weight: 1.0,
        }
    }

    /// Sets the quantization.
    pub fn quantization(mut self, q: impl Into<String>) -> Self {
        self.quantization = Some(q.into());
        self
    }

    /// Sets the tensor-parallel degree.
    pub fn tensor_parallel(mut self, tp: u32) -> Self {
        self.tensor_parallel = tp;
        self
    }

    /// Sets the pipeline-parallel degree.
    pub fn pipeline_parallel(mut self, pp: u32) -> Self {
        self.pipeline_parallel = pp;
        self
    }

    /// Sets the max context in tokens.
    pub fn max_context(mut self, tokens: u32) -> Self {
        self.max_context = tokens;
        self
    }

    /// Whether a request needing `tokens` of context fits this replica (always, when its
    /// `max_context` is unknown).
    ///
    /// ```
    /// use replica_router::replica::ReplicaSpec;
    /// let spec = ReplicaSpec::new("m").max_context(8_192);
    /// assert!(spec.fits(8_192) && !spec.fits(8_193));
    /// assert!(ReplicaSpec::new("m").fits(1_000_000));
    /// ```
    pub fn fits(&self, tokens: u64) -> bool {
        self.max_context == 0 || tokens <= u64::from(self.max_context)
    }

    /// Sets the capacity weight.
    pub fn capacity_weight(mut self, w: f64) -> Self {
        self.capacity_weight = w;
        self
    }

    /// GPUs this replica occupies: TP x PP.
    pub fn gpus(&self) -> u64 {
        u64::from(self.tensor_parallel) * u64::from(self.pipeline_parallel)
    }

    /// Checks the fields that must hold for any replica.
    pub(crate) fn validate(&self, id: &ReplicaId) -> Result<Weight, PoolError> {
        if self.tensor_parallel == 0 {
            return Err(PoolError::InvalidSpec {
                replica: id.clone(),
                detail: "tensor_parallel must be >= 1",
            });
        }
        if self.pipeline_parallel == 0 {
            return Err(PoolError::InvalidSpec {
                replica: id.clone(),
                detail: "pipeline_parallel must be >= 1",
            });
        }
        Weight::new(self.capacity_weight).ok_or(PoolError::InvalidWeight {
            replica: id.clone(),
            value: self.capacity_weight,
        })
    }
}

/// How strictly the replicas of one pool must agree.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum SpecPolicy {
    /// Model, quantization, TP and PP must all match (the guide's checklist: "validate
    /// quantization and TP settings identically across replicas").
    #[default]
    Identical,
    /// Model and quantization must match; TP and PP may differ. Use capacity weights so a TP=4
    /// replica beside TP=2 ones gets its share (the guide's "heterogeneous replicas" pitfall).
    MixedParallelism,
    /// No check at all (tiered pools are better kept as separate pools).
    Unchecked,
}

impl SpecPolicy {
    /// Checks `spec` of replica `id` against the pool's reference spec.
    pub(crate) fn check(
        self,
        reference: &ReplicaSpec,
        id: &ReplicaId,
        spec: &ReplicaSpec,
    ) -> Result<(), PoolError> {
        if self == SpecPolicy::Unchecked {
            return Ok(());
        }
        let mismatch = |field: &'static str, expected: String, found: String| {
            Err(PoolError::SpecMismatch {
                replica: id.clone(),
                field,
                expected,
                found,
            })
        };
        if reference.model != spec.model {
            return mismatch("model", reference.model.clone(), spec.model.clone());
        }
        if reference.quantization != spec.quantization {
            let show = |q: &Option<String>| q.clone().unwrap_or_else(|| "none".into());
            return mismatch(
                "quantization",
                show(&reference.quantization),
                show(&spec.quantization),
            );
        }
        if self == SpecPolicy::Identical {
            if reference.tensor_parallel != spec.tensor_parallel {
                return mismatch(
                    "tensor_parallel",
                    reference.tensor_parallel.to_string(),
                    spec.tensor_parallel.to_string(),
                );
            }
            if reference.pipeline_parallel != spec.pipeline_parallel {
                return mismatch(
                    "pipeline_parallel",
                    reference.pipeline_parallel.to_string(),
                    spec.pipeline_parallel.to_string(),
                );
            }
        }
        Ok(())
    }
}

/// Errors from changing a pool's membership or building one.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum PoolError {
    /// A pool was built with no replicas.
    #[error("a pool needs at least one replica")]
    Empty,
    /// Two replicas share an id.
    #[error("duplicate replica id {0}")]
    DuplicateReplica(ReplicaId),
    /// No replica has this id.
    #[error("unknown replica id {0}")]
    UnknownReplica(ReplicaId),
    /// A capacity weight is zero, negative, NaN or infinite.
    #[error("replica {replica}: capacity weight must be finite and > 0, got {value}")]
    InvalidWeight {
        /// The replica.
        replica: ReplicaId,
        /// The rejected value.
        value: f64,
    },
    /// A spec field is out of range (for example TP = 0).
    #[error("replica {replica}: invalid spec: {detail}")]
    InvalidSpec {
        /// The replica.
        replica: ReplicaId,
        /// What is wrong.
        detail: &'static str,
    },
    /// A replica disagrees with the rest of the pool on a field that must match.
    #[error("replica {replica} differs from the pool in {field}: pool has {expected}, replica has {found}")]
    SpecMismatch {
        /// The odd replica.
        replica: ReplicaId,
        /// Which field (`model`, `quantization`, `tensor_parallel`, `pipeline_parallel`).
        field: &'static str,
        /// The pool's value.
        expected: String,
        /// The replica's value.
        found: String,
    },
    /// A replica id is empty or too long.
    #[error("invalid replica id: {0}")]
    InvalidId(&'static str),
}
