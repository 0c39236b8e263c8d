//! Key extraction and affinity placement under membership churn must never panic, and must
//! never place a session on a replica that is not eligible.
//!
//! The input is a little program: each op byte is followed by its operands. Ops add, remove,
//! eject, readmit, drain and undrain replicas, or route a request whose session, user and
//! tenant headers are raw input bytes, through the real stack (header extraction, affinity with
//! bounded loads and pins, least-in-flight, dispatch), and through the pure ring functions.
#![no_main]

use std::sync::OnceLock;

use futures_util::FutureExt;
use libfuzzer_sys::fuzz_target;
use replica_router::pick::ring::{key_hash, place, BalanceFactor, Ring, SnapshotView};
use replica_router::affinity::{AffinityKey, AffinityLayer};
use replica_router::backend::ServiceBackend;
use replica_router::balance::LeastInFlightLayer;
use replica_router::context::{HeaderExtractor, RouteContextLayer};
use replica_router::decision::Decision;
use replica_router::dispatch::Dispatch;
use replica_router::pool::{LoadMeasure, Pool};
use replica_router::replica::{ReplicaSpec, SpecPolicy};
use replica_router::rng::RngSeed;
use tower::{Service, ServiceBuilder, ServiceExt};

type Engine = ServiceBackend<
    tower::util::ServiceFn<
        fn(
            http::Request<()>,
        ) -> std::future::Ready<Result<http::Response<String>, std::convert::Infallible>>,
    >,
>;

fn answer(
    _req: http::Request<()>,
) -> std::future::Ready<Result<http::Response<String>, std::convert::Infallible>> {
    std::future::ready(Ok(http::Response::new(String::from("ok"))))
}

fn engine() -> Engine {
    static E: OnceLock<Engine> = OnceLock::new();
    E.get_or_init(|| ServiceBackend::new(tower::service_fn(answer as fn(_) -> _)))
        .clone()
}

struct Input<'a>(&'a [u8]);

impl<'a> Input<'a> {
    fn byte(&mut self) -> Option<u8> {
        let (b, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(*b)
    }
    fn bytes(&mut self) -> &'a [u8] {
        let n = self.byte().unwrap_or(0) as usize % 24;
        let n = n.min(self.0.len());
        let (b, rest) = self.0.split_at(n);
        self.0 = rest;
        b
    }
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input(data);
    let key = match input.byte().unwrap_or(0) % 3 {
        0 => AffinityKey::Session,
        1 => AffinityKey::User,
        _ => AffinityKey::SessionThenUser,
    };
    let c = 1.0 + f64::from(input.byte().unwrap_or(25)) / 100.0;
    let pool: Pool<Engine> = Pool::builder()
        .spec_policy(SpecPolicy::Unchecked)
        .allow_empty()
        .build()
        .expect("empty pools are allowed");
    let layer = match AffinityLayer::builder(pool.clone())
        .key(key)
        .balance_factor(c)
        .max_pins(64)
        .tenant_share(Some(0.5))
        .build()
    {
        Ok(l) => l,
        Err(_) => return, // c == 1.0 is a typed config error
    };
    let mut svc = ServiceBuilder::new()
        .layer(RouteContextLayer::new(HeaderExtractor::default().max_key_len(16)))
        .layer(layer)
        .layer(LeastInFlightLayer::new(pool.clone()).seed(RngSeed::fixed(0)))
        .service(Dispatch::with_seed(pool.clone(), RngSeed::fixed(1)));
    let mut held = Vec::new();
    let mut ids: Vec<String> = Vec::new();
    while let Some(op) = input.byte() {
        let pick = |input: &mut Input, ids: &Vec<String>| -> Option<String> {
            let i = input.byte()? as usize;
            (!ids.is_empty()).then(|| ids[i % ids.len()].clone())
        };
        match op % 8 {
            0 => {
                let id = String::from_utf8_lossy(input.bytes()).into_owned();
                let w = f64::from(input.byte().unwrap_or(4)) / 4.0; // 0.0 is rejected
                let spec = ReplicaSpec::new("m").capacity_weight(w);
                if pool.add(&id, spec, engine()).is_ok() {
                    ids.push(id);
                }
            }
            1 => {
                if let Some(id) = pick(&mut input, &ids) {
                    let _ = pool.remove(&id);
                    ids.retain(|x| *x != id);
                }
            }
            2 => {
                if let Some(id) = pick(&mut input, &ids) {
                    let _ = pool.eject(&id);
                }
            }
            3 => {
                if let Some(id) = pick(&mut input, &ids) {
                    let _ = pool.readmit(&id);
                }
            }
            4 => {
                if let Some(id) = pick(&mut input, &ids) {
                    let _ = pool.drain(&id);
                }
            }
            5 => {
                if let Some(id) = pick(&mut input, &ids) {
                    let _ = pool.undrain(&id);
                }
            }
            6 => drop(held.drain(..)),
            _ => {
                let mut req = http::Request::builder();
                for name in ["x-session-id", "x-user-id", "x-tenant-id"] {
                    if let Ok(v) = http::HeaderValue::from_bytes(input.bytes()) {
                        req = req.header(name, v);
                    }
                }
                let Ok(req) = req.body(()) else { continue };
                // Pure placement over the current membership.
                let snap = pool.snapshot();
                let ring = Ring::from_snapshot(&snap, 160);
                let view = SnapshotView::new(&snap, LoadMeasure::InFlightRequests);
                let session = req.headers().get("x-session-id").map(|v| v.as_bytes().to_vec());
                if let (Some(s), Ok(f)) = (session, BalanceFactor::new(c)) {
                    if let Some(p) = place(&ring, key_hash(&s), f, &view) {
                        assert!(snap.replicas()[p.replica].state().is_eligible());
                    }
                }
                // The real stack: decisions only ever name eligible members.
                let Some(Ok(svc)) = svc.ready().now_or_never() else { continue };
                match svc.call(req).now_or_never() {
                    Some(Ok(resp)) => {
                        let d = resp.extensions().get::<Decision>().expect("decision");
                        let (_, r) = snap.get(d.replica().as_str()).expect("a member");
                        assert!(r.state().is_eligible());
                        if held.len() < 32 {
                            held.push(resp);
                        }
                    }
                    Some(Err(e)) => {
                        let _ = e.status_code();
                    }
                    None => panic!("in-memory stack must answer at once"),
                }
            }
        }
    }
    drop(held);
    for r in pool.snapshot().replicas() {
        assert_eq!(r.state().in_flight(), 0);
    }
});
