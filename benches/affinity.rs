//! Affinity ring: key distribution and lookup cost, in the style of Envoy's
//! `load_balancer_benchmark` (relative standard deviation of keys per host for 100k keys).
//!
//! `cargo bench --bench affinity` prints the distribution table first, then criterion's timings
//! of one lookup at 4, 16 and 100 replicas:
//! - `hashring_get`: a plain `hashring::HashRing<VirtualNode>` with the same virtual nodes;
//! - `ring_home`: our ring's point lookup (same answer, see `tests/affinity_ring.rs`);
//! - `bounded_place`: the bounded-load placement (ring walk + load bound over all replicas),
//!   with loads taken from a 100k-key bounded placement so the bound bites;
//! - `layer_pinned`: a whole `Affinity` service call for a pinned session (pin lookup, bound
//!   check, pin refresh, decision), over an inner service that answers at once.

use std::hint::black_box;

use criterion::{BenchmarkId, Criterion};
use futures_util::FutureExt;
use hashring::HashRing;
use replica_router::affinity::AffinityLayer;
use replica_router::context::{RouteContext, RouteKey};
use replica_router::decision::Decision;
use replica_router::pick::ring::{
    key_hash, place, vnode_count, BalanceFactor, KeyBytes, Ring, VirtualNode,
};
use replica_router::pool::Pool;
use replica_router::replica::{ReplicaId, ReplicaSpec};
use tower::{Layer, Service};

const SIZES: [usize; 3] = [4, 16, 100];
const KEYS: usize = 100_000;

fn ids(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("replica-{i}")).collect()
}

fn keys(n: usize) -> Vec<Vec<u8>> {
    (0..n)
        .map(|i| format!("session-{i}").into_bytes())
        .collect()
}

fn plain_ring(ids: &[String]) -> HashRing<VirtualNode> {
    let mut ring = HashRing::new();
    let mut nodes = Vec::new();
    for id in ids {
        for v in 0..vnode_count(1.0, 160) {
            nodes.push(VirtualNode {
                replica: ReplicaId::new(id).unwrap(),
                index: v,
            });
        }
    }
    ring.batch_add(nodes);
    ring
}

fn rsd(counts: &[f64]) -> (f64, f64) {
    let n = counts.len() as f64;
    let mean = counts.iter().sum::<f64>() / n;
    let var = counts.iter().map(|c| (c - mean).powi(2)).sum::<f64>() / n;
    let max = counts.iter().cloned().fold(0.0, f64::max);
    (var.sqrt() / mean, max / mean)
}

/// Sequential bounded-load placement of `keys`, each seeing the previous ones as load.
fn bounded_counts(ring: &Ring, n: usize, keys: &[Vec<u8>], c: f64) -> Vec<(bool, f64, f64)> {
    let mut view: Vec<(bool, f64, f64)> = vec![(true, 1.0, 0.0); n];
    let f = BalanceFactor::new(c).unwrap();
    for k in keys {
        let p = place(ring, key_hash(k), f, &view[..]).unwrap();
        view[p.replica].2 += 1.0;
    }
    view
}

