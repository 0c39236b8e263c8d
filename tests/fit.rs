//! Context-length fit: requests go only to replicas whose context window holds them, a request
//! no replica holds is refused, and a keyed request keeps one replica among those that fit.

use proptest::prelude::*;
use replica_router::affinity::AffinityLayer;
use replica_router::balance::LeastInFlightLayer;
use replica_router::context::{RouteContext, RouteKey};
use replica_router::decision::Decision;
use replica_router::dispatch::Dispatch;
use replica_router::error::RouteError;
use replica_router::fit::{fit, ContextFitLayer, Fit};
use replica_router::health::FailoverLayer;
use replica_router::pool::Pool;
use replica_router::replica::ReplicaSpec;
use tower::{Service, ServiceBuilder, ServiceExt};

mod common;

use common::ScriptedBackend;

type Req = http::Request<()>;

fn pool_of(limits: &[u32]) -> Pool<ScriptedBackend> {
    let mut b = Pool::builder();
    for (i, l) in limits.iter().enumerate() {
        b = b.replica(
            format!("r{i}"),
            ReplicaSpec::new("m").max_context(*l),
            ScriptedBackend::default(),
        );
    }
    b.build().unwrap()
}

fn request(tokens: u64, session: Option<&str>) -> Req {
    let mut req = http::Request::new(());
    req.extensions_mut().insert(RouteContext {
        context_tokens: tokens,
        session: session.map(|s| RouteKey::from(s.to_owned())),
        ..Default::default()
    });
    req
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Whatever the limits (0 = unknown) and the need, the chosen replica fits, and the request
    /// is refused exactly when no replica fits.
    #[test]
    fn the_chosen_replica_always_fits(
        limits in proptest::collection::vec(prop_oneof![Just(0u32), 1_000u32..200_000], 1..6),
        needed in 0u64..350_000,
        keyed in any::<bool>(),
    ) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let pool = pool_of(&limits);
            let mut svc = ServiceBuilder::new()
                .layer(FailoverLayer::new(pool.clone()))
                .layer(ContextFitLayer::new(pool.clone()))
                .layer(AffinityLayer::new(pool.clone()))
                .layer(LeastInFlightLayer::new(pool.clone()))
                .service(Dispatch::new(pool.clone()));
            let fits_any = limits.iter().any(|l| *l == 0 || needed <= u64::from(*l));
            let largest = u64::from(*limits.iter().max().unwrap());
            let within_margin = !fits_any && needed as f64 <= largest as f64 * 1.5;
            let session = keyed.then_some("conv-1");
            let got = svc.ready().await.unwrap().call(request(needed, session)).await;
            match got {
                Ok(resp) => {
                    prop_assert!(fits_any || within_margin);
                    let d = resp.extensions().get::<Decision>().unwrap();
                    let (_, r) = pool.snapshot().get(d.replica().as_str()).map(|(i, r)| (i, r.clone())).unwrap();
                    if fits_any {
                        prop_assert!(r.spec().fits(needed), "{} got {needed}", r.spec().max_context);
                    } else {
                        // Within the estimate's margin: the largest window decides.
                        prop_assert_eq!(u64::from(r.spec().max_context), largest);
                    }
                }
                Err(RouteError::ContextTooLong { needed: n, largest: l }) => {
                    prop_assert!(!fits_any && !within_margin);
                    prop_assert_eq!(n, needed);
                    prop_assert_eq!(l, largest);
                }
                Err(e) => prop_assert!(false, "unexpected {e}"),
            }
            Ok(())
        })?;
    }
}

#[tokio::test]
async fn a_long_conversation_keeps_one_replica_among_those_that_fit() {
    let pool = pool_of(&[8_192, 65_536, 65_536, 131_072]);
    assert_eq!(fit(&pool.snapshot(), 4_000), Fit::All);
    assert_eq!(fit(&pool.snapshot(), 40_000), Fit::Some);
    assert_eq!(
        fit(&pool.snapshot(), 400_000),
        Fit::None { largest: 131_072 }
    );
    let mut svc = ServiceBuilder::new()
        .layer(ContextFitLayer::new(pool.clone()))
        .layer(LeastInFlightLayer::new(pool.clone()))
        .service(Dispatch::new(pool.clone()));
    let mut homes = std::collections::HashMap::new();
    for conv in 0..40 {
        let key = format!("conv-{conv}");
        for _ in 0..3 {
            let resp = svc
                .ready()
                .await
                .unwrap()
                .call(request(40_000, Some(&key)))
                .await
                .unwrap();
            let id = resp
                .extensions()
                .get::<Decision>()
                .unwrap()
                .replica()
                .to_string();
            assert_ne!(id, "r0");
            assert_eq!(
                homes.entry(key.clone()).or_insert(id.clone()),
                &id,
                "{key} moved"
            );
        }
    }
    // The sessions spread over the three replicas that fit.
    let mut used: Vec<&String> = homes.values().collect();
    used.sort();
    used.dedup();
    assert_eq!(used.len(), 3, "{used:?}");
}
