//! The wait for a key's fill across the fleet, as one state machine: events in, actions out.
//!
//! Misses and background refreshes wait the same way, so they share this machine; the thin I/O
//! loop that drives it lives in [`crate::coalesce`]. The machine does no I/O and reads no clock: each
//! event comes with the time it happened, so every transition is a plain unit test.
//!
//! ```text
//!  Miss:    Lookup ──entry──▶ Done(share) / compete      Refresh: Read ──newer──▶ Done(share)
//!             ├─locked──▶ Done(fill, with the permit)                                  └─else──▶ compete
//!             └─held────▶ Subscribe ─▶ Peek ─┬─ settled ─▶ Done
//!  compete: TryLock ─┬─ got it ─▶ Recheck ─▶ Done(fill | release+share)
//!                    └─ held ───▶ (Subscribe ─▶) Peek ─┤
//!                                                      ├─ lock free ─▶ compete
//!                                                      └─ lock held ─▶ Wait ─┬─ notice ─▶ Done / Read
//!                                                                            ├─ resync ─▶ Confirm ─▶ Peek
//!                                                                            └─ lapse ──▶ compete
//! ```
//! Past the deadline, compete gives up per the route's `on_wait_timeout` (a stale entry, if
//! one is known, stands in). A Redis failure at any step ends the wait: the flight fills for
//! this instance alone.
//!
//! Notices are terminal: `stored` (with the entry, or a read of it), `failed` (with the leader's
//! answer, shared; without one, compete again) and `uncacheable` each settle the wait, and the
//! subscription delivers them in order, so a resync that follows one can never hide it.

use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::config::OnWaitTimeout;
use crate::entry::{Answerable, Entry, Freshness};
use crate::fill::Source;
use crate::fleet::{Lookup, Notice, Wake};
use crate::l2::{LockState, Peek};

/// Slack added to a lock's remaining lease before competing again, so the lock has surely lapsed.
pub const LAPSE_MARGIN: Duration = Duration::from_millis(5);

/// Why the flight waits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// Nothing usable is cached: any fresh entry will do.
    Miss,
    /// The entry stored at `known` (ms since the epoch) is due for a refresh: only a newer, fresh
    /// entry settles it.
    Refresh { known: u64 },
}

/// What the I/O loop does next. `P` is the permit a taken lock is (the machine hands it on, never
/// holds it: the flight that holds it is the one that fills).
#[derive(Debug)]
pub enum Action<P> {
    /// Run the lookup script: the entry, or the uncacheable marker, or the lock taken if free.
    Lookup,
    /// Read the entry and the marker.
    Read,
    /// Try to take the fill lock (`SET NX PX`).
    TryLock,
    /// The lock was just taken: read the entry again (a fill may have landed since the last look),
    /// and report it with the permit ([`Event::Rechecked`]).
    Recheck(P),
    /// Subscribe to the key's channel (before the re-check that closes the race with its notice).
    Subscribe,
    /// Read entry, marker and the lock's remaining lease.
    Peek,
    /// The pub/sub connection was re-established: confirm the subscription, then peek.
    Confirm,
    /// Wait for a wake on the channel until `until`, then report [`Event::Lapsed`].
    Wait { until: Instant },
    /// The wait is over.
    Done(Settled<P>),
}

/// How a wait ended: what the flight does with it. Only the endings that took the lock carry
/// its permit; any other ending has none to release.
#[derive(Debug)]
pub enum Settled<P> {
    /// The flight holds the lock (`permit`): call the upstream (`fallback`: a stale entry to
    /// stand in if it fails).
    Fill {
        permit: P,
        fallback: Option<Arc<Entry>>,
    },
    /// The flight took the lock (`permit`), but a fresh entry had landed: release the lock
    /// quietly, share the entry.
    Release { permit: P, entry: Arc<Entry> },
    /// Share this entry; `keep` copies it into L1 (a stored entry, not a shared failure).
    Share {
        entry: Arc<Entry>,
        source: Source,
        keep: bool,
    },
    /// The answer may not be shared: every joiner fetches for itself.
    Uncacheable,
    /// The holder is relaying its answer while it arrives: read its relay log (this fill's id).
    Relay(Arc<str>),
    /// Redis failed: fill for this instance alone (`fallback`: a stale entry to stand in if the
    /// fill fails).
    Alone { fallback: Option<Arc<Entry>> },
    /// The wait timed out and the route says `bypass`: one call for this instance's waiters. (A
    /// stale entry, had there been one, would have been shared instead.)
    Bypass,
    /// The wait timed out and the route answers 504.
    TimedOut,
    /// Every requester went away while the flight waited.
    Abandoned,
}

