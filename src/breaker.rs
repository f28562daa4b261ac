//! The circuit breaker in front of Redis.
//!
//! While Redis is down or stalled, every call would cost a full `[redis] timeout` before Corral
//! falls back to filling on its own. The breaker opens after a few consecutive failures and then
//! fails calls at once; after a cool-down it lets calls through again (half-open) and the first
//! success closes it. Its state is what `/readyz` reports as `degraded`.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

use tokio::time::Instant;

/// Consecutive failures that open the circuit.
const TRIP_AFTER: u32 = 3;
/// How long an open circuit fails calls at once before letting them try again.
const COOL_DOWN: Duration = Duration::from_secs(1);

/// A circuit breaker for one Redis deployment. Shared by every connection to it; the hot path
/// (closed circuit) touches atomics only.
#[derive(Debug, Default)]
pub struct Breaker {
    failures: AtomicU32,
    open: AtomicBool,
    open_until: Mutex<Option<Instant>>,
}

impl Breaker {
    /// Whether a call may go to Redis now: closed, or open but cooled down (half-open).
    pub fn allows(&self) -> bool {
        if !self.open.load(Ordering::Acquire) {
            return true;
        }
        self.until().is_none_or(|until| Instant::now() >= until)
    }

    pub fn success(&self) {
        if self.failures.load(Ordering::Relaxed) != 0 {
            self.failures.store(0, Ordering::Relaxed);
        }
        if self.open.swap(false, Ordering::AcqRel) {
            *self.lock() = None;
            tracing::info!("redis answers again: circuit closed, leaving degraded mode");
        }
    }

    pub fn failure(&self) {
        let failures = self
            .failures
            .fetch_add(1, Ordering::Relaxed)
            .saturating_add(1);
        if failures >= TRIP_AFTER {
            *self.lock() = Some(Instant::now() + COOL_DOWN);
            if !self.open.swap(true, Ordering::AcqRel) {
                tracing::warn!(
                    failures,
                    "redis unreachable: circuit open, serving degraded (L1 and in-process coalescing)"
                );
            }
        }
    }

    /// Whether the circuit is open (Redis considered down).
    pub fn is_open(&self) -> bool {
        self.open.load(Ordering::Acquire)
    }

    fn until(&self) -> Option<Instant> {
        *self.lock()
    }

    /// A plain `Option<Instant>` cannot be left half-written: carry on after a poisoning panic.
    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Instant>> {
        self.open_until.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn opens_after_consecutive_failures_and_closes_on_success() {
        let b = Breaker::default();
        b.failure();
        b.failure();
        b.success();
        b.failure();
        b.failure();
        assert!(b.allows(), "a success resets the streak");
        b.failure();
        assert!(b.is_open());
        assert!(!b.allows(), "open: calls fail at once");
        tokio::time::advance(COOL_DOWN).await;
        assert!(b.allows(), "half-open after the cool-down");
        b.success();
        assert!(!b.is_open());
    }
}
