//! The fleet protocol: how the instances of a fleet agree, through Redis, on who fills a key, and
//! tell each other how it went. Everything the instances say to each other is here.
//!
//! # Layout
//! - `fleet.rs` — [`Fleet`], the verbs per key the layers above use (look, take the lock, read,
//!   peek, subscribe, relay, purge) and per budget (slots), and the types they share.
//! - `fleet/lock.rs` — [`FillLock`], the permit to fill a key: stored or released once, released
//!   by its `Drop` when a fill is abandoned; its watchdog keeps the lease.
//! - `fleet/keeper.rs` — the lease keeper, the thread on which locks are taken and kept.
//! - `fleet/scripts.rs` — the fill lock's Lua scripts and the calls that run them.
//! - `fleet/notice.rs` — [`Notice`], what a fill tells the waiters: one type, one wire format.
//! - `fleet/hub.rs` and `fleet/hub/` — the pub/sub hub that wakes the waiters and carries purges.
//! - `fleet/relay_log.rs` — a streaming fill's relay log, read by waiters elsewhere.
//! - `fleet/slots.rs` — the Redis side of the fleet-wide budgets.
//!
//! Files depend one way: lock → keeper, scripts → notice; hub, relay_log, slots → notice. Below
//! all of them only [`crate::l2`] (connections, entries, bounded calls) and [`crate::entry`].
//!
//! Each connection — the command connection, the lease keeper's and the hub's — has a breaker of
//! its own, so the process is out of degraded mode only once all of them work; whether Redis is
//! alive at all is seen on any of them (one shared [`Pulse`]).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;

use crate::breaker::{Breaker, Pulse};
use crate::config::{RedisConfig, RouteConfig};
use crate::entry::Entry;
use crate::key::CacheKey;
use crate::l1::L1;
use crate::l2::{KeyNames, L2, L2Error, Peek};
use crate::metrics::Metrics;
use crate::purge::PurgeOrder;

use keeper::LeaseKeeper;

mod hub;
mod keeper;
mod lock;
mod notice;
mod relay_log;
mod scripts;
mod slots;

pub use hub::{Subscription, Wake};
pub use lock::FillLock;
pub use notice::Notice;
pub use relay_log::{Record, RelayLog, WINDOW_RECORDS};
pub use slots::{SEEN_FOR, SlotNames, SlotState, SlotTerms, Slots};

/// What a flight's first look at a key found. `P` is the permit a look that takes the lock
/// hands over: a [`FillLock`] from [`Fleet::lookup`].
#[derive(Debug)]
pub enum Lookup<P> {
    /// An entry (of any freshness); the lock was not touched.
    Entry(Entry),
    /// A value that is not a valid entry; the lock was not touched.
    Garbled,
    /// The key is marked uncacheable.
    Uncacheable,
    /// Nothing stored and the lock was free: the caller now holds it.
    Locked(P),
    /// Nothing stored and someone else holds the lock.
    Held,
}

/// How a token-checked store went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreOutcome {
    /// Written under our lock; the lock is released and the notice published.
    Stored,
    /// Our lock had lapsed and nobody held it: written because no entry existed.
    StoredUnlocked,
    /// Someone else holds the lock now, or an entry already existed: nothing written.
    Superseded,
    /// A purge of the key came while the fill ran: nothing written, the lock released and the
    /// waiters told to compete again, so the next fill starts after the purge.
    Purged,
}

/// How a fill lock is held: its lease, the budget of each Redis call made for it, and how long
/// the watchdog may extend it once the upstream call began.
#[derive(Debug, Clone, Copy)]
pub struct Terms {
    pub lease: Duration,
    pub budget: Duration,
    pub max_hold: Duration,
}

/// The Redis side of a fleet: the store, the notice hub and the lease keeper. Cloning shares them.
#[derive(Clone)]
pub struct Fleet {
    l2: L2,
    hub: hub::Notices,
    /// Keeps this process's fill leases alive from a thread of its own.
    keeper: Arc<LeaseKeeper>,
}

impl Fleet {
    /// Opens the process's Redis connections. They connect lazily: Corral starts while Redis is
    /// down and serves degraded until it comes up. Purges heard on the invalidation channel are
    /// applied to `l1`.
    pub fn connect(redis: &RedisConfig, metrics: &Arc<Metrics>, l1: &L1) -> Result<Fleet, L2Error> {
        let pulse = Arc::new(Pulse::default());
        let breaker = || Arc::new(Breaker::with_pulse(pulse.clone()));
        let keeper = {
            let (redis, metrics, breaker) = (redis.clone(), metrics.clone(), breaker());
            LeaseKeeper::start(move || L2::connect(&redis, breaker, metrics))?
        };
        let hub = hub::Notices::connect(redis, breaker(), metrics.clone(), l1.clone())?;
        Ok(Fleet {
            keeper: Arc::new(keeper),
            l2: L2::connect(redis, breaker(), metrics.clone())?,
            hub,
        })
    }

    /// Whether any of the process's Redis connections is considered down.
    pub fn degraded(&self) -> bool {
        self.l2.degraded() || self.keeper.degraded() || self.hub.degraded()
    }

    /// Whether Redis has answered this process at least once.
    pub fn has_answered(&self) -> bool {
        self.l2.has_answered()
    }

