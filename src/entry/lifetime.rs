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
}
