//! A parser for the Prometheus text exposition format, and vLLM's load gauges read from it.
//!
//! # The format
//!
//! One sample per line (`\n` or `\r\n` line ends):
//!
//! ```text
//! # HELP vllm:num_requests_running Number of requests in model execution batches.
//! # TYPE vllm:num_requests_running gauge
//! vllm:num_requests_running{engine="0",model_name="llama \"3\""} 4.0 1712345678000
//! ```
//!
//! - a metric name `[a-zA-Z_:][a-zA-Z0-9_:]*`, or (Prometheus 3 UTF-8 names) a quoted name as the
//!   first entry inside the braces: `{"my.metric", a="b"}`;
//! - an optional label set `{name="value",...}` (a trailing comma is allowed, label names may be
//!   quoted too); label values escape `\\`, `\"` and `\n`, any other escape is an error;
//! - a value as Go's `ParseFloat` writes it: `1`, `-2.5e-3`, `NaN`, `+Inf`, `-Inf`;
//! - an optional timestamp (integer milliseconds; a float, as OpenMetrics writes seconds, is
//!   accepted and returned as written);
//! - an optional OpenMetrics exemplar after ` # `, ignored;
//! - `#` lines are comments (`# HELP`, `# TYPE`, `# EOF` included), blank lines are skipped; blanks
//!   (space, tab) may separate every token.
//!
//! [`Samples`] walks the text without allocating: names and label values are returned as
//! [`Text`] slices of the input, decoded only on request ([`Text::unescape`], which borrows when
//! there is nothing to decode) or compared in place ([`Text::eq_bytes`]). Any byte sequence is
//! accepted as input: malformed lines give a [`SyntaxError`] with the line number, never a panic
//! (the `fuzz/` target `prometheus_parse` checks this).
//!
//! # vLLM
//!
//! [`VllmParser`] reads the gauges a vLLM server exports into a [`LoadReport`] (and, with
//! [`VllmParser::parse_full`], the prefix-cache counters beside it):
//!
//! | metric | report field | across label sets |
//! |---|---|---|
//! | `vllm:num_requests_running` | [`LoadReport::running`] | summed |
//! | `vllm:num_requests_waiting` | [`LoadReport::waiting`] | summed |
//! | `vllm:kv_cache_usage_perc` (or, on older engines, `vllm:gpu_cache_usage_perc`) | [`LoadReport::kv_usage`] | averaged |
//! | `vllm:prefix_cache_hits_total`, `vllm:prefix_cache_queries_total` | [`VllmLoad::prefix_cache`] | summed |
//!
//! vLLM labels each sample with `model_name` (and `engine` when one server runs several data-parallel
//! engines). With [`VllmParser::model_name`] set, only samples whose `model_name` label equals it
//! count; otherwise every label set counts. KV usage is a fraction (`1.0` = full, despite the name),
//! averaged over engines because each engine owns its own cache, and clamped to `0..=1`.
//!
//! The prefix `vllm_` is read like `vllm:`: Python's `prometheus_client` (which vLLM uses) writes
//! `vllm_num_requests_running` when a scraper negotiates OpenMetrics, replacing the colon.

use std::borrow::Cow;
use std::fmt;

use tokio::time::Instant;

use super::{LoadReport, PrefixCacheCounters};

/// What is wrong with a line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum SyntaxErrorKind {
    /// A metric name is missing, or starts with a character names cannot start with.
    InvalidMetricName,
    /// The metric name was given twice (bare and quoted inside the braces).
    DuplicateMetricName,
    /// A label name is missing or malformed.
    InvalidLabelName,
    /// A label name is not followed by `=`.
    ExpectedEquals,
    /// A label value does not start with `"`.
    ExpectedQuote,
    /// A quoted string does not end on its line.
    UnterminatedString,
    /// A backslash in a quoted string is followed by something other than `\`, `"` or `n`.
    InvalidEscape,
    /// A label is not followed by `,` or `}`.
    ExpectedCommaOrBrace,
    /// The name is followed by something other than a blank or `{`.
    ExpectedBlank,
    /// The sample has no value.
    MissingValue,
    /// The value is not a number.
    InvalidValue,
    /// The timestamp is not a number.
    InvalidTimestamp,
    /// Something follows the timestamp that is not an exemplar.
    TrailingCharacters,
}

