//! Coalescing: one fill per key, in this process (a flight) and across the fleet (the fill lock
//! and the wait for its notice).
//!
//! A miss that finds nothing fresh in L1 joins its key's flight ([`Coalescer::join`]); the
//! flight's task decides how the key may be filled:
//! - without Redis, or on a route whose lock scope is `instance`: from L2 when it holds the key,
//!   else by a fill for this instance alone;
//! - on a `fleet` route: by waiting with the [`crate::wait`] state machine, whose I/O loop is
//!   `coalesce/io.rs`, until it settles — fill under the lock it took, share what it found, or fill for this
//!   instance alone (Redis failed, or the wait timed out with `bypass`).
//!
//! Filling itself is [`crate::fill`]'s. A background refresh goes the same way
//! ([`Coalescer::refresh_in_background`]) and waits as a miss does, so a refresh that loses the
//! race shares the winner's fill, and a failed one keeps serving the stale entry.
//!
//! Redis faults never fail a request: the flight falls back to filling for this instance alone
//! (at most one upstream call per instance per key), logged as degraded.
//!
//! # Concurrent calls on the same key
//! Every request of this process that joins while a flight runs shares its result; a request
//! past `lock.max_waiters` is turned away ([`Crowded`]). The flight runs in a task of its own, so
//! requesters that go away do not cancel it; once all of them have, a flight that is only waiting
//! for another instance's fill stops waiting.

use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use crate::config::LockScope;
use crate::entry::{Entry, Freshness, now_ms};
use crate::fill::{Claim, Fill, FillError, FillRequest, Filler, Source};
use crate::fleet::FillLock;
use crate::fleet::Fleet;
use crate::flight::{Crowded, Flights, Interest, Joined};
use crate::handles::Handles;
use crate::key::CacheKey;
use crate::l2::{KeyNames, Peek};
use crate::metrics::LockOutcome;
use crate::wait::{Purpose, Settled, Trace};

mod io;
mod tail;

/// The flights of one process, and how each decides who fills its key.
pub struct Coalescer {
    handles: Arc<Handles>,
    filler: Filler,
    flights: Arc<Flights<Landed>>,
}

impl Coalescer {
    pub fn new(handles: Arc<Handles>, filler: Filler) -> Coalescer {
        let waiters = handles.metrics().waiters_histogram();
        Coalescer {
            handles,
            filler,
            flights: Arc::new(Flights::new(Some(waiters))),
        }
    }

    /// The same flights under a reloaded configuration's filler (its route caps): flights in
    /// progress carry on with the caps they started with.
    pub fn renewed(&self, filler: Filler) -> Coalescer {
        Coalescer {
            handles: self.handles.clone(),
            filler,
            flights: self.flights.clone(),
        }
    }

    /// Flights in progress in this process (a graceful shutdown waits for them).
    pub fn in_progress(&self) -> usize {
        self.flights.running()
    }

    /// Joins the flight for `req`'s key, starting it if there is none. Turned away when the
    /// flight already has `lock.max_waiters` followers.
    pub fn join(self: &Arc<Self>, req: &FillRequest) -> Result<Joined<Landed>, Crowded> {
        let this = self.clone();
        let mut fill_req = req.clone();
        // The flight's spans (its fill's) are children of the leader's request span.
        let parent = tracing::Span::current();
        let mark = self.handles.l1().fence().mark();
        self.flights.join(
            req.key,
            (mark, req.route.lock.max_waiters),
            move |interest, hold| {
                fill_req.hold = Some(hold);
                fill_req.weight = this.weight(&fill_req, &interest);
                let flight = async move { this.miss(fill_req, interest).await };
                Landed::from_flight(flight, parent)
            },
        )
    }

    /// Makes `joined`'s flight for `key` unjoinable (see [`Flights::retire`]).
    pub fn retire(&self, key: &CacheKey, joined: &Joined<Landed>) {
        self.flights.retire(key, joined);
    }

    /// A miss on a route that does not coalesce (`lock.scope = "none"`): no flight, no lock; L2
    /// is still read when there is one.
    pub async fn uncoalesced(&self, req: FillRequest) -> Fill {
        self.miss(req, Interest::lasting()).await
    }

