//! Streaming fills, for `tests/streaming.rs` (one instance) and `tests/streaming_fleet.rs`
//! (across instances): an upstream whose answer body the test writes event by event
//! ([`StreamingUpstream`]), clients that read an answer frame by frame ([`Reader`]), the
//! lockstep that proves nobody waits for the end of the body ([`lockstep`]), and the
//! [`StreamingFleet`] of instances over that upstream, with the waits for another instance.

use std::convert::Infallible;
use std::ops::Deref;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use corral::{Config, Instance};
use http::{Request, Response};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Mutex, mpsc, oneshot};

use super::corral::{
    assert_nothing_stored, config, fill_channel, full_text, parse, recommend_route, start, url,
};
use super::{Client, RedisServer, eventually};

/// How long a test waits for one step before it fails.
pub const STEP: Duration = Duration::from_secs(10);

/// One frame of an upstream body, or the error that breaks it.
pub type Event = Result<Frame<Bytes>, std::io::Error>;

/// An upstream whose every answer is `text/event-stream`, cacheable for 60 s, with a body the
/// test writes: each call hands the test a [`Writer`].
pub struct StreamingUpstream {
    /// Its base URL, `http://127.0.0.1:<port>`.
    pub url: String,
    calls: Arc<AtomicU64>,
    writers: Mutex<mpsc::UnboundedReceiver<Writer>>,
}

/// One upstream answer, written by the test: its head goes out on [`Writer::head`] (or with the
/// first event), then its body event by event.
pub struct Writer {
    body: mpsc::Sender<Event>,
    head: std::sync::Mutex<Option<oneshot::Sender<()>>>,
}

impl Writer {
    /// Sends the answer's head (once).
    pub fn head(&self) {
        if let Some(head) = self.head.lock().ok().and_then(|mut h| h.take()) {
            let _ = head.send(());
        }
    }

    /// Sends event `n` ([`event`]); panics if Corral stopped reading.
    pub async fn event(&self, n: usize) {
        self.head();
        let sent = self.body.send(Ok(Frame::data(event(n)))).await;
        assert!(sent.is_ok(), "corral stopped reading the upstream");
    }

    /// Sends `chunk`; `false` once Corral stopped reading.
    pub async fn bytes(&self, chunk: Bytes) -> bool {
        self.head();
        self.body.send(Ok(Frame::data(chunk))).await.is_ok()
    }

    /// Breaks the body: the upstream's connection ends without the last chunk.
    pub async fn cut(self) {
        self.head();
        let _ = self
            .body
            .send(Err(std::io::Error::other("upstream cut the stream")))
            .await;
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.head();
    }
}

/// Server-sent event `n`: `id: n`, `data: token n`.
pub fn event(n: usize) -> Bytes {
    Bytes::from(format!("id: {n}\ndata: token {n}\n\n"))
}

impl StreamingUpstream {
    /// Starts it on a free loopback port.
    pub async fn start() -> StreamingUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let calls = Arc::new(AtomicU64::new(0));
        let (to_test, writers) = mpsc::unbounded_channel();
        let counted = calls.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (to_test, counted) = (to_test.clone(), counted.clone());
                tokio::spawn(async move {
                    let service = service_fn(move |_req: Request<Incoming>| {
                        counted.fetch_add(1, Ordering::SeqCst);
                        let (tx, rx) = mpsc::channel::<Event>(4);
                        let (head, headed) = oneshot::channel();
                        let _ = to_test.send(Writer {
                            body: tx,
                            head: std::sync::Mutex::new(Some(head)),
                        });
                        let body = StreamBody::new(tokio_stream_from(rx));
                        let resp = Response::builder()
                            .header("content-type", "text/event-stream")
                            .header("cache-control", "public, max-age=60")
                            .body(body)
                            .expect("a valid response");
                        async move {
                            let _ = headed.await;
                            Ok::<_, Infallible>(resp)
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        StreamingUpstream {
            url: format!("http://{addr}"),
            calls,
            writers: Mutex::new(writers),
        }
    }

    /// The writer of the next call, once it has come.
    pub async fn next_call(&self) -> Writer {
        let mut writers = self.writers.lock().await;
        match tokio::time::timeout(STEP, writers.recv()).await {
            Ok(Some(writer)) => writer,
            _ => panic!("the upstream got no call"),
        }
    }

    /// Calls so far.
    pub fn calls(&self) -> u64 {
        self.calls.load(Ordering::SeqCst)
    }
}

/// An mpsc receiver as a stream of frames.
fn tokio_stream_from(
    rx: mpsc::Receiver<Event>,
) -> impl futures_util::Stream<Item = Event> + Send + 'static {
    futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|e| (e, rx)) })
}

