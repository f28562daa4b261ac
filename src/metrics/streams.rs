//! The metrics of streamed fills (see [`crate::relay`]).

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

use super::{Metrics, RouteLabel, RouteOutcome};

/// What streamed fills did (see [`crate::relay`]).
pub(super) struct StreamMetrics {
    ended: Family<RouteOutcome, Counter>,
    bytes: Family<RouteLabel, Counter>,
    readers_cut: Family<RouteLabel, Counter>,
    bytes_saved: Family<RouteLabel, Counter>,
    tails: Family<RouteOutcome, Counter>,
}

impl StreamMetrics {
    pub(super) fn register(registry: &mut Registry) -> StreamMetrics {
        let streams = StreamMetrics {
            ended: Family::default(),
            bytes: Family::default(),
            readers_cut: Family::default(),
            bytes_saved: Family::default(),
            tails: Family::default(),
        };
        registry.register(
            "streamed_fills",
            "Fills whose body was relayed to their requesters while it arrived, by route and how the body ended (`outcome`: complete or aborted)",
            streams.ended.clone(),
        );
        registry.register(
            "streamed_bytes",
            "Bytes of upstream answers relayed by streamed fills, by route",
            streams.bytes.clone(),
        );
        registry.register(
            "stream_readers_cut",
            "Readers of a streamed fill cut for falling more than the relay's window behind the fastest one, by route",
            streams.readers_cut.clone(),
        );
        registry.register(
            "collapsed_bytes_saved",
            "Upstream bytes that collapsing saved: bytes of streamed fills times the requesters beyond the first that read them, by route",
            streams.bytes_saved.clone(),
        );
        registry.register(
            "relay_tails",
            "Another instance's streamed fills read here from their relay log, by route and how the tail ended (`outcome`: complete, or aborted: every reader here cut)",
            streams.tails.clone(),
        );
        streams
    }
}

impl Metrics {
    /// The counter of readers of `route`'s streamed fills cut for falling behind.
    pub fn stream_cuts(&self, route: &str) -> Counter {
        self.streams
            .readers_cut
            .get_or_create(&RouteLabel {
                route: route.to_owned(),
            })
            .clone()
    }

    /// A streamed fill ended: `end` says how, having relayed `bytes` to `readers` requesters, of
    /// (readers cut are counted as they are cut: [`Metrics::stream_cuts`]).
    pub fn stream_ended(&self, route: &str, end: &crate::relay::End, bytes: u64, readers: u64) {
        let outcome = end.as_str();
        let s = &self.streams;
        let route = route.to_owned();
        s.ended
            .get_or_create(&RouteOutcome {
                route: route.clone(),
                outcome,
            })
            .inc();
        let label = RouteLabel { route };
        s.bytes.get_or_create(&label).inc_by(bytes);
        s.bytes_saved
            .get_or_create(&label)
            .inc_by(bytes.saturating_mul(readers.saturating_sub(1)));
    }

    /// This instance's tail of another instance's streamed fill ended as `end` says; on
    /// `aborted` every reader of it here was cut (whatever the cause: the log said so, a gap,
    /// the leader or Redis silent, `upstream_timeout`).
    pub fn tail_ended(&self, route: &str, end: &crate::relay::End) {
        self.streams
            .tails
            .get_or_create(&RouteOutcome {
                route: route.to_owned(),
                outcome: end.as_str(),
            })
            .inc();
    }
}
