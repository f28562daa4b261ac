//! What a client and an operator see of each answer: a route's header rules, the upstream's
//! surrogate keys kept from clients, `Cache-Status` of an answer no upstream gave (RFC 9211: no
//! `fwd-status`), and the time of every answer by route and outcome on `/metrics`.

mod support;

use std::time::Duration;

use support::corral::{admin_url, config_with_server, start, url};
use support::fleet::ADMIN;
use support::{Client, Reply, Upstream};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_rules_apply_to_every_answer_and_surrogate_keys_never_leave() {
    let upstream = Upstream::start().await;
    upstream.script(
        "/r",
        Reply::status(200)
            .header("surrogate-key", "article-7")
            .header("cache-tag", "ads")
            .header("x-internal", "node-3")
            .header("x-served-by", "app"),
    );
    let routes = format!(
        "[[route]]\nname = \"r\"\npath_prefix = \"/r\"\nupstream = \"{0}\"\n\
         response_headers = {{ remove = [\"X-Internal\"], set = {{ \"x-served-by\" = \"corral\", \"x-frame-options\" = \"DENY\" }} }}\n\
         [[route]]\nname = \"plain\"\npath_prefix = \"/plain\"\nupstream = \"{0}\"\n",
        upstream.url()
    );
    let fleet = start(1, &config_with_server("", None, &routes)).await;
    let client = Client::new();

    // The fill's answer and the hit after it: rules applied, tags gone, the rest kept.
    for expected in ["corral; fwd=miss; stored", "corral; hit"] {
        let answer = client.get(&url(&fleet[0], "/r/k"), &[]).await;
        assert_eq!(answer.cache_status().as_deref(), Some(expected));
        assert_eq!(answer.header("x-internal"), None, "{expected}");
        assert_eq!(answer.header("x-served-by"), Some("corral"), "{expected}");
        assert_eq!(answer.header("x-frame-options"), Some("DENY"), "{expected}");
        assert_eq!(answer.header("surrogate-key"), None, "{expected}");
        assert_eq!(answer.header("cache-tag"), None, "{expected}");
        assert!(answer.header("content-type").is_some(), "{expected}");
    }
    assert_eq!(upstream.calls(), 1);

    // A route without rules: its answers as the upstream sent them, less the surrogate keys.
    upstream.script(
        "/plain",
        Reply::status(200)
            .header("surrogate-key", "t")
            .header("x-internal", "n"),
    );
    let answer = client.get(&url(&fleet[0], "/plain/k"), &[]).await;
    assert_eq!(answer.header("x-internal"), Some("n"));
    assert_eq!(answer.header("surrogate-key"), None);
}

#[test]
fn header_rules_refuse_what_corral_writes_and_bad_names() {
    let route = |rules: &str| {
        format!(
            "[[route]]\nname = \"r\"\npath_prefix = \"/\"\nupstream = \"http://127.0.0.1:1\"\n\
             response_headers = {rules}\n"
        )
    };
    for (rules, field, why) in [
        (
            "{ remove = [\"content-length\"] }",
            "response_headers.remove",
            "Corral's to write",
        ),
        (
            "{ set = { \"cache-status\" = \"x\" } }",
            "response_headers.set",
            "Corral's to write",
        ),
        (
            "{ set = { \"bad name\" = \"x\" } }",
            "response_headers.set",
            "invalid header name",
        ),
        ("{ drop = [\"x\"] }", "drop", "unknown field"),
    ] {
        let text = route(rules);
        let message = match corral::Config::parse(&text, std::path::Path::new("bad.toml")) {
            Ok(_) => panic!("accepted {rules}"),
            Err(err) => err.to_string(),
        };
        assert!(message.starts_with("bad.toml:5: "), "{message}");
        assert!(message.contains(field), "{message}");
        assert!(message.contains(why), "{message}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_no_upstream_gave_has_no_fwd_status_and_names_the_failure() {
    let port = support::free_port();
    let routes = format!(
        "[[route]]\nname = \"r\"\npath_prefix = \"/r\"\nupstream = \"http://127.0.0.1:{port}\"\n\
         [[route]]\nname = \"q\"\npath_prefix = \"/q\"\nupstream = \"http://127.0.0.1:{port}\"\n\
         cache = false\n"
    );
    let fleet = start(1, &config_with_server("", None, &routes)).await;
    let client = Client::new();
    for (path, expected) in [
        ("/r/refused", "corral; fwd=miss; detail=upstream-connect"),
        ("/q/refused", "corral; fwd=bypass; detail=upstream-connect"),
    ] {
        let answer = client.get(&url(&fleet[0], path), &[]).await;
        assert_eq!(answer.status, 502, "{path}");
        assert_eq!(answer.header("cache-status"), Some(expected), "{path}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_answer_is_timed_by_route_and_outcome() {
    let upstream = Upstream::start().await;
    upstream.set_delay(Duration::from_millis(50));
    let routes = format!(
        "[[route]]\nname = \"r\"\npath_prefix = \"/r\"\nupstream = \"{}\"\n",
        upstream.url()
    );
    let fleet = start(1, &config_with_server(ADMIN, None, &routes)).await;
    let client = Client::new();
    client.get(&url(&fleet[0], "/r/k"), &[]).await;
    for _ in 0..3 {
        client.get(&url(&fleet[0], "/r/k"), &[]).await;
    }
    let page = client
        .get(&admin_url(&fleet[0], "/metrics"), &[])
        .await
        .text();
    let sample = |series: &str| {
        page.lines()
            .find_map(|l| l.strip_prefix(series)?.trim().parse::<f64>().ok())
            .unwrap_or_else(|| panic!("{series} not on the page:\n{page}"))
    };
    let count = "corral_answer_duration_seconds_count";
    assert_eq!(
        sample(&format!("{count}{{route=\"r\",outcome=\"miss_stored\"}}")),
        1.0
    );
    assert_eq!(
        sample(&format!("{count}{{route=\"r\",outcome=\"hit\"}}")),
        3.0
    );
    // The miss waited for the upstream's 50 ms; its sum holds at least that.
    let sum = "corral_answer_duration_seconds_sum{route=\"r\",outcome=\"miss_stored\"}";
    assert!(sample(sum) >= 0.05, "{page}");
    // Expected outcomes are exported at zero before they happen.
    assert_eq!(
        sample(&format!("{count}{{route=\"r\",outcome=\"collapsed\"}}")),
        0.0
    );
}
