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
//! the fill task panicked. Followers are counted while they wait; past the limit a joiner is turned
//! away ([`Crowded`]) instead of queueing without bound.
//!
//! # Many cores
//! The map is [`SHARDS`] maps, each under its own lock, a key's shard read from its digest: a
//! burst of distinct cold keys on many cores spreads over that many locks instead of queueing on
//! one (each join and each landing takes its key's lock once, for a few hundred nanoseconds).

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use futures_util::FutureExt;
use futures_util::future::{BoxFuture, Shared};
use prometheus_client::metrics::histogram::Histogram;
use tokio::sync::Notify;

use crate::key::CacheKey;

/// A flight's awaited result: `None` when the fill task panicked.
pub type FlightResult<T> = Shared<BoxFuture<'static, Option<T>>>;

/// Whether the joiner started the flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Leader,
    Follower,
}

/// How many joiners (leader and followers) still want a flight's result. The fill learns
/// through it when all of them have gone — their clients hung up — so a flight that is only
/// waiting for another instance's fill can stop waiting.
#[derive(Clone, Default)]
pub struct Interest(Arc<InterestState>);

#[derive(Default)]
struct InterestState {
    live: AtomicUsize,
    gone: Notify,
}

impl Interest {
    /// Resolves once every joiner has gone. Cancel safe.
    pub async fn abandoned(&self) {
        loop {
            let notified = self.0.gone.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.0.live.load(Ordering::Acquire) == 0 {
                return;
            }
            notified.await;
        }
    }

    /// An interest that never goes: for fills nobody joins (background refreshes).
    pub fn lasting() -> Interest {
        let interest = Interest::default();
        interest.0.live.store(1, Ordering::Release);
        interest
    }

    /// How many requests want the flight's result now (at least 1): the weight its upstream call
    /// queues with under a fleet budget (see [`crate::budget`]).
    pub fn weight(&self) -> Arc<dyn Fn() -> usize + Send + Sync> {
        let interest = self.clone();
        Arc::new(move || interest.0.live.load(Ordering::Acquire).max(1))
    }

    fn join(&self) -> InterestGuard {
        self.0.live.fetch_add(1, Ordering::AcqRel);
        InterestGuard(self.clone())
    }
}

/// One joiner's interest; dropping it may leave the flight abandoned.
struct InterestGuard(Interest);

impl Drop for InterestGuard {
    fn drop(&mut self) {
        let state = &(self.0).0;
        if state.live.fetch_sub(1, Ordering::AcqRel) == 1 {
            state.gone.notify_waiters();
        }
    }
}

/// One flight in the map: its id, its result, and how many followers wait on it.
struct Flight<T: Clone> {
    id: u64,
    /// The purge fence's mark when the flight started (see [`crate::purge::Fence`]).
    began: u64,
    result: FlightResult<T>,
    interest: Interest,
    /// Followers waiting now (bounded by `max_waiters`).
    waiting: Arc<AtomicUsize>,
    /// Followers that joined over the flight's life.
    joined: Arc<AtomicUsize>,
}

type Map<T> = Arc<Shards<T>>;

/// How many locks the flights of a process are spread over: a power of two, several times the
/// cores a proxy usually has, so two busy keys rarely share one.
pub const SHARDS: usize = 64;

/// The flights, by key, in [`SHARDS`] maps each behind its own lock.
struct Shards<T: Clone>([Mutex<HashMap<CacheKey, Flight<T>>>; SHARDS]);

impl<T: Clone> Default for Shards<T> {
    fn default() -> Self {
        Shards(std::array::from_fn(|_| Mutex::default()))
    }
}

impl<T: Clone> Shards<T> {
    /// The map `key` is in, locked.
    fn of(&self, key: &CacheKey) -> MutexGuard<'_, HashMap<CacheKey, Flight<T>>> {
        lock(&self.0[shard_of(key)])
    }

    /// Flights in every shard (each locked in turn: a count, not a snapshot).
    fn len(&self) -> usize {
        self.0.iter().map(|shard| lock(shard).len()).sum()
    }
}

/// The shard of `key`: its digest's first byte (a blake3 output, so evenly spread).
fn shard_of(key: &CacheKey) -> usize {
    usize::from(key.digest()[0]) % SHARDS
}

/// Keeps a flight joinable after its fill task has returned: a fill that answers early (a body
/// still streaming through a [`crate::relay`]) holds it until the body has ended, so requests
/// that come meanwhile join the stream instead of starting another fill. Dropping the last
/// hold (and the task ending) lands the flight.
#[derive(Clone)]
pub struct Hold(#[allow(dead_code)] Arc<dyn Send + Sync>);

impl std::fmt::Debug for Hold {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Hold")
    }
}

/// A joiner turned away: the flight already has its maximum of waiters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{waiting} requests already wait for this key")]
pub struct Crowded {
    pub waiting: usize,
}

/// A joiner's place in a flight: the role, the result to await, and (for followers) a slot in
/// the waiter count that frees itself on drop.
pub struct Joined<T: Clone> {
    pub role: Role,
    pub result: FlightResult<T>,
    /// The flight's purge-fence mark and id: a follower that came after a purge covering the
    /// flight's answer retires the flight ([`Flights::retire`]) rather than take it.
    pub began: u64,
    id: u64,
    _slot: Option<WaitSlot>,
    _interest: InterestGuard,
}

