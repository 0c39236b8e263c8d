//! Measures how many keys move when one replica leaves or joins a bounded-load ring.
//!
//! `cargo run --release --example affinity_churn`
use replica_router::pick::ring::{key_hash, place, BalanceFactor, Ring};

fn place_all(ids: &[String], weights: &[f64], keys: &[u64], c: f64) -> Vec<String> {
    let ring = Ring::build(
        ids.iter().map(|s| s.as_str()).zip(weights.iter().copied()),
        160,
    );
    let mut view: Vec<(bool, f64, f64)> = weights.iter().map(|w| (true, *w, 0.0)).collect();
    let f = BalanceFactor::new(c).unwrap();
    keys.iter()
        .map(|h| {
            let p = place(&ring, *h, f, &view[..]).unwrap();
            view[p.replica].2 += 1.0;
            ids[p.replica].clone()
        })
        .collect()
}

fn main() {
    let k = 20_000;
    let keys: Vec<u64> = (0..k)
        .map(|i| key_hash(format!("session-{i}").as_bytes()))
        .collect();
    println!(
        "{:>4} {:>6} {:>10} {:>10} {:>10} {:>10}",
        "n", "c", "rm_moved", "rm_share", "add_moved", "add_share"
    );
    for &n in &[3usize, 4, 8, 16, 32, 100] {
        for &c in &[1.1, 1.25, 1.5, 2.0] {
            let ids: Vec<String> = (0..n).map(|i| format!("replica-{i}")).collect();
            let w = vec![1.0; n];
            let before = place_all(&ids, &w, &keys, c);
            let after = place_all(&ids[1..], &w[1..], &keys, c);
            let rm = before.iter().zip(&after).filter(|(a, b)| a != b).count() as f64 / k as f64;
            let mut ids2 = ids.clone();
            ids2.push("replica-new".into());
            let added = place_all(&ids2, &vec![1.0; n + 1], &keys, c);
            let add = before.iter().zip(&added).filter(|(a, b)| a != b).count() as f64 / k as f64;
            println!(
                "{n:>4} {c:>6} {rm:>10.4} {:>10.4} {add:>10.4} {:>10.4}",
                1.0 / n as f64,
                1.0 / (n + 1) as f64
            );
        }
    }
}
