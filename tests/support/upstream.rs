//! An in-process HTTP/1.1 server standing in for Corral's slow backend, in tests and in the
//! stampede bench: the one slow backend of the support module.
//!
//! It counts every call, per key (path plus query, `/a?b=c`), so a test proves stampede
//! protection by asserting that a key was filled exactly once. By default it answers 200 with a
//! JSON echo of the request that carries a call number unique for the server's lifetime, so two
//! fills never produce the same body and a test can tell a cached body from a fresh one.
//! [`Upstream::start_with`] replaces the echo with another [`Responder`]; [`super::Origin`] is
//! this server answering as a conforming origin.
//!
//! Knobs ([`Upstream::set_delay`], [`Upstream::script`]) take effect on the next call, including
//! calls on connections that are already open. A call decides its answer (its [`Plan`]) when it
//! enters, in the same step that counts it in flight: once [`Upstream::wait_in_flight`] has seen a
//! call, re-scripting the upstream no longer changes that call's answer.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::CONTENT_TYPE;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, Uri};
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
    /// `https` when it serves TLS ([`Upstream::start_tls`]).
    scheme: &'static str,
    state: Arc<State>,
    server: JoinHandle<()>,
}

/// Builds the answer to a call that no script gives a body: [`Upstream::start`] echoes the
/// request as JSON, [`super::Origin`] answers as a conforming origin.
///
/// A matching script then sets the status and replaces the headers it names (see
/// [`Upstream::script`]). It runs after the call's delay, on the server task, so it must not
/// block; it may panic only on a bug in the support code (the client then sees a dropped
/// connection).
pub type Responder = Arc<dyn Fn(&Call<'_>) -> Response<Bytes> + Send + Sync>;

/// One call as the [`Responder`] sees it.
pub struct Call<'a> {
    pub method: &'a Method,
    pub uri: &'a Uri,
    pub headers: &'a HeaderMap,
    /// The whole request body.
    pub body: &'a Bytes,
    /// Numbers the call among all calls for the server's lifetime, from 1; never reset.
    pub sequence: u64,
}

/// A scripted answer for requests whose path starts with a prefix (see [`Upstream::script`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub status: u16,
    /// Appended to the response in order; repeated names give repeated headers.
    pub headers: Vec<(String, String)>,
    /// `None` keeps the [`Responder`]'s body (by default the JSON echo and its `content-type`),
    /// so scripted fills still differ from one another.
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

    /// Adds every response header of `headers`, in order.
    pub fn headers(self, headers: &[(&str, &str)]) -> Reply {
        headers
            .iter()
            .fold(self, |reply, (name, value)| reply.header(name, value))
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
    responder: Responder,
    /// Connections accepted (over TLS: handshakes completed).
    connections: AtomicUsize,
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
    last_method: Method,
    last_version: http::Version,
    /// When the first answer since start or the last reset was ready (after its delay).
    first_answer: Option<Instant>,
}

/// What the server decided when a call entered; a later script or delay does not change it.
struct Plan {
    sequence: u64,
    delay: Duration,
    reply: Option<Reply>,
}

impl Upstream {
    /// Binds `127.0.0.1:0` and starts serving in a background task, answering with the JSON
    /// echo (see the module doc).
    pub async fn start() -> Upstream {
        Upstream::start_with(Arc::new(echo)).await
    }

    /// Like [`Upstream::start`], answering calls that no script gives a body with `responder`.
    ///
    /// # Panics
    ///
    /// If `127.0.0.1:0` cannot be bound.
    pub async fn start_with(responder: Responder) -> Upstream {
        Upstream::serve(responder, None).await
    }

    /// Like [`Upstream::start`], over TLS with `config` (HTTP/1.1 and HTTP/2, as its ALPN
    /// offers; see [`super::tls::Pki`]). [`Upstream::url`] is then `https://127.0.0.1:<port>`.
    pub async fn start_tls(config: Arc<rustls::ServerConfig>) -> Upstream {
        Upstream::serve(
            Arc::new(echo),
            Some(tokio_rustls::TlsAcceptor::from(config)),
        )
        .await
    }

