//! A conforming origin: an in-process HTTP/1.1 server that itself honours conditional requests,
//! `Range` and `Vary`, and builds its answer from request headers an origin commonly reads.
//!
//! Its answer to `GET /any/path` is one representation per (path, `Accept-Language`,
//! `Accept-Encoding`, `X-Forwarded-Host`, `X-Original-URL`, request body): the body names each
//! of them, the
//! `ETag` is a hash of the body. So a header wrongly forwarded on a shared fill shows up as a
//! wrong shared body, and a conditional or `Range` forwarded on a fill shows up as a 304 or 206
//! handed to everyone. Paths under `/vary` answer `Vary: Accept-Language, Accept-Encoding`; paths
//! under `/star` answer `Vary: *`. Every answer has `Cache-Control: max-age=60` and a fixed
//! `Last-Modified`, unless [`Origin::set_cache_control`] says otherwise.

use std::collections::HashMap;
use std::collections::hash_map::DefaultHasher;
use std::convert::Infallible;
use std::hash::{Hash, Hasher};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::task::{JoinHandle, JoinSet};

/// The fixed `Last-Modified` of every representation.
pub const LAST_MODIFIED: &str = "Mon, 02 Nov 2026 10:00:00 GMT";

/// A running origin on `127.0.0.1:<ephemeral>`; dropping it stops it.
pub struct Origin {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    server: JoinHandle<()>,
}

#[derive(Default)]
struct State {
    calls: u64,
    by_path: HashMap<String, u64>,
    last_headers: HashMap<String, HeaderMap>,
    last_method: HashMap<String, Method>,
    cache_control: Option<String>,
    extra: Vec<(String, String)>,
    delay: std::time::Duration,
}

impl Origin {
    pub async fn start() -> Origin {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the origin to 127.0.0.1:0");
        let addr = listener
            .local_addr()
            .expect("a bound listener has an address");
        let state = Arc::new(Mutex::new(State::default()));
        let server = tokio::spawn(accept_loop(listener, state.clone()));
        Origin {
            addr,
            state,
            server,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Calls received in all.
    pub fn calls(&self) -> u64 {
        self.lock().calls
    }

    /// Calls received for one path (path and query as sent).
    pub fn calls_for(&self, path_and_query: &str) -> u64 {
        self.lock()
            .by_path
            .get(path_and_query)
            .copied()
            .unwrap_or(0)
    }

    /// Headers of the last call for one path.
    pub fn last_headers(&self, path_and_query: &str) -> Option<HeaderMap> {
        self.lock().last_headers.get(path_and_query).cloned()
    }

    /// Method of the last call for one path.
    pub fn last_method(&self, path_and_query: &str) -> Option<Method> {
        self.lock().last_method.get(path_and_query).cloned()
    }

    /// Replaces `max-age=60` on every later answer (`""`: no `Cache-Control` at all).
    pub fn set_cache_control(&self, value: &str) {
        self.lock().cache_control = Some(value.to_owned());
    }

    /// Sleeps this long before every later answer, so concurrent requests overlap.
    pub fn set_delay(&self, delay: std::time::Duration) {
        self.lock().delay = delay;
    }

    /// Adds a header to every later answer.
    pub fn add_header(&self, name: &str, value: &str) {
        self.lock().extra.push((name.to_owned(), value.to_owned()));
    }
}

impl Drop for Origin {
    fn drop(&mut self) {
        self.server.abort();
    }
}

async fn accept_loop(listener: TcpListener, state: Arc<Mutex<State>>) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let state = state.clone();
                connections.spawn(async move {
                    let service = service_fn(move |req| answer(state.clone(), req));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> &'a str {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-")
}

/// The representation's body for a request: every input it depends on, named.
pub fn representation(path: &str, lang: &str, enc: &str, fwd_host: &str, original: &str) -> String {
    format!("path={path};lang={lang};enc={enc};fwd-host={fwd_host};original-url={original}")
}

/// The strong `ETag` of a body.
pub fn etag_of(body: &str) -> String {
    let mut h = DefaultHasher::new();
    body.hash(&mut h);
    format!("\"{:016x}\"", h.finish())
}

async fn answer(
    state: Arc<Mutex<State>>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let (parts, body) = req.into_parts();
    let sent = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let path = parts.uri.path().to_owned();
    let key = parts
        .uri
        .path_and_query()
        .map_or(path.clone(), |pq| pq.as_str().to_owned());
    let h = &parts.headers;
    let (cache_control, extra, delay) = {
        let mut s = state.lock().unwrap_or_else(|e| e.into_inner());
        s.calls += 1;
        *s.by_path.entry(key.clone()).or_default() += 1;
        s.last_headers.insert(key.clone(), h.clone());
        s.last_method.insert(key, parts.method.clone());
        (s.cache_control.clone(), s.extra.clone(), s.delay)
    };
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let mut body = representation(
        &path,
        header(h, "accept-language"),
        header(h, "accept-encoding"),
        header(h, "x-forwarded-host"),
        header(h, "x-original-url"),
    );
    if !sent.is_empty() {
        body.push_str(&format!(";body={}", String::from_utf8_lossy(&sent)));
    }
    let etag = etag_of(&body);
    let mut resp = Response::builder()
        .header("etag", &etag)
        .header("last-modified", LAST_MODIFIED)
        .header("content-type", "text/plain");
    match &cache_control {
        Some(cc) if cc.is_empty() => {}
        Some(cc) => resp = resp.header("cache-control", cc),
        None => resp = resp.header("cache-control", "max-age=60"),
    }
    for (name, value) in &extra {
        resp = resp.header(name, value);
    }
    if path.starts_with("/vary") {
        resp = resp.header("vary", "Accept-Language, Accept-Encoding");
    }
    if path.starts_with("/star") {
        resp = resp.header("vary", "*");
    }
    let not_modified = match h.get("if-none-match").and_then(|v| v.to_str().ok()) {
        Some(tags) => tags
            .split(',')
            .any(|t| t.trim().trim_start_matches("W/") == etag || t.trim() == "*"),
        None => h.get("if-modified-since").and_then(|v| v.to_str().ok()) == Some(LAST_MODIFIED),
    };
    let built = if not_modified {
        resp.status(StatusCode::NOT_MODIFIED).body(Full::default())
    } else if let Some((start, end)) = range(h, body.len()) {
        resp.status(StatusCode::PARTIAL_CONTENT)
            .header(
                "content-range",
                format!("bytes {start}-{end}/{}", body.len()),
            )
            .body(Full::new(Bytes::from(body[start..=end].to_owned())))
    } else {
        resp.body(Full::new(Bytes::from(body)))
    };
    Ok(built.expect("the origin builds valid responses"))
}

/// A single `bytes=a-b` range inside the body.
fn range(h: &HeaderMap, len: usize) -> Option<(usize, usize)> {
    let spec = h.get("range")?.to_str().ok()?.strip_prefix("bytes=")?;
    let (a, b) = spec.split_once('-')?;
    let start: usize = a.parse().ok()?;
    let end: usize = b.parse::<usize>().ok()?.min(len.checked_sub(1)?);
    (start <= end).then_some((start, end))
}
