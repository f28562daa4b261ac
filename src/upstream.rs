//! Talking to upstreams: one pooled hyper client, request rewriting as a reverse proxy does, and the
//! removal of hop-by-hop headers in both directions (RFC 9110 §7.6.1).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::{PathAndQuery, Uri};
use http::{Request, Response};
use http_body_util::{BodyExt, Either, Full};
use hyper::body::Incoming;
mod caps;
mod pool;
pub mod tls;
pub use caps::{Caps, Overloaded};
pub use tls::{TlsFailure, TlsRoute};

/// Spare bytes a read body may carry into the cache before it is copied to an exact allocation.
const SPARE_LIMIT: usize = 1024;

/// A request body on its way upstream: buffered (keyed or filled requests) or streamed through.
pub type UpstreamBody = Either<Full<Bytes>, crate::body::ClientBody>;

/// Why an upstream call produced no response.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("upstream {upstream}: {source}")]
    Connect {
        upstream: String,
        #[source]
        source: Box<hyper_util::client::legacy::Error>,
    },
    #[error("upstream {upstream}: no complete answer within {limit:?}")]
    Timeout { upstream: String, limit: Duration },
    #[error("upstream {upstream}: reading the body: {reason}")]
    Body { upstream: String, reason: String },
    #[error("upstream {upstream}: {failure}")]
    Tls {
        upstream: String,
        failure: TlsFailure,
    },
}

impl UpstreamError {
    /// The failure's kind, for the `corral-error` header: what a client may know of it (never
    /// the upstream's address, which stays in the log).
    pub fn kind(&self) -> &'static str {
        match self {
            UpstreamError::Connect { .. } => "upstream-connect",
            UpstreamError::Timeout { .. } => "upstream-timeout",
            UpstreamError::Body { .. } => "upstream-body",
            UpstreamError::Tls { failure, .. } => failure.kind(),
        }
    }
}

/// A copy of `req` to send again, when it is idempotent (RFC 9110 §9.2.2) and its body can be
/// sent twice: buffered, or a streamed body that is already known to be empty.
fn replayable(req: &Request<UpstreamBody>) -> Option<Request<UpstreamBody>> {
    if !is_idempotent(req.method()) {
        return None;
    }
    let body = match req.body() {
        Either::Left(full) => Either::Left(full.clone()),
        Either::Right(streamed) if http_body::Body::is_end_stream(streamed) => {
            Either::Left(Full::new(Bytes::new()))
        }
        Either::Right(_) => return None,
    };
    let mut again = Request::new(body);
    *again.method_mut() = req.method().clone();
    *again.uri_mut() = req.uri().clone();
    *again.version_mut() = req.version();
    *again.headers_mut() = req.headers().clone();
    Some(again)
}

fn is_idempotent(method: &http::Method) -> bool {
    use http::Method;
    [
        Method::GET,
        Method::HEAD,
        Method::OPTIONS,
        Method::TRACE,
        Method::PUT,
        Method::DELETE,
    ]
    .contains(method)
}

/// Whether a failed call got no answer at all: no connection, or one that closed before any byte
/// of a response (hyper: canceled, or an incomplete message).
fn unanswered(err: &hyper_util::client::legacy::Error) -> bool {
    if err.is_connect() {
        return true;
    }
    let mut source = std::error::Error::source(err);
    while let Some(cause) = source {
        if let Some(hyper) = cause.downcast_ref::<hyper::Error>() {
            return hyper.is_incomplete_message() || hyper.is_canceled();
        }
        source = cause.source();
    }
    false
}

/// An upstream answer read up to a size limit.
#[derive(Debug)]
pub enum Fetched {
    Whole(Buffered),
    /// Larger than the limit: the head, the part read so far, and the rest still streaming.
    Oversized {
        parts: http::response::Parts,
        prefix: Bytes,
        rest: Incoming,
    },
}

/// A response read whole from the upstream.
#[derive(Debug, Clone)]
pub struct Buffered {
    pub status: http::StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
    /// The request headers this answer was fetched with, so an entry can record the values its
    /// `Vary` names ([`crate::vary`]).
    pub sent: HeaderMap,
}

