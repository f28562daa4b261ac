//! The access line: one per request, written off the request path.
//!
//! A request records its line's fields into its thread's own bounded buffer ([`AccessLog::send`],
//! never waiting); one writer thread takes each thread's lines every few milliseconds, formats them
//! and writes them, one `write` per thread's batch (so a request never has to wake it, and no queue
//! is shared by every thread). When a thread's buffer is full (stderr is a pipe nobody reads, a
//! disk stalls) the line is dropped and counted in `corral_access_lines_dropped_total`: a slow log
//! never slows a request. Lines of one thread keep their order; lines of different threads
//! interleave by batch, so two lines a few milliseconds apart may appear out of their timestamps'
//! order.
//!
//! The `corral` binary installs the process's writer ([`install`]) in the format it logs in; the
//! lines look like the `tracing` lines around them (text or JSON, target [`ACCESS_LOG`], level
//! `INFO`, message `request`), and `RUST_LOG` still filters them (`corral::access=off`). Without
//! an installed writer (the library embedded, in-process tests) a line is a plain `tracing` event,
//! written by whatever subscriber is set. [`flush`] writes what is queued before the process exits.

use std::cell::RefCell;
use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, LazyLock, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::{Duration, SystemTime};

use http::Method;
use prometheus_client::metrics::counter::Counter;

use crate::outcome::CacheOutcome;

/// The log target of the per-request line, so `RUST_LOG` can filter it on its own
/// (`corral::access=off`).
pub const ACCESS_LOG: &str = "corral::access";

/// Bytes of recorded lines each thread holds for the writer before new ones are dropped: a few
/// thousand lines, a few tenths of a second of a saturated thread.
pub const THREAD_BYTES: usize = 512 * 1024;

/// How long the writer lets lines gather after a write: how late a line can appear.
const GATHER: Duration = Duration::from_millis(5);

/// How the lines look: as the `tracing` subscriber's own lines in the same format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LineFormat {
    /// `2026-01-02T03:04:05.678901Z  INFO corral::access: request method=GET path=/x …`
    Text,
    /// `{"timestamp":…,"level":"INFO","fields":{"message":"request",…},"target":"corral::access"}`
    Json,
}

/// One request's line, as the request left it: borrowed from the request and the answer, for
/// the moment it takes to format it (a line costs no allocation of its own).
#[derive(Debug)]
pub struct AccessLine<'a> {
    /// When it was answered: the wall clock's time since the Unix epoch.
    at: Duration,
    method: &'a Method,
    path: &'a str,
    route: &'a str,
    status: u16,
    outcome: CacheOutcome,
    micros: u64,
    /// Who asked and what went back: the query, the client, its `X-Request-Id`, the bytes sent
    /// (as the answer head knows them).
    query: Option<&'a str>,
    client: Option<std::net::SocketAddr>,
    request_id: Option<&'a str>,
    bytes: Option<u64>,
}

impl<'a> AccessLine<'a> {
    /// The line with who asked and what went back. A request id is cut to its first
    /// [`REQUEST_ID_MAX`] bytes (at a character's boundary).
    pub fn of_request(
        mut self,
        query: Option<&'a str>,
        client: std::net::SocketAddr,
        request_id: Option<&'a str>,
        bytes: Option<u64>,
    ) -> AccessLine<'a> {
        self.query = query;
        self.client = Some(client);
        self.request_id = request_id.map(|id| {
            let mut end = id.len().min(REQUEST_ID_MAX);
            while !id.is_char_boundary(end) {
                end -= 1;
            }
            &id[..end]
        });
        self.bytes = bytes;
        self
    }

    pub fn new(
        method: &'a Method,
        path: &'a str,
        route: &'a str,
        status: u16,
        outcome: CacheOutcome,
        micros: u64,
    ) -> AccessLine<'a> {
        AccessLine {
            at: SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap_or_default(),
            method,
            path,
            route,
            status,
            outcome,
            micros,
            query: None,
            client: None,
            request_id: None,
            bytes: None,
        }
    }
}

/// The longest client request id a line carries, in bytes: a client cannot make lines of any
/// length.
pub const REQUEST_ID_MAX: usize = 128;

/// What became of a line handed to [`AccessLog::send`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sent {
    Queued,
    /// This thread's lines were full (the writer is behind or blocked): dropped and counted.
    Dropped,
}

/// What [`AccessLog::flush`] achieved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flushed {
    /// Every line queued before the call is written.
    Written,
    /// The writer did not get through the lines in time (its output is blocked).
    TimedOut,
}

/// What the writer is told.
enum Signal {
    /// Lines arrived while it slept.
    Wake,
    /// Write everything before this, then say so.
    Flush(SyncSender<()>),
}

