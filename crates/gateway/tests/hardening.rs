//! Transport hardening over real loopback sockets: hostile clients (slow headers, slow bodies,
//! many connections), a hung replica (a child process stopped with SIGSTOP), and request-line
//! checks. Every test is bounded in connections and in time.

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use replica_router_gateway::{Gateway, GatewayConfig};
use replica_router_mock::{MockConfig, MockEngine, MockServer};
use support::total_in_flight;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const CHAT: &str =
    r#"{"model":"mock-llama-3-70b","messages":[{"role":"user","content":"hi"}],"max_tokens":3}"#;

async fn mock() -> MockServer {
    let cfg = MockConfig {
        time_scale: 1000.0,
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

/// Sends `raw` on a new connection and reads the answer until the gateway closes the connection
/// or `within` passes; returns the text read (lossy) and whether the connection was closed.
async fn exchange(addr: SocketAddr, raw: &[u8], within: Duration) -> (String, bool) {
    let s = TcpStream::connect(addr).await.unwrap();
    let (mut r, mut w) = s.into_split();
    let raw = raw.to_vec();
    // Written beside the reading: the gateway may answer (and close) before it read everything.
    let writer = tokio::spawn(async move {
        let _ = w.write_all(&raw).await;
        tokio::time::sleep(Duration::from_secs(30)).await;
        drop(w);
    });
    let out = read_until_closed(&mut r, within).await;
    writer.abort();
    out
}

async fn read_until_closed<R: AsyncReadExt + Unpin>(s: &mut R, within: Duration) -> (String, bool) {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return (String::from_utf8_lossy(&out).into_owned(), true),
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
            Err(_) => return (String::from_utf8_lossy(&out).into_owned(), false),
        }
    }
}

