//! The fence between purges and the fills they race (see [`Fence`]).

use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use super::Purge;
use crate::key::CacheKey;

/// Most purges a [`Fence`] remembers; a fill older than all of them is refused its store.
const FENCE_MEMORY: usize = 256;

/// The purges this process applied lately, numbered, so that a fill which began before one of
/// them does not store the answer it removed — the purge wins the race. A fill takes a
/// [`Fence::mark`] when its request arrives and asks [`Fence::purged_since`] before storing.
/// Fleet-wide the same holds through Redis: a key purge marks the key's fill lock, and the store
/// under it is refused (see `StoreOutcome::Purged`).
#[derive(Debug, Default)]
pub struct Fence {
    /// The number the next purge gets.
    next: AtomicU64,
    recent: Mutex<VecDeque<(u64, Purge)>>,
}

impl Fence {
    /// The fence's position now: purges recorded from here on are "since" this mark.
    pub fn mark(&self) -> u64 {
        self.next.load(Ordering::Acquire)
    }

    pub fn record(&self, purge: &Purge) {
        let mut recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        let seq = self.next.fetch_add(1, Ordering::AcqRel);
        if recent.len() == FENCE_MEMORY {
            recent.pop_front();
        }
        recent.push_back((seq, purge.clone()));
    }

    /// Whether a purge recorded from `from` up to (not including) `to` covers an entry of
    /// `route` under `key` with `tags`. When the fence no longer remembers back to `from`, it
    /// answers yes.
    pub fn purged_between(
        &self,
        (from, to): (u64, u64),
        route: &str,
        key: &CacheKey,
        tags: &[String],
    ) -> bool {
        if from == to {
            return false;
        }
        let recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        if recent.front().is_none_or(|(oldest, _)| *oldest > from) {
            return true;
        }
        recent
            .iter()
            .any(|(seq, purge)| (from..to).contains(seq) && purge.covers(route, key, tags))
    }

    /// Whether a purge recorded since `mark` covers an entry of `route` under `key` with
    /// `tags`. When more purges came since than the fence remembers, it answers yes.
    pub fn purged_since(&self, mark: u64, route: &str, key: &CacheKey, tags: &[String]) -> bool {
        self.mark() != mark && self.purged_between((mark, u64::MAX), route, key, tags)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fence_tells_a_late_joiner_whether_a_purge_came_between_a_flight_and_it() {
        let fence = Fence::default();
        let key = CacheKey::parse(&"ab".repeat(32)).expect("a key");
        let began = fence.mark();
        fence.record(&Purge::Route("recs".into()));
        let joined = fence.mark();
        assert!(fence.purged_between((began, joined), "recs", &key, &[]));
        assert!(!fence.purged_between((began, joined), "other", &key, &[]));
        // A purge after the join is not between: the fill's own requests keep its answer.
        fence.record(&Purge::Route("other".into()));
        assert!(!fence.purged_between((joined, fence.mark()), "recs", &key, &[]));
        assert!(!fence.purged_between((joined, joined), "recs", &key, &[]));
    }

    #[test]
    fn the_fence_tells_a_fill_whether_a_purge_since_its_start_covers_it() {
        let key = |b: &[u8]| {
            let mut h = crate::key::KeyHasher::new();
            h.field(b);
            h.finish()
        };
        let fence = Fence::default();
        let mark = fence.mark();
        let tags = vec!["article-7".to_owned()];
        assert!(!fence.purged_since(mark, "r", &key(b"a"), &tags));
        fence.record(&Purge::Key {
            route: "r".into(),
            key: key(b"b"),
        });
        assert!(
            !fence.purged_since(mark, "r", &key(b"a"), &tags),
            "another key"
        );
        fence.record(&Purge::Tag("article-7".into()));
        assert!(fence.purged_since(mark, "r", &key(b"a"), &tags), "its tag");
        let later = fence.mark();
        assert!(
            !fence.purged_since(later, "r", &key(b"a"), &tags),
            "before it began"
        );
        fence.record(&Purge::Route("other".into()));
        assert!(!fence.purged_since(later, "r", &key(b"a"), &tags));
        fence.record(&Purge::Route("r".into()));
        assert!(
            fence.purged_since(later, "r", &key(b"a"), &tags),
            "its route"
        );
        for _ in 0..FENCE_MEMORY {
            fence.record(&Purge::Route("other".into()));
        }
        assert!(
            fence.purged_since(mark, "r", &key(b"zz"), &[]),
            "older than the fence remembers: refused"
        );
    }
}
