//! Fill notices: one pub/sub hub per process, shared by every key that waits (one connection; in a
//! cluster, one per master for the sharded notices plus one for purges).
//!
//! # Layout
//! - `fleet/hub.rs` — the hub ([`Notices`]), a waiter's [`Subscription`], what wakes it ([`Wake`])
//!   and what the reconciling task is asked (`Request`).
//! - `hub/waiters.rs` — local fan-out: the waiters by channel, each with a mailbox of wakes.
//! - `hub/reconciler.rs` — the one task that makes the server's subscriptions match the wanted
//!   ones, and resyncs the waiters when notices may have been lost.
//! - `hub/topology.rs` — which node the hub subscribes on and how each call there is bounded;
//!   following it (the next seed node, the master the sentinels name).
//!   `hub/sharded.rs` — in a cluster, the sharded subscriptions of fill channels;
//!   `hub/bounds.rs` — how every call the hub makes is bounded (breaker, budget, metrics).
//! - `hub/pushes.rs` — what arrives on a connection: notices, purges, lost subscriptions.
//! - `hub/invalidation.rs` — applying purges to L1, and dropping L1 after a disconnection.
//!
//! Dependencies run one way: hub → reconciler → topology → sharded → pushes → waiters, topology
//! and sharded → bounds, the reconciler → invalidation (`tests/layering.rs` checks it); below
//! them only the notice format (`fleet/notice.rs`), [`crate::l2`] (connections, budgets),
//! [`crate::l1`] and [`crate::purge`]. Nothing here calls the fill or the proxy.
//!
//! # Waking a waiter
//! A waiter calls [`Notices::subscribe`] for its key's channel and gets a [`Subscription`] once Redis
//! has confirmed the SUBSCRIBE — only then does it re-check L2, which closes the race with a fill that
//! finishes in between. Dropping the subscription unsubscribes (when no one else in the process waits
//! on that channel).
//!
//! SUBSCRIBE and UNSUBSCRIBE go through one task that drains every pending request and reconciles the
//! wanted set of channels with the subscribed one, in order, in one batch each. So a channel dropped
//! and wanted again in quick succession can never end up unsubscribed by a late UNSUBSCRIBE, and a
//! burst of new waiting keys costs one round trip, not one each.
//!
//! The connection is RESP3 (pushes share the connection with replies) under a `ConnectionManager`
//! that reconnects by itself. A disconnection may have lost notices, so every waiter is told
//! ([`Wake::Resync`]) to confirm its subscription again — which re-SUBSCRIBEs every wanted channel on
//! the new connection — and then re-check L2: a notice published before the confirmation is
//! reflected in L2 (the store precedes the PUBLISH in one script), one published after it arrives.
//!
//! The same connection carries purges: the invalidation channel is always subscribed, and each
//! [`Purge`](crate::purge::Purge) that arrives is applied to this process's L1. Purges missed while disconnected cannot
//! be replayed, so once the channel is subscribed again after a disconnection the whole L1 is
//! dropped. A failed (re)subscription is retried every second until Redis answers.
//!
//! # In a Redis Cluster
//! Fill notices are sharded (`SPUBLISH`, Redis >= 7.0): each fill channel is hash-tagged like its
//! key, so the notice is delivered by the master of the key's slot alone and never crosses the
//! cluster bus (a classic `PUBLISH` is copied to every node). The hub `SSUBSCRIBE`s through a
//! RESP3 cluster connection of redis-rs, which keeps one connection per master, routes each
//! subscription to its slot's master and re-subscribes after a reconnection or a topology
//! change. When a slot moves to another master the old one drops its sharded subscriptions
//! (an `sunsubscribe` push): the hub subscribes each such channel again — now on the new master —
//! and its waiters resync (confirm, then re-check L2). A dropped connection to a master resyncs
//! every waiter, as on one server.
//!
//! Purges stay broadcast: the invalidation channel is a classic subscription on one node,
//! carried by a second connection. It starts on the first seed node in `[redis] cluster`; when
//! that node stops answering (two failed reconciliations in a row, or the first one on a node
//! that never answered) it moves to the next seed, round robin, and L1 is dropped once the
//! invalidation channel is subscribed again.
//!
//! # Behind Redis Sentinel
//! The hub subscribes on the master the sentinels name (asked on first use, so Corral starts while
//! they are down). On their `+switch-master` event about that master (see
//! `l2/switches.rs`) it asks them at once; after a disconnection, and after every failed
//! reconciliation, it asks them again
//! (at most every 200 ms, bounded by `[redis] timeout`); when they name another server — a failover
//! happened — it moves there and resyncs as above: waiters re-confirm and re-check L2, and L1 is
//! dropped once the invalidation channel is subscribed again. A SUBSCRIBE under way on the old
//! master when the event arrives is abandoned and the pass starts again on the new one.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use super::notice::Notice;
use crate::breaker::Breaker;
use crate::config::RedisConfig;
use crate::l1::L1;
use crate::l2::{L2Error, PATIENCE};
use crate::metrics::Metrics;

