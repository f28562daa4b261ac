//! The fill lock's side of L2: taking it with the first look (`LOOKUP`) or alone (`TAKE`),
//! extending its lease, and ending it — a token-checked store that also releases and publishes
//! `stored`, or a token-checked release that publishes why nothing was stored.

use std::time::Duration;

use bytes::Bytes;

use super::{KeyNames, L2, L2Error, MAX_NOTICE_ENTRY, Notice, decode, millis};
use crate::entry::{Entry, now_ms};

/// A fill lock as seen by a waiter.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum LockState {
    /// Nobody holds it.
    #[default]
    Free,
    /// Held, with this much of its lease left.
    Held(Duration),
    /// Held by a key with no TTL (written by hand, or by a foreign client): held for all we
    /// know, and it will not lapse by itself.
    Unbounded,
}

impl LockState {
    pub(super) fn from_pttl(pttl: i64) -> LockState {
        match pttl {
            -1 => LockState::Unbounded,
            ms => u64::try_from(ms)
                .map(|ms| LockState::Held(Duration::from_millis(ms)))
                .unwrap_or(LockState::Free),
        }
    }
}

/// How a token-checked store went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreOutcome {
    /// Written under our lock; the lock is released and the notice published.
    Stored,
    /// Our lock had lapsed and nobody held it: written because no entry existed.
    StoredUnlocked,
    /// Someone else holds the lock now, or an entry already existed: nothing written.
    Superseded,
    /// A purge of the key came while the fill ran: nothing written, the lock released and the
    /// waiters told to compete again, so the next fill starts after the purge.
    Purged,
}

/// The value a purge leaves in a key's fill lock (keeping its TTL): the fill that holds the lock
/// began before the purge, so its store is refused — as a delete invalidates a memcache lease.
pub(crate) const PURGED_LOCK: &str = "purged";

/// What a flight's first look found.
#[derive(Debug)]
pub enum Lookup {
    /// An entry (of any freshness); the lock was not touched.
    Entry(Entry),
    /// A value that is not a valid entry; the lock was not touched.
    Garbled,
    /// The key is marked uncacheable.
    Uncacheable,
    /// Nothing stored and the lock was free: the caller now holds it with its token.
    Locked,
    /// Nothing stored and someone else holds the lock.
    Held,
}

/// How a fill lock is held: its lease, the budget of each Redis call made for it, and how long
/// the watchdog may extend it once the upstream call began.
#[derive(Debug, Clone, Copy)]
pub struct Terms {
    pub lease: Duration,
    pub budget: Duration,
    pub max_hold: Duration,
}

impl L2 {
    /// The entry, or else the uncacheable marker, or else the fill lock under `token`; see
    /// [`Lookup`].
    pub async fn lookup(
        &self,
        names: &KeyNames,
        token: &str,
        lease: Duration,
        budget: Duration,
    ) -> Result<Lookup, L2Error> {
        let mut conn = self.conn.clone();
        let mut call = self.scripts.lookup.key(&names.entry);
        call.key(&names.pass)
            .key(&names.lock)
            .arg(token)
            .arg(millis(lease));
        let (raw, state): (Option<Bytes>, i64) = self
            .within("lookup", budget, call.invoke_async(&mut conn))
            .await?;
        Ok(match (raw, state) {
            (Some(raw), _) => decode(&names.entry, raw).map_or(Lookup::Garbled, Lookup::Entry),
            (None, 1) => Lookup::Uncacheable,
            (None, 2) => Lookup::Locked,
            (None, _) => Lookup::Held,
        })
    }

    /// `SET lock token NX PX lease` (see `TAKE`): whether the caller now holds the fill lock.
    pub async fn try_lock(
        &self,
        names: &KeyNames,
        token: &str,
        lease: Duration,
        budget: Duration,
    ) -> Result<bool, L2Error> {
        let take = &self.scripts.take;
        self.on_lock("take lock", take, names, token, lease, budget)
            .await
    }

    /// Extends the lease if `token` still holds the lock; `false` when the lock was lost.
    pub async fn extend(
        &self,
        names: &KeyNames,
        token: &str,
        lease: Duration,
        budget: Duration,
    ) -> Result<bool, L2Error> {
        let extend = &self.scripts.extend;
        self.on_lock("extend", extend, names, token, lease, budget)
            .await
    }

