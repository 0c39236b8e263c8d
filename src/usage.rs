//! What a replica generated, read from its OpenAI-style response as it streams.
//!
//! A token quota reserves a request's *estimate* at admission (its prompt plus `max_tokens`, or a
//! default when the client gives none); what the replica really produced is in its response:
//!
//! - a non-streamed JSON body carries `usage` (`prompt_tokens`, `completion_tokens`,
//!   `prompt_tokens_details.cached_tokens`);
//! - a streamed (SSE) body carries it in a final chunk when the client asked for
//!   `stream_options: {"include_usage": true}` (vLLM, SGLang and OpenAI all do this); without it,
//!   the number of `data:` events that carry non-empty generated text (`choices[].delta.content`,
//!   `choices[].text`, `reasoning_content` or tool-call `arguments`) is a close count of the
//!   generated tokens (engines send about one token per event).
//!
//! [`UsageScanner`] reads both, fed the body frame by frame as it is forwarded. It never buffers
//! the body, not even a line: it is a small byte-at-a-time lexer of fixed size (no allocation at
//! all), so frames may split the body anywhere and memory stays constant whatever the replica
//! sends. It recognises a key only where JSON allows one (a string outside any other string,
//! followed by `:`), so generated text that *mentions* `"completion_tokens": 5` is never
//! mistaken for usage (inside a JSON string every quote is escaped). A raw newline resets the
//! lexer (valid JSON never holds one inside a string; SSE events are one JSON object per line),
//! so one malformed event cannot confuse the next.
//!
//! [`TrackedBody::scan_usage`](crate::inflight::TrackedBody::scan_usage) runs a scanner over a
//! response body and, when the body ends, reports the engine's cached tokens to the replica's
//! work model and hands the [`Usage`] to a [`UsageSink`] (an application settling a token quota
//! through [`TokenReport`](crate::quota::TokenReport), for example) *before* the request's
//! completion observers run.
//!
//! ```
//! use replica_router::usage::UsageScanner;
//! let mut s = UsageScanner::new();
//! // Frames split anywhere, even inside a key.
//! s.feed(b"data: {\"choices\":[{\"delta\":{\"content\":\"Hel\"}}]}\n\ndata: {\"choices\":[{\"del");
//! s.feed(b"ta\":{\"content\":\"lo\"}}]}\n\ndata: {\"choices\":[],\"usage\":{\"prompt_tokens\":12,\"comp");
//! s.feed(b"letion_tokens\":2,\"prompt_tokens_details\":{\"cached_tokens\":8}}}\n\ndata: [DONE]\n\n");
//! let u = s.finish();
//! assert_eq!((u.prompt_tokens, u.completion_tokens, u.cached_tokens), (Some(12), Some(2), Some(8)));
//! assert_eq!(u.content_events, 2);
//! assert_eq!(u.output_tokens(), Some(2));
//! ```

use crate::inflight::Outcome;

/// What a response said about its tokens; see the [module docs](self).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// `usage.prompt_tokens`, if the response carried it (the last one seen wins).
    pub prompt_tokens: Option<u64>,
    /// `usage.completion_tokens`, if the response carried it.
    pub completion_tokens: Option<u64>,
    /// `usage.prompt_tokens_details.cached_tokens`, if the response carried it.
    pub cached_tokens: Option<u64>,
    /// SSE `data:` events that carried non-empty generated text.
    pub content_events: u64,
    /// Whether the body looked like an SSE stream (a line starting with `data:`).
    pub sse: bool,
}

impl Usage {
    /// The generated tokens: `completion_tokens` when the response said, else (for an SSE
    /// stream) the events that carried generated text, else `None` (unknown).
    ///
    /// ```
    /// use replica_router::usage::Usage;
    /// let u = Usage { completion_tokens: Some(7), content_events: 3, sse: true, ..Usage::default() };
    /// assert_eq!(u.output_tokens(), Some(7));
    /// let u = Usage { content_events: 3, sse: true, ..Usage::default() };
    /// assert_eq!(u.output_tokens(), Some(3));
    /// assert_eq!(Usage::default().output_tokens(), None);
    /// ```
    pub fn output_tokens(&self) -> Option<u64> {
        self.completion_tokens
            .or(self.sse.then_some(self.content_events))
    }

