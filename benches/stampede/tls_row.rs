//! Row 10 (issue 18): what TLS costs Corral on a miss and on a hit, beside plaintext.
//!
//! Four variants, each two `corral run` processes (A and B) on one Redis, with certificates made
//! at run time (the tests' [`Pki`]):
//!
//! | variant | upstream | Redis |
//! |---|---|---|
//! | `plain` | `http://` | `redis://` |
//! | `https` | `https://` (rustls, h2 by ALPN) | `redis://` |
//! | `rediss` | `http://` | `rediss://`, client certificate required |
//! | `both` | `https://` | `rediss://` |
//!
//! Per variant, `STAMPEDE_TLS_REQUESTS` (300) distinct keys, one request at a time on one kept
//! connection (a latency, not a throughput; the backend answers at once):
//! - **miss** on A: L1 and L2 miss, fill lock, upstream call, store, notice, release;
//! - **L2 hit** on B (its L1 is empty): one Redis read;
//! - **L1 hit** on A again: Redis and the upstream are not touched, so TLS should cost nothing.
//!
//! The phases run variant after variant (miss for all four, then L2 hits, then L1 hits), so a
//! noisy moment is spread over the variants rather than landing on one. Each phase is bounded by
//! [`PHASE_DEADLINE`]; one cut short says so.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::backend;
use crate::load::Conn;
use crate::procs::{self, BoxError};
use crate::step;
use crate::support::{CorralProcess, Pki, RedisServer, Upstream};

/// Bound on one phase of one variant.
const PHASE_DEADLINE: Duration = Duration::from_secs(60);

struct Variant {
    name: &'static str,
    upstream_tls: bool,
    redis_tls: bool,
    a: CorralProcess,
    b: CorralProcess,
    /// Latencies in ms: miss, L2 hit, L1 hit.
    phases: [Vec<f64>; 3],
    problems: Vec<String>,
}

