//! The fleet-wide fill lock on one key.
//!
//! `SET NX PX lease` with a random token; a watchdog extends the lease at a third of it while the
//! fill runs, so a short lease (the default is 2 s) costs nothing to a long fill but lets waiters
//! take over soon after a leader's process dies. The watchdog stops `upstream_timeout` after the
//! upstream call *began* ([`FillLock::calling`]) — not after the lock was taken, since the leader
//! may first queue for the route's upstream slot. The fill ends by a token-checked store that
//! also releases and publishes, or by a token-checked release. It is an efficiency lock: if it
//! is lost (lapse, failover), the cost is an extra upstream call, never a wrong answer — the
//! store is token-checked.
//!
//! A [`FillLock`] is the permit: whoever holds one may fill the key, and only through it —
//! [`FillLock::store`] or [`FillLock::release`], each consuming it. It is taken on the lease
//! keeper's thread (`fleet/keeper.rs`), where its watchdog then runs, so a saturated request
//! runtime cannot make a lease lapse.
//!
//! Releases are owed to the waiters elsewhere: they go out even while the breaker is open, and
//! one that fails is retried in the background while the lease runs. Dropping a [`FillLock`]
//! that was neither stored nor released (a panicking or cancelled fill) releases it the same way,
//! with a `failed` notice, so waiters compete again at once instead of sitting out the lease.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::keeper::LeaseKeeper;
use super::notice::Notice;
use super::relay_log::RelayLog;
use super::{Lookup, StoreOutcome, Terms, scripts};
use crate::entry::Entry;
use crate::l2::{KeyNames, L2, L2Error};

/// The keeper's runtime and connection, as a lock taken on its thread holds them.
#[derive(Clone)]
struct KeeperHandle {
    runtime: tokio::runtime::Handle,
    l2: L2,
}

impl KeeperHandle {
    fn of(keeper: &LeaseKeeper) -> KeeperHandle {
        KeeperHandle {
            runtime: keeper.runtime().clone(),
            l2: keeper.own().clone(),
        }
    }

    /// Starts the watchdog of a lock whose lease began no earlier than `taken`.
    fn keep(&self, lock: Held, terms: Terms, taken: Instant) -> Watchdog {
        // Until the call begins, the wait for an upstream slot is bounded by max_hold too.
        let (give_up, until) = watch::channel(Instant::now() + terms.max_hold * 2);
        let finishing = Arc::new(AtomicBool::new(false));
        let task = self.runtime.spawn(watch_lease(
            self.l2.clone(),
            lock,
            terms,
            taken,
            until,
            finishing.clone(),
        ));
        Watchdog {
            give_up,
            finishing,
            task,
        }
    }
}

/// The lock a watchdog keeps: its names and token.
struct Held {
    names: Arc<KeyNames>,
    token: String,
}

/// A running watchdog: the give-up time it obeys, and its task.
struct Watchdog {
    give_up: watch::Sender<Instant>,
    /// Set when the holder stores or releases: the lock going away is then expected.
    finishing: Arc<AtomicBool>,
    task: JoinHandle<()>,
}

impl Watchdog {
    /// The holder is storing or releasing: keep extending until that lands (a store sent by a
    /// saturated process can take a while to reach Redis, and a lapse meanwhile would let
    /// another instance fill), but expect the lock to vanish.
    fn finishing(&self) {
        self.finishing.store(true, Ordering::Release);
    }

    fn stop(&self) {
        self.task.abort();
    }
}

/// A held fill lock: the permit to fill its key. Dropping it unstored and unreleased releases it
/// with a `failed` notice (the one place a fill is marked abandoned).
pub struct FillLock {
    l2: L2,
    names: Arc<KeyNames>,
    token: String,
    terms: Terms,
    watchdog: Watchdog,
    done: bool,
}

impl FillLock {
    /// A flight's first look at a key (the entry, the uncacheable marker, or the lock taken if
    /// free: see [`Lookup`]), run on the keeper's thread: if it takes the lock, the watchdog
    /// starts there the moment Redis answers — however long this process's request workers then
    /// take to read the answer. The lock then stores and releases through `l2`.
    pub(super) async fn lookup(
        keeper: &LeaseKeeper,
        l2: &L2,
        names: &Arc<KeyNames>,
        terms: Terms,
    ) -> Result<Lookup<FillLock>, L2Error> {
        let (own, main, names) = (keeper.own().clone(), l2.clone(), names.clone());
        let on = KeeperHandle::of(keeper);
        let call = async move {
            let token = random_token();
            let taken = Instant::now();
            let found = scripts::lookup(&own, &names, &token, terms.lease, terms.budget).await?;
            Ok(match found {
                Lookup::Locked(()) => {
                    Lookup::Locked(FillLock::adopt(&main, &on, &names, token, terms, taken))
                }
                Lookup::Entry(entry) => Lookup::Entry(entry),
                Lookup::Garbled => Lookup::Garbled,
                Lookup::Uncacheable => Lookup::Uncacheable,
                Lookup::Held => Lookup::Held,
            })
        };
        keeper.on_keeper(call).await
    }

