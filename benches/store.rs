//! Counter-store checks per second and latency per check: MemoryStore, and (feature `redis`)
//! RedisStore beside `redis-benchmark` on the same server.
//!
//! `cargo bench --bench store --features redis`

use std::time::Duration;

use criterion::{black_box, Criterion, Throughput};
use futures_util::FutureExt;
use replica_router::store::{CounterStore, MemoryStore, RateQuota, StoreKey, MAX_WINDOW};

#[cfg(feature = "redis")]
#[path = "../tests/support/mod.rs"]
mod support;

fn bench_memory(c: &mut Criterion) {
    let store = MemoryStore::new();
    let quota = RateQuota::new(u32::MAX as u64, MAX_WINDOW).unwrap();
    let keys: Vec<StoreKey> = (0..1024u32)
        .map(|i| StoreKey::new("quota.req", format!("tenant-{i}")).unwrap())
        .collect();
    let mut g = c.benchmark_group("memory");
    g.throughput(Throughput::Elements(1));
    let mut i = 0usize;
    g.bench_function("take", |b| {
        b.iter(|| {
            i = (i + 1) & 1023;
            let t = store
                .take(&keys[i], quota, 1)
                .now_or_never()
                .expect("memory futures are ready")
                .unwrap();
            black_box(t)
        })
    });
    g.bench_function("take+settle", |b| {
        b.iter(|| {
            i = (i + 1) & 1023;
            let t = store
                .take(&keys[i], quota, 10)
                .now_or_never()
                .unwrap()
                .unwrap();
            let s = store
                .settle(&keys[i], quota, t.window, -3)
                .now_or_never()
                .unwrap()
                .unwrap();
            black_box(s)
        })
    });
    g.bench_function("acquire+release", |b| {
        let k = StoreKey::new("quota.conc", b"tenant").unwrap();
        b.iter(|| {
            let a = store
                .acquire(&k, 1000, Duration::from_secs(60))
                .now_or_never()
                .unwrap()
                .unwrap();
            store
                .release(&k, a.lease.unwrap())
                .now_or_never()
                .unwrap()
                .unwrap()
        })
    });
    g.finish();
}

#[cfg(feature = "redis")]
fn bench_redis(c: &mut Criterion, server: &support::RedisServer) -> String {
    use replica_router::store::{RedisStore, RedisStoreConfig};

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let store = rt
        .block_on(RedisStore::connect_with(
            &server.url(),
            RedisStoreConfig::default().timeout(Duration::from_secs(5)),
        ))
        .unwrap();
    let quota = RateQuota::new(1 << 50, MAX_WINDOW).unwrap();
    let keys: Vec<StoreKey> = (0..1024u32)
        .map(|i| StoreKey::new("quota.req", format!("tenant-{i}")).unwrap())
        .collect();
    let mut g = c.benchmark_group("redis");
    g.throughput(Throughput::Elements(1));
    let mut i = 0usize;
    g.bench_function("take/sequential", |b| {
        b.iter(|| {
            i = (i + 1) & 1023;
            rt.block_on(store.take(&keys[i], quota, 1)).unwrap()
        })
    });
    const CONC: u64 = 64;
    g.throughput(Throughput::Elements(CONC));
    g.bench_function("take/64-concurrent", |b| {
        b.iter_custom(|iters| {
            let store = store.clone();
            let keys = keys.clone();
            rt.block_on(async move {
                let start = std::time::Instant::now();
                for n in 0..iters {
                    let calls = (0..CONC).map(|k| {
                        let store = store.clone();
                        let key = keys[((n * CONC + k) & 1023) as usize].clone();
                        tokio::spawn(async move { store.take(&key, quota, 1).await.unwrap() })
                    });
                    for h in calls.collect::<Vec<_>>() {
                        h.await.unwrap();
                    }
                }
                start.elapsed()
            })
        })
    });
    g.finish();
    store
        .script_hashes()
        .iter()
        .find(|(op, _)| *op == "take")
        .map(|(_, sha)| sha.to_string())
        .unwrap()
}

#[cfg(feature = "redis")]
fn redis_benchmark(server: &support::RedisServer, take_sha: &str) {
    use std::process::Command;
    let port = server.port().to_string();
    let trivial = server.raw(&[b"SCRIPT", b"LOAD", b"return 1"]);
    let trivial = String::from_utf8_lossy(&trivial);
    // Bulk reply: $40\r\n<sha>\r\n
    let trivial_sha = trivial.lines().nth(1).unwrap_or_default().trim().to_owned();
    let key = format!("rr:quota.req:{{x{}}}", "62656e6368");
    let runs: Vec<(String, Vec<String>)> = vec![
        ("set,get -c 1".into(), vec!["-c", "1", "-t", "set,get"]),
        ("set,get -c 64".into(), vec!["-c", "64", "-t", "set,get"]),
        (
            "EVALSHA trivial -c 1".into(),
            vec!["-c", "1", "EVALSHA", &trivial_sha, "0"],
        ),
        (
            "EVALSHA take script -c 1".into(),
            vec![
                "-c",
                "1",
                "EVALSHA",
                take_sha,
                "1",
                &key,
                "60000",
                "1000000000000",
                "1",
            ],
        ),
        (
            "EVALSHA take script -c 64".into(),
            vec![
                "-c",
                "64",
                "EVALSHA",
                take_sha,
                "1",
                &key,
                "60000",
                "1000000000000",
                "1",
            ],
        ),
    ]
    .into_iter()
    .map(|(n, a)| (n, a.into_iter().map(str::to_owned).collect()))
    .collect();
    println!("\nredis-benchmark on the same server (port {port}), -n 100000 -q:");
    for (name, args) in runs {
        let out = Command::new("redis-benchmark")
            .args(["-h", "127.0.0.1", "-p", &port, "-n", "100000", "-q"])
            .args(&args)
            .output();
        match out {
            Ok(o) => {
                let text = String::from_utf8_lossy(&o.stdout);
                for line in text
                    .split(['\r', '\n'])
                    .filter(|l| l.contains("requests per second"))
                {
                    println!("  [{name}] {}", line.trim());
                }
            }
            Err(e) => println!("  [{name}] redis-benchmark not runnable: {e}"),
        }
    }
}

fn main() {
    let mut c = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .sample_size(30)
        .configure_from_args();
    bench_memory(&mut c);
    #[cfg(feature = "redis")]
    {
        if let Some(server) = support::RedisServer::start() {
            let sha = bench_redis(&mut c, &server);
            redis_benchmark(&server, &sha);
        }
    }
    c.final_summary();
}
