//! Reading another instance's streaming fill while it arrives: the relay log it writes (see
//! `l2/relay_log.rs`) is tailed into a [`Relay`] of this process, which this flight's requesters
//! read as if the fill were local.
//!
//! The tail ends as the log says. It is cut — every reader aborted, never a clean end — when the
//! log says the fill was cut, when a record is missing (trimmed past this reader, a gap), when the
//! leader stops writing for longer than `2 × lease` (keep-alives come every `lease / 2`; its
//! process died), past the route's `upstream_timeout`, or when Redis fails.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::entry::Entry;
use crate::fill::{Fill, FillRequest, RELAY_WINDOW, Source};
use crate::fleet::Fleet;
use crate::l2::{KeyNames, Record, RelayReader};
use crate::relay::{End, Push, Relay};

/// Starts tailing the relay log of `names`: `None` when it cannot be read (then the flight waits
/// as before, for the stored entry).
pub(super) async fn tail(fleet: &Fleet, names: &Arc<KeyNames>, req: &FillRequest) -> Option<Fill> {
    let route = &req.route;
    let mut reader = match fleet.relay_reader() {
        Ok(reader) => reader,
        Err(err) => {
            tracing::warn!(route = %route.name, %err, "cannot read the fleet relay");
            return None;
        }
    };
    let (records, last) = match reader.read(&names.relay, "0").await {
        Ok(read) => read,
        Err(err) => {
            tracing::warn!(route = %route.name, %err, "cannot read the fleet relay");
            return None;
        }
    };
    let mut records = records.into_iter();
    let Some(Record::Head(head)) = records.next() else {
        return None;
    };
    let head = Arc::new(Entry::decode(head).ok()?);
    let relay = Relay::new(route.max_entry_size, RELAY_WINDOW);
    let tailing = Tailing {
        reader,
        log: names.relay.clone(),
        after: last.unwrap_or_else(|| "0".to_owned()),
        relay: relay.clone(),
        offset: 0,
        deadline: Instant::now() + route.upstream_timeout,
        idle_limit: route.lock.lease * 2,
    };
    let first: Vec<Record> = records.collect();
    let hold = req.hold.clone();
    tokio::spawn(async move {
        let _hold = hold;
        tailing.run(first).await;
    });
    Some(Fill::Streaming {
        head,
        relay,
        source: Source::Remote,
    })
}

struct Tailing {
    reader: RelayReader,
    log: String,
    after: String,
    relay: Arc<Relay>,
    /// The body offset the next data record must start at.
    offset: u64,
    deadline: Instant,
    idle_limit: Duration,
}

impl Tailing {
    async fn run(mut self, first: Vec<Record>) {
        let end = self.follow(first).await;
        if let End::Aborted(why) = &end {
            tracing::warn!(log = %self.log, %why, "the fleet relay was cut: readers here aborted");
        }
        self.relay.finish(end);
    }

    async fn follow(&mut self, first: Vec<Record>) -> End {
        if let Some(end) = self.apply(first).await {
            return end;
        }
        let mut heard = Instant::now();
        loop {
            if Instant::now() >= self.deadline {
                return End::Aborted("the fill did not end within upstream_timeout".into());
            }
            if heard.elapsed() > self.idle_limit {
                return End::Aborted("the leader stopped relaying".into());
            }
            match self.reader.read(&self.log, &self.after).await {
                Ok((records, last)) => {
                    if let Some(last) = last {
                        self.after = last;
                    }
                    if !records.is_empty() {
                        heard = Instant::now();
                    }
                    if let Some(end) = self.apply(records).await {
                        return end;
                    }
                }
                Err(err) => return End::Aborted(format!("redis failed: {err}").into()),
            }
        }
    }

    /// Feeds records to the relay; `Some` once the log has ended.
    async fn apply(&mut self, records: Vec<Record>) -> Option<End> {
        for record in records {
            match record {
                Record::Data { offset, bytes } => {
                    if offset != self.offset {
                        return Some(End::Aborted(
                            "this reader fell behind the fleet relay".into(),
                        ));
                    }
                    self.offset += bytes.len() as u64;
                    match tokio::time::timeout_at(self.deadline, self.relay.push(bytes)).await {
                        Ok(Push::Kept) => {}
                        Ok(Push::Unread) => {
                            return Some(End::Aborted("nobody reads it here".into()));
                        }
                        Err(_) => {
                            return Some(End::Aborted(
                                "the fill did not end within upstream_timeout".into(),
                            ));
                        }
                    }
                }
                Record::Complete => return Some(End::Complete),
                Record::Aborted(why) => return Some(End::Aborted(why.into())),
                Record::Head(_) | Record::KeepAlive => {}
            }
        }
        None
    }
}
