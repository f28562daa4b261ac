//! The stampede load bench of issue 4: Corral, nginx and Varnish side by side, in one run, against
//! the same slow backend, on real processes.
//!
//! ```sh
//! benches/peers-setup.sh              # once: apt-get install nginx varnish wrk redis-server
//! cargo bench --bench stampede        # builds corral (release) and runs everything, ~3-5 minutes
//! STAMPEDE_KEYS=10000 cargo bench --bench stampede   # rows 5 and 6 with 10k keys instead of 100k
//! ```
//!
//! Cargo builds the `corral` binary for the bench itself (`CARGO_BIN_EXE_corral`, release
//! profile); `CORRAL_BIN=path` runs another binary instead.
//!
//! # What runs
//! - `redis-server` in a tempdir on a free loopback port, `--save "" --appendonly no` (the tests'
//!   `RedisServer`; the bench shares `tests/support` with the tests);
//! - the slow backend, in this process ([`backend`]: the tests' `Upstream`, scripted per
//!   scenario): counts calls per scenario, 2 KiB bodies;
//! - 3 `corral run` processes sharing that Redis (config: `benches/stampede/corral.toml`), each
//!   bound to `127.0.0.1:0`, its address read from its `corral listening` JSON log line;
//! - if installed: nginx (`benches/stampede/nginx.conf`: 3 server blocks with separate caches and
//!   `proxy_cache_lock on`, plus a `return 200` block, the no-work ceiling) and 3 `varnishd`
//!   (`benches/stampede/varnish.vcl`: the built-in VCL, default request coalescing). A peer that
//!   is not installed is skipped with a line saying so.
//!
//! Everything binds and targets 127.0.0.1. Every load loop is bounded in count and time. Every
//! process is stopped on Drop, also when the bench panics.
//!
//! # Rows (the goals are issue 4's, for Corral)
//! 1. Fleet stampede: `STAMPEDE_BURST` (1000) identical concurrent requests over the 3 instances,
//!    backend 1 s: backend calls, and how long after the backend answered the first call each
//!    request finished (p50/p95/max). The floor row sends the same burst again once the key is
//!    cached everywhere: how long answering that many hits takes on this machine (finish times
//!    after the first answer), which no wake-up can beat.
//! 2. Failing key: the backend answers 500 after 1 s; 200 concurrent requests over the 3
//!    instances: backend calls, and when the last request finished (from the burst's start).
//! 3. Hit throughput on one instance, 2 KiB body: `wrk -t1 -c64 -d10s` (or an in-process loop
//!    without wrk), plus nginx answering the same body from memory (the ceiling).
//! 4. L2 hit: keys filled through instance A, each read once through instance B (empty L1):
//!    p50 latency, against the p50 of a direct Redis GET of the stored entries.
//! 5. Memory: a 4th Corral with `l1_max_bytes = "64MiB"`, `STAMPEDE_KEYS` (100k) distinct 2 KiB
//!    keys through it: VmRSS before and after.
//! 6. `STAMPEDE_KEYS` cold keys x 10 concurrent requests over the 3 instances, backend 10 ms:
//!    backend calls, lock keys left in Redis, Redis commands per miss (`INFO commandstats`).
//!
//! 7. Many keys at once (issue 8): `STAMPEDE_SPREAD_KEYS` (1000) distinct cold keys x 3
//!    requests spread over the 3 instances, all at once, backend 250 ms: backend calls, p50/p99,
//!    and for Corral Redis commands per key (the scripts' inner commands included, from
//!    `INFO commandstats`), script calls per key, reads Redis processed per key (its round
//!    trips as Redis sees them: requests that arrive together on a connection share a read),
//!    bytes into and out of Redis per key (`INFO stats`) and Redis CPU per 1000 fills
//!    (`INFO cpu`). Row 8 prints the same.
//! 8. Cold start (issue 8): a fresh 3-instance Corral fleet, its first burst at once: 1 key x 3,
//!    then 300 keys x 3.
//! 9. The budget (issue 20): row 7's burst on the route without a budget and on one with
//!    `fleet_concurrency = 20`: the backend's peak of calls in flight, backend calls, p50/p99.
//!    `STAMPEDE_ONLY=budget` runs this row alone.
//!
//! 10. TLS (issue 18): the miss, L2-hit and L1-hit latency of a Corral with an HTTPS upstream,
//!     with `rediss://` (client certificate required), with both, beside plaintext (see
//!     [`tls_row`]). `STAMPEDE_ONLY=tls` runs this row alone, and only then (it starts its own
//!     processes); `STAMPEDE_TLS_REQUESTS` (300) keys per cell.
//!
//! Every Corral row runs the default config (`benches/stampede/corral.toml` sets no timeout
//! and no lock option; only the access log is off).
//!
//! Peers run row 6 with `min(STAMPEDE_KEYS, STAMPEDE_PEER_KEYS)` keys (2000 by default): their
//! figure per key does not depend on the count, and nginx's lock re-checks on a 500 ms timer, so
//! each of its keys costs half a second.
//!
//! `STAMPEDE_ONLY=hits` runs only the hit table of issue 19 instead (see [`hit_table`]): Corral
//! with and without its access line, nginx with and without its access log, and the ceiling, in
//! interleaved rounds; `STAMPEDE_ONLY=hits STAMPEDE_HIT_ROUNDS=1 STAMPEDE_HIT_SECONDS=1` checks it.
//!
//! 11. A waiter's release (issue 19): 1 key x 1000 requests, then 1000 keys x 3, over the 3
//!     instances, backend 1 s: p50/p95/max of each waiter's answer time after its key's leader's
//!     answer, beside the floor (the same burst again from L1: each answer after its key's
//!     first); the goal is p95 within the floor's + 5 ms. `STAMPEDE_ONLY=release` runs this row
//!     alone (see [`release`]).
//!
//! For quick runs while developing: `STAMPEDE_BURST` (1000), `STAMPEDE_FAIL_BURST` (200),
//! `STAMPEDE_HIT_SECONDS` (10), `STAMPEDE_L2_KEYS` (2000). `STAMPEDE_KEEP=1` keeps the run's
//! directory (configs and every process's log). `STAMPEDE_PEERS=nginx` (comma-separated; empty:
//! none) limits the peers; `STAMPEDE_NO_WRK=1` measures row 3 with the in-process loop even when
//! wrk is installed.

