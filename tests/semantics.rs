//! HTTP caching semantics: a shared cache never hands one client another's answer.
//!
//! Every test runs against [`Origin`], an upstream that itself honours conditional requests,
//! `Range` and `Vary` and builds its body from headers origins commonly read, so a header wrongly
//! forwarded on a shared fill shows up as a wrong shared answer. One table-driven test per rule.

mod support;

use support::corral::{config, start, url};
use support::origin::{LAST_MODIFIED, etag_of, representation};
use support::{Client, Origin, RedisServer};

/// A route caching everything under `/` on `origin`, with `extra` lines.
fn route(origin: &Origin, extra: &str) -> String {
    format!(
        "[[route]]\nname = \"r\"\npath_prefix = \"/\"\nmethods = [\"GET\", \"POST\"]\nupstream = \"{}\"\n{extra}\n",
        origin.url()
    )
}

/// The body every client gets for `path` when nothing of the requester reaches the origin.
fn plain(path: &str) -> String {
    representation(path, "-", "-", "-", "-")
}

/// Rule 1: fills are unconditional and whole, and carry nothing of the leader that the key does
/// not hold. The leader's request carries the header; a plain request to another instance must
/// then get the whole, unpoisoned answer, from the cache.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fills_are_unconditional_whole_and_unpoisoned() {
    let redis = RedisServer::start().await;
    let origin = Origin::start().await;
    let fleet = start(2, &config(Some(&redis.url()), &route(&origin, ""))).await;
    let client = Client::new();
    let etag = etag_of(&plain("/c/inm"));
    let cases: [(&str, Vec<(&str, &str)>); 8] = [
        ("/c/inm", vec![("if-none-match", etag.as_str())]),
        ("/c/ims", vec![("if-modified-since", LAST_MODIFIED)]),
        ("/c/range", vec![("range", "bytes=0-3")]),
        (
            "/c/if-range",
            vec![("range", "bytes=2-5"), ("if-range", LAST_MODIFIED)],
        ),
        ("/c/if-match", vec![("if-match", "\"nope\"")]),
        ("/c/xfh", vec![("x-forwarded-host", "evil.example")]),
        ("/c/original", vec![("x-original-url", "/admin")]),
        ("/c/host", vec![("host", "evil.example")]),
    ];
    for (path, headers) in &cases {
        let leader = client.get(&url(&fleet[0], path), headers).await;
        assert!(
            [200, 206, 304, 412].contains(&leader.status),
            "{path}: leader got {}",
            leader.status
        );
        let seen = origin.last_headers(path).expect("the origin saw the fill");
        for (name, _) in headers.iter().filter(|(n, _)| *n != "host") {
            assert!(
                !seen.contains_key(*name),
                "{path}: {name} reached the origin"
            );
        }
        assert_eq!(
            seen["host"].to_str().ok(),
            origin.url().strip_prefix("http://"),
            "{path}: Host is the origin's authority"
        );
        let other = client.get(&url(&fleet[1], path), &[]).await;
        assert_eq!(other.status, 200, "{path}: a whole answer was shared");
        assert_eq!(other.text(), plain(path), "{path}: the shared answer");
        assert!(
            other
                .header("cache-status")
                .is_some_and(|s| s.contains("hit")),
            "{path}: {:?}",
            other.header("cache-status")
        );
        assert_eq!(origin.calls_for(path), 1, "{path}: one fill");
    }
}

/// Bypassed requests stay transparent: on a `cache = false` route the origin sees the client's
/// conditionals and forwarding headers, and its 304 reaches the client.
#[tokio::test]
async fn bypassed_requests_stay_transparent() {
    let origin = Origin::start().await;
    let fleet = start(1, &config(None, &route(&origin, "cache = false"))).await;
    let client = Client::new();
    let answer = client
        .get(
            &url(&fleet[0], "/b"),
            &[
                ("if-modified-since", LAST_MODIFIED),
                ("x-forwarded-for", "10.1.2.3"),
            ],
        )
        .await;
    assert_eq!(answer.status, 304);
    let seen = origin.last_headers("/b").expect("the origin saw it");
    assert_eq!(seen["if-modified-since"], LAST_MODIFIED);
    assert_eq!(seen["x-forwarded-for"], "10.1.2.3, 127.0.0.1");
}

