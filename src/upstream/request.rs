//! The request an upstream is sent: a client's, rewritten as a reverse proxy does, or a shared
//! fill's, which carries only what the key holds; and the removal of hop-by-hop headers in both
//! directions (RFC 9110 §7.6.1).

use std::net::SocketAddr;

use http::Request;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::{PathAndQuery, Uri};

use crate::target::ClientScheme;

/// `Forwarded: proto=` of a shared fill: Corral's own element, with its requesters' scheme.
fn forwarded(scheme: ClientScheme) -> HeaderValue {
    HeaderValue::from_static(match scheme {
        ClientScheme::Http => "proto=http",
        ClientScheme::Https => "proto=https",
    })
}

/// Rewrites a client request for `upstream`: target URI, `Host`, forwarding headers, no hop-by-hop.
pub fn rewrite<B>(
    parts: &http::request::Parts,
    body: B,
    upstream: &Uri,
    peer: SocketAddr,
) -> Request<B> {
    let mut headers = parts.headers.clone();
    strip_hop_by_hop(&mut headers);
    let original_host = headers.remove(header::HOST).or_else(|| {
        parts
            .uri
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
    });
    if let Some(authority) = upstream.authority()
        && let Ok(host) = HeaderValue::from_str(authority.as_str())
    {
        headers.insert(header::HOST, host);
    }
    let scheme = ClientScheme::of(parts);
    append_forwarded(&mut headers, peer, original_host.as_ref(), scheme);
    let mut req = Request::new(body);
    *req.method_mut() = parts.method.clone();
    *req.uri_mut() = target_uri(upstream, &parts.uri);
    *req.headers_mut() = headers;
    req
}

/// Builds the upstream request of a shared fill: every requester with the same key gets the answer,
/// so the request carries only what the key holds plus what the route declares.
///
/// - method, normalized path and query as the client sent them (all keyed);
/// - the route's `key.headers` and `forward_headers` (by default content negotiation, the body's
///   type and `User-Agent`);
/// - never conditional headers (`If-*`) nor `Range`: a fill is unconditional and whole, so the
///   upstream cannot answer 304 or 206 for everyone; never hop-by-hop fields;
/// - the leader's `traceparent` and `tracestate` when well formed (see [`crate::trace`]);
/// - `Host` is the upstream's authority; `X-Forwarded-Proto` / `Forwarded: proto=` are Corral's
///   own, with the requesters' [`ClientScheme`] (it is keyed, so all share it). A client's
///   `X-Forwarded-*` and `Forwarded` are dropped, and nothing of the requester (address, `Host`)
///   is added: it is not in the key.
///
/// Bypassed requests use [`rewrite`] instead, which stays transparent.
pub fn fill_request<B>(
    parts: &http::request::Parts,
    body: B,
    route: &crate::config::RouteConfig,
) -> Request<B> {
    fill_request_to(parts, body, route, &route.upstream)
}

/// [`fill_request`] for one of the route's endpoints: its URI and `Host`.
pub fn fill_request_to<B>(
    parts: &http::request::Parts,
    body: B,
    route: &crate::config::RouteConfig,
    upstream: &Uri,
) -> Request<B> {
    let mut headers = HeaderMap::new();
    for (name, value) in &parts.headers {
        if fill_may_carry(name) && route.forward_headers.allows(name, &route.key) {
            headers.append(name.clone(), value.clone());
        }
    }
    strip_hop_by_hop(&mut headers);
    // The leader's trace context: it names a trace and cannot change the answer.
    crate::trace::carry(&parts.headers, &mut headers);
    if let Some(authority) = upstream.authority()
        && let Ok(host) = HeaderValue::from_str(authority.as_str())
    {
        headers.insert(header::HOST, host);
    }
    let scheme = ClientScheme::of(parts);
    headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static(scheme.as_str()));
    headers.insert(header::FORWARDED, forwarded(scheme));
    let mut req = Request::new(body);
    if route.tls.is_some() {
        req.extensions_mut()
            .insert(super::TlsRoute(std::sync::Arc::from(route.name.as_str())));
    }
    *req.method_mut() = parts.method.clone();
    *req.uri_mut() = target_uri(upstream, &parts.uri);
    *req.headers_mut() = headers;
    req
}

/// Whether a shared fill on `route` forwards a request header named `name` (see
/// [`fill_request`]).
pub fn fill_would_forward(route: &crate::config::RouteConfig, name: &HeaderName) -> bool {
    fill_may_carry(name)
        && !HOP_BY_HOP.contains(&name.as_str())
        && route.forward_headers.allows(name, &route.key)
}

/// Headers a shared fill never carries, whatever the route allows: they would make the upstream's
/// answer depend on one requester (conditionals, ranges, forwarding chains, credentials-by-proxy).
fn fill_may_carry(name: &HeaderName) -> bool {
    const NEVER: [&str; 8] = [
        "if-none-match",
        "if-modified-since",
        "if-match",
        "if-unmodified-since",
        "if-range",
        "range",
        "forwarded",
        "host",
    ];
    let name = name.as_str();
    !(NEVER.contains(&name)
        || name.starts_with("x-forwarded-")
        || name == "x-real-ip"
        || name == "content-length"
        || name == "expect")
}

