//! The shared prefix view: what each gateway sent where, so keyless requests find their cache
//! from any gateway.
//!
//! Placement by predicted TTFT counts the prompt tokens a replica probably holds from the
//! [`PrefixIndex`] of what was sent there. Behind an L4 balancer each of N gateways sees only
//! 1/N of the traffic, so its index knows 1/N of every replica's cache, and a keyless request
//! whose prefix another gateway sent goes wherever looks idle. [`PrefixShare`] closes the gap:
//! every period (default 100 ms, off the request path) a gateway appends the placements its
//! index recorded since the last round to one Redis stream and reads the others' back into its
//! own index, in one round trip (a Lua script on one key, so Redis Cluster safe). The stream is
//! capped (`MAXLEN ~`) and expires when no gateway writes; each record costs about 17 bytes per
//! checkpoint of its prompt (at most [`MAX_CHECKPOINTS`](crate::prefix::MAX_CHECKPOINTS)).
//!
//! Records name replicas by id; a record for a replica this gateway's pool does not have is
//! skipped. When Redis is down, each index keeps working on its own traffic.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use redis::aio::ConnectionManager;
use redis::Script;
use tokio::task::JoinHandle;

use crate::cluster::work_view::{escape_into, unescape};
use crate::pool::Pool;
use crate::prefix::{PrefixHashes, PrefixIndex, SharedRecord};
use crate::replica::ReplicaId;
use crate::store::RedisStore;

/// Counter: placements received from other gateways and recorded in this gateway's index.
pub const PREFIX_SHARE_RECEIVED_COUNTER: &str = "replica_router_prefix_share_received_total";
/// Counter: placements this gateway sent to the shared stream.
pub const PREFIX_SHARE_SENT_COUNTER: &str = "replica_router_prefix_share_sent_total";
/// Counter: rounds that failed (Redis down, timeout, bad reply).
pub const PREFIX_SHARE_ERRORS_COUNTER: &str = "replica_router_prefix_share_errors_total";

/// Most records read per round; a gateway further behind skips ahead.
const MAX_READ: usize = 256;

/// One round: append this gateway's batch (if any), then return the id of the newest entry
/// followed by the others' batches after `last` (on the first round, nothing: a gateway starts
/// from now). ARGV: gateway id, last id seen ('' on the first round), batch, MAXLEN, read
/// count, TTL ms.
const ROUND: &str = r"
local key = KEYS[1]
if ARGV[3] ~= '' then
  redis.call('XADD', key, 'MAXLEN', '~', tonumber(ARGV[4]), '*', 'g', ARGV[1], 'p', ARGV[3])
end
redis.call('PEXPIRE', key, tonumber(ARGV[6]))
if ARGV[2] == '' then
  local newest = redis.call('XREVRANGE', key, '+', '-', 'COUNT', 1)
  if newest[1] then return {newest[1][1]} end
  return {'0-0'}
