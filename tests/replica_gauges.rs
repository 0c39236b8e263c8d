//! The per-replica dashboard gauges: engine batch, queue and KV usage from load reports, and the
//! router's latency EWMAs.

use std::time::Duration;

use metrics_util::debugging::{DebugValue, DebuggingRecorder};
use replica_router::backend::LoadReport;
use replica_router::health::record_pool_metrics;
use replica_router::load::WaitEstimator;
use replica_router::pool::Pool;
use replica_router::replica::ReplicaSpec;
use tokio::time::Instant;

#[tokio::test(start_paused = true)]
async fn load_reports_become_per_replica_gauges() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let _guard = metrics::set_default_local_recorder(&recorder);
    let pool = Pool::builder()
        .replica("r0", ReplicaSpec::new("m"), ())
        .replica("r1", ReplicaSpec::new("m"), ())
        .build()
        .unwrap();
    let observed_at = Instant::now();
    pool.snapshot()
        .get("r0")
        .unwrap()
        .1
        .state()
        .set_load_report(LoadReport {
            running: 12,
            waiting: 3,
            kv_usage: Some(0.75),
            observed_at,
        });
    tokio::time::sleep(Duration::from_secs(2)).await;
    record_pool_metrics(&pool.snapshot(), &WaitEstimator::new(), Instant::now());

    let snap = snapshotter.snapshot().into_vec();
    let gauge = |name: &str, replica: &str| {
        snap.iter().find_map(|(k, _, _, v)| {
            let hit = k.key().name() == name
                && k.key()
                    .labels()
                    .any(|l| l.key() == "replica" && l.value() == replica);
            match (hit, v) {
                (true, DebugValue::Gauge(g)) => Some(g.into_inner()),
                _ => None,
            }
        })
    };
    assert_eq!(
        gauge("replica_router_replica_engine_running", "r0"),
        Some(12.0)
    );
    assert_eq!(
        gauge("replica_router_replica_engine_waiting", "r0"),
        Some(3.0)
    );
    assert_eq!(
        gauge("replica_router_replica_kv_cache_usage", "r0"),
        Some(0.75)
    );
    assert_eq!(
        gauge("replica_router_replica_load_report_age_seconds", "r0"),
        Some(2.0)
    );
    // No report, no engine gauges (never a misleading zero).
    assert_eq!(gauge("replica_router_replica_engine_running", "r1"), None);
    assert_eq!(gauge("replica_router_replica_kv_cache_usage", "r1"), None);
    assert_eq!(gauge("replica_router_replica_in_flight", "r1"), Some(0.0));
}
