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
//! The raw structs (`Raw*`, private) mirror the file; each value that a rule may reject keeps its
//! byte span so the error can name its line. A serde error carries only a span, so the field and the
//! route are recovered by walking the parsed document to the key at that span (`locate`). Either way
//! the message has one shape, which [`ConfigError`] documents.

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::{HeaderName, Method, Uri};
use serde::Deserialize;
use toml::Spanned;
use toml::de::{DeTable, DeValue};

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
    /// How long graceful shutdown may take. Default 30s.
    pub shutdown_timeout: Duration,
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
}

#[derive(Debug, Clone)]
pub struct RedisConfig {
    /// `redis://` or `rediss://` URL of a standalone Redis.
    pub url: String,
    /// Prefix segment of every Redis key and channel: `corral:{namespace}:…`. Default `"default"`.
    /// Letters, digits, `_`, `-`, `.` only.
    pub namespace: String,
    /// Budget of each Redis call. Default 50ms; never zero.
    pub timeout: Duration,
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
    /// `http://host:port` (optionally with a base path); scheme `http` only for now.
    pub upstream: Uri,
    /// `false`: every request passes through uncached. Default `true`.
    pub cache: bool,
    /// Freshness when the upstream sends no `s-maxage`/`max-age`. Default 60s.
    pub ttl: Duration,
    /// Default 0s.
    pub stale_while_revalidate: Duration,
    /// Default 0s.
    pub stale_if_error: Duration,
    /// Statuses that may be stored, each in `100..=599`, never empty. Default `[200]`.
    pub cache_statuses: Vec<u16>,
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
    pub key: KeySpec,
    pub lock: LockSpec,
}

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

#[derive(Debug, Clone)]
pub struct LockSpec {
    /// Default: `Fleet` when `[redis]` is present, else `Instance`. Never `Fleet` without `[redis]`
    /// (an error on a cached route; on a `cache = false` route, where it is unused, it becomes
    /// `Instance`).
    pub scope: LockScope,
    /// Fill-lock lease. Default 5s; never zero.
    pub lease: Duration,
    /// How long a waiter waits for another's fill. Default 10s; never zero.
    pub wait_timeout: Duration,
    /// Default `Bypass`.
    pub on_wait_timeout: OnWaitTimeout,
    /// Most requests waiting for one key's fill in one process; past it: 503 with `Retry-After`.
    /// Default 10000.
    pub max_waiters: usize,
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

const DEFAULT_LISTEN: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 8080);
const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(30);
const DEFAULT_NAMESPACE: &str = "default";
const DEFAULT_REDIS_TIMEOUT: Duration = Duration::from_millis(50);
const DEFAULT_L1_MAX_BYTES: u64 = 256 * 1024 * 1024;
const DEFAULT_TTL: Duration = Duration::from_secs(60);
const DEFAULT_MAX_BODY: u64 = 1024 * 1024;
const DEFAULT_MAX_ENTRY_SIZE: u64 = 8 * 1024 * 1024;
const DEFAULT_UPSTREAM_TIMEOUT: Duration = Duration::from_secs(30);
const DEFAULT_LEASE: Duration = Duration::from_secs(5);
const DEFAULT_WAIT_TIMEOUT: Duration = Duration::from_secs(10);
const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
const DEFAULT_MAX_HEADERS: usize = 100;
const DEFAULT_MAX_HEADER_BYTES: u64 = 64 * 1024;
const MIN_HEADER_BYTES: u64 = 8 * 1024;
const DEFAULT_BODY_READ_TIMEOUT: Duration = Duration::from_secs(30);
const DEFAULT_ERROR_TTL: Duration = Duration::from_secs(1);
const DEFAULT_UNCACHEABLE_TTL: Duration = Duration::from_secs(10);
const DEFAULT_MAX_WAITERS: usize = 10_000;

