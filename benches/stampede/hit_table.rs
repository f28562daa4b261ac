//! The hit table (issue 19), `STAMPEDE_ONLY=hits`: L1 hit throughput of Corral with and without
//! its access line (and, as a row without a goal, with one worker thread and no line), nginx `proxy_cache` with and without its (buffered) access log, and the nginx
//! `return 200` ceiling, against the same backend and body, `wrk -t1 -c64` (or the in-process loop),
//! in interleaved rounds: every target once per round, so drifts of a shared machine's load hit
//! every target alike. Each ratio is a ratio of medians over the rounds; the spread is the rounds'
//! min–max.
//!
//! `STAMPEDE_HIT_ROUNDS` (3) rounds of `STAMPEDE_HIT_SECONDS` (5 in this mode) each; a short check
//! that it works: `STAMPEDE_ONLY=hits STAMPEDE_HIT_ROUNDS=1 STAMPEDE_HIT_SECONDS=1`.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use crate::backend::{self, Outcome};
use crate::load::{self, Conn};
use crate::procs::{self, BoxError, CorralSettings, LoggingCorral, Nginx};
use crate::support::{RedisServer, Upstream};
use crate::{HIT_CONNS, step};

const CORRAL_ON: &str = "corral, default config (access line on)";
const CORRAL_OFF: &str = "corral, access_log = false";
const CORRAL_ONE_WORKER: &str = "corral, access_log = false, workers = 1";
const NGINX_OFF: &str = "nginx proxy_cache, access_log off";
const NGINX_LOG: &str = "nginx proxy_cache, buffered access log";
const CEILING: &str = "nginx `return 200` (no-work ceiling)";

struct Target {
    name: &'static str,
    addr: SocketAddr,
    rps: Vec<f64>,
}

pub async fn run(
    bin: &Path,
    dir: &Path,
    redis: &RedisServer,
    namespace: &str,
    backend: &Upstream,
) -> Result<(), BoxError> {
    let rounds = env("STAMPEDE_HIT_ROUNDS", 3);
    let secs = env("STAMPEDE_HIT_SECONDS", 5) as u64;
    let settings = CorralSettings {
        name: "hits",
        redis_url: &redis.url(),
        namespace,
        upstream: backend.addr(),
        l1_max_bytes: "256MiB",
    };
    let logged = LoggingCorral::start(bin, dir, "corral-access-on", &settings, true, None)?;
    let quiet = LoggingCorral::start(bin, dir, "corral-access-off", &settings, false, None)?;
    // Not a goal's row: what one worker does where the load generator takes one of the cores.
    let single = LoggingCorral::start(bin, dir, "corral-one-worker", &settings, false, Some(1))?;
    let mut targets = vec![
        Target {
            name: CORRAL_ON,
            addr: logged.addr,
            rps: Vec::new(),
        },
        Target {
            name: CORRAL_OFF,
            addr: quiet.addr,
            rps: Vec::new(),
        },
        Target {
            name: CORRAL_ONE_WORKER,
            addr: single.addr,
            rps: Vec::new(),
        },
    ];
    let body = String::from_utf8_lossy(&backend::body()).into_owned();
    let nginx = match procs::which("nginx") {
        Some(bin) => Some(Nginx::start(&bin, dir, backend.addr(), &body)?),
        None => {
            step("nginx is not installed: its rows are skipped (apt-get install -y nginx-light)");
            None
        }
    };
    if let Some(n) = &nginx {
        targets.push(Target {
            name: NGINX_OFF,
            addr: n.instances[0],
            rps: Vec::new(),
        });
        targets.push(Target {
            name: NGINX_LOG,
            addr: n.logged,
            rps: Vec::new(),
        });
        targets.push(Target {
            name: CEILING,
            addr: n.ceiling,
            rps: Vec::new(),
        });
    }
    let path = backend::scenario(backend, "hit-table", Duration::ZERO, Outcome::Ok);
    for target in &targets {
        let mut conn = Conn::open(target.addr).await?;
        conn.get(&path).await?;
        let warm = conn.get(&path).await?;
        if warm.status != 200 {
            return Err(format!("warming {} answered {}", target.name, warm.status).into());
        }
    }
    let mut tool = String::new();
    for round in 1..=rounds {
        for target in &mut targets {
            step(&format!("hits round {round}/{rounds}: {}", target.name));
            let is_ceiling = target.name == CEILING;
            let url_path = if is_ceiling { "/" } else { path.as_str() };
            let measured = load::throughput(target.addr, url_path, HIT_CONNS, secs).await?;
            if let Some(problems) = &measured.problems {
                return Err(format!("{}: {problems}", target.name).into());
            }
            tool = measured.tool;
            target.rps.push(measured.rps);
        }
    }
    print_table(&targets, &tool, rounds);
    Ok(())
}

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or(default)
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    match sorted.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

fn print_table(targets: &[Target], tool: &str, rounds: usize) {
    let med = |name: &str| {
        targets
            .iter()
            .find(|t| t.name == name)
            .map(|t| median(&t.rps))
    };
    println!();
    println!("hit throughput, {tool}, {rounds} interleaved rounds, 2 KiB body, same backend");
    println!("| target | hits/s (median) | rounds min–max |");
    println!("|---|---|---|");
    for t in targets {
        let min = t.rps.iter().copied().fold(f64::INFINITY, f64::min);
        let max = t.rps.iter().copied().fold(0.0, f64::max);
        println!(
            "| {} | {:.0}k | {:.0}k–{:.0}k |",
            t.name,
            median(&t.rps) / 1000.0,
            min / 1000.0,
            max / 1000.0
        );
    }
    let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}×", a / b),
        _ => "-".into(),
    };
    let (on, off) = (med(CORRAL_ON), med(CORRAL_OFF));
    let single = med(CORRAL_ONE_WORKER);
    let (nginx_off, nginx_log) = (med(NGINX_OFF), med(NGINX_LOG));
    let ceiling = med(CEILING);
    println!();
    println!("| ratio | measured | goal |");
    println!("|---|---|---|");
    println!(
        "| corral (line on) / nginx (log on) | {} | ≥ 1.2× |",
        ratio(on, nginx_log)
    );
    println!(
        "| corral (line off) / nginx (log off) | {} | ≥ 1.2× |",
        ratio(off, nginx_off)
    );
    println!(
        "| corral (line off) / ceiling | {} | ≥ 0.85× |",
        ratio(off, ceiling)
    );
    let cost = match (on, off) {
        (Some(on), Some(off)) if off > 0.0 => format!("{:.1} %", (1.0 - on / off) * 100.0),
        _ => "-".into(),
    };
    println!("| the access line's cost (1 − on/off) | {cost} | ≤ 5 % |");
    println!(
        "| (no goal) corral, workers = 1, line off / nginx (log off) | {} | |",
        ratio(single, nginx_off)
    );
}
