//! Staggered rollouts and starts on tokio's paused clock, over in-process engines whose probe
//! the test controls (a restarted engine refuses requests and fails its probe while it "loads
//! its weights").

mod common;

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use common::ChunkBody;
use http_body_util::BodyExt;
use metrics_util::debugging::{DebugValue, DebuggingRecorder};
use parking_lot::Mutex;
use replica_router::backend::{Backend, BoxFuture};
use replica_router::balance::LeastInFlightLayer;
use replica_router::decision::{Decision, DecisionReason};
use replica_router::dispatch::Dispatch;
use replica_router::error::BoxError;
use replica_router::pool::{Health, Pool, SlowStart};
use replica_router::replica::PoolError;
use replica_router::replica::{ReplicaId, ReplicaSpec};
use replica_router::rng::RngSeed;
use replica_router::rollout::{
    DrainTimeoutPolicy, NewReplica, ReadyGate, Rollout, RolloutConfig, RolloutError, RolloutEvent,
    StaggerConfig, StaggeredStart, StepError,
};
use tokio::time::Instant;
use tower::{Service, ServiceBuilder, ServiceExt};

/// An engine process: serves streams while up; after a restart it refuses connections and fails
/// its probe until its weights have loaded (`load` later), unless it is `broken`.
#[derive(Clone)]
struct Engine {
    up: Arc<AtomicBool>,
    broken: Arc<AtomicBool>,
    loading: Arc<AtomicBool>,
    served: Arc<AtomicUsize>,
    refused: Arc<AtomicUsize>,
    chunks: usize,
    chunk_ms: u64,
}

impl Engine {
    fn new(chunks: usize, chunk_ms: u64) -> Self {
        Engine {
            up: Arc::new(AtomicBool::new(true)),
            broken: Arc::new(AtomicBool::new(false)),
            loading: Arc::new(AtomicBool::new(false)),
            served: Arc::default(),
            refused: Arc::default(),
            chunks,
            chunk_ms,
        }
    }

    /// A stopped engine (for staggered starts).
    fn stopped() -> Self {
        let e = Engine::new(1, 0);
        e.up.store(false, Ordering::SeqCst);
        e
    }

    /// Stops the process and starts it again: the weights load for `load` in the background.
    fn restart(&self, load: Duration) {
        self.up.store(false, Ordering::SeqCst);
        self.loading.store(true, Ordering::SeqCst);
        let (up, broken, loading) = (self.up.clone(), self.broken.clone(), self.loading.clone());
        tokio::spawn(async move {
            tokio::time::sleep(load).await;
            loading.store(false, Ordering::SeqCst);
            if !broken.load(Ordering::SeqCst) {
                up.store(true, Ordering::SeqCst);
            }
        });
    }
}

impl Backend for Engine {
    fn probe(&self) -> BoxFuture<'static, Result<(), BoxError>> {
        let up = self.up.load(Ordering::SeqCst);
        Box::pin(async move {
            if up {
                Ok(())
            } else {
                Err("loading weights".into())
            }
        })
    }
}

impl Service<http::Request<()>> for Engine {
    type Response = http::Response<ChunkBody>;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _req: http::Request<()>) -> Self::Future {
        if !self.up.load(Ordering::SeqCst) {
            self.refused.fetch_add(1, Ordering::SeqCst);
            return Box::pin(async {
                Err(std::io::Error::from(std::io::ErrorKind::ConnectionRefused))
            });
        }
        self.served.fetch_add(1, Ordering::SeqCst);
        let body = ChunkBody::new(self.chunks, Duration::from_millis(self.chunk_ms));
        Box::pin(async move { Ok(http::Response::new(body)) })
    }
}

fn pool_of(n: usize, chunks: usize, chunk_ms: u64) -> (Pool<Engine>, Vec<Engine>) {
    pool_with((0..n).map(|_| Engine::new(chunks, chunk_ms)).collect())
}

fn pool_with(engines: Vec<Engine>) -> (Pool<Engine>, Vec<Engine>) {
    let mut b = Pool::builder().slow_start(SlowStart::linear(Duration::from_secs(30)));
    for (i, e) in engines.iter().enumerate() {
        b = b.replica(format!("r{i}"), ReplicaSpec::new("m"), e.clone());
    }
    (b.build().unwrap(), engines)
}

fn out_of_service(pool: &Pool<Engine>) -> usize {
    pool.snapshot()
        .replicas()
        .iter()
        .filter(|r| !r.state().is_eligible())
        .count()
}

fn fast_gate() -> ReadyGate {
    ReadyGate {
        interval: Duration::from_secs(1),
        probe_timeout: Duration::from_millis(500),
        timeout: Duration::from_secs(120),
        consecutive: 1,
    }
}

/// What the background traffic saw.
#[derive(Default)]
struct Traffic {
    sent: AtomicUsize,
    ok: AtomicUsize,
    errors: Mutex<Vec<String>>,
    truncated: AtomicUsize,
}

