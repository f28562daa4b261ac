//! Metrics in the Prometheus text format, served on the admin listener at `/metrics`.
//!
//! Request outcomes are labelled by [`CacheOutcome::as_str`], the same enum that writes the
//! `Cache-Status` header, so the two never disagree. Gauges of live state (L1 size, circuit) are
//! set when the page is rendered.
//!
//! Series are created at zero before their first event only where the event can happen, so the
//! page never shows a series that cannot move: requests no route matched ([`UNROUTED`]) are only
//! `uri_miss`; a named route is never `uri_miss`, and a `cache = false` route only `bypass`; fill-lock
//! outcomes exist only on routes with a fleet lock.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::config::{LockScope, RouteConfig};
use crate::outcome::CacheOutcome;
use buckets::{answer_histogram, latency_histogram};

mod buckets;
mod budgets;
mod purges;
mod sharded;
mod streams;

pub use sharded::ShardedCounter;

/// The `route` label of requests, and of upstream calls, that no route matched.
pub const UNROUTED: &str = "-";

/// The request counters of one route, resolved once, so that counting a request is one atomic
/// add: no label set built, no route name hashed, no lock taken. Cloned into the proxy's routes at
/// start and on reloads.
#[derive(Clone, Debug)]
pub struct RequestCounters(Arc<RouteRequests>);

#[derive(Debug)]
struct RouteRequests {
    route: String,
    /// Indexed by [`CacheOutcome`]: `None` for outcomes the route cannot have, whose series are
    /// then created only if one happens anyway.
    by_outcome: [Option<ShardedCounter>; CacheOutcome::ALL.len()],
    family: Family<RouteOutcome, ShardedCounter>,
    /// The answer-time histograms, likewise.
    times: [Option<Histogram>; CacheOutcome::ALL.len()],
    times_family: HistogramFamily<RouteOutcome>,
}

impl RequestCounters {
    /// Counts one answer of this route and observes its time (from the request's arrival to the
    /// answer head): no lock taken and no name hashed for the outcomes the route registered.
    pub fn answered(&self, outcome: CacheOutcome, took: Duration) {
        self.inc(outcome);
        let seconds = took.as_secs_f64();
        match &self.0.times[outcome as usize] {
            Some(histogram) => histogram.observe(seconds),
            None => self
                .0
                .times_family
                .get_or_create(&RouteOutcome {
                    route: self.0.route.clone(),
                    outcome: outcome.as_str(),
                })
                .observe(seconds),
        }
    }

