//! The gateway's configuration and its command-line flags.

use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use http::HeaderName;

/// Default body limit: 10 MiB.
pub const DEFAULT_MAX_BODY_BYTES: usize = 10 * 1024 * 1024;

/// How the gateway picks a replica for a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Policy {
    /// Session affinity on the affinity header (consistent hashing with bounded loads and pins),
    /// least-loaded for requests without a session.
    #[default]
    Affinity,
    /// Weighted least-in-flight (power of two choices).
    LeastLoaded,
    /// Rotation over the eligible replicas.
    RoundRobin,
}

impl Policy {
    /// The flag spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Policy::Affinity => "affinity",
            Policy::LeastLoaded => "least-loaded",
            Policy::RoundRobin => "round-robin",
        }
    }
}

/// What placement minimises (`--placement`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PlacementMode {
    /// Predicted time to first token from each replica's queued prefill, learned prefill rate
    /// and the prompt's cached part there (session pins and a prefix index of the prompts sent),
    /// with the load bound counted in estimated tokens. The default.
    #[default]
    PredictedTtft,
    /// Requests in flight, as before predicted-TTFT placement (for comparison).
    Requests,
}

impl PlacementMode {
    /// The flag spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            PlacementMode::PredictedTtft => "predicted-ttft",
            PlacementMode::Requests => "requests",
        }
    }
}

/// Whether a chat request without a session header gets an implicit session key
/// (`--implicit-sessions`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ImplicitSessions {
    /// On with a Redis counter store (several gateways: the key, pinned in Redis, finds the
    /// conversation's replica from any of them), off with the in-memory one (one gateway's
    /// prefix index already finds it). The default.
    #[default]
    Auto,
    /// Always: the digest of the conversation's leading part (every string up to the end of
    /// the first user message) stands in for the missing session key.
    On,
    /// Never: keyless requests are placed by the prefix index alone.
    Off,
}

impl ImplicitSessions {
    /// The flag spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            ImplicitSessions::Auto => "auto",
            ImplicitSessions::On => "on",
            ImplicitSessions::Off => "off",
        }
    }

    /// Whether implicit keys apply with `store`.
    pub fn enabled(self, store: &CounterStoreSpec) -> bool {
        match self {
            ImplicitSessions::Auto => matches!(store, CounterStoreSpec::Redis(_)),
            ImplicitSessions::On => true,
            ImplicitSessions::Off => false,
        }
    }
}

/// `N/SECS`: at most `n` per `per`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    /// Allowance per window.
    pub n: u64,
    /// Window length.
    pub per: Duration,
}

impl Rate {
    /// Parses `N/SECS` (`100/60`, or `100/60s`).
    ///
    /// ```
    /// use replica_router_gateway::Rate;
    /// let r = Rate::parse("100/60").unwrap();
    /// assert_eq!((r.n, r.per.as_secs()), (100, 60));
    /// assert!(Rate::parse("100").is_none() && Rate::parse("1/0").is_none());
    /// ```
    pub fn parse(s: &str) -> Option<Rate> {
        let (n, secs) = s.split_once('/')?;
        let n: u64 = n.trim().parse().ok()?;
        let secs = secs.trim();
        let secs: f64 = secs.strip_suffix('s').unwrap_or(secs).parse().ok()?;
        if n == 0 || !secs.is_finite() || secs <= 0.0 || secs > 1e9 {
            return None;
        }
        Some(Rate {
            n,
            per: Duration::from_secs_f64(secs),
        })
    }
}

/// Where shared counters (tenant quotas) live.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum CounterStoreSpec {
    /// In this process only.
    #[default]
    Memory,
    /// A Redis server shared by every gateway instance (`redis://HOST:PORT`).
    Redis(String),
}

