//! How the hub's calls to Redis are bounded: through the breaker, within a budget, counted.

use std::sync::Arc;
use std::time::Duration;

use crate::breaker::Breaker;
use crate::l2::{L2Error, PATIENCE, guarded, patiently};
use crate::metrics::Metrics;

/// How each (un)subscription is bounded: through the breaker, within the budget of a lock
/// decision (a failed SUBSCRIBE makes a waiter fill on its own), counted in the metrics.
pub(super) struct Bounds {
    pub(super) breaker: Arc<Breaker>,
    pub(super) metrics: Arc<Metrics>,
    pub(super) timeout: Duration,
}

impl Bounds {
    /// A call whose failure costs little: within one budget.
    pub(super) async fn guarded<T>(
        &self,
        op: &'static str,
        call: impl Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, L2Error> {
        guarded(&self.breaker, &self.metrics, op, self.timeout, call).await
    }

    /// A subscription a waiter waits for: patiently while Redis keeps answering.
    pub(super) async fn patiently<T>(
        &self,
        op: &'static str,
        call: impl Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, L2Error> {
        let (breaker, metrics) = (&self.breaker, &self.metrics);
        patiently(breaker, metrics, op, self.timeout, PATIENCE, call).await
    }
}