use bounds::Bounds;
use invalidation::Invalidation;
use pushes::Pushes;
use reconciler::Driver;
use topology::Topology;
use waiters::{Mailbox, Waiters, lock};

mod bounds;
mod invalidation;
mod pushes;
mod reconciler;
mod sharded;
mod topology;
mod waiters;

/// What wakes a waiter.
#[derive(Debug, Clone, PartialEq)]
pub enum Wake {
    Notice(Notice),
    /// The pub/sub connection dropped: notices may have been lost, re-check L2.
    Resync,
}

/// What the reconciler is asked or told (by the hub's handles, the push handlers, the sentinels'
/// switch watch, its own retry timer).
#[derive(Debug)]
enum Request {
    /// Reconcile, then acknowledge. `channel`: the one the asker waits on, acknowledged by its
    /// own subscription, so a pass that fails elsewhere (another node of a cluster) does not
    /// fail it; `None`: by the whole pass.
    Sync {
        channel: Option<String>,
        ack: oneshot::Sender<Result<(), String>>,
    },
    /// The connection dropped: the server holds no subscriptions any more.
    Reset,
    /// Reconcile again after a failure.
    Retry,
    /// The server dropped this sharded subscription (its slot moved to another master).
    Lost(String),
    /// The sentinels announced a new master: ask them now and move there.
    Switched,
    /// A connection of the sharded side dropped: its fill channels are to be subscribed again
    /// (the invalidation channel, on the classic connection, is not affected).
    ResetSharded,
}

/// The process's pub/sub hub. Cloning shares it.
#[derive(Clone)]
pub struct Notices {
    waiters: Waiters,
    requests: mpsc::UnboundedSender<Request>,
    timeout: Duration,
    breaker: Arc<Breaker>,
}

/// A live interest in one channel. Receives every wake after it was created, in order.
pub struct Subscription {
    channel: String,
    mailbox: Arc<Mailbox>,
    notices: Notices,
}

impl Notices {
    /// Prepares the connection (lazily: Redis may be down now), starts the reconciling task and
    /// subscribes the invalidation channel, whose purges are applied to `l1`.
    pub fn connect(
        cfg: &RedisConfig,
        breaker: Arc<Breaker>,
        metrics: Arc<Metrics>,
        l1: L1,
    ) -> Result<Notices, L2Error> {
        let waiters: Waiters = Arc::default();
        let (requests, rx) = mpsc::unbounded_channel();
        let (invalidation, purges) = Invalidation::new(&cfg.namespace);
        // Subscribing is a lock decision: a failed SUBSCRIBE makes a waiter fill on its own.
        let timeout = cfg.longest_budget();
        let pushes = Pushes {
            dispatch: waiters.clone(),
            invalidations: invalidation.channel.clone(),
            // Weak: the connections (inside the reconciling task) must not keep that task alive.
            resets: requests.downgrade(),
            purges: invalidation.purges.clone(),
            sharded: false,
            metrics: metrics.clone(),
        };
        let switched = requests.downgrade();
        let on_switch = move || {
            if let Some(requests) = switched.upgrade() {
                let _ = requests.send(Request::Switched);
            }
        };
        let bounds = Bounds {
            breaker: breaker.clone(),
            metrics,
            timeout,
        };
        let topology = Topology::new(cfg, bounds, &pushes, on_switch)?;
        tokio::spawn(invalidation::apply(purges, l1));
        let reconciler = Driver {
            topology,
            waiters: waiters.clone(),
            invalidation,
        };
        tokio::spawn(reconciler.run(rx));
        // Subscribe the invalidation channel now, without waiting for it.
        let (ack, _) = oneshot::channel();
        let _ = requests.send(Request::Sync { channel: None, ack });
        Ok(Notices {
            waiters,
            requests,
            timeout,
            breaker,
        })
    }

