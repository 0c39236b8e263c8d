//! The route-context extractor over random header maps: any names, any values, any number of
//! them, with the extractor itself configured from the input. It must never panic, and what it
//! extracts must respect the key length bound.
#![no_main]

use libfuzzer_sys::fuzz_target;
use replica_router::context::HeaderExtractor;

fuzz_target!(|data: &[u8]| {
    let Some((&cfg, rest)) = data.split_first() else {
        return;
    };
    let max_key = usize::from(cfg & 0x3f) + 1;
    let names = ["x-session-id", "x-user-id", "x-tenant-id", "x-priority", "x-estimated-tokens"];
    let pick = |i: u8| http::HeaderName::from_static(names[usize::from(i) % names.len()]);
    let mut ex = HeaderExtractor::default().max_key_len(max_key);
    if cfg & 0x40 != 0 {
        ex = ex.user_header(Some(pick(1)));
    }
    if cfg & 0x80 != 0 {
        ex = ex.estimated_tokens_header(None);
    }
    let mut headers = http::HeaderMap::new();
    // `name \0 value \n` records; a name that is not a header name reuses a known one.
    for (i, record) in rest.split(|b| *b == b'\n').enumerate().take(64) {
        let (name, value) = match record.iter().position(|b| *b == 0) {
            Some(at) => (&record[..at], &record[at + 1..]),
            None => (&[][..], record),
        };
        let name = http::HeaderName::from_bytes(name).unwrap_or_else(|_| pick(i as u8));
        if let Ok(v) = http::HeaderValue::from_bytes(value) {
            headers.append(name, v);
        }
    }
    if let Ok(ctx) = ex.extract_headers(&headers) {
        for key in [&ctx.session, &ctx.user, &ctx.tenant].into_iter().flatten() {
            assert!(key.as_bytes().len() <= max_key);
        }
    }
});
