//! The Prometheus text parser: any bytes without a panic, round trips through a real encoder
//! (the `prometheus` crate's `TextEncoder`), and real vLLM-shaped expositions written by Python's
//! `prometheus_client` (the library vLLM uses), committed under `tests/fixtures/`.

use std::collections::BTreeMap;

use prometheus::{CounterVec, Encoder, GaugeVec, Opts, Registry, TextEncoder};
use proptest::prelude::*;
use replica_router::load::prometheus::{validate, LoadParseError, Samples, VllmParser};
use replica_router::load::PrefixCacheCounters;
use tokio::time::Instant;

/// Pieces real expositions are made of, to build inputs that get deep into the parser.
fn fragment() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        Just(b"vllm:num_requests_running".to_vec()),
        Just(b"vllm:kv_cache_usage_perc".to_vec()),
        Just(b"{".to_vec()),
        Just(b"}".to_vec()),
        Just(b"=".to_vec()),
        Just(b",".to_vec()),
        Just(b"\"".to_vec()),
        Just(b"\\".to_vec()),
        Just(b" ".to_vec()),
        Just(b"\t".to_vec()),
        Just(b"\n".to_vec()),
        Just(b"\r\n".to_vec()),
        Just(b"# HELP x y\n".to_vec()),
        Just(b"# TYPE x gauge\n".to_vec()),
        Just(b"model_name".to_vec()),
        Just(b"NaN".to_vec()),
        Just(b"+Inf".to_vec()),
        Just(b"-Inf".to_vec()),
        Just(b"1e-3".to_vec()),
        Just(b"1700000000000".to_vec()),
        Just(b"\"x\\\"y\\\\z\\n\"".to_vec()),
        prop::collection::vec(any::<u8>(), 0..8),
    ]
}

fn check_no_panic(input: &[u8]) {
    for s in Samples::new(input).flatten() {
        // Touch everything a caller can reach.
        let _ = s.name.unescape();
        let _ = s.name.to_string_lossy();
        for (n, v) in s.labels() {
            let _ = n.unescape();
            let _ = v.eq_bytes(b"model_name");
        }
        let _ = s.label("model_name");
    }
    let _ = validate(input);
    let _ = VllmParser::new().parse(input, Instant::now());
    let _ = VllmParser::new()
        .model_name("m")
        .parse(input, Instant::now());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn arbitrary_bytes_never_panic(input in prop::collection::vec(any::<u8>(), 0..512)) {
        check_no_panic(&input);
    }

    #[test]
    fn structured_garbage_never_panics(parts in prop::collection::vec(fragment(), 0..40)) {
        check_no_panic(&parts.concat());
    }
}

/// Label values with the characters that need escaping, and some that do not.
fn label_value() -> impl Strategy<Value = String> {
    prop::collection::vec(
        prop_oneof![
            Just('"'),
            Just('\\'),
            Just('\n'),
            Just('n'),
            Just(' '),
            Just('{'),
            Just('}'),
            Just(','),
            Just('='),
            Just('#'),
            Just('é'),
            Just('\u{1F600}'),
            any::<char>(),
        ],
        0..12,
    )
    .prop_map(|v| v.into_iter().collect())
}

fn gauge_value() -> impl Strategy<Value = f64> {
    prop_oneof![
        Just(f64::NAN),
        Just(f64::INFINITY),
        Just(f64::NEG_INFINITY),
        Just(0.0),
        Just(-0.0),
        Just(f64::MIN_POSITIVE),
        Just(f64::MAX),
        any::<f64>(),
        -1e6..1e6f64,
    ]
}

fn same(a: f64, b: f64) -> bool {
    (a.is_nan() && b.is_nan()) || a.to_bits() == b.to_bits() || a == b
}

type Series = BTreeMap<(String, String), f64>;

