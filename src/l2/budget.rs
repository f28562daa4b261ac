//! How one Redis call is bounded: its budget, the patience of a lock decision, and what its
//! outcome tells the breaker about Redis.

use std::future::Future;
use std::time::Duration;

use redis::aio::ConnectionManagerConfig;

use super::L2Error;
use crate::breaker::{Breaker, Fault};
use crate::metrics::Metrics;

/// How long a lock decision may wait for Redis in all while Redis keeps answering other calls
/// (see [`patiently`]).
pub(crate) const PATIENCE: Duration = Duration::from_secs(10);

/// Connection settings shared by the command and the notice connections: each call is bounded
/// by its own budget (see [`guarded`]); the connection itself gives up on an answer only after
/// [`PATIENCE`], and reconnects in the background.
///
/// Two connection attempts per reconnect, 10 ms apart: every command waits for the manager's
/// attempts, so a longer backoff there would make a refused connection (Redis down) cost each
/// call hundreds of milliseconds instead of a few — and a call that runs out of its budget is a
/// late answer to the breaker, not an outage, so it would never open. Sending again is decided
/// per command, above (`l2/connection.rs`), and the circuit's probe reconnects.
pub(crate) fn manager_config(timeout: Duration) -> ConnectionManagerConfig {
    ConnectionManagerConfig::new()
        .set_response_timeout(Some(PATIENCE.max(timeout)))
        .set_connection_timeout(Some(timeout.max(Duration::from_millis(200))))
        .set_number_of_retries(1)
        .set_min_delay(Duration::from_millis(10))
        .set_max_delay(Duration::from_millis(50))
}

/// Runs one Redis call within `budget`, through the breaker: refused at once while it is open,
/// and every outcome counted — as evidence for the breaker by what it says about Redis (see
/// [`crate::breaker`]): any reply is proof of life, a dropped connection evidence of an outage, a
/// call past its budget only a late answer.
pub(crate) async fn guarded<T>(
    breaker: &Breaker,
    metrics: &Metrics,
    op: &'static str,
    budget: Duration,
    call: impl Future<Output = redis::RedisResult<T>>,
) -> Result<T, L2Error> {
    patiently(breaker, metrics, op, budget, budget, call).await
}

/// [`guarded`], for a call whose giving up costs an upstream call: past its `budget` it waits
/// on, a budget at a time and up to `ceiling` in all, as long as Redis answered some other call
/// during the last budget — it is alive and this call is queued behind others (a burst on a
/// busy machine), not lost. Only silence gives up: a stalled or dead Redis costs one budget.
pub(crate) async fn patiently<T>(
    breaker: &Breaker,
    metrics: &Metrics,
    op: &'static str,
    budget: Duration,
    ceiling: Duration,
    call: impl Future<Output = redis::RedisResult<T>>,
) -> Result<T, L2Error> {
    if !breaker.allows() {
        metrics.redis_error(op);
        return Err(L2Error::CircuitOpen { op });
    }
    let started = tokio::time::Instant::now();
    let mut due = started + budget;
    let mut call = std::pin::pin!(call);
    let result = loop {
        match tokio::time::timeout_at(due, &mut call).await {
            Ok(Ok(v)) => break Ok(v),
            Ok(Err(source)) => break Err(L2Error::Redis { op, source }),
            Err(_) => {
                let now = tokio::time::Instant::now();
                // A timer that fired well after it was due means this process was starved of
                // CPU: the replies may be waiting unread, so the silence proves nothing.
                let starved = now.duration_since(due) > budget / 4;
                let alive = starved || breaker.answered_within(budget);
                if alive && now.duration_since(started) + budget <= ceiling {
                    due = now + budget;
                    continue;
                }
                break Err(L2Error::Timeout {
                    op,
                    budget: now.duration_since(started),
                });
            }
        }
    };
    match &result {
        Ok(_) => breaker.success(),
        Err(err) => {
            metrics.redis_error(op);
            match err.fault() {
                Some(fault) => breaker.failure(fault),
                // Redis answered, with an error: it is alive.
                None => breaker.success(),
            }
        }
    }
    result
}

impl L2Error {
    /// What this failure says about Redis: `None` when Redis answered (an error reply).
    pub fn fault(&self) -> Option<Fault> {
        match self {
            L2Error::Timeout { .. } => Some(Fault::Late),
            L2Error::Redis { source, .. } if source.is_timeout() => Some(Fault::Late),
            L2Error::Redis { source, .. }
                if source.is_io_error()
                    || source.is_connection_dropped()
                    || source.is_connection_refusal() =>
            {
                Some(Fault::Outage)
            }
            L2Error::Redis { .. } => None,
            L2Error::Pubsub(_) => Some(Fault::Outage),
            L2Error::CircuitOpen { .. } => None,
            // A fault of this process's own thread, not news of Redis.
            L2Error::Keeper(_) => None,
        }
    }
}
