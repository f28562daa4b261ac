//! Load generation: bursts on pre-opened connections, bounded keyed loads on a pooled client,
//! and hit throughput with `wrk` (or, without it, an in-process loop). Every loop is bounded in
//! count and in time.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::future::join_all;
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1::SendRequest;
use hyper::{Request, Response, body::Incoming};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;

use crate::procs::BoxError;

/// No single request may take longer than this.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Connections opened at once, so listen backlogs never overflow (a dropped SYN costs 1 s).
const CONNECT_BATCH: usize = 100;

/// One answered request.
#[derive(Debug, Clone)]
pub struct Answer {
    /// The instance that answered.
    pub target: Option<SocketAddr>,
    pub status: u16,
    pub cache_status: Option<String>,
    pub finished: Instant,
}

/// An open HTTP/1.1 connection to one target.
pub struct Conn {
    addr: SocketAddr,
    sender: SendRequest<Empty<Bytes>>,
}

impl Conn {
    pub async fn open(addr: SocketAddr) -> Result<Conn, BoxError> {
        let stream = tokio::time::timeout(REQUEST_TIMEOUT, TcpStream::connect(addr)).await??;
        stream.set_nodelay(true)?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(Conn { addr, sender })
    }

    /// GET `path` (origin form, with query), read the whole body.
    pub async fn get(&mut self, path: &str) -> Result<Answer, BoxError> {
        let req = Request::get(path)
            .header("host", self.addr.to_string())
            .body(Empty::<Bytes>::new())?;
        let target = self.addr;
        let sender = &mut self.sender;
        tokio::time::timeout(REQUEST_TIMEOUT, async move {
            sender.ready().await?;
            let response = sender.send_request(req).await?;
            read(response, Some(target)).await
        })
        .await?
    }
}

async fn read(
    response: Response<Incoming>,
    target: Option<SocketAddr>,
) -> Result<Answer, BoxError> {
    let status = response.status().as_u16();
    let cache_status = response
        .headers()
        .get("cache-status")
        .and_then(|v| v.to_str().ok())
        // The kind of answer, without the per-answer `ttl` and `fwd-status`.
        .map(corral::outcome::cache_status_kind);
    response.into_body().collect().await?;
    Ok(Answer {
        target,
        status,
        cache_status,
        finished: Instant::now(),
    })
}

/// Opens `n` connections spread round-robin over `targets`.
pub async fn open_many(targets: &[SocketAddr], n: usize) -> Result<Vec<Conn>, BoxError> {
    let mut conns = Vec::with_capacity(n);
    let mut i = 0;
    while i < n {
        let batch = (i..(i + CONNECT_BATCH).min(n)).map(|j| Conn::open(targets[j % targets.len()]));
        for conn in join_all(batch).await {
            conns.push(conn?);
        }
        i += CONNECT_BATCH;
    }
    Ok(conns)
}

/// What a burst saw.
pub struct Burst {
    /// When the first request was sent.
    pub started: Instant,
    pub answers: Vec<Answer>,
    pub errors: usize,
}

/// Opens one connection per request (spread over `targets`), then sends every request at once.
pub async fn burst(targets: &[SocketAddr], n: usize, path: &str) -> Result<Burst, BoxError> {
    let conns = open_many(targets, n).await?;
    let started = Instant::now();
    let tasks: Vec<_> = conns
        .into_iter()
        .map(|mut conn| {
            let path = path.to_owned();
            tokio::spawn(async move { conn.get(&path).await })
        })
        .collect();
    let mut answers = Vec::with_capacity(n);
    let mut errors = 0;
    for task in tasks {
        match task.await {
            Ok(Ok(answer)) => answers.push(answer),
            _ => errors += 1,
        }
    }
    Ok(Burst {
        started,
        answers,
        errors,
    })
}

/// A pooled keep-alive client for keyed loads.
pub type Pool = Client<HttpConnector, Empty<Bytes>>;

pub fn pool() -> Pool {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(1024)
        .build(connector)
}

/// One GET on the pool.
pub async fn pooled_get(pool: &Pool, url: &str) -> Result<Answer, BoxError> {
    let uri: hyper::Uri = url.parse()?;
    let target = uri.authority().and_then(|a| a.as_str().parse().ok());
    tokio::time::timeout(REQUEST_TIMEOUT, async {
        let response = pool.get(uri).await?;
        read(response, target).await
    })
    .await?
}

/// What a keyed load saw.
#[derive(Debug, Default)]
pub struct Keyed {
    pub keys_done: usize,
    pub ok: u64,
    pub not_ok: u64,
    pub errors: u64,
    pub elapsed: Duration,
    /// True when the time bound stopped it before every key was done.
    pub truncated: bool,
}

