//! A real Redis Cluster per test: three `redis-server --cluster-enabled yes` masters on free
//! loopback ports, joined by `redis-cli --cluster create`, killed on Drop.
//!
//! Each node keeps nothing on disk (`--save ""`, no AOF) and writes its `nodes.conf` and log into
//! its own folder of a private tempdir, removed with the fixture. A node also needs its cluster bus
//! port (its port + 10000) free, so ports are picked with both free and below 55536.
//!
//! [`RedisCluster::start_tls`] starts nodes that speak TLS only, on the client port and on the
//! cluster bus, each requiring a client certificate. `redis-cli --cluster create` is bounded (it
//! is killed after 30 s, and the panic quotes every node's log), so a cluster that cannot form
//! fails a test instead of hanging it.

use std::fs;
use std::io::ErrorKind;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use ::redis::aio::MultiplexedConnection;
use tempfile::TempDir;
use tokio::time::{Instant, sleep, timeout};

use super::port::free_port;
use super::redis::{Node, start_node};
use super::signal::reap;
use super::tls::NodeTls;

/// Masters in the cluster (no replicas): enough to spread slots over several nodes.
const MASTERS: usize = 3;
/// How long the joined cluster gets until every node says `cluster_state:ok`.
const CLUSTER_OK_TIMEOUT: Duration = Duration::from_secs(20);
/// How often readiness is polled.
const POLL: Duration = Duration::from_millis(50);
/// Bound on one readiness probe.
const PROBE_TIMEOUT: Duration = Duration::from_millis(500);
/// Bound on `redis-cli --cluster create`: past it the command is killed and the test fails.
const CREATE_TIMEOUT: Duration = Duration::from_secs(30);
/// A node's cluster bus listens on its port plus this.
const BUS_OFFSET: u16 = 10_000;
/// Spawn attempts per node: a free port may be taken by another test before the node binds it.
const PORT_ATTEMPTS: usize = 5;

/// Three cluster masters on `127.0.0.1`, serving all 16384 slots between them.
///
/// Dropping it kills every node and removes the tempdir.
pub struct RedisCluster {
    nodes: Vec<Node>,
    dir: TempDir,
    /// Set when the nodes speak TLS only ([`RedisCluster::start_tls`]).
    tls: Option<NodeTls>,
}

impl RedisCluster {
    /// Starts three masters, creates the cluster and waits until every node reports
    /// `cluster_state:ok`.
    ///
    /// # Panics
    ///
    /// If `redis-server` or `redis-cli` is not on `PATH`, if a node does not come up within 5 s,
    /// if `redis-cli --cluster create` fails (its output is quoted), or if the cluster is not ok on
    /// every node within 20 s.
    pub async fn start() -> RedisCluster {
        RedisCluster::launch(None).await
    }

    /// [`RedisCluster::start`] with nodes that speak TLS only: `--port 0 --tls-port P`, the
    /// cluster bus over TLS (`tls-cluster yes`, on P + 10000), every client required to present
    /// a certificate. `tls`'s node certificate is each node's, as server and as client (the bus
    /// is both); [`RedisCluster::urls`] are then `rediss://`.
    pub async fn start_tls(tls: &NodeTls) -> RedisCluster {
        RedisCluster::launch(Some(tls.clone())).await
    }

    async fn launch(tls: Option<NodeTls>) -> RedisCluster {
        let dir = tempfile::Builder::new()
            .prefix("corral-cluster-")
            .tempdir()
            .expect("create a tempdir for the cluster");
        let mut cluster = RedisCluster {
            nodes: Vec::with_capacity(MASTERS),
            dir,
            tls,
        };
        for index in 0..MASTERS {
            let dir = cluster.dir.path().join(format!("node-{index}"));
            let tls = cluster.tls.as_ref();
            let node = start_node(
                &dir,
                PORT_ATTEMPTS,
                free_port_pair,
                |port, dir| spawn(port, dir, tls),
                |port| node_client(port, tls),
            )
            .await;
            cluster.nodes.push(node);
        }
        cluster.create().await;
        cluster.wait_ok().await;
        cluster
    }

    /// The seed node URLs, `redis://127.0.0.1:<port>` (`rediss://` with TLS), one per master.
    pub fn urls(&self) -> Vec<String> {
        let scheme = if self.tls.is_some() {
            "rediss"
        } else {
            "redis"
        };
        self.nodes
            .iter()
            .map(|n| format!("{scheme}://127.0.0.1:{}", n.port))
            .collect()
    }

