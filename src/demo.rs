//! `corral demo`: the job Corral exists for, on one machine with nothing else installed.
//!
//! A module of the `corral` binary (declared in `main.rs`), not of the library: it drives the
//! library from outside, as a user would, and its command line, tables and progress bars
//! (`clap`, `comfy-table`, `indicatif`) stay out of the library.
//!
//! A built-in backend stands in for the AI model (one second per call, counting its calls). Corral
//! instances sit in front of it — one in embedded mode, or several sharing a Redis given with
//! `--redis` — and a burst of identical concurrent requests hits them. The summary shows how many
//! reached the backend.
//!
//! The burst is simultaneous: every request first opens its own connection, and all of them are
//! sent together once every connection is open, so the numbers show coalescing rather than how
//! fast connections open. A `--redis` is checked before anything starts (an unreachable one is an
//! error, not a "fleet" that never shared anything), and the demo's keys are removed from it at
//! the end.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper::client::conn::http1::SendRequest;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Barrier;

use corral::config::Config;
use corral::outcome::cache_status_kind;
use corral::server::Instance;

mod fleet_redis;
mod report;

pub use fleet_redis::Cleanup;
use fleet_redis::DemoRedis;
pub use report::DemoReport;
use report::print_report;

/// Options of `corral demo`.
#[derive(Debug, Clone, clap::Args)]
pub struct DemoArgs {
    /// Concurrent identical requests in the burst (at least 1).
    #[arg(long, default_value_t = 1000, value_parser = at_least_one)]
    pub requests: usize,
    /// How long the built-in backend takes per call.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    pub backend_delay: Duration,
    /// Share fills across instances through this Redis (fleet mode).
    #[arg(long)]
    pub redis: Option<String>,
    /// Corral instances (default: 1 embedded, 3 with --redis).
    #[arg(long, value_parser = at_least_one)]
    pub instances: Option<usize>,
}

/// A count of at least one, for `--requests` and `--instances`.
fn at_least_one(text: &str) -> Result<usize, String> {
    match text.parse::<usize>() {
        Ok(0) => Err("must be at least 1".to_owned()),
        Ok(n) => Ok(n),
        Err(_) => Err("must be a whole number, at least 1".to_owned()),
    }
}

/// How long one demo request may take to connect.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one demo request may take to be answered once sent.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(60);

/// Runs the demo and prints its summary.
pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    let report = burst(&args).await?;
    print_report(&args, &report);
    Ok(())
}

/// Runs the burst and returns what it showed.
pub async fn burst(args: &DemoArgs) -> anyhow::Result<DemoReport> {
    let mut redis = match &args.redis {
        Some(url) => Some(DemoRedis::connect(url).await?),
        None => None,
    };
    let backend = Backend::start(args.backend_delay).await?;
    let instances = args
        .instances
        .unwrap_or(if args.redis.is_some() { 3 } else { 1 })
        .max(1);
    let config = demo_config(backend.addr, redis.as_ref())?;
    let mut fleet = Vec::with_capacity(instances);
    for _ in 0..instances {
        fleet.push(Instance::start(&config).await.context("starting corral")?);
    }
    let addrs: Vec<SocketAddr> = fleet.iter().map(Instance::addr).collect();
    if redis.is_some() {
        warm_up(&addrs).await?;
    }
    let (latencies, outcomes, wall) = send_burst(args, &addrs).await?;
    let ok = latencies.ok;
    for instance in fleet {
        instance.shutdown().await;
    }
    let cleanup = match redis.as_mut() {
        Some(redis) => Some(redis.clean().await),
        None => None,
    };
    let mut sorted = latencies.all;
    sorted.sort();
    let pick = |q: f64| {
        sorted
            .get(((sorted.len() as f64 - 1.0) * q).round() as usize)
            .copied()
            .unwrap_or_default()
    };
    Ok(DemoReport {
        requests: args.requests,
        instances,
        backend_calls: backend.calls.load(Ordering::SeqCst),
        ok,
        p50: pick(0.50),
        p90: pick(0.90),
        p99: pick(0.99),
        max: sorted.last().copied().unwrap_or_default(),
        wall,
        outcomes,
        cleanup,
    })
}