// ---- Raw layer: the file as written. Required values are `Option` so that validation, which
// knows the route, reports them missing.

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    server: Option<Spanned<RawServer>>,
    redis: Option<Spanned<RawRedis>>,
    cache: Option<RawCache>,
    #[serde(default)]
    route: Vec<Spanned<RawRoute>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawServer {
    listen: Option<Spanned<String>>,
    admin_listen: Option<Spanned<String>>,
    admin_token: Option<Spanned<String>>,
    default_upstream: Option<Spanned<String>>,
    shutdown_timeout: Option<HumanDuration>,
    header_read_timeout: Option<Spanned<HumanDuration>>,
    max_headers: Option<Spanned<i64>>,
    max_header_bytes: Option<Spanned<HumanSize>>,
    body_read_timeout: Option<Spanned<HumanDuration>>,
    ready_when_degraded: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRedis {
    url: Option<Spanned<String>>,
    /// Accepted so the error can say "not supported yet" rather than "unknown field".
    cluster: Option<Spanned<Vec<String>>>,
    sentinel: Option<Spanned<toml::Table>>,
    namespace: Option<Spanned<String>>,
    timeout: Option<Spanned<HumanDuration>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCache {
    l1_max_bytes: Option<Spanned<HumanSize>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRoute {
    name: Option<Spanned<String>>,
    path_prefix: Option<Spanned<String>>,
    methods: List<String>,
    upstream: Option<Spanned<String>>,
    cache: Option<bool>,
    ttl: Option<HumanDuration>,
    stale_while_revalidate: Option<HumanDuration>,
    stale_if_error: Option<HumanDuration>,
    cache_statuses: List<i64>,
    max_body: Option<HumanSize>,
    max_entry_size: Option<HumanSize>,
    upstream_timeout: Option<Spanned<HumanDuration>>,
    error_ttl: Option<HumanDuration>,
    early_refresh: Option<Spanned<RawEarlyRefresh>>,
    uncacheable_ttl: Option<HumanDuration>,
    upstream_concurrency: Option<Spanned<i64>>,
    #[serde(default)]
    key: RawKey,
    #[serde(default)]
    lock: RawLock,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawKey {
    query: Option<Vec<String>>,
    #[serde(default)]
    headers: Vec<Spanned<String>>,
    #[serde(default)]
    json: Vec<Spanned<String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawLock {
    scope: Option<Spanned<RawScope>>,
    lease: Option<Spanned<HumanDuration>>,
    wait_timeout: Option<Spanned<HumanDuration>>,
    on_wait_timeout: Option<RawOnWaitTimeout>,
    max_waiters: Option<Spanned<i64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEarlyRefresh {
    beta: f64,
}

#[derive(Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
enum RawScope {
    Fleet,
    Instance,
    None,
}

#[derive(Deserialize, Clone, Copy)]
enum RawOnWaitTimeout {
    #[serde(rename = "bypass")]
    Bypass,
    #[serde(rename = "504")]
    GatewayTimeout,
}

/// A humantime duration string: `50ms`, `5s`, `5m`.
#[derive(Clone, Copy, Deserialize)]
#[serde(try_from = "String")]
struct HumanDuration(Duration);

impl TryFrom<String> for HumanDuration {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        humantime::parse_duration(&s)
            .map(HumanDuration)
            .map_err(|e| format!("invalid duration {s:?} ({e})"))
    }
}

/// A byte size: a unit string (`256MiB`, `1KiB`, `10MB`) or a plain integer of bytes.
#[derive(Clone, Copy)]
struct HumanSize(u64);

impl<'de> Deserialize<'de> for HumanSize {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = HumanSize;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a size such as \"256MiB\" or \"1KiB\", or a number of bytes")
            }
            fn visit_u64<E: serde::de::Error>(self, n: u64) -> Result<Self::Value, E> {
                Ok(HumanSize(n))
            }
            fn visit_i64<E: serde::de::Error>(self, n: i64) -> Result<Self::Value, E> {
                u64::try_from(n)
                    .map(HumanSize)
                    .map_err(|_| E::custom(format!("invalid size {n} (must not be negative)")))
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<Self::Value, E> {
                s.parse::<bytesize::ByteSize>()
                    .map(|b| HumanSize(b.as_u64()))
                    .map_err(|e| E::custom(format!("invalid size {s:?} ({e})")))
            }
        }
        d.deserialize_any(Visitor)
    }
}

// ---- Validation: raw → checked, with the place of every fault.

/// The text being validated and its name, to turn spans into `path:line` errors.
struct Checker<'a> {
    text: &'a str,
    source: &'a Path,
}

/// Where a rule applies: the route label (when inside a route) and the field's dotted path.
type At<'r> = (Option<&'r str>, &'r str);

/// A list option as written: the list's span and each element's.
type List<T> = Option<Spanned<Vec<Spanned<T>>>>;

/// What validating one piece gives.
type Checked<T> = Result<T, ConfigError>;

/// Checks one list element; `Err` says what is wrong with it.
type Check<'c, S, T> = &'c dyn Fn(&S) -> Result<T, String>;

impl Checker<'_> {
    fn fail<T>(&self, span: Range<usize>, at: At<'_>, reason: impl fmt::Display) -> Checked<T> {
        Err(self.error(span, at, reason))
    }

    fn error(&self, span: Range<usize>, at: At<'_>, reason: impl fmt::Display) -> ConfigError {
        ConfigError::Invalid {
            path: self.source.to_path_buf(),
            line: line_of(self.text, span.start),
            route: at.0.map(str::to_owned),
            field: Some(at.1.to_owned()),
            reason: reason.to_string(),
        }
    }

    /// A serde/toml error: the line from its span, the field and route from the document.
    fn toml_error(&self, err: &toml::de::Error) -> ConfigError {
        let span = err.span().unwrap_or(0..0);
        let (route, field) = match DeTable::parse(self.text) {
            Ok(doc) => describe(doc.get_ref(), span.start),
            Err(_) => (None, None), // a syntax error: no document to walk
        };
        ConfigError::Invalid {
            path: self.source.to_path_buf(),
            line: line_of(self.text, span.start),
            route,
            field,
            reason: err.message().trim_end().to_owned(),
        }
    }

    fn config(&self, raw: RawConfig) -> Checked<Config> {
        let server = self.server(raw.server.as_ref().map(Spanned::get_ref))?;
        let redis = raw.redis.as_ref().map(|r| self.redis(r)).transpose()?;
        let l1 = raw.cache.and_then(|c| c.l1_max_bytes);
        let l1_max_bytes = match l1.map(|v| (v.get_ref().0, v.span())) {
            None => DEFAULT_L1_MAX_BYTES,
            Some((0, span)) => self.fail(span, (None, "cache.l1_max_bytes"), "must be > 0")?,
            Some((bytes, _)) => bytes,
        };
        let mut routes: Vec<RouteConfig> = Vec::with_capacity(raw.route.len());
        let mut first_line = HashMap::new();
        for (index, route) in raw.route.iter().enumerate() {
            let checked = self.route(index, route, redis.is_some())?;
            let name = route.get_ref().name.as_ref();
            let span = name.map_or(route.span(), Spanned::span);
            let line = line_of(self.text, span.start);
            if let Some(first) = first_line.insert(checked.name.clone(), line) {
                let at = (Some(checked.name.as_str()), "name");
                let why = format!("duplicate route name (first defined on line {first})");
                return self.fail(span, at, why);
            }
            routes.push(checked);
        }
        if routes.is_empty() && server.default_upstream.is_none() {
            let span = raw.server.as_ref().map_or(0..0, Spanned::span);
            let why = "nothing to proxy: add a [[route]] or set server.default_upstream";
            return self.fail(span, (None, "route"), why);
        }
        let (source, cache) = (self.source.to_path_buf(), CacheConfig { l1_max_bytes });
        Ok(Config {
            source,
            server,
            redis,
            cache,
            routes,
        })
    }

    fn server(&self, raw: Option<&RawServer>) -> Checked<ServerConfig> {
        let empty = RawServer::default();
        let raw = raw.unwrap_or(&empty);
        let addr = |v: &Option<Spanned<String>>, field| {
            let at = (None, field);
            v.as_ref().map(|v| self.socket_addr(v, at)).transpose()
        };
        let listen = addr(&raw.listen, "server.listen")?.unwrap_or(DEFAULT_LISTEN);
        let admin_listen = addr(&raw.admin_listen, "server.admin_listen")?;
        if let Some(token) = raw.admin_token.as_ref().filter(|t| t.get_ref().is_empty()) {
            let why = "must not be empty (omit it to disable the token)";
            return self.fail(token.span(), (None, "server.admin_token"), why);
        }
        let at = (None, "server.default_upstream");
        let default_upstream = raw.default_upstream.as_ref();
        Ok(ServerConfig {
            listen,
            admin_listen,
            admin_token: raw.admin_token.as_ref().map(|t| t.get_ref().clone()),
            default_upstream: default_upstream.map(|u| self.upstream(u, at)).transpose()?,
            shutdown_timeout: raw
                .shutdown_timeout
                .map_or(DEFAULT_SHUTDOWN_TIMEOUT, |d| d.0),
            header_read_timeout: self.positive(
                &raw.header_read_timeout,
                DEFAULT_HEADER_READ_TIMEOUT,
                (None, "server.header_read_timeout"),
            )?,
            max_headers: self.count(
                &raw.max_headers,
                DEFAULT_MAX_HEADERS,
                (None, "server.max_headers"),
            )?,
            max_header_bytes: match &raw.max_header_bytes {
                None => DEFAULT_MAX_HEADER_BYTES,
                Some(n) if n.get_ref().0 >= MIN_HEADER_BYTES => n.get_ref().0,
                Some(n) => {
                    let why = "must be at least 8KiB";
                    return self.fail(n.span(), (None, "server.max_header_bytes"), why);
                }
            },
            body_read_timeout: self.positive(
                &raw.body_read_timeout,
                DEFAULT_BODY_READ_TIMEOUT,
                (None, "server.body_read_timeout"),
            )?,
            ready_when_degraded: raw.ready_when_degraded.unwrap_or(true),
        })
    }

    fn redis(&self, table: &Spanned<RawRedis>) -> Checked<RedisConfig> {
        let raw = table.get_ref();
        let one_of = "give exactly one of `url`, `cluster`, `sentinel`";
        let mut given = [
            raw.url.as_ref().map(|v| ("redis.url", v.span())),
            raw.cluster.as_ref().map(|v| ("redis.cluster", v.span())),
            raw.sentinel.as_ref().map(|v| ("redis.sentinel", v.span())),
        ]
        .into_iter()
        .flatten();
        let Some((field, span)) = given.next() else {
            let why = format!("required: {one_of}");
            return self.fail(table.span(), (None, "redis.url"), why);
        };
        if let Some((other, span)) = given.next() {
            return self.fail(span, (None, other), format!("{one_of} (`{field}` is set)"));
        }
        let Some(url) = &raw.url else {
            return self.fail(span, (None, field), "not supported yet; use `url`");
        };
        let text = url.get_ref();
        if !(text.starts_with("redis://") || text.starts_with("rediss://")) {
            let why = format!("{text:?} must start with redis:// or rediss://");
            return self.fail(url.span(), (None, "redis.url"), why);
        }
        let namespace = match &raw.namespace {
            None => DEFAULT_NAMESPACE.to_owned(),
            Some(ns) if is_name(ns.get_ref(), ".") => ns.get_ref().clone(),
            Some(ns) => {
                let why = format!(
                    "invalid namespace {:?} (non-empty; letters, digits, `_`, `-`, `.` only)",
                    ns.get_ref()
                );
                return self.fail(ns.span(), (None, "redis.namespace"), why);
            }
        };
        let at = (None, "redis.timeout");
        let timeout = self.positive(&raw.timeout, DEFAULT_REDIS_TIMEOUT, at)?;
        Ok(RedisConfig {
            url: text.clone(),
            namespace,
            timeout,
        })
    }

    fn route(&self, index: usize, route: &Spanned<RawRoute>, redis: bool) -> Checked<RouteConfig> {
        let raw = route.get_ref();
        let position = format!("#{}", index + 1);
        let name = match &raw.name {
            None => return Err(self.error(route.span(), (Some(&position), "name"), "required")),
            Some(n) if is_name(n.get_ref(), "") => n.get_ref().clone(),
            Some(n) => {
                let why = format!(
                    "invalid route name {:?} (non-empty; letters, digits, `_`, `-` only)",
                    n.get_ref()
                );
                return self.fail(n.span(), (Some(&position), "name"), why);
            }
        };
        let at = |field| (Some(name.as_str()), field);
        let required = |v: &Option<Spanned<String>>, field| {
            v.clone()
                .ok_or_else(|| self.error(route.span(), at(field), "required"))
        };
        let path_prefix = required(&raw.path_prefix, "path_prefix")?;
        if !path_prefix.get_ref().starts_with('/') {
            let why = format!("{:?} must start with '/'", path_prefix.get_ref());
            return self.fail(path_prefix.span(), at("path_prefix"), why);
        }
        let upstream = self.upstream(&required(&raw.upstream, "upstream")?, at("upstream"))?;
        let methods = self.list(&raw.methods, at("methods"), vec![Method::GET], &|m| {
            Method::from_bytes(m.to_ascii_uppercase().as_bytes())
                .map_err(|_| format!("invalid HTTP method {m:?}"))
        })?;
        let cache_statuses =
            self.list(&raw.cache_statuses, at("cache_statuses"), vec![200], &|s| {
                u16::try_from(*s)
                    .ok()
                    .filter(|s| (100..=599).contains(s))
                    .ok_or_else(|| format!("invalid status {s} (must be in 100..=599)"))
            })?;
        let cache = raw.cache.unwrap_or(true);
        let duration = |d: Option<HumanDuration>, default| d.map_or(default, |d| d.0);
        let timeout = &raw.upstream_timeout;
        let upstream_timeout =
            self.positive(timeout, DEFAULT_UPSTREAM_TIMEOUT, at("upstream_timeout"))?;
        Ok(RouteConfig {
            path_prefix: path_prefix.into_inner(),
            methods,
            upstream,
            cache,
            ttl: duration(raw.ttl, DEFAULT_TTL),
            stale_while_revalidate: duration(raw.stale_while_revalidate, Duration::ZERO),
            stale_if_error: duration(raw.stale_if_error, Duration::ZERO),
            cache_statuses,
            max_body: raw.max_body.map_or(DEFAULT_MAX_BODY, |s| s.0),
            max_entry_size: raw.max_entry_size.map_or(DEFAULT_MAX_ENTRY_SIZE, |s| s.0),
            upstream_timeout,
            error_ttl: duration(raw.error_ttl, DEFAULT_ERROR_TTL),
            early_refresh: match &raw.early_refresh {
                None => None,
                Some(e) if e.get_ref().beta.is_finite() && e.get_ref().beta > 0.0 => {
                    Some(e.get_ref().beta)
                }
                Some(e) => {
                    let why = "beta must be a positive number (1.0 is the usual choice)";
                    return self.fail(e.span(), at("early_refresh.beta"), why);
                }
            },
            uncacheable_ttl: duration(raw.uncacheable_ttl, DEFAULT_UNCACHEABLE_TTL),
            upstream_concurrency: match &raw.upstream_concurrency {
                None => None,
                some => Some(self.count(some, 1, at("upstream_concurrency"))?),
            },
            key: self.key(&raw.key, &name)?,
            lock: self.lock(&raw.lock, &name, redis, cache)?,
            name,
        })
    }

    fn key(&self, raw: &RawKey, route: &str) -> Checked<KeySpec> {
        let headers = self.each(&raw.headers, (Some(route), "key.headers"), &|h| {
            HeaderName::from_bytes(h.to_ascii_lowercase().as_bytes())
                .map_err(|e| format!("invalid header name {h:?} ({e})"))
        })?;
        let json = self.each(&raw.json, (Some(route), "key.json"), &|p| {
            let bad = || format!("invalid JSON pointer {p:?} (RFC 6901, starting with '/')");
            is_json_pointer(p).then(|| p.clone()).ok_or_else(bad)
        })?;
        Ok(KeySpec {
            query: raw.query.clone(),
            headers,
            json,
        })
    }

    fn lock(&self, raw: &RawLock, route: &str, redis: bool, cache: bool) -> Checked<LockSpec> {
        let at = |field| (Some(route), field);
        let lease = self.positive(&raw.lease, DEFAULT_LEASE, at("lock.lease"))?;
        let wait = &raw.wait_timeout;
        let wait_timeout = self.positive(wait, DEFAULT_WAIT_TIMEOUT, at("lock.wait_timeout"))?;
        let scope = match raw.scope.as_ref().map(|s| (*s.get_ref(), s.span())) {
            None if redis => LockScope::Fleet,
            None => LockScope::Instance,
            Some((RawScope::Fleet, _)) if redis => LockScope::Fleet,
            Some((RawScope::Fleet, span)) if cache => {
                let why = "unreachable combination: lock.scope = \"fleet\" needs a [redis] table";
                return self.fail(span, at("lock.scope"), why);
            }
            // Unused on an uncached route; keep the invariant "Fleet implies Redis".
            Some((RawScope::Fleet | RawScope::Instance, _)) => LockScope::Instance,
            Some((RawScope::None, _)) => LockScope::None,
        };
        Ok(LockSpec {
            scope,
            lease,
            wait_timeout,
            on_wait_timeout: match raw.on_wait_timeout {
                None | Some(RawOnWaitTimeout::Bypass) => OnWaitTimeout::Bypass,
                Some(RawOnWaitTimeout::GatewayTimeout) => OnWaitTimeout::GatewayTimeout,
            },
            max_waiters: self.count(
                &raw.max_waiters,
                DEFAULT_MAX_WAITERS,
                at("lock.max_waiters"),
            )?,
        })
    }

    /// Checks each element with `check`, which says what is wrong with a bad one.
    fn each<S, T>(&self, items: &[Spanned<S>], at: At<'_>, check: Check<S, T>) -> Checked<Vec<T>> {
        let check = |item: &Spanned<S>| check(item.get_ref()).map_err(|why| (item.span(), why));
        let checked = items.iter().map(check).collect::<Result<_, _>>();
        checked.map_err(|(span, why)| self.error(span, at, why))
    }

    /// A list that must not be empty when given; `or` when absent.
    fn list<S, T>(
        &self,
        list: &List<S>,
        at: At<'_>,
        or: Vec<T>,
        check: Check<S, T>,
    ) -> Checked<Vec<T>> {
        match list {
            None => Ok(or),
            Some(l) if l.get_ref().is_empty() => Err(self.error(l.span(), at, "must not be empty")),
            Some(l) => self.each(l.get_ref(), at, check),
        }
    }

    fn socket_addr(&self, v: &Spanned<String>, at: At<'_>) -> Checked<SocketAddr> {
        let text = v.get_ref();
        let why = format!("invalid socket address {text:?} (expected ip:port)");
        text.parse().map_err(|_| self.error(v.span(), at, why))
    }

    /// An upstream: an absolute `http://` URI with a host, optionally a base path, no query.
    fn upstream(&self, v: &Spanned<String>, at: At<'_>) -> Checked<Uri> {
        let text = v.get_ref();
        let uri: Uri = text
            .parse()
            .map_err(|e| self.error(v.span(), at, format!("invalid URI {text:?} ({e})")))?;
        let problem = match (uri.scheme_str(), uri.authority()) {
            (Some("http"), Some(_)) if uri.query().is_none() => return Ok(uri),
            (Some("http"), Some(_)) => "must not have a query",
            (Some("https"), _) => "https upstreams are not supported yet; use http://",
            (Some(_), _) => "unsupported scheme; use http://",
            _ => "must be an absolute http:// URI with a host, e.g. \"http://127.0.0.1:5000\"",
        };
        self.fail(v.span(), at, format!("{text:?}: {problem}"))
    }

    /// A duration that must not be zero; `or` when absent.
    /// A count that must be at least 1.
    fn count(&self, v: &Option<Spanned<i64>>, or: usize, at: At<'_>) -> Checked<usize> {
        match v.as_ref().map(|n| (*n.get_ref(), n.span())) {
            None => Ok(or),
            Some((n, span)) => match usize::try_from(n) {
                Ok(n) if n >= 1 => Ok(n),
                _ => Err(self.error(span, at, format!("must be a whole number >= 1, not {n}"))),
            },
        }
    }

    fn positive(
        &self,
        v: &Option<Spanned<HumanDuration>>,
        or: Duration,
        at: At<'_>,
    ) -> Checked<Duration> {
        match v.as_ref().map(|d| (d.get_ref().0, d.span())) {
            None => Ok(or),
            Some((d, span)) if d.is_zero() => Err(self.error(span, at, "must be greater than 0")),
            Some((d, _)) => Ok(d),
        }
    }
}

