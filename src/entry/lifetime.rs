//! When an entry was stored, until when it may be served, and what it answers now.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

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
