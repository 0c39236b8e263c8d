//! Over real HTTP on loopback (client -> gateway -> HTTP mock replicas): context-length fit
//! (limits declared or read from `/v1/models`), model-tier pools routed by the body's `model`,
//! and stateless routes.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use replica_router_gateway::{Gateway, GatewayConfig};
use replica_router_mock::{MockConfig, MockEngine, MockServer};
use serde_json::{json, Value};

type HttpClient = Client<HttpConnector, Full<Bytes>>;

fn client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

async fn replica(model: &str, max_model_len: u32, time_scale: f64) -> MockServer {
    let cfg = MockConfig {
        model: model.to_owned(),
        max_model_len,
        time_scale,
        ..MockConfig::default()
    };
    MockServer::bind(SocketAddr::from(([127, 0, 0, 1], 0)), MockEngine::new(cfg))
        .await
        .unwrap()
}

async fn gateway(replicas: &[String], extra: &[&str]) -> Gateway {
    let mut args = vec!["--listen".to_owned(), "127.0.0.1:0".to_owned()];
    for r in replicas {
        args.push("--replica".into());
        args.push(r.clone());
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    Gateway::bind(GatewayConfig::from_args(&args).unwrap())
        .await
        .unwrap()
}

fn url(r: &MockServer) -> String {
    format!("http://{}", r.local_addr())
}

/// A chat whose prompt is about `tokens` tokens (the gateway estimates 4 bytes a token).
fn chat(model: &str, tokens: usize, max_tokens: u64) -> Bytes {
    let text = format!("{tokens}: {}", "word ".repeat(tokens * 4 / 5));
    let body = json!({"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": max_tokens});
    Bytes::from(body.to_string())
}

struct Answer {
    status: StatusCode,
    replica: Option<String>,
    body: Value,
}

async fn call(c: &HttpClient, gw: &Gateway, method: Method, path: &str, body: Bytes) -> Answer {
    call_with(c, gw, method, path, body, &[]).await
}

async fn call_with(
    c: &HttpClient,
    gw: &Gateway,
    method: Method,
    path: &str,
    body: Bytes,
    headers: &[(&str, &str)],
) -> Answer {
    let mut req = Request::builder()
        .method(method)
        .uri(format!("http://{}{path}", gw.local_addr()))
        .header("content-type", "application/json");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = c.request(req.body(Full::new(body)).unwrap()).await.unwrap();
    let status = resp.status();
    let replica = resp
        .headers()
        .get("x-replica-id")
        .map(|v| v.to_str().unwrap().to_owned());
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    Answer {
        status,
        replica,
        body,
    }
}

fn prompts_seen(r: &MockServer) -> u64 {
    r.engine().stats().prompt_tokens
}

#[tokio::test]
async fn long_requests_go_only_where_they_fit_and_too_long_ones_reach_no_replica() {
    const M: &str = "mock-llama-3-70b";
    // Limits read from each replica's /v1/models (max_model_len): 8k, 8k, 128k.
    let short_a = replica(M, 8_192, 1000.0).await;
    let short_b = replica(M, 8_192, 1000.0).await;
    let long = replica(M, 131_072, 1000.0).await;
    let gw = gateway(&[url(&short_a), url(&short_b), url(&long)], &[]).await;
    let c = client();
    let long_id = long.local_addr().to_string();

    // Short chats (no shared prefix) spread over all three.
    let mut seen = std::collections::HashSet::new();
    for i in 0..60 {
        let a = call(
            &c,
            &gw,
            Method::POST,
            "/v1/chat/completions",
            chat(M, 100 + i, 4),
        )
        .await;
        assert_eq!(a.status, StatusCode::OK, "{}", a.body);
        seen.insert(a.replica.unwrap());
    }
    assert_eq!(seen.len(), 3, "{seen:?}");

    // 20k-token prompts fit only the long-context replica, with or without a session.
    for session in [None, Some("long-conv")] {
        for _ in 0..5 {
            let headers: Vec<(&str, &str)> =
                session.map(|s| ("x-session-id", s)).into_iter().collect();
            let a = call_with(
                &c,
                &gw,
                Method::POST,
                "/v1/chat/completions",
                chat(M, 20_000, 16),
                &headers,
            )
            .await;
            assert_eq!(a.status, StatusCode::OK, "{}", a.body);
            assert_eq!(a.replica.as_deref(), Some(long_id.as_str()));
        }
    }
    // A 6k prompt asking for 4k tokens needs 10k: past the short replicas' 8k.
    let a = call(
        &c,
        &gw,
        Method::POST,
        "/v1/chat/completions",
        chat(M, 6_000, 4_000),
    )
    .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.body);
    assert_eq!(a.replica.as_deref(), Some(long_id.as_str()));

    // 300k tokens fit nowhere (even counting the estimate's margin): 400 in the OpenAI shape,
    // and no replica saw a prompt token of it.
    let before: Vec<u64> = [&short_a, &short_b, &long]
        .iter()
        .map(|r| prompts_seen(r))
        .collect();
    let a = call(
        &c,
        &gw,
        Method::POST,
        "/v1/chat/completions",
        chat(M, 300_000, 16),
    )
    .await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST);
    assert_eq!(
        a.body["error"]["type"], "context_length_exceeded",
        "{}",
        a.body
    );
    let message = a.body["error"]["message"].as_str().unwrap();
    assert!(message.contains("131072"), "{message}");
    assert!(a.replica.is_none());
    let after: Vec<u64> = [&short_a, &short_b, &long]
        .iter()
        .map(|r| prompts_seen(r))
        .collect();
    assert_eq!(before, after);
    gw.shutdown().await;
}