/// One request on its own connection (`Connection: close`); the status code, or 0 if none came.
async fn status_of(addr: SocketAddr, method: &str, path: &str, body: &str) -> u16 {
    let raw = format!(
        "{method} {path} HTTP/1.1\r\nhost: gw\r\nx-tenant-id: t1\r\nconnection: close\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    let (text, _) = exchange(addr, raw.as_bytes(), Duration::from_secs(5)).await;
    parse_status(&text)
}

fn parse_status(text: &str) -> u16 {
    text.split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

#[tokio::test]
async fn slowloris_headers_are_closed_and_health_keeps_answering() {
    let rep = mock().await;
    let gw = gateway(
        &[format!("http://{}", rep.local_addr())],
        &["--header-timeout-ms", "400"],
    )
    .await;
    let addr = gw.local_addr();
    // 30 connections sending a request head one byte every 100 ms: never a whole head.
    let started = Instant::now();
    let mut slow = Vec::new();
    for _ in 0..30 {
        slow.push(tokio::spawn(async move {
            let mut s = TcpStream::connect(addr).await.unwrap();
            for b in b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n"
                .iter()
                .cycle()
            {
                if s.write_all(&[*b]).await.is_err() {
                    return true;
                }
                let mut one = [0u8; 64];
                if let Ok(Ok(0) | Err(_)) =
                    tokio::time::timeout(Duration::from_millis(100), s.read(&mut one)).await
                {
                    return true;
                }
                if started.elapsed() > Duration::from_secs(5) {
                    return false;
                }
            }
            false
        }));
    }
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert_eq!(status_of(addr, "GET", "/health", "").await, 200);
    for s in slow {
        assert!(s.await.unwrap(), "a slow-header connection was left open");
    }
    let elapsed = started.elapsed();
    assert!(elapsed < Duration::from_secs(3), "closed after {elapsed:?}");
    assert_eq!(status_of(addr, "GET", "/health", "").await, 200);
    gw.shutdown().await;
}

#[tokio::test]
async fn a_half_sent_request_does_not_block_shutdown_past_the_grace() {
    let rep = mock().await;
    // A header timeout far longer than the grace: only the grace deadline can end this.
    let gw = gateway(
        &[format!("http://{}", rep.local_addr())],
        &["--header-timeout-ms", "60000", "--shutdown-grace-ms", "300"],
    )
    .await;
    let mut s = TcpStream::connect(gw.local_addr()).await.unwrap();
    s.write_all(b"P").await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let t = Instant::now();
    tokio::time::timeout(Duration::from_secs(5), gw.shutdown())
        .await
        .expect("shutdown blocked by a one-byte connection");
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    let (_, closed) = read_until_closed(&mut s, Duration::from_secs(2)).await;
    assert!(closed);
}

#[tokio::test]
async fn connections_beyond_the_cap_are_answered_503_and_closed() {
    let rep = mock().await;
    let gw = gateway(
        &[format!("http://{}", rep.local_addr())],
        &["--max-connections", "4", "--header-timeout-ms", "60000"],
    )
    .await;
    let addr = gw.local_addr();
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(TcpStream::connect(addr).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (text, closed) = exchange(
        addr,
        b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n",
        Duration::from_secs(2),
    )
    .await;
    assert!(closed, "over-cap connection left open");
    assert!(
        text.is_empty() || text.starts_with("HTTP/1.1 503"),
        "{text}"
    );
    drop(held);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(status_of(addr, "GET", "/health", "").await, 200);
    gw.shutdown().await;
}

#[tokio::test]
async fn keep_alive_connections_idle_past_the_limit_are_closed() {
    let rep = mock().await;
    let gw = gateway(
        &[format!("http://{}", rep.local_addr())],
        &["--keepalive-idle-ms", "300"],
    )
    .await;
    let mut s = TcpStream::connect(gw.local_addr()).await.unwrap();
    s.write_all(b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let t = Instant::now();
    let (text, closed) = read_until_closed(&mut s, Duration::from_secs(3)).await;
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(
        closed && t.elapsed() < Duration::from_secs(2),
        "{:?}",
        t.elapsed()
    );
    gw.shutdown().await;
}

fn chat_head(len: usize) -> String {
    format!("POST /v1/chat/completions HTTP/1.1\r\nhost: gw\r\ncontent-type: application/json\r\ncontent-length: {len}\r\n\r\n")
}

#[tokio::test]
async fn stalled_and_slow_bodies_get_408() {
    let rep = mock().await;
    let gw = gateway(
        &[format!("http://{}", rep.local_addr())],
        &["--body-idle-timeout-ms", "300", "--body-timeout-ms", "800"],
    )
    .await;
    let addr = gw.local_addr();
    // Stalled: part of the body, then nothing.
    let t = Instant::now();
    let mut raw = chat_head(1000).into_bytes();
    raw.extend_from_slice(&[b' '; 100]);
    let (text, closed) = exchange(addr, &raw, Duration::from_secs(3)).await;
    assert_eq!(parse_status(&text), 408, "{text}");
    assert!(text.contains("\"error\""), "{text}");
    assert!(closed && t.elapsed() < Duration::from_secs(2));
    // Slow: a byte every 100 ms never pauses 300 ms, but the whole body is late.
    let t = Instant::now();
    let (mut r, mut w) = TcpStream::connect(addr).await.unwrap().into_split();
    w.write_all(chat_head(1000).as_bytes()).await.unwrap();
    let writer = tokio::spawn(async move {
        for _ in 0..30 {
            if w.write_all(b" ").await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    let (text, _) = read_until_closed(&mut r, Duration::from_secs(3)).await;
    writer.abort();
    assert_eq!(parse_status(&text), 408, "{text}");
    assert!(
        t.elapsed() < Duration::from_millis(1800),
        "{:?}",
        t.elapsed()
    );
    gw.shutdown().await;
}

#[tokio::test]
async fn buffered_bodies_are_bounded_and_small_requests_still_pass() {
    let rep = mock().await;
    let mib = 1024 * 1024;
    let gw = gateway(
        &[format!("http://{}", rep.local_addr())],
        &[
            "--max-buffered-body-bytes",
            &(4 * mib).to_string(),
            "--body-idle-timeout-ms",
            "1000",
        ],
    )
    .await;
    let addr = gw.local_addr();
    // A: 3 MiB declared, 2 MiB sent, then stalled: ~3 MiB held.
    let mut a = TcpStream::connect(addr).await.unwrap();
    a.write_all(chat_head(3 * mib).as_bytes()).await.unwrap();
    a.write_all(&vec![b' '; 2 * mib]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    // B: another large body does not fit in what large bodies may use: 503 at once.
    let mut raw = chat_head(mib).into_bytes();
    raw.extend_from_slice(&vec![b' '; mib]);
    let t = Instant::now();
    let (text, _) = exchange(addr, &raw, Duration::from_secs(3)).await;
    assert_eq!(parse_status(&text), 503, "{text}");
    assert!(text.contains("server_overloaded"), "{text}");
    assert!(
        t.elapsed() < Duration::from_millis(900),
        "{:?}",
        t.elapsed()
    );
    // A small request is still served.
    assert_eq!(
        status_of(addr, "POST", "/v1/chat/completions", CHAT).await,
        200
    );
    // A is closed by the idle timeout, and then B's body fits again.
    let (text, closed) = read_until_closed(&mut a, Duration::from_secs(3)).await;
    assert!(closed && parse_status(&text) == 408, "{text}");
    let big = format!(
        r#"{{"model":"mock-llama-3-70b","messages":[{{"role":"user","content":"{}"}}],"max_tokens":1}}"#,
        "a".repeat(mib)
    );
    // (The mock may refuse so long a prompt; what matters is that the budget admits it again.)
    let code = status_of(addr, "POST", "/v1/chat/completions", &big).await;
    assert!(code != 503 && code != 0, "{code}");
    gw.shutdown().await;
}

/// A minimal OpenAI-ish replica in its own process (python3), so it can be stopped with SIGSTOP.
struct ChildReplica {
    child: std::process::Child,
    url: String,
}

impl ChildReplica {
    fn start() -> Option<ChildReplica> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .ok()?
            .local_addr()
            .ok()?
            .port();
        let script = r#"
import sys, http.server, socketserver
BODY = b'{"id":"c","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":"ok"},"finish_reason":"stop"}],"usage":{"prompt_tokens":1,"completion_tokens":1,"total_tokens":2}}'
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *a): pass
    def answer(self, code, body):
        self.send_response(code); self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body))); self.end_headers(); self.wfile.write(body)
    def do_GET(self):
        self.answer(200 if self.path == "/health" else 404, b"{}")
    def do_POST(self):
        self.rfile.read(int(self.headers.get("content-length", "0"))); self.answer(200, BODY)
class S(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
S(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"#;
        let child = std::process::Command::new("python3")
            .args(["-c", script, &port.to_string()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .ok()?;
        Some(ChildReplica {
            child,
            url: format!("http://127.0.0.1:{port}"),
        })
    }

    fn signal(&self, sig: &str) {
        let _ = std::process::Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status();
    }
}

impl Drop for ChildReplica {
    fn drop(&mut self) {
        self.signal("-CONT");
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn a_hung_replica_fails_over_and_is_ejected() {
    let Some(hung) = ChildReplica::start() else {
        eprintln!("no python3: skipped");
        return;
    };
    let rep = mock().await;
    let hung_id = hung.url.trim_start_matches("http://").to_owned();
    // Wait for the child to listen.
    let t = Instant::now();
    while TcpStream::connect(hung_id.as_str()).await.is_err() {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "child replica never listened"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let gw = gateway(
        &[format!("http://{}", rep.local_addr()), hung.url.clone()],
        &[
            "--policy",
            "round-robin",
            "--upstream-ttfb-timeout-ms",
            "400",
        ],
    )
    .await;
    let addr = gw.local_addr();
    // Both serve before the stop.
    let mut served_by_child = false;
    for _ in 0..4 {
        let raw = format!("{}{CHAT}", chat_head(CHAT.len()));
        let (text, _) = exchange(
            addr,
            raw.replace("host: gw\r\n", "host: gw\r\nconnection: close\r\n")
                .as_bytes(),
            Duration::from_secs(5),
        )
        .await;
        assert_eq!(parse_status(&text), 200, "{text}");
        served_by_child |= text.contains(&hung_id);
    }
    assert!(served_by_child);
    hung.signal("-STOP");
    let replica_state = |gw: &Gateway| {
        let snap = gw.pool().snapshot();
        let r = snap
            .replicas()
            .iter()
            .find(|r| r.id().as_str() == hung_id)
            .unwrap();
        (r.state().is_eligible(), r.state().in_flight())
    };
    let t = Instant::now();
    let mut failovers = 0;
    for _ in 0..20 {
        let raw = format!("{}{CHAT}", chat_head(CHAT.len()));
        let one = Instant::now();
        let (text, _) = exchange(
            addr,
            raw.replace("host: gw\r\n", "host: gw\r\nconnection: close\r\n")
                .as_bytes(),
            Duration::from_secs(5),
        )
        .await;
        assert_eq!(parse_status(&text), 200, "{text}");
        assert!(
            one.elapsed() < Duration::from_millis(2000),
            "{:?}",
            one.elapsed()
        );
        assert!(!text.contains(&format!("x-replica-id: {hung_id}")));
        if text.contains("x-replica-affinity: failover") {
            failovers += 1;
        }
        if !replica_state(&gw).0 {
            break;
        }
    }
    assert!(failovers >= 1, "no request failed over");
    // Ejected (outlier detection or failed probes), with nothing left in flight on it.
    while replica_state(&gw).0 {
        assert!(
            t.elapsed() < Duration::from_secs(15),
            "the hung replica was never ejected"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(replica_state(&gw).1, 0);
    drop(hung);
    gw.shutdown().await;
}

/// A replica that answers a streamed response's head and first event, then hangs.
async fn stalling_replica() -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((mut s, _)) = l.accept().await {
            let mut buf = vec![0u8; 65536];
            let n = s.read(&mut buf).await.unwrap_or(0);
            let head = String::from_utf8_lossy(&buf[..n]).into_owned();
            if head.starts_with("GET") {
                let _ = s
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                    .await;
            } else {
                let _ = s
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n6\r\ndata:\n\r\n")
                    .await;
            }
            held.push(s);
        }
    });
    (addr, task)
}

#[tokio::test]
async fn a_stream_that_stops_moving_is_ended_by_the_idle_timeout() {
    let (up, task) = stalling_replica().await;
    let gw = gateway(
        &[format!("http://{up}")],
        &["--upstream-idle-timeout-ms", "300"],
    )
    .await;
    let t = Instant::now();
    let raw = format!("{}{CHAT}", chat_head(CHAT.len()));
    let (text, closed) = exchange(gw.local_addr(), raw.as_bytes(), Duration::from_secs(4)).await;
    assert_eq!(parse_status(&text), 200, "{text}");
    assert!(text.contains("data:"), "{text}");
    assert!(closed, "the stalled stream was never ended");
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    // The request is no longer in flight.
    assert_eq!(total_in_flight(&gw), 0);
    gw.shutdown().await;
    task.abort();
}

/// A replica that records each request head it receives and answers a small JSON.
async fn recording_replica() -> (
    SocketAddr,
    tokio::sync::mpsc::UnboundedReceiver<String>,
    tokio::task::JoinHandle<()>,
) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let task = tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 65536];
                let mut have = 0;
                loop {
                    let Ok(n) = s.read(&mut buf[have..]).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    have += n;
                    let text = String::from_utf8_lossy(&buf[..have]).into_owned();
                    if let Some((head, rest)) = text.split_once("\r\n\r\n") {
                        let len = head
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length: "))
                            .and_then(|v| v.trim().parse::<usize>().ok())
                            .unwrap_or(0);
                        if rest.len() < len {
                            continue;
                        }
                        if !head.starts_with("GET /health") && !head.starts_with("GET /metrics") {
                            let _ = tx.send(head.to_owned());
                        }
                        let _ = s
                            .write_all(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}")
                            .await;
                        have = 0;
                    }
                }
            });
        }
    });
    (addr, rx, task)
}

#[tokio::test]
async fn request_line_and_header_checks() {
    let (up, mut heads, task) = recording_replica().await;
    let gw = gateway(&[format!("http://{up}")], &["--tenant-tokens", "1000/60"]).await;
    let addr = gw.local_addr();
    // The gateway asked the replica for its context limit at start (GET /v1/models).
    while heads.try_recv().is_ok() {}
    // CONNECT is refused, never forwarded.
    let (text, _) = exchange(
        addr,
        b"CONNECT 127.0.0.1:22 HTTP/1.1\r\nhost: 127.0.0.1:22\r\n\r\n",
        Duration::from_secs(3),
    )
    .await;
    assert_eq!(parse_status(&text), 405, "{text}");
    // HTTP/1.1 without Host: 400.
    let (text, _) = exchange(
        addr,
        format!(
            "POST /v1/chat/completions HTTP/1.1\r\ncontent-length: {}\r\n\r\n{CHAT}",
            CHAT.len()
        )
        .as_bytes(),
        Duration::from_secs(3),
    )
    .await;
    assert_eq!(parse_status(&text), 400, "{text}");
    // Non-canonical spellings of the validated routes: 404, never forwarded unvalidated.
    for path in [
        "/v1/chat/%63ompletions",
        "/v1/chat/completions/",
        "//v1/chat/completions",
        "/v1/./chat/completions",
        "/v1/x/../chat/completions",
    ] {
        assert_eq!(
            status_of(addr, "POST", path, "{not json").await,
            404,
            "{path}"
        );
    }
    assert!(heads.try_recv().is_err(), "something was forwarded");
    // A Connection header with a non-ASCII token still strips the headers it names.
    let raw = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: gw\r\nconnection: x-secret, caf\u{e9}, keep-alive\r\nx-secret: s3cr3t\r\nx-kept: 1\r\ncontent-length: {}\r\n\r\n{CHAT}",
        CHAT.len()
    );
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(raw.as_bytes()).await.unwrap();
    let head = tokio::time::timeout(Duration::from_secs(3), heads.recv())
        .await
        .unwrap()
        .unwrap()
        .to_ascii_lowercase();
    assert!(head.contains("x-kept: 1"), "{head}");
    assert!(!head.contains("x-secret"), "{head}");
    drop(s);
    // An unvalidated path is estimated at its body's bytes (an upper bound): 2000 bytes use up a
    // 1000-token quota (the reservation is clamped to the limit), so the next request is refused.
    // At Content-Length / 4 (500 tokens) the next one would have passed.
    let body = format!("{{\"input\":\"{}\"}}", "a".repeat(2000));
    assert_eq!(status_of(addr, "POST", "/v1/embeddings", &body).await, 200);
    assert_eq!(status_of(addr, "POST", "/v1/embeddings", "{}").await, 429);
    gw.shutdown().await;
    task.abort();
}

/// A replica that answers every chat request with an endless event stream (64 KiB events, at
/// most 1 GiB, stopping when the gateway stops taking them).
async fn flooding_replica() -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let task = tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 65536];
                let n = s.read(&mut buf).await.unwrap_or(0);
                if buf[..n].starts_with(b"GET") {
                    let _ = s
                        .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                        .await;
                    return;
                }
                let head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n";
                if s.write_all(head).await.is_err() {
                    return;
                }
                let data = format!("data: {}\n\n", "x".repeat(65536 - 8));
                let chunk = format!("{:x}\r\n{data}\r\n", data.len());
                for _ in 0..(1 << 14) {
                    if s.write_all(chunk.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, task)
}

