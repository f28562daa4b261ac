//! Fills: computing an entry by calling the upstream, then writing L2, then L1.
//!
//! A fill runs inside an in-process flight (see [`crate::flight`]), so at most one fill per key runs
//! in each process, in a task of its own. [`Filler::fill`] decides how it may fill — under the
//! fleet lock (see [`crate::coalesce`]), or for this instance alone — and [`Filler::fill_with`]
//! calls the upstream and ends the claim by what the answer allows ([`crate::verdict`]): a store
//! that releases the lock and publishes `stored` with the entry; or a release at once with a
//! notice that carries what the waiters need (`failed` with the answer, `uncacheable`).
//! [`Filler::refresh`] is the background variant that never waits for another's fill.
//!
//! Redis faults never fail a request: the flight falls back to filling for this instance alone
//! (at most one upstream call per instance per key), logged as degraded.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::request::Parts;
use http::{Response, StatusCode};
use http_body_util::{Either, Full};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::body::ProxyBody;
use crate::config::{Config, LockScope, RouteConfig};
use crate::entry::{Entry, Freshness, now_ms};
use crate::flight::Interest;
use crate::key::CacheKey;
use crate::l1::{L1, PassMarks};
use crate::l2::{KeyNames, L2, Notice, Peek, StoreOutcome};
use crate::lock::{FillLock, LeaseKeeper};
use crate::metrics::Metrics;
use crate::notice::Notices;
use crate::revalidate::{is_not_modified, make_conditional, renewed};
use crate::upstream::{Buffered, Fetched, UpstreamClient, UpstreamError};
use crate::verdict::{Verdict, error_entry, judge};
use crate::wait::Purpose;

/// The Redis side of a fleet: the store and the notice hub.
#[derive(Clone)]
pub struct Fleet {
    pub l2: L2,
    pub notices: Notices,
    /// Keeps this process's fill leases alive from a thread of its own.
    pub keeper: Arc<LeaseKeeper>,
}

impl Fleet {
    /// Whether any of the process's Redis connections is considered down: the command
    /// connection, the lease keeper's, or the pub/sub hub's.
    pub fn degraded(&self) -> bool {
        self.l2.degraded() || self.keeper.degraded() || self.notices.degraded()
    }
}

/// Everything a fill needs from the request that started it.
#[derive(Clone)]
pub struct FillRequest {
    pub route: Arc<RouteConfig>,
    pub key: CacheKey,
    pub parts: Parts,
    pub body: Bytes,
    pub peer: SocketAddr,
    /// An entry of this key (and variant) past its usable life, kept in L1 for its validators: a
    /// fill with no stale entry of its own asks the upstream conditionally with them, and a
    /// `304` renews it (RFC 9111 §4.3). Never served as it is.
    pub validators: Option<Arc<Entry>>,
}

/// Where a shared entry came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// Found fresh in L1 when the flight started (a fill landed just before).
    L1,
    /// Found fresh in L2 before any lock was needed.
    L2,
    /// This flight called the upstream.
    Upstream { stored: bool },
    /// Another instance's fill, waited for.
    Remote,
    /// A stale entry: within `stale_while_revalidate`, or standing in for a failed fill.
    Stale,
}

/// An oversized answer's stream, handed to the flight's leader (once).
pub type StreamSlot = Mutex<Option<Response<ProxyBody>>>;

/// A flight's result, shared by every joiner.
#[derive(Debug, Clone)]
pub enum Fill {
    /// An answer every joiner may use.
    Shared { entry: Arc<Entry>, source: Source },
    /// An answer for the flight's leader alone; followers fetch for themselves.
    Private(Arc<Buffered>),
    /// An answer too large to store, streaming to the flight's leader; followers fetch for
    /// themselves.
    Streamed(Arc<StreamSlot>),
    /// Nobody may share: every joiner fetches for itself.
    FetchYourself,
    /// No answer: every joiner answers with this error (or a stale entry it holds).
    Failed(FillError),
}

/// Why a fill produced no answer. Cloned to every joiner.
#[derive(Debug, Clone, thiserror::Error)]
pub enum FillError {
    #[error("{0}")]
    Upstream(Arc<UpstreamError>),
    #[error("waited {0:?} for another instance's fill")]
    WaitTimeout(Duration),
    #[error("route {route:?} already has {limit} upstream calls in progress")]
    Overloaded { route: String, limit: usize },
}

impl FillError {
    pub fn status(&self) -> StatusCode {
        match self {
            FillError::Upstream(err) if matches!(**err, UpstreamError::Timeout { .. }) => {
                StatusCode::GATEWAY_TIMEOUT
            }
            FillError::WaitTimeout(_) => StatusCode::GATEWAY_TIMEOUT,
            FillError::Overloaded { .. } => StatusCode::SERVICE_UNAVAILABLE,
            FillError::Upstream(_) => StatusCode::BAD_GATEWAY,
        }
    }
}

