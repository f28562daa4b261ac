//! Publishing a streaming fill's body to its relay log, so that waiters on other instances read
//! it while it arrives (see `fleet/relay_log.rs` for the log, [`crate::relay`] for the local side).
//!
//! The publisher is one more reader of the fill's relay: it writes what it finds there in
//! batches (everything already arrived, up to [`MAX_BATCH`]), so Redis work grows with bytes and
//! time, not with the number of tiny upstream writes, and never slows the fill (a publisher that
//! falls too far behind is cut like any reader, and the log says so). Nothing is written past the
//! head when no instance waits for the key.

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use futures_util::FutureExt;
use http_body_util::BodyExt;

use crate::entry::Entry;
use crate::fleet::{Notice, Record, RelayLog};
use crate::relay::{Relay, RelayError};
use crate::trace::FillRef;

/// Largest batch of body bytes in one record.
pub const MAX_BATCH: usize = 256 * 1024;

/// Relays `relay` (whose head is `head`, filled under the span `by` when one is recorded) to
/// `log`, the relay log of fill `id`. `ttl`: how long the log outlives its last write;
/// `keepalive`: how often a silent upstream is reported alive.
pub(crate) async fn publish(
    id: Arc<str>,
    log: RelayLog,
    (head, by): (Arc<Entry>, Option<FillRef>),
    relay: Arc<Relay>,
    ttl: Duration,
    keepalive: Duration,
) {
    let relayed = Notice::Relayed(id.clone());
    let append = async |record: &Record, window: bool, ttl: Duration| {
        let notice = match record {
            Record::Head(_) => Notice::Streaming(id.clone()),
            _ => relayed.clone(),
        };
        log.append(record, ttl, window, &notice).await
    };
    match append(&Record::head(&head, by.as_ref()), false, ttl).await {
        Ok(0) => return,
        Ok(_) => {}
        Err(err) => {
            tracing::warn!(log = %log.name(), %err, "could not start the fleet relay; waiters elsewhere get the answer once stored");
            return;
        }
    }
    // Attached only once some instance waits: a publisher that leaves at once must not count
    // as a requester who came and went (see `Relay::push`).
    let Some(mut reader) = relay.reader() else {
        let _ = append(
            &Record::Aborted("the fleet relay started too late".to_owned()),
            false,
            ttl,
        )
        .await;
        return;
    };
    let mut offset = 0u64;
    loop {
        let first = tokio::select! {
            frame = reader.frame() => frame,
            () = tokio::time::sleep(keepalive) => {
                if append(&Record::KeepAlive, relay.oversized(), ttl).await.is_err() {
                    return;
                }
                continue;
            }
        };
        let mut batch = BytesMut::new();
        let mut end = None;
        let mut next = Some(first);
        while let Some(frame) = next.take() {
            match frame {
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        batch.extend_from_slice(&data);
                    }
                }
                None => end = Some(Record::Complete),
                Some(Err(RelayError::Aborted(why))) => end = Some(Record::Aborted(why.to_string())),
                Some(Err(RelayError::TooSlow)) => {
                    end = Some(Record::Aborted(
                        "the relay to the fleet fell behind".to_owned(),
                    ));
                }
            }
            if end.is_none() && batch.len() < MAX_BATCH {
                next = reader.frame().now_or_never();
            }
        }
        if !batch.is_empty() {
            let bytes = batch.freeze();
            let len = bytes.len() as u64;
            let record = Record::Data { offset, bytes };
            if let Err(err) = append(&record, relay.oversized(), ttl).await {
                tracing::warn!(log = %log.name(), %err, "the fleet relay stopped: waiters elsewhere see it cut");
                return;
            }
            offset += len;
        }
        if let Some(end) = end {
            // Kept a little after the end, for readers still catching up to learn how it ended.
            let _ = append(&end, relay.oversized(), keepalive * 4).await;
            return;
        }
    }
}
