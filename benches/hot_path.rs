//! Micro-benchmarks of what every request pays: deriving its key, decoding and encoding an entry,
//! and answering an L1 hit through the proxy's whole request path ([`Proxy::handle_buffered`]:
//! target, route, key, L1, headers, `Cache-Status`, metrics, access line; no sockets, no Redis, no
//! upstream call). The `proxy/*_access_line` rows run with an access-log writer thread installed
//! (writing to a sink), as `corral run` does; the others with the line off.
//!
//!
//! The `proxy/l1_hit_get_http1*` rows run [`Proxy::begin`] itself, as `corral run` serves it:
//! behind hyper's HTTP/1 server on an in-memory pipe, one keep-alive connection, the request's
//! bytes written and the whole answer read back by the bench (so hyper's head parsing and
//! answer encoding are in, sockets and the kernel are not). Both ends run on one thread: with
//! the server on another, each hit measured a thread's wake-up (71 µs on one VM), not the path.
//!
//! `cargo bench --bench hot_path` measures; `cargo bench --bench hot_path -- --test` runs each once.
//! `HOT_PATH_HITS=N cargo bench --bench hot_path` answers N GET hits (access line on) and exits,
//! without criterion: run it under `valgrind --tool=callgrind` twice with two counts, and the
//! difference of the totals over the difference of the counts is the instructions per hit.

use std::hint::black_box;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use corral::config::KeySpec;
use corral::entry::{Entry, Lifetime, now_ms};
use corral::key::CacheKey;
use corral::{Config, Proxy};
use criterion::{BatchSize, Criterion, Throughput, criterion_group};
use http::request::Parts;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, StatusCode, Uri, header};

/// Embedded mode (no `[redis]`). The upstream is the discard port: a hit never calls it, and a
/// miss would fail loudly rather than measure something else.
const CONFIG: &str = r#"
[[route]]
name = "recommend"
path_prefix = "/recommend"
upstream = "http://127.0.0.1:9"
methods = ["GET", "POST"]
ttl = "1h"
key = { query = ["user", "page", "lang", "region"], headers = ["x-user-segment", "accept-language"], json = ["/segment", "/nested/x"] }
"#;

const QUERY_URI: &str = "/recommend/articles?user=4711&page=2&lang=de&region=eu-west";

fn keyed_headers() -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert("x-user-segment", HeaderValue::from_static("sports-fans"));
    h.insert(
        header::ACCEPT_LANGUAGE,
        HeaderValue::from_static("de-DE,de;q=0.9"),
    );
    h.insert(header::ACCEPT, HeaderValue::from_static("application/json"));
    h.insert(header::USER_AGENT, HeaderValue::from_static("bench/1"));
    h.insert(header::HOST, HeaderValue::from_static("corral.bench"));
    h
}

/// A JSON object of about `len` bytes: the two keyed fields, then a list of article records.
fn json_body(len: usize) -> Bytes {
    let mut items = Vec::new();
    let mut size = 0;
    while size < len {
        let i = items.len();
        let item = serde_json::json!({
            "id": i,
            "title": format!("article {i}: a headline of moderate length"),
            "tags": ["news", "sport", {"weight": i % 7}],
        });
        size += item.to_string().len() + 1;
        items.push(item);
    }
    let doc = serde_json::json!({
        "items": items,
        "nested": {"y": "unkeyed", "x": 42},
        "segment": "sports-fans",
    });
    Bytes::from(doc.to_string())
}

fn sample_entry() -> Entry {
    let mut headers = HeaderMap::new();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("public, max-age=60"),
    );
    headers.insert(header::ETAG, HeaderValue::from_static("\"5f3a9c1e7b\""));
    headers.insert(header::VARY, HeaderValue::from_static("accept-language"));
    headers.insert(
        header::LAST_MODIFIED,
        HeaderValue::from_static("Tue, 04 Mar 2025 10:00:00 GMT"),
    );
    headers.insert("x-backend", HeaderValue::from_static("recommender-7"));
    let now = now_ms();
    let day = 24 * 3600 * 1000;
    Entry {
        status: StatusCode::OK,
        corral_only: false,
        headers,
        body: Bytes::from(vec![b'x'; 2048]),
        times: Lifetime {
            stored_at: now,
            fresh_until: now + day,
            swr_until: now + day,
            sie_until: now + day,
        },
        fill_ms: 180,
        tags: vec!["recommend".into(), "article-7".into()],
        // The headers carry `Vary` for realistic weight, but the entry matches every request.
        vary: Default::default(),
    }
}

