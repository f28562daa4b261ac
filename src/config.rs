//! Configuration: the TOML file, parsed and then validated into the types below.
//!
//! ```text
//!  corral.toml ──read──▶ text ──toml + serde──▶ RawConfig ──validate──▶ Config
//!       │                        │                  │                      │
//!       │             syntax, types, units,   every table is         checked, defaults
//!       │             unknown fields          deny_unknown_fields;   applied; what the
//!       │             (serde, with a span)    Spanned<…> keeps the   rest of the crate
//!       │                        │            place of each value    reads
//!       ▼                        ▼                  ▼
//!  ConfigError::Read    ConfigError::Invalid ◀─────┘
//!  "path: cannot read"  "path:LINE: route \"name\": field `ttl`: reason"
//! ```
//!
//! The raw structs (`Raw*`, private, in `raw.rs`) mirror the file; each value that a rule may reject
//! keeps its byte span so the error can name its line. Validation (`check.rs`) turns them into the
//! types below. A serde error carries only a span, so the field and the route are recovered by
//! walking the parsed document to the key at that span (`locate.rs`, which also turns a span into
//! a line). Either way the message has one shape, which [`ConfigError`] documents.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::{HeaderName, Method, Uri};

use check::Checker;
use raw::RawConfig;

mod check;
mod defaults;
mod locate;
mod raw;
mod tls;

pub use defaults::default_workers;
pub use tls::{ListenerTls, RedisTls, UpstreamTls};

/// A validated configuration: every field has been checked and every default applied.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file this configuration was read from (for messages), or `<inline>`.
    pub source: PathBuf,
    pub server: ServerConfig,
    /// `None`: embedded mode (L1 and in-process coalescing only).
    pub redis: Option<RedisConfig>,
    pub cache: CacheConfig,
    /// In file order. Names are unique. Empty only when `server.default_upstream` is set.
    pub routes: Vec<RouteConfig>,
    /// `[telemetry]`: span export. `None` (the default): nothing is exported. Read at start only.
    pub telemetry: Option<crate::telemetry::TelemetryConfig>,
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Proxy traffic. Default `127.0.0.1:8080`.
    pub listen: SocketAddr,
    /// Admin listener (metrics, health, purge). Optional.
    pub admin_listen: Option<SocketAddr>,
    /// Bearer token for the admin purge API. Optional; never empty when set.
    pub admin_token: Option<String>,
    /// Where unrouted requests go (uncached). `None`: unrouted requests get 404.
    /// Same shape rules as `RouteConfig::upstream`.
    pub default_upstream: Option<Uri>,
    /// The wait for the default upstream's response head. Default 30s (a route's default
    /// `upstream_timeout`); never zero.
    pub default_upstream_timeout: Duration,
    /// How long graceful shutdown may take. Default 30s.
    pub shutdown_timeout: Duration,
    /// After SIGTERM, how long to keep serving while `/readyz` answers 503 (so load balancers and
    /// the Kubernetes endpoints controller stop sending traffic) before the graceful shutdown
    /// starts. Not part of `shutdown_timeout`. Default 0s; 5s suits a sidecar.
    pub shutdown_delay: Duration,
    /// One `info` log line per request (method, path, route, status, outcome, micros). Default
    /// `true`.
    pub access_log: bool,
    /// How long a client may take to send a request head; then the connection is closed.
    /// Default 10s.
    pub header_read_timeout: Duration,
    /// Most header fields accepted in one request; more gets 431. Default 100.
    pub max_headers: usize,
    /// Largest request head (request line and header fields) in bytes; larger gets 431. At least
    /// 8 KiB. Default 64 KiB.
    pub max_header_bytes: u64,
    /// How long a client may take to send a request body that Corral reads whole (to key or fill
    /// it); then 408. Default 30s.
    pub body_read_timeout: Duration,
    /// `/readyz` while Redis is unreachable: `true` answers 200 `degraded` (keep serving from L1
    /// and the upstream), `false` answers 503 (take the pod out of rotation). Default `true`.
    pub ready_when_degraded: bool,
    /// Most client connections the proxy listener holds open at once; past it, new connections
    /// wait in the kernel's accept queue until one closes. Default 10000.
    pub max_connections: usize,
    /// Worker threads of the async runtime, which serve every connection, fill and background
    /// task. `None` (the default): one fewer than the cores the process may use, at least one
    /// ([`default_workers`]). Read at start only.
    pub workers: Option<usize>,
    /// How long an upstream connection may sit idle in the pool before it is closed. Kept below
    /// common upstream keep-alive timeouts (Node.js: 5 s), so Corral is the side that closes.
    /// Default 4s; never zero.
    pub upstream_idle_timeout: Duration,
    /// `tls = { cert_file, key_file }`: the proxy listener speaks TLS. Optional.
    pub tls: Option<ListenerTls>,
}

