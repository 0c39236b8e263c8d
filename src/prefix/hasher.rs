//! Chained fingerprints of a prompt's leading blocks.

use std::sync::Arc;

/// Checkpoints per doubling of the prefix length (see [`checkpoint_blocks`]).
pub const CHECKPOINTS_PER_OCTAVE: usize = 8;

/// Default block size of [`PrefixHasher`], in bytes (about 16 tokens of English text).
pub const DEFAULT_BLOCK_BYTES: usize = 64;

/// Default bytes per token, for turning bytes into token counts.
pub const DEFAULT_BYTES_PER_TOKEN: usize = 4;

/// Default cap on the bytes a [`PrefixHasher`] reads (2 MiB, about 500k tokens).
pub const DEFAULT_MAX_BYTES: usize = 2 << 20;

/// Most checkpoints a [`PrefixHashes`] holds, whatever the prompt.
pub const MAX_CHECKPOINTS: usize = 256;

/// The length in blocks of the prefix that checkpoint `k` (from 0) covers.
///
/// The first [`CHECKPOINTS_PER_OCTAVE`] checkpoints cover 1, 2, ... blocks; after that each
/// doubling of the length has `CHECKPOINTS_PER_OCTAVE` evenly spaced checkpoints, so a prefix is
/// located to within 1/8 to 1/16 of its length with `O(log length)` fingerprints: a 100k-token
/// prompt in 16-token blocks has 88 checkpoints instead of 6 250 blocks.
///
/// ```
/// use replica_router::prefix::checkpoint_blocks;
/// let first: Vec<u64> = (0..20).map(checkpoint_blocks).collect();
/// assert_eq!(first, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 18, 20, 22, 24]);
/// ```
pub fn checkpoint_blocks(k: usize) -> u64 {
    let g = CHECKPOINTS_PER_OCTAVE;
    let (group, j) = (k / g, (k % g) as u64);
    if group == 0 {
        return j + 1;
    }
    let shift = (group - 1).min(56) as u32;
    let step = 1u64 << shift;
    ((g as u64) << shift).saturating_add((j + 1).saturating_mul(step))
}

/// Number of checkpoints within a prefix of `blocks` whole blocks.
pub fn checkpoints_within(blocks: u64) -> usize {
    let mut k = 0;
    while k < MAX_CHECKPOINTS && checkpoint_blocks(k) <= blocks {
        k += 1;
    }
    k
}

/// The fingerprints of one request's prompt: one chained hash per checkpoint (see
/// [`checkpoint_blocks`]), the tokens per block, and the prompt's length in tokens. Cheap to
/// clone (an `Arc`); carried in [`RouteContext::prefix`](crate::context::RouteContext::prefix).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PrefixHashes {
    hashes: Arc<[u64]>,
    block_tokens: u32,
    tokens: u64,
}

impl PrefixHashes {
    /// Fingerprints as given: `hashes[k]` stands for the prefix of
    /// [`checkpoint_blocks(k)`](checkpoint_blocks) blocks of `block_tokens` tokens; `tokens` is
    /// the prompt's length. More than [`MAX_CHECKPOINTS`] hashes are cut.
    pub fn new(hashes: impl Into<Arc<[u64]>>, block_tokens: u32, tokens: u64) -> Self {
        let mut hashes: Arc<[u64]> = hashes.into();
        if hashes.len() > MAX_CHECKPOINTS {
            hashes = hashes[..MAX_CHECKPOINTS].into();
        }
        PrefixHashes {
            hashes,
            block_tokens: block_tokens.max(1),
            tokens,
        }
    }

    /// Picks the checkpoints out of a chain with one hash per block (`chain[i]` names the prefix
    /// of `i + 1` blocks, each hash depending on all earlier blocks), as engines and the
    /// simulation name KV blocks.
    ///
    /// ```
    /// use replica_router::prefix::PrefixHashes;
    /// let chain: Vec<u64> = (1..=40).collect();
    /// let p = PrefixHashes::from_block_chain(&chain, 16, 40 * 16 + 5);
    /// assert_eq!(p.hashes()[..3], [1, 2, 3]);
    /// assert_eq!(*p.hashes().last().unwrap(), 40); // the checkpoint at 40 blocks
    /// assert_eq!(p.tokens_at(p.len()), 40 * 16);
    /// ```
    pub fn from_block_chain(chain: &[u64], block_tokens: u32, tokens: u64) -> Self {
        let n = checkpoints_within(chain.len() as u64);
        let hashes: Vec<u64> = (0..n)
            .map(|k| chain[(checkpoint_blocks(k) - 1) as usize])
            .collect();
        PrefixHashes::new(hashes, block_tokens, tokens)
    }