#[path = "stampede/backend.rs"]
mod backend;
#[path = "stampede/hit_table.rs"]
mod hit_table;
#[path = "stampede/load.rs"]
mod load;
#[path = "stampede/procs.rs"]
mod procs;
#[path = "stampede/release.rs"]
mod release;
#[path = "stampede/spread.rs"]
mod spread;
#[path = "../tests/support/mod.rs"]
mod support;
#[path = "stampede/tls_row.rs"]
mod tls_row;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use backend::Outcome;
use load::{Burst, Conn, Keyed, Throughput};
use procs::{BoxError, Corral, CorralSettings, Nginx, Varnish};
use support::{CommandStats, RedisServer, Upstream};

/// How long the backend takes in rows 1 and 2.
const BACKEND: Duration = Duration::from_secs(1);
/// How long the backend takes in row 6.
const COLD_BACKEND_MS: u64 = 10;
/// Requests per key in row 6.
const COLD_PER_KEY: usize = 10;
/// Keys in flight at once in row 6 (x 10 requests each).
const COLD_CONCURRENCY: usize = 32;
/// Requests in flight at once in rows 4 (fill) and 5.
const FILL_CONCURRENCY: usize = 64;
/// Bound on each keyed phase (rows 5 and 6); a phase cut short says so.
const PHASE_DEADLINE: Duration = Duration::from_secs(240);
/// Connections of the hit-throughput load.
pub(crate) const HIT_CONNS: usize = 64;
/// L1 budget of the row-5 instance.
const MEM_BUDGET: &str = "64MiB";
const MEM_BUDGET_BYTES: u64 = 64 * 1024 * 1024;
const MIB: f64 = 1024.0 * 1024.0;

/// Sizes of this run, from the environment.
struct Sizes {
    burst: usize,
    fail_burst: usize,
    hit_secs: u64,
    keys: usize,
    l2_keys: usize,
    /// Row 6 for the peers: their per-key figure does not depend on the count, and nginx's
    /// 500 ms lock timer makes each key cost it half a second.
    peer_keys: usize,
    /// Row 7: distinct keys in one burst, 3 requests each.
    spread_keys: usize,
}

impl Sizes {
    fn from_env() -> Sizes {
        fn var(name: &str, default: usize) -> usize {
            std::env::var(name)
                .ok()
                .and_then(|v| v.replace('_', "").parse().ok())
                .filter(|&n| n > 0)
                .unwrap_or(default)
        }
        Sizes {
            burst: var("STAMPEDE_BURST", 1000),
            fail_burst: var("STAMPEDE_FAIL_BURST", 200),
            hit_secs: var("STAMPEDE_HIT_SECONDS", 10) as u64,
            keys: var("STAMPEDE_KEYS", 100_000),
            l2_keys: var("STAMPEDE_L2_KEYS", 2000),
            peer_keys: var("STAMPEDE_PEER_KEYS", 2000),
            spread_keys: var("STAMPEDE_SPREAD_KEYS", 1000),
        }
    }
}

fn main() -> ExitCode {
    // `cargo bench` passes `--bench`; `cargo test --all-targets` does not, and must not start a
    // multi-minute load run.
    if !std::env::args().any(|a| a == "--bench") {
        println!("stampede: a load bench; run it with `cargo bench --bench stampede`");
        return ExitCode::SUCCESS;
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("stampede: cannot start the runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("stampede: {err}");
            ExitCode::FAILURE
        }
    }
}

pub(crate) fn step(what: &str) {
    eprintln!("[stampede] {what}");
}

/// One system under test: Corral's fleet, or a peer's three instances.
struct System {
    name: &'static str,
    targets: Vec<SocketAddr>,
}

/// Rows 1, 2, 3 and 6 of one system.
#[derive(Default)]
struct Figures {
    stampede: Option<Result<Stampede, String>>,
    failing: Option<Result<Failing, String>>,
    hits: Option<Result<Throughput, String>>,
    cold: Option<Result<Cold, String>>,
}

