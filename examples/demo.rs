//! Quick start: mock LLM replicas behind the gateway, driven by multi-turn chats over HTTP.
//!
//! ```text
//! cargo run --release --example demo
//! ```
//!
//! Starts three mock engine replicas on loopback (two TP=2, one TP=4 with capacity weight 2;
//! they model continuous batching and a per-replica prefix KV cache, sped up 20x), the
//! OpenAI-compatible gateway in front of them with the full stack (tenant quota, SLO shedding,
//! session affinity with bounded loads, weighted least-in-flight, health checks), then sends
//! streamed multi-turn conversations through it. Halfway, one replica is shut down: its sessions
//! fail over and the gateway says so in `x-replica-affinity: failover`. At the end it prints
//! where each turn went and why, time to first token for first and follow-up turns, and each
//! replica's prefix-cache hit rate.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use replica_router_gateway::{Gateway, GatewayConfig};
use replica_router_mock::{MockConfig, MockEngine, MockServer};

const CONVERSATIONS: usize = 24;
const TURNS: usize = 4;
const TIME_SCALE: f64 = 20.0;

type HttpClient = Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>;

struct Turn {
    conversation: usize,
    turn: usize,
    status: u16,
    replica: String,
    reason: String,
    ttft: Duration,
}

async fn chat_turn(
    client: &HttpClient,
    gateway: SocketAddr,
    conversation: usize,
    history: &mut Vec<serde_json::Value>,
    turn: usize,
) -> Turn {
    history.push(serde_json::json!({
        "role": "user",
        "content": format!(
            "Conversation {conversation}, question {turn}: {}",
            "tell me more about data parallel inference and KV cache reuse. ".repeat(40)
        ),
    }));
    let body = serde_json::json!({
        "model": "mock-llama-3-70b",
        "messages": history,
        "max_tokens": 48,
        "stream": true,
    });
    let req = http::Request::post(format!("http://{gateway}/v1/chat/completions"))
        .header("content-type", "application/json")
        .header("x-session-id", format!("conversation-{conversation}"))
        .header("x-tenant-id", format!("tenant-{}", conversation % 3))
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("valid request");
    let started = Instant::now();
    let resp = client.request(req).await.expect("gateway answers");
    let status = resp.status().as_u16();
    let header = |name: &str| {
        resp.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("-")
            .to_owned()
    };
    let (replica, reason) = (header("x-replica-id"), header("x-replica-affinity"));
    let mut body = resp.into_body();
    let mut ttft = None;
    let mut answer = String::new();
    while let Some(frame) = body.frame().await {
        let Ok(frame) = frame else { break };
        if let Some(data) = frame.data_ref() {
            ttft.get_or_insert_with(|| started.elapsed());
            for line in String::from_utf8_lossy(data).lines() {
                let Some(json) = line.strip_prefix("data: ") else {
                    continue;
                };
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(json) {
                    if let Some(t) = v["choices"][0]["delta"]["content"].as_str() {
                        answer.push_str(t);
                    }
                }
            }
        }
    }
    history.push(serde_json::json!({"role": "assistant", "content": answer}));
    Turn {
        conversation,
        turn,
        status,
        replica,
        reason,
        ttft: ttft.unwrap_or_else(|| started.elapsed()),
    }
}

async fn run_turns(
    client: &HttpClient,
    gateway: SocketAddr,
    histories: &mut [Vec<serde_json::Value>],
    turns: std::ops::Range<usize>,
) -> Vec<Turn> {
    let mut out = Vec::new();
    for turn in turns {
        let tasks = histories.iter_mut().enumerate().map(|(c, history)| {
            let client = client.clone();
            async move { chat_turn(&client, gateway, c, history, turn).await }
        });
        out.extend(futures_util::future::join_all(tasks).await);
    }
    out
}