/// The pooled clients to every upstream (see `upstream/pool.rs`). Cloning shares the pools, and
/// a reload's [`UpstreamClient::renew`] reaches every clone.
#[derive(Clone)]
pub struct UpstreamClient {
    client: pool::Pooled,
    routes: Arc<ArcSwap<pool::RouteClients>>,
    idle: Duration,
    handshakes: tls::Handshakes,
}

impl Default for UpstreamClient {
    fn default() -> Self {
        UpstreamClient::new()
    }
}

/// How long a pooled connection may idle when the config does not say (`server.upstream_idle_timeout`).
const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(4);

impl UpstreamClient {
    pub fn new() -> UpstreamClient {
        UpstreamClient::with_idle_timeout(DEFAULT_IDLE_TIMEOUT)
    }

    /// A client whose pooled connections close after `idle` unused. Below the upstream's own
    /// keep-alive timeout, Corral is the side that closes, so it never writes a request into a
    /// connection the upstream is closing at that moment (the rare race left is retried: see
    /// [`UpstreamClient::send`]).
    pub fn with_idle_timeout(idle: Duration) -> UpstreamClient {
        UpstreamClient::with_handshakes(idle, tls::Handshakes::default())
    }

    /// A client whose TLS handshakes are counted in `handshakes` (the metrics' family).
    pub fn with_handshakes(idle: Duration, handshakes: tls::Handshakes) -> UpstreamClient {
        let client = pool::pooled(tls::Connector::system(handshakes.clone()), idle);
        UpstreamClient {
            client,
            routes: Arc::default(),
            idle,
            handshakes,
        }
    }

    /// Builds (or keeps) the clients of the routes that have a `tls` table: every clone of this
    /// client sees them.
    pub fn renew(&self, config: &crate::Config) {
        let routes = self
            .routes
            .load()
            .renewed(config, self.idle, &self.handshakes);
        self.routes.store(Arc::new(routes));
    }

    /// The client for `req`: its route's own when [`TlsRoute`] marks it, else the shared one.
    fn client_for(
        &self,
        req: &Request<UpstreamBody>,
        upstream: &Uri,
    ) -> Result<pool::Pooled, UpstreamError> {
        let Some(TlsRoute(route)) = req.extensions().get::<TlsRoute>() else {
            return Ok(self.client.clone());
        };
        let routes = self.routes.load();
        match routes.get(route).map(|r| &r.client) {
            Some(Ok(client)) => Ok(client.clone()),
            Some(Err(why)) => Err(UpstreamError::Tls {
                upstream: upstream.to_string(),
                failure: TlsFailure::Other(why.to_string()),
            }),
            // A route whose tls table a reload removed while this request ran.
            None => Ok(self.client.clone()),
        }
    }

    /// Marks a pass-through request of `route` for its route's client, if it has one.
    pub fn mark(&self, req: &mut Request<UpstreamBody>, route: &str) {
        let routes = self.routes.load();
        if !routes.is_empty() && routes.get(route).is_some() {
            req.extensions_mut().insert(TlsRoute(Arc::from(route)));
        }
    }

    /// Sends a request and returns the response with its body still streaming. `limit` bounds the
    /// wait for the response head, retry included.
    ///
    /// An idempotent request with a replayable body (buffered, or none) is sent once more when the
    /// first try got no answer — the connection could not be made, or closed before a complete
    /// answer head (a pooled connection the upstream closed as it was reused). Like nginx's
    /// `proxy_next_upstream error`, and never for `POST`/`PATCH`, which must not run twice.
    pub async fn send(
        &self,
        req: Request<UpstreamBody>,
        upstream: &Uri,
        limit: Duration,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let client = self.client_for(&req, upstream)?;
        let replay = replayable(&req).map(|mut again| {
            again.extensions_mut().extend(req.extensions().clone());
            again
        });
        let tries = async {
            match (client.request(req).await, replay) {
                // A TLS failure is the upstream's answer (a certificate, a name, a timeout
                // already waited for): trying again would only double it.
                (Err(err), Some(again)) if unanswered(&err) && TlsFailure::of(&err).is_none() => {
                    tracing::debug!(%upstream, %err, "no answer on the first try; retrying once");
                    client.request(again).await
                }
                (result, _) => result,
            }
        };
        match tokio::time::timeout(limit, tries).await {
            Ok(Ok(mut resp)) => {
                strip_hop_by_hop(resp.headers_mut());
                Ok(resp)
            }
            Ok(Err(source)) => match TlsFailure::of(&source) {
                Some(failure) => Err(UpstreamError::Tls {
                    upstream: upstream.to_string(),
                    failure,
                }),
                None => Err(UpstreamError::Connect {
                    upstream: upstream.to_string(),
                    source: Box::new(source),
                }),
            },
            Err(_) => Err(UpstreamError::Timeout {
                upstream: upstream.to_string(),
                limit,
            }),
        }
    }