    /// Counts one request of this route.
    pub fn inc(&self, outcome: CacheOutcome) {
        match &self.0.by_outcome[outcome as usize] {
            Some(counter) => {
                counter.inc();
            }
            // An outcome the route was not expected to have: counted all the same, in a series
            // created now.
            None => {
                self.0
                    .family
                    .get_or_create(&RouteOutcome {
                        route: self.0.route.clone(),
                        outcome: outcome.as_str(),
                    })
                    .inc();
            }
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteOutcome {
    pub route: String,
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteStatus {
    pub route: String,
    /// The upstream's status code, or `error` when it gave none.
    pub status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabel {
    pub route: String,
}

/// An upstream's authority (`host:port`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UpstreamLabel {
    pub upstream: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OpLabel {
    pub op: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: &'static str,
}

/// How a fleet flight dealt with the fill lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockOutcome {
    /// Took the lock at the first try.
    Acquired,
    /// Waited for another instance's fill and used it.
    Waited,
    /// Waited, then took the lock (the holder failed, died or its lease lapsed).
    TookOver,
    /// Gave up waiting at `wait_timeout`.
    WaitTimeout,
}

impl LockOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            LockOutcome::Acquired => "acquired",
            LockOutcome::Waited => "waited",
            LockOutcome::TookOver => "took_over",
            LockOutcome::WaitTimeout => "wait_timeout",
        }
    }
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// Every metric Corral exports.
pub struct Metrics {
    registry: Registry,
    /// Sharded: every hit counts here, from every core.
    requests: Family<RouteOutcome, ShardedCounter>,
    /// The request counters of each route, by outcome: counted without building a label set
    /// (and allocating its route name) on every request.
    request_counters: RwLock<HashMap<String, RequestCounters>>,
    /// Time to Corral's own answer, by route and outcome.
    answer_seconds: HistogramFamily<RouteOutcome>,
    /// The answer histograms of each route, by outcome, found as the request counters are.
    answer_histograms: RwLock<HashMap<String, AnswerHistograms>>,
    upstream_calls: Family<RouteStatus, Counter>,
    upstream_seconds: HistogramFamily<RouteLabel>,
    lock_outcomes: Family<RouteOutcome, Counter>,
    lock_wait_seconds: HistogramFamily<RouteLabel>,
    waiters: Histogram,
    redis_errors: Family<OpLabel, Counter>,
    circuit_open: Gauge,
    l1_entries: Gauge,
    l1_bytes: Gauge,
    purges: purges::PurgeMetrics,
    notices_received: Counter,
    upstream_tls_handshakes: Family<UpstreamLabel, Counter>,
    streams: streams::StreamMetrics,
    budgets: budgets::BudgetMetrics,
}

/// The answer-time histograms of one route, indexed by outcome like [`RequestCounters`].
type AnswerHistograms = Arc<[Option<Histogram>; CacheOutcome::ALL.len()]>;

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("corral");
        let requests = Family::<RouteOutcome, ShardedCounter>::default();
        registry.register(
            "requests",
            "Requests answered, by route and cache outcome (the Cache-Status value)",
            requests.clone(),
        );
        let upstream_calls = Family::<RouteStatus, Counter>::default();
        registry.register(
            "upstream_calls",
            "Calls to upstreams, by route and status (`error`: no answer)",
            upstream_calls.clone(),
        );
        let upstream_seconds: HistogramFamily<RouteLabel> =
            Family::new_with_constructor(latency_histogram);
        registry.register(
            "upstream_duration_seconds",
            "Time to the upstream's answer head (pass-through) or whole body (fills)",
            upstream_seconds.clone(),
        );
        let answer_seconds: HistogramFamily<RouteOutcome> =
            Family::new_with_constructor(answer_histogram);
        registry.register(
            "answer_duration_seconds",
            "Time from a request's arrival to Corral's answer head, by route and cache outcome",
            answer_seconds.clone(),
        );
        let lock_outcomes = Family::<RouteOutcome, Counter>::default();
        registry.register(
            "fill_lock",
            "Fleet fill-lock outcomes: acquired, waited, took_over, wait_timeout",
            lock_outcomes.clone(),
        );
        let lock_wait_seconds: HistogramFamily<RouteLabel> =
            Family::new_with_constructor(latency_histogram);
        registry.register(
            "lock_wait_seconds",
            "Time an instance waited for another instance's fill",
            lock_wait_seconds.clone(),
        );
        let waiters = Histogram::new(exponential_buckets(1.0, 4.0, 10));
        registry.register(
            "waiters_per_fill",
            "Requests in one process that waited on one fill",
            waiters.clone(),
        );
        let redis_errors = Family::<OpLabel, Counter>::default();
        registry.register(
            "redis_errors",
            "Redis calls that failed, timed out or were refused by the open circuit",
            redis_errors.clone(),
        );
        let circuit_open = Gauge::default();
        registry.register(
            "redis_circuit_open",
            "1 while Redis is considered down (serving degraded)",
            circuit_open.clone(),
        );
        let l1_entries = Gauge::default();
        registry.register(
            "l1_entries",
            "Entries in the in-process cache",
            l1_entries.clone(),
        );
        let l1_bytes = Gauge::default();
        registry.register(
            "l1_bytes",
            "Bytes held by the in-process cache, as its weigher counts them",
            l1_bytes.clone(),
        );
        let purges = purges::PurgeMetrics::register(&mut registry);
        let notices_received = Counter::default();
        registry.register(
            "notices_received",
            "Fill notices Redis pub/sub delivered to this process: one per fill it waited on, however many requests waited",
            notices_received.clone(),
        );
        let streams = streams::StreamMetrics::register(&mut registry);
        let budgets = budgets::BudgetMetrics::register(&mut registry);
        let upstream_tls_handshakes = Family::<UpstreamLabel, Counter>::default();
        registry.register(
            "upstream_tls_handshakes",
            "TLS handshakes with upstreams, by authority: new connections, not requests (pooled connections are reused)",
            upstream_tls_handshakes.clone(),
        );
        registry.register(
            "access_lines_dropped",
            "Access lines dropped because the log writer's queue was full (its output is slow or blocked); requests never wait for the log",
            crate::access::dropped_counter().clone(),
        );
        let metrics = Metrics {
            upstream_tls_handshakes,
            registry,
            requests,
            request_counters: RwLock::default(),
            answer_seconds,
            answer_histograms: RwLock::default(),
            upstream_calls,
            upstream_seconds,
            lock_outcomes,
            lock_wait_seconds,
            waiters,
            redis_errors,
            circuit_open,
            l1_entries,
            l1_bytes,
            purges,
            notices_received,
            streams,
            budgets,
        };
        metrics.route_counters(UNROUTED, |outcome| outcome == CacheOutcome::UriMiss);
        metrics
    }