/// A client that reads an answer's body frame by frame.
pub struct Reader {
    pub status: u16,
    /// The `Cache-Status` header, empty when there is none.
    pub cache_status: String,
    body: Incoming,
    /// What it has read of the body so far.
    pub read: Vec<u8>,
}

impl Reader {
    /// `GET url`, once its head has come.
    pub async fn get(url: &str) -> Reader {
        Reader::send(http::Method::GET, url, Bytes::new()).await
    }

    /// `method url` with a JSON `body`, once its head has come.
    pub async fn send(method: http::Method, url: &str, body: Bytes) -> Reader {
        let uri: http::Uri = url.parse().expect("a valid url");
        let authority = uri.authority().expect("an authority").clone();
        let stream = TcpStream::connect(authority.as_str())
            .await
            .expect("connect to corral");
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .expect("handshake");
        tokio::spawn(conn);
        let req = Request::builder()
            .method(method)
            .uri(uri.path_and_query().map_or("/", |p| p.as_str()))
            .header("host", authority.as_str())
            .header("content-type", "application/json")
            .body(Full::new(body))
            .expect("a valid request");
        let resp = tokio::time::timeout(STEP, sender.send_request(req))
            .await
            .expect("an answer head in time")
            .expect("an answer head");
        let cache_status = resp
            .headers()
            .get("cache-status")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        Reader {
            status: resp.status().as_u16(),
            cache_status,
            body: resp.into_body(),
            read: Vec::new(),
        }
    }

    /// Reads until the body holds `want` bytes in all; `Err` when the body fails first.
    pub async fn read_to(&mut self, want: usize) -> Result<(), String> {
        while self.read.len() < want {
            match tokio::time::timeout(STEP, self.body.frame()).await {
                Err(_) => return Err("no frame in time".to_owned()),
                Ok(None) => return Err("the body ended".to_owned()),
                Ok(Some(Err(err))) => return Err(format!("the body failed: {err}")),
                Ok(Some(Ok(frame))) => {
                    if let Ok(data) = frame.into_data() {
                        self.read.extend_from_slice(&data);
                    }
                }
            }
        }
        Ok(())
    }

    /// Reads the rest: `Ok` only when the body ended cleanly.
    pub async fn finish(&mut self) -> Result<(), String> {
        match self.ending().await {
            Ending::Clean => Ok(()),
            Ending::Cut(err) => Err(err),
            Ending::Hung => Err("no end in time".to_owned()),
        }
    }

    /// Reads the rest, and says how the body ended.
    pub async fn ending(&mut self) -> Ending {
        loop {
            match tokio::time::timeout(STEP, self.body.frame()).await {
                Err(_) => return Ending::Hung,
                Ok(None) => return Ending::Clean,
                Ok(Some(Err(err))) => return Ending::Cut(format!("the body failed: {err}")),
                Ok(Some(Ok(frame))) => {
                    if let Ok(data) = frame.into_data() {
                        self.read.extend_from_slice(&data);
                    }
                }
            }
        }
    }
}

/// How a body ended, for a test that must tell a visible cut from a hang.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ending {
    /// It ended cleanly (the last chunk came).
    Clean,
    /// It failed: cut visibly (no last chunk, a reset), with the client's error.
    Cut(String),
    /// Nothing came for a [`STEP`]: neither more bytes nor an end.
    Hung,
}

/// GETs `target` in a task of its own: the head comes back with the body still to read.
pub fn spawn_reader(target: String) -> tokio::task::JoinHandle<Reader> {
    tokio::spawn(async move { Reader::get(&target).await })
}

/// Sends events `from..=to`, each only once every reader has read the one before, then ends the
/// body and checks that every reader got all of it, ending cleanly.
pub async fn lockstep(writer: Writer, readers: &mut [Reader], from: usize, to: usize) {
    for n in from..=to {
        if n > from {
            writer.event(n).await;
        }
        for reader in readers.iter_mut() {
            reader
                .read_to(events_len(n))
                .await
                .expect("the event arrives everywhere");
        }
    }
    drop(writer);
    for reader in readers.iter_mut() {
        reader
            .finish()
            .await
            .expect("a clean end once the upstream ended");
        assert_eq!(reader.read, events(to), "every body whole and identical");
    }
}

