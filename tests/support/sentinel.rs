//! A real Redis Sentinel deployment per test: a master, one replica (`--replicaof`) and three
//! `redis-server --sentinel` processes monitoring them as `mymaster`, all on free loopback ports,
//! killed on Drop.
//!
//! The sentinels declare a server down after 1 s (`down-after-milliseconds 1000`, quorum 1) and
//! give a failover 3 s (`failover-timeout 3000`), so [`RedisSentinel::kill_master`] followed by
//! [`RedisSentinel::wait_failover`] promotes the replica within a few seconds. Every process keeps
//! its files (a sentinel rewrites its config file) and log in its own folder of a private tempdir,
//! removed with the fixture.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use ::redis::aio::MultiplexedConnection;
use tempfile::TempDir;
use tokio::time::{Instant, sleep, timeout};

use super::port::free_port;
use super::redis::{Node, scan_keys, spawn_server, start_node};
use super::signal::reap;
use super::tls::NodeTls;

/// The master name the sentinels monitor.
pub const MASTER_NAME: &str = "mymaster";
/// Sentinels started: enough for a majority to authorise a failover while one test kills the
/// master.
const SENTINELS: usize = 3;
/// How long the deployment gets to settle: the replica in sync, every sentinel aware of the
/// replica and of the other sentinels (they meet through hello messages every 2 s).
const SETTLE_TIMEOUT: Duration = Duration::from_secs(30);
/// How often readiness is polled.
const POLL: Duration = Duration::from_millis(50);
/// Bound on one probe, so a wedged probe cannot eat a whole budget.
const PROBE_TIMEOUT: Duration = Duration::from_millis(500);
/// Spawn attempts per process: a free port may be taken by another test before it binds it.
const PORT_ATTEMPTS: usize = 5;

/// A master, its replica and three sentinels on `127.0.0.1`.
///
/// Dropping it kills every process and removes the tempdir.
pub struct RedisSentinel {
    /// The data servers: index 0 started as the master, index 1 as its replica.
    servers: Vec<Node>,
    sentinels: Vec<Node>,
    dir: TempDir,
    /// Set when every process speaks TLS only ([`RedisSentinel::start_tls`]).
    tls: Option<NodeTls>,
}

impl RedisSentinel {
    /// Starts the master, the replica and the sentinels, and waits until the replica is in sync
    /// and every sentinel knows the master, the replica and the other sentinels.
    ///
    /// # Panics
    ///
    /// If `redis-server` is not on `PATH`, a process does not come up within 5 s (its log is
    /// quoted), or the deployment has not settled within 30 s.
    pub async fn start() -> RedisSentinel {
        RedisSentinel::launch(None).await
    }

    /// [`RedisSentinel::start`] with every process speaking TLS only (`--port 0`, `tls-port`),
    /// replication and the sentinels' links included (`tls-replication yes`), each requiring a
    /// client certificate: `tls`'s node certificate is every process's, as server and as client.
    /// [`RedisSentinel::sentinel_urls`] are then `rediss://`, and the fixture's probes present
    /// `tls.fixture`.
    pub async fn start_tls(tls: &NodeTls) -> RedisSentinel {
        RedisSentinel::launch(Some(tls.clone())).await
    }

    async fn launch(tls: Option<NodeTls>) -> RedisSentinel {
        let dir = tempfile::Builder::new()
            .prefix("corral-sentinel-")
            .tempdir()
            .expect("create a tempdir for the sentinel deployment");
        let t = tls.as_ref();
        let master = start_tls_aware(&dir.path().join("server-0"), t, |port, dir| {
            spawn_data(port, dir, t, &[])
        })
        .await;
        let master_port = master.port.to_string();
        let replica = start_tls_aware(&dir.path().join("server-1"), t, |port, dir| {
            spawn_data(port, dir, t, &["--replicaof", "127.0.0.1", &master_port])
        })
        .await;
        let mut deployment = RedisSentinel {
            servers: vec![master, replica],
            sentinels: Vec::with_capacity(SENTINELS),
            dir,
            tls: tls.clone(),
        };
        for index in 0..SENTINELS {
            let node_dir = deployment.dir.path().join(format!("sentinel-{index}"));
            let master_port = deployment.servers[0].port;
            let node = start_tls_aware(&node_dir, t, |port, dir| {
                spawn_sentinel(port, dir, master_port, t)
            })
            .await;
            deployment.sentinels.push(node);
        }
        deployment.settle().await;
        deployment
    }

