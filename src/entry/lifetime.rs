//! When an entry was stored, until when it may be served, and what it answers now.

use std::borrow::Borrow;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::Entry;

/// When an entry was stored and until when it may be served, in Unix milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lifetime {
    pub stored_at: u64,
    pub fresh_until: u64,
    /// Served stale while one refresh runs, until this moment.
    pub swr_until: u64,
    /// Served stale when a refresh fails, until this moment.
    pub sie_until: u64,
}

/// Whether an entry may answer a request at a given moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Freshness {
    Fresh,
    /// Stale but inside `stale-while-revalidate`: answer and refresh in the background.
    StaleRevalidate,
    /// Stale, usable only if a refresh fails (`stale-if-error`).
    StaleIfError,
    Expired,
}

/// What an entry answers at a moment: the one mapping from [`Freshness`] to an answer, shared by
/// the L1 lookup, the L2 read and the wait for a fill, so they cannot disagree on what a stale
/// entry is good for. `E` is however the caller holds the entry (`Entry`, `Arc<Entry>`).
#[derive(Debug, Clone, PartialEq)]
pub enum Answerable<E> {
    /// Answer with it now: fresh, or `stale` within `stale-while-revalidate` (then refresh it once).
    Now { entry: E, stale: bool },
    /// Stale within `stale-if-error` only: it answers nothing yet, and stands in should the fill
    /// fail.
    Fallback(E),
    /// Expired: it answers nothing (an entry kept for its validators feeds a conditional fill).
    Expired(E),
}

impl Freshness {
    /// What an entry this fresh answers (see [`Answerable`]).
    pub fn answer<E>(self, entry: E) -> Answerable<E> {
        match self {
            Freshness::Fresh => Answerable::Now {
                entry,
                stale: false,
            },
            Freshness::StaleRevalidate => Answerable::Now { entry, stale: true },
            Freshness::StaleIfError => Answerable::Fallback(entry),
            Freshness::Expired => Answerable::Expired(entry),
        }
    }
}

impl<E: Borrow<Entry>> Answerable<E> {
    /// What `entry` answers at `now` (Unix milliseconds).
    pub fn of(entry: E, now: u64) -> Answerable<E> {
        let freshness = entry.borrow().times.freshness(now);
        freshness.answer(entry)
    }
}

impl<E> Answerable<E> {
    /// The entry, whatever it answers.
    pub fn entry(&self) -> &E {
        match self {
            Answerable::Now { entry, .. }
            | Answerable::Fallback(entry)
            | Answerable::Expired(entry) => entry,
        }
    }
}

impl Lifetime {
    /// The last moment the entry is of any use: its time to live in L1 and L2.
    pub fn stale_until(&self) -> u64 {
        self.fresh_until.max(self.swr_until).max(self.sie_until)
    }

    pub fn freshness(&self, now: u64) -> Freshness {
        if now < self.fresh_until {
            Freshness::Fresh
        } else if now < self.swr_until {
            Freshness::StaleRevalidate
        } else if now < self.sie_until {
            Freshness::StaleIfError
        } else {
            Freshness::Expired
        }
    }

    /// Time left to live from `now`, or `None` when already dead.
    pub fn remaining(&self, now: u64) -> Option<Duration> {
        self.stale_until()
            .checked_sub(now)
            .filter(|ms| *ms > 0)
            .map(Duration::from_millis)
    }

    /// Whole seconds since storage, for the `Age` header.
    pub fn age_secs(&self, now: u64) -> u64 {
        now.saturating_sub(self.stored_at) / 1000
    }

    /// This lifetime after a soft purge at `at` (Unix ms), or `None` when the purge leaves it
    /// alone: stored at or after `at` (a fill that landed since), or no longer fresh at `at`
    /// (already due for a refresh, or expired).
    ///
    /// A marked entry is stale from `at` on and may be served stale — while one refresh runs —
    /// until the later of its former `fresh_until` and its former `stale-while-revalidate`
    /// deadline: never for longer than it would have been served without the purge, so its
    /// time to live (in L1 and L2) never grows. Its `stale-if-error` deadline is kept. When
    /// `stale_forbidden` (`must-revalidate`, `proxy-revalidate`), it is expired at `at` instead:
    /// the next request fills it, conditionally when it has validators.
    pub fn marked_stale(&self, at: u64, stale_forbidden: bool) -> Option<Lifetime> {
        if self.stored_at >= at || self.fresh_until <= at {
            return None;
        }
        let swr_until = if stale_forbidden {
            at
        } else {
            self.swr_until.max(self.fresh_until)
        };
        Some(Lifetime {
            stored_at: self.stored_at,
            fresh_until: at,
            swr_until,
            sie_until: if stale_forbidden { at } else { self.sie_until },
        })
    }
}

/// The current wall-clock time in Unix milliseconds.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TIMES: Lifetime = Lifetime {
        stored_at: 0,
        fresh_until: 10,
        swr_until: 20,
        sie_until: 30,
    };

    #[test]
    fn a_fresh_entry_answers_now() {
        assert_eq!(
            TIMES.freshness(9).answer(()),
            Answerable::Now {
                entry: (),
                stale: false
            }
        );
    }

    #[test]
    fn a_stale_while_revalidate_entry_answers_now_as_stale() {
        assert_eq!(
            TIMES.freshness(10).answer(()),
            Answerable::Now {
                entry: (),
                stale: true
            }
        );
    }

    #[test]
    fn a_stale_if_error_entry_only_stands_in() {
        assert_eq!(TIMES.freshness(20).answer(()), Answerable::Fallback(()));
    }

    #[test]
    fn an_expired_entry_answers_nothing() {
        assert_eq!(TIMES.freshness(30).answer(()), Answerable::Expired(()));
    }

    #[test]
    fn a_soft_purge_makes_a_fresh_entry_stale_for_no_longer_than_it_had_left() {
        let marked = TIMES.marked_stale(4, false);
        let want = Lifetime {
            stored_at: 0,
            fresh_until: 4,
            swr_until: 20,
            sie_until: 30,
        };
        assert_eq!(marked, Some(want));
        assert_eq!(want.freshness(4), Freshness::StaleRevalidate);
        assert_eq!(want.stale_until(), TIMES.stale_until(), "lives no longer");

        // Without a stale-while-revalidate window: stale until it would have stopped being fresh.
        let bare = Lifetime {
            swr_until: 10,
            sie_until: 10,
            ..TIMES
        };
        let marked = bare.marked_stale(4, false);
        assert_eq!(marked.map(|t| (t.fresh_until, t.swr_until)), Some((4, 10)));
        assert_eq!(
            marked.map(|t| t.freshness(9)),
            Some(Freshness::StaleRevalidate)
        );
        assert_eq!(marked.map(|t| t.freshness(10)), Some(Freshness::Expired));
    }

    #[test]
    fn a_soft_purge_expires_what_must_not_be_served_stale_and_leaves_the_rest_alone() {
        let marked = TIMES.marked_stale(4, true);
        assert_eq!(marked.map(|t| t.freshness(4)), Some(Freshness::Expired));
        assert_eq!(TIMES.marked_stale(10, false), None, "already stale");
        assert_eq!(TIMES.marked_stale(0, false), None, "stored at the purge");
        let later = Lifetime {
            stored_at: 5,
            ..TIMES
        };
        assert_eq!(later.marked_stale(4, false), None, "stored after the purge");
    }
}