/// The length of events `1..=n`.
pub fn events_len(n: usize) -> usize {
    (1..=n).map(|i| event(i).len()).sum()
}

/// Events `1..=n`, as a body holds them.
pub fn events(n: usize) -> Vec<u8> {
    (1..=n).flat_map(|i| event(i).to_vec()).collect()
}

/// Awaits the head of every spawned reader, in order.
pub async fn heads(readers: Vec<tokio::task::JoinHandle<Reader>>) -> Vec<Reader> {
    let mut heads = Vec::with_capacity(readers.len());
    for reader in readers {
        heads.push(reader.await.expect("a reader's answer head"));
    }
    heads
}

/// Reads events `1..=n` on every reader.
pub async fn read_everywhere(readers: &mut [Reader], n: usize) {
    for reader in readers.iter_mut() {
        reader
            .read_to(events_len(n))
            .await
            .expect("the events arrive everywhere");
    }
}

/// Reads every reader to its end and asserts that none ended cleanly: a cut stream never looks
/// complete.
pub async fn assert_cut(readers: &mut [Reader]) {
    for reader in readers.iter_mut() {
        let ended = reader.finish().await;
        assert!(
            ended.is_err(),
            "a cut stream must not end cleanly: {ended:?}"
        );
    }
}

/// A [`StreamingUpstream`] and Corral instances of its `/recommend` route, alone or sharing a
/// Redis of their own.
///
/// It derefs to its instances. The instances drop first, the upstream and Redis last, as a
/// test's locals did.
pub struct StreamingFleet {
    instances: Vec<Instance>,
    /// The upstream every instance fills from.
    pub upstream: StreamingUpstream,
    /// The config every instance runs.
    pub cfg: Config,
    redis: Option<RedisServer>,
}

impl StreamingFleet {
    /// One instance without Redis, its route `/recommend` with `route_extra`.
    pub async fn alone(route_extra: &str) -> StreamingFleet {
        StreamingFleet::start(1, None, route_extra).await
    }

    /// `n` instances on a Redis of their own, their route `/recommend` with `route_extra`.
    pub async fn on_redis(n: usize, route_extra: &str) -> StreamingFleet {
        let redis = RedisServer::start().await;
        StreamingFleet::start(n, Some(redis), route_extra).await
    }

    /// `n` instances on the Redis a `[redis]` table names (sentinels, a cluster, TLS: the test
    /// runs it), their route `/recommend` with `route_extra`. [`StreamingFleet::redis`] and what
    /// asks it are then out of use: the test probes its own deployment.
    pub async fn behind(n: usize, redis_table: &str, route_extra: &str) -> StreamingFleet {
        let upstream = StreamingUpstream::start().await;
        let routes = recommend_route(&upstream.url, route_extra);
        let cfg = parse(&full_text("", redis_table, &routes));
        StreamingFleet::with(n, upstream, cfg, None).await
    }

    async fn start(n: usize, redis: Option<RedisServer>, route_extra: &str) -> StreamingFleet {
        let upstream = StreamingUpstream::start().await;
        let redis_url = redis.as_ref().map(RedisServer::url);
        let cfg = config(
            redis_url.as_deref(),
            &recommend_route(&upstream.url, route_extra),
        );
        StreamingFleet::with(n, upstream, cfg, redis).await
    }

    async fn with(
        n: usize,
        upstream: StreamingUpstream,
        cfg: Config,
        redis: Option<RedisServer>,
    ) -> StreamingFleet {
        StreamingFleet {
            instances: start(n, &cfg).await,
            upstream,
            cfg,
            redis,
        }
    }

    /// The fleet's Redis.
    ///
    /// # Panics
    ///
    /// If it was started [`StreamingFleet::alone`].
    pub fn redis(&self) -> &RedisServer {
        self.redis
            .as_ref()
            .expect("a fleet started on_redis has a Redis")
    }

    /// Kills the fleet's Redis (see [`RedisServer::kill`]).
    ///
    /// # Panics
    ///
    /// If it was started [`StreamingFleet::alone`].
    pub fn kill_redis(&mut self) {
        self.redis
            .as_mut()
            .expect("a fleet started on_redis has a Redis")
            .kill();
    }

    /// The proxy URL of instance `on` for a path.
    pub fn url(&self, on: usize, path: &str) -> String {
        url(&self.instances[on], path)
    }

