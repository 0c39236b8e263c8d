//! Authenticated tenants (`--api-keys FILE`): `Authorization: Bearer <key>` names the tenant.
//!
//! The file holds one key per line: `KEY-HASH TENANT [rate=N/SECS] [tokens=N/SECS]
//! [concurrency=N]`, where `KEY-HASH` is the hex SHA-256 of the bearer key (64 hex digits, so the
//! file holds no usable secret; make one with `printf %s "$KEY" | sha256sum`). Blank lines and
//! everything after `#` are ignored. The optional limits override the global `--tenant-rate`,
//! `--tenant-tokens` and `--tenant-concurrency` for that tenant, dimension by dimension (the
//! others keep the global value); several keys may name one tenant (key rotation) if they give it
//! the same limits. Any other option is an error at start-up.
//!
//! With the file, every request but `GET /health` and `GET /metrics` needs a listed key (else 401
//! in the OpenAI error shape, with `WWW-Authenticate: Bearer`); the tenant comes from the key and
//! the tenant header is ignored, unless `--trust-tenant-header` (behind an authenticating proxy
//! that sets it) lets a request's tenant header win. The `Authorization` header is not forwarded
//! to the replicas: it is the client's credential for the gateway. Keys are looked up by their
//! hash, so the comparison leaks nothing about other keys' bytes.

use std::collections::HashMap;

use http::HeaderMap;
use replica_router::context::RouteKey;
use replica_router::quota::TenantLimits;
use replica_router::store::RateQuota;
use sha2::{Digest, Sha256};

use super::config::{ConfigError, Rate};

/// Per-key limits from the file; `None` keeps the global value.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct KeyLimits {
    pub(crate) rate: Option<Rate>,
    pub(crate) tokens: Option<Rate>,
    pub(crate) concurrency: Option<u64>,
}

impl KeyLimits {
    fn is_empty(&self) -> bool {
        *self == KeyLimits::default()
    }

    /// `base` with this key's dimensions overriding it.
    pub(crate) fn over(&self, mut base: TenantLimits) -> Result<TenantLimits, String> {
        if let Some(r) = self.rate {
            base = base.requests(RateQuota::new(r.n, r.per).map_err(|e| e.to_string())?);
        }
        if let Some(r) = self.tokens {
            base = base.tokens(RateQuota::new(r.n, r.per).map_err(|e| e.to_string())?);
        }
        if let Some(c) = self.concurrency {
            base = base.concurrency(c);
        }
        Ok(base)
    }
}

/// The parsed key file.
#[derive(Debug, Default)]
pub(crate) struct ApiKeys {
    by_hash: HashMap<[u8; 32], RouteKey>,
    /// Tenants with their own limits.
    pub(crate) limits: Vec<(RouteKey, KeyLimits)>,
}

fn parse_hex(s: &str) -> Option<[u8; 32]> {
    let b = s.as_bytes();
    if b.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in b.chunks(2).enumerate() {
        let hi = (pair[0] as char).to_digit(16)?;
        let lo = (pair[1] as char).to_digit(16)?;
        out[i] = (hi * 16 + lo) as u8;
    }
    Some(out)
}

