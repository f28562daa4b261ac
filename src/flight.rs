//! In-process single-flight: concurrent misses on one key in one process share one fill.
//!
//! The first request for a key starts the fill in its own task and becomes the flight's leader; the
//! others join as followers and await the same shared result. Because the fill is a task of its own,
//! a leader whose client disconnects (its request future dropped) does not cancel the fill the
//! followers wait for. The task removes its flight from the map when it ends — normally, by panic or
//! by abort — so the next miss on that key starts a fresh flight.
//!
//! # Concurrent calls on the same key
//! Exactly one `start` closure runs per flight; every joiner gets a clone of its output, or `None` if
//! the fill task panicked.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use futures_util::FutureExt;
use futures_util::future::{BoxFuture, Shared};

use crate::key::CacheKey;

/// A flight's awaited result: `None` when the fill task panicked.
pub type FlightResult<T> = Shared<BoxFuture<'static, Option<T>>>;

/// Whether the joiner started the flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Leader,
    Follower,
}

type Map<T> = Arc<Mutex<HashMap<CacheKey, (u64, FlightResult<T>)>>>;

/// The flights in progress in this process.
pub struct Flights<T: Clone> {
    map: Map<T>,
    next_id: AtomicU64,
}

impl<T: Clone + Send + Sync + 'static> Flights<T> {
    pub fn new() -> Flights<T> {
        Flights {
            map: Arc::default(),
            next_id: AtomicU64::new(0),
        }
    }

    /// Joins the flight for `key`, starting it with `start` if there is none.
    pub fn join<F>(&self, key: CacheKey, start: impl FnOnce() -> F) -> (Role, FlightResult<T>)
    where
        F: Future<Output = T> + Send + 'static,
    {
        let mut map = lock(&self.map);
        if let Some((_, flight)) = map.get(&key) {
            return (Role::Follower, flight.clone());
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let fill = start();
        let landing = Landing {
            map: self.map.clone(),
            key,
            id,
        };
        let task = tokio::spawn(async move {
            let _landing = landing;
            fill.await
        });
        let flight: FlightResult<T> = async move { task.await.ok() }.boxed().shared();
        map.insert(key, (id, flight.clone()));
        (Role::Leader, flight)
    }

    /// Flights in progress.
    pub fn len(&self) -> usize {
        lock(&self.map).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl<T: Clone + Send + Sync + 'static> Default for Flights<T> {
    fn default() -> Self {
        Flights::new()
    }
}

/// Removes its flight from the map when the fill task ends, however it ends.
struct Landing<T: Clone> {
    map: Map<T>,
    key: CacheKey,
    id: u64,
}

impl<T: Clone> Drop for Landing<T> {
    fn drop(&mut self) {
        let mut map = lock(&self.map);
        if map.get(&self.key).is_some_and(|(id, _)| *id == self.id) {
            map.remove(&self.key);
        }
    }
}

/// The map stays consistent under poisoning: each mutation is one insert or remove.
fn lock<T: Clone>(
    map: &Mutex<HashMap<CacheKey, (u64, FlightResult<T>)>>,
) -> MutexGuard<'_, HashMap<CacheKey, (u64, FlightResult<T>)>> {
    map.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    fn key(n: u8) -> CacheKey {
        let mut h = crate::key::KeyHasher::new();
        h.field(&[n]);
        h.finish()
    }

    #[tokio::test]
    async fn concurrent_joiners_share_one_fill() {
        let flights = Flights::<u32>::new();
        let calls = Arc::new(AtomicUsize::new(0));
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let c = calls.clone();
        let (role, first) = flights.join(key(1), move || async move {
            c.fetch_add(1, Ordering::SeqCst);
            let _ = rx.await;
            7
        });
        assert_eq!(role, Role::Leader);
        let mut others = Vec::new();
        for _ in 0..50 {
            let c = calls.clone();
            let (role, f) = flights.join(key(1), move || async move {
                c.fetch_add(1, Ordering::SeqCst);
                0
            });
            assert_eq!(role, Role::Follower);
            others.push(f);
        }
        let _ = tx.send(());
        assert_eq!(first.await, Some(7));
        for f in others {
            assert_eq!(f.await, Some(7));
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert!(flights.is_empty());
    }

    #[tokio::test]
    async fn a_panicking_fill_lands_and_the_next_miss_starts_afresh() {
        let flights = Flights::<u32>::new();
        let (_, f) = flights.join(key(2), || async { panic!("fill blew up") });
        assert_eq!(f.await, None);
        assert!(flights.is_empty());
        let (role, f) = flights.join(key(2), || async { 3 });
        assert_eq!(role, Role::Leader);
        assert_eq!(f.await, Some(3));
    }
}
