//! Hostile clients: requests and connections that try to get past a limit, or make Corral do what
//! it must not (echo credentials with TRACE, hold sockets open). Every limit must hold on every
//! path — cached, bypassed and unrouted routes; the proxy and admin listeners.

mod support;

use std::time::Duration;

use bytes::Bytes;
use http::Method;
use http_body_util::Full;
use hyper_util::rt::{TokioExecutor, TokioIo};
use support::client::request;
use support::corral::{config_with_server, start, url};
use support::{Client, Reply, Upstream};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

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
        let mut req = request(
            Method::TRACE,
            &url(&fleet[0], path),
            &[],
            Default::default(),
        );
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

// ---- Connections: slow heads, idle HTTP/2, the connection cap

/// A `[server]` table with short head and idle limits, so the tests wait little.
const SHORT_LIMITS: &str = "admin_listen = \"127.0.0.1:0\"\nheader_read_timeout = \"300ms\"";

/// How long a test waits for Corral to close a connection before calling it a hang.
const HANG: Duration = Duration::from_secs(10);

/// Reads until the peer closes (or resets); `Err` when it is still open after [`HANG`].
async fn closed_by_peer(stream: &mut TcpStream) -> Result<(), String> {
    let mut buf = [0u8; 4096];
    let read_all = async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    };
    tokio::time::timeout(HANG, read_all)
        .await
        .map_err(|_| format!("still open after {HANG:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_listener_closes_an_unfinished_head() {
    let upstream = Upstream::start().await;
    let fleet = start(
        1,
        &config_with_server(SHORT_LIMITS, None, &route("r", &upstream, "")),
    )
    .await;
    let admin = fleet[0].admin_addr().expect("an admin listener");
    let mut slow = TcpStream::connect(admin).await.expect("connect to admin");
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: 1\r\n")
        .await
        .expect("write a partial head");
    closed_by_peer(&mut slow)
        .await
        .expect("slowloris on the admin listener");
}

/// An HTTP/2 (h2c, prior knowledge) connection from a real client.
async fn h2_connect(
    addr: std::net::SocketAddr,
) -> (
    hyper::client::conn::http2::SendRequest<Full<Bytes>>,
    tokio::task::JoinHandle<()>,
) {
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let (send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .expect("h2 handshake");
    let driver = tokio::spawn(async move {
        let _ = conn.await;
    });
    (send, driver)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_requests_get_the_http1_head_limits() {
    // The upstream refuses connections: an answer other than 502 is Corral's own refusal. (A live
    // upstream would itself refuse 150 header fields, hiding whether Corral let them through.)
    let upstream = format!("http://127.0.0.1:{}", support::free_port());
    let routes =
        format!("[[route]]\nname = \"r\"\npath_prefix = \"/r\"\nupstream = \"{upstream}\"\n");
    let fleet = start(1, &config_with_server("", None, &routes)).await;
    let (mut send, _driver) = h2_connect(fleet[0].addr()).await;

    let mut many = http::Request::get(format!("http://{}/r/x", fleet[0].addr()));
    for i in 0..150 {
        many = many.header(format!("x-h{i}"), "1");
    }
    let resp = send
        .send_request(many.body(Full::default()).expect("a request"))
        .await
        .expect("an answer");
    assert_eq!(resp.status(), 431, "150 header fields over HTTP/2");

    let big = "x".repeat(70 * 1024);
    let huge = http::Request::get(format!("http://{}/r/y", fleet[0].addr()))
        .header("x-big", big)
        .body(Full::default())
        .expect("a request");
    let refused = match send.send_request(huge).await {
        Ok(resp) => resp.status() == 431,
        Err(_) => true, // the stream was reset: refused as well
    };
    assert!(refused, "a 70 KiB header block over HTTP/2 was accepted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_http2_connection_is_closed_after_the_head_timeout() {
    let upstream = Upstream::start().await;
    let fleet = start(
        1,
        &config_with_server(SHORT_LIMITS, None, &route("r", &upstream, "")),
    )
    .await;

    // A real client: it answers pings, so only an idle limit can close its connection.
    let (mut send, driver) = h2_connect(fleet[0].addr()).await;
    let req = http::Request::get(format!("http://{}/r/x", fleet[0].addr()))
        .body(Full::default())
        .expect("a request");
    let resp = send.send_request(req).await.expect("an answer");
    assert_eq!(resp.status(), 200);
    drop(resp);
    tokio::time::timeout(HANG, driver)
        .await
        .expect("an idle HTTP/2 connection stayed open")
        .expect("the driver task");

    // A raw client that sends the preface and then a header block it never finishes.
    let mut raw = TcpStream::connect(fleet[0].addr()).await.expect("connect");
    let mut frames = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    frames.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]); // SETTINGS, empty
    // HEADERS on stream 1, END_STREAM but not END_HEADERS, one literal byte of a block.
    frames.extend_from_slice(&[0, 0, 1, 1, 0x01, 0, 0, 0, 1, 0x82]);
    raw.write_all(&frames).await.expect("write the frames");
    closed_by_peer(&mut raw)
        .await
        .expect("an unfinished HTTP/2 header block");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_past_max_connections_wait_for_a_free_slot() {
    let upstream = Upstream::start().await;
    let server = "max_connections = 2";
    let fleet = start(
        1,
        &config_with_server(server, None, &route("r", &upstream, "")),
    )
    .await;
    let addr = fleet[0].addr();
    let get = b"GET /r/x HTTP/1.1\r\nHost: x\r\n\r\n";

    // Two connections hold both slots (each proves it is served by getting an answer).
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut conn = TcpStream::connect(addr).await.expect("connect");
        conn.write_all(get).await.expect("write");
        let mut buf = [0u8; 12];
        conn.read_exact(&mut buf).await.expect("an answer");
        assert_eq!(&buf, b"HTTP/1.1 200");
        held.push(conn);
    }

    // The third is left in the accept queue: no answer while both slots are held…
    let mut third = TcpStream::connect(addr)
        .await
        .expect("connect (kernel backlog)");
    third.write_all(get).await.expect("write");
    let mut buf = [0u8; 12];
    let early = tokio::time::timeout(Duration::from_millis(300), third.read_exact(&mut buf)).await;
    assert!(
        early.is_err(),
        "a third connection was served past max_connections = 2"
    );
    // …and its answer once one closes.
    drop(held.pop());
    tokio::time::timeout(HANG, third.read_exact(&mut buf))
        .await
        .expect("the third connection was never served")
        .expect("read");
    assert_eq!(&buf, b"HTTP/1.1 200");
}

// ---- Bypassed and unrouted requests: the same body limits, permits and metrics

/// Sends raw bytes on a new connection and returns the status code of the answer.
async fn raw_status(addr: std::net::SocketAddr, bytes: &[u8]) -> u16 {
    let mut conn = TcpStream::connect(addr).await.expect("connect");
    conn.write_all(bytes).await.expect("write");
    let mut head = [0u8; 12];
    tokio::time::timeout(HANG, conn.read_exact(&mut head))
        .await
        .expect("no answer")
        .expect("read the status line");
    let line = String::from_utf8_lossy(&head).into_owned();
    line[9..12]
        .parse()
        .unwrap_or_else(|_| panic!("not a status line: {line:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_or_slow_body_on_a_bypassed_route_is_the_clients_fault() {
    let upstream = Upstream::start().await;
    let server = "body_read_timeout = \"300ms\"";
    let routes = route("passed", &upstream, "cache = false");
    let fleet = start(1, &config_with_server(server, None, &routes)).await;
    let addr = fleet[0].addr();
    let head = "POST /passed/x HTTP/1.1\r\nHost: x\r\n";

    for body in [
        "zz\r\nabc\r\n0\r\n\r\n",
        "3\nabc\n0\n\n",
        "3\r\nabcdef\r\n0\r\n\r\n",
    ] {
        let request = format!("{head}Transfer-Encoding: chunked\r\n\r\n{body}");
        assert_eq!(raw_status(addr, request.as_bytes()).await, 400, "{body:?}");
    }

    // Two bytes of ten, then nothing: 408 at body_read_timeout (the upstream_timeout is 30 s).
    let slow = format!("{head}Content-Length: 10\r\n\r\nab");
    assert_eq!(raw_status(addr, slow.as_bytes()).await, 408);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_upstream_slot_is_held_until_the_answer_has_streamed() {
    let upstream = Upstream::start().await;
    let (fleet, reader) =
        a_stream_holding_the_only_slot(&upstream, "passed", "cache = false", "/passed/big").await;

    // The first answer is still streaming: its slot is taken.
    let client = Client::new();
    let second = client.get(&url(&fleet[0], "/passed/small"), &[]).await;
    assert_eq!(second.status, 503, "the cap let a second stream through");
    assert_eq!(second.header("corral-error"), Some("upstream-overloaded"));

    drop(reader);
    let mut freed = false;
    for _ in 0..50 {
        if client
            .get(&url(&fleet[0], "/passed/small"), &[])
            .await
            .status
            == 200
        {
            freed = true;
            break;
        }
    }
    assert!(
        freed,
        "the slot was never released after the stream was dropped"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unrouted_requests_get_the_configured_timeout_and_appear_in_the_upstream_metrics() {
    let upstream = Upstream::start().await;
    upstream.script("/slow", Reply::status(200).delay(Duration::from_secs(20)));
    let server = format!(
        "admin_listen = \"127.0.0.1:0\"\ndefault_upstream = \"{}\"\ndefault_upstream_timeout = \"300ms\"",
        upstream.url()
    );
    let fleet = start(1, &config_with_server(&server, None, "")).await;
    let client = Client::new();

    let slow = client.get(&url(&fleet[0], "/slow"), &[]).await;
    assert_eq!(slow.status, 504);
    assert_eq!(slow.header("corral-error"), Some("upstream-timeout"));
    let fine = client.get(&url(&fleet[0], "/fine"), &[]).await;
    assert_eq!(fine.status, 200);

    let admin = fleet[0].admin_addr().expect("an admin listener");
    let page = client
        .get(&format!("http://{admin}/metrics"), &[])
        .await
        .text();
    let calls: Vec<&str> = page
        .lines()
        .filter(|l| l.starts_with("corral_upstream_calls_total{") && l.contains("route=\"-\""))
        .collect();
    assert_eq!(
        calls.len(),
        2,
        "unrouted calls in the upstream metrics:\n{page}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_fill_holds_its_upstream_slot_until_it_has_streamed() {
    let upstream = Upstream::start().await;
    let extra = "max_entry_size = \"1KiB\"";
    let (fleet, reader) = a_stream_holding_the_only_slot(&upstream, "big", extra, "/big/a").await;

    let client = Client::new();
    let second = client.get(&url(&fleet[0], "/big/b"), &[]).await;
    assert_eq!(second.status, 503, "the cap let a second stream through");
    drop(reader);
}

/// One instance whose route `name` (with `extra`) may run one upstream call at a time, and a
/// client that GETs `path` there — an answer far larger than loopback socket buffers hold — and
/// reads only its head: the stream stays open, holding the route's one upstream slot, until the
/// returned connection is dropped.
async fn a_stream_holding_the_only_slot(
    upstream: &Upstream,
    name: &str,
    extra: &str,
    path: &str,
) -> (Vec<corral::Instance>, TcpStream) {
    upstream.script(path, Reply::status(200).body(vec![b'x'; 64 << 20]));
    let extra = format!("{extra}\nupstream_concurrency = 1\nupstream_timeout = \"500ms\"");
    let routes = route(name, upstream, &extra);
    let fleet = start(1, &config_with_server("", None, &routes)).await;
    let mut reader = TcpStream::connect(fleet[0].addr()).await.expect("connect");
    let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n");
    reader.write_all(request.as_bytes()).await.expect("write");
    let mut head = [0u8; 12];
    reader.read_exact(&mut head).await.expect("the head");
    assert_eq!(&head, b"HTTP/1.1 200");
    (fleet, reader)
}