#[derive(Debug, Clone)]
pub struct RedisConfig {
    /// Which Redis: one server (`url`), a master found through Sentinel (`sentinel`) or a Cluster
    /// (`cluster`, its seed nodes).
    pub topology: RedisTopology,
    /// Prefix segment of every Redis key and channel: `corral:{namespace}:…`. Default `"default"`.
    /// Letters, digits, `_`, `-`, `.` only.
    pub namespace: String,
    /// Budget of a Redis call whose failure costs nothing but a cache miss: the hit path's reads
    /// outside a fill, purges, the tag index. Default 50ms; never zero.
    pub timeout: Duration,
    /// Budget of a Redis call that decides who calls the upstream — the first look that takes the
    /// fill lock, a waiter's re-check, SUBSCRIBE, the store, release and lease extensions — where
    /// giving up costs an upstream call. Each route uses the smaller of this and half its lease
    /// (see [`LockSpec::redis_budget`]). Default 1s; never zero.
    pub lock_timeout: Duration,
    /// `tls = { .. }`: the roots and client certificate of `rediss://` connections. Optional.
    pub tls: Option<RedisTls>,
}

impl RedisConfig {
    /// The longest any one Redis call may take: what the connections themselves allow before
    /// they give up on an answer (each call is bounded by its own, possibly smaller, budget).
    pub fn longest_budget(&self) -> Duration {
        self.timeout.max(self.lock_timeout)
    }
}

/// The shape of the Redis deployment: `url`, `sentinel` or `cluster` in the `[redis]` table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RedisTopology {
    /// `redis://` or `rediss://` URL of a standalone Redis.
    Standalone { url: String },
    /// Seed nodes of a Redis Cluster (`redis://` or `rediss://` URLs, at least one, no
    /// duplicates). The rest of the cluster is discovered from them; every key, script and
    /// pipeline Corral sends touches one hash slot (see [`crate::l2`]).
    Cluster { nodes: Vec<String> },
    /// Redis Sentinel: the sentinels' URLs (`redis://` or `rediss://`, at least one, no
    /// duplicates) and the name of the master they monitor. Corral talks to the master they name
    /// and follows it through a failover (see [`crate::l2`] and [`crate::fleet`]), logging in
    /// to it with `auth`.
    Sentinel {
        nodes: Vec<String>,
        master: String,
        auth: MasterAuth,
    },
}

/// How Corral logs in to the master the sentinels name: `username`, `password` and `db` in
/// `sentinel = { .. }` (the sentinels' own credentials, if any, go in their URLs).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MasterAuth {
    /// ACL user; `None` is the default user. Only with a password.
    pub username: Option<String>,
    pub password: Option<Secret>,
    /// Logical database on the master; default 0.
    pub db: i64,
}

/// A password: its `Debug` and `Display` never show it, so it cannot reach a log line or an
/// error message by accident.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(text: String) -> Secret {
        Secret(text)
    }

    /// The password itself, for the one place that sends it to Redis.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl RedisTopology {
    /// The URLs of Redis servers Corral may connect to directly: the one server, or every seed
    /// node in file order; none behind sentinels (the master is whichever they name). The
    /// pub/sub hub uses them: it needs one node, any node (see [`crate::fleet`]).
    pub fn seeds(&self) -> &[String] {
        match self {
            RedisTopology::Standalone { url } => std::slice::from_ref(url),
            RedisTopology::Cluster { nodes } => nodes,
            RedisTopology::Sentinel { .. } => &[],
        }
    }
}

