//! HTTP caching semantics: a shared cache never hands one client another's answer.
//!
//! Every test runs against [`Origin`], an upstream that itself honours conditional requests,
//! `Range` and `Vary` and builds its body from headers origins commonly read, so a header wrongly
//! forwarded on a shared fill shows up as a wrong shared answer. One table-driven test per rule;
//! `semantics_storage.rs` holds the rules about what is stored and for how long.

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

    // A waiter on another instance coalesced into a fill led by a Range request gets the whole
    // answer, and the leader its range, cut by Corral.
    origin.set_delay(std::time::Duration::from_millis(500));
    let path = "/c/coalesced-range";
    let leader = {
        let client = client.clone();
        let target = url(&fleet[0], path);
        tokio::spawn(async move { client.get(&target, &[("range", "bytes=0-3")]).await })
    };
    support::eventually(
        "the leader's fill reached the origin",
        std::time::Duration::from_secs(5),
        async || origin.calls_for(path) == 1,
    )
    .await;
    let waiter = client.get(&url(&fleet[1], path), &[]).await;
    let leader = leader.await.expect("the leader's task");
    assert_eq!((waiter.status, waiter.text()), (200, plain(path)));
    assert_eq!(
        waiter.cache_status().as_deref(),
        Some("corral; fwd=miss; collapsed")
    );
    assert_eq!(
        (leader.status, leader.text()),
        (206, plain(path)[..4].to_owned())
    );
    assert_eq!(
        leader.header("cache-status"),
        Some("corral; fwd=miss; fwd-status=200; stored")
    );
    assert_eq!(origin.calls_for(path), 1);
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

    // Concurrent HEAD and GET misses of one key share one fill.
    origin.set_delay(std::time::Duration::from_millis(300));
    let asks = (0..10).map(|i| {
        let client = client.clone();
        let method = if i % 2 == 0 {
            http::Method::HEAD
        } else {
            http::Method::GET
        };
        let req = support::client::request(
            method.clone(),
            &url(&fleet[0], "/d/both"),
            &[],
            Default::default(),
        );
        async move { (method, client.send(req).await) }
    });
    for (method, answer) in futures_util::future::join_all(asks).await {
        assert_eq!(answer.status, 200, "{method}");
        let want = if method == http::Method::HEAD {
            String::new()
        } else {
            plain("/d/both")
        };
        assert_eq!(answer.text(), want, "{method}");
    }
    assert_eq!(
        origin.calls_for("/d/both"),
        1,
        "one fill for HEADs and GETs"
    );
}

/// Sends raw bytes to an instance and returns the status of the answer (0: none).
async fn raw_status(instance: &corral::Instance, request: &str) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let io = async {
        let mut stream = tokio::net::TcpStream::connect(instance.addr()).await.ok()?;
        stream.write_all(request.as_bytes()).await.ok()?;
        let mut buf = vec![0u8; 1024];
        let n = stream.read(&mut buf).await.ok()?;
        let head = String::from_utf8_lossy(&buf[..n]).into_owned();
        head.split(' ').nth(1)?.parse().ok()
    };
    tokio::time::timeout(std::time::Duration::from_secs(10), io)
        .await
        .ok()
        .flatten()
        .unwrap_or(0)
}