/// Non-empty, and only ASCII letters, digits, `_`, `-` and the characters in `extra`.
fn is_name(s: &str, extra: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || extra.contains(c))
}

/// RFC 6901, restricted to pointers below the root: `/a/b~1c`.
fn is_json_pointer(s: &str) -> bool {
    s.starts_with('/')
        && s.split('~')
            .skip(1)
            .all(|rest| rest.starts_with(['0', '1']))
}

/// The 1-based line holding byte `offset` of `text` (offsets past the end land on the last line).
fn line_of(text: &str, offset: usize) -> usize {
    let end = offset.min(text.len());
    text.as_bytes()[..end]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

/// One step of a path into the document.
enum Step<'d> {
    Key(&'d str),
    Index(usize),
}

/// The route label and field path of the key or value at byte `pos`.
fn describe(doc: &DeTable<'_>, pos: usize) -> (Option<String>, Option<String>) {
    let mut path = Vec::new();
    locate(doc, pos, &mut path);
    let (route, rest) = match path.as_slice() {
        [Step::Key("route"), Step::Index(i), rest @ ..] => (Some(route_label(doc, *i)), rest),
        _ => (None, path.as_slice()),
    };
    let keys: Vec<&str> = rest
        .iter()
        .filter_map(|s| match s {
            Step::Key(k) => Some(*k),
            Step::Index(_) => None,
        })
        .collect();
    (route, (!keys.is_empty()).then(|| keys.join(".")))
}

/// Depth-first search for the deepest key or value whose span holds `pos`; leaves its path in `path`.
/// Table spans are only their headers, so every table is searched, not just those whose span matches.
fn locate<'d>(table: &'d DeTable<'_>, pos: usize, path: &mut Vec<Step<'d>>) -> bool {
    for (key, value) in table.iter() {
        path.push(Step::Key(key.get_ref()));
        if key.span().contains(&pos) || locate_value(value, pos, path) {
            return true;
        }
        path.pop();
    }
    false
}