/// For each key `0..keys`, sends `per_key` concurrent GETs (`url(key, j)`, where `j` also picks
/// the target); `concurrency` keys are in flight at once. Stops early at `deadline`.
pub async fn keyed<F>(
    pool: &Pool,
    keys: usize,
    per_key: usize,
    concurrency: usize,
    deadline: Duration,
    url: F,
) -> Keyed
where
    F: Fn(usize, usize) -> String + Send + Sync + 'static,
{
    let url = Arc::new(url);
    let next = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicUsize::new(0));
    let ok = Arc::new(AtomicU64::new(0));
    let not_ok = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let stop_at = started + deadline;
    let workers: Vec<_> = (0..concurrency)
        .map(|_| {
            let (pool, url, next, done) = (pool.clone(), url.clone(), next.clone(), done.clone());
            let (ok, not_ok, errors) = (ok.clone(), not_ok.clone(), errors.clone());
            tokio::spawn(async move {
                loop {
                    let key = next.fetch_add(1, Ordering::Relaxed);
                    if key >= keys || Instant::now() >= stop_at {
                        break;
                    }
                    let requests = (0..per_key).map(|j| {
                        let target = url(key, j);
                        let pool = &pool;
                        async move { pooled_get(pool, &target).await }
                    });
                    for answer in join_all(requests).await {
                        match answer {
                            Ok(a) if a.status == 200 => ok.fetch_add(1, Ordering::Relaxed),
                            Ok(_) => not_ok.fetch_add(1, Ordering::Relaxed),
                            Err(_) => errors.fetch_add(1, Ordering::Relaxed),
                        };
                    }
                    done.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    for worker in workers {
        let _ = worker.await;
    }
    let keys_done = done.load(Ordering::Relaxed);
    Keyed {
        keys_done,
        ok: ok.load(Ordering::Relaxed),
        not_ok: not_ok.load(Ordering::Relaxed),
        errors: errors.load(Ordering::Relaxed),
        elapsed: started.elapsed(),
        truncated: keys_done < keys,
    }
}

/// A hit-throughput figure and the tool that produced it.
#[derive(Debug, Clone)]
pub struct Throughput {
    pub rps: f64,
    pub tool: String,
    /// Non-200 answers or socket errors seen, if any.
    pub problems: Option<String>,
}

/// Requests per second of GET `url` with `conns` connections for `secs`: `wrk -t1` if installed,
/// else an in-process loop (bounded in time and count).
pub async fn throughput(
    addr: SocketAddr,
    path: &str,
    conns: usize,
    secs: u64,
) -> Result<Throughput, BoxError> {
    let wrk = crate::procs::which("wrk").filter(|_| std::env::var_os("STAMPEDE_NO_WRK").is_none());
    match wrk {
        Some(wrk) => run_wrk(&wrk, addr, path, conns, secs).await,
        None => in_process(addr, path, conns, secs).await,
    }
}

async fn run_wrk(
    wrk: &std::path::Path,
    addr: SocketAddr,
    path: &str,
    conns: usize,
    secs: u64,
) -> Result<Throughput, BoxError> {
    let url = format!("http://{addr}{path}");
    let mut command = tokio::process::Command::new(wrk);
    command
        .args(["-t1", &format!("-c{conns}"), &format!("-d{secs}s"), &url])
        .kill_on_drop(true);
    let output = tokio::time::timeout(Duration::from_secs(secs + 30), command.output()).await??;
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    let rps = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .ok_or_else(|| {
            format!(
                "wrk printed no Requests/sec:\n{text}{}",
                String::from_utf8_lossy(&output.stderr)
            )
        })?;
    let problems: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("Non-2xx") || l.starts_with("Socket errors"))
        .collect();
    Ok(Throughput {
        rps,
        tool: format!("wrk -t1 -c{conns} -d{secs}s"),
        problems: (!problems.is_empty()).then(|| problems.join("; ")),
    })
}

async fn in_process(
    addr: SocketAddr,
    path: &str,
    conns: usize,
    secs: u64,
) -> Result<Throughput, BoxError> {
    const MAX_REQUESTS_PER_CONN: u64 = 10_000_000;
    let targets = vec![addr; conns];
    let opened = open_many(&targets, conns).await?;
    let started = Instant::now();
    let stop_at = started + Duration::from_secs(secs);
    let tasks: Vec<_> = opened
        .into_iter()
        .map(|mut conn| {
            let path = path.to_owned();
            tokio::spawn(async move {
                let (mut ok, mut bad) = (0_u64, 0_u64);
                while Instant::now() < stop_at && ok + bad < MAX_REQUESTS_PER_CONN {
                    match conn.get(&path).await {
                        Ok(a) if a.status == 200 => ok += 1,
                        Ok(_) => bad += 1,
                        Err(_) => {
                            bad += 1;
                            break;
                        }
                    }
                }
                (ok, bad)
            })
        })
        .collect();
    let (mut ok, mut bad) = (0, 0);
    for task in tasks {
        if let Ok((o, b)) = task.await {
            ok += o;
            bad += b;
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    Ok(Throughput {
        rps: ok as f64 / elapsed,
        tool: format!("in-process hyper loop, {conns} connections, {secs}s (not wrk)"),
        problems: (bad > 0).then(|| format!("{bad} non-200 or failed")),
    })
}
