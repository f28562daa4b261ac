//! `corral demo`: the job Corral exists for, on one machine with nothing else installed.
//!
//! A built-in backend stands in for the AI model (one second per call, counting its calls). Corral
//! instances sit in front of it — one in embedded mode, or several sharing a Redis given with
//! `--redis` — and a burst of identical concurrent requests hits them. The summary shows how many
//! reached the backend.

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
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use indicatif::{ProgressBar, ProgressStyle};
use tokio::net::TcpListener;

use crate::config::Config;
use crate::server::Instance;

/// Options of `corral demo`.
#[derive(Debug, Clone, clap::Args)]
pub struct DemoArgs {
    /// Concurrent identical requests in the burst.
    #[arg(long, default_value_t = 1000)]
    pub requests: usize,
    /// How long the built-in backend takes per call.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    pub backend_delay: Duration,
    /// Share fills across instances through this Redis (fleet mode).
    #[arg(long)]
    pub redis: Option<String>,
    /// Corral instances (default: 1 embedded, 3 with --redis).
    #[arg(long)]
    pub instances: Option<usize>,
}

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
}

/// Runs the demo and prints its summary.
pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    let report = burst(&args).await?;
    print_report(&args, &report);
    Ok(())
}

/// Runs the burst and returns what it showed.
pub async fn burst(args: &DemoArgs) -> anyhow::Result<DemoReport> {
    let backend = Backend::start(args.backend_delay).await?;
    let instances = args
        .instances
        .unwrap_or(if args.redis.is_some() { 3 } else { 1 })
        .max(1);
    let config = demo_config(backend.addr, args.redis.as_deref())?;
    let mut fleet = Vec::with_capacity(instances);
    for _ in 0..instances {
        fleet.push(Instance::start(&config).await.context("starting corral")?);
    }
    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(args.requests.max(1))
        .build_http();
    let bar = ProgressBar::new(args.requests as u64);
    bar.set_style(
        ProgressStyle::with_template("{spinner} {bar:40} {pos}/{len} answered  {elapsed}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let burst_started = Instant::now();
    let mut tasks = Vec::with_capacity(args.requests);
    for i in 0..args.requests {
        let uri: hyper::Uri = format!(
            "http://{}/recommend?article=42&segment=sports",
            fleet[i % instances].addr()
        )
        .parse()
        .context("demo URL")?;
        let client = client.clone();
        let bar = bar.clone();
        tasks.push(tokio::spawn(async move {
            let started = Instant::now();
            let answer = tokio::time::timeout(Duration::from_secs(60), client.get(uri)).await;
            let result = match answer {
                Ok(Ok(resp)) => {
                    let status = resp.status().as_u16();
                    let outcome = resp
                        .headers()
                        .get("cache-status")
                        .and_then(|v| v.to_str().ok())
                        .map_or_else(|| "none".to_owned(), outcome_kind);
                    let _ = resp.into_body().collect().await;
                    (status, outcome)
                }
                _ => (0, "transport error".to_owned()),
            };
            bar.inc(1);
            (started.elapsed(), result)
        }));
    }
    let mut latencies = Vec::with_capacity(args.requests);
    let mut outcomes = BTreeMap::new();
    let mut ok = 0;
    for task in tasks {
        let (latency, (status, outcome)) = task.await.context("a demo request panicked")?;
        latencies.push(latency);
        if status == 200 {
            ok += 1;
        }
        *outcomes.entry(outcome).or_insert(0) += 1;
    }
    let wall = burst_started.elapsed();
    bar.finish_and_clear();
    latencies.sort();
    let pick = |q: f64| {
        latencies
            .get(((latencies.len() as f64 - 1.0) * q).round() as usize)
            .copied()
            .unwrap_or_default()
    };
    let report = DemoReport {
        requests: args.requests,
        instances,
        backend_calls: backend.calls.load(Ordering::SeqCst),
        ok,
        p50: pick(0.50),
        p90: pick(0.90),
        p99: pick(0.99),
        max: latencies.last().copied().unwrap_or_default(),
        wall,
        outcomes,
    };
    for instance in fleet {
        instance.shutdown().await;
    }
    Ok(report)
}

fn demo_config(backend: SocketAddr, redis: Option<&str>) -> anyhow::Result<Config> {
    let redis_table = match redis {
        Some(url) => format!(
            "[redis]\nurl = \"{url}\"\nnamespace = \"demo-{}\"\ntimeout = \"200ms\"\n",
            rand::random::<u32>()
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
        ("wall time", format!("{:.1?}", r.wall)),
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
        ["value", "count", "share"].map(|h| Cell::new(h).add_attribute(Attribute::Bold)),
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
                let service = service_fn(move |_req| {
                    let n = counter.fetch_add(1, Ordering::SeqCst) + 1;
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

/// A `Cache-Status` value without the cache's name and the per-answer numbers (`ttl`,
/// `fwd-status`), so the demo's table counts kinds of answers.
pub fn outcome_kind(value: &str) -> String {
    value
        .split(';')
        .map(str::trim)
        .filter(|p| *p != "corral" && !p.starts_with("ttl=") && !p.starts_with("fwd-status="))
        .collect::<Vec<_>>()
        .join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcome_kinds_drop_the_per_answer_numbers() {
        let cases = [
            ("corral; hit; ttl=59", "hit"),
            ("corral; hit; ttl=-2; detail=stale", "hit; detail=stale"),
            (
                "corral; fwd=miss; fwd-status=200; collapsed",
                "fwd=miss; collapsed",
            ),
            ("corral; fwd=bypass", "fwd=bypass"),
        ];
        for (value, kind) in cases {
            assert_eq!(outcome_kind(value), kind);
        }
    }

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
