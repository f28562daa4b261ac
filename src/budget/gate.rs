//! A process-local count of calls in flight under a limit that may change while calls wait: what
//! a budget falls back to when Redis cannot be reached (its share of the fleet's limit), and what
//! it is without Redis at all.

use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::Notify;
use tokio::time::Instant;

/// Calls in flight in this process under one budget.
#[derive(Default)]
pub(super) struct Gate {
    in_use: Mutex<usize>,
    freed: Notify,
}

/// A place in the gate, given back on drop.
pub(super) struct Pass(Arc<Gate>);

impl Gate {
    /// A place once fewer than `limit()` are in use, by `deadline`; `None` past it. The limit is
    /// read again each time a place frees, so a share that grows lets waiters in at once.
    /// Cancel safe: a cancelled wait holds no place.
    pub(super) async fn enter(
        self: &Arc<Self>,
        limit: impl Fn() -> usize,
        deadline: Instant,
    ) -> Option<Pass> {
        loop {
            let freed = self.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            if let Some(pass) = self.try_enter(limit()) {
                return Some(pass);
            }
            tokio::select! {
                () = freed => {}
                () = tokio::time::sleep_until(deadline) => return self.try_enter(limit()),
            }
        }
    }

    /// A place now if fewer than `limit` are in use.
    pub(super) fn try_enter(self: &Arc<Self>, limit: usize) -> Option<Pass> {
        let mut in_use = self.count();
        (*in_use < limit.max(1)).then(|| {
            *in_use += 1;
            Pass(self.clone())
        })
    }

    /// Places in use.
    #[cfg(test)]
    pub(super) fn in_use(&self) -> usize {
        *self.count()
    }

    /// The count stays right under poisoning: each change is one addition or subtraction.
    fn count(&self) -> MutexGuard<'_, usize> {
        self.in_use.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Drop for Pass {
    fn drop(&mut self) {
        let gate = &self.0;
        {
            let mut in_use = gate.count();
            *in_use = in_use.saturating_sub(1);
        }
        gate.freed.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn no_more_than_the_limit_are_in_and_a_freed_place_lets_the_next_in() {
        let gate = Arc::new(Gate::default());
        let first = gate.try_enter(2);
        let second = gate.try_enter(2);
        assert!(first.is_some() && second.is_some());
        assert!(gate.try_enter(2).is_none(), "a third is over the limit");
        let waiting = {
            let gate = gate.clone();
            tokio::spawn(async move {
                let deadline = Instant::now() + Duration::from_secs(30);
                gate.enter(|| 2, deadline).await.is_some()
            })
        };
        tokio::task::yield_now().await;
        drop(first);
        assert!(
            waiting.await.unwrap_or(false),
            "the freed place went to the waiter"
        );
        // The waiter's place went with its task; `second` still holds one.
        assert_eq!(gate.in_use(), 1);
        drop(second);
        assert_eq!(gate.in_use(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_wait_past_its_deadline_gets_no_place_and_holds_none() {
        let gate = Arc::new(Gate::default());
        let _held = gate.try_enter(1);
        let deadline = Instant::now() + Duration::from_millis(50);
        assert!(gate.enter(|| 1, deadline).await.is_none());
        assert_eq!(gate.in_use(), 1);
    }

    #[tokio::test]
    async fn a_limit_that_grows_lets_waiters_in_when_a_place_frees() {
        let gate = Arc::new(Gate::default());
        let limit = Arc::new(AtomicUsize::new(1));
        let first = gate.try_enter(1);
        let waiting = {
            let (gate, limit) = (gate.clone(), limit.clone());
            tokio::spawn(async move {
                let deadline = Instant::now() + Duration::from_secs(30);
                let pass = gate
                    .enter(move || limit.load(Ordering::Relaxed), deadline)
                    .await;
                pass.is_some()
            })
        };
        limit.store(3, Ordering::Relaxed);
        let other = gate.try_enter(3);
        assert!(other.is_some());
        drop(other);
        assert!(waiting.await.unwrap_or(false));
        drop(first);
        assert_eq!(gate.in_use(), 0);
    }

    #[test]
    fn a_limit_of_zero_still_lets_one_in() {
        let gate = Arc::new(Gate::default());
        let only = gate.try_enter(0);
        assert!(only.is_some());
        assert!(gate.try_enter(0).is_none());
    }
}
