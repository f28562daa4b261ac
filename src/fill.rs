//! Fills: computing an entry by calling the upstream, then writing L2, then L1 — and, across the
//! fleet, making sure only one instance does so per key while the others wait for its notice.
//!
//! A fill runs inside an in-process flight (see [`crate::flight`]), so at most one fill per key runs
//! in each process. With a fleet lock, the flight then:
//! 1. reads L2 (entry and uncacheable marker): fresh → done; stale within `stale_while_revalidate`
//!    → answered stale (the caller starts one refresh); stale within `stale_if_error` → kept as the
//!    fallback should this fill fail;
//! 2. tries the fill lock — got it: re-reads L2, calls the upstream, stores under the lock (the store
//!    releases the lock and PUBLISHes `stored`); a failed or unshareable answer releases the lock at
//!    once with a notice that carries what the waiters need;
//! 3. lock held elsewhere: subscribes to the key's channel, re-checks entry, marker and the lock's
//!    remaining lease in one round trip, then waits for a notice, the lease's lapse (then back to 2)
//!    or `wait_timeout`.
//!
//! Redis faults never fail a request: the flight falls back to filling for this instance alone
//! (at most one upstream call per instance per key), logged as degraded.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::request::Parts;
use http::{Response, StatusCode};
use http_body_util::{Either, Full};
use tokio::sync::{Semaphore, SemaphorePermit};

use crate::body::ProxyBody;
use crate::config::{Config, LockScope, OnWaitTimeout, RouteConfig};
use crate::entry::{Directives, Entry, Freshness, Lifetime, now_ms};
use crate::key::CacheKey;
use crate::l1::{L1, PassMarks};
use crate::l2::{KeyNames, L2, Lookup, Notice, Peek, StoreOutcome};
use crate::lock::FillLock;
use crate::metrics::{LockOutcome, Metrics};
use crate::notice::{Notices, Wake};
use crate::upstream::{Buffered, Fetched, UpstreamClient, UpstreamError};

/// Slack added to a lock's remaining lease before competing again, so the lock has surely lapsed.
const LAPSE_MARGIN: Duration = Duration::from_millis(5);

/// The Redis side of a fleet: the store and the notice hub.
#[derive(Clone)]
pub struct Fleet {
    pub l2: L2,
    pub notices: Notices,
}

/// Everything a fill needs from the request that started it.
#[derive(Clone)]
pub struct FillRequest {
    pub route: Arc<RouteConfig>,
    pub key: CacheKey,
    pub parts: Parts,
    pub body: Bytes,
    pub peer: SocketAddr,
}

/// Where a shared entry came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
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

/// What the upstream's answer allows.
enum Verdict {
    /// May be stored and shared.
    Store(Entry),
    /// May be shared with this fill's waiters but not stored (status not cached, zero lifetime).
    Share(Entry),
    /// Only for the requester: `Set-Cookie`, `private`, `no-store`, `no-cache`.
    Private(Buffered),
    /// Larger than `max_entry_size`: streamed to the requester, never stored.
    Oversized(Response<ProxyBody>),
}

/// How this flight may fill: under the fleet lock, or for this instance alone (writing L2
/// plainly when there is one to write).
enum Claim<'a> {
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
    metrics: Arc<Metrics>,
}

fn caps(config: &Config) -> HashMap<String, usize> {
    config
        .routes
        .iter()
        .filter_map(|r| Some((r.name.clone(), r.upstream_concurrency?)))
        .collect()
}

