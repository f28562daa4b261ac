//! What must never be shared: responses marked personal by the upstream, requests carrying
//! credentials, and routes that are never cached. Nothing of them reaches L1 or L2, and every
//! requester gets its own upstream answer.

mod support;

use std::collections::HashSet;
use std::time::Duration;

use futures_util::future::join_all;
use support::corral::{assert_nothing_stored, config, recommend_route, start, url};
use support::{Client, Fleet, RedisServer, Reply, Upstream};

/// Sends `n` concurrent requests and returns their bodies.
async fn burst(client: &Client, target: &str, headers: &[(&str, &str)], n: usize) -> Vec<String> {
    let requests = (0..n).map(|_| client.get(target, headers));
    let answers = join_all(requests).await;
    for r in &answers {
        assert_eq!(r.status, 200, "{target}: {}", r.text());
    }
    answers.iter().map(|r| r.text()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn personal_responses_reach_their_requester_only() {
    let fleet = Fleet::start(1, "", "").await;
    let (client, upstream, redis) = (&fleet.client, &fleet.upstream, &fleet.redis);
    let delay = Duration::from_millis(100);
    upstream.script(
        "/recommend/cookie",
        Reply::status(200).header("set-cookie", "id=1").delay(delay),
    );
    upstream.script(
        "/recommend/private",
        Reply::status(200)
            .header("cache-control", "private, max-age=60")
            .delay(delay),
    );
    upstream.script(
        "/recommend/nostore",
        Reply::status(200)
            .header("cache-control", "no-store")
            .delay(delay),
    );

    for path in [
        "/recommend/cookie",
        "/recommend/private",
        "/recommend/nostore",
    ] {
        let bodies = burst(client, &url(&fleet[0], path), &[], 5).await;
        assert_eq!(
            upstream.calls_for(path),
            5,
            "{path}: one upstream call per requester"
        );
        let distinct: HashSet<_> = bodies.iter().collect();
        assert_eq!(
            distinct.len(),
            5,
            "{path}: every requester got its own answer"
        );
    }
    assert_nothing_stored(redis, &fleet[0]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_with_credentials_bypass_unless_the_route_keys_on_them() {
    let fleet = Fleet::start(1, "", "").await;
    let (client, upstream, redis) = (&fleet.client, &fleet.upstream, &fleet.redis);

    let target = url(&fleet[0], "/recommend?segment=a");
    for credentials in [("authorization", "Bearer alice"), ("cookie", "session=bob")] {
        let bodies = burst(client, &target, &[credentials], 3).await;
        assert_eq!(bodies.iter().collect::<HashSet<_>>().len(), 3);
    }
    assert_eq!(upstream.calls(), 6);
    let answer = client
        .get(&target, &[("authorization", "Bearer alice")])
        .await;
    assert_eq!(answer.cache_status().as_deref(), Some("corral; fwd=bypass"));
    assert_nothing_stored(redis, &fleet[0]).await;

    // A route that keys on Authorization may cache per credential.
    let keyed = recommend_route(&upstream.url(), r#"key = { headers = ["authorization"] }"#);
    let cfg = config(Some(&redis.url()), &keyed);
    let keyed_fleet = start(1, &cfg).await;
    let target = url(&keyed_fleet[0], "/recommend?segment=a");
    upstream.reset_calls();
    for _ in 0..3 {
        client
            .get(&target, &[("authorization", "Bearer alice")])
            .await;
        client
            .get(&target, &[("authorization", "Bearer carol")])
            .await;
    }
    assert_eq!(upstream.calls(), 2, "one fill per credential");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uncached_routes_and_methods_pass_through() {
    let redis = RedisServer::start().await;
    let upstream = Upstream::start().await;
    let routes = format!(
        "{}\n[[route]]\nname = \"queue-ticket\"\npath_prefix = \"/queue\"\nupstream = \"{}\"\ncache = false\n",
        recommend_route(&upstream.url(), ""),
        upstream.url()
    );
    let cfg = config(Some(&redis.url()), &routes);
    let fleet = start(1, &cfg).await;
    let client = Client::new();

    let bodies = burst(&client, &url(&fleet[0], "/queue/ticket"), &[], 4).await;
    assert_eq!(bodies.iter().collect::<HashSet<_>>().len(), 4);
    assert_eq!(upstream.calls_for("/queue/ticket"), 4);
    let answer = client.get(&url(&fleet[0], "/queue/ticket"), &[]).await;
    assert_eq!(answer.cache_status().as_deref(), Some("corral; fwd=bypass"));

    // PUT is not among the route's cached methods.
    for _ in 0..2 {
        let req = support::client::request(
            http::Method::PUT,
            &url(&fleet[0], "/recommend?segment=a"),
            &[],
            bytes::Bytes::from_static(b"x"),
        );
        let answer = client.send(req).await;
        assert_eq!(answer.cache_status().as_deref(), Some("corral; fwd=bypass"));
    }
    assert_eq!(upstream.calls_for("/recommend?segment=a"), 2);
    assert_nothing_stored(&redis, &fleet[0]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statuses_the_route_does_not_cache_are_not_stored() {
    let fleet = Fleet::start(1, "", "cache_statuses = [200, 410]").await;
    let (client, upstream) = (&fleet.client, &fleet.upstream);
    upstream.script("/recommend/missing", Reply::status(404));
    upstream.script("/recommend/gone", Reply::status(410));

    for _ in 0..2 {
        let answer = client.get(&url(&fleet[0], "/recommend/missing"), &[]).await;
        assert_eq!(answer.status, 404);
        assert_eq!(answer.cache_status().as_deref(), Some("corral; fwd=miss"));
        client.get(&url(&fleet[0], "/recommend/gone"), &[]).await;
    }
    assert_eq!(upstream.calls_for("/recommend/missing"), 2);
    assert_eq!(
        upstream.calls_for("/recommend/gone"),
        1,
        "410 is listed: stored"
    );
}
