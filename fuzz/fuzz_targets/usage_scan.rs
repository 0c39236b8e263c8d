//! The response usage scanner over any bytes split anywhere: it must never panic, and the split
//! must not change what it reads.
#![no_main]

use libfuzzer_sys::fuzz_target;
use replica_router::usage::UsageScanner;

fuzz_target!(|data: &[u8]| {
    let Some((&cut, body)) = data.split_first() else {
        return;
    };
    let mut whole = UsageScanner::new();
    whole.feed(body);
    let mut split = UsageScanner::new();
    let at = usize::from(cut).min(body.len());
    split.feed(&body[..at]);
    split.feed(&body[at..]);
    assert_eq!(whole.finish(), split.finish());
});
