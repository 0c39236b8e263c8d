//! Weighted power of two choices (Mitzenmacher) over a pool snapshot, and the least-loaded scan
//! it falls back to.

use rand::Rng;

use crate::pool::{LoadMeasure, PoolSnapshot};

/// How many weighted draws to try for a second, distinct candidate before falling back to a
/// uniform draw among the others.
const DISTINCT_DRAWS: usize = 4;

/// Picks a replica by weighted power of two choices. Returns its index in
/// [`PoolSnapshot::replicas`], or `None` when no replica is eligible.
///
/// Ties go to the first candidate, which was drawn in proportion to weight, so at equal load the
/// shares converge to the weights.
pub fn pick_two_choices<B, R: Rng + ?Sized>(
    snapshot: &PoolSnapshot<B>,
    measure: LoadMeasure,
    rng: &mut R,
) -> Option<usize> {
    let eligible = snapshot.eligible();
    let a = snapshot.sample_weighted(rng)?;
    if eligible.len() == 1 {
        return live_or_scan(snapshot, a, measure);
    }
    let mut b = a;
    for _ in 0..DISTINCT_DRAWS {
        b = snapshot.sample_weighted(rng)?;
        if b != a {
            break;
        }
    }
    if b == a {
        // Heavily skewed weights: take any other eligible replica uniformly.
        let pos = eligible.iter().position(|&i| i as usize == a).unwrap_or(0);
        let other = rng.random_range(0..eligible.len() - 1);
        let other = if other >= pos { other + 1 } else { other };
        b = eligible[other] as usize;
    }
    let replicas = snapshot.replicas();
    let (a_ok, b_ok) = (
        replicas[a].state().is_eligible(),
        replicas[b].state().is_eligible(),
    );
    match (a_ok, b_ok) {
        (true, true) => {
            let (la, lb) = (
                snapshot.weighted_load(a, measure),
                snapshot.weighted_load(b, measure),
            );
            Some(if lb < la { b } else { a })
        }
        (true, false) => Some(a),
        (false, true) => Some(b),
        (false, false) => least_loaded_scan(snapshot, measure),
    }
}

fn live_or_scan<B>(snapshot: &PoolSnapshot<B>, i: usize, measure: LoadMeasure) -> Option<usize> {
    if snapshot.replicas()[i].state().is_eligible() {
        Some(i)
    } else {
        least_loaded_scan(snapshot, measure)
    }
}

/// The least weighted-loaded replica that is eligible right now, by a full scan (the slow path
/// when the snapshot's eligibility is out of date).
pub fn least_loaded_scan<B>(snapshot: &PoolSnapshot<B>, measure: LoadMeasure) -> Option<usize> {
    let mut best: Option<(usize, f64)> = None;
    for (i, r) in snapshot.replicas().iter().enumerate() {
        if !r.state().is_eligible() {
            continue;
        }
        let load = snapshot.weighted_load(i, measure);
        if best.is_none_or(|(_, l)| load < l) {
            best = Some((i, load));
        }
    }
    best.map(|(i, _)| i)
}
