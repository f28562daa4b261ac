//! Limits that protect Corral and its backend from what clients send and what upstreams answer:
//! request heads (field count, field size, how long they take), request bodies (`max_body`, bodies
//! that never arrive), waiters per key (`lock.max_waiters`), concurrent upstream calls per route
//! (`upstream_concurrency`) and answers too large to store (`max_entry_size`).
//!
//! Where the support client cannot say what a test needs (a head that never ends, a chunked body,
//! a `Content-Length` the body does not honour), the test speaks HTTP/1.1 over a raw
//! [`TcpStream`], and every read on it is bounded so a broken proxy fails the test instead of
//! hanging it.

mod support;

use std::time::Duration;

use bytes::Bytes;
use futures_util::future::join_all;
use support::corral::{
    assert_nothing_stored, config, config_with_server, recommend_route, spread, start, url,
};
use support::{Client, Fleet, Reply, Upstream};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Bound on every raw-socket read that waits for the proxy to answer or close.
const RAW_READ_BOUND: Duration = Duration::from_secs(10);

/// How a raw connection ended, as far as the test waited.
#[derive(Debug)]
enum Ending {
    /// A complete response head arrived, with this status.
    Answered(u16),
    /// The server closed the connection (end of stream or reset) after sending these bytes.
    Closed(String),
    /// Neither an answer nor a close within the bound; what had arrived by then.
    Silent(String),
}

/// Reads until a response head is complete, the connection closes, or `bound` passes.
async fn read_head(stream: &mut TcpStream, bound: Duration) -> Ending {
    let mut seen = Vec::new();
    let reading = async {
        let mut buf = [0_u8; 4096];
        loop {
            match stream.read(&mut buf).await {
                // A reset is as much a close as an end of stream.
                Ok(0) | Err(_) => return false,
                Ok(n) => seen.extend_from_slice(&buf[..n]),
            }
            if seen.windows(4).any(|w| w == b"\r\n\r\n") {
                return true;
            }
        }
    };
    let outcome = tokio::time::timeout(bound, reading).await;
    let text = String::from_utf8_lossy(&seen).into_owned();
    match outcome {
        Ok(true) => match status_of(&text) {
            Some(status) => Ending::Answered(status),
            None => panic!("not an HTTP response head: {text:?}"),
        },
        Ok(false) => Ending::Closed(text),
        Err(_) => Ending::Silent(text),
    }
}

/// Reads until the server closes the connection; `Err` with what arrived if `bound` passes first.
async fn read_until_closed(stream: &mut TcpStream, bound: Duration) -> Result<String, String> {
    let mut seen = Vec::new();
    let reading = async {
        let mut buf = [0_u8; 4096];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => seen.extend_from_slice(&buf[..n]),
            }
        }
    };
    let closed = tokio::time::timeout(bound, reading).await.is_ok();
    let text = String::from_utf8_lossy(&seen).into_owned();
    if closed { Ok(text) } else { Err(text) }
}

/// Reads the answer's head and checks its status; a close or silence instead fails the test.
async fn expect_status(stream: &mut TcpStream, expected: u16) {
    match read_head(stream, RAW_READ_BOUND).await {
        Ending::Answered(status) => assert_eq!(status, expected),
        Ending::Closed(text) => {
            panic!("expected a {expected} answer; the connection closed after {text:?}")
        }
        Ending::Silent(text) => {
            panic!(
                "expected a {expected} answer; none within {RAW_READ_BOUND:?} (received {text:?})"
            )
        }
    }
}

/// The status code of `HTTP/1.1 413 Payload Too Large\r\n…`.
fn status_of(head: &str) -> Option<u16> {
    head.split_whitespace().nth(1)?.parse().ok()
}

async fn connect(instance: &corral::Instance) -> TcpStream {
    TcpStream::connect(instance.addr())
        .await
        .unwrap_or_else(|e| panic!("connect to corral at {}: {e}", instance.addr()))
}