#[derive(Debug, Clone)]
pub struct CacheConfig {
    /// Byte budget of the in-process cache (L1). Default 256 MiB; never zero.
    pub l1_max_bytes: u64,
}

#[derive(Debug, Clone)]
pub struct RouteConfig {
    /// Unique; letters, digits, `_`, `-` only (it becomes part of Redis keys).
    pub name: String,
    /// Starts with `/`. Matches the path itself and everything below it on a segment boundary.
    pub path_prefix: String,
    /// Methods this route caches; upper-case, never empty. Default `["GET"]`.
    pub methods: Vec<Method>,
    /// `http://host:port` (optionally with a base path); scheme `http` only for now. The first
    /// of [`RouteConfig::endpoints`].
    pub upstream: Uri,
    /// Every endpoint of the upstream (`upstream = ["http://a:5000", "http://b:5000"]`), in file
    /// order; never empty, no duplicates. With more than one, calls are spread over the healthy
    /// ones and a fill that fails on one tries the next (see [`crate::upstream::endpoints`]).
    pub endpoints: Vec<Uri>,
    /// `false`: every request passes through uncached. Default `true`.
    pub cache: bool,
    /// Freshness when the upstream sends no `s-maxage`/`max-age`. Default 60s.
    pub ttl: Duration,
    /// Default 0s.
    pub stale_while_revalidate: Duration,
    /// Default 0s.
    pub stale_if_error: Duration,
    /// The fraction of its lifetime by which Corral may shorten what it decides itself: the
    /// heuristic `ttl` / `error_ttl` and the stale windows it adds from this route's config, each
    /// by a uniform random fraction in `[0, ttl_jitter)`, so entries filled together do not expire
    /// together. Freshness the upstream gives (`s-maxage`, `max-age`, `Expires`) and its own
    /// stale windows are kept exact. In `[0, 1)`; default 0.1.
    pub ttl_jitter: f64,
    /// Statuses that may be stored when the answer carries explicit freshness (`s-maxage`,
    /// `max-age`, `Expires`), each in `100..=599`, never empty. Default: those RFC 9110 §15.1
    /// calls heuristically cacheable, [`DEFAULT_CACHE_STATUSES`].
    pub cache_statuses: Vec<u16>,
    /// Statuses that may be stored with heuristic freshness (the route's `ttl`, `error_ttl` for
    /// errors) when the answer gives none: the configured `cache_statuses`, else `[200]`.
    pub heuristic_statuses: Vec<u16>,
    /// Request headers a shared fill passes to the upstream, besides the keyed ones. Default
    /// [`DEFAULT_FORWARD_HEADERS`].
    pub forward_headers: ForwardHeaders,
    /// Request headers that, like `Authorization` and `Cookie`, make a request bypass the cache
    /// unless the route keys on them. Lower-cased. Default none.
    pub credential_headers: Vec<HeaderName>,
    /// Largest request body buffered for keying/filling; larger → 413. Default 1 MiB.
    pub max_body: u64,
    /// Largest response stored; larger is not cached. Default 8 MiB.
    pub max_entry_size: u64,
    /// Limit for one upstream call (headers and body). Default 30s; never zero.
    pub upstream_timeout: Duration,
    /// Freshness of a stored error (a status >= 400 listed in `cache_statuses`) when the upstream
    /// gives none. Default 1s.
    pub error_ttl: Duration,
    /// XFetch early refresh: `Some(beta)` refreshes a fresh entry in the background with a
    /// probability that rises as expiry nears (`now - fill_time * beta * ln(rand) >= fresh_until`).
    /// Default `None` (off).
    pub early_refresh: Option<f64>,
    /// How long a key whose answer could not be shared (personal, or over `max_entry_size`) skips
    /// the fill lock fleet-wide, so requests do not queue behind one another for an answer they
    /// cannot share. `0s` disables. Default 10s.
    pub uncacheable_ttl: Duration,
    /// Most concurrent upstream calls this route makes from one process; more wait for a slot
    /// (within `upstream_timeout`, then 503). Default `None` (no cap).
    pub upstream_concurrency: Option<usize>,
    /// `fleet_concurrency` under `fleet_budget` (routes naming one share it; default the route's
    /// name): most upstream calls in flight fleet-wide, counted in Redis. Default `None`.
    pub fleet_budget: Option<FleetBudget>,
    /// Most surrogate keys (`Surrogate-Key` / `Cache-Tag`) indexed per answer; the rest are dropped
    /// with a log line, so one answer cannot create thousands of Redis keys. `0` indexes none.
    /// Default 32.
    pub max_tags: usize,
    /// Whether `TRACE` requests are passed to the upstream. Default `false`: they get 405 before
    /// any upstream call (a `TRACE` echo lets a script read headers it may not, such as cookies).
    pub allow_trace: bool,
    pub key: KeySpec,
    pub lock: LockSpec,
    /// `response_headers = { remove = [..], set = { .. } }`: applied to every answer of the
    /// route (see [`crate::header_rules`]). Default: none.
    pub response_headers: crate::header_rules::HeaderRules,
    /// `tls = { .. }` of an `https://` upstream. Optional.
    pub tls: Option<UpstreamTls>,
}

