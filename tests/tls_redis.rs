//! Redis over TLS (issue 18): `rediss://` to a `redis-server` started with `--tls-port` and
//! certificates made at test time, with Corral trusting the test CA (`[redis] tls.ca_file`) and
//! presenting a client certificate the server requires (`client_cert_file`, `client_key_file`).
//!
//! - a fill stored over TLS is read by another instance without the upstream;
//! - a stampede of 300 requests over 3 instances, through an HTTPS upstream and `rediss://`,
//!   makes exactly one upstream call;
//! - without the client certificate the server refuses Corral, which serves degraded (its own
//!   fills) rather than hanging;
//! - behind sentinels that speak TLS only (and a master and replica that do too), with a private
//!   CA and client certificates everywhere: a stampede makes one upstream call, Corral listens to
//!   the sentinels' `+switch-master` over TLS, and follows a failover on that event alone;
//! - on a Redis Cluster whose nodes speak TLS only (client port and cluster bus), requiring
//!   client certificates: a stampede makes one upstream call.

mod support;

use std::collections::HashSet;
use std::time::Duration;

use support::corral::{
    cluster_table, full_text, parse, recommend_route, redis_table, sentinel_table, spread, start,
    url,
};
use support::sentinel::MASTER_NAME;
use support::{
    Client, NodeTls, Pki, RedisCluster, RedisSentinel, RedisServer, Upstream, eventually,
};

/// A waiter not woken by the fill notice could only finish with a 504 (lease ≫ wait budget).
const NOTICE_OR_504: &str =
    r#"lock = { scope = "fleet", lease = "30s", wait_timeout = "10s", on_wait_timeout = "504" }"#;

/// A full config with `[redis]` at `redis` over TLS, trusting `pki` and presenting `client`.
fn tls_config(
    redis: &RedisServer,
    pki: &Pki,
    client: Option<&support::Leaf>,
    routes: &str,
) -> corral::Config {
    let identity = client.map_or_else(String::new, |leaf| {
        format!(
            ", client_cert_file = \"{}\", client_key_file = \"{}\"",
            leaf.cert.display(),
            leaf.key.display()
        )
    });
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nshutdown_timeout = \"2s\"\n\n{}tls = {{ ca_file = \"{}\"{identity} }}\n\n{routes}",
        redis_table(&redis.url()),
        pki.ca_file().display()
    );
    match corral::Config::parse(&text, std::path::Path::new("<test>")) {
        Ok(config) => config,
        Err(err) => panic!("test config does not validate: {err}\n{text}"),
    }
}

