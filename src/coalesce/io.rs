//! The I/O loop of a fleet-wide wait: runs each action the [`crate::wait`] state machine asks for
//! against the fleet's verbs — look, take the lock, read, subscribe, peek, wait for a notice — and
//! feeds back what happened, until the machine settles.
//!
//! The loop holds nothing the machine does not know of: a lock taken travels as its permit in
//! the events and actions, and leaves in the [`Settled`] ending that fills or releases; the loop
//! keeps only the subscription. It runs against [`Verbs`], which [`Fleet`] implements over Redis
//! and `io/tests.rs` over maps in memory, so several flights on one key can be unit-tested.

use std::future::Future;
use std::sync::Arc;

use tokio::time::Instant;

use crate::entry::{Entry, now_ms};
use crate::fill::FillRequest;
use crate::fleet::{FillLock, Fleet, Lookup, Notice, Subscription, Terms, Wake};
use crate::flight::Interest;
use crate::l2::{KeyNames, L2Error, LockState, Peek};
use crate::wait::{Action, Event, Purpose, Settled, Trace, Wait};

/// What a wait needs of the fleet, per key.
pub(crate) trait Verbs: Sync {
    /// The permit a taken lock is.
    type Permit: Send;
    /// A subscription to a key's channel.
    type Waiting: Waiting;

    fn terms(&self, req: &FillRequest) -> Terms;
    fn lookup(
        &self,
        names: &Arc<KeyNames>,
        terms: Terms,
    ) -> impl Future<Output = Result<Lookup<Self::Permit>, L2Error>> + Send;
    fn try_lock(
        &self,
        names: &Arc<KeyNames>,
        terms: Terms,
    ) -> impl Future<Output = Result<Option<Self::Permit>, L2Error>> + Send;
    fn read(
        &self,
        names: &KeyNames,
        terms: Terms,
    ) -> impl Future<Output = Result<Peek, L2Error>> + Send;
    fn peek(
        &self,
        names: &KeyNames,
        terms: Terms,
    ) -> impl Future<Output = Result<Peek, L2Error>> + Send;
    fn subscribe(
        &self,
        channel: &str,
    ) -> impl Future<Output = Result<Self::Waiting, L2Error>> + Send;
}

/// A subscription as a wait uses it.
pub(crate) trait Waiting: Send {
    /// The next wake: a notice, or a resync after a reconnection.
    fn next(&mut self) -> impl Future<Output = Wake> + Send;
    /// Confirms the subscription after a resync.
    fn confirm(&mut self) -> impl Future<Output = Result<(), L2Error>> + Send;
}

impl Verbs for Fleet {
    type Permit = FillLock;
    type Waiting = Subscription;

    fn terms(&self, req: &FillRequest) -> Terms {
        Fleet::terms(self, &req.route)
    }
    async fn lookup(
        &self,
        names: &Arc<KeyNames>,
        terms: Terms,
    ) -> Result<Lookup<FillLock>, L2Error> {
        Fleet::lookup(self, names, terms).await
    }
    async fn try_lock(
        &self,
        names: &Arc<KeyNames>,
        terms: Terms,
    ) -> Result<Option<FillLock>, L2Error> {
        Fleet::try_lock(self, names, terms).await
    }
    async fn read(&self, names: &KeyNames, terms: Terms) -> Result<Peek, L2Error> {
        Fleet::read(self, names, terms.budget).await
    }
    async fn peek(&self, names: &KeyNames, terms: Terms) -> Result<Peek, L2Error> {
        Fleet::peek(self, names, terms.budget).await
    }
    async fn subscribe(&self, channel: &str) -> Result<Subscription, L2Error> {
        Fleet::subscribe(self, channel).await
    }
}

impl Waiting for Subscription {
    async fn next(&mut self) -> Wake {
        Subscription::next(self).await
    }
    async fn confirm(&mut self) -> Result<(), L2Error> {
        Subscription::confirm(self).await
    }
}

/// How a wait ended: how it settled (with the permit, when it took the lock) and what it went
/// through (for the lock metrics).
pub(crate) struct Outcome<V: Verbs> {
    pub settled: Settled<V::Permit>,
    pub trace: Trace,
    /// The key's subscription, kept when the wait settled on tailing a relay (whose records ring
    /// the channel); `None` otherwise.
    pub sub: Option<V::Waiting>,
}