    /// Starts one refresh of `req`'s key, unless a flight for it already runs in this process.
    /// Nobody awaits it; a miss that arrives meanwhile joins it.
    pub fn refresh_in_background(self: &Arc<Self>, req: FillRequest, stale: Arc<Entry>) {
        let this = self.clone();
        let (key, max_waiters) = (req.key, req.route.lock.max_waiters);
        let parent = tracing::Span::current();
        let mark = self.handles.l1().fence().mark();
        let _ = self
            .flights
            .join(key, (mark, max_waiters), move |interest, hold| {
                let mut req = req;
                req.hold = Some(hold);
                req.weight = this.weight(&req, &interest);
                let flight = async move { this.refresh(req, stale).await };
                Landed::from_flight(flight, parent)
            });
    }

    /// How many requests `req`'s fill answers: the flight's here, and the instances waiting on
    /// its key elsewhere (see [`crate::budget::Weight`]).
    fn weight(&self, req: &FillRequest, interest: &Interest) -> crate::budget::Weight {
        let channel = self
            .handles
            .fleet()
            .filter(|_| req.route.fleet_budget.is_some())
            .map(|fleet| fleet.names(&req.route.name, &req.key).channel);
        crate::budget::Weight::new(interest.weight(), channel)
    }

    /// Runs one flight of a miss to its end. While it only waits for another instance's fill,
    /// it stops once `interest` says every requester has gone.
    async fn miss(&self, req: FillRequest, interest: Interest) -> Fill {
        // A fill may have landed between this request's L1 miss and its flight's start.
        if let Some(entry) = self.handles.l1().get(&req.key, now_ms()).await
            && entry.times.freshness(now_ms()) == Freshness::Fresh
        {
            return Fill::Shared {
                entry,
                source: Source::L1,
            };
        }
        let Some(fleet) = self.handles.fleet() else {
            return self.filler.fill(&req, Claim::Instance(None), None).await;
        };
        let names = Arc::new(fleet.names(&req.route.name, &req.key));
        if req.route.lock.scope == LockScope::Fleet {
            return self
                .wait(&req, fleet, &names, Purpose::Miss, None, &interest)
                .await;
        }
        let fallback = match fleet.read(&names, fleet.read_budget()).await {
            Ok(peek) => match self.read(&req, peek).await {
                Ok(fill) => return fill,
                Err(fallback) => fallback,
            },
            Err(err) => {
                tracing::warn!(route = %req.route.name, %err, "redis unavailable; filling for this instance only (degraded)");
                return self.filler.fill(&req, Claim::Instance(None), None).await;
            }
        };
        let claim = Claim::Instance(Some((fleet.clone(), names.clone())));
        self.filler.fill(&req, claim, fallback).await
    }

    /// A background refresh of `stale`, the entry this instance holds: if L2 already holds a
    /// newer one, it is copied into L1; else the fill lock is taken and the upstream called; if
    /// someone else holds the lock, the refresh waits for their fill as a miss does (see
    /// [`crate::wait`]), and if that fill fails, `stale` stands in — nobody here calls the
    /// upstream on its own.
    async fn refresh(&self, req: FillRequest, stale: Arc<Entry>) -> Fill {
        let Some(fleet) = self.handles.fleet() else {
            return self
                .filler
                .fill(&req, Claim::Instance(None), Some(stale))
                .await;
        };
        let route = &req.route;
        let names = Arc::new(fleet.names(&route.name, &req.key));
        if route.lock.scope != LockScope::Fleet {
            let claim = Claim::Instance(Some((fleet.clone(), names.clone())));
            return self.filler.fill(&req, claim, Some(stale)).await;
        }
        let known = stale.times.stored_at;
        let purpose = Purpose::Refresh { known };
        // Nobody awaits a refresh; it is worth finishing for the requests to come.
        let interest = Interest::lasting();
        self.wait(&req, fleet, &names, purpose, Some(stale), &interest)
            .await
    }