impl SyntaxErrorKind {
    fn as_str(self) -> &'static str {
        match self {
            SyntaxErrorKind::InvalidMetricName => "invalid or missing metric name",
            SyntaxErrorKind::DuplicateMetricName => "metric name given twice",
            SyntaxErrorKind::InvalidLabelName => "invalid or missing label name",
            SyntaxErrorKind::ExpectedEquals => "expected '=' after label name",
            SyntaxErrorKind::ExpectedQuote => "expected '\"' to open label value",
            SyntaxErrorKind::UnterminatedString => "unterminated quoted string",
            SyntaxErrorKind::InvalidEscape => "invalid escape sequence",
            SyntaxErrorKind::ExpectedCommaOrBrace => "expected ',' or '}' after label",
            SyntaxErrorKind::ExpectedBlank => "expected blank or '{' after metric name",
            SyntaxErrorKind::MissingValue => "missing sample value",
            SyntaxErrorKind::InvalidValue => "sample value is not a number",
            SyntaxErrorKind::InvalidTimestamp => "timestamp is not a number",
            SyntaxErrorKind::TrailingCharacters => "unexpected characters after sample",
        }
    }
}

/// A malformed line in an exposition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("line {line}, column {column}: {}", kind.as_str())]
pub struct SyntaxError {
    /// 1-based line number.
    pub line: usize,
    /// 1-based byte column in the line.
    pub column: usize,
    /// What is wrong.
    pub kind: SyntaxErrorKind,
}

/// Why a vLLM load report could not be read.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum LoadParseError {
    /// The text is not valid Prometheus exposition.
    #[error("malformed exposition: {0}")]
    Syntax(#[from] SyntaxError),
    /// A required metric is absent (or no sample of it matched the model filter).
    #[error("metric {0} not found")]
    MissingMetric(&'static str),
    /// A metric has a value it cannot have (negative or non-finite count, NaN usage).
    #[error("metric {metric} on line {line} has an invalid value {value}")]
    InvalidValue {
        /// The metric.
        metric: &'static str,
        /// 1-based line number.
        line: usize,
        /// The value found.
        value: f64,
    },
}

/// A name or label value as written in the exposition, possibly with escapes still in it.
///
/// Comparing ([`Text::eq_bytes`]) decodes on the fly; [`Text::unescape`] only allocates when the
/// text has escapes.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Text<'a> {
    raw: &'a [u8],
    escaped: bool,
}

impl<'a> Text<'a> {
    /// The bytes as written (without the surrounding quotes, escapes not decoded).
    pub fn raw(&self) -> &'a [u8] {
        self.raw
    }

    /// Whether the raw bytes contain escape sequences.
    pub fn has_escapes(&self) -> bool {
        self.escaped
    }

    /// The decoded bytes: borrowed when there is nothing to decode.
    pub fn unescape(&self) -> Cow<'a, [u8]> {
        if !self.escaped {
            return Cow::Borrowed(self.raw);
        }
        Cow::Owned(Unescape::new(self.raw).collect())
    }

    /// The decoded text as a string, with invalid UTF-8 replaced by U+FFFD.
    pub fn to_string_lossy(&self) -> Cow<'a, str> {
        match self.unescape() {
            Cow::Borrowed(b) => String::from_utf8_lossy(b),
            Cow::Owned(v) => Cow::Owned(String::from_utf8_lossy(&v).into_owned()),
        }
    }

    /// Whether the decoded text equals `other`, without allocating.
    pub fn eq_bytes(&self, other: &[u8]) -> bool {
        if !self.escaped {
            return self.raw == other;
        }
        Unescape::new(self.raw).eq(other.iter().copied())
    }
}

impl fmt::Debug for Text<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.to_string_lossy(), f)
    }
}

/// Decodes `\\`, `\"`, `\n` in already validated text.
struct Unescape<'a> {
    raw: &'a [u8],
    i: usize,
}

impl<'a> Unescape<'a> {
    fn new(raw: &'a [u8]) -> Self {
        Unescape { raw, i: 0 }
    }
}