    /// Sends a request and reads the whole answer — at most `max_body` bytes; past that it
    /// returns what it read with the rest still streaming — all within `limit`.
    pub async fn fetch(
        &self,
        req: Request<UpstreamBody>,
        upstream: &Uri,
        limit: Duration,
        max_body: u64,
    ) -> Result<Fetched, UpstreamError> {
        let sent = req.headers().clone();
        let whole = async {
            let resp = self.send(req, upstream, limit).await?;
            let (parts, mut body) = resp.into_parts();
            let cap = usize::try_from(max_body).unwrap_or(usize::MAX);
            let declared = http_body::Body::size_hint(&body).exact();
            let mut buf = BytesMut::with_capacity(
                declared.map_or(8 * 1024, |n| usize::try_from(n).unwrap_or(cap).min(cap)),
            );
            while let Some(frame) = body.frame().await {
                let frame = frame.map_err(|err| UpstreamError::Body {
                    upstream: upstream.to_string(),
                    reason: err.to_string(),
                })?;
                // Trailers are hop-by-hop for us: dropped.
                if let Ok(data) = frame.into_data() {
                    buf.extend_from_slice(&data);
                    if buf.len() > cap {
                        return Ok(Fetched::Oversized {
                            parts,
                            prefix: buf.freeze(),
                            rest: body,
                        });
                    }
                }
            }
            // A body much smaller than the buffer it was read into would keep the spare capacity
            // alive for as long as it is cached.
            let body = if buf.capacity() - buf.len() > SPARE_LIMIT {
                Bytes::copy_from_slice(&buf)
            } else {
                buf.freeze()
            };
            Ok(Fetched::Whole(Buffered {
                status: parts.status,
                headers: parts.headers,
                body,
                sent,
            }))
        };
        tokio::time::timeout(limit, whole)
            .await
            .unwrap_or_else(|_| {
                Err(UpstreamError::Timeout {
                    upstream: upstream.to_string(),
                    limit,
                })
            })
    }
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
    append_forwarded(&mut headers, peer, original_host.as_ref());
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
/// - `Host` is the upstream's authority; `X-Forwarded-Proto` / `Forwarded: proto=http` are
///   Corral's own. A client's `X-Forwarded-*` and `Forwarded` are dropped, and nothing of the
///   requester (address, `Host`) is added: it is not in the key.
///
/// Bypassed requests use [`rewrite`] instead, which stays transparent.
pub fn fill_request<B>(
    parts: &http::request::Parts,
    body: B,
    route: &crate::config::RouteConfig,
) -> Request<B> {
    let mut headers = HeaderMap::new();
    for (name, value) in &parts.headers {
        if fill_may_carry(name) && route.forward_headers.allows(name, &route.key) {
            headers.append(name.clone(), value.clone());
        }
    }
    strip_hop_by_hop(&mut headers);
    if let Some(authority) = route.upstream.authority()
        && let Ok(host) = HeaderValue::from_str(authority.as_str())
    {
        headers.insert(header::HOST, host);
    }
    headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static("http"));
    headers.insert(header::FORWARDED, HeaderValue::from_static("proto=http"));
    let mut req = Request::new(body);
    if route.tls.is_some() {
        req.extensions_mut()
            .insert(TlsRoute(Arc::from(route.name.as_str())));
    }
    *req.method_mut() = parts.method.clone();
    *req.uri_mut() = target_uri(&route.upstream, &parts.uri);
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

fn append_forwarded(headers: &mut HeaderMap, peer: SocketAddr, host: Option<&HeaderValue>) {
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
    let mut element = format!("for={node};proto=http");
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
    headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static("http"));
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
