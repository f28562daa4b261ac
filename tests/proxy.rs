//! The proxy as a proxy: routing, request rewriting, hop-by-hop hygiene, body limits, keying on
//! JSON bodies, and the `Cache-Status` / `Age` headers.

mod support;

use bytes::Bytes;
use support::corral::{config, recommend_route, start, url};
use support::{Client, Reply, Upstream};

/// One GET of `/recommend?segment=a` with `headers` through a `/recommend` route with `extra`:
/// the headers the upstream saw, the upstream, and the instance.
async fn seen_upstream(
    extra: &str,
    headers: &[(&str, &str)],
) -> (http::HeaderMap, Upstream, Vec<corral::Instance>) {
    let upstream = Upstream::start().await;
    let routes = recommend_route(&upstream.url(), extra);
    let fleet = start(1, &config(None, &routes)).await;
    Client::new()
        .get(&url(&fleet[0], "/recommend?segment=a"), headers)
        .await;
    let seen = upstream
        .last_headers("/recommend?segment=a")
        .expect("the upstream saw the request");
    (seen, upstream, fleet)
}

#[tokio::test]
async fn bypassed_requests_are_rewritten_as_a_reverse_proxy_should() {
    let headers = [
        ("connection", "x-hop"),
        ("x-hop", "1"),
        ("keep-alive", "timeout=5"),
        ("te", "trailers"),
        ("x-forwarded-for", "10.1.2.3"),
        ("x-end-to-end", "kept"),
    ];
    let (seen, upstream, fleet) = seen_upstream("cache = false", &headers).await;
    for hop in ["connection", "x-hop", "keep-alive", "te"] {
        assert!(!seen.contains_key(hop), "{hop} must not be forwarded");
    }
    assert_eq!(seen["x-end-to-end"], "kept");
    assert_eq!(seen["x-forwarded-for"], "10.1.2.3, 127.0.0.1");
    assert_eq!(
        seen["host"].to_str().ok(),
        Some(upstream.addr().to_string().as_str())
    );
    assert_eq!(
        seen["x-forwarded-host"],
        fleet[0].addr().to_string().as_str()
    );
    let forwarded = seen["forwarded"].to_str().unwrap_or_default();
    assert!(
        forwarded.starts_with("for=127.0.0.1;proto=http;host="),
        "{forwarded}"
    );
}

#[tokio::test]
async fn shared_fills_carry_only_keyed_and_allowed_headers() {
    let headers = [
        ("connection", "x-hop"),
        ("x-hop", "1"),
        ("x-forwarded-for", "10.1.2.3"),
        ("x-end-to-end", "kept"),
        ("x-other", "dropped"),
    ];
    let extra = "forward_headers = [\"x-end-to-end\"]";
    let (seen, _upstream, _fleet) = seen_upstream(extra, &headers).await;
    for dropped in [
        "connection",
        "x-hop",
        "x-other",
        "x-forwarded-for",
        "x-forwarded-host",
    ] {
        assert!(
            !seen.contains_key(dropped),
            "{dropped} must not be forwarded"
        );
    }
    assert_eq!(seen["x-end-to-end"], "kept");
    assert_eq!(seen["x-forwarded-proto"], "http");
    assert_eq!(seen["forwarded"], "proto=http");
}

#[tokio::test]
async fn hop_by_hop_response_fields_are_removed() {
    let upstream = Upstream::start().await;
    upstream.script(
        "/recommend",
        Reply::status(200)
            .header("connection", "x-internal")
            .header("x-internal", "secret")
            .header("x-public", "ok"),
    );
    let fleet = start(1, &config(None, &recommend_route(&upstream.url(), ""))).await;
    let client = Client::new();

    for _ in 0..2 {
        let answer = client.get(&url(&fleet[0], "/recommend"), &[]).await;
        assert_eq!(answer.header("x-public"), Some("ok"));
        assert_eq!(
            answer.header("x-internal"),
            None,
            "neither fresh nor cached"
        );
    }
}