    /// A client for node `index` (over TLS with the fixture's certificate, in TLS mode).
    fn client(&self, index: usize) -> ::redis::Client {
        node_client(self.nodes[index].port, self.tls.as_ref())
    }

    /// A plain (non-cluster) connection to node `index`, for per-node inspection.
    pub async fn node_conn(&self, index: usize) -> MultiplexedConnection {
        let url = &self.urls()[index];
        self.client(index)
            .get_multiplexed_async_connection()
            .await
            .unwrap_or_else(|e| panic!("connect to cluster node {url}: {e}"))
    }

    /// A cluster connection (slot-aware), for writing keys the way Corral does.
    pub async fn cluster_conn(&self) -> ::redis::cluster_async::ClusterConnection {
        let mut builder = ::redis::cluster::ClusterClient::builder(self.urls());
        if let Some(tls) = &self.tls {
            builder = builder.certs(tls.certificates());
        }
        builder
            .build()
            .expect("seed URLs on loopback are valid")
            .get_async_connection()
            .await
            .unwrap_or_else(|e| panic!("connect to the cluster {:?}: {e}", self.urls()))
    }

    /// Keys matching a glob `pattern` on node `index`, sorted (`SCAN` on that node only).
    pub async fn node_keys(&self, index: usize, pattern: &str) -> Vec<String> {
        let mut conn = self.node_conn(index).await;
        let node = format!("node {index}");
        super::redis::scan_keys(&mut conn, pattern, &node).await
    }

    /// Keys matching `pattern` on every node, sorted.
    pub async fn keys(&self, pattern: &str) -> Vec<String> {
        let mut keys = Vec::new();
        for index in 0..self.nodes.len() {
            keys.extend(self.node_keys(index, pattern).await);
        }
        keys.sort();
        keys
    }

    /// How many of the masters hold at least one key matching `pattern`.
    pub async fn masters_holding(&self, pattern: &str) -> usize {
        let mut holding = 0;
        for index in 0..self.nodes.len() {
            if !self.node_keys(index, pattern).await.is_empty() {
                holding += 1;
            }
        }
        holding
    }

    /// How many pub/sub clients node `index` has (`CLIENT LIST TYPE pubsub`).
    pub async fn pubsub_clients(&self, index: usize) -> usize {
        let list: String = ::redis::cmd("CLIENT")
            .arg("LIST")
            .arg("TYPE")
            .arg("pubsub")
            .query_async(&mut self.node_conn(index).await)
            .await
            .unwrap_or_else(|e| panic!("CLIENT LIST on node {index}: {e}"));
        list.lines().filter(|l| !l.trim().is_empty()).count()
    }

    /// Whether node `index` serves the slot of `key` (it answers `EXISTS` instead of `MOVED`).
    pub async fn serves(&self, index: usize, key: &str) -> bool {
        ::redis::cmd("EXISTS")
            .arg(key)
            .query_async::<i64>(&mut self.node_conn(index).await)
            .await
            .is_ok()
    }

    /// Kills node `index` (SIGKILL) and reaps it. Its slots stop being served; the other nodes
    /// go on serving theirs (`cluster-require-full-coverage no`).
    pub fn kill(&mut self, index: usize) {
        reap(&mut self.nodes[index].child);
    }

    /// The logs of every node, for diagnosing a failed test.
    pub fn logs(&self) -> String {
        (0..self.nodes.len())
            .map(|i| log_tail(&self.dir.path().join(format!("node-{i}"))))
            .collect()
    }

