//! A relay: one fill's answer body, read by every requester of the flight while it arrives.
//!
//! The fill (one writer) pushes the upstream's chunks as they come; each requester of the key's
//! flight (leader and followers) reads them through its own [`RelayReader`], which is its
//! response body. The relay ends with how the body ended: [`End::Complete`] only when the
//! upstream's body arrived whole, else [`End::Aborted`] — a reader that sees an abort fails its
//! own response (the chunked encoding is cut, an HTTP/2 stream reset), so a truncated answer
//! never looks complete.
//!
//! # Memory
//! While the body fits the route's `max_entry_size` the relay keeps all of it: the fill stores
//! it once complete, and a requester that joins late reads it from byte 0. Past that limit the
//! body can no longer be stored and the relay keeps only a window (`window` bytes): memory grows
//! with open relays, never with body size. The writer waits only for *active* readers (those
//! that read within [`ACTIVE`]): readers that keep reading all get the whole body, and one that
//! stopped reading (its client gone quiet, its socket full) holds nobody — the window passes it
//! and it is cut (counted), however far it got first. One
//! that joins once byte 0 is gone cannot read it ([`Relay::reader`] says `None`) and fetches for
//! itself. With no reader left, an answer that cannot be stored is not worth reading on
//! ([`Push::Unread`]).

use std::collections::{HashMap, VecDeque};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};
use tokio::sync::Notify;
use tokio::time::{Duration, Instant};

/// How long a relay nobody has attached to yet waits for its first reader (the requesters it was
/// handed to attach as their answers start).
pub const ATTACH_GRACE: Duration = Duration::from_secs(1);

/// A reader that read within this long counts as active: the writer may wait for it.
pub const ACTIVE: Duration = Duration::from_millis(500);

/// How a relayed body ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum End {
    /// Every byte the upstream sent arrived, and the upstream said so.
    Complete,
    /// Cut short: the upstream failed, timed out or was abandoned. Readers abort.
    Aborted(Arc<str>),
}

impl End {
    /// The end's name, the `outcome` label of the stream metrics.
    pub fn as_str(&self) -> &'static str {
        match self {
            End::Complete => "complete",
            End::Aborted(_) => "aborted",
        }
    }
}

/// Why a reader's body failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RelayError {
    #[error("the upstream answer was cut short: {0}")]
    Aborted(Arc<str>),
    #[error("this reader stopped reading and fell behind the relay's window")]
    TooSlow,
}

/// What a push did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Push {
    /// Kept; readers were woken.
    Kept,
    /// The body cannot be stored and nobody reads it any more: stop reading the upstream.
    Unread,
}

/// One fill's body, shared by the flight's readers. See the module doc.
#[derive(Debug)]
pub struct Relay {
    state: Mutex<State>,
    /// Wakes a writer waiting for the active readers to make room.
    room: Notify,
    /// Wakes those waiting for the end ([`Relay::ended`]).
    ended: Notify,
    created: Instant,
    /// Readers cut for being too slow, over this relay's life.
    cut: AtomicU64,
    /// Where cuts are counted as they happen, too (a metric of the route).
    cut_counter: std::sync::OnceLock<prometheus_client::metrics::counter::Counter>,
}

#[derive(Debug)]
struct State {
    /// Chunks kept, `chunks[0]` being chunk number `first`.
    chunks: VecDeque<Bytes>,
    first: u64,
    kept_bytes: usize,
    /// Bytes pushed in all.
    total: u64,
    /// Until the body passes `store_limit` the relay keeps all of it.
    whole: bool,
    store_limit: usize,
    window: usize,
    /// Each attached reader's next chunk, and when it last read.
    positions: HashMap<u64, (u64, Instant)>,
    readers: usize,
    next_reader: u64,
    wakers: HashMap<u64, Waker>,
    end: Option<End>,
}

