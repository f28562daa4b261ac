//! Following the topology: which Redis node(s) the hub subscribes on, how its calls there are
//! bounded, and moving on when that node stops answering (the next seed node) or the sentinels
//! name another master. A move leaves the new connection with no subscriptions: the caller
//! resyncs the waiters.
//!
//! In a cluster the fill channels are subscribed sharded (see [`super::sharded`]) and only the
//! invalidation channel is carried by the classic connection.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use redis::aio::ConnectionManager;
use redis::cluster_async::ClusterConnection;
use redis::{Client, ProtocolVersion};

use super::bounds::Bounds;
use super::pushes::Pushes;
use super::sharded::{Synced, sharded_connection, sharded_sync};
use crate::config::{RedisConfig, RedisTopology};
use crate::l2::sentinel::{self, Sentinels};
use crate::l2::switches::{self, SwitchWatch};
use crate::l2::{L2Error, manager_config};
use crate::redact::redact;

/// Failed reconciliations in a row after which the hub moves to the next seed node (when there is
/// more than one): a node that answered before gets a second chance to reconnect.
const SWITCH_AFTER: u32 = 2;

/// The sentinels' `+switch-master` events as the hub's calls see them: how many were heard, and
/// a wake-up for a SUBSCRIBE that waits on the old master meanwhile.
#[derive(Default)]
struct SwitchSignal {
    heard: AtomicU64,
    wake: tokio::sync::Notify,
}

impl SwitchSignal {
    /// One `+switch-master` heard: counted, and a SUBSCRIBE waiting meanwhile woken.
    fn hear(&self) {
        self.heard.fetch_add(1, Ordering::SeqCst);
        self.wake.notify_waiters();
    }

    fn heard(&self) -> u64 {
        self.heard.load(Ordering::SeqCst)
    }

    /// `call`'s answer, unless the sentinels announced a new master first: one heard since the
    /// topology took in `taken` of them, before the call or while it runs.
    async fn unless_switched(
        &self,
        taken: u64,
        call: impl Future<Output = Result<(), L2Error>>,
    ) -> Subscribed {
        let switched = self.wake.notified();
        let mut switched = std::pin::pin!(switched);
        // Registered before the count is read: an event between the two still wakes it.
        switched.as_mut().enable();
        if self.heard() != taken {
            return Subscribed::MasterSwitched;
        }
        tokio::select! {
            done = call => Subscribed::Done(done),
            () = switched => Subscribed::MasterSwitched,
        }
    }
}

/// What a SUBSCRIBE came to.
#[derive(Debug)]
pub(super) enum Subscribed {
    Done(Result<(), L2Error>),
    /// The sentinels announced a new master before the one asked answered: the pass is to start
    /// again there (the old master may never answer; waiting for it is waiting for nothing).
    MasterSwitched,
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
        /// Listens to the sentinels' `+switch-master` (`on_switch` of [`Topology::new`]).
        _switches: Option<SwitchWatch>,
    },
}

/// The hub's connections and the node they talk to.
pub(super) struct Topology {
    /// `[redis] tls`: the material of `rediss://` seed nodes.
    tls: Option<crate::config::RedisTls>,
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
    bounds: Bounds,
    /// Behind sentinels: their switch events, and how many of them [`Topology::switched`] has
    /// taken in (a SUBSCRIBE started with one not taken in is cut short).
    switches: Arc<SwitchSignal>,
    switches_taken: u64,
}

