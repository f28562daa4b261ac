//! Soft purges (`"soft": true`): the entries a purge covers are marked stale — in Redis and in every
//! instance's L1 — instead of removed, so the next request for each answers the old entry at once
//! and the fleet refreshes each key once; an entry that must not be served stale is filled again
//! instead. Counts and bodies, never timings.

mod support;

use std::time::Duration;

use corral::Instance;
use futures_util::StreamExt;
use support::corral::{cache_key, entry_name, spread};
use support::fleet::ADMIN;
use support::{Fleet, Reply, eventually};

/// How long an invalidation or a refresh gets to reach every instance.
const SETTLE: Duration = Duration::from_secs(15);
/// How long a refresh takes at the upstream while the test checks what is answered meanwhile:
/// far longer than the requests the test sends in that time.
const SLOW_REFRESH: Duration = Duration::from_secs(3);

/// Whether `instance`'s L1 holds `path`'s entry, no longer fresh.
async fn held_stale(fleet: &Fleet, instance: &Instance, path: &str) -> bool {
    let now = corral::entry::now_ms();
    let held = instance
        .proxy()
        .l1()
        .get(&cache_key(&fleet.cfg, path), now)
        .await;
    held.is_some_and(|entry| entry.times.fresh_until <= now)
}

/// The upstream call number an answer carries (the test upstream numbers every call).
fn call_number(body: &serde_json::Value) -> u64 {
    body["call"].as_u64().unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_soft_tag_purge_serves_every_entry_stale_and_refreshes_each_key_once_fleet_wide() {
    const KEYS: usize = 200;
    let fleet = Fleet::start(2, ADMIN, "ttl = \"10m\"").await;
    let upstream = &fleet.upstream;
    upstream.script(
        "/recommend",
        Reply::status(200).header("surrogate-key", "catalogue"),
    );
    let paths: Vec<String> = (0..KEYS).map(|i| format!("/recommend?item={i}")).collect();

    // Step 1: every key is filled once, and held by both instances.
    let mut old = Vec::with_capacity(KEYS);
    for path in &paths {
        let first = fleet.get(0, path).await;
        assert_eq!(first.status, 200, "{path}");
        let second = fleet.get(1, path).await;
        assert_eq!(second.text(), first.text(), "{path}");
        old.push(call_number(&first.json()));
    }
    assert_eq!(upstream.calls(), KEYS as u64);

    // Step 2: the tag is soft-purged through the second instance; both L1s hear of it.
    upstream.script(
        "/recommend",
        Reply::status(200)
            .header("surrogate-key", "catalogue")
            .delay(SLOW_REFRESH),
    );
    let (status, answer) = fleet
        .purge(1, r#"{"tag": "catalogue", "soft": true}"#)
        .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["marked"].as_u64(), Some(KEYS as u64), "{answer}");
    for instance in fleet.iter() {
        eventually(
            "every L1 holds the entries marked stale",
            SETTLE,
            async || {
                for path in &paths {
                    if !held_stale(&fleet, instance, path).await {
                        return false;
                    }
                }
                true
            },
        )
        .await;
    }
    assert_eq!(upstream.calls(), KEYS as u64, "a soft purge calls nobody");

    // Step 3: every key, asked of the first instance, answers the old entry at once, stale; each
    // starts its key's one refresh.
    let asked = fleet.get_all(0, &paths).await;
    for ((answer, path), old) in asked.iter().zip(&paths).zip(&old) {
        assert_eq!(answer.status, 200, "{path}");
        assert_eq!(
            answer.cache_status().as_deref(),
            Some("corral; hit; detail=stale"),
            "{path}"
        );
        assert_eq!(call_number(&answer.json()), *old, "{path}: the old body");
    }
    upstream.wait_in_flight(KEYS).await;

    // Step 4: while those refreshes run, the second instance answers stale too, and calls nobody
    // (its refreshes wait for the first instance's, under the fleet fill lock).
    let asked = fleet.get_all(1, &paths).await;
    for ((answer, path), old) in asked.iter().zip(&paths).zip(&old) {
        assert_eq!(
            answer.cache_status().as_deref(),
            Some("corral; hit; detail=stale"),
            "{path}"
        );
        assert_eq!(call_number(&answer.json()), *old, "{path}: the old body");
    }

    // Step 5: the refreshes land; both instances answer the new bodies, fresh. One refresh per key.
    eventually("the refreshes land", SETTLE, async || {
        upstream.calls() == 2 * KEYS as u64 && upstream.in_flight() == 0
    })
    .await;
    for on in 0..fleet.len() {
        eventually(
            "the instance answers the refreshed entries",
            SETTLE,
            async || {
                for (path, old) in paths.iter().zip(&old) {
                    let answer = fleet.get(on, path).await;
                    let fresh = answer.cache_status().as_deref() == Some("corral; hit");
                    if !fresh || call_number(&answer.json()) <= *old {
                        return false;
                    }
                }
                true
            },
        )
        .await;
    }
    assert_eq!(
        upstream.calls(),
        2 * KEYS as u64,
        "exactly one refresh per key"
    );
    assert_eq!(
        upstream.max_in_flight(),
        KEYS,
        "never two calls for one key"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_soft_url_purge_marks_one_entry_which_refreshes_once() {
    let fleet = Fleet::start(2, ADMIN, "ttl = \"10m\"").await;
    let upstream = &fleet.upstream;
    let (path, other) = ("/recommend?segment=a", "/recommend?segment=b");

    let first = fleet.get(0, path).await;
    fleet.get(0, other).await;
    assert_eq!(upstream.calls(), 2);

    // The key's entry is marked in Redis (the second instance never held it in L1).
    let (status, answer) = fleet
        .purge(0, &format!(r#"{{"url": "{path}", "soft": true}}"#))
        .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["marked"].as_u64(), Some(1), "{answer}");
    let mut conn = fleet.redis.conn().await;
    let pttl: i64 = redis::cmd("PTTL")
        .arg(entry_name(&fleet.cfg, path))
        .query_async(&mut conn)
        .await
        .expect("PTTL");
    assert!(pttl > 0, "the entry is kept, with its TTL: {pttl}");

    let stale = fleet.get(1, path).await;
    assert_eq!(
        stale.cache_status().as_deref(),
        Some("corral; hit; detail=stale")
    );
    assert_eq!(stale.text(), first.text(), "the old body");
    eventually("the refresh lands", SETTLE, async || {
        let again = fleet.get(1, path).await;
        call_number(&again.json()) > call_number(&first.json())
    })
    .await;
    assert_eq!(upstream.calls_for(path), 2, "one refresh");
    let untouched = fleet.get(1, other).await;
    assert_eq!(untouched.cache_status().as_deref(), Some("corral; hit"));
    assert_eq!(upstream.calls_for(other), 1, "another key is not marked");

    // A soft purge of a key nothing holds marks nothing.
    let (_, again) = fleet
        .purge(0, r#"{"url": "/recommend?segment=zz", "soft": true}"#)
        .await;
    assert_eq!(again["marked"].as_u64(), Some(0), "{again}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_soft_purge_never_serves_stale_what_must_revalidate() {
    let fleet = Fleet::start(2, ADMIN, "stale_while_revalidate = \"10m\"").await;
    fleet.upstream.script(
        "/recommend",
        Reply::status(200).header("cache-control", "max-age=600, must-revalidate"),
    );
    let path = "/recommend?segment=strict";
    let first = fleet.get(0, path).await;
    let held = fleet.get(1, path).await;
    assert_eq!(held.cache_status().as_deref(), Some("corral; hit"));

    let (status, answer) = fleet
        .purge(0, &format!(r#"{{"url": "{path}", "soft": true}}"#))
        .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["marked"].as_u64(), Some(1), "{answer}");
    eventually(
        "the second instance hears of the purge",
        SETTLE,
        async || {
            let now = corral::entry::now_ms();
            let proxy = fleet[1].proxy();
            let held = proxy.l1().get(&cache_key(&fleet.cfg, path), now).await;
            held.is_none_or(|entry| entry.times.fresh_until <= now)
        },
    )
    .await;

    // Both instances fill it again rather than answer it stale: one upstream call between them.
    let answers = spread(&fleet.client, &fleet, path, fleet.len()).await;
    for answer in &answers {
        let status = answer.cache_status().unwrap_or_default();
        assert!(!status.contains("stale"), "served stale: {status}");
        assert!(
            call_number(&answer.json()) > call_number(&first.json()),
            "{status}: the old body"
        );
    }
    assert_eq!(fleet.upstream.calls_for(path), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_soft_value_that_is_not_a_boolean_is_refused_naming_the_field() {
    let fleet = Fleet::start(1, ADMIN, "").await;
    let (status, answer) = fleet.purge(0, r#"{"tag": "t", "soft": "yes"}"#).await;
    assert_eq!(status, 400);
    assert_eq!(
        answer["error"].as_str(),
        Some("purge body: `soft` must be true or false, not a JSON string")
    );
    let (status, answer) = fleet.purge(0, r#"{"tag": "t", "soft": false}"#).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(
        answer["purged"].as_u64(),
        Some(0),
        "a hard purge says purged"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_soft_route_purge_marks_every_entry_of_the_route() {
    let fleet = Fleet::start(1, ADMIN, "ttl = \"10m\"").await;
    let upstream = &fleet.upstream;
    let paths: Vec<String> = (0..5).map(|i| format!("/recommend?item={i}")).collect();
    fleet.get_all(0, &paths).await;
    assert_eq!(upstream.calls(), 5);

    let (status, answer) = fleet
        .purge(0, r#"{"route": "recommend", "soft": true}"#)
        .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["marked"].as_u64(), Some(5), "{answer}");
    for answer in fleet.get_all(0, &paths).await {
        assert_eq!(
            answer.cache_status().as_deref(),
            Some("corral; hit; detail=stale")
        );
    }
    eventually("each key is refreshed", SETTLE, async || {
        upstream.calls() == 10
    })
    .await;
    // Once refreshed, the entries are fresh again: a second soft purge marks them again.
    eventually("the refreshed entries are held", SETTLE, async || {
        let answers = fleet.get_all(0, &paths).await;
        answers
            .iter()
            .all(|a| a.cache_status().as_deref() == Some("corral; hit"))
    })
    .await;
    let (_, again) = fleet
        .purge(0, r#"{"route": "recommend", "soft": true}"#)
        .await;
    assert_eq!(again["marked"].as_u64(), Some(5), "{again}");
    assert_eq!(upstream.calls(), 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_fill_under_way_when_a_soft_purge_comes_still_stores() {
    let fleet = Fleet::start(2, ADMIN, "").await;
    let upstream = &fleet.upstream;
    let path = "/recommend?segment=racing";

    // A slow fill is in the upstream when the key is soft-purged (a hard purge would refuse its
    // store: tests/purge_race.rs).
    upstream.script("/recommend", Reply::status(200).delay(SLOW_REFRESH));
    let leader = fleet.client.spawn_get(fleet.url(0, path));
    upstream.wait_in_flight(1).await;
    let (status, answer) = fleet
        .purge(1, &format!(r#"{{"url": "{path}", "soft": true}}"#))
        .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["marked"].as_u64(), Some(0), "nothing stored yet");

    let filled = leader.await.expect("the leader's request");
    assert_eq!(
        filled.cache_status().as_deref(),
        Some("corral; fwd=miss; stored"),
        "a soft purge only wants entries refreshed: the fill stores"
    );
    for on in 0..fleet.len() {
        let again = fleet.get(on, path).await;
        assert_eq!(again.cache_status().as_deref(), Some("corral; hit"));
        assert_eq!(again.text(), filled.text());
    }
    assert_eq!(upstream.calls_for(path), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_soft_tag_purge_of_two_thousand_entries_refreshes_them_within_the_budget_answering_stale()
{
    const KEYS: usize = 2000;
    let fleet = Fleet::start(2, ADMIN, "ttl = \"10m\"\nfleet_concurrency = 10").await;
    let (client, upstream) = (&fleet.client, &fleet.upstream);
    upstream.script(
        "/recommend",
        Reply::status(200).header("surrogate-key", "catalogue"),
    );
    let paths: Vec<String> = (0..KEYS).map(|k| format!("/recommend?item={k}")).collect();
    // 200 requests at a time per instance: a client's realistic fan-in, not 2000 connects at once.
    let ask_all = async |instance: usize| {
        futures_util::stream::iter(paths.iter().map(|p| {
            let target = fleet.url(instance, p);
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
    let (status, marked) = fleet
        .purge(0, r#"{"tag": "catalogue", "soft": true}"#)
        .await;
    assert_eq!(status, 200, "{marked}");
    assert_eq!(marked["marked"].as_u64(), Some(KEYS as u64));

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