impl Relay {
    /// A relay that keeps bodies up to `store_limit` bytes whole, and past that `window` bytes.
    pub fn new(store_limit: u64, window: usize) -> Arc<Relay> {
        Arc::new(Relay {
            state: Mutex::new(State {
                chunks: VecDeque::new(),
                first: 0,
                kept_bytes: 0,
                total: 0,
                whole: true,
                store_limit: usize::try_from(store_limit).unwrap_or(usize::MAX),
                window: window.max(1),
                positions: HashMap::new(),
                readers: 0,
                next_reader: 0,
                wakers: HashMap::new(),
                end: None,
            }),
            room: Notify::new(),
            ended: Notify::new(),
            created: Instant::now(),
            cut: AtomicU64::new(0),
            cut_counter: std::sync::OnceLock::new(),
        })
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock leaves plain counters and chunks: still usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Appends a chunk and wakes the readers. Past the store limit, waits while an active
    /// reader has not read what would be dropped (cancel safe: the chunk is kept either way).
    pub async fn push(&self, chunk: Bytes) -> Push {
        if chunk.is_empty() {
            return Push::Kept;
        }
        {
            let mut state = self.state();
            state.total += chunk.len() as u64;
            state.kept_bytes += chunk.len();
            state.chunks.push_back(chunk);
            if state.whole && state.kept_bytes > state.store_limit {
                state.whole = false;
            }
            wake_all(&mut state);
        }
        loop {
            let room = self.room.notified();
            tokio::pin!(room);
            room.as_mut().enable();
            {
                let mut state = self.state();
                if state.whole {
                    return Push::Kept;
                }
                // Nobody reads it: those who were handed the relay have all gone, or nobody
                // came for it in the time a requester needs to attach.
                if state.readers == 0
                    && (state.next_reader > 0 || self.created.elapsed() > ATTACH_GRACE)
                {
                    return Push::Unread;
                }
                // Drop, down to the window, what no active reader still needs: a reader that has
                // stopped reading does not hold the fill, and is cut once the window passes it.
                // Before its first reader has come, nothing may go.
                let needed = match state.next_reader {
                    0 => 0,
                    _ => state.slowest_active(Instant::now()).unwrap_or(u64::MAX),
                };
                while state.kept_bytes > state.window && state.first < needed {
                    if let Some(front) = state.chunks.pop_front() {
                        state.kept_bytes -= front.len();
                        state.first += 1;
                    }
                }
                if state.kept_bytes <= state.window || state.chunks.len() <= 1 {
                    wake_all(&mut state);
                    return Push::Kept;
                }
            }
            // Nobody active may have read the front yet: wait for a reader to read, and look
            // again once a stalled reader stops counting as active.
            let _ = tokio::time::timeout(ACTIVE, room).await;
        }
    }

    /// Ends the relay; readers end as it says. Only the first end counts.
    pub fn finish(&self, end: End) {
        let mut state = self.state();
        if state.end.is_none() {
            state.end = Some(end);
        }
        wake_all(&mut state);
        drop(state);
        self.ended.notify_waiters();
    }

    /// Resolves with how the relay ended, once it has. Cancel safe.
    pub async fn ended(&self) -> End {
        loop {
            let ended = self.ended.notified();
            tokio::pin!(ended);
            ended.as_mut().enable();
            if let Some(end) = self.end() {
                return end;
            }
            ended.await;
        }
    }

    /// How the relay ended, if it has.
    pub fn end(&self) -> Option<End> {
        self.state().end.clone()
    }

    /// The whole body, if the relay ended complete and kept all of it.
    pub fn whole_body(&self) -> Option<Bytes> {
        if self.end() != Some(End::Complete) {
            return None;
        }
        self.kept_body()
    }

    /// All of the body pushed so far, if the relay still keeps all of it (under the store limit).
    pub fn kept_body(&self) -> Option<Bytes> {
        let state = self.state();
        if !state.whole || state.first != 0 {
            return None;
        }
        Some(concat(&state.chunks, state.kept_bytes))
    }

    /// All of the body pushed so far followed by `last`, if that still fits the store limit.
    pub fn kept_body_with(&self, last: &Bytes) -> Option<Bytes> {
        let state = self.state();
        if !state.whole || state.first != 0 || state.kept_bytes + last.len() > state.store_limit {
            return None;
        }
        let mut body = BytesMut::with_capacity(state.kept_bytes + last.len());
        for chunk in &state.chunks {
            body.extend_from_slice(chunk);
        }
        body.extend_from_slice(last);
        Some(body.freeze())
    }

    /// Whether the body has outgrown the store limit.
    pub fn oversized(&self) -> bool {
        !self.state().whole
    }

    /// Bytes pushed so far.
    pub fn total_bytes(&self) -> u64 {
        self.state().total
    }

    /// Counts every reader cut from now on in `counter` as well, when it is cut.
    pub fn count_cuts_in(&self, counter: prometheus_client::metrics::counter::Counter) {
        let _ = self.cut_counter.set(counter);
    }

    /// Readers cut for falling behind, so far.
    pub fn readers_cut(&self) -> u64 {
        self.cut.load(Ordering::Relaxed)
    }

    /// Readers that attached over the relay's life.
    pub fn readers_attached(&self) -> u64 {
        self.state().next_reader
    }

    /// A reader from byte 0, or `None` when byte 0 is no longer kept (a body past the store
    /// limit whose window moved on).
    pub fn reader(self: &Arc<Self>) -> Option<RelayReader> {
        let mut state = self.state();
        if state.first != 0 {
            return None;
        }
        state.readers += 1;
        let id = state.next_reader;
        state.next_reader += 1;
        state.positions.insert(id, (0, Instant::now()));
        Some(RelayReader {
            relay: self.clone(),
            id,
            next: 0,
            exact: None,
            done: false,
        })
    }
}

impl State {
    /// The next chunk of the slowest reader that read within [`ACTIVE`] of `now`, if any.
    fn slowest_active(&self, now: Instant) -> Option<u64> {
        self.positions
            .values()
            .filter(|(_, read)| now.saturating_duration_since(*read) <= ACTIVE)
            .map(|(next, _)| *next)
            .min()
    }
}

fn wake_all(state: &mut State) {
    for (_, waker) in state.wakers.drain() {
        waker.wake();
    }
}

fn concat(chunks: &VecDeque<Bytes>, len: usize) -> Bytes {
    if chunks.len() == 1 {
        return chunks[0].clone();
    }
    let mut body = BytesMut::with_capacity(len);
    for chunk in chunks {
        body.extend_from_slice(chunk);
    }
    body.freeze()
}

/// One requester's view of a relay: a response body that yields the chunks from byte 0 and
/// ends as the relay ends. Dropping it detaches at once.
#[derive(Debug)]
pub struct RelayReader {
    relay: Arc<Relay>,
    id: u64,
    next: u64,
    /// The body's exact length, when the head declared one.
    exact: Option<u64>,
    done: bool,
}

impl RelayReader {
    /// Declares the body's exact length (the head's `Content-Length`), for the size hint.
    pub fn with_length(mut self, length: Option<u64>) -> RelayReader {
        self.exact = length;
        self
    }
}

impl Drop for RelayReader {
    fn drop(&mut self) {
        let mut state = self.relay.state();
        state.readers = state.readers.saturating_sub(1);
        state.wakers.remove(&self.id);
        state.positions.remove(&self.id);
        drop(state);
        self.relay.room.notify_one();
    }
}

impl Body for RelayReader {
    type Data = Bytes;
    type Error = RelayError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, RelayError>>> {
        let this = self.get_mut();
        if this.done {
            return Poll::Ready(None);
        }
        let mut state = this.relay.state();
        if this.next < state.first {
            this.done = true;
            drop(state);
            this.relay.cut.fetch_add(1, Ordering::Relaxed);
            if let Some(counter) = this.relay.cut_counter.get() {
                counter.inc();
            }
            return Poll::Ready(Some(Err(RelayError::TooSlow)));
        }
        let at = usize::try_from(this.next - state.first).unwrap_or(usize::MAX);
        if let Some(chunk) = state.chunks.get(at).cloned() {
            this.next += 1;
            state.positions.insert(this.id, (this.next, Instant::now()));
            drop(state);
            this.relay.room.notify_one();
            return Poll::Ready(Some(Ok(Frame::data(chunk))));
        }
        match state.end.clone() {
            Some(End::Complete) => {
                this.done = true;
                Poll::Ready(None)
            }
            Some(End::Aborted(why)) => {
                this.done = true;
                Poll::Ready(Some(Err(RelayError::Aborted(why))))
            }
            None => {
                // Caught up and waiting: as active as a reader gets.
                state.positions.insert(this.id, (this.next, Instant::now()));
                state.wakers.insert(this.id, cx.waker().clone());
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }

    fn size_hint(&self) -> SizeHint {
        match self.exact {
            Some(n) => SizeHint::with_exact(n),
            None => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests;