impl Iterator for Unescape<'_> {
    type Item = u8;

    fn next(&mut self) -> Option<u8> {
        let b = *self.raw.get(self.i)?;
        self.i += 1;
        if b != b'\\' {
            return Some(b);
        }
        let e = *self.raw.get(self.i)?;
        self.i += 1;
        Some(if e == b'n' { b'\n' } else { e })
    }
}

/// One sample line.
#[derive(Debug, Clone, Copy)]
pub struct Sample<'a> {
    /// The metric name.
    pub name: Text<'a>,
    /// The sample value.
    pub value: f64,
    /// The timestamp as written, if any (milliseconds in the Prometheus text format).
    pub timestamp: Option<f64>,
    /// 1-based line number.
    pub line: usize,
    /// The bytes between the braces (already validated).
    labels: &'a [u8],
}

impl<'a> Sample<'a> {
    /// The labels, in the order written (a quoted metric name inside the braces is skipped).
    pub fn labels(&self) -> Labels<'a> {
        Labels {
            cur: Cursor::new(self.labels),
        }
    }

    /// The value of label `name`, if present.
    pub fn label(&self, name: &str) -> Option<Text<'a>> {
        self.labels()
            .find(|(n, _)| n.eq_bytes(name.as_bytes()))
            .map(|(_, v)| v)
    }
}

/// Iterator over a sample's `(name, value)` labels.
#[derive(Debug, Clone)]
pub struct Labels<'a> {
    cur: Cursor<'a>,
}

impl<'a> Iterator for Labels<'a> {
    type Item = (Text<'a>, Text<'a>);

    fn next(&mut self) -> Option<Self::Item> {
        // The label bytes were validated by the line parser; any surprise ends the iteration.
        loop {
            let entry = parse_label_entry(&mut self.cur).ok()??;
            self.cur.skip_blanks();
            if self.cur.peek() == Some(b',') {
                self.cur.bump();
            }
            match entry {
                Entry::Label(n, v) => return Some((n, v)),
                Entry::Name(_) => continue,
            }
        }
    }
}

#[derive(Debug, Clone)]
struct Cursor<'a> {
    b: &'a [u8],
    i: usize,
}

impl<'a> Cursor<'a> {
    fn new(b: &'a [u8]) -> Self {
        Cursor { b, i: 0 }
    }
    fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }
    fn bump(&mut self) {
        self.i += 1;
    }
    fn skip_blanks(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t')) {
            self.i += 1;
        }
    }
    fn at_end(&self) -> bool {
        self.i >= self.b.len()
    }
    /// Takes bytes while `f` holds.
    fn take_while(&mut self, f: impl Fn(u8) -> bool) -> &'a [u8] {
        let start = self.i.min(self.b.len());
        while self.peek().is_some_and(&f) {
            self.i += 1;
        }
        self.b.get(start..self.i).unwrap_or(&[])
    }
    /// Takes a token up to the next blank.
    fn token(&mut self) -> &'a [u8] {
        self.take_while(|c| c != b' ' && c != b'\t')
    }
}

fn is_name_start(c: u8) -> bool {
    c.is_ascii_alphabetic() || c == b'_' || c == b':'
}
fn is_name_char(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_' || c == b':'
}
fn is_label_start(c: u8) -> bool {
    c.is_ascii_alphabetic() || c == b'_'
}
fn is_label_char(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_'
}

/// Reads a quoted string; the cursor is on the opening quote.
fn parse_quoted<'a>(cur: &mut Cursor<'a>) -> Result<Text<'a>, (usize, SyntaxErrorKind)> {
    cur.bump();
    let start = cur.i;
    let mut escaped = false;
    loop {
        match cur.peek() {
            None => return Err((cur.i, SyntaxErrorKind::UnterminatedString)),
            Some(b'"') => {
                let raw = cur.b.get(start..cur.i).unwrap_or(&[]);
                cur.bump();
                return Ok(Text { raw, escaped });
            }
            Some(b'\\') => {
                cur.bump();
                match cur.peek() {
                    Some(b'\\' | b'"' | b'n') => {
                        escaped = true;
                        cur.bump();
                    }
                    None => return Err((cur.i, SyntaxErrorKind::UnterminatedString)),
                    Some(_) => return Err((cur.i, SyntaxErrorKind::InvalidEscape)),
                }
            }
            Some(_) => cur.bump(),
        }
    }
}