/// One `--replica URL[,weight=W][,model=NAME][,max_context=N][,tp=N][,pp=N]`.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct ReplicaArg {
    /// Base URL (`http://host:port`, optionally with a path prefix).
    pub url: String,
    /// Capacity weight (default 1).
    pub weight: f64,
    /// The model this replica serves (`model=NAME`): replicas of one model form a pool, and
    /// requests go to the pool their body's `model` names. `None` on every replica: one pool
    /// for whatever model a request names.
    pub model: Option<String>,
    /// The longest context the replica accepts, in tokens (`max_context=N`); when not given,
    /// read from the replica's `GET /v1/models` (`max_model_len`) at start, else unknown.
    pub max_context: Option<u32>,
    /// Tensor-parallel degree inside the replica (`tp=N`, default 1).
    pub tensor_parallel: u32,
    /// Pipeline-parallel degree inside the replica (`pp=N`, default 1).
    pub pipeline_parallel: u32,
}

impl ReplicaArg {
    /// A replica at `url` with weight 1 and nothing else declared.
    pub fn new(url: impl Into<String>) -> Self {
        ReplicaArg {
            url: url.into(),
            weight: 1.0,
            model: None,
            max_context: None,
            tensor_parallel: 1,
            pipeline_parallel: 1,
        }
    }

    /// Parses `URL[,weight=W][,model=NAME][,max_context=N][,tp=N][,pp=N]`.
    ///
    /// ```
    /// use replica_router_gateway::ReplicaArg;
    /// let r = ReplicaArg::parse("http://10.0.0.1:8000,model=llama-70b,tp=2,max_context=32768").unwrap();
    /// assert_eq!(r.model.as_deref(), Some("llama-70b"));
    /// assert_eq!((r.tensor_parallel, r.max_context), (2, Some(32_768)));
    /// assert!(ReplicaArg::parse("http://10.0.0.1:8000,tp=0").is_err());
    /// ```
    pub fn parse(s: &str) -> Result<ReplicaArg, ConfigError> {
        let mut parts = s.split(',');
        let url = parts.next().unwrap_or_default().trim().to_owned();
        if url.is_empty() {
            return Err(ConfigError::new(format!("--replica {s:?}: no URL")));
        }
        let mut arg = ReplicaArg::new(url);
        let count = |what: &str, v: &str| -> Result<u32, ConfigError> {
            v.parse::<u32>().ok().filter(|n| *n > 0).ok_or_else(|| {
                ConfigError::new(format!(
                    "--replica {s:?}: {what} must be a whole number > 0"
                ))
            })
        };
        for p in parts {
            match p.trim().split_once('=') {
                Some(("weight", w)) => {
                    arg.weight = w
                        .parse::<f64>()
                        .ok()
                        .filter(|w| w.is_finite() && *w > 0.0)
                        .ok_or_else(|| {
                            ConfigError::new(format!(
                                "--replica {s:?}: weight must be a number > 0"
                            ))
                        })?;
                }
                Some(("model", m)) if !m.trim().is_empty() => arg.model = Some(m.trim().to_owned()),
                Some(("max_context", n)) => arg.max_context = Some(count("max_context", n)?),
                Some(("tp", n)) => arg.tensor_parallel = count("tp", n)?,
                Some(("pp", n)) => arg.pipeline_parallel = count("pp", n)?,
                _ => {
                    return Err(ConfigError::new(format!(
                        "--replica {s:?}: unknown option {p:?} (expected weight=W, model=NAME, \
                         max_context=N, tp=N or pp=N)"
                    )))
                }
            }
        }
        Ok(arg)
    }
}