    /// Tries once to take the lock (`SET NX PX`), on the keeper's thread as [`Self::lookup`]
    /// does. `Ok(None)`: someone else holds it.
    pub(super) async fn try_take(
        keeper: &LeaseKeeper,
        l2: &L2,
        names: &Arc<KeyNames>,
        terms: Terms,
    ) -> Result<Option<FillLock>, L2Error> {
        let (own, main, names) = (keeper.own().clone(), l2.clone(), names.clone());
        let on = KeeperHandle::of(keeper);
        let call = async move {
            let token = random_token();
            let taken = Instant::now();
            if !scripts::take(&own, &names, &token, terms.lease, terms.budget).await? {
                return Ok(None);
            }
            Ok(Some(FillLock::adopt(
                &main, &on, &names, token, terms, taken,
            )))
        };
        keeper.on_keeper(call).await
    }

    /// Takes charge of a lock taken under `token` by a call sent at `taken`: starts its watchdog
    /// (which counts the lease from `taken`), and releases the lock on drop.
    fn adopt(
        l2: &L2,
        keeper: &KeeperHandle,
        names: &Arc<KeyNames>,
        token: String,
        terms: Terms,
        taken: Instant,
    ) -> FillLock {
        let held = Held {
            names: names.clone(),
            token: token.clone(),
        };
        FillLock {
            l2: l2.clone(),
            names: names.clone(),
            token,
            terms,
            watchdog: keeper.keep(held, terms, taken),
            done: false,
        }
    }

    /// A fresh relay log for this fill's answer while it streams (see `fleet/relay_log.rs`), and
    /// the fill's id that names it: one per fill, so a fill that follows never writes into a log
    /// still being read.
    pub fn relay_log(&self) -> (Arc<str>, RelayLog) {
        let id: Arc<str> = format!("{:016x}", rand::random::<u64>()).into();
        let name = self.names.relay_log(&id);
        let log = RelayLog::new(self.l2.clone(), name, self.names.channel.clone());
        (id, log)
    }

    /// The upstream call begins now: the lease is extended for at most `max_hold` from here.
    pub fn calling(&self) {
        self.watchdog
            .give_up
            .send_replace(Instant::now() + self.terms.max_hold);
    }

    /// Stores the entry under the lock (its tags indexed in the same round trip), releases it and
    /// wakes the waiters.
    pub async fn store(mut self, entry: &Entry) -> Result<StoreOutcome, L2Error> {
        self.watchdog.finishing();
        self.done = true;
        let by = crate::trace::current_fill();
        let (l2, names, token) = (&self.l2, &self.names, &self.token);
        let outcome = scripts::store(l2, names, token, entry, by.as_ref(), self.terms.budget).await;
        self.watchdog.stop();
        if outcome.is_err() {
            // The store may not have run: do not leave the waiters for the lease.
            self.release_in_background(Notice::Failed(None));
        }
        outcome
    }

    /// Releases the lock and tells the waiters (if there is anything to tell) why nothing was
    /// stored; an `Uncacheable` notice also sets the key's uncacheable marker for `pass_ttl`.
    /// A release that fails is retried in the background while the lease runs.
    pub async fn release(
        mut self,
        notice: Option<Notice>,
        pass_ttl: Duration,
    ) -> Result<(), L2Error> {
        self.watchdog.finishing();
        self.done = true;
        let (l2, names, token) = (&self.l2, &self.names, &self.token);
        let budget = self.terms.budget;
        let released = scripts::release(l2, names, token, notice.as_ref(), pass_ttl, budget).await;
        self.watchdog.stop();
        if released.is_err() {
            self.release_in_background(notice.unwrap_or(Notice::Failed(None)));
        }
        released.map(|_| ())
    }

    fn release_in_background(&self, notice: Notice) {
        let (l2, names, token) = (self.l2.clone(), self.names.clone(), self.token.clone());
        let terms = self.terms;
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                let until = Instant::now() + terms.lease;
                let mut pause = Duration::from_millis(50);
                loop {
                    let released = scripts::release(
                        &l2,
                        &names,
                        &token,
                        Some(&notice),
                        Duration::ZERO,
                        terms.budget,
                    )
                    .await;
                    match released {
                        Ok(_) => return,
                        Err(err) if Instant::now() + pause >= until => {
                            tracing::warn!(lock = %names.lock, %err, "could not release a fill lock; it lapses with its lease");
                            return;
                        }
                        Err(_) => {
                            tokio::time::sleep(pause).await;
                            pause *= 2;
                        }
                    }
                }
            });
        }
    }
}

impl Drop for FillLock {
    fn drop(&mut self) {
        self.watchdog.stop();
        if !self.done {
            self.release_in_background(Notice::Failed(None));
        }
    }
}

/// Extends the lease every third of it, counted from `taken`, until the give-up time it is sent.
async fn watch_lease(
    l2: L2,
    lock: Held,
    terms: Terms,
    taken: Instant,
    give_up: watch::Receiver<Instant>,
    finishing: Arc<AtomicBool>,
) {
    let Held { names, token } = lock;
    let every = (terms.lease / 3).max(Duration::from_millis(10));
    let mut tick = tokio::time::interval_at(taken + every, every);
    // A tick missed while the reply that took the lock was late fires once, not in a burst.
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if Instant::now() >= *give_up.borrow() {
            return;
        }
        match scripts::extend(&l2, &names, &token, terms.lease, terms.budget).await {
            Ok(true) => {}
            Ok(false) => {
                if !finishing.load(Ordering::Acquire) {
                    tracing::warn!(lock = %names.lock, "fill lock lost before the fill ended; another instance may fill too");
                }
                return;
            }
            // Keep trying: the lease still runs, and Redis may answer the next time.
            Err(err) => tracing::warn!(lock = %names.lock, %err, "could not extend fill lock"),
        }
    }
}

fn random_token() -> String {
    let bytes: [u8; 16] = rand::random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
