//! What arrives on a pub/sub connection: notices for the waiters, purges for L1, and the signs
//! that subscriptions were lost (a dropped connection; in a cluster, a sharded channel whose slot
//! moved away).

use redis::{PushInfo, PushKind, Value};
use tokio::sync::mpsc;

use std::sync::Arc;

use super::waiters::{Waiters, lock, resync};
use super::{Request, Wake};
use crate::fleet::notice::Notice;
use crate::metrics::Metrics;
use crate::purge::PurgeOrder;

/// Where the pushes of a pub/sub connection go: the waiters, the purge applier, and the
/// reconciler (told of a dropped connection or a lost sharded subscription).
#[derive(Clone)]
pub(super) struct Pushes {
    pub(super) dispatch: Waiters,
    pub(super) invalidations: String,
    /// Weak: the connections (inside the reconciling task) must not keep that task alive.
    pub(super) resets: mpsc::WeakUnboundedSender<Request>,
    pub(super) purges: mpsc::UnboundedSender<PurgeOrder>,
    /// Whether these are the sharded connection's pushes (a drop there loses no purge).
    pub(super) sharded: bool,
    /// Counts the fill notices delivered (`corral_notices_received_total`).
    pub(super) metrics: Arc<Metrics>,
}

impl Pushes {
    /// The push sender of one connection.
    pub(super) fn handler(
        &self,
    ) -> impl Fn(PushInfo) -> Result<(), redis::aio::SendError> + Send + Sync + use<> {
        let pushes = self.clone();
        move |push: PushInfo| {
            // The push sender runs inside the connection's driver: one bad message must not
            // take the connection (and every waiter's wake-up) down with it.
            let delivered = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                deliver(&pushes.dispatch, &pushes.invalidations, push)
            }))
            .unwrap_or_else(|_| {
                tracing::error!("a pub/sub message could not be handled; ignored");
                Delivered::Nothing
            });
            let tell = |request| {
                if let Some(requests) = pushes.resets.upgrade() {
                    let _ = requests.send(request);
                }
            };
            match delivered {
                Delivered::Disconnected if pushes.sharded => tell(Request::ResetSharded),
                Delivered::Disconnected => tell(Request::Reset),
                Delivered::Lost(channel) => {
                    // The reconciler hears of it before the waiters re-confirm.
                    tell(Request::Lost(channel.clone()));
                    if let Some(slot) = lock(&pushes.dispatch).get(&channel) {
                        for mailbox in &slot.mailboxes {
                            mailbox.post(Wake::Resync);
                        }
                    }
                }
                Delivered::Purge(purge) => {
                    let _ = pushes.purges.send(purge);
                }
                Delivered::Notice => pushes.metrics.notice_received(),
                Delivered::Nothing => {}
            }
            Ok(())
        }
    }
}

/// What a push from Redis amounted to.
enum Delivered {
    Nothing,
    /// A fill notice, handed to the waiters on its channel if there were any.
    Notice,
    /// The connection dropped: the server holds no subscriptions any more.
    Disconnected,
    /// A purge arrived on the invalidation channel.
    Purge(PurgeOrder),
    /// The server dropped a sharded subscription someone still waits on: its slot moved to
    /// another master. The reconciler must subscribe it again, then its waiters resync.
    Lost(String),
}

/// Hands a push to the waiters of its channel, or recognises a purge or a disconnection.
fn deliver(waiters: &Waiters, invalidations: &str, push: PushInfo) -> Delivered {
    match push.kind {
        // A sharded notice (`smessage`) reads as a classic one.
        PushKind::Message | PushKind::SMessage => {
            let [channel, payload] = push.data.as_slice() else {
                return Delivered::Nothing;
            };
            let (Some(channel), Some(payload)) = (bytes_of(channel), bytes_of(payload)) else {
                return Delivered::Nothing;
            };
            if channel == invalidations.as_bytes() {
                return match PurgeOrder::parse(payload) {
                    Some(purge) => Delivered::Purge(purge),
                    None => Delivered::Nothing,
                };
            }
            let Ok(channel) = std::str::from_utf8(channel) else {
                return Delivered::Nothing;
            };
            let waiters = lock(waiters);
            // Parse only for a channel someone here waits on.
            if let Some(slot) = waiters.get(channel)
                && let Some(notice) = Notice::parse(payload)
            {
                for mailbox in &slot.mailboxes {
                    mailbox.post(Wake::Notice(notice.clone()));
                }
            }
            Delivered::Notice
        }
        // Sent for our own SUNSUBSCRIBE (nobody waits on the channel any more), and by the
        // server when the channel's slot leaves this master (someone may still wait).
        PushKind::SUnsubscribe => {
            let Some(channel) = push.data.first().and_then(bytes_of) else {
                return Delivered::Nothing;
            };
            let Ok(channel) = std::str::from_utf8(channel) else {
                return Delivered::Nothing;
            };
            if !lock(waiters).contains_key(channel) {
                return Delivered::Nothing;
            }
            tracing::info!(
                channel,
                "sharded subscription dropped by the server (its slot moved?); re-subscribing"
            );
            Delivered::Lost(channel.to_owned())
        }
        PushKind::Disconnection => {
            tracing::warn!(
                waiting = lock(waiters).len(),
                "redis pub/sub connection lost; waiters re-subscribe and re-check"
            );
            resync(waiters);
            Delivered::Disconnected
        }
        _ => Delivered::Nothing,
    }
}

