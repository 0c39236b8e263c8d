//! Injective, cluster-friendly encoding of store keys.
//!
//! A [`StoreKey`] names one counter: a *scope* chosen by code (`"quota.req"`, `"pin"`, ...) and a
//! *subject* that comes from untrusted input (a tenant id or session id taken from a header: any
//! bytes, any length). The encoded form is
//!
//! ```text
//! <scope>:{x<hex of subject>}      subjects of at most 64 bytes
//! <scope>:{h<hex of SHA-256(subject)>}  longer subjects
//! ```
//!
//! and a store prepends its own `<prefix>:`. Properties:
//!
//! * **Safe for any bytes.** Only `[0-9a-f]` of the subject reach the key, so spaces, braces,
//!   newlines, NUL and non-UTF-8 bytes cannot break the key or the Redis hash tag.
//! * **Injective.** Scopes and prefixes are restricted to `[A-Za-z0-9_.-]` (no `:` or `{`), so the
//!   scope ends at the first `:`. Hex is injective; the `x` / `h` tag separates the raw and hashed
//!   forms, so a short subject can never equal a long one's digest. Two distinct long subjects
//!   collide only if SHA-256 collides.
//! * **Bounded size.** A key is at most `prefix + scope + 133` bytes, whatever the subject's size
//!   (a 1 MiB tenant id costs one SHA-256 when the key is built, not 2 MiB per Redis call).
//! * **One Redis Cluster slot per subject.** The subject part is the `{hash tag}`, so all of one
//!   tenant's counters (requests, tokens, concurrency) hash to the same slot.

use std::fmt;
use std::sync::Arc;

use sha2::{Digest, Sha256};

use super::StoreError;

/// Subjects up to this many bytes are hex-encoded as they are; longer ones are hashed.
pub const MAX_RAW_SUBJECT: usize = 64;

/// Longest accepted scope or prefix, in bytes.
pub const MAX_SCOPE_LEN: usize = 64;

/// The name of one counter in a [`CounterStore`](super::CounterStore): a scope plus an encoded
/// subject. Cheap to clone.
///
/// ```
/// use replica_router::store::StoreKey;
///
/// let a = StoreKey::new("quota.req", b"acme corp")?;
/// let b = StoreKey::new("quota.req", b"acme}{corp\n")?;
/// assert_ne!(a, b);
/// assert_eq!(a.encoded(), "quota.req:{x61636d6520636f7270}");
/// // A huge tenant id is hashed, so the key stays small.
/// let big = StoreKey::new("quota.req", vec![0xffu8; 1 << 20])?;
/// assert!(big.encoded().len() < 100);
/// # Ok::<(), replica_router::store::StoreError>(())
/// ```
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct StoreKey {
    encoded: Arc<str>,
}

impl StoreKey {
    /// Builds the key for `subject` (any bytes) in `scope`.
    ///
    /// Fails with [`StoreError::InvalidKey`] when `scope` is empty, longer than
    /// [`MAX_SCOPE_LEN`], or has a byte outside `[A-Za-z0-9_.-]`.
    pub fn new(scope: &str, subject: impl AsRef<[u8]>) -> Result<Self, StoreError> {
        validate_ident(scope)?;
        let subject = subject.as_ref();
        let mut s = String::with_capacity(scope.len() + 4 + 2 * MAX_RAW_SUBJECT);
        s.push_str(scope);
        s.push_str(":{");
        if subject.len() <= MAX_RAW_SUBJECT {
            s.push('x');
            push_hex(&mut s, subject);
        } else {
            s.push('h');
            push_hex(&mut s, &Sha256::digest(subject));
        }
        s.push('}');
        Ok(StoreKey { encoded: s.into() })
    }

    /// The key of the same subject in another scope, without encoding (or hashing) the subject
    /// again.
    pub fn rescope(&self, scope: &str) -> Result<Self, StoreError> {
        validate_ident(scope)?;
        let tag = self.hash_tag();
        let mut s = String::with_capacity(scope.len() + 1 + tag.len());
        s.push_str(scope);
        s.push(':');
        s.push_str(tag);
        Ok(StoreKey { encoded: s.into() })
    }

    /// The encoded key (without a store prefix). Only `[A-Za-z0-9_.-:{}]` characters.
    pub fn encoded(&self) -> &str {
        &self.encoded
    }

    /// The scope this key was built with.
    pub fn scope(&self) -> &str {
        self.encoded.split(':').next().unwrap_or_default()
    }

    /// The `{hash tag}` part (with braces): equal for every key of one subject.
    pub fn hash_tag(&self) -> &str {
        match self.encoded.find('{') {
            Some(i) => &self.encoded[i..],
            None => "",
        }
    }
}

impl fmt::Debug for StoreKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("StoreKey").field(&&*self.encoded).finish()
    }
}

impl fmt::Display for StoreKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.encoded)
    }
}

/// Checks that `s` is a valid scope or prefix: 1..=64 bytes of `[A-Za-z0-9_.-]`.
pub fn validate_ident(s: &str) -> Result<(), StoreError> {
    if s.is_empty() {
        return Err(StoreError::InvalidKey("scope or prefix is empty"));
    }
    if s.len() > MAX_SCOPE_LEN {
        return Err(StoreError::InvalidKey(
            "scope or prefix longer than 64 bytes",
        ));
    }
    if !s
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.' || b == b'-')
    {
        return Err(StoreError::InvalidKey(
            "scope or prefix has a byte outside [A-Za-z0-9_.-]",
        ));
    }
    Ok(())
}

fn push_hex(s: &mut String, bytes: &[u8]) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    s.reserve(bytes.len() * 2);
    for &b in bytes {
        s.push(HEX[(b >> 4) as usize] as char);
        s.push(HEX[(b & 0xf) as usize] as char);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_and_hashed_never_collide() {
        let short = StoreKey::new("s", [7u8; 32]).unwrap();
        let long = StoreKey::new("s", [7u8; 65]).unwrap();
        assert!(short.hash_tag().starts_with("{x"));
        assert!(long.hash_tag().starts_with("{h"));
        assert_ne!(short, long);
    }

    #[test]
    fn bad_scopes_are_typed_errors() {
        for scope in ["", "a:b", "a{b", "a b", "é", &"x".repeat(65)] {
            assert!(matches!(
                StoreKey::new(scope, b"t"),
                Err(StoreError::InvalidKey(_))
            ));
        }
    }

    #[test]
    fn rescope_matches_new() {
        for subject in [&b"t"[..], &[9u8; 100][..]] {
            let a = StoreKey::new("a", subject).unwrap();
            assert_eq!(
                a.rescope("b.c").unwrap(),
                StoreKey::new("b.c", subject).unwrap()
            );
        }
    }

    #[test]
    fn scope_and_tag() {
        let k = StoreKey::new("quota.tok", b"{}").unwrap();
        assert_eq!(k.scope(), "quota.tok");
        assert_eq!(k.hash_tag(), "{x7b7d}");
        assert_eq!(StoreKey::new("a", b"").unwrap().encoded(), "a:{x}");
    }
}
