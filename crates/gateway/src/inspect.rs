//! Cheap validation of OpenAI request bodies, without rewriting them.
//!
//! The body is scanned once by serde_json into a struct that borrows what it needs and skips the
//! rest: the JSON must be well formed, `model` must be a string, `messages` (chat) or `prompt`
//! (completions) must be present, and the text they hold is measured (never copied) to estimate
//! prompt tokens. The bytes are then forwarded exactly as received.

use std::fmt;

use replica_router::prefix::{PrefixHasher, PrefixHashes};
use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;

/// Which OpenAI route a body is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApiKind {
    /// `POST /v1/chat/completions` (needs `messages`).
    Chat,
    /// `POST /v1/completions` (needs `prompt`).
    Completion,
}

/// What the gateway learns from a valid body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BodyInfo {
    /// The `model` the request names.
    pub model: String,
    /// Estimated prompt tokens (text bytes / 4, plus one per token id, plus a few per message).
    pub prompt_tokens: u64,
    /// `max_completion_tokens` or `max_tokens`, if given.
    pub max_tokens: Option<u64>,
    /// Whether the client asked for a streamed (SSE) response.
    pub stream: bool,
    /// Fingerprints of the prompt's leading blocks (the strings of `messages` / `prompt`, in
    /// order), for cache-aware placement of requests with or without a session key. Hashing is
    /// bounded by [`PrefixHasher`]'s byte cap whatever the prompt.
    pub prefix: PrefixHashes,
    /// A digest of the conversation's stable leading part: every string of `messages` up to the
    /// end of the first `user` message (system prompt, tools, first question). Every turn of one
    /// conversation, replayed in full as chat clients do, has the same digest, so it can stand
    /// in for a session key the client did not send. `None` for completions and for chats with
    /// no user message.
    pub conversation: Option<u64>,
}

/// The `model` of any other JSON request body (`/v1/embeddings` and the like): `Ok(None)` when
/// the body has no `model` field, an error when it is not JSON or `model` is not a string.
///
/// ```
/// use replica_router_gateway::body_model;
/// assert_eq!(body_model(br#"{"model":"bge-m3","input":"hi"}"#).unwrap().as_deref(), Some("bge-m3"));
/// assert_eq!(body_model(br#"{"input":"hi"}"#).unwrap(), None);
/// assert!(body_model(br#"{"model":7}"#).is_err());
/// assert!(body_model(b"not json").is_err());
/// ```
pub fn body_model(body: &[u8]) -> Result<Option<String>, String> {
    #[derive(Deserialize)]
    struct ModelOnly<'a> {
        #[serde(default, borrow)]
        model: Option<Str<'a>>,
    }
    let probe: ModelOnly<'_> =
        serde_json::from_slice(body).map_err(|e| format!("invalid JSON body: {e}"))?;
    Ok(probe.model.map(|m| m.0.into_owned()))
}

/// Output tokens assumed when a request gives no `max_tokens`, for the route context's estimate.
pub const DEFAULT_OUTPUT_ESTIMATE: u64 = 256;

impl BodyInfo {
    /// Prompt plus expected output, for [`RouteContext::estimated_tokens`](replica_router::context::RouteContext).
    pub fn estimated_tokens(&self) -> u64 {
        self.prompt_tokens
            .saturating_add(self.max_tokens.unwrap_or(DEFAULT_OUTPUT_ESTIMATE))
    }

    /// Context the request needs on a replica, for
    /// [`RouteContext::context_tokens`](replica_router::context::RouteContext): the prompt
    /// estimate plus `max_tokens` when given (without it, engines generate into whatever
    /// context is left, so only the prompt must fit).
    pub fn context_tokens(&self) -> u64 {
        self.prompt_tokens
            .saturating_add(self.max_tokens.unwrap_or(0))
    }
}

