//! Model-tier pools: replicas grouped by the model they serve (`--replica URL,model=NAME`), and
//! each replica's context limit, declared (`max_context=N`) or read from its `GET /v1/models`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde::Deserialize;

use replica_router::pool::Pool;
use replica_router::prefix::PrefixIndex;
use replica_router::replica::ReplicaSpec;

use super::config::{ConfigError, CounterStoreSpec, GatewayConfig, ReplicaArg};
use super::upstream::Upstream;
use super::GatewayError;

/// How long a replica has to answer `GET /v1/models` at start.
const DISCOVERY_TIMEOUT: Duration = Duration::from_secs(2);
/// Most bytes of a `/v1/models` answer read.
const DISCOVERY_MAX_BYTES: usize = 256 * 1024;

/// The model name of replicas that declare none (one pool serving whatever model is asked).
pub(crate) const ANY_MODEL: &str = "served-model";

/// One pool of the gateway: the replicas of one model.
#[derive(Debug, Clone)]
pub(crate) struct Tier {
    /// The model its replicas serve; `None` for the one pool of a gateway without `model=`.
    pub(crate) model: Option<String>,
    pub(crate) pool: Pool<Upstream>,
    /// What was sent where (keyed or not), for placement by predicted TTFT.
    pub(crate) index: Arc<PrefixIndex>,
}

/// Placements queued between two share rounds, at most (the oldest are dropped beyond).
const SHARED_RECORDS_CAP: usize = 4096;

impl Tier {
    /// A pool serving `model`, with its prefix index (queueing its placements for the other
    /// gateways when `cfg` shares through Redis).
    pub(crate) fn new(cfg: &GatewayConfig, model: Option<String>, pool: Pool<Upstream>) -> Tier {
        let shares = matches!(cfg.counter_store, CounterStoreSpec::Redis(_))
            && cfg.work_view_period.is_some();
        let index = PrefixIndex::default();
        let index = if shares {
            index.sharing(SHARED_RECORDS_CAP)
        } else {
            index
        };
        Tier {
            model,
            pool,
            index: Arc::new(index),
        }
    }
}

/// The replicas of one model (`None`: no replica names its model).
type ModelGroup<'a> = (Option<String>, Vec<&'a ReplicaArg>);

/// The replicas of `cfg` grouped by model, in the order models first appear. Either every
/// replica names its model or none does.
pub(crate) fn group_by_model(cfg: &GatewayConfig) -> Result<Vec<ModelGroup<'_>>, ConfigError> {
    let named = cfg.replicas.iter().filter(|r| r.model.is_some()).count();
    if named == 0 {
        return Ok(vec![(None, cfg.replicas.iter().collect())]);
    }
    if named != cfg.replicas.len() {
        return Err(ConfigError::new(
            "--replica: when one replica names its model (model=NAME), every replica must",
        ));
    }
    let mut groups: Vec<ModelGroup<'_>> = Vec::new();
    for r in &cfg.replicas {
        match groups.iter_mut().find(|(m, _)| m == &r.model) {
            Some((_, g)) => g.push(r),
            None => groups.push((r.model.clone(), vec![r])),
        }
    }
    Ok(groups)
}

/// The pool of `replicas` (ids are the URLs' `host:port[/prefix]`).
pub(crate) fn build_tier_pool(
    cfg: &GatewayConfig,
    model: Option<&str>,
    replicas: &[&ReplicaArg],
) -> Result<Pool<Upstream>, GatewayError> {
    let mut builder = Pool::builder().allow_empty();
    for r in replicas {
        let t = &cfg.transport;
        let replica = Upstream::with_timeouts(
            &r.url,
            cfg.upstream_idle_per_replica,
            (!t.upstream_ttfb_timeout.is_zero()).then_some(t.upstream_ttfb_timeout),
            (!t.upstream_idle_timeout.is_zero()).then_some(t.upstream_idle_timeout),
        )?;
        let id = replica.base_url();
        let id = id.strip_prefix("http://").unwrap_or(id).to_owned();
        let spec = ReplicaSpec::new(model.unwrap_or(ANY_MODEL))
            .capacity_weight(r.weight)
            .tensor_parallel(r.tensor_parallel)
            .pipeline_parallel(r.pipeline_parallel)
            .max_context(r.max_context.unwrap_or(0));
        builder = builder.replica(id, spec, replica);
    }
    Ok(builder.build()?)
}

