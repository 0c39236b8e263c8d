use crate::balance::service::{LeastInFlight, RoundRobin};
use crate::load::Placement;
use crate::pool::{LoadMeasure, Pool};
use crate::rng::RngSeed;

/// Adds weighted least-in-flight picking (power of two choices) to a service stack.
///
/// See the [module docs](crate::balance).
#[derive(Debug, Clone)]
pub struct LeastInFlightLayer<B> {
    pool: Pool<B>,
    measure: LoadMeasure,
    placement: Placement,
    seed: RngSeed,
}

impl<B> LeastInFlightLayer<B> {
    /// Picks among `pool`'s replicas by in-flight requests, with an entropy-seeded RNG.
    pub fn new(pool: Pool<B>) -> Self {
        LeastInFlightLayer {
            pool,
            measure: LoadMeasure::default(),
            placement: Placement::Load,
            seed: RngSeed::from_entropy(),
        }
    }

    /// What counts as load.
    pub fn measure(mut self, measure: LoadMeasure) -> Self {
        self.measure = measure;
        self
    }

    /// How requests are placed (default [`Placement::Load`]: the lesser `measure` of two
    /// weighted samples). [`Placement::PredictedTtft`] takes the least predicted time to first
    /// token among the weighted samples and the replicas whose prefix index entry matches the
    /// request's fingerprints longest, and records the choice in the index.
    pub fn placement(mut self, placement: Placement) -> Self {
        self.placement = placement;
        self
    }

    /// The RNG seed source (use [`RngSeed::fixed`] for reproducible picks).
    pub fn seed(mut self, seed: RngSeed) -> Self {
        self.seed = seed;
        self
    }
}

impl<S, B> tower::Layer<S> for LeastInFlightLayer<B> {
    type Service = LeastInFlight<S, B>;

    fn layer(&self, inner: S) -> Self::Service {
        LeastInFlight::new(inner, self.pool.clone(), self.measure, self.seed.clone())
            .with_placement(self.placement.clone())
    }
}

/// Adds round-robin picking over the eligible replicas to a service stack.
#[derive(Debug, Clone)]
pub struct RoundRobinLayer<B> {
    pool: Pool<B>,
}

impl<B> RoundRobinLayer<B> {
    /// Rotates over `pool`'s eligible replicas.
    pub fn new(pool: Pool<B>) -> Self {
        RoundRobinLayer { pool }
    }
}

impl<S, B> tower::Layer<S> for RoundRobinLayer<B> {
    type Service = RoundRobin<S, B>;

    fn layer(&self, inner: S) -> Self::Service {
        RoundRobin::new(inner, self.pool.clone())
    }
}
