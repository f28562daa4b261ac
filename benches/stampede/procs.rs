//! The bench's own processes — nginx and varnishd, each on free loopback ports with its files
//! in the run's tempdir, stopped on Drop (also when the bench panics) — and what it reads of the
//! machine. `redis-server` and `corral run` are the support module's fixtures
//! ([`RedisServer`](crate::support::RedisServer), [`CorralProcess`]), as in the tests.

use std::fs;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Method;

use crate::support::client::request;
use crate::support::{Client, CorralProcess, free_port, signal};

/// How long a process gets to come up.
const READY_TIMEOUT: Duration = Duration::from_secs(15);
/// How long a peer gets to stop after SIGTERM before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(3);
const POLL: Duration = Duration::from_millis(20);
/// The log filter of the bench's Corral processes: no line per request.
const CORRAL_LOG: &str = "info";

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A peer's manager process (nginx, varnishd), stopped on Drop with SIGTERM first so it takes
/// its worker children down with it, then SIGKILL.
pub struct ChildGuard {
    name: String,
    child: Child,
}

impl ChildGuard {
    pub fn new(name: &str, child: Child) -> ChildGuard {
        ChildGuard {
            name: name.to_owned(),
            child,
        }
    }

    /// The process's id.
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// An error if the process has exited.
    fn check_alive(&mut self) -> Result<(), BoxError> {
        match self.child.try_wait()? {
            Some(status) => Err(format!("{} exited early: {status}", self.name).into()),
            None => Ok(()),
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        signal::terminate_then_reap(&mut self.child, STOP_TIMEOUT);
    }
}

/// Where an executable is: on `PATH`, or in the sbin directories Debian installs daemons into
/// (not on a plain user's `PATH`).
pub fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/local/sbin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

/// Waits until every address accepts a TCP connection, or the process exits, or time runs out.
fn wait_listening(
    guard: &mut ChildGuard,
    addrs: &[SocketAddr],
    log: &Path,
) -> Result<(), BoxError> {
    let deadline = Instant::now() + READY_TIMEOUT;
    for addr in addrs {
        loop {
            if let Err(err) = guard.check_alive() {
                return Err(format!("{err}\n{}", tail(log)).into());
            }
            if TcpStream::connect_timeout(addr, Duration::from_millis(200)).is_ok() {
                break;
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "{} does not listen on {addr} after {READY_TIMEOUT:?}\n{}",
                    guard.name,
                    tail(log)
                )
                .into());
            }
            sleep(POLL);
        }
    }
    Ok(())
}

/// The last lines of a log, for an error message.
fn tail(log: &Path) -> String {
    let text = fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let from = lines.len().saturating_sub(20);
    format!(
        "--- end of {} ---\n{}",
        log.display(),
        lines[from..].join("\n")
    )
}

/// RSS and peak RSS of a process, in bytes, from /proc/PID/status.
pub fn rss(pid: u32) -> Option<(u64, u64)> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| -> Option<u64> {
        let line = status.lines().find(|l| l.starts_with(name))?;
        let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kib * 1024)
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

/// The 1, 5 and 15 minute load averages, from /proc/loadavg.
pub fn loadavg() -> String {
    fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".to_owned())
}

fn is_root() -> bool {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|euid| euid == "0"))
        })
        .unwrap_or(false)
}

/// `nproc`, the CPU model and the memory, for the report header.
pub fn machine() -> String {
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|l| l.trim_start_matches([' ', '\t', ':']).trim().to_owned())
        .unwrap_or_else(|| "unknown CPU".to_owned());
    let meminfo = fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_gib = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|l| l.split_whitespace().next()?.parse::<f64>().ok())
        .map(|kib| kib / 1024.0 / 1024.0)
        .unwrap_or(0.0);
    format!("nproc {cpus}, {model}, {mem_gib:.1} GiB memory")
}

/// Fills `@NAME@` placeholders.
pub fn fill_template(template: &str, values: &[(&str, String)]) -> String {
    let mut text = template.to_owned();
    for (name, value) in values {
        text = text.replace(&format!("@{name}@"), value);
    }
    text
}

// ---------------------------------------------------------------------------------------------

/// The Corral config every instance runs: see `benches/stampede/corral.toml`.
const CORRAL_TOML: &str = include_str!("corral.toml");

/// A `corral run` process of the bench: the support module's [`CorralProcess`] running the
/// bench's binary at `info`. Its config, and on Drop its log, are copied into the run's
/// directory, which `STAMPEDE_KEEP=1` keeps.
pub struct Corral {
    pub addr: SocketAddr,
    process: CorralProcess,
    log: PathBuf,
}

/// What differs between Corral instances.
pub struct CorralSettings<'a> {
    pub name: &'a str,
    pub redis_url: &'a str,
    pub namespace: &'a str,
    pub upstream: SocketAddr,
    pub l1_max_bytes: &'a str,
}

