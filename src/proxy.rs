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
use http_body_util::{BodyExt, Either, Limited};
use hyper::body::Incoming;

use crate::answer::{Answer, CACHE_STATUS, ProxyError, answer, answer_at, private_answer};
use crate::body::ProxyBody;
use crate::breaker::{Breaker, Pulse};
use crate::cache_control::CORRAL_CACHE_CONTROL;
use crate::conditional::Conditions;
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
use crate::route::{Router, cache_method, check_cacheable};
use crate::vary;

mod invalidate;
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
    pub async fn handle(
        &self,
        mut req: Request<Incoming>,
        peer: SocketAddr,
    ) -> Response<ProxyBody> {
        let started = Instant::now();
        if let Err(err) = crate::target::normalize(&mut req) {
            let answer = ProxyError::from(err).into_answer(CacheOutcome::Bypass);
            let cache_status = answer.cache_status();
            let mut response = answer.response;
            response.headers_mut().insert(CACHE_STATUS, cache_status);
            return response;
        }
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
        let cache_status = answer.cache_status();
        let Answer {
            outcome,
            mut response,
            ..
        } = answer;
        self.metrics.request(route_name, outcome);
        response.headers_mut().insert(CACHE_STATUS, cache_status);
        // Corral's own directives never leave Corral, whatever path the answer took.
        response.headers_mut().remove(CORRAL_CACHE_CONTROL);
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
        let answer = match self.router.route(parts.uri.path(), &parts.method) {
            Some(route) if check_cacheable(route, &parts.method, &parts.headers).is_ok() => {
                self.handle_cacheable(route.clone(), parts, body, peer)
                    .await
            }
            _ => ProxyError::NoRoute.into_answer(CacheOutcome::UriMiss),
        };
        let cache_status = answer.cache_status();
        let mut response = answer.response;
        response.headers_mut().insert(CACHE_STATUS, cache_status);
        response
    }

    /// Keys, looks up and answers a cacheable request; its conditionals, `Range` and HEAD are
    /// then answered by Corral from what it holds (see [`Conditions`]). A HEAD is keyed, looked up
    /// and filled as a GET, so it shares GET's entries and flights.
    async fn handle_cacheable(
        &self,
        route: Arc<RouteConfig>,
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
        let req = FillRequest {
            route,
            key,
            parts,
            body,
            peer,
            validators: None,
        };
        conditions.apply(self.lookup(req).await)
    }

    /// Looks a request up under its key and, when the entry there is another variant of the
    /// answer (`Vary`), under its own variant's key (see [`crate::vary`]).
    async fn lookup(&self, mut req: FillRequest) -> Answer {
        let primary = req.key;
        for _ in 0..MAX_VARIANT_HOPS {
            match self.lookup_key(req).await {
                Looked::Answer(answer) => return answer,
                Looked::OtherVariant(back, on, generation) => {
                    req = back;
                    let values = vary::projected(&req.route, &req.parts.headers, &on);
                    req.key = vary::variant_key(&primary, generation, &values);
                    tracing::debug!(route = %req.route.name, key = ?req.key, "looking up a variant");
                }
            }
        }
        // The upstream keeps changing what it varies on: answer this request alone.
        self.fetch_alone(&req, CacheOutcome::Bypass).await
    }

    async fn lookup_key(&self, mut req: FillRequest) -> Looked {
        let now = now_ms();
        let stale = match self.filler.l1.get(&req.key, now).await {
            Some(entry) if entry.times.freshness(now) == Freshness::Expired => {
                // Kept only for its validators: the fill revalidates it (RFC 9111 §4.3).
                req.validators = self.fits(&entry, &req).then_some(entry);
                None
            }
            Some(entry) if !self.fits(&entry, &req) => {
                return Looked::OtherVariant(
                    req,
                    entry.vary.fields().to_vec(),
                    entry.times.stored_at,
                );
            }
            Some(entry) => match entry.times.freshness(now) {
                Freshness::Fresh => {
                    if let Some(beta) = req.route.early_refresh
                        && refresh_early(&entry, beta, now)
                    {
                        tracing::debug!(route = %req.route.name, "early refresh");
                        self.refresh_in_background(req, entry.clone());
                    }
                    return Looked::Answer(answer_at(&entry, CacheOutcome::Hit, now));
                }
                Freshness::StaleRevalidate => {
                    self.refresh_in_background(req, entry.clone());
                    return Looked::Answer(answer_at(&entry, CacheOutcome::Stale, now));
                }
                Freshness::StaleIfError => Some(entry),
                Freshness::Expired => None,
            },
            None => None,
        };
        if self.filler.marks.contains(&req.key) {
            return Looked::Answer(self.fetch_alone(&req, CacheOutcome::Bypass).await);
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
                let answer = ProxyError::from(crowded).into_answer(CacheOutcome::MissNotStored);
                return Looked::Answer(answer);
            }
        };
        // A follower may have joined a background refresh that started after its L1 miss, once
        // an entry landed in L1: it answers from that entry rather than waiting for the refresh.
        if joined.role == Role::Follower {
            let now = now_ms();
            if let Some(entry) = self.filler.l1.get(&req.key, now).await
                && self.fits(&entry, &req)
            {
                match entry.times.freshness(now) {
                    Freshness::Fresh => {
                        return Looked::Answer(answer_at(&entry, CacheOutcome::Hit, now));
                    }
                    Freshness::StaleRevalidate => {
                        return Looked::Answer(answer_at(&entry, CacheOutcome::Stale, now));
                    }
                    Freshness::StaleIfError | Freshness::Expired => {}
                }
            }
        }
        match joined.result.clone().await {
            Some(fill) => self.respond(joined.role, &fill, req, stale).await,
            None => Looked::Answer(match stale {
                Some(entry) => answer(&entry, CacheOutcome::Stale),
                None => ProxyError::FillPanicked.into_answer(CacheOutcome::MissNotStored),
            }),
        }
    }

    /// Whether `entry` may answer `req`: it is the variant `req` asks for.
    fn fits(&self, entry: &Entry, req: &FillRequest) -> bool {
        vary::matches(&entry.vary, &req.route, &req.parts.headers)
    }

    /// Turns a flight's result into this joiner's answer.
    async fn respond(
        &self,
        role: Role,
        fill: &Fill,
        req: FillRequest,
        stale: Option<Arc<Entry>>,
    ) -> Looked {
        Looked::Answer(match fill {
            Fill::Shared { entry, .. } if !self.fits(entry, &req) => {
                return Looked::OtherVariant(
                    req,
                    entry.vary.fields().to_vec(),
                    entry.times.stored_at,
                );
            }
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
                    return Looked::Answer(answer(&stale, CacheOutcome::Stale));
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
                // A follower shares the leader's error as a collapsed forward, as a follower on
                // another instance does (which gets it as a `failed` notice): never a hit.
                None => ProxyError::from(err.clone()).into_answer(match role {
                    Role::Leader => CacheOutcome::MissNotStored,
                    Role::Follower => CacheOutcome::Coalesced,
                }),
            },
        })
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

/// How many keys one request may look at: its primary key, its variant's, and one more should
/// the upstream change what it varies on meanwhile.
const MAX_VARIANT_HOPS: usize = 3;

/// What looking up one key gave.
enum Looked {
    Answer(Answer),
    /// The entry there is another variant: look again under the variant key for these fields
    /// and the entry's generation (its `stored_at`).
    OtherVariant(FillRequest, Vec<crate::vary::VaryField>, u64),
}

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
            vary: Default::default(),
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
