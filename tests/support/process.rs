//! A real `corral run` OS process, for fault tests that need what an in-process
//! [`corral::Instance`] cannot give: SIGKILL of a fill leader mid-fill, SIGSTOP of one that holds
//! a lock, SIGTERM for graceful shutdown.
//!
//! The config is written to a private tempdir (removed with the fixture) and the process logs JSON
//! at `corral=debug` to a piped stderr. A background thread drains that pipe for the whole life of
//! the process, so a chatty process never blocks on a full pipe, and keeps every line for
//! [`CorralProcess::logs`] and [`CorralProcess::wait_for_log`]. The listening address is read
//! from the `corral listening` line, so configs should say `listen = "127.0.0.1:0"`.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStderr, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use tempfile::TempDir;
use tokio::time::{Instant, sleep};

use super::signal::{self, reap};

/// How long a freshly spawned process gets to log `corral listening`.
const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// How often startup, exit and log lines are polled.
const POLL: Duration = Duration::from_millis(20);
/// How long SIGSTOP gets to stop every thread.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);
/// How often thread states are polled after SIGSTOP; short, as stopping takes microseconds.
const STOP_POLL: Duration = Duration::from_millis(1);
/// How long an exited process's last log lines get to arrive through the pipe.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(1);
/// The log filter [`CorralProcess::start`] runs the process with.
const RUST_LOG: &str = "corral=debug,info";
/// The message Corral logs once its listener is bound.
const LISTENING: &str = "corral listening";
/// The message Corral logs once its admin listener is bound.
const ADMIN_LISTENING: &str = "admin listening";
/// The config file's name in the fixture's tempdir.
const CONFIG_FILE: &str = "corral.toml";

/// A `corral run` child process listening on [`CorralProcess::addr`].
///
/// Dropping it kills the process (even a stopped one), reaps it and removes its tempdir.
pub struct CorralProcess {
    child: Child,
    addr: SocketAddr,
    log: Arc<Mutex<Vec<String>>>,
    /// The thread draining stderr; finished once the pipe is closed.
    reader: JoinHandle<()>,
    /// Holds `corral.toml`; kept alive for the life of the process.
    dir: TempDir,
}

impl CorralProcess {
    /// Writes `config_toml` to a file, runs `corral --log-format json run --config <file>` and
    /// waits until it logs `corral listening`, taking the address from that line.
    ///
    /// # Panics
    ///
    /// If the tempdir or config file cannot be written, the binary cannot be spawned, the process
    /// exits before listening (a config error, say), or it does not listen within 10 s. The
    /// panic quotes everything the process logged.
    pub async fn start(config_toml: &str) -> CorralProcess {
        CorralProcess::start_with(
            Path::new(env!("CARGO_BIN_EXE_corral")),
            RUST_LOG,
            config_toml,
        )
        .await
    }

    /// Like [`CorralProcess::start`], running the binary `bin` with `RUST_LOG=rust_log`: the
    /// stampede bench runs its release build (or `CORRAL_BIN`) at `info`, where a debug line per
    /// request would slow the system it measures.
    ///
    /// # Panics
    ///
    /// As [`CorralProcess::start`].
    pub async fn start_with(bin: &Path, rust_log: &str, config_toml: &str) -> CorralProcess {
        let dir = tempfile::Builder::new()
            .prefix("corral-process-")
            .tempdir()
            .expect("create a tempdir for corral");
        let config = dir.path().join(CONFIG_FILE);
        std::fs::write(&config, config_toml)
            .unwrap_or_else(|e| panic!("write {}: {e}", config.display()));
        let mut child = Command::new(bin)
            .args(["--log-format", "json", "run", "--config"])
            .arg(&config)
            .env("RUST_LOG", rust_log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", bin.display()));
        let stderr = child
            .stderr
            .take()
            .expect("stderr was piped, so the child has a handle");
        let log = Arc::new(Mutex::new(Vec::new()));
        let reader = drain(stderr, Arc::clone(&log));
        let mut process = CorralProcess {
            child,
            // A placeholder until the log names the address. The fixture exists before it is
            // ready so that a panic while waiting drops it, which kills the process.
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            log,
            reader,
            dir,
        };
        process.addr = process.wait_listening(config_toml).await;
        process
    }

    /// The address the process listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The proxy URL for a path, `http://<addr><path_and_query>`.
    pub fn url(&self, path_and_query: &str) -> String {
        format!("http://{}{path_and_query}", self.addr)
    }

    /// The config file the process was started with. A test may rewrite it, then ask for a
    /// reload (SIGHUP or the admin `POST /reload`).
    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join(CONFIG_FILE)
    }

