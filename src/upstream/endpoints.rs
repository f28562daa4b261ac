//! The endpoints of a route's upstream and their passive health: `upstream = ["http://a:5000",
//! "http://b:5000"]` (model replicas serving the same answers).
//!
//! Calls go round-robin over the endpoints not ejected. An endpoint is ejected after
//! [`EJECT_AFTER`] failures in a row — no answer (refused, reset, timed out) or a 5xx — for
//! [`EJECT_FOR`]; any answer below 500 ends its streak. When every endpoint is ejected, the one
//! whose ejection ends first is tried anyway: Corral never refuses a call for want of a healthy
//! endpoint, it only prefers healthy ones. A fill that fails on one endpoint tries the next
//! before it fails its waiters (see [`crate::fill`]); a pass-through call is sent once, to the
//! endpoint picked, and its result counts toward that endpoint's health.
//!
//! The health is this process's own view (passive: from its own calls, no probes). Timing uses
//! tokio's clock, so tests drive it under paused time.

use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use http::Uri;
use tokio::time::Instant;

/// Failures in a row that eject an endpoint.
pub const EJECT_AFTER: u32 = 3;
/// How long an ejected endpoint is left out.
pub const EJECT_FOR: Duration = Duration::from_secs(10);

/// The endpoints of one route and their health. Shared by every call of the route in this
/// process, and kept across reloads that leave the list unchanged.
#[derive(Debug)]
pub struct EndpointSet {
    uris: Vec<Uri>,
    health: Mutex<Vec<Health>>,
    next: AtomicUsize,
}

/// One endpoint's recent record.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Health {
    /// Failures since its last success.
    failures: u32,
    /// Left out until then.
    ejected_until: Option<Instant>,
}

/// What a call to an endpoint came to, for its health.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Call {
    /// An answer below 500.
    Answered,
    /// No answer, or a 5xx.
    Failed,
}

impl EndpointSet {
    /// A set of `uris`, all healthy. `uris` must not be empty (the config guarantees it).
    pub fn new(uris: Vec<Uri>) -> EndpointSet {
        let health = Mutex::new(vec![Health::default(); uris.len()]);
        EndpointSet {
            uris,
            health,
            next: AtomicUsize::new(0),
        }
    }

    pub fn uris(&self) -> &[Uri] {
        &self.uris
    }

    pub fn len(&self) -> usize {
        self.uris.len()
    }

    pub fn is_empty(&self) -> bool {
        self.uris.is_empty()
    }

    /// The endpoint for the next call, and its index: the next healthy one in turn, else the one
    /// back soonest. `None` only for an empty set.
    pub fn pick(&self) -> Option<(usize, &Uri)> {
        self.pick_except(&[])
    }

    /// As [`Self::pick`], leaving out the endpoints in `tried` while any other remains.
    pub fn pick_except(&self, tried: &[usize]) -> Option<(usize, &Uri)> {
        let n = self.uris.len();
        if n == 0 {
            return None;
        }
        let now = Instant::now();
        let health = self.lock();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let candidates = (0..n).map(|i| (start + i) % n);
        let untried: Vec<usize> = candidates.filter(|i| !tried.contains(i)).collect();
        let pool = if untried.is_empty() {
            (0..n).collect()
        } else {
            untried
        };
        let healthy = pool
            .iter()
            .copied()
            .find(|&i| health[i].ejected_until.is_none_or(|until| now >= until));
        let index = healthy.or_else(|| {
            pool.iter()
                .copied()
                .min_by_key(|&i| health[i].ejected_until)
        })?;
        Some((index, &self.uris[index]))
    }

    /// Records what a call to endpoint `index` came to.
    pub fn record(&self, index: usize, result: Call) {
        let mut health = self.lock();
        let Some(endpoint) = health.get_mut(index) else {
            return;
        };
        match result {
            Call::Answered => {
                if endpoint.ejected_until.is_some() {
                    tracing::info!(endpoint = %self.uris[index], "upstream endpoint answers again: back in rotation");
                }
                *endpoint = Health::default();
            }
            Call::Failed => {
                endpoint.failures = endpoint.failures.saturating_add(1);
                if endpoint.failures >= EJECT_AFTER {
                    let first = endpoint.ejected_until.is_none();
                    endpoint.ejected_until = Some(Instant::now() + EJECT_FOR);
                    if first {
                        let failures = endpoint.failures;
                        tracing::warn!(endpoint = %self.uris[index], failures, "upstream endpoint ejected: failing in a row");
                    }
                }
            }
        }
    }

