//! A deterministic tokenizer stand-in: the same text always gives the same tokens, and a conversation's
//! earlier turns always give a prefix of its later turns' tokens.

/// Splits `text` into tokens: whitespace separates words, and each word is cut into chunks of at most
/// four bytes (about the density of real BPE tokenizers on English text). A token id is a hash of its
/// bytes.
///
/// ```
/// use replica_router_mock::tokenize;
/// assert_eq!(tokenize("hello world").len(), 4); // "hell" "o" "worl" "d"
/// assert_eq!(tokenize("a b"), tokenize("  a\n b "));
/// ```
pub fn tokenize(text: &str) -> Vec<u32> {
    let mut out = Vec::with_capacity(text.len() / 4 + 1);
    tokenize_into(text, &mut out);
    out
}

/// Appends the tokens of `text` to `out` (see [`tokenize`]).
pub fn tokenize_into(text: &str, out: &mut Vec<u32>) {
    for word in text.split_ascii_whitespace() {
        for chunk in word.as_bytes().chunks(4) {
            out.push(token_id(chunk));
        }
    }
}

fn token_id(bytes: &[u8]) -> u32 {
    // FNV-1a, 32 bit.
    let mut h: u32 = 0x811C_9DC5;
    for &b in bytes {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h
}

/// Renders chat messages `(role, content)` the way a chat template would and tokenizes them, ending
/// with the generation prompt for the assistant. Turn `k`'s rendering is a prefix of turn `k + 1`'s when
/// the client sends the conversation back with the assistant's answer appended.
///
/// ```
/// use replica_router_mock::chat_tokens;
/// let t1 = chat_tokens([("user", "what is a replica?")]);
/// let t2 = chat_tokens([("user", "what is a replica?"), ("assistant", "a model copy"), ("user", "and TP?")]);
/// assert!(t2.starts_with(&t1));
/// ```
pub fn chat_tokens<'a>(messages: impl IntoIterator<Item = (&'a str, &'a str)>) -> Vec<u32> {
    let mut out = Vec::new();
    for (role, content) in messages {
        push_message_head(role, &mut out);
        tokenize_into(content, &mut out);
        out.push(END_TOKEN);
    }
    push_message_head("assistant", &mut out);
    out
}

const END_TOKEN: u32 = 0xFFFF_FFF0;

pub(crate) fn push_message_head(role: &str, out: &mut Vec<u32>) {
    out.push(0xFFFF_FFF1);
    out.push(token_id(role.as_bytes()));
}

pub(crate) fn push_message_end(out: &mut Vec<u32>) {
    out.push(END_TOKEN);
}
