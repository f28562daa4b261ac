//! Validation, the last step of the [pipeline](super): raw structs in, checked types out, and
//! the place of every fault.
//!
//! A rule that rejects a value knows its span, field and route. A serde error knows only a span,
//! so [`Checker::toml_error`] asks [`locate`](super::locate) for the field and route at that span,
//! to name them the same way.

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::ops::Range;
use std::path::Path;
use std::time::Duration;

use http::{HeaderName, Method, Uri};

use crate::redact::redact;
use toml::Spanned;

use super::locate::{Place, line_of, place};
use super::raw::{
    HumanDuration, List, RawConfig, RawKey, RawLock, RawOnWaitTimeout, RawRedis, RawRoute,
    RawScope, RawSentinel, RawServer,
};
use super::{
    CacheConfig, Config, ConfigError, ForwardHeaders, KeySpec, LockScope, LockSpec, MasterAuth,
    OnWaitTimeout, RedisConfig, RedisTopology, RouteConfig, Secret, ServerConfig,
};
use super::{
    DEFAULT_BODY_READ_TIMEOUT, DEFAULT_CACHE_STATUSES, DEFAULT_ERROR_TTL, DEFAULT_FORWARD_HEADERS,
    DEFAULT_HEADER_READ_TIMEOUT, DEFAULT_L1_MAX_BYTES, DEFAULT_LEASE, DEFAULT_LISTEN,
    DEFAULT_LOCK_TIMEOUT, DEFAULT_MAX_BODY, DEFAULT_MAX_CONNECTIONS, DEFAULT_MAX_ENTRY_SIZE,
    DEFAULT_MAX_HEADER_BYTES, DEFAULT_MAX_HEADERS, DEFAULT_MAX_TAGS, DEFAULT_MAX_WAITERS,
    DEFAULT_NAMESPACE, DEFAULT_REDIS_TIMEOUT, DEFAULT_SHUTDOWN_TIMEOUT, DEFAULT_TTL,
    DEFAULT_UNCACHEABLE_TTL, DEFAULT_UPSTREAM_IDLE_TIMEOUT, DEFAULT_UPSTREAM_TIMEOUT,
    DEFAULT_WAIT_TIMEOUT, MIN_HEADER_BYTES,
};

/// The text being validated and its name, to turn spans into `path:line` errors.
pub(super) struct Checker<'a> {
    pub(super) text: &'a str,
    pub(super) source: &'a Path,
}