/// Bytes of text per estimated token.
const BYTES_PER_TOKEN: u64 = 4;
/// Template tokens per chat message (role markers).
const TOKENS_PER_MESSAGE: u64 = 4;
/// Nesting limit inside `messages` / `prompt`.
const MAX_DEPTH: u32 = 32;

/// Validates `body` for `kind` and estimates its size.
///
/// ```
/// use replica_router_gateway::{inspect_body, ApiKind};
/// let ok = br#"{"model":"m","messages":[{"role":"user","content":"hello there, how are you?"}],"max_tokens":20}"#;
/// let info = inspect_body(ApiKind::Chat, ok).unwrap();
/// assert_eq!(info.max_tokens, Some(20));
/// assert!(info.prompt_tokens >= 6);
/// assert!(inspect_body(ApiKind::Chat, br#"{"model":"m"}"#).unwrap_err().contains("messages"));
/// assert!(inspect_body(ApiKind::Chat, br#"{"messages":[]}"#).unwrap_err().contains("model"));
/// assert!(inspect_body(ApiKind::Completion, b"{").is_err());
/// // Two turns of one conversation share their leading fingerprints.
/// let system = "You are a careful assistant. ".repeat(40);
/// let turn1 = format!(r#"{{"model":"m","messages":[{{"role":"system","content":"{system}"}},{{"role":"user","content":"hi"}}]}}"#);
/// let turn2 = format!(r#"{{"model":"m","messages":[{{"role":"system","content":"{system}"}},{{"role":"user","content":"hi"}},{{"role":"assistant","content":"hello"}},{{"role":"user","content":"more"}}]}}"#);
/// let (a, b) = (inspect_body(ApiKind::Chat, turn1.as_bytes()).unwrap(), inspect_body(ApiKind::Chat, turn2.as_bytes()).unwrap());
/// assert!(!a.prefix.is_empty());
/// assert_eq!(a.prefix.hashes()[0], b.prefix.hashes()[0]);
/// ```
pub fn inspect_body(kind: ApiKind, body: &[u8]) -> Result<BodyInfo, String> {
    let probe: Probe<'_> =
        serde_json::from_slice(body).map_err(|e| format!("invalid JSON body: {e}"))?;
    let model = match probe.model {
        Some(m) if !m.is_empty() => m.0.into_owned(),
        Some(_) => return Err("`model` must not be empty".into()),
        None => return Err("missing field `model`".into()),
    };
    let mut text = match kind {
        ApiKind::Chat => probe.messages.ok_or("missing field `messages`")?,
        ApiKind::Completion => probe.prompt.ok_or("missing field `prompt`")?,
    };
    if kind == ApiKind::Chat && !text.top_level_array {
        return Err("`messages` must be an array".into());
    }
    let per_message = if kind == ApiKind::Chat {
        TOKENS_PER_MESSAGE
    } else {
        0
    };
    let prompt_tokens =
        text.bytes / BYTES_PER_TOKEN + text.numbers + text.top_level_items * per_message;
    let hasher = std::mem::take(&mut text.hasher);
    let conversation = if kind == ApiKind::Chat {
        text.conversation
    } else {
        None
    };
    Ok(BodyInfo {
        model,
        conversation,
        prompt_tokens,
        max_tokens: probe.max_completion_tokens.or(probe.max_tokens),
        stream: probe.stream.unwrap_or(false),
        prefix: hasher.finish().with_tokens(prompt_tokens),
    })
}

#[derive(Deserialize)]
struct Probe<'a> {
    #[serde(default, borrow)]
    model: Option<Str<'a>>,
    #[serde(default)]
    messages: Option<TextSize>,
    #[serde(default)]
    prompt: Option<TextSize>,
    #[serde(default)]
    max_tokens: Option<u64>,
    #[serde(default)]
    max_completion_tokens: Option<u64>,
    #[serde(default)]
    stream: Option<bool>,
}

/// A string, borrowed from the body when it has no escapes; only its emptiness is looked at.
struct Str<'a>(std::borrow::Cow<'a, str>);

