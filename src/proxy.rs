//! The request path: route → bypass? → key → L1 → flight (L2, fill lock, upstream) → answer.
//!
//! Every path produces an [`Answer`]: a response and its [`CacheOutcome`]. [`Proxy::handle`] alone
//! turns the outcome into the `Cache-Status` header and the request metric, so the two never
//! disagree; errors become statuses in [`ProxyError::into_answer`] and nowhere else.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::request::Parts;
use http::{Method, Request, Response, Uri};
use http_body_util::{BodyExt, Either, Limited};
use hyper::body::Incoming;

use crate::answer::{Answer, CACHE_STATUS, ProxyError, answer, answer_at, private_answer};
use crate::body::ProxyBody;
use crate::breaker::{Breaker, Pulse};
use crate::config::{Config, LockScope, RouteConfig};
use crate::entry::{Entry, Freshness, now_ms};
use crate::fill::{Fill, FillRequest, Filler, Fleet, Source};
use crate::flight::{Flights, Interest, Role};
use crate::key::CacheKey;
use crate::l1::L1;
use crate::l2::{L2, L2Error};
use crate::lock::LeaseKeeper;
use crate::metrics::Metrics;
use crate::notice::Notices;
use crate::outcome::CacheOutcome;
use crate::purge::{Purge, PurgeError, PurgeRequest};
use crate::route::{Router, check_cacheable};

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
pub struct Proxy {
    /// When this process's proxy was first built (kept across reloads).
    started: Instant,
    router: Router,
    /// The default upstream and the wait for its response heads.
    default_upstream: Option<(Uri, std::time::Duration)>,
    filler: Arc<Filler>,
    flights: Arc<Flights<Arc<Fill>>>,
    metrics: Arc<Metrics>,
    body_read_timeout: std::time::Duration,
    /// `server.access_log`: one `info` line per request.
    access_log: bool,
}

impl Proxy {
    /// Builds the proxy for a validated config. Redis is connected lazily: Corral starts while
    /// Redis is down and serves degraded until it comes up.
    pub fn new(config: &Config) -> Result<Proxy, L2Error> {
        let metrics = Arc::new(Metrics::new());
        for route in &config.routes {
            metrics.register_route(route);
        }
        let l1 = L1::new(config.cache.l1_max_bytes);
        let fleet = match &config.redis {
            Some(redis) => {
                // One breaker per connection: each tells whether its own connection works, so
                // the process is out of degraded mode only once all of them do.
                // Whether Redis is alive, though, is seen on any of them.
                let pulse = Arc::new(Pulse::default());
                let breaker = || Arc::new(Breaker::with_pulse(pulse.clone()));
                let keeper = {
                    let (redis, metrics, breaker) = (redis.clone(), metrics.clone(), breaker());
                    LeaseKeeper::start(move || L2::connect(&redis, breaker, metrics))?
                };
                let notices = Notices::connect(redis, breaker(), metrics.clone(), l1.clone())?;
                Some(Fleet {
                    keeper: Arc::new(keeper),
                    l2: L2::connect(redis, breaker(), metrics.clone())?,
                    notices,
                })
            }
            None => None,
        };
        Ok(Proxy {
            started: Instant::now(),
            router: Router::new(&config.routes),
            default_upstream: config
                .server
                .default_upstream
                .clone()
                .map(|u| (u, config.server.default_upstream_timeout)),
            filler: Arc::new(Filler::new(config, l1, fleet, metrics.clone())),
            flights: Arc::new(Flights::new(Some(metrics.waiters_histogram()))),
            metrics,
            body_read_timeout: config.server.body_read_timeout,
            access_log: config.server.access_log,
        })
    }

    /// The metrics of this process.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The Redis side, when there is one.
    pub fn fleet(&self) -> Option<&Fleet> {
        self.filler.fleet.as_ref()
    }

    /// The same proxy with a new configuration's routes and limits. The caches, the Redis
    /// connections, the flights in progress and the metrics carry over, so a reload drops neither
    /// cached entries nor fills; changes to `[redis]` and `[cache]` need a restart.
    pub fn reloaded(&self, config: &Config) -> Proxy {
        for route in &config.routes {
            self.metrics.register_route(route);
        }
        Proxy {
            started: self.started,
            router: Router::new(&config.routes),
            default_upstream: config
                .server
                .default_upstream
                .clone()
                .map(|u| (u, config.server.default_upstream_timeout)),
            filler: Arc::new(self.filler.renewed(config)),
            flights: self.flights.clone(),
            metrics: self.metrics.clone(),
            body_read_timeout: config.server.body_read_timeout,
            access_log: config.server.access_log,
        }
    }