/// Runs row 10 and prints its table.
pub async fn run(
    bin: &Path,
    dir: &Path,
    namespace: &str,
    plain: &Upstream,
) -> Result<(), BoxError> {
    let n = std::env::var("STAMPEDE_TLS_REQUESTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300usize);
    let load_before = procs::loadavg();
    let pki = Pki::new();
    let leaf = pki.server(&["127.0.0.1"]);
    let secure = backend::start_tls(pki.server_config(&leaf, &[b"h2", b"http/1.1"], None)).await;
    let redis = RedisServer::start().await;
    let rediss = RedisServer::start_tls(&pki, true).await;
    let client = pki.client("corral");
    step(&format!(
        "10 tls: upstreams {} and {}, redis {} and {}",
        plain.url(),
        secure.url(),
        redis.url(),
        rediss.url()
    ));
    let mut variants = Vec::new();
    for (name, upstream_tls, redis_tls) in [
        ("plain", false, false),
        ("https", true, false),
        ("rediss", false, true),
        ("both", true, true),
    ] {
        let upstream = if upstream_tls { &secure } else { plain };
        let route_tls = if upstream_tls {
            format!("tls = {{ ca_file = \"{}\" }}\n", pki.ca_file().display())
        } else {
            String::new()
        };
        let (url, redis_tls_line) = if redis_tls {
            let line = format!(
                "tls = {{ ca_file = \"{}\", client_cert_file = \"{}\", client_key_file = \"{}\" }}\n",
                pki.ca_file().display(),
                client.cert.display(),
                client.key.display()
            );
            (rediss.url(), line)
        } else {
            (redis.url(), String::new())
        };
        let text = format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nshutdown_timeout = \"2s\"\naccess_log = false\n\n\
             [redis]\nurl = \"{url}\"\nnamespace = \"{namespace}\"\n{redis_tls_line}\n\
             [[route]]\nname = \"recommend\"\npath_prefix = \"/recommend\"\nupstream = \"{}\"\n\
             ttl = \"60s\"\n{route_tls}",
            upstream.url()
        );
        std::fs::write(dir.join(format!("tls-{name}.toml")), &text)?;
        variants.push(Variant {
            name,
            upstream_tls,
            redis_tls,
            a: CorralProcess::start_with(bin, "info", &text).await,
            b: CorralProcess::start_with(bin, "info", &text).await,
            phases: [Vec::new(), Vec::new(), Vec::new()],
            problems: Vec::new(),
        });
    }

    for (phase, label, want) in [
        (0, "miss", "stored"),
        (1, "L2 hit", "hit"),
        (2, "L1 hit", "hit"),
    ] {
        for v in &mut variants {
            step(&format!("10 tls: {label}, {} x {n}", v.name));
            let target = if phase == 1 { v.b.addr() } else { v.a.addr() };
            let path = format!("/recommend/tls-{}/", v.name);
            match sequential(target, &path, n, want).await {
                Ok((latencies, problems)) => {
                    v.phases[phase] = latencies;
                    v.problems.extend(problems.map(|p| format!("{label}: {p}")));
                }
                Err(err) => v.problems.push(format!("{label}: {err}")),
            }
        }
    }

    println!();
    println!(
        "10 tls: {n} distinct keys per cell, one request at a time on one connection, backend \
         answering at once; latency p50 / p99 in ms as the client sees it"
    );
    println!(
        "| variant | upstream | redis | miss p50 / p99 | L2 hit p50 / p99 | L1 hit p50 / p99 |"
    );
    println!("|---|---|---|---|---|---|");
    for v in &variants {
        let cell = |i: usize| {
            let mut sorted = v.phases[i].clone();
            sorted.sort_by(f64::total_cmp);
            format!(
                "{:.2} / {:.2}",
                crate::percentile(&sorted, 0.5),
                crate::percentile(&sorted, 0.99)
            )
        };
        println!(
            "| {} | {} | {} | {} | {} | {} |",
            v.name,
            if v.upstream_tls { "https" } else { "http" },
            if v.redis_tls { "rediss" } else { "redis" },
            cell(0),
            cell(1),
            cell(2)
        );
    }
    for v in &variants {
        for p in &v.problems {
            println!("  {}: {p}", v.name);
        }
    }
    println!(
        "upstream calls: plain {}, https {}",
        plain.calls_under("/recommend/tls-"),
        secure.calls_under("/recommend/tls-")
    );
    println!(
        "load average: {load_before} before, {} after",
        procs::loadavg()
    );
    println!("machine: {}", procs::machine());
    Ok(())
}

/// `n` GETs of `path?k=<i>` on one connection to `target`, one at a time: the latency of each
/// in ms, and what went wrong (an answer not 200, or whose `Cache-Status` does not say `want`).
async fn sequential(
    target: SocketAddr,
    path: &str,
    n: usize,
    want: &str,
) -> Result<(Vec<f64>, Option<String>), BoxError> {
    let mut conn = Conn::open(target).await?;
    let started = Instant::now();
    let mut latencies = Vec::with_capacity(n);
    let (mut not_ok, mut unexpected) = (0usize, 0usize);
    for k in 0..n {
        if started.elapsed() > PHASE_DEADLINE {
            let why = format!("CUT SHORT after {k} requests by the {PHASE_DEADLINE:?} bound");
            return Ok((latencies, Some(why)));
        }
        let sent = Instant::now();
        let answer = conn.get(&format!("{path}?k={k}")).await?;
        latencies.push(sent.elapsed().as_secs_f64() * 1000.0);
        if answer.status != 200 {
            not_ok += 1;
        } else if !answer
            .cache_status
            .as_deref()
            .is_some_and(|s| s.contains(want))
        {
            unexpected += 1;
        }
    }
    let problems = (not_ok + unexpected > 0).then(|| {
        format!("{not_ok} answers not 200, {unexpected} whose Cache-Status does not say {want}")
    });
    Ok((latencies, problems))
}