    /// The admin listener's address, from the `admin listening` line (logged before
    /// `corral listening`, so it is there once [`CorralProcess::start`] returned).
    ///
    /// # Panics
    ///
    /// If the config has no `server.admin_listen`: the line was never logged.
    pub fn admin_addr(&self) -> SocketAddr {
        // A statement of its own, so the log's lock is released before the panic quotes the log.
        let addr = self
            .lock_log()
            .iter()
            .find_map(|line| logged_addr(line, ADMIN_LISTENING));
        addr.unwrap_or_else(|| {
            panic!(
                "corral (pid {}) logged no {ADMIN_LISTENING:?} line: is server.admin_listen set?\n{}",
                self.pid(),
                self.log_text()
            )
        })
    }

    /// The admin URL for a path, `http://<admin addr><path>`.
    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.admin_addr())
    }

    /// The OS process id; it may be reused once the process was reaped.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Kills the process with SIGKILL and reaps it: no shutdown runs, connections see a reset.
    /// Does nothing if it already exited. Waits (briefly) for its last log lines.
    pub fn kill(&mut self) {
        reap(&mut self.child);
        self.finish_reading_blocking();
    }

    /// Freezes the process with SIGSTOP: its sockets stay open and the kernel still accepts
    /// connections, but nothing is answered until [`CorralProcess::cont`].
    ///
    /// Returns only once every thread of the process is stopped: `kill` returns as soon as the
    /// signal is queued, and a thread that is running at that moment could otherwise still
    /// answer a request sent right after.
    ///
    /// # Panics
    ///
    /// If the process already exited, or its threads are not all stopped within 5 s.
    pub fn stop(&mut self) {
        signal::send(&mut self.child, "corral", "STOP");
        let deadline = std::time::Instant::now() + STOP_TIMEOUT;
        while !all_threads_stopped(self.pid()) {
            assert!(
                std::time::Instant::now() < deadline,
                "corral (pid {}): threads still running {STOP_TIMEOUT:?} after SIGSTOP",
                self.pid()
            );
            std::thread::sleep(STOP_POLL);
        }
    }

    /// Resumes a process frozen by [`CorralProcess::stop`] (SIGCONT).
    ///
    /// # Panics
    ///
    /// If the process already exited.
    pub fn cont(&mut self) {
        signal::send(&mut self.child, "corral", "CONT");
    }

    /// Asks for a graceful shutdown with SIGTERM; pair it with [`CorralProcess::wait_exit`].
    ///
    /// # Panics
    ///
    /// If the process already exited.
    pub fn terminate(&mut self) {
        signal::send(&mut self.child, "corral", "TERM");
    }

    /// Polls every 20 ms until the process exits and returns its status, or `None` if it is
    /// still running after `timeout`. Once it has exited, its remaining log lines are read
    /// (bounded by 1 s) before returning, so [`CorralProcess::logs`] is complete.
    ///
    /// Cancelling it leaves the process as it was.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.exited() {
                let drained = Instant::now() + DRAIN_TIMEOUT;
                while !self.reader.is_finished() && Instant::now() < drained {
                    sleep(POLL).await;
                }
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            sleep(POLL).await;
        }
    }

    /// Every stderr line so far, in order.
    pub fn logs(&self) -> Vec<String> {
        self.lock_log().clone()
    }

    /// Polls the log until a line contains `needle` and returns the first such line (which may
    /// have been logged before the call).
    ///
    /// # Panics
    ///
    /// After `timeout`, with the log so far.
    pub async fn wait_for_log(&self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(line) = self.lock_log().iter().find(|line| line.contains(needle)) {
                return line.clone();
            }
            if Instant::now() >= deadline {
                panic!(
                    "corral (pid {}): no log line containing {needle:?} within {timeout:?}\n{}",
                    self.pid(),
                    self.log_text()
                );
            }
            sleep(POLL).await;
        }
    }

    /// Waits for the `corral listening` line and returns the address it names.
    async fn wait_listening(&mut self, config_toml: &str) -> SocketAddr {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(addr) = self
                .lock_log()
                .iter()
                .find_map(|line| logged_addr(line, LISTENING))
            {
                return addr;
            }
            if let Some(status) = self.exited() {
                self.wait_exit(Duration::ZERO).await;
                panic!(
                    "corral exited with {status} before listening\n--- config ---\n{config_toml}\n\
                     --- log ---\n{}",
                    self.log_text()
                );
            }
            if Instant::now() >= deadline {
                panic!(
                    "corral (pid {}) did not log {LISTENING:?} within {READY_TIMEOUT:?}\n\
                     --- config ---\n{config_toml}\n--- log ---\n{}",
                    self.pid(),
                    self.log_text()
                );
            }
            sleep(POLL).await;
        }
    }

    /// The exit status, if the process has exited (reaping it).
    fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// After the process exited: gives the reader up to 1 s to reach the end of the pipe.
    fn finish_reading_blocking(&self) {
        let deadline = std::time::Instant::now() + DRAIN_TIMEOUT;
        while !self.reader.is_finished() && std::time::Instant::now() < deadline {
            std::thread::sleep(POLL);
        }
    }

    fn lock_log(&self) -> MutexGuard<'_, Vec<String>> {
        // A panic elsewhere must not hide the log from the message that reports it.
        self.log.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn log_text(&self) -> String {
        self.lock_log().join("\n")
    }
}

