//! The real processes of the bench — `redis-server`, `corral run`, nginx, varnishd — each on free
//! loopback ports, with its files in the run's tempdir, stopped on Drop (also when the bench
//! panics).

use std::fs;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

/// How long a process gets to come up.
const READY_TIMEOUT: Duration = Duration::from_secs(15);
/// How long a process gets to stop after SIGTERM before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(3);
const POLL: Duration = Duration::from_millis(20);

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A child process that is stopped and reaped on Drop.
///
/// `graceful` processes (nginx, varnishd: a manager with worker children) get SIGTERM first so
/// they take their workers down with them; the rest get SIGKILL at once.
pub struct ChildGuard {
    name: String,
    child: Child,
    graceful: bool,
}

impl ChildGuard {
    pub fn new(name: &str, child: Child, graceful: bool) -> ChildGuard {
        ChildGuard {
            name: name.to_owned(),
            child,
            graceful,
        }
    }

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
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        if self.graceful {
            let _ = Command::new("kill")
                .args(["-TERM", &self.child.id().to_string()])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
            let deadline = Instant::now() + STOP_TIMEOUT;
            while Instant::now() < deadline {
                if let Ok(Some(_)) = self.child.try_wait() {
                    return;
                }
                sleep(POLL);
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A loopback port that was free a moment ago (bind port 0, read it, release it).
pub fn free_port() -> Result<u16, BoxError> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
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

/// A `redis-server` with nothing on disk, on a free loopback port.
pub struct Redis {
    pub port: u16,
    _guard: ChildGuard,
}

impl Redis {
    pub fn start(dir: &Path) -> Result<Redis, BoxError> {
        let bin = which("redis-server")
            .ok_or("redis-server not found: apt-get install redis-server (the bench needs it)")?;
        let dir = dir.join("redis");
        fs::create_dir_all(&dir)?;
        let port = free_port()?;
        let log = dir.join("redis.log");
        let child = Command::new(bin)
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(&dir)
            .arg("--logfile")
            .arg(&log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        let mut guard = ChildGuard::new("redis-server", child, false);
        wait_listening(
            &mut guard,
            &[SocketAddr::from(([127, 0, 0, 1], port))],
            &log,
        )?;
        Ok(Redis {
            port,
            _guard: guard,
        })
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }
}

// ---------------------------------------------------------------------------------------------

/// The Corral config every instance runs: see `benches/stampede/corral.toml`.
const CORRAL_TOML: &str = include_str!("corral.toml");

/// A `corral run` process.
pub struct Corral {
    pub addr: SocketAddr,
    guard: ChildGuard,
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
    /// Writes the config, starts `corral --log-format json run`, and reads the bound address
    /// from its `corral listening` log line.
    pub fn start(bin: &Path, dir: &Path, s: &CorralSettings) -> Result<Corral, BoxError> {
        let config = dir.join(format!("{}.toml", s.name));
        let text = fill_template(
            CORRAL_TOML,
            &[
                ("REDIS_URL", s.redis_url.to_owned()),
                ("NAMESPACE", s.namespace.to_owned()),
                ("UPSTREAM", s.upstream.to_string()),
                ("L1_MAX_BYTES", s.l1_max_bytes.to_owned()),
            ],
        );
        fs::write(&config, text)?;
        let log = dir.join(format!("{}.log", s.name));
        let child = Command::new(bin)
            .args(["--log-format", "json", "run", "--config"])
            .arg(&config)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log)?)
            .spawn()
            .map_err(|e| format!("spawn {}: {e}", bin.display()))?;
        let mut guard = ChildGuard::new(s.name, child, false);
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let text = fs::read_to_string(&log).unwrap_or_default();
            if let Some(addr) = listening_addr(&text) {
                return Ok(Corral { addr, guard });
            }
            if let Err(err) = guard.check_alive() {
                return Err(format!("{err}\n{}", tail(&log)).into());
            }
            if Instant::now() >= deadline {
                return Err(
                    format!("{} never logged `corral listening`\n{}", s.name, tail(&log)).into(),
                );
            }
            sleep(POLL);
        }
    }

    pub fn pid(&self) -> u32 {
        self.guard.id()
    }
}

/// The address in `{"fields":{"message":"corral listening","addr":"127.0.0.1:PORT",...}}`.
fn listening_addr(log: &str) -> Option<SocketAddr> {
    log.lines().find_map(|line| {
        let value: serde_json::Value = serde_json::from_str(line).ok()?;
        let fields = value.get("fields")?;
        if fields.get("message")?.as_str()? != "corral listening" {
            return None;
        }
        fields.get("addr")?.as_str()?.parse().ok()
    })
}

// ---------------------------------------------------------------------------------------------

/// The nginx config: see `benches/stampede/nginx.conf`.
const NGINX_CONF: &str = include_str!("nginx.conf");

/// One nginx master (with `nproc` workers) serving three cached server blocks — three instances
/// with separate caches — and one `return 200` server block, the no-work ceiling.
pub struct Nginx {
    pub instances: Vec<SocketAddr>,
    pub ceiling: SocketAddr,
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
        let ports = [free_port()?, free_port()?, free_port()?, free_port()?];
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
        let mut guard = ChildGuard::new("nginx", child, true);
        let addrs: Vec<SocketAddr> = ports
            .iter()
            .map(|&p| SocketAddr::from(([127, 0, 0, 1], p)))
            .collect();
        wait_listening(&mut guard, &addrs, &dir.join("stderr.log"))?;
        Ok(Nginx {
            instances: addrs[..3].to_vec(),
            ceiling: addrs[3],
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
            let port = free_port()?;
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
            let mut guard = ChildGuard::new(&format!("varnishd {i}"), child, true);
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
