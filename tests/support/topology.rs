//! One test body for every Redis topology Corral runs on: [`Topology`] names one, and
//! [`Topology::start`] brings up its Redis ([`Deployment`]), which gives the `[redis]` table and
//! what a test asks of the keys wherever they live.

use corral::Config;

use super::corral::{cluster_table, full_text, parse, redis_table, sentinel_table};
use super::sentinel::MASTER_NAME;
use super::{RedisCluster, RedisSentinel, RedisServer};

/// A Redis topology.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Topology {
    /// One `redis-server`.
    Single,
    /// A three-master Redis Cluster.
    Cluster,
    /// A master, its replica and three sentinels.
    Sentinel,
}

/// The running Redis of a [`Topology`]; its processes are killed on Drop.
pub enum Deployment {
    Single(RedisServer),
    Cluster(RedisCluster),
    Sentinel(RedisSentinel),
}

impl Topology {
    /// Starts this topology's Redis.
    pub async fn start(self) -> Deployment {
        match self {
            Topology::Single => Deployment::Single(RedisServer::start().await),
            Topology::Cluster => Deployment::Cluster(RedisCluster::start().await),
            Topology::Sentinel => Deployment::Sentinel(RedisSentinel::start().await),
        }
    }
}

impl Deployment {
    /// The `[redis]` table that points Corral at this deployment (namespace `test`).
    pub fn table(&self) -> String {
        match self {
            Deployment::Single(server) => redis_table(&server.url()),
            Deployment::Cluster(cluster) => cluster_table(&cluster.urls()),
            Deployment::Sentinel(sentinel) => {
                sentinel_table(&sentinel.sentinel_urls(), MASTER_NAME)
            }
        }
    }

    /// A full config on this deployment: `[server]` with `server_extra`, then the routes.
    pub fn config(&self, server_extra: &str, routes: &str) -> Config {
        parse(&full_text(server_extra, &self.table(), routes))
    }

    /// Keys matching `pattern` wherever they live (every master of a cluster; the first master
    /// behind sentinels), sorted.
    pub async fn keys(&self, pattern: &str) -> Vec<String> {
        match self {
            Deployment::Single(server) => server.keys(pattern).await,
            Deployment::Cluster(cluster) => cluster.keys(pattern).await,
            Deployment::Sentinel(sentinel) => {
                sentinel.keys(sentinel.first_master_port(), pattern).await
            }
        }
    }

    /// Returns once `hubs` pub/sub hubs are subscribed where the fill notices are published:
    /// behind sentinels, on the master they name (there the hubs find it first); elsewhere at
    /// once, as the tests on one server and on a cluster always did.
    pub async fn hubs_subscribed(&self, hubs: usize) {
        if let Deployment::Sentinel(sentinel) = self {
            sentinel
                .hubs_subscribed(sentinel.first_master_port(), hubs)
                .await;
        }
    }
}
