//! The affinity ring and bounded-load placement as pure functions: the load bound, determinism
//! across independently built rings (and across processes: a fixed table), agreement with a
//! plain `hashring`, key movement on membership changes, and bad keys.

use std::hash::Hasher;

use hashring::HashRing;
use proptest::prelude::*;
use replica_router::decision::DecisionReason;
use replica_router::pick::ring::{
    key_hash, place, vnode_count, vnode_hash, BalanceFactor, Bound, KeyBytes, LoadView, Ring,
    VirtualNode,
};
use replica_router::replica::ReplicaId;

/// Places `keys` one after another, each placement seeing the counts of the keys placed before
/// (the load), and returns the chosen index per key and the final counts.
fn place_all(ring: &Ring, members: &[(bool, f64)], keys: &[u64], c: f64) -> (Vec<usize>, Vec<f64>) {
    let mut view: Vec<(bool, f64, f64)> = members.iter().map(|(e, w)| (*e, *w, 0.0)).collect();
    let f = BalanceFactor::new(c).unwrap();
    let mut chosen = Vec::with_capacity(keys.len());
    for h in keys {
        let p = place(ring, *h, f, &view[..]).expect("an eligible replica exists");
        assert!(p.within_bound, "integer loads always leave room somewhere");
        view[p.replica].2 += 1.0;
        chosen.push(p.replica);
    }
    (chosen, view.iter().map(|v| v.2).collect())
}

fn ring_of(ids: &[String], weights: &[f64]) -> Ring {
    Ring::build(
        ids.iter().map(|s| s.as_str()).zip(weights.iter().copied()),
        160,
    )
}