    /// `GET path` of instance `on` in a task of its own (see [`spawn_reader`]).
    pub fn reader(&self, on: usize, path: &str) -> tokio::task::JoinHandle<Reader> {
        spawn_reader(self.url(on, path))
    }

    /// A flight for `path`: the leader's request on instance 0 reaches the upstream, `waiters`
    /// more join it from instance `on` (from another instance: once that one waits on the key's
    /// channel), and the upstream sends its head with event 1. The upstream's writer, and the
    /// readers (the leader first) with their heads.
    pub async fn flight(&self, path: &str, on: usize, waiters: usize) -> (Writer, Vec<Reader>) {
        let leader = self.reader(0, path);
        let writer = self.upstream.next_call().await;
        let mut readers = vec![leader];
        readers.extend((0..waiters).map(|_| self.reader(on, path)));
        if on != 0 {
            self.other_instance_waits(path).await;
        }
        writer.event(1).await;
        (writer, heads(readers).await)
    }

    /// Returns once `n` other instances wait on the fill of `path` (subscribed to its channel),
    /// so they hear the fill's announcement.
    pub async fn instances_wait(&self, path: &str, n: usize) {
        let channel = fill_channel(&self.cfg, path);
        let redis = self.redis();
        eventually("the other instances wait for the fill", STEP, async || {
            redis.subscribers(&channel).await == n
        })
        .await;
    }

    /// Returns once one other instance waits on the fill of `path`.
    pub async fn other_instance_waits(&self, path: &str) {
        self.instances_wait(path, 1).await;
    }

    /// Asserts that instance `on` stored nothing, in Redis or its L1.
    pub async fn assert_nothing_stored(&self, on: usize) {
        assert_nothing_stored(self.redis(), &self.instances[on]).await;
    }

    /// Asserts that the next request for `path` on instance `on` fills again: one new upstream
    /// call, whose one event it reads to a clean end.
    pub async fn fills_again(&self, on: usize, path: &str) {
        let next = self.reader(on, path);
        let writer = self.upstream.next_call().await;
        writer.event(1).await;
        drop(writer);
        let mut next = next.await.expect("the next request's head");
        next.finish().await.expect("the new fill ends cleanly");
        assert_eq!(next.read, events(1));
    }

    /// Asserts that a request for `path` on instance `on`, once a streamed fill of events
    /// `1..=n` has ended, gets that body whole: from the stored entry (no upstream call), or —
    /// when nothing was stored — from a fill of its own, to which the upstream answers the same
    /// events and which it reads whole. Returns whether it filled again.
    pub async fn whole_or_fills_again(&self, on: usize, path: &str, n: usize) -> bool {
        let mut next = self.reader(on, path);
        let refill = tokio::select! {
            biased;
            answered = &mut next => {
                let mut answered = answered.expect("the request's answer head");
                answered
                    .finish()
                    .await
                    .expect("an answer from the stored entry ends cleanly");
                assert_eq!(answered.read, events(n), "a stored answer is whole");
                return false;
            }
            writer = self.upstream.next_call() => writer,
        };
        for i in 1..=n {
            refill.event(i).await;
        }
        drop(refill);
        let mut refilled = next.await.expect("the new fill's answer head");
        refilled.finish().await.expect("the new fill ends cleanly");
        assert_eq!(refilled.read, events(n), "the new fill's answer is whole");
        true
    }

    /// Waits until `path` on instance `on` is a hit holding events `1..=n`: the streamed answer
    /// was stored.
    pub async fn stored(&self, on: usize, path: &str, n: usize, what: &str) {
        let (client, target) = (Client::new(), self.url(on, path));
        eventually(what, STEP, async || {
            let resp = client.get(&target, &[]).await;
            resp.cache_status().is_some_and(|s| s.contains("hit"))
                && resp.body.as_ref() == events(n).as_slice()
        })
        .await;
    }

    /// Asserts that instance `on`'s metrics count one tail of another instance's fill, ended as
    /// `outcome` says (counted before its readers see the end).
    pub async fn assert_tails(&self, on: usize, outcome: &str) {
        let metrics = self.instances[on].proxy().render_metrics().await;
        let line =
            format!("corral_relay_tails_total{{route=\"recommend\",outcome=\"{outcome}\"}} 1");
        assert!(
            metrics.lines().any(|l| l == line),
            "{line} expected in:\n{metrics}"
        );
    }
}

impl Deref for StreamingFleet {
    type Target = [Instance];

    fn deref(&self) -> &[Instance] {
        &self.instances
    }
}
