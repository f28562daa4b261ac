//! The request path: route → bypass? → key → L1 → flight (L2, fill lock, upstream) → answer.
//!
//! Every path produces an [`Answer`]: a response and its [`CacheOutcome`]. [`Proxy::handle`] alone
//! turns the outcome into the `Cache-Status` header and the request metric, so the two never
//! disagree; errors become statuses in [`ProxyError::into_answer`] and nowhere else.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::request::Parts;
use http::{Method, Request, Response, Uri};
use hyper::body::Incoming;

use crate::access::AccessLine;
use crate::answer::{Answer, CACHE_STATUS, ProxyError};
use crate::body::ProxyBody;
use crate::budget::Budgets;
use crate::caps::Caps;
use crate::coalesce::Coalescer;
use crate::config::Config;
use crate::fill::Filler;
use crate::fleet::Fleet;
use crate::handles::Handles;
use crate::l1::L1;
use crate::l2::L2Error;
use crate::metrics::{Metrics, RequestCounters, UNROUTED};
use crate::outcome::CacheOutcome;
use crate::route::{Router, check_cacheable};

mod invalidate;
mod lookup;
mod pass;
mod steps;

use steps::{Next, Work};

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
        match self.begin(req, peer) {
            Ok(response) => response,
            Err(rest) => Box::pin(self.resume(rest)).await,
        }
    }

    /// What can be done for a request without waiting: for the common request, a fresh hit in
    /// L1, its whole answer; else what is left, for [`Proxy::resume`]. hyper moves the future a
    /// service gives it, so a hit answered here costs it the move of a response, not of a
    /// request's state machine (measured with callgrind: the moves of that state were a tenth of
    /// a hit's instructions).
    pub fn begin(
        &self,
        mut req: Request<Incoming>,
        peer: SocketAddr,
    ) -> Result<Response<ProxyBody>, Box<Rest>> {
        let started = Instant::now();
        let span = crate::trace::request_span(req.method(), req.headers());
        let entered = span.enter();
        if let Err(err) = crate::target::normalize(&mut req) {
            let answer = ProxyError::from(err).into_answer(CacheOutcome::Bypass);
            let cache_status = answer.cache_status();
            let mut response = answer.response;
            response.headers_mut().insert(CACHE_STATUS, cache_status);
            return Ok(response);
        }
        let logged = self.access_line_of(&req);
        let found = self.router.route_index(req.uri().path(), req.method());
        let route = found.map(|i| &self.router.routes()[i]);
        let next = match route {
            // TRACE echoes the request, credentials included, to whoever can read the answer:
            // refused before any upstream call unless the route allows it.
            _ if req.method() == Method::TRACE && !route.is_some_and(|r| r.allow_trace) => {
                let err = ProxyError::MethodNotAllowed(Method::TRACE);
                let outcome = match route {
                    Some(_) => CacheOutcome::Bypass,
                    None => CacheOutcome::UriMiss,
                };
                Next::Answer(err.into_answer(outcome))
            }
            None => Next::Later(Work::Unrouted(req)),
            Some(route) => self.routed(route, req, peer),
        };
        match next {
            Next::Answer(answer) => Ok(self.finish(answer, found, (started, peer, &span), logged)),
            Next::Later(work) => {
                drop(entered);
                Err(Box::new(Rest {
                    work,
                    found,
                    started,
                    peer,
                    span,
                    logged,
                }))
            }
        }
    }

    /// The rest of a request [`Proxy::begin`] could not answer at once: what waits (the body, L2,
    /// a fill, the upstream), then the answer's way out, as for a hit.
    pub async fn resume(&self, rest: Box<Rest>) -> Response<ProxyBody> {
        let Rest {
            work,
            found,
            started,
            peer,
            span,
            logged,
        } = *rest;
        let answer = if span.is_disabled() {
            self.work(work, peer).await
        } else {
            tracing::Instrument::instrument(self.work(work, peer), span.clone()).await
        };
        self.finish(answer, found, (started, peer, &span), logged)
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
            let request_id = logged.request_id.as_ref().and_then(|v| v.to_str().ok());
            let line = AccessLine::new(
                &logged.method,
                logged.uri.path(),
                route_name,
                status,
                outcome,
                micros,
            )
            .of_request(logged.uri.query(), peer, request_id, bytes);
            // The same line at `info` (the access log) or, with it off, at `debug`.
            if logged.info {
                crate::access::record(&line);
            } else {
                crate::access::record_debug(&line);
            }
        }
        response
    }

    /// What the access line needs from the request, when a line is wanted: only the log line
    /// needs these, so with it off the hot path does not pay for them.
    fn access_line_of<B>(&self, req: &Request<B>) -> Option<Logged> {
        let info = self.access_log && crate::access::info_enabled();
        (info || tracing::enabled!(target: ACCESS_LOG, tracing::Level::DEBUG)).then(|| Logged {
            info,
            method: req.method().clone(),
            // A reference on the request's bytes, not a copy of its path.
            uri: req.uri().clone(),
            // A pass over the request's few fields: hashing a custom name costs more.
            request_id: req
                .headers()
                .iter()
                .find(|(name, _)| **name == X_REQUEST_ID)
                .map(|(_, v)| v.clone()),
        })
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
                match self.cacheable(route, parts, body, peer) {
                    Ok(answer) => answer,
                    // Boxed: the lookup's future holds a fill's (tens of KiB).
                    Err(lookup) => Box::pin(self.looked_up(*lookup)).await,
                }
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
}

/// What is left of a request [`Proxy::begin`] could not answer at once, for [`Proxy::resume`].
pub struct Rest {
    work: Work,
    found: Option<usize>,
    started: Instant,
    peer: SocketAddr,
    span: tracing::Span,
    logged: Option<Logged>,
}

pub use crate::access::ACCESS_LOG;

/// The client's request id, read for its access line: a name made once, not parsed per request.
static X_REQUEST_ID: http::HeaderName = http::HeaderName::from_static("x-request-id");

/// What a request's access line needs from the request, taken before the request is consumed.
struct Logged {
    /// `info` (the access log), else `debug`.
    info: bool,
    method: Method,
    /// The path and query, as sent (already checked by target normalization).
    uri: http::Uri,
    /// The client's `X-Request-Id`; on the line when it is printable.
    request_id: Option<http::HeaderValue>,
}

/// The request counters of every route, in the router's order.
fn request_counters(router: &Router, metrics: &Metrics) -> Vec<RequestCounters> {
    let routes = router.routes().iter();
    routes.map(|r| metrics.route_requests(&r.name)).collect()
}
