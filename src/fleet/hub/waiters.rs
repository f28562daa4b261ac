//! Local fan-out: the process's waiters, by channel, each with a mailbox the hub posts wakes to.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::Notify;

use super::Wake;

/// The waiters of this process, by channel. Shared by the hub's handles (which add and remove
/// mailboxes), the push handlers (which post to them) and the reconciler (which subscribes the
/// channels that have some).
pub(super) type Waiters = Arc<Mutex<HashMap<String, Slot>>>;

/// The local waiters on one channel.
#[derive(Default)]
pub(super) struct Slot {
    pub(super) mailboxes: Vec<Arc<Mailbox>>,
}

/// Most wakes one subscription holds unread; past it the oldest resync (else the oldest wake)
/// makes room. A waiter reads each wake as it comes, so this is only a bound against a flood.
const MAILBOX_CAP: usize = 16;

/// One subscription's wakes, in the order they came. A queue, not a latest-value slot: a
/// terminal notice (`stored`, `failed`, `uncacheable`) is never overwritten by a later resync.
#[derive(Default)]
pub(super) struct Mailbox {
    queue: Mutex<VecDeque<Wake>>,
    pub(super) ready: Notify,
}

impl Mailbox {
    pub(super) fn post(&self, wake: Wake) {
        let mut queue = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        let resync = matches!(wake, Wake::Resync);
        if resync && matches!(queue.back(), Some(Wake::Resync)) {
            return;
        }
        if queue.len() >= MAILBOX_CAP {
            match queue.iter().position(|w| matches!(w, Wake::Resync)) {
                Some(at) => drop(queue.remove(at)),
                None => drop(queue.pop_front()),
            }
        }
        queue.push_back(wake);
        drop(queue);
        self.ready.notify_one();
    }

    pub(super) fn take(&self) -> Option<Wake> {
        self.queue
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pop_front()
    }
}

/// Poisoning only means another thread panicked while holding the map; the map itself is still
/// consistent (every mutation is a single insert/remove), so carry on with it.
pub(super) fn lock(waiters: &Waiters) -> MutexGuard<'_, HashMap<String, Slot>> {
    waiters
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Tells every waiter that notices may have been lost: confirm the subscription, re-check L2.
pub(super) fn resync(waiters: &Waiters) {
    for mailbox in lock(waiters).values().flat_map(|slot| &slot.mailboxes) {
        mailbox.post(Wake::Resync);
    }
}
