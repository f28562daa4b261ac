//! HTTP caching semantics, what is stored and for how long: freshness (RFC 9111 §4.2), statuses,
//! credential headers, invalidation by unsafe requests (§4.4) and targeted cache control
//! (RFC 9213). One table-driven test per rule, against the scripted upstream, whose answers a
//! test sets per path. `semantics.rs` holds the rules about what a shared answer is made of.

mod support;

use support::corral::{config, start, url};
use support::{Client, RedisServer, Reply, Upstream};

fn scripted_route(upstream: &Upstream, extra: &str) -> String {
    format!(
        "[[route]]\nname = \"s\"\npath_prefix = \"/\"\nupstream = \"{}\"\n{extra}\n",
        upstream.url()
    )
}

fn http_date_in(secs: i64) -> String {
    let now = std::time::SystemTime::now();
    let at = if secs >= 0 {
        now + std::time::Duration::from_secs(secs.unsigned_abs())
    } else {
        now - std::time::Duration::from_secs(secs.unsigned_abs())
    };
    httpdate::fmt_http_date(at)
}

/// Rule 8: freshness per RFC 9111 §4.2 — the upstream's `Age` counts, `Expires` is honoured
/// without `max-age`, `must-revalidate`/`proxy-revalidate` forbid stale answers, and quoted
/// strings do not hide or fake directives.
#[tokio::test]
async fn freshness_follows_age_expires_and_revalidation_directives() {
    let upstream = Upstream::start().await;
    let fleet = start(1, &config(None, &scripted_route(&upstream, ""))).await;
    let client = Client::new();
    let future = http_date_in(60);
    let past = http_date_in(-60);
    // (path, headers, second answer's Cache-Status)
    type Case<'a> = (&'a str, Vec<(&'a str, &'a str)>, &'a str);
    let cases: Vec<Case> = vec![
        (
            "/f/age",
            vec![("cache-control", "max-age=60"), ("age", "20")],
            "corral; hit",
        ),
        (
            "/f/aged-out",
            vec![("cache-control", "max-age=10"), ("age", "30")],
            "corral; fwd=miss",
        ),
        (
            "/f/expires",
            vec![("expires", future.as_str())],
            "corral; hit",
        ),
        (
            "/f/expired",
            vec![("expires", past.as_str())],
            "corral; fwd=miss",
        ),
        ("/f/expires-0", vec![("expires", "0")], "corral; fwd=miss"),
        (
            "/f/max-age-wins",
            vec![("cache-control", "max-age=60"), ("expires", past.as_str())],
            "corral; hit",
        ),
        (
            "/f/swr",
            vec![("cache-control", "max-age=0, stale-while-revalidate=30")],
            "corral; hit; detail=stale",
        ),
        (
            "/f/must",
            vec![(
                "cache-control",
                "max-age=0, stale-while-revalidate=30, must-revalidate",
            )],
            "corral; fwd=miss",
        ),
        (
            "/f/proxy",
            vec![(
                "cache-control",
                "max-age=0, stale-while-revalidate=30, proxy-revalidate",
            )],
            "corral; fwd=miss",
        ),
        (
            "/f/quoted",
            vec![("cache-control", "ext=\"a, no-store\", max-age=60")],
            "corral; hit",
        ),
        (
            "/f/quoted-max-age",
            vec![("cache-control", "no-store, ext=\"max-age=60\"")],
            "corral; fwd=bypass",
        ),
    ];
    for (path, headers, second) in &cases {
        upstream.script(path, Reply::status(200).headers(headers));
        let target = url(&fleet[0], path);
        client.get(&target, &[]).await;
        let again = client.get(&target, &[]).await;
        assert_eq!(again.cache_status().as_deref(), Some(*second), "{path}");
    }
    let aged = client.get(&url(&fleet[0], "/f/age"), &[]).await;
    let age: u64 = aged.header("age").and_then(|a| a.parse().ok()).unwrap_or(0);
    assert!(age >= 20, "Age includes the upstream's: {age}");
    let ttl = aged.header("cache-status").unwrap_or_default().to_owned();
    assert!(
        ttl.ends_with("ttl=40") || ttl.ends_with("ttl=39"),
        "ttl counts the upstream's Age: {ttl}"
    );
}