/// Everything the gateway needs; [`GatewayConfig::from_args`] reads it from command-line flags.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// Address to listen on (`--listen`, default `127.0.0.1:8080`; port 0 picks a free port).
    pub listen: SocketAddr,
    /// The replicas (`--replica URL[,weight=W][,model=NAME][,max_context=N][,tp=N][,pp=N]`,
    /// repeatable).
    pub replicas: Vec<ReplicaArg>,
    /// Session header for affinity (`--affinity-header`, default `x-session-id`).
    pub affinity_header: HeaderName,
    /// User header, an alternative affinity key (`--user-header`, none by default).
    pub user_header: Option<HeaderName>,
    /// Tenant header for quotas (`--tenant-header`, default `x-tenant-id`).
    pub tenant_header: HeaderName,
    /// Wait budget for SLO shedding (`--slo-wait-ms`), none by default.
    pub slo_wait: Option<Duration>,
    /// Requests per tenant per window (`--tenant-rate N/SECS`).
    pub tenant_rate: Option<Rate>,
    /// Estimated tokens per tenant per window (`--tenant-tokens N/SECS`).
    pub tenant_tokens: Option<Rate>,
    /// Where quota counters live (`--counter-store memory|redis://HOST:PORT`).
    pub counter_store: CounterStoreSpec,
    /// The picking policy (`--policy affinity|least-loaded|round-robin`, default affinity).
    pub policy: Policy,
    /// What `affinity` and `least-loaded` minimise (`--placement predicted-ttft|requests`,
    /// default predicted-ttft).
    pub placement: PlacementMode,
    /// Largest accepted request body (`--max-body-bytes`, default 10 MiB); larger gets 413.
    pub max_body_bytes: usize,
    /// Idle upstream connections kept per replica (`--upstream-idle`, default 1024).
    pub upstream_idle_per_replica: usize,
    /// Runtime worker threads (`--threads`, used by the example's `main`; 0 = one per core).
    pub threads: usize,
    /// With a Redis counter store, how often this gateway shares its outstanding work per
    /// replica with the other gateways and reads theirs (`--work-view-ms N`, default 100; 0
    /// turns the shared view off). Placement by predicted TTFT counts their work too.
    pub work_view_period: Option<Duration>,
    /// Implicit session keys for chats sent without one (`--implicit-sessions auto|on|off`,
    /// default auto).
    pub implicit_sessions: ImplicitSessions,
    /// Transport limits and timeouts (`--header-timeout-ms`, `--body-timeout-ms`, ...).
    pub transport: TransportConfig,
    /// Concurrent requests per tenant (`--tenant-concurrency N`, N >= 1), none by default.
    pub tenant_concurrency: Option<u64>,
    /// What the tenant quota does when its counter store fails (`--store-failure open|closed`,
    /// default open: admit without counting; closed: answer 503).
    pub store_failure: replica_router::quota::FailurePolicy,
    /// The API key file (`--api-keys FILE`: `KEY-SHA256-HEX TENANT [rate=N/SECS]
    /// [tokens=N/SECS] [concurrency=N]` per line): bearer keys name the tenant, unknown or missing
    /// keys get 401. None by default (the tenant header is trusted).
    pub api_keys: Option<std::path::PathBuf>,
    /// With `--api-keys`, let a request's tenant header name its tenant anyway
    /// (`--trust-tenant-header`, for a gateway behind an authenticating proxy).
    pub trust_tenant_header: bool,
    /// Where the admin routes (`GET /admin/replicas`, `GET /admin/advice`) are served
    /// (`--admin on|off|ADDR`): on the main listener (default), nowhere, or only on their own
    /// address (keep it on loopback or a private network: they show the fleet's state).
    pub admin: AdminMode,
    /// The engines' batch ceiling (`--max-num-seqs N`, default 256, vLLM's), for
    /// `GET /admin/advice`'s batch occupancy.
    pub max_num_seqs: u32,
}

/// Where the admin routes are served (`--admin`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AdminMode {
    /// On the main listener.
    #[default]
    On,
    /// Not at all (404).
    Off,
    /// Only on this address, with nothing else.
    Listen(SocketAddr),
}

