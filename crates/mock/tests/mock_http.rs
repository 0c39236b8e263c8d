//! The mock replica over HTTP on loopback: OpenAI-compatible answers, streaming, probes, metrics, bad input.

use std::net::SocketAddr;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use replica_router_mock::{MockConfig, MockEngine, MockServer};
use serde_json::Value;

type HttpClient = Client<HttpConnector, Full<Bytes>>;

fn client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

async fn server() -> MockServer {
    // Ten thousand times faster than a real H100 pair, so the tests run in real time quickly.
    let cfg = MockConfig {
        time_scale: 10_000.0,
        ..MockConfig::default()
    };
    MockServer::bind(SocketAddr::from(([127, 0, 0, 1], 0)), MockEngine::new(cfg))
        .await
        .unwrap()
}

async fn send(
    c: &HttpClient,
    method: Method,
    addr: SocketAddr,
    path: &str,
    body: impl Into<Bytes>,
) -> (StatusCode, Bytes) {
    let req = Request::builder()
        .method(method)
        .uri(format!("http://{addr}{path}"))
        .header("content-type", "application/json")
        .body(Full::new(body.into()))
        .unwrap();
    let resp = c.request(req).await.unwrap();
    let status = resp.status();
    (status, resp.into_body().collect().await.unwrap().to_bytes())
}

fn json(b: &[u8]) -> Value {
    serde_json::from_slice(b)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(b)))
}

const CHAT: &str = r#"{"model":"mock-llama-3-70b","messages":[{"role":"system","content":"be brief"},{"role":"user","content":"what is data parallel inference?"}],"max_tokens":7}"#;

