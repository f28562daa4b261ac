//! The request path: route → bypass? → key → L1 → flight (L2, fill lock, upstream) → answer.
//!
//! Every path produces an [`Answer`]: a response and its [`CacheOutcome`]. [`Proxy::handle`] alone
//! turns the outcome into the `Cache-Status` header and the request metric, so the two never
//! disagree; errors become statuses in [`ProxyError::into_answer`] and nowhere else.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::header;
use http::request::Parts;
use http::{Method, Request, Response, Uri};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;

use crate::access::AccessLine;
use crate::answer::{Answer, CACHE_STATUS, ProxyError};
use crate::body::ProxyBody;
use crate::budget::Budgets;
use crate::caps::Caps;
use crate::coalesce::Coalescer;
use crate::conditional::Conditions;
use crate::config::{Config, RouteConfig};
use crate::fill::{FillRequest, Filler};
use crate::fleet::Fleet;
use crate::handles::Handles;
use crate::key::CacheKey;
use crate::l1::L1;
use crate::l2::L2Error;
use crate::metrics::{Metrics, RequestCounters, UNROUTED};
use crate::outcome::CacheOutcome;
use crate::route::{Router, cache_method, check_cacheable};

mod invalidate;
mod lookup;
mod pass;

/// How long `/readyz` answers "starting" while Redis has not answered yet, before it reports the
/// process as degraded instead.
pub const STARTUP_GRACE: std::time::Duration = std::time::Duration::from_secs(10);

/// What `/readyz` reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Readiness {
    Ready,
    /// Redis has not answered since the start (within [`STARTUP_GRACE`]): not ready yet.
    Starting,
    /// Redis is considered down: serving from L1 and the upstream.
    Degraded,
}

/// One Corral process's request handling. Shared by every connection.
///
/// Its [`Handles`] are the process's and outlive reloads; every other field is what one
/// configuration says, built by `Proxy::configured` at start and on each reload.
pub struct Proxy {
    handles: Arc<Handles>,
    router: Router,
    /// The default upstream and the wait for its response heads.
    default_upstream: Option<(Uri, std::time::Duration)>,
    /// The per-route caps, for pass-through calls (fills have theirs, in the filler).
    caps: Arc<Caps>,
    coalescer: Arc<Coalescer>,
    /// The request counters of each route, in the router's order, and of unrouted requests.
    requests: Vec<RequestCounters>,
    unrouted_requests: RequestCounters,
    body_read_timeout: std::time::Duration,
    /// `server.access_log`: one `info` line per request.
    access_log: bool,
}

impl Proxy {
    /// Builds the proxy for a validated config. Redis is connected lazily: Corral starts while
    /// Redis is down and serves degraded until it comes up.
    pub fn new(config: &Config) -> Result<Proxy, L2Error> {
        Ok(Proxy::configured(
            Arc::new(Handles::open(config)?),
            config,
            None,
        ))
    }

    /// The metrics of this process.
    pub fn metrics(&self) -> &Arc<Metrics> {
        self.handles.metrics()
    }

    /// The Redis side, when there is one.
    pub fn fleet(&self) -> Option<&Fleet> {
        self.handles.fleet()
    }

    /// The same proxy with a new configuration's routes and limits. The caches, the Redis
    /// connections, the flights in progress and the metrics carry over, so a reload drops neither
    /// cached entries nor fills; changes to `[redis]` and `[cache]` need a restart.
    pub fn reloaded(&self, config: &Config) -> Proxy {
        Proxy::configured(self.handles.clone(), config, Some(self))
    }