fn encode(registry: &Registry) -> Vec<u8> {
    let mut out = Vec::new();
    TextEncoder::new()
        .encode(&registry.gather(), &mut out)
        .expect("encode");
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    /// Gauges and counters written by the `prometheus` crate read back with the same names,
    /// label values (escapes decoded) and numbers.
    #[test]
    fn round_trips_prometheus_text_encoder(
        gauges in prop::collection::btree_map((label_value(), label_value()), gauge_value(), 0..8),
        counters in prop::collection::btree_map((label_value(), label_value()), 0.0..1e12f64, 0..8),
    ) {
        let registry = Registry::new();
        let g = GaugeVec::new(Opts::new("vllm:test_gauge", "a \\ gauge\nwith help"), &["model_name", "engine"]).unwrap();
        let c = CounterVec::new(Opts::new("test_counter_total", "a counter"), &["a", "b"]).unwrap();
        registry.register(Box::new(g.clone())).unwrap();
        registry.register(Box::new(c.clone())).unwrap();
        for ((m, e), v) in &gauges {
            g.with_label_values(&[m.as_str(), e.as_str()]).set(*v);
        }
        for ((a, b), v) in &counters {
            c.with_label_values(&[a.as_str(), b.as_str()]).inc_by(*v);
        }
        let text = encode(&registry);

        let mut got_g = Series::new();
        let mut got_c = Series::new();
        for s in Samples::new(&text) {
            let s = s.unwrap_or_else(|e| panic!("{e} in {}", String::from_utf8_lossy(&text)));
            let labels: Vec<(String, String)> = s
                .labels()
                .map(|(n, v)| (n.to_string_lossy().into_owned(), v.to_string_lossy().into_owned()))
                .collect();
            let get = |k: &str| labels.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone()).unwrap();
            if s.name.eq_bytes(b"vllm:test_gauge") {
                prop_assert_eq!(labels.len(), 2);
                // Zero-allocation lookups agree with the decoded strings.
                prop_assert!(s.label("model_name").unwrap().eq_bytes(get("model_name").as_bytes()));
                got_g.insert((get("model_name"), get("engine")), s.value);
            } else if s.name.eq_bytes(b"test_counter_total") {
                got_c.insert((get("a"), get("b")), s.value);
            } else {
                prop_assert!(false, "unexpected metric {:?}", s.name);
            }
        }
        prop_assert_eq!(got_g.len(), gauges.len());
        for (k, v) in &gauges {
            prop_assert!(same(got_g[k], *v), "{:?}: wrote {} read {}", k, v, got_g[k]);
        }
        prop_assert_eq!(got_c.len(), counters.len());
        for (k, v) in &counters {
            prop_assert!(same(got_c[k], *v), "{:?}: wrote {} read {}", k, v, got_c[k]);
        }
    }

    /// vLLM's gauges written by a real encoder: the report sums the filtered model's label sets.
    #[test]
    fn vllm_report_from_encoder(
        rows in prop::collection::btree_map(
            (prop_oneof![Just("m".to_string()), label_value()], 0u8..4),
            (0u32..1000, 0u32..1000, 0.0..=1.0f64),
            1..10,
        ),
        filter in prop_oneof![Just("m".to_string()), label_value()],
    ) {
        let registry = Registry::new();
        let labels = ["model_name", "engine"];
        let run = GaugeVec::new(Opts::new("vllm:num_requests_running", "running"), &labels).unwrap();
        let wait = GaugeVec::new(Opts::new("vllm:num_requests_waiting", "waiting"), &labels).unwrap();
        let kv = GaugeVec::new(Opts::new("vllm:kv_cache_usage_perc", "kv"), &labels).unwrap();
        for v in [&run, &wait, &kv] {
            registry.register(Box::new(v.clone())).unwrap();
        }
        for ((m, e), (r, w, k)) in &rows {
            let e = e.to_string();
            run.with_label_values(&[m.as_str(), &e]).set(f64::from(*r));
            wait.with_label_values(&[m.as_str(), &e]).set(f64::from(*w));
            kv.with_label_values(&[m.as_str(), &e]).set(*k);
        }
        let text = encode(&registry);
        let now = Instant::now();

        let all = VllmParser::new().parse(&text, now).unwrap();
        prop_assert_eq!(all.running, rows.values().map(|v| u64::from(v.0)).sum::<u64>());
        prop_assert_eq!(all.waiting, rows.values().map(|v| u64::from(v.1)).sum::<u64>());
        let mean = rows.values().map(|v| v.2).sum::<f64>() / rows.len() as f64;
        prop_assert!((all.kv_usage.unwrap() - mean).abs() < 1e-9);

        let mine: Vec<_> = rows.iter().filter(|((m, _), _)| *m == filter).map(|(_, v)| *v).collect();
        let one = VllmParser::new().model_name(&filter).parse(&text, now);
        if mine.is_empty() {
            prop_assert_eq!(one, Err(LoadParseError::MissingMetric("vllm:num_requests_running")));
        } else {
            let one = one.unwrap();
            prop_assert_eq!(one.running, mine.iter().map(|v| u64::from(v.0)).sum::<u64>());
            prop_assert_eq!(one.waiting, mine.iter().map(|v| u64::from(v.1)).sum::<u64>());
        }
    }
}

const MODEL: &str = "org/llama \"3\"\\70b";

#[test]
fn python_client_text_fixture() {
    let text = include_bytes!("fixtures/vllm_metrics.txt");
    validate(text).unwrap();
    let now = Instant::now();
    let full = VllmParser::new()
        .model_name(MODEL)
        .parse_full(text, now)
        .unwrap();
    let r = full.report;
    assert_eq!((r.running, r.waiting), (8, 1));
    assert_eq!(r.kv_usage, Some(0.375));
    assert_eq!(
        full.prefix_cache,
        Some(PrefixCacheCounters {
            hits: 1000.0,
            queries: 4000.0
        })
    );
    let all = VllmParser::new().parse(text, now).unwrap();
    assert_eq!((all.running, all.waiting), (108, 101));
    // Histogram buckets with `le="+Inf"` parse too.
    let inf = Samples::new(text)
        .flatten()
        .filter(|s| s.label("le").is_some_and(|v| v.eq_bytes(b"+Inf")))
        .count();
    assert_eq!(inf, 2);
}

#[test]
fn python_client_openmetrics_fixture() {
    let text = include_bytes!("fixtures/vllm_metrics.openmetrics.txt");
    validate(text).unwrap();
    let r = VllmParser::new()
        .model_name(MODEL)
        .parse(text, Instant::now())
        .unwrap();
    assert_eq!((r.running, r.waiting), (8, 1));
    assert_eq!(r.kv_usage, Some(0.375));
}

#[test]
fn crlf_and_timestamps() {
    let text = b"vllm:num_requests_running{model_name=\"a\"} 2 1712345678000\r\n\
                 vllm:num_requests_waiting{model_name=\"a\"} 1e+00 1712345678000\r\n";
    let r = VllmParser::new().parse(text, Instant::now()).unwrap();
    assert_eq!((r.running, r.waiting), (2, 1));
}
