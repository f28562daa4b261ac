//! Proves the shared fixtures in `tests/support` work before any Corral test relies on them.

mod support;

use std::collections::HashSet;
use std::time::Duration;

use redis::AsyncCommands;
use support::{Client, RedisServer, Reply, Upstream};
use tokio::task::JoinSet;

#[tokio::test]
async fn redis_server_counts_commands_and_lists_keys() {
    let redis = RedisServer::start().await;
    assert_eq!(redis.url(), format!("redis://127.0.0.1:{}", redis.port()));

    // One SET and one GET through a fresh connection.
    let mut conn = redis.conn().await;
    let _: () = conn.set("corral:selftest:a", "1").await.unwrap();
    let value: Option<String> = conn.get("corral:selftest:a").await.unwrap();
    assert_eq!(value.as_deref(), Some("1"));

    // Statistics were reset at start, so exactly our commands show.
    let stats = redis.commandstats().await;
    assert_eq!(stats.calls("set"), 1, "{stats:?}");
    assert_eq!(stats.calls("get"), 1, "{stats:?}");
    assert_eq!(stats.calls("publish"), 0, "{stats:?}");

    // SCAN-based listing sees the key; the pattern filters.
    let _: () = conn.set("other:b", "2").await.unwrap();
    assert_eq!(redis.keys("corral:*").await, ["corral:selftest:a"]);

    redis.reset_stats().await;
    assert_eq!(redis.commandstats().await.calls("set"), 0);
}

#[tokio::test]
async fn redis_server_stops_continues_and_restarts_on_the_same_port() {
    let mut redis = RedisServer::start().await;
    let port = redis.port();
    let mut conn = redis.conn().await;
    let _: () = conn.set("corral:k", "v").await.unwrap();

    // Stopped: the connection stays open but nothing answers (redis-rs gives up after 500 ms).
    redis.stop();
    let frozen = tokio::time::timeout(Duration::from_secs(5), conn.ping::<String>()).await;
    assert!(
        matches!(frozen, Ok(Err(_))),
        "a stopped server must not answer"
    );

    // Continued: a new connection is served again, data intact.
    redis.cont();
    let value: Option<String> = redis.conn().await.get("corral:k").await.unwrap();
    assert_eq!(value.as_deref(), Some("v"));

    // Killed: connecting fails.
    redis.kill();
    assert!(
        redis
            .client()
            .get_multiplexed_async_connection()
            .await
            .is_err()
    );

    // Restarted: same port, fresh and empty (nothing is persisted).
    redis.restart().await;
    assert_eq!(redis.port(), port);
    let mut conn = redis.conn().await;
    assert_eq!(conn.ping::<String>().await.unwrap(), "PONG");
    assert!(redis.keys("*").await.is_empty());
}

#[tokio::test]
async fn upstream_counts_concurrent_calls_per_key() {
    let upstream = Upstream::start().await;
    upstream.set_delay(Duration::from_millis(50));
    let client = Client::new();

    // 20 concurrent GETs over two keys.
    let mut requests = JoinSet::new();
    for i in 0..20 {
        let client = client.clone();
        let url = match i % 2 {
            0 => format!("{}/items?id=1", upstream.url()),
            _ => format!("{}/other", upstream.url()),
        };
        requests.spawn(async move { client.get(&url, &[("x-test", "yes")]).await });
    }
    // Each call is held 50 ms by the delay, so the first one is seen in flight.
    upstream.wait_in_flight(1).await;

    let mut call_numbers = HashSet::new();
    while let Some(resp) = requests.join_next().await {
        let resp = resp.unwrap();
        assert_eq!(resp.status, 200);
        assert_eq!(resp.header("content-type"), Some("application/json"));
        let echo = resp.json();
        assert_eq!(echo["method"], "GET");
        assert!(call_numbers.insert(echo["call"].as_u64().unwrap()));
    }
    assert_eq!(call_numbers.len(), 20, "every fill has its own body");
    assert_eq!(upstream.calls(), 20);
    assert_eq!(upstream.calls_for("/items?id=1"), 10);
    assert_eq!(upstream.calls_for("/other"), 10);
    assert_eq!(
        upstream.calls_for("/items"),
        0,
        "the query is part of the key"
    );
    assert_eq!(upstream.in_flight(), 0);

    // Forwarded headers are recorded per key.
    let headers = upstream.last_headers("/items?id=1").unwrap();
    assert_eq!(headers["x-test"], "yes");
    assert!(headers.contains_key("host"));

    upstream.reset_calls();
    assert_eq!(upstream.calls(), 0);
    assert_eq!(upstream.calls_for("/other"), 0);
}

#[tokio::test]
async fn upstream_answers_scripted_replies_by_longest_prefix() {
    let upstream = Upstream::start().await;
    let client = Client::new();
    upstream.script(
        "/boom",
        Reply::status(500)
            .header("x-why", "scripted")
            .body("upstream broke"),
    );
    upstream.script("/boom/quiet", Reply::status(503));

    let resp = client.get(&format!("{}/boom/1", upstream.url()), &[]).await;
    assert_eq!(resp.status, 500);
    assert_eq!(resp.header("x-why"), Some("scripted"));
    assert_eq!(resp.text(), "upstream broke");

    // The longer prefix wins, and without a scripted body the echo is kept.
    let resp = client
        .post(
            &format!("{}/boom/quiet?x=1", upstream.url()),
            &[],
            "payload",
        )
        .await;
    assert_eq!(resp.status, 503);
    let echo = resp.json();
    assert_eq!(echo["path"], "/boom/quiet");
    assert_eq!(echo["query"], "x=1");
    assert_eq!(echo["method"], "POST");
    assert_eq!(echo["body"], "payload");

    upstream.unscript("/boom");
    let resp = client.get(&format!("{}/boom/1", upstream.url()), &[]).await;
    assert_eq!(resp.status, 200);
    assert_eq!(upstream.calls_for("/boom/1"), 2);
}

