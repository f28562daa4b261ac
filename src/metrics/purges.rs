//! The metrics of purges (see [`crate::purge`]): how many were asked for, and how many entries
//! they removed or — soft purges — marked stale.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

use super::{KindLabel, Metrics};
use crate::purge::Mode;

/// What purges did.
pub(super) struct PurgeMetrics {
    purges: Family<KindLabel, Counter>,
    purged_entries: Counter,
    soft_purged_entries: Counter,
}

impl PurgeMetrics {
    pub(super) fn register(registry: &mut Registry) -> PurgeMetrics {
        let purges = PurgeMetrics {
            purges: Family::default(),
            purged_entries: Counter::default(),
            soft_purged_entries: Counter::default(),
        };
        registry.register(
            "purges",
            "Purge requests, by kind (url, route, tag), hard or soft",
            purges.purges.clone(),
        );
        registry.register(
            "purged_entries",
            "Entries removed from Redis by (hard) purges",
            purges.purged_entries.clone(),
        );
        registry.register(
            "soft_purged_entries",
            "Entries marked stale in Redis by soft purges (in L1, embedded): each is served stale while one refresh runs",
            purges.soft_purged_entries.clone(),
        );
        purges
    }
}

impl Metrics {
    /// One purge of `kind`, which removed `entries` or (soft) marked them stale.
    pub fn purge(&self, kind: &'static str, mode: Mode, entries: u64) {
        let purges = &self.purges;
        purges.purges.get_or_create(&KindLabel { kind }).inc();
        match mode {
            Mode::Delete => purges.purged_entries.inc_by(entries),
            Mode::MarkStale { .. } => purges.soft_purged_entries.inc_by(entries),
        };
    }
}