    /// Fills in progress in this process (a graceful shutdown waits for them).
    pub fn fills_in_progress(&self) -> usize {
        self.flights.len()
    }

    /// Purges what `request` names: from Redis and, through the invalidation channel, from every
    /// instance's L1 (this one at once). Returns the entries removed from Redis — or, in embedded
    /// mode, from L1.
    pub async fn purge(&self, request: &PurgeRequest) -> Result<u64, PurgeError> {
        let purge = self.resolve(request)?;
        let l1 = &self.filler.l1;
        let purged = match self.fleet() {
            Some(fleet) => {
                let n = fleet.l2.purge(&purge).await?;
                purge.apply(l1).await;
                n
            }
            None => purge.apply(l1).await,
        };
        if let Purge::Key { key, .. } = &purge {
            self.filler.marks.remove(key);
        }
        self.metrics.purge(purge.kind(), purged);
        tracing::info!(purge = %purge.payload(), purged, "purged");
        Ok(purged)
    }

    fn resolve(&self, request: &PurgeRequest) -> Result<Purge, PurgeError> {
        if let Some(route) = &request.route {
            return match self.router.named(route) {
                Some(_) => Ok(Purge::Route(route.clone())),
                None => Err(PurgeError::UnknownRoute(route.clone())),
            };
        }
        if let Some(tag) = &request.tag {
            return Ok(Purge::Tag(tag.clone()));
        }
        let url = request.url.as_deref().unwrap_or("/");
        let malformed = |what: &str| PurgeError::Malformed(format!("{what} in {url:?}"));
        let uri: Uri = url.parse().map_err(|_| malformed("not a URL path"))?;
        let method = match &request.method {
            Some(m) => http::Method::from_bytes(m.to_ascii_uppercase().as_bytes())
                .map_err(|_| malformed("bad method"))?,
            None => http::Method::GET,
        };
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
        Ok(Purge::Key {
            route: route.name.clone(),
            key,
        })
    }

    /// The metrics page, with live gauges filled in.
    pub async fn render_metrics(&self) -> String {
        let l1 = &self.filler.l1;
        let (entries, bytes) = (l1.entry_count().await, l1.weighted_size().await);
        self.metrics.render(entries, bytes, self.degraded())
    }

    /// The in-process cache, for inspection.
    pub fn l1(&self) -> &L1 {
        &self.filler.l1
    }

    /// Whether Redis is configured but considered down (the process serves degraded).
    pub fn degraded(&self) -> bool {
        self.filler.fleet.as_ref().is_some_and(Fleet::degraded)
    }

    /// Connects to Redis, loads the scripts and subscribes the invalidation channel, within
    /// `budget`: the first burst after a start then pays for none of it inside a call's budget.
    /// A failure is logged; Corral then serves degraded until Redis answers.
    pub async fn warm_up(&self, budget: std::time::Duration) {
        let Some(fleet) = self.fleet() else {
            return;
        };
        let (l2, pubsub) = tokio::join!(fleet.l2.warm_up(budget), fleet.notices.ready());
        match l2.and(pubsub) {
            Ok(()) => tracing::info!("redis connected, scripts loaded, pub/sub subscribed"),
            Err(err) => {
                tracing::warn!(%err, "redis not ready at start; serving degraded until it answers");
            }
        }
    }

