//! replica-router: data-parallel LLM inference routing as tower layers.
#![deny(missing_docs)]

#[cfg(feature = "mock")]
#[cfg_attr(docsrs, doc(cfg(feature = "mock")))]
pub mod mock;