/// Which request headers a shared fill passes to the upstream (`forward_headers` in a route).
///
/// Conditional headers (`If-*`), `Range`, hop-by-hop fields and a client's `X-Forwarded-*` /
/// `Forwarded` never travel on a shared fill, whatever this says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ForwardHeaders {
    /// `["*"]`: every other header (the old, unsafe behaviour: the upstream may answer one client
    /// for everyone from a header the key does not name).
    All,
    /// Only these (lower-cased), plus the route's `key.headers`.
    Only(Vec<HeaderName>),
}

impl ForwardHeaders {
    /// Whether a header of a client's request reaches the upstream on a shared fill.
    pub fn allows(&self, name: &HeaderName, key: &KeySpec) -> bool {
        match self {
            ForwardHeaders::All => true,
            ForwardHeaders::Only(names) => names.contains(name) || key.headers.contains(name),
        }
    }
}

/// What a shared fill forwards when a route does not say: content negotiation, the body's type,
/// and the client's software — what well-behaved upstreams declare in `Vary` when they use it.
pub const DEFAULT_FORWARD_HEADERS: [&str; 6] = [
    "accept",
    "accept-encoding",
    "accept-language",
    "content-type",
    "content-encoding",
    "user-agent",
];

/// Statuses stored by default when the answer carries explicit freshness: RFC 9110 §15.1's
/// heuristically cacheable statuses (RFC 9111 §3 allows storing any of them).
pub const DEFAULT_CACHE_STATUSES: [u16; 11] =
    [200, 203, 204, 300, 301, 308, 404, 405, 410, 414, 501];

/// What identifies a response on a route, beyond route name, method and path.
#[derive(Debug, Clone, Default)]
pub struct KeySpec {
    /// `None`: the whole query counts. `Some(list)`: only those parameters count.
    pub query: Option<Vec<String>>,
    /// Lower-cased header names.
    pub headers: Vec<HeaderName>,
    /// JSON pointers (RFC 6901, each starts with `/`) into the request body.
    pub json: Vec<String>,
}

/// A fleet-wide budget on upstream calls (see [`crate::budget`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FleetBudget {
    /// The budget's name: routes that give the same one share its slots.
    pub name: String,
    /// Most calls in flight fleet-wide.
    pub limit: usize,
}