/// The latency of every request, and how many were answered 200.
struct Latencies {
    all: Vec<Duration>,
    ok: usize,
}

/// Opens one connection per request (spread round robin over `addrs`), then sends every request
/// at once. Returns the latencies (from sending), the `Cache-Status` counts and the time from the
/// send to the last answer. Progress goes to stderr when it is a terminal.
async fn send_burst(
    args: &DemoArgs,
    addrs: &[SocketAddr],
) -> anyhow::Result<(Latencies, BTreeMap<String, usize>, Duration)> {
    let requests = args.requests;
    let connecting = ProgressBar::new(requests as u64);
    connecting.set_style(style(
        "{spinner} {bar:40} {pos}/{len} connections open  {elapsed}",
    ));
    connecting.enable_steady_tick(Duration::from_millis(100));
    // Drawn only once the burst is sent; answers that come before are counted all the same.
    let answered =
        ProgressBar::with_draw_target(Some(requests as u64), ProgressDrawTarget::hidden());
    answered.set_style(style(
        "{spinner} {bar:40} {pos}/{len} answered  {elapsed}  {msg}",
    ));
    let start = Arc::new(Barrier::new(requests + 1));
    let mut tasks = Vec::with_capacity(requests);
    for i in 0..requests {
        let addr = addrs[i % addrs.len()];
        let (connecting, answered, start) = (connecting.clone(), answered.clone(), start.clone());
        tasks.push(tokio::spawn(async move {
            let sender = connect(addr).await;
            connecting.inc(1);
            // Every task reaches the barrier, connected or not, so the burst cannot wedge.
            start.wait().await;
            let started = Instant::now();
            let result = match sender {
                Ok(sender) => ask(sender, addr, BURST_PATH).await,
                Err(why) => (0, format!("no answer ({why})")),
            };
            answered.inc(1);
            (started.elapsed(), result)
        }));
    }
    start.wait().await;
    let burst_started = Instant::now();
    connecting.finish_and_clear();
    answered.set_draw_target(ProgressDrawTarget::stderr());
    answered.set_message(format!(
        "all sent; the backend takes {} per call",
        humantime::format_duration(args.backend_delay)
    ));
    answered.enable_steady_tick(Duration::from_millis(100));
    let mut latencies = Latencies {
        all: Vec::with_capacity(requests),
        ok: 0,
    };
    let mut outcomes = BTreeMap::new();
    for task in tasks {
        let (latency, (status, outcome)) = task.await.context("a demo request panicked")?;
        latencies.all.push(latency);
        if status == 200 {
            latencies.ok += 1;
        }
        *outcomes.entry(outcome).or_insert(0) += 1;
    }
    let wall = burst_started.elapsed();
    answered.finish_and_clear();
    Ok((latencies, outcomes, wall))
}

fn style(template: &str) -> ProgressStyle {
    ProgressStyle::with_template(template).unwrap_or_else(|_| ProgressStyle::default_bar())
}

/// The `segment` of the warm-up request, which the backend does not count.
const WARM_UP: &str = "segment=warm-up";

/// One request per instance on a key of its own, before the burst: each instance opens its Redis
/// connections (they are opened lazily, on first use) while nothing else runs, so the burst
/// measures coalescing and not connection set-up. The backend does not count these calls.
async fn warm_up(addrs: &[SocketAddr]) -> anyhow::Result<()> {
    for (i, addr) in addrs.iter().enumerate() {
        let sender = connect(*addr)
            .await
            .map_err(|why| anyhow::anyhow!("warming up instance {}: {why}", i + 1))?;
        let path = format!("/recommend?article={i}&{WARM_UP}");
        let (status, _) = ask(sender, *addr, &path).await;
        if status != 200 {
            anyhow::bail!("warming up instance {}: answered {status}", i + 1);
        }
    }
    Ok(())
}