    /// [`RedisSentinel::start`], then every data server requires `password` (`requirepass`, the
    /// default user) and knows an ACL user `username` with the same password; the servers
    /// replicate (`masterauth`) and the sentinels monitor (`auth-pass`) with it. The fixture's
    /// own probes log in too.
    ///
    /// # Panics
    ///
    /// If a server or sentinel refuses a setting.
    pub async fn start_with_password(username: &str, password: &str) -> RedisSentinel {
        let deployment = RedisSentinel::start().await;
        for sentinel in &deployment.sentinels {
            let mut conn = conn(sentinel.port).await.expect("connect to a sentinel");
            ::redis::cmd("SENTINEL")
                .arg("SET")
                .arg(MASTER_NAME)
                .arg("auth-pass")
                .arg(password)
                .query_async::<()>(&mut conn)
                .await
                .expect("SENTINEL SET auth-pass");
        }
        for server in &deployment.servers {
            let mut conn = conn(server.port).await.expect("connect to a data server");
            let rules = format!("on >{password} ~* &* +@all");
            ::redis::cmd("ACL")
                .arg("SETUSER")
                .arg(username)
                .arg(rules.split(' ').collect::<Vec<_>>())
                .query_async::<()>(&mut conn)
                .await
                .expect("ACL SETUSER");
            for (name, value) in [("masterauth", password), ("requirepass", password)] {
                ::redis::cmd("CONFIG")
                    .arg("SET")
                    .arg(name)
                    .arg(value)
                    .query_async::<()>(&mut conn)
                    .await
                    .unwrap_or_else(|e| panic!("CONFIG SET {name}: {e}"));
            }
            PASSWORDS
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get_or_insert_with(HashMap::new)
                .insert(server.port, password.to_owned());
        }
        deployment
    }

    /// Stops the data server on `port` (SIGSTOP): its connections stay open, it just no longer
    /// answers — the sentinels fail over, a client sees nothing until it sends a request.
    ///
    /// # Panics
    ///
    /// If no data server of this deployment listens on `port`.
    pub fn pause_server(&mut self, port: u16) {
        let node = self
            .servers
            .iter_mut()
            .find(|n| n.port == port)
            .unwrap_or_else(|| panic!("no data server on port {port}"));
        super::signal::send(&mut node.child, "redis-server", "STOP");
    }

    /// The `user=` of every client connected to the data server at `port` (`CLIENT LIST`),
    /// not counting the sentinels' own.
    pub async fn client_users(&self, port: u16) -> Vec<String> {
        let Ok(Ok(mut conn)) = timeout(PROBE_TIMEOUT, conn(port)).await else {
            return Vec::new();
        };
        let list: String = ::redis::cmd("CLIENT")
            .arg("LIST")
            .query_async(&mut conn)
            .await
            .unwrap_or_default();
        list.lines()
            .filter(|l| !l.contains("name=sentinel-"))
            .filter_map(|l| l.split(' ').find_map(|f| f.strip_prefix("user=")))
            .map(str::to_owned)
            .collect()
    }