    /// What `config` says, over the process's `handles`; `before`: the proxy it replaces, whose
    /// budgets (calls in flight, queues) and flights carry over.
    fn configured(handles: Arc<Handles>, config: &Config, before: Option<&Proxy>) -> Proxy {
        let metrics = handles.metrics();
        for route in &config.routes {
            metrics.register_route(route);
        }
        handles.client().renew(config);
        let caps = Arc::new(match before {
            Some(before) => before.caps.renewed(config),
            None => Caps::new(
                config,
                Budgets::new(config, handles.fleet().cloned(), metrics),
            ),
        });
        let filler = Filler::new(handles.clone(), caps.clone());
        let coalescer = match before {
            Some(before) => before.coalescer.renewed(filler),
            None => Coalescer::new(handles.clone(), filler),
        };
        let router = Router::new(&config.routes);
        Proxy {
            requests: request_counters(&router, metrics),
            unrouted_requests: metrics.route_requests(UNROUTED),
            router,
            default_upstream: config
                .server
                .default_upstream
                .clone()
                .map(|u| (u, config.server.default_upstream_timeout)),
            caps,
            coalescer: Arc::new(coalescer),
            body_read_timeout: config.server.body_read_timeout,
            access_log: config.server.access_log,
            handles,
        }
    }

    /// Fills in progress in this process (a graceful shutdown waits for them).
    pub fn fills_in_progress(&self) -> usize {
        self.coalescer.in_progress()
    }

    /// The metrics page, with live gauges filled in.
    pub async fn render_metrics(&self) -> String {
        let l1 = &self.handles.l1();
        let (entries, bytes) = (l1.entry_count().await, l1.weighted_size().await);
        self.handles
            .metrics()
            .render(entries, bytes, self.degraded())
    }

    /// The in-process cache, for inspection.
    pub fn l1(&self) -> &L1 {
        self.handles.l1()
    }

    /// Whether Redis is configured but considered down (the process serves degraded).
    pub fn degraded(&self) -> bool {
        self.handles.fleet().is_some_and(Fleet::degraded)
    }

    /// Connects to Redis, loads the scripts and subscribes the invalidation channel, within
    /// `budget` (see [`Fleet::warm_up`]).
    pub async fn warm_up(&self, budget: std::time::Duration) {
        if let Some(fleet) = self.handles.fleet() {
            fleet.warm_up(budget).await;
        }
    }

    /// What `/readyz` says: ready; starting (Redis has not answered yet, for at most
    /// [`STARTUP_GRACE`]); or degraded (Redis considered down, or silent since the start).
    pub fn readiness(&self) -> Readiness {
        let Some(fleet) = self.fleet() else {
            return Readiness::Ready;
        };
        if !fleet.has_answered() {
            return if self.handles.started().elapsed() < STARTUP_GRACE {
                Readiness::Starting
            } else {
                Readiness::Degraded
            };
        }
        if fleet.degraded() {
            Readiness::Degraded
        } else {
            Readiness::Ready
        }
    }

    /// Answers one request. Never fails: every error becomes an answer.
    pub async fn handle(&self, req: Request<Incoming>, peer: SocketAddr) -> Response<ProxyBody> {
        let span = crate::trace::request_span(req.method(), req.headers());
        if span.is_disabled() {
            return self.serve(req, peer, &span).await;
        }
        let serve = self.serve(req, peer, &span);
        tracing::Instrument::instrument(serve, span.clone()).await
    }

    /// [`Proxy::handle`] within the request's span (a disabled one when nothing records it).
    async fn serve(
        &self,
        mut req: Request<Incoming>,
        peer: SocketAddr,
        span: &tracing::Span,
    ) -> Response<ProxyBody> {
        let started = Instant::now();
        if let Err(err) = crate::target::normalize(&mut req) {
            let answer = ProxyError::from(err).into_answer(CacheOutcome::Bypass);
            let cache_status = answer.cache_status();
            let mut response = answer.response;
            response.headers_mut().insert(CACHE_STATUS, cache_status);
            return response;
        }
        let logged = self.access_line_of(&req);
        let found = self.router.route_index(req.uri().path(), req.method());
        let route = found.map(|i| &self.router.routes()[i]);
        let answer = match route {
            // TRACE echoes the request, credentials included, to whoever can read the answer:
            // refused before any upstream call unless the route allows it.
            _ if req.method() == Method::TRACE && !route.is_some_and(|r| r.allow_trace) => {
                let err = ProxyError::MethodNotAllowed(Method::TRACE);
                let outcome = match route {
                    Some(_) => CacheOutcome::Bypass,
                    None => CacheOutcome::UriMiss,
                };
                err.into_answer(outcome)
            }
            // Boxed, as every path but the hit is: see `handle_cacheable`.
            None => Box::pin(self.unrouted(req, peer)).await,
            Some(route) => self.routed(route, req, peer).await,
        };
        self.finish(answer, found, (started, peer, span), logged)
    }

