//! An in-process HTTP/1.1 server standing in for Corral's slow backend.
//!
//! It counts every call, per key (path plus query, `/a?b=c`), so a test proves stampede
//! protection by asserting that a key was filled exactly once. By default it answers 200 with a
//! JSON echo of the request that carries a call number unique for the server's lifetime, so two
//! fills never produce the same body and a test can tell a cached body from a fresh one.
//!
//! Knobs ([`Upstream::set_delay`], [`Upstream::script`]) take effect on the next call, including
//! calls on connections that are already open.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use http::header::CONTENT_TYPE;
use http::{HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};

/// How long [`Upstream::wait_in_flight`] waits before failing the test.
const IN_FLIGHT_TIMEOUT: Duration = Duration::from_secs(10);

/// A running upstream on `127.0.0.1:<ephemeral>`.
///
/// Dropping it stops accepting and closes every open connection.
pub struct Upstream {
    addr: SocketAddr,
    state: Arc<State>,
    server: JoinHandle<()>,
}

/// A scripted answer for requests whose path starts with a prefix (see [`Upstream::script`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub status: u16,
    /// Appended to the response in order; repeated names give repeated headers.
    pub headers: Vec<(String, String)>,
    /// `None` keeps the default JSON echo (and its `content-type`), so scripted fills still
    /// differ from one another.
    pub body: Option<Bytes>,
    /// Replaces the upstream-wide delay for these requests when set.
    pub delay: Option<Duration>,
}

impl Reply {
    /// A reply with this status, the default JSON body and the upstream-wide delay.
    pub fn status(status: u16) -> Reply {
        Reply {
            status,
            headers: Vec::new(),
            body: None,
            delay: None,
        }
    }

    /// Adds a response header.
    pub fn header(mut self, name: &str, value: &str) -> Reply {
        self.headers.push((name.to_owned(), value.to_owned()));
        self
    }

    /// Replaces the JSON echo with a fixed body.
    pub fn body(mut self, body: impl Into<Bytes>) -> Reply {
        self.body = Some(body.into());
        self
    }

    /// Sleeps this long before answering, instead of the upstream-wide delay.
    pub fn delay(mut self, delay: Duration) -> Reply {
        self.delay = Some(delay);
        self
    }
}

/// Shared between the test and the server task.
struct State {
    // A std Mutex, not tokio's: it is never held across an await, and the test reads it from
    // synchronous accessors.
    inner: Mutex<Inner>,
    /// Calls entered but not yet answered; a watch so tests can wait for a count.
    in_flight: watch::Sender<usize>,
    /// The highest `in_flight` seen since start or the last reset.
    max_in_flight: AtomicUsize,
}

#[derive(Default)]
struct Inner {
    /// Calls since start or the last reset.
    calls: u64,
    /// Numbers every call for the server's lifetime; never reset, so echo bodies stay unique.
    sequence: u64,
    keys: HashMap<String, KeyRecord>,
    delay: Duration,
    scripts: HashMap<String, Reply>,
}

#[derive(Default)]
struct KeyRecord {
    calls: u64,
    last_headers: HeaderMap,
}

/// What the server decided when a call entered.
struct Plan {
    sequence: u64,
    delay: Duration,
    reply: Option<Reply>,
}