#[tokio::test]
async fn chat_completion_without_stream_has_usage() {
    let s = server().await;
    let c = client();
    let (status, body) = send(
        &c,
        Method::POST,
        s.local_addr(),
        "/v1/chat/completions",
        CHAT,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let v = json(&body);
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert_eq!(v["usage"]["completion_tokens"], 7);
    assert!(v["usage"]["prompt_tokens"].as_u64().unwrap() > 5);
    assert!(!v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .is_empty());
    s.shutdown().await;
}

#[tokio::test]
async fn streamed_chat_arrives_chunk_by_chunk_and_ends_with_done() {
    let s = server().await;
    let c = client();
    let body = CHAT.replace(
        r#""max_tokens":7"#,
        r#""max_tokens":12,"stream":true,"stream_options":{"include_usage":true}"#,
    );
    let req = Request::post(format!("http://{}/v1/chat/completions", s.local_addr()))
        .body(Full::new(Bytes::from(body)))
        .unwrap();
    let resp = c.request(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let mut body = resp.into_body();
    let mut frames = 0;
    let mut all = Vec::new();
    while let Some(f) = body.frame().await {
        if let Ok(d) = f.unwrap().into_data() {
            frames += 1;
            all.extend_from_slice(&d);
        }
    }
    // A frame per token at least (the role chunk, 12 tokens, the finish): not one buffered blob.
    assert!(frames >= 12, "{frames} frames");
    let text = String::from_utf8(all).unwrap();
    let events: Vec<&str> = text.split("\n\n").filter(|e| !e.is_empty()).collect();
    assert_eq!(*events.last().unwrap(), "data: [DONE]");
    let mut content = 0;
    let mut usage = None;
    for e in &events[..events.len() - 1] {
        let v = json(e.strip_prefix("data: ").unwrap().as_bytes());
        assert_eq!(v["object"], "chat.completion.chunk");
        if let Some(t) = v["choices"][0]["delta"]["content"].as_str() {
            if !t.is_empty() {
                content += 1;
            }
        }
        if v["usage"].is_object() {
            usage = Some(v["usage"].clone());
        }
    }
    assert_eq!(content, 12);
    assert_eq!(usage.unwrap()["completion_tokens"], 12);
    s.shutdown().await;
}

#[tokio::test]
async fn completions_route_streams_and_not() {
    let s = server().await;
    let c = client();
    let (status, body) = send(
        &c,
        Method::POST,
        s.local_addr(),
        "/v1/completions",
        r#"{"prompt":"once upon a time","max_tokens":3}"#,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let v = json(&body);
    assert_eq!(v["object"], "text_completion");
    assert_eq!(v["usage"]["completion_tokens"], 3);
    let (status, body) = send(
        &c,
        Method::POST,
        s.local_addr(),
        "/v1/completions",
        r#"{"prompt":[1,2,3],"max_tokens":3,"stream":true}"#,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let text = String::from_utf8(body.to_vec()).unwrap();
    assert!(text.ends_with("data: [DONE]\n\n"));
    assert_eq!(text.matches("\"text_completion\"").count(), 4);
    s.shutdown().await;
}

#[tokio::test]
async fn probes_answer_like_an_engine() {
    let s = server().await;
    let c = client();
    let a = s.local_addr();
    assert_eq!(
        send(&c, Method::GET, a, "/health", "").await.0,
        StatusCode::OK
    );
    let (st, b) = send(&c, Method::GET, a, "/v1/models", "").await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(json(&b)["data"][0]["id"], "mock-llama-3-70b");
    for p in [
        "/server_info",
        "/model_info",
        "/get_server_info",
        "/get_model_info",
    ] {
        let (st, b) = send(&c, Method::GET, a, p, "").await;
        assert_eq!(st, StatusCode::OK, "{p}");
        assert_eq!(json(&b)["model_path"], "mock-llama-3-70b", "{p}");
    }
    s.shutdown().await;
}

fn metric(text: &str, name: &str) -> f64 {
    let prefix = format!("{name}{{model_name=\"mock-llama-3-70b\"}} ");
    let line = text
        .lines()
        .find(|l| l.starts_with(&prefix))
        .unwrap_or_else(|| panic!("no {name} in\n{text}"));
    line[prefix.len()..].parse().unwrap()
}

#[tokio::test]
async fn metrics_count_prefix_hits_of_a_returning_conversation() {
    let s = server().await;
    let c = client();
    let a = s.local_addr();
    let long = "All replicas hold a full copy of the model weights. ".repeat(30);
    let turn1 = format!(r#"{{"messages":[{{"role":"user","content":"{long}"}}],"max_tokens":2}}"#);
    let turn2 = format!(
        r#"{{"messages":[{{"role":"user","content":"{long}"}},{{"role":"assistant","content":"ok"}},{{"role":"user","content":"more"}}],"max_tokens":2}}"#
    );
    assert_eq!(
        send(&c, Method::POST, a, "/v1/chat/completions", turn1)
            .await
            .0,
        StatusCode::OK
    );
    let (st, b) = send(&c, Method::POST, a, "/v1/chat/completions", turn2).await;
    assert_eq!(st, StatusCode::OK);
    let cached = json(&b)["usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap();
    assert!(cached > 300, "cached {cached}");
    let (st, b) = send(&c, Method::GET, a, "/metrics", "").await;
    assert_eq!(st, StatusCode::OK);
    let text = String::from_utf8(b.to_vec()).unwrap();
    assert_eq!(metric(&text, "vllm:prefix_cache_hits_total"), cached as f64);
    assert!(metric(&text, "vllm:prefix_cache_queries_total") > cached as f64);
    assert_eq!(metric(&text, "vllm:num_requests_running"), 0.0);
    assert_eq!(metric(&text, "vllm:num_requests_waiting"), 0.0);
    assert_eq!(metric(&text, "vllm:kv_cache_usage_perc"), 0.0);
    s.shutdown().await;
}

#[tokio::test]
async fn malformed_requests_get_openai_errors_not_panics() {
    let s = server().await;
    let c = client();
    let a = s.local_addr();
    let cases: Vec<(&str, Bytes, StatusCode)> = vec![
        (
            "/v1/chat/completions",
            Bytes::from_static(b"{\"messages\": [ {"),
            StatusCode::BAD_REQUEST,
        ),
        (
            "/v1/chat/completions",
            Bytes::from_static(b"not json at all"),
            StatusCode::BAD_REQUEST,
        ),
        (
            "/v1/chat/completions",
            Bytes::from_static(b"\xff\xfe\x00"),
            StatusCode::BAD_REQUEST,
        ),
        (
            "/v1/chat/completions",
            Bytes::from_static(b""),
            StatusCode::BAD_REQUEST,
        ),
        (
            "/v1/chat/completions",
            Bytes::from_static(b"{\"model\":\"mock-llama-3-70b\"}"),
            StatusCode::BAD_REQUEST,
        ),
        (
            "/v1/chat/completions",
            Bytes::from_static(b"{\"messages\":[]}"),
            StatusCode::BAD_REQUEST,
        ),
        (
            "/v1/chat/completions",
            Bytes::from_static(b"{\"messages\":\"hi\"}"),
            StatusCode::BAD_REQUEST,
        ),
        (
            "/v1/chat/completions",
            Bytes::from_static(b"{\"messages\":[{\"role\":\"user\",\"content\":5}]}"),
            StatusCode::BAD_REQUEST,
        ),
        (
            "/v1/chat/completions",
            Bytes::from_static(
                b"{\"messages\":[{\"role\":\"user\",\"content\":\"x\"}],\"max_tokens\":-1}",
            ),
            StatusCode::BAD_REQUEST,
        ),
        (
            "/v1/chat/completions",
            Bytes::from_static(
                b"{\"messages\":[{\"role\":\"user\",\"content\":\"x\"}],\"max_tokens\":0}",
            ),
            StatusCode::BAD_REQUEST,
        ),
        (
            "/v1/chat/completions",
            Bytes::from_static(
                b"{\"messages\":[{\"role\":\"user\",\"content\":\"x\"}],\"max_tokens\":4000000000}",
            ),
            StatusCode::BAD_REQUEST,
        ),
        (
            "/v1/chat/completions",
            Bytes::from_static(
                b"{\"model\":\"gpt-9\",\"messages\":[{\"role\":\"user\",\"content\":\"x\"}]}",
            ),
            StatusCode::NOT_FOUND,
        ),
        (
            "/v1/completions",
            Bytes::from_static(b"{\"max_tokens\":3}"),
            StatusCode::BAD_REQUEST,
        ),
        (
            "/v1/completions",
            Bytes::from_static(b"{\"prompt\":\"\"}"),
            StatusCode::BAD_REQUEST,
        ),
        (
            "/v1/completions",
            Bytes::from_static(b"{\"prompt\":[-1]}"),
            StatusCode::BAD_REQUEST,
        ),
        (
            "/v1/completions",
            Bytes::from_static(b"{\"prompt\":{\"a\":1}}"),
            StatusCode::BAD_REQUEST,
        ),
        (
            "/v1/nothing",
            Bytes::from_static(b"{}"),
            StatusCode::NOT_FOUND,
        ),
        (
            "/v1/chat/completions",
            Bytes::from(vec![b' '; 33 * 1024 * 1024]),
            StatusCode::PAYLOAD_TOO_LARGE,
        ),
    ];
    for (path, body, want) in cases {
        let shown = String::from_utf8_lossy(&body[..body.len().min(60)]).into_owned();
        let (st, b) = send(&c, Method::POST, a, path, body).await;
        assert_eq!(st, want, "{path} {shown}");
        let v = json(&b);
        assert!(
            v["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{shown}: {v}"
        );
        assert_eq!(v["error"]["code"], want.as_u16());
    }
    assert_eq!(
        send(&c, Method::GET, a, "/v1/chat/completions", "").await.0,
        StatusCode::METHOD_NOT_ALLOWED
    );
    // Still serving after all that.
    assert_eq!(
        send(&c, Method::POST, a, "/v1/chat/completions", CHAT)
            .await
            .0,
        StatusCode::OK
    );
    s.shutdown().await;
}

#[tokio::test]
async fn shutdown_stops_listening() {
    let s = server().await;
    let a = s.local_addr();
    s.shutdown().await;
    assert!(tokio::net::TcpStream::connect(a).await.is_err());
}
