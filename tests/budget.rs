//! The fleet-wide budget on upstream calls (`fleet_concurrency`): however many instances and keys
//! miss at once, the upstream never has more than the budget's calls in flight; the queue serves
//! the call that answers the most requests first; a dead instance's slots come back within their
//! lease; and with Redis gone each instance keeps to its share.
//!
//! Every instance here is a real Corral with its own Redis connections (in this process, or a
//! process of its own where one must be SIGKILLed); the upstream records its own peak of calls in
//! flight.

mod support;

use std::time::Duration;

use futures_util::StreamExt;
use futures_util::future::join_all;
use support::corral::{
    admin_url, config, config_text, config_with_server, recommend_route, start, url,
};
use support::{Client, CorralProcess, RedisServer, Reply, Upstream, eventually};

/// The keys of budget `name` in the tests' namespace.
fn budget_key(name: &str, part: &str) -> String {
    format!("corral:test:budget:{{{name}}}:{part}")
}

/// A metric's value on a page of metrics (0 when absent).
fn metric(page: &str, line_start: &str) -> f64 {
    page.lines()
        .find(|l| l.starts_with(line_start))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_cold_keys_over_three_instances_never_exceed_the_fleet_budget() {
    let redis = RedisServer::start().await;
    let upstream = Upstream::start().await;
    upstream.set_delay(Duration::from_millis(100));
    // At the defaults: a fill may queue for its slot within `upstream_timeout`, and its waiters
    // (on every instance) wait with it.
    let extra = "fleet_concurrency = 20";
    let routes = recommend_route(&upstream.url(), extra);
    let fleet = start(3, &config(Some(&redis.url()), &routes)).await;
    let client = Client::new();

    // Every key asked on every instance at once: 3000 requests, 1000 keys.
    let requests = (0..1000).flat_map(|key| {
        fleet
            .iter()
            .map(move |instance| (key, instance))
            .collect::<Vec<_>>()
    });
    let answers = join_all(requests.map(|(key, instance)| {
        let client = client.clone();
        let target = url(instance, &format!("/recommend?item={key}"));
        async move { client.get(&target, &[]).await }
    }))
    .await;

    let statuses: Vec<u16> = answers.iter().map(|a| a.status).collect();
    assert!(
        statuses.iter().all(|&s| s == 200),
        "every request answered: {:?}",
        statuses
            .iter()
            .filter(|&&s| s != 200)
            .take(5)
            .collect::<Vec<_>>()
    );
    assert_eq!(upstream.calls(), 1000, "one call per key");
    assert!(
        upstream.max_in_flight() <= 20,
        "{} upstream calls in flight at once",
        upstream.max_in_flight()
    );
    // Nothing is left held or queued once the burst is over.
    let mut conn = redis.conn().await;
    let held: u64 = redis::cmd("ZCARD")
        .arg(budget_key("recommend", "held"))
        .query_async(&mut conn)
        .await
        .unwrap_or(u64::MAX);
    eventually(
        "every slot given back",
        Duration::from_secs(10),
        async || {
            let mut conn = redis.conn().await;
            let held: u64 = redis::cmd("ZCARD")
                .arg(budget_key("recommend", "held"))
                .query_async(&mut conn)
                .await
                .unwrap_or(u64::MAX);
            held == 0
        },
    )
    .await;
    assert!(held <= 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pass_through_calls_count_in_the_fleet_budget_too() {
    let redis = RedisServer::start().await;
    let upstream = Upstream::start().await;
    upstream.set_delay(Duration::from_millis(200));
    let routes = format!(
        "[[route]]\nname = \"ticket\"\npath_prefix = \"/queue\"\nupstream = \"{}\"\n\
         cache = false\nfleet_concurrency = 3\n",
        upstream.url()
    );
    let fleet = start(2, &config(Some(&redis.url()), &routes)).await;
    let client = Client::new();

    let answers = join_all((0..30).map(|i| {
        let target = url(&fleet[i % 2], &format!("/queue/ticket-{i}"));
        let client = client.clone();
        async move { client.get(&target, &[]).await.status }
    }))
    .await;

    assert!(answers.iter().all(|&s| s == 200), "{answers:?}");
    assert_eq!(
        upstream.calls(),
        30,
        "every ticket is its caller's own call"
    );
    assert!(
        upstream.max_in_flight() <= 3,
        "{}",
        upstream.max_in_flight()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_call_that_answers_the_most_requests_gets_the_next_slot() {
    let redis = RedisServer::start().await;
    let upstream = Upstream::start().await;
    upstream.script(
        "/recommend/busy",
        Reply::status(200)
            .body("busy")
            .delay(Duration::from_secs(8)),
    );
    let routes = recommend_route(&upstream.url(), "fleet_concurrency = 1");
    let fleet = start(1, &config(Some(&redis.url()), &routes)).await;
    let client = Client::new();
    let at = |path: &str| url(&fleet[0], path);

    // The one slot is busy; then one request queues for `few`, and after it twenty for `many`.
    let busy = client.spawn_get(at("/recommend/busy"));
    upstream.wait_in_flight(1).await;
    let few = client.spawn_get(at("/recommend/few"));
    let queue = budget_key("recommend", "queue");
    // The queue's tokens and scores, lowest (served first) first.
    let scores = async || -> Vec<f64> {
        let mut conn = redis.conn().await;
        let flat: Result<Vec<String>, _> = redis::cmd("ZRANGE")
            .arg(&queue)
            .arg(0)
            .arg(-1)
            .arg("WITHSCORES")
            .query_async(&mut conn)
            .await;
        let flat = flat.unwrap_or_else(|e| panic!("ZRANGE {queue}: {e}"));
        flat.chunks(2)
            .filter_map(|pair| pair.get(1)?.parse().ok())
            .collect()
    };
    eventually("`few` queued", Duration::from_secs(10), async || {
        scores().await.len() == 1
    })
    .await;
    let many: Vec<_> = (0..20)
        .map(|_| client.spawn_get(at("/recommend/many")))
        .collect();
    // `many` renews its place with its weight (20 requests) every lease (2 s here, while `busy`
    // holds the slot for 8): it leads `few` by more than the second of boost those are worth.
    eventually(
        "`many` queued ahead of `few`",
        Duration::from_secs(10),
        async || matches!(scores().await[..], [many, few] if few - many > 1000.0),
    )
    .await;

    for answer in join_all(many).await {
        assert_eq!(answer.map(|a| a.status).unwrap_or(0), 200);
    }
    assert_eq!(few.await.map(|a| a.status).unwrap_or(0), 200);
    assert_eq!(busy.await.map(|a| a.status).unwrap_or(0), 200);
    let (many_at, few_at) = (
        upstream.first_answer("/recommend/many"),
        upstream.first_answer("/recommend/few"),
    );
    assert!(
        matches!((many_at, few_at), (Some(m), Some(f)) if m < f),
        "`many` (20 requests) was called before `few` (1): {many_at:?} vs {few_at:?}"
    );
    assert_eq!(upstream.calls_for("/recommend/many"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_instance_gives_its_slots_back_within_the_lease() {
    let redis = RedisServer::start().await;
    let upstream = Upstream::start().await;
    upstream.script(
        "/recommend/stuck",
        Reply::status(200)
            .body("late")
            .delay(Duration::from_secs(30)),
    );
    let routes = recommend_route(
        &upstream.url(),
        "fleet_concurrency = 2\nlock = { lease = \"1s\" }",
    );
    let text = config_text("", Some(&redis.url()), &routes);
    let mut doomed = CorralProcess::start(&text).await;
    let client = Client::new();

    // The doomed process holds both slots, then dies without giving them back.
    let _stuck: Vec<_> = (0..2)
        .map(|i| client.spawn_get(doomed.url(&format!("/recommend/stuck{i}"))))
        .collect();
    upstream.wait_in_flight(2).await;
    doomed.kill();

    // Another instance gets a slot once their leases run out, and says it took them back.
    let fleet = start(1, &config(Some(&redis.url()), &routes)).await;
    let answer = client
        .get(&url(&fleet[0], "/recommend?item=next"), &[])
        .await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    assert_eq!(upstream.calls_for("/recommend?item=next"), 1);
    let page = fleet[0].proxy().render_metrics().await;
    assert_eq!(
        metric(
            &page,
            "corral_budget_slots_reclaimed_total{budget=\"recommend\"}"
        ),
        2.0,
        "{page}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_gone_each_instance_keeps_to_its_share() {
    let mut redis = RedisServer::start().await;
    let upstream = Upstream::start().await;
    upstream.set_delay(Duration::from_millis(200));
    let routes = recommend_route(&upstream.url(), "fleet_concurrency = 4");
    let fleet = start(2, &config(Some(&redis.url()), &routes)).await;
    let client = Client::new();

    // Both instances use the budget while Redis is up: each learns there are two.
    // (Twice round, so the first has seen the second.)
    for round in 0..2 {
        for (i, instance) in fleet.iter().enumerate() {
            let target = url(instance, &format!("/recommend?item=warm{round}-{i}"));
            assert_eq!(client.get(&target, &[]).await.status, 200);
        }
    }
    redis.kill();
    upstream.reset_calls();

    let answers = join_all((0..40).map(|i| {
        let target = url(&fleet[i % 2], &format!("/recommend?item=cold{i}"));
        let client = client.clone();
        async move { client.get(&target, &[]).await.status }
    }))
    .await;

    assert!(answers.iter().all(|&s| s == 200), "{answers:?}");
    assert_eq!(upstream.calls(), 40);
    assert!(
        upstream.max_in_flight() <= 4,
        "two instances with a share of 2 each: {} in flight",
        upstream.max_in_flight()
    );
    for instance in &fleet {
        let page = instance.proxy().render_metrics().await;
        assert_eq!(
            metric(&page, "corral_budget_fallback{budget=\"recommend\"}"),
            1.0,
            "{page}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_soft_tag_purge_of_two_thousand_entries_refreshes_them_within_the_budget_answering_stale()
{
    const KEYS: usize = 2000;
    let redis = RedisServer::start().await;
    let upstream = Upstream::start().await;
    upstream.script(
        "/recommend",
        Reply::status(200).header("surrogate-key", "catalogue"),
    );
    let routes = recommend_route(&upstream.url(), "ttl = \"10m\"\nfleet_concurrency = 10");
    let cfg = config_with_server(
        "admin_listen = \"127.0.0.1:0\"",
        Some(&redis.url()),
        &routes,
    );
    let fleet = start(2, &cfg).await;
    let client = Client::new();
    let paths: Vec<String> = (0..KEYS).map(|k| format!("/recommend?item={k}")).collect();
    // 200 requests at a time per instance: a client's realistic fan-in, not 2000 connects at once.
    let ask_all = async |instance: usize| {
        futures_util::stream::iter(paths.iter().map(|p| {
            let target = url(&fleet[instance], p);
            let client = client.clone();
            async move { client.get(&target, &[]).await }
        }))
        .buffered(200)
        .collect::<Vec<_>>()
        .await
    };
    for answer in ask_all(0).await {
        assert_eq!(answer.status, 200);
    }
    assert_eq!(upstream.calls(), KEYS as u64);

    // Refreshes take a while at the upstream, so the test sees what is answered meanwhile.
    upstream.script(
        "/recommend",
        Reply::status(200)
            .header("surrogate-key", "catalogue")
            .delay(Duration::from_millis(50)),
    );
    upstream.reset_calls();
    let purge = client
        .post(
            &admin_url(&fleet[0], "/purge"),
            &[],
            r#"{"tag": "catalogue", "soft": true}"#.to_owned(),
        )
        .await;
    assert_eq!(purge.status, 200, "{}", purge.text());
    assert_eq!(purge.json()["marked"].as_u64(), Some(KEYS as u64));

    // Every key asked on both instances at once: each answered at once, stale, while the fleet
    // refreshes each key once — never more than the budget at the upstream.
    let (first, second) = tokio::join!(ask_all(0), ask_all(1));
    for answer in first.iter().chain(&second) {
        assert_eq!(answer.status, 200);
        let status = answer.cache_status().unwrap_or_default();
        assert!(status.contains("stale"), "answered stale: {status}");
    }
    // A refresh that found no slot within `upstream_timeout` (on a machine busier than this
    // test's) leaves its entry stale for the next request to refresh: ask again until all fresh.
    eventually(
        "every key refreshed",
        Duration::from_secs(180),
        async || {
            if upstream.calls() >= KEYS as u64 {
                return true;
            }
            tokio::time::sleep(Duration::from_secs(5)).await;
            let answers = ask_all(0).await;
            let stale = answers.iter().any(|a| {
                a.cache_status()
                    .is_some_and(|status| status.contains("stale"))
            });
            !stale && upstream.calls() >= KEYS as u64
        },
    )
    .await;
    assert_eq!(
        upstream.calls(),
        KEYS as u64,
        "one refresh per key, fleet-wide"
    );
    assert!(
        upstream.max_in_flight() <= 10,
        "{} refreshes in flight at once",
        upstream.max_in_flight()
    );
}