    /// Prompt plus generated tokens, with `prompt_estimate` standing in for the prompt when the
    /// response did not say; `None` when the generated tokens are unknown.
    ///
    /// ```
    /// use replica_router::usage::Usage;
    /// let u = Usage { prompt_tokens: Some(40), completion_tokens: Some(10), ..Usage::default() };
    /// assert_eq!(u.total_tokens(100), Some(50));
    /// let u = Usage { content_events: 10, sse: true, ..Usage::default() };
    /// assert_eq!(u.total_tokens(100), Some(110));
    /// ```
    pub fn total_tokens(&self, prompt_estimate: u64) -> Option<u64> {
        let out = self.output_tokens()?;
        Some(
            self.prompt_tokens
                .unwrap_or(prompt_estimate)
                .saturating_add(out),
        )
    }
}

/// Told what a response's body said about its tokens, when the body ends (see
/// [`TrackedBody::scan_usage`](crate::inflight::TrackedBody::scan_usage)).
pub trait UsageSink: Send + Sync + 'static {
    /// Called once, when the body ended with `outcome` (before the request's completion
    /// observers run).
    fn on_usage(&self, usage: &Usage, outcome: Outcome);
}

/// Longest string kept to compare with the keys of interest (the longest is
/// `reasoning_content`, 17 bytes).
const KEY_CAP: usize = 20;

/// Keys the scanner acts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Key {
    Prompt,
    Completion,
    Cached,
    /// A key whose non-empty string value is generated text.
    Text,
}

fn key_of(name: &[u8]) -> Option<Key> {
    match name {
        b"prompt_tokens" => Some(Key::Prompt),
        b"completion_tokens" => Some(Key::Completion),
        b"cached_tokens" => Some(Key::Cached),
        b"content" | b"text" | b"reasoning_content" | b"arguments" => Some(Key::Text),
        _ => None,
    }
}

/// Where the lexer is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Between tokens.
    Idle,
    /// Inside a string (`escaped`: the previous byte was a backslash).
    Str { escaped: bool },
    /// After a string, before a possible `:` (the string may be a key).
    AfterStr,
    /// After `key :`, before the value.
    Value(Key),
    /// Reading the digits of a number for a key.
    Number(Key),
    /// After `text-key : "`: the next byte says whether the text is empty.
    TextStart,
}

/// An incremental reader of OpenAI `usage` and SSE content events; see the [module docs](self).
///
/// Fixed size, no allocation; [`feed`](Self::feed) any split of the body, then
/// [`finish`](Self::finish).
#[derive(Debug, Clone)]
pub struct UsageScanner {
    state: State,
    /// The current string's first bytes (to recognise keys).
    name: [u8; KEY_CAP],
    name_len: u8,
    /// The current string is longer than `KEY_CAP` (cannot be a key of interest).
    name_long: bool,
    /// The key recognised after the last string, pending its `:`.
    pending: Option<Key>,
    number: u64,
    /// Bytes of the current line matched against `data:` (5 = matched; `u8::MAX` = not data).
    line_prefix: u8,
    /// The current line carried non-empty generated text.
    line_text: bool,
    usage: Usage,
}

impl Default for UsageScanner {
    fn default() -> Self {
        UsageScanner::new()
    }
}

const DATA: &[u8; 5] = b"data:";
const NOT_DATA: u8 = u8::MAX;

impl UsageScanner {
    /// A scanner at the start of a body.
    pub fn new() -> Self {
        UsageScanner {
            state: State::Idle,
            name: [0; KEY_CAP],
            name_len: 0,
            name_long: false,
            pending: None,
            number: 0,
            line_prefix: 0,
            line_text: false,
            usage: Usage::default(),
        }
    }

