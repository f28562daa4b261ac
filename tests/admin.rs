//! The admin listener as an operator meets it: a reload says which changes wait for a restart
//! (compared with what runs, on every reload until the restart),
//! a wrong method gets 405 with `Allow`, and on SIGTERM with `server.shutdown_delay` the process
//! keeps serving while `/readyz` answers 503, then drains and exits 0.

mod support;

use std::path::Path;
use std::time::Duration;

use corral::{Config, Instance};
use http::Method;
use support::client::request;
use support::corral::{admin_url, config_text, config_with_server, recommend_route, start, url};
use support::fleet::ADMIN;
use support::{Client, CorralProcess, Upstream, eventually};

/// How long a state change (readiness after SIGTERM) gets to show.
const SETTLE: Duration = Duration::from_secs(15);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_lists_the_changes_that_need_a_restart() {
    let upstream = Upstream::start().await;
    let route = recommend_route(&upstream.url(), "");
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("corral.toml");
    std::fs::write(&file, config_text(ADMIN, None, &route)).expect("write the config");
    let config = Config::load(&file).unwrap_or_else(|e| panic!("{e}"));
    let instance = Instance::start(&config).await.expect("corral starts");
    let client = Client::new();
    let reload = admin_url(&instance, "/reload");

    // Step 1: an unchanged file reloads with nothing waiting for a restart.
    let answer = client.post(&reload, &[], "").await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    assert_eq!(answer.json()["restart_needed"], serde_json::json!([]));

    // Step 2: a new listen address and L1 size apply only on a restart: the answer says so, and
    // the route change in the same file applies at once.
    let changed = format!(
        "{}\n[cache]\nl1_max_bytes = \"1MiB\"\n",
        config_text(ADMIN, None, &format!("{route}ttl = \"5s\"\n"))
    )
    .replace(
        "listen = \"127.0.0.1:0\"\nshutdown",
        "listen = \"127.0.0.1:1\"\nshutdown",
    );
    std::fs::write(&file, changed).expect("rewrite the config");
    let answer = client.post(&reload, &[], "").await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    assert_eq!(
        answer.json(),
        serde_json::json!({
            "reloaded": true,
            "routes": 1,
            "restart_needed": ["server.listen", "cache.l1_max_bytes"],
        })
    );
    // Still serving on the address it was started on.
    let served = client.get(&url(&instance, "/recommend?a=1"), &[]).await;
    assert_eq!(served.status, 200);

    // Step 3: the same file again: what runs still differs from it, so the answer still says so.
    let answer = client.post(&reload, &[], "").await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    assert_eq!(
        answer.json()["restart_needed"],
        serde_json::json!(["server.listen", "cache.l1_max_bytes"]),
        "compared with what runs, not with the previous reload"
    );
    instance.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_method_on_an_admin_endpoint_is_405_with_allow() {
    let upstream = Upstream::start().await;
    let cfg = config_with_server(ADMIN, None, &recommend_route(&upstream.url(), ""));
    let instance = start(1, &cfg).await.remove(0);
    let client = Client::new();
    let cases = [
        (Method::GET, "/purge", "POST"),
        (Method::PUT, "/purge", "POST"),
        (Method::GET, "/reload", "POST"),
        (Method::POST, "/metrics", "GET"),
        (Method::DELETE, "/healthz", "GET"),
        (Method::POST, "/readyz", "GET"),
    ];
    for (method, path, allow) in cases {
        let target = admin_url(&instance, path);
        let answer = client
            .send(request(method.clone(), &target, &[], bytes::Bytes::new()))
            .await;
        assert_eq!(answer.status, 405, "{method} {path}: {}", answer.text());
        assert_eq!(answer.header("allow"), Some(allow), "{method} {path}");
    }
    let unknown = client.get(&admin_url(&instance, "/nowhere"), &[]).await;
    assert_eq!(unknown.status, 404);
    // The right methods still work.
    let purge = client
        .post(
            &admin_url(&instance, "/purge"),
            &[],
            r#"{"route": "recommend"}"#,
        )
        .await;
    assert_eq!(purge.status, 200, "{}", purge.text());
    instance.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_a_shutdown_delay_keeps_serving_while_unready_then_exits_0() {
    let upstream = Upstream::start().await;
    // Long enough that the test, not the delay, decides when shutdown goes on: the second SIGTERM
    // cuts it short.
    let server = format!("{ADMIN}\nshutdown_delay = \"10m\"");
    let text = config_text(&server, None, &recommend_route(&upstream.url(), ""));
    let mut corral = CorralProcess::start(&text).await;
    let client = Client::new();
    let ready = corral.admin_url("/readyz");
    assert_eq!(client.get(&ready, &[]).await.status, 200);

    // Step 1: SIGTERM; /readyz turns 503 (the load balancer takes the pod out of rotation).
    corral.terminate();
    eventually("/readyz answers 503 after SIGTERM", SETTLE, async || {
        client.get(&ready, &[]).await.status == 503
    })
    .await;
    assert_eq!(client.get(&ready, &[]).await.text(), "shutting down\n");

    // Step 2: traffic that still arrives is served, on new keys too (fills go on).
    for i in 0..5 {
        let answer = client
            .get(&corral.url(&format!("/recommend?during={i}")), &[])
            .await;
        assert_eq!(answer.status, 200, "{}", answer.text());
    }
    assert_eq!(upstream.calls(), 5);
    assert!(
        corral.wait_exit(Duration::ZERO).await.is_none(),
        "still running during the delay"
    );

    // Step 3: a second SIGTERM ends the delay; the process drains and exits 0.
    corral.terminate();
    let status = corral.wait_exit(Duration::from_secs(10)).await;
    assert!(
        status.is_some_and(|s| s.success()),
        "exit {status:?}\n{}",
        corral.logs().join("\n")
    );
}

#[test]
fn shutdown_delay_defaults_to_zero_and_takes_a_duration() {
    let route =
        "[[route]]\nname = \"r\"\npath_prefix = \"/r\"\nupstream = \"http://127.0.0.1:1\"\n";
    let plain = Config::parse(route, Path::new("<test>")).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(plain.server.shutdown_delay, Duration::ZERO);
    let text = format!("[server]\nshutdown_delay = \"5s\"\n{route}");
    let set = Config::parse(&text, Path::new("<test>")).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(set.server.shutdown_delay, Duration::from_secs(5));
    let bad = format!("[server]\nshutdown_delay = \"soon\"\n{route}");
    let err = Config::parse(&bad, Path::new("<test>"))
        .expect_err("not a duration")
        .to_string();
    assert!(
        err.contains(":2:") && err.contains("shutdown_delay"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unrouted_upstream_calls_are_counted_and_impossible_series_are_absent() {
    let upstream = Upstream::start().await;
    let server = format!("{ADMIN}\ndefault_upstream = \"{}\"", upstream.url());
    let cfg = config_with_server(&server, None, &recommend_route(&upstream.url(), ""));
    let instance = start(1, &cfg).await.remove(0);
    let client = Client::new();
    for i in 0..3 {
        let answer = client
            .get(&url(&instance, &format!("/elsewhere/{i}")), &[])
            .await;
        assert_eq!(answer.status, 200, "{}", answer.text());
        assert_eq!(answer.header("cache-status"), Some("corral; fwd=uri-miss"));
    }
    assert_eq!(upstream.calls(), 3);
    let page = client
        .get(&admin_url(&instance, "/metrics"), &[])
        .await
        .text();
    let has = |line: &str| page.lines().any(|l| l == line);
    assert!(
        has("corral_upstream_calls_total{route=\"-\",status=\"200\"} 3"),
        "{page}"
    );
    assert!(
        has("corral_upstream_duration_seconds_count{route=\"-\"} 3"),
        "{page}"
    );
    assert!(
        has("corral_requests_total{route=\"-\",outcome=\"uri_miss\"} 3"),
        "{page}"
    );
    for impossible in [
        "route=\"-\",outcome=\"hit\"",
        "route=\"-\",outcome=\"bypass\"",
        "route=\"recommend\",outcome=\"uri_miss\"",
    ] {
        assert!(
            !page.contains(impossible),
            "{impossible} on the page:\n{page}"
        );
    }
    instance.shutdown().await;
}