    /// Keys matching `pattern` in database `db` of the data server at `port`.
    pub async fn keys_in_db(&self, port: u16, db: i64, pattern: &str) -> Vec<String> {
        let mut conn = conn(port)
            .await
            .unwrap_or_else(|e| panic!("connect to redis-server on {port}: {e}"));
        let () = ::redis::cmd("SELECT")
            .arg(db)
            .query_async(&mut conn)
            .await
            .unwrap_or_else(|e| panic!("SELECT {db} on {port}: {e}"));
        scan_keys(&mut conn, pattern, &format!("127.0.0.1:{port} db {db}")).await
    }

    /// The sentinels' URLs, `redis://127.0.0.1:<port>` (`rediss://` in TLS mode).
    pub fn sentinel_urls(&self) -> Vec<String> {
        let scheme = if self.tls.is_some() {
            "rediss"
        } else {
            "redis"
        };
        self.sentinels
            .iter()
            .map(|n| format!("{scheme}://127.0.0.1:{}", n.port))
            .collect()
    }

    /// Pub/sub clients connected to each sentinel: Corral's `+switch-master` listeners (the
    /// sentinels subscribe on the data servers, not on each other).
    pub async fn sentinel_subscribers(&self) -> Vec<usize> {
        let mut counts = Vec::with_capacity(self.sentinels.len());
        for sentinel in &self.sentinels {
            counts.push(pubsub_count(sentinel.port, |_| true).await);
        }
        counts
    }

    /// A connection to the master the deployment started with, for a bench's probes.
    ///
    /// # Panics
    ///
    /// If it does not answer.
    pub async fn master_conn(&self) -> MultiplexedConnection {
        let port = self.servers[0].port;
        conn(port)
            .await
            .unwrap_or_else(|e| panic!("connect to the master on {port}: {e}"))
    }

    /// A connection to each sentinel, in order, for a bench's probes.
    ///
    /// # Panics
    ///
    /// If one does not answer.
    pub async fn sentinel_conns(&self) -> Vec<MultiplexedConnection> {
        let mut conns = Vec::with_capacity(self.sentinels.len());
        for sentinel in &self.sentinels {
            let port = sentinel.port;
            conns.push(
                conn(port)
                    .await
                    .unwrap_or_else(|e| panic!("connect to the sentinel on {port}: {e}")),
            );
        }
        conns
    }

    /// The port of the master the deployment started with.
    pub fn first_master_port(&self) -> u16 {
        self.servers[0].port
    }

    /// Kills the data server on `port` with SIGKILL.
    ///
    /// # Panics
    ///
    /// If no data server of this deployment listens on `port`.
    pub fn kill_server(&mut self, port: u16) {
        let node = self
            .servers
            .iter_mut()
            .find(|n| n.port == port)
            .unwrap_or_else(|| panic!("no data server on port {port}"));
        reap(&mut node.child);
    }

    /// Asks a sentinel for a failover now (`SENTINEL FAILOVER`): the replica is promoted and the
    /// old master, still running, is demoted to a replica of it.
    ///
    /// # Panics
    ///
    /// If the first sentinel refuses.
    pub async fn force_failover(&self) {
        let port = self.sentinels[0].port;
        let mut conn = conn(port)
            .await
            .unwrap_or_else(|e| panic!("connect to the sentinel on {port}: {e}"));
        ::redis::cmd("SENTINEL")
            .arg("FAILOVER")
            .arg(MASTER_NAME)
            .query_async::<()>(&mut conn)
            .await
            .unwrap_or_else(|e| panic!("SENTINEL FAILOVER on {port}: {e}"));
    }

    /// The master port the first answering sentinel reports, if any answers.
    pub async fn reported_master(&self) -> Option<u16> {
        for sentinel in &self.sentinels {
            let ask = async {
                let mut conn = conn(sentinel.port).await.ok()?;
                let (_host, port): (String, u16) = ::redis::cmd("SENTINEL")
                    .arg("get-master-addr-by-name")
                    .arg(MASTER_NAME)
                    .query_async(&mut conn)
                    .await
                    .ok()?;
                Some(port)
            };
            if let Ok(Some(port)) = timeout(PROBE_TIMEOUT, ask).await {
                return Some(port);
            }
        }
        None
    }

