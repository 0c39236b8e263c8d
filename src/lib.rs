//! replica-router: data-parallel LLM inference routing as tower layers.
#![deny(missing_docs)]

pub mod load;
