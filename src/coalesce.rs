//! Coalescing across the fleet: one fill per key for every instance sharing a Redis.
//!
//! A flight waits for its key with the [`crate::wait`] state machine — misses and background
//! refreshes alike — and this module is its I/O loop: it runs each action the machine asks for
//! against Redis (lookup, lock, subscribe, peek, wait for a notice) and feeds back what happened.
//! When the machine settles, the flight fills under the lock it took, shares what it found, or
//! fills for this instance alone (Redis failed, or the wait timed out with `bypass`).
//!
//! Every Redis call here decides who calls the upstream, so each is bounded by the route's lock
//! budget (see [`crate::config::LockSpec::redis_budget`]), not by the tight read budget.

use std::sync::Arc;
use std::time::Instant as StdInstant;

use tokio::time::Instant;

use crate::entry::{Entry, now_ms};
use crate::fill::{Claim, Fill, FillError, FillRequest, Filler, Fleet, Source, quiet_release};
use crate::flight::Interest;
use crate::l2::{KeyNames, L2Error, LockState, Lookup};
use crate::lock::FillLock;
use crate::metrics::LockOutcome;
use crate::notice::Subscription;
use crate::wait::{Action, Alone, Event, Purpose, Settled, Trace, Wait};

/// An event without its payload, for trace logs.
struct EventName<'a>(&'a Event);

impl std::fmt::Debug for EventName<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Event::Looked(Lookup::Entry(_)) => f.write_str("Looked(Entry)"),
            Event::Looked(other) => write!(f, "Looked({other:?})"),
            Event::Read(peek) | Event::Peeked(peek) => write!(
                f,
                "Read/Peeked(entry: {}, uncacheable: {}, lock: {:?})",
                peek.entry.is_some(),
                peek.uncacheable,
                peek.lock
            ),
            Event::Rechecked(entry) => write!(f, "Rechecked({})", entry.is_some()),
            Event::Woken(crate::notice::Wake::Notice(n)) => write!(f, "Woken({})", n.kind()),
            other => write!(f, "{other:?}"),
        }
    }
}

/// The Redis side of one flight's wait: the lock it took, if any, and its subscription.
struct Io<'a> {
    fleet: &'a Fleet,
    names: &'a Arc<KeyNames>,
    req: &'a FillRequest,
    held: Option<FillLock>,
    sub: Option<Subscription>,
    /// Whether anyone still wants the answer.
    interest: &'a Interest,
}

impl Filler {
    /// Waits for `req`'s key across the fleet, then fills, shares or fills alone as the wait
    /// settles. `fallback`: a stale entry that may stand in if the fill fails.
    pub(crate) async fn coalesce(
        &self,
        req: &FillRequest,
        fleet: &Fleet,
        names: &Arc<KeyNames>,
        purpose: Purpose,
        fallback: Option<Arc<Entry>>,
        interest: &Interest,
    ) -> Fill {
        let started = StdInstant::now();
        let route = &req.route;
        let deadline = Instant::now() + route.lock.wait_timeout;
        let policy = route.lock.on_wait_timeout;
        let mut wait = Wait::new(purpose, fallback, deadline, route.lock.lease, policy);
        let mut io = Io {
            fleet,
            names,
            req,
            held: None,
            sub: None,
            interest,
        };
        let mut action = wait.start();
        let settled = loop {
            let event = match action {
                Action::Done(settled) => break settled,
                action => {
                    tracing::trace!(key = %names.entry, ?action, "wait");
                    io.run(action).await
                }
            };
            tracing::trace!(key = %names.entry, event = ?EventName(&event), "wait");
            action = wait.on(event, Instant::now(), now_ms());
        };
        self.count_lock(req, wait.trace(), started);
        let Io { held, sub, .. } = io;
        // Nothing more to hear on the channel.
        drop(sub);
        self.settle(req, settled, held).await
    }

