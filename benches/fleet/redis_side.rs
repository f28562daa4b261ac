//! What the bench reads from Redis: `INFO commandstats`, `INFO` (CPU, bytes, clients), the keys
//! left and, in a cluster, `CLUSTER INFO`, summed over the nodes, on connections opened before the statistics are reset
//! (so opening them is not counted). Behind sentinels the nodes are the master alone (Corral
//! sends nothing to the replica), and the sentinels are asked only how many clients they hold.

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use corral::Config;
use redis::aio::MultiplexedConnection;
use tokio::time::Instant;

use super::BoxError;
use super::support::corral::recommend_route;
use super::support::sentinel::MASTER_NAME;
use super::support::{RedisCluster, RedisSentinel, RedisServer};

/// Commands Corral runs only inside its Lua scripts: `INFO commandstats` counts them as well as
/// the `EVALSHA` that ran them, so they are no round trip of their own.
const IN_SCRIPTS: [&str; 7] = [
    "get", "set", "del", "exists", "publish", "spublish", "pexpire",
];
/// The bench's own commands.
const PROBES: [&str; 10] = [
    "info",
    "config|resetstat",
    "cluster|info",
    "pubsub|channels",
    "pubsub|shardchannels",
    "pubsub|numsub",
    "pubsub|shardnumsub",
    "scan",
    "memory|usage",
    "client|list",
];
/// Commands the sentinels (`PING` every second) and the replica (`REPLCONF ACK` every second)
/// send the master on their own; during a burst Corral sends neither (its `PING` is a warm-up
/// before the statistics are reset, or a probe while its circuit is open).
const BACKGROUND: [&str; 2] = ["ping", "replconf"];
/// How long the bench waits for the instances to drop their subscriptions after a burst.
const QUIET_BOUND: Duration = Duration::from_secs(10);

/// Which Redis a run starts (`FLEET_TOPOLOGIES`).
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    One,
    Cluster,
    Sentinel,
}

impl Kind {
    /// Every kind, in the order of their curves' colours.
    pub const ALL: [Kind; 3] = [Kind::One, Kind::Cluster, Kind::Sentinel];

    /// From a `FLEET_TOPOLOGIES` item.
    pub fn parse(text: &str) -> Option<Kind> {
        match text {
            "one" => Some(Kind::One),
            "cluster" => Some(Kind::Cluster),
            "sentinel" => Some(Kind::Sentinel),
            _ => None,
        }
    }

    /// Its name in the tables and the figure.
    pub fn name(self) -> &'static str {
        match self {
            Kind::One => "one Redis",
            Kind::Cluster => "Cluster (3 masters)",
            Kind::Sentinel => "Sentinel (master, replica, 3 sentinels)",
        }
    }

    /// Its place in [`Kind::ALL`], which picks its colours.
    pub fn index(self) -> usize {
        match self {
            Kind::One => 0,
            Kind::Cluster => 1,
            Kind::Sentinel => 2,
        }
    }
}

/// The Redis a fleet shares: one server, a cluster of three masters, or a master and its
/// replica behind three sentinels.
pub enum Topology {
    One(RedisServer),
    Cluster(RedisCluster),
    Sentinel(RedisSentinel),
}

/// Counters summed over the nodes.
#[derive(Default, Clone)]
pub struct Counters {
    /// Calls per command (`INFO commandstats`), the bench's own left out.
    pub calls: HashMap<String, u64>,
    /// `used_cpu_sys + used_cpu_user`, seconds.
    pub cpu: f64,
    /// `cluster_stats_messages_publish_sent`: classic PUBLISH messages copied over the bus.
    pub bus_publish: f64,
    /// `cluster_stats_messages_publishshard_sent`: sharded ones (to a shard's replicas).
    pub bus_publishshard: f64,
    /// `total_net_input_bytes` / `total_net_output_bytes` (reset by `CONFIG RESETSTAT`).
    pub net_in: f64,
    pub net_out: f64,
    /// `connected_clients`, the probe's own connection left out.
    pub clients: f64,
    /// Calls of the [`BACKGROUND`] commands behind sentinels, left out of `calls`.
    pub background: u64,
}

impl Counters {
    /// Commands sent to Redis: every command but those run inside scripts.
    pub fn sent(&self) -> u64 {
        self.calls
            .iter()
            .filter(|(name, _)| !IN_SCRIPTS.contains(&name.as_str()))
            .map(|(_, n)| n)
            .sum()
    }

    /// Every command `INFO commandstats` counts, those inside scripts too.
    pub fn all(&self) -> u64 {
        self.calls.values().sum()
    }

    /// Script calls: each instance's first look at a key, and the store.
    pub fn scripts(&self) -> u64 {
        self.call("evalsha") + self.call("eval")
    }