fn bytes_of(value: &Value) -> Option<&[u8]> {
    match value {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.as_bytes()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::super::waiters::{Mailbox, Slot};
    use super::*;

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    fn push(kind: PushKind, data: Vec<Value>) -> PushInfo {
        PushInfo { kind, data }
    }

    /// A hub with one waiter on `channel`, and that waiter's mailbox.
    fn waiting_on(channel: &str) -> (Waiters, Arc<Mailbox>) {
        let mailbox = Arc::new(Mailbox::default());
        let waiters = Waiters::default();
        lock(&waiters).insert(
            channel.to_owned(),
            Slot {
                mailboxes: vec![mailbox.clone()],
            },
        );
        (waiters, mailbox)
    }

    #[test]
    fn a_sharded_message_wakes_the_waiters_like_a_classic_one() {
        let channel = "corral:t:r:fill:{ab}";
        let (waiters, mailbox) = waiting_on(channel);
        let sharded = push(PushKind::SMessage, vec![bulk(channel), bulk("uncacheable")]);
        assert!(matches!(
            deliver(&waiters, "inv", sharded),
            Delivered::Notice
        ));
        assert_eq!(mailbox.take(), Some(Wake::Notice(Notice::Uncacheable)));
    }

    #[test]
    fn every_ring_of_a_relay_log_reaches_the_waiters() {
        // The head rings `streaming`, every later record `relayed`: a tail reads on each.
        let channel = "corral:t:r:fill:{ab}";
        let (waiters, mailbox) = waiting_on(channel);
        for notice in [Notice::Streaming("f1".into()), Notice::Relayed("f1".into())] {
            let payload = String::from_utf8_lossy(&notice.payload()).into_owned();
            let ring = push(PushKind::Message, vec![bulk(channel), bulk(&payload)]);
            assert!(matches!(deliver(&waiters, "inv", ring), Delivered::Notice));
            assert_eq!(mailbox.take(), Some(Wake::Notice(notice)));
        }
    }

    #[test]
    fn a_budget_grant_reaches_the_calls_queued_on_its_channel() {
        let channel = "corral:t:budget:{model}";
        let (waiters, mailbox) = waiting_on(channel);
        let granted = Notice::Granted("a1b2".into());
        let payload = String::from_utf8_lossy(&granted.payload()).into_owned();
        let ring = push(PushKind::Message, vec![bulk(channel), bulk(&payload)]);
        assert!(matches!(deliver(&waiters, "inv", ring), Delivered::Notice));
        assert_eq!(mailbox.take(), Some(Wake::Notice(granted)));
    }

    #[test]
    fn a_dropped_sharded_subscription_is_lost_only_while_someone_waits() {
        let channel = "corral:t:r:fill:{ab}";
        let (waiters, mailbox) = waiting_on(channel);
        let dropped = push(PushKind::SUnsubscribe, vec![bulk(channel), Value::Int(0)]);
        match deliver(&waiters, "inv", dropped) {
            Delivered::Lost(lost) => assert_eq!(lost, channel),
            _ => panic!("a waited-on channel dropped by the server must be subscribed again"),
        }
        // The waiters are told by the handler, after the reconciler: nothing posted yet.
        assert_eq!(mailbox.take(), None);

        // Our own SUNSUBSCRIBE of a channel nobody waits on any more: nothing to do.
        let ours = push(PushKind::SUnsubscribe, vec![bulk("corral:t:r:fill:{cd}")]);
        assert!(matches!(deliver(&waiters, "inv", ours), Delivered::Nothing));
    }
}