    /// What `/readyz` says: ready; starting (Redis has not answered yet, for at most
    /// [`STARTUP_GRACE`]); or degraded (Redis considered down, or silent since the start).
    pub fn readiness(&self) -> Readiness {
        let Some(fleet) = self.fleet() else {
            return Readiness::Ready;
        };
        if !fleet.l2.has_answered() {
            return if self.started.elapsed() < STARTUP_GRACE {
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
        let started = Instant::now();
        // Only the log line needs these; with it off the hot path does not pay for them.
        let info = self.access_log && tracing::enabled!(target: ACCESS_LOG, tracing::Level::INFO);
        let logged = (info || tracing::enabled!(target: ACCESS_LOG, tracing::Level::DEBUG))
            .then(|| (req.method().clone(), req.uri().path().to_owned()));
        let route = self.router.route(req.uri().path(), req.method()).cloned();
        let (answer, route) = match route {
            // TRACE echoes the request, credentials included, to whoever can read the answer:
            // refused before any upstream call unless the route allows it.
            _ if req.method() == Method::TRACE
                && !route.as_ref().is_some_and(|r| r.allow_trace) =>
            {
                let err = ProxyError::MethodNotAllowed(Method::TRACE);
                let outcome = match route {
                    Some(_) => CacheOutcome::Bypass,
                    None => CacheOutcome::UriMiss,
                };
                (err.into_answer(outcome), route)
            }
            None => (self.unrouted(req, peer).await, None),
            Some(route) => (self.routed(route.clone(), req, peer).await, Some(route)),
        };
        let route_name = route
            .as_ref()
            .map_or(crate::metrics::UNROUTED, |r| r.name.as_str());
        let Answer {
            outcome,
            mut response,
        } = answer;
        self.metrics.request(route_name, outcome);
        response
            .headers_mut()
            .insert(CACHE_STATUS, outcome.cache_status());
        if let Some((method, path)) = logged {
            let status = response.status().as_u16();
            let micros = started.elapsed().as_micros() as u64;
            let outcome = outcome.as_str();
            // The same line at `info` (the access log) or, with it off, at `debug`.
            if info {
                tracing::info!(target: ACCESS_LOG, %method, %path, route = %route_name, status, outcome, micros, "request");
            } else {
                tracing::debug!(target: ACCESS_LOG, %method, %path, route = %route_name, status, outcome, micros, "request");
            }
        }
        response
    }

    async fn routed(
        &self,
        route: Arc<RouteConfig>,
        req: Request<Incoming>,
        peer: SocketAddr,
    ) -> Answer {
        if let Err(why) = check_cacheable(&route, req.method(), req.headers()) {
            tracing::debug!(route = %route.name, ?why, "bypassing the cache");
            return self.bypass(&route, req, peer).await;
        }
        let (parts, body) = req.into_parts();
        let limit = self.body_read_timeout;
        let read = tokio::time::timeout(limit, read_body(&parts.headers, body, route.max_body));
        let body = match read.await.unwrap_or(Err(ProxyError::BodyTimeout(limit))) {
            Ok(body) => body,
            Err(err) => return err.into_answer(CacheOutcome::Bypass),
        };
        self.handle_cacheable(route, parts, body, peer).await
    }

    /// Answers a request whose body is already read, on a route that may cache it: key → L1 →
    /// flight. Public for benchmarks of the hit path without sockets; [`Proxy::handle`] routes and
    /// checks cacheability first.
    pub async fn handle_buffered(
        &self,
        parts: Parts,
        body: Bytes,
        peer: SocketAddr,
    ) -> Response<ProxyBody> {
        let Answer {
            outcome,
            mut response,
        } = match self.router.route(parts.uri.path(), &parts.method) {
            Some(route) if check_cacheable(route, &parts.method, &parts.headers).is_ok() => {
                self.handle_cacheable(route.clone(), parts, body, peer)
                    .await
            }
            _ => ProxyError::NoRoute.into_answer(CacheOutcome::UriMiss),
        };
        response
            .headers_mut()
            .insert(CACHE_STATUS, outcome.cache_status());
        response
    }

    async fn handle_cacheable(
        &self,
        route: Arc<RouteConfig>,
        parts: Parts,
        body: Bytes,
        peer: SocketAddr,
    ) -> Answer {
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
        let req = FillRequest {
            route,
            key,
            parts,
            body,
            peer,
        };
        self.lookup(req).await
    }

    async fn lookup(&self, req: FillRequest) -> Answer {
        let now = now_ms();
        let stale = match self.filler.l1.get(&req.key, now).await {
            Some(entry) => match entry.times.freshness(now) {
                Freshness::Fresh => {
                    if let Some(beta) = req.route.early_refresh
                        && refresh_early(&entry, beta, now)
                    {
                        tracing::debug!(route = %req.route.name, "early refresh");
                        self.refresh_in_background(req, entry.clone());
                    }
                    return answer_at(&entry, CacheOutcome::Hit, now);
                }
                Freshness::StaleRevalidate => {
                    self.refresh_in_background(req, entry.clone());
                    return answer_at(&entry, CacheOutcome::Stale, now);
                }
                Freshness::StaleIfError => Some(entry),
                Freshness::Expired => None,
            },
            None => None,
        };
        if self.filler.marks.contains(&req.key) {
            return self.fetch_alone(&req, CacheOutcome::Bypass).await;
        }
        if req.route.lock.scope == LockScope::None {
            let fill = self.filler.fill(req.clone(), Interest::lasting()).await;
            return self.respond(Role::Leader, &fill, req, stale).await;
        }
        let filler = self.filler.clone();
        let fill_req = req.clone();
        let joined = self.flights.join(
            req.key,
            req.route.lock.max_waiters,
            move |interest| async move { Arc::new(filler.fill(fill_req, interest).await) },
        );
        let joined = match joined {
            Ok(joined) => joined,
            Err(crowded) => {
                return ProxyError::from(crowded).into_answer(CacheOutcome::MissNotStored);
            }
        };
        match joined.result.clone().await {
            Some(fill) => self.respond(joined.role, &fill, req, stale).await,
            None => match stale {
                Some(entry) => answer(&entry, CacheOutcome::Stale),
                None => ProxyError::FillPanicked.into_answer(CacheOutcome::MissNotStored),
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
    ) -> Answer {
        match fill {
            Fill::Shared { entry, source } => {
                let outcome = match (source, role) {
                    (Source::L1 | Source::L2, _) => CacheOutcome::Hit,
                    (Source::Stale, _) => CacheOutcome::Stale,
                    (Source::Remote, _) | (Source::Upstream { .. }, Role::Follower) => {
                        CacheOutcome::Coalesced
                    }
                    (Source::Upstream { stored: true }, Role::Leader) => CacheOutcome::MissStored,
                    (Source::Upstream { stored: false }, Role::Leader) => {
                        CacheOutcome::MissNotStored
                    }
                };
                if entry.status.is_server_error()
                    && let Some(stale) = stale
                {
                    return answer(&stale, CacheOutcome::Stale);
                }
                if *source == Source::Stale
                    && role == Role::Leader
                    && entry.times.freshness(now_ms()) == Freshness::StaleRevalidate
                {
                    self.refresh_in_background(req, entry.clone());
                }
                answer(entry, outcome)
            }
            Fill::Private(buffered) if role == Role::Leader => private_answer(buffered),
            Fill::Streamed(slot) if role == Role::Leader => {
                let taken = slot.lock().ok().and_then(|mut s| s.take());
                match taken {
                    Some(streaming) => Answer::new(CacheOutcome::MissNotStored, streaming),
                    None => self.fetch_alone(&req, CacheOutcome::MissNotStored).await,
                }
            }
            Fill::Private(_) | Fill::Streamed(_) | Fill::FetchYourself => {
                self.fetch_alone(&req, CacheOutcome::MissNotStored).await
            }
            Fill::Failed(err) => match stale {
                Some(entry) => answer(&entry, CacheOutcome::Stale),
                None => ProxyError::from(err.clone()).into_answer(CacheOutcome::MissNotStored),
            },
        }
    }

    /// A request whose flight's answer was not for sharing: it asks the upstream itself.
    async fn fetch_alone(&self, req: &FillRequest, outcome: CacheOutcome) -> Answer {
        let body = Either::Left(http_body_util::Full::new(req.body.clone()));
        let answer = self
            .forward(
                &req.route,
                &req.route.upstream,
                &req.parts,
                body,
                req.peer,
                None,
            )
            .await;
        Answer::new(outcome, answer.response)
    }

    /// Starts one refresh of `req`'s key, unless one already runs in this process. Nobody awaits
    /// it; a miss that arrives meanwhile joins it.
    fn refresh_in_background(&self, req: FillRequest, stale: Arc<Entry>) {
        let filler = self.filler.clone();
        let key = req.key;
        let max_waiters = req.route.lock.max_waiters;
        let _ = self.flights.join(key, max_waiters, move |_| async move {
            Arc::new(filler.refresh(req, stale).await)
        });
    }
}

/// The log target of the per-request line, so `RUST_LOG` can filter it on its own
/// (`corral::access=off`).
pub const ACCESS_LOG: &str = "corral::access";

/// XFetch (Vattani et al.): refresh a fresh entry early with a probability that rises as expiry
/// nears, scaled by how long the fill took: `now − fill_time · β · ln(rand) ≥ fresh_until`.
fn refresh_early(entry: &Entry, beta: f64, now: u64) -> bool {
    let delta = f64::from(entry.fill_ms.max(1));
    let r: f64 = rand::random::<f64>().max(f64::MIN_POSITIVE);
    let ahead = -delta * beta * r.ln();
    (now as f64) + ahead >= entry.times.fresh_until as f64
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::entry::Lifetime;
    use http::StatusCode;

    fn entry(fill_ms: u32, fresh_until: u64) -> Entry {
        Entry {
            status: StatusCode::OK,
            headers: http::HeaderMap::new(),
            body: Bytes::new(),
            times: Lifetime {
                stored_at: 0,
                fresh_until,
                swr_until: fresh_until,
                sie_until: fresh_until,
            },
            fill_ms,
            tags: Vec::new(),
        }
    }

    #[test]
    fn xfetch_never_fires_long_before_expiry_and_always_at_it() {
        let far = entry(10, 1_000_000);
        assert!((0..1000).all(|_| !refresh_early(&far, 1.0, 0)));
        let due = entry(10, 1_000);
        assert!((0..1000).all(|_| refresh_early(&due, 1.0, 1_000)));
    }
}