/// What a fleet flight did with the lock, for the metrics.
#[derive(Default)]
struct LockTrace {
    acquired: bool,
    waited: bool,
    timed_out: bool,
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
            client: UpstreamClient::new(),
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
    /// cancelled when requesters go away; a held lock is released on drop.
    pub async fn fill(&self, req: FillRequest) -> Fill {
        let Some(fleet) = &self.fleet else {
            return self.fill_with(&req, Claim::Instance(None), None).await;
        };
        let names = Arc::new(fleet.l2.names(&req.route.name, &req.key));
        if req.route.lock.scope == LockScope::Fleet {
            return self.fill_fleet(&req, fleet, &names).await;
        }
        let fallback = match fleet.l2.get(&names).await {
            Ok(peek) => match self.settled(&req, peek, Source::L2).await {
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

    /// A background refresh of an entry stored at `known`: if L2 already holds a newer one, it is
    /// copied into L1; else the fill lock is taken without waiting and the upstream called. If
    /// someone else holds the lock, nobody here calls the upstream: the refresh waits for that
    /// fill's notice (at most the rest of its lease) and copies its entry into L1.
    pub async fn refresh(&self, req: FillRequest, known: u64) -> Fill {
        let Some(fleet) = &self.fleet else {
            return self.fill_with(&req, Claim::Instance(None), None).await;
        };
        let route = &req.route;
        let names = Arc::new(fleet.l2.names(&route.name, &req.key));
        if route.lock.scope != LockScope::Fleet {
            let claim = Claim::Instance(Some((&fleet.l2, &names)));
            return self.fill_with(&req, claim, None).await;
        }
        let newer = |entry: &Entry| {
            entry.times.stored_at > known && entry.times.freshness(now_ms()) == Freshness::Fresh
        };
        if let Ok(Peek {
            entry: Some(entry), ..
        }) = fleet.l2.get(&names).await
            && newer(&entry)
        {
            return self.shared(&req, entry, Source::L2).await;
        }
        let lease = route.lock.lease;
        match FillLock::try_acquire(&fleet.l2, &names, lease, route.upstream_timeout).await {
            Ok(Some(held)) => self.fill_with(&req, Claim::Fleet(held), None).await,
            Ok(None) => {
                let Ok(mut sub) = fleet.notices.subscribe(&names.channel).await else {
                    return Fill::FetchYourself;
                };
                let Ok(peek) = fleet.l2.peek(&names).await else {
                    return Fill::FetchYourself;
                };
                if let Some(entry) = peek.entry.filter(|e| newer(e)) {
                    return self.shared(&req, entry, Source::Remote).await;
                }
                let Some(ttl) = peek.lock_ttl else {
                    return Fill::FetchYourself;
                };
                let woken = tokio::time::timeout(ttl + LAPSE_MARGIN, sub.next()).await;
                let refreshed = match woken {
                    Ok(Some(Wake::Notice(Notice::Stored(Some(entry))))) => Some(entry),
                    Ok(Some(Wake::Notice(Notice::Stored(None)))) => {
                        match fleet.l2.get(&names).await {
                            Ok(peek) => peek.entry.map(Arc::new),
                            Err(_) => None,
                        }
                    }
                    _ => None,
                };
                match refreshed.filter(|e| newer(e)) {
                    Some(entry) => {
                        self.l1.insert(req.key, &route.name, entry.clone()).await;
                        Fill::Shared {
                            entry,
                            source: Source::Remote,
                        }
                    }
                    None => Fill::FetchYourself,
                }
            }
            Err(err) => {
                tracing::warn!(route = %route.name, %err, "redis unavailable; refreshing for this instance only (degraded)");
                self.fill_with(&req, Claim::Instance(None), None).await
            }
        }
    }

    /// What an L2 read settles: `Ok` with the flight's result, or `Err` with the stale entry (if
    /// any) to fall back on while filling.
    async fn settled(
        &self,
        req: &FillRequest,
        peek: Peek,
        fresh_source: Source,
    ) -> Result<Fill, Option<Arc<Entry>>> {
        if peek.uncacheable {
            self.marks.insert(req.key, req.route.uncacheable_ttl);
            return Ok(Fill::FetchYourself);
        }
        let Some(entry) = peek.entry else {
            return Err(None);
        };
        match entry.times.freshness(now_ms()) {
            Freshness::Fresh => Ok(self.shared(req, entry, fresh_source).await),
            Freshness::StaleRevalidate => Ok(self.shared(req, entry, Source::Stale).await),
            Freshness::StaleIfError => Err(Some(Arc::new(entry))),
            Freshness::Expired => Err(None),
        }
    }

    async fn fill_fleet(&self, req: &FillRequest, fleet: &Fleet, names: &Arc<KeyNames>) -> Fill {
        let started = Instant::now();
        let mut trace = LockTrace::default();
        let fill = self.coalesce(req, fleet, names, &mut trace).await;
        let outcome = match trace {
            LockTrace {
                timed_out: true, ..
            } => Some(LockOutcome::WaitTimeout),
            LockTrace {
                acquired: true,
                waited: false,
                ..
            } => Some(LockOutcome::Acquired),
            LockTrace {
                acquired: true,
                waited: true,
                ..
            } => Some(LockOutcome::TookOver),
            LockTrace { waited: true, .. } => Some(LockOutcome::Waited),
            // Redis failed before any lock decision: degraded, nothing to count.
            LockTrace { .. } => None,
        };
        if let Some(outcome) = outcome {
            let waited = trace.waited.then(|| started.elapsed());
            self.metrics.lock(&req.route.name, outcome, waited);
        }
        fill
    }

    /// The fleet flight proper: look, and take the lock if it is free, in one round trip; else
    /// wait for its holder's notice, competing again when the lease lapses or the fill fails.
    async fn coalesce(
        &self,
        req: &FillRequest,
        fleet: &Fleet,
        names: &Arc<KeyNames>,
        trace: &mut LockTrace,
    ) -> Fill {
        let route = &req.route;
        let lock = &route.lock;
        let deadline = tokio::time::Instant::now() + lock.wait_timeout;
        let degraded = |err: &dyn std::fmt::Display| {
            tracing::warn!(route = %route.name, %err, "redis unavailable; filling for this instance only (degraded)");
        };
        let token = FillLock::new_token();
        let first = match fleet.l2.lookup(names, &token, lock.lease).await {
            Ok(first) => first,
            Err(err) => {
                degraded(&err);
                return self.fill_with(req, Claim::Instance(None), None).await;
            }
        };
        let mut fallback = None;
        // Whether the lock is known to be held elsewhere (so the next step is to wait, not compete).
        let mut held_elsewhere = match first {
            Lookup::Locked => {
                trace.acquired = true;
                let held =
                    FillLock::adopt(&fleet.l2, names, token, lock.lease, route.upstream_timeout);
                return self.fill_with(req, Claim::Fleet(held), None).await;
            }
            Lookup::Held => true,
            Lookup::Uncacheable => {
                self.marks.insert(req.key, route.uncacheable_ttl);
                return Fill::FetchYourself;
            }
            Lookup::Garbled => false,
            Lookup::Entry(entry) => {
                let peek = Peek {
                    entry: Some(entry),
                    ..Peek::default()
                };
                match self.settled(req, peek, Source::L2).await {
                    Ok(fill) => return fill,
                    Err(stale) => {
                        fallback = stale;
                        false
                    }
                }
            }
        };
        'compete: loop {
            if std::mem::take(&mut held_elsewhere) {
                // Straight to waiting: the lookup saw the lock held.
            } else if tokio::time::Instant::now() >= deadline {
                trace.timed_out = true;
                return self.wait_timed_out(req, fallback).await;
            } else {
                let acquired =
                    FillLock::try_acquire(&fleet.l2, names, lock.lease, route.upstream_timeout);
                match acquired.await {
                    Ok(Some(held)) => {
                        trace.acquired = true;
                        // Someone may have filled between our last look and the lock.
                        let filled = fleet.l2.get(names).await.ok().and_then(|peek| peek.entry);
                        if let Some(entry) =
                            filled.filter(|e| e.times.freshness(now_ms()) == Freshness::Fresh)
                        {
                            quiet_release(req, held).await;
                            return self.shared(req, entry, Source::L2).await;
                        }
                        return self.fill_with(req, Claim::Fleet(held), fallback).await;
                    }
                    Ok(None) => {}
                    Err(err) => {
                        degraded(&err);
                        return self.fill_with(req, Claim::Instance(None), fallback).await;
                    }
                }
            }
            // Held elsewhere: subscribe first, then re-check, then wait.
            trace.waited = true;
            let mut sub = match fleet.notices.subscribe(&names.channel).await {
                Ok(sub) => sub,
                Err(err) => {
                    degraded(&err);
                    return self.fill_with(req, Claim::Instance(None), fallback).await;
                }
            };
            loop {
                let peek = match fleet.l2.peek(names).await {
                    Ok(peek) => peek,
                    Err(err) => {
                        degraded(&err);
                        return self.fill_with(req, Claim::Instance(None), fallback).await;
                    }
                };
                let lock_ttl = peek.lock_ttl;
                if let Ok(fill) = self.settled(req, peek, Source::Remote).await {
                    return fill;
                }
                // The lock went away without a fresh entry: compete again now.
                let Some(ttl) = lock_ttl else {
                    continue 'compete;
                };
                let wake = tokio::select! {
                    wake = sub.next() => wake,
                    () = tokio::time::sleep(ttl + LAPSE_MARGIN) => continue 'compete,
                    () = tokio::time::sleep_until(deadline) => continue 'compete,
                };
                match wake {
                    Some(Wake::Notice(Notice::Stored(Some(entry)))) => {
                        self.l1.insert(req.key, &route.name, entry.clone()).await;
                        return Fill::Shared {
                            entry,
                            source: Source::Remote,
                        };
                    }
                    Some(Wake::Notice(Notice::Stored(None))) => match fleet.l2.get(names).await {
                        Ok(peek) => match self.settled(req, peek, Source::Remote).await {
                            Ok(fill) => return fill,
                            Err(_) => continue 'compete,
                        },
                        Err(err) => {
                            degraded(&err);
                            return self.fill_with(req, Claim::Instance(None), fallback).await;
                        }
                    },
                    Some(Wake::Notice(Notice::Failed(answer))) => {
                        let failed = answer.as_ref().is_none_or(|e| e.status.is_server_error());
                        match (&fallback, answer) {
                            (Some(stale), _) if failed => {
                                return Fill::Shared {
                                    entry: stale.clone(),
                                    source: Source::Stale,
                                };
                            }
                            (_, Some(entry)) => {
                                return Fill::Shared {
                                    entry,
                                    source: Source::Remote,
                                };
                            }
                            // Nothing to share (too large for a notice): compete again.
                            (_, None) => continue 'compete,
                        }
                    }
                    Some(Wake::Notice(Notice::Uncacheable)) => {
                        self.marks.insert(req.key, route.uncacheable_ttl);
                        return Fill::FetchYourself;
                    }
                    // Notices may have been lost: confirm the subscription, then re-check.
                    Some(Wake::Resync) => {
                        if let Err(err) = sub.confirm().await {
                            degraded(&err);
                            return self.fill_with(req, Claim::Instance(None), fallback).await;
                        }
                    }
                    None => continue 'compete,
                }
            }
        }
    }

    async fn wait_timed_out(&self, req: &FillRequest, fallback: Option<Arc<Entry>>) -> Fill {
        let waited = req.route.lock.wait_timeout;
        tracing::warn!(route = %req.route.name, ?waited, policy = ?req.route.lock.on_wait_timeout, "gave up waiting for another instance's fill");
        match (req.route.lock.on_wait_timeout, fallback) {
            (_, Some(stale)) => Fill::Shared {
                entry: stale,
                source: Source::Stale,
            },
            // One call for this instance's waiters, not one per waiter.
            (OnWaitTimeout::Bypass, None) => self.fill_with(req, Claim::Instance(None), None).await,
            (OnWaitTimeout::GatewayTimeout, None) => Fill::Failed(FillError::WaitTimeout(waited)),
        }
    }

    /// Calls the upstream and ends the claim according to what it answered.
    async fn fill_with(
        &self,
        req: &FillRequest,
        claim: Claim<'_>,
        fallback: Option<Arc<Entry>>,
    ) -> Fill {
        let route = &req.route;
        match self.call_upstream(req).await {
            Ok(Verdict::Store(entry)) => {
                let entry = Arc::new(entry);
                claim.store(req, &entry).await;
                self.l1.insert(req.key, &route.name, entry.clone()).await;
                Fill::Shared {
                    entry,
                    source: Source::Upstream { stored: true },
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
                let answer = Arc::new(error_entry(err.status(), &err.to_string()));
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

    /// An entry read from L2: copied into L1 for its remaining life.
    async fn shared(&self, req: &FillRequest, entry: Entry, source: Source) -> Fill {
        let entry = Arc::new(entry);
        self.l1
            .insert(req.key, &req.route.name, entry.clone())
            .await;
        Fill::Shared { entry, source }
    }

    /// A slot under the route's cap on concurrent upstream calls, waited for at most
    /// `upstream_timeout`. `Ok(None)`: the route has no cap.
    pub async fn upstream_slot(
        &self,
        route: &RouteConfig,
    ) -> Result<Option<SemaphorePermit<'_>>, FillError> {
        let Some(limit) = self.limits.get(&route.name) else {
            return Ok(None);
        };
        match tokio::time::timeout(route.upstream_timeout, limit.acquire()).await {
            Ok(Ok(permit)) => Ok(Some(permit)),
            _ => Err(FillError::Overloaded {
                route: route.name.clone(),
                limit: route.upstream_concurrency.unwrap_or_default(),
            }),
        }
    }

    async fn call_upstream(&self, req: &FillRequest) -> Result<Verdict, FillError> {
        let route = &req.route;
        let _slot = self.upstream_slot(route).await?;
        let upstream_req = crate::upstream::rewrite(
            &req.parts,
            Either::Left(Full::new(req.body.clone())),
            &route.upstream,
            req.peer,
        );
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
            Fetched::Whole(answer) => judge(route, answer, fill_ms),
            Fetched::Oversized {
                parts,
                prefix,
                rest,
            } => Verdict::Oversized(Response::from_parts(
                parts,
                ProxyBody::Prefixed {
                    prefix: Some(prefix),
                    rest,
                },
            )),
        })
    }
}

impl Claim<'_> {
    /// Stores a storable entry: under the lock (which the store releases, waking the waiters), or
    /// plainly.
    async fn store(self, req: &FillRequest, entry: &Entry) {
        let route = &req.route.name;
        match self {
            Claim::Fleet(held) => {
                let (l2, names) = (held.l2().clone(), held.names().clone());
                match held.store(entry).await {
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
async fn quiet_release(req: &FillRequest, held: FillLock) {
    if let Err(err) = held.release(None, Duration::ZERO).await {
        tracing::warn!(route = %req.route.name, %err, "could not release fill lock; it lapses with its lease");
    }
}

/// The answer standing for a fill that got none (connection error, timeout), shared with the
/// waiters so they do not each try again.
pub fn error_entry(status: StatusCode, message: &str) -> Entry {
    let mut headers = HeaderMap::new();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    let now = now_ms();
    Entry {
        status,
        headers,
        body: Bytes::from(format!("{message}\n")),
        times: Lifetime {
            stored_at: now,
            fresh_until: now,
            swr_until: now,
            sie_until: now,
        },
        fill_ms: 0,
        tags: Vec::new(),
    }
}

/// Decides what an upstream answer allows, and computes its lifetime: `s-maxage`, else `max-age`,
/// else the route's `ttl` (`error_ttl` for a listed error status); the stale windows from the
/// header, else the route's.
fn judge(route: &RouteConfig, answer: Buffered, fill_ms: u32) -> Verdict {
    let directives = Directives::from_headers(&answer.headers);
    if answer.headers.contains_key(header::SET_COOKIE) || !directives.storable() {
        return Verdict::Private(answer);
    }
    let now = now_ms();
    let secs = |s: u64| s.saturating_mul(1000);
    let default_ttl = if answer.status.as_u16() >= 400 {
        route.error_ttl
    } else {
        route.ttl
    };
    let fresh = directives
        .s_maxage
        .or(directives.max_age)
        .map_or(millis(default_ttl), secs);
    let swr = directives
        .stale_while_revalidate
        .map_or(millis(route.stale_while_revalidate), secs);
    let sie = directives
        .stale_if_error
        .map_or(millis(route.stale_if_error), secs);
    let fresh_until = now.saturating_add(fresh);
    let times = Lifetime {
        stored_at: now,
        fresh_until,
        swr_until: fresh_until.saturating_add(swr),
        sie_until: fresh_until.saturating_add(sie),
    };
    let storable_status = route.cache_statuses.contains(&answer.status.as_u16());
    let tags = surrogate_keys(&answer.headers);
    let headers = compact(&answer.headers);
    let entry = Entry {
        status: answer.status,
        headers,
        body: answer.body,
        times,
        fill_ms,
        tags,
    };
    // Worth storing while any of it can still be served: fresh, or stale within a window.
    if storable_status && entry.times.stale_until() > now {
        Verdict::Store(entry)
    } else {
        Verdict::Share(entry)
    }
}

/// The headers an entry keeps, in allocations of their own. hyper hands out header values as slices
/// of its connection read buffer: kept as they are, each cached entry would pin that whole buffer
/// (measured: ~11 KiB of memory per 2 KiB entry, far past the L1 byte budget).
fn compact(headers: &HeaderMap) -> HeaderMap {
    let mut kept = HeaderMap::with_capacity(headers.len());
    for (name, value) in headers {
        if name == header::AGE {
            continue;
        }
        let mut owned = HeaderValue::from_bytes(value.as_bytes()).unwrap_or_else(|_| value.clone());
        owned.set_sensitive(value.is_sensitive());
        kept.append(name.clone(), owned);
    }
    kept
}

/// Tags from `Surrogate-Key` (space-separated) and `Cache-Tag` (comma-separated).
fn surrogate_keys(headers: &HeaderMap) -> Vec<String> {
    let spaced = headers
        .get_all("surrogate-key")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split_ascii_whitespace());
    let commas = headers
        .get_all("cache-tag")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim);
    let mut tags: Vec<String> = spaced
        .chain(commas)
        .filter(|t| !t.is_empty())
        .map(str::to_owned)
        .collect();
    tags.sort();
    tags.dedup();
    tags
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_headers_do_not_pin_the_connection_buffer() {
        let read_buffer = Bytes::from(vec![b'x'; 8192]);
        let mut headers = HeaderMap::new();
        let shared = HeaderValue::from_maybe_shared(read_buffer.slice(0..16));
        headers.insert(
            header::CONTENT_TYPE,
            shared.unwrap_or(HeaderValue::from_static("x")),
        );
        headers.insert(header::AGE, HeaderValue::from_static("5"));
        let kept = compact(&headers);
        let range = read_buffer.as_ptr_range();
        for value in kept.values() {
            assert!(
                !range.contains(&value.as_bytes().as_ptr()),
                "still a slice of the buffer"
            );
        }
        assert_eq!(kept.len(), 1, "Age is not kept");
        assert_eq!(kept[header::CONTENT_TYPE].as_bytes(), &[b'x'; 16]);
    }
}
