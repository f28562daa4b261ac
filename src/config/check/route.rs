//! One `[[route]]` table: what it matches, where it goes, how it is cached, keyed and locked.

use std::time::Duration;

use http::{HeaderName, HeaderValue, Method};
use toml::Spanned;

use super::{Checked, Checker, is_name};
use crate::config::defaults::{
    DEFAULT_ERROR_TTL, DEFAULT_LEASE, DEFAULT_MAX_BODY, DEFAULT_MAX_ENTRY_SIZE, DEFAULT_MAX_TAGS,
    DEFAULT_MAX_WAITERS, DEFAULT_TTL, DEFAULT_TTL_JITTER, DEFAULT_UNCACHEABLE_TTL,
    DEFAULT_UPSTREAM_TIMEOUT, DEFAULT_WAIT_TIMEOUT,
};
use crate::config::raw::{
    HumanDuration, RawHeaderRules, RawKey, RawLock, RawOnWaitTimeout, RawRoute, RawScope,
    RawUpstream,
};
use crate::config::{
    DEFAULT_CACHE_STATUSES, DEFAULT_FORWARD_HEADERS, FleetBudget, ForwardHeaders, KeySpec,
    LockScope, LockSpec, OnWaitTimeout, RouteConfig,
};
use crate::header_rules::{HeaderRules, PROTECTED};

impl Checker<'_> {
    /// The `index`-th `[[route]]` (named `#N` in messages until its name is checked); `redis`:
    /// whether the file has a `[redis]` table (the default lock scope, and `fleet` allowed).
    pub(super) fn route(
        &self,
        index: usize,
        route: &Spanned<RawRoute>,
        redis: bool,
    ) -> Checked<RouteConfig> {
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
        let Some(given) = &raw.upstream else {
            return Err(self.error(route.span(), at("upstream"), "required"));
        };
        let endpoints = match given.get_ref() {
            RawUpstream::One(url) => {
                vec![self.upstream(&Spanned::new(given.span(), url.clone()), at("upstream"))?]
            }
            RawUpstream::Many(urls) if urls.is_empty() => {
                let why = "must not be empty: list the endpoints";
                return self.fail(given.span(), at("upstream"), why);
            }
            RawUpstream::Many(urls) => {
                let mut endpoints: Vec<http::Uri> = Vec::with_capacity(urls.len());
                for url in urls {
                    let uri = self.upstream(url, at("upstream"))?;
                    if endpoints.contains(&uri) {
                        let why = format!("{:?} is listed twice", url.get_ref());
                        return self.fail(url.span(), at("upstream"), why);
                    }
                    endpoints.push(uri);
                }
                endpoints
            }
        };
        // Non-empty: one URL, or a list checked not to be empty.
        let upstream = endpoints[0].clone();
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
        let tls = raw.tls.as_ref();
        let tls = tls
            .map(|t| self.upstream_tls(t, &name, &upstream))
            .transpose()?;
        Ok(RouteConfig {
            tls,
            path_prefix: path_prefix.into_inner(),
            methods,
            upstream,
            endpoints,
            cache,
            ttl: duration(raw.ttl, DEFAULT_TTL),
            stale_while_revalidate: duration(raw.stale_while_revalidate, Duration::ZERO),
            stale_if_error: duration(raw.stale_if_error, Duration::ZERO),
            ttl_jitter: match &raw.ttl_jitter {
                None => DEFAULT_TTL_JITTER,
                Some(given) => {
                    let jitter = match given.get_ref() {
                        toml::Value::Float(f) => Some(*f),
                        toml::Value::Integer(i) => Some(*i as f64),
                        _ => None,
                    };
                    match jitter {
                        Some(j) if (0.0..1.0).contains(&j) => j,
                        _ => {
                            let why = format!(
                                "must be a fraction of the lifetime in [0, 1) (0.1 is the \
                                 default), not {}",
                                given.get_ref()
                            );
                            return self.fail(given.span(), at("ttl_jitter"), why);
                        }
                    }
                }
            },
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
            fleet_budget: self.fleet_budget(raw, &name)?,
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
            response_headers: self.header_rules(raw.response_headers.as_ref(), &name)?,
            name,
        })
    }

    /// `fleet_concurrency` and the budget it counts in (`fleet_budget`, else the route's name).
    fn fleet_budget(&self, raw: &RawRoute, route: &str) -> Checked<Option<FleetBudget>> {
        let at = |field| (Some(route), field);
        let name = match &raw.fleet_budget {
            Some(name) if name.get_ref().trim().is_empty() => {
                return self.fail(name.span(), at("fleet_budget"), "must not be empty");
            }
            Some(name) => name.get_ref().clone(),
            None => route.to_owned(),
        };
        match (&raw.fleet_concurrency, &raw.fleet_budget) {
            (None, None) => Ok(None),
            (None, Some(named)) => {
                let why = "names a budget but the route has no `fleet_concurrency`; \
                           add `fleet_concurrency = N` (the same N on every route of the budget)";
                self.fail(named.span(), at("fleet_budget"), why)
            }
            (some, _) => Ok(Some(FleetBudget {
                name,
                limit: self.count(some, 1, at("fleet_concurrency"))?,
            })),
        }
    }

    /// `response_headers = { remove = [..], set = { .. } }`: valid names and values, none of the
    /// headers Corral keeps for itself ([`PROTECTED`]).
    fn header_rules(&self, raw: Option<&RawHeaderRules>, route: &str) -> Checked<HeaderRules> {
        let Some(raw) = raw else {
            return Ok(HeaderRules::default());
        };
        let name = |h: &str| {
            let name = HeaderName::from_bytes(h.to_ascii_lowercase().as_bytes())
                .map_err(|e| format!("invalid header name {h:?} ({e})"))?;
            if PROTECTED.contains(&name.as_str()) {
                return Err(format!(
                    "{name} is Corral's to write; no rule may change it"
                ));
            }
            Ok(name)
        };
        let at = (Some(route), "response_headers.remove");
        let remove = self.each(&raw.remove, at, &|h: &String| name(h))?;
        let mut set = Vec::with_capacity(raw.set.len());
        for (key, value) in &raw.set {
            let at = (Some(route), "response_headers.set");
            let checked = name(key).and_then(|name| {
                let text = value.get_ref();
                HeaderValue::from_str(text)
                    .map(|v| (name, v))
                    .map_err(|_| format!("invalid value {text:?} for {key}"))
            });
            set.push(checked.map_err(|why| self.error(value.span(), at, why))?);
        }
        Ok(HeaderRules { remove, set })
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
}

/// RFC 6901, restricted to pointers below the root: `/a/b~1c`.
fn is_json_pointer(s: &str) -> bool {
    s.starts_with('/')
        && s.split('~')
            .skip(1)
            .all(|rest| rest.starts_with(['0', '1']))
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
}