impl Drop for CorralProcess {
    fn drop(&mut self) {
        // SIGKILL works on a stopped process too. The reader thread is not joined: it ends by
        // itself when the pipe closes, and nothing reads the log after this.
        reap(&mut self.child);
    }
}

/// Reads stderr line by line into `log` until the pipe closes, on a thread of its own.
///
/// A std thread rather than a tokio task: it must keep draining even while the test's runtime
/// is blocked or shutting down, or the process would stall on a full pipe.
fn drain(stderr: ChildStderr, log: Arc<Mutex<Vec<String>>>) -> JoinHandle<()> {
    std::thread::Builder::new()
        .name("corral-stderr".to_owned())
        .spawn(move || {
            let mut stderr = BufReader::new(stderr);
            let mut line = Vec::new();
            loop {
                line.clear();
                match stderr.read_until(b'\n', &mut line) {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {
                        let text = String::from_utf8_lossy(&line);
                        let text = text.trim_end_matches(['\n', '\r']).to_owned();
                        log.lock().unwrap_or_else(|e| e.into_inner()).push(text);
                    }
                }
            }
        })
        .expect("spawn the thread that drains corral's stderr")
}

/// The `fields.addr` of a JSON line whose message is `message`; `None` for any other line.
fn logged_addr(line: &str, message: &str) -> Option<SocketAddr> {
    let value: serde_json::Value = serde_json::from_str(line).ok()?;
    let fields = value.get("fields")?;
    if fields.get("message")?.as_str()? != message {
        return None;
    }
    fields.get("addr")?.as_str()?.parse().ok()
}

/// Whether every thread of `pid` is stopped, from `/proc/<pid>/task/*/stat` (Linux).
///
/// A thread's state is the first field after its parenthesised name, which may itself contain
/// spaces or parentheses; `T` is stopped, `t` stopped by a tracer, `Z`/`X` already exiting.
fn all_threads_stopped(pid: u32) -> bool {
    let tasks = format!("/proc/{pid}/task");
    let threads =
        std::fs::read_dir(&tasks).unwrap_or_else(|e| panic!("read {tasks} (Linux only): {e}"));
    threads.flatten().all(|thread| {
        // A thread that vanished between listing and reading has exited: it answers nothing.
        let Ok(stat) = std::fs::read_to_string(thread.path().join("stat")) else {
            return true;
        };
        let state = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next());
        matches!(state, Some("T" | "t" | "Z" | "X"))
    })
}