    /// The master a sentinel reports, if it is not `old` and answers as a master: a failover
    /// away from `old` has completed.
    pub async fn master_other_than(&self, old: u16) -> Option<u16> {
        let port = self.reported_master().await?;
        (port != old && role(port).await.as_deref() == Some("master")).then_some(port)
    }

    /// Polls (within `within`) until a failover away from `old` has completed; returns the new
    /// master's port.
    ///
    /// # Panics
    ///
    /// If no failover completed within `within` (the panic quotes every log).
    pub async fn wait_failover(&self, old: u16, within: Duration) -> u16 {
        let deadline = Instant::now() + within;
        loop {
            if let Some(port) = self.master_other_than(old).await {
                return port;
            }
            assert!(
                Instant::now() < deadline,
                "no failover away from port {old} within {within:?}\n{}",
                self.logs()
            );
            sleep(POLL).await;
        }
    }

    /// Polls (within `within`) until the data server at `port` reports itself a replica: the
    /// sentinels demoted an old master that is still up.
    ///
    /// # Panics
    ///
    /// If it was not demoted within `within` (the panic quotes every log).
    pub async fn wait_demoted(&self, port: u16, within: Duration) {
        let deadline = Instant::now() + within;
        while role(port).await.as_deref() != Some("slave") {
            assert!(
                Instant::now() < deadline,
                "port {port} was not demoted to a replica within {within:?}\n{}",
                self.logs()
            );
            sleep(POLL).await;
        }
    }

    /// Keys matching `pattern` on the data server at `port`, sorted.
    pub async fn keys(&self, port: u16, pattern: &str) -> Vec<String> {
        let mut conn = conn(port)
            .await
            .unwrap_or_else(|e| panic!("connect to redis-server on {port}: {e}"));
        scan_keys(&mut conn, pattern, &format!("127.0.0.1:{port}")).await
    }

    /// Whether the data server at `port` holds `key`.
    pub async fn exists(&self, port: u16, key: &str) -> bool {
        let mut conn = conn(port)
            .await
            .unwrap_or_else(|e| panic!("connect to redis-server on {port}: {e}"));
        ::redis::cmd("EXISTS")
            .arg(key)
            .query_async::<i64>(&mut conn)
            .await
            .unwrap_or_else(|e| panic!("EXISTS on {port}: {e}"))
            == 1
    }

    /// Pub/sub clients on the data server at `port`, not counting the sentinels' own (named
    /// `sentinel-…`): the Corral hubs subscribed there.
    pub async fn pubsub_clients(&self, port: u16) -> usize {
        pubsub_count(port, |l| !l.contains("name=sentinel-")).await
    }

    /// Subscribers of `channel` on the data server at `port` (`PUBSUB NUMSUB`); 0 when it does
    /// not answer.
    pub async fn subscribers(&self, port: u16, channel: &str) -> usize {
        match timeout(PROBE_TIMEOUT, conn(port)).await {
            Ok(Ok(mut conn)) => super::redis::subscribers(&mut conn, channel).await,
            _ => 0,
        }
    }

    /// Returns once `hubs` Corral pub/sub hubs are subscribed on the data server at `port`
    /// ([`RedisSentinel::pubsub_clients`]); panics after 15 s, the bound a hub gets to find a
    /// master or to follow one.
    pub async fn hubs_subscribed(&self, port: u16, hubs: usize) {
        super::eventually(
            &format!("{hubs} hub(s) subscribed on the server at {port}"),
            Duration::from_secs(15),
            async || self.pubsub_clients(port).await == hubs,
        )
        .await;
    }