#[tokio::test]
async fn upstream_wait_in_flight_sees_parked_calls() {
    let upstream = Upstream::start().await;
    upstream.script("/slow", Reply::status(200).delay(Duration::from_secs(1)));
    let client = Client::new();

    let mut requests = JoinSet::new();
    for _ in 0..3 {
        let client = client.clone();
        let url = format!("{}/slow", upstream.url());
        requests.spawn(async move { client.get(&url, &[]).await });
    }
    upstream.wait_in_flight(3).await;
    assert_eq!(upstream.calls_for("/slow"), 3);
    while let Some(resp) = requests.join_next().await {
        assert_eq!(resp.unwrap().status, 200);
    }
    assert_eq!(upstream.in_flight(), 0);
}

#[tokio::test]
async fn client_reports_refused_connections() {
    // A dropped upstream no longer accepts.
    let url = {
        let upstream = Upstream::start().await;
        upstream.url()
    };
    let req = support::client::request(http::Method::GET, &url, &[], bytes::Bytes::new());
    let err = Client::new().try_send(req).await.unwrap_err();
    assert!(err.contains(&url), "{err}");
}

/// A call decides its answer when it is counted in flight, not later: a test that saw it in
/// flight and re-scripts the upstream at once (to prepare the next phase) must not change the
/// answer of the call it saw. Each round re-scripts the instant `wait_in_flight` returns, on a
/// multi-threaded runtime so the handler and the test really run side by side.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_call_keeps_the_plan_it_entered_with() {
    let upstream = Upstream::start().await;
    let client = Client::new();
    for round in 0..30 {
        let prefix = format!("/plan/{round}");
        upstream.script(
            &prefix,
            Reply::status(200)
                .header("x-plan", "entered")
                .delay(Duration::from_millis(20)),
        );
        let call = client.spawn_get(format!("{}{prefix}", upstream.url()));
        upstream.wait_in_flight(1).await;
        upstream.script(&prefix, Reply::status(503).header("x-plan", "rescripted"));
        // Counted in the same step as in flight: the call is already in the totals.
        assert_eq!(upstream.calls_for(&prefix), 1, "round {round}");

        let resp = call.await.unwrap();
        assert_eq!(resp.status, 200, "round {round}");
        assert_eq!(resp.header("x-plan"), Some("entered"), "round {round}");
        // The next call under the prefix gets the new script.
        let resp = client
            .get(&format!("{}{prefix}", upstream.url()), &[])
            .await;
        assert_eq!(resp.status, 503, "round {round}");
        assert_eq!(resp.header("x-plan"), Some("rescripted"), "round {round}");
    }
}

/// A script's headers replace the default answer's headers of the same name; the echo body and
/// the rest stay. Keys are counted per path and query, and together by prefix.
#[tokio::test]
async fn upstream_script_headers_replace_the_defaults_and_prefixes_sum_keys() {
    let upstream = Upstream::start().await;
    let client = Client::new();
    upstream.script(
        "/typed",
        Reply::status(201).header("content-type", "text/x-echo"),
    );
    let resp = client
        .get(&format!("{}/typed?k=1", upstream.url()), &[])
        .await;
    assert_eq!(resp.status, 201);
    assert_eq!(
        resp.headers.get_all("content-type").iter().count(),
        1,
        "{:?}",
        resp.headers
    );
    assert_eq!(resp.header("content-type"), Some("text/x-echo"));
    assert_eq!(resp.json()["path"], "/typed");

    client
        .get(&format!("{}/typed?k=2", upstream.url()), &[])
        .await;
    client
        .post(&format!("{}/other/", upstream.url()), &[], "x")
        .await;
    assert_eq!(upstream.calls_under("/typed"), 2);
    assert_eq!(upstream.calls_under("/typed?k=1"), 1);
    assert_eq!(upstream.calls_under("/"), 3);
    assert_eq!(upstream.last_method("/other/"), Some(http::Method::POST));
    assert!(upstream.first_answer("/typed?k=2").is_some());
    assert!(upstream.first_answer("/never").is_none());
    upstream.reset_calls();
    assert!(upstream.first_answer("/typed?k=2").is_none());
}

#[tokio::test]
async fn commandstats_parses_info_lines_and_ignores_the_rest() {
    let stats = support::CommandStats::parse(
        "# Commandstats\r\ncmdstat_get:calls=3,usec=9,usec_per_call=3.00,rejected_calls=0\r\n\
         cmdstat_CLIENT|SETINFO:calls=2,usec=1\r\nused_cpu_sys:1.5\r\ncmdstat_bad:usec=1\r\n",
    );
    assert_eq!(stats.calls("GET"), 3);
    assert_eq!(stats.calls("client|setinfo"), 2);
    assert_eq!(stats.calls("bad"), 0);
    assert_eq!(stats.all().len(), 2);
}
