//! A route with several upstream endpoints (model replicas): calls are spread over them, an
//! endpoint that keeps failing is ejected (passive health), and a fill that fails on one endpoint
//! tries the next before it fails its waiters.

mod support;

use std::path::Path;

use support::corral::{admin_url, config_with_server, start, url};
use support::fleet::ADMIN;
use support::{Client, Reply, Upstream};

fn route(name: &str, prefix: &str, endpoints: &[String], extra: &str) -> String {
    let list: Vec<String> = endpoints.iter().map(|e| format!("\"{e}\"")).collect();
    format!(
        "[[route]]\nname = \"{name}\"\npath_prefix = \"{prefix}\"\nupstream = [{}]\n{extra}\n",
        list.join(", ")
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fill_tries_the_next_endpoint_and_a_failing_one_is_ejected() {
    let healthy = Upstream::start().await;
    let refused = format!("http://127.0.0.1:{}", support::free_port());
    let routes = route("r", "/r", &[refused, healthy.url()], "");
    let fleet = start(1, &config_with_server(ADMIN, None, &routes)).await;
    let client = Client::new();

    // Every miss is answered by the healthy endpoint, whichever was tried first.
    for n in 0..10 {
        let answer = client.get(&url(&fleet[0], &format!("/r/{n}")), &[]).await;
        assert_eq!(answer.status, 200, "{n}: {}", answer.text());
        assert_eq!(
            answer.cache_status().as_deref(),
            Some("corral; fwd=miss; stored")
        );
    }
    assert_eq!(
        healthy.calls(),
        10,
        "one call per key on the healthy endpoint"
    );

    // The refused endpoint was tried until it was ejected (3 failures in a row), then no more.
    let page = client
        .get(&admin_url(&fleet[0], "/metrics"), &[])
        .await
        .text();
    assert!(
        page.contains("corral_upstream_calls_total{route=\"r\",status=\"error\"} 3"),
        "{page}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_5xx_on_one_endpoint_is_retried_on_the_next_before_the_waiters_see_it() {
    let failing = Upstream::start().await;
    failing.script("/e", Reply::status(500));
    let healthy = Upstream::start().await;
    let routes = route("e", "/e", &[failing.url(), healthy.url()], "");
    let fleet = start(1, &config_with_server("", None, &routes)).await;
    let client = Client::new();

    let answer = client.get(&url(&fleet[0], "/e/k"), &[]).await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    assert_eq!((failing.calls(), healthy.calls()), (1, 1));
    let hit = client.get(&url(&fleet[0], "/e/k"), &[]).await;
    assert_eq!(hit.cache_status().as_deref(), Some("corral; hit"));
    assert_eq!(hit.body, answer.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pass_through_calls_are_spread_over_healthy_endpoints() {
    let a = Upstream::start().await;
    let b = Upstream::start().await;
    let routes = route("q", "/q", &[a.url(), b.url()], "cache = false");
    let fleet = start(1, &config_with_server("", None, &routes)).await;
    let client = Client::new();
    for n in 0..10 {
        let answer = client.get(&url(&fleet[0], &format!("/q/{n}")), &[]).await;
        assert_eq!(answer.status, 200);
    }
    assert_eq!((a.calls(), b.calls()), (5, 5), "round robin");
}

#[test]
fn an_endpoint_list_must_be_non_empty_and_without_duplicates() {
    for (list, why) in [
        ("[]", "must not be empty"),
        (
            "[\"http://127.0.0.1:1\", \"http://127.0.0.1:1\"]",
            "listed twice",
        ),
        ("[\"ftp://h:1\"]", "unsupported scheme"),
    ] {
        let text = format!("[[route]]\nname = \"r\"\npath_prefix = \"/\"\nupstream = {list}\n");
        let message = match corral::Config::parse(&text, Path::new("bad.toml")) {
            Ok(_) => panic!("accepted {list}"),
            Err(err) => err.to_string(),
        };
        assert!(message.starts_with("bad.toml:4: "), "{message}");
        assert!(message.contains("field `upstream`"), "{message}");
        assert!(message.contains(why), "{message}");
    }
}