#[tokio::test]
async fn a_declared_max_context_wins_over_the_replicas_own() {
    const M: &str = "mock-llama-3-70b";
    let a = replica(M, 131_072, 1000.0).await;
    let b = replica(M, 131_072, 1000.0).await;
    // Declared: A takes at most 4k tokens although it reports 128k.
    let gw = gateway(&[format!("{},max_context=4096", url(&a)), url(&b)], &[]).await;
    let c = client();
    for _ in 0..8 {
        let r = call(
            &c,
            &gw,
            Method::POST,
            "/v1/chat/completions",
            chat(M, 10_000, 8),
        )
        .await;
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(
            r.replica.as_deref(),
            Some(b.local_addr().to_string().as_str())
        );
    }
    gw.shutdown().await;
}

#[tokio::test]
async fn each_model_has_its_pool_and_unknown_or_malformed_models_are_refused() {
    let small = [
        replica("small-8b", 32_768, 1000.0).await,
        replica("small-8b", 32_768, 1000.0).await,
    ];
    let large = replica("large-70b", 131_072, 1000.0).await;
    let mut reps: Vec<String> = small
        .iter()
        .map(|r| format!("{},model=small-8b", url(r)))
        .collect();
    reps.push(format!("{},model=large-70b,tp=4", url(&large)));
    let gw = gateway(&reps, &[]).await;
    let c = client();
    let small_ids: Vec<String> = small.iter().map(|r| r.local_addr().to_string()).collect();
    let large_id = large.local_addr().to_string();

    for _ in 0..10 {
        let a = call(
            &c,
            &gw,
            Method::POST,
            "/v1/chat/completions",
            chat("small-8b", 50, 4),
        )
        .await;
        assert_eq!(a.status, StatusCode::OK, "{}", a.body);
        assert!(small_ids.contains(a.replica.as_ref().unwrap()));
        let a = call(
            &c,
            &gw,
            Method::POST,
            "/v1/chat/completions",
            chat("large-70b", 50, 4),
        )
        .await;
        assert_eq!(a.status, StatusCode::OK, "{}", a.body);
        assert_eq!(a.replica.as_ref(), Some(&large_id));
    }
    // Unknown model: 404 in the OpenAI shape.
    let a = call(
        &c,
        &gw,
        Method::POST,
        "/v1/chat/completions",
        chat("gpt-9", 50, 4),
    )
    .await;
    assert_eq!(a.status, StatusCode::NOT_FOUND, "{}", a.body);
    assert!(a.body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("gpt-9"));
    // `model` not a string, body not JSON: 400.
    let bad = Bytes::from(
        json!({"model": 7, "messages": [{"role": "user", "content": "hi"}]}).to_string(),
    );
    let a = call(&c, &gw, Method::POST, "/v1/chat/completions", bad).await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST, "{}", a.body);
    let a = call(
        &c,
        &gw,
        Method::POST,
        "/v1/chat/completions",
        Bytes::from_static(b"{not json"),
    )
    .await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST);
    let a = call(
        &c,
        &gw,
        Method::POST,
        "/v1/embeddings",
        Bytes::from_static(b"{\"model\":[1]}"),
    )
    .await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST);

    // The gateway answers /v1/models from its pools.
    let a = call(&c, &gw, Method::GET, "/v1/models", Bytes::new()).await;
    assert_eq!(a.status, StatusCode::OK);
    let ids: Vec<&str> = a.body["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["small-8b", "large-70b"]);
    assert_eq!(a.body["data"][0]["max_model_len"], 32_768);
    assert_eq!(a.body["data"][0]["replicas"], 2);
    assert_eq!(gw.pools().count(), 2);
    gw.shutdown().await;
}

