//! A purge that races a fill wins: the fill's answer, computed before the purge, is never stored —
//! not in Redis, not in any L1 — and the requests waiting on it elsewhere fill again after it.

mod support;

use std::time::Duration;

use corral::Instance;
use corral::purge::PurgeRequest;
use support::corral::{config, recommend_route, start, url};
use support::{Client, Fleet, Reply, Resp, Upstream};
use tokio::task::JoinHandle;

/// The upstream call number an answer carries (the test upstream numbers every call).
fn call_number(body: &serde_json::Value) -> u64 {
    body["call"].as_u64().unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_key_purged_while_its_fill_runs_is_not_stored_and_waiters_fill_again() {
    let fleet = Fleet::start(2, "", "").await;
    let (client, upstream) = (&fleet.client, &fleet.upstream);
    let path = "/recommend?segment=purged";

    // Step 1: fills are slow; instance 0 leads one, instance 1 waits on it.
    upstream.script(
        "/recommend",
        Reply::status(200).delay(Duration::from_millis(800)),
    );
    let leader = client.spawn_get(url(&fleet[0], path));
    upstream.wait_in_flight(1).await;
    let waiter = client.spawn_get(url(&fleet[1], path));

    // Step 2: the key is purged while that fill is in the upstream.
    let purge = PurgeRequest::parse(format!(r#"{{"url":"{path}"}}"#).as_bytes());
    let purged = fleet[0]
        .proxy()
        .purge(&purge.expect("a valid purge body"))
        .await;
    assert!(purged.is_ok(), "{purged:?}");

    // Step 3: the leader's own request gets its answer; it was not stored.
    let first = leader.await.expect("the leader's request");
    assert_eq!(first.status, 200);
    let waited = waiter.await.expect("the waiter's request");
    assert_eq!(waited.status, 200);
    assert_eq!(
        upstream.calls_for(path),
        2,
        "the waiter filled again after the purge"
    );
    assert!(
        call_number(&waited.json()) > call_number(&first.json()),
        "the waiter got the answer computed after the purge"
    );

    // Step 4: every instance now serves the post-purge answer.
    for instance in &fleet {
        let again = client.get(&url(instance, path), &[]).await;
        assert_eq!(
            call_number(&again.json()),
            call_number(&waited.json()),
            "{:?} first={:?} waited={:?}",
            again.header("cache-status"),
            call_number(&first.json()),
            waited.header("cache-status")
        );
    }
    assert_eq!(upstream.calls_for(path), 2);
}

/// One embedded instance, its route purged while the leader's fill of `path` is in the upstream
/// (which answers after `delay`); the leader's request still runs.
struct Purged {
    upstream: Upstream,
    instance: Instance,
    client: Client,
    leader: JoinHandle<Resp>,
}

async fn route_purged_mid_fill(path: &str, delay: Duration) -> Purged {
    let upstream = Upstream::start().await;
    let cfg = config(None, &recommend_route(&upstream.url(), ""));
    let instance = start(1, &cfg).await.remove(0);
    let client = Client::new();
    upstream.script("/recommend", Reply::status(200).delay(delay));
    let leader = client.spawn_get(url(&instance, path));
    upstream.wait_in_flight(1).await;
    let purge = PurgeRequest::parse(br#"{"route":"recommend"}"#).expect("a valid purge body");
    assert!(instance.proxy().purge(&purge).await.is_ok());
    Purged {
        upstream,
        instance,
        client,
        leader,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_route_purged_while_a_fill_runs_in_embedded_mode_keeps_nothing() {
    let path = "/recommend?segment=embedded";
    let Purged {
        upstream,
        instance,
        client,
        leader,
    } = route_purged_mid_fill(path, Duration::from_millis(500)).await;
    let first = leader.await.expect("the leader's request");
    assert_eq!(first.status, 200);

    // The answer computed before the purge was not kept: the next request fills again.
    upstream.script("/recommend", Reply::status(200));
    let next = client.get(&url(&instance, path), &[]).await;
    assert!(call_number(&next.json()) > call_number(&first.json()));
    assert_eq!(upstream.calls_for(path), 2);
}

/// Requests that come after a purge must not get the answer it removed, even from a fill that was
/// already running: those that join its flight after the purge look again, and together they make
/// one new fill. (Before, they joined the running flight and got its answer: the purge lost.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn requests_after_a_purge_do_not_join_the_fill_it_removed_and_share_one_new_fill() {
    let path = "/recommend?segment=late";
    // Step 1: a slow fill runs; the route is purged while it is in the upstream.
    let Purged {
        upstream,
        instance,
        client,
        leader,
    } = route_purged_mid_fill(path, Duration::from_millis(800)).await;

    // Step 2: five requests after the purge, while that fill still runs.
    let late: Vec<_> = (0..5)
        .map(|_| client.spawn_get(url(&instance, path)))
        .collect();
    let first = leader.await.expect("the leader's request");
    assert_eq!(first.status, 200);

    // Step 3: none of them gets the purged fill's answer; they share one new fill.
    for answer in late {
        let answer = answer.await.expect("a late request");
        assert_eq!(answer.status, 200);
        assert!(
            call_number(&answer.json()) > call_number(&first.json()),
            "a request after the purge got the answer it removed: {:?}",
            answer.cache_status()
        );
    }
    assert_eq!(upstream.calls_for(path), 2);
}
