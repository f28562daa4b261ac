//! Routing: which `[[route]]` a request belongs to, and whether it may be cached on it.

use std::sync::Arc;

use http::{HeaderMap, HeaderName, Method, header};

use crate::config::RouteConfig;

/// The configured routes, longest path prefix first.
pub struct Router {
    routes: Vec<Arc<RouteConfig>>,
}

impl Router {
    pub fn new(routes: &[RouteConfig]) -> Router {
        let mut routes: Vec<_> = routes.iter().cloned().map(Arc::new).collect();
        // Stable: among equal prefixes, file order decides.
        routes.sort_by_key(|r| std::cmp::Reverse(r.path_prefix.len()));
        Router { routes }
    }

    /// The route for a request: the longest matching path prefix; among routes with that prefix,
    /// the first that caches the method, else the first of them (which will pass the request
    /// through uncached).
    pub fn route(&self, path: &str, method: &Method) -> Option<&Arc<RouteConfig>> {
        self.route_index(path, method).map(|i| &self.routes[i])
    }

    /// [`Router::route`] as a position in [`Router::routes`], for what is kept per route
    /// beside the router (the request counters).
    pub fn route_index(&self, path: &str, method: &Method) -> Option<usize> {
        let longest = self
            .routes
            .iter()
            .find(|r| prefix_matches(&r.path_prefix, path))?;
        let mut first = None;
        for (i, r) in self.routes.iter().enumerate() {
            if r.path_prefix != longest.path_prefix {
                continue;
            }
            if r.methods.contains(cache_method(method)) {
                return Some(i);
            }
            first.get_or_insert(i);
        }
        first
    }

    /// Every route, in the order [`Router::route_index`] counts them.
    pub fn routes(&self) -> &[Arc<RouteConfig>] {
        &self.routes
    }
}

impl Router {
    /// The route with this name.
    pub fn named(&self, name: &str) -> Option<&Arc<RouteConfig>> {
        self.routes.iter().find(|r| r.name == name)
    }

    /// Every route, longest path prefix first.
    pub fn all(&self) -> impl Iterator<Item = &Arc<RouteConfig>> {
        self.routes.iter()
    }
}

/// `/recommend` matches `/recommend`, `/recommend/x`, but not `/recommendations`; a prefix ending
/// in `/` matches everything below it.
fn prefix_matches(prefix: &str, path: &str) -> bool {
    match path.strip_prefix(prefix) {
        None => false,
        Some(rest) => prefix.ends_with('/') || rest.is_empty() || rest.starts_with('/'),
    }
}

/// The method a request is cached under: HEAD shares GET's entries, everything else its own.
pub fn cache_method(method: &Method) -> &Method {
    if method == Method::HEAD {
        &Method::GET
    } else {
        method
    }
}

/// Why a request on a caching route is passed through instead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bypass {
    RouteUncached,
    Method,
    Credentials,
}

/// Whether a request may share a cached answer: the route caches, the method is cached (HEAD
/// counts as GET: it is answered from the GET entry), and it carries no `Authorization`/`Cookie`
/// nor one of the route's `credential_headers` that the route does not key on (a personal answer
/// must not reach someone else).
pub fn check_cacheable(
    route: &RouteConfig,
    method: &Method,
    headers: &HeaderMap,
) -> Result<(), Bypass> {
    if !route.cache {
        return Err(Bypass::RouteUncached);
    }
    if !route.methods.contains(cache_method(method)) {
        return Err(Bypass::Method);
    }
    // One pass over the request's few names rather than a hashed lookup per credential.
    let credential = |name: &HeaderName| {
        name == header::AUTHORIZATION
            || name == header::COOKIE
            || route.credential_headers.contains(name)
    };
    if headers
        .keys()
        .any(|name| credential(name) && !route.key.headers.contains(name))
    {
        return Err(Bypass::Credentials);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_match_on_segment_boundaries() {
        assert!(prefix_matches("/recommend", "/recommend"));
        assert!(prefix_matches("/recommend", "/recommend/x"));
        assert!(!prefix_matches("/recommend", "/recommendations"));
        assert!(prefix_matches("/", "/anything"));
        assert!(prefix_matches("/api/", "/api/v1"));
    }
}