/// How this flight may fill: under the fleet lock, or for this instance alone (writing L2
/// plainly when there is one to write).
pub(crate) enum Claim<'a> {
    Fleet(FillLock),
    Instance(Option<(&'a L2, &'a KeyNames)>),
}

/// The fill machinery of one process.
pub struct Filler {
    pub l1: L1,
    /// Keys whose last answer could not be shared: requests skip coalescing for a while.
    pub marks: PassMarks,
    pub fleet: Option<Fleet>,
    pub client: UpstreamClient,
    /// Per-route caps on concurrent upstream calls, and their sizes.
    limits: HashMap<String, Arc<Semaphore>>,
    caps: HashMap<String, usize>,
    pub(crate) metrics: Arc<Metrics>,
}

fn caps(config: &Config) -> HashMap<String, usize> {
    config
        .routes
        .iter()
        .filter_map(|r| Some((r.name.clone(), r.upstream_concurrency?)))
        .collect()
}

impl Filler {
    pub fn new(config: &Config, l1: L1, fleet: Option<Fleet>, metrics: Arc<Metrics>) -> Filler {
        let limits = config
            .routes
            .iter()
            .filter_map(|r| {
                let n = r.upstream_concurrency?;
                Some((r.name.clone(), Arc::new(Semaphore::new(n))))
            })
            .collect();
        Filler {
            l1,
            marks: PassMarks::new(),
            fleet,
            client: UpstreamClient::with_idle_timeout(config.server.upstream_idle_timeout),
            limits,
            caps: caps(config),
            metrics,
        }
    }

    /// The same machinery for a reloaded configuration: caches, marks, Redis, client and metrics
    /// carry over; a route keeps its cap (and the calls in progress under it) when the cap is
    /// unchanged.
    pub fn renewed(&self, config: &Config) -> Filler {
        let limits = config
            .routes
            .iter()
            .filter_map(|r| {
                let n = r.upstream_concurrency?;
                let kept = self
                    .limits
                    .get(&r.name)
                    .filter(|_| self.caps.get(&r.name) == Some(&n))
                    .cloned();
                Some((
                    r.name.clone(),
                    kept.unwrap_or_else(|| Arc::new(Semaphore::new(n))),
                ))
            })
            .collect();
        Filler {
            l1: self.l1.clone(),
            marks: self.marks.clone(),
            fleet: self.fleet.clone(),
            client: self.client.clone(),
            limits,
            caps: caps(config),
            metrics: self.metrics.clone(),
        }
    }

    /// Runs one fill to its end. Cancel safety: runs inside its own task (a flight), so it is not
    /// cancelled when requesters go away; a held lock is released on drop. While it only waits
    /// for another instance's fill, it stops once `interest` says every requester has gone.
    pub async fn fill(&self, req: FillRequest, interest: Interest) -> Fill {
        // A fill may have landed between this request's L1 miss and its flight's start.
        if let Some(entry) = self.l1.get(&req.key, now_ms()).await
            && entry.times.freshness(now_ms()) == Freshness::Fresh
        {
            return Fill::Shared {
                entry,
                source: Source::L1,
            };
        }
        let Some(fleet) = &self.fleet else {
            return self.fill_with(&req, Claim::Instance(None), None).await;
        };
        let names = Arc::new(fleet.l2.names(&req.route.name, &req.key));
        if req.route.lock.scope == LockScope::Fleet {
            return self
                .coalesce(&req, fleet, &names, Purpose::Miss, None, &interest)
                .await;
        }
        let fallback = match fleet.l2.get(&names, fleet.l2.read_budget()).await {
            Ok(peek) => match self.settled(&req, peek).await {
                Ok(fill) => return fill,
                Err(fallback) => fallback,
            },
            Err(err) => {
                tracing::warn!(route = %req.route.name, %err, "redis unavailable; filling for this instance only (degraded)");
                return self.fill_with(&req, Claim::Instance(None), None).await;
            }
        };
        let claim = Claim::Instance(Some((&fleet.l2, &names)));
        self.fill_with(&req, claim, fallback).await
    }

    /// A background refresh of `stale`, the entry this instance holds: if L2 already holds a
    /// newer one, it is copied into L1; else the fill lock is taken and the upstream called; if
    /// someone else holds the lock, the refresh waits for their fill as a miss does (see
    /// [`crate::wait`]), and if that fill fails, `stale` stands in — nobody here calls the
    /// upstream on its own.
    pub async fn refresh(&self, req: FillRequest, stale: Arc<Entry>) -> Fill {
        let Some(fleet) = &self.fleet else {
            return self
                .fill_with(&req, Claim::Instance(None), Some(stale))
                .await;
        };
        let route = &req.route;
        let names = Arc::new(fleet.l2.names(&route.name, &req.key));
        if route.lock.scope != LockScope::Fleet {
            let claim = Claim::Instance(Some((&fleet.l2, &names)));
            return self.fill_with(&req, claim, Some(stale)).await;
        }
        let known = stale.times.stored_at;
        let purpose = Purpose::Refresh { known };
        // Nobody awaits a refresh; it is worth finishing for the requests to come.
        let interest = Interest::lasting();
        self.coalesce(&req, fleet, &names, purpose, Some(stale), &interest)
            .await
    }

