//! In-flight accounting: every counter returns to zero after any mix of success, failure,
//! cancellation, panic and dropped response bodies.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{request, Script, ScriptedBackend};
use http_body_util::BodyExt;
use proptest::prelude::*;
use replica_router::balance::LeastInFlightLayer;
use replica_router::context::{RouteContext, RouteContextLayer};
use replica_router::dispatch::Dispatch;
use replica_router::inflight::{Completion, CompletionObserver, Outcome};
use replica_router::load::Placement;
use replica_router::pool::Pool;
use replica_router::prefix::{PrefixHashes, PrefixIndex};
use replica_router::replica::ReplicaSpec;
use replica_router::request::RouteRequest;
use replica_router::rng::RngSeed;
use tower::{Service, ServiceBuilder, ServiceExt};

#[derive(Debug, Clone, Copy)]
enum Action {
    /// Read the whole streamed body.
    Complete(usize),
    /// Read `n` chunks, then drop the body.
    DropBodyAfter(usize),
    /// Drop the response future before the head arrives.
    CancelBeforeHead,
    /// The backend errors.
    Error,
    /// The backend answers 500.
    ServerError,
    /// The backend panics inside the task.
    Panic,
}

fn action() -> impl Strategy<Value = Action> {
    prop_oneof![
        (0usize..4).prop_map(Action::Complete),
        (0usize..3).prop_map(Action::DropBodyAfter),
        Just(Action::CancelBeforeHead),
        Just(Action::Error),
        Just(Action::ServerError),
        Just(Action::Panic),
    ]
}

#[derive(Default)]
struct Count {
    calls: AtomicUsize,
    success: AtomicUsize,
    failure: AtomicUsize,
    cancelled: AtomicUsize,
}

impl CompletionObserver for Count {
    fn on_complete(&self, c: &Completion<'_>) {
        self.calls.fetch_add(1, Ordering::SeqCst);
        match c.outcome {
            Outcome::Success => &self.success,
            Outcome::Failure => &self.failure,
            Outcome::Cancelled => &self.cancelled,
        }
        .fetch_add(1, Ordering::SeqCst);
    }
}

async fn run(actions: Vec<Action>, seed: u64, ttft: bool) -> Result<(), TestCaseError> {
    let pool = Pool::builder()
        .replica("a", ReplicaSpec::new("m"), ScriptedBackend::default())
        .replica(
            "b",
            ReplicaSpec::new("m").capacity_weight(2.0),
            ScriptedBackend::default(),
        )
        .replica("c", ReplicaSpec::new("m"), ScriptedBackend::default())
        .build()
        .unwrap();
    let mut least = LeastInFlightLayer::new(pool.clone()).seed(RngSeed::fixed(seed));
    if ttft {
        least = least.placement(Placement::predicted_ttft(Arc::new(PrefixIndex::default())));
    }
    let svc = ServiceBuilder::new()
        .layer(RouteContextLayer::default())
        .layer(least)
        .service(Dispatch::new(pool.clone()));
    let count = Arc::new(Count::default());
    let mut tasks = Vec::new();
    for (i, a) in actions.iter().copied().enumerate() {
        let mut svc = svc.clone();
        let count = count.clone();
        tasks.push(tokio::spawn(async move {
            let script = match a {
                Action::Complete(n) => Script::Stream {
                    chunks: n,
                    delay_ms: 1,
                },
                Action::DropBodyAfter(_) => Script::Stream {
                    chunks: 5,
                    delay_ms: 1,
                },
                Action::CancelBeforeHead => Script::Slow { delay_ms: 50 },
                Action::Error => Script::Error,
                Action::ServerError => Script::ServerError,
                Action::Panic => Script::Panic,
            };
            let mut req = request(script);
            // Prompts share a prefix of `i % 3` blocks' worth of chain.
            let chain: Vec<u64> = (0..(i % 7) as u64 * 40)
                .map(|b| b + (i % 3) as u64 * 1000)
                .collect();
            req.set_route_context(RouteContext {
                estimated_tokens: 100 + i as u64 + chain.len() as u64 * 16,
                prefix: Some(PrefixHashes::from_block_chain(
                    &chain,
                    16,
                    chain.len() as u64 * 16,
                )),
                ..Default::default()
            });
            req.add_completion_observer(count.clone());
            let fut = svc.ready().await.unwrap().call(req);
            match a {
                Action::CancelBeforeHead => {
                    let _ = tokio::time::timeout(Duration::from_millis(5), fut).await;
                }
                Action::DropBodyAfter(n) => {
                    let mut body = fut.await.unwrap().into_body();
                    for _ in 0..n {
                        body.frame().await;
                    }
                }
                _ => {
                    if let Ok(resp) = fut.await {
                        let _ = resp.into_body().collect().await;
                    }
                }
            }
        }));
    }
    for t in tasks {
        let _ = t.await; // panicking tasks are expected
    }
    let snap = pool.snapshot();
    for r in snap.replicas() {
        prop_assert_eq!(r.state().in_flight(), 0, "replica {}", r.id());
        prop_assert_eq!(r.state().in_flight_tokens(), 0, "replica {}", r.id());
        let w = r.state().work();
        prop_assert_eq!(
            (
                w.prefill_tokens(),
                w.prefill_requests(),
                w.decode_tokens(),
                w.decode_requests()
            ),
            (0, 0, 0, 0),
            "work of replica {}",
            r.id()
        );
        let rate = w.rate().unwrap_or(1.0);
        prop_assert!(rate.is_finite() && rate > 0.0, "rate {}", rate);
    }
    prop_assert_eq!(count.calls.load(Ordering::SeqCst), actions.len());
    let expect = |f: fn(&Action) -> bool| actions.iter().filter(|a| f(a)).count();
    prop_assert_eq!(
        count.success.load(Ordering::SeqCst),
        expect(|a| matches!(a, Action::Complete(_)))
    );
    prop_assert_eq!(
        count.failure.load(Ordering::SeqCst),
        expect(|a| matches!(a, Action::Error | Action::ServerError))
    );
    prop_assert_eq!(
        count.cancelled.load(Ordering::SeqCst),
        expect(|a| matches!(
            a,
            Action::DropBodyAfter(_) | Action::CancelBeforeHead | Action::Panic
        ))
    );
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn counters_return_to_zero(
        actions in prop::collection::vec(action(), 1..40),
        seed in any::<u64>(),
        ttft in any::<bool>(),
    ) {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_time()
            .build()
            .unwrap();
        rt.block_on(run(actions, seed, ttft))?;
    }
}

