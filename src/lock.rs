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
//! The watchdogs do not run on the request runtime. A process in a burst can be saturated long
//! enough for a watchdog's tick, or its extension's reply, to come after the lease ran out —
//! and a lapsed lease lets another instance fill the same key. So every process has one
//! [`LeaseKeeper`]: a thread of its own with its own runtime and its own Redis connection, on
//! which every watchdog runs. It competes with the request workers for a core, not for a place
//! in their queues (as a Kafka consumer's heartbeat thread does).
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

use crate::entry::Entry;
use std::future::Future;

pub use crate::l2::Terms;
use crate::l2::{KeyNames, L2, L2Error, Lookup, Notice, StoreOutcome};

/// The thread that keeps this process's fill leases alive (see the module doc). Dropping it
/// stops the thread; leases it was extending then lapse by themselves.
pub struct LeaseKeeper {
    runtime: tokio::runtime::Handle,
    /// The keeper's own connection, driven by its own runtime.
    l2: L2,
    _stop: std::sync::mpsc::Sender<()>,
}

impl LeaseKeeper {
    /// Starts the keeper thread; `connect` opens its Redis connection there.
    pub fn start(
        connect: impl FnOnce() -> Result<L2, L2Error> + Send + 'static,
    ) -> Result<LeaseKeeper, L2Error> {
        let (ready, started) = std::sync::mpsc::channel();
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("corral-leases".to_owned())
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(runtime) => runtime,
                    Err(err) => {
                        let _ = ready.send(Err(L2Error::Pubsub(format!(
                            "cannot start the lease keeper's runtime: {err}"
                        ))));
                        return;
                    }
                };
                let opened = runtime.block_on(async { connect() });
                let _ = ready.send(opened.map(|l2| (runtime.handle().clone(), l2)));
                // Serve the watchdogs until the keeper is dropped (its sender with it).
                runtime.block_on(async move {
                    let _ = tokio::task::spawn_blocking(move || stopped.recv()).await;
                });
            });
        if let Err(err) = thread {
            return Err(L2Error::Pubsub(format!(
                "cannot start the lease keeper's thread: {err}"
            )));
        }
        match started.recv() {
            Ok(Ok((runtime, l2))) => Ok(LeaseKeeper {
                runtime,
                l2,
                _stop: stop,
            }),
            Ok(Err(err)) => Err(err),
            Err(_) => Err(L2Error::Pubsub(
                "the lease keeper's thread died while starting".to_owned(),
            )),
        }
    }

    /// Connects the keeper's own connection and loads the scripts on it, within `budget`, on the
    /// keeper's thread — so the first lookup of a burst does not pay for the connection (behind
    /// sentinels: for finding the master) inside its budget.
    pub async fn warm_up(&self, budget: Duration) -> Result<(), L2Error> {
        let own = self.l2.clone();
        self.on_keeper(async move { own.warm_up(budget).await })
            .await
    }

    /// Whether the keeper's connection is considered down.
    pub fn degraded(&self) -> bool {
        self.l2.degraded()
    }

    /// A flight's first look at a key (see [`L2::lookup`]), run on the keeper's thread: if it
    /// takes the lock, the watchdog starts there the moment Redis answers — however long this
    /// process's request workers then take to read the answer. The lock stores and releases
    /// through `l2`.
    pub async fn lookup(
        &self,
        l2: &L2,
        names: &Arc<KeyNames>,
        terms: Terms,
    ) -> Result<(Lookup, Option<FillLock>), L2Error> {
        let (own, main, names) = (self.l2.clone(), l2.clone(), names.clone());
        let keeper = self.handle();
        let call = async move {
            let token = random_token();
            let taken = Instant::now();
            let found = own
                .lookup(&names, &token, terms.lease, terms.budget)
                .await?;
            let held = matches!(found, Lookup::Locked)
                .then(|| FillLock::adopt(&main, &keeper, &names, token, terms, taken));
            Ok((found, held))
        };
        self.on_keeper(call).await
    }

    /// Tries once to take the lock (`SET NX PX`), on the keeper's thread as [`Self::lookup`]
    /// does. `Ok(None)`: someone else holds it.
    pub async fn try_lock(
        &self,
        l2: &L2,
        names: &Arc<KeyNames>,
        terms: Terms,
    ) -> Result<Option<FillLock>, L2Error> {
        let (own, main, names) = (self.l2.clone(), l2.clone(), names.clone());
        let keeper = self.handle();
        let call = async move {
            let token = random_token();
            let taken = Instant::now();
            if !own
                .try_lock(&names, &token, terms.lease, terms.budget)
                .await?
            {
                return Ok(None);
            }
            Ok(Some(FillLock::adopt(
                &main, &keeper, &names, token, terms, taken,
            )))
        };
        self.on_keeper(call).await
    }

    /// Runs `call` with the keeper's own connection on its thread (a fleet budget's slot is
    /// taken there as a lock is, so its lease starts the moment Redis answers). If the caller
    /// goes away first, the call still ends there.
    pub async fn with_own<T, F>(&self, call: impl FnOnce(L2) -> F) -> Result<T, L2Error>
    where
        T: Send + 'static,
        F: Future<Output = Result<T, L2Error>> + Send + 'static,
    {
        self.on_keeper(call(self.l2.clone())).await
    }

    /// Runs `task` with the keeper's own connection on its thread until it ends or the handle
    /// is aborted: what keeps a budget's slot leased however busy the request workers are.
    pub fn keep<F>(&self, task: impl FnOnce(L2) -> F) -> JoinHandle<()>
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.runtime.spawn(task(self.l2.clone()))
    }

    /// Runs `call` on the keeper's runtime. If the caller goes away first, the call still ends
    /// there, and a lock it took is released by its drop.
    async fn on_keeper<T: Send + 'static>(
        &self,
        call: impl Future<Output = Result<T, L2Error>> + Send + 'static,
    ) -> Result<T, L2Error> {
        match self.runtime.spawn(call).await {
            Ok(result) => result,
            Err(err) => Err(L2Error::Pubsub(format!("the lease keeper failed: {err}"))),
        }
    }

    /// What a lock needs of the keeper: its runtime and its connection.
    fn handle(&self) -> KeeperHandle {
        KeeperHandle {
            runtime: self.runtime.clone(),
            l2: self.l2.clone(),
        }
    }
}

