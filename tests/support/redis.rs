//! A real `redis-server` per test (and per bench run), on a free loopback port, killed on Drop.
//!
//! The server keeps nothing on disk (`--save ""`, no AOF) and writes its log into a private
//! tempdir, which is removed with the fixture. Fault tests drive the process directly:
//! [`RedisServer::kill`] (SIGKILL), [`RedisServer::stop`] / [`RedisServer::cont`] (SIGSTOP /
//! SIGCONT: the socket stays open but nothing answers) and [`RedisServer::restart`] (a fresh,
//! empty server on the same port, for reconnect tests).

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

// `::redis` is the crate; this module is also named `redis`.
use ::redis::aio::MultiplexedConnection;
use tempfile::TempDir;
use tokio::time::{Instant, sleep, timeout};

use super::port::free_port;
use super::signal::{self, reap};

/// How long a freshly spawned server gets to answer `PING`.
const READY_TIMEOUT: Duration = Duration::from_secs(5);
/// How often readiness is polled.
const READY_POLL: Duration = Duration::from_millis(20);
/// Bound on one readiness probe, so a wedged probe cannot eat the whole budget.
const PROBE_TIMEOUT: Duration = Duration::from_millis(500);
/// Free ports are found by binding and dropping, which races with other tests; retry this often.
const PORT_ATTEMPTS: usize = 3;
/// Log lines quoted when the server does not come up.
const LOG_TAIL_LINES: usize = 30;

/// A `redis-server` child process listening on `127.0.0.1:port()`.
///
/// Dropping it kills the process (even a stopped one), reaps it and removes its tempdir.
pub struct RedisServer {
    child: Child,
    port: u16,
    dir: TempDir,
    /// Set in TLS mode ([`RedisServer::start_tls`]).
    tls: Option<Tls>,
}

/// A TLS server's material: its arguments, and what the fixture's own connections present.
#[derive(Clone)]
struct Tls {
    args: Vec<String>,
    ca: PathBuf,
    client: super::tls::Leaf,
}

/// How a spawn attempt ended.
pub(crate) enum Startup {
    /// Our process answers on the port.
    Ready,
    /// Something else bound the port between our probe and the spawn.
    PortTaken,
    /// The process exited or never answered; the reason, for the panic message.
    Failed(String),
}

impl RedisServer {
    /// Starts a server on a free loopback port and waits until it answers `PING`.
    ///
    /// Statistics are reset once it is up, so [`RedisServer::commandstats`] counts only what the
    /// test does.
    ///
    /// # Panics
    ///
    /// If `redis-server` is not on `PATH`, if it does not come up within 5 s (the panic quotes the
    /// end of its log), or if three free ports in a row were taken before it could bind them.
    pub async fn start() -> RedisServer {
        RedisServer::launch(None).await
    }

    /// Like [`RedisServer::start`], speaking TLS only (`--port 0 --tls-port P`) with a server
    /// certificate for `127.0.0.1` issued by `pki`; with `clients_must_authenticate`, every
    /// client must present a certificate `pki` issued. [`RedisServer::url`] is then
    /// `rediss://127.0.0.1:P`, and the fixture's own connections trust `pki` (and present a
    /// client certificate of it).
    pub async fn start_tls(pki: &super::tls::Pki, clients_must_authenticate: bool) -> RedisServer {
        let leaf = pki.server(&["127.0.0.1", "localhost"]);
        let path = |p: &Path| p.display().to_string();
        let auth = if clients_must_authenticate {
            "yes"
        } else {
            "no"
        };
        let args = vec![
            "--tls-cert-file".to_owned(),
            path(&leaf.cert),
            "--tls-key-file".to_owned(),
            path(&leaf.key),
            "--tls-ca-cert-file".to_owned(),
            path(&pki.ca_file()),
            "--tls-auth-clients".to_owned(),
            auth.to_owned(),
        ];
        let tls = Tls {
            args,
            ca: pki.ca_file(),
            client: pki.client("fixture"),
        };
        RedisServer::launch(Some(tls)).await
    }

