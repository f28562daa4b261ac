//! Coalescing across the fleet: one fill per key for every instance sharing a Redis.
//!
//! The flight first looks and, on a miss, takes the fill lock in the same round trip. If it got
//! the lock it fills; if another instance holds it, it subscribes to the key's channel, re-checks
//! entry, mark and the lock's remaining lease, and waits for the holder's notice — competing again
//! when the lease lapses or the fill fails, and giving up at `wait_timeout` per `on_wait_timeout`.
//! Redis faults end the wait at once: the flight fills for this instance alone.

use std::sync::Arc;
use std::time::Instant;

use crate::config::OnWaitTimeout;
use crate::entry::{Entry, Freshness, now_ms};
use crate::fill::{
    Claim, Fill, FillError, FillRequest, Filler, Fleet, LAPSE_MARGIN, Source, quiet_release,
};
use crate::l2::{KeyNames, Lookup, Notice, Peek};
use crate::lock::FillLock;
use crate::metrics::LockOutcome;
use crate::notice::Wake;

/// What a fleet flight did with the lock, for the metrics.
#[derive(Default)]
struct LockTrace {
    acquired: bool,
    waited: bool,
    timed_out: bool,
}

impl Filler {
    pub(crate) async fn fill_fleet(
        &self,
        req: &FillRequest,
        fleet: &Fleet,
        names: &Arc<KeyNames>,
    ) -> Fill {
        let started = Instant::now();
        let mut trace = LockTrace::default();
        let fill = self.coalesce(req, fleet, names, &mut trace).await;
        let outcome = match trace {
            LockTrace {
                timed_out: true, ..
            } => Some(LockOutcome::WaitTimeout),
            LockTrace {
                acquired: true,
                waited: false,
                ..
            } => Some(LockOutcome::Acquired),
            LockTrace {
                acquired: true,
                waited: true,
                ..
            } => Some(LockOutcome::TookOver),
            LockTrace { waited: true, .. } => Some(LockOutcome::Waited),
            // Redis failed before any lock decision: degraded, nothing to count.
            LockTrace { .. } => None,
        };
        if let Some(outcome) = outcome {
            let waited = trace.waited.then(|| started.elapsed());
            self.metrics.lock(&req.route.name, outcome, waited);
        }
        fill
    }

