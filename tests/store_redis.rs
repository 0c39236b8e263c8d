//! RedisStore against a real redis-server started by the test on a free loopback port.
#![cfg(feature = "redis")]

mod support;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant as StdInstant};

use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use replica_router::store::{
    CounterStore, RateQuota, RedisStore, RedisStoreConfig, SettleTarget, StoreKey, WindowId,
    MAX_WINDOW,
};

async fn client(server: &support::RedisServer, timeout: Duration) -> RedisStore {
    RedisStore::connect_with(&server.url(), RedisStoreConfig::default().timeout(timeout))
        .await
        .expect("connect to the test redis")
}

/// Two independently built clients (two gateways), many concurrent tasks: admitted takes per
/// window never exceed the limit, and the limit is actually reached.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_clients_never_admit_more_than_the_quota_per_window() {
    let server = redis_or_skip!();
    let a = client(&server, Duration::from_secs(2)).await;
    let b = client(&server, Duration::from_secs(2)).await;
    let key = StoreKey::new("quota.req", b"tenant one").unwrap();
    let quota = RateQuota::new(40, Duration::from_millis(250)).unwrap();

    let mut tasks = Vec::new();
    for i in 0..24 {
        let store = if i % 2 == 0 { a.clone() } else { b.clone() };
        let key = key.clone();
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::new();
            for j in 0..60u64 {
                let cost = 1 + (i as u64 * 7 + j) % 3;
                let t = store.take(&key, quota, cost).await.expect("take");
                out.push((t.window, t.admitted, cost, t.used));
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            out
        }));
    }
    let mut per_window: BTreeMap<WindowId, u64> = BTreeMap::new();
    let mut denied = 0;
    for t in tasks {
        for (window, admitted, cost, used) in t.await.unwrap() {
            assert!(used <= quota.limit() || !admitted);
            assert_eq!(window.0 % quota.window_ms(), 0, "windows are aligned");
            if admitted {
                *per_window.entry(window).or_default() += cost;
            } else {
                denied += 1;
            }
        }
    }
    for (w, total) in &per_window {
        assert!(
            *total <= quota.limit(),
            "window {w:?} admitted {total} > {}",
            quota.limit()
        );
    }
    assert!(denied > 0, "the load must exceed the quota");
    // With costs of 1..=3 and constant pressure, a full window reaches at least limit - 2.
    assert!(
        per_window.values().any(|&t| t + 2 >= quota.limit()),
        "some window must be filled: {per_window:?}"
    );
}

