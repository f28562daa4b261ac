//! The access line: one per request, written off the request path.
//!
//! A request hands its line to a bounded queue ([`AccessLog::send`], never waiting); one writer
//! thread formats the lines and writes them in batches, one `write` per batch rather than one per
//! line, every few milliseconds (so a request never has to wake it). When the queue is full (stderr is a pipe nobody reads, a disk stalls) the line is dropped
//! and counted in `corral_access_lines_dropped_total`: a slow log never slows a request.
//!
//! The `corral` binary installs the process's writer ([`install`]) in the format it logs in; the
//! lines look like the `tracing` lines around them (text or JSON, target [`ACCESS_LOG`], level
//! `INFO`, message `request`), and `RUST_LOG` still filters them (`corral::access=off`). Without
//! an installed writer (the library embedded, in-process tests) a line is a plain `tracing` event,
//! written by whatever subscriber is set. [`flush`] writes what is queued before the process exits.

use std::io::Write;
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError, sync_channel};
use std::sync::{LazyLock, OnceLock};
use std::time::{Duration, SystemTime};

use http::Method;
use prometheus_client::metrics::counter::Counter;

use crate::outcome::CacheOutcome;

/// The log target of the per-request line, so `RUST_LOG` can filter it on its own
/// (`corral::access=off`).
pub const ACCESS_LOG: &str = "corral::access";

/// Lines the queue holds before new ones are dropped: about 2 MiB of lines, a few tenths of a
/// second of a saturated instance.
pub const QUEUE_LINES: usize = 8192;

/// How long the writer lets lines gather after a write: how late a line can appear.
const GATHER: Duration = Duration::from_millis(5);

/// Bytes of formatted lines written with one `write`.
const BATCH_BYTES: usize = 64 * 1024;

/// How the lines look: as the `tracing` subscriber's own lines in the same format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LineFormat {
    /// `2026-01-02T03:04:05.678901Z  INFO corral::access: request method=GET path=/x …`
    Text,
    /// `{"timestamp":…,"level":"INFO","fields":{"message":"request",…},"target":"corral::access"}`
    Json,
}

/// One request's line, as the request left it.
#[derive(Debug)]
pub struct AccessLine {
    at: SystemTime,
    method: Method,
    /// The path, then the route's name: one allocation for both.
    text: String,
    path_len: usize,
    status: u16,
    outcome: CacheOutcome,
    micros: u64,
    /// Who asked and what went back: the query, the client, its `X-Request-Id`, the bytes sent
    /// (as the answer head knows them).
    query: Option<String>,
    client: Option<std::net::SocketAddr>,
    request_id: Option<String>,
    bytes: Option<u64>,
}

impl AccessLine {
    /// The line with who asked and what went back.
    pub fn of_request(
        mut self,
        query: Option<String>,
        client: std::net::SocketAddr,
        request_id: Option<String>,
        bytes: Option<u64>,
    ) -> AccessLine {
        self.query = query;
        self.client = Some(client);
        self.request_id = request_id;
        self.bytes = bytes;
        self
    }

    /// `path` is taken as it is and `route` appended to it: a path given as a `String` with room
    /// for the route costs no allocation here.
    pub fn new(
        method: Method,
        path: impl Into<String>,
        route: &str,
        status: u16,
        outcome: CacheOutcome,
        micros: u64,
    ) -> AccessLine {
        let mut text = path.into();
        let path_len = text.len();
        text.push_str(route);
        AccessLine {
            at: SystemTime::now(),
            method,
            text,
            path_len,
            status,
            outcome,
            micros,
            query: None,
            client: None,
            request_id: None,
            bytes: None,
        }
    }

    fn path(&self) -> &str {
        &self.text[..self.path_len]
    }

    fn route(&self) -> &str {
        &self.text[self.path_len..]
    }
}

/// A request's path, owned with room after it for its route's name, which [`AccessLine::new`]
/// appends without allocating again.
pub fn path_with_room(path: &str) -> String {
    const ROUTE_NAME_ROOM: usize = 32;
    let mut owned = String::with_capacity(path.len() + ROUTE_NAME_ROOM);
    owned.push_str(path);
    owned
}

