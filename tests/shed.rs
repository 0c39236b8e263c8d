//! SLO shedding and the admission queue, on tokio's paused clock.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{request, scripted_pool, Script, ScriptedBackend};
use parking_lot::Mutex;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use replica_router::balance::LeastInFlightLayer;
use replica_router::context::{Priority, RouteContext};
use replica_router::decision::{Decision, DecisionReason};
use replica_router::dispatch::Dispatch;
use replica_router::error::RouteError;
use replica_router::load::{SloAdvice, StickyPolicy, WaitEstimator};
use replica_router::pool::Pool;
use replica_router::replica::ReplicaId;
use replica_router::rng::RngSeed;
use replica_router::shed::ShedLayer;
use tokio::time::Instant;
use tower::{Service, ServiceBuilder, ServiceExt};

const BUDGET: Duration = Duration::from_millis(200);

/// Two slots per replica and a 1 s service time: a replica is over a 200 ms budget from two
/// requests in flight on (wait = (n + 1 - 2) x 1 s / 2).
fn estimator() -> WaitEstimator {
    WaitEstimator::new()
        .slots_per_weight(2.0)
        .default_service_time(Duration::from_secs(1))
}

type Resp = http::Response<replica_router::inflight::TrackedBody<common::ChunkBody>>;

fn stack(
    pool: &Pool<ScriptedBackend>,
    shed: ShedLayer<ScriptedBackend>,
) -> impl Service<http::Request<()>, Response = Resp, Error = RouteError, Future: Send> + Clone {
    ServiceBuilder::new()
        .layer(shed)
        .layer(LeastInFlightLayer::new(pool.clone()).seed(RngSeed::fixed(7)))
        .service(Dispatch::with_seed(pool.clone(), RngSeed::fixed(9)))
}

fn with_priority(p: Priority) -> http::Request<()> {
    let mut req = request(Script::Stream {
        chunks: 1,
        delay_ms: 0,
    });
    req.extensions_mut().insert(RouteContext {
        priority: p,
        ..Default::default()
    });
    req
}

fn all_over_budget(pool: &Pool<ScriptedBackend>, est: &WaitEstimator) -> bool {
    let snap = pool.snapshot();
    let now = Instant::now();
    snap.replicas()
        .iter()
        .filter(|r| r.state().is_eligible())
        .all(|r| est.estimate(r, snap.slow_start(), now).wait > BUDGET)
}

fn in_flight(pool: &Pool<ScriptedBackend>) -> Vec<u64> {
    pool.snapshot()
        .replicas()
        .iter()
        .map(|r| r.state().in_flight())
        .collect()
}

#[tokio::test(start_paused = true)]
async fn sheds_exactly_when_every_replica_is_over_budget() {
    sheds_exactly(true).await;
    // Without advice the scan stops early; the verdict must not change.
    sheds_exactly(false).await;
}

async fn sheds_exactly(advise: bool) {
    let pool = scripted_pool(3);
    let est = estimator();
    let mut svc = stack(
        &pool,
        ShedLayer::new(pool.clone())
            .budget(BUDGET)
            .estimator(est.clone())
            .advise(advise),
    );
    let mut held: Vec<Resp> = Vec::new();
    let mut rng = SmallRng::seed_from_u64(42);
    let (mut sheds, mut admits, mut transitions) = (0, 0, 0);
    let mut was_shedding = false;
    for step in 0..400 {
        // Mostly arrivals, some completions: load climbs past capacity and falls back.
        if !held.is_empty() && rng.random_bool(0.45) {
            let i = rng.random_range(0..held.len());
            drop(held.swap_remove(i));
            continue;
        }
        let expect_shed = all_over_budget(&pool, &est);
        let before = in_flight(&pool);
        let result = svc.ready().await.unwrap().call(request(Script::Stream {
            chunks: 1,
            delay_ms: 0,
        }));
        match result.await {
            Ok(resp) => {
                assert!(
                    !expect_shed,
                    "step {step}: admitted with all over budget: {before:?}"
                );
                held.push(resp);
                admits += 1;
            }
            Err(e) => {
                assert!(expect_shed, "step {step}: shed with room: {before:?}: {e}");
                assert_eq!(e.status_code(), 429);
                let ra = e.retry_after().unwrap();
                assert!(ra >= Duration::from_secs(1) && ra <= Duration::from_secs(60));
                assert_eq!(in_flight(&pool), before, "a shed request is never sent");
                sheds += 1;
            }
        }
        let shedding = all_over_budget(&pool, &est);
        transitions += usize::from(shedding != was_shedding);
        was_shedding = shedding;
    }
    assert!(sheds > 20 && admits > 20, "sheds {sheds}, admits {admits}");
    assert!(
        transitions > 4,
        "shedding started and stopped {transitions} times"
    );
    drop(held);
    assert_eq!(in_flight(&pool), vec![0, 0, 0]);
}