/// Sends a streamed request every `every` until `stop`, reading every body to its end.
fn start_traffic(
    pool: &Pool<Engine>,
    every: Duration,
    chunks: usize,
    stop: Arc<AtomicBool>,
) -> (Arc<Traffic>, tokio::task::JoinHandle<()>) {
    let stats = Arc::new(Traffic::default());
    let svc = ServiceBuilder::new()
        .layer(LeastInFlightLayer::new(pool.clone()).seed(RngSeed::fixed(7)))
        .service(Dispatch::with_seed(pool.clone(), RngSeed::fixed(8)));
    let s = stats.clone();
    let handle = tokio::spawn(async move {
        let mut tasks = Vec::new();
        while !stop.load(Ordering::SeqCst) {
            let svc = svc.clone();
            let s = s.clone();
            s.sent.fetch_add(1, Ordering::SeqCst);
            tasks.push(tokio::spawn(async move {
                match svc.oneshot(http::Request::new(())).await {
                    Ok(resp) => {
                        let body = resp.into_body().collect().await.unwrap().to_bytes();
                        if body.len() == chunks * b"data: tok\n\n".len() {
                            s.ok.fetch_add(1, Ordering::SeqCst);
                        } else {
                            s.truncated.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                    Err(e) => s.errors.lock().push(e.to_string()),
                }
            }));
            tokio::time::sleep(every).await;
        }
        for t in tasks {
            t.await.unwrap();
        }
    });
    (stats, handle)
}

/// Records the most replicas out of service seen at any event, and in a 100 ms sampler.
fn watch_unavailable(pool: &Pool<Engine>) -> (Arc<AtomicUsize>, tokio::task::JoinHandle<()>) {
    let max = Arc::new(AtomicUsize::new(0));
    let (p, m) = (pool.clone(), max.clone());
    let sampler = tokio::spawn(async move {
        loop {
            m.fetch_max(out_of_service(&p), Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    (max, sampler)
}

/// Restarts engines, checking when each action starts that the replica has nothing in flight,
/// and recording the action windows.
type Windows = Arc<Mutex<Vec<(ReplicaId, Instant)>>>;

#[tokio::test(start_paused = true)]
async fn one_at_a_time_under_traffic_without_errors() {
    let (pool, engines) = pool_of(4, 10, 100); // 1 s streams
    let stop = Arc::new(AtomicBool::new(false));
    let (traffic, traffic_task) = start_traffic(&pool, Duration::from_millis(50), 10, stop.clone());
    tokio::time::sleep(Duration::from_secs(2)).await; // streams in flight everywhere

    let (max_out, sampler) = watch_unavailable(&pool);
    let event_max = Arc::new(AtomicUsize::new(0));
    let actions: Windows = Arc::default();
    let busy_at_action = Arc::new(AtomicUsize::new(0));
    let (p, em) = (pool.clone(), event_max.clone());
    let config = RolloutConfig {
        ready: fast_gate(),
        settle: Duration::from_secs(5),
        ..RolloutConfig::default()
    };
    let (a, busy) = (actions.clone(), busy_at_action.clone());
    let engines2 = engines.clone();
    let report = Rollout::new(pool.clone(), config)
        .on_event(move |_| {
            em.fetch_max(out_of_service(&p), Ordering::SeqCst);
        })
        .run(move |replica| {
            let i: usize = replica.id().as_str()[1..].parse().unwrap();
            if replica.state().in_flight() != 0 {
                busy.fetch_add(1, Ordering::SeqCst);
            }
            a.lock().push((replica.id().clone(), Instant::now()));
            let engine = engines2[i].clone();
            async move {
                engine.restart(Duration::from_secs(20));
                Ok::<_, std::io::Error>(())
            }
        })
        .await
        .unwrap();

    stop.store(true, Ordering::SeqCst);
    traffic_task.await.unwrap();
    sampler.abort();

    assert_eq!(report.completed.len(), 4);
    assert!(report.failed.is_empty() && report.not_started.is_empty());
    assert_eq!(report.peak_in_progress, 1);
    assert_eq!(max_out.load(Ordering::SeqCst), 1, "sampled");
    assert_eq!(event_max.load(Ordering::SeqCst), 1, "at events");
    assert_eq!(
        busy_at_action.load(Ordering::SeqCst),
        0,
        "an action began with requests in flight"
    );
    // Sequential: each restart began after the previous replica's 20 s load and 5 s settle.
    let windows = actions.lock().clone();
    assert_eq!(windows.len(), 4);
    for pair in windows.windows(2) {
        assert!(
            pair[1].1 - pair[0].1 >= Duration::from_secs(25),
            "{windows:?}"
        );
    }
    // Traffic never noticed: no error, no truncated stream, and nothing reached a restarting
    // engine.
    assert!(
        traffic.errors.lock().is_empty(),
        "{:?}",
        traffic.errors.lock()
    );
    assert_eq!(traffic.truncated.load(Ordering::SeqCst), 0);
    assert_eq!(
        traffic.ok.load(Ordering::SeqCst),
        traffic.sent.load(Ordering::SeqCst)
    );
    assert!(traffic.sent.load(Ordering::SeqCst) > 1000);
    assert_eq!(
        engines
            .iter()
            .map(|e| e.refused.load(Ordering::SeqCst))
            .sum::<usize>(),
        0
    );
    // Every replica serves again, and every in-flight counter is back to zero.
    assert_eq!(out_of_service(&pool), 0);
    for r in pool.snapshot().replicas() {
        assert_eq!(r.state().in_flight(), 0);
        assert_eq!(r.state().health(), Health::Healthy);
    }
    // Restarted engines took traffic again after readmission.
    for e in &engines {
        assert!(e.served.load(Ordering::SeqCst) > 0);
    }
}

#[tokio::test(start_paused = true)]
async fn never_more_than_max_unavailable() {
    for max in [2usize, 3] {
        let (pool, engines) = pool_of(7, 5, 100);
        let stop = Arc::new(AtomicBool::new(false));
        let (traffic, traffic_task) =
            start_traffic(&pool, Duration::from_millis(100), 5, stop.clone());
        let (max_out, sampler) = watch_unavailable(&pool);
        let concurrent = Arc::new(AtomicUsize::new(0));
        let peak_actions = Arc::new(AtomicUsize::new(0));
        let (c, pa) = (concurrent.clone(), peak_actions.clone());
        let (p, m2) = (pool.clone(), max_out.clone());
        let engines2 = engines.clone();
        let report = Rollout::new(
            pool.clone(),
            RolloutConfig {
                max_unavailable: max,
                ready: fast_gate(),
                ..RolloutConfig::default()
            },
        )
        .on_event(move |e| {
            m2.fetch_max(out_of_service(&p), Ordering::SeqCst);
            if let RolloutEvent::Readmitted { .. } = e {
                c.fetch_sub(1, Ordering::SeqCst);
            }
        })
        .run(move |replica| {
            let i: usize = replica.id().as_str()[1..].parse().unwrap();
            let n = concurrent.fetch_add(1, Ordering::SeqCst) + 1;
            pa.fetch_max(n, Ordering::SeqCst);
            let engine = engines2[i].clone();
            async move {
                // Stopping takes a while; loading takes 10 s plus 1 s per replica index.
                tokio::time::sleep(Duration::from_secs(1)).await;
                engine.restart(Duration::from_secs(10 + i as u64));
                Ok::<_, BoxError>(())
            }
        })
        .await
        .unwrap();
        stop.store(true, Ordering::SeqCst);
        traffic_task.await.unwrap();
        sampler.abort();

        assert_eq!(report.completed.len(), 7);
        assert_eq!(report.peak_in_progress, max);
        assert_eq!(max_out.load(Ordering::SeqCst), max);
        assert_eq!(peak_actions.load(Ordering::SeqCst), max);
        assert!(
            traffic.errors.lock().is_empty(),
            "{:?}",
            traffic.errors.lock()
        );
        assert_eq!(
            traffic.ok.load(Ordering::SeqCst),
            traffic.sent.load(Ordering::SeqCst)
        );
    }
}

/// Sends one request to replica `id` and reads its body on a task; returns when the body ended
/// and its length.
async fn stream_on(pool: &Pool<Engine>, id: &str) -> tokio::task::JoinHandle<(Instant, usize)> {
    let mut svc = Dispatch::with_seed(pool.clone(), RngSeed::fixed(1));
    let mut req = http::Request::new(());
    req.extensions_mut().insert(Decision::new(
        ReplicaId::new(id).unwrap(),
        DecisionReason::Home,
    ));
    let resp = svc.ready().await.unwrap().call(req).await.unwrap();
    assert_eq!(
        resp.extensions()
            .get::<Decision>()
            .unwrap()
            .replica()
            .as_str(),
        id
    );
    tokio::spawn(async move {
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        (Instant::now(), bytes.len())
    })
}

const CHUNK: usize = b"data: tok\n\n".len();

#[tokio::test(start_paused = true)]
async fn draining_replica_finishes_its_streams_before_the_action() {
    // r0 streams 30 chunks a second apart; r1 answers at once.
    let (pool, engines) = pool_with(vec![Engine::new(30, 1000), Engine::new(1, 0)]);
    let reader = stream_on(&pool, "r0").await;
    assert_eq!(pool.snapshot().get("r0").unwrap().1.state().in_flight(), 1);

    // Traffic during the drain goes to r1.
    let stop = Arc::new(AtomicBool::new(false));
    let (traffic, traffic_task) = start_traffic(&pool, Duration::from_millis(200), 1, stop.clone());

    let action_at = Arc::new(Mutex::new(None::<Instant>));
    let aa = action_at.clone();
    let e0 = engines[0].clone();
    let mut rollout = Rollout::new(
        pool.clone(),
        RolloutConfig {
            ready: fast_gate(),
            ..RolloutConfig::default()
        },
    )
    .replicas(["r0"]);
    let mut events = rollout.events();
    let report = rollout
        .run(move |_| {
            *aa.lock() = Some(Instant::now());
            let e0 = e0.clone();
            async move {
                e0.restart(Duration::from_secs(5));
                Ok::<_, BoxError>(())
            }
        })
        .await
        .unwrap();
    stop.store(true, Ordering::SeqCst);
    traffic_task.await.unwrap();

    let (ended, len) = reader.await.unwrap();
    assert_eq!(len, 30 * CHUNK, "the stream was cut");
    let acted = action_at.lock().unwrap();
    assert!(acted >= ended, "the restart began before the stream ended");
    assert_eq!(report.completed, vec![ReplicaId::new("r0").unwrap()]);
    assert!(report.drain_timeouts.is_empty());
    assert!(
        traffic.errors.lock().is_empty(),
        "{:?}",
        traffic.errors.lock()
    );
    assert_eq!(engines[0].refused.load(Ordering::SeqCst), 0);

    // The drain waited for the stream: about 30 s.
    let mut drained = None;
    while let Ok(e) = events.try_recv() {
        if let RolloutEvent::Drained { waited, .. } = e {
            drained = Some(waited);
        }
    }
    assert!(drained.unwrap() >= Duration::from_secs(29));
}

#[tokio::test(start_paused = true)]
async fn event_sequence_of_one_replica() {
    let (pool, engines) = pool_of(2, 1, 0);
    let mut rollout = Rollout::new(
        pool.clone(),
        RolloutConfig {
            ready: fast_gate(),
            settle: Duration::from_secs(3),
            ..RolloutConfig::default()
        },
    )
    .replicas(["r1"]);
    let mut events = rollout.events();
    let e1 = engines[1].clone();
    rollout
        .run(move |_| {
            let e1 = e1.clone();
            async move {
                e1.restart(Duration::from_millis(2500));
                Ok::<_, BoxError>(())
            }
        })
        .await
        .unwrap();
    let mut names = Vec::new();
    while let Ok(e) = events.try_recv() {
        names.push(match e {
            RolloutEvent::Started { replicas } => {
                assert_eq!(replicas, vec![ReplicaId::new("r1").unwrap()]);
                "started"
            }
            RolloutEvent::Draining { .. } => "draining",
            RolloutEvent::Drained { .. } => "drained",
            RolloutEvent::ActionStarted { .. } => "action",
            RolloutEvent::ActionFinished { .. } => "action-done",
            RolloutEvent::ProbeFailed { attempt, .. } => {
                assert!(attempt <= 3);
                "probe-failed"
            }
            RolloutEvent::Ready { probes, .. } => {
                assert_eq!(probes, 4); // at 0, 1, 2 s loading; 3 s up
                "ready"
            }
            RolloutEvent::Readmitted { .. } => "readmitted",
            RolloutEvent::ReplicaDone { done, total, .. } => {
                assert_eq!((done, total), (1, 1));
                "done"
            }
            RolloutEvent::Finished { success } => {
                assert!(success);
                "finished"
            }
            other => panic!("unexpected {other:?}"),
        });
    }
    assert_eq!(
        names,
        [
            "started",
            "draining",
            "drained",
            "action",
            "action-done",
            "probe-failed",
            "probe-failed",
            "probe-failed",
            "ready",
            "readmitted",
            "done",
            "finished"
        ]
    );
    // Readmitted with slow start: the ramp is running.
    let snap = pool.snapshot();
    let r1 = snap.get("r1").unwrap().1;
    assert!(r1.state().is_eligible());
}

#[tokio::test(start_paused = true)]
async fn readmission_starts_the_slow_start_ramp() {
    let (pool, engines) = pool_of(2, 1, 0);
    let e0 = engines[0].clone();
    Rollout::new(
        pool.clone(),
        RolloutConfig {
            ready: fast_gate(),
            ..RolloutConfig::default()
        },
    )
    .replicas(["r0"])
    .run(move |_| {
        let e0 = e0.clone();
        async move {
            e0.restart(Duration::from_secs(10));
            Ok::<_, BoxError>(())
        }
    })
    .await
    .unwrap();
    let snap = pool.snapshot();
    let (r0, r1) = (snap.get("r0").unwrap().1, snap.get("r1").unwrap().1);
    assert!(r0.state().is_ramping());
    assert!(r0.current_weight(snap.slow_start()) < 0.2);
    assert!(!r1.state().is_ramping());
}

#[tokio::test(start_paused = true)]
async fn a_replica_that_never_comes_back_aborts_and_leaves_the_rest_untouched() {
    let (pool, engines) = pool_of(4, 5, 100);
    engines[1].broken.store(true, Ordering::SeqCst);
    let stop = Arc::new(AtomicBool::new(false));
    let (traffic, traffic_task) = start_traffic(&pool, Duration::from_millis(100), 5, stop.clone());
    let restarted = Arc::new(Mutex::new(Vec::new()));
    let r = restarted.clone();
    let engines2 = engines.clone();
    let err = Rollout::new(
        pool.clone(),
        RolloutConfig {
            ready: ReadyGate {
                timeout: Duration::from_secs(60),
                ..fast_gate()
            },
            ..RolloutConfig::default()
        },
    )
    .run(move |replica| {
        let i: usize = replica.id().as_str()[1..].parse().unwrap();
        r.lock().push(i);
        let engine = engines2[i].clone();
        async move {
            engine.restart(Duration::from_secs(10));
            Ok::<_, BoxError>(())
        }
    })
    .await
    .unwrap_err();
    // Traffic goes on for a while after the abort.
    tokio::time::sleep(Duration::from_secs(10)).await;
    stop.store(true, Ordering::SeqCst);
    traffic_task.await.unwrap();

    let RolloutError::ReplicaFailed {
        replica,
        cause,
        report,
    } = &err
    else {
        panic!("{err:?}")
    };
    assert_eq!(replica.as_str(), "r1");
    let StepError::NotReady {
        probes, last_error, ..
    } = cause
    else {
        panic!("{cause:?}")
    };
    assert!(*probes >= 60 && last_error.contains("loading weights"));
    assert_eq!(report.completed, vec![ReplicaId::new("r0").unwrap()]);
    assert_eq!(report.failed, vec![ReplicaId::new("r1").unwrap()]);
    assert_eq!(
        report.not_started,
        vec![ReplicaId::new("r2").unwrap(), ReplicaId::new("r3").unwrap()]
    );
    assert_eq!(err.report(), Some(&**report));
    assert!(err.to_string().contains("r1"), "{err}");
    assert_eq!(*restarted.lock(), vec![0, 1]);

    // r1 is left drained (and unhealthy); r2 and r3 were never touched.
    let snap = pool.snapshot();
    let state = |id: &str| snap.get(id).unwrap().1.state().clone();
    assert!(state("r1").is_draining());
    assert_eq!(state("r1").health(), Health::Unhealthy);
    for id in ["r0", "r2", "r3"] {
        assert!(state(id).is_eligible(), "{id}");
    }
    assert!(!state("r2").is_ramping() && !state("r3").is_ramping());
    assert_eq!(engines[2].refused.load(Ordering::SeqCst), 0);
    assert!(engines[2].up.load(Ordering::SeqCst) && engines[3].up.load(Ordering::SeqCst));
    // No request failed, none reached the broken engine.
    assert!(
        traffic.errors.lock().is_empty(),
        "{:?}",
        traffic.errors.lock()
    );
    assert_eq!(engines[1].refused.load(Ordering::SeqCst), 0);
}

#[tokio::test(start_paused = true)]
async fn failing_or_slow_actions_abort() {
    // An action error.
    let (pool, _) = pool_of(3, 1, 0);
    let err = Rollout::new(pool.clone(), RolloutConfig::default())
        .run(|replica| async move {
            if replica.id().as_str() == "r1" {
                Err("image pull failed")
            } else {
                Ok(())
            }
        })
        .await
        .unwrap_err();
    match &err {
        RolloutError::ReplicaFailed {
            replica,
            cause: StepError::Action(source),
            report,
        } => {
            assert_eq!(replica.as_str(), "r1");
            assert_eq!(source.to_string(), "image pull failed");
            assert_eq!(report.completed.len(), 1);
            assert_eq!(report.not_started.len(), 1);
        }
        other => panic!("{other:?}"),
    }
    assert!(pool.snapshot().get("r1").unwrap().1.state().is_draining());
    assert!(pool.snapshot().get("r2").unwrap().1.state().is_eligible());

    // An action that hangs.
    let (pool, _) = pool_of(2, 1, 0);
    let err = Rollout::new(
        pool.clone(),
        RolloutConfig {
            action_timeout: Some(Duration::from_secs(30)),
            ..RolloutConfig::default()
        },
    )
    .run(|_| std::future::pending::<Result<(), BoxError>>())
    .await
    .unwrap_err();
    assert!(
        matches!(
            err,
            RolloutError::ReplicaFailed {
                cause: StepError::ActionTimedOut(d),
                ..
            } if d == Duration::from_secs(30)
        ),
        "{err:?}"
    );
    assert_eq!(out_of_service(&pool), 1);
}

#[tokio::test(start_paused = true)]
async fn drain_timeout_proceeds_or_aborts() {
    for policy in [DrainTimeoutPolicy::Proceed, DrainTimeoutPolicy::Abort] {
        let (pool, engines) = pool_with(vec![Engine::new(100, 1000), Engine::new(1, 0)]);
        let reader = stream_on(&pool, "r0").await; // 100 s stream
        let e0 = engines[0].clone();
        let result = Rollout::new(
            pool.clone(),
            RolloutConfig {
                drain_timeout: Duration::from_secs(5),
                on_drain_timeout: policy,
                ready: fast_gate(),
                ..RolloutConfig::default()
            },
        )
        .replicas(["r0"])
        .run(move |_| {
            let e0 = e0.clone();
            async move {
                e0.restart(Duration::from_secs(1));
                Ok::<_, BoxError>(())
            }
        })
        .await;
        match policy {
            DrainTimeoutPolicy::Proceed => {
                let report = result.unwrap();
                assert_eq!(report.drain_timeouts, vec![ReplicaId::new("r0").unwrap()]);
                assert_eq!(report.completed.len(), 1);
            }
            DrainTimeoutPolicy::Abort => {
                let err = result.unwrap_err();
                assert!(
                    matches!(
                        err,
                        RolloutError::ReplicaFailed {
                            cause: StepError::DrainTimedOut { in_flight: 1 },
                            ..
                        }
                    ),
                    "{err:?}"
                );
                // Left drained; the stream still finishes.
                assert!(pool.snapshot().get("r0").unwrap().1.state().is_draining());
                assert_eq!(engines[0].refused.load(Ordering::SeqCst), 0);
            }
        }
        // The in-process stream runs to its end either way (a real restart would cut it).
        let (_, len) = reader.await.unwrap();
        assert_eq!(len, 100 * CHUNK);
        assert_eq!(pool.snapshot().get("r0").unwrap().1.state().in_flight(), 0);
    }
}

#[tokio::test(start_paused = true)]
async fn unstable_after_settle_aborts() {
    let (pool, engines) = pool_of(3, 1, 0);
    let p = pool.clone();
    let engines2 = engines.clone();
    let err = Rollout::new(
        pool.clone(),
        RolloutConfig {
            ready: fast_gate(),
            settle: Duration::from_secs(30),
            ..RolloutConfig::default()
        },
    )
    .replicas(["r2", "r0", "r1"])
    .on_event(move |e| {
        // Outlier detection ejects r0 right after it comes back.
        if let RolloutEvent::Readmitted { replica } = e {
            if replica.as_str() == "r0" {
                p.eject("r0").unwrap();
            }
        }
    })
    .run(move |replica| {
        let i: usize = replica.id().as_str()[1..].parse().unwrap();
        let engine = engines2[i].clone();
        async move {
            engine.restart(Duration::from_secs(3));
            Ok::<_, BoxError>(())
        }
    })
    .await
    .unwrap_err();
    match &err {
        RolloutError::ReplicaFailed {
            replica,
            cause: StepError::Unstable { health },
            report,
        } => {
            assert_eq!(replica.as_str(), "r0");
            assert_eq!(*health, Health::Ejected);
            assert_eq!(report.completed, vec![ReplicaId::new("r2").unwrap()]);
            assert_eq!(report.not_started, vec![ReplicaId::new("r1").unwrap()]);
        }
        other => panic!("{other:?}"),
    }
    let snap = pool.snapshot();
    assert!(snap.get("r0").unwrap().1.state().is_draining());
    assert!(snap.get("r1").unwrap().1.state().is_eligible());
}

#[tokio::test(start_paused = true)]
async fn other_unavailable_replicas_use_the_budget() {
    // r2 is ejected and not a target: nothing may go down until it is back.
    let (pool, engines) = pool_of(3, 1, 0);
    pool.eject("r2").unwrap();
    let p = pool.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(40)).await;
        p.readmit("r2").unwrap();
    });
    let first_action = Arc::new(Mutex::new(None::<Instant>));
    let fa = first_action.clone();
    let start = Instant::now();
    let mut rollout = Rollout::new(
        pool.clone(),
        RolloutConfig {
            ready: fast_gate(),
            ..RolloutConfig::default()
        },
    )
    .replicas(["r0", "r1"]);
    let mut events = rollout.events();
    let engines2 = engines.clone();
    let report = rollout
        .run(move |replica| {
            fa.lock().get_or_insert_with(Instant::now);
            let i: usize = replica.id().as_str()[1..].parse().unwrap();
            let engine = engines2[i].clone();
            async move {
                engine.restart(Duration::from_secs(2));
                Ok::<_, BoxError>(())
            }
        })
        .await
        .unwrap();
    assert_eq!(report.completed.len(), 2);
    assert!(first_action.lock().unwrap() - start >= Duration::from_secs(40));
    let mut waited_on = None;
    while let Ok(e) = events.try_recv() {
        if let RolloutEvent::Waiting { unavailable } = e {
            waited_on = Some(unavailable);
        }
    }
    assert_eq!(waited_on, Some(vec![ReplicaId::new("r2").unwrap()]));

    // If it never comes back, the rollout gives up without touching anything.
    let (pool, _) = pool_of(3, 1, 0);
    pool.eject("r2").unwrap();
    let err = Rollout::new(
        pool.clone(),
        RolloutConfig {
            blocked_timeout: Duration::from_secs(60),
            ..RolloutConfig::default()
        },
    )
    .replicas(["r0", "r1"])
    .run(|_| async { Ok::<_, BoxError>(()) })
    .await
    .unwrap_err();
    match &err {
        RolloutError::Blocked {
            unavailable,
            waited,
            report,
        } => {
            assert_eq!(unavailable, &vec![ReplicaId::new("r2").unwrap()]);
            assert_eq!(*waited, Duration::from_secs(60));
            assert_eq!(report.not_started.len(), 2);
        }
        other => panic!("{other:?}"),
    }
    assert!(pool.snapshot().get("r0").unwrap().1.state().is_eligible());

    // Without counting others, the rollout proceeds.
    let report = Rollout::new(
        pool.clone(),
        RolloutConfig {
            count_other_unavailable: false,
            ..RolloutConfig::default()
        },
    )
    .replicas(["r0", "r1"])
    .run(|_| async { Ok::<_, BoxError>(()) })
    .await
    .unwrap();
    assert_eq!(report.completed.len(), 2);
}

#[tokio::test(start_paused = true)]
async fn targets_already_out_go_first() {
    let (pool, engines) = pool_of(3, 1, 0);
    pool.set_health("r2", Health::Unhealthy).unwrap();
    engines[2].up.store(false, Ordering::SeqCst); // it crashed
    let order = Arc::new(Mutex::new(Vec::new()));
    let o = order.clone();
    let engines2 = engines.clone();
    let report = Rollout::new(
        pool.clone(),
        RolloutConfig {
            ready: fast_gate(),
            ..RolloutConfig::default()
        },
    )
    .run(move |replica| {
        let i: usize = replica.id().as_str()[1..].parse().unwrap();
        o.lock().push(i);
        let engine = engines2[i].clone();
        async move {
            engine.restart(Duration::from_secs(2));
            Ok::<_, BoxError>(())
        }
    })
    .await
    .unwrap();
    assert_eq!(*order.lock(), vec![2, 0, 1]);
    assert_eq!(report.peak_in_progress, 1);
    assert_eq!(out_of_service(&pool), 0);
}

#[tokio::test(start_paused = true)]
async fn removed_replicas_are_skipped() {
    let (pool, _) = pool_of(3, 1, 0);
    let p = pool.clone();
    let report = Rollout::new(pool.clone(), RolloutConfig::default())
        .run(move |replica| {
            if replica.id().as_str() == "r0" {
                p.remove("r2").unwrap();
            }
            async { Ok::<_, BoxError>(()) }
        })
        .await
        .unwrap();
    assert_eq!(report.completed.len(), 2);
    assert_eq!(report.skipped, vec![ReplicaId::new("r2").unwrap()]);
}

#[tokio::test(start_paused = true)]
async fn bad_settings_touch_nothing() {
    let (pool, _) = pool_of(2, 1, 0);
    let run = |config: RolloutConfig, targets: &[&str]| {
        let mut r = Rollout::new(pool.clone(), config);
        if !targets.is_empty() {
            r = r.replicas(targets.iter().copied());
        }
        r.run(|_| async { Ok::<_, BoxError>(()) })
    };
    assert!(matches!(
        run(
            RolloutConfig {
                max_unavailable: 0,
                ..RolloutConfig::default()
            },
            &[]
        )
        .await,
        Err(RolloutError::InvalidConfig(_))
    ));
    let zero_interval = RolloutConfig {
        ready: ReadyGate {
            interval: Duration::ZERO,
            ..ReadyGate::default()
        },
        ..RolloutConfig::default()
    };
    assert!(matches!(
        run(zero_interval, &[]).await,
        Err(RolloutError::InvalidConfig(_))
    ));
    assert!(matches!(
        run(RolloutConfig::default(), &["r0", "nope"]).await,
        Err(RolloutError::Pool(PoolError::UnknownReplica(id))) if id.as_str() == "nope"
    ));
    assert!(matches!(
        run(RolloutConfig::default(), &["r0", "r0"]).await,
        Err(RolloutError::InvalidConfig(_))
    ));
    let long = "x".repeat(1000);
    assert!(matches!(
        run(RolloutConfig::default(), &[long.as_str()]).await,
        Err(RolloutError::Pool(PoolError::UnknownReplica(_)))
    ));
    assert_eq!(out_of_service(&pool), 0);
}

#[tokio::test(start_paused = true)]
async fn a_rollout_runs_on_a_spawned_task() {
    let (pool, engines) = pool_of(3, 1, 0);
    let engines2 = engines.clone();
    let task = tokio::spawn(
        Rollout::new(
            pool.clone(),
            RolloutConfig {
                ready: fast_gate(),
                ..RolloutConfig::default()
            },
        )
        .run(move |replica| {
            let i: usize = replica.id().as_str()[1..].parse().unwrap();
            let engine = engines2[i].clone();
            async move {
                engine.restart(Duration::from_secs(5));
                Ok::<_, BoxError>(())
            }
        }),
    );
    let report = task.await.unwrap().unwrap();
    assert_eq!(report.completed.len(), 3);
}

#[tokio::test(start_paused = true)]
async fn rollout_metrics() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let _guard = metrics::set_default_local_recorder(&recorder);
    let (pool, engines) = pool_of(2, 1, 0);
    let engines2 = engines.clone();
    Rollout::new(
        pool.clone(),
        RolloutConfig {
            ready: fast_gate(),
            ..RolloutConfig::default()
        },
    )
    .run(move |replica| {
        let i: usize = replica.id().as_str()[1..].parse().unwrap();
        let engine = engines2[i].clone();
        async move {
            engine.restart(Duration::from_millis(1500));
            Ok::<_, BoxError>(())
        }
    })
    .await
    .unwrap();
    let snap = snapshotter.snapshot().into_vec();
    let value = |name: &str, label: Option<(&str, &str)>| {
        snap.iter()
            .filter(|(k, _, _, _)| {
                k.key().name() == name
                    && label.is_none_or(|(l, v)| {
                        k.key().labels().any(|x| x.key() == l && x.value() == v)
                    })
            })
            .map(|(_, _, _, v)| match v {
                DebugValue::Counter(n) => *n as f64,
                DebugValue::Gauge(g) => g.into_inner(),
                DebugValue::Histogram(h) => h.len() as f64,
            })
            .collect::<Vec<f64>>()
    };
    assert_eq!(
        value(
            replica_router::rollout::REPLICAS_COUNTER,
            Some(("result", "done"))
        ),
        vec![2.0]
    );
    assert_eq!(
        value(replica_router::rollout::PROBE_FAILURES_COUNTER, None),
        vec![4.0] // two failed probes (0 s, 1 s) per replica
    );
    assert_eq!(
        value(replica_router::rollout::UNAVAILABLE_GAUGE, None),
        vec![0.0]
    );
    // Two samples of the ready phase (one per replica).
    assert_eq!(
        value(
            replica_router::rollout::PHASE_SECONDS_HISTOGRAM,
            Some(("phase", "ready"))
        ),
        vec![2.0]
    );
}

// ---- staggered start ----

type StartFuture = Pin<Box<dyn Future<Output = Result<(), BoxError>> + Send>>;

/// Launches stopped engines: each loads its weights for `load` after its start action.
fn launcher(
    engines: &[(String, Engine)],
    load: Duration,
    loading_now: Arc<AtomicUsize>,
    peak_loading: Arc<AtomicUsize>,
    starts: Arc<Mutex<Vec<(String, Instant)>>>,
) -> impl FnMut(NewReplica<Engine>) -> StartFuture {
    let engines: Vec<(String, Engine)> = engines.to_vec();
    move |r: NewReplica<Engine>| {
        let engine = engines
            .iter()
            .find(|(id, _)| id == r.id())
            .unwrap()
            .1
            .clone();
        let n = loading_now.fetch_add(1, Ordering::SeqCst) + 1;
        peak_loading.fetch_max(n, Ordering::SeqCst);
        starts.lock().push((r.id().to_owned(), Instant::now()));
        let loading_now = loading_now.clone();
        Box::pin(async move {
            engine.restart(load);
            let e = engine.clone();
            tokio::spawn(async move {
                while e.loading.load(Ordering::SeqCst) {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                loading_now.fetch_sub(1, Ordering::SeqCst);
            });
            Ok(())
        })
    }
}

fn new_engines(names: &[&str]) -> Vec<(String, Engine)> {
    names
        .iter()
        .map(|n| (n.to_string(), Engine::stopped()))
        .collect()
}

#[tokio::test(start_paused = true)]
async fn staggered_start_loads_one_replica_at_a_time() {
    let (pool, _) = pool_of(1, 1, 0);
    let fresh = new_engines(&["n0", "n1", "n2"]);
    let loading = Arc::new(AtomicUsize::new(0));
    let peak = Arc::new(AtomicUsize::new(0));
    let starts = Arc::new(Mutex::new(Vec::new()));
    let sizes = Arc::new(Mutex::new(Vec::new()));
    let (p, sz) = (pool.clone(), sizes.clone());
    let fresh2 = fresh.clone();
    let report = StaggeredStart::new(
        pool.clone(),
        StaggerConfig {
            ready: fast_gate(),
            ..StaggerConfig::default()
        },
    )
    .on_event(move |e| {
        if let RolloutEvent::Added { replica } = e {
            // Only ready replicas join.
            let engine = &fresh2
                .iter()
                .find(|(n, _)| n == replica.as_str())
                .unwrap()
                .1;
            assert!(engine.up.load(Ordering::SeqCst));
            sz.lock().push(p.snapshot().len());
        }
    })
    .run(
        fresh
            .iter()
            .map(|(n, e)| NewReplica::new(n.clone(), ReplicaSpec::new("m"), e.clone())),
        launcher(
            &fresh,
            Duration::from_secs(30),
            loading,
            peak.clone(),
            starts.clone(),
        ),
    )
    .await
    .unwrap();
    assert_eq!(report.completed.len(), 3);
    assert_eq!(
        peak.load(Ordering::SeqCst),
        1,
        "two replicas loaded weights at once"
    );
    assert_eq!(*sizes.lock(), vec![2, 3, 4]);
    let starts = starts.lock().clone();
    for pair in starts.windows(2) {
        assert!(pair[1].1 - pair[0].1 >= Duration::from_secs(30));
    }
    // New replicas ramp up from a cold cache.
    assert!(pool.snapshot().get("n2").unwrap().1.state().is_ramping());
}

#[tokio::test(start_paused = true)]
async fn staggered_start_with_two_slots_and_a_min_interval() {
    let (pool, _) = pool_of(1, 1, 0);
    let fresh = new_engines(&["n0", "n1", "n2", "n3", "n4"]);
    let loading = Arc::new(AtomicUsize::new(0));
    let peak = Arc::new(AtomicUsize::new(0));
    let starts = Arc::new(Mutex::new(Vec::new()));
    let report = StaggeredStart::new(
        pool.clone(),
        StaggerConfig {
            max_concurrent: 2,
            min_interval: Duration::from_secs(10),
            ready: fast_gate(),
            ..StaggerConfig::default()
        },
    )
    .run(
        fresh
            .iter()
            .map(|(n, e)| NewReplica::new(n.clone(), ReplicaSpec::new("m"), e.clone())),
        launcher(
            &fresh,
            Duration::from_secs(30),
            loading,
            peak.clone(),
            starts.clone(),
        ),
    )
    .await
    .unwrap();
    assert_eq!(report.completed.len(), 5);
    assert_eq!(report.peak_in_progress, 2);
    assert_eq!(peak.load(Ordering::SeqCst), 2);
    let starts = starts.lock().clone();
    let names: Vec<&str> = starts.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["n0", "n1", "n2", "n3", "n4"]);
    for pair in starts.windows(2) {
        assert!(
            pair[1].1 - pair[0].1 >= Duration::from_secs(10),
            "{starts:?}"
        );
    }
    assert_eq!(pool.snapshot().len(), 6);
}

#[tokio::test(start_paused = true)]
async fn staggered_start_stops_at_a_replica_that_never_gets_ready() {
    let (pool, _) = pool_of(1, 1, 0);
    let fresh = new_engines(&["n0", "n1", "n2"]);
    fresh[1].1.broken.store(true, Ordering::SeqCst);
    let err = StaggeredStart::new(
        pool.clone(),
        StaggerConfig {
            ready: ReadyGate {
                timeout: Duration::from_secs(90),
                ..fast_gate()
            },
            ..StaggerConfig::default()
        },
    )
    .run(
        fresh
            .iter()
            .map(|(n, e)| NewReplica::new(n.clone(), ReplicaSpec::new("m"), e.clone())),
        launcher(
            &fresh,
            Duration::from_secs(30),
            Arc::default(),
            Arc::default(),
            Arc::default(),
        ),
    )
    .await
    .unwrap_err();
    match &err {
        RolloutError::ReplicaFailed {
            replica,
            cause: StepError::NotReady { .. },
            report,
        } => {
            assert_eq!(replica.as_str(), "n1");
            assert_eq!(report.completed, vec![ReplicaId::new("n0").unwrap()]);
            assert_eq!(report.not_started, vec![ReplicaId::new("n2").unwrap()]);
        }
        other => panic!("{other:?}"),
    }
    let snap = pool.snapshot();
    assert!(snap.get("n0").is_some());
    assert!(
        snap.get("n1").is_none(),
        "a replica that never got ready joined"
    );
    assert!(snap.get("n2").is_none());
}

#[tokio::test(start_paused = true)]
async fn staggered_start_validates_before_starting_anything() {
    let (pool, _) = pool_of(1, 1, 0);
    let started = Arc::new(AtomicUsize::new(0));
    let s = started.clone();
    let run = |replicas: Vec<NewReplica<Engine>>| {
        let s = s.clone();
        StaggeredStart::new(pool.clone(), StaggerConfig::default()).run(replicas, move |_| {
            s.fetch_add(1, Ordering::SeqCst);
            async { Ok::<_, BoxError>(()) }
        })
    };
    let dup_pool = run(vec![
        NewReplica::new("n0", ReplicaSpec::new("m"), Engine::new(1, 0)),
        NewReplica::new("r0", ReplicaSpec::new("m"), Engine::new(1, 0)),
    ])
    .await;
    assert!(matches!(
        dup_pool,
        Err(RolloutError::Pool(PoolError::DuplicateReplica(ref id))) if id.as_str() == "r0"
    ));
    let dup_batch = run(vec![
        NewReplica::new("n0", ReplicaSpec::new("m"), Engine::new(1, 0)),
        NewReplica::new("n0", ReplicaSpec::new("m"), Engine::new(1, 0)),
    ])
    .await;
    assert!(matches!(
        dup_batch,
        Err(RolloutError::Pool(PoolError::DuplicateReplica(_)))
    ));
    let mismatch = run(vec![NewReplica::new(
        "n0",
        ReplicaSpec::new("m").tensor_parallel(4),
        Engine::new(1, 0),
    )])
    .await;
    assert!(matches!(
        mismatch,
        Err(RolloutError::Pool(PoolError::SpecMismatch {
            field: "tensor_parallel",
            ..
        }))
    ));
    let bad_weight = run(vec![NewReplica::new(
        "n0",
        ReplicaSpec::new("m").capacity_weight(f64::NAN),
        Engine::new(1, 0),
    )])
    .await;
    assert!(matches!(
        bad_weight,
        Err(RolloutError::Pool(PoolError::InvalidWeight { .. }))
    ));
    let empty_id = run(vec![NewReplica::new(
        "",
        ReplicaSpec::new("m"),
        Engine::new(1, 0),
    )])
    .await;
    assert!(matches!(
        empty_id,
        Err(RolloutError::Pool(PoolError::InvalidId(_)))
    ));
    assert_eq!(started.load(Ordering::SeqCst), 0);
    assert_eq!(pool.snapshot().len(), 1);

    // An empty pool takes its reference spec from the first new replica.
    let empty: Pool<Engine> = Pool::builder().allow_empty().build().unwrap();
    let err = StaggeredStart::new(empty.clone(), StaggerConfig::default())
        .admit(vec![
            NewReplica::new("a", ReplicaSpec::new("m"), Engine::new(1, 0)),
            NewReplica::new("b", ReplicaSpec::new("other"), Engine::new(1, 0)),
        ])
        .await
        .unwrap_err();
    assert!(matches!(
        err,
        RolloutError::Pool(PoolError::SpecMismatch { field: "model", .. })
    ));
    assert!(empty.snapshot().is_empty());
}

#[tokio::test(start_paused = true)]
async fn admit_gates_already_launched_replicas_on_their_probe() {
    let empty: Pool<Engine> = Pool::builder().allow_empty().build().unwrap();
    let a = Engine::stopped();
    let b = Engine::new(1, 0);
    let a2 = a.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(20)).await;
        a2.up.store(true, Ordering::SeqCst);
    });
    let start = Instant::now();
    let mut stagger = StaggeredStart::new(
        empty.clone(),
        StaggerConfig {
            ready: fast_gate(),
            settle: Duration::from_secs(5),
            ..StaggerConfig::default()
        },
    );
    let mut events = stagger.events();
    let report = stagger
        .admit(vec![
            NewReplica::new("a", ReplicaSpec::new("m"), a),
            NewReplica::new("b", ReplicaSpec::new("m"), b),
        ])
        .await
        .unwrap();
    assert_eq!(report.completed.len(), 2);
    assert!(start.elapsed() >= Duration::from_secs(30)); // 20 s load + 2 x 5 s settle
    let mut added = Vec::new();
    while let Ok(e) = events.try_recv() {
        if let RolloutEvent::Added { replica } = e {
            added.push(replica.to_string());
        }
    }
    assert_eq!(added, ["a", "b"]);
    assert_eq!(empty.snapshot().len(), 2);
}