/// What happened, as the I/O loop reports it.
#[derive(Debug)]
pub enum Event<P> {
    Looked(Lookup<P>),
    Read(Peek),
    /// `Some`: the lock is ours.
    Locked(Option<P>),
    /// The re-read that [`Action::Recheck`] asked for, with the permit it carried.
    Rechecked(P, Option<Entry>),
    Subscribed,
    Peeked(Peek),
    Confirmed,
    Woken(Wake),
    /// The time given by the last [`Action::Wait`] passed.
    Lapsed,
    /// A Redis call failed (the I/O loop logs why).
    RedisFailed,
    /// Every requester of the flight has gone (their clients hung up).
    Abandoned,
}

/// What the wait did with the lock, for the metrics.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Trace {
    pub acquired: bool,
    pub waited: bool,
    pub timed_out: bool,
}

/// One flight's wait for a key, whose lock is taken as a permit `P`.
#[derive(Debug)]
pub struct Wait<P> {
    purpose: Purpose,
    fallback: Option<Arc<Entry>>,
    deadline: Instant,
    lease: Duration,
    policy: OnWaitTimeout,
    subscribed: bool,
    /// When the current wait lapses (the last [`Action::Wait`]).
    until: Option<Instant>,
    trace: Trace,
    permit: PhantomData<fn() -> P>,
}

impl<P> Wait<P> {
    /// A wait that gives up at `deadline`; `fallback` is a stale entry that may stand in for a
    /// failed fill (a refresh always has the entry it refreshes).
    pub fn new(
        purpose: Purpose,
        fallback: Option<Arc<Entry>>,
        deadline: Instant,
        lease: Duration,
        policy: OnWaitTimeout,
    ) -> Wait<P> {
        Wait {
            purpose,
            fallback,
            deadline,
            lease,
            policy,
            subscribed: false,
            until: None,
            trace: Trace::default(),
            permit: PhantomData,
        }
    }

    /// The first action: a miss looks (and locks) in one round trip; a refresh first reads, since
    /// the entry it refreshes would always answer the lookup.
    pub fn start(&self) -> Action<P> {
        match self.purpose {
            Purpose::Miss => Action::Lookup,
            Purpose::Refresh { .. } => Action::Read,
        }
    }

    pub fn trace(&self) -> Trace {
        self.trace
    }

    /// The next action after `event`, which happened at `now` (`wall`: the same moment in ms
    /// since the epoch, for entry freshness).
    pub fn on(&mut self, event: Event<P>, now: Instant, wall: u64) -> Action<P> {
        match event {
            Event::Looked(Lookup::Entry(entry)) => self
                .consider(entry, wall, Source::L2)
                .unwrap_or_else(|| self.compete(now)),
            Event::Looked(Lookup::Garbled) => self.compete(now),
            Event::Looked(Lookup::Uncacheable) => Action::Done(Settled::Uncacheable),
            Event::Looked(Lookup::Locked(permit)) => {
                self.trace.acquired = true;
                self.fill(permit)
            }
            Event::Looked(Lookup::Held) => self.await_holder(),
            Event::Read(peek) => self.settle(peek, wall).unwrap_or_else(|| self.compete(now)),
            Event::Locked(Some(permit)) => {
                self.trace.acquired = true;
                Action::Recheck(permit)
            }
            Event::Locked(None) => self.await_holder(),
            Event::Rechecked(permit, Some(entry)) if self.newer_and_fresh(&entry, wall) => {
                Action::Done(Settled::Release {
                    permit,
                    entry: Arc::new(entry),
                })
            }
            Event::Rechecked(permit, _) => self.fill(permit),
            Event::Subscribed => {
                self.subscribed = true;
                Action::Peek
            }
            Event::Peeked(peek) => {
                let lock = peek.lock;
                if let Some(done) = self.settle(peek, wall) {
                    return done;
                }
                match lock {
                    LockState::Free => self.compete(now),
                    LockState::Held(left) => self.wait_until(now + left + LAPSE_MARGIN),
                    // It will not lapse by itself: look again after a lease.
                    LockState::Unbounded => self.wait_until(now + self.lease),
                }
            }
            Event::Confirmed => Action::Peek,
            Event::Woken(Wake::Notice(notice)) => self.noticed(notice, now),
            Event::Woken(Wake::Resync) => Action::Confirm,
            Event::Lapsed => self.compete(now),
            Event::Abandoned => Action::Done(Settled::Abandoned),
            Event::RedisFailed => Action::Done(Settled::Alone {
                fallback: self.fallback.take(),
            }),
        }
    }

