//! Fill notices: one pub/sub connection per process, shared by every key that waits.
//!
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
//! [`Purge`] that arrives is applied to this process's L1. Purges missed while disconnected cannot
//! be replayed, so once the channel is subscribed again after a disconnection the whole L1 is
//! dropped. A failed (re)subscription is retried every second until Redis answers.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use redis::aio::ConnectionManager;
use redis::{Client, ProtocolVersion, PushInfo, PushKind, Value};
use tokio::sync::{mpsc, oneshot, watch};

use crate::breaker::Breaker;
use crate::config::RedisConfig;
use crate::l1::L1;
use crate::l2::{L2Error, Notice, guarded, invalidation_channel, manager_config};
use crate::metrics::Metrics;
use crate::purge::Purge;

/// How often a failed (re)subscription is tried again.
const RETRY: Duration = Duration::from_secs(1);

/// What wakes a waiter.
#[derive(Debug, Clone, PartialEq)]
pub enum Wake {
    Notice(Notice),
    /// The pub/sub connection dropped: notices may have been lost, re-check L2.
    Resync,
}

type Waiters = Arc<Mutex<HashMap<String, Slot>>>;

struct Slot {
    refs: usize,
    /// Bumps a sequence number with each wake so every receiver sees every change.
    tx: watch::Sender<(u64, Option<Wake>)>,
}

enum Request {
    /// Reconcile, then acknowledge.
    Sync(oneshot::Sender<Result<(), String>>),
    /// The connection dropped: the server holds no subscriptions any more.
    Reset,
    /// Reconcile again after a failure.
    Retry,
}

/// The process's pub/sub hub. Cloning shares it.
#[derive(Clone)]
pub struct Notices {
    waiters: Waiters,
    requests: mpsc::UnboundedSender<Request>,
    timeout: Duration,
    breaker: Arc<Breaker>,
}

/// A live interest in one channel. Receives every wake after it was created.
pub struct Subscription {
    channel: String,
    rx: watch::Receiver<(u64, Option<Wake>)>,
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
        let dispatch = waiters.clone();
        let (requests, rx) = mpsc::unbounded_channel();
        let resets = requests.clone();
        let (purges, purges_rx) = mpsc::unbounded_channel();
        let invalidations = invalidation_channel(&cfg.namespace);
        let route_purges = purges.clone();
        let channel = invalidations.clone();
        let client = resp3_client(&cfg.url)?;
        let config = manager_config(cfg.timeout).set_push_sender(move |push: PushInfo| {
            match deliver(&dispatch, &channel, push) {
                Delivered::Disconnected => {
                    let _ = resets.send(Request::Reset);
                }
                Delivered::Purge(purge) => {
                    let _ = route_purges.send(purge);
                }
                Delivered::Nothing => {}
            }
            Ok::<(), redis::aio::SendError>(())
        });
        let conn = ConnectionManager::new_lazy_with_config(client, config).map_err(|source| {
            L2Error::Redis {
                op: "pubsub connect",
                source,
            }
        })?;
        tokio::spawn(apply_purges(purges_rx, l1));
        tokio::spawn(reconcile(
            Reconciler {
                conn,
                waiters: waiters.clone(),
                always: invalidations,
                purges,
                timeout: cfg.timeout,
                breaker: breaker.clone(),
                metrics,
            },
            rx,
        ));
        // Subscribe the invalidation channel now, without waiting for it.
        let (ack, _) = oneshot::channel();
        let _ = requests.send(Request::Sync(ack));
        Ok(Notices {
            waiters,
            requests,
            timeout: cfg.timeout,
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
        let rx = {
            let mut waiters = lock(&self.waiters);
            let slot = waiters.entry(channel.to_owned()).or_insert_with(|| Slot {
                refs: 0,
                tx: watch::channel((0, None)).0,
            });
            slot.refs += 1;
            slot.tx.subscribe()
        };
        let mut subscription = Subscription {
            channel: channel.to_owned(),
            rx,
            notices: self.clone(),
        };
        subscription.confirm().await?;
        Ok(subscription)
    }

    /// Waits until the reconciler has made the server's subscriptions match the wanted ones.
    async fn sync(&self) -> Result<(), L2Error> {
        let (ack, confirmed) = oneshot::channel();
        let budget = self.timeout;
        let unconfirmed = || L2Error::Timeout {
            op: "SUBSCRIBE",
            budget,
        };
        self.requests
            .send(Request::Sync(ack))
            .map_err(|_| unconfirmed())?;
        match tokio::time::timeout(budget * 2, confirmed).await {
            Ok(Ok(Ok(()))) => Ok(()),
            Ok(Ok(Err(reason))) => Err(L2Error::Pubsub(reason)),
            _ => Err(unconfirmed()),
        }
    }

    /// Channels with at least one local waiter.
    pub fn waiting_channels(&self) -> usize {
        lock(&self.waiters).len()
    }
}

impl Subscription {
    /// The next wake on this channel. Cancel safe.
    pub async fn next(&mut self) -> Option<Wake> {
        self.rx.changed().await.ok()?;
        self.rx.borrow_and_update().1.clone()
    }