async fn run() -> Result<(), BoxError> {
    let run_started = Instant::now();
    let load_at_start = procs::loadavg();
    let sizes = Sizes::from_env();
    let run_id = format!(
        "{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() % 1_000_000)
            .unwrap_or(0)
    );
    let namespace = format!("bench-{run_id}");
    let dir = tempfile::Builder::new()
        .prefix("corral-stampede-")
        .tempdir()?;
    step(&format!("files in {}", dir.path().display()));

    let corral_bin = corral_bin();
    let redis = RedisServer::start().await;
    let backend = backend::start().await;
    step(&format!(
        "redis on {}, backend on {}",
        redis.url(),
        backend.addr()
    ));

    if std::env::var("STAMPEDE_ONLY").as_deref() == Ok("hits") {
        return hit_table::run(&corral_bin, dir.path(), &redis, &namespace, &backend).await;
    }
    if std::env::var("STAMPEDE_ONLY").as_deref() == Ok("tls") {
        return tls_row::run(&corral_bin, dir.path(), &namespace, &backend).await;
    }

    let mut fleet = Vec::with_capacity(3);
    let budget_only = std::env::var("STAMPEDE_ONLY").as_deref() == Ok("budget");
    for i in 0..3 {
        let settings = CorralSettings {
            name: &format!("corral{i}"),
            redis_url: &redis.url(),
            namespace: &namespace,
            upstream: backend.addr(),
            l1_max_bytes: "256MiB",
        };
        fleet.push(Corral::start(&corral_bin, dir.path(), &settings).await?);
    }
    step(&format!(
        "corral fleet on {} (binary {})",
        fleet
            .iter()
            .map(|c| c.addr.to_string())
            .collect::<Vec<_>>()
            .join(", "),
        corral_bin.display()
    ));

    if std::env::var("STAMPEDE_ONLY").as_deref() == Ok("release") {
        let targets: Vec<SocketAddr> = fleet.iter().map(|c| c.addr).collect();
        step(&format!(
            "11 release: load average {} at the start",
            load_at_start
        ));
        for line in release::rows(&backend, &targets).await {
            println!("  {line}");
        }
        println!("  load average at the end: {}", procs::loadavg());
        return Ok(());
    }
    if budget_only {
        let targets: Vec<SocketAddr> = fleet.iter().map(|c| c.addr).collect();
        step(&format!(
            "9 budget: {} keys x {}",
            sizes.spread_keys,
            spread::PER_KEY
        ));
        for line in spread::budget_rows(&backend, &targets, sizes.spread_keys).await {
            println!("  {line}");
        }
        return Ok(());
    }

    let mut notes: Vec<String> = Vec::new();
    let body = backend::body();
    let body_text = String::from_utf8_lossy(&body).into_owned();
    let nginx = start_peer("nginx", &mut notes, |bin| {
        Nginx::start(bin, dir.path(), backend.addr(), &body_text)
    });
    let varnish = start_peer("varnishd", &mut notes, |bin| {
        Varnish::start(bin, dir.path(), backend.addr())
    });

    let mut systems = vec![System {
        name: "corral",
        targets: fleet.iter().map(|c| c.addr).collect(),
    }];
    if let Some(n) = &nginx {
        systems.push(System {
            name: "nginx",
            targets: n.instances.clone(),
        });
    }
    if let Some(v) = &varnish {
        systems.push(System {
            name: "varnish",
            targets: v.instances.clone(),
        });
    }

    let mut figures: BTreeMap<&'static str, Figures> = BTreeMap::new();
    for system in &systems {
        let f = figures.entry(system.name).or_default();
        step(&format!(
            "1 stampede: {} x {} over {}",
            sizes.burst,
            BACKEND.as_secs_f64(),
            system.name
        ));
        f.stampede = Some(
            stampede(&backend, system, sizes.burst)
                .await
                .map_err(|e| e.to_string()),
        );
        step(&format!(
            "2 failing key: {} over {}",
            sizes.fail_burst, system.name
        ));
        f.failing = Some(
            failing(&backend, system, sizes.fail_burst)
                .await
                .map_err(|e| e.to_string()),
        );
        step(&format!("3 hit throughput: {}", system.name));
        f.hits = Some(
            hits(&backend, system, sizes.hit_secs)
                .await
                .map_err(|e| e.to_string()),
        );
    }
    let ceiling = match &nginx {
        Some(n) => {
            step("3 hit throughput: nginx `return 200` (ceiling)");
            Some(
                load::throughput(n.ceiling, "/", HIT_CONNS, sizes.hit_secs)
                    .await
                    .map_err(|e| e.to_string()),
            )
        }
        None => None,
    };

    step(&format!(
        "4 L2 hit: {} keys through A, read through B",
        sizes.l2_keys
    ));
    let l2 = l2_hit(&backend, &redis, &namespace, &fleet, sizes.l2_keys)
        .await
        .map_err(|e| e.to_string());

    step(&format!(
        "5 memory: {} keys through a {MEM_BUDGET} instance",
        sizes.keys
    ));
    let memory = memory(
        &corral_bin,
        dir.path(),
        &redis,
        &namespace,
        &backend,
        sizes.keys,
    )
    .await
    .map_err(|e| e.to_string());

    for system in &systems {
        let is_corral = system.name == "corral";
        let keys = if is_corral {
            sizes.keys
        } else {
            sizes.keys.min(sizes.peer_keys)
        };
        step(&format!(
            "6 cold keys: {keys} x {COLD_PER_KEY} over {}",
            system.name
        ));
        let redis_for = is_corral.then_some(&redis);
        let result = cold(&backend, system, redis_for, keys)
            .await
            .map_err(|e| e.to_string());
        figures.entry(system.name).or_default().cold = Some(result);
    }

    // Rows 7 and 8 (issue 8): many cold keys at once, and a fleet's first burst.
    let mut spread_lines = Vec::new();
    for system in &systems {
        step(&format!(
            "7 many keys: {} keys x {} over {}",
            sizes.spread_keys,
            spread::PER_KEY,
            system.name
        ));
        let redis_for = (system.name == "corral").then_some(&redis);
        let scenario = format!("spread-{}", system.name);
        let line = match spread::burst(
            &backend,
            &system.targets,
            &scenario,
            sizes.spread_keys,
            redis_for,
        )
        .await
        {
            Ok(s) => spread::summary(&s),
            Err(e) => format!("error: {e}"),
        };
        spread_lines.push(format!("7 {}: {line}", system.name));
    }
    step("8 cold start: a fresh 3-instance fleet, then its first burst at once");
    let fresh_namespace = format!("{namespace}-fresh");
    let mut fresh = Vec::with_capacity(3);
    for i in 0..3 {
        let settings = CorralSettings {
            name: &format!("fresh{i}"),
            redis_url: &redis.url(),
            namespace: &fresh_namespace,
            upstream: backend.addr(),
            l1_max_bytes: "256MiB",
        };
        fresh.push(Corral::start(&corral_bin, dir.path(), &settings).await?);
    }
    let targets: Vec<SocketAddr> = fresh.iter().map(|c| c.addr).collect();
    for (round, keys) in [("fresh-1", 1), ("fresh-300", 300)] {
        let line = match spread::burst(&backend, &targets, round, keys, Some(&redis)).await {
            Ok(s) => spread::summary(&s),
            Err(e) => format!("error: {e}"),
        };
        spread_lines.push(format!(
            "8 corral, {round} (fleet started just before): {line}"
        ));
    }
    drop(fresh);
    step("9 budget: the same many-keys burst with and without a fleet budget");
    let targets: Vec<SocketAddr> = fleet.iter().map(|c| c.addr).collect();
    spread_lines.extend(spread::budget_rows(&backend, &targets, sizes.spread_keys).await);

    // Stop everything before the tempdir goes: peers first, then Corral, then Redis.
    drop(varnish);
    drop(nginx);
    drop(fleet);
    // Into the run's directory, for STAMPEDE_KEEP; a failed copy only loses the log.
    let _ = std::fs::write(dir.path().join("redis.log"), redis.log());
    drop(redis);
    drop(backend);
    let kept = std::env::var_os("STAMPEDE_KEEP").map(|_| dir.keep());
    print_report(
        &sizes,
        &systems,
        &figures,
        ceiling,
        l2,
        memory,
        &notes,
        run_started.elapsed(),
        (load_at_start, procs::loadavg()),
        kept.as_deref(),
    );
    println!();
    println!(
        "Rows 7-9 (issues 8 and 20, default config, backend {} ms):",
        spread::BACKEND_MS
    );
    for line in &spread_lines {
        println!("  {line}");
    }
    Ok(())
}