impl Topology {
    /// Prepares the connections of `cfg`'s topology (lazily: Redis may be down now), their
    /// pushes handed to `pushes`. Behind sentinels, `on_switch` runs on each `+switch-master`
    /// of the master; the hub then calls [`Topology::switched`].
    pub(super) fn new(
        cfg: &RedisConfig,
        bounds: Bounds,
        pushes: &Pushes,
        on_switch: impl Fn() + Send + 'static,
    ) -> Result<Topology, L2Error> {
        let timeout = bounds.timeout;
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
            RedisTopology::Cluster { nodes } => Some(sharded_connection(
                nodes,
                cfg.tls.as_ref(),
                timeout,
                pushes,
            )?),
            _ => None,
        };
        let signal = Arc::new(SwitchSignal::default());
        let heard = signal.clone();
        let on_switch = move || {
            heard.hear();
            on_switch();
        };
        let (nodes, conn) = match &cfg.topology {
            RedisTopology::Sentinel {
                nodes,
                master,
                auth,
            } => {
                let tls = cfg.tls.as_ref();
                let sentinels =
                    Sentinels::new(nodes, master, auth, tls, timeout, ProtocolVersion::RESP3)?;
                let nodes = Nodes::Sentinel {
                    sentinels: Box::new(sentinels),
                    at: None,
                    recheck: false,
                    _switches: switches::watch(nodes, master, tls, timeout, on_switch),
                };
                (nodes, None)
            }
            topology => {
                let urls = topology.seeds().to_vec();
                let first = urls.first().ok_or_else(|| {
                    L2Error::Pubsub("no Redis node to subscribe on (empty seed list)".to_owned())
                })?;
                let conn = open(resp3_client(first, cfg.tls.as_ref())?)?;
                (Nodes::Seeds { urls, at: 0 }, Some(conn))
            }
        };
        Ok(Topology {
            tls: cfg.tls.clone(),
            conn,
            sharded,
            nodes,
            answered: false,
            failures: 0,
            open,
            bounds,
            switches: signal,
            switches_taken: 0,
        })
    }

    /// Whether fill channels are subscribed sharded: in a cluster.
    pub(super) fn sharded(&self) -> bool {
        self.sharded.is_some()
    }

    /// Whether there is a node to talk to: behind sentinels, not until they first named one.
    pub(super) fn connected(&self) -> bool {
        self.conn.is_some()
    }

    /// UNSUBSCRIBEs `channels` on the classic connection.
    pub(super) async fn unsubscribe(&mut self, channels: &[String]) -> Result<(), L2Error> {
        let conn = self.conn.as_mut().ok_or_else(no_master_yet)?;
        self.bounds
            .guarded("UNSUBSCRIBE", conn.unsubscribe(channels))
            .await
    }

    /// SUBSCRIBEs `channels` on the classic connection; behind sentinels, cut short by their
    /// announcing a new master (the call waits patiently while Redis answers, and the new master
    /// answering the process's other connections would keep it waiting on the old one).
    pub(super) async fn subscribe(&mut self, channels: &[String]) -> Subscribed {
        let (signal, taken) = (self.switches.clone(), self.switches_taken);
        match self.conn.as_mut() {
            Some(conn) => {
                let call = self.bounds.patiently("SUBSCRIBE", conn.subscribe(channels));
                signal.unless_switched(taken, call).await
            }
            None => {
                let call = std::future::ready(Err(no_master_yet()));
                signal.unless_switched(taken, call).await
            }
        }
    }

    /// In a cluster, makes the sharded subscriptions match (see [`sharded_sync`]); elsewhere
    /// there are none.
    pub(super) async fn sync_sharded(&self, to_drop: Vec<String>, to_add: Vec<String>) -> Synced {
        match &self.sharded {
            Some(sharded) => sharded_sync(&self.bounds, sharded, to_drop, to_add).await,
            None => Synced::nothing(),
        }
    }

    /// The node the connection talks to, for messages (no password in it).
    pub(super) fn node(&self) -> String {
        match &self.nodes {
            Nodes::Seeds { urls, at } => redact(&urls[*at]).into_owned(),
            Nodes::Sentinel { at: Some(at), .. } => at.clone(),
            Nodes::Sentinel { at: None, .. } => "(no master found yet)".to_owned(),
        }
    }

    /// A reconciliation succeeded: this node answers.
    pub(super) fn answered(&mut self) {
        (self.answered, self.failures) = (true, 0);
    }

    /// A reconciliation failed on this node (not refused by the open circuit): have the
    /// sentinels asked again, and move to the next seed node when this one failed often enough.
    /// `true` when it moved: the new connection holds no subscriptions, waiters must resync.
    pub(super) fn failed(&mut self) -> bool {
        self.failures += 1;
        self.recheck();
        self.move_on()
    }

    /// Behind sentinels, on their `+switch-master`: ask them at once before the next
    /// reconciliation (which then moves to the new master and resyncs the waiters).
    pub(super) fn switched(&mut self) {
        self.switches_taken = self.switches.heard();
        if let Nodes::Sentinel {
            sentinels, recheck, ..
        } = &mut self.nodes
        {
            sentinels.ask_now();
            *recheck = true;
        }
    }

    /// Behind sentinels: have them asked again before the next reconciliation.
    pub(super) fn recheck(&mut self) {
        if let Nodes::Sentinel { recheck, .. } = &mut self.nodes {
            *recheck = true;
        }
    }

    /// Moves to the next seed node when this one failed often enough (never with a single seed);
    /// `true` when it did.
    fn move_on(&mut self) -> bool {
        let Nodes::Seeds { urls, at } = &self.nodes else {
            return false;
        };
        let limit = if self.answered { SWITCH_AFTER } else { 1 };
        if urls.len() < 2 || self.failures < limit {
            return false;
        }
        let next = (*at + 1) % urls.len();
        let conn = match resp3_client(&urls[next], self.tls.as_ref())
            .and_then(|client| (self.open)(client))
        {
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
    pub(super) async fn follow_master(&mut self) -> bool {
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
    }
}

/// Why nothing can be (un)subscribed behind sentinels that have named no master yet.
pub(super) const NO_MASTER_YET: &str = "no master found through the sentinels yet";

fn no_master_yet() -> L2Error {
    L2Error::Pubsub(NO_MASTER_YET.to_owned())
}

fn resp3_client(url: &str, tls: Option<&crate::config::RedisTls>) -> Result<Client, L2Error> {
    use redis::IntoConnectionInfo;
    let info = url
        .into_connection_info()
        .map_err(|source| L2Error::Redis { op: "open", source })?;
    let settings = info
        .redis_settings()
        .clone()
        .set_protocol(ProtocolVersion::RESP3);
    crate::l2::tls::client_for(info.set_redis_settings(settings), tls)
        .map_err(|source| L2Error::Redis { op: "open", source })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn late() -> L2Error {
        L2Error::Pubsub("no answer yet".to_owned())
    }

    /// The old master never answers; the clock is paused, so the bound is not a wall-clock one
    /// (it turns a regression into a failure, not a hang).
    #[tokio::test(start_paused = true)]
    async fn a_switch_heard_while_the_subscribe_waits_cuts_it_short() {
        let signal = SwitchSignal::default();
        let never = std::future::pending();
        let waited = tokio::time::timeout(
            std::time::Duration::from_secs(3600),
            signal.unless_switched(0, never),
        );
        let (subscribed, ()) = tokio::join!(waited, async {
            tokio::task::yield_now().await;
            signal.hear();
        });
        let subscribed = subscribed.expect("cut short, not left waiting on the old master");
        assert!(
            matches!(subscribed, Subscribed::MasterSwitched),
            "{subscribed:?}"
        );
    }

    #[tokio::test]
    async fn a_switch_not_yet_taken_in_skips_the_subscribe() {
        let signal = SwitchSignal::default();
        signal.hear();
        let asked = std::cell::Cell::new(false);
        let call = async {
            asked.set(true);
            Ok(())
        };
        let subscribed = signal.unless_switched(0, call).await;
        assert!(
            matches!(subscribed, Subscribed::MasterSwitched),
            "{subscribed:?}"
        );
        assert!(!asked.get(), "the old master is not asked");
    }

    #[tokio::test]
    async fn once_taken_in_a_switch_cuts_nothing_short() {
        let signal = SwitchSignal::default();
        signal.hear();
        let subscribed = signal.unless_switched(1, std::future::ready(Ok(()))).await;
        assert!(
            matches!(subscribed, Subscribed::Done(Ok(()))),
            "{subscribed:?}"
        );
        let failed = signal
            .unless_switched(1, std::future::ready(Err(late())))
            .await;
        assert!(matches!(failed, Subscribed::Done(Err(_))), "{failed:?}");
    }
}
