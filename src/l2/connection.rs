//! The command connection of L2: one Redis server, a master found through Redis Sentinel, or a
//! Redis Cluster.
//!
//! All three shapes implement `redis::aio::ConnectionLike`, so scripts, single commands and pipelines
//! are written once in [`super`]. What differs is routing, and redis-rs does it for a cluster:
//! each command goes to the master of its key's slot (following `MOVED`/`ASK`), a multi-key `DEL`
//! or `MGET` is split by slot and its answers combined, and a pipeline goes to the slot of its
//! keys — which must all share one slot. Only `SCAN` has no single home in a cluster: each master
//! holds its own keys and cursors, so [`Connection::scan_targets`] lists the masters and
//! [`Connection::scan`] walks one of them. Behind sentinels there is one server at a time, the
//! master they name; `l2/sentinel.rs` follows it through a failover.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager};
use redis::cluster::{ClusterClient, ClusterConfig};
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
use redis::{Cmd, Pipeline, RedisFuture, RedisResult, Value};

use super::sentinel::SentinelConnection;
use super::{L2Error, manager_config};
use crate::config::{RedisConfig, RedisTopology};

/// Retries of one cluster request (reconnects, `MOVED`/`ASK`, `TRYAGAIN`) — the `[redis]
/// timeout` bounds the whole call anyway, so a few are enough.
const CLUSTER_RETRIES: u32 = 2;
/// Longest pause between two cluster retries, in milliseconds.
const CLUSTER_MAX_RETRY_WAIT_MS: u64 = 1000;

/// The command connection. Cloning is cheap and shares it; every kind reconnects by itself.
#[derive(Clone)]
pub(crate) enum Connection {
    Standalone(ConnectionManager),
    /// The master the sentinels name, followed through failovers.
    Sentinel(Arc<SentinelConnection>),
    Cluster(ClusterConnection),
}

/// Where one `SCAN` walk runs: the one server (or the sentinels' master), or one master of a
/// cluster.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum ScanTarget {
    Server,
    Master { host: String, port: u16 },
}

impl Connection {
    /// Prepares the connection without waiting for Redis: Corral starts (degraded) while Redis is
    /// down and connects when it comes up. A cluster is discovered from its seed nodes, and a
    /// sentinels' master asked of them, on first use.
    pub(crate) fn open(cfg: &RedisConfig) -> Result<Connection, L2Error> {
        let budget = cfg.longest_budget();
        let connect_timeout = budget.max(Duration::from_millis(200));
        match &cfg.topology {
            RedisTopology::Standalone { url } => {
                let client = super::tls::client(url, cfg.tls.as_ref())
                    .map_err(|source| L2Error::Redis { op: "open", source })?;
                let conn = ConnectionManager::new_lazy_with_config(client, manager_config(budget))
                    .map_err(|source| L2Error::Redis {
                        op: "connect",
                        source,
                    })?;
                Ok(Connection::Standalone(conn))
            }
            RedisTopology::Sentinel {
                nodes,
                master,
                auth,
            } => Ok(Connection::Sentinel(SentinelConnection::open(
                nodes,
                master,
                auth,
                cfg.tls.as_ref(),
                budget,
            )?)),
            RedisTopology::Cluster { nodes } => {
                let mut builder = ClusterClient::builder(nodes.iter().map(String::as_str));
                if let Some(tls) = &cfg.tls {
                    builder = builder.certs(super::tls::certificates(tls));
                }
                let client = builder
                    .connection_timeout(connect_timeout)
                    .response_timeout(super::PATIENCE.max(budget))
                    .retries(CLUSTER_RETRIES)
                    .max_retry_wait(CLUSTER_MAX_RETRY_WAIT_MS)
                    .build()
                    .map_err(|source| L2Error::Redis {
                        op: "open cluster",
                        source,
                    })?;
                let conn =
                    client.get_pending_async_connection_with_config(ClusterConfig::default());
                Ok(Connection::Cluster(conn))
            }
        }
    }

