//! Applying purges: the invalidation channel is subscribed whether or not anyone waits, and each
//! purge that arrives on it ([`PurgeOrder`], hard or soft) is applied to this process's L1.
//!
//! Purges missed while disconnected cannot be replayed, so once the channel is subscribed again
//! after a disconnection (or on another node) the whole L1 is dropped.

use tokio::sync::mpsc;

use crate::l1::L1;
use crate::l2::invalidation_channel;
use crate::purge::{Purge, PurgeOrder};

/// The invalidation channel of this process's hub, and where its purges go.
pub(super) struct Invalidation {
    /// The channel's name: `corral:{namespace}:…` (see [`invalidation_channel`]).
    pub(super) channel: String,
    /// To the task that applies purges to L1 ([`apply`]).
    pub(super) purges: mpsc::UnboundedSender<PurgeOrder>,
    /// Whether the channel was subscribed before: a later subscription follows a disconnection.
    ever_subscribed: bool,
}

impl Invalidation {
    /// The invalidation channel of `namespace`, and the receiving end of its purges, for
    /// [`apply`].
    pub(super) fn new(namespace: &str) -> (Invalidation, mpsc::UnboundedReceiver<PurgeOrder>) {
        let (purges, received) = mpsc::unbounded_channel();
        let invalidation = Invalidation {
            channel: invalidation_channel(namespace),
            purges,
            ever_subscribed: false,
        };
        (invalidation, received)
    }

    /// The server has just confirmed a SUBSCRIBE of the channel. After the first time, purges may
    /// have been missed while it was not subscribed: L1 is dropped whole.
    pub(super) fn subscribed(&mut self) {
        if self.ever_subscribed {
            tracing::info!("pub/sub re-subscribed: dropping L1, which may have missed purges");
            let _ = self.purges.send(PurgeOrder::delete(Purge::All));
        }
        self.ever_subscribed = true;
    }
}

/// Applies each purge to `l1`, in the order they arrived, until the hub is gone.
pub(super) async fn apply(mut purges: mpsc::UnboundedReceiver<PurgeOrder>, l1: L1) {
    while let Some(order) = purges.recv().await {
        tracing::info!(purge = %order.payload(), "invalidating L1");
        l1.apply(&order).await;
    }
}