end
local entries = redis.call('XRANGE', key, '(' .. ARGV[2], '+', 'COUNT', tonumber(ARGV[5]))
local out = {ARGV[2]}
for _, e in ipairs(entries) do
  out[1] = e[1]
  local f = e[2]
  local g, p
  for i = 1, #f, 2 do
    if f[i] == 'g' then g = f[i + 1] elseif f[i] == 'p' then p = f[i + 1] end
  end
  if g ~= ARGV[1] and p then out[#out + 1] = p end
end
return out
";

/// Settings of a [`PrefixShare`].
#[derive(Debug, Clone)]
pub struct PrefixShareConfig {
    /// Name of the view: gateways sharing a name (and a Redis store prefix) share their
    /// placements. Use one per pool (default `"default"`).
    pub name: String,
    /// This gateway's id (default: random).
    pub gateway_id: String,
    /// How often to send and read (default 100 ms).
    pub period: Duration,
    /// Entries (batches) the stream keeps, approximately (default 2000).
    pub max_entries: u64,
    /// The stream expires this long after its last write (default 10 minutes).
    pub ttl: Duration,
}

impl Default for PrefixShareConfig {
    fn default() -> Self {
        PrefixShareConfig {
            name: "default".to_owned(),
            gateway_id: format!("{:016x}", rand::random::<u64>()),
            period: Duration::from_millis(100),
            max_entries: 2000,
            ttl: Duration::from_secs(600),
        }
    }
}

/// What a [`PrefixShare`] has done, for tests and metrics.
#[derive(Debug, Default)]
pub struct PrefixShareStats {
    rounds: AtomicU64,
    errors: AtomicU64,
    sent: AtomicU64,
    received: AtomicU64,
}

impl PrefixShareStats {
    /// Rounds that completed.
    pub fn rounds(&self) -> u64 {
        self.rounds.load(Ordering::Relaxed)
    }

    /// Rounds that failed.
    pub fn errors(&self) -> u64 {
        self.errors.load(Ordering::Relaxed)
    }

    /// Placements sent.
    pub fn sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }

    /// Placements received and recorded.
    pub fn received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }
}

/// Shares a [`PrefixIndex`]'s placements with the other gateways of a pool; see the
/// [module docs](self). The index must queue its records
/// ([`PrefixIndex::sharing`]). Dropping the share stops the task.
pub struct PrefixShare {
    task: JoinHandle<()>,
    stats: Arc<PrefixShareStats>,
}

impl std::fmt::Debug for PrefixShare {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PrefixShare")
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

impl Drop for PrefixShare {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl PrefixShare {
    /// Starts sharing `index` (the index of `pool`'s placements) through `store`'s Redis.
    pub fn spawn<B: Send + Sync + 'static>(
        store: &RedisStore,
        pool: Pool<B>,
        index: Arc<PrefixIndex>,
        config: PrefixShareConfig,
    ) -> PrefixShare {
        let stats = Arc::new(PrefixShareStats::default());
        let round = Round {
            conn: store.connection(),
            script: Script::new(ROUND),
            key: format!(
                "{}:prefixes:{{{}}}",
                store.config().get_prefix(),
                escape_key(&config.name)
            ),
            timeout: store.config().get_timeout(),
            config,
        };
        let task = tokio::spawn(run(round, pool, index, stats.clone()));
        PrefixShare { task, stats }
    }