    /// Counts a request by its route's name (see [`Metrics::route_requests`] for the hit path).
    pub fn request(&self, route: &str, outcome: CacheOutcome) {
        self.route_requests(route).inc(outcome);
    }

    /// The request counters of a route, to keep and count with: those its registration created,
    /// or, for a name never registered, counters whose series appear with their first request.
    pub fn route_requests(&self, route: &str) -> RequestCounters {
        let known = self
            .request_counters
            .read()
            .ok()
            .and_then(|map| map.get(route).cloned());
        known.unwrap_or_else(|| {
            RequestCounters(Arc::new(RouteRequests {
                route: route.to_owned(),
                by_outcome: Default::default(),
                family: self.requests.clone(),
                times: Default::default(),
                times_family: self.answer_seconds.clone(),
            }))
        })
    }

    /// One answer of Corral's: counted by outcome (as [`Metrics::request`]) and its time, from
    /// the request's arrival to the answer head, observed by route and outcome.
    pub fn answered(&self, route: &str, outcome: CacheOutcome, took: Duration) {
        self.request(route, outcome);
        self.answer_time(route, outcome, took);
    }

    /// The time of one answer of Corral's (the request is counted apart, see
    /// [`RequestCounters`]), observed by route and outcome.
    pub fn answer_time(&self, route: &str, outcome: CacheOutcome, took: Duration) {
        let known = self
            .answer_histograms
            .read()
            .ok()
            .and_then(|map| map.get(route).cloned());
        let seconds = took.as_secs_f64();
        match known.as_ref().and_then(|h| h[outcome as usize].as_ref()) {
            Some(histogram) => histogram.observe(seconds),
            None => self
                .answer_seconds
                .get_or_create(&RouteOutcome {
                    route: route.to_owned(),
                    outcome: outcome.as_str(),
                })
                .observe(seconds),
        }
    }

    /// Creates the series a route can move at zero, so dashboards and alerts see 0 rather than no
    /// data before the first event: its request outcomes (only `bypass` when it does not cache;
    /// never `uri_miss`) and, with a fleet lock, its fill-lock outcomes.
    pub fn register_route(&self, route: &RouteConfig) {
        let cached = route.cache;
        self.route_counters(&route.name, |outcome| match outcome {
            CacheOutcome::UriMiss => false,
            CacheOutcome::Bypass => true,
            _ => cached,
        });
        if !cached || route.lock.scope != LockScope::Fleet {
            return;
        }
        for outcome in [
            LockOutcome::Acquired,
            LockOutcome::Waited,
            LockOutcome::TookOver,
            LockOutcome::WaitTimeout,
        ] {
            let _created = self.lock_outcomes.get_or_create(&RouteOutcome {
                route: route.name.clone(),
                outcome: outcome.as_str(),
            });
        }
    }

