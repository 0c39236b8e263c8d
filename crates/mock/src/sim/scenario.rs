//! The replica sets (and failures) a workload runs on.

use std::time::Duration;

use crate::MockConfig;

/// One replica of a scenario.
#[derive(Debug, Clone, PartialEq)]
pub struct ReplicaPlan {
    /// Its id in the pool.
    pub id: String,
    /// Tensor-parallel degree (the mock engine is faster and holds more KV at higher TP).
    pub tp: u32,
    /// Capacity weight given to the router.
    pub weight: f64,
}

/// A replica that fails during the run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FailurePlan {
    /// Index of the failing replica in [`Scenario::replicas`].
    pub replica: usize,
    /// When it fails: it is ejected from the pool and killed (its requests and streams break,
    /// and the clients retry them elsewhere).
    pub at: Duration,
}

/// A replica set and what happens to it during the run.
#[derive(Debug, Clone, PartialEq)]
pub struct Scenario {
    /// Short name, used in report titles.
    pub name: String,
    /// The replicas, in pool order.
    pub replicas: Vec<ReplicaPlan>,
    /// A replica failure, if any.
    pub failure: Option<FailurePlan>,
    /// Engine parameters shared by every replica (each gets its own `tp`).
    pub engine: MockConfig,
}

impl Scenario {
    /// `n` identical TP=2 replicas of weight 1.
    ///
    /// ```
    /// use replica_router_mock::sim::Scenario;
    /// assert_eq!(Scenario::homogeneous(4).replicas.len(), 4);
    /// ```
    pub fn homogeneous(n: usize) -> Scenario {
        Scenario {
            name: format!("homogeneous: {n} x TP=2"),
            replicas: (0..n)
                .map(|i| ReplicaPlan {
                    id: format!("tp2-{i}"),
                    tp: 2,
                    weight: 1.0,
                })
                .collect(),
            failure: None,
            engine: MockConfig::default(),
        }
    }

    /// The GPUs of `n` TP=2 replicas as one TP=4 replica of weight 2 plus `n - 2` TP=2 replicas
    /// of weight 1 (at least one): for `n = 4`, 2 x TP=2 + 1 x TP=4.
    ///
    /// ```
    /// use replica_router_mock::sim::Scenario;
    /// let s = Scenario::heterogeneous(4);
    /// let tps: Vec<u32> = s.replicas.iter().map(|r| r.tp).collect();
    /// assert_eq!(tps, [2, 2, 4]);
    /// ```
    pub fn heterogeneous(n: usize) -> Scenario {
        let small = n.saturating_sub(2).max(1);
        let mut replicas: Vec<ReplicaPlan> = (0..small)
            .map(|i| ReplicaPlan {
                id: format!("tp2-{i}"),
                tp: 2,
                weight: 1.0,
            })
            .collect();
        replicas.push(ReplicaPlan {
            id: "tp4-0".to_owned(),
            tp: 4,
            weight: 2.0,
        });
        Scenario {
            name: format!("heterogeneous: {small} x TP=2 (weight 1) + 1 x TP=4 (weight 2)"),
            replicas,
            failure: None,
            engine: MockConfig::default(),
        }
    }

    /// `n` identical TP=2 replicas; the second one (the first if `n == 1`) fails at `at`.
    pub fn failure(n: usize, at: Duration) -> Scenario {
        let mut s = Scenario::homogeneous(n);
        let replica = usize::from(n > 1);
        s.name = format!(
            "failure: {n} x TP=2, tp2-{replica} fails at t={}s",
            at.as_secs()
        );
        s.failure = Some(FailurePlan { replica, at });
        s
    }
}
