//! A fill whose answer streams: its requesters read the body from a [`Relay`] while it arrives,
//! and the fill stores it once it has arrived whole (see [`crate::relay`]; the fleet-wide side is
//! `fill/publish.rs`).

use std::sync::Arc;
use std::time::Instant;

use http_body_util::BodyExt;

use super::{Claim, Fill, FillRequest, Filler, Source, publish};
use crate::entry::Entry;
use crate::fleet::Notice;
use crate::relay::{End, Push, Relay};

/// A storable answer's head, and what its body needs to stream to its end.
pub(super) struct Streaming {
    /// The entry the answer will be, without its body yet.
    pub(super) head: Entry,
    pub(super) body: hyper::body::Incoming,
    /// The route's upstream slot, held until the body has ended.
    pub(super) slot: crate::budget::Slot,
    /// When the call began, and when it must have ended (`upstream_timeout`).
    pub(super) started: Instant,
    pub(super) deadline: tokio::time::Instant,
}

/// Bytes a relay keeps past an answer too large to store: what the fastest reader may be
/// ahead of the slowest before the slowest is cut.
pub const RELAY_WINDOW: usize = 16 * 1024 * 1024;

/// How long an answer past the store limit waits for readers that have all stopped reading
/// before it is cut.
const STALLED_READERS: std::time::Duration = std::time::Duration::from_secs(300);

/// A body declared this small (`Content-Length`) is not relayed fleet-wide: it travels whole with
/// the `stored` notice (the largest entry a notice carries).
const RELAY_MIN_BYTES: u64 = 64 * 1024;