/// The upstream's scheme and authority, its base path (if any) joined with the request's path and
/// query.
fn target_uri(upstream: &Uri, original: &Uri) -> Uri {
    let base = upstream.path().trim_end_matches('/');
    let pq = original.path_and_query().map_or("/", PathAndQuery::as_str);
    let joined = format!("{base}{pq}");
    let mut parts = upstream.clone().into_parts();
    parts.path_and_query = PathAndQuery::try_from(joined.as_str()).ok();
    Uri::from_parts(parts).unwrap_or_else(|_| upstream.clone())
}

fn append_forwarded(
    headers: &mut HeaderMap,
    peer: SocketAddr,
    host: Option<&HeaderValue>,
    scheme: ClientScheme,
) {
    let ip = peer.ip().to_string();
    let xff = match headers.get(X_FORWARDED_FOR).and_then(|v| v.to_str().ok()) {
        Some(prior) => format!("{prior}, {ip}"),
        None => ip.clone(),
    };
    if let Ok(v) = HeaderValue::from_str(&xff) {
        headers.insert(X_FORWARDED_FOR, v);
    }
    let node = match peer {
        SocketAddr::V4(_) => ip,
        SocketAddr::V6(_) => format!("\"[{ip}]\""),
    };
    let mut element = format!("for={node};proto={}", scheme.as_str());
    if let Some(host) = host.and_then(|h| h.to_str().ok()) {
        element.push_str(&format!(";host=\"{host}\""));
        if let Ok(v) = HeaderValue::from_str(host) {
            headers.insert(X_FORWARDED_HOST, v);
        }
    }
    let forwarded = match headers.get(header::FORWARDED).and_then(|v| v.to_str().ok()) {
        Some(prior) => format!("{prior}, {element}"),
        None => element,
    };
    if let Ok(v) = HeaderValue::from_str(&forwarded) {
        headers.insert(header::FORWARDED, v);
    }
    headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static(scheme.as_str()));
}

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");

/// The hop-by-hop fields of RFC 9110 §7.6.1 (and the legacy ones proxies still see).
const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Removes hop-by-hop fields, including every field named in `Connection`.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let listed: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in listed {
        headers.remove(name);
    }
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_listed_and_standard_hop_by_hop_fields() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("close, x-secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key(header::CONTENT_TYPE));
    }

    fn fill_route(forward: &str) -> crate::config::RouteConfig {
        let text = format!(
            "[[route]]\nname = \"r\"\npath_prefix = \"/\"\nupstream = \"http://10.0.0.1:5000\"\n\
             key = {{ headers = [\"x-segment\"] }}\n{forward}\n"
        );
        match crate::Config::parse(&text, std::path::Path::new("<test>")) {
            Ok(mut config) => config.routes.remove(0),
            Err(err) => panic!("{err}"),
        }
    }

    fn client_parts(headers: &[(&str, &str)]) -> http::request::Parts {
        let mut builder = Request::builder().uri("http://client.example/a?b=c");
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        match builder.body(()) {
            Ok(req) => req.into_parts().0,
            Err(err) => panic!("{err}"),
        }
    }

    #[test]
    fn shared_fills_carry_keyed_and_allowed_headers_only() {
        let parts = client_parts(&[
            ("host", "evil.example"),
            ("if-none-match", "\"x\""),
            ("if-modified-since", "Tue, 01 Dec 2026 00:00:00 GMT"),
            ("if-match", "*"),
            ("if-unmodified-since", "Tue, 01 Dec 2026 00:00:00 GMT"),
            ("if-range", "\"x\""),
            ("range", "bytes=0-9"),
            ("x-forwarded-host", "evil.example"),
            ("x-forwarded-for", "6.6.6.6"),
            ("forwarded", "for=6.6.6.6;host=evil.example"),
            ("x-original-url", "/admin"),
            ("accept-language", "fr"),
            ("x-segment", "a"),
            ("connection", "close"),
        ]);
        let cases: [(&str, &[&str], &[&str]); 3] = [
            (
                "",
                &["accept-language", "x-segment"],
                &["x-original-url", "if-none-match", "range"],
            ),
            (
                "forward_headers = []",
                &["x-segment"],
                &["accept-language", "x-original-url"],
            ),
            (
                "forward_headers = [\"*\"]",
                &["accept-language", "x-segment", "x-original-url"],
                &[
                    "if-none-match",
                    "if-range",
                    "range",
                    "if-match",
                    "connection",
                ],
            ),
        ];
        for (forward, present, absent) in cases {
            let req = fill_request(&parts, (), &fill_route(forward));
            let h = req.headers();
            for name in present {
                assert!(h.contains_key(*name), "{forward:?}: {name} forwarded");
            }
            for name in absent {
                assert!(!h.contains_key(*name), "{forward:?}: {name} not forwarded");
            }
            assert_eq!(h[header::HOST], "10.0.0.1:5000", "{forward:?}");
            assert_eq!(h[header::FORWARDED], "proto=http", "{forward:?}");
            assert!(!h.contains_key(X_FORWARDED_FOR), "{forward:?}");
            assert!(!h.contains_key(X_FORWARDED_HOST), "{forward:?}");
            assert_eq!(req.uri().to_string(), "http://10.0.0.1:5000/a?b=c");
        }
    }

    #[test]
    fn target_keeps_base_path_and_query() {
        let up = Uri::from_static("http://127.0.0.1:5000/api/");
        let t = target_uri(&up, &Uri::from_static("/recommend?segment=a"));
        assert_eq!(
            t.to_string(),
            "http://127.0.0.1:5000/api/recommend?segment=a"
        );
    }
}
