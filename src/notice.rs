//! Fill notices: one pub/sub hub per process, shared by every key that waits (one connection; in a
//! cluster, one per master for the sharded notices plus one for purges).
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
//! dropped once the invalidation channel is subscribed again.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use redis::aio::ConnectionManager;
use redis::cluster_async::ClusterConnection;
use redis::{Client, ProtocolVersion};
use tokio::sync::{Notify, mpsc, oneshot};

use crate::breaker::Breaker;
use crate::config::{RedisConfig, RedisTopology};
use crate::l1::L1;
use crate::l2::sentinel::{self, Sentinels};
use crate::l2::switches::{self, SwitchWatch};
use crate::l2::{
    L2Error, Notice, PATIENCE, guarded, invalidation_channel, manager_config, patiently,
};
use crate::metrics::Metrics;
use crate::purge::Purge;
use crate::redact::redact;

use pushes::Pushes;
use sharded::{sharded_connection, sharded_sync};

mod pushes;
mod sharded;

/// How often a failed (re)subscription is tried again.
const RETRY: Duration = Duration::from_secs(1);
/// Failed reconciliations in a row after which the hub moves to the next seed node (when there is
/// more than one): a node that answered before gets a second chance to reconnect.
const SWITCH_AFTER: u32 = 2;

/// What wakes a waiter.
#[derive(Debug, Clone, PartialEq)]
pub enum Wake {
    Notice(Notice),
    /// The pub/sub connection dropped: notices may have been lost, re-check L2.
    Resync,
}

type Waiters = Arc<Mutex<HashMap<String, Slot>>>;

/// The local waiters on one channel.
#[derive(Default)]
struct Slot {
    mailboxes: Vec<Arc<Mailbox>>,
}

/// Most wakes one subscription holds unread; past it the oldest resync (else the oldest wake)
/// makes room. A waiter reads each wake as it comes, so this is only a bound against a flood.
const MAILBOX_CAP: usize = 16;

/// One subscription's wakes, in the order they came. A queue, not a latest-value slot: a
/// terminal notice (`stored`, `failed`, `uncacheable`) is never overwritten by a later resync.
#[derive(Default)]
struct Mailbox {
    queue: Mutex<VecDeque<Wake>>,
    ready: Notify,
}

impl Mailbox {
    fn post(&self, wake: Wake) {
        let mut queue = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        let resync = matches!(wake, Wake::Resync);
        if resync && matches!(queue.back(), Some(Wake::Resync)) {
            return;
        }
        if queue.len() >= MAILBOX_CAP {
            match queue.iter().position(|w| matches!(w, Wake::Resync)) {
                Some(at) => drop(queue.remove(at)),
                None => drop(queue.pop_front()),
            }
        }
        queue.push_back(wake);
        drop(queue);
        self.ready.notify_one();
    }

    fn take(&self) -> Option<Wake> {
        self.queue
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pop_front()
    }
}

