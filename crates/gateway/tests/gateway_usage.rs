//! Over real HTTP on loopback (client -> gateway -> HTTP mock replicas): token quotas settled to
//! what was generated, cached tokens calibrating the replica's cache model, authenticated
//! tenants (`--api-keys`), `--tenant-concurrency` and `--store-failure`.

#[path = "../../../tests/support/mod.rs"]
mod support;

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use replica_router_gateway::{inspect_body, ApiKind, Gateway, GatewayConfig};
use replica_router_mock::{MockConfig, MockEngine, MockServer};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

type HttpClient = Client<HttpConnector, Full<Bytes>>;

const MODEL: &str = "mock-llama-3-70b";

fn client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

async fn replica(cfg: MockConfig) -> MockServer {
    MockServer::bind(SocketAddr::from(([127, 0, 0, 1], 0)), MockEngine::new(cfg))
        .await
        .unwrap()
}

async fn gateway(replicas: &[&MockServer], extra: &[&str]) -> Gateway {
    let mut args = vec!["--listen".to_owned(), "127.0.0.1:0".to_owned()];
    for r in replicas {
        args.push("--replica".into());
        args.push(format!("http://{}", r.local_addr()));
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    Gateway::bind(GatewayConfig::from_args(&args).unwrap())
        .await
        .unwrap()
}

async fn post(
    c: &HttpClient,
    gw: &Gateway,
    headers: &[(&str, &str)],
    body: &Value,
) -> (StatusCode, Bytes) {
    let resp = send(c, gw, headers, body).await;
    let status = resp.status();
    (status, resp.into_body().collect().await.unwrap().to_bytes())
}

async fn send(
    c: &HttpClient,
    gw: &Gateway,
    headers: &[(&str, &str)],
    body: &Value,
) -> http::Response<hyper::body::Incoming> {
    let mut req = Request::post(format!("http://{}/v1/chat/completions", gw.local_addr()))
        .header("content-type", "application/json");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    c.request(req.body(Full::new(body.to_string().into())).unwrap())
        .await
        .unwrap()
}

/// What a response says it used: (prompt, completion) from `usage`, else content events.
fn usage_of(body: &[u8]) -> (Option<u64>, u64) {
    let text = String::from_utf8_lossy(body);
    if !text.starts_with("data:") {
        let v: Value = serde_json::from_slice(body).unwrap();
        return (
            v["usage"]["prompt_tokens"].as_u64(),
            v["usage"]["completion_tokens"].as_u64().unwrap(),
        );
    }
    let mut events = 0;
    for line in text.lines() {
        let Some(data) = line.strip_prefix("data: ") else {
            continue;
        };
        if data == "[DONE]" {
            continue;
        }
        let v: Value = serde_json::from_str(data).unwrap();
        if let Some(u) = v.get("usage").filter(|u| !u.is_null()) {
            return (
                u["prompt_tokens"].as_u64(),
                u["completion_tokens"].as_u64().unwrap(),
            );
        }
        if v["choices"][0]["delta"]["content"]
            .as_str()
            .is_some_and(|s| !s.is_empty())
        {
            events += 1;
        }
    }
    (None, events)
}

/// Issue 10, finding 5: 100 requests that ask for up to 256 tokens (no `max_tokens`: the
/// gateway's default estimate) and produce 10 each are charged what they produced.
#[tokio::test]
async fn token_quota_settles_to_what_was_generated() {
    let rep = replica(MockConfig {
        time_scale: 1000.0,
        default_output_tokens: 10,
        ..MockConfig::default()
    })
    .await;
    const LIMIT: u64 = 5_000;
    let gw = gateway(&[&rep], &["--tenant-tokens", "5000/3600"]).await;
    let c = client();
    let tenant = [("x-tenant-id", "acme")];
    let mut charged = 0u64;
    let mut estimated = 0u64;
    for i in 0..100 {
        // A third plain JSON, a third streamed with `include_usage`, a third streamed without
        // (settled by counting content events).
        let mut body =
            json!({"model": MODEL, "messages": [{"role": "user", "content": format!("hi {i}")}]});
        if i % 3 != 0 {
            body["stream"] = json!(true);
        }
        if i % 3 == 1 {
            body["stream_options"] = json!({"include_usage": true});
        }
        let info = inspect_body(ApiKind::Chat, body.to_string().as_bytes()).unwrap();
        estimated += info.estimated_tokens();
        let (status, bytes) = post(&c, &gw, &tenant, &body).await;
        assert_eq!(
            status,
            StatusCode::OK,
            "request {i} refused after {charged} tokens charged: {}",
            String::from_utf8_lossy(&bytes)
        );
        let (prompt, completion) = usage_of(&bytes);
        assert_eq!(completion, 10, "request {i}");
        charged += prompt.unwrap_or(info.prompt_tokens) + completion;
    }
    // Charged the estimate, the quota would have admitted fewer than a fifth of them.
    assert!(estimated > 5 * LIMIT, "{estimated}");
    assert!(estimated >= 100 * 256);
    eprintln!("100 requests: {estimated} tokens estimated, {charged} generated and charged");
    assert!(charged < 2_500, "{charged}");
    // What is left of the window is the limit less what was generated: a request estimated just
    // over that is refused, one just under it is admitted.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let left = LIMIT - charged;
    let probe = |n: u64| {
        let body = json!({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 1});
        let p = inspect_body(ApiKind::Chat, body.to_string().as_bytes())
            .unwrap()
            .prompt_tokens;
        json!({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": n - p})
    };
    let (status, _) = post(&c, &gw, &tenant, &probe(left + 40)).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    let body = probe(left - 40);
    let resp = send(&c, &gw, &tenant, &body).await;
    assert_eq!(resp.status(), StatusCode::OK);
    // (The mock stops at `max_tokens`; do not wait for ~left tokens: drop it.)
    drop(resp);
    gw.shutdown().await;
}

/// Issue 9: the `cached_tokens` the engine reports reach the replica's cache calibration.
#[tokio::test]
async fn reported_cached_tokens_calibrate_the_replica() {
    let rep = replica(MockConfig {
        time_scale: 1000.0,
        ..MockConfig::default()
    })
    .await;
    let gw = gateway(&[&rep], &["--policy", "least-loaded"]).await;
    let c = client();
    let work = || {
        gw.pool().snapshot().replicas()[0]
            .state()
            .work()
            .cache_calibration()
    };
    assert_eq!(work(), 1.0);
    let system = "You are a careful assistant who answers briefly. ".repeat(100);
    let mut reported = Vec::new();
    for (i, stream) in [false, false, true, false].into_iter().enumerate() {
        let mut body = json!({"model": MODEL, "max_tokens": 2, "messages": [
            {"role": "system", "content": system}, {"role": "user", "content": format!("question {i}")}]});
        if stream {
            body["stream"] = json!(true);
            body["stream_options"] = json!({"include_usage": true});
        }
        let (status, bytes) = post(&c, &gw, &[], &body).await;
        assert_eq!(status, StatusCode::OK);
        let text = String::from_utf8_lossy(&bytes).into_owned();
        let at = text.rfind("\"cached_tokens\":").unwrap() + 16;
        let n: u64 = text[at..]
            .chars()
            .take_while(|c| c.is_ascii_digit())
            .collect::<String>()
            .parse()
            .unwrap();
        reported.push(n);
    }
    tokio::time::sleep(Duration::from_millis(20)).await;
    let cal = work();
    eprintln!("cached tokens reported {reported:?}, calibration {cal}");
    assert!(reported[1] > 0, "{reported:?}");
    assert_ne!(
        cal, 1.0,
        "the replica's reports never reached its work model"
    );
    assert!(cal.is_finite() && (0.0..=1.5).contains(&cal));
    gw.shutdown().await;
}

fn hex_sha256(key: &str) -> String {
    Sha256::digest(key.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn key_file(name: &str, text: &str) -> String {
    let path = std::env::temp_dir().join(format!(
        "replica-router-keys-{name}-{}.txt",
        std::process::id()
    ));
    std::fs::write(&path, text).unwrap();
    path.to_str().unwrap().to_owned()
}

/// Issue 10, finding 9: tenants come from credentials, not from what the client says.
#[tokio::test]
async fn api_keys_name_the_tenant_and_its_quota() {
    let rep = replica(MockConfig {
        time_scale: 1000.0,
        ..MockConfig::default()
    })
    .await;
    let file = key_file(
        "auth",
        &format!(
            "# tenant keys\n{} acme rate=2/3600   # acme's own limit\n{} beta\n",
            hex_sha256("sk-acme-1"),
            hex_sha256("sk-beta-1")
        ),
    );
    let gw = gateway(&[&rep], &["--api-keys", &file, "--tenant-rate", "5/3600"]).await;
    let c = client();
    let body =
        json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1});
    // No key, a wrong key, another scheme: 401 in the OpenAI error shape.
    for headers in [
        &[][..],
        &[("authorization", "Bearer sk-wrong")],
        &[("authorization", "Basic c2stYWNtZS0x")],
        &[("authorization", "Bearer ")],
    ] {
        let resp = send(&c, &gw, headers, &body).await;
        assert_eq!(resp.status(), StatusCode::UNAUTHORIZED, "{headers:?}");
        assert_eq!(resp.headers()["www-authenticate"], "Bearer");
        let v: Value =
            serde_json::from_slice(&resp.into_body().collect().await.unwrap().to_bytes()).unwrap();
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert_eq!(v["error"]["code"], 401);
        assert!(v["error"]["message"].as_str().unwrap().contains("API key"));
    }
    // Other forwarded paths need a key too; the gateway's own health does not.
    let get = |path: &str, key: Option<&str>| {
        let mut r = Request::get(format!("http://{}{path}", gw.local_addr()));
        if let Some(k) = key {
            r = r.header("authorization", format!("Bearer {k}"));
        }
        c.request(r.body(Full::new(Bytes::new())).unwrap())
    };
    assert_eq!(
        get("/v1/models", None).await.unwrap().status(),
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        get("/v1/models", Some("sk-beta-1")).await.unwrap().status(),
        StatusCode::OK
    );
    assert_eq!(get("/health", None).await.unwrap().status(), StatusCode::OK);
    // acme's key: its own limit of 2, whatever tenant header it sends.
    let acme = |tenant: &'static str| {
        [
            ("authorization", "Bearer sk-acme-1"),
            ("x-tenant-id", tenant),
        ]
    };
    assert_eq!(post(&c, &gw, &acme("a"), &body).await.0, StatusCode::OK);
    assert_eq!(post(&c, &gw, &acme("b"), &body).await.0, StatusCode::OK);
    assert_eq!(
        post(&c, &gw, &acme("c"), &body).await.0,
        StatusCode::TOO_MANY_REQUESTS,
        "a fresh tenant header got a fresh quota"
    );
    assert_eq!(
        post(&c, &gw, &[("authorization", "Bearer sk-acme-1")], &body)
            .await
            .0,
        StatusCode::TOO_MANY_REQUESTS
    );
    // beta: the global 5, counted apart from acme.
    let beta = [
        ("authorization", "bearer sk-beta-1"),
        ("x-tenant-id", "acme"),
    ];
    for i in 0..4 {
        assert_eq!(post(&c, &gw, &beta, &body).await.0, StatusCode::OK, "{i}");
    }
    assert_eq!(
        post(&c, &gw, &beta, &body).await.0,
        StatusCode::TOO_MANY_REQUESTS
    );
    gw.shutdown().await;

    // Behind an authenticating proxy that sets the tenant: `--trust-tenant-header`.
    let gw = gateway(
        &[&rep],
        &[
            "--api-keys",
            &file,
            "--tenant-rate",
            "1/3600",
            "--trust-tenant-header",
        ],
    )
    .await;
    assert_eq!(post(&c, &gw, &[], &body).await.0, StatusCode::UNAUTHORIZED);
    let proxy = |tenant: &'static str| {
        [
            ("authorization", "Bearer sk-beta-1"),
            ("x-tenant-id", tenant),
        ]
    };
    assert_eq!(post(&c, &gw, &proxy("t1"), &body).await.0, StatusCode::OK);
    assert_eq!(post(&c, &gw, &proxy("t2"), &body).await.0, StatusCode::OK);
    assert_eq!(
        post(&c, &gw, &proxy("t1"), &body).await.0,
        StatusCode::TOO_MANY_REQUESTS
    );
    gw.shutdown().await;

    // A bad file stops the gateway from starting.
    let bad = key_file("bad", "0123 acme\n");
    let cfg = GatewayConfig::from_args(["--listen", "127.0.0.1:0", "--api-keys", &bad]).unwrap();
    let err = Gateway::bind(cfg).await.unwrap_err().to_string();
    assert!(err.contains("line 1"), "{err}");
    let _ = std::fs::remove_file(bad);
    let _ = std::fs::remove_file(file);
}

/// `--tenant-concurrency 1`: a tenant's second request is refused while its first streams.
#[tokio::test]
async fn tenant_concurrency_flag_limits_streams_in_progress() {
    let rep = replica(MockConfig {
        time_scale: 1.0,
        ..MockConfig::default()
    })
    .await;
    let gw = gateway(&[&rep], &["--tenant-concurrency", "1"]).await;
    let c = client();
    let long = json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 40, "stream": true});
    let short =
        json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1});
    let first = send(&c, &gw, &[("x-tenant-id", "acme")], &long).await;
    assert_eq!(first.status(), StatusCode::OK);
    let (status, bytes) = post(&c, &gw, &[("x-tenant-id", "acme")], &short).await;
    assert_eq!(
        status,
        StatusCode::TOO_MANY_REQUESTS,
        "{}",
        String::from_utf8_lossy(&bytes)
    );
    assert_eq!(
        post(&c, &gw, &[("x-tenant-id", "beta")], &short).await.0,
        StatusCode::OK
    );
    // The stream ends: the slot comes back.
    let _ = first.into_body().collect().await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(
        post(&c, &gw, &[("x-tenant-id", "acme")], &short).await.0,
        StatusCode::OK
    );
    gw.shutdown().await;
}