async fn write(stream: &mut TcpStream, bytes: &[u8]) {
    stream
        .write_all(bytes)
        .await
        .unwrap_or_else(|e| panic!("write to corral: {e}"));
}

/// One chunk of a chunked request body.
fn chunk(data: &[u8]) -> Vec<u8> {
    let mut framed = format!("{:x}\r\n", data.len()).into_bytes();
    framed.extend_from_slice(data);
    framed.extend_from_slice(b"\r\n");
    framed
}

#[tokio::test]
async fn request_heads_with_too_many_fields_get_431_and_never_reach_the_upstream() {
    let upstream = Upstream::start().await;
    let cfg = config_with_server(
        "max_headers = 20",
        None,
        &recommend_route(&upstream.url(), ""),
    );
    let fleet = start(1, &cfg).await;
    let client = Client::new();

    // Step 1: a head well under the limit (10 fields and Host) is served.
    let names: Vec<String> = (0..30).map(|i| format!("x-filler-{i}")).collect();
    let fields: Vec<(&str, &str)> = names.iter().map(|n| (n.as_str(), "1")).collect();
    let answer = client
        .get(&url(&fleet[0], "/recommend?few=1"), &fields[..10])
        .await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    assert_eq!(upstream.calls(), 1);

    // Step 2: 30 fields, over `server.max_headers = 20`: refused while the head is parsed.
    let answer = client
        .get(&url(&fleet[0], "/recommend?many=1"), &fields)
        .await;
    assert_eq!(answer.status, 431, "{}", answer.text());
    assert_eq!(
        upstream.calls_for("/recommend?many=1"),
        0,
        "a refused head must not reach the upstream"
    );
}

#[tokio::test]
async fn one_oversized_header_field_is_refused_with_431_before_the_upstream() {
    let upstream = Upstream::start().await;
    let fleet = start(1, &config(None, &recommend_route(&upstream.url(), ""))).await;
    let client = Client::new();

    // Step 1: one field of 200 KiB, a size no legitimate client sends.
    let huge = "a".repeat(200 * 1024);
    let sent = client
        .try_send(support::client::request(
            http::Method::GET,
            &url(&fleet[0], "/recommend?huge=1"),
            &[("x-huge", huge.as_str())],
            Bytes::new(),
        ))
        .await;

    // Step 2: a 4xx (hyper answers 431 to a head over its limit), and nothing upstream.
    match &sent {
        Ok(answer) => assert_eq!(
            answer.status,
            431,
            "a 200 KiB header field was accepted; cache-status {:?}",
            answer.cache_status().as_deref()
        ),
        Err(err) => panic!("no answer to an oversized head (expected 431): {err}"),
    }
    assert_eq!(
        upstream.calls(),
        0,
        "the oversized field reached the upstream"
    );
}

#[tokio::test]
async fn a_request_head_that_never_ends_is_cut_off_after_header_read_timeout() {
    let upstream = Upstream::start().await;
    let cfg = config_with_server(
        "header_read_timeout = \"200ms\"",
        None,
        &recommend_route(&upstream.url(), ""),
    );
    let fleet = start(1, &cfg).await;

    // Step 1: a request line and one field, but never the blank line that ends the head.
    let mut stream = connect(&fleet[0]).await;
    write(&mut stream, b"GET /recommend HTTP/1.1\r\nHost: x\r\n").await;

    // Step 2: the server gives up on the head and closes the connection, with at most a 408.
    let received = read_until_closed(&mut stream, RAW_READ_BOUND).await;
    match received {
        Ok(text) => assert!(
            text.is_empty() || text.starts_with("HTTP/1.1 408"),
            "closed after sending {text:?}"
        ),
        Err(text) => {
            panic!("the connection was still open after {RAW_READ_BOUND:?} (received {text:?})")
        }
    }
    assert_eq!(upstream.calls(), 0);
}

