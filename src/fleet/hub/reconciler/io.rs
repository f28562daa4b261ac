//! The reconciler's I/O loop: it waits for requests, talks to the topology and applies what the
//! machine ([`Reconciler`]) says, and nothing else.

use tokio::sync::mpsc;

use super::{Effect, Event, Io, RETRY, Reconciler};
use crate::fleet::hub::Request;
use crate::fleet::hub::invalidation::Invalidation;
use crate::fleet::hub::topology::{Subscribed, Topology};
use crate::fleet::hub::waiters::{Waiters, lock, resync};

/// The reconciling task: the machine and what it drives.
pub(in crate::fleet::hub) struct Driver {
    pub(in crate::fleet::hub) topology: Topology,
    pub(in crate::fleet::hub) waiters: Waiters,
    /// Subscribed whether or not anyone waits.
    pub(in crate::fleet::hub) invalidation: Invalidation,
}

impl Driver {
    /// Drains requests and makes the server's subscriptions match the channels that have
    /// waiters (plus the invalidation channel); retries every second while they do not match.
    /// Ends when every handle of the hub is gone.
    pub(in crate::fleet::hub) async fn run(
        mut self,
        mut requests: mpsc::UnboundedReceiver<Request>,
    ) {
        let channel = self.invalidation.channel.clone();
        // Failed rounds in a row, for warnings that back off.
        let mut failures: u64 = 0;
        let mut machine = Reconciler::new(channel, self.topology.sharded());
        let mut step = machine.start();
        loop {
            for effect in step.effects {
                if matches!(effect, Effect::Answered) && failures > 0 {
                    tracing::info!(failures, "redis pub/sub subscribed again");
                    failures = 0;
                }
                self.apply(effect);
            }
            let event = match step.then {
                Io::Wait { retry } => match next_requests(&mut requests, retry).await {
                    Some(batch) => Event::Requests(batch),
                    None => return,
                },
                Io::FollowMaster => {
                    let moved = self.topology.follow_master().await;
                    Event::Followed {
                        moved,
                        connected: self.topology.connected(),
                        waited_on: lock(&self.waiters).keys().cloned().collect(),
                    }
                }
                Io::Unsubscribe(channels) => {
                    Event::Unsubscribed(self.topology.unsubscribe(&channels).await)
                }
                Io::Subscribe(channels) => match self.topology.subscribe(&channels).await {
                    Subscribed::Done(result) => Event::Subscribed(result),
                    Subscribed::MasterSwitched => {
                        let node = self.topology.node();
                        tracing::warn!(
                            %node,
                            "redis pub/sub: the sentinels named a new master during a SUBSCRIBE; subscribing there"
                        );
                        Event::MasterSwitched
                    }
                },
                Io::SyncSharded { drop, add } => {
                    let synced = self.topology.sync_sharded(drop, add).await;
                    Event::ShardedSynced {
                        dropped: synced.dropped,
                        undropped: synced.undropped,
                        drop_failure: synced.drop_failure,
                        added: synced.added,
                        result: synced.result,
                    }
                }
                Io::Fail(err) => {
                    // Each failed round is retried after a second, but warned of only on the
                    // 1st, 2nd, 4th, 8th… (then every 64th): an outage is a few lines.
                    failures += 1;
                    if failures.is_power_of_two() && failures <= 64 || failures.is_multiple_of(64) {
                        let node = self.topology.node();
                        tracing::warn!(%err, %node, failures, "redis pub/sub (un)subscribe failed; retrying every second");
                    }
                    Event::FailedOver {
                        moved: self.topology.failed(),
                    }
                }
            };
            step = machine.on(event);
        }
    }

    fn apply(&mut self, effect: Effect) {
        match effect {
            Effect::Recheck => self.topology.recheck(),
            Effect::Switched => self.topology.switched(),
            Effect::Resync => resync(&self.waiters),
            Effect::InvalidationSubscribed => self.invalidation.subscribed(),
            Effect::Answered => self.topology.answered(),
            Effect::Ack(acks) => {
                for (ack, result) in acks {
                    let _ = ack.send(result);
                }
            }
        }
    }
}

/// Every request pending once one arrives (or, with `retry`, once [`RETRY`] passed: a
/// [`Request::Retry`]); `None` when every handle of the hub is gone.
async fn next_requests(
    requests: &mut mpsc::UnboundedReceiver<Request>,
    retry: bool,
) -> Option<Vec<Request>> {
    let first = if retry {
        tokio::select! {
            request = requests.recv() => request,
            () = tokio::time::sleep(RETRY) => Some(Request::Retry),
        }
    } else {
        requests.recv().await
    }?;
    let pending = std::iter::from_fn(|| requests.try_recv().ok());
    Some(std::iter::once(first).chain(pending).collect())
}