    async fn launch(tls: Option<Tls>) -> RedisServer {
        let dir = tempfile::Builder::new()
            .prefix("corral-redis-")
            .tempdir()
            .expect("create a tempdir for redis-server");
        for _ in 0..PORT_ATTEMPTS {
            let port = free_port();
            let log_start = log_len(dir.path());
            let mut child = spawn(port, dir.path(), tls.as_ref());
            let probe = client_for(port, tls.as_ref());
            match wait_ready_with(&mut child, &probe, dir.path(), log_start).await {
                Startup::Ready => {
                    let server = RedisServer {
                        child,
                        port,
                        dir,
                        tls,
                    };
                    server.reset_stats().await;
                    return server;
                }
                Startup::PortTaken => reap(&mut child),
                Startup::Failed(why) => {
                    reap(&mut child);
                    panic!("{}", startup_failure(port, dir.path(), &why));
                }
            }
        }
        panic!(
            "redis-server: {PORT_ATTEMPTS} free ports in a row were taken before it could bind them\n{}",
            log_tail(dir.path())
        );
    }

    /// The connection URL, `redis://127.0.0.1:<port>` (`rediss://` in TLS mode).
    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() {
            "rediss"
        } else {
            "redis"
        };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    /// The port the server listens on; it survives [`RedisServer::restart`].
    pub fn port(&self) -> u16 {
        self.port
    }

    /// A client for this server. Opening one does not connect.
    pub fn client(&self) -> ::redis::Client {
        client_for(self.port, self.tls.as_ref())
    }

    /// A new multiplexed connection to the server.
    ///
    /// redis-rs bounds each response by 500 ms by default, so commands on it fail rather than hang
    /// while the server is stopped.
    ///
    /// # Panics
    ///
    /// If the server does not accept the connection.
    pub async fn conn(&self) -> MultiplexedConnection {
        self.client()
            .get_multiplexed_async_connection()
            .await
            .unwrap_or_else(|e| panic!("connect to redis-server at {}: {e}", self.url()))
    }

    /// Calls per command since start (or the last [`RedisServer::reset_stats`]), from
    /// `INFO commandstats`.
    ///
    /// Reading them opens a connection, which itself shows up as `client|setinfo` and `info`.
    pub async fn commandstats(&self) -> CommandStats {
        CommandStats::read(&mut self.conn().await, &self.url()).await
    }

    /// Zeroes the server's statistics (`CONFIG RESETSTAT`).
    pub async fn reset_stats(&self) {
        ::redis::cmd("CONFIG")
            .arg("RESETSTAT")
            .query_async::<()>(&mut self.conn().await)
            .await
            .unwrap_or_else(|e| panic!("CONFIG RESETSTAT on {}: {e}", self.url()));
    }

    /// Keys matching a glob `pattern`, sorted. Uses `SCAN`, so the server is never blocked.
    pub async fn keys(&self, pattern: &str) -> Vec<String> {
        let mut conn = self.conn().await;
        scan_keys(&mut conn, pattern, &self.url()).await
    }

    /// Subscribers of `channel` (`PUBSUB NUMSUB`); 0 when the server does not answer, so a test
    /// may poll it while the server is stopped.
    pub async fn subscribers(&self, channel: &str) -> usize {
        subscribers(&mut self.conn().await, channel).await
    }

    /// Subscribers of Corral's fill channels, every key's together (`PUBSUB CHANNELS
    /// corral:*:fill:*`, then `NUMSUB` of each): one per instance waiting on a key's fill. What
    /// the server does not answer counts 0.
    pub async fn fill_subscribers(&self) -> usize {
        let channels: Vec<String> = ::redis::cmd("PUBSUB")
            .arg("CHANNELS")
            .arg("corral:*:fill:*")
            .query_async(&mut self.conn().await)
            .await
            .unwrap_or_default();
        let mut total = 0;
        for channel in channels {
            total += self.subscribers(&channel).await;
        }
        total
    }

    /// Drops every pub/sub connection to the server (`CLIENT KILL TYPE pubsub`); how many.
    pub async fn kill_pubsub_clients(&self) -> i64 {
        kill_pubsub_clients(&mut self.conn().await, &self.url()).await
    }

    /// Kills the server with SIGKILL and reaps it. Connections see a reset; new ones are refused.
    /// Does nothing if it is already dead.
    pub fn kill(&mut self) {
        reap(&mut self.child);
    }

