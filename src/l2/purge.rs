//! Purges and the tag index in Redis: what `POST /purge` deletes (or marks stale, `l2/soft.rs`),
//! and the sets that let a purge by tag find its entries. Either is followed by one PUBLISH on the
//! invalidation channel, which every instance applies to its L1 (see [`crate::purge`]).
//!
//! That PUBLISH is classic (broadcast) in every topology. In a cluster redis-rs routes it to the
//! master of the channel's slot; when that master is down, its connection is not usable and
//! redis-rs sends the command to another connected node instead — which is right for a classic
//! PUBLISH, since any node relays it to all the others (tests/sharded.rs kills that node and
//! purges).

use futures_util::future::try_join_all;

use super::connection::ScanTarget;
use super::{KeyNames, L2, L2Error, PURGED_LOCK, invalidation_channel, millis};
use crate::entry::{Entry, now_ms};
use crate::purge::{Mode, Purge, PurgeOrder};

impl L2 {
    /// Indexes a stored entry under its tags, each index living as long as its longest entry.
    /// Best effort: a failure is logged, and only purge-by-tag misses that entry. Used where the
    /// indexes cannot go with the entry's own write (a cluster; see `fleet/scripts.rs` and [`L2::put`]).
    ///
    /// One pipeline per tag, sent together: each index is a key of its own, and in a cluster a
    /// pipeline must stay within one slot.
    pub async fn index_tags(&self, names: &KeyNames, entry: &Entry) {
        let Some(ttl) = entry.times.remaining(now_ms()) else {
            return;
        };
        let pipes = entry.tags.iter().map(|tag| {
            let mut pipe = redis::pipe();
            self.index_in(&mut pipe, names, tag, ttl);
            let mut conn = self.conn.clone();
            async move { pipe.query_async::<()>(&mut conn).await }
        });
        let pipes: Vec<_> = pipes.collect();
        if pipes.is_empty() {
            return;
        }
        if let Err(err) = self.bounded("tag index", try_join_all(pipes)).await {
            tracing::warn!(key = %names.entry, %err, "could not index the entry's tags");
        }
    }

    /// Adds to `pipe` the commands that index the entry of `names` under `tag` for `ttl`.
    pub(super) fn index_in(
        &self,
        pipe: &mut redis::Pipeline,
        names: &KeyNames,
        tag: &str,
        ttl: std::time::Duration,
    ) {
        let index = self.tag_index(tag);
        pipe.cmd("SADD").arg(&index).arg(&names.entry).ignore();
        // A new set has no TTL: NX gives it one; GT only ever lengthens it.
        for flag in ["NX", "GT"] {
            pipe.cmd("PEXPIRE")
                .arg(&index)
                .arg(millis(ttl))
                .arg(flag)
                .ignore();
        }
    }

    /// Removes what `order` names from Redis, or marks it stale there, then tells every
    /// instance to do the same in its L1. Returns how many entries were deleted or marked.
    pub async fn purge(&self, order: &PurgeOrder) -> Result<u64, L2Error> {
        let purge = &order.purge;
        let done = match order.mode {
            Mode::Delete => self.delete_covered(purge).await?,
            Mode::MarkStale { at } => self.mark_stale(purge, at).await?,
        };
        let mut conn = self.conn.clone();
        let _: i64 = self
            .bounded(
                "purge PUBLISH",
                redis::cmd("PUBLISH")
                    .arg(self.invalidation_channel())
                    .arg(order.payload())
                    .query_async(&mut conn),
            )
            .await?;
        Ok(done)
    }

    /// Deletes what `purge` names from Redis; returns how many entries were deleted.
    async fn delete_covered(&self, purge: &Purge) -> Result<u64, L2Error> {
        let mut conn = self.conn.clone();
        let deleted = match purge {
            Purge::Key { route, key } => {
                let names = self.names(route, key);
                let n: u64 = self
                    .bounded(
                        "purge DEL",
                        redis::cmd("DEL").arg(&names.entry).query_async(&mut conn),
                    )
                    .await?;
                let _: u64 = self
                    .bounded(
                        "purge DEL",
                        redis::cmd("DEL").arg(&names.pass).query_async(&mut conn),
                    )
                    .await?;
                // A fill under way began before this purge: mark its lock (keeping its TTL) so
                // its store is refused and its waiters fill again (see `StoreOutcome::Purged`).
                let mut fence = redis::cmd("SET");
                fence
                    .arg(&names.lock)
                    .arg(PURGED_LOCK)
                    .arg("XX")
                    .arg("KEEPTTL");
                let _: Option<String> = self
                    .bounded("purge fence", fence.query_async(&mut conn))
                    .await?;
                n
            }
            Purge::Route(route) => {
                let ns = &self.namespace;
                let mut n = self
                    .delete_matching(&format!("corral:{ns}:{route}:{{*"))
                    .await?;
                n += self
                    .delete_matching(&format!("corral:{ns}:{route}:pass:*"))
                    .await?;
                n
            }
            Purge::Tag(tag) => {
                let index = self.tag_index(tag);
                let members: Vec<String> = self
                    .bounded(
                        "purge SMEMBERS",
                        redis::cmd("SMEMBERS").arg(&index).query_async(&mut conn),
                    )
                    .await?;
                let mut n = 0;
                for batch in members.chunks(256) {
                    n += self.delete(batch).await?;
                }
                self.delete(&[index]).await?;
                n
            }
            Purge::All => 0,
        };
        Ok(deleted)
    }

    /// The channel every instance listens on for purges.
    pub fn invalidation_channel(&self) -> String {
        invalidation_channel(&self.namespace)
    }

    /// The set of entry keys carrying `tag`. Its `#tags` segment holds a character no route name
    /// may contain, so no tag can make it equal an entry key (`corral:{ns}:{route}:{{hex}}`) or any
    /// other key of a route.
    pub(crate) fn tag_index(&self, tag: &str) -> String {
        tag_index(&self.namespace, tag)
    }

    /// `DEL` of `keys`; in a cluster redis-rs splits it by slot and adds up the counts.
    async fn delete(&self, keys: &[String]) -> Result<u64, L2Error> {
        if keys.is_empty() {
            return Ok(0);
        }
        let mut conn = self.conn.clone();
        self.bounded(
            "purge DEL",
            redis::cmd("DEL").arg(keys).query_async(&mut conn),
        )
        .await
    }

    /// Deletes every key matching `pattern`, SCANning in batches (never `KEYS`) — on the server,
    /// or on every master of a cluster in turn.
    async fn delete_matching(&self, pattern: &str) -> Result<u64, L2Error> {
        let mut conn = self.conn.clone();
        let targets = self
            .bounded("purge CLUSTER SLOTS", conn.scan_targets())
            .await?;
        let mut deleted = 0;
        for target in &targets {
            deleted += self.delete_matching_on(target, pattern).await?;
        }
        Ok(deleted)
    }

    async fn delete_matching_on(&self, target: &ScanTarget, pattern: &str) -> Result<u64, L2Error> {
        let mut conn = self.conn.clone();
        let mut cursor: u64 = 0;
        let mut deleted = 0;
        loop {
            let (next, keys) = self
                .bounded("purge SCAN", conn.scan(target, cursor, pattern, 1000))
                .await?;
            deleted += self.delete(&keys).await?;
            if next == 0 {
                return Ok(deleted);
            }
            cursor = next;
        }
    }
}

/// The Redis key of the set of entries carrying `tag` in `namespace`; see [`L2::tag_index`].
pub fn tag_index(namespace: &str, tag: &str) -> String {
    format!("corral:{namespace}:#tags:{tag}")
}