    async fn serve(responder: Responder, tls: Option<tokio_rustls::TlsAcceptor>) -> Upstream {
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
            responder,
            connections: AtomicUsize::new(0),
        });
        let scheme = if tls.is_some() { "https" } else { "http" };
        let server = tokio::spawn(accept_loop(listener, Arc::clone(&state), tls));
        Upstream {
            addr,
            scheme,
            state,
            server,
        }
    }

    /// Stops serving, as when the upstream is gone: the listener and every connection close.
    pub fn stop(&self) {
        // The accept task owns every connection task (a JoinSet), so this closes them all.
        self.server.abort();
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The base URL, `http://127.0.0.1:<port>` (`https://` over TLS), without a trailing slash.
    pub fn url(&self) -> String {
        format!("{}://{}", self.scheme, self.addr)
    }

    /// Connections accepted since start; over TLS, handshakes completed.
    pub fn connections(&self) -> usize {
        self.state.connections.load(Ordering::SeqCst)
    }

    /// The HTTP version of the last request received for a key.
    pub fn last_version(&self, path_and_query: &str) -> Option<http::Version> {
        self.state
            .lock()
            .keys
            .get(path_and_query)
            .map(|key| key.last_version)
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

    /// Calls received for every key (path plus query) that starts with `prefix`, e.g. all the
    /// keys of one scenario under `/recommend/cold-corral/`.
    pub fn calls_under(&self, prefix: &str) -> u64 {
        self.state
            .lock()
            .keys
            .iter()
            .filter(|(key, _)| key.starts_with(prefix))
            .map(|(_, record)| record.calls)
            .sum()
    }

    /// When the first answer for one key (path plus query) since start or the last
    /// [`Upstream::reset_calls`] was ready to send, after its delay: the moment waiters of a
    /// fill can start being answered.
    pub fn first_answer(&self, path_and_query: &str) -> Option<Instant> {
        self.state
            .lock()
            .keys
            .get(path_and_query)
            .and_then(|key| key.first_answer)
    }

    /// Zeroes all call counts (and forgets first answers) and restarts [`Upstream::max_in_flight`] from the calls in flight
    /// now. The call number in echo bodies keeps counting.
    pub fn reset_calls(&self) {
        let mut inner = self.state.lock();
        inner.calls = 0;
        for key in inner.keys.values_mut() {
            key.calls = 0;
            key.first_answer = None;
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

    /// Method of the last request received for a key.
    pub fn last_method(&self, path_and_query: &str) -> Option<Method> {
        self.state
            .lock()
            .keys
            .get(path_and_query)
            .map(|key| key.last_method.clone())
    }

    /// Sleeps this long before answering every call (unless a script sets its own delay).
    pub fn set_delay(&self, delay: Duration) {
        self.state.lock().delay = delay;
    }

    /// Answers requests whose path starts with `path_prefix` with `reply`, replacing any script
    /// for the same prefix. When several prefixes match, the longest wins. The reply's status
    /// replaces the [`Responder`]'s, its headers replace the responder's headers of the same
    /// names, and its body (if any) the responder's body.
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
    /// Every call counted has already decided its answer and been counted in
    /// [`Upstream::calls`]: re-scripting or changing the delay after this returns affects later
    /// calls only.
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
        self.stop();
    }
}

impl State {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panicking test thread must not hide the counts from the assertion that follows.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts the call, records its headers, decides how to answer it and counts it in flight,
    /// all under the one lock that [`Upstream::script`] and [`Upstream::set_delay`] take: a
    /// test that saw the call in flight can no longer change its plan.
    fn enter(
        self: &Arc<Self>,
        key: &str,
        method: &Method,
        path: &str,
        headers: &HeaderMap,
    ) -> (Plan, InFlight) {
        let mut inner = self.lock();
        inner.calls += 1;
        inner.sequence += 1;
        let record = inner.keys.entry(key.to_owned()).or_default();
        record.calls += 1;
        record.last_headers = headers.clone();
        record.last_method = method.clone();
        let reply = inner
            .scripts
            .iter()
            .filter(|(prefix, _)| path.starts_with(prefix.as_str()))
            .max_by_key(|(prefix, _)| prefix.len())
            .map(|(_, reply)| reply.clone());
        let plan = Plan {
            sequence: inner.sequence,
            delay: reply
                .as_ref()
                .and_then(|reply| reply.delay)
                .unwrap_or(inner.delay),
            reply,
        };
        // Still inside `inner`'s lock, so whoever wakes on the new count sees the plan made.
        let in_flight = InFlight::enter(self);
        drop(inner);
        (plan, in_flight)
    }

    /// Notes the moment the first answer for `key` was ready.
    fn answered(&self, key: &str) {
        if let Some(record) = self.lock().keys.get_mut(key) {
            record.first_answer.get_or_insert_with(Instant::now);
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

async fn accept_loop(
    listener: TcpListener,
    state: Arc<State>,
    tls: Option<tokio_rustls::TlsAcceptor>,
) {
    // Owning the connection tasks here means aborting this task aborts them too.
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                // Answers are small and the bench times them: do not hold them back (Nagle).
                let _ = stream.set_nodelay(true);
                let state = Arc::clone(&state);
                if let Some(acceptor) = tls.clone() {
                    connections.spawn(async move {
                        // A failed handshake (the client refused our certificate) ends here.
                        let Ok(stream) = acceptor.accept(stream).await else { return };
                        state.connections.fetch_add(1, Ordering::SeqCst);
                        let service = service_fn(move |req| answer(Arc::clone(&state), req));
                        let builder = hyper_util::server::conn::auto::Builder::new(
                            hyper_util::rt::TokioExecutor::new(),
                        );
                        let _ = builder.serve_connection(TokioIo::new(stream), service).await;
                    });
                    continue;
                }
                state.connections.fetch_add(1, Ordering::SeqCst);
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
    let (parts, body) = req.into_parts();
    let path = parts.uri.path();
    let key = parts
        .uri
        .path_and_query()
        .map_or(path, |pq| pq.as_str())
        .to_owned();
    // Counted in flight before the first await, so a call hyper drops is counted too.
    let (plan, _in_flight) = state.enter(&key, &parts.method, path, &parts.headers);
    if let Some(record) = state.lock().keys.get_mut(&key) {
        record.last_version = parts.version;
    }
    let body = body
        .collect()
        .await
        .map(|collected| collected.to_bytes())
        .unwrap_or_default();
    if !plan.delay.is_zero() {
        tokio::time::sleep(plan.delay).await;
    }

    let mut response = match plan.reply.as_ref().and_then(|reply| reply.body.clone()) {
        Some(scripted) => Response::new(scripted),
        None => (state.responder)(&Call {
            method: &parts.method,
            uri: &parts.uri,
            headers: &parts.headers,
            body: &body,
            sequence: plan.sequence,
        }),
    };
    if let Some(reply) = &plan.reply {
        // Statuses and headers were validated by `Upstream::script`.
        *response.status_mut() = StatusCode::from_u16(reply.status).expect("validated status");
        let headers = response.headers_mut();
        for (name, _) in &reply.headers {
            headers.remove(name.as_str());
        }
        for (name, value) in &reply.headers {
            headers.append(
                HeaderName::try_from(name.as_str()).expect("validated header name"),
                HeaderValue::try_from(value.as_str()).expect("validated header value"),
            );
        }
    }
    state.answered(&key);
    Ok(response.map(Full::new))
}

/// The default [`Responder`]: 200, a JSON echo of the request numbered by its call.
fn echo(call: &Call<'_>) -> Response<Bytes> {
    let echo = serde_json::json!({
        "path": call.uri.path(),
        "query": call.uri.query().unwrap_or(""),
        "method": call.method.as_str(),
        "call": call.sequence,
        "body": String::from_utf8_lossy(call.body),
    });
    let mut response = Response::new(Bytes::from(echo.to_string()));
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}