/// The corral binary: `CORRAL_BIN`, else the one Cargo built for this bench.
fn corral_bin() -> PathBuf {
    std::env::var_os("CORRAL_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_corral")))
}

/// Starts a peer if its binary is installed; otherwise, or if it fails to start, says so and
/// goes on without it.
fn start_peer<T>(
    bin: &str,
    notes: &mut Vec<String>,
    start: impl FnOnce(&std::path::Path) -> Result<T, BoxError>,
) -> Option<T> {
    if let Ok(wanted) = std::env::var("STAMPEDE_PEERS")
        && !wanted
            .split(',')
            .any(|p| bin.starts_with(p.trim()) && !p.trim().is_empty())
    {
        let line = format!("{bin}: skipped (not in STAMPEDE_PEERS={wanted})");
        step(&line);
        notes.push(line);
        return None;
    }
    let Some(path) = procs::which(bin) else {
        let line = format!("{bin}: not installed: run benches/peers-setup.sh");
        step(&line);
        notes.push(line);
        return None;
    };
    match start(&path) {
        Ok(peer) => {
            step(&format!("{bin} started ({})", version(&path)));
            notes.push(format!("{bin}: {}", version(&path)));
            Some(peer)
        }
        Err(err) => {
            let line = format!("{bin}: did not start, skipped: {err}");
            step(&line);
            notes.push(line);
            None
        }
    }
}

fn version(bin: &std::path::Path) -> String {
    let flag = if bin.ends_with("nginx") { "-v" } else { "-V" };
    std::process::Command::new(bin)
        .arg(flag)
        .output()
        .map(|o| {
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            );
            text.lines().next().unwrap_or("").trim().to_owned()
        })
        .unwrap_or_default()
}

// ---------------------------------------------------------------------------------------------
// Row 1: fleet stampede

struct Stampede {
    requests: usize,
    ok: usize,
    errors: usize,
    calls: u64,
    /// Finish times after the backend's first answer, in ms, sorted.
    spread_ms: Vec<f64>,
    /// The same, p50/p95/max per instance.
    per_instance: Vec<String>,
    /// The floor: the same burst again on the now-cached key, finish times after its first
    /// answer, in ms, sorted. No system can wake waiters faster than it answers as many hits.
    floor_ms: Vec<f64>,
    outcomes: BTreeMap<String, usize>,
}

async fn stampede(backend: &Upstream, system: &System, n: usize) -> Result<Stampede, BoxError> {
    let scenario = format!("stampede-{}", system.name);
    let path = backend::scenario(backend, &scenario, BACKEND, Outcome::Ok);
    let burst = load::burst(&system.targets, n, &path).await?;
    let calls = backend.calls_under(&path);
    let filled = backend
        .first_answer(&path)
        .ok_or("the backend never answered")?;
    let mut spread_ms: Vec<f64> = burst
        .answers
        .iter()
        .map(|a| a.finished.saturating_duration_since(filled).as_secs_f64() * 1000.0)
        .collect();
    spread_ms.sort_by(f64::total_cmp);
    let per_instance = system
        .targets
        .iter()
        .enumerate()
        .map(|(i, target)| {
            let mut mine: Vec<f64> = burst
                .answers
                .iter()
                .filter(|a| a.target == Some(*target))
                .map(|a| a.finished.saturating_duration_since(filled).as_secs_f64() * 1000.0)
                .collect();
            mine.sort_by(f64::total_cmp);
            format!(
                "#{i} {:.1}/{:.1}/{:.1}",
                percentile(&mine, 0.5),
                percentile(&mine, 0.95),
                percentile(&mine, 1.0)
            )
        })
        .collect();
    let again = load::burst(&system.targets, n, &path).await?;
    let first = again.answers.iter().map(|a| a.finished).min();
    let mut floor_ms: Vec<f64> = match first {
        Some(first) => again
            .answers
            .iter()
            .map(|a| (a.finished - first).as_secs_f64() * 1000.0)
            .collect(),
        None => Vec::new(),
    };
    floor_ms.sort_by(f64::total_cmp);
    Ok(Stampede {
        requests: n,
        ok: burst.answers.iter().filter(|a| a.status == 200).count(),
        errors: burst.errors,
        calls,
        spread_ms,
        per_instance,
        floor_ms,
        outcomes: outcomes(&burst),
    })
}

fn outcomes(burst: &Burst) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for a in &burst.answers {
        let label = format!(
            "{} {}",
            a.status,
            a.cache_status.as_deref().unwrap_or("(no Cache-Status)")
        );
        *counts.entry(label).or_insert(0) += 1;
    }
    counts
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

// ---------------------------------------------------------------------------------------------
// Row 2: failing key

struct Failing {
    requests: usize,
    calls: u64,
    last_done: Duration,
    errors: usize,
    outcomes: BTreeMap<String, usize>,
}

async fn failing(backend: &Upstream, system: &System, n: usize) -> Result<Failing, BoxError> {
    let scenario = format!("fail-{}", system.name);
    let path = backend::scenario(backend, &scenario, BACKEND, Outcome::Fail);
    let burst = load::burst(&system.targets, n, &path).await?;
    let last = burst
        .answers
        .iter()
        .map(|a| a.finished)
        .max()
        .unwrap_or(burst.started);
    Ok(Failing {
        requests: n,
        calls: backend.calls_under(&path),
        last_done: last.saturating_duration_since(burst.started),
        errors: burst.errors,
        outcomes: outcomes(&burst),
    })
}