enum Entry<'a> {
    Label(Text<'a>, Text<'a>),
    Name(Text<'a>),
}

/// Parses one entry inside braces, `Ok(None)` at the closing brace (or end of the label bytes).
/// The cursor is left after the entry, before any `,`.
fn parse_label_entry<'a>(
    cur: &mut Cursor<'a>,
) -> Result<Option<Entry<'a>>, (usize, SyntaxErrorKind)> {
    cur.skip_blanks();
    let name = match cur.peek() {
        None | Some(b'}') => return Ok(None),
        Some(b'"') => {
            let quoted = parse_quoted(cur)?;
            cur.skip_blanks();
            if cur.peek() != Some(b'=') {
                return Ok(Some(Entry::Name(quoted)));
            }
            quoted
        }
        Some(c) if is_label_start(c) => Text {
            raw: cur.take_while(is_label_char),
            escaped: false,
        },
        Some(_) => return Err((cur.i, SyntaxErrorKind::InvalidLabelName)),
    };
    cur.skip_blanks();
    if cur.peek() != Some(b'=') {
        return Err((cur.i, SyntaxErrorKind::ExpectedEquals));
    }
    cur.bump();
    cur.skip_blanks();
    if cur.peek() != Some(b'"') {
        return Err((cur.i, SyntaxErrorKind::ExpectedQuote));
    }
    let value = parse_quoted(cur)?;
    Ok(Some(Entry::Label(name, value)))
}

/// Parses a number token the way Go's `ParseFloat` accepts the values Prometheus writes.
fn parse_number(tok: &[u8]) -> Option<f64> {
    // Rust's float grammar covers decimal, exponent, `NaN`, `Inf`/`Infinity` (any case, signed);
    // it is ASCII-only, so non-UTF-8 tokens are not numbers anyway.
    std::str::from_utf8(tok).ok()?.parse::<f64>().ok()
}

/// Parses one non-comment, non-blank line.
fn parse_sample_line(line: &[u8], lineno: usize) -> Result<Sample<'_>, SyntaxError> {
    parse_sample_inner(line, lineno).map_err(|(col, kind)| SyntaxError {
        line: lineno,
        column: col + 1,
        kind,
    })
}

fn parse_sample_inner(line: &[u8], lineno: usize) -> Result<Sample<'_>, (usize, SyntaxErrorKind)> {
    let mut cur = Cursor::new(line);
    cur.skip_blanks();
    let mut name = match cur.peek() {
        Some(c) if is_name_start(c) => Some(Text {
            raw: cur.take_while(is_name_char),
            escaped: false,
        }),
        Some(b'{') => None,
        _ => return Err((cur.i, SyntaxErrorKind::InvalidMetricName)),
    };
    let mut labels: &[u8] = &[];
    match cur.peek() {
        Some(b'{') => {
            cur.bump();
            let start = cur.i;
            loop {
                let at = cur.i;
                match parse_label_entry(&mut cur)? {
                    None => break,
                    Some(Entry::Name(n)) => {
                        if name.is_some() {
                            return Err((at, SyntaxErrorKind::DuplicateMetricName));
                        }
                        name = Some(n);
                    }
                    Some(Entry::Label(..)) => {}
                }
                cur.skip_blanks();
                match cur.peek() {
                    Some(b',') => cur.bump(),
                    Some(b'}') => break,
                    _ => return Err((cur.i, SyntaxErrorKind::ExpectedCommaOrBrace)),
                }
            }
            if cur.peek() != Some(b'}') {
                return Err((cur.i, SyntaxErrorKind::ExpectedCommaOrBrace));
            }
            labels = cur.b.get(start..cur.i).unwrap_or(&[]);
            cur.bump();
        }
        Some(b' ' | b'\t') => {}
        None => return Err((cur.i, SyntaxErrorKind::MissingValue)),
        Some(_) => return Err((cur.i, SyntaxErrorKind::ExpectedBlank)),
    }
    let name = name.ok_or((0, SyntaxErrorKind::InvalidMetricName))?;
    cur.skip_blanks();
    let at = cur.i;
    let tok = cur.token();
    if tok.is_empty() {
        return Err((at, SyntaxErrorKind::MissingValue));
    }
    let value = parse_number(tok).ok_or((at, SyntaxErrorKind::InvalidValue))?;
    cur.skip_blanks();
    let mut timestamp = None;
    if !cur.at_end() && cur.peek() != Some(b'#') {
        let at = cur.i;
        let tok = cur.token();
        let ts = parse_number(tok)
            .filter(|t| t.is_finite())
            .ok_or((at, SyntaxErrorKind::InvalidTimestamp))?;
        timestamp = Some(ts);
        cur.skip_blanks();
    }
    // Anything left must be an OpenMetrics exemplar (` # {...} value [ts]`), which is ignored.
    if !cur.at_end() && cur.peek() != Some(b'#') {
        return Err((cur.i, SyntaxErrorKind::TrailingCharacters));
    }
    Ok(Sample {
        name,
        value,
        timestamp,
        line: lineno,
        labels,
    })
}