    /// What every answer gets on its way out: `Cache-Status`, the request metric, the access
    /// line; Corral's own directives removed.
    fn finish(
        &self,
        answer: Answer,
        route: Option<usize>,
        (started, peer, span): (Instant, SocketAddr, &tracing::Span),
        logged: Option<Logged>,
    ) -> Response<ProxyBody> {
        let (route_name, counters) = match route {
            Some(i) => (self.router.routes()[i].name.as_str(), &self.requests[i]),
            None => (crate::metrics::UNROUTED, &self.unrouted_requests),
        };
        let cache_status = answer.cache_status();
        let Answer {
            outcome,
            mut response,
            corral_only,
            ..
        } = answer;
        let took = started.elapsed();
        counters.answered(outcome, took);
        let status = response.status().as_u16();
        crate::trace::finish(span, route_name, outcome.as_str(), status);
        let headers = response.headers_mut();
        headers.insert(CACHE_STATUS, cache_status);
        // Corral's own directives and the upstream's purge tags never leave Corral, whatever
        // path the answer took (an answer from an entry that holds none skips the look); then
        // the route's own rules.
        if corral_only {
            crate::header_rules::strip_corral_only(headers);
        }
        if let Some(i) = route {
            self.router.routes()[i].response_headers.apply(headers);
        }
        if let Some(logged) = logged {
            let status = response.status().as_u16();
            let micros = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
            // The body's size as the answer head knows it; absent for a body still streaming in.
            let bytes = http_body::Body::size_hint(response.body()).exact();
            let line = AccessLine::new(
                logged.method,
                logged.path,
                route_name,
                status,
                outcome,
                micros,
            )
            .of_request(logged.query, peer, logged.request_id, bytes);
            // The same line at `info` (the access log) or, with it off, at `debug`.
            if logged.info {
                crate::access::record(line);
            } else {
                crate::access::record_debug(line);
            }
        }
        response
    }

    /// What the access line needs from the request, when a line is wanted: only the log line
    /// needs these, so with it off the hot path does not pay for them.
    fn access_line_of<B>(&self, req: &Request<B>) -> Option<Logged> {
        let info = self.access_log && tracing::enabled!(target: ACCESS_LOG, tracing::Level::INFO);
        (info || tracing::enabled!(target: ACCESS_LOG, tracing::Level::DEBUG)).then(|| Logged {
            info,
            method: req.method().clone(),
            path: crate::access::path_with_room(req.uri().path()),
            query: req.uri().query().map(str::to_owned),
            request_id: req
                .headers()
                .get(&X_REQUEST_ID)
                .and_then(|v| v.to_str().ok())
                .map(|v| v.chars().take(128).collect()),
        })
    }

    async fn routed(
        &self,
        route: &Arc<RouteConfig>,
        req: Request<Incoming>,
        peer: SocketAddr,
    ) -> Answer {
        if let Err(why) = check_cacheable(route, req.method(), req.headers()) {
            tracing::debug!(route = %route.name, ?why, "bypassing the cache");
            return Box::pin(self.bypass(route, req, peer)).await;
        }
        let (parts, body) = req.into_parts();
        // Most cacheable requests have no body: no timer for them.
        let body = if http_body::Body::is_end_stream(&body) {
            Bytes::new()
        } else {
            let limit = self.body_read_timeout;
            let read = tokio::time::timeout(limit, read_body(&parts.headers, body, route.max_body));
            match read.await.unwrap_or(Err(ProxyError::BodyTimeout(limit))) {
                Ok(body) => body,
                Err(err) => return err.into_answer(CacheOutcome::Bypass),
            }
        };
        self.handle_cacheable(route, parts, body, peer).await
    }