#[tokio::test]
async fn a_client_that_stops_reading_is_closed_by_the_write_timeout() {
    let (up, task) = flooding_replica().await;
    let gw = gateway(
        &[format!("http://{up}")],
        &["--client-write-timeout-ms", "300"],
    )
    .await;
    // A client with a small receive buffer that reads the response head, then nothing more.
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    let mut s = sock.connect(gw.local_addr()).await.unwrap();
    let raw = format!("{}{CHAT}", chat_head(CHAT.len()));
    s.write_all(raw.as_bytes()).await.unwrap();
    let mut head = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut head))
        .await
        .expect("a response head")
        .unwrap();
    assert!(head[..n].starts_with(b"HTTP/1.1 200"));
    assert_eq!(total_in_flight(&gw), 1, "streaming");
    // The stream fills every buffer between the replica and the client, the gateway's write
    // waits, and after the timeout the gateway closes the connection and ends the request.
    let t = Instant::now();
    while total_in_flight(&gw) > 0 {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "the stalled client still holds its request"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // What the client reads now ends (the connection was closed), well short of the 1 GiB.
    let mut total = 0usize;
    let mut buf = vec![0u8; 65536];
    loop {
        match tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => total += n,
            Err(_) => panic!("the connection was not closed ({total} bytes read)"),
        }
    }
    assert!(total < 256 << 20, "{total} bytes");
    // The gateway keeps serving.
    assert_eq!(status_of(gw.local_addr(), "GET", "/health", "").await, 200);
    gw.shutdown().await;
    task.abort();
}