    /// Runs `script` on the lock with `token` and `lease`; whether it did what it is for (`1`).
    async fn on_lock(
        &self,
        op: &'static str,
        script: &redis::Script,
        names: &KeyNames,
        token: &str,
        lease: Duration,
        budget: Duration,
    ) -> Result<bool, L2Error> {
        let mut conn = self.conn.clone();
        let mut call = script.key(&names.lock);
        call.arg(token).arg(millis(lease));
        let n: i64 = self
            .within(op, budget, call.invoke_async(&mut conn))
            .await?;
        Ok(n == 1)
    }

    /// Releases the lock if `token` holds it, publishing `notice` (if any) to the waiters and, for
    /// an uncacheable answer, setting the marker for `pass_ttl`.
    ///
    /// Not refused by an open circuit: a leader that stopped getting answers still owes its
    /// waiters elsewhere the release, or they sit out the lease. Bounded by `budget`.
    pub async fn release(
        &self,
        names: &KeyNames,
        token: &str,
        notice: Option<&Notice>,
        pass_ttl: Duration,
        budget: Duration,
    ) -> Result<bool, L2Error> {
        let mut conn = self.conn.clone();
        let mut call = self.scripts.release.key(&names.lock);
        let pass_ms = if matches!(notice, Some(Notice::Uncacheable)) {
            u64::try_from(pass_ttl.as_millis()).unwrap_or(u64::MAX)
        } else {
            0
        };
        call.key(&names.pass)
            .arg(token)
            .arg(&names.channel)
            .arg(notice.map(Notice::payload).unwrap_or_default().as_ref())
            .arg(pass_ms)
            .arg(self.scripts.publish);
        let op = "release";
        let n: i64 = match tokio::time::timeout(budget, call.invoke_async(&mut conn)).await {
            Ok(Ok(n)) => {
                self.breaker.success();
                n
            }
            Ok(Err(source)) => {
                self.metrics.redis_error(op);
                return Err(L2Error::Redis { op, source });
            }
            Err(_) => {
                self.metrics.redis_error(op);
                return Err(L2Error::Timeout { op, budget });
            }
        };
        Ok(n == 1)
    }

    /// Token-checked write of a filled entry; see [`StoreOutcome`]. Indexes its tags too, in the
    /// same round trip: inside the script outside a cluster (only when the entry is written); in
    /// a cluster, where the indexes live in other slots, by pipelines sent beside the script
    /// (a store that is then refused leaves index members behind: a purge by that tag deletes
    /// the key's next entry too, at most one extra miss).
    pub async fn store(
        &self,
        names: &KeyNames,
        token: &str,
        entry: &Entry,
        budget: Duration,
    ) -> Result<StoreOutcome, L2Error> {
        let Some(ttl) = entry.times.remaining(now_ms()) else {
            return Ok(StoreOutcome::Superseded);
        };
        let mut conn = self.conn.clone();
        let encoded = entry.encode();
        let with_entry = if encoded.len() <= MAX_NOTICE_ENTRY {
            "1"
        } else {
            "0"
        };
        let mut call = self.scripts.store.key(&names.entry);
        call.key(&names.lock);
        let apart = self.conn.spans_slots();
        if !apart {
            for tag in &entry.tags {
                call.key(self.tag_index(tag));
            }
        }
        call.arg(token)
            .arg(encoded.as_ref())
            .arg(millis(ttl))
            .arg(&names.channel)
            .arg(with_entry)
            .arg(PURGED_LOCK)
            .arg(self.scripts.publish);
        // The fill's span, when one is recorded: waiters elsewhere link to it.
        match crate::trace::current_fill() {
            Some(fill) => call.arg(&fill.encode()[..]),
            None => call.arg(""),
        };
        let store = self.within("store", budget, call.invoke_async(&mut conn));
        let n: i64 = if apart {
            tokio::join!(store, self.index_tags(names, entry)).0?
        } else {
            store.await?
        };
        Ok(match n {
            1 => StoreOutcome::Stored,
            2 => StoreOutcome::StoredUnlocked,
            3 => StoreOutcome::Purged,
            _ => StoreOutcome::Superseded,
        })
    }
}
