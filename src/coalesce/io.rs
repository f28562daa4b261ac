//! The I/O loop of a fleet-wide wait: runs each action the [`crate::wait`] state machine asks for
//! against Redis — lookup, lock, subscribe, peek, wait for a notice — and feeds back what
//! happened, until the machine settles.

use std::sync::Arc;

use tokio::time::Instant;

use crate::entry::{Entry, now_ms};
use crate::fill::FillRequest;
use crate::fleet::Fleet;
use crate::flight::Interest;
use crate::l2::{KeyNames, L2Error, LockState, Lookup, Notice};
use crate::lock::FillLock;
use crate::notice::Subscription;
use crate::wait::{Action, Event, Purpose, Settled, Trace, Wait};

/// How a wait ended: how it settled, what it went through (for the lock metrics), and the fill
/// lock it holds, if it took one.
pub(super) struct Outcome {
    pub settled: Settled,
    pub trace: Trace,
    pub held: Option<FillLock>,
    /// The key's subscription, kept when the wait settled on tailing a relay (whose records ring
    /// the channel); `None` otherwise.
    pub sub: Option<Subscription>,
}

/// Waits for `req`'s key across the fleet until the state machine settles. `fallback`: a stale
/// entry that may stand in if the fill fails. Cancel safety: a lock taken is released on drop
/// (see [`FillLock`]), a subscription unsubscribes on drop.
pub(super) async fn wait(
    fleet: &Fleet,
    names: &Arc<KeyNames>,
    req: &FillRequest,
    purpose: Purpose,
    fallback: Option<Arc<Entry>>,
    interest: &Interest,
) -> Outcome {
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
        // Another instance's fill answers this flight: its requests link to that fill's span.
        if let Event::Woken(crate::notice::Wake::Notice(Notice::Stored(_, Some(by)))) = &event {
            crate::trace::attribute(by.clone());
        }
        action = wait.on(event, Instant::now(), now_ms());
    };
    // Nothing more to hear on the channel, unless the flight tails a relay: `io.sub`
    // unsubscribes as it drops.
    let sub = match settled {
        Settled::Relay(_) => io.sub.take(),
        _ => None,
    };
    Outcome {
        settled,
        trace: wait.trace(),
        held: io.held,
        sub,
    }
}

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
pub(super) struct Io<'a> {
    fleet: &'a Fleet,
    names: &'a Arc<KeyNames>,
    req: &'a FillRequest,
    held: Option<FillLock>,
    sub: Option<Subscription>,
    /// Whether anyone still wants the answer.
    interest: &'a Interest,
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
            // The loop in `wait` ends on Done before asking for it to be run.
            Action::Done(_) => Event::RedisFailed,
        }
    }

    fn failed(&self, err: L2Error) -> Event {
        tracing::warn!(route = %self.req.route.name, %err, "redis unavailable; filling for this instance only (degraded)");
        Event::RedisFailed
    }
}