    /// `redis-cli --cluster create … --cluster-replicas 0 --cluster-yes` (with `--tls` and the
    /// fixture's certificate in TLS mode), killed if it has not ended within [`CREATE_TIMEOUT`].
    /// Its output goes to files (a pipe nobody reads could fill and stall it).
    async fn create(&self) {
        let addrs: Vec<String> = self
            .nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let (out, err) = (
            self.dir.path().join("create.out"),
            self.dir.path().join("create.err"),
        );
        let file = |p: &Path| fs::File::create(p).expect("create redis-cli's output file");
        let mut command = Command::new("redis-cli");
        if let Some(tls) = &self.tls {
            command.args(tls.cli_args());
        }
        let mut child = command
            .arg("--cluster")
            .arg("create")
            .args(&addrs)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdin(Stdio::null())
            .stdout(file(&out))
            .stderr(file(&err))
            .spawn()
            .unwrap_or_else(|e| match e.kind() {
                ErrorKind::NotFound => panic!(
                    "redis-cli not found on PATH: install it (Debian: apt-get install \
                     redis-tools, or redis-server which brings it) to run Corral's cluster tests"
                ),
                _ => panic!("run redis-cli --cluster create: {e}"),
            });
        let deadline = Instant::now() + CREATE_TIMEOUT;
        let status = loop {
            if let Ok(Some(status)) = child.try_wait() {
                break Some(status);
            }
            if Instant::now() >= deadline {
                reap(&mut child);
                break None;
            }
            sleep(POLL).await;
        };
        let said = || {
            let read = |p: &Path| fs::read_to_string(p).unwrap_or_default();
            format!("{}\n{}", read(&out), read(&err))
        };
        match status {
            Some(status) if status.success() => {}
            Some(status) => panic!(
                "redis-cli --cluster create {addrs:?} failed ({status}):\n{}\n{}",
                said(),
                self.logs()
            ),
            None => panic!(
                "redis-cli --cluster create {addrs:?} did not end within {CREATE_TIMEOUT:?} \
                 (killed):\n{}\n{}",
                said(),
                self.logs()
            ),
        }
    }

    /// Polls `CLUSTER INFO` on every node until each says `cluster_state:ok`.
    async fn wait_ok(&self) {
        let deadline = Instant::now() + CLUSTER_OK_TIMEOUT;
        for (index, url) in self.urls().iter().enumerate() {
            let client = self.client(index);
            loop {
                let probe = async {
                    let mut conn = client.get_multiplexed_async_connection().await.ok()?;
                    ::redis::cmd("CLUSTER")
                        .arg("INFO")
                        .query_async::<String>(&mut conn)
                        .await
                        .ok()
                };
                let info = timeout(PROBE_TIMEOUT, probe).await.ok().flatten();
                if info
                    .as_deref()
                    .is_some_and(|i| i.contains("cluster_state:ok"))
                {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "cluster node {index} ({url}) not ok within {CLUSTER_OK_TIMEOUT:?}: {info:?}\n{}",
                    self.logs()
                );
                sleep(POLL).await;
            }
        }
    }
}

/// A client for the node on `port`: plain, or over TLS presenting the fixture's certificate.
fn node_client(port: u16, tls: Option<&NodeTls>) -> ::redis::Client {
    match tls {
        Some(tls) => tls.client(port),
        None => ::redis::Client::open(format!("redis://127.0.0.1:{port}"))
            .expect("a redis:// URL on loopback is valid"),
    }
}

/// A free port (see [`free_port`]) whose bus port (+10000) is free too.
fn free_port_pair() -> u16 {
    for _ in 0..200 {
        let port = free_port();
        let Some(bus) = port.checked_add(BUS_OFFSET) else {
            continue;
        };
        if std::net::TcpListener::bind(("127.0.0.1", bus)).is_ok() {
            return port;
        }
    }
    panic!("found no free loopback port whose port + {BUS_OFFSET} is free too");
}

fn spawn(port: u16, dir: &Path, tls: Option<&NodeTls>) -> Child {
    let nodes_conf = dir.join("nodes.conf");
    let nodes_conf = nodes_conf.to_string_lossy();
    let mut args: Vec<String> = [
        "--cluster-enabled",
        "yes",
        // A test may kill a master: the others keep serving their own slots.
        "--cluster-require-full-coverage",
        "no",
        "--cluster-config-file",
        &nodes_conf,
    ]
    .iter()
    .map(|a| (*a).to_owned())
    .collect();
    let port = match tls {
        None => port,
        Some(tls) => {
            // TLS only: no plain port; the bus (tls-port + 10000) speaks TLS too.
            args.extend(["--tls-port".to_owned(), port.to_string()]);
            args.extend(["--tls-cluster".to_owned(), "yes".to_owned()]);
            args.extend(tls.args());
            0
        }
    };
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    super::redis::spawn_server(port, dir, &args)
}

/// A node's log tail, headed by its directory (a cluster has several).
fn log_tail(dir: &Path) -> String {
    format!("--- {} ---\n{}", dir.display(), super::redis::log_tail(dir))
}