/// The lines one thread recorded ([`record`]), waiting for the writer. A thread appends under the
/// lock, which the writer takes only to swap the buffer for an empty one, never while it writes: a
/// request never waits for the output, and its line costs no allocation, no wake-up and no cache
/// line shared with the other threads (a queue shared by every thread was one).
struct Shard {
    lines: Mutex<ShardLines>,
}

struct ShardLines {
    records: Vec<u8>,
    /// The writer sleeps until told: the next line here tells it.
    wake_writer: bool,
}

/// What the writer and the threads share.
struct Shared {
    /// Tells the threads' shards of this log apart from another's (tests start several).
    id: u64,
    format: LineFormat,
    capacity: usize,
    shards: Mutex<Vec<Arc<Shard>>>,
    dropped: Counter,
}

thread_local! {
    /// This thread's shard of each log it has written to.
    static SHARDS: RefCell<Vec<(u64, Arc<Shard>)>> = const { RefCell::new(Vec::new()) };
}

/// One writer thread and the threads' shards of lines. Dropping it lets the thread write what
/// is held and end.
pub struct AccessLog {
    shared: Arc<Shared>,
    control: SyncSender<Signal>,
}

impl AccessLog {
    /// Starts the writer thread: lines in `format`, to `out`, at most `capacity` bytes of them
    /// held per thread; lines that find their thread's full are counted in `dropped`.
    pub fn start(
        format: LineFormat,
        out: Box<dyn Write + Send>,
        capacity: usize,
        dropped: Counter,
    ) -> std::io::Result<AccessLog> {
        static IDS: AtomicU64 = AtomicU64::new(0);
        let shared = Arc::new(Shared {
            id: IDS.fetch_add(1, Ordering::Relaxed),
            format,
            capacity,
            shards: Mutex::default(),
            dropped,
        });
        let (control, told) = sync_channel(64);
        let writer = shared.clone();
        std::thread::Builder::new()
            .name("corral-access".into())
            .spawn(move || write_lines(&writer, &told, out))?;
        Ok(AccessLog { shared, control })
    }

    /// Records a line into this thread's shard; never waits (the lock is the thread's own but
    /// for the writer's swap). A full shard drops it (and counts it).
    pub fn send(&self, line: &AccessLine<'_>) -> Sent {
        let shared = &self.shared;
        let (sent, wake) = SHARDS.with_borrow_mut(|shards| {
            let shard = match shards.iter().find(|(id, _)| *id == shared.id) {
                Some((_, shard)) => shard,
                None => {
                    let shard = Arc::new(Shard {
                        lines: Mutex::new(ShardLines {
                            records: Vec::new(),
                            wake_writer: true,
                        }),
                    });
                    lock(&shared.shards).push(shard.clone());
                    shards.push((shared.id, shard));
                    &shards[shards.len() - 1].1
                }
            };
            let mut lines = lock(&shard.lines);
            if lines.records.len() >= shared.capacity {
                return (Sent::Dropped, false);
            }
            record::put(&mut lines.records, line);
            (Sent::Queued, std::mem::take(&mut lines.wake_writer))
        });
        match sent {
            Sent::Dropped => {
                shared.dropped.inc();
            }
            Sent::Queued if wake => {
                // Full only when the writer has wake-ups enough already.
                let _ = self.control.try_send(Signal::Wake);
            }
            Sent::Queued => {}
        }
        sent
    }