// ---------------------------------------------------------------------------------------------
// Row 3: hit throughput

async fn hits(backend: &Upstream, system: &System, secs: u64) -> Result<Throughput, BoxError> {
    let target = system.targets[0];
    let scenario = format!("hit-{}", system.name);
    let path = backend::scenario(backend, &scenario, Duration::ZERO, Outcome::Ok);
    let mut conn = Conn::open(target).await?;
    conn.get(&path).await?;
    let warm = conn.get(&path).await?;
    if warm.status != 200 {
        return Err(format!("warming {path} answered {}", warm.status).into());
    }
    if let Some(cs) = &warm.cache_status
        && cs != "hit"
    {
        return Err(format!("the warmed key is not an L1 hit: Cache-Status {cs}").into());
    }
    drop(conn);
    load::throughput(target, &path, HIT_CONNS, secs).await
}

// ---------------------------------------------------------------------------------------------
// Row 4: L2 hit latency

struct L2Hit {
    keys: usize,
    /// Answers through B that said `hit` (they must: B's L1 was empty, the entry in Redis).
    hits: usize,
    p50_l2: Duration,
    p50_l1: Duration,
    p50_redis: Duration,
    value_bytes: usize,
}

async fn l2_hit(
    backend: &Upstream,
    redis: &RedisServer,
    namespace: &str,
    fleet: &[Corral],
    keys: usize,
) -> Result<L2Hit, BoxError> {
    let fill_via = fleet[0].addr;
    let path = backend::scenario(backend, "l2", Duration::ZERO, Outcome::Ok);
    let fill_path = path.clone();
    let pool = load::pool();
    let filled = load::keyed(
        &pool,
        keys,
        1,
        FILL_CONCURRENCY,
        PHASE_DEADLINE,
        move |k, _| format!("http://{fill_via}{fill_path}?k={k}"),
    )
    .await;
    if filled.ok as usize != keys {
        return Err(format!("filling through A: {filled:?}").into());
    }
    // Through B, one request at a time on one keep-alive connection: first L2 hits, then the
    // same keys again as L1 hits (the HTTP baseline).
    let mut conn = Conn::open(fleet[1].addr).await?;
    let mut l2 = Vec::with_capacity(keys);
    let mut hits = 0;
    for k in 0..keys {
        let started = Instant::now();
        let answer = conn.get(&format!("{path}?k={k}")).await?;
        l2.push(answer.finished - started);
        hits += usize::from(answer.cache_status.as_deref() == Some("hit"));
    }
    let mut l1 = Vec::with_capacity(keys);
    for k in 0..keys {
        let started = Instant::now();
        let answer = conn.get(&format!("{path}?k={k}")).await?;
        l1.push(answer.finished - started);
    }
    // Direct GETs of stored entries (same size, same server), same one-at-a-time pattern.
    let mut rc = redis.conn().await;
    let entries = redis
        .keys(&format!("corral:{namespace}:recommend:{{*"))
        .await;
    if entries.is_empty() {
        return Err("no entries found in Redis".into());
    }
    let mut direct = Vec::with_capacity(keys);
    let mut value_bytes = 0;
    for k in 0..keys {
        let key = &entries[k % entries.len()];
        let started = Instant::now();
        let value: Vec<u8> = redis::cmd("GET").arg(key).query_async(&mut rc).await?;
        direct.push(started.elapsed());
        value_bytes = value.len();
    }
    Ok(L2Hit {
        keys,
        hits,
        p50_l2: median(&mut l2),
        p50_l1: median(&mut l1),
        p50_redis: median(&mut direct),
        value_bytes,
    })
}

fn median(samples: &mut [Duration]) -> Duration {
    samples.sort();
    samples.get(samples.len() / 2).copied().unwrap_or_default()
}

// ---------------------------------------------------------------------------------------------
// Row 5: memory

struct Memory {
    keys: usize,
    load: Keyed,
    rss_before: u64,
    rss_after: u64,
    peak: u64,
}

async fn memory(
    bin: &std::path::Path,
    dir: &std::path::Path,
    redis: &RedisServer,
    namespace: &str,
    backend: &Upstream,
    keys: usize,
) -> Result<Memory, BoxError> {
    let instance = Corral::start(
        bin,
        dir,
        &CorralSettings {
            name: "corral-mem",
            redis_url: &redis.url(),
            namespace: &format!("{namespace}-mem"),
            upstream: backend.addr(),
            l1_max_bytes: MEM_BUDGET,
        },
    )
    .await?;
    let path = backend::scenario(backend, "mem", Duration::ZERO, Outcome::Ok);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (rss_before, _) = procs::rss(instance.pid()).ok_or("cannot read VmRSS")?;
    let addr = instance.addr;
    let pool = load::pool();
    let load = load::keyed(
        &pool,
        keys,
        1,
        FILL_CONCURRENCY,
        PHASE_DEADLINE,
        move |k, _| format!("http://{addr}{path}?k={k}"),
    )
    .await;
    drop(pool);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (rss_after, peak) = procs::rss(instance.pid()).ok_or("cannot read VmRSS")?;
    Ok(Memory {
        keys,
        load,
        rss_before,
        rss_after,
        peak,
    })
}

// ---------------------------------------------------------------------------------------------
// Row 6: cold keys

struct Cold {
    load: Keyed,
    calls: u64,
    /// Corral only: lock keys left, and Redis calls per command.
    redis: Option<(usize, CommandStats)>,
}

/// Commands that are not part of serving a request (this bench's own probes, connection setup).
fn is_admin_command(name: &str) -> bool {
    matches!(
        name,
        "info" | "scan" | "ping" | "hello" | "select" | "dbsize"
    ) || name.starts_with("config")
        || name.starts_with("client")
        || name.starts_with("command")
}

