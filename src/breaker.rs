//! The circuit breaker in front of Redis: it opens on evidence that Redis is down, not on late
//! answers during a burst.
//!
//! While Redis is down, every call would cost a full budget before Corral falls back to filling on
//! its own; the open breaker fails calls at once instead, and after a cool-down lets calls through
//! again (half-open) until one succeeds. Its state is what `/readyz` reports as `degraded`.
//!
//! What counts as evidence ([`Fault`]):
//! - **Outage** — a refused, reset or dropped connection. Three in a row with no answer between
//!   them open the circuit: Redis (or the path to it) is gone.
//! - **Late** — a call that ran out of its budget. During a burst of misses on a saturated machine
//!   many calls answer late while Redis is healthy, and giving up on them is what turns a burst
//!   into a stampede. So late answers open the circuit only when they are all there is: at least
//!   [`STALL_SAMPLES`] of them, spread over at least [`STALL_WINDOW`], with not one answer in
//!   between — a stalled Redis (SIGSTOP, a long `CLIENT PAUSE`), not a busy one.
//!
//! Any answer from Redis — even an error reply — is proof of life and closes the circuit.
//! Timing uses tokio's clock, so tests drive it under paused time.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

/// Outage faults in a row that open the circuit.
const TRIP_AFTER: u32 = 3;
/// Late answers (with no answer between them) that may open the circuit, if they also span
/// [`STALL_WINDOW`].
pub const STALL_SAMPLES: u32 = 8;
/// How long Redis must have given nothing but late answers before the circuit opens on them.
pub const STALL_WINDOW: Duration = Duration::from_secs(2);
/// How long an open circuit fails calls at once before letting them try again.
const COOL_DOWN: Duration = Duration::from_secs(1);

/// Why a Redis call failed, as evidence for the breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The connection was refused, reset or dropped: evidence of an outage.
    Outage,
    /// No answer within the call's budget: maybe a stall, maybe a busy moment.
    Late,
}

/// A circuit breaker for one Redis deployment, shared by every connection to it. The hot path
/// (closed circuit, a success) touches atomics only.
#[derive(Debug)]
pub struct Breaker {
    /// When Redis last answered any connection of this process.
    pulse: Arc<Pulse>,
    open: AtomicBool,
    /// Whether Redis has answered at least once since this process started.
    answered: AtomicBool,
    /// Whether any fault has been counted since the last answer (skips the lock on success).
    faulty: AtomicBool,
    state: Mutex<Streak>,
}

/// The faults since Redis last answered.
#[derive(Debug, Default)]
struct Streak {
    outages: u32,
    late: u32,
    /// When the first late answer of the streak came.
    late_since: Option<Instant>,
    open_until: Option<Instant>,
}

/// When Redis last answered, shared by the breakers of one process's connections: that Redis is
/// alive is a fact about Redis, seen on whichever connection answered last.
#[derive(Debug)]
pub struct Pulse {
    /// The origin of `last`.
    base: Instant,
    /// When Redis last answered, in µs since `base` (0: never).
    last: AtomicU64,
}

impl Default for Pulse {
    fn default() -> Pulse {
        Pulse {
            base: Instant::now(),
            last: AtomicU64::new(0),
        }
    }
}

impl Pulse {
    fn beat(&self) {
        let micros = u64::try_from(self.base.elapsed().as_micros()).unwrap_or(u64::MAX);
        self.last.fetch_max(micros.max(1), Ordering::Relaxed);
    }

    fn within(&self, window: Duration) -> bool {
        let last = self.last.load(Ordering::Relaxed);
        if last == 0 {
            return false;
        }
        let now = u64::try_from(self.base.elapsed().as_micros()).unwrap_or(u64::MAX);
        let window = u64::try_from(window.as_micros()).unwrap_or(u64::MAX);
        now.saturating_sub(last) <= window
    }
}

impl Default for Breaker {
    fn default() -> Breaker {
        Breaker::with_pulse(Arc::default())
    }
}

impl Breaker {
    /// A breaker for one connection that shares `pulse` with the process's other connections.
    pub fn with_pulse(pulse: Arc<Pulse>) -> Breaker {
        Breaker {
            pulse,
            open: AtomicBool::new(false),
            answered: AtomicBool::new(false),
            faulty: AtomicBool::new(false),
            state: Mutex::default(),
        }
    }

    /// Whether a call may go to Redis now: closed, or open but cooled down (half-open).
    pub fn allows(&self) -> bool {
        if !self.open.load(Ordering::Acquire) {
            return true;
        }
        self.lock()
            .open_until
            .is_none_or(|until| Instant::now() >= until)
    }

