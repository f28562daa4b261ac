//! The request path: route → bypass? → key → L1 → flight (L2, fill lock, upstream) → answer.
//!
//! Every answer carries `Cache-Status` from one [`CacheOutcome`]; errors become statuses in
//! [`ProxyError::into_response`] and nowhere else.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Either, Full, Limited};
use hyper::body::Incoming;

use crate::config::{Config, LockScope, RouteConfig};
use crate::entry::{Entry, Freshness, now_ms};
use crate::fill::{Fill, FillError, FillRequest, Filler, Fleet, Source};
use crate::flight::{Flights, Role};
use crate::key::{CacheKey, KeyError};
use crate::l1::L1;
use crate::l2::{L2, L2Error};
use crate::notice::Notices;
use crate::outcome::CacheOutcome;
use crate::route::{Router, check_cacheable};
use crate::upstream::{Buffered, UpstreamClient, UpstreamError, rewrite};

/// The body of every answer: a buffered (cached) body or a streamed upstream one.
pub type ProxyBody = Either<Full<Bytes>, Incoming>;

/// One Corral process's request handling. Shared by every connection.
pub struct Proxy {
    router: Router,
    default_upstream: Option<Uri>,
    filler: Arc<Filler>,
    flights: Flights<Arc<Fill>>,
}

/// Why a request got an error answer.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("request body larger than {limit} bytes")]
    BodyTooLarge { limit: u64 },
    #[error("request body could not be read: {0}")]
    BodyUnreadable(String),
    #[error("request cannot be keyed: {0}")]
    BadKey(#[from] KeyError),
    #[error("no route matches and no default upstream is configured")]
    NoRoute,
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    #[error(transparent)]
    Fill(#[from] FillError),
    #[error("the fill for this key failed unexpectedly")]
    FillPanicked,
}

impl ProxyError {
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ProxyError::BodyUnreadable(_) | ProxyError::BadKey(_) => StatusCode::BAD_REQUEST,
            ProxyError::NoRoute => StatusCode::NOT_FOUND,
            ProxyError::Upstream(UpstreamError::Timeout { .. })
            | ProxyError::Fill(FillError::WaitTimeout(_)) => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::Fill(FillError::Upstream(err))
                if matches!(**err, UpstreamError::Timeout { .. }) =>
            {
                StatusCode::GATEWAY_TIMEOUT
            }
            ProxyError::Upstream(_) | ProxyError::Fill(_) | ProxyError::FillPanicked => {
                StatusCode::BAD_GATEWAY
            }
        }
    }

    /// The one place where errors become answers.
    pub fn into_response(self, outcome: CacheOutcome) -> Response<ProxyBody> {
        let status = self.status();
        if status.is_server_error() {
            tracing::warn!(%status, err = %self, "answering with an error");
        } else {
            tracing::debug!(%status, err = %self, "rejecting request");
        }
        let mut resp = Response::new(Either::Left(Full::new(Bytes::from(format!("{self}\n")))));
        *resp.status_mut() = status;
        let headers = resp.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        headers.insert(CACHE_STATUS, outcome.cache_status());
        resp
    }
}

const CACHE_STATUS: header::HeaderName = header::HeaderName::from_static("cache-status");

impl Proxy {
    /// Builds the proxy for a validated config. Redis is connected lazily: Corral starts while
    /// Redis is down and serves degraded until it comes up.
    pub fn new(config: &Config) -> Result<Proxy, L2Error> {
        let fleet = match &config.redis {
            Some(redis) => Some(Fleet {
                l2: L2::connect(redis)?,
                notices: Notices::connect(redis)?,
            }),
            None => None,
        };
        Ok(Proxy {
            router: Router::new(&config.routes),
            default_upstream: config.server.default_upstream.clone(),
            filler: Arc::new(Filler {
                l1: L1::new(config.cache.l1_max_bytes),
                fleet,
                client: UpstreamClient::new(),
            }),
            flights: Flights::new(),
        })
    }

    /// The in-process cache, for inspection.
    pub fn l1(&self) -> &L1 {
        &self.filler.l1
    }

    /// Answers one request. Never fails: every error becomes an answer.
    pub async fn handle(&self, req: Request<Incoming>, peer: SocketAddr) -> Response<ProxyBody> {
        let Some(route) = self.router.route(req.uri().path(), req.method()).cloned() else {
            return self.unrouted(req, peer).await;
        };
        if let Err(why) = check_cacheable(&route, req.method(), req.headers()) {
            tracing::debug!(route = %route.name, ?why, "bypassing the cache");
            return self.pass(&route.upstream, &route, req, peer).await;
        }
        let (parts, body) = req.into_parts();
        let body = match read_body(&parts.headers, body, route.max_body).await {
            Ok(body) => body,
            Err(err) => return err.into_response(CacheOutcome::Bypass),
        };
        self.handle_cacheable(route, parts, body, peer).await
    }