/// Rule 12 and 11: with explicit freshness the statuses RFC 9110 calls cacheable are stored by
/// default; heuristic freshness (the route's `ttl`) only for 200; `cache_statuses` narrows;
/// 206/5xx are never stored; `credential_headers` bypass like `Authorization`.
#[tokio::test]
async fn statuses_and_credential_headers() {
    let upstream = Upstream::start().await;
    let routes = format!(
        "{}[[route]]\nname = \"narrow\"\npath_prefix = \"/narrow\"\nupstream = \"{}\"\ncache_statuses = [200]\n",
        scripted_route(&upstream, "credential_headers = [\"X-Api-Key\"]"),
        upstream.url()
    );
    let fleet = start(1, &config(None, &routes)).await;
    let client = Client::new();
    let fresh = ("cache-control", "max-age=60");
    // (path, status, headers, second answer's Cache-Status)
    type Case<'a> = (&'a str, u16, Vec<(&'a str, &'a str)>, &'a str);
    let cases: Vec<Case> = vec![
        ("/st/404", 404, vec![fresh], "corral; hit"),
        (
            "/st/301",
            301,
            vec![fresh, ("location", "/x")],
            "corral; hit",
        ),
        ("/st/410", 410, vec![fresh], "corral; hit"),
        ("/st/204", 204, vec![fresh], "corral; hit"),
        ("/st/404-heuristic", 404, vec![], "corral; fwd=miss"),
        ("/st/200-heuristic", 200, vec![], "corral; hit"),
        ("/st/500", 500, vec![fresh], "corral; fwd=miss"),
        // Personal to its requester, then passed through for `uncacheable_ttl`: never a hit.
        (
            "/st/206",
            206,
            vec![fresh, ("content-range", "bytes 0-1/9")],
            "corral; fwd=bypass",
        ),
        ("/narrow/404", 404, vec![fresh], "corral; fwd=miss"),
    ];
    for (path, status, headers, second) in &cases {
        let mut reply = Reply::status(*status);
        for (name, value) in headers {
            reply = reply.header(name, value);
        }
        upstream.script(path, reply);
        let target = url(&fleet[0], path);
        let first = client.get(&target, &[]).await;
        assert_eq!(first.status, *status, "{path}");
        let again = client.get(&target, &[]).await;
        assert_eq!(again.status, *status, "{path}");
        assert_eq!(again.cache_status().as_deref(), Some(*second), "{path}");
    }

    let target = url(&fleet[0], "/st/200-heuristic");
    let with_key = client.get(&target, &[("x-api-key", "secret")]).await;
    assert_eq!(
        with_key.cache_status().as_deref(),
        Some("corral; fwd=bypass")
    );
}

/// Rule 13: an unsafe request that passes through and gets a 2xx/3xx invalidates its target URI
/// and a same-origin `Location`/`Content-Location`, fleet-wide; an error invalidates nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsafe_requests_invalidate_their_targets_fleet_wide() {
    let redis = RedisServer::start().await;
    let upstream = Upstream::start().await;
    let routes = scripted_route(&upstream, "");
    let fleet = start(2, &config(Some(&redis.url()), &routes)).await;
    let client = Client::new();
    let fresh = Reply::status(200).header("cache-control", "max-age=600");
    // (unsafe request's path, its status and headers, paths it must invalidate, paths it must not)
    let cases: Vec<(&str, Reply, Vec<&str>, Vec<&str>)> = vec![
        ("/inv/a", Reply::status(204), vec!["/inv/a"], vec!["/inv/b"]),
        (
            "/inv/c",
            Reply::status(201).header("location", "/inv/d"),
            vec!["/inv/c", "/inv/d"],
            vec![],
        ),
        (
            "/inv/e",
            Reply::status(200).header("content-location", "http://elsewhere.example/inv/f"),
            vec!["/inv/e"],
            vec!["/inv/f"],
        ),
        ("/inv/g", Reply::status(500), vec![], vec!["/inv/g"]),
    ];
    for (target, reply, gone, kept) in cases {
        let paths: Vec<&str> = gone.iter().chain(&kept).copied().chain([target]).collect();
        let mut before = std::collections::HashMap::new();
        for path in &paths {
            upstream.script(path, fresh.clone());
            let filled = client.get(&url(&fleet[0], path), &[]).await;
            let hit = client.get(&url(&fleet[1], path), &[]).await;
            assert_eq!(hit.cache_status().as_deref(), Some("corral; hit"), "{path}");
            before.insert(*path, filled.body);
        }
        upstream.script(target, reply);
        for method in [http::Method::POST, http::Method::DELETE] {
            let req = support::client::request(method, &url(&fleet[1], target), &[], "x".into());
            client.send(req).await;
        }
        upstream.script(target, fresh.clone());
        for path in &gone {
            // At once on the instance that passed the request; by pub/sub on the other.
            let here = client.get(&url(&fleet[1], path), &[]).await;
            assert_ne!(here.body, before[path], "{path} invalidated");
            support::eventually(
                "the invalidation reached the other instance",
                std::time::Duration::from_secs(5),
                async || client.get(&url(&fleet[0], path), &[]).await.body != before[path],
            )
            .await;
        }
        for path in &kept {
            for instance in &fleet {
                let answer = client.get(&url(instance, path), &[]).await;
                assert_eq!(answer.body, before[path], "{path} kept");
            }
        }
    }
}

