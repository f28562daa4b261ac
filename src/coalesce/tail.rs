//! Reading another instance's streaming fill while it arrives: the relay log it writes (see
//! `fleet/relay_log.rs`) is read into a [`Relay`] of this process, which this flight's requesters
//! read as if the fill were local.
//!
//! The flight keeps its subscription to the key's channel: every record the leader appends rings
//! it, and each ring is one read of what is new (a plain `XREAD` on the shared connection), so
//! one instance's reads follow the leader's writes, not its own clock or its number of readers.
//! Should a ring be lost, the tail reads anyway after a quiet `lease / 2`.
//!
//! The tail ends as the log says. It is cut — every reader aborted, never a clean end — when the
//! log says the fill was cut, when a record is missing (trimmed past this reader: a gap in the
//! offsets), when the leader writes nothing for `2 × lease` (keep-alives come every `lease / 2`;
//! its process died) or Redis fails for that long (a failed read is tried again meanwhile), or
//! past the route's `upstream_timeout`.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::fill::{Fill, FillRequest, RELAY_WINDOW, Source};
use crate::fleet::Subscription;
use crate::fleet::{Fleet, Record, RelayLog};
use crate::flight::Hold;
use crate::l2::KeyNames;
use crate::metrics::Metrics;
use crate::relay::{End, Push, Relay};

/// Starts tailing the relay log of fill `id` of `names`, rung on `sub`: `None` when its head
/// cannot be read (then the flight waits as before, for the stored entry). How the tail ends is
/// counted in `metrics` (`corral_relay_tails_total`), and so are its readers cut for falling
/// behind (`corral_stream_readers_cut_total`), as for a local fill.
pub(super) async fn tail(
    fleet: &Fleet,
    metrics: &Arc<Metrics>,
    names: &Arc<KeyNames>,
    id: &str,
    sub: Subscription,
    req: &FillRequest,
) -> Option<Fill> {
    let route = &req.route;
    let log = fleet.relay_log(names, id);
    let (records, last) = match log.read("0").await {
        Ok(read) => read,
        Err(err) => {
            tracing::warn!(route = %route.name, %err, "cannot read the fleet relay; waiting for the stored answer");
            return None;
        }
    };
    let mut records = records.into_iter();
    let Some(Record::Head(head)) = records.next() else {
        // Gone (expired, or trimmed past its head): nothing to read from byte 0.
        return None;
    };
    let (head, by) = Record::read_head(&head).ok()?;
    // This flight is answered by that fill: its requests link to its span (see `crate::trace`).
    if let Some(by) = by {
        crate::trace::attribute(by);
    }
    let head = Arc::new(head);
    let relay = Relay::new(route.max_entry_size, RELAY_WINDOW);
    relay.count_cuts_in(metrics.stream_cuts(&route.name));
    let tailing = Tailing {
        metrics: metrics.clone(),
        route: route.name.clone(),
        sub,
        log,
        after: last.unwrap_or_else(|| "0".to_owned()),
        relay: relay.clone(),
        offset: 0,
        deadline: Instant::now() + route.upstream_timeout,
        quiet: route.lock.lease / 2,
        idle_limit: route.lock.lease * 2,
    };
    let first: Vec<Record> = records.collect();
    let hold = req.hold.clone();
    tokio::spawn(tailing.run(first, hold));
    Some(Fill::Streaming {
        head,
        relay,
        source: Source::Remote,
    })
}

struct Tailing {
    metrics: Arc<Metrics>,
    /// The route's name, for the metrics.
    route: String,
    sub: Subscription,
    log: RelayLog,
    after: String,
    relay: Arc<Relay>,
    /// The body offset the next data record must start at.
    offset: u64,
    deadline: Instant,
    /// How long without a ring before the tail reads anyway.
    quiet: Duration,
    idle_limit: Duration,
}

impl Tailing {
    /// Follows the log to its end, keeping the flight joinable (`hold`) meanwhile.
    async fn run(mut self, first: Vec<Record>, hold: Option<Hold>) {
        let end = self.follow(first).await;
        self.metrics.tail_ended(&self.route, &end);
        if let End::Aborted(why) = &end {
            tracing::warn!(log = %self.log.name(), %why, "the fleet relay was cut: readers here aborted");
            // Land the flight before its readers learn of the abort, so that the request that
            // comes next fills again instead of joining this one.
            drop(hold);
            self.relay.finish(end);
            return;
        }
        self.relay.finish(end);
        drop(hold);
    }

    async fn follow(&mut self, first: Vec<Record>) -> End {
        if let Some(end) = self.apply(first).await {
            return end;
        }
        let mut heard = Instant::now();
        loop {
            let rang = tokio::select! {
                _ = self.sub.next() => true,
                () = tokio::time::sleep(self.quiet) => false,
                () = tokio::time::sleep_until(self.deadline) => {
                    return End::Aborted("the fill did not end within upstream_timeout".into());
                }
            };
            match self.log.read(&self.after).await {
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
                Err(err) if heard.elapsed() > self.idle_limit => {
                    return End::Aborted(format!("redis failed: {err}").into());
                }
                Err(_) => {}
            }
            if !rang && heard.elapsed() > self.idle_limit {
                return End::Aborted("the leader stopped relaying".into());
            }
        }
    }

    /// Feeds records to the relay; `Some` once the log has ended.
    async fn apply(&mut self, records: Vec<Record>) -> Option<End> {
        for record in records {
            match record {
                Record::Data { offset, bytes } => {
                    if offset != self.offset {
                        // Trimmed past this reader, or written to a master that a failover
                        // then demoted (its last writes are lost): either way a gap.
                        return Some(End::Aborted(
                            format!(
                                "the fleet relay's log has a gap (byte {} expected, the next \
                                 record starts at {offset}): this reader fell behind it, or a \
                                 Redis failover lost its records",
                                self.offset
                            )
                            .into(),
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