    /// What an L2 read settles for a route that does not coalesce fleet-wide: `Ok` with the
    /// flight's result, or `Err` with the stale entry (if any) to fall back on while filling.
    async fn settled(&self, req: &FillRequest, peek: Peek) -> Result<Fill, Option<Arc<Entry>>> {
        if peek.uncacheable {
            self.marks.insert(req.key, req.route.uncacheable_ttl);
            return Ok(Fill::FetchYourself);
        }
        let Some(entry) = peek.entry else {
            return Err(None);
        };
        let source = match entry.times.freshness(now_ms()) {
            Freshness::Fresh => Source::L2,
            Freshness::StaleRevalidate => Source::Stale,
            Freshness::StaleIfError => return Err(Some(Arc::new(entry))),
            Freshness::Expired => return Err(None),
        };
        let entry = Arc::new(entry);
        self.l1
            .insert(req.key, &req.route.name, entry.clone())
            .await;
        Ok(Fill::Shared { entry, source })
    }

    /// Calls the upstream and ends the claim according to what it answered.
    pub(crate) async fn fill_with(
        &self,
        req: &FillRequest,
        claim: Claim<'_>,
        fallback: Option<Arc<Entry>>,
    ) -> Fill {
        let route = &req.route;
        let lock = match &claim {
            Claim::Fleet(held) => Some(held),
            Claim::Instance(_) => None,
        };
        // A purge applied after this point covers what the upstream is about to answer.
        let began = self.l1.fence().mark();
        let validators = fallback.as_deref().or(req.validators.as_deref());
        match self.call_upstream(req, lock, validators).await {
            Ok(Verdict::Store(entry)) => {
                let entry = Arc::new(entry);
                let fence = self.l1.fence();
                if fence.purged_since(began, &route.name, &req.key, &entry.tags) {
                    tracing::info!(route = %route.name, "a purge came while this fill ran: its answer goes to its own requests only");
                    // The waiters elsewhere fill again, after the purge.
                    claim.give_up(req, Notice::Failed(None)).await;
                    return Fill::Shared {
                        entry,
                        source: Source::Upstream { stored: false },
                    };
                }
                let stored = claim.store(req, &entry).await;
                if stored {
                    self.l1.insert(req.key, &route.name, entry.clone()).await;
                }
                Fill::Shared {
                    entry,
                    source: Source::Upstream { stored },
                }
            }
            Ok(Verdict::Share(entry)) => {
                let entry = Arc::new(entry);
                claim
                    .give_up(req, Notice::Failed(Some(entry.clone())))
                    .await;
                match fallback {
                    Some(stale) if entry.status.is_server_error() => Fill::Shared {
                        entry: stale,
                        source: Source::Stale,
                    },
                    _ => Fill::Shared {
                        entry,
                        source: Source::Upstream { stored: false },
                    },
                }
            }
            Ok(Verdict::Private(answer)) => {
                claim.give_up(req, Notice::Uncacheable).await;
                self.marks.insert(req.key, route.uncacheable_ttl);
                Fill::Private(Arc::new(answer))
            }
            Ok(Verdict::Oversized(streaming)) => {
                tracing::info!(route = %route.name, limit = route.max_entry_size, "answer larger than max_entry_size: streamed, not stored");
                claim.give_up(req, Notice::Uncacheable).await;
                self.marks.insert(req.key, route.uncacheable_ttl);
                Fill::Streamed(Arc::new(Mutex::new(Some(streaming))))
            }
            Err(err) => {
                let answer = Arc::new(error_entry(
                    err.status(),
                    crate::answer::fill_error_kind(&err),
                ));
                claim.give_up(req, Notice::Failed(Some(answer))).await;
                match fallback {
                    Some(stale) => Fill::Shared {
                        entry: stale,
                        source: Source::Stale,
                    },
                    None => Fill::Failed(err),
                }
            }
        }
    }

    /// A slot under the route's cap on concurrent upstream calls, waited for at most
    /// `upstream_timeout`. `Ok(None)`: the route has no cap.
    pub async fn upstream_slot(
        &self,
        route: &RouteConfig,
    ) -> Result<Option<OwnedSemaphorePermit>, FillError> {
        let Some(limit) = self.limits.get(&route.name) else {
            return Ok(None);
        };
        match tokio::time::timeout(route.upstream_timeout, limit.clone().acquire_owned()).await {
            Ok(Ok(permit)) => Ok(Some(permit)),
            _ => Err(FillError::Overloaded {
                route: route.name.clone(),
                limit: route.upstream_concurrency.unwrap_or_default(),
            }),
        }
    }