    pub fn call(&self, name: &str) -> u64 {
        self.calls.get(name).copied().unwrap_or(0)
    }
}

/// Open connections to every node of a topology, for reading its counters.
pub struct Probe {
    nodes: Vec<MultiplexedConnection>,
    /// Behind sentinels: a connection to each sentinel.
    sentinels: Vec<MultiplexedConnection>,
    cluster: bool,
}

impl Topology {
    pub async fn start(kind: Kind) -> Topology {
        match kind {
            Kind::One => Topology::One(RedisServer::start().await),
            Kind::Cluster => Topology::Cluster(RedisCluster::start().await),
            Kind::Sentinel => Topology::Sentinel(RedisSentinel::start().await),
        }
    }

    pub fn kind(&self) -> Kind {
        match self {
            Topology::One(_) => Kind::One,
            Topology::Cluster(_) => Kind::Cluster,
            Topology::Sentinel(_) => Kind::Sentinel,
        }
    }

    pub fn name(&self) -> &'static str {
        self.kind().name()
    }

    /// A config for the fleet: Corral's defaults, `/recommend` to `upstream`, listener on port
    /// 0; `redis_timeout` overrides `[redis] timeout` when set.
    pub fn config(&self, upstream: &str, redis_timeout: Option<&str>) -> Result<Config, BoxError> {
        let target = match self {
            Topology::One(redis) => format!("url = \"{}\"", redis.url()),
            Topology::Cluster(cluster) => {
                let nodes: Vec<String> =
                    cluster.urls().iter().map(|u| format!("\"{u}\"")).collect();
                format!("cluster = [{}]", nodes.join(", "))
            }
            Topology::Sentinel(deployment) => {
                let nodes: Vec<String> = deployment
                    .sentinel_urls()
                    .iter()
                    .map(|u| format!("\"{u}\""))
                    .collect();
                format!(
                    "sentinel = {{ nodes = [{}], master = \"{MASTER_NAME}\" }}",
                    nodes.join(", ")
                )
            }
        };
        let timeout = redis_timeout
            .map(|t| format!("timeout = \"{t}\"\n"))
            .unwrap_or_default();
        let text = format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nshutdown_timeout = \"2s\"\naccess_log = false\n\n\
             [redis]\n{target}\nnamespace = \"fleet\"\n{timeout}\n{}",
            recommend_route(upstream, "")
        );
        Ok(Config::parse(&text, Path::new("<fleet bench>"))?)
    }

    pub async fn probe(&self) -> Probe {
        match self {
            Topology::One(redis) => Probe {
                nodes: vec![redis.conn().await],
                sentinels: Vec::new(),
                cluster: false,
            },
            Topology::Sentinel(deployment) => Probe {
                nodes: vec![deployment.master_conn().await],
                sentinels: deployment.sentinel_conns().await,
                cluster: false,
            },
            Topology::Cluster(cluster) => {
                let mut nodes = Vec::new();
                for index in 0..cluster.urls().len() {
                    nodes.push(cluster.node_conn(index).await);
                }
                Probe {
                    nodes,
                    sentinels: Vec::new(),
                    cluster: true,
                }
            }
        }
    }
}

impl Probe {
    /// Zeroes `INFO commandstats` on every node (`CONFIG RESETSTAT`).
    pub async fn reset(&mut self) -> Result<(), BoxError> {
        for node in &mut self.nodes {
            redis::cmd("CONFIG")
                .arg("RESETSTAT")
                .query_async::<()>(node)
                .await?;
        }
        Ok(())
    }

    /// The counters now, summed over the nodes.
    pub async fn counters(&mut self) -> Result<Counters, BoxError> {
        let mut sum = Counters::default();
        for node in &mut self.nodes {
            let stats: String = redis::cmd("INFO")
                .arg("commandstats")
                .query_async(node)
                .await?;
            for (name, calls) in command_calls(&stats) {
                if PROBES.contains(&name.as_str()) {
                    continue;
                }
                if !self.sentinels.is_empty() && BACKGROUND.contains(&name.as_str()) {
                    sum.background += calls;
                } else {
                    *sum.calls.entry(name).or_default() += calls;
                }
            }
            let info: String = redis::cmd("INFO").query_async(node).await?;
            sum.cpu += field(&info, "used_cpu_sys") + field(&info, "used_cpu_user");
            sum.net_in += field(&info, "total_net_input_bytes");
            sum.net_out += field(&info, "total_net_output_bytes");
            sum.clients += field(&info, "connected_clients") - 1.0;
            if self.cluster {
                let info: String = redis::cmd("CLUSTER").arg("INFO").query_async(node).await?;
                sum.bus_publish += field(&info, "cluster_stats_messages_publish_sent");
                sum.bus_publishshard += field(&info, "cluster_stats_messages_publishshard_sent");
            }
        }
        Ok(sum)
    }