    /// Acts on how the wait settled.
    async fn settle(&self, req: &FillRequest, settled: Settled, held: Option<FillLock>) -> Fill {
        let route = &req.route;
        match settled {
            Settled::Fill { fallback } => {
                let claim = match held {
                    Some(held) => Claim::Fleet(held),
                    // The machine settles on Fill only once the lock is ours.
                    None => Claim::Instance(None),
                };
                self.fill_with(req, claim, fallback).await
            }
            Settled::Release { entry } => {
                if let Some(held) = held {
                    quiet_release(req, held).await;
                }
                self.keep(req, entry, Source::L2).await
            }
            Settled::Share {
                entry,
                source,
                keep: true,
            } => self.keep(req, entry, source).await,
            Settled::Share { entry, source, .. } => Fill::Shared { entry, source },
            Settled::Uncacheable => {
                self.marks.insert(req.key, route.uncacheable_ttl);
                Fill::FetchYourself
            }
            Settled::Alone { fallback, why } => {
                if why == Alone::WaitTimedOut {
                    tracing::warn!(route = %route.name, waited = ?route.lock.wait_timeout, "gave up waiting for another instance's fill; filling for this instance");
                }
                self.fill_with(req, Claim::Instance(None), fallback).await
            }
            // Every requester hung up while we waited: nobody to answer.
            Settled::Abandoned => Fill::FetchYourself,
            Settled::TimedOut => {
                tracing::warn!(route = %route.name, waited = ?route.lock.wait_timeout, "gave up waiting for another instance's fill; answering 504");
                Fill::Failed(FillError::WaitTimeout(route.lock.wait_timeout))
            }
        }
    }

    /// An entry read from L2 or handed over by a notice: copied into L1 for its remaining life.
    async fn keep(&self, req: &FillRequest, entry: Arc<Entry>, source: Source) -> Fill {
        self.l1
            .insert(req.key, &req.route.name, entry.clone())
            .await;
        Fill::Shared { entry, source }
    }

    fn count_lock(&self, req: &FillRequest, trace: Trace, started: StdInstant) {
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
        self.metrics.lock(&req.route.name, outcome, waited);
    }
}

impl Io<'_> {
    /// Runs one action of the wait against Redis and reports what happened.
    async fn run(&mut self, action: Action) -> Event {
        let l2 = &self.fleet.l2;
        let terms = l2.terms(&self.req.route);
        let names = self.names;
        match action {
            Action::Lookup => match self.fleet.keeper.lookup(l2, names, terms).await {
                Ok((found, held)) => {
                    self.held = held;
                    Event::Looked(found)
                }
                Err(err) => self.failed(err),
            },
            Action::Read => match l2.get(names, terms.budget).await {
                Ok(peek) => Event::Read(peek),
                Err(err) => self.failed(err),
            },
            Action::TryLock => match self.fleet.keeper.try_lock(l2, names, terms).await {
                Ok(Some(held)) => {
                    self.held = Some(held);
                    Event::Locked(true)
                }
                Ok(None) => Event::Locked(false),
                Err(err) => self.failed(err),
            },
            // Someone may have filled between our last look and the lock; if this read fails,
            // filling is still right: we hold the lock.
            Action::Recheck => {
                let found = l2.get(names, terms.budget).await.ok();
                Event::Rechecked(found.and_then(|peek| peek.entry))
            }
            Action::Subscribe => match self.fleet.notices.subscribe(&names.channel).await {
                Ok(sub) => {
                    self.sub = Some(sub);
                    Event::Subscribed
                }
                Err(err) => self.failed(err),
            },
            Action::Peek => match l2.peek(names, terms.budget).await {
                Ok(peek) => {
                    if peek.lock == LockState::Unbounded {
                        tracing::warn!(lock = %names.lock, "a fill lock has no TTL (not set by corral?): treated as held");
                    }
                    Event::Peeked(peek)
                }
                Err(err) => self.failed(err),
            },
            Action::Confirm => {
                let confirmed = match self.sub.as_mut() {
                    Some(sub) => sub.confirm().await,
                    None => Ok(()),
                };
                match confirmed {
                    Ok(()) => Event::Confirmed,
                    Err(err) => self.failed(err),
                }
            }
            Action::Wait { until } => match self.sub.as_mut() {
                Some(sub) => tokio::select! {
                    wake = sub.next() => Event::Woken(wake),
                    () = tokio::time::sleep_until(until) => Event::Lapsed,
                    () = self.interest.abandoned() => Event::Abandoned,
                },
                None => tokio::select! {
                    () = tokio::time::sleep_until(until) => Event::Lapsed,
                    () = self.interest.abandoned() => Event::Abandoned,
                },
            },
            // The loop in `coalesce` ends on Done before asking for it to be run.
            Action::Done(_) => Event::RedisFailed,
        }
    }

    fn failed(&self, err: L2Error) -> Event {
        tracing::warn!(route = %self.req.route.name, %err, "redis unavailable; filling for this instance only (degraded)");
        Event::RedisFailed
    }
}