    /// Redis answered (a reply of any kind): the streak ends and the circuit closes.
    pub fn success(&self) {
        self.pulse.beat();
        if !self.answered.load(Ordering::Relaxed) {
            self.answered.store(true, Ordering::Relaxed);
        }
        if !self.faulty.load(Ordering::Acquire) {
            return;
        }
        *self.lock() = Streak::default();
        self.faulty.store(false, Ordering::Release);
        if self.open.swap(false, Ordering::AcqRel) {
            tracing::info!("redis answers again: circuit closed, leaving degraded mode");
        }
    }

    /// A call failed with `fault`; opens the circuit when the streak is evidence of an outage.
    pub fn failure(&self, fault: Fault) {
        let now = Instant::now();
        let mut streak = self.lock();
        self.faulty.store(true, Ordering::Release);
        match fault {
            Fault::Outage => streak.outages = streak.outages.saturating_add(1),
            Fault::Late => {
                streak.late = streak.late.saturating_add(1);
                streak.late_since.get_or_insert(now);
            }
        }
        let stalled = streak.late >= STALL_SAMPLES
            && streak
                .late_since
                .is_some_and(|since| now.duration_since(since) >= STALL_WINDOW);
        if streak.outages < TRIP_AFTER && !stalled {
            return;
        }
        streak.open_until = Some(now + COOL_DOWN);
        if !self.open.swap(true, Ordering::AcqRel) {
            let (outages, late) = (streak.outages, streak.late);
            drop(streak);
            tracing::warn!(
                outages,
                late,
                "redis unreachable: circuit open, serving degraded (L1 and in-process coalescing)"
            );
        }
    }

    /// Whether the circuit is open (Redis considered down).
    pub fn is_open(&self) -> bool {
        self.open.load(Ordering::Acquire)
    }

    /// Whether Redis answered any call within the last `window`: a call still waiting then is
    /// queued behind others, not lost — worth waiting for a while longer.
    /// Any connection sharing this breaker's pulse counts.
    pub fn answered_within(&self, window: Duration) -> bool {
        self.pulse.within(window)
    }

    /// Whether Redis has answered at least once since this process started.
    pub fn has_answered(&self) -> bool {
        self.answered.load(Ordering::Relaxed)
    }

    /// A `Streak` is plain counters: carry on after a poisoning panic.
    fn lock(&self) -> std::sync::MutexGuard<'_, Streak> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn outages_in_a_row_open_it_and_an_answer_closes_it() {
        let b = Breaker::default();
        b.failure(Fault::Outage);
        b.failure(Fault::Outage);
        b.success();
        b.failure(Fault::Outage);
        b.failure(Fault::Outage);
        assert!(b.allows(), "an answer resets the streak");
        b.failure(Fault::Outage);
        assert!(b.is_open());
        assert!(!b.allows(), "open: calls fail at once");
        tokio::time::advance(COOL_DOWN).await;
        assert!(b.allows(), "half-open after the cool-down");
        b.success();
        assert!(!b.is_open());
        assert!(b.has_answered());
    }

    #[tokio::test(start_paused = true)]
    async fn answered_within_looks_back_over_the_window_only() {
        let b = Breaker::default();
        assert!(!b.answered_within(Duration::from_secs(1)), "never answered");
        tokio::time::advance(Duration::from_millis(10)).await;
        b.success();
        tokio::time::advance(Duration::from_millis(500)).await;
        assert!(b.answered_within(Duration::from_secs(1)));
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(!b.answered_within(Duration::from_secs(1)));
    }

    #[tokio::test(start_paused = true)]
    async fn a_burst_of_late_answers_between_answers_never_opens_it() {
        let b = Breaker::default();
        for _ in 0..50 {
            for _ in 0..(STALL_SAMPLES * 4) {
                b.failure(Fault::Late);
            }
            tokio::time::advance(STALL_WINDOW / 2).await;
            b.success();
        }
        assert!(
            !b.is_open(),
            "late answers mixed with answers are a busy redis"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn many_late_answers_in_a_moment_do_not_open_it() {
        let b = Breaker::default();
        for _ in 0..1000 {
            b.failure(Fault::Late);
        }
        assert!(
            !b.is_open(),
            "a thousand late answers at once are one burst, not a stall"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn only_late_answers_over_the_window_open_it() {
        let b = Breaker::default();
        b.failure(Fault::Late);
        tokio::time::advance(STALL_WINDOW).await;
        for _ in 1..(STALL_SAMPLES - 1) {
            b.failure(Fault::Late);
        }
        assert!(!b.is_open(), "too few samples");
        b.failure(Fault::Late);
        assert!(
            b.is_open(),
            "a stall: nothing but late answers for the whole window"
        );
        assert!(!b.has_answered());
    }
}
