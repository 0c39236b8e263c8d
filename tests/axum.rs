//! The axum example's app over real HTTP: a streamed two-turn session through axum, the full
//! stack and tower's middlewares lands both turns on one replica; errors are HTTP answers.
#![cfg(feature = "http-backend")]

#[path = "../examples/axum.rs"]
#[allow(dead_code)]
mod example;

use std::net::SocketAddr;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use replica_router_mock::{MockConfig, MockEngine, MockServer};

fn turn(n: usize) -> Bytes {
    let mut messages =
        vec![serde_json::json!({"role": "user", "content": "plan a trip to Lisbon"})];
    for t in 0..n {
        messages.push(serde_json::json!({"role": "assistant", "content": format!("answer {t}")}));
        messages.push(serde_json::json!({"role": "user", "content": format!("and day {t}?")}));
    }
    Bytes::from(
        serde_json::json!({"model": "mock-llama-3-70b", "messages": messages, "max_tokens": 8, "stream": true})
            .to_string(),
    )
}

#[tokio::test]
async fn a_streamed_two_turn_session_through_axum_stays_on_one_replica() {
    let mut mocks = Vec::new();
    for _ in 0..3 {
        let cfg = MockConfig {
            time_scale: 100.0,
            ..MockConfig::default()
        };
        mocks.push(
            MockServer::bind(SocketAddr::from(([127, 0, 0, 1], 0)), MockEngine::new(cfg))
                .await
                .unwrap(),
        );
    }
    let urls: Vec<String> = mocks
        .iter()
        .map(|m| format!("http://{}", m.local_addr()))
        .collect();
    let pool = example::pool(&urls);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = example::app(&pool);
    let server = tokio::spawn(async move { axum::serve(listener, app).await });
    let c: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();

    let mut replicas = Vec::new();
    for n in 0..2 {
        let req = Request::post(format!("http://{addr}/v1/chat/completions"))
            .header("x-session-id", "trip-42")
            .header("content-type", "application/json")
            .body(Full::new(turn(n)))
            .unwrap();
        let resp = c.request(req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(resp.headers()["x-replica-affinity"], "home");
        replicas.push(resp.headers()["x-replica-id"].to_str().unwrap().to_owned());
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        let text = String::from_utf8_lossy(&body);
        assert!(
            text.contains("data: ") && text.ends_with("data: [DONE]\n\n"),
            "{text}"
        );
    }
    assert_eq!(replicas[0], replicas[1]);
    // The stream ended: nothing stays in flight.
    for r in pool.snapshot().replicas() {
        assert_eq!(r.state().in_flight(), 0);
    }

    // Errors are answers in the OpenAI shape: a body over the buffer's limit is a 413.
    let big = Bytes::from(vec![b'x'; (10 << 20) + 1]);
    let req = Request::post(format!("http://{addr}/v1/chat/completions"))
        .body(Full::new(big))
        .unwrap();
    let resp = c.request(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert!(body.starts_with(b"{\"error\""));
    // With every replica gone, a 503 from the stack, not a dropped connection.
    for m in &mocks {
        pool.remove(m.local_addr().to_string().as_str()).unwrap();
    }
    let req = Request::post(format!("http://{addr}/v1/chat/completions"))
        .body(Full::new(turn(0)))
        .unwrap();
    assert_eq!(
        c.request(req).await.unwrap().status(),
        StatusCode::SERVICE_UNAVAILABLE
    );
    server.abort();
}