fn percentile(mut v: Vec<Duration>, p: f64) -> Duration {
    if v.is_empty() {
        return Duration::ZERO;
    }
    v.sort();
    v[((v.len() - 1) as f64 * p).round() as usize]
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut replicas = Vec::new();
    for tp in [2, 2, 4] {
        let engine = MockEngine::new(MockConfig {
            tp,
            time_scale: TIME_SCALE,
            ..MockConfig::default()
        });
        replicas.push(MockServer::bind("127.0.0.1:0".parse()?, engine).await?);
    }
    let mut args = vec!["--listen".to_owned(), "127.0.0.1:0".to_owned()];
    for (i, r) in replicas.iter().enumerate() {
        let weight = if i == 2 { ",weight=2" } else { "" };
        args.push("--replica".into());
        args.push(format!("http://{}{weight}", r.local_addr()));
    }
    args.extend(
        [
            "--policy",
            "affinity",
            "--slo-wait-ms",
            "2000",
            "--tenant-rate",
            "10000/60",
        ]
        .map(String::from),
    );
    println!("gateway flags: {}", args.join(" "));
    let gateway = Gateway::bind(GatewayConfig::from_args(&args)?).await?;
    let addr = gateway.local_addr();
    let ids: Vec<String> = replicas
        .iter()
        .map(|r| r.local_addr().to_string())
        .collect();
    println!(
        "gateway on http://{addr}; replicas: {} (TP=2), {} (TP=2), {} (TP=4, weight 2)\n",
        ids[0], ids[1], ids[2]
    );

    let client: HttpClient = Client::builder(TokioExecutor::new()).build_http();
    let mut histories = vec![Vec::new(); CONVERSATIONS];
    let mut turns = run_turns(&client, addr, &mut histories, 0..TURNS / 2).await;

    let victim = replicas.remove(1);
    let victim_engine = victim.engine().clone();
    println!("shutting down replica {} mid-run\n", victim.local_addr());
    victim.shutdown().await;
    turns.extend(run_turns(&client, addr, &mut histories, TURNS / 2..TURNS).await);

    println!("| conversation | turn | status | replica | affinity | TTFT |");
    println!("|---:|---:|---:|---|---|---:|");
    for t in turns.iter().filter(|t| t.conversation < 4) {
        println!(
            "| {} | {} | {} | {} | {} | {:.0} ms |",
            t.conversation,
            t.turn,
            t.status,
            t.replica,
            t.reason,
            t.ttft.as_secs_f64() * 1e3
        );
    }
    println!("(first 4 of {CONVERSATIONS} conversations shown)\n");

    let mut reasons: BTreeMap<&str, usize> = BTreeMap::new();
    let mut per_replica: BTreeMap<&str, usize> = BTreeMap::new();
    for t in &turns {
        *reasons.entry(t.reason.as_str()).or_default() += 1;
        *per_replica.entry(t.replica.as_str()).or_default() += 1;
    }
    let failed = turns.iter().filter(|t| t.status != 200).count();
    println!("decisions: {reasons:?}");
    println!("requests per replica: {per_replica:?}");
    println!("non-200 answers: {failed} of {}", turns.len());
    let first: Vec<_> = turns
        .iter()
        .filter(|t| t.turn == 0)
        .map(|t| t.ttft)
        .collect();
    let later: Vec<_> = turns
        .iter()
        .filter(|t| t.turn > 0 && t.reason == "home")
        .map(|t| t.ttft)
        .collect();
    println!(
        "TTFT p50: first turns {:.0} ms, follow-up turns at home (prefix cached) {:.0} ms",
        percentile(first, 0.5).as_secs_f64() * 1e3,
        percentile(later, 0.5).as_secs_f64() * 1e3
    );
    let engines: Vec<(String, MockEngine)> = replicas
        .iter()
        .map(|r| (r.local_addr().to_string(), r.engine().clone()))
        .chain(std::iter::once((
            format!("{} (shut down)", ids[1]),
            victim_engine,
        )))
        .collect();
    for (id, engine) in &engines {
        let s = engine.stats();
        let rate = if s.prefix_queries == 0 {
            0.0
        } else {
            s.prefix_hits as f64 / s.prefix_queries as f64
        };
        println!(
            "replica {id}: {} requests finished, prefix-cache hit rate {:.0}%",
            s.finished,
            rate * 100.0
        );
    }
    gateway.shutdown().await;
    for r in replicas {
        r.shutdown().await;
    }
    Ok(())
}
