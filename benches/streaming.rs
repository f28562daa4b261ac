//! The streaming load bench: Server-Sent Events and a large answer through real `corral run`
//! processes sharing one `redis-server`, beside Varnish on the same upstream when it is installed.
//!
//! ```sh
//! cargo bench --bench streaming                 # ~1 minute on 2 cores
//! STREAM_BIG_MIB=64 cargo bench --bench streaming   # a smaller large answer, for a quick run
//! ```
//!
//! # Rows
//! 1. SSE: an upstream that sends its head 200 ms after the call, then 20 events 100 ms apart
//!    (`Cache-Control: public, max-age=60`). One leader and 5 waiters on instance A, 5 waiters on
//!    instance B. For each class: when its clients got the first event, the last one, and the
//!    latest of all (each client's worst), counted from the moment the upstream wrote that event
//!    (so the figure is the relay's own delay, not the upstream's). Varnish (one instance,
//!    1 + 10 requests) beside it.
//! 2. Redis work of one streamed fill (row 1's): commands by name (`INFO commandstats`, scripts'
//!    inner commands included) and bytes Redis received (`INFO stats`).
//! 3. A large answer (`STREAM_BIG_MIB`, 1024 by default, over `max_entry_size`) to 10 concurrent
//!    requesters on one instance: upstream calls, bytes each got, wall time, and the instance's
//!    resident memory before and at its peak (`VmHWM`).
//!
//! Everything binds and targets 127.0.0.1; every loop is bounded in count and time; every
//! process stops on Drop.

// The stampede bench's process fixtures; this bench uses the Corral and Varnish ones.
#[allow(dead_code)]
#[path = "stampede/procs.rs"]
mod procs;
#[path = "../tests/support/mod.rs"]
mod support;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Empty, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};

use procs::{BoxError, Corral, CorralSettings, Varnish};
use support::{CommandStats, RedisServer};

const EVENTS: usize = 20;
const EVENT_GAP: Duration = Duration::from_millis(100);
const HEAD_DELAY: Duration = Duration::from_millis(200);
/// How long one client may take for one answer before the bench gives up on it.
const CLIENT_LIMIT: Duration = Duration::from_secs(120);

fn main() -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("streaming bench: no runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("streaming bench failed: {err}");
            ExitCode::FAILURE
        }
    }
}

/// When the upstream wrote each event of each call, by call number.
#[derive(Default)]
struct Writes {
    calls: usize,
    events: Vec<Vec<Instant>>,
}

