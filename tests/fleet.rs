//! Stampede protection on one Redis, proven by counting upstream calls and notices: in embedded
//! mode, one notice per waiting instance, a garbled value, connections warmed at start. What holds
//! on every topology (one call per key, a fresh instance reading L2) is in `topologies.rs`.

mod support;

use std::collections::HashSet;
use std::time::Duration;

use support::corral::{config, recommend_route, spread, start, url};
use support::{Client, Fleet, RedisServer, Upstream, eventually};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_instance_receives_one_notice_per_fill_however_many_requests_wait() {
    let fleet = Fleet::start(2, "", "").await;
    let (client, upstream) = (&fleet.client, &fleet.upstream);
    // Long enough for the waiters below to subscribe while the fill is parked upstream.
    upstream.set_delay(Duration::from_secs(2));
    let notices = |i: usize| fleet[i].proxy().metrics().notices_received();

    // Step 1: instance 0 takes the fill, which the upstream holds.
    let leader = client.spawn_get(url(&fleet[0], "/recommend?segment=n"));
    upstream.wait_in_flight(1).await;

    // Step 2: 50 requests for the key at instance 1, which waits on the fill by pub/sub.
    let waiters: Vec<_> = (0..50)
        .map(|_| client.spawn_get(url(&fleet[1], "/recommend?segment=n")))
        .collect();
    eventually(
        "instance 1 waits on the key's channel",
        Duration::from_secs(5),
        async || {
            fleet[1]
                .proxy()
                .fleet()
                .is_some_and(|f| f.waiting_channels() == 1)
        },
    )
    .await;

    // Step 3: one call; instance 1 received the notice once for its 50 waiting requests, and
    // the filler none: pub/sub work grows with the instances that wait, never with the waiters.
    assert_eq!(leader.await.expect("the leader's request").status, 200);
    for waiter in waiters {
        assert_eq!(waiter.await.expect("a waiter's request").status, 200);
    }
    assert_eq!(upstream.calls(), 1);
    assert_eq!((notices(0), notices(1)), (0, 1));
    let page = fleet[1].proxy().render_metrics().await;
    assert!(page.contains("corral_notices_received_total 1"), "{page}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn embedded_mode_coalesces_in_process() {
    let upstream = Upstream::start().await;
    upstream.set_delay(Duration::from_millis(300));
    let cfg = config(None, &recommend_route(&upstream.url(), ""));
    let fleet = start(1, &cfg).await;
    let client = Client::new();

    let answers = spread(&client, &fleet, "/recommend?segment=a", 500).await;

    assert_eq!(upstream.calls(), 1);
    assert!(answers.iter().all(|r| r.status == 200));
    let bodies: HashSet<_> = answers.iter().map(|r| r.body.clone()).collect();
    assert_eq!(bodies.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_garbled_redis_value_is_a_miss_never_served() {
    let redis = RedisServer::start().await;
    let upstream = Upstream::start().await;
    let cfg = config(Some(&redis.url()), &recommend_route(&upstream.url(), ""));
    let client = Client::new();

    let first = start(1, &cfg).await;
    client
        .get(&url(&first[0], "/recommend?segment=a"), &[])
        .await;
    let entries: Vec<String> = redis
        .keys("corral:test:recommend:*")
        .await
        .into_iter()
        .filter(|k| !k.contains(":lock:"))
        .collect();
    assert_eq!(entries.len(), 1);
    let mut conn = redis.conn().await;
    let _: () = redis::cmd("SET")
        .arg(&entries[0])
        .arg("not an entry")
        .query_async(&mut conn)
        .await
        .expect("overwrite the entry");

    let second = start(1, &cfg).await;
    let answer = client
        .get(&url(&second[0], "/recommend?segment=a"), &[])
        .await;
    assert_eq!(answer.status, 200);
    assert_ne!(answer.body.as_ref(), b"not an entry");
    assert_eq!(
        answer.cache_status().as_deref(),
        Some("corral; fwd=miss; stored")
    );
    assert_eq!(upstream.calls(), 2);
}

/// A started instance has opened all three of its Redis connections — command, lease keeper,
/// pub/sub — before its first request, so a cold burst's first lookups, which run on the lease
/// keeper's connection within the lock budget, pay for no connection (nor, behind sentinels, for
/// finding the master).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_started_instance_has_every_redis_connection_open_before_its_first_request() {
    let redis = RedisServer::start().await;
    let upstream = Upstream::start().await;
    let cfg = config(Some(&redis.url()), &recommend_route(&upstream.url(), ""));
    let _fleet = start(1, &cfg).await;

    let mut conn = redis.conn().await;
    let list: String = redis::cmd("CLIENT")
        .arg("LIST")
        .query_async(&mut conn)
        .await
        .expect("CLIENT LIST");
    // Every client but this probe, with the last command each ran.
    let clients: Vec<&str> = list
        .lines()
        .filter(|l| !l.contains("cmd=client|list"))
        .collect();
    assert_eq!(clients.len(), 3, "command, lease keeper, pub/sub:\n{list}");
    assert_eq!(upstream.calls(), 0, "nothing was requested yet");
}
