//! The slow backend every system under test sits in front of: an in-process hyper server that
//! counts its calls per scenario and records when it first answered each one.
//!
//! What it does is driven by the query, so one server serves every scenario and every peer:
//! `s=<scenario>` names the counter, `d=<ms>` is how long the call takes, `fail=1` answers 500
//! (never cacheable) instead of 200. Everything else in the URL (`k=<key>`) only makes keys
//! distinct. A 200 carries a 2 KiB body and `Cache-Control: max-age=60`, so Corral (whose route
//! `ttl` is also 60 s), nginx and Varnish all keep it for the same time.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;

/// Size of every cached body.
pub const BODY_BYTES: usize = 2048;

/// A 2 KiB JSON body with nothing in it that nginx's `return` would interpret (`$`, `'`, `\`).
pub fn body() -> Bytes {
    let head = r#"{"ad":"running-shoes","pad":""#;
    let tail = r#""}"#;
    let pad = BODY_BYTES - head.len() - tail.len();
    let mut text = String::with_capacity(BODY_BYTES);
    text.push_str(head);
    text.extend(std::iter::repeat_n('x', pad));
    text.push_str(tail);
    Bytes::from(text)
}

/// Calls of one scenario.
#[derive(Debug, Clone, Copy, Default)]
pub struct Calls {
    pub count: u64,
    /// When the first call of the scenario answered (after its delay).
    pub first_answer: Option<Instant>,
}

/// The running backend. Dropping it stops accepting connections.
pub struct Upstream {
    pub addr: SocketAddr,
    calls: Arc<Mutex<HashMap<String, Calls>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Upstream {
    pub async fn start() -> std::io::Result<Upstream> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let calls: Arc<Mutex<HashMap<String, Calls>>> = Arc::default();
        let shared = calls.clone();
        let body = body();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let _ = stream.set_nodelay(true);
                let calls = shared.clone();
                let body = body.clone();
                let service = service_fn(move |req| answer(req, calls.clone(), body.clone()));
                tokio::spawn(async move {
                    let _ = auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Ok(Upstream { addr, calls, task })
    }

    /// Calls of `scenario` so far.
    pub fn calls(&self, scenario: &str) -> Calls {
        self.calls
            .lock()
            .map(|calls| calls.get(scenario).copied().unwrap_or_default())
            .unwrap_or_default()
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn answer(
    req: Request<Incoming>,
    calls: Arc<Mutex<HashMap<String, Calls>>>,
    body: Bytes,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let mut scenario = String::new();
    let mut delay = Duration::ZERO;
    let mut fail = false;
    for (name, value) in form_urlencoded::parse(req.uri().query().unwrap_or("").as_bytes()) {
        match &*name {
            "s" => scenario = value.into_owned(),
            "d" => delay = Duration::from_millis(value.parse().unwrap_or(0)),
            "fail" => fail = value == "1",
            _ => {}
        }
    }
    if let Ok(mut calls) = calls.lock() {
        calls.entry(scenario.clone()).or_default().count += 1;
    }
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    if let Ok(mut calls) = calls.lock() {
        let entry = calls.entry(scenario).or_default();
        entry.first_answer.get_or_insert_with(Instant::now);
    }
    let response = if fail {
        Response::builder()
            .status(StatusCode::INTERNAL_SERVER_ERROR)
            .header("content-type", "text/plain")
            .body(Full::new(Bytes::from_static(b"the model failed\n")))
    } else {
        Response::builder()
            .header("content-type", "application/json")
            .header("cache-control", "max-age=60")
            .body(Full::new(body))
    };
    // The builder only fails on invalid header values, and these are constants.
    Ok(response.unwrap_or_default())
}
