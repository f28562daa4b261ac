//! The fleet guarantees on every Redis topology — one server, a Cluster, behind Sentinel — each
//! written once and run once per topology: one upstream call per key however many requests and
//! instances, and a fresh instance answering from L2.

mod support;

use std::collections::HashSet;
use std::time::Duration;

use futures_util::future::join_all;
use support::corral::{entry_name, recommend_route, spread, start, url};
use support::{Client, Deployment, Topology, Upstream};

/// Runs a test body once per topology: `name::single`, `name::cluster`, `name::sentinel`.
macro_rules! per_topology {
    ($name:ident) => {
        mod $name {
            use super::*;

            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn single() {
                super::$name(Topology::Single).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn cluster() {
                super::$name(Topology::Cluster).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn sentinel() {
                super::$name(Topology::Sentinel).await;
            }
        }
    };
}

per_topology!(a_stampede_over_the_fleet_makes_one_upstream_call);
per_topology!(many_keys_over_the_fleet_make_one_call_per_key);
per_topology!(a_fresh_instance_answers_from_l2_without_the_upstream);

/// A waiter not woken by the fill notice could only finish with a 504 (lease ≫ wait budget).
const NOTICE_OR_504: &str =
    r#"lock = { scope = "fleet", lease = "30s", wait_timeout = "10s", on_wait_timeout = "504" }"#;

fn count(statuses: &[String], value: &str) -> usize {
    statuses.iter().filter(|s| s.as_str() == value).count()
}

/// The entries (not locks, not uncacheable markers) of the `recommend` route, wherever they live.
async fn entries(redis: &Deployment) -> Vec<String> {
    let keys = redis.keys("corral:test:recommend:*").await;
    keys.into_iter()
        .filter(|k| !k.contains(":lock:") && !k.contains(":pass:"))
        .collect()
}

async fn a_stampede_over_the_fleet_makes_one_upstream_call(topology: Topology) {
    let (instances, requests) = match topology {
        Topology::Single => (3, 900),
        Topology::Cluster => (3, 300),
        Topology::Sentinel => (2, 200),
    };
    let redis = topology.start().await;
    let upstream = Upstream::start().await;
    upstream.set_delay(Duration::from_millis(300));
    let cfg = redis.config("", &recommend_route(&upstream.url(), NOTICE_OR_504));
    let fleet = start(instances, &cfg).await;
    let client = Client::new();
    redis.hubs_subscribed(instances).await;

    // Step 1: identical requests, spread over the instances, all at once.
    let path = "/recommend?segment=sports&article=42";
    let answers = spread(&client, &fleet, path, requests).await;

    // Step 2: one upstream call, identical 200s.
    assert_eq!(
        upstream.calls(),
        1,
        "{topology:?}: the fleet called the upstream more than once"
    );
    assert!(
        answers.iter().all(|r| r.status == 200),
        "{topology:?}: every request answered 200"
    );
    let bodies: HashSet<_> = answers.iter().map(|r| r.body.clone()).collect();
    assert_eq!(
        bodies.len(),
        1,
        "{topology:?}: every request got the same body"
    );

    // Step 3: exactly one response says it triggered the fill; the rest were hits or coalesced.
    let statuses: Vec<String> = answers
        .iter()
        .map(|r| r.cache_status().as_deref().unwrap_or("").to_owned())
        .collect();
    assert_eq!(
        count(&statuses, "corral; fwd=miss; stored"),
        1,
        "{topology:?}"
    );
    assert_eq!(
        count(&statuses, "corral; fwd=miss; collapsed") + count(&statuses, "corral; hit"),
        requests - 1,
        "{topology:?}"
    );

    // Step 4: on one server, Redis saw one PUBLISH for the fill, and at most one lock attempt
    // per instance (plus the one SET of the entry inside the store script).
    if let Deployment::Single(server) = &redis {
        let stats = server.commandstats().await;
        assert_eq!(stats.calls("publish"), 1, "{stats:?}");
        assert!(stats.calls("set") <= 3 + 1, "{stats:?}");
    }

    // Step 5: the entry is stored, and no lock is left behind.
    assert_eq!(
        entries(&redis).await,
        vec![entry_name(&cfg, path)],
        "{topology:?}"
    );
    assert!(
        redis.keys("corral:*:lock:*").await.is_empty(),
        "{topology:?}"
    );
    for instance in fleet {
        instance.shutdown().await;
    }
}

async fn many_keys_over_the_fleet_make_one_call_per_key(topology: Topology) {
    let (keys, per_key) = match topology {
        Topology::Single => (100, 10),
        Topology::Cluster | Topology::Sentinel => (50, 6),
    };
    let redis = topology.start().await;
    let upstream = Upstream::start().await;
    upstream.set_delay(Duration::from_millis(200));
    let cfg = redis.config("", &recommend_route(&upstream.url(), ""));
    let fleet = start(3, &cfg).await;
    let client = Client::new();

    // Step 1: every key requested several times, spread over the instances, all at once.
    let requests = (0..keys)
        .flat_map(|k| (0..per_key).map(move |i| (k, i)))
        .map(|(k, i)| {
            let client = client.clone();
            let target = url(&fleet[(k + i) % 3], &format!("/recommend?segment=s{k}"));
            async move { client.get(&target, &[]).await.status }
        });
    let statuses = join_all(requests).await;

    // Step 2: one call per key.
    assert!(
        statuses.iter().all(|s| *s == 200),
        "{topology:?}: {statuses:?}"
    );
    assert_eq!(upstream.calls(), keys as u64, "{topology:?}");
    for k in 0..keys {
        assert_eq!(upstream.calls_for(&format!("/recommend?segment=s{k}")), 1);
    }

    // Step 3: every entry is stored (in a cluster, on every master: the keys spread over the
    // slots); no lock left.
    assert_eq!(entries(&redis).await.len(), keys, "{topology:?}");
    if let Deployment::Cluster(cluster) = &redis {
        assert_eq!(cluster.masters_holding("corral:test:recommend:{*").await, 3);
    }
    assert!(
        redis.keys("corral:*:lock:*").await.is_empty(),
        "{topology:?}"
    );
}

async fn a_fresh_instance_answers_from_l2_without_the_upstream(topology: Topology) {
    let redis = topology.start().await;
    let upstream = Upstream::start().await;
    let cfg = redis.config("", &recommend_route(&upstream.url(), ""));
    let client = Client::new();

    let first = start(1, &cfg).await;
    let filled = client
        .get(&url(&first[0], "/recommend?segment=a"), &[])
        .await;
    assert_eq!(
        filled.cache_status().as_deref(),
        Some("corral; fwd=miss; stored"),
        "{topology:?}"
    );

    // A new instance has an empty L1: it must answer from L2.
    let second = start(1, &cfg).await;
    let reused = client
        .get(&url(&second[0], "/recommend?segment=a"), &[])
        .await;
    assert_eq!(reused.status, 200, "{topology:?}");
    assert_eq!(reused.body, filled.body, "{topology:?}");
    assert_eq!(
        reused.cache_status().as_deref(),
        Some("corral; hit"),
        "{topology:?}"
    );
    assert!(reused.header("age").is_some(), "{topology:?}");
    assert_eq!(upstream.calls(), 1, "{topology:?}");

    // And it is now in that instance's L1 too.
    assert_eq!(
        second[0].proxy().l1().entry_count().await,
        1,
        "{topology:?}"
    );
}