/// The path and query of every request of the burst: one key.
const BURST_PATH: &str = "/recommend?article=42&segment=sports";

/// One HTTP/1.1 connection to a Corral instance.
async fn connect(addr: SocketAddr) -> Result<SendRequest<Empty<Bytes>>, String> {
    let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr))
        .await
        .map_err(|_| "connect timed out".to_owned())?
        .map_err(|e| format!("connect: {e}"))?;
    let _ = stream.set_nodelay(true);
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    tokio::spawn(conn);
    Ok(sender)
}

/// Sends the demo request; returns its status and `Cache-Status` (without `corral; `).
async fn ask(mut sender: SendRequest<Empty<Bytes>>, addr: SocketAddr, path: &str) -> (u16, String) {
    let request = hyper::Request::get(path)
        .header(hyper::header::HOST, addr.to_string())
        .body(Empty::new());
    let Ok(request) = request else {
        return (0, "no answer (bad request)".to_owned());
    };
    match tokio::time::timeout(ANSWER_TIMEOUT, sender.send_request(request)).await {
        Ok(Ok(resp)) => {
            let status = resp.status().as_u16();
            let outcome = resp
                .headers()
                .get("cache-status")
                .and_then(|v| v.to_str().ok())
                .map_or_else(|| "none".to_owned(), cache_status_kind);
            let _ = resp.into_body().collect().await;
            (status, outcome)
        }
        Ok(Err(err)) => (0, format!("no answer ({err})")),
        Err(_) => (0, "no answer (timed out)".to_owned()),
    }
}

fn demo_config(backend: SocketAddr, redis: Option<&DemoRedis>) -> anyhow::Result<Config> {
    // A Redis budget of 1s rather than the usual 50ms: the load generator, every instance and the
    // backend share one runtime and the machine's cores, so a Redis answer can wait for a CPU
    // while the burst is taken in, which is not the Redis outage the budget is there to detect.
    let redis_table = match redis {
        Some(redis) => format!(
            "[redis]\nurl = \"{}\"\nnamespace = \"{}\"\ntimeout = \"1s\"\n",
            redis.url, redis.namespace
        ),
        None => String::new(),
    };
    let text = format!(
        r#"
[server]
listen = "127.0.0.1:0"
shutdown_timeout = "2s"

{redis_table}
[[route]]
name = "recommend"
path_prefix = "/recommend"
upstream = "http://{backend}"
ttl = "60s"
key = {{ query = ["segment", "article"] }}
lock = {{ lease = "5s", wait_timeout = "10s" }}
"#
    );
    Ok(Config::parse(&text, std::path::Path::new("<demo>"))?)
}

/// The stand-in for the expensive model: slow, and counting.
struct Backend {
    addr: SocketAddr,
    calls: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Backend {
    async fn start(delay: Duration) -> anyhow::Result<Backend> {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .context("binding the demo backend")?;
        let addr = listener.local_addr()?;
        let calls = Arc::new(AtomicU64::new(0));
        let counter = calls.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let counter = counter.clone();
                let service = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    // The warm-up is not part of the burst: it is not counted.
                    let warm_up = req.uri().query().is_some_and(|q| q.contains(WARM_UP));
                    let n = if warm_up {
                        0
                    } else {
                        counter.fetch_add(1, Ordering::SeqCst) + 1
                    };
                    async move {
                        tokio::time::sleep(delay).await;
                        let body = format!(r#"{{"ad":"running-shoes","computed_by_call":{n}}}"#);
                        Ok::<_, Infallible>(
                            hyper::Response::builder()
                                .header("content-type", "application/json")
                                .body(Full::new(Bytes::from(body)))
                                .unwrap_or_default(),
                        )
                    }
                });
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service),
                );
            }
        });
        Ok(Backend { addr, calls, task })
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}
