//! Soft purges in Redis: the entries a purge covers are marked stale in place instead of deleted
//! (see [`crate::purge::Mode::MarkStale`]).
//!
//! The work goes in batches of [`BATCH`] entry names, found as a hard purge finds them (the key
//! itself, an `SSCAN` of the tag's index, a `SCAN` of the route's keys on every master) but never
//! all at once: memory is bounded by a batch, not by the tag or the route. Each batch is two round
//! trips: its entries are read (`GET`s sent together on the multiplexed connection), and each entry
//! still fresh gets its new [`Lifetime`](crate::entry::Lifetime) by a script that rewrites the
//! encoded lifetime (`SETRANGE`, which keeps the key's TTL) only if those bytes are still the ones
//! read. So an entry a fill replaced meanwhile is left as that fill stored it, an entry deleted
//! meanwhile is not written again (`GETRANGE` of a missing key is empty), and no entry outlives
//! the TTL it had.

use std::sync::LazyLock;

use bytes::Bytes;
use futures_util::future::try_join_all;
use redis::Script;

use super::connection::ScanTarget;
use super::{L2, L2Error};
use crate::entry::{Entry, LIFETIME_AT, LIFETIME_LEN};
use crate::purge::Purge;

/// Entries read and rewritten per round trip.
const BATCH: usize = 64;

/// Rewrites the lifetime of the entry `KEYS[1]` — bytes `ARGV[1]..=ARGV[2]` — to `ARGV[4]` if they
/// are still `ARGV[3]`. Returns 1 when it did, 0 when the entry is gone or was replaced.
const MARK_STALE: &str = r"
if redis.call('GETRANGE', KEYS[1], ARGV[1], ARGV[2]) == ARGV[3] then
  redis.call('SETRANGE', KEYS[1], ARGV[1], ARGV[4])
  return 1
end
return 0
";

static MARK: LazyLock<Script> = LazyLock::new(|| Script::new(MARK_STALE));

impl L2 {
    /// Marks stale, as of `at`, the entries `purge` covers that were stored before `at` and fresh
    /// then. Returns how many were marked.
    pub(super) async fn mark_stale(&self, purge: &Purge, at: u64) -> Result<u64, L2Error> {
        match purge {
            Purge::Key { route, key } => {
                let names = self.names(route, key);
                self.mark_batch(&[names.entry], at).await
            }
            Purge::Route(route) => {
                let pattern = format!("corral:{}:{route}:{{*", self.namespace);
                let mut conn = self.conn.clone();
                let targets = self
                    .bounded("soft purge CLUSTER SLOTS", conn.scan_targets())
                    .await?;
                let mut marked = 0;
                for target in &targets {
                    marked += self.mark_matching_on(target, &pattern, at).await?;
                }
                Ok(marked)
            }
            Purge::Tag(tag) => self.mark_tagged(&self.tag_index(tag), at).await,
            Purge::All => Ok(0),
        }
    }

    /// Marks the entries listed in the tag index `index`, a batch per `SSCAN` step (an entry met
    /// twice is marked once: the second time it is no longer fresh).
    async fn mark_tagged(&self, index: &str, at: u64) -> Result<u64, L2Error> {
        let mut conn = self.conn.clone();
        let (mut cursor, mut marked) = (0u64, 0);
        loop {
            let mut step = redis::cmd("SSCAN");
            step.arg(index).arg(cursor).arg("COUNT").arg(BATCH);
            let (next, names): (u64, Vec<String>) = self
                .bounded("soft purge SSCAN", step.query_async(&mut conn))
                .await?;
            for batch in names.chunks(BATCH) {
                marked += self.mark_batch(batch, at).await?;
            }
            if next == 0 {
                return Ok(marked);
            }
            cursor = next;
        }
    }

    /// Marks the entries matching `pattern` on `target`, a batch per `SCAN` step.
    async fn mark_matching_on(
        &self,
        target: &ScanTarget,
        pattern: &str,
        at: u64,
    ) -> Result<u64, L2Error> {
        let mut conn = self.conn.clone();
        let (mut cursor, mut marked) = (0u64, 0);
        loop {
            let (next, names) = self
                .bounded("soft purge SCAN", conn.scan(target, cursor, pattern, BATCH))
                .await?;
            for batch in names.chunks(BATCH) {
                marked += self.mark_batch(batch, at).await?;
            }
            if next == 0 {
                return Ok(marked);
            }
            cursor = next;
        }
    }

    /// Reads the entries `names` (one round trip) and marks each one still fresh (one more).
    async fn mark_batch(&self, names: &[String], at: u64) -> Result<u64, L2Error> {
        if names.is_empty() {
            return Ok(0);
        }
        let reads = names.iter().map(|name| {
            let mut conn = self.conn.clone();
            let mut get = redis::cmd("GET");
            get.arg(name);
            async move { get.query_async::<Option<Bytes>>(&mut conn).await }
        });
        let values = self.bounded("soft purge GET", try_join_all(reads)).await?;
        let last = LIFETIME_AT + LIFETIME_LEN - 1;
        let marks = names.iter().zip(values).filter_map(|(name, raw)| {
            // A value that is not an entry (foreign, garbled) is a miss anyway: left alone.
            let entry = Entry::decode(raw?).ok()?;
            let marked = entry.marked_stale(at)?;
            let mut call = MARK.key(name);
            call.arg(LIFETIME_AT)
                .arg(last)
                .arg(&entry.times.to_wire()[..])
                .arg(&marked.times.to_wire()[..]);
            let mut conn = self.conn.clone();
            Some(async move { call.invoke_async::<u64>(&mut conn).await })
        });
        let marks: Vec<_> = marks.collect();
        if marks.is_empty() {
            return Ok(0);
        }
        let done = self.bounded("soft purge mark", try_join_all(marks)).await?;
        Ok(done.iter().sum())
    }
}