fn locate_value<'d>(value: &'d Spanned<DeValue<'_>>, pos: usize, path: &mut Vec<Step<'d>>) -> bool {
    let found_inside = match value.get_ref() {
        DeValue::Table(t) => locate(t, pos, path),
        DeValue::Array(items) => items.iter().enumerate().any(|(i, item)| {
            path.push(Step::Index(i));
            let found = locate_value(item, pos, path);
            if !found {
                path.pop();
            }
            found
        }),
        _ => false,
    };
    found_inside || value.span().contains(&pos)
}

/// `name` of the `index`-th route if it is a usable name, else `#N`.
fn route_label(doc: &DeTable<'_>, index: usize) -> String {
    let name = entry(doc, "route")
        .and_then(|routes| routes.as_array()?.get(index)?.get_ref().as_table())
        .and_then(|route| entry(route, "name")?.as_str());
    match name {
        Some(name) if is_name(name, "") => name.to_owned(),
        _ => format!("#{}", index + 1),
    }
}

fn entry<'t, 'i>(table: &'t DeTable<'i>, key: &str) -> Option<&'t DeValue<'i>> {
    table
        .iter()
        .find(|(k, _)| k.get_ref() == key)
        .map(|(_, v)| v.get_ref())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_of_counts_newlines_before_the_offset() {
        let text = "a = 1\nb = 2\n\nc = 3";
        assert_eq!(line_of(text, 0), 1);
        assert_eq!(
            line_of(text, 5),
            1,
            "the newline itself belongs to its line"
        );
        assert_eq!(line_of(text, 6), 2);
        assert_eq!(line_of(text, 12), 3);
        assert_eq!(line_of(text, 13), 4);
        assert_eq!(line_of(text, 999), 4, "past the end: last line");
        assert_eq!(line_of("", 0), 1);
    }

    #[test]
    fn json_pointer_escapes() {
        assert!(is_json_pointer("/a/b~0c~1d"));
        assert!(is_json_pointer("/"));
        assert!(!is_json_pointer("a/b"));
        assert!(!is_json_pointer("/a~2"));
        assert!(!is_json_pointer("/a~"));
    }

    #[test]
    fn describe_finds_route_and_nested_field() {
        let text = "[[route]]\nname = \"r\"\nkey = { headers = [\"a\", 3] }\n";
        let doc = DeTable::parse(text).unwrap();
        let pos = text.find('3').unwrap();
        let (route, field) = describe(doc.get_ref(), pos);
        assert_eq!(route.as_deref(), Some("r"));
        assert_eq!(field.as_deref(), Some("key.headers"));
    }
}