    /// Whether keys of different hash slots live apart (a cluster): then one script or pipeline
    /// cannot name an entry and its tag indexes together.
    pub(crate) fn spans_slots(&self) -> bool {
        matches!(self, Connection::Cluster(_))
    }

    /// Where a `SCAN` over every key must run: the server, or each master of the cluster (from
    /// `CLUSTER SLOTS`, the same map redis-rs routes by, so the addresses match its connections).
    pub(crate) async fn scan_targets(&mut self) -> RedisResult<Vec<ScanTarget>> {
        match self {
            Connection::Standalone(_) | Connection::Sentinel(_) => Ok(vec![ScanTarget::Server]),
            Connection::Cluster(conn) => {
                let slots = conn
                    .route_command(
                        redis::cmd("CLUSTER").arg("SLOTS").to_owned(),
                        RoutingInfo::SingleNode(SingleNodeRoutingInfo::Random),
                    )
                    .await?;
                let masters = masters_of(&slots);
                if masters.is_empty() {
                    return Err(redis::RedisError::from(std::io::Error::other(
                        "CLUSTER SLOTS listed no master",
                    )));
                }
                Ok(masters)
            }
        }
    }

    /// One `SCAN cursor MATCH pattern COUNT count` step on `target`: the next cursor and the keys.
    pub(crate) async fn scan(
        &mut self,
        target: &ScanTarget,
        cursor: u64,
        pattern: &str,
        count: usize,
    ) -> RedisResult<(u64, Vec<String>)> {
        let mut cmd = redis::cmd("SCAN");
        cmd.arg(cursor)
            .arg("MATCH")
            .arg(pattern)
            .arg("COUNT")
            .arg(count);
        match (self, target) {
            (Connection::Cluster(conn), ScanTarget::Master { host, port }) => {
                let routing = RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress {
                    host: host.clone(),
                    port: *port,
                });
                let reply = conn.route_command(cmd, routing).await?;
                Ok(redis::from_redis_value(reply)?)
            }
            (conn, _) => cmd.query_async(conn).await,
        }
    }
}

/// The distinct masters in a `CLUSTER SLOTS` reply: each range is `[start, end, [host, port,
/// id, …], replicas…]`.
fn masters_of(slots: &Value) -> Vec<ScanTarget> {
    let Value::Array(ranges) = slots else {
        return Vec::new();
    };
    let masters: BTreeSet<ScanTarget> = ranges
        .iter()
        .filter_map(|range| {
            let Value::Array(parts) = range else {
                return None;
            };
            let Value::Array(master) = parts.get(2)? else {
                return None;
            };
            let host = match master.first()? {
                Value::BulkString(b) => String::from_utf8(b.clone()).ok()?,
                Value::SimpleString(s) => s.clone(),
                _ => return None,
            };
            let port = match master.get(1)? {
                Value::Int(p) => u16::try_from(*p).ok()?,
                _ => return None,
            };
            Some(ScanTarget::Master { host, port })
        })
        .collect();
    masters.into_iter().collect()
}

/// The first pause before a command whose connection was lost is sent again (the manager is
/// reconnecting meanwhile); it doubles up to [`MAX_RESEND_PAUSE`]: three more tries in 350 ms.
const RESEND_PAUSE: Duration = Duration::from_millis(50);
const MAX_RESEND_PAUSE: Duration = Duration::from_millis(200);

/// Whether a command that failed on the connection (not in Redis) is sent again, and after
/// what pause. One per command.
#[derive(Debug)]
struct Resend {
    pause: Duration,
    refused: bool,
}

impl Resend {
    fn new() -> Resend {
        Resend {
            pause: RESEND_PAUSE,
            refused: false,
        }
    }