fn keys(n: usize, salt: u64) -> Vec<u64> {
    (0..n)
        .map(|i| key_hash(format!("session-{salt}-{i}").as_bytes()))
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// No replica ends above `ceil(c x w_i x m / W)` keys (m keys placed, W the eligible
    /// weight), ineligible replicas get none, and a fallback is never needed.
    #[test]
    fn bounded_load_invariant(
        members in prop::collection::vec((0.25f64..4.0, prop::bool::weighted(0.8)), 1..40),
        c in 1.05f64..3.0,
        n_keys in 1usize..3000,
        salt in any::<u64>(),
    ) {
        prop_assume!(members.iter().any(|(_, e)| *e));
        let ids: Vec<String> = (0..members.len()).map(|i| format!("r{i}")).collect();
        let weights: Vec<f64> = members.iter().map(|m| m.0).collect();
        let ring = ring_of(&ids, &weights);
        let m: Vec<(bool, f64)> = members.iter().map(|(w, e)| (*e, *w)).collect();
        let (_, counts) = place_all(&ring, &m, &keys(n_keys, salt), c);
        let total_w: f64 = m.iter().filter(|x| x.0).map(|x| x.1).sum();
        let bound = Bound::from_totals(BalanceFactor::new(c).unwrap(), n_keys as f64 - 1.0, total_w, 1.0).unwrap();
        for (i, (e, w)) in m.iter().enumerate() {
            if !e {
                prop_assert_eq!(counts[i], 0.0, "ineligible replica {} got keys", i);
            } else {
                prop_assert!(counts[i] <= bound.capacity(*w),
                    "replica {} holds {} > ceil({} x {} x {} / {}) = {}", i, counts[i], c, w, n_keys, total_w, bound.capacity(*w));
            }
        }
    }

    /// Two rings built independently from the same membership, in different join orders,
    /// place every key on the same replica id.
    #[test]
    fn placement_is_independent_of_join_order(
        weights in prop::collection::vec(0.25f64..4.0, 1..30),
        seed in any::<u64>(),
        c in 1.1f64..2.0,
    ) {
        let ids: Vec<String> = (0..weights.len()).map(|i| format!("gpu-{i}-{seed}")).collect();
        let a = ring_of(&ids, &weights);
        // A deterministic shuffle.
        let mut order: Vec<usize> = (0..ids.len()).collect();
        order.sort_by_key(|i| key_hash(&(*i as u64 ^ seed).to_le_bytes()));
        let ids_b: Vec<String> = order.iter().map(|&i| ids[i].clone()).collect();
        let w_b: Vec<f64> = order.iter().map(|&i| weights[i]).collect();
        let b = ring_of(&ids_b, &w_b);
        let ks = keys(500, seed);
        let (pa, _) = place_all(&a, &weights.iter().map(|w| (true, *w)).collect::<Vec<_>>(), &ks, c);
        let (pb, _) = place_all(&b, &w_b.iter().map(|w| (true, *w)).collect::<Vec<_>>(), &ks, c);
        for (x, y) in pa.iter().zip(&pb) {
            prop_assert_eq!(&ids[*x], &ids_b[*y]);
        }
        for h in &ks {
            let oa: Vec<&String> = a.order(*h).iter().map(|&i| &ids[i]).collect();
            let ob: Vec<&String> = b.order(*h).iter().map(|&i| &ids_b[i]).collect();
            prop_assert_eq!(oa, ob);
        }
    }

    /// The ring's point lookup agrees with a plain `hashring::HashRing` holding the same virtual
    /// nodes, and a walk visits every replica exactly once, home first.
    #[test]
    fn agrees_with_hashring(
        weights in prop::collection::vec(0.1f64..3.0, 1..20),
        probes in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..64), 1..200),
    ) {
        let ids: Vec<String> = (0..weights.len()).map(|i| format!("replica-{i}")).collect();
        let ring = ring_of(&ids, &weights);
        let mut plain: HashRing<VirtualNode> = HashRing::new();
        let mut vnodes = Vec::new();
        for (id, w) in ids.iter().zip(&weights) {
            for v in 0..vnode_count(*w, 160) {
                vnodes.push(VirtualNode { replica: ReplicaId::new(id).unwrap(), index: v });
            }
        }
        prop_assert_eq!(vnodes.len(), ring.len());
        plain.batch_add(vnodes);
        for key in &probes {
            let ours = ring.home(key_hash(key)).unwrap();
            let theirs = plain.get(&KeyBytes(key)).unwrap();
            prop_assert_eq!(ids[ours].as_str(), theirs.replica.as_str());
            let order = ring.order(key_hash(key));
            prop_assert_eq!(order[0], ours);
            let mut sorted = order.clone();
            sorted.sort_unstable();
            prop_assert_eq!(sorted, (0..ids.len()).collect::<Vec<_>>());
        }
    }

    /// Removing one replica moves the keys it held plus at most 2% of keys of overflow forced by
    /// the bound (c >= 1.25); adding one moves the keys it takes plus at most 2% of overflow.
    #[test]
    fn membership_changes_move_few_keys(
        weights in prop::collection::vec(0.5f64..2.0, 3..24),
        removed in any::<prop::sample::Index>(),
        c in 1.25f64..2.0,
        salt in any::<u64>(),
    ) {
        let n_keys = 4000;
        let ks = keys(n_keys, salt);
        let ids: Vec<String> = (0..weights.len()).map(|i| format!("r{i}")).collect();
        let all: Vec<(bool, f64)> = weights.iter().map(|w| (true, *w)).collect();
        let (before, _) = place_all(&ring_of(&ids, &weights), &all, &ks, c);

        // Remove one.
        let r = removed.index(ids.len());
        let ids_rm: Vec<String> = ids.iter().enumerate().filter(|(i, _)| *i != r).map(|(_, s)| s.clone()).collect();
        let w_rm: Vec<f64> = weights.iter().enumerate().filter(|(i, _)| *i != r).map(|(_, w)| *w).collect();
        let (after, _) = place_all(&ring_of(&ids_rm, &w_rm), &w_rm.iter().map(|w| (true, *w)).collect::<Vec<_>>(), &ks, c);
        let held = before.iter().filter(|&&i| i == r).count();
        let moved = before.iter().zip(&after).filter(|(b, a)| ids[**b] != ids_rm[**a]).count();
        let overflow = moved - held;
        prop_assert!(overflow as f64 <= 0.02 * n_keys as f64,
            "removal: moved {} = held {} + overflow {} (> 2% of {})", moved, held, overflow, n_keys);

        // Add one.
        let mut ids_add = ids.clone();
        ids_add.push("r-new".into());
        let mut w_add = weights.clone();
        w_add.push(1.0);
        let (added, _) = place_all(&ring_of(&ids_add, &w_add), &w_add.iter().map(|w| (true, *w)).collect::<Vec<_>>(), &ks, c);
        let taken = added.iter().filter(|&&i| i == ids.len()).count();
        let moved = before.iter().zip(&added).filter(|(b, a)| ids[**b] != ids_add[**a]).count();
        prop_assert!(moved >= taken);
        prop_assert!((moved - taken) as f64 <= 0.02 * n_keys as f64,
            "addition: moved {} = taken {} + overflow {}", moved, taken, moved - taken);
    }

    /// Any key bytes place without panicking: empty, long, non-UTF-8.
    #[test]
    fn any_key_bytes_place(key in prop::collection::vec(any::<u8>(), 0..4096), n in 1usize..10) {
        let ids: Vec<String> = (0..n).map(|i| format!("r{i}")).collect();
        let ring = ring_of(&ids, &vec![1.0; n]);
        let view: Vec<(bool, f64, f64)> = vec![(true, 1.0, 0.0); n];
        let p = place(&ring, key_hash(&key), BalanceFactor::DEFAULT, &view[..]).unwrap();
        prop_assert_eq!(p.reason, DecisionReason::Home);
    }
}