/// Iterator over the samples of an exposition; comments and blank lines are skipped.
///
/// A malformed line yields one `Err` and iteration goes on with the next line.
///
/// ```
/// use replica_router::load::prometheus::Samples;
/// let text = b"# TYPE up gauge\r\nup{job=\"a\\\"b\"} 1 1700000000000\r\n\r\nbad line\n";
/// let mut it = Samples::new(text);
/// let s = it.next().unwrap().unwrap();
/// assert!(s.name.eq_bytes(b"up"));
/// assert!(s.label("job").unwrap().eq_bytes(b"a\"b"));
/// assert_eq!(s.timestamp, Some(1.7e12));
/// assert_eq!(it.next().unwrap().unwrap_err().line, 4);
/// assert!(it.next().is_none());
/// ```
#[derive(Debug, Clone)]
pub struct Samples<'a> {
    input: &'a [u8],
    pos: usize,
    line: usize,
}

impl<'a> Samples<'a> {
    /// Walks `input`, which may be any bytes.
    pub fn new(input: &'a [u8]) -> Self {
        Samples {
            input,
            pos: 0,
            line: 0,
        }
    }
}

impl<'a> Iterator for Samples<'a> {
    type Item = Result<Sample<'a>, SyntaxError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            let rest = self.input.get(self.pos..)?;
            if rest.is_empty() {
                return None;
            }
            let (mut line, advance) = match rest.iter().position(|&b| b == b'\n') {
                Some(n) => (&rest[..n], n + 1),
                None => (rest, rest.len()),
            };
            self.pos += advance;
            self.line += 1;
            if let [head @ .., b'\r'] = line {
                line = head;
            }
            let first = line.iter().position(|&b| b != b' ' && b != b'\t');
            match first.map(|i| line[i]) {
                None | Some(b'#') => continue,
                Some(_) => return Some(parse_sample_line(line, self.line)),
            }
        }
    }
}

/// Checks a whole exposition, returning the first syntax error.
///
/// ```
/// use replica_router::load::prometheus::validate;
/// assert!(validate(b"a 1\nb{x=\"y\"} NaN\n").is_ok());
/// assert!(validate(b"a{x=y} 1").is_err());
/// ```
pub fn validate(input: &[u8]) -> Result<(), SyntaxError> {
    Samples::new(input).try_for_each(|s| s.map(|_| ()))
}

const RUNNING: &str = "vllm:num_requests_running";
const WAITING: &str = "vllm:num_requests_waiting";
const KV_USAGE: &str = "vllm:kv_cache_usage_perc";
const KV_USAGE_OLD: &str = "vllm:gpu_cache_usage_perc";
const PREFIX_HITS: &str = "vllm:prefix_cache_hits_total";
const PREFIX_QUERIES: &str = "vllm:prefix_cache_queries_total";

/// What [`VllmParser::parse_full`] reads: the load report and the prefix-cache counters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct VllmLoad {
    /// Running and waiting requests, KV usage.
    pub report: LoadReport,
    /// `vllm:prefix_cache_hits_total` and `vllm:prefix_cache_queries_total`, when both are
    /// present.
    pub prefix_cache: Option<PrefixCacheCounters>,
}

