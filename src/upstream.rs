//! Talking to upstreams: one pooled hyper client; the requests it sends are built in
//! [`request`] (rewriting as a reverse proxy does, hop-by-hop removal in both directions).

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;

use bytes::{Bytes, BytesMut};
use http::header::HeaderMap;
use http::uri::Uri;
use http::{Request, Response};
use http_body_util::{BodyExt, Either, Full};
use hyper::body::Incoming;
pub mod endpoints;
mod pool;
mod request;
pub mod tls;
pub use request::{fill_request, fill_request_to, fill_would_forward, rewrite, strip_hop_by_hop};
pub use tls::{TlsFailure, TlsRoute};

/// Spare bytes a read body may carry into the cache before it is copied to an exact allocation.
const SPARE_LIMIT: usize = 1024;

/// A request body on its way upstream: buffered (keyed or filled requests) or streamed through.
pub type UpstreamBody = Either<Full<Bytes>, crate::body::ClientBody>;

/// Why an upstream call produced no response.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// Displayed with the whole chain of causes (`client error (Connect): tcp connect error:
    /// Connection refused`): the first alone says nothing of what went wrong.
    #[error("upstream {upstream}: {}", causes(source.as_ref()))]
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

/// `err` and each of its sources, joined by `: `.
fn causes(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut next = err.source();
    while let Some(cause) = next {
        let line = cause.to_string();
        // Some errors repeat their source's text in their own.
        if !text.ends_with(&line) {
            text.push_str(": ");
            text.push_str(&line);
        }
        next = cause.source();
    }
    text
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
                    let err = causes(&err);
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
        let whole = async {
            let headed = self.fetch_head(req, upstream, limit).await?;
            headed.read_limited(upstream, max_body).await
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

    /// Sends a request and returns the answer's head, its body still to read (see [`Headed`]),
    /// within `limit`.
    pub async fn fetch_head(
        &self,
        req: Request<UpstreamBody>,
        upstream: &Uri,
        limit: Duration,
    ) -> Result<Headed, UpstreamError> {
        let sent = req.headers().clone();
        let resp = self.send(req, upstream, limit).await?;
        let (parts, body) = resp.into_parts();
        Ok(Headed { parts, body, sent })
    }
}

/// An upstream answer whose head has arrived, its body still streaming.
#[derive(Debug)]
pub struct Headed {
    pub parts: http::response::Parts,
    pub body: Incoming,
    /// The request headers it was fetched with (see [`Buffered::sent`]).
    pub sent: HeaderMap,
}

impl Headed {
    /// The head alone, as a [`Buffered`] answer with no body: what a verdict on the head reads.
    pub fn head(&self) -> Buffered {
        Buffered {
            status: self.parts.status,
            headers: self.parts.headers.clone(),
            body: Bytes::new(),
            sent: self.sent.clone(),
        }
    }

    /// Reads the body — at most `max_body` bytes; past that, what was read with the rest still
    /// streaming. Not bounded in time: the caller bounds it.
    pub async fn read_limited(
        self,
        upstream: &Uri,
        max_body: u64,
    ) -> Result<Fetched, UpstreamError> {
        let Headed {
            parts,
            mut body,
            sent,
        } = self;
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
    }
}