    /// Registers the request counters of a route for the outcomes it can have (a reload may
    /// change them: those already exported stay on the page).
    fn route_counters(&self, route: &str, possible: impl Fn(CacheOutcome) -> bool) {
        let by_outcome = CacheOutcome::ALL.map(|outcome| {
            possible(outcome).then(|| {
                self.requests
                    .get_or_create(&RouteOutcome {
                        route: route.to_owned(),
                        outcome: outcome.as_str(),
                    })
                    .clone()
            })
        });
        // The same outcomes' answer times, at zero too.
        let times = CacheOutcome::ALL.map(|outcome| {
            possible(outcome).then(|| {
                self.answer_seconds
                    .get_or_create(&RouteOutcome {
                        route: route.to_owned(),
                        outcome: outcome.as_str(),
                    })
                    .clone()
            })
        });
        if let Ok(mut map) = self.answer_histograms.write() {
            map.insert(route.to_owned(), Arc::new(times.clone()));
        }
        let counters = RequestCounters(Arc::new(RouteRequests {
            route: route.to_owned(),
            by_outcome,
            family: self.requests.clone(),
            times,
            times_family: self.answer_seconds.clone(),
        }));
        if let Ok(mut map) = self.request_counters.write() {
            map.insert(route.to_owned(), counters);
        }
    }

    /// One upstream call: `status` is `None` when no answer came.
    pub fn upstream_call(&self, route: &str, status: Option<u16>, took: Duration) {
        let status = status.map_or_else(|| "error".to_owned(), |s| s.to_string());
        self.upstream_calls
            .get_or_create(&RouteStatus {
                route: route.to_owned(),
                status,
            })
            .inc();
        self.upstream_seconds
            .get_or_create(&RouteLabel {
                route: route.to_owned(),
            })
            .observe(took.as_secs_f64());
    }

    pub fn lock(&self, route: &str, outcome: LockOutcome, waited: Option<Duration>) {
        self.lock_outcomes
            .get_or_create(&RouteOutcome {
                route: route.to_owned(),
                outcome: outcome.as_str(),
            })
            .inc();
        if let Some(waited) = waited {
            self.lock_wait_seconds
                .get_or_create(&RouteLabel {
                    route: route.to_owned(),
                })
                .observe(waited.as_secs_f64());
        }
    }

    /// The histogram of requests waiting on one fill, observed by the flights as they land.
    /// The TLS handshake counters, for the upstream connectors to count in.
    pub fn upstream_tls_handshakes(&self) -> Family<UpstreamLabel, Counter> {
        self.upstream_tls_handshakes.clone()
    }

    pub fn waiters_histogram(&self) -> Histogram {
        self.waiters.clone()
    }

    pub fn redis_error(&self, op: &'static str) {
        self.redis_errors.get_or_create(&OpLabel { op }).inc();
    }

    /// One fill notice delivered by pub/sub (whether or not a request here still waited on it).
    pub fn notice_received(&self) {
        self.notices_received.inc();
    }

    /// Fill notices delivered to this process so far (`corral_notices_received_total`).
    pub fn notices_received(&self) -> u64 {
        self.notices_received.get()
    }

    /// Renders the page, after setting the gauges of live state.
    pub fn render(&self, l1_entries: u64, l1_bytes: u64, circuit_open: bool) -> String {
        self.l1_entries
            .set(i64::try_from(l1_entries).unwrap_or(i64::MAX));
        self.l1_bytes
            .set(i64::try_from(l1_bytes).unwrap_or(i64::MAX));
        self.circuit_open.set(i64::from(circuit_open));
        let mut page = String::new();
        // Writing into a String cannot fail.
        if prometheus_client::encoding::text::encode(&mut page, &self.registry).is_err() {
            page.clear();
        }
        page
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

#[cfg(test)]
mod tests;
