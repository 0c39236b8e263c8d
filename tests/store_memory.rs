//! MemoryStore under tokio's paused clock, and the key encoding's injectivity.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use proptest::prelude::*;
use replica_router::store::{
    CounterStore, MemoryStore, RateQuota, SettleTarget, StoreError, StoreKey, WindowId,
    MAX_RAW_SUBJECT,
};
use tokio::time::{advance, sleep};

/// Many tasks with a paused clock: admitted cost per aligned window never exceeds the limit,
/// and every window under pressure is filled exactly.
#[tokio::test(start_paused = true)]
async fn quota_per_window_is_exact_under_paused_clock() {
    let store = MemoryStore::new();
    let key = StoreKey::new("quota.req", b"t").unwrap();
    let quota = RateQuota::new(25, Duration::from_millis(100)).unwrap();
    let mut tasks = Vec::new();
    for i in 0..40u64 {
        let store = store.clone();
        let key = key.clone();
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::new();
            for j in 0..50u64 {
                let now = store.now_ms();
                let t = store.take(&key, quota, 1).await.unwrap();
                assert_eq!(t.window, WindowId(now - now % 100));
                assert_eq!(t.reset_after, Duration::from_millis(t.window.0 + 100 - now));
                if !t.admitted {
                    assert_eq!(t.retry_after, t.reset_after);
                    assert_eq!(t.remaining, 0);
                }
                out.push((t.window, t.admitted));
                sleep(Duration::from_millis(1 + (i * 3 + j) % 7)).await;
            }
            out
        }));
    }
    let mut per_window: BTreeMap<WindowId, u64> = BTreeMap::new();
    for t in tasks {
        for (w, admitted) in t.await.unwrap() {
            let e = per_window.entry(w).or_default();
            if admitted {
                *e += 1;
            }
        }
    }
    assert!(per_window.len() >= 2);
    // 40 tasks taking every 1..7 ms overwhelm 25 per 100 ms: every full window is exactly full.
    let windows: Vec<_> = per_window.iter().collect();
    for (w, n) in &windows[..windows.len() - 1] {
        assert_eq!(**n, 25, "window {w:?}");
    }
}

#[tokio::test(start_paused = true)]
async fn denied_take_is_admitted_after_retry_after() {
    let store = MemoryStore::new();
    let key = StoreKey::new("quota.req", b"t").unwrap();
    let quota = RateQuota::new(3, Duration::from_secs(1)).unwrap();
    advance(Duration::from_millis(250)).await;
    for _ in 0..3 {
        assert!(store.take(&key, quota, 1).await.unwrap().admitted);
    }
    let denied = store.take(&key, quota, 1).await.unwrap();
    assert!(!denied.admitted);
    assert_eq!(denied.retry_after, Duration::from_millis(750));
    advance(denied.retry_after - Duration::from_millis(1)).await;
    assert!(!store.take(&key, quota, 1).await.unwrap().admitted);
    advance(Duration::from_millis(1)).await;
    let t = store.take(&key, quota, 1).await.unwrap();
    assert!(t.admitted);
    assert_eq!(t.window, WindowId(1000));
    // A cost above the whole limit is never admitted but does not consume anything.
    let big = store.take(&key, quota, 4).await.unwrap();
    assert!(!big.admitted);
    assert_eq!(big.used, 1);
    // Cost 0 is admitted while at or under the limit.
    assert!(store.take(&key, quota, 0).await.unwrap().admitted);
}

#[tokio::test(start_paused = true)]
async fn settle_same_window_carried_forward_and_dropped() {
    let store = MemoryStore::new();
    let key = StoreKey::new("quota.tok", b"t").unwrap();
    let quota = RateQuota::new(1000, Duration::from_secs(10)).unwrap();
    let t = store.take(&key, quota, 300).await.unwrap();
    // Reserved 300, used 120.
    let s = store.settle(&key, quota, t.window, -180).await.unwrap();
    assert_eq!((s.target, s.used), (SettleTarget::SameWindow, 120));
    // Refunds never go below zero.
    let s = store.settle(&key, quota, t.window, -1000).await.unwrap();
    assert_eq!(s.used, 0);
    let s = store.settle(&key, quota, t.window, 1500).await.unwrap();
    assert_eq!(s.used, 1500);
    // Over the limit after a settlement: nothing more is admitted in this window.
    assert!(!store.take(&key, quota, 1).await.unwrap().admitted);

    let t2 = {
        advance(Duration::from_secs(10)).await;
        store.take(&key, quota, 100).await.unwrap()
    };
    assert!(t2.admitted);
    advance(Duration::from_secs(10)).await;
    // t2's window is over: a refund is dropped, an over-use is carried to the current window.
    let s = store.settle(&key, quota, t2.window, -50).await.unwrap();
    assert_eq!((s.target, s.used), (SettleTarget::Dropped, 0));
    let s = store.settle(&key, quota, t2.window, 70).await.unwrap();
    assert_eq!((s.target, s.used), (SettleTarget::CarriedForward, 70));
    assert_eq!(store.usage(&key, quota).await.unwrap().used, 70);
}

