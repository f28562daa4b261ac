//! The hit table (issue 19), `STAMPEDE_ONLY=hits`: L1 hit throughput of Corral with and without
//! its access line (and, as a row without a goal, with a worker per core and no line), nginx
//! `proxy_cache` with and without its (buffered) access log, and the nginx `return 200` ceiling,
//! against the same backend and body, `wrk -t1 -c64` (or the in-process loop), in interleaved
//! rounds: every target in every round, so drifts of a shared machine's load hit every target
//! alike. Each ratio against nginx or the ceiling is a ratio of medians over the rounds; the
//! spread is the rounds' min–max.
//!
//! The access line's cost, a few percent, is taken as a paired measure of one Corral process
//! whose line is turned on and off by a reload (two processes of the same binary can differ by
//! more than that): within each round it is measured twice each way, in mirrored order (line
//! on, off, off, on; the next round off, on, on, off), so a drift within the round weighs on both
//! alike and neither always runs first; the cost is the median over the rounds of each round's
//! own ratio. The other targets turn around the pair, in reverse order every other round, so no
//! target always runs right after the same one (right after the ceiling, say).
//!
//! Beside hits per second, the CPU per hit (Linux, from `/proc`): the whole machine's busy time
//! per hit (the load generator's included, the same for every target) and, for Corral's rows,
//! its process's own. The access line's cost is given both ways: in throughput, which a 2-core
//! machine's noise moves by 10 % from one round to the next, and in Corral's CPU per hit, which it
//! moves far less.
//!
//! `STAMPEDE_HIT_ROUNDS` (5) rounds of `STAMPEDE_HIT_SECONDS` (5 in this mode) a measurement; a
//! short check that it works: `STAMPEDE_ONLY=hits STAMPEDE_HIT_ROUNDS=1 STAMPEDE_HIT_SECONDS=1`.

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
const CORRAL_EVERY_CORE: &str = "corral, access_log = false, a worker per core";
const NGINX_OFF: &str = "nginx proxy_cache, access_log off";
const NGINX_LOG: &str = "nginx proxy_cache, buffered access log";
const CEILING: &str = "nginx `return 200` (no-work ceiling)";

struct Target {
    name: &'static str,
    addr: SocketAddr,
    /// Corral's process, whose own CPU time is read.
    pid: Option<u32>,
    /// The access line of the line's pair (one process, turned on or off before each measurement).
    line: Option<bool>,
    /// Per round (the mean of the round's measurements of this target): hits a second, and µs of
    /// CPU per hit, the whole machine's and the process's (absent where `/proc` is not read).
    rps: Vec<f64>,
    machine_us: Vec<Option<f64>>,
    process_us: Vec<Option<f64>>,
}

impl Target {
    fn new(name: &'static str, addr: SocketAddr, pid: Option<u32>) -> Target {
        Target {
            name,
            addr,
            pid,
            line: None,
            rps: Vec::new(),
            machine_us: Vec::new(),
            process_us: Vec::new(),
        }
    }

    fn with_line(self, on: bool) -> Target {
        Target {
            line: Some(on),
            ..self
        }
    }
}

/// One measurement of one target.
#[derive(Clone, Copy)]
struct Sample {
    rps: f64,
    machine_us: Option<f64>,
    process_us: Option<f64>,
}

/// The targets' indexes in the order round `round` measures them, for `count` targets of which
/// the first two are the line's pair (on, off): the pair as A B B A, its first alternating
/// between rounds; the others rotated one further each round and reversed every other round,
/// the pair among them as one.
fn schedule(round: usize, count: usize) -> Vec<usize> {
    // The units: 0 is the pair, then each other target.
    let mut units: Vec<usize> = (0..count.saturating_sub(1)).collect();
    if let Some(by) = round.checked_rem(units.len()) {
        units.rotate_left(by);
    }
    if round % 2 == 1 {
        units.reverse();
    }
    let (a, b) = if round.is_multiple_of(2) {
        (0, 1)
    } else {
        (1, 0)
    };
    units
        .into_iter()
        .flat_map(|unit| match unit {
            0 => vec![a, b, b, a],
            other => vec![other + 1],
        })
        .collect()
}

