//! Fills: calling the upstream for a key, then ending the claim by what the answer allows.
//!
//! A fill is where [`crate::coalesce`] sends the one flight in the fleet that may call the
//! upstream for a key (or, with Redis down, the one flight in this process). `Filler::fill`
//! calls the upstream under the route's cap and ends its `Claim` by the [`crate::verdict`]: a
//! store that releases the fill lock and publishes `stored` with the entry; or a release at once
//! with a notice that carries what the waiters need (`failed` with the answer, `uncacheable`).
//! Then the entry goes into L1. A purge that came while the upstream answered wins: the answer goes
//! to this flight's requesters only.
//!
//! This module also holds what a flight hands its joiners: the [`Fill`] and why it may have
//! failed ([`FillError`]).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::request::Parts;
use http::{Response, StatusCode};
use http_body_util::{Either, Full};

use crate::body::ProxyBody;
use crate::caps::{Caps, Overloaded};
use crate::config::RouteConfig;
use crate::entry::{Entry, error_entry};
use crate::fleet::{FillLock, Notice};
use crate::flight::Hold;
use crate::handles::Handles;
use crate::key::CacheKey;
use crate::relay::Relay;
use crate::revalidate::{is_not_modified, make_conditional, renewed};
use crate::upstream::{Buffered, Fetched, Headed, UpstreamError, endpoints};
use crate::verdict::{Verdict, judge};

mod claim;
mod publish;
mod stream;

pub(crate) use claim::Claim;

use stream::Streaming;
pub use stream::{RELAY_WINDOW, declared_length};

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
    /// The flight this request started, kept joinable while its answer streams (see
    /// [`crate::flight::Hold`]); `None` outside a flight.
    pub hold: Option<Hold>,
    /// How many requests the fill would answer: its place in a fleet budget's queue.
    pub weight: crate::budget::Weight,
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
    /// This flight's conditional call got a `304`: the entry it held was renewed and stored.
    Revalidated,
    /// Another instance's fill, waited for.
    Remote,
    /// A stale entry: within `stale_while_revalidate`, or standing in for a failed fill.
    Stale,
}

/// What the upstream gave a fill: a whole answer, or a `304` to its conditional request, which
/// renewed the entry the request was conditional on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Answered {
    Whole,
    NotModified,
}

/// What a call to the upstream came to: a verdict on a whole answer, or a storable head whose
/// body is still to stream.
enum Called {
    Judged(Verdict, Answered),
    Streaming(Streaming),
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
    /// themselves (an answer whose head is not for sharing).
    Streamed(Arc<StreamSlot>),
    /// A storable answer whose body is still arriving: every joiner reads it from the relay
    /// while it arrives; the fill stores it once it has arrived whole (see [`crate::relay`]).
    Streaming {
        head: Arc<Entry>,
        relay: Arc<Relay>,
        /// `Upstream` when this flight fills; `Remote` when it tails another instance's fill.
        source: Source,
    },
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
    #[error(transparent)]
    Overloaded(#[from] Overloaded),
    #[error("the streamed answer was cut short: {0}")]
    Cut(Arc<str>),
}

impl FillError {
    pub fn status(&self) -> StatusCode {
        match self {
            FillError::Upstream(err) if matches!(**err, UpstreamError::Timeout { .. }) => {
                StatusCode::GATEWAY_TIMEOUT
            }
            FillError::WaitTimeout(_) => StatusCode::GATEWAY_TIMEOUT,
            FillError::Overloaded(_) => StatusCode::SERVICE_UNAVAILABLE,
            FillError::Upstream(_) | FillError::Cut(_) => StatusCode::BAD_GATEWAY,
        }
    }

    /// The failure's kind, for the `corral-error` header: what a client may know of it.
    pub fn kind(&self) -> &'static str {
        match self {
            FillError::Upstream(err) => err.kind(),
            FillError::WaitTimeout(_) => "wait-timeout",
            FillError::Overloaded(_) => "upstream-overloaded",
            FillError::Cut(_) => "upstream-cut",
        }
    }
}

/// What a fill needs: the process's handles (the upstream client, L1 and the marks of keys that
/// cannot be shared, the metrics) and the configuration's per-route caps. Cloning shares them.
#[derive(Clone)]
pub struct Filler {
    handles: Arc<Handles>,
    caps: Arc<Caps>,
}

impl Filler {
    pub fn new(handles: Arc<Handles>, caps: Arc<Caps>) -> Filler {
        Filler { handles, caps }
    }

    /// Calls the upstream and ends the claim according to what it answered; `fallback` is a
    /// stale entry that stands in if the upstream fails (and, with a validator, makes the call
    /// conditional). Cancel safety: runs in a flight's own task; a held lock dropped mid-way is
    /// released with a `failed` notice (see [`FillLock`]).
    pub(crate) async fn fill(
        &self,
        req: &FillRequest,
        claim: Claim,
        fallback: Option<Arc<Entry>>,
    ) -> Fill {
        let span = crate::trace::fill_span(&req.route.name, &req.key);
        if span.is_disabled() {
            return self.fill_traced(req, claim, fallback).await;
        }
        let fill = self.fill_traced(req, claim, fallback);
        tracing::Instrument::instrument(fill, span).await
    }