    /// Answers a request whose body is already read, on a route that may cache it: key → L1 →
    /// flight. Public for benchmarks of the hit path without sockets; [`Proxy::handle`] routes and
    /// checks cacheability first.
    pub async fn handle_buffered(
        &self,
        parts: http::request::Parts,
        body: Bytes,
        peer: SocketAddr,
    ) -> Response<ProxyBody> {
        match self.router.route(parts.uri.path(), &parts.method) {
            Some(route) if check_cacheable(route, &parts.method, &parts.headers).is_ok() => {
                self.handle_cacheable(route.clone(), parts, body, peer)
                    .await
            }
            _ => ProxyError::NoRoute.into_response(CacheOutcome::UriMiss),
        }
    }

    async fn handle_cacheable(
        &self,
        route: Arc<RouteConfig>,
        parts: http::request::Parts,
        body: Bytes,
        peer: SocketAddr,
    ) -> Response<ProxyBody> {
        let key = match CacheKey::derive(
            &route.name,
            &route.key,
            &parts.method,
            &parts.uri,
            &parts.headers,
            &body,
        ) {
            Ok(key) => key,
            Err(err) => return ProxyError::from(err).into_response(CacheOutcome::Bypass),
        };
        let req = FillRequest {
            route,
            key,
            parts,
            body,
            peer,
        };
        self.lookup(req).await
    }

    async fn lookup(&self, req: FillRequest) -> Response<ProxyBody> {
        let stale = match self.filler.l1.get(&req.key).await {
            Some(entry) => match entry.times.freshness(now_ms()) {
                Freshness::Fresh => return answer(&entry, CacheOutcome::Hit),
                Freshness::StaleRevalidate => {
                    self.refresh_in_background(req);
                    return answer(&entry, CacheOutcome::Stale);
                }
                Freshness::StaleIfError => Some(entry),
                Freshness::Expired => None,
            },
            None => None,
        };
        if req.route.lock.scope == LockScope::None {
            let fill = self.filler.fill(req.clone()).await;
            return self.respond(Role::Leader, &fill, req, stale).await;
        }
        let filler = self.filler.clone();
        let fill_req = req.clone();
        let (role, flight) = self.flights.join(req.key, move || async move {
            Arc::new(filler.fill(fill_req).await)
        });
        match flight.await {
            Some(fill) => self.respond(role, &fill, req, stale).await,
            None => match stale {
                Some(entry) => answer(&entry, CacheOutcome::Stale),
                None => ProxyError::FillPanicked.into_response(CacheOutcome::MissNotStored),
            },
        }
    }

    /// Turns a flight's result into this joiner's answer.
    async fn respond(
        &self,
        role: Role,
        fill: &Fill,
        req: FillRequest,
        stale: Option<Arc<Entry>>,
    ) -> Response<ProxyBody> {
        match (fill, role) {
            (Fill::Shared { entry, source }, role) => {
                let outcome = match (source, role) {
                    (Source::L2, _) => CacheOutcome::Hit,
                    (Source::Remote, _) | (Source::Upstream { .. }, Role::Follower) => {
                        CacheOutcome::Coalesced
                    }
                    (Source::Upstream { stored: true }, Role::Leader) => CacheOutcome::MissStored,
                    (Source::Upstream { stored: false }, Role::Leader) => {
                        CacheOutcome::MissNotStored
                    }
                };
                if outcome == CacheOutcome::Coalesced
                    && entry.status.is_server_error()
                    && let Some(stale) = stale
                {
                    return answer(&stale, CacheOutcome::Stale);
                }
                answer(entry, outcome)
            }
            (Fill::Private(buffered), Role::Leader) => private_answer(buffered),
            (Fill::Private(_), Role::Follower) | (Fill::FetchYourself, _) => {
                self.fetch_alone(req).await
            }
            (Fill::Failed(err), _) => match stale {
                Some(entry) => answer(&entry, CacheOutcome::Stale),
                None => ProxyError::from(err.clone()).into_response(CacheOutcome::MissNotStored),
            },
        }
    }

