//! Session affinity.
//!
//! This module holds the pin table seam ([`pins`]): where a session was placed, shared between
//! gateway instances when backed by a shared store.

pub mod pins;