    /// Calls the upstream for a fill, under the route's cap. The lock's watchdog clock starts
    /// once the slot is had, so a wait for the slot cannot eat the lease of the call itself.
    ///
    /// With `stale` (the entry a refresh renews, or one standing in for a failed fill) that has
    /// validators, the request is conditional, and a `304` renews `stale` without a body (RFC
    /// 9111 §4.3.4); a `304` that does not match it is followed by an unconditional request.
    async fn call_upstream(
        &self,
        req: &FillRequest,
        lock: Option<&FillLock>,
        stale: Option<&Entry>,
    ) -> Result<Verdict, FillError> {
        let route = &req.route;
        let slot = self.upstream_slot(route).await?;
        if let Some(lock) = lock {
            lock.calling();
        }
        let mut upstream_req = crate::upstream::fill_request(
            &req.parts,
            Either::Left(Full::new(req.body.clone())),
            route,
        );
        let conditional = stale.is_some_and(|e| make_conditional(&mut upstream_req, e));
        let started = Instant::now();
        let fetched = self
            .client
            .fetch(
                upstream_req,
                &route.upstream,
                route.upstream_timeout,
                route.max_entry_size,
            )
            .await;
        let took = started.elapsed();
        let status = match &fetched {
            Ok(Fetched::Whole(answer)) => Some(answer.status.as_u16()),
            Ok(Fetched::Oversized { parts, .. }) => Some(parts.status.as_u16()),
            Err(_) => None,
        };
        self.metrics.upstream_call(&route.name, status, took);
        let fetched = fetched.map_err(|err| {
            tracing::warn!(route = %route.name, %err, "upstream call failed");
            FillError::Upstream(Arc::new(err))
        })?;
        let fill_ms = u32::try_from(took.as_millis()).unwrap_or(u32::MAX);
        Ok(match fetched {
            Fetched::Whole(answer) if conditional && is_not_modified(answer.status) => {
                match stale.and_then(|e| renewed(route, e, &answer.headers, fill_ms)) {
                    Some(verdict) => verdict,
                    None => {
                        drop(slot);
                        return Box::pin(self.call_upstream(req, lock, None)).await;
                    }
                }
            }
            Fetched::Whole(answer) => judge(route, answer, fill_ms),
            Fetched::Oversized {
                parts,
                prefix,
                rest,
            } => Verdict::Oversized(Response::from_parts(
                parts,
                ProxyBody::prefixed(prefix, rest, slot),
            )),
        })
    }
}

impl Claim<'_> {
    /// Stores a storable entry: under the lock (which the store releases, waking the waiters), or
    /// plainly.
    /// `false` when a purge of the key came while the fill ran (the entry must not be kept
    /// in L1 either).
    async fn store(self, req: &FillRequest, entry: &Entry) -> bool {
        let route = &req.route.name;
        match self {
            Claim::Fleet(held) => {
                let (l2, names) = (held.l2().clone(), held.names().clone());
                match held.store(entry).await {
                    Ok(StoreOutcome::Purged) => {
                        tracing::info!(%route, "a purge came while this fill ran: not stored");
                        return false;
                    }
                    Ok(outcome) => {
                        tracing::debug!(%route, ?outcome, "filled");
                        if outcome != StoreOutcome::Superseded {
                            l2.index_tags(&names, entry).await;
                        }
                    }
                    Err(err) => tracing::warn!(%route, %err, "could not store the fill in redis"),
                }
            }
            Claim::Instance(Some((l2, names))) => match l2.put(names, entry).await {
                Ok(()) => l2.index_tags(names, entry).await,
                Err(err) => tracing::warn!(%route, %err, "could not store the fill in redis"),
            },
            Claim::Instance(None) => {}
        }
        true
    }

    /// Ends a claim that stored nothing, telling the fleet's waiters why.
    async fn give_up(self, req: &FillRequest, notice: Notice) {
        if let Claim::Fleet(held) = self
            && let Err(err) = held.release(Some(notice), req.route.uncacheable_ttl).await
        {
            tracing::warn!(route = %req.route.name, %err, "could not release fill lock; it lapses with its lease");
        }
    }
}

/// Releases a lock that turned out not to be needed: its filler already told the waiters.
pub(crate) async fn quiet_release(req: &FillRequest, held: FillLock) {
    if let Err(err) = held.release(None, Duration::ZERO).await {
        tracing::warn!(route = %req.route.name, %err, "could not release fill lock; it lapses with its lease");
    }
}