    /// Subscribes to `channel`; returns once Redis confirmed it (bounded by the Redis timeout).
    ///
    /// Cancel safety: dropping the future before it returns leaves no subscription behind beyond
    /// the next reconciliation.
    pub async fn subscribe(&self, channel: &str) -> Result<Subscription, L2Error> {
        if !self.breaker.allows() {
            return Err(L2Error::CircuitOpen { op: "SUBSCRIBE" });
        }
        let mailbox = Arc::new(Mailbox::default());
        lock(&self.waiters)
            .entry(channel.to_owned())
            .or_default()
            .mailboxes
            .push(mailbox.clone());
        let mut subscription = Subscription {
            channel: channel.to_owned(),
            mailbox,
            notices: self.clone(),
        };
        subscription.confirm().await?;
        Ok(subscription)
    }

    /// Waits until the reconciler has made the server's subscriptions match the wanted ones
    /// (with `channel`, until that one's subscription is confirmed).
    async fn sync(&self, channel: Option<&str>) -> Result<(), L2Error> {
        let (ack, confirmed) = oneshot::channel();
        let budget = self.timeout;
        let unconfirmed = || L2Error::Timeout {
            op: "SUBSCRIBE",
            budget,
        };
        self.requests
            .send(Request::Sync {
                channel: channel.map(str::to_owned),
                ack,
            })
            .map_err(|_| unconfirmed())?;
        match tokio::time::timeout(PATIENCE + budget, confirmed).await {
            Ok(Ok(Ok(()))) => Ok(()),
            Ok(Ok(Err(reason))) => Err(L2Error::Pubsub(reason)),
            _ => Err(unconfirmed()),
        }
    }

    /// Whether the pub/sub connection is considered down.
    pub fn degraded(&self) -> bool {
        self.breaker.is_open()
    }

    /// Returns once the hub is subscribed (the invalidation channel at least), within twice the
    /// budget of a call.
    pub async fn ready(&self) -> Result<(), L2Error> {
        self.sync(None).await
    }

    /// Channels with at least one local waiter.
    pub fn waiting_channels(&self) -> usize {
        lock(&self.waiters).len()
    }
}

impl Subscription {
    /// The next wake on this channel. Cancel safe: a wake is taken from the queue only when
    /// it is returned.
    pub async fn next(&mut self) -> Wake {
        loop {
            if let Some(wake) = self.mailbox.take() {
                return wake;
            }
            self.mailbox.ready.notified().await;
        }
    }

    /// Returns once the server has confirmed this subscription (again, after a [`Wake::Resync`]).
    pub async fn confirm(&mut self) -> Result<(), L2Error> {
        self.notices.sync(Some(&self.channel)).await
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let mut waiters = lock(&self.notices.waiters);
        if let Some(slot) = waiters.get_mut(&self.channel) {
            slot.mailboxes.retain(|m| !Arc::ptr_eq(m, &self.mailbox));
            if slot.mailboxes.is_empty() {
                waiters.remove(&self.channel);
                drop(waiters);
                // No acknowledgement wanted: the reconciler unsubscribes on its next pass.
                let (ack, _) = oneshot::channel();
                let _ = self
                    .notices
                    .requests
                    .send(Request::Sync { channel: None, ack });
            }
        }
    }
}
