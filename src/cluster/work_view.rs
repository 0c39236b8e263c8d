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
/// dead, return the live entries of the others. One key (one hash tag): Redis Cluster safe.
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
    out[#out + 1] = string.sub(v, sep + 1)
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
                let sums = decode(&entries[..gateways]);
                for r in snapshot.replicas() {
                    let f = sums.get(r.id().as_str()).copied().unwrap_or_default();
                    r.state().work().set_foreign(f, now);
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
/// `prefill_tokens prefill_requests decode_requests decode_tokens id`, the id escaped.
fn encode<B>(replicas: &[Arc<crate::pool::Replica<B>>]) -> String {
    let mut out = String::new();
    for r in replicas {
        let w = r.state().work();
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

/// The sum per replica id of the other gateways' entries; malformed lines are skipped.
fn decode(entries: &[Vec<u8>]) -> HashMap<String, ForeignWork> {
    let mut sums: HashMap<String, ForeignWork> = HashMap::new();
    for entry in entries {
        let Ok(text) = std::str::from_utf8(entry) else {
            continue;
        };
        for line in text.lines().take(MAX_LINES) {
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
            let s = sums.entry(id).or_default();
            s.prefill_tokens = s.prefill_tokens.saturating_add(nums[0]);
            s.prefill_requests = s.prefill_requests.saturating_add(nums[1]);
            s.decode_requests = s.decode_requests.saturating_add(nums[2]);
            s.decode_tokens = s.decode_tokens.saturating_add(nums[3]);
        }
    }
    sums
}

/// Percent-escapes `%`, space, `|` and line breaks, the separators of an entry.
fn escape_into(id: &str, out: &mut String) {
    for c in id.chars() {
        match c {
            '%' | ' ' | '|' | '\n' | '\r' => out.push_str(&format!("%{:02X}", c as u32)),
            c => out.push(c),
        }
    }
}

fn unescape(s: &str) -> Option<String> {
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
        let sums = decode(&entries);
        assert_eq!(
            sums["r0"],
            ForeignWork {
                prefill_tokens: 150,
                prefill_requests: 3,
                decode_requests: 2,
                decode_tokens: 30
            }
        );
        assert_eq!(sums["r1"].prefill_tokens, 5);
        assert!(!sums.contains_key("r2"));
    }
}
