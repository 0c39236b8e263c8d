//! Real sockets on loopback: three HTTP replicas (tiny hyper servers), one killed mid-run.
//!
//! The killed replica is ejected, its traffic moves to the others, no request is lost unless it
//! had already reached the killed replica, and every in-flight counter returns to zero.
#![cfg(feature = "http-backend")]

use std::collections::HashSet;
use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::stream;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use parking_lot::Mutex;
use replica_router::balance::LeastInFlightLayer;
use replica_router::decision::Decision;
use replica_router::dispatch::Dispatch;
use replica_router::health::{
    FailoverLayer, HealthCheckConfig, HealthChecker, OutlierConfig, OutlierDetectionLayer,
    OutlierDetector,
};
use replica_router::http_backend::{default_client, HttpReplica};
use replica_router::pool::{Health, Pool};
use replica_router::replica::ReplicaSpec;
use replica_router::rng::RngSeed;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tower::{Service, ServiceBuilder, ServiceExt};

/// A replica server: answers `/health`, streams 3 chunks 30 ms apart for anything else, and
/// records the `x-req-id` of every request its handler received.
struct Server {
    url: String,
    received: Arc<Mutex<HashSet<u64>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Server {
    async fn start(name: &'static str) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let received = Arc::new(Mutex::new(HashSet::new()));
        let seen = received.clone();
        let task = tokio::spawn(async move {
            // Connections live in this set: aborting the server task drops them all.
            let mut conns = JoinSet::new();
            loop {
                let Ok((sock, _)) = listener.accept().await else {
                    return;
                };
                let seen = seen.clone();
                conns.spawn(async move {
                    let svc = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let seen = seen.clone();
                        async move {
                            if req.uri().path() == "/health" {
                                let body = StreamBody::new(stream::iter([Ok::<_, Infallible>(
                                    Frame::data(Bytes::from_static(b"ok")),
                                )]));
                                return Ok::<_, Infallible>(http::Response::new(
                                    body.boxed_unsync(),
                                ));
                            }
                            if let Some(id) = req
                                .headers()
                                .get("x-req-id")
                                .and_then(|v| v.to_str().ok())
                                .and_then(|v| v.parse::<u64>().ok())
                            {
                                seen.lock().insert(id);
                            }
                            let chunks = stream::unfold(0u32, move |i| async move {
                                if i == 3 {
                                    return None;
                                }
                                tokio::time::sleep(Duration::from_millis(30)).await;
                                let data = Bytes::from(format!("{name} {i}\n"));
                                Some((Ok::<_, Infallible>(Frame::data(data)), i + 1))
                            });
                            let mut resp =
                                http::Response::new(StreamBody::new(chunks).boxed_unsync());
                            resp.headers_mut()
                                .insert("x-served-by", http::HeaderValue::from_static(name));
                            Ok(resp)
                        }
                    });
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(sock), svc)
                        .await;
                });
            }
        });
        Server {
            url,
            received,
            task,
        }
    }

    /// Kills the server: listener and every open connection.
    fn kill(&self) {
        self.task.abort();
    }
}