    /// Returns once the server has confirmed this subscription (again, after a [`Wake::Resync`]).
    pub async fn confirm(&mut self) -> Result<(), L2Error> {
        self.notices.sync().await
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let mut waiters = lock(&self.notices.waiters);
        if let Some(slot) = waiters.get_mut(&self.channel) {
            slot.refs -= 1;
            if slot.refs == 0 {
                waiters.remove(&self.channel);
                drop(waiters);
                // No acknowledgement wanted: the reconciler unsubscribes on its next pass.
                let (ack, _) = oneshot::channel();
                let _ = self.notices.requests.send(Request::Sync(ack));
            }
        }
    }
}

/// Poisoning only means another thread panicked while holding the map; the map itself is still
/// consistent (every mutation is a single insert/remove), so carry on with it.
fn lock(waiters: &Waiters) -> MutexGuard<'_, HashMap<String, Slot>> {
    waiters
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// What a push from Redis amounted to.
enum Delivered {
    Nothing,
    /// The connection dropped: the server holds no subscriptions any more.
    Disconnected,
    /// A purge arrived on the invalidation channel.
    Purge(Purge),
}

/// Hands a push to the waiters of its channel, or recognises a purge or a disconnection.
fn deliver(waiters: &Waiters, invalidations: &str, push: PushInfo) -> Delivered {
    match push.kind {
        PushKind::Message => {
            let [channel, payload] = push.data.as_slice() else {
                return Delivered::Nothing;
            };
            let (Some(channel), Some(payload)) = (bytes_of(channel), bytes_of(payload)) else {
                return Delivered::Nothing;
            };
            if channel == invalidations.as_bytes() {
                return match Purge::parse(payload) {
                    Some(purge) => Delivered::Purge(purge),
                    None => Delivered::Nothing,
                };
            }
            let Ok(channel) = std::str::from_utf8(channel) else {
                return Delivered::Nothing;
            };
            let waiters = lock(waiters);
            // Parse only for a channel someone here waits on.
            if let Some(slot) = waiters.get(channel)
                && let Some(notice) = Notice::parse(payload)
            {
                slot.tx.send_modify(|(seq, wake)| {
                    *seq += 1;
                    *wake = Some(Wake::Notice(notice));
                });
            }
            Delivered::Nothing
        }
        PushKind::Disconnection => {
            let waiters = lock(waiters);
            tracing::warn!(
                waiting = waiters.len(),
                "redis pub/sub connection lost; waiters re-subscribe and re-check"
            );
            for slot in waiters.values() {
                slot.tx.send_modify(|(seq, wake)| {
                    *seq += 1;
                    *wake = Some(Wake::Resync);
                });
            }
            Delivered::Disconnected
        }
        _ => Delivered::Nothing,
    }
}

async fn apply_purges(mut purges: mpsc::UnboundedReceiver<Purge>, l1: L1) {
    while let Some(purge) = purges.recv().await {
        tracing::info!(purge = %purge.payload(), "invalidating L1");
        purge.apply(&l1).await;
    }
}

fn bytes_of(value: &Value) -> Option<&[u8]> {
    match value {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.as_bytes()),
        _ => None,
    }
}

