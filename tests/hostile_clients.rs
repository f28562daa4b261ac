//! Hostile clients: requests and connections that try to get past a limit, or make Corral do what
//! it must not (echo credentials with TRACE, hold sockets open). Every limit must hold on every
//! path — cached, bypassed and unrouted routes; the proxy and admin listeners.

mod support;

use http::Method;
use support::client::request;
use support::corral::{config_with_server, start, url};
use support::{Client, Upstream};

fn route(name: &str, upstream: &Upstream, extra: &str) -> String {
    format!(
        "[[route]]\nname = \"{name}\"\npath_prefix = \"/{name}\"\nupstream = \"{}\"\n{extra}\n",
        upstream.url()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trace_is_refused_before_any_upstream_call_unless_the_route_allows_it() {
    let upstream = Upstream::start().await;
    let routes = format!(
        "{}{}{}",
        route("cached", &upstream, ""),
        route("passed", &upstream, "cache = false"),
        route("traced", &upstream, "allow_trace = true"),
    );
    let server = format!("default_upstream = \"{}\"", upstream.url());
    let fleet = start(1, &config_with_server(&server, None, &routes)).await;
    let client = Client::new();
    let trace = |path: &str| {
        let mut req = request(Method::TRACE, &url(&fleet[0], path), &[], Default::default());
        req.headers_mut()
            .insert("cookie", "session=secret".parse().expect("a header value"));
        client.send(req)
    };

    for path in ["/cached/x", "/passed/x", "/unrouted/x"] {
        let answer = trace(path).await;
        assert_eq!(answer.status, 405, "{path}");
        assert_eq!(answer.header("corral-error"), Some("method-not-allowed"));
        assert!(answer.header("allow").is_some_and(|a| !a.contains("TRACE")));
        assert!(!answer.text().contains("secret"), "{path}");
    }
    assert_eq!(upstream.calls(), 0, "a refused TRACE reached the upstream");

    let allowed = trace("/traced/x").await;
    assert_eq!(allowed.status, 200);
    assert_eq!(upstream.calls(), 1);
}