impl Upstream {
    /// Binds `127.0.0.1:0` and starts serving in a background task.
    pub async fn start() -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the upstream to 127.0.0.1:0");
        let addr = listener
            .local_addr()
            .expect("a bound listener has an address");
        let state = Arc::new(State {
            inner: Mutex::new(Inner::default()),
            in_flight: watch::Sender::new(0),
            max_in_flight: AtomicUsize::new(0),
        });
        let server = tokio::spawn(accept_loop(listener, Arc::clone(&state)));
        Upstream {
            addr,
            state,
            server,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The base URL, `http://127.0.0.1:<port>`, without a trailing slash.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Calls received since start or the last [`Upstream::reset_calls`].
    pub fn calls(&self) -> u64 {
        self.state.lock().calls
    }

    /// Calls received for one key: the path plus query exactly as requested, e.g. `/a?b=c`.
    pub fn calls_for(&self, path_and_query: &str) -> u64 {
        self.state
            .lock()
            .keys
            .get(path_and_query)
            .map_or(0, |key| key.calls)
    }

    /// Zeroes all call counts and restarts [`Upstream::max_in_flight`] from the calls in flight
    /// now. The call number in echo bodies keeps counting.
    pub fn reset_calls(&self) {
        let mut inner = self.state.lock();
        inner.calls = 0;
        for key in inner.keys.values_mut() {
            key.calls = 0;
        }
        // Inside the watch's lock, like the updates in `InFlight::enter`; nothing is modified.
        self.state.in_flight.send_if_modified(|c| {
            self.state.max_in_flight.store(*c, Ordering::SeqCst);
            false
        });
    }

    /// Headers of the last request received for a key, as the upstream saw them.
    pub fn last_headers(&self, path_and_query: &str) -> Option<HeaderMap> {
        self.state
            .lock()
            .keys
            .get(path_and_query)
            .map(|key| key.last_headers.clone())
    }

    /// Sleeps this long before answering every call (unless a script sets its own delay).
    pub fn set_delay(&self, delay: Duration) {
        self.state.lock().delay = delay;
    }

    /// Answers requests whose path starts with `path_prefix` with `reply`, replacing any script
    /// for the same prefix. When several prefixes match, the longest wins.
    ///
    /// # Panics
    ///
    /// If the reply's status or a header is not valid HTTP; checked here, in the test, rather
    /// than in the server task where the panic would only show as a dropped connection.
    pub fn script(&self, path_prefix: &str, reply: Reply) {
        StatusCode::from_u16(reply.status)
            .unwrap_or_else(|e| panic!("scripted status {}: {e}", reply.status));
        for (name, value) in &reply.headers {
            HeaderName::try_from(name.as_str())
                .unwrap_or_else(|e| panic!("scripted header name {name:?}: {e}"));
            HeaderValue::try_from(value.as_str())
                .unwrap_or_else(|e| panic!("scripted header value {value:?}: {e}"));
        }
        self.state
            .lock()
            .scripts
            .insert(path_prefix.to_owned(), reply);
    }

    /// Removes the script for exactly this prefix.
    pub fn unscript(&self, path_prefix: &str) {
        self.state.lock().scripts.remove(path_prefix);
    }

    /// Calls that have entered the handler and not yet been answered.
    pub fn in_flight(&self) -> usize {
        *self.state.in_flight.borrow()
    }

    /// The highest number of calls in flight at once since start or the last
    /// [`Upstream::reset_calls`], e.g. to prove a cap on concurrent upstream calls.
    pub fn max_in_flight(&self) -> usize {
        self.state.max_in_flight.load(Ordering::SeqCst)
    }

    /// Waits until at least `n` calls are in flight at once, so a test can act while fills are
    /// known to be parked in the upstream (pair it with a delay that keeps them there).
    ///
    /// # Panics
    ///
    /// After 10 s, with the count reached.
    pub async fn wait_in_flight(&self, n: usize) {
        let mut in_flight = self.state.in_flight.subscribe();
        let reached = tokio::time::timeout(IN_FLIGHT_TIMEOUT, in_flight.wait_for(|&c| c >= n));
        if reached.await.is_err() {
            panic!(
                "upstream {}: waited {IN_FLIGHT_TIMEOUT:?} for {n} calls in flight, {} are",
                self.addr,
                self.in_flight()
            );
        }
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        // The accept task owns every connection task (a JoinSet), so this closes them all.
        self.server.abort();
    }
}

impl State {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panicking test thread must not hide the counts from the assertion that follows.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts the call, records its headers and decides how to answer it.
    fn enter(&self, key: &str, path: &str, headers: &HeaderMap) -> Plan {
        let mut inner = self.lock();
        inner.calls += 1;
        inner.sequence += 1;
        let record = inner.keys.entry(key.to_owned()).or_default();
        record.calls += 1;
        record.last_headers = headers.clone();
        let reply = inner
            .scripts
            .iter()
            .filter(|(prefix, _)| path.starts_with(prefix.as_str()))
            .max_by_key(|(prefix, _)| prefix.len())
            .map(|(_, reply)| reply.clone());
        Plan {
            sequence: inner.sequence,
            delay: reply
                .as_ref()
                .and_then(|reply| reply.delay)
                .unwrap_or(inner.delay),
            reply,
        }
    }
}

/// Counts a call as in flight from creation until drop, including when hyper drops the handler
/// because the client went away.
struct InFlight(Arc<State>);

impl InFlight {
    fn enter(state: &Arc<State>) -> InFlight {
        state.in_flight.send_modify(|c| {
            *c += 1;
            // Inside the watch's lock, so the peak can never miss a count another call saw.
            state.max_in_flight.fetch_max(*c, Ordering::SeqCst);
        });
        InFlight(Arc::clone(state))
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.send_modify(|c| *c -= 1);
    }
}

async fn accept_loop(listener: TcpListener, state: Arc<State>) {
    // Owning the connection tasks here means aborting this task aborts them too.
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let state = Arc::clone(&state);
                connections.spawn(async move {
                    let service = service_fn(move |req| answer(Arc::clone(&state), req));
                    // A client hanging up mid-request is not the upstream's failure.
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

async fn answer(
    state: Arc<State>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let _in_flight = InFlight::enter(&state);
    let (parts, body) = req.into_parts();
    let path = parts.uri.path();
    let key = parts
        .uri
        .path_and_query()
        .map_or(path, |pq| pq.as_str())
        .to_owned();
    let plan = state.enter(&key, path, &parts.headers);
    let body = body
        .collect()
        .await
        .map(|collected| collected.to_bytes())
        .unwrap_or_default();
    if !plan.delay.is_zero() {
        tokio::time::sleep(plan.delay).await;
    }

    let status = plan.reply.as_ref().map_or(200, |reply| reply.status);
    let mut response = Response::new(Full::default());
    // Statuses and headers were validated by `Upstream::script`.
    *response.status_mut() = StatusCode::from_u16(status).expect("validated status");
    let scripted_body = plan.reply.as_ref().and_then(|reply| reply.body.clone());
    if let Some(reply) = &plan.reply {
        for (name, value) in &reply.headers {
            response.headers_mut().append(
                HeaderName::try_from(name.as_str()).expect("validated header name"),
                HeaderValue::try_from(value.as_str()).expect("validated header value"),
            );
        }
    }
    let body = match scripted_body {
        Some(body) => body,
        None => {
            response
                .headers_mut()
                .entry(CONTENT_TYPE)
                .or_insert(HeaderValue::from_static("application/json"));
            let echo = serde_json::json!({
                "path": path,
                "query": parts.uri.query().unwrap_or(""),
                "method": parts.method.as_str(),
                "call": plan.sequence,
                "body": String::from_utf8_lossy(&body),
            });
            Bytes::from(echo.to_string())
        }
    };
    *response.body_mut() = Full::new(body);
    Ok(response)
}
