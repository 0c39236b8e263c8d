//! The admin routes over real HTTP: `GET /admin/replicas` during a load test, on the main
//! listener, turned off, or on their own address.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use replica_router_gateway::{Gateway, GatewayConfig};
use replica_router_mock::{MockConfig, MockEngine, MockServer};
use serde_json::Value;

type HttpClient = Client<HttpConnector, Full<Bytes>>;

async fn replicas(n: usize, time_scale: f64) -> Vec<MockServer> {
    let mut out = Vec::new();
    for _ in 0..n {
        let cfg = MockConfig {
            time_scale,
            ..MockConfig::default()
        };
        out.push(
            MockServer::bind(SocketAddr::from(([127, 0, 0, 1], 0)), MockEngine::new(cfg))
                .await
                .unwrap(),
        );
    }
    out
}

async fn gateway(reps: &[MockServer], extra: &[&str]) -> Gateway {
    let mut args = vec!["--listen".to_owned(), "127.0.0.1:0".to_owned()];
    for r in reps {
        args.push("--replica".into());
        args.push(format!("http://{},tp=2", r.local_addr()));
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    Gateway::bind(GatewayConfig::from_args(&args).unwrap())
        .await
        .unwrap()
}

async fn get(c: &HttpClient, addr: SocketAddr, path: &str) -> (StatusCode, Value) {
    let req = Request::get(format!("http://{addr}{path}"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = c.request(req).await.unwrap();
    let status = resp.status();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
}

const CHAT: &str = r#"{"model":"mock-llama-3-70b","messages":[{"role":"user","content":"tell me a long story about the sea"}],"max_tokens":64,"stream":true}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_replicas_shows_each_replicas_spec_state_and_load_under_load() {
    let reps = replicas(2, 20.0).await;
    let gw = gateway(&reps, &[]).await;
    let c: HttpClient = Client::builder(TokioExecutor::new()).build_http();
    let mut load = Vec::new();
    for i in 0..40 {
        let c = c.clone();
        let addr = gw.local_addr();
        load.push(tokio::spawn(async move {
            let req = Request::post(format!("http://{addr}/v1/chat/completions"))
                .header("x-session-id", format!("s-{i}"))
                .body(Full::new(Bytes::from_static(CHAT.as_bytes())))
                .unwrap();
            let resp = c.request(req).await.unwrap();
            assert_eq!(resp.status(), StatusCode::OK);
            let _ = resp.into_body().collect().await;
        }));
    }
    // Sample while the load runs: some sample sees requests in flight.
    let mut max_in_flight = 0;
    let mut last = Value::Null;
    for _ in 0..50 {
        let (status, v) = get(&c, gw.local_addr(), "/admin/replicas").await;
        assert_eq!(status, StatusCode::OK);
        let pool = &v["pools"][0];
        let reps_v = pool["replicas"].as_array().unwrap();
        assert_eq!(reps_v.len(), 2);
        let in_flight: u64 = reps_v
            .iter()
            .map(|r| r["in_flight"].as_u64().unwrap())
            .sum();
        max_in_flight = max_in_flight.max(in_flight);
        last = v;
        if max_in_flight > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(max_in_flight > 0, "never saw load: {last}");
    for t in load {
        t.await.unwrap();
    }
    let (_, v) = get(&c, gw.local_addr(), "/admin/replicas").await;
    let reps_v = v["pools"][0]["replicas"].as_array().unwrap().clone();
    let mut completed = 0;
    let mut share = 0.0;
    for r in &reps_v {
        assert_eq!(r["spec"]["tensor_parallel"], 2);
        assert_eq!(
            r["spec"]["max_context"], 131_072,
            "read from /v1/models: {r}"
        );
        assert_eq!(r["state"], "healthy");
        assert_eq!(r["eligible"], true);
        assert_eq!(r["in_flight"], 0, "{r}");
        for field in [
            "wait_estimate_ms",
            "ewma_ttfb_ms",
            "work",
            "engine",
            "share_of_completed",
        ] {
            assert!(r.get(field).is_some(), "{field} missing: {r}");
        }
        completed += r["completed"].as_u64().unwrap();
        share += r["share_of_completed"].as_f64().unwrap();
    }
    assert_eq!(completed, 40);
    assert!((share - 1.0).abs() < 1e-9, "{share}");
    assert!(v["generated_at_unix_ms"].as_u64().unwrap() > 0);
    gw.shutdown().await;
}

#[tokio::test]
async fn admin_routes_can_be_turned_off_or_moved_to_their_own_address() {
    let reps = replicas(1, 1000.0).await;
    let c: HttpClient = Client::builder(TokioExecutor::new()).build_http();
    let off = gateway(&reps, &["--admin", "off"]).await;
    assert_eq!(
        get(&c, off.local_addr(), "/admin/replicas").await.0,
        StatusCode::NOT_FOUND
    );
    assert!(off.admin_addr().is_none());
    off.shutdown().await;

    let moved = gateway(&reps, &["--admin", "127.0.0.1:0"]).await;
    let admin = moved.admin_addr().unwrap();
    assert_eq!(
        get(&c, moved.local_addr(), "/admin/replicas").await.0,
        StatusCode::NOT_FOUND
    );
    let (status, v) = get(&c, admin, "/admin/replicas").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(v["pools"][0]["replicas"].as_array().unwrap().len(), 1);
    // Only admin routes there.
    assert_eq!(get(&c, admin, "/v1/models").await.0, StatusCode::NOT_FOUND);
    assert_eq!(
        get(&c, admin, "/admin/nothing").await.0,
        StatusCode::NOT_FOUND
    );
    moved.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_advice_reads_a_saturated_pool_as_replica_bound() {
    // One replica whose batch holds 4 sequences, at real speed: 24 long streams saturate it.
    let cfg = MockConfig {
        max_num_seqs: 4,
        time_scale: 1.0,
        ..MockConfig::default()
    };
    let rep = MockServer::bind(SocketAddr::from(([127, 0, 0, 1], 0)), MockEngine::new(cfg))
        .await
        .unwrap();
    let gw = gateway(std::slice::from_ref(&rep), &["--max-num-seqs", "4"]).await;
    let c: HttpClient = Client::builder(TokioExecutor::new()).build_http();
    let (status, idle) = get(&c, gw.local_addr(), "/admin/advice").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(idle["pools"][0]["replicas"], 1);
    let mut load = Vec::new();
    for i in 0..24 {
        let c = c.clone();
        let addr = gw.local_addr();
        load.push(tokio::spawn(async move {
            let body = format!(
                r#"{{"model":"mock-llama-3-70b","messages":[{{"role":"user","content":"story {i}"}}],"max_tokens":400,"stream":true}}"#
            );
            let req = Request::post(format!("http://{addr}/v1/chat/completions"))
                .body(Full::new(Bytes::from(body)))
                .unwrap();
            if let Ok(resp) = c.request(req).await {
                let _ = resp.into_body().collect().await;
            }
        }));
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let advice = loop {
        let (_, v) = get(&c, gw.local_addr(), "/admin/advice").await;
        if v["pools"][0]["advice"]["verdict"] == "replica-bound" {
            break v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never replica-bound: {v}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let pool = &advice["pools"][0];
    assert_eq!(pool["replicas_reporting"], 1);
    let evidence = &pool["advice"]["evidence"];
    assert!(
        evidence["mean_batch_occupancy"].as_f64().unwrap() >= 0.9,
        "{evidence}"
    );
    assert!(
        evidence["mean_waiting"].as_f64().unwrap() > 0.0,
        "{evidence}"
    );
    // More replicas of the same shape proposed.
    let proposed = &pool["advice"]["proposed"];
    assert!(
        proposed["replicas"].as_u64().unwrap() > 1,
        "{}",
        pool["advice"]
    );
    assert!(
        pool["summary"].as_str().unwrap().contains("replica"),
        "{pool}"
    );
    for t in load {
        t.abort();
    }
    gw.shutdown().await;
}