#[tokio::test(start_paused = true)]
async fn shedding_starts_at_the_last_replica_and_stops_when_one_recovers() {
    let pool = scripted_pool(2);
    let mut svc = stack(
        &pool,
        ShedLayer::new(pool.clone())
            .budget(BUDGET)
            .estimator(estimator()),
    );
    let mut held = Vec::new();
    // Two slots each: four requests fill both replicas to the point where a fifth would queue.
    for _ in 0..4 {
        held.push(
            svc.ready()
                .await
                .unwrap()
                .call(request(Script::Stream {
                    chunks: 1,
                    delay_ms: 0,
                }))
                .await
                .unwrap(),
        );
    }
    assert_eq!(in_flight(&pool), vec![2, 2]);
    let err = svc
        .ready()
        .await
        .unwrap()
        .call(request(Script::Stream {
            chunks: 1,
            delay_ms: 0,
        }))
        .await
        .unwrap_err();
    assert!(matches!(err, RouteError::Overloaded { .. }), "{err}");
    // Best wait 500 ms, budget 200 ms: retry after the 1 s floor.
    assert_eq!(err.retry_after(), Some(Duration::from_secs(1)));
    // One request on r0 finishes: r0 is under budget again and takes the next one.
    let i = held
        .iter()
        .position(|r| r.extensions().get::<Decision>().unwrap().replica().as_str() == "r0")
        .unwrap();
    drop(held.remove(i));
    let resp = svc
        .ready()
        .await
        .unwrap()
        .call(request(Script::Stream {
            chunks: 1,
            delay_ms: 0,
        }))
        .await
        .unwrap();
    assert_eq!(
        resp.extensions()
            .get::<Decision>()
            .unwrap()
            .replica()
            .as_str(),
        "r0"
    );
}