    fn noticed(&mut self, notice: Notice, now: Instant) -> Action<P> {
        match notice {
            Notice::Stored(Some(entry), _) => match self.purpose {
                Purpose::Refresh { known } if entry.times.stored_at <= known => self.compete(now),
                _ => Action::Done(Settled::Share {
                    entry,
                    source: Source::Remote,
                    keep: true,
                }),
            },
            // Too large to travel with the notice: read it.
            Notice::Stored(None, _) => Action::Read,
            Notice::Failed(answer) => {
                let failed = answer.as_ref().is_none_or(|e| e.status.is_server_error());
                match (&self.fallback, answer) {
                    (Some(stale), _) if failed => Action::Done(Settled::Share {
                        entry: stale.clone(),
                        source: Source::Stale,
                        keep: false,
                    }),
                    (_, Some(entry)) => Action::Done(Settled::Share {
                        entry,
                        source: Source::Remote,
                        keep: false,
                    }),
                    // Nothing to share (too large for a notice): compete again.
                    (_, None) => self.compete(now),
                }
            }
            Notice::Uncacheable => Action::Done(Settled::Uncacheable),
            // A miss reads the answer while it arrives (from the log's start, also when it
            // hears of the fill only by a later batch); a refresh has an entry to serve
            // meanwhile and waits on for the stored one.
            Notice::Streaming(id) | Notice::Relayed(id) => match self.purpose {
                Purpose::Miss => Action::Done(Settled::Relay(id)),
                Purpose::Refresh { .. } => self.wait_on(),
            },
            // A budget's grant: never sent on a key's channel.
            Notice::Granted(_) => self.wait_on(),
        }
    }

    /// Waits on as before (until the deadline it had, else after a read of the key).
    fn wait_on(&self) -> Action<P> {
        match self.until {
            Some(until) => Action::Wait { until },
            None => Action::Peek,
        }
    }

    /// What a read of the key settles, if anything.
    fn settle(&mut self, peek: Peek, wall: u64) -> Option<Action<P>> {
        if peek.uncacheable {
            return Some(Action::Done(Settled::Uncacheable));
        }
        self.consider(peek.entry?, wall, Source::Remote)
    }

    /// Whether `entry` settles the wait; a stale-if-error entry is kept as the fallback.
    fn consider(&mut self, entry: Entry, wall: u64, fresh: Source) -> Option<Action<P>> {
        let freshness = entry.times.freshness(wall);
        let share = |entry, source| {
            Some(Action::Done(Settled::Share {
                entry: Arc::new(entry),
                source,
                keep: true,
            }))
        };
        match self.purpose {
            Purpose::Refresh { .. } if self.newer_and_fresh(&entry, wall) => share(entry, fresh),
            Purpose::Refresh { .. } => None,
            Purpose::Miss => match freshness.answer(entry) {
                Answerable::Now {
                    entry,
                    stale: false,
                } => share(entry, fresh),
                Answerable::Now { entry, stale: true } => share(entry, Source::Stale),
                Answerable::Fallback(entry) => {
                    self.fallback = Some(Arc::new(entry));
                    None
                }
                Answerable::Expired(_) => None,
            },
        }
    }

    fn newer_and_fresh(&self, entry: &Entry, wall: u64) -> bool {
        let newer = match self.purpose {
            Purpose::Miss => true,
            Purpose::Refresh { known } => entry.times.stored_at > known,
        };
        newer && entry.times.freshness(wall) == Freshness::Fresh
    }

    fn fill(&mut self, permit: P) -> Action<P> {
        Action::Done(Settled::Fill {
            permit,
            fallback: self.fallback.take(),
        })
    }

    /// Try for the lock again — unless the deadline has passed.
    fn compete(&mut self, now: Instant) -> Action<P> {
        if now < self.deadline {
            return Action::TryLock;
        }
        self.trace.timed_out = true;
        let settled = match (self.fallback.take(), self.policy) {
            (Some(stale), _) => Settled::Share {
                entry: stale,
                source: Source::Stale,
                keep: false,
            },
            // One call for this instance's waiters, not one per waiter.
            (None, OnWaitTimeout::Bypass) => Settled::Bypass,
            (None, OnWaitTimeout::GatewayTimeout) => Settled::TimedOut,
        };
        Action::Done(settled)
    }

    /// Someone else holds the lock: subscribe (once), then look.
    fn await_holder(&mut self) -> Action<P> {
        self.trace.waited = true;
        if self.subscribed {
            Action::Peek
        } else {
            Action::Subscribe
        }
    }

    fn wait_until(&mut self, lapse: Instant) -> Action<P> {
        let until = lapse.min(self.deadline);
        self.until = Some(until);
        Action::Wait { until }
    }
}

#[cfg(test)]
mod tests;
