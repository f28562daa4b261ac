//! Validation, the last step of the [pipeline](super): raw structs in, checked types out, and
//! the place of every fault.
//!
//! A rule that rejects a value knows its span, field and route. A serde error knows only a span,
//! so [`Checker::toml_error`] asks [`locate`](super::locate) for the field and route at that span,
//! to name them the same way.
//!
//! Here: the checker, the file as a whole, `[server]`, `[cache]`, and the rules every table
//! shares (lists, counts, durations, addresses, upstreams). `check/redis.rs` checks `[redis]`,
//! `check/route.rs` each `[[route]]`.

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::ops::Range;
use std::path::Path;
use std::time::Duration;

use http::Uri;
use toml::Spanned;

use super::defaults::{
    DEFAULT_BODY_READ_TIMEOUT, DEFAULT_HEADER_READ_TIMEOUT, DEFAULT_L1_MAX_BYTES, DEFAULT_LISTEN,
    DEFAULT_MAX_CONNECTIONS, DEFAULT_MAX_HEADER_BYTES, DEFAULT_MAX_HEADERS,
    DEFAULT_SHUTDOWN_TIMEOUT, DEFAULT_UPSTREAM_IDLE_TIMEOUT, DEFAULT_UPSTREAM_TIMEOUT, MAX_WORKERS,
    MIN_HEADER_BYTES,
};
use super::locate::{Place, line_of, place};
use super::raw::{HumanDuration, List, RawConfig, RawServer};
use super::{CacheConfig, Config, ConfigError, RouteConfig, ServerConfig};
use crate::redact::redact;

mod redis;
mod route;
mod secret;
mod telemetry;

use secret::SecretSources;
mod tls;

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
            reason: redact(&with_suggestion(err.message().trim_end())).into_owned(),
        }
    }

    pub(super) fn config(&self, raw: RawConfig) -> Checked<Config> {
        let server = self.server(raw.server.as_ref().map(Spanned::get_ref))?;
        let redis = raw.redis.as_ref().map(|r| self.redis(r)).transpose()?;
        let telemetry = raw
            .telemetry
            .as_ref()
            .map(|t| self.telemetry(t))
            .transpose()?;
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
            if let Some(budget) = &checked.fleet_budget
                && let Some(other) = routes.iter().find(|r| {
                    r.fleet_budget
                        .as_ref()
                        .is_some_and(|b| b.name == budget.name && b.limit != budget.limit)
                })
            {
                let at = (Some(checked.name.as_str()), "fleet_concurrency");
                let why = format!(
                    "budget {:?} is {} on route {:?} but {} here; routes sharing a budget must \
                     give the same `fleet_concurrency`",
                    budget.name,
                    other.fleet_budget.as_ref().map_or(0, |b| b.limit),
                    other.name,
                    budget.limit
                );
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
            telemetry,
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
        let inline_token = match &raw.admin_token {
            None => None,
            Some(token) => match token.get_ref() {
                toml::Value::String(text) => Some(Spanned::new(token.span(), text.clone())),
                _ => {
                    let why = "the token must be a string (its value is not shown)";
                    return self.fail(token.span(), (None, "server.admin_token"), why);
                }
            },
        };
        let admin_token = self.secret(SecretSources {
            value: (inline_token.as_ref(), "server.admin_token"),
            file: (raw.admin_token_file.as_ref(), "server.admin_token_file"),
            env: (raw.admin_token_env.as_ref(), "server.admin_token_env"),
        })?;
        let open = raw.admin_open.unwrap_or(false);
        if let (Some(admin), None, false) = (admin_listen, &admin_token, open)
            && !admin.ip().is_loopback()
        {
            let span = raw.admin_listen.as_ref().map_or(0..0, Spanned::span);
            let why = format!(
                "{admin} is not a loopback address and no admin token is set: anyone who \
                 reaches it could purge and reload. Set `admin_token_file` (or `admin_token`, \
                 `admin_token_env`), or `admin_open = true` to accept that"
            );
            return self.fail(span, (None, "server.admin_listen"), why);
        }
        let at = (None, "server.default_upstream");
        let default_upstream = raw.default_upstream.as_ref();
        let tls = raw.tls.as_ref().map(|t| self.listener_tls(t)).transpose()?;
        Ok(ServerConfig {
            tls,
            listen,
            admin_listen,
            admin_token,
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
            workers: match &raw.workers {
                None => None,
                Some(n) if *n.get_ref() > MAX_WORKERS as i64 => {
                    let why = format!("must be at most {MAX_WORKERS}, not {}", n.get_ref());
                    return self.fail(n.span(), (None, "server.workers"), why);
                }
                Some(_) => Some(self.count(&raw.workers, 1, (None, "server.workers"))?),
            },
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

    /// An upstream: an absolute `http://` or `https://` URI with a host, optionally a base path, no query.
    fn upstream(&self, v: &Spanned<String>, at: At<'_>) -> Checked<Uri> {
        let text = v.get_ref();
        let uri: Uri = text
            .parse()
            .map_err(|e| self.error(v.span(), at, format!("invalid URI {text:?} ({e})")))?;
        let problem = match (uri.scheme_str(), uri.authority()) {
            (Some("http" | "https"), Some(_)) if uri.query().is_none() => return Ok(uri),
            (Some("http" | "https"), Some(_)) => "must not have a query",
            (Some(_), _) => "unsupported scheme; use http:// or https://",
            _ => {
                "must be an absolute http:// or https:// URI with a host, e.g. \"http://127.0.0.1:5000\""
            }
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

/// A serde message about an unknown field, with the known field closest to it suggested
/// (`unknown field `tll`, expected one of … — did you mean `ttl`?`); any other message as it is.
fn with_suggestion(message: &str) -> std::borrow::Cow<'_, str> {
    let Some(rest) = message.strip_prefix("unknown field `") else {
        return message.into();
    };
    let Some((unknown, known)) = rest.split_once('`') else {
        return message.into();
    };
    // Close: at most one edit in three characters (a typo, a swapped pair), at least one.
    let close = (unknown.chars().count() / 3).max(1);
    let closest = known
        .split('`')
        .skip(1)
        .step_by(2)
        .map(|name| (strsim::damerau_levenshtein(unknown, name), name))
        .filter(|(edits, _)| *edits <= close)
        .min_by_key(|(edits, _)| *edits);
    match closest {
        Some((_, name)) => format!("{message} — did you mean `{name}`?").into(),
        None => message.into(),
    }
}

/// Non-empty, and only ASCII letters, digits, `_`, `-` and the characters in `extra`.
fn is_name(s: &str, extra: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || extra.contains(c))
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
    fn an_unknown_field_gets_the_closest_known_one_suggested() {
        let message = "unknown field `tll`, expected one of `name`, `ttl`, `stale_if_error`";
        assert!(with_suggestion(message).ends_with("did you mean `ttl`?"));
        let far = "unknown field `colour`, expected one of `name`, `ttl`";
        assert_eq!(with_suggestion(far), far, "nothing close: no guess");
        assert_eq!(with_suggestion("invalid type"), "invalid type");
    }

    #[test]
    fn a_route_is_named_by_its_name_else_by_its_position() {
        assert_eq!(route_label(0, Some("recommend")), "recommend");
        assert_eq!(route_label(1, Some("bad name")), "#2");
        assert_eq!(route_label(2, None), "#3");
    }
}
