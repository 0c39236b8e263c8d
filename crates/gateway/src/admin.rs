//! The admin routes: `GET /admin/replicas`, each replica's spec, state and load as the gateway
//! sees it, so tail latency can be debugged per replica (the guide's pitfalls); and
//! `GET /admin/advice`, the capacity advisor's verdict per pool from the same figures.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::{header, HeaderValue, Response, StatusCode};
use serde_json::{json, Value};
use tokio::time::Instant;

use replica_router::advisor::{advise, AdvisorConfig, Measurements};
use replica_router::load::WaitEstimator;
use replica_router::pool::{Health, Replica, SlowStart};

use super::body::GatewayBody;
use super::service::Shared;
use super::tiers::ANY_MODEL;
use super::upstream::Upstream;

/// Answers an admin route, or `None` when `path` is not one.
pub(crate) fn route(shared: &Shared, path: &str) -> Option<Response<GatewayBody>> {
    match path {
        "/admin/replicas" => Some(json_response(StatusCode::OK, &replicas(shared))),
        "/admin/advice" => Some(json_response(StatusCode::OK, &advice(shared))),
        _ => None,
    }
}

/// Every pool's replicas, as `GET /admin/replicas` answers.
pub(crate) fn replicas(shared: &Shared) -> Value {
    let now = Instant::now();
    let estimator = WaitEstimator::new();
    let pools: Vec<Value> = shared
        .tiers
        .iter()
        .map(|t| {
            let snap = t.pool.load();
            let total: u64 = snap.replicas().iter().map(|r| r.state().completed()).sum();
            let replicas: Vec<Value> = snap
                .replicas()
                .iter()
                .map(|r| replica(r, total, &estimator, snap.slow_start(), now))
                .collect();
            json!({
                "model": t.model.as_deref().unwrap_or(ANY_MODEL),
                "eligible": snap.eligible().len(),
                "replicas": replicas,
            })
        })
        .collect();
    let unix_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    json!({"generated_at_unix_ms": unix_ms, "pools": pools})
}

/// The advisor's report per pool, from the engines' fresh load reports (batch occupancy against
/// `--max-num-seqs`, queue, KV usage) and the gateway's wait estimates (their largest stands for
/// the p95 queue wait, held to `--slo-wait-ms` or 200 ms). The router does not see the GPUs:
/// utilization is read as batch occupancy, and there is no low-load latency or memory figure.
pub(crate) fn advice(shared: &Shared) -> Value {
    let now = Instant::now();
    let estimator = WaitEstimator::new();
    let pools: Vec<Value> = shared
        .tiers
        .iter()
        .map(|t| {
            let snap = t.pool.load();
            let mut m = Measurements::from_snapshot(
                &snap,
                shared.max_num_seqs,
                now,
                Duration::from_secs(5),
            );
            m.p95_queue_wait = snap
                .replicas()
                .iter()
                .map(|r| estimator.estimate(r, snap.slow_start(), now).wait)
                .max()
                .unwrap_or_default();
            m.queue_wait_slo = shared.slo_wait.unwrap_or(Duration::from_millis(200));
            let advice = advise(&m, &AdvisorConfig::default());
            let report: Value = serde_json::from_str(&advice.to_json()).unwrap_or(Value::Null);
            json!({
                "model": t.model.as_deref().unwrap_or(ANY_MODEL),
                "replicas_reporting": m.replicas.len(),
                "replicas": snap.len(),
                "summary": advice.to_string(),
                "advice": report,
            })
        })
        .collect();
    json!({"pools": pools})
}

fn replica(
    r: &Replica<Upstream>,
    completed_in_pool: u64,
    estimator: &WaitEstimator,
    slow_start: &SlowStart,
    now: Instant,
) -> Value {
    let s = r.state();
    let spec = r.spec();
    let work = s.work();
    let state = match (s.health(), s.is_draining()) {
        (Health::Healthy, true) => "draining",
        (h, _) => h.as_str(),
    };
    let ms = |d: std::time::Duration| d.as_secs_f64() * 1e3;
    let engine = s.load_report().map(|rep| {
        json!({
            "running": rep.running,
            "waiting": rep.waiting,
            "kv_usage": rep.kv_usage,
            "report_age_ms": ms(now.saturating_duration_since(rep.observed_at)),
        })
    });
    let share = if completed_in_pool > 0 {
        s.completed() as f64 / completed_in_pool as f64
    } else {
        0.0
    };
    let wait = estimator.estimate(r, slow_start, now);
    json!({
        "id": r.id().as_str(),
        "spec": {
            "model": spec.model,
            "tensor_parallel": spec.tensor_parallel,
            "pipeline_parallel": spec.pipeline_parallel,
            "gpus": spec.gpus(),
            "max_context": (spec.max_context > 0).then_some(spec.max_context),
            "capacity_weight": spec.capacity_weight,
        },
        "state": state,
        "eligible": s.is_eligible(),
        "ramping": s.is_ramping(),
        "in_flight": s.in_flight(),
        "in_flight_tokens": s.in_flight_tokens(),
        "completed": s.completed(),
        "failed": s.failed(),
        "cancelled": s.cancelled(),
        "share_of_completed": share,
        "ewma_ttfb_ms": s.ewma_ttfb().map(ms),
        "ewma_duration_ms": s.ewma_duration().map(ms),
        "wait_estimate_ms": ms(wait.wait),
        "work": {
            "prefill_tokens_queued": work.prefill_tokens(),
            "prefill_requests": work.prefill_requests(),
            "decode_requests": work.decode_requests(),
            "decode_tokens_expected": work.decode_tokens(),
            "prefill_tokens_per_s": (work.rate_samples() > 0).then(|| work.rate()).flatten(),
            "prefill_rate_samples": work.rate_samples(),
            "cache_calibration": work.cache_calibration(),
            "other_gateways": work.foreign(std::time::Duration::from_secs(5)).map(|f| json!({
                "prefill_tokens_queued": f.prefill_tokens,
                "prefill_requests": f.prefill_requests,
                "decode_requests": f.decode_requests,
            })),
        },
        "engine": engine,
    })
}

pub(crate) fn json_response(status: StatusCode, v: &Value) -> Response<GatewayBody> {
    let mut r = Response::new(GatewayBody::local(v.to_string()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}