fn distribution_table() {
    let keys = keys(KEYS);
    println!();
    println!("Keys per replica, {KEYS} keys, 160 virtual nodes per replica, equal weights");
    println!(
        "{:>8} | {:>14} {:>9} | {:>14} {:>9} | {:>14} {:>9} | {:>14} {:>9}",
        "replicas",
        "hashring RSD",
        "max/mean",
        "ring RSD",
        "max/mean",
        "c=1.25 RSD",
        "max/mean",
        "c=1.10 RSD",
        "max/mean"
    );
    for n in SIZES {
        let ids = ids(n);
        let plain = plain_ring(&ids);
        let ring = Ring::build(ids.iter().map(|s| (s.as_str(), 1.0)), 160);
        let mut by_hashring = vec![0.0; n];
        let mut by_ring = vec![0.0; n];
        for k in &keys {
            let id = &plain.get(&KeyBytes(k)).unwrap().replica;
            let i: usize = id.as_str()["replica-".len()..].parse().unwrap();
            by_hashring[i] += 1.0;
            by_ring[ring.home(key_hash(k)).unwrap()] += 1.0;
        }
        let b125: Vec<f64> = bounded_counts(&ring, n, &keys, 1.25)
            .iter()
            .map(|v| v.2)
            .collect();
        let b110: Vec<f64> = bounded_counts(&ring, n, &keys, 1.10)
            .iter()
            .map(|v| v.2)
            .collect();
        let (a, b, c, d) = (rsd(&by_hashring), rsd(&by_ring), rsd(&b125), rsd(&b110));
        println!(
            "{n:>8} | {:>13.2}% {:>9.3} | {:>13.2}% {:>9.3} | {:>13.2}% {:>9.3} | {:>13.2}% {:>9.3}",
            a.0 * 100.0,
            a.1,
            b.0 * 100.0,
            b.1,
            c.0 * 100.0,
            c.1,
            d.0 * 100.0,
            d.1
        );
    }
    println!();
}

fn lookups(c: &mut Criterion) {
    let probe = keys(4096);
    let placed = keys(KEYS);
    let mut group = c.benchmark_group("affinity_lookup");
    for n in SIZES {
        let ids = ids(n);
        let plain = plain_ring(&ids);
        let ring = Ring::build(ids.iter().map(|s| (s.as_str(), 1.0)), 160);
        let loads = bounded_counts(&ring, n, &placed, 1.25);

        group.bench_with_input(BenchmarkId::new("hashring_get", n), &n, |b, _| {
            let mut i = 0;
            b.iter(|| {
                i = (i + 1) % probe.len();
                black_box(plain.get(&KeyBytes(&probe[i])))
            })
        });
        group.bench_with_input(BenchmarkId::new("ring_home", n), &n, |b, _| {
            let mut i = 0;
            b.iter(|| {
                i = (i + 1) % probe.len();
                black_box(ring.home(key_hash(&probe[i])))
            })
        });
        group.bench_with_input(BenchmarkId::new("bounded_place", n), &n, |b, _| {
            let mut i = 0;
            b.iter(|| {
                i = (i + 1) % probe.len();
                black_box(place(
                    &ring,
                    key_hash(&probe[i]),
                    BalanceFactor::DEFAULT,
                    &loads[..],
                ))
            })
        });

        // The whole layer for pinned sessions.
        let mut builder = Pool::builder();
        for id in &ids {
            builder = builder.replica(id, ReplicaSpec::new("m"), ());
        }
        let pool = builder.build().unwrap();
        let inner = tower::service_fn(|req: http::Request<()>| {
            std::future::ready(Ok::<_, replica_router::error::RouteError>(
                req.extensions().get::<Decision>().is_some(),
            ))
        });
        let mut svc = AffinityLayer::new(pool).layer(inner);
        let contexts: Vec<RouteContext> = probe
            .iter()
            .map(|k| RouteContext::with_session(RouteKey::from(k.clone())))
            .collect();
        let request = |ctx: &RouteContext| {
            let mut req = http::Request::new(());
            req.extensions_mut().insert(ctx.clone());
            req
        };
        for ctx in &contexts {
            let _ = svc.call(request(ctx)).now_or_never();
        }
        group.bench_with_input(BenchmarkId::new("layer_pinned", n), &n, |b, _| {
            let mut i = 0;
            b.iter(|| {
                i = (i + 1) % contexts.len();
                black_box(svc.call(request(&contexts[i])).now_or_never())
            })
        });
    }
    group.finish();
}

fn main() {
    distribution_table();
    let mut c = Criterion::default()
        .warm_up_time(std::time::Duration::from_millis(500))
        .measurement_time(std::time::Duration::from_secs(2))
        .sample_size(30)
        .configure_from_args();
    lookups(&mut c);
    c.final_summary();
}
