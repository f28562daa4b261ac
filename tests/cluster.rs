//! Cluster mode end to end: a fleet of Corral instances sharing a real three-master Redis
//! Cluster purges by URL, tag and route with keys spread over every master, and its hub moves to
//! the next seed when its node dies. The guarantees every topology keeps (one upstream call per
//! key, L2 reuse by a fresh instance) are in `topologies.rs`.

mod support;

use std::time::Duration;

use futures_util::future::join_all;
use support::corral::{admin_url, cluster_config, entry_name, recommend_route, start, url};
use support::fleet::ADMIN;
use support::{Client, RedisCluster, Reply, Upstream, eventually};

/// How long an invalidation or a subscription gets to reach another instance.
const SETTLE: Duration = Duration::from_secs(15);

/// `POST /purge` on an instance's admin listener; asserts 200 and returns `purged`.
async fn purge(client: &Client, instance: &corral::Instance, body: &str) -> u64 {
    let target = admin_url(instance, "/purge");
    let headers = [("content-type", "application/json")];
    let answer = client.post(&target, &headers, body.to_owned()).await;
    assert_eq!(answer.status, 200, "purge {body}: {}", answer.text());
    answer.json()["purged"]
        .as_u64()
        .unwrap_or_else(|| panic!("purge {body}: no count in {}", answer.text()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cluster_purges_by_url_tag_and_route_reach_every_node_and_instance() {
    let cluster = RedisCluster::start().await;
    let upstream = Upstream::start().await;
    let tagged: Vec<String> = (0..8).map(|i| format!("/recommend/tagged-{i}")).collect();
    let plain: Vec<String> = (0..8).map(|i| format!("/recommend/plain-{i}")).collect();
    for path in &tagged {
        upstream.script(
            path,
            Reply::status(200).header("surrogate-key", "article-7"),
        );
    }
    let cfg = cluster_config(
        ADMIN,
        &cluster.urls(),
        &recommend_route(&upstream.url(), ""),
    );
    let fleet = start(3, &cfg).await;
    let client = Client::new();
    let entries = "corral:test:recommend:{*";

    // Step 1: fill 16 keys through the first instance; read them through the others, so every
    // instance holds them in L1. They spread over all three masters.
    for path in tagged.iter().chain(&plain) {
        for instance in &fleet {
            assert_eq!(client.get(&url(instance, path), &[]).await.status, 200);
        }
    }
    assert_eq!(upstream.calls(), 16);
    assert_eq!(cluster.keys(entries).await.len(), 16);
    assert_eq!(cluster.masters_holding(entries).await, 3);
    for instance in &fleet {
        assert_eq!(instance.proxy().l1().entry_count().await, 16);
    }

    // Step 2: purge one URL through the second instance: gone from the cluster and every L1.
    assert_eq!(
        purge(&client, &fleet[1], r#"{"url": "/recommend/plain-0"}"#).await,
        1
    );
    assert_eq!(cluster.keys(entries).await.len(), 15);
    for instance in &fleet {
        eventually("the instance dropped the purged URL", SETTLE, async || {
            instance.proxy().l1().entry_count().await == 15
        })
        .await;
    }

    // Step 3: purge the tag through the third instance: its 8 entries sit in many slots on
    // several nodes, and are all deleted; the tag index goes too.
    assert_eq!(
        purge(&client, &fleet[2], r#"{"tag": "article-7"}"#).await,
        8
    );
    assert_eq!(cluster.keys(entries).await.len(), 7);
    // The upstream's tag index goes (the indexes of the path prefixes, ` path:…`, are the
    // entries' own and expire with them).
    assert!(cluster.keys("corral:test:#tags:[^ ]*").await.is_empty());
    for instance in &fleet {
        eventually(
            "the instance dropped the tagged entries",
            SETTLE,
            async || instance.proxy().l1().entry_count().await == 7,
        )
        .await;
    }

    // Step 4: purge the route through the first instance: every master is scanned.
    assert_eq!(
        purge(&client, &fleet[0], r#"{"route": "recommend"}"#).await,
        7
    );
    assert!(cluster.keys(entries).await.is_empty());
    for instance in &fleet {
        eventually(
            "the instance dropped the route's entries",
            SETTLE,
            async || instance.proxy().l1().entry_count().await == 0,
        )
        .await;
    }

    // Step 5: the next read refills once for the fleet.
    upstream.reset_calls();
    let answers = join_all(fleet.iter().map(|instance| {
        let (client, target) = (client.clone(), url(instance, "/recommend/tagged-3"));
        async move { client.get(&target, &[]).await }
    }))
    .await;
    assert!(answers.iter().all(|a| a.status == 200));
    assert_eq!(upstream.calls(), 1);
    assert!(cluster.keys("corral:*:lock:*").await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cluster_pubsub_moves_to_the_next_seed_when_its_node_dies() {
    let mut cluster = RedisCluster::start().await;
    let upstream = Upstream::start().await;
    upstream.set_delay(Duration::from_millis(300));
    // A waiter not woken by the fill notice could only finish with a 504 (lease ≫ wait budget).
    let routes = recommend_route(
        &upstream.url(),
        r#"lock = { scope = "fleet", lease = "30s", wait_timeout = "10s", on_wait_timeout = "504" }"#,
    );
    let cfg = cluster_config(ADMIN, &cluster.urls(), &routes);
    let fleet = start(2, &cfg).await;
    let client = Client::new();

    // Step 1: both hubs subscribe on the first seed node.
    eventually("both hubs subscribed on seed 0", SETTLE, async || {
        cluster.pubsub_clients(0).await == 2
    })
    .await;

    // Step 2: a path whose entry lives on a node that stays up (not node 0).
    let mut path = None;
    for k in 0..100 {
        let candidate = format!("/recommend?segment=s{k}");
        if !cluster.serves(0, &entry_name(&cfg, &candidate)).await {
            path = Some(candidate);
            break;
        }
    }
    let path = path.expect("some key's slot is not on node 0");

    // Step 3: kill the first seed; both hubs move to the next seed.
    cluster.kill(0);
    eventually("both hubs re-subscribed on seed 1", SETTLE, async || {
        cluster.pubsub_clients(1).await == 2
    })
    .await;

    // Step 4: a stampede over both instances is still woken by the fill notice.
    let requests = (0..100).map(|i| {
        let (client, target) = (client.clone(), url(&fleet[i % 2], &path));
        async move { client.get(&target, &[]).await }
    });
    let answers = join_all(requests).await;
    assert!(
        answers.iter().all(|r| r.status == 200),
        "{:?}",
        answers.iter().map(|r| r.status).collect::<Vec<_>>()
    );
    assert_eq!(upstream.calls(), 1);
    for instance in &fleet {
        assert_eq!(instance.proxy().l1().entry_count().await, 1);
    }

    // Step 5: an invalidation published through one instance reaches the other's new node.
    let body = format!(r#"{{"url": "{path}"}}"#);
    assert_eq!(purge(&client, &fleet[1], &body).await, 1);
    eventually(
        "the other instance dropped the purged entry",
        SETTLE,
        async || fleet[0].proxy().l1().entry_count().await == 0,
    )
    .await;
}