/// A streamed response keeps its request in flight until the body ends.
#[tokio::test]
async fn streaming_body_stays_in_flight_until_it_ends() {
    let pool = Pool::builder()
        .replica("a", ReplicaSpec::new("m"), ScriptedBackend::default())
        .build()
        .unwrap();
    let mut svc = Dispatch::new(pool.clone());
    let resp = svc
        .ready()
        .await
        .unwrap()
        .call(request(Script::Stream {
            chunks: 3,
            delay_ms: 1,
        }))
        .await
        .unwrap();
    let state = pool.snapshot().replicas()[0].state().clone();
    assert_eq!(state.in_flight(), 1, "head arrived, body not read");
    let mut body = resp.into_body();
    body.frame().await.unwrap().unwrap();
    assert_eq!(state.in_flight(), 1, "mid-stream");
    while body.frame().await.is_some() {}
    assert_eq!(state.in_flight(), 0, "body ended");
    assert_eq!(state.completed(), 1);
    assert!(state.ewma_duration().is_some());
}

/// Draining: in-flight requests finish, no new request goes there, and the drain resolves.
#[tokio::test]
async fn drain_waits_for_in_flight_and_takes_no_new_requests() {
    let pool = Pool::builder()
        .replica("a", ReplicaSpec::new("m"), ScriptedBackend::default())
        .replica("b", ReplicaSpec::new("m"), ScriptedBackend::default())
        .build()
        .unwrap();
    let mut svc = Dispatch::new(pool.clone());
    let mut open = Vec::new();
    for _ in 0..6 {
        open.push(
            svc.ready()
                .await
                .unwrap()
                .call(request(Script::Stream {
                    chunks: 2,
                    delay_ms: 1,
                }))
                .await
                .unwrap(),
        );
    }
    let a = pool.snapshot().get("a").unwrap().1.clone();
    let before = a.state().in_flight();
    let drain = pool.drain("a").unwrap();
    assert_eq!(drain.is_drained(), before == 0);
    for _ in 0..20 {
        let r = svc
            .ready()
            .await
            .unwrap()
            .call(request(Script::Stream {
                chunks: 0,
                delay_ms: 0,
            }))
            .await
            .unwrap();
        assert_eq!(
            r.extensions()
                .get::<replica_router::decision::Decision>()
                .unwrap()
                .replica()
                .as_str(),
            "b"
        );
    }
    assert_eq!(a.state().in_flight(), before);
    let waiter = tokio::spawn(async move { drain.wait().await });
    for resp in open {
        let _ = resp.into_body().collect().await;
    }
    tokio::time::timeout(Duration::from_secs(5), waiter)
        .await
        .expect("drain resolves")
        .unwrap();
    assert_eq!(a.state().in_flight(), 0);
}

/// A body that says it has ended right after its last data frame is finished with success even
/// if nobody polls it again (hyper's server stops polling at that point).
#[tokio::test]
async fn body_that_reports_its_end_completes_without_a_final_poll() {
    let pool = Pool::builder()
        .replica("a", ReplicaSpec::new("m"), ScriptedBackend::default())
        .build()
        .unwrap();
    let mut svc = Dispatch::new(pool.clone());
    let resp = svc
        .ready()
        .await
        .unwrap()
        .call(request(Script::Stream {
            chunks: 2,
            delay_ms: 0,
        }))
        .await
        .unwrap();
    let state = pool.snapshot().replicas()[0].state().clone();
    let mut body = resp.into_body();
    body.frame().await.unwrap().unwrap();
    body.frame().await.unwrap().unwrap();
    assert!(http_body::Body::is_end_stream(&body));
    assert_eq!(state.in_flight(), 0);
    assert_eq!(state.completed(), 1);
    assert_eq!(state.cancelled(), 0);
    drop(body);
    assert_eq!(state.cancelled(), 0);
}