/// Rule 2: Corral answers conditionals, `Range` and HEAD from the entry, on a hit and on the very
/// request that filled it; the origin is called once per key and never sees them.
#[tokio::test]
async fn conditionals_ranges_and_head_are_answered_from_the_entry() {
    let origin = Origin::start().await;
    let fleet = start(1, &config(None, &route(&origin, ""))).await;
    let client = Client::new();
    let earlier = "Sun, 01 Nov 2026 10:00:00 GMT";
    // (path, headers, status, body): each path is asked twice — filling, then from the cache.
    type Case<'a> = (&'a str, Vec<(String, String)>, u16, Option<&'a str>);
    let cases: Vec<Case> = vec![
        ("/d/plain", vec![], 200, None),
        (
            "/d/inm",
            vec![("if-none-match".into(), etag_of(&plain("/d/inm")))],
            304,
            Some(""),
        ),
        (
            "/d/inm-weak",
            vec![(
                "if-none-match".into(),
                format!("W/{}", etag_of(&plain("/d/inm-weak"))),
            )],
            304,
            Some(""),
        ),
        (
            "/d/inm-other",
            vec![("if-none-match".into(), "\"other\"".into())],
            200,
            None,
        ),
        (
            "/d/ims",
            vec![("if-modified-since".into(), LAST_MODIFIED.into())],
            304,
            Some(""),
        ),
        (
            "/d/ims-old",
            vec![("if-modified-since".into(), earlier.into())],
            200,
            None,
        ),
        (
            "/d/range",
            vec![("range".into(), "bytes=0-6".into())],
            206,
            Some("path=/d"),
        ),
        (
            "/d/range-bad",
            vec![("range".into(), "bytes=900-".into())],
            416,
            Some(""),
        ),
        (
            "/d/if-range-stale",
            vec![
                ("range".into(), "bytes=0-6".into()),
                ("if-range".into(), "\"stale\"".into()),
            ],
            200,
            None,
        ),
        (
            "/d/if-match",
            vec![("if-match".into(), "\"other\"".into())],
            412,
            Some(""),
        ),
    ];
    for (path, headers, status, body) in &cases {
        let headers: Vec<(&str, &str)> = headers
            .iter()
            .map(|(n, v)| (n.as_str(), v.as_str()))
            .collect();
        for round in ["fill", "hit"] {
            let answer = client.get(&url(&fleet[0], path), &headers).await;
            assert_eq!(answer.status, *status, "{path} ({round})");
            let want = body.map_or_else(|| plain(path), str::to_owned);
            assert_eq!(answer.text(), want, "{path} ({round})");
        }
        assert_eq!(origin.calls_for(path), 1, "{path}: one fill");
    }

    // HEAD: the GET entry's headers, no body; a HEAD miss fills as a GET that GETs then share.
    let head = |path: &str| {
        support::client::request(
            http::Method::HEAD,
            &url(&fleet[0], path),
            &[],
            Default::default(),
        )
    };
    let first = client.send(head("/d/head")).await;
    assert_eq!(first.status, 200);
    assert!(first.body.is_empty());
    assert_eq!(origin.last_method("/d/head"), Some(http::Method::GET));
    let get = client.get(&url(&fleet[0], "/d/head"), &[]).await;
    assert_eq!(get.text(), plain("/d/head"));
    assert_eq!(get.cache_status().as_deref(), Some("corral; hit"));
    assert_eq!(
        first.header("content-length"),
        Some(plain("/d/head").len().to_string().as_str())
    );
    assert_eq!(first.header("etag"), get.header("etag"));
    let again = client.send(head("/d/head")).await;
    assert_eq!(again.cache_status().as_deref(), Some("corral; hit"));
    assert_eq!(origin.calls_for("/d/head"), 1);
}