/// The keeper's runtime and connection, as a lock taken on its thread holds them.
#[derive(Clone)]
struct KeeperHandle {
    runtime: tokio::runtime::Handle,
    l2: L2,
}

impl KeeperHandle {
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

/// A held fill lock.
pub struct FillLock {
    l2: L2,
    names: Arc<KeyNames>,
    token: String,
    terms: Terms,
    watchdog: Watchdog,
    done: bool,
}

impl FillLock {
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

    pub fn l2(&self) -> &L2 {
        &self.l2
    }

    pub fn names(&self) -> &Arc<KeyNames> {
        &self.names
    }

    /// The upstream call begins now: the lease is extended for at most `max_hold` from here.
    pub fn calling(&self) {
        self.watchdog
            .give_up
            .send_replace(Instant::now() + self.terms.max_hold);
    }

    /// Stores the entry under the lock, releases it and wakes the waiters.
    pub async fn store(mut self, entry: &Entry) -> Result<StoreOutcome, L2Error> {
        self.watchdog.finishing();
        self.done = true;
        let outcome = self
            .l2
            .store(&self.names, &self.token, entry, self.terms.budget)
            .await;
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
        let released = self
            .l2
            .release(
                &self.names,
                &self.token,
                notice.as_ref(),
                pass_ttl,
                self.terms.budget,
            )
            .await;
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
                    let released = l2
                        .release(&names, &token, Some(&notice), Duration::ZERO, terms.budget)
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
        match l2.extend(&names, &token, terms.lease, terms.budget).await {
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