/// Every pool of `cfg`, one per model.
pub(crate) fn build_tiers(cfg: &GatewayConfig) -> Result<Vec<Tier>, GatewayError> {
    let groups = group_by_model(cfg)?;
    let mut seen = HashMap::new();
    for r in &cfg.replicas {
        if let Some(prev) = seen.insert(r.url.trim_end_matches('/'), &r.model) {
            if prev != &r.model {
                return Err(ConfigError::new(format!(
                    "--replica {}: listed twice with different models",
                    r.url
                ))
                .into());
            }
        }
    }
    groups
        .into_iter()
        .map(|(model, replicas)| {
            let pool = build_tier_pool(cfg, model.as_deref(), &replicas)?;
            Ok(Tier::new(cfg, model, pool))
        })
        .collect()
}

#[derive(Deserialize)]
struct ModelList {
    #[serde(default)]
    data: Vec<ModelEntry>,
}

#[derive(Deserialize)]
struct ModelEntry {
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    max_model_len: Option<u64>,
}

/// The context limit a `/v1/models` answer reports (vLLM's `max_model_len`): the entry of
/// `model` when given and listed, else the first entry with a limit.
pub(crate) fn limit_from_models(body: &[u8], model: Option<&str>) -> Option<u32> {
    let list: ModelList = serde_json::from_slice(body).ok()?;
    let limit = |e: &ModelEntry| e.max_model_len.filter(|n| *n > 0);
    let chosen = model
        .and_then(|m| list.data.iter().find(|e| e.id.as_deref() == Some(m)))
        .and_then(limit)
        .or_else(|| list.data.iter().find_map(limit))?;
    Some(u32::try_from(chosen).unwrap_or(u32::MAX))
}

/// Fills in `max_context` of the replicas that did not declare it, from their `GET /v1/models`
/// (at most [`DISCOVERY_TIMEOUT`] each, all at once). A replica that does not answer, or
/// reports no limit, stays unknown (it fits any request).
pub(crate) async fn discover_limits(cfg: &mut GatewayConfig) {
    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let mut tasks = Vec::new();
    for (i, r) in cfg.replicas.iter().enumerate() {
        if r.max_context.is_some() {
            continue;
        }
        let Ok(uri) = format!("{}/v1/models", r.url.trim_end_matches('/')).parse::<http::Uri>()
        else {
            continue;
        };
        let client = client.clone();
        let model = r.model.clone();
        tasks.push(tokio::spawn(async move {
            let fetch = async {
                let resp = client.get(uri).await.ok()?;
                if !resp.status().is_success() {
                    return None;
                }
                let body = Limited::new(resp.into_body(), DISCOVERY_MAX_BYTES)
                    .collect()
                    .await
                    .ok()?
                    .to_bytes();
                limit_from_models(&body, model.as_deref())
            };
            (
                i,
                tokio::time::timeout(DISCOVERY_TIMEOUT, fetch)
                    .await
                    .ok()
                    .flatten(),
            )
        }));
    }
    for t in tasks {
        if let Ok((i, Some(limit))) = t.await {
            cfg.replicas[i].max_context = Some(limit);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_limit_comes_from_the_named_model_else_the_first() {
        let body = br#"{"object":"list","data":[{"id":"a","max_model_len":8192},{"id":"b","max_model_len":32768}]}"#;
        assert_eq!(limit_from_models(body, Some("b")), Some(32_768));
        assert_eq!(limit_from_models(body, Some("c")), Some(8_192));
        assert_eq!(limit_from_models(body, None), Some(8_192));
        assert_eq!(limit_from_models(br#"{"data":[{"id":"a"}]}"#, None), None);
        assert_eq!(limit_from_models(b"<html>", None), None);
        assert_eq!(
            limit_from_models(br#"{"data":[{"max_model_len":99999999999}]}"#, None),
            Some(u32::MAX)
        );
    }

    #[test]
    fn replicas_group_by_model_all_or_none() {
        let cfg = GatewayConfig::from_args([
            "--replica=http://a:1,model=small",
            "--replica=http://b:1,model=large",
            "--replica=http://c:1,model=small",
        ])
        .unwrap();
        let groups = group_by_model(&cfg).unwrap();
        let names: Vec<(Option<&str>, usize)> = groups
            .iter()
            .map(|(m, g)| (m.as_deref(), g.len()))
            .collect();
        assert_eq!(names, [(Some("small"), 2), (Some("large"), 1)]);
        let mixed =
            GatewayConfig::from_args(["--replica=http://a:1,model=small", "--replica=http://b:1"])
                .unwrap();
        assert!(group_by_model(&mixed).is_err());
        let plain = GatewayConfig::from_args(["--replica=http://a:1"]).unwrap();
        assert_eq!(group_by_model(&plain).unwrap()[0].0, None);
    }
}