/// The body length a head declares, if any.
pub fn declared_length(headers: &http::HeaderMap) -> Option<u64> {
    headers
        .get(http::header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

impl Filler {
    /// Hands a storable answer to the flight while its body still arrives: the flight's
    /// requesters read it from a [`Relay`], and a task of its own reads the upstream to the end
    /// and stores the answer if it arrived whole (see [`Filler::pump`]). The flight stays
    /// joinable until then, through the request's [`Hold`].
    pub(super) fn stream(
        &self,
        req: &FillRequest,
        claim: Claim,
        streaming: Streaming,
        began: u64,
    ) -> Fill {
        let route = &req.route;
        let relay = Relay::new(route.max_entry_size, RELAY_WINDOW);
        relay.count_cuts_in(self.handles.metrics().stream_cuts(&route.name));
        let head = Arc::new(streaming.head.clone());
        // Waiters elsewhere read it through the key's relay log — unless its head declares a body
        // small enough to travel with the `stored` notice, which then serves them at once.
        let small = declared_length(&head.headers).is_some_and(|n| n <= RELAY_MIN_BYTES);
        // The fill's span (when recorded): named in the log's head for remote tails to link to,
        // and kept by the pump for its `stored` notice (see `crate::trace`).
        let by = crate::trace::current_fill();
        if let Claim::Fleet(held) = &claim
            && !small
        {
            let (id, log) = held.relay_log();
            let ttl = route.upstream_timeout + route.lock.lease;
            let keepalive = route.lock.lease / 2;
            let (head, relay, by) = (head.clone(), relay.clone(), by.clone());
            tokio::spawn(publish::publish(id, log, (head, by), relay, ttl, keepalive));
        }
        let (this, req, pumped) = (self.clone(), req.clone(), relay.clone());
        // The pump stays in the fill's span, and its `stored` notice names the fill as the flight
        // would have (see `crate::trace`).
        let span = tracing::Span::current();
        let pump = crate::trace::attributed(async move {
            if let Some(by) = by {
                crate::trace::attribute(by);
            }
            this.pump(req, claim, streaming, pumped, began).await;
        });
        tokio::spawn(tracing::Instrument::instrument(pump, span));
        // A head that declares a body over the store limit is known not to be stored.
        let storable = declared_length(&head.headers).is_none_or(|n| n <= route.max_entry_size);
        Fill::Streaming {
            head,
            relay,
            source: Source::Upstream { stored: storable },
        }
    }

    /// Reads a streaming answer's body into its relay to the end, within `upstream_timeout`,
    /// then ends the claim: a body that arrived whole and fits `max_entry_size` is stored; a body
    /// cut short aborts every reader and is stored nowhere. A body that outgrows the store limit
    /// gives the lock up at once (the fleet's waiters elsewhere fill for themselves) and streams
    /// on to this flight's readers only while one is left.
    ///
    /// Runs in a task of its own: requesters that go away (the leader's client included) do not
    /// stop it, so a storable answer is stored even when nobody reads it any more.
    async fn pump(
        self,
        req: FillRequest,
        claim: Claim,
        streaming: Streaming,
        relay: Arc<Relay>,
        began: u64,
    ) {
        let mut hold = req.hold.clone();
        let route = &req.route;
        let Streaming {
            mut head,
            mut body,
            slot,
            started,
            deadline,
        } = streaming;
        let mut claim = Some(claim);
        let declared = declared_length(&head.headers);
        let end = loop {
            // While the answer may be stored (the lock held), the whole fill is bounded by
            // `upstream_timeout`, as the lock's lease is; past the store limit nothing waits on
            // it but its readers, and only a silent upstream is (each gap within the limit).
            let bound = match claim {
                Some(_) => deadline,
                None => tokio::time::Instant::now() + route.upstream_timeout,
            };
            let frame = match tokio::time::timeout_at(bound, body.frame()).await {
                Err(_) => {
                    break End::Aborted(
                        "the upstream did not finish within upstream_timeout".into(),
                    );
                }
                Ok(None) => break End::Complete,
                Ok(Some(Err(err))) => {
                    break End::Aborted(format!("the upstream's body failed: {err}").into());
                }
                Ok(Some(Ok(frame))) => frame,
            };
            // Trailers are hop-by-hop for us: dropped.
            let Ok(data) = frame.into_data() else {
                continue;
            };
            // The last bytes of a body of declared length (hyper has checked the length): a
            // reader's response is complete once it has them, so the answer is stored first
            // and a request that follows the answer finds it stored.
            let last = declared.is_some_and(|n| relay.total_bytes() + data.len() as u64 == n);
            if last
                && let Some(whole) = relay.kept_body_with(&data)
                && let Some(held) = claim.take()
            {
                head.body = whole;
                head.fill_ms = u32::try_from(started.elapsed().as_millis()).unwrap_or(u32::MAX);
                let entry = Arc::new(head.clone());
                self.store(&req, held, &entry, began).await;
            }
            // Past the store limit the relay waits for its fastest reader for as long as one
            // is attached, as a proxied download would.
            let push_bound = match claim {
                Some(_) => deadline,
                None => tokio::time::Instant::now() + STALLED_READERS,
            };
            match tokio::time::timeout_at(push_bound, relay.push(data)).await {
                Ok(Push::Kept) => {}
                Ok(Push::Unread) => break End::Aborted("nobody reads it any more".into()),
                Err(_) => {
                    break End::Aborted(
                        "the upstream did not finish within upstream_timeout".into(),
                    );
                }
            }
            if relay.oversized()
                && let Some(held) = claim.take()
            {
                tracing::info!(route = %route.name, limit = route.max_entry_size, "streamed answer larger than max_entry_size: relayed to this flight, not stored");
                held.give_up(&req, Notice::Failed(None)).await;
            }
        };
        drop(body);
        drop(slot);
        if matches!(end, End::Aborted(_)) {
            // Land the flight before its readers learn of the abort, so that a request that
            // comes next starts a new fill instead of joining this one.
            hold.take();
        }
        // A whole answer is stored before its readers see it end, so a request that follows
        // the answer finds it stored.
        if end == End::Complete
            && let Some(claim) = claim.take()
        {
            match relay.kept_body() {
                Some(whole) => {
                    head.body = whole;
                    head.fill_ms = u32::try_from(started.elapsed().as_millis()).unwrap_or(u32::MAX);
                    let entry = Arc::new(head);
                    self.store(&req, claim, &entry, began).await;
                }
                None => claim.give_up(&req, Notice::Failed(None)).await,
            }
        }
        relay.finish(end.clone());
        self.handles.metrics().stream_ended(
            &route.name,
            &end,
            relay.total_bytes(),
            relay.readers_attached(),
        );
        if let (End::Aborted(why), Some(claim)) = (&end, claim) {
            tracing::warn!(route = %route.name, %why, bytes = relay.total_bytes(), "streamed fill cut short: every reader aborted, nothing stored");
            claim.give_up(&req, Notice::Failed(None)).await;
        }
    }
}