/// The reconciling task's state.
struct Reconciler {
    conn: ConnectionManager,
    waiters: Waiters,
    /// Subscribed whether or not anyone waits: the invalidation channel.
    always: String,
    purges: mpsc::UnboundedSender<Purge>,
    timeout: Duration,
    breaker: Arc<Breaker>,
    metrics: Arc<Metrics>,
}

/// Drains requests and makes the server's subscriptions match the channels that have waiters
/// (plus the invalidation channel); retries every second while they do not match.
async fn reconcile(mut r: Reconciler, mut requests: mpsc::UnboundedReceiver<Request>) {
    let mut subscribed: HashSet<String> = HashSet::new();
    let mut ever_subscribed = false;
    let mut behind = false;
    loop {
        let first = if behind {
            tokio::select! {
                request = requests.recv() => request,
                () = tokio::time::sleep(RETRY) => Some(Request::Retry),
            }
        } else {
            requests.recv().await
        };
        let Some(first) = first else {
            return;
        };
        let mut acks = Vec::new();
        let pending = std::iter::from_fn(|| requests.try_recv().ok());
        for request in std::iter::once(first).chain(pending) {
            match request {
                Request::Sync(ack) => acks.push(ack),
                Request::Reset => subscribed.clear(),
                Request::Retry => {}
            }
        }
        let mut wanted: HashSet<String> = lock(&r.waiters).keys().cloned().collect();
        wanted.insert(r.always.clone());
        let to_drop: Vec<String> = subscribed.difference(&wanted).cloned().collect();
        let to_add: Vec<String> = wanted.difference(&subscribed).cloned().collect();
        let mut result = Ok(());
        if !to_drop.is_empty() {
            let call = r.conn.unsubscribe(&to_drop);
            result = guarded(&r.breaker, &r.metrics, "UNSUBSCRIBE", r.timeout, call).await;
            if result.is_ok() {
                for channel in &to_drop {
                    subscribed.remove(channel);
                }
            }
        }
        if !to_add.is_empty() && result.is_ok() {
            let call = r.conn.subscribe(&to_add);
            result = guarded(&r.breaker, &r.metrics, "SUBSCRIBE", r.timeout, call).await;
            if result.is_ok() {
                if to_add.contains(&r.always) {
                    if ever_subscribed {
                        // Purges may have been missed while disconnected.
                        tracing::info!(
                            "pub/sub re-subscribed: dropping L1, which may have missed purges"
                        );
                        let _ = r.purges.send(Purge::All);
                    }
                    ever_subscribed = true;
                }
                subscribed.extend(to_add);
            }
        }
        behind = result.is_err();
        if let Err(err) = &result {
            tracing::warn!(%err, "redis pub/sub (un)subscribe failed; retrying");
        }
        for ack in acks {
            let _ = ack.send(result.as_ref().map(|_| ()).map_err(ToString::to_string));
        }
    }
}

fn resp3_client(url: &str) -> Result<Client, L2Error> {
    use redis::IntoConnectionInfo;
    let info = url
        .into_connection_info()
        .map_err(|source| L2Error::Redis { op: "open", source })?;
    let settings = info
        .redis_settings()
        .clone()
        .set_protocol(ProtocolVersion::RESP3);
    Client::open(info.set_redis_settings(settings))
        .map_err(|source| L2Error::Redis { op: "open", source })
}