fn key_derivation(c: &mut Criterion) {
    let route = &Config::parse(CONFIG, Path::new("<bench>"))
        .expect("the bench config is valid")
        .routes[0];
    let mut group = c.benchmark_group("key");

    let whole_query = KeySpec {
        query: None,
        headers: route.key.headers.clone(),
        json: Vec::new(),
    };
    let uri = Uri::from_static(QUERY_URI);
    let headers = keyed_headers();
    group.bench_function("get_query4_headers2", |b| {
        b.iter(|| {
            CacheKey::derive(
                &route.name,
                black_box(&whole_query),
                &Method::GET,
                black_box(&uri),
                black_box(&headers),
                b"",
            )
        })
    });

    let uri = Uri::from_static("/recommend");
    for (name, len) in [("post_json_1KiB", 1024), ("post_json_64KiB", 64 * 1024)] {
        let body = json_body(len);
        group.throughput(Throughput::Bytes(body.len() as u64));
        group.bench_function(name, |b| {
            b.iter(|| {
                CacheKey::derive(
                    &route.name,
                    &route.key,
                    &Method::POST,
                    &uri,
                    &headers,
                    black_box(&body),
                )
                .expect("the bench body is valid JSON")
            })
        });
    }
    group.finish();
}

fn entry_codec(c: &mut Criterion) {
    let entry = sample_entry();
    let encoded = entry.encode();
    let mut group = c.benchmark_group("entry");
    group.throughput(Throughput::Bytes(encoded.len() as u64));
    group.bench_function("encode_2KiB", |b| b.iter(|| black_box(&entry).encode()));
    group.bench_function("decode_2KiB", |b| {
        b.iter(|| Entry::decode(black_box(encoded.clone())).expect("just encoded"))
    });
    group.finish();
}

fn request(method: Method, uri: &str, headers: HeaderMap) -> Parts {
    let mut req = Request::builder()
        .method(method)
        .uri(uri)
        .body(())
        .expect("bench requests are valid");
    *req.headers_mut() = headers;
    req.into_parts().0
}

/// Stores `entry` in the proxy's L1 under the key the proxy itself will derive for the request.
async fn warm(proxy: &Proxy, config: &Config, parts: &Parts, body: &Bytes, entry: Arc<Entry>) {
    let route = &config.routes[0];
    let key = CacheKey::derive(
        &route.name,
        &route.key,
        &parts.method,
        &parts.uri,
        &parts.headers,
        body,
    )
    .expect("bench requests are keyable");
    proxy.l1().insert(key, &route.name, entry).await;
}

/// The proxy, a runtime to drive it, and the requests of the `proxy/*` rows with their entry
/// warmed in L1.
struct Hits {
    rt: tokio::runtime::Runtime,
    proxy: Arc<Proxy>,
    peer: SocketAddr,
    requests: Vec<(&'static str, Parts, Bytes)>,
}

impl Hits {
    fn new() -> Hits {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("a tokio runtime");
        let config =
            Config::parse(CONFIG, Path::new("<bench>")).expect("the bench config is valid");
        let proxy = {
            let _in_runtime = rt.enter();
            Arc::new(Proxy::new(&config).expect("embedded mode needs no Redis"))
        };
        let peer: SocketAddr = "127.0.0.1:40000".parse().expect("a socket address");
        let entry = Arc::new(sample_entry());
        let get = request(Method::GET, QUERY_URI, keyed_headers());
        let mut json_headers = keyed_headers();
        json_headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        let post = request(Method::POST, "/recommend", json_headers);
        let requests = vec![
            ("l1_hit_get", get, Bytes::new()),
            ("l1_hit_post_json_1KiB", post, json_body(1024)),
        ];
        for (name, parts, body) in &requests {
            rt.block_on(async {
                warm(&proxy, &config, parts, body, entry.clone()).await;
                let answer = proxy
                    .handle_buffered(parts.clone(), body.clone(), peer)
                    .await;
                let status = answer
                    .headers()
                    .get(HeaderName::from_static("cache-status"))
                    .and_then(|v| v.to_str().ok());
                assert!(
                    status.is_some_and(|s| s.starts_with("corral; hit; ttl=")),
                    "{name}: the warmed entry must answer; got {:?}",
                    answer.headers()
                );
            });
        }
        Hits {
            rt,
            proxy,
            peer,
            requests,
        }
    }
}

/// Turns the access line on for the rest of the process, as `corral run` does: a `tracing`
/// subscriber that lets `corral::access` through at `info`, and the writer thread (to a sink).
fn access_line_on() {
    let subscriber = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(
            "warn,corral::access=info",
        ))
        .with_writer(std::io::sink)
        .finish();
    let _ = tracing::subscriber::set_global_default(subscriber);
    corral::access::install(corral::access::LineFormat::Text, Box::new(std::io::sink()))
        .expect("the access-log writer starts");
}

