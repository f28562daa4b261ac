//! Purges, asked for (the admin API) or implied (RFC 9111 §4.4): an unsafe request that passes
//! through Corral and gets a 2xx or 3xx invalidates what is stored for its target URI — and for
//! its `Location` and `Content-Location` when they are on the same origin — fleet-wide, through
//! the purge machinery, before its answer goes back. So an update made through Corral is never
//! followed by a stale read on another instance.
//!
//! What is invalidated is the GET (and so HEAD) entry of each URI on the route it maps to, keyed
//! with the unsafe request's own headers (for routes keyed on headers). Variants go with it: their
//! keys hold the primary entry's generation ([`crate::vary::variant_key`]).

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::request::Parts;
use http::{Method, Response, Uri};

use super::Proxy;
use crate::body::ProxyBody;
use crate::entry::now_ms;
use crate::key::CacheKey;
use crate::purge::{
    MAX_PREFIX_DEPTH, Mode, Purge, PurgeError, PurgeOrder, PurgeRequest, prefix_tag,
};
use crate::target::ClientScheme;

/// The schemes a client may speak: a purge by path removes the entry of each.
const SCHEMES: [ClientScheme; 2] = [ClientScheme::Http, ClientScheme::Https];

impl Proxy {
    /// Purges what `request` names: from Redis and, through the invalidation channel, from every
    /// instance's L1 (this one at once) — or, for a soft purge, marks it stale there. Returns the
    /// entries removed from (or marked in) Redis — or, in embedded mode, L1.
    pub async fn purge(&self, request: &PurgeRequest) -> Result<u64, PurgeError> {
        let purges = match &request.prefix {
            Some(prefix) => self.resolve_prefix(prefix)?,
            None => self.resolve(request)?,
        };
        // One moment for the whole request: what was stored before it is marked.
        let mode = if request.soft {
            Mode::MarkStale { at: now_ms() }
        } else {
            Mode::Delete
        };
        let purged = self.apply_all(purges, mode).await?;
        tracing::info!(purge = %request.describe(), purged, "purged");
        Ok(purged)
    }

    /// Applies `purges`, counting them in the metrics as one purge asked for: each route and tag
    /// purge on its own, the keys of one URL (one per scheme) as one purge by `url`.
    async fn apply_all(&self, purges: Vec<Purge>, mode: Mode) -> Result<u64, PurgeError> {
        let metrics = self.handles.metrics();
        let (mut purged, mut keys) = (0, None);
        for purge in purges {
            let kind = purge.kind();
            let is_key = matches!(purge, Purge::Key { .. });
            let n = match self.apply(PurgeOrder { purge, mode }).await {
                Ok(n) => n,
                Err(err) => {
                    // What was purged before the failure still counts.
                    if let Some((kind, n)) = keys {
                        metrics.purge(kind, mode, n);
                    }
                    return Err(err);
                }
            };
            purged += n;
            if is_key {
                keys.get_or_insert((kind, 0)).1 += n;
            } else {
                metrics.purge(kind, mode, n);
            }
        }
        if let Some((kind, n)) = keys {
            metrics.purge(kind, mode, n);
        }
        Ok(purged)
    }

    /// What a purge by `prefix` removes: every cached route whose `path_prefix` lies at or below
    /// it, whole; and, for routes that hold it deeper down, the entries tagged with it (see
    /// [`path_tags`](crate::purge::path_tags)) — one purge by tag, whichever routes they are on.
    fn resolve_prefix(&self, prefix: &str) -> Result<Vec<Purge>, PurgeError> {
        let malformed = |what: String| PurgeError::Malformed(format!("prefix {prefix:?}: {what}"));
        if !prefix.starts_with('/') || prefix.contains(['?', '#']) {
            return Err(malformed(
                "must be a path starting with `/`, without a query".to_owned(),
            ));
        }
        let path = crate::target::normalize_path(prefix).map_err(|e| malformed(e.to_string()))?;
        let path = path.trim_end_matches('/');
        let mut purges = Vec::new();
        let mut tagged = false;
        for route in self.router.all().filter(|r| r.cache) {
            let base = route.path_prefix.trim_end_matches('/');
            let within = |outer: &str, inner: &str| {
                inner == outer
                    || inner
                        .strip_prefix(outer)
                        .is_some_and(|r| r.starts_with('/'))
            };
            if within(path, base) {
                purges.push(Purge::Route(route.name.clone()));
            } else if within(base, path) && !tagged {
                let depth = path[base.len()..]
                    .split('/')
                    .filter(|s| !s.is_empty())
                    .count();
                if depth > MAX_PREFIX_DEPTH {
                    return Err(malformed(format!(
                        "{depth} segments below route {:?}'s path_prefix, but entries are indexed \
                         {MAX_PREFIX_DEPTH} deep: purge a shorter prefix",
                        route.name
                    )));
                }
                purges.push(Purge::Tag(prefix_tag(path)));
                tagged = true;
            }
        }
        if purges.is_empty() {
            return Err(PurgeError::NoRoute(prefix.to_owned()));
        }
        Ok(purges)
    }