    /// Freezes the server with SIGSTOP: connections stay open and new ones are accepted by the
    /// kernel, but nothing is answered until [`RedisServer::cont`].
    ///
    /// # Panics
    ///
    /// If the server was killed.
    pub fn stop(&mut self) {
        signal::send(&mut self.child, "redis-server", "STOP");
    }

    /// Resumes a server frozen by [`RedisServer::stop`] (SIGCONT).
    ///
    /// # Panics
    ///
    /// If the server was killed.
    pub fn cont(&mut self) {
        signal::send(&mut self.child, "redis-server", "CONT");
    }

    /// Kills the server (if it is running or stopped) and starts a fresh, empty one on the same
    /// port, waiting until it answers. Existing connections break; clients that reconnect reach
    /// the new server.
    ///
    /// # Panics
    ///
    /// If the new server does not come up within 5 s, or another process took the port.
    pub async fn restart(&mut self) {
        self.kill();
        let log_start = log_len(self.dir.path());
        self.child = spawn(self.port, self.dir.path(), self.tls.as_ref());
        let probe = client_for(self.port, self.tls.as_ref());
        match wait_ready_with(&mut self.child, &probe, self.dir.path(), log_start).await {
            Startup::Ready => {}
            Startup::PortTaken => {
                reap(&mut self.child);
                panic!(
                    "redis-server: port {} was taken while the server was down",
                    self.port
                );
            }
            Startup::Failed(why) => {
                reap(&mut self.child);
                panic!("{}", startup_failure(self.port, self.dir.path(), &why));
            }
        }
    }

    /// The server's log so far (all runs on this fixture), for diagnosing a failed test.
    pub fn log(&self) -> String {
        fs::read_to_string(log_path(self.dir.path())).unwrap_or_default()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        // SIGKILL works on a stopped process too; reaping here (not in the background) means the
        // port is free again by the time the next test looks for one.
        reap(&mut self.child);
    }
}

/// Calls per command, parsed from `INFO commandstats`.
///
/// Names are lower case as Redis reports them: `set`, `get`, `publish`, `evalsha`, and
/// `parent|sub` for subcommands (`config|resetstat`, `client|setinfo`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CommandStats {
    calls: HashMap<String, u64>,
}

impl CommandStats {
    /// Calls of `name` (case-insensitive); 0 when the command was never called.
    pub fn calls(&self, name: &str) -> u64 {
        self.calls
            .get(&name.to_ascii_lowercase())
            .copied()
            .unwrap_or(0)
    }

    /// Every command called at least once, with its count.
    pub fn all(&self) -> &HashMap<String, u64> {
        &self.calls
    }

    /// Reads `INFO commandstats` from the server behind `conn` (any Redis: a test's, a cluster
    /// node, the bench's); `server` names it in a failure.
    ///
    /// # Panics
    ///
    /// If the command fails.
    pub async fn read(conn: &mut MultiplexedConnection, server: &str) -> CommandStats {
        let info: String = ::redis::cmd("INFO")
            .arg("commandstats")
            .query_async(conn)
            .await
            .unwrap_or_else(|e| panic!("INFO commandstats on {server}: {e}"));
        CommandStats::parse(&info)
    }

    /// Parses lines such as `cmdstat_set:calls=1,usec=3,usec_per_call=3.00,...`; other lines
    /// are ignored.
    pub fn parse(info: &str) -> CommandStats {
        let calls = info
            .lines()
            .filter_map(|line| {
                let (name, fields) = line.trim().strip_prefix("cmdstat_")?.split_once(':')?;
                let calls = fields
                    .split(',')
                    .find_map(|field| field.strip_prefix("calls="))?
                    .parse()
                    .ok()?;
                Some((name.to_ascii_lowercase(), calls))
            })
            .collect();
        CommandStats { calls }
    }
}

fn spawn(port: u16, dir: &Path, tls: Option<&Tls>) -> Child {
    let debug = ["--enable-debug-command", "local"];
    let Some(tls) = tls else {
        return spawn_server(port, dir, &debug);
    };
    // `--port 0`: no plain port; TLS on the one chosen.
    let port = port.to_string();
    let mut args: Vec<&str> = debug.to_vec();
    args.extend(["--tls-port", &port]);
    args.extend(tls.args.iter().map(String::as_str));
    spawn_server(0, dir, &args)
}

