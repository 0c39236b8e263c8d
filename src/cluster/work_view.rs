//! The shared work view: each gateway's outstanding work per replica, through one Redis hash.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use redis::aio::ConnectionManager;
use redis::Script;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::load::work::ForeignWork;
use crate::pool::Pool;
use crate::store::RedisStore;

/// Gauge: seconds since the view was last read successfully.
pub const WORK_VIEW_AGE_GAUGE: &str = "replica_router_work_view_age_seconds";
/// Counter: publish-and-read rounds that failed (Redis down, timeout, bad reply).
pub const WORK_VIEW_ERRORS_COUNTER: &str = "replica_router_work_view_errors_total";
/// Gauge: other gateways whose figures the last read counted.
pub const WORK_VIEW_GATEWAYS_GAUGE: &str = "replica_router_work_view_gateways";

/// Most other gateways' entries read per round; more are ignored.
const MAX_GATEWAYS: usize = 256;
/// Most replica lines read per gateway entry.
const MAX_LINES: usize = 4096;

/// One round: write this gateway's entry stamped with the server's clock, drop entries long
/// dead, return the live entries of the others, each led by a line `@AGE_MS` (how long ago it
/// was written, by the server's clock). One key (one hash tag): Redis Cluster safe.
const ROUND: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[3])
redis.call('HSET', KEYS[1], ARGV[1], now .. '|' .. ARGV[2])
redis.call('PEXPIRE', KEYS[1], ttl * 10)
local all = redis.call('HGETALL', KEYS[1])
local out = {}
for i = 1, #all, 2 do
  local f, v = all[i], all[i + 1]
  local sep = string.find(v, '|', 1, true)
  local ts = sep and tonumber(string.sub(v, 1, sep - 1)) or 0
  if now - ts > ttl * 10 then
    redis.call('HDEL', KEYS[1], f)
  elseif f ~= ARGV[1] and now - ts <= ttl then
    out[#out + 1] = '@' .. (now - ts) .. '\n' .. string.sub(v, sep + 1)
  end
end
return out
";

/// Settings of a [`WorkView`].
#[derive(Debug, Clone)]
pub struct WorkViewConfig {
    /// Name of the view: gateways sharing a name (and a Redis store prefix) share their work.
    /// Use one per pool (default `"default"`).
    pub name: String,
    /// This gateway's id in the view (default: random).
    pub gateway_id: String,
    /// How often to publish and read (default 100 ms).
    pub period: Duration,
    /// Entries older than this are not counted (a gateway that stopped publishing drops out;
    /// default 1 s).
    pub ttl: Duration,
}

impl Default for WorkViewConfig {
    fn default() -> Self {
        WorkViewConfig {
            name: "default".to_owned(),
            gateway_id: format!("{:016x}", rand::random::<u64>()),
            period: Duration::from_millis(100),
            ttl: Duration::from_secs(1),
        }
    }
}

/// Counters of a running [`WorkView`].
#[derive(Debug, Default)]
pub struct WorkViewStats {
    rounds: AtomicU64,
    errors: AtomicU64,
    gateways: AtomicU64,
    last_ok: parking_lot::Mutex<Option<Instant>>,
}

impl WorkViewStats {
    /// Rounds (publish plus read, one Redis round trip each) that succeeded.
    pub fn rounds(&self) -> u64 {
        self.rounds.load(Ordering::Relaxed)
    }

    /// Rounds that failed.
    pub fn errors(&self) -> u64 {
        self.errors.load(Ordering::Relaxed)
    }

    /// Other gateways counted by the last successful read.
    pub fn gateways(&self) -> u64 {
        self.gateways.load(Ordering::Relaxed)
    }

    /// Time since the last successful read, `None` before the first.
    pub fn age(&self) -> Option<Duration> {
        self.last_ok.lock().map(|t| t.elapsed())
    }
}

/// Shares each gateway's outstanding work per replica with the other gateways of a pool; see the
/// [module docs](crate::cluster).
///
/// [`WorkView::spawn`] starts a task that, every period, sends this gateway's figures and reads
/// the others' in one round trip (a Lua script on one key), then stores their sum per replica in
/// [`WorkState::set_foreign`](crate::load::work::WorkState::set_foreign). The request path only
/// reads those figures; it never waits on Redis. Dropping the view stops the task.
pub struct WorkView {
    task: JoinHandle<()>,
    stats: Arc<WorkViewStats>,
    config: WorkViewConfig,
}

impl fmt::Debug for WorkView {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WorkView")
            .field("config", &self.config)
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

impl Drop for WorkView {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl WorkView {
    /// Starts sharing `pool`'s work through `store` (its connection, key prefix and timeout).
    /// Must be called within a tokio runtime.
    pub fn spawn<B: Send + Sync + 'static>(
        store: &RedisStore,
        pool: Pool<B>,
        config: WorkViewConfig,
    ) -> WorkView {
        let stats = Arc::new(WorkViewStats::default());
        let round = Round {
            conn: store.connection(),
            script: Script::new(ROUND),
            key: format!(
                "{}:workview:{{{}}}",
                store.config().get_prefix(),
                config.name
            ),
            timeout: store.config().get_timeout(),
            config: config.clone(),
        };
        let task = tokio::spawn(run(round, pool, stats.clone()));
        WorkView {
            task,
            stats,
            config,
        }
    }

    /// The view's counters.
    pub fn stats(&self) -> &WorkViewStats {
        &self.stats
    }

    /// The settings it runs with.
    pub fn config(&self) -> &WorkViewConfig {
        &self.config
    }
}

struct Round {
    conn: ConnectionManager,
    script: Script,
    key: String,
    timeout: Duration,
    config: WorkViewConfig,
}

async fn run<B>(mut round: Round, pool: Pool<B>, stats: Arc<WorkViewStats>) {
    let period = round.config.period.max(Duration::from_millis(1));
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let ttl_ms = round.config.ttl.as_millis().clamp(1, u64::MAX as u128) as u64;
    loop {
        tick.tick().await;
        let snapshot = pool.load();
        let payload = encode(snapshot.replicas());
        let mut invocation = round.script.key(&round.key);
        invocation
            .arg(&round.config.gateway_id)
            .arg(payload)
            .arg(ttl_ms);
        let reply = tokio::time::timeout(
            round.timeout,
            invocation.invoke_async::<Vec<Vec<u8>>>(&mut round.conn),
        )
        .await;
        match reply {
            Ok(Ok(entries)) => {
                let now = Instant::now();
                let gateways = entries.len().min(MAX_GATEWAYS);
                let read = decode(&entries[..gateways]);
                for r in snapshot.replicas() {
                    let id = r.id().as_str();
                    let (f, age) = read.work.get(id).copied().unwrap_or_default();
                    let at = now.checked_sub(age).unwrap_or(now);
                    r.state().work().set_foreign(f, at);
                    let (rate, samples) = read.rates.get(id).copied().unwrap_or_default();
                    r.state().work().set_shared_rate(rate, samples);
                }
                stats.rounds.fetch_add(1, Ordering::Relaxed);
                stats.gateways.store(gateways as u64, Ordering::Relaxed);
                *stats.last_ok.lock() = Some(now);
                metrics::gauge!(WORK_VIEW_GATEWAYS_GAUGE).set(gateways as f64);
            }
            Ok(Err(_)) | Err(_) => {
                stats.errors.fetch_add(1, Ordering::Relaxed);
                metrics::counter!(WORK_VIEW_ERRORS_COUNTER).increment(1);
            }
        }
        if let Some(age) = stats.age() {
            metrics::gauge!(WORK_VIEW_AGE_GAUGE).set(age.as_secs_f64());
        }
    }
}

/// This gateway's entry: one line per replica with work outstanding,
/// `prefill_tokens prefill_requests decode_requests decode_tokens id`, and one per replica whose
/// prefill rate it has measured, `~rate samples id`; ids escaped.
fn encode<B>(replicas: &[Arc<crate::pool::Replica<B>>]) -> String {
    let mut out = String::new();
    for r in replicas {
        let w = r.state().work();
        if let (Some(rate), n @ 1..) = (w.rate(), w.rate_samples()) {
            out.push_str(&format!("~{rate:.0} {n} "));
            escape_into(r.id().as_str(), &mut out);
            out.push('\n');
        }
        let line = [
            w.prefill_tokens(),
            w.prefill_requests(),
            w.decode_requests(),
            w.decode_tokens(),
        ];
        if line.iter().all(|&v| v == 0) {
            continue;
        }
        for v in line {
            out.push_str(&v.to_string());
            out.push(' ');
        }
        escape_into(r.id().as_str(), &mut out);
        out.push('\n');
    }
    out
}

/// Entries older than this are taken as this old (a clock step on the server, a bad line).
const MAX_ENTRY_AGE: Duration = Duration::from_secs(60);

/// What one round read of the other gateways, per replica id.
#[derive(Debug, Default)]
struct Read {
    /// The sum of their outstanding work, with its age (the prefill-token-weighted mean of the
    /// entries' ages).
    work: HashMap<String, (ForeignWork, Duration)>,
    /// Their measured prefill rates (the sample-weighted geometric mean) and total samples.
    rates: HashMap<String, (f64, u64)>,
}

/// Reads the other gateways' entries; malformed lines are skipped.
fn decode(entries: &[Vec<u8>]) -> Read {
    let mut sums: HashMap<String, (ForeignWork, f64)> = HashMap::new();
    let mut rates: HashMap<String, (f64, u64)> = HashMap::new();
    for entry in entries {
        let Ok(text) = std::str::from_utf8(entry) else {
            continue;
        };
        let mut age = 0.0;
        for line in text.lines().take(MAX_LINES) {
            if let Some(ms) = line.strip_prefix('@') {
                age = ms
                    .parse::<f64>()
                    .map_or(0.0, |ms| (ms / 1e3).clamp(0.0, MAX_ENTRY_AGE.as_secs_f64()));
                continue;
            }
            if let Some(rest) = line.strip_prefix('~') {
                let mut parts = rest.splitn(3, ' ');
                let rate = parts.next().and_then(|p| p.parse::<f64>().ok());
                let n = parts.next().and_then(|p| p.parse::<u64>().ok());
                let id = parts.next().and_then(unescape);
                if let (Some(rate), Some(n @ 1..), Some(id)) = (rate, n, id) {
                    if rate.is_finite() && rate > 0.0 {
                        let (ln_sum, total) = rates.entry(id).or_default();
                        *ln_sum += n as f64 * rate.ln();
                        *total = total.saturating_add(n);
                    }
                }
                continue;
            }
            let mut parts = line.splitn(5, ' ');
            let mut nums = [0u64; 4];
            let mut ok = true;
            for n in nums.iter_mut() {
                match parts.next().and_then(|p| p.parse().ok()) {
                    Some(v) => *n = v,
                    None => ok = false,
                }
            }
            let Some(id) = parts.next().and_then(unescape) else {
                continue;
            };
            if !ok {
                continue;
            }
            let (s, weighted_age) = sums.entry(id).or_default();
            s.prefill_tokens = s.prefill_tokens.saturating_add(nums[0]);
            s.prefill_requests = s.prefill_requests.saturating_add(nums[1]);
            s.decode_requests = s.decode_requests.saturating_add(nums[2]);
            s.decode_tokens = s.decode_tokens.saturating_add(nums[3]);
            *weighted_age += age * nums[0] as f64;
        }
    }
    let work = sums
        .into_iter()
        .map(|(id, (work, weighted_age))| {
            let age = if work.prefill_tokens > 0 {
                weighted_age / work.prefill_tokens as f64
            } else {
                0.0
            };
            (id, (work, Duration::from_secs_f64(age)))
        })
        .collect();
    let rates = rates
        .into_iter()
        .map(|(id, (ln_sum, n))| (id, ((ln_sum / n as f64).exp(), n)))
        .collect();
    Read { work, rates }
}

/// Percent-escapes `%`, space, `|` and line breaks, the separators of an entry.
pub(super) fn escape_into(id: &str, out: &mut String) {
    for c in id.chars() {
        match c {
            '%' | ' ' | '|' | '\n' | '\r' => out.push_str(&format!("%{:02X}", c as u32)),
            c => out.push(c),
        }
    }
}

pub(super) fn unescape(s: &str) -> Option<String> {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '%' {
            let hex: String = chars.by_ref().take(2).collect();
            out.push(char::from(u8::from_str_radix(&hex, 16).ok()?));
        } else {
            out.push(c);
        }
    }
    (!out.is_empty()).then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_through_the_escaping() {
        for id in ["r0", "http://10.0.0.1:8000", "a b|c%d\ne", "ünï"] {
            let mut s = String::new();
            escape_into(id, &mut s);
            assert!(!s.contains([' ', '|', '\n']), "{s:?}");
            assert_eq!(unescape(&s).as_deref(), Some(id));
        }
    }

    #[test]
    fn decode_sums_gateways_and_skips_garbage() {
        let entries = vec![
            b"100 1 2 30 r0\n5 1 0 0 r1\n".to_vec(),
            b"50 2 0 0 r0\nnot a line\n1 2 3 r2\n".to_vec(),
            vec![0xff, 0xfe],
        ];
        let sums = decode(&entries).work;
        assert_eq!(
            sums["r0"].0,
            ForeignWork {
                prefill_tokens: 150,
                prefill_requests: 3,
                decode_requests: 2,
                decode_tokens: 30
            }
        );
        assert_eq!(sums["r1"].0.prefill_tokens, 5);
        assert!(!sums.contains_key("r2"));
    }

    #[test]
    fn decode_ages_each_sum_by_the_tokens_behind_it() {
        // An old gateway's entry (no age line) counts as fresh; ages are token-weighted.
        let entries = vec![
            b"@300
100 1 0 0 r0
"
            .to_vec(),
            b"@100
300 1 0 0 r0
0 0 1 9 r1
"
            .to_vec(),
            b"50 1 0 0 r2
"
            .to_vec(),
            b"@bogus
10 1 0 0 r3
"
            .to_vec(),
        ];
        let sums = decode(&entries).work;
        assert_eq!(sums["r0"].0.prefill_tokens, 400);
        assert_eq!(sums["r0"].1, Duration::from_millis(150));
        assert_eq!(sums["r1"].1, Duration::ZERO);
        assert_eq!(sums["r2"].1, Duration::ZERO);
        assert_eq!(sums["r3"].1, Duration::ZERO);
    }

    #[test]
    fn decode_reads_the_rates_the_others_measured() {
        let entries = vec![
            b"~1000 10 r0\n~4000 30 r1\n".to_vec(),
            b"~16000 10 r0\n~nan 5 r1\n~-3 5 r1\n~100 0 r2\n~5 5\n".to_vec(),
        ];
        let rates = decode(&entries).rates;
        let (r0, n0) = rates["r0"];
        assert!((r0 - 4000.0).abs() < 1e-6, "{r0}"); // geometric mean of 1k and 16k
        assert_eq!(n0, 20);
        let (r1, n1) = rates["r1"];
        assert!((r1 - 4000.0).abs() < 1e-6 && n1 == 30, "{r1} {n1}");
        assert!(!rates.contains_key("r2"));
        // And a line of rates is no work.
        assert!(decode(&entries).work.is_empty());
    }
}