enum Request {
    /// Reconcile, then acknowledge.
    Sync(oneshot::Sender<Result<(), String>>),
    /// The connection dropped: the server holds no subscriptions any more.
    Reset,
    /// Reconcile again after a failure.
    Retry,
    /// The server dropped this sharded subscription (see [`Delivered::Lost`]).
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
        let dispatch = waiters.clone();
        let (requests, rx) = mpsc::unbounded_channel();
        // Weak: the connections (inside the reconciling task) must not keep that task alive.
        let resets = requests.downgrade();
        let (purges, purges_rx) = mpsc::unbounded_channel();
        let invalidations = invalidation_channel(&cfg.namespace);
        let route_purges = purges.clone();
        let channel = invalidations.clone();
        // Subscribing is a lock decision: a failed SUBSCRIBE makes a waiter fill on its own.
        let timeout = cfg.longest_budget();
        let pushes = Pushes {
            dispatch,
            invalidations: channel,
            resets,
            purges: route_purges,
            sharded: false,
            metrics: metrics.clone(),
        };
        let classic = pushes.clone();
        let open: Open = Box::new(move |client: Client| {
            let config = manager_config(timeout).set_push_sender(classic.handler());
            ConnectionManager::new_lazy_with_config(client, config).map_err(|source| {
                L2Error::Redis {
                    op: "pubsub connect",
                    source,
                }
            })
        });
        let sharded = match &cfg.topology {
            RedisTopology::Cluster { nodes } => Some(sharded_connection(nodes, timeout, &pushes)?),
            _ => None,
        };
        let (nodes, conn) = match &cfg.topology {
            RedisTopology::Sentinel {
                nodes,
                master,
                auth,
            } => {
                let sentinels =
                    Sentinels::new(nodes, master, auth, timeout, ProtocolVersion::RESP3)?;
                let switched = requests.downgrade();
                let on_switch = move || {
                    if let Some(requests) = switched.upgrade() {
                        let _ = requests.send(Request::Switched);
                    }
                };
                let nodes = Nodes::Sentinel {
                    sentinels: Box::new(sentinels),
                    at: None,
                    recheck: false,
                    _switches: switches::watch(nodes, master, timeout, on_switch),
                };
                (nodes, None)
            }
            topology => {
                let urls = topology.seeds().to_vec();
                let first = urls.first().ok_or_else(|| {
                    L2Error::Pubsub("no Redis node to subscribe on (empty seed list)".to_owned())
                })?;
                let conn = open(resp3_client(first)?)?;
                (Nodes::Seeds { urls, at: 0 }, Some(conn))
            }
        };
        tokio::spawn(apply_purges(purges_rx, l1));
        tokio::spawn(reconcile(
            Reconciler {
                conn,
                sharded,
                nodes,
                answered: false,
                failures: 0,
                open,
                waiters: waiters.clone(),
                always: invalidations,
                purges,
                timeout,
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
        self.sync().await
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
        self.notices.sync().await
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

async fn apply_purges(mut purges: mpsc::UnboundedReceiver<Purge>, l1: L1) {
    while let Some(purge) = purges.recv().await {
        tracing::info!(purge = %purge.payload(), "invalidating L1");
        l1.purge(&purge).await;
    }
}

/// Opens a (lazy) pub/sub connection through a RESP3 client, pushes wired to the hub.
type Open = Box<dyn Fn(Client) -> Result<ConnectionManager, L2Error> + Send + Sync>;

/// Where the hub may subscribe.
enum Nodes {
    /// The server, or the cluster's seed nodes; `at` indexes the one the connection talks to.
    Seeds { urls: Vec<String>, at: usize },
    /// Whichever master the sentinels name; `at` is its `host:port` once one was found.
    Sentinel {
        sentinels: Box<Sentinels>,
        at: Option<String>,
        /// The connection dropped or failed: ask the sentinels before the next reconciliation.
        recheck: bool,
        /// Listens to the sentinels' `+switch-master` ([`Request::Switched`]).
        _switches: Option<SwitchWatch>,
    },
}

/// The reconciling task's state.
struct Reconciler {
    /// `None` only behind sentinels, until they first named a master. In a cluster it carries
    /// only the invalidation channel (a broadcast one).
    conn: Option<ConnectionManager>,
    /// In a cluster: the sharded subscriptions of fill channels, one connection per master
    /// (redis-rs routes each `SSUBSCRIBE` to its slot's master and re-subscribes after a
    /// reconnection or a topology change).
    sharded: Option<ClusterConnection>,
    nodes: Nodes,
    /// Whether this node has answered a (un)subscription since the hub moved to it.
    answered: bool,
    /// Failed reconciliations in a row on this node (not counting those the open circuit refused).
    failures: u32,
    open: Open,
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
                Request::Reset => {
                    subscribed.clear();
                    r.recheck();
                }
                Request::Retry => {}
                Request::Lost(channel) => {
                    subscribed.remove(&channel);
                }
                Request::ResetSharded => subscribed.retain(|c| *c == r.always),
                Request::Switched => r.switched(),
            }
        }
        if r.follow_master().await {
            subscribed.clear();
        }
        let mut wanted: HashSet<String> = lock(&r.waiters).keys().cloned().collect();
        wanted.insert(r.always.clone());
        let to_drop: Vec<String> = subscribed.difference(&wanted).cloned().collect();
        let to_add: Vec<String> = wanted.difference(&subscribed).cloned().collect();
        // In a cluster only the invalidation channel is classic; fill channels are sharded.
        let (to_drop, drop_sharded) = r.split(to_drop);
        let (to_add, add_sharded) = r.split(to_add);
        let mut result = Ok(());
        let Some(conn) = r.conn.as_mut() else {
            let why = "no master found through the sentinels yet".to_owned();
            for ack in acks {
                let _ = ack.send(Err(why.clone()));
            }
            behind = true;
            continue;
        };
        if !to_drop.is_empty() {
            let call = conn.unsubscribe(&to_drop);
            result = guarded(&r.breaker, &r.metrics, "UNSUBSCRIBE", r.timeout, call).await;
            if result.is_ok() {
                for channel in &to_drop {
                    subscribed.remove(channel);
                }
            }
        }
        if !to_add.is_empty() && result.is_ok() {
            let call = conn.subscribe(&to_add);
            result = patiently(
                &r.breaker,
                &r.metrics,
                "SUBSCRIBE",
                r.timeout,
                PATIENCE,
                call,
            )
            .await;
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
        if let Some(sharded) = &r.sharded
            && result.is_ok()
        {
            result = sharded_sync(&r, sharded, &mut subscribed, drop_sharded, add_sharded).await;
        }
        behind = result.is_err();
        match &result {
            Ok(()) => {
                r.answered = true;
                r.failures = 0;
            }
            // The circuit is open: nothing was asked of this node, so it is not to blame.
            Err(L2Error::CircuitOpen { .. }) => {}
            Err(err) => {
                tracing::warn!(%err, node = %r.node(), "redis pub/sub (un)subscribe failed; retrying");
                r.failures += 1;
                r.recheck();
                if r.move_on() {
                    subscribed.clear();
                }
            }
        }
        for ack in acks {
            let _ = ack.send(result.as_ref().map(|_| ()).map_err(ToString::to_string));
        }
    }
}

impl Reconciler {
    /// Splits channels into those of the classic connection and those subscribed sharded (in a
    /// cluster, every one but the invalidation channel).
    fn split(&self, channels: Vec<String>) -> (Vec<String>, Vec<String>) {
        if self.sharded.is_none() {
            return (channels, Vec::new());
        }
        channels.into_iter().partition(|c| *c == self.always)
    }

    /// The node the connection talks to, for messages (no password in it).
    fn node(&self) -> String {
        match &self.nodes {
            Nodes::Seeds { urls, at } => redact(&urls[*at]).into_owned(),
            Nodes::Sentinel { at: Some(at), .. } => at.clone(),
            Nodes::Sentinel { at: None, .. } => "(no master found yet)".to_owned(),
        }
    }

    /// Behind sentinels, on their `+switch-master`: ask them at once before the next
    /// reconciliation (which then moves to the new master and resyncs the waiters).
    fn switched(&mut self) {
        if let Nodes::Sentinel {
            sentinels, recheck, ..
        } = &mut self.nodes
        {
            sentinels.ask_now();
            *recheck = true;
        }
    }

    /// Behind sentinels: have them asked again before the next reconciliation.
    fn recheck(&mut self) {
        if let Nodes::Sentinel { recheck, .. } = &mut self.nodes {
            *recheck = true;
        }
    }

    /// Moves to the next seed node when this one failed often enough (never with a single seed);
    /// `true` when it did: the new connection holds no subscriptions, waiters must resync.
    fn move_on(&mut self) -> bool {
        let Nodes::Seeds { urls, at } = &self.nodes else {
            return false;
        };
        let limit = if self.answered { SWITCH_AFTER } else { 1 };
        if urls.len() < 2 || self.failures < limit {
            return false;
        }
        let next = (*at + 1) % urls.len();
        let conn = match resp3_client(&urls[next]).and_then(|client| (self.open)(client)) {
            Ok(conn) => conn,
            Err(err) => {
                tracing::warn!(%err, node = %redact(&urls[next]), "cannot open a pub/sub connection");
                return false;
            }
        };
        tracing::warn!(
            from = %redact(&urls[*at]),
            to = %redact(&urls[next]),
            "redis pub/sub node not answering; moving to the next seed node"
        );
        self.nodes = Nodes::Seeds {
            urls: urls.clone(),
            at: next,
        };
        self.switch_to(conn);
        true
    }

    /// Behind sentinels, when no master was found yet or the connection dropped or failed: asks
    /// the sentinels and moves to the master they name if it is another server. `true` when it
    /// moved: the new connection holds no subscriptions, waiters must resync.
    async fn follow_master(&mut self) -> bool {
        let Nodes::Sentinel {
            sentinels,
            at,
            recheck,
            ..
        } = &mut self.nodes
        else {
            return false;
        };
        if self.conn.is_some() && !*recheck {
            return false;
        }
        let client = match sentinels.master().await {
            Ok(Some(client)) => client,
            // Asked moments ago: keep the flag, ask on a later pass.
            Ok(None) => return false,
            Err(err) => {
                tracing::warn!(%err, "redis pub/sub: the sentinels named no usable master");
                return false;
            }
        };
        *recheck = false;
        let found = sentinel::address(&client);
        if self.conn.is_some() && at.as_deref() == Some(found.as_str()) {
            return false;
        }
        let conn = match (self.open)(client) {
            Ok(conn) => conn,
            Err(err) => {
                tracing::warn!(%err, node = %found, "cannot open a pub/sub connection");
                return false;
            }
        };
        tracing::warn!(
            from = at.as_deref().unwrap_or("(none)"),
            to = %found,
            "redis pub/sub: following the master the sentinels name"
        );
        *at = Some(found);
        self.switch_to(conn);
        true
    }

    /// Talks to a new node from now on: nothing is subscribed there yet.
    fn switch_to(&mut self, conn: ConnectionManager) {
        (self.conn, self.answered, self.failures) = (Some(conn), false, 0);
        resync(&self.waiters);
    }
}

/// Tells every waiter that notices may have been lost: confirm the subscription, re-check L2.
fn resync(waiters: &Waiters) {
    for mailbox in lock(waiters).values().flat_map(|slot| &slot.mailboxes) {
        mailbox.post(Wake::Resync);
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