/// A client for the server on `port`: plain, or over TLS trusting its CA and presenting the
/// fixture's client certificate.
fn client_for(port: u16, tls: Option<&Tls>) -> ::redis::Client {
    let Some(tls) = tls else {
        return ::redis::Client::open(format!("redis://127.0.0.1:{port}"))
            .expect("a redis:// URL on loopback is valid");
    };
    tls_client(port, &tls.ca, &tls.client)
}

/// A client for the TLS server on `port`, trusting the CA in `ca` and presenting `client`.
pub(crate) fn tls_client(port: u16, ca: &Path, client: &super::tls::Leaf) -> ::redis::Client {
    let read = |p: &Path| fs::read(p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()));
    let certs = ::redis::TlsCertificates {
        client_tls: Some(::redis::ClientTlsConfig {
            client_cert: read(&client.cert),
            client_key: read(&client.key),
        }),
        root_cert: Some(read(ca)),
    };
    ::redis::Client::build_with_tls(format!("rediss://127.0.0.1:{port}"), certs)
        .expect("a rediss:// URL on loopback with test certificates is valid")
}

/// Starts a `redis-server` on `port` keeping nothing on disk, its files and log in `dir`, with
/// `extra` arguments; panics with an install hint when `redis-server` is missing.
pub(crate) fn spawn_server(port: u16, dir: &Path, extra: &[&str]) -> Child {
    // Errors before the log file is opened (a bad argument) go to stderr; keep them too.
    let stderr = File::options()
        .create(true)
        .append(true)
        .open(dir.join("stderr.log"))
        .expect("create redis-server's stderr.log");
    Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no"])
        .arg("--dir")
        .arg(dir)
        .args(extra)
        .arg("--logfile")
        .arg(log_path(dir))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .unwrap_or_else(|e| match e.kind() {
            ErrorKind::NotFound => panic!(
                "redis-server not found on PATH: install it (Debian: apt-get install redis-server) \
                 to run Corral's tests"
            ),
            _ => panic!("spawn redis-server: {e}"),
        })
}

/// Polls until `child` answers on `port`, exits, or [`READY_TIMEOUT`] passes.
///
/// A server that answers is only ours if it reports our pid: when the port was taken by another
/// test's server, our child exits with "Address already in use" while the other one answers.
pub(crate) async fn wait_ready(
    child: &mut Child,
    port: u16,
    dir: &Path,
    log_start: u64,
) -> Startup {
    let client = ::redis::Client::open(format!("redis://127.0.0.1:{port}"))
        .expect("a redis:// URL on loopback is valid");
    wait_ready_with(child, &client, dir, log_start).await
}

/// [`wait_ready`] probing through `client` (a TLS one for a TLS server).
pub(crate) async fn wait_ready_with(
    child: &mut Child,
    client: &::redis::Client,
    dir: &Path,
    log_start: u64,
) -> Startup {
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return if log_since(dir, log_start).contains("Address already in use") {
                Startup::PortTaken
            } else {
                Startup::Failed(format!("it exited with {status}"))
            };
        }
        if let Ok(Some(pid)) = timeout(PROBE_TIMEOUT, server_pid(client)).await
            && pid == child.id()
        {
            return Startup::Ready;
        }
        if Instant::now() >= deadline {
            return Startup::Failed(format!("it did not answer within {READY_TIMEOUT:?}"));
        }
        sleep(READY_POLL).await;
    }
}

/// The `process_id` the server on the other end reports, if it answers at all.
async fn server_pid(client: &::redis::Client) -> Option<u32> {
    let mut conn = client.get_multiplexed_async_connection().await.ok()?;
    let info: String = ::redis::cmd("INFO")
        .arg("server")
        .query_async(&mut conn)
        .await
        .ok()?;
    info.lines()
        .find_map(|line| line.trim().strip_prefix("process_id:"))?
        .parse()
        .ok()
}

fn log_path(dir: &Path) -> PathBuf {
    dir.join("redis.log")
}

pub(crate) fn log_len(dir: &Path) -> u64 {
    fs::metadata(log_path(dir)).map(|m| m.len()).unwrap_or(0)
}

/// What the current run wrote to the log, skipping earlier runs on the same fixture.
fn log_since(dir: &Path, start: u64) -> String {
    let log = fs::read(log_path(dir)).unwrap_or_default();
    let start = usize::try_from(start).unwrap_or(usize::MAX).min(log.len());
    String::from_utf8_lossy(&log[start..]).into_owned()
}