/// How a route holds its fill locks.
#[derive(Debug, Clone)]
pub struct LockSpec {
    /// Default: `Fleet` when `[redis]` is present, else `Instance`. Never `Fleet` without `[redis]`
    /// (an error on a cached route; on a `cache = false` route, where it is unused, it becomes
    /// `Instance`).
    pub scope: LockScope,
    /// Fill-lock lease, renewed every third of it while the fill runs: how long waiters wait
    /// before taking over from a leader that died. Default 2s; never zero.
    pub lease: Duration,
    /// How long a waiter waits for another's fill. Default 10s; never zero.
    pub wait_timeout: Duration,
    /// The route's own budget for Redis calls that decide who fills (see
    /// [`RedisConfig::lock_timeout`]). `None`: derived, see [`LockSpec::redis_budget`].
    pub redis_timeout: Option<Duration>,
    /// Default `Bypass`.
    pub on_wait_timeout: OnWaitTimeout,
    /// Most requests waiting for one key's fill in one process; past it: 503 with `Retry-After`.
    /// Default 10000.
    pub max_waiters: usize,
}

impl LockSpec {
    /// The budget of this route's lock decisions in Redis: `lock.redis_timeout` when set, else the
    /// smaller of `[redis] lock_timeout` and half the lease — a lease extension must be able to
    /// land before the lease runs out.
    pub fn redis_budget(&self, lock_timeout: Duration) -> Duration {
        self.redis_timeout
            .unwrap_or_else(|| lock_timeout.min(self.lease / 2))
    }
}

/// How far one fill is shared: `scope` in a route's `lock` table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockScope {
    Fleet,
    Instance,
    None,
}

/// What a waiter does past `wait_timeout`: `"bypass"` or `"504"` in the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnWaitTimeout {
    Bypass,
    GatewayTimeout,
}

impl Config {
    /// What `corral validate` warns about: valid options that weaken a guarantee.
    pub fn warnings(&self) -> Vec<String> {
        self.routes
            .iter()
            .filter(|r| r.cache && r.forward_headers == ForwardHeaders::All)
            .map(|r| {
                format!(
                    "route {:?}: forward_headers = [\"*\"] passes every client header on shared fills; \
                     an upstream that reads a header the key does not name answers one client for everyone",
                    r.name
                )
            })
            .collect()
    }

    /// Reads, parses and validates a file. An unreadable file is [`ConfigError::Read`].
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Config::parse(&text, path)
    }

    /// Parses and validates TOML text; `source` names it in errors. Stops at the first fault.
    pub fn parse(text: &str, source: &Path) -> Result<Config, ConfigError> {
        let check = Checker { text, source };
        let raw: RawConfig = toml::from_str(text).map_err(|e| check.toml_error(&e))?;
        check.config(raw)
    }
}

/// Why a configuration was refused.
///
/// `Invalid` displays as one line: `{path}:{line}: [route "{name}": ][field `{field}`: ]{reason}`,
/// e.g. ``config/example.toml:12: route "recommend": field `ttl`: invalid duration "5 parsecs" (…)``.
/// Fields inside a route are named relative to it (`lock.scope`); others by their full dotted path
/// (`server.listen`, `redis.url`). A route without a usable name is shown as `route #N` (1-based).
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{}: cannot read config file: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The text is not TOML, does not fit the schema, or breaks a rule.
    #[error("{}:{line}: {}{reason}", path.display(), Context(route, field))]
    Invalid {
        path: PathBuf,
        /// 1-based line of the offending value (or key, or table header); 1 when the fault
        /// concerns the whole file.
        line: usize,
        /// The route's name, or `#N` when it has no usable one.
        route: Option<String>,
        /// Dotted path of the field at fault; `None` for TOML syntax errors.
        field: Option<String>,
        reason: String,
    },
}

/// Renders the optional `route "…": field `…`: ` part of a message.
struct Context<'a>(&'a Option<String>, &'a Option<String>);

impl fmt::Display for Context<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(pos) if pos.starts_with('#') => write!(f, "route {pos}: ")?,
            Some(name) => write!(f, "route \"{name}\": ")?,
            None => {}
        }
        match self.1 {
            Some(field) => write!(f, "field `{field}`: "),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod redaction_tests;