fn l1_hit(c: &mut Criterion) {
    let hits = Hits::new();
    // The pipe's two ends on one thread, as one worker serves its connections: a runtime of the
    // bench's threads would make every hit a wake-up of another thread, and measure that.
    let wire_rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let mut wire = wire_rt.block_on(Wire::open(&hits));
    let mut group = c.benchmark_group("proxy");
    for line in ["", "_access_line"] {
        if !line.is_empty() {
            access_line_on();
        }
        for (name, parts, body) in &hits.requests {
            group.bench_function(format!("{name}{line}"), |b| {
                b.to_async(&hits.rt).iter_batched(
                    || (parts.clone(), body.clone()),
                    |(parts, body)| hits.proxy.handle_buffered(parts, body, hits.peer),
                    BatchSize::SmallInput,
                )
            });
        }
        group.bench_function(format!("l1_hit_get_http1{line}"), |b| {
            b.iter_custom(|n| {
                wire_rt.block_on(async {
                    let started = std::time::Instant::now();
                    for _ in 0..n {
                        wire.hit().await;
                    }
                    started.elapsed()
                })
            })
        });
    }
    group.finish();
}

/// One keep-alive HTTP/1 connection to [`Proxy::begin`] behind hyper's server, over an
/// in-memory pipe; the bench is its client.
struct Wire {
    client: tokio::io::DuplexStream,
    request: Vec<u8>,
    answer: Vec<u8>,
}

impl Wire {
    async fn open(hits: &Hits) -> Wire {
        let (client, server) = tokio::io::duplex(256 * 1024);
        let (proxy, peer) = (hits.proxy.clone(), hits.peer);
        // As `corral run` serves: a hit is answered in the call ([`Proxy::begin`]).
        let service = hyper::service::service_fn(move |req| {
            let begun = proxy.begin(req, peer).map_err(|rest| (proxy.clone(), rest));
            async move {
                Ok::<_, std::convert::Infallible>(match begun {
                    Ok(resp) => resp,
                    Err((proxy, rest)) => Box::pin(proxy.resume(rest)).await,
                })
            }
        });
        tokio::spawn(
            hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(server), service),
        );
        let (_, parts, _) = &hits.requests[0];
        let mut request = format!("GET {QUERY_URI} HTTP/1.1\r\n").into_bytes();
        for (name, value) in &parts.headers {
            request.extend_from_slice(name.as_str().as_bytes());
            request.extend_from_slice(b": ");
            request.extend_from_slice(value.as_bytes());
            request.extend_from_slice(b"\r\n");
        }
        request.extend_from_slice(b"\r\n");
        let mut wire = Wire {
            client,
            request,
            answer: Vec::with_capacity(8192),
        };
        let head = wire.hit().await;
        assert!(
            head.contains("cache-status: corral; hit; ttl="),
            "the warmed entry must answer over HTTP/1; got {head}"
        );
        wire
    }

    /// Sends the request and reads its whole answer; returns the answer's head.
    async fn hit(&mut self) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        self.client
            .write_all(&self.request)
            .await
            .expect("the pipe is open");
        self.answer.clear();
        let mut chunk = [0u8; 8192];
        loop {
            let n = self
                .client
                .read(&mut chunk)
                .await
                .expect("the pipe is open");
            assert!(n > 0, "the server closed the connection");
            self.answer.extend_from_slice(&chunk[..n]);
            let Some(end) = self.answer.windows(4).position(|w| w == b"\r\n\r\n") else {
                continue;
            };
            let head = String::from_utf8_lossy(&self.answer[..end]).to_ascii_lowercase();
            let length: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length: "))
                .and_then(|v| v.trim().parse().ok())
                .expect("a hit declares its length");
            if self.answer.len() >= end + 4 + length {
                return head;
            }
        }
    }
}

fn config() -> Criterion {
    Criterion::default()
        .sample_size(50)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
}

criterion_group! {
    name = hot_path;
    config = config();
    targets = key_derivation, entry_codec, l1_hit
}

fn main() {
    if let Some(n) = std::env::var("HOT_PATH_HITS")
        .ok()
        .and_then(|n| n.parse::<u64>().ok())
    {
        // For callgrind: N GET hits through the whole path, access line on, nothing else.
        let hits = Hits::new();
        access_line_on();
        let (_, parts, body) = &hits.requests[0];
        hits.rt.block_on(async {
            for _ in 0..n {
                let answer = hits
                    .proxy
                    .handle_buffered(parts.clone(), body.clone(), hits.peer)
                    .await;
                black_box(answer);
            }
        });
        let _ = corral::access::flush(Duration::from_secs(5));
        return;
    }
    hot_path();
    Criterion::default().configure_from_args().final_summary();
}
