//! Any bytes through the Prometheus text parser and the vLLM report reader: no panic, and the
//! two agree (a report only comes out of text that validates).
#![no_main]

use libfuzzer_sys::fuzz_target;
use replica_router::load::prometheus::{validate, Samples, VllmParser};
use tokio::time::Instant;

fuzz_target!(|data: &[u8]| {
    let valid = validate(data).is_ok();
    for sample in Samples::new(data).flatten() {
        let _ = sample.name.unescape();
        for (name, value) in sample.labels() {
            let decoded = value.unescape();
            assert!(value.eq_bytes(&decoded));
            let _ = name.to_string_lossy();
        }
    }
    let now = Instant::now();
    if VllmParser::new().parse(data, now).is_ok() {
        assert!(valid);
    }
    let _ = VllmParser::new().model_name("m").parse(data, now);
});