    /// Reads the next bytes of the body.
    pub fn feed(&mut self, bytes: &[u8]) {
        let mut i = 0;
        while i < bytes.len() {
            // Inside a string, skip to the next quote, backslash or newline at once.
            if let State::Str { escaped: false } = self.state {
                let rest = &bytes[i..];
                let n = rest
                    .iter()
                    .position(|&b| b == b'"' || b == b'\\' || b == b'\n')
                    .unwrap_or(rest.len());
                if n > 0 {
                    self.name_bytes(&rest[..n]);
                    if self.line_prefix < DATA.len() as u8 {
                        self.line_prefix = NOT_DATA;
                    }
                    i += n;
                    continue;
                }
            }
            self.byte(bytes[i]);
            i += 1;
        }
    }

    fn name_bytes(&mut self, b: &[u8]) {
        if self.name_long {
            return;
        }
        let len = self.name_len as usize;
        if len + b.len() > KEY_CAP {
            self.name_long = true;
        } else {
            self.name[len..len + b.len()].copy_from_slice(b);
            self.name_len = (len + b.len()) as u8;
        }
    }

    fn end_line(&mut self) {
        if self.line_prefix == DATA.len() as u8 && self.line_text {
            self.usage.content_events = self.usage.content_events.saturating_add(1);
        }
        self.line_prefix = 0;
        self.line_text = false;
    }

    fn start_string(&mut self) {
        self.state = State::Str { escaped: false };
        self.name_len = 0;
        self.name_long = false;
    }

    fn store(&mut self, key: Key, n: u64) {
        match key {
            Key::Prompt => self.usage.prompt_tokens = Some(n),
            Key::Completion => self.usage.completion_tokens = Some(n),
            Key::Cached => self.usage.cached_tokens = Some(n),
            Key::Text => {}
        }
    }

    fn byte(&mut self, b: u8) {
        if b == b'\n' {
            if let State::Number(key) = self.state {
                self.store(key, self.number);
            }
            self.state = State::Idle;
            self.pending = None;
            self.end_line();
            return;
        }
        // Track whether the line starts with `data:`.
        let p = self.line_prefix;
        if p < DATA.len() as u8 {
            if b == DATA[p as usize] {
                self.line_prefix = p + 1;
                if self.line_prefix == DATA.len() as u8 {
                    self.usage.sse = true;
                }
            } else if !(p == 0 && b == b'\r') {
                self.line_prefix = NOT_DATA;
            }
        }
        match self.state {
            State::Str { escaped: true } => {
                self.state = State::Str { escaped: false };
                // An escaped byte: keep the name honest (a key with escapes is not ours).
                self.name_long = true;
            }
            State::Str { escaped: false } => match b {
                b'"' => {
                    self.pending = if self.name_long {
                        None
                    } else {
                        key_of(&self.name[..self.name_len as usize])
                    };
                    self.state = State::AfterStr;
                }
                b'\\' => self.state = State::Str { escaped: true },
                _ => self.name_bytes(&[b]),
            },
            State::AfterStr => match b {
                b' ' | b'\t' | b'\r' => {}
                b':' => {
                    self.state = match self.pending.take() {
                        Some(k) => State::Value(k),
                        None => State::Idle,
                    }
                }
                _ => {
                    self.pending = None;
                    self.state = State::Idle;
                    self.idle(b);
                }
            },
            State::Value(key) => match (b, key) {
                (b' ' | b'\t' | b'\r', _) => {}
                (b'0'..=b'9', Key::Prompt | Key::Completion | Key::Cached) => {
                    self.number = u64::from(b - b'0');
                    self.state = State::Number(key);
                }
                (b'"', Key::Text) => {
                    self.start_string();
                    self.state = State::TextStart;
                }
                _ => {
                    self.state = State::Idle;
                    self.idle(b);
                }
            },
            State::Number(key) => match b {
                b'0'..=b'9' => {
                    self.number = self
                        .number
                        .saturating_mul(10)
                        .saturating_add(u64::from(b - b'0'));
                }
                // Not an integer: no token count.
                b'.' | b'e' | b'E' | b'-' | b'+' => self.state = State::Idle,
                _ => {
                    self.store(key, self.number);
                    self.state = State::Idle;
                    self.idle(b);
                }
            },
            State::TextStart => {
                if b != b'"' {
                    self.line_text = true;
                }
                self.state = State::Str { escaped: false };
                self.byte_in_string(b);
            }
            State::Idle => self.idle(b),
        }
    }

