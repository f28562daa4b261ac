//! L1: the in-process cache (moka), bounded by bytes; each entry lives until its own `stale_until`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use moka::Expiry;
use moka::future::Cache;

use crate::entry::{Entry, now_ms};
use crate::key::CacheKey;

/// The in-process tier. Cloning shares the same cache.
#[derive(Clone)]
pub struct L1 {
    cache: Cache<CacheKey, Arc<Entry>>,
}

impl L1 {
    pub fn new(max_bytes: u64) -> L1 {
        let cache = Cache::builder()
            .max_capacity(max_bytes)
            .weigher(|_key: &CacheKey, entry: &Arc<Entry>| entry.weight())
            .expire_after(OwnLifetime)
            .build();
        L1 { cache }
    }

    /// The entry for `key`, if present and not past its `stale_until`.
    pub async fn get(&self, key: &CacheKey) -> Option<Arc<Entry>> {
        let entry = self.cache.get(key).await?;
        // moka's expiry has its own clock granularity; the entry's own wall-clock bound decides.
        (entry.times.stale_until() > now_ms()).then_some(entry)
    }

    /// Stores an entry for its remaining life; an entry already dead is not stored.
    pub async fn insert(&self, key: CacheKey, entry: Arc<Entry>) {
        if entry.times.remaining(now_ms()).is_some() {
            self.cache.insert(key, entry).await;
        }
    }

    pub async fn remove(&self, key: &CacheKey) {
        self.cache.invalidate(key).await;
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

/// Expires every entry at its own `stale_until`, on creation and on replacement alike.
struct OwnLifetime;

impl Expiry<CacheKey, Arc<Entry>> for OwnLifetime {
    fn expire_after_create(
        &self,
        _key: &CacheKey,
        entry: &Arc<Entry>,
        _created_at: Instant,
    ) -> Option<Duration> {
        Some(entry.times.remaining(now_ms()).unwrap_or(Duration::ZERO))
    }

    fn expire_after_update(
        &self,
        _key: &CacheKey,
        entry: &Arc<Entry>,
        _updated_at: Instant,
        _duration_until_expiry: Option<Duration>,
    ) -> Option<Duration> {
        Some(entry.times.remaining(now_ms()).unwrap_or(Duration::ZERO))
    }
}