    /// The pause before sending again after `err`, or `None`: `err` is the answer.
    /// - Reset, closed or broken: the manager is reconnecting; send again after a pause that
    ///   doubles (every script Corral runs gives the same answer when run twice).
    /// - Refused: the manager hands out the refusal of its last attempt until a command asks for
    ///   a new one, so a first refusal may be stale (Redis is back): send once more at once. A
    ///   second refusal is Redis down, and is the answer: a refusal costs microseconds, and
    ///   waiting on it would cost every miss its whole budget for as long as the outage lasts.
    fn after(&mut self, err: &redis::RedisError) -> Option<Duration> {
        if err.is_connection_refusal() {
            return (!std::mem::replace(&mut self.refused, true)).then_some(Duration::ZERO);
        }
        if !err.is_connection_dropped() || self.pause > MAX_RESEND_PAUSE {
            return None;
        }
        let pause = self.pause;
        self.pause *= 2;
        Some(pause)
    }
}

impl ConnectionLike for Connection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            // A connection that died while idle (Redis restarted) fails the first command sent
            // on it, and with it every command pipelined behind: send it again on the new one.
            Connection::Standalone(conn) => Box::pin(async move {
                let mut resend = Resend::new();
                loop {
                    match conn.req_packed_command(cmd).await {
                        Err(err) => match resend.after(&err) {
                            Some(pause) => tokio::time::sleep(pause).await,
                            None => return Err(err),
                        },
                        answered => return answered,
                    }
                }
            }),
            Connection::Sentinel(conn) => Box::pin(conn.command(cmd)),
            Connection::Cluster(conn) => conn.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Connection::Standalone(conn) => Box::pin(async move {
                let mut resend = Resend::new();
                loop {
                    match conn.req_packed_commands(pipeline, offset, count).await {
                        Err(err) => match resend.after(&err) {
                            Some(pause) => tokio::time::sleep(pause).await,
                            None => return Err(err),
                        },
                        answered => return answered,
                    }
                }
            }),
            Connection::Sentinel(conn) => Box::pin(conn.pipeline(pipeline, offset, count)),
            Connection::Cluster(conn) => conn.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Connection::Standalone(conn) => conn.get_db(),
            // The database of `sentinel.db`, selected on every connection to the master.
            Connection::Sentinel(conn) => conn.db(),
            Connection::Cluster(conn) => conn.get_db(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    fn io(kind: std::io::ErrorKind) -> redis::RedisError {
        redis::RedisError::from(std::io::Error::from(kind))
    }

    #[test]
    fn a_refusal_is_sent_again_once_at_once_then_is_the_answer() {
        let mut resend = Resend::new();
        let refused = io(std::io::ErrorKind::ConnectionRefused);
        assert_eq!(resend.after(&refused), Some(Duration::ZERO));
        assert_eq!(resend.after(&refused), None);
    }

    #[test]
    fn a_dropped_connection_is_sent_again_after_pauses_that_double() {
        let mut resend = Resend::new();
        let reset = io(std::io::ErrorKind::ConnectionReset);
        let pauses: Vec<_> = std::iter::from_fn(|| resend.after(&reset)).collect();
        let ms = Duration::from_millis;
        assert_eq!(pauses, vec![ms(50), ms(100), ms(200)]);
    }

    #[test]
    fn an_error_reply_is_the_answer() {
        let reply = redis::RedisError::from((redis::ErrorKind::Parse, "bad"));
        assert_eq!(Resend::new().after(&reply), None);
    }

    #[test]
    fn masters_are_the_first_node_of_each_range_once() {
        let node = |port| Value::Array(vec![bulk("127.0.0.1"), Value::Int(port), bulk("id")]);
        let range = |start, end, master, replica| {
            Value::Array(vec![
                Value::Int(start),
                Value::Int(end),
                node(master),
                node(replica),
            ])
        };
        let reply = Value::Array(vec![
            range(0, 99, 7001, 7004),
            range(100, 199, 7000, 7003),
            range(200, 299, 7001, 7004),
        ]);
        let master = |port| ScanTarget::Master {
            host: "127.0.0.1".into(),
            port,
        };
        assert_eq!(masters_of(&reply), vec![master(7000), master(7001)]);
        assert!(masters_of(&Value::Nil).is_empty());
    }
}
