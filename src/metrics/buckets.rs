//! The buckets of Corral's histograms.

use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};

/// Buckets for Corral's own answers: a hit takes microseconds, a fill the upstream's time.
pub(super) fn answer_histogram() -> Histogram {
    // 50 µs … ~26 s.
    Histogram::new(exponential_buckets(0.000_05, 2.0, 20))
}

pub(super) fn latency_histogram() -> Histogram {
    // 1 ms … ~65 s.
    Histogram::new(exponential_buckets(0.001, 2.0, 17))
}