#[tokio::test]
async fn a_fill_stored_over_tls_serves_another_instance() {
    let pki = Pki::new();
    let redis = RedisServer::start_tls(&pki, true).await;
    assert!(redis.url().starts_with("rediss://"));
    let upstream = Upstream::start().await;
    let me = pki.client("corral");
    let cfg = tls_config(
        &redis,
        &pki,
        Some(&me),
        &recommend_route(&upstream.url(), ""),
    );
    let fleet = start(2, &cfg).await;
    let client = Client::new();
    let first = client.get(&url(&fleet[0], "/recommend?k=1"), &[]).await;
    assert_eq!(first.status, 200, "{}", first.text());
    assert_eq!(
        redis.keys("corral:test:recommend:*").await.len(),
        1,
        "stored in Redis over TLS"
    );
    let second = client.get(&url(&fleet[1], "/recommend?k=1"), &[]).await;
    assert_eq!(second.status, 200);
    assert_eq!(second.body, first.body);
    assert_eq!(second.cache_status().as_deref(), Some("corral; hit"));
    assert_eq!(
        upstream.calls(),
        1,
        "the second instance read Redis, not the upstream"
    );
    for instance in fleet {
        assert!(!instance.proxy().degraded(), "Redis is reachable over TLS");
        instance.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stampede_through_https_and_rediss_makes_one_upstream_call() {
    let pki = Pki::new();
    let redis = RedisServer::start_tls(&pki, true).await;
    let leaf = pki.server(&["127.0.0.1"]);
    let upstream = Upstream::start_tls(pki.server_config(&leaf, &[b"h2", b"http/1.1"], None)).await;
    upstream.set_delay(Duration::from_millis(500));
    let me = pki.client("corral");
    let routes = recommend_route(
        &upstream.url(),
        &format!(
            "tls = {{ ca_file = \"{}\" }}\n\
             lock = {{ scope = \"fleet\", lease = \"30s\", wait_timeout = \"10s\", on_wait_timeout = \"504\" }}",
            pki.ca_file().display()
        ),
    );
    let cfg = tls_config(&redis, &pki, Some(&me), &routes);
    let fleet = start(3, &cfg).await;
    let client = Client::new();
    let answers = spread(&client, &fleet, "/recommend?segment=tls", 300).await;
    one_call_answered_everyone(&answers, &upstream);
    let stats = redis.commandstats().await;
    assert_eq!(stats.calls("publish"), 1, "{stats:?}");
    for instance in fleet {
        instance.shutdown().await;
    }
}

#[tokio::test]
async fn a_server_that_requires_a_client_certificate_refuses_corral_without_one() {
    let pki = Pki::new();
    let redis = RedisServer::start_tls(&pki, true).await;
    let upstream = Upstream::start().await;
    let cfg = tls_config(&redis, &pki, None, &recommend_route(&upstream.url(), ""));
    let fleet = start(1, &cfg).await;
    // Degraded, not stuck: the request is answered from the upstream.
    let resp = Client::new()
        .get(&url(&fleet[0], "/recommend?k=2"), &[])
        .await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert!(
        redis.keys("corral:*").await.is_empty(),
        "nothing reached Redis"
    );
    for instance in fleet {
        instance.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stampede_behind_tls_sentinels_makes_one_upstream_call() {
    support::logs();
    let pki = Pki::new();
    let tls = NodeTls::new(&pki);
    let mut deployment = RedisSentinel::start_tls(&tls).await;
    let sentinels = deployment.sentinel_urls();
    assert!(sentinels.iter().all(|u| u.starts_with("rediss://")));
    let upstream = Upstream::start().await;
    upstream.set_delay(Duration::from_millis(500));
    let routes = recommend_route(&upstream.url(), NOTICE_OR_504);
    let redis = format!(
        "{}{}",
        sentinel_table(&sentinels, MASTER_NAME),
        tls.corral_table()
    );
    let cfg = parse(&full_text("", &redis, &routes));
    let fleet = start(3, &cfg).await;
    let old = deployment.first_master_port();

    // Step 1: every hub found the master through the sentinels and subscribed on it, and every
    // `+switch-master` listener (three per instance: the command connection's, the lease
    // keeper's and the hub's) is subscribed on a sentinel — all over TLS, each presenting
    // Corral's client certificate.
    eventually(
        "every hub subscribed on the master over TLS",
        Duration::from_secs(15),
        async || deployment.pubsub_clients(old).await == 3,
    )
    .await;
    eventually(
        "every +switch-master listener subscribed on a sentinel over TLS",
        Duration::from_secs(15),
        async || {
            deployment
                .sentinel_subscribers()
                .await
                .iter()
                .sum::<usize>()
                == 9
        },
    )
    .await;

    // Step 2: a stampede over the three instances makes one upstream call.
    let client = Client::new();
    let answers = spread(&client, &fleet, "/recommend?segment=sentinel-tls", 300).await;
    one_call_answered_everyone(&answers, &upstream);
    for instance in &fleet {
        assert!(!instance.proxy().degraded(), "Redis is reachable over TLS");
    }

    // Step 3: the master stops answering but closes nothing; only the sentinels' event (heard
    // over TLS) can move the hubs to the promoted replica, which they reach over TLS too.
    deployment.pause_server(old);
    let new = deployment.wait_failover(old, Duration::from_secs(30)).await;
    eventually(
        "every hub moved to the new master on the event",
        Duration::from_secs(15),
        async || deployment.pubsub_clients(new).await == 3,
    )
    .await;
    upstream.reset_calls();
    let answers = spread(&client, &fleet, "/recommend?segment=after", 300).await;
    assert!(
        answers.iter().all(|r| r.status == 200),
        "every request answered 200"
    );
    assert_eq!(upstream.calls(), 1, "one call after the failover too");
    for instance in fleet {
        instance.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stampede_on_a_tls_cluster_makes_one_upstream_call() {
    let pki = Pki::new();
    let tls = NodeTls::new(&pki);
    let cluster = RedisCluster::start_tls(&tls).await;
    let nodes = cluster.urls();
    assert!(nodes.iter().all(|u| u.starts_with("rediss://")));
    let upstream = Upstream::start().await;
    upstream.set_delay(Duration::from_millis(500));
    let routes = recommend_route(&upstream.url(), NOTICE_OR_504);
    let redis = format!("{}{}", cluster_table(&nodes), tls.corral_table());
    let cfg = parse(&full_text("", &redis, &routes));
    let fleet = start(3, &cfg).await;
    let client = Client::new();
    let path = "/recommend?segment=cluster-tls";
    let answers = spread(&client, &fleet, path, 300).await;
    one_call_answered_everyone(&answers, &upstream);
    assert_eq!(
        cluster.keys("corral:test:recommend:*").await.len(),
        1,
        "the entry is stored in the cluster, over TLS"
    );
    for instance in fleet {
        assert!(
            !instance.proxy().degraded(),
            "the cluster is reachable over TLS"
        );
        instance.shutdown().await;
    }
}

/// Every answer of a stampede is a 200 with the same body, from one upstream call.
fn one_call_answered_everyone(answers: &[support::Resp], upstream: &Upstream) {
    assert!(
        answers.iter().all(|r| r.status == 200),
        "every request answered 200"
    );
    let bodies: HashSet<_> = answers.iter().map(|r| r.body.clone()).collect();
    assert_eq!(bodies.len(), 1, "every request got the same body");
    assert_eq!(
        upstream.calls(),
        1,
        "the fleet called the upstream more than once"
    );
}
