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
use comfy_table::presets::UTF8_FULL_CONDENSED;
use comfy_table::{Attribute, Cell, CellAlignment, Table};
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

pub use fleet_redis::Cleanup;
use fleet_redis::DemoRedis;

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

/// What the burst showed.
#[derive(Debug)]
pub struct DemoReport {
    /// Requests sent in the burst, all at once.
    pub requests: usize,
    /// Corral instances the burst was spread over (round robin).
    pub instances: usize,
    /// Calls that reached the built-in backend: 1 when the stampede was absorbed.
    pub backend_calls: u64,
    /// Requests answered `200`.
    pub ok: usize,
    pub p50: Duration,
    pub p90: Duration,
    pub p99: Duration,
    /// The slowest request of the burst.
    pub max: Duration,
    /// From the first request sent to the last answer received.
    pub wall: Duration,
    /// `Cache-Status` values (without the `corral; ` prefix) and how many answers carried each.
    pub outcomes: BTreeMap<String, usize>,
    /// With `--redis`: what became of the demo's keys there.
    pub cleanup: Option<Cleanup>,
}

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

/// Prints the two summary tables and the verdict. comfy-table styles cells only when stdout is a
/// terminal, so a piped or redirected summary carries no escape codes.
fn print_report(args: &DemoArgs, r: &DemoReport) {
    println!("corral demo — a burst of identical requests against a slow backend");
    println!();
    println!("Burst");
    println!("{}", burst_table(args, r));
    println!();
    println!("Cache-Status");
    println!("{}", cache_status_table(r));
    println!();
    println!("{}", verdict(r));
    if let Some(note) = late_note(r) {
        println!("{note}");
    }
    if let Some(cleanup) = &r.cleanup {
        println!("{}", cleanup_line(cleanup));
    }
}

/// Why some answers of a simultaneous burst are plain hits: the requests were sent with the
/// others but reached Corral only after the fill was stored.
fn late_note(r: &DemoReport) -> Option<String> {
    let late = r.outcomes.get("hit").copied().unwrap_or(0);
    (late > 0).then(|| {
        format!(
            "{} sent with the burst reached Corral only after the answer was stored (the \
             machine was still taking the burst in); they were answered from the cache.",
            plural(late as u64, "request")
        )
    })
}

/// What became of the demo's keys in the user's Redis.
fn cleanup_line(cleanup: &Cleanup) -> String {
    match cleanup {
        Cleanup::Removed { namespace, keys } => format!(
            "Redis: removed the demo's {} (corral:{namespace}:*).",
            plural(*keys as u64, "key")
        ),
        Cleanup::Left { namespace, error } => format!(
            "Redis: could not remove the demo's keys (corral:{namespace}:*): {error}; \
             they expire within 60 s."
        ),
    }
}

/// What a `Cache-Status` value (without `corral; `) says about a request of the burst.
fn meaning(value: &str) -> &'static str {
    match value {
        "fwd=miss; stored" => "called the backend; its answer was stored",
        "fwd=miss; collapsed" => "waited for that call and shared its answer",
        "hit" => "reached Corral after the answer was stored: read from the cache",
        "hit; detail=stale" => "answered from a stale entry while it was refreshed",
        "fwd=miss" => "called the backend; the answer was not stored",
        "fwd=stale; stored" => "revalidated the expired entry with the backend (304) and stored it",
        "fwd=bypass" => "went to the backend without the cache",
        v if v.starts_with("no answer") => "the request failed before an answer",
        _ => "",
    }
}

fn burst_table(args: &DemoArgs, r: &DemoReport) -> Table {
    let mode = match &args.redis {
        Some(url) => format!("fleet ({} instances, redis {url})", r.instances),
        None => format!(
            "embedded ({}, no redis)",
            plural(r.instances as u64, "instance")
        ),
    };
    let rows = [
        ("mode", mode),
        (
            "backend latency",
            format!(
                "{} per call",
                humantime::format_duration(args.backend_delay)
            ),
        ),
        ("requests", r.requests.to_string()),
        ("answered 200", r.ok.to_string()),
        ("backend calls", r.backend_calls.to_string()),
        ("latency p50", format!("{:.1?}", r.p50)),
        ("latency p90", format!("{:.1?}", r.p90)),
        ("latency p99", format!("{:.1?}", r.p99)),
        ("latency max", format!("{:.1?}", r.max)),
        ("wall time (all sent at once)", format!("{:.1?}", r.wall)),
    ];
    let mut table = new_table();
    for (name, value) in rows {
        table.add_row([
            Cell::new(name).add_attribute(Attribute::Bold),
            Cell::new(value),
        ]);
    }
    table
}