/// Waits for `req`'s key across the fleet until the state machine settles. `fallback`: a stale
/// entry that may stand in if the fill fails. Cancel safety: a lock taken is released on drop
/// (see [`FillLock`]), a subscription unsubscribes on drop.
pub(crate) async fn wait<V: Verbs>(
    fleet: &V,
    names: &Arc<KeyNames>,
    req: &FillRequest,
    purpose: Purpose,
    fallback: Option<Arc<Entry>>,
    interest: &Interest,
) -> Outcome<V> {
    let route = &req.route;
    // Under a fleet budget the fill may first queue for a slot (within `upstream_timeout`): its
    // waiters wait with it rather than fall through to the upstream themselves. A leader that
    // dies meanwhile still lets its lock lapse, and they compete then.
    let queue = match route.fleet_budget {
        Some(_) => route.upstream_timeout,
        None => std::time::Duration::ZERO,
    };
    let deadline = Instant::now() + route.lock.wait_timeout + queue;
    let policy = route.lock.on_wait_timeout;
    let mut wait = Wait::new(purpose, fallback, deadline, route.lock.lease, policy);
    let terms = fleet.terms(req);
    let mut sub: Option<V::Waiting> = None;
    let failed = |err: L2Error| {
        tracing::warn!(route = %route.name, %err, "redis unavailable; filling for this instance only (degraded)");
        Event::RedisFailed
    };
    let mut action = wait.start();
    let settled = loop {
        if !matches!(action, Action::Done(_)) {
            tracing::trace!(key = %names.entry, action = ?ActionName(&action), "wait");
        }
        let event = match action {
            Action::Done(settled) => break settled,
            Action::Lookup => match fleet.lookup(names, terms).await {
                Ok(found) => Event::Looked(found),
                Err(err) => failed(err),
            },
            Action::Read => match fleet.read(names, terms).await {
                Ok(peek) => Event::Read(peek),
                Err(err) => failed(err),
            },
            Action::TryLock => match fleet.try_lock(names, terms).await {
                Ok(permit) => Event::Locked(permit),
                Err(err) => failed(err),
            },
            // Someone may have filled between our last look and the lock; if this read fails,
            // filling is still right: we hold the lock.
            Action::Recheck(permit) => {
                let found = fleet.read(names, terms).await.ok();
                Event::Rechecked(permit, found.and_then(|peek| peek.entry))
            }
            Action::Subscribe => match fleet.subscribe(&names.channel).await {
                Ok(subscribed) => {
                    sub = Some(subscribed);
                    Event::Subscribed
                }
                Err(err) => failed(err),
            },
            Action::Peek => match fleet.peek(names, terms).await {
                Ok(peek) => {
                    if peek.lock == LockState::Unbounded {
                        tracing::warn!(lock = %names.lock, "a fill lock has no TTL (not set by corral?): treated as held");
                    }
                    Event::Peeked(peek)
                }
                Err(err) => failed(err),
            },
            Action::Confirm => {
                let confirmed = match sub.as_mut() {
                    Some(sub) => sub.confirm().await,
                    None => Ok(()),
                };
                match confirmed {
                    Ok(()) => Event::Confirmed,
                    Err(err) => failed(err),
                }
            }
            Action::Wait { until } => match sub.as_mut() {
                Some(sub) => tokio::select! {
                    wake = sub.next() => Event::Woken(wake),
                    () = tokio::time::sleep_until(until) => Event::Lapsed,
                    () = interest.abandoned() => Event::Abandoned,
                },
                None => tokio::select! {
                    () = tokio::time::sleep_until(until) => Event::Lapsed,
                    () = interest.abandoned() => Event::Abandoned,
                },
            },
        };
        tracing::trace!(key = %names.entry, event = ?EventName(&event), "wait");
        // Another instance's fill answers this flight: its requests link to that fill's span.
        if let Event::Woken(Wake::Notice(Notice::Stored(_, Some(by)))) = &event {
            crate::trace::attribute(by.clone());
        }
        action = wait.on(event, Instant::now(), now_ms());
    };
    // Nothing more to hear on the channel, unless the flight tails a relay: the subscription
    // unsubscribes as it drops.
    let sub = match settled {
        Settled::Relay(_) => sub,
        _ => None,
    };
    Outcome {
        settled,
        trace: wait.trace(),
        sub,
    }
}

/// An action without its permit, for trace logs.
struct ActionName<'a, P>(&'a Action<P>);

impl<P> std::fmt::Debug for ActionName<'_, P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Action::Lookup => f.write_str("Lookup"),
            Action::Read => f.write_str("Read"),
            Action::TryLock => f.write_str("TryLock"),
            Action::Recheck(_) => f.write_str("Recheck"),
            Action::Subscribe => f.write_str("Subscribe"),
            Action::Peek => f.write_str("Peek"),
            Action::Confirm => f.write_str("Confirm"),
            Action::Wait { until } => write!(f, "Wait({until:?})"),
            Action::Done(_) => f.write_str("Done"),
        }
    }
}

/// An event without its payload, for trace logs.
struct EventName<'a, P>(&'a Event<P>);

impl<P> std::fmt::Debug for EventName<'_, P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Event::Looked(Lookup::Entry(_)) => f.write_str("Looked(Entry)"),
            Event::Looked(Lookup::Garbled) => f.write_str("Looked(Garbled)"),
            Event::Looked(Lookup::Uncacheable) => f.write_str("Looked(Uncacheable)"),
            Event::Looked(Lookup::Locked(_)) => f.write_str("Looked(Locked)"),
            Event::Looked(Lookup::Held) => f.write_str("Looked(Held)"),
            Event::Read(peek) | Event::Peeked(peek) => write!(
                f,
                "Read/Peeked(entry: {}, uncacheable: {}, lock: {:?})",
                peek.entry.is_some(),
                peek.uncacheable,
                peek.lock
            ),
            Event::Locked(permit) => write!(f, "Locked({})", permit.is_some()),
            Event::Rechecked(_, entry) => write!(f, "Rechecked({})", entry.is_some()),
            Event::Subscribed => f.write_str("Subscribed"),
            Event::Confirmed => f.write_str("Confirmed"),
            Event::Woken(Wake::Notice(n)) => write!(f, "Woken({})", n.kind()),
            Event::Woken(Wake::Resync) => f.write_str("Woken(Resync)"),
            Event::Lapsed => f.write_str("Lapsed"),
            Event::RedisFailed => f.write_str("RedisFailed"),
            Event::Abandoned => f.write_str("Abandoned"),
        }
    }
}

#[cfg(test)]
mod tests;
