//! Cost of placement by predicted time to first token.
//!
//! `cargo bench --bench ttft` prints allocations per pick, then criterion's timings at 64
//! replicas:
//! - `pick_ttft_no_prefix`: keyless weighted sample + predicted TTFT of each candidate, no
//!   fingerprints (the request-path cost beside `pick_two_choices`);
//! - `pick_ttft_100k`: the same with a 100k-token prompt's fingerprints (index lookup included);
//! - `index_lookup_record_100k`: one lookup plus one record of a 100k-token prompt (88
//!   checkpoints) in an index already holding prefixes on all 64 replicas;
//! - `hash_100k`: `PrefixHasher` over 400 KB of prompt text (the gateway's body pass).

mod support;

use std::hint::black_box;
use std::sync::Arc;

use criterion::Criterion;
use rand::rngs::SmallRng;
use rand::SeedableRng;
use replica_router::balance::pick_ttft;
use replica_router::load::TtftPlacement;
use replica_router::pool::Pool;
use replica_router::prefix::{PrefixHasher, PrefixHashes, PrefixIndex};
use replica_router::replica::ReplicaSpec;
use support::{allocations, Noop};

const N: usize = 64;

fn pool() -> Pool<Noop> {
    let mut b = Pool::builder();
    for i in 0..N {
        b = b.replica(format!("replica-{i}"), ReplicaSpec::new("m"), Noop);
    }
    b.build().unwrap()
}

fn prompt(seed: u64, blocks: usize) -> PrefixHashes {
    let chain: Vec<u64> = (0..blocks as u64).map(|i| seed << 32 | i).collect();
    PrefixHashes::from_block_chain(&chain, 16, blocks as u64 * 16)
}

fn main() {
    let pool = pool();
    let index = Arc::new(PrefixIndex::default());
    let snap = pool.snapshot();
    // Every replica holds a few long conversations.
    for (i, r) in snap.replicas().iter().enumerate() {
        for s in 0..4 {
            index.record(r.id(), 1.0, &prompt((i * 4 + s) as u64, 2_000));
        }
    }
    let tp = TtftPlacement::new(Some(index.clone()));
    let long = prompt(5, 6_250); // 100k tokens, shares its chain with replica 1's second one
    let mut rng = SmallRng::seed_from_u64(1);

    let bare = tp.request_parts(None, 2_000);
    let before = allocations();
    for _ in 0..10_000 {
        black_box(pick_ttft(&snap, &tp, &bare, &mut rng));
    }
    let per = (allocations() - before) as f64 / 10_000.0;
    println!("allocations per pick_ttft without fingerprints at {N} replicas: {per}");

    let mut c = Criterion::default().configure_from_args();
    let mut g = c.benchmark_group("ttft");
    g.bench_function("pick_ttft_no_prefix_64", |b| {
        b.iter(|| black_box(pick_ttft(&snap, &tp, &bare, &mut rng)))
    });
    g.bench_function("pick_ttft_100k_64", |b| {
        b.iter(|| {
            let req = tp.request_parts(Some(&long), 100_100);
            black_box(pick_ttft(&snap, &tp, &req, &mut rng))
        })
    });
    let id = snap.replicas()[7].id().clone();
    g.bench_function("index_lookup_record_100k_64", |b| {
        b.iter(|| {
            let m = index.lookup(&long);
            index.record(&id, 1.0, &long);
            black_box(m)
        })
    });
    let text: Vec<u8> = (0..400_000u32).map(|i| (i % 251) as u8).collect();
    g.bench_function("hash_100k", |b| {
        b.iter(|| {
            let mut h = PrefixHasher::new();
            for part in text.chunks(4096) {
                h.feed(part);
            }
            black_box(h.finish())
        })
    });
    g.finish();
    c.final_summary();
}