    /// The checkpoint fingerprints, shortest prefix first.
    pub fn hashes(&self) -> &[u64] {
        &self.hashes
    }

    /// Number of checkpoints.
    pub fn len(&self) -> usize {
        self.hashes.len()
    }

    /// Whether there is no checkpoint (a prompt shorter than one block).
    pub fn is_empty(&self) -> bool {
        self.hashes.is_empty()
    }

    /// Tokens per block.
    pub fn block_tokens(&self) -> u32 {
        self.block_tokens
    }

    /// The prompt's length in tokens.
    pub fn tokens(&self) -> u64 {
        self.tokens
    }

    /// The same fingerprints with the prompt's length set to `tokens` (when the caller knows it
    /// better than bytes / 4).
    pub fn with_tokens(mut self, tokens: u64) -> Self {
        self.tokens = tokens;
        self
    }

    /// Tokens covered by the first `checkpoints` checkpoints (at most the prompt's length).
    pub fn tokens_at(&self, checkpoints: usize) -> u64 {
        if checkpoints == 0 {
            return 0;
        }
        let blocks = checkpoint_blocks(checkpoints.min(MAX_CHECKPOINTS) - 1);
        blocks
            .saturating_mul(u64::from(self.block_tokens))
            .min(self.tokens)
    }

    /// Tokens between checkpoint `k - 1` and checkpoint `k` (what checkpoint `k` adds).
    pub fn span_tokens(&self, k: usize) -> u64 {
        let prev = if k == 0 { 0 } else { checkpoint_blocks(k - 1) };
        (checkpoint_blocks(k) - prev).saturating_mul(u64::from(self.block_tokens))
    }
}

const K1: u64 = 0x9E37_79B9_7F4A_7C15;
const K2: u64 = 0xC2B2_AE3D_27D4_EB4F;