#[tokio::test(start_paused = true)]
async fn traffic_is_not_affected_while_new_replicas_load() {
    let (pool, _) = pool_of(2, 5, 100);
    let stop = Arc::new(AtomicBool::new(false));
    let (traffic, task) = start_traffic(&pool, Duration::from_millis(100), 5, stop.clone());
    let fresh: Vec<(String, Engine)> = ["n0", "n1"]
        .iter()
        .map(|n| {
            let e = Engine::new(5, 100);
            e.up.store(false, Ordering::SeqCst);
            (n.to_string(), e)
        })
        .collect();
    StaggeredStart::new(
        pool.clone(),
        StaggerConfig {
            ready: fast_gate(),
            ..StaggerConfig::default()
        },
    )
    .run(
        fresh
            .iter()
            .map(|(n, e)| NewReplica::new(n.clone(), ReplicaSpec::new("m"), e.clone())),
        launcher(
            &fresh,
            Duration::from_secs(20),
            Arc::default(),
            Arc::default(),
            Arc::default(),
        ),
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_secs(5)).await;
    stop.store(true, Ordering::SeqCst);
    task.await.unwrap();
    assert!(
        traffic.errors.lock().is_empty(),
        "{:?}",
        traffic.errors.lock()
    );
    assert_eq!(traffic.truncated.load(Ordering::SeqCst), 0);
    // Nothing was sent to a loading engine, and the new ones serve now.
    for (_, e) in &fresh {
        assert_eq!(e.refused.load(Ordering::SeqCst), 0);
        assert!(e.served.load(Ordering::SeqCst) > 0);
    }
}