/// The last lines of a server's log and stderr in `dir`, for a failure message.
pub(crate) fn log_tail(dir: &Path) -> String {
    let mut tail = String::new();
    for (name, path) in [
        ("redis.log", log_path(dir)),
        ("stderr", dir.join("stderr.log")),
    ] {
        let text = fs::read_to_string(&path).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let from = lines.len().saturating_sub(LOG_TAIL_LINES);
        tail.push_str(&format!("--- last lines of {name} ---\n"));
        for line in &lines[from..] {
            tail.push_str(line);
            tail.push('\n');
        }
    }
    tail
}

/// One `redis-server` process of a fixture that runs several (a cluster's nodes, the sentinel
/// deployment's servers and sentinels) and its port; killed and reaped on Drop.
pub(crate) struct Node {
    pub(crate) child: Child,
    pub(crate) port: u16,
}

impl Drop for Node {
    fn drop(&mut self) {
        reap(&mut self.child);
    }
}

/// Spawns `spawn(port, dir)` on a port from `pick` until one is not taken, up to `attempts`
/// times, and waits until the process answers `probe(port)` (a TLS client for a TLS node).
///
/// # Panics
///
/// If the process does not come up (quoting its log), or every port was taken.
pub(crate) async fn start_node(
    dir: &Path,
    attempts: usize,
    pick: impl Fn() -> u16,
    spawn: impl Fn(u16, &Path) -> Child,
    probe: impl Fn(u16) -> ::redis::Client,
) -> Node {
    fs::create_dir_all(dir).expect("create a node folder");
    for _ in 0..attempts {
        let port = pick();
        let log_start = log_len(dir);
        let mut child = spawn(port, dir);
        // "Address already in use" counts as taken: try another port.
        match wait_ready_with(&mut child, &probe(port), dir, log_start).await {
            Startup::Ready => return Node { child, port },
            Startup::PortTaken => reap(&mut child),
            Startup::Failed(why) => {
                reap(&mut child);
                panic!("{}", startup_failure(port, dir, &why));
            }
        }
    }
    panic!(
        "{}: {attempts} free ports in a row were taken before a node could bind them",
        dir.display()
    );
}

pub(crate) fn startup_failure(port: u16, dir: &Path, why: &str) -> String {
    format!(
        "redis-server on 127.0.0.1:{port} (in {}) did not come up: {why}\n{}",
        dir.display(),
        log_tail(dir)
    )
}

/// Subscribers of `channel` on the server behind `conn` (`PUBSUB NUMSUB`); 0 when it does not
/// answer.
pub async fn subscribers(conn: &mut MultiplexedConnection, channel: &str) -> usize {
    let counts: Vec<(String, usize)> = ::redis::cmd("PUBSUB")
        .arg("NUMSUB")
        .arg(channel)
        .query_async(conn)
        .await
        .unwrap_or_default();
    counts.first().map_or(0, |(_, n)| *n)
}

/// Drops every pub/sub connection to the server behind `conn` (`CLIENT KILL TYPE pubsub`); how
/// many. `server` names it in a failure.
pub async fn kill_pubsub_clients(conn: &mut MultiplexedConnection, server: &str) -> i64 {
    ::redis::cmd("CLIENT")
        .arg("KILL")
        .arg("TYPE")
        .arg("pubsub")
        .query_async(conn)
        .await
        .unwrap_or_else(|e| panic!("CLIENT KILL TYPE pubsub on {server}: {e}"))
}

/// Every key matching `pattern` on the server behind `conn`, sorted and deduplicated (`SCAN`,
/// which may return a key twice); `server` names it in a failure.
pub async fn scan_keys(
    conn: &mut MultiplexedConnection,
    pattern: &str,
    server: &str,
) -> Vec<String> {
    let mut keys = Vec::new();
    let mut cursor = 0_u64;
    loop {
        let (next, batch): (u64, Vec<String>) = ::redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(pattern)
            .arg("COUNT")
            .arg(1000)
            .query_async(conn)
            .await
            .unwrap_or_else(|e| panic!("SCAN {pattern} on {server}: {e}"));
        keys.extend(batch);
        if next == 0 {
            break;
        }
        cursor = next;
    }
    keys.sort();
    keys.dedup();
    keys
}