async fn cold(
    backend: &Upstream,
    system: &System,
    redis: Option<&RedisServer>,
    keys: usize,
) -> Result<Cold, BoxError> {
    if let Some(redis) = redis {
        redis.reset_stats().await;
    }
    let scenario = format!("cold-{}", system.name);
    let delay = Duration::from_millis(COLD_BACKEND_MS);
    let path = backend::scenario(backend, &scenario, delay, Outcome::Ok);
    let targets = system.targets.clone();
    let key_path = path.clone();
    let pool = load::pool();
    let load = load::keyed(
        &pool,
        keys,
        COLD_PER_KEY,
        COLD_CONCURRENCY,
        PHASE_DEADLINE,
        move |k, j| {
            let target = targets[(k + j) % targets.len()];
            format!("http://{target}{key_path}?k={k}")
        },
    )
    .await;
    drop(pool);
    let calls = backend.calls_under(&path);
    let redis = match redis {
        Some(redis) => {
            let stats = redis.commandstats().await;
            let locks = redis.keys("corral:*:lock:*").await.len();
            Some((locks, stats))
        }
        None => None,
    };
    Ok(Cold { load, calls, redis })
}

// ---------------------------------------------------------------------------------------------
// The report

struct Row {
    label: String,
    cells: Vec<String>,
    goal: String,
    verdict: String,
}

fn verdict(met: Option<bool>) -> String {
    match met {
        Some(true) => "met".to_owned(),
        Some(false) => "NOT MET".to_owned(),
        None => "-".to_owned(),
    }
}

fn ms(d: Duration) -> String {
    format!("{:.3} ms", d.as_secs_f64() * 1000.0)
}