/// Where a rule applies: the route label (when inside a route) and the field's dotted path.
type At<'r> = (Option<&'r str>, &'r str);

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
            // A reason may quote a value: never a password with it (`POST /reload` returns it).
            reason: redact(&reason.to_string()).into_owned(),
        }
    }

    /// A serde/toml error: the line from its span, the field and route from the document.
    pub(super) fn toml_error(&self, err: &toml::de::Error) -> ConfigError {
        let span = err.span().unwrap_or(0..0);
        let Place { route, field } = place(self.text, span.start);
        let route = route.map(|(index, name)| route_label(index, name.as_deref()));
        ConfigError::Invalid {
            path: self.source.to_path_buf(),
            line: line_of(self.text, span.start),
            route,
            field,
            reason: redact(err.message().trim_end()).into_owned(),
        }
    }

    pub(super) fn config(&self, raw: RawConfig) -> Checked<Config> {
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
            shutdown_delay: raw.shutdown_delay.map_or(Duration::ZERO, |d| d.0),
            access_log: raw.access_log.unwrap_or(true),
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
            max_connections: self.count(
                &raw.max_connections,
                DEFAULT_MAX_CONNECTIONS,
                (None, "server.max_connections"),
            )?,
            default_upstream_timeout: self.positive(
                &raw.default_upstream_timeout,
                DEFAULT_UPSTREAM_TIMEOUT,
                (None, "server.default_upstream_timeout"),
            )?,
            upstream_idle_timeout: self.positive(
                &raw.upstream_idle_timeout,
                DEFAULT_UPSTREAM_IDLE_TIMEOUT,
                (None, "server.upstream_idle_timeout"),
            )?,
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
        let topology = match (&raw.url, &raw.cluster, &raw.sentinel) {
            (Some(url), _, _) => RedisTopology::Standalone {
                url: self.redis_url(url, "redis.url")?,
            },
            (None, Some(nodes), _) => RedisTopology::Cluster {
                nodes: self.redis_nodes(nodes, "redis.cluster", "the cluster's seed nodes")?,
            },
            (None, None, Some(sentinel)) => self.sentinel(sentinel)?,
            (None, None, None) => {
                // `given` yielded a field, so one of the three is set.
                let why = format!("required: {one_of}");
                return self.fail(span, (None, field), why);
            }
        };
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
        let at = (None, "redis.lock_timeout");
        let lock_timeout = self.positive(&raw.lock_timeout, DEFAULT_LOCK_TIMEOUT, at)?;
        Ok(RedisConfig {
            topology,
            namespace,
            timeout,
            lock_timeout,
        })
    }

    /// A `redis://` or `rediss://` URL.
    fn redis_url(&self, url: &Spanned<String>, field: &str) -> Checked<String> {
        let text = url.get_ref();
        if text.starts_with("redis://") || text.starts_with("rediss://") {
            return Ok(text.clone());
        }
        let why = format!("{text:?} must start with redis:// or rediss://");
        self.fail(url.span(), (None, field), why)
    }

    /// `sentinel = { nodes = [..], master = ".." }`: the sentinels and the master name they
    /// monitor.
    fn sentinel(&self, table: &Spanned<RawSentinel>) -> Checked<RedisTopology> {
        let raw = table.get_ref();
        let Some(list) = &raw.nodes else {
            let why = "required: list the sentinels' URLs";
            return self.fail(table.span(), (None, "redis.sentinel.nodes"), why);
        };
        let nodes = self.redis_nodes(list, "redis.sentinel.nodes", "the sentinels' URLs")?;
        let master = match &raw.master {
            None => {
                let why = "required: the master name the sentinels monitor";
                return self.fail(table.span(), (None, "redis.sentinel.master"), why);
            }
            Some(name) if name.get_ref().trim().is_empty() || name.get_ref().contains(' ') => {
                let why = format!(
                    "invalid master name {:?} (non-empty, no spaces)",
                    name.get_ref()
                );
                return self.fail(name.span(), (None, "redis.sentinel.master"), why);
            }
            Some(name) => name.get_ref().clone(),
        };
        let auth = self.master_auth(raw)?;
        Ok(RedisTopology::Sentinel {
            nodes,
            master,
            auth,
        })
    }

    /// `username`, `password` and `db` of `sentinel = { .. }`: how to log in to the master. A
    /// message about the password never quotes it.
    fn master_auth(&self, raw: &RawSentinel) -> Checked<MasterAuth> {
        let password = match &raw.password {
            None => None,
            Some(p) => match p.get_ref() {
                toml::Value::String(text) if !text.is_empty() => Some(Secret::new(text.clone())),
                toml::Value::String(_) => {
                    let why = "empty password (leave `password` out when the master needs none)";
                    return self.fail(p.span(), (None, "redis.sentinel.password"), why);
                }
                _ => {
                    let why = "the password must be a string (its value is not shown)";
                    return self.fail(p.span(), (None, "redis.sentinel.password"), why);
                }
            },
        };
        let username = match &raw.username {
            None => None,
            Some(u) if u.get_ref().is_empty() || u.get_ref().contains(char::is_whitespace) => {
                let why = format!("invalid username {:?} (non-empty, no spaces)", u.get_ref());
                return self.fail(u.span(), (None, "redis.sentinel.username"), why);
            }
            Some(u) if password.is_none() => {
                let why = "a username needs a `password` too";
                return self.fail(u.span(), (None, "redis.sentinel.username"), why);
            }
            Some(u) => Some(u.get_ref().clone()),
        };
        let db = match &raw.db {
            None => 0,
            Some(db) if *db.get_ref() < 0 => {
                let why = format!("invalid database {} (0 or more)", db.get_ref());
                return self.fail(db.span(), (None, "redis.sentinel.db"), why);
            }
            Some(db) => *db.get_ref(),
        };
        Ok(MasterAuth {
            username,
            password,
            db,
        })
    }

    /// A list of Redis URLs (`what`, for the message when it is empty): at least one, none twice.
    fn redis_nodes(
        &self,
        nodes: &Spanned<Vec<Spanned<String>>>,
        field: &str,
        what: &str,
    ) -> Checked<Vec<String>> {
        if nodes.get_ref().is_empty() {
            let why = format!("must not be empty: list {what}");
            return self.fail(nodes.span(), (None, field), why);
        }
        let mut seen = Vec::with_capacity(nodes.get_ref().len());
        for node in nodes.get_ref() {
            let url = self.redis_url(node, field)?;
            if seen.contains(&url) {
                return self.fail(
                    node.span(),
                    (None, field),
                    format!("{url:?} is listed twice"),
                );
            }
            seen.push(url);
        }
        Ok(seen)
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
        let default_statuses = DEFAULT_CACHE_STATUSES.to_vec();
        let cache_statuses = self.list(
            &raw.cache_statuses,
            at("cache_statuses"),
            default_statuses,
            &|s| {
                u16::try_from(*s)
                    .ok()
                    .filter(|s| (100..=599).contains(s))
                    .ok_or_else(|| format!("invalid status {s} (must be in 100..=599)"))
            },
        )?;
        let heuristic_statuses = match raw.cache_statuses {
            Some(_) => cache_statuses.clone(),
            None => vec![200],
        };
        let header = |h: &String| {
            HeaderName::from_bytes(h.to_ascii_lowercase().as_bytes())
                .map_err(|e| format!("invalid header name {h:?} ({e})"))
        };
        let forward_headers = match &raw.forward_headers {
            Some(l) if l.get_ref().len() == 1 && l.get_ref()[0].get_ref() == "*" => {
                ForwardHeaders::All
            }
            Some(l) => {
                ForwardHeaders::Only(self.each(l.get_ref(), at("forward_headers"), &header)?)
            }
            None => ForwardHeaders::Only(
                DEFAULT_FORWARD_HEADERS
                    .iter()
                    .map(|h| HeaderName::from_static(h))
                    .collect(),
            ),
        };
        let credential_headers =
            self.each(&raw.credential_headers, at("credential_headers"), &header)?;
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
            heuristic_statuses,
            forward_headers,
            credential_headers,
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
            max_tags: match raw.max_tags.as_ref().map(|n| (*n.get_ref(), n.span())) {
                None => DEFAULT_MAX_TAGS,
                Some((n, span)) => usize::try_from(n).map_err(|_| {
                    let why = format!("must be a whole number >= 0, not {n}");
                    self.error(span, at("max_tags"), why)
                })?,
            },
            allow_trace: raw.allow_trace.unwrap_or(false),
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
        let redis_timeout = match &raw.redis_timeout {
            None => None,
            some => Some(self.positive(some, lease, at("lock.redis_timeout"))?),
        };
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
            redis_timeout,
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

    /// A count that must be at least 1; `or` when absent.
    fn count(&self, v: &Option<Spanned<i64>>, or: usize, at: At<'_>) -> Checked<usize> {
        match v.as_ref().map(|n| (*n.get_ref(), n.span())) {
            None => Ok(or),
            Some((n, span)) => match usize::try_from(n) {
                Ok(n) if n >= 1 => Ok(n),
                _ => Err(self.error(span, at, format!("must be a whole number >= 1, not {n}"))),
            },
        }
    }

    /// A duration that must not be zero; `or` when absent.
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

/// How a message names a route: its `name` when that is a usable one, else its position (`#N`).
fn route_label(index: usize, name: Option<&str>) -> String {
    match name {
        Some(name) if is_name(name, "") => name.to_owned(),
        _ => format!("#{}", index + 1),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_pointer_escapes() {
        assert!(is_json_pointer("/a/b~0c~1d"));
        assert!(is_json_pointer("/"));
        assert!(!is_json_pointer("a/b"));
        assert!(!is_json_pointer("/a~2"));
        assert!(!is_json_pointer("/a~"));
    }

    #[test]
    fn a_route_is_named_by_its_name_else_by_its_position() {
        assert_eq!(route_label(0, Some("recommend")), "recommend");
        assert_eq!(route_label(1, Some("bad name")), "#2");
        assert_eq!(route_label(2, None), "#3");
    }
}