/// Reads vLLM's `/metrics` text into a [`LoadReport`].
///
/// ```
/// use replica_router::load::prometheus::{LoadParseError, VllmParser};
/// use tokio::time::Instant;
/// let text = b"vllm:num_requests_running{model_name=\"a\"} 2\n\
///              vllm:num_requests_running{model_name=\"b\"} 5\n\
///              vllm:num_requests_waiting{model_name=\"a\"} 0\n\
///              vllm:num_requests_waiting{model_name=\"b\"} 7\n";
/// let now = Instant::now();
/// let all = VllmParser::new().parse(text, now).unwrap();
/// assert_eq!((all.running, all.waiting), (7, 7));
/// let b = VllmParser::new().model_name("b").parse(text, now).unwrap();
/// assert_eq!((b.running, b.waiting), (5, 7));
/// assert_eq!(
///     VllmParser::new().model_name("c").parse(text, now),
///     Err(LoadParseError::MissingMetric("vllm:num_requests_running"))
/// );
/// ```
#[derive(Debug, Clone, Default)]
pub struct VllmParser {
    model_name: Option<Box<[u8]>>,
}

#[derive(Default)]
struct Acc {
    running: Option<f64>,
    waiting: Option<f64>,
    kv: (f64, u32),
    kv_old: (f64, u32),
    hits: Option<f64>,
    queries: Option<f64>,
}

fn count_value(metric: &'static str, s: &Sample<'_>) -> Result<f64, LoadParseError> {
    if s.value.is_finite() && s.value >= 0.0 {
        Ok(s.value)
    } else {
        Err(LoadParseError::InvalidValue {
            metric,
            line: s.line,
            value: s.value,
        })
    }
}

fn add(slot: &mut Option<f64>, v: f64) {
    *slot = Some(slot.unwrap_or(0.0) + v);
}

impl VllmParser {
    /// A parser that sums over every label set.
    pub fn new() -> Self {
        VllmParser::default()
    }

    /// Counts only samples whose `model_name` label equals `name` (samples without the label are
    /// skipped too).
    pub fn model_name(mut self, name: impl AsRef<str>) -> Self {
        self.model_name = Some(name.as_ref().as_bytes().into());
        self
    }

    fn matches(&self, s: &Sample<'_>) -> bool {
        match &self.model_name {
            None => true,
            Some(want) => s.label("model_name").is_some_and(|v| v.eq_bytes(want)),
        }
    }

    /// Parses `input` (any bytes) into a report stamped `observed_at`.
    ///
    /// See [`parse_full`](Self::parse_full) for the rules.
    pub fn parse(&self, input: &[u8], observed_at: Instant) -> Result<LoadReport, LoadParseError> {
        self.parse_full(input, observed_at).map(|l| l.report)
    }