    /// Every process's log, for a failure message.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        let mut dirs: Vec<PathBuf> = fs::read_dir(self.dir.path())
            .map(|entries| entries.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        dirs.sort();
        for dir in dirs {
            let log = fs::read_to_string(dir.join("redis.log")).unwrap_or_default();
            out.push_str(&format!("--- {} ---\n{log}", dir.display()));
        }
        out
    }

    /// Waits until the replica is in sync and every sentinel sees the master, the replica and
    /// the other sentinels.
    async fn settle(&self) {
        let deadline = Instant::now() + SETTLE_TIMEOUT;
        let master = self.servers[0].port;
        loop {
            let mut settled = role(self.servers[1].port).await.as_deref() == Some("slave")
                && info_field(self.servers[1].port, "replication", "master_link_status")
                    .await
                    .as_deref()
                    == Some("up");
            for sentinel in &self.sentinels {
                settled = settled && sees_everything(sentinel.port, master).await;
            }
            if settled {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the sentinel deployment did not settle within {SETTLE_TIMEOUT:?}\n{}",
                self.logs()
            );
            sleep(POLL).await;
        }
    }
}

/// Pub/sub clients of the process on `port` whose `CLIENT LIST` line passes `counts`.
async fn pubsub_count(port: u16, counts: impl Fn(&str) -> bool) -> usize {
    let Ok(Ok(mut conn)) = timeout(PROBE_TIMEOUT, conn(port)).await else {
        return 0;
    };
    let list: String = ::redis::cmd("CLIENT")
        .arg("LIST")
        .arg("TYPE")
        .arg("pubsub")
        .query_async(&mut conn)
        .await
        .unwrap_or_default();
    list.lines()
        .filter(|l| !l.trim().is_empty() && counts(l))
        .count()
}

/// Whether the sentinel on `port` reports `master`, one replica and the other sentinels.
async fn sees_everything(port: u16, master: u16) -> bool {
    let ask = async {
        let mut conn = conn(port).await.ok()?;
        let state: HashMap<String, String> = ::redis::cmd("SENTINEL")
            .arg("master")
            .arg(MASTER_NAME)
            .query_async(&mut conn)
            .await
            .ok()?;
        let replicas: Vec<HashMap<String, String>> = ::redis::cmd("SENTINEL")
            .arg("replicas")
            .arg(MASTER_NAME)
            .query_async(&mut conn)
            .await
            .ok()?;
        let others = (SENTINELS - 1).to_string();
        Some(
            state.get("port").map(String::as_str) == Some(master.to_string().as_str())
                && state.get("flags").map(String::as_str) == Some("master")
                && state.get("num-other-sentinels") == Some(&others)
                && replicas.len() == 1
                && replicas[0].get("flags").map(String::as_str) == Some("slave")
                && replicas[0].get("master-link-status").map(String::as_str) == Some("ok"),
        )
    };
    matches!(timeout(PROBE_TIMEOUT, ask).await, Ok(Some(true)))
}

/// `role` from `INFO replication` of the server on `port`, if it answers.
async fn role(port: u16) -> Option<String> {
    info_field(port, "replication", "role").await
}

/// One `field` of `INFO section` on `port`, if the server answers.
async fn info_field(port: u16, section: &str, field: &str) -> Option<String> {
    let ask = async {
        let mut conn = conn(port).await.ok()?;
        let info: String = ::redis::cmd("INFO")
            .arg(section)
            .query_async(&mut conn)
            .await
            .ok()?;
        let prefix = format!("{field}:");
        info.lines()
            .find_map(|line| line.trim().strip_prefix(prefix.as_str()))
            .map(str::to_owned)
    };
    timeout(PROBE_TIMEOUT, ask).await.ok().flatten()
}

/// Passwords of the data servers that require one, by port: ports are unique within the test
/// process, so tests running in parallel never share an entry.
static PASSWORDS: Mutex<Option<HashMap<u16, String>>> = Mutex::new(None);