/// `--store-failure closed` answers 503 while the counter store is down; `open` admits.
#[cfg(feature = "redis")]
#[tokio::test]
async fn store_failure_flag_decides_what_an_outage_does() {
    let Some(mut redis) = support::RedisServer::start() else {
        return;
    };
    let rep = replica(MockConfig {
        time_scale: 1000.0,
        ..MockConfig::default()
    })
    .await;
    let url = redis.url();
    let common = ["--tenant-rate", "100/60", "--counter-store", url.as_str()];
    let closed = gateway(
        &[&rep],
        &[&common[..], &["--store-failure", "closed"]].concat(),
    )
    .await;
    let open = gateway(
        &[&rep],
        &[&common[..], &["--store-failure", "open"]].concat(),
    )
    .await;
    let c = client();
    let body =
        json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1});
    let t = [("x-tenant-id", "acme")];
    assert_eq!(post(&c, &closed, &t, &body).await.0, StatusCode::OK);
    assert_eq!(post(&c, &open, &t, &body).await.0, StatusCode::OK);
    redis.stop();
    let (status, bytes) = post(&c, &closed, &t, &body).await;
    assert_eq!(
        status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        String::from_utf8_lossy(&bytes)
    );
    assert!(String::from_utf8_lossy(&bytes).contains("quota store"));
    assert_eq!(post(&c, &open, &t, &body).await.0, StatusCode::OK);
    closed.shutdown().await;
    open.shutdown().await;
}