/// Tokens reserved at admission are settled to the actual counts, from two clients at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_reservations_settle_to_actual_counts() {
    let server = redis_or_skip!();
    let a = client(&server, Duration::from_secs(2)).await;
    let b = client(&server, Duration::from_secs(2)).await;
    let key = StoreKey::new("quota.tok", "tenant\u{0}two".as_bytes()).unwrap();
    // One window that spans the whole test (aligned windows of 2^40 ms).
    let quota = RateQuota::new(50_000, MAX_WINDOW).unwrap();
    let actual_total = Arc::new(AtomicU64::new(0));
    let admitted = Arc::new(AtomicU64::new(0));

    let mut tasks = Vec::new();
    for i in 0..16u64 {
        let store = if i % 2 == 0 { a.clone() } else { b.clone() };
        let key = key.clone();
        let actual_total = actual_total.clone();
        let admitted = admitted.clone();
        tasks.push(tokio::spawn(async move {
            for j in 0..40u64 {
                let estimate = 50 + (i * 13 + j * 7) % 200;
                let actual = (i * 31 + j * 17) % 400;
                let t = store.take(&key, quota, estimate).await.unwrap();
                if !t.admitted {
                    continue;
                }
                admitted.fetch_add(1, Ordering::Relaxed);
                tokio::task::yield_now().await;
                let s = store
                    .settle(&key, quota, t.window, actual as i64 - estimate as i64)
                    .await
                    .unwrap();
                assert_eq!(s.target, SettleTarget::SameWindow);
                actual_total.fetch_add(actual, Ordering::Relaxed);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let usage = a.usage(&key, quota).await.unwrap();
    assert!(admitted.load(Ordering::Relaxed) > 0);
    assert_eq!(usage.used, actual_total.load(Ordering::Relaxed));
}

/// Settling after the reservation's window ended: over-use is carried forward, refunds dropped.
#[tokio::test]
async fn settle_after_window_end_carries_overuse_forward() {
    let server = redis_or_skip!();
    let store = client(&server, Duration::from_secs(2)).await;
    let key = StoreKey::new("quota.tok", b"late").unwrap();
    let quota = RateQuota::new(1000, Duration::from_millis(100)).unwrap();
    let t = store.take(&key, quota, 10).await.unwrap();
    assert!(t.admitted);
    tokio::time::sleep(t.reset_after + Duration::from_millis(5)).await;
    let s = store.settle(&key, quota, t.window, -5).await.unwrap();
    assert_eq!(s.target, SettleTarget::Dropped);
    let s = store.settle(&key, quota, t.window, 300).await.unwrap();
    if s.target == SettleTarget::CarriedForward {
        assert_eq!(s.used, 300);
        assert_ne!(s.window, t.window);
    } else {
        panic!("expected carried forward, got {s:?}");
    }
}

/// Concurrency leases across two clients never exceed the limit; unreleased leases expire.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrency_limit_holds_across_clients_and_leases_expire() {
    let server = redis_or_skip!();
    let a = client(&server, Duration::from_secs(2)).await;
    let b = client(&server, Duration::from_secs(2)).await;
    let key = StoreKey::new("quota.conc", b"tenant three").unwrap();
    let limit = 5;
    let held = Arc::new(AtomicI64::new(0));
    let max_held = Arc::new(AtomicI64::new(0));
    let granted = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for i in 0..20 {
        let store = if i % 2 == 0 { a.clone() } else { b.clone() };
        let key = key.clone();
        let (held, max_held, granted) = (held.clone(), max_held.clone(), granted.clone());
        tasks.push(tokio::spawn(async move {
            for _ in 0..15 {
                let acq = store
                    .acquire(&key, limit, Duration::from_secs(30))
                    .await
                    .unwrap();
                if let Some(lease) = acq.lease {
                    granted.fetch_add(1, Ordering::Relaxed);
                    let now = held.fetch_add(1, Ordering::SeqCst) + 1;
                    max_held.fetch_max(now, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(3)).await;
                    held.fetch_sub(1, Ordering::SeqCst);
                    assert!(store.release(&key, lease).await.unwrap());
                } else {
                    assert!(acq.in_use >= limit);
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert!(max_held.load(Ordering::SeqCst) <= limit as i64);
    assert!(granted.load(Ordering::Relaxed) > 0);
    assert_eq!(a.in_use(&key).await.unwrap(), 0);
    assert_eq!(server.dbsize(), 0, "released leases leave no key behind");

    // A "crashed gateway" holds every slot and never releases: the TTL frees them.
    let ttl = Duration::from_millis(150);
    let mut leases = Vec::new();
    for _ in 0..limit {
        leases.push(a.acquire(&key, limit, ttl).await.unwrap().lease.unwrap());
    }
    assert!(!b.acquire(&key, limit, ttl).await.unwrap().admitted());
    // Renewing one keeps it alive past the others' expiry.
    assert!(a
        .renew(&key, leases[0], Duration::from_secs(5))
        .await
        .unwrap());
    tokio::time::sleep(Duration::from_millis(250)).await;
    assert_eq!(b.in_use(&key).await.unwrap(), 1);
    assert!(!a.release(&key, leases[1]).await.unwrap(), "expired lease");
    assert!(b.acquire(&key, limit, ttl).await.unwrap().admitted());
}

/// Idle keys expire: a rate key when its window ends, a lease key with its last lease.
#[tokio::test]
async fn idle_keys_leave_nothing_behind() {
    let server = redis_or_skip!();
    let store = client(&server, Duration::from_secs(2)).await;
    let quota = RateQuota::new(10, Duration::from_millis(100)).unwrap();
    for i in 0..20u32 {
        let key = StoreKey::new("quota.req", i.to_be_bytes()).unwrap();
        store.take(&key, quota, 1).await.unwrap();
        let key = StoreKey::new("quota.conc", i.to_be_bytes()).unwrap();
        store
            .acquire(&key, 3, Duration::from_millis(100))
            .await
            .unwrap();
    }
    assert!(server.dbsize() > 0);
    // Redis expires keys lazily and in an active cycle (10 Hz); allow a few cycles.
    let deadline = StdInstant::now() + Duration::from_secs(5);
    while server.dbsize() > 0 && StdInstant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(server.dbsize(), 0);
}

/// The script cache being flushed (as after a failover) is invisible: EVALSHA reloads.
#[tokio::test]
async fn script_flush_is_recovered_by_reload() {
    let server = redis_or_skip!();
    let store = client(&server, Duration::from_secs(2)).await;
    let key = StoreKey::new("quota.req", b"t").unwrap();
    let quota = RateQuota::new(10, MAX_WINDOW).unwrap();
    assert!(store.take(&key, quota, 1).await.unwrap().admitted);
    assert!(server.raw(&[b"SCRIPT", b"FLUSH"]).starts_with(b"+OK"));
    let t = store.take(&key, quota, 1).await.unwrap();
    assert!(t.admitted);
    assert_eq!(t.used, 2);
}

/// Redis stopped mid-run: every call fails with a store error within the timeout (no hang);
/// restarted on the same port: the same client recovers without being rebuilt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outage_fails_fast_and_restart_recovers() {
    let mut server = redis_or_skip!();
    let timeout = Duration::from_millis(200);
    let store = client(&server, timeout).await;
    let key = StoreKey::new("quota.req", b"t").unwrap();
    let quota = RateQuota::new(1000, MAX_WINDOW).unwrap();
    assert!(store.take(&key, quota, 1).await.unwrap().admitted);

    server.stop();
    // Sequential and concurrent calls during the outage, including every operation kind.
    for round in 0..5 {
        let mut calls = Vec::new();
        for i in 0..16 {
            let store = store.clone();
            let key = key.clone();
            calls.push(tokio::spawn(async move {
                let started = StdInstant::now();
                let err = match i % 4 {
                    0 => store.take(&key, quota, 1).await.map(|_| ()),
                    1 => store.settle(&key, quota, WindowId(0), 1).await.map(|_| ()),
                    2 => store
                        .acquire(&key, 1, Duration::from_secs(1))
                        .await
                        .map(|_| ()),
                    _ => store.in_use(&key).await.map(|_| ()),
                }
                .expect_err("the store is down");
                (started.elapsed(), err)
            }));
        }
        for c in calls {
            let (elapsed, err) = c.await.unwrap();
            assert!(err.is_outage(), "round {round}: {err}");
            // The bound is the configured timeout; the margin absorbs scheduling on a busy box.
            assert!(
                elapsed < timeout + Duration::from_millis(800),
                "round {round}: a call took {elapsed:?} (timeout {timeout:?}): {err}"
            );
        }
    }

    server.restart();
    let deadline = StdInstant::now() + Duration::from_secs(10);
    let mut attempts = 0u64;
    let recovered = loop {
        attempts += 1;
        match store.take(&key, quota, 1).await {
            Ok(t) => break t,
            Err(e) => {
                assert!(e.is_outage());
                assert!(StdInstant::now() < deadline, "no recovery within 10 s: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    assert!(recovered.admitted);
    // A fresh server has fresh counters. A take that timed out on the client while the server
    // came back may still have been applied (a timeout is ambiguous), so each attempt made
    // since the restart may count once, and nothing from before the restart does.
    assert!(
        (1..=attempts).contains(&recovered.used),
        "used {} after {attempts} attempts since the restart",
        recovered.used
    );
}

/// Connecting to a port where nothing listens fails with a typed error, bounded in time.
#[tokio::test]
async fn connect_to_nothing_is_a_typed_error() {
    let server = redis_or_skip!();
    let url = server.url();
    drop(server);
    let started = StdInstant::now();
    let err = RedisStore::connect_with(
        &url,
        RedisStoreConfig::default()
            .timeout(Duration::from_millis(100))
            .connect_timeout(Duration::from_millis(500)),
    )
    .await
    .expect_err("nothing listens");
    assert!(err.is_outage(), "{err}");
    assert!(started.elapsed() < Duration::from_secs(3));
}

/// Hostile tenant ids: huge, braces, newlines, NUL, non-UTF-8: each has its own counter.
#[tokio::test]
async fn hostile_tenants_are_isolated() {
    let server = redis_or_skip!();
    let store = client(&server, Duration::from_secs(2)).await;
    let quota = RateQuota::new(100, MAX_WINDOW).unwrap();
    let huge_a = vec![b'a'; 1 << 20];
    let mut huge_b = huge_a.clone();
    huge_b[(1 << 20) - 1] = b'b';
    let tenants: Vec<Vec<u8>> = vec![
        b"".to_vec(),
        b" ".to_vec(),
        b"{".to_vec(),
        b"}".to_vec(),
        b"{}".to_vec(),
        b"a}{b".to_vec(),
        b"line\nbreak\r\n".to_vec(),
        b"\0".to_vec(),
        b"\0\0".to_vec(),
        vec![0xff, 0xfe, 0x80],
        "tenant:quota.req:{x00}".as_bytes().to_vec(),
        huge_a,
        huge_b,
    ];
    for (i, t) in tenants.iter().enumerate() {
        let key = StoreKey::new("quota.req", t).unwrap();
        assert!(store.redis_key(&key).len() < 100);
        let taken = store.take(&key, quota, i as u64 + 1).await.unwrap();
        assert!(taken.admitted);
    }
    for (i, t) in tenants.iter().enumerate() {
        let key = StoreKey::new("quota.req", t).unwrap();
        assert_eq!(store.usage(&key, quota).await.unwrap().used, i as u64 + 1);
    }
    assert_eq!(server.dbsize(), tenants.len() as u64);
}

/// Property: operations on one arbitrary tenant never change another's counters (live Redis).
#[test]
fn arbitrary_tenant_pairs_never_share_counters_live() {
    let server = redis_or_skip!();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let store = rt.block_on(client(&server, Duration::from_secs(2)));
    let quota = RateQuota::new(u32::MAX as u64, MAX_WINDOW).unwrap();
    let tenant = prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..80),
        proptest::collection::vec(
            prop_oneof![Just(b'{'), Just(b'}'), Just(b':'), Just(0u8), Just(b'\n')],
            0..8
        ),
    ];
    let mut runner = TestRunner::new(Config {
        cases: 96,
        failure_persistence: None,
        ..Config::default()
    });
    runner
        .run(&(tenant.clone(), tenant, 1u64..1000), |(a, b, cost)| {
            prop_assume!(a != b);
            let ka = StoreKey::new("quota.tok", &a).unwrap();
            let kb = StoreKey::new("quota.tok", &b).unwrap();
            let ca = StoreKey::new("quota.conc", &a).unwrap();
            let cb = StoreKey::new("quota.conc", &b).unwrap();
            rt.block_on(async {
                let before = store.usage(&kb, quota).await.unwrap().used;
                let held_before = store.in_use(&cb).await.unwrap();
                let t = store.take(&ka, quota, cost).await.unwrap();
                prop_assert!(t.admitted);
                store.settle(&ka, quota, t.window, 3).await.unwrap();
                let lease = store
                    .acquire(&ca, 1000, Duration::from_secs(60))
                    .await
                    .unwrap();
                prop_assert!(lease.admitted());
                prop_assert_eq!(store.usage(&kb, quota).await.unwrap().used, before);
                prop_assert_eq!(store.in_use(&cb).await.unwrap(), held_before);
                Ok(())
            })
        })
        .unwrap();
}