/// (name, admitted or shed at, admitted?)
type Log = Arc<Mutex<Vec<(&'static str, Duration, bool)>>>;

/// Spawns a request that records when it was admitted (or shed) and holds its response for
/// `hold`.
fn spawn_request<S>(
    svc: &S,
    name: &'static str,
    p: Priority,
    hold: Duration,
    log: Log,
    start: Instant,
) -> tokio::task::JoinHandle<()>
where
    S: Service<http::Request<()>, Response = Resp, Error = RouteError, Future: Send>
        + Clone
        + Send
        + 'static,
{
    let mut svc = svc.clone();
    tokio::spawn(async move {
        let r = svc.ready().await.unwrap().call(with_priority(p)).await;
        log.lock().push((name, start.elapsed(), r.is_ok()));
        if let Ok(resp) = r {
            tokio::time::sleep(hold).await;
            drop(resp);
        }
    })
}

#[tokio::test(start_paused = true)]
async fn queue_serves_by_priority_then_age() {
    let pool = scripted_pool(1);
    // One slot, 1 s service time: over the 200 ms budget as soon as one request is in flight.
    let svc = stack(
        &pool,
        ShedLayer::new(pool.clone())
            .budget(BUDGET)
            .estimator(estimator().slots_per_weight(1.0))
            .queue(16, Duration::from_secs(5)),
    );
    let start = Instant::now();
    let log = Arc::new(Mutex::new(Vec::new()));
    let hold = Duration::from_millis(100);
    let mut tasks = vec![spawn_request(
        &svc,
        "first",
        Priority::Standard,
        hold,
        log.clone(),
        start,
    )];
    tokio::task::yield_now().await;
    for (name, p) in [
        ("batch-1", Priority::Batch),
        ("standard-1", Priority::Standard),
        ("interactive-1", Priority::Interactive),
        ("batch-2", Priority::Batch),
        ("interactive-2", Priority::Interactive),
        ("standard-2", Priority::Standard),
    ] {
        tokio::time::sleep(Duration::from_millis(5)).await;
        tasks.push(spawn_request(&svc, name, p, hold, log.clone(), start));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let log = log.lock().clone();
    let order: Vec<_> = log.iter().map(|(n, _, _)| *n).collect();
    assert_eq!(
        order,
        [
            "first",
            "interactive-1",
            "interactive-2",
            "standard-1",
            "standard-2",
            "batch-1",
            "batch-2"
        ]
    );
    assert!(log.iter().all(|(_, _, ok)| *ok));
    // One at a time: each admitted when the previous one's response ended, 100 ms apart.
    let times: Vec<_> = log.iter().map(|(_, t, _)| t.as_millis()).collect();
    assert_eq!(times, [0, 100, 200, 300, 400, 500, 600]);
    assert_eq!(in_flight(&pool), vec![0]);
}

#[tokio::test(start_paused = true)]
async fn queue_never_holds_a_request_past_its_deadline() {
    let pool = scripted_pool(1);
    let max_wait = Duration::from_millis(750);
    let layer = ShedLayer::new(pool.clone())
        .budget(BUDGET)
        .estimator(estimator().slots_per_weight(1.0))
        .queue(4, max_wait);
    let svc = stack(&pool, layer.clone());
    let start = Instant::now();
    let log = Arc::new(Mutex::new(Vec::new()));
    // The replica stays busy for 10 s: nobody in the queue can be admitted.
    let blocker = spawn_request(
        &svc,
        "blocker",
        Priority::Interactive,
        Duration::from_secs(10),
        log.clone(),
        start,
    );
    tokio::task::yield_now().await;
    let mut tasks = Vec::new();
    for (i, name) in ["q0", "q1", "q2", "q3"].into_iter().enumerate() {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let p = if i % 2 == 0 {
            Priority::Batch
        } else {
            Priority::Interactive
        };
        tasks.push(spawn_request(
            &svc,
            name,
            p,
            Duration::ZERO,
            log.clone(),
            start,
        ));
    }
    tokio::task::yield_now().await;
    assert_eq!(layer.queue_len(), 4);
    for t in tasks {
        t.await.unwrap();
    }
    let log = log.lock().clone();
    // Each one shed exactly at its own deadline: enqueued at 100, 200, 300, 400 ms.
    let shed: Vec<_> = log
        .iter()
        .filter(|(n, _, _)| *n != "blocker")
        .map(|(n, t, ok)| (*n, t.as_millis(), *ok))
        .collect();
    assert_eq!(
        shed,
        [
            ("q0", 850, false),
            ("q1", 950, false),
            ("q2", 1050, false),
            ("q3", 1150, false)
        ]
    );
    assert_eq!(layer.queue_len(), 0);
    blocker.await.unwrap();
    assert_eq!(in_flight(&pool), vec![0]);
}

#[tokio::test(start_paused = true)]
async fn full_queue_evicts_lower_priority_first() {
    let pool = scripted_pool(1);
    let layer = ShedLayer::new(pool.clone())
        .budget(BUDGET)
        .estimator(estimator().slots_per_weight(1.0))
        .queue(2, Duration::from_secs(5));
    let svc = stack(&pool, layer.clone());
    let start = Instant::now();
    let log = Arc::new(Mutex::new(Vec::new()));
    let hold = Duration::from_millis(100);
    let mut tasks = vec![spawn_request(
        &svc,
        "first",
        Priority::Standard,
        hold,
        log.clone(),
        start,
    )];
    tokio::task::yield_now().await;
    for (name, p) in [
        ("batch", Priority::Batch),
        ("standard", Priority::Standard),
        // Full: evicts "batch".
        ("interactive", Priority::Interactive),
        // Full, nothing lower than batch to evict: shed at once.
        ("batch-late", Priority::Batch),
    ] {
        tasks.push(spawn_request(&svc, name, p, hold, log.clone(), start));
        tokio::task::yield_now().await;
    }
    for t in tasks {
        t.await.unwrap();
    }
    let log: Vec<_> = log
        .lock()
        .iter()
        .map(|(n, t, ok)| (*n, t.as_millis(), *ok))
        .collect();
    assert_eq!(
        log,
        [
            ("first", 0, true),
            ("batch", 0, false),
            ("batch-late", 0, false),
            ("interactive", 100, true),
            ("standard", 200, true),
        ]
    );
}

/// Puts `n` requests in flight on r0, straight through dispatch.
async fn load_r0(pool: &Pool<ScriptedBackend>, n: usize) -> Vec<Resp> {
    let mut dispatch = Dispatch::with_seed(pool.clone(), RngSeed::fixed(3));
    let mut held = Vec::new();
    for _ in 0..n {
        let mut req = request(Script::Stream {
            chunks: 1,
            delay_ms: 0,
        });
        req.extensions_mut().insert(Decision::new(
            ReplicaId::new("r0").unwrap(),
            DecisionReason::Home,
        ));
        held.push(dispatch.ready().await.unwrap().call(req).await.unwrap());
    }
    held
}

#[tokio::test(start_paused = true)]
async fn sticky_policy_spills_or_waits_for_a_decided_request() {
    let pool = scripted_pool(2);
    let est = estimator();
    for (policy, expect) in [
        (StickyPolicy::Spill, ("r1", DecisionReason::Spill)),
        (
            StickyPolicy::Wait {
                max_wait: Duration::from_secs(2),
            },
            ("r0", DecisionReason::Home),
        ),
        (
            StickyPolicy::Wait {
                max_wait: Duration::from_millis(300),
            },
            ("r1", DecisionReason::Spill),
        ),
    ] {
        let mut svc = stack(
            &pool,
            ShedLayer::new(pool.clone())
                .budget(BUDGET)
                .estimator(est.clone())
                .sticky(policy),
        );
        // Three requests on r0: its wait is 1 s, r1 is idle.
        let held = load_r0(&pool, 3).await;
        let mut req = request(Script::Stream {
            chunks: 1,
            delay_ms: 0,
        });
        req.extensions_mut().insert(Decision::new(
            ReplicaId::new("r0").unwrap(),
            DecisionReason::Home,
        ));
        let resp = svc.ready().await.unwrap().call(req).await.unwrap();
        let d = resp.extensions().get::<Decision>().unwrap();
        assert_eq!((d.replica().as_str(), d.reason()), expect, "{policy:?}");
        drop(held);
        drop(resp);
        assert_eq!(in_flight(&pool), vec![0, 0]);
    }
}

#[tokio::test(start_paused = true)]
async fn slo_advice_is_left_for_the_picking_layer() {
    let pool = scripted_pool(2);
    let seen = Arc::new(Mutex::new(None::<SloAdvice>));
    let seen2 = seen.clone();
    let mut svc = ServiceBuilder::new()
        .layer(
            ShedLayer::new(pool.clone())
                .budget(BUDGET)
                .estimator(estimator()),
        )
        .map_request(move |req: http::Request<()>| {
            *seen2.lock() = req.extensions().get::<SloAdvice>().cloned();
            req
        })
        .layer(LeastInFlightLayer::new(pool.clone()).seed(RngSeed::fixed(1)))
        .service(Dispatch::with_seed(pool.clone(), RngSeed::fixed(2)));
    let _held = load_r0(&pool, 3).await;
    assert_eq!(in_flight(&pool), vec![3, 0]);
    let _r = svc
        .ready()
        .await
        .unwrap()
        .call(request(Script::Stream {
            chunks: 1,
            delay_ms: 0,
        }))
        .await
        .unwrap();
    let advice = seen
        .lock()
        .clone()
        .expect("advice when r0 is over budget and r1 is not");
    let v = pool.snapshot().version();
    assert!(advice.is_over_budget(v, 0));
    assert!(!advice.is_over_budget(v, 1));
    assert!(advice.should_leave_home(v, 0));
    assert_eq!(advice.estimated_wait(v, 0), Some(Duration::from_secs(1)));
    assert!(
        !advice.is_over_budget(v + 1, 0),
        "stale advice never blocks"
    );
}

mod queue_properties {
    use super::*;
    use proptest::prelude::*;

    #[derive(Debug, Clone)]
    struct Arrival {
        gap_ms: u64,
        priority: Priority,
        hold_ms: u64,
    }

    fn arrival() -> impl Strategy<Value = Arrival> {
        (
            0u64..60,
            prop_oneof![
                Just(Priority::Batch),
                Just(Priority::Standard),
                Just(Priority::Interactive)
            ],
            1u64..120,
        )
            .prop_map(|(gap_ms, priority, hold_ms)| Arrival {
                gap_ms,
                priority,
                hold_ms,
            })
    }

    /// (priority, arrived, ended waiting at, admitted?) in ms since start.
    type Record = (Priority, u64, u64, bool);

    fn run(arrivals: Vec<Arrival>, capacity: usize, max_wait_ms: u64) -> (Vec<Record>, Vec<u64>) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .unwrap();
        rt.block_on(async move {
            let pool = scripted_pool(1);
            // One slot: over budget as soon as one request is in flight.
            let svc = stack(
                &pool,
                ShedLayer::new(pool.clone())
                    .budget(BUDGET)
                    .estimator(estimator().slots_per_weight(1.0))
                    .queue(capacity, Duration::from_millis(max_wait_ms)),
            );
            let start = Instant::now();
            let records = Arc::new(Mutex::new(Vec::new()));
            let mut tasks = Vec::new();
            for a in arrivals {
                tokio::time::sleep(Duration::from_millis(a.gap_ms)).await;
                let mut svc = svc.clone();
                let records = records.clone();
                tasks.push(tokio::spawn(async move {
                    let arrived = start.elapsed().as_millis() as u64;
                    let r = svc
                        .ready()
                        .await
                        .unwrap()
                        .call(with_priority(a.priority))
                        .await;
                    let ended = start.elapsed().as_millis() as u64;
                    records.lock().push((a.priority, arrived, ended, r.is_ok()));
                    if let Ok(resp) = r {
                        tokio::time::sleep(Duration::from_millis(a.hold_ms)).await;
                        drop(resp);
                    }
                }));
            }
            for t in tasks {
                t.await.unwrap();
            }
            let records = records.lock().clone();
            (records, in_flight(&pool))
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn nobody_waits_past_the_deadline_and_admission_follows_priority(
            arrivals in prop::collection::vec(arrival(), 1..40),
            capacity in 1usize..8,
            max_wait_ms in 20u64..400,
        ) {
            let (records, left) = run(arrivals, capacity, max_wait_ms);
            prop_assert_eq!(left, vec![0]);
            prop_assert!(records.iter().any(|r| r.3), "someone is served");
            for &(_, arrived, ended, _) in &records {
                // Nobody waits past the deadline.
                prop_assert!(ended - arrived <= max_wait_ms, "{arrived} -> {ended}");
            }
            for &(pa, arr_a, t, ok) in &records {
                if !ok {
                    continue;
                }
                // When A was admitted, nobody of higher priority, nor of its priority and older,
                // was still waiting.
                for &(pb, arr_b, end_b, _) in &records {
                    let waiting = arr_b < t && end_b > t;
                    let ahead = pb > pa || (pb == pa && arr_b < arr_a);
                    prop_assert!(
                        !(waiting && ahead),
                        "admitted {pa:?} (arrived {arr_a}) at {t} while {pb:?} (arrived {arr_b}) waited until {end_b}"
                    );
                }
            }
        }
    }
}