#[tokio::test]
async fn routes_match_longest_prefix_on_segment_boundaries() {
    let upstream = Upstream::start().await;
    let other = Upstream::start().await;
    let routes = format!(
        "{}\n[[route]]\nname = \"special\"\npath_prefix = \"/recommend/special\"\nupstream = \"{}\"\n",
        recommend_route(&upstream.url(), ""),
        other.url()
    );
    let fleet = start(1, &config(None, &routes)).await;
    let client = Client::new();

    client
        .get(&url(&fleet[0], "/recommend/special/x"), &[])
        .await;
    client.get(&url(&fleet[0], "/recommend/x"), &[]).await;
    assert_eq!(other.calls(), 1);
    assert_eq!(upstream.calls(), 1);

    // `/recommendations` is not under `/recommend`, and there is no default upstream.
    let answer = client.get(&url(&fleet[0], "/recommendations"), &[]).await;
    assert_eq!(answer.status, 404);
    assert_eq!(
        answer.cache_status().as_deref(),
        Some("corral; fwd=uri-miss")
    );
    assert_eq!(upstream.calls() + other.calls(), 2);
}

#[tokio::test]
async fn unrouted_requests_go_to_the_default_upstream_uncached() {
    let upstream = Upstream::start().await;
    let fallback = Upstream::start().await;
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\ndefault_upstream = \"{}\"\n\n{}",
        fallback.url(),
        recommend_route(&upstream.url(), "")
    );
    let cfg = corral::Config::parse(&text, std::path::Path::new("<test>")).expect("config");
    let fleet = start(1, &cfg).await;
    let client = Client::new();

    for _ in 0..2 {
        let answer = client.get(&url(&fleet[0], "/elsewhere"), &[]).await;
        assert_eq!(answer.status, 200);
        assert_eq!(
            answer.cache_status().as_deref(),
            Some("corral; fwd=uri-miss")
        );
    }
    assert_eq!(fallback.calls_for("/elsewhere"), 2);
}