/// The brief's measure with equal weights and 20 000 keys at c = 1.25: removing one of n moves
/// at most 1/n + 2 points of the keys; adding one moves 1/(n+1) of them within 2 points.
#[test]
fn churn_at_fixed_sizes() {
    let ks = keys(20_000, 7);
    for n in [4usize, 8, 16, 32, 100] {
        let ids: Vec<String> = (0..n).map(|i| format!("replica-{i}")).collect();
        let w = vec![1.0; n];
        let all = vec![(true, 1.0); n];
        let (before, _) = place_all(&ring_of(&ids, &w), &all, &ks, 1.25);
        let (after, _) = place_all(&ring_of(&ids[1..], &w[1..]), &all[1..], &ks, 1.25);
        let moved = before
            .iter()
            .zip(&after)
            .filter(|(b, a)| ids[**b] != ids[1..][**a])
            .count() as f64
            / ks.len() as f64;
        assert!(
            moved <= 1.0 / n as f64 + 0.02,
            "n={n}: removal moved {moved:.4}"
        );
        let mut ids_add = ids.clone();
        ids_add.push("replica-new".into());
        let (added, _) = place_all(
            &ring_of(&ids_add, &vec![1.0; n + 1]),
            &vec![(true, 1.0); n + 1],
            &ks,
            1.25,
        );
        let moved = before
            .iter()
            .zip(&added)
            .filter(|(b, a)| ids[**b] != ids_add[**a])
            .count() as f64
            / ks.len() as f64;
        let expect = 1.0 / (n + 1) as f64;
        assert!(
            (moved - expect).abs() <= 0.02,
            "n={n}: addition moved {moved:.4}, expected about {expect:.4}"
        );
    }
}

/// The key hash is SipHash-2-4 with zero keys over the raw bytes: check against the standard
/// library's own (deprecated but frozen) SipHash-2-4 implementation, and against fixed values.
#[test]
#[allow(deprecated)]
fn key_hash_is_siphash24_zero_keys() {
    for key in [&b""[..], b"conv-1", b"\xff\xfe non-utf8", &[0u8; 1000][..]] {
        let mut h = std::hash::SipHasher::new();
        h.write(key);
        assert_eq!(key_hash(key), h.finish());
    }
    let mut h = std::hash::SipHasher::new();
    h.write(b"gpu-0");
    h.write(&7u32.to_le_bytes());
    assert_eq!(vnode_hash("gpu-0", 7), h.finish());
    assert_eq!(key_hash(b""), FIXED_EMPTY_HASH);
    assert_eq!(key_hash(b"conv-1"), FIXED_CONV1_HASH);
}

const FIXED_EMPTY_HASH: u64 = 0x1e92_4b9d_7377_00d7;
const FIXED_CONV1_HASH: u64 = 0x4074_6e7d_bc34_9c61;