    /// Removes what `order` names from Redis and every instance's L1, or marks it stale.
    async fn apply(&self, order: PurgeOrder) -> Result<u64, PurgeError> {
        let l1 = &self.handles.l1();
        let purged = match self.fleet() {
            Some(fleet) => {
                let n = fleet.purge(&order).await;
                let n = n.map_err(|err| PurgeError::Redis(Box::new(err)))?;
                l1.apply(&order).await;
                n
            }
            None => l1.apply(&order).await,
        };
        if let (Purge::Key { key, .. }, Mode::Delete) = (&order.purge, order.mode) {
            self.handles.marks().remove(key);
        }
        tracing::debug!(purge = %order.payload(), purged, "purged");
        Ok(purged)
    }

    /// What a purge by `route`, `tag` or `url` removes. A `url` with a scheme names that scheme's
    /// entry; a path alone names both, the `http` and the `https` one (a request's scheme is in
    /// its key: see [`CacheKey::for_scheme`]).
    fn resolve(&self, request: &PurgeRequest) -> Result<Vec<Purge>, PurgeError> {
        if let Some(route) = &request.route {
            return match self.router.named(route) {
                Some(_) => Ok(vec![Purge::Route(route.clone())]),
                None => Err(PurgeError::UnknownRoute(route.clone())),
            };
        }
        if let Some(tag) = &request.tag {
            return Ok(vec![Purge::Tag(tag.clone())]);
        }
        let url = request.url.as_deref().unwrap_or("/");
        let malformed = |what: &str| PurgeError::Malformed(format!("{what} in {url:?}"));
        let uri: Uri = url.parse().map_err(|_| malformed("not a URL path"))?;
        let schemes = match uri.scheme_str() {
            None => SCHEMES.as_slice(),
            Some("http") => &SCHEMES[..1],
            Some("https") => &SCHEMES[1..],
            Some(_) => return Err(malformed("a scheme other than http or https")),
        };
        // The same path and method as the request being purged was keyed with.
        let path =
            crate::target::normalize_path(uri.path()).map_err(|e| malformed(&e.to_string()))?;
        let uri: Uri = match uri.query() {
            Some(q) => format!("{path}?{q}"),
            None => path,
        }
        .parse()
        .map_err(|_| malformed("not a URL path"))?;
        let method = match &request.method {
            Some(m) => http::Method::from_bytes(m.to_ascii_uppercase().as_bytes())
                .map_err(|_| malformed("bad method"))?,
            None => http::Method::GET,
        };
        let method = crate::route::cache_method(&method).clone();
        let mut headers = http::HeaderMap::new();
        for (name, value) in &request.headers {
            let name =
                HeaderName::from_bytes(name.as_bytes()).map_err(|_| malformed("bad header"))?;
            let value = HeaderValue::from_str(value).map_err(|_| malformed("bad header"))?;
            headers.append(name, value);
        }
        let route = self
            .router
            .route(uri.path(), &method)
            .filter(|r| r.cache)
            .ok_or_else(|| PurgeError::NoRoute(url.to_owned()))?;
        let body = request.body_bytes();
        let key = CacheKey::derive(&route.name, &route.key, &method, &uri, &headers, &body)
            .map_err(|e| PurgeError::Malformed(e.to_string()))?;
        Ok(schemes
            .iter()
            .map(|&scheme| Purge::Key {
                route: route.name.clone(),
                key: key.for_scheme(scheme),
            })
            .collect())
    }

