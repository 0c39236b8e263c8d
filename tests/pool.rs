//! Pool membership, validation and bad input.

use replica_router::pool::{Health, Pool};
use replica_router::replica::PoolError;
use replica_router::replica::{ReplicaSpec, SpecPolicy};

fn spec() -> ReplicaSpec {
    ReplicaSpec::new("llama-3-70b")
        .quantization("fp8")
        .tensor_parallel(2)
}

#[test]
fn empty_pool_is_a_typed_error() {
    let err = Pool::<()>::builder().build().unwrap_err();
    assert_eq!(err, PoolError::Empty);
    let pool = Pool::<()>::builder().allow_empty().build().unwrap();
    assert!(pool.snapshot().is_empty());
}

#[test]
fn bad_weights_are_typed_errors() {
    for w in [0.0, -1.0, f64::NAN, f64::INFINITY, f64::NEG_INFINITY, -0.0] {
        let err = Pool::builder()
            .replica("a", spec().capacity_weight(w), ())
            .build()
            .unwrap_err();
        assert!(
            matches!(err, PoolError::InvalidWeight { ref replica, .. } if replica.as_str() == "a"),
            "{w}: {err:?}"
        );
        let pool = Pool::builder().replica("b", spec(), ()).build().unwrap();
        assert!(matches!(
            pool.add("a", spec().capacity_weight(w), ()),
            Err(PoolError::InvalidWeight { .. })
        ));
        assert_eq!(pool.snapshot().len(), 1);
    }
}

#[test]
fn duplicate_ids_are_typed_errors() {
    let err = Pool::builder()
        .replica("a", spec(), ())
        .replica("a", spec(), ())
        .build()
        .unwrap_err();
    assert!(matches!(err, PoolError::DuplicateReplica(ref id) if id.as_str() == "a"));
    let pool = Pool::builder().replica("a", spec(), ()).build().unwrap();
    assert!(matches!(
        pool.add("a", spec(), ()),
        Err(PoolError::DuplicateReplica(_))
    ));
}

#[test]
fn bad_ids_and_specs_are_typed_errors() {
    assert!(matches!(
        Pool::builder().replica("", spec(), ()).build(),
        Err(PoolError::InvalidId(_))
    ));
    let long = "x".repeat(10_000);
    assert!(matches!(
        Pool::builder().replica(&long, spec(), ()).build(),
        Err(PoolError::InvalidId(_))
    ));
    assert!(matches!(
        Pool::builder()
            .replica("a", spec().tensor_parallel(0), ())
            .build(),
        Err(PoolError::InvalidSpec { .. })
    ));
    let pool = Pool::builder().replica("a", spec(), ()).build().unwrap();
    assert!(matches!(
        pool.remove("nope"),
        Err(PoolError::UnknownReplica(_))
    ));
    assert!(matches!(
        pool.drain("nope"),
        Err(PoolError::UnknownReplica(_))
    ));
    assert!(matches!(pool.eject(""), Err(PoolError::UnknownReplica(_))));
}

#[test]
fn spec_mismatch_names_the_odd_replica() {
    let err = Pool::builder()
        .replica("a", spec(), ())
        .replica("b", spec(), ())
        .replica("odd", spec().tensor_parallel(4), ())
        .build()
        .unwrap_err();
    match err {
        PoolError::SpecMismatch {
            replica,
            field,
            expected,
            found,
        } => {
            assert_eq!(replica.as_str(), "odd");
            assert_eq!(field, "tensor_parallel");
            assert_eq!((expected.as_str(), found.as_str()), ("2", "4"));
        }
        other => panic!("{other:?}"),
    }
    let err = Pool::builder()
        .replica("a", spec(), ())
        .replica("q", ReplicaSpec::new("llama-3-70b").tensor_parallel(2), ())
        .build()
        .unwrap_err();
    assert!(matches!(
        err,
        PoolError::SpecMismatch {
            field: "quantization",
            ..
        }
    ));
    // Mixed parallelism is allowed when asked for, with the GPU total summing TP x PP.
    let pool = Pool::builder()
        .spec_policy(SpecPolicy::MixedParallelism)
        .replica("tp2", spec(), ())
        .replica("tp4", spec().tensor_parallel(4).capacity_weight(2.0), ())
        .replica("tp2pp2", spec().pipeline_parallel(2), ())
        .build()
        .unwrap();
    assert_eq!(pool.total_gpus(), 2 + 4 + 4);
    assert!(matches!(
        pool.add(
            "other-model",
            ReplicaSpec::new("mistral").quantization("fp8"),
            ()
        ),
        Err(PoolError::SpecMismatch { field: "model", .. })
    ));
}

#[test]
fn membership_changes_bump_the_version_and_eligibility_does_not() {
    let pool = Pool::builder()
        .replica("a", spec(), ())
        .replica("b", spec(), ())
        .build()
        .unwrap();
    let v0 = pool.snapshot().version();
    pool.set_health("a", Health::Unhealthy).unwrap();
    let s = pool.snapshot();
    assert_eq!(s.version(), v0);
    assert_eq!(s.eligible(), &[1]);
    pool.add("c", spec(), ()).unwrap();
    assert_eq!(pool.snapshot().version(), v0 + 1);
    pool.remove("b").unwrap();
    let s = pool.snapshot();
    assert_eq!(s.version(), v0 + 2);
    assert_eq!(
        s.replicas()
            .iter()
            .map(|r| r.id().as_str())
            .collect::<Vec<_>>(),
        vec!["a", "c"]
    );
    pool.readmit("a").unwrap();
    assert_eq!(pool.snapshot().eligible().len(), 2);
}
