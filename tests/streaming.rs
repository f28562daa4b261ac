//! Streaming fills: every requester of a key reads the answer while the leader receives it, and
//! nothing cut short looks complete or is stored.
//!
//! The upstream here is a real hyper server whose answer body the test writes event by event
//! ([`StreamingUpstream`]), so a test orders events instead of timing them: it sends one event,
//! reads it from every client, and only then sends the next — which proves that nobody waits for
//! the end of the body.

mod support;

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use support::corral::{config, recommend_route, start, url};
use support::{Client, RedisServer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};

/// How long a test waits for one step before it fails.
const STEP: Duration = Duration::from_secs(10);

type Event = Result<Frame<Bytes>, std::io::Error>;

/// An upstream whose every answer is `text/event-stream`, cacheable for 60 s, with a body the
/// test writes: each call hands the test a [`Writer`].
struct StreamingUpstream {
    url: String,
    calls: Arc<AtomicU64>,
    writers: mpsc::UnboundedReceiver<Writer>,
}

/// One upstream answer, written by the test: its head goes out on [`Writer::head`] (or with the
/// first event), then its body event by event.
struct Writer {
    body: mpsc::Sender<Event>,
    head: std::sync::Mutex<Option<oneshot::Sender<()>>>,
}

impl Writer {
    /// Sends the answer's head (once).
    fn head(&self) {
        if let Some(head) = self.head.lock().ok().and_then(|mut h| h.take()) {
            let _ = head.send(());
        }
    }

    async fn event(&self, n: usize) {
        self.head();
        let sent = self.body.send(Ok(Frame::data(event(n)))).await;
        assert!(sent.is_ok(), "corral stopped reading the upstream");
    }

    async fn bytes(&self, chunk: Bytes) -> bool {
        self.head();
        self.body.send(Ok(Frame::data(chunk))).await.is_ok()
    }

