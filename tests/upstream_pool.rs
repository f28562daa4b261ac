//! Pooled upstream connections: an upstream that closes a keep-alive connection just as Corral
//! reuses it (what Node.js does to connections idle for 5 s) must cost a retry, not a 502.
//!
//! The upstream here is a raw TCP server that answers the first request on each connection with a
//! keep-alive 200, and closes the connection without a word on the second — the race of a close
//! and a reuse, made certain.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use support::Client;
use support::corral::{config_with_server, start, url};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[derive(Default)]
struct Counts {
    connections: AtomicUsize,
    answered: AtomicUsize,
    dropped: AtomicUsize,
}

/// Starts the one-answer-per-connection upstream; returns its URL and counters.
async fn closing_upstream() -> (String, Arc<Counts>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let counts = Arc::new(Counts::default());
    let shared = counts.clone();
    tokio::spawn(async move {
        while let Ok((conn, _)) = listener.accept().await {
            shared.connections.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(serve(conn, shared.clone()));
        }
    });
    (format!("http://{addr}"), counts)
}

async fn serve(mut conn: TcpStream, counts: Arc<Counts>) {
    let mut buf = Vec::new();
    for request in 0.. {
        // Read one head and its Content-Length body.
        let head_end = loop {
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break end + 4;
            }
            let mut chunk = [0u8; 4096];
            match conn.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        while buf.len() < head_end + length {
            let mut chunk = [0u8; 4096];
            match conn.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        buf.drain(..head_end + length);
        if request > 0 {
            counts.dropped.fetch_add(1, Ordering::SeqCst);
            return; // closes without answering
        }
        counts.answered.fetch_add(1, Ordering::SeqCst);
        let answer = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nCache-Control: no-store\r\n\r\nok";
        if conn.write_all(answer).await.is_err() {
            return;
        }
    }
}

fn routes(upstream: &str) -> String {
    format!(
        "[[route]]\nname = \"p\"\npath_prefix = \"/p\"\nupstream = \"{upstream}\"\ncache = false\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idempotent_request_on_a_connection_the_upstream_closed_is_retried_once() {
    let (upstream, counts) = closing_upstream().await;
    let fleet = start(1, &config_with_server("", None, &routes(&upstream))).await;
    let client = Client::new();

    let first = client.get(&url(&fleet[0], "/p/1"), &[]).await;
    assert_eq!(first.status, 200);
    // Reuses the pooled connection, which the upstream drops: retried on a fresh one.
    let second = client.get(&url(&fleet[0], "/p/2"), &[]).await;
    assert_eq!(second.status, 200, "{}", second.text());
    assert_eq!(counts.dropped.load(Ordering::SeqCst), 1);

    // A PUT with a small body is idempotent and replayable too.
    let put = support::client::request(
        http::Method::PUT,
        &url(&fleet[0], "/p/3"),
        &[("content-type", "text/plain")],
        "payload".into(),
    );
    let put = client.send(put).await;
    assert_eq!(put.status, 200, "{}", put.text());
    assert_eq!(counts.dropped.load(Ordering::SeqCst), 2);

    // A POST is not idempotent: never sent twice.
    let post = client.post(&url(&fleet[0], "/p/4"), &[], "once").await;
    assert_eq!(post.status, 502);
    assert_eq!(post.header("corral-error"), Some("upstream-connect"));
    assert_eq!(counts.dropped.load(Ordering::SeqCst), 3);
    assert_eq!(counts.answered.load(Ordering::SeqCst), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pooled_connections_idle_past_upstream_idle_timeout_are_not_reused() {
    let (upstream, counts) = closing_upstream().await;
    let server = "upstream_idle_timeout = \"100ms\"";
    let fleet = start(1, &config_with_server(server, None, &routes(&upstream))).await;
    let client = Client::new();

    assert_eq!(client.get(&url(&fleet[0], "/p/1"), &[]).await.status, 200);
    // Past the idle timeout the pooled connection is closed by Corral, never reused.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(client.get(&url(&fleet[0], "/p/2"), &[]).await.status, 200);
    assert_eq!(
        counts.dropped.load(Ordering::SeqCst),
        0,
        "a stale connection was reused"
    );
    assert_eq!(counts.connections.load(Ordering::SeqCst), 2);
}
