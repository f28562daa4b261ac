//! Rows 7 and 8 (issue 8): a burst of many distinct cold keys at once, and the first burst of a
//! fleet started a moment before — both at the default config, 3 requests per key spread over
//! the 3 instances, backend 250 ms.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use futures_util::future::join_all;

use super::backend::{self, Outcome};
use super::load;
use super::procs::BoxError;
use super::support::{RedisServer, Upstream};

/// Requests per key, request `j` of key `k` to instance `(k + j) % 3`.
pub const PER_KEY: usize = 3;
/// The backend's answer time in these rows.
pub const BACKEND_MS: u64 = 250;

/// What one spread burst did.
#[derive(Debug)]
pub struct Spread {
    pub keys: usize,
    pub calls: u64,
    pub ok: usize,
    pub failed: usize,
    pub p50: Duration,
    pub p99: Duration,
    pub redis: Option<RedisCost>,
    /// The backend's peak of calls in flight during the burst.
    pub peak: usize,
}

/// What the burst cost Redis, from `INFO commandstats` and `INFO cpu` around it.
#[derive(Debug)]
pub struct RedisCost {
    /// Every command Redis ran, those inside scripts included, per key.
    pub commands_per_key: f64,
    /// Script calls (EVALSHA/EVAL) per key: each is one round trip from an instance.
    pub scripts_per_key: f64,
    /// Redis CPU (user + sys) per 1000 fills, in ms.
    pub cpu_ms_per_1000: f64,
    /// Reads Redis processed per key (`total_reads_processed`): the round trips as Redis sees
    /// them — requests that reach it together on one connection share a read.
    pub reads_per_key: f64,
    /// Bytes into and out of Redis per key (`total_net_input_bytes`, `total_net_output_bytes`).
    pub bytes_in_per_key: f64,
    pub bytes_out_per_key: f64,
}

/// Sends `keys` x [`PER_KEY`] GETs all at once over `targets`; counts the backend's calls for
/// `scenario` and, with `redis`, what the burst cost it.
pub async fn burst(
    backend: &Upstream,
    targets: &[SocketAddr],
    scenario: &str,
    keys: usize,
    redis: Option<&RedisServer>,
) -> Result<Spread, BoxError> {
    burst_under(backend, targets, "/recommend", scenario, keys, redis).await
}

/// [`burst`] on the route under `prefix`.
pub async fn burst_under(
    backend: &Upstream,
    targets: &[SocketAddr],
    prefix: &str,
    scenario: &str,
    keys: usize,
    redis: Option<&RedisServer>,
) -> Result<Spread, BoxError> {
    let path = backend::scenario_under(
        backend,
        prefix,
        scenario,
        Duration::from_millis(BACKEND_MS),
        Outcome::Ok,
    );
    let before = match redis {
        Some(redis) => {
            redis.reset_stats().await;
            let mut conn = redis.conn().await;
            Some((cpu_seconds(&mut conn).await?, net_stats(&mut conn).await?))
        }
        None => None,
    };
    backend.reset_calls();
    let pool = load::pool();
    let requests = (0..keys)
        .flat_map(|k| (0..PER_KEY).map(move |j| (k, j)))
        .map(|(k, j)| {
            let target = targets[(k + j) % targets.len()];
            let url = format!("http://{target}{path}?k={k}");
            let pool = &pool;
            async move {
                let started = Instant::now();
                let answer = load::pooled_get(pool, &url).await;
                (
                    started.elapsed(),
                    matches!(answer, Ok(a) if a.status == 200),
                )
            }
        });
    let answers = join_all(requests).await;
    drop(pool);
    let mut latencies: Vec<Duration> = answers.iter().map(|(d, _)| *d).collect();
    latencies.sort();
    let ok = answers.iter().filter(|(_, ok)| *ok).count();
    let at = |q: f64| {
        let i = ((latencies.len() as f64 - 1.0) * q).round() as usize;
        latencies.get(i).copied().unwrap_or_default()
    };
    let redis = match (redis, before) {
        (Some(redis), Some(before)) => {
            let stats = redis.commandstats().await;
            let data: u64 = stats
                .all()
                .iter()
                .filter(|(name, _)| !super::is_admin_command(name))
                .map(|(_, calls)| calls)
                .sum();
            let scripts: u64 = stats
                .all()
                .iter()
                .filter(|(name, _)| name.starts_with("eval"))
                .map(|(_, calls)| calls)
                .sum();
            let mut conn = redis.conn().await;
            let cpu = cpu_seconds(&mut conn).await? - before.0;
            let net = net_stats(&mut conn).await?;
            let per_key = |n: u64| n as f64 / keys.max(1) as f64;
            Some(RedisCost {
                commands_per_key: per_key(data),
                scripts_per_key: per_key(scripts),
                cpu_ms_per_1000: cpu * 1000.0 * 1000.0 / keys.max(1) as f64,
                reads_per_key: per_key(net[0].saturating_sub(before.1[0])),
                bytes_in_per_key: per_key(net[1].saturating_sub(before.1[1])),
                bytes_out_per_key: per_key(net[2].saturating_sub(before.1[2])),
            })
        }
        _ => None,
    };
    Ok(Spread {
        keys,
        calls: backend.calls_under(&path),
        ok,
        failed: answers.len() - ok,
        p50: at(0.5),
        p99: at(0.99),
        redis,
        peak: backend.max_in_flight(),
    })
}

