//! Header extraction must take any header bytes without panicking.
#![no_main]

use libfuzzer_sys::fuzz_target;
use replica_router::context::HeaderExtractor;

fuzz_target!(|data: &[u8]| {
    let ex = HeaderExtractor::default().max_key_len(64);
    let mut headers = http::HeaderMap::new();
    for (i, chunk) in data.split(|b| *b == b'\n').enumerate().take(8) {
        let name = ["x-session-id", "x-user-id", "x-tenant-id", "x-priority", "x-estimated-tokens", "content-length"][i % 6];
        if let Ok(v) = http::HeaderValue::from_bytes(chunk) {
            headers.append(name, v);
        }
    }
    let _ = ex.extract_headers(&headers);
});