    /// Whether endpoint `index` is ejected now.
    pub fn ejected(&self, index: usize) -> bool {
        let now = Instant::now();
        self.lock()
            .get(index)
            .and_then(|h| h.ejected_until)
            .is_some_and(|until| now < until)
    }

    /// Plain counters: carry on after a poisoning panic.
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Health>> {
        self.health.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// What a status says of an endpoint: below 500 it answered.
pub fn judged(status: Option<http::StatusCode>) -> Call {
    match status {
        Some(status) if !status.is_server_error() => Call::Answered,
        _ => Call::Failed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(n: usize) -> EndpointSet {
        let uris = (0..n)
            .map(|i| format!("http://10.0.0.{i}:5000").parse().expect("uri"))
            .collect();
        EndpointSet::new(uris)
    }

    fn picks(set: &EndpointSet, n: usize) -> Vec<usize> {
        (0..n).filter_map(|_| set.pick().map(|(i, _)| i)).collect()
    }

    #[tokio::test(start_paused = true)]
    async fn calls_go_round_robin_over_healthy_endpoints() {
        let s = set(3);
        assert_eq!(picks(&s, 6), [0, 1, 2, 0, 1, 2]);
    }

    #[tokio::test(start_paused = true)]
    async fn failures_in_a_row_eject_and_an_answer_ends_the_streak() {
        let s = set(2);
        s.record(1, Call::Failed);
        s.record(1, Call::Failed);
        s.record(1, Call::Answered);
        s.record(1, Call::Failed);
        s.record(1, Call::Failed);
        assert!(!s.ejected(1), "the answer reset the streak");
        s.record(1, Call::Failed);
        assert!(s.ejected(1));
        assert_eq!(
            picks(&s, 4),
            [0, 0, 0, 0],
            "the ejected endpoint is left out"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_ejected_endpoint_returns_after_its_time() {
        let s = set(2);
        for _ in 0..EJECT_AFTER {
            s.record(0, Call::Failed);
        }
        assert!(s.ejected(0));
        tokio::time::advance(EJECT_FOR).await;
        assert!(!s.ejected(0));
        assert!(picks(&s, 4).contains(&0), "back in rotation");
        s.record(0, Call::Answered);
        assert!(!s.ejected(0));
    }

    #[tokio::test(start_paused = true)]
    async fn with_every_endpoint_ejected_the_one_back_soonest_is_tried() {
        let s = set(2);
        for _ in 0..EJECT_AFTER {
            s.record(1, Call::Failed);
        }
        tokio::time::advance(Duration::from_secs(1)).await;
        for _ in 0..EJECT_AFTER {
            s.record(0, Call::Failed);
        }
        assert_eq!(
            picks(&s, 3),
            [1, 1, 1],
            "1 was ejected first, so it is back first"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_retry_leaves_out_what_it_tried_while_others_remain() {
        let s = set(3);
        let (first, _) = s.pick().expect("an endpoint");
        let (second, _) = s.pick_except(&[first]).expect("an endpoint");
        assert_ne!(first, second);
        let (third, _) = s.pick_except(&[first, second]).expect("an endpoint");
        assert!(third != first && third != second);
        assert!(s.pick_except(&[0, 1, 2]).is_some(), "all tried: any");
        assert!(set(0).pick().is_none());
    }

    #[test]
    fn a_5xx_or_no_answer_is_a_failure() {
        assert_eq!(judged(Some(http::StatusCode::OK)), Call::Answered);
        assert_eq!(judged(Some(http::StatusCode::NOT_FOUND)), Call::Answered);
        assert_eq!(judged(Some(http::StatusCode::BAD_GATEWAY)), Call::Failed);
        assert_eq!(judged(None), Call::Failed);
    }
}
