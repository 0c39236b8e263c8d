//! Cache affinity without a session key: prompt-prefix fingerprints and a per-replica index.
//!
//! Many clients (agents, plain OpenAI SDK calls) send no session header, yet their requests
//! share long prefixes: a system prompt, tool definitions, the earlier turns of a conversation
//! they replay in full. An engine's prefix cache serves those prefixes again only on the replica
//! that computed them, so the router should know, per replica, how much of a request's prompt it
//! probably holds.
//!
//! 1. [`PrefixHasher`] turns the prompt's canonical text (fed in chunks, during the pass that
//!    reads the body anyway) into [`PrefixHashes`]: chained 64-bit fingerprints of fixed-size
//!    leading blocks, kept at geometrically spaced [checkpoints](checkpoint_blocks) so a
//!    100k-token prompt needs 88 of them, not 6 250. Bounded CPU and memory whatever the prompt.
//! 2. The fingerprints travel in [`RouteContext::prefix`](crate::context::RouteContext::prefix).
//! 3. [`PrefixIndex`] remembers, per replica, the fingerprints recently sent there (an
//!    approximate LRU bounded in tokens like the engine's cache) and answers for every replica
//!    at once how many leading tokens it holds ([`PrefixMatch`]).
//!
//! The predicted-TTFT placement ([`load::Placement`](crate::load::Placement)) reads the match
//! to count each candidate's uncached tokens, and records the chosen replica.

mod hasher;
mod index;

pub use self::hasher::{
    checkpoint_blocks, checkpoints_within, PrefixHasher, PrefixHashes, CHECKPOINTS_PER_OCTAVE,
    DEFAULT_BLOCK_BYTES, DEFAULT_BYTES_PER_TOKEN, DEFAULT_MAX_BYTES, MAX_CHECKPOINTS,
};
pub use self::index::{
    PrefixIndex, PrefixIndexConfig, PrefixMatch, SharedRecord, MAX_TRACKED_REPLICAS,
};