/// Many concurrent reservations settled to random actual counts sum to the actual total.
#[tokio::test(start_paused = true)]
async fn reservations_settle_to_actual_counts() {
    let store = MemoryStore::new();
    let key = StoreKey::new("quota.tok", b"t").unwrap();
    let quota = RateQuota::new(1 << 40, Duration::from_secs(3600)).unwrap();
    let total = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut tasks = Vec::new();
    for i in 0..32u64 {
        let (store, key, total) = (store.clone(), key.clone(), total.clone());
        tasks.push(tokio::spawn(async move {
            for j in 0..20u64 {
                let est = 10 + (i * 7 + j) % 90;
                let actual = (i * 13 + j * 11) % 200;
                let t = store.take(&key, quota, est).await.unwrap();
                sleep(Duration::from_millis(j % 5)).await;
                store
                    .settle(&key, quota, t.window, actual as i64 - est as i64)
                    .await
                    .unwrap();
                total.fetch_add(actual, std::sync::atomic::Ordering::Relaxed);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(
        store.usage(&key, quota).await.unwrap().used,
        total.load(std::sync::atomic::Ordering::Relaxed)
    );
}

#[tokio::test(start_paused = true)]
async fn leases_limit_expire_renew_release() {
    let store = MemoryStore::new();
    let key = StoreKey::new("quota.conc", b"t").unwrap();
    let ttl = Duration::from_secs(5);
    let a = store.acquire(&key, 2, ttl).await.unwrap().lease.unwrap();
    let b = store.acquire(&key, 2, ttl).await.unwrap().lease.unwrap();
    let denied = store.acquire(&key, 2, ttl).await.unwrap();
    assert_eq!((denied.admitted(), denied.in_use), (false, 2));
    assert!(store.release(&key, a).await.unwrap());
    assert!(!store.release(&key, a).await.unwrap(), "idempotent");
    let c = store.acquire(&key, 2, ttl).await.unwrap().lease.unwrap();
    advance(Duration::from_secs(4)).await;
    assert!(store.renew(&key, c, ttl).await.unwrap());
    advance(Duration::from_secs(1)).await;
    // b expired exactly at its TTL; c was renewed.
    assert_eq!(store.in_use(&key).await.unwrap(), 1);
    assert!(!store.release(&key, b).await.unwrap());
    assert!(!store.renew(&key, b, ttl).await.unwrap());
    advance(Duration::from_secs(3)).await;
    assert!(store.release(&key, c).await.unwrap());
    assert_eq!(store.in_use(&key).await.unwrap(), 0);
    assert!(store.is_empty(), "no lease, no key");
}

#[tokio::test(start_paused = true)]
async fn idle_keys_are_swept() {
    let store = MemoryStore::new();
    let quota = RateQuota::new(10, Duration::from_millis(100)).unwrap();
    for i in 0..5000u32 {
        let key = StoreKey::new("quota.req", i.to_le_bytes()).unwrap();
        store.take(&key, quota, 1).await.unwrap();
    }
    assert!(store.len() > 4000);
    advance(Duration::from_millis(100)).await;
    // Calls on other keys sweep expired ones as they go (amortized).
    let hot = StoreKey::new("quota.req", b"hot").unwrap();
    for _ in 0..20_000 {
        store.take(&hot, quota, 0).await.unwrap();
    }
    assert!(store.len() < 100, "len {}", store.len());
    advance(Duration::from_millis(100)).await;
    store.sweep();
    assert!(store.is_empty());
}

#[tokio::test]
async fn wrong_kind_and_bad_quota_are_typed_errors() {
    let store = MemoryStore::new();
    let key = StoreKey::new("k", b"t").unwrap();
    let quota = RateQuota::new(1, Duration::from_secs(1)).unwrap();
    store.take(&key, quota, 1).await.unwrap();
    assert!(matches!(
        store.acquire(&key, 1, Duration::from_secs(1)).await,
        Err(StoreError::WrongKind)
    ));
    assert!(matches!(
        RateQuota::new(1, Duration::from_micros(10)),
        Err(StoreError::InvalidQuota(_))
    ));
    assert!(matches!(
        RateQuota::new(u64::MAX, Duration::from_secs(1)),
        Err(StoreError::InvalidQuota(_))
    ));
    assert!(matches!(
        store.take(&key, quota, u64::MAX).await,
        Err(StoreError::InvalidQuota(_))
    ));
    assert!(matches!(
        store.settle(&key, quota, WindowId(0), i64::MIN).await,
        Err(StoreError::InvalidQuota(_))
    ));
    let other = StoreKey::new("c", b"t").unwrap();
    assert!(matches!(
        store.acquire(&other, 1, Duration::ZERO).await,
        Err(StoreError::InvalidQuota(_))
    ));
    let dynamic: Arc<dyn CounterStore> = Arc::new(store);
    assert!(!dynamic.take(&key, quota, 1).await.unwrap().admitted);
}

fn tenant() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..(MAX_RAW_SUBJECT + 40)),
        proptest::collection::vec(
            prop_oneof![
                Just(b'{'),
                Just(b'}'),
                Just(b':'),
                Just(0u8),
                Just(b'\n'),
                Just(b'x'),
                Just(b'h')
            ],
            0..10
        ),
        // Strings that look like encoded keys of other tenants.
        "[xh0-9a-f{}:]{0,140}".prop_map(String::into_bytes),
    ]
}

proptest! {
    /// The encoding is injective and only ever puts [0-9a-f] of the subject in the key.
    #[test]
    fn key_encoding_is_injective(a in tenant(), b in tenant(), scope in "[a-z.]{1,8}") {
        let ka = StoreKey::new(&scope, &a).unwrap();
        let kb = StoreKey::new(&scope, &b).unwrap();
        prop_assert_eq!(a == b, ka == kb);
        prop_assert_eq!(ka.scope(), scope.as_str());
        let tag = ka.hash_tag();
        let well_formed = tag.starts_with('{') && tag.ends_with('}');
        prop_assert!(well_formed);
        let inner = &tag[1..tag.len() - 1];
        prop_assert!(inner[1..].bytes().all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()));
        prop_assert_eq!(ka.encoded().matches('{').count(), 1);
        prop_assert_eq!(ka.encoded().matches('}').count(), 1);
        prop_assert!(ka.encoded().len() <= scope.len() + 2 + 1 + 2 * MAX_RAW_SUBJECT + 1);
    }

    /// Operations on one tenant never change another's counters (memory store).
    #[test]
    fn tenant_operations_are_isolated(a in tenant(), b in tenant(), cost in 1u64..100) {
        prop_assume!(a != b);
        let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
        rt.block_on(async {
            let store = MemoryStore::new();
            let quota = RateQuota::new(1000, Duration::from_secs(60)).unwrap();
            let (ka, kb) = (StoreKey::new("q", &a).unwrap(), StoreKey::new("q", &b).unwrap());
            let (ca, cb) = (StoreKey::new("c", &a).unwrap(), StoreKey::new("c", &b).unwrap());
            let t = store.take(&ka, quota, cost).await.unwrap();
            store.settle(&ka, quota, t.window, 5).await.unwrap();
            store.acquire(&ca, 5, Duration::from_secs(5)).await.unwrap();
            prop_assert_eq!(store.usage(&kb, quota).await.unwrap().used, 0);
            prop_assert_eq!(store.in_use(&cb).await.unwrap(), 0);
            prop_assert_eq!(store.usage(&ka, quota).await.unwrap().used, cost + 5);
            Ok(())
        })?;
    }
}

#[test]
fn distinct_long_tenants_get_distinct_digests() {
    let mut seen = HashSet::new();
    for i in 0..2000u32 {
        let mut t = vec![0u8; MAX_RAW_SUBJECT + 1];
        t[..4].copy_from_slice(&i.to_le_bytes());
        assert!(seen.insert(StoreKey::new("q", &t).unwrap()));
    }
}