/// Redis's CPU time so far (`used_cpu_user + used_cpu_sys`), in seconds.
async fn cpu_seconds(conn: &mut redis::aio::MultiplexedConnection) -> Result<f64, BoxError> {
    let info: String = redis::cmd("INFO").arg("cpu").query_async(conn).await?;
    Ok(info
        .lines()
        .filter_map(|line| {
            let (name, value) = line.trim().split_once(':')?;
            matches!(name, "used_cpu_user" | "used_cpu_sys")
                .then(|| value.parse::<f64>().ok())
                .flatten()
        })
        .sum())
}

/// Redis's reads processed and bytes in and out so far (`INFO stats`).
async fn net_stats(conn: &mut redis::aio::MultiplexedConnection) -> Result<[u64; 3], BoxError> {
    let info: String = redis::cmd("INFO").arg("stats").query_async(conn).await?;
    let mut stats = [0; 3];
    for line in info.lines() {
        let Some((name, value)) = line.trim().split_once(':') else {
            continue;
        };
        let slot = match name {
            "total_reads_processed" => 0,
            "total_net_input_bytes" => 1,
            "total_net_output_bytes" => 2,
            _ => continue,
        };
        stats[slot] = value.parse().unwrap_or(0);
    }
    Ok(stats)
}

/// One line of the report for a spread burst.
pub fn summary(s: &Spread) -> String {
    let redis = match &s.redis {
        Some(r) => format!(
            "; Redis: {:.1} commands/key (scripts' inner commands included), {:.2} script calls/key, {:.1} reads/key (round trips as Redis sees them), {:.0} B in and {:.0} B out per key, {:.0} ms CPU per 1000 fills",
            r.commands_per_key,
            r.scripts_per_key,
            r.reads_per_key,
            r.bytes_in_per_key,
            r.bytes_out_per_key,
            r.cpu_ms_per_1000
        ),
        None => String::new(),
    };
    format!(
        "{} keys x {PER_KEY}: {} backend calls (peak {} at once), {} ok, {} failed, p50 {:.0} ms, p99 {:.0} ms{redis}",
        s.keys,
        s.calls,
        s.peak,
        s.ok,
        s.failed,
        s.p50.as_secs_f64() * 1000.0,
        s.p99.as_secs_f64() * 1000.0
    )
}

/// Row 9 (issue 20): the same burst of `keys` cold keys on the route without a budget and on the
/// route with `fleet_concurrency = 20` (`/model`): the backend's peak of calls in flight, and
/// what queueing for the budget costs the burst's p50/p99.
pub async fn budget_rows(backend: &Upstream, targets: &[SocketAddr], keys: usize) -> Vec<String> {
    let mut lines = Vec::new();
    for (label, prefix, scenario) in [
        ("no budget", "/recommend", "budget-off"),
        ("fleet_concurrency = 20", "/model", "budget-on"),
    ] {
        let line = match burst_under(backend, targets, prefix, scenario, keys, None).await {
            Ok(s) => summary(&s),
            Err(e) => format!("error: {e}"),
        };
        lines.push(format!("9 corral, {label}: {line}"));
    }
    lines
}