    /// Parses `input` (any bytes) into a report stamped `observed_at`, plus the prefix-cache
    /// counters when the engine exports them.
    ///
    /// Both `vllm:num_requests_running` and `vllm:num_requests_waiting` must be present (after the
    /// model filter); the KV gauge and prefix-cache counters are optional. A count must be finite
    /// and non-negative, KV usage must not be NaN.
    pub fn parse_full(
        &self,
        input: &[u8],
        observed_at: Instant,
    ) -> Result<VllmLoad, LoadParseError> {
        let mut acc = Acc::default();
        for sample in Samples::new(input) {
            let s = sample?;
            let name = s.name.unescape();
            let Some(suffix) = name
                .strip_prefix(b"vllm:")
                .or_else(|| name.strip_prefix(b"vllm_"))
            else {
                continue;
            };
            let metric = match suffix {
                b"num_requests_running" => RUNNING,
                b"num_requests_waiting" => WAITING,
                b"kv_cache_usage_perc" => KV_USAGE,
                b"gpu_cache_usage_perc" => KV_USAGE_OLD,
                b"prefix_cache_hits_total" => PREFIX_HITS,
                b"prefix_cache_queries_total" => PREFIX_QUERIES,
                _ => continue,
            };
            if !self.matches(&s) {
                continue;
            }
            match metric {
                RUNNING => add(&mut acc.running, count_value(metric, &s)?),
                WAITING => add(&mut acc.waiting, count_value(metric, &s)?),
                PREFIX_HITS => add(&mut acc.hits, count_value(metric, &s)?),
                PREFIX_QUERIES => add(&mut acc.queries, count_value(metric, &s)?),
                _ => {
                    if s.value.is_nan() {
                        return Err(LoadParseError::InvalidValue {
                            metric,
                            line: s.line,
                            value: s.value,
                        });
                    }
                    let slot = if metric == KV_USAGE {
                        &mut acc.kv
                    } else {
                        &mut acc.kv_old
                    };
                    slot.0 += s.value.clamp(0.0, 1.0);
                    slot.1 += 1;
                }
            }
        }
        let running = acc.running.ok_or(LoadParseError::MissingMetric(RUNNING))?;
        let waiting = acc.waiting.ok_or(LoadParseError::MissingMetric(WAITING))?;
        let kv = if acc.kv.1 > 0 { acc.kv } else { acc.kv_old };
        let kv_usage = (kv.1 > 0).then(|| (kv.0 / f64::from(kv.1)).clamp(0.0, 1.0));
        let prefix_cache = match (acc.hits, acc.queries) {
            (Some(hits), Some(queries)) => Some(PrefixCacheCounters { hits, queries }),
            _ => None,
        };
        Ok(VllmLoad {
            report: LoadReport {
                // Finite, non-negative sums: `as` saturates at u64::MAX.
                running: running.round() as u64,
                waiting: waiting.round() as u64,
                kv_usage,
                observed_at,
            },
            prefix_cache,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(line: &str) -> Result<Sample<'_>, SyntaxError> {
        let mut it = Samples::new(line.as_bytes());
        let r = it.next().expect("a sample");
        assert!(it.next().is_none());
        r
    }

    #[test]
    fn plain_and_labelled() {
        let s = one("foo 1").unwrap();
        assert!(s.name.eq_bytes(b"foo"));
        assert_eq!(s.value, 1.0);
        assert_eq!(s.labels().count(), 0);

        let s = one("vllm:x{a=\"1\", b = \"2\" ,} -2.5e-3 123").unwrap();
        assert!(s.name.eq_bytes(b"vllm:x"));
        let labels: Vec<_> = s
            .labels()
            .map(|(n, v)| (n.to_string_lossy(), v.to_string_lossy()))
            .collect();
        assert_eq!(
            labels,
            vec![("a".into(), "1".into()), ("b".into(), "2".into())]
        );
        assert_eq!(s.value, -2.5e-3);
        assert_eq!(s.timestamp, Some(123.0));
    }

    #[test]
    fn special_values() {
        assert!(one("a NaN").unwrap().value.is_nan());
        assert_eq!(one("a +Inf").unwrap().value, f64::INFINITY);
        assert_eq!(one("a -Inf").unwrap().value, f64::NEG_INFINITY);
        assert_eq!(one("a 1e+06").unwrap().value, 1e6);
        assert_eq!(one("a\t\t7\t").unwrap().value, 7.0);
    }

    #[test]
    fn escapes() {
        let s = one(r#"a{v="x\\y\"z\n"} 1"#).unwrap();
        let v = s.label("v").unwrap();
        assert!(v.has_escapes());
        assert_eq!(&*v.unescape(), b"x\\y\"z\n");
        assert!(v.eq_bytes(b"x\\y\"z\n"));
        assert!(!v.eq_bytes(b"x\\y\"z"));
        assert_eq!(
            one(r#"a{v="\t"} 1"#).unwrap_err().kind,
            SyntaxErrorKind::InvalidEscape
        );
    }

    #[test]
    fn quoted_names() {
        let s = one(r#"{"my.metric", "la.bel"="v"} 3"#).unwrap();
        assert!(s.name.eq_bytes(b"my.metric"));
        assert!(s.label("la.bel").unwrap().eq_bytes(b"v"));
        assert_eq!(s.labels().count(), 1);
        assert_eq!(
            one(r#"a{"b"} 1"#).unwrap_err().kind,
            SyntaxErrorKind::DuplicateMetricName
        );
        assert_eq!(
            one(r#"{a="b"} 1"#).unwrap_err().kind,
            SyntaxErrorKind::InvalidMetricName
        );
    }

    #[test]
    fn errors() {
        use SyntaxErrorKind::*;
        let cases = [
            ("a", MissingValue),
            ("a ", MissingValue),
            ("a{} ", MissingValue),
            ("a x", InvalidValue),
            ("a 1 x", InvalidTimestamp),
            ("a 1 2 3", TrailingCharacters),
            ("a-b 1", ExpectedBlank),
            ("1a 1", InvalidMetricName),
            ("a{b} 1", ExpectedEquals),
            ("a{b=c} 1", ExpectedQuote),
            ("a{b=\"c} 1", UnterminatedString),
            ("a{b=\"c\" d=\"e\"} 1", ExpectedCommaOrBrace),
            ("a{b=\"c\"", ExpectedCommaOrBrace),
            ("a{1=\"c\"} 1", InvalidLabelName),
        ];
        for (line, kind) in cases {
            assert_eq!(one(line).unwrap_err().kind, kind, "{line}");
        }
    }

    #[test]
    fn comments_blank_crlf_exemplar() {
        let text = "# HELP a help \\n text\r\n# TYPE a counter\r\n\r\n   \r\na_total 1 # {trace_id=\"x\"} 1 2\r\n# EOF\r\n";
        let v: Vec<_> = Samples::new(text.as_bytes()).collect();
        assert_eq!(v.len(), 1);
        let s = v[0].unwrap();
        assert_eq!(s.line, 5);
        assert_eq!(s.value, 1.0);
    }

    #[test]
    fn vllm_report() {
        let text = "\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine=\"0\",model_name=\"m\"} 3.0
vllm:num_requests_running{engine=\"1\",model_name=\"m\"} 1.0
vllm:num_requests_waiting{engine=\"0\",model_name=\"m\"} 2.0
vllm:num_requests_waiting{engine=\"1\",model_name=\"m\"} 0.0
vllm:gpu_cache_usage_perc{engine=\"0\",model_name=\"m\"} 0.9
vllm:kv_cache_usage_perc{engine=\"0\",model_name=\"m\"} 0.5
vllm:kv_cache_usage_perc{engine=\"1\",model_name=\"m\"} 0.25
vllm:prefix_cache_hits_total{engine=\"0\",model_name=\"m\"} 10.0
vllm:prefix_cache_queries_total{engine=\"0\",model_name=\"m\"} 40.0
vllm:time_to_first_token_seconds_bucket{le=\"+Inf\",model_name=\"m\"} 5.0
";
        let now = Instant::now();
        let full = VllmParser::new().parse_full(text.as_bytes(), now).unwrap();
        let r = full.report;
        assert_eq!(r.running, 4);
        assert_eq!(r.waiting, 2);
        assert_eq!(r.kv_usage, Some(0.375));
        assert_eq!(
            full.prefix_cache,
            Some(PrefixCacheCounters {
                hits: 10.0,
                queries: 40.0
            })
        );
        assert_eq!(r.observed_at, now);
    }

    #[test]
    fn vllm_old_kv_and_errors() {
        let now = Instant::now();
        let text = "vllm:num_requests_running 1\nvllm:num_requests_waiting 0\nvllm:gpu_cache_usage_perc 1.5\n";
        let r = VllmParser::new().parse_full(text.as_bytes(), now).unwrap();
        assert_eq!(r.report.kv_usage, Some(1.0));
        assert_eq!(r.prefix_cache, None);

        let text = "vllm:num_requests_running -1\nvllm:num_requests_waiting 0\n";
        assert!(matches!(
            VllmParser::new().parse(text.as_bytes(), now),
            Err(LoadParseError::InvalidValue { line: 1, .. })
        ));
        let text = "vllm:num_requests_running 1\n";
        assert_eq!(
            VllmParser::new().parse(text.as_bytes(), now),
            Err(LoadParseError::MissingMetric(WAITING))
        );
        assert!(matches!(
            VllmParser::new().parse(b"\xff\xfe 1", now),
            Err(LoadParseError::Syntax(_))
        ));
    }
}