    /// [`Filler::fill`] within the fill's span.
    async fn fill_traced(
        &self,
        req: &FillRequest,
        claim: Claim,
        fallback: Option<Arc<Entry>>,
    ) -> Fill {
        let route = &req.route;
        let lock = match &claim {
            Claim::Fleet(held) => Some(held),
            Claim::Instance(_) => None,
        };
        // A purge applied after this point covers what the upstream is about to answer.
        let began = self.handles.l1().fence().mark();
        let validators = fallback.as_deref().or(req.validators.as_deref());
        let called = match self.call_upstream(req, lock, validators).await {
            Ok(Called::Streaming(mut streaming)) => {
                tag_path(req, &mut streaming.head);
                return self.stream(req, claim, streaming, began);
            }
            Ok(Called::Judged(verdict, answered)) => Ok((verdict, answered)),
            Err(err) => Err(err),
        };
        match called {
            Ok((Verdict::Store(mut entry), answered)) => {
                tag_path(req, &mut entry);
                let entry = Arc::new(entry);
                let stored = self.store(req, claim, &entry, began).await;
                let source = match answered {
                    Answered::NotModified if stored => Source::Revalidated,
                    _ => Source::Upstream { stored },
                };
                Fill::Shared { entry, source }
            }
            Ok((Verdict::Share(entry), _)) => {
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
            Ok((Verdict::Private(answer), _)) => {
                claim.give_up(req, Notice::Uncacheable).await;
                self.handles.marks().insert(req.key, route.uncacheable_ttl);
                Fill::Private(Arc::new(answer))
            }
            Ok((Verdict::Oversized(streaming), _)) => {
                tracing::info!(route = %route.name, limit = route.max_entry_size, "answer larger than max_entry_size: streamed, not stored");
                claim.give_up(req, Notice::Uncacheable).await;
                self.handles.marks().insert(req.key, route.uncacheable_ttl);
                Fill::Streamed(Arc::new(Mutex::new(Some(streaming))))
            }
            Err(err) => {
                let answer = Arc::new(error_entry(err.status(), err.kind()));
                claim.give_up(req, Notice::Failed(Some(answer))).await;
                match fallback {
                    Some(stale) => {
                        if let FillError::Overloaded(Overloaded {
                            budget: Some(_), ..
                        }) = &err
                        {
                            self.handles.metrics().budget_stale_answer(&route.name);
                        }
                        Fill::Shared {
                            entry: stale,
                            source: Source::Stale,
                        }
                    }
                    None => Fill::Failed(err),
                }
            }
        }
    }

    /// Stores what a fill got, unless a purge came since `began` (then its answer goes to this
    /// flight's requesters only and the waiters elsewhere fill again). `true` when stored.
    async fn store(&self, req: &FillRequest, claim: Claim, entry: &Arc<Entry>, began: u64) -> bool {
        let route = &req.route;
        if self
            .handles
            .l1()
            .fence()
            .purged_since(began, &route.name, &req.key, &entry.tags)
        {
            tracing::info!(route = %route.name, "a purge came while this fill ran: its answer goes to its own requests only");
            claim.give_up(req, Notice::Failed(None)).await;
            return false;
        }
        let stored = claim.store(req, entry).await;
        if stored {
            let (path, status) = (req.parts.uri.path(), entry.status.as_u16());
            tracing::info!(route = %route.name, path, status, fill_ms = entry.fill_ms, bytes = entry.body.len(), "fill stored");
            self.handles
                .l1()
                .insert(req.key, &route.name, entry.clone())
                .await;
        }
        stored
    }

    /// Calls the upstream for a fill, under the route's cap. The lock's watchdog clock starts
    /// once the slot is had, so a wait for the slot cannot eat the lease of the call itself.
    ///
    /// A head that the verdict would store comes back at once with its body still streaming
    /// ([`Called::Streaming`]); any other answer is read whole (up to `max_entry_size`) first.
    ///
    /// With `stale` (the entry a refresh renews, or one standing in for a failed fill) that has
    /// validators, the request is conditional, and a `304` renews `stale` without a body (RFC
    /// 9111 §4.3.4); a `304` that does not match it is followed by an unconditional request.
    async fn call_upstream(
        &self,
        req: &FillRequest,
        lock: Option<&FillLock>,
        stale: Option<&Entry>,
    ) -> Result<Called, FillError> {
        let route = &req.route;
        let slot = self.caps.slot(route, &req.weight).await?;
        if let Some(lock) = lock {
            lock.calling();
        }
        let span = tracing::Span::current();
        // A route with several endpoints: a failure (no answer, or a 5xx) on one is tried on the
        // next before the fill fails its waiters, each try under `upstream_timeout`.
        let endpoints = self.caps.endpoints(route);
        let mut tried = Vec::new();
        let (fetched, conditional, took) = loop {
            let picked = endpoints.as_deref().and_then(|set| set.pick_except(&tried));
            let upstream = picked.map_or(&route.upstream, |(_, uri)| uri);
            let mut upstream_req = crate::upstream::fill_request_to(
                &req.parts,
                Either::Left(Full::new(req.body.clone())),
                route,
                upstream,
            );
            let conditional = stale.is_some_and(|e| make_conditional(&mut upstream_req, e));
            crate::trace::inject(&span, upstream_req.headers_mut());
            let started = Instant::now();
            let deadline = tokio::time::Instant::now() + route.upstream_timeout;
            let headed = self
                .handles
                .client()
                .fetch_head(upstream_req, upstream, route.upstream_timeout)
                .await;
            let fetched = match headed {
                Ok(headed) => {
                    let fill_ms = u32::try_from(started.elapsed().as_millis()).unwrap_or(u32::MAX);
                    let not_modified = conditional && is_not_modified(headed.parts.status);
                    if !not_modified
                        && let Verdict::Store(head) = judge(route, headed.head(), fill_ms)
                    {
                        let status = headed.parts.status;
                        self.handles.metrics().upstream_call(
                            &route.name,
                            Some(status.as_u16()),
                            started.elapsed(),
                        );
                        span.record("upstream.status", status.as_u16());
                        if let (Some(set), Some((index, _))) = (&endpoints, picked) {
                            set.record(index, endpoints::judged(Some(status)));
                        }
                        return Ok(Called::Streaming(Streaming {
                            head,
                            body: headed.body,
                            slot,
                            started,
                            deadline,
                        }));
                    }
                    read_rest(headed, route, deadline).await
                }
                Err(err) => Err(err),
            };
            let took = started.elapsed();
            let status = match &fetched {
                Ok(Fetched::Whole(answer)) => Some(answer.status),
                Ok(Fetched::Oversized { parts, .. }) => Some(parts.status),
                Err(_) => None,
            };
            let code = status.map(|s| s.as_u16());
            self.handles
                .metrics()
                .upstream_call(&route.name, code, took);
            if let Some(code) = code {
                span.record("upstream.status", code);
            }
            let (Some(set), Some((index, _))) = (&endpoints, picked) else {
                break (fetched, conditional, took);
            };
            let call = endpoints::judged(status);
            set.record(index, call);
            tried.push(index);
            if call == endpoints::Call::Failed && tried.len() < set.len() {
                tracing::warn!(route = %route.name, endpoint = %upstream, status = code, "fill failed on this endpoint; trying the next");
                if let Some(lock) = lock {
                    lock.calling();
                }
                continue;
            }
            break (fetched, conditional, took);
        };
        let fetched = fetched.map_err(|err| {
            tracing::warn!(route = %route.name, %err, "upstream call failed");
            FillError::Upstream(Arc::new(err))
        })?;
        let fill_ms = u32::try_from(took.as_millis()).unwrap_or(u32::MAX);
        Ok(match fetched {
            Fetched::Whole(answer) if conditional && is_not_modified(answer.status) => {
                match stale.and_then(|e| renewed(route, e, &answer.headers, fill_ms)) {
                    Some(verdict) => Called::Judged(verdict, Answered::NotModified),
                    None => {
                        drop(slot);
                        return Box::pin(self.call_upstream(req, lock, None)).await;
                    }
                }
            }
            Fetched::Whole(answer) => {
                Called::Judged(judge(route, answer, fill_ms), Answered::Whole)
            }
            Fetched::Oversized {
                parts,
                prefix,
                rest,
            } => Called::Judged(
                Verdict::Oversized(Response::from_parts(
                    parts,
                    ProxyBody::prefixed(prefix, rest, slot.into_guard()),
                )),
                Answered::Whole,
            ),
        })
    }
}

/// Indexes an entry under the path prefixes it lies under, for purges by prefix.
fn tag_path(req: &FillRequest, entry: &mut Entry) {
    let path = req.parts.uri.path();
    entry
        .tags
        .extend(crate::purge::path_tags(&req.route.path_prefix, path));
}

/// Reads the rest of an answer that will not stream, by `deadline`.
async fn read_rest(
    headed: Headed,
    route: &RouteConfig,
    deadline: tokio::time::Instant,
) -> Result<Fetched, UpstreamError> {
    let read = headed.read_limited(&route.upstream, route.max_entry_size);
    tokio::time::timeout_at(deadline, read)
        .await
        .unwrap_or_else(|_| {
            Err(UpstreamError::Timeout {
                upstream: route.upstream.to_string(),
                limit: route.upstream_timeout,
            })
        })
}
