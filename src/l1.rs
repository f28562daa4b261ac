//! L1: the in-process cache (moka), bounded by bytes; each entry lives until its own `stale_until`,
//! or a while longer when it has a validator, to be revalidated ([`Entry::kept_until`]).

use std::future::Future;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use moka::Expiry;
use moka::future::Cache;
use moka::ops::compute::Op;

use crate::entry::{Entry, now_ms};
use crate::key::CacheKey;
use crate::purge::{Fence, Mode, Purge, PurgeOrder};

/// The in-process tier. Cloning shares the same cache.
#[derive(Clone)]
pub struct L1 {
    cache: Cache<CacheKey, Cached>,
    /// The purges applied to this cache lately (see [`Fence`]).
    fence: Arc<Fence>,
}

/// An entry and the route it belongs to (so a route purge can find it).
#[derive(Clone)]
struct Cached {
    route: Arc<str>,
    entry: Arc<Entry>,
}

impl L1 {
    pub fn new(max_bytes: u64) -> L1 {
        let cache = Cache::builder()
            .max_capacity(max_bytes)
            .weigher(|_key: &CacheKey, cached: &Cached| cached.entry.weight())
            .expire_after(OwnLifetime)
            .support_invalidation_closures()
            .build();
        L1 {
            cache,
            fence: Arc::default(),
        }
    }

    /// The purges applied to this cache lately, for fills to check before they store.
    pub fn fence(&self) -> &Fence {
        &self.fence
    }

    /// The entry for `key`, if present and not past its [`Entry::kept_until`] at `now` (Unix ms):
    /// past its `stale_until` it is `Expired`, kept only to revalidate.
    pub async fn get(&self, key: &CacheKey, now: u64) -> Option<Arc<Entry>> {
        let cached = self.cache.get(key).await?;
        // moka's expiry has its own clock granularity; the entry's own wall-clock bound decides.
        cached.entry.kept_at(now).then_some(cached.entry)
    }

    /// [`L1::get`] when it answers without waiting, as it nearly always does (moka's lookup
    /// waits only when it takes its turn at the cache's upkeep and that yields): for the hit
    /// path, which then needs no future of its own. `None` also when it would wait; the caller
    /// then looks again with [`L1::get`]. moka's lookups are safe to drop part-way.
    pub fn get_now(&self, key: &CacheKey, now: u64) -> Option<Arc<Entry>> {
        let get = std::pin::pin!(self.get(key, now));
        match get.poll(&mut Context::from_waker(Waker::noop())) {
            Poll::Ready(found) => found,
            Poll::Pending => None,
        }
    }

    /// Stores an entry of `route` for as long as it is kept ([`Entry::kept_until`]); an entry
    /// already past that is not stored.
    pub async fn insert(&self, key: CacheKey, route: &str, entry: Arc<Entry>) {
        if entry.kept_for(now_ms()).is_some() {
            let route = Arc::from(route);
            self.cache.insert(key, Cached { route, entry }).await;
        }
    }

    /// Applies a purge order: drops what it names ([`L1::purge`]) or marks it stale
    /// ([`L1::mark_stale`]); returns how many entries it removed or marked.
    pub async fn apply(&self, order: &PurgeOrder) -> u64 {
        match order.mode {
            Mode::Delete => self.purge(&order.purge).await,
            Mode::MarkStale { at } => self.mark_stale(&order.purge, at).await,
        }
    }

    /// Marks what `purge` names stale as of `at` (see [`Entry::marked_stale`]): each entry that
    /// was fresh then is replaced by its marked copy. The swap reads the entry held at that
    /// moment, so one a fill stored since `at` is left alone. Not recorded in the [`Fence`]: a
    /// fill under way may still store, as a refresh would. Returns how many entries were marked.
    pub async fn mark_stale(&self, purge: &Purge, at: u64) -> u64 {
        let keys: Vec<CacheKey> = match purge {
            Purge::Key { key, .. } => vec![*key],
            _ => self
                .cache
                .iter()
                .filter(|(key, cached)| purge.covers(&cached.route, key, &cached.entry.tags))
                .map(|(key, _)| *key)
                .collect(),
        };
        let mut marked = 0;
        for key in keys {
            let swap = self.cache.entry(key).and_compute_with(|held| {
                let replaced = held.and_then(|held| {
                    let cached = held.into_value();
                    let marked = cached.entry.marked_stale(at)?;
                    Some(Cached {
                        route: cached.route,
                        entry: Arc::new(marked),
                    })
                });
                let op = match replaced {
                    Some(cached) if purge.covers(&cached.route, &key, &cached.entry.tags) => {
                        Op::Put(cached)
                    }
                    _ => Op::Nop,
                };
                std::future::ready(op)
            });
            if matches!(swap.await, moka::ops::compute::CompResult::ReplacedWith(_)) {
                marked += 1;
            }
        }
        marked
    }