    /// A request whose flight's answer was not for sharing: it asks the upstream itself.
    async fn fetch_alone(&self, req: FillRequest) -> Response<ProxyBody> {
        let route = &req.route;
        let upstream_req = rewrite(
            &req.parts,
            Either::Left(Full::new(req.body.clone())),
            &route.upstream,
            req.peer,
        );
        match self
            .filler
            .client
            .send(upstream_req, &route.upstream, route.upstream_timeout)
            .await
        {
            Ok(resp) => {
                let mut resp = resp.map(Either::Right);
                resp.headers_mut()
                    .insert(CACHE_STATUS, CacheOutcome::MissNotStored.cache_status());
                resp
            }
            Err(err) => ProxyError::from(err).into_response(CacheOutcome::MissNotStored),
        }
    }

    fn refresh_in_background(&self, req: FillRequest) {
        let filler = self.filler.clone();
        let key = req.key;
        // Joining the flight map dedupes refreshes within this process; nobody awaits it.
        let _ = self.flights.join(key, move || async move {
            match filler.refresh(req).await {
                Some(fill) => Arc::new(fill),
                None => Arc::new(Fill::FetchYourself),
            }
        });
    }

    /// Passes a request through to `upstream`, streaming both ways.
    async fn pass(
        &self,
        upstream: &Uri,
        route: &RouteConfig,
        req: Request<Incoming>,
        peer: SocketAddr,
    ) -> Response<ProxyBody> {
        let (parts, body) = req.into_parts();
        let upstream_req = rewrite(&parts, Either::Right(body), upstream, peer);
        match self
            .filler
            .client
            .send(upstream_req, upstream, route.upstream_timeout)
            .await
        {
            Ok(resp) => {
                let mut resp = resp.map(Either::Right);
                resp.headers_mut()
                    .insert(CACHE_STATUS, CacheOutcome::Bypass.cache_status());
                resp
            }
            Err(err) => ProxyError::from(err).into_response(CacheOutcome::Bypass),
        }
    }

    async fn unrouted(&self, req: Request<Incoming>, peer: SocketAddr) -> Response<ProxyBody> {
        let Some(upstream) = &self.default_upstream else {
            return ProxyError::NoRoute.into_response(CacheOutcome::UriMiss);
        };
        let (parts, body) = req.into_parts();
        let upstream_req = rewrite(&parts, Either::Right(body), upstream, peer);
        match self
            .filler
            .client
            .send(upstream_req, upstream, DEFAULT_UPSTREAM_TIMEOUT)
            .await
        {
            Ok(resp) => {
                let mut resp = resp.map(Either::Right);
                resp.headers_mut()
                    .insert(CACHE_STATUS, CacheOutcome::UriMiss.cache_status());
                resp
            }
            Err(err) => ProxyError::from(err).into_response(CacheOutcome::UriMiss),
        }
    }
}

/// The wait for the default upstream's response head.
const DEFAULT_UPSTREAM_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Reads a request body of at most `limit` bytes; a declared length over the limit is refused
/// before anything is read.
async fn read_body(
    headers: &http::HeaderMap,
    body: Incoming,
    limit: u64,
) -> Result<Bytes, ProxyError> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(ProxyError::BodyTooLarge { limit });
    }
    let cap = usize::try_from(limit).unwrap_or(usize::MAX);
    match Limited::new(body, cap).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(err) if err.is::<http_body_util::LengthLimitError>() => {
            Err(ProxyError::BodyTooLarge { limit })
        }
        Err(err) => Err(ProxyError::BodyUnreadable(err.to_string())),
    }
}

/// An answer from an entry.
fn answer(entry: &Entry, outcome: CacheOutcome) -> Response<ProxyBody> {
    let mut resp = Response::new(Either::Left(Full::new(entry.body.clone())));
    *resp.status_mut() = entry.status;
    let headers = resp.headers_mut();
    headers.clone_from(&entry.headers);
    headers.insert(CACHE_STATUS, outcome.cache_status());
    if outcome.is_hit() {
        headers.insert(
            header::AGE,
            HeaderValue::from(entry.times.age_secs(now_ms())),
        );
    }
    resp
}

/// An answer meant for one requester only.
fn private_answer(buffered: &Buffered) -> Response<ProxyBody> {
    let mut resp = Response::new(Either::Left(Full::new(buffered.body.clone())));
    *resp.status_mut() = buffered.status;
    *resp.headers_mut() = buffered.headers.clone();
    resp.headers_mut()
        .insert(CACHE_STATUS, CacheOutcome::MissNotStored.cache_status());
    resp
}