/// What became of a line handed to [`AccessLog::send`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sent {
    Queued,
    /// The queue was full (or the writer gone): the line is dropped and counted.
    Dropped,
}

/// What [`AccessLog::flush`] achieved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flushed {
    /// Every line queued before the call is written.
    Written,
    /// The writer did not get through the queue in time (its output is blocked).
    TimedOut,
}

enum Message {
    Line(AccessLine),
    /// Write everything before this, then say so.
    Flush(SyncSender<()>),
}

/// The queue to one writer thread. Dropping it lets the thread write what is queued and end.
pub struct AccessLog {
    queue: SyncSender<Message>,
    dropped: Counter,
}

impl AccessLog {
    /// Starts the writer thread: lines in `format`, to `out`, at most `capacity` queued; lines
    /// that find the queue full are counted in `dropped`.
    pub fn start(
        format: LineFormat,
        out: Box<dyn Write + Send>,
        capacity: usize,
        dropped: Counter,
    ) -> std::io::Result<AccessLog> {
        let (queue, lines) = sync_channel(capacity);
        std::thread::Builder::new()
            .name("corral-access".into())
            .spawn(move || write_lines(&lines, format, out))?;
        Ok(AccessLog { queue, dropped })
    }

    /// Queues a line; never waits. A full queue drops it (and counts it).
    pub fn send(&self, line: AccessLine) -> Sent {
        match self.queue.try_send(Message::Line(line)) {
            Ok(()) => Sent::Queued,
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.dropped.inc();
                Sent::Dropped
            }
        }
    }

    /// Waits, at most `limit`, until every line queued so far is written.
    pub fn flush(&self, limit: Duration) -> Flushed {
        let (done, written) = sync_channel(1);
        let deadline = std::time::Instant::now() + limit;
        // The queue may be full: retry until the writer makes room or time runs out.
        let mut message = Message::Flush(done);
        loop {
            match self.queue.try_send(message) {
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

/// The writer thread: takes what is queued, formats it into one buffer, writes the buffer. Ends
/// when the [`AccessLog`] is dropped. A failed write loses that batch (there is nowhere left to
/// report it), never the thread.
fn write_lines(lines: &Receiver<Message>, format: LineFormat, mut out: Box<dyn Write + Send>) {
    let mut batch = Vec::with_capacity(BATCH_BYTES);
    let mut flushes = Vec::new();
    while let Ok(first) = lines.recv() {
        let mut next = Some(first);
        while let Some(message) = next {
            match message {
                Message::Line(line) => format_line(&mut batch, format, &line),
                Message::Flush(done) => flushes.push(done),
            }
            if batch.len() >= BATCH_BYTES {
                break;
            }
            next = lines.try_recv().ok();
        }
        let _ = out.write_all(&batch).and_then(|()| out.flush());
        let full = batch.len() >= BATCH_BYTES;
        batch.clear();
        for done in flushes.drain(..) {
            let _ = done.try_send(());
        }
        // Let lines gather rather than wake for each: while this thread sleeps here (not parked
        // on the queue), a request queueing a line has nobody to wake, so it makes no syscall.
        if !full {
            std::thread::sleep(GATHER);
        }
    }
}

/// The counter of dropped lines of the installed writer, on every metrics page of the process.
pub fn dropped_counter() -> &'static Counter {
    static DROPPED: LazyLock<Counter> = LazyLock::new(Counter::default);
    &DROPPED
}

static INSTALLED: OnceLock<AccessLog> = OnceLock::new();

/// Makes `format` lines to `out` (stderr, for `corral run`) the process's access log (once;
/// later calls change nothing).
pub fn install(format: LineFormat, out: Box<dyn Write + Send>) -> std::io::Result<()> {
    let log = AccessLog::start(format, out, QUEUE_LINES, dropped_counter().clone())?;
    let _ = INSTALLED.set(log);
    Ok(())
}

/// Writes what the installed writer holds, within `limit` (a process that exits calls this).
pub fn flush(limit: Duration) -> Flushed {
    match INSTALLED.get() {
        Some(log) => log.flush(limit),
        None => Flushed::Written,
    }
}

/// Logs a request's line at `info` (the access log): to the installed writer, or as a `tracing`
/// event when none is installed.
pub fn record(line: AccessLine) {
    match INSTALLED.get() {
        Some(log) => {
            let _ = log.send(line);
        }
        None => {
            let (method, path, route) = (&line.method, &line.path(), line.route());
            let (status, outcome, micros) = (line.status, line.outcome.as_str(), line.micros);
            tracing::info!(target: ACCESS_LOG, %method, %path, %route, status, outcome, micros, "request");
        }
    }
}

/// The same line at `debug` (with the access log off), as a `tracing` event.
pub fn record_debug(line: AccessLine) {
    let (method, path, route) = (&line.method, &line.path(), line.route());
    let (status, outcome, micros) = (line.status, line.outcome.as_str(), line.micros);
    tracing::debug!(target: ACCESS_LOG, %method, %path, %route, status, outcome, micros, "request");
}

/// Formats one line into `buf`, without `core::fmt` (measured: its machinery was most of the
/// writer's cost per line).
fn format_line(buf: &mut Vec<u8>, format: LineFormat, line: &AccessLine) {
    match format {
        LineFormat::Text => {
            timestamp(buf, line.at);
            buf.extend_from_slice(b"  INFO ");
            buf.extend_from_slice(ACCESS_LOG.as_bytes());
            buf.extend_from_slice(b": request method=");
            buf.extend_from_slice(line.method.as_str().as_bytes());
            buf.extend_from_slice(b" path=");
            buf.extend_from_slice(line.path().as_bytes());
            if let Some(query) = &line.query {
                buf.extend_from_slice(b" query=\"");
                buf.extend_from_slice(query.as_bytes());
                buf.push(b'"');
            }
            if let Some(client) = &line.client {
                buf.extend_from_slice(b" client=");
                socket_addr(buf, client);
            }
            if let Some(id) = &line.request_id {
                buf.extend_from_slice(b" request_id=\"");
                buf.extend_from_slice(id.as_bytes());
                buf.push(b'"');
            }
            buf.extend_from_slice(b" route=");
            buf.extend_from_slice(line.route().as_bytes());
            buf.extend_from_slice(b" status=");
            decimal(buf, u64::from(line.status));
            buf.extend_from_slice(b" outcome=\"");
            buf.extend_from_slice(line.outcome.as_str().as_bytes());
            buf.push(b'"');
            if let Some(bytes) = line.bytes {
                buf.extend_from_slice(b" bytes=");
                decimal(buf, bytes);
            }
            buf.extend_from_slice(b" micros=");
            decimal(buf, line.micros);
            buf.push(b'\n');
        }
        LineFormat::Json => {
            buf.extend_from_slice(b"{\"timestamp\":\"");
            timestamp(buf, line.at);
            buf.extend_from_slice(
                b"\",\"level\":\"INFO\",\"fields\":{\"message\":\"request\",\"method\":",
            );
            json_string(buf, line.method.as_str());
            buf.extend_from_slice(b",\"path\":");
            json_string(buf, line.path());
            if let Some(query) = &line.query {
                buf.extend_from_slice(b",\"query\":");
                json_string(buf, query);
            }
            if let Some(client) = &line.client {
                // An address has nothing a JSON string must escape.
                buf.extend_from_slice(b",\"client\":\"");
                socket_addr(buf, client);
                buf.push(b'"');
            }
            if let Some(id) = &line.request_id {
                buf.extend_from_slice(b",\"request_id\":");
                json_string(buf, id);
            }
            buf.extend_from_slice(b",\"route\":");
            json_string(buf, line.route());
            buf.extend_from_slice(b",\"status\":");
            decimal(buf, u64::from(line.status));
            buf.extend_from_slice(b",\"outcome\":\"");
            buf.extend_from_slice(line.outcome.as_str().as_bytes());
            buf.push(b'"');
            if let Some(bytes) = line.bytes {
                buf.extend_from_slice(b",\"bytes\":");
                decimal(buf, bytes);
            }
            buf.extend_from_slice(b",\"micros\":");
            decimal(buf, line.micros);
            buf.extend_from_slice(b"},\"target\":\"");
            buf.extend_from_slice(ACCESS_LOG.as_bytes());
            buf.extend_from_slice(b"\"}\n");
        }
    }
}

/// A client's address as `Display` writes it (`1.2.3.4:5`, `[::1]:5`); an IPv4 one without
/// `core::fmt` (measured: formatting it was a third of the writer's cost per line).
fn socket_addr(buf: &mut Vec<u8>, addr: &std::net::SocketAddr) {
    match addr {
        std::net::SocketAddr::V4(v4) => {
            for (i, octet) in v4.ip().octets().into_iter().enumerate() {
                if i > 0 {
                    buf.push(b'.');
                }
                decimal(buf, u64::from(octet));
            }
            buf.push(b':');
            decimal(buf, u64::from(v4.port()));
        }
        std::net::SocketAddr::V6(_) => {
            let _ = write!(buf, "{addr}");
        }
    }
}

/// `n` in decimal; up to three digits by a fixed-size copy (a run-time length calls `memcpy`).
fn decimal(buf: &mut Vec<u8>, mut n: u64) {
    let digit = |n: u64| b'0' + (n % 10) as u8;
    match n {
        0..=9 => return buf.push(digit(n)),
        10..=99 => return buf.extend_from_slice(&[digit(n / 10), digit(n)]),
        100..=999 => return buf.extend_from_slice(&[digit(n / 100), digit(n / 10), digit(n)]),
        _ => {}
    }
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    buf.extend_from_slice(&digits[at..]);
}

/// `n` in decimal, zero-padded to `width` digits (`n` has no more).
fn padded(buf: &mut Vec<u8>, n: u64, width: usize) {
    let mut digits = [b'0'; 20];
    let mut rest = n;
    for at in (0..width).rev() {
        digits[at] = b'0' + (rest % 10) as u8;
        rest /= 10;
    }
    buf.extend_from_slice(&digits[..width]);
}

/// A JSON string literal: quotes, backslashes and control characters escaped.
fn json_string(buf: &mut Vec<u8>, s: &str) {
    buf.push(b'"');
    for c in s.chars() {
        match c {
            '"' => buf.extend_from_slice(b"\\\""),
            '\\' => buf.extend_from_slice(b"\\\\"),
            c if (c as u32) < 0x20 => {
                let _ = write!(buf, "\\u{:04x}", c as u32);
            }
            c => {
                let mut utf8 = [0; 4];
                buf.extend_from_slice(c.encode_utf8(&mut utf8).as_bytes());
            }
        }
    }
    buf.push(b'"');
}

/// RFC 3339 in UTC with microseconds, as `tracing-subscriber` writes it:
/// `2026-01-02T03:04:05.678901Z`.
fn timestamp(buf: &mut Vec<u8>, at: SystemTime) {
    let since = at
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    let secs = since.as_secs();
    // The writer formats thousands of lines within one second: their date and time up to the
    // second are written once (`YYYY-MM-DDTHH:MM:SS`, 19 bytes) and copied after.
    thread_local! {
        static SECOND: std::cell::Cell<(u64, [u8; 19])> = const { std::cell::Cell::new((u64::MAX, [0; 19])) };
    }
    let (cached, text) = SECOND.get();
    if cached == secs {
        buf.extend_from_slice(&text);
    } else {
        let start = buf.len();
        let (days, of_day) = (secs / 86_400, secs % 86_400);
        let (year, month, day) = civil(days);
        padded(buf, year, 4);
        buf.push(b'-');
        padded(buf, month, 2);
        buf.push(b'-');
        padded(buf, day, 2);
        buf.push(b'T');
        padded(buf, of_day / 3600, 2);
        buf.push(b':');
        padded(buf, of_day / 60 % 60, 2);
        buf.push(b':');
        padded(buf, of_day % 60, 2);
        if let Ok(text) = <[u8; 19]>::try_from(&buf[start..]) {
            SECOND.set((secs, text));
        }
    }
    buf.push(b'.');
    padded(buf, u64::from(since.subsec_micros()), 6);
    buf.push(b'Z');
}

/// The proleptic Gregorian date of a day count since 1970-01-01 (Howard Hinnant's
/// `civil_from_days`, for days ≥ 0).
fn civil(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests;
