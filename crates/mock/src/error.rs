//! Errors of the mock engine.

/// Why a mock engine refused or lost a request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum MockError {
    /// The request is malformed (empty prompt, zero `max_tokens`, ...).
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// Prompt plus output do not fit the model's context (or the whole KV cache).
    #[error("this model's maximum context length is {max_model_len} tokens; the request has {prompt_tokens} prompt tokens and asks for {max_tokens} more")]
    PromptTooLong {
        /// Prompt length in tokens.
        prompt_tokens: u32,
        /// Requested output tokens.
        max_tokens: u32,
        /// The limit.
        max_model_len: u32,
    },
    /// The engine's scheduler is gone (its runtime shut down).
    #[error("the engine has stopped")]
    Stopped,
}