/// The bench's upstream: `/sse…` streams events, `/big…` streams `big` bytes as fast as read.
async fn upstream(big: u64) -> Result<(SocketAddr, Arc<Mutex<Writes>>), BoxError> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let writes = Arc::new(Mutex::new(Writes::default()));
    let shared = writes.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let writes = shared.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req: Request<Incoming>| {
                    let writes = writes.clone();
                    async move {
                        let path = req.uri().path().to_owned();
                        if path.starts_with("/recommend/sse") {
                            // A slow model thinks before it answers.
                            tokio::time::sleep(HEAD_DELAY).await;
                        }
                        Ok::<_, Infallible>(answer(&path, writes, big))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Ok((addr, writes))
}

type Chunk = Result<Frame<Bytes>, Infallible>;

fn answer(
    path: &str,
    writes: Arc<Mutex<Writes>>,
    big: u64,
) -> Response<StreamBody<tokio_stream::Receiver<Chunk>>> {
    let (tx, rx) = tokio::sync::mpsc::channel::<Chunk>(8);
    let sse = path.starts_with("/recommend/sse");
    let call = {
        let mut w = writes.lock().unwrap_or_else(|e| e.into_inner());
        w.calls += 1;
        w.events.push(Vec::new());
        w.events.len() - 1
    };
    tokio::spawn(async move {
        if sse {
            for n in 1..=EVENTS {
                let event = Bytes::from(format!("id: {n}\ndata: token {n}\n\n"));
                if tx.send(Ok(Frame::data(event))).await.is_err() {
                    return;
                }
                if let Ok(mut w) = writes.lock() {
                    w.events[call].push(Instant::now());
                }
                tokio::time::sleep(EVENT_GAP).await;
            }
        } else {
            let chunk = Bytes::from(vec![b'z'; 64 * 1024]);
            let mut sent = 0u64;
            while sent < big {
                if tx.send(Ok(Frame::data(chunk.clone()))).await.is_err() {
                    return;
                }
                sent += chunk.len() as u64;
            }
        }
    });
    let content_type = if sse {
        "text/event-stream"
    } else {
        "application/octet-stream"
    };
    let body = StreamBody::new(tokio_stream::Receiver(rx));
    let mut resp = Response::new(body);
    resp.headers_mut()
        .insert("content-type", http::HeaderValue::from_static(content_type));
    resp.headers_mut().insert(
        "cache-control",
        http::HeaderValue::from_static("public, max-age=60"),
    );
    resp
}

/// A tiny `Stream` over an mpsc receiver (no extra crate for one adapter).
mod tokio_stream {
    use std::pin::Pin;
    use std::task::{Context, Poll};

    pub struct Receiver<T>(pub tokio::sync::mpsc::Receiver<T>);

    impl<T> futures_util::Stream for Receiver<T> {
        type Item = T;
        fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<T>> {
            self.0.poll_recv(cx)
        }
    }
}

/// What one client saw: when each event's last byte arrived, bytes in all, and whether the body
/// ended cleanly.
struct Seen {
    arrivals: Vec<Instant>,
    bytes: u64,
    clean: bool,
}

/// GETs `path` from `addr` (delaying the head of an SSE answer is the upstream's business) and
/// notes when each SSE event completed.
async fn client(addr: SocketAddr, path: String) -> Result<Seen, BoxError> {
    let stream = TcpStream::connect(addr).await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let req = Request::get(path)
        .header("host", addr.to_string())
        .body(Empty::<Bytes>::new())?;
    let read = async {
        let resp = sender.send_request(req).await?;
        let mut body = resp.into_body();
        let mut seen = Seen {
            arrivals: Vec::new(),
            bytes: 0,
            clean: false,
        };
        let mut pending = 0usize;
        while let Some(frame) = body.frame().await {
            let Ok(frame) = frame else {
                return Ok::<_, BoxError>(seen);
            };
            if let Ok(data) = frame.into_data() {
                seen.bytes += data.len() as u64;
                // An event ends with a blank line.
                pending += data.windows(2).filter(|w| w == b"\n\n").count();
                while pending > 0 {
                    seen.arrivals.push(Instant::now());
                    pending -= 1;
                }
            }
        }
        seen.clean = true;
        Ok(seen)
    };
    tokio::time::timeout(CLIENT_LIMIT, read)
        .await
        .map_err(|_| BoxError::from("a client got no whole answer in time"))?
}

/// Delays of a class of clients against the upstream's writes.
struct Delays {
    /// Of the first event, one per client whose body was whole, sorted.
    first: Vec<f64>,
    /// Of the last event.
    last: Vec<f64>,
    /// Of each client's latest event, whichever it was (the first and last alone hide a tail
    /// that reads in bursts).
    worst: Vec<f64>,
    whole: usize,
}

impl Delays {
    fn of(seen: &[Seen], writes: &[Instant]) -> Delays {
        let mut d = Delays {
            first: Vec::new(),
            last: Vec::new(),
            worst: Vec::new(),
            whole: 0,
        };
        for s in seen {
            if s.clean && s.arrivals.len() == EVENTS && writes.len() == EVENTS {
                d.whole += 1;
                let each: Vec<f64> = s
                    .arrivals
                    .iter()
                    .zip(writes)
                    .map(|(got, wrote)| ms(got.saturating_duration_since(*wrote)))
                    .collect();
                d.first.push(each[0]);
                d.last.push(each[EVENTS - 1]);
                d.worst.push(each.iter().copied().fold(0.0, f64::max));
            }
        }
        for v in [&mut d.first, &mut d.last, &mut d.worst] {
            v.sort_by(f64::total_cmp);
        }
        d
    }

    /// One table row for `who`, of `requests` clients.
    fn row(&self, who: &str, requests: usize) -> String {
        format!(
            "| {who} | {requests} | {} | {} / {} | {} / {} | {} / {} |",
            self.whole,
            p(&self.first, 0.5),
            p(&self.first, 1.0),
            p(&self.last, 0.5),
            p(&self.last, 1.0),
            p(&self.worst, 0.5),
            p(&self.worst, 1.0)
        )
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn p(sorted: &[f64], q: f64) -> String {
    if sorted.is_empty() {
        return "-".to_owned();
    }
    let i = ((sorted.len() - 1) as f64 * q).round() as usize;
    format!("{:.1}", sorted[i.min(sorted.len() - 1)])
}

/// One SSE burst: a leader on `leader`, then `local` waiters on it and `remote` on `other`.
async fn sse_burst(
    leader: SocketAddr,
    others: &[(SocketAddr, usize)],
    path: &str,
) -> Result<(Seen, Vec<Vec<Seen>>), BoxError> {
    let first = tokio::spawn(client(leader, path.to_owned()));
    // The waiters come while the upstream prepares its head.
    tokio::time::sleep(HEAD_DELAY / 4).await;
    let mut classes = Vec::new();
    for (addr, n) in others {
        let handles: Vec<_> = (0..*n)
            .map(|_| tokio::spawn(client(*addr, path.to_owned())))
            .collect();
        classes.push(handles);
    }
    let leader_seen = first.await??;
    let mut out = Vec::new();
    for handles in classes {
        let mut seen = Vec::new();
        for h in handles {
            seen.push(h.await??);
        }
        out.push(seen);
    }
    Ok((leader_seen, out))
}

async fn run() -> Result<(), BoxError> {
    let big_mib: u64 = std::env::var("STREAM_BIG_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1024);
    let dir = tempfile::tempdir()?;
    let bin = std::env::var_os("CORRAL_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_corral")));
    println!("machine: {}; load {}", procs::machine(), procs::loadavg());
    let (up, writes) = upstream(big_mib * 1024 * 1024).await?;
    // The upstream's head comes HEAD_DELAY after the call: a slow model thinking first.
    let redis = RedisServer::start().await;
    let namespace = format!("stream-{}", std::process::id());
    let redis_url = redis.url();
    let settings = |name| CorralSettings {
        name,
        redis_url: &redis_url,
        namespace: &namespace,
        upstream: up,
        l1_max_bytes: "256MiB",
    };
    let a = Corral::start(&bin, dir.path(), &settings("a")).await?;
    let b = Corral::start(&bin, dir.path(), &settings("b")).await?;
    // Warm both instances' Redis connections.
    for addr in [a.addr, b.addr] {
        let _ = client(addr, "/recommend/warm".to_owned()).await;
    }

    // Row 1 and 2: SSE through Corral.
    let mut stats = redis.conn().await;
    redis.reset_stats().await;
    let net_before = net_input(&mut stats).await;
    let call = writes.lock().map(|w| w.events.len()).unwrap_or(0);
    let (leader, classes) =
        sse_burst(a.addr, &[(a.addr, 5), (b.addr, 5)], "/recommend/sse?r=1").await?;
    let commands = CommandStats::read(&mut stats, "corral").await;
    let net_after = net_input(&mut stats).await;
    let w = writes
        .lock()
        .map(|w| w.events.get(call).cloned().unwrap_or_default())
        .unwrap_or_default();
    let calls_after = writes.lock().map(|w| w.calls).unwrap_or(0);
    println!(
        "\nRow 1: SSE ({EVENTS} events, {} ms apart, head after {} ms)",
        EVENT_GAP.as_millis(),
        HEAD_DELAY.as_millis()
    );
    println!(
        "| who | requests | whole | first event, ms after the upstream wrote it (p50 / max) | last event, ms after (p50 / max) | latest event of each, ms after (p50 / max) |"
    );
    println!("|---|---|---|---|---|---|");
    let rows = [
        ("Corral leader (A)", std::slice::from_ref(&leader)),
        ("Corral waiters on A", classes[0].as_slice()),
        ("Corral waiters on B (remote)", classes[1].as_slice()),
    ];
    for (who, seen) in rows {
        println!("{}", Delays::of(seen, &w).row(who, seen.len()));
    }
    println!("upstream calls for the 11 requests: {}", calls_after - call);

    if let Some(varnishd) = procs::which("varnishd") {
        match Varnish::start(&varnishd, dir.path(), up) {
            Ok(varnish) => {
                let v = varnish.instances[0];
                let call = writes.lock().map(|w| w.events.len()).unwrap_or(0);
                let (leader, classes) =
                    sse_burst(v, &[(v, 10)], "/recommend/sse?r=varnish").await?;
                let w = writes
                    .lock()
                    .map(|w| w.events.get(call).cloned().unwrap_or_default())
                    .unwrap_or_default();
                for (who, seen) in [
                    ("Varnish leader", std::slice::from_ref(&leader)),
                    ("Varnish waiters", classes[0].as_slice()),
                ] {
                    println!("{}", Delays::of(seen, &w).row(who, seen.len()));
                }
                let calls = writes.lock().map(|w| w.calls).unwrap_or(0);
                println!(
                    "Varnish upstream calls for the 11 requests: {}",
                    calls - call
                );
            }
            Err(err) => println!("varnishd did not start: {err}"),
        }
    } else {
        println!("varnishd: not installed (benches/peers-setup.sh installs it): no Varnish rows");
    }

    println!("\nRow 2: Redis work of that streamed fill (3 KiB of events over 2 s)");
    let mut names: Vec<_> = commands.all().iter().filter(|(_, n)| **n > 0).collect();
    names.sort();
    let total: u64 = names.iter().map(|(_, n)| **n).sum();
    let list: Vec<String> = names.iter().map(|(c, n)| format!("{c} {n}")).collect();
    println!(
        "commands: {total} ({}); bytes received by Redis: {}",
        list.join(", "),
        net_after.saturating_sub(net_before)
    );

    // Row 3: a large answer to 10 requesters.
    let pid = a.pid();
    let (rss_before, _) = procs::rss(pid).unwrap_or((0, 0));
    let calls_before = writes.lock().map(|w| w.calls).unwrap_or(0);
    let started = Instant::now();
    let handles: Vec<_> = (0..10)
        .map(|_| tokio::spawn(client(a.addr, "/recommend/big?r=1".to_owned())))
        .collect();
    let mut got = Vec::new();
    for h in handles {
        got.push(h.await??);
    }
    let took = started.elapsed();
    let (_, peak) = procs::rss(pid).unwrap_or((0, 0));
    let calls = writes.lock().map(|w| w.calls).unwrap_or(0) - calls_before;
    let whole = got
        .iter()
        .filter(|s| s.clean && s.bytes == big_mib * 1024 * 1024)
        .count();
    println!(
        "\nRow 3: {big_mib} MiB answer (over max_entry_size) to 10 concurrent requesters on one instance"
    );
    println!(
        "upstream calls {calls}; whole bodies {whole}/10; wall {:.1} s; RSS before {} MiB, peak {} MiB",
        took.as_secs_f64(),
        rss_before / (1024 * 1024),
        peak / (1024 * 1024)
    );
    drop((a, b));
    Ok(())
}

async fn net_input(conn: &mut redis::aio::MultiplexedConnection) -> u64 {
    let info: String = redis::cmd("INFO")
        .arg("stats")
        .query_async(conn)
        .await
        .unwrap_or_default();
    info.lines()
        .find_map(|l| l.strip_prefix("total_net_input_bytes:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}
