//! The sharded side of the hub in a Redis Cluster: fill channels are `SSUBSCRIBE`d through
//! redis-rs's RESP3 cluster connection, one connection per master.

use std::time::Duration;

use futures_util::future::join_all;
use redis::ProtocolVersion;
use redis::cluster::{ClusterClient, ClusterConfig};
use redis::cluster_async::ClusterConnection;

use super::bounds::Bounds;
use super::pushes::Pushes;
use crate::l2::{L2Error, PATIENCE};

/// The sharded pub/sub side in a cluster: a RESP3 cluster connection (lazy: the cluster may be
/// down now) whose pushes go to the hub.
pub(super) fn sharded_connection(
    nodes: &[String],
    tls: Option<&crate::config::RedisTls>,
    timeout: Duration,
    pushes: &Pushes,
) -> Result<ClusterConnection, L2Error> {
    let mut builder = ClusterClient::builder(nodes.iter().map(String::as_str));
    if let Some(tls) = tls {
        builder = builder.certs(crate::l2::tls::certificates(tls));
    }
    let client = builder
        .use_protocol(ProtocolVersion::RESP3)
        .push_sender(
            Pushes {
                sharded: true,
                ..pushes.clone()
            }
            .handler(),
        )
        .connection_timeout(timeout.max(Duration::from_millis(200)))
        .response_timeout(PATIENCE.max(timeout))
        .retries(2)
        .build()
        .map_err(|source| L2Error::Redis {
            op: "open cluster pubsub",
            source,
        })?;
    Ok(client.get_pending_async_connection_with_config(ClusterConfig::default()))
}

/// What [`sharded_sync`] achieved.
#[derive(Debug)]
pub(super) struct Synced {
    /// The channels unsubscribed, and those whose SUNSUBSCRIBE failed (the last failure why).
    pub(super) dropped: Vec<String>,
    pub(super) undropped: Vec<String>,
    pub(super) drop_failure: Option<L2Error>,
    /// The channels subscribed; `result`: the last SSUBSCRIBE's failure, if any.
    pub(super) added: Vec<String>,
    pub(super) result: Result<(), L2Error>,
}

impl Synced {
    /// Nothing to do, nothing done.
    pub(super) fn nothing() -> Synced {
        Synced {
            dropped: Vec::new(),
            undropped: Vec::new(),
            drop_failure: None,
            added: Vec::new(),
            result: Ok(()),
        }
    }
}

/// Makes the sharded subscriptions match: one SUNSUBSCRIBE / SSUBSCRIBE per channel, all at
/// once — each goes to the master of its channel's slot, and channels of different slots cannot
/// share one command; the drops do not hold up the subscriptions (the two sets are disjoint).
/// The unsubscriptions' failures are reported apart from the subscriptions': nobody waits on a
/// channel being dropped.
pub(super) async fn sharded_sync(
    bounds: &Bounds,
    sharded: &ClusterConnection,
    to_drop: Vec<String>,
    to_add: Vec<String>,
) -> Synced {
    let drops = to_drop.into_iter().map(|channel| {
        let mut conn = sharded.clone();
        async move {
            let call = conn.sunsubscribe(&channel);
            let done = bounds.guarded("SUNSUBSCRIBE", call).await;
            (channel, done)
        }
    });
    let adds = to_add.into_iter().map(|channel| {
        let mut conn = sharded.clone();
        async move {
            let call = conn.ssubscribe(&channel);
            let done = bounds.patiently("SSUBSCRIBE", call).await;
            (channel, done)
        }
    });
    let (drops, adds) = futures_util::future::join(join_all(drops), join_all(adds)).await;
    let mut synced = Synced::nothing();
    for (channel, done) in drops {
        match done {
            Ok(()) => synced.dropped.push(channel),
            Err(err) => {
                synced.undropped.push(channel);
                synced.drop_failure = Some(err);
            }
        }
    }
    for (channel, done) in adds {
        match done {
            Ok(()) => synced.added.push(channel),
            Err(err) => synced.result = Err(err),
        }
    }
    synced
}
