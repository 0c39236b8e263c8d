//! The guide's Harbor Analytics story on the simulation: the claims the example prints, on the
//! same scenario function with its default (fixed) seed.

use std::time::Duration;

use replica_router::advisor::Verdict;
use replica_router_mock::sim::harbor::{harbor, HarborConfig};

#[test]
fn harbor_story_holds_on_the_simulation() {
    let report = harbor(&HarborConfig::default()).unwrap();
    let table = report.to_markdown();
    let (a, half, b, c) = (
        &report.one_replica_holiday,
        &report.one_replica_normal,
        &report.two_replicas_holiday,
        &report.tp4_holiday,
    );

    // (a) One TP=2 replica at holiday load: max_num_seqs reached, new sessions queue for seconds.
    assert_eq!(a.report.replicas[0].peak_running, 256, "{table}");
    assert!(a.report.queue_wait.p95 >= Duration::from_secs(2), "{table}");
    assert_eq!(a.advice.verdict, Verdict::ReplicaBound, "{}", a.advice);
    assert!(a.advice.proposed.replicas >= 2);

    // (b) Two TP=2 replicas: at least 1.8x the aggregate throughput of one, at a p95 TTFT no
    // worse than one replica's at half the load.
    assert!(report.dp_speedup() >= 1.8, "{table}");
    assert!(b.report.ttft.p95 <= half.report.ttft.p95, "{table}");
    assert_eq!(b.report.abandoned_sessions, 0, "{table}");

    // (c) One TP=4 replica on the same four GPUs: faster per token at low load, but its
    // capacity is short of twice one TP=2 replica's, so at holiday load it sheds and queues
    // where two TP=2 replicas do not.
    assert!(
        c.low_load_tpot.as_secs_f64() < 0.7 * a.low_load_tpot.as_secs_f64(),
        "{table}"
    );
    assert!(report.tp4_capacity_ratio() < 1.9, "{table}");
    assert!(c.capacity_sessions_per_sec < b.capacity_sessions_per_sec);
    assert!(c.report.retries > b.report.retries, "{table}");
    assert!(c.report.ttft.p95 > 2 * b.report.ttft.p95, "{table}");

    // (d) The long-context lesson ran under five policies on the same workload.
    assert_eq!(report.long_context.len(), 5);
    assert!(report
        .long_context
        .iter()
        .all(|r| r.report.max_context_tokens > 32_768));
}
