//! Client connections: the limits every accepted connection gets, whichever protocol the client
//! speaks (HTTP/1.1, or HTTP/2 with prior knowledge, h2c) and on both listeners.
//!
//! - **Head**: HTTP/1 heads are bounded by `max_headers` and `max_header_bytes` inside hyper,
//!   and in time by the idle watch below; an HTTP/2 header block by `max_header_bytes` (the h2
//!   `SETTINGS_MAX_HEADER_LIST_SIZE`), its field count by the proxy service (h2 has no count limit).
//! - **Idle**: a connection with no request in progress for `header_read_timeout` is closed. A
//!   request counts as in progress from its whole head until its answer's body is sent or dropped,
//!   so this bounds an HTTP/1 head that trickles in or never ends, an HTTP/2 connection that sends
//!   its preface and then nothing, and a header block that never ends (hyper's HTTP/2 server has
//!   no head timeout of its own, and h2 answers keep-alive pings by itself, so a silent client
//!   would otherwise hold the socket for ever).
//! - **Count**: the proxy listener holds at most `server.max_connections` (see [`crate::server`]).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper_util::rt::{TokioExecutor, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::time::Instant;

use crate::config::ServerConfig;

/// The header count hyper's HTTP/1 server allows when none is set.
const HYPER_MAX_HEADERS: usize = 100;

/// Most concurrent streams one HTTP/2 connection may open (hyper's default is unbounded).
const MAX_CONCURRENT_STREAMS: u32 = 256;

/// A connection builder with the server's limits on both protocols.
pub fn builder(server: &ServerConfig) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    let head_bytes = usize::try_from(server.max_header_bytes).unwrap_or(usize::MAX);
    // A head that does not arrive within `header_read_timeout` is cut by the connection's idle
    // watch ([`drive`]): no request is in progress until its head is whole. hyper's own header
    // timer would arm and cancel a timer for every request (about 4 % of a hit's instructions,
    // callgrind), so it is off.
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(None)
        // Bounds the request head in bytes (431 past it); bodies stream through in chunks.
        .max_buf_size(head_bytes);
    // hyper's own limit is the default, 100: set explicitly, it makes hyper fill two arrays of
    // that many slots for every request head (a thousand instructions a request) instead of
    // using uninitialised ones.
    if server.max_headers != HYPER_MAX_HEADERS {
        builder.http1().max_headers(server.max_headers);
    }
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(server.max_header_bytes).unwrap_or(u32::MAX))
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
        // A peer that stops answering pings is gone: close its connection.
        .keep_alive_interval(server.header_read_timeout)
        .keep_alive_timeout(server.header_read_timeout);
    builder
}

/// What one connection is doing: how many of its requests are in progress, and when the last one
/// ended. A request costs two atomic adds and a clock read: no timer and no wake-up of the idle
/// watch, which sleeps on one timer per connection and re-arms it only when it fires.
#[derive(Debug)]
pub struct Activity {
    in_flight: AtomicUsize,
    /// When the connection was opened: the origin of `last_end`.
    opened: Instant,
    /// Microseconds from `opened` to the end of the last request.
    last_end: AtomicU64,
}

impl Activity {
    pub fn new() -> Arc<Activity> {
        Arc::new(Activity {
            in_flight: AtomicUsize::new(0),
            opened: Instant::now(),
            last_end: AtomicU64::new(0),
        })
    }

    /// Marks a request in progress until the returned guard drops.
    pub fn begin(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight(self.clone())
    }

    /// Resolves once the connection has had no request in progress for `limit` in a row (or
    /// up to `limit / 8` more, when the last request was still in progress at a check).
    /// Cancel-safe: it only waits.
    pub async fn idle_for(&self, limit: Duration) {
        let mut deadline = self.quiet_since() + limit;
        loop {
            tokio::time::sleep_until(deadline).await;
            // A request in progress (however long) keeps the connection. Look again an eighth of
            // the limit later: the connection closes at most that late after the request ends.
            if self.in_flight.load(Ordering::Acquire) > 0 {
                deadline = Instant::now() + limit / 8;
                continue;
            }
            let quiet_until = self.quiet_since() + limit;
            if quiet_until <= Instant::now() {
                return;
            }
            // Requests came and went meanwhile: the limit runs from the end of the last one.
            deadline = quiet_until;
        }
    }

    /// When the last request ended (the opening, before the first).
    fn quiet_since(&self) -> Instant {
        self.opened + Duration::from_micros(self.last_end.load(Ordering::Acquire))
    }
}

/// A request in progress on its connection; dropping it ends the request.
#[derive(Debug)]
pub struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        let activity = &self.0;
        let since = Instant::now().saturating_duration_since(activity.opened);
        let micros = u64::try_from(since.as_micros()).unwrap_or(u64::MAX);
        // Before the count drops, so a watch that sees no request in progress sees this end.
        activity.last_end.fetch_max(micros, Ordering::AcqRel);
        activity.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Runs a connection until it ends, or until it has been idle for `limit`; then it is dropped,
/// which closes the socket (no request is in progress by then). `None` when closed as idle.
pub async fn drive<C: Future>(conn: C, activity: &Activity, limit: Duration) -> Option<C::Output> {
    tokio::select! {
        out = conn => Some(out),
        () = activity.idle_for(limit) => None,
    }
}

/// An answer's body that keeps its request in progress until it is sent or dropped.
#[derive(Debug)]
pub struct Tracked<B> {
    body: B,
    _in_flight: InFlight,
}

impl<B> Tracked<B> {
    pub fn new(body: B, in_flight: InFlight) -> Tracked<B> {
        Tracked {
            body,
            _in_flight: in_flight,
        }
    }
}

impl<B: Body<Data = Bytes> + Unpin> Body for Tracked<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn idle_means_no_request_in_progress_and_none_started_for_the_whole_limit() {
        let activity = Activity::new();
        let limit = Duration::from_secs(10);
        // Idle from the start: the limit elapses.
        tokio::time::timeout(limit * 2, activity.idle_for(limit))
            .await
            .expect("an unused connection is idle");

        // A request in progress for longer than the limit: not idle.
        let request = activity.begin();
        let waited = tokio::time::timeout(limit * 3, activity.idle_for(limit)).await;
        assert!(waited.is_err(), "closed while a request was in progress");

        // Once it ends, the limit runs afresh.
        let activity2 = activity.clone();
        let idle = tokio::spawn(async move { activity2.idle_for(limit).await });
        tokio::time::sleep(limit / 2).await;
        drop(request);
        tokio::time::sleep(limit / 2 + Duration::from_secs(1)).await;
        assert!(
            !idle.is_finished(),
            "the limit must restart when a request ends"
        );
        tokio::time::sleep(limit).await;
        assert!(idle.is_finished());
    }
}