/// Timeouts and caps of the gateway's client and upstream connections. A zero duration (or cap)
/// turns that limit off.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransportConfig {
    /// A new connection must deliver its first request head within this
    /// (`--header-timeout-ms`, default 10 s), else it is closed.
    pub header_timeout: Duration,
    /// After its first request, a connection must deliver its next request head (waiting idle
    /// included) within this (`--keepalive-idle-ms`, default 60 s), else it is closed. Zero turns
    /// keep-alive off (one request per connection).
    pub keepalive_idle: Duration,
    /// A request body must arrive whole within this (`--body-timeout-ms`, default 60 s), else 408.
    pub body_timeout: Duration,
    /// At most this between two pieces of a request body (`--body-idle-timeout-ms`, default
    /// 10 s), else 408.
    pub body_idle_timeout: Duration,
    /// Client connections served at once (`--max-connections`; default 10 000, or less when the
    /// file-descriptor limit is lower: half of it minus 64, at least 16, leaving room for upstream
    /// connections). Beyond it a connection is answered 503 and closed at once.
    pub max_connections: usize,
    /// Bytes of request bodies held in memory across all connections
    /// (`--max-buffered-body-bytes`, default 192 MiB). A request whose body would go beyond it
    /// gets 503; past the first [`SMALL_BODY_BYTES`](crate::SMALL_BODY_BYTES) of a body, only
    /// seven eighths of the cap may be used, so large stalled bodies never lock out small
    /// requests.
    pub max_buffered_body_bytes: usize,
    /// A replica must send the response head within this (`--upstream-ttfb-timeout-ms`, default
    /// 120 s: a long prefill is legitimate, and engines send the head early); else the attempt
    /// fails (and fails over to another replica when one is eligible).
    pub upstream_ttfb_timeout: Duration,
    /// At most this between two pieces of a replica's response body
    /// (`--upstream-idle-timeout-ms`, default 60 s); else the response ends with an error.
    pub upstream_idle_timeout: Duration,
    /// On shutdown, requests in progress get this long to finish (`--shutdown-grace-ms`, default
    /// 10 s); then the remaining connections are closed.
    pub shutdown_grace: Duration,
    /// A write to a client that makes no progress for this long (the client stopped reading)
    /// closes its connection, ending the response and the replica's stream behind it
    /// (`--client-write-timeout-ms`, default 30 s; like nginx's `send_timeout`, the limit is
    /// between two writes, not on the whole response).
    pub client_write_timeout: Duration,
}

impl Default for TransportConfig {
    fn default() -> Self {
        TransportConfig {
            header_timeout: Duration::from_secs(10),
            keepalive_idle: Duration::from_secs(60),
            body_timeout: Duration::from_secs(60),
            body_idle_timeout: Duration::from_secs(10),
            max_connections: crate::limits::default_max_connections(),
            max_buffered_body_bytes: 192 * 1024 * 1024,
            upstream_ttfb_timeout: Duration::from_secs(120),
            upstream_idle_timeout: Duration::from_secs(60),
            shutdown_grace: Duration::from_secs(10),
            client_write_timeout: Duration::from_secs(30),
        }
    }
}

impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            replicas: Vec::new(),
            affinity_header: HeaderName::from_static("x-session-id"),
            user_header: None,
            tenant_header: HeaderName::from_static("x-tenant-id"),
            slo_wait: None,
            tenant_rate: None,
            tenant_tokens: None,
            counter_store: CounterStoreSpec::Memory,
            policy: Policy::default(),
            placement: PlacementMode::default(),
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            upstream_idle_per_replica: 1024,
            threads: 0,
            work_view_period: Some(Duration::from_millis(100)),
            implicit_sessions: ImplicitSessions::Auto,
            transport: TransportConfig::default(),
            tenant_concurrency: None,
            store_failure: replica_router::quota::FailurePolicy::Open,
            api_keys: None,
            trust_tenant_header: false,
            admin: AdminMode::On,
            max_num_seqs: 256,
        }
    }
}

/// A bad command line or configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError(String);

impl ConfigError {
    pub(crate) fn new(msg: impl Into<String>) -> Self {
        ConfigError(msg.into())
    }