    /// Breaks the body: the upstream's connection ends without the last chunk.
    async fn cut(self) {
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

fn event(n: usize) -> Bytes {
    Bytes::from(format!("id: {n}\ndata: token {n}\n\n"))
}

impl StreamingUpstream {
    async fn start() -> StreamingUpstream {
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
            writers,
        }
    }

    /// The writer of the next call, once it has come.
    async fn next_call(&mut self) -> Writer {
        match tokio::time::timeout(STEP, self.writers.recv()).await {
            Ok(Some(writer)) => writer,
            _ => panic!("the upstream got no call"),
        }
    }

    fn calls(&self) -> u64 {
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
struct Reader {
    status: u16,
    cache_status: String,
    body: Incoming,
    read: Vec<u8>,
}

impl Reader {
    async fn get(url: &str) -> Reader {
        Reader::send(http::Method::GET, url, Bytes::new()).await
    }

    async fn send(method: http::Method, url: &str, body: Bytes) -> Reader {
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
    async fn read_to(&mut self, want: usize) -> Result<(), String> {
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
    async fn finish(&mut self) -> Result<(), String> {
        loop {
            match tokio::time::timeout(STEP, self.body.frame()).await {
                Err(_) => return Err("no end in time".to_owned()),
                Ok(None) => return Ok(()),
                Ok(Some(Err(err))) => return Err(format!("the body failed: {err}")),
                Ok(Some(Ok(frame))) => {
                    if let Ok(data) = frame.into_data() {
                        self.read.extend_from_slice(&data);
                    }
                }
            }
        }
    }
}

/// GETs `target` in a task of its own: the head comes back with the body still to read.
fn spawn_reader(target: String) -> tokio::task::JoinHandle<Reader> {
    tokio::spawn(async move { Reader::get(&target).await })
}

/// Sends events `from..=to`, each only once every reader has read the one before, then ends the
/// body and checks that every reader got all of it, ending cleanly.
async fn lockstep(writer: Writer, readers: &mut [Reader], from: usize, to: usize) {
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

fn events_len(n: usize) -> usize {
    (1..=n).map(|i| event(i).len()).sum()
}

fn events(n: usize) -> Vec<u8> {
    (1..=n).flat_map(|i| event(i).to_vec()).collect()
}

#[tokio::test]
async fn the_leader_and_its_waiters_read_every_event_before_the_next_is_sent() {
    let mut upstream = StreamingUpstream::start().await;
    let fleet = start(1, &config(None, &recommend_route(&upstream.url, ""))).await;
    let target = url(&fleet[0], "/recommend?segment=sse");

    // The leader's request reaches the upstream; five more join its flight.
    let leader = spawn_reader(target.clone());
    let writer = upstream.next_call().await;
    let waiters: Vec<_> = (0..5).map(|_| spawn_reader(target.clone())).collect();
    writer.event(1).await;
    let mut readers = vec![leader.await.expect("leader")];
    for waiter in waiters {
        readers.push(waiter.await.expect("waiter"));
    }
    assert!(readers.iter().all(|r| r.status == 200));
    assert!(
        readers[0].cache_status.contains("fwd=miss"),
        "{}",
        readers[0].cache_status
    );
    assert!(
        readers[1..]
            .iter()
            .all(|r| r.cache_status.contains("collapsed")),
        "waiters share the leader's fill"
    );
    // Each event reaches every reader before the upstream writes the next one.
    lockstep(writer, &mut readers, 1, 20).await;
    assert_eq!(
        upstream.calls(),
        1,
        "one upstream call for the six requests"
    );

    // Once whole, the answer was stored: the next request is a hit with the same bytes.
    let client = Client::new();
    support::eventually("the streamed answer is stored", STEP, async || {
        let resp = client.get(&target, &[]).await;
        resp.cache_status().is_some_and(|s| s.contains("hit"))
            && resp.body.as_ref() == events(20).as_slice()
    })
    .await;
    assert_eq!(upstream.calls(), 1);
}

#[tokio::test]
async fn a_late_joiner_reads_from_byte_zero_then_tails() {
    let mut upstream = StreamingUpstream::start().await;
    let fleet = start(1, &config(None, &recommend_route(&upstream.url, ""))).await;
    let target = url(&fleet[0], "/recommend?segment=late");
    let leader = spawn_reader(target.clone());
    let writer = upstream.next_call().await;
    for n in 1..=3 {
        writer.event(n).await;
    }
    let mut leader = leader.await.expect("leader");
    leader.read_to(events_len(3)).await.expect("three events");
    // Joins after three events: it gets them at once, then the rest as they come.
    let mut late = Reader::get(&target).await;
    late.read_to(events_len(3))
        .await
        .expect("the first three at once");
    writer.event(4).await;
    late.read_to(events_len(4))
        .await
        .expect("the fourth as it comes");
    drop(writer);
    late.finish().await.expect("clean end");
    leader.finish().await.expect("clean end");
    assert_eq!(late.read, events(4));
    assert_eq!(leader.read, events(4));
    assert_eq!(upstream.calls(), 1);
}

#[tokio::test]
async fn a_cut_stream_fails_every_reader_and_is_never_stored() {
    let redis = RedisServer::start().await;
    let mut upstream = StreamingUpstream::start().await;
    let cfg = config(Some(&redis.url()), &recommend_route(&upstream.url, ""));
    let fleet = start(1, &cfg).await;
    let target = url(&fleet[0], "/recommend?segment=cut");
    let leader = spawn_reader(target.clone());
    let writer = upstream.next_call().await;
    let waiter = spawn_reader(target.clone());
    for n in 1..=5 {
        writer.event(n).await;
    }
    let mut readers = [leader.await.expect("leader"), waiter.await.expect("waiter")];
    for reader in &mut readers {
        reader.read_to(events_len(5)).await.expect("five events");
    }
    writer.cut().await;
    for reader in &mut readers {
        let ended = reader.finish().await;
        assert!(
            ended.is_err(),
            "a cut stream must not end cleanly: {ended:?}"
        );
    }
    support::corral::assert_nothing_stored(&redis, &fleet[0]).await;
    // The next request fills again.
    let next = spawn_reader(target.clone());
    let writer = upstream.next_call().await;
    writer.event(1).await;
    drop(writer);
    let mut next = next.await.expect("next");
    next.finish().await.expect("the new fill ends cleanly");
    assert_eq!(next.read, events(1));
    assert_eq!(upstream.calls(), 2);
}

#[tokio::test]
async fn the_fill_runs_on_when_the_leaders_client_leaves_and_a_waiters_leaving_holds_nobody() {
    let mut upstream = StreamingUpstream::start().await;
    let fleet = start(1, &config(None, &recommend_route(&upstream.url, ""))).await;
    let target = url(&fleet[0], "/recommend?segment=leave");
    let leader = spawn_reader(target.clone());
    let writer = upstream.next_call().await;
    let (a, b) = (spawn_reader(target.clone()), spawn_reader(target.clone()));
    writer.event(1).await;
    let (leader, mut a, b) = (
        leader.await.expect("leader"),
        a.await.expect("a"),
        b.await.expect("b"),
    );
    a.read_to(events_len(1)).await.expect("first event");
    // The leader's client and one waiter's client go away mid-stream.
    drop(leader);
    drop(b);
    for n in 2..=10 {
        writer.event(n).await;
    }
    drop(writer);
    a.finish()
        .await
        .expect("the remaining waiter reads to a clean end");
    assert_eq!(a.read, events(10));
    assert_eq!(upstream.calls(), 1);
    let client = Client::new();
    support::eventually("stored though its leader left", STEP, async || {
        let resp = client.get(&target, &[]).await;
        resp.cache_status().is_some_and(|s| s.contains("hit"))
            && resp.body.as_ref() == events(10).as_slice()
    })
    .await;
}

#[tokio::test]
async fn a_body_over_the_store_limit_streams_to_every_reader_and_is_not_stored() {
    let mut upstream = StreamingUpstream::start().await;
    let route = recommend_route(&upstream.url, "max_entry_size = \"64KiB\"");
    let fleet = start(1, &config(None, &route)).await;
    let target = url(&fleet[0], "/recommend?segment=big");
    let leader = spawn_reader(target.clone());
    let writer = upstream.next_call().await;
    let waiter = spawn_reader(target.clone());
    let chunk = Bytes::from(vec![b'x'; 16 * 1024]);
    assert!(writer.bytes(chunk.clone()).await);
    let mut readers = [leader.await.expect("leader"), waiter.await.expect("waiter")];
    // 4 MiB, sixty-four times the store limit, read by both as it comes.
    let chunks = 256;
    let feed = tokio::spawn(async move {
        for _ in 1..chunks {
            if !writer.bytes(chunk.clone()).await {
                return false;
            }
        }
        true
    });
    let [leader, waiter] = &mut readers;
    let (l, w) = tokio::join!(leader.finish(), waiter.finish());
    assert!(
        feed.await.expect("feed"),
        "corral read the whole upstream body"
    );
    l.expect("the leader reads to a clean end");
    w.expect("the waiter reads to a clean end");
    assert_eq!(leader.read.len(), chunks * 16 * 1024);
    assert_eq!(waiter.read.len(), chunks * 16 * 1024);
    assert_eq!(upstream.calls(), 1);
    // Not stored: the next request is a fresh fill.
    let next = spawn_reader(target.clone());
    let writer = upstream.next_call().await;
    assert!(writer.bytes(Bytes::from_static(b"again")).await);
    drop(writer);
    let mut next = next.await.expect("next");
    next.finish().await.expect("clean end");
    assert_eq!(upstream.calls(), 2);
}

/// The number of subscribers of a key's fill channel (one per waiting instance).
async fn waiting_instances(redis: &RedisServer, cfg: &corral::Config, path: &str) -> usize {
    let entry = support::corral::entry_name(cfg, path);
    let channel = entry.replacen(":{", ":fill:{", 1);
    let mut conn = redis.conn().await;
    let counts: Vec<(String, usize)> = ::redis::cmd("PUBSUB")
        .arg("NUMSUB")
        .arg(&channel)
        .query_async(&mut conn)
        .await
        .expect("PUBSUB NUMSUB");
    counts.first().map_or(0, |(_, n)| *n)
}

/// Returns once one other instance waits on the fill of `path` (subscribed to its channel), so
/// it hears the fill's announcement.
async fn other_instance_waits(redis: &RedisServer, cfg: &corral::Config, path: &str) {
    support::eventually("the other instance waits for the fill", STEP, async || {
        waiting_instances(redis, cfg, path).await == 1
    })
    .await;
}

#[tokio::test]
async fn waiters_on_another_instance_read_each_event_while_it_arrives() {
    let redis = RedisServer::start().await;
    let mut upstream = StreamingUpstream::start().await;
    let cfg = config(Some(&redis.url()), &recommend_route(&upstream.url, ""));
    let fleet = start(2, &cfg).await;
    let path = "/recommend?segment=remote";
    let leader = spawn_reader(url(&fleet[0], path));
    let writer = upstream.next_call().await;
    let remote: Vec<_> = (0..3).map(|_| spawn_reader(url(&fleet[1], path))).collect();
    // The other instance waits on the key's channel before the upstream's head comes.
    other_instance_waits(&redis, &cfg, path).await;
    writer.event(1).await;
    let mut readers = vec![leader.await.expect("leader")];
    for waiter in remote {
        readers.push(waiter.await.expect("remote waiter"));
    }
    assert!(
        readers[1..]
            .iter()
            .all(|r| r.cache_status.contains("collapsed")),
        "remote waiters share the leader's fill"
    );
    lockstep(writer, &mut readers, 1, 10).await;
    assert_eq!(upstream.calls(), 1, "one call for the fleet");
}

/// A lease so long that a remote tail's quiet-period read (`lease / 2`) cannot come while a
/// test runs: whatever the other instance reads, it reads because the channel rang.
const NO_QUIET_READS: &str = "lock = { lease = \"60s\", wait_timeout = \"60s\" }";

/// Every record the leader appends rings the key's channel (`relayed:<id>`), and the instance
/// that tails the log reads on each ring. Its quiet-period read is out of reach here (see
/// [`NO_QUIET_READS`]), so each event reaching the remote readers before the upstream sends
/// the next, and their clean end, can only come from the rings; and the tailing instance reads
/// the log about once per record, not once in a while. (The rings after the announcement used
/// to be dropped unread by the hub: the tail read only on its timer and on `stored`.)
#[tokio::test]
async fn a_remote_tail_reads_on_every_ring_not_on_its_quiet_timer() {
    let redis = RedisServer::start().await;
    let mut upstream = StreamingUpstream::start().await;
    let cfg = config(
        Some(&redis.url()),
        &recommend_route(&upstream.url, NO_QUIET_READS),
    );
    let fleet = start(2, &cfg).await;
    let path = "/recommend?segment=rings";
    let leader = spawn_reader(url(&fleet[0], path));
    let writer = upstream.next_call().await;
    let remote: Vec<_> = (0..2).map(|_| spawn_reader(url(&fleet[1], path))).collect();
    other_instance_waits(&redis, &cfg, path).await;
    let before = redis.commandstats().await.calls("xread");
    writer.event(1).await;
    let mut readers = vec![leader.await.expect("leader")];
    for waiter in remote {
        readers.push(waiter.await.expect("remote waiter"));
    }
    lockstep(writer, &mut readers, 1, 10).await;
    let xreads = redis.commandstats().await.calls("xread") - before;
    assert!(
        xreads >= 10,
        "one log read per ring: {xreads} XREADs for 10 data records and the end"
    );
    assert_eq!(upstream.calls(), 1, "one call for the fleet");
    assert_tails(&fleet[1], "complete").await;
}

/// The instance's metrics count one tail of another instance's fill, ended as `outcome` says
/// (counted before its readers see the end).
async fn assert_tails(instance: &corral::Instance, outcome: &str) {
    let metrics = instance.proxy().render_metrics().await;
    let line = format!("corral_relay_tails_total{{route=\"recommend\",outcome=\"{outcome}\"}} 1");
    assert!(
        metrics.lines().any(|l| l == line),
        "{line} expected in:\n{metrics}"
    );
}

/// An instance that starts waiting after the fill was announced missed the `streaming` notice;
/// the next `relayed` ring (the log is written, since another instance heard the announcement)
/// tells it of the fill, and it tails the log from byte 0 while the body still arrives instead
/// of waiting for the stored answer.
#[tokio::test]
async fn an_instance_that_waits_after_the_announcement_tails_from_the_next_ring() {
    let redis = RedisServer::start().await;
    let mut upstream = StreamingUpstream::start().await;
    let cfg = config(
        Some(&redis.url()),
        &recommend_route(&upstream.url, NO_QUIET_READS),
    );
    let fleet = start(3, &cfg).await;
    let path = "/recommend?segment=late-instance";
    let leader = spawn_reader(url(&fleet[0], path));
    let writer = upstream.next_call().await;
    let early = spawn_reader(url(&fleet[1], path));
    other_instance_waits(&redis, &cfg, path).await;
    writer.event(1).await;
    let mut readers = vec![leader.await.expect("leader"), early.await.expect("early")];
    for reader in &mut readers {
        reader.read_to(events_len(1)).await.expect("first event");
    }
    // The third instance starts waiting once the fill was announced.
    let late = spawn_reader(url(&fleet[2], path));
    support::eventually("the third instance waits for the fill", STEP, async || {
        waiting_instances(&redis, &cfg, path).await == 2
    })
    .await;
    writer.event(2).await;
    readers.push(late.await.expect("late instance"));
    assert!(
        readers[2].cache_status.contains("collapsed"),
        "{}",
        readers[2].cache_status
    );
    lockstep(writer, &mut readers, 2, 6).await;
    assert_eq!(upstream.calls(), 1, "one call for the fleet");
}

#[tokio::test]
async fn a_cut_stream_ends_visibly_on_other_instances_too() {
    let redis = RedisServer::start().await;
    let mut upstream = StreamingUpstream::start().await;
    let cfg = config(Some(&redis.url()), &recommend_route(&upstream.url, ""));
    let fleet = start(2, &cfg).await;
    let path = "/recommend?segment=remote-cut";
    let leader = spawn_reader(url(&fleet[0], path));
    let writer = upstream.next_call().await;
    let remote = spawn_reader(url(&fleet[1], path));
    other_instance_waits(&redis, &cfg, path).await;
    for n in 1..=3 {
        writer.event(n).await;
    }
    let mut readers = [leader.await.expect("leader"), remote.await.expect("remote")];
    for reader in &mut readers {
        reader.read_to(events_len(3)).await.expect("three events");
    }
    writer.cut().await;
    for reader in &mut readers {
        let ended = reader.finish().await;
        assert!(
            ended.is_err(),
            "a cut stream must not end cleanly: {ended:?}"
        );
    }
    support::corral::assert_nothing_stored(&redis, &fleet[1]).await;
    assert_tails(&fleet[1], "aborted").await;
}

#[tokio::test]
async fn identical_llm_requests_in_flight_share_one_call_and_its_tokens() {
    let mut upstream = StreamingUpstream::start().await;
    let route = recommend_route(
        &upstream.url,
        "key = { json = [\"/model\", \"/messages\", \"/temperature\"] }",
    );
    let fleet = start(1, &config(None, &route)).await;
    let target = url(&fleet[0], "/recommend/chat");
    let prompt = |spacing: &str| {
        Bytes::from(format!(
            "{{\"model\":\"m\",{spacing}\"messages\":[{{\"role\":\"user\",\"content\":\"hi\"}}],\"temperature\":0}}"
        ))
    };
    let ask = |body: Bytes| {
        let target = target.clone();
        tokio::spawn(async move { Reader::send(http::Method::POST, &target, body).await })
    };
    let leader = ask(prompt(""));
    let writer = upstream.next_call().await;
    // The same request written differently (whitespace) is the same key.
    let others: Vec<_> = (0..3).map(|_| ask(prompt(" "))).collect();
    writer.event(1).await;
    let mut readers = vec![leader.await.expect("leader")];
    for other in others {
        readers.push(other.await.expect("other"));
    }
    for reader in &mut readers {
        reader
            .read_to(events_len(1))
            .await
            .expect("the first token");
    }
    for n in 2..=5 {
        writer.event(n).await;
    }
    drop(writer);
    for reader in &mut readers {
        reader.finish().await.expect("clean end");
        assert_eq!(reader.read, events(5));
    }
    assert!(
        readers[1..]
            .iter()
            .all(|r| r.cache_status.contains("collapsed"))
    );
    assert_eq!(
        upstream.calls(),
        1,
        "identical prompts in flight make one call"
    );
    // A different prompt is another key: its own call.
    let other = ask(Bytes::from_static(
        b"{\"model\":\"m\",\"messages\":[],\"temperature\":1}",
    ));
    let writer = upstream.next_call().await;
    drop(writer);
    let mut other = other.await.expect("other prompt");
    other.finish().await.expect("clean end");
    assert_eq!(upstream.calls(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_killed_mid_stream_cuts_remote_readers_visibly_and_local_ones_read_on() {
    let mut redis = RedisServer::start().await;
    let mut upstream = StreamingUpstream::start().await;
    let cfg = config(Some(&redis.url()), &recommend_route(&upstream.url, ""));
    let fleet = start(2, &cfg).await;
    let path = "/recommend?segment=redis-dies";
    let leader = spawn_reader(url(&fleet[0], path));
    let writer = upstream.next_call().await;
    let remote = spawn_reader(url(&fleet[1], path));
    other_instance_waits(&redis, &cfg, path).await;
    writer.event(1).await;
    let (mut leader, mut remote) = (leader.await.expect("leader"), remote.await.expect("remote"));
    leader.read_to(events_len(1)).await.expect("first event");
    remote
        .read_to(events_len(1))
        .await
        .expect("first event elsewhere");

    redis.kill();
    for n in 2..=4 {
        writer.event(n).await;
    }
    drop(writer);
    leader
        .finish()
        .await
        .expect("the leader's instance reads the upstream to a clean end");
    assert_eq!(leader.read, events(4));
    let cut = remote.finish().await;
    assert!(
        cut.is_err(),
        "the remote reader must not end cleanly: {cut:?}"
    );
    assert!(
        remote.read.len() < events_len(4),
        "never a silently short body that looks complete"
    );
    assert_eq!(upstream.calls(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_leader_process_killed_mid_stream_cuts_remote_readers_and_the_next_request_fills_again()
{
    let redis = RedisServer::start().await;
    let mut upstream = StreamingUpstream::start().await;
    let routes = recommend_route(&upstream.url, "");
    let cfg = config(Some(&redis.url()), &routes);
    let mut leader_process = support::CorralProcess::start(&support::corral::config_text(
        "",
        Some(&redis.url()),
        &routes,
    ))
    .await;
    let fleet = start(1, &cfg).await;
    let path = "/recommend?segment=leader-dies";
    let leader = spawn_reader(leader_process.url(path));
    let writer = upstream.next_call().await;
    let remote = spawn_reader(url(&fleet[0], path));
    other_instance_waits(&redis, &cfg, path).await;
    writer.event(1).await;
    let mut remote = remote.await.expect("remote");
    remote
        .read_to(events_len(1))
        .await
        .expect("first event elsewhere");
    drop(leader);

    leader_process.kill();
    let cut = remote.finish().await;
    assert!(
        cut.is_err(),
        "a relay whose leader died must not end cleanly: {cut:?}"
    );
    drop(writer);

    // The lock lapses with its lease; the next request fills again.
    let next = spawn_reader(url(&fleet[0], path));
    let writer = upstream.next_call().await;
    writer.event(1).await;
    drop(writer);
    let mut next = next.await.expect("next");
    next.finish().await.expect("a clean end");
    assert_eq!(next.read, events(1));
    assert_eq!(upstream.calls(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_slow_reader_slows_nobody_and_is_cut_once_it_falls_behind_the_window() {
    let mut upstream = StreamingUpstream::start().await;
    let route = recommend_route(&upstream.url, "max_entry_size = \"64KiB\"");
    let fleet = start(1, &config(None, &route)).await;
    let target = url(&fleet[0], "/recommend?segment=slow");
    let fast = spawn_reader(target.clone());
    let writer = upstream.next_call().await;
    let slow = spawn_reader(target.clone());
    let chunk = Bytes::from(vec![b'y'; 64 * 1024]);
    assert!(writer.bytes(chunk.clone()).await);
    let (mut fast, mut slow) = (fast.await.expect("fast"), slow.await.expect("slow"));
    // 64 MiB: far more than the relay's window and every socket buffer between.
    let chunks = 1024;
    let feed = tokio::spawn(async move {
        for _ in 1..chunks {
            if !writer.bytes(chunk.clone()).await {
                return false;
            }
        }
        true
    });
    // The slow client reads nothing until the fast one has read everything.
    fast.finish()
        .await
        .expect("the fast reader reads to a clean end");
    assert_eq!(fast.read.len(), chunks * 64 * 1024);
    assert!(
        feed.await.expect("feed"),
        "the fill read the whole upstream body"
    );
    let cut = slow.finish().await;
    assert!(cut.is_err(), "the laggard is cut, visibly: {cut:?}");
    assert!(slow.read.len() < chunks * 64 * 1024);
    let metrics = fleet[0].proxy().render_metrics().await;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("corral_stream_readers_cut_total") && !l.ends_with(" 0")),
        "the cut is counted:\n{metrics}"
    );
}