impl Corral {
    /// Fills the config, starts `corral --log-format json run` and waits until it listens.
    ///
    /// # Panics
    ///
    /// If the process does not come up (see [`CorralProcess::start_with`]).
    pub async fn start(bin: &Path, dir: &Path, s: &CorralSettings<'_>) -> Result<Corral, BoxError> {
        let text = fill_template(
            CORRAL_TOML,
            &[
                ("REDIS_URL", s.redis_url.to_owned()),
                ("NAMESPACE", s.namespace.to_owned()),
                ("UPSTREAM", s.upstream.to_string()),
                ("L1_MAX_BYTES", s.l1_max_bytes.to_owned()),
            ],
        );
        fs::write(dir.join(format!("{}.toml", s.name)), &text)?;
        let process = CorralProcess::start_with(bin, CORRAL_LOG, &text).await;
        Ok(Corral {
            addr: process.addr(),
            process,
            log: dir.join(format!("{}.log", s.name)),
        })
    }

    pub fn pid(&self) -> u32 {
        self.process.pid()
    }
}

impl Drop for Corral {
    fn drop(&mut self) {
        // For STAMPEDE_KEEP; a failed copy only loses the log.
        let _ = fs::write(&self.log, self.process.logs().join("\n"));
    }
}

/// A `corral run` process of the hit table: the bench's config with the access line on or off
/// (and `server.workers` when `workers` is given), listening on a port chosen here, its log
/// written to a file (as a deployment's goes to a file or journald) rather than read by the
/// bench, which would compete with it for the CPU. Its access line can be turned on and off while
/// it runs ([`LoggingCorral::set_access_log`]), through a reload, as an operator would.
pub struct LoggingCorral {
    pub addr: SocketAddr,
    admin: SocketAddr,
    config: PathBuf,
    log: PathBuf,
    /// The config's text with `@ACCESS_LOG@` where the access line's switch goes.
    template: String,
    access_log: std::cell::Cell<bool>,
    guard: ChildGuard,
}

impl LoggingCorral {
    pub fn start(
        bin: &Path,
        dir: &Path,
        name: &str,
        s: &CorralSettings<'_>,
        access_log: bool,
        workers: Option<usize>,
    ) -> Result<LoggingCorral, BoxError> {
        let workers = workers.map_or(String::new(), |n| format!("\nworkers = {n}"));
        let (port, admin_port) = (free_port(), free_port());
        let template = fill_template(
            CORRAL_TOML,
            &[
                ("REDIS_URL", s.redis_url.to_owned()),
                ("NAMESPACE", s.namespace.to_owned()),
                ("UPSTREAM", s.upstream.to_string()),
                ("L1_MAX_BYTES", s.l1_max_bytes.to_owned()),
            ],
        )
        .replace("127.0.0.1:0", &format!("127.0.0.1:{port}"))
        .replace(
            "access_log = false",
            &format!(
                "access_log = @ACCESS_LOG@{workers}\nadmin_listen = \"127.0.0.1:{admin_port}\""
            ),
        );
        let config = dir.join(format!("{name}.toml"));
        fs::write(&config, with_access_log(&template, access_log))?;
        let log = dir.join(format!("{name}.log"));
        let child = Command::new(bin)
            // The default log format (text), as the default config's row says.
            .args(["run", "--config"])
            .arg(&config)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log)?)
            .spawn()?;
        let mut guard = ChildGuard::new(name, child);
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let admin = SocketAddr::from(([127, 0, 0, 1], admin_port));
        wait_listening(&mut guard, &[addr, admin], &log)?;
        Ok(LoggingCorral {
            addr,
            admin,
            config,
            log,
            template,
            access_log: std::cell::Cell::new(access_log),
            guard,
        })
    }

    /// The process's id (its CPU time is read from `/proc`).
    pub fn pid(&self) -> u32 {
        self.guard.id()
    }

    /// The bytes its log holds so far.
    pub fn log_len(&self) -> u64 {
        fs::metadata(&self.log).map_or(0, |m| m.len())
    }

    /// Turns the access line on or off: the config file rewritten and reloaded (`POST /reload`,
    /// which answers once the new config serves). Whether it changed anything.
    pub async fn set_access_log(&self, on: bool) -> Result<bool, BoxError> {
        if self.access_log.get() == on {
            return Ok(false);
        }
        fs::write(&self.config, with_access_log(&self.template, on))?;
        let url = format!("http://{}/reload", self.admin);
        let reload = request(Method::POST, &url, &[], Bytes::new());
        let answer = Client::new().try_send(reload).await?;
        let body: serde_json::Value = serde_json::from_slice(&answer.body)?;
        let restart_needed = body["restart_needed"].as_array().map(Vec::len);
        if answer.status != 200 || restart_needed != Some(0) {
            return Err(format!(
                "turning the access line {on} by a reload: {} {}",
                answer.status,
                answer.text()
            )
            .into());
        }
        self.access_log.set(on);
        Ok(true)
    }
}

