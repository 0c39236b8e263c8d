//! The memory a pin holds does not depend on the session key's length: pins keep a 16-byte
//! digest of the key, never the key (measured with a counting allocator; this binary holds only
//! this test so nothing else allocates meanwhile).

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};
use std::time::Duration;

use replica_router::context::RouteKey;
use replica_router::pins::{MemoryPinTable, PinTable};
use replica_router::replica::ReplicaId;

struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::SeqCst);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::SeqCst);
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Bytes still held by a table after pinning `n` sessions whose keys are `len` bytes long (the
/// keys themselves are dropped).
fn held_by_pins(n: usize, len: usize) -> isize {
    let replica = ReplicaId::new("gpu-0").unwrap();
    let table = MemoryPinTable::new(1 << 20);
    let before = LIVE.load(Ordering::SeqCst);
    for i in 0..n {
        let mut key = vec![b'k'; len];
        key[..8].copy_from_slice(&(i as u64).to_le_bytes());
        let key = RouteKey::new(key);
        futures_util::FutureExt::now_or_never(table.pin(&key, &replica, Duration::from_secs(600)))
            .unwrap()
            .unwrap();
    }
    assert_eq!(table.len(), n);
    let held = LIVE.load(Ordering::SeqCst) - before;
    drop(table);
    held
}

#[test]
fn memory_per_pin_does_not_depend_on_the_key_length() {
    let n = 5_000;
    let short = held_by_pins(n, 8);
    let long = held_by_pins(n, 4096);
    eprintln!(
        "{n} pins: {short} bytes with 8-byte keys, {long} bytes with 4096-byte keys ({} per pin)",
        long / n as isize
    );
    // A table storing the raw key would hold at least n * 4096 more bytes (20 MB here).
    assert!(
        (long - short).abs() < (n as isize) * 8,
        "short {short}, long {long}"
    );
    assert!(long < (n as isize) * 200, "{long} bytes for {n} pins");
}