fn cache_status_table(r: &DemoReport) -> Table {
    let mut table = new_table();
    table.set_header(
        ["value", "count", "share", "meaning"].map(|h| Cell::new(h).add_attribute(Attribute::Bold)),
    );
    // Most frequent first; ties keep the map's (alphabetical) order.
    let mut outcomes: Vec<_> = r.outcomes.iter().collect();
    outcomes.sort_by(|a, b| b.1.cmp(a.1));
    let total = r.requests.max(1) as f64;
    for (value, count) in outcomes {
        table.add_row([
            Cell::new(value),
            Cell::new(count).set_alignment(CellAlignment::Right),
            Cell::new(format!("{:.1} %", *count as f64 * 100.0 / total))
                .set_alignment(CellAlignment::Right),
            Cell::new(meaning(value)),
        ]);
    }
    table
}

fn new_table() -> Table {
    let mut table = Table::new();
    table.load_style(UTF8_FULL_CONDENSED);
    table
}

/// One line saying whether the stampede was absorbed: at most one backend call per key for the
/// fleet (or per instance, when the instances share no Redis).
fn verdict(r: &DemoReport) -> String {
    let calls = plural(r.backend_calls, "backend call");
    let head = format!("{}, {calls}", plural(r.requests as u64, "request"));
    let instances = r.instances as u64;
    let mut line = match r.backend_calls {
        0 => format!("{head}: nothing reached the backend."),
        1 => format!("{head}: the stampede was absorbed."),
        n if n <= instances => format!(
            "{head} across {}: at most one per instance, the stampede was absorbed per instance.",
            plural(instances, "instance")
        ),
        _ => format!("{head}: more than one per instance, the stampede got through."),
    };
    let failed = r.requests.saturating_sub(r.ok);
    if failed > 0 {
        line.push_str(&format!(
            " {} did not answer 200.",
            plural(failed as u64, "request")
        ));
    }
    line
}

fn plural(n: u64, noun: &str) -> String {
    if n == 1 {
        format!("1 {noun}")
    } else {
        format!("{n} {noun}s")
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use corral::outcome::CacheOutcome;

    fn report(requests: usize, instances: usize, backend_calls: u64, ok: usize) -> DemoReport {
        DemoReport {
            requests,
            instances,
            backend_calls,
            ok,
            p50: Duration::ZERO,
            p90: Duration::ZERO,
            p99: Duration::ZERO,
            max: Duration::ZERO,
            wall: Duration::ZERO,
            outcomes: BTreeMap::new(),
            cleanup: None,
        }
    }

    #[test]
    fn late_arrivals_are_explained_and_every_outcome_has_a_meaning() {
        let mut r = report(5000, 3, 1, 5000);
        assert_eq!(late_note(&r), None);
        r.outcomes.insert("hit".to_owned(), 1700);
        let note = late_note(&r).expect("hits are explained");
        assert!(note.starts_with("1700 requests sent with the burst reached Corral only after"));
        for value in CacheOutcome::ALL.map(|o| o.cache_status(Some(1), http::StatusCode::OK)) {
            let value = cache_status_kind(value.to_str().unwrap_or(""));
            if value != "fwd=uri-miss" {
                assert!(!meaning(&value).is_empty(), "{value}");
            }
        }
    }

    #[test]
    fn verdict_says_whether_the_stampede_was_absorbed() {
        assert_eq!(
            verdict(&report(1000, 1, 1, 1000)),
            "1000 requests, 1 backend call: the stampede was absorbed."
        );
        assert_eq!(
            verdict(&report(900, 3, 3, 900)),
            "900 requests, 3 backend calls across 3 instances: at most one per instance, \
             the stampede was absorbed per instance."
        );
        assert_eq!(
            verdict(&report(1000, 1, 7, 998)),
            "1000 requests, 7 backend calls: more than one per instance, the stampede got \
             through. 2 requests did not answer 200."
        );
    }
}