pub async fn run(
    bin: &Path,
    dir: &Path,
    redis: &RedisServer,
    namespace: &str,
    backend: &Upstream,
) -> Result<(), BoxError> {
    let rounds = env("STAMPEDE_HIT_ROUNDS", 5);
    let secs = env("STAMPEDE_HIT_SECONDS", 5) as u64;
    let settings = CorralSettings {
        name: "hits",
        redis_url: &redis.url(),
        namespace,
        upstream: backend.addr(),
        l1_max_bytes: "256MiB",
    };
    // One process for the line's pair, its line turned on and off between measurements: two
    // processes of the same binary differ by more than the line costs (a run measured one 10 %
    // slower than the other with the line off in both).
    let corral = LoggingCorral::start(bin, dir, "corral", &settings, true, None)?;
    // Not a goal's row: a worker on every core, the default until the thirteenth round (the
    // default now leaves one core to the application, here the load generator).
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let every = LoggingCorral::start(bin, dir, "corral-every-core", &settings, false, Some(cores))?;
    let mut targets = vec![
        Target::new(CORRAL_ON, corral.addr, Some(corral.pid())).with_line(true),
        Target::new(CORRAL_OFF, corral.addr, Some(corral.pid())).with_line(false),
        Target::new(CORRAL_EVERY_CORE, every.addr, Some(every.pid())),
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
        targets.push(Target::new(NGINX_OFF, n.instances[0], None));
        targets.push(Target::new(NGINX_LOG, n.logged, None));
        targets.push(Target::new(CEILING, n.ceiling, None));
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
    let count = targets.len();
    for round in 0..rounds {
        let mut taken: Vec<Vec<Sample>> = vec![Vec::new(); count];
        for i in schedule(round, count) {
            let target = &targets[i];
            step(&format!(
                "hits round {}/{rounds}: {}",
                round + 1,
                target.name
            ));
            if let Some(on) = target.line
                && corral.set_access_log(on).await?
            {
                // The writer's last lines (it writes every 5 ms) go before the measurement.
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let is_ceiling = target.name == CEILING;
            let url_path = if is_ceiling { "/" } else { path.as_str() };
            let logged_before = corral.log_len();
            let before = cpu::Reading::now(target.pid);
            let measured = load::throughput(target.addr, url_path, HIT_CONNS, secs).await?;
            let used = before.and_then(|b| b.used(target.pid));
            if let Some(problems) = &measured.problems {
                return Err(format!("{}: {problems}", target.name).into());
            }
            if let Some(on) = target.line {
                // The switch took: a line per hit (over a hundred bytes), or less than a byte a
                // hit (the reload's own line; a straggler of the last measurement's lines).
                let hits = measured.rps * secs as f64;
                let logged = corral.log_len().saturating_sub(logged_before) as f64;
                let took = if on {
                    logged >= 50.0 * hits
                } else {
                    logged < hits
                };
                if !took {
                    return Err(format!(
                        "{}: {logged} bytes of log for {hits:.0} hits",
                        target.name
                    )
                    .into());
                }
            }
            tool = measured.tool;
            // µs of CPU a second, over hits a second.
            let used = used.filter(|_| measured.rps > 0.0);
            let per_hit = |us: f64, seconds: f64| us / seconds / measured.rps;
            taken[i].push(Sample {
                rps: measured.rps,
                machine_us: used.as_ref().map(|u| per_hit(u.machine_us, u.seconds)),
                process_us: used
                    .as_ref()
                    .and_then(|u| u.process_us.map(|us| per_hit(us, u.seconds))),
            });
        }
        for (target, samples) in targets.iter_mut().zip(taken) {
            target
                .rps
                .push(mean(samples.iter().map(|s| Some(s.rps))).unwrap_or(0.0));
            target
                .machine_us
                .push(mean(samples.iter().map(|s| s.machine_us)));
            target
                .process_us
                .push(mean(samples.iter().map(|s| s.process_us)));
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

/// The mean of the values, if every one is there.
fn mean(values: impl Iterator<Item = Option<f64>>) -> Option<f64> {
    let values: Vec<f64> = values.collect::<Option<_>>()?;
    (!values.is_empty()).then(|| values.iter().sum::<f64>() / values.len() as f64)
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
    let find = |name: &str| targets.iter().find(|t| t.name == name);
    let med = |name: &str| find(name).map(|t| median(&t.rps));
    println!();
    println!(
        "hit throughput, {tool}, {rounds} interleaved rounds (the line's pair twice a round), 2 KiB body, same backend"
    );
    println!(
        "| target | hits/s (median) | rounds min–max | CPU per hit, whole machine (µs) | CPU per hit, the process (µs) |"
    );
    println!("|---|---|---|---|---|");
    let micros = |v: Option<f64>| v.map_or("-".to_owned(), |us| format!("{us:.2}"));
    for t in targets {
        let min = t.rps.iter().copied().fold(f64::INFINITY, f64::min);
        let max = t.rps.iter().copied().fold(0.0, f64::max);
        println!(
            "| {} | {:.0}k | {:.0}k–{:.0}k | {} | {} |",
            t.name,
            median(&t.rps) / 1000.0,
            min / 1000.0,
            max / 1000.0,
            micros(present_median(&t.machine_us)),
            micros(present_median(&t.process_us)),
        );
    }
    let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}×", a / b),
        _ => "-".into(),
    };
    let (on, off) = (med(CORRAL_ON), med(CORRAL_OFF));
    let every = med(CORRAL_EVERY_CORE);
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
    if let (Some(on), Some(off)) = (find(CORRAL_ON), find(CORRAL_OFF)) {
        // Each round's own ratio of the pair: the line's cost with that round's load.
        let all = |t: &Target| t.rps.iter().copied().map(Some).collect::<Vec<_>>();
        let in_throughput = paired(&all(on), &all(off), |on, off| 1.0 - on / off);
        let in_cpu = paired(&on.process_us, &off.process_us, |on, off| on / off - 1.0);
        println!(
            "| the access line's cost in throughput (1 − on/off), median of the rounds' | {} | ≤ 5 % |",
            cost(&in_throughput)
        );
        println!(
            "| the access line's cost in Corral's CPU per hit (on/off − 1), median of the rounds' | {} | ≤ 5 % |",
            cost(&in_cpu)
        );
    }
    println!(
        "| (no goal) corral, a worker per core, line off / nginx (log off); / ceiling | {}; {} | |",
        ratio(every, nginx_off),
        ratio(every, ceiling)
    );
}

/// Each round's `f(on, off)`, for the rounds that measured both (and `off` above zero).
fn paired(on: &[Option<f64>], off: &[Option<f64>], f: impl Fn(f64, f64) -> f64) -> Vec<f64> {
    on.iter()
        .zip(off)
        .filter_map(|(on, off)| match (on, off) {
            (Some(on), Some(off)) if *off > 0.0 => Some(f(*on, *off)),
            _ => None,
        })
        .collect()
}

/// The median of a cost over the rounds, and each round's.
fn cost(rounds: &[f64]) -> String {
    if rounds.is_empty() {
        return "-".into();
    }
    let each: Vec<String> = rounds.iter().map(|f| format!("{:.1}", f * 100.0)).collect();
    format!(
        "{:.1} % (rounds: {})",
        median(rounds) * 100.0,
        each.join(", ")
    )
}

/// The median of the rounds that have a value, if any has.
fn present_median(values: &[Option<f64>]) -> Option<f64> {
    let values: Vec<f64> = values.iter().flatten().copied().collect();
    (!values.is_empty()).then(|| median(&values))
}

/// CPU time read from `/proc` (Linux; elsewhere nothing is read and the columns show `-`).
mod cpu {
    use std::time::Instant;

    /// The clock ticks a second of `/proc`'s CPU times (`USER_HZ`), as `getconf` says.
    fn ticks_per_second() -> f64 {
        static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
        *TICKS.get_or_init(|| {
            std::process::Command::new("getconf")
                .arg("CLK_TCK")
                .output()
                .ok()
                .and_then(|out| String::from_utf8(out.stdout).ok())
                .and_then(|text| text.trim().parse().ok())
                .unwrap_or(100.0)
        })
    }

    /// The whole machine's busy ticks, from `/proc/stat`'s first line: user, nice, system, irq
    /// and softirq (not idle, iowait, nor steal: time a VM's neighbours took from it).
    fn machine_ticks() -> Option<u64> {
        let stat = std::fs::read_to_string("/proc/stat").ok()?;
        let fields: Vec<u64> = stat
            .lines()
            .next()?
            .split_whitespace()
            .skip(1)
            .map(|f| f.parse().ok())
            .collect::<Option<_>>()?;
        [0, 1, 2, 5, 6].iter().map(|&i| fields.get(i)).sum()
    }

    /// A process's user and system ticks (`/proc/<pid>/stat` fields 14 and 15).
    fn process_ticks(pid: u32) -> Option<u64> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // The command name, in parentheses, may hold spaces: count the fields after it.
        let (_, rest) = stat.rsplit_once(')')?;
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let ticks = |i: usize| fields.get(i)?.parse::<u64>().ok();
        Some(ticks(11)? + ticks(12)?)
    }

    /// The counters at one moment.
    pub struct Reading {
        at: Instant,
        machine: u64,
        process: Option<u64>,
    }

    /// CPU used between two readings, in µs, over `seconds` of wall time.
    pub struct Used {
        pub seconds: f64,
        pub machine_us: f64,
        pub process_us: Option<f64>,
    }

    impl Reading {
        pub fn now(pid: Option<u32>) -> Option<Reading> {
            Some(Reading {
                at: Instant::now(),
                machine: machine_ticks()?,
                process: pid.and_then(process_ticks),
            })
        }

        /// What was used since this reading.
        pub fn used(&self, pid: Option<u32>) -> Option<Used> {
            let later = Reading::now(pid)?;
            let us = |ticks: u64| ticks as f64 / ticks_per_second() * 1e6;
            Some(Used {
                seconds: later.at.duration_since(self.at).as_secs_f64(),
                machine_us: us(later.machine.checked_sub(self.machine)?),
                process_us: match (self.process, later.process) {
                    (Some(a), Some(b)) => b.checked_sub(a).map(us),
                    _ => None,
                },
            })
        }
    }
}
