//! The gateway's body inspection (the JSON pass that validates a request and estimates its
//! tokens) over any bytes, for both routes: it must never panic, and a body it accepts must be
//! valid JSON whose estimate is at least its prompt estimate.
#![no_main]

use libfuzzer_sys::fuzz_target;
use replica_router_gateway::{inspect_body, ApiKind};

fuzz_target!(|data: &[u8]| {
    for kind in [ApiKind::Chat, ApiKind::Completion] {
        if let Ok(info) = inspect_body(kind, data) {
            assert!(info.estimated_tokens() >= info.prompt_tokens);
            assert!(serde_json::from_slice::<serde_json::Value>(data).is_ok());
        }
    }
});