#[tokio::test]
async fn oversized_and_unkeyable_bodies_are_refused_before_any_backend_call() {
    let upstream = Upstream::start().await;
    let routes = recommend_route(
        &upstream.url(),
        "max_body = \"1KiB\"\nkey = { json = [\"/segment\"] }",
    );
    let fleet = start(1, &config(None, &routes)).await;
    let client = Client::new();
    let target = url(&fleet[0], "/recommend");

    let big = Bytes::from(vec![b' '; 4096]);
    let answer = client.post(&target, &[], big).await;
    assert_eq!(answer.status, 413);

    let answer = client.post(&target, &[], "{not json").await;
    assert_eq!(answer.status, 400);
    assert!(
        answer.text().contains("not valid JSON"),
        "{}",
        answer.text()
    );

    let answer = client
        .post(&target, &[], r#"{"segment":"a","segment":"b"}"#)
        .await;
    assert_eq!(answer.status, 400);
    assert!(answer.text().contains("duplicate"), "{}", answer.text());

    assert_eq!(upstream.calls(), 0);
}

#[tokio::test]
async fn json_bodies_key_on_the_chosen_fields_only() {
    let upstream = Upstream::start().await;
    let routes = recommend_route(
        &upstream.url(),
        "key = { json = [\"/segment\", \"/article_id\"] }",
    );
    let fleet = start(1, &config(None, &routes)).await;
    let client = Client::new();
    let target = url(&fleet[0], "/recommend");

    let first = client
        .post(
            &target,
            &[],
            r#"{"segment":"sports","article_id":7,"user":"a"}"#,
        )
        .await;
    // Same fields, other order and spacing, another unlisted field: same key.
    let same = client
        .post(
            &target,
            &[],
            "{ \"user\" : \"b\",\n \"article_id\": 7, \"segment\": \"sports\" }",
        )
        .await;
    assert_eq!(first.body, same.body);
    assert_eq!(same.cache_status().as_deref(), Some("corral; hit"));
    assert_eq!(upstream.calls(), 1);

    let other = client
        .post(&target, &[], r#"{"segment":"news","article_id":7}"#)
        .await;
    assert_eq!(
        other.cache_status().as_deref(),
        Some("corral; fwd=miss; stored")
    );
    assert_eq!(upstream.calls(), 2);
}

#[tokio::test]
async fn hits_carry_cache_status_and_an_age_that_counts_the_upstreams() {
    let upstream = Upstream::start().await;
    upstream.script(
        "/recommend",
        Reply::status(200)
            .header("cache-control", "max-age=60")
            .header("age", "20"),
    );
    let fleet = start(1, &config(None, &recommend_route(&upstream.url(), ""))).await;
    let client = Client::new();
    let target = url(&fleet[0], "/recommend?segment=a");

    let miss = client.get(&target, &[]).await;
    assert_eq!(
        miss.cache_status().as_deref(),
        Some("corral; fwd=miss; stored")
    );
    assert_eq!(
        miss.header("age"),
        Some("20"),
        "the upstream's own Age is passed on"
    );
    let hit = client.get(&target, &[]).await;
    assert_eq!(hit.cache_status().as_deref(), Some("corral; hit"));
    let age: u64 = hit.header("age").and_then(|a| a.parse().ok()).unwrap_or(0);
    assert!((20..30).contains(&age), "Age counts the upstream's: {age}");
    assert_eq!(hit.body, miss.body);
}

/// What a request's future weighs: hyper moves it when it calls the service, so the whole of it
/// is copied for every request. A hit's stays small because every path but the hit (the miss with
/// its fill, the bypass, the unrouted pass) is boxed and allocated only when taken; unboxed, the
/// fill's state made this future over four times larger and its copy a third of a hit's
/// instructions (release build, callgrind).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_requests_future_is_the_size_of_a_hit_not_of_a_fill() {
    let upstream = Upstream::start().await;
    let fleet = start(1, &config(None, &recommend_route(&upstream.url(), ""))).await;
    let proxy = fleet[0].proxy();
    let (parts, ()) = http::Request::get("/recommend?size=1")
        .body(())
        .expect("a valid request")
        .into_parts();
    let peer = "127.0.0.1:1".parse().expect("an address");
    let future = proxy.handle_buffered(parts, Bytes::new(), peer);
    let size = std::mem::size_of_val(&future);
    println!("handle_buffered's future: {size} bytes");
    assert!(size <= MAX_REQUEST_FUTURE, "{size} bytes");
}

/// A fresh hit is answered in hyper's call to the service (`Proxy::begin`), so the future hyper
/// keeps and moves for it is a response's; a miss, a revalidation or a request with a body is left
/// to `Proxy::resume`. Served here by hyper on loopback, the service counting which it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fresh_hit_is_answered_in_the_call_and_a_miss_is_resumed() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};

    let upstream = Upstream::start().await;
    let fleet = start(1, &config(None, &recommend_route(&upstream.url(), ""))).await;
    let proxy = fleet[0].proxy();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("a loopback port");
    let addr = listener.local_addr().expect("its address");
    let answered = Arc::new(Mutex::new(Vec::new()));
    let resumed = Arc::new(AtomicUsize::new(0));
    let (seen, counted) = (answered.clone(), resumed.clone());
    tokio::spawn(async move {
        while let Ok((stream, peer)) = listener.accept().await {
            let (proxy, seen, counted) = (proxy.clone(), seen.clone(), counted.clone());
            let service = hyper::service::service_fn(move |req| {
                let path = req.uri().to_string();
                let begun = proxy.begin(req, peer).map_err(|rest| (proxy.clone(), rest));
                match &begun {
                    Ok(_) => seen.lock().expect("not poisoned").push(path),
                    Err(_) => {
                        counted.fetch_add(1, Ordering::SeqCst);
                    }
                }
                async move {
                    Ok::<_, std::convert::Infallible>(match begun {
                        Ok(resp) => resp,
                        Err((proxy, rest)) => proxy.resume(rest).await,
                    })
                }
            });
            let io = hyper_util::rt::TokioIo::new(stream);
            tokio::spawn(hyper::server::conn::http1::Builder::new().serve_connection(io, service));
        }
    });
    let client = Client::new();
    let at = |path: &str| format!("http://{addr}{path}");
    let miss = client.get(&at("/recommend?segment=a"), &[]).await;
    assert_eq!(miss.status, 200);
    let hit = client.get(&at("/recommend?segment=a"), &[]).await;
    assert_eq!(hit.status, 200);
    assert_eq!(hit.body, miss.body);
    assert_eq!(hit.cache_status().as_deref(), Some("corral; hit"));
    let other = client.get(&at("/recommend?segment=b"), &[]).await;
    assert_eq!(other.status, 200);
    assert_eq!(
        *answered.lock().expect("not poisoned"),
        ["/recommend?segment=a"],
        "only the hit is answered in the call"
    );
    assert_eq!(
        resumed.load(Ordering::SeqCst),
        2,
        "the two misses are resumed"
    );
    assert_eq!(upstream.calls_for("/recommend?segment=a"), 1);
}

/// Bytes a request's future may weigh (measured in a debug build: 2.6 KiB; with the miss path
/// unboxed, 11 KiB).
const MAX_REQUEST_FUTURE: usize = 8 * 1024;