impl Str<'_> {
    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for Str<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Str<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(Str(std::borrow::Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                // Escaped strings come through a scratch buffer.
                Ok(Str(std::borrow::Cow::Owned(v.to_owned())))
            }
        }
        d.deserialize_str(V)
    }
}

/// A map key, borrowed when it has no escapes (an escaped key is never `role`).
struct Key<'a>(&'a str);

impl<'de> Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a key")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(Key(v))
            }
            fn visit_str<E: de::Error>(self, _: &str) -> Result<Self::Value, E> {
                Ok(Key(""))
            }
        }
        d.deserialize_str(V)
    }
}

/// The total size of the strings (and count of numbers) inside a JSON value, measured in one pass
/// without allocating.
#[derive(Default)]
struct TextSize {
    bytes: u64,
    numbers: u64,
    top_level_items: u64,
    top_level_array: bool,
    /// Fed every string in order, each followed by a record separator, so that `["ab","c"]` and
    /// `["a","bc"]` differ.
    hasher: PrefixHasher,
    /// Whether the top-level item being walked is a message with `"role": "user"`.
    item_is_user: bool,
    /// The hasher's digest at the end of the first user message.
    conversation: Option<u64>,
}

struct Walk<'s> {
    acc: &'s mut TextSize,
    depth: u32,
    /// The value being walked is a top-level message's `role`.
    role: bool,
}

impl<'de> de::DeserializeSeed<'de> for Walk<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Walk<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("text or token ids")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<(), E> {
        if self.role && v == "user" {
            self.acc.item_is_user = true;
        }
        self.acc.bytes += v.len() as u64;
        self.acc.hasher.feed(v.as_bytes());
        self.acc.hasher.feed(b"\x1e");
        Ok(())
    }

    fn visit_u64<E: de::Error>(self, _: u64) -> Result<(), E> {
        self.acc.numbers += 1;
        Ok(())
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<(), E> {
        self.acc.numbers += 1;
        Ok(())
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<(), E> {
        Ok(())
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
        Ok(())
    }

    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        if self.depth >= MAX_DEPTH {
            return Err(de::Error::custom("nested too deeply"));
        }
        let top = self.depth == 0;
        if top {
            self.acc.top_level_array = true;
        }
        while seq
            .next_element_seed(Walk {
                acc: self.acc,
                depth: self.depth + 1,
                role: false,
            })?
            .is_some()
        {
            if top {
                self.acc.top_level_items += 1;
                if std::mem::take(&mut self.acc.item_is_user) && self.acc.conversation.is_none() {
                    self.acc.conversation = Some(self.acc.hasher.digest());
                }
            }
        }
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        if self.depth >= MAX_DEPTH {
            return Err(de::Error::custom("nested too deeply"));
        }
        // A top-level message (depth 1 of the `messages` array): note its role.
        let message = self.depth == 1 && self.acc.top_level_array;
        while let Some(key) = map.next_key::<Key<'de>>()? {
            map.next_value_seed(Walk {
                acc: self.acc,
                depth: self.depth + 1,
                role: message && key.0 == "role",
            })?;
        }
        Ok(())
    }
}