/// Rule 13 (RFC 9213): `Corral-Cache-Control`, then `CDN-Cache-Control`, replace `Cache-Control`
/// for Corral; `Corral-Cache-Control` never reaches a client.
#[tokio::test]
async fn targeted_cache_control_fields() {
    let upstream = Upstream::start().await;
    let fleet = start(1, &config(None, &scripted_route(&upstream, ""))).await;
    let client = Client::new();
    // (path, headers, second answer's Cache-Status)
    type Case<'a> = (&'a str, Vec<(&'a str, &'a str)>, &'a str);
    let cases: Vec<Case> = vec![
        (
            "/t/cdn",
            vec![
                ("cdn-cache-control", "max-age=60"),
                ("cache-control", "no-store"),
            ],
            "corral; hit",
        ),
        (
            "/t/cdn-no-store",
            vec![
                ("cdn-cache-control", "no-store"),
                ("cache-control", "max-age=60"),
            ],
            "corral; fwd=bypass",
        ),
        (
            "/t/corral",
            vec![
                ("corral-cache-control", "max-age=60"),
                ("cache-control", "no-store"),
            ],
            "corral; hit",
        ),
        (
            "/t/corral-over-cdn",
            vec![
                ("corral-cache-control", "max-age=60"),
                ("cdn-cache-control", "no-store"),
            ],
            "corral; hit",
        ),
        (
            "/t/cdn-ignores-expires",
            vec![
                ("cdn-cache-control", "max-age=0"),
                ("expires", "Fri, 01 Jan 2100 00:00:00 GMT"),
            ],
            "corral; fwd=miss",
        ),
    ];
    for (path, headers, second) in &cases {
        upstream.script(path, Reply::status(200).headers(headers));
        let target = url(&fleet[0], path);
        let first = client.get(&target, &[]).await;
        let again = client.get(&target, &[]).await;
        assert_eq!(again.cache_status().as_deref(), Some(*second), "{path}");
        for answer in [&first, &again] {
            assert_eq!(
                answer.header("corral-cache-control"),
                None,
                "{path}: stripped"
            );
        }
        let cdn = headers.iter().find(|(n, _)| *n == "cdn-cache-control");
        assert_eq!(
            first.header("cdn-cache-control"),
            cdn.map(|(_, v)| *v),
            "{path}: passed on"
        );
    }
}

/// Rule 10: `Cache-Status` per RFC 9211, the same labels on every instance. A hit carries `ttl`;
/// the leader `fwd=miss; fwd-status=S; stored`; a waiter, local or remote, `collapsed` — also
/// when the fill failed (never a `hit` on an answer the cache never held).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_status_labels_agree_across_the_fleet() {
    let redis = RedisServer::start().await;
    let upstream = Upstream::start().await;
    let fleet = start(
        2,
        &config(Some(&redis.url()), &scripted_route(&upstream, "")),
    )
    .await;
    let client = Client::new();
    let delay = std::time::Duration::from_millis(800);
    // (path, reply, the leader's label, the waiters' label)
    let cases = [
        (
            "/cs/ok",
            Reply::status(200)
                .header("cache-control", "max-age=60")
                .delay(delay),
            "corral; fwd=miss; fwd-status=200; stored",
            "corral; fwd=miss; fwd-status=200; collapsed",
        ),
        (
            "/cs/failed",
            Reply::status(502).delay(delay),
            "corral; fwd=miss; fwd-status=502",
            "corral; fwd=miss; fwd-status=502; collapsed",
        ),
    ];
    for (path, reply, leader_label, waiter_label) in cases {
        upstream.script(path, reply);
        let leader = client.spawn_get(url(&fleet[0], path));
        upstream.wait_in_flight(1).await;
        let waiters: Vec<_> = (0..10)
            .map(|i| client.spawn_get(url(&fleet[i % 2], path)))
            .collect();
        let leader = leader.await.expect("leader task");
        assert_eq!(leader.header("cache-status"), Some(leader_label), "{path}");
        for waiter in waiters {
            let waiter = waiter.await.expect("waiter task");
            assert_eq!(waiter.header("cache-status"), Some(waiter_label), "{path}");
        }
        assert_eq!(upstream.calls_for(path), 1, "{path}");
    }
    let hit = client.get(&url(&fleet[1], "/cs/ok"), &[]).await;
    let label = hit.header("cache-status").unwrap_or_default().to_owned();
    assert!(
        label.starts_with("corral; hit; ttl=") && label[17..].parse::<u32>().is_ok_and(|t| t <= 60),
        "{label}"
    );
}