    /// After an unsafe request passed through: invalidates its target URI and same-origin
    /// `Location` / `Content-Location` when the upstream answered 2xx or 3xx. Failures are logged:
    /// the entries then expire by themselves.
    pub(super) async fn invalidate_after(&self, parts: &Parts, response: &Response<ProxyBody>) {
        let status = response.status();
        if parts.method.is_safe() || !(status.is_success() || status.is_redirection()) {
            return;
        }
        for uri in invalidated(parts, response.headers()) {
            let Some(route) = self
                .router
                .route(uri.path(), &Method::GET)
                .filter(|r| r.cache && r.methods.contains(&Method::GET))
            else {
                continue;
            };
            let key = CacheKey::derive(
                &route.name,
                &route.key,
                &Method::GET,
                &uri,
                &parts.headers,
                b"",
            );
            let Ok(key) = key else { continue };
            // Both schemes' entries: the resource changed for every client.
            let purges = SCHEMES.map(|scheme| Purge::Key {
                route: route.name.clone(),
                key: key.for_scheme(scheme),
            });
            if let Err(err) = self.apply_all(purges.into(), Mode::Delete).await {
                tracing::warn!(%uri, %err, "could not invalidate after an unsafe request");
            }
        }
    }
}

/// The URIs an unsafe request invalidates: its target, and the `Location` / `Content-Location`
/// of its answer when they are relative or name the request's own authority. Paths normalized
/// as every request's are ([`crate::target`]); ones that cannot be are skipped.
pub(crate) fn invalidated(parts: &Parts, answer: &HeaderMap) -> Vec<Uri> {
    let own = parts
        .headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_ascii_lowercase);
    let mut out = vec![parts.uri.clone()];
    let linked: [HeaderName; 2] = [header::LOCATION, header::CONTENT_LOCATION];
    for name in linked {
        let Some(value) = answer.get(&name).and_then(|v| v.to_str().ok()) else {
            continue;
        };
        let Ok(uri) = value.trim().parse::<Uri>() else {
            continue;
        };
        let same_origin = match uri.authority() {
            None => uri.path().starts_with('/'),
            Some(authority) => {
                uri.scheme_str() == Some("http")
                    && own.as_deref() == Some(authority.as_str().to_ascii_lowercase().as_str())
            }
        };
        if same_origin {
            out.push(uri);
        }
    }
    out.into_iter()
        .filter_map(|uri| {
            let path = crate::target::normalize_path(uri.path()).ok()?;
            let pq = match uri.query() {
                Some(q) => format!("{path}?{q}"),
                None => path,
            };
            pq.parse::<Uri>().ok()
        })
        .collect()
}

/// A header value, for the tests' requests.
#[cfg(test)]
fn value(s: &'static str) -> HeaderValue {
    HeaderValue::from_static(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_and_same_origin_locations_are_invalidated() {
        let mut req = http::Request::builder()
            .method(Method::POST)
            .uri("/items/7?x=1")
            .header("host", "api.example:8080");
        req = req.header("x", "y");
        let Ok(req) = req.body(()) else {
            panic!("a valid request");
        };
        let (parts, ()) = req.into_parts();
        type Case = (
            &'static [(HeaderName, &'static str)],
            &'static [&'static str],
        );
        let cases: [Case; 5] = [
            (&[], &["/items/7?x=1"]),
            (
                &[(header::LOCATION, "/items/8")],
                &["/items/7?x=1", "/items/8"],
            ),
            (
                &[(header::CONTENT_LOCATION, "http://API.example:8080/a/../b")],
                &["/items/7?x=1", "/b"],
            ),
            (
                &[(header::LOCATION, "http://other.example/items/8")],
                &["/items/7?x=1"],
            ),
            (
                &[(header::LOCATION, "https://api.example:8080/x")],
                &["/items/7?x=1"],
            ),
        ];
        for (fields, want) in cases {
            let mut answer = HeaderMap::new();
            for (name, v) in fields {
                answer.insert(name.clone(), value(v));
            }
            let got: Vec<String> = invalidated(&parts, &answer)
                .iter()
                .map(|u| u.to_string())
                .collect();
            assert_eq!(got, *want, "{fields:?}");
        }
    }
}