impl<'de> Deserialize<'de> for TextSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let mut acc = TextSize::default();
        d.deserialize_any(Walk {
            acc: &mut acc,
            depth: 0,
            role: false,
        })?;
        Ok(acc)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chat(messages: &str) -> BodyInfo {
        let body = format!(r#"{{"model":"m","messages":[{messages}]}}"#);
        inspect_body(ApiKind::Chat, body.as_bytes()).unwrap()
    }

    #[test]
    fn a_conversation_keeps_its_digest_across_turns() {
        let sys = r#"{"role":"system","content":"You are terse."}"#;
        let t1 = chat(&format!(
            r#"{sys},{{"role":"user","content":"What is Rust?"}}"#
        ));
        let t2 = chat(&format!(
            r#"{sys},{{"role":"user","content":"What is Rust?"}},{{"role":"assistant","content":"A language."}},{{"role":"user","content":"More?"}}"#
        ));
        assert!(t1.conversation.is_some());
        assert_eq!(t1.conversation, t2.conversation);
        // Another first question, or another system prompt: another conversation.
        let other = chat(&format!(
            r#"{sys},{{"role":"user","content":"What is Go?"}}"#
        ));
        assert_ne!(t1.conversation, other.conversation);
        let other_sys = chat(
            r#"{"role":"system","content":"Be verbose."},{"role":"user","content":"What is Rust?"}"#,
        );
        assert_ne!(t1.conversation, other_sys.conversation);
        // Multi-part content and a role spelled with escapes are still user messages.
        let parts = chat(r#"{"role":"\u0075ser","content":[{"type":"text","text":"hi"}]}"#);
        assert!(parts.conversation.is_some());
        // No user message, or a completion: no conversation.
        assert_eq!(chat(sys).conversation, None);
        let c = inspect_body(ApiKind::Completion, br#"{"model":"m","prompt":"hi"}"#).unwrap();
        assert_eq!(c.conversation, None);
        // A nested "role" is not a message's role.
        let nested = chat(r#"{"role":"system","content":[{"role":"user","text":"x"}]}"#);
        assert_eq!(nested.conversation, None);
    }

    #[test]
    fn estimates_and_rejections() {
        let chat = br#"{"model":"m","stream":true,"messages":[{"role":"system","content":"You are terse."},
            {"role":"user","content":[{"type":"text","text":"abcdefghijklmnop"}]}]}"#;
        let i = inspect_body(ApiKind::Chat, chat).unwrap();
        assert!(i.stream);
        assert_eq!(i.max_tokens, None);
        assert!(i.prompt_tokens >= 8 + 8, "{i:?}");
        assert_eq!(
            i.estimated_tokens(),
            i.prompt_tokens + DEFAULT_OUTPUT_ESTIMATE
        );

        let ids = br#"{"model":"m","prompt":[1,2,3,4,5],"max_tokens":3}"#;
        assert_eq!(
            inspect_body(ApiKind::Completion, ids)
                .unwrap()
                .prompt_tokens,
            5
        );
        let s = br#"{"model":"m","prompt":"abcdefgh"}"#;
        assert_eq!(
            inspect_body(ApiKind::Completion, s).unwrap().prompt_tokens,
            2
        );

        for (kind, bad) in [
            (ApiKind::Chat, &b""[..]),
            (ApiKind::Chat, b"[]"),
            (ApiKind::Chat, b"{\"model\":\"m\",\"messages\":[}"),
            (ApiKind::Chat, b"{\"model\":\"m\",\"messages\":\"hi\"}"),
            (ApiKind::Chat, b"{\"model\":5,\"messages\":[]}"),
            (ApiKind::Chat, b"{\"model\":\"\",\"messages\":[]}"),
            (
                ApiKind::Chat,
                b"{\"model\":\"m\",\"messages\":[],\"stream\":\"yes\"}",
            ),
            (
                ApiKind::Chat,
                b"{\"model\":\"m\",\"messages\":[],\"max_tokens\":-4}",
            ),
            (ApiKind::Chat, b"{\"model\":\"m\",\"messages\":[]} trailing"),
            (ApiKind::Completion, b"{\"model\":\"m\",\"messages\":[]}"),
            (ApiKind::Chat, b"\xff\xfe"),
        ] {
            assert!(
                inspect_body(kind, bad).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        let deep = format!(
            "{{\"model\":\"m\",\"messages\":{}{}}}",
            "[".repeat(100),
            "]".repeat(100)
        );
        assert!(inspect_body(ApiKind::Chat, deep.as_bytes()).is_err());
        let escaped = br#"{"model":"m\u0031","messages":[{"content":"a\"b"}]}"#;
        assert!(inspect_body(ApiKind::Chat, escaped).is_ok());
    }
}