#[allow(clippy::too_many_arguments)]
fn print_report(
    sizes: &Sizes,
    systems: &[System],
    figures: &BTreeMap<&'static str, Figures>,
    ceiling: Option<Result<Throughput, String>>,
    l2: Result<L2Hit, String>,
    memory: Result<Memory, String>,
    notes: &[String],
    elapsed: Duration,
    loadavg: (String, String),
    kept: Option<&std::path::Path>,
) {
    let columns = ["corral", "nginx", "varnish"];
    let present = |name: &str| systems.iter().any(|s| s.name == name);
    let fig = |name: &str| figures.get(name);
    let mut rows: Vec<Row> = Vec::new();
    let mut details: Vec<String> = Vec::new();
    let missing = |name: &str| {
        if present(name) {
            "error".to_owned()
        } else {
            "not installed".to_owned()
        }
    };

    // Row 1.
    let mut calls = Vec::new();
    let mut spread = Vec::new();
    let mut floor = Vec::new();
    let (mut calls_ok, mut spread_ok) = (None, None);
    for name in columns {
        match fig(name).and_then(|f| f.stampede.as_ref()) {
            Some(Ok(s)) => {
                let bad = s.requests - s.ok;
                calls.push(format!(
                    "{}{}",
                    s.calls,
                    if bad > 0 {
                        format!(" ({bad} not 200)")
                    } else {
                        String::new()
                    }
                ));
                spread.push(format!(
                    "{:.1} / {:.1} / {:.1} ms",
                    percentile(&s.spread_ms, 0.5),
                    percentile(&s.spread_ms, 0.95),
                    percentile(&s.spread_ms, 1.0)
                ));
                floor.push(format!(
                    "{:.1} / {:.1} / {:.1} ms",
                    percentile(&s.floor_ms, 0.5),
                    percentile(&s.floor_ms, 0.95),
                    percentile(&s.floor_ms, 1.0)
                ));
                if name == "corral" {
                    calls_ok = Some(s.calls == 1 && s.ok == s.requests);
                    spread_ok = Some(percentile(&s.spread_ms, 0.95) <= 5.0);
                }
                details.push(format!(
                    "1 {name}: {} answered 200, {} transport errors; per instance p50/p95/max ms: {}; {:?}",
                    s.ok,
                    s.errors,
                    s.per_instance.join(", "),
                    s.outcomes
                ));
            }
            Some(Err(e)) => {
                calls.push("error".into());
                spread.push("error".into());
                floor.push("error".into());
                details.push(format!("1 {name}: {e}"));
            }
            None => {
                calls.push(missing(name));
                spread.push(missing(name));
                floor.push(missing(name));
            }
        }
    }
    rows.push(Row {
        label: format!(
            "1 stampede, {} req, 1 s backend: backend calls",
            sizes.burst
        ),
        cells: calls,
        goal: "1".into(),
        verdict: verdict(calls_ok),
    });
    rows.push(Row {
        label: "1 finish after 1st backend answer p50/p95/max".into(),
        cells: spread,
        goal: "p95 <= 5 ms".into(),
        verdict: verdict(spread_ok),
    });
    rows.push(Row {
        label: "1 floor: same burst, key cached, after 1st answer".into(),
        cells: floor,
        goal: "-".into(),
        verdict: "-".into(),
    });

    // Row 2.
    let mut calls = Vec::new();
    let mut last = Vec::new();
    let (mut calls_ok, mut last_ok) = (None, None);
    for name in columns {
        match fig(name).and_then(|f| f.failing.as_ref()) {
            Some(Ok(f)) => {
                calls.push(f.calls.to_string());
                last.push(format!("{:.3} s", f.last_done.as_secs_f64()));
                if name == "corral" {
                    calls_ok = Some(f.calls <= 2);
                    last_ok =
                        Some(f.last_done <= BACKEND + Duration::from_millis(50) && f.errors == 0);
                }
                details.push(format!(
                    "2 {name}: {} requests, {} transport errors; {:?}",
                    f.requests, f.errors, f.outcomes
                ));
            }
            Some(Err(e)) => {
                calls.push("error".into());
                last.push("error".into());
                details.push(format!("2 {name}: {e}"));
            }
            None => {
                calls.push(missing(name));
                last.push(missing(name));
            }
        }
    }
    rows.push(Row {
        label: format!(
            "2 failing key (500 after 1 s), {} req: backend calls",
            sizes.fail_burst
        ),
        cells: calls,
        goal: "<= 2".into(),
        verdict: verdict(calls_ok),
    });
    rows.push(Row {
        label: "2 last request finished (from burst start)".into(),
        cells: last,
        goal: "<= 1.050 s".into(),
        verdict: verdict(last_ok),
    });

    // Row 3.
    let rps_of = |name: &str| -> Option<f64> {
        match fig(name).and_then(|f| f.hits.as_ref()) {
            Some(Ok(t)) => Some(t.rps),
            _ => None,
        }
    };
    let mut cells = Vec::new();
    for name in columns {
        match fig(name).and_then(|f| f.hits.as_ref()) {
            Some(Ok(t)) => {
                cells.push(format!("{:.0} req/s", t.rps));
                details.push(format!(
                    "3 {name}: {} ({})",
                    t.tool,
                    t.problems.as_deref().unwrap_or("every answer 200")
                ));
            }
            Some(Err(e)) => {
                cells.push("error".into());
                details.push(format!("3 {name}: {e}"));
            }
            None => cells.push(missing(name)),
        }
    }
    rows.push(Row {
        label: "3 cache hits, 2 KiB, one instance, 64 conns".into(),
        cells,
        goal: "see ratios".into(),
        verdict: "-".into(),
    });
    let ceiling_rps = match &ceiling {
        Some(Ok(t)) => {
            details.push(format!(
                "3 nginx ceiling: {} ({})",
                t.tool,
                t.problems.as_deref().unwrap_or("every answer 200")
            ));
            Some(t.rps)
        }
        Some(Err(e)) => {
            details.push(format!("3 nginx ceiling: {e}"));
            None
        }
        None => None,
    };
    rows.push(Row {
        label: "3 no-work ceiling: nginx `return 200` 2 KiB".into(),
        cells: vec![
            "-".into(),
            match (&ceiling, ceiling_rps) {
                (_, Some(r)) => format!("{r:.0} req/s"),
                (Some(_), None) => "error".into(),
                (None, None) => missing("nginx"),
            },
            "-".into(),
        ],
        goal: "-".into(),
        verdict: "-".into(),
    });
    let corral_rps = rps_of("corral");
    let ratio = |a: Option<f64>, b: Option<f64>| a.zip(b).map(|(a, b)| a / b);
    let vs_nginx = ratio(corral_rps, rps_of("nginx"));
    let vs_ceiling = ratio(corral_rps, ceiling_rps);
    let fmt_ratio = |r: Option<f64>| r.map(|r| format!("{r:.2}x")).unwrap_or_else(|| "-".into());
    rows.push(Row {
        label: "3 corral L1 hits / nginx cache hits".into(),
        cells: vec![fmt_ratio(vs_nginx), "-".into(), "-".into()],
        goal: ">= 1.2x".into(),
        verdict: verdict(vs_nginx.map(|r| r >= 1.2)),
    });
    rows.push(Row {
        label: "3 corral L1 hits / no-work ceiling".into(),
        cells: vec![fmt_ratio(vs_ceiling), "-".into(), "-".into()],
        goal: ">= 0.85x".into(),
        verdict: verdict(vs_ceiling.map(|r| r >= 0.85)),
    });

    // Row 4.
    let no_tier = "n/a (no shared tier)".to_owned();
    match &l2 {
        Ok(l) => {
            let added = l.p50_l2.saturating_sub(l.p50_redis);
            rows.push(Row {
                label: "4 L2 hit p50 (fresh L1) / direct Redis GET p50".into(),
                cells: vec![
                    format!("{} / {}", ms(l.p50_l2), ms(l.p50_redis)),
                    no_tier.clone(),
                    no_tier.clone(),
                ],
                goal: "-".into(),
                verdict: "-".into(),
            });
            rows.push(Row {
                label: "4 L2 hit: added over the Redis GET (p50)".into(),
                cells: vec![ms(added), no_tier.clone(), no_tier.clone()],
                goal: "<= 0.300 ms".into(),
                verdict: verdict(Some(
                    added <= Duration::from_micros(300) && l.hits == l.keys,
                )),
            });
            details.push(format!(
                "4 corral: {} keys filled through A, read once through B ({} answered `hit`), one \
                 request at a time on one connection; L1 hit p50 through B {} (the HTTP baseline); \
                 Redis GETs of {}-byte stored entries",
                l.keys,
                l.hits,
                ms(l.p50_l1),
                l.value_bytes
            ));
        }
        Err(e) => {
            rows.push(Row {
                label: "4 L2 hit: added over the Redis GET (p50)".into(),
                cells: vec!["error".into(), no_tier.clone(), no_tier.clone()],
                goal: "<= 0.300 ms".into(),
                verdict: "-".into(),
            });
            details.push(format!("4 corral: {e}"));
        }
    }

    // Row 5.
    let not_measured = "not measured".to_owned();
    match &memory {
        Ok(m) => {
            let over = m.rss_after as f64 - MEM_BUDGET_BYTES as f64;
            rows.push(Row {
                label: format!("5 RSS {MEM_BUDGET} L1, {} keys: before -> after", m.keys),
                cells: vec![
                    format!(
                        "{:.1} -> {:.1} MiB",
                        m.rss_before as f64 / MIB,
                        m.rss_after as f64 / MIB
                    ),
                    not_measured.clone(),
                    not_measured.clone(),
                ],
                goal: "-".into(),
                verdict: "-".into(),
            });
            rows.push(Row {
                label: "5 RSS after - L1 budget".into(),
                cells: vec![
                    format!("{:.1} MiB", over / MIB),
                    not_measured.clone(),
                    not_measured.clone(),
                ],
                goal: "<= 30 MiB".into(),
                verdict: verdict(Some(over <= 30.0 * MIB && !m.load.truncated)),
            });
            details.push(format!(
                "5 corral: peak RSS (VmHWM) {:.1} MiB; load {}",
                m.peak as f64 / MIB,
                keyed_summary(&m.load)
            ));
        }
        Err(e) => {
            rows.push(Row {
                label: "5 RSS after - L1 budget".into(),
                cells: vec!["error".into(), not_measured.clone(), not_measured.clone()],
                goal: "<= 30 MiB".into(),
                verdict: "-".into(),
            });
            details.push(format!("5 corral: {e}"));
        }
    }

    // Row 6.
    let mut calls = Vec::new();
    let mut calls_ok = None;
    let mut locks_row = Vec::new();
    let mut per_miss_row = Vec::new();
    let (mut locks_ok, mut per_miss_ok) = (None, None);
    for name in columns {
        match fig(name).and_then(|f| f.cold.as_ref()) {
            Some(Ok(c)) => {
                calls.push(format!(
                    "{} ({:.2}/key{})",
                    c.calls,
                    c.calls as f64 / c.load.keys_done.max(1) as f64,
                    if name == "corral" {
                        String::new()
                    } else {
                        format!(", {} keys", c.load.keys_done)
                    }
                ));
                details.push(format!("6 {name}: {}", keyed_summary(&c.load)));
                match &c.redis {
                    Some((locks, stats)) => {
                        let data: BTreeMap<&String, &u64> = stats
                            .all()
                            .iter()
                            .filter(|(n, _)| !is_admin_command(n))
                            .collect();
                        let total: u64 = data.values().copied().sum();
                        let per_miss = total as f64 / c.load.keys_done.max(1) as f64;
                        locks_row.push(locks.to_string());
                        per_miss_row.push(format!("{per_miss:.2}"));
                        calls_ok = Some(c.calls == c.load.keys_done as u64 && !c.load.truncated);
                        locks_ok = Some(*locks == 0);
                        per_miss_ok = Some(per_miss <= 5.0);
                        let breakdown: Vec<String> = data
                            .iter()
                            .map(|(n, v)| {
                                format!(
                                    "{n} {v} ({:.2}/miss)",
                                    **v as f64 / c.load.keys_done.max(1) as f64
                                )
                            })
                            .collect();
                        details.push(format!(
                            "6 {name}: Redis data commands {total} over {} misses: {}",
                            c.load.keys_done,
                            breakdown.join(", ")
                        ));
                    }
                    None => {
                        locks_row.push("-".into());
                        per_miss_row.push("-".into());
                    }
                }
            }
            Some(Err(e)) => {
                calls.push("error".into());
                locks_row.push("error".into());
                per_miss_row.push("error".into());
                details.push(format!("6 {name}: {e}"));
            }
            None => {
                calls.push(missing(name));
                locks_row.push(missing(name));
                per_miss_row.push(missing(name));
            }
        }
    }
    let cold_keys = fig("corral")
        .and_then(|f| f.cold.as_ref())
        .and_then(|c| c.as_ref().ok())
        .map(|c| c.load.keys_done)
        .unwrap_or(sizes.keys);
    rows.push(Row {
        label: format!(
            "6 {} cold keys x {COLD_PER_KEY} req: backend calls",
            sizes.keys
        ),
        cells: calls,
        goal: format!("{cold_keys}"),
        verdict: verdict(calls_ok),
    });
    rows.push(Row {
        label: "6 lock keys left in Redis".into(),
        cells: locks_row,
        goal: "0".into(),
        verdict: verdict(locks_ok),
    });
    rows.push(Row {
        label: "6 Redis commands per miss".into(),
        cells: per_miss_row,
        goal: "<= 5".into(),
        verdict: verdict(per_miss_ok),
    });

    // Print.
    println!();
    println!(
        "Corral stampede bench — one run, every system against the same backend, loopback only"
    );
    println!("machine: {}", procs::machine());
    println!(
        "sizes:   burst {}, failing burst {}, hit load {} s, L2 keys {}, keys (rows 5, 6) {}, \
         peers' keys (row 6) {}",
        sizes.burst,
        sizes.fail_burst,
        sizes.hit_secs,
        sizes.l2_keys,
        sizes.keys,
        sizes.keys.min(sizes.peer_keys)
    );
    println!(
        "run:     cargo bench --bench stampede  (took {:.0} s)",
        elapsed.as_secs_f64()
    );
    println!(
        "load:    loadavg {} at start, {} at the end (anything else running on these cores skews \
         every row)",
        loadavg.0, loadavg.1
    );
    for note in notes {
        println!("peer:    {note}");
    }
    println!();
    let label_w = rows
        .iter()
        .map(|r| r.label.chars().count())
        .max()
        .unwrap_or(0);
    let mut widths: Vec<usize> = columns.iter().map(|c| c.len()).collect();
    for r in &rows {
        for (i, c) in r.cells.iter().enumerate() {
            widths[i] = widths[i].max(c.chars().count());
        }
    }
    let goal_w = rows
        .iter()
        .map(|r| r.goal.chars().count())
        .max()
        .unwrap_or(0)
        .max(13);
    let line = |label: &str, cells: &[String], goal: &str, verdict: &str| {
        let mut out = format!("| {label:<label_w$} |");
        for (i, c) in cells.iter().enumerate() {
            out.push_str(&format!(" {c:<w$} |", w = widths[i]));
        }
        out.push_str(&format!(" {goal:<goal_w$} | {verdict:<7} |"));
        out
    };
    let header: Vec<String> = columns.iter().map(|c| c.to_string()).collect();
    println!("{}", line("row", &header, "corral goal", "corral"));
    let rule: Vec<String> = widths.iter().map(|w| "-".repeat(*w)).collect();
    println!(
        "{}",
        line(&"-".repeat(label_w), &rule, &"-".repeat(goal_w), "-------")
    );
    for r in &rows {
        println!("{}", line(&r.label, &r.cells, &r.goal, &r.verdict));
    }
    println!();
    println!("details:");
    for d in &details {
        println!("  {d}");
    }
    println!(
        "configs: benches/stampede/{{corral.toml,nginx.conf,varnish.vcl}}, filled with this run's \
         ports; STAMPEDE_KEEP=1 keeps the run's directory (configs, logs)"
    );
    if let Some(dir) = kept {
        println!("kept:    {}", dir.display());
    }
}

fn keyed_summary(k: &Keyed) -> String {
    format!(
        "{} keys in {:.1} s, {} answered 200, {} other status, {} failed{}",
        k.keys_done,
        k.elapsed.as_secs_f64(),
        k.ok,
        k.not_ok,
        k.errors,
        if k.truncated {
            " — CUT SHORT by the time bound"
        } else {
            ""
        }
    )
}
