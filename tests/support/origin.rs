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

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Response, StatusCode};

use super::upstream::{Call, Upstream};

/// The fixed `Last-Modified` of every representation.
pub const LAST_MODIFIED: &str = "Mon, 02 Nov 2026 10:00:00 GMT";

/// A running origin on `127.0.0.1:<ephemeral>`; dropping it stops it.
///
/// Why a second type beside [`Upstream`]: an `Upstream` answers whatever the test scripts and
/// knows nothing of HTTP semantics, so it cannot tell a test that Corral forwarded a
/// conditional request or a header it should have kept to itself. An `Origin` computes its
/// answer from the request the way a real origin does, so such a mistake shows up as a wrong
/// shared answer. The server underneath is the same [`Upstream`] (same counting, same delay),
/// answering through [`Upstream::start_with`]; [`Origin::upstream`] reaches the rest of it.
pub struct Origin {
    upstream: Upstream,
    settings: Arc<Mutex<Settings>>,
}

/// What a test changed about every later answer.
#[derive(Default)]
struct Settings {
    cache_control: Option<String>,
    extra: Vec<(String, String)>,
}

impl Origin {
    pub async fn start() -> Origin {
        let settings = Arc::new(Mutex::new(Settings::default()));
        let shared = Arc::clone(&settings);
        let upstream =
            Upstream::start_with(Arc::new(move |call| conforming(call, &lock(&shared)))).await;
        Origin { upstream, settings }
    }

    /// The server underneath: in-flight counts, scripts, `calls_under`.
    pub fn upstream(&self) -> &Upstream {
        &self.upstream
    }

    pub fn url(&self) -> String {
        self.upstream.url()
    }

    /// Calls received in all.
    pub fn calls(&self) -> u64 {
        self.upstream.calls()
    }

    /// Calls received for one path (path and query as sent).
    pub fn calls_for(&self, path_and_query: &str) -> u64 {
        self.upstream.calls_for(path_and_query)
    }

    /// Headers of the last call for one path.
    pub fn last_headers(&self, path_and_query: &str) -> Option<HeaderMap> {
        self.upstream.last_headers(path_and_query)
    }

    /// Method of the last call for one path.
    pub fn last_method(&self, path_and_query: &str) -> Option<Method> {
        self.upstream.last_method(path_and_query)
    }

    /// Replaces `max-age=60` on every later answer (`""`: no `Cache-Control` at all).
    pub fn set_cache_control(&self, value: &str) {
        lock(&self.settings).cache_control = Some(value.to_owned());
    }

    /// Sleeps this long before every later answer, so concurrent requests overlap.
    pub fn set_delay(&self, delay: Duration) {
        self.upstream.set_delay(delay);
    }

    /// Adds a header to every later answer.
    pub fn add_header(&self, name: &str, value: &str) {
        lock(&self.settings)
            .extra
            .push((name.to_owned(), value.to_owned()));
    }
}

fn lock(settings: &Mutex<Settings>) -> MutexGuard<'_, Settings> {
    // A panicking test thread must not stop the origin from answering the others.
    settings.lock().unwrap_or_else(|e| e.into_inner())
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

/// The origin's answer: the representation for the request, or 304 / 206 from it.
fn conforming(call: &Call<'_>, settings: &Settings) -> Response<Bytes> {
    let path = call.uri.path();
    let h = call.headers;
    let mut body = representation(
        path,
        header(h, "accept-language"),
        header(h, "accept-encoding"),
        header(h, "x-forwarded-host"),
        header(h, "x-original-url"),
    );
    if !call.body.is_empty() {
        body.push_str(&format!(";body={}", String::from_utf8_lossy(call.body)));
    }
    let etag = etag_of(&body);
    let mut resp = Response::builder()
        .header("etag", &etag)
        .header("last-modified", LAST_MODIFIED)
        .header("content-type", "text/plain");
    match &settings.cache_control {
        Some(cc) if cc.is_empty() => {}
        Some(cc) => resp = resp.header("cache-control", cc),
        None => resp = resp.header("cache-control", "max-age=60"),
    }
    for (name, value) in &settings.extra {
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
        resp.status(StatusCode::NOT_MODIFIED).body(Bytes::new())
    } else if let Some((start, end)) = range(h, body.len()) {
        resp.status(StatusCode::PARTIAL_CONTENT)
            .header(
                "content-range",
                format!("bytes {start}-{end}/{}", body.len()),
            )
            .body(Bytes::from(body[start..=end].to_owned()))
    } else {
        resp.body(Bytes::from(body))
    };
    built.expect("the origin builds valid responses")
}

/// A single `bytes=a-b` range inside the body.
fn range(h: &HeaderMap, len: usize) -> Option<(usize, usize)> {
    let spec = h.get("range")?.to_str().ok()?.strip_prefix("bytes=")?;
    let (a, b) = spec.split_once('-')?;
    let start: usize = a.parse().ok()?;
    let end: usize = b.parse::<usize>().ok()?.min(len.checked_sub(1)?);
    (start <= end).then_some((start, end))
}
