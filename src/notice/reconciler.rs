//! The reconciler: one task that makes the server's subscriptions match the channels that have
//! local waiters (plus the invalidation channel), in order, in one batch each, and resyncs the
//! waiters when a disconnection or a move to another node may have lost notices.

use std::collections::HashSet;
use std::time::Duration;

use tokio::sync::mpsc;

use super::Request;
use super::invalidation::Invalidation;
use super::topology::{NO_MASTER_YET, Topology};
use super::waiters::{Waiters, lock, resync};
use crate::l2::L2Error;

/// How often a failed (re)subscription is tried again.
const RETRY: Duration = Duration::from_secs(1);

/// The reconciling task's state.
pub(super) struct Reconciler {
    pub(super) topology: Topology,
    pub(super) waiters: Waiters,
    /// Subscribed whether or not anyone waits.
    pub(super) invalidation: Invalidation,
}

impl Reconciler {
    /// Drains requests and makes the server's subscriptions match the channels that have
    /// waiters (plus the invalidation channel); retries every second while they do not match.
    /// Ends when every handle of the hub is gone.
    pub(super) async fn run(mut self, mut requests: mpsc::UnboundedReceiver<Request>) {
        let mut subscribed: HashSet<String> = HashSet::new();
        let mut behind = false;
        // Failed rounds in a row: each is retried after a second, but warned of only on the 1st,
        // 2nd, 4th, 8th… (then every 64th), so an outage is a few lines, not one a second.
        let mut failures: u64 = 0;
        loop {
            let first = if behind {
                tokio::select! {
                    request = requests.recv() => request,
                    () = tokio::time::sleep(RETRY) => Some(Request::Retry),
                }
            } else {
                requests.recv().await
            };
            let Some(first) = first else {
                return;
            };
            let mut acks = Vec::new();
            let pending = std::iter::from_fn(|| requests.try_recv().ok());
            for request in std::iter::once(first).chain(pending) {
                match request {
                    Request::Sync(ack) => acks.push(ack),
                    Request::Reset => {
                        subscribed.clear();
                        self.topology.recheck();
                    }
                    Request::Retry => {}
                    Request::Lost(channel) => {
                        subscribed.remove(&channel);
                    }
                    Request::ResetSharded => {
                        subscribed.retain(|c| *c == self.invalidation.channel);
                    }
                    Request::Switched => self.topology.switched(),
                }
            }
            if self.topology.follow_master().await {
                self.moved(&mut subscribed);
            }
            let mut wanted: HashSet<String> = lock(&self.waiters).keys().cloned().collect();
            wanted.insert(self.invalidation.channel.clone());
            let to_drop: Vec<String> = subscribed.difference(&wanted).cloned().collect();
            let to_add: Vec<String> = wanted.difference(&subscribed).cloned().collect();
            // In a cluster only the invalidation channel is classic; fill channels are sharded.
            let classic = &self.invalidation.channel;
            let (to_drop, drop_sharded) = self.topology.split(to_drop, classic);
            let (to_add, add_sharded) = self.topology.split(to_add, classic);
            if !self.topology.connected() {
                for ack in acks {
                    let _ = ack.send(Err(NO_MASTER_YET.to_owned()));
                }
                behind = true;
                continue;
            }
            let mut result = Ok(());
            if !to_drop.is_empty() {
                result = self.topology.unsubscribe(&to_drop).await;
                if result.is_ok() {
                    for channel in &to_drop {
                        subscribed.remove(channel);
                    }
                }
            }
            if !to_add.is_empty() && result.is_ok() {
                result = self.topology.subscribe(&to_add).await;
                if result.is_ok() {
                    if to_add.contains(&self.invalidation.channel) {
                        self.invalidation.subscribed();
                    }
                    subscribed.extend(to_add);
                }
            }
            if result.is_ok() {
                result = self
                    .topology
                    .sync_sharded(&mut subscribed, drop_sharded, add_sharded)
                    .await;
            }
            behind = result.is_err();
            match &result {
                Ok(()) => {
                    if failures > 0 {
                        tracing::info!(failures, "redis pub/sub subscribed again");
                        failures = 0;
                    }
                    self.topology.answered();
                }
                // The circuit is open: nothing was asked of this node, so it is not to blame.
                Err(L2Error::CircuitOpen { .. }) => {}
                Err(err) => {
                    failures += 1;
                    if failures.is_power_of_two() && failures <= 64 || failures.is_multiple_of(64) {
                        let node = self.topology.node();
                        tracing::warn!(%err, %node, failures, "redis pub/sub (un)subscribe failed; retrying every second");
                    }
                    if self.topology.failed() {
                        self.moved(&mut subscribed);
                    }
                }
            }
            for ack in acks {
                let _ = ack.send(result.as_ref().map(|_| ()).map_err(ToString::to_string));
            }
        }
    }

    /// The hub moved to another node: nothing is subscribed there yet, and notices may have been
    /// lost on the way, so every waiter resyncs.
    fn moved(&self, subscribed: &mut HashSet<String>) {
        resync(&self.waiters);
        subscribed.clear();
    }
}