    /// Waits, at most `limit`, until every line queued so far is written.
    pub fn flush(&self, limit: Duration) -> Flushed {
        let (done, written) = sync_channel(1);
        let deadline = std::time::Instant::now() + limit;
        // The writer's channel may be full: retry until it makes room or time runs out.
        let mut message = Signal::Flush(done);
        loop {
            match self.control.try_send(message) {
                Ok(()) => break,
                Err(TrySendError::Disconnected(_)) => return Flushed::TimedOut,
                Err(TrySendError::Full(back)) => {
                    if std::time::Instant::now() >= deadline {
                        return Flushed::TimedOut;
                    }
                    message = back;
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        }
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match written.recv_timeout(left) {
            Ok(()) => Flushed::Written,
            Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => Flushed::TimedOut,
        }
    }
}

/// A lock whose holder cannot have left its data half-written (appends and swaps of a buffer):
/// a poisoned one is used as it is.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The writer thread: every few milliseconds while lines arrive, swaps each thread's lines for an
/// empty buffer, formats them and writes them, one `write` per thread's batch; with none, it sleeps
/// until a line wakes it. Ends when the [`AccessLog`] is dropped, after writing what is held. A
/// failed write loses that batch (there is nowhere left to report it), never the thread.
fn write_lines(shared: &Shared, told: &Receiver<Signal>, mut out: Box<dyn Write + Send>) {
    let mut batch = Vec::new();
    let mut text = Vec::new();
    let mut writing = format::LineText::new(shared.format);
    let mut flushes = Vec::new();
    let mut wrote = true;
    loop {
        let heard = if wrote {
            told.recv_timeout(GATHER)
                .map_err(|e| e == RecvTimeoutError::Disconnected)
        } else {
            told.recv().map_err(|_| true)
        };
        let ended = match heard {
            Ok(Signal::Flush(done)) => {
                flushes.push(done);
                false
            }
            Ok(Signal::Wake) | Err(false) => false,
            Err(true) => true,
        };
        let shards: Vec<Arc<Shard>> = lock(&shared.shards).clone();
        wrote = false;
        for shard in &shards {
            {
                let mut lines = lock(&shard.lines);
                lines.wake_writer = false;
                if lines.records.is_empty() {
                    continue;
                }
                std::mem::swap(&mut lines.records, &mut batch);
            }
            record::each(&batch, |line| writing.line(&mut text, line));
            let _ = out.write_all(&text).and_then(|()| out.flush());
            batch.clear();
            text.clear();
            wrote = true;
        }
        for done in flushes.drain(..) {
            let _ = done.try_send(());
        }
        if ended {
            return;
        }
        if !wrote {
            // Going to sleep: the next line of any thread wakes the writer. A line that came
            // since the pass above is written now instead.
            for shard in &shards {
                let mut lines = lock(&shard.lines);
                lines.wake_writer = true;
                wrote |= !lines.records.is_empty();
            }
        }
        drop(shards);
        // A thread that ended leaves its shard to the writer alone: forgotten once written.
        lock(&shared.shards)
            .retain(|shard| Arc::strong_count(shard) > 1 || !lock(&shard.lines).records.is_empty());
    }
}

/// The counter of dropped lines of the installed writer, on every metrics page of the process.
pub fn dropped_counter() -> &'static Counter {
    static DROPPED: LazyLock<Counter> = LazyLock::new(Counter::default);
    &DROPPED
}

/// The process's writer, and whether `RUST_LOG` lets its lines through: the filter is fixed once
/// the process's subscriber is set, so it is asked once, not for every request.
struct Installed {
    log: AccessLog,
    info: bool,
}

static INSTALLED: OnceLock<Installed> = OnceLock::new();

/// Makes `format` lines to `out` (stderr, for `corral run`) the process's access log (once;
/// later calls change nothing). Called after the process's `tracing` subscriber is set: whether
/// its filter lets `corral::access` lines through at `info` is read here, once.
pub fn install(format: LineFormat, out: Box<dyn Write + Send>) -> std::io::Result<()> {
    let log = AccessLog::start(format, out, THREAD_BYTES, dropped_counter().clone())?;
    let info = tracing::enabled!(target: ACCESS_LOG, tracing::Level::INFO);
    let _ = INSTALLED.set(Installed { log, info });
    Ok(())
}

/// Whether a line at `info` would be written: the installed writer's answer, read when it was
/// installed; without one, the current subscriber's.
pub fn info_enabled() -> bool {
    match INSTALLED.get() {
        Some(installed) => installed.info,
        None => tracing::enabled!(target: ACCESS_LOG, tracing::Level::INFO),
    }
}

/// Writes what the installed writer holds, within `limit` (a process that exits calls this).
pub fn flush(limit: Duration) -> Flushed {
    match INSTALLED.get() {
        Some(installed) => installed.log.flush(limit),
        None => Flushed::Written,
    }
}

/// Logs a request's line at `info` (the access log): to the installed writer, or as a `tracing`
/// event when none is installed.
pub fn record(line: &AccessLine<'_>) {
    match INSTALLED.get() {
        Some(installed) => {
            let _ = installed.log.send(line);
        }
        None => {
            let (method, path, route) = (line.method, line.path, line.route);
            let (status, outcome, micros) = (line.status, line.outcome.as_str(), line.micros);
            tracing::info!(target: ACCESS_LOG, %method, %path, %route, status, outcome, micros, "request");
        }
    }
}

/// The same line at `debug` (with the access log off), as a `tracing` event.
pub fn record_debug(line: &AccessLine<'_>) {
    let (method, path, route) = (line.method, line.path, line.route);
    let (status, outcome, micros) = (line.status, line.outcome.as_str(), line.micros);
    tracing::debug!(target: ACCESS_LOG, %method, %path, %route, status, outcome, micros, "request");
}

mod format;
mod record;
#[cfg(test)]
mod tests;
