//! Two gateways sharing one real redis-server as their counter store: a tenant's quota holds
//! across both, and a session goes to the same replica whichever gateway it reaches.
#![cfg(feature = "redis")]

#[path = "../../../tests/support/mod.rs"]
mod support;

use std::net::SocketAddr;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use replica_router_gateway::{Gateway, GatewayConfig};
use replica_router_mock::{MockConfig, MockEngine, MockServer};

fn chat() -> Bytes {
    Bytes::from_static(br#"{"model":"mock-llama-3-70b","messages":[{"role":"user","content":"hi"}],"max_tokens":1}"#)
}

#[tokio::test]
async fn quota_and_session_placement_hold_across_two_gateways() {
    let Some(redis) = support::RedisServer::start() else {
        return;
    };
    let mut reps = Vec::new();
    for _ in 0..3 {
        let cfg = MockConfig {
            time_scale: 1000.0,
            ..MockConfig::default()
        };
        reps.push(
            MockServer::bind(SocketAddr::from(([127, 0, 0, 1], 0)), MockEngine::new(cfg))
                .await
                .unwrap(),
        );
    }
    let mut args = vec![
        "--listen".to_owned(),
        "127.0.0.1:0".into(),
        "--tenant-rate".into(),
        "3/60".into(),
        "--counter-store".into(),
        redis.url(),
    ];
    for r in &reps {
        args.push("--replica".into());
        args.push(format!("http://{}", r.local_addr()));
    }
    let a = Gateway::bind(GatewayConfig::from_args(&args).unwrap())
        .await
        .unwrap();
    let b = Gateway::bind(GatewayConfig::from_args(&args).unwrap())
        .await
        .unwrap();
    let c: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let send = |gw: SocketAddr, tenant: &'static str, session: &'static str| {
        let c = c.clone();
        async move {
            let req = Request::post(format!("http://{gw}/v1/chat/completions"))
                .header("x-tenant-id", tenant)
                .header("x-session-id", session)
                .body(Full::new(chat()))
                .unwrap();
            let resp = c.request(req).await.unwrap();
            let status = resp.status();
            let replica = resp
                .headers()
                .get("x-replica-id")
                .map(|v| v.to_str().unwrap().to_owned());
            let _ = resp.into_body().collect().await;
            (status, replica)
        }
    };
    // 3 per minute for acme across the cluster: 2 through A, 1 through B, then B refuses.
    let (s1, r1) = send(a.local_addr(), "acme", "conv-1").await;
    let (s2, r2) = send(a.local_addr(), "acme", "conv-1").await;
    let (s3, r3) = send(b.local_addr(), "acme", "conv-1").await;
    assert_eq!(
        (s1, s2, s3),
        (StatusCode::OK, StatusCode::OK, StatusCode::OK)
    );
    // The session stayed on one replica through both gateways.
    assert_eq!(r1, r2);
    assert_eq!(r1, r3);
    let (s4, _) = send(b.local_addr(), "acme", "conv-1").await;
    assert_eq!(s4, StatusCode::TOO_MANY_REQUESTS);
    let (s5, _) = send(a.local_addr(), "acme", "conv-2").await;
    assert_eq!(s5, StatusCode::TOO_MANY_REQUESTS);
    // Another tenant has its own quota.
    let (s6, _) = send(b.local_addr(), "globex", "conv-3").await;
    assert_eq!(s6, StatusCode::OK);
    a.shutdown().await;
    b.shutdown().await;
}
