//! The fleet-wide fill lock on one key.
//!
//! `SET NX PX lease` with a random token; a watchdog extends the lease at a third of it while the
//! fill runs (never past the route's `upstream_timeout`); the fill ends by a token-checked store that
//! also releases and publishes, or by a token-checked release. It is an efficiency lock: if it is
//! lost (lapse, failover), the cost is an extra upstream call, never a wrong answer — the store is
//! token-checked.
//!
//! Dropping a [`FillLock`] that was neither stored nor released (a panicking or cancelled fill)
//! releases it in the background with a `failed` notice, so waiters compete again at once instead of
//! sitting out the lease.

use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;

use crate::entry::Entry;
use crate::l2::{KeyNames, L2, L2Error, Notice, StoreOutcome};

/// A held fill lock.
pub struct FillLock {
    l2: L2,
    names: Arc<KeyNames>,
    token: String,
    watchdog: JoinHandle<()>,
    done: bool,
}

impl FillLock {
    /// Tries once to take the lock. `Ok(None)`: someone else holds it.
    pub async fn try_acquire(
        l2: &L2,
        names: &Arc<KeyNames>,
        lease: Duration,
        max_hold: Duration,
    ) -> Result<Option<FillLock>, L2Error> {
        let token = random_token();
        if !l2.try_lock(names, &token, lease).await? {
            return Ok(None);
        }
        Ok(Some(FillLock::adopt(l2, names, token, lease, max_hold)))
    }

    /// A fresh token for taking the lock elsewhere (the lookup script), then [`FillLock::adopt`].
    pub fn new_token() -> String {
        random_token()
    }

    /// Takes charge of a lock already taken under `token`: starts its watchdog, and releases it
    /// on drop.
    pub fn adopt(
        l2: &L2,
        names: &Arc<KeyNames>,
        token: String,
        lease: Duration,
        max_hold: Duration,
    ) -> FillLock {
        let watchdog = tokio::spawn(watch(
            l2.clone(),
            names.clone(),
            token.clone(),
            lease,
            max_hold,
        ));
        FillLock {
            l2: l2.clone(),
            names: names.clone(),
            token,
            watchdog,
            done: false,
        }
    }

    pub fn l2(&self) -> &L2 {
        &self.l2
    }

    pub fn names(&self) -> &Arc<KeyNames> {
        &self.names
    }

    /// Stores the entry under the lock, releases it and wakes the waiters.
    pub async fn store(mut self, entry: &Entry) -> Result<StoreOutcome, L2Error> {
        self.watchdog.abort();
        self.done = true;
        let outcome = self.l2.store(&self.names, &self.token, entry).await;
        if outcome.is_err() {
            // The store may not have run: do not leave the waiters for the lease.
            self.release_in_background(Notice::Failed(None));
        }
        outcome
    }

    /// Releases the lock and tells the waiters (if there is anything to tell) why nothing was
    /// stored; an `Uncacheable` notice also sets the key's uncacheable marker for `pass_ttl`.
    pub async fn release(
        mut self,
        notice: Option<Notice>,
        pass_ttl: Duration,
    ) -> Result<(), L2Error> {
        self.watchdog.abort();
        self.done = true;
        self.l2
            .release(&self.names, &self.token, notice.as_ref(), pass_ttl)
            .await
            .map(|_| ())
    }

    fn release_in_background(&self, notice: Notice) {
        let (l2, names, token) = (self.l2.clone(), self.names.clone(), self.token.clone());
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                if let Err(err) = l2.release(&names, &token, Some(&notice), Duration::ZERO).await {
                    tracing::warn!(lock = %names.lock, %err, "could not release an abandoned fill lock; it lapses with its lease");
                }
            });
        }
    }
}

impl Drop for FillLock {
    fn drop(&mut self) {
        self.watchdog.abort();
        if !self.done {
            self.release_in_background(Notice::Failed(None));
        }
    }
}

/// Extends the lease every third of it while the holder lives, until `max_hold`.
async fn watch(l2: L2, names: Arc<KeyNames>, token: String, lease: Duration, max_hold: Duration) {
    let every = (lease / 3).max(Duration::from_millis(10));
    let give_up = tokio::time::Instant::now() + max_hold;
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    loop {
        tick.tick().await;
        if tokio::time::Instant::now() >= give_up {
            return;
        }
        match l2.extend(&names, &token, lease).await {
            Ok(true) => {}
            Ok(false) => {
                tracing::warn!(lock = %names.lock, "fill lock lost before the fill ended; another instance may fill too");
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