    /// Connects all three connections, loads the scripts (on the command connection and the lease
    /// keeper's) and subscribes the invalidation channel within `budget`, so the first burst after
    /// a start pays for none of it inside a call's budget. A failure is logged; Corral then serves
    /// degraded until Redis answers.
    pub async fn warm_up(&self, budget: Duration) {
        static SCRIPTS: std::sync::OnceLock<[&'static redis::Script; 5]> =
            std::sync::OnceLock::new();
        let scripts = SCRIPTS.get_or_init(scripts::all);
        let (l2, keeper, pubsub) = tokio::join!(
            self.l2.warm_up(budget, scripts),
            self.keeper.warm_up(budget, scripts),
            self.hub.ready()
        );
        match l2.and(keeper).and(pubsub) {
            Ok(()) => tracing::info!("redis connected, scripts loaded, pub/sub subscribed"),
            Err(err) => {
                tracing::warn!(%err, "redis not ready at start; serving degraded until it answers");
            }
        }
    }

    /// The Redis names of `route`'s `key`.
    pub fn names(&self, route: &str, key: &CacheKey) -> KeyNames {
        self.l2.names(route, key)
    }

    /// How `route` holds its fill locks: its lease, the budget of its lock decisions (see
    /// [`crate::config::LockSpec::redis_budget`]) and its upstream timeout.
    pub fn terms(&self, route: &RouteConfig) -> Terms {
        Terms {
            lease: route.lock.lease,
            budget: route.lock.redis_budget(self.l2.lock_budget()),
            max_hold: route.upstream_timeout,
        }
    }

    /// The budget of calls whose failure costs only a miss (`[redis] timeout`).
    pub fn read_budget(&self) -> Duration {
        self.l2.read_budget()
    }

    /// A flight's first look at a key, taking the lock if nothing is stored and it is free (see
    /// [`Lookup`]). Cancel safety: a lock taken for a caller that has gone is released.
    pub async fn lookup(
        &self,
        names: &Arc<KeyNames>,
        terms: Terms,
    ) -> Result<Lookup<FillLock>, L2Error> {
        FillLock::lookup(&self.keeper, &self.l2, names, terms).await
    }

    /// Tries once to take the key's lock. `Ok(None)`: someone else holds it.
    pub async fn try_lock(
        &self,
        names: &Arc<KeyNames>,
        terms: Terms,
    ) -> Result<Option<FillLock>, L2Error> {
        FillLock::try_take(&self.keeper, &self.l2, names, terms).await
    }

    /// The entry and the uncacheable marker, in one round trip.
    pub async fn read(&self, names: &KeyNames, budget: Duration) -> Result<Peek, L2Error> {
        self.l2.get(names, budget).await
    }

    /// Entry, marker and the lock's remaining lease, in one round trip.
    pub async fn peek(&self, names: &KeyNames, budget: Duration) -> Result<Peek, L2Error> {
        self.l2.peek(names, budget).await
    }

    /// Subscribes to `channel` (a key's or a budget's); see [`Subscription`].
    pub async fn subscribe(&self, channel: &str) -> Result<Subscription, L2Error> {
        self.hub.subscribe(channel).await
    }

    /// Whether the hub has the invalidation channel subscribed (at start: within its budget).
    pub async fn hub_ready(&self) -> Result<(), L2Error> {
        self.hub.ready().await
    }

    /// Channels some request of this process waits on.
    pub fn waiting_channels(&self) -> usize {
        self.hub.waiting_channels()
    }

    /// Writes a fill that holds no lock (a route whose lock scope is `instance`), its tags
    /// indexed in the same round trip.
    pub async fn put(&self, names: &KeyNames, entry: &Entry) -> Result<(), L2Error> {
        self.l2.put(names, entry).await
    }

    /// The relay log of streaming fill `id` of a key.
    pub fn relay_log(&self, names: &KeyNames, id: &str) -> RelayLog {
        RelayLog::new(self.l2.clone(), names.relay_log(id), names.channel.clone())
    }

    /// Applies a purge to L2 and tells every instance; how many entries it removed.
    pub async fn purge(&self, order: &PurgeOrder) -> Result<u64, L2Error> {
        self.l2.purge(order).await
    }

    /// The keys and channel of fleet budget `name`.
    pub fn slot_names(&self, name: &str) -> SlotNames {
        SlotNames::new(self.l2.namespace(), name)
    }

    /// Whether the budgets' connection (the lease keeper's) is considered down.
    pub fn slots_degraded(&self) -> bool {
        self.keeper.degraded()
    }

    /// Runs `call` on the lease keeper's thread with its connection, so a slot's lease starts the
    /// moment Redis answers. If the caller goes away first, the call still ends there.
    pub async fn with_slots<T, F>(&self, call: impl FnOnce(Slots) -> F) -> Result<T, L2Error>
    where
        T: Send + 'static,
        F: Future<Output = Result<T, L2Error>> + Send + 'static,
    {
        self.keeper.with_own(move |l2| call(Slots::on(l2))).await
    }

    /// Runs `task` on the lease keeper's thread until it ends or the handle is aborted: what keeps
    /// a budget's slot leased however busy the request workers are.
    pub fn keep_slots<F>(&self, task: impl FnOnce(Slots) -> F) -> JoinHandle<()>
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.keeper.keep(move |l2| task(Slots::on(l2)))
    }
}