    /// `b` seen as the first byte inside a string.
    fn byte_in_string(&mut self, b: u8) {
        match b {
            b'"' => {
                self.pending = None;
                self.state = State::AfterStr;
            }
            b'\\' => self.state = State::Str { escaped: true },
            _ => self.name_bytes(&[b]),
        }
    }

    fn idle(&mut self, b: u8) {
        if b == b'"' {
            self.start_string();
        }
    }

    /// What the body said so far. A number still being read counts as ended (a body whose
    /// last bytes are the count, with no newline or `}` after it).
    pub fn usage(&self) -> Usage {
        let mut u = self.usage;
        if let State::Number(key) = self.state {
            match key {
                Key::Prompt => u.prompt_tokens = Some(self.number),
                Key::Completion => u.completion_tokens = Some(self.number),
                Key::Cached => u.cached_tokens = Some(self.number),
                Key::Text => {}
            }
        }
        if self.line_prefix == DATA.len() as u8 && self.line_text {
            u.content_events = u.content_events.saturating_add(1);
        }
        u
    }

    /// Ends the body (a last line without its newline counts) and returns what it said.
    pub fn finish(&mut self) -> Usage {
        let u = self.usage();
        *self = UsageScanner::new();
        u
    }
}

/// A scanner and where its result goes, for [`TrackedBody`](crate::inflight::TrackedBody).
pub(crate) struct UsageScan {
    pub(crate) scanner: UsageScanner,
    pub(crate) sink: Option<Box<dyn UsageSink>>,
}