    /// [`Proxy::handle`] for a request whose body is already read: the same path (target,
    /// route, key, L1, flight, `Cache-Status`, metrics, access line), for benchmarks of the hit
    /// path without sockets. A request that is not cacheable on its route gets a 404 here instead
    /// of passing through.
    pub async fn handle_buffered(
        &self,
        parts: Parts,
        body: Bytes,
        peer: SocketAddr,
    ) -> Response<ProxyBody> {
        let started = Instant::now();
        let mut req = Request::from_parts(parts, ());
        if let Err(err) = crate::target::normalize(&mut req) {
            let answer = ProxyError::from(err).into_answer(CacheOutcome::Bypass);
            return self.finish(answer, None, (started, peer, &tracing::Span::none()), None);
        }
        let (parts, ()) = req.into_parts();
        let logged = self.access_line_of(&Request::from_parts(parts.clone(), ()));
        let found = self.router.route_index(parts.uri.path(), &parts.method);
        let answer = match found.map(|i| &self.router.routes()[i]) {
            Some(route) if check_cacheable(route, &parts.method, &parts.headers).is_ok() => {
                self.handle_cacheable(route, parts, body, peer).await
            }
            _ => ProxyError::NoRoute.into_answer(CacheOutcome::UriMiss),
        };
        self.finish(
            answer,
            found,
            (started, peer, &tracing::Span::none()),
            logged,
        )
    }

    /// Keys, looks up and answers a cacheable request; its conditionals, `Range` and HEAD are
    /// then answered by Corral from what it holds (see [`Conditions`]). A HEAD is keyed, looked up
    /// and filled as a GET, so it shares GET's entries and flights.
    async fn handle_cacheable(
        &self,
        route: &Arc<RouteConfig>,
        mut parts: Parts,
        body: Bytes,
        peer: SocketAddr,
    ) -> Answer {
        let conditions = Conditions::of(&parts.method, &parts.headers);
        parts.method = cache_method(&parts.method).clone();
        let key = match CacheKey::derive(
            &route.name,
            &route.key,
            &parts.method,
            &parts.uri,
            &parts.headers,
            &body,
        ) {
            Ok(key) => key,
            Err(err) => return ProxyError::from(err).into_answer(CacheOutcome::Bypass),
        };
        if let Some(hit) = self.fresh_hit(route, &key, &parts).await {
            return conditions.apply(hit);
        }
        let req = FillRequest {
            route: route.clone(),
            key,
            parts,
            body,
            peer,
            validators: None,
            hold: None,
            weight: crate::budget::Weight::one(),
        };
        // The lookup's future holds a fill's (tens of KiB): boxed, it is allocated by a miss
        // alone, and every request's future (which hyper moves when it calls the service) stays
        // the size of a hit's. Measured with callgrind: the copy of the whole future was most of
        // a hit's instructions.
        conditions.apply(Box::pin(self.lookup(req)).await)
    }
}

pub use crate::access::ACCESS_LOG;

/// The client's request id, read for its access line: a name made once, not parsed per request.
static X_REQUEST_ID: http::HeaderName = http::HeaderName::from_static("x-request-id");

/// What a request's access line needs from the request, taken before the request is consumed.
struct Logged {
    /// `info` (the access log), else `debug`.
    info: bool,
    method: Method,
    path: String,
    /// As sent (already checked by target normalization); `None` when there is none.
    query: Option<String>,
    /// The client's `X-Request-Id`, when it sent a printable one.
    request_id: Option<String>,
}

/// The request counters of every route, in the router's order.
fn request_counters(router: &Router, metrics: &Metrics) -> Vec<RequestCounters> {
    let routes = router.routes().iter();
    routes.map(|r| metrics.route_requests(&r.name)).collect()
}

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