    /// Whether this is the answer to `--help` (the message is the usage text).
    pub fn is_help(&self) -> bool {
        self.0 == USAGE
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConfigError {}

/// The gateway's usage text.
pub const USAGE: &str = "usage: gateway --replica URL[,weight=W][,model=NAME][,max_context=N][,tp=N][,pp=N]
  [--replica ...] [--listen ADDR]
  [--policy affinity|least-loaded|round-robin] [--placement predicted-ttft|requests]
  [--affinity-header NAME] [--user-header NAME]
  [--tenant-header NAME] [--slo-wait-ms N] [--tenant-rate N/SECS] [--tenant-tokens N/SECS]
  [--counter-store memory|redis://HOST:PORT] [--work-view-ms N] [--implicit-sessions auto|on|off]
  [--max-body-bytes N] [--upstream-idle N] [--threads N]
  [--header-timeout-ms N] [--keepalive-idle-ms N] [--body-timeout-ms N] [--body-idle-timeout-ms N]
  [--max-connections N] [--max-buffered-body-bytes N] [--upstream-ttfb-timeout-ms N]
  [--upstream-idle-timeout-ms N] [--shutdown-grace-ms N] [--client-write-timeout-ms N]
  [--tenant-concurrency N] [--store-failure open|closed]
  [--api-keys FILE] [--trust-tenant-header] [--admin on|off|ADDR] [--max-num-seqs N]
transport limits (0 turns one off): --header-timeout-ms first request head of a connection
  (default 10000); --keepalive-idle-ms wait for and read each later request head (60000; 0 = no
  keep-alive); --body-timeout-ms whole request body (60000, else 408); --body-idle-timeout-ms
  between body pieces (10000, else 408); --max-connections client connections at once (10000 or
  from the fd limit; beyond: 503 and close); --max-buffered-body-bytes request bodies held across
  connections (201326592 = 192 MiB, beyond: 503); --upstream-ttfb-timeout-ms replica response head (120000,
  else fail over); --upstream-idle-timeout-ms between replica body pieces (60000);
  --shutdown-grace-ms requests in progress on shutdown (10000, then connections are closed);
  --client-write-timeout-ms a response write the client does not read (30000, then close)";

impl GatewayConfig {
    /// Parses command-line flags (without the program name). `--flag value` and `--flag=value`
    /// are both accepted.
    ///
    /// ```
    /// use replica_router_gateway::{GatewayConfig, Policy};
    /// let cfg = GatewayConfig::from_args(["--replica", "http://127.0.0.1:8001,weight=2",
    ///     "--replica=http://127.0.0.1:8002", "--policy", "round-robin", "--listen", "127.0.0.1:0"]).unwrap();
    /// assert_eq!(cfg.replicas.len(), 2);
    /// assert_eq!(cfg.replicas[0].weight, 2.0);
    /// assert_eq!(cfg.policy, Policy::RoundRobin);
    /// assert!(GatewayConfig::from_args(["--policy", "random"]).is_err());
    /// ```
    pub fn from_args<I, S>(args: I) -> Result<GatewayConfig, ConfigError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let mut cfg = GatewayConfig::default();
        let args: Vec<String> = args.into_iter().map(|a| a.as_ref().to_owned()).collect();
        let mut i = 0;
        while i < args.len() {
            let arg = &args[i];
            i += 1;
            if arg == "-h" || arg == "--help" {
                return Err(ConfigError::new(USAGE));
            }
            if arg == "--trust-tenant-header" {
                cfg.trust_tenant_header = true;
                continue;
            }
            let (flag, inline) = match arg.split_once('=') {
                Some((f, v)) if f.starts_with("--") => (f, Some(v.to_owned())),
                _ => (arg.as_str(), None),
            };
            let mut value = || -> Result<String, ConfigError> {
                if let Some(v) = inline.clone() {
                    return Ok(v);
                }
                let v = args
                    .get(i)
                    .cloned()
                    .ok_or_else(|| ConfigError::new(format!("{flag} needs a value")))?;
                i += 1;
                Ok(v)
            };
            match flag {
                "--listen" => {
                    let v = value()?;
                    cfg.listen = v.parse().map_err(|_| {
                        ConfigError::new(format!("--listen {v:?}: expected IP:PORT"))
                    })?;
                }
                "--replica" => cfg.replicas.push(ReplicaArg::parse(&value()?)?),
                "--affinity-header" => cfg.affinity_header = header_name(flag, &value()?)?,
                "--user-header" => cfg.user_header = Some(header_name(flag, &value()?)?),
                "--tenant-header" => cfg.tenant_header = header_name(flag, &value()?)?,
                "--slo-wait-ms" => {
                    cfg.slo_wait = Some(Duration::from_millis(number(flag, &value()?)?))
                }
                "--tenant-rate" => cfg.tenant_rate = Some(rate(flag, &value()?)?),
                "--tenant-tokens" => cfg.tenant_tokens = Some(rate(flag, &value()?)?),
                "--counter-store" => {
                    let v = value()?;
                    cfg.counter_store = if v == "memory" {
                        CounterStoreSpec::Memory
                    } else if v.starts_with("redis://") || v.starts_with("rediss://") {
                        CounterStoreSpec::Redis(v)
                    } else {
                        return Err(ConfigError::new(format!(
                            "--counter-store {v:?}: expected memory or redis://HOST:PORT"
                        )));
                    };
                }
                "--policy" => {
                    let v = value()?;
                    cfg.policy = match v.as_str() {
                        "affinity" => Policy::Affinity,
                        "least-loaded" | "least_loaded" => Policy::LeastLoaded,
                        "round-robin" | "round_robin" => Policy::RoundRobin,
                        _ => {
                            return Err(ConfigError::new(format!(
                                "--policy {v:?}: expected affinity, least-loaded or round-robin"
                            )))
                        }
                    };
                }
                "--placement" => {
                    let v = value()?;
                    cfg.placement = match v.as_str() {
                        "predicted-ttft" | "ttft" => PlacementMode::PredictedTtft,
                        "requests" => PlacementMode::Requests,
                        _ => {
                            return Err(ConfigError::new(format!(
                                "--placement {v:?}: expected predicted-ttft or requests"
                            )))
                        }
                    };
                }
                "--implicit-sessions" => {
                    let v = value()?;
                    cfg.implicit_sessions = match v.as_str() {
                        "auto" => ImplicitSessions::Auto,
                        "on" => ImplicitSessions::On,
                        "off" => ImplicitSessions::Off,
                        _ => {
                            return Err(ConfigError::new(format!(
                                "--implicit-sessions {v:?}: expected auto, on or off"
                            )))
                        }
                    };
                }
                "--max-body-bytes" => cfg.max_body_bytes = number::<usize>(flag, &value()?)?.max(1),
                "--upstream-idle" => cfg.upstream_idle_per_replica = number(flag, &value()?)?,
                "--threads" => cfg.threads = number(flag, &value()?)?,
                "--work-view-ms" => {
                    let ms: u64 = number(flag, &value()?)?;
                    cfg.work_view_period = (ms > 0).then(|| Duration::from_millis(ms));
                }
                "--header-timeout-ms" => cfg.transport.header_timeout = ms(flag, &value()?)?,
                "--keepalive-idle-ms" => cfg.transport.keepalive_idle = ms(flag, &value()?)?,
                "--body-timeout-ms" => cfg.transport.body_timeout = ms(flag, &value()?)?,
                "--body-idle-timeout-ms" => cfg.transport.body_idle_timeout = ms(flag, &value()?)?,
                "--max-connections" => cfg.transport.max_connections = number(flag, &value()?)?,
                "--max-buffered-body-bytes" => {
                    cfg.transport.max_buffered_body_bytes = number(flag, &value()?)?
                }
                "--upstream-ttfb-timeout-ms" => {
                    cfg.transport.upstream_ttfb_timeout = ms(flag, &value()?)?
                }
                "--upstream-idle-timeout-ms" => {
                    cfg.transport.upstream_idle_timeout = ms(flag, &value()?)?
                }
                "--shutdown-grace-ms" => cfg.transport.shutdown_grace = ms(flag, &value()?)?,
                "--client-write-timeout-ms" => {
                    cfg.transport.client_write_timeout = ms(flag, &value()?)?
                }
                "--tenant-concurrency" => {
                    let v = value()?;
                    let n: u64 = number(flag, &v)?;
                    if n == 0 {
                        return Err(ConfigError::new(format!(
                            "--tenant-concurrency {v:?}: expected an integer >= 1"
                        )));
                    }
                    cfg.tenant_concurrency = Some(n);
                }
                "--store-failure" => {
                    let v = value()?;
                    cfg.store_failure = match v.as_str() {
                        "open" => replica_router::quota::FailurePolicy::Open,
                        "closed" => replica_router::quota::FailurePolicy::Closed,
                        _ => {
                            return Err(ConfigError::new(format!(
                                "--store-failure {v:?}: expected open or closed"
                            )))
                        }
                    };
                }
                "--api-keys" => cfg.api_keys = Some(value()?.into()),
                "--max-num-seqs" => {
                    let n: u32 = number(flag, &value()?)?;
                    if n == 0 {
                        return Err(ConfigError::new(format!("{flag}: must be at least 1")));
                    }
                    cfg.max_num_seqs = n;
                }
                "--admin" => {
                    let v = value()?;
                    cfg.admin = match v.as_str() {
                        "on" => AdminMode::On,
                        "off" => AdminMode::Off,
                        addr => AdminMode::Listen(addr.parse().map_err(|_| {
                            ConfigError::new(format!(
                                "--admin {v:?}: expected on, off or an address (127.0.0.1:9090)"
                            ))
                        })?),
                    };
                }
                _ => {
                    return Err(ConfigError::new(format!(
                        "unknown argument {arg:?}\n{USAGE}"
                    )))
                }
            }
        }
        Ok(cfg)
    }
}

fn header_name(flag: &str, v: &str) -> Result<HeaderName, ConfigError> {
    HeaderName::from_bytes(v.trim().to_ascii_lowercase().as_bytes())
        .map_err(|_| ConfigError::new(format!("{flag} {v:?}: not a valid header name")))
}

fn number<T: std::str::FromStr>(flag: &str, v: &str) -> Result<T, ConfigError> {
    v.trim()
        .parse()
        .map_err(|_| ConfigError::new(format!("{flag} {v:?}: expected a non-negative integer")))
}

fn ms(flag: &str, v: &str) -> Result<Duration, ConfigError> {
    number::<u64>(flag, v).map(Duration::from_millis)
}

fn rate(flag: &str, v: &str) -> Result<Rate, ConfigError> {
    Rate::parse(v).ok_or_else(|| {
        ConfigError::new(format!(
            "{flag} {v:?}: expected N/SECS with N > 0 and SECS > 0"
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_fixed_flag_parses() {
        let cfg = GatewayConfig::from_args([
            "--listen",
            "0.0.0.0:9000",
            "--replica",
            "http://a:1,weight=0.5",
            "--replica",
            "http://b:2",
            "--affinity-header",
            "X-Conversation",
            "--user-header",
            "x-user",
            "--tenant-header",
            "x-org",
            "--slo-wait-ms",
            "200",
            "--tenant-rate",
            "100/60",
            "--tenant-tokens",
            "50000/60s",
            "--counter-store",
            "redis://127.0.0.1:6379",
            "--policy",
            "least-loaded",
        ])
        .unwrap();
        assert_eq!(cfg.listen.port(), 9000);
        assert_eq!(
            cfg.replicas[0],
            ReplicaArg {
                weight: 0.5,
                ..ReplicaArg::new("http://a:1")
            }
        );
        assert_eq!(cfg.affinity_header, "x-conversation");
        assert_eq!(cfg.user_header.unwrap(), "x-user");
        assert_eq!(cfg.tenant_header, "x-org");
        assert_eq!(cfg.slo_wait, Some(Duration::from_millis(200)));
        assert_eq!(
            cfg.tenant_rate,
            Some(Rate {
                n: 100,
                per: Duration::from_secs(60)
            })
        );
        assert_eq!(cfg.tenant_tokens.unwrap().n, 50_000);
        assert_eq!(
            cfg.counter_store,
            CounterStoreSpec::Redis("redis://127.0.0.1:6379".into())
        );
        assert_eq!(cfg.policy, Policy::LeastLoaded);
    }

    #[test]
    fn transport_flags_parse() {
        let cfg = GatewayConfig::from_args([
            "--header-timeout-ms=1",
            "--keepalive-idle-ms=2",
            "--body-timeout-ms=3",
            "--body-idle-timeout-ms=4",
            "--max-connections=5",
            "--max-buffered-body-bytes=6",
            "--upstream-ttfb-timeout-ms=7",
            "--upstream-idle-timeout-ms=8",
            "--shutdown-grace-ms=9",
            "--client-write-timeout-ms=10",
        ])
        .unwrap();
        let t = &cfg.transport;
        let d = Duration::from_millis;
        assert_eq!(
            (
                t.header_timeout,
                t.keepalive_idle,
                t.body_timeout,
                t.body_idle_timeout
            ),
            (d(1), d(2), d(3), d(4))
        );
        assert_eq!((t.max_connections, t.max_buffered_body_bytes), (5, 6));
        assert_eq!(
            (
                t.upstream_ttfb_timeout,
                t.upstream_idle_timeout,
                t.shutdown_grace
            ),
            (d(7), d(8), d(9))
        );
        assert_eq!(t.client_write_timeout, d(10));
        let def = TransportConfig::default();
        assert_eq!(def.header_timeout, Duration::from_secs(10));
        assert!(def.max_connections >= 16 && def.max_connections <= 10_000);
        assert!(GatewayConfig::from_args(["--max-connections", "-1"]).is_err());
    }

    #[test]
    fn bad_flags_are_errors() {
        for bad in [
            &["--listen", "nowhere"][..],
            &["--replica", "http://a:1,weight=0"],
            &["--replica", "http://a:1,weight=NaN"],
            &["--replica", "http://a:1,color=red"],
            &["--replica", ""],
            &["--affinity-header", "bad header"],
            &["--slo-wait-ms", "-1"],
            &["--tenant-rate", "5"],
            &["--tenant-tokens", "0/60"],
            &["--counter-store", "postgres://x"],
            &["--policy"],
            &["--frobnicate"],
            &["--tenant-concurrency", "0"],
            &["--tenant-concurrency", "x"],
            &["--store-failure", "maybe"],
            &["--api-keys"],
        ] {
            assert!(
                GatewayConfig::from_args(bad.iter().copied()).is_err(),
                "{bad:?}"
            );
        }
        assert!(GatewayConfig::from_args(["--help"]).unwrap_err().is_help());
    }

    #[test]
    fn quota_and_auth_flags_parse() {
        let cfg = GatewayConfig::from_args([
            "--tenant-concurrency",
            "3",
            "--store-failure=closed",
            "--api-keys",
            "/etc/keys",
            "--trust-tenant-header",
        ])
        .unwrap();
        assert_eq!(cfg.tenant_concurrency, Some(3));
        assert_eq!(
            cfg.store_failure,
            replica_router::quota::FailurePolicy::Closed
        );
        assert_eq!(cfg.api_keys.unwrap().to_str(), Some("/etc/keys"));
        assert!(cfg.trust_tenant_header);
        let cfg = GatewayConfig::from_args(["--store-failure", "open"]).unwrap();
        assert_eq!(
            cfg.store_failure,
            replica_router::quota::FailurePolicy::Open
        );
        assert!(!cfg.trust_tenant_header && cfg.api_keys.is_none());
    }
}
