//! A fill's claim on its key: the fleet lock it holds, or the right to fill for this instance
//! alone; and how a claim ends (a store, or giving up with a notice).

use std::sync::Arc;

use super::FillRequest;
use crate::entry::Entry;
use crate::l2::{KeyNames, L2, Notice, StoreOutcome};
use crate::lock::FillLock;

/// How this flight may fill: under the fleet lock, or for this instance alone (writing L2
/// plainly when there is one to write).
pub(crate) enum Claim {
    Fleet(FillLock),
    Instance(Option<(L2, Arc<KeyNames>)>),
}

impl Claim {
    /// Stores a storable entry: under the lock (which the store releases, waking the waiters), or
    /// plainly.
    /// `false` when a purge of the key came while the fill ran (the entry must not be kept
    /// in L1 either).
    pub(super) async fn store(self, req: &FillRequest, entry: &Entry) -> bool {
        let route = &req.route.name;
        match self {
            // Both writes index the entry's tags in the same round trip.
            Claim::Fleet(held) => match held.store(entry).await {
                Ok(StoreOutcome::Purged) => {
                    tracing::info!(%route, "a purge came while this fill ran: not stored");
                    return false;
                }
                Ok(outcome) => tracing::debug!(%route, ?outcome, "filled"),
                Err(err) => tracing::warn!(%route, %err, "could not store the fill in redis"),
            },
            Claim::Instance(Some((l2, names))) => {
                if let Err(err) = l2.put(&names, entry).await {
                    tracing::warn!(%route, %err, "could not store the fill in redis");
                }
            }
            Claim::Instance(None) => {}
        }
        true
    }

    /// Ends a claim that stored nothing, telling the fleet's waiters why.
    pub(super) async fn give_up(self, req: &FillRequest, notice: Notice) {
        if let Claim::Fleet(held) = self
            && let Err(err) = held.release(Some(notice), req.route.uncacheable_ttl).await
        {
            tracing::warn!(route = %req.route.name, %err, "could not release fill lock; it lapses with its lease");
        }
    }
}