struct WaitSlot(Arc<AtomicUsize>);

impl Drop for WaitSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The flights in progress in this process.
pub struct Flights<T: Clone> {
    map: Map<T>,
    /// Fills whose task has not ended (or whose answer is still held): those in the map, and
    /// retired ones, which left it but still run.
    running: Arc<AtomicUsize>,
    next_id: AtomicU64,
    /// Observes, as each flight lands, how many requests waited on it.
    waiters: Option<Histogram>,
}

impl<T: Clone + Send + Sync + 'static> Flights<T> {
    pub fn new(waiters: Option<Histogram>) -> Flights<T> {
        Flights {
            map: Arc::default(),
            running: Arc::default(),
            next_id: AtomicU64::new(0),
            waiters,
        }
    }

    /// Joins the flight for `key`, starting it with `start` if there is none; turned away when
    /// `max_waiters` followers already wait on it. `start` is given the flight's [`Interest`]
    /// and a [`Hold`] on it.
    pub fn join<F>(
        &self,
        key: CacheKey,
        (mark, max_waiters): (u64, usize),
        start: impl FnOnce(Interest, Hold) -> F,
    ) -> Result<Joined<T>, Crowded>
    where
        F: Future<Output = T> + Send + 'static,
    {
        let mut map = self.map.of(&key);
        if let Some(flight) = map.get(&key) {
            let waiting = flight.waiting.fetch_add(1, Ordering::Relaxed);
            let slot = WaitSlot(flight.waiting.clone());
            if waiting >= max_waiters {
                return Err(Crowded { waiting });
            }
            flight.joined.fetch_add(1, Ordering::Relaxed);
            return Ok(Joined {
                role: Role::Follower,
                result: flight.result.clone(),
                began: flight.began,
                id: flight.id,
                _slot: Some(slot),
                _interest: flight.interest.join(),
            });
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let interest = Interest::default();
        let leader = interest.join();
        let joined = Arc::new(AtomicUsize::new(0));
        self.running.fetch_add(1, Ordering::AcqRel);
        let landing = Arc::new(Landing {
            map: self.map.clone(),
            running: self.running.clone(),
            key,
            id,
            joined: joined.clone(),
            waiters: self.waiters.clone(),
        });
        let fill = start(interest.clone(), Hold(landing.clone()));
        let task = tokio::spawn(async move {
            let _landing = landing;
            fill.await
        });
        let result: FlightResult<T> = async move { task.await.ok() }.boxed().shared();
        let flight = Flight {
            id,
            began: mark,
            result: result.clone(),
            interest,
            waiting: Arc::default(),
            joined,
        };
        map.insert(key, flight);
        Ok(Joined {
            role: Role::Leader,
            result,
            began: mark,
            id,
            _slot: None,
            _interest: leader,
        })
    }

    /// Makes `joined`'s flight for `key` unjoinable (if it is still the one there): requests that
    /// come from now on start another. Those already joined keep their result.
    pub fn retire(&self, key: &CacheKey, joined: &Joined<T>) {
        let mut map = self.map.of(key);
        if map.get(key).is_some_and(|f| f.id == joined.id) {
            map.remove(key);
        }
    }

    /// Followers waiting on the flight for `key`, if there is one.
    pub fn waiting(&self, key: &CacheKey) -> Option<usize> {
        self.map
            .of(key)
            .get(key)
            .map(|f| f.waiting.load(Ordering::Relaxed))
    }

    /// Flights in progress that requests can join.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Fills in progress, retired ones included: what a graceful shutdown waits for (a retired
    /// fill still holds its fleet lock, which other instances' waiters are watching).
    pub fn running(&self) -> usize {
        self.running.load(Ordering::Acquire)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl<T: Clone + Send + Sync + 'static> Default for Flights<T> {
    fn default() -> Self {
        Flights::new(None)
    }
}

/// Removes its flight from the map when the fill task ends, however it ends, and every
/// [`Hold`] on it has gone.
struct Landing<T: Clone> {
    map: Map<T>,
    running: Arc<AtomicUsize>,
    key: CacheKey,
    id: u64,
    joined: Arc<AtomicUsize>,
    waiters: Option<Histogram>,
}

impl<T: Clone> Drop for Landing<T> {
    fn drop(&mut self) {
        let mut map = self.map.of(&self.key);
        if map.get(&self.key).is_some_and(|f| f.id == self.id) {
            map.remove(&self.key);
        }
        drop(map);
        self.running.fetch_sub(1, Ordering::AcqRel);
        if let Some(waiters) = &self.waiters {
            // The leader counts as one of the requests the fill answered.
            waiters.observe((self.joined.load(Ordering::Relaxed) + 1) as f64);
        }
    }
}

/// The map stays consistent under poisoning: each mutation is one insert or remove.
fn lock<T: Clone>(
    map: &Mutex<HashMap<CacheKey, Flight<T>>>,
) -> MutexGuard<'_, HashMap<CacheKey, Flight<T>>> {
    map.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests;