/// Rule 3: one path everywhere — routing, key and upstream request see the same normalized path,
/// or the request gets 400; HTTP/1.1 needs exactly one Host; an absolute-form target's authority
/// wins over Host.
#[tokio::test]
async fn one_normalized_path_for_routing_key_and_upstream() {
    let origin = Origin::start().await;
    let routes = format!(
        "{}[[route]]\nname = \"secret\"\npath_prefix = \"/secret\"\nupstream = \"{}\"\ncache = false\n",
        route(&origin, "").replace("path_prefix = \"/\"", "path_prefix = \"/r\""),
        origin.url()
    );
    let fleet = start(1, &config(None, &routes)).await;
    let client = Client::new();
    // (target, status, Cache-Status, path the origin saw)
    let cases: [(&str, u16, &str, Option<&str>); 6] = [
        (
            "/r/../secret/x",
            200,
            "corral; fwd=bypass",
            Some("/secret/x"),
        ),
        (
            "/r/%2e%2e/secret/y",
            200,
            "corral; fwd=bypass",
            Some("/secret/y"),
        ),
        ("/r/./a/../b", 200, "corral; fwd=miss; stored", Some("/r/b")),
        (
            "/r/%7Euser",
            200,
            "corral; fwd=miss; stored",
            Some("/r/~user"),
        ),
        ("/r/..%2fsecret/z", 400, "corral; fwd=bypass", None),
        ("/r/%2e%2e%5csecret/z", 400, "corral; fwd=bypass", None),
    ];
    for (target, status, cache_status, seen) in cases {
        let calls = origin.calls();
        let answer = client.get(&url(&fleet[0], target), &[]).await;
        assert_eq!(answer.status, status, "{target}");
        assert_eq!(
            answer.cache_status().as_deref(),
            Some(cache_status),
            "{target}"
        );
        match seen {
            Some(path) => assert_eq!(origin.calls_for(path), 1, "{target} reached {path}"),
            None => assert_eq!(origin.calls(), calls, "{target} reached no upstream"),
        }
    }
    // The normalized and the literal spelling share one key.
    let literal = client.get(&url(&fleet[0], "/r/~user"), &[]).await;
    assert_eq!(literal.cache_status().as_deref(), Some("corral; hit"));

    let cases = [
        ("GET /r/h HTTP/1.1\r\n\r\n", 400),
        ("GET /r/h HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
        (
            "GET /r/h HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
            200,
        ),
    ];
    for (request, status) in cases {
        assert_eq!(raw_status(&fleet[0], request).await, status, "{request:?}");
    }
    let absolute = "GET http://real.example/secret/abs HTTP/1.1\r\nHost: other.example\r\nConnection: close\r\n\r\n";
    assert_eq!(raw_status(&fleet[0], absolute).await, 200);
    let seen = origin
        .last_headers("/secret/abs")
        .expect("reached the origin");
    assert_eq!(seen["x-forwarded-host"], "real.example");
}

/// Rule 5: a route that caches a method with a body keys all of it when `key.json` does not
/// narrow it; a body on GET is keyed too.
#[tokio::test]
async fn whole_bodies_are_keyed_unless_key_json_narrows_them() {
    let origin = Origin::start().await;
    let fleet = start(1, &config(None, &route(&origin, ""))).await;
    let client = Client::new();
    let send = |method: http::Method, path: &str, body: &'static str| {
        support::client::request(method, &url(&fleet[0], path), &[], body.into())
    };
    use http::Method;
    // (method, path, body, Cache-Status, what the answer must echo)
    let cases = [
        (
            Method::POST,
            "/p",
            "a",
            "corral; fwd=miss; stored",
            ";body=a",
        ),
        (
            Method::POST,
            "/p",
            "b",
            "corral; fwd=miss; stored",
            ";body=b",
        ),
        (Method::POST, "/p", "a", "corral; hit", ";body=a"),
        (
            Method::GET,
            "/g",
            "x",
            "corral; fwd=miss; stored",
            ";body=x",
        ),
        (
            Method::GET,
            "/g",
            "",
            "corral; fwd=miss; stored",
            "original-url=-",
        ),
        (Method::GET, "/g", "x", "corral; hit", ";body=x"),
    ];
    for (method, path, body, cache_status, echo) in cases {
        let answer = client.send(send(method.clone(), path, body)).await;
        assert_eq!(
            answer.cache_status().as_deref(),
            Some(cache_status),
            "{method} {path} {body:?}"
        );
        assert!(
            answer.text().ends_with(echo),
            "{method} {path} {body:?}: {}",
            answer.text()
        );
    }
    assert_eq!(origin.calls(), 4);
}