fn fmix(mut h: u64) -> u64 {
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

/// Hashes a prompt's text incrementally into [`PrefixHashes`].
///
/// Feed it the canonical text of the prompt in order, in chunks of any size (for chat requests:
/// each message's role, then its content, in order; two gateways must feed the same bytes for
/// the same prompt). It cuts the bytes into fixed-size blocks, chains a 64-bit hash over them
/// (each block's fingerprint depends on every byte before it) and keeps the fingerprints at the
/// [checkpoints](checkpoint_blocks). CPU and memory are bounded whatever the input: it reads at
/// most `max_bytes` bytes (the rest only counts toward the token estimate) and keeps at most
/// [`MAX_CHECKPOINTS`] fingerprints. The hash is fast, not cryptographic: a crafted prompt can
/// collide with another and mislead the cache estimate for itself, never grow the index.
///
/// ```
/// use replica_router::prefix::PrefixHasher;
/// let system = "You are a helpful assistant. ".repeat(20);
/// let mut a = PrefixHasher::new();
/// a.feed(b"system");
/// a.feed(system.as_bytes());
/// a.feed(b"user");
/// a.feed("What is the capital of France? ".repeat(10).as_bytes());
/// let mut b = PrefixHasher::new();
/// b.feed(b"system");
/// b.feed(system.as_bytes());
/// b.feed(b"user");
/// b.feed("Write a poem about the sea, please. ".repeat(10).as_bytes());
/// let (a, b) = (a.finish(), b.finish());
/// // The shared system prompt gives shared leading fingerprints; the questions differ.
/// assert_eq!(a.hashes()[..8], b.hashes()[..8]);
/// assert_ne!(a.hashes().last(), b.hashes().last());
/// ```
#[derive(Debug, Clone)]
pub struct PrefixHasher {
    block_bytes: usize,
    bytes_per_token: usize,
    max_bytes: usize,
    /// Bytes fed, counted even past `max_bytes`.
    total: u64,
    /// Bytes hashed.
    hashed: usize,
    word: u64,
    word_len: u32,
    block: u64,
    block_len: usize,
    chain: u64,
    blocks: u64,
    next_checkpoint: u64,
    out: Vec<u64>,
}

impl Default for PrefixHasher {
    fn default() -> Self {
        PrefixHasher::new()
    }
}

impl PrefixHasher {
    /// A hasher with 64-byte blocks, 4 bytes per token and a 2 MiB cap.
    pub fn new() -> Self {
        PrefixHasher::with_config(
            DEFAULT_BLOCK_BYTES,
            DEFAULT_BYTES_PER_TOKEN,
            DEFAULT_MAX_BYTES,
        )
    }

    /// A hasher with `block_bytes`-byte blocks (rounded up to a multiple of 8, between 8 and
    /// 4096), `bytes_per_token` (at least 1) and a cap of `max_bytes` hashed bytes.
    pub fn with_config(block_bytes: usize, bytes_per_token: usize, max_bytes: usize) -> Self {
        let block_bytes = block_bytes.clamp(8, 4096).next_multiple_of(8);
        PrefixHasher {
            block_bytes,
            bytes_per_token: bytes_per_token.max(1),
            max_bytes,
            total: 0,
            hashed: 0,
            word: 0,
            word_len: 0,
            block: 0,
            block_len: 0,
            chain: K2,
            blocks: 0,
            next_checkpoint: checkpoint_blocks(0),
            out: Vec::new(),
        }
    }

    /// Tokens per block under this configuration.
    pub fn block_tokens(&self) -> u32 {
        (self.block_bytes / self.bytes_per_token).max(1) as u32
    }

    #[inline]
    fn mix_word(&mut self, w: u64) {
        self.block = (self.block.rotate_left(23) ^ w).wrapping_mul(K1);
    }

    fn end_block(&mut self) {
        self.blocks += 1;
        self.chain = fmix(self.chain.wrapping_mul(K2) ^ self.block ^ self.blocks);
        self.block = 0;
        self.block_len = 0;
        if self.blocks == self.next_checkpoint && self.out.len() < MAX_CHECKPOINTS {
            self.out.push(self.chain);
            self.next_checkpoint = checkpoint_blocks(self.out.len());
        }
    }

    /// Feeds the next bytes of the prompt.
    pub fn feed(&mut self, bytes: &[u8]) {
        self.total = self.total.saturating_add(bytes.len() as u64);
        let room = self.max_bytes.saturating_sub(self.hashed);
        let mut rest = &bytes[..bytes.len().min(room)];
        self.hashed += rest.len();
        while !rest.is_empty() {
            if self.word_len == 0 && rest.len() >= 8 {
                // Fast path: whole words up to the end of the block.
                let left_in_block = self.block_bytes - self.block_len;
                let n = (rest.len() / 8 * 8).min(left_in_block);
                let (words, tail) = rest.split_at(n);
                for w in words.chunks_exact(8) {
                    let mut b = [0u8; 8];
                    b.copy_from_slice(w);
                    self.mix_word(u64::from_le_bytes(b));
                }
                self.block_len += n;
                if self.block_len == self.block_bytes {
                    self.end_block();
                }
                rest = tail;
                continue;
            }
            self.word |= u64::from(rest[0]) << (8 * self.word_len);
            self.word_len += 1;
            rest = &rest[1..];
            if self.word_len == 8 {
                let w = self.word;
                self.mix_word(w);
                self.word = 0;
                self.word_len = 0;
                self.block_len += 8;
                if self.block_len == self.block_bytes {
                    self.end_block();
                }
            }
        }
    }

    /// One fingerprint of everything hashed so far, the partial block included: equal fed
    /// bytes (up to the byte cap) give equal digests, in any process and on any machine, so a
    /// digest can name a prompt's leading part across gateways (for example an implicit
    /// conversation key: the system prompt and the first user message).
    ///
    /// ```
    /// use replica_router::prefix::PrefixHasher;
    /// let (mut a, mut b) = (PrefixHasher::new(), PrefixHasher::new());
    /// a.feed(b"You are terse.\x1ehi");
    /// b.feed(b"You are terse.");
    /// b.feed(b"\x1ehi");
    /// assert_eq!(a.digest(), b.digest());
    /// b.feed(b"!");
    /// assert_ne!(a.digest(), b.digest());
    /// ```
    pub fn digest(&self) -> u64 {
        let partial = fmix(
            self.block.wrapping_mul(K1)
                ^ self.word.rotate_left(17)
                ^ u64::from(self.word_len).wrapping_mul(K2),
        );
        fmix(self.chain ^ partial ^ (self.hashed as u64).wrapping_mul(K1))
    }

    /// The fingerprints of everything fed (a trailing partial block has none).
    pub fn finish(self) -> PrefixHashes {
        let tokens = self.total / self.bytes_per_token as u64;
        let block_tokens = self.block_tokens();
        PrefixHashes::new(self.out, block_tokens, tokens)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunking_does_not_change_the_fingerprints() {
        let text: Vec<u8> = (0..5000u32).map(|i| (i * 7 % 251) as u8).collect();
        let mut whole = PrefixHasher::new();
        whole.feed(&text);
        let mut parts = PrefixHasher::new();
        for c in text.chunks(13) {
            parts.feed(c);
        }
        assert_eq!(whole.finish(), parts.finish());
    }

    #[test]
    fn checkpoints_grow_geometrically() {
        assert_eq!(checkpoints_within(0), 0);
        assert_eq!(checkpoints_within(8), 8);
        assert!(checkpoints_within(6250) < 100);
        for k in 1..MAX_CHECKPOINTS {
            assert!(checkpoint_blocks(k) > checkpoint_blocks(k - 1));
        }
    }
}