/// Placement in a fresh process: a fixed table of keys to expected replica ids. If this fails,
/// the hash, the virtual-node layout or the ring order changed, and gateways of different
/// versions would disagree.
#[test]
fn fixed_placement_table() {
    let ids = ["gpu-0-1", "gpu-2-3", "gpu-4-5", "gpu-6-7", "tp4-a"];
    let weights = [1.0, 1.0, 1.0, 1.0, 2.0];
    let ring = Ring::build(ids.iter().copied().zip(weights), 160);
    let table: &[(&str, &str)] = FIXED_TABLE;
    let mut actual = Vec::new();
    for i in 0..20 {
        let key = format!("conversation-{i}");
        let home = ring.home(key_hash(key.as_bytes())).unwrap();
        actual.push((key, ids[home]));
    }
    let expected: Vec<(String, &str)> = table.iter().map(|(k, v)| (k.to_string(), *v)).collect();
    assert_eq!(actual, expected);
}

const FIXED_TABLE: &[(&str, &str)] = &[
    ("conversation-0", "gpu-6-7"),
    ("conversation-1", "gpu-4-5"),
    ("conversation-2", "gpu-2-3"),
    ("conversation-3", "tp4-a"),
    ("conversation-4", "gpu-4-5"),
    ("conversation-5", "tp4-a"),
    ("conversation-6", "gpu-4-5"),
    ("conversation-7", "gpu-4-5"),
    ("conversation-8", "gpu-0-1"),
    ("conversation-9", "tp4-a"),
    ("conversation-10", "gpu-4-5"),
    ("conversation-11", "tp4-a"),
    ("conversation-12", "gpu-2-3"),
    ("conversation-13", "gpu-6-7"),
    ("conversation-14", "gpu-2-3"),
    ("conversation-15", "gpu-4-5"),
    ("conversation-16", "gpu-6-7"),
    ("conversation-17", "gpu-6-7"),
    ("conversation-18", "gpu-2-3"),
    ("conversation-19", "gpu-0-1"),
];

/// A huge key (1 MiB) hashes and places.
#[test]
fn huge_key_places() {
    let key = vec![0xABu8; 1 << 20];
    let ring = Ring::build([("a", 1.0), ("b", 1.0)], 160);
    let view = [(true, 1.0, 0.0), (true, 1.0, 0.0)];
    assert!(place(&ring, key_hash(&key), BalanceFactor::DEFAULT, &view[..]).is_some());
}

/// Empty rings and pools with nothing eligible give `None`, never a panic.
#[test]
fn nothing_to_place_on() {
    let empty = Ring::build(std::iter::empty::<(&str, f64)>(), 160);
    assert!(empty.is_empty());
    assert_eq!(empty.home(1), None);
    let view: [(bool, f64, f64); 0] = [];
    assert!(place(&empty, 1, BalanceFactor::DEFAULT, &view[..]).is_none());
    let ring = Ring::build([("a", 1.0)], 160);
    let down = [(false, 1.0, 0.0)];
    assert!(place(&ring, 1, BalanceFactor::DEFAULT, &down[..]).is_none());
    assert!(down[..].is_eligible(0).eq(&false));
}

/// Weights turn into virtual nodes in proportion, and shares follow.
#[test]
fn shares_follow_weights() {
    let ring = Ring::build([("small", 1.0), ("big", 3.0)], 160);
    assert_eq!(ring.len(), 640);
    let ks = keys(40_000, 3);
    let big = ks.iter().filter(|h| ring.home(**h) == Some(1)).count() as f64 / ks.len() as f64;
    assert!((big - 0.75).abs() < 0.05, "big replica share {big}");
}

/// Pools larger than the stack bitset walk through the per-thread buffer.
#[test]
fn large_pool_walk_visits_everyone() {
    let ids: Vec<String> = (0..1500).map(|i| format!("r{i}")).collect();
    let ring = Ring::build(ids.iter().map(|s| (s.as_str(), 0.003)), 160);
    assert_eq!(ring.len(), 1500);
    let order = ring.order(key_hash(b"k"));
    assert_eq!(order.len(), 1500);
    let mut sorted = order.clone();
    sorted.sort_unstable();
    sorted.dedup();
    assert_eq!(sorted.len(), 1500);
}