#[tokio::test(start_paused = true)]
async fn rerunning_after_an_abort_takes_the_failed_replica_first() {
    let (pool, engines) = pool_of(3, 1, 0);
    engines[1].broken.store(true, Ordering::SeqCst);
    let restart = |engines: Vec<Engine>, order: Arc<Mutex<Vec<usize>>>| {
        move |replica: Arc<replica_router::pool::Replica<Engine>>| {
            let i: usize = replica.id().as_str()[1..].parse().unwrap();
            order.lock().push(i);
            let engine = engines[i].clone();
            async move {
                engine.restart(Duration::from_secs(3));
                Ok::<_, BoxError>(())
            }
        }
    };
    let config = RolloutConfig {
        ready: ReadyGate {
            timeout: Duration::from_secs(30),
            ..fast_gate()
        },
        ..RolloutConfig::default()
    };
    let order = Arc::new(Mutex::new(Vec::new()));
    let err = Rollout::new(pool.clone(), config.clone())
        .run(restart(engines.clone(), order.clone()))
        .await
        .unwrap_err();
    let report = err.report().unwrap().clone();
    assert_eq!(*order.lock(), vec![0, 1]);
    assert!(pool.snapshot().get("r1").unwrap().1.state().is_draining());

    // The operator fixes r1 and resumes with what is left: r1 (still drained) goes first, and
    // taking it costs no capacity.
    engines[1].broken.store(false, Ordering::SeqCst);
    let order = Arc::new(Mutex::new(Vec::new()));
    let left: Vec<String> = report
        .not_started
        .iter()
        .chain(&report.failed)
        .map(|id| id.to_string())
        .collect();
    let report = Rollout::new(pool.clone(), config)
        .replicas(left)
        .run(restart(engines.clone(), order.clone()))
        .await
        .unwrap();
    assert_eq!(*order.lock(), vec![1, 2]);
    assert_eq!(report.completed.len(), 2);
    assert_eq!(out_of_service(&pool), 0);
}
