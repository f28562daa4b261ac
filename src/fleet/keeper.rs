//! The lease keeper: one thread per process, with its own runtime and its own Redis connection,
//! on which fill locks are taken and their leases kept (see `fleet/lock.rs`), and the budgets'
//! slots asked for and renewed (see `fleet/slots.rs`).
//!
//! Why a thread: a process in a burst can be saturated long enough for a watchdog's tick, or
//! its extension's reply, to come after the lease ran out — and a lapsed lease lets another
//! instance fill the same key. Work on the keeper competes with the request workers for a core,
//! not for a place in their queues (as a Kafka consumer's heartbeat thread does).

use std::future::Future;
use std::time::Duration;

use tokio::task::JoinHandle;

use crate::l2::{L2, L2Error};

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
                        let _ = ready.send(Err(L2Error::Keeper(format!(
                            "cannot start its runtime: {err}"
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
            return Err(L2Error::Keeper(format!("cannot start its thread: {err}")));
        }
        match started.recv() {
            Ok(Ok((runtime, l2))) => Ok(LeaseKeeper {
                runtime,
                l2,
                _stop: stop,
            }),
            Ok(Err(err)) => Err(err),
            Err(_) => Err(L2Error::Keeper("its thread died while starting".to_owned())),
        }
    }

    /// Connects the keeper's own connection and loads `scripts` on it, within `budget`, on the
    /// keeper's thread — so the first lookup of a burst does not pay for the connection (behind
    /// sentinels: for finding the master) inside its budget.
    pub async fn warm_up(
        &self,
        budget: Duration,
        scripts: &'static [&'static redis::Script],
    ) -> Result<(), L2Error> {
        let own = self.l2.clone();
        self.on_keeper(async move { own.warm_up(budget, scripts).await })
            .await
    }

    /// Whether the keeper's connection is considered down.
    pub fn degraded(&self) -> bool {
        self.l2.degraded()
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
    pub(super) async fn on_keeper<T: Send + 'static>(
        &self,
        call: impl Future<Output = Result<T, L2Error>> + Send + 'static,
    ) -> Result<T, L2Error> {
        match self.runtime.spawn(call).await {
            Ok(result) => result,
            Err(err) => Err(L2Error::Keeper(format!("a call failed: {err}"))),
        }
    }

    /// The keeper's runtime: where a lock taken on its thread keeps its watchdog.
    pub(super) fn runtime(&self) -> &tokio::runtime::Handle {
        &self.runtime
    }

    /// The keeper's own connection.
    pub(super) fn own(&self) -> &L2 {
        &self.l2
    }
}