fn with_access_log(template: &str, on: bool) -> String {
    template.replace("@ACCESS_LOG@", if on { "true" } else { "false" })
}

// ---------------------------------------------------------------------------------------------

/// The nginx config: see `benches/stampede/nginx.conf`.
const NGINX_CONF: &str = include_str!("nginx.conf");

/// One nginx master (with `nproc` workers) serving three cached server blocks — three instances
/// with separate caches — and one `return 200` server block, the no-work ceiling.
pub struct Nginx {
    pub instances: Vec<SocketAddr>,
    pub ceiling: SocketAddr,
    /// A cached server block like the instances, with a buffered access log (the hit table).
    pub logged: SocketAddr,
    _guard: ChildGuard,
}

impl Nginx {
    pub fn start(
        bin: &Path,
        dir: &Path,
        upstream: SocketAddr,
        body: &str,
    ) -> Result<Nginx, BoxError> {
        let dir = dir.join("nginx");
        fs::create_dir_all(&dir)?;
        let ports = [
            free_port(),
            free_port(),
            free_port(),
            free_port(),
            free_port(),
        ];
        let user = if is_root() { "user root;" } else { "" };
        let text = fill_template(
            NGINX_CONF,
            &[
                ("DIR", dir.display().to_string()),
                ("USER", user.to_owned()),
                ("UPSTREAM", upstream.to_string()),
                ("PORT0", ports[0].to_string()),
                ("PORT1", ports[1].to_string()),
                ("PORT2", ports[2].to_string()),
                ("CEILING_PORT", ports[3].to_string()),
                ("LOGGED_PORT", ports[4].to_string()),
                ("BODY", body.to_owned()),
            ],
        );
        let config = dir.join("nginx.conf");
        fs::write(&config, text)?;
        let log = dir.join("error.log");
        let child = Command::new(bin)
            .arg("-e")
            .arg(&log)
            .arg("-p")
            .arg(&dir)
            .arg("-c")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(dir.join("stderr.log"))?)
            .spawn()?;
        let mut guard = ChildGuard::new("nginx", child);
        let addrs: Vec<SocketAddr> = ports
            .iter()
            .map(|&p| SocketAddr::from(([127, 0, 0, 1], p)))
            .collect();
        wait_listening(&mut guard, &addrs, &dir.join("stderr.log"))?;
        Ok(Nginx {
            instances: addrs[..3].to_vec(),
            ceiling: addrs[3],
            logged: addrs[4],
            _guard: guard,
        })
    }
}

// ---------------------------------------------------------------------------------------------

/// The VCL: see `benches/stampede/varnish.vcl`.
const VARNISH_VCL: &str = include_str!("varnish.vcl");

/// Three `varnishd` instances with the built-in VCL (default request coalescing).
pub struct Varnish {
    pub instances: Vec<SocketAddr>,
    _guards: Vec<ChildGuard>,
}

impl Varnish {
    pub fn start(bin: &Path, dir: &Path, upstream: SocketAddr) -> Result<Varnish, BoxError> {
        let dir = dir.join("varnish");
        fs::create_dir_all(&dir)?;
        let vcl = dir.join("bench.vcl");
        fs::write(
            &vcl,
            fill_template(
                VARNISH_VCL,
                &[
                    ("UPSTREAM_HOST", upstream.ip().to_string()),
                    ("UPSTREAM_PORT", upstream.port().to_string()),
                ],
            ),
        )?;
        let mut instances = Vec::new();
        let mut guards = Vec::new();
        for i in 0..3 {
            let port = free_port();
            let workdir = dir.join(format!("varnish{i}"));
            let log = dir.join(format!("varnish{i}.log"));
            let child = Command::new(bin)
                .arg("-F")
                .args(["-j", "none"])
                .arg("-n")
                .arg(&workdir)
                .args(["-a", &format!("127.0.0.1:{port}")])
                .args(["-T", "127.0.0.1:0"])
                .arg("-f")
                .arg(&vcl)
                .args(["-s", "malloc,512m"])
                .stdin(Stdio::null())
                .stdout(fs::File::create(&log)?)
                .stderr(fs::File::create(dir.join(format!("varnish{i}.err")))?)
                .spawn()?;
            let mut guard = ChildGuard::new(&format!("varnishd {i}"), child);
            let addr = SocketAddr::from(([127, 0, 0, 1], port));
            wait_listening(&mut guard, &[addr], &dir.join(format!("varnish{i}.err")))?;
            instances.push(addr);
            guards.push(guard);
        }
        Ok(Varnish {
            instances,
            _guards: guards,
        })
    }
}