#[derive(Debug)]
enum Outcome {
    Served(String),
    /// Failed, with the replica it was dispatched to.
    Failed(String),
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_replica_is_ejected_and_nothing_unstarted_is_lost() {
    let names = ["r0", "r1", "r2"];
    let mut servers = Vec::new();
    for n in names {
        servers.push(Server::start(n).await);
    }
    let client = default_client::<Full<Bytes>>(32);
    let mut builder = Pool::builder();
    for (n, s) in names.iter().zip(&servers) {
        let replica = HttpReplica::new(&s.url, client.clone())
            .unwrap()
            .probe_timeout(Duration::from_millis(200));
        builder = builder.replica(*n, ReplicaSpec::new("m"), replica);
    }
    let pool = builder.build().unwrap();
    let detector = OutlierDetector::new(
        pool.clone(),
        OutlierConfig {
            consecutive_failures: 3,
            base_ejection: Duration::from_secs(60),
            ..Default::default()
        },
    );
    let checks = HealthChecker::new(
        pool.clone(),
        HealthCheckConfig {
            interval: Duration::from_millis(100),
            timeout: Duration::from_millis(200),
            unhealthy_threshold: 2,
            healthy_threshold: 2,
            load_interval: None,
        },
    )
    .outlier_detector(detector.clone())
    .spawn();
    let gateway = ServiceBuilder::new()
        .layer(FailoverLayer::new(pool.clone()))
        .layer(OutlierDetectionLayer::new(&detector))
        .layer(LeastInFlightLayer::new(pool.clone()).seed(RngSeed::fixed(3)))
        .service(Dispatch::with_seed(pool.clone(), RngSeed::fixed(4)));

    const TOTAL: u64 = 240;
    const CONCURRENCY: usize = 12;
    let done = Arc::new(AtomicUsize::new(0));
    let next = Arc::new(AtomicUsize::new(0));
    let outcomes = Arc::new(Mutex::new(Vec::<(u64, Outcome)>::new()));
    let mut clients = JoinSet::new();
    for _ in 0..CONCURRENCY {
        let mut gw = gateway.clone();
        let (done, next, outcomes) = (done.clone(), next.clone(), outcomes.clone());
        clients.spawn(async move {
            loop {
                let id = next.fetch_add(1, Ordering::SeqCst) as u64;
                if id >= TOTAL {
                    return;
                }
                let req = http::Request::builder()
                    .uri("/v1/chat/completions")
                    .header("x-req-id", id.to_string())
                    .body(Full::new(Bytes::from_static(b"{}")))
                    .unwrap();
                let outcome = match gw.ready().await.unwrap().call(req).await {
                    Ok(resp) => {
                        let to = resp
                            .extensions()
                            .get::<Decision>()
                            .unwrap()
                            .replica()
                            .to_string();
                        let by = resp
                            .headers()
                            .get("x-served-by")
                            .map(|v| v.to_str().unwrap().to_string());
                        match resp.into_body().collect().await.map(|b| b.to_bytes()) {
                            Ok(body) if !body.is_empty() => {
                                assert_eq!(by.as_deref(), Some(to.as_str()));
                                Outcome::Served(to)
                            }
                            _ => Outcome::Failed(to),
                        }
                    }
                    Err(replica_router::error::RouteError::Backend { replica, source }) => {
                        let mut chain = format!("{source}");
                        let mut cur = source.source();
                        while let Some(e) = cur {
                            chain.push_str(&format!(" <- {e} ({e:?})"));
                            cur = e.source();
                        }
                        eprintln!("request {id} failed on {replica}: {chain}");
                        Outcome::Failed(replica.to_string())
                    }
                    Err(e) => panic!("request {id}: unexpected {e}"),
                };
                outcomes.lock().push((id, outcome));
                done.fetch_add(1, Ordering::SeqCst);
            }
        });
    }

    // Kill r1 a third of the way through, with requests in flight on it.
    while done.load(Ordering::SeqCst) < (TOTAL / 3) as usize {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let in_flight_on_r1 = pool.snapshot().get("r1").unwrap().1.state().in_flight();
    servers[1].kill();
    let killed_at_id = next.load(Ordering::SeqCst) as u64;
    while clients.join_next().await.is_some() {}

    // r1 is out: ejected by failures or marked unhealthy by its failing probes.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while pool.snapshot().get("r1").unwrap().1.state().health() == Health::Healthy {
        assert!(tokio::time::Instant::now() < deadline, "r1 never taken out");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let outcomes = outcomes.lock();
    assert_eq!(outcomes.len() as u64, TOTAL);
    let received_by_r1 = servers[1].received.lock().clone();
    let mut failed = 0;
    for (id, o) in outcomes.iter() {
        if let Outcome::Failed(to) = o {
            failed += 1;
            // Only requests that had reached the killed replica may fail.
            assert_eq!(to, "r1", "request {id} failed on {to}");
            assert!(
                received_by_r1.contains(id),
                "request {id} failed without having reached r1"
            );
        }
    }
    // At most what can be in flight at once (the killed streams), typically the few that were.
    assert!(failed <= CONCURRENCY, "{failed} failed");
    assert!(
        in_flight_on_r1 > 0,
        "the kill should catch requests in flight"
    );
    // After the kill, the survivors served everything that was not already on r1.
    let late: Vec<_> = outcomes
        .iter()
        .filter(|(id, _)| *id >= killed_at_id + CONCURRENCY as u64)
        .collect();
    assert!(late.len() > 100);
    for (id, o) in &late {
        assert!(
            matches!(o, Outcome::Served(to) if to != "r1"),
            "late request {id}: {o:?}"
        );
    }
    for n in ["r0", "r2"] {
        let served = late
            .iter()
            .filter(|(_, o)| matches!(o, Outcome::Served(to) if to == n))
            .count();
        assert!(
            served > late.len() / 4,
            "{n} served {served} of {}",
            late.len()
        );
    }
    // Every in-flight counter is back to zero.
    for r in pool.snapshot().replicas() {
        assert_eq!(r.state().in_flight(), 0, "{}", r.id());
        assert_eq!(r.state().in_flight_tokens(), 0, "{}", r.id());
    }
    drop(checks);
    for s in &servers {
        s.kill();
    }
}

/// `HttpReplica::vllm_load` scrapes `/metrics` over a real socket into the replica's state, and
/// the health checker stores what it read.
#[tokio::test(flavor = "current_thread")]
async fn http_replica_scrapes_vllm_metrics() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let server = tokio::spawn(async move {
        let mut conns = JoinSet::new();
        loop {
            let Ok((sock, _)) = listener.accept().await else {
                return;
            };
            conns.spawn(async move {
                let svc = service_fn(|req: http::Request<hyper::body::Incoming>| async move {
                    let body = if req.uri().path() == "/metrics" {
                        &include_bytes!("fixtures/vllm_metrics.txt")[..]
                    } else {
                        &b"ok"[..]
                    };
                    Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::from_static(body))))
                });
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(sock), svc)
                    .await;
            });
        }
    });
    let replica = HttpReplica::new(&url, default_client::<Full<Bytes>>(4))
        .unwrap()
        .vllm_load(
            replica_router::load::prometheus::VllmParser::new().model_name("org/llama \"3\"\\70b"),
        );
    let pool = Pool::builder()
        .replica("v", ReplicaSpec::new("m"), replica)
        .build()
        .unwrap();
    let checker = HealthChecker::new(pool.clone(), HealthCheckConfig::default());
    assert_eq!(checker.scrape_round().await, 1);
    let report = pool.snapshot().replicas()[0].state().load_report().unwrap();
    assert_eq!((report.running, report.waiting), (8, 1));
    assert_eq!(report.kv_usage, Some(0.375));
    server.abort();
}