    /// What an L2 read settles for a route that does not coalesce fleet-wide: `Ok` with the
    /// flight's result, or `Err` with the stale entry (if any) to fall back on while filling.
    async fn read(&self, req: &FillRequest, peek: Peek) -> Result<Fill, Option<Arc<Entry>>> {
        if peek.uncacheable {
            self.handles
                .marks()
                .insert(req.key, req.route.uncacheable_ttl);
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
        Ok(self.keep(req, Arc::new(entry), source).await)
    }

    /// Waits for `req`'s key across the fleet, then fills, shares or fills alone as the wait
    /// settles. `fallback`: a stale entry that may stand in if the fill fails.
    async fn wait(
        &self,
        req: &FillRequest,
        fleet: &Fleet,
        names: &Arc<KeyNames>,
        purpose: Purpose,
        fallback: Option<Arc<Entry>>,
        interest: &Interest,
    ) -> Fill {
        for _ in 0..MAX_TAILS {
            let started = Instant::now();
            let waited = io::wait(fleet, names, req, purpose, fallback.clone(), interest).await;
            self.count_lock(req, waited.trace, started);
            if let (Settled::Relay(id), Some(sub)) = (&waited.settled, waited.sub) {
                match tail::tail(fleet, self.handles.metrics(), names, id, sub, req).await {
                    Some(fill) => return fill,
                    // The log could not be read: wait again (for the stored entry).
                    None => continue,
                }
            }
            return self.settle(req, waited.settled).await;
        }
        // Relay logs announced and unreadable, again and again: ask for yourselves.
        Fill::FetchYourself
    }

    /// Acts on how the wait settled.
    async fn settle(&self, req: &FillRequest, settled: Settled<FillLock>) -> Fill {
        let route = &req.route;
        match settled {
            Settled::Fill { permit, fallback } => {
                self.filler.fill(req, Claim::Fleet(permit), fallback).await
            }
            Settled::Release { permit, entry } => {
                quiet_release(req, permit).await;
                self.keep(req, entry, Source::L2).await
            }
            Settled::Share {
                entry,
                source,
                keep: true,
            } => self.keep(req, entry, source).await,
            Settled::Share { entry, source, .. } => Fill::Shared { entry, source },
            Settled::Uncacheable => {
                self.handles.marks().insert(req.key, route.uncacheable_ttl);
                Fill::FetchYourself
            }
            Settled::Alone { fallback } => {
                self.filler.fill(req, Claim::Instance(None), fallback).await
            }
            Settled::Bypass => {
                tracing::warn!(route = %route.name, waited = ?route.lock.wait_timeout, "gave up waiting for another instance's fill; filling for this instance");
                self.filler.fill(req, Claim::Instance(None), None).await
            }
            // Every requester hung up while we waited: nobody to answer. (`Relay` is handled
            // by the wait itself.)
            Settled::Abandoned | Settled::Relay(_) => Fill::FetchYourself,
            Settled::TimedOut => {
                tracing::warn!(route = %route.name, waited = ?route.lock.wait_timeout, "gave up waiting for another instance's fill; answering 504");
                Fill::Failed(FillError::WaitTimeout(route.lock.wait_timeout))
            }
        }
    }

    /// An entry read from L2 or handed over by a notice: copied into L1 for its remaining life.
    async fn keep(&self, req: &FillRequest, entry: Arc<Entry>, source: Source) -> Fill {
        self.handles
            .l1()
            .insert(req.key, &req.route.name, entry.clone())
            .await;
        Fill::Shared { entry, source }
    }

    fn count_lock(&self, req: &FillRequest, trace: Trace, started: Instant) {
        let outcome = match trace {
            Trace {
                timed_out: true, ..
            } => LockOutcome::WaitTimeout,
            Trace {
                acquired: true,
                waited: false,
                ..
            } => LockOutcome::Acquired,
            Trace {
                acquired: true,
                waited: true,
                ..
            } => LockOutcome::TookOver,
            Trace { waited: true, .. } => LockOutcome::Waited,
            // Settled before any lock decision (an entry, a marker, or Redis failed).
            Trace { .. } => return,
        };
        let waited = trace.waited.then(|| started.elapsed());
        self.handles
            .metrics()
            .lock(&req.route.name, outcome, waited);
    }
}

/// How many relay logs one flight tries to tail before it gives up on them.
const MAX_TAILS: usize = 3;

/// What a flight hands each joiner: its fill, and which fill span answered it (for the span
/// links of [`crate::trace`]; `None` when nothing records spans).
#[derive(Clone)]
pub struct Landed {
    pub fill: Arc<Fill>,
    pub by: Option<crate::trace::FillRef>,
}

impl Landed {
    /// Runs a flight under `parent` (the span of the request that started it), noting the fill
    /// that answers it.
    async fn from_flight(flight: impl Future<Output = Fill>, parent: tracing::Span) -> Landed {
        let attributed = crate::trace::attributed(flight);
        let (fill, by) = if parent.is_disabled() {
            attributed.await
        } else {
            tracing::Instrument::instrument(attributed, parent).await
        };
        Landed {
            fill: Arc::new(fill),
            by,
        }
    }
}

/// Releases a lock that turned out not to be needed: the entry was there after all, and its
/// filler already told the waiters.
async fn quiet_release(req: &FillRequest, held: FillLock) {
    if let Err(err) = held.release(None, std::time::Duration::ZERO).await {
        tracing::warn!(route = %req.route.name, %err, "could not release fill lock; it lapses with its lease");
    }
}
