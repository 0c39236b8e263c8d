//! Token settlement from the response: what the replica generated, not what was estimated.
//!
//! Every OpenAI-route response body is read as it is forwarded by the library's fixed-size
//! [`UsageScanner`](replica_router::usage::UsageScanner) (through
//! [`TrackedBody::scan_usage`](replica_router::inflight::TrackedBody::scan_usage)); the bytes are
//! still forwarded unchanged. When the body ends:
//!
//! - the engine's `usage.prompt_tokens_details.cached_tokens` calibrates the replica's cache
//!   model (the in-flight guard's `observe_cached`);
//! - under a token quota (`--tenant-tokens`), the reservation is settled through the quota's
//!   [`TokenReport`] to `usage.prompt_tokens + usage.completion_tokens`; a stream without usage
//!   is settled to the gateway's prompt estimate plus the SSE events that carried generated text.
//!
//! The gateway does **not** add `stream_options.include_usage` to streamed requests: bodies are
//! forwarded byte for byte, and a client that did not ask for the usage chunk would get one it
//! does not expect. Counting content events is within a token or two of the real count on
//! engines that send one token per event (vLLM, SGLang).
//!
//! A body that does not end cleanly (the client went away, the replica failed mid-stream) or a
//! response that says nothing usable (a JSON body without `usage`, an error) keeps its estimate:
//! a client cannot lower its charge by hanging up.

use replica_router::inflight::Outcome;
use replica_router::quota::TokenReport;
use replica_router::usage::{Usage, UsageSink};

/// Settles one request's token reservation to what its response said.
pub(crate) struct Settle {
    pub(crate) report: TokenReport,
    /// The gateway's estimate of the prompt (used when the response gives no `prompt_tokens`).
    pub(crate) prompt_estimate: u64,
}

impl UsageSink for Settle {
    fn on_usage(&self, usage: &Usage, outcome: Outcome) {
        if outcome != Outcome::Success {
            return;
        }
        if let Some(total) = usage.total_tokens(self.prompt_estimate) {
            self.report.report(total);
        }
    }
}