fn password_of(port: u16) -> Option<String> {
    let passwords = PASSWORDS.lock().unwrap_or_else(|p| p.into_inner());
    passwords.as_ref().and_then(|map| map.get(&port).cloned())
}

/// The TLS material of the processes that speak TLS only, by port (as [`PASSWORDS`]).
static TLS_PORTS: Mutex<Option<HashMap<u16, NodeTls>>> = Mutex::new(None);

fn tls_of(port: u16) -> Option<NodeTls> {
    let ports = TLS_PORTS.lock().unwrap_or_else(|p| p.into_inner());
    ports.as_ref().and_then(|map| map.get(&port).cloned())
}

/// A client for the process on `port`: over TLS if it speaks TLS only, else plain.
fn client(port: u16) -> ::redis::Client {
    match tls_of(port) {
        Some(tls) => tls.client(port),
        None => ::redis::Client::open(format!("redis://127.0.0.1:{port}"))
            .expect("a redis:// URL on loopback is valid"),
    }
}

async fn conn(port: u16) -> ::redis::RedisResult<MultiplexedConnection> {
    if tls_of(port).is_some() {
        return client(port).get_multiplexed_async_connection().await;
    }
    let url = match password_of(port) {
        Some(password) => format!("redis://:{password}@127.0.0.1:{port}"),
        None => format!("redis://127.0.0.1:{port}"),
    };
    ::redis::Client::open(url)?
        .get_multiplexed_async_connection()
        .await
}

/// Spawns with `spawn(port, dir)` on a free port until one is not taken, and waits until the
/// process answers (over TLS with `tls`: the port is noted first, so [`client`] speaks TLS to it).
async fn start_tls_aware(
    dir: &Path,
    tls: Option<&NodeTls>,
    spawn: impl Fn(u16, &Path) -> Child,
) -> Node {
    let spawn = |port: u16, dir: &Path| {
        if let Some(tls) = tls {
            TLS_PORTS
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get_or_insert_with(HashMap::new)
                .insert(port, tls.clone());
        }
        spawn(port, dir)
    };
    start_node(dir, PORT_ATTEMPTS, free_port, spawn, client).await
}

/// Starts a data server on `port`, TLS only with `tls` (`--port 0 --tls-port <port>`).
fn spawn_data(port: u16, dir: &Path, tls: Option<&NodeTls>, extra: &[&str]) -> Child {
    let Some(tls) = tls else {
        return spawn_server(port, dir, extra);
    };
    let mut args = vec!["--tls-port".to_owned(), port.to_string()];
    args.extend(tls.args());
    args.extend(extra.iter().map(|a| (*a).to_owned()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    spawn_server(0, dir, &args)
}

/// Starts `redis-server <conf> --sentinel` on `port`, monitoring the master on `master`; TLS
/// only with `tls`, to clients and to the servers (and the other sentinels).
fn spawn_sentinel(port: u16, dir: &Path, master: u16, tls: Option<&NodeTls>) -> Child {
    let conf = dir.join("sentinel.conf");
    let listen = match tls {
        None => format!("port {port}\n"),
        Some(tls) => {
            let mut lines = format!("port 0\ntls-port {port}\n");
            for (name, value) in tls.settings() {
                lines.push_str(&format!("{name} {value}\n"));
            }
            lines
        }
    };
    let text = format!(
        "{listen}bind 127.0.0.1\ndir {dir}\nlogfile {log}\n\
         sentinel monitor {MASTER_NAME} 127.0.0.1 {master} 1\n\
         sentinel down-after-milliseconds {MASTER_NAME} 1000\n\
         sentinel failover-timeout {MASTER_NAME} 3000\n",
        dir = dir.display(),
        log = dir.join("redis.log").display(),
    );
    fs::write(&conf, text).expect("write sentinel.conf");
    Command::new("redis-server")
        .arg(&conf)
        .arg("--sentinel")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn redis-server --sentinel: {e}"))
}
