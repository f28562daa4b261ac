//! The sentinels' `+switch-master` events: how Corral learns of a failover when it happens,
//! rather than when a call to the old master fails.
//!
//! Every sentinel publishes `+switch-master <name> <old-ip> <old-port> <new-ip> <new-port>` on
//! its own pub/sub once it has adopted a new master (the one that ran the failover first, the
//! others as they hear of it), so listening to one sentinel is enough. A [`SwitchWatch`]
//! listens to one sentinel at a time and moves to the next, round robin, when that one cannot be
//! reached or its connection drops — after which it also calls `on_switch` once, since an event
//! may have been missed meanwhile. The event is only a signal: the owner asks the sentinels
//! which master to use (redis-rs checks that it answers as a master), as it does after a failed
//! call, so a forged or stale event costs one question.

use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::oneshot;

use crate::config::RedisTls;
use crate::redact::redact;

/// The channel sentinels announce a new master on.
const SWITCH_MASTER: &str = "+switch-master";
/// Pause before trying the next sentinel after one could not be reached or dropped.
const RETRY: Duration = Duration::from_secs(1);

/// Listens while it lives; dropping it stops the listening task (and closes its connection).
pub(crate) struct SwitchWatch {
    _stop: oneshot::Sender<()>,
}

/// Starts listening to `nodes` (the sentinels' URLs) for switches of `master`, over TLS with
/// `tls`'s material for `rediss://` sentinels; `on_switch` runs on the listening task for each
/// one. `None` outside a tokio runtime (nothing to listen on):
/// the owner then follows a failover only after a failed call.
pub(crate) fn watch(
    nodes: &[String],
    master: &str,
    tls: Option<&RedisTls>,
    timeout: Duration,
    on_switch: impl Fn() + Send + 'static,
) -> Option<SwitchWatch> {
    let runtime = tokio::runtime::Handle::try_current().ok()?;
    let (stop, stopped) = oneshot::channel();
    let (nodes, master, tls) = (nodes.to_vec(), master.to_owned(), tls.cloned());
    runtime.spawn(async move {
        tokio::select! {
            _ = stopped => {}
            () = listen(nodes, master, tls, timeout, on_switch) => {}
        }
    });
    Some(SwitchWatch { _stop: stop })
}

/// Listens to each sentinel in turn, forever (ended by the [`SwitchWatch`] being dropped).
async fn listen(
    nodes: Vec<String>,
    master: String,
    tls: Option<RedisTls>,
    timeout: Duration,
    on_switch: impl Fn() + Send + 'static,
) {
    if nodes.is_empty() {
        return;
    }
    let connect_budget = timeout.max(Duration::from_millis(200));
    let mut first = true;
    for url in nodes.iter().cycle() {
        let node = redact(url).into_owned();
        let subscribed = async {
            let client = super::tls::client(url, tls.as_ref())?;
            let mut pubsub = client.get_async_pubsub().await?;
            pubsub.subscribe(SWITCH_MASTER).await?;
            Ok::<_, redis::RedisError>(pubsub)
        };
        let mut pubsub = match tokio::time::timeout(connect_budget, subscribed).await {
            Ok(Ok(pubsub)) => pubsub,
            Ok(Err(err)) => {
                tracing::warn!(sentinel = %node, %err, "cannot listen to the sentinel's +switch-master events");
                tokio::time::sleep(RETRY).await;
                continue;
            }
            Err(_) => {
                tracing::warn!(sentinel = %node, "the sentinel did not answer in time; +switch-master events not heard from it");
                tokio::time::sleep(RETRY).await;
                continue;
            }
        };
        if !first {
            // Events may have been missed while no sentinel was listened to.
            on_switch();
        }
        first = false;
        let mut messages = pubsub.on_message();
        while let Some(message) = messages.next().await {
            let payload: Vec<u8> = message.get_payload_bytes().to_vec();
            if names_master(&payload, &master) {
                tracing::warn!(
                    event = %String::from_utf8_lossy(&payload),
                    "redis: the sentinels switched master"
                );
                on_switch();
            }
        }
        tracing::warn!(sentinel = %node, "lost the sentinel's +switch-master events; trying the next sentinel");
        tokio::time::sleep(RETRY).await;
    }
}

/// Whether a `+switch-master` payload is about `master`.
fn names_master(payload: &[u8], master: &str) -> bool {
    payload
        .split(|b| *b == b' ')
        .next()
        .is_some_and(|name| name == master.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_events_about_our_master_count() {
        assert!(names_master(
            b"mymaster 127.0.0.1 6379 127.0.0.1 6380",
            "mymaster"
        ));
        assert!(!names_master(
            b"mymaster2 127.0.0.1 6379 127.0.0.1 6380",
            "mymaster"
        ));
        assert!(!names_master(b"other 127.0.0.1 1 127.0.0.1 2", "mymaster"));
        assert!(!names_master(b"", "mymaster"));
    }
}
