//! A small HTTP client for tests, over hyper-util's pooled client.
//!
//! Every call is bounded by a 30 s timeout covering the response and its whole body, so a proxy
//! that never answers fails the test with the URL instead of hanging it.

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::task::JoinHandle;

/// Bound on one call, response head and body together.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// Stampede tests open hundreds of connections to one host; keep them all for reuse.
const POOL_MAX_IDLE_PER_HOST: usize = 1024;

/// A pooled HTTP/1.1 client. Cheap to clone; clones share the pool.
#[derive(Clone)]
pub struct Client {
    inner: HyperClient<HttpConnector, Full<Bytes>>,
}

/// A response read to the end.
#[derive(Debug, Clone)]
pub struct Resp {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Resp {
    /// The first value of a header, if present and visible ASCII.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The `Cache-Status` value without its per-answer numbers (`ttl=N`, `fwd-status=N`), e.g.
    /// `corral; hit` or `corral; fwd=miss; stored`, for tests that compare kinds of answers.
    pub fn cache_status(&self) -> Option<String> {
        let value = self.header("cache-status")?;
        let kept: Vec<&str> = value
            .split(';')
            .map(str::trim)
            .filter(|p| !p.starts_with("ttl=") && !p.starts_with("fwd-status="))
            .collect();
        Some(kept.join("; "))
    }

    /// The body as text, with invalid UTF-8 replaced.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body parsed as JSON, e.g. the upstream's echo.
    ///
    /// # Panics
    ///
    /// If the body is not JSON; the message quotes it.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("response body is not JSON ({e}): {:?}", self.text()))
    }
}

/// Asserts that every answer is `body` served stale: `200`, `Cache-Status: corral; hit;
/// detail=stale`.
pub fn assert_all_stale(answers: &[Resp], body: &[u8]) {
    for answer in answers {
        assert_eq!(answer.status, 200);
        assert_eq!(
            answer.cache_status().as_deref(),
            Some("corral; hit; detail=stale")
        );
        assert_eq!(answer.body, body, "the stale body");
    }
}

impl Client {
    pub fn new() -> Client {
        let inner = HyperClient::builder(TokioExecutor::new())
            .pool_max_idle_per_host(POOL_MAX_IDLE_PER_HOST)
            .build_http();
        Client { inner }
    }

    /// `GET url` with extra headers.
    pub async fn get(&self, url: &str, headers: &[(&str, &str)]) -> Resp {
        self.send(request(Method::GET, url, headers, Bytes::new()))
            .await
    }

    /// `GET url` on a task of its own, for a request the test goes on without: a fill leader
    /// parked in the upstream, waiters that must be pending when a fault strikes.
    ///
    /// The task panics as [`Client::send`] does; awaiting the handle then gives the panic as a
    /// `JoinError`.
    pub fn spawn_get(&self, url: String) -> JoinHandle<Resp> {
        let client = self.clone();
        tokio::spawn(async move { client.get(&url, &[]).await })
    }

    /// `POST url` with extra headers and a body.
    pub async fn post(&self, url: &str, headers: &[(&str, &str)], body: impl Into<Bytes>) -> Resp {
        self.send(request(Method::POST, url, headers, body.into()))
            .await
    }

    /// Sends a request and reads the whole response.
    ///
    /// # Panics
    ///
    /// On a transport error (refused, reset) or after 30 s, naming the method and URL.
    pub async fn send(&self, req: Request<Full<Bytes>>) -> Resp {
        self.try_send(req).await.unwrap_or_else(|e| panic!("{e}"))
    }

    /// Like [`Client::send`], but returns transport errors and timeouts (as a message naming
    /// the method and URL) for tests that expect the connection to fail.
    pub async fn try_send(&self, req: Request<Full<Bytes>>) -> Result<Resp, String> {
        let target = format!("{} {}", req.method(), req.uri());
        let call = async {
            let response = self.inner.request(req).await.map_err(|e| causes(&e))?;
            let (parts, body) = response.into_parts();
            let body = body.collect().await.map_err(|e| causes(&e))?.to_bytes();
            Ok::<_, String>(Resp {
                status: parts.status.as_u16(),
                headers: parts.headers,
                body,
            })
        };
        match tokio::time::timeout(CALL_TIMEOUT, call).await {
            Ok(Ok(resp)) => Ok(resp),
            Ok(Err(e)) => Err(format!("{target}: {e}")),
            Err(_) => Err(format!(
                "{target}: no complete response within {CALL_TIMEOUT:?}"
            )),
        }
    }
}

impl Default for Client {
    fn default() -> Client {
        Client::new()
    }
}

/// Builds a request; panics on a malformed URL or header, which is a bug in the test.
pub fn request(
    method: Method,
    url: &str,
    headers: &[(&str, &str)],
    body: Bytes,
) -> Request<Full<Bytes>> {
    let mut builder = Request::builder().method(method).uri(url);
    for &(name, value) in headers {
        builder = builder.header(name, value);
    }
    builder
        .body(Full::new(body))
        .unwrap_or_else(|e| panic!("build request for {url} with {headers:?}: {e}"))
}

/// An error and its sources, `a: b: c`: hyper's top-level messages ("client error (Connect)")
/// alone do not say what went wrong.
fn causes(error: &dyn std::error::Error) -> String {
    let mut message = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        message.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    message
}