/// Rule 4: `Vary` — variants are stored and served separately, fleet-wide; equivalent values
/// share a variant; `Vary: *` is never shared; concurrent waiters coalesce per variant.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn variants_are_stored_served_and_coalesced_separately() {
    let redis = RedisServer::start().await;
    let origin = Origin::start().await;
    let fleet = start(2, &config(Some(&redis.url()), &route(&origin, ""))).await;
    let client = Client::new();
    let body = |lang: &str, enc: &str| representation("/vary/a", lang, enc, "-", "-");
    // (instance, accept-language, accept-encoding, Cache-Status, body's lang and enc)
    let cases = [
        (
            0,
            Some("fr"),
            Some("gzip, br"),
            "corral; fwd=miss; stored",
            ("fr", "gzip, br"),
        ),
        (
            1,
            Some("en"),
            Some("gzip, br"),
            "corral; fwd=miss; stored",
            ("en", "gzip, br"),
        ),
        (
            1,
            Some("FR"),
            Some("br,GZIP"),
            "corral; hit",
            ("fr", "gzip, br"),
        ),
        (
            0,
            Some("en"),
            Some("br, gzip"),
            "corral; hit",
            ("en", "gzip, br"),
        ),
        (1, Some("fr"), None, "corral; fwd=miss; stored", ("fr", "-")),
        (0, None, None, "corral; fwd=miss; stored", ("-", "-")),
        (1, None, None, "corral; hit", ("-", "-")),
        (
            1,
            Some("fr"),
            Some("gzip, br"),
            "corral; hit",
            ("fr", "gzip, br"),
        ),
    ];
    for (i, (instance, lang, enc, cache_status, (want_lang, want_enc))) in cases.iter().enumerate()
    {
        let mut headers = Vec::new();
        if let Some(lang) = lang {
            headers.push(("accept-language", *lang));
        }
        if let Some(enc) = enc {
            headers.push(("accept-encoding", *enc));
        }
        let answer = client
            .get(&url(&fleet[*instance], "/vary/a"), &headers)
            .await;
        assert_eq!(
            answer.text(),
            body(want_lang, want_enc),
            "case {i}: {headers:?}"
        );
        assert_eq!(
            answer.cache_status().as_deref(),
            Some(*cache_status),
            "case {i}: {headers:?}"
        );
    }
    assert_eq!(origin.calls_for("/vary/a"), 4, "one fill per variant");

    // A purge of the URL reaches its variants too: once the primary entry is refilled (by
    // another variant), the old variants are never served again.
    let purge = corral::purge::PurgeRequest::parse(br#"{"url": "/vary/a"}"#).expect("a purge");
    fleet[0].proxy().purge(&purge).await.expect("purged");
    let lang = |l: &'static str| vec![("accept-language", l), ("accept-encoding", "gzip, br")];
    let refilled = client.get(&url(&fleet[0], "/vary/a"), &lang("fr")).await;
    assert_eq!(
        refilled.cache_status().as_deref(),
        Some("corral; fwd=miss; stored")
    );
    // `en` was stored as a variant before the purge: it must be filled anew, not found.
    support::eventually(
        "the purge reached the other instance",
        std::time::Duration::from_secs(5),
        async || {
            let en = client.get(&url(&fleet[1], "/vary/a"), &lang("en")).await;
            assert_eq!(en.text(), body("en", "gzip, br"));
            origin.calls_for("/vary/a") == 6
        },
    )
    .await;
    assert_eq!(origin.calls_for("/vary/a"), 6, "both variants filled anew");

    // Vary: * is never shared.
    for _ in 0..2 {
        let answer = client.get(&url(&fleet[0], "/star"), &[]).await;
        assert_ne!(answer.cache_status().as_deref(), Some("corral; hit"));
    }
    assert_eq!(origin.calls_for("/star"), 2);

    // Concurrent misses of two variants over two instances: one fill per variant, each waiter
    // answered with its own.
    origin.set_delay(std::time::Duration::from_millis(300));
    let asks = (0..20).map(|i| {
        let lang = if i % 2 == 0 { "de" } else { "it" };
        let target = url(&fleet[(i / 2) % 2], "/vary/b");
        let client = client.clone();
        async move {
            (
                lang,
                client.get(&target, &[("accept-language", lang)]).await,
            )
        }
    });
    for (lang, answer) in futures_util::future::join_all(asks).await {
        assert_eq!(
            answer.text(),
            representation("/vary/b", lang, "-", "-", "-")
        );
    }
    assert_eq!(
        origin.calls_for("/vary/b"),
        2,
        "one fill per variant, fleet-wide"
    );
}