    /// Drops what `purge` names (and records it in the [`Fence`] when fills must heed it); returns
    /// how many entries this cache held.
    pub async fn purge(&self, purge: &Purge) -> u64 {
        if purge.fences() {
            self.fence.record(purge);
        }
        match purge {
            Purge::Key { key, .. } => self.remove(key).await,
            Purge::Route(route) => self.remove_route(route),
            Purge::Tag(tag) => self.remove_tag(tag),
            Purge::All => self.clear(),
        }
    }

    /// Drops every entry of a route. Takes effect at once for readers; the memory is reclaimed
    /// by moka's maintenance.
    pub fn remove_route(&self, route: &str) -> u64 {
        let route: Arc<str> = Arc::from(route);
        self.remove_if(move |cached| cached.route == route)
    }

    /// Drops every entry carrying `tag`.
    pub fn remove_tag(&self, tag: &str) -> u64 {
        let tag = tag.to_owned();
        self.remove_if(move |cached| cached.entry.tags.contains(&tag))
    }

    /// Drops everything; returns how many entries there were.
    pub fn clear(&self) -> u64 {
        let n = self.cache.entry_count();
        self.cache.invalidate_all();
        n
    }

    /// Drops the entries `matches` picks; returns how many there were.
    fn remove_if(&self, matches: impl Fn(&Cached) -> bool + Send + Sync + 'static) -> u64 {
        let held = self
            .cache
            .iter()
            .filter(|(_, cached)| matches(cached))
            .count() as u64;
        if let Err(err) = self
            .cache
            .invalidate_entries_if(move |_, cached| matches(cached))
        {
            tracing::warn!(%err, "could not purge selectively from L1; dropping all of L1");
            self.cache.invalidate_all();
        }
        held
    }

    /// Drops one entry; returns 1 if it was held.
    pub async fn remove(&self, key: &CacheKey) -> u64 {
        u64::from(self.cache.remove(key).await.is_some())
    }

    /// Entries currently held (after pending maintenance has run).
    pub async fn entry_count(&self) -> u64 {
        self.cache.run_pending_tasks().await;
        self.cache.entry_count()
    }

    /// Bytes currently held, as the weigher counts them.
    pub async fn weighted_size(&self) -> u64 {
        self.cache.run_pending_tasks().await;
        self.cache.weighted_size()
    }
}

/// Keys whose last answer could not be shared (personal, or too large), each for its route's
/// `uncacheable_ttl`: their requests go straight to the upstream instead of queueing behind one
/// another for an answer they could not share. Bounded in count.
#[derive(Clone)]
pub struct PassMarks {
    marks: moka::sync::Cache<CacheKey, Duration>,
}

/// Most keys marked at once; the oldest go first.
const MAX_MARKS: u64 = 100_000;

impl PassMarks {
    pub fn new() -> PassMarks {
        let marks = moka::sync::Cache::builder()
            .max_capacity(MAX_MARKS)
            .expire_after(MarkLifetime)
            .build();
        PassMarks { marks }
    }

    /// Marks `key` for `ttl`; a zero `ttl` marks nothing.
    pub fn insert(&self, key: CacheKey, ttl: Duration) {
        if !ttl.is_zero() {
            self.marks.insert(key, ttl);
        }
    }

    pub fn contains(&self, key: &CacheKey) -> bool {
        self.marks.contains_key(key)
    }

    pub fn remove(&self, key: &CacheKey) {
        self.marks.invalidate(key);
    }
}

impl Default for PassMarks {
    fn default() -> Self {
        PassMarks::new()
    }
}

struct MarkLifetime;

impl Expiry<CacheKey, Duration> for MarkLifetime {
    fn expire_after_create(
        &self,
        _key: &CacheKey,
        ttl: &Duration,
        _at: Instant,
    ) -> Option<Duration> {
        Some(*ttl)
    }

    fn expire_after_update(
        &self,
        _key: &CacheKey,
        ttl: &Duration,
        _at: Instant,
        _left: Option<Duration>,
    ) -> Option<Duration> {
        Some(*ttl)
    }
}

/// Expires every entry at its own [`Entry::kept_until`], on creation and on replacement alike.
struct OwnLifetime;

impl Expiry<CacheKey, Cached> for OwnLifetime {
    fn expire_after_create(
        &self,
        _key: &CacheKey,
        cached: &Cached,
        _created_at: Instant,
    ) -> Option<Duration> {
        Some(cached.entry.kept_for(now_ms()).unwrap_or(Duration::ZERO))
    }

    fn expire_after_update(
        &self,
        _key: &CacheKey,
        cached: &Cached,
        _updated_at: Instant,
        _duration_until_expiry: Option<Duration>,
    ) -> Option<Duration> {
        Some(cached.entry.kept_for(now_ms()).unwrap_or(Duration::ZERO))
    }
}