/// A slowloris on a keep-alive connection: after one answered request, the next head arrives a
/// byte at a time, each byte well within `header_read_timeout`, and never ends. The limit runs
/// from the end of the last request, not from the last byte, so the connection is closed.
#[tokio::test]
async fn a_head_trickling_in_after_a_keep_alive_request_is_cut_off_too() {
    let upstream = Upstream::start().await;
    let cfg = config_with_server(
        "header_read_timeout = \"300ms\"",
        None,
        &recommend_route(&upstream.url(), ""),
    );
    let fleet = start(1, &cfg).await;

    // Step 1: one whole request, answered, on a connection kept alive.
    let mut stream = connect(&fleet[0]).await;
    write(&mut stream, b"GET /recommend HTTP/1.1\r\nHost: x\r\n\r\n").await;
    expect_status(&mut stream, 200).await;

    // Step 2: the next head, one byte every 50 ms for up to 20 s; it never ends.
    let (mut read, mut write) = stream.into_split();
    let trickle = async {
        let head = b"GET /recommend HTTP/1.1\r\nX-Slow: "
            .iter()
            .chain([b'a'; 400].iter());
        for byte in head {
            if write.write_all(&[*byte]).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let closed = async {
        let mut buf = [0_u8; 4096];
        while let Ok(n) = read.read(&mut buf).await {
            if n == 0 {
                return;
            }
        }
    };
    // Step 3: the server closes the connection before the client has sent its whole trickle.
    tokio::select! {
        () = closed => {}
        () = trickle => panic!("the connection was still open after 20 s of a head that never ends"),
    }
    assert_eq!(upstream.calls(), 1);
}

/// One instance whose JSON-keyed route takes request bodies of at most 1 KiB.
async fn max_body_instance(upstream: &Upstream) -> Vec<corral::Instance> {
    let routes = recommend_route(
        &upstream.url(),
        "max_body = \"1KiB\"\nkey = { json = [\"/segment\"] }",
    );
    start(1, &config(None, &routes)).await
}

#[tokio::test]
async fn a_declared_content_length_over_max_body_gets_413_before_the_body_is_sent() {
    let upstream = Upstream::start().await;
    let fleet = max_body_instance(&upstream).await;

    // Step 1: a head declaring 10 MiB, and not one byte of the body.
    let mut stream = connect(&fleet[0]).await;
    let head = "POST /recommend HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
                Content-Length: 10485760\r\n\r\n";
    write(&mut stream, head.as_bytes()).await;

    // Step 2: 413 on the declaration alone; the upstream never hears of it.
    expect_status(&mut stream, 413).await;
    assert_eq!(upstream.calls(), 0);
}

#[tokio::test]
async fn a_chunked_body_growing_past_max_body_gets_413_and_never_reaches_the_upstream() {
    let upstream = Upstream::start().await;
    let fleet = max_body_instance(&upstream).await;

    // Step 1: a chunked body (no Content-Length to refuse up front): two 1 KiB chunks, 2 KiB in
    // all, and no final chunk — the proxy must stop reading at the limit, not at the end.
    let mut stream = connect(&fleet[0]).await;
    let mut request = b"POST /recommend HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
                        Transfer-Encoding: chunked\r\n\r\n"
        .to_vec();
    for _ in 0..2 {
        request.extend_from_slice(&chunk(&[b' '; 1024]));
    }
    write(&mut stream, &request).await;

    // Step 2: 413, and nothing upstream.
    expect_status(&mut stream, 413).await;
    assert_eq!(upstream.calls(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiters_past_max_waiters_get_503_with_retry_after() {
    let upstream = Upstream::start().await;
    upstream.set_delay(Duration::from_secs(2));
    let routes = recommend_route(&upstream.url(), "lock = { max_waiters = 5 }");
    let fleet = start(1, &config(None, &routes)).await;
    let client = Client::new();
    let path = "/recommend?segment=hot";
    let target = url(&fleet[0], path);

    // Step 1: the leader's fill is parked in the upstream.
    let leader = client.spawn_get(target);
    upstream.wait_in_flight(1).await;

    // Step 2: 19 more requests for the key while the fill runs: 5 may wait, 14 are turned away.
    let others = spread(&client, &fleet, path, 19).await;
    let leader = leader.await.expect("the leader's request task");
    let answers: Vec<_> = std::iter::once(&leader).chain(&others).collect();

    let ok = answers.iter().filter(|r| r.status == 200).count();
    let turned_away: Vec<_> = answers.iter().filter(|r| r.status == 503).collect();
    assert_eq!(ok, 6, "the leader and its 5 waiters answer 200");
    assert_eq!(turned_away.len(), 14, "the rest are turned away");
    for answer in &turned_away {
        let retry_after = answer.header("retry-after");
        assert!(
            retry_after.is_some_and(|s| s.parse::<u64>().is_ok()),
            "503 without a usable Retry-After: {retry_after:?}"
        );
    }
    assert_eq!(upstream.calls(), 1, "one fill for the key");
}

/// Sends `n` concurrent GETs, to `{prefix}0` … `{prefix}{n-1}`, and checks each answered 200.
async fn burst_over_keys(client: &Client, instance: &corral::Instance, n: usize, prefix: &str) {
    let requests = (0..n).map(|i| {
        let target = url(instance, &format!("{prefix}{i}"));
        let client = client.clone();
        async move { (client.get(&target, &[]).await, target) }
    });
    for (answer, target) in join_all(requests).await {
        assert_eq!(answer.status, 200, "{target}: {}", answer.text());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_concurrency_caps_fills_on_a_cached_route() {
    let upstream = Upstream::start().await;
    upstream.set_delay(Duration::from_millis(300));
    let routes = recommend_route(&upstream.url(), "upstream_concurrency = 2");
    let fleet = start(1, &config(None, &routes)).await;
    let client = Client::new();

    // Ten misses on ten keys at once: ten fills, never more than two in the upstream together.
    burst_over_keys(&client, &fleet[0], 10, "/recommend?item=").await;
    assert_eq!(upstream.calls(), 10, "one fill per key");
    assert!(
        upstream.max_in_flight() <= 2,
        "{} upstream calls ran at once",
        upstream.max_in_flight()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_concurrency_caps_pass_through_routes_too() {
    let upstream = Upstream::start().await;
    upstream.set_delay(Duration::from_millis(300));
    let routes = format!(
        "[[route]]\nname = \"queue-ticket\"\npath_prefix = \"/queue\"\nupstream = \"{}\"\n\
         cache = false\nupstream_concurrency = 2\n",
        upstream.url()
    );
    let fleet = start(1, &config(None, &routes)).await;
    let client = Client::new();

    // Ten pass-through requests at once: all forwarded, never more than two together.
    burst_over_keys(&client, &fleet[0], 10, "/queue/ticket-").await;
    assert_eq!(upstream.calls(), 10);
    assert!(
        upstream.max_in_flight() <= 2,
        "{} upstream calls ran at once",
        upstream.max_in_flight()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_over_max_entry_size_stream_to_every_requester_once_and_are_never_stored() {
    let fleet = Fleet::start(1, "", "max_entry_size = \"1KiB\"").await;
    let (client, upstream, redis) = (&fleet.client, &fleet.upstream, &fleet.redis);
    // 64 KiB that no off-by-one or truncation could reproduce.
    let big: Bytes = (0..64 * 1024).map(|i: u32| (i % 251) as u8).collect();
    upstream.script(
        "/recommend/big",
        Reply::status(200)
            .body(big.clone())
            .delay(Duration::from_millis(300)),
    );
    let path = "/recommend/big";
    let target = url(&fleet[0], path);

    // Step 1: ten identical requests at once; every one gets the whole 64 KiB, streamed from
    // one upstream call: too large to store is no reason to call the upstream ten times.
    let answers = spread(client, &fleet, path, 10).await;
    for answer in &answers {
        assert_eq!(answer.status, 200, "{}", answer.text());
        assert_eq!(answer.body.len(), big.len());
        assert!(answer.body == big, "the body differs from the upstream's");
        let status = answer.cache_status();
        let status = status.as_deref();
        assert!(
            matches!(
                status,
                Some("corral; fwd=miss" | "corral; fwd=miss; collapsed")
            ),
            "an unstorable answer is neither stored nor a hit: {status:?}"
        );
    }
    assert_eq!(upstream.calls_for("/recommend/big"), 1);

    // Step 2: nothing stored, in Redis or in L1, and no uncacheable marker either.
    assert_nothing_stored(redis, &fleet[0]).await;
    assert!(redis.keys("corral:*:pass:*").await.is_empty());

    // Step 3: a later request is a fresh fill, still whole.
    let later = client.get(&target, &[]).await;
    assert_eq!(later.status, 200);
    assert!(later.body == big, "the body differs from the upstream's");
    assert_eq!(later.cache_status().as_deref(), Some("corral; fwd=miss"));
    assert_eq!(upstream.calls_for("/recommend/big"), 2);
}

/// The JSON-keyed route of the short-body tests, with `server.body_read_timeout` short so the
/// 5 s the tests wait is ample.
async fn json_route_instance(upstream: &Upstream) -> Vec<corral::Instance> {
    let routes = recommend_route(&upstream.url(), "key = { json = [\"/segment\"] }");
    let cfg = config_with_server("body_read_timeout = \"500ms\"", None, &routes);
    start(1, &cfg).await
}

/// A head declaring 100 bytes of body, followed by only 15 of them.
const SHORT_BODY_REQUEST: &str = "POST /recommend HTTP/1.1\r\nHost: x\r\n\
                                  Content-Type: application/json\r\nContent-Length: 100\r\n\r\n\
                                  {\"segment\":\"a\"}";

/// How long a short-body test waits for the proxy to answer or close.
const SHORT_BODY_BOUND: Duration = Duration::from_secs(5);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_shorter_than_its_content_length_does_not_hold_the_connection_forever() {
    let upstream = Upstream::start().await;
    let fleet = json_route_instance(&upstream).await;
    let client = Client::new();

    // Step 1: declare 100 bytes, send 15, and keep the connection open without sending more.
    let mut stalled = connect(&fleet[0]).await;
    write(&mut stalled, SHORT_BODY_REQUEST.as_bytes()).await;

    // Step 2: meanwhile the proxy serves everyone else.
    let other = client
        .post(&url(&fleet[0], "/recommend"), &[], r#"{"segment":"b"}"#)
        .await;
    assert_eq!(other.status, 200, "{}", other.text());

    // Step 3: the stalled request ends within the bound: an error answer, or a closed connection.
    match read_head(&mut stalled, SHORT_BODY_BOUND).await {
        Ending::Answered(status) => assert!(
            (400..500).contains(&status),
            "a body that never arrived was answered {status}"
        ),
        Ending::Closed(_) => {}
        Ending::Silent(text) => panic!(
            "{SHORT_BODY_BOUND:?} after a body stopped 85 bytes short of its Content-Length, the \
             proxy neither answered nor closed the connection (received {text:?})"
        ),
    }
    assert_eq!(
        upstream.calls(),
        1,
        "only the complete request reached the upstream"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_cut_short_by_the_client_closing_gets_an_error_answer() {
    let upstream = Upstream::start().await;
    let fleet = json_route_instance(&upstream).await;

    // Step 1: declare 100 bytes, send 15, then close our sending side.
    let mut stream = connect(&fleet[0]).await;
    write(&mut stream, SHORT_BODY_REQUEST.as_bytes()).await;
    stream
        .shutdown()
        .await
        .unwrap_or_else(|e| panic!("half-close the connection: {e}"));

    // Step 2: an error answer (or a close), never a fill from a truncated body.
    match read_head(&mut stream, SHORT_BODY_BOUND).await {
        Ending::Answered(status) => assert!(
            (400..500).contains(&status),
            "a truncated body was answered {status}"
        ),
        Ending::Closed(_) => {}
        Ending::Silent(text) => panic!(
            "{SHORT_BODY_BOUND:?} after a truncated body, the proxy neither answered nor closed \
             the connection (received {text:?})"
        ),
    }
    assert_eq!(upstream.calls(), 0);
}