    /// What it has done so far.
    pub fn stats(&self) -> &PrefixShareStats {
        &self.stats
    }
}

/// The view name as a key part: alphanumerics, `-` and `_` kept, anything else as `%XX`.
fn escape_key(name: &str) -> String {
    let mut out = String::new();
    for b in name.bytes() {
        if b.is_ascii_alphanumeric() || b == b'-' || b == b'_' {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

struct Round {
    conn: ConnectionManager,
    script: Script,
    key: String,
    timeout: Duration,
    config: PrefixShareConfig,
}

async fn run<B>(
    mut round: Round,
    pool: Pool<B>,
    index: Arc<PrefixIndex>,
    stats: Arc<PrefixShareStats>,
) {
    let period = round.config.period.max(Duration::from_millis(1));
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let ttl_ms = round.config.ttl.as_millis().clamp(1, u64::MAX as u128) as u64;
    let mut last = String::new();
    loop {
        tick.tick().await;
        let batch = index.take_shared();
        let payload = encode(&batch);
        let mut inv = round.script.key(&round.key);
        inv.arg(&round.config.gateway_id)
            .arg(&last)
            .arg(&payload)
            .arg(round.config.max_entries.max(1))
            .arg(MAX_READ)
            .arg(ttl_ms);
        let reply = tokio::time::timeout(
            round.timeout,
            inv.invoke_async::<Vec<Vec<u8>>>(&mut round.conn),
        )
        .await;
        match reply {
            Ok(Ok(reply)) if !reply.is_empty() => {
                stats.rounds.fetch_add(1, Ordering::Relaxed);
                stats.sent.fetch_add(batch.len() as u64, Ordering::Relaxed);
                metrics::counter!(PREFIX_SHARE_SENT_COUNTER).increment(batch.len() as u64);
                last = String::from_utf8_lossy(&reply[0]).into_owned();
                let snapshot = pool.load();
                let mut received = 0u64;
                for entry in &reply[1..] {
                    for rec in decode(entry) {
                        if snapshot.get(rec.replica.as_str()).is_some() {
                            index.record_shared(&rec.replica, rec.weight, &rec.hashes);
                            received += 1;
                        }
                    }
                }
                stats.received.fetch_add(received, Ordering::Relaxed);
                metrics::counter!(PREFIX_SHARE_RECEIVED_COUNTER).increment(received);
            }
            _ => {
                // The batch is lost for the others; this gateway's own index has it.
                stats.errors.fetch_add(1, Ordering::Relaxed);
                metrics::counter!(PREFIX_SHARE_ERRORS_COUNTER).increment(1);
            }
        }
    }
}

/// One line per record: `replica weight block_tokens tokens h1,h2,...` (hashes in hex).
fn encode(records: &[SharedRecord]) -> String {
    let mut out = String::new();
    for r in records {
        if r.hashes.is_empty() {
            continue;
        }
        escape_into(r.replica.as_str(), &mut out);
        out.push_str(&format!(
            " {} {} {} ",
            r.weight,
            r.hashes.block_tokens(),
            r.hashes.tokens()
        ));
        for (i, h) in r.hashes.hashes().iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            out.push_str(&format!("{h:x}"));
        }
        out.push('\n');
    }
    out
}

/// The records of one batch; malformed lines are skipped.
fn decode(batch: &[u8]) -> Vec<SharedRecord> {
    let Ok(text) = std::str::from_utf8(batch) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for line in text.lines() {
        let mut parts = line.split(' ');
        let (Some(id), Some(w), Some(bt), Some(tokens), Some(hashes), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            continue;
        };
        let Some(replica) = unescape(id).and_then(|s| ReplicaId::new(s).ok()) else {
            continue;
        };
        let (Ok(weight), Ok(block_tokens), Ok(tokens)) =
            (w.parse::<f64>(), bt.parse::<u32>(), tokens.parse::<u64>())
        else {
            continue;
        };
        let hashes: Option<Vec<u64>> = hashes
            .split(',')
            .take(crate::prefix::MAX_CHECKPOINTS)
            .map(|h| u64::from_str_radix(h, 16).ok())
            .collect();
        let Some(hashes) = hashes.filter(|h| !h.is_empty()) else {
            continue;
        };
        if !weight.is_finite() || weight <= 0.0 || block_tokens == 0 {
            continue;
        }
        out.push(SharedRecord {
            replica,
            weight,
            hashes: PrefixHashes::new(hashes, block_tokens, tokens),
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_garbage_is_skipped() {
        let rec = SharedRecord {
            replica: ReplicaId::new("10.0.0.1:8000").unwrap(),
            weight: 2.0,
            hashes: PrefixHashes::new(vec![1u64, 0xdead_beef, u64::MAX], 16, 4000),
        };
        let text = encode(std::slice::from_ref(&rec));
        let mut batch = text.clone().into_bytes();
        batch.extend_from_slice(b"bad line\nr 1 16 10 zz\nr -1 16 10 1,2\n");
        assert!(decode(b"\xff\xfe").is_empty());
        let back = decode(&batch);
        assert_eq!(back.len(), 1);
        assert_eq!(back[0].replica, rec.replica);
        assert_eq!(back[0].weight, 2.0);
        assert_eq!(back[0].hashes.hashes(), rec.hashes.hashes());
        assert_eq!(back[0].hashes.tokens(), 4000);
        assert_eq!(back[0].hashes.block_tokens(), 16);
    }
}