impl std::fmt::Debug for UsageScan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UsageScan")
            .field("scanner", &self.scanner)
            .field("sink", &self.sink.is_some())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn scan(parts: &[&[u8]]) -> Usage {
        let mut s = UsageScanner::new();
        for p in parts {
            s.feed(p);
        }
        s.finish()
    }

    const JSON: &[u8] = br#"{
  "id": "cmpl-1",
  "object": "chat.completion",
  "choices": [{"index": 0, "message": {"role": "assistant", "content": "He said \"completion_tokens\": 999 and \\"}, "finish_reason": "stop"}],
  "usage": {"prompt_tokens": 1234, "completion_tokens": 56, "total_tokens": 1290,
            "prompt_tokens_details": {"cached_tokens": 1024}, "completion_tokens_details": null}
}"#;

    fn sse_stream(tokens: usize, usage: bool) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(b"data: {\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"}}]}\n\n");
        for i in 0..tokens {
            v.extend_from_slice(
                format!("data: {{\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"tok\\\"{i} \"}},\"finish_reason\":null}}]}}\r\n\r\n")
                    .as_bytes(),
            );
        }
        v.extend_from_slice(
            b"data: {\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"length\"}]}\n\n",
        );
        if usage {
            v.extend_from_slice(b"data: {\"choices\":[],\"usage\":{\"prompt_tokens\":40,\"completion_tokens\":7,\"prompt_tokens_details\":{\"cached_tokens\":32}}}\n\n");
        }
        v.extend_from_slice(b"data: [DONE]\n\n");
        v
    }

    #[test]
    fn json_body_usage_and_text_that_mentions_keys() {
        let u = scan(&[JSON]);
        assert_eq!(u.prompt_tokens, Some(1234));
        assert_eq!(u.completion_tokens, Some(56));
        assert_eq!(u.cached_tokens, Some(1024));
        assert!(!u.sse);
        assert_eq!(u.output_tokens(), Some(56));
        // Compact, with the count as the very last bytes of the body.
        let u = scan(&[br#"{"usage":{"completion_tokens":9}"#, b"}"]);
        assert_eq!(u.completion_tokens, Some(9));
        let u = scan(&[br#"{"completion_tokens":12"#]);
        assert_eq!(u.completion_tokens, Some(12));
    }

    #[test]
    fn sse_with_and_without_usage() {
        let u = scan(&[&sse_stream(7, true)]);
        assert!(u.sse);
        assert_eq!(u.content_events, 7);
        assert_eq!(
            (u.prompt_tokens, u.completion_tokens, u.cached_tokens),
            (Some(40), Some(7), Some(32))
        );
        let u = scan(&[&sse_stream(5, false)]);
        assert_eq!(u.content_events, 5);
        assert_eq!(u.completion_tokens, None);
        assert_eq!(u.output_tokens(), Some(5));
        assert_eq!(u.total_tokens(100), Some(105));
        // vLLM's `"usage": null` chunks and completions' `text` deltas.
        let u = scan(&[b"data: {\"choices\":[{\"text\":\"a\"}],\"usage\":null}\n\ndata: {\"choices\":[{\"text\":\"\"}],\"usage\":null}\n\n"]);
        assert_eq!((u.content_events, u.completion_tokens), (1, None));
    }

    #[test]
    fn malformed_lines_do_not_leak_into_the_next() {
        // An unterminated string on one line; the next line's usage still reads.
        let u = scan(&[
            b"data: {\"content\":\"oops\n",
            b"data: {\"completion_tokens\":3}\n",
        ]);
        assert_eq!(u.completion_tokens, Some(3));
        assert_eq!(u.content_events, 1);
        // Floats and negative numbers are not counts; huge ones saturate.
        let u = scan(&[br#"{"completion_tokens":1.5,"prompt_tokens":-3,"cached_tokens":99999999999999999999999}"#]);
        assert_eq!(u.completion_tokens, None);
        assert_eq!(u.prompt_tokens, None);
        assert_eq!(u.cached_tokens, Some(u64::MAX));
        // A value named like a key is not a key.
        let u = scan(&[br#"{"content":"completion_tokens","x":["completion_tokens",4]}"#]);
        assert_eq!(u.completion_tokens, None);
    }

    #[test]
    fn the_scanner_is_small_and_never_allocates() {
        assert!(std::mem::size_of::<UsageScanner>() <= 128);
    }

    proptest! {
        #[test]
        fn any_split_reads_the_same(
            tokens in 0usize..40,
            usage in any::<bool>(),
            json in any::<bool>(),
            cuts in proptest::collection::vec(any::<usize>(), 0..20),
        ) {
            let body = if json { JSON.to_vec() } else { sse_stream(tokens, usage) };
            let whole = scan(&[&body]);
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c % (body.len() + 1)).collect();
            cuts.sort_unstable();
            let mut s = UsageScanner::new();
            let mut at = 0;
            for c in cuts {
                s.feed(&body[at..c]);
                at = c;
            }
            s.feed(&body[at..]);
            prop_assert_eq!(s.finish(), whole);
            if !json {
                prop_assert_eq!(whole.content_events, tokens as u64);
            }
        }

        #[test]
        fn arbitrary_bytes_never_panic(
            frames in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..200), 0..20),
        ) {
            let mut s = UsageScanner::new();
            for f in &frames {
                s.feed(f);
            }
            let u = s.finish();
            let total: usize = frames.iter().map(Vec::len).sum();
            prop_assert!(u.content_events <= total as u64);
        }

        #[test]
        fn arbitrary_text_in_strings_does_not_fake_usage(text in "\\PC{0,80}") {
            let mut escaped = String::new();
            crate::error::json_escape_into(&text, &mut escaped);
            let body = format!("data: {{\"choices\":[{{\"delta\":{{\"content\":\"{escaped}\"}}}}]}}\n\n");
            let u = scan(&[body.as_bytes()]);
            prop_assert_eq!(u.completion_tokens, None);
            prop_assert_eq!(u.prompt_tokens, None);
            prop_assert_eq!(u.content_events, u64::from(!text.is_empty()));
        }
    }
}