    /// Clients each sentinel holds (`connected_clients`), the probe's own connection left out;
    /// empty but behind sentinels.
    pub async fn sentinel_clients(&mut self) -> Result<Vec<f64>, BoxError> {
        let mut clients = Vec::with_capacity(self.sentinels.len());
        for sentinel in &mut self.sentinels {
            let info: String = redis::cmd("INFO")
                .arg("clients")
                .query_async(sentinel)
                .await?;
            clients.push(field(&info, "connected_clients") - 1.0);
        }
        Ok(clients)
    }

    /// Pub/sub clients over the sentinels (`CLIENT LIST TYPE pubsub`): who listens to their
    /// events, such as `+switch-master`.
    pub async fn sentinel_listeners(&mut self) -> Result<usize, BoxError> {
        let mut listeners = 0;
        for sentinel in &mut self.sentinels {
            let list: String = redis::cmd("CLIENT")
                .arg("LIST")
                .arg("TYPE")
                .arg("pubsub")
                .query_async(sentinel)
                .await?;
            listeners += list.lines().filter(|l| !l.trim().is_empty()).count();
        }
        Ok(listeners)
    }

    /// Subscriptions to fill channels the nodes hold now, summed over the channels (`PUBSUB
    /// NUMSUB`, or `SHARDNUMSUB` in a cluster): one per instance waiting on a key.
    pub async fn subscribers(&mut self) -> Result<usize, BoxError> {
        let (list, count) = if self.cluster {
            ("SHARDCHANNELS", "SHARDNUMSUB")
        } else {
            ("CHANNELS", "NUMSUB")
        };
        let mut total = 0;
        for node in &mut self.nodes {
            let channels: Vec<String> = redis::cmd("PUBSUB")
                .arg(list)
                .arg("*:fill:*")
                .query_async(node)
                .await?;
            if channels.is_empty() {
                continue;
            }
            let counts: Vec<(String, usize)> = redis::cmd("PUBSUB")
                .arg(count)
                .arg(&channels)
                .query_async(node)
                .await?;
            total += counts.iter().map(|(_, n)| n).sum::<usize>();
        }
        Ok(total)
    }

    /// Corral's keys on every node and the memory they take (`MEMORY USAGE`, which counts a
    /// key's name, value and bookkeeping): after a burst, the entries — lock keys are gone.
    pub async fn stored(&mut self) -> Result<(usize, f64), BoxError> {
        let (mut keys, mut bytes) = (0, 0.0);
        for node in &mut self.nodes {
            let mut cursor = 0_u64;
            loop {
                let (next, found): (u64, Vec<String>) = redis::cmd("SCAN")
                    .arg(cursor)
                    .arg("MATCH")
                    .arg("corral:*")
                    .arg("COUNT")
                    .arg(1000)
                    .query_async(node)
                    .await?;
                for key in found {
                    let usage: Option<u64> = redis::cmd("MEMORY")
                        .arg("USAGE")
                        .arg(&key)
                        .query_async(node)
                        .await?;
                    keys += 1;
                    bytes += usage.unwrap_or(0) as f64;
                }
                if next == 0 {
                    break;
                }
                cursor = next;
            }
        }
        Ok((keys, bytes))
    }

    /// Waits (bounded) until no node has a fill channel subscribed any more: the instances have
    /// sent their last UNSUBSCRIBE, which belongs to the burst's cost. `false` if the bound ran
    /// out first.
    pub async fn quiet(&mut self) -> Result<bool, BoxError> {
        let deadline = Instant::now() + QUIET_BOUND;
        let (command, sub) = if self.cluster {
            ("PUBSUB", "SHARDCHANNELS")
        } else {
            ("PUBSUB", "CHANNELS")
        };
        loop {
            let mut left = 0;
            for node in &mut self.nodes {
                let channels: Vec<String> = redis::cmd(command)
                    .arg(sub)
                    .arg("*:fill:*")
                    .query_async(node)
                    .await?;
                left += channels.len();
            }
            if left == 0 {
                return Ok(true);
            }
            if Instant::now() >= deadline {
                return Ok(false);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// `cmdstat_<name>:calls=N,...` lines of `INFO commandstats`.
fn command_calls(info: &str) -> impl Iterator<Item = (String, u64)> + '_ {
    info.lines().filter_map(|line| {
        let (name, fields) = line.trim().strip_prefix("cmdstat_")?.split_once(':')?;
        let calls = fields.split(',').find_map(|f| f.strip_prefix("calls="))?;
        Some((name.to_owned(), calls.parse().ok()?))
    })
}

/// A numeric `name:value` field of an INFO text; 0 when absent.
fn field(info: &str, name: &str) -> f64 {
    info.lines()
        .filter_map(|l| l.trim().split_once(':'))
        .find(|(k, _)| *k == name)
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0.0)
}