impl ApiKeys {
    /// Reads `path`.
    pub(crate) fn load(path: &std::path::Path) -> Result<ApiKeys, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError::new(format!("--api-keys {}: {e}", path.display())))?;
        Self::parse(&text)
            .map_err(|e| ConfigError::new(format!("--api-keys {}: {e}", path.display())))
    }

    /// Parses the file's text (see the [module docs](self)).
    pub(crate) fn parse(text: &str) -> Result<ApiKeys, String> {
        let mut keys = ApiKeys::default();
        let mut tenant_limits: HashMap<RouteKey, KeyLimits> = HashMap::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let at = |msg: String| format!("line {}: {msg}", n + 1);
            let mut words = line.split_whitespace();
            let (Some(hash), Some(tenant)) = (words.next(), words.next()) else {
                return Err(at("expected `KEY-SHA256-HEX TENANT [options]`".into()));
            };
            let hash = parse_hex(hash)
                .ok_or_else(|| at("the key hash must be 64 hex digits (SHA-256)".into()))?;
            let mut limits = KeyLimits::default();
            for w in words {
                let bad = || {
                    at(format!(
                        "bad option {w:?} (expected rate=N/SECS, tokens=N/SECS or concurrency=N)"
                    ))
                };
                match w.split_once('=') {
                    Some(("rate", v)) => limits.rate = Some(Rate::parse(v).ok_or_else(bad)?),
                    Some(("tokens", v)) => limits.tokens = Some(Rate::parse(v).ok_or_else(bad)?),
                    Some(("concurrency", v)) => {
                        limits.concurrency =
                            Some(v.parse::<u64>().ok().filter(|c| *c > 0).ok_or_else(bad)?)
                    }
                    _ => return Err(bad()),
                }
            }
            let tenant = RouteKey::new(tenant.to_owned());
            if keys.by_hash.insert(hash, tenant.clone()).is_some() {
                return Err(at("this key hash is listed twice".into()));
            }
            match tenant_limits.get(&tenant) {
                Some(prev) if *prev != limits => {
                    return Err(at(format!(
                        "tenant {} has other limits on an earlier line",
                        tenant.printable()
                    )))
                }
                Some(_) => {}
                None => {
                    tenant_limits.insert(tenant.clone(), limits);
                    if !limits.is_empty() {
                        keys.limits.push((tenant, limits));
                    }
                }
            }
        }
        Ok(keys)
    }

    /// The tenant of the request's bearer key, or `None` (missing, malformed or unknown key).
    pub(crate) fn tenant(&self, headers: &HeaderMap) -> Option<&RouteKey> {
        let v = headers.get(http::header::AUTHORIZATION)?.as_bytes();
        let scheme = v.get(..7)?;
        if !scheme.eq_ignore_ascii_case(b"bearer ") {
            return None;
        }
        let key = v[7..].trim_ascii();
        if key.is_empty() {
            return None;
        }
        let hash: [u8; 32] = Sha256::digest(key).into();
        self.by_hash.get(&hash)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hash(key: &str) -> String {
        Sha256::digest(key.as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    #[test]
    fn parses_keys_and_limits() {
        let text = format!(
            "# keys\n{} acme tokens=1000/60 concurrency=2\n\n{}   acme tokens=1000/60 concurrency=2 # rotated\n{} free\n",
            hash("k1"),
            hash("k2").to_uppercase(),
            hash("k3")
        );
        let keys = ApiKeys::parse(&text).unwrap();
        let mut h = HeaderMap::new();
        h.insert("authorization", "Bearer k2".parse().unwrap());
        assert_eq!(keys.tenant(&h).unwrap().printable(), "acme");
        h.insert("authorization", "bearer  k3 ".parse().unwrap());
        assert_eq!(keys.tenant(&h).unwrap().printable(), "free");
        h.insert("authorization", "Bearer nope".parse().unwrap());
        assert!(keys.tenant(&h).is_none());
        h.insert("authorization", "Basic k1".parse().unwrap());
        assert!(keys.tenant(&h).is_none());
        assert!(keys.tenant(&HeaderMap::new()).is_none());
        assert_eq!(keys.limits.len(), 1);
        let l = keys.limits[0].1.over(TenantLimits::unlimited()).unwrap();
        assert_eq!(l.concurrency, Some(2));
        assert_eq!(l.tokens.unwrap().limit(), 1000);
    }

    #[test]
    fn bad_files_are_errors() {
        let h = hash("k");
        for bad in [
            "abc acme".to_owned(),
            h.clone(),
            format!("{h} acme color=red"),
            format!("{h} acme tokens=5"),
            format!("{h} acme concurrency=0"),
            format!("{h} a\n{h} b"),
            format!("{h} a rate=1/1\n{} a", hash("j")),
        ] {
            assert!(ApiKeys::parse(&bad).is_err(), "{bad}");
        }
    }
}