    /// The fleet flight proper: look, and take the lock if it is free, in one round trip; else
    /// wait for its holder's notice, competing again when the lease lapses or the fill fails.
    async fn coalesce(
        &self,
        req: &FillRequest,
        fleet: &Fleet,
        names: &Arc<KeyNames>,
        trace: &mut LockTrace,
    ) -> Fill {
        let route = &req.route;
        let lock = &route.lock;
        let deadline = tokio::time::Instant::now() + lock.wait_timeout;
        let degraded = |err: &dyn std::fmt::Display| {
            tracing::warn!(route = %route.name, %err, "redis unavailable; filling for this instance only (degraded)");
        };
        let token = FillLock::new_token();
        let first = match fleet.l2.lookup(names, &token, lock.lease).await {
            Ok(first) => first,
            Err(err) => {
                degraded(&err);
                return self.fill_with(req, Claim::Instance(None), None).await;
            }
        };
        let mut fallback = None;
        // Whether the lock is known to be held elsewhere (so the next step is to wait, not compete).
        let mut held_elsewhere = match first {
            Lookup::Locked => {
                trace.acquired = true;
                let held =
                    FillLock::adopt(&fleet.l2, names, token, lock.lease, route.upstream_timeout);
                return self.fill_with(req, Claim::Fleet(held), None).await;
            }
            Lookup::Held => true,
            Lookup::Uncacheable => {
                self.marks.insert(req.key, route.uncacheable_ttl);
                return Fill::FetchYourself;
            }
            Lookup::Garbled => false,
            Lookup::Entry(entry) => {
                let peek = Peek {
                    entry: Some(entry),
                    ..Peek::default()
                };
                match self.settled(req, peek, Source::L2).await {
                    Ok(fill) => return fill,
                    Err(stale) => {
                        fallback = stale;
                        false
                    }
                }
            }
        };
        'compete: loop {
            if std::mem::take(&mut held_elsewhere) {
                // Straight to waiting: the lookup saw the lock held.
            } else if tokio::time::Instant::now() >= deadline {
                trace.timed_out = true;
                return self.wait_timed_out(req, fallback).await;
            } else {
                let acquired =
                    FillLock::try_acquire(&fleet.l2, names, lock.lease, route.upstream_timeout);
                match acquired.await {
                    Ok(Some(held)) => {
                        trace.acquired = true;
                        // Someone may have filled between our last look and the lock.
                        let filled = fleet.l2.get(names).await.ok().and_then(|peek| peek.entry);
                        if let Some(entry) =
                            filled.filter(|e| e.times.freshness(now_ms()) == Freshness::Fresh)
                        {
                            quiet_release(req, held).await;
                            return self.shared(req, entry, Source::L2).await;
                        }
                        return self.fill_with(req, Claim::Fleet(held), fallback).await;
                    }
                    Ok(None) => {}
                    Err(err) => {
                        degraded(&err);
                        return self.fill_with(req, Claim::Instance(None), fallback).await;
                    }
                }
            }
            // Held elsewhere: subscribe first, then re-check, then wait.
            trace.waited = true;
            let mut sub = match fleet.notices.subscribe(&names.channel).await {
                Ok(sub) => sub,
                Err(err) => {
                    degraded(&err);
                    return self.fill_with(req, Claim::Instance(None), fallback).await;
                }
            };
            loop {
                let peek = match fleet.l2.peek(names).await {
                    Ok(peek) => peek,
                    Err(err) => {
                        degraded(&err);
                        return self.fill_with(req, Claim::Instance(None), fallback).await;
                    }
                };
                let lock_ttl = peek.lock_ttl;
                if let Ok(fill) = self.settled(req, peek, Source::Remote).await {
                    return fill;
                }
                // The lock went away without a fresh entry: compete again now.
                let Some(ttl) = lock_ttl else {
                    continue 'compete;
                };
                let wake = tokio::select! {
                    wake = sub.next() => wake,
                    () = tokio::time::sleep(ttl + LAPSE_MARGIN) => continue 'compete,
                    () = tokio::time::sleep_until(deadline) => continue 'compete,
                };
                match wake {
                    Some(Wake::Notice(Notice::Stored(Some(entry)))) => {
                        self.l1.insert(req.key, &route.name, entry.clone()).await;
                        return Fill::Shared {
                            entry,
                            source: Source::Remote,
                        };
                    }
                    Some(Wake::Notice(Notice::Stored(None))) => match fleet.l2.get(names).await {
                        Ok(peek) => match self.settled(req, peek, Source::Remote).await {
                            Ok(fill) => return fill,
                            Err(_) => continue 'compete,
                        },
                        Err(err) => {
                            degraded(&err);
                            return self.fill_with(req, Claim::Instance(None), fallback).await;
                        }
                    },
                    Some(Wake::Notice(Notice::Failed(answer))) => {
                        let failed = answer.as_ref().is_none_or(|e| e.status.is_server_error());
                        match (&fallback, answer) {
                            (Some(stale), _) if failed => {
                                return Fill::Shared {
                                    entry: stale.clone(),
                                    source: Source::Stale,
                                };
                            }
                            (_, Some(entry)) => {
                                return Fill::Shared {
                                    entry,
                                    source: Source::Remote,
                                };
                            }
                            // Nothing to share (too large for a notice): compete again.
                            (_, None) => continue 'compete,
                        }
                    }
                    Some(Wake::Notice(Notice::Uncacheable)) => {
                        self.marks.insert(req.key, route.uncacheable_ttl);
                        return Fill::FetchYourself;
                    }
                    // Notices may have been lost: confirm the subscription, then re-check.
                    Some(Wake::Resync) => {
                        if let Err(err) = sub.confirm().await {
                            degraded(&err);
                            return self.fill_with(req, Claim::Instance(None), fallback).await;
                        }
                    }
                    None => continue 'compete,
                }
            }
        }
    }

    async fn wait_timed_out(&self, req: &FillRequest, fallback: Option<Arc<Entry>>) -> Fill {
        let waited = req.route.lock.wait_timeout;
        tracing::warn!(route = %req.route.name, ?waited, policy = ?req.route.lock.on_wait_timeout, "gave up waiting for another instance's fill");
        match (req.route.lock.on_wait_timeout, fallback) {
            (_, Some(stale)) => Fill::Shared {
                entry: stale,
                source: Source::Stale,
            },
            // One call for this instance's waiters, not one per waiter.
            (OnWaitTimeout::Bypass, None) => self.fill_with(req, Claim::Instance(None), None).await,
            (OnWaitTimeout::GatewayTimeout, None) => Fill::Failed(FillError::WaitTimeout(waited)),
        }
    }
}
