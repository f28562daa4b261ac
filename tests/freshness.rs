//! Freshness across the fleet: stale-while-revalidate with exactly one refresh, stale-if-error
//! standing in for a failed fill, XFetch early refresh, and negative caching.

mod support;

use std::collections::HashSet;
use std::time::Duration;

use futures_util::future::join_all;
use support::client::assert_all_stale;
use support::corral::{spread, url};
use support::{Fleet, RedisServer, Reply, eventually};

/// How long a background refresh gets to land and reach every instance.
const SETTLE: Duration = Duration::from_secs(10);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stale_while_revalidate_answers_at_once_and_refreshes_once_across_the_fleet() {
    let fleet = Fleet::start(3, "", "").await;
    let (client, upstream, redis) = (&fleet.client, &fleet.upstream, &fleet.redis);
    // Step 1: an entry that is stale from the start but may be served for 30 s while refreshed.
    upstream.script(
        "/recommend",
        Reply::status(200).header("cache-control", "max-age=0, stale-while-revalidate=30"),
    );
    let path = "/recommend?segment=a";
    let first = client.get(&url(&fleet[0], path), &[]).await;
    assert_eq!(
        first.cache_status().as_deref(),
        Some("corral; fwd=miss; stored")
    );
    assert_eq!(upstream.calls(), 1);

    // Step 2: the refresh will be slow and fresh for a minute.
    upstream.script(
        "/recommend",
        Reply::status(200)
            .header("cache-control", "max-age=60")
            .delay(Duration::from_secs(2)),
    );

    // Step 3: 600 requests over the three instances are all answered from the stale entry.
    let answers = spread(client, &fleet, path, 600).await;
    assert_all_stale(&answers, &first.body);

    // Step 4: exactly one refresh reached the upstream; every instance then serves its result.
    eventually("the refresh reached the upstream", SETTLE, async || {
        upstream.calls() == 2
    })
    .await;
    for instance in &fleet {
        eventually(
            "the instance serves the refreshed entry",
            SETTLE,
            async || {
                let answer = client.get(&url(instance, path), &[]).await;
                answer.cache_status().as_deref() == Some("corral; hit") && answer.body != first.body
            },
        )
        .await;
    }
    assert_eq!(upstream.calls(), 2, "one refresh for the whole fleet");
    assert!(redis.keys("corral:*:lock:*").await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stale_if_error_serves_every_waiter_the_stale_entry_when_the_fill_fails() {
    let fleet = Fleet::start(3, "", "").await;
    let (client, upstream, redis) = (&fleet.client, &fleet.upstream, &fleet.redis);
    upstream.script(
        "/recommend",
        Reply::status(200).header("cache-control", "max-age=0, stale-if-error=60"),
    );
    let path = "/recommend?segment=a";
    let first = client.get(&url(&fleet[0], path), &[]).await;
    assert_eq!(first.status, 200);

    // Step 1: the upstream now fails, slowly.
    upstream.script(
        "/recommend",
        Reply::status(500).delay(Duration::from_millis(300)),
    );
    let answers = spread(client, &fleet, path, 300).await;

    // Step 2: everyone got the stale entry; the failure was shared, not retried per waiter.
    assert_all_stale(&answers, &first.body);
    let failing_calls = upstream.calls() - 1;
    assert!(
        (1..=2).contains(&failing_calls),
        "{failing_calls} upstream calls for one failure"
    );

    // Step 3: an upstream that is gone altogether is a failure too.
    upstream.stop();
    let answers = spread(client, &fleet, path, 30).await;
    for answer in &answers {
        assert_eq!(answer.status, 200);
        assert_eq!(answer.body, first.body);
    }
    assert!(redis.keys("corral:*:lock:*").await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn early_refresh_keeps_a_busy_key_fresh_without_anyone_waiting() {
    let fleet = Fleet::start(2, "", "ttl = \"1s\"\nearly_refresh = { beta = 2.0 }").await;
    let (client, upstream, redis) = (&fleet.client, &fleet.upstream, &fleet.redis);
    upstream.set_delay(Duration::from_millis(100));
    let path = "/recommend?segment=a";
    client.get(&url(&fleet[0], path), &[]).await;

    // A steady stream across several expiries: 2 clients × 300 requests, 10 ms apart.
    let streams = fleet.iter().map(|instance| {
        let client = client.clone();
        let target = url(instance, path);
        async move {
            let mut seen = Vec::new();
            for _ in 0..300 {
                let answer = client.get(&target, &[]).await;
                seen.push((
                    answer.cache_status().as_deref().unwrap_or("").to_owned(),
                    answer.body.clone(),
                ));
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            seen
        }
    });
    let seen: Vec<_> = join_all(streams).await.into_iter().flatten().collect();

    // Nobody waited for the upstream: every answer was a hit (the fleet's first fill aside).
    for (status, _) in &seen {
        assert_eq!(status, "corral; hit", "a request waited for a fill");
    }
    // Refreshes happened, one upstream call each: each call produced a body someone saw (the
    // last refresh may still be landing when the stream ends).
    let bodies: HashSet<_> = seen.iter().map(|(_, body)| body.clone()).collect();
    assert!(bodies.len() >= 2, "no early refresh happened");
    assert!(
        upstream.calls() <= bodies.len() as u64 + 1,
        "{} calls for {} distinct refreshes",
        upstream.calls(),
        bodies.len()
    );
    // A refresh may still be running when the stream stops; its lock goes when it lands.
    eventually("the last refresh releases its lock", SETTLE, async || {
        redis.keys("corral:*:lock:*").await.is_empty()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_are_cached_only_when_listed_and_then_briefly() {
    let fleet = Fleet::start(1, "", "cache_statuses = [200, 404]\nerror_ttl = \"1s\"").await;
    let (client, upstream, redis) = (&fleet.client, &fleet.upstream, &fleet.redis);
    upstream.script("/recommend/missing", Reply::status(404));
    upstream.script("/recommend/broken", Reply::status(503));

    for _ in 0..3 {
        assert_eq!(
            client
                .get(&url(&fleet[0], "/recommend/missing"), &[])
                .await
                .status,
            404
        );
        assert_eq!(
            client
                .get(&url(&fleet[0], "/recommend/broken"), &[])
                .await
                .status,
            503
        );
    }
    assert_eq!(
        upstream.calls_for("/recommend/missing"),
        1,
        "404 is listed: cached"
    );
    assert_eq!(
        upstream.calls_for("/recommend/broken"),
        3,
        "503 is not: never cached"
    );

    // The stored 404 lives for error_ttl, not the route's 60 s ttl.
    let entries: Vec<String> = redis
        .keys("corral:test:recommend:*")
        .await
        .into_iter()
        .filter(|k| !k.contains(":lock:") && !k.contains(":pass:"))
        .collect();
    assert_eq!(entries.len(), 1);
    let mut conn = redis.conn().await;
    let pttl: i64 = redis::cmd("PTTL")
        .arg(&entries[0])
        .query_async(&mut conn)
        .await
        .expect("PTTL");
    assert!((1..=1000).contains(&pttl), "pttl {pttl}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_refresh_revalidates_with_the_entrys_validator_and_a_304_renews_it_fleet_wide() {
    let fleet = Fleet::start(2, "", "").await;
    let (client, upstream) = (&fleet.client, &fleet.upstream);
    // Step 1: an entry with a validator, stale at once, served stale while refreshed.
    upstream.script(
        "/recommend",
        Reply::status(200)
            .header("cache-control", "max-age=0, stale-while-revalidate=30")
            .header("etag", "\"v1\""),
    );
    let path = "/recommend?segment=revalidated";
    let first = client.get(&url(&fleet[0], path), &[]).await;
    assert_eq!(first.status, 200);

    // Step 2: the upstream has nothing new: it answers the conditional refresh with a 304.
    upstream.script(
        "/recommend",
        Reply::status(304)
            .header("cache-control", "max-age=60")
            .header("etag", "\"v1\"")
            .body(""),
    );
    let stale = client.get(&url(&fleet[1], path), &[]).await;
    assert_eq!(stale.body, first.body);

    // Step 3: the one refresh was conditional, and its 304 renewed the entry — same body, now
    // fresh — on every instance, with no further upstream call.
    eventually("the refresh reached the upstream", SETTLE, async || {
        upstream.calls() == 2
    })
    .await;
    let sent = upstream.last_headers(path).expect("the refresh's headers");
    assert_eq!(
        sent.get("if-none-match").and_then(|v| v.to_str().ok()),
        Some("\"v1\"")
    );
    for instance in &fleet {
        eventually(
            "the instance serves the renewed entry",
            SETTLE,
            async || {
                let answer = client.get(&url(instance, path), &[]).await;
                answer.status == 200
                    && answer.body == first.body
                    && answer
                        .cache_status()
                        .is_some_and(|s| s.starts_with("corral; hit"))
                    && !answer.cache_status().is_some_and(|s| s.contains("stale"))
            },
        )
        .await;
    }
    assert_eq!(
        upstream.calls(),
        2,
        "a 304 renews; nothing is fetched again"
    );
}

/// RFC 9111 §4.3: an entry past its usable life (here `must-revalidate`, so never served stale)
/// is not forgotten while it has a validator: the next miss asks the upstream conditionally, and
/// the upstream's 304 renews it — same body, the 304's fields merged — fleet-wide, without a
/// body transfer; the other instance then answers from the renewed entry.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_expired_entry_with_a_validator_is_revalidated_by_the_next_miss() {
    let fleet = Fleet::start(2, "", "").await;
    let (client, upstream) = (&fleet.client, &fleet.upstream);
    // Step 1: an entry with a validator that lives one second and may never be served stale.
    upstream.script(
        "/recommend",
        Reply::status(200)
            .header("cache-control", "max-age=1, must-revalidate")
            .header("etag", "\"v1\"")
            .body("first body"),
    );
    let path = "/recommend?segment=expired";
    let first = client.get(&url(&fleet[0], path), &[]).await;
    assert_eq!(first.status, 200);
    let copied = client.get(&url(&fleet[1], path), &[]).await;
    assert!(
        copied
            .cache_status()
            .is_some_and(|s| s.starts_with("corral; hit")),
        "{:?}",
        copied.cache_status()
    );
    assert_eq!(upstream.calls(), 1);

    // Step 2: let its lifetime pass; the upstream now answers a matching conditional with a 304.
    tokio::time::sleep(Duration::from_millis(1300)).await;
    upstream.script(
        "/recommend",
        Reply::status(304)
            .header("cache-control", "max-age=60")
            .header("etag", "\"v1\"")
            .header("x-renewed", "yes")
            .body(""),
    );

    // Step 3: the miss revalidates: one conditional call, and the requester gets the stored body
    // with the 304's fields — never the 304 itself.
    let renewed = client.get(&url(&fleet[0], path), &[]).await;
    assert_eq!(renewed.status, 200);
    assert_eq!(renewed.body, first.body);
    assert_eq!(renewed.header("x-renewed"), Some("yes"));
    assert_eq!(
        renewed.header("cache-status"),
        Some("corral; fwd=stale; fwd-status=304; stored"),
        "RFC 9211: the upstream answered this forward with a 304"
    );
    assert_eq!(upstream.calls(), 2);
    let sent = upstream
        .last_headers(path)
        .expect("the revalidation's headers");
    assert_eq!(
        sent.get("if-none-match").and_then(|v| v.to_str().ok()),
        Some("\"v1\"")
    );

    // Step 4: the renewal is fleet-wide: the other instance, which holds the expired copy,
    // answers from the renewed entry without calling the upstream.
    let elsewhere = client.get(&url(&fleet[1], path), &[]).await;
    assert_eq!(elsewhere.status, 200);
    assert_eq!(elsewhere.body, first.body);
    assert_eq!(elsewhere.header("x-renewed"), Some("yes"));
    assert!(
        elsewhere
            .cache_status()
            .is_some_and(|s| s.starts_with("corral; hit")),
        "{:?}",
        elsewhere.cache_status()
    );
    assert_eq!(
        upstream.calls(),
        2,
        "a 304 renews; nothing is fetched again"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn entries_filled_together_get_spread_lifetimes_and_the_upstreams_max_age_stays_exact() {
    const KEYS: usize = 50;
    let fleet = Fleet::start(1, "", "ttl = \"10s\"\nttl_jitter = 0.5").await;
    let (client, upstream, redis, cfg) = (&fleet.client, &fleet.upstream, &fleet.redis, &fleet.cfg);
    upstream.script(
        "/recommend/exact",
        Reply::status(200).header("cache-control", "max-age=60"),
    );

    // One burst of fills: half with Corral's own ttl, half with the upstream's max-age.
    let paths: Vec<String> = (0..KEYS)
        .map(|i| format!("/recommend?item={i}"))
        .chain((0..KEYS).map(|i| format!("/recommend/exact?item={i}")))
        .collect();
    let targets: Vec<String> = paths.iter().map(|p| url(&fleet[0], p)).collect();
    let answers = join_all(targets.iter().map(|t| client.get(t, &[]))).await;
    assert!(answers.iter().all(|a| a.status == 200));
    assert_eq!(upstream.calls(), 2 * KEYS as u64);

    // What each stored entry was given, read from Redis: its freshness lifetime, exactly.
    let mut heuristic = Vec::new();
    for path in &paths[..KEYS] {
        heuristic.push(stored_lifetime(redis, cfg, path).await);
    }
    for path in &paths[KEYS..] {
        let exact = stored_lifetime(redis, cfg, path).await;
        assert_eq!(exact, 60_000, "{path}: max-age kept exact");
    }
    assert!(
        heuristic.iter().all(|ms| (5_000..=10_000).contains(ms)),
        "within [ttl·(1 − j), ttl]: {heuristic:?}"
    );
    let distinct: HashSet<u64> = heuristic.iter().copied().collect();
    assert!(distinct.len() > KEYS / 2, "spread: {heuristic:?}");
    let (low, high) = (heuristic.iter().min(), heuristic.iter().max());
    assert!(
        low.zip(high).is_some_and(|(l, h)| h - l >= 1_000),
        "spread over more than a second of the 5 s window: {heuristic:?}"
    );
}

/// The freshness lifetime (ms) of the entry stored in Redis for a GET of `path`, as it was given.
async fn stored_lifetime(redis: &RedisServer, cfg: &corral::Config, path: &str) -> u64 {
    let mut conn = redis.conn().await;
    let raw: Vec<u8> = redis::cmd("GET")
        .arg(support::corral::entry_name(cfg, path))
        .query_async(&mut conn)
        .await
        .expect("the entry is stored");
    let entry = corral::entry::Entry::decode(raw.into()).expect("an entry");
    entry.times.fresh_until - entry.times.stored_at
}
