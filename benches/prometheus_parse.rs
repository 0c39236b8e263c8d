//! Parsing a vLLM `/metrics` page into a load report.
use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use replica_router::load::prometheus::{Samples, VllmParser};
use tokio::time::Instant;

fn bench(c: &mut Criterion) {
    let small: &[u8] = include_bytes!("../tests/fixtures/vllm_metrics.txt");
    // A page the size of a busy multi-engine server: the fixture repeated with other label sets.
    let mut big = Vec::new();
    for i in 0..32 {
        let text = String::from_utf8_lossy(small).replace("engine=\"", &format!("engine=\"{i}-"));
        big.extend_from_slice(text.as_bytes());
    }
    let mut g = c.benchmark_group("prometheus");
    for (name, input) in [("fixture", small), ("fixture_x32", &big[..])] {
        g.throughput(Throughput::Bytes(input.len() as u64));
        g.bench_function(format!("vllm_report/{name}"), |b| {
            let p = VllmParser::new().model_name("org/llama \"3\"\\70b");
            let now = Instant::now();
            b.iter(|| p.parse(black_box(input), now).unwrap())
        });
        g.bench_function(format!("samples/{name}"), |b| {
            b.iter(|| Samples::new(black_box(input)).filter(|s| s.is_ok()).count())
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