#[tokio::test]
async fn a_saturated_pool_does_not_queue_the_other_pools_requests() {
    // The batch pool: one slow replica (real-time prefill) with room for 2 sequences.
    let batch_cfg = MockConfig {
        model: "batch-70b".into(),
        max_num_seqs: 2,
        time_scale: 1.0,
        ..MockConfig::default()
    };
    let batch = MockServer::bind(
        SocketAddr::from(([127, 0, 0, 1], 0)),
        MockEngine::new(batch_cfg),
    )
    .await
    .unwrap();
    let chat_rep = replica("chat-8b", 32_768, 1000.0).await;
    let gw = gateway(
        &[
            format!("{},model=batch-70b", url(&batch)),
            format!("{},model=chat-8b", url(&chat_rep)),
        ],
        &[],
    )
    .await;
    let c = client();
    // Flood the batch pool: 12 requests of 4k prompt tokens and 64 output tokens each.
    let mut flood = Vec::new();
    for _ in 0..12 {
        let c = c.clone();
        let addr = gw.local_addr();
        flood.push(tokio::spawn(async move {
            let req = Request::post(format!("http://{addr}/v1/chat/completions"))
                .body(Full::new(chat("batch-70b", 4_000, 64)))
                .unwrap();
            let _ = tokio::time::timeout(Duration::from_secs(30), async {
                if let Ok(r) = c.request(req).await {
                    let _ = r.into_body().collect().await;
                }
            })
            .await;
        }));
    }
    // Wait until the batch replica queues requests.
    let mut queued = false;
    for _ in 0..200 {
        if batch.engine().stats().waiting > 0 {
            queued = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(queued, "the batch pool never saturated");
    // Meanwhile the chat pool answers, and its replica never queues.
    for _ in 0..20 {
        let a = call(
            &c,
            &gw,
            Method::POST,
            "/v1/chat/completions",
            chat("chat-8b", 200, 4),
        )
        .await;
        assert_eq!(a.status, StatusCode::OK, "{}", a.body);
        assert_eq!(chat_rep.engine().stats().waiting, 0);
    }
    assert!(
        batch.engine().stats().waiting > 0,
        "the flood ended before the chat requests did"
    );
    for f in flood {
        f.abort();
    }
    gw.shutdown().await;
}

#[tokio::test]
async fn embeddings_are_stateless_whatever_the_session_header() {
    const M: &str = "mock-llama-3-70b";
    let reps = [
        replica(M, 8_192, 1000.0).await,
        replica(M, 8_192, 1000.0).await,
    ];
    let gw = gateway(&reps.iter().map(url).collect::<Vec<_>>(), &[]).await;
    let c = client();
    let mut affinity = Vec::new();
    for _ in 0..6 {
        let req = Request::post(format!("http://{}/v1/embeddings", gw.local_addr()))
            .header("x-session-id", "conv-1")
            .body(Full::new(Bytes::from_static(
                br#"{"model":"mock-llama-3-70b","input":"hi"}"#,
            )))
            .unwrap();
        let resp = c.request(req).await.unwrap();
        affinity.push(resp.headers().get("x-replica-affinity").cloned());
        let _ = resp.into_body().collect().await;
    }
    // No affinity decision (home/spill/failover) was made for any of them.
    assert!(affinity.iter().all(Option::is_none), "{affinity:?}");
    gw.shutdown().await;
}
